//! [`Applied::write`]: a plan written in an order the datapath never sees half done.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use lb_common::{Backend, Service, ServiceKey, BACKEND_ACTIVE, BACKEND_DRAINING};

use super::{addr16, next_generation, service_key, Applied, AppliedService, Change, IdSet, Plan};
use crate::{
    maglev::{self, RingBackend},
    tables::Tables,
    Error,
};

impl Applied {
    /// Writes `plan` (from [`Applied::plan`] of this state) in an order the datapath never
    /// sees half done: backends, each new ring into the half its service does not point at,
    /// the service entries that switch to them, removals, VIP entries. Then records it as
    /// applied and returns what changed.
    pub fn write(&mut self, t: &mut Tables<'_>, plan: Plan) -> Result<Vec<Change>, Error> {
        let Plan { changes, mut next, regions, removed_services } = plan;
        let kept = |name: &str, s: &Arc<AppliedService>| self.services.get(name).is_some_and(|o| Arc::ptr_eq(o, s));
        for s in next.values().filter(|s| !kept(&s.name, s)) {
            let before = self.services.get(&s.name).filter(|o| o.id == s.id);
            for b in s.backends.values() {
                // Unchanged backends are not rewritten (one syscall each adds up at 10,000).
                if before.and_then(|o| o.backends.get(&b.address)) == Some(b) {
                    continue;
                }
                let (addr, family) = addr16(b.address);
                t.set_backend(b.id, &Backend { addr, mac: b.mac, family, state: b.state, max_conns: b.limit, service_id: s.id as u16, at_limit: b.at_limit, _pad: 0 })?;
            }
        }
        for (name, s) in &mut next {
            if self.services.get(name).is_some_and(|o| Arc::ptr_eq(o, s)) {
                continue;
            }
            let s = Arc::make_mut(s);
            let members: Vec<RingBackend> =
                s.backends.values().filter(|b| b.state == BACKEND_ACTIVE && !b.removed).map(|b| RingBackend { id: b.id, key: b.address.to_string(), weight: b.weight }).collect();
            // Building a ring costs O(size); skip it (and comparing it) when its inputs did not
            // change.
            let rebuilt = if members == s.ring_members && s.ring.len() == s.cfg.ring_size as usize {
                None
            } else {
                Some(maglev::build(&members, s.cfg.ring_size)).filter(|r| **r != *s.ring)
            };
            s.ring_members = members;
            let service_changed = self.services.get(&s.name).is_none_or(|old| old.id != s.id || old.cfg != s.cfg);
            if rebuilt.is_some() || service_changed {
                if let Some(ring) = rebuilt {
                    s.half ^= 1;
                    t.write_ring(s.ring_base(), &ring)?;
                    s.ring = ring.into();
                }
                let svc = Service {
                    id: s.id,
                    ring_base: s.ring_base(),
                    ring_size: if s.ring.iter().any(|id| *id != 0) { s.cfg.ring_size } else { 0 },
                    mode: s.cfg.mode as u8,
                    reject: s.cfg.overflow.reject as u8,
                    spill: s.cfg.overflow.spill.candidates(),
                    half: s.half as u8,
                };
                t.set_service(&service_key(s.cfg.vip, s.cfg.port, s.cfg.proto), &svc)?;
            }
        }
        let in_use = IdSet::of(&next);
        for s in &removed_services {
            let key = service_key(s.cfg.vip, s.cfg.port, s.cfg.proto);
            if !next.values().any(|n| service_key(n.cfg.vip, n.cfg.port, n.cfg.proto) == key) {
                t.remove_service(&key)?;
            }
            // Its backends drain: flows continue, no new ones (nothing points at them now).
            for b in s.backends.values() {
                if !in_use.contains(b.id) {
                    let (addr, family) = addr16(b.address);
                    t.set_backend(
                        b.id,
                        &Backend { addr, mac: b.mac, family, state: BACKEND_DRAINING, max_conns: b.limit, service_id: s.id as u16, at_limit: b.at_limit, _pad: 0 },
                    )?;
                }
            }
        }
        // VIP entries (port 0, proto 0): one per VIP, pointing at its first service; rewritten
        // only when that changes.
        let vips_of = |services: &BTreeMap<String, Arc<AppliedService>>| {
            let mut vips: BTreeMap<IpAddr, (u32, u32)> = BTreeMap::new();
            for s in services.values() {
                vips.entry(s.cfg.vip).or_insert((s.id, s.ring_base()));
            }
            vips
        };
        let (vips, before) = (vips_of(&next), vips_of(&self.services));
        for (vip, &(id, ring_base)) in &vips {
            if before.get(vip) == Some(&(id, ring_base)) {
                continue;
            }
            let key = ServiceKey { addr: addr16(*vip).0, port_be: [0; 2], proto: 0, _pad: 0 };
            let svc = Service { id, ring_base, ring_size: 0, mode: 0, reject: 0, spill: 0, half: 0 };
            t.set_service(&key, &svc)?;
        }
        for s in self.services.values() {
            if !vips.contains_key(&s.cfg.vip) {
                let _ = t.remove_service(&ServiceKey { addr: addr16(s.cfg.vip).0, port_be: [0; 2], proto: 0, _pad: 0 });
            }
        }
        self.services = next;
        self.regions = regions;
        self.generation = next_generation();
        Ok(changes)
    }
}
