//! `[daemon]`: where the datapath attaches, the daemon's sockets, listeners and files.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use lb_common::DEFAULT_PIN_DIR;

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Daemon {
    /// The interface XDP attaches to.
    pub interface: String,
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: SocketAddr,
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// The event journal (JSON lines) that `sluice timeline` renders.
    #[serde(default = "default_journal")]
    pub journal: PathBuf,
    #[serde(default = "default_journal_max")]
    pub journal_max_bytes: u64,
    /// The exporter toolkit's web configuration file (`tls_server_config`, bcrypt
    /// `basic_auth_users`) for `/metrics` (`webconfig.rs`); without it, plain HTTP.
    #[serde(default)]
    pub metrics_web_config: Option<PathBuf>,
    /// Connections `/metrics` serves at once; more are closed at once and counted (`listen.rs`).
    #[serde(default = "default_metrics_max_connections")]
    pub metrics_max_connections: u32,
    /// Connections the control socket serves at once.
    #[serde(default = "default_control_max_connections")]
    pub control_max_connections: u32,
    /// Every listener (`/metrics`, the peer channel, the control socket): a request's head must
    /// be complete within this from the connection's opening or its previous answer; a silent
    /// connection, or one trickling its headers, is closed past it.
    #[serde(default = "default_http_header_timeout", with = "crate::config::humantime_str")]
    pub http_header_timeout: Duration,
    /// The TCP listeners (`/metrics`, the peer channel): after its head, a request's body and
    /// answer within this, and no write of the answer waiting longer (a client that stops
    /// reading); past it the connection is closed.
    #[serde(default = "default_http_request_timeout", with = "crate::config::humantime_str")]
    pub http_request_timeout: Duration,
    /// A second, read-only control socket (e.g. `/run/sluice/sluice-read.sock`) for monitoring
    /// users: mode 0660, group-owned by `read_socket_group`; every GET of the API answers on it,
    /// every change is refused (403) naming the root socket.
    #[serde(default)]
    pub read_socket: Option<PathBuf>,
    /// The group whose members may use `read_socket` (it must exist); required with it.
    #[serde(default)]
    pub read_socket_group: Option<String>,
}

impl Daemon {
    /// On `interface`, every other setting at its default (what a file with only
    /// `interface = "…"` says).
    pub fn new(interface: impl Into<String>) -> Self {
        Self {
            interface: interface.into(),
            control_socket: default_control_socket(),
            metrics_listen: default_metrics_listen(),
            pin_dir: default_pin_dir(),
            xdp_mode: XdpMode::default(),
            journal: default_journal(),
            journal_max_bytes: default_journal_max(),
            metrics_web_config: None,
            metrics_max_connections: default_metrics_max_connections(),
            control_max_connections: default_control_max_connections(),
            http_header_timeout: default_http_header_timeout(),
            http_request_timeout: default_http_request_timeout(),
            read_socket: None,
            read_socket_group: None,
        }
    }
}

fn default_metrics_max_connections() -> u32 {
    32
}
fn default_control_max_connections() -> u32 {
    64
}
fn default_http_header_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_http_request_timeout() -> Duration {
    Duration::from_secs(30)
}
/// The most connections a listener may be configured to serve at once.
pub const MAX_LISTENER_CONNECTIONS: u32 = 100_000;

fn default_journal() -> PathBuf {
    PathBuf::from("/var/lib/sluice/journal.jsonl")
}
fn default_journal_max() -> u64 {
    10 << 20
}

fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/sluice/sluice.sock")
}
fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9477))
}
fn default_pin_dir() -> PathBuf {
    PathBuf::from(DEFAULT_PIN_DIR)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    #[default]
    Auto,
    Native,
    Generic,
}
