//! The balancer's decisions through BPF_PROG_TEST_RUN: one table of rows, one runner. Each row
//! starts from clean tables, installs services, sends frames built with the packet builder,
//! and checks the verdict, the outcome counter, the output bytes (parsed by etherparse, an
//! independent parser), the connection counters, the flow table and the refusal counters.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    panic::{catch_unwind, AssertUnwindSafe},
};

use etherparse::{LinkSlice, NetSlice, SlicedPacket, TransportSlice};
use lb_common::{
    flow_hash, Backend, Config, Flow, FlowKey, Reason, Service, ServiceKey, Stat, TrafficStats, BACKEND_ACTIVE, BACKEND_DOWN, BACKEND_DRAINING, FAMILY_V4, FAMILY_V6, FLOW_CLOSING,
    FLOW_ESTABLISHED, FLOW_SYN_SEEN, FLOW_UDP, MODE_IPIP, MODE_L2DSR, REJECT_DROP, REJECT_RST,
};
use lb_userspace::{
    datapath::LoadOptions,
    maglev::{self, RingBackend},
};
use sluice_tests::{
    packet::{checksum, tcp, Pkt, L4, LB_MAC, PROTO_TCP, PROTO_UDP},
    testrun::{RunResult, XdpRunner, XDP_DROP, XDP_PASS, XDP_TX},
};

const VIP4: &str = "10.0.0.100";
const VIP6: &str = "2001:db8::100";
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];
const FLOW_CAPACITY: u32 = 16;
const RING: u32 = 13;
const MAX_BACKEND_ID: u32 = 8;

fn backend_mac(id: u32) -> [u8; 6] {
    [0x02, 0xbb, 0, 0, 0, id as u8]
}

fn addr16(a: &str) -> ([u8; 16], u8) {
    let mut out = [0u8; 16];
    match a.parse::<IpAddr>().expect("address") {
        IpAddr::V4(v) => {
            out[..4].copy_from_slice(&v.octets());
            (out, FAMILY_V4)
        }
        IpAddr::V6(v) => (v.octets(), FAMILY_V6),
    }
}

struct B {
    id: u32,
    addr: &'static str,
    max_conns: u32,
    state: u8,
    weight: u32,
    at_limit: u8,
}

fn b(id: u32, addr: &'static str, max_conns: u32) -> B {
    B { id, addr, max_conns, state: BACKEND_ACTIVE, weight: 1, at_limit: lb_common::AT_LIMIT_BACKEND }
}

struct Svc {
    id: u32,
    vip: &'static str,
    port: u16,
    proto: u8,
    mode: u8,
    reject: u8,
    spill: u8,
    backends: Vec<B>,
}

fn web4(backends: Vec<B>) -> Svc {
    Svc { id: 1, vip: VIP4, port: 80, proto: PROTO_TCP, mode: MODE_L2DSR, reject: REJECT_RST, spill: 0, backends }
}

fn three4(limit: u32) -> Vec<B> {
    vec![b(1, "10.0.1.11", limit), b(2, "10.0.1.12", limit), b(3, "10.0.1.13", limit)]
}

fn web6(backends: Vec<B>) -> Svc {
    Svc { id: 2, vip: VIP6, port: 80, proto: PROTO_TCP, mode: MODE_L2DSR, reject: REJECT_RST, spill: 0, backends }
}

fn two6(limit: u32) -> Vec<B> {
    vec![b(4, "2001:db8:1::14", limit), b(5, "2001:db8:1::15", limit)]
}

struct Fx {
    x: XdpRunner,
    rings: Vec<(u32, Vec<u32>)>,
}

impl Fx {
    fn new() -> Self {
        let config = Config { has_gateway: 1, gateway_mac: GW_MAC, events_per_sec: 1000, ..Config::DEFAULT };
        let x = XdpRunner::balancer_with(&LoadOptions { config, flow_capacity: FLOW_CAPACITY, ring_slots: 64 * RING });
        Self { x, rings: Vec::new() }
    }

    /// Empties every table a row may have touched.
    fn reset(&mut self) {
        let mut t = self.x.tables();
        for (k, _) in t.flows().expect("flows") {
            t.remove_flow(&k).expect("remove flow");
        }
        for id in 0..=MAX_BACKEND_ID {
            t.set_conns(id, 0).expect("conns");
            t.set_backend(id, &Backend::default()).expect("backend");
        }
        self.rings.clear();
        // Per-service and per-backend counters start from zero in every row.
        let cpus = aya::util::nr_cpus().expect("nr_cpus");
        for name in [lb_common::maps::SVC_STATS, lb_common::maps::BACKEND_STATS] {
            let mut m: aya::maps::PerCpuArray<_, TrafficStats> = aya::maps::PerCpuArray::try_from(self.x.ebpf.map_mut(name).expect("map")).expect("per-cpu");
            for id in 0..=MAX_BACKEND_ID {
                let zero = aya::maps::PerCpuValues::try_from(vec![TrafficStats::default(); cpus]).expect("values");
                m.set(id, zero, 0).expect("zero stats");
            }
        }
        let mut t = self.x.tables();
        for (vip, port, proto) in [(VIP4, 80, PROTO_TCP), (VIP4, 53, PROTO_UDP), (VIP6, 80, PROTO_TCP), (VIP4, 0, 0), (VIP6, 0, 0)] {
            let _ = t.remove_service(&skey(vip, port, proto));
        }
    }

    /// Installs a service the way the daemon does: backends, then the ring, then the service
    /// and its VIP entry.
    fn install(&mut self, s: &Svc) {
        let mut t = self.x.tables();
        for be in &s.backends {
            let (addr, family) = addr16(be.addr);
            let backend = Backend { addr, mac: backend_mac(be.id), family, state: be.state, max_conns: be.max_conns, service_id: s.id as u16, at_limit: be.at_limit, _pad: 0 };
            t.set_backend(be.id, &backend).expect("backend");
        }
        let members: Vec<RingBackend> = s.backends.iter().map(|be| RingBackend { id: be.id, key: be.addr.to_owned(), weight: be.weight }).collect();
        let ring = maglev::build(&members, RING);
        let base = s.id * RING;
        t.write_ring(base, &ring).expect("ring");
        let service =
            Service { id: s.id, ring_base: base, ring_size: if members.iter().any(|m| m.weight > 0) { RING } else { 0 }, mode: s.mode, reject: s.reject, spill: s.spill, half: 0 };
        t.set_service(&skey(s.vip, s.port, s.proto), &service).expect("service");
        t.set_service(&skey(s.vip, 0, 0), &service).expect("vip entry");
        self.rings.push((s.id, ring));
    }

    fn ring(&self, svc: u32) -> &[u32] {
        &self.rings.iter().find(|(id, _)| *id == svc).expect("installed").1
    }

    fn first(&self, svc: u32, key: &FlowKey) -> u32 {
        maglev::first_choice(self.ring(svc), key)
    }

    fn set_state(&mut self, id: u32, state: u8) {
        let mut t = self.x.tables();
        let mut be = t.backend(id).expect("backend");
        be.state = state;
        t.set_backend(id, &be).expect("backend");
    }

    fn set_limit(&mut self, id: u32, max: u32) {
        let mut t = self.x.tables();
        let mut be = t.backend(id).expect("backend");
        be.max_conns = max;
        t.set_backend(id, &be).expect("backend");
    }

    fn run(&mut self, frame: &[u8]) -> RunResult {
        self.x.run(frame)
    }

    /// Runs `frame` and checks the verdict and that exactly `stat` counted it.
    fn expect(&mut self, frame: &[u8], verdict: u32, stat: Stat) -> RunResult {
        let before = self.x.stats();
        let res = self.run(frame);
        let after = self.x.stats();
        assert_ne!(res.verdict, 0, "XDP_ABORTED");
        assert_eq!(res.verdict, verdict, "verdict");
        for &s in Stat::ALL {
            let d = after.get(s).packets - before.get(s).packets;
            assert_eq!(d, u64::from(s == stat), "outcome {} moved by {d} (want {})", s.name(), stat.name());
        }
        res
    }

    fn conns(&mut self, id: u32) -> u64 {
        self.x.tables().conns(id).expect("conns")
    }

    fn flow(&mut self, key: &FlowKey) -> Option<Flow> {
        self.x.tables().flow(key).expect("flow")
    }

    fn refused(&mut self, svc: u32, backend: u32, r: Reason) -> (u64, u64) {
        let t = self.x.tables();
        (t.service_stats(svc).expect("svc").refused.get(r), t.backend_stats(backend).expect("be").refused.get(r))
    }
}

fn skey(vip: &str, port: u16, proto: u8) -> ServiceKey {
    ServiceKey { addr: addr16(vip).0, port_be: port.to_be_bytes(), proto, _pad: 0 }
}

/// The flow key of a packet from `src` ("ip:port") to `dst`.
fn fkey(src: &str, dst: &str, proto: u8) -> FlowKey {
    let s: std::net::SocketAddr = src.parse().expect("src");
    let d: std::net::SocketAddr = dst.parse().expect("dst");
    FlowKey {
        src: addr16(&s.ip().to_string()).0,
        dst: addr16(&d.ip().to_string()).0,
        sport_be: s.port().to_be_bytes(),
        dport_be: d.port().to_be_bytes(),
        proto,
        _pad0: 0,
        _pad1: 0,
    }
}

fn c4(port: u16) -> String {
    format!("10.0.0.1:{port}")
}
fn v4dst() -> String {
    format!("{VIP4}:80")
}
fn c6(port: u16) -> String {
    format!("[2001:db8::1]:{port}")
}
fn v6dst() -> String {
    format!("[{VIP6}]:80")
}

/// The output must be the input with only the MACs rewritten for `backend` (l2dsr).
fn assert_l2dsr(out: &[u8], input: &[u8], backend: u32) {
    assert_eq!(out.len(), input.len(), "length");
    assert_eq!(&out[..6], &backend_mac(backend), "destination MAC is the backend's");
    assert_eq!(&out[6..12], &input[..6], "source MAC is ours (the frame's destination)");
    assert_eq!(&out[12..], &input[12..], "nothing past the MACs changes");
}

fn parse(out: &[u8]) -> SlicedPacket<'_> {
    SlicedPacket::from_ethernet(out).unwrap_or_else(|e| panic!("output does not parse: {e}"))
}

/// Checks a RST+ACK answering a SYN with sequence `syn_seq` from `client` to `vip`.
fn assert_rst(out: &[u8], input: &[u8], client: &str, vip: &str, syn_seq: u32) {
    let s = parse(out);
    let Some(LinkSlice::Ethernet2(eth)) = &s.link else { panic!("ethernet") };
    assert_eq!(eth.destination(), input[6..12], "back to the sender's MAC");
    assert_eq!(eth.source(), input[..6], "from our MAC");
    let client: std::net::SocketAddr = client.parse().expect("client");
    let vip: std::net::SocketAddr = vip.parse().expect("vip");
    let Some(TransportSlice::Tcp(t)) = &s.transport else { panic!("tcp") };
    assert!(t.rst() && t.ack() && !t.syn() && !t.fin(), "RST+ACK flags");
    assert_eq!((t.source_port(), t.destination_port()), (vip.port(), client.port()));
    assert_eq!(t.sequence_number(), 0);
    assert_eq!(t.acknowledgment_number(), syn_seq.wrapping_add(1), "ack = SYN seq + 1");
    assert!(t.payload().is_empty());
    match &s.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header();
            assert_eq!(IpAddr::V4(h.source_addr()), vip.ip());
            assert_eq!(IpAddr::V4(h.destination_addr()), client.ip());
            assert_eq!(h.to_header().calc_header_checksum(), h.header_checksum(), "IPv4 checksum");
            let want = t.to_header().calc_checksum_ipv4(&h.to_header(), t.payload()).expect("csum");
            assert_eq!(t.checksum(), want, "TCP checksum");
            assert_eq!(usize::from(h.total_len()), 40);
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header();
            assert_eq!(IpAddr::V6(h.source_addr()), vip.ip());
            assert_eq!(IpAddr::V6(h.destination_addr()), client.ip());
            let want = t.to_header().calc_checksum_ipv6(&h.to_header(), t.payload()).expect("csum");
            assert_eq!(t.checksum(), want, "TCP checksum");
            assert_eq!(h.payload_length(), 20);
        }
        _ => panic!("ip"),
    }
}

/// Checks an IPIP/IP6IP6 output: gateway MAC, valid outer header to `backend_addr`, and the
/// original IP packet unchanged inside.
fn assert_encap(out: &[u8], input: &[u8], input_l3: usize, out_l3: usize, backend_addr: &str) -> Vec<u8> {
    assert_eq!(&out[..6], &GW_MAC, "next hop is the gateway");
    assert_eq!(&out[6..12], &input[..6], "source MAC is ours");
    let s = parse(out);
    #[expect(clippy::needless_late_init, reason = "set by each arm of the match below")]
    let inner_start;
    match (&s.net, backend_addr.parse::<IpAddr>().expect("addr")) {
        (Some(NetSlice::Ipv4(ip)), IpAddr::V4(want)) => {
            let h = ip.header();
            assert_eq!(h.destination_addr(), want);
            assert_eq!(h.source_addr().octets()[..2], [172, 16], "outer source in the encap prefix");
            assert_eq!(h.to_header().calc_header_checksum(), h.header_checksum(), "outer checksum");
            assert_eq!(usize::from(h.total_len()), out.len() - out_l3);
            inner_start = out_l3 + 20;
        }
        (Some(NetSlice::Ipv6(ip)), IpAddr::V6(want)) => {
            let h = ip.header();
            assert_eq!(h.destination_addr(), want);
            assert_eq!(usize::from(h.payload_length()), out.len() - out_l3 - 40);
            inner_start = out_l3 + 40;
        }
        (net, want) => panic!("outer header {net:?} does not match backend {want}"),
    }
    assert_eq!(&out[inner_start..], &input[input_l3..], "inner packet unchanged");
    out[inner_start..].to_vec()
}

type Row = (&'static str, Box<dyn Fn(&mut Fx)>);

#[expect(clippy::too_many_lines, reason = "the table")]
fn rows() -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    let mut row = |name: &'static str, f: Box<dyn Fn(&mut Fx)>| rows.push((name, f));

    row(
        "v4 SYN admitted and sent to the ring's backend (l2dsr)",
        Box::new(|fx| {
            fx.install(&web4(three4(100)));
            let f = Pkt::tcp4(&c4(40000), &v4dst()).build();
            let key = fkey(&c4(40000), &v4dst(), PROTO_TCP);
            let want = fx.first(1, &key);
            let out = fx.expect(&f, XDP_TX, Stat::Forwarded);
            assert_l2dsr(&out.data, &f, want);
            assert_eq!(fx.conns(want), 1);
            let flow = fx.flow(&key).expect("flow");
            assert_eq!((flow.backend_id, flow.state, flow.counted != 0), (want, FLOW_SYN_SEEN, true), "holds a slot");
            let t = fx.x.tables();
            assert_eq!(t.service_stats(1).expect("s").new_flows, 1);
            assert_eq!(t.backend_stats(want).expect("b").new_flows, 1);
        }),
    );
    row(
        "userspace predicts the datapath's choice for 200 flows",
        Box::new(|fx| {
            fx.install(&web4(three4(1000)));
            for p in 20000..20200u16 {
                let f = Pkt::tcp4(&c4(p), &v4dst()).build();
                let out = fx.run(&f);
                let want = fx.first(1, &fkey(&c4(p), &v4dst(), PROTO_TCP));
                assert_eq!(&out.data[..6], &backend_mac(want), "port {p}");
                fx.x.tables().remove_flow(&fkey(&c4(p), &v4dst(), PROTO_TCP)).expect("rm");
            }
            // The batched read of every backend's statistics (alerting, metrics) agrees with one
            // lookup per backend.
            let t = fx.x.tables();
            let all = t.backend_stats_upto(64).expect("batched lookup");
            assert_eq!(all.len(), 64);
            for (id, stats) in all.iter().enumerate() {
                assert_eq!(*stats, t.backend_stats(id as u32).expect("lookup"), "backend {id}");
            }
            assert!(all.iter().map(|s| s.new_flows).sum::<u64>() >= 200);
        }),
    );
    row(
        "v6 SYN admitted (l2dsr)",
        Box::new(|fx| {
            fx.install(&web6(two6(100)));
            let f = Pkt::tcp6(&c6(40000), &v6dst()).build();
            let want = fx.first(2, &fkey(&c6(40000), &v6dst(), PROTO_TCP));
            let out = fx.expect(&f, XDP_TX, Stat::Forwarded);
            assert_l2dsr(&out.data, &f, want);
            assert_eq!(fx.conns(want), 1);
        }),
    );
    row(
        "v4 SYN in a VLAN keeps its tag",
        Box::new(|fx| {
            fx.install(&web4(three4(100)));
            let f = Pkt::tcp4(&c4(40001), &v4dst()).with_vlan(42).build();
            let want = fx.first(1, &fkey(&c4(40001), &v4dst(), PROTO_TCP));
            let out = fx.expect(&f, XDP_TX, Stat::Forwarded);
            assert_l2dsr(&out.data, &f, want);
        }),
    );
    row(
        "v4 SYN with IP options forwarded unchanged",
        Box::new(|fx| {
            fx.install(&web4(three4(100)));
            let mut p = Pkt::tcp4(&c4(40002), &v4dst());
            p.v4_mut().options = vec![1; 8];
            let f = p.build();
            let want = fx.first(1, &fkey(&c4(40002), &v4dst(), PROTO_TCP));
            let out = fx.expect(&f, XDP_TX, Stat::Forwarded);
            assert_l2dsr(&out.data, &f, want);
        }),
    );
    row(
        "UDP: the first datagram creates a flow, the next follows it",
        Box::new(|fx| {
            let svc =
                Svc { id: 3, vip: VIP4, port: 53, proto: PROTO_UDP, mode: MODE_L2DSR, reject: REJECT_RST, spill: 0, backends: vec![b(6, "10.0.1.16", 10), b(7, "10.0.1.17", 10)] };
            fx.install(&svc);
            let f = Pkt::udp4("10.0.0.1:5353", &format!("{VIP4}:53")).build();
            let key = fkey("10.0.0.1:5353", &format!("{VIP4}:53"), PROTO_UDP);
            let want = fx.first(3, &key);
            assert_l2dsr(&fx.expect(&f, XDP_TX, Stat::Forwarded).data, &f, want);
            assert_l2dsr(&fx.expect(&f, XDP_TX, Stat::Forwarded).data, &f, want);
            assert_eq!(fx.conns(want), 1, "one flow, one slot");
            assert_eq!(fx.flow(&key).expect("flow").state, FLOW_UDP);
        }),
    );
    row(
        "UDP over the limit is dropped, never answered with a RST",
        Box::new(|fx| {
            let svc = Svc { id: 3, vip: VIP4, port: 53, proto: PROTO_UDP, mode: MODE_L2DSR, reject: REJECT_RST, spill: 0, backends: vec![b(6, "10.0.1.16", 1)] };
            fx.install(&svc);
            fx.expect(&Pkt::udp4("10.0.0.1:5353", &format!("{VIP4}:53")).build(), XDP_TX, Stat::Forwarded);
            fx.expect(&Pkt::udp4("10.0.0.1:5354", &format!("{VIP4}:53")).build(), XDP_DROP, Stat::RefusedDrop);
            assert_eq!(fx.refused(3, 6, Reason::BackendLimit), (1, 1));
            assert_eq!(fx.conns(6), 1);
        }),
    );
    row(
        "TCP to a VIP on a port without a service is passed",
        Box::new(|fx| {
            fx.install(&web4(three4(100)));
            fx.expect(&Pkt::tcp4(&c4(40003), &format!("{VIP4}:81")).build(), XDP_PASS, Stat::Tcp4);
        }),
    );
    row(
        "TCP to another address is passed",
        Box::new(|fx| {
            fx.install(&web4(three4(100)));
            fx.expect(&Pkt::tcp4(&c4(40004), "10.0.0.99:80").build(), XDP_PASS, Stat::Tcp4);
            fx.expect(&Pkt::udp6("[2001:db8::1]:1", "[2001:db8::99]:80").build(), XDP_PASS, Stat::Udp6);
        }),
    );
    row(
        "first pure ACK establishes the flow",
        Box::new(|fx| {
            fx.install(&web4(three4(100)));
            let key = fkey(&c4(40005), &v4dst(), PROTO_TCP);
            fx.run(&Pkt::tcp4(&c4(40005), &v4dst()).build());
            let want = fx.first(1, &key);
            let f = Pkt::tcp4(&c4(40005), &v4dst()).flags(tcp::ACK).build();
            assert_l2dsr(&fx.expect(&f, XDP_TX, Stat::Forwarded).data, &f, want);
            assert_eq!(fx.flow(&key).expect("flow").state, FLOW_ESTABLISHED);
            assert_eq!(fx.conns(want), 1);
        }),
    );
    row(
        "a retransmitted SYN follows its flow and takes no second slot",
        Box::new(|fx| {
            fx.install(&web4(three4(100)));
            let f = Pkt::tcp4(&c4(40006), &v4dst()).build();
            let want = fx.first(1, &fkey(&c4(40006), &v4dst(), PROTO_TCP));
            fx.run(&f);
            assert_l2dsr(&fx.expect(&f, XDP_TX, Stat::Forwarded).data, &f, want);
            assert_eq!(fx.conns(want), 1);
        }),
    );
    row(
        "FIN releases the slot exactly once",
        Box::new(|fx| {
            fx.install(&web4(three4(100)));
            let key = fkey(&c4(40007), &v4dst(), PROTO_TCP);
            let want = fx.first(1, &key);
            fx.run(&Pkt::tcp4(&c4(40007), &v4dst()).build());
            fx.run(&Pkt::tcp4(&c4(40007), &v4dst()).flags(tcp::ACK).build());
            let fin = Pkt::tcp4(&c4(40007), &v4dst()).flags(tcp::FIN | tcp::ACK).build();
            assert_l2dsr(&fx.expect(&fin, XDP_TX, Stat::Forwarded).data, &fin, want);
            assert_eq!(fx.conns(want), 0);
            let flow = fx.flow(&key).expect("flow stays while closing");
            assert_eq!((flow.state, flow.counted), (FLOW_CLOSING, 0));
            fx.run(&fin);
            fx.run(&Pkt::tcp4(&c4(40007), &v4dst()).flags(tcp::ACK).build());
            assert_eq!(fx.conns(want), 0, "a second FIN releases nothing");
        }),
    );
    row(
        "RST releases the slot and removes the flow; a second RST releases nothing",
        Box::new(|fx| {
            fx.install(&web4(three4(100)));
            let key = fkey(&c4(40008), &v4dst(), PROTO_TCP);
            let want = fx.first(1, &key);
            fx.run(&Pkt::tcp4(&c4(40008), &v4dst()).build());
            let rst = Pkt::tcp4(&c4(40008), &v4dst()).flags(tcp::RST).build();
            assert_l2dsr(&fx.expect(&rst, XDP_TX, Stat::Forwarded).data, &rst, want);
            assert_eq!(fx.conns(want), 0);
            assert!(fx.flow(&key).is_none());
            fx.expect(&rst, XDP_TX, Stat::ForwardedNoFlow);
            assert_eq!(fx.conns(want), 0);
        }),
    );
    row(
        "FIN then RST releases once",
        Box::new(|fx| {
            fx.install(&web4(three4(100)));
            let want = fx.first(1, &fkey(&c4(40009), &v4dst(), PROTO_TCP));
            fx.run(&Pkt::tcp4(&c4(40009), &v4dst()).build());
            fx.run(&Pkt::tcp4(&c4(40009), &v4dst()).flags(tcp::FIN | tcp::ACK).build());
            fx.run(&Pkt::tcp4(&c4(40009), &v4dst()).flags(tcp::RST).build());
            assert_eq!(fx.conns(want), 0);
        }),
    );
    row(
        "a SYN reusing a closing flow's tuple is admitted anew",
        Box::new(|fx| {
            fx.install(&web4(three4(100)));
            let key = fkey(&c4(40010), &v4dst(), PROTO_TCP);
            let want = fx.first(1, &key);
            fx.run(&Pkt::tcp4(&c4(40010), &v4dst()).build());
            fx.run(&Pkt::tcp4(&c4(40010), &v4dst()).flags(tcp::FIN | tcp::ACK).build());
            assert_eq!(fx.conns(want), 0);
            fx.expect(&Pkt::tcp4(&c4(40010), &v4dst()).build(), XDP_TX, Stat::Forwarded);
            assert_eq!(fx.conns(want), 1);
            assert_eq!(fx.flow(&key).expect("flow").state, FLOW_SYN_SEEN);
        }),
    );
    row(
        "mid-stream ACK without a flow is adopted by the ring",
        Box::new(|fx| {
            fx.install(&web4(three4(100)));
            let key = fkey(&c4(40011), &v4dst(), PROTO_TCP);
            let want = fx.first(1, &key);
            let f = Pkt::tcp4(&c4(40011), &v4dst()).flags(tcp::ACK | tcp::PSH).payload(b"GET /").build();
            assert_l2dsr(&fx.expect(&f, XDP_TX, Stat::Forwarded).data, &f, want);
            let flow = fx.flow(&key).expect("adopted");
            assert_eq!((flow.adopted, flow.state, flow.counted != 0), (1, FLOW_ESTABLISHED, true), "holds a slot");
            assert_eq!(fx.conns(want), 1);
            assert_eq!(fx.x.tables().backend_stats(want).expect("b").adopted, 1);
        }),
    );
    row(
        "adoption is never refused, even at the limit",
        Box::new(|fx| {
            fx.install(&web4(vec![b(1, "10.0.1.11", 1)]));
            fx.run(&Pkt::tcp4(&c4(40012), &v4dst()).build());
            let f = Pkt::tcp4(&c4(40013), &v4dst()).flags(tcp::ACK).build();
            assert_l2dsr(&fx.expect(&f, XDP_TX, Stat::Forwarded).data, &f, 1);
            assert_eq!(fx.conns(1), 2, "an adopted connection still counts as open");
        }),
    );
    row(
        "mid-stream FIN without a flow is adopted as closing, holding no slot",
        Box::new(|fx| {
            fx.install(&web4(three4(100)));
            let key = fkey(&c4(40014), &v4dst(), PROTO_TCP);
            let want = fx.first(1, &key);
            fx.expect(&Pkt::tcp4(&c4(40014), &v4dst()).flags(tcp::FIN | tcp::ACK).build(), XDP_TX, Stat::Forwarded);
            assert_eq!(fx.flow(&key).expect("flow").state, FLOW_CLOSING);
            assert_eq!(fx.conns(want), 0);
        }),
    );
    row(
        "limit reached: v4 SYN answered with a correct RST+ACK",
        Box::new(|fx| {
            fx.install(&web4(vec![b(1, "10.0.1.11", 1)]));
            fx.expect(&Pkt::tcp4(&c4(40015), &v4dst()).build(), XDP_TX, Stat::Forwarded);
            let syn = Pkt::tcp4(&c4(40016), &v4dst()).build();
            let out = fx.expect(&syn, XDP_TX, Stat::RefusedRst);
            assert_rst(&out.data, &syn, &c4(40016), &v4dst(), 1000);
            assert_eq!(out.data.len(), 54);
            assert_eq!(fx.conns(1), 1);
            assert_eq!(fx.refused(1, 1, Reason::BackendLimit), (1, 1));
            assert!(fx.flow(&fkey(&c4(40016), &v4dst(), PROTO_TCP)).is_none(), "a refused SYN leaves no flow");
        }),
    );
    row(
        "a node's share of a cluster-wide limit used up: refused as share_exhausted",
        Box::new(|fx| {
            fx.install(&web4(vec![B { at_limit: lb_common::AT_LIMIT_SHARE, ..b(1, "10.0.1.11", 1) }]));
            fx.expect(&Pkt::tcp4(&c4(40115), &v4dst()).build(), XDP_TX, Stat::Forwarded);
            fx.expect(&Pkt::tcp4(&c4(40116), &v4dst()).build(), XDP_TX, Stat::RefusedRst);
            assert_eq!(fx.refused(1, 1, Reason::ShareExhausted), (1, 1));
            assert_eq!(fx.refused(1, 1, Reason::BackendLimit), (0, 0));
        }),
    );
    row(
        "limit reached: v6 SYN answered with a correct RST+ACK",
        Box::new(|fx| {
            fx.install(&web6(vec![b(4, "2001:db8:1::14", 1)]));
            fx.run(&Pkt::tcp6(&c6(40017), &v6dst()).build());
            let syn = Pkt::tcp6(&c6(40018), &v6dst()).build();
            let out = fx.expect(&syn, XDP_TX, Stat::RefusedRst);
            assert_rst(&out.data, &syn, &c6(40018), &v6dst(), 1000);
            assert_eq!(out.data.len(), 74);
            assert_eq!(fx.refused(2, 4, Reason::BackendLimit), (1, 1));
        }),
    );
    row(
        "limit reached: RST for a SYN with options and a VLAN tag",
        Box::new(|fx| {
            fx.install(&web4(vec![b(1, "10.0.1.11", 0)]));
            let mut p = Pkt::tcp4(&c4(40019), &v4dst()).with_vlan(7);
            p.tcp_mut().options = vec![2, 4, 5, 0xb4, 1, 3, 3, 7];
            p.tcp_mut().seq = 0xffff_ffff;
            p.v4_mut().options = vec![1; 4];
            let syn = p.build();
            let out = fx.expect(&syn, XDP_TX, Stat::RefusedRst);
            assert_rst(&out.data, &syn, &c4(40019), &v4dst(), 0xffff_ffff);
            assert_eq!(&out.data[12..16], &syn[12..16], "VLAN tag kept");
            assert_eq!(out.data.len(), 58);
        }),
    );
    row(
        "reject = drop drops the SYN",
        Box::new(|fx| {
            let mut s = web4(vec![b(1, "10.0.1.11", 0)]);
            s.reject = REJECT_DROP;
            fx.install(&s);
            fx.expect(&Pkt::tcp4(&c4(40020), &v4dst()).build(), XDP_DROP, Stat::RefusedDrop);
            assert_eq!(fx.refused(1, 1, Reason::BackendLimit), (1, 1));
        }),
    );
    row(
        "spill: the first choice is full, the next candidate takes the flow",
        Box::new(|fx| {
            let mut s = web4(three4(100));
            s.spill = 2;
            fx.install(&s);
            let key = fkey(&c4(40021), &v4dst(), PROTO_TCP);
            let cands = maglev::candidates(fx.ring(1), &key, 2);
            fx.set_limit(cands[0], 0);
            let f = Pkt::tcp4(&c4(40021), &v4dst()).build();
            assert_l2dsr(&fx.expect(&f, XDP_TX, Stat::Forwarded).data, &f, cands[1]);
            assert_eq!(fx.conns(cands[1]), 1);
            assert_eq!(fx.conns(cands[0]), 0, "the rolled-back attempt leaves nothing");
            assert_eq!(fx.refused(1, cands[0], Reason::BackendLimit), (0, 0), "a spilled flow is not a refusal");
        }),
    );
    row(
        "spill exhausted: service_saturated",
        Box::new(|fx| {
            let mut s = web4(three4(0));
            s.spill = 3;
            fx.install(&s);
            let key = fkey(&c4(40022), &v4dst(), PROTO_TCP);
            let first = fx.first(1, &key);
            let syn = Pkt::tcp4(&c4(40022), &v4dst()).build();
            assert_rst(&fx.expect(&syn, XDP_TX, Stat::RefusedRst).data, &syn, &c4(40022), &v4dst(), 1000);
            assert_eq!(fx.refused(1, first, Reason::ServiceSaturated), (1, 1));
            for id in 1..=3 {
                assert_eq!(fx.conns(id), 0);
            }
        }),
    );
    row(
        "spill exhausted with every share at 0 (a cluster-wide limit): share_exhausted, the allocator's demand",
        Box::new(|fx| {
            let mut s = web4(three4(0).into_iter().map(|b| B { at_limit: lb_common::AT_LIMIT_SHARE, ..b }).collect());
            s.spill = 3;
            fx.install(&s);
            let key = fkey(&c4(40023), &v4dst(), PROTO_TCP);
            let first = fx.first(1, &key);
            fx.expect(&Pkt::tcp4(&c4(40023), &v4dst()).build(), XDP_TX, Stat::RefusedRst);
            assert_eq!(fx.refused(1, first, Reason::ShareExhausted), (1, 1));
            assert_eq!(fx.refused(1, first, Reason::ServiceSaturated), (0, 0));
        }),
    );
    row(
        "draining backend takes no new flow (no spill): backend_draining",
        Box::new(|fx| {
            fx.install(&web4(three4(100)));
            let key = fkey(&c4(40023), &v4dst(), PROTO_TCP);
            let first = fx.first(1, &key);
            fx.set_state(first, BACKEND_DRAINING);
            fx.expect(&Pkt::tcp4(&c4(40023), &v4dst()).build(), XDP_TX, Stat::RefusedRst);
            assert_eq!(fx.refused(1, first, Reason::BackendDraining), (1, 1));
        }),
    );
    row(
        "draining backend with spill: the flow goes elsewhere",
        Box::new(|fx| {
            let mut s = web4(three4(100));
            s.spill = 1;
            fx.install(&s);
            let key = fkey(&c4(40024), &v4dst(), PROTO_TCP);
            let cands = maglev::candidates(fx.ring(1), &key, 1);
            fx.set_state(cands[0], BACKEND_DRAINING);
            let f = Pkt::tcp4(&c4(40024), &v4dst()).build();
            assert_l2dsr(&fx.expect(&f, XDP_TX, Stat::Forwarded).data, &f, cands[1]);
        }),
    );
    row(
        "down backend: backend_down",
        Box::new(|fx| {
            fx.install(&web4(three4(100)));
            let key = fkey(&c4(40025), &v4dst(), PROTO_TCP);
            let first = fx.first(1, &key);
            fx.set_state(first, BACKEND_DOWN);
            fx.expect(&Pkt::tcp4(&c4(40025), &v4dst()).build(), XDP_TX, Stat::RefusedRst);
            assert_eq!(fx.refused(1, first, Reason::BackendDown), (1, 1));
        }),
    );
    row(
        "existing flows continue on a draining backend",
        Box::new(|fx| {
            fx.install(&web4(three4(100)));
            let key = fkey(&c4(40026), &v4dst(), PROTO_TCP);
            let first = fx.first(1, &key);
            fx.run(&Pkt::tcp4(&c4(40026), &v4dst()).build());
            fx.set_state(first, BACKEND_DRAINING);
            let f = Pkt::tcp4(&c4(40026), &v4dst()).flags(tcp::ACK).build();
            assert_l2dsr(&fx.expect(&f, XDP_TX, Stat::Forwarded).data, &f, first);
        }),
    );
    row(
        "existing flows continue on a down backend",
        Box::new(|fx| {
            fx.install(&web4(three4(100)));
            let first = fx.first(1, &fkey(&c4(40027), &v4dst(), PROTO_TCP));
            fx.run(&Pkt::tcp4(&c4(40027), &v4dst()).build());
            fx.set_state(first, BACKEND_DOWN);
            let f = Pkt::tcp4(&c4(40027), &v4dst()).flags(tcp::ACK).build();
            assert_l2dsr(&fx.expect(&f, XDP_TX, Stat::Forwarded).data, &f, first);
        }),
    );
    row(
        "lowering a limit never breaks an existing flow",
        Box::new(|fx| {
            fx.install(&web4(vec![b(1, "10.0.1.11", 10)]));
            for p in [40028, 40029, 40030] {
                fx.run(&Pkt::tcp4(&c4(p), &v4dst()).build());
            }
            fx.set_limit(1, 1);
            for p in [40028, 40029, 40030] {
                let f = Pkt::tcp4(&c4(p), &v4dst()).flags(tcp::ACK).build();
                assert_l2dsr(&fx.expect(&f, XDP_TX, Stat::Forwarded).data, &f, 1);
            }
            assert_eq!(fx.conns(1), 3);
            fx.expect(&Pkt::tcp4(&c4(40031), &v4dst()).build(), XDP_TX, Stat::RefusedRst);
        }),
    );
    row(
        "no backend in the ring: no_backend",
        Box::new(|fx| {
            fx.install(&web4(vec![B { weight: 0, ..b(1, "10.0.1.11", 10) }]));
            fx.expect(&Pkt::tcp4(&c4(40032), &v4dst()).build(), XDP_TX, Stat::RefusedRst);
            assert_eq!(fx.refused(1, 0, Reason::NoBackend), (1, 1));
        }),
    );
    row(
        "a full flow table refuses new flows and evicts nothing",
        Box::new(|fx| {
            fx.install(&web4(three4(1000)));
            for p in 0..FLOW_CAPACITY {
                let f = Pkt::tcp4(&c4(41000 + p as u16), &v4dst()).build();
                assert_eq!(fx.run(&f).verdict, XDP_TX);
            }
            let before: u64 = (1..=3).map(|id| fx.conns(id)).sum();
            assert_eq!(before, u64::from(FLOW_CAPACITY));
            let syn = Pkt::tcp4(&c4(42000), &v4dst()).build();
            fx.expect(&syn, XDP_TX, Stat::RefusedRst);
            let first = fx.first(1, &fkey(&c4(42000), &v4dst(), PROTO_TCP));
            assert_eq!(fx.refused(1, first, Reason::FlowTableFull), (1, 1));
            assert_eq!((1..=3).map(|id| fx.conns(id)).sum::<u64>(), before, "the failed insert gave its slot back");
            assert_eq!(fx.x.tables().flows().expect("flows").len(), FLOW_CAPACITY as usize, "nothing evicted");
            // Established flows still work.
            let f = Pkt::tcp4(&c4(41000), &v4dst()).flags(tcp::ACK).build();
            fx.expect(&f, XDP_TX, Stat::Forwarded);
        }),
    );
    row(
        "ipip: IPv4 in IPv4 to the gateway, valid outer header",
        Box::new(|fx| {
            let mut s = web4(three4(100));
            s.mode = MODE_IPIP;
            fx.install(&s);
            let key = fkey(&c4(40033), &v4dst(), PROTO_TCP);
            let want = fx.first(1, &key);
            let f = Pkt::tcp4(&c4(40033), &v4dst()).payload(b"hello").build();
            let out = fx.expect(&f, XDP_TX, Stat::Forwarded);
            let addr = ["10.0.1.11", "10.0.1.12", "10.0.1.13"][want as usize - 1];
            assert_encap(&out.data, &f, 14, 14, addr);
            assert_eq!(out.data[14 + 9], 4, "protocol IPIP");
            // Flow-stable outer source: the low 16 bits come from the flow hash.
            let h = flow_hash(&key).to_be_bytes();
            assert_eq!(&out.data[14 + 12..14 + 16], &[172, 16, h[2], h[3]]);
            let again = fx.run(&Pkt::tcp4(&c4(40033), &v4dst()).flags(tcp::ACK).build());
            assert_eq!(&again.data[14 + 12..14 + 16], &out.data[14 + 12..14 + 16], "same flow, same outer source");
        }),
    );
    row(
        "ipip: IPv6 in IPv6 (IP6IP6)",
        Box::new(|fx| {
            let mut s = web6(two6(100));
            s.mode = MODE_IPIP;
            fx.install(&s);
            let want = fx.first(2, &fkey(&c6(40034), &v6dst(), PROTO_TCP));
            let f = Pkt::tcp6(&c6(40034), &v6dst()).build();
            let out = fx.expect(&f, XDP_TX, Stat::Forwarded);
            assert_encap(&out.data, &f, 14, 14, ["2001:db8:1::14", "2001:db8:1::15"][want as usize - 4]);
            assert_eq!(out.data[14 + 6], 41, "next header IPv6");
        }),
    );
    row(
        "ipip: IPv4 client to an IPv6 backend (4in6)",
        Box::new(|fx| {
            let mut s = web4(vec![b(4, "2001:db8:1::14", 100)]);
            s.mode = MODE_IPIP;
            fx.install(&s);
            let f = Pkt::tcp4(&c4(40035), &v4dst()).build();
            let out = fx.expect(&f, XDP_TX, Stat::Forwarded);
            assert_eq!(&out.data[12..14], &[0x86, 0xdd], "IPv6 EtherType");
            assert_encap(&out.data, &f, 14, 14, "2001:db8:1::14");
            assert_eq!(out.data[14 + 6], 4, "next header IPv4");
        }),
    );
    row(
        "ipip: VLAN tag kept in front of the outer header",
        Box::new(|fx| {
            let mut s = web4(vec![b(1, "10.0.1.11", 100)]);
            s.mode = MODE_IPIP;
            fx.install(&s);
            let f = Pkt::tcp4(&c4(40036), &v4dst()).with_vlan(300).build();
            let out = fx.expect(&f, XDP_TX, Stat::Forwarded);
            assert_eq!(&out.data[12..18], &f[12..18], "802.1Q tag and EtherType");
            assert_encap(&out.data, &f, 18, 18, "10.0.1.11");
        }),
    );
    row(
        "ipip refusal still answers the client directly with a RST",
        Box::new(|fx| {
            let mut s = web4(vec![b(1, "10.0.1.11", 0)]);
            s.mode = MODE_IPIP;
            fx.install(&s);
            let syn = Pkt::tcp4(&c4(40037), &v4dst()).build();
            assert_rst(&fx.expect(&syn, XDP_TX, Stat::RefusedRst).data, &syn, &c4(40037), &v4dst(), 1000);
        }),
    );
    row(
        "IPv4 fragment to a VIP: dropped and charged to the service",
        Box::new(|fx| {
            fx.install(&web4(three4(100)));
            let mut p = Pkt::udp4(&c4(40038), &v4dst());
            p.v4_mut().dont_frag = false;
            p.v4_mut().more_frags = true;
            fx.expect(&p.build(), XDP_DROP, Stat::FragmentDropped);
            assert_eq!(fx.refused(1, 0, Reason::Fragment), (1, 1));
        }),
    );
    row(
        "IPv6 fragment to a VIP: dropped",
        Box::new(|fx| {
            fx.install(&web6(two6(100)));
            let mut p = Pkt::tcp6(&c6(40039), &v6dst());
            p.v6_mut().ext = vec![(44, vec![0, 0, 0, 0, 0, 1])];
            fx.expect(&p.build(), XDP_DROP, Stat::FragmentDropped);
        }),
    );
    row(
        "fragment to another address: passed",
        Box::new(|fx| {
            fx.install(&web4(three4(100)));
            let mut p = Pkt::udp4(&c4(40040), "10.0.0.99:80");
            p.v4_mut().dont_frag = false;
            p.v4_mut().frag_offset = 10;
            fx.expect(&p.build(), XDP_PASS, Stat::Fragment);
        }),
    );
    row(
        "malformed TCP to a VIP: passed, charged as malformed",
        Box::new(|fx| {
            fx.install(&web4(three4(100)));
            let mut p = Pkt::tcp4(&c4(40041), &v4dst());
            p.tcp_mut().doff_override = Some(3);
            fx.expect(&p.build(), XDP_PASS, Stat::BadTcp);
            assert_eq!(fx.refused(1, 0, Reason::Malformed), (1, 1));
            let mut p = Pkt::udp4(&c4(40041), &v4dst());
            p.v4_mut().l4 = L4::Raw { proto: PROTO_TCP, payload: vec![0; 7] };
            fx.expect(&p.build(), XDP_PASS, Stat::TruncatedTcp);
        }),
    );
    row(
        "ICMP echo to a VIP is answered",
        Box::new(|fx| {
            fx.install(&web4(three4(100)));
            let f = Pkt::icmp4_echo("10.0.0.1", VIP4).build();
            let out = fx.expect(&f, XDP_TX, Stat::IcmpEchoReplied);
            let s = parse(&out.data);
            let Some(NetSlice::Ipv4(ip)) = &s.net else { panic!("ipv4") };
            assert_eq!(ip.header().source_addr(), VIP4.parse::<Ipv4Addr>().expect("vip"));
            assert_eq!(ip.header().destination_addr(), Ipv4Addr::new(10, 0, 0, 1));
            assert_eq!(ip.header().to_header().calc_header_checksum(), ip.header().header_checksum());
            let Some(TransportSlice::Icmpv4(i)) = &s.transport else { panic!("icmp") };
            assert_eq!(i.type_u8(), 0, "echo reply");
            assert_eq!(checksum(&[i.slice()]), 0, "ICMP checksum");
            assert_eq!(&out.data[..6], &f[6..12]);
        }),
    );
    row(
        "ICMPv6 echo to a VIP is answered",
        Box::new(|fx| {
            fx.install(&web6(two6(100)));
            let f = Pkt::icmp6_echo("2001:db8::1", VIP6).build();
            let out = fx.expect(&f, XDP_TX, Stat::IcmpEchoReplied);
            let s = parse(&out.data);
            let Some(NetSlice::Ipv6(ip)) = &s.net else { panic!("ipv6") };
            assert_eq!(ip.header().source_addr(), VIP6.parse::<Ipv6Addr>().expect("vip"));
            let Some(TransportSlice::Icmpv6(i)) = &s.transport else { panic!("icmpv6") };
            assert_eq!(i.type_u8(), 129);
            let h = ip.header();
            let want = i.header().icmp_type.calc_checksum(h.source(), h.destination(), i.payload()).expect("csum");
            assert_eq!(i.checksum(), want, "ICMPv6 checksum");
        }),
    );
    row(
        "ICMP echo to another address is passed",
        Box::new(|fx| {
            fx.install(&web4(three4(100)));
            fx.expect(&Pkt::icmp4_echo("10.0.0.1", "10.0.0.99").build(), XDP_PASS, Stat::OtherL4);
        }),
    );
    row(
        "ICMP fragmentation-needed about a VIP flow goes to its backend",
        Box::new(|fx| {
            fx.install(&web4(three4(100)));
            let want = fx.first(1, &fkey(&c4(40042), &v4dst(), PROTO_TCP));
            fx.run(&Pkt::tcp4(&c4(40042), &v4dst()).build());
            // What the router quotes: the backend's too-big packet, VIP:80 → client:40042.
            let quoted = Pkt::tcp4(&v4dst(), &c4(40042)).flags(tcp::ACK).build();
            let mut body = quoted[14..14 + 28].to_vec();
            body.truncate(28);
            let mut p = Pkt::icmp4_echo("192.0.2.1", VIP4);
            *p.l4_mut() = L4::Icmp { typ: 3, code: 4, rest: [0, 0, 0x05, 0xdc], body };
            let f = p.build();
            assert_l2dsr(&fx.expect(&f, XDP_TX, Stat::IcmpErrorForwarded).data, &f, want);
        }),
    );
    row(
        "ICMPv6 packet-too-big about a VIP flow goes to its backend",
        Box::new(|fx| {
            fx.install(&web6(two6(100)));
            let want = fx.first(2, &fkey(&c6(40043), &v6dst(), PROTO_TCP));
            fx.run(&Pkt::tcp6(&c6(40043), &v6dst()).build());
            let quoted = Pkt::tcp6(&v6dst(), &c6(40043)).flags(tcp::ACK).build();
            let mut p = Pkt::icmp6_echo("2001:db8:ffff::1", VIP6);
            *p.l4_mut() = L4::Icmp { typ: 2, code: 0, rest: [0, 0, 0x05, 0x00], body: quoted[14..14 + 48].to_vec() };
            let f = p.build();
            assert_l2dsr(&fx.expect(&f, XDP_TX, Stat::IcmpErrorForwarded).data, &f, want);
        }),
    );
    row(
        "ICMP fragmentation-needed without a flow is passed",
        Box::new(|fx| {
            fx.install(&web4(three4(100)));
            let quoted = Pkt::tcp4(&v4dst(), &c4(40044)).flags(tcp::ACK).build();
            let mut p = Pkt::icmp4_echo("192.0.2.1", VIP4);
            *p.l4_mut() = L4::Icmp { typ: 3, code: 4, rest: [0, 0, 0x05, 0xdc], body: quoted[14..14 + 28].to_vec() };
            fx.expect(&p.build(), XDP_PASS, Stat::IcmpPassed);
        }),
    );
    row(
        "refusals are sampled into the event ring buffer",
        Box::new(|fx| {
            fx.install(&web4(vec![b(1, "10.0.1.11", 0)]));
            let mut ring = aya::maps::RingBuf::try_from(fx.x.ebpf.map_mut("EVENTS").expect("EVENTS")).expect("ringbuf");
            while ring.next().is_some() {}
            drop(ring);
            fx.run(&Pkt::tcp4(&c4(40045), &v4dst()).build());
            let mut ring = aya::maps::RingBuf::try_from(fx.x.ebpf.map_mut("EVENTS").expect("EVENTS")).expect("ringbuf");
            let item = ring.next().expect("an event");
            assert_eq!(item.len(), size_of::<lb_common::RefusalEvent>());
            // SAFETY: the ring buffer holds RefusalEvent records written by the datapath.
            let ev: lb_common::RefusalEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            assert_eq!(ev.reason, Reason::BackendLimit as u8);
            assert_eq!((ev.service_id, ev.backend_id, ev.proto), (1, 1, PROTO_TCP));
            assert_eq!(ev.sport_be, 40045u16.to_be_bytes());
            assert_eq!(&ev.src[..4], &[10, 0, 0, 1]);
        }),
    );
    rows
}

#[test]
fn datapath_table() {
    let mut fx = Fx::new();
    let rows = rows();
    assert!(rows.len() >= 40, "{} rows", rows.len());
    let mut failures = Vec::new();
    for (name, f) in &rows {
        fx.reset();
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(&mut fx))) {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned())).unwrap_or_default();
            failures.push(format!("{name}: {msg}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} rows failed:\n{}", failures.len(), rows.len(), failures.join("\n"));
}

#[test]
fn decapsulator_strips_outer_headers() {
    let mut x = XdpRunner::decap();
    let inner4 = Pkt::tcp4(&c4(1), &v4dst()).payload(b"x").build();
    let inner6 = Pkt::tcp6(&c6(1), &v6dst()).build();
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        ("ipip", Pkt::tcp4(&c4(1), &v4dst()).payload(b"x").encap4("172.16.0.1", "10.0.1.11").build(), inner4.clone()),
        ("ip6ip6", Pkt::tcp6(&c6(1), &v6dst()).encap6("fd00:511c::1", "2001:db8:1::14").build(), inner6.clone()),
        ("4in6", Pkt::tcp4(&c4(1), &v4dst()).payload(b"x").encap6("fd00:511c::1", "2001:db8:1::14").build(), inner4.clone()),
        ("6in4", Pkt::tcp6(&c6(1), &v6dst()).encap4("172.16.0.1", "10.0.1.11").build(), inner6.clone()),
    ];
    for (name, frame, want) in cases {
        let before = x.stats();
        let res = x.run(&frame);
        assert_eq!(res.verdict, XDP_PASS, "{name}");
        assert_eq!(res.data, want, "{name}: output is the inner packet with the original MACs");
        assert_eq!(x.stats().get(Stat::Decapsulated).packets - before.get(Stat::Decapsulated).packets, 1, "{name}");
    }
    let vlan = Pkt::tcp4(&c4(1), &v4dst()).with_vlan(9).encap4("172.16.0.1", "10.0.1.11").build();
    let want = Pkt::tcp4(&c4(1), &v4dst()).with_vlan(9).build();
    assert_eq!(x.run(&vlan).data, want, "VLAN kept");
    let plain = Pkt::tcp4(&c4(1), &v4dst()).build();
    let before = x.stats();
    let res = x.run(&plain);
    assert_eq!((res.verdict, res.data.clone()), (XDP_PASS, plain), "not encapsulated: untouched");
    assert_eq!(x.stats().get(Stat::DecapPassthrough).packets - before.get(Stat::DecapPassthrough).packets, 1);
    let _ = LB_MAC;
}
