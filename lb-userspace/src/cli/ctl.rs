//! CLI commands that talk to the daemon: `service list`, `backend …`, `explain`.

use std::{net::SocketAddr, path::Path};

use crate::{
    api::{ApplyResponse, BackendRequest, DrainRequest, EventsQuery, ExplainQuery, RaiseRequest, ServiceReport},
    client::{self, Client},
    config::Proto,
    out, outln, Error,
};

#[derive(clap::Subcommand)]
pub enum ServiceCmd {
    /// Services and their backends: state, open connections / max_conns, weight.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Subcommand)]
pub enum BackendCmd {
    /// Add a backend to a service.
    Add {
        service: String,
        address: std::net::IpAddr,
        #[arg(long)]
        max_conns: u32,
        #[arg(long)]
        weight: Option<u32>,
    },
    /// Remove a backend (it drains first: open connections continue).
    Remove {
        service: String,
        address: std::net::IpAddr,
        /// Although the guard refuses it (the others cannot carry the service's load).
        #[arg(long)]
        force: bool,
    },
    /// Stop sending new connections to a backend; open ones continue.
    Drain {
        service: String,
        address: std::net::IpAddr,
        /// Although the guard refuses it (the others cannot carry the service's load).
        #[arg(long)]
        force: bool,
    },
    /// Send new connections to a drained backend again.
    Undrain { service: String, address: std::net::IpAddr },
    /// Change a backend's max_conns (never breaks an open connection).
    SetLimit {
        service: String,
        address: std::net::IpAddr,
        max_conns: u32,
        /// Although the guard refuses it (below the backend's load now or at its peak).
        #[arg(long)]
        force: bool,
    },
}

pub fn print_services(services: &[ServiceReport]) {
    outln!("{:<14} {:<24} {:<6} {:<18} {:<10} {:>7} {:>9} {:>6}", "SERVICE", "VIP", "MODE", "BACKEND", "STATE", "OPEN", "MAX_CONNS", "WEIGHT");
    for s in services {
        let vip = format!("{}:{} {}", s.vip, s.port, s.proto.name());
        for b in &s.backends {
            let (open, max, limit) = (b.open, u64::from(b.max_conns), u64::from(b.limit));
            // With cluster-wide limits: this node's share and the cluster's open connections.
            let full = if let Some(c) = &b.cluster {
                let at = if c.cluster_open >= max {
                    "  CLUSTER AT LIMIT"
                } else if open >= limit {
                    "  AT SHARE"
                } else {
                    ""
                };
                format!("  share {limit} (safe {}), cluster {}/{max}{at}", c.safe_share, c.cluster_open)
            } else if max > 0 && open >= max {
                "  AT LIMIT".to_owned()
            } else {
                String::new()
            };
            let state = if b.removed { "removing" } else { b.state.as_str() };
            outln!("{:<14} {:<24} {:<6} {:<18} {:<10} {:>7} {:>9} {:>6}{full}", s.name, vip, s.mode, b.address.to_string(), state, open, max, b.weight);
        }
    }
}

pub fn service(socket: &Path, cmd: &ServiceCmd) -> Result<(), Error> {
    let ServiceCmd::List { json } = cmd;
    let services = client::block_on(Client::new(socket).services())?;
    if *json {
        outln!("{}", serde_json::to_string_pretty(&services).expect("json"));
    } else {
        print_services(&services);
    }
    Ok(())
}

pub fn print_changes(r: &ApplyResponse) {
    if r.changes.is_empty() {
        outln!("no changes");
    }
    let verb = if r.applied { "applied" } else { "would apply" };
    for c in &r.changes {
        outln!("{verb}: {}", c.what);
    }
    for w in &r.warnings {
        outln!("warning: {}: {}", w.key, w.message);
    }
    for refused in &r.guard.refused {
        let what = if r.guard.forced { "FORCED past the guard" } else { "the guard would refuse it" };
        outln!("{what}: {refused}");
    }
    for w in &r.guard.warnings {
        outln!("guard warning: {w}");
    }
}

#[derive(clap::Args)]
pub struct HistoryArgs {
    pub service: String,
    pub backend: Option<std::net::IpAddr>,
    #[arg(long)]
    pub json: bool,
}

/// `sluice history SERVICE [BACKEND]`: peaks of open connections and refusals per hour (30 d)
/// and per minute (the last hour; `--json` has every minute of 24 h).
pub fn history(socket: &Path, a: &HistoryArgs) -> Result<(), Error> {
    let h = client::block_on(Client::new(socket).history(&a.service, a.backend))?;
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&h).expect("json"));
        return Ok(());
    }
    for b in &h.backends {
        outln!("service \"{}\" backend {}: peak {} (24 h), {} (30 d)", a.service, b.address, b.peak_24h.open, b.peak_30d.open);
        let show = |what: &str, slots: &[(u64, crate::history::Slot)]| {
            let rows: Vec<String> = slots
                .iter()
                .filter(|(_, s)| s.peak > 0 || s.refused > 0)
                .map(|(at, s)| format!("{} peak {} refused {}", crate::history::clock(*at, h.now), s.peak, s.refused))
                .collect();
            outln!("  per {what} ({} with load): {}", rows.len(), if rows.is_empty() { "none".to_owned() } else { rows.join(", ") });
        };
        show("hour, 30 d", &b.hours);
        show("minute, last hour", &b.minutes[b.minutes.len().saturating_sub(60)..]);
    }
    Ok(())
}

pub fn backend(socket: &Path, cmd: &BackendCmd) -> Result<(), Error> {
    let (service, address, action, req) = match cmd {
        BackendCmd::Add { service, address, max_conns, weight } => (service, address, "add", BackendRequest { max_conns: Some(*max_conns), weight: *weight, force: false }),
        BackendCmd::Remove { service, address, force } => (service, address, "remove", BackendRequest { force: *force, ..Default::default() }),
        BackendCmd::Drain { service, address, force } => (service, address, "drain", BackendRequest { force: *force, ..Default::default() }),
        BackendCmd::Undrain { service, address } => (service, address, "undrain", BackendRequest::default()),
        BackendCmd::SetLimit { service, address, max_conns, force } => (service, address, "set-limit", BackendRequest { max_conns: Some(*max_conns), weight: None, force: *force }),
    };
    print_changes(&client::block_on(Client::new(socket).backend(service, *address, action, &req))?);
    Ok(())
}

#[derive(clap::Args)]
pub struct ExplainArgs {
    /// Client address, with or without a port (IPv6 as [addr]:port).
    pub src: String,
    /// Service address and port.
    pub dst: SocketAddr,
    /// tcp or udp.
    #[arg(default_value = "tcp")]
    pub proto: String,
    #[arg(long)]
    pub json: bool,
}

pub fn explain(socket: &Path, a: &ExplainArgs) -> Result<(), Error> {
    let src: SocketAddr = a
        .src
        .parse()
        .or_else(|_| a.src.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 40000)))
        .map_err(|_| Error::other("explain", anyhow::anyhow!("\"{}\" is not an address (write 10.0.0.1, 10.0.0.1:40000 or [2001:db8::1]:40000)", a.src)))?;
    let proto = match a.proto.as_str() {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        other => return Err(Error::other("explain", anyhow::anyhow!("protocol must be tcp or udp, not \"{other}\""))),
    };
    let e = client::block_on(Client::new(socket).explain(&ExplainQuery { src, dst: a.dst, proto }))?;
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&e).expect("json"));
        return Ok(());
    }
    outln!("{}", e.summary);
    if let Some(svc) = &e.service {
        let slot = e.ring_slot.map_or_else(|| "null".to_owned(), |s| s.to_string());
        outln!("service \"{svc}\", flow hash {:#010x}, ring slot {slot}", e.hash);
        for (i, c) in e.candidates.iter().enumerate() {
            outln!("  candidate {}: {} ({}, {} open, max_conns = {})", i + 1, c.backend, c.state, c.open, c.max_conns);
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct EventsArgs {
    /// Keep printing new events as they come (until interrupted).
    #[arg(long)]
    pub follow: bool,
    /// One JSON object per event and line (JSON Lines), so that `--follow` streams; nothing
    /// when there is no event.
    #[arg(long)]
    pub json: bool,
}

/// `sluice events`: sampled refusal events (time, 5-tuple, service, backend, reason).
pub fn events(socket: &Path, a: &EventsArgs) -> Result<(), Error> {
    let daemon = Client::new(socket);
    client::block_on(async {
        let mut after = 0u64;
        loop {
            for e in daemon.events(&EventsQuery { after, limit: 1000 }).await? {
                after = after.max(e.seq);
                if a.json {
                    outln!("{}", serde_json::to_string(&e).expect("json"));
                } else {
                    let backend = e.backend.map_or_else(|| "-".to_owned(), |b| b.to_string());
                    outln!("{} {} {} -> {} service \"{}\" backend {backend} REFUSED {}", e.time, e.proto, e.client, e.vip, e.service, e.reason);
                }
            }
            // Following ends when the reader does (`sluice events --follow | grep -m1 …`).
            if !a.follow || super::out::reader_gone() {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    })
}

#[derive(clap::Subcommand)]
pub enum LimitCmd {
    /// Raise a backend's max_conns now, for a while (break-glass); it reverts by itself.
    Raise {
        service: String,
        backend: std::net::IpAddr,
        max_conns: u32,
        /// How long, e.g. 30m.
        #[arg(long)]
        ttl: String,
    },
}

pub fn limit(socket: &Path, cmd: &LimitCmd) -> Result<(), Error> {
    let LimitCmd::Raise { service, backend, max_conns, ttl } = cmd;
    let req = RaiseRequest { service: service.clone(), backend: *backend, max_conns: *max_conns, ttl: ttl.clone() };
    print_changes(&client::block_on(Client::new(socket).raise(&req))?);
    outln!("reverts by itself after {ttl}");
    Ok(())
}

#[derive(clap::Args)]
pub struct TimelineArgs {
    /// How far back, e.g. 3h, 30m.
    #[arg(long, default_value = "3h")]
    pub since: String,
    #[arg(long, value_parser = ["text", "markdown", "json"], default_value = "text")]
    pub format: String,
    /// The journal file (daemon.journal in the config).
    #[arg(long, default_value = "/var/lib/sluice/journal.jsonl")]
    pub journal: std::path::PathBuf,
}

/// `sluice timeline`: the journal, rendered. Reads the file; needs no daemon.
pub fn timeline(a: &TimelineArgs) -> Result<(), Error> {
    let since = humantime::parse_duration(&a.since).map_err(|e| Error::other("--since", anyhow::anyhow!("\"{}\": {e} (write e.g. 3h)", a.since)))?;
    let entries = crate::journal::read(&a.journal, since).map_err(|e| Error::other(format!("reading {}", a.journal.display()), e))?;
    match a.format.as_str() {
        "json" => outln!("{}", serde_json::to_string_pretty(&entries).expect("json")),
        "markdown" => out!("{}", crate::journal::markdown(&entries)),
        _ => {
            for e in &entries {
                outln!("{} [{}] {}", e.time, e.kind, e.summary);
                for d in &e.details {
                    outln!("    {d}");
                }
            }
        }
    }
    Ok(())
}

#[derive(clap::Subcommand)]
pub enum NodeCmd {
    /// Withdraw this node's VIPs from BIRD, then wait until the router sends it no new flows
    /// (measured: none for 2 s). Open connections keep being forwarded. Stays drained across
    /// daemon restarts until `sluice node undrain`.
    Drain {
        /// Give up waiting after this long (the node stays drained).
        #[arg(long, default_value = "60s")]
        timeout: String,
        #[arg(long)]
        json: bool,
    },
    /// Announce this node's VIPs again.
    Undrain,
}

#[derive(clap::Subcommand)]
pub enum ClusterCmd {
    /// Every node of the cluster as etcd holds it: its lease, whether it allocates, and per
    /// backend its open connections, its share and what it asks for (`[cluster.limits]`).
    Status {
        #[arg(long)]
        json: bool,
    },
}

pub fn cluster(socket: &Path, cmd: &ClusterCmd) -> Result<(), Error> {
    let ClusterCmd::Status { json } = cmd;
    let st = client::block_on(Client::new(socket).status())?;
    if *json {
        outln!("{}", serde_json::to_string_pretty(&serde_json::json!({ "cluster": st.cluster, "limits": st.limits, "peers": st.peers })).expect("json"));
        return Ok(());
    }
    let Some(c) = &st.cluster else {
        return Err(Error::other("cluster status", anyhow::anyhow!("this daemon has no [cluster] section: it is a single node")));
    };
    outln!("{}", c.line());
    let Some(l) = st.limits else {
        outln!("no cluster-wide limits ([cluster.limits]): each node enforces max_conns on its own");
        return Ok(());
    };
    let conn = if l.connected {
        format!("etcd {} answers; lease {:x}", l.etcd.join(", "), l.lease.unwrap_or(0))
    } else {
        format!("etcd {} OUT OF REACH for {:.1} s: {}", l.etcd.join(", "), l.lost_for_s.unwrap_or(0.0), l.error.as_deref().unwrap_or(""))
    };
    outln!(
        "{conn}; shares allocated by {}{}{}",
        l.leader.as_deref().unwrap_or("(nobody yet)"),
        if l.fallback { "; THIS NODE ENFORCES ITS SAFE SHARES" } else { "" },
        if l.fenced { "; THIS NODE IS FENCED (VIPs withdrawn, admitting nothing: cut off from etcd while its peers are not)" } else { "" }
    );
    outln!("{:<10} {:<6} {:<24} {:>6} {:>6} {:>6} {:>9}", "NODE", "GRANT", "BACKEND", "OPEN", "SHARE", "WANTS", "REFUSING");
    for (name, r) in &l.nodes {
        let seq = l.grants.get(name).map_or(0, |g| g.seq);
        let mark = if l.leader.as_deref() == Some(name) { "*" } else { "" };
        for (k, d) in &r.backends {
            let granted = l.grants.get(name).and_then(|g| g.shares.get(k)).copied();
            let share = if granted.is_some_and(|g| g != d.applied) { format!("{}→{}", d.applied, granted.unwrap_or(0)) } else { d.applied.to_string() };
            outln!(
                "{:<10} {:<6} {:<24} {:>6} {:>6} {:>6} {:>9}{}",
                format!("{name}{mark}"),
                format!("{}/{seq}", r.applied_seq),
                k,
                d.open,
                share,
                d.wants,
                if d.refusing { format!("{:.0}/s", d.refused_per_s) } else { "-".into() },
                if r.fallback { "  (safe shares)" } else { "" }
            );
        }
    }
    for (node, holds) in &l.reserved {
        let held: Vec<String> = holds.iter().map(|(k, v)| format!("{k} {v}")).collect();
        outln!("reserved for node {node} (its lease is gone; what it may still hold): {}", held.join(", "));
    }
    for (k, b) in &l.backends {
        outln!("{k}: {} open over the cluster of max_conns {}; this node {} open, share {}, safe share {}", b.cluster_open, b.max_conns, b.open, b.share, b.safe_share);
    }
    Ok(())
}

pub fn node(socket: &Path, cmd: &NodeCmd) -> Result<(), Error> {
    match cmd {
        NodeCmd::Drain { timeout, json } => {
            let r = client::block_on(Client::new(socket).drain(&DrainRequest { timeout: Some(timeout.clone()) }))?;
            if *json {
                outln!("{}", serde_json::to_string_pretty(&r).expect("json"));
                return Ok(());
            }
            let vips = r.withdrawn.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
            match r.withdraw_ms {
                Some(ms) => outln!("node \"{}\": withdrew {} from BIRD in {ms} ms", r.node, if vips.is_empty() { "nothing (no VIP was announced)".into() } else { vips }),
                None => outln!("node \"{}\": BIRD did not confirm the withdrawal: {}", r.node, r.error.as_deref().unwrap_or("no answer")),
            }
            outln!(
                "{} new flow(s) arrived after the withdrawal{}; {}",
                r.new_flows_after,
                if r.new_flows_after > 0 { format!(", the last {} ms after it", r.last_new_flow_ms) } else { String::new() },
                if r.quiet { "then none for 2 s: the router sends this node no new flows" } else { "new flows were still arriving when the timeout ran out" }
            );
            outln!("open connections keep being forwarded; `sluice node undrain` announces again");
            if r.quiet {
                Ok(())
            } else {
                Err(Error::other("node drain", anyhow::anyhow!("not quiet within {timeout}")))
            }
        }
        NodeCmd::Undrain => {
            outln!("{}", client::block_on(Client::new(socket).undrain())?.line());
            Ok(())
        }
    }
}
