//! The control API: JSON over HTTP on a Unix socket (mode 0600, so root only). The CLI is a
//! client of it. Every change goes through the same path as a config file — the daemon's
//! current config is edited, validated, then applied — so a request that fails changes nothing.

use std::{
    net::{IpAddr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    extract::{Path as UrlPath, Query, State as AxState},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;

use crate::{
    cfgfile::{self, BackendEdit, Staged},
    config::{self, BackendCfg, Config, Finding, Proto, Severity},
    daemon::{Next, State, Then},
    explain::{self, Explanation},
    gc::{Drift, Sweep},
    reconcile::{state_name, Change},
    stats, Error,
};

pub type Shared = Arc<Mutex<State>>;

/// An error response: status and a message that says what to do.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        Self(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

/// A backend in `GET /v1/services` and `/v1/status`: the server writes it, the CLI reads it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct BackendReport {
    pub address: IpAddr,
    pub id: u32,
    pub state: String,
    pub open: u64,
    pub max_conns: u32,
    /// What this node admits: `max_conns`, or its share of it with cluster-wide limits.
    pub limit: u32,
    /// With cluster-wide limits: this node's share, and the cluster's open connections.
    pub cluster: Option<crate::limits::BackendLimit>,
    pub weight: u32,
    pub removed: bool,
    /// Totals since the datapath was loaded (rates are the reader's job).
    pub new_flows: u64,
    /// Refusals charged to it, by reason (reasons with none left out).
    pub refused: std::collections::BTreeMap<String, u64>,
}

/// A service in `GET /v1/services` and `/v1/status`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ServiceReport {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub proto: Proto,
    pub mode: String,
    pub backends: Vec<BackendReport>,
}

#[derive(Serialize, Debug)]
pub struct StatusReport {
    pub interface: String,
    pub config: PathBuf,
    pub services: Vec<ServiceReport>,
    pub flows: u64,
    pub flow_capacity: u32,
    pub last_sweep: Sweep,
    pub last_drift: Vec<Drift>,
    /// Connections corrected by reconciliation since this daemon started.
    pub drift_corrected: u64,
    pub alerts_firing: Vec<crate::alerts::Notification>,
    pub break_glass: Vec<(String, IpAddr, crate::daemon::Override)>,
    pub outcomes: stats::Snapshot,
    /// This node's announcements, with a `[cluster]` section.
    pub cluster: Option<crate::announce::Status>,
    /// The peer channel's counts, with `cluster.peers`.
    pub peers: Option<crate::peers::Stats>,
    /// Cluster-wide limits, with `[cluster.limits]`.
    pub limits: Option<crate::limits::Status>,
}

fn services(st: &mut State) -> Result<Vec<ServiceReport>, Error> {
    let mut out = Vec::new();
    let limits = st.cluster.as_ref().and_then(|c| c.limits.as_ref()).map(|l| l.lock().expect("limits status").backends.clone());
    let applied: Vec<_> = st.applied.services.values().cloned().collect();
    let all_stats = st.dp.tables().backend_stats_upto(st.applied.backend_ids_end())?;
    for s in applied {
        let mut backends = Vec::new();
        for b in s.backends.values() {
            let ts = all_stats[b.id as usize];
            backends.push(BackendReport {
                new_flows: ts.new_flows,
                refused: lb_common::Reason::ALL.iter().map(|r| (r.name().to_owned(), ts.refused.get(*r))).filter(|(_, n)| *n > 0).collect(),
                address: b.address,
                id: b.id,
                state: state_name(b.state).into(),
                open: st.conns.get(b.id),
                max_conns: b.max_conns,
                limit: b.limit,
                cluster: limits.as_ref().and_then(|l| l.get(&crate::shares::key(&s.name, b.address))).cloned(),
                weight: b.weight,
                removed: b.removed,
            });
        }
        out.push(ServiceReport { name: s.name.clone(), vip: s.cfg.vip, port: s.cfg.port, proto: s.cfg.proto, mode: format!("{:?}", s.cfg.mode).to_lowercase(), backends });
    }
    Ok(out)
}

async fn get_status(AxState(st): AxState<Shared>) -> Result<Json<StatusReport>, ApiError> {
    let mut st = st.lock().expect("state lock");
    let services = services(&mut st)?;
    let t = st.dp.tables();
    let outcomes = stats::read(&t.stats_map()?)?;
    let flows = st.flows.len();
    Ok(Json(StatusReport {
        interface: st.cfg.daemon.interface.clone(),
        config: st.cfg_path.clone(),
        services,
        flows,
        flow_capacity: st.cfg.flows.capacity,
        last_sweep: st.last_sweep,
        last_drift: st.last_drift.clone(),
        drift_corrected: st.reconciler.corrections.values().sum(),
        alerts_firing: st.firing.clone(),
        break_glass: st.overrides.iter().map(|((s, b), o)| (s.clone(), *b, o.clone())).collect(),
        outcomes,
        cluster: st.cluster.as_ref().map(|c| c.status.lock().expect("status").clone()),
        peers: st.cluster.as_ref().and_then(|c| c.peers.as_ref()).map(|p| p.stats.lock().expect("stats").clone()),
        limits: st.cluster.as_ref().and_then(|c| c.limits.as_ref()).map(|l| l.lock().expect("limits status").clone()),
    }))
}

async fn get_services(AxState(st): AxState<Shared>) -> Result<Json<Vec<ServiceReport>>, ApiError> {
    let mut st = st.lock().expect("state lock");
    Ok(Json(services(&mut st)?))
}

#[derive(Deserialize, Serialize, Debug, Default)]
pub struct ApplyRequest {
    /// A config file to read (on the daemon's host).
    pub path: Option<PathBuf>,
    /// Or the config itself.
    pub toml: Option<String>,
    /// Only show what would change (and the guard's verdict).
    #[serde(default)]
    pub dry_run: bool,
    /// Apply it although the guard refuses it (journaled as forced).
    #[serde(default)]
    pub force: bool,
}

#[derive(Serialize, Debug)]
pub struct ApplyResponse {
    pub applied: bool,
    pub changes: Vec<Change>,
    pub warnings: Vec<Finding>,
    /// The guard's verdict (`guard.rs`).
    pub guard: crate::guard::Verdict,
}

async fn post_config_apply(AxState(st): AxState<Shared>, Json(req): Json<ApplyRequest>) -> Result<Json<ApplyResponse>, ApiError> {
    // A file is read in the change's turn (`read` below), so it includes every runtime change
    // written back into it before: reading it earlier could apply a copy without them.
    let read = |req: &ApplyRequest| -> Result<(Config, Vec<Finding>, PathBuf), ApiError> {
        let (file, text) = match (&req.path, &req.toml) {
            (Some(p), None) => (p.clone(), std::fs::read_to_string(p).map_err(|e| bad(format!("{}: cannot read it: {e}", p.display())))?),
            (None, Some(t)) => (PathBuf::from("<request>"), t.clone()),
            _ => return Err(bad("give either \"path\" or \"toml\"")),
        };
        let (cfg, warnings) = config::parse(&file, &text).map_err(|r| ApiError(StatusCode::UNPROCESSABLE_ENTITY, r.to_string()))?;
        Ok((cfg, warnings, file))
    };
    let restart_only = |next: &Config, running: &Config, file: &Path| {
        config::restart_only_change(next, running).map(|what| {
            ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("{}: {what} changed, and it takes effect on restart only; change it in the file the daemon starts with and restart it", file.display()),
            )
        })
    };
    if req.dry_run {
        let (cfg, warnings, file) = read(&req)?;
        if let Some(e) = restart_only(&cfg, &st.lock().expect("state lock").cfg, &file) {
            return Err(e);
        }
        let guard = st.lock().expect("state lock").guard(&cfg);
        let changes = State::plan(&st, &cfg).await?;
        return Ok(Json(ApplyResponse { applied: false, changes, warnings, guard }));
    }
    let mut warnings = Vec::new();
    let mut verdict = crate::guard::Verdict::default();
    let changes = State::change(&st, |running| {
        let (cfg, found, file) = read(&req)?;
        if let Some(e) = restart_only(&cfg, &running.cfg, &file) {
            return Err(e);
        }
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
        Ok(Next { cfg, then: Some(then) })
    })
    .await?;
    Ok(Json(ApplyResponse { applied: true, changes, warnings, guard: verdict }))
}

/// The guard's verdict on `cfg`: an error (409, nothing changes, journaled) if it refuses and
/// `force` is not set.
fn guarded(running: &State, cfg: &Config, force: bool, what: &str) -> Result<crate::guard::Verdict, ApiError> {
    let mut v = running.guard(cfg);
    if !v.refused.is_empty() {
        if !force {
            tracing::warn!("{what}: refused by the guard: {}", v.refused.join("; "));
            running.journal.record("config", format!("{what} refused by the guard: nothing changed"), v.refused.clone());
            return Err(ApiError(StatusCode::CONFLICT, v.message()));
        }
        v.forced = true;
    }
    Ok(v)
}

/// Journals a change forced past the guard, once it is applied.
fn forced_then(v: &crate::guard::Verdict, what: String) -> impl FnOnce(&mut State) -> Result<(), Error> + Send + 'static {
    let refused = v.forced.then(|| v.refused.clone());
    move |st: &mut State| {
        if let Some(r) = refused {
            tracing::warn!("{what}: forced past the guard: {}", r.join("; "));
            st.journal.record("config", format!("{what}: applied with --force although the guard refused it"), r);
        }
        Ok(())
    }
}

/// `GET /v1/review`: the running config against the load (`sluice config review`).
async fn get_review(AxState(st): AxState<Shared>) -> Result<Json<serde_json::Value>, ApiError> {
    use crate::history::unix_now;
    let st = st.lock().expect("state lock");
    let now = unix_now();
    let headroom = st.cfg.guard.headroom;
    let mut services = Vec::new();
    for s in &st.cfg.services {
        let mut backends = Vec::new();
        let keys: Vec<String> = s.backends.iter().map(|b| crate::shares::key(&s.name, b.address)).collect();
        for (b, k) in s.backends.iter().zip(&keys) {
            let open = st.applied.backend(&s.name, b.address).map_or(0, |a| st.conns.get(a.id));
            let p = |secs: u64| st.history.peak(k, now, Duration::from_secs(secs));
            let (p1, p24, p30) = (p(3600), p(86_400), p(30 * 86_400));
            let load = open.max(u64::from(p30.open));
            // Peak × headroom, rounded up to a round number (2 significant digits).
            let want = (load as f64 * headroom).ceil() as u64;
            let step = 10u64.pow((want.max(1) as f64).log10().floor().max(1.0) as u32 - 1);
            let suggested = want.div_ceil(step) * step;
            let flag = if u64::from(b.max_conns) < load {
                "BELOW PEAK"
            } else if (u64::from(b.max_conns) as f64) < load as f64 * headroom {
                "CLOSE TO PEAK"
            } else {
                ""
            };
            backends.push(serde_json::json!({
                "address": b.address, "max_conns": b.max_conns, "open": open,
                "peak_1h": p1, "peak_24h": p24, "peak_30d": p30,
                "headroom": i64::from(b.max_conns) - load as i64, "suggested": suggested.max(1), "flag": flag,
            }));
        }
        let peak = st.history.service_peak(&keys, now, Duration::from_hours(24));
        let n1 = crate::guard::n_minus_1(s, u64::from(peak.open), peak.at, now);
        services.push(serde_json::json!({
            "name": s.name, "capacity": crate::guard::capacity(s), "peak_24h": peak, "n_minus_1": crate::guard::capacity_n_minus_1(s),
            "n_minus_1_verdict": n1.unwrap_or_else(|| "carries its peak".into()), "backends": backends,
        }));
    }
    Ok(Json(serde_json::json!({ "now": now, "headroom": headroom, "window_s": st.cfg.guard.window.as_secs(), "services": services })))
}

async fn get_history(AxState(st): AxState<Shared>, UrlPath(service): UrlPath<String>) -> Result<Json<serde_json::Value>, ApiError> {
    history(&st, &service, None)
}

async fn get_history_backend(AxState(st): AxState<Shared>, UrlPath((service, address)): UrlPath<(String, IpAddr)>) -> Result<Json<serde_json::Value>, ApiError> {
    history(&st, &service, Some(address))
}

/// `GET /v1/history/{service}[/{address}]`: every minute (24 h) and hour (30 d) per backend.
fn history(st: &Shared, service: &str, address: Option<IpAddr>) -> Result<Json<serde_json::Value>, ApiError> {
    let st = st.lock().expect("state lock");
    let now = crate::history::unix_now();
    let s = st.cfg.services.iter().find(|s| s.name == service).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no service named \"{service}\"")))?;
    let chosen: Vec<IpAddr> = s.backends.iter().map(|b| b.address).filter(|a| address.is_none_or(|x| x == *a)).collect();
    if chosen.is_empty() {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("service \"{service}\" has no backend {}", address.map(|a| a.to_string()).unwrap_or_default())));
    }
    let backends: Vec<serde_json::Value> = chosen
        .iter()
        .map(|a| {
            let k = crate::shares::key(service, *a);
            let series = st.history.get(&k).cloned().unwrap_or_default();
            serde_json::json!({
                "address": a,
                "peak_24h": series.peak(now, Duration::from_hours(24)),
                "peak_30d": series.peak(now, Duration::from_hours(720)),
                "minutes": series.slots(now, Duration::from_hours(24)),
                "hours": series.slots(now, Duration::from_hours(720)),
            })
        })
        .collect();
    Ok(Json(serde_json::json!({ "now": now, "service": service, "backends": backends })))
}

#[derive(Deserialize, Serialize, Debug, Default)]
pub struct BackendRequest {
    pub max_conns: Option<u32>,
    pub weight: Option<u32>,
    /// Apply it although the guard refuses it.
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/services/{service}/backends/{address}/{action}`: add, remove, drain, undrain,
/// set-limit. Edits the running config and applies it like a file.
async fn post_backend(
    AxState(st): AxState<Shared>,
    UrlPath((service, address, action)): UrlPath<(String, IpAddr, String)>,
    body: Option<Json<BackendRequest>>,
) -> Result<Json<ApplyResponse>, ApiError> {
    let body = body.map(|b| b.0).unwrap_or_default();
    let edit = match action.as_str() {
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
        other => return Err(bad(format!("unknown action \"{other}\" (add, remove, drain, undrain, set-limit)"))),
    };
    let mut warnings = Vec::new();
    let mut verdict = crate::guard::Verdict::default();
    let changes = State::change(&st, |running| {
        let cfg = edit_config(&running.cfg, &service, address, &edit)?;
        let findings = config::validate(&cfg);
        if let Some(e) = findings.iter().find(|f| f.severity == Severity::Error) {
            return Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("refused, nothing changed: {e}")));
        }
        let what = format!("backend {action} service \"{service}\" {address}");
        verdict = guarded(running, &cfg, body.force, &what)?;
        let forced = forced_then(&verdict, what);
        warnings = findings.into_iter().filter(|f| f.severity == Severity::Warning).collect();
        let then: Then = match write_back(&running.cfg_path, &running.cfg, &cfg, &service, address, &edit)? {
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
        Ok(Next { cfg, then: Some(then) })
    })
    .await?;
    Ok(Json(ApplyResponse { applied: true, changes, warnings, guard: verdict }))
}

/// The running config with `edit` made to one backend.
fn edit_config(running: &Config, service: &str, address: IpAddr, edit: &BackendEdit) -> Result<Config, ApiError> {
    let mut cfg = running.clone();
    let svc = cfg.services.iter_mut().find(|s| s.name == service).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no service named \"{service}\"")))?;
    let idx = svc.backends.iter().position(|b| b.address == address);
    let missing = || ApiError(StatusCode::NOT_FOUND, format!("service \"{service}\" has no backend {address}"));
    match edit {
        BackendEdit::Add(b) => {
            if idx.is_some() {
                return Err(bad(format!("service \"{service}\" already has backend {address}")));
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
fn write_back(path: &Path, running: &Config, next: &Config, service: &str, address: IpAddr, edit: &BackendEdit) -> Result<Result<Staged, String>, ApiError> {
    let refuse = |why: String| ApiError(StatusCode::CONFLICT, format!("refused, nothing changed: {why}"));
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

#[derive(Deserialize, Serialize, Debug)]
pub struct ExplainQuery {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    #[serde(default = "tcp")]
    pub proto: Proto,
}

fn tcp() -> Proto {
    Proto::Tcp
}

async fn get_explain(AxState(st): AxState<Shared>, Query(q): Query<ExplainQuery>) -> Result<Json<Explanation>, ApiError> {
    let mut st = st.lock().expect("state lock");
    let st = &mut *st;
    Ok(Json(explain::explain(&st.applied, &mut st.dp.tables(), q.src, q.dst, q.proto)?))
}

#[derive(Deserialize, Serialize, Debug)]
pub struct RaiseRequest {
    pub service: String,
    pub backend: IpAddr,
    pub max_conns: u32,
    /// How long, e.g. "30m".
    pub ttl: String,
}

/// `POST /v1/limits/raise`: a temporary max_conns that reverts by itself (break-glass).
async fn post_raise(AxState(st): AxState<Shared>, Json(req): Json<RaiseRequest>) -> Result<Json<ApplyResponse>, ApiError> {
    let ttl = humantime::parse_duration(&req.ttl).map_err(|e| bad(format!("ttl \"{}\": {e} (write e.g. \"30m\")", req.ttl)))?;
    if req.max_conns == 0 || ttl.is_zero() {
        return Err(bad("max_conns and ttl must be above 0"));
    }
    let changes = State::change(&st, |s| {
        let known = s.cfg.services.iter().any(|x| x.name == req.service && x.backends.iter().any(|b| b.address == req.backend));
        if !known {
            return Err(ApiError(StatusCode::NOT_FOUND, format!("service \"{}\" has no backend {} in the config", req.service, req.backend)));
        }
        let until_wall = humantime::format_rfc3339_seconds(std::time::SystemTime::now() + ttl).to_string();
        tracing::warn!(service = %req.service, backend = %req.backend, "break-glass: max_conns = {} until {until_wall}", req.max_conns);
        s.journal.record("limit", format!("break-glass: service \"{}\" backend {} max_conns = {} until {until_wall}", req.service, req.backend, req.max_conns), vec![]);
        let key = (req.service.clone(), req.backend);
        let before = s.overrides.insert(key.clone(), crate::daemon::Override { max_conns: req.max_conns, until: std::time::Instant::now() + ttl, until_wall });
        s.set_undo(Box::new(move |st: &mut State| {
            match before {
                Some(o) => st.overrides.insert(key, o),
                None => st.overrides.remove(&key),
            };
        }));
        Ok(s.cfg.clone().into())
    })
    .await?;
    Ok(Json(ApplyResponse { applied: true, changes, warnings: Vec::new(), guard: crate::guard::Verdict::default() }))
}

#[derive(Deserialize, Serialize, Debug)]
pub struct EventsQuery {
    #[serde(default)]
    pub after: u64,
    #[serde(default = "d_limit")]
    pub limit: usize,
}

fn d_limit() -> usize {
    1000
}

async fn get_events(AxState(st): AxState<Shared>, Query(q): Query<EventsQuery>) -> Json<Vec<crate::events::Event>> {
    let mut st = st.lock().expect("state lock");
    let st = &mut *st;
    // Drain now so a caller sees what happened up to this request.
    if let Err(e) = st.drain_events() {
        tracing::error!("{e}");
    }
    Json(st.events.as_ref().map(|e| e.after(q.after, q.limit)).unwrap_or_default())
}

#[derive(Deserialize, Serialize, Debug, Default)]
pub struct DrainRequest {
    /// How long to wait for the router to stop sending new flows, e.g. "60s".
    pub timeout: Option<String>,
}

#[derive(Deserialize, Serialize, Debug)]
pub struct DrainReport {
    pub node: String,
    pub drained: bool,
    /// VIPs withdrawn from BIRD.
    pub withdrawn: Vec<IpAddr>,
    /// From the request to BIRD confirming the withdrawal.
    pub withdraw_ms: Option<u64>,
    /// New flows that still arrived after the withdrawal (the router converging).
    pub new_flows_after: u64,
    /// From the withdrawal to the last new flow seen (0: none came).
    pub last_new_flow_ms: u64,
    /// No new flow for `QUIET` before the timeout: the router sends this node none.
    pub quiet: bool,
    pub waited_ms: u64,
    pub error: Option<String>,
}

/// How long without a new flow counts as "the router sends us none".
const QUIET: Duration = Duration::from_secs(2);

fn new_flows_total(st: &mut State) -> Result<u64, Error> {
    let ids: Vec<u32> = st.applied.services.values().flat_map(|s| s.backends.values().map(|b| b.id)).collect();
    let t = st.dp.tables();
    ids.into_iter().try_fold(0u64, |acc, id| Ok(acc + t.backend_stats(id)?.new_flows))
}

/// `POST /v1/node/drain`: withdraw this node's VIPs, then measure until the router sends it no
/// new flows (none for `QUIET`), or the timeout. Forwarding goes on throughout.
async fn post_drain(AxState(st): AxState<Shared>, body: Option<Json<DrainRequest>>) -> Result<Json<DrainReport>, ApiError> {
    let timeout = match body.and_then(|b| b.0.timeout) {
        Some(t) => humantime::parse_duration(&t).map_err(|e| bad(format!("timeout \"{t}\": {e} (write e.g. \"60s\")")))?,
        None => Duration::from_mins(1),
    };
    let started = std::time::Instant::now();
    let (node, status, withdrawn) = {
        let mut s = st.lock().expect("state lock");
        s.set_drained(true).map_err(|e| bad(e.to_string()))?;
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
    let withdrawn_at = std::time::Instant::now();
    let base = new_flows_total(&mut st.lock().expect("state lock"))?;
    let (mut last, mut last_change) = (base, withdrawn_at);
    while started.elapsed() < timeout {
        tokio::time::sleep(tick).await;
        let now = new_flows_total(&mut st.lock().expect("state lock"))?;
        if now != last {
            last = now;
            last_change = std::time::Instant::now();
            report.last_new_flow_ms = (last_change - withdrawn_at).as_millis() as u64;
        }
        if last_change.elapsed() >= QUIET && report.withdraw_ms.is_some() {
            report.quiet = true;
            break;
        }
    }
    report.new_flows_after = last - base;
    report.waited_ms = started.elapsed().as_millis() as u64;
    let s = st.lock().expect("state lock");
    s.journal.record(
        "cluster",
        format!(
            "node \"{}\" drain: {} new flow(s) after the withdrawal, {}",
            report.node,
            report.new_flows_after,
            if report.quiet { "then none" } else { "still arriving at the timeout" }
        ),
        vec![],
    );
    Ok(Json(report))
}

/// `POST /v1/node/undrain`: announce this node's VIPs again.
async fn post_undrain(AxState(st): AxState<Shared>) -> Result<Json<crate::announce::Status>, ApiError> {
    let mut s = st.lock().expect("state lock");
    s.set_drained(false).map_err(|e| bad(e.to_string()))?;
    let status = s.cluster.as_ref().expect("set_drained checked").status.lock().expect("status").clone();
    Ok(Json(status))
}

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/node/drain", post(post_drain))
        .route("/v1/node/undrain", post(post_undrain))
        .route("/v1/events", get(get_events))
        .route("/v1/limits/raise", post(post_raise))
        .route("/v1/status", get(get_status))
        .route("/v1/services", get(get_services))
        .route("/v1/config/apply", post(post_config_apply))
        .route("/v1/services/{service}/backends/{address}/{action}", post(post_backend))
        .route("/v1/explain", get(get_explain))
        .route("/v1/review", get(get_review))
        .route("/v1/history/{service}", get(get_history))
        .route("/v1/history/{service}/{address}", get(get_history_backend))
        .layer(axum::extract::DefaultBodyLimit::max(1 << 20))
        .with_state(state)
}

/// Binds the control socket, root only (0600) from the moment it appears at `path`.
///
/// `bind` creates the socket with the umask's mode; a `chmod` after it leaves a window in which
/// anyone may connect (and a reader may see the wrong mode). So the socket is bound inside a
/// private 0700 directory beside `path`, set to 0600 there, and renamed into place: `rename` is
/// atomic, so `path` never names a socket with another mode. A directory the daemon creates for
/// it (`/run/sluice`) is 0700.
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    use std::os::unix::fs::DirBuilderExt as _;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| Error::other(format!("creating {}", dir.display()), e))?;
    let private = dir.join(format!(".sluice-bind-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private).map_err(|e| Error::other(format!("creating {}", private.display()), e))?;
    let staged = private.join("sock");
    let bound = (|| {
        let listener = UnixListener::bind(&staged).map_err(|e| Error::other(format!("binding the control socket {} (daemon.control_socket)", path.display()), e))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600)).map_err(|e| Error::other("chmod control socket", e))?;
        std::fs::rename(&staged, path).map_err(|e| Error::other(format!("moving the control socket into place at {}", path.display()), e))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// Serves the API on `listener` until `shutdown`, then removes the socket.
pub async fn serve(listener: UnixListener, path: PathBuf, state: Shared, shutdown: tokio_util::sync::CancellationToken) {
    tracing::info!(socket = %path.display(), "control API listening");
    let result = axum::serve(listener, router(state)).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
    let _ = std::fs::remove_file(&path);
    if let Err(e) = result {
        tracing::error!("control API: {e}");
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};

    use super::*;

    /// Under a umask that would leave a freshly bound socket open to everyone, a watcher polling
    /// the socket's path while it is bound over and over never sees it with any mode but 0600
    /// (binding and then chmod-ing in place fails this within a few hundred rounds).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_socket_is_never_seen_open() {
        let dir = std::env::temp_dir().join(format!("sluice-bind-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("run/sluice.sock");
        // SAFETY: umask only changes this process's file-creation mask.
        let old = unsafe { libc::umask(0) };
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seen = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(m) = std::fs::symlink_metadata(&path) {
                        if m.file_type().is_socket() {
                            assert_eq!(m.mode() & 0o777, 0o600, "the control socket was visible with mode {:o}", m.mode() & 0o777);
                            seen += 1;
                        }
                    }
                }
                seen
            })
        };
        for _ in 0..500 {
            let l = bind(&path).expect("bind");
            drop(l);
            let _ = std::fs::remove_file(&path);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let seen = watcher.join();
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let seen = seen.expect("watcher saw only 0600");
        assert!(seen > 0, "the watcher never saw the socket: the test proves nothing");
        let run = std::fs::metadata(dir.join("run")).expect("dir");
        assert_eq!(run.mode() & 0o777, 0o700, "the socket's directory is created 0700");
        assert_eq!(std::fs::read_dir(dir.join("run")).expect("dir").count(), 0, "no staging directory left behind");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
