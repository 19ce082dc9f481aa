//! The read-only control socket (`daemon.read_socket`, `daemon.read_socket_group`) of a running
//! daemon (in `sluice lab`'s namespaces), for monitoring users: with its directory private
//! (0700, as systemd makes /run/sluice), the daemon makes the directory 0710 and the group's,
//! the read socket 0660 and the group's, and keeps the root socket 0600. A user of the group
//! (not root) reads through it — named with `--socket`, or by the CLI's silent fallback from the
//! root socket — while every change through it is refused with a 403 that names the root socket
//! and changes nothing; a user outside the group is refused by the kernel (EACCES) and told so
//! in one sentence; root's socket still makes changes.

use std::{
    io::{Read as _, Write as _},
    os::unix::{
        fs::{MetadataExt as _, PermissionsExt as _},
        net::UnixStream,
    },
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use lb_userspace::config::Mode;
use serde_json::Value;
use sluice_lab::{
    topo::{BackendConf, ServiceOpts},
    Lab,
};
use sluice_tests::labs::{down_and_check, lab};

/// A group made for this test and removed when it ends, also on a panic.
struct TempGroup {
    name: String,
    gid: u32,
}

impl TempGroup {
    fn new() -> Self {
        let name = format!("slc-ro-{}", std::process::id());
        let _ = Command::new("groupdel").arg(&name).output();
        let out = Command::new("groupadd").arg(&name).output().expect("groupadd");
        assert!(out.status.success(), "groupadd {name}: {}", String::from_utf8_lossy(&out.stderr));
        let gid = nix::unistd::Group::from_name(&name).expect("group lookup").expect("the group just made").gid.as_raw();
        Self { name, gid }
    }
}

impl Drop for TempGroup {
    fn drop(&mut self) {
        let out = Command::new("groupdel").arg(&self.name).output();
        if !out.is_ok_and(|o| o.status.success()) {
            eprintln!("could not remove the test group {}", self.name);
        }
    }
}

/// `sluice ARGS` as root.
fn root(args: &[&str]) -> Output {
    Command::new(sluice_tests::sluice_bin()).args(args).output().expect("sluice")
}

/// `sluice ARGS` as nobody (uid/gid 65534), with `groups` as its only supplementary groups.
fn nobody(groups: Option<u32>, args: &[&str]) -> Output {
    let mut c = Command::new("setpriv");
    c.args(["--reuid", "65534", "--regid", "65534"]);
    match groups {
        Some(g) => c.arg("--groups").arg(g.to_string()),
        None => c.arg("--clear-groups"),
    };
    c.arg(sluice_tests::sluice_bin()).args(args).output().expect("setpriv")
}

fn ok(what: &str, out: &Output) -> String {
    assert!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Refused, in one line, without a trace; the stderr.
fn refused(what: &str, out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{what} succeeded: {}", String::from_utf8_lossy(&out.stdout));
    assert!(!err.contains("panicked") && err.trim().lines().count() == 1, "{what}: not one clear line: {err}");
    err
}

/// What must not change: every backend's limit, weight and state, per service (read as root).
fn state(socket: &Path) -> Value {
    let out = root(&["--socket", &socket.display().to_string(), "service", "list", "--json"]);
    let v: Value = serde_json::from_str(&ok("service list", &out)).expect("json");
    strip(&v)
}

fn strip(v: &Value) -> Value {
    let keep = ["name", "address", "max_conns", "weight", "state", "vip", "port", "mode"];
    match v {
        Value::Object(m) => Value::Object(m.iter().filter(|(k, v)| keep.contains(&k.as_str()) || v.is_array()).map(|(k, v)| (k.clone(), strip(v))).collect()),
        Value::Array(a) => Value::Array(a.iter().map(strip).collect()),
        v => v.clone(),
    }
}

/// One raw HTTP/1.1 POST on a Unix socket (as root): (status, body).
fn post(socket: &Path, path: &str, body: &str) -> (u16, String) {
    let mut s = UnixStream::connect(socket).expect("read socket");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let request = format!("POST {path} HTTP/1.1\r\nHost: sluice\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    // The daemon may answer (403) and close before it has read the body: ignore EPIPE.
    let _ = s.write_all(request.as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_owned()))
}

#[test]
fn the_read_socket_reads_for_its_group_and_refuses_changes() {
    let started = Instant::now();
    // Declared first, so it is removed after the lab (also when a check fails).
    let group = TempGroup::new();
    let lab: Lab = lab(2, 1, Mode::L2dsr);
    let backends: Vec<BackendConf> = (1..=2).map(|n| BackendConf { n, max_conns: 100, weight: 1 }).collect();
    let (sock, read) = (lab.socket(), lab.socket().with_file_name("sluice-read.sock"));
    let dir = sock.parent().expect("the lab's directory").to_owned();
    let text = lab.config_text(&backends, &ServiceOpts::default(), |c| (c.daemon.read_socket, c.daemon.read_socket_group) = (Some(read.clone()), Some(group.name.clone())));
    lab.write_config(&text).expect("config");
    // The sockets' directory private, as systemd's RuntimeDirectoryMode=0700 makes /run/sluice.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod the lab's directory");
    lab.start_daemon().expect("daemon");
    let (s, r) = (sock.display().to_string(), read.display().to_string());

    // Files: the read socket 0660 and the group's, the root socket still 0600 and root's, the
    // directory searchable (not listable) by the group only.
    let m = std::fs::metadata(&read).expect("read socket");
    assert_eq!((m.mode() & 0o777, m.uid(), m.gid()), (0o660, 0, group.gid), "read socket mode/owner/group");
    let m = std::fs::metadata(&sock).expect("root socket");
    assert_eq!((m.mode() & 0o777, m.uid()), (0o600, 0), "root socket mode/owner");
    let m = std::fs::metadata(&dir).expect("dir");
    assert_eq!((m.mode() & 0o777, m.gid()), (0o710, group.gid), "the sockets' directory");

    // Its own listener, named "read", in status.
    let st: Value = serde_json::from_str(&ok("status --json as root", &root(&["--socket", &s, "status", "--json"]))).expect("json");
    let listeners: Vec<(&str, &str)> =
        st["listeners"].as_array().expect("listeners").iter().map(|l| (l["name"].as_str().unwrap_or(""), l["address"].as_str().unwrap_or(""))).collect();
    assert!(listeners.contains(&("read", r.as_str())) && listeners.iter().any(|(n, _)| *n == "control"), "listeners: {listeners:?}");

    let before = state(&sock);

    // A member of the group reads through it: named, or by the fallback from the root socket.
    for socket in [&r, &s] {
        let out = ok(&format!("status --json through {socket} as a group member"), &nobody(Some(group.gid), &["--socket", socket, "status", "--json"]));
        let st: Value = serde_json::from_str(&out).expect("status json");
        assert_eq!(st["interface"], "lb0", "{out}");
        let out = ok(&format!("service list --json through {socket}"), &nobody(Some(group.gid), &["--socket", socket, "service", "list", "--json"]));
        assert_eq!(strip(&serde_json::from_str(&out).expect("json")), before, "the read socket shows what the root socket shows");
        let out = ok(&format!("service list through {socket}"), &nobody(Some(group.gid), &["--socket", socket, "service", "list"]));
        assert!(out.contains("198.18.0.11"), "{out}");
    }

    // Its changes are refused, naming the root socket, and change nothing.
    let config = lab.config_path().display().to_string();
    for socket in [&r, &s] {
        for args in [&["backend", "drain", "web", "198.18.0.11"][..], &["backend", "set-limit", "web", "198.18.0.12", "5", "--force"], &["config", "apply", &config, "--force"]] {
            let mut all = vec!["--socket", socket.as_str()];
            all.extend_from_slice(args);
            let err = refused(&format!("{args:?} through {socket} as a group member"), &nobody(Some(group.gid), &all));
            assert!(err.contains(&format!("read-only socket {r}")) && err.contains(&format!("root socket {s}")), "{args:?}: {err}");
            if args[1] == "drain" {
                print!("a change through {socket}: {err}");
            }
        }
    }
    // Every POST of the API, sent raw (as root, whom the socket admits too): 403 naming the root
    // socket, before any handler.
    for (path, body) in [
        ("/v1/config/apply", r#"{"path": "CONFIG", "force": true}"#.replace("CONFIG", &config)),
        ("/v1/services/web/backends/198.18.0.11/drain", "{}".to_owned()),
        ("/v1/services/web/backends/198.18.0.11/remove", r#"{"force": true}"#.to_owned()),
        ("/v1/services/web/backends/198.18.0.13/add", r#"{"max_conns": 5}"#.to_owned()),
        ("/v1/limits/raise", r#"{"service": "web", "backend": "198.18.0.11", "max_conns": 500, "ttl": "1m"}"#.to_owned()),
        ("/v1/node/drain", "{}".to_owned()),
        ("/v1/node/undrain", String::new()),
    ] {
        let (status, out) = post(&read, path, &body);
        assert_eq!(status, 403, "{path}: {out}");
        assert!(out.contains(&s), "{path}: the refusal should name the root socket: {out}");
    }
    assert_eq!(state(&sock), before, "a change refused on the read socket changed the daemon's state");

    // Outside the group: the kernel refuses, the CLI says so in one sentence.
    for socket in [&r, &s] {
        let err = refused(&format!("service list through {socket} outside the group"), &nobody(None, &["--socket", socket, "service", "list"]));
        assert!(err.contains("permission denied") && err.contains("root"), "{err}");
        print!("outside the group, through {socket}: {err}");
    }

    // Root's socket still changes things (and a drain shows through the read socket too).
    ok("drain as root", &root(&["--socket", &s, "backend", "drain", "web", "198.18.0.11"]));
    let drained = ok("service list --json through the read socket", &nobody(Some(group.gid), &["--socket", &r, "service", "list", "--json"]));
    assert_ne!(strip(&serde_json::from_str(&drained).expect("json")), before, "the drain shows through the read socket");
    ok("undrain as root", &root(&["--socket", &s, "backend", "undrain", "web", "198.18.0.11"]));
    assert_eq!(state(&sock), before, "undrained");

    down_and_check(lab);
    drop(group);
    assert!(nix::unistd::Group::from_name(&format!("slc-ro-{}", std::process::id())).expect("lookup").is_none(), "the test group is removed");
    println!("read socket test: {:.1}s", started.elapsed().as_secs_f64());
}
