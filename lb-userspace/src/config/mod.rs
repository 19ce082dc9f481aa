//! The daemon's configuration file (TOML): parsing and semantic validation.
//!
//! Every problem is a [`Finding`] that names the file, the key path (`service[0].backend[1].
//! max_conns`) and the reason. Loading refuses a file with any error and applies nothing of it;
//! `sluice config check` prints errors and warnings and exits by severity.

use std::{net::IpAddr, path::Path, time::Duration};

use lb_common::{DEFAULT_RING_SIZE, MAX_SPILL};
use serde::{Deserialize, Deserializer, Serialize};

/// The largest Maglev ring a service may ask for.
pub const MAX_RING_SIZE: u32 = 1_000_003;

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub daemon: Daemon,
    #[serde(default)]
    pub flows: Flows,
    #[serde(default)]
    pub datapath: Datapath,
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceCfg>,
    #[serde(default)]
    pub alerts: AlertsCfg,
    /// Changes that lower what a service admits, judged against the load (`guard.rs`).
    #[serde(default)]
    pub guard: GuardCfg,
    /// Several nodes behind a router's ECMP: VIPs announced through BIRD. Without it, one node
    /// and no BIRD.
    #[serde(default)]
    pub cluster: Option<ClusterCfg>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceCfg {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    #[serde(deserialize_with = "service_proto")]
    pub proto: Proto,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub overflow: Overflow,
    #[serde(default = "default_ring_size")]
    pub ring_size: u32,
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendCfg>,
    /// Labels on this service's alerts, added to `alerts.labels` (e.g. `{ team = "checkout" }`).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

fn default_ring_size() -> u32 {
    DEFAULT_RING_SIZE
}

/// The datapath's names, one vocabulary: the config writes what the maps hold (`lb-common`).
pub use lb_common::{Mode, Proto, Reject};

/// A service's protocol: `tcp` or `udp`, the ones the datapath balances (the other names of
/// [`Proto`] are refused as an unknown variant).
pub fn service_proto<'de, D: Deserializer<'de>>(d: D) -> Result<Proto, D::Error> {
    lb_common::user::one_of(d, &[Proto::Tcp, Proto::Udp], &["tcp", "udp"])
}

/// What happens when the chosen backend cannot take a new flow.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Overflow {
    /// Try other backends first: `true` (up to the datapath's maximum), `false`, or a number.
    #[serde(default)]
    pub spill: Spill,
    #[serde(default)]
    pub reject: Reject,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Spill {
    Enabled(bool),
    Candidates(u8),
}

impl Default for Spill {
    fn default() -> Self {
        Self::Enabled(false)
    }
}

impl Spill {
    /// Extra candidates the datapath tries.
    pub fn candidates(self) -> u8 {
        match self {
            Self::Enabled(false) => 0,
            Self::Enabled(true) => MAX_SPILL as u8,
            Self::Candidates(n) => n,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendCfg {
    pub address: IpAddr,
    /// Open connections allowed; reaching it refuses new connections (and alerts).
    pub max_conns: u32,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Start draining (no new flows) instead of active.
    #[serde(default)]
    pub drain: bool,
    /// Next-hop MAC for `l2dsr`; without it, the kernel's neighbour table is asked.
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub health: Option<Health>,
    /// With `[cluster.limits]`: the most this node admits while it has no word from etcd
    /// (default `floor(max_conns / cluster.limits.nodes)`). Keep the nodes' sum at or below
    /// `max_conns`.
    #[serde(default)]
    pub safe_share: Option<u32>,
}

fn default_weight() -> u32 {
    1
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    pub kind: HealthKind,
    #[serde(default = "default_interval", with = "crate::config::humantime_str")]
    pub interval: Duration,
    #[serde(default = "default_health_timeout", with = "crate::config::humantime_str")]
    pub timeout: Duration,
    /// Port to check; the service port by default.
    #[serde(default)]
    pub port: Option<u16>,
    /// HTTP only: the path to GET and the status expected.
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default = "default_expect")]
    pub expect_status: u16,
    /// Consecutive successes to become healthy, failures to become unhealthy.
    #[serde(default = "default_rise")]
    pub rise: u32,
    #[serde(default = "default_fall")]
    pub fall: u32,
}

fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_health_timeout() -> Duration {
    Duration::from_millis(500)
}
fn default_expect() -> u16 {
    200
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    Tcp,
    Http,
}

/// Durations are written as strings: "500ms", "10s", "2h".
pub(crate) mod humantime_str {
    use std::time::Duration;

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("\"{s}\" is not a duration ({e}); write e.g. \"500ms\", \"10s\", \"2h\"")))
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

/// Parses a MAC address written "02:00:00:00:00:01".
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

// The findings' vocabulary lives in `error.rs` (the bottom layer: `Error::Config` holds a
// `Rejected`); re-exported so that it reads as the config's.
pub use crate::error::{Finding, Rejected, Severity};

mod alerts;
mod cluster;
mod daemon;
mod datapath;
mod guard;
mod validate;

pub(crate) use self::alerts::{parse_url, Target};
pub use self::{
    alerts::{AlertsCfg, BasicAuth, WebhookCfg, RESERVED_LABELS},
    cluster::*,
    daemon::*,
    datapath::*,
    guard::GuardCfg,
    validate::validate,
};

/// Parses `text` (from `file`, for messages) and validates it. `Ok` carries the config and its
/// warnings; `Err` every finding when there is at least one error.
pub fn parse(file: &Path, text: &str) -> Result<(Config, Vec<Finding>), Rejected> {
    let reject = |findings| Rejected { file: file.to_owned(), findings };
    let de = toml::de::Deserializer::parse(text).map_err(|e| reject(vec![Finding { severity: Severity::Error, key: String::new(), message: one_line(&e.to_string()) }]))?;
    let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        reject(vec![Finding { severity: Severity::Error, key, message: one_line(&e.into_inner().to_string()) }])
    })?;
    let mut findings = validate(&cfg);
    findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    if findings.iter().any(|f| f.severity == Severity::Error) {
        return Err(reject(findings));
    }
    Ok((cfg, findings))
}

/// The sections that take effect only when the daemon starts: a reload or `config apply` that
/// changes one is refused, naming it (the running datapath, socket, BIRD link and peer channel
/// were set up from the old values).
pub fn restart_only_change(next: &Config, running: &Config) -> Option<&'static str> {
    if next.daemon != running.daemon {
        Some("[daemon]")
    } else if next.datapath != running.datapath {
        Some("[datapath]")
    } else if next.flows.capacity != running.flows.capacity {
        Some("flows.capacity")
    } else if next.cluster != running.cluster {
        Some("[cluster]")
    } else {
        None
    }
}

/// Reads and parses a config file.
pub fn load(file: &Path) -> Result<(Config, Vec<Finding>), Rejected> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Rejected { file: file.to_owned(), findings: vec![Finding { severity: Severity::Error, key: String::new(), message: format!("cannot read it: {e}") }] })?;
    parse(file, &text)
}

/// toml's messages span several lines (a source excerpt); keep them readable on one.
fn one_line(s: &str) -> String {
    // Drop the source excerpt ("14 | port = …", "|", "^^^"); keep position and reason.
    let excerpt = |l: &str| l.starts_with('|') || l.split_once(" |").is_some_and(|(n, _)| n.chars().all(|c| c.is_ascii_digit()));
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty() && !excerpt(l) && !l.chars().all(|c| c == '^' || c == ' ')).collect();
    lines.join("; ")
}

/// `cfg` as a config file: every key written, defaults included (the lab's configs).
pub fn to_toml(cfg: &Config) -> String {
    toml::to_string(cfg).expect("a Config serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a config says survives being written and read back (every key written, defaults
    /// included): the example config a user copies, and one with values off their defaults.
    /// The step before the lab builds its daemons' configs from `Config` values (issue 29).
    #[test]
    fn a_config_written_reads_back_the_same() {
        let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/sluice.example.toml")).expect("example");
        // The example with its commented cluster and limits settings taken in, and a webhook.
        let (head, rest) = example.split_at(example.find("# [cluster]").expect("cluster"));
        let (cluster, alerts) = rest.split_at(rest.find("\n[alerts]").expect("alerts"));
        let cluster: Vec<&str> =
            cluster.lines().map(|l| l.strip_prefix("# ").filter(|k| k.starts_with('[') || k.split_once(" = ").is_some_and(|(k, _)| !k.contains(' '))).unwrap_or(l)).collect();
        let webhook = "forecast_horizon = \"5m\"\nwebhooks = [{ url = \"https://am1.example:9093/api/v2/alerts\", timeout = \"3s\", retries = 5 }]";
        let clustered = format!("{head}{}{}", cluster.join("\n"), alerts.replacen("forecast_horizon = \"5m\"", webhook, 1));
        assert!(clustered.contains("\n[cluster.limits]\n") && clustered.contains("\nwebhooks = ["), "{clustered}");
        for text in [example.as_str(), clustered.as_str(), GOOD] {
            let (cfg, _) = parse(Path::new("t.toml"), text).expect("parses");
            let written = to_toml(&cfg);
            let (back, _) = parse(Path::new("t.toml"), &written).unwrap_or_else(|e| panic!("{e}\n{written}"));
            assert_eq!(back, cfg, "{written}");
        }
    }

    const GOOD: &str = r#"
[daemon]
interface = "eth0"
control_socket = "/run/sluice/sluice.sock"
metrics_listen = "127.0.0.1:9477"

[flows]
capacity = 1048576
timeouts = { syn = "10s", established = "2h", closing = "30s", udp = "1m" }

[[service]]
name = "web"
vip = "10.0.0.100"
port = 80
proto = "tcp"
mode = "l2dsr"
overflow = { spill = true, reject = "rst" }

[[service.backend]]
address = "10.0.0.11"
max_conns = 100
weight = 1
health = { kind = "tcp", interval = "1s" }

[[service.backend]]
address = "10.0.0.12"
max_conns = 100
health = { kind = "http", path = "/healthz", interval = "2s", timeout = "1s" }

[alerts]
webhooks = [{ url = "http://127.0.0.1:9093/api/v2/alerts" }, { url = "http://127.0.0.2:9093/api/v2/alerts" }]
"#;

    fn check(text: &str) -> Result<(Config, Vec<Finding>), Rejected> {
        parse(Path::new("sluice.toml"), text)
    }

    #[test]
    fn the_issue_example_parses() {
        let (cfg, warnings) = check(GOOD).expect("valid");
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(cfg.services[0].backends.len(), 2);
        assert_eq!(cfg.services[0].overflow.spill.candidates(), MAX_SPILL as u8);
        assert_eq!(cfg.flows.timeouts.udp, Duration::from_mins(1));
        assert_eq!(cfg.services[0].ring_size, 65537);
        let d = &cfg.daemon;
        assert_eq!(
            (d.metrics_max_connections, d.control_max_connections, d.http_header_timeout, d.http_request_timeout),
            (32, 64, Duration::from_secs(5), Duration::from_secs(30))
        );
    }

    const CLUSTER: &str = "[cluster]\nnode = \"lb1\"\n\n[cluster.limits]\netcd = [\"http://10.0.0.1:2379\"]\nnodes = 3\n";

    #[test]
    fn cluster_limits_parse_and_bad_ones_name_the_key() {
        let (cfg, _) = check(&format!("{GOOD}\n{CLUSTER}")).expect("valid");
        let c = cfg.cluster.expect("cluster");
        let l = c.limits.as_ref().expect("limits");
        assert_eq!((l.prefix.as_str(), l.lease_ttl, c.limit_nodes()), ("/sluice", Duration::from_secs(3), 3));
        assert_eq!(c.peer_max_connections, 64);
        // Fewer peer connections than peers: a warning, not an error.
        let few = format!("{GOOD}\n[cluster]\nnode = \"lb1\"\npeers = [\"10.0.0.2:9478\", \"10.0.0.3:9478\"]\npeer_listen = \"10.0.0.1:9478\"\npeer_key_file = \"/k\"\npeer_max_connections = 1\n");
        let (_, warnings) = check(&few).expect("warnings only");
        assert_eq!(warnings.iter().map(|w| w.key.as_str()).collect::<Vec<_>>(), ["cluster.peer_max_connections"], "{warnings:?}");
        let cases: &[(&str, &str, &str, &str)] = &[
            ("etcd = [\"http://10.0.0.1:2379\"]", "etcd = []", "cluster.limits.etcd", "must list"),
            ("etcd = [\"http://10.0.0.1:2379\"]", "etcd = [\"10.0.0.1:2379\"]", "cluster.limits.etcd[0]", "http://host:port"),
            ("nodes = 3", "nodes = 3\nlease_ttl = \"500ms\"", "cluster.limits.lease_ttl", "between 2s"),
            ("nodes = 3", "nodes = 3\nprefix = \"sluice/\"", "cluster.limits.prefix", "leading slash"),
            ("nodes = 3", "", "cluster.limits.nodes", "how many nodes"),
            ("nodes = 3", "nodes = 0", "cluster.limits.nodes", "at least 1"),
            ("nodes = 3", "nodes = 3\nttl = \"3s\"", "cluster.limits", "unknown field"),
            ("node = \"lb1\"", "node = \"lb1\"\npeer_max_connections = 0", "cluster.peer_max_connections", "at least 1"),
        ];
        for (from, to, key, reason) in cases {
            let text = format!("{GOOD}\n{}", CLUSTER.replacen(from, to, 1));
            let rejected = check(&text).err().unwrap_or_else(|| panic!("accepted with {to}"));
            let f = &rejected.findings[0];
            assert!(f.key.starts_with(key), "{to}: key {:?}, want {key}", f.key);
            assert!(f.message.contains(reason), "{to}: message {:?}, want {reason:?}", f.message);
        }
        // A safe share above max_conns, or without cluster-wide limits.
        let above = format!("{}\n{CLUSTER}", GOOD.replacen("max_conns = 100\nweight = 1", "max_conns = 100\nweight = 1\nsafe_share = 101", 1));
        assert!(check(&above).expect_err("refused").findings[0].message.contains("above max_conns"));
        let alone = GOOD.replacen("max_conns = 100\nweight = 1", "max_conns = 100\nweight = 1\nsafe_share = 10", 1);
        assert!(check(&alone).expect_err("refused").findings[0].message.contains("cluster-wide limits only"));
    }

    /// Each bad file: a replacement applied to GOOD, the key the error names, a word of the reason.
    #[test]
    fn bad_files_name_the_key_and_the_reason() {
        let cases: &[(&str, &str, &str, &str)] = &[
            ("max_conns = 100\nweight = 1", "max_conns = 0\nweight = 1", "service[0].backend[0].max_conns", "refuses every connection"),
            ("port = 80", "port = \"eighty\"", "service[0].port", "invalid type"),
            ("port = 80", "port = 70000", "service[0].port", "invalid value"),
            ("proto = \"tcp\"", "proto = \"sctp\"", "service[0].proto", "unknown variant"),
            ("mode = \"l2dsr\"", "mode = \"nat\"", "service[0].mode", "unknown variant"),
            ("vip = \"10.0.0.100\"", "vip = \"10.0.0.300\"", "service[0].vip", "invalid"),
            ("address = \"10.0.0.12\"", "address = \"10.0.0.11\"", "service[0].backend[1].address", "already a backend"),
            ("address = \"10.0.0.12\"", "address = \"2001:db8::12\"", "service[0].backend[1].address", "address families"),
            ("interval = \"1s\" }", "interval = \"soon\" }", "service[0].backend[0].health.interval", "not a duration"),
            ("timeout = \"1s\" }", "timeout = \"3s\" }", "service[0].backend[1].health.timeout", "at most the interval"),
            ("path = \"/healthz\"", "path = \"healthz\"", "service[0].backend[1].health.path", "must start with /"),
            ("capacity = 1048576", "capacity = 0", "flows.capacity", "at least 1"),
            ("mode = \"l2dsr\"", "mode = \"l2dsr\"\nring_size = 65536", "service[0].ring_size", "prime"),
            ("overflow = { spill = true", "overflow = { spill = 9", "service[0].overflow.spill", "at most"),
            ("max_conns = 100\nweight = 1", "max_conns = 100\nweigth = 1", "service[0].backend[0]", "unknown field"),
            ("interface = \"eth0\"", "interface = \"\"", "daemon.interface", "must name"),
            ("url = \"http://127.0.0.2:9093", "url = \"ftp://127.0.0.2:9093", "alerts.webhooks[1].url", "only http://"),
            ("[alerts]", "[alerts]\ncommand = []", "alerts.command", "must name a program"),
            ("interface = \"eth0\"", "interface = \"eth0\"\nmetrics_max_connections = 0", "daemon.metrics_max_connections", "at least 1"),
            ("interface = \"eth0\"", "interface = \"eth0\"\ncontrol_max_connections = 100001", "daemon.control_max_connections", "above 100000"),
            ("interface = \"eth0\"", "interface = \"eth0\"\nmetrics_max_connections = -1", "daemon.metrics_max_connections", "invalid value"),
            ("interface = \"eth0\"", "interface = \"eth0\"\nhttp_header_timeout = \"10ms\"", "daemon.http_header_timeout", "between 100ms and 5m"),
            ("interface = \"eth0\"", "interface = \"eth0\"\nhttp_request_timeout = \"2h\"", "daemon.http_request_timeout", "between 1s and 1h"),
            ("interface = \"eth0\"", "interface = \"eth0\"\nhttp_request_timeout = \"soon\"", "daemon.http_request_timeout", "not a duration"),
            ("interface = \"eth0\"", "interface = \"eth0\"\nread_socket = \"/run/sluice/sluice-read.sock\"", "daemon.read_socket_group", "required with daemon.read_socket"),
            ("interface = \"eth0\"", "interface = \"eth0\"\nread_socket_group = \"root\"", "daemon.read_socket_group", "without daemon.read_socket"),
            (
                "interface = \"eth0\"",
                "interface = \"eth0\"\nread_socket = \"/r.sock\"\nread_socket_group = \"no-such-group-sluice\"",
                "daemon.read_socket_group",
                "no group named \"no-such-group-sluice\"",
            ),
            (
                "interface = \"eth0\"",
                "interface = \"eth0\"\nread_socket = \"/run/sluice/sluice.sock\"\nread_socket_group = \"root\"",
                "daemon.read_socket",
                "control_socket's path",
            ),
        ];
        for (from, to, key, reason) in cases {
            assert!(GOOD.contains(from), "bad case: {from}");
            let text = GOOD.replacen(from, to, 1);
            let rejected = check(&text).err().unwrap_or_else(|| panic!("accepted with {to}"));
            let f = &rejected.findings[0];
            assert_eq!(f.severity, Severity::Error);
            assert!(f.key.starts_with(key), "{to}: key {:?}, want {key}", f.key);
            assert!(f.message.contains(reason), "{to}: message {:?}, want {reason:?}", f.message);
            let shown = rejected.to_string();
            assert!(shown.contains("sluice.toml") && shown.contains(key), "{shown}");
        }
    }

    #[test]
    fn a_read_socket_with_an_existing_group_parses() {
        let text = GOOD.replacen("interface = \"eth0\"", "interface = \"eth0\"\nread_socket = \"/run/sluice/sluice-read.sock\"\nread_socket_group = \"root\"", 1);
        let (cfg, warnings) = check(&text).expect("valid");
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!((cfg.daemon.read_socket.as_deref(), cfg.daemon.read_socket_group.as_deref()), (Some(Path::new("/run/sluice/sluice-read.sock")), Some("root")));
        assert_eq!(check(GOOD).expect("valid").0.daemon.read_socket, None, "off by default");
    }

    #[test]
    fn duplicate_services_and_names_are_errors() {
        let dup = format!("{GOOD}\n[[service]]\nname = \"web\"\nvip = \"10.0.0.100\"\nport = 80\nproto = \"tcp\"\n[[service.backend]]\naddress = \"10.0.0.13\"\nmax_conns = 5\n");
        let r = check(&dup).expect_err("duplicates");
        let keys: Vec<&str> = r.findings.iter().map(|f| f.key.as_str()).collect();
        assert!(keys.contains(&"service[1].name") && keys.contains(&"service[1].vip"), "{keys:?}");
    }

    #[test]
    fn warnings_do_not_refuse() {
        let text = GOOD.replacen("capacity = 1048576", "capacity = 150", 1).replacen("127.0.0.1:9477", "0.0.0.0:9477", 1);
        let (_, warnings) = check(&text).expect("warnings only");
        let keys: Vec<&str> = warnings.iter().map(|f| f.key.as_str()).collect();
        assert_eq!(keys, ["daemon.metrics_listen", "flows.capacity"]);
        assert!(warnings[1].message.contains("200"), "sum of limits named: {}", warnings[1].message);
    }

    #[test]
    fn syntax_errors_are_one_readable_line() {
        let r = check("[daemon\ninterface = 1").expect_err("syntax");
        assert_eq!(r.findings.len(), 1);
        assert!(!r.findings[0].message.contains('\n'));
        assert!(r.findings[0].message.contains("line 1"), "{}", r.findings[0].message);
    }

    #[test]
    fn macs() {
        assert_eq!(parse_mac("02:00:00:00:00:0a"), Some([2, 0, 0, 0, 0, 10]));
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:00:00"), None);
        assert_eq!(parse_mac("zz:00:00:00:00:00"), None);
    }
}
