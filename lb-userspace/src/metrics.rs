//! Prometheus metrics (`GET /metrics` on `daemon.metrics_listen`, loopback by default), in the
//! classic text exposition format so `promtool check metrics` accepts it. Values are read from
//! the datapath's maps at scrape time; nothing is cached.

use std::net::SocketAddr;

use lb_common::{Reason, TrafficStats};
use axum::response::{IntoResponse as _, Response};
use prometheus::{Encoder as _, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::{api::Shared, reconcile::state_name, stats, Error};

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn int_gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

/// Renders every metric from the current state of the datapath and the daemon.
pub fn render(state: &Shared) -> Result<String, Error> {
    let r = Registry::new();
    let open = int_gauge(&r, "sluice_backend_open_connections", "Open connections the load balancer counts on a backend (shared exact counter).", &["service", "backend"]);
    let max = int_gauge(&r, "sluice_backend_max_connections", "The backend's connection limit (config key service.backend.max_conns).", &["service", "backend"]);
    let sat = gauge(&r, "sluice_backend_saturation_ratio", "Open connections divided by max_conns; 1 means new connections to it are refused.", &["service", "backend"]);
    let up = int_gauge(&r, "sluice_backend_up", "1 if the backend takes new connections (active), 0 if draining or down.", &["service", "backend"]);
    let bstate = int_gauge(&r, "sluice_backend_state", "1 for the backend's current state (active, draining, down).", &["service", "backend", "state"]);
    let refusals = counter(&r, "sluice_refusals_total", "New connections refused by the load balancer, by reason.", &["service", "backend", "reason"]);
    let packets = counter(&r, "sluice_backend_packets_total", "Packets forwarded to the backend.", &["service", "backend"]);
    let bytes = counter(&r, "sluice_backend_bytes_total", "Bytes forwarded to the backend.", &["service", "backend"]);
    let new_flows = counter(&r, "sluice_backend_new_flows_total", "New flows admitted to the backend.", &["service", "backend"]);
    let adopted = counter(&r, "sluice_backend_adopted_flows_total", "Mid-stream flows adopted onto the backend (no flow entry found).", &["service", "backend"]);
    let drift = counter(&r, "sluice_drift_corrected_connections_total", "Connections by which the shared counter disagreed with the flow table and was corrected.", &["service", "backend"]);
    let flows = int_gauge(&r, "sluice_flow_table_entries", "Flows in the flow table.", &[]);
    let capacity = int_gauge(&r, "sluice_flow_table_capacity", "Flows the table holds (config key flows.capacity); a full table refuses new flows.", &[]);
    let dp_packets = counter(&r, "sluice_datapath_packets_total", "Packets seen by the XDP program, by outcome.", &["outcome"]);
    let dp_bytes = counter(&r, "sluice_datapath_bytes_total", "Bytes seen by the XDP program, by outcome.", &["outcome"]);

    // The configured alert labels are label names of their own (empty where an alert lacks one).
    let custom: Vec<String> = {
        let st = state.lock().expect("state lock");
        let mut k: std::collections::BTreeSet<String> = st.cfg.alerts.labels.keys().cloned().collect();
        k.extend(st.cfg.services.iter().flat_map(|s| s.labels.keys().cloned()));
        k.into_iter().collect()
    };
    let names: Vec<&str> = ["alertname", "service", "backend", "severity"].into_iter().chain(custom.iter().map(String::as_str)).collect();
    let firing = int_gauge(&r, "sluice_alerts_firing", "1 for each alert firing now (with its routing labels: alerts.labels, service.labels).", &names);
    let announced = int_gauge(&r, "sluice_vip_announced", "1 if this node announces the VIP through BIRD now, 0 if it should and does not or has withdrawn it.", &["node", "vip"]);
    let node_drained = int_gauge(&r, "sluice_node_drained", "1 while this node is drained (`sluice node drain`).", &["node"]);
    let peer_reported = counter(&r, "sluice_peer_adopted_flows_reported_total", "Flows this node adopted after a rehash and reported to its peers.", &["node"]);
    let peer_released = counter(&r, "sluice_peer_moved_flows_released_total", "Slots released here because a peer reported adopting the flow (it moved away).", &["node"]);
    let peer_refused = counter(&r, "sluice_peer_messages_refused_total", "Peer-channel messages refused (bad HMAC, stale, malformed).", &["node"]);
    let peer_pending = int_gauge(&r, "sluice_peer_pending_batches", "Batches of adopted flows not yet delivered, per peer (kept a minute).", &["node", "peer"]);
    let share = int_gauge(&r, "sluice_backend_share_connections", "With cluster-wide limits: the open connections this node may hold, its share of max_conns (safe share while etcd is lost).", &["service", "backend"]);
    let cluster_open = int_gauge(&r, "sluice_backend_cluster_open_connections", "With cluster-wide limits: open connections to the backend over every node (their last reports).", &["service", "backend"]);
    let etcd_up = int_gauge(&r, "sluice_limits_etcd_connected", "With cluster-wide limits: 1 if etcd answered this node's last round.", &["node"]);
    let fallback = int_gauge(&r, "sluice_limits_fallback", "With cluster-wide limits: 1 while this node enforces its safe shares (etcd lost for longer than the lease).", &["node"]);
    let leader = int_gauge(&r, "sluice_limits_allocator", "With cluster-wide limits: 1 if this node computes the cluster's shares now.", &["node"]);
    let etcd_requests = counter(&r, "sluice_limits_etcd_requests_total", "With cluster-wide limits: requests this node sent to etcd.", &["node"]);
    let grants_applied = counter(&r, "sluice_limits_grants_applied_total", "With cluster-wide limits: grants of shares this node applied.", &["node"]);
    let refused_change = int_gauge(&r, "sluice_config_change_refused", "1 while the last reload was refused by the guard (the previous config runs).", &[]);
    let mut st = state.lock().expect("state lock");
    let st = &mut *st;
    refused_change.with_label_values::<&str>(&[]).set(i64::from(st.change_refused.is_some()));
    let limits = st.cluster.as_ref().and_then(|c| c.limits.as_ref()).map(|l| l.lock().expect("limits status").clone());
    if let Some(l) = &limits {
        let n = [l.node.as_str()];
        etcd_up.with_label_values(&n).set(i64::from(l.connected));
        fallback.with_label_values(&n).set(i64::from(l.fallback));
        leader.with_label_values(&n).set(i64::from(l.leader.as_deref() == Some(l.node.as_str())));
        etcd_requests.with_label_values(&n).inc_by(l.traffic.requests);
        grants_applied.with_label_values(&n).inc_by(l.traffic.grants_applied);
    }
    if let Some(c) = &st.cluster {
        let s = c.status.lock().expect("status");
        for vip in s.wanted.union(&s.announced) {
            announced.with_label_values(&[s.node.clone(), vip.to_string()]).set(i64::from(s.announced.contains(vip)));
        }
        node_drained.with_label_values(&[s.node.clone()]).set(i64::from(s.drained));
        if let Some(p) = &c.peers {
            let p = p.stats.lock().expect("stats");
            peer_reported.with_label_values(&[s.node.clone()]).inc_by(p.reported);
            peer_released.with_label_values(&[s.node.clone()]).inc_by(p.released);
            peer_refused.with_label_values(&[s.node.clone()]).inc_by(p.refused);
            for (peer, n) in &p.pending {
                peer_pending.with_label_values(&[s.node.clone(), peer.clone()]).set(*n as i64);
            }
        }
    }
    for n in &st.firing {
        let get = |k: &str| n.labels.get(k).cloned().unwrap_or_default();
        let values: Vec<String> = [n.alertname.to_owned(), get("service"), get("backend"), n.severity.to_owned()].into_iter().chain(custom.iter().map(|k| get(k))).collect();
        firing.with_label_values(&values).set(1);
    }
    let t = st.dp.tables();
    let snapshot = stats::read(&t.stats_map()?)?;
    for o in &snapshot.outcomes {
        dp_packets.with_label_values(&[o.outcome.as_str()]).inc_by(o.packets);
        dp_bytes.with_label_values(&[o.outcome.as_str()]).inc_by(o.bytes);
    }
    flows.with_label_values::<&str>(&[]).set(st.flows.len() as i64);
    capacity.with_label_values::<&str>(&[]).set(st.flows.capacity() as i64);
    for s in st.applied.services.values() {
        // Refusals with no backend to charge them to (no_backend, fragment, malformed) are
        // counted on the service only: report what its backends do not account for.
        let mut on_backends = lb_common::Refusals::default();
        for b in s.backends.values() {
            let addr = b.address.to_string();
            let l = [s.name.as_str(), addr.as_str()];
            let n = st.conns.get(b.id);
            open.with_label_values(&l).set(n as i64);
            max.with_label_values(&l).set(i64::from(b.max_conns));
            // With cluster-wide limits, saturation is the cluster's: its open connections over max_conns.
            let cl = limits.as_ref().and_then(|x| x.backends.get(&crate::shares::key(&s.name, b.address)));
            let counted = cl.map_or(n, |c| c.cluster_open);
            if let Some(c) = cl {
                share.with_label_values(&l).set(i64::from(b.limit));
                cluster_open.with_label_values(&l).set(c.cluster_open as i64);
            }
            sat.with_label_values(&l).set(if b.max_conns == 0 { 1.0 } else { counted as f64 / f64::from(b.max_conns) });
            up.with_label_values(&l).set(i64::from(state_name(b.state) == "active"));
            for name in ["active", "draining", "down"] {
                bstate.with_label_values(&[s.name.as_str(), addr.as_str(), name]).set(i64::from(state_name(b.state) == name));
            }
            let ts: TrafficStats = t.backend_stats(b.id)?;
            packets.with_label_values(&l).inc_by(ts.packets);
            bytes.with_label_values(&l).inc_by(ts.bytes);
            new_flows.with_label_values(&l).inc_by(ts.new_flows);
            adopted.with_label_values(&l).inc_by(ts.adopted);
            for reason in Reason::ALL {
                refusals.with_label_values(&[s.name.as_str(), addr.as_str(), reason.name()]).inc_by(ts.refused.get(*reason));
            }
            on_backends.add(&ts.refused);
            drift.with_label_values(&l).inc_by(st.reconciler.corrections.get(&b.id).copied().unwrap_or(0));
        }
        let svc = t.service_stats(s.id)?;
        for reason in Reason::ALL {
            let rest = svc.refused.get(*reason).saturating_sub(on_backends.get(*reason));
            refusals.with_label_values(&[s.name.as_str(), "", reason.name()]).inc_by(rest);
        }
    }
    let mut out = Vec::new();
    TextEncoder::new().encode(&r.gather(), &mut out).map_err(|e| Error::other("encoding metrics", e))?;
    Ok(String::from_utf8(out).expect("text format is UTF-8"))
}

/// Serves `/metrics` on `addr` until `shutdown`.
pub async fn serve(addr: SocketAddr, state: Shared, shutdown: tokio_util::sync::CancellationToken) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| Error::other(format!("binding the metrics endpoint {addr} (daemon.metrics_listen)"), e))?;
    let app = axum::Router::new().route("/metrics", axum::routing::get(scrape)).with_state(state);
    tracing::info!(%addr, "metrics on /metrics");
    axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await.map_err(|e| Error::other("metrics endpoint", e))
}

async fn scrape(axum::extract::State(st): axum::extract::State<Shared>) -> Response {
    match render(&st) {
        Ok(body) => ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response(),
        Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
