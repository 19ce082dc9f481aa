//! The allocator's unit tests and its randomised simulations.

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
    /// The `max_conns` in its config, and the one its grant was computed under.
    max_conns: u32,
    granted_under: u32,
}

impl Node {
    /// What its datapath enforces (`Applied::limit_of`): nothing on a share granted under a
    /// larger `max_conns` than its config's.
    fn enforced(&self) -> u32 {
        if self.granted_under > self.max_conns {
            0
        } else {
            self.limit.min(self.max_conns)
        }
    }
}

/// Three nodes and one backend: connections open and close, reports and grants travel with
/// random delays, the allocator runs now and then on what it has.
struct Sim {
    rng: StdRng,
    names: Vec<String>,
    nodes: BTreeMap<String, Node>,
    published: BTreeMap<String, Report>,
    grants: BTreeMap<String, Grant>,
    /// Grants written but not yet seen by their node: (deliver at step, node, grant).
    wire: Vec<(u32, String, Grant)>,
}

const KEY: &str = "web/10.0.0.1";

impl Sim {
    fn new(seed: u64, max_conns: u32) -> Self {
        let names: Vec<String> = (1..=3).map(|i| format!("n{i}")).collect();
        let nodes = names.iter().map(|n| (n.clone(), Node { alive: true, max_conns, ..Node::default() })).collect();
        Self { rng: StdRng::seed_from_u64(seed), names, nodes, published: BTreeMap::new(), grants: BTreeMap::new(), wire: Vec::new() }
    }

    /// One step: arrivals (most at `hot`) admitted under each node's limit, closes (a
    /// connection lasts ~25 steps), grants delivered, reports sent, the allocator run.
    /// Returns the open connections over the live nodes after the traffic.
    fn step(&mut self, step: u32, hot: &str) -> u64 {
        for (name, n) in self.nodes.iter_mut().filter(|(_, n)| n.alive) {
            let arrivals = if name == hot { self.rng.random_range(0..6) } else { self.rng.random_range(0..2) };
            for _ in 0..arrivals {
                if n.open < u64::from(n.enforced()) {
                    n.open += 1;
                    n.admitted += 1;
                } else {
                    n.refused += 1;
                }
            }
            let closing = (0..n.open).filter(|_| self.rng.random_bool(0.04)).count() as u64;
            n.open -= closing;
        }
        let total = self.nodes.values().filter(|n| n.alive).map(|n| n.open).sum();
        // Grants arrive: the node applies the newest, then reports at once.
        let mut arrived: Vec<(String, Grant)> = Vec::new();
        self.wire.retain(|(at, n, g)| {
            if *at <= step {
                arrived.push((n.clone(), g.clone()));
                false
            } else {
                true
            }
        });
        for (name, g) in arrived {
            let n = self.nodes.get_mut(&name).expect("node");
            if n.alive && g.seq > n.applied_seq && self.grants.get(&name).is_some_and(|cur| cur.seq == g.seq) {
                n.limit = g.shares.get(KEY).copied().unwrap_or(0);
                n.granted_under = g.max_conns.get(KEY).copied().unwrap_or(n.max_conns);
                n.applied_seq = g.seq;
            }
        }
        // Reports go out now and then (stale in between).
        for (name, n) in self.nodes.iter_mut().filter(|(_, n)| n.alive) {
            if self.rng.random_bool(0.2) {
                let d = Demand {
                    max_conns: n.max_conns,
                    open: n.open,
                    applied: n.enforced(),
                    wants: wants(n.open, n.refused as f64, n.admitted as f64),
                    refusing: n.refused > 0,
                    refused_per_s: n.refused as f64,
                    admitted_per_s: n.admitted as f64,
                };
                let r = Report { node: name.clone(), lease: 0, applied_seq: n.applied_seq, fallback: false, backends: [(KEY.to_owned(), d)].into() };
                self.published.insert(name.clone(), r);
                n.refused = 0;
                n.admitted = 0;
            }
        }
        if self.rng.random_bool(0.3) {
            for (name, g) in allocate(&self.published, &self.grants, &BTreeMap::new(), "n1") {
                self.wire.push((step + self.rng.random_range(0..8), name.clone(), g.clone()));
                self.grants.insert(name, g);
            }
        }
        total
    }
}

/// Nodes open and close connections under skewed, moving demand while reports and grants
/// travel with random delays (and a node dies and comes back): the sum of open connections
/// never exceeds the limit, and with demand above it the cluster fills it.
#[test]
fn never_over_the_limit_while_shares_move() {
    for seed in 0..40u64 {
        let cap = 60u32;
        let mut sim = Sim::new(seed, cap);
        // Open connections summed over the steps counted, and the most in each phase.
        let (mut sum_open, mut counted_steps) = (0u64, 0u64);
        let mut peak = [0u64; 6];
        for step in 0..3000u32 {
            // Demand moves every 500 steps: one node gets most new connections.
            let hot = sim.names[(step / 500) as usize % 3].clone();
            if step == 1200 {
                sim.nodes.get_mut("n2").expect("n2").alive = false; // its lease expires
                sim.published.remove("n2");
            }
            if step == 1500 {
                // It comes back (its connections went with it) and joins with no share.
                sim.nodes.insert("n2".into(), Node { alive: true, max_conns: cap, ..Node::default() });
                sim.grants.remove("n2");
            }
            let total = sim.step(step, &hot);
            assert!(total <= u64::from(cap), "seed {seed} step {step}: {total} open over {cap}");
            // Away from the changes (a phase lasts 500 steps; n2 is gone 1200..1500).
            if step % 500 > 150 && !(1200..1700).contains(&step) {
                counted_steps += 1;
                sum_open += total;
            }
            let phase = (step / 500) as usize;
            peak[phase] = peak[phase].max(total);
        }
        let mean = sum_open as f64 / counted_steps as f64;
        eprintln!("seed {seed}: mean {mean:.1} of {cap}, peaks {peak:?}");
        assert!(mean > 0.75 * f64::from(cap), "seed {seed}: {mean:.1} open on average, of {cap}");
        assert!(peak.iter().all(|p| *p >= u64::from(cap) * 90 / 100), "seed {seed}: the most open in each phase: {peak:?}");
    }
}

/// `max_conns` halved on each node in turn while the cluster holds the old limit and
/// connections churn (the lab's step, seen failing in CI): once the backend is under the
/// new limit it stays under, and the cluster fills the new limit again.
#[test]
fn a_lowered_limit_once_reached_holds() {
    for seed in 0..40u64 {
        let (cap, lowered) = (60u32, 30u32);
        let mut sim = Sim::new(seed, cap);
        let (mut under_at, mut peak_after) = (None, 0u64);
        for step in 0..1600u32 {
            let hot = sim.names[(step / 300) as usize % 3].clone();
            // The nodes' configs change one after the other, a few steps apart.
            for (i, name) in sim.names.clone().iter().enumerate() {
                if step == 600 + 5 * i as u32 {
                    sim.nodes.get_mut(name).expect("node").max_conns = lowered;
                }
            }
            let total = sim.step(step, &hot);
            if step < 600 {
                assert!(total <= u64::from(cap), "seed {seed} step {step}: {total} open over {cap}");
                continue;
            }
            if under_at.is_none() && total <= u64::from(lowered) {
                under_at = Some(step);
            }
            if under_at.is_some() {
                assert!(total <= u64::from(lowered), "seed {seed} step {step}: {total} open over {lowered}, under it since step {under_at:?}");
                peak_after = peak_after.max(total);
            }
        }
        let under_at = under_at.expect("repaired");
        eprintln!("seed {seed}: under {lowered} at step {under_at}, then at most {peak_after}");
        assert!(under_at < 600 + 150, "seed {seed}: under the new limit only at step {under_at}");
        assert!(peak_after >= u64::from(lowered) * 90 / 100, "seed {seed}: at most {peak_after} after the repair, of {lowered}");
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
    let grants: BTreeMap<String, Grant> =
        [("a".to_owned(), Grant { seq: 2, by: "a".into(), shares: [("k".to_owned(), 8)].into(), ..Grant::default() }), ("b".to_owned(), Grant::default())].into();
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
    Grant { seq, by: "a".into(), shares: [("k".to_owned(), share)].into(), ..Grant::default() }
}

/// `max_conns` lowered from 20 to 10 while each node holds 20: every grant falls to 0 (no
/// node admits, not even to replace what closes), and nothing is granted until the sum is
/// under again; then grants resume from what is free, under the new `max_conns`.
#[test]
fn an_over_committed_backend_is_repaired_by_revoking() {
    let reports: BTreeMap<String, Report> = [("a".to_owned(), node(20, 20, 10, true, 1)), ("b".to_owned(), node(20, 20, 10, false, 1))].into();
    let grants: BTreeMap<String, Grant> = [("a".to_owned(), grant(1, 20)), ("b".to_owned(), grant(1, 20))].into();
    let next = allocate(&reports, &grants, &BTreeMap::new(), "a");
    assert_eq!(next["a"].shares["k"], 0, "{next:?}");
    assert_eq!(next["b"].shares["k"], 0, "{next:?}");
    assert_eq!(next["a"].max_conns["k"], 10, "computed under the new max_conns: {next:?}");
    // Applied; connections close, but the sum (4 + 9) is still over 10: nothing is granted.
    let reports: BTreeMap<String, Report> = [("a".to_owned(), node(4, 0, 10, true, 2)), ("b".to_owned(), node(9, 0, 10, false, 2))].into();
    let grants: BTreeMap<String, Grant> = [("a".to_owned(), grant(2, 0)), ("b".to_owned(), grant(2, 0))].into();
    assert!(allocate(&reports, &grants, &BTreeMap::new(), "a").is_empty());
    // Under again (4 + 5 ≤ 10): a, refusing, is granted what is free (it holds 4, 1 is free).
    let reports: BTreeMap<String, Report> = [("a".to_owned(), node(4, 0, 10, true, 2)), ("b".to_owned(), node(5, 0, 10, false, 2))].into();
    let next = allocate(&reports, &grants, &BTreeMap::new(), "a");
    assert_eq!(next["a"].shares["k"], 5, "{next:?}");
    assert!(!next.contains_key("b"), "{next:?}");
}

/// A node back with a new lease has no grant yet but enforces the share it had (or its safe
/// share): repair lowers it too, or it would go on admitting while the sum is over.
#[test]
fn repair_reaches_a_node_without_a_grant() {
    let reports: BTreeMap<String, Report> = [("a".to_owned(), node(12, 12, 20, false, 1)), ("b".to_owned(), node(8, 10, 20, false, 0))].into();
    let grants: BTreeMap<String, Grant> = [("a".to_owned(), grant(1, 12))].into();
    // a holds 12, b enforces 10 without a grant: 22 over 20.
    let next = allocate(&reports, &grants, &BTreeMap::new(), "a");
    assert_eq!(next.get("b").map(|g| g.shares["k"]), Some(0), "{next:?}");
    assert_eq!(next.get("a").map(|g| g.shares["k"]), Some(0), "{next:?}");
}

/// A share computed under a larger `max_conns` than the node's config (a grant on its way
/// while the limit was lowered) is not applied: 0 until a grant under the new limit.
#[test]
fn a_share_from_before_a_lowered_limit_admits_nothing() {
    let g = Grant { shares: [("k".to_owned(), 20), ("old".to_owned(), 7)].into(), max_conns: [("k".to_owned(), 60)].into(), ..Grant::default() };
    assert_eq!(g.share("k", 30), Some(0));
    assert_eq!(g.share("k", 60), Some(20));
    assert_eq!(g.share("k", 90), Some(20), "raised since: the share stands");
    assert_eq!(g.share("old", 30), Some(7), "from a version that did not say: the node's own");
    assert_eq!(g.share("none", 30), None);
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
