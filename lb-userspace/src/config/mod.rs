//! The daemon's configuration file (TOML): parsing and semantic validation.
//!
//! Every problem is a [`Finding`] that names the file, the key path (`service[0].backend[1].
//! max_conns`) and the reason. Loading refuses a file with any error and applies nothing of it;
//! `sluice config check` prints errors and warnings and exits by severity.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::{DEFAULT_EVENTS_PER_SEC, DEFAULT_FLOW_CAPACITY, DEFAULT_PIN_DIR, DEFAULT_RING_SIZE, MAX_BACKENDS, MAX_SERVICES, MAX_SPILL};
use serde::{Deserialize, Deserializer, Serialize};

use crate::maglev::is_prime;

/// The largest Maglev ring a service may ask for.
pub const MAX_RING_SIZE: u32 = 1_000_003;

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub daemon: Daemon,
    #[serde(default)]
    pub flows: Flows,
    #[serde(default)]
    pub datapath: Datapath,
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceCfg>,
    #[serde(default)]
    pub alerts: AlertsCfg,
    /// Changes that lower what a service admits, judged against the load (`guard.rs`).
    #[serde(default)]
    pub guard: GuardCfg,
    /// Several nodes behind a router's ECMP: VIPs announced through BIRD. Without it, one node
    /// and no BIRD.
    #[serde(default)]
    pub cluster: Option<ClusterCfg>,
}

/// `[cluster]`: this node's part in a cluster (see `announce.rs`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterCfg {
    /// This node's name, in logs, the journal, metrics and alerts.
    pub node: String,
    /// BIRD's control socket.
    #[serde(default = "default_bird_socket")]
    pub bird_socket: PathBuf,
    /// Where the daemon writes `vips4.conf` and `vips6.conf`, which the node's BIRD config
    /// includes in a static protocol it exports over BGP.
    #[serde(default = "default_announce_dir")]
    pub announce_dir: PathBuf,
    /// The other nodes' peer channels (`peers.rs`): told which flows this node adopted after
    /// a rehash, so the node a flow left releases its slot at once.
    #[serde(default)]
    pub peers: Vec<SocketAddr>,
    /// Where this node's peer channel listens (its address on the nodes' network).
    #[serde(default)]
    pub peer_listen: Option<SocketAddr>,
    /// The key every node shares to authenticate the peer channel (HMAC-SHA256), 16+ bytes.
    #[serde(default)]
    pub peer_key_file: Option<PathBuf>,
    /// Mutual TLS on the peer channel (`peers.rs`): this node's certificate (a DNS name that is
    /// `node`, an IP address that is `peer_listen`'s), its key, and the cluster's CA.
    #[serde(default)]
    pub tls: Option<crate::tls::TlsFiles>,
    /// Connections the peer channel serves at once; more are closed at once and counted
    /// (`listen.rs`): a flood on `peer_listen` cannot take the daemon's file descriptors.
    #[serde(default = "default_peer_max_connections")]
    pub peer_max_connections: u32,
    /// `[cluster.limits]`: every backend's `max_conns` is for the whole cluster, each node
    /// enforcing a share of it leased through etcd (`limits.rs`). Without it, each node
    /// enforces `max_conns` on its own and no etcd is needed.
    #[serde(default)]
    pub limits: Option<LimitsCfg>,
}

/// `[cluster.limits]`: cluster-wide connection limits, shares leased through etcd.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsCfg {
    /// etcd's client URLs (`http://host:2379`, or `https://` with `tls`), tried in turn.
    pub etcd: Vec<String>,
    /// TLS to etcd (`https://` endpoints): the CA that signs etcd's certificate and, for an
    /// etcd started with `--client-cert-auth`, this node's certificate and key.
    #[serde(default)]
    pub tls: Option<EtcdTls>,
    /// An etcd user (etcd's RBAC), with its password in `password_file` (readable by its owner
    /// only).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The cluster's keys live under this prefix (several clusters may share one etcd).
    #[serde(default = "default_etcd_prefix")]
    pub prefix: String,
    /// This node's etcd lease: a node that lost etcd this long falls back to its safe share,
    /// twice this long it fences itself (while its peers reach etcd); what a gone node may hold
    /// is reserved for 2 × this after its lease expired, then freed (`limits.rs`).
    #[serde(default = "default_lease_ttl", deserialize_with = "duration")]
    pub lease_ttl: Duration,
    /// The cluster's nodes, for the safe share `floor(max_conns / nodes)` a node falls back to
    /// without etcd (unless a backend sets `safe_share`). Default: this node and its
    /// `cluster.peers`.
    #[serde(default)]
    pub nodes: Option<u32>,
}

/// `cluster.limits.tls`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    /// The CA etcd's certificate must chain to (its `--trusted-ca-file` CA, usually).
    pub ca: PathBuf,
    /// This node's client certificate and key, for `--client-cert-auth`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

fn default_etcd_prefix() -> String {
    "/sluice".into()
}
fn default_lease_ttl() -> Duration {
    Duration::from_secs(3)
}

impl ClusterCfg {
    /// The number of nodes the safe share divides `max_conns` by.
    pub fn limit_nodes(&self) -> u32 {
        self.limits.as_ref().and_then(|l| l.nodes).unwrap_or(self.peers.len() as u32 + 1).max(1)
    }
}

fn default_peer_max_connections() -> u32 {
    64
}

fn default_bird_socket() -> PathBuf {
    PathBuf::from("/run/bird/bird.ctl")
}
fn default_announce_dir() -> PathBuf {
    // Not under /run/sluice (0700, and removed when systemd stops the unit): BIRD (user `bird`)
    // must read the files, and a drain must outlive a stop.
    PathBuf::from("/var/lib/sluice/bird")
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
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
    #[serde(default = "default_http_header_timeout", deserialize_with = "duration")]
    pub http_header_timeout: Duration,
    /// The TCP listeners (`/metrics`, the peer channel): after its head, a request's body and
    /// answer within this, and no write of the answer waiting longer (a client that stops
    /// reading); past it the connection is closed.
    #[serde(default = "default_http_request_timeout", deserialize_with = "duration")]
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

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flows {
    /// Flow table entries (the table never evicts: when full, new flows are refused).
    #[serde(default = "default_capacity")]
    pub capacity: u32,
    #[serde(default)]
    pub timeouts: Timeouts,
}

fn default_capacity() -> u32 {
    DEFAULT_FLOW_CAPACITY
}

impl Default for Flows {
    fn default() -> Self {
        Self { capacity: DEFAULT_FLOW_CAPACITY, timeouts: Timeouts::default() }
    }
}

/// Idle timeouts by flow state, after which GC expires a flow and releases its slot.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    #[serde(default = "default_syn", deserialize_with = "duration")]
    pub syn: Duration,
    #[serde(default = "default_established", deserialize_with = "duration")]
    pub established: Duration,
    #[serde(default = "default_closing", deserialize_with = "duration")]
    pub closing: Duration,
    #[serde(default = "default_udp", deserialize_with = "duration")]
    pub udp: Duration,
}

fn default_syn() -> Duration {
    Duration::from_secs(10)
}
fn default_established() -> Duration {
    Duration::from_hours(2)
}
fn default_closing() -> Duration {
    Duration::from_secs(30)
}
fn default_udp() -> Duration {
    Duration::from_mins(1)
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { syn: default_syn(), established: default_established(), closing: default_closing(), udp: default_udp() }
    }
}

/// Load-time datapath choices (the `CONFIG` global of the XDP object).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Datapath {
    #[serde(default)]
    pub icmp_echo: IcmpEcho,
    #[serde(default)]
    pub fragments: Fragments,
    #[serde(default = "default_events")]
    pub events_per_sec: u32,
    /// Next hop for `ipip` packets; without it, the kernel's FIB decides.
    #[serde(default)]
    pub gateway_mac: Option<String>,
    #[serde(default = "default_encap4")]
    pub encap_source_v4: Ipv4Addr,
    #[serde(default = "default_encap6")]
    pub encap_source_v6: Ipv6Addr,
}

fn default_events() -> u32 {
    DEFAULT_EVENTS_PER_SEC
}
fn default_encap4() -> Ipv4Addr {
    Ipv4Addr::new(172, 16, 0, 0)
}
fn default_encap6() -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x511c, 0, 0, 0, 0, 0, 0)
}

impl Default for Datapath {
    fn default() -> Self {
        Self {
            icmp_echo: IcmpEcho::default(),
            fragments: Fragments::default(),
            events_per_sec: DEFAULT_EVENTS_PER_SEC,
            gateway_mac: None,
            encap_source_v4: default_encap4(),
            encap_source_v6: default_encap6(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IcmpEcho {
    #[default]
    Reply,
    Pass,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fragments {
    #[default]
    Drop,
    Pass,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceCfg {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub proto: Proto,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub overflow: Overflow,
    #[serde(default = "default_ring_size")]
    pub ring_size: u32,
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendCfg>,
    /// Labels on this service's alerts, added to `alerts.labels` (e.g. `{ team = "checkout" }`).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

fn default_ring_size() -> u32 {
    DEFAULT_RING_SIZE
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// As the config file (and the control API) writes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    L2dsr,
    Ipip,
}

/// What happens when the chosen backend cannot take a new flow.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overflow {
    /// Try other backends first: `true` (up to the datapath's maximum), `false`, or a number.
    #[serde(default)]
    pub spill: Spill,
    #[serde(default)]
    pub reject: Reject,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Spill {
    Enabled(bool),
    Candidates(u8),
}

impl Default for Spill {
    fn default() -> Self {
        Self::Enabled(false)
    }
}

impl Spill {
    /// Extra candidates the datapath tries.
    pub fn candidates(self) -> u8 {
        match self {
            Self::Enabled(false) => 0,
            Self::Enabled(true) => MAX_SPILL as u8,
            Self::Candidates(n) => n,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reject {
    #[default]
    Rst,
    Drop,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendCfg {
    pub address: IpAddr,
    /// Open connections allowed; reaching it refuses new connections (and alerts).
    pub max_conns: u32,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Start draining (no new flows) instead of active.
    #[serde(default)]
    pub drain: bool,
    /// Next-hop MAC for `l2dsr`; without it, the kernel's neighbour table is asked.
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub health: Option<Health>,
    /// With `[cluster.limits]`: the most this node admits while it has no word from etcd
    /// (default `floor(max_conns / cluster.limits.nodes)`). Keep the nodes' sum at or below
    /// `max_conns`.
    #[serde(default)]
    pub safe_share: Option<u32>,
}

fn default_weight() -> u32 {
    1
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    pub kind: HealthKind,
    #[serde(default = "default_interval", deserialize_with = "duration")]
    pub interval: Duration,
    #[serde(default = "default_health_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Port to check; the service port by default.
    #[serde(default)]
    pub port: Option<u16>,
    /// HTTP only: the path to GET and the status expected.
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default = "default_expect")]
    pub expect_status: u16,
    /// Consecutive successes to become healthy, failures to become unhealthy.
    #[serde(default = "default_rise")]
    pub rise: u32,
    #[serde(default = "default_fall")]
    pub fall: u32,
}

fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_health_timeout() -> Duration {
    Duration::from_millis(500)
}
fn default_expect() -> u16 {
    200
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    Tcp,
    Http,
}

/// Durations are written as strings: "500ms", "10s", "2h".
pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("\"{s}\" is not a duration ({e}); write e.g. \"500ms\", \"10s\", \"2h\"")))
}

/// Parses a MAC address written "02:00:00:00:00:01".
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

// The findings' vocabulary lives in `error.rs` (the bottom layer: `Error::Config` holds a
// `Rejected`); re-exported so that it reads as the config's.
pub use crate::error::{Finding, Rejected, Severity};

mod alerts;
mod guard;

pub(crate) use self::alerts::{parse_url, Target};
pub use self::{
    alerts::{AlertsCfg, BasicAuth, WebhookCfg, RESERVED_LABELS},
    guard::GuardCfg,
};

/// Parses `text` (from `file`, for messages) and validates it. `Ok` carries the config and its
/// warnings; `Err` every finding when there is at least one error.
pub fn parse(file: &Path, text: &str) -> Result<(Config, Vec<Finding>), Rejected> {
    let reject = |findings| Rejected { file: file.to_owned(), findings };
    let de = toml::de::Deserializer::parse(text).map_err(|e| reject(vec![Finding { severity: Severity::Error, key: String::new(), message: one_line(&e.to_string()) }]))?;
    let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        reject(vec![Finding { severity: Severity::Error, key, message: one_line(&e.into_inner().to_string()) }])
    })?;
    let mut findings = validate(&cfg);
    findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    if findings.iter().any(|f| f.severity == Severity::Error) {
        return Err(reject(findings));
    }
    Ok((cfg, findings))
}

/// The sections that take effect only when the daemon starts: a reload or `config apply` that
/// changes one is refused, naming it (the running datapath, socket, BIRD link and peer channel
/// were set up from the old values).
pub fn restart_only_change(next: &Config, running: &Config) -> Option<&'static str> {
    if next.daemon != running.daemon {
        Some("[daemon]")
    } else if next.datapath != running.datapath {
        Some("[datapath]")
    } else if next.flows.capacity != running.flows.capacity {
        Some("flows.capacity")
    } else if next.cluster != running.cluster {
        Some("[cluster]")
    } else {
        None
    }
}

/// Reads and parses a config file.
pub fn load(file: &Path) -> Result<(Config, Vec<Finding>), Rejected> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Rejected { file: file.to_owned(), findings: vec![Finding { severity: Severity::Error, key: String::new(), message: format!("cannot read it: {e}") }] })?;
    parse(file, &text)
}

/// toml's messages span several lines (a source excerpt); keep them readable on one.
fn one_line(s: &str) -> String {
    // Drop the source excerpt ("14 | port = …", "|", "^^^"); keep position and reason.
    let excerpt = |l: &str| l.starts_with('|') || l.split_once(" |").is_some_and(|(n, _)| n.chars().all(|c| c.is_ascii_digit()));
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty() && !excerpt(l) && !l.chars().all(|c| c == '^' || c == ' ')).collect();
    lines.join("; ")
}

/// Semantic checks that types alone cannot express.
#[expect(clippy::too_many_lines, reason = "one list of checks")]
pub fn validate(cfg: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut err = |key: String, message: String| out.push(Finding { severity: Severity::Error, key, message });
    let mut warnings = Vec::new();
    let mut warn = |key: String, message: String| warnings.push(Finding { severity: Severity::Warning, key, message });

    if cfg.daemon.interface.trim().is_empty() {
        err("daemon.interface".into(), "must name the interface to attach to".into());
    }
    let listeners = [
        Some(("daemon.metrics_max_connections", cfg.daemon.metrics_max_connections)),
        Some(("daemon.control_max_connections", cfg.daemon.control_max_connections)),
        cfg.cluster.as_ref().map(|c| ("cluster.peer_max_connections", c.peer_max_connections)),
    ];
    for (key, n) in listeners.into_iter().flatten() {
        if n == 0 {
            err(key.into(), "must be at least 1 (connections served at once; more are closed at once and counted)".into());
        } else if n > MAX_LISTENER_CONNECTIONS {
            err(key.into(), format!("{n} is above {MAX_LISTENER_CONNECTIONS}: each connection holds a file descriptor and up to 64 KiB of buffers"));
        }
    }
    let (header, request) = (cfg.daemon.http_header_timeout, cfg.daemon.http_request_timeout);
    if header < Duration::from_millis(100) || header > Duration::from_mins(5) {
        err("daemon.http_header_timeout".into(), format!("{header:?}: between 100ms and 5m (how long a connection may stay silent or trickle a request's head)"));
    }
    if request < Duration::from_secs(1) || request > Duration::from_hours(1) {
        err("daemon.http_request_timeout".into(), format!("{request:?}: between 1s and 1h (a request's body and answer)"));
    }
    match (&cfg.daemon.read_socket, &cfg.daemon.read_socket_group) {
        (Some(_), None) => err("daemon.read_socket_group".into(), "required with daemon.read_socket: the group whose members may read through it (e.g. \"sluice-read\")".into()),
        (None, Some(_)) => err("daemon.read_socket_group".into(), "set without daemon.read_socket (the read-only socket it opens to the group)".into()),
        (Some(path), Some(group)) => {
            if *path == cfg.daemon.control_socket {
                err(
                    "daemon.read_socket".into(),
                    format!("{} is daemon.control_socket's path: give the read-only socket its own (e.g. /run/sluice/sluice-read.sock)", path.display()),
                );
            }
            match nix::unistd::Group::from_name(group) {
                Ok(Some(_)) => {}
                Ok(None) => err("daemon.read_socket_group".into(), format!("no group named \"{group}\" on this machine: create it (`groupadd {group}`) or name an existing one")),
                Err(e) => err("daemon.read_socket_group".into(), format!("looking up the group \"{group}\": {e}")),
            }
        }
        (None, None) => {}
    }
    if let Some(c) = &cfg.cluster {
        if c.node.trim().is_empty() || c.node.contains(char::is_whitespace) {
            err("cluster.node".into(), format!("\"{}\" must be a name without spaces (this node's, e.g. \"lb1\")", c.node));
        }
        if (!c.peers.is_empty() || c.peer_listen.is_some()) && c.peer_key_file.is_none() && c.tls.is_none() {
            err(
                "cluster.tls".into(),
                "the peer channel (cluster.peers, cluster.peer_listen) needs mutual TLS (cluster.tls = { ca, cert, key }) or a shared key file (cluster.peer_key_file)".into(),
            );
        }
        if !c.peers.is_empty() && c.peer_listen.is_none() {
            err("cluster.peer_listen".into(), "with cluster.peers, this node must listen for its peers too (e.g. \"10.0.0.11:9478\")".into());
        }
        if c.peer_listen.is_some_and(|l| c.peers.contains(&l)) {
            err("cluster.peers".into(), "lists this node's own cluster.peer_listen; list the other nodes only".into());
        }
        if c.peer_listen.is_some() && (1..=MAX_LISTENER_CONNECTIONS).contains(&c.peer_max_connections) && (c.peer_max_connections as usize) < c.peers.len() {
            warn(
                "cluster.peer_max_connections".into(),
                format!("{} is below the {} peers: when they all report at once, some are refused and retry a second later", c.peer_max_connections, c.peers.len()),
            );
        }
        if let Some(l) = &c.limits {
            if l.etcd.is_empty() {
                err("cluster.limits.etcd".into(), "must list etcd's client URLs (e.g. [\"http://10.0.0.1:2379\"])".into());
            }
            for (i, u) in l.etcd.iter().enumerate() {
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    err(format!("cluster.limits.etcd[{i}]"), format!("{u:?}: an etcd client URL, http://host:port or https://host:port"));
                } else if u.starts_with("https://") != l.tls.is_some() {
                    let why = if l.tls.is_some() {
                        "plain http:// while cluster.limits.tls is set: use https://"
                    } else {
                        "https:// needs cluster.limits.tls = { ca = \"…\" } (and cert, key for --client-cert-auth)"
                    };
                    err(format!("cluster.limits.etcd[{i}]"), format!("{u:?}: {why}"));
                }
            }
            if let Some(t) = &l.tls {
                if t.cert.is_some() != t.key.is_some() {
                    err("cluster.limits.tls".into(), "cert and key go together (a client certificate and its private key)".into());
                }
            }
            if l.username.is_some() && l.tls.is_none() {
                warn("cluster.limits.password_file".into(), "etcd's password goes over plain http:// readable on the network; use https:// with cluster.limits.tls".into());
            }
            if l.username.is_some() != l.password_file.is_some() {
                err("cluster.limits.username".into(), "username and password_file go together (an etcd user and a file holding its password)".into());
            }
            if !l.prefix.starts_with('/') || l.prefix.ends_with('/') || l.prefix.contains(char::is_whitespace) {
                err("cluster.limits.prefix".into(), format!("{:?}: a key prefix like \"/sluice\" (leading slash, none at the end)", l.prefix));
            }
            if l.lease_ttl < Duration::from_secs(2) || l.lease_ttl > Duration::from_hours(1) {
                err("cluster.limits.lease_ttl".into(), format!("{:?}: between 2s and 1h (etcd counts leases in whole seconds)", l.lease_ttl));
            }
            if l.nodes == Some(0) {
                err("cluster.limits.nodes".into(), "must be at least 1".into());
            }
            if l.nodes.is_none() && c.peers.is_empty() {
                err("cluster.limits.nodes".into(), "how many nodes share the limits (their safe shares divide max_conns by it); set it, or list cluster.peers".into());
            }
        }
    }
    let label_ok = |k: &str| k.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_') && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    let labels = cfg
        .alerts
        .labels
        .keys()
        .map(|k| ("alerts.labels".to_owned(), k))
        .chain(cfg.services.iter().enumerate().flat_map(|(i, s)| s.labels.keys().map(move |k| (format!("service[{i}].labels"), k))));
    for (at, k) in labels {
        if !label_ok(k) {
            err(format!("{at}.{k}"), format!("\"{k}\" is not a label name (letters, digits, _; not starting with a digit)"));
        } else if RESERVED_LABELS.contains(&k.as_str()) {
            err(format!("{at}.{k}"), format!("\"{k}\" is set by Sluice itself; choose another name"));
        }
    }
    if !(1.0..=10.0).contains(&cfg.guard.headroom) {
        err("guard.headroom".into(), format!("{} must be between 1 and 10 (review suggests max_conns = peak × headroom, e.g. 1.25)", cfg.guard.headroom));
    }
    if cfg.guard.window < Duration::from_mins(1) || cfg.guard.window > Duration::from_hours(720) {
        err("guard.window".into(), format!("{:?}: between 1m and 30d (the history keeps minutes for 24 h, hours for 30 days)", cfg.guard.window));
    }
    if !cfg.daemon.metrics_listen.ip().is_loopback() && cfg.daemon.metrics_web_config.is_none() {
        warn(
            "daemon.metrics_listen".into(),
            format!("{} is reachable from the network without daemon.metrics_web_config (TLS, basic auth); metrics reveal backends and limits", cfg.daemon.metrics_listen),
        );
    }
    let a = &cfg.alerts;
    if !(0.0..1.0).contains(&a.near_limit_ratio) || a.near_limit_ratio == 0.0 {
        err("alerts.near_limit_ratio".into(), format!("{} must be between 0 and 1 (e.g. 0.8)", a.near_limit_ratio));
    }
    if !(0.0..=1.0).contains(&a.flow_table_ratio) || a.flow_table_ratio == 0.0 {
        err("alerts.flow_table_ratio".into(), format!("{} must be between 0 and 1 (e.g. 0.9)", a.flow_table_ratio));
    }
    if a.interval < Duration::from_millis(100) {
        err("alerts.interval".into(), format!("{:?} is too short; at least 100ms (1s is the default)", a.interval));
    }
    for (i, w) in a.webhook.iter().chain(&a.webhooks).enumerate() {
        let key = if a.webhook.is_some() && i == 0 { "alerts.webhook".to_owned() } else { format!("alerts.webhooks[{}]", i - usize::from(a.webhook.is_some())) };
        for f in alerts::validate_webhook(w, &key) {
            match f.severity {
                Severity::Error => err(f.key, f.message),
                Severity::Warning => warn(f.key, f.message),
            }
        }
    }
    if a.command.as_ref().is_some_and(Vec::is_empty) {
        err("alerts.command".into(), "must name a program (an argv list, e.g. [\"/usr/local/bin/page-oncall\"])".into());
    }
    if cfg.flows.capacity == 0 {
        err("flows.capacity".into(), "must be at least 1".into());
    }
    let t = &cfg.flows.timeouts;
    for (name, d) in [("syn", t.syn), ("established", t.established), ("closing", t.closing), ("udp", t.udp)] {
        if d.is_zero() {
            err(format!("flows.timeouts.{name}"), "must be longer than 0s".into());
        }
    }
    if t.syn > t.established {
        warn("flows.timeouts.syn".into(), format!("{:?} is longer than the established timeout {:?}: half-open flows outlive idle connections", t.syn, t.established));
    }
    if let Some(mac) = &cfg.datapath.gateway_mac {
        if parse_mac(mac).is_none() {
            err("datapath.gateway_mac".into(), format!("\"{mac}\" is not a MAC address (write 02:00:00:00:00:01)"));
        }
    }
    if cfg.services.len() > MAX_SERVICES as usize {
        err("service".into(), format!("{} services; the datapath holds at most {MAX_SERVICES}", cfg.services.len()));
    }
    let total_backends: usize = cfg.services.iter().map(|s| s.backends.len()).sum();
    if total_backends >= MAX_BACKENDS as usize {
        err("service".into(), format!("{total_backends} backends in all; the datapath holds at most {}", MAX_BACKENDS - 1));
    }

    let mut names = HashSet::new();
    let mut endpoints = HashSet::new();
    let mut sum_limits: u64 = 0;
    for (i, s) in cfg.services.iter().enumerate() {
        let k = format!("service[{i}]");
        if s.name.trim().is_empty() {
            err(format!("{k}.name"), "must not be empty".into());
        } else if !names.insert(s.name.as_str()) {
            err(format!("{k}.name"), format!("\"{}\" is used by another service", s.name));
        }
        if s.port == 0 {
            err(format!("{k}.port"), "must be 1..65535".into());
        }
        if !endpoints.insert((s.vip, s.port, s.proto)) {
            err(format!("{k}.vip"), format!("{}:{} {:?} is already another service's", s.vip, s.port, s.proto).to_lowercase());
        }
        if s.vip.is_unspecified() || s.vip.is_multicast() {
            err(format!("{k}.vip"), format!("{} cannot be a VIP", s.vip));
        }
        if !is_prime(s.ring_size) || s.ring_size < 13 || s.ring_size > MAX_RING_SIZE {
            err(format!("{k}.ring_size"), format!("{} must be a prime between 13 and {MAX_RING_SIZE} (e.g. 65537)", s.ring_size));
        } else if (s.ring_size as usize) < 100 * s.backends.len().max(1) {
            warn(format!("{k}.ring_size"), format!("{} slots for {} backends balances unevenly; use at least 100 per backend", s.ring_size, s.backends.len()));
        }
        if let Spill::Candidates(n) = s.overflow.spill {
            if u32::from(n) > MAX_SPILL {
                err(format!("{k}.overflow.spill"), format!("{n} candidates; the datapath tries at most {MAX_SPILL}"));
            }
        }
        if s.proto == Proto::Udp && s.overflow.reject == Reject::Rst {
            warn(format!("{k}.overflow.reject"), "\"rst\" applies to TCP only; refused UDP datagrams are dropped".into());
        }
        if s.backends.is_empty() {
            warn(format!("{k}.backend"), "no backends: every new connection is refused (no_backend)".into());
        }
        let mut addrs = HashSet::new();
        for (j, b) in s.backends.iter().enumerate() {
            let bk = format!("{k}.backend[{j}]");
            if !addrs.insert(b.address) {
                err(format!("{bk}.address"), format!("{} is already a backend of this service", b.address));
            }
            if s.mode == Mode::L2dsr && b.address.is_ipv4() != s.vip.is_ipv4() {
                err(format!("{bk}.address"), format!("{} and the VIP {} are of different address families; l2dsr cannot cross them (use mode = \"ipip\")", b.address, s.vip));
            }
            if b.max_conns == 0 {
                err(format!("{bk}.max_conns"), "is 0, which refuses every connection; drain the backend instead (drain = true)".into());
            }
            sum_limits += u64::from(b.max_conns);
            if let Some(safe) = b.safe_share {
                let limits = cfg.cluster.as_ref().and_then(|c| c.limits.as_ref());
                if limits.is_none() {
                    err(format!("{bk}.safe_share"), "is for cluster-wide limits only ([cluster.limits])".into());
                } else if safe > b.max_conns {
                    err(format!("{bk}.safe_share"), format!("{safe} is above max_conns ({}); the nodes' safe shares must sum to max_conns at most", b.max_conns));
                }
            }
            if b.weight == 0 {
                warn(format!("{bk}.weight"), "is 0: the backend is in no ring and gets no new flows".into());
            }
            if let Some(mac) = &b.mac {
                if parse_mac(mac).is_none() {
                    err(format!("{bk}.mac"), format!("\"{mac}\" is not a MAC address (write 02:00:00:00:00:01)"));
                }
            }
            if let Some(h) = &b.health {
                if h.interval.is_zero() {
                    err(format!("{bk}.health.interval"), "must be longer than 0s".into());
                }
                if h.timeout.is_zero() || h.timeout > h.interval {
                    err(format!("{bk}.health.timeout"), format!("{:?} must be above 0 and at most the interval {:?}", h.timeout, h.interval));
                }
                if h.rise == 0 || h.fall == 0 {
                    err(format!("{bk}.health"), "rise and fall must be at least 1".into());
                }
                match (h.kind, &h.path) {
                    (HealthKind::Http, Some(p)) if !p.starts_with('/') => err(format!("{bk}.health.path"), format!("\"{p}\" must start with /")),
                    (HealthKind::Tcp, Some(_)) => err(format!("{bk}.health.path"), "applies to kind = \"http\" only".into()),
                    _ => {}
                }
                if !(100..=599).contains(&h.expect_status) {
                    err(format!("{bk}.health.expect_status"), format!("{} is not an HTTP status", h.expect_status));
                }
            }
        }
    }
    if sum_limits > u64::from(cfg.flows.capacity) {
        warn(
            "flows.capacity".into(),
            format!("{} is below the sum of all max_conns ({sum_limits}): the flow table can fill before any limit is reached, refusing with flow_table_full", cfg.flows.capacity),
        );
    }
    out.extend(warnings);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[daemon]
interface = "eth0"
control_socket = "/run/sluice/sluice.sock"
metrics_listen = "127.0.0.1:9477"

[flows]
capacity = 1048576
timeouts = { syn = "10s", established = "2h", closing = "30s", udp = "1m" }

[[service]]
name = "web"
vip = "10.0.0.100"
port = 80
proto = "tcp"
mode = "l2dsr"
overflow = { spill = true, reject = "rst" }

[[service.backend]]
address = "10.0.0.11"
max_conns = 100
weight = 1
health = { kind = "tcp", interval = "1s" }

[[service.backend]]
address = "10.0.0.12"
max_conns = 100
health = { kind = "http", path = "/healthz", interval = "2s", timeout = "1s" }

[alerts]
webhooks = [{ url = "http://127.0.0.1:9093/api/v2/alerts" }, { url = "http://127.0.0.2:9093/api/v2/alerts" }]
"#;

    fn check(text: &str) -> Result<(Config, Vec<Finding>), Rejected> {
        parse(Path::new("sluice.toml"), text)
    }

    #[test]
    fn the_issue_example_parses() {
        let (cfg, warnings) = check(GOOD).expect("valid");
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(cfg.services[0].backends.len(), 2);
        assert_eq!(cfg.services[0].overflow.spill.candidates(), MAX_SPILL as u8);
        assert_eq!(cfg.flows.timeouts.udp, Duration::from_mins(1));
        assert_eq!(cfg.services[0].ring_size, 65537);
        let d = &cfg.daemon;
        assert_eq!(
            (d.metrics_max_connections, d.control_max_connections, d.http_header_timeout, d.http_request_timeout),
            (32, 64, Duration::from_secs(5), Duration::from_secs(30))
        );
    }

    const CLUSTER: &str = "[cluster]\nnode = \"lb1\"\n\n[cluster.limits]\netcd = [\"http://10.0.0.1:2379\"]\nnodes = 3\n";

    #[test]
    fn cluster_limits_parse_and_bad_ones_name_the_key() {
        let (cfg, _) = check(&format!("{GOOD}\n{CLUSTER}")).expect("valid");
        let c = cfg.cluster.expect("cluster");
        let l = c.limits.as_ref().expect("limits");
        assert_eq!((l.prefix.as_str(), l.lease_ttl, c.limit_nodes()), ("/sluice", Duration::from_secs(3), 3));
        assert_eq!(c.peer_max_connections, 64);
        // Fewer peer connections than peers: a warning, not an error.
        let few = format!("{GOOD}\n[cluster]\nnode = \"lb1\"\npeers = [\"10.0.0.2:9478\", \"10.0.0.3:9478\"]\npeer_listen = \"10.0.0.1:9478\"\npeer_key_file = \"/k\"\npeer_max_connections = 1\n");
        let (_, warnings) = check(&few).expect("warnings only");
        assert_eq!(warnings.iter().map(|w| w.key.as_str()).collect::<Vec<_>>(), ["cluster.peer_max_connections"], "{warnings:?}");
        let cases: &[(&str, &str, &str, &str)] = &[
            ("etcd = [\"http://10.0.0.1:2379\"]", "etcd = []", "cluster.limits.etcd", "must list"),
            ("etcd = [\"http://10.0.0.1:2379\"]", "etcd = [\"10.0.0.1:2379\"]", "cluster.limits.etcd[0]", "http://host:port"),
            ("nodes = 3", "nodes = 3\nlease_ttl = \"500ms\"", "cluster.limits.lease_ttl", "between 2s"),
            ("nodes = 3", "nodes = 3\nprefix = \"sluice/\"", "cluster.limits.prefix", "leading slash"),
            ("nodes = 3", "", "cluster.limits.nodes", "how many nodes"),
            ("nodes = 3", "nodes = 0", "cluster.limits.nodes", "at least 1"),
            ("nodes = 3", "nodes = 3\nttl = \"3s\"", "cluster.limits", "unknown field"),
            ("node = \"lb1\"", "node = \"lb1\"\npeer_max_connections = 0", "cluster.peer_max_connections", "at least 1"),
        ];
        for (from, to, key, reason) in cases {
            let text = format!("{GOOD}\n{}", CLUSTER.replacen(from, to, 1));
            let rejected = check(&text).err().unwrap_or_else(|| panic!("accepted with {to}"));
            let f = &rejected.findings[0];
            assert!(f.key.starts_with(key), "{to}: key {:?}, want {key}", f.key);
            assert!(f.message.contains(reason), "{to}: message {:?}, want {reason:?}", f.message);
        }
        // A safe share above max_conns, or without cluster-wide limits.
        let above = format!("{}\n{CLUSTER}", GOOD.replacen("max_conns = 100\nweight = 1", "max_conns = 100\nweight = 1\nsafe_share = 101", 1));
        assert!(check(&above).expect_err("refused").findings[0].message.contains("above max_conns"));
        let alone = GOOD.replacen("max_conns = 100\nweight = 1", "max_conns = 100\nweight = 1\nsafe_share = 10", 1);
        assert!(check(&alone).expect_err("refused").findings[0].message.contains("cluster-wide limits only"));
    }

    /// Each bad file: a replacement applied to GOOD, the key the error names, a word of the reason.
    #[test]
    fn bad_files_name_the_key_and_the_reason() {
        let cases: &[(&str, &str, &str, &str)] = &[
            ("max_conns = 100\nweight = 1", "max_conns = 0\nweight = 1", "service[0].backend[0].max_conns", "refuses every connection"),
            ("port = 80", "port = \"eighty\"", "service[0].port", "invalid type"),
            ("port = 80", "port = 70000", "service[0].port", "invalid value"),
            ("proto = \"tcp\"", "proto = \"sctp\"", "service[0].proto", "unknown variant"),
            ("mode = \"l2dsr\"", "mode = \"nat\"", "service[0].mode", "unknown variant"),
            ("vip = \"10.0.0.100\"", "vip = \"10.0.0.300\"", "service[0].vip", "invalid"),
            ("address = \"10.0.0.12\"", "address = \"10.0.0.11\"", "service[0].backend[1].address", "already a backend"),
            ("address = \"10.0.0.12\"", "address = \"2001:db8::12\"", "service[0].backend[1].address", "address families"),
            ("interval = \"1s\" }", "interval = \"soon\" }", "service[0].backend[0].health.interval", "not a duration"),
            ("timeout = \"1s\" }", "timeout = \"3s\" }", "service[0].backend[1].health.timeout", "at most the interval"),
            ("path = \"/healthz\"", "path = \"healthz\"", "service[0].backend[1].health.path", "must start with /"),
            ("capacity = 1048576", "capacity = 0", "flows.capacity", "at least 1"),
            ("mode = \"l2dsr\"", "mode = \"l2dsr\"\nring_size = 65536", "service[0].ring_size", "prime"),
            ("overflow = { spill = true", "overflow = { spill = 9", "service[0].overflow.spill", "at most"),
            ("max_conns = 100\nweight = 1", "max_conns = 100\nweigth = 1", "service[0].backend[0]", "unknown field"),
            ("interface = \"eth0\"", "interface = \"\"", "daemon.interface", "must name"),
            ("url = \"http://127.0.0.2:9093", "url = \"ftp://127.0.0.2:9093", "alerts.webhooks[1].url", "only http://"),
            ("[alerts]", "[alerts]\ncommand = []", "alerts.command", "must name a program"),
            ("interface = \"eth0\"", "interface = \"eth0\"\nmetrics_max_connections = 0", "daemon.metrics_max_connections", "at least 1"),
            ("interface = \"eth0\"", "interface = \"eth0\"\ncontrol_max_connections = 100001", "daemon.control_max_connections", "above 100000"),
            ("interface = \"eth0\"", "interface = \"eth0\"\nmetrics_max_connections = -1", "daemon.metrics_max_connections", "invalid value"),
            ("interface = \"eth0\"", "interface = \"eth0\"\nhttp_header_timeout = \"10ms\"", "daemon.http_header_timeout", "between 100ms and 5m"),
            ("interface = \"eth0\"", "interface = \"eth0\"\nhttp_request_timeout = \"2h\"", "daemon.http_request_timeout", "between 1s and 1h"),
            ("interface = \"eth0\"", "interface = \"eth0\"\nhttp_request_timeout = \"soon\"", "daemon.http_request_timeout", "not a duration"),
            ("interface = \"eth0\"", "interface = \"eth0\"\nread_socket = \"/run/sluice/sluice-read.sock\"", "daemon.read_socket_group", "required with daemon.read_socket"),
            ("interface = \"eth0\"", "interface = \"eth0\"\nread_socket_group = \"root\"", "daemon.read_socket_group", "without daemon.read_socket"),
            (
                "interface = \"eth0\"",
                "interface = \"eth0\"\nread_socket = \"/r.sock\"\nread_socket_group = \"no-such-group-sluice\"",
                "daemon.read_socket_group",
                "no group named \"no-such-group-sluice\"",
            ),
            (
                "interface = \"eth0\"",
                "interface = \"eth0\"\nread_socket = \"/run/sluice/sluice.sock\"\nread_socket_group = \"root\"",
                "daemon.read_socket",
                "control_socket's path",
            ),
        ];
        for (from, to, key, reason) in cases {
            assert!(GOOD.contains(from), "bad case: {from}");
            let text = GOOD.replacen(from, to, 1);
            let rejected = check(&text).err().unwrap_or_else(|| panic!("accepted with {to}"));
            let f = &rejected.findings[0];
            assert_eq!(f.severity, Severity::Error);
            assert!(f.key.starts_with(key), "{to}: key {:?}, want {key}", f.key);
            assert!(f.message.contains(reason), "{to}: message {:?}, want {reason:?}", f.message);
            let shown = rejected.to_string();
            assert!(shown.contains("sluice.toml") && shown.contains(key), "{shown}");
        }
    }

    #[test]
    fn a_read_socket_with_an_existing_group_parses() {
        let text = GOOD.replacen("interface = \"eth0\"", "interface = \"eth0\"\nread_socket = \"/run/sluice/sluice-read.sock\"\nread_socket_group = \"root\"", 1);
        let (cfg, warnings) = check(&text).expect("valid");
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!((cfg.daemon.read_socket.as_deref(), cfg.daemon.read_socket_group.as_deref()), (Some(Path::new("/run/sluice/sluice-read.sock")), Some("root")));
        assert_eq!(check(GOOD).expect("valid").0.daemon.read_socket, None, "off by default");
    }

    #[test]
    fn duplicate_services_and_names_are_errors() {
        let dup = format!("{GOOD}\n[[service]]\nname = \"web\"\nvip = \"10.0.0.100\"\nport = 80\nproto = \"tcp\"\n[[service.backend]]\naddress = \"10.0.0.13\"\nmax_conns = 5\n");
        let r = check(&dup).expect_err("duplicates");
        let keys: Vec<&str> = r.findings.iter().map(|f| f.key.as_str()).collect();
        assert!(keys.contains(&"service[1].name") && keys.contains(&"service[1].vip"), "{keys:?}");
    }

    #[test]
    fn warnings_do_not_refuse() {
        let text = GOOD.replacen("capacity = 1048576", "capacity = 150", 1).replacen("127.0.0.1:9477", "0.0.0.0:9477", 1);
        let (_, warnings) = check(&text).expect("warnings only");
        let keys: Vec<&str> = warnings.iter().map(|f| f.key.as_str()).collect();
        assert_eq!(keys, ["daemon.metrics_listen", "flows.capacity"]);
        assert!(warnings[1].message.contains("200"), "sum of limits named: {}", warnings[1].message);
    }

    #[test]
    fn syntax_errors_are_one_readable_line() {
        let r = check("[daemon\ninterface = 1").expect_err("syntax");
        assert_eq!(r.findings.len(), 1);
        assert!(!r.findings[0].message.contains('\n'));
        assert!(r.findings[0].message.contains("line 1"), "{}", r.findings[0].message);
    }

    #[test]
    fn macs() {
        assert_eq!(parse_mac("02:00:00:00:00:0a"), Some([2, 0, 0, 0, 0, 10]));
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:00:00"), None);
        assert_eq!(parse_mac("zz:00:00:00:00:00"), None);
    }
}
