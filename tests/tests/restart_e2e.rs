//! Restarting the daemon breaks nothing: with 200 connections open through the load balancer,
//! the daemon stops (the datapath keeps forwarding on its own), starts again and adopts the
//! pinned datapath — every connection still carries data both ways, and the open-connection
//! counters and flow count are what they were.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use nix::sys::signal::Signal;
use serde_json::Value;
use sluice_tests::l2lab::Lab;

const CONNS: usize = 200;

fn echo_all(conns: &mut [TcpStream], tag: &str) {
    for (i, c) in conns.iter_mut().enumerate() {
        let msg = format!("{tag}-{i}");
        c.write_all(msg.as_bytes()).unwrap_or_else(|e| panic!("connection {i} ({tag}): write: {e}"));
        let mut buf = vec![0u8; msg.len()];
        c.read_exact(&mut buf).unwrap_or_else(|e| panic!("connection {i} ({tag}): no echo: {e}"));
        assert_eq!(buf, msg.as_bytes());
    }
}

fn open_counts(lab: &Lab) -> Vec<(String, u64)> {
    let (code, out, err) = lab.ctl(&["service", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("json");
    v[0]["backends"].as_array().expect("backends").iter().map(|b| (b["address"].as_str().unwrap_or("").to_owned(), b["open"].as_u64().unwrap_or(0))).collect()
}

#[test]
fn restart_under_200_open_connections_loses_nothing() {
    let lab = Lab::new(2);
    lab.write_config(&[(1, "max_conns = 1000"), (2, "max_conns = 1000")]);
    let mut daemon = lab.start_daemon();
    let mut conns: Vec<TcpStream> = (0..CONNS).map(|_| lab.connect().expect("connect").1).collect();
    echo_all(&mut conns, "before");
    let before = open_counts(&lab);
    assert_eq!(before.iter().map(|b| b.1).sum::<u64>(), CONNS as u64, "{before:?}");

    let out = daemon.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(lab.lb.link_show("lb0").contains("xdp"), "the datapath outlives the daemon");
    echo_all(&mut conns, "between");

    let mut daemon = lab.start_daemon();
    echo_all(&mut conns, "after");
    assert_eq!(open_counts(&lab), before, "counters unchanged across the restart");
    let (_, out, _) = lab.ctl(&["status", "--json"]);
    let v: Value = serde_json::from_str(&out).expect("status json");
    assert_eq!(v["flows"].as_u64(), Some(CONNS as u64), "every flow kept");
    // New connections still work, and closing the old ones gives their slots back.
    lab.connect().expect("a new connection after the restart");
    drop(conns);
    sluice_tests::l2lab::wait_for("the closed connections' slots to be released", || open_counts(&lab).iter().map(|b| b.1).sum::<u64>() <= 1);

    let out = daemon.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("adopted the running datapath"), "{log}");

    // Pins of another schema are refused, not adopted.
    let data = aya::maps::MapData::from_pin(lab.pins.0.join("SCHEMA")).expect("pinned SCHEMA");
    let mut schema: aya::maps::Array<_, u32> = aya::maps::Array::try_from(aya::maps::Map::Array(data)).expect("array");
    schema.set(0, 999, 0).expect("set");
    let out = lab.lb.output(sluice_tests::sluice_bin().to_str().expect("utf-8"), &["run", "--config", lab.config.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("schema version 999") && err.contains("sluice detach"), "{err}");
    assert!(lab.lb.link_show("lb0").contains("xdp"), "the refused start left the running datapath alone");
    lab.detach();
}

/// The interface a stopped daemon's datapath was attached to disappears and comes back (a
/// namespace rebuilt, a NIC reset): the pinned link is left detached. The next `sluice run`
/// attaches a new link to the configured interface and keeps the maps (flows and counters),
/// says so in its log and the journal, and forwards new connections. Its log, written to a file,
/// carries no terminal colour codes.
#[test]
fn a_datapath_whose_interface_is_gone_is_attached_again_with_its_maps() {
    let lab = Lab::new(1);
    lab.write_config(&[(1, "max_conns = 1000")]);
    let mut daemon = lab.start_daemon();
    let (_, held) = lab.connect().expect("connect");
    assert_eq!(open_counts(&lab)[0].1, 1);
    let out = daemon.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!log.contains('\u{1b}'), "colour codes in a log that is not a terminal:\n{log}");

    // lb0 goes away (taking its XDP link along) and comes back under the same name.
    lab.lb.ip(&["link", "del", "lb0"]);
    sluice_tests::netns::veth(&lab.lb, "lb0", &lab.switch, "sw-lb");
    lab.switch.ip(&["link", "set", "sw-lb", "master", "br0"]);
    lab.lb.addr_add("lb0", "10.70.0.1/24");
    let decap_pins = sluice_tests::PinDir::new();
    let _switch_xdp = lab.switch.spawn(lab.switch.command(sluice_tests::sluice_bin()).args(["decap", "--iface", "sw-lb", "--pin-dir"]).arg(&decap_pins.0));
    sluice_tests::l2lab::wait_for("the switch port's XDP program", || lab.switch.link_show("sw-lb").contains("xdp"));
    assert!(!lab.lb.link_show("lb0").contains("xdp"), "the new lb0 starts without XDP");

    let mut daemon = lab.start_daemon();
    assert_eq!(open_counts(&lab)[0].1, 1, "the counter survived the new attachment");
    let (_, out, _) = lab.ctl(&["status", "--json"]);
    let v: Value = serde_json::from_str(&out).expect("status json");
    assert_eq!(v["flows"].as_u64(), Some(1), "the flow table survived the new attachment");
    lab.connect().expect("a new connection through the new attachment");
    let journal = std::fs::read_to_string(lab.journal()).expect("journal");
    assert!(journal.contains("pinned XDP link was stale (its interface is gone)"), "{journal}");
    let out = daemon.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("attached a new one to lb0; maps, flows and counters kept"), "{log}");
    drop(held);
    lab.detach();
}
