//! The alert rules' sample (`alerts::Sample`), taken from the daemon's state: the applied
//! record, the counters, the cluster limits' record. Here rather than in `alerts.rs`, so that
//! the rules read only a sample and know nothing of the datapath or the daemon.

use crate::key::BackendKey;
use std::{collections::BTreeMap, sync::Arc};

use crate::{
    alerts::{BackendSample, Sample},
    history::History,
    reconcile::Applied,
};

/// Per backend id, what the sample names it by and its load history's handle, made once per
/// apply: formatting 10,000 addresses and looking up 10,000 histories every second was most of
/// an evaluation.
#[derive(Default)]
pub struct Names {
    /// The [`Applied::generation`] they were made from.
    generation: Option<u64>,
    /// Indexed by backend id.
    by_id: Vec<Option<BackendNames>>,
    /// One past the highest id: how much of `BACKEND_STATS` a sample reads.
    ids_end: u32,
}

pub struct BackendNames {
    pub service: Arc<str>,
    pub backend: Arc<str>,
    /// `service/address`: the history's and the cluster limits' key.
    pub key: Arc<str>,
    /// The backend's series in the load history.
    pub history: usize,
}

impl Names {
    /// Makes the names again if `applied` changed since they were made.
    pub fn refresh(&mut self, applied: &Applied, history: &mut History) {
        if self.generation == Some(applied.generation) {
            return;
        }
        let ids_end = applied.backend_ids_end();
        let mut by_id: Vec<Option<BackendNames>> = std::iter::repeat_with(|| None).take(ids_end as usize).collect();
        for s in applied.services.values() {
            let service: Arc<str> = s.name.as_str().into();
            for b in s.backends.values() {
                let key = crate::shares::key(&s.name, b.address);
                let history = history.handle(&key);
                by_id[b.id as usize] = Some(BackendNames { service: service.clone(), backend: b.address.to_string().into(), key: key.into(), history });
            }
        }
        *self = Self { generation: Some(applied.generation), by_id, ids_end };
    }

    pub fn ids_end(&self) -> u32 {
        self.ids_end
    }

    /// The names of backend `id` of the applied state they were made from (`None` only if
    /// that state changed without a new generation: a bug, skipped rather than a panic).
    pub fn get(&self, id: u32) -> Option<&BackendNames> {
        let n = self.by_id.get(id as usize).and_then(Option::as_ref);
        debug_assert!(n.is_some(), "backend {id} named with this generation");
        n
    }
}

/// What a sample is taken from: the daemon's state, read without changing it.
pub struct Inputs<'a> {
    pub applied: &'a Applied,
    pub names: &'a Names,
    /// `BACKEND_STATS` by id, summed over CPUs.
    pub stats: &'a [lb_common::TrafficStats],
    pub conns: &'a crate::conns::ConnCounters,
    pub limits: Option<crate::status::limits::Status>,
    /// Connections reconciliation corrected, by backend id.
    pub corrections: &'a BTreeMap<u32, u64>,
    /// Flows in the table, and its capacity.
    pub flows: (u64, u64),
    pub config_file: &'a std::path::Path,
    pub not_announcing: Option<(String, Vec<String>, String)>,
    pub change_refused: Option<String>,
    pub services: &'a [crate::config::ServiceCfg],
    pub health_local: &'a BTreeMap<BackendKey, String>,
}

/// One sample of everything the rules look at.
pub fn sample(i: &Inputs<'_>) -> Sample {
    let mut backends = Vec::new();
    let mut drift = BTreeMap::new();
    for s in i.applied.services.values() {
        for b in s.backends.values().filter(|b| !b.removed) {
            let Some(n) = i.names.get(b.id) else { continue };
            backends.push(BackendSample {
                service: n.service.clone(),
                backend: n.backend.clone(),
                open: i.conns.get(b.id),
                max_conns: b.max_conns,
                active: b.state == lb_common::BACKEND_ACTIVE,
                refused: i.stats[b.id as usize].refused,
                cluster: i.limits.as_ref().and_then(|l| l.backends.get(&*n.key)).cloned(),
            });
            if let Some(c) = i.corrections.get(&b.id) {
                drift.insert(b.address.to_string(), *c);
            }
        }
    }
    Sample {
        backends,
        flows: i.flows.0,
        flow_capacity: i.flows.1,
        drift,
        config_file: i.config_file.display().to_string(),
        not_announcing: i.not_announcing.clone(),
        limits: i.limits.clone(),
        change_refused: i.change_refused.clone(),
        service_labels: i.services.iter().filter(|s| !s.labels.is_empty()).map(|s| (s.name.clone(), s.labels.clone())).collect(),
        health_local: i.health_local.iter().map(|(k, d)| (k.service.clone(), k.address.to_string(), d.clone())).collect(),
    }
}
