//! Header parsing: Ethernet (+ one 802.1Q tag), IPv4 (IHL honoured, options allowed), IPv6
//! (a bounded walk over extension headers), TCP, UDP. Every read goes through [`ptr_at`], the
//! one bounds check. A frame that cannot be parsed yields the [`Stat`] that says why.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use lb_common::{Stat, MAX_IPV6_EXT_HEADERS};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, ip::Ipv6Hdr, tcp::TcpHdr, udp::UdpHdr, vlan::VlanHdr};

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;

const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;

/// IPv4 "more fragments" flag and fragment offset, in host order of the `frags` field.
const IPV4_MF_OFFSET_MASK: u16 = 0x3FFF;

/// What the balancer needs to know about a TCP/UDP packet. Addresses are in network byte
/// order; an IPv4 address occupies the first 4 bytes of the 16.
#[derive(Clone, Copy)]
#[expect(dead_code, reason = "fields read by the balancer stages that follow parsing")]
pub struct Packet {
    pub is_v6: bool,
    pub proto: u8,
    pub l3_off: usize,
    pub l4_off: usize,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport_be: [u8; 2],
    pub dport_be: [u8; 2],
    /// TCP flags byte (CWR..FIN); 0 for UDP.
    pub tcp_flags: u8,
}

/// The single bounds check: a pointer to a `T` at `off`, or `Err` when the frame is too short.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Result<*mut T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return Err(());
    }
    Ok((start + off) as *mut T)
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Stat> {
    let eth: *const EthHdr = ptr_at(ctx, 0).map_err(|()| Stat::TruncatedEth)?;
    let mut off = EthHdr::LEN;
    // SAFETY: ptr_at checked the bounds.
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    if ether_type == ETH_P_8021Q {
        let vlan: *const VlanHdr = ptr_at(ctx, off).map_err(|()| Stat::TruncatedVlan)?;
        ether_type = u16::from_be(unsafe { (*vlan).ether_type });
        off += VlanHdr::LEN;
    }
    match ether_type {
        ETH_P_IP => parse_ipv4(ctx, off),
        ETH_P_IPV6 => parse_ipv6(ctx, off),
        _ => Err(Stat::NonIp),
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, l3_off: usize) -> Result<Packet, Stat> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3_off).map_err(|()| Stat::TruncatedIpv4)?;
    // SAFETY: ptr_at checked the bounds of the fixed header.
    let ip = unsafe { &*ip };
    let vihl = ip.vihl;
    let hdr_len = ((vihl & 0x0F) as usize) * 4;
    if vihl >> 4 != 4 || hdr_len < Ipv4Hdr::LEN {
        return Err(Stat::BadIpv4);
    }
    let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
    if tot_len < hdr_len {
        return Err(Stat::BadIpv4);
    }
    // The whole IP packet (options included) must be in the frame; Ethernet padding may follow.
    if ctx.data() + l3_off + tot_len > ctx.data_end() {
        return Err(Stat::TruncatedIpv4);
    }
    if u16::from_be_bytes(ip.frags) & IPV4_MF_OFFSET_MASK != 0 {
        return Err(Stat::Fragment);
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src[..4].copy_from_slice(&ip.src_addr);
    dst[..4].copy_from_slice(&ip.dst_addr);
    parse_l4(ctx, false, ip.proto, l3_off, l3_off + hdr_len, src, dst)
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, l3_off: usize) -> Result<Packet, Stat> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3_off).map_err(|()| Stat::TruncatedIpv6)?;
    // SAFETY: ptr_at checked the bounds.
    let ip = unsafe { &*ip };
    let payload_len = u16::from_be_bytes(ip.payload_len) as usize;
    if ctx.data() + l3_off + Ipv6Hdr::LEN + payload_len > ctx.data_end() {
        return Err(Stat::TruncatedIpv6);
    }
    let mut next = ip.next_hdr;
    let mut off = l3_off + Ipv6Hdr::LEN;
    let mut walked = 0;
    // Bounded walk over the extension headers that may precede TCP/UDP.
    while walked < MAX_IPV6_EXT_HEADERS {
        match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let ext: *const [u8; 2] = ptr_at(ctx, off).map_err(|()| Stat::TruncatedIpv6)?;
                // SAFETY: ptr_at checked the bounds.
                let [nh, len] = unsafe { *ext };
                next = nh;
                off += (len as usize + 1) * 8;
                walked += 1;
            }
            IPV6_FRAGMENT => return Err(Stat::Fragment),
            _ => break,
        }
    }
    if matches!(next, IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_FRAGMENT) {
        return Err(Stat::Ipv6ExtLimit);
    }
    parse_l4(ctx, true, next, l3_off, off, ip.src_addr, ip.dst_addr)
}

#[inline(always)]
fn parse_l4(
    ctx: &XdpContext,
    is_v6: bool,
    proto: u8,
    l3_off: usize,
    l4_off: usize,
    src: [u8; 16],
    dst: [u8; 16],
) -> Result<Packet, Stat> {
    let (sport_be, dport_be, tcp_flags) = match proto {
        PROTO_TCP => {
            let tcp: *const TcpHdr = ptr_at(ctx, l4_off).map_err(|()| Stat::TruncatedTcp)?;
            // SAFETY: ptr_at checked the bounds of the fixed header.
            let tcp = unsafe { &*tcp };
            let doff = tcp.doff() as usize * 4;
            if doff < TcpHdr::LEN {
                return Err(Stat::BadTcp);
            }
            if ctx.data() + l4_off + doff > ctx.data_end() {
                return Err(Stat::TruncatedTcp);
            }
            // The flags are the 14th byte of the header.
            let flags: *const u8 = ptr_at(ctx, l4_off + 13).map_err(|()| Stat::TruncatedTcp)?;
            (tcp.source, tcp.dest, unsafe { *flags })
        }
        PROTO_UDP => {
            let udp: *const UdpHdr = ptr_at(ctx, l4_off).map_err(|()| Stat::TruncatedUdp)?;
            // SAFETY: ptr_at checked the bounds.
            let udp = unsafe { &*udp };
            (udp.src, udp.dst, 0)
        }
        _ => return Err(Stat::OtherL4),
    };
    Ok(Packet { is_v6, proto, l3_off, l4_off, src, dst, sport_be, dport_be, tcp_flags })
}
