//! The real daemon (`sluice run --config`) in network namespaces with real TCP: a client, the
//! load balancer and three backends on one bridge (l2dsr: the VIP on the backends' loopback,
//! replies go straight back to the client). Connections are balanced, a backend's
//! `max_conns` is enforced with an immediate RST, and a SIGHUP reload that removes a backend
//! drains it: its open connection keeps working, new ones go elsewhere.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use sluice_tests::{
    netns::{veth, ChildGuard, Netns},
    sluice_bin, PinDir,
};

const VIP: &str = "10.70.0.100";

struct Backend {
    ns: Netns,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A backend namespace on the bridge with the VIP on loopback and a server that answers each
/// connection with its name, then keeps it open until the client closes.
fn backend(switch: &Netns, n: u8) -> Backend {
    let ns = Netns::new(&format!("be{n}"));
    veth(&ns, "eth0", switch, &format!("sw-be{n}"));
    switch.ip(&["link", "set", &format!("sw-be{n}"), "master", "br0"]);
    ns.addr_add("eth0", &format!("10.70.0.{}/24", 10 + n));
    ns.addr_add("lo", &format!("{VIP}/32"));
    // Do not answer ARP for the VIP (it is the load balancer's on the wire).
    let out = ns.output("sysctl", &["-qw", "net.ipv4.conf.all.arp_ignore=1", "net.ipv4.conf.all.arp_announce=2"]);
    assert!(out.status.success());
    let stop = Arc::new(AtomicBool::new(false));
    let name = format!("backend-{n}");
    let listener = ns.run(|| TcpListener::bind("0.0.0.0:80").expect("bind :80"));
    listener.set_nonblocking(true).expect("nonblocking");
    let s = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut held = Vec::new();
        while !s.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut c, _)) => {
                    let _ = c.write_all(name.as_bytes());
                    held.push(c);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    Backend { ns, stop, thread: Some(thread) }
}

fn socket() -> String {
    format!("/run/sluice-test-{}.sock", std::process::id())
}

/// `sluice --socket S args…` → (exit code, stdout, stderr).
fn ctl(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(sluice_bin()).arg("--socket").arg(socket()).args(args).output().expect("sluice");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn config(path: &std::path::Path, pins: &std::path::Path, backends: &[(u8, u32)]) {
    let mut t = format!(
        "[daemon]\ninterface = \"lb0\"\npin_dir = \"{}\"\ncontrol_socket = \"{}\"\n\
         [[service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = 80\nproto = \"tcp\"\nring_size = 1009\n",
        pins.display(),
        socket()
    );
    for (n, max) in backends {
        t.push_str(&format!("[[service.backend]]\naddress = \"10.70.0.{}\"\nmax_conns = {max}\n", 10 + n));
    }
    std::fs::write(path, t).expect("write config");
}

/// Connects to the VIP and returns the backend's name, keeping the connection.
fn connect(client: &Netns) -> Result<(String, TcpStream), std::io::Error> {
    client.run(|| {
        let mut s = TcpStream::connect_timeout(&SocketAddr::new(VIP.parse().expect("vip"), 80), Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut buf = [0u8; 32];
        let n = s.read(&mut buf)?;
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), s))
    })
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn daemon_balances_limits_and_drains_on_reload() {
    let switch = Netns::new("sw");
    switch.bridge("br0");
    let lb = Netns::new("lb");
    let client = Netns::new("cl");
    veth(&lb, "lb0", &switch, "sw-lb");
    veth(&client, "cl0", &switch, "sw-cl");
    for p in ["sw-lb", "sw-cl"] {
        switch.ip(&["link", "set", p, "master", "br0"]);
    }
    // A frame sent with XDP_TX into a veth is delivered only if the peer runs an XDP program
    // (on this kernel, enabling GRO on the peer is not enough): give the switch port one
    // that passes everything (Sluice's decapsulator passes non-encapsulated frames untouched).
    let decap_pins = PinDir::new();
    let _decap = switch.spawn(switch.command(sluice_bin()).args(["decap", "--iface", "sw-lb", "--pin-dir"]).arg(&decap_pins.0));
    wait_for("the switch port's XDP program", || switch.link_show("sw-lb").contains("xdp"));
    lb.addr_add("lb0", "10.70.0.1/24");
    client.addr_add("cl0", "10.70.0.2/24");
    client.route_add(&format!("{VIP}/32"), "10.70.0.1");
    // The client's kernel would leave TCP checksums to an offload the XDP path never does.
    assert!(client.output("ethtool", &["-K", "cl0", "tx", "off"]).status.success());
    let backends: Vec<Backend> = (1..=3).map(|n| backend(&switch, n)).collect();

    let pins = PinDir::new();
    let dir = std::env::temp_dir().join(format!("sluice-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cfg = dir.join("sluice.toml");
    config(&cfg, &pins.0, &[(1, 100), (2, 100), (3, 2)]);
    let mut daemon: ChildGuard = lb.spawn(lb.command(sluice_bin()).arg("run").arg("--config").arg(&cfg));
    wait_for("the daemon to attach", || {
        if let Some(out) = daemon.exited() {
            panic!("sluice run exited: {}", String::from_utf8_lossy(&out.stderr));
        }
        lb.link_show("lb0").contains("xdp") && pins.0.join("SERVICES").exists()
    });

    // Balanced: 60 connections reach all three backends.
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..60 {
        let (name, s) = connect(&client).expect("connect");
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
        match connect(&client) {
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

    // The control API (root only) shows backend-3 at its limit and explains the refusal.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(socket()).expect("control socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket is root-only");
    let (code, out, err) = ctl(&["service", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let be3 = v[0]["backends"].as_array().expect("backends").iter().find(|b| b["address"] == "10.70.0.13").expect("backend-3").clone();
    assert_eq!((be3["open"].as_u64(), be3["max_conns"].as_u64()), (Some(2), Some(2)), "{be3}");
    let refused_port = (40000..41000)
        .find(|p| {
            let (_, out, _) = ctl(&["explain", &format!("10.70.0.2:{p}"), &format!("{VIP}:80"), "--json"]);
            out.contains("\"reason\": \"backend_limit\"")
        })
        .expect("some flow aims at the full backend-3");
    let (_, out, _) = ctl(&["explain", &format!("10.70.0.2:{refused_port}"), &format!("{VIP}:80")]);
    assert!(out.contains("REFUSED") && out.contains("max_conns = 2"), "{out}");
    // Raise the limit through the API: that same flow is admitted now.
    let (code, out, err) = ctl(&["backend", "set-limit", "web", "10.70.0.13", "3"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("max_conns 2 -> 3"), "{out}");
    let (_, out, _) = ctl(&["explain", &format!("10.70.0.2:{refused_port}"), &format!("{VIP}:80"), "--json"]);
    assert!(out.contains("\"verdict\": \"admitted\""), "{out}");
    // A request that fails changes nothing.
    let (code, _, err) = ctl(&["backend", "set-limit", "web", "10.70.0.13", "0"]);
    assert_ne!(code, 0);
    assert!(err.contains("max_conns") && err.contains("nothing changed"), "{err}");
    let (_, out, _) = ctl(&["config", "apply", "--dry-run", cfg.to_str().expect("utf-8")]);
    assert!(out.contains("would apply: service \"web\" backend 10.70.0.13: max_conns 3 -> 2"), "the file still says 2: {out}");

    // Reload without backend-1: it drains. An open connection to it still works.
    let mut on1 = loop {
        // Flows that hash to the full backend-3 are refused meanwhile.
        if let Ok((name, s)) = connect(&client) {
            if name == "backend-1" {
                break s;
            }
        }
    };
    config(&cfg, &pins.0, &[(2, 100), (3, 2)]);
    let pid = nix::unistd::Pid::from_raw(daemon.id() as i32);
    nix::sys::signal::kill(pid, Signal::SIGHUP).expect("SIGHUP");
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..30 {
        match connect(&client) {
            Ok((name, s)) => {
                assert_ne!(name, "backend-1", "a new connection reached the drained backend");
                drop(s);
            }
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}"),
        }
    }
    on1.write_all(b"still there?").expect("the drained backend's connection still carries data");
    drop(held3);

    let out = daemon.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!std::path::Path::new(&socket()).exists(), "control socket removed on exit");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("drain and remove backend 10.70.0.11"), "{log}");
    assert!(!lb.link_show("lb0").contains("xdp"));
    drop(backends);
    let _ = std::fs::remove_dir_all(&dir);
}
