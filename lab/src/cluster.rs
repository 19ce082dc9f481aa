//! `sluice lab cluster`: several Sluice nodes behind a router's ECMP, under continuous load.
//!
//! ```text
//!   client 1..C ──┐                         ┌─ node 1..N+1 (lb, lb2, …: BIRD + daemon)
//!   (VIP via rt)  ├── switch (bridge) ──────┤
//!   router (rt) ──┘  BIRD, kernel ECMP,     └─ backend 1..B (VIP on lo, reply to clients)
//!                    L4 hash
//! ```
//!
//! The router learns the VIP over eBGP from every node's BIRD and installs one route with a next
//! hop per node (`merge paths on`, `fib_multipath_hash_policy = 1`). Clients route the VIP via
//! the router; each node's XDP program forwards to a backend (`l2dsr` or `ipip`), which answers
//! the client directly. Held connections stay open through the whole run while new ones arrive;
//! then, one after the other: scale out N → N+1, drain a node, undrain it, restart a node's
//! daemon, fail a node (its BIRD killed and its link down), bring it back. Each step measures the
//! router's convergence and the new flows per node before and after. A flow the router moves to
//! another node is adopted there by the same backend, so no connection may break.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use nix::sys::signal::Signal;
use serde::Serialize;

use super::{
    probe::{self, Conn, Fate, Release, Shared},
    report::{self, Check, Verdict},
    topo::{BackendConf, ServiceOpts},
    vip, Lab, LB4, PORT, VIP4,
};

pub const BACKENDS: u8 = 3;
pub const MAX_NODES: u8 = 8;
pub(super) const ROUTER4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
const NODE_AS: u32 = 65001;
const ROUTER_AS: u32 = 65000;
/// The nodes' peer channel (`peers.rs`).
const PEER_PORT: u16 = 9478;

#[derive(Clone, Debug)]
pub struct Options {
    /// Nodes at the start (one more joins in the scale-out step).
    pub nodes: u8,
    /// How long each step's before and after windows last together (new flows are counted in
    /// each half).
    pub window: Duration,
    /// New short connections per second over all clients.
    pub rate: f64,
    /// Connections each client holds open through the whole run.
    pub held_per_client: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self { nodes: 3, window: Duration::from_secs(6), rate: 60.0, held_per_client: 20 }
    }
}

/// Node `k` (1-based): its namespace's short name and its address on the switch.
pub(super) fn node_ns(k: u8) -> String {
    if k == 1 {
        "lb".into()
    } else {
        format!("lb{k}")
    }
}

pub(super) fn node_addr(k: u8) -> Ipv4Addr {
    if k == 1 {
        LB4
    } else {
        Ipv4Addr::new(198, 18, 0, 100 + k)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Step {
    pub what: String,
    /// From the change to the router's next hops being what they should (ms).
    pub converged_ms: Option<u64>,
    /// New flows per node in the window before and after the change.
    pub new_flows_before: BTreeMap<String, u64>,
    pub new_flows_after: BTreeMap<String, u64>,
    pub detail: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub nodes: u8,
    pub mode: String,
    pub steps: Vec<Step>,
    pub connections: u64,
    pub held: u64,
    pub held_survived: u64,
    pub broken: u64,
    pub connect_failed: u64,
    pub broken_examples: Vec<String>,
    /// At the end, with only the held connections open: the open-connection counters summed
    /// over every node, and what the clients hold. The difference is flows the router moved
    /// that the node they left still counts (until their idle timeout).
    pub counted_open: u64,
    pub clients_hold: u64,
    /// From the end of the load until the counters equalled the held connections (ms).
    pub counters_settled_ms: u64,
    /// Each node's peer channel: flows reported, released, ignored.
    pub peers: BTreeMap<String, lb_userspace::peers::Stats>,
    /// Open connections each node counts at the end.
    pub open_by_node: BTreeMap<String, u64>,
    /// When the counts disagree: the flows holding a slot on more than one node, as each
    /// node's pinned flow table has them.
    pub held_twice: Vec<String>,
    pub checks: Vec<Check>,
}

impl Verdict for Report {
    fn checks(&self) -> &[Check] {
        &self.checks
    }

    fn markdown(&self) -> String {
        use std::fmt::Write as _;
        let mut t = format!("# sluice lab cluster: {} nodes (+1), {}\n\n| step | router converged | new flows per node before → after |\n|---|---|---|\n", self.nodes, self.mode);
        for s in &self.steps {
            let flows = |m: &BTreeMap<String, u64>| m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ");
            let conv = s.converged_ms.map_or("—".into(), |ms| format!("{ms} ms"));
            let _ = writeln!(t, "| {} | {conv} | {} → {} |", s.what, flows(&s.new_flows_before), flows(&s.new_flows_after));
            if !s.detail.is_empty() {
                let _ = writeln!(t, "|  ↳ | | {} |", s.detail);
            }
        }
        let _ = writeln!(
            t,
            "\n{} connections, {} held ({} survived the whole run), {} broken, {} connects failed; at the end {} open counted over the nodes for {} the clients hold ({} ms after the load)\n",
            self.connections, self.held, self.held_survived, self.broken, self.connect_failed, self.counted_open, self.clients_hold, self.counters_settled_ms
        );
        for (n, p) in &self.peers {
            let _ = writeln!(
                t,
                "- peer channel {n}: reported {} adopted flows, released {} slots of flows that left, {} not here, {} still arriving here, refused {}; counts {} open",
                p.reported,
                p.released,
                p.ignored,
                p.still_here,
                p.refused,
                self.open_by_node.get(n).copied().unwrap_or(0)
            );
        }
        for f in &self.held_twice {
            let _ = writeln!(t, "- held on several nodes: {f}");
        }
        for e in &self.broken_examples {
            let _ = writeln!(t, "- {e}");
        }
        for c in &self.checks {
            let _ = writeln!(t, "- [{}] {}: {}", if c.ok { "x" } else { " " }, c.what, c.detail);
        }
        t
    }
}

/// The cluster around a lab: the router, the extra nodes, BIRD everywhere, a daemon per node.
pub(super) struct Cluster<'a> {
    pub(super) lab: &'a Lab,
    /// Nodes announced now.
    pub(super) up: BTreeSet<u8>,
    pub(super) max: u8,
    /// With cluster-wide limits (`--limits`): the nodes' `[cluster.limits]` and their backend's
    /// `max_conns` (one backend).
    pub(super) limits: Option<(String, u32)>,
    /// The service's `overflow.spill`.
    pub(super) spill: bool,
}

impl Cluster<'_> {
    /// The cluster's certificates: `sluice-lab-ca.pem`, `n<k>.pem`, `n<k>-key.pem`, `etcd.pem`.
    pub(super) fn pki_dir(&self) -> PathBuf {
        self.lab.spec.dir.join("pki")
    }

    pub(super) fn dir(&self, k: u8) -> PathBuf {
        self.lab.spec.dir.join(format!("node{k}"))
    }
    pub(super) fn socket(&self, k: u8) -> PathBuf {
        self.dir(k).join("sluice.sock")
    }

    /// The router namespace and the extra nodes' namespaces (node 1 is the lab's `lb`).
    pub(super) fn build(&self) -> Result<()> {
        let lab = self.lab;
        lab.add_ns("rt")?;
        lab.veth("rt", "rt0", "sw", "sw-rt", 1600)?;
        lab.ns_ip("sw", &["link", "set", "sw-rt", "master", "br0"])?;
        lab.ns_ip("rt", &["addr", "add", &format!("{ROUTER4}/24"), "dev", "rt0"])?;
        // Clients, node and backends share the switch: no ICMP redirects from the router.
        lab.sysctl("rt", &["net.ipv4.conf.all.forwarding=1", "net.ipv4.fib_multipath_hash_policy=1", "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.rt0.send_redirects=0"])?;
        for c in 1..=lab.spec.clients {
            lab.ns_ip(&format!("cl{c}"), &["route", "replace", &format!("{VIP4}/32"), "via", &ROUTER4.to_string()])?;
        }
        for k in 2..=self.max {
            let ns = node_ns(k);
            lab.add_ns(&ns)?;
            lab.veth(&ns, "lb0", "sw", &format!("sw-{ns}"), 1600)?;
            lab.ns_ip("sw", &["link", "set", &format!("sw-{ns}"), "master", "br0"])?;
            lab.ns_ip(&ns, &["addr", "add", &format!("{}/24", node_addr(k)), "dev", "lb0"])?;
            lab.sysctl(&ns, &["net.ipv4.conf.all.forwarding=1", "net.ipv4.conf.lb0.forwarding=1"])?;
            lab.spawn_decap("sw", &format!("sw-{ns}"))?;
            for n in 1..=lab.spec.backends {
                let _ = lab.command(&ns, "ping").args(["-c1", "-W1", &super::backend4(n).to_string()]).output();
            }
        }
        // The cluster's CA, and each node's certificate for mutual TLS on the peer channel and
        // TLS to etcd: a DNS name that is the node's name, an IP address that is its peer
        // address; etcd's for the router's address.
        let ca = crate::pki::Ca::new(&self.pki_dir(), "sluice-lab-ca");
        for k in 1..=self.max {
            ca.issue(&format!("n{k}"), &[&format!("n{k}"), &node_addr(k).to_string()]);
        }
        ca.issue("etcd", &[&ROUTER4.to_string()]);
        let rdir = lab.spec.dir.join("router");
        std::fs::create_dir_all(&rdir)?;
        let mut conf = format!(
            "# sluice lab cluster: the router.\nrouter id {ROUTER4};\nprotocol device {{}}\n\
             protocol kernel {{ ipv4 {{ export all; }}; merge paths on; }}\n\
             template bgp node {{ local as {ROUTER_AS}; hold time 3; connect retry time 1; ipv4 {{ import all; export none; }}; }}\n"
        );
        for k in 1..=self.max {
            conf.push_str(&format!("protocol bgp n{k} from node {{ neighbor {} as {NODE_AS}; }}\n", node_addr(k)));
        }
        std::fs::write(rdir.join("bird.conf"), conf)?;
        self.start_bird("rt", "bird-rt", &rdir)?;
        Ok(())
    }

    pub(super) fn start_bird(&self, ns: &str, key: &str, dir: &std::path::Path) -> Result<()> {
        let ctl = dir.join("bird.ctl");
        let _ = std::fs::remove_file(&ctl);
        self.lab.spawn(key, self.lab.command(ns, "bird").arg("-f").arg("-c").arg(dir.join("bird.conf")).arg("-s").arg(&ctl))?;
        self.lab.wait(&format!("BIRD in {ns}"), Duration::from_secs(10), || {
            if let Some(log) = self.lab.exited(key) {
                return Err(anyhow::anyhow!("bird in {ns} exited:\n{log}"));
            }
            Ok(ctl.exists())
        })
    }

    /// Node `k`'s config (the lab's service, its own paths, `[cluster]`) and BIRD config.
    pub(super) fn write_node(&self, k: u8) -> Result<()> {
        let lab = self.lab;
        let dir = self.dir(k);
        std::fs::create_dir_all(&dir)?;
        let conf: Vec<BackendConf> = match &self.limits {
            Some((_, max_conns)) => vec![BackendConf { n: 1, max_conns: *max_conns, weight: 1 }],
            None => (1..=lab.spec.backends).map(|n| BackendConf { n, max_conns: 10_000, weight: 1 }).collect(),
        };
        let pki = self.pki_dir();
        let (ca, cert, key) = (pki.join("sluice-lab-ca.pem"), pki.join(format!("n{k}.pem")), pki.join(format!("n{k}-key.pem")));
        let text = lab.config_text(&conf, &ServiceOpts { spill: self.spill, ..ServiceOpts::default() }, |c| {
            use lb_userspace::config::{ClusterCfg, EtcdTls, LimitsCfg};
            (c.daemon.pin_dir, c.daemon.control_socket, c.daemon.journal) = (self.pin_dir(k), self.socket(k), dir.join("journal.jsonl"));
            c.alerts.name = Some(format!("lab-n{k}"));
            c.cluster = Some(ClusterCfg {
                bird_socket: dir.join("bird.ctl"),
                announce_dir: dir.clone(),
                peer_listen: Some(SocketAddr::new(node_addr(k).into(), PEER_PORT)),
                peers: (1..=self.max).filter(|p| *p != k).map(|p| SocketAddr::new(node_addr(p).into(), PEER_PORT)).collect(),
                tls: Some(lb_userspace::tls::TlsFiles { ca: ca.clone(), cert: cert.clone(), key: key.clone() }),
                limits: self.limits.as_ref().map(|(etcd, _)| LimitsCfg {
                    prefix: "/sluice-lab".into(),
                    lease_ttl: Duration::from_secs(3),
                    tls: Some(EtcdTls { ca: ca.clone(), cert: Some(cert.clone()), key: Some(key.clone()) }),
                    ..LimitsCfg::new(vec![etcd.clone()])
                }),
                ..ClusterCfg::new(format!("n{k}"))
            });
        });
        std::fs::write(dir.join("sluice.toml"), text)?;
        std::fs::write(
            dir.join("bird.conf"),
            format!(
                "# sluice lab cluster: node {k}.\nrouter id {a};\nprotocol device {{}}\n\
                 protocol static sluice_vips4 {{\n  ipv4;\n  include \"{d}/vips4.conf\";\n}}\n\
                 protocol static sluice_vips6 {{\n  ipv6;\n  include \"{d}/vips6.conf\";\n}}\n\
                 protocol bgp uplink {{ local as {NODE_AS}; neighbor {ROUTER4} as {ROUTER_AS}; hold time 3; connect retry time 1;\n\
                   ipv4 {{ import none; export where proto = \"sluice_vips4\"; next hop self; }}; }}\n",
                a = node_addr(k),
                d = dir.display()
            ),
        )?;
        Ok(())
    }

    pub(super) fn start_daemon(&self, k: u8) -> Result<()> {
        let lab = self.lab;
        let key = format!("daemon-n{k}");
        let ns = node_ns(k);
        lab.spawn(&key, lab.command(&ns, &lab.spec.sluice).arg("run").arg("--config").arg(self.dir(k).join("sluice.toml")))?;
        lab.wait(&format!("node {k}'s daemon"), Duration::from_secs(30), || {
            if let Some(log) = lab.exited(&key) {
                return Err(anyhow::anyhow!("sluice run on node {k} exited:\n{log}"));
            }
            Ok(lab.link_has_xdp(&ns, "lb0") && self.socket(k).exists())
        })
    }

    /// Node `k` joins: daemon (it writes the files BIRD includes), then BIRD.
    pub(super) fn start_node(&self, k: u8) -> Result<()> {
        self.write_node(k)?;
        self.start_daemon(k)?;
        self.start_bird(&node_ns(k), &format!("bird-n{k}"), &self.dir(k))
    }

    /// The nodes the router's route to the VIP points at.
    fn hops(&self) -> BTreeSet<u8> {
        hops(self.lab, self.max)
    }

    /// Waits until the router's next hops are `self.up`; returns how long it took from `since`.
    pub(super) fn converge(&self, since: Instant) -> Result<Duration> {
        converge(self.lab, self.max, &self.up, since)
    }

    pub(super) fn status(&self, k: u8) -> Result<lb_userspace::api::StatusReport> {
        lb_userspace::client::block_on(self.client(k).status()).map_err(|e| anyhow::anyhow!("node {k}: {e}"))
    }

    /// Node `k`'s daemon.
    pub(super) fn client(&self, k: u8) -> lb_userspace::client::Client {
        lb_userspace::client::Client::new(self.socket(k))
    }

    /// Node `k`'s pin directory.
    pub(super) fn pin_dir(&self, k: u8) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{}-{}", self.lab.spec.prefix, node_ns(k)))
    }

    /// The flows holding a slot on more than one node: one line each, with every node's view.
    fn held_on_several_nodes(&self) -> Vec<String> {
        let mut by_flow: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for k in 1..=self.max {
            for f in report::held_flows(&self.pin_dir(k)).unwrap_or_default() {
                let how = if f.adopted { "adopted" } else { "entered" };
                by_flow.entry(f.flow).or_default().push(format!("n{k} ({how} {} ms ago, idle {} ms)", f.age_ms, f.idle_ms));
            }
        }
        by_flow.into_iter().filter(|(_, on)| on.len() > 1).map(|(f, on)| format!("{f}: {}", on.join(", "))).collect()
    }

    /// New flows admitted so far, per running node.
    fn new_flows(&self) -> BTreeMap<u8, u64> {
        (1..=self.max)
            .filter(|k| self.socket(*k).exists())
            .filter_map(|k| {
                let st = self.status(k).ok()?;
                Some((k, report::backends(&st).iter().map(|b| b.new_flows).sum()))
            })
            .collect()
    }

    /// New flows per node over `d`.
    fn window(&self, d: Duration) -> BTreeMap<String, u64> {
        let a = self.new_flows();
        std::thread::sleep(d);
        let b = self.new_flows();
        b.iter().map(|(k, v)| (format!("n{k}"), v - a.get(k).copied().unwrap_or(0))).collect()
    }
}

/// The nodes (of 1..=`max`) the router's route to the VIP points at.
fn hops(lab: &Lab, max: u8) -> BTreeSet<u8> {
    let out = Command::new("ip").args(["-n", &lab.ns("rt"), "route", "show", &VIP4.to_string()]).output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let words: Vec<&str> = text.split_whitespace().collect();
    words.windows(2).filter(|w| w[0] == "via").filter_map(|w| (1..=max).find(|k| node_addr(*k).to_string() == w[1])).collect()
}

/// Waits until the router's next hops are `want`; returns how long it took from `since`.
fn converge(lab: &Lab, max: u8, want: &BTreeSet<u8>, since: Instant) -> Result<Duration> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while hops(lab, max) != *want {
        if Instant::now() > deadline {
            bail!("the router's next hops are nodes {:?}, not {want:?}, 20 s after the change", hops(lab, max));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(since.elapsed())
}

#[expect(clippy::too_many_lines, reason = "the scenario, step after step")]
pub fn run(lab: &Lab, opts: &Options) -> Result<Report> {
    if !(1..MAX_NODES).contains(&opts.nodes) {
        bail!("--nodes {}: between 1 and {} (one more joins during the run)", opts.nodes, MAX_NODES - 1);
    }
    if opts.nodes < 2 {
        bail!("--nodes {}: the drain and failure steps need at least 2 nodes", opts.nodes);
    }
    for tool in ["bird", "birdc"] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("`{tool}` is missing: install bird2 (`cargo xtask setup` does)");
        }
    }
    let mut cl = Cluster { lab, up: BTreeSet::new(), max: opts.nodes + 1, limits: None, spill: false };
    cl.build()?;
    for k in 1..=opts.nodes {
        cl.start_node(k)?;
        cl.up.insert(k);
    }
    let t = cl.converge(Instant::now())?;
    eprintln!("[  0.0s] {} nodes announce {VIP4} (router converged in {t:?})", opts.nodes);

    let sh = Shared::new();
    let clients = lab.spec.clients;
    let addr = SocketAddr::new(vip(false), PORT);
    // Progress on stderr: stdout carries the report (JSON with --json).
    let say = |line: String| eprintln!("[{:>6.1}s] {line}", sh.now());
    let half = opts.window / 2;
    let mut steps = Vec::new();
    let (mut counted_open, mut clients_hold_counted, mut settle_ms) = (0u64, 0u64, 0u64);
    let mut peer_stats: BTreeMap<String, lb_userspace::peers::Stats> = BTreeMap::new();
    let mut open_by_node: BTreeMap<String, u64> = BTreeMap::new();
    let mut held_twice = Vec::new();

    let conns: Vec<Conn> = std::thread::scope(|s| -> Result<Vec<Conn>> {
        let release = Release(&sh);
        let load = probe::Load { rate: opts.rate, held_per_client: opts.held_per_client, seed: 1 };
        let running = probe::start(s, lab, clients, addr, &sh, load);
        let held = opts.held_per_client * usize::from(clients);
        lab.wait("the held connections to open", Duration::from_secs(30), || sh.opened.load(Ordering::Relaxed) >= held)?;
        // The load runs until every step is done (a generous bound; it is cut when they are).
        sh.load_until_ms.store((sh.t0.elapsed() + Duration::from_hours(1)).as_millis() as u64, Ordering::Relaxed);
        sh.go.store(true, Ordering::Relaxed);
        say(format!("{held} held connections open; {} new connections/s", opts.rate));

        // A step: new flows per node in a window before; the change (`act`, which also says
        // which nodes should be next hops after it); the router's convergence, timed by a
        // watcher from the start of the change (a drain's call waits for quiet, a restart for
        // the daemon: neither is the router's time); new flows in a window after.
        let mut step = |what: String, want: BTreeSet<u8>, cl: &mut Cluster, act: &mut dyn FnMut(&mut Cluster) -> Result<String>| -> Result<()> {
            let before = cl.window(half);
            let (lab, max) = (cl.lab, cl.max);
            let t0 = Instant::now();
            let (detail, converged) = std::thread::scope(|s| {
                let watcher = s.spawn(|| converge(lab, max, &want, t0));
                let detail = act(cl);
                (detail, watcher.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            });
            let (detail, converged) = (detail?, converged?);
            cl.up = want;
            let after = cl.window(half);
            say(format!("{what}: router converged in {converged:?}; new flows {before:?} → {after:?}{}", if detail.is_empty() { String::new() } else { format!("; {detail}") }));
            steps.push(Step { what, converged_ms: Some(converged.as_millis() as u64), new_flows_before: before, new_flows_after: after, detail });
            Ok(())
        };
        let with = |up: &BTreeSet<u8>, k: u8| -> BTreeSet<u8> { up.iter().copied().chain([k]).collect() };
        let without = |up: &BTreeSet<u8>, k: u8| -> BTreeSet<u8> { up.iter().copied().filter(|x| *x != k).collect() };
        let new = opts.nodes + 1;
        let all = with(&cl.up, new);
        step(format!("scale out: node {new} joins"), all.clone(), &mut cl, &mut |cl| cl.start_node(new).map(|()| String::new()))?;
        let drained = 1;
        step(format!("drain node {drained}"), without(&all, drained), &mut cl, &mut |cl| {
            let v =
                lb_userspace::client::block_on(cl.client(drained).drain(&lb_userspace::api::DrainRequest { timeout: Some("20s".into()) })).map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(format!(
                "withdrawn in {} ms; {} new flows reached it after, the last {} ms after the withdrawal; then none: {}",
                v.withdraw_ms.map_or_else(|| "(unconfirmed)".to_owned(), |ms| ms.to_string()),
                v.new_flows_after,
                v.last_new_flow_ms,
                v.quiet
            ))
        })?;
        step(format!("undrain node {drained}"), all.clone(), &mut cl, &mut |cl| {
            lb_userspace::client::block_on(cl.client(drained).undrain()).map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(String::new())
        })?;
        let restarted = 2;
        step(format!("restart node {restarted}'s daemon"), all.clone(), &mut cl, &mut |cl| {
            let cl: &Cluster = cl;
            let watching = AtomicBool::new(true);
            let lost = std::thread::scope(|s| {
                let w = s.spawn(|| {
                    let mut lost = 0u32;
                    while watching.load(Ordering::Relaxed) {
                        lost += u32::from(!cl.hops().contains(&restarted));
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    lost
                });
                let r = (|| {
                    cl.lab.stop(&format!("daemon-n{restarted}"), Signal::SIGTERM);
                    cl.start_daemon(restarted)?;
                    std::thread::sleep(Duration::from_millis(500));
                    anyhow::Ok(())
                })();
                watching.store(false, Ordering::Relaxed);
                r.map(|()| w.join().unwrap_or(u32::MAX))
            })?;
            Ok(format!("samples (every 20 ms) without node {restarted} on the router: {lost}"))
        })?;
        let failed = opts.nodes;
        step(format!("fail node {failed}: BIRD killed, link down"), without(&all, failed), &mut cl, &mut |cl| {
            cl.lab.stop(&format!("bird-n{failed}"), Signal::SIGKILL);
            cl.lab.ns_ip(&node_ns(failed), &["link", "set", "lb0", "down"])?;
            Ok(String::new())
        })?;
        step(format!("node {failed} back"), all.clone(), &mut cl, &mut |cl| {
            cl.lab.ns_ip(&node_ns(failed), &["link", "set", "lb0", "up"])?;
            cl.start_bird(&node_ns(failed), &format!("bird-n{failed}"), &cl.dir(failed))?;
            Ok(String::new())
        })?;

        sh.load_until_ms.store(sh.t0.elapsed().as_millis() as u64, Ordering::Relaxed);
        lab.wait("the short connections to finish", Duration::from_secs(30), || sh.short_done.load(Ordering::Relaxed) >= usize::from(clients))?;
        // Only the held connections are open now. Every node counts only the flows it carries
        // once its peers told it which moved (about a second, plus the sender's retries).
        let by_node = || -> BTreeMap<String, u64> {
            (1..=cl.max).filter_map(|k| Some((format!("n{k}"), report::backends(&cl.status(k).ok()?).iter().map(|b| b.open).sum::<u64>()))).collect()
        };
        let counted = || by_node().values().sum::<u64>();
        let open_now = held as u64;
        let t_stop = Instant::now();
        let _ = lab.wait("the nodes' counters to equal the connections held", Duration::from_secs(10), || counted() == open_now);
        open_by_node = by_node();
        counted_open = open_by_node.values().sum();
        settle_ms = t_stop.elapsed().as_millis() as u64;
        if counted_open != open_now {
            held_twice = cl.held_on_several_nodes();
        }
        peer_stats = (1..=cl.max).filter_map(|k| Some((format!("n{k}"), cl.status(k).ok()?.peers?))).collect();
        drop(release);
        say("load stopped; closing the held connections".into());
        let conns = running.join()?;
        clients_hold_counted = conns.iter().filter(|c| matches!(c.fate, Fate::Survived)).count() as u64;
        Ok(conns)
    })?;

    let count = |f: &dyn Fn(&Conn) -> bool| conns.iter().filter(|c| f(c)).count() as u64;
    let mut report = Report {
        nodes: opts.nodes,
        mode: format!("{:?}", lab.spec.mode).to_lowercase(),
        connections: count(&|c| !matches!(c.fate, Fate::Refused | Fate::ConnectFailed(_))),
        held: count(&|c| c.held),
        held_survived: count(&|c| matches!(c.fate, Fate::Survived)),
        broken: count(&|c| matches!(c.fate, Fate::Broken(_))),
        connect_failed: count(&|c| matches!(c.fate, Fate::ConnectFailed(_))),
        broken_examples: conns
            .iter()
            .filter(|c| matches!(c.fate, Fate::Broken(_) | Fate::ConnectFailed(_)))
            .take(10)
            .map(|c| format!("{} connection opened at {:.1}s, {} answers, failed at {:.1}s: {}", if c.held { "held" } else { "short" }, c.start, c.answers, c.end, c.fate.why()))
            .collect(),
        counted_open,
        clients_hold: clients_hold_counted,
        counters_settled_ms: settle_ms,
        peers: peer_stats,
        open_by_node,
        held_twice,
        steps,
        checks: Vec::new(),
    };
    let mut checks = Vec::new();
    let mut check = |what: &str, ok: bool, detail: String| checks.push(Check { what: what.into(), ok, detail });
    check("no connection broken", report.broken == 0, format!("{} broken of {} connections ({} held through every step)", report.broken, report.connections, report.held));
    check("every SYN answered", report.connect_failed == 0, format!("{} connects failed", report.connect_failed));
    let refused = count(&|c| matches!(c.fate, Fate::Refused));
    check("no connection refused (no RST from the load balancer)", refused == 0, format!("{refused} connects refused"));
    let slow: Vec<String> = report.steps.iter().filter(|s| s.converged_ms.is_none_or(|ms| ms > 10_000)).map(|s| s.what.clone()).collect();
    check("the router converged after every change (within 10 s)", slow.is_empty(), if slow.is_empty() { "all steps".into() } else { slow.join(", ") });
    let joined = report.steps.first().and_then(|s| s.new_flows_after.get(&format!("n{}", opts.nodes + 1))).copied().unwrap_or(0);
    check("the new node takes new flows after it joins", joined > 0, format!("{joined} new flows on n{} in the window after", opts.nodes + 1));
    let drain = report.steps.get(1).map(|s| (s.detail.ends_with("true"), s.new_flows_after.get("n1").copied().unwrap_or(u64::MAX)));
    check("the drained node's new flows reach 0", drain.is_some_and(|(quiet, after)| quiet && after == 0), report.steps.get(1).map(|s| s.detail.clone()).unwrap_or_default());
    let (reported, released): (u64, u64) = report.peers.values().fold((0, 0), |(a, b), p| (a + p.reported, b + p.released));
    check(
        "counters follow the flows: every node counts only the connections it carries",
        report.counted_open == report.clients_hold,
        format!(
            "{} open counted over the nodes for {} held by the clients, {} ms after the load; peers reported {reported} adopted flows, {released} slots released where they left",
            report.counted_open, report.clients_hold, report.counters_settled_ms
        ),
    );
    let restart = report.steps.get(3).map(|s| s.detail.clone()).unwrap_or_default();
    check("a daemon restart withdraws nothing", restart.ends_with(": 0"), restart);
    report.checks = checks;
    Ok(report)
}
