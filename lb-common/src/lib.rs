//! Types shared by Sluice's XDP datapath (`lb-ebpf`) and its userspace (`lb-userspace`).
//!
//! Everything that crosses the kernel/user boundary is defined here once: map names, map
//! key/value layouts, and the enums that index counters. Map values are `#[repr(C)]` with
//! explicit padding and a compile-time size assert, and hold no `bool`/`enum`/`Option`
//! (the kernel and bpftool see raw bytes; a stray padding byte would break hash keys).
#![no_std]

/// Bumped whenever a pinned map's layout or meaning changes; a daemon refuses to adopt pinned
/// maps of another schema.
pub const SCHEMA_VERSION: u32 = 1;

/// Directory under the bpf filesystem where `sluice run` pins its maps by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/sluice";

/// Map names as they appear in the object, in `bpftool map list` and as pin file names.
pub mod maps {
    /// Per-CPU array: [`crate::Stat`] index → [`crate::Counter`]. Written by the datapath,
    /// read (summed over CPUs) by `sluice status` and the daemon.
    pub const STATS: &str = "STATS";
}

/// Name of the balancer XDP program in the object.
pub const PROG_BALANCER: &str = "sluice_balancer";

/// A packet and byte count. Value of [`maps::STATS`] (one per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(size_of::<Counter>() == 16);

/// What happened to a packet. Every packet the balancer sees is counted under exactly one of
/// these, so their sum is the number of packets seen. The index into [`maps::STATS`].
///
/// Malformed/truncated frames get their own outcome per header so an operator can tell a
/// broken sender from a broken parser; they are passed to the kernel (which drops them with
/// its own accounting), never `XDP_ABORTED`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stat {
    /// Not IPv4/IPv6 (ARP, LLDP, …): passed.
    NonIp = 0,
    /// IPv4/IPv6 carrying neither TCP nor UDP (ICMP, …): passed.
    OtherL4 = 1,
    /// Well-formed TCP over IPv4: passed.
    Tcp4 = 2,
    /// Well-formed UDP over IPv4: passed.
    Udp4 = 3,
    /// Well-formed TCP over IPv6: passed.
    Tcp6 = 4,
    /// Well-formed UDP over IPv6: passed.
    Udp6 = 5,
    /// IPv4 fragment (MF set or offset ≠ 0) or IPv6 fragment header: passed.
    Fragment = 6,
    /// Shorter than an Ethernet header.
    TruncatedEth = 7,
    /// 802.1Q tag cut short.
    TruncatedVlan = 8,
    /// Shorter than the IPv4 header its IHL announces.
    TruncatedIpv4 = 9,
    /// IPv4 header with IHL < 5, version ≠ 4 or a total length shorter than its header.
    BadIpv4 = 10,
    /// Shorter than an IPv6 header or one of its extension headers.
    TruncatedIpv6 = 11,
    /// IPv6 with more extension headers than the datapath walks ([`MAX_IPV6_EXT_HEADERS`]).
    Ipv6ExtLimit = 12,
    /// TCP header cut short (20 bytes or its data offset).
    TruncatedTcp = 13,
    /// TCP data offset < 5.
    BadTcp = 14,
    /// UDP header cut short.
    TruncatedUdp = 15,
}

impl Stat {
    /// Number of variants: the capacity of [`maps::STATS`].
    pub const COUNT: u32 = 16;

    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::NonIp,
        Self::OtherL4,
        Self::Tcp4,
        Self::Udp4,
        Self::Tcp6,
        Self::Udp6,
        Self::Fragment,
        Self::TruncatedEth,
        Self::TruncatedVlan,
        Self::TruncatedIpv4,
        Self::BadIpv4,
        Self::TruncatedIpv6,
        Self::Ipv6ExtLimit,
        Self::TruncatedTcp,
        Self::BadTcp,
        Self::TruncatedUdp,
    ];

    /// Stable snake_case name, used in `sluice status`, metrics labels and docs.
    pub const fn name(self) -> &'static str {
        match self {
            Self::NonIp => "non_ip",
            Self::OtherL4 => "other_l4",
            Self::Tcp4 => "tcp4",
            Self::Udp4 => "udp4",
            Self::Tcp6 => "tcp6",
            Self::Udp6 => "udp6",
            Self::Fragment => "fragment",
            Self::TruncatedEth => "truncated_eth",
            Self::TruncatedVlan => "truncated_vlan",
            Self::TruncatedIpv4 => "truncated_ipv4",
            Self::BadIpv4 => "bad_ipv4",
            Self::TruncatedIpv6 => "truncated_ipv6",
            Self::Ipv6ExtLimit => "ipv6_ext_limit",
            Self::TruncatedTcp => "truncated_tcp",
            Self::BadTcp => "bad_tcp",
            Self::TruncatedUdp => "truncated_udp",
        }
    }

    /// Whether this outcome means the frame was malformed or truncated.
    pub const fn is_malformed(self) -> bool {
        (self as u32) >= (Self::TruncatedEth as u32) && !matches!(self, Self::Ipv6ExtLimit)
    }
}

// Keep COUNT and ALL honest: the last variant's index + 1.
const _: () = assert!(Stat::TruncatedUdp as u32 + 1 == Stat::COUNT);

/// IPv6 extension headers (hop-by-hop, routing, destination options) walked before giving up;
/// bounded so the verifier can prove the loop ends.
pub const MAX_IPV6_EXT_HEADERS: u32 = 4;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, repr(C), no padding (size asserted above), any bit pattern valid.
    unsafe impl aya::Pod for super::Counter {}
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
