//! GC and reconciliation against the real datapath: idle flows expire by state and give their
//! slot back exactly once; closing flows (already released) give nothing back twice; a counter
//! corrupted on purpose is corrected after drift is seen twice in a row, and the correction is
//! recorded.

use std::time::Duration;

use lb_userspace::{
    config::Timeouts,
    datapath::LoadOptions,
    gc::{self, Reconciler},
};
use sluice_tests::{
    packet::{tcp, Pkt},
    testrun::{OneBackend, XdpRunner},
};

fn fixture() -> XdpRunner {
    let mut x = XdpRunner::balancer_with(&LoadOptions { flow_capacity: 1024, ring_slots: 64, ..LoadOptions::default() });
    x.install_one(&OneBackend::new(1, 80, 1000));
    x
}

#[test]
fn idle_flows_expire_and_release_their_slots_once() {
    let mut x = fixture();
    for p in 0..20u16 {
        x.run(&Pkt::tcp4(&format!("10.0.0.1:{}", 1000 + p), "10.0.0.100:80").build());
    }
    // Five of them close: their slots are released by the FIN already.
    for p in 0..5u16 {
        x.run(&Pkt::tcp4(&format!("10.0.0.1:{}", 1000 + p), "10.0.0.100:80").flags(tcp::FIN | tcp::ACK).build());
    }
    let t = x.tables();
    let conns = t.conn_counters().expect("mmap");
    let table = t.flow_table().expect("mmap");
    assert_eq!(conns.get(1), 15);

    // Nothing is idle yet with generous timeouts.
    let generous = Timeouts::default();
    let s = gc::sweep(&table, &conns, &generous, gc::now_coarse_ns(), Duration::ZERO);
    assert_eq!((s.scanned, s.expired, s.released), (20, 0, 0));

    // With tiny timeouts, after the coarse clock has moved, everything is idle.
    let tiny = Timeouts { syn: Duration::from_nanos(1), established: Duration::from_nanos(1), closing: Duration::from_nanos(1), udp: Duration::from_nanos(1) };
    std::thread::sleep(Duration::from_millis(30));
    let s = gc::sweep(&table, &conns, &tiny, gc::now_coarse_ns(), Duration::ZERO);
    assert_eq!((s.scanned, s.expired, s.released), (20, 20, 15), "closing flows hold no slot");
    assert_eq!(conns.get(1), 0);
    let s = gc::sweep(&table, &conns, &tiny, gc::now_coarse_ns(), Duration::ZERO);
    assert_eq!((s.scanned, s.expired), (0, 0));
    drop(conns);
    assert!(x.tables().flows().expect("flows").is_empty());
}

#[test]
fn reconciliation_corrects_persistent_drift_only() {
    let mut x = fixture();
    for p in 0..12u16 {
        x.run(&Pkt::tcp4(&format!("10.0.0.2:{}", 2000 + p), "10.0.0.100:80").build());
    }
    let t = x.tables();
    let conns = t.conn_counters().expect("mmap");
    let table = t.flow_table().expect("mmap");
    let mut r = Reconciler::default();
    assert!(r.pass(&table, &conns, [1]).is_empty(), "no drift to start with");

    // Corrupt the counter on purpose (as a lost decrement would).
    conns.correct(1, 45);
    assert_eq!(conns.get(1), 57);
    let d = r.pass(&table, &conns, [1]);
    assert_eq!(d.len(), 1);
    assert_eq!((d[0].counter, d[0].flows, d[0].corrected), (57, 12, false), "seen once: not yet corrected");
    assert_eq!(conns.get(1), 57);
    let d = r.pass(&table, &conns, [1]);
    assert!(d[0].corrected, "seen twice: corrected");
    assert_eq!(conns.get(1), 12);
    assert_eq!(r.corrections.get(&1), Some(&45), "the correction is recorded");
    assert!(r.pass(&table, &conns, [1]).is_empty());
}
