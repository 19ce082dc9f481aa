//! The peer channel's word on flows that moved (`peers.rs` carries it): their slots given back
//! here, through the daemon, by the flow table's compare-and-swaps (exactly once, whoever gets
//! there first: the datapath, the GC or this). The table and the counters are shared memory, so
//! the state lock is taken only to reach them.

use std::sync::Arc;

use super::Daemon;
use crate::{conns::ConnCounters, flowtab::FlowTable, gc, status::peers::Moved};

impl Daemon {
    /// The flow table and the counters (shared memory: no lock needed to use them).
    fn flow_table(&self) -> (Arc<FlowTable>, Arc<ConnCounters>) {
        let st = self.lock();
        (st.flows.clone(), st.conns.clone())
    }

    /// For each flow another node saw `ago_ms` ago (adopted it, or its last packet there): if it
    /// is here and its last packet here is not newer, it has moved away: release its slot and free
    /// its way (the GC's compare-and-swaps: exactly once, whoever gets there first). Returns
    /// (released, not here, still arriving here with their idle times here, closed here).
    pub fn settle_moved(&self, flows: &[Moved]) -> (u64, u64, Vec<Moved>, Vec<Moved>) {
        let (table, conns) = self.flow_table();
        let now_ns = gc::now_coarse_ns();
        let (mut released, mut ignored, mut active, mut closed) = (0u64, 0u64, Vec::new(), Vec::new());
        for m in flows {
            let Some(e) = table.get(&m.key()) else {
                ignored += 1;
                continue;
            };
            let idle_ms = now_ns.saturating_sub(e.flow.last_seen_ns) / 1_000_000;
            // `ago_ms` is measured on the other node's clock up to the sending (time spent waiting
            // for a retry included); the transit (a send times out after 3 s) is not counted, so
            // the hosts' wall clocks do not enter the rule. 100 ms for the coarse timestamps.
            if idle_ms + 100 >= m.ago_ms {
                let gave = table.release(&e, &conns);
                table.remove(&e);
                released += u64::from(gave);
                if e.flow.state == lb_common::FLOW_CLOSING {
                    closed.push(*m);
                }
            } else {
                active.push(Moved { ago_ms: idle_ms, ..*m });
            }
        }
        (released, ignored, active, closed)
    }

    /// The sender's side of an answer: flows that closed at the peer, which this node adopted from
    /// a late packet, give their slot back here.
    pub fn release_closed(&self, flows: &[Moved]) -> u64 {
        let (table, conns) = self.flow_table();
        flows
            .iter()
            .filter_map(|m| table.get(&m.key()))
            .map(|e| {
                let gave = table.release(&e, &conns);
                table.remove(&e);
                u64::from(gave)
            })
            .sum()
    }
}
