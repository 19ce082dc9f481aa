//! The status page on the metrics listener: `GET /` (one static HTML page with its CSS and
//! script, `statuspage.html`) and `GET /status.json`, which the page fetches every two seconds.
//! It is the page an operator opens during an incident: per backend open / `max_conns` and
//! whether it is at its limit, the alerts firing with their text, the last refusals and journal
//! entries, and the node (announced, drained, etcd, the datapath's outcomes).
//!
//! It costs nothing while nobody looks: no task runs for it; `/status.json` reads the same state
//! `/v1/status` reports at each request, off the async workers. Rates (new flows/s, refusals/s)
//! are the browser's: it divides the difference of two samples' totals by the time between
//! them (`unix_ms`), as `sluice top` does. Served behind `daemon.metrics_web_config` like
//! `/metrics` (`metrics::serve`).

use crate::key::BackendKey;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::LazyLock,
};

use axum::{
    extract::State,
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse as _, Response},
    routing::get,
    Router,
};
use serde::{Deserialize, Serialize};

use crate::{api::BreakGlass, daemon::Daemon, Error};

/// The page: markup, style and script in one file, no external asset.
const PAGE: &str = include_str!("statuspage.html");
/// Refusal events and journal entries on the page.
const EVENTS: usize = 20;
const JOURNAL: usize = 20;
/// How often the page fetches `/status.json`.
const REFRESH_MS: u64 = 2000;

/// `GET /status.json`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Page {
    pub version: String,
    /// This load balancer's name: `cluster.node`, else `alerts.name`, else the host name.
    pub name: String,
    /// When it was read: RFC 3339, and Unix milliseconds (the page's rates divide by it).
    pub time: String,
    pub unix_ms: u64,
    pub refresh_ms: u64,
    /// `alerts.near_limit_ratio`: where a bar turns amber.
    pub near_limit_ratio: f64,
    pub node: Node,
    pub services: Vec<Service>,
    pub alerts: Vec<crate::alerts::Notification>,
    pub break_glass: Vec<BreakGlass>,
    /// What the guard said of the last reload it refused (the previous config runs).
    pub change_refused: Option<String>,
    /// The last refusal events (sampled by the datapath), oldest first.
    pub events: Vec<crate::events::Event>,
    /// The last journal entries (`sluice timeline`), oldest first.
    pub journal: Vec<crate::journal::Entry>,
    /// Why the journal could not be read.
    pub journal_error: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Node {
    pub interface: String,
    /// With `[cluster]`: what this node announces through BIRD.
    pub cluster: Option<NodeCluster>,
    /// With `[cluster.limits]`: etcd and the shares.
    pub limits: Option<NodeLimits>,
    pub flows: u64,
    pub flow_capacity: u32,
    /// The datapath's packets by outcome (totals; the page shows rates).
    pub outcomes: Vec<crate::stats::OutcomeCount>,
    pub total_packets: u64,
    pub total_bytes: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct NodeCluster {
    pub node: String,
    pub drained: bool,
    /// Withdrawn: cut off from etcd while its peers are not.
    pub fenced: bool,
    pub vips: Vec<Vip>,
    /// Why BIRD does not have what is wanted.
    pub error: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Vip {
    pub vip: IpAddr,
    /// This node should announce it (it can serve it and is not drained).
    pub wanted: bool,
    /// BIRD has it from this node.
    pub announced: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct NodeLimits {
    pub etcd: Vec<String>,
    /// etcd answered this node's last round.
    pub connected: bool,
    /// Seconds since etcd last answered, while it does not.
    pub lost_for_s: Option<f64>,
    /// Enforcing safe shares: etcd was lost for longer than the lease.
    pub fallback: bool,
    pub fenced: bool,
    /// The node allocating the shares.
    pub leader: Option<String>,
    pub error: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Service {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub proto: String,
    pub mode: String,
    /// Totals since the datapath was loaded, refusals no backend is charged with included
    /// (`no_backend`, `fragment`, `malformed`); reasons with none left out.
    pub new_flows: u64,
    pub refused: BTreeMap<String, u64>,
    pub backends: Vec<Backend>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Backend {
    pub address: IpAddr,
    /// `healthy` (active, its health check passes), `up` (active, no health check), `drained`,
    /// `down` (failed its health check) or `removing` (left the config, draining).
    pub state: String,
    /// Open connections on this node (the exact shared counter).
    pub open: u64,
    /// The configured limit (cluster-wide with `[cluster.limits]`; a break-glass one while set).
    pub max_conns: u32,
    /// What this node admits: `max_conns`, or its share of it.
    pub limit: u32,
    /// What counts against `max_conns`: `open`, or the cluster's open connections.
    pub counted: u64,
    /// `counted / max_conns`.
    pub saturation: f64,
    /// `counted` reached `max_conns`: new connections to it are refused.
    pub at_limit: bool,
    /// With cluster-wide limits: this node's share used up while the cluster has room.
    pub at_share: bool,
    /// With cluster-wide limits: this node's share, its safe share and the cluster's open.
    pub cluster: Option<crate::limits::BackendLimit>,
    pub weight: u32,
    /// Totals since the datapath was loaded; reasons with none left out.
    pub new_flows: u64,
    pub refused: BTreeMap<String, u64>,
}

/// The routes: `/` and `/status.json` (for the metrics router, before its guard is applied).
pub fn routes() -> Router<Daemon> {
    Router::new().route("/", get(page)).route("/status.json", get(json))
}

/// The script and the style are inline (one page, one request): the policy allows exactly them,
/// by hash, and nothing from anywhere else.
static CSP: LazyLock<HeaderValue> = LazyLock::new(|| {
    let script = sha256_source(inline(PAGE, "script"));
    let style = sha256_source(inline(PAGE, "style"));
    let policy =
        format!("default-src 'none'; script-src {script}; style-src {style}; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'");
    HeaderValue::from_str(&policy).expect("a header value")
});

/// The text of the page's one `<tag>` element.
fn inline<'a>(page: &'a str, tag: &str) -> &'a str {
    let open = format!("<{tag}>");
    let start = page.find(&open).map_or_else(|| panic!("statuspage.html has a <{tag}>"), |i| i + open.len());
    let end = page[start..].find(&format!("</{tag}>")).unwrap_or_else(|| panic!("statuspage.html closes its <{tag}>"));
    &page[start..start + end]
}

fn sha256_source(text: &str) -> String {
    use base64::Engine as _;
    use sha2::{Digest as _, Sha256};
    format!("'sha256-{}'", base64::engine::general_purpose::STANDARD.encode(Sha256::digest(text.as_bytes())))
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8")),
            (header::CONTENT_SECURITY_POLICY, CSP.clone()),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        PAGE,
    )
        .into_response()
}

async fn json(State(daemon): State<Daemon>) -> Response {
    // Off the async workers: with thousands of backends this reads tens of thousands of counters.
    let page = tokio::task::spawn_blocking(move || collect(&daemon)).await.unwrap_or_else(|e| Err(Error::other("reading the status", e)));
    let body = page.map_err(|e| e.to_string()).and_then(|p| serde_json::to_string(&p).map_err(|e| e.to_string()));
    let headers = |content| {
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content)),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ]
    };
    match body {
        Ok(body) => (headers("application/json"), body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, headers("application/json"), serde_json::json!({ "error": e }).to_string()).into_response(),
    }
}

/// Reads the page's data: what `/v1/status` reports, the last refusal events and journal
/// entries, and a few settings from the running config.
pub fn collect(daemon: &Daemon) -> Result<Page, Error> {
    let status = daemon.status()?;
    let events = daemon.recent_events(EVENTS);
    let (name, near_limit_ratio, journal_path, change_refused, checked, totals) = daemon.read(|st| -> Result<_, Error> {
        let cfg = st.cfg();
        let name = cfg
            .cluster
            .as_ref()
            .map(|c| c.node.clone())
            .or_else(|| cfg.alerts.name.clone())
            .unwrap_or_else(|| nix::unistd::gethostname().map_or_else(|_| "sluice".into(), |h| h.to_string_lossy().into_owned()));
        let checked: BTreeSet<BackendKey> =
            cfg.services.iter().flat_map(|s| s.backends.iter().filter(|b| b.health.is_some()).map(|b| BackendKey::new(s.name.clone(), b.address))).collect();
        let (near, path, refused) = (cfg.alerts.near_limit_ratio, st.journal().path().to_path_buf(), st.change_refused().map(str::to_owned));
        let ids: Vec<(String, u32)> = st.applied().services.values().map(|s| (s.name.clone(), s.id)).collect();
        let totals = ids.into_iter().map(|(n, id)| st.service_stats(id).map(|t| (n, t))).collect::<Result<BTreeMap<_, _>, _>>()?;
        Ok((name, near, path, refused, checked, totals))
    })?;
    let (journal, journal_error) = match crate::journal::tail(&journal_path, JOURNAL) {
        Ok(j) => (j, None),
        Err(e) => (Vec::new(), Some(format!("reading {}: {e}", journal_path.display()))),
    };
    let now = std::time::SystemTime::now();
    let services = status
        .services
        .into_iter()
        .map(|s| {
            let total = totals.get(&s.name).copied().unwrap_or_default();
            let backends = s
                .backends
                .into_iter()
                .map(|b| {
                    let health_checked = checked.contains(&BackendKey::new(s.name.clone(), b.address));
                    backend(b, health_checked)
                })
                .collect();
            Service {
                refused: lb_common::Reason::ALL.iter().map(|r| (r.name().to_owned(), total.refused.get(*r))).filter(|(_, n)| *n > 0).collect(),
                new_flows: total.new_flows,
                name: s.name,
                vip: s.vip,
                port: s.port,
                proto: s.proto.name().to_owned(),
                mode: s.mode.name().to_owned(),
                backends,
            }
        })
        .collect();
    let cluster = status.cluster.map(|c| NodeCluster {
        vips: c.wanted.union(&c.announced).map(|v| Vip { vip: *v, wanted: c.wanted.contains(v), announced: c.announced.contains(v) }).collect(),
        node: c.node,
        drained: c.drained,
        fenced: c.fenced,
        error: c.error,
    });
    let limits = status.limits.map(|l| NodeLimits {
        etcd: l.etcd,
        connected: l.connected,
        lost_for_s: l.lost_for_s,
        fallback: l.fallback,
        fenced: l.fenced,
        leader: l.leader,
        error: l.error,
    });
    Ok(Page {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        name,
        time: humantime::format_rfc3339_millis(now).to_string(),
        unix_ms: now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        refresh_ms: REFRESH_MS,
        near_limit_ratio,
        node: Node {
            interface: status.interface,
            cluster,
            limits,
            flows: status.flows,
            flow_capacity: status.flow_capacity,
            outcomes: status.outcomes.outcomes,
            total_packets: status.outcomes.total_packets,
            total_bytes: status.outcomes.total_bytes,
        },
        services,
        alerts: status.alerts_firing,
        break_glass: status.break_glass,
        change_refused,
        events,
        journal,
        journal_error,
    })
}

/// One backend as the page shows it.
fn backend(b: crate::api::BackendReport, health_checked: bool) -> Backend {
    let counted = b.cluster.as_ref().map_or(b.open, |c| c.cluster_open);
    let saturation = if b.max_conns == 0 { 1.0 } else { counted as f64 / f64::from(b.max_conns) };
    let at_limit = counted >= u64::from(b.max_conns);
    let state = match b.state.as_str() {
        _ if b.removed => "removing",
        "active" if health_checked => "healthy",
        "active" => "up",
        "draining" => "drained",
        other => other,
    };
    Backend {
        address: b.address,
        state: state.to_owned(),
        open: b.open,
        max_conns: b.max_conns,
        limit: b.limit,
        counted,
        saturation,
        at_limit,
        at_share: b.cluster.is_some() && !at_limit && b.open >= u64::from(b.limit),
        cluster: b.cluster,
        weight: b.weight,
        new_flows: b.new_flows,
        refused: b.refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(open: u64, max_conns: u32, state: &str) -> crate::api::BackendReport {
        crate::api::BackendReport {
            address: "10.0.0.11".parse().expect("address"),
            id: 1,
            state: state.into(),
            open,
            max_conns,
            limit: max_conns,
            cluster: None,
            weight: 1,
            removed: false,
            new_flows: 7,
            refused: BTreeMap::from([("backend_limit".to_owned(), 3)]),
        }
    }

    #[test]
    fn a_backend_at_its_limit_is_marked_and_states_are_named() {
        let b = backend(report(2, 2, "active"), false);
        assert!(b.at_limit && !b.at_share && (b.saturation - 1.0).abs() < 1e-9 && b.state == "up", "{b:?}");
        let b = backend(report(1, 2, "active"), true);
        assert!(!b.at_limit && (b.saturation - 0.5).abs() < 1e-9 && b.state == "healthy", "{b:?}");
        assert_eq!(backend(report(0, 2, "draining"), false).state, "drained");
        assert_eq!(backend(report(0, 2, "down"), true).state, "down");
        // Cluster-wide: the cluster's open connections count; a node at its share is not at the limit.
        let mut r = report(3, 10, "active");
        r.limit = 3;
        r.cluster = Some(crate::limits::BackendLimit { max_conns: 10, share: 3, open: 3, cluster_open: 7, safe_share: 3 });
        let b = backend(r.clone(), false);
        assert!(!b.at_limit && b.at_share && b.counted == 7, "{b:?}");
        r.cluster.as_mut().expect("cluster").cluster_open = 10;
        assert!(backend(r, false).at_limit);
    }

    #[test]
    fn the_page_is_self_contained_and_its_policy_allows_exactly_its_script_and_style() {
        let csp = CSP.to_str().expect("ascii");
        assert!(csp.contains(&sha256_source(inline(PAGE, "script"))) && csp.contains(&sha256_source(inline(PAGE, "style"))), "{csp}");
        assert!(csp.starts_with("default-src 'none'") && !csp.contains("unsafe"), "{csp}");
        assert_eq!(PAGE.matches("<script").count(), 1, "one inline script, the one hashed");
        assert_eq!(PAGE.matches("<style").count(), 1, "one inline style, the one hashed");
        // No external asset (no CDN, no font): the daemon serves everything.
        for external in ["src=\"http", "href=\"http", "url(http", "@import", "//cdn", "src=\"//"] {
            assert!(!PAGE.contains(external), "statuspage.html refers to an external asset ({external})");
        }
        // Data reaches the DOM as text only.
        for sink in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("] {
            assert!(!PAGE.contains(sink), "statuspage.html uses {sink}");
        }
        // A style attribute would need 'unsafe-inline': the script sets widths through the CSSOM.
        assert!(!PAGE.contains(" style=\""), "statuspage.html has a style attribute the policy blocks");
        assert!(PAGE.contains("name=\"viewport\""), "readable on a phone");
        assert!(PAGE.contains("status.json"), "the page fetches its data");
    }
}
