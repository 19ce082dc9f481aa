//! A spoofed-source SYN flood in the lab (`sluice_lab::flood`, also `sluice lab flood`):
//! 20,000 SYNs a second for 3 s from one client namespace, raw frames at the load balancer,
//! while the other client holds 40 connections and opens a new one every 100 ms through the
//! running daemon. No held connection may break, the flood must be refused once it holds the
//! free slots, and new clients must get through again within the SYN timeout of its end.

use lb_userspace::config::Mode;
use sluice_lab::{
    chaos::Verdict as _,
    flood::{self, Options, BACKENDS},
};
use sluice_tests::labs::{down_and_check, lab};

#[test]
fn a_syn_flood_in_the_lab_breaks_nothing_and_clients_return_within_the_syn_timeout() {
    let lab = lab(BACKENDS, 2, Mode::L2dsr);
    let opts = Options::default();
    let report = flood::run(&lab, &opts);
    down_and_check(lab);
    let report = report.expect("flood run");
    println!("{}", report.markdown());
    assert!(report.passed(), "some checks failed:\n{}", report.markdown());
    // The flood must have been one: most of what was asked for sent, nearly all of it refused.
    assert!(report.syns_sent >= u64::from(opts.pps) * opts.duration.as_secs() * 9 / 10, "{} SYNs sent", report.syns_sent);
    assert!(report.refused_by_sluice + report.admitted >= report.syns_sent, "every SYN admitted or refused with a reason: {report:?}");
}
