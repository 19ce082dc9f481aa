//! The node: the daemon and the tasks that serve it, wired and started here so that the daemon
//! knows none of them. The tasks take a [`Daemon`] handle (to read its state and to change it
//! through its one change path); the daemon keeps only the records they fill (`status/`).
//!
//! - the control API on the control socket, and the read-only socket (`api/`);
//! - `/metrics` and the status page (`metrics.rs`, `statuspage.rs`);
//! - with `[cluster]`: the announcer (`announce.rs`), the peer channel (`peers.rs`), the
//!   cluster-wide limits through etcd (`limits.rs`).
//!
//! Every listener is bounded (`listen.rs`): no flood on one takes the descriptors the health
//! checks, the journal and the control socket need.

use tokio_util::sync::CancellationToken;

use crate::{
    announce, api,
    config::ClusterCfg,
    daemon::Daemon,
    limits,
    listen::{Limits, Listener},
    metrics, peers, Error,
};

/// Serves `daemon` until `shutdown` is cancelled (or SIGINT/SIGTERM when `signals`), then
/// stops the tasks and says so in the journal.
pub async fn run(daemon: &Daemon, shutdown: CancellationToken, signals: bool) -> Result<(), Error> {
    let parts = daemon.take_parts();
    let d = &parts.daemon;
    // The secrets first: a bad file is an error before anything is served.
    let creds = match &parts.cluster {
        Some(c) if parts.peers.is_some() => Some(peers::Credentials::load(c)?),
        _ => None,
    };
    let connect = parts.cluster.as_ref().and_then(|c| c.limits.as_ref()).map(limits::Connect::load).transpose()?.unwrap_or_default();
    let bounds = |max_connections, request_timeout| Limits { max_connections, header_timeout: d.http_header_timeout, request_timeout };
    let control = Listener::new("control", d.control_socket.display().to_string(), bounds(d.control_max_connections, None));
    let metrics_listener = Listener::new("metrics", d.metrics_listen.to_string(), bounds(d.metrics_max_connections, Some(d.http_request_timeout)));
    let peer = parts.cluster.as_ref().and_then(|c| Some((c.peer_listen?, c.peer_max_connections)));
    let peer_listener = peer.map(|(addr, max)| Listener::new("peer", addr.to_string(), bounds(max, Some(d.http_request_timeout))));
    // The read-only socket (`daemon.read_socket`): bounded as the control socket, its own count.
    let read_listener = d.read_socket.as_ref().map(|p| Listener::new("read", p.display().to_string(), bounds(d.control_max_connections, None)));
    daemon.set_listeners([Some(control.clone()), read_listener.clone(), Some(metrics_listener.clone()), peer_listener.clone()].into_iter().flatten().collect());
    let metrics_socket = metrics::bind(d.metrics_listen).await?;
    let socket = d.control_socket.clone();
    let listener = api::bind(&socket)?;
    let read = match (&d.read_socket, &d.read_socket_group, read_listener) {
        (Some(path), Some(group), Some(me)) => match api::bind_read(path, group, &socket) {
            Ok(l) => Some((l, path.clone(), me)),
            Err(e) => {
                let _ = std::fs::remove_file(&socket);
                return Err(e);
            }
        },
        _ => None,
    };
    let stop = shutdown.child_token();
    let api = tokio::spawn(api::serve(listener, socket.clone(), daemon.clone(), control, stop.clone()));
    let read_api = read.map(|(l, path, me)| tokio::spawn(api::serve_read(l, path, socket, daemon.clone(), me, stop.clone())));
    let metrics = tokio::spawn(metrics::serve(metrics_socket, d.metrics_listen, daemon.clone(), parts.metrics_web, metrics_listener, stop.clone()));
    let announcer = parts.cluster.clone().zip(parts.announce).map(|(cfg, (status, rx))| announce::spawn(cfg, daemon.clone(), status, rx, stop.clone()));
    let peer_stats = parts.peers.as_ref().map(|(s, _)| s.clone());
    let limits = parts.cluster.as_ref().zip(parts.limits).map(|(cfg, status)| {
        limits::spawn(cfg, parts.lease_file.clone(), daemon.clone(), status, limits::Links { etcd_ok: parts.etcd_ok.clone(), peers: peer_stats.clone(), connect }, stop.clone())
    });
    let mut peer_handles = Vec::new();
    if let (Some(cfg), Some((stats, rx)), Some(creds)) = (&parts.cluster, parts.peers, creds) {
        if !cfg.peers.is_empty() {
            peer_handles.push(peers::spawn_sender(cfg.node.clone(), cfg.peers.clone(), creds.clone(), daemon.clone(), stats.clone(), parts.etcd_ok.clone(), rx, stop.clone()));
        }
        if let (Some(listen), Some(me)) = (cfg.peer_listen, peer_listener) {
            let (daemon, stop) = (daemon.clone(), stop.clone());
            peer_handles.push(tokio::spawn(async move {
                if let Err(e) = peers::serve(listen, creds, daemon, stats, me, stop).await {
                    tracing::error!("{e}");
                }
            }));
        }
    }
    let served = daemon.serve(shutdown, signals).await;
    stop.cancel();
    let _ = api.await;
    if let Some(r) = read_api {
        let _ = r.await;
    }
    if let Some(a) = announcer {
        let _ = a.await;
    }
    if let Some(l) = limits {
        let _ = l.await;
        let nodes = parts.cluster.as_ref().map_or(1, ClusterCfg::limit_nodes);
        limits::on_stop(daemon, nodes).await;
    }
    for h in peer_handles {
        let _ = h.await;
    }
    daemon.stopped();
    if let Ok(Err(e)) = metrics.await {
        tracing::error!("{e}");
    }
    served
}
