//! Cluster-wide limits, the allocator: from every live node's report, the share of each
//! backend's `max_conns` each node is granted (Doorman's leased capacity, for connections).
//! Pure; `limits/` moves reports and grants through etcd and runs it on the elected node.
//!
//! **Never over the limit.** A node admits up to the share it enforces; open connections above
//! it (after a share shrank) only close. So from the moment a node reports `open` while
//! enforcing `applied`, it holds at most `max(open, applied)`; while a grant `g` is on its way
//! to it, at most `max(open, applied, g)`. That is what the allocator counts a node as
//! *holding*, and it grants only what the sum of holdings leaves free. Taking capacity from a
//! node is a smaller grant, which frees nothing until the node reports it applied it and its
//! open count fell (revoke before grant). A node has one grant in flight at most: the next is
//! written once its report acknowledges the last (`applied_seq`), so a node never applies a
//! stale grant after a newer one. A node whose lease is gone reports nothing and holds nothing.
//!
//! **Fair.** Demand is max-min shared out (water-filling), the capacity left is spread evenly
//! so a node has room for its next connections; only a node that is refusing for lack of share
//! is granted more, and capacity is revoked only for such a node, so an idle cluster's grants
//! do not churn.

use crate::key::BackendKey;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A backend's key in reports and grants: `service/address`.
pub fn key(service: &str, address: std::net::IpAddr) -> String {
    BackendKey::new(service, address).to_string()
}

/// One backend in a node's report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Demand {
    /// The backend's `max_conns` in this node's config.
    pub max_conns: u32,
    /// Open connections, counted after `applied` took effect.
    pub open: u64,
    /// The limit this node enforces.
    pub applied: u32,
    /// Connections this node would hold if it had the room (`open` plus what it refused).
    pub wants: u32,
    /// It refused new connections for lack of share since its last report.
    pub refusing: bool,
    /// Refusals per second at its limit (`share_exhausted` + `backend_limit`), and new
    /// connections admitted per second, since the last report.
    pub refused_per_s: f64,
    pub admitted_per_s: f64,
}

/// What a node publishes under its lease (`<prefix>/nodes/<node>`). Fields a version does not
/// know default (a rolling upgrade reads the other version's reports).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Report {
    pub node: String,
    /// The node's etcd lease (a grant is for one lease: a node that comes back is new).
    #[serde(default)]
    pub lease: i64,
    /// The grant this node enforces (its `seq`; 0: none yet).
    pub applied_seq: u64,
    /// It lost etcd for longer than its lease and enforces its safe shares.
    pub fallback: bool,
    pub backends: BTreeMap<String, Demand>,
}

/// What the allocator grants a node (`<prefix>/grants/<node>`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Grant {
    /// Bumped at every change; the node acknowledges it in `Report::applied_seq`.
    pub seq: u64,
    /// The node that wrote it (the allocator then).
    pub by: String,
    /// The lease of the node it is for.
    #[serde(default)]
    pub lease: i64,
    pub shares: BTreeMap<String, u32>,
    /// The cluster-wide `max_conns` each share was computed under (absent from a version
    /// before it: taken as the node's own).
    pub max_conns: BTreeMap<String, u32>,
}

impl Grant {
    /// The share of backend `key` for a node whose config says `max_conns`: `None` when the
    /// grant does not name it, 0 when it was computed under a larger `max_conns` (lowered
    /// since: the share belongs to the old limit, and the allocator's repair follows).
    pub fn share(&self, key: &str, max_conns: u32) -> Option<u32> {
        let share = *self.shares.get(key)?;
        Some(if self.max_conns.get(key).is_some_and(|under| *under > max_conns) { 0 } else { share })
    }
}

/// How many connections a node would hold with the room: its open ones plus the refused
/// ones, each kept as long as connections stay (Little's law: open / admitted per second).
pub fn wants(open: u64, refused_per_s: f64, admitted_per_s: f64) -> u32 {
    let lifetime_s = if admitted_per_s > 0.0 { (open as f64 / admitted_per_s).clamp(0.1, 60.0) } else { 1.0 };
    (open as f64 + (refused_per_s * lifetime_s).ceil()).min(f64::from(u32::MAX)) as u32
}

/// Max-min fair split of `capacity` over `wants`, then what is left spread evenly over the
/// nodes marked `more` (all if none is; the remainder to the first). Sums to `capacity`
/// exactly when there is at least one node.
pub fn fair(capacity: u64, wants: &[u64], more: &[bool]) -> Vec<u64> {
    let n = wants.len();
    let mut out = vec![0u64; n];
    if n == 0 {
        return out;
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|i| wants[*i]);
    let mut left = capacity;
    for (done, &i) in order.iter().enumerate() {
        let fair_part = left / (n - done) as u64;
        out[i] = wants[i].min(fair_part);
        left -= out[i];
    }
    let takers: Vec<usize> = if more.iter().any(|m| *m) { (0..n).filter(|i| more[*i]).collect() } else { (0..n).collect() };
    let each = left / takers.len() as u64;
    let extra = (left % takers.len() as u64) as usize;
    for (j, &i) in takers.iter().enumerate() {
        out[i] += each + u64::from(j < extra);
    }
    out
}

/// What one backend's nodes hold: see the module's comment.
fn held(d: Option<&Demand>, granted: u32) -> u64 {
    let (open, applied) = d.map_or((0, 0), |d| (d.open, d.applied));
    open.max(u64::from(applied)).max(u64::from(granted))
}

/// What a node may hold per backend at most, `max(open, applied)`, kept in etcd without a lease
/// (`<prefix>/holds/<node>`): when the node's lease is gone, the allocator reserves it (see
/// `limits/` for how long).
pub type Holds = BTreeMap<String, u64>;

/// The grants to write: for each live node whose grant changes, its next one. `reports` are
/// the live nodes' (their leases hold), `grants` what etcd holds now (those of nodes gone are
/// ignored), `reserved` what nodes whose lease is gone may still hold (counted as held).
///
/// **Repair.** When a backend's holdings sum over its capacity (flows adopted from another
/// node, a partition that healed, a lowered `max_conns`, a node back with old connections),
/// every node's grant for it falls to 0: no node admits, not even to replace what closes, so
/// once the revokes are applied the backend's count only falls, and once under the limit it
/// stays under. Grants resume, from what is free, when the holdings are under the capacity.
#[expect(clippy::many_single_char_names, reason = "the allocator's arithmetic: n(ode), d(emand), g(rant), h(eld), x (the new grant)")]
pub fn allocate(reports: &BTreeMap<String, Report>, grants: &BTreeMap<String, Grant>, reserved: &BTreeMap<String, Holds>, by: &str) -> BTreeMap<String, Grant> {
    let granted = |node: &str, k: &str| grants.get(node).and_then(|g| g.shares.get(k)).copied().unwrap_or(0);
    let in_flight = |node: &str| grants.get(node).is_some_and(|g| g.seq > reports.get(node).map_or(0, |r| r.applied_seq));
    let mut next: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
    let mut under: BTreeMap<&String, u32> = BTreeMap::new();
    let keys: std::collections::BTreeSet<&String> = reports.values().flat_map(|r| r.backends.keys()).collect();
    for k in keys {
        // Nodes that have the backend; the smallest max_conns is the limit (configs are
        // changed one node after the other).
        let nodes: Vec<(&String, &Demand)> = reports.iter().filter_map(|(n, r)| Some((n, r.backends.get(k)?))).collect();
        let max_conns = nodes.iter().map(|(_, d)| d.max_conns).min().unwrap_or(0);
        under.insert(k, max_conns);
        let capacity = u64::from(max_conns);
        // Live nodes that still hold a grant for it though their config lost it count too.
        let holding: u64 = reports.iter().map(|(n, r)| held(r.backends.get(k), granted(n, k))).fold(0, u64::saturating_add);
        let reserving: u64 = reserved.iter().filter(|(n, _)| !reports.contains_key(*n)).filter_map(|(_, h)| h.get(k)).fold(0, |a, b| a.saturating_add(*b));
        let holding = holding.saturating_add(reserving);
        // What the nodes gone may hold is not theirs to share out again.
        let capacity_live = capacity.saturating_sub(reserving);
        let mut free = capacity.saturating_sub(holding);
        if holding > capacity {
            for (n, d) in &nodes {
                // What it may admit up to: its grant, or what it enforces without one (a node
                // back with a new lease enforces its old or safe share, and has no grant yet).
                // Nothing while over: a node left room under its open count would replace
                // what closes, and with another node's old connections still draining the
                // backend, once under the limit, would go over it again.
                let cur = granted(n, k).max(d.applied);
                if cur > 0 && !in_flight(n) {
                    next.entry((*n).clone()).or_default().insert(k.clone(), 0);
                }
            }
            continue;
        }
        let wanted: Vec<u64> = nodes.iter().map(|(_, d)| u64::from(d.wants)).collect();
        let refusing: Vec<bool> = nodes.iter().map(|(_, d)| d.refusing).collect();
        let targets = fair(capacity_live, &wanted, &refusing);
        let mut needy: Vec<(usize, u64)> = Vec::new();
        for (i, (n, d)) in nodes.iter().enumerate() {
            let g = u64::from(granted(n, k));
            if d.refusing && targets[i] > g && !in_flight(n) {
                needy.push((i, targets[i] - g));
            }
        }
        if needy.is_empty() {
            continue;
        }
        needy.sort_by_key(|(i, deficit)| (std::cmp::Reverse(*deficit), *i));
        let mut unmet = false;
        for (i, _) in &needy {
            let (n, d) = nodes[*i];
            let g = granted(n, k);
            let h = held(Some(d), g);
            // Raising the grant to x raises the holding by max(0, x - h).
            let x = targets[*i].min(h + free);
            if x > u64::from(g) {
                free -= x.saturating_sub(h);
                next.entry(n.clone()).or_default().insert(k.clone(), x as u32);
            }
            unmet |= x < targets[*i];
        }
        // What is still free goes to the nodes refusing (no capacity idles while one refuses).
        if free > 0 {
            let takers: Vec<usize> = needy.iter().map(|(i, _)| *i).collect();
            for (j, i) in takers.iter().enumerate() {
                let part = free / (takers.len() - j) as u64;
                if part == 0 {
                    continue;
                }
                let (n, d) = nodes[*i];
                let g = next.get(n.as_str()).and_then(|m| m.get(k)).copied().unwrap_or_else(|| granted(n, k));
                let h = held(Some(d), g);
                let x = u64::from(g).max(h) + part;
                free -= x - u64::from(g).max(h);
                next.entry(n.clone()).or_default().insert(k.clone(), x as u32);
            }
        }
        if unmet {
            // Revoke from the nodes above their fair part; it is free once they say so.
            for (i, (n, _)) in nodes.iter().enumerate() {
                let g = u64::from(granted(n, k));
                if g > targets[i] && !in_flight(n) {
                    next.entry((*n).clone()).or_default().insert(k.clone(), targets[i] as u32);
                }
            }
        }
    }
    next.into_iter()
        .map(|(n, changes)| {
            let old = grants.get(&n).cloned().unwrap_or_default();
            let mut shares = old.shares.clone();
            // Backends no live config has any more are dropped from the grant.
            shares.retain(|k, _| reports.values().any(|r| r.backends.contains_key(k)));
            let mut max_conns = old.max_conns.clone();
            max_conns.retain(|k, _| shares.contains_key(k));
            for k in changes.keys() {
                if let Some(m) = under.get(k) {
                    max_conns.insert(k.clone(), *m);
                }
            }
            shares.extend(changes);
            (n, Grant { seq: old.seq.saturating_add(1), by: by.to_owned(), lease: old.lease, shares, max_conns })
        })
        .collect()
}

#[cfg(test)]
mod tests;
