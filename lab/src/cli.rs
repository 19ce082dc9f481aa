//! `sluice-lab …` (also reached as `sluice lab …`): the whole deployment in network namespaces
//! (see [`crate`]).

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use lb_userspace::{config::Mode, outln, Error};

use crate::{chaos, cluster, flood, incident, load, topo::BackendConf, Lab, Spec};

const DIR: &str = "/run/sluice-lab";
const PREFIX: &str = "slab";
const INCIDENT_DIR: &str = "/run/sluice-lab-incident";
const INCIDENT_PREFIX: &str = "slabi";
const CHAOS_DIR: &str = "/run/sluice-lab-chaos";
const CLUSTER_PREFIX: &str = "slabk";
const CLUSTER_DIR: &str = "/run/sluice-lab-cluster";
const CHAOS_PREFIX: &str = "slabc";
const FLOOD_DIR: &str = "/run/sluice-lab-flood";
const FLOOD_PREFIX: &str = "slabf";

/// A line of `sluice lab up`'s banner. The lab stays up after it (this process owns it until
/// Ctrl-C), so a reader that went away must not end the process: the line is dropped.
macro_rules! banner {
    ($($arg:tt)*) => {
        let _ = lb_userspace::cli::out::try_write(format_args!($($arg)*), true);
    };
}

/// The `sluice-lab` command line.
#[derive(Parser)]
#[command(name = "sluice-lab", version, about = "Sluice's lab: a whole deployment in network namespaces — demos, training, the incident replay, chaos")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: LabCmd,
}

/// Runs `sluice-lab` and returns the process exit code.
pub fn main() -> i32 {
    match run(&Cli::parse().cmd) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("sluice lab: error: {e}");
            1
        }
    }
}

#[derive(Subcommand)]
pub enum LabCmd {
    /// Build the lab (clients, load balancer, backends on a bridge), start the backends' HTTP
    /// servers and the Sluice daemon; run until Ctrl-C or `sluice lab down`, then remove it all.
    Up {
        #[arg(long, default_value_t = 3)]
        backends: u8,
        #[arg(long, default_value_t = 2)]
        clients: u8,
        /// Forwarding mode: l2dsr, or ipip (the backends run `sluice decap`).
        #[arg(long, default_value = "l2dsr", value_parser = parse_mode)]
        mode: Mode,
        /// Every backend's max_conns in the generated config.
        #[arg(long, default_value_t = 100)]
        max_conns: u32,
        /// Also serve the IPv6 VIP (service "web6").
        #[arg(long)]
        ipv6: bool,
    },
    /// Remove every trace of the lab: processes, namespaces, pins, files.
    Down,
    /// Generate load from the clients against the VIP; print outcomes and latency percentiles.
    Load {
        /// New connections per second (all clients together).
        #[arg(long, default_value_t = 50.0, value_parser = parse_rate)]
        rate: f64,
        /// Connections in flight at most (held ones included).
        #[arg(long, default_value_t = 100)]
        concurrency: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Keep each connection open this long after its answer.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        hold: Duration,
        /// Ask the backends to answer this slowly (ms).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Use the IPv6 VIP (the lab must be up with --ipv6).
        #[arg(long)]
        ipv6: bool,
        #[arg(long)]
        json: bool,
    },
    /// Replay the 2023-05-05 incident in its own lab; exit 0 only if everything happened as
    /// it should. Writes report.md and incident.svg to --report.
    Incident {
        #[arg(long, default_value = "sluice-lab-report")]
        report: PathBuf,
    },
    /// Inject faults at random into its own lab under continuous load (backend crashes, daemon
    /// restarts, crashes and upgrades, config reloads, drains); exit 0 only if no connection
    /// broke except by its backend's crash and counters, flows and clients agree afterwards.
    Chaos {
        /// How long faults are injected.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Seed of the fault schedule (a run is reproducible up to timing).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// New short connections per second.
        #[arg(long, default_value_t = 100.0, value_parser = parse_rate)]
        rate: f64,
        #[arg(long, default_value = "l2dsr", value_parser = parse_mode)]
        mode: Mode,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Several Sluice nodes behind a router running BIRD with kernel ECMP, in their own lab,
    /// under continuous load: scale out N → N+1, drain a node and undrain it, restart a node's
    /// daemon, fail a node (BIRD and link gone), bring it back. Exit 0 only if no connection
    /// broke, the router converged after each change, the new node took flows, the drained
    /// node's new flows reached 0 and the restart withdrew nothing.
    Cluster {
        /// Nodes at the start (one more joins).
        #[arg(long, default_value_t = 3)]
        nodes: u8,
        #[arg(long, default_value = "l2dsr", value_parser = parse_mode)]
        mode: Mode,
        /// Roughly how long the steps take together (each measures new flows per node in a
        /// window of a sixth of it, half before and half after its change).
        #[arg(long, default_value = "36s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// New short connections per second.
        #[arg(long, default_value_t = 60.0, value_parser = parse_rate)]
        rate: f64,
        /// Instead: one backend whose max_conns (60) is for the whole cluster, shares leased
        /// through etcd (started in the router's namespace); the skew moves between the nodes,
        /// one fails, etcd stops and comes back; exit 0 only if the sum of open connections over
        /// the nodes (sampled every 100 ms) never exceeded the limit and every step held.
        #[arg(long)]
        limits: bool,
        /// With --limits: the service's `overflow.spill` (the example config's is true).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        spill: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// A spoofed-source SYN flood at the VIP in its own lab, beside a client with open
    /// connections and new ones: exit 0 only if none broke and new clients got through again
    /// within the SYN timeout of the flood's end.
    Flood {
        /// SYNs per second.
        #[arg(long, default_value_t = 20_000)]
        pps: u32,
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long)]
        json: bool,
    },
    /// A training drill: a lab under load, one fault injected without saying which, and only
    /// what users report; find the cause with the ordinary tools (`sluice lab drill answer
    /// CAUSE` from another terminal), fix it, get the score. `--auto`: a scripted responder
    /// that uses only the CLI's --json output solves it (without a scenario: every one).
    Drill(crate::drill::Args),
    /// (internal) The lab's backend HTTP server.
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 80)]
        port: u16,
    },
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && (0.1..=1_000_000.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?}: connections per second, from 0.1 to 1000000")),
    }
}

/// On Ctrl-C or SIGTERM, remove the lab (`prefix`, `dir`) and exit: the main thread may be
/// anywhere (building, waiting for the daemon, replaying), and a killed process runs no `Drop`.
fn cleanup_on_signal(prefix: &'static str, dir: &'static str) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else { return };
            let _ = tx.send(());
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        eprintln!("interrupted: removing the lab…");
        for what in crate::topo_cleanup(prefix, std::path::Path::new(dir)) {
            eprintln!("  removed {what}");
        }
        std::process::exit(130);
    });
    // The handlers are installed before the lab is built.
    let _ = rx.recv_timeout(Duration::from_secs(5));
}

/// Where a self-contained run (incident, chaos, cluster, flood) builds its lab: its own prefix
/// and directory, or `SLUICE_LAB_PREFIX` and `SLUICE_LAB_DIR` when set — so a test can run
/// `sluice lab chaos` under names its harness sweeps, beside a lab someone else runs.
fn place(prefix: &'static str, dir: &'static str) -> (&'static str, &'static str) {
    let var = |name: &str, default: &'static str| -> &'static str { std::env::var(name).ok().filter(|v| !v.is_empty()).map_or(default, |v| Box::leak(v.into_boxed_str())) };
    (var("SLUICE_LAB_PREFIX", prefix), var("SLUICE_LAB_DIR", dir))
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    match s {
        "l2dsr" => Ok(Mode::L2dsr),
        "ipip" => Ok(Mode::Ipip),
        _ => Err(format!("{s:?}: l2dsr or ipip")),
    }
}

fn spec(prefix: &str, dir: &str, backends: u8, clients: u8, mode: Mode) -> Spec {
    Spec { prefix: prefix.into(), backends, clients, mode, servers: true, dir: dir.into(), sluice: crate::sluice_bin() }
}

/// Prints a checked run's report (markdown or JSON); an error unless every check held.
fn verdict(what: &str, report: &impl chaos::Verdict, json: bool) -> Result<(), Error> {
    if json {
        outln!("{}", serde_json::to_string_pretty(report).expect("json"));
    } else {
        outln!("{}", report.markdown());
    }
    if report.passed() {
        Ok(())
    } else {
        Err(Error::other(what, anyhow::anyhow!("some checks failed (see above)")))
    }
}

pub fn run(cmd: &LabCmd) -> Result<(), Error> {
    let lab_err = |e: anyhow::Error| Error::other("sluice lab", e);
    match cmd {
        LabCmd::Up { backends, clients, mode, max_conns, ipv6 } => {
            cleanup_on_signal(PREFIX, DIR);
            let lab = Lab::up(spec(PREFIX, DIR, *backends, *clients, *mode)).map_err(lab_err)?;
            let conf: Vec<BackendConf> = (1..=*backends).map(|n| BackendConf { n, max_conns: *max_conns, weight: 1 }).collect();
            lab.write_config(&lab.config_text(&conf, &crate::topo::ServiceOpts { v6: *ipv6, spill: false }, |c| c.alerts.name = Some("lab-lb".into()))).map_err(lab_err)?;
            lab.start_daemon().map_err(lab_err)?;
            banner!(
                "Sluice lab is up: {backends} backends, {clients} clients, mode {mode:?}, VIP {}:80{}",
                crate::VIP4,
                if *ipv6 { format!(" and [{}]:80", crate::VIP6) } else { String::new() }
            );
            banner!("  config      {}  (edit, then `sluice --socket {} config apply {}`)", lab.config_path().display(), lab.socket().display(), lab.config_path().display());
            banner!("  control     export SLUICE_SOCKET={}   # then: sluice status, sluice top, sluice explain …", lab.socket().display());
            banner!("  load        sluice lab load --rate 100 --concurrency 200 --duration 30s --hold 2s");
            banner!("  a client    nsenter --net=/run/netns/{} curl http://{}/", lab.ns("cl1"), crate::VIP4);
            banner!("  logs        {}/*.log", lab.spec.dir.display());
            banner!("Ctrl-C or `sluice lab down` removes it all.");
            // The signal thread removes the lab and exits the process.
            let _keep = lab;
            loop {
                std::thread::park();
            }
        }
        LabCmd::Down => {
            let mut removed = crate::topo_cleanup(PREFIX, std::path::Path::new(DIR));
            removed.extend(crate::topo_cleanup(INCIDENT_PREFIX, std::path::Path::new(INCIDENT_DIR)));
            removed.extend(crate::topo_cleanup(CHAOS_PREFIX, std::path::Path::new(CHAOS_DIR)));
            removed.extend(crate::topo_cleanup(CLUSTER_PREFIX, std::path::Path::new(CLUSTER_DIR)));
            removed.extend(crate::topo_cleanup(FLOOD_PREFIX, std::path::Path::new(FLOOD_DIR)));
            removed.extend(crate::topo_cleanup(crate::drill::PREFIX, std::path::Path::new(crate::drill::DIR)));
            if removed.is_empty() {
                outln!("no lab found: nothing to remove");
            }
            for what in removed {
                outln!("removed {what}");
            }
            Ok(())
        }
        LabCmd::Load { rate, concurrency, duration, hold, delay_ms, timeout, ipv6, json } => {
            let lab = Lab::attach(std::path::Path::new(DIR)).map_err(lab_err)?;
            let spec =
                load::LoadSpec { rate: *rate, concurrency: *concurrency, duration: *duration, hold: *hold, delay_ms: *delay_ms, timeout: *timeout, v6: *ipv6, targets: Vec::new() };
            let counters = Arc::new(load::Counters::default());
            let started = Instant::now();
            let done = std::sync::atomic::AtomicBool::new(false);
            let report = std::thread::scope(|s| {
                if !*json {
                    s.spawn(|| {
                        while !done.load(std::sync::atomic::Ordering::Relaxed) {
                            std::thread::sleep(Duration::from_secs(1));
                            eprintln!("{}", counters.line(started.elapsed()));
                        }
                    });
                }
                let r = load::run(&lab, &spec, &counters);
                done.store(true, std::sync::atomic::Ordering::Relaxed);
                r
            })
            .map_err(lab_err)?;
            if *json {
                outln!("{}", serde_json::to_string_pretty(&report).expect("json"));
            } else {
                outln!(
                    "{} connections in {:.1} s: ok {}, refused (RST) {}, timeout {}, error {}\nlatency of ok: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms\nper backend: {:?}",
                    report.ok + report.refused + report.timeout + report.error,
                    report.elapsed_s,
                    report.ok,
                    report.refused,
                    report.timeout,
                    report.error,
                    report.p50_ms,
                    report.p90_ms,
                    report.p99_ms,
                    report.max_ms,
                    report.backends
                );
                for e in &report.errors {
                    outln!("error: {e}");
                }
            }
            Ok(())
        }
        LabCmd::Incident { report } => {
            let (prefix, dir) = place(INCIDENT_PREFIX, INCIDENT_DIR);
            cleanup_on_signal(prefix, dir);
            let lab = Lab::up(spec(prefix, dir, 3, 2, Mode::L2dsr)).map_err(lab_err)?;
            let passed = incident::run(&lab, &incident::Options { report_dir: report.clone() });
            lab.down();
            if passed.map_err(lab_err)? {
                outln!("incident replay: every expectation held");
                Ok(())
            } else {
                Err(Error::other("incident replay", anyhow::anyhow!("some expectations did not hold (see above)")))
            }
        }
        LabCmd::Chaos { duration, seed, rate, mode, json } => {
            let (prefix, dir) = place(CHAOS_PREFIX, CHAOS_DIR);
            cleanup_on_signal(prefix, dir);
            let lab = Lab::up(spec(prefix, dir, chaos::BACKENDS, 2, *mode)).map_err(lab_err)?;
            let report = chaos::run(&lab, &chaos::Options { duration: *duration, seed: *seed, rate: *rate, ..chaos::Options::default() });
            lab.down();
            verdict("chaos run", &report.map_err(lab_err)?, *json)
        }
        LabCmd::Cluster { nodes, mode, limits: true, json, spill, .. } => {
            let (prefix, dir) = place(CLUSTER_PREFIX, CLUSTER_DIR);
            cleanup_on_signal(prefix, dir);
            let lab = Lab::up(spec(prefix, dir, 1, *nodes, *mode)).map_err(lab_err)?;
            let report = crate::limits::run(&lab, &crate::limits::Options { nodes: *nodes, spill: *spill, ..crate::limits::Options::default() });
            lab.down();
            verdict("cluster limits run", &report.map_err(lab_err)?, *json)
        }
        LabCmd::Cluster { nodes, mode, duration, rate, json, limits: false, .. } => {
            let (prefix, dir) = place(CLUSTER_PREFIX, CLUSTER_DIR);
            cleanup_on_signal(prefix, dir);
            let lab = Lab::up(spec(prefix, dir, cluster::BACKENDS, 2, *mode)).map_err(lab_err)?;
            let opts = cluster::Options { nodes: *nodes, window: (*duration / 6).max(Duration::from_secs(2)), rate: *rate, ..cluster::Options::default() };
            let report = cluster::run(&lab, &opts);
            lab.down();
            verdict("cluster run", &report.map_err(lab_err)?, *json)
        }
        LabCmd::Flood { pps, duration, json } => {
            let (prefix, dir) = place(FLOOD_PREFIX, FLOOD_DIR);
            cleanup_on_signal(prefix, dir);
            let lab = Lab::up(spec(prefix, dir, flood::BACKENDS, 2, Mode::L2dsr)).map_err(lab_err)?;
            let report = flood::run(&lab, &flood::Options { pps: *pps, duration: *duration, ..flood::Options::default() });
            lab.down();
            verdict("SYN flood", &report.map_err(lab_err)?, *json)
        }
        LabCmd::Drill(a) => {
            if a.builds_lab() {
                cleanup_on_signal(crate::drill::PREFIX, crate::drill::DIR);
            }
            crate::drill::run(a)
        }
        LabCmd::Serve { name, port } => lb_userspace::client::block_on(async { crate::serve::serve(name.clone(), *port).await.map_err(|e| Error::other("lab serve", e)) }),
    }
}
