//! What the daemon reports (the control API's answers), as [`Daemon`] methods: each reads the
//! state under its lock and returns an `api` type the CLI and the lab read back.

use std::{net::IpAddr, time::Duration};

use super::{Daemon, Refused, State};
use crate::{
    explain::Explanation,
    history::unix_now,
    reconcile::state_name,
    wire::{BackendHistory, BackendReport, BreakGlass, EventsQuery, ExplainQuery, HistoryReport, Review, ReviewBackend, ReviewService, ServiceReport, StatusReport},
    Error,
};

impl Daemon {
    /// `GET /v1/status`.
    pub fn status(&self) -> Result<StatusReport, Error> {
        let mut st = self.lock();
        let services = services(&mut st)?;
        let outcomes = st.outcomes()?;
        let cluster = st.cluster();
        Ok(StatusReport {
            interface: st.cfg.daemon.interface.clone(),
            config: st.cfg_path.clone(),
            services,
            flows: st.flows.len(),
            flow_capacity: st.cfg.flows.capacity,
            last_sweep: st.last_sweep,
            last_drift: st.last_drift.clone(),
            drift_corrected: st.corrections.values().sum(),
            alerts_firing: st.firing.clone(),
            break_glass: st
                .overrides
                .iter()
                .map(|(k, o)| BreakGlass { service: k.service.clone(), backend: k.address, max_conns: o.max_conns, until: o.until_wall.clone() })
                .collect(),
            outcomes,
            cluster: cluster.map(super::Cluster::status),
            peers: cluster.and_then(super::Cluster::peer_stats),
            limits: cluster.and_then(super::Cluster::limits),
            listeners: st.listeners(),
            open_files: st.open_files(),
            state_lock: self.lock_report(),
        })
    }

    /// `GET /v1/services`.
    pub fn services(&self) -> Result<Vec<ServiceReport>, Error> {
        services(&mut self.lock())
    }

    /// `GET /v1/review`: the running config against the load (`sluice config review`).
    pub fn review(&self) -> Review {
        let st = self.lock();
        let now = unix_now();
        let headroom = st.cfg.guard.headroom;
        let mut services = Vec::new();
        for s in &st.cfg.services {
            let mut backends = Vec::new();
            let keys: Vec<String> = s.backends.iter().map(|b| crate::shares::key(&s.name, b.address)).collect();
            for (b, k) in s.backends.iter().zip(&keys) {
                let open = st.applied.backend(&s.name, b.address).map_or(0, |a| st.conns.get(a.id));
                let p = |secs: u64| st.history.peak(k, now, Duration::from_secs(secs));
                let (peak_1h, peak_24h, peak_30d) = (p(3600), p(86_400), p(30 * 86_400));
                let load = open.max(u64::from(peak_30d.open));
                // Peak × headroom, rounded up to a round number (2 significant digits).
                let want = (load as f64 * headroom).ceil() as u64;
                let step = 10u64.pow((want.max(1) as f64).log10().floor().max(1.0) as u32 - 1);
                let suggested = want.div_ceil(step) * step;
                let flag = if u64::from(b.max_conns) < load {
                    "BELOW PEAK"
                } else if (u64::from(b.max_conns) as f64) < load as f64 * headroom {
                    "CLOSE TO PEAK"
                } else {
                    ""
                };
                backends.push(ReviewBackend {
                    address: b.address,
                    max_conns: b.max_conns,
                    open,
                    peak_1h,
                    peak_24h,
                    peak_30d,
                    headroom: i64::from(b.max_conns) - load as i64,
                    suggested: suggested.max(1),
                    flag: flag.into(),
                });
            }
            let peak = st.history.service_peak(&keys, now, Duration::from_hours(24));
            let n1 = crate::guard::n_minus_1(s, u64::from(peak.open), peak.at, now);
            services.push(ReviewService {
                name: s.name.clone(),
                capacity: crate::guard::capacity(s),
                peak_24h: peak,
                n_minus_1: crate::guard::capacity_n_minus_1(s),
                n_minus_1_verdict: n1.unwrap_or_else(|| "carries its peak".into()),
                backends,
            });
        }
        Review { now, headroom, window_s: st.cfg.guard.window.as_secs(), services }
    }

    /// `GET /v1/history/{service}[/{address}]`: every minute (24 h) and hour (30 d) per backend.
    pub fn history(&self, service: &str, address: Option<IpAddr>) -> Result<HistoryReport, Refused> {
        let st = self.lock();
        let now = unix_now();
        let s = st.cfg.services.iter().find(|s| s.name == service).ok_or_else(|| Refused::NotFound(format!("no service named \"{service}\"")))?;
        let chosen: Vec<IpAddr> = s.backends.iter().map(|b| b.address).filter(|a| address.is_none_or(|x| x == *a)).collect();
        if chosen.is_empty() {
            return Err(Refused::NotFound(format!("service \"{service}\" has no backend {}", address.map(|a| a.to_string()).unwrap_or_default())));
        }
        let backends = chosen
            .iter()
            .map(|a| {
                let series = st.history.get(&crate::shares::key(service, *a)).cloned().unwrap_or_default();
                BackendHistory {
                    address: *a,
                    peak_24h: series.peak(now, Duration::from_hours(24)),
                    peak_30d: series.peak(now, Duration::from_hours(720)),
                    minutes: series.slots(now, Duration::from_hours(24)),
                    hours: series.slots(now, Duration::from_hours(720)),
                }
            })
            .collect();
        Ok(HistoryReport { now, service: service.to_owned(), backends })
    }

    /// `GET /v1/explain`: which backend a flow goes to, admitted or refused and why.
    pub fn explain(&self, q: &ExplainQuery) -> Result<Explanation, Error> {
        let st = self.lock();
        crate::explain::explain(&st.applied, &st.dp.read(), q.src, q.dst, q.proto)
    }

    /// `GET /v1/events`: refusal events after `q.after`. Drains the queue first, so a caller
    /// sees what happened up to this request (and a refusal seen here is alerted on at once).
    pub fn events(&self, q: &EventsQuery) -> Vec<crate::events::Event> {
        let mut st = self.lock();
        if let Err(e) = st.drain_events() {
            tracing::error!("{e}");
        }
        st.events.as_ref().map(|e| e.after(q.after, q.limit)).unwrap_or_default()
    }

    /// The last `n` refusal events, oldest first (drained first, as [`Daemon::events`]): the
    /// status page's.
    pub fn recent_events(&self, n: usize) -> Vec<crate::events::Event> {
        let mut st = self.lock();
        if let Err(e) = st.drain_events() {
            tracing::error!("{e}");
        }
        st.events.as_ref().map(|e| e.last(n)).unwrap_or_default()
    }
}

fn services(st: &mut State) -> Result<Vec<ServiceReport>, Error> {
    let limits = st.cluster().and_then(super::Cluster::limits).map(|l| l.backends);
    let end = st.applied.backend_ids_end();
    let all_stats = st.tables().backend_stats_upto(end)?;
    let mut out = Vec::with_capacity(st.applied.services.len());
    for s in st.applied.services.values() {
        let backends = s
            .backends
            .values()
            .map(|b| {
                let ts = all_stats[b.id as usize];
                BackendReport {
                    new_flows: ts.new_flows,
                    refused: lb_common::Reason::ALL.iter().map(|r| (r.name().to_owned(), ts.refused.get(*r))).filter(|(_, n)| *n > 0).collect(),
                    address: b.address,
                    id: b.id,
                    state: state_name(b.state).into(),
                    open: st.conns.get(b.id),
                    max_conns: b.max_conns,
                    limit: b.limit,
                    cluster: limits.as_ref().and_then(|l| l.get(&crate::shares::key(&s.name, b.address))).cloned(),
                    weight: b.weight,
                    removed: b.removed,
                }
            })
            .collect();
        out.push(ServiceReport { name: s.name.clone(), vip: s.cfg.vip, port: s.cfg.port, proto: s.cfg.proto, mode: s.cfg.mode, backends });
    }
    Ok(out)
}
