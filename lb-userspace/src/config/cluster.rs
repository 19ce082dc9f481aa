//! `[cluster]` and `[cluster.limits]`: this node's part in a cluster.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

/// `[cluster]`: this node's part in a cluster (see `announce.rs`).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
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
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
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
    #[serde(default = "default_lease_ttl", with = "crate::config::humantime_str")]
    pub lease_ttl: Duration,
    /// The cluster's nodes, for the safe share `floor(max_conns / nodes)` a node falls back to
    /// without etcd (unless a backend sets `safe_share`). Default: this node and its
    /// `cluster.peers`.
    #[serde(default)]
    pub nodes: Option<u32>,
}

/// `cluster.limits.tls`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
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

impl ClusterCfg {
    /// Node `node`, every other setting at its default.
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            bird_socket: default_bird_socket(),
            announce_dir: default_announce_dir(),
            peers: Vec::new(),
            peer_listen: None,
            peer_key_file: None,
            tls: None,
            peer_max_connections: default_peer_max_connections(),
            limits: None,
        }
    }
}

impl LimitsCfg {
    /// Shares leased through the etcd cluster at `etcd`, every other setting at its default.
    pub fn new(etcd: Vec<String>) -> Self {
        Self { etcd, tls: None, username: None, password_file: None, prefix: default_etcd_prefix(), lease_ttl: default_lease_ttl(), nodes: None }
    }
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
