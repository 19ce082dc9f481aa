//! Cluster-wide limits through etcd (`[cluster.limits]`): this node's side. Every round
//! (`ROUND`) it
//! 1. keeps its lease alive (one lease per daemon; every key it writes is attached to it);
//! 2. publishes its report under `<prefix>/nodes/<node>`: per backend its `max_conns`, open
//!    connections, the limit it enforces, what it refused for lack of share (`shares/`);
//! 3. reads the whole prefix in one request: the leader, every live node's report, the grants;
//! 4. if no node leads, tries to (a key created only if absent, under its lease); if it leads,
//!    runs the allocator and writes the grants that change in one transaction, which holds
//!    only while it still leads;
//! 5. applies a newer grant for itself through the daemon's change path, then reports at once
//!    (the acknowledgement the allocator waits for before it grants capacity elsewhere).
//!
//! Without etcd a node never raises a limit: it keeps its shares until its lease would have
//! expired (counted from the last keep-alive it sent that etcd answered), then enforces the
//! smaller of each share and its safe share, alerts, and joins again with a new lease once etcd
//! answers. A restarted daemon resumes its lease (kept in its state directory, in a file named
//! by the node) if it is still alive and no other node's report holds it, so a restart moves
//! no capacity.
//!
//! **A node that cannot coordinate cannot push the cluster over** (docs/ARCHITECTURE.md):
//! - every node keeps, without a lease, what it may hold per backend (`<prefix>/holds/<node>`:
//!   `max(open, applied)`). When its lease is gone the allocator keeps reserving that (or its
//!   last grant, if larger) instead of granting it to the others;
//! - a node cut off from etcd for `2 × lease_ttl` while a peer says (over the peer channel) that
//!   it reaches etcd *fences* itself: it withdraws its VIPs from BIRD and admits nothing, so its
//!   flows move to nodes that count them. It announces again once it is granted shares;
//! - a node whose lease is gone but whose peer channel still speaks (cut off from etcd only)
//!   says in each heartbeat what it may hold (`max(open, limit)` per backend, a number that only
//!   falls without etcd): the allocator reserves exactly that, and releases it when the node
//!   says it holds nothing (fenced, its connections closed or moved), however long they last;
//! - a node not heard from: the allocator releases its reservation `2 × lease_ttl` after it
//!   first saw the lease gone: by then a node still running has fenced itself (it lost etcd at
//!   least a `lease_ttl` before its lease expired), and a crashed one holds nothing. So a crashed
//!   node's capacity is back after `3 × lease_ttl` at most (lease expiry, then the release).
//!
//! When every node loses etcd, none is fenced (no peer reaches etcd): each keeps the smaller of
//! its share and its safe share, which sum to at most the limit.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use etcd_client::{Client, WatchStream};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{ClusterCfg, LimitsCfg},
    daemon::Daemon,
    shares::Holds,
    Error,
};

mod grants;
mod lease;
mod round;

pub use self::grants::on_stop;

/// How this node connects to etcd: TLS and a user, read and checked at start
/// (`cluster.limits.tls`, `username`, `password_file`).
#[derive(Clone, Default)]
pub struct Connect {
    tls: Option<etcd_client::TlsOptions>,
    user: Option<(String, String)>,
    /// The files, named in errors: a refused certificate says which to look at.
    files: Option<String>,
    /// This node's certificate and the CA, to say why etcd may refuse it.
    own: Option<(PathBuf, PathBuf)>,
}

impl Connect {
    pub fn load(cfg: &LimitsCfg) -> Result<Self, Error> {
        let mut c = Self::default();
        if let Some(t) = &cfg.tls {
            // Read with the checks every TLS file gets (`tls.rs`): a clear error at start, not
            // an opaque one at the first request.
            crate::tls::read_roots(&t.ca, "cluster.limits.tls.ca")?;
            let pem = |p: &std::path::Path, key: &str| std::fs::read(p).map_err(|e| Error::other(format!("reading {key} {}", p.display()), e));
            let mut opts = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(pem(&t.ca, "cluster.limits.tls.ca")?));
            let mut files = format!("ca {}", t.ca.display());
            if let (Some(cert), Some(key)) = (&t.cert, &t.key) {
                crate::tls::read_certs(cert, "cluster.limits.tls.cert")?;
                crate::tls::read_key(key, "cluster.limits.tls.key")?;
                opts = opts.identity(etcd_client::Identity::from_pem(pem(cert, "cluster.limits.tls.cert")?, pem(key, "cluster.limits.tls.key")?));
                files.push_str(&format!(", cert {}", cert.display()));
                c.own = Some((cert.clone(), t.ca.clone()));
            }
            c.tls = Some(opts);
            c.files = Some(files);
        }
        if let (Some(user), Some(file)) = (&cfg.username, &cfg.password_file) {
            c.user = Some((user.clone(), crate::tls::read_secret(file, "cluster.limits.password_file")?));
        }
        Ok(c)
    }

    /// An etcd error, with the TLS reason (and the files to look at) when there is one: tonic's
    /// own message says only "transport error".
    fn explain(&self, e: &Error) -> String {
        let reason = crate::tls::reason_in(e);
        // A refused client certificate says little on the wire (with TLS 1.3 the connection
        // just closes after the handshake): look at this node's certificate.
        let own = self.own.as_ref().and_then(|(cert, ca)| crate::tls::diagnose_own(cert, ca));
        match (reason, own) {
            (None, None) => e.to_string(),
            (reason, own) => {
                let own = own.map_or(String::new(), |d| format!("cluster.limits.tls.cert {d}, so an etcd trusting that CA refuses it; "));
                let reason = reason.map_or(String::new(), |r| format!("{r}; "));
                format!("{e}: TLS: {reason}{own}(cluster.limits.tls: {})", self.files.as_deref().unwrap_or("none"))
            }
        }
    }
}

/// What the limits task shares with the rest of the cluster's tasks.
#[derive(Clone, Default)]
pub struct Links {
    /// Set after each round: whether etcd answered (the peer channel tells the peers).
    pub etcd_ok: Arc<AtomicBool>,
    /// The peer channel's state: which peers said lately that they reach etcd.
    pub peers: Option<Arc<Mutex<crate::peers::Stats>>>,
    /// TLS and a user for etcd.
    pub connect: Connect,
}

/// A peer's word that it reaches etcd counts this long (it repeats it every second).
const PEER_WORD: Duration = Duration::from_secs(3);

/// How often a node reports, reads the grants and (leading) allocates.
pub const ROUND: Duration = Duration::from_millis(200);
/// A node that changed nothing reports at least this often.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Each etcd request gives up after this (a round never waits longer on a dead etcd).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

pub use crate::status::limits::{BackendLimit, Status, Traffic};

fn key_nodes(prefix: &str) -> String {
    format!("{prefix}/nodes/")
}
fn key_grants(prefix: &str) -> String {
    format!("{prefix}/grants/")
}
fn key_leader(prefix: &str) -> String {
    format!("{prefix}/leader")
}
fn key_holds(prefix: &str) -> String {
    format!("{prefix}/holds/")
}

/// This node's state between rounds.
struct Node {
    cfg: LimitsCfg,
    name: String,
    /// How many nodes the safe share divides by.
    nodes: u32,
    lease_file: PathBuf,
    links: Links,
    /// What this node last wrote under `holds/` (written again only when it changes).
    holds_written: Option<Holds>,
    /// Leading: when each node whose lease is gone was first seen so.
    gone_since: BTreeMap<String, Instant>,
    fenced: bool,
    client: Option<Client>,
    lease: Option<i64>,
    /// The lease's keep-alive task, and what it found: when the request of the last keep-alive
    /// etcd answered was sent, whether etcd said the lease is gone, the requests it sent.
    keepalive: Option<tokio::task::JoinHandle<()>>,
    last_ok: Arc<Mutex<Option<Instant>>>,
    expired: Arc<AtomicBool>,
    keepalives: Arc<AtomicU64>,
    applied_seq: u64,
    fallback: bool,
    /// This node allocates (as of its last round).
    leading: bool,
    /// What was last published, without its rates, and when.
    #[expect(clippy::type_complexity, reason = "a snapshot compared as a whole")]
    published: Option<(BTreeMap<String, (u32, u64, u32, bool)>, u64, Instant)>,
    /// Per backend: the refusal and new-flow counters at the last report, and their rates
    /// smoothed over about a second (a cold node sees a connection or two per round).
    rates: BTreeMap<String, Rates>,
    traffic: Traffic,
}

/// A backend's counters when last read and their smoothed rates.
#[derive(Clone, Copy, Debug)]
struct Rates {
    refused: u64,
    new_flows: u64,
    at: Instant,
    refused_per_s: f64,
    admitted_per_s: f64,
}

/// The rates' smoothing time constant.
const SMOOTHING: Duration = Duration::from_secs(1);

/// Safe share of a backend: its `safe_share`, or `floor(max_conns / nodes)`.
fn safe_share(cfg: &crate::config::BackendCfg, nodes: u32) -> u32 {
    cfg.safe_share.unwrap_or(cfg.max_conns / nodes.max(1)).min(cfg.max_conns)
}

/// Runs the node's rounds until `stop`.
pub fn spawn(cluster: &ClusterCfg, lease_file: PathBuf, daemon: Daemon, status: Arc<Mutex<Status>>, links: Links, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    let cfg = cluster.limits.clone().expect("spawned with [cluster.limits]");
    let nodes = cluster.limit_nodes();
    let mut node = Node {
        cfg,
        name: cluster.node.clone(),
        nodes,
        lease_file,
        links,
        holds_written: None,
        gone_since: BTreeMap::new(),
        fenced: false,
        client: None,
        lease: None,
        keepalive: None,
        last_ok: Arc::default(),
        expired: Arc::default(),
        keepalives: Arc::default(),
        applied_seq: 0,
        fallback: false,
        leading: false,
        published: None,
        rates: BTreeMap::new(),
        traffic: Traffic::default(),
    };
    let started = Instant::now();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(ROUND);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Wakes a round at once on what cannot wait for the next tick: a node's lease gone
        // (its keys deleted: its capacity is free), a grant for this node, the allocator's seat.
        let mut watch: Option<WatchStream> = None;
        loop {
            let event = async {
                match &mut watch {
                    Some(w) => w.message().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
                m = event => match m {
                    Ok(Some(resp)) if node.wakes(&resp) => {}
                    Ok(Some(_)) => continue,
                    _ => {
                        watch = None;
                        continue;
                    }
                },
            }
            node.traffic.rounds += 1;
            let result = node.round(&daemon, &status).await;
            if result.is_ok() && watch.is_none() {
                watch = node.watch().await.ok();
            }
            let lost = result.is_err();
            node.links.etcd_ok.store(!lost, Ordering::Relaxed);
            if let Err(e) = &result {
                let mut s = status.lock().expect("limits status");
                let e = node.links.connect.explain(e);
                if s.connected || s.error.is_none() {
                    tracing::error!(node = %node.name, "etcd: {e}; shares kept until the lease would expire");
                }
                s.connected = false;
                s.error = Some(e);
                s.lost_since.get_or_insert_with(Instant::now);
                // A fresh connection next round, not the old one's reconnection back-off.
                node.client = None;
            }
            // Without etcd for longer than the lease (or never reached since the start): safe
            // shares, never more than what is enforced now.
            let since = node.last_ok.lock().expect("last_ok").unwrap_or(started);
            if lost && !node.fallback && since.elapsed() >= node.cfg.lease_ttl {
                node.drop_lease();
                node.applied_seq = 0;
                if let Err(e) = node.enter_fallback(&daemon).await {
                    tracing::error!("entering the safe shares: {e}");
                } else {
                    node.fallback = true;
                }
            }
            if lost && !node.fenced && since.elapsed() >= 2 * node.cfg.lease_ttl {
                let peers = node.links.peers.as_ref().map(|p| p.lock().expect("peer stats").peers_with_etcd(PEER_WORD)).unwrap_or_default();
                if !peers.is_empty() {
                    let why = format!("etcd out of reach for {:.1} s while peers {} reach it", since.elapsed().as_secs_f64(), peers.join(", "));
                    match node.fence(&daemon, &why).await {
                        Ok(()) => node.fenced = true,
                        Err(e) => tracing::error!("fencing this node: {e}"),
                    }
                }
            }
            let mut s = status.lock().expect("limits status");
            s.fallback = node.fallback;
            s.fenced = node.fenced;
            s.lease = node.lease;
            s.applied_seq = node.applied_seq;
            s.lost_for_s = s.lost_since.map(|t| t.elapsed().as_secs_f64());
            s.traffic = node.traffic.clone();
            s.traffic.requests += node.keepalives.load(Ordering::Relaxed);
        }
        node.drop_lease();
    })
}
