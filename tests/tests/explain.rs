//! `explain` agrees with the datapath: for thousands of random new flows, the prediction made
//! just before the SYN (admitted to which backend, or refused and why) is what the real
//! program then does — across spill, draining and limits being reached on the way. And an
//! existing flow is explained as such.

use std::{net::SocketAddr, path::Path};

use lb_common::Reason;
use lb_userspace::{
    config::{self, Proto},
    datapath::LoadOptions,
    explain::{explain, Verdict},
    reconcile::Applied,
};
use sluice_tests::{
    packet::{tcp, Pkt, CLIENT_MAC},
    testrun::{XdpRunner, XDP_TX},
};

const CFG: &str = r#"
[daemon]
interface = "lo"
[flows]
capacity = 8192
[[service]]
name = "spill"
vip = "10.0.0.100"
port = 80
proto = "tcp"
ring_size = 257
overflow = { spill = 2, reject = "rst" }
[[service.backend]]
address = "10.0.1.11"
max_conns = 300
mac = "02:bb:00:00:00:0b"
[[service.backend]]
address = "10.0.1.12"
max_conns = 500
mac = "02:bb:00:00:00:0c"
[[service.backend]]
address = "10.0.1.13"
max_conns = 400
mac = "02:bb:00:00:00:0d"
[[service.backend]]
address = "10.0.1.14"
max_conns = 100
drain = true
mac = "02:bb:00:00:00:0e"
[[service]]
name = "strict"
vip = "10.0.0.101"
port = 443
proto = "tcp"
ring_size = 257
[[service.backend]]
address = "10.0.1.21"
max_conns = 200
mac = "02:bb:00:00:00:15"
[[service.backend]]
address = "10.0.1.22"
max_conns = 350
mac = "02:bb:00:00:00:16"
"#;

#[test]
fn explain_predicts_the_datapath_for_3000_random_flows() {
    let (cfg, _) = config::parse(Path::new("explain.toml"), CFG).unwrap_or_else(|e| panic!("{e}"));
    let mut x = XdpRunner::balancer_with(&LoadOptions { flow_capacity: 8192, ring_slots: 4 * 257, ..LoadOptions::default() });
    let mut applied = Applied::new(4 * 257);
    applied.apply(&mut x.tables(), &cfg, &|_| None, |t, id| t.conns(id).expect("conns")).expect("apply");

    let mut seed: u64 = 0x5eed;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut admitted, mut refused, mut spilled) = (0, 0, 0);
    for i in 0..3000 {
        let r = rnd();
        let src: SocketAddr = format!("10.{}.{}.{}:{}", 20 + (r % 50), (r >> 8) % 256, (r >> 16) % 256, 1024 + (r >> 24) % 60000).parse().expect("src");
        let dst: SocketAddr = if r >> 40 & 1 == 0 { "10.0.0.100:80" } else { "10.0.0.101:443" }.parse().expect("dst");
        let e = explain(&applied, &x.tables().read(), src, dst, Proto::Tcp).expect("explain");
        if matches!(e.verdict, Verdict::ExistingFlow { .. }) {
            continue; // a random tuple repeated
        }
        let before = x.tables().service_stats(u32::from(dst.port() == 443)).expect("stats").refused;
        let out = x.run(&Pkt::tcp4(&src.to_string(), &dst.to_string()).build());
        assert_eq!(out.verdict, XDP_TX, "flow {i}");
        match &e.verdict {
            Verdict::Admitted { backend, spilled: s } => {
                let last = backend.to_string().rsplit('.').next().expect("octet").parse::<u8>().expect("octet");
                assert_eq!(out.data[5], last, "flow {i}: explain said {backend}: {}", e.summary);
                assert_ne!(out.data[..6], CLIENT_MAC, "flow {i}: admitted, not refused");
                admitted += 1;
                spilled += u32::from(*s);
            }
            Verdict::Refused { reason, .. } => {
                assert_eq!(out.data[..6], CLIENT_MAC, "flow {i}: explain said refused ({reason}), datapath forwarded");
                let after = x.tables().service_stats(u32::from(dst.port() == 443)).expect("stats").refused;
                let r = Reason::ALL.iter().find(|r| r.name() == *reason).expect("a datapath reason");
                assert_eq!(after.get(*r), before.get(*r) + 1, "flow {i}: refusal counted as {reason}");
                refused += 1;
            }
            v => panic!("flow {i}: {v:?}"),
        }
    }
    assert!(admitted > 1000 && refused > 100 && spilled > 50, "admitted {admitted}, refused {refused}, spilled {spilled}: the run must exercise every branch");

    // An existing flow is explained as one.
    let src: SocketAddr = "10.99.0.1:5555".parse().expect("src");
    let dst: SocketAddr = "10.0.0.101:443".parse().expect("dst");
    x.run(&Pkt::tcp4(&src.to_string(), &dst.to_string()).flags(tcp::ACK).build()); // adopted
    let e = explain(&applied, &x.tables().read(), src, dst, Proto::Tcp).expect("explain");
    assert!(matches!(e.verdict, Verdict::ExistingFlow { .. }), "{e:?}");
    let e = explain(&applied, &x.tables().read(), src, "10.0.0.102:80".parse().expect("dst"), Proto::Tcp).expect("explain");
    assert!(matches!(e.verdict, Verdict::NotService), "{e:?}");

    // With its service removed, the flow still goes to its backend, and explain says so.
    let Verdict::ExistingFlow { backend, .. } = explain(&applied, &x.tables().read(), src, dst, Proto::Tcp).expect("explain").verdict else { panic!("an existing flow") };
    let mut gone = cfg.clone();
    gone.services.retain(|s| s.port != 443);
    applied.apply(&mut x.tables(), &gone, &|_| None, |t, id| t.conns(id).expect("conns")).expect("remove a service");
    let e = explain(&applied, &x.tables().read(), src, dst, Proto::Tcp).expect("explain");
    assert_eq!(e.verdict, Verdict::ExistingFlow { backend, state: lb_common::FLOW_ESTABLISHED }, "{}", e.summary);
    let out = x.run(&Pkt::tcp4(&src.to_string(), &dst.to_string()).flags(tcp::ACK).build());
    assert_eq!((out.verdict, out.data[5]), (XDP_TX, backend.to_string().rsplit('.').next().expect("octet").parse::<u8>().expect("octet")));
}
