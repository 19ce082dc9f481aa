//! Security of a running daemon (in `sluice lab`'s namespaces): the control socket is root's
//! only (0600), the pinned maps' directory is not readable by others (0700), metrics listen on
//! loopback by default, the control API answers oversized, malformed and random requests with a
//! 4xx that names the problem and changes nothing (checked against the service state before),
//! and a non-root user running the CLI gets one clear sentence, not a stack trace.

use std::{
    io::{Read as _, Write as _},
    os::unix::{fs::MetadataExt as _, net::UnixStream},
    time::Duration,
};

use lb_userspace::config::Mode;
use rand::{rngs::StdRng, Rng as _, SeedableRng as _};
use serde_json::Value;
use sluice_lab::{
    topo::{BackendConf, ServiceOpts},
    Lab,
};
use sluice_tests::labs::{down_and_check, lab};

/// One raw HTTP/1.1 request on the control socket: (status, body). Status 0 if the daemon
/// closed the connection without an answer (which every caller counts as a failure).
fn raw(lab: &Lab, request: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(lab.socket()).expect("control socket");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    // The daemon may answer (413) and close before it has read everything: ignore EPIPE.
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_owned()))
}

fn post(lab: &Lab, path: &str, body: &[u8]) -> (u16, String) {
    let mut req = format!("POST {path} HTTP/1.1\r\nHost: sluice\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).into_bytes();
    req.extend_from_slice(body);
    raw(lab, &req)
}

/// What must not change: every backend's limit, weight and state, per service.
fn state(lab: &Lab) -> Value {
    let out = std::process::Command::new(sluice_tests::sluice_bin()).arg("--socket").arg(lab.socket()).args(["service", "list", "--json"]).output().expect("sluice");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    let keep = ["name", "address", "max_conns", "weight", "state", "vip", "port", "mode"];
    #[expect(clippy::items_after_statements, reason = "next to its one use")]
    fn strip(v: &Value, keep: &[&str]) -> Value {
        match v {
            Value::Object(m) => Value::Object(m.iter().filter(|(k, v)| keep.contains(&k.as_str()) || v.is_array()).map(|(k, v)| (k.clone(), strip(v, keep))).collect()),
            Value::Array(a) => Value::Array(a.iter().map(|x| strip(x, keep)).collect()),
            v => v.clone(),
        }
    }
    strip(&v, &keep)
}

#[test]
fn socket_pins_metrics_api_and_cli_are_locked_down() {
    let lab = lab(2, 1, Mode::L2dsr);
    let backends: Vec<BackendConf> = (1..=2).map(|n| BackendConf { n, max_conns: 100, weight: 1 }).collect();
    lab.write_config(&lab.config_text(&backends, &ServiceOpts::default(), |_| ())).expect("config");
    lab.start_daemon().expect("daemon");

    // Files: the socket and the pins.
    let sock = std::fs::metadata(lab.socket()).expect("socket");
    assert_eq!((sock.mode() & 0o777, sock.uid()), (0o600, 0), "control socket mode/owner");
    let pins = std::fs::metadata(lab.pin_dir()).expect("pin dir");
    assert_eq!(pins.mode() & 0o077, 0, "pin directory {:o} is open to group/others", pins.mode() & 0o777);

    // Metrics: loopback only, by default.
    let ss = lab.command("lb", "ss").args(["-ltnH"]).output().expect("ss");
    let listening = String::from_utf8_lossy(&ss.stdout).into_owned();
    let metrics: Vec<&str> = listening.lines().filter(|l| l.contains(":9477")).collect();
    assert!(!metrics.is_empty() && metrics.iter().all(|l| l.contains("127.0.0.1:9477")), "metrics listeners: {listening}");

    let before = state(&lab);
    // Oversized: refused once it passes the limit (1 MiB), with a 413.
    let (status, body_out) = post(&lab, "/v1/config/apply", &vec![b' '; 2 << 20]);
    assert_eq!(status, 413, "a 2 MiB body: {body_out}");
    // Malformed JSON, wrong shapes, unknown names: a 4xx naming the problem.
    for (path, body, names) in [
        ("/v1/config/apply", &b"{not json"[..], "JSON"),
        ("/v1/config/apply", br#"{"toml": 12}"#, "toml"),
        ("/v1/config/apply", br#"{"toml": "[[service]]\nname = 5\n"}"#, "name"),
        ("/v1/config/apply", br#"{"path": "/nonexistent/sluice.toml"}"#, "/nonexistent/sluice.toml"),
        ("/v1/limits/raise", br#"{"service": "nope", "backend": "198.18.0.11", "max_conns": 10, "ttl": "1m"}"#, "nope"),
        ("/v1/services/web/backends/203.0.113.9/drain", b"{}", "203.0.113.9"),
        ("/v1/services/nope/backends/198.18.0.11/drain", b"{}", "nope"),
        ("/v1/services/web/backends/198.18.0.11/explode", b"{}", "explode"),
    ] {
        let (status, body_out) = post(&lab, path, body);
        assert!((400..500).contains(&status), "{path} {}: got {status} {body_out}", String::from_utf8_lossy(body));
        assert!(body_out.contains(names), "{path}: the answer should name {names:?}: {body_out}");
    }
    // Not HTTP at all: random bytes, ended as a request head ends (without the end the server
    // would rightly wait for more). A 4xx each, and the daemon keeps serving.
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..50 {
        let mut junk: Vec<u8> = (0..rng.random_range(1..300)).map(|_| rng.random()).collect();
        junk.extend_from_slice(b"\r\n\r\n");
        let (status, body_out) = raw(&lab, &junk);
        assert!((400..500).contains(&status), "junk {junk:?} got {status} {body_out}");
        assert_eq!(state(&lab), before, "the daemon answers as before after junk");
    }
    // Random JSON bodies on every POST endpoint.
    for _ in 0..100 {
        let body = random_json(&mut rng, 3).to_string();
        let path = ["/v1/config/apply", "/v1/limits/raise", "/v1/services/web/backends/198.18.0.11/drain"][rng.random_range(0..3)];
        let (status, out) = post(&lab, path, body.as_bytes());
        assert!((400..500).contains(&status) || status == 200 && path.ends_with("drain"), "{path} {body}: {status} {out}");
        if status == 200 {
            // A drain with a random body still drained: undo it through the same API.
            let (s, out) = post(&lab, "/v1/services/web/backends/198.18.0.11/undrain", b"{}");
            assert_eq!(s, 200, "{out}");
        }
    }
    assert_eq!(state(&lab), before, "a rejected request changed the daemon's state");

    // A non-root user: one sentence, no trace.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(sluice_tests::sluice_bin())
        .arg("--socket")
        .arg(lab.socket())
        .arg("status")
        .output()
        .expect("setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("root") && !err.contains("panicked"), "non-root status: {err}");
    down_and_check(lab);
}

fn random_json(rng: &mut StdRng, depth: u32) -> Value {
    match rng.random_range(0..if depth == 0 { 4 } else { 7 }) {
        0 => Value::Null,
        1 => Value::from(rng.random::<i64>()),
        2 => Value::from(["", "web", "198.18.0.11", "1m", "max_conns", "[[service]]", "/etc/passwd", "[daemon]\ninterface = 1"][rng.random_range(0..8)]),
        3 => Value::from(rng.random_bool(0.5)),
        4 => Value::Array((0..rng.random_range(0..4)).map(|_| random_json(rng, depth - 1)).collect()),
        _ => {
            let keys = ["toml", "path", "dry_run", "service", "backend", "max_conns", "weight", "ttl", "x"];
            Value::Object((0..rng.random_range(0..5)).map(|_| (keys[rng.random_range(0..keys.len())].to_owned(), random_json(rng, depth - 1))).collect())
        }
    }
}
