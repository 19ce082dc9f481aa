//! Every change of the daemon's state, as [`Daemon`] methods: a config applied, a backend
//! edited, a break-glass limit, a backend's health, the cluster's shares, a drain. Each runs
//! through [`State::change`] (edit the running config, guard it, apply it, then its follow-up,
//! all in one turn), so a change that fails changes nothing.

use crate::key::BackendKey;
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{
    state::{Next, Then},
    Daemon, Override, State,
};
use crate::{
    cfgfile::{self, BackendEdit, Staged},
    config::{self, BackendCfg, Config, Finding, Severity},
    guard::Verdict,
    health,
    reconcile::{Change, Share},
    wire::{ApplyRequest, ApplyResponse, BackendRequest, DrainReport, DrainRequest, RaiseRequest},
    Error,
};

/// Why a request changed nothing (the control API answers with the matching HTTP status).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The request itself is wrong (400).
    #[error("{0}")]
    BadRequest(String),
    /// No such service or backend (404).
    #[error("{0}")]
    NotFound(String),
    /// The guard refused it, or the config file no longer says what runs (409).
    #[error("{0}")]
    Conflict(String),
    /// The config is invalid, needs a restart, or could not be applied (422).
    #[error("{0}")]
    Invalid(String),
}

impl From<Error> for Refused {
    fn from(e: Error) -> Self {
        Self::Invalid(e.to_string())
    }
}

impl Daemon {
    /// What applying `cfg` would change (no writes).
    pub async fn plan(&self, cfg: &Config) -> Result<Vec<Change>, Error> {
        State::plan(&self.state, cfg).await
    }

    /// `sluice config apply`: a file (read in the change's turn, so it holds every runtime change
    /// written back into it before) or a config sent as text; with `dry_run`, what it would do.
    pub async fn apply_config(&self, req: ApplyRequest) -> Result<ApplyResponse, Refused> {
        let read = |req: &ApplyRequest| -> Result<(Config, Vec<Finding>, PathBuf), Refused> {
            let (file, text) = match (&req.path, &req.toml) {
                (Some(p), None) => (p.clone(), std::fs::read_to_string(p).map_err(|e| Refused::BadRequest(format!("{}: cannot read it: {e}", p.display())))?),
                (None, Some(t)) => (PathBuf::from("<request>"), t.clone()),
                _ => return Err(Refused::BadRequest("give either \"path\" or \"toml\"".into())),
            };
            let (cfg, warnings) = config::parse(&file, &text).map_err(|r| Refused::Invalid(r.to_string()))?;
            Ok((cfg, warnings, file))
        };
        if req.dry_run {
            let (cfg, warnings, file) = read(&req)?;
            let guard = {
                let st = self.lock();
                restart_only(&cfg, &st.cfg, &file)?;
                st.guard(&cfg)
            };
            let changes = self.plan(&cfg).await?;
            return Ok(ApplyResponse { applied: false, changes, warnings, guard });
        }
        let mut warnings = Vec::new();
        let mut verdict = Verdict::default();
        let changes = State::change_with(
            &self.state,
            |_, _| read(&req),
            |running, (cfg, found, file)| {
                restart_only(&cfg, &running.cfg, &file)?;
                let what = format!("config apply {}", file.display());
                verdict = guarded(running, &cfg, req.force, &what)?;
                warnings = found;
                let forced = forced_then(&verdict, what);
                // The applied file becomes the one a reload reads and runtime changes are written to.
                let path = req.path.clone();
                let then: Then = Box::new(move |st: &mut State| {
                    if let Some(p) = path {
                        st.cfg_path = p;
                    }
                    st.change_refused = None;
                    forced(st)
                });
                Ok::<_, Refused>(Next { cfg, then: Some(then) })
            },
        )
        .await?;
        Ok(ApplyResponse { applied: true, changes, warnings, guard: verdict })
    }

    /// `sluice backend add|remove|drain|undrain|set-limit`: the running config with one backend
    /// edited, applied like a file and written back into the file so that a reload keeps it.
    pub async fn edit_backend(&self, service: &str, address: IpAddr, action: &str, body: BackendRequest) -> Result<ApplyResponse, Refused> {
        let bad = |m: &str| Refused::BadRequest(m.to_owned());
        let edit = match action {
            "add" => BackendEdit::Add(BackendCfg {
                address,
                max_conns: body.max_conns.ok_or_else(|| bad("adding a backend needs \"max_conns\""))?,
                weight: body.weight.unwrap_or(1),
                drain: false,
                mac: None,
                health: None,
                safe_share: None,
            }),
            "remove" => BackendEdit::Remove,
            "drain" => BackendEdit::Set { max_conns: None, weight: None, drain: Some(true) },
            "undrain" => BackendEdit::Set { max_conns: None, weight: None, drain: Some(false) },
            "set-limit" => BackendEdit::Set { max_conns: Some(body.max_conns.ok_or_else(|| bad("set-limit needs \"max_conns\""))?), weight: body.weight, drain: None },
            other => return Err(Refused::BadRequest(format!("unknown action \"{other}\" (add, remove, drain, undrain, set-limit)"))),
        };
        let mut warnings = Vec::new();
        let mut verdict = Verdict::default();
        // The edit, its validation and the file staged with it (written and synced) happen in
        // the change's turn, before the state lock; the guard judges it under the lock.
        let prepare = |path: &Path, running: &Config| {
            let cfg = edit_config(running, service, address, &edit)?;
            let findings = config::validate(&cfg);
            if let Some(e) = findings.iter().find(|f| f.severity == Severity::Error) {
                return Err(Refused::Invalid(format!("refused, nothing changed: {e}")));
            }
            let staged = write_back(path, running, &cfg, service, address, &edit)?;
            Ok((cfg, findings, staged))
        };
        let changes = State::change_with(&self.state, prepare, |running, (cfg, findings, staged)| {
            let what = format!("backend {action} service \"{service}\" {address}");
            verdict = guarded(running, &cfg, body.force, &what)?;
            let forced = forced_then(&verdict, what);
            warnings = findings.into_iter().filter(|f| f.severity == Severity::Warning).collect();
            let then: Then = match staged {
                Ok(staged) => Box::new(move |st: &mut State| {
                    forced(st)?;
                    let path = st.cfg_path.clone();
                    staged.commit().map_err(|e| {
                        Error::other(format!("the change is applied, but writing it into {} failed, so a reload would revert it; fix the file by hand", path.display()), e)
                    })
                }),
                // A file that cannot be written (a read-only /etc, a config from a volume) must not
                // block a drain in an incident: applied, and said loudly that a reload reverts it.
                Err(why) => {
                    let message = format!("applied in memory only: {why}; a reload reverts this change unless the file gets it too");
                    warnings.push(Finding { severity: Severity::Warning, key: format!("service \"{service}\" backend {address}"), message: message.clone() });
                    Box::new(move |st: &mut State| {
                        forced(st)?;
                        tracing::warn!("{message}");
                        st.journal.record("config", format!("runtime change not written to {}", st.cfg_path.display()), vec![message]);
                        Ok(())
                    })
                }
            };
            Ok::<_, Refused>(Next { cfg, then: Some(then) })
        })
        .await?;
        Ok(ApplyResponse { applied: true, changes, warnings, guard: verdict })
    }

    /// `sluice limit raise`: a temporary `max_conns` that reverts by itself (break-glass).
    pub async fn raise_limit(&self, req: RaiseRequest) -> Result<ApplyResponse, Refused> {
        let ttl = humantime::parse_duration(&req.ttl).map_err(|e| Refused::BadRequest(format!("ttl \"{}\": {e} (write e.g. \"30m\")", req.ttl)))?;
        if req.max_conns == 0 || ttl.is_zero() {
            return Err(Refused::BadRequest("max_conns and ttl must be above 0".into()));
        }
        let changes = State::change(&self.state, |s| {
            let known = s.cfg.services.iter().any(|x| x.name == req.service && x.backends.iter().any(|b| b.address == req.backend));
            if !known {
                return Err(Refused::NotFound(format!("service \"{}\" has no backend {} in the config", req.service, req.backend)));
            }
            let until_wall = humantime::format_rfc3339_seconds(std::time::SystemTime::now() + ttl).to_string();
            tracing::warn!(service = %req.service, backend = %req.backend, "break-glass: max_conns = {} until {until_wall}", req.max_conns);
            s.journal.record("limit", format!("break-glass: service \"{}\" backend {} max_conns = {} until {until_wall}", req.service, req.backend, req.max_conns), vec![]);
            let key = BackendKey::new(req.service.clone(), req.backend);
            let before = s.overrides.insert(key.clone(), Override { max_conns: req.max_conns, until: Instant::now() + ttl, until_wall });
            s.set_undo(Box::new(move |st: &mut State| {
                match before {
                    Some(o) => st.overrides.insert(key, o),
                    None => st.overrides.remove(&key),
                };
            }));
            Ok::<_, Refused>(s.cfg.clone().into())
        })
        .await?;
        Ok(ApplyResponse { applied: true, changes, warnings: Vec::new(), guard: Verdict::default() })
    }

    /// Break-glass limits that expired revert to the config's values.
    pub(super) async fn expire_overrides(&self) {
        if self.lock().expire_overrides() {
            if let Err(e) = State::change(&self.state, |st| Ok::<_, Error>(st.cfg.clone().into())).await {
                tracing::error!("reverting a break-glass limit: {e}");
            }
        }
    }

    /// A health check changed a backend's verdict: in or out of the ring.
    pub(super) async fn health_changed(&self, t: health::Transition) {
        if t.kind != health::Kind::Verdict {
            // No verdict on the backend: said, alerted on, and the ring is left as it is.
            let mut st = self.lock();
            let key = BackendKey::new(t.service.clone(), t.address);
            let summary = if t.kind == health::Kind::LocalFailure {
                tracing::error!(service = %t.service, backend = %t.address, "health checks cannot run from this node: {}; the backend keeps its place in the ring", t.detail);
                st.health_local.insert(key, t.detail.clone());
                format!("service \"{}\" backend {}: health checks cannot run from this node (no verdict, the ring is unchanged)", t.service, t.address)
            } else {
                tracing::warn!(service = %t.service, backend = %t.address, "health checks run again");
                st.health_local.remove(&key);
                format!("service \"{}\" backend {}: health checks run again", t.service, t.address)
            };
            st.journal.record("backend", summary, vec![t.detail]);
            return;
        }
        let word = if t.healthy { "healthy again: back in the ring" } else { "unhealthy: out of the ring (open connections continue)" };
        tracing::warn!(service = %t.service, backend = %t.address, "backend {word}; {}", t.detail);
        let changed = State::change(&self.state, |st| {
            let key = BackendKey::new(t.service.clone(), t.address);
            let was_down = st.applied.down.contains(&key);
            if t.healthy {
                st.applied.down.remove(&key);
            } else {
                st.applied.down.insert(key.clone());
            }
            let (summary, detail) = (format!("service \"{}\" backend {} {word}", t.service, t.address), t.detail.clone());
            let then: Then = Box::new(move |st: &mut State| {
                st.journal.record("backend", summary, vec![detail]);
                Ok(())
            });
            // Undone if the apply fails, so the state says what the datapath does.
            st.set_undo(Box::new(move |st: &mut State| {
                if was_down {
                    st.applied.down.insert(key);
                } else {
                    st.applied.down.remove(&key);
                }
            }));
            Ok::<_, Error>(Next { cfg: st.cfg.clone(), then: Some(then) })
        });
        if let Err(e) = changed.await {
            tracing::error!("applying a health change: {e}");
        }
    }

    /// Lays the cluster-wide limits' `shares` over the config (`limits.rs`).
    pub async fn set_shares(&self, shares: BTreeMap<BackendKey, Share>) -> Result<(), Error> {
        State::change(&self.state, move |st| {
            let old = st.applied.shares.replace(shares);
            st.set_undo(Box::new(move |st: &mut State| st.applied.shares = old));
            Ok::<_, Error>(Next::from(st.cfg.clone()))
        })
        .await
        .map(|_| ())
    }

    /// `sluice node drain`: withdraws this node's VIPs, then measures until the router sends it
    /// no new flows (none for `QUIET`), or the timeout. Forwarding goes on throughout.
    pub async fn drain(&self, req: DrainRequest) -> Result<DrainReport, Refused> {
        let timeout = match req.timeout {
            Some(t) => humantime::parse_duration(&t).map_err(|e| Refused::BadRequest(format!("timeout \"{t}\": {e} (write e.g. \"60s\")")))?,
            None => Duration::from_mins(1),
        };
        let started = Instant::now();
        self.set_drained(true).await?;
        let (node, status, withdrawn) = {
            let s = self.lock();
            let c = s.cluster.as_ref().expect("set_drained checked");
            let withdrawn = c.status.lock().expect("status").announced.iter().copied().collect();
            (c.cfg.node.clone(), c.status.clone(), withdrawn)
        };
        let mut report = DrainReport { node, drained: true, withdrawn, withdraw_ms: None, new_flows_after: 0, last_new_flow_ms: 0, quiet: false, waited_ms: 0, error: None };
        let tick = Duration::from_millis(100);
        // BIRD confirms the withdrawal.
        while started.elapsed() < timeout {
            let (empty, error) = {
                let s = status.lock().expect("status");
                (s.announced.is_empty(), s.error.clone())
            };
            if empty {
                report.withdraw_ms = Some(started.elapsed().as_millis() as u64);
                break;
            }
            report.error = error;
            tokio::time::sleep(tick).await;
        }
        // Then the router: new flows stop arriving.
        let withdrawn_at = Instant::now();
        let base = self.new_flows_total()?;
        let (mut last, mut last_change) = (base, withdrawn_at);
        while started.elapsed() < timeout {
            tokio::time::sleep(tick).await;
            let now = self.new_flows_total()?;
            if now != last {
                last = now;
                last_change = Instant::now();
                report.last_new_flow_ms = (last_change - withdrawn_at).as_millis() as u64;
            }
            if last_change.elapsed() >= QUIET && report.withdraw_ms.is_some() {
                report.quiet = true;
                break;
            }
        }
        report.new_flows_after = last - base;
        report.waited_ms = started.elapsed().as_millis() as u64;
        let after = if report.quiet { "then none" } else { "still arriving at the timeout" };
        self.journal("cluster", format!("node \"{}\" drain: {} new flow(s) after the withdrawal, {after}", report.node, report.new_flows_after), vec![]);
        Ok(report)
    }

    /// `sluice node undrain`: announces this node's VIPs again.
    pub async fn undrain(&self) -> Result<crate::status::announce::Status, Refused> {
        self.set_drained(false).await?;
        Ok(self.lock().cluster.as_ref().expect("set_drained checked").status())
    }

    /// Fences this node out (withdraws its VIPs) or lets it back, in the change path's turn.
    pub async fn set_fenced(&self, fenced: bool, why: &str) {
        let turn = self.lock().turn.clone();
        let _turn = turn.lock().await;
        self.lock().set_fenced(fenced, why);
    }

    /// Drains or undrains, in the change path's turn (it changes what the node announces).
    async fn set_drained(&self, drained: bool) -> Result<(), Refused> {
        let turn = self.lock().turn.clone();
        let _turn = turn.lock().await;
        self.lock().set_drained(drained).map_err(|e| Refused::BadRequest(e.to_string()))
    }

    /// New flows admitted to every backend since the datapath was loaded.
    fn new_flows_total(&self) -> Result<u64, Error> {
        let mut st = self.lock();
        let end = st.applied.backend_ids_end();
        Ok(st.tables().backend_stats_upto(end)?.iter().map(|s| s.new_flows).sum())
    }
}

/// How long without a new flow counts as "the router sends us none".
const QUIET: Duration = Duration::from_secs(2);

/// Refuses a change to a key that takes effect on restart only.
fn restart_only(next: &Config, running: &Config, file: &Path) -> Result<(), Refused> {
    match config::restart_only_change(next, running) {
        Some(what) => {
            Err(Refused::Invalid(format!("{}: {what} changed, and it takes effect on restart only; change it in the file the daemon starts with and restart it", file.display())))
        }
        None => Ok(()),
    }
}

/// The guard's verdict on `cfg`: refused (409, nothing changes, journaled) unless `force`.
fn guarded(running: &State, cfg: &Config, force: bool, what: &str) -> Result<Verdict, Refused> {
    let mut v = running.guard(cfg);
    if !v.refused.is_empty() {
        if !force {
            tracing::warn!("{what}: refused by the guard: {}", v.refused.join("; "));
            running.journal.record("config", format!("{what} refused by the guard: nothing changed"), v.refused.clone());
            return Err(Refused::Conflict(v.message()));
        }
        v.forced = true;
    }
    Ok(v)
}

/// Journals a change forced past the guard, once it is applied.
fn forced_then(v: &Verdict, what: String) -> impl FnOnce(&mut State) -> Result<(), Error> + Send + 'static {
    let refused = v.forced.then(|| v.refused.clone());
    move |st: &mut State| {
        if let Some(r) = refused {
            tracing::warn!("{what}: forced past the guard: {}", r.join("; "));
            st.journal.record("config", format!("{what}: applied with --force although the guard refused it"), r);
        }
        Ok(())
    }
}

/// The running config with `edit` made to one backend.
fn edit_config(running: &Config, service: &str, address: IpAddr, edit: &BackendEdit) -> Result<Config, Refused> {
    let mut cfg = running.clone();
    let svc = cfg.services.iter_mut().find(|s| s.name == service).ok_or_else(|| Refused::NotFound(format!("no service named \"{service}\"")))?;
    let idx = svc.backends.iter().position(|b| b.address == address);
    let missing = || Refused::NotFound(format!("service \"{service}\" has no backend {address}"));
    match edit {
        BackendEdit::Add(b) => {
            if idx.is_some() {
                return Err(Refused::BadRequest(format!("service \"{service}\" already has backend {address}")));
            }
            svc.backends.push(b.clone());
        }
        BackendEdit::Remove => {
            svc.backends.remove(idx.ok_or_else(missing)?);
        }
        BackendEdit::Set { max_conns, weight, drain } => {
            let b = &mut svc.backends[idx.ok_or_else(missing)?];
            b.max_conns = max_conns.unwrap_or(b.max_conns);
            b.weight = weight.unwrap_or(b.weight);
            b.drain = drain.unwrap_or(b.drain);
        }
    }
    Ok(cfg)
}

/// Stages the config file with `edit` made, so that a reload keeps the change. Refused if the
/// file no longer says what runs (edited and not applied, or a config sent as text): writing
/// the edit into it would apply those other changes at the next reload, unreviewed.
fn write_back(path: &Path, running: &Config, next: &Config, service: &str, address: IpAddr, edit: &BackendEdit) -> Result<Result<Staged, String>, Refused> {
    let refuse = |why: String| Refused::Conflict(format!("refused, nothing changed: {why}"));
    // A symlinked config is written where it points, not replaced by a file.
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let text = match std::fs::read_to_string(&real) {
        Ok(t) => t,
        Err(e) => return Ok(Err(format!("the config file {} cannot be read ({e})", path.display()))),
    };
    let on_disk = config::parse(path, &text).map(|(c, _)| c);
    if on_disk.ok().as_ref() != Some(running) {
        return Err(refuse(format!(
            "the config file {} differs from the running config (edited and not applied?), so the change cannot be written into it; \
             apply it (`sluice config apply {}`) or undo its edits, then try again",
            path.display(),
            path.display()
        )));
    }
    let edited = cfgfile::edit_backend(&text, service, address, edit).map_err(|e| refuse(format!("{}: {e}", path.display())))?;
    // The file must say exactly what is applied, or the next reload would change something else.
    match config::parse(path, &edited) {
        Ok((c, _)) if &c == next => {}
        _ => return Err(refuse(format!("{}: the edited file would not read back as the change; edit the file and apply it instead", path.display()))),
    }
    Ok(Staged::write(&real, &edited).map_err(|e| format!("the config file {} cannot be written ({e})", real.display())))
}
