//! A health check that cannot run for a cause on the load balancer's own node is no verdict on
//! the backend: with the node's link down every check fails with "Network is unreachable", and
//! yet no backend leaves the ring (a node whose link comes back must not carry flows on a ring
//! holding only the first backend to pass a check); the daemon says why instead
//! (`SluiceHealthChecksCannotRun`), and once the link is back every backend takes connections.

use std::time::Duration;

use nix::sys::signal::Signal;
use sluice_tests::l2lab::{wait_for, Lab};

const HEALTH: &str = "max_conns = 100\nhealth = { kind = \"tcp\", interval = \"200ms\", timeout = \"150ms\", rise = 2, fall = 2 }";

fn states(lab: &Lab) -> Vec<String> {
    let (_, out, _) = lab.ctl(&["service", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v[0]["backends"].as_array().into_iter().flatten().map(|b| b["state"].as_str().unwrap_or("").to_owned()).collect()
}

fn firing(lab: &Lab, alert: &str) -> bool {
    let (_, out, _) = lab.ctl(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v["alerts_firing"].as_array().into_iter().flatten().any(|a| a["alertname"] == alert)
}

#[test]
fn a_local_failure_is_no_verdict_on_the_backends() {
    let lab = Lab::new(2);
    lab.write_config_with(&[(1, HEALTH), (2, HEALTH)], "[alerts]\nfire_after = \"500ms\"\nresolve_after = \"1s\"\n");
    let mut daemon = lab.start_daemon();
    wait_for("both backends active", || states(&lab) == ["active", "active"]);

    assert!(lab.lb.output("ip", &["link", "set", "lb0", "down"]).status.success());
    // Many checks fail meanwhile (fall = 2 at 200 ms): none may count.
    wait_for("the alert that health checks cannot run", || {
        let s = states(&lab);
        assert_eq!(s, ["active", "active"], "a backend left the ring for this node's own failure");
        firing(&lab, "SluiceHealthChecksCannotRun")
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(states(&lab), ["active", "active"], "a backend left the ring for this node's own failure");

    assert!(lab.lb.output("ip", &["link", "set", "lb0", "up"]).status.success());
    let mut seen = std::collections::BTreeSet::new();
    wait_for("connections to both backends again", || {
        if let Ok((name, _)) = lab.connect() {
            seen.insert(name);
        }
        seen.len() == 2
    });
    wait_for("the alert to resolve", || !firing(&lab, "SluiceHealthChecksCannotRun"));
    assert_eq!(states(&lab), ["active", "active"]);

    let out = daemon.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the daemon's exit on SIGTERM: {}\n{log}", out.status);
    assert!(log.contains("health checks cannot run from this node") && log.contains("health checks run again"), "{log}");
    assert!(!log.contains("out of the ring"), "{log}");
    lab.detach();
}
