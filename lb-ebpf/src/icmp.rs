//! ICMP for VIPs: echo requests answered (or passed) by policy; "fragmentation needed" /
//! "packet too big" about a VIP flow sent to that flow's backend, found by the inner header
//! (the backend sent the too-big packet from the VIP, so the error comes back to us).

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{FlowKey, ServiceKey, Stat, ICMP_ECHO_REPLY};

use crate::{
    csum,
    maps::SERVICES,
    pack,
    parse::{ptr_at, Packet, PROTO_ICMP, PROTO_TCP, PROTO_UDP},
    unpack, vip_service,
};

const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY_TYPE: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP6_PACKET_TOO_BIG: u8 = 2;
const ICMP6_ECHO_REQUEST: u8 = 128;
const ICMP6_ECHO_REPLY: u8 = 129;

/// What to do with an ICMP packet to a VIP.
pub enum Icmp {
    /// Handled here (answered, passed or dropped): count this outcome, return this action.
    Done((Stat, u32)),
    /// An error about a VIP flow: the caller forwards it to the flow's backend in the flow's
    /// service's mode (calling `forward` from here would stack three frames, over BPF's 512
    /// bytes), with the flow's key left in `key`.
    Forward { backend_id: u32, mode: u8 },
}

/// An [`Icmp`] as one scalar: `handle` is a BPF subprogram, which returns r0 only.
#[derive(Clone, Copy)]
pub struct Packed(u64);

impl Packed {
    /// Bit 63: a forward request (backend id in the low 32 bits, mode in the next 8); else a
    /// packed verdict (`pack`, whose `Stat` never reaches bit 31 of its high half).
    const FORWARD: u64 = 1 << 63;

    #[inline(always)]
    fn new(icmp: Icmp) -> Self {
        match icmp {
            Icmp::Done(v) => Self(pack(v)),
            Icmp::Forward { backend_id, mode } => Self(Self::FORWARD | u64::from(mode) << 32 | u64::from(backend_id)),
        }
    }

    #[inline(always)]
    pub fn get(self) -> Icmp {
        if self.0 & Self::FORWARD == 0 {
            Icmp::Done(unpack(self.0))
        } else {
            Icmp::Forward { backend_id: self.0 as u32, mode: (self.0 >> 32) as u8 }
        }
    }
}

/// What to do with an ICMP packet to a VIP ([`Packed::get`]).
#[inline(never)]
pub fn handle(ctx: &XdpContext, pkt: &Packet, key: &mut FlowKey) -> Packed {
    Packed::new(handle_inner(ctx, pkt, key))
}

#[inline(always)]
fn handle_inner(ctx: &XdpContext, pkt: &Packet, key: &mut FlowKey) -> Icmp {
    let pass = Icmp::Done((Stat::IcmpPassed, xdp_action::XDP_PASS));
    if vip_service(&pkt.dst).is_none() {
        return Icmp::Done((Stat::OtherL4, xdp_action::XDP_PASS));
    }
    let Ok(hdr) = ptr_at::<[u8; 4]>(ctx, pkt.l4_off) else { return pass };
    // SAFETY: ptr_at checked the bounds.
    let [typ, code, c0, c1] = unsafe { *hdr };
    let v4 = pkt.proto == PROTO_ICMP;
    let echo = if v4 { typ == ICMP_ECHO_REQUEST } else { typ == ICMP6_ECHO_REQUEST };
    if echo {
        if config!(icmp_echo) != ICMP_ECHO_REPLY {
            return pass;
        }
        if echo_reply(ctx, pkt, u16::from_be_bytes([typ, code]), u16::from_be_bytes([c0, c1])) {
            return Icmp::Done((Stat::IcmpEchoReplied, xdp_action::XDP_TX));
        }
        return pass;
    }
    let too_big = if v4 { typ == ICMP_DEST_UNREACH && code == ICMP_FRAG_NEEDED } else { typ == ICMP6_PACKET_TOO_BIG };
    if too_big {
        return to_flow_backend(ctx, pkt, key).map_or(pass, |(backend_id, mode)| Icmp::Forward { backend_id, mode });
    }
    pass
}

/// Turns the request into its reply in place: swap MACs and addresses, change the type, and
/// update the checksum incrementally (swapping addresses leaves every sum unchanged).
/// Not inlined (a sibling of the forwarding path, so its frame does not add to that chain).
#[inline(never)]
fn echo_reply(ctx: &XdpContext, pkt: &Packet, type_code: u16, check: u16) -> bool {
    echo_reply_in_place(ctx, pkt, type_code, check).is_ok()
}

#[inline(always)]
fn echo_reply_in_place(ctx: &XdpContext, pkt: &Packet, type_code: u16, check: u16) -> Result<(), ()> {
    let code = type_code.to_be_bytes()[1];
    let reply_type = if pkt.proto == PROTO_ICMP { ICMP_ECHO_REPLY_TYPE } else { ICMP6_ECHO_REPLY };
    let new_check = csum::replace16(check, type_code, u16::from_be_bytes([reply_type, code]));
    crate::mem::swap_macs(ctx)?;
    let hdr: *mut [u8; 4] = ptr_at(ctx, pkt.l4_off)?;
    let c = new_check.to_be_bytes();
    // SAFETY: ptr_at checked the bounds.
    unsafe { *hdr = [reply_type, code, c[0], c[1]] };
    if pkt.is_v6 {
        let a: *mut [u8; 32] = ptr_at(ctx, pkt.l3_off + 8)?;
        let mut addrs = [0u8; 32];
        addrs[..16].copy_from_slice(&pkt.dst);
        addrs[16..].copy_from_slice(&pkt.src);
        // SAFETY: ptr_at checked the bounds.
        unsafe { *a = addrs };
    } else {
        let a: *mut [u8; 8] = ptr_at(ctx, pkt.l3_off + 12)?;
        let mut addrs = [0u8; 8];
        addrs[..4].copy_from_slice(&pkt.dst[..4]);
        addrs[4..].copy_from_slice(&pkt.src[..4]);
        // SAFETY: ptr_at checked the bounds.
        unsafe { *a = addrs };
    }
    Ok(())
}

/// The backend and mode of the VIP flow an ICMP error is about. The embedded packet went
/// VIP:vport → client:cport; its flow is client:cport → VIP:vport.
#[inline(always)]
fn to_flow_backend(ctx: &XdpContext, pkt: &Packet, key: &mut FlowKey) -> Option<(u32, u8)> {
    let inner = pkt.l4_off + 8;
    *key = FlowKey::default();
    let inner_l4;
    if pkt.is_v6 {
        let ip: *const [u8; 40] = ptr_at(ctx, inner).ok()?;
        // SAFETY: ptr_at checked the bounds.
        let ip = unsafe { &*ip };
        key.proto = ip[6];
        key.dst.copy_from_slice(&ip[8..24]);
        key.src.copy_from_slice(&ip[24..40]);
        inner_l4 = inner + 40;
    } else {
        let ip: *const [u8; 20] = ptr_at(ctx, inner).ok()?;
        // SAFETY: ptr_at checked the bounds.
        let ip = unsafe { &*ip };
        key.proto = ip[9];
        key.dst[..4].copy_from_slice(&ip[12..16]);
        key.src[..4].copy_from_slice(&ip[16..20]);
        inner_l4 = inner + ((ip[0] & 0x0F) as usize) * 4;
    }
    if key.proto != PROTO_TCP && key.proto != PROTO_UDP {
        return None;
    }
    let ports: *const [u8; 4] = ptr_at(ctx, inner_l4).ok()?;
    // SAFETY: ptr_at checked the bounds.
    let ports = unsafe { *ports };
    key.dport_be = [ports[0], ports[1]];
    key.sport_be = [ports[2], ports[3]];
    let Some(found) = crate::flow::lookup(key, lb_common::flow_hash(key)) else { return None };
    // SAFETY: a FLOWS value; backend_id is written before the way is published.
    let backend_id = unsafe { (*found.flow()).backend_id };
    let skey = ServiceKey { addr: key.dst, port_be: key.dport_be, proto: key.proto, _pad: 0 };
    // SAFETY: read once.
    let Some(mode) = (unsafe { SERVICES.get(&skey) }).map(|s| s.mode) else { return None };
    Some((backend_id, mode))
}
