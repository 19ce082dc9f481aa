//! [`Applied::plan`]: a config against what is applied, every decision made (ids, ring
//! regions, MACs, states, limits, the changes as the journal names them) without touching the
//! datapath.

use crate::key::BackendKey;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use lb_common::{AT_LIMIT_BACKEND, AT_LIMIT_SHARE, BACKEND_ACTIVE, BACKEND_DOWN, BACKEND_DRAINING, MAX_BACKENDS, MAX_SERVICES};

use super::{change, health_text, key_of, service_key, state_name, Applied, AppliedBackend, AppliedService, IdSet, MacResolver, Plan};
use crate::{
    config::{parse_mac, Config, Mode, ServiceCfg},
    Error,
};

impl Applied {
    /// The limit this node enforces for a backend, and what a refusal at it is counted as.
    /// `known`: the limit it enforces now, if it is applied already.
    fn limit_of(&self, service: &str, address: IpAddr, max_conns: u32, known: Option<u32>) -> (u32, u8) {
        let Some(shares) = &self.shares else { return (max_conns, AT_LIMIT_BACKEND) };
        match shares.get(&BackendKey::new(service, address)) {
            Some(sh) if sh.granted_under > max_conns => (0, AT_LIMIT_BACKEND),
            Some(sh) if sh.limit >= max_conns => (max_conns, AT_LIMIT_BACKEND),
            Some(sh) => (sh.limit, if sh.room { AT_LIMIT_SHARE } else { AT_LIMIT_BACKEND }),
            None => (known.unwrap_or(0).min(max_conns), AT_LIMIT_SHARE),
        }
    }

    /// Whether applying `c` would leave `old` as it is: the same config, health, shares and
    /// resolved MACs, nothing draining out, and a ring built by this daemon (after a restart
    /// the first apply rebuilds and compares).
    fn unchanged(&self, old: &AppliedService, c: &ServiceCfg, macs: &dyn MacResolver) -> bool {
        if old.cfg != *c || old.backends.len() != c.backends.len() {
            return false;
        }
        let down: BTreeSet<IpAddr> = self.down.iter().filter(|k| k.service == c.name).map(|k| k.address).collect();
        let mut active = 0;
        let same = c.backends.iter().all(|bc| {
            let Some(b) = old.backends.get(&bc.address) else { return false };
            let state = if bc.drain {
                BACKEND_DRAINING
            } else if down.contains(&bc.address) {
                BACKEND_DOWN
            } else {
                BACKEND_ACTIVE
            };
            active += usize::from(state == BACKEND_ACTIVE);
            let mac_same = bc.mac.is_some() || c.mode != Mode::L2dsr || macs.mac(bc.address) == Some(b.mac);
            !b.removed && b.state == state && mac_same && self.limit_of(&c.name, bc.address, bc.max_conns, Some(b.limit)) == (b.limit, b.at_limit)
        });
        same && old.ring_members.len() == active
    }

    /// What applying `cfg` would do, decided before anything is written (so a config that
    /// cannot be applied changes nothing): ids, ring regions, MACs, states and limits, and
    /// the changes as the journal and `config apply --dry-run` name them. Reads the datapath
    /// only through `conns`.
    #[expect(clippy::too_many_lines, reason = "one service after another, then their backends")]
    pub fn plan(&self, cfg: &Config, macs: &dyn MacResolver, mut conns: impl FnMut(u32) -> u64) -> Result<Plan, Error> {
        let mut next = self.services.clone();
        let mut regions = self.regions.clone();
        let mut changes = Vec::new();
        let wanted: BTreeSet<&str> = cfg.services.iter().map(|s| s.name.as_str()).collect();

        // Services gone from the config, or whose endpoint changed (re-added below).
        let mut removed_services = Vec::new();
        for (name, s) in &self.services {
            let keep = cfg
                .services
                .iter()
                .find(|c| &c.name == name)
                .is_some_and(|c| service_key(c.vip, c.port, c.proto) == service_key(s.cfg.vip, s.cfg.port, s.cfg.proto) && c.ring_size == s.cfg.ring_size);
            if !keep {
                removed_services.push(s.clone());
                regions.remove(&s.region);
                next.remove(name);
                if !wanted.contains(name.as_str()) {
                    changes.push(change(key_of(name, None, ""), format!("remove service \"{name}\"")));
                }
            }
        }

        let mut used_ids = IdSet::of(&next);
        // Backends of removed services stay reserved until their connections are gone.
        for s in &removed_services {
            for b in s.backends.values() {
                if conns(b.id) > 0 {
                    used_ids.insert(b.id);
                }
            }
        }
        let mut used_svc_ids: BTreeSet<u32> = next.values().map(|s| s.id).collect();
        // The search for a free id goes on from the last one found: from 1 each time, adding
        // 10,000 backends took ~50 M set lookups (most of a 100 × 100 apply).
        let mut hint = 1u32;
        let mut alloc_backend = |used: &mut IdSet| -> Result<u32, Error> {
            let id = (hint..MAX_BACKENDS)
                .chain(1..hint)
                .find(|i| !used.contains(*i))
                .ok_or_else(|| Error::other("applying the config", anyhow::anyhow!("no free backend id (the datapath holds {} backends)", MAX_BACKENDS - 1)))?;
            used.insert(id);
            hint = id + 1;
            Ok(id)
        };

        for c in &cfg.services {
            let fresh = !next.contains_key(&c.name);
            if fresh {
                let id = (0..MAX_SERVICES)
                    .find(|i| !used_svc_ids.contains(i))
                    .ok_or_else(|| Error::other("applying the config", anyhow::anyhow!("no free service id (at most {MAX_SERVICES})")))?;
                used_svc_ids.insert(id);
                let len = 2 * c.ring_size;
                let region = Self::find_region(&regions, len, self.ring_slots).ok_or_else(|| {
                    Error::other(
                        format!("service \"{}\"", c.name),
                        anyhow::anyhow!(
                            "the ring table (RINGS, {} slots, sized when the datapath was loaded) has no room for {len} more; restart the daemon to resize it",
                            self.ring_slots
                        ),
                    )
                })?;
                regions.insert(region, len);
                let replaced = self.services.contains_key(&c.name);
                changes.push(change(
                    key_of(&c.name, None, ""),
                    if replaced {
                        format!("replace service \"{}\" ({}:{} {:?})", c.name, c.vip, c.port, c.proto)
                    } else {
                        format!("add service \"{}\" ({}:{} {:?}, {:?})", c.name, c.vip, c.port, c.proto, c.mode)
                    },
                ));
                next.insert(
                    c.name.clone(),
                    Arc::new(AppliedService {
                        id,
                        name: c.name.clone(),
                        cfg: c.clone(),
                        region,
                        half: 1,
                        ring: Default::default(),
                        ring_members: Vec::new(),
                        backends: BTreeMap::new(),
                    }),
                );
            } else if self.unchanged(&next[&c.name], c, macs) {
                // Neither re-planned nor rewritten: what makes one limit change cheap at 10,000
                // backends.
                continue;
            }
            let s = Arc::make_mut(next.get_mut(&c.name).expect("inserted"));
            if !fresh && s.cfg.mode != c.mode {
                changes.push(change(key_of(&c.name, None, "mode"), format!("service \"{}\": mode {:?} -> {:?}", c.name, s.cfg.mode, c.mode)));
            }
            // A health check's settings are no datapath change, but a wrong one takes backends
            // out of the ring: said in the apply's diff and the journal like any other change.
            if !fresh {
                for bc in &c.backends {
                    if let Some(was) = s.cfg.backends.iter().find(|b| b.address == bc.address).filter(|b| b.health != bc.health) {
                        changes.push(change(
                            key_of(&c.name, Some(bc.address), "health"),
                            format!(
                                "service \"{}\" backend {}: health check {} -> {}",
                                c.name,
                                bc.address,
                                health_text(was.health.as_ref(), c.port),
                                health_text(bc.health.as_ref(), c.port)
                            ),
                        ));
                    }
                }
            }
            s.cfg = c.clone();
            let listed: BTreeSet<IpAddr> = c.backends.iter().map(|b| b.address).collect();
            for b in s.backends.values_mut() {
                if !listed.contains(&b.address) && !b.removed {
                    b.removed = true;
                    b.state = BACKEND_DRAINING;
                    changes.push(change(key_of(&c.name, Some(b.address), ""), format!("service \"{}\": drain and remove backend {}", c.name, b.address)));
                }
            }
            for bc in &c.backends {
                let mac = match (&bc.mac, c.mode) {
                    (Some(m), _) => parse_mac(m).unwrap_or_default(),
                    (None, Mode::L2dsr) => macs.mac(bc.address).ok_or_else(|| {
                        Error::other(
                            format!("service \"{}\" backend {}", c.name, bc.address),
                            anyhow::anyhow!("no MAC address for it in the neighbour table; is it on the same L2 segment as the load balancer? (or set mac = \"…\")"),
                        )
                    })?,
                    (None, Mode::Ipip) => [0; 6],
                };
                let state = if bc.drain {
                    BACKEND_DRAINING
                } else if self.down.contains(&BackendKey::new(c.name.clone(), bc.address)) {
                    BACKEND_DOWN
                } else {
                    BACKEND_ACTIVE
                };
                let known = s.backends.get(&bc.address).map(|b| b.limit);
                let (limit, at_limit) = self.limit_of(&c.name, bc.address, bc.max_conns, known);
                if let Some(b) = s.backends.get_mut(&bc.address) {
                    let was = b.clone();
                    b.max_conns = bc.max_conns;
                    b.limit = limit;
                    b.at_limit = at_limit;
                    b.weight = bc.weight;
                    b.mac = mac;
                    b.removed = false;
                    b.state = state;
                    if was.max_conns != b.max_conns {
                        changes.push(change(
                            key_of(&c.name, Some(bc.address), "max_conns"),
                            format!("service \"{}\" backend {}: max_conns {} -> {}", c.name, bc.address, was.max_conns, b.max_conns),
                        ));
                    }
                    if was.weight != b.weight {
                        changes.push(change(
                            key_of(&c.name, Some(bc.address), "weight"),
                            format!("service \"{}\" backend {}: weight {} -> {}", c.name, bc.address, was.weight, b.weight),
                        ));
                    }
                    if was.state != b.state {
                        // `drain` in the file, or the backend's health checks.
                        changes.push(change(
                            key_of(&c.name, Some(bc.address), if bc.drain == (was.state == BACKEND_DRAINING) { "health" } else { "drain" }),
                            format!("service \"{}\" backend {}: {} -> {}", c.name, bc.address, state_name(was.state), state_name(b.state)),
                        ));
                    }
                } else {
                    let id = alloc_backend(&mut used_ids)?;
                    s.backends
                        .insert(bc.address, AppliedBackend { id, address: bc.address, max_conns: bc.max_conns, limit, at_limit, weight: bc.weight, state, mac, removed: false });
                    changes.push(change(
                        key_of(&c.name, Some(bc.address), ""),
                        format!("service \"{}\": add backend {} (max_conns = {}, weight {})", c.name, bc.address, bc.max_conns, bc.weight),
                    ));
                }
            }
            // Removed backends whose connections are gone leave for good.
            let gone: Vec<IpAddr> = s.backends.values().filter(|b| b.removed && conns(b.id) == 0).map(|b| b.address).collect();
            for a in gone {
                s.backends.remove(&a);
            }
        }

        Ok(Plan { changes, next, regions, removed_services })
    }
}
