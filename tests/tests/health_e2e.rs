//! Health checks with the real daemon: a backend whose server stops leaves the ring within its
//! fall threshold (state `down`, new connections go elsewhere) and comes back after `rise`
//! good checks once it listens again.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use sluice_tests::l2lab::{wait_for, Lab};

const HEALTH: &str = "max_conns = 100\nhealth = { kind = \"tcp\", interval = \"200ms\", timeout = \"150ms\", rise = 2, fall = 2 }";

fn state_of(lab: &Lab, addr: &str) -> String {
    let (_, out, _) = lab.ctl(&["service", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v[0]["backends"].as_array().into_iter().flatten().find(|b| b["address"] == addr).map(|b| b["state"].as_str().unwrap_or("").to_owned()).unwrap_or_default()
}

#[test]
fn a_failing_backend_leaves_the_ring_and_returns() {
    let mut lab = Lab::new(2);
    lab.write_config(&[(1, HEALTH), (2, HEALTH)]);
    let mut daemon = lab.start_daemon();
    assert_eq!(state_of(&lab, "10.70.0.12"), "active");

    let stopped = Instant::now();
    lab.backends[1].stop();
    wait_for("backend-2 to be marked down", || state_of(&lab, "10.70.0.12") == "down");
    // A figure (fall = 2 × 200 ms), not a bound: a wall-clock bound flakes on a loaded machine.
    println!("backend-2 marked down {:?} after its server stopped", stopped.elapsed());
    for _ in 0..20 {
        let (name, s) = lab.connect().expect("healthy backend-1 takes every new connection");
        assert_eq!(name, "backend-1");
        drop(s);
    }

    lab.backends[1].start();
    wait_for("backend-2 to return", || state_of(&lab, "10.70.0.12") == "active");
    wait_for("a connection to reach backend-2 again", || lab.connect().is_ok_and(|(n, _)| n == "backend-2"));

    let out = daemon.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the daemon's exit on SIGTERM: {}\n{log}", out.status);
    assert!(log.contains("unhealthy: out of the ring") && log.contains("healthy again"), "{log}");
    lab.detach();
}
