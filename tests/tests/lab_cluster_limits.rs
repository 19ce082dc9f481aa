//! One limit for the whole cluster (`sluice_lab::limits`, also `sluice lab cluster
//! --limits`): three nodes behind a router running real BIRD, a backend whose `max_conns` (60)
//! is cluster-wide, shares leased through a real etcd started in the router's namespace. The
//! skew moves between the nodes, a daemon restarts, a node fails, etcd stops and comes back, a
//! node is cut off from etcd by nftables and comes back, a node is drained and undrained under
//! load (its flows move to the others), `max_conns` is halved under load.
//! The truth is taken at the backend (its established sockets, every 100 ms) as well as from
//! every daemon's counters: neither may ever exceed the limit. Run with the example config's
//! `spill = true` (once a deadlock at a share of 0) and, shorter, with `spill = false`.
//!
//! How fast each step got there is a figure (printed; `cargo xtask bench limits` records it),
//! not asserted here; that it got there is.

use lb_userspace::config::Mode;
use sluice_lab::limits::{self, Options};
use sluice_tests::labs::{assert_checks_but_timings, down_and_check, lab};

fn run(opts: &Options) -> limits::Report {
    let lab = lab(1, 3, Mode::L2dsr);
    let report = limits::run(&lab, opts);
    down_and_check(lab);
    let report = report.expect("cluster limits run");
    println!("{}", sluice_lab::report::Verdict::markdown(&report));
    let mut timed: Vec<String> = (1..=3).map(|k| format!("skew: most new connections to n{k}: 95 % of the limit within 5 s")).collect();
    timed.extend(
        [
            "cut off from etcd while its peers reach it, a node fences itself",
            "etcd reachable again: n1 admits again and the cluster fills 95 % within 5 s",
            "max_conns lowered: repaired (the backend under the new limit) within the connections' hold time + 2 s",
        ]
        .map(String::from),
    );
    if !opts.short {
        timed.extend(["a failed node's share is used again within 3 × its lease TTL + 1 s", "etcd back: the shares rebalance (95 % of the limit within 5 s)"].map(String::from));
    }
    assert_checks_but_timings(&report, &timed.iter().map(String::as_str).collect::<Vec<_>>());
    // What the timed checks time happened, however long it took.
    for s in report.steps.iter().filter(|s| s.target > 0) {
        assert!(s.reached_ms.is_some(), "{}: never reached {} open", s.what, s.target);
    }
    let step = |p: &str| report.steps.iter().find(|s| s.what.starts_with(p)).unwrap_or_else(|| panic!("no step {p:?}"));
    assert!(step("n1 cut off from etcd").detail.contains("fenced itself after Some("), "n1 never fenced itself: {}", step("n1 cut off").detail);
    assert!(step("max_conns").repaired_ms.is_some(), "the lowered limit was never repaired: {}", step("max_conns").detail);
    assert!(report.max_sum <= 60 && report.backend_max <= 60, "at most {} over the nodes, {} at the backend", report.max_sum, report.backend_max);
    // The demand exceeded the limit, so refusals happened, and the sampler saw the backend fill.
    let refused: u64 = report.clients.values().map(|c| c.1).sum();
    assert!(refused >= 10, "demand above the limit was refused: {refused} refusals");
    assert!(report.backend_max >= 57, "the backend held at most {} of 60: the cluster never filled", report.backend_max);
    report
}

#[test]
fn one_limit_for_the_whole_cluster_is_never_exceeded_with_spill_under_every_fault() {
    let report = run(&Options::default());
    assert_eq!(report.steps.len(), 12, "every step ran");
}

#[test]
fn one_limit_for_the_whole_cluster_without_spill_fills_fences_and_repairs() {
    let report = run(&Options { spill: false, short: true, ..Options::default() });
    assert_eq!(report.steps.len(), 8, "every step ran");
}
