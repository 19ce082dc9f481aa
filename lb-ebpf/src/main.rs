//! Sluice's XDP programs. The entry point is thin: it runs the balancer and returns whatever
//! verdict it reached (`Ok` and `Err` are both verdicts: `Err` is an early exit, never "abort").
#![no_std]
#![no_main]

mod maps;
mod parse;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::Stat;

#[xdp]
pub fn sluice_balancer(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let (stat, verdict) = match balance(&ctx) {
        Ok(v) | Err(v) => v,
    };
    maps::count(stat, len);
    verdict
}

/// Parse, then decide. Every path ends in exactly one `(Stat, verdict)` pair, so every packet
/// is counted exactly once by the caller.
#[inline(always)]
fn balance(ctx: &XdpContext) -> Result<(Stat, u32), (Stat, u32)> {
    let pkt = parse::parse(ctx).map_err(|s| (s, xdp_action::XDP_PASS))?;
    let stat = match (pkt.is_v6, pkt.proto) {
        (false, parse::PROTO_TCP) => Stat::Tcp4,
        (false, _) => Stat::Udp4,
        (true, parse::PROTO_TCP) => Stat::Tcp6,
        (true, _) => Stat::Udp6,
    };
    Ok((stat, xdp_action::XDP_PASS))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
