//! The daemon (`sluice run --config FILE`): loads and attaches the datapath, applies the
//! config, reloads it on SIGHUP, evaluates the alerts, and keeps the flow table
//! (`housekeeping.rs`: GC, adopted flows, counter reconciliation, off the state lock).
//!
//! Everything else reaches it through a [`Daemon`] handle: the control API, the metrics
//! endpoint, the announcer, the peer channel and the cluster-wide limits, which `node.rs`
//! starts around [`Daemon::serve`]; the daemon knows none of them, only the records they fill
//! (`status/`). Its state ([`State`], `state.rs`) is private to this module; every change of it
//! is a `Daemon` method (`changes.rs`), and every change of the running config goes through one
//! serialized path, [`State::change`]. What the API reports is built in `reports.rs`. It takes
//! its shutdown signal as an argument, so tests can run it in-process.

mod changes;
mod cluster;
mod housekeeping;
mod lock;
mod moved;
mod reports;
mod sample;
mod state;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use lb_common::{maps, Config as DpConfig, DEFAULT_RING_SLOTS, FRAGMENTS_DROP, FRAGMENTS_PASS, ICMP_ECHO_PASS, ICMP_ECHO_REPLY};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;

use self::state::MIN_EVAL_GAP;
pub use self::{
    changes::Refused,
    cluster::Cluster,
    lock::LockReport,
    state::{Override, State},
};
use crate::{
    alerts,
    config::{self, parse_mac, Config, Fragments, IcmpEcho, XdpMode},
    datapath::{AttachMode, Datapath, LoadOptions},
    gc::Sweep,
    health,
    reconcile::{Applied, Change},
    Error,
};

/// What the node's tasks take from the daemon when it starts serving ([`Daemon::take_parts`]).
pub struct Parts {
    pub daemon: config::Daemon,
    /// `[cluster]`, if any.
    pub cluster: Option<config::ClusterCfg>,
    /// `daemon.metrics_web_config`, read at start.
    pub metrics_web: Option<crate::webconfig::WebConfig>,
    /// The announcer's record and the VIPs it should announce now (with `[cluster]`).
    #[expect(clippy::type_complexity, reason = "a record and a receiver, handed over once")]
    pub announce: Option<(Arc<std::sync::Mutex<crate::status::announce::Status>>, tokio::sync::watch::Receiver<std::collections::BTreeSet<std::net::IpAddr>>)>,
    /// The peer channel's counts and the adopted flows the housekeeping reports (with a peer
    /// channel).
    pub peers: Option<(Arc<std::sync::Mutex<crate::status::peers::Stats>>, mpsc::UnboundedReceiver<crate::status::peers::Batch>)>,
    /// The cluster-wide limits' record (with `[cluster.limits]`).
    pub limits: Option<Arc<std::sync::Mutex<crate::status::limits::Status>>>,
    /// Set by the limits task after each round, told to the peers.
    pub etcd_ok: Arc<std::sync::atomic::AtomicBool>,
    /// Where the etcd lease is kept across restarts.
    pub lease_file: PathBuf,
}

/// The running daemon, as its tasks and the control API hold it. Cheap to clone.
#[derive(Clone)]
pub struct Daemon {
    state: Arc<lock::Timed<State>>,
}

impl Daemon {
    /// The state, locked: only `daemon/` takes it (every change goes through
    /// [`State::change`]); the tasks read through [`Daemon::read`].
    #[track_caller]
    fn lock(&self) -> lock::Guard<'_, State> {
        self.state.lock().expect("state lock")
    }

    /// Reads the state under the lock: `f` sees it read only, through its getters. Keep `f`
    /// short (the main loop, the API and the scrapes wait for it); copy out what is needed.
    #[track_caller]
    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.lock())
    }

    /// How long the lock was held (`lock.rs`), read without taking it.
    pub fn lock_report(&self) -> LockReport {
        self.state.report()
    }

    /// Leaves the datapath attached and forwarding once the daemon has stopped (the next `sluice
    /// run` adopts it). Every task must have let go of its handle by then.
    pub fn leave_running(self) -> Result<(), Error> {
        let st = Arc::try_unwrap(self.state).map_err(|_| Error::other("shutdown", anyhow::anyhow!("the daemon's state is still shared")))?;
        st.into_inner().expect("state lock").dp.leave_running();
        Ok(())
    }

    /// Records an entry in the journal (`sluice timeline`).
    pub fn journal(&self, kind: &str, summary: impl Into<String>, details: Vec<String>) {
        self.lock().journal().record(kind, summary, details);
    }
}

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

fn attach_mode(m: XdpMode) -> AttachMode {
    match m {
        XdpMode::Auto => AttachMode::Auto,
        XdpMode::Native => AttachMode::Native,
        XdpMode::Generic => AttachMode::Generic,
    }
}

/// The etcd lease of this node (`[cluster.limits]`), in its state directory beside the journal
/// and named by the node: two daemons never share one, whatever their sockets' directories.
pub fn lease_path(cfg: &Config) -> PathBuf {
    let node = cfg.cluster.as_ref().map_or("", |c| c.node.as_str());
    cfg.daemon.journal.parent().unwrap_or(Path::new("/var/lib/sluice")).join(format!("etcd-lease.{node}"))
}

/// The load history's file: beside the journal (`daemon.journal`).
pub fn history_path(cfg: &Config) -> PathBuf {
    cfg.daemon.journal.parent().unwrap_or(Path::new("/var/lib/sluice")).join("history.bin")
}

impl Daemon {
    /// Starts the daemon from `cfg_path`: returns it once the datapath is attached and the config
    /// applied.
    pub async fn start(cfg_path: &Path) -> Result<Self, Error> {
        let (cfg, warnings) = config::load(cfg_path).map_err(Error::Config)?;
        for w in &warnings {
            tracing::warn!("{}: {w}", cfg_path.display());
        }
        // Read before anything is attached: a bad file or a key others may read stops the start,
        // naming the key and why.
        let metrics_web = cfg.daemon.metrics_web_config.as_deref().map(crate::webconfig::WebConfig::load).transpose()?;
        // Before anything opens a descriptor in numbers: listeners, health checks, maps.
        let nofile = match crate::openfiles::raise() {
            Ok(l) => {
                if l.soft > l.before {
                    tracing::info!("raised the open-file limit from {} to {} (the hard limit)", l.before, l.soft);
                }
                Some(l)
            }
            Err(e) => {
                tracing::warn!("reading or raising the open-file limit (RLIMIT_NOFILE): {e}");
                None
            }
        };
        let opts = load_options(&cfg);
        let (mut dp, started) = Datapath::start_persistent(&cfg.daemon.interface, &cfg.daemon.pin_dir, attach_mode(cfg.daemon.xdp_mode), &opts)?;
        let conns = Arc::new(dp.tables().conn_counters()?);
        let flows = Arc::new(dp.tables().flow_table()?);
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
        let state = Arc::new(lock::Timed::new(State {
            cfg_path: cfg_path.to_owned(),
            cfg: cfg.clone(),
            dp,
            conns,
            flows,
            applied,
            last_sweep: Sweep::default(),
            last_drift: Vec::new(),
            corrections: std::collections::BTreeMap::new(),
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
            health_local: std::collections::BTreeMap::new(),
            cluster: cluster::cluster(&cfg)?,
            pending_undo: None,
            turn: Arc::default(),
            history: crate::history::History::load(&history_path(&cfg)),
            names: sample::Names::default(),
            change_refused: None,
            listeners: Vec::new(),
            metrics_web,
            nofile,
        }));
        {
            let st = state.lock().expect("state lock");
            let how = if adopted { "adopted the running datapath (flows and counters kept)" } else { "loaded a fresh datapath" };
            let details = std::iter::once(format!("config {}", cfg_path.display())).chain(started.relinked.clone()).collect();
            st.journal.record("daemon", format!("Sluice daemon started on {}: {how}", cfg.daemon.interface), details);
            if let Some(w) = nofile.and_then(|l| crate::openfiles::warning(&l, &cfg)) {
                tracing::warn!("{w}");
                st.journal.record("daemon", format!("open-file limit too low: {w}"), vec![]);
            }
        }
        let changes = State::change(&state, |_| Ok::<_, Error>(cfg.into())).await?;
        for c in &changes {
            tracing::info!("{}", c.what);
        }
        Ok(Self { state })
    }

    /// Reloads the config file; a refused file changes nothing. The file is read in the change's
    /// turn, so it holds every runtime change made before (they are written back into it).
    pub async fn reload(&self) -> Result<Vec<Change>, Error> {
        State::change_with(
            &self.state,
            |path, _| config::load(path).map_err(Error::Config),
            |st, (cfg, warnings)| {
                if let Some(what) = config::restart_only_change(&cfg, &st.cfg) {
                    return Err(Error::other(
                        format!("{}", st.cfg_path.display()),
                        anyhow::anyhow!(
                            "{what} changed, and it takes effect on restart only: nothing applied; restart the daemon to use it (or undo that edit to reload the rest)"
                        ),
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
            },
        )
        .await
    }

    /// What the node's tasks take from the daemon, once, when it starts serving (`node.rs`).
    /// Panics if taken twice: the receivers in it have one owner.
    pub fn take_parts(&self) -> Parts {
        let mut st = self.lock();
        let st = &mut *st;
        let lease_file = lease_path(&st.cfg);
        let daemon = st.cfg.daemon.clone();
        let metrics_web = st.metrics_web.take();
        let (cluster, announce, peers, limits, etcd_ok) = match st.cluster.as_mut() {
            Some(c) => (
                Some(c.cfg.clone()),
                Some((c.status.clone(), c.wanted_rx.take().expect("run once"))),
                c.peers.as_mut().map(|p| (p.stats.clone(), p.rx.take().expect("run once"))),
                c.limits.clone(),
                c.etcd_ok.clone(),
            ),
            None => (None, None, None, None, Arc::default()),
        };
        Parts { daemon, cluster, metrics_web, announce, peers, limits, etcd_ok, lease_file }
    }

    /// The listeners the node serves, for their counts in the status and metrics.
    pub fn set_listeners(&self, listeners: Vec<Arc<crate::listen::Listener>>) {
        self.lock().listeners = listeners;
    }

    /// The daemon's own loop, until `shutdown` is cancelled (or SIGINT/SIGTERM when
    /// `signals`): reloads on SIGHUP, health transitions, alert evaluations, refusal events,
    /// break-glass expiry, and the flow table's housekeeping beside it. The node's tasks
    /// (`node.rs`) run around it.
    pub async fn serve(&self, shutdown: CancellationToken, signals: bool) -> Result<(), Error> {
        let state = &self.state;
        let mut hup = signal(SignalKind::hangup()).map_err(|e| Error::other("SIGHUP handler", e))?;
        let mut term = signal(SignalKind::terminate()).map_err(|e| Error::other("SIGTERM handler", e))?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::other("SIGINT handler", e))?;
        let mut health_rx = state.lock().expect("state lock").health_rx.take().expect("run once");
        let stop = shutdown.child_token();
        // The flow table's GC, adoption walk and reconciliation, off the state lock.
        let housekeeping = self.spawn_housekeeping(stop.clone());
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut eval_every = state.lock().expect("state lock").cfg.alerts.interval;
        let mut eval_tick = tokio::time::interval(eval_every);
        let wakeup = state.lock().expect("state lock").events.as_ref().and_then(|e| e.wakeup_fd().ok());
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open and unchanged while registered.
        let wakeup = wakeup.and_then(|fd| unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok());
        let eval_wakeup = state.lock().expect("state lock").eval_wakeup.clone();
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
                _ = hup.recv() => match self.reload().await {
                    Ok(changes) => {
                        tracing::info!(changes = changes.len(), "config reloaded");
                        for c in &changes {
                            tracing::info!("{}", c.what);
                        }
                    }
                    Err(e) => tracing::error!("reload refused, nothing changed: {e}"),
                },
                Some(t) = health_rx.recv() => self.health_changed(t).await,
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
                    if let Err(e) = state.lock().expect("state lock").drain_events() {
                        tracing::error!("{e}");
                    }
                    self.expire_overrides().await;
                }
            }
        }
        stop.cancel();
        let _ = housekeeping.await;
        Ok(())
    }

    /// After the loop and the node's tasks: the history saved, the stop in the journal.
    pub fn stopped(&self) {
        let mut st = self.lock();
        if let Err(e) = st.history.save() {
            tracing::warn!("saving the load history to {}: {e}", st.history.path.display());
        }
        st.journal.record("daemon", "Sluice daemon stopped (the datapath keeps forwarding)", vec![]);
    }
}
