//! One round: the lease, this node's report published, the cluster read in one request,
//! the allocator run if this node leads, a newer grant applied and acknowledged.

use std::{
    collections::BTreeMap,
    sync::{atomic::Ordering, Arc, Mutex},
    time::{Duration, Instant},
};

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use lb_common::Reason;

use crate::{
    daemon::Daemon,
    shares::{self, Demand, Grant, Holds, Report},
    Error,
};

use super::{key_grants, key_holds, key_leader, key_nodes, safe_share, Node, Rates, Status, HEARTBEAT, SMOOTHING};

impl Node {
    pub(super) async fn round(&mut self, daemon: &Daemon, status: &Arc<Mutex<Status>>) -> Result<(), Error> {
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
    pub(super) fn report(&mut self, daemon: &Daemon) -> Report {
        daemon.read(|st| {
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
                    let open = st.open(b.id);
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
        })
    }

    pub(super) async fn publish(&mut self, c: &mut Client, lease: i64, daemon: &Daemon, now: bool) -> Result<(), Error> {
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
}
