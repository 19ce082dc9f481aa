//! `ipip` without a configured gateway: the next hop comes from the kernel's FIB
//! (`bpf_fib_lookup`) of the namespace the packet arrived in, resolved to a neighbour's MAC.
//! Runs BPF_PROG_TEST_RUN from a thread inside a private namespace whose routes and
//! neighbours the test sets up.

use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use lb_common::{Config, Stat, MODE_IPIP, PROG_BALANCER};
use lb_userspace::datapath::LoadOptions;
use sluice_tests::{
    netns::{veth, Netns},
    packet::Pkt,
    testrun::{OneBackend, XdpRunner, XDP_DROP, XDP_TX},
};

const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x60, 0x02];

fn install(x: &mut XdpRunner, id: u32, backend: [u8; 4], port: u16) {
    x.install_one(&OneBackend { backend, mac: [0; 6], mode: MODE_IPIP, ..OneBackend::new(id, port, 100) });
}

#[test]
fn ipip_next_hop_comes_from_the_fib_and_neighbour_table() {
    let lb = Netns::new("fib");
    let peer = Netns::new("fibgw");
    veth(&lb, "lb0", &peer, "gw0");
    lb.addr_add("lb0", "10.60.0.1/24");
    lb.ip(&["neigh", "replace", "10.60.0.2", "lladdr", "02:00:00:00:60:02", "dev", "lb0", "nud", "permanent"]);
    lb.route_add("10.61.0.0/24", "10.60.0.2");
    // bpf_fib_lookup answers only for interfaces that forward (as a load balancer host must).
    let out = lb.output("sysctl", &["-qw", "net.ipv4.conf.all.forwarding=1", "net.ipv4.conf.lb0.forwarding=1"]);
    assert!(out.status.success(), "sysctl: {}", String::from_utf8_lossy(&out.stderr));
    let lb_mac = lb.mac("lb0");

    let mut x = XdpRunner::balancer_with(&LoadOptions { config: Config { has_gateway: 0, ..Config::DEFAULT }, flow_capacity: 64, ring_slots: 64 });
    install(&mut x, 1, [10, 61, 0, 11], 80); // routed via 10.60.0.2
    install(&mut x, 2, [10, 99, 0, 11], 81); // no route
    let before = x.stats();
    let prog: &Xdp = x.ebpf.program(PROG_BALANCER).expect("program").try_into().expect("xdp");
    let (routed, unrouted) = lb.run(|| {
        let ifindex = nix::net::if_::if_nametoindex("lb0").expect("lb0");
        let run = |frame: &[u8]| {
            // xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
            let ctx: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
            let ctx_bytes: Vec<u8> = ctx.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let mut out = vec![0u8; frame.len() + 64];
            let r = prog.test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ctx_in: Some(&ctx_bytes), ..TestRunOptions::new() }).expect("test run");
            out.truncate(r.data_size_out as usize);
            (r.return_value, out)
        };
        (run(&Pkt::tcp4("10.0.0.1:40000", "10.0.0.100:80").build()), run(&Pkt::tcp4("10.0.0.1:40000", "10.0.0.100:81").build()))
    });
    assert_eq!(routed.0, XDP_TX);
    assert_eq!(&routed.1[..6], &GW_MAC, "destination MAC: the route's next hop, from the neighbour table");
    assert_eq!(&routed.1[6..12], &lb_mac, "source MAC: the egress interface's");
    assert_eq!(&routed.1[14 + 16..14 + 20], &[10, 61, 0, 11], "outer destination: the backend");
    assert_eq!(unrouted.0, XDP_DROP, "no route to the backend");
    let after = x.stats();
    assert_eq!(after.get(Stat::NoRoute).packets - before.get(Stat::NoRoute).packets, 1);
    assert_eq!(after.get(Stat::Forwarded).packets - before.get(Stat::Forwarded).packets, 1);
}
