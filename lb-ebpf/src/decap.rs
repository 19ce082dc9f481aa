//! The backend-side decapsulator (`sluice_decap`): these kernels have no ipip/ip6_tunnel
//! module, so backends strip the outer IPv4/IPv6 header of IPIP, IP6IP6, 4in6 and 6in4
//! packets in XDP and pass the inner packet to their stack (the VIP is on their loopback).

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::Stat;

use crate::parse::{ptr_at, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, PROTO_IPIP, PROTO_IPV6};

pub type DecapVerdict = Result<(Stat, u32), (Stat, u32)>;

#[inline(always)]
pub fn decap(ctx: &XdpContext) -> DecapVerdict {
    let pass = (Stat::DecapPassthrough, xdp_action::XDP_PASS);
    let eth: *const [u8; 14] = ptr_at(ctx, 0).map_err(|()| (Stat::TruncatedEth, xdp_action::XDP_PASS))?;
    // SAFETY: ptr_at checked the bounds.
    let eth = unsafe { *eth };
    let mut ether_type = u16::from_be_bytes([eth[12], eth[13]]);
    let mut l3 = 14;
    let mut tci = [0u8; 2];
    if ether_type == ETH_P_8021Q {
        let v: *const [u8; 4] = ptr_at(ctx, 14).map_err(|()| (Stat::TruncatedVlan, xdp_action::XDP_PASS))?;
        // SAFETY: ptr_at checked the bounds.
        let v = unsafe { *v };
        tci = [v[0], v[1]];
        ether_type = u16::from_be_bytes([v[2], v[3]]);
        l3 = 18;
    }
    let (outer_len, inner) = match ether_type {
        ETH_P_IP => {
            let ip: *const [u8; 20] = ptr_at(ctx, l3).map_err(|()| (Stat::TruncatedIpv4, xdp_action::XDP_PASS))?;
            // SAFETY: ptr_at checked the bounds.
            let ip = unsafe { *ip };
            let ihl = ((ip[0] & 0x0F) as usize) * 4;
            if ip[0] >> 4 != 4 || ihl < 20 {
                return Err(pass);
            }
            (ihl, ip[9])
        }
        ETH_P_IPV6 => {
            let ip: *const [u8; 40] = ptr_at(ctx, l3).map_err(|()| (Stat::TruncatedIpv6, xdp_action::XDP_PASS))?;
            // SAFETY: ptr_at checked the bounds.
            (40, unsafe { (*ip)[6] })
        }
        _ => return Err(pass),
    };
    let inner_type = match inner {
        PROTO_IPIP => ETH_P_IP,
        PROTO_IPV6 => ETH_P_IPV6,
        _ => return Err(pass),
    };
    // The inner header must be there before we commit to stripping the outer one.
    let _: *const [u8; 20] = ptr_at(ctx, l3 + outer_len).map_err(|()| pass)?;
    // SAFETY: shrinking the headroom side; pointers are re-derived afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return Err(pass);
    }
    let mut new = [0u8; 18];
    new[..12].copy_from_slice(&eth[..12]);
    if l3 == 18 {
        new[12..14].copy_from_slice(&ETH_P_8021Q.to_be_bytes());
        new[14..16].copy_from_slice(&tci);
        new[16..18].copy_from_slice(&inner_type.to_be_bytes());
        let p: *mut [u8; 18] = ptr_at(ctx, 0).map_err(|()| pass)?;
        // SAFETY: ptr_at checked the bounds.
        unsafe { *p = new };
    } else {
        new[12..14].copy_from_slice(&inner_type.to_be_bytes());
        let p: *mut [u8; 14] = ptr_at(ctx, 0).map_err(|()| pass)?;
        let mut h = [0u8; 14];
        h.copy_from_slice(&new[..14]);
        // SAFETY: ptr_at checked the bounds.
        unsafe { *p = h };
    }
    Ok((Stat::Decapsulated, xdp_action::XDP_PASS))
}
