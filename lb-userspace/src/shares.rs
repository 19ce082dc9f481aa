//! Cluster-wide limits, the allocator: from every live node's report, the share of each
//! backend's `max_conns` each node is granted (Doorman's leased capacity, for connections).
//! Pure; `limits.rs` moves reports and grants through etcd and runs it on the elected node.
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

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A backend's key in reports and grants: `service/address`.
pub fn key(service: &str, address: std::net::IpAddr) -> String {
    format!("{service}/{address}")
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
/// `limits.rs` for how long).
pub type Holds = BTreeMap<String, u64>;

/// The grants to write: for each live node whose grant changes, its next one. `reports` are
/// the live nodes' (their leases hold), `grants` what etcd holds now (those of nodes gone are
/// ignored), `reserved` what nodes whose lease is gone may still hold (counted as held).
///
/// **Repair.** When a backend's holdings sum over its capacity (flows adopted from another
/// node, a partition that healed, a lowered `max_conns`, a node back with old connections),
/// nothing is granted for it and every node's grant falls to the smaller of its fair part and
/// what it holds open: no node admits until its open connections fall below that, so the sum
/// only falls, and grants resume once it is under.
#[expect(clippy::many_single_char_names, reason = "the allocator's arithmetic: n(ode), d(emand), g(rant), h(eld), x (the new grant)")]
pub fn allocate(reports: &BTreeMap<String, Report>, grants: &BTreeMap<String, Grant>, reserved: &BTreeMap<String, Holds>, by: &str) -> BTreeMap<String, Grant> {
    let granted = |node: &str, k: &str| grants.get(node).and_then(|g| g.shares.get(k)).copied().unwrap_or(0);
    let in_flight = |node: &str| grants.get(node).is_some_and(|g| g.seq > reports.get(node).map_or(0, |r| r.applied_seq));
    let mut next: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
    let keys: std::collections::BTreeSet<&String> = reports.values().flat_map(|r| r.backends.keys()).collect();
    for k in keys {
        // Nodes that have the backend; the smallest max_conns is the limit (configs are
        // changed one node after the other).
        let nodes: Vec<(&String, &Demand)> = reports.iter().filter_map(|(n, r)| Some((n, r.backends.get(k)?))).collect();
        let capacity = u64::from(nodes.iter().map(|(_, d)| d.max_conns).min().unwrap_or(0));
        // Live nodes that still hold a grant for it though their config lost it count too.
        let holding: u64 = reports.iter().map(|(n, r)| held(r.backends.get(k), granted(n, k))).fold(0, u64::saturating_add);
        let reserving: u64 = reserved.iter().filter(|(n, _)| !reports.contains_key(*n)).filter_map(|(_, h)| h.get(k)).fold(0, |a, b| a.saturating_add(*b));
        let holding = holding.saturating_add(reserving);
        // What the nodes gone may hold is not theirs to share out again.
        let capacity_live = capacity.saturating_sub(reserving);
        let mut free = capacity.saturating_sub(holding);
        let wanted: Vec<u64> = nodes.iter().map(|(_, d)| u64::from(d.wants)).collect();
        let refusing: Vec<bool> = nodes.iter().map(|(_, d)| d.refusing).collect();
        let targets = fair(capacity_live, &wanted, &refusing);
        if holding > capacity {
            for (i, (n, d)) in nodes.iter().enumerate() {
                // What it may admit up to: its grant, or what it enforces without one (a node
                // back with a new lease enforces its old or safe share, and has no grant yet).
                let cur = granted(n, k).max(d.applied);
                let x = u64::from(cur).min(d.open).min(targets[i]) as u32;
                if x < cur && !in_flight(n) {
                    next.entry((*n).clone()).or_default().insert(k.clone(), x);
                }
            }
            continue;
        }
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
            shares.extend(changes);
            (n, Grant { seq: old.seq.saturating_add(1), by: by.to_owned(), lease: old.lease, shares })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng as _, SeedableRng as _};

    #[test]
    fn fair_is_max_min_and_spends_everything() {
        let none = [false; 3];
        assert_eq!(fair(60, &[100, 10, 10], &none), vec![40, 10, 10]);
        assert_eq!(fair(60, &[100, 100, 100], &none), vec![20, 20, 20]);
        assert_eq!(fair(60, &[5, 5, 5], &none), vec![20, 20, 20]);
        assert_eq!(fair(61, &[5, 5, 5], &none), vec![21, 20, 20]);
        assert_eq!(fair(60, &[0, 0], &[false; 2]), vec![30, 30]);
        assert_eq!(fair(7, &[100, 1, 100], &none), vec![3, 1, 3]);
        assert!(fair(5, &[], &[]).is_empty());
        // What the others leave goes to the nodes short of room.
        assert_eq!(fair(60, &[30, 10, 5], &[true, false, false]), vec![45, 10, 5]);
    }

    #[test]
    fn wants_counts_what_was_refused_for_as_long_as_connections_last() {
        assert_eq!(wants(20, 0.0, 10.0), 20);
        // 20 open at 10/s: each lasts ~2 s; 5 refused per second would hold 10 more.
        assert_eq!(wants(20, 5.0, 10.0), 30);
        assert_eq!(wants(0, 3.0, 0.0), 3);
    }

    /// One simulated node: what it enforces, holds, and last told the allocator.
    #[derive(Default)]
    struct Node {
        limit: u32,
        applied_seq: u64,
        open: u64,
        refused: u64,
        admitted: u64,
        alive: bool,
    }

    /// Nodes open and close connections under skewed, moving demand while reports and grants
    /// travel with random delays (and a node dies and comes back): the sum of open connections
    /// never exceeds the limit, and with demand above it the cluster fills it.
    #[test]
    fn never_over_the_limit_while_shares_move() {
        for seed in 0..40u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let cap = 60u32;
            let names: Vec<String> = (1..=3).map(|i| format!("n{i}")).collect();
            let mut nodes: BTreeMap<String, Node> = names.iter().map(|n| (n.clone(), Node { alive: true, ..Node::default() })).collect();
            let mut published: BTreeMap<String, Report> = BTreeMap::new();
            let mut grants: BTreeMap<String, Grant> = BTreeMap::new();
            // Grants written but not yet seen by their node: (deliver at step, node, grant).
            let mut wire: Vec<(u32, String, Grant)> = Vec::new();
            // Open connections summed over the steps counted, and the most in each phase.
            let (mut sum_open, mut counted_steps) = (0u64, 0u64);
            let mut peak = [0u64; 6];
            for step in 0..3000u32 {
                // Demand moves every 500 steps: one node gets most new connections.
                let hot = &names[(step / 500) as usize % 3];
                if step == 1200 {
                    nodes.get_mut("n2").expect("n2").alive = false; // its lease expires
                    published.remove("n2");
                }
                if step == 1500 {
                    // It comes back (its connections went with it) and joins with no share.
                    let n = nodes.get_mut("n2").expect("n2");
                    *n = Node { alive: true, ..Node::default() };
                    grants.remove("n2");
                }
                for (name, n) in nodes.iter_mut().filter(|(_, n)| n.alive) {
                    let arrivals = if name == hot { rng.random_range(0..6) } else { rng.random_range(0..2) };
                    for _ in 0..arrivals {
                        if n.open < u64::from(n.limit) {
                            n.open += 1;
                            n.admitted += 1;
                        } else {
                            n.refused += 1;
                        }
                    }
                    // Each connection lasts ~25 steps.
                    let closing = (0..n.open).filter(|_| rng.random_bool(0.04)).count() as u64;
                    n.open -= closing;
                }
                let total: u64 = nodes.values().filter(|n| n.alive).map(|n| n.open).sum();
                assert!(total <= u64::from(cap), "seed {seed} step {step}: {total} open over {cap}");
                // Away from the changes (a phase lasts 500 steps; n2 is gone 1200..1500).
                if step % 500 > 150 && !(1200..1700).contains(&step) {
                    counted_steps += 1;
                    sum_open += total;
                }
                let phase = (step / 500) as usize;
                peak[phase] = peak[phase].max(total);
                // Grants arrive: the node applies the newest, then reports at once.
                let mut arrived: Vec<(String, Grant)> = Vec::new();
                wire.retain(|(at, n, g)| {
                    if *at <= step {
                        arrived.push((n.clone(), g.clone()));
                        false
                    } else {
                        true
                    }
                });
                for (name, g) in arrived {
                    let n = nodes.get_mut(&name).expect("node");
                    if n.alive && g.seq > n.applied_seq && grants.get(&name).is_some_and(|cur| cur.seq == g.seq) {
                        n.limit = g.shares.get("web/10.0.0.1").copied().unwrap_or(0);
                        n.applied_seq = g.seq;
                    }
                }
                // Reports go out now and then (stale in between).
                for (name, n) in nodes.iter_mut().filter(|(_, n)| n.alive) {
                    if rng.random_bool(0.2) {
                        let d = Demand {
                            max_conns: cap,
                            open: n.open,
                            applied: n.limit,
                            wants: wants(n.open, n.refused as f64, n.admitted as f64),
                            refusing: n.refused > 0,
                            refused_per_s: n.refused as f64,
                            admitted_per_s: n.admitted as f64,
                        };
                        published.insert(
                            name.clone(),
                            Report { node: name.clone(), lease: 0, applied_seq: n.applied_seq, fallback: false, backends: [("web/10.0.0.1".to_owned(), d)].into() },
                        );
                        n.refused = 0;
                        n.admitted = 0;
                    }
                }
                // The allocator runs now and then, on what it has.
                if rng.random_bool(0.3) {
                    for (name, g) in allocate(&published, &grants, &BTreeMap::new(), "n1") {
                        wire.push((step + rng.random_range(0..8), name.clone(), g.clone()));
                        grants.insert(name, g);
                    }
                }
            }
            let mean = sum_open as f64 / counted_steps as f64;
            eprintln!("seed {seed}: mean {mean:.1} of {cap}, peaks {peak:?}");
            assert!(mean > 0.75 * f64::from(cap), "seed {seed}: {mean:.1} open on average, of {cap}");
            assert!(peak.iter().all(|p| *p >= u64::from(cap) * 90 / 100), "seed {seed}: the most open in each phase: {peak:?}");
        }
    }

    #[test]
    fn a_node_with_a_grant_in_flight_gets_no_other() {
        let d = |open, applied, refusing| Demand { max_conns: 10, open, applied, wants: 10, refusing, ..Demand::default() };
        let reports: BTreeMap<String, Report> = [
            ("a".to_owned(), Report { node: "a".into(), applied_seq: 1, backends: [("k".to_owned(), d(2, 5, true))].into(), ..Report::default() }),
            ("b".to_owned(), Report { node: "b".into(), applied_seq: 0, backends: [("k".to_owned(), d(0, 0, true))].into(), ..Report::default() }),
        ]
        .into();
        let grants: BTreeMap<String, Grant> = [
            ("a".to_owned(), Grant { seq: 2, by: "a".into(), lease: 0, shares: [("k".to_owned(), 8)].into() }),
            ("b".to_owned(), Grant { seq: 0, by: String::new(), lease: 0, shares: BTreeMap::new() }),
        ]
        .into();
        let next = allocate(&reports, &grants, &BTreeMap::new(), "a");
        assert!(!next.contains_key("a"), "a has grant 2 in flight");
        // a holds max(2, 5, 8) = 8: b may have 2.
        assert_eq!(next["b"].shares["k"], 2);
        assert_eq!(next["b"].seq, 1);
    }

    fn node(open: u64, applied: u32, max_conns: u32, refusing: bool, seq: u64) -> Report {
        let d = Demand { max_conns, open, applied, wants: if refusing { max_conns } else { open as u32 }, refusing, ..Demand::default() };
        Report { node: String::new(), applied_seq: seq, backends: [("k".to_owned(), d)].into(), ..Report::default() }
    }

    fn grant(seq: u64, share: u32) -> Grant {
        Grant { seq, by: "a".into(), lease: 0, shares: [("k".to_owned(), share)].into() }
    }

    /// `max_conns` lowered from 20 to 10 while each node holds 20: every grant falls to its fair
    /// part (below what it holds, so nothing is admitted), and nothing is granted until the sum
    /// is under again; then grants resume.
    #[test]
    fn an_over_committed_backend_is_repaired_by_revoking() {
        let reports: BTreeMap<String, Report> = [("a".to_owned(), node(20, 20, 10, true, 1)), ("b".to_owned(), node(20, 20, 10, false, 1))].into();
        let grants: BTreeMap<String, Grant> = [("a".to_owned(), grant(1, 20)), ("b".to_owned(), grant(1, 20))].into();
        let next = allocate(&reports, &grants, &BTreeMap::new(), "a");
        assert_eq!(next["a"].shares["k"], 5, "{next:?}");
        assert_eq!(next["b"].shares["k"], 5, "{next:?}");
        // Applied; connections close, but the sum (4 + 9) is still over 10: no grant rises, and
        // a grant above what its node holds open falls to it.
        let reports: BTreeMap<String, Report> = [("a".to_owned(), node(4, 5, 10, true, 2)), ("b".to_owned(), node(9, 5, 10, false, 2))].into();
        let grants: BTreeMap<String, Grant> = [("a".to_owned(), grant(2, 5)), ("b".to_owned(), grant(2, 5))].into();
        let next = allocate(&reports, &grants, &BTreeMap::new(), "a");
        assert_eq!(next.get("a").map(|g| g.shares["k"]), Some(4), "{next:?}");
        assert!(!next.contains_key("b"), "b is above its fair part already: {next:?}");
        // Under again (4 + 5 ≤ 10): a, refusing, is granted what is free.
        let reports: BTreeMap<String, Report> = [("a".to_owned(), node(4, 4, 10, true, 3)), ("b".to_owned(), node(5, 5, 10, false, 2))].into();
        let grants: BTreeMap<String, Grant> = [("a".to_owned(), grant(3, 4)), ("b".to_owned(), grant(2, 5))].into();
        let next = allocate(&reports, &grants, &BTreeMap::new(), "a");
        assert_eq!(next["a"].shares["k"], 5, "{next:?}");
    }

    /// A node back with a new lease has no grant yet but enforces the share it had (or its safe
    /// share): repair lowers it too, or it would go on admitting while the sum is over.
    #[test]
    fn repair_reaches_a_node_without_a_grant() {
        let reports: BTreeMap<String, Report> = [("a".to_owned(), node(12, 12, 20, false, 1)), ("b".to_owned(), node(8, 10, 20, false, 0))].into();
        let grants: BTreeMap<String, Grant> = [("a".to_owned(), grant(1, 12))].into();
        // a holds 12, b enforces 10 without a grant: 22 over 20.
        let next = allocate(&reports, &grants, &BTreeMap::new(), "a");
        assert_eq!(next.get("b").map(|g| g.shares["k"]), Some(8), "{next:?}");
        // Fair parts over the demands (12, 8): a keeps its 12.
        assert!(!next.contains_key("a"), "{next:?}");
    }

    /// A node whose lease is gone (cut off from etcd, still serving) keeps what it may hold: the
    /// live nodes are granted only the rest.
    #[test]
    fn what_a_node_gone_may_hold_is_not_granted_again() {
        let reports: BTreeMap<String, Report> = [("a".to_owned(), node(10, 10, 20, true, 1))].into();
        let grants: BTreeMap<String, Grant> = [("a".to_owned(), grant(1, 10)), ("b".to_owned(), grant(4, 10))].into();
        let reserved: BTreeMap<String, Holds> = [("b".to_owned(), [("k".to_owned(), 10)].into())].into();
        assert!(allocate(&reports, &grants, &reserved, "a").is_empty(), "b may hold 10 of 20: a keeps 10");
        // Released (back, forgotten, or fenced for long enough): a may have it all.
        assert_eq!(allocate(&reports, &grants, &BTreeMap::new(), "a")["a"].shares["k"], 20);
        // A node that is live again counts by its report, not its reservation.
        let mut back = reports.clone();
        back.insert("b".to_owned(), node(2, 0, 20, false, 0));
        let next = allocate(&back, &BTreeMap::new(), &reserved, "a");
        assert!(next["a"].shares["k"] >= 10 && next["a"].shares["k"] <= 18, "{next:?}");
    }
}
