//! A spoofed-source SYN flood in the lab (`sluice_lab::flood`, also `sluice lab flood`):
//! 20,000 SYNs a second for 3 s from one client namespace, raw frames at the load balancer,
//! while the other client holds 40 connections and opens a new one every 100 ms through the
//! running daemon. No held connection may break, the flood must be refused once it holds the
//! free slots, and new clients must get through again after its end, once the SYN timeout has
//! freed its slots (before the established timeout would have). How many SYNs the sender got
//! out in 3 s, and how soon the clients came back, are figures, not bounds.

use lb_userspace::config::Mode;
use sluice_lab::{
    chaos::Verdict as _,
    flood::{self, Options, BACKENDS, HELD, LIMIT},
};
use sluice_tests::labs::{down_and_check, lab};

#[test]
fn a_syn_flood_in_the_lab_breaks_nothing_and_clients_return_once_its_syns_time_out() {
    let lab = lab(BACKENDS, 2, Mode::L2dsr);
    let opts = Options::default();
    let report = flood::run(&lab, &opts);
    down_and_check(lab);
    let report = report.expect("flood run");
    println!("{}", report.markdown());
    assert!(report.passed(), "some checks failed:\n{}", report.markdown());
    // The flood must have been one: ten times the free slots at least (however fast this machine
    // sent). It got the free slots, again each time the SYN timeout freed them while it ran (and
    // a legitimate client the odd one), and every other SYN was refused.
    let free = u64::from(BACKENDS) * u64::from(LIMIT) - HELD as u64;
    println!("{} SYNs sent of {} asked for", report.syns_sent, u64::from(opts.pps) * opts.duration.as_secs());
    assert!(report.syns_sent >= 10 * free, "{} SYNs sent for {free} free slots: not a flood", report.syns_sent);
    let rounds = 1 + (report.flood_s / report.syn_timeout_s).ceil() as u64;
    assert!(report.admitted <= free * rounds + report.probes_during, "{} new flows admitted while the flood ran, {free} slots free: {report:?}", report.admitted);
    assert!(report.refused_by_sluice + report.admitted >= report.syns_sent, "every SYN admitted or refused with a reason: {report:?}");
}
