//! Config → datapath tables. The daemon keeps an [`Applied`] record of what it wrote and, for
//! a new config, computes the changes and writes them in an order that never shows the
//! datapath a half-applied state:
//!
//! 1. backends (new ids, limits, states, MACs) — nothing points at a new id yet;
//! 2. each changed ring into the *inactive* half of its service's region;
//! 3. the service entry, switching `ring_base` to the new half in one map update;
//! 4. removed services' entries.
//!
//! Removing a backend drains it: it leaves the ring and stays in `BACKENDS` as draining, so its
//! open flows continue; its id is reused only once it has no open connection.
//! Everything that can be checked is checked before the first write, so a refused config
//! changes nothing.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use lb_common::{
    Backend, Service, ServiceKey, AT_LIMIT_BACKEND, AT_LIMIT_SHARE, BACKEND_ACTIVE, BACKEND_DOWN, BACKEND_DRAINING, FAMILY_V4, FAMILY_V6, MAX_BACKENDS, MAX_SERVICES, MODE_IPIP,
    MODE_L2DSR, REJECT_DROP, REJECT_RST,
};
use serde::Serialize;

use crate::{
    config::{parse_mac, Config, Mode, Proto, Reject, ServiceCfg},
    maglev::{self, RingBackend},
    tables::Tables,
    Error,
};

pub use lb_common::{PROTO_TCP, PROTO_UDP};

/// A 16-byte map address for `ip` and its family.
pub fn addr16(ip: IpAddr) -> ([u8; 16], u8) {
    match ip {
        IpAddr::V4(v) => {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&v.octets());
            (a, FAMILY_V4)
        }
        IpAddr::V6(v) => (v.octets(), FAMILY_V6),
    }
}

pub fn service_key(vip: IpAddr, port: u16, proto: Proto) -> ServiceKey {
    let proto = match proto {
        Proto::Tcp => PROTO_TCP,
        Proto::Udp => PROTO_UDP,
    };
    ServiceKey { addr: addr16(vip).0, port_be: port.to_be_bytes(), proto, _pad: 0 }
}

/// A backend as the daemon applied it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AppliedBackend {
    pub id: u32,
    pub address: IpAddr,
    /// The configured limit (cluster-wide when `[cluster.limits]` is set).
    pub max_conns: u32,
    /// What this node admits: `max_conns`, or its share of it.
    pub limit: u32,
    /// [`AT_LIMIT_BACKEND`] or [`AT_LIMIT_SHARE`]: what a refusal at `limit` is counted as.
    pub at_limit: u8,
    pub weight: u32,
    /// `active`, `draining` or `down` as written to the datapath.
    pub state: u8,
    pub mac: [u8; 6],
    /// Removed from the config, draining until its connections are gone.
    pub removed: bool,
}

/// A service as the daemon applied it.
#[derive(Clone, Debug, Serialize)]
pub struct AppliedService {
    pub id: u32,
    pub name: String,
    #[serde(skip)]
    pub cfg: ServiceCfg,
    /// First slot of this service's two ring halves in `RINGS`.
    pub region: u32,
    /// Which half is live (0 or 1).
    pub half: u32,
    /// Shared, not copied: every apply starts from a copy of what is applied.
    pub ring: Arc<[u32]>,
    /// The members `ring` was built from; an unchanged list skips the rebuild.
    #[serde(skip)]
    pub ring_members: Vec<RingBackend>,
    pub backends: BTreeMap<IpAddr, AppliedBackend>,
}

impl AppliedService {
    pub fn ring_base(&self) -> u32 {
        self.region + self.half * self.cfg.ring_size
    }
}

/// This node's share of a backend's cluster-wide `max_conns` (`limits.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Share {
    /// Open connections this node may hold (never above `max_conns`).
    pub limit: u32,
    /// Whether the cluster had room beyond this share when last heard: a refusal at the share
    /// is then `share_exhausted`, else `backend_limit`.
    pub room: bool,
}

/// What the daemon has written into the datapath.
#[derive(Debug, Default)]
pub struct Applied {
    /// With `[cluster.limits]`: this node's share of each backend's `max_conns`, by (service,
    /// address). A backend without one keeps the limit it has (after a restart, what the pinned
    /// map holds), or admits nothing if new: a node is granted capacity, never takes it.
    /// `None`: every limit is the backend's own.
    pub shares: Option<BTreeMap<(String, IpAddr), Share>>,
    /// Shared with the copy each apply starts from: an apply clones (and rewrites) only the
    /// services it changes.
    pub services: BTreeMap<String, Arc<AppliedService>>,
    /// Backends that failed their health checks: (service, address). They leave the ring as
    /// `down`; their open flows continue.
    pub down: BTreeSet<(String, IpAddr)>,
    /// Ring regions: start → size, and the capacity of `RINGS`.
    regions: BTreeMap<u32, u32>,
    ring_slots: u32,
    /// New with every apply that wrote, unique across `Applied`s: what caches built from the
    /// applied state (the alert sample's names) compare.
    pub generation: u64,
}

fn next_generation() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// One line of what an apply changed, for the journal and `config apply`'s diff, and the
/// config key it is about, named as the file says it (`service "web" backend 10.0.0.11
/// max_conns`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Change {
    pub what: String,
    pub key: String,
}

/// What applying a config would do: see [`Applied::plan`] and [`Applied::write`].
#[derive(Debug)]
pub struct Plan {
    /// What changes, one line each.
    pub changes: Vec<Change>,
    /// The services as they will be applied (unchanged ones shared with the applied state).
    next: BTreeMap<String, Arc<AppliedService>>,
    regions: BTreeMap<u32, u32>,
    /// Services leaving the datapath (their backends drain).
    removed_services: Vec<Arc<AppliedService>>,
}

/// A health check in a change's line: `tcp :80 every 1s` or `http :8080/healthz every 1s`.
fn health_text(h: Option<&crate::config::Health>, service_port: u16) -> String {
    let Some(h) = h else { return "none".into() };
    let kind = match h.kind {
        crate::config::HealthKind::Tcp => "tcp",
        crate::config::HealthKind::Http => "http",
    };
    format!("{kind} :{}{} every {:?}", h.port.unwrap_or(service_port), h.path.as_deref().unwrap_or(""), h.interval)
}

fn change(key: impl Into<String>, what: impl Into<String>) -> Change {
    Change { what: what.into(), key: key.into() }
}

/// The config key of a service, or of one of its backends' settings.
fn key_of(service: &str, backend: Option<IpAddr>, setting: &str) -> String {
    let mut k = format!("service \"{service}\"");
    if let Some(b) = backend {
        k.push_str(&format!(" backend {b}"));
    }
    if !setting.is_empty() {
        k.push(' ');
        k.push_str(setting);
    }
    k
}

/// Resolves a backend's next-hop MAC for `l2dsr` when the config does not give one.
pub trait MacResolver {
    fn mac(&self, ip: IpAddr) -> Option<[u8; 6]>;
}

impl<F: Fn(IpAddr) -> Option<[u8; 6]>> MacResolver for F {
    fn mac(&self, ip: IpAddr) -> Option<[u8; 6]> {
        self(ip)
    }
}

impl Applied {
    /// The VIPs a node may announce: those with a service that has an active backend.
    pub fn servable(&self) -> BTreeSet<IpAddr> {
        self.services.values().filter(|s| s.backends.values().any(|b| !b.removed && b.state == BACKEND_ACTIVE)).map(|s| s.cfg.vip).collect()
    }

    /// A backend as applied, by service name and address.
    pub fn backend(&self, service: &str, address: IpAddr) -> Option<&AppliedBackend> {
        self.services.get(service).and_then(|s| s.backends.get(&address))
    }

    /// One past the highest backend id in use: how much of `BACKEND_STATS` a batched read of
    /// every backend's statistics covers.
    pub fn backend_ids_end(&self) -> u32 {
        self.services.values().flat_map(|s| s.backends.values()).map(|b| b.id + 1).max().unwrap_or(0)
    }

    pub fn new(ring_slots: u32) -> Self {
        Self { ring_slots, generation: next_generation(), ..Self::default() }
    }

    /// A free region of `len` slots (first fit), if `RINGS` has room.
    fn find_region(regions: &BTreeMap<u32, u32>, len: u32, capacity: u32) -> Option<u32> {
        let mut start = 0u32;
        for (&s, &l) in regions {
            if s >= start && s - start >= len {
                return Some(start);
            }
            start = start.max(s + l);
        }
        (capacity.checked_sub(start)? >= len).then_some(start)
    }

    /// Applies `cfg`: [`Applied::plan`], then [`Applied::write`]. `conns(id)` reports a
    /// backend's open connections (to know when a removed backend's id can be reused). Returns
    /// what changed.
    pub fn apply(&mut self, t: &mut Tables<'_>, cfg: &Config, macs: &dyn MacResolver, mut conns: impl FnMut(&mut Tables<'_>, u32) -> u64) -> Result<Vec<Change>, Error> {
        let plan = self.plan(cfg, macs, |id| conns(t, id))?;
        self.write(t, plan)
    }

    /// Rebuilds the record of what a previous daemon wrote, from the pinned maps, naming
    /// services after `cfg` (a service the config no longer has is kept under a placeholder
    /// name, so the next apply removes it). Backends marked down stay down until their health
    /// checks pass.
    pub fn recover(t: &mut Tables<'_>, cfg: &Config, ring_slots: u32) -> Result<Self, Error> {
        let mut me = Self::new(ring_slots);
        let backends = t.backends_all()?;
        for (key, svc) in t.services_all()? {
            if key.proto == 0 {
                continue; // a VIP entry
            }
            let found = cfg.services.iter().find(|c| service_key(c.vip, c.port, c.proto) == key);
            let Some(c) = found.cloned().or_else(|| orphan(&key)) else { continue };
            let size = c.ring_size;
            let region = svc.ring_base.saturating_sub(u32::from(svc.half) * size);
            let ring: Arc<[u32]> = if svc.ring_size == 0 { Default::default() } else { t.ring(svc.ring_base, size)?.into() };
            let mut bs = BTreeMap::new();
            for (id, b) in backends.iter().filter(|(_, b)| u32::from(b.service_id) == svc.id && b.family != 0) {
                let address = ip_of(b);
                let listed = c.backends.iter().find(|x| x.address == address);
                if b.state == BACKEND_DOWN {
                    me.down.insert((c.name.clone(), address));
                }
                bs.insert(
                    address,
                    AppliedBackend {
                        id: *id,
                        address,
                        max_conns: listed.map_or(b.max_conns, |x| x.max_conns),
                        limit: b.max_conns,
                        at_limit: b.at_limit,
                        weight: listed.map_or(1, |x| x.weight),
                        state: b.state,
                        mac: b.mac,
                        removed: listed.is_none(),
                    },
                );
            }
            me.regions.insert(region, 2 * size);
            // ring_members stays empty: the first apply after a restart rebuilds and compares.
            me.services.insert(
                c.name.clone(),
                Arc::new(AppliedService { id: svc.id, name: c.name.clone(), cfg: c, region, half: u32::from(svc.half), ring, ring_members: Vec::new(), backends: bs }),
            );
        }
        Ok(me)
    }

    /// The limit this node enforces for a backend, and what a refusal at it is counted as.
    /// `known`: the limit it enforces now, if it is applied already.
    fn limit_of(&self, service: &str, address: IpAddr, max_conns: u32, known: Option<u32>) -> (u32, u8) {
        let Some(shares) = &self.shares else { return (max_conns, AT_LIMIT_BACKEND) };
        match shares.get(&(service.to_owned(), address)) {
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
        let down: BTreeSet<IpAddr> = self.down.iter().filter(|(s, _)| *s == c.name).map(|(_, a)| *a).collect();
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
                } else if self.down.contains(&(c.name.clone(), bc.address)) {
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
                    mode: match s.cfg.mode {
                        Mode::L2dsr => MODE_L2DSR,
                        Mode::Ipip => MODE_IPIP,
                    },
                    reject: match s.cfg.overflow.reject {
                        Reject::Rst => REJECT_RST,
                        Reject::Drop => REJECT_DROP,
                    },
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

/// Backend ids in use: a bit each (ids are below [`MAX_BACKENDS`]).
struct IdSet(Vec<u64>);

impl IdSet {
    fn of(services: &BTreeMap<String, Arc<AppliedService>>) -> Self {
        let mut set = Self(vec![0; MAX_BACKENDS.div_ceil(64) as usize]);
        for b in services.values().flat_map(|s| s.backends.values()) {
            set.insert(b.id);
        }
        set
    }

    fn insert(&mut self, id: u32) {
        self.0[id as usize / 64] |= 1 << (id % 64);
    }

    fn contains(&self, id: u32) -> bool {
        self.0.get(id as usize / 64).is_some_and(|w| w & 1 << (id % 64) != 0)
    }
}

pub(crate) fn ip_of(b: &Backend) -> IpAddr {
    if b.family == FAMILY_V6 {
        IpAddr::from(b.addr)
    } else {
        IpAddr::from([b.addr[0], b.addr[1], b.addr[2], b.addr[3]])
    }
}

/// A placeholder for a pinned service the config does not have (so it can be removed).
fn orphan(key: &ServiceKey) -> Option<ServiceCfg> {
    let vip = if key.addr[4..].iter().all(|b| *b == 0) { IpAddr::from([key.addr[0], key.addr[1], key.addr[2], key.addr[3]]) } else { IpAddr::from(key.addr) };
    let proto = match key.proto {
        PROTO_TCP => Proto::Tcp,
        PROTO_UDP => Proto::Udp,
        _ => return None,
    };
    let port = u16::from_be_bytes(key.port_be);
    Some(ServiceCfg {
        name: format!("(removed {vip}:{port})"),
        vip,
        port,
        proto,
        mode: Mode::L2dsr,
        overflow: crate::config::Overflow::default(),
        ring_size: lb_common::DEFAULT_RING_SIZE,
        backends: Vec::new(),
        labels: Default::default(),
    })
}

/// A backend state's name (`unused` for a slot without a backend).
pub fn state_name(state: u8) -> &'static str {
    lb_common::BackendState::from_u8(state).map_or("unused", lb_common::BackendState::name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(ring: u32, web_limit: u32) -> Config {
        let text = format!(
            "[daemon]\ninterface = \"lo\"\n[[service]]\nname = \"web\"\nvip = \"10.0.0.100\"\nport = 80\nproto = \"tcp\"\nring_size = {ring}\n\
             [[service.backend]]\naddress = \"10.0.1.1\"\nmax_conns = {web_limit}\n[[service.backend]]\naddress = \"10.0.1.2\"\nmax_conns = 10\n\
             [[service]]\nname = \"dns\"\nvip = \"10.0.0.53\"\nport = 53\nproto = \"udp\"\nring_size = 257\nmode = \"ipip\"\n\
             [[service.backend]]\naddress = \"10.0.2.1\"\nmax_conns = 10\n"
        );
        crate::config::parse(std::path::Path::new("test.toml"), &text).map_or_else(|e| panic!("{e}"), |(c, _)| c)
    }

    /// A plan is made without a datapath: what it would change, named, and nothing applied.
    #[test]
    fn a_plan_needs_no_datapath_and_says_what_changes() {
        let applied = Applied::new(8 * 257);
        let mac = |_: IpAddr| Some([2, 0, 0, 0, 0, 1]);
        let plan = applied.plan(&cfg(257, 10), &mac, |_| 0).expect("plan");
        let what: Vec<&str> = plan.changes.iter().map(|c| c.what.as_str()).collect();
        assert_eq!(what.len(), 5, "{what:?}");
        assert!(what.iter().any(|w| w.starts_with("add service \"web\"")), "{what:?}");
        assert!(what.iter().any(|w| w.starts_with("service \"dns\": add backend 10.0.2.1")), "{what:?}");
        assert!(applied.services.is_empty(), "planning applies nothing");
        assert!(plan.changes.iter().any(|c| c.key == "service \"dns\" backend 10.0.2.1"), "{:?}", plan.changes);

        // A limit change names the key it changes.
        let mut now = Applied::new(8 * 257);
        now.services = plan.next.clone();
        let plan = now.plan(&cfg(257, 99), &mac, |_| 0).expect("plan");
        assert_eq!(plan.changes.iter().map(|c| c.key.as_str()).collect::<Vec<_>>(), ["service \"web\" backend 10.0.1.1 max_conns"]);

        // A health check moved to another port changes no map, and is said all the same: a
        // wrong one takes backends out of the ring.
        let mut checked = cfg(257, 10);
        let check = |port| crate::config::Health { port: Some(port), ..toml::from_str("kind = \"tcp\"").expect("health") };
        checked.services[0].backends[0].health = Some(check(80));
        let mut was = Applied::new(8 * 257);
        was.services = applied.plan(&checked, &mac, |_| 0).expect("plan").next;
        checked.services[0].backends[0].health = Some(check(8080));
        let plan = was.plan(&checked, &mac, |_| 0).expect("plan");
        let said: Vec<(&str, &str)> = plan.changes.iter().map(|c| (c.key.as_str(), c.what.as_str())).collect();
        assert_eq!(said, [("service \"web\" backend 10.0.1.1 health", "service \"web\" backend 10.0.1.1: health check tcp :80 every 1s -> tcp :8080 every 1s")]);

        // Rings that do not fit RINGS: refused before anything is written, naming the service.
        let e = applied.plan(&cfg(4099, 10), &mac, |_| 0).expect_err("no room for the ring");
        assert!(e.to_string().contains("service \"web\"") && e.to_string().contains("RINGS"), "{e}");

        // l2dsr without a MAC for a backend: refused, naming it.
        let e = applied.plan(&cfg(257, 10), &|_| None, |_| 0).expect_err("no MAC");
        assert!(e.to_string().contains("backend 10.0.1.1"), "{e}");
    }
}
