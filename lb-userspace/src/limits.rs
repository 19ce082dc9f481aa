//! Cluster-wide limits through etcd (`[cluster.limits]`): this node's side. Every round
//! (`ROUND`) it
//! 1. keeps its lease alive (one lease per daemon; every key it writes is attached to it);
//! 2. publishes its report under `<prefix>/nodes/<node>`: per backend its `max_conns`, open
//!    connections, the limit it enforces, what it refused for lack of share (`shares.rs`);
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
    net::IpAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions, WatchResponse, WatchStream};
use lb_common::Reason;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{ClusterCfg, LimitsCfg},
    daemon::Daemon,
    reconcile::Share,
    shares::{self, Demand, Grant, Holds, Report},
    Error,
};

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

/// Keeps `lease` alive every `every` until aborted or etcd says it is gone: in a task of its
/// own, so that a slow round (a change waiting for its turn, a MAC resolution) never lets it
/// lapse.
fn keep_alive(mut c: Client, lease: i64, every: Duration, last_ok: Arc<Mutex<Option<Instant>>>, expired: Arc<AtomicBool>, requests: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut keeper = None;
        loop {
            let sent = Instant::now();
            let answer = async {
                if keeper.is_none() {
                    requests.fetch_add(1, Ordering::Relaxed);
                    keeper = Some(c.lease_keep_alive(lease).await?);
                }
                let (k, stream) = keeper.as_mut().expect("set above");
                requests.fetch_add(1, Ordering::Relaxed);
                k.keep_alive().await?;
                anyhow::Ok(tokio::time::timeout(REQUEST_TIMEOUT, stream.message()).await??)
            };
            match answer.await {
                Ok(Some(r)) if r.ttl() > 0 => *last_ok.lock().expect("last_ok") = Some(sent),
                Ok(_) => {
                    // etcd no longer has it (it was out of reach too long): join again.
                    expired.store(true, Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    tracing::debug!("keeping lease {lease:x} alive: {e}");
                    keeper = None;
                }
            }
            tokio::time::sleep_until((sent + every).into()).await;
        }
    })
}

impl Node {
    async fn watch(&mut self) -> Result<WatchStream, Error> {
        let mut c = self.client().await?;
        self.traffic.requests += 1;
        c.watch(format!("{}/", self.cfg.prefix), Some(WatchOptions::new().with_prefix())).await.map_err(|e| Error::other("watching the cluster's limits on etcd", e))
    }

    /// Whether a watched change needs a round now (reports of busy nodes change every round
    /// and wait for the tick).
    fn wakes(&mut self, resp: &WatchResponse) -> bool {
        let mine = format!("{}{}", key_grants(&self.cfg.prefix), self.name);
        let (leader, reports) = (key_leader(&self.cfg.prefix), key_nodes(&self.cfg.prefix));
        let own = format!("{reports}{}", self.name);
        self.traffic.bytes_received += resp.events().iter().filter_map(|e| e.kv()).map(|kv| (kv.key().len() + kv.value().len()) as u64).sum::<u64>();
        resp.events().iter().any(|e| {
            let key = e.kv().and_then(|kv| kv.key_str().ok()).unwrap_or_default();
            // The allocator also wakes on reports: one may acknowledge a revocation, freeing
            // capacity for a node that refuses.
            e.event_type() == EventType::Delete || key == mine || key == leader || (self.leading && key.starts_with(&reports) && key != own)
        })
    }

    async fn client(&mut self) -> Result<Client, Error> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let mut opts = ConnectOptions::new().with_connect_timeout(REQUEST_TIMEOUT).with_timeout(REQUEST_TIMEOUT);
        if let Some(tls) = &self.links.connect.tls {
            opts = opts.with_tls(tls.clone());
        }
        if let Some((user, password)) = &self.links.connect.user {
            opts = opts.with_user(user, password);
        }
        let c = Client::connect(&self.cfg.etcd, Some(opts)).await.map_err(|e| Error::other(format!("connecting to etcd ({})", self.cfg.etcd.join(", ")), e))?;
        self.client = Some(c.clone());
        Ok(c)
    }

    /// Holds `lease` (known alive at `sent`): its keep-alive task starts.
    fn hold(&mut self, c: &Client, lease: i64, sent: Instant) {
        self.drop_lease();
        self.lease = Some(lease);
        *self.last_ok.lock().expect("last_ok") = Some(sent);
        self.expired.store(false, Ordering::Relaxed);
        self.keepalive = Some(keep_alive(c.clone(), lease, self.cfg.lease_ttl / 3, self.last_ok.clone(), self.expired.clone(), self.keepalives.clone()));
    }

    /// A live lease: the one of the daemon before this one if etcd still holds it, else a new one.
    async fn ensure_lease(&mut self, c: &mut Client, daemon: &Daemon) -> Result<i64, Error> {
        if let Some(l) = self.lease {
            return Ok(l);
        }
        let sent = Instant::now();
        // "<node> <lease>": a lease this node's name wrote, and no other node's report holds.
        let kept = std::fs::read_to_string(&self.lease_file).ok().and_then(|s| {
            let mut words = s.split_whitespace();
            (words.next() == Some(self.name.as_str())).then(|| words.next()?.parse::<i64>().ok()).flatten()
        });
        if let Some(id) = kept {
            self.traffic.requests += 1;
            let alive = c.lease_time_to_live(id, None).await.map_err(|e| Error::other("asking etcd for the lease", e))?.ttl() > 0;
            self.traffic.requests += 1;
            let reports = c.get(key_nodes(&self.cfg.prefix), Some(GetOptions::new().with_prefix())).await.map_err(|e| Error::other("reading the nodes' reports from etcd", e))?;
            let other = reports.kvs().iter().find(|kv| kv.lease() == id && kv.key_str().ok() != Some(format!("{}{}", key_nodes(&self.cfg.prefix), self.name).as_str()));
            if let Some(kv) = other.filter(|_| alive) {
                tracing::error!(node = %self.name, lease = id, "not resuming lease {id:x} of {}: another node's report holds it; joining with a new lease", kv.key_str().unwrap_or_default());
                return self.new_lease(c, daemon).await;
            }
            if alive && !self.fallback {
                tracing::info!(node = %self.name, lease = id, "resumed the lease of the daemon before (its shares stay)");
                self.hold(c, id, sent);
                return Ok(id);
            }
            if alive {
                // Given up (safe shares since): an etcd that restarted restores its leases, and
                // this one's keys (its old report, the allocator's seat) would linger a TTL.
                self.traffic.requests += 1;
                let _ = c.lease_revoke(id).await;
            } else {
                // The lab's restart check reads this line: a restart slower than the lease
                // cannot resume it.
                tracing::warn!(node = %self.name, lease = id, "the lease of the daemon before ({id:x}) expired before this daemon asked etcd: joining with a new lease");
            }
        }
        self.new_lease(c, daemon).await
    }

    async fn new_lease(&mut self, c: &mut Client, daemon: &Daemon) -> Result<i64, Error> {
        let sent = Instant::now();
        self.traffic.requests += 1;
        let ttl = self.cfg.lease_ttl.as_secs().max(1) as i64;
        let id = c.lease_grant(ttl, None).await.map_err(|e| Error::other("granting a lease on etcd", e))?.id();
        self.hold(c, id, sent);
        self.applied_seq = 0;
        // Written again under the new lease: the allocator may have released (deleted) it.
        self.holds_written = None;
        if let Err(e) = std::fs::write(&self.lease_file, format!("{} {id}\n", self.name)) {
            tracing::warn!("keeping the etcd lease in {}: {e} (a restart will join as a new node)", self.lease_file.display());
        }
        let what = if self.fallback { "etcd answers again: joined with a new lease; safe shares until granted more" } else { "joined the cluster's limits with a new lease" };
        tracing::info!(node = %self.name, lease = id, "{what}");
        daemon.journal("limits", format!("node \"{}\" {what}", self.name), vec![format!("etcd {}", self.cfg.etcd.join(", "))]);
        Ok(id)
    }

    /// Gives up the lease: its keep-alive stops (the lease file stays, for a revocation when
    /// etcd answers again).
    fn drop_lease(&mut self) {
        if let Some(t) = self.keepalive.take() {
            t.abort();
        }
        self.lease = None;
    }

    async fn round(&mut self, daemon: &Daemon, status: &Arc<Mutex<Status>>) -> Result<(), Error> {
        let mut c = self.client().await?;
        if self.expired.swap(false, Ordering::Relaxed) {
            let lease = self.lease.unwrap_or(0);
            self.drop_lease();
            return Err(Error::other("keeping the lease alive", anyhow::anyhow!("etcd says lease {lease:x} expired")));
        }
        let lease = self.ensure_lease(&mut c, daemon).await?;
        self.publish(&mut c, lease, daemon, false).await?;
        let prefix = self.cfg.prefix.clone();
        self.traffic.requests += 1;
        let resp = c.get(format!("{prefix}/"), Some(GetOptions::new().with_prefix())).await.map_err(|e| Error::other("reading the cluster's limits from etcd", e))?;
        let (mut leader, mut reports, mut grants) = (None, BTreeMap::new(), BTreeMap::new());
        let mut holds: BTreeMap<String, Holds> = BTreeMap::new();
        let mut unreadable = Vec::new();
        for kv in resp.kvs() {
            self.traffic.bytes_received += (kv.key().len() + kv.value().len()) as u64;
            let k = kv.key_str().unwrap_or_default();
            if k == key_leader(&prefix) {
                leader = Some((kv.value_str().unwrap_or_default().to_owned(), kv.lease()));
            } else if let Some(n) = k.strip_prefix(&key_nodes(&prefix)) {
                match serde_json::from_slice::<Report>(kv.value()) {
                    Ok(r) => {
                        reports.insert(n.to_owned(), r);
                    }
                    Err(e) => unreadable.push(format!("{k}: {e}")),
                }
            } else if let Some(n) = k.strip_prefix(&key_holds(&prefix)) {
                match serde_json::from_slice::<Holds>(kv.value()) {
                    Ok(h) => {
                        holds.insert(n.to_owned(), h);
                    }
                    Err(e) => unreadable.push(format!("{k}: {e}")),
                }
            } else if let Some(n) = k.strip_prefix(&key_grants(&prefix)) {
                match serde_json::from_slice::<Grant>(kv.value()) {
                    Ok(g) => {
                        grants.insert(n.to_owned(), g);
                    }
                    Err(e) => unreadable.push(format!("{k}: {e}")),
                }
            }
        }
        // A grant made for an earlier lease of its node is void (that node left and came back).
        let (grants, void): (BTreeMap<String, Grant>, BTreeMap<String, Grant>) = grants.into_iter().partition(|(n, g)| reports.get(n).is_some_and(|r: &Report| r.lease == g.lease));
        if leader.is_none() {
            self.traffic.requests += 1;
            let lk = key_leader(&prefix);
            let txn = Txn::new().when([Compare::create_revision(lk.clone(), CompareOp::Equal, 0)]).and_then([TxnOp::put(
                lk,
                self.name.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
            if c.txn(txn).await.map_err(|e| Error::other("electing the allocator on etcd", e))?.succeeded() {
                tracing::info!(node = %self.name, "this node now allocates the cluster's limits");
                daemon.journal("limits", format!("node \"{}\" now allocates the cluster's shares", self.name), vec![]);
                leader = Some((self.name.clone(), lease));
            }
        }
        let leading = leader.as_ref().is_some_and(|(n, l)| *n == self.name && *l == lease);
        self.leading = leading;
        if leading && !unreadable.is_empty() {
            // A node whose report cannot be read would count as holding nothing: allocate
            // nothing until every report reads (another version writing them, say).
            tracing::error!(node = %self.name, "not allocating: unreadable keys: {}", unreadable.join("; "));
        } else if leading {
            let (reserved, released) = self.reservations(daemon, &reports, &holds, &void);
            // Void grants of nodes back with a new lease go (they get grants of their own); a
            // gone node's stays reserved until it is released.
            let stale: Vec<String> = void.keys().filter(|n| reports.contains_key(*n) && !grants.contains_key(*n)).chain(released.iter()).cloned().collect();
            self.allocate(&mut c, lease, &reports, &grants, &reserved, &stale, &released).await?;
            status.lock().expect("limits status").reserved = reserved;
        } else {
            self.gone_since.clear();
            status.lock().expect("limits status").reserved.clear();
        }
        // This node's grant: apply a newer one, then acknowledge it at once.
        // A change that fails to apply is not etcd's failure: logged, retried next round (the
        // grant stays unacknowledged, so nothing is granted elsewhere against it).
        if let Some(g) = grants.get(&self.name).filter(|g| g.seq > self.applied_seq) {
            match self.apply_grant(daemon, g, &reports).await {
                Ok(()) => self.publish(&mut c, lease, daemon, true).await?,
                Err(e) => tracing::error!(node = %self.name, "applying grant {} of {}: {e}", g.seq, g.by),
            }
        } else if let Err(e) = self.refresh_room(daemon, &reports).await {
            tracing::error!(node = %self.name, "updating the refusal reasons: {e}");
        }
        // The daemon's state is never locked inside this status lock (the alerts lock them the
        // other way round).
        let view = self.view(daemon, &reports);
        let mut s = status.lock().expect("limits status");
        s.connected = true;
        s.error = None;
        s.lost_since = None;
        s.leader = leader.map(|(n, _)| n);
        s.backends = view;
        s.nodes = reports;
        s.grants = grants;
        Ok(())
    }

    /// The report of this node now (its counters read, their rates smoothed).
    fn report(&mut self, daemon: &Daemon) -> Report {
        let mut guard = daemon.lock();
        let st = &mut *guard;
        // A failed read counts as no traffic this round (the next one reads again).
        let end = st.applied().backend_ids_end();
        let all_stats = st.backend_stats_upto(end).unwrap_or_default();
        let now = Instant::now();
        let mut backends = BTreeMap::new();
        let mut rates = BTreeMap::new();
        for s in st.applied().services.values() {
            for b in s.backends.values().filter(|b| !b.removed) {
                let k = shares::key(&s.name, b.address);
                let stats = all_stats.get(b.id as usize).copied().unwrap_or_default();
                let refused = stats.refused.get(Reason::ShareExhausted) + stats.refused.get(Reason::BackendLimit);
                let r = match self.rates.get(&k) {
                    Some(p) => {
                        let dt = now.duration_since(p.at).as_secs_f64().max(0.001);
                        let ewma = |prev: f64, inst: f64, tau: Duration| prev + (1.0 - (-dt / tau.as_secs_f64()).exp()) * (inst - prev);
                        let inst = |now: u64, then: u64| now.saturating_sub(then) as f64 / dt;
                        let refused_now = inst(refused, p.refused);
                        // Refusals that stop are forgotten fast: a node whose load moved away
                        // must not keep asking for the share it no longer uses.
                        let tau = if refused_now >= p.refused_per_s { SMOOTHING } else { SMOOTHING / 4 };
                        Rates {
                            refused,
                            new_flows: stats.new_flows,
                            at: now,
                            refused_per_s: ewma(p.refused_per_s, refused_now, tau),
                            admitted_per_s: ewma(p.admitted_per_s, inst(stats.new_flows, p.new_flows), SMOOTHING),
                        }
                    }
                    None => Rates { refused, new_flows: stats.new_flows, at: now, refused_per_s: 0.0, admitted_per_s: 0.0 },
                };
                let open = st.conns().get(b.id);
                // Fenced, it takes no traffic and so refuses nothing: it asks for its safe share,
                // and announces again once granted (its view of the cluster is whole again).
                let fenced_wants = if self.fenced {
                    s.cfg.backends.iter().find(|c| c.address == b.address).map_or(b.max_conns / self.nodes.max(1), |c| safe_share(c, self.nodes)).max(1)
                } else {
                    0
                };
                backends.insert(
                    k.clone(),
                    Demand {
                        max_conns: b.max_conns,
                        open,
                        applied: b.limit,
                        wants: shares::wants(open, r.refused_per_s, r.admitted_per_s).max(fenced_wants),
                        // Refusing at a share below the limit: more share would admit more.
                        refusing: (r.refused_per_s >= 0.2 && b.limit < b.max_conns) || self.fenced,
                        refused_per_s: r.refused_per_s,
                        admitted_per_s: r.admitted_per_s,
                    },
                );
                rates.insert(k, r);
            }
        }
        self.rates = rates;
        Report { node: self.name.clone(), lease: self.lease.unwrap_or(0), applied_seq: self.applied_seq, fallback: self.fallback, backends }
    }

    async fn publish(&mut self, c: &mut Client, lease: i64, daemon: &Daemon, now: bool) -> Result<(), Error> {
        let report = self.report(daemon);
        let shape: BTreeMap<String, (u32, u64, u32, bool)> = report.backends.iter().map(|(k, d)| (k.clone(), (d.max_conns, d.open, d.applied, d.refusing))).collect();
        let same = self.published.as_ref().is_some_and(|(s, seq, at)| *s == shape && *seq == report.applied_seq && at.elapsed() < HEARTBEAT);
        if same && !now {
            return Ok(());
        }
        let body = serde_json::to_vec(&report).map_err(|e| Error::other("encoding the report", e))?;
        self.traffic.requests += 1;
        self.traffic.reports += 1;
        self.traffic.bytes_sent += body.len() as u64;
        c.put(format!("{}{}", key_nodes(&self.cfg.prefix), self.name), body, Some(PutOptions::new().with_lease(lease)))
            .await
            .map_err(|e| Error::other("publishing this node's report on etcd", e))?;
        // What it may hold, kept past its lease (see the module's comment).
        let holds: Holds = report.backends.iter().map(|(k, d)| (k.clone(), d.open.max(u64::from(d.applied)))).collect();
        if self.holds_written.as_ref() != Some(&holds) {
            let body = serde_json::to_vec(&holds).map_err(|e| Error::other("encoding what this node holds", e))?;
            self.traffic.requests += 1;
            self.traffic.bytes_sent += body.len() as u64;
            c.put(format!("{}{}", key_holds(&self.cfg.prefix), self.name), body, None).await.map_err(|e| Error::other("publishing what this node holds on etcd", e))?;
            self.holds_written = Some(holds);
        }
        self.published = Some((shape, report.applied_seq, Instant::now()));
        Ok(())
    }

    /// Leading: the grants that change, written in one transaction that holds only while
    /// this node leads; `void` grants (for a lease that is gone) are deleted.
    #[expect(clippy::too_many_arguments, reason = "one round's view of etcd, passed as read")]
    async fn allocate(
        &mut self,
        c: &mut Client,
        lease: i64,
        reports: &BTreeMap<String, Report>,
        grants: &BTreeMap<String, Grant>,
        reserved: &BTreeMap<String, Holds>,
        void: &[String],
        released: &[String],
    ) -> Result<(), Error> {
        let mut next = shares::allocate(reports, grants, reserved, &self.name);
        for (n, g) in &mut next {
            g.lease = reports.get(n).map_or(0, |r| r.lease);
        }
        // A node that came back with a new lease gets a grant of its own below, over the void one.
        let stale: Vec<&String> = void.iter().filter(|n| !next.contains_key(*n)).collect();
        if next.is_empty() && stale.is_empty() && released.is_empty() {
            return Ok(());
        }
        let mut ops = Vec::new();
        for (n, g) in &next {
            let body = serde_json::to_vec(g).map_err(|e| Error::other("encoding a grant", e))?;
            self.traffic.bytes_sent += body.len() as u64;
            ops.push(TxnOp::put(format!("{}{n}", key_grants(&self.cfg.prefix)), body, None));
        }
        for n in &stale {
            ops.push(TxnOp::delete(format!("{}{n}", key_grants(&self.cfg.prefix)), None));
        }
        for n in released {
            ops.push(TxnOp::delete(format!("{}{n}", key_holds(&self.cfg.prefix)), None));
        }
        let lk = key_leader(&self.cfg.prefix);
        let txn = Txn::new().when([Compare::value(lk.clone(), CompareOp::Equal, self.name.clone()), Compare::lease(lk, CompareOp::Equal, lease)]).and_then(ops);
        self.traffic.requests += 1;
        if c.txn(txn).await.map_err(|e| Error::other("writing the shares on etcd", e))?.succeeded() {
            self.traffic.grants_written += next.len() as u64;
            for (n, g) in &next {
                tracing::debug!(node = %n, seq = g.seq, shares = ?g.shares, "granted");
            }
        }
        Ok(())
    }

    /// Leading: what the nodes whose lease is gone may still hold (their `holds`, or their last
    /// grant if larger), and the nodes released now (gone for `2 × lease_ttl`: see the module's
    /// comment), whose keys go.
    fn reservations(
        &mut self,
        daemon: &Daemon,
        reports: &BTreeMap<String, Report>,
        holds: &BTreeMap<String, Holds>,
        void: &BTreeMap<String, Grant>,
    ) -> (BTreeMap<String, Holds>, Vec<String>) {
        let gone: std::collections::BTreeSet<&String> = holds.keys().chain(void.keys()).filter(|n| !reports.contains_key(*n)).collect();
        self.gone_since.retain(|n, _| gone.contains(n));
        let (mut reserved, mut released) = (BTreeMap::new(), Vec::new());
        let release_after = 2 * self.cfg.lease_ttl;
        let peers = self.links.peers.as_ref().map(|p| p.lock().expect("peer stats").clone());
        for n in gone {
            let since = *self.gone_since.entry(n.clone()).or_insert_with(Instant::now);
            // Its own word over the peer channel, if fresh, is the evidence: what it may hold
            // from now on (it only falls without etcd). A fenced node's connections end or
            // move; its reservation goes when it says it holds nothing, not on a timer that
            // cannot know how long its connections last.
            if let Some(h) = peers.as_ref().and_then(|p| p.holds_of(n, PEER_WORD)) {
                if h.values().all(|v| *v == 0) {
                    tracing::info!(node = %self.name, gone = %n, "released node {n}'s reservation: it says over the peer channel that it holds nothing");
                    daemon.journal("limits", format!("released node \"{n}\"'s reservation: its lease is gone and it says (peer channel) that it holds nothing"), vec![]);
                    released.push(n.clone());
                } else {
                    reserved.insert(n.clone(), h.clone());
                }
                continue;
            }
            let mut h = holds.get(n).cloned().unwrap_or_default();
            for (k, share) in void.get(n).map(|g| g.shares.clone()).unwrap_or_default() {
                let e = h.entry(k).or_default();
                *e = (*e).max(u64::from(share));
            }
            if since.elapsed() >= release_after {
                let held: Vec<String> = h.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k}: {v}")).collect();
                tracing::warn!(node = %self.name, gone = %n, "released what node {n} may hold ({}): its lease is gone for {release_after:?}", held.join(", "));
                daemon.journal(
                    "limits",
                    format!("released node \"{n}\"'s reservation: its lease has been gone for {release_after:?} (a node still running has fenced itself by then)"),
                    held,
                );
                released.push(n.clone());
            } else {
                reserved.insert(n.clone(), h);
            }
        }
        (reserved, released)
    }

    /// Whether the cluster has room beyond this node's share of each backend (the refusal
    /// reason at the share), from the other nodes' last reports.
    fn room(&self, reports: &BTreeMap<String, Report>, key: &str, share: u32, max_conns: u32) -> bool {
        self.others_open(reports, key).saturating_add(u64::from(share)) < u64::from(max_conns)
    }

    /// The other nodes' open connections to a backend, as they last reported them.
    fn others_open(&self, reports: &BTreeMap<String, Report>, key: &str) -> u64 {
        reports.iter().filter(|(n, _)| **n != self.name).filter_map(|(_, r)| r.backends.get(key)).map(|d| d.open).fold(0, u64::saturating_add)
    }

    /// Lays `shares` over the config through the daemon's one change path.
    async fn set_shares(daemon: &Daemon, shares: BTreeMap<(String, IpAddr), Share>) -> Result<(), Error> {
        daemon.set_shares(shares).await
    }

    async fn apply_grant(&mut self, daemon: &Daemon, g: &Grant, reports: &BTreeMap<String, Report>) -> Result<(), Error> {
        let shares = {
            let st = daemon.lock();
            let mut out = BTreeMap::new();
            for s in &st.cfg().services {
                for b in &s.backends {
                    let k = shares::key(&s.name, b.address);
                    // A backend the grant does not name keeps what it enforces (a new one: 0).
                    let limit = match g.shares.get(&k) {
                        Some(x) => *x,
                        None => st.applied().backend(&s.name, b.address).map_or(0, |a| a.limit),
                    };
                    out.insert((s.name.clone(), b.address), Share { limit, room: self.room(reports, &k, limit, b.max_conns) });
                }
            }
            out
        };
        Self::set_shares(daemon, shares).await?;
        if self.fallback {
            tracing::warn!(node = %self.name, "granted shares again: out of the safe shares");
            daemon.journal("limits", format!("node \"{}\" granted shares again (seq {} by {})", self.name, g.seq, g.by), vec![]);
        }
        self.fallback = false;
        if self.fenced {
            daemon.set_fenced(false, &format!("etcd answers again and granted shares (seq {} by {})", g.seq, g.by)).await;
            self.fenced = false;
        }
        self.applied_seq = g.seq;
        self.traffic.grants_applied += 1;
        Ok(())
    }

    /// Updates the refusal reasons when the cluster's room changed.
    async fn refresh_room(&mut self, daemon: &Daemon, reports: &BTreeMap<String, Report>) -> Result<(), Error> {
        let next = {
            let st = daemon.lock();
            let Some(cur) = &st.applied().shares else { return Ok(()) };
            let mut next = cur.clone();
            for s in &st.cfg().services {
                for b in &s.backends {
                    if let Some(sh) = next.get_mut(&(s.name.clone(), b.address)) {
                        sh.room = self.room(reports, &shares::key(&s.name, b.address), sh.limit, b.max_conns);
                    }
                }
            }
            (next != *cur).then_some(next)
        };
        match next {
            Some(n) => Self::set_shares(daemon, n).await,
            None => Ok(()),
        }
    }

    /// Cut off from etcd while a peer reaches it: admits nothing and withdraws its VIPs, so its
    /// flows move to nodes that count them (the allocator stops reserving for it soon).
    async fn fence(&mut self, daemon: &Daemon, why: &str) -> Result<(), Error> {
        let shares = {
            let st = daemon.lock();
            st.cfg().services.iter().flat_map(|s| s.backends.iter().map(|b| ((s.name.clone(), b.address), Share { limit: 0, room: false }))).collect()
        };
        Self::set_shares(daemon, shares).await?;
        daemon.set_fenced(true, why).await;
        tracing::error!(node = %self.name, "fenced: {why}");
        Ok(())
    }

    /// Lost etcd for longer than the lease: each backend's limit becomes the smaller of what
    /// it is and its safe share (never larger: the others may hold the rest).
    async fn enter_fallback(&mut self, daemon: &Daemon) -> Result<(), Error> {
        let details = safe_shares(daemon, self.nodes).await?;
        tracing::error!(node = %self.name, "etcd out of reach for longer than the lease ({:?}): enforcing safe shares: {}", self.cfg.lease_ttl, details.join("; "));
        daemon.journal("limits", format!("node \"{}\" lost etcd for longer than its lease: safe shares", self.name), details);
        Ok(())
    }
}

/// Lays the smaller of each backend's limit and its safe share over the config (through the
/// change path); returns a line per backend.
async fn safe_shares(daemon: &Daemon, nodes: u32) -> Result<Vec<String>, Error> {
    {
        let (shares, details) = {
            let st = daemon.lock();
            let mut out = BTreeMap::new();
            let mut details = Vec::new();
            for s in &st.cfg().services {
                for b in &s.backends {
                    let now = st.applied().backend(&s.name, b.address).map_or(0, |a| a.limit);
                    let safe = safe_share(b, nodes);
                    let limit = now.min(safe);
                    details.push(format!("{}: {} (share was {now}, safe share {safe}, max_conns {})", shares::key(&s.name, b.address), limit, b.max_conns));
                    out.insert((s.name.clone(), b.address), Share { limit, room: false });
                }
            }
            (out, details)
        };
        Node::set_shares(daemon, shares).await?;
        Ok(details)
    }
}

/// The daemon stops: its datapath goes on forwarding with no one keeping its lease, so once
/// the lease expires the others may be granted its share. It keeps at most its safe shares
/// meanwhile; a restart within the lease resumes it and applies its grant again.
pub async fn on_stop(daemon: &Daemon, nodes: u32) {
    match safe_shares(daemon, nodes).await {
        Ok(details) => {
            tracing::info!("stopping: safe shares until the next daemon resumes the lease: {}", details.join("; "));
            daemon.journal("limits", "daemon stopping: safe shares until a daemon holds the lease again", details);
        }
        Err(e) => tracing::error!("stopping: setting the safe shares: {e}"),
    }
}

impl Node {
    /// Per backend: this node's share, its open connections and the cluster's.
    fn view(&self, daemon: &Daemon, reports: &BTreeMap<String, Report>) -> BTreeMap<String, BackendLimit> {
        let st = daemon.lock();
        let mut out = BTreeMap::new();
        for s in &st.cfg().services {
            for b in &s.backends {
                let k = shares::key(&s.name, b.address);
                let applied = st.applied().backend(&s.name, b.address);
                let open = applied.map_or(0, |a| st.conns().get(a.id));
                let others = self.others_open(reports, &k);
                out.insert(
                    k,
                    BackendLimit {
                        max_conns: b.max_conns,
                        share: applied.map_or(0, |a| a.limit),
                        open,
                        cluster_open: others.saturating_add(open),
                        safe_share: safe_share(b, self.nodes),
                    },
                );
            }
        }
        out
    }
}
