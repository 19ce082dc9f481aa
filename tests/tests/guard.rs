//! The guard (`guard.rs`) on the real daemon with real TCP (`sluice_tests::l2lab`): with 40
//! connections held over two backends (max_conns 100 and 35), every change that would lower
//! what the service admits below that load is refused and changes nothing — `backend
//! set-limit`, `drain`, `remove`, `config apply` of a file, and a SIGHUP reload (which also
//! journals it and fires `SluiceConfigChangeRefused`) — each message naming the backend, the
//! key, the old and new values and the load; `--dry-run` shows the verdict and the N-1 warning;
//! `--force` applies and journals it. `sluice config review` suggests a limit from the known
//! load, and the load history survives a daemon restart.

use std::collections::BTreeMap;

use nix::sys::signal::{kill, Signal};
use serde_json::Value;
use sluice_tests::l2lab::{wait_for, Lab};

fn json(lab: &Lab, args: &[&str]) -> Value {
    let (code, out, err) = lab.ctl(args);
    assert_eq!(code, 0, "sluice {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("sluice {args:?}: {e}: {out}"))
}

fn limits(lab: &Lab) -> BTreeMap<String, u64> {
    let v = json(lab, &["service", "list", "--json"]);
    v[0]["backends"].as_array().expect("backends").iter().map(|b| (b["address"].as_str().unwrap_or("").to_owned(), b["max_conns"].as_u64().unwrap_or(0))).collect()
}

#[test]
fn changes_below_the_load_are_refused_unless_forced_and_the_history_survives_a_restart() {
    let lab = Lab::new(2);
    let alerts = "[alerts]\nname = \"lb-guard\"\nfire_after = \"0s\"\nlabels = { team = \"netops\" }\n";
    let config = |a: u32, b: u32| lab.write_config_with(&[(1, &format!("max_conns = {a}")), (2, &format!("max_conns = {b}"))], alerts);
    config(100, 35);
    let mut daemon = lab.start_daemon();

    // The known load: 40 connections held, spread by the ring over both backends.
    let mut held = Vec::new();
    let mut per: BTreeMap<String, u64> = BTreeMap::new();
    for _ in 0..40 {
        let (name, s) = lab.connect().expect("connect");
        *per.entry(name).or_default() += 1;
        held.push(s);
    }
    let b1 = per["backend-1"];
    // The history has the peak once an evaluation (every second) saw it.
    wait_for("the load history to hold the peak", || json(&lab, &["history", "web", "10.70.0.11", "--json"])["backends"][0]["peak_24h"]["open"].as_u64() == Some(b1));
    let before = limits(&lab);

    // Each change below the load: refused, nothing changed, the numbers named.
    let refused = |args: &[&str], want: &[&str]| {
        let (code, out, err) = lab.ctl(args);
        assert_ne!(code, 0, "sluice {args:?} was applied: {out}");
        for w in want.iter().chain(&["refused, nothing changed", "--force"]) {
            assert!(err.contains(w), "sluice {args:?}: {w:?} not in: {err}");
        }
        assert_eq!(limits(&lab), before, "sluice {args:?} changed something");
    };
    refused(
        &["backend", "set-limit", "web", "10.70.0.11", "5"],
        &["backend 10.70.0.11 max_conns 100 -> 5", &format!("its {b1} open now"), &format!("peak of {b1}"), "% of its connections would have been refused"],
    );
    refused(&["backend", "drain", "web", "10.70.0.11"], &["service \"web\" would admit 35", "peak load of 40"]);
    refused(&["backend", "remove", "web", "10.70.0.11"], &["service \"web\" would admit 35"]);
    config(5, 35);
    let path = lab.config.to_str().expect("utf-8").to_owned();
    refused(&["config", "apply", &path], &["max_conns 100 -> 5"]);

    // --dry-run shows the verdict and the N-1 warning, and applies nothing.
    let (code, out, _) = lab.ctl(&["config", "apply", "--dry-run", &path]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("the guard would refuse it: service \"web\" backend 10.70.0.11 max_conns 100 -> 5"), "{out}");
    assert!(out.contains("N-1"), "{out}");
    assert_eq!(limits(&lab), before);

    // A SIGHUP of that file: nothing changes, the journal says so, the alert fires.
    kill(nix::unistd::Pid::from_raw(daemon.id() as i32), Signal::SIGHUP).expect("SIGHUP");
    wait_for("SluiceConfigChangeRefused to fire", || {
        json(&lab, &["status", "--json"])["alerts_firing"].as_array().is_some_and(|a| a.iter().any(|x| x["alertname"] == "SluiceConfigChangeRefused"))
    });
    assert_eq!(limits(&lab), before, "a refused reload changed something");
    // The routing label is on the alert in /metrics too.
    let m = lab.metrics();
    assert!(m.lines().any(|l| l.starts_with("sluice_alerts_firing{") && l.contains("alertname=\"SluiceConfigChangeRefused\"") && l.contains("team=\"netops\"")), "{m}");
    assert!(m.contains("sluice_config_change_refused 1"), "{m}");
    assert!(lab.timeline_markdown().contains("refused by the guard: nothing changed"));

    // --force applies it and journals that it was forced.
    let (code, out, err) = lab.ctl(&["config", "apply", "--force", &path]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("applied: service \"web\" backend 10.70.0.11: max_conns 100 -> 5") && out.contains("FORCED past the guard"), "{out}");
    assert_eq!(limits(&lab)["10.70.0.11"], 5);
    assert!(lab.timeline_markdown().contains("applied with --force although the guard refused it"));
    // Raising is never judged.
    config(100, 35);
    assert_eq!(lab.ctl(&["config", "apply", &path]).0, 0);

    // The review: peak × 1.25, rounded up to two significant digits.
    let review = json(&lab, &["config", "review", "--json"]);
    let r1 = review["services"][0]["backends"].as_array().expect("backends").iter().find(|b| b["address"] == "10.70.0.11").expect("backend 1").clone();
    assert_eq!(r1["peak_24h"]["open"].as_u64(), Some(b1));
    let want = (b1 as f64 * 1.25).ceil() as u64;
    assert_eq!(r1["suggested"].as_u64(), Some(want), "{r1}");
    let svc = &review["services"][0];
    assert_eq!(svc["n_minus_1"].as_u64(), Some(35));
    assert!(svc["n_minus_1_verdict"].as_str().unwrap_or("").contains("could not carry its peak load of 40"), "{svc}");

    // The history survives a restart (saved when the daemon stops, loaded when it starts).
    drop(held);
    let out = daemon.signal_and_wait(Signal::SIGTERM, std::time::Duration::from_secs(10));
    assert!(out.status.success(), "the daemon's exit on SIGTERM: {} {}", out.status, String::from_utf8_lossy(&out.stderr));
    let daemon = lab.start_daemon();
    let h = json(&lab, &["history", "web", "10.70.0.11", "--json"]);
    assert_eq!(h["backends"][0]["peak_24h"]["open"].as_u64(), Some(b1), "{h}");
    drop(daemon);
    lab.detach();
}
