//! Benchmark floors, loaded only by `cargo xtask bench`: what the cheapest XDP programs cost
//! on this machine, so Sluice's cost is reported as a ratio measured in the same run.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

use crate::mem::swap_macs;

/// Returns XDP_PASS and does nothing else.
#[xdp]
pub fn floor_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Swaps the Ethernet addresses and sends the frame back: the least a forwarder can do.
#[xdp]
pub fn floor_macswap(ctx: XdpContext) -> u32 {
    match swap_macs(&ctx) {
        Ok(()) => xdp_action::XDP_TX,
        Err(()) => xdp_action::XDP_PASS,
    }
}
