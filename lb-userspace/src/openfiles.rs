//! The daemon's open-file limit. Every connection a listener serves, every health check and
//! every map of the datapath holds a file descriptor; systemd's default soft limit (1024) is
//! too low for a daemon with listeners on the network. So at start the daemon raises its soft
//! `RLIMIT_NOFILE` to the hard limit (systemd's default hard limit is 524288; the shipped unit
//! sets `LimitNOFILE=`), and warns (log and journal) when even that is below what its config
//! may need: every listener's connection limit, a descriptor per health check, peer, webhook
//! and etcd endpoint, and [`BASE`] for the rest. The programs it starts (`alerts.command`) get
//! the soft limit it had at start back, as systemd recommends.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// Descriptors for what is not counted per item: the datapath's maps, programs and links, the
/// runtime (epoll, signals, eventfds), the journal, the history, BIRD's socket and files, logs.
/// A daemon with two backends holds about 35 (`process_open_fds` in `/metrics`).
pub const BASE: u64 = 128;

/// The soft and hard limits the process started with (restored in the programs it starts).
static START_SOFT: AtomicU64 = AtomicU64::new(0);
static START_HARD: AtomicU64 = AtomicU64::new(0);

/// The open-file limits: the soft one as it was at start and as it is now, and the hard one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub before: u64,
    pub soft: u64,
    pub hard: u64,
}

fn get() -> std::io::Result<libc::rlimit> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// Raises the soft limit to the hard one (to `fs.nr_open` when the hard one is unlimited).
pub fn raise() -> std::io::Result<Limit> {
    let r = get()?;
    if START_HARD.load(Ordering::Relaxed) == 0 {
        START_SOFT.store(r.rlim_cur, Ordering::Relaxed);
        START_HARD.store(r.rlim_max, Ordering::Relaxed);
    }
    let mut target = r.rlim_max;
    if target == libc::RLIM_INFINITY {
        target = std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(1 << 20);
    }
    if r.rlim_cur >= target {
        return Ok(Limit { before: r.rlim_cur, soft: r.rlim_cur, hard: r.rlim_max });
    }
    let raised = libc::rlimit { rlim_cur: target, rlim_max: r.rlim_max };
    // SAFETY: setrlimit reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Limit { before: r.rlim_cur, soft: target, hard: r.rlim_max })
}

/// For a child between fork and exec: the soft limit the daemon started with (a program that
/// uses `select()` breaks on descriptors above 1023). Only async-signal-safe calls.
pub fn restore_for_child() -> std::io::Result<()> {
    let (soft, hard) = (START_SOFT.load(Ordering::Relaxed), START_HARD.load(Ordering::Relaxed));
    if hard == 0 {
        return Ok(());
    }
    let r = libc::rlimit { rlim_cur: soft, rlim_max: hard };
    // SAFETY: setrlimit reads the struct it is given; lowering the soft limit is always allowed.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// What `cfg` may need open at once, and its parts in words (config keys named).
pub fn needed(cfg: &Config) -> (u64, Vec<String>) {
    let d = &cfg.daemon;
    let mut parts = vec![
        (u64::from(d.control_max_connections), "daemon.control_max_connections".to_owned()),
        (u64::from(d.metrics_max_connections), "daemon.metrics_max_connections".to_owned()),
    ];
    if let Some(c) = &cfg.cluster {
        if c.peer_listen.is_some() {
            parts.push((u64::from(c.peer_max_connections), "cluster.peer_max_connections".to_owned()));
        }
        if !c.peers.is_empty() {
            parts.push((c.peers.len() as u64, "cluster.peers".to_owned()));
        }
        if let Some(l) = &c.limits {
            parts.push((l.etcd.len() as u64, "cluster.limits.etcd".to_owned()));
        }
    }
    let checks = cfg.services.iter().flat_map(|s| &s.backends).filter(|b| b.health.is_some()).count() as u64;
    if checks > 0 {
        parts.push((checks, "health checks".to_owned()));
    }
    let sinks = cfg.alerts.webhook.iter().chain(&cfg.alerts.webhooks).count() as u64 + u64::from(cfg.alerts.command.is_some());
    if sinks > 0 {
        parts.push((sinks, "alert receivers".to_owned()));
    }
    parts.push((BASE, "the datapath, journal, BIRD and the rest".to_owned()));
    let total = parts.iter().map(|(n, _)| n).sum();
    (total, parts.into_iter().map(|(n, what)| format!("{n} {what}")).collect())
}

/// The warning when the limit is below what the config needs, or `None`.
pub fn warning(limit: &Limit, cfg: &Config) -> Option<String> {
    let (need, parts) = needed(cfg);
    if limit.soft >= need {
        return None;
    }
    let how = if limit.before < limit.soft {
        format!(" (raised from {} to the hard limit)", limit.before)
    } else if limit.soft >= limit.hard {
        " (the hard limit)".to_owned()
    } else {
        String::new()
    };
    Some(format!(
        "the open-file limit is {}{how}, below the {need} this config may need ({}): under a flood of connections, health checks and the journal could fail with \"Too many open files\"; raise LimitNOFILE= in the unit (deploy/sluice.service sets 65536) or lower those limits",
        limit.soft,
        parts.join(" + ")
    ))
}

/// The soft limit now.
pub fn soft_now() -> Option<u64> {
    get().ok().map(|r| r.rlim_cur)
}

/// Descriptors open in this process now.
pub fn open_now() -> u64 {
    // The directory's own descriptor is listed too.
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count().saturating_sub(1) as u64)
}

/// The open files in `sluice status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenFiles {
    /// Descriptors open now.
    pub open: u64,
    /// The soft limit (raised to the hard one at start).
    pub limit: u64,
    /// What the config may need ([`needed`]).
    pub needed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_need_counts_listeners_checks_and_the_rest() {
        let text = "[daemon]\ninterface = \"eth0\"\n[[service]]\nname = \"web\"\nvip = \"10.0.0.1\"\nport = 80\nproto = \"tcp\"\n\
                    [[service.backend]]\naddress = \"10.0.0.11\"\nmax_conns = 10\nhealth = { kind = \"tcp\" }\n\
                    [[service.backend]]\naddress = \"10.0.0.12\"\nmax_conns = 10\n\
                    [cluster]\nnode = \"lb1\"\npeer_listen = \"10.0.0.1:9478\"\npeer_key_file = \"/k\"\n";
        let (cfg, _) = crate::config::parse(std::path::Path::new("t.toml"), text).expect("valid");
        let (need, parts) = needed(&cfg);
        assert_eq!(need, 64 + 32 + 64 + 1 + BASE, "{parts:?}");
        let low = Limit { before: 128, soft: 200, hard: 200 };
        let w = warning(&low, &cfg).expect("warned");
        assert!(w.contains("200 (raised from 128 to the hard limit)") && w.contains("32 daemon.metrics_max_connections") && w.contains("LimitNOFILE"), "{w}");
        assert_eq!(warning(&Limit { before: 1024, soft: 1024, hard: 4096 }, &cfg), None);
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let l = raise().expect("raise");
        let now = get().expect("getrlimit");
        assert_eq!(now.rlim_cur, l.soft);
        assert!(l.soft >= l.before);
        assert!(open_now() > 0);
    }
}
