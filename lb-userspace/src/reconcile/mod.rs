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

use crate::key::BackendKey;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use lb_common::{Backend, ServiceKey, BACKEND_ACTIVE, BACKEND_DOWN, MAX_BACKENDS};
use serde::Serialize;

use crate::{
    config::{Config, Mode, Proto, ServiceCfg},
    maglev::RingBackend,
    tables::Tables,
    Error,
};

mod plan;
mod write;

pub use lb_common::{PROTO_TCP, PROTO_UDP};

/// A 16-byte map address for `ip` and its family.
pub use lb_common::user::addr16;

pub fn service_key(vip: IpAddr, port: u16, proto: Proto) -> ServiceKey {
    ServiceKey { addr: addr16(vip).0, port_be: port.to_be_bytes(), proto: proto as u8, _pad: 0 }
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
    /// The cluster-wide `max_conns` it was granted under: a config that lowers it below this
    /// enforces 0 from the moment it is applied, until a share under the new limit comes (the
    /// old share belongs to the old limit; the allocator repairs the backend first).
    pub granted_under: u32,
}

/// What the daemon has written into the datapath.
#[derive(Debug, Default)]
pub struct Applied {
    /// With `[cluster.limits]`: this node's share of each backend's `max_conns`, by (service,
    /// address). A backend without one keeps the limit it has (after a restart, what the pinned
    /// map holds), or admits nothing if new: a node is granted capacity, never takes it.
    /// `None`: every limit is the backend's own.
    pub shares: Option<BTreeMap<BackendKey, Share>>,
    /// Shared with the copy each apply starts from: an apply clones (and rewrites) only the
    /// services it changes.
    pub services: BTreeMap<String, Arc<AppliedService>>,
    /// Backends that failed their health checks: (service, address). They leave the ring as
    /// `down`; their open flows continue.
    pub down: BTreeSet<BackendKey>,
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
                    me.down.insert(BackendKey::new(c.name.clone(), address));
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
    lb_common::user::ip_from(&b.addr, b.family)
}

/// A placeholder for a pinned service the config does not have (so it can be removed).
fn orphan(key: &ServiceKey) -> Option<ServiceCfg> {
    let vip = lb_common::user::ip_from_key(&key.addr);
    let proto = Proto::from_u8(key.proto).filter(|p| matches!(p, Proto::Tcp | Proto::Udp))?;
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
mod tests;
