//! Sending a packet to its backend: `l2dsr` (rewrite the destination MAC) or `ipip`
//! (IPIP / IP6IP6 / 4in6 / 6in4 encapsulation, Katran-compatible). Both end in `XDP_TX`.

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    helpers::{bpf_fib_lookup, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{Backend, FAMILY_V6, MODE_IPIP};

use crate::{
    maps::{BACKENDS, SCRATCH},
    mem,
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
/// Inlined: on this kind of machine every call and return costs tens of ns (the kernel's
/// return thunk against SRSO), and its frame is small now that headers are built in registers.
#[inline(always)]
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

/// A MAC address as a 4-byte and a 2-byte word in memory order (what `mem::st32`/`st16` store).
type Mac = (u32, u16);

/// Next hop for an encapsulated packet: (destination MAC, source MAC) from the configured
/// gateway (the source stays `ours`, the MAC the frame was sent to) or from the kernel's FIB.
/// `src` is the outer source address (IPv4 in its first word).
#[inline(always)]
fn next_hop(ctx: &XdpContext, b: &Backend, outer_v6: bool, src: &[u32; 4], inner_len: usize, ours: Mac) -> Result<(Mac, Mac), ()> {
    if config!(has_gateway) != 0 {
        return Ok((config_gateway_mac(), ours));
    }
    // The request lives in per-CPU scratch memory, not on the stack (see maps::Scratch).
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's scratch slot; only `fib` is touched here.
    let p: &mut FibParams = unsafe { &mut (*scratch).fib };
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request; word stores (a plain
    // `zeroed()` assignment compiles to a call to a byte-wise memset).
    unsafe { mem::zero::<{ size_of::<FibParams>() }>(core::ptr::from_mut(p).cast()) };
    p.ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: the backend's address is 16 bytes of an 8-aligned map value.
    let dst = unsafe { core::ptr::from_ref(&b.addr).cast::<[u32; 4]>().read() };
    if outer_v6 {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = *src;
        p.__bindgen_anon_4.ipv6_dst = dst;
    } else {
        p.family = AF_INET;
        // Host byte order (the kernel compares it with the MTU).
        p.__bindgen_anon_1.tot_len = (inner_len + 20) as u16;
        p.__bindgen_anon_3.ipv4_src = src[0];
        p.__bindgen_anon_4.ipv4_dst = dst[0];
    }
    // SAFETY: ctx is the program's context; p is a properly sized, initialised request.
    let rc = unsafe { bpf_fib_lookup(ctx.ctx.cast(), core::ptr::from_mut(p), size_of::<FibParams>() as i32, 0) };
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        return Err(());
    }
    // SAFETY: 6-byte arrays of the request in map memory.
    unsafe {
        let (d, s) = (p.dmac.as_ptr(), p.smac.as_ptr());
        Ok(((mem::ld32(d), mem::ld16(d.add(4))), (mem::ld32(s), mem::ld16(s.add(4)))))
    }
}

/// The configured gateway MAC (`CONFIG.gateway_mac`, bytes 8..14 of the 4-aligned `Config`).
#[inline(always)]
fn config_gateway_mac() -> Mac {
    let p = core::ptr::from_ref(&CONFIG).cast::<u8>();
    // SAFETY: word-aligned reads inside CONFIG (offsets asserted in lb-common); volatile so
    // the loader's value is read, not the compiled-in default.
    unsafe { (p.add(8).cast::<u32>().read_volatile(), p.add(12).cast::<u16>().read_volatile()) }
}

/// One's-complement sum of 32-bit words, folded to the 16-bit Internet checksum (of the
/// words as stored in memory: the sum is byte-order independent, RFC 1071).
#[inline(always)]
fn csum_words(words: &[u32]) -> u16 {
    let mut acc: u64 = 0;
    for w in words {
        acc += u64::from(*w);
    }
    acc = (acc & 0xFFFF_FFFF) + (acc >> 32);
    acc = (acc & 0xFFFF) + (acc >> 16);
    acc = (acc & 0xFFFF) + (acc >> 16);
    acc = (acc & 0xFFFF) + (acc >> 16);
    !(acc as u16)
}

/// Encapsulates in place: grows the headroom, rewrites L2 (keeping a VLAN tag), and writes
/// the outer header. Everything is assembled in registers and stored with word-sized
/// instructions (`mem`), straight into the packet.
#[inline(always)]
fn encap(ctx: &XdpContext, pkt: &Packet, b: &Backend, hash: u32) -> Result<(), ()> {
    let outer_v6 = b.family == FAMILY_V6;
    let inner_len = pkt.ip_len;
    let has_vlan = pkt.l3_off == ETH_HLEN + VLAN_HLEN;

    // The old L2 header: destination MAC (ours) and, if tagged, the VLAN TCI.
    let old: *const [u8; 16] = ptr_at(ctx, 0)?;
    let old = old.cast::<u8>();
    // SAFETY: ptr_at checked 16 bytes.
    let (ours, tci) = unsafe { ((mem::ld32(old), mem::ld16(old.add(4))), mem::ld16(old.add(14))) };

    // A flow-stable outer source: the configured prefix with the flow hash in its low 16 bits
    // (bytes 2..4 of the address's last word get the hash's low two bytes, big-endian).
    let h = hash.to_be_bytes();
    let mix = u32::from_ne_bytes([0, 0, h[2], h[3]]);
    let cfg = core::ptr::from_ref(&CONFIG).cast::<u8>();
    let inner_proto = if pkt.is_v6 { PROTO_IPV6 } else { PROTO_IPIP };
    // SAFETY: aligned reads inside CONFIG (encap_src4 at 16, encap_src6 at 20), volatile as in
    // config_gateway_mac.
    let src: [u32; 4] = unsafe {
        let w = |off: usize| cfg.add(off).cast::<u32>().read_volatile();
        if outer_v6 {
            [w(20), w(24), w(28), w(32) ^ mix]
        } else {
            [w(16) ^ mix, 0, 0, 0]
        }
    };
    let (dmac, smac) = next_hop(ctx, b, outer_v6, &src, inner_len, ours)?;

    // SAFETY: growing the headroom; all packet pointers are derived afresh below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(if outer_v6 { 40 } else { 20 })) } != 0 {
        return Err(());
    }
    let outer_type: u16 = if outer_v6 { ETH_P_IPV6 } else { ETH_P_IP };
    let l2_len = if has_vlan {
        let p: *mut [u8; ETH_HLEN + VLAN_HLEN] = ptr_at(ctx, 0)?;
        let p = p.cast::<u8>();
        // SAFETY: ptr_at checked the bytes.
        unsafe {
            write_macs(p, dmac, smac);
            mem::st16(p.add(12), ETH_P_8021Q.to_be());
            mem::st16(p.add(14), tci);
            mem::st16(p.add(16), outer_type.to_be());
        }
        ETH_HLEN + VLAN_HLEN
    } else {
        let p: *mut [u8; ETH_HLEN] = ptr_at(ctx, 0)?;
        let p = p.cast::<u8>();
        // SAFETY: ptr_at checked the bytes.
        unsafe {
            write_macs(p, dmac, smac);
            mem::st16(p.add(12), outer_type.to_be());
        }
        ETH_HLEN
    };
    // SAFETY: the backend's address is 16 bytes of an 8-aligned map value.
    let dst = unsafe { core::ptr::from_ref(&b.addr).cast::<[u64; 2]>().read() };
    if outer_v6 {
        let p: *mut [u8; 40] = ptr_at(ctx, l2_len)?;
        let p = p.cast::<u8>();
        let len = (inner_len as u16).to_be_bytes();
        // SAFETY: ptr_at checked 40 bytes.
        unsafe {
            mem::st32(p, u32::from_ne_bytes([0x60, 0, 0, 0]));
            mem::st32(p.add(4), u32::from_ne_bytes([len[0], len[1], inner_proto, 64]));
            mem::st32(p.add(8), src[0]);
            mem::st32(p.add(12), src[1]);
            mem::st32(p.add(16), src[2]);
            mem::st32(p.add(20), src[3]);
            mem::st64(p.add(24), dst[0]);
            mem::st64(p.add(32), dst[1]);
        }
    } else {
        let p: *mut [u8; 20] = ptr_at(ctx, l2_len)?;
        let p = p.cast::<u8>();
        let len = ((inner_len + 20) as u16).to_be_bytes();
        let w0 = u32::from_ne_bytes([0x45, 0, len[0], len[1]]);
        let w2 = u32::from_ne_bytes([64, inner_proto, 0, 0]);
        let dst4 = dst[0] as u32;
        let check = csum_words(&[w0, w2, src[0], dst4]).to_ne_bytes();
        // SAFETY: ptr_at checked 20 bytes.
        unsafe {
            mem::st32(p, w0);
            mem::st32(p.add(4), 0);
            mem::st32(p.add(8), w2 | u32::from_ne_bytes([0, 0, check[0], check[1]]));
            mem::st32(p.add(12), src[0]);
            mem::st32(p.add(16), dst4);
        }
    }
    Ok(())
}

/// Destination and source MAC at the start of an Ethernet header.
#[inline(always)]
unsafe fn write_macs(p: *mut u8, dmac: Mac, smac: Mac) {
    // SAFETY: the caller checked 12 bytes at `p`.
    unsafe {
        mem::st32(p, dmac.0);
        mem::st16(p.add(4), dmac.1);
        mem::st32(p.add(6), smac.0);
        mem::st16(p.add(10), smac.1);
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
