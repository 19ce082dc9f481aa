//! The drill's scenarios: one fault each, injected the way it happens in production (a
//! colleague's forced config change, `sluice backend drain` left in place, a crashed backend
//! server, a SYN flood from spoofed addresses, a slow backend), with the lab's own primitives
//! (`topo.rs`, `flood.rs`, the `sluice` CLI). What the drill does itself once the cause is named,
//! when the fix is not the load balancer's (a backend's team restarts it, the network team
//! filters a flood).

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    thread::Scope,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use rand::{rngs::StdRng, Rng as _};
use serde::Serialize;

use super::{answer::Cause, responder::set_backend_key, users};
use crate::{
    backend4, flood,
    topo::{BackendConf, ServiceOpts},
    Lab, PORT,
};

/// The lab's backends.
pub const BACKENDS: u8 = 3;
/// Each backend's `max_conns` at the start: the users keep ~`RATE × HOLD / 3` = 150 open on
/// each, so it has room (3.5 σ), but two backends cannot carry the third's share (N-1).
pub const LIMIT: u32 = 195;
/// The flow table: twice what the users keep in it (their open connections and the closing
/// ones for `closing` = 1 s).
pub const FLOW_CAPACITY: u32 = 1200;
/// The slow backend answers after this (users give up after `users::TIMEOUT`).
const SLOW: Duration = Duration::from_secs(3);
/// The SYN flood's rate: far more than the slots the SYN timeout frees per second.
const FLOOD_PPS: u32 = 1000;

/// One scenario of `sluice lab drill --list`.
pub struct Scenario {
    pub cause: Cause,
    /// One line for `--list`.
    pub about: &'static str,
    /// The alerts it trains (docs/RUNBOOK.md sections).
    pub alerts: &'static [&'static str],
    /// The commands that find it fastest.
    pub fastest: &'static [&'static str],
    /// What the drill does once the cause is named, when the fix is not the load balancer's.
    pub healed_by: Option<&'static str>,
    /// Runs in a cluster lab (two nodes behind a router's ECMP, `drill/cluster.rs`).
    pub cluster: bool,
}

impl Scenario {
    pub fn name(&self) -> &'static str {
        self.cause.name()
    }
}

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        cause: Cause::LimitTooLow,
        about: "a colleague forces a config change that lowers max_conns below the load (the 2023-05-05 incident)",
        alerts: &["SluiceRefusingConnections", "SluiceBackendAtLimit", "SluiceServiceSaturated"],
        fastest: &["sluice status", "sluice timeline --journal FILE", "sluice config review", "sluice backend set-limit web ADDR N"],
        healed_by: None,
        cluster: false,
    },
    Scenario {
        cause: Cause::BackendDown,
        about: "a backend's server crashes; the others cannot carry its share (N-1)",
        alerts: &["SluiceRefusingConnections", "SluiceBackendAtLimit", "SluiceNoHealthyBackend"],
        fastest: &["sluice status", "sluice timeline --journal FILE", "sluice config review"],
        healed_by: Some("the backend's team restarts its server"),
        cluster: false,
    },
    Scenario {
        cause: Cause::BackendDrained,
        about: "a backend drained for maintenance is left drained; the others cannot carry its share",
        alerts: &["SluiceRefusingConnections", "SluiceBackendAtLimit"],
        fastest: &["sluice status", "sluice timeline --journal FILE", "sluice backend undrain web ADDR"],
        healed_by: None,
        cluster: false,
    },
    Scenario {
        cause: Cause::FlowTableFull,
        about: "a config change makes closed connections linger in the flow table until it is full",
        alerts: &["SluiceFlowTableNearFull", "SluiceRefusingConnections"],
        fastest: &["sluice status", "sluice events", "sluice config apply FILE (shorter flows.timeouts)"],
        healed_by: None,
        cluster: false,
    },
    Scenario {
        cause: Cause::SynFlood,
        about: "a spoofed-source SYN flood holds every backend's connection slots",
        alerts: &["SluiceRefusingConnections", "SluiceServiceSaturated", "SluiceBackendAtLimit"],
        fastest: &["sluice status", "sluice events", "sluice timeline --journal FILE (no change)"],
        healed_by: Some("the network team filters the flood upstream"),
        cluster: false,
    },
    Scenario {
        cause: Cause::HealthCheckWrong,
        about: "a config change points the health checks at a port nothing listens on: every backend is out of the ring",
        alerts: &["SluiceNoHealthyBackend", "SluiceRefusingConnections"],
        fastest: &["sluice status", "sluice timeline --journal FILE", "sluice config apply FILE (the health check's port)"],
        healed_by: None,
        cluster: false,
    },
    Scenario {
        cause: Cause::WeightWrong,
        about: "a config change gives one backend four times the others' weight; it reaches its limit while they idle",
        alerts: &["SluiceRefusingConnections", "SluiceBackendAtLimit"],
        fastest: &["sluice status", "sluice timeline --journal FILE", "sluice config apply FILE (the weight)"],
        healed_by: None,
        cluster: false,
    },
    Scenario {
        cause: Cause::NotTheLoadBalancer,
        about: "a backend answers slowly; the load balancer admits and forwards everything (rule it out)",
        alerts: &[],
        fastest: &["sluice status (nothing refused, every backend active)", "sluice events (none)", "sluice timeline --journal FILE (no change)"],
        healed_by: Some("the backend's team fixes its slow server"),
        cluster: false,
    },
    Scenario {
        cause: Cause::NodeWithdrawn,
        about: "(cluster of two) a node drained for a maintenance is left drained; the other node's limits cannot carry it all",
        alerts: &["SluiceRefusingConnections", "SluiceBackendAtLimit"],
        fastest: &["sluice status on every node (cluster: drained, announced)", "sluice timeline --journal FILE", "sluice node undrain"],
        healed_by: None,
        cluster: true,
    },
];

pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name() == name)
}

/// The config every scenario starts from.
pub fn baseline(lab: &Lab) -> String {
    let conf: Vec<BackendConf> = (1..=BACKENDS).map(|n| BackendConf { n, max_conns: LIMIT, weight: 1 }).collect();
    lab.config_text(&conf, &ServiceOpts::default(), |c| {
        c.flows.capacity = FLOW_CAPACITY;
        let s = Duration::from_secs;
        c.flows.timeouts = lb_userspace::config::Timeouts { syn: s(3), established: s(10), closing: s(1), udp: s(10) };
        c.alerts.name = Some("lab-lb".into());
        (c.alerts.interval, c.alerts.fire_after, c.alerts.resolve_after) = (s(1), s(2), s(3));
        // The users keep ~77 % of max_conns open: near the limit only past the usual swings.
        c.alerts.near_limit_ratio = 0.95;
    })
}

/// The fault as injected (revealed at the end).
#[derive(Clone, Debug, Serialize)]
pub struct Fault {
    pub what: String,
    /// The backend it is about, if one.
    pub backend: Option<IpAddr>,
    /// The cluster node it is about, if one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip)]
    pub n: Option<u8>,
}

/// Threads a fault runs (the flood, the slow server) and their off switches.
#[derive(Default)]
pub struct Running {
    flood: AtomicBool,
    slow: AtomicBool,
    /// The slow server holds the port.
    slow_up: AtomicBool,
}

impl Running {
    /// Stops the flood and the slow server (their threads end within a second).
    pub fn off(&self) {
        self.flood.store(false, Ordering::Relaxed);
        self.slow.store(false, Ordering::Relaxed);
    }
}

/// `sluice --socket S args…` as the colleague who makes the change types it.
fn sluice(lab: &Lab, args: &[&str]) -> Result<String> {
    let out = Command::new(&lab.spec.sluice).arg("--socket").arg(lab.socket()).args(args).output().context("running sluice")?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("sluice {}: {text}", args.join(" "));
    }
    Ok(text)
}

/// Edits the running config file and applies it (`--force`: the colleague is sure).
fn change_config(lab: &Lab, edit: impl FnOnce(&str) -> String) -> Result<()> {
    let path = lab.config_path();
    let text = std::fs::read_to_string(&path)?;
    lab.write_config(&edit(&text))?;
    sluice(lab, &["config", "apply", &path.display().to_string(), "--force"])?;
    Ok(())
}

impl Scenario {
    /// Injects the fault into `lab` (its daemon running the baseline, users under way).
    #[expect(clippy::too_many_lines, reason = "one arm per scenario")]
    pub fn inject<'s>(&'static self, s: &'s Scope<'s, '_>, lab: &'s Lab, running: &'s Running, rng: &mut StdRng) -> Result<Fault> {
        let n: u8 = rng.random_range(1..=BACKENDS);
        let addr = IpAddr::V4(backend4(n));
        match self.cause {
            Cause::LimitTooLow => {
                let all = rng.random_bool(0.5);
                let low: u32 = if all { rng.random_range(70..=110) } else { rng.random_range(30..=60) };
                change_config(lab, |t| {
                    let mut t = t.to_owned();
                    for b in 1..=BACKENDS {
                        if all || b == n {
                            t = set_backend_key(&t, IpAddr::V4(backend4(b)), "max_conns", &low.to_string());
                        }
                    }
                    t
                })?;
                let whom = if all { "every backend".to_owned() } else { format!("backend {addr}") };
                Ok(Fault {
                    what: format!("a colleague forced `sluice config apply --force` of a file that lowers max_conns {LIMIT} → {low} on {whom}"),
                    backend: (!all).then_some(addr),
                    n: (!all).then_some(n),
                    node: None,
                })
            }
            Cause::BackendDown => {
                lab.kill_server(n);
                Ok(Fault { what: format!("backend {addr}'s server crashed (SIGKILL)"), backend: Some(addr), n: Some(n), node: None })
            }
            Cause::BackendDrained => {
                sluice(lab, &["backend", "drain", "web", &addr.to_string(), "--force"])?;
                Ok(Fault {
                    what: format!("`sluice backend drain web {addr} --force` for a maintenance (over the guard's objection), never undrained"),
                    backend: Some(addr),
                    n: Some(n),
                    node: None,
                })
            }
            Cause::FlowTableFull => {
                change_config(lab, |t| t.replacen("closing = \"1s\"", "closing = \"10m\"", 1))?;
                Ok(Fault {
                    what: "a config change set flows.timeouts.closing = \"10m\" (from 1s): closed connections stay in the flow table".into(),
                    backend: None,
                    n: None,
                    node: None,
                })
            }
            Cause::SynFlood => {
                let lb_mac = lab.run_in("lb", || flood::link("lb0"))??.0;
                let seed: u64 = rng.random();
                running.flood.store(true, Ordering::Relaxed);
                s.spawn(move || {
                    let mut k = 0u64;
                    while running.flood.load(Ordering::Relaxed) {
                        let opts = flood::Options { pps: FLOOD_PPS, duration: Duration::from_millis(500), seed: seed + k };
                        k += 1;
                        match lab.run_in("cl2", || flood::send_flood("cl0", lb_mac, &opts)) {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) | Err(e) => {
                                eprintln!("drill: the flood failed: {e:#}");
                                return;
                            }
                        }
                    }
                });
                Ok(Fault { what: format!("a SYN flood, {FLOOD_PPS} SYN/s from spoofed addresses 198.18.0.128–254"), backend: None, n: None, node: None })
            }
            Cause::HealthCheckWrong => {
                change_config(lab, |t| t.replace("fall = 2\n", "fall = 2\nport = 8080\n"))?;
                Ok(Fault { what: "a config change set the health checks' port to 8080, where nothing listens".into(), backend: None, n: None, node: None })
            }
            Cause::WeightWrong => {
                change_config(lab, |t| set_backend_key(t, addr, "weight", "4"))?;
                Ok(Fault { what: format!("a config change set backend {addr}'s weight 1 → 4"), backend: Some(addr), n: Some(n), node: None })
            }
            Cause::NotTheLoadBalancer => {
                lab.kill_server(n);
                running.slow.store(true, Ordering::Relaxed);
                s.spawn(move || {
                    let served = lab.run_in(&format!("be{n}"), || slow_server(n, &running.slow, &running.slow_up));
                    running.slow_up.store(false, Ordering::Relaxed);
                    if let Err(e) = served.and_then(|r| r) {
                        eprintln!("drill: the slow server failed: {e:#}");
                    }
                });
                lab.wait("the slow server", Duration::from_secs(5), || running.slow_up.load(Ordering::Relaxed))?;
                Ok(Fault {
                    what: format!("backend {addr} answers after {} s (a slow query); users give up after {:.1} s", SLOW.as_secs(), users::TIMEOUT.as_secs_f64()),
                    backend: Some(addr),
                    n: Some(n),
                    node: None,
                })
            }
            Cause::NodeWithdrawn => {
                let socket = super::cluster::socket(lab, 2).display().to_string();
                let out = Command::new(&lab.spec.sluice).args(["--socket", &socket, "node", "drain", "--timeout", "5s"]).output().context("running sluice")?;
                if !out.status.success() {
                    bail!("sluice node drain: {}", String::from_utf8_lossy(&out.stderr));
                }
                Ok(Fault {
                    what: "`sluice node drain` on node n2 for a maintenance, never undrained: the router sends everything to n1".into(),
                    backend: None,
                    node: Some("n2".into()),
                    n: None,
                })
            }
            Cause::ShareExhausted => bail!("{}: no scenario yet", self.name()),
        }
    }

    /// Undoes what the load balancer cannot fix (after the right answer), or whatever is left
    /// of the fault before the next scenario. Returns what was done.
    pub fn heal(&self, lab: &Lab, running: &Running, fault: &Fault) -> Result<()> {
        running.flood.store(false, Ordering::Relaxed);
        running.slow.store(false, Ordering::Relaxed);
        // The slow server notices within 100 ms and closes its port.
        lab.wait("the slow server to stop", Duration::from_secs(5), || !running.slow_up.load(Ordering::Relaxed))?;
        if matches!(self.cause, Cause::BackendDown | Cause::NotTheLoadBalancer) {
            if let Some(n) = fault.n {
                lab.start_server(n)?;
            }
        }
        Ok(())
    }
}

/// A backend's HTTP server that answers `GET /` after `SLOW`, on port `PORT`, until `stop` is
/// cleared. Runs in the backend's namespace (the caller's thread).
fn slow_server(n: u8, on: &AtomicBool, started: &AtomicBool) -> Result<()> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT)).context("binding the slow server")?;
    listener.set_nonblocking(true)?;
    started.store(true, Ordering::Relaxed);
    std::thread::scope(|s| {
        while on.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    s.spawn(move || {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
                        let mut buf = Vec::new();
                        let mut chunk = [0u8; 512];
                        // The request's head.
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match conn.read(&mut chunk) {
                                Ok(0) => return,
                                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) && on.load(Ordering::Relaxed) => {}
                                Err(_) => return,
                            }
                        }
                        let until = std::time::Instant::now() + SLOW;
                        while std::time::Instant::now() < until {
                            if !on.load(Ordering::Relaxed) {
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        let body = format!("backend-{n}\n");
                        let _ = conn.write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len()).as_bytes());
                        // Keep the connection until the client closes it (or the server stops).
                        while on.load(Ordering::Relaxed) {
                            match conn.read(&mut chunk) {
                                Ok(0) => return,
                                Ok(_) => {}
                                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                                Err(_) => return,
                            }
                        }
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    })
}
