//! The cluster lab (`sluice_lab::cluster`, also `sluice lab cluster`), shortened: two
//! nodes behind a router running real BIRD with kernel ECMP, a third joining, under continuous
//! load with held connections; a drain and undrain, a daemon restart, a node failing (BIRD
//! killed, link down) and coming back. No connection may break or be refused (a flow the
//! router moves is adopted by the same backend on its new node), the router must converge after
//! each change (how long it took is a figure, printed, not asserted), the new node must take new
//! flows, the drained node's new flows must reach 0 and the restart must withdraw nothing.

use std::time::Duration;

use lb_userspace::config::Mode;
use sluice_lab::{
    chaos::Verdict as _,
    cluster::{self, Options, BACKENDS},
};
use sluice_tests::labs::{assert_checks_but_timings, down_and_check, lab};

#[test]
fn a_cluster_behind_ecmp_scales_out_drains_restarts_and_fails_without_breaking_a_connection() {
    let lab = lab(BACKENDS, 2, Mode::L2dsr);
    let opts = Options { nodes: 2, window: Duration::from_secs(3), ..Options::default() };
    let report = cluster::run(&lab, &opts);
    down_and_check(lab);
    let report = report.expect("cluster run");
    println!("{}", report.markdown());
    assert_checks_but_timings(&report, &["the router converged after every change (within 10 s)"]);
    assert!(report.steps.iter().all(|s| s.converged_ms.is_some()), "the router converged after every change:\n{}", report.markdown());
    assert!(report.connections > 300 && report.held_survived == report.held, "{} connections, {} of {} held survived", report.connections, report.held_survived, report.held);
    assert_eq!(report.steps.len(), 6, "every step ran");
}
