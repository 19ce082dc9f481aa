//! Types shared by Sluice's XDP datapath (`lb-ebpf`) and its userspace (`lb-userspace`).
//!
//! Everything that crosses the kernel/user boundary is defined here once: map names, map
//! key/value layouts, and the enums that index counters. Map values are `#[repr(C)]` with
//! explicit padding and a compile-time size assert, and hold no `bool`/`enum`/`Option`
//! (the kernel and bpftool see raw bytes; a stray padding byte would break hash keys).
//!
//! By concern: `abi` (schema, pin and map names, capacities, protocol numbers, XDP actions),
//! `counters` (outcomes, refusal reasons, traffic statistics), `tables` (services, backends,
//! connection counters, refusal events), `flowtab` (the flow table's layout and tag words),
//! `hash` (the hashes both sides compute), `config` (the load-time global). Every item is
//! re-exported here. A `u8` field's values are typed enums with names (`BackendState`,
//! `FlowState`, `Mode`, `Reject`, `Proto`, …) next to the byte constants the maps hold.
#![no_std]

/// A `u8` field's values with their names, made the way [`Reason`] is: an enum userspace
/// matches on and prints, and the bytes the maps hold as constants. The fields stay `u8` (any
/// byte is a valid map value; an enum read from a map would not be).
macro_rules! named_u8 {
    ($(#[$m:meta])* $ty:ident { $($(#[$doc:meta])* $variant:ident = $val:literal, $name:literal, $konst:ident;)+ }) => {
        $(#[$m])*
        #[repr(u8)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $ty { $($(#[$doc])* $variant = $val,)+ }

        $(
            #[doc = concat!("[`", stringify!($ty), "::", stringify!($variant), "`] as the maps hold it.")]
            pub const $konst: u8 = $ty::$variant as u8;
        )+

        impl $ty {
            pub const ALL: &[Self] = &[$(Self::$variant,)+];
            /// Every name, in the order of [`Self::ALL`].
            pub const NAMES: &[&str] = &[$($name,)+];
            /// The name `sluice` prints and matches.
            pub const fn name(self) -> &'static str {
                match self { $(Self::$variant => $name,)+ }
            }
            pub const fn from_u8(v: u8) -> Option<Self> {
                match v { $($val => Some(Self::$variant),)+ _ => None }
            }
        }

        /// Its name.
        #[cfg(feature = "user")]
        impl core::fmt::Display for $ty {
            fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
                f.write_str(self.name())
            }
        }

        /// Written by its name (the config, the API, `--json`).
        #[cfg(feature = "user")]
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        /// Read by its name; any other is refused with the names it may be.
        #[cfg(feature = "user")]
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                crate::user::one_of(d, Self::ALL, Self::NAMES)
            }
        }
    };
}

mod abi;
mod config;
mod counters;
mod flowtab;
mod hash;
mod tables;
#[cfg(feature = "user")]
pub mod user;

pub use abi::*;
pub use config::*;
pub use counters::*;
pub use flowtab::*;
pub use hash::*;
pub use tables::*;

#[cfg(test)]
mod tests {
    use super::*;

    /// Each byte a map holds names one value, and back.
    #[test]
    fn named_bytes_round_trip() {
        macro_rules! check {
            ($($ty:ident),+) => {$(
                for (i, v) in $ty::ALL.iter().enumerate() {
                    assert_eq!($ty::from_u8(*v as u8), Some(*v));
                    assert!($ty::ALL[..i].iter().all(|w| w.name() != v.name() && *w as u8 != *v as u8), "{v:?}");
                }
            )+};
        }
        check!(BackendState, FlowState, Mode, Reject, Proto, IcmpEcho, Fragments);
        assert_eq!((BACKEND_ACTIVE, FLOW_UDP, MODE_IPIP, REJECT_RST, PROTO_TCP), (1, 4, 1, 1, 6));
        assert_eq!(BackendState::from_u8(0), None, "slot unused");
    }

    #[test]
    fn stat_all_is_in_index_order() {
        for (i, s) in Stat::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "{s:?}");
        }
    }

    #[test]
    fn stat_names_are_unique() {
        for a in Stat::ALL {
            for b in Stat::ALL {
                assert!(a == b || a.name() != b.name());
            }
        }
    }

    #[test]
    fn reasons_round_trip_and_index_their_fields() {
        let mut r = Refusals::default();
        for (i, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i);
            assert_eq!(Reason::from_u8(*reason as u8), Some(*reason));
            *r.slot(*reason) += i as u64 + 1;
        }
        for (i, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(r.get(*reason), i as u64 + 1, "{}", reason.name());
        }
        assert_eq!(Reason::from_u8(Reason::ALL.len() as u8), None);
    }

    #[test]
    fn flow_hash_depends_on_every_field() {
        let base = FlowKey {
            src: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst: [10, 0, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sport_be: [0x9c, 0x40],
            dport_be: [0, 80],
            proto: 6,
            _pad0: 0,
            _pad1: 0,
        };
        let h = flow_hash(&base);
        let mut k = base;
        k.src[3] = 2;
        assert_ne!(flow_hash(&k), h);
        let mut k = base;
        k.dst[15] = 1;
        assert_ne!(flow_hash(&k), h);
        let mut k = base;
        k.sport_be[1] ^= 1;
        assert_ne!(flow_hash(&k), h);
        let mut k = base;
        k.dport_be[1] ^= 1;
        assert_ne!(flow_hash(&k), h);
        let mut k = base;
        k.proto = 17;
        assert_ne!(flow_hash(&k), h);
    }

    #[test]
    fn flow_buckets_are_distinct_in_range_and_spread() {
        assert_eq!(flow_table_buckets(1), 64);
        assert_eq!(flow_table_buckets(DEFAULT_FLOW_CAPACITY), 349_526);
        for n in [4u32, 5, 257, 262_144] {
            let mut seen = [0u32; 4];
            for i in 0..20_000u32 {
                let h = i.wrapping_mul(0x9E37_79B9) ^ (i >> 3);
                let (a, b) = flow_buckets(h, n);
                assert!(a < n && b < n && a != b, "{n} {h}");
                if n == 4 {
                    seen[a as usize] += 1;
                }
            }
            if n == 4 {
                assert!(seen.iter().all(|&c| c > 4000), "{seen:?}");
            }
        }
        for h in [0, 1, 2, 3, u32::MAX] {
            assert!(flow_fingerprint(h) != TAG_FREE && flow_fingerprint(h) & TAG_PENDING == 0);
        }
        let w = tag_word(7, flow_fingerprint(9));
        assert_eq!((tag_generation(w), tag_low(w), next_generation(w)), (7, flow_fingerprint(9), 8));
        assert_eq!(next_generation(tag_word(0xFFFF_FFFF, TAG_FREE)), 1, "generation 0 is skipped");
    }

    #[test]
    fn probe_sequence_starts_at_hash_mod_size_and_stays_in_range() {
        for hash in [0u32, 1, 0xdead_beef, u32::MAX] {
            assert_eq!(probe_slot(hash, 0, 65537), hash % 65537);
            for i in 0..MAX_PROBES {
                assert!(probe_slot(hash, i, 13) < 13);
            }
        }
    }
}
