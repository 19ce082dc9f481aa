//! Flow garbage collection and counter reconciliation.
//!
//! GC walks the memory-mapped flow table (`flowtab`) and removes flows idle longer than their
//! state's timeout: first their slot is given back if they still hold one (a compare-and-swap
//! of `counted`, so FIN, RST and GC release it exactly once), then their way is freed (a
//! compare-and-swap of the tag word, so a way reused meanwhile is left alone).
//!
//! Reconciliation recounts the flows that hold a slot, per backend, and compares with `CONNS`.
//! A difference seen once may be a flow admitted between the scan and the read; a difference
//! seen twice in a row is drift, and is corrected by an atomic add of the difference (which
//! keeps whatever the datapath did meanwhile).

use std::{collections::BTreeMap, time::Duration};

use lb_common::{FLOW_CLOSING, FLOW_ESTABLISHED, FLOW_SYN_SEEN, FLOW_UDP};
use serde::Serialize;

use crate::{config::Timeouts, conns::ConnCounters, flowtab::FlowTable};

/// `CLOCK_MONOTONIC_COARSE` in ns: the clock the datapath stamps flows with
/// (`bpf_ktime_get_coarse_ns`).
pub fn now_coarse_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn timeout(t: &Timeouts, state: u8) -> Duration {
    match state {
        FLOW_ESTABLISHED => t.established,
        FLOW_CLOSING => t.closing,
        FLOW_UDP => t.udp,
        // FLOW_SYN_SEEN, and any state a newer datapath might add: the shortest.
        _ => t.syn,
    }
}

/// What one sweep did. `released` counts slots this sweep gave back and `expired` ways it
/// freed: a flow whose RST won the race for its way after the sweep had released its slot
/// counts in `released` only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Sweep {
    pub scanned: u64,
    pub expired: u64,
    pub released: u64,
}

/// Removes idle flows and releases their slots. `next_sweep` is how long until the next sweep:
/// a half-open (SYN_SEEN) flow that would pass the SYN timeout before then goes now, so that a
/// SYN flood's slots come back within the SYN timeout, not a GC period later. (Harmless for a
/// real client: its ACK finds no flow and is adopted.) The look-ahead is at most half the SYN
/// timeout: a slow GC (a huge table) must not expire handshakes still in progress, whose ACKs
/// would then be adopted past the limit. Other states expire once past their timeouts.
pub fn sweep(table: &FlowTable, conns: &ConnCounters, t: &Timeouts, now_ns: u64, next_sweep: Duration) -> Sweep {
    let mut report = Sweep::default();
    let ahead = next_sweep.min(t.syn / 2).as_nanos() as u64;
    table.for_each(|e| {
        report.scanned += 1;
        let v = &e.flow;
        let idle = now_ns.saturating_sub(v.last_seen_ns) + if v.state == FLOW_SYN_SEEN { ahead } else { 0 };
        if idle <= timeout(t, v.state).as_nanos() as u64 {
            return;
        }
        // The slot before the way: once the way is free it may be claimed by another flow.
        if table.release(e, conns) {
            report.released += 1;
        }
        if table.remove(e) {
            report.expired += 1;
        }
    });
    report
}

/// Flows holding a slot, per backend, from one walk of the flow table.
pub fn count_flows(table: &FlowTable) -> BTreeMap<u32, u64> {
    let mut counts = BTreeMap::new();
    table.for_each(|e| {
        if e.holds_slot() {
            *counts.entry(e.flow.backend_id).or_insert(0) += 1;
        }
    });
    counts
}

/// A counter that disagreed with the flow table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Drift {
    pub backend_id: u32,
    /// What `CONNS` said.
    pub counter: u64,
    /// What the flow table says.
    pub flows: u64,
    /// Whether it was corrected (seen twice in a row).
    pub corrected: bool,
}

/// Remembers the last pass's differences, so only persistent drift is corrected.
#[derive(Debug, Default)]
pub struct Reconciler {
    last: BTreeMap<u32, i64>,
    /// Total corrections applied, per backend (for the drift metric).
    pub corrections: BTreeMap<u32, u64>,
}

impl Reconciler {
    /// One pass over `backends` (ids in use).
    pub fn pass(&mut self, table: &FlowTable, conns: &ConnCounters, backends: impl IntoIterator<Item = u32>) -> Vec<Drift> {
        let counts = count_flows(table);
        let mut out = Vec::new();
        let mut now = BTreeMap::new();
        for id in backends {
            let counter = conns.get(id);
            let flows = counts.get(&id).copied().unwrap_or(0);
            let diff = counter as i64 - flows as i64;
            if diff == 0 {
                continue;
            }
            let corrected = self.last.get(&id) == Some(&diff);
            if corrected {
                conns.correct(id, -diff);
                *self.corrections.entry(id).or_insert(0) += diff.unsigned_abs();
            } else {
                now.insert(id, diff);
            }
            out.push(Drift { backend_id: id, counter, flows, corrected });
        }
        self.last = now;
        out
    }
}

/// The adopted flows entered since `since_ns` (the datapath's coarse monotonic clock), with
/// their age at `now_ns`.
pub fn adopted_since(table: &FlowTable, since_ns: u64, now_ns: u64) -> Vec<crate::status::peers::Moved> {
    let mut out = Vec::new();
    table.for_each(|e| {
        if e.flow.adopted != 0 && e.flow.created_ns > since_ns {
            let k = &e.key;
            out.push(crate::status::peers::Moved {
                src: k.src,
                dst: k.dst,
                sport: u16::from_be_bytes(k.sport_be),
                dport: u16::from_be_bytes(k.dport_be),
                proto: k.proto,
                ago_ms: now_ns.saturating_sub(e.flow.created_ns) / 1_000_000,
            });
        }
    });
    out
}
