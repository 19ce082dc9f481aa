//! What a lab run reports: the end state as the daemon, the pinned maps and the clients each
//! see it, the checks on it, and the [`Verdict`] every scenario's report gives.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use anyhow::{Context as _, Result};
use lb_userspace::api::{BackendReport, StatusReport};
use serde::Serialize;

use crate::{backend4, Lab};

/// One backend at the end of the run, after the timeouts and one reconciliation period.
#[derive(Clone, Debug, Serialize)]
pub struct BackendEnd {
    pub id: u32,
    pub backend: IpAddr,
    /// Connections the clients still hold to it.
    pub clients: u64,
    /// Its shared open-connection counter (`CONNS`, read from the pinned map).
    pub counter: u64,
    /// Flows in the pinned flow table holding one of its slots.
    pub flows: u64,
    /// What the daemon's status says is open.
    pub daemon: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub what: String,
    pub ok: bool,
    pub detail: String,
}

/// Per backend of "web": the pinned counter and flows and the daemon's view; `clients(n)` is
/// what the clients hold to backend `n`.
pub fn end_state(lab: &Lab, clients: impl Fn(u8) -> u64) -> Result<Vec<BackendEnd>> {
    let bs = backends(&status(lab)?);
    let ids: Vec<u32> = bs.iter().map(|b| b.id).collect();
    let t = tables(&lab.pin_dir(), &ids)?;
    Ok(bs
        .iter()
        .map(|b| {
            let (id, backend) = (b.id, b.address);
            let n = (1..=super::MAX_BACKENDS).find(|n| IpAddr::V4(backend4(*n)) == backend);
            let (counter, flows) = (t.counters.get(&id).copied().unwrap_or(0), t.holding.get(&id).copied().unwrap_or(0));
            BackendEnd { id, backend, clients: n.map_or(0, &clients), counter, flows, daemon: b.open }
        })
        .collect())
}

/// The check that counters, flows, the daemon and the clients agree on every backend.
pub fn agreement(what: &str, end: &[BackendEnd]) -> Check {
    Check {
        what: what.into(),
        ok: end.iter().all(|b| b.clients == b.counter && b.counter == b.flows && b.flows == b.daemon),
        detail: end.iter().map(|b| format!("{}: clients {} counter {} flows {} daemon {}", b.backend, b.clients, b.counter, b.flows, b.daemon)).collect::<Vec<_>>().join("; "),
    }
}

/// A report's end-state table and its checks, in markdown.
pub fn end_and_checks_markdown(s: &mut String, end: &[BackendEnd], checks: &[Check]) {
    use std::fmt::Write as _;
    let _ = writeln!(s, "\n| backend | clients hold | counter | flows holding a slot | daemon says |\n|---|---|---|---|---|");
    for b in end {
        let _ = writeln!(s, "| {} | {} | {} | {} | {} |", b.backend, b.clients, b.counter, b.flows, b.daemon);
    }
    let _ = writeln!(s, "\nChecks:\n");
    for c in checks {
        let _ = writeln!(s, "- {} {}: {}", if c.ok { "ok  " } else { "FAIL" }, c.what, c.detail);
    }
}

/// A lab run's report: a verdict and a printable account.
pub trait Verdict: Serialize {
    fn checks(&self) -> &[Check];
    fn markdown(&self) -> String;
    fn passed(&self) -> bool {
        self.checks().iter().all(|c| c.ok)
    }
}

pub fn status(lab: &Lab) -> Result<StatusReport> {
    lb_userspace::client::block_on(lb_userspace::client::Client::new(lab.socket()).status()).map_err(|e| anyhow::anyhow!("{e}"))
}

/// The "web" service's backends in the daemon's status.
pub fn backends(st: &StatusReport) -> Vec<BackendReport> {
    st.services.iter().filter(|s| s.name == "web").flat_map(|s| s.backends.iter().cloned()).collect()
}

pub fn refused_total(st: &StatusReport) -> u64 {
    backends(st).iter().map(|b| b.refused.values().sum::<u64>()).sum()
}

/// A flow holding a slot, as the pinned flow table has it.
#[derive(Clone, Debug, Serialize)]
pub struct HeldFlow {
    /// `client:port → vip:port`.
    pub flow: String,
    pub adopted: bool,
    /// Since it was entered, and since its last packet (ms).
    pub age_ms: u64,
    pub idle_ms: u64,
}

/// The flows holding a slot in the pinned flow table in `pin_dir`.
pub fn held_flows(pin_dir: &Path) -> Result<Vec<HeldFlow>> {
    let table = flow_table(pin_dir)?;
    let now = lb_userspace::gc::now_coarse_ns();
    let mut out = Vec::new();
    table.for_each(|e| {
        if e.holds_slot() {
            let k = &e.key;
            let addr = |a: &[u8; 16], port: [u8; 2]| std::net::SocketAddr::new(lb_common::user::ip_from_key(a), u16::from_be_bytes(port));
            out.push(HeldFlow {
                flow: format!("{} → {}", addr(&k.src, k.sport_be), addr(&k.dst, k.dport_be)),
                adopted: e.flow.adopted != 0,
                age_ms: now.saturating_sub(e.flow.created_ns) / 1_000_000,
                idle_ms: now.saturating_sub(e.flow.last_seen_ns) / 1_000_000,
            });
        }
    });
    Ok(out)
}

/// The pinned maps, read without the daemon.
pub struct Tables {
    /// Flows in the table.
    pub flows: u64,
    /// Flows holding a slot, per backend id.
    pub holding: BTreeMap<u32, u64>,
    /// `CONNS` per backend id.
    pub counters: BTreeMap<u32, u64>,
}

fn pinned(pin_dir: &Path, name: &str) -> Result<aya::maps::MapData> {
    aya::maps::MapData::from_pin(pin_dir.join(name)).with_context(|| format!("opening the pinned {name}"))
}

fn flow_table(pin_dir: &Path) -> Result<lb_userspace::flowtab::FlowTable> {
    let open = |name: &str| pinned(pin_dir, name);
    lb_userspace::flowtab::FlowTable::map(&open(lb_common::maps::FLOWS)?, &open(lb_common::maps::FLOW_TAGS)?, &open(lb_common::maps::FLOW_COUNT)?)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

pub fn tables(pin_dir: &Path, ids: &[u32]) -> Result<Tables> {
    let table = flow_table(pin_dir)?;
    let (total, holding) = (table.len(), lb_userspace::gc::count_flows(&table));
    let conns = lb_userspace::conns::ConnCounters::map(&pinned(pin_dir, lb_common::maps::CONNS)?).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Tables { flows: total, holding, counters: ids.iter().map(|id| (*id, conns.get(*id))).collect() })
}
