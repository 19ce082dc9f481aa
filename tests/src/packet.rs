//! A packet builder for datapath tests: Ethernet (+ 802.1Q), IPv4 (options, fragments), IPv6
//! (extension headers), TCP (flags, options), UDP, ICMP/ICMPv6, and IP-in-IP nesting, with
//! correct checksums. It is checked against `etherparse` (an independent parser) in the tests
//! at the bottom, so a datapath test failing is the datapath's fault, not the builder's.
//!
//! Build a packet from a constructor, adjust it with the `with_*` methods, then [`Pkt::build`]:
//! ```
//! use sluice_tests::packet::{Pkt, tcp};
//! let syn = Pkt::tcp4("10.0.0.1:40000", "10.0.0.100:80").flags(tcp::SYN).with_vlan(7).build();
//! assert_eq!(syn.len(), 14 + 4 + 20 + 20);
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub mod tcp {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

pub use lb_common::{PROTO_ICMP, PROTO_ICMPV6, PROTO_IPIP, PROTO_IPV6, PROTO_TCP, PROTO_UDP};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

#[derive(Clone, Debug)]
pub struct Pkt {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    /// Overrides the EtherType (after the VLAN tag, if any); `None` derives it from `l3`.
    pub ether_type: Option<u16>,
    pub l3: L3,
}

#[derive(Clone, Debug)]
pub enum L3 {
    V4(V4),
    V6(V6),
    /// Raw bytes after the Ethernet header (ARP, garbage…).
    Raw(Vec<u8>),
}

#[derive(Clone, Debug)]
pub struct V4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub id: u16,
    pub tos: u8,
    /// Option bytes; padded with zeros (EOL) to a multiple of 4.
    pub options: Vec<u8>,
    pub dont_frag: bool,
    pub more_frags: bool,
    /// Fragment offset in 8-byte units.
    pub frag_offset: u16,
    /// Overrides the IHL nibble (to build malformed headers).
    pub ihl_override: Option<u8>,
    /// Overrides the total length (to build malformed headers).
    pub tot_len_override: Option<u16>,
    pub l4: L4,
}

#[derive(Clone, Debug)]
pub struct V6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub hop_limit: u8,
    /// Extension headers in order: (header type, body). The body is padded so the header is a
    /// multiple of 8 bytes; a fragment header (44) body must be 6 bytes.
    pub ext: Vec<(u8, Vec<u8>)>,
    pub l4: L4,
}

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp(Tcp),
    Udp {
        sport: u16,
        dport: u16,
        payload: Vec<u8>,
    },
    /// ICMP (over IPv4) or ICMPv6 (over IPv6): type, code, the 4 "rest of header" bytes, body.
    Icmp {
        typ: u8,
        code: u8,
        rest: [u8; 4],
        body: Vec<u8>,
    },
    /// IP-in-IP: IPv4 (proto 4) or IPv6 (proto 41) inside.
    Encap(Box<L3>),
    /// Any other protocol number with raw payload.
    Raw {
        proto: u8,
        payload: Vec<u8>,
    },
}

#[derive(Clone, Debug)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// Option bytes; padded with NOPs... (zeros, EOL) to a multiple of 4.
    pub options: Vec<u8>,
    /// Overrides the data offset nibble (to build malformed headers).
    pub doff_override: Option<u8>,
    pub payload: Vec<u8>,
}

fn sock(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|_| panic!("bad socket address {s}"))
}

fn v4(a: SocketAddr) -> Ipv4Addr {
    match a.ip() {
        IpAddr::V4(v) => v,
        IpAddr::V6(_) => panic!("{a} is not IPv4"),
    }
}

fn v6(a: SocketAddr) -> Ipv6Addr {
    match a.ip() {
        IpAddr::V6(v) => v,
        IpAddr::V4(_) => panic!("{a} is not IPv6"),
    }
}

impl V4 {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Self {
        Self { src, dst, ttl: 64, id: 0x1234, tos: 0, options: Vec::new(), dont_frag: true, more_frags: false, frag_offset: 0, ihl_override: None, tot_len_override: None, l4 }
    }
}

impl V6 {
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr, l4: L4) -> Self {
        Self { src, dst, hop_limit: 64, ext: Vec::new(), l4 }
    }
}

impl Tcp {
    pub fn new(sport: u16, dport: u16, flags: u8) -> Self {
        Self { sport, dport, seq: 1000, ack: if flags & tcp::ACK != 0 { 2000 } else { 0 }, flags, window: 64240, options: Vec::new(), doff_override: None, payload: Vec::new() }
    }
}

impl Pkt {
    pub fn from_l3(l3: L3) -> Self {
        Self { src_mac: CLIENT_MAC, dst_mac: LB_MAC, vlan: None, ether_type: None, l3 }
    }

    /// A TCP SYN from `src` to `dst` ("a.b.c.d:port").
    pub fn tcp4(src: &str, dst: &str) -> Self {
        let (s, d) = (sock(src), sock(dst));
        Self::from_l3(L3::V4(V4::new(v4(s), v4(d), L4::Tcp(Tcp::new(s.port(), d.port(), tcp::SYN)))))
    }

    pub fn udp4(src: &str, dst: &str) -> Self {
        let (s, d) = (sock(src), sock(dst));
        Self::from_l3(L3::V4(V4::new(v4(s), v4(d), L4::Udp { sport: s.port(), dport: d.port(), payload: b"ping".to_vec() })))
    }

    /// A TCP SYN from `src` to `dst` ("[v6]:port").
    pub fn tcp6(src: &str, dst: &str) -> Self {
        let (s, d) = (sock(src), sock(dst));
        Self::from_l3(L3::V6(V6::new(v6(s), v6(d), L4::Tcp(Tcp::new(s.port(), d.port(), tcp::SYN)))))
    }

    pub fn udp6(src: &str, dst: &str) -> Self {
        let (s, d) = (sock(src), sock(dst));
        Self::from_l3(L3::V6(V6::new(v6(s), v6(d), L4::Udp { sport: s.port(), dport: d.port(), payload: b"ping".to_vec() })))
    }

    /// An ICMP echo request from `src` to `dst` (addresses, no ports).
    pub fn icmp4_echo(src: &str, dst: &str) -> Self {
        let l4 = L4::Icmp { typ: 8, code: 0, rest: [0, 1, 0, 1], body: b"sluice".to_vec() };
        Self::from_l3(L3::V4(V4::new(src.parse().expect("v4"), dst.parse().expect("v4"), l4)))
    }

    pub fn icmp6_echo(src: &str, dst: &str) -> Self {
        let l4 = L4::Icmp { typ: 128, code: 0, rest: [0, 1, 0, 1], body: b"sluice".to_vec() };
        Self::from_l3(L3::V6(V6::new(src.parse().expect("v6"), dst.parse().expect("v6"), l4)))
    }

    /// An ARP request (not IP).
    pub fn arp() -> Self {
        let mut p = Self::from_l3(L3::Raw(vec![0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 10, 0, 0, 100]));
        p.ether_type = Some(0x0806);
        p.dst_mac = [0xff; 6];
        p
    }

    pub fn with_vlan(mut self, id: u16) -> Self {
        self.vlan = Some(id);
        self
    }

    pub fn v4_mut(&mut self) -> &mut V4 {
        match &mut self.l3 {
            L3::V4(v) => v,
            _ => panic!("not an IPv4 packet"),
        }
    }

    pub fn v6_mut(&mut self) -> &mut V6 {
        match &mut self.l3 {
            L3::V6(v) => v,
            _ => panic!("not an IPv6 packet"),
        }
    }

    pub fn l4_mut(&mut self) -> &mut L4 {
        match &mut self.l3 {
            L3::V4(v) => &mut v.l4,
            L3::V6(v) => &mut v.l4,
            L3::Raw(_) => panic!("no L4 in a raw frame"),
        }
    }

    pub fn tcp_mut(&mut self) -> &mut Tcp {
        match self.l4_mut() {
            L4::Tcp(t) => t,
            _ => panic!("not a TCP packet"),
        }
    }

    pub fn flags(mut self, flags: u8) -> Self {
        let t = self.tcp_mut();
        t.flags = flags;
        if flags & tcp::ACK != 0 && t.ack == 0 {
            t.ack = 2000;
        }
        self
    }

    pub fn payload(mut self, data: &[u8]) -> Self {
        match self.l4_mut() {
            L4::Tcp(t) => t.payload = data.to_vec(),
            L4::Udp { payload, .. } | L4::Raw { payload, .. } => *payload = data.to_vec(),
            L4::Icmp { body, .. } => *body = data.to_vec(),
            L4::Encap(_) => panic!("set the inner packet's payload instead"),
        }
        self
    }

    /// Wraps this packet's IP layer in an outer IPv4 header (IPIP, or IPv6-in-IPv4).
    pub fn encap4(mut self, src: &str, dst: &str) -> Self {
        let inner = std::mem::replace(&mut self.l3, L3::Raw(Vec::new()));
        self.l3 = L3::V4(V4::new(src.parse().expect("v4"), dst.parse().expect("v4"), L4::Encap(Box::new(inner))));
        self
    }

    /// Wraps this packet's IP layer in an outer IPv6 header (IP6IP6, or IPv4-in-IPv6).
    pub fn encap6(mut self, src: &str, dst: &str) -> Self {
        let inner = std::mem::replace(&mut self.l3, L3::Raw(Vec::new()));
        self.l3 = L3::V6(V6::new(src.parse().expect("v6"), dst.parse().expect("v6"), L4::Encap(Box::new(inner))));
        self
    }

    /// Serializes the frame with correct lengths and checksums.
    pub fn build(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        let ether_type = self.ether_type.unwrap_or(match self.l3 {
            L3::V4(_) => 0x0800,
            L3::V6(_) => 0x86DD,
            L3::Raw(_) => 0x88B5, // IEEE local experimental
        });
        if let Some(id) = self.vlan {
            out.extend_from_slice(&0x8100u16.to_be_bytes());
            out.extend_from_slice(&(id & 0x0FFF).to_be_bytes());
        }
        out.extend_from_slice(&ether_type.to_be_bytes());
        out.extend_from_slice(&l3_bytes(&self.l3));
        out
    }
}

/// Bytes of an IP layer (header + everything inside).
pub fn l3_bytes(l3: &L3) -> Vec<u8> {
    match l3 {
        L3::V4(v) => v4_bytes(v),
        L3::V6(v) => v6_bytes(v),
        L3::Raw(b) => b.clone(),
    }
}

fn pad_to(mut v: Vec<u8>, multiple: usize) -> Vec<u8> {
    while !v.len().is_multiple_of(multiple) {
        v.push(0);
    }
    v
}

fn v4_bytes(v: &V4) -> Vec<u8> {
    let options = pad_to(v.options.clone(), 4);
    let hdr_len = 20 + options.len();
    let (proto, l4) = l4_bytes(&v.l4, &Pseudo::V4(v.src, v.dst));
    let tot_len = v.tot_len_override.unwrap_or((hdr_len + l4.len()) as u16);
    let ihl = v.ihl_override.unwrap_or((hdr_len / 4) as u8);
    let mut h = Vec::with_capacity(hdr_len);
    h.push(0x40 | (ihl & 0x0F));
    h.push(v.tos);
    h.extend_from_slice(&tot_len.to_be_bytes());
    h.extend_from_slice(&v.id.to_be_bytes());
    let frags = (u16::from(v.dont_frag) << 14) | (u16::from(v.more_frags) << 13) | (v.frag_offset & 0x1FFF);
    h.extend_from_slice(&frags.to_be_bytes());
    h.push(v.ttl);
    h.push(proto);
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&v.src.octets());
    h.extend_from_slice(&v.dst.octets());
    h.extend_from_slice(&options);
    let c = checksum(&[&h]);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(&l4);
    h
}

fn v6_bytes(v: &V6) -> Vec<u8> {
    let (proto, l4) = l4_bytes(&v.l4, &Pseudo::V6(v.src, v.dst));
    // Chain the extension headers: each one's first byte names the next header.
    let mut ext_bytes = Vec::new();
    for (i, (_, body)) in v.ext.iter().enumerate() {
        let next = v.ext.get(i + 1).map_or(proto, |(t, _)| *t);
        let mut e = vec![next, 0];
        e.extend_from_slice(body);
        let e = pad_to(e, 8);
        let mut e = e;
        if v.ext[i].0 != 44 {
            e[1] = (e.len() / 8 - 1) as u8;
        }
        ext_bytes.extend_from_slice(&e);
    }
    let first = v.ext.first().map_or(proto, |(t, _)| *t);
    let payload_len = (ext_bytes.len() + l4.len()) as u16;
    let mut h = Vec::with_capacity(40 + payload_len as usize);
    h.extend_from_slice(&[0x60, 0, 0, 0]);
    h.extend_from_slice(&payload_len.to_be_bytes());
    h.push(first);
    h.push(v.hop_limit);
    h.extend_from_slice(&v.src.octets());
    h.extend_from_slice(&v.dst.octets());
    h.extend_from_slice(&ext_bytes);
    h.extend_from_slice(&l4);
    h
}

enum Pseudo {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

impl Pseudo {
    fn header(&self, proto: u8, len: usize) -> Vec<u8> {
        let mut p = Vec::with_capacity(40);
        match self {
            Self::V4(s, d) => {
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
                p.extend_from_slice(&[0, proto]);
                p.extend_from_slice(&(len as u16).to_be_bytes());
            }
            Self::V6(s, d) => {
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
                p.extend_from_slice(&(len as u32).to_be_bytes());
                p.extend_from_slice(&[0, 0, 0, proto]);
            }
        }
        p
    }
}

/// (protocol number, bytes) of an L4 layer, checksummed against `pseudo`.
fn l4_bytes(l4: &L4, pseudo: &Pseudo) -> (u8, Vec<u8>) {
    match l4 {
        L4::Tcp(t) => {
            let options = pad_to(t.options.clone(), 4);
            let doff = t.doff_override.unwrap_or(((20 + options.len()) / 4) as u8);
            let mut b = Vec::with_capacity(20 + options.len() + t.payload.len());
            b.extend_from_slice(&t.sport.to_be_bytes());
            b.extend_from_slice(&t.dport.to_be_bytes());
            b.extend_from_slice(&t.seq.to_be_bytes());
            b.extend_from_slice(&t.ack.to_be_bytes());
            b.push(doff << 4);
            b.push(t.flags);
            b.extend_from_slice(&t.window.to_be_bytes());
            b.extend_from_slice(&[0, 0, 0, 0]);
            b.extend_from_slice(&options);
            b.extend_from_slice(&t.payload);
            let c = checksum(&[&pseudo.header(PROTO_TCP, b.len()), &b]);
            b[16..18].copy_from_slice(&c.to_be_bytes());
            (PROTO_TCP, b)
        }
        L4::Udp { sport, dport, payload } => {
            let len = 8 + payload.len();
            let mut b = Vec::with_capacity(len);
            b.extend_from_slice(&sport.to_be_bytes());
            b.extend_from_slice(&dport.to_be_bytes());
            b.extend_from_slice(&(len as u16).to_be_bytes());
            b.extend_from_slice(&[0, 0]);
            b.extend_from_slice(payload);
            let mut c = checksum(&[&pseudo.header(PROTO_UDP, len), &b]);
            if c == 0 {
                c = 0xFFFF; // 0 means "no checksum" in UDP
            }
            b[6..8].copy_from_slice(&c.to_be_bytes());
            (PROTO_UDP, b)
        }
        L4::Icmp { typ, code, rest, body } => {
            let mut b = vec![*typ, *code, 0, 0];
            b.extend_from_slice(rest);
            b.extend_from_slice(body);
            let (proto, c) = match pseudo {
                Pseudo::V4(..) => (PROTO_ICMP, checksum(&[&b])),
                Pseudo::V6(..) => (PROTO_ICMPV6, checksum(&[&pseudo.header(PROTO_ICMPV6, b.len()), &b])),
            };
            b[2..4].copy_from_slice(&c.to_be_bytes());
            (proto, b)
        }
        L4::Encap(inner) => {
            let proto = match **inner {
                L3::V4(_) => PROTO_IPIP,
                L3::V6(_) => PROTO_IPV6,
                L3::Raw(_) => 255,
            };
            (proto, l3_bytes(inner))
        }
        L4::Raw { proto, payload } => (*proto, payload.clone()),
    }
}

/// The Internet checksum (RFC 1071) over the concatenation of `parts`.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &byte in *part {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, byte])),
                None => odd = Some(byte),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use etherparse::{LinkSlice, NetSlice, SlicedPacket, TransportSlice};

    use super::*;

    fn parse(bytes: &[u8]) -> SlicedPacket<'_> {
        SlicedPacket::from_ethernet(bytes).unwrap_or_else(|e| panic!("etherparse rejects {bytes:02x?}: {e}"))
    }

    #[test]
    fn tcp4_with_vlan_options_and_payload() {
        let mut p = Pkt::tcp4("10.0.0.1:40000", "10.0.0.100:80").flags(tcp::SYN | tcp::ACK).with_vlan(42).payload(b"hello");
        p.v4_mut().options = vec![1, 1, 1, 1, 1]; // NOPs, padded to 8
        p.tcp_mut().options = vec![2, 4, 0x05, 0xb4]; // MSS 1460
        let bytes = p.build();
        let s = parse(&bytes);
        let vlan = s.vlan().expect("vlan");
        let etherparse::VlanSlice::SingleVlan(v) = vlan else { panic!("single vlan") };
        assert_eq!(v.vlan_identifier().value(), 42);
        let Some(NetSlice::Ipv4(ip)) = &s.net else { panic!("ipv4") };
        assert_eq!(ip.header().ihl(), 7);
        assert_eq!(ip.header().source_addr(), Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(ip.header().to_header().calc_header_checksum(), ip.header().header_checksum());
        let Some(TransportSlice::Tcp(t)) = &s.transport else { panic!("tcp") };
        assert!(t.syn() && t.ack() && !t.fin());
        assert_eq!((t.source_port(), t.destination_port()), (40000, 80));
        assert_eq!(t.options(), &[2, 4, 0x05, 0xb4]);
        assert_eq!(t.payload(), b"hello");
        let want = t.to_header().calc_checksum_ipv4(&ip.header().to_header(), t.payload()).expect("checksum");
        assert_eq!(t.checksum(), want);
    }

    #[test]
    fn udp6_checksum() {
        let bytes = Pkt::udp6("[2001:db8::1]:5353", "[2001:db8::100]:53").payload(b"query").build();
        let s = parse(&bytes);
        let Some(NetSlice::Ipv6(ip)) = &s.net else { panic!("ipv6") };
        let Some(TransportSlice::Udp(u)) = &s.transport else { panic!("udp") };
        assert_eq!(u.payload(), b"query");
        let want = u.to_header().calc_checksum_ipv6(&ip.header().to_header(), u.payload()).expect("checksum");
        assert_eq!(u.checksum(), want);
        assert!(matches!(s.link, Some(LinkSlice::Ethernet2(_))));
    }

    #[test]
    fn tcp6_with_extension_headers() {
        let mut p = Pkt::tcp6("[2001:db8::1]:1000", "[2001:db8::100]:443");
        p.v6_mut().ext = vec![(0, vec![1, 4, 0, 0, 0, 0]), (60, vec![1, 4, 0, 0, 0, 0])];
        let bytes = p.build();
        let s = parse(&bytes);
        let Some(NetSlice::Ipv6(ip)) = &s.net else { panic!("ipv6") };
        assert_eq!(ip.extensions().slice().len(), 16);
        let Some(TransportSlice::Tcp(t)) = &s.transport else { panic!("tcp") };
        let want = t.to_header().calc_checksum_ipv6(&ip.header().to_header(), t.payload()).expect("checksum");
        assert_eq!(t.checksum(), want);
    }

    #[test]
    fn ipv4_fragment_fields() {
        let mut p = Pkt::udp4("10.0.0.1:1", "10.0.0.100:53");
        p.v4_mut().dont_frag = false;
        p.v4_mut().more_frags = true;
        p.v4_mut().frag_offset = 185;
        let bytes = p.build();
        let h = etherparse::Ipv4HeaderSlice::from_slice(&bytes[14..]).expect("ipv4");
        assert!(h.more_fragments() && !h.dont_fragment());
        assert_eq!(h.fragments_offset().value(), 185);
        assert_eq!(h.to_header().calc_header_checksum(), h.header_checksum());
    }

    #[test]
    fn ipip_and_ip6ip6() {
        let bytes = Pkt::tcp4("10.0.0.1:1", "10.0.0.100:80").encap4("10.0.1.1", "10.0.2.11").build();
        let s = parse(&bytes);
        let Some(NetSlice::Ipv4(outer)) = &s.net else { panic!("ipv4") };
        assert_eq!(outer.header().protocol(), etherparse::IpNumber::IPV4);
        assert_eq!(outer.header().to_header().calc_header_checksum(), outer.header().header_checksum());
        let inner = SlicedPacket::from_ip(outer.payload().payload).expect("inner");
        assert!(matches!(inner.transport, Some(TransportSlice::Tcp(_))));

        let bytes = Pkt::tcp6("[2001:db8::1]:1", "[2001:db8::100]:80").encap6("2001:db8:1::1", "2001:db8:2::11").build();
        let s = parse(&bytes);
        let Some(NetSlice::Ipv6(outer)) = &s.net else { panic!("ipv6") };
        assert_eq!(outer.header().next_header(), etherparse::IpNumber::IPV6);
        let inner = SlicedPacket::from_ip(outer.payload().payload).expect("inner");
        assert!(matches!(inner.net, Some(NetSlice::Ipv6(_))));
    }

    #[test]
    fn icmp_checksums() {
        let bytes = Pkt::icmp4_echo("10.0.0.1", "10.0.0.100").build();
        let s = parse(&bytes);
        let Some(TransportSlice::Icmpv4(i)) = &s.transport else { panic!("icmp") };
        assert_eq!(i.icmp_type(), etherparse::Icmpv4Type::EchoRequest(etherparse::IcmpEchoHeader { id: 1, seq: 1 }));
        assert_eq!(checksum(&[i.slice()]), 0);

        let bytes = Pkt::icmp6_echo("2001:db8::1", "2001:db8::100").build();
        let s = parse(&bytes);
        let Some(NetSlice::Ipv6(ip)) = &s.net else { panic!("ipv6") };
        let Some(TransportSlice::Icmpv6(i)) = &s.transport else { panic!("icmpv6") };
        let h = ip.header();
        let want = i.header().icmp_type.calc_checksum(h.source(), h.destination(), i.payload()).expect("checksum");
        assert_eq!(i.checksum(), want);
    }

    #[test]
    fn internet_checksum_known_value() {
        // RFC 1071's example bytes.
        assert_eq!(checksum(&[&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]]), !0xddf2);
    }
}
