//! `[alerts]`: the alert rules' settings (`alerts.rs` evaluates them) and the webhooks that
//! receive them (`sinks.rs` delivers), with the checks of a webhook's URL, TLS and credentials.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use hyper::header::HeaderValue;
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};

use super::{Finding, Severity};

/// `[alerts]` in the config file.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsCfg {
    /// Name of this load balancer in messages (default: the host name).
    #[serde(default)]
    pub name: Option<String>,
    /// How often the rules are evaluated (refusal events also trigger an evaluation).
    #[serde(default = "d_interval", with = "crate::config::humantime_str")]
    pub interval: Duration,
    #[serde(default = "d_fire", with = "crate::config::humantime_str")]
    pub fire_after: Duration,
    /// Refusals are not a gauge near a threshold but clients already failing: they fire after
    /// this (default at once; the daemon evaluates as soon as a refusal event arrives).
    #[serde(default, with = "crate::config::humantime_str")]
    pub refusals_fire_after: Duration,
    #[serde(default = "d_resolve", with = "crate::config::humantime_str")]
    pub resolve_after: Duration,
    /// A backend is "near its limit" at this share of max_conns.
    #[serde(default = "d_near")]
    pub near_limit_ratio: f64,
    /// The flow table is "near full" at this share of its capacity.
    #[serde(default = "d_table")]
    pub flow_table_ratio: f64,
    /// Warn when the open-connection trend reaches max_conns within this horizon.
    #[serde(default = "d_horizon", with = "crate::config::humantime_str")]
    pub forecast_horizon: Duration,
    /// POST each firing/resolved alert (Alertmanager API v2 JSON).
    #[serde(default)]
    pub webhook: Option<WebhookCfg>,
    /// More receivers, e.g. every member of an Alertmanager HA pair (each gets every alert).
    #[serde(default)]
    pub webhooks: Vec<WebhookCfg>,
    /// Run this command for each firing/resolved alert (SLUICE_ALERT* in its environment).
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Labels on every alert (e.g. `{ team = "netops" }`), for routing to the owning team; a
    /// service's `labels` add to them for its alerts.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Each alert's `runbook_url` annotation is this with `#` and the alert's name in lower case
    /// appended (the sections of `docs/RUNBOOK.md`).
    #[serde(default = "d_runbook")]
    pub runbook_url: String,
}

fn d_runbook() -> String {
    "https://sluice.example/docs/RUNBOOK.md".into()
}

/// Label names Sluice sets itself; configured labels may not take them.
pub const RESERVED_LABELS: &[&str] = &["alertname", "severity", "service", "backend", "reason", "node", "instance", "component"];

fn d_interval() -> Duration {
    Duration::from_secs(1)
}
fn d_fire() -> Duration {
    Duration::from_secs(2)
}
fn d_resolve() -> Duration {
    Duration::from_secs(10)
}
fn d_near() -> f64 {
    0.8
}
fn d_table() -> f64 {
    0.9
}
fn d_horizon() -> Duration {
    Duration::from_mins(5)
}

impl Default for AlertsCfg {
    fn default() -> Self {
        Self {
            name: None,
            interval: d_interval(),
            fire_after: d_fire(),
            refusals_fire_after: Duration::ZERO,
            resolve_after: d_resolve(),
            near_limit_ratio: d_near(),
            flow_table_ratio: d_table(),
            forecast_horizon: d_horizon(),
            webhook: None,
            webhooks: Vec::new(),
            command: None,
            labels: BTreeMap::new(),
            runbook_url: d_runbook(),
        }
    }
}

/// `[alerts.webhook]`, an entry of `alerts.webhooks`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookCfg {
    /// `http://host:port/path` or `https://host:port/path` (e.g. Alertmanager's
    /// `/api/v2/alerts`). Over https the receiver's certificate must be valid for `host`.
    pub url: String,
    #[serde(default = "d_timeout", with = "crate::config::humantime_str")]
    pub timeout: Duration,
    #[serde(default = "d_retries")]
    pub retries: u32,
    /// The CA the receiver's certificate must chain to (`https://`); default: the system's CAs.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// HTTP basic auth (Alertmanager's `basic_auth_users`); the password is read from its file
    /// at each delivery (a rotated one is picked up).
    #[serde(default)]
    pub basic_auth: Option<BasicAuth>,
    /// A file holding a bearer token (`Authorization: Bearer …`), read at each delivery.
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
}

/// `basic_auth = { username = "…", password_file = "…" }`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    pub username: String,
    /// Readable by its owner only; a trailing newline is not part of the password.
    pub password_file: PathBuf,
}

impl WebhookCfg {
    /// A receiver at `url` with the default timeout and retries and no TLS settings or
    /// credentials.
    pub fn new(url: impl Into<String>) -> Self {
        Self { url: url.into(), timeout: d_timeout(), retries: d_retries(), ca_file: None, basic_auth: None, bearer_token_file: None }
    }
}

fn d_timeout() -> Duration {
    Duration::from_secs(2)
}
fn d_retries() -> u32 {
    3
}

/// Where a webhook URL points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pub https: bool,
    /// The host as written, without an IPv6 address's brackets: a DNS name or an IP address
    /// (the TLS server name).
    pub host: String,
    pub port: u16,
    /// `host:port` (`[v6]:port`): what is connected to, and the Host header.
    pub authority: String,
    /// The path and query, from the `/`.
    pub path: String,
}

const URL_FORMS: &str = "http://host[:port]/path or https://host[:port]/path";

/// Parses `http[s]://host[:port]/path`; the error says why not.
pub(crate) fn parse_url(url: &str) -> Result<Target, String> {
    let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!("only {URL_FORMS} URLs are supported"));
    };
    let (auth, path) = rest.find('/').map_or((rest, "/".to_owned()), |i| (&rest[..i], rest[i..].to_owned()));
    if auth.contains('@') {
        return Err("credentials in the URL are not supported (they would show in logs): use basic_auth or bearer_token_file".into());
    }
    if auth.contains(['?', '#', ' ']) {
        return Err(format!("{auth:?} is not a host[:port] ({URL_FORMS})"));
    }
    let (host, port) = if let Some(v6) = auth.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("an IPv6 address's closing ] is missing")?;
        (host, if after.is_empty() { None } else { Some(after.strip_prefix(':').ok_or_else(|| format!("{auth:?} is not [address]:port"))?) })
    } else {
        match auth.split_once(':') {
            Some((_, p)) if p.contains(':') => return Err(format!("{auth:?}: an IPv6 address goes in brackets, [2001:db8::1]:9093")),
            Some((h, p)) => (h, Some(p)),
            None => (auth, None),
        }
    };
    if host.is_empty() {
        return Err("the URL has no host".into());
    }
    let port = match port {
        None => {
            if https {
                443
            } else {
                80
            }
        }
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("{p:?} is not a port (1-65535)"))?,
    };
    if https && ServerName::try_from(host).is_err() {
        return Err(format!("{host:?} is neither a DNS name nor an IP address (the name the receiver's certificate must be valid for)"));
    }
    let authority = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    Ok(Target { https, host: host.to_owned(), port, authority, path })
}

/// A secret file's problem as a config finding reads it: the file and the reason (the key is
/// the finding's).
fn secret_problem(path: &Path, e: &crate::Error) -> String {
    match e {
        crate::Error::Other { source, .. } => format!("{}: {source:#}", path.display()),
        other => other.to_string(),
    }
}

/// The checks of one webhook, `key` naming it (`alerts.webhooks[0]`): the URL, the TLS and
/// credential settings, and the secret files (that they exist, hold something and only their
/// owner may read them: a daemon refuses to start with a permissive one).
pub(crate) fn validate_webhook(w: &WebhookCfg, key: &str) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut err = |k: String, message: String| out.push(Finding { severity: Severity::Error, key: k, message });
    let target = match parse_url(&w.url) {
        Ok(t) => Some(t),
        Err(e) => {
            err(format!("{key}.url"), format!("{:?}: {e}", w.url));
            None
        }
    };
    if w.timeout.is_zero() {
        err(format!("{key}.timeout"), "must be longer than 0s".into());
    }
    if w.basic_auth.is_some() && w.bearer_token_file.is_some() {
        err(format!("{key}.bearer_token_file"), "set together with basic_auth: give one kind of credentials, basic_auth or bearer_token_file".into());
    }
    if let Some(b) = &w.basic_auth {
        if b.username.is_empty() || b.username.contains(':') || b.username.chars().any(char::is_control) {
            err(format!("{key}.basic_auth.username"), format!("{:?}: a user name, not empty, without ':' (basic auth joins user:password)", b.username));
        }
        let k = format!("{key}.basic_auth.password_file");
        if let Err(e) = crate::tls::read_secret(&b.password_file, &k) {
            err(k, secret_problem(&b.password_file, &e));
        }
    }
    if let Some(f) = &w.bearer_token_file {
        let k = format!("{key}.bearer_token_file");
        match crate::tls::read_secret(f, &k) {
            Err(e) => err(k, secret_problem(f, &e)),
            Ok(t) if HeaderValue::from_str(&format!("Bearer {t}")).is_err() => err(k, format!("{}: the token has characters an HTTP header cannot carry", f.display())),
            Ok(_) => {}
        }
    }
    if let Some(ca) = &w.ca_file {
        let k = format!("{key}.ca_file");
        if target.as_ref().is_some_and(|t| !t.https) {
            err(k, format!("{} is set for an http:// URL: a CA is for https:// receivers (use https://, or remove ca_file)", ca.display()));
        } else if let Err(e) = crate::tls::read_roots(ca, &k) {
            err(k, secret_problem(ca, &e));
        }
    }
    if target.is_some_and(|t| !t.https) && (w.basic_auth.is_some() || w.bearer_token_file.is_some()) {
        out.push(Finding {
            severity: Severity::Warning,
            key: format!("{key}.url"),
            message: format!("{:?}: the credentials go over plain http:// readable on the network; use https://", w.url),
        });
    }
    out
}
