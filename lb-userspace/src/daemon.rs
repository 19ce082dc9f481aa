//! The daemon (`sluice run --config FILE`): loads and attaches the datapath, applies the
//! config, reloads it on SIGHUP, and runs GC and counter reconciliation every second.
//! It takes its shutdown signal as an argument, so tests can run it in-process.

use std::{
    net::IpAddr,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use lb_common::{maps, Config as DpConfig, DEFAULT_RING_SLOTS, FRAGMENTS_DROP, FRAGMENTS_PASS, ICMP_ECHO_PASS, ICMP_ECHO_REPLY};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;

use crate::{
    alerts, announce,
    config::{self, parse_mac, Config, Fragments, IcmpEcho, Mode, XdpMode},
    conns::ConnCounters,
    datapath::{AttachMode, Datapath, LoadOptions},
    flowtab::FlowTable,
    gc::{self, Drift, Reconciler, Sweep},
    health, neigh,
    reconcile::{Applied, Change},
    Error,
};

/// How often the reconciliation pass runs, in ticks (one per second).
const RECONCILE_EVERY: u64 = 10;
/// Refusal events trigger an evaluation at most this often (events are rate-limited already);
/// the periodic evaluations do not count, so the first refusal after a quiet spell is always
/// evaluated at once.
const MIN_EVAL_GAP: Duration = Duration::from_millis(100);
/// GC waits this many times as long as its last sweep took (at least a second).
const GC_DUTY_INVERSE: u32 = 20;
const TICK_SLACK: Duration = Duration::from_millis(100);

/// The datapath's load-time options from a config.
pub fn load_options(cfg: &Config) -> LoadOptions {
    let d = &cfg.datapath;
    let gateway = d.gateway_mac.as_deref().and_then(parse_mac);
    let ring_slots: u32 = cfg.services.iter().map(|s| 4 * s.ring_size).sum::<u32>().max(DEFAULT_RING_SLOTS);
    LoadOptions {
        config: DpConfig {
            icmp_echo: match d.icmp_echo {
                IcmpEcho::Reply => ICMP_ECHO_REPLY,
                IcmpEcho::Pass => ICMP_ECHO_PASS,
            },
            fragments: match d.fragments {
                Fragments::Drop => FRAGMENTS_DROP,
                Fragments::Pass => FRAGMENTS_PASS,
            },
            has_gateway: u8::from(gateway.is_some()),
            _pad0: 0,
            events_per_sec: d.events_per_sec,
            gateway_mac: gateway.unwrap_or_default(),
            _pad1: [0; 2],
            encap_src4: d.encap_source_v4.octets(),
            encap_src6: d.encap_source_v6.octets(),
            // The loader sets the flow table's size from `flow_capacity`.
            ..DpConfig::DEFAULT
        },
        flow_capacity: cfg.flows.capacity,
        ring_slots,
    }
}

/// A temporary `max_conns` for one backend.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Override {
    pub max_conns: u32,
    #[serde(skip)]
    pub until: Instant,
    /// When it reverts, RFC 3339.
    pub until_wall: String,
}

/// The config with break-glass limits laid over it.
fn effective(cfg: &Config, overrides: &std::collections::BTreeMap<(String, IpAddr), Override>) -> Config {
    let mut c = cfg.clone();
    for s in &mut c.services {
        for b in &mut s.backends {
            if let Some(o) = overrides.get(&(s.name.clone(), b.address)) {
                b.max_conns = o.max_conns;
            }
        }
    }
    c
}

/// MACs of the `l2dsr` backends whose config gives none, from the neighbour table.
async fn backend_macs(cfg: &Config) -> Result<std::collections::HashMap<IpAddr, [u8; 6]>, Error> {
    let need: Vec<IpAddr> = cfg.services.iter().filter(|s| s.mode == Mode::L2dsr).flat_map(|s| s.backends.iter().filter(|b| b.mac.is_none()).map(|b| b.address)).collect();
    if need.is_empty() {
        return Ok(Default::default());
    }
    neigh::resolve(&need, Duration::from_secs(3)).await
}

/// A cluster node's announcement state, kept by the daemon; `announce.rs` keeps BIRD in step.
pub struct Cluster {
    pub cfg: config::ClusterCfg,
    pub status: Arc<Mutex<announce::Status>>,
    /// Withdrawn on purpose (`sluice node drain`); kept across restarts by a marker file.
    pub drained: bool,
    wanted: tokio::sync::watch::Sender<std::collections::BTreeSet<IpAddr>>,
    wanted_rx: Option<tokio::sync::watch::Receiver<std::collections::BTreeSet<IpAddr>>>,
    /// The peer channel, with `cluster.peers` or `cluster.peer_listen`.
    pub peers: Option<Peers>,
    /// Cluster-wide limits through etcd, with `[cluster.limits]` (`limits.rs`).
    pub limits: Option<Arc<Mutex<crate::limits::Status>>>,
}

/// This node's side of the peer channel (`peers.rs`).
pub struct Peers {
    pub stats: Arc<Mutex<crate::peers::Stats>>,
    key: Vec<u8>,
    tx: mpsc::UnboundedSender<Vec<crate::peers::Moved>>,
    rx: Option<mpsc::UnboundedReceiver<Vec<crate::peers::Moved>>>,
    /// Adopted flows entered since this coarse-clock time are reported next.
    since_ns: u64,
}

/// What a change applies: the next config, and what to do once it is applied.
pub struct Next {
    pub cfg: Config,
    /// Runs after a successful apply, in the same turn.
    pub then: Option<Then>,
}

/// A change's follow-up, run once its config is applied.
pub type Then = Box<dyn FnOnce(&mut State) -> Result<(), Error> + Send>;

impl From<Config> for Next {
    fn from(cfg: Config) -> Self {
        Self { cfg, then: None }
    }
}

/// Everything the daemon owns, shared by its loops and the control API.
pub struct State {
    pub cfg_path: PathBuf,
    pub cfg: Config,
    pub dp: Datapath,
    pub conns: ConnCounters,
    /// The memory-mapped flow table (GC, reconciliation, status).
    pub flows: FlowTable,
    pub applied: Applied,
    pub reconciler: Reconciler,
    pub last_sweep: Sweep,
    next_gc: Instant,
    /// The time between two GC sweeps (the next sweep's horizon for half-open flows).
    gc_gap: Duration,
    pub last_drift: Vec<Drift>,
    pub checks: health::Checks,
    pub alerts: alerts::Engine,
    pub sinks: crate::sinks::Sinks,
    pub events: Option<crate::events::Events>,
    /// Break-glass limits (`sluice limit raise --ttl`): laid over the config until they expire.
    pub overrides: std::collections::BTreeMap<(String, IpAddr), Override>,
    pub journal: crate::journal::Journal,
    /// Alerts firing now, as last notified.
    pub firing: Vec<alerts::Notification>,
    /// The last evaluation refusal events triggered.
    last_event_eval: Option<Instant>,
    /// Refusals arrived within MIN_EVAL_GAP of the last such evaluation: evaluate when it has
    /// passed. Whoever drains (the main loop, an API call) wakes the main loop through
    /// `eval_wakeup`, so a deferred evaluation is never left to the next tick.
    eval_pending: bool,
    eval_wakeup: Arc<tokio::sync::Notify>,
    health_tx: mpsc::UnboundedSender<health::Transition>,
    health_rx: Option<mpsc::UnboundedReceiver<health::Transition>>,
    /// This node's part in a cluster (`[cluster]`): what it announces through BIRD.
    pub cluster: Option<Cluster>,
    /// What the change in progress altered beside the config (a backend's health, a
    /// break-glass limit), to undo if its apply fails.
    #[expect(clippy::type_complexity, reason = "one boxed closure")]
    pending_undo: Option<Box<dyn FnOnce(&mut State) + Send>>,
    /// Held for the whole of one change (edit, MAC resolution, write), so that changes of the
    /// running config are applied one after the other, each to the result of the one before.
    turn: Arc<tokio::sync::Mutex<()>>,
    /// Per backend, peaks of open connections and refusals (`history.rs`), for the guard.
    pub history: crate::history::History,
    /// What the alert sample names each backend by, made once per apply.
    names: alerts::Names,
    /// A reload the guard refused: what it said (`SluiceConfigChangeRefused` fires while set).
    pub change_refused: Option<String>,
}

impl State {
    /// The one path by which the running config changes (API, CLI, SIGHUP, health checks,
    /// break-glass limits and their expiry): waits its turn, lets `edit` derive the next config
    /// from the state as the previous change left it (and change the state beside it: a
    /// backend's health, an override), applies it, then runs the edit's follow-up (e.g. putting
    /// the edited config file in place), all in the same turn. No two changes interleave, so none
    /// is applied to a stale copy and lost. An `edit` that fails changes nothing.
    pub async fn change<E: From<Error>>(state: &Arc<Mutex<Self>>, edit: impl FnOnce(&mut Self) -> Result<Next, E>) -> Result<Vec<Change>, E> {
        let turn = state.lock().expect("state lock").turn.clone();
        let _turn = turn.lock().await;
        let next = edit(&mut state.lock().expect("state lock"))?;
        let changes = match Self::apply(state, next.cfg).await {
            Ok(c) => c,
            Err(e) => {
                let mut st = state.lock().expect("state lock");
                if let Some(undo) = st.pending_undo.take() {
                    undo(&mut st);
                }
                return Err(e.into());
            }
        };
        state.lock().expect("state lock").pending_undo = None;
        if let Some(then) = next.then {
            then(&mut state.lock().expect("state lock"))?;
        }
        Ok(changes)
    }

    /// Applies `cfg` (already validated), resolving the MACs `l2dsr` backends need. Only
    /// [`State::change`] calls it, holding the turn.
    async fn apply(state: &Arc<Mutex<Self>>, cfg: Config) -> Result<Vec<Change>, Error> {
        let macs = backend_macs(&cfg).await?;
        let mut st = state.lock().expect("state lock");
        let st = &mut *st;
        let resolver = |ip: IpAddr| macs.get(&ip).copied();
        let eff = effective(&cfg, &st.overrides);
        let changes = st.applied.apply(&mut st.dp.tables(), &eff, &resolver, |t, id| t.conns(id).unwrap_or(0))?;
        if !changes.is_empty() {
            st.journal.record("config", format!("configuration applied: {} change(s)", changes.len()), changes.iter().map(|c| c.what.clone()).collect());
        }
        st.checks.sync(&cfg, &st.health_tx, &st.applied.down);
        if cfg.alerts != st.cfg.alerts {
            st.alerts = alerts::Engine::new(cfg.alerts.clone());
            st.sinks = crate::sinks::Sinks::start(alerts::Engine::all_webhooks(&cfg.alerts), cfg.alerts.command.clone());
            st.firing.clear();
        }
        st.cfg = cfg;
        st.publish_wanted();
        Ok(changes)
    }

    /// The guard's verdict on changing the running config to `next` (`guard.rs`).
    pub fn guard(&self, next: &Config) -> crate::guard::Verdict {
        let open = |svc: &str, a: IpAddr| self.applied.backend(svc, a).map_or(0, |b| self.conns.get(b.id));
        crate::guard::check(&self.cfg, next, &self.history, &open, crate::history::unix_now(), self.cfg.guard.window)
    }

    /// What to undo if the change in progress fails to apply (inside [`State::change`]'s edit).
    pub fn set_undo(&mut self, undo: Box<dyn FnOnce(&mut State) + Send>) {
        self.pending_undo = Some(undo);
    }

    /// Tells the announcer which VIPs this node should announce now.
    pub fn publish_wanted(&mut self) {
        let servable = announce::servable(&self.applied);
        if let Some(c) = &mut self.cluster {
            let wanted = if c.drained { Default::default() } else { servable };
            {
                let mut s = c.status.lock().expect("status");
                s.wanted.clone_from(&wanted);
                s.drained = c.drained;
            }
            c.wanted.send_if_modified(|w| {
                let changed = *w != wanted;
                *w = wanted;
                changed
            });
        }
    }

    /// Drains (true) or undrains this node: withdraws or announces its VIPs.
    pub fn set_drained(&mut self, drained: bool) -> Result<(), Error> {
        let c = self
            .cluster
            .as_mut()
            .ok_or_else(|| Error::other("node drain", anyhow::anyhow!("this daemon has no [cluster] section: a single node announces nothing to withdraw")))?;
        let marker = announce::drained_marker(&c.cfg.announce_dir);
        let written = if drained {
            std::fs::write(&marker, b"drained by `sluice node drain`\n")
        } else {
            std::fs::remove_file(&marker).or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
        };
        written.map_err(|e| Error::other(format!("recording the drain in {}", marker.display()), e))?;
        c.drained = drained;
        let node = c.cfg.node.clone();
        let what = if drained { "drained: withdrawing its VIPs, forwarding what still arrives" } else { "undrained: announcing its VIPs again" };
        tracing::warn!(node = %node, "node {what}");
        self.journal.record("cluster", format!("node \"{node}\" {what}"), vec![]);
        self.publish_wanted();
        Ok(())
    }

    /// What applying `cfg` would change (no writes).
    pub async fn plan(state: &Arc<Mutex<Self>>, cfg: &Config) -> Result<Vec<Change>, Error> {
        let macs = backend_macs(cfg).await?;
        let mut st = state.lock().expect("state lock");
        let st = &mut *st;
        let resolver = |ip: IpAddr| macs.get(&ip).copied();
        let eff = effective(cfg, &st.overrides);
        st.applied.plan(&eff, &resolver, |id| st.conns.get(id)).map(|p| p.changes)
    }

    /// Moves queued refusal events into the window and, if there were any, evaluates the alerts
    /// now rather than at the next tick (the first refusal reaches the sinks in milliseconds).
    /// Every reader drains through here, so whoever sees a refusal first triggers the evaluation.
    pub fn drain_events(&mut self) -> Result<usize, Error> {
        let n = self.events.as_mut().map_or(0, |ev| ev.drain(&self.applied));
        if n > 0 {
            if self.last_event_eval.is_none_or(|t| t.elapsed() >= MIN_EVAL_GAP) {
                self.last_event_eval = Some(Instant::now());
                self.evaluate_alerts()?;
            } else {
                self.eval_pending = true;
                self.eval_wakeup.notify_one();
            }
        }
        Ok(n)
    }

    /// Samples the counters, evaluates the alert rules and delivers what changed (log sink).
    fn evaluate_alerts(&mut self) -> Result<(), Error> {
        self.eval_pending = false;
        let limits = self.cluster.as_ref().and_then(|c| c.limits.as_ref()).map(|l| l.lock().expect("limits status").clone());
        self.names.refresh(&self.applied, &mut self.history);
        let stats = self.dp.tables().backend_stats_upto(self.names.ids_end())?;
        // The load history the guard judges changes by: every backend, every evaluation.
        let now_unix = crate::history::unix_now();
        for b in self.applied.services.values().flat_map(|s| s.backends.values()).filter(|b| !b.removed) {
            if let Some(n) = self.names.get(b.id) {
                self.history.observe_at(n.history, now_unix, self.conns.get(b.id), stats[b.id as usize].refused.total());
            }
        }
        self.history.save_if_due();
        // BIRD behind for a few seconds (not the instant of a change) while a VIP should be up.
        let not_announcing = self.cluster.as_ref().and_then(|c| {
            let s = c.status.lock().expect("status");
            let missing: Vec<String> = s.wanted.difference(&s.announced).map(ToString::to_string).collect();
            (s.behind_since.is_some_and(|t| t.elapsed() >= Duration::from_secs(3)) && !missing.is_empty())
                .then(|| (c.cfg.node.clone(), missing, s.error.clone().unwrap_or_default()))
        });
        let sample = alerts::sample(&alerts::Inputs {
            applied: &self.applied,
            names: &self.names,
            stats: &stats,
            conns: &self.conns,
            limits,
            corrections: &self.reconciler.corrections,
            flows: (self.flows.len(), self.flows.capacity()),
            config_file: &self.cfg_path,
            not_announcing,
            change_refused: self.change_refused.clone(),
            services: &self.cfg.services,
        });
        for n in self.alerts.evaluate(Instant::now(), sample) {
            match n.status {
                alerts::Status::Firing => {
                    tracing::warn!(alert = n.alertname, severity = n.severity, "FIRING: {} — {}", n.summary, n.description);
                    self.journal.record("alert", format!("alert {} FIRING: {}", n.alertname, n.summary), vec![n.description.clone()]);
                    self.sinks.send(&n);
                    self.firing.push(n);
                }
                alerts::Status::Resolved => {
                    tracing::info!(alert = n.alertname, "{}", n.summary);
                    self.journal.record("alert", format!("alert {} resolved", n.alertname), vec![n.summary.clone()]);
                    self.sinks.send(&n);
                    self.firing.retain(|f| !(f.alertname == n.alertname && f.labels == n.labels));
                }
            }
        }
        Ok(())
    }

    /// Drops expired break-glass limits; true if the config must be applied again.
    fn expire_overrides(&mut self) -> bool {
        let now = Instant::now();
        let before = self.overrides.len();
        self.overrides.retain(|(svc, be), o| {
            let keep = o.until > now;
            if !keep {
                tracing::warn!(service = %svc, backend = %be, "break-glass limit max_conns = {} expired; back to the config's value", o.max_conns);
                self.journal.record("limit", format!("break-glass limit expired: service \"{svc}\" backend {be} back to its configured max_conns"), vec![]);
            }
            keep
        });
        self.overrides.len() != before
    }

    fn tick(&mut self, n: u64) -> Result<(), Error> {
        let now = Instant::now();
        if now >= self.next_gc {
            self.last_sweep = gc::sweep(&self.flows, &self.conns, &self.cfg.flows.timeouts, gc::now_coarse_ns(), self.gc_gap);
            // Keep GC under ~5 % of a core: a sweep that took T waits at least 20 T.
            let took = now.elapsed();
            self.gc_gap = (took * GC_DUTY_INVERSE).max(Duration::from_secs(1));
            // Ticks come once a second but not to the microsecond: without the slack a
            // one-second gap would often be missed by a hair and become two.
            self.next_gc = (now + self.gc_gap).checked_sub(TICK_SLACK).unwrap();
            if self.last_sweep.expired > 0 {
                tracing::debug!(expired = self.last_sweep.expired, released = self.last_sweep.released, ?took, "flow GC");
            }
        }
        self.drain_events()?;
        if let Some(p) = self.cluster.as_mut().and_then(|c| c.peers.as_mut()) {
            // Flows adopted since the last tick: tell the peers (the node each left releases it).
            let now = gc::now_coarse_ns();
            let moved = crate::peers::adopted_since(&self.flows, p.since_ns, now);
            // The next walk looks a second back too: a flow adopted during this walk, in a
            // bucket already passed, is reported then. Duplicates are ignored by the peers.
            p.since_ns = now.saturating_sub(1_000_000_000);
            if !moved.is_empty() {
                p.stats.lock().expect("stats").reported += moved.len() as u64;
                let _ = p.tx.send(moved);
            }
        }
        if n.is_multiple_of(RECONCILE_EVERY) {
            let ids: Vec<u32> = self.applied.services.values().flat_map(|s| s.backends.values().map(|b| b.id)).collect();
            self.last_drift = self.reconciler.pass(&self.flows, &self.conns, ids);
            for d in self.last_drift.iter().filter(|d| d.corrected) {
                tracing::warn!(backend_id = d.backend_id, counter = d.counter, flows = d.flows, "open-connection counter drifted from the flow table; corrected");
            }
        }
        Ok(())
    }
}

fn attach_mode(m: XdpMode) -> AttachMode {
    match m {
        XdpMode::Auto => AttachMode::Auto,
        XdpMode::Native => AttachMode::Native,
        XdpMode::Generic => AttachMode::Generic,
    }
}

/// The cluster state from `[cluster]`: its directory made, a drain kept from before.
fn cluster(cfg: &Config) -> Result<Option<Cluster>, Error> {
    let Some(c) = &cfg.cluster else { return Ok(None) };
    // 0755 and files 0644: BIRD runs as its own user and reads them.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&c.announce_dir)
        .map_err(|e| Error::other(format!("creating {} (cluster.announce_dir)", c.announce_dir.display()), e))?;
    // BIRD refuses a config whose included files are missing: make them (empty) before this
    // daemon serves, so BIRD may start any time after it.
    for f in <[PathBuf; 2]>::from(announce::files(&c.announce_dir)) {
        if !f.exists() {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&f)
                .map_err(|e| Error::other(format!("creating {} (cluster.announce_dir)", f.display()), e))?;
        }
    }
    let drained = announce::drained_marker(&c.announce_dir).exists();
    if drained {
        tracing::warn!(node = %c.node, "this node was drained (`sluice node drain`) and stays so until `sluice node undrain`");
    }
    let (wanted, wanted_rx) = tokio::sync::watch::channel(Default::default());
    let status = announce::Status { node: c.node.clone(), drained, ..Default::default() };
    let peers = match &c.peer_key_file {
        Some(path) if !c.peers.is_empty() || c.peer_listen.is_some() => {
            let (tx, rx) = mpsc::unbounded_channel();
            // From 0: the first report holds every adopted flow in the table, those the datapath
            // adopted while no daemon ran (a restart, an upgrade) included; peers ignore the
            // ones they do not hold.
            Some(Peers { stats: Arc::default(), key: crate::peers::read_key(path)?, tx, rx: Some(rx), since_ns: 0 })
        }
        _ => None,
    };
    let limits = c.limits.as_ref().map(|l| {
        Arc::new(Mutex::new(crate::limits::Status {
            node: c.node.clone(),
            etcd: l.etcd.clone(),
            prefix: l.prefix.clone(),
            lease_ttl_s: l.lease_ttl.as_secs(),
            ..Default::default()
        }))
    });
    Ok(Some(Cluster { cfg: c.clone(), status: Arc::new(Mutex::new(status)), drained, wanted, wanted_rx: Some(wanted_rx), peers, limits }))
}

/// The load history's file: beside the journal (`daemon.journal`).
pub fn history_path(cfg: &Config) -> PathBuf {
    cfg.daemon.journal.parent().unwrap_or(Path::new("/var/lib/sluice")).join("history.bin")
}

/// Starts the daemon from `cfg_path`: returns the shared state once the datapath is attached
/// and the config applied.
pub async fn start(cfg_path: &Path) -> Result<Arc<Mutex<State>>, Error> {
    let (cfg, warnings) = config::load(cfg_path).map_err(Error::Config)?;
    for w in &warnings {
        tracing::warn!("{}: {w}", cfg_path.display());
    }
    let opts = load_options(&cfg);
    let (mut dp, started) = Datapath::start_persistent(&cfg.daemon.interface, &cfg.daemon.pin_dir, attach_mode(cfg.daemon.xdp_mode), &opts)?;
    let conns = dp.tables().conn_counters()?;
    let flows = dp.tables().flow_table()?;
    let events = match dp.take_map(maps::EVENTS) {
        Some(m) => Some(crate::events::Events::new(aya::maps::RingBuf::try_from(m).map_err(|e| Error::other("EVENTS", e))?)),
        None => None,
    };
    let adopted = started.adopted;
    if let Some(why) = &started.relinked {
        tracing::warn!("{why}");
    }
    let applied = if adopted {
        // The adopted ring table keeps the size it was created with.
        let slots = dp.tables().max_entries(maps::RINGS)?;
        let a = Applied::recover(&mut dp.tables(), &cfg, slots)?;
        tracing::info!(services = a.services.len(), "adopted the running datapath: flows and counters kept");
        a
    } else {
        Applied::new(opts.ring_slots)
    };
    let mut applied = applied;
    if cfg.cluster.as_ref().is_some_and(|c| c.limits.is_some()) {
        // Shares come from etcd; until then a backend keeps the limit the datapath has (after
        // a restart) or admits nothing (a new one).
        applied.shares = Some(Default::default());
    }
    let (health_tx, health_rx) = mpsc::unbounded_channel();
    let state = Arc::new(Mutex::new(State {
        cfg_path: cfg_path.to_owned(),
        cfg: cfg.clone(),
        dp,
        conns,
        flows,
        applied,
        reconciler: Reconciler::default(),
        last_sweep: Sweep::default(),
        next_gc: Instant::now(),
        gc_gap: Duration::from_secs(1),
        last_drift: Vec::new(),
        checks: health::Checks::default(),
        alerts: alerts::Engine::new(cfg.alerts.clone()),
        sinks: crate::sinks::Sinks::start(alerts::Engine::all_webhooks(&cfg.alerts), cfg.alerts.command.clone()),
        events,
        overrides: std::collections::BTreeMap::new(),
        journal: crate::journal::Journal::new(cfg.daemon.journal.clone(), cfg.daemon.journal_max_bytes),
        firing: Vec::new(),
        last_event_eval: None,
        eval_pending: false,
        eval_wakeup: Arc::default(),
        health_tx,
        health_rx: Some(health_rx),
        cluster: cluster(&cfg)?,
        pending_undo: None,
        turn: Arc::default(),
        history: crate::history::History::load(&history_path(&cfg)),
        names: alerts::Names::default(),
        change_refused: None,
    }));
    {
        let st = state.lock().expect("state lock");
        let how = if adopted { "adopted the running datapath (flows and counters kept)" } else { "loaded a fresh datapath" };
        let details = std::iter::once(format!("config {}", cfg_path.display())).chain(started.relinked.clone()).collect();
        st.journal.record("daemon", format!("Sluice daemon started on {}: {how}", cfg.daemon.interface), details);
    }
    let changes = State::change(&state, |_| Ok::<_, Error>(cfg.into())).await?;
    for c in &changes {
        tracing::info!("{}", c.what);
    }
    Ok(state)
}

/// Reloads the config file; a refused file changes nothing. The file is read in the change's
/// turn, so it holds every runtime change made before (they are written back into it).
pub async fn reload(state: &Arc<Mutex<State>>) -> Result<Vec<Change>, Error> {
    State::change(state, |st| {
        let (cfg, warnings) = config::load(&st.cfg_path).map_err(Error::Config)?;
        if let Some(what) = config::restart_only_change(&cfg, &st.cfg) {
            return Err(Error::other(
                format!("{}", st.cfg_path.display()),
                anyhow::anyhow!("{what} changed, and it takes effect on restart only: nothing applied; restart the daemon to use it (or undo that edit to reload the rest)"),
            ));
        }
        for w in &warnings {
            tracing::warn!("{}: {w}", st.cfg_path.display());
        }
        let verdict = st.guard(&cfg);
        for w in &verdict.warnings {
            tracing::warn!("{}: {w}", st.cfg_path.display());
        }
        if !verdict.refused.is_empty() {
            // Nothing changes; said in the log, the journal and by an alert until a reload or
            // an apply goes through.
            let message = format!("{} (to apply it: `sluice config apply {} --force`)", verdict.refused.join("; "), st.cfg_path.display());
            st.journal.record("config", format!("reload of {} refused by the guard: nothing changed", st.cfg_path.display()), verdict.refused.clone());
            st.change_refused = Some(message.clone());
            return Err(Error::other(format!("{}: refused by the guard, nothing changed", st.cfg_path.display()), anyhow::anyhow!("{message}")));
        }
        st.change_refused = None;
        Ok(cfg.into())
    })
    .await
}

/// Runs until `shutdown` is cancelled (or SIGINT/SIGTERM when `signals`).
#[expect(clippy::too_many_lines, reason = "the main loop: one select over every source of work")]
pub async fn run(state: Arc<Mutex<State>>, shutdown: CancellationToken, signals: bool) -> Result<(), Error> {
    let mut hup = signal(SignalKind::hangup()).map_err(|e| Error::other("SIGHUP handler", e))?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::other("SIGTERM handler", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::other("SIGINT handler", e))?;
    let socket = state.lock().expect("state lock").cfg.daemon.control_socket.clone();
    let listener = crate::api::bind(&socket)?;
    let api_stop = shutdown.child_token();
    let lease_file = socket.parent().unwrap_or(Path::new("/run/sluice")).join("etcd-lease");
    let api = tokio::spawn(crate::api::serve(listener, socket, state.clone(), api_stop.clone()));
    let metrics_addr = state.lock().expect("state lock").cfg.daemon.metrics_listen;
    let metrics = tokio::spawn(crate::metrics::serve(metrics_addr, state.clone(), api_stop.clone()));
    let mut health_rx = state.lock().expect("state lock").health_rx.take().expect("run once");
    let announcer = {
        let mut st = state.lock().expect("state lock");
        st.cluster.as_mut().map(|c| {
            let rx = c.wanted_rx.take().expect("run once");
            (c.cfg.clone(), c.status.clone(), rx)
        })
    };
    let announcer = announcer.map(|(cfg, status, rx)| announce::spawn(cfg, state.clone(), status, rx, api_stop.clone()));
    let peer_tasks = {
        let mut st = state.lock().expect("state lock");
        st.cluster.as_mut().and_then(|c| {
            let p = c.peers.as_mut()?;
            Some((c.cfg.clone(), p.key.clone(), p.stats.clone(), p.rx.take().expect("run once")))
        })
    };
    let limits = {
        let st = state.lock().expect("state lock");
        st.cluster.as_ref().and_then(|c| Some((c.cfg.clone(), c.limits.clone()?)))
    };
    let limits = limits.map(|(cfg, status)| crate::limits::spawn(&cfg, lease_file, state.clone(), status, api_stop.clone()));
    let mut peer_handles = Vec::new();
    if let Some((cfg, key, stats, rx)) = peer_tasks {
        if !cfg.peers.is_empty() {
            peer_handles.push(crate::peers::spawn_sender(cfg.node.clone(), cfg.peers.clone(), key.clone(), state.clone(), stats.clone(), rx, api_stop.clone()));
        }
        if let Some(listen) = cfg.peer_listen {
            let (state, stop) = (state.clone(), api_stop.clone());
            peer_handles.push(tokio::spawn(async move {
                if let Err(e) = crate::peers::serve(listen, key, state, stats, stop).await {
                    tracing::error!("{e}");
                }
            }));
        }
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut eval_every = state.lock().expect("state lock").cfg.alerts.interval;
    let mut eval_tick = tokio::time::interval(eval_every);
    let wakeup = state.lock().expect("state lock").events.as_ref().and_then(|e| e.wakeup_fd().ok());
    // SAFETY: the AsyncFd owns the OwnedFd, which stays open and unchanged while registered.
    let wakeup = wakeup.and_then(|fd| unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok());
    let eval_wakeup = state.lock().expect("state lock").eval_wakeup.clone();
    let mut n = 0u64;
    loop {
        let configured = state.lock().expect("state lock").cfg.alerts.interval;
        if configured != eval_every {
            eval_every = configured;
            eval_tick = tokio::time::interval(eval_every);
        }
        let pending_at = {
            let st = state.lock().expect("state lock");
            st.eval_pending.then(|| st.last_event_eval.map_or_else(Instant::now, |t| t + MIN_EVAL_GAP))
        };
        let events_ready = async {
            match &wakeup {
                Some(w) => w.readable().await.map(|mut g| g.clear_ready()),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Ok(()) = events_ready => {
                if let Err(e) = state.lock().expect("state lock").drain_events() {
                    tracing::error!("{e}");
                }
            }
            () = shutdown.cancelled() => break,
            _ = term.recv(), if signals => break,
            _ = int.recv(), if signals => break,
            _ = hup.recv() => match reload(&state).await {
                Ok(changes) => {
                    tracing::info!(changes = changes.len(), "config reloaded");
                    for c in &changes {
                        tracing::info!("{}", c.what);
                    }
                }
                Err(e) => tracing::error!("reload refused, nothing changed: {e}"),
            },
            Some(t) = health_rx.recv() => {
                let word = if t.healthy { "healthy again: back in the ring" } else { "unhealthy: out of the ring (open connections continue)" };
                tracing::warn!(service = %t.service, backend = %t.address, "backend {word}; {}", t.detail);
                let changed = State::change(&state, |st| {
                    let key = (t.service.clone(), t.address);
                    let was_down = st.applied.down.contains(&key);
                    if t.healthy { st.applied.down.remove(&key); } else { st.applied.down.insert(key.clone()); }
                    let (summary, detail) = (format!("service \"{}\" backend {} {word}", t.service, t.address), t.detail.clone());
                    let then: Then = Box::new(move |st: &mut State| {
                        st.journal.record("backend", summary, vec![detail]);
                        Ok(())
                    });
                    // Undone if the apply fails, so the state says what the datapath does.
                    st.set_undo(Box::new(move |st: &mut State| {
                        if was_down { st.applied.down.insert(key); } else { st.applied.down.remove(&key); }
                    }));
                    Ok::<_, Error>(Next { cfg: st.cfg.clone(), then: Some(then) })
                });
                if let Err(e) = changed.await {
                    tracing::error!("applying a health change: {e}");
                }
            }
            () = tokio::time::sleep_until(pending_at.unwrap_or_else(Instant::now).into()), if pending_at.is_some() => {
                let mut st = state.lock().expect("state lock");
                st.last_event_eval = Some(Instant::now());
                if let Err(e) = st.evaluate_alerts() {
                    tracing::error!("evaluating alerts: {e}");
                }
            }
            // A drain elsewhere deferred an evaluation: go round to wait for it.
            () = eval_wakeup.notified() => {}
            _ = eval_tick.tick() => {
                if let Err(e) = state.lock().expect("state lock").evaluate_alerts() {
                    tracing::error!("evaluating alerts: {e}");
                }
            }
            _ = tick.tick() => {
                n += 1;
                let expired = {
                    let mut st = state.lock().expect("state lock");
                    if let Err(e) = st.tick(n) {
                        tracing::error!("{e}");
                    }
                    st.expire_overrides()
                };
                if expired {
                    if let Err(e) = State::change(&state, |st| Ok::<_, Error>(st.cfg.clone().into())).await {
                        tracing::error!("reverting a break-glass limit: {e}");
                    }
                }
            }
        }
    }
    api_stop.cancel();
    let _ = api.await;
    if let Some(a) = announcer {
        let _ = a.await;
    }
    if let Some(l) = limits {
        let _ = l.await;
        let nodes = state.lock().expect("state lock").cfg.cluster.as_ref().map_or(1, config::ClusterCfg::limit_nodes);
        crate::limits::on_stop(&state, nodes).await;
    }
    for h in peer_handles {
        let _ = h.await;
    }
    {
        let mut st = state.lock().expect("state lock");
        if let Err(e) = st.history.save() {
            tracing::warn!("saving the load history to {}: {e}", st.history.path.display());
        }
        st.journal.record("daemon", "Sluice daemon stopped (the datapath keeps forwarding)", vec![]);
    }
    if let Ok(Err(e)) = metrics.await {
        tracing::error!("{e}");
    }
    Ok(())
}
