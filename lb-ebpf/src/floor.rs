//! Benchmark programs, loaded only by `cargo xtask bench`: what the cheapest XDP programs cost
//! on this machine, so Sluice's cost is reported as a ratio measured in the same run; and
//! `bench_vary`, the balancer behind a rewrite of the IPv4 source address, because a
//! BPF_PROG_TEST_RUN call repeats one frame and a benchmark of many flows needs many sources.

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::Array,
    macros::{btf_map, xdp},
    programs::XdpContext,
};

use crate::{
    csum,
    mem::{ld16, ld32, st16, st32, swap_macs},
    parse::ptr_at,
};

/// `[sequence, modulo, base address (host order), unused]`: `bench_vary` and `floor_vary` set
/// the frame's IPv4 source to `base + sequence % modulo` and advance the sequence; modulo 0
/// leaves the frame alone. Written by the benchmark; one CPU runs it, so no atomics.
#[btf_map]
static BENCH_VARY: Array<u32, 4> = Array::new();

/// Returns XDP_PASS and does nothing else.
#[xdp]
pub fn floor_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Drops everything: the receiving end of the live-frames benchmark's veth pair.
#[xdp]
pub fn floor_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// Swaps the Ethernet addresses and sends the frame back: the least a forwarder can do.
#[xdp]
pub fn floor_macswap(ctx: XdpContext) -> u32 {
    match swap_macs(&ctx) {
        Ok(()) => xdp_action::XDP_TX,
        Err(()) => xdp_action::XDP_PASS,
    }
}

/// The MAC-swap floor behind the same source rewrite as `bench_vary`.
#[xdp]
pub fn floor_vary(ctx: XdpContext) -> u32 {
    vary(&ctx);
    match swap_macs(&ctx) {
        Ok(()) => xdp_action::XDP_TX,
        Err(()) => xdp_action::XDP_PASS,
    }
}

/// Sluice's balancer behind the source rewrite.
#[xdp]
pub fn bench_vary(ctx: XdpContext) -> u32 {
    vary(&ctx);
    crate::run_balancer(&ctx)
}

/// Rewrites the IPv4 source of an untagged frame (and the header checksum, incrementally),
/// and restores the IPv4 EtherType: live-frames mode recycles a frame's page without
/// rewriting its bytes, and `ipip`'s outer header (pushed in front) overwrites the old
/// Ethernet header, which the next run would otherwise see as non-IP.
#[inline(always)]
fn vary(ctx: &XdpContext) {
    let Ok(frame) = ptr_at::<[u8; 34]>(ctx, 0) else { return };
    let frame = frame.cast::<u8>();
    // SAFETY: ptr_at checked 34 bytes (Ethernet and a 20-byte IPv4 header).
    unsafe { st16(frame.add(12), 0x0800u16.to_be()) };
    let (Some(seq), Some(modulo), Some(base)) = (BENCH_VARY.get_ptr_mut(0), BENCH_VARY.get(1), BENCH_VARY.get(2)) else { return };
    let (modulo, base) = (*modulo, *base);
    if modulo == 0 {
        return;
    }
    let ip = frame.wrapping_add(14);
    // SAFETY: this CPU is the only writer (the benchmark pins itself); the header was checked.
    unsafe {
        let n = *seq;
        *seq = n.wrapping_add(1);
        let new = base.wrapping_add(n % modulo).to_be();
        let old = ld32(ip.add(12));
        let mut check = ld16(ip.add(10));
        // Words as stored (network order); the one's-complement sum is byte-order independent.
        check = csum::replace16(check, old as u16, new as u16);
        check = csum::replace16(check, (old >> 16) as u16, (new >> 16) as u16);
        st32(ip.add(12), new);
        st16(ip.add(10), check);
    }
}
