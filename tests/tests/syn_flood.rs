//! A flood of spoofed-source SYNs at a service, through the real program and the daemon's real
//! GC sweep (with the clock advanced instead of waiting): the flood can take at most the free
//! slots, never an established flow's; the last sweep before the SYN timeout gives every slot
//! back and legitimate clients get through again. (`lab_syn_flood.rs` does it in the lab, with
//! real clients and the running daemon.)

use std::time::Duration;

use lb_common::Stat;
use lb_userspace::{config::Timeouts, datapath::LoadOptions, gc};
use sluice_tests::{
    packet::{tcp, Pkt},
    testrun::{OneBackend, XdpRunner, XDP_TX},
};

const LIMIT: u32 = 100;
const LEGIT: u16 = 20;
const FLOOD: u32 = 50_000;

fn legit(port: u16, flags: u8) -> Vec<u8> {
    Pkt::tcp4(&format!("10.0.0.1:{port}"), "10.0.0.100:80").flags(flags).payload(if flags & tcp::SYN != 0 { &[] } else { b"GET / HTTP/1.1\r\n\r\n" }).build()
}

#[test]
fn a_spoofed_syn_flood_holds_slots_only_until_the_syn_timeout_and_breaks_no_flow() {
    let mut x = XdpRunner::balancer_with(&LoadOptions { flow_capacity: 1 << 17, ring_slots: 64, ..LoadOptions::default() });
    x.install_one(&OneBackend::new(1, 80, LIMIT));
    for p in 0..LEGIT {
        assert_eq!(x.run(&legit(2000 + p, tcp::SYN)).verdict, XDP_TX);
        assert_eq!(x.run(&legit(2000 + p, tcp::ACK)).verdict, XDP_TX);
    }
    let established_at = std::time::Instant::now();

    // The flood: every SYN from another spoofed source.
    let before = x.stats();
    let flood_started = gc::now_coarse_ns();
    for i in 0..FLOOD {
        let src = format!("172.{}.{}.{}:{}", 16 + (i >> 16) % 16, (i >> 8) & 0xff, i & 0xff, 1024 + i % 50_000);
        x.run(&Pkt::tcp4(&src, "10.0.0.100:80").build());
    }
    let admitted = x.stats().get(Stat::Forwarded).packets - before.get(Stat::Forwarded).packets;
    let t = x.tables();
    let conns = t.conn_counters().expect("mmap");
    assert_eq!(conns.get(1), u64::from(LIMIT), "the flood filled the free slots, no more");
    assert_eq!(admitted, u64::from(LIMIT - u32::from(LEGIT)), "SYNs admitted during the flood");
    drop(conns);
    let refused = x.stats().get(Stat::RefusedRst).packets - before.get(Stat::RefusedRst).packets;
    assert_eq!(refused, u64::from(FLOOD) - admitted, "every other SYN refused at once (RST)");
    // Established flows are untouched: their packets still go to their backend.
    for p in 0..LEGIT {
        assert_eq!(x.run(&legit(2000 + p, tcp::ACK | tcp::PSH)).verdict, XDP_TX, "established flow {p} broken by the flood");
    }
    // A legitimate new client is refused while the flood's SYNs hold the slots...
    let rst = x.stats().get(Stat::RefusedRst).packets;
    x.run(&legit(3000, tcp::SYN));
    assert_eq!(x.stats().get(Stat::RefusedRst).packets, rst + 1, "a new client during the flood is refused");
    let t = x.tables();
    let conns = t.conn_counters().expect("mmap");
    assert_eq!(conns.get(1), u64::from(LIMIT));

    // ...until the SYN timeout: the daemon sweeps every second, and a sweep takes the half-open
    // flows that would pass the timeout before the next one. So a sweep 1.5 s before the
    // timeout keeps them, and one 0.5 s before it (within a second of it) takes them all.
    let timeouts = Timeouts::default();
    let table = t.flow_table().expect("mmap");
    let gap = Duration::from_secs(1);
    // The admitted SYNs are the flood's first (the free slots fill at once).
    let at = |before: Duration| flood_started + timeouts.syn.checked_sub(before).unwrap().as_nanos() as u64;
    let s = gc::sweep(&table, &conns, &timeouts, at(timeouts.syn / 2 + Duration::from_secs(1)), Duration::from_mins(1));
    assert_eq!(s.released, 0, "a slow GC looks ahead at most half the SYN timeout");
    let s = gc::sweep(&table, &conns, &timeouts, at(Duration::from_millis(1500)), gap);
    assert_eq!(s.released, 0, "no half-open flow goes before its SYN timeout is within a sweep");
    let s = gc::sweep(&table, &conns, &timeouts, at(Duration::from_millis(500)), gap);
    assert_eq!(s.released, admitted, "the flood's half-open flows give their slots back within the SYN timeout");
    assert_eq!(conns.get(1), u64::from(LEGIT), "only the established flows hold slots");
    drop(conns);
    assert!(established_at.elapsed() < timeouts.established, "the test itself took longer than the established timeout");
    for p in 0..LEGIT {
        assert_eq!(x.run(&legit(2000 + p, tcp::ACK)).verdict, XDP_TX, "established flow {p} lost in the sweep");
    }
    let before = x.stats().get(Stat::Forwarded).packets;
    assert_eq!(x.run(&legit(3001, tcp::SYN)).verdict, XDP_TX, "a legitimate client gets through after the SYN timeout");
    assert_eq!(x.stats().get(Stat::Forwarded).packets, before + 1);
    println!(
        "SYN flood: {FLOOD} spoofed SYNs, {admitted} admitted into the free slots, {refused} refused with a RST; {LEGIT} established flows unbroken; \
         a sweep 0.5 s before the SYN timeout ({}s; the next sweep would be after it) released {} slots; new clients admitted again",
        timeouts.syn.as_secs(),
        s.released
    );
}
