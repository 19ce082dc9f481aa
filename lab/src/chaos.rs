//! `sluice lab chaos`: faults injected at random (seeded, reproducible) into a lab under
//! continuous load — backend crashes and restarts, daemon restarts, crashes and upgrades, config
//! reloads (`config apply` and SIGHUP) that change limits and weights, drains — then the
//! accounting. Every connection's fate is recorded as its client saw it; a connection that
//! broke is explained only by a backend crash while it was open, anything else counts against
//! Sluice. Long-lived connections held through the whole run are the clients' ground truth: after
//! the flow timeouts and one reconciliation period, each backend's shared counter, the flows
//! holding its slots and the clients' open connections to it must be the same number; after the
//! clients close, nothing may be left in the flow table.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::Signal;
use rand::{rngs::StdRng, seq::SliceRandom as _, Rng as _, SeedableRng as _};
use serde::Serialize;

pub use crate::report::{BackendEnd, Check, Verdict};
use crate::{
    backend4,
    probe::{self, Conn, Fate, Release, Shared},
    report::{agreement, backends, end_and_checks_markdown, end_state, refused_total, status, tables},
    topo::{short_timeouts, BackendConf, ServiceOpts, CLOSING_TIMEOUT, ESTABLISHED_TIMEOUT, SYN_TIMEOUT},
    vip, Lab, PORT,
};

pub const BACKENDS: u8 = 3;
/// The daemon's reconciliation period (`daemon::RECONCILE_EVERY` ticks of one second).
const RECONCILE_PERIOD: Duration = Duration::from_secs(10);
/// Limits and weights the reloads choose from; survivors and the short connections' share
/// are of the same order, so some reloads put a backend below what it holds.
const LIMITS: (u32, u32) = (25, 150);
const INITIAL_LIMIT: u32 = 120;

#[derive(Clone, Debug)]
pub struct Options {
    /// How long faults are injected (the load runs as long).
    pub duration: Duration,
    pub seed: u64,
    /// New short connections per second over all clients (each holds 0–1.5 s and asks 1–4 times).
    pub rate: f64,
    /// Connections each client holds open through the whole run.
    pub held_per_client: usize,
    /// Time between two faults (uniform between the bounds).
    pub gap: (Duration, Duration),
}

impl Default for Options {
    fn default() -> Self {
        Self { duration: Duration::from_mins(1), seed: 1, rate: 100.0, held_per_client: 30, gap: (Duration::from_secs(2), Duration::from_secs(4)) }
    }
}

/// The kinds of fault, injected in shuffled rounds so that every kind occurs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// SIGKILL a backend's server (its connections die with it); restarted 2–5 s later.
    BackendCrash,
    /// SIGTERM the daemon and start it again (it adopts the pinned datapath).
    DaemonRestart,
    /// SIGKILL the daemon and start it again.
    DaemonCrash,
    /// Start the daemon from another binary file (the XDP program is replaced in the pinned link).
    DaemonUpgrade,
    /// New limits and weights through `sluice config apply`.
    ConfigApply,
    /// New limits through the file and SIGHUP.
    ConfigReload,
    /// `sluice backend drain`; undrained 2–5 s later.
    Drain,
}

const KINDS: [Kind; 7] = [Kind::BackendCrash, Kind::DaemonRestart, Kind::DaemonCrash, Kind::DaemonUpgrade, Kind::ConfigApply, Kind::ConfigReload, Kind::Drain];

#[derive(Clone, Debug, Serialize)]
pub struct Fault {
    /// Seconds since the load started.
    pub t: f64,
    pub kind: Kind,
    /// Undoing an earlier fault (a crashed server restarted, a drained backend undrained).
    pub undo: bool,
    /// The backend it hit, if one.
    pub backend: Option<u8>,
    pub detail: String,
    /// Whether the fault (or its undoing) did what it should; the error if not.
    pub error: Option<String>,
}

impl Fault {
    fn line(&self) -> String {
        let what = if self.undo { format!("{:?} undone", self.kind) } else { format!("{:?}", self.kind) };
        format!("{what}: {}{}", self.detail, self.error.as_ref().map(|e| format!(" — FAILED: {e}")).unwrap_or_default())
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub seed: u64,
    pub mode: String,
    pub duration_s: f64,
    pub faults: Vec<Fault>,
    pub faults_by_kind: BTreeMap<Kind, u64>,
    /// Connections opened (handshake completed).
    pub connections: u64,
    /// Connections that got at least one answer.
    pub carried: u64,
    /// Answers received.
    pub requests: u64,
    /// Short connections closed by their client with every request answered.
    pub completed: u64,
    /// Held connections opened at the start / still open at the end.
    pub held: u64,
    pub held_survived: u64,
    /// Refused at connect (a RST: Sluice's limits, or a crashed backend's kernel).
    pub refused: u64,
    /// Refusals Sluice counted with a reason during the run.
    pub refused_by_sluice: u64,
    /// No answer to the SYN, or another connect error.
    pub connect_failed: u64,
    /// Broken while a backend they could have been on crashed.
    pub broken_by_backend_crash: u64,
    /// Broken with no backend crash to explain it: Sluice's fault. Must be 0.
    pub broken: u64,
    /// The first few unexplained breaks and failed connects.
    pub broken_examples: Vec<String>,
    /// Connections the daemon's reconciliation corrected during the run.
    pub drift_corrected: u64,
    /// The daemon's state lock over every daemon of the run (each restart starts its counts
    /// again): the longest hold and where, the holds over 10 ms and 100 ms.
    pub state_lock: lb_userspace::daemon::LockReport,
    pub end: Vec<BackendEnd>,
    /// Flows / slots left after the clients closed and the timeouts passed. Must be 0.
    pub leaked_flows: u64,
    pub leaked_slots: u64,
    pub checks: Vec<Check>,
}

impl Verdict for Report {
    fn checks(&self) -> &[Check] {
        &self.checks
    }

    /// The report as markdown (also what `sluice lab chaos` prints).
    fn markdown(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(s, "# Chaos run: seed {}, {} mode, {:.0} s of faults under load\n", self.seed, self.mode, self.duration_s);
        let _ = writeln!(s, "| figure | value |\n|---|---|");
        let kinds: Vec<String> =
            self.faults_by_kind.iter().map(|(k, n)| format!("{n} {}", serde_json::to_value(k).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default())).collect();
        let rows: [(&str, String); 15] = [
            ("faults injected", format!("{} ({})", self.faults.len(), kinds.join(", "))),
            ("connections opened", self.connections.to_string()),
            ("connections carried (answered at least once)", self.carried.to_string()),
            ("requests answered", self.requests.to_string()),
            ("short connections completed", self.completed.to_string()),
            ("held through the whole run", format!("{} of {}", self.held_survived, self.held)),
            ("refused at connect (RST)", self.refused.to_string()),
            ("  of which counted by Sluice with a reason", self.refused_by_sluice.to_string()),
            ("connect failed (no answer to the SYN, or another error)", self.connect_failed.to_string()),
            ("broken by a backend crash", self.broken_by_backend_crash.to_string()),
            ("**broken otherwise (Sluice)**", format!("**{}**", self.broken)),
            ("drift corrected by reconciliation during the run", self.drift_corrected.to_string()),
            (
                "the daemons' state lock",
                format!(
                    "longest hold {:.1} ms ({}), {} holds over 10 ms and {} over 100 ms of {}",
                    self.state_lock.longest_ms, self.state_lock.longest_at, self.state_lock.over_10ms, self.state_lock.over_100ms, self.state_lock.holds
                ),
            ),
            ("leaked flows after the timeouts", self.leaked_flows.to_string()),
            ("leaked connection slots", self.leaked_slots.to_string()),
        ];
        for (k, v) in rows {
            let _ = writeln!(s, "| {k} | {v} |");
        }
        let _ = writeln!(s, "\nAfter the load, the timeouts and one reconciliation period:");
        end_and_checks_markdown(&mut s, &self.end, &self.checks);
        let _ = writeln!(s, "\nFaults:\n");
        for f in &self.faults {
            let _ = writeln!(s, "- {:>6.1}s {}", f.t, f.line());
        }
        for e in &self.broken_examples {
            let _ = writeln!(s, "- {e}");
        }
        s
    }
}

/// The attached XDP program's id (`prog/xdp id N` in `ip link show`).
fn xdp_prog_id(lab: &Lab) -> Option<u64> {
    let out = std::process::Command::new("ip").args(["-n", &lab.ns("lb"), "link", "show", "lb0"]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rest = &text[text.find("prog/xdp id ")? + "prog/xdp id ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// The fault injector's view of the lab.
struct Injector<'a> {
    lab: &'a Lab,
    rng: StdRng,
    limits: [u32; BACKENDS as usize],
    weights: [u32; BACKENDS as usize],
    /// Servers killed / backends drained, with when to undo it.
    crashed: Vec<(Instant, u8)>,
    drained: Vec<(Instant, u8)>,
    upgraded: PathBuf,
    /// Counter corrections by the daemons stopped so far.
    drift_corrected: u64,
    state_lock: lb_userspace::daemon::LockReport,
}

impl Injector<'_> {
    fn config(&self) -> String {
        let conf: Vec<BackendConf> = (1..=BACKENDS).map(|n| BackendConf { n, max_conns: self.limits[usize::from(n - 1)], weight: self.weights[usize::from(n - 1)] }).collect();
        // The faults lower limits and drain backends under load on purpose: the guard warns only.
        self.lab.config_text(&conf, &ServiceOpts::default(), |c| {
            c.flows.timeouts = short_timeouts();
            c.guard.enforce = false;
        })
    }

    fn sluice(&self, args: &[&str]) -> Result<String> {
        let out = std::process::Command::new(&self.lab.spec.sluice).arg("--socket").arg(self.lab.socket()).args(args).output().context("running sluice")?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            bail!("sluice {}: {}", args.join(" "), text.trim());
        }
        Ok(text)
    }

    /// Waits until the daemon's status shows the configured limits and weights.
    fn wait_applied(&self) -> Result<()> {
        self.lab.wait("the daemon to show the new limits", Duration::from_secs(5), || {
            let st = status(self.lab)?;
            Ok(backends(&st).iter().all(|b| {
                let n = (1..=BACKENDS).find(|n| b.address == IpAddr::V4(backend4(*n)));
                n.is_some_and(|n| b.max_conns == self.limits[usize::from(n - 1)] && b.weight == self.weights[usize::from(n - 1)])
            }))
        })
    }

    /// Starts the daemon (from `bin`) and checks that it adopted the running datapath.
    fn start_daemon(&self, bin: &Path) -> Result<String> {
        let before = xdp_prog_id(self.lab);
        self.lab.start_daemon_with(bin)?;
        self.lab.wait("the daemon to adopt the datapath", Duration::from_secs(10), || {
            std::fs::read_to_string(self.lab.spec.dir.join("daemon.log")).is_ok_and(|l| l.contains("adopted the running datapath"))
        })?;
        let after = xdp_prog_id(self.lab);
        if before.is_none() || before == after {
            bail!("the XDP program was not replaced (id before {before:?}, after {after:?})");
        }
        Ok(format!("adopted; XDP program {} → {}", before.unwrap_or(0), after.unwrap_or(0)))
    }

    /// Injects one fault: what was done, and to which backend.
    fn inject(&mut self, kind: Kind) -> Result<(String, Option<u8>)> {
        let later = Instant::now() + Duration::from_millis(self.rng.random_range(2000..=5000));
        match kind {
            Kind::BackendCrash => {
                let up: Vec<u8> = (1..=BACKENDS).filter(|n| !self.crashed.iter().any(|(_, c)| c == n)).collect();
                // Keep one server up: with all crashed there is nothing left to break.
                if up.len() <= 1 {
                    return Ok(("skipped: every other backend is down".into(), None));
                }
                let n = up[self.rng.random_range(0..up.len())];
                if !self.lab.kill_server(n) {
                    bail!("backend-{n}'s server was not running");
                }
                self.crashed.push((later, n));
                Ok((format!("SIGKILL backend-{n}'s server"), Some(n)))
            }
            Kind::DaemonRestart | Kind::DaemonCrash | Kind::DaemonUpgrade => {
                let sig = if kind == Kind::DaemonCrash { Signal::SIGKILL } else { Signal::SIGTERM };
                // Corrections the daemon made so far (they live in its memory).
                if let Ok(st) = status(self.lab) {
                    self.drift_corrected += st.drift_corrected;
                    add_lock(&mut self.state_lock, &st.state_lock);
                }
                if !self.lab.stop("daemon", sig) {
                    bail!("the daemon was not running");
                }
                let bin = if kind == Kind::DaemonUpgrade {
                    // Another binary file: a real upgrade swaps the file, then restarts.
                    let _ = std::fs::remove_file(&self.upgraded);
                    std::fs::copy(&self.lab.spec.sluice, &self.upgraded).context("copying the binary")?;
                    self.upgraded.clone()
                } else {
                    self.lab.spec.sluice.clone()
                };
                let how = self.start_daemon(&bin)?;
                Ok((format!("{sig:?}, started {}: {how}", bin.display()), None))
            }
            Kind::ConfigApply | Kind::ConfigReload => {
                for l in &mut self.limits {
                    *l = self.rng.random_range(LIMITS.0..=LIMITS.1);
                }
                if kind == Kind::ConfigApply {
                    for w in &mut self.weights {
                        *w = self.rng.random_range(1..=3);
                    }
                }
                self.lab.write_config(&self.config())?;
                if kind == Kind::ConfigApply {
                    self.sluice(&["config", "apply", &self.lab.config_path().to_string_lossy()])?;
                } else {
                    let pid: i32 = std::fs::read_to_string(self.lab.spec.dir.join("daemon.pid")).context("daemon.pid")?.trim().parse().context("daemon.pid")?;
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGHUP).context("SIGHUP")?;
                }
                self.wait_applied()?;
                Ok((format!("max_conns {:?}, weights {:?}", self.limits, self.weights), None))
            }
            Kind::Drain => {
                let live: Vec<u8> = (1..=BACKENDS).filter(|n| !self.drained.iter().any(|(_, d)| d == n)).collect();
                if live.len() <= 1 {
                    return Ok(("skipped: every other backend is drained".into(), None));
                }
                let n = live[self.rng.random_range(0..live.len())];
                self.sluice(&["backend", "drain", "web", &backend4(n).to_string()])?;
                self.drained.push((later, n));
                Ok((format!("drained backend-{n}"), Some(n)))
            }
        }
    }

    /// Undoes what is due (or everything): restarts crashed servers, undrains.
    fn restore(&mut self, all: bool, t: f64) -> Vec<Fault> {
        let now = Instant::now();
        let mut done = Vec::new();
        let (due, keep): (Vec<_>, Vec<_>) = self.crashed.drain(..).partition(|(t, _)| all || *t <= now);
        self.crashed = keep;
        for (_, n) in due {
            let err = self.lab.start_server(n).err().map(|e| e.to_string());
            done.push(Fault { t, kind: Kind::BackendCrash, undo: true, backend: Some(n), detail: format!("restarted backend-{n}'s server"), error: err });
        }
        let (due, keep): (Vec<_>, Vec<_>) = self.drained.drain(..).partition(|(t, _)| all || *t <= now);
        self.drained = keep;
        for (_, n) in due {
            // Idempotent: a reload since the drain may have reset it already.
            let err = self.sluice(&["backend", "undrain", "web", &backend4(n).to_string()]).err().map(|e| e.to_string());
            done.push(Fault { t, kind: Kind::Drain, undo: true, backend: Some(n), detail: format!("undrained backend-{n}"), error: err });
        }
        done
    }
}

/// Runs the chaos in `lab` (built with `BACKENDS` backends, servers on, no daemon yet).
#[expect(clippy::too_many_lines, reason = "the run reads top to bottom")]
pub fn run(lab: &Lab, opts: &Options) -> Result<Report> {
    if lab.spec.backends != BACKENDS {
        bail!("the chaos run needs a lab with {BACKENDS} backends");
    }
    let mut inj = Injector {
        lab,
        rng: StdRng::seed_from_u64(opts.seed),
        limits: [INITIAL_LIMIT; BACKENDS as usize],
        weights: [1; BACKENDS as usize],
        crashed: Vec::new(),
        drained: Vec::new(),
        upgraded: lab.spec.dir.join("sluice-upgraded"),
        drift_corrected: 0,
        state_lock: Default::default(),
    };
    lab.write_config(&inj.config())?;
    lab.start_daemon()?;
    let refused_before = refused_total(&status(lab)?);
    let sh = Shared::new();
    let clients = lab.spec.clients;
    let addr = SocketAddr::new(vip(false), PORT);
    // Progress on stderr: stdout carries the report (JSON with --json).
    let say = |line: String| eprintln!("[{:>6.1}s] {line}", sh.now());
    let mut faults: Vec<Fault> = Vec::new();
    let mut end = Vec::new();
    let (mut leaked_flows, mut leaked_slots) = (0, 0);
    let mut checks: Vec<Check> = Vec::new();

    let conns: Vec<Conn> = std::thread::scope(|s| -> Result<Vec<Conn>> {
        let release = Release(&sh);
        let load = probe::Load { rate: opts.rate, held_per_client: opts.held_per_client, seed: opts.seed };
        let running = probe::start(s, lab, clients, addr, &sh, load);
        let held = opts.held_per_client * usize::from(clients);
        lab.wait("the held connections to open", Duration::from_secs(30), || sh.opened.load(Ordering::Relaxed) >= held)?;
        say(format!(
            "{held} held connections open; load at {} new connections/s for {:?}, faults every {:?}–{:?} (seed {})",
            opts.rate, opts.duration, opts.gap.0, opts.gap.1, opts.seed
        ));
        let load_until = sh.t0.elapsed() + opts.duration;
        sh.load_until_ms.store(load_until.as_millis() as u64, Ordering::Relaxed);
        sh.go.store(true, Ordering::Relaxed);

        // Faults until shortly before the load ends, so the last ones are undone under load.
        let stop_faults = load_until.saturating_sub(Duration::from_secs(6));
        let mut round: Vec<Kind> = Vec::new();
        let mut next = sh.t0.elapsed() + Duration::from_secs(1);
        while sh.t0.elapsed() < stop_faults {
            for f in inj.restore(false, sh.now()) {
                say(f.line());
                faults.push(f);
            }
            if sh.t0.elapsed() >= next {
                if round.is_empty() {
                    round = KINDS.to_vec();
                    round.shuffle(&mut inj.rng);
                }
                let kind = round.pop().expect("a kind");
                let t = sh.now();
                let f = match inj.inject(kind) {
                    Ok((detail, backend)) => Fault { t, kind, undo: false, backend, detail, error: None },
                    Err(e) => Fault { t, kind, undo: false, backend: None, detail: String::new(), error: Some(format!("{e:#}")) },
                };
                say(f.line());
                faults.push(f);
                next = sh.t0.elapsed() + Duration::from_secs_f64(inj.rng.random_range(opts.gap.0.as_secs_f64()..=opts.gap.1.as_secs_f64()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for f in inj.restore(true, sh.now()) {
            say(f.line());
            faults.push(f);
        }
        lab.wait("the short connections to finish", opts.duration + Duration::from_secs(30), || sh.short_done.load(Ordering::Relaxed) >= usize::from(clients))?;
        say("load stopped; the held connections stay open".into());

        // The flows of connections that died with a backend expire; then one reconciliation
        // period; then counters, flows and the clients' open connections must agree.
        std::thread::sleep(ESTABLISHED_TIMEOUT.max(SYN_TIMEOUT) + Duration::from_secs(2) + RECONCILE_PERIOD);
        // The clients' side is filled in once they have handed back their records.
        end = end_state(lab, |_| 0)?;
        let ids: Vec<u32> = end.iter().map(|b| b.id).collect();
        drop(release);
        say("closing the held connections".into());
        let conns = running.join()?;
        // Closed connections release their slots at once; their flows go after the closing
        // timeout (and SYN_SEEN ones of refused SYNs after the SYN timeout) at the next sweep.
        let deadline = Instant::now() + CLOSING_TIMEOUT.max(SYN_TIMEOUT) + Duration::from_secs(5);
        loop {
            let t = tables(&lab.pin_dir(), &ids)?;
            (leaked_flows, leaked_slots) = (t.flows, t.counters.values().sum());
            if (leaked_flows == 0 && leaked_slots == 0) || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(conns)
    })?;

    // The clients' side of the end state: held connections still open, per backend.
    for b in &mut end {
        b.clients = conns.iter().filter(|c| matches!(c.fate, Fate::Survived) && c.backend.is_some_and(|n| IpAddr::V4(backend4(n)) == b.backend)).count() as u64;
    }
    let agreed = agreement("after one reconciliation period, counters = flows = what the clients hold", &end);
    let st = status(lab)?;
    let drift_corrected = inj.drift_corrected + st.drift_corrected;
    let mut state_lock = inj.state_lock.clone();
    add_lock(&mut state_lock, &st.state_lock);
    let refused_by_sluice = refused_total(&st) - refused_before;

    let kills: Vec<(f64, u8)> = faults.iter().filter(|f| f.kind == Kind::BackendCrash && !f.undo).filter_map(|f| Some((f.t, f.backend?))).collect();
    // Broken while its backend (any backend, if none answered yet) crashed: the crash's doing.
    let by_crash = |c: &Conn| kills.iter().any(|(t, n)| c.backend.is_none_or(|b| b == *n) && *t >= c.start - 0.1 && *t <= c.end + 0.1);
    let count = |f: &dyn Fn(&Conn) -> bool| conns.iter().filter(|c| f(c)).count() as u64;
    let broken_examples: Vec<String> = conns
        .iter()
        .filter(|c| matches!(c.fate, Fate::Broken(_)) && !by_crash(c))
        .take(10)
        .map(|c| {
            format!(
                "{} connection opened at {:.1}s to {}, {} answers, broke at {:.1}s: {}",
                if c.held { "held" } else { "short" },
                c.start,
                c.backend.map_or("?".into(), |n| format!("backend-{n}")),
                c.answers,
                c.end,
                c.fate.why()
            )
        })
        .chain(conns.iter().filter(|c| matches!(c.fate, Fate::ConnectFailed(_))).take(5).map(|c| format!("connect at {:.1}s failed: {}", c.start, c.fate.why())))
        .collect();
    let mut faults_by_kind = BTreeMap::new();
    for f in faults.iter().filter(|f| !f.undo && f.error.is_none() && !f.detail.starts_with("skipped")) {
        *faults_by_kind.entry(f.kind).or_insert(0) += 1;
    }
    let mut report = Report {
        seed: opts.seed,
        mode: format!("{:?}", lab.spec.mode).to_lowercase(),
        duration_s: opts.duration.as_secs_f64(),
        faults_by_kind,
        connections: count(&|c| !matches!(c.fate, Fate::Refused | Fate::ConnectFailed(_))),
        carried: count(&|c| c.answers > 0),
        requests: conns.iter().map(|c| u64::from(c.answers)).sum(),
        completed: count(&|c| matches!(c.fate, Fate::Completed)),
        held: count(&|c| c.held),
        held_survived: count(&|c| matches!(c.fate, Fate::Survived)),
        refused: count(&|c| matches!(c.fate, Fate::Refused)),
        refused_by_sluice,
        connect_failed: count(&|c| matches!(c.fate, Fate::ConnectFailed(_))),
        broken_by_backend_crash: count(&|c| matches!(c.fate, Fate::Broken(_)) && by_crash(c)),
        broken: count(&|c| matches!(c.fate, Fate::Broken(_)) && !by_crash(c)),
        broken_examples,
        drift_corrected,
        state_lock,
        end,
        leaked_flows,
        leaked_slots,
        checks: Vec::new(),
        faults,
    };
    let mut check = |what: &str, ok: bool, detail: String| checks.push(Check { what: what.into(), ok, detail });
    let failed: Vec<String> = report.faults.iter().filter_map(|f| f.error.as_ref().map(|e| format!("{:.1}s {:?}: {e}", f.t, f.kind))).collect();
    check("every fault took effect", failed.is_empty(), if failed.is_empty() { format!("{} faults and undos", report.faults.len()) } else { failed.join("; ") });
    let missing: Vec<String> = KINDS.iter().filter(|k| !report.faults_by_kind.contains_key(k)).map(|k| format!("{k:?}")).collect();
    check("every kind of fault occurred", missing.is_empty(), if missing.is_empty() { "all 7 kinds".into() } else { format!("missing: {}", missing.join(", ")) });
    check(
        "no connection broken except by its backend's crash",
        report.broken == 0,
        format!("{} broken otherwise, {} by crashes, of {} connections", report.broken, report.broken_by_backend_crash, report.connections),
    );
    check("the SYN of every connection was answered", report.connect_failed == 0, format!("{} connects without an answer or with another error", report.connect_failed));
    // Every held connection still open must be on a backend of the service.
    let all_placed = report.end.iter().map(|b| b.clients).sum::<u64>() == report.held_survived;
    check(&agreed.what, agreed.ok && all_placed, agreed.detail);
    check("no flow or slot left after the timeouts", report.leaked_flows == 0 && report.leaked_slots == 0, format!("{} flows, {} slots", report.leaked_flows, report.leaked_slots));
    report.checks = checks;
    Ok(report)
}

/// One daemon's lock counts added to the run's.
fn add_lock(run: &mut lb_userspace::daemon::LockReport, one: &lb_userspace::daemon::LockReport) {
    if one.longest_ms > run.longest_ms {
        run.longest_ms = one.longest_ms;
        run.longest_at.clone_from(&one.longest_at);
    }
    run.holds += one.holds;
    run.over_10ms += one.over_10ms;
    run.over_100ms += one.over_100ms;
}
