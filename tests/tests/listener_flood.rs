//! No listener can starve the daemon. A daemon with `[cluster]` (its peer channel listening on
//! the network) and `/metrics` on the network, started under a 1024 open-file limit (systemd's
//! default soft limit) with two health-checked backends, takes from another namespace 2,000
//! idle connections to each listener plus a slow-loris trickle (a header byte a second) on
//! each. Meanwhile: `sluice status` answers over the control socket, both backends stay active
//! (no health check fails, not even for a cause on this node), a change is journaled, and the
//! daemon closes every flood connection by itself (over the limit at once, the rest and the
//! trickles at the header timeout). Afterwards `/metrics` and `sluice status --json` count the
//! refused and timed-out connections per listener, and the exposition passes promtool.
//!
//! Before the fix (no connection limit, no header timeout), the daemon's accepts ran into
//! EMFILE: the control socket stopped answering and health checks failed with "Too many open
//! files".

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::{fd::FromRawFd as _, unix::process::CommandExt as _},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use serde_json::Value;
use sluice_tests::{
    l2lab::{wait_for, Lab},
    netns::{ChildGuard, Netns},
    promtool_check, sluice_bin,
};

const HEALTH: &str = "max_conns = 100\nhealth = { kind = \"tcp\", interval = \"200ms\", timeout = \"150ms\", rise = 2, fall = 2 }";
const LB: &str = "10.70.0.1";
const PEER_PORT: u16 = 9478;
const METRICS_PORT: u16 = 9477;
/// Idle connections opened to each listener.
const FLOOD: usize = 2_000;
/// The daemon's open-file limit, soft and hard: systemd's default soft limit.
const NOFILE: u64 = 1024;
/// The listeners' default limits (config.rs).
const PEER_MAX: u64 = 64;
const METRICS_MAX: u64 = 32;
/// A generous deadline for one answer of the control socket.
const ANSWER: Duration = Duration::from_secs(10);

/// Raises this process's open-file limit: it holds both floods.
fn raise_own_limit(want: u64) {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit on a valid, initialised struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut r), 0, "getrlimit");
        if r.rlim_cur < want {
            r.rlim_cur = want.max(r.rlim_cur);
            r.rlim_max = r.rlim_max.max(want);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &raw const r), 0, "raising the test's own open-file limit to {want}: {}", std::io::Error::last_os_error());
        }
    }
}

/// Starts `sluice run` in the load balancer's namespace under an open-file limit of `nofile`
/// (soft and hard, as a unit without `LimitNOFILE=` under a low default would).
fn start_daemon_limited(lab: &Lab, nofile: u64) -> ChildGuard {
    let mut cmd = lab.lb.command(sluice_bin());
    cmd.arg("run").arg("--config").arg(&lab.config);
    // SAFETY: runs between fork and exec; setrlimit is async-signal-safe and nothing allocates.
    unsafe {
        cmd.pre_exec(move || {
            let r = libc::rlimit { rlim_cur: nofile, rlim_max: nofile };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut d = lab.lb.spawn(&mut cmd);
    wait_for("the daemon to attach and serve", || {
        if let Some(out) = d.exited() {
            panic!("sluice run exited: {}", String::from_utf8_lossy(&out.stderr));
        }
        lab.lb.link_show("lb0").contains("xdp") && lab.socket().exists()
    });
    d
}

/// `sluice --socket S args…` with a deadline: `None` if it has not answered by then (killed).
fn ctl_within(lab: &Lab, args: &[&str], deadline: Duration) -> Option<(i32, String, String)> {
    let mut child = std::process::Command::new(sluice_bin())
        .arg("--socket")
        .arg(lab.socket())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("sluice");
    let until = Instant::now() + deadline;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    Some((out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned()))
}

/// `sluice status --json`, which must answer within [`ANSWER`].
fn status(lab: &Lab, during: &str) -> Value {
    let (code, out, err) = ctl_within(lab, &["status", "--json"], ANSWER).unwrap_or_else(|| panic!("`sluice status` did not answer within {ANSWER:?} {during}"));
    assert_eq!(code, 0, "`sluice status` {during}: {err}");
    serde_json::from_str(&out).expect("status json")
}

fn states(st: &Value) -> Vec<String> {
    st["services"][0]["backends"].as_array().into_iter().flatten().map(|b| b["state"].as_str().unwrap_or("").to_owned()).collect()
}

fn firing(st: &Value, alert: &str) -> bool {
    st["alerts_firing"].as_array().into_iter().flatten().any(|a| a["alertname"] == alert)
}

/// The accept queue of the listener on `port` in `ns` (`ss`'s Recv-Q of a listening socket).
fn accept_queue(ns: &Netns, port: u16) -> usize {
    let out = ns.output("ss", &["-Hltn", &format!("sport = :{port}")]);
    String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1).and_then(|q| q.parse().ok()).unwrap_or(0)
}

/// `n` TCP connections to `to` from inside `ns`, connecting in the background (non-blocking:
/// a listener that does not accept leaves them in SYN_SENT rather than stalling the test).
/// They send nothing. Opened in batches, each once the listener's accept queue (in `server`)
/// has room: past a full queue the kernel drops handshakes (with SYN cookies the client then
/// believes itself connected to a server that never heard of it) and the flood would not all
/// reach the daemon. A listener that does not drain its queue for 2 s gets the rest at once.
fn flood(ns: &Netns, server: &Netns, to: SocketAddr, n: usize) -> Vec<TcpStream> {
    let SocketAddr::V4(v4) = to else { panic!("IPv4 only") };
    let mut paced = true;
    let mut out = Vec::with_capacity(n);
    for batch in (0..n).collect::<Vec<_>>().chunks(50) {
        if paced {
            let since = Instant::now();
            while accept_queue(server, to.port()) > 100 {
                if since.elapsed() > Duration::from_secs(2) {
                    println!("the listener on {to} does not drain its accept queue: the rest of the flood at once");
                    paced = false;
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        out.extend(connect_all(ns, v4, batch.len()));
    }
    out
}

fn connect_all(ns: &Netns, v4: std::net::SocketAddrV4, n: usize) -> Vec<TcpStream> {
    let to = SocketAddr::V4(v4);
    ns.run(|| {
        (0..n)
            .map(|_| {
                // SAFETY: a fresh socket, a fully initialised sockaddr_in; the fd is owned by the
                // TcpStream from here on.
                unsafe {
                    let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0);
                    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
                    let sa = libc::sockaddr_in {
                        sin_family: libc::AF_INET as libc::sa_family_t,
                        sin_port: v4.port().to_be(),
                        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
                        sin_zero: [0; 8],
                    };
                    let rc = libc::connect(fd, (&raw const sa).cast(), size_of::<libc::sockaddr_in>() as libc::socklen_t);
                    let e = std::io::Error::last_os_error();
                    assert!(rc == 0 || e.raw_os_error() == Some(libc::EINPROGRESS), "connect to {to}: {e}");
                    TcpStream::from_raw_fd(fd)
                }
            })
            .collect()
    })
}

/// How many of `conns` the other side has closed (EOF or reset); `conns` are non-blocking.
fn closed_by_peer(conns: &[TcpStream]) -> usize {
    let mut buf = [0u8; 256];
    conns
        .iter()
        .filter(|c| {
            let mut c: &TcpStream = c;
            loop {
                match c.read(&mut buf) {
                    Ok(0) => return true,
                    // An answer (a 503 to a refused connection): read on to the close.
                    Ok(_) => {}
                    Err(e) => return matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe),
                }
            }
        })
        .count()
}

/// Waits up to 30 s for the daemon to close every one of `conns` (the flood of `name`).
fn wait_closed(lab: &Lab, name: &str, conns: &[TcpStream]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let closed = closed_by_peer(conns);
        if closed == conns.len() {
            return;
        }
        if Instant::now() > deadline {
            let ss = lab.client.output("ss", &["-tan"]);
            let mut states = std::collections::BTreeMap::new();
            for l in String::from_utf8_lossy(&ss.stdout).lines().skip(1) {
                *states.entry(l.split_whitespace().next().unwrap_or("").to_owned()).or_insert(0) += 1;
            }
            panic!("the daemon closed {closed} of the {} connections of the {name} flood within 30 s; the client's sockets: {states:?}", conns.len());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A slow-loris client: connects to `to` from `ns` and sends `head` one byte a second until
/// the server closes the connection or `stop`. Returns whether the server closed it.
fn slow_loris(ns: &Netns, to: SocketAddr, head: &'static str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<bool> {
    let stream = ns.run(|| TcpStream::connect_timeout(&to, Duration::from_secs(3)).expect("slow-loris connect"));
    std::thread::spawn(move || {
        let mut s = stream;
        s.set_read_timeout(Some(Duration::from_secs(1))).expect("timeout");
        let mut buf = [0u8; 256];
        for b in head.bytes().cycle() {
            if stop.load(Ordering::Relaxed) {
                return false;
            }
            if s.write_all(&[b]).is_err() {
                return true;
            }
            // Also waits the second between bytes.
            match s.read(&mut buf) {
                Ok(0) => return true,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe) => return true,
                _ => {}
            }
        }
        unreachable!("cycle() never ends")
    })
}

/// The value of the sample `name{labels}` in a scrape.
fn sample(m: &str, series: &str) -> Option<f64> {
    m.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// `GET /metrics` on the load balancer's loopback: the body, or nothing unless 200.
fn scrape(lab: &Lab) -> String {
    lab.lb.run(|| {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", METRICS_PORT)) else { return String::new() };
        let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        if body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200") {
            body.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
        } else {
            String::new()
        }
    })
}

/// The lab's config with `/metrics` on every address and a `[cluster]` whose peer channel
/// listens on the load balancer's address (no BIRD runs: the announcer retries, which is fine).
fn write_config(lab: &Lab) {
    let key = lab.dir.join("peer.key");
    std::fs::write(&key, "sixteen-or-more-bytes-of-key\n").expect("key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod 600");
    let cluster = format!(
        "[cluster]\nnode = \"lb1\"\nbird_socket = \"{}\"\nannounce_dir = \"{}\"\npeer_listen = \"{LB}:{PEER_PORT}\"\npeer_key_file = \"{}\"\n",
        lab.dir.join("bird.ctl").display(),
        lab.dir.join("bird").display(),
        key.display()
    );
    lab.write_config_with(&[(1, HEALTH), (2, HEALTH)], &cluster);
    let text = std::fs::read_to_string(&lab.config).expect("config");
    let text = text.replacen("[daemon]\n", &format!("[daemon]\nmetrics_listen = \"0.0.0.0:{METRICS_PORT}\"\n"), 1);
    std::fs::write(&lab.config, text).expect("config");
}

#[test]
fn a_flood_of_idle_and_slow_connections_starves_nothing() {
    raise_own_limit(2 * FLOOD as u64 + 1_000);
    let lab = Lab::new(2);
    write_config(&lab);
    let mut daemon = start_daemon_limited(&lab, NOFILE);
    wait_for("both backends active", || states(&status(&lab, "before the flood")) == ["active", "active"]);

    // A slow-loris trickle on each listener first (so each holds a slot), then the floods.
    let peer: SocketAddr = format!("{LB}:{PEER_PORT}").parse().expect("addr");
    let metrics: SocketAddr = format!("{LB}:{METRICS_PORT}").parse().expect("addr");
    let stop = Arc::new(AtomicBool::new(false));
    let lorises = [
        slow_loris(&lab.client, peer, "POST /v1/peer/moved HTTP/1.1\r\nHost: lb\r\nContent-Type: application/json\r\n", stop.clone()),
        slow_loris(&lab.client, metrics, "GET /metrics HTTP/1.1\r\nHost: lb\r\nAccept: text/plain\r\n", stop.clone()),
    ];
    std::thread::sleep(Duration::from_secs(2));
    let peer_flood = flood(&lab.client, &lab.lb, peer, FLOOD);
    let metrics_flood = flood(&lab.client, &lab.lb, metrics, FLOOD);
    println!("{FLOOD} idle connections each to {peer} and {metrics}, a slow-loris on each");

    // While the flood lasts: the control socket answers, the backends stay active and no
    // health check fails, also not for a cause on this node.
    let flood_started = Instant::now();
    let mut rounds = 0;
    while flood_started.elapsed() < Duration::from_secs(4) || rounds < 5 {
        let st = status(&lab, "during the flood");
        assert_eq!(states(&st), ["active", "active"], "a backend left the ring during the flood");
        assert!(!firing(&st, "SluiceHealthChecksCannotRun"), "health checks could not run during the flood: {}", st["alerts_firing"]);
        for l in st["listeners"].as_array().expect("listeners") {
            assert!(l["open"].as_u64() <= l["max_connections"].as_u64(), "a listener serves more than its maximum: {l}");
        }
        rounds += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    // A change goes through and is journaled.
    let (code, _, err) = ctl_within(&lab, &["backend", "set-limit", "web", "10.70.0.11", "150"], ANSWER).expect("`sluice backend set-limit` did not answer during the flood");
    assert_eq!(code, 0, "set-limit during the flood: {err}");
    wait_for("the change in the journal", || std::fs::read_to_string(lab.journal()).is_ok_and(|j| j.contains("max_conns 100 -> 150")));

    // The daemon closes every flood connection by itself: those over the limit at once, those
    // it took (and the trickles) at the header timeout.
    wait_closed(&lab, "peer", &peer_flood);
    wait_closed(&lab, "metrics", &metrics_flood);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lorises.iter().all(std::thread::JoinHandle::is_finished) {
        assert!(Instant::now() < deadline, "a slow-loris connection was still open after 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for l in lorises {
        assert!(l.join().expect("slow-loris thread"), "the daemon did not close a slow-loris connection");
    }
    drop((peer_flood, metrics_flood));
    wait_for("the listeners to hold no connection", || {
        status(&lab, "after the flood")["listeners"].as_array().expect("listeners").iter().filter(|l| l["name"] != "control").all(|l| l["open"] == 0)
    });
    let st = status(&lab, "after the flood");
    assert_eq!(states(&st), ["active", "active"]);
    assert_eq!(st["open_files"]["limit"], NOFILE, "the daemon's open-file limit as it reports it: {}", st["open_files"]);

    // The flood is counted, per listener, in /metrics and in status.
    let mut m = String::new();
    wait_for("a scrape", || {
        m = scrape(&lab);
        !m.is_empty()
    });
    promtool_check(&m);
    for (listener, max) in [("peer", PEER_MAX), ("metrics", METRICS_MAX)] {
        let get = |name: &str| sample(&m, &format!("{name}{{listener=\"{listener}\"}}")).unwrap_or_else(|| panic!("no {name} for {listener}:\n{m}")) as u64;
        let (refused, timed_out, accepted) =
            (get("sluice_listener_connections_refused_total"), get("sluice_listener_connections_timed_out_total"), get("sluice_listener_connections_accepted_total"));
        println!("{listener}: {accepted} served, {refused} refused over the limit of {max}, {timed_out} closed at the header timeout");
        assert_eq!(get("sluice_listener_max_connections"), max, "{listener}'s limit");
        // Each flood connection and the slow-loris was either refused at once or served and
        // closed at the header timeout; the slots were all taken, so at least `max` of them.
        assert!(accepted + refused > FLOOD as u64, "{listener}: {accepted} + {refused} connections counted of {FLOOD} + the slow-loris");
        assert!(refused + timed_out > FLOOD as u64, "{listener}: {refused} refused + {timed_out} timed out, want {FLOOD} + the slow-loris");
        assert!(timed_out >= max && refused >= FLOOD as u64 / 2, "{listener}: {refused} refused, {timed_out} timed out");
        let l =
            st["listeners"].as_array().and_then(|ls| ls.iter().find(|l| l["name"] == listener)).unwrap_or_else(|| panic!("no listener {listener} in status: {}", st["listeners"]));
        assert_eq!(l["max_connections"], max);
        assert!(l["refused"].as_u64().expect("refused") >= FLOOD as u64 / 2, "{l}");
    }
    let (_, text, _) = ctl_within(&lab, &["status"], ANSWER).expect("`sluice status` answers");
    let line = text.lines().find(|l| l.starts_with("listeners:")).unwrap_or_else(|| panic!("no listeners line:\n{text}"));
    assert!(line.contains("peer 0/64 (") && line.contains("refused at the limit") && line.contains("timed out") && line.contains("of 1024"), "{line}");
    for name in ["process_open_fds", "process_max_fds"] {
        assert!(sample(&m, name).is_some(), "no {name}:\n{m}");
    }

    let out = daemon.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the daemon's exit on SIGTERM: {}\n{log}", out.status);
    for bad in ["Too many open files", "health checks cannot run", "out of the ring", "cannot write the journal"] {
        assert!(!log.contains(bad), "the daemon's log says {bad:?}:\n{log}");
    }
    lab.detach();
}

/// A daemon raises its soft open-file limit to the hard one, and warns (log and journal) when
/// even that is below what its config needs.
#[test]
fn a_low_open_file_limit_is_raised_and_warned() {
    let lab = Lab::new(2);
    write_config(&lab);
    // Soft 128 under a hard 200: the daemon raises it to 200, still below what the listeners'
    // limits and the rest need.
    let mut cmd = lab.lb.command(sluice_bin());
    cmd.arg("run").arg("--config").arg(&lab.config);
    // SAFETY: as in start_daemon_limited.
    unsafe {
        cmd.pre_exec(|| {
            let r = libc::rlimit { rlim_cur: 128, rlim_max: 200 };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut daemon = lab.lb.spawn(&mut cmd);
    wait_for("the daemon to serve", || {
        if let Some(out) = daemon.exited() {
            panic!("sluice run exited: {}", String::from_utf8_lossy(&out.stderr));
        }
        lab.socket().exists()
    });
    let st = status(&lab, "at start");
    assert_eq!(st["open_files"]["limit"], 200, "the soft limit raised to the hard one: {}", st["open_files"]);
    assert!(st["open_files"]["needed"].as_u64().expect("needed") > 200, "{}", st["open_files"]);
    wait_for("the warning in the journal", || std::fs::read_to_string(lab.journal()).is_ok_and(|j| j.contains("open-file limit")));
    let journal = std::fs::read_to_string(lab.journal()).expect("journal");
    let line = journal.lines().find(|l| l.contains("open-file limit")).expect("warning");
    assert!(line.contains("200 (raised from 128 to the hard limit)") && line.contains("LimitNOFILE") && line.contains("metrics_max_connections"), "{line}");
    let out = daemon.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("open-file limit") && log.contains("raised the open-file limit from 128 to 200"), "{log}");
    lab.detach();
}
