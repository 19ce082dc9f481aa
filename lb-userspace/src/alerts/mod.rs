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
    pub fn evaluate(&mut self, now: Instant, s: Sample) -> Vec<Notification> {
        let rules = rules::Rules { lb: &self.name, cfg: &self.cfg, s: &s, prev: self.prev.as_ref().map(|(_, p)| p), dt: self.prev.as_ref().map(|(t, _)| now.duration_since(*t)) };
        let conds = rules::conditions(rules);
        let out = self.transition(now, &s, conds);
        self.prev = Some((now, s));
        out
    }

    /// The conditions found true now against the state: what starts firing (held for
    /// `fire_after`), what resolves (false for `resolve_after`), what is forgotten.
    fn transition(&mut self, now: Instant, s: &Sample, conds: Vec<Cond>) -> Vec<Notification> {
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
                out.push(self.notify(s, Status::Firing, c.name, c.severity, &c.labels, summary, description));
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
            out.push(self.notify(s, Status::Resolved, name, severity, &labels, format!("RESOLVED: {summary}"), description));
        }
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

mod rules;
#[cfg(test)]
mod tests;
