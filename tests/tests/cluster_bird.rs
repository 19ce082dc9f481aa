//! A cluster of two Sluice nodes behind a router, with real BIRD on all three: the router runs
//! BIRD with kernel ECMP (`merge paths on`, L4 hash policy), each node runs BIRD and the daemon,
//! which announces the VIP through its BIRD's control socket. Checked: a daemon started before
//! its BIRD says so, alerts (`SluiceNotAnnouncing`) and catches up; both nodes announce (two
//! next hops on the router); a node whose only active backend fails withdraws and announces
//! again when it recovers; `sluice node drain`, while a client behind the router opens new
//! flows, withdraws, measures that no new flows arrive (both nodes took the client's flows
//! before; after it, n2 takes them all), and survives a daemon restart until `undrain` (the
//! router hears nothing from the node in between); a daemon restart withdraws nothing (the
//! router keeps the node's next hop throughout and its BIRD receives no update or withdrawal
//! from the node); the peer channel refuses a forged, a stale and a replayed message and takes
//! a signed one; and both nodes, configured with the backends in different orders, admit every
//! one of a thousand random flows to the same backend (`explain`).

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use rand::{rngs::StdRng, Rng as _, SeedableRng as _};
use serde_json::Value;
use sluice_tests::{
    l2lab::wait_for,
    netns::{veth, ChildGuard, Netns},
    sluice_bin, PinDir,
};

const VIP: &str = "10.81.0.100";
/// Flows compared between the nodes (10,000 passed once by hand; each costs ~11 ms on a debug
/// daemon, so the suite checks fewer).
const FLOWS: u32 = 1_000;
const PEER_KEY: &str = "sixteen-or-more-bytes-of-key";
const BACKENDS: [&str; 4] = ["10.81.9.1", "10.81.9.2", "10.81.9.3", "10.81.9.4"];

struct Node {
    name: String,
    ns: Netns,
    dir: PathBuf,
    pins: PinDir,
    /// The health-checked backend's stand-in: a listener inside the node's namespace.
    server: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
    /// Connections it accepted: the daemon's health checks, as the backend sees them.
    checks: Arc<AtomicU64>,
}

impl Node {
    fn socket(&self) -> PathBuf {
        self.dir.join("sluice.sock")
    }
    fn bird_ctl(&self) -> PathBuf {
        self.dir.join("bird.ctl")
    }
    fn config(&self) -> PathBuf {
        self.dir.join("sluice.toml")
    }

    /// Backend 10.81.9.1 (on the node's loopback) answers TCP health checks while this runs.
    fn start_server(&mut self) {
        let listener = self.ns.run(|| TcpListener::bind("10.81.9.1:80").expect("bind"));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let (s, checks) = (stop.clone(), self.checks.clone());
        let t = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if listener.accept().is_ok() {
                    checks.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        self.server = Some((stop, t));
    }

    fn stop_server(&mut self) {
        if let Some((stop, t)) = self.server.take() {
            stop.store(true, Ordering::Relaxed);
            t.join().expect("server");
        }
    }

    fn start_daemon(&self) -> ChildGuard {
        let mut d = self.ns.spawn(self.ns.command(sluice_bin()).arg("run").arg("--config").arg(self.config()));
        wait_for("the daemon to serve", || {
            if let Some(out) = d.exited() {
                panic!("sluice run on {} exited: {}", self.name, String::from_utf8_lossy(&out.stderr));
            }
            self.socket().exists()
        });
        d
    }

    fn start_bird(&self) -> ChildGuard {
        let b = self.ns.spawn(
            Command::new("nsenter")
                .arg(format!("--net={}", self.ns.path().display()))
                .arg("--")
                .args(["bird", "-f", "-c"])
                .arg(self.dir.join("bird.conf"))
                .arg("-s")
                .arg(self.bird_ctl()),
        );
        wait_for("BIRD's control socket", || self.bird_ctl().exists());
        b
    }

    fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(sluice_bin()).arg("--socket").arg(self.socket()).args(args).output().expect("sluice");
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    fn cluster_status(&self) -> Value {
        let (code, out, err) = self.ctl(&["status", "--json"]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<Value>(&out).expect("json")["cluster"].clone()
    }

    /// New flows its datapath admitted, over the service's backends.
    fn new_flows(&self) -> u64 {
        let (code, out, err) = self.ctl(&["service", "list", "--json"]);
        assert_eq!(code, 0, "{err}");
        let v: Value = serde_json::from_str(&out).expect("json");
        v[0]["backends"].as_array().expect("backends").iter().map(|b| b["new_flows"].as_u64().expect("new_flows")).sum()
    }

    /// Its daemon, started after the backend had seen `checks_before` health checks, is past
    /// its first decisions: two health checks done, and BIRD has the VIP it wants.
    fn settled(&self, checks_before: u64) -> bool {
        if self.checks.load(Ordering::Relaxed) < checks_before + 2 {
            return false;
        }
        let c = self.cluster_status();
        c["error"].is_null() && c["wanted"] == c["announced"] && c["announced"].as_array().is_some_and(|a| a.len() == 1)
    }

    /// `GET /v1/explain` over the control socket (a process per flow would take minutes).
    fn explain(&self, src: &str) -> Value {
        let mut s = UnixStream::connect(self.socket()).expect("control socket");
        write!(s, "GET /v1/explain?src={src}&dst={VIP}:80&proto=tcp HTTP/1.1\r\nHost: sluice\r\nConnection: close\r\n\r\n").expect("request");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("response");
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
        // Chunked or not: the JSON object is what lies between the first '{' and the last '}'.
        let json = &body[body.find('{').unwrap_or(0)..=body.rfind('}').unwrap_or(0)];
        serde_json::from_str(json).unwrap_or_else(|e| panic!("explain {src}: {e}: {out}"))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop_server();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the router's BIRD received from node `node`'s session: (updates, withdrawals), from
/// `show protocols all`.
fn received_from(rctl: &Path, node: &str) -> (u64, u64) {
    let out = Command::new("birdc").arg("-s").arg(rctl).args(["show", "protocols", "all", node]).output().expect("birdc");
    let text = String::from_utf8_lossy(&out.stdout);
    let received = |label: &str| -> u64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {label:?} in:\n{text}"))
    };
    (received("Import updates:"), received("Import withdraws:"))
}

/// Sets the flag when dropped, a panic's unwinding included (a scope waits for its threads).
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The router's next hops for the VIP.
fn next_hops(router: &Netns) -> Vec<String> {
    let out = Command::new("ip").args(["-n", router.name(), "route", "show", VIP]).output().expect("ip");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut hops: Vec<String> = text.split_whitespace().collect::<Vec<_>>().windows(2).filter(|w| w[0] == "via").map(|w| w[1].to_owned()).collect();
    hops.sort();
    hops
}

fn wait_hops(router: &Netns, want: &[&str], what: &str) -> Duration {
    let t0 = Instant::now();
    while next_hops(router) != want {
        if t0.elapsed() > Duration::from_secs(20) {
            let routes = Command::new("ip").args(["-n", router.name(), "route"]).output().expect("ip");
            let ctls: Vec<PathBuf> = std::fs::read_dir(std::env::temp_dir())
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("sluice-cluster-{}-", std::process::id())))
                .flat_map(|e| [e.path().join("bird.ctl"), e.path().join("router/bird.ctl")])
                .filter(|p| p.exists())
                .collect();
            let birds: Vec<String> = ctls
                .iter()
                .map(|c| {
                    let o = Command::new("birdc").arg("-s").arg(c).args(["show", "route", "all"]).output().expect("birdc");
                    let p = Command::new("birdc").arg("-s").arg(c).args(["show", "protocols"]).output().expect("birdc");
                    format!("{}:\n{}{}", c.display(), String::from_utf8_lossy(&p.stdout), String::from_utf8_lossy(&o.stdout))
                })
                .collect();
            panic!("timed out waiting for {what}: hops {:?}\nrouter routes:\n{}\n{}", next_hops(router), String::from_utf8_lossy(&routes.stdout), birds.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

fn node(router: &Netns, n: u8, backend_order: &[&str]) -> Node {
    let name = format!("n{n}");
    let ns = Netns::new(&name);
    veth(router, &format!("rt-{name}"), &ns, "eth0");
    router.addr_add(&format!("rt-{name}"), &format!("10.81.{n}.1/24"));
    ns.addr_add("eth0", &format!("10.81.{n}.2/24"));
    ns.addr_add("lo", "10.81.9.1/32");
    let dir = std::env::temp_dir().join(format!("sluice-cluster-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let pins = PinDir::new();
    std::fs::write(
        dir.join("bird.conf"),
        format!(
            "router id 10.81.{n}.2;\nprotocol device {{}}\n\
             protocol static sluice_vips4 {{\n  ipv4;\n  include \"{d}/vips4.conf\";\n}}\n\
             protocol static sluice_vips6 {{\n  ipv6;\n  include \"{d}/vips6.conf\";\n}}\n\
             protocol bgp uplink {{ local as 65001; neighbor 10.81.{n}.1 as 65000; hold time 3; connect retry time 1;\n\
               ipv4 {{ import none; export where proto = \"sluice_vips4\"; next hop self; }}; }}\n",
            d = dir.display()
        ),
    )
    .expect("bird.conf");
    let mut cfg = format!(
        "[daemon]\ninterface = \"eth0\"\npin_dir = \"{}\"\ncontrol_socket = \"{}\"\njournal = \"{}\"\n\
         [cluster]\nnode = \"{name}\"\nbird_socket = \"{}\"\nannounce_dir = \"{}\"\npeer_listen = \"10.81.{n}.2:9478\"\npeer_key_file = \"{}/peer.key\"\n\
         [[service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = 80\nproto = \"tcp\"\nmode = \"ipip\"\nring_size = 1009\n",
        pins.0.display(),
        dir.join("sluice.sock").display(),
        dir.join("journal.jsonl").display(),
        dir.join("bird.ctl").display(),
        dir.display(),
        dir.display()
    );
    std::fs::write(dir.join("peer.key"), PEER_KEY).expect("peer.key");
    std::fs::set_permissions(dir.join("peer.key"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod 600");
    for b in backend_order {
        cfg.push_str(&format!("[[service.backend]]\naddress = \"{b}\"\nmax_conns = 100\n"));
        if *b == "10.81.9.1" {
            cfg.push_str("health = { kind = \"tcp\", interval = \"100ms\", timeout = \"80ms\", rise = 1, fall = 1 }\n");
        }
    }
    std::fs::write(dir.join("sluice.toml"), cfg).expect("config");
    let mut node = Node { name, ns, dir, pins, server: None, checks: Arc::default() };
    node.start_server();
    node
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, step after step")]
fn two_nodes_announce_withdraw_drain_and_choose_alike() {
    let router = Netns::new("rt");
    assert!(router.output("sysctl", &["-qw", "net.ipv4.fib_multipath_hash_policy=1", "net.ipv4.conf.all.forwarding=1"]).status.success());
    let mut forward: Vec<&str> = BACKENDS.to_vec();
    let mut n1 = node(&router, 1, &forward);
    forward.reverse();
    let n2 = node(&router, 2, &forward);
    let rdir = n1.dir.join("router");
    std::fs::create_dir_all(&rdir).expect("dir");
    std::fs::write(
        rdir.join("bird.conf"),
        "router id 10.81.0.1;\nprotocol device {}\nprotocol kernel { ipv4 { export all; }; merge paths on; }\n\
         template bgp node { local as 65000; hold time 3; connect retry time 1; ipv4 { import all; export none; }; }\n\
         protocol bgp n1 from node { neighbor 10.81.1.2 as 65001; }\nprotocol bgp n2 from node { neighbor 10.81.2.2 as 65001; }\n",
    )
    .expect("router bird.conf");
    let rctl = rdir.join("bird.ctl");
    let _router_bird = router
        .spawn(Command::new("nsenter").arg(format!("--net={}", router.path().display())).arg("--").args(["bird", "-f", "-c"]).arg(rdir.join("bird.conf")).arg("-s").arg(&rctl));
    wait_for("the router's BIRD", || rctl.exists());

    // n1's daemon starts before its BIRD: it says so, and the datapath runs regardless.
    let mut d1 = n1.start_daemon();
    wait_for("n1 to report BIRD missing", || n1.cluster_status()["error"].as_str().is_some_and(|e| e.contains("bird.ctl") && e.contains("configure")));
    wait_for("SluiceNotAnnouncing to fire", || {
        let (_, out, _) = n1.ctl(&["status", "--json"]);
        serde_json::from_str::<Value>(&out).is_ok_and(|v| {
            v["alerts_firing"].as_array().is_some_and(|a| a.iter().any(|n| n["alertname"] == "SluiceNotAnnouncing" && n["summary"].as_str().is_some_and(|s| s.contains(VIP))))
        })
    });
    let mut b1 = n1.start_bird();
    let d2 = n2.start_daemon();
    let _b2 = n2.start_bird();
    let both = wait_hops(&router, &["10.81.1.2", "10.81.2.2"], "both nodes' next hops on the router");
    println!("both nodes announced; the router has two next hops after {both:?}");
    assert!(n1.cluster_status()["error"].is_null(), "n1 caught up with BIRD: {}", n1.cluster_status());

    // Health: n1's only health-checked backend fails. Its other backends are still active, so
    // the VIP stays; take them out with drains, then the failure withdraws the VIP.
    for b in &BACKENDS[1..] {
        let (code, _, err) = n1.ctl(&["backend", "drain", "web", b]);
        assert_eq!(code, 0, "{err}");
    }
    n1.stop_server();
    let t = wait_hops(&router, &["10.81.2.2"], "n1 withdrawn after its last active backend failed");
    println!("n1 withdrawn {t:?} after its last backend failed");
    n1.start_server();
    wait_hops(&router, &["10.81.1.2", "10.81.2.2"], "n1 announced again once healthy");
    for b in &BACKENDS[1..] {
        assert_eq!(n1.ctl(&["backend", "undrain", "web", b]).0, 0);
    }
    let journal = std::fs::read_to_string(n1.dir.join("journal.jsonl")).expect("journal");
    assert!(journal.contains(&format!("node \\\"n1\\\" withdrew VIP {VIP}")) && journal.contains(&format!("node \\\"n1\\\" announced VIP {VIP}")), "{journal}");

    // Drain, while a client behind the router opens new flows to the VIP (a SYN from a new port
    // every few tens of ms; the router's ECMP spreads them over the nodes by their ports): both
    // nodes take them before, the drain withdraws and measures quiet, then n2 takes them all.
    let client = Netns::new("cl");
    veth(&router, "rt-cl", &client, "eth0");
    router.addr_add("rt-cl", "10.81.100.1/24");
    client.addr_add("eth0", "10.81.100.2/24");
    client.ip(&["route", "add", "default", "via", "10.81.100.1"]);
    let stop_client = AtomicBool::new(false);
    std::thread::scope(|s| {
        let _stop = SetOnDrop(&stop_client);
        let (client, stop_client) = (&client, &stop_client);
        let vip: SocketAddr = format!("{VIP}:80").parse().expect("addr");
        s.spawn(move || {
            client.run(|| {
                while !stop_client.load(Ordering::Relaxed) {
                    // Nothing answers (the backends are stand-ins): the SYN is the flow.
                    drop(TcpStream::connect_timeout(&vip, Duration::from_millis(20)));
                    std::thread::sleep(Duration::from_millis(30));
                }
            });
        });
        let (f1, f2) = (n1.new_flows(), n2.new_flows());
        wait_for("both nodes to take the client's new flows", || n1.new_flows() >= f1 + 5 && n2.new_flows() >= f2 + 5);
        let (code, out, err) = n1.ctl(&["node", "drain", "--timeout", "20s"]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains(&format!("withdrew {VIP} from BIRD")) && out.contains("no new flows"), "{out}");
        assert_eq!(next_hops(&router), ["10.81.2.2"], "the router forgot n1 once BIRD withdrew");
        // Were n1 still a next hop, about half of the next 60 flows would reach it.
        let (f1, f2) = (n1.new_flows(), n2.new_flows());
        wait_for("n2 to take 60 more of the client's new flows", || n2.new_flows() >= f2 + 60);
        assert_eq!(n1.new_flows(), f1, "a new flow reached the drained node");
    });
    drop(client);
    // Kept across a restart: the router hears nothing from n1 until `undrain` announces it.
    let heard = received_from(&rctl, "n1");
    let out = d1.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut d1 = n1.start_daemon();
    assert_eq!(n1.cluster_status()["drained"], true, "a restart keeps the drain");
    let (code, out, err) = n1.ctl(&["node", "undrain"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("announcing"), "{out}");
    wait_hops(&router, &["10.81.1.2", "10.81.2.2"], "n1 back after undrain");
    assert_eq!(received_from(&rctl, "n1"), (heard.0 + 1, heard.1), "(updates, withdrawals) from n1: only undrain's announcement since the drain");
    let metrics = n1.ns.run(|| {
        let mut s = TcpStream::connect("127.0.0.1:9477").expect("metrics");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("request");
        let mut m = String::new();
        s.read_to_string(&mut m).expect("response");
        m
    });
    assert!(metrics.contains(&format!("sluice_vip_announced{{node=\"n1\",vip=\"{VIP}\"}} 1")) && metrics.contains("sluice_node_drained{node=\"n1\"} 0"), "{metrics}");

    // BIRD dies; while it is down the node's VIP is withdrawn and wanted again (its backends
    // fail and recover). The BIRD that starts then must get the VIP: the daemon wrote the
    // files during its failed attempts, so it cannot trust what BIRD last took.
    drop(b1.signal_and_wait(Signal::SIGKILL, Duration::from_secs(5)));
    wait_hops(&router, &["10.81.2.2"], "n1 withdrawn when its BIRD died");
    for b in &BACKENDS[1..] {
        assert_eq!(n1.ctl(&["backend", "drain", "web", b]).0, 0);
    }
    n1.stop_server();
    wait_for("n1 to want nothing announced", || n1.cluster_status()["wanted"].as_array().is_some_and(Vec::is_empty));
    n1.start_server();
    for b in &BACKENDS[1..] {
        assert_eq!(n1.ctl(&["backend", "undrain", "web", b]).0, 0);
    }
    wait_for("n1 to want the VIP again", || n1.cluster_status()["wanted"].as_array().is_some_and(|w| !w.is_empty()));
    b1 = n1.start_bird();
    wait_hops(&router, &["10.81.1.2", "10.81.2.2"], "n1 announced by the BIRD started after the flaps");

    // A daemon restart withdraws nothing: n1 stays a next hop throughout, watched until the new
    // daemon is past its first decisions (two health checks, BIRD in step); the router's BIRD
    // hears no update or withdrawal from n1 (checked again at the end, for one still in flight).
    let heard = received_from(&rctl, "n1");
    let stop_watching = AtomicBool::new(false);
    let lost = std::thread::scope(|s| {
        let w = &stop_watching;
        let router = &router;
        let watcher = s.spawn(move || {
            let mut lost = 0u32;
            while !w.load(Ordering::Relaxed) {
                if !next_hops(router).contains(&"10.81.1.2".to_owned()) {
                    lost += 1;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            lost
        });
        let _stop = SetOnDrop(&stop_watching);
        let out = d1.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let checks = n1.checks.load(Ordering::Relaxed);
        d1 = n1.start_daemon();
        wait_for("n1's new daemon to settle", || n1.settled(checks));
        stop_watching.store(true, Ordering::Relaxed);
        watcher.join().expect("watcher")
    });
    assert_eq!(lost, 0, "the router lost n1's next hop during a daemon restart");
    assert_eq!(received_from(&rctl, "n1"), heard, "(updates, withdrawals) from n1 across its daemon's restart");

    // The peer channel answers only what is signed with the shared key, and fresh.
    let post = |body: &str, mac: &str| -> (u16, String) {
        router.run(|| {
            let mut s = TcpStream::connect("10.81.1.2:9478").expect("peer channel");
            write!(
                s,
                "POST /v1/peer/moved HTTP/1.1\r\nHost: n1\r\nContent-Type: application/json\r\n{}: {mac}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                lb_userspace::peers::HEADER,
                body.len()
            )
            .expect("send");
            let mut out = String::new();
            s.read_to_string(&mut out).expect("answer");
            (out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0), out)
        })
    };
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis();
    let flow = r#"{"src":[0,0,0,0,0,0,0,0,0,0,255,255,203,0,113,9],"dst":[0,0,0,0,0,0,0,0,0,0,255,255,10,81,0,100],"sport":40000,"dport":80,"proto":6,"ago_ms":5}"#;
    let fresh = format!(r#"{{"node":"n9","sent_ms":{now_ms},"flows":[{flow}]}}"#);
    let stale = format!(r#"{{"node":"n9","sent_ms":{},"flows":[{flow}]}}"#, now_ms - 600_000);
    let (code, out) = post(&fresh, &lb_userspace::peers::sign(b"another key, not the cluster's", fresh.as_bytes()));
    assert_eq!(code, 401, "a forged message: {out}");
    let (code, out) = post(&stale, &lb_userspace::peers::sign(PEER_KEY.as_bytes(), stale.as_bytes()));
    assert_eq!(code, 400, "a replayed (10 minutes old) message: {out}");
    let (code, out) = post(&fresh, &lb_userspace::peers::sign(PEER_KEY.as_bytes(), fresh.as_bytes()));
    assert!(code == 200 && out.contains("\"ignored\":1"), "a signed message about a flow n1 does not hold: {out}");
    let (code, out) = post(&fresh, &lb_userspace::peers::sign(PEER_KEY.as_bytes(), fresh.as_bytes()));
    assert_eq!(code, 409, "the same signed message again (a replay within the minute): {out}");
    let (_, st, _) = n1.ctl(&["status", "--json"]);
    let st: Value = serde_json::from_str(&st).expect("json");
    assert_eq!((st["peers"]["refused"].as_u64(), st["peers"]["ignored"].as_u64()), (Some(3), Some(1)), "{}", st["peers"]);

    // Identical choice: same config, backends listed in another order, same backend per flow.
    // Each node admits each flow to a backend of the service (an error or a refusal on both
    // would be equal too), and over the flows every backend is picked.
    let mut rng = StdRng::seed_from_u64(17);
    let mut picked = BTreeSet::new();
    for i in 0..FLOWS {
        let src = format!("{}.{}.{}.{}:{}", rng.random_range(1..=223u8), rng.random::<u8>(), rng.random::<u8>(), rng.random_range(1..=254u8), rng.random_range(1024..=65535u16));
        let (a, b) = (n1.explain(&src), n2.explain(&src));
        let pick = |v: &Value| (v["ring_slot"].clone(), v["candidates"].as_array().map(|c| c.iter().map(|x| x["backend"].clone()).collect::<Vec<_>>()), v["backend"].clone());
        for (node, v) in [("n1", &a), ("n2", &b)] {
            let backend = v["backend"].as_str().unwrap_or_default();
            assert!(
                v["verdict"] == "admitted" && v["ring_slot"].is_u64() && BACKENDS.contains(&backend) && v["candidates"][0]["backend"] == backend,
                "flow {i} from {src}: {node} did not admit it to a backend of the service: {v}"
            );
        }
        assert_eq!(pick(&a), pick(&b), "flow {i} from {src}: n1 {a} vs n2 {b}");
        picked.insert(a["backend"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(picked.len(), BACKENDS.len(), "backends picked over {FLOWS} flows: {picked:?}");
    assert_eq!(received_from(&rctl, "n1"), heard, "(updates, withdrawals) from n1 since before its daemon's restart");
    drop(d2);
    drop(d1);
    drop(b1);
    for n in [&n1, &n2] {
        let out = Command::new(sluice_bin()).arg("detach").arg("--pin-dir").arg(&n.pins.0).output().expect("sluice detach");
        assert!(out.status.success(), "detach: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// The BIRD configs in deploy/bird parse (`bird -p`), the node's with its included files.
#[test]
fn deploy_bird_configs_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/bird");
    let out = Command::new("bird").arg("-p").arg("-c").arg(root.join("router.conf")).output().expect("bird (install bird2: cargo xtask setup)");
    assert!(out.status.success(), "router.conf: {}", String::from_utf8_lossy(&out.stderr));
    let dir = std::env::temp_dir().join(format!("sluice-bird-parse-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    for f in ["vips4.conf", "vips6.conf"] {
        std::fs::write(dir.join(f), "route 192.0.2.100/32 blackhole;\n".repeat(usize::from(f == "vips4.conf"))).expect("write");
    }
    let node = std::fs::read_to_string(root.join("node.conf")).expect("node.conf").replace("/var/lib/sluice/bird", &dir.display().to_string());
    std::fs::write(dir.join("node.conf"), node).expect("write");
    let out = Command::new("bird").arg("-p").arg("-c").arg(dir.join("node.conf")).output().expect("bird");
    std::fs::remove_dir_all(&dir).expect("cleanup");
    assert!(out.status.success(), "node.conf: {}", String::from_utf8_lossy(&out.stderr));
}
