//! TLS and authentication on the channels that leave the host, against the real components
//! (issue 28), with certificates made by the test:
//! - `/metrics` with the exporter toolkit's web config (TLS, bcrypt basic auth): the real
//!   Prometheus scrapes it over TLS with credentials (its target is `up`), a job without
//!   credentials gets 401, plain HTTP fails the handshake and is counted; a key file others may
//!   read stops the start, naming the file and its mode;
//! - the peer channel over mutual TLS: a node's certificate from the cluster's CA is taken, a
//!   message again is a replay, a message for another node than the certificate's is refused,
//!   and a client without a certificate or with one from another CA fails the handshake
//!   (counted);
//! - the real etcd with `--client-cert-auth`: the node with the right certificate gets its
//!   shares; started again with a certificate from another CA it is refused, and it says why
//!   (status, the alert naming `cluster.limits.tls`) while the datapath keeps forwarding;
//! - etcd with RBAC: the node's user with its password from a 0600 file joins; a wrong password
//!   is refused and said, and no password appears in the log, status or journal;
//! - a certificate that expired or comes from another CA is diagnosed naming the file.

use std::{
    io::{Read as _, Write as _},
    path::Path,
    process::Output,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use serde_json::Value;
use sluice_tests::{
    l2lab::{wait_for, Lab},
    pki::{bcrypt_hash, Ca},
    promtool_check, sluice_bin,
};

const PASSWORD: &str = "scrape-me-4-metrics";
const LB: &str = "10.70.0.1";
const PEER_PORT: u16 = 9478;

/// Adds `line` to the config's `[daemon]` table.
fn daemon_key(config: &Path, line: &str) {
    let text = std::fs::read_to_string(config).expect("config");
    std::fs::write(config, text.replacen("[daemon]\n", &format!("[daemon]\n{line}\n"), 1)).expect("config");
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// `sluice status --json` of the lab's daemon.
fn status(lab: &Lab) -> Value {
    let (code, out, err) = lab.ctl(&["status", "--json"]);
    assert_eq!(code, 0, "status: {out}{err}");
    serde_json::from_str(&out).expect("status json")
}

fn listener<'a>(st: &'a Value, name: &str) -> &'a Value {
    st["listeners"].as_array().expect("listeners").iter().find(|l| l["name"] == name).unwrap_or_else(|| panic!("no {name} listener: {st}"))
}

/// Polls `f` every 250 ms for up to `secs`.
fn wait_long(what: &str, secs: u64, mut f: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match f() {
            Ok(()) => return,
            Err(last) => assert!(Instant::now() < deadline, "timed out waiting for {what}; last: {last}"),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn metrics_over_tls_with_basic_auth_are_scraped_by_prometheus_and_refused_without() {
    let lab = Lab::new(1);
    let ca = Ca::new(&lab.dir.join("pki"), "metrics-ca");
    let server = ca.issue("metrics", &["127.0.0.1", "localhost"]);
    let web = lab.dir.join("web.yml");
    std::fs::write(
        &web,
        format!("tls_server_config:\n  cert_file: {}\n  key_file: {}\nbasic_auth_users:\n  prometheus: '{}'\n", server.cert.display(), server.key.display(), bcrypt_hash(PASSWORD)),
    )
    .expect("web.yml");
    lab.write_config(&[(1, "max_conns = 50")]);
    daemon_key(&lab.config, &format!("metrics_web_config = \"{}\"", web.display()));

    // A private key others may read: the daemon does not start, and says which file and why.
    std::fs::set_permissions(&server.key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).expect("chmod");
    let mut refused = lab.lb.spawn(lab.lb.command(sluice_bin()).arg("run").arg("--config").arg(&lab.config));
    let mut out = None;
    wait_for("the daemon to refuse the permissive key", || {
        out = refused.exited();
        out.is_some()
    });
    let out = out.expect("exited");
    let said = text(&out);
    assert!(!out.status.success() && said.contains(&server.key.display().to_string()) && said.contains("0644"), "{said}");
    assert!(!lab.lb.link_show("lb0").contains("xdp"), "refused before attaching anything");
    std::fs::set_permissions(&server.key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");

    let mut daemon = lab.start_daemon();
    let curl = |extra: &[&str]| -> (String, String) {
        let ca = ca.cert.display().to_string();
        let mut args = vec!["-sS", "-o", "-", "-w", "\n%{http_code}", "--max-time", "5", "--cacert", &ca];
        args.extend_from_slice(extra);
        let o = lab.lb.output("curl", &args);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
        (code.to_owned(), format!("{body}{}", String::from_utf8_lossy(&o.stderr)))
    };
    let url = "https://127.0.0.1:9477/metrics";
    assert_eq!(curl(&[url]).0, "401", "no credentials");
    assert_eq!(curl(&["-u", "prometheus:wrong", url]).0, "401", "a wrong password");
    assert_eq!(curl(&["-u", &format!("nobody:{PASSWORD}"), url]).0, "401", "an unknown user");
    let (code, body) = curl(&["-u", &format!("prometheus:{PASSWORD}"), url]);
    assert_eq!(code, "200", "{body}");
    promtool_check(body.trim_end_matches(|c| c != '\n'));
    // Plain HTTP on the TLS listener: no answer, a failed handshake (counted below).
    let (code, said) = curl(&["http://127.0.0.1:9477/metrics"]);
    assert_ne!(code, "200", "plain HTTP served: {said}");

    // The real Prometheus: one job with the CA and the credentials, one without credentials.
    let prom = lab.dir.join("prometheus.yml");
    let job = |name: &str, auth: &str| {
        format!(
            "  - job_name: {name}\n    scheme: https\n    scrape_interval: 1s\n    scrape_timeout: 1s\n    tls_config:\n      ca_file: {}\n{auth}    static_configs:\n      - targets: ['127.0.0.1:9477']\n",
            ca.cert.display()
        )
    };
    std::fs::write(
        &prom,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n{}{}",
            job("sluice", &format!("    basic_auth:\n      username: prometheus\n      password: {PASSWORD}\n")),
            job("sluice-no-auth", "")
        ),
    )
    .expect("prometheus.yml");
    let mut prometheus = lab.lb.spawn(
        lab.lb
            .command("prometheus")
            .arg(format!("--config.file={}", prom.display()))
            .arg(format!("--storage.tsdb.path={}", lab.dir.join("tsdb").display()))
            .args(["--web.listen-address=127.0.0.1:19090", "--log.level=warn"]),
    );
    wait_long("Prometheus to scrape both jobs", 60, || {
        if let Some(out) = prometheus.exited() {
            panic!("prometheus exited: {}", text(&out));
        }
        let o = lab.lb.output("curl", &["-sS", "--max-time", "2", "http://127.0.0.1:19090/api/v1/targets"]);
        let v: Value = serde_json::from_slice(&o.stdout).map_err(|e| format!("{e}: {}", text(&o)))?;
        let targets = v["data"]["activeTargets"].as_array().ok_or("no targets yet")?;
        let of = |job: &str| {
            targets.iter().find(|t| t["labels"]["job"] == job).map(|t| (t["health"].as_str().unwrap_or("").to_owned(), t["lastError"].as_str().unwrap_or("").to_owned()))
        };
        match (of("sluice"), of("sluice-no-auth")) {
            (Some((up, _)), Some((down, err))) if up == "up" && down == "down" && err.contains("401") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    drop(prometheus);

    let st = status(&lab);
    let m = listener(&st, "metrics");
    assert!(m["handshake_failures"].as_u64() >= Some(1), "the plain HTTP attempt is counted: {m}");
    // The password appears nowhere the daemon writes.
    let journal = std::fs::read_to_string(lab.journal()).unwrap_or_default();
    assert!(!journal.contains(PASSWORD) && !st.to_string().contains(PASSWORD));
    let out = daemon.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10));
    assert!(!text(&out).contains(PASSWORD), "the password in the daemon's log");
    lab.detach();
}

/// The `[cluster]` table of a node named lb1 whose peer channel listens on the lab's address
/// with mutual TLS (no BIRD runs: the announcer retries, which is fine here).
/// Its one peer is n2 at the client's address (nothing listens there: the sender retries).
fn cluster_table(lab: &Lab, ca: &Ca, node: &sluice_tests::pki::Files, limits: &str) -> String {
    format!(
        "[cluster]\nnode = \"lb1\"\nbird_socket = \"{}\"\nannounce_dir = \"{}\"\npeer_listen = \"{LB}:{PEER_PORT}\"\npeers = [\"10.70.0.2:{PEER_PORT}\"]\n\
         tls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\" }}\n{limits}",
        lab.dir.join("bird.ctl").display(),
        lab.dir.join("bird").display(),
        ca.cert.display(),
        node.cert.display(),
        node.key.display()
    )
}

#[test]
fn the_peer_channel_takes_only_the_cluster_s_certificates_for_their_own_node() {
    let lab = Lab::new(1);
    let ca = Ca::new(&lab.dir.join("pki"), "cluster-ca");
    let lb1 = ca.issue("lb1", &["lb1", LB]);
    let n2 = ca.issue("n2", &["n2", "10.70.0.2"]);
    // From the cluster's CA, for a host that is no peer (etcd's, say).
    let not_a_peer = ca.issue("n3", &["n3", "10.70.0.3"]);
    let stranger_ca = Ca::new(&lab.dir.join("pki-other"), "other-ca");
    let stranger = stranger_ca.issue("n2-other", &["n2", "10.70.0.2"]);
    lab.write_config_with(&[(1, "max_conns = 50")], &cluster_table(&lab, &ca, &lb1, ""));
    let mut daemon = lab.start_daemon();
    let url = format!("https://{LB}:{PEER_PORT}/v1/peer/moved");
    let now_ms = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis();
    // From the client's namespace: another host on the nodes' network.
    let post = |cert: Option<&sluice_tests::pki::Files>, body: &str| -> (String, String) {
        let ca = ca.cert.display().to_string();
        let mut args: Vec<String> = ["-sS", "-o", "-", "-w", "\n%{http_code}", "--max-time", "5", "--cacert", &ca, "-H", "content-type: application/json", "--data-binary", body]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        if let Some(c) = cert {
            args.extend(["--cert".into(), c.cert.display().to_string(), "--key".into(), c.key.display().to_string()]);
        }
        args.push(url.clone());
        let o = lab.client.output("curl", &args.iter().map(String::as_str).collect::<Vec<_>>());
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
        (code.to_owned(), format!("{body}{}", String::from_utf8_lossy(&o.stderr)))
    };
    let msg = format!("{{\"node\":\"n2\",\"sent_ms\":{},\"flows\":[],\"etcd\":true}}", now_ms());
    let (code, said) = post(Some(&n2), &msg);
    assert_eq!(code, "200", "n2's certificate, n2's message: {said}");
    let (code, said) = post(Some(&n2), &msg);
    assert_eq!(code, "409", "the same message again is a replay: {said}");
    let (code, said) = post(Some(&n2), &format!("{{\"node\":\"n3\",\"sent_ms\":{},\"flows\":[],\"etcd\":true}}", now_ms()));
    assert_eq!(code, "403", "n2's certificate cannot speak for n3: {said}");
    assert!(said.contains("n3"), "{said}");
    let (code, said) = post(Some(&not_a_peer), &format!("{{\"node\":\"n3\",\"sent_ms\":{},\"flows\":[],\"etcd\":true}}", now_ms()));
    assert_eq!(code, "403", "a certificate of the cluster's CA for a host that is not in cluster.peers: {said}");
    assert!(said.contains("cluster.peers"), "{said}");
    let before = listener(&status(&lab), "peer")["handshake_failures"].as_u64().expect("count");
    let fresh = || format!("{{\"node\":\"n2\",\"sent_ms\":{},\"flows\":[],\"etcd\":true}}", now_ms());
    let (code, said) = post(None, &fresh());
    assert_ne!(code, "200", "no client certificate: {said}");
    let (code, said) = post(Some(&stranger), &fresh());
    assert_ne!(code, "200", "a certificate from another CA: {said}");
    let st = status(&lab);
    let peer = listener(&st, "peer");
    assert!(peer["handshake_failures"].as_u64().expect("count") >= before + 2, "both failed handshakes counted: {peer}");
    assert_eq!(st["peers"]["refused"].as_u64(), Some(3), "the replay, the message for another node, the host that is no peer: {}", st["peers"]);
    let log = text(&daemon.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10)));
    // Logged at most every 10 s per listener: the first failure's reason.
    assert!(log.contains("a TLS handshake failed: the other side presented no certificate"), "the log names why: {log}");
    lab.detach();
}

/// A one-member etcd in the load balancer's namespace, its clients on `url`, its data in the
/// lab's directory.
fn etcd_command(lab: &Lab, url: &str) -> std::process::Command {
    let mut c = lab.lb.command("etcd");
    c.args(["--name", "test", "--data-dir"])
        .arg(lab.dir.join("etcd"))
        .args(["--listen-client-urls", url, "--advertise-client-urls", url])
        .args(["--listen-peer-urls", "http://127.0.0.1:23800", "--initial-advertise-peer-urls", "http://127.0.0.1:23800"])
        .args(["--initial-cluster", "test=http://127.0.0.1:23800", "--log-level", "warn"]);
    c
}

/// etcd in the load balancer's namespace on loopback, TLS only, clients need a certificate
/// from `ca` (as etcd's security guide runs it).
fn start_etcd(lab: &Lab, ca: &Ca) -> sluice_tests::netns::ChildGuard {
    let server = ca.issue("etcd", &["127.0.0.1"]);
    let url = "https://127.0.0.1:23790";
    let etcd = lab
        .lb
        .spawn(etcd_command(lab, url).arg("--cert-file").arg(&server.cert).arg("--key-file").arg(&server.key).arg("--trusted-ca-file").arg(&ca.cert).arg("--client-cert-auth"));
    let ca_path = ca.cert.display().to_string();
    let (cert, key) = (server.cert.display().to_string(), server.key.display().to_string());
    wait_for("etcd to answer over TLS", || {
        lab.lb.output("etcdctl", &["--endpoints", url, "--command-timeout=1s", "--cacert", &ca_path, "--cert", &cert, "--key", &key, "endpoint", "health"]).status.success()
    });
    etcd
}

#[test]
fn etcd_with_client_certificates_takes_the_cluster_s_node_and_refuses_another_ca_naming_why() {
    let lab = Lab::new(1);
    let ca = Ca::new(&lab.dir.join("pki"), "cluster-ca");
    let _etcd = start_etcd(&lab, &ca);
    let lb1 = ca.issue("lb1", &["lb1", LB]);
    let limits = |node: &sluice_tests::pki::Files| {
        format!(
            "[cluster.limits]\netcd = [\"https://127.0.0.1:23790\"]\nnodes = 2\nlease_ttl = \"2s\"\ntls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\" }}\n",
            ca.cert.display(),
            node.cert.display(),
            node.key.display()
        )
    };
    lab.write_config_with(&[(1, "max_conns = 50")], &cluster_table(&lab, &ca, &lb1, &limits(&lb1)));
    let mut daemon = lab.start_daemon();
    wait_long("the node to join etcd with a lease and its report", 30, || {
        let l = status(&lab)["limits"].clone();
        if l["connected"] == true && l["lease"].is_u64() && l["nodes"]["lb1"].is_object() && l["leader"] == "lb1" {
            Ok(())
        } else {
            Err(l.to_string())
        }
    });
    // A client's connection: the first SYN is refused (no share without load), which is
    // demand; etcd's allocator grants this node a share and the next one is admitted.
    let mut held = None;
    wait_long("a connection admitted on a share from etcd", 20, || match lab.connect() {
        Ok((backend, s)) if !backend.is_empty() => {
            held = Some(s);
            Ok(())
        }
        other => Err(format!("{:?}", other.map(|(b, _)| b))),
    });
    let mut held = held.expect("held");
    let _ = daemon.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10));

    // The same node with a certificate from another CA: etcd refuses it.
    let other = Ca::new(&lab.dir.join("pki-other"), "other-ca");
    let impostor = other.issue("lb1-other", &["lb1", LB]);
    lab.write_config_with(&[(1, "max_conns = 50")], &cluster_table(&lab, &ca, &lb1, &limits(&impostor)));
    let mut daemon = lab.start_daemon();
    let mut last = Value::Null;
    wait_long("the refusal, named, and the alert", 30, || {
        last = status(&lab);
        let error = last["limits"]["error"].as_str().unwrap_or("");
        let alert = last["alerts_firing"].as_array().and_then(|a| a.iter().find(|x| x["alertname"] == "SluiceLimitsWithoutEtcd").cloned());
        match alert {
            Some(a) if last["limits"]["connected"] == false && error.contains("cluster.limits.tls") && a.to_string().contains("cluster.limits.tls") => Ok(()),
            _ => Err(format!("error {error:?}; firing {}", last["alerts_firing"])),
        }
    });
    let error = last["limits"]["error"].as_str().unwrap_or("").to_owned();
    assert!(error.contains("not signed by the CA") && error.contains(&impostor.cert.display().to_string()), "names the certificate and why: {error}");
    // Without etcd: the safe share (50 / 2 nodes), journaled, and the datapath forwards.
    wait_long("the safe share", 15, || {
        let journal = std::fs::read_to_string(lab.journal()).unwrap_or_default();
        let safe = journal.lines().rev().find(|l| l.contains("lost etcd for longer than its lease: safe shares"));
        match safe {
            Some(l) if l.contains("safe share 25, max_conns 50") && status(&lab)["limits"]["fallback"] == true => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    // The client's connection, opened under etcd's share, still gets answers.
    held.write_all(b"still there?").expect("write");
    let mut buf = [0u8; 12];
    held.read_exact(&mut buf).expect("the datapath forwards without etcd");
    assert_eq!(&buf, b"still there?");
    let _ = daemon.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10));
    lab.detach();
}

/// Why a peer or etcd may refuse this node's certificate, said before anyone refuses it: an
/// expired certificate and one from another CA are named with the file; the node's own
/// certificate is for its name and address, not another node's.
#[test]
fn a_certificate_is_diagnosed_expired_or_from_another_ca() {
    let dir = std::env::temp_dir().join(format!("sluice-tls-diagnose-{}", std::process::id()));
    let ca = Ca::new(&dir.join("a"), "ca-a");
    let other = Ca::new(&dir.join("b"), "ca-b");
    let good = ca.issue("lb1", &["lb1", "10.0.0.11"]);
    let expired = ca.issue_expired("old", &["lb1"]);
    let stranger = other.issue("lb1-b", &["lb1"]);
    assert_eq!(lb_userspace::tls::diagnose_own(&good.cert, &ca.cert), None);
    let said = lb_userspace::tls::diagnose_own(&expired.cert, &ca.cert).expect("expired");
    assert!(said.contains("expired at 2021-01-01") && said.contains(&expired.cert.display().to_string()), "{said}");
    let said = lb_userspace::tls::diagnose_own(&stranger.cert, &ca.cert).expect("another CA");
    assert!(said.contains("is not signed by the CA") && said.contains(&ca.cert.display().to_string()), "{said}");
    let der = lb_userspace::tls::read_certs(&good.cert, "cert").expect("read").remove(0);
    assert!(lb_userspace::tls::cert_is_for(&der, "lb1") && lb_userspace::tls::cert_is_for(&der, "10.0.0.11"));
    assert!(!lb_userspace::tls::cert_is_for(&der, "lb2") && !lb_userspace::tls::cert_is_for(&der, "10.0.0.12"));
    // Both sides of the peer channel load from these files.
    let files = lb_userspace::tls::TlsFiles { ca: ca.cert.clone(), cert: good.cert.clone(), key: good.key.clone() };
    assert!(lb_userspace::tls::Mutual::load(&files, "cluster.tls").is_ok());
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// etcd with RBAC (`auth enable`): the node's user, its password from a 0600 file, reads and
/// writes its prefix and gets a lease; with a wrong password it is refused, says so, and the
/// password appears nowhere.
#[test]
fn etcd_with_rbac_takes_the_node_s_user_and_refuses_a_wrong_password() {
    let lab = Lab::new(1);
    let url = "http://127.0.0.1:23791";
    let _etcd = lab.lb.spawn(&mut etcd_command(&lab, url));
    let etcdctl = |args: &[&str]| {
        let mut all = vec!["--endpoints", url, "--command-timeout=2s"];
        all.extend_from_slice(args);
        lab.lb.output("etcdctl", &all)
    };
    wait_for("etcd to answer", || etcdctl(&["endpoint", "health"]).status.success());
    for step in [
        &["user", "add", "root:root-pw-1"][..],
        &["user", "add", "sluice:node-pw-1"],
        &["role", "add", "sluice"],
        &["role", "grant-permission", "sluice", "--prefix=true", "readwrite", "/sluice"],
        &["user", "grant-role", "sluice", "sluice"],
        &["auth", "enable"],
    ] {
        let o = etcdctl(step);
        assert!(o.status.success(), "etcdctl {step:?}: {}", text(&o));
    }
    let password = lab.dir.join("etcd.password");
    let write_password = |pw: &str| {
        std::fs::write(&password, format!("{pw}\n")).expect("password");
        std::fs::set_permissions(&password, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    };
    write_password("node-pw-1");
    let ca = Ca::new(&lab.dir.join("pki"), "cluster-ca");
    let lb1 = ca.issue("lb1", &["lb1", LB]);
    let limits = format!("[cluster.limits]\netcd = [\"{url}\"]\nnodes = 2\nlease_ttl = \"2s\"\nusername = \"sluice\"\npassword_file = \"{}\"\n", password.display());
    lab.write_config_with(&[(1, "max_conns = 50")], &cluster_table(&lab, &ca, &lb1, &limits));
    let mut daemon = lab.start_daemon();
    wait_long("the node to join etcd as its user", 30, || {
        let l = status(&lab)["limits"].clone();
        if l["connected"] == true && l["lease"].is_u64() && l["nodes"]["lb1"].is_object() {
            Ok(())
        } else {
            Err(l.to_string())
        }
    });
    let _ = daemon.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10));

    write_password("not-the-password");
    let mut daemon = lab.start_daemon();
    let mut last = Value::Null;
    wait_long("the refusal, said", 30, || {
        last = status(&lab)["limits"].clone();
        let error = last["error"].as_str().unwrap_or("");
        if last["connected"] == false && error.contains("authentication failed") {
            Ok(())
        } else {
            Err(last.to_string())
        }
    });
    let out = daemon.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10));
    let everything = format!("{}{last}{}", text(&out), std::fs::read_to_string(lab.journal()).unwrap_or_default());
    assert!(!everything.contains("not-the-password") && !everything.contains("node-pw-1"), "a password in the log, status or journal");
    lab.detach();
}
