//! The real daemon (`sluice run --config`) in network namespaces with real TCP (see
//! `sluice_tests::l2lab`): connections are balanced, a backend's `max_conns` is enforced with
//! an immediate RST, the control API shows and explains it and changes it, and a SIGHUP
//! reload that removes a backend drains it: its open connection keeps working, new ones go
//! elsewhere.

use std::{
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;

trait WithStdin {
    /// Runs with `input` on stdin: (success, stdout + stderr).
    fn output_with_stdin(&mut self, input: &[u8]) -> (bool, String);
}

impl WithStdin for std::process::Command {
    fn output_with_stdin(&mut self, input: &[u8]) -> (bool, String) {
        let mut child = self.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().expect("spawn");
        child.stdin.take().expect("stdin").write_all(input).expect("write stdin");
        let out = child.wait_with_output().expect("wait");
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}
use sluice_tests::l2lab::{Lab, VIP};

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, step after step")]
fn daemon_balances_limits_explains_and_drains_on_reload() {
    let lab = Lab::new(3);
    let (hook_port, posts) = lab.webhook_receiver();
    let alerts = format!("[alerts]\nname = \"lb-test\"\nfire_after = \"1s\"\nresolve_after = \"1s\"\nwebhook = {{ url = \"http://127.0.0.1:{hook_port}/api/v2/alerts\", timeout = \"1s\", retries = 2 }}\n");
    lab.write_config_with(&[(1, "max_conns = 100"), (2, "max_conns = 100"), (3, "max_conns = 2")], &alerts);
    let mut daemon = lab.start_daemon();

    // Balanced: 60 connections reach all three backends.
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..60 {
        let (name, s) = lab.connect().expect("connect");
        *seen.entry(name).or_insert(0) += 1;
        drop(s);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");

    // backend-3 has max_conns = 2: hold two to it, then a third aimed at it is refused at once.
    let mut held3 = Vec::new();
    let mut refused = 0;
    let mut others = Vec::new();
    let start = Instant::now();
    while held3.len() < 2 || refused == 0 {
        assert!(start.elapsed() < Duration::from_secs(20), "held {} refused {refused}", held3.len());
        match lab.connect() {
            Ok((name, s)) if name == "backend-3" => held3.push(s),
            Ok((_, s)) => others.push(s),
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "refused with a RST, not a timeout: {e}");
                assert!(held3.len() == 2, "refused before backend-3 was full");
                refused += 1;
            }
        }
    }
    drop(others);

    // /metrics shows it: 2 of 2 open, saturation 1, the refusals counted with their reason;
    // and the exposition passes promtool.
    let m = lab.metrics();
    for line in [
        "sluice_backend_open_connections{backend=\"10.70.0.13\",service=\"web\"} 2",
        "sluice_backend_max_connections{backend=\"10.70.0.13\",service=\"web\"} 2",
        "sluice_backend_saturation_ratio{backend=\"10.70.0.13\",service=\"web\"} 1",
    ] {
        assert!(m.lines().any(|l| l == line), "missing {line}:\n{m}");
    }
    let refused_metric = m
        .lines()
        .find(|l| l.starts_with("sluice_refusals_total{backend=\"10.70.0.13\",reason=\"backend_limit\",service=\"web\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok());
    assert_eq!(refused_metric, Some(refused), "refusals counted exactly");
    let mut promtool = std::process::Command::new("promtool").args(["check", "metrics"]).stdin(std::process::Stdio::piped()).output_with_stdin(m.as_bytes());
    assert!(promtool.0, "promtool check metrics: {}", promtool.1);
    promtool.1.clear();

    // The refusals are in the event stream, with the client, the backend and the reason.
    let (code, out, err) = lab.ctl(&["events", "--json"]);
    assert_eq!(code, 0, "{err}");
    let evs: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).expect("event json")).collect();
    assert_eq!(evs.len() as u64, refused, "one event per refusal (below the rate limit): {out}");
    assert!(evs.iter().all(|e| e["reason"] == "backend_limit" && e["backend"] == "10.70.0.13" && e["service"] == "web"), "{out}");
    assert!(evs.iter().all(|e| e["client"].as_str().is_some_and(|c| c.starts_with("10.70.0.2:")) && e["vip"] == format!("{VIP}:80")), "{out}");
    let (_, text, _) = lab.ctl(&["events"]);
    assert!(text.contains("REFUSED backend_limit"), "{text}");

    // The alert fires within seconds, saying it is the load balancer and naming the setting.
    sluice_tests::l2lab::wait_for("the at-limit alert", || lab.ctl(&["status", "--json"]).1.contains("SluiceBackendAtLimit"));
    let (_, out, _) = lab.ctl(&["status"]);
    // The service table (typed API reports, read back by the CLI) marks the full backend.
    assert!(out.lines().any(|l| l.starts_with("web") && l.contains("10.70.0.13") && l.contains("AT LIMIT")), "{out}");
    let alert = out.lines().skip_while(|l| !l.contains("ALERT SluiceBackendAtLimit")).take(2).collect::<Vec<_>>().join("\n");
    assert!(alert.contains("Sluice load balancer") && alert.contains("10.70.0.13") && alert.contains("max_conns` in") && alert.contains("2 of 2 open"), "{out}");
    assert!(lab.metrics().contains("sluice_alerts_firing{alertname=\"SluiceBackendAtLimit\",backend=\"10.70.0.13\""), "alert in /metrics");
    sluice_tests::l2lab::wait_for("the webhook to receive the firing alert", || posts.any(&["\"alertname\":\"SluiceBackendAtLimit\"", "\"status\":\"firing\"", "lb-test"]));

    // The control API (root only) shows backend-3 at its limit and explains the refusal.
    let mode = std::fs::metadata(lab.socket()).expect("control socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket is root-only");
    let (code, out, err) = lab.ctl(&["service", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let be3 = v[0]["backends"].as_array().expect("backends").iter().find(|b| b["address"] == "10.70.0.13").expect("backend-3").clone();
    assert_eq!((be3["open"].as_u64(), be3["max_conns"].as_u64()), (Some(2), Some(2)), "{be3}");
    assert_eq!(be3["refused"]["backend_limit"].as_u64(), Some(refused), "what `sluice top` shows per backend: {be3}");
    let refused_port = (40000..41000)
        .find(|p| {
            let (_, out, _) = lab.ctl(&["explain", &format!("10.70.0.2:{p}"), &format!("{VIP}:80"), "--json"]);
            out.contains("\"reason\": \"backend_limit\"")
        })
        .expect("some flow aims at the full backend-3");
    let (_, out, _) = lab.ctl(&["explain", &format!("10.70.0.2:{refused_port}"), &format!("{VIP}:80")]);
    assert!(out.contains("REFUSED") && out.contains("max_conns = 2"), "{out}");
    // Raise the limit through the API: that same flow is admitted now.
    let (code, out, err) = lab.ctl(&["backend", "set-limit", "web", "10.70.0.13", "3"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("max_conns 2 -> 3"), "{out}");
    let (_, out, _) = lab.ctl(&["explain", &format!("10.70.0.2:{refused_port}"), &format!("{VIP}:80"), "--json"]);
    assert!(out.contains("\"verdict\": \"admitted\""), "{out}");
    // Break-glass: raised now, reverts by itself when the TTL runs out.
    let (code, out, err) = lab.ctl(&["limit", "raise", "web", "10.70.0.13", "9", "--ttl", "2s"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("max_conns 3 -> 9"), "{out}");
    let max_of_3 = || {
        let (_, out, _) = lab.ctl(&["service", "list", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        v[0]["backends"].as_array().into_iter().flatten().find(|b| b["address"] == "10.70.0.13").and_then(|b| b["max_conns"].as_u64())
    };
    assert_eq!(max_of_3(), Some(9));
    sluice_tests::l2lab::wait_for("the break-glass limit to revert", || max_of_3() == Some(3));

    // A request that fails changes nothing.
    let (code, _, err) = lab.ctl(&["backend", "set-limit", "web", "10.70.0.13", "0"]);
    assert_ne!(code, 0);
    assert!(err.contains("max_conns") && err.contains("nothing changed"), "{err}");
    // The runtime change was written into the file (a reload keeps it); the break-glass was not.
    let (_, out, _) = lab.ctl(&["config", "apply", "--dry-run", lab.config.to_str().expect("utf-8")]);
    assert!(!out.contains("10.70.0.13"), "the file says 3 as the daemon does: {out}");
    let (file, _) = lb_userspace::config::load(&lab.config).expect("the written-back file");
    assert_eq!(file.services[0].backends.iter().find(|b| b.address.to_string() == "10.70.0.13").map(|b| b.max_conns), Some(3));

    // Reload without backend-1: it drains. An open connection to it still works.
    let mut on1 = loop {
        // Flows that hash to the full backend-3 are refused meanwhile.
        if let Ok((name, s)) = lab.connect() {
            if name == "backend-1" {
                break s;
            }
        }
    };
    lab.write_config_with(&[(2, "max_conns = 100"), (3, "max_conns = 2")], &alerts);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.id() as i32), Signal::SIGHUP).expect("SIGHUP");
    sluice_tests::l2lab::wait_for("the reload to take backend-1 out", || {
        let (_, out, _) = lab.ctl(&["service", "list", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        v[0]["backends"].as_array().into_iter().flatten().any(|b| b["address"] == "10.70.0.11" && b["removed"] == true)
    });
    for _ in 0..30 {
        match lab.connect() {
            Ok((name, s)) => {
                assert_ne!(name, "backend-1", "a new connection reached the drained backend");
                drop(s);
            }
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}"),
        }
    }
    on1.write_all(b"still there?").expect("the drained backend's connection still carries data");
    drop(held3);
    // backend-3 is below its limit again: the alert resolves and the webhook hears it.
    sluice_tests::l2lab::wait_for("the resolved alert", || posts.any(&["SluiceBackendAtLimit", "\"status\":\"resolved\""]));

    let out = daemon.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("drain and remove backend 10.70.0.11"), "{log}");
    assert!(!lab.socket().exists(), "control socket removed on exit");
    // The timeline reads like a postmortem's, from the journal alone (no daemon needed).
    let md = lab.timeline_markdown();
    for want in [
        "## Timeline",
        "Sluice daemon started on lb0",
        "alert SluiceBackendAtLimit FIRING: Sluice load balancer lb-test",
        "break-glass: service \"web\" backend 10.70.0.13 max_conns = 9",
        "drain and remove backend 10.70.0.11",
        "alert SluiceBackendAtLimit resolved",
        "Sluice daemon stopped",
    ] {
        assert!(md.contains(want), "timeline lacks {want:?}:\n{md}");
    }
    assert!(lab.lb.link_show("lb0").contains("xdp"), "the datapath keeps running when the daemon stops");
    lab.detach();
    assert!(!lab.lb.link_show("lb0").contains("xdp"), "sluice detach removes it");
}
