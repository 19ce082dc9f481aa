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
