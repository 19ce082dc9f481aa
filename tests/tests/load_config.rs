//! Load-time choices (the `CONFIG` global) change the datapath's behaviour: refusal events
//! are rate-limited per CPU, ICMP echo to a VIP can be left to the kernel, and fragments to a
//! VIP can be passed instead of dropped.

use aya::maps::RingBuf;
use lb_common::{Config, EventBucket, Stat, FRAGMENTS_PASS, ICMP_ECHO_PASS};
use lb_userspace::datapath::LoadOptions;
use sluice_tests::{
    packet::Pkt,
    testrun::{OneBackend, XdpRunner, XDP_PASS, XDP_TX},
};

const EVENTS_PER_SEC: u32 = 5;

fn fixture() -> XdpRunner {
    let config = Config { icmp_echo: ICMP_ECHO_PASS, fragments: FRAGMENTS_PASS, events_per_sec: EVENTS_PER_SEC, ..Config::DEFAULT };
    let mut x = XdpRunner::balancer_with(&LoadOptions { config, flow_capacity: 1024, ring_slots: 64 });
    // max_conns 0: every SYN is refused.
    x.install_one(&OneBackend::new(1, 80, 0));
    x
}

#[test]
fn a_flood_of_refusals_yields_at_most_the_configured_events() {
    let mut x = fixture();
    #[expect(clippy::items_after_statements, reason = "next to its one use")]
    const FLOOD: u16 = 500;
    for p in 0..FLOOD {
        let res = x.run(&Pkt::tcp4(&format!("10.7.0.1:{}", 1000 + p), "10.0.0.100:80").build());
        assert_eq!(res.verdict, XDP_TX, "refused with a RST");
    }
    let mut ring = RingBuf::try_from(x.ebpf.map_mut("EVENTS").expect("EVENTS")).expect("ringbuf");
    let mut events = 0u64;
    while ring.next().is_some() {
        events += 1;
    }
    drop(ring);
    // The bucket holds one second's worth per CPU; the flood takes far less than a second,
    // so at most that burst (plus a refill) reaches userspace. Test runs may use either CPU.
    let cpus = aya::util::nr_cpus().expect("cpus") as u64;
    let burst_max = cpus * (u64::from(EVENTS_PER_SEC) + 1);
    assert!(events >= 1 && events <= burst_max, "{events} events for {FLOOD} refusals (max {burst_max})");
    let buckets: aya::maps::PerCpuArray<_, EventBucket> = aya::maps::PerCpuArray::try_from(x.ebpf.map("EVENT_BUCKET").expect("bucket")).expect("per-cpu");
    let suppressed: u64 = buckets.get(&0, 0).expect("bucket").iter().map(|b| b.suppressed).sum();
    assert_eq!(events + suppressed, u64::from(FLOOD), "every refusal is either sent or counted as suppressed");
    assert_eq!(x.tables().service_stats(1).expect("stats").refused.backend_limit, u64::from(FLOOD), "all refusals counted");
}

#[test]
fn icmp_echo_and_fragments_can_be_left_to_the_kernel() {
    let mut x = fixture();
    let before = x.stats();
    let res = x.run(&Pkt::icmp4_echo("10.0.0.1", "10.0.0.100").build());
    assert_eq!(res.verdict, XDP_PASS);
    assert_eq!(x.stats().get(Stat::IcmpPassed).packets - before.get(Stat::IcmpPassed).packets, 1);
    let mut p = Pkt::udp4("10.0.0.1:1", "10.0.0.100:80");
    p.v4_mut().dont_frag = false;
    p.v4_mut().more_frags = true;
    let before = x.stats();
    assert_eq!(x.run(&p.build()).verdict, XDP_PASS);
    assert_eq!(x.stats().get(Stat::Fragment).packets - before.get(Stat::Fragment).packets, 1);
}
