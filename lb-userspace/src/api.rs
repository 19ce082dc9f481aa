//! The control API: JSON over HTTP on a Unix socket (mode 0600, so root only). The CLI is a
//! client of it. Every change goes through the same path as a config file — the daemon's
//! current config is edited, validated, then applied — so a request that fails changes nothing.

use std::{
    net::{IpAddr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
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
    config::{self, BackendCfg, Config, Finding, Proto, Severity},
    daemon::State,
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

#[derive(Serialize, Debug)]
pub struct BackendReport {
    pub address: IpAddr,
    pub id: u32,
    pub state: String,
    pub open: u64,
    pub max_conns: u32,
    pub weight: u32,
    pub removed: bool,
    /// Totals since the datapath was loaded (rates are the reader's job).
    pub new_flows: u64,
    pub refused: std::collections::BTreeMap<&'static str, u64>,
}

#[derive(Serialize, Debug)]
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
}

fn services(st: &mut State) -> Result<Vec<ServiceReport>, Error> {
    let mut out = Vec::new();
    let applied: Vec<_> = st.applied.services.values().cloned().collect();
    for s in applied {
        let mut backends = Vec::new();
        for b in s.backends.values() {
            let ts = st.dp.tables().backend_stats(b.id)?;
            backends.push(BackendReport {
                new_flows: ts.new_flows,
                refused: lb_common::Reason::ALL.iter().map(|r| (r.name(), ts.refused.get(*r))).filter(|(_, n)| *n > 0).collect(),
                address: b.address,
                id: b.id,
                state: state_name(b.state).into(),
                open: st.conns.get(b.id),
                max_conns: b.max_conns,
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
    drop(t);
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
    /// Only show what would change.
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Serialize, Debug)]
pub struct ApplyResponse {
    pub applied: bool,
    pub changes: Vec<Change>,
    pub warnings: Vec<Finding>,
}

async fn post_config_apply(AxState(st): AxState<Shared>, Json(req): Json<ApplyRequest>) -> Result<Json<ApplyResponse>, ApiError> {
    let (file, text) = match (&req.path, &req.toml) {
        (Some(p), None) => (p.clone(), std::fs::read_to_string(p).map_err(|e| bad(format!("{}: cannot read it: {e}", p.display())))?),
        (None, Some(t)) => (PathBuf::from("<request>"), t.clone()),
        _ => return Err(bad("give either \"path\" or \"toml\"")),
    };
    let (cfg, warnings) = config::parse(&file, &text).map_err(|r| ApiError(StatusCode::UNPROCESSABLE_ENTITY, r.to_string()))?;
    {
        let st = st.lock().expect("state lock");
        if cfg.daemon != st.cfg.daemon || cfg.flows.capacity != st.cfg.flows.capacity || cfg.datapath != st.cfg.datapath {
            return Err(ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("{}: [daemon], [datapath] and flows.capacity take effect on restart only; change them in the file the daemon starts with and restart it", file.display()),
            ));
        }
    }
    if req.dry_run {
        let changes = State::plan(&st, &cfg).await?;
        return Ok(Json(ApplyResponse { applied: false, changes, warnings }));
    }
    let changes = State::apply(&st, cfg).await?;
    if let Some(p) = &req.path {
        st.lock().expect("state lock").cfg_path.clone_from(p);
    }
    Ok(Json(ApplyResponse { applied: true, changes, warnings }))
}

#[derive(Deserialize, Serialize, Debug, Default)]
pub struct BackendRequest {
    pub max_conns: Option<u32>,
    pub weight: Option<u32>,
}

/// `POST /v1/services/{service}/backends/{address}/{action}`: add, remove, drain, undrain,
/// set-limit. Edits the running config and applies it like a file.
async fn post_backend(
    AxState(st): AxState<Shared>,
    UrlPath((service, address, action)): UrlPath<(String, IpAddr, String)>,
    body: Option<Json<BackendRequest>>,
) -> Result<Json<ApplyResponse>, ApiError> {
    let body = body.map(|b| b.0).unwrap_or_default();
    let mut cfg: Config = st.lock().expect("state lock").cfg.clone();
    let svc = cfg.services.iter_mut().find(|s| s.name == service).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no service named \"{service}\"")))?;
    let idx = svc.backends.iter().position(|b| b.address == address);
    let missing = || ApiError(StatusCode::NOT_FOUND, format!("service \"{service}\" has no backend {address}"));
    match action.as_str() {
        "add" => {
            if idx.is_some() {
                return Err(bad(format!("service \"{service}\" already has backend {address}")));
            }
            let max_conns = body.max_conns.ok_or_else(|| bad("adding a backend needs \"max_conns\""))?;
            svc.backends.push(BackendCfg { address, max_conns, weight: body.weight.unwrap_or(1), drain: false, mac: None, health: None });
        }
        "remove" => {
            svc.backends.remove(idx.ok_or_else(missing)?);
        }
        "drain" => svc.backends[idx.ok_or_else(missing)?].drain = true,
        "undrain" => svc.backends[idx.ok_or_else(missing)?].drain = false,
        "set-limit" => {
            let b = &mut svc.backends[idx.ok_or_else(missing)?];
            b.max_conns = body.max_conns.ok_or_else(|| bad("set-limit needs \"max_conns\""))?;
            if let Some(w) = body.weight {
                b.weight = w;
            }
        }
        other => return Err(bad(format!("unknown action \"{other}\" (add, remove, drain, undrain, set-limit)"))),
    }
    let findings = config::validate(&cfg);
    if let Some(e) = findings.iter().find(|f| f.severity == Severity::Error) {
        return Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("refused, nothing changed: {e}")));
    }
    let warnings = findings.into_iter().filter(|f| f.severity == Severity::Warning).collect();
    let changes = State::apply(&st, cfg).await?;
    Ok(Json(ApplyResponse { applied: true, changes, warnings }))
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
    let cfg = {
        let mut s = st.lock().expect("state lock");
        let known = s.cfg.services.iter().any(|x| x.name == req.service && x.backends.iter().any(|b| b.address == req.backend));
        if !known {
            return Err(ApiError(StatusCode::NOT_FOUND, format!("service \"{}\" has no backend {} in the config", req.service, req.backend)));
        }
        let until_wall = humantime::format_rfc3339_seconds(std::time::SystemTime::now() + ttl).to_string();
        tracing::warn!(service = %req.service, backend = %req.backend, "break-glass: max_conns = {} until {until_wall}", req.max_conns);
        s.journal.record("limit", format!("break-glass: service \"{}\" backend {} max_conns = {} until {until_wall}", req.service, req.backend, req.max_conns), vec![]);
        s.overrides.insert((req.service.clone(), req.backend), crate::daemon::Override { max_conns: req.max_conns, until: std::time::Instant::now() + ttl, until_wall });
        s.cfg.clone()
    };
    let changes = State::apply(&st, cfg).await?;
    Ok(Json(ApplyResponse { applied: true, changes, warnings: Vec::new() }))
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

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/events", get(get_events))
        .route("/v1/limits/raise", post(post_raise))
        .route("/v1/status", get(get_status))
        .route("/v1/services", get(get_services))
        .route("/v1/config/apply", post(post_config_apply))
        .route("/v1/services/{service}/backends/{address}/{action}", post(post_backend))
        .route("/v1/explain", get(get_explain))
        .layer(axum::extract::DefaultBodyLimit::max(1 << 20))
        .with_state(state)
}

/// Binds the control socket, root only (0600).
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::other(format!("creating {}", dir.display()), e))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| Error::other(format!("binding the control socket {} (daemon.control_socket)", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| Error::other("chmod control socket", e))?;
    Ok(listener)
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
