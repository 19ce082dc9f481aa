//! The semantic checks of a config that types alone cannot express.

use std::{collections::HashSet, time::Duration};

use lb_common::{MAX_BACKENDS, MAX_SERVICES, MAX_SPILL};

use super::{alerts, parse_mac, Config, Finding, HealthKind, Mode, Proto, Reject, Severity, Spill, MAX_LISTENER_CONNECTIONS, MAX_RING_SIZE, RESERVED_LABELS};
use crate::maglev::is_prime;

/// Semantic checks that types alone cannot express.
#[expect(clippy::too_many_lines, reason = "one list of checks")]
pub fn validate(cfg: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut err = |key: String, message: String| out.push(Finding { severity: Severity::Error, key, message });
    let mut warnings = Vec::new();
    let mut warn = |key: String, message: String| warnings.push(Finding { severity: Severity::Warning, key, message });

    if cfg.daemon.interface.trim().is_empty() {
        err("daemon.interface".into(), "must name the interface to attach to".into());
    }
    let listeners = [
        Some(("daemon.metrics_max_connections", cfg.daemon.metrics_max_connections)),
        Some(("daemon.control_max_connections", cfg.daemon.control_max_connections)),
        cfg.cluster.as_ref().map(|c| ("cluster.peer_max_connections", c.peer_max_connections)),
    ];
    for (key, n) in listeners.into_iter().flatten() {
        if n == 0 {
            err(key.into(), "must be at least 1 (connections served at once; more are closed at once and counted)".into());
        } else if n > MAX_LISTENER_CONNECTIONS {
            err(key.into(), format!("{n} is above {MAX_LISTENER_CONNECTIONS}: each connection holds a file descriptor and up to 64 KiB of buffers"));
        }
    }
    let (header, request) = (cfg.daemon.http_header_timeout, cfg.daemon.http_request_timeout);
    if header < Duration::from_millis(100) || header > Duration::from_mins(5) {
        err("daemon.http_header_timeout".into(), format!("{header:?}: between 100ms and 5m (how long a connection may stay silent or trickle a request's head)"));
    }
    if request < Duration::from_secs(1) || request > Duration::from_hours(1) {
        err("daemon.http_request_timeout".into(), format!("{request:?}: between 1s and 1h (a request's body and answer)"));
    }
    match (&cfg.daemon.read_socket, &cfg.daemon.read_socket_group) {
        (Some(_), None) => err("daemon.read_socket_group".into(), "required with daemon.read_socket: the group whose members may read through it (e.g. \"sluice-read\")".into()),
        (None, Some(_)) => err("daemon.read_socket_group".into(), "set without daemon.read_socket (the read-only socket it opens to the group)".into()),
        (Some(path), Some(group)) => {
            if *path == cfg.daemon.control_socket {
                err(
                    "daemon.read_socket".into(),
                    format!("{} is daemon.control_socket's path: give the read-only socket its own (e.g. /run/sluice/sluice-read.sock)", path.display()),
                );
            }
            match nix::unistd::Group::from_name(group) {
                Ok(Some(_)) => {}
                Ok(None) => err("daemon.read_socket_group".into(), format!("no group named \"{group}\" on this machine: create it (`groupadd {group}`) or name an existing one")),
                Err(e) => err("daemon.read_socket_group".into(), format!("looking up the group \"{group}\": {e}")),
            }
        }
        (None, None) => {}
    }
    if let Some(c) = &cfg.cluster {
        if c.node.trim().is_empty() || c.node.contains(char::is_whitespace) {
            err("cluster.node".into(), format!("\"{}\" must be a name without spaces (this node's, e.g. \"lb1\")", c.node));
        }
        if (!c.peers.is_empty() || c.peer_listen.is_some()) && c.peer_key_file.is_none() && c.tls.is_none() {
            err(
                "cluster.tls".into(),
                "the peer channel (cluster.peers, cluster.peer_listen) needs mutual TLS (cluster.tls = { ca, cert, key }) or a shared key file (cluster.peer_key_file)".into(),
            );
        }
        if !c.peers.is_empty() && c.peer_listen.is_none() {
            err("cluster.peer_listen".into(), "with cluster.peers, this node must listen for its peers too (e.g. \"10.0.0.11:9478\")".into());
        }
        if c.peer_listen.is_some_and(|l| c.peers.contains(&l)) {
            err("cluster.peers".into(), "lists this node's own cluster.peer_listen; list the other nodes only".into());
        }
        if c.peer_listen.is_some() && (1..=MAX_LISTENER_CONNECTIONS).contains(&c.peer_max_connections) && (c.peer_max_connections as usize) < c.peers.len() {
            warn(
                "cluster.peer_max_connections".into(),
                format!("{} is below the {} peers: when they all report at once, some are refused and retry a second later", c.peer_max_connections, c.peers.len()),
            );
        }
        if let Some(l) = &c.limits {
            if l.etcd.is_empty() {
                err("cluster.limits.etcd".into(), "must list etcd's client URLs (e.g. [\"http://10.0.0.1:2379\"])".into());
            }
            for (i, u) in l.etcd.iter().enumerate() {
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    err(format!("cluster.limits.etcd[{i}]"), format!("{u:?}: an etcd client URL, http://host:port or https://host:port"));
                } else if u.starts_with("https://") != l.tls.is_some() {
                    let why = if l.tls.is_some() {
                        "plain http:// while cluster.limits.tls is set: use https://"
                    } else {
                        "https:// needs cluster.limits.tls = { ca = \"…\" } (and cert, key for --client-cert-auth)"
                    };
                    err(format!("cluster.limits.etcd[{i}]"), format!("{u:?}: {why}"));
                }
            }
            if let Some(t) = &l.tls {
                if t.cert.is_some() != t.key.is_some() {
                    err("cluster.limits.tls".into(), "cert and key go together (a client certificate and its private key)".into());
                }
            }
            if l.username.is_some() && l.tls.is_none() {
                warn("cluster.limits.password_file".into(), "etcd's password goes over plain http:// readable on the network; use https:// with cluster.limits.tls".into());
            }
            if l.username.is_some() != l.password_file.is_some() {
                err("cluster.limits.username".into(), "username and password_file go together (an etcd user and a file holding its password)".into());
            }
            if !l.prefix.starts_with('/') || l.prefix.ends_with('/') || l.prefix.contains(char::is_whitespace) {
                err("cluster.limits.prefix".into(), format!("{:?}: a key prefix like \"/sluice\" (leading slash, none at the end)", l.prefix));
            }
            if l.lease_ttl < Duration::from_secs(2) || l.lease_ttl > Duration::from_hours(1) {
                err("cluster.limits.lease_ttl".into(), format!("{:?}: between 2s and 1h (etcd counts leases in whole seconds)", l.lease_ttl));
            }
            if l.nodes == Some(0) {
                err("cluster.limits.nodes".into(), "must be at least 1".into());
            }
            if l.nodes.is_none() && c.peers.is_empty() {
                err("cluster.limits.nodes".into(), "how many nodes share the limits (their safe shares divide max_conns by it); set it, or list cluster.peers".into());
            }
        }
    }
    let label_ok = |k: &str| k.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_') && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    let labels = cfg
        .alerts
        .labels
        .keys()
        .map(|k| ("alerts.labels".to_owned(), k))
        .chain(cfg.services.iter().enumerate().flat_map(|(i, s)| s.labels.keys().map(move |k| (format!("service[{i}].labels"), k))));
    for (at, k) in labels {
        if !label_ok(k) {
            err(format!("{at}.{k}"), format!("\"{k}\" is not a label name (letters, digits, _; not starting with a digit)"));
        } else if RESERVED_LABELS.contains(&k.as_str()) {
            err(format!("{at}.{k}"), format!("\"{k}\" is set by Sluice itself; choose another name"));
        }
    }
    if !(1.0..=10.0).contains(&cfg.guard.headroom) {
        err("guard.headroom".into(), format!("{} must be between 1 and 10 (review suggests max_conns = peak × headroom, e.g. 1.25)", cfg.guard.headroom));
    }
    if cfg.guard.window < Duration::from_mins(1) || cfg.guard.window > Duration::from_hours(720) {
        err("guard.window".into(), format!("{:?}: between 1m and 30d (the history keeps minutes for 24 h, hours for 30 days)", cfg.guard.window));
    }
    if !cfg.daemon.metrics_listen.ip().is_loopback() && cfg.daemon.metrics_web_config.is_none() {
        warn(
            "daemon.metrics_listen".into(),
            format!("{} is reachable from the network without daemon.metrics_web_config (TLS, basic auth); metrics reveal backends and limits", cfg.daemon.metrics_listen),
        );
    }
    let a = &cfg.alerts;
    if !(0.0..1.0).contains(&a.near_limit_ratio) || a.near_limit_ratio == 0.0 {
        err("alerts.near_limit_ratio".into(), format!("{} must be between 0 and 1 (e.g. 0.8)", a.near_limit_ratio));
    }
    if !(0.0..=1.0).contains(&a.flow_table_ratio) || a.flow_table_ratio == 0.0 {
        err("alerts.flow_table_ratio".into(), format!("{} must be between 0 and 1 (e.g. 0.9)", a.flow_table_ratio));
    }
    if a.interval < Duration::from_millis(100) {
        err("alerts.interval".into(), format!("{:?} is too short; at least 100ms (1s is the default)", a.interval));
    }
    for (i, w) in a.webhook.iter().chain(&a.webhooks).enumerate() {
        let key = if a.webhook.is_some() && i == 0 { "alerts.webhook".to_owned() } else { format!("alerts.webhooks[{}]", i - usize::from(a.webhook.is_some())) };
        for f in alerts::validate_webhook(w, &key) {
            match f.severity {
                Severity::Error => err(f.key, f.message),
                Severity::Warning => warn(f.key, f.message),
            }
        }
    }
    if a.command.as_ref().is_some_and(Vec::is_empty) {
        err("alerts.command".into(), "must name a program (an argv list, e.g. [\"/usr/local/bin/page-oncall\"])".into());
    }
    if cfg.flows.capacity == 0 {
        err("flows.capacity".into(), "must be at least 1".into());
    }
    let t = &cfg.flows.timeouts;
    for (name, d) in [("syn", t.syn), ("established", t.established), ("closing", t.closing), ("udp", t.udp)] {
        if d.is_zero() {
            err(format!("flows.timeouts.{name}"), "must be longer than 0s".into());
        }
    }
    if t.syn > t.established {
        warn("flows.timeouts.syn".into(), format!("{:?} is longer than the established timeout {:?}: half-open flows outlive idle connections", t.syn, t.established));
    }
    if let Some(mac) = &cfg.datapath.gateway_mac {
        if parse_mac(mac).is_none() {
            err("datapath.gateway_mac".into(), format!("\"{mac}\" is not a MAC address (write 02:00:00:00:00:01)"));
        }
    }
    if cfg.services.len() > MAX_SERVICES as usize {
        err("service".into(), format!("{} services; the datapath holds at most {MAX_SERVICES}", cfg.services.len()));
    }
    let total_backends: usize = cfg.services.iter().map(|s| s.backends.len()).sum();
    if total_backends >= MAX_BACKENDS as usize {
        err("service".into(), format!("{total_backends} backends in all; the datapath holds at most {}", MAX_BACKENDS - 1));
    }

    let mut names = HashSet::new();
    let mut endpoints = HashSet::new();
    let mut sum_limits: u64 = 0;
    for (i, s) in cfg.services.iter().enumerate() {
        let k = format!("service[{i}]");
        if s.name.trim().is_empty() {
            err(format!("{k}.name"), "must not be empty".into());
        } else if !names.insert(s.name.as_str()) {
            err(format!("{k}.name"), format!("\"{}\" is used by another service", s.name));
        }
        if s.port == 0 {
            err(format!("{k}.port"), "must be 1..65535".into());
        }
        if !endpoints.insert((s.vip, s.port, s.proto)) {
            err(format!("{k}.vip"), format!("{}:{} {:?} is already another service's", s.vip, s.port, s.proto).to_lowercase());
        }
        if s.vip.is_unspecified() || s.vip.is_multicast() {
            err(format!("{k}.vip"), format!("{} cannot be a VIP", s.vip));
        }
        if !is_prime(s.ring_size) || s.ring_size < 13 || s.ring_size > MAX_RING_SIZE {
            err(format!("{k}.ring_size"), format!("{} must be a prime between 13 and {MAX_RING_SIZE} (e.g. 65537)", s.ring_size));
        } else if (s.ring_size as usize) < 100 * s.backends.len().max(1) {
            warn(format!("{k}.ring_size"), format!("{} slots for {} backends balances unevenly; use at least 100 per backend", s.ring_size, s.backends.len()));
        }
        if let Spill::Candidates(n) = s.overflow.spill {
            if u32::from(n) > MAX_SPILL {
                err(format!("{k}.overflow.spill"), format!("{n} candidates; the datapath tries at most {MAX_SPILL}"));
            }
        }
        if s.proto == Proto::Udp && s.overflow.reject == Reject::Rst {
            warn(format!("{k}.overflow.reject"), "\"rst\" applies to TCP only; refused UDP datagrams are dropped".into());
        }
        if s.backends.is_empty() {
            warn(format!("{k}.backend"), "no backends: every new connection is refused (no_backend)".into());
        }
        let mut addrs = HashSet::new();
        for (j, b) in s.backends.iter().enumerate() {
            let bk = format!("{k}.backend[{j}]");
            if !addrs.insert(b.address) {
                err(format!("{bk}.address"), format!("{} is already a backend of this service", b.address));
            }
            if s.mode == Mode::L2dsr && b.address.is_ipv4() != s.vip.is_ipv4() {
                err(format!("{bk}.address"), format!("{} and the VIP {} are of different address families; l2dsr cannot cross them (use mode = \"ipip\")", b.address, s.vip));
            }
            if b.max_conns == 0 {
                err(format!("{bk}.max_conns"), "is 0, which refuses every connection; drain the backend instead (drain = true)".into());
            }
            sum_limits += u64::from(b.max_conns);
            if let Some(safe) = b.safe_share {
                let limits = cfg.cluster.as_ref().and_then(|c| c.limits.as_ref());
                if limits.is_none() {
                    err(format!("{bk}.safe_share"), "is for cluster-wide limits only ([cluster.limits])".into());
                } else if safe > b.max_conns {
                    err(format!("{bk}.safe_share"), format!("{safe} is above max_conns ({}); the nodes' safe shares must sum to max_conns at most", b.max_conns));
                }
            }
            if b.weight == 0 {
                warn(format!("{bk}.weight"), "is 0: the backend is in no ring and gets no new flows".into());
            }
            if let Some(mac) = &b.mac {
                if parse_mac(mac).is_none() {
                    err(format!("{bk}.mac"), format!("\"{mac}\" is not a MAC address (write 02:00:00:00:00:01)"));
                }
            }
            if let Some(h) = &b.health {
                if h.interval.is_zero() {
                    err(format!("{bk}.health.interval"), "must be longer than 0s".into());
                }
                if h.timeout.is_zero() || h.timeout > h.interval {
                    err(format!("{bk}.health.timeout"), format!("{:?} must be above 0 and at most the interval {:?}", h.timeout, h.interval));
                }
                if h.rise == 0 || h.fall == 0 {
                    err(format!("{bk}.health"), "rise and fall must be at least 1".into());
                }
                match (h.kind, &h.path) {
                    (HealthKind::Http, Some(p)) if !p.starts_with('/') => err(format!("{bk}.health.path"), format!("\"{p}\" must start with /")),
                    (HealthKind::Tcp, Some(_)) => err(format!("{bk}.health.path"), "applies to kind = \"http\" only".into()),
                    _ => {}
                }
                if !(100..=599).contains(&h.expect_status) {
                    err(format!("{bk}.health.expect_status"), format!("{} is not an HTTP status", h.expect_status));
                }
            }
        }
    }
    if sum_limits > u64::from(cfg.flows.capacity) {
        warn(
            "flows.capacity".into(),
            format!("{} is below the sum of all max_conns ({sum_limits}): the flow table can fill before any limit is reached, refusing with flow_table_full", cfg.flows.capacity),
        );
    }
    out.extend(warnings);
    out
}
