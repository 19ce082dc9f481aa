//! The rules: what each alert's condition is over a [`Sample`] (and the one before it), and
//! its text. Only a condition that holds builds its text. The engine (`mod.rs`) keeps the
//! state between samples: pending, firing, resolved.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use super::{BackendSample, Cond, Sample};
use crate::config::AlertsCfg;

/// What the rules read: this load balancer's name, the settings, the sample and the previous
/// one with the time between them.
#[derive(Clone, Copy)]
pub(super) struct Rules<'a> {
    pub lb: &'a str,
    pub cfg: &'a AlertsCfg,
    pub s: &'a Sample,
    pub prev: Option<&'a Sample>,
    pub dt: Option<Duration>,
}

/// A condition found true, with its text.
fn push(out: &mut Vec<Cond>, name: &'static str, severity: &'static str, labels: Vec<(String, String)>, (summary, description): (String, String)) {
    out.push(Cond { name, severity, labels, summary, description });
}

/// Every condition true in the sample.
pub(super) fn conditions(r: Rules<'_>) -> Vec<Cond> {
    let mut out = Vec::new();
    backends(r, &mut out);
    services(r, &mut out);
    node(r, &mut out);
    limits(r, &mut out);
    drift(r, &mut out);
    out
}

/// Per backend: at or near its limit, refusing (per reason), saturating soon.
fn backends(r: Rules<'_>, out: &mut Vec<Cond>) {
    let Rules { lb, cfg, s, .. } = r;
    let file = &s.config_file;
    let backend_labels = |b: &BackendSample| vec![("service".to_owned(), b.service.to_string()), ("backend".to_owned(), b.backend.to_string())];
    let dt = r.dt;
    // The previous sample of a backend: at the same index when the backends did not change
    // (the usual case), else by name.
    let mut by_name: Option<HashMap<(&str, &str), &BackendSample>> = None;
    let mut prev_of = |i: usize, b: &BackendSample| -> Option<&BackendSample> {
        let p = r.prev?;
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
            push(out, "SluiceBackendAtLimit", "critical", backend_labels(b), (
                format!("Sluice load balancer {lb}: backend {} of service \"{}\" is at its connection limit ({open} of {max} open{whose})", b.backend, b.service),
                format!(
                    "The load balancer (not the backend, not the database) refuses new connections to {} because {} = {max} and {} are open. Next: raise the limit (`sluice backend set-limit {} {} N`, then in {file}) or add backends.",
                    b.backend, key_of(b), open, b.service, b.backend
                ),
            ));
        }
        if ratio >= cfg.near_limit_ratio && open < max {
            push(
                out,
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
                out,
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
                if secs <= cfg.forecast_horizon.as_secs_f64() {
                    push(out, "SluiceBackendSaturationForecast", "warning", backend_labels(b), (
                        format!("Sluice load balancer {lb}: backend {} of service \"{}\" reaches its limit in about {secs:.0} s at the current rate", b.backend, b.service),
                        format!("{} of {max} open and rising {:.1}/s; at the limit the load balancer refuses new connections ({}). Next: raise the limit or add backends before then.", b.open, growth / dt.as_secs_f64(), key_of(b)),
                    ));
                }
            }
        }
    }
}

/// Per service: every active backend full, or none healthy.
fn services(r: Rules<'_>, out: &mut Vec<Cond>) {
    let Rules { lb, s, .. } = r;
    let file = &s.config_file;
    let mut services: BTreeMap<&str, Vec<&BackendSample>> = BTreeMap::new();
    for b in &s.backends {
        services.entry(&*b.service).or_default().push(b);
    }
    for (svc, bs) in services {
        let labels = || vec![("service".to_owned(), svc.to_owned())];
        let active: Vec<&&BackendSample> = bs.iter().filter(|b| b.active).collect();
        if !active.is_empty() && active.iter().all(|b| b.cluster.as_ref().map_or(b.open, |c| c.cluster_open) >= u64::from(b.max_conns)) {
            push(
                out,
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
            push(out, "SluiceNoHealthyBackend", "critical", labels(), (
                format!("Sluice load balancer {lb}: service \"{svc}\" has no healthy active backend"),
                format!("All {} backends are down or draining; new connections are refused (backend_down / no_backend). Next: check the backends' health and `sluice service list`.", bs.len()),
            ));
        }
    }
}

/// This node: its flow table, its announcements, its health checks, a refused reload.
fn node(r: Rules<'_>, out: &mut Vec<Cond>) {
    let Rules { lb, cfg, s, .. } = r;
    let file = &s.config_file;
    let table_ratio = if s.flow_capacity == 0 { 0.0 } else { s.flows as f64 / s.flow_capacity as f64 };
    if table_ratio >= cfg.flow_table_ratio {
        push(out, "SluiceFlowTableNearFull", "critical", Vec::new(), (
            format!("Sluice load balancer {lb}: flow table {:.0}% full ({} of {})", table_ratio * 100.0, s.flows, s.flow_capacity),
            format!("When it is full, new connections are refused (flow_table_full) — limits set by flows.capacity in {file}. Next: raise flows.capacity (needs `sluice detach` and a restart) or shorten flows.timeouts."),
        ));
    }
    if let Some((node, vips, error)) = &s.not_announcing {
        let vips = vips.join(", ");
        push(out, "SluiceNotAnnouncing", "critical", vec![("node".to_owned(), node.clone())], (
            format!("Sluice load balancer {lb} (node \"{node}\") should announce {vips} but BIRD does not have it"),
            format!("The router sends this node no traffic for those VIPs; the datapath forwards what arrives. BIRD: {error}. Next: check BIRD (`birdc show protocols`) and cluster.bird_socket; the daemon retries every second."),
        ));
    }
    if let Some((_, _, cause)) = s.health_local.first() {
        let which: Vec<String> = s.health_local.iter().map(|(svc, b, _)| format!("{b} of \"{svc}\"")).collect();
        push(out, "SluiceHealthChecksCannotRun", "critical", Vec::new(), (
            format!("Sluice load balancer {lb}: health checks of {} backends cannot run from this node", which.len()),
            format!("A cause on this node, not the backends: {cause}. Backends {} keep their place in the ring (no verdict without a check). Next: check this node's link, routes and open-file limit.", which.join(", ")),
        ));
    }
    if let Some(refused) = &s.change_refused {
        push(out, "SluiceConfigChangeRefused", "warning", Vec::new(), (
            format!("Sluice load balancer {lb}: a reload of {file} was refused by the guard; the previous config still runs"),
            format!("The file lowers what a service admits below its load: {refused}. Nothing changed. Next: fix the file, or apply it on purpose with `sluice config apply {file} --force`."),
        ));
    }
}

/// Cluster-wide limits without etcd.
fn limits(r: Rules<'_>, out: &mut Vec<Cond>) {
    let Rules { lb, s, .. } = r;
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
        push(out, "SluiceLimitsWithoutEtcd", "critical", vec![("node".to_owned(), l.node.clone())], (
            format!("Sluice load balancer {lb} (node \"{}\") cannot reach etcd ({}): cluster-wide limits are not rebalanced", l.node, l.etcd.join(", ")),
            format!(
                "etcd out of reach for {:.0} s ({}); {state}. No node raises a limit without etcd: with etcd down for all, the cluster stays within max_conns. If only this node is cut off, the allocator keeps reserving what it may hold, and it fences itself after 2 × the lease while its peers reach etcd. Shares: {}. Next: bring etcd back (`etcdctl endpoint health`); the node joins again by itself.",
                l.lost_for_s.unwrap_or(0.0),
                l.error.as_deref().unwrap_or("no answer"),
                shares.join("; ")
            ),
        ));
    }
}

/// An open-connection counter corrected by reconciliation.
fn drift(r: Rules<'_>, out: &mut Vec<Cond>) {
    let Rules { lb, s, .. } = r;
    for (be, total) in &s.drift {
        let before = r.prev.and_then(|p| p.drift.get(be).copied()).unwrap_or(*total);
        if *total > before {
            push(
                out,
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
}
