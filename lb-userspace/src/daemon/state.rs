//! What the daemon owns ([`State`]) and the one path by which its running config changes
//! ([`State::change`]). The fields are private to `daemon/`: other modules read them through
//! the getters below, under [`super::Daemon::lock`], and change the state only through
//! [`super::Daemon`]'s methods.

use crate::key::BackendKey;
use std::{
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use crate::{
    alerts,
    config::{Config, Mode},
    conns::ConnCounters,
    datapath::Datapath,
    flowtab::FlowTable,
    gc::{Drift, Sweep},
    health, neigh,
    reconcile::{Applied, Change},
    tables::Tables,
    Error,
};

use super::cluster::Cluster;

/// Refusal events trigger an evaluation at most this often (events are rate-limited already);
/// the periodic evaluations do not count, so the first refusal after a quiet spell is always
/// evaluated at once.
pub(super) const MIN_EVAL_GAP: Duration = Duration::from_millis(100);

/// A temporary `max_conns` for one backend.
#[derive(Clone, Debug)]
pub struct Override {
    pub max_conns: u32,
    pub until: Instant,
    /// When it reverts, RFC 3339.
    pub until_wall: String,
}

/// The config with break-glass limits laid over it.
fn effective(cfg: &Config, overrides: &std::collections::BTreeMap<BackendKey, Override>) -> Config {
    let mut c = cfg.clone();
    for s in &mut c.services {
        for b in &mut s.backends {
            if let Some(o) = overrides.get(&BackendKey::new(s.name.clone(), b.address)) {
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
    pub(super) cfg_path: PathBuf,
    pub(super) cfg: Config,
    pub(super) dp: Datapath,
    /// Shared with the housekeeping task (`housekeeping.rs`), which works on them off the lock.
    pub(super) conns: Arc<ConnCounters>,
    /// The memory-mapped flow table (GC, reconciliation, status).
    pub(super) flows: Arc<FlowTable>,
    pub(super) applied: Applied,
    /// What the housekeeping task found last: the GC sweep, the reconciliation's drift and its
    /// corrections per backend id since the start.
    pub(super) last_sweep: Sweep,
    pub(super) last_drift: Vec<Drift>,
    pub(super) corrections: std::collections::BTreeMap<u32, u64>,
    pub(super) checks: health::Checks,
    pub(super) alerts: alerts::Engine,
    pub(super) sinks: crate::sinks::Sinks,
    pub(super) events: Option<crate::events::Events>,
    /// Break-glass limits (`sluice limit raise --ttl`): laid over the config until they expire.
    pub(super) overrides: std::collections::BTreeMap<BackendKey, Override>,
    pub(super) journal: crate::journal::Journal,
    /// Alerts firing now, as last notified.
    pub(super) firing: Vec<alerts::Notification>,
    /// The last evaluation refusal events triggered.
    pub(super) last_event_eval: Option<Instant>,
    /// Refusals arrived within MIN_EVAL_GAP of the last such evaluation: evaluate when it has
    /// passed. Whoever drains (the main loop, an API call) wakes the main loop through
    /// `eval_wakeup`, so a deferred evaluation is never left to the next tick.
    pub(super) eval_pending: bool,
    pub(super) eval_wakeup: Arc<tokio::sync::Notify>,
    pub(super) health_tx: mpsc::UnboundedSender<health::Transition>,
    pub(super) health_rx: Option<mpsc::UnboundedReceiver<health::Transition>>,
    /// This node's part in a cluster (`[cluster]`): what it announces through BIRD.
    pub(super) cluster: Option<Cluster>,
    /// What the change in progress altered beside the config (a backend's health, a
    /// break-glass limit), to undo if its apply fails.
    #[expect(clippy::type_complexity, reason = "one boxed closure")]
    pub(super) pending_undo: Option<Box<dyn FnOnce(&mut State) + Send>>,
    /// Held for the whole of one change (edit, MAC resolution, write), so that changes of the
    /// running config are applied one after the other, each to the result of the one before.
    pub(super) turn: Arc<tokio::sync::Mutex<()>>,
    /// Per backend, peaks of open connections and refusals (`history.rs`), for the guard.
    pub(super) history: crate::history::History,
    /// What the alert sample names each backend by, made once per apply.
    pub(super) names: super::sample::Names,
    /// A reload the guard refused: what it said (`SluiceConfigChangeRefused` fires while set).
    pub(super) change_refused: Option<String>,
    /// Backends whose health checks cannot run for a cause on this node, with that cause
    /// (`SluiceHealthChecksCannotRun` fires while any is): no verdict, the ring is left alone.
    pub(super) health_local: std::collections::BTreeMap<BackendKey, String>,
    /// The listeners being served (control socket, `/metrics`, peer channel), with their counts.
    pub(super) listeners: Vec<Arc<crate::listen::Listener>>,
    /// `daemon.metrics_web_config`, read at start; taken when `/metrics` is served.
    pub(super) metrics_web: Option<crate::webconfig::WebConfig>,
    /// The open-file limit as the daemon set it at start (`openfiles.rs`).
    pub(super) nofile: Option<crate::openfiles::Limit>,
}

impl State {
    /// The one path by which the running config changes (API, CLI, SIGHUP, health checks,
    /// break-glass limits and their expiry): waits its turn, lets `edit` derive the next config
    /// from the state as the previous change left it (and change the state beside it: a
    /// backend's health, an override), applies it, then runs the edit's follow-up (e.g. putting
    /// the edited config file in place), all in the same turn. No two changes interleave, so none
    /// is applied to a stale copy and lost. An `edit` that fails changes nothing.
    pub(super) async fn change<E: From<Error>>(state: &Arc<super::lock::Timed<Self>>, edit: impl FnOnce(&mut Self) -> Result<Next, E>) -> Result<Vec<Change>, E> {
        let turn = state.lock().expect("state lock").turn.clone();
        let _turn = turn.lock().await;
        Self::in_turn(state, edit).await
    }

    /// [`State::change`] with a `prepare` that runs in the change's turn but without the state
    /// lock, given the config file's path and the running config (which only a change alters,
    /// so it holds for the whole turn): a file read and parsed there (a reload, `config apply`)
    /// or written and synced (a backend edit's write-back) holds up no status read, scrape or
    /// limits round while the disk answers, and still sees every change made before it.
    pub(super) async fn change_with<P, E: From<Error>>(
        state: &Arc<super::lock::Timed<Self>>,
        prepare: impl FnOnce(&std::path::Path, &Config) -> Result<P, E>,
        edit: impl FnOnce(&mut Self, P) -> Result<Next, E>,
    ) -> Result<Vec<Change>, E> {
        let turn = state.lock().expect("state lock").turn.clone();
        let _turn = turn.lock().await;
        let (path, running) = {
            let st = state.lock().expect("state lock");
            (st.cfg_path.clone(), st.cfg.clone())
        };
        let prepared = prepare(&path, &running)?;
        Self::in_turn(state, |st| edit(st, prepared)).await
    }

    /// A change, its turn taken: `edit` under the lock, the apply, the undo if it failed, the
    /// follow-up.
    async fn in_turn<E: From<Error>>(state: &Arc<super::lock::Timed<Self>>, edit: impl FnOnce(&mut Self) -> Result<Next, E>) -> Result<Vec<Change>, E> {
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
    async fn apply(state: &Arc<super::lock::Timed<Self>>, cfg: Config) -> Result<Vec<Change>, Error> {
        let macs = backend_macs(&cfg).await?;
        let mut st = state.lock().expect("state lock");
        let st = &mut *st;
        let resolver = |ip: IpAddr| macs.get(&ip).copied();
        let eff = effective(&cfg, &st.overrides);
        // A cluster-wide max_conns lowered: the shares granted under the old one enforce 0
        // from this change on (`Share::granted_under`) until the allocator grants under it.
        let changes = st.applied.apply(&mut st.dp.tables(), &eff, &resolver, |t, id| t.conns(id).unwrap_or(0))?;
        if !changes.is_empty() {
            st.journal.record("config", format!("configuration applied: {} change(s)", changes.len()), changes.iter().map(|c| c.what.clone()).collect());
        }
        st.checks.sync(&cfg, &st.health_tx, &st.applied.down);
        // A backend no longer checked (removed, or its health table gone) has no local failure.
        st.health_local.retain(|k, _| cfg.services.iter().any(|s| s.name == k.service && s.backends.iter().any(|b| b.address == k.address && b.health.is_some())));
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
    pub(super) fn guard(&self, next: &Config) -> crate::guard::Verdict {
        let open = |svc: &str, a: IpAddr| self.applied.backend(svc, a).map_or(0, |b| self.conns.get(b.id));
        crate::guard::check(&self.cfg, next, &self.history, &open, crate::history::unix_now(), self.cfg.guard.window)
    }

    /// What to undo if the change in progress fails to apply (inside [`State::change`]'s edit).
    pub(super) fn set_undo(&mut self, undo: Box<dyn FnOnce(&mut State) + Send>) {
        self.pending_undo = Some(undo);
    }

    /// What applying `cfg` would change (no writes).
    pub(super) async fn plan(state: &Arc<super::lock::Timed<Self>>, cfg: &Config) -> Result<Vec<Change>, Error> {
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
    pub(super) fn drain_events(&mut self) -> Result<usize, Error> {
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
    pub(super) fn evaluate_alerts(&mut self) -> Result<(), Error> {
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
        let sample = super::sample::sample(&super::sample::Inputs {
            applied: &self.applied,
            names: &self.names,
            stats: &stats,
            conns: &self.conns,
            limits,
            corrections: &self.corrections,
            flows: (self.flows.len(), self.flows.capacity()),
            config_file: &self.cfg_path,
            not_announcing,
            change_refused: self.change_refused.clone(),
            services: &self.cfg.services,
            health_local: &self.health_local,
        });
        for n in self.alerts.evaluate(Instant::now(), sample) {
            match n.status {
                alerts::Status::Firing => {
                    tracing::warn!(alert = %n.alertname, severity = %n.severity, "FIRING: {} — {}", n.summary, n.description);
                    self.journal.record("alert", format!("alert {} FIRING: {}", n.alertname, n.summary), vec![n.description.clone()]);
                    self.sinks.send(&n);
                    self.firing.push(n);
                }
                alerts::Status::Resolved => {
                    tracing::info!(alert = %n.alertname, "{}", n.summary);
                    self.journal.record("alert", format!("alert {} resolved", n.alertname), vec![n.summary.clone()]);
                    self.sinks.send(&n);
                    self.firing.retain(|f| !(f.alertname == n.alertname && f.labels == n.labels));
                }
            }
        }
        Ok(())
    }

    /// Drops expired break-glass limits; true if the config must be applied again.
    pub(super) fn expire_overrides(&mut self) -> bool {
        let now = Instant::now();
        let before = self.overrides.len();
        self.overrides.retain(|k, o| {
            let (svc, be) = (&k.service, k.address);
            let keep = o.until > now;
            if !keep {
                tracing::warn!(service = %svc, backend = %be, "break-glass limit max_conns = {} expired; back to the config's value", o.max_conns);
                self.journal.record("limit", format!("break-glass limit expired: service \"{svc}\" backend {be} back to its configured max_conns"), vec![]);
            }
            keep
        });
        self.overrides.len() != before
    }
}

/// Reading the state (under [`super::Daemon::lock`]).
impl State {
    /// The running config (break-glass limits not laid over it).
    pub fn cfg(&self) -> &Config {
        &self.cfg
    }
    /// The file a reload reads and runtime changes are written into.
    pub fn cfg_path(&self) -> &std::path::Path {
        &self.cfg_path
    }
    /// What the datapath was last written with.
    pub fn applied(&self) -> &Applied {
        &self.applied
    }
    /// Backend `id`'s open connections, exactly (`CONNS`). The counters and the flow table
    /// are written only inside `daemon/` (the GC, the peer channel's releases, the apply path):
    /// getters hand out numbers, not their handles.
    pub fn open(&self, id: u32) -> u64 {
        self.conns.get(id)
    }
    /// The flow table's entries and capacity.
    pub fn flow_usage(&self) -> (u64, u64) {
        (self.flows.len(), self.flows.capacity())
    }
    /// The datapath's maps, read and written; only `daemon/` has them (writes go through the
    /// apply path).
    pub(super) fn tables(&mut self) -> Tables<'_> {
        self.dp.tables()
    }
    /// Every backend's counters, for ids below `end` (one batched lookup).
    pub fn backend_stats_upto(&self, end: u32) -> Result<Vec<lb_common::TrafficStats>, Error> {
        self.dp.read().backend_stats_upto(end)
    }
    /// A service's counters (refusals no backend is charged with included).
    pub fn service_stats(&self, id: u32) -> Result<lb_common::TrafficStats, Error> {
        self.dp.read().service_stats(id)
    }
    /// The datapath's packet outcomes.
    pub fn outcomes(&self) -> Result<crate::stats::Snapshot, Error> {
        crate::stats::read(&self.dp.read().stats_map()?)
    }
    /// Alerts firing now, as last notified.
    pub fn firing(&self) -> &[alerts::Notification] {
        &self.firing
    }
    /// What the guard said of the last reload it refused, while no change has gone through since.
    pub fn change_refused(&self) -> Option<&str> {
        self.change_refused.as_deref()
    }
    /// Connections corrected by reconciliation, per backend id.
    pub fn corrections(&self) -> &std::collections::BTreeMap<u32, u64> {
        &self.corrections
    }
    /// This node's part in a cluster, with `[cluster]`.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }
    pub fn journal(&self) -> &crate::journal::Journal {
        &self.journal
    }
    /// The listeners' bounds and counts.
    pub fn listeners(&self) -> Vec<crate::listen::ListenerReport> {
        self.listeners.iter().map(|l| l.report()).collect()
    }
    /// Descriptors open now, the open-file limit, and what the config may need.
    pub fn open_files(&self) -> Option<crate::openfiles::OpenFiles> {
        let limit = self.nofile?;
        let limit = crate::openfiles::soft_now().unwrap_or(limit.soft);
        Some(crate::openfiles::OpenFiles { open: crate::openfiles::open_now(), limit, needed: crate::openfiles::needed(&self.cfg).0 })
    }
}
