//! One limit for the whole cluster (`sluice_lab::limits`, also `sluice lab cluster
//! --limits`): three nodes behind a router running real BIRD, a backend whose `max_conns` (60)
//! is cluster-wide, shares leased through a real etcd started in the router's namespace. The
//! skew moves between the nodes, a daemon restarts, a node fails, etcd stops and comes back.
//! The open connections summed over the nodes, sampled every 100 ms from every daemon's
//! counters, must never exceed 60; the cluster must fill 95 % of it within 5 s of each change of
//! skew; a failed node's share must be used again within its lease TTL + 1 s; without etcd
//! every node must alert and hold at most its safe share.

use lb_userspace::config::Mode;
use sluice_lab::{
    chaos::Verdict as _,
    limits::{self, Options},
};
use sluice_tests::labs::{down_and_check, lab};

#[test]
fn one_limit_for_the_whole_cluster_is_never_exceeded_while_shares_move_nodes_fail_and_etcd_stops() {
    let lab = lab(1, 3, Mode::L2dsr);
    let report = limits::run(&lab, &Options::default());
    down_and_check(lab);
    let report = report.expect("cluster limits run");
    println!("{}", report.markdown());
    assert!(report.passed(), "some checks failed:\n{}", report.markdown());
    assert!(report.max_sum <= 60 && report.samples > 300, "{} samples, at most {}", report.samples, report.max_sum);
    assert_eq!(report.steps.len(), 7, "every step ran");
    let refused: u64 = report.clients.values().map(|c| c.1).sum();
    assert!(refused > 0, "demand above the limit was refused");
}
