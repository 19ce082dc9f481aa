//! Config → datapath, checked through the real program: applying a config routes SYNs to the
//! backends userspace predicts; a reload that removes a backend drains it (its open flow
//! continues, no new flow reaches it); limit changes land; removing a service stops
//! balancing new flows while open ones continue; a config that cannot be applied changes
//! nothing.

use std::{net::IpAddr, path::Path};

use lb_common::{FlowKey, Stat, BACKEND_DRAINING};
use lb_userspace::{
    config::{self, Config},
    datapath::LoadOptions,
    maglev,
    reconcile::Applied,
};
use sluice_tests::{
    packet::{tcp, Pkt, PROTO_TCP},
    testrun::{XdpRunner, XDP_PASS, XDP_TX},
};

const RING_SLOTS: u32 = 4 * 257;

fn cfg(backends: &[(&str, u32)]) -> Config {
    let mut text = String::from("[daemon]\ninterface = \"lo\"\n[[service]]\nname = \"web\"\nvip = \"10.0.0.100\"\nport = 80\nproto = \"tcp\"\nring_size = 257\n");
    for (addr, max) in backends {
        text.push_str(&format!("[[service.backend]]\naddress = \"{addr}\"\nmax_conns = {max}\n"));
    }
    config::parse(Path::new("test.toml"), &text).map_or_else(|e| panic!("{e}"), |(c, _)| c)
}

fn mac_of(ip: IpAddr) -> Option<[u8; 6]> {
    match ip {
        IpAddr::V4(v) if v.octets()[2] == 1 => Some([2, 0xbb, 0, 0, 0, v.octets()[3]]),
        _ => None,
    }
}

fn key(port: u16) -> FlowKey {
    let mut k = FlowKey { proto: PROTO_TCP, sport_be: port.to_be_bytes(), dport_be: 80u16.to_be_bytes(), ..FlowKey::default() };
    k.src[..4].copy_from_slice(&[10, 0, 0, 1]);
    k.dst[..4].copy_from_slice(&[10, 0, 0, 100]);
    k
}

fn syn(port: u16) -> Vec<u8> {
    Pkt::tcp4(&format!("10.0.0.1:{port}"), "10.0.0.100:80").build()
}

/// The backend address (last octet) a frame was sent to, from its destination MAC.
fn sent_to(out: &[u8]) -> u8 {
    assert_eq!(&out[..5], &[2, 0xbb, 0, 0, 0], "sent to a backend MAC");
    out[5]
}

#[test]
fn apply_reload_drain_and_remove() {
    let mut x = XdpRunner::balancer_with(&LoadOptions { flow_capacity: 4096, ring_slots: RING_SLOTS, ..LoadOptions::default() });
    let mut applied = Applied::new(RING_SLOTS);
    let conns = |t: &mut lb_userspace::tables::Tables<'_>, id: u32| t.conns(id).expect("conns");

    // 1. Three backends: SYNs go where userspace predicts.
    let c1 = cfg(&[("10.0.1.11", 1000), ("10.0.1.12", 1000), ("10.0.1.13", 1000)]);
    let changes = applied.apply(&mut x.tables(), &c1, &mac_of, conns).expect("apply");
    assert_eq!(changes.len(), 4, "{changes:?}");
    let ring = applied.services["web"].ring.clone();
    let id_of = |applied: &Applied, last: u8| applied.services["web"].backends[&IpAddr::from([10, 0, 1, last])].id;
    let mut seen = [0u32; 256];
    for p in 1000..1300u16 {
        let out = x.run(&syn(p));

        assert_eq!(out.verdict, XDP_TX);
        let last = sent_to(&out.data);
        assert_eq!(maglev::first_choice(&ring, &key(p)), id_of(&applied, last), "port {p}");
        seen[last as usize] += 1;
    }
    assert!(seen[11] > 50 && seen[12] > 50 && seen[13] > 50, "{:?}", &seen[11..14]);

    // 2. Reload without .12: it drains. Its open flows continue; no new flow reaches it.
    let on_12 = (1000..1300u16).find(|p| maglev::first_choice(&ring, &key(*p)) == id_of(&applied, 12)).expect("a flow on .12");
    let id12 = id_of(&applied, 12);
    let base_before = applied.services["web"].ring_base();
    let c2 = cfg(&[("10.0.1.11", 1000), ("10.0.1.13", 1000)]);
    let changes = applied.apply(&mut x.tables(), &c2, &mac_of, conns).expect("reload");
    assert!(changes.iter().any(|c| c.what.contains("drain and remove backend 10.0.1.12")), "{changes:?}");
    assert_ne!(applied.services["web"].ring_base(), base_before, "the new ring went into the other half");
    assert_eq!(x.tables().backend(id12).expect("be").state, BACKEND_DRAINING);
    let ack = Pkt::tcp4(&format!("10.0.0.1:{on_12}"), "10.0.0.100:80").flags(tcp::ACK).build();
    assert_eq!(sent_to(&x.run(&ack).data), 12, "the open flow continues on the draining backend");
    for p in 2000..2200u16 {
        let out = x.run(&syn(p));
        assert_ne!(sent_to(&out.data), 12, "a new flow went to the removed backend");
    }

    // 3. Limit change lands in BACKENDS.
    let c3 = cfg(&[("10.0.1.11", 7), ("10.0.1.13", 1000)]);
    let changes = applied.apply(&mut x.tables(), &c3, &mac_of, conns).expect("limit");
    assert!(changes.iter().any(|c| c.what.contains("max_conns 1000 -> 7")), "{changes:?}");
    assert_eq!(x.tables().backend(id_of(&applied, 11)).expect("be").max_conns, 7);

    // 4. A config whose backend has no MAC is refused and changes nothing.
    let before_ring = applied.services["web"].ring.clone();
    let bad = cfg(&[("10.0.1.11", 7), ("10.0.1.13", 1000), ("10.0.9.99", 5)]);
    let err = applied.apply(&mut x.tables(), &bad, &mac_of, conns).expect_err("no MAC");
    assert!(err.to_string().contains("10.0.9.99") && err.to_string().contains("neighbour table"), "{err}");
    assert_eq!(applied.services["web"].ring, before_ring);
    assert_eq!(applied.services["web"].backends.len(), 3, ".11, .13 and the draining .12");

    // 5. Removing the service stops balancing: SYNs to the VIP are passed. A connection open
    // at the time keeps its backend (its backends drain), found by its flow entry.
    let open = x.run(&syn(2999));
    assert_eq!(open.verdict, XDP_TX);
    let its_backend = sent_to(&open.data);
    let mut empty = cfg(&[]);
    empty.services.clear();
    applied.apply(&mut x.tables(), &empty, &mac_of, conns).expect("remove");
    let before = x.stats();
    assert_eq!(x.run(&syn(3000)).verdict, XDP_PASS);
    assert_eq!(x.stats().get(Stat::Tcp4).packets - before.get(Stat::Tcp4).packets, 1);
    let ack = x.run(&Pkt::tcp4("10.0.0.1:2999", "10.0.0.100:80").flags(tcp::ACK).build());
    assert_eq!((ack.verdict, sent_to(&ack.data)), (XDP_TX, its_backend), "the open connection continues to its backend");
}

/// An apply re-plans and rewrites only the services it changes (a limit change at 10,000
/// backends is cheap), and still sees what changed outside the config: health and MACs.
#[test]
fn an_apply_rewrites_only_the_services_it_changes() {
    use lb_common::BACKEND_DOWN;
    use std::sync::Arc;
    let slots = 6 * 257;
    let mut x = XdpRunner::balancer_with(&LoadOptions { flow_capacity: 4096, ring_slots: slots, ..LoadOptions::default() });
    let text = |limit: u32| {
        let mut t = String::from("[daemon]\ninterface = \"lo\"\n");
        for s in 0..3 {
            t.push_str(&format!("[[service]]\nname = \"web{s}\"\nvip = \"10.0.0.{}\"\nport = 80\nproto = \"tcp\"\nring_size = 257\n", 100 + s));
            for b in 1..=3 {
                let max = if s == 1 && b == 1 { limit } else { 100 };
                t.push_str(&format!("[[service.backend]]\naddress = \"10.0.1.{}\"\nmax_conns = {max}\n", 10 * s + b));
            }
        }
        config::parse(Path::new("test.toml"), &t).map_or_else(|e| panic!("{e}"), |(c, _)| c)
    };
    let mut applied = Applied::new(slots);
    applied.apply(&mut x.tables(), &text(100), &mac_of, |t, id| t.conns(id).unwrap_or(0)).expect("apply");
    let before: Vec<_> = applied.services.values().cloned().collect();
    let same = |a: &Applied, before: &[Arc<lb_userspace::reconcile::AppliedService>]| -> Vec<bool> { before.iter().map(|b| Arc::ptr_eq(&a.services[&b.name], b)).collect() };

    // A limit change in web1: only web1 is rewritten, and the datapath has the new limit.
    let changes = applied.apply(&mut x.tables(), &text(7), &mac_of, |t, id| t.conns(id).unwrap_or(0)).expect("apply");
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(same(&applied, &before), [true, false, true]);
    let id = applied.services["web1"].backends[&"10.0.1.11".parse::<IpAddr>().expect("ip")].id;
    assert_eq!(x.tables().backend(id).expect("backend").max_conns, 7);

    // The same config with a backend of web0 down (health checks): web0 is rewritten.
    let before: Vec<_> = applied.services.values().cloned().collect();
    let down: IpAddr = "10.0.1.2".parse().expect("ip");
    applied.down.insert(lb_userspace::key::BackendKey::new("web0", down));
    applied.apply(&mut x.tables(), &text(7), &mac_of, |t, id| t.conns(id).unwrap_or(0)).expect("apply");
    assert_eq!(same(&applied, &before), [false, true, true]);
    let id = applied.services["web0"].backends[&down].id;
    assert_eq!(x.tables().backend(id).expect("backend").state, BACKEND_DOWN);
    assert!(!applied.services["web0"].ring.contains(&id), "out of the ring");

    // A backend's MAC changes in the neighbour table: web2 is rewritten with it.
    let before: Vec<_> = applied.services.values().cloned().collect();
    let moved: IpAddr = "10.0.1.23".parse().expect("ip");
    let macs = move |ip: IpAddr| if ip == moved { Some([2, 0xcc, 0, 0, 0, 23]) } else { mac_of(ip) };
    applied.apply(&mut x.tables(), &text(7), &macs, |t, id| t.conns(id).unwrap_or(0)).expect("apply");
    assert_eq!(same(&applied, &before), [true, true, false]);
    let id = applied.services["web2"].backends[&moved].id;
    assert_eq!(x.tables().backend(id).expect("backend").mac, [2, 0xcc, 0, 0, 0, 23]);

    // Nothing changed: nothing rewritten.
    let before: Vec<_> = applied.services.values().cloned().collect();
    assert!(applied.apply(&mut x.tables(), &text(7), &macs, |t, id| t.conns(id).unwrap_or(0)).expect("apply").is_empty());
    assert_eq!(same(&applied, &before), [true, true, true]);
}
