//! Userspace only: `aya::Pod` for every map key and value, reading the named bytes by name
//! (serde), and the one codec between an `IpAddr` and the maps' 16 address bytes.

use core::net::IpAddr;

use crate::{FAMILY_V4, FAMILY_V6};

// SAFETY: all of these are plain-old-data: repr(C), explicit padding (sizes asserted where
// they are defined), and any bit pattern is a valid value.
unsafe impl aya::Pod for super::Counter {}
unsafe impl aya::Pod for super::ServiceKey {}
unsafe impl aya::Pod for super::Service {}
unsafe impl aya::Pod for super::Backend {}
unsafe impl aya::Pod for super::Conns {}
unsafe impl aya::Pod for super::FlowKey {}
unsafe impl aya::Pod for super::Flow {}
unsafe impl aya::Pod for super::FlowEntry {}
unsafe impl aya::Pod for super::FlowBucket {}
unsafe impl aya::Pod for super::FlowTags {}
unsafe impl aya::Pod for super::FlowCount {}
unsafe impl aya::Pod for super::TrafficStats {}
unsafe impl aya::Pod for super::RefusalEvent {}
unsafe impl aya::Pod for super::EventBucket {}
unsafe impl aya::Pod for super::Config {}

/// Reads one of `allowed` by its name (`names`, in the same order); any other name is refused
/// as serde's derive would: "unknown variant `icmp`, expected `tcp` or `udp`". The config uses
/// it to allow a subset (a service's protocol is tcp or udp).
pub fn one_of<'de, D: serde::Deserializer<'de>, T: Copy>(d: D, allowed: &'static [T], names: &'static [&'static str]) -> Result<T, D::Error> {
    struct Name<T: 'static> {
        allowed: &'static [T],
        names: &'static [&'static str],
    }
    impl<T: Copy> serde::de::Visitor<'_> for Name<T> {
        type Value = T;
        fn expecting(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
            f.write_str("a name")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
            self.names.iter().position(|n| *n == v).map(|i| self.allowed[i]).ok_or_else(|| E::unknown_variant(v, self.names))
        }
    }
    d.deserialize_str(Name { allowed, names })
}

/// An address as the maps hold it: 16 bytes (IPv4 in the first 4, the rest zero) and its
/// family ([`FAMILY_V4`] or [`FAMILY_V6`]).
pub fn addr16(ip: IpAddr) -> ([u8; 16], u8) {
    match ip {
        IpAddr::V4(v) => {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&v.octets());
            (a, FAMILY_V4)
        }
        IpAddr::V6(v) => (v.octets(), FAMILY_V6),
    }
}

/// Back from the maps, where the family is stored beside the bytes (backends, events).
pub fn ip_from(bytes: &[u8; 16], family: u8) -> IpAddr {
    if family == FAMILY_V6 {
        IpAddr::from(*bytes)
    } else {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    }
}

/// Back from a key that stores no family (`ServiceKey`, `FlowKey`): IPv4 when the last 12
/// bytes are zero (the IPv6 addresses that would read so, `a.b.c.d::`, are no VIP or client).
pub fn ip_from_key(bytes: &[u8; 16]) -> IpAddr {
    ip_from(bytes, if bytes[4..].iter().all(|b| *b == 0) { FAMILY_V4 } else { FAMILY_V6 })
}
