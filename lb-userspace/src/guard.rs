//! The guard: a change that lowers what a service can admit (a lower `max_conns`, a drain, a
//! removal, a weight of 0, a service removed) is judged against the load before it is applied.
//! A backend's new limit below what it holds now or held at its peak in `guard.window`, or a
//! service whose remaining capacity is below its peak load, refuses the change (nothing
//! changes) unless forced. A service that could not carry its peak if its largest backend
//! failed (N-1) is a warning. The 2023-05-05 incident's change (200 → 10 on backends that had
//! just held ~80 each) is the case it exists for.

use std::{net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    config::{BackendCfg, Config, ServiceCfg},
    history::{clock, History},
    shares::key,
};

/// The guard's verdict on a change.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Why the change would be refused (empty: it may go).
    pub refused: Vec<String>,
    pub warnings: Vec<String>,
    /// Applied although refused (`--force`).
    pub forced: bool,
}

impl Verdict {
    /// The message of a refusal, with what to do.
    pub fn message(&self) -> String {
        format!("refused, nothing changed: {}. Run again with --force to apply it anyway.", self.refused.join("; "))
    }
}

/// What a service admits with this config: the `max_conns` of its backends that take new
/// connections (not drained, weight above 0).
pub fn capacity(s: &ServiceCfg) -> u64 {
    s.backends.iter().filter(|b| takes_new(b)).map(|b| u64::from(b.max_conns)).sum()
}

fn takes_new(b: &BackendCfg) -> bool {
    !b.drain && b.weight > 0
}

fn pct_refused(load: u64, limit: u64) -> u64 {
    if load == 0 {
        0
    } else {
        (load.saturating_sub(limit) * 100).div_ceil(load)
    }
}

/// What a service admits without its largest backend (N-1).
pub fn capacity_n_minus_1(s: &ServiceCfg) -> u64 {
    let largest = s.backends.iter().filter(|b| takes_new(b)).map(|b| u64::from(b.max_conns)).max().unwrap_or(0);
    capacity(s) - largest
}

/// The N-1 warning for a service: its peak load against its capacity without its largest
/// backend.
pub fn n_minus_1(s: &ServiceCfg, peak: u64, at: u64, now: u64) -> Option<String> {
    let without = capacity_n_minus_1(s);
    (peak > without && s.backends.iter().any(takes_new))
        .then(|| format!("service \"{}\" could not carry its peak load of {peak} ({}) if its largest backend failed: the others admit {without} (N-1)", s.name, clock(at, now)))
}

/// Judges `next` against `running`: `open(service, address)` is a backend's open connections.
pub fn check(running: &Config, next: &Config, history: &History, open: &dyn Fn(&str, IpAddr) -> u64, now: u64, window: Duration) -> Verdict {
    let mut v = Verdict::default();
    for old in &running.services {
        let keys: Vec<String> = old.backends.iter().map(|b| key(&old.name, b.address)).collect();
        let peak = history.service_peak(&keys, now, window);
        let open_now: u64 = old.backends.iter().map(|b| open(&old.name, b.address)).sum();
        let load = open_now.max(u64::from(peak.open));
        let Some(new) = next.services.iter().find(|s| s.name == old.name) else {
            if load > 0 {
                v.refused.push(format!("service \"{}\" is removed while it holds {open_now} open now and held {} at {}", old.name, peak.open, clock(peak.at, now)));
            }
            continue;
        };
        let mut lowered = false;
        for b in &old.backends {
            let k = key(&old.name, b.address);
            let after = new.backends.iter().find(|x| x.address == b.address);
            match after {
                Some(a) if a.max_conns < b.max_conns => {
                    lowered = true;
                    let now_open = open(&old.name, b.address);
                    let p = history.peak(&k, now, window);
                    let held = now_open.max(u64::from(p.open));
                    if u64::from(a.max_conns) < held {
                        v.refused.push(format!(
                            "service \"{}\" backend {} max_conns {} -> {} is below its {now_open} open now and its peak of {} at {}; at that peak about {} % of its connections would have been refused",
                            old.name,
                            b.address,
                            b.max_conns,
                            a.max_conns,
                            p.open,
                            clock(p.at, now),
                            pct_refused(held, u64::from(a.max_conns))
                        ));
                    }
                }
                Some(a) if takes_new(b) && !takes_new(a) => lowered = true,
                None if takes_new(b) => lowered = true,
                _ => {}
            }
        }
        if !lowered {
            continue;
        }
        let cap = capacity(new);
        if cap < load {
            v.refused.push(format!(
                "service \"{}\" would admit {cap} (its active backends' max_conns), below its {open_now} open now and its peak load of {} at {}; at that peak about {} % of its connections would have been refused",
                old.name,
                peak.open,
                clock(peak.at, now),
                pct_refused(load, cap)
            ));
        }
        if let Some(w) = n_minus_1(new, load, peak.at, now) {
            v.warnings.push(w);
        }
    }
    // The running config's setting: a file cannot switch the guard off for its own change.
    if !running.guard.enforce {
        let judged = std::mem::take(&mut v.refused);
        v.warnings.extend(judged.into_iter().map(|r| format!("{r} (guard.enforce = false: applied)")));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn cfg(limits: &[u32], drain_last: bool) -> Config {
        let mut t = String::from("[daemon]\ninterface = \"eth0\"\n\n[[service]]\nname = \"web\"\nvip = \"10.0.0.100\"\nport = 80\nproto = \"tcp\"\nmode = \"ipip\"\n");
        for (i, l) in limits.iter().enumerate() {
            let drain = drain_last && i + 1 == limits.len();
            t.push_str(&format!("[[service.backend]]\naddress = \"10.0.0.{}\"\nmax_conns = {l}\ndrain = {drain}\n", 11 + i));
        }
        config::parse(std::path::Path::new("t.toml"), &t).expect("valid").0
    }

    #[test]
    fn the_incident_change_is_refused_with_the_numbers() {
        let now = 1_700_000_000;
        let mut h = History::default();
        for (i, peak) in [191, 150, 170].iter().enumerate() {
            h.observe(&format!("web/10.0.0.{}", 11 + i), now - 3600, *peak, 0);
        }
        let open = |_: &str, a: IpAddr| if a.to_string() == "10.0.0.11" { 83 } else { 60 };
        let v = check(&cfg(&[200, 200, 200], false), &cfg(&[10, 10, 10], false), &h, &open, now, Duration::from_hours(24));
        assert_eq!(v.refused.len(), 4, "{v:?}");
        assert!(
            v.refused[0].contains("backend 10.0.0.11 max_conns 200 -> 10 is below its 83 open now and its peak of 191 at")
                && v.refused[0].contains("about 95 % of its connections"),
            "{}",
            v.refused[0]
        );
        assert!(v.refused[3].contains("would admit 30") && v.refused[3].contains("peak load of 511"), "{}", v.refused[3]);
        assert!(v.message().ends_with("Run again with --force to apply it anyway."));
        // Raising, or lowering above the peak, passes.
        assert!(check(&cfg(&[200, 200, 200], false), &cfg(&[250, 250, 250], false), &h, &open, now, Duration::from_hours(24)).refused.is_empty());
        assert!(check(&cfg(&[200, 200, 200], false), &cfg(&[195, 200, 200], false), &h, &open, now, Duration::from_hours(24)).refused.is_empty());
        // Outside the window the peak does not count, the open connections do.
        let v = check(&cfg(&[200, 200, 200], false), &cfg(&[100, 200, 200], false), &h, &open, now, Duration::from_mins(1));
        assert!(v.refused.is_empty(), "{v:?}");
    }

    #[test]
    fn a_drain_is_judged_by_what_the_others_can_carry_and_n_minus_1_warns() {
        let now = 1_700_000_000;
        let mut h = History::default();
        h.observe("web/10.0.0.11", now - 60, 90, 0);
        h.observe("web/10.0.0.12", now - 60, 90, 0);
        let open = |_: &str, _: IpAddr| 10;
        // 180 at the peak; after draining one of two backends of 100: 100 left.
        let v = check(&cfg(&[100, 100], false), &cfg(&[100, 100], true), &h, &open, now, Duration::from_hours(24));
        assert_eq!(v.refused.len(), 1, "{v:?}");
        assert!(v.refused[0].contains("would admit 100"));
        // Three of 100: a drain leaves 200 for a peak of 180 — allowed, but N-1 warns (100 < 180).
        h.observe("web/10.0.0.13", now - 60, 0, 0);
        let v = check(&cfg(&[100, 100, 100], false), &cfg(&[100, 100, 100], true), &h, &open, now, Duration::from_hours(24));
        assert!(v.refused.is_empty(), "{v:?}");
        assert!(v.warnings[0].contains("N-1"), "{v:?}");
    }
}
