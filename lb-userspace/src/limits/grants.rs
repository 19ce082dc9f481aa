//! The allocator's side (grants written in one transaction, gone nodes' reservations) and
//! this node's (a grant applied through the daemon's change path, the fence, the safe shares).

use crate::key::BackendKey;
use std::{collections::BTreeMap, time::Instant};

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};

use crate::{
    daemon::Daemon,
    reconcile::Share,
    shares::{self, Grant, Holds, Report},
    Error,
};

use super::{key_grants, key_holds, key_leader, safe_share, BackendLimit, Node, PEER_WORD};

impl Node {
    /// Leading: the grants that change, written in one transaction that holds only while
    /// this node leads; `void` grants (for a lease that is gone) are deleted.
    #[expect(clippy::too_many_arguments, reason = "one round's view of etcd, passed as read")]
    pub(super) async fn allocate(
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
    pub(super) fn reservations(
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
    pub(super) fn room(&self, reports: &BTreeMap<String, Report>, key: &str, share: u32, max_conns: u32) -> bool {
        self.others_open(reports, key).saturating_add(u64::from(share)) < u64::from(max_conns)
    }

    /// The other nodes' open connections to a backend, as they last reported them.
    pub(super) fn others_open(&self, reports: &BTreeMap<String, Report>, key: &str) -> u64 {
        reports.iter().filter(|(n, _)| **n != self.name).filter_map(|(_, r)| r.backends.get(key)).map(|d| d.open).fold(0, u64::saturating_add)
    }

    /// Lays `shares` over the config through the daemon's one change path.
    pub(super) async fn set_shares(daemon: &Daemon, shares: BTreeMap<BackendKey, Share>) -> Result<(), Error> {
        daemon.set_shares(shares).await
    }

    pub(super) async fn apply_grant(&mut self, daemon: &Daemon, g: &Grant, reports: &BTreeMap<String, Report>) -> Result<(), Error> {
        let shares = daemon.read(|st| {
            let mut out = BTreeMap::new();
            for s in &st.cfg().services {
                for b in &s.backends {
                    let k = shares::key(&s.name, b.address);
                    // A backend the grant does not name keeps what it enforces (a new one: 0).
                    let limit = match g.share(&k, b.max_conns) {
                        Some(x) => x,
                        None => st.applied().backend(&s.name, b.address).map_or(0, |a| a.limit),
                    };
                    let room = self.room(reports, &k, limit, b.max_conns);
                    out.insert(BackendKey::new(s.name.clone(), b.address), Share { limit, room, granted_under: b.max_conns });
                }
            }
            out
        });
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
    pub(super) async fn refresh_room(&mut self, daemon: &Daemon, reports: &BTreeMap<String, Report>) -> Result<(), Error> {
        let next = daemon.read(|st| {
            let cur = st.applied().shares.as_ref()?;
            let mut next = cur.clone();
            for s in &st.cfg().services {
                for b in &s.backends {
                    if let Some(sh) = next.get_mut(&BackendKey::new(s.name.clone(), b.address)) {
                        sh.room = self.room(reports, &shares::key(&s.name, b.address), sh.limit, b.max_conns);
                    }
                }
            }
            (next != *cur).then_some(next)
        });
        match next {
            Some(n) => Self::set_shares(daemon, n).await,
            None => Ok(()),
        }
    }

    /// Cut off from etcd while a peer reaches it: admits nothing and withdraws its VIPs, so its
    /// flows move to nodes that count them (the allocator stops reserving for it soon).
    pub(super) async fn fence(&mut self, daemon: &Daemon, why: &str) -> Result<(), Error> {
        let shares = daemon.read(|st| {
            st.cfg()
                .services
                .iter()
                .flat_map(|s| s.backends.iter().map(|b| (BackendKey::new(s.name.clone(), b.address), Share { limit: 0, room: false, granted_under: b.max_conns })))
                .collect()
        });
        Self::set_shares(daemon, shares).await?;
        daemon.set_fenced(true, why).await;
        tracing::error!(node = %self.name, "fenced: {why}");
        Ok(())
    }

    /// Lost etcd for longer than the lease: each backend's limit becomes the smaller of what
    /// it is and its safe share (never larger: the others may hold the rest).
    pub(super) async fn enter_fallback(&mut self, daemon: &Daemon) -> Result<(), Error> {
        let details = safe_shares(daemon, self.nodes).await?;
        tracing::error!(node = %self.name, "etcd out of reach for longer than the lease ({:?}): enforcing safe shares: {}", self.cfg.lease_ttl, details.join("; "));
        daemon.journal("limits", format!("node \"{}\" lost etcd for longer than its lease: safe shares", self.name), details);
        Ok(())
    }
}

/// Lays the smaller of each backend's limit and its safe share over the config (through the
/// change path); returns a line per backend.
pub(super) async fn safe_shares(daemon: &Daemon, nodes: u32) -> Result<Vec<String>, Error> {
    {
        let (shares, details) = daemon.read(|st| {
            let mut out = BTreeMap::new();
            let mut details = Vec::new();
            for s in &st.cfg().services {
                for b in &s.backends {
                    let now = st.applied().backend(&s.name, b.address).map_or(0, |a| a.limit);
                    let safe = safe_share(b, nodes);
                    let limit = now.min(safe);
                    details.push(format!("{}: {} (share was {now}, safe share {safe}, max_conns {})", shares::key(&s.name, b.address), limit, b.max_conns));
                    out.insert(BackendKey::new(s.name.clone(), b.address), Share { limit, room: false, granted_under: b.max_conns });
                }
            }
            (out, details)
        });
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
    pub(super) fn view(&self, daemon: &Daemon, reports: &BTreeMap<String, Report>) -> BTreeMap<String, BackendLimit> {
        daemon.read(|st| {
            let mut out = BTreeMap::new();
            for s in &st.cfg().services {
                for b in &s.backends {
                    let k = shares::key(&s.name, b.address);
                    let applied = st.applied().backend(&s.name, b.address);
                    let open = applied.map_or(0, |a| st.open(a.id));
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
        })
    }
}
