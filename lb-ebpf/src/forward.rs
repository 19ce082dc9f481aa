//! Sending a packet to its backend: `l2dsr` (rewrite the destination MAC) or `ipip`
//! (IPIP / IP6IP6 / 4in6 / 6in4 encapsulation, Katran-compatible). Both end in `XDP_TX`.

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    helpers::{bpf_fib_lookup, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{Backend, FAMILY_V6, MODE_IPIP};

use crate::{
    csum, mem,
    maps::{BACKENDS, SCRATCH},
    parse::{ptr_at, Packet, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, PROTO_IPIP, PROTO_IPV6},
    CONFIG,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const VLAN_HLEN: usize = 4;
const ETH_HLEN: usize = 14;

/// Forwards to `backend_id` in the service's mode. `hash` is the flow hash (outer source).
/// Returns `XDP_TX`, or `XDP_DROP` when there is no way to the backend (count `no_route`).
/// Not inlined: its own BPF stack frame keeps the caller's under the 512-byte limit (and a
/// BPF call takes at most 5 arguments and returns a scalar).
#[inline(never)]
pub fn forward(ctx: &XdpContext, pkt: &Packet, mode: u8, backend_id: u32, hash: u32) -> u32 {
    match send(ctx, pkt, mode, backend_id, hash) {
        Ok(()) => xdp_action::XDP_TX,
        Err(()) => xdp_action::XDP_DROP,
    }
}

#[inline(always)]
fn send(ctx: &XdpContext, pkt: &Packet, mode: u8, backend_id: u32, hash: u32) -> Result<(), ()> {
    let Some(b) = BACKENDS.get(backend_id) else { return Err(()) };
    if mode == MODE_IPIP {
        encap(ctx, pkt, b, hash)?;
    } else {
        let eth: *mut [u8; 12] = ptr_at(ctx, 0)?;
        let e = eth.cast::<u8>();
        let mac = b.mac.as_ptr();
        // SAFETY: ptr_at checked 12 bytes; `mac` is 6 bytes of the backend's map value.
        // New source: the MAC the frame was sent to (ours); new destination: the backend's.
        unsafe {
            let (hi, lo) = (mem::ld32(e), mem::ld16(e.add(4)));
            mem::st32(e.add(6), hi);
            mem::st16(e.add(10), lo);
            mem::st32(e, mem::ld32(mac));
            mem::st16(e.add(4), mem::ld16(mac.add(4)));
        }
    }
    Ok(())
}

/// Next hop for an encapsulated packet to `dst`: the configured gateway, or the kernel's FIB.
/// Returns (destination MAC, source MAC or None to keep the frame's own destination MAC).
#[inline(always)]
fn next_hop(ctx: &XdpContext, b: &Backend, outer: &[u8], inner_len: usize) -> Result<([u8; 6], Option<[u8; 6]>), ()> {
    // Its own read of CONFIG: passing encap's copy in would keep both in this subprogram's
    // frame and push the call chain over BPF's 512-byte stack.
    let cfg = CONFIG.load();
    if cfg.has_gateway != 0 {
        return Ok((cfg.gateway_mac, None));
    }
    // The request lives in per-CPU scratch memory, not on the stack (see maps::Scratch).
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's scratch slot; only `fib` is touched here.
    let p: &mut FibParams = unsafe { &mut (*scratch).fib };
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
    *p = unsafe { core::mem::zeroed() };
    p.ifindex = ctx.ingress_ifindex() as u32;
    if b.family == FAMILY_V6 {
        p.family = AF_INET6;
        // SAFETY: writing plain bytes into the union's array view.
        let mut src = [0u8; 16];
        src.copy_from_slice(&outer[8..24]);
        unsafe {
            p.__bindgen_anon_3.ipv6_src = core::mem::transmute::<[u8; 16], [u32; 4]>(src);
            p.__bindgen_anon_4.ipv6_dst = core::mem::transmute::<[u8; 16], [u32; 4]>(b.addr);
        }
    } else {
        p.family = AF_INET;
        // Host byte order (the kernel compares it with the MTU).
        p.__bindgen_anon_1.tot_len = (inner_len + 20) as u16;
        p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([outer[12], outer[13], outer[14], outer[15]]);
        p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([b.addr[0], b.addr[1], b.addr[2], b.addr[3]]);
    }
    // SAFETY: ctx is the program's context; p is a properly sized, initialised request.
    let rc = unsafe {
        bpf_fib_lookup(ctx.ctx.cast(), core::ptr::from_mut(p), size_of::<FibParams>() as i32, 0)
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        return Err(());
    }
    Ok((p.dmac, Some(p.smac)))
}

/// Encapsulates in place: grows the headroom, rewrites L2 (keeping a VLAN tag), and writes
/// the outer header. Headers are assembled in per-CPU scratch memory (`maps::Scratch::buf`)
/// to keep this subprogram's stack frame small.
#[inline(always)]
fn encap(ctx: &XdpContext, pkt: &Packet, b: &Backend, hash: u32) -> Result<(), ()> {
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's scratch slot; only `buf` is used here (and `fib` by next_hop).
    let buf: &mut [u8; 64] = unsafe { &mut (*scratch).buf.0 };
    let outer_v6 = b.family == FAMILY_V6;
    let outer_len: usize = if outer_v6 { 40 } else { 20 };
    let inner_len = pkt.ip_len;
    let has_vlan = pkt.l3_off == ETH_HLEN + VLAN_HLEN;
    let l2_len = if has_vlan { ETH_HLEN + VLAN_HLEN } else { ETH_HLEN };

    // buf[0..18]: the new L2 header; buf[18..58]: the outer IP header.
    let old: *const [u8; ETH_HLEN] = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked the bounds.
    // SAFETY: ptr_at checked the bounds. Our MAC: where the frame was sent.
    let old = unsafe { *old };
    buf[6..12].copy_from_slice(&old[..6]);
    if has_vlan {
        let tag: *const [u8; 2] = ptr_at(ctx, ETH_HLEN)?;
        buf[12..14].copy_from_slice(&ETH_P_8021Q.to_be_bytes());
        // SAFETY: ptr_at checked the bounds.
        buf[14..16].copy_from_slice(unsafe { &*tag });
    }
    let outer_type: u16 = if outer_v6 { ETH_P_IPV6 } else { ETH_P_IP };
    buf[l2_len - 2..l2_len].copy_from_slice(&outer_type.to_be_bytes());

    // A flow-stable outer source: the configured prefix with the flow hash in its low bits.
    let cfg = CONFIG.load();
    let h = hash.to_be_bytes();
    let inner_proto = if pkt.is_v6 { PROTO_IPV6 } else { PROTO_IPIP };
    let ip = &mut buf[18..58];
    if outer_v6 {
        // SAFETY: 40 bytes of the 64-byte scratch buffer.
        unsafe { mem::zero::<40>(ip.as_mut_ptr()) };
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(inner_len as u16).to_be_bytes());
        ip[6] = inner_proto;
        ip[7] = 64;
        ip[8..24].copy_from_slice(&cfg.encap_src6);
        ip[22] ^= h[2];
        ip[23] ^= h[3];
        ip[24..40].copy_from_slice(&b.addr);
    } else {
        // SAFETY: 20 bytes of the 64-byte scratch buffer.
        unsafe { mem::zero::<20>(ip.as_mut_ptr()) };
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((inner_len + 20) as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = inner_proto;
        ip[12..16].copy_from_slice(&cfg.encap_src4);
        ip[14] ^= h[2];
        ip[15] ^= h[3];
        ip[16..20].copy_from_slice(&b.addr[..4]);
        let c = csum::finish(csum::add(&ip[..20], 0));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
    }
    let (dmac, smac) = next_hop(ctx, b, &buf[18..58], inner_len)?;
    buf[..6].copy_from_slice(&dmac);
    if let Some(smac) = smac {
        buf[6..12].copy_from_slice(&smac);
    }

    // SAFETY: growing the headroom; all packet pointers are derived afresh below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(outer_len as i32)) } != 0 {
        return Err(());
    }
    if has_vlan {
        copy_out::<{ ETH_HLEN + VLAN_HLEN }>(ctx, 0, &buf[..18])?;
    } else {
        copy_out::<ETH_HLEN>(ctx, 0, &buf[..14])?;
    }
    if outer_v6 {
        copy_out::<40>(ctx, l2_len, &buf[18..58])
    } else {
        copy_out::<20>(ctx, l2_len, &buf[18..38])
    }
}

/// Copies N bytes from `src` (scratch map memory) into the packet at `off`, word by word.
#[inline(always)]
pub fn copy_out<const N: usize>(ctx: &XdpContext, off: usize, src: &[u8]) -> Result<(), ()> {
    if src.len() < N {
        return Err(());
    }
    let p: *mut [u8; N] = ptr_at(ctx, off)?;
    // SAFETY: ptr_at checked N bytes of packet; `src` has at least N bytes.
    unsafe { mem::copy::<N>(p.cast(), src.as_ptr()) };
    Ok(())
}
