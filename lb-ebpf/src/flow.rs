//! The flow table: lookups, TCP state transitions, and giving a connection slot back exactly
//! once.

use lb_common::{Flow, FlowKey, FLOW_CLOSING, FLOW_ESTABLISHED, FLOW_SYN_SEEN};

use crate::{
    atomic,
    maps::{CONNS, FLOWS},
    parse::PROTO_TCP,
};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What a packet of a known flow does to it.
pub enum Hit {
    /// Forward to this backend.
    Forward { backend_id: u32 },
    /// A SYN reusing the tuple of a closing flow: the old flow is gone, admit anew.
    Reopen,
}

/// Takes one open-connection slot on `backend_id` without looking at the limit (adoption).
#[inline(always)]
pub fn conns_add(backend_id: u32) -> u64 {
    match CONNS.get_ptr_mut(backend_id) {
        // SAFETY: the value lives in a shared array; only atomic operations touch `open`.
        Some(c) => unsafe { atomic::fetch_add(&raw mut (*c).open, 1) },
        None => 0,
    }
}

#[inline(always)]
pub fn conns_sub(backend_id: u32) {
    if let Some(c) = CONNS.get_ptr_mut(backend_id) {
        // SAFETY: as in conns_add.
        unsafe { atomic::sub(&raw mut (*c).open, 1) };
    }
}

/// Gives the flow's slot back if it still holds one. The exchange makes this exactly-once
/// even when FIN, RST and GC race on different CPUs.
#[inline(always)]
pub fn release(flow: *mut Flow) {
    // SAFETY: `flow` points into a FLOWS value; `counted` is only changed atomically.
    let was = unsafe { atomic::swap(&raw mut (*flow).counted, 0) };
    if was == 1 {
        // SAFETY: as above; backend_id is written once at insert.
        conns_sub(unsafe { (*flow).backend_id });
    }
}

/// Looks the flow up and applies this packet's TCP flags to it.
#[inline(always)]
pub fn on_packet(key: &FlowKey, tcp_flags: u8, now: u64) -> Option<Hit> {
    let flow = FLOWS.get_ptr_mut(key)?;
    // SAFETY: a FLOWS value pointer; racing writers (other CPUs) only write these same
    // plain fields, and slot accounting goes through `release`'s atomic exchange.
    let f = unsafe { &mut *flow };
    let hit = Hit::Forward { backend_id: f.backend_id };
    f.last_seen_ns = now;
    if key.proto != PROTO_TCP {
        return Some(hit);
    }
    if tcp_flags & TCP_RST != 0 {
        release(flow);
        let _ = FLOWS.remove(key);
    } else if tcp_flags & TCP_SYN != 0 && tcp_flags & TCP_ACK == 0 && f.state == FLOW_CLOSING {
        // The client reuses the tuple for a new connection: it must pass admission again.
        release(flow);
        let _ = FLOWS.remove(key);
        return Some(Hit::Reopen);
    } else if tcp_flags & TCP_FIN != 0 {
        f.state = FLOW_CLOSING;
        release(flow);
    } else if f.state == FLOW_SYN_SEEN && tcp_flags & (TCP_ACK | TCP_SYN) == TCP_ACK {
        f.state = FLOW_ESTABLISHED;
    }
    Some(hit)
}
