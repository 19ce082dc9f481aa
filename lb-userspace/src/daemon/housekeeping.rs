//! The daemon's work on the flow table, once a second and off the state lock: the GC sweep,
//! the flows adopted since the last walk (told to the peers), and every `RECONCILE_EVERY`
//! ticks the reconciliation of the counters with the flow table.
//!
//! The table and the counters are memory the datapath changes on every CPU at once, so this
//! work never needed the lock: a slot is given back through a compare-and-swap on the flow's
//! entry (`flowtab.rs`), whoever gives it (the datapath, this task, the peer channel). Walking
//! 65,536 buckets under the lock held every change and every status read behind it for tens
//! of milliseconds (the longest hold before, `BENCHMARKS.md`). The lock is now taken twice a
//! tick, briefly: to read the timeouts and backends, and to store what was found.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    conns::ConnCounters,
    flowtab::FlowTable,
    gc::{self, Reconciler},
};

use super::Daemon;

/// How often the reconciliation pass runs, in ticks (one per second).
pub(super) const RECONCILE_EVERY: u64 = 10;
/// GC waits this many times as long as its last sweep took (at least a second).
const GC_DUTY_INVERSE: u32 = 20;
/// Ticks come once a second but not to the microsecond: without the slack a one-second gap
/// would often be missed by a hair and become two.
const TICK_SLACK: Duration = Duration::from_millis(100);

/// What one tick needs, copied under the lock.
struct Inputs {
    flows: Arc<FlowTable>,
    conns: Arc<ConnCounters>,
    timeouts: crate::config::Timeouts,
    /// Backend ids in use (reconciled every `RECONCILE_EVERY` ticks).
    ids: Vec<u32>,
}

/// The peer channel's ends this task feeds (with `cluster.peers`).
struct PeerFeed {
    stats: Arc<Mutex<crate::status::peers::Stats>>,
    tx: mpsc::UnboundedSender<crate::status::peers::Batch>,
    /// Adopted flows entered since this coarse-clock time are reported next.
    since_ns: u64,
}

impl Daemon {
    pub(super) fn spawn_housekeeping(&self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let daemon = self.clone();
        tokio::spawn(async move {
            let mut feed = {
                let st = daemon.lock();
                st.cluster.as_ref().and_then(|c| c.peers.as_ref()).map(|p| PeerFeed { stats: p.stats.clone(), tx: p.tx.clone(), since_ns: 0 })
            };
            let mut reconciler = Reconciler::default();
            let (mut next_gc, mut gc_gap) = (Instant::now(), Duration::from_secs(1));
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut n: u64 = 0;
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                n += 1;
                let inputs = {
                    let st = daemon.lock();
                    Inputs {
                        flows: st.flows.clone(),
                        conns: st.conns.clone(),
                        timeouts: st.cfg.flows.timeouts.clone(),
                        ids: st.applied.services.values().flat_map(|s| s.backends.values().map(|b| b.id)).collect(),
                    }
                };
                let sweep_due = Instant::now() >= next_gc;
                let reconcile_due = n.is_multiple_of(RECONCILE_EVERY);
                let walk_peers = feed.as_ref().map(|f| f.since_ns);
                let work = tokio::task::spawn_blocking(move || {
                    let started = Instant::now();
                    let sweep = sweep_due.then(|| gc::sweep(&inputs.flows, &inputs.conns, &inputs.timeouts, gc::now_coarse_ns(), gc_gap));
                    let took = started.elapsed();
                    let moved = walk_peers.map(|since| {
                        let (now, at) = (gc::now_coarse_ns(), Instant::now());
                        (gc::adopted_since(&inputs.flows, since, now), now, at)
                    });
                    let drift = reconcile_due.then(|| reconciler.pass(&inputs.flows, &inputs.conns, inputs.ids));
                    (sweep, took, moved, drift, reconciler)
                });
                let Ok((sweep, took, moved, drift, r)) = work.await else {
                    tracing::error!("the flow table's housekeeping panicked; it starts again next tick");
                    reconciler = Reconciler::default();
                    continue;
                };
                reconciler = r;
                if let Some(s) = &sweep {
                    // Keep GC under ~5 % of a core: a sweep that took T waits at least 20 T.
                    gc_gap = (took * GC_DUTY_INVERSE).max(Duration::from_secs(1));
                    next_gc = (Instant::now() + gc_gap).checked_sub(TICK_SLACK).unwrap_or_else(Instant::now);
                    if s.expired > 0 {
                        tracing::debug!(expired = s.expired, released = s.released, ?took, "flow GC");
                    }
                }
                if let (Some(f), Some((moved, now, at))) = (feed.as_mut(), moved) {
                    // The next walk looks a second back too: a flow adopted during this walk, in
                    // a bucket already passed, is reported then. Duplicates are ignored by the peers.
                    f.since_ns = now.saturating_sub(1_000_000_000);
                    if !moved.is_empty() {
                        f.stats.lock().expect("stats").reported += moved.len() as u64;
                        let _ = f.tx.send((at, moved));
                    }
                }
                if let Some(d) = &drift {
                    for x in d.iter().filter(|x| x.corrected) {
                        tracing::warn!(backend_id = x.backend_id, counter = x.counter, flows = x.flows, "open-connection counter drifted from the flow table; corrected");
                    }
                }
                if sweep.is_some() || drift.is_some() {
                    let mut st = daemon.lock();
                    if let Some(s) = sweep {
                        st.last_sweep = s;
                    }
                    if let Some(d) = drift {
                        st.last_drift = d;
                        st.corrections.clone_from(&reconciler.corrections);
                    }
                }
            }
        })
    }
}
