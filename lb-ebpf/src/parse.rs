//! Header parsing: Ethernet (+ one 802.1Q tag), IPv4 (IHL honoured, options allowed), IPv6
//! (a bounded walk over extension headers), TCP, UDP. Every read goes through [`ptr_at`], the
//! one bounds check. A frame that cannot be parsed yields the [`Stat`] that says why.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use lb_common::{Stat, MAX_IPV6_EXT_HEADERS};
pub use lb_common::{PROTO_ICMP, PROTO_ICMPV6, PROTO_IPIP, PROTO_IPV6, PROTO_TCP, PROTO_UDP};

use crate::mem::{ld128, ld_v4_mapped, set_addr};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, ip::Ipv6Hdr, tcp::TcpHdr, udp::UdpHdr, vlan::VlanHdr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_8021Q: u16 = 0x8100;

const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;

/// IPv4 "more fragments" flag and fragment offset, in host order of the `frags` field.
const IPV4_MF_OFFSET_MASK: u16 = 0x3FFF;

/// What the balancer needs to know about a packet. Addresses are in network byte order; an
/// IPv4 address occupies the first 4 bytes of the 16. Ports are zero for other protocols.
#[derive(Clone, Copy)]
#[repr(C, align(8))] // addresses first and aligned: copies are word moves, not byte loops
pub struct Packet {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub l3_off: usize,
    pub l4_off: usize,
    /// Length of the IP packet (header included), as its header says; Ethernet padding excluded.
    pub ip_len: usize,
    /// TCP header length (data offset × 4); 0 otherwise.
    pub tcp_hdr_len: usize,
    pub sport_be: [u8; 2],
    pub dport_be: [u8; 2],
    pub is_v6: bool,
    pub proto: u8,
    /// TCP flags byte (CWR..FIN); 0 otherwise.
    pub tcp_flags: u8,
}

/// Why parsing stopped, and the destination address when the IP header was readable (so a
/// fragment or malformed segment sent to a VIP can be charged to its service).
/// No `Option<[u8; 16]>`: LLVM copies its undefined bytes in the `None` case, and the
/// verifier rejects reading uninitialised registers.
#[derive(Clone, Copy)]
pub struct Fail {
    pub stat: Stat,
    pub has_dst: bool,
    pub dst: [u8; 16],
}

impl Fail {
    #[inline(always)]
    pub fn at(stat: Stat, dst: [u8; 16]) -> Self {
        Self { stat, has_dst: true, dst }
    }
}

impl From<Stat> for Fail {
    #[inline(always)]
    fn from(stat: Stat) -> Self {
        Self { stat, has_dst: false, dst: [0; 16] }
    }
}

/// The single bounds check: a pointer to a `T` at `off`, or `Err` when the frame is too short.
/// The largest offset [`ptr_at`] accepts. Offsets read back from map memory (the parsed
/// packet lives in scratch space) are unbounded to the verifier; this bound makes pointer
/// arithmetic with them legal. No header Sluice reads starts this far in.
const MAX_OFF: usize = 1024;

#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Result<*mut T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if off > MAX_OFF || start + off + size_of::<T>() > end {
        return Err(());
    }
    Ok((start + off) as *mut T)
}

/// Parses the frame into `out` (scratch map memory, to keep it off the stack).
#[inline(always)]
pub fn parse(ctx: &XdpContext, out: &mut Packet) -> Result<(), Fail> {
    let eth: *const EthHdr = ptr_at(ctx, 0).map_err(|()| Fail::from(Stat::TruncatedEth))?;
    let mut off = EthHdr::LEN;
    // SAFETY: ptr_at checked the bounds.
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    if ether_type == ETH_P_8021Q {
        let vlan: *const VlanHdr = ptr_at(ctx, off).map_err(|()| Fail::from(Stat::TruncatedVlan))?;
        ether_type = u16::from_be(unsafe { (*vlan).ether_type });
        off += VlanHdr::LEN;
    }
    match ether_type {
        ETH_P_IP => parse_ipv4(ctx, off, out),
        ETH_P_IPV6 => parse_ipv6(ctx, off, out),
        _ => Err(Stat::NonIp.into()),
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, l3_off: usize, out: &mut Packet) -> Result<(), Fail> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3_off).map_err(|()| Fail::from(Stat::TruncatedIpv4))?;
    // SAFETY: ptr_at checked the bounds of the fixed header.
    let ip = unsafe { &*ip };
    let vihl = ip.vihl;
    let hdr_len = ((vihl & 0x0F) as usize) * 4;
    if vihl >> 4 != 4 || hdr_len < Ipv4Hdr::LEN {
        return Err(Stat::BadIpv4.into());
    }
    let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
    if tot_len < hdr_len {
        return Err(Stat::BadIpv4.into());
    }
    // The whole IP packet (options included) must be in the frame; Ethernet padding may follow.
    if ctx.data() + l3_off + tot_len > ctx.data_end() {
        return Err(Stat::TruncatedIpv4.into());
    }
    let base = core::ptr::from_ref(ip).cast::<u8>();
    // SAFETY: ptr_at checked the 20-byte header; the addresses are at 12 and 16.
    unsafe {
        set_addr(&mut out.src, ld_v4_mapped(base.add(12)));
        set_addr(&mut out.dst, ld_v4_mapped(base.add(16)));
    }
    if u16::from_be_bytes(ip.frags) & IPV4_MF_OFFSET_MASK != 0 {
        return Err(Fail::at(Stat::Fragment, out.dst));
    }
    out.is_v6 = false;
    out.proto = ip.proto;
    out.ip_len = tot_len;
    parse_l4(ctx, l3_off, l3_off + hdr_len, out)
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, l3_off: usize, out: &mut Packet) -> Result<(), Fail> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3_off).map_err(|()| Fail::from(Stat::TruncatedIpv6))?;
    // SAFETY: ptr_at checked the bounds.
    let ip = unsafe { &*ip };
    let payload_len = u16::from_be_bytes(ip.payload_len) as usize;
    if ctx.data() + l3_off + Ipv6Hdr::LEN + payload_len > ctx.data_end() {
        return Err(Stat::TruncatedIpv6.into());
    }
    let mut next = ip.next_hdr;
    let mut off = l3_off + Ipv6Hdr::LEN;
    let mut walked = 0;
    // Bounded walk over the extension headers that may precede TCP/UDP.
    while walked < MAX_IPV6_EXT_HEADERS {
        match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let ext: *const [u8; 2] = ptr_at(ctx, off).map_err(|()| Fail::from(Stat::TruncatedIpv6))?;
                // SAFETY: ptr_at checked the bounds.
                let [nh, len] = unsafe { *ext };
                next = nh;
                off += (len as usize + 1) * 8;
                walked += 1;
            }
            IPV6_FRAGMENT => return Err(Fail::at(Stat::Fragment, ip.dst_addr)),
            _ => break,
        }
    }
    if matches!(next, IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_FRAGMENT) {
        return Err(Stat::Ipv6ExtLimit.into());
    }
    out.is_v6 = true;
    out.proto = next;
    out.ip_len = Ipv6Hdr::LEN + payload_len;
    let base = core::ptr::from_ref(ip).cast::<u8>();
    // SAFETY: ptr_at checked the 40-byte header; the addresses are at 8 and 24.
    unsafe {
        set_addr(&mut out.src, ld128(base.add(8)));
        set_addr(&mut out.dst, ld128(base.add(24)));
    }
    parse_l4(ctx, l3_off, off, out)
}

/// The L4 header; `out` already holds the addresses, protocol and IP length.
#[inline(always)]
fn parse_l4(ctx: &XdpContext, l3_off: usize, l4_off: usize, out: &mut Packet) -> Result<(), Fail> {
    let dst = out.dst;
    let proto = out.proto;
    let fail = |stat| Fail::at(stat, dst);
    let (sport_be, dport_be, tcp_flags, tcp_hdr_len) = match proto {
        PROTO_TCP => {
            let tcp: *const [u8; TcpHdr::LEN] = ptr_at(ctx, l4_off).map_err(|()| fail(Stat::TruncatedTcp))?;
            // Copy the fixed header out at once: later reads through a re-derived packet
            // pointer would lose the range the verifier learned from this check.
            // SAFETY: ptr_at checked the bounds.
            let tcp = unsafe { *tcp };
            let doff = ((tcp[12] >> 4) as usize) * 4;
            if doff < TcpHdr::LEN {
                return Err(fail(Stat::BadTcp));
            }
            if ctx.data() + l4_off + doff > ctx.data_end() {
                return Err(fail(Stat::TruncatedTcp));
            }
            ([tcp[0], tcp[1]], [tcp[2], tcp[3]], tcp[13], doff)
        }
        PROTO_UDP => {
            let udp: *const [u8; UdpHdr::LEN] = ptr_at(ctx, l4_off).map_err(|()| fail(Stat::TruncatedUdp))?;
            // SAFETY: ptr_at checked the bounds.
            let udp = unsafe { *udp };
            ([udp[0], udp[1]], [udp[2], udp[3]], 0, 0)
        }
        _ => ([0; 2], [0; 2], 0, 0),
    };
    out.l3_off = l3_off;
    out.l4_off = l4_off;
    out.sport_be = sport_be;
    out.dport_be = dport_be;
    out.tcp_flags = tcp_flags;
    out.tcp_hdr_len = tcp_hdr_len;
    Ok(())
}
