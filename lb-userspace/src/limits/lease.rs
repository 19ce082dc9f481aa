//! This node's etcd lease: kept alive on a task of its own, resumed after a restart when
//! still alive, given up when etcd says it expired; and the watch that wakes a round.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions, WatchResponse, WatchStream};

use crate::{daemon::Daemon, Error};

use super::{key_grants, key_leader, key_nodes, Node, REQUEST_TIMEOUT};

/// Keeps `lease` alive every `every` until aborted or etcd says it is gone: in a task of its
/// own, so that a slow round (a change waiting for its turn, a MAC resolution) never lets it
/// lapse.
pub(super) fn keep_alive(
    mut c: Client,
    lease: i64,
    every: Duration,
    last_ok: Arc<Mutex<Option<Instant>>>,
    expired: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
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
    pub(super) async fn watch(&mut self) -> Result<WatchStream, Error> {
        let mut c = self.client().await?;
        self.traffic.requests += 1;
        c.watch(format!("{}/", self.cfg.prefix), Some(WatchOptions::new().with_prefix())).await.map_err(|e| Error::other("watching the cluster's limits on etcd", e))
    }

    /// Whether a watched change needs a round now (reports of busy nodes change every round
    /// and wait for the tick).
    pub(super) fn wakes(&mut self, resp: &WatchResponse) -> bool {
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

    pub(super) async fn client(&mut self) -> Result<Client, Error> {
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
    pub(super) fn hold(&mut self, c: &Client, lease: i64, sent: Instant) {
        self.drop_lease();
        self.lease = Some(lease);
        *self.last_ok.lock().expect("last_ok") = Some(sent);
        self.expired.store(false, Ordering::Relaxed);
        self.keepalive = Some(keep_alive(c.clone(), lease, self.cfg.lease_ttl / 3, self.last_ok.clone(), self.expired.clone(), self.keepalives.clone()));
    }

    /// A live lease: the one of the daemon before this one if etcd still holds it, else a new one.
    pub(super) async fn ensure_lease(&mut self, c: &mut Client, daemon: &Daemon) -> Result<i64, Error> {
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

    pub(super) async fn new_lease(&mut self, c: &mut Client, daemon: &Daemon) -> Result<i64, Error> {
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
    pub(super) fn drop_lease(&mut self) {
        if let Some(t) = self.keepalive.take() {
            t.abort();
        }
        self.lease = None;
    }
}
