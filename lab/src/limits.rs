//! `sluice lab cluster --limits`: one limit for the whole cluster. Three nodes behind the
//! router (BIRD, ECMP) share one backend whose `max_conns` is cluster-wide, with shares leased
//! through etcd, which the lab starts in the router's namespace. Each client's flows are
//! steered to one node by source routes at the router, so the skew is set by the clients'
//! rates, and a flow never changes node when the skew moves (no adoption, no double count).
//!
//! Every 100 ms a sampler reads every node's open connections to the backend (its daemon's
//! counters); their sum must never exceed `max_conns`. In turn: the hot node moves n1 → n2 → n3
//! (admitted connections must reach 95 % of the limit within a few seconds); n1's daemon
//! restarts (it resumes its lease: its share stays); n3 fails (daemon,
//! BIRD and link gone: its share must be used again within its lease TTL + 1 s); etcd stops
//! (no overshoot, the alert fires on every node, each holds at most its safe share); etcd comes
//! back (the shares rebalance); n1 is cut off from etcd by an nftables drop at the router while
//! the clients churn (it must fence itself: withdraw and admit nothing; no overshoot), then
//! reaches etcd again (it must come back); n2 is drained and undrained while its client's flows
//! follow the router's ECMP (its flows move to the others, adopted and counted once); `max_conns` is halved on every node with `config
//! apply --force` while the backend holds the old limit (the shares must be revoked: the
//! backend falls under the new limit and stays there).
//!
//! The truth is taken at the backend too: every sample also counts its established sockets
//! from the clients (`ss` in its namespace; the nodes' health checks excluded), and that count
//! must never exceed `max_conns` either.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use nix::sys::signal::Signal;
use serde::Serialize;

use super::{
    client4,
    cluster::{node_addr, node_ns, Cluster, ROUTER4},
    report::{Check, Verdict},
    Lab, PORT, VIP4,
};
use lb_userspace::api::StatusReport;

const ETCD_PORT: u16 = 2379;
/// The lease the nodes are configured with (`write_node`).
pub const LEASE_TTL: Duration = Duration::from_secs(3);

#[derive(Clone, Debug)]
pub struct Options {
    pub nodes: u8,
    pub max_conns: u32,
    /// How long each client holds a connection.
    pub hold: Duration,
    /// New connections per second from the hot node's client, and from the others'.
    pub hot_rate: f64,
    pub cold_rate: f64,
    /// How long each skew lasts.
    pub phase: Duration,
    /// The service's `overflow.spill` (the example config's `true` by default).
    pub spill: bool,
    /// Only the skew, the partition, its healing and the lowered limit: no restart, failure or
    /// etcd stop (the suite's second run, with the other `spill`).
    pub short: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self { nodes: 3, max_conns: 60, hold: Duration::from_secs(2), hot_rate: 60.0, cold_rate: 3.0, phase: Duration::from_secs(7), spill: true, short: false }
    }
}

/// One node's counters at a sample.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NodeSample {
    pub open: u64,
    pub limit: u64,
    pub fallback: bool,
    pub fenced: bool,
    pub etcd_alert: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub t_ms: u64,
    pub nodes: BTreeMap<u8, NodeSample>,
    /// The backend's established connections from the clients (`ss` in its namespace); `None`
    /// when `ss` failed: no reading, never a 0 that would pass for "under the limit".
    pub backend: Option<u64>,
    /// The same sockets by client (`k` of `clk`): whose connections the backend holds.
    pub backend_clients: BTreeMap<u8, u64>,
}

impl Sample {
    fn sum(&self) -> u64 {
        self.nodes.values().map(|n| n.open).sum()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Step {
    pub what: String,
    /// From the change until the sampled sum first reached the target (ms).
    pub reached_ms: Option<u64>,
    pub target: u64,
    /// The most and the mean sampled over the step.
    pub max_sum: u64,
    pub mean_sum: f64,
    /// The most connections the backend held in the step (its sockets).
    pub backend_max: u64,
    /// From the change until the backend was back under the limit (a step that lowers it).
    pub repaired_ms: Option<u64>,
    pub detail: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub nodes: u8,
    pub max_conns: u32,
    pub spill: bool,
    /// The most connections the backend held in any sample (its sockets), and the limit then.
    pub backend_max: u64,
    pub lease_ttl_s: u64,
    pub samples: usize,
    /// The most open connections summed over the nodes in any sample.
    pub max_sum: u64,
    pub steps: Vec<Step>,
    /// Per client: admitted, refused, failed.
    pub clients: BTreeMap<String, (u64, u64, u64)>,
    /// Per node: etcd requests and bytes, grants applied, over the run (its `Traffic`).
    pub traffic: BTreeMap<String, lb_userspace::limits::Traffic>,
    pub run_s: f64,
    pub checks: Vec<Check>,
    /// Every sample: each node's open connections and limit.
    pub samples_taken: Vec<Sample>,
}

impl Verdict for Report {
    fn checks(&self) -> &[Check] {
        &self.checks
    }

    fn markdown(&self) -> String {
        use std::fmt::Write as _;
        let mut t = format!(
            "# sluice lab cluster --limits: {} nodes, one backend, max_conns = {} for the whole cluster (lease {} s, spill = {})\n\n\
             {} samples (every 100 ms, every node's counters and the backend's sockets): at most {} open over the nodes, {} held by the backend.\n\n\
             | step | target | reached after | most / mean open over the nodes | most at the backend | repaired after | detail |\n|---|---|---|---|---|---|---|\n",
            self.nodes, self.max_conns, self.lease_ttl_s, self.spill, self.samples, self.max_sum, self.backend_max
        );
        for s in &self.steps {
            let (target, reached) = match (s.target, s.reached_ms) {
                (0, _) => ("—".to_owned(), "—".to_owned()),
                (want, Some(ms)) => (want.to_string(), format!("{ms} ms")),
                (want, None) => (want.to_string(), "not reached".into()),
            };
            let repaired = s.repaired_ms.map_or_else(|| "—".to_owned(), |ms| format!("{ms} ms"));
            let _ = writeln!(t, "| {} | {target} | {reached} | {} / {:.1} | {} | {repaired} | {} |", s.what, s.max_sum, s.mean_sum, s.backend_max, s.detail);
        }
        let _ = writeln!(t);
        for (c, (ok, refused, failed)) in &self.clients {
            let _ = writeln!(t, "- client {c}: {ok} admitted, {refused} refused, {failed} failed");
        }
        for (n, tr) in &self.traffic {
            let _ = writeln!(
                t,
                "- etcd traffic of {n}: {} requests, {} B sent, {} B received, {} reports, {} grants written, {} applied in {} rounds",
                tr.requests, tr.bytes_sent, tr.bytes_received, tr.reports, tr.grants_written, tr.grants_applied, tr.rounds
            );
        }
        for c in &self.checks {
            let _ = writeln!(t, "- [{}] {}: {}", if c.ok { "x" } else { " " }, c.what, c.detail);
        }
        t
    }
}

/// A client's load: new connections at `rate` (milli-connections per second), each held
/// `hold`, until `stop`.
struct Load {
    rate_milli: AtomicU64,
    admitted: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
}

async fn client(load: Arc<Load>, hold: Duration, stop: Arc<AtomicBool>) {
    let addr = SocketAddr::new(VIP4.into(), PORT);
    let mut next = tokio::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let rate = load.rate_milli.load(Ordering::Relaxed) as f64 / 1000.0;
        if rate <= 0.0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            next = tokio::time::Instant::now();
            continue;
        }
        next += Duration::from_secs_f64(1.0 / rate);
        tokio::time::sleep_until(next).await;
        let load = load.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    load.admitted.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(hold).await;
                    drop(s);
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    load.refused.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    load.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    // Let the held connections close before the runtime ends.
    tokio::time::sleep(hold + Duration::from_millis(100)).await;
}

fn node_sample(v: &StatusReport) -> Option<NodeSample> {
    let b = v.services.first()?.backends.first()?;
    Some(NodeSample {
        open: b.open,
        limit: u64::from(b.limit),
        fallback: v.limits.as_ref().is_some_and(|l| l.fallback),
        fenced: v.limits.as_ref().is_some_and(|l| l.fenced),
        etcd_alert: v.alerts_firing.iter().any(|x| x.alertname == "SluiceLimitsWithoutEtcd"),
    })
}

/// The backend's established connections from the clients: what it really holds (the nodes'
/// health checks come from the nodes' addresses and are not counted). Two dumps back to back,
/// the smaller count: a socket dump walks the kernel's table while connections come and go, so
/// one that closes and one that opens during the walk can both be counted, a connection more
/// than the backend ever held at once. A real excess lasts longer than the two dumps.
fn backend_sockets(lab: &Lab, nodes: u8) -> Option<(u64, BTreeMap<u8, u64>)> {
    let (a, b) = (backend_dump(lab, nodes)?, backend_dump(lab, nodes)?);
    Some(if a.0 <= b.0 { a } else { b })
}

fn backend_dump(lab: &Lab, nodes: u8) -> Option<(u64, BTreeMap<u8, u64>)> {
    let out = lab.command("be1", "ss").args(["-Htn", "state", "established", &format!("( sport = :{PORT} )")]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let clients: Vec<String> = (1..=nodes).map(|k| client4(k).to_string()).collect();
    let mut by: BTreeMap<u8, u64> = BTreeMap::new();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        // The server listens on [::]: IPv4 peers read "[::ffff:a.b.c.d]:port".
        .filter_map(|peer| peer.rsplit_once(':').map(|(ip, _)| ip.trim_start_matches('[').trim_end_matches(']').trim_start_matches("::ffff:").to_owned()))
        .filter_map(|ip| clients.iter().position(|c| *c == ip))
        .for_each(|i| *by.entry(i as u8 + 1).or_default() += 1);
    Some((by.values().sum(), by))
}

/// The nftables table the lab's faults live in (in the router's namespace).
const FAULT_TABLE: &str = "sluice_lab_fault";

/// Drops node `k`'s traffic to etcd at the router (each `nft` call on its own: see TOOLCHAIN).
fn cut_from_etcd(lab: &Lab, k: u8) -> Result<()> {
    let nft = |args: &[&str]| crate::netns::run(lab.command("rt", "nft").args(args));
    nft(&["add", "table", "inet", FAULT_TABLE])?;
    nft(&["add", "chain", "inet", FAULT_TABLE, "in", "{ type filter hook input priority 0; }"])?;
    nft(&["add", "rule", "inet", FAULT_TABLE, "in", "ip", "saddr", &node_addr(k).to_string(), "tcp", "dport", &ETCD_PORT.to_string(), "drop"])
}

fn heal(lab: &Lab) -> Result<()> {
    crate::netns::run(lab.command("rt", "nft").args(["delete", "table", "inet", FAULT_TABLE]))
}

/// Whether the node reaches etcd now.
fn etcd_connected(v: &StatusReport) -> bool {
    v.limits.as_ref().is_some_and(|l| l.connected)
}

/// A lease id as etcd prints it, or "none".
fn lease(v: Option<i64>) -> String {
    v.map_or_else(|| "none".to_owned(), |l| format!("{l:x}"))
}

/// etcd as production runs it: TLS, and only clients with a certificate from the cluster's CA
/// (`--client-cert-auth`).
fn start_etcd(lab: &Lab, pki: &std::path::Path) -> Result<()> {
    let url = format!("https://{ROUTER4}:{ETCD_PORT}");
    let data = lab.spec.dir.join("etcd");
    let (ca, cert, key) = (pki.join("sluice-lab-ca.pem"), pki.join("etcd.pem"), pki.join("etcd-key.pem"));
    lab.spawn(
        "etcd",
        lab.command("rt", "etcd")
            .args(["--name", "lab", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .arg("--cert-file")
            .arg(&cert)
            .arg("--key-file")
            .arg(&key)
            .arg("--trusted-ca-file")
            .arg(&ca)
            .arg("--client-cert-auth")
            .args(["--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-cluster", "lab=http://127.0.0.1:2380", "--log-level", "warn"]),
    )?;
    lab.wait("etcd to answer", Duration::from_secs(20), || {
        if let Some(log) = lab.exited("etcd") {
            return Err(anyhow::anyhow!("etcd exited:\n{log}"));
        }
        // etcd's own certificate serves as etcdctl's client certificate (same CA, both usages).
        Ok(lab
            .command("rt", "etcdctl")
            .args(["--endpoints", &url, "--command-timeout=1s"])
            .arg("--cacert")
            .arg(&ca)
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .args(["endpoint", "health"])
            .output()
            .is_ok_and(|o| o.status.success()))
    })
}

#[expect(clippy::too_many_lines, reason = "the scenario, step after step")]
pub fn run(lab: &Lab, opts: &Options) -> Result<Report> {
    if opts.nodes < 2 || opts.nodes > 7 {
        bail!("--nodes {}: between 2 and 7 with --limits", opts.nodes);
    }
    for tool in ["bird", "etcd", "etcdctl"] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("`{tool}` is missing: install bird2, etcd-server and etcd-client (`cargo xtask setup` does)");
        }
    }
    let t0 = Instant::now();
    let etcd_url = format!("https://{ROUTER4}:{ETCD_PORT}");
    let mut cl = Cluster { lab, up: Default::default(), max: opts.nodes, limits: Some((etcd_url, opts.max_conns)), spill: opts.spill };
    cl.build()?;
    start_etcd(lab, &cl.pki_dir())?;
    // Client k's flows go to node k (source routes at the router, before its ECMP route).
    for k in 1..=opts.nodes {
        let table = (100 + u32::from(k)).to_string();
        lab.ns_ip("rt", &["rule", "add", "from", &client4(k).to_string(), "table", &table, "priority", &table])?;
        lab.ns_ip("rt", &["route", "replace", &format!("{VIP4}/32"), "via", &node_addr(k).to_string(), "table", &table])?;
    }
    for k in 1..=opts.nodes {
        cl.start_node(k)?;
        cl.up.insert(k);
    }
    cl.converge(Instant::now())?;
    lab.wait("every node to join the cluster's limits", Duration::from_secs(20), || {
        Ok((1..=opts.nodes).all(|k| cl.status(k).is_ok_and(|v| etcd_connected(&v) && v.limits.as_ref().is_some_and(|l| l.leader.is_some()))))
    })?;
    let say = |line: String| eprintln!("[{:>6.1}s] {line}", t0.elapsed().as_secs_f64());
    say(format!("{} nodes joined; etcd on the router", opts.nodes));

    let loads: Vec<Arc<Load>> =
        (0..opts.nodes).map(|_| Arc::new(Load { rate_milli: AtomicU64::new(0), admitted: AtomicU64::new(0), refused: AtomicU64::new(0), failed: AtomicU64::new(0) })).collect();
    let set_rates = |rates: &[f64]| {
        for (l, r) in loads.iter().zip(rates) {
            l.rate_milli.store((r * 1000.0) as u64, Ordering::Relaxed);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let samples: Mutex<Vec<Sample>> = Mutex::new(Vec::new());
    let live: Mutex<Vec<u8>> = Mutex::new((1..=opts.nodes).collect());
    let sampling = AtomicBool::new(true);
    let cap = u64::from(opts.max_conns);
    let target = cap * 95 / 100;
    let mut steps = Vec::new();
    // With etcd stopped, at the last sample: the nodes whose alert fired, those in safe shares.
    let mut etcd_lost: (Vec<u8>, Vec<u8>) = Default::default();
    // n1's restart: its lease before and after, its limit before and as it started.
    let mut restart: (Option<i64>, Option<i64>, u64, u64) = (None, None, 0, 0);
    // Whether the new daemon found the lease before expired (a restart slower than the TTL,
    // on a loaded machine): then a new lease is right, and only the share must stay.
    let mut restart_expired = false;
    // When n1 fenced itself after its cut from etcd (ms).
    let mut fenced_after: Option<u64> = None;
    // The lowered limit: repaired after (ms), the most held after that, when it was lowered (ms).
    let mut lowered_check: (Option<u64>, u64, u64) = (None, 0, 0);
    // When client 2's flows began to follow the router's ECMP (the drain and undrain move them).
    let mut moving_since: u64 = 0;

    std::thread::scope(|s| -> Result<()> {
        let mut clients = Vec::new();
        for k in 1..=opts.nodes {
            let (load, stop, hold) = (loads[usize::from(k) - 1].clone(), stop.clone(), opts.hold);
            clients.push(s.spawn(move || {
                lab.run_in(&format!("cl{k}"), move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                    rt.block_on(client(load, hold, stop));
                    anyhow::Ok(())
                })
            }));
        }
        let sampler = s.spawn(|| {
            while sampling.load(Ordering::Relaxed) {
                let at = Instant::now();
                let nodes: Vec<u8> = live.lock().expect("live").clone();
                let got: BTreeMap<u8, NodeSample> = nodes.iter().filter_map(|k| Some((*k, node_sample(&cl.status(*k).ok()?)?))).collect();
                let (backend, backend_clients) = backend_sockets(lab, opts.nodes).map_or((None, BTreeMap::new()), |(n, by)| (Some(n), by));
                samples.lock().expect("samples").push(Sample { t_ms: t0.elapsed().as_millis() as u64, nodes: got, backend, backend_clients });
                std::thread::sleep(Duration::from_millis(100).saturating_sub(at.elapsed()));
            }
        });
        let result = (|| -> Result<()> {
            // Measures one step: from `since`, when the sum of `counted` nodes first reached
            // `want` (with `extra` also true of that sample), the most and the mean over it.
            let measure = |what: String, since_ms: u64, until: Duration, want: u64, counted: &[u8], extra: &dyn Fn(&Sample) -> bool, detail: String| -> Step {
                std::thread::sleep(until);
                let all = samples.lock().expect("samples");
                let window: Vec<&Sample> = all.iter().filter(|x| x.t_ms >= since_ms).collect();
                let sum = |x: &Sample| counted.iter().filter_map(|k| x.nodes.get(k)).map(|n| n.open).sum::<u64>();
                let reached = window.iter().find(|x| sum(x) >= want && extra(x)).map(|x| x.t_ms - since_ms);
                let max_sum = window.iter().map(|x| x.sum()).max().unwrap_or(0);
                let mean_sum = window.iter().map(|x| x.sum() as f64).sum::<f64>() / window.len().max(1) as f64;
                let backend_max = window.iter().filter_map(|x| x.backend).max().unwrap_or(0);
                Step { what, reached_ms: reached, target: want, max_sum, mean_sum, backend_max, repaired_ms: None, detail }
            };
            let now_ms = || t0.elapsed().as_millis() as u64;
            let all: Vec<u8> = (1..=opts.nodes).collect();
            for hot in 1..=opts.nodes {
                let rates: Vec<f64> = (1..=opts.nodes).map(|k| if k == hot { opts.hot_rate } else { opts.cold_rate }).collect();
                let since = now_ms();
                set_rates(&rates);
                let hot_holds_most = move |x: &Sample| {
                    let h = x.nodes.get(&hot).map_or(0, |n| n.open);
                    x.nodes.iter().all(|(k, n)| *k == hot || n.open <= h)
                };
                let step = measure(
                    format!("skew: most new connections to n{hot}"),
                    since,
                    opts.phase,
                    target,
                    &all,
                    &hot_holds_most,
                    format!("clients' rates {rates:?}/s, each connection held {:?}", opts.hold),
                );
                say(format!("{}: reached {target} after {:?} ms; at most {} open", step.what, step.reached_ms, step.max_sum));
                steps.push(step);
            }
            let mut survivors: Vec<u8> = all.clone();
            if !opts.short {
                // Every node busy; n1's daemon restarts: it resumes its lease and keeps its share.
                set_rates(&vec![opts.hot_rate; usize::from(opts.nodes)]);
                std::thread::sleep(opts.phase / 2);
                let since = now_ms();
                let before = cl.status(1)?;
                lab.stop("daemon-n1", Signal::SIGTERM);
                cl.start_daemon(1)?;
                let after = cl.status(1)?;
                let limit = |v: &StatusReport| node_sample(v).map_or(0, |n| n.limit);
                let lease_of = |v: &StatusReport| v.limits.as_ref().and_then(|l| l.lease);
                restart = (lease_of(&before), lease_of(&after), limit(&before), limit(&after));
                lab.wait("n1 to reach etcd again", Duration::from_secs(10), || Ok(cl.status(1).is_ok_and(|v| etcd_connected(&v))))?;
                let resumed = lease_of(&cl.status(1)?);
                restart_expired = std::fs::read_to_string(lab.spec.dir.join("daemon-n1.log")).is_ok_and(|t| t.contains("expired before this daemon asked etcd"));
                let step = measure(
                    "n1's daemon restarts".into(),
                    since,
                    Duration::from_secs(1),
                    target,
                    &all,
                    &|_| true,
                    format!(
                        "lease {} before, {} after{}; limit {} before, {} as it started",
                        lease(restart.0),
                        lease(resumed),
                        if restart_expired { " (the lease before had expired: the restart took longer than its TTL)" } else { "" },
                        restart.2,
                        restart.3
                    ),
                );
                restart.1 = resumed;
                say(format!("{}: {}", step.what, step.detail));
                steps.push(step);
                std::thread::sleep(opts.phase / 2);
                let failed = opts.nodes;
                let shares_before: Vec<u64> = samples.lock().expect("samples").last().map(|x| x.nodes.values().map(|n| n.limit).collect()).unwrap_or_default();
                let since = now_ms();
                let mut rates = vec![opts.hot_rate; usize::from(opts.nodes)];
                rates[usize::from(failed) - 1] = 0.0;
                set_rates(&rates);
                live.lock().expect("live").retain(|k| *k != failed);
                lab.stop(&format!("daemon-n{failed}"), Signal::SIGKILL);
                lab.stop(&format!("bird-n{failed}"), Signal::SIGKILL);
                lab.ns_ip(&node_ns(failed), &["link", "set", "lb0", "down"])?;
                survivors = (1..opts.nodes).collect();
                let step = measure(
                    format!("n{failed} fails (daemon and BIRD killed, link down)"),
                    since,
                    3 * LEASE_TTL + Duration::from_secs(4),
                    target,
                    &survivors,
                    &|_| true,
                    format!(
                        "limits before: {shares_before:?}; what it may hold is reserved {} s after its lease ({} s) expires, then free",
                        2 * LEASE_TTL.as_secs(),
                        LEASE_TTL.as_secs()
                    ),
                );
                say(format!("{}: the others reached {target} after {:?} ms", step.what, step.reached_ms));
                steps.push(step);
                // etcd stops: no node may raise a limit; each falls to at most its safe share.
                let mut rates = vec![opts.cold_rate; usize::from(opts.nodes)];
                rates[0] = opts.hot_rate;
                rates[usize::from(failed) - 1] = 0.0;
                set_rates(&rates);
                let since = now_ms();
                lab.stop("etcd", Signal::SIGKILL);
                let safe = cap / u64::from(opts.nodes);
                let step = measure("etcd stopped".into(), since, LEASE_TTL + Duration::from_secs(3), cap, &survivors, &|_| true, String::new());
                let last = samples.lock().expect("samples").last().cloned();
                let (alerted, within_safe): (Vec<u8>, Vec<u8>) = match &last {
                    Some(x) => (
                        x.nodes.iter().filter(|(_, n)| n.etcd_alert).map(|(k, _)| *k).collect(),
                        x.nodes.iter().filter(|(_, n)| n.fallback && n.limit <= safe).map(|(k, _)| *k).collect(),
                    ),
                    None => (Vec::new(), Vec::new()),
                };
                let detail = format!(
                    "alert SluiceLimitsWithoutEtcd firing on {alerted:?}; in safe shares (≤ {safe}) on {within_safe:?}; limits {:?}",
                    last.as_ref().map(|x| x.nodes.iter().map(|(k, n)| (*k, n.limit)).collect::<Vec<_>>()).unwrap_or_default()
                );
                say(format!("etcd stopped: {detail}"));
                etcd_lost = (alerted, within_safe);
                // Nothing to reach here: the sum must only stay within the limit.
                steps.push(Step { detail, target: 0, reached_ms: None, ..step });
                // etcd back: the nodes join again and the shares rebalance (timed from etcd answering).
                set_rates(&{
                    let mut r = vec![opts.hot_rate; usize::from(opts.nodes)];
                    r[usize::from(failed) - 1] = 0.0;
                    r
                });
                start_etcd(lab, &cl.pki_dir())?;
                let since = now_ms();
                let step = measure("etcd back".into(), since, opts.phase, target, &survivors, &|x: &Sample| x.nodes.values().all(|n| !n.fallback), String::new());
                say(format!("{}: reached {target} after {:?} ms", step.what, step.reached_ms));
                steps.push(step);
            }
            // n1 cut off from etcd while its peers reach it, every client churning: it fences
            // itself (withdraws, admits nothing), and the others are granted what it held only
            // once the allocator released it.
            set_rates(&(1..=opts.nodes).map(|k| if survivors.contains(&k) { opts.hot_rate } else { 0.0 }).collect::<Vec<_>>());
            std::thread::sleep(opts.phase / 2);
            let since = now_ms();
            cut_from_etcd(lab, 1)?;
            let mut step = measure(
                "n1 cut off from etcd (nftables at the router), clients churning".into(),
                since,
                3 * LEASE_TTL + Duration::from_secs(3),
                0,
                &survivors,
                &|_| true,
                String::new(),
            );
            let fenced_ms = samples.lock().expect("samples").iter().filter(|x| x.t_ms >= since).find(|x| x.nodes.get(&1).is_some_and(|n| n.fenced)).map(|x| x.t_ms - since);
            step.detail = format!("n1 fenced itself after {fenced_ms:?} ms (bound: {} s without etcd while a peer reaches it)", 2 * LEASE_TTL.as_secs());
            say(format!("{}: {}; at most {} at the backend", step.what, step.detail, step.backend_max));
            fenced_after = fenced_ms;
            steps.push(step);
            let since = now_ms();
            heal(lab)?;
            let step = measure(
                "n1 reaches etcd again".into(),
                since,
                opts.phase,
                target,
                &survivors,
                &|x: &Sample| x.nodes.get(&1).is_some_and(|n| !n.fenced && n.open > 0),
                "n1 announces and admits again once granted shares".into(),
            );
            say(format!("{}: reached {target} with n1 back after {:?} ms", step.what, step.reached_ms));
            steps.push(step);
            // Drain and undrain under load: client 2's flows follow the router's ECMP (its source
            // route removed), so draining n2 moves its open flows to the others, which adopt and
            // count them while n2 gives back their slots and its share.
            let table = "102";
            moving_since = now_ms();
            lab.ns_ip("rt", &["rule", "del", "from", &client4(2).to_string(), "table", table, "priority", table])?;
            std::thread::sleep(opts.phase / 2);
            let since = now_ms();
            let drain = lb_userspace::client::block_on(cl.client(2).drain(&lb_userspace::api::DrainRequest { timeout: Some("5s".into()) }))
                .map_err(|e| anyhow::anyhow!("node 2: drain: {e}"))?;
            let step = measure(
                "n2 drained under load (its client's flows follow the router's ECMP)".into(),
                since,
                Duration::from_secs(2),
                0,
                &survivors,
                &|_| true,
                format!("withdrawn in {} ms; {} new flows reached it after; quiet: {}", drain.withdraw_ms.unwrap_or(0), drain.new_flows_after, drain.quiet),
            );
            say(format!("{}: {}; at most {} at the backend", step.what, step.detail, step.backend_max));
            steps.push(step);
            let since = now_ms();
            lb_userspace::client::block_on(cl.client(2).undrain()).map_err(|e| anyhow::anyhow!("node 2: undrain: {e}"))?;
            let step = measure("n2 undrained under load".into(), since, opts.phase, target, &survivors, &|_| true, String::new());
            say(format!("{}: reached {target} after {:?} ms; at most {} at the backend", step.what, step.reached_ms, step.backend_max));
            steps.push(step);
            lab.ns_ip("rt", &["rule", "add", "from", &client4(2).to_string(), "table", table, "priority", table])?;
            // max_conns halved on every node while the backend holds about the old limit: the
            // shares are revoked and nothing is admitted until the backend is under the new one.
            let lowered = opts.max_conns / 2;
            let since = now_ms();
            for k in &survivors {
                let path = cl.dir(*k).join("sluice.toml");
                let text = std::fs::read_to_string(&path)?;
                let next = text.replace(&format!("max_conns = {}\n", opts.max_conns), &format!("max_conns = {lowered}\n"));
                if next == text {
                    bail!("{}: no `max_conns = {}` to lower", path.display(), opts.max_conns);
                }
                std::fs::write(&path, next)?;
                lb_userspace::client::block_on(cl.client(*k).apply(&lb_userspace::api::ApplyRequest { path: Some(path), force: true, ..Default::default() }))
                    .map_err(|e| anyhow::anyhow!("node {k}: config apply --force: {e}"))?;
            }
            let mut step = measure(
                format!("max_conns {} → {lowered} on every node (config apply --force), clients churning", opts.max_conns),
                since,
                opts.hold + Duration::from_secs(4),
                0,
                &survivors,
                &|_| true,
                String::new(),
            );
            {
                let all = samples.lock().expect("samples");
                let window: Vec<&Sample> = all.iter().filter(|x| x.t_ms >= since).collect();
                // The truth is the backend's; the nodes' counters are read one node after the
                // other, so their sum can mix moments (it is reported, not judged, here).
                let repaired = window.iter().position(|x| x.backend.is_some_and(|b| b <= u64::from(lowered)));
                step.repaired_ms = repaired.map(|i| window[i].t_ms - since);
                let after: Vec<&&Sample> = repaired.map_or_else(Vec::new, |i| window[i..].iter().collect());
                let worst_after = after.iter().filter_map(|x| x.backend).max().unwrap_or(0);
                let nodes_after = after.iter().map(|x| x.sum()).max().unwrap_or(0);
                step.detail = format!(
                    "the backend under {lowered} after {:?} ms; at most {worst_after} at the backend after that ({nodes_after} over the nodes' counters)",
                    step.repaired_ms
                );
                lowered_check = (step.repaired_ms, worst_after, since);
            }
            say(format!("{}: {}", step.what, step.detail));
            steps.push(step);
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            let _ = c.join();
        }
        sampling.store(false, Ordering::Relaxed);
        let _ = sampler.join();
        result
    })?;

    let samples = samples.into_inner().expect("samples");
    let samples_taken = samples.clone();
    // Before the limit was lowered, against max_conns; after, against the lowered one once repaired.
    let (repaired_ms, worst_after, lowered_at) = lowered_check;
    let before: Vec<&Sample> = samples.iter().filter(|x| x.t_ms < lowered_at || lowered_at == 0).collect();
    let max_sum = before.iter().map(|x| x.sum()).max().unwrap_or(0);
    let backend_max = before.iter().filter_map(|x| x.backend).max().unwrap_or(0);
    let backend_read = before.iter().filter(|x| x.backend.is_some()).count();
    let traffic = (1..=opts.nodes).filter_map(|k| Some((format!("n{k}"), cl.status(k).ok()?.limits?.traffic))).collect();
    let mut report = Report {
        nodes: opts.nodes,
        max_conns: opts.max_conns,
        spill: opts.spill,
        backend_max,
        lease_ttl_s: LEASE_TTL.as_secs(),
        samples: samples.len(),
        max_sum,
        steps,
        clients: loads
            .iter()
            .enumerate()
            .map(|(i, l)| (format!("cl{}", i + 1), (l.admitted.load(Ordering::Relaxed), l.refused.load(Ordering::Relaxed), l.failed.load(Ordering::Relaxed))))
            .collect(),
        traffic,
        run_s: t0.elapsed().as_secs_f64(),
        checks: Vec::new(),
        samples_taken,
    };
    let mut checks = Vec::new();
    let mut check = |what: &str, ok: bool, detail: String| checks.push(Check { what: what.into(), ok, detail });
    let step = |prefix: &str| report.steps.iter().find(|s| s.what.starts_with(prefix));
    check("never over the limit (the nodes' counters)", max_sum <= cap, format!("at most {max_sum} open over the nodes in {} samples, max_conns {cap}", before.len()));
    check(
        "never over the limit (the backend's sockets)",
        backend_max <= cap && backend_max > 0 && backend_read * 10 >= before.len() * 9,
        format!("at most {backend_max} established at the backend in {backend_read} readings of {} samples, max_conns {cap}", before.len()),
    );
    for s in report.steps.iter().filter(|s| s.what.starts_with("skew")) {
        check(&format!("{}: 95 % of the limit within 5 s", s.what), s.reached_ms.is_some_and(|ms| ms <= 5000), format!("{:?} ms", s.reached_ms));
    }
    if !opts.short {
        let detail = step("n1's daemon restarts").map(|s| s.detail.clone()).unwrap_or_default();
        check("a daemon restart resumes its lease and keeps its share", restart.0.is_some() && (restart.0 == restart.1 || restart_expired) && restart.2 == restart.3, detail);
        // Its lease expires (TTL), the allocator reserves what it may hold (2 × TTL), then frees it.
        let bound = 3 * LEASE_TTL + Duration::from_secs(1);
        let fail = step(&format!("n{} fails", opts.nodes)).and_then(|s| s.reached_ms);
        check(
            "a failed node's share is used again within 3 × its lease TTL + 1 s",
            fail.is_some_and(|ms| u128::from(ms) <= bound.as_millis()),
            format!("{fail:?} ms (bound {} ms)", bound.as_millis()),
        );
        let stopped = step("etcd stopped").map(|s| s.detail.clone()).unwrap_or_default();
        let survivors = usize::from(opts.nodes) - 1;
        check("etcd stopped: the alert fires on every node", etcd_lost.0.len() == survivors, stopped.clone());
        check("etcd stopped: every node holds at most its safe share", etcd_lost.1.len() == survivors, stopped);
        let back = step("etcd back").and_then(|s| s.reached_ms);
        check("etcd back: the shares rebalance (95 % of the limit within 5 s)", back.is_some_and(|ms| ms <= 5000), format!("{back:?} ms"));
    }
    let fence_bound = 2 * LEASE_TTL + Duration::from_secs(2);
    check(
        "cut off from etcd while its peers reach it, a node fences itself",
        fenced_after.is_some_and(|ms| u128::from(ms) <= fence_bound.as_millis()),
        format!("fenced after {fenced_after:?} ms (bound {} ms)", fence_bound.as_millis()),
    );
    let healed = step("n1 reaches etcd again").and_then(|s| s.reached_ms);
    check("etcd reachable again: n1 admits again and the cluster fills 95 % within 5 s", healed.is_some_and(|ms| ms <= 5000), format!("{healed:?} ms"));
    // Flows that moved: the node they left holds their slots until the node that adopted them
    // says so over the peer channel (about a second: its walk for adopted flows). What the
    // nodes count beyond the backend's sockets is capacity refused for nothing. With n3 failed
    // (its packets dropped) the channel once waited 3 s per round for it: on average 8–22
    // above the backend, 15 or more in a quarter to three quarters of the samples; with a task
    // per peer, 2–3 and under 5 %.
    let moving: Vec<u64> = samples.iter().filter(|x| x.t_ms >= moving_since && x.t_ms < lowered_at).filter_map(|x| Some(x.sum().saturating_sub(x.backend?))).collect();
    let gap_mean = moving.iter().sum::<u64>() as f64 / moving.len().max(1) as f64;
    let gap_over = moving.iter().filter(|g| **g >= u64::from(opts.max_conns) / 4).count();
    check(
        "flows that moved (drain, undrain): the nodes count at most a few more than the backend holds",
        moving_since > 0 && moving.len() >= 20 && gap_mean <= f64::from(opts.max_conns) / 12.0 && gap_over * 10 <= moving.len(),
        format!(
            "over {} samples, the nodes' counters above the backend's sockets by {gap_mean:.1} on average; by {} or more in {gap_over} (max_conns {})",
            moving.len(),
            opts.max_conns / 4,
            opts.max_conns
        ),
    );
    let lowered = u64::from(opts.max_conns / 2);
    check(
        "max_conns lowered: repaired (the backend under the new limit) within the connections' hold time + 2 s",
        repaired_ms.is_some_and(|ms| u128::from(ms) <= (opts.hold + Duration::from_secs(2)).as_millis()),
        format!("repaired after {repaired_ms:?} ms"),
    );
    check(
        "max_conns lowered: never over the new limit once repaired",
        repaired_ms.is_some() && worst_after <= lowered,
        format!("repaired after {repaired_ms:?} ms; at most {worst_after} at the backend after that, limit {lowered}"),
    );
    report.checks = checks;
    Ok(report)
}
