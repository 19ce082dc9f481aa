//! The flow table's own mechanics, on the real program (BPF_PROG_TEST_RUN): flows whose home
//! bucket is full live in their other bucket and are still found, and two CPUs inserting the
//! same flows at the same moment leave exactly one entry and one slot per flow (a version that
//! released the bucket's insert lock before publishing the entry failed this).

use std::sync::Barrier;

use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use lb_common::{Config, FlowKey, Stat, FLOW_WAYS, PROG_BALANCER};
use lb_userspace::datapath::LoadOptions;
use nix::{sched::CpuSet, unistd::Pid};
use sluice_tests::{
    packet::{tcp, Pkt, PROTO_TCP},
    testrun::{OneBackend, XdpRunner, XDP_DROP, XDP_TX},
};

fn key(port: u16) -> FlowKey {
    let mut k = FlowKey { proto: PROTO_TCP, sport_be: port.to_be_bytes(), dport_be: 80u16.to_be_bytes(), ..FlowKey::default() };
    k.src[..4].copy_from_slice(&[10, 0, 0, 1]);
    k.dst[..4].copy_from_slice(&[10, 0, 0, 100]);
    k
}

fn pkt(port: u16) -> Pkt {
    Pkt::tcp4(&format!("10.0.0.1:{port}"), "10.0.0.100:80")
}

#[test]
fn flows_whose_home_bucket_is_full_live_in_their_other_bucket() {
    let mut x = XdpRunner::balancer_with(&LoadOptions { flow_capacity: 1024, ring_slots: 64, ..LoadOptions::default() });
    x.install_one(&OneBackend::new(1, 80, 1000));
    let table = x.tables().flow_table().expect("mmap");
    // Ten flows with the same home bucket: seven fit, three overflow.
    let (home, _) = table.buckets_of(&key(1000));
    let ports: Vec<u16> = (1000..u16::MAX).filter(|p| table.buckets_of(&key(*p)).0 == home).take(FLOW_WAYS + 3).collect();
    assert_eq!(ports.len(), FLOW_WAYS + 3);
    for p in &ports {
        assert_eq!(x.run(&pkt(*p).build()).verdict, XDP_TX, "SYN {p} admitted");
    }
    assert_eq!(table.len(), ports.len() as u64);
    assert_eq!(table.overflow_count(home), 3, "three flows live in their other bucket");
    for p in &ports {
        let e = table.get(&key(*p)).expect("in the table");
        assert_eq!(e.slot.bucket == home, ports.iter().position(|q| q == p).expect("p") < FLOW_WAYS, "port {p}");
        assert!(e.holds_slot());
    }
    // Every flow is found by the datapath: its ACK is forwarded, not adopted.
    for p in &ports {
        assert_eq!(x.run(&pkt(*p).flags(tcp::ACK).build()).verdict, XDP_TX);
    }
    assert_eq!(x.tables().backend_stats(1).expect("stats").adopted, 0, "no flow lost");
    assert_eq!(x.tables().conns(1).expect("conns"), ports.len() as u64);
    // RST removes each once: the overflow count, the flow count and the slots all go to 0.
    for p in &ports {
        x.run(&pkt(*p).flags(tcp::RST | tcp::ACK).build());
    }
    assert_eq!((table.len(), table.overflow_count(home)), (0, 0));
    assert_eq!(x.tables().conns(1).expect("conns"), 0);
    assert!(table.entries().is_empty());
    // The ways are reused.
    for p in &ports {
        assert_eq!(x.run(&pkt(*p).build()).verdict, XDP_TX);
    }
    assert_eq!((table.len(), table.overflow_count(home)), (ports.len() as u64, 3));
}

#[test]
fn two_cpus_inserting_the_same_flows_keep_one_entry_and_one_slot_each() {
    const FLOWS: u16 = 3000;
    let cpus = aya::util::online_cpus().expect("online cpus");
    assert!(cpus.len() >= 2, "this test needs two CPUs to race; the machine has {}", cpus.len());
    let mut x = XdpRunner::balancer_with(&LoadOptions { config: Config::DEFAULT, flow_capacity: 2 * u32::from(FLOWS), ring_slots: 64 });
    x.install_one(&OneBackend::new(1, 80, u32::MAX));
    let frames: Vec<Vec<u8>> = (0..FLOWS).map(|n| pkt(2000 + n).build()).collect();
    let prog: &Xdp = x.ebpf.program(PROG_BALANCER).expect("program").try_into().expect("xdp");
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        for &cpu in &cpus[..2] {
            let (barrier, frames) = (&barrier, &frames);
            s.spawn(move || {
                let mut set = CpuSet::new();
                set.set(cpu as usize).expect("cpu set");
                nix::sched::sched_setaffinity(Pid::from_raw(0), &set).expect("pin thread");
                let mut out = vec![0u8; 256];
                barrier.wait();
                // The same SYNs in the same order on both CPUs: they meet on many flows. A SYN
                // is sent on, or dropped when the other CPU held its bucket throughout.
                for f in frames {
                    let r = prog.test_run(TestRunOptions { data_in: Some(f), data_out: Some(&mut out), ..TestRunOptions::new() }).expect("run");
                    assert!(r.return_value == XDP_TX || r.return_value == XDP_DROP, "verdict {}", r.return_value);
                }
            });
        }
    });
    let stats = x.stats();
    let (new, busy) = (x.tables().backend_stats(1).expect("stats").new_flows, stats.get(Stat::FlowBusy).packets);
    println!("{FLOWS} flows, each sent by both CPUs: {new} inserted, {busy} SYNs dropped (the other CPU held the bucket)");
    let table = x.tables().flow_table().expect("mmap");
    let mut keys: Vec<FlowKey> = table.entries().iter().map(|e| e.key).collect();
    let entries = keys.len() as u64;
    keys.sort_by_key(|k| u16::from_be_bytes(k.sport_be));
    keys.dedup();
    assert_eq!(keys.len() as u64, entries, "no flow twice");
    // A flow is missing only if both of its SYNs were dropped.
    assert!(2 * (u64::from(FLOWS) - entries) <= busy, "{entries} of {FLOWS} flows entered, {busy} SYNs dropped");
    assert_eq!(table.len(), entries, "no claim left behind");
    assert_eq!(new, entries, "each flow inserted once");
    assert_eq!(x.tables().conns(1).expect("conns"), entries, "one slot per flow, none for a dropped SYN");
    assert!(table.entries().iter().all(lb_userspace::flowtab::Entry::holds_slot));
}
