//! The incident of 2023-05-05 in miniature, with the real daemon and real TCP: a backend's
//! `max_conns` is lowered to 5 by a config change, 8 clients arrive, exactly 3 are refused
//! with `backend_limit`; `/metrics` says 5 of 5 and 3 refusals; a webhook receiver hears a
//! firing alert naming the backend and `max_conns` after the first refusal (how long after is a
//! figure, printed, not asserted) — while a second receiver, hanging on its first request for
//! longer than the test runs, delays neither it nor the command sink — and a resolved one after
//! the clients leave; `sluice top` shows the saturated backend; the timeline has the config
//! change and then the alert.

use std::{
    net::{TcpListener, TcpStream},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use sluice_tests::l2lab::{wait_for, Lab};

const BACKEND: &str = "10.70.0.11";

/// A receiver that accepts connections and never answers (worse than a refused port), and
/// counts them.
fn hanging_receiver(lab: &Lab) -> (u16, Arc<AtomicUsize>) {
    let l = lab.lb.run(|| TcpListener::bind("127.0.0.1:0").expect("bind"));
    let port = l.local_addr().expect("addr").port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let a = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in l.incoming().flatten() {
            a.fetch_add(1, Ordering::Relaxed);
            held.push(c);
        }
    });
    (port, accepted)
}

#[test]
fn limit_of_5_with_8_clients_refuses_3_alerts_and_resolves() {
    let lab = Lab::new(1);
    let (live, posts) = lab.webhook_receiver();
    let (hanging, hanging_accepted) = hanging_receiver(&lab);
    let cmd_log = lab.dir.join("alert-command.log");
    let alerts = format!(
        "[alerts]\nname = \"lb-incident\"\nfire_after = \"2s\"\nresolve_after = \"2s\"\n\
         webhooks = [{{ url = \"http://127.0.0.1:{hanging}/api/v2/alerts\", timeout = \"1h\", retries = 3 }}, \
         {{ url = \"http://127.0.0.1:{live}/api/v2/alerts\", timeout = \"1s\", retries = 2 }}]\n\
         command = [\"sh\", \"-c\", \"echo \\\"$SLUICE_ALERT $SLUICE_ALERT_STATUS\\\" >> {}\"]\n",
        cmd_log.display()
    );
    lab.write_config_with(&[(1, "max_conns = 50")], &alerts);
    let mut daemon = lab.start_daemon();

    // The misconfiguration: someone lowers max_conns from 50 to 5, applied live.
    lab.write_config_with(&[(1, "max_conns = 5")], &alerts);
    let (code, out, err) = lab.ctl(&["config", "apply", lab.config.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("max_conns 50 -> 5"), "{out}");

    // 8 clients at once: 5 get the backend, 3 a RST from the load balancer (not a timeout).
    let results: Vec<(Instant, Result<TcpStream, std::io::ErrorKind>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let r = lab.connect();
                    (
                        Instant::now(),
                        r.map(|(name, stream)| {
                            assert_eq!(name, "backend-1");
                            stream
                        })
                        .map_err(|e| e.kind()),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("client thread")).collect()
    });
    let refused: Vec<Instant> = results
        .iter()
        .filter_map(|(t, r)| {
            r.as_ref().err().map(|k| {
                assert_eq!(*k, std::io::ErrorKind::ConnectionRefused, "refused with a RST at once");
                *t
            })
        })
        .collect();
    assert_eq!(refused.len(), 3, "exactly 8 - 5 refused");
    let first_refusal = *refused.iter().min().expect("a refusal");
    let held: Vec<TcpStream> = results.into_iter().filter_map(|(_, r)| r.ok()).collect();
    assert_eq!(held.len(), 5);

    // The webhook hears it, naming the backend and the setting, although the first receiver in
    // the list hangs (its timeout is an hour: whatever waited for it would never arrive); so
    // does the command sink.
    wait_for("a firing alert at the webhook", || posts.first(&["\"status\":\"firing\"", BACKEND, "max_conns"]).is_some());
    let (at, body) = posts.first(&["\"status\":\"firing\"", BACKEND, "max_conns"]).expect("firing");
    println!("the firing alert reached the webhook {:?} after the first refusal", at.saturating_duration_since(first_refusal));
    assert!(body.contains("Sluice load balancer lb-incident") && body.contains("max_conns = 5"), "{body}");
    wait_for("the command sink", || std::fs::read_to_string(&cmd_log).is_ok_and(|t| t.contains("SluiceRefusingConnections firing")));
    assert_eq!(hanging_accepted.load(Ordering::Relaxed), 1, "the hanging receiver holds the webhook's first request (and nothing else waited for it)");

    // Exactly 3 refusals with reason backend_limit, in the counters and in the events.
    let (code, out, err) = lab.ctl(&["events", "--json"]);
    assert_eq!(code, 0, "{err}");
    let reasons: Vec<String> = out.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).expect("event")["reason"].as_str().unwrap_or("").to_owned()).collect();
    assert_eq!(reasons, ["backend_limit"; 3], "{out}");
    wait_for("the at-limit alert", || posts.first(&["\"status\":\"firing\"", "SluiceBackendAtLimit"]).is_some());
    let m = lab.metrics();
    for line in [
        format!("sluice_backend_open_connections{{backend=\"{BACKEND}\",service=\"web\"}} 5"),
        format!("sluice_backend_max_connections{{backend=\"{BACKEND}\",service=\"web\"}} 5"),
        format!("sluice_backend_saturation_ratio{{backend=\"{BACKEND}\",service=\"web\"}} 1"),
        format!("sluice_refusals_total{{backend=\"{BACKEND}\",reason=\"backend_limit\",service=\"web\"}} 3"),
    ] {
        assert!(m.lines().any(|l| l == line), "missing {line}:\n{m}");
    }
    assert!(m.contains("sluice_alerts_firing{alertname=\"SluiceBackendAtLimit\""), "{m}");
    sluice_tests::promtool_check(&m);

    // `sluice top` renders the saturated backend and the alert.
    let (code, frame, err) = lab.ctl(&["top", "--once", "--width", "150"]);
    assert_eq!(code, 0, "{err}");
    let row = frame.lines().find(|l| l.contains(BACKEND)).unwrap_or_else(|| panic!("no backend row:\n{frame}"));
    assert!(row.contains("5/5") && row.contains("100%") && row.contains("active"), "{frame}");
    assert!(frame.contains("SluiceBackendAtLimit"), "{frame}");

    // The clients leave: the alerts resolve and the webhook hears it.
    drop(held);
    wait_for("the resolved alerts", || {
        posts.first(&["\"status\":\"resolved\"", "SluiceBackendAtLimit"]).is_some() && posts.first(&["\"status\":\"resolved\"", "SluiceRefusingConnections"]).is_some()
    });
    wait_for("the command sink's resolved", || std::fs::read_to_string(&cmd_log).is_ok_and(|t| t.contains("SluiceBackendAtLimit resolved")));

    let out = daemon.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The timeline: the config change, then the alert firing, then resolved.
    let md = lab.timeline_markdown();
    let pos = |want: &str| md.find(want).unwrap_or_else(|| panic!("timeline lacks {want:?}:\n{md}"));
    let change = pos("max_conns 50 -> 5");
    let fired = pos("alert SluiceRefusingConnections FIRING: Sluice load balancer lb-incident");
    let at_limit = pos("alert SluiceBackendAtLimit FIRING");
    let resolved = pos("alert SluiceBackendAtLimit resolved");
    assert!(change < fired && fired < at_limit && at_limit < resolved, "out of order:\n{md}");
    lab.detach();
}
