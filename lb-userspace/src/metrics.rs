//! Prometheus metrics (`GET /metrics` on `daemon.metrics_listen`, loopback by default), in the
//! classic text exposition format so `promtool check metrics` accepts it. Values are read from
//! the datapath's maps at scrape time; nothing is cached.

use std::net::SocketAddr;

use axum::response::{IntoResponse as _, Response};
use lb_common::{Reason, TrafficStats};
use prometheus::{Encoder as _, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::{daemon::Daemon, Error};

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
pub fn render(daemon: &Daemon) -> Result<String, Error> {
    let r = Registry::new();
    let flows = int_gauge(&r, "sluice_flow_table_entries", "Flows in the flow table.", &[]);
    let capacity = int_gauge(&r, "sluice_flow_table_capacity", "Flows the table holds (config key flows.capacity); a full table refuses new flows.", &[]);
    let dp_packets = counter(&r, "sluice_datapath_packets_total", "Packets seen by the XDP program, by outcome.", &["outcome"]);
    let dp_bytes = counter(&r, "sluice_datapath_bytes_total", "Bytes seen by the XDP program, by outcome.", &["outcome"]);

    // The configured alert labels are label names of their own (empty where an alert lacks one).
    let custom: Vec<String> = daemon.read(|st| {
        let mut k: std::collections::BTreeSet<String> = st.cfg().alerts.labels.keys().cloned().collect();
        k.extend(st.cfg().services.iter().flat_map(|s| s.labels.keys().cloned()));
        k.into_iter().collect()
    });
    let names: Vec<&str> = ["alertname", "service", "backend", "severity"].into_iter().chain(custom.iter().map(String::as_str)).collect();
    let firing = int_gauge(&r, "sluice_alerts_firing", "1 for each alert firing now (with its routing labels: alerts.labels, service.labels).", &names);
    lock_families(&r, &daemon.lock_report());
    // The per-backend families (with 10,000 backends, ~200,000 series): the numbers are copied
    // under the state lock and written out after it is released.
    let (services, rows) = daemon.read(|st| -> Result<_, Error> {
        daemon_families(&r, st);
        cluster_families(&r, st);
        let limits = st.cluster().and_then(crate::daemon::Cluster::limits);
        for n in st.firing() {
            let get = |k: &str| n.labels.get(k).cloned().unwrap_or_default();
            let values: Vec<String> = [n.alertname.to_string(), get("service"), get("backend"), n.severity.to_string()].into_iter().chain(custom.iter().map(|k| get(k))).collect();
            firing.with_label_values(&values).set(1);
        }
        let end = st.applied().backend_ids_end();
        let all_stats = st.backend_stats_upto(end)?;
        let snapshot = st.outcomes()?;
        for o in &snapshot.outcomes {
            dp_packets.with_label_values(&[o.outcome.as_str()]).inc_by(o.packets);
            dp_bytes.with_label_values(&[o.outcome.as_str()]).inc_by(o.bytes);
        }
        let (len, cap) = st.flow_usage();
        flows.with_label_values::<&str>(&[]).set(len as i64);
        capacity.with_label_values::<&str>(&[]).set(cap as i64);
        let mut services = Vec::with_capacity(st.applied().services.len());
        let mut rows = Vec::with_capacity(st.applied().services.values().map(|s| s.backends.len()).sum());
        // Refusals with no backend to charge them to (no_backend, fragment, malformed) are counted
        // on the service only: report what its backends do not account for.
        let ids: Vec<u32> = st.applied().services.values().map(|s| s.id).collect();
        let svc_stats = ids.into_iter().map(|id| st.service_stats(id)).collect::<Result<Vec<_>, _>>()?;
        let (applied, corrections) = (st.applied(), st.corrections());
        for (s, svc) in applied.services.values().zip(svc_stats) {
            let mut on_backends = lb_common::Refusals::default();
            for b in s.backends.values() {
                let cl = limits.as_ref().and_then(|x| x.backends.get(&crate::shares::key(&s.name, b.address)));
                let stats: TrafficStats = all_stats[b.id as usize];
                on_backends.add(&stats.refused);
                rows.push(BackendRow {
                    service: services.len(),
                    address: b.address.to_string(),
                    open: st.open(b.id),
                    max_conns: b.max_conns,
                    share: cl.map(|c| (b.limit, c.cluster_open)),
                    state: lb_common::BackendState::from_u8(b.state),
                    stats,
                    drift: corrections.get(&b.id).copied().unwrap_or(0),
                });
            }
            let mut rest = lb_common::Refusals::default();
            for &reason in Reason::ALL {
                *rest.slot(reason) = svc.refused.get(reason).saturating_sub(on_backends.get(reason));
            }
            services.push((s.name.clone(), rest));
        }
        Ok((services, rows))
    })?;
    let mut out = Vec::new();
    TextEncoder::new().encode(&r.gather(), &mut out).map_err(|e| Error::other("encoding metrics", e))?;
    let mut out = String::from_utf8(out).expect("text format is UTF-8");
    write_backends(&mut out, &services, &rows);
    Ok(out)
}

/// The cluster's: VIPs announced, drained, the peer channel, and the limits' etcd rounds.
fn cluster_families(r: &Registry, st: &crate::daemon::State) {
    let announced = int_gauge(r, "sluice_vip_announced", "1 if this node announces the VIP through BIRD now, 0 if it should and does not or has withdrawn it.", &["node", "vip"]);
    let node_drained = int_gauge(r, "sluice_node_drained", "1 while this node is drained (`sluice node drain`).", &["node"]);
    let peer_reported = counter(r, "sluice_peer_adopted_flows_reported_total", "Flows this node adopted after a rehash and reported to its peers.", &["node"]);
    let peer_released = counter(r, "sluice_peer_moved_flows_released_total", "Slots released here because a peer reported adopting the flow (it moved away).", &["node"]);
    let peer_refused = counter(r, "sluice_peer_messages_refused_total", "Peer-channel messages refused (bad HMAC, stale, malformed).", &["node"]);
    let peer_pending = int_gauge(r, "sluice_peer_pending_batches", "Batches of adopted flows not yet delivered, per peer (kept a minute).", &["node", "peer"]);
    let etcd_up = int_gauge(r, "sluice_limits_etcd_connected", "With cluster-wide limits: 1 if etcd answered this node's last round.", &["node"]);
    let fallback = int_gauge(r, "sluice_limits_fallback", "With cluster-wide limits: 1 while this node enforces its safe shares (etcd lost for longer than the lease).", &["node"]);
    let leader = int_gauge(r, "sluice_limits_allocator", "With cluster-wide limits: 1 if this node computes the cluster's shares now.", &["node"]);
    let etcd_requests = counter(r, "sluice_limits_etcd_requests_total", "With cluster-wide limits: requests this node sent to etcd.", &["node"]);
    let grants_applied = counter(r, "sluice_limits_grants_applied_total", "With cluster-wide limits: grants of shares this node applied.", &["node"]);
    let limits = st.cluster().and_then(crate::daemon::Cluster::limits);
    if let Some(l) = &limits {
        let n = [l.node.as_str()];
        etcd_up.with_label_values(&n).set(i64::from(l.connected));
        fallback.with_label_values(&n).set(i64::from(l.fallback));
        leader.with_label_values(&n).set(i64::from(l.leader.as_deref() == Some(l.node.as_str())));
        etcd_requests.with_label_values(&n).inc_by(l.traffic.requests);
        grants_applied.with_label_values(&n).inc_by(l.traffic.grants_applied);
    }
    if let Some(c) = st.cluster() {
        let s = c.status();
        for vip in s.wanted.union(&s.announced) {
            announced.with_label_values(&[s.node.clone(), vip.to_string()]).set(i64::from(s.announced.contains(vip)));
        }
        node_drained.with_label_values(std::slice::from_ref(&s.node)).set(i64::from(s.drained));
        if let Some(p) = c.peer_stats() {
            peer_reported.with_label_values(std::slice::from_ref(&s.node)).inc_by(p.reported);
            peer_released.with_label_values(std::slice::from_ref(&s.node)).inc_by(p.released);
            peer_refused.with_label_values(std::slice::from_ref(&s.node)).inc_by(p.refused);
            for (peer, n) in &p.pending {
                peer_pending.with_label_values(&[s.node.clone(), peer.clone()]).set(*n as i64);
            }
        }
    }
}

/// The daemon's own: a refused reload, the listeners' bounds and counts, and the open files
/// (`listen.rs`, `openfiles.rs`).
/// How long the daemon's one lock is held (`daemon/lock.rs`): a long hold stalls the API, the
/// scrapes and every change.
fn lock_families(r: &Registry, l: &crate::daemon::LockReport) {
    let one = |name: &str, help: &str| counter(r, name, help, &[]);
    one("sluice_state_lock_holds_total", "Times the daemon's state lock was taken.").with_label_values::<&str>(&[]).inc_by(l.holds);
    one("sluice_state_lock_holds_over_10ms_total", "Holds of the daemon's state lock longer than 10 ms.").with_label_values::<&str>(&[]).inc_by(l.over_10ms);
    one("sluice_state_lock_holds_over_100ms_total", "Holds of the daemon's state lock longer than 100 ms.").with_label_values::<&str>(&[]).inc_by(l.over_100ms);
    let g = prometheus::GaugeVec::new(
        Opts::new("sluice_state_lock_longest_hold_seconds", "The longest hold of the daemon's state lock since the start (sluice status names the code that took it)."),
        &[],
    )
    .expect("gauge");
    r.register(Box::new(g.clone())).expect("register");
    g.with_label_values::<&str>(&[]).set(l.longest_ms / 1e3);
}

fn daemon_families(r: &Registry, st: &crate::daemon::State) {
    let refused_change = int_gauge(r, "sluice_config_change_refused", "1 while the last reload was refused by the guard (the previous config runs).", &[]);
    refused_change.with_label_values::<&str>(&[]).set(i64::from(st.change_refused().is_some()));
    let l_open = int_gauge(r, "sluice_listener_connections_open", "Connections a listener (control, metrics, peer) serves now.", &["listener"]);
    let l_max =
        int_gauge(r, "sluice_listener_max_connections", "The most connections a listener serves at once (daemon.*_max_connections, cluster.peer_max_connections).", &["listener"]);
    let l_accepted = counter(r, "sluice_listener_connections_accepted_total", "Connections a listener took to serve.", &["listener"]);
    let l_refused = counter(r, "sluice_listener_connections_refused_total", "Connections a listener closed at once because it served its maximum.", &["listener"]);
    let l_timed_out = counter(
        r,
        "sluice_listener_connections_timed_out_total",
        "Connections a listener closed for silence or slowness (daemon.http_header_timeout, daemon.http_request_timeout).",
        &["listener"],
    );
    let l_errors = counter(r, "sluice_listener_accept_errors_total", "Accepts that failed (e.g. no file descriptor left); the listener retries.", &["listener"]);
    let l_handshakes = counter(
        r,
        "sluice_listener_tls_handshake_failures_total",
        "TLS handshakes a listener failed (no certificate, another CA, expired, not TLS); the connection is closed.",
        &["listener"],
    );
    let fds_open = int_gauge(r, "process_open_fds", "Number of open file descriptors.", &[]);
    let fds_max = int_gauge(r, "process_max_fds", "Maximum number of open file descriptors (the soft limit, raised to the hard one at start).", &[]);
    let fds_needed = int_gauge(
        r,
        "sluice_open_files_needed",
        "File descriptors the config may need at once (listeners' limits, health checks, and the rest); the daemon warns at start when process_max_fds is below.",
        &[],
    );
    for l in st.listeners() {
        let n = [l.name.as_str()];
        l_open.with_label_values(&n).set(l.open as i64);
        l_max.with_label_values(&n).set(i64::from(l.max_connections));
        l_accepted.with_label_values(&n).inc_by(l.accepted);
        l_refused.with_label_values(&n).inc_by(l.refused);
        l_timed_out.with_label_values(&n).inc_by(l.timed_out);
        l_errors.with_label_values(&n).inc_by(l.accept_errors);
        l_handshakes.with_label_values(&n).inc_by(l.handshake_failures);
    }
    if let Some(f) = st.open_files() {
        fds_open.with_label_values::<&str>(&[]).set(f.open as i64);
        fds_max.with_label_values::<&str>(&[]).set(f.limit as i64);
        fds_needed.with_label_values::<&str>(&[]).set(f.needed as i64);
    }
}

/// One backend's numbers at the scrape.
struct BackendRow {
    /// Index into the services' names.
    service: usize,
    address: String,
    open: u64,
    max_conns: u32,
    /// With cluster-wide limits: this node's share and the cluster's open connections.
    share: Option<(u32, u64)>,
    state: Option<lb_common::BackendState>,
    stats: TrafficStats,
    drift: u64,
}

/// Writes the per-backend families in the text format, each sample's labels sorted by name as
/// the `prometheus` crate's encoder does. Written directly rather than through a registry: a
/// registry costs a hashed lookup and label vectors per series, ~1 s a scrape at 10,000
/// backends against ~50 ms this way (BENCHMARKS.md).
fn write_backends(out: &mut String, services: &[(String, lb_common::Refusals)], rows: &[BackendRow]) {
    use std::fmt::Write as _;
    let names: Vec<String> = services.iter().map(|(n, _)| escape(n)).collect();
    out.reserve(rows.len() * 1700);
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
    };
    let each = |out: &mut String, name: &str, kind: &str, help: &str, value: &dyn Fn(&BackendRow) -> Option<f64>| {
        if !rows.iter().any(|r| value(r).is_some()) {
            return;
        }
        family(out, name, kind, help);
        for r in rows {
            if let Some(v) = value(r) {
                let _ = writeln!(out, "{name}{{backend=\"{}\",service=\"{}\"}} {v}", r.address, names[r.service]);
            }
        }
    };
    let int = |v: u64| Some(v as f64);
    each(out, "sluice_backend_adopted_flows_total", "counter", "Mid-stream flows adopted onto the backend (no flow entry found).", &|r| int(r.stats.adopted));
    each(out, "sluice_backend_bytes_total", "counter", "Bytes forwarded to the backend.", &|r| int(r.stats.bytes));
    each(out, "sluice_backend_cluster_open_connections", "gauge", "With cluster-wide limits: open connections to the backend over every node (their last reports).", &|r| {
        r.share.map(|(_, c)| c as f64)
    });
    each(out, "sluice_backend_max_connections", "gauge", "The backend's connection limit (config key service.backend.max_conns).", &|r| int(u64::from(r.max_conns)));
    each(out, "sluice_backend_new_flows_total", "counter", "New flows admitted to the backend.", &|r| int(r.stats.new_flows));
    each(out, "sluice_backend_open_connections", "gauge", "Open connections the load balancer counts on a backend (shared exact counter).", &|r| int(r.open));
    each(out, "sluice_backend_packets_total", "counter", "Packets forwarded to the backend.", &|r| int(r.stats.packets));
    // With cluster-wide limits, saturation is the cluster's: its open connections over max_conns.
    each(out, "sluice_backend_saturation_ratio", "gauge", "Open connections divided by max_conns; 1 means new connections to it are refused.", &|r| {
        let counted = r.share.map_or(r.open, |(_, c)| c);
        Some(if r.max_conns == 0 { 1.0 } else { counted as f64 / f64::from(r.max_conns) })
    });
    each(
        out,
        "sluice_backend_share_connections",
        "gauge",
        "With cluster-wide limits: the open connections this node may hold, its share of max_conns (safe share while etcd is lost).",
        &|r| r.share.map(|(s, _)| f64::from(s)),
    );
    if !rows.is_empty() {
        let name = "sluice_backend_state";
        family(out, name, "gauge", "1 for the backend's current state (active, draining, down).");
        for r in rows {
            for &state in lb_common::BackendState::ALL {
                let _ = writeln!(out, "{name}{{backend=\"{}\",service=\"{}\",state=\"{}\"}} {}", r.address, names[r.service], state.name(), u8::from(r.state == Some(state)));
            }
        }
    }
    each(out, "sluice_backend_up", "gauge", "1 if the backend takes new connections (active), 0 if draining or down.", &|r| {
        Some(f64::from(u8::from(r.state == Some(lb_common::BackendState::Active))))
    });
    each(out, "sluice_drift_corrected_connections_total", "counter", "Connections by which the shared counter disagreed with the flow table and was corrected.", &|r| int(r.drift));
    if !services.is_empty() {
        let name = "sluice_refusals_total";
        family(out, name, "counter", "New connections refused by the load balancer, by reason.");
        for r in rows {
            for &reason in Reason::ALL {
                let _ = writeln!(out, "{name}{{backend=\"{}\",reason=\"{}\",service=\"{}\"}} {}", r.address, reason.name(), names[r.service], r.stats.refused.get(reason));
            }
        }
        for (i, (_, rest)) in services.iter().enumerate() {
            for &reason in Reason::ALL {
                let _ = writeln!(out, "{name}{{backend=\"\",reason=\"{}\",service=\"{}\"}} {}", reason.name(), names[i], rest.get(reason));
            }
        }
    }
}

/// A label value as the text format writes it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Serves `/metrics` and the status page (`statuspage.rs`) on `addr` within `me`'s bounds
/// (`listen.rs`) until `shutdown`.
/// With `web` (`daemon.metrics_web_config`), over TLS and/or behind basic authentication.
/// Binds `daemon.metrics_listen`: before the control socket exists, so that a daemon that
/// answers on its socket is also listening here (and a port in use stops the start).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, Error> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| Error::other(format!("binding the metrics endpoint {addr} (daemon.metrics_listen)"), e))
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    daemon: Daemon,
    web: Option<crate::webconfig::WebConfig>,
    me: std::sync::Arc<crate::listen::Listener>,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), Error> {
    // A scrape is a GET: no body worth buffering. The status page (`/`, `/status.json`) is
    // added before the web config's guard, so it is served exactly as `/metrics` is.
    let mut app =
        axum::Router::new().route("/metrics", axum::routing::get(scrape)).merge(crate::statuspage::routes()).layer(axum::extract::DefaultBodyLimit::max(4096)).with_state(daemon);
    let mut tls = None;
    if let Some(web) = web {
        app = web.guard(app);
        tls = web.tls;
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(%addr, "metrics on {scheme}://{addr}/metrics, status page on {scheme}://{addr}/");
    crate::listen::serve(listener, app, me, tls, shutdown).await;
    Ok(())
}

async fn scrape(axum::extract::State(daemon): axum::extract::State<Daemon>) -> Response {
    // Off the async workers: with thousands of backends a render takes tens of milliseconds.
    match tokio::task::spawn_blocking(move || render(&daemon)).await.unwrap_or_else(|e| Err(Error::other("rendering metrics", e))) {
        Ok(body) => ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response(),
        Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
