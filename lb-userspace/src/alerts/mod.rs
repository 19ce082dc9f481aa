//! The alert engine: rules evaluated every interval over a sample of the counters, with
//! hysteresis (fire after a condition held for `fire_after`, resolve after it stayed false for
//! `resolve_after`). Every message says that the component is the Sluice load balancer, names
//! the service, the backend and the config key behind the limit, gives the numbers, and one
//! line on what to do — the corrective action of the 2023-05-05 incident.

use std::borrow::Cow;
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Instant,
};

use serde::Serialize;

use crate::config::AlertsCfg;

/// One backend at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendSample {
    /// Shared with the daemon's names of the backend (made once per apply, not per sample).
    pub service: Arc<str>,
    pub backend: Arc<str>,
    pub open: u64,
    pub max_conns: u32,
    pub active: bool,
    /// Refusals charged to this backend so far, by reason name.
    pub refused: lb_common::Refusals,
    /// With cluster-wide limits: this node's share and the cluster's open connections.
    pub cluster: Option<crate::status::limits::BackendLimit>,
}

/// What the engine looks at each interval.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    pub backends: Vec<BackendSample>,
    pub flows: u64,
    pub flow_capacity: u64,
    /// Connections corrected by reconciliation so far, by backend address.
    pub drift: BTreeMap<String, u64>,
    /// The config file, named in messages.
    pub config_file: String,
    /// A cluster node whose BIRD lacks VIPs it should announce: (node, VIPs, BIRD's error).
    pub not_announcing: Option<(String, Vec<String>, String)>,
    /// With cluster-wide limits: this node's view of etcd and its shares.
    pub limits: Option<crate::status::limits::Status>,
    /// A reload the guard refused (what it said), until a reload or an apply goes through.
    pub change_refused: Option<String>,
    /// Each service's own alert labels (`service.labels`).
    pub service_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// Backends whose health checks cannot run for a cause on this node: (service, backend, cause).
    pub health_local: Vec<(String, String, String)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Firing,
    Resolved,
}

/// A notification for the sinks (log, webhook, command).
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Notification {
    pub status: Status,
    /// Static names; `Cow` so that a client can read them back.
    pub alertname: Cow<'static, str>,
    pub severity: Cow<'static, str>,
    pub labels: BTreeMap<String, String>,
    pub summary: String,
    pub description: String,
    /// Where the alert's runbook section is.
    pub runbook_url: String,
}

#[derive(Clone, Debug, Default)]
struct RuleState {
    true_since: Option<Instant>,
    false_since: Option<Instant>,
    firing: bool,
    /// The evaluation that last found the condition true.
    seen: u64,
    severity: &'static str,
    last: (String, String),
}

/// A rule's condition found true for one set of labels, with its text.
struct Cond {
    name: &'static str,
    severity: &'static str,
    labels: Vec<(String, String)>,
    summary: String,
    description: String,
}

/// Rule state key: the alert's name and its labels.
type RuleKey = (&'static str, Vec<(String, String)>);

/// The engine: evaluation state between samples. It keeps state only for conditions that are
/// true, pending or firing (a rule false for every backend costs nothing to hold), and builds
/// an alert's text only when its condition holds: with 10,000 backends an evaluation is a pass
/// over the sample, not 50,000 formatted strings.
pub struct Engine {
    cfg: AlertsCfg,
    name: String,
    rules: HashMap<RuleKey, RuleState>,
    round: u64,
    prev: Option<(Instant, Sample)>,
}

impl Engine {
    pub fn new(cfg: AlertsCfg) -> Self {
        let name = cfg.name.clone().unwrap_or_else(|| nix::unistd::gethostname().map_or_else(|_| "sluice".into(), |h| h.to_string_lossy().into_owned()));
        Self { cfg, name, rules: HashMap::new(), round: 0, prev: None }
    }

    /// Evaluates `s` taken at `now` (kept as the next evaluation's previous sample); returns
    /// what started firing or resolved.
    #[expect(clippy::too_many_lines, reason = "one rule after another")]
    pub fn evaluate(&mut self, now: Instant, s: Sample) -> Vec<Notification> {
        let lb = &self.name;
        let file = &s.config_file;
        let mut conds: Vec<Cond> = Vec::new();
        let mut push = |name, severity, labels: Vec<(String, String)>, (summary, description): (String, String)| conds.push(Cond { name, severity, labels, summary, description });
        let backend_labels = |b: &BackendSample| vec![("service".to_owned(), b.service.to_string()), ("backend".to_owned(), b.backend.to_string())];
        let dt = self.prev.as_ref().map(|(t, _)| now.duration_since(*t));
        // The previous sample of a backend: at the same index when the backends did not change
        // (the usual case), else by name.
        let prev_sample = self.prev.as_ref().map(|(_, p)| p);
        let mut by_name: Option<HashMap<(&str, &str), &BackendSample>> = None;
        let mut prev_of = |i: usize, b: &BackendSample| -> Option<&BackendSample> {
            let p = prev_sample?;
            match p.backends.get(i) {
                Some(q) if q.service == b.service && q.backend == b.backend => Some(q),
                _ => by_name.get_or_insert_with(|| p.backends.iter().map(|q| ((&*q.service, &*q.backend), q)).collect()).get(&(&*b.service, &*b.backend)).copied(),
            }
        };
        let key_of = |b: &BackendSample| format!("`service \"{}\" backend {} max_conns` in {file}", b.service, b.backend);
        let node = s.limits.as_ref().map_or("", |x| x.node.as_str());
        for (i, b) in s.backends.iter().enumerate() {
            let max = u64::from(b.max_conns);
            // With cluster-wide limits the limit is the cluster's: count every node's connections.
            let open = b.cluster.as_ref().map_or(b.open, |c| c.cluster_open);
            let ratio = if max == 0 { 1.0 } else { open as f64 / max as f64 };
            let whose = if b.cluster.is_some() { " over the cluster" } else { "" };
            if open >= max {
                push("SluiceBackendAtLimit", "critical", backend_labels(b), (
                    format!("Sluice load balancer {lb}: backend {} of service \"{}\" is at its connection limit ({open} of {max} open{whose})", b.backend, b.service),
                    format!(
                        "The load balancer (not the backend, not the database) refuses new connections to {} because {} = {max} and {} are open. Next: raise the limit (`sluice backend set-limit {} {} N`, then in {file}) or add backends.",
                        b.backend, key_of(b), open, b.service, b.backend
                    ),
                ));
            }
            if ratio >= self.cfg.near_limit_ratio && open < max {
                push(
                    "SluiceBackendNearLimit",
                    "warning",
                    backend_labels(b),
                    (
                        format!(
                            "Sluice load balancer {lb}: backend {} of service \"{}\" is at {:.0}% of its connection limit ({open} of {max}{whose})",
                            b.backend,
                            b.service,
                            ratio * 100.0
                        ),
                        format!("At {max} open connections the load balancer will refuse new ones ({}). Next: check whether the limit fits today's traffic.", key_of(b)),
                    ),
                );
            }
            let prev = prev_of(i, b);
            for &reason in lb_common::Reason::ALL {
                let total = b.refused.get(reason);
                let new = total.saturating_sub(prev.map_or(total, |p| p.refused.get(reason)));
                if new == 0 {
                    continue;
                }
                let (key, reason) = (key_of(b), reason.name());
                let description = match &b.cluster {
                    Some(c) if reason == "share_exhausted" => format!(
                        "Node \"{node}\" used up its share of the cluster-wide limit while the cluster has room: share {} with {} open here; {} of max_conns = {max} open over the cluster ({key}). The allocator moves share to the nodes that refuse within seconds; if this persists, check `sluice cluster status` (etcd, the allocating node).",
                        c.share, b.open, c.cluster_open
                    ),
                    Some(c) => format!(
                        "Clients get a connection reset from the load balancer. Reason {reason}; {} of the cluster-wide max_conns = {max} are open over the cluster, {} here (node \"{node}\", share {}) ({key}). Next: `sluice explain` a client address, then raise the limit or add capacity.",
                        c.cluster_open, b.open, c.share
                    ),
                    None => format!(
                        "Clients get a connection reset from the load balancer. Reason {reason}; the backend has {} of max_conns = {max} open ({key}). Next: `sluice explain` a client address, then raise the limit or add capacity.",
                        b.open
                    ),
                };
                let mut labels = backend_labels(b);
                labels.push(("reason".to_owned(), reason.to_owned()));
                push(
                    "SluiceRefusingConnections",
                    "critical",
                    labels,
                    (
                        format!(
                            "Sluice load balancer {lb} is refusing connections to service \"{}\" backend {} ({reason}): {new} in the last {:.0?}",
                            b.service,
                            b.backend,
                            dt.unwrap_or_default()
                        ),
                        description,
                    ),
                );
            }
            // Time to saturation: a linear trend of open connections, only past half the limit
            // (a ramp from idle is not a saturation risk yet).
            if let (Some(p), Some(dt)) = (prev, dt) {
                let growth = b.open as f64 - p.open as f64;
                if growth > 0.0 && b.open < max && ratio >= 0.5 && !dt.is_zero() {
                    let secs = (max - b.open) as f64 / (growth / dt.as_secs_f64());
                    if secs <= self.cfg.forecast_horizon.as_secs_f64() {
                        push("SluiceBackendSaturationForecast", "warning", backend_labels(b), (
                            format!("Sluice load balancer {lb}: backend {} of service \"{}\" reaches its limit in about {secs:.0} s at the current rate", b.backend, b.service),
                            format!("{} of {max} open and rising {:.1}/s; at the limit the load balancer refuses new connections ({}). Next: raise the limit or add backends before then.", b.open, growth / dt.as_secs_f64(), key_of(b)),
                        ));
                    }
                }
            }
        }
        let mut services: BTreeMap<&str, Vec<&BackendSample>> = BTreeMap::new();
        for b in &s.backends {
            services.entry(&*b.service).or_default().push(b);
        }
        for (svc, bs) in services {
            let labels = || vec![("service".to_owned(), svc.to_owned())];
            let active: Vec<&&BackendSample> = bs.iter().filter(|b| b.active).collect();
            if !active.is_empty() && active.iter().all(|b| b.cluster.as_ref().map_or(b.open, |c| c.cluster_open) >= u64::from(b.max_conns)) {
                push(
                    "SluiceServiceSaturated",
                    "critical",
                    labels(),
                    (
                        format!("Sluice load balancer {lb}: every backend of service \"{svc}\" is at its connection limit"),
                        format!(
                            "All {} active backends are full ({}); every new connection is refused by the load balancer. Next: raise max_conns in {file} or add backends.",
                            active.len(),
                            // A cluster-wide limit: the cluster's open against max_conns, and this node's part.
                            active
                                .iter()
                                .map(|b| match &b.cluster {
                                    Some(c) => format!("{} {}/{} over the cluster, {} here", b.backend, c.cluster_open, b.max_conns, b.open),
                                    None => format!("{} {}/{}", b.backend, b.open, b.max_conns),
                                })
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ),
                );
            }
            if active.is_empty() {
                push("SluiceNoHealthyBackend", "critical", labels(), (
                    format!("Sluice load balancer {lb}: service \"{svc}\" has no healthy active backend"),
                    format!("All {} backends are down or draining; new connections are refused (backend_down / no_backend). Next: check the backends' health and `sluice service list`.", bs.len()),
                ));
            }
        }
        let table_ratio = if s.flow_capacity == 0 { 0.0 } else { s.flows as f64 / s.flow_capacity as f64 };
        if table_ratio >= self.cfg.flow_table_ratio {
            push("SluiceFlowTableNearFull", "critical", Vec::new(), (
                format!("Sluice load balancer {lb}: flow table {:.0}% full ({} of {})", table_ratio * 100.0, s.flows, s.flow_capacity),
                format!("When it is full, new connections are refused (flow_table_full) — limits set by flows.capacity in {file}. Next: raise flows.capacity (needs `sluice detach` and a restart) or shorten flows.timeouts."),
            ));
        }
        if let Some((node, vips, error)) = &s.not_announcing {
            let vips = vips.join(", ");
            push("SluiceNotAnnouncing", "critical", vec![("node".to_owned(), node.clone())], (
                format!("Sluice load balancer {lb} (node \"{node}\") should announce {vips} but BIRD does not have it"),
                format!("The router sends this node no traffic for those VIPs; the datapath forwards what arrives. BIRD: {error}. Next: check BIRD (`birdc show protocols`) and cluster.bird_socket; the daemon retries every second."),
            ));
        }
        if let Some((_, _, cause)) = s.health_local.first() {
            let which: Vec<String> = s.health_local.iter().map(|(svc, b, _)| format!("{b} of \"{svc}\"")).collect();
            push("SluiceHealthChecksCannotRun", "critical", Vec::new(), (
                format!("Sluice load balancer {lb}: health checks of {} backends cannot run from this node", which.len()),
                format!("A cause on this node, not the backends: {cause}. Backends {} keep their place in the ring (no verdict without a check). Next: check this node's link, routes and open-file limit.", which.join(", ")),
            ));
        }
        if let Some(refused) = &s.change_refused {
            push("SluiceConfigChangeRefused", "warning", Vec::new(), (
                format!("Sluice load balancer {lb}: a reload of {file} was refused by the guard; the previous config still runs"),
                format!("The file lowers what a service admits below its load: {refused}. Nothing changed. Next: fix the file, or apply it on purpose with `sluice config apply {file} --force`."),
            ));
        }
        if let Some(l) = s.limits.as_ref().filter(|l| !l.connected && l.lost_for_s.is_some_and(|t| t >= 1.0)) {
            let mut shares: Vec<String> =
                l.backends.iter().map(|(k, b)| format!("{k}: share {} (safe share {}, max_conns {}), {} open here", b.share, b.safe_share, b.max_conns, b.open)).collect();
            if shares.is_empty() {
                shares.push("none read yet (this daemon has not reached etcd since it started; the journal has the safe shares it enforces)".into());
            }
            let state = if l.fenced {
                "its peers reach etcd, so it has fenced itself: its VIPs are withdrawn and it admits nothing until etcd answers and grants it shares again".to_owned()
            } else if l.fallback {
                format!("its lease ({} s) has run out, so it enforces the smaller of each share and its safe share", l.lease_ttl_s)
            } else {
                format!("it keeps its shares until its lease ({} s) would run out, then falls back to its safe shares", l.lease_ttl_s)
            };
            push("SluiceLimitsWithoutEtcd", "critical", vec![("node".to_owned(), l.node.clone())], (
                format!("Sluice load balancer {lb} (node \"{}\") cannot reach etcd ({}): cluster-wide limits are not rebalanced", l.node, l.etcd.join(", ")),
                format!(
                    "etcd out of reach for {:.0} s ({}); {state}. No node raises a limit without etcd: with etcd down for all, the cluster stays within max_conns. If only this node is cut off, the allocator keeps reserving what it may hold, and it fences itself after 2 × the lease while its peers reach etcd. Shares: {}. Next: bring etcd back (`etcdctl endpoint health`); the node joins again by itself.",
                    l.lost_for_s.unwrap_or(0.0),
                    l.error.as_deref().unwrap_or("no answer"),
                    shares.join("; ")
                ),
            ));
        }
        for (be, total) in &s.drift {
            let before = self.prev.as_ref().and_then(|(_, p)| p.drift.get(be).copied()).unwrap_or(*total);
            if *total > before {
                push(
                    "SluiceCounterDrift",
                    "warning",
                    vec![("backend".to_owned(), be.clone())],
                    (
                        format!("Sluice load balancer {lb}: the open-connection counter of backend {be} drifted and was corrected"),
                        format!("{total} connections corrected so far. Limits stay enforced on the corrected count. Next: report it if it recurs."),
                    ),
                );
            }
        }

        self.round += 1;
        let mut out = Vec::new();
        for c in conds {
            let st = self.rules.entry((c.name, c.labels.clone())).or_default();
            st.seen = self.round;
            st.severity = c.severity;
            st.false_since = None;
            let since = *st.true_since.get_or_insert(now);
            let after = if c.name == "SluiceRefusingConnections" { self.cfg.refusals_fire_after } else { self.cfg.fire_after };
            let starts = !st.firing && now.duration_since(since) >= after;
            st.firing |= starts;
            st.last = (c.summary, c.description);
            if starts {
                let (summary, description) = st.last.clone();
                out.push(self.notify(&s, Status::Firing, c.name, c.severity, &c.labels, summary, description));
            }
        }
        // Every condition not found true this time is false: resolve what stayed false for
        // resolve_after, forget what is not firing.
        let resolve_after = self.cfg.resolve_after;
        let mut resolved = Vec::new();
        self.rules.retain(|key, st| {
            if st.seen == self.round {
                return true;
            }
            st.true_since = None;
            let since = *st.false_since.get_or_insert(now);
            if st.firing && now.duration_since(since) >= resolve_after {
                resolved.push((key.clone(), st.severity, std::mem::take(&mut st.last)));
                return false;
            }
            st.firing
        });
        resolved.sort();
        for ((name, labels), severity, (summary, description)) in resolved {
            out.push(self.notify(&s, Status::Resolved, name, severity, &labels, format!("RESOLVED: {summary}"), description));
        }
        self.prev = Some((now, s));
        out
    }

    /// The receivers of `webhook` and `webhooks`.
    pub fn all_webhooks(cfg: &AlertsCfg) -> Vec<crate::config::WebhookCfg> {
        cfg.webhook.iter().chain(&cfg.webhooks).cloned().collect()
    }

    /// Alerts firing now: (name, labels).
    pub fn firing(&self) -> Vec<(String, Vec<(String, String)>)> {
        let mut out: Vec<_> = self.rules.iter().filter(|(_, s)| s.firing).map(|((name, labels), _)| ((*name).to_owned(), labels.clone())).collect();
        out.sort();
        out
    }
}

impl Engine {
    /// A notification: the rule's labels, the configured ones (global, then the service's; the
    /// rule's win) and the runbook's address.
    #[expect(clippy::too_many_arguments, reason = "the parts of one notification")]
    fn notify(&self, s: &Sample, status: Status, name: &'static str, severity: &'static str, labels: &[(String, String)], summary: String, description: String) -> Notification {
        let mut l: BTreeMap<String, String> = self.cfg.labels.clone();
        if let Some(svc) = labels.iter().find(|(k, _)| k == "service").and_then(|(_, v)| s.service_labels.get(v)) {
            l.extend(svc.clone());
        }
        l.extend(labels.iter().cloned());
        l.insert("alertname".into(), name.into());
        l.insert("severity".into(), severity.into());
        l.insert("instance".into(), self.name.clone());
        l.insert("component".into(), "sluice-load-balancer".into());
        let runbook_url = format!("{}#{}", self.cfg.runbook_url, name.to_lowercase());
        Notification { status, alertname: name.into(), severity: severity.into(), labels: l, summary, description, runbook_url }
    }
}

#[cfg(test)]
mod tests;
