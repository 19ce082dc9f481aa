//! What the control API sends and takes: one definition for the server (`api/`), the daemon
//! that builds the answers (below it, so the daemon needs no part of the API), its client
//! (`client.rs`, so the CLI) and the lab. Every type derives both `Serialize` and `Deserialize`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{Finding, Mode, Proto},
    gc::{Drift, Sweep},
    history::{Peak, Slot},
    reconcile::Change,
};

/// A backend in `GET /v1/services` and `/v1/status`.
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
    pub cluster: Option<crate::status::limits::BackendLimit>,
    pub weight: u32,
    pub removed: bool,
    /// Totals since the datapath was loaded (rates are the reader's job).
    pub new_flows: u64,
    /// Refusals charged to it, by reason (reasons with none left out).
    pub refused: BTreeMap<String, u64>,
}

/// A service in `GET /v1/services` and `/v1/status`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ServiceReport {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub proto: Proto,
    pub mode: Mode,
    pub backends: Vec<BackendReport>,
}

/// A break-glass limit in force (`sluice limit raise`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct BreakGlass {
    pub service: String,
    pub backend: IpAddr,
    pub max_conns: u32,
    /// When it reverts, RFC 3339.
    pub until: String,
}

/// `GET /v1/status`.
#[derive(Serialize, Deserialize, Debug, Clone)]
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
    pub break_glass: Vec<BreakGlass>,
    pub outcomes: crate::stats::Snapshot,
    /// This node's announcements, with a `[cluster]` section.
    pub cluster: Option<crate::status::announce::Status>,
    /// The peer channel's counts, with `cluster.peers`.
    pub peers: Option<crate::status::peers::Stats>,
    /// Cluster-wide limits, with `[cluster.limits]`.
    pub limits: Option<crate::status::limits::Status>,
    /// The listeners (control socket, `/metrics`, peer channel): their bounds and what they
    /// refused and timed out (`listen.rs`).
    #[serde(default)]
    pub listeners: Vec<crate::listen::ListenerReport>,
    /// Descriptors open, the open-file limit, and what the config may need (`openfiles.rs`).
    #[serde(default)]
    pub open_files: Option<crate::openfiles::OpenFiles>,
    /// How long the daemon's state lock was held: the longest hold and where (`daemon/lock.rs`).
    #[serde(default)]
    pub state_lock: crate::status::lock::LockReport,
}

/// `POST /v1/config/apply`.
#[derive(Deserialize, Serialize, Debug, Default, Clone)]
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

/// What a change did (or, with `dry_run`, would do): config apply, backend edits, break-glass.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ApplyResponse {
    pub applied: bool,
    pub changes: Vec<Change>,
    pub warnings: Vec<Finding>,
    /// The guard's verdict (`guard.rs`).
    pub guard: crate::guard::Verdict,
}

/// `POST /v1/services/{service}/backends/{address}/{action}`.
#[derive(Deserialize, Serialize, Debug, Default, Clone)]
pub struct BackendRequest {
    pub max_conns: Option<u32>,
    pub weight: Option<u32>,
    /// Apply it although the guard refuses it.
    #[serde(default)]
    pub force: bool,
}

/// `GET /v1/explain`.
#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct ExplainQuery {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    #[serde(default = "tcp", deserialize_with = "crate::config::service_proto")]
    pub proto: Proto,
}

fn tcp() -> Proto {
    Proto::Tcp
}

/// `POST /v1/limits/raise`: a temporary max_conns that reverts by itself.
#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct RaiseRequest {
    pub service: String,
    pub backend: IpAddr,
    pub max_conns: u32,
    /// How long, e.g. "30m".
    pub ttl: String,
}

/// `GET /v1/events`.
#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct EventsQuery {
    #[serde(default)]
    pub after: u64,
    #[serde(default = "events_limit")]
    pub limit: usize,
}

fn events_limit() -> usize {
    1000
}

/// `POST /v1/node/drain`.
#[derive(Deserialize, Serialize, Debug, Default, Clone)]
pub struct DrainRequest {
    /// How long to wait for the router to stop sending new flows, e.g. "60s".
    pub timeout: Option<String>,
}

/// What a drain did and measured.
#[derive(Deserialize, Serialize, Debug, Clone)]
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
    /// No new flow for a quiet spell before the timeout: the router sends this node none.
    pub quiet: bool,
    pub waited_ms: u64,
    pub error: Option<String>,
}

/// `GET /v1/review`: the running config against the load (`sluice config review`).
#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct Review {
    /// Unix seconds.
    pub now: u64,
    /// `guard.headroom`: suggestions are the 30-day peak times this.
    pub headroom: f64,
    pub window_s: u64,
    pub services: Vec<ReviewService>,
}

#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct ReviewService {
    pub name: String,
    /// The sum of its backends' `max_conns`.
    pub capacity: u64,
    pub peak_24h: Peak,
    /// Its capacity with its largest backend lost.
    pub n_minus_1: u64,
    /// Whether that carries the 24-hour peak, in a sentence.
    pub n_minus_1_verdict: String,
    pub backends: Vec<ReviewBackend>,
}

#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct ReviewBackend {
    pub address: IpAddr,
    pub max_conns: u32,
    pub open: u64,
    pub peak_1h: Peak,
    pub peak_24h: Peak,
    pub peak_30d: Peak,
    /// `max_conns` less the load (the larger of open now and the 30-day peak).
    pub headroom: i64,
    /// The load × headroom, rounded up to two significant digits.
    pub suggested: u64,
    /// "BELOW PEAK", "CLOSE TO PEAK" or "".
    pub flag: String,
}

/// `GET /v1/history/{service}[/{address}]`.
#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct HistoryReport {
    /// Unix seconds.
    pub now: u64,
    pub service: String,
    pub backends: Vec<BackendHistory>,
}

#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct BackendHistory {
    pub address: IpAddr,
    pub peak_24h: Peak,
    pub peak_30d: Peak,
    /// (Unix seconds of the minute, its slot), oldest first: 24 hours.
    pub minutes: Vec<(u64, Slot)>,
    /// The same per hour: 30 days.
    pub hours: Vec<(u64, Slot)>,
}

/// A refused request: what the daemon said.
#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct ApiErrorBody {
    pub error: String,
}
