//! Benchmark floors, loaded only by `cargo xtask bench`: what the cheapest XDP programs cost
//! on this machine, so Sluice's cost is reported as a ratio measured in the same run.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

use crate::parse::ptr_at;

/// Returns XDP_PASS and does nothing else.
#[xdp]
pub fn floor_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Swaps the Ethernet addresses and sends the frame back: the least a forwarder can do.
#[xdp]
pub fn floor_macswap(ctx: XdpContext) -> u32 {
    let Ok(eth) = ptr_at::<[u8; 12]>(&ctx, 0) else { return xdp_action::XDP_PASS };
    // SAFETY: ptr_at checked the bounds.
    unsafe {
        let m = *eth;
        let mut s = [0u8; 12];
        s[..6].copy_from_slice(&m[6..]);
        s[6..].copy_from_slice(&m[..6]);
        *eth = s;
    }
    xdp_action::XDP_TX
}
