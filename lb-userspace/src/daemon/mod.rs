//! The daemon (`sluice run --config FILE`): loads and attaches the datapath, applies the
//! config, reloads it on SIGHUP, and runs GC and counter reconciliation every second.
//!
//! Everything else reaches it through a [`Daemon`] handle: the control API, the metrics
//! endpoint, the announcer, the peer channel and the cluster-wide limits. Its state
//! ([`State`], `state.rs`) is private to this module; every change of it is a `Daemon` method
//! (`changes.rs`), and every change of the running config goes through one serialized path,
//! [`State::change`]. What the API reports is built in `reports.rs`. It takes its shutdown
//! signal as an argument, so tests can run it in-process.

mod changes;
mod cluster;
mod housekeeping;
mod lock;
mod reports;
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
    alerts, announce,
    config::{self, parse_mac, Config, Fragments, IcmpEcho, XdpMode},
    datapath::{AttachMode, Datapath, LoadOptions},
    gc::Sweep,
    health,
    reconcile::{Applied, Change},
    Error,
};

/// The running daemon, as its tasks and the control API hold it. Cheap to clone.
#[derive(Clone)]
pub struct Daemon {
    state: Arc<lock::Timed<State>>,
}

impl Daemon {
    /// The state, locked, to read (its getters). Hold it briefly: the main loop, the API and
    /// the scrapes all wait for it.
    #[track_caller]
    pub fn lock(&self) -> lock::Guard<'_, State> {
        self.state.lock().expect("state lock")
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
            names: alerts::Names::default(),
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
            |path| config::load(path).map_err(Error::Config),
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

    /// Runs until `shutdown` is cancelled (or SIGINT/SIGTERM when `signals`).
    #[expect(clippy::too_many_lines, reason = "the main loop: one select over every source of work")]
    pub async fn run(&self, shutdown: CancellationToken, signals: bool) -> Result<(), Error> {
        let state = &self.state;
        let mut hup = signal(SignalKind::hangup()).map_err(|e| Error::other("SIGHUP handler", e))?;
        let mut term = signal(SignalKind::terminate()).map_err(|e| Error::other("SIGTERM handler", e))?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::other("SIGINT handler", e))?;
        let (d, peer) = {
            let st = state.lock().expect("state lock");
            (st.cfg.daemon.clone(), st.cfg.cluster.as_ref().and_then(|c| Some((c.peer_listen?, c.peer_max_connections))))
        };
        // Every listener bounded (`listen.rs`): no flood on one takes the descriptors the
        // health checks, the journal and the control socket need.
        let bounds = |max_connections, request_timeout| crate::listen::Limits { max_connections, header_timeout: d.http_header_timeout, request_timeout };
        let control = crate::listen::Listener::new("control", d.control_socket.display().to_string(), bounds(d.control_max_connections, None));
        let metrics_listener = crate::listen::Listener::new("metrics", d.metrics_listen.to_string(), bounds(d.metrics_max_connections, Some(d.http_request_timeout)));
        let peer_listener = peer.map(|(addr, max)| crate::listen::Listener::new("peer", addr.to_string(), bounds(max, Some(d.http_request_timeout))));
        // The read-only socket (`daemon.read_socket`): bounded as the control socket, its own count.
        let read_listener = d.read_socket.as_ref().map(|p| crate::listen::Listener::new("read", p.display().to_string(), bounds(d.control_max_connections, None)));
        state.lock().expect("state lock").listeners =
            [Some(control.clone()), read_listener.clone(), Some(metrics_listener.clone()), peer_listener.clone()].into_iter().flatten().collect();
        let socket = d.control_socket.clone();
        let listener = crate::api::bind(&socket)?;
        let read = match (&d.read_socket, &d.read_socket_group, read_listener) {
            (Some(path), Some(group), Some(me)) => match crate::api::bind_read(path, group, &socket) {
                Ok(l) => Some((l, path.clone(), me)),
                Err(e) => {
                    let _ = std::fs::remove_file(&socket);
                    return Err(e);
                }
            },
            _ => None,
        };
        let api_stop = shutdown.child_token();
        let api = tokio::spawn(crate::api::serve(listener, socket.clone(), self.clone(), control, api_stop.clone()));
        let read_api = read.map(|(l, path, me)| tokio::spawn(crate::api::serve_read(l, path, socket, self.clone(), me, api_stop.clone())));
        let web = state.lock().expect("state lock").metrics_web.take();
        let metrics = tokio::spawn(crate::metrics::serve(d.metrics_listen, self.clone(), web, metrics_listener, api_stop.clone()));
        let mut health_rx = state.lock().expect("state lock").health_rx.take().expect("run once");
        let announcer = {
            let mut st = state.lock().expect("state lock");
            st.cluster.as_mut().map(|c| {
                let rx = c.wanted_rx.take().expect("run once");
                (c.cfg.clone(), c.status.clone(), rx)
            })
        };
        let announcer = announcer.map(|(cfg, status, rx)| announce::spawn(cfg, self.clone(), status, rx, api_stop.clone()));
        let peer_tasks = {
            let mut st = state.lock().expect("state lock");
            st.cluster.as_mut().and_then(|c| {
                let p = c.peers.as_mut()?;
                Some((c.cfg.clone(), p.creds.clone(), p.stats.clone(), p.rx.take().expect("run once")))
            })
        };
        let (limits, etcd_ok, lease_file) = {
            let st = state.lock().expect("state lock");
            let limits = st.cluster.as_ref().and_then(|c| Some((c.cfg.clone(), c.limits.clone()?, c.peers.as_ref().map(|p| p.stats.clone()), c.etcd_connect.clone())));
            (limits, st.cluster.as_ref().map(|c| c.etcd_ok.clone()).unwrap_or_default(), lease_path(&st.cfg))
        };
        let limits = limits.map(|(cfg, status, peers, connect)| {
            crate::limits::spawn(&cfg, lease_file, self.clone(), status, crate::limits::Links { etcd_ok: etcd_ok.clone(), peers, connect }, api_stop.clone())
        });
        let mut peer_handles = Vec::new();
        if let Some((cfg, creds, stats, rx)) = peer_tasks {
            if !cfg.peers.is_empty() {
                peer_handles.push(crate::peers::spawn_sender(
                    cfg.node.clone(),
                    cfg.peers.clone(),
                    creds.clone(),
                    self.clone(),
                    stats.clone(),
                    etcd_ok.clone(),
                    rx,
                    api_stop.clone(),
                ));
            }
            if let (Some(listen), Some(me)) = (cfg.peer_listen, peer_listener) {
                let (daemon, stop) = (self.clone(), api_stop.clone());
                peer_handles.push(tokio::spawn(async move {
                    if let Err(e) = crate::peers::serve(listen, creds, daemon, stats, me, stop).await {
                        tracing::error!("{e}");
                    }
                }));
            }
        }
        // The flow table's GC, adoption walk and reconciliation, off the state lock.
        let housekeeping = self.spawn_housekeeping(api_stop.clone());
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
        api_stop.cancel();
        let _ = api.await;
        let _ = housekeeping.await;
        if let Some(r) = read_api {
            let _ = r.await;
        }
        if let Some(a) = announcer {
            let _ = a.await;
        }
        if let Some(l) = limits {
            let _ = l.await;
            let nodes = state.lock().expect("state lock").cfg.cluster.as_ref().map_or(1, config::ClusterCfg::limit_nodes);
            crate::limits::on_stop(self, nodes).await;
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
}
