//! Alert webhooks over HTTPS against the real Alertmanager (issue 28): certificates made at run
//! time, Alertmanager serving TLS with bcrypt basic auth (`--web.config.file`) in the load
//! balancer's namespace, and the daemon delivering to three receivers:
//! - the right CA and password: `amtool alert query` over TLS lists Sluice's alert (its
//!   alertname and backend label);
//! - a wrong password: Alertmanager answers 401, and the daemon's log says so;
//! - an Alertmanager whose certificate another CA signed: refused, the log naming the unknown CA.
//!
//! Neither password shows in the daemon's log, its journal or `sluice status`; and a daemon
//! given a password file others may read refuses to start, naming the file and its mode.

use std::{
    net::TcpStream,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use sluice_tests::{
    l2lab::{sluice_bin, wait_for, Lab},
    netns::ChildGuard,
    pki,
};

const BACKEND: &str = "10.70.0.11";
const PASSWORD: &str = "right-horse-battery";
const WRONG: &str = "wrong-staple-9f3";

fn write(path: &Path, text: &str, mode: u32) -> PathBuf {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    path.to_owned()
}

/// Alertmanager on 127.0.0.1:`port` in the lab's load balancer namespace, serving TLS with
/// `tls` and basic auth for user sluice; no gossip, its own storage. Returns once it listens.
fn alertmanager(lab: &Lab, name: &str, port: u16, tls: &pki::Files) -> ChildGuard {
    let dir = lab.dir.join(name);
    std::fs::create_dir_all(dir.join("data")).expect("dir");
    let config = write(&dir.join("config.yml"), "route:\n  receiver: \"null\"\nreceivers:\n  - name: \"null\"\n", 0o644);
    let web = write(
        &dir.join("web.yml"),
        &format!("tls_server_config:\n  cert_file: {}\n  key_file: {}\nbasic_auth_users:\n  sluice: '{}'\n", tls.cert.display(), tls.key.display(), pki::bcrypt_hash(PASSWORD)),
        0o600,
    );
    let mut am = lab.lb.spawn(lab.lb.command("prometheus-alertmanager").args([
        format!("--config.file={}", config.display()),
        format!("--storage.path={}", dir.join("data").display()),
        format!("--web.listen-address=127.0.0.1:{port}"),
        format!("--web.config.file={}", web.display()),
        "--cluster.listen-address=".to_owned(),
    ]));
    wait_for(&format!("Alertmanager {name} to listen"), || {
        if let Some(out) = am.exited() {
            panic!("prometheus-alertmanager exited: {}", String::from_utf8_lossy(&out.stderr));
        }
        lab.lb.run(|| TcpStream::connect(("127.0.0.1", port)).is_ok())
    });
    am
}

/// The daemon's log so far: its standard error, read through /proc while it runs (nsenter
/// execs it, so the guard's process is the daemon).
fn log_of(daemon: &ChildGuard) -> String {
    std::fs::read_to_string(format!("/proc/{}/fd/2", daemon.id())).unwrap_or_default()
}

#[test]
fn alerts_reach_alertmanager_over_tls_with_basic_auth_and_bad_receivers_are_named() {
    let started = Instant::now();
    let lab = Lab::new(1);
    let ca = pki::Ca::new(&lab.dir.join("pki"), "alertmanager-ca");
    let am_cert = ca.issue("alertmanager", &["127.0.0.1", "localhost"]);
    let other = pki::Ca::new(&lab.dir.join("pki-other"), "other-ca");
    let rogue_cert = other.issue("rogue", &["127.0.0.1", "localhost"]);
    let _am = alertmanager(&lab, "am", 9093, &am_cert);
    let _rogue = alertmanager(&lab, "rogue", 9094, &rogue_cert);

    let password_file = write(&lab.dir.join("am-password"), &format!("{PASSWORD}\n"), 0o600);
    let wrong_file = write(&lab.dir.join("am-wrong-password"), &format!("{WRONG}\n"), 0o600);
    let (ca_file, pw, wrong) = (ca.cert.display(), password_file.display(), wrong_file.display());
    // max_conns = 1 and fire_after 0s: one client held, the next refused, and both alerts
    // (refusing, at limit) fire at once and stay firing while the client holds on.
    let alerts = format!(
        "[alerts]\nname = \"lb-tls\"\nfire_after = \"0s\"\nwebhooks = [\
         {{ url = \"https://127.0.0.1:9093/api/v2/alerts\", ca_file = \"{ca_file}\", basic_auth = {{ username = \"sluice\", password_file = \"{pw}\" }} }}, \
         {{ url = \"https://localhost:9093/api/v2/alerts\", ca_file = \"{ca_file}\", basic_auth = {{ username = \"sluice\", password_file = \"{wrong}\" }}, retries = 0 }}, \
         {{ url = \"https://127.0.0.1:9094/api/v2/alerts\", ca_file = \"{ca_file}\", retries = 0 }}]\n"
    );
    lab.write_config_with(&[(1, "max_conns = 1")], &alerts);

    // A password file others may read: the daemon refuses to start, naming the file and mode.
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut refused = lab.lb.spawn(lab.lb.command(sluice_bin()).arg("run").arg("--config").arg(&lab.config));
    let mut out = None;
    wait_for("the daemon to refuse the permissive password file", || {
        out = refused.exited();
        out.is_some()
    });
    let out = out.expect("exited");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with a 0644 password file: {err}");
    assert!(err.contains("alerts.webhooks[0].basic_auth.password_file") && err.contains(&pw.to_string()) && err.contains("0644"), "{err}");
    assert!(!lab.lb.link_show("lb0").contains("xdp"), "nothing attached");
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");

    let mut daemon = lab.start_daemon();
    let held = lab.connect().expect("the first client gets the backend");
    assert!(lab.connect().is_err(), "the second client is refused (max_conns = 1)");

    // amtool, over TLS with the CA and the password, lists the alert Sluice posted.
    let http_config = write(&lab.dir.join("amtool-http.yml"), &format!("tls_config:\n  ca_file: {ca_file}\nbasic_auth:\n  username: sluice\n  password: {PASSWORD}\n"), 0o600);
    let query = || {
        let out = lab.lb.output("amtool", &["alert", "query", "--alertmanager.url=https://127.0.0.1:9093", &format!("--http.config.file={}", http_config.display()), "-o", "json"]);
        assert!(out.status.success(), "amtool: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).expect("amtool's JSON")
    };
    let mut found = Vec::new();
    wait_for("Sluice's alert in Alertmanager", || {
        found = query();
        found.iter().any(|a| a["labels"]["backend"] == BACKEND)
    });
    let names: Vec<&str> = found.iter().filter(|a| a["labels"]["backend"] == BACKEND).filter_map(|a| a["labels"]["alertname"].as_str()).collect();
    assert!(names.iter().any(|n| *n == "SluiceRefusingConnections" || *n == "SluiceBackendAtLimit"), "{found:?}");
    println!("Alertmanager lists {names:?} for backend {BACKEND}");
    // Without the password, Alertmanager refuses amtool too (the auth is real).
    let anonymous = write(&lab.dir.join("amtool-anon.yml"), &format!("tls_config:\n  ca_file: {ca_file}\n"), 0o600);
    let out = lab.lb.output("amtool", &["alert", "query", "--alertmanager.url=https://127.0.0.1:9093", &format!("--http.config.file={}", anonymous.display())]);
    assert!(!out.status.success(), "amtool without the password: {}", String::from_utf8_lossy(&out.stdout));

    // The wrong password gets 401; the receiver with another CA's certificate is refused.
    wait_for("the 401 and the unknown CA in the daemon's log", || {
        let log = log_of(&daemon);
        log.contains("https://localhost:9093/api/v2/alerts: HTTP 401") && log.contains("https://127.0.0.1:9094/api/v2/alerts: TLS handshake") && log.contains("unknown CA")
    });
    let log = log_of(&daemon);
    let line = |want: &str| log.lines().find(|l| l.contains(want)).unwrap_or_else(|| panic!("no {want:?} in:\n{log}")).to_owned();
    println!("{}\n{}", line("HTTP 401"), line("unknown CA"));
    assert!(line("HTTP 401").contains("refused the credentials"), "{log}");
    assert!(line("unknown CA").contains(&format!("ca_file {ca_file}")), "{log}");

    // No password anywhere the daemon writes or shows.
    let (code, status, err) = lab.ctl(&["status"]);
    assert_eq!(code, 0, "{err}");
    drop(held);
    let out = daemon.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let journal = std::fs::read_to_string(lab.journal()).expect("journal");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for (what, text) in [("log", stderr.as_ref()), ("journal", journal.as_str()), ("status", status.as_str())] {
        for secret in [PASSWORD, WRONG] {
            assert!(!text.contains(secret), "the {what} contains a password:\n{text}");
        }
    }
    lab.detach();
    println!("run time {:?}", started.elapsed());
}
