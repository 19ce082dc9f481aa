//! Reading and writing the datapath's tables (services, backends, rings, connection counters,
//! flows, per-service/backend statistics) in a loaded object. Every write is one map update,
//! and callers order them so the datapath never sees a ring pointing at a backend that is not
//! written yet: backends first, then the ring, then the service that points at it.

use std::{
    borrow::{Borrow, BorrowMut},
    os::fd::{AsFd as _, AsRawFd as _, RawFd},
};

use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    Ebpf, Pod,
};
use lb_common::{maps, Backend, Conns, Flow, FlowKey, Service, ServiceKey, TrafficStats};

use crate::{conns::ConnCounters, flowtab::FlowTable, Error};

/// The `MapData` behind the kinds of map Sluice uses.
pub fn map_data(map: &Map) -> Option<&MapData> {
    match map {
        Map::Array(m) | Map::HashMap(m) | Map::PerCpuArray(m) | Map::RingBuf(m) => Some(m),
        _ => None,
    }
}

fn err(what: &str, e: impl Into<anyhow::Error>) -> Error {
    Error::other(what.to_owned(), e)
}

/// The tables of one loaded balancer: [`Tables`] to write them (the apply path, the GC),
/// [`TablesRead`] to read them, which is all a getter hands out.
pub struct Maps<E> {
    ebpf: E,
}

/// The tables, read and written.
pub type Tables<'a> = Maps<&'a mut Ebpf>;
/// The tables, read only.
pub type TablesRead<'a> = Maps<&'a Ebpf>;

impl<'a> Tables<'a> {
    pub fn new(ebpf: &'a mut Ebpf) -> Self {
        Self { ebpf }
    }

    /// A read-only view of the same tables.
    pub fn read(&self) -> TablesRead<'_> {
        Maps { ebpf: &*self.ebpf }
    }
}

impl<'a> TablesRead<'a> {
    pub fn new(ebpf: &'a Ebpf) -> Self {
        Self { ebpf }
    }
}

impl<E: Borrow<Ebpf>> Maps<E> {
    fn data(&self, name: &str) -> Result<&MapData, Error> {
        let map = self.ebpf.borrow().map(name).ok_or_else(|| err(name, anyhow::anyhow!("no such map")))?;
        map_data(map).ok_or_else(|| err(name, anyhow::anyhow!("unexpected map kind")))
    }

    fn array_ro<V: Pod>(&self, name: &str) -> Result<Array<&MapData, V>, Error> {
        Array::try_from(self.ebpf.borrow().map(name).ok_or_else(|| err(name, anyhow::anyhow!("no such map")))?).map_err(|e| err(name, e))
    }

    fn per_cpu_sum(&self, name: &str, index: u32) -> Result<TrafficStats, Error> {
        let map: PerCpuArray<&MapData, TrafficStats> =
            PerCpuArray::try_from(self.ebpf.borrow().map(name).ok_or_else(|| err(name, anyhow::anyhow!("no such map")))?).map_err(|e| err(name, e))?;
        let values = map.get(&index, 0).map_err(|e| err(name, e))?;
        let mut sum = TrafficStats::default();
        for v in values.iter() {
            sum.add(v);
        }
        Ok(sum)
    }

    /// The raw fd of map `name`, for the batched syscalls in `sys`.
    pub fn fd(&self, name: &str) -> Result<RawFd, Error> {
        Ok(self.data(name)?.fd().as_fd().as_raw_fd())
    }

    /// A map's capacity as created (an adopted map keeps its own).
    pub fn max_entries(&self, name: &str) -> Result<u32, Error> {
        Ok(self.data(name)?.info().map_err(|e| err(name, e))?.max_entries())
    }

    pub fn backend(&self, id: u32) -> Result<Backend, Error> {
        self.array_ro::<Backend>(maps::BACKENDS)?.get(&id, 0).map_err(|e| err("BACKENDS", e))
    }

    /// Every backend slot in use (family set), by id.
    pub fn backends_all(&self) -> Result<Vec<(u32, Backend)>, Error> {
        let arr = self.array_ro::<Backend>(maps::BACKENDS)?;
        let mut out = Vec::new();
        for id in 1..arr.len() {
            let b = arr.get(&id, 0).map_err(|e| err("BACKENDS", e))?;
            if b.family != 0 {
                out.push((id, b));
            }
        }
        Ok(out)
    }

    /// Every entry of `SERVICES`.
    pub fn services_all(&self) -> Result<Vec<(ServiceKey, Service)>, Error> {
        let m: HashMap<&MapData, ServiceKey, Service> =
            HashMap::try_from(self.ebpf.borrow().map(maps::SERVICES).ok_or_else(|| err("SERVICES", anyhow::anyhow!("no such map")))?).map_err(|e| err("SERVICES", e))?;
        m.iter().map(|r| r.map_err(|e| err("SERVICES", e))).collect()
    }

    /// `len` slots of `RINGS` from `base`.
    pub fn ring(&self, base: u32, len: u32) -> Result<Vec<u32>, Error> {
        let arr = self.array_ro::<u32>(maps::RINGS)?;
        (base..base + len).map(|i| arr.get(&i, 0).map_err(|e| err("RINGS", e))).collect()
    }

    pub fn conns(&self, id: u32) -> Result<u64, Error> {
        Ok(self.array_ro::<Conns>(maps::CONNS)?.get(&id, 0).map_err(|e| err("CONNS", e))?.open)
    }

    fn mapped_flows(&self) -> Result<FlowTable, Error> {
        FlowTable::map(self.data(maps::FLOWS)?, self.data(maps::FLOW_TAGS)?, self.data(maps::FLOW_COUNT)?)
    }

    /// The flow of `key`, if it is in the table.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<Flow>, Error> {
        Ok(self.mapped_flows()?.get(key).map(|e| e.flow))
    }

    /// Every flow in the table.
    pub fn flows(&self) -> Result<Vec<(FlowKey, Flow)>, Error> {
        Ok(self.mapped_flows()?.entries().into_iter().map(|e| (e.key, e.flow)).collect())
    }

    /// The per-CPU outcome counters.
    pub fn stats_map(&self) -> Result<PerCpuArray<&MapData, lb_common::Counter>, Error> {
        PerCpuArray::try_from(self.ebpf.borrow().map(maps::STATS).ok_or_else(|| err("STATS", anyhow::anyhow!("no such map")))?).map_err(|e| err("STATS", e))
    }

    pub fn service_stats(&self, id: u32) -> Result<TrafficStats, Error> {
        self.per_cpu_sum(maps::SVC_STATS, id)
    }

    pub fn backend_stats(&self, id: u32) -> Result<TrafficStats, Error> {
        self.per_cpu_sum(maps::BACKEND_STATS, id)
    }

    /// Every backend's statistics with ids below `upto` (index = id), summed over CPUs, in
    /// one `BPF_MAP_LOOKUP_BATCH` call instead of one lookup per backend: what alerting and
    /// metrics read each time, for every backend.
    pub fn backend_stats_upto(&self, upto: u32) -> Result<Vec<TrafficStats>, Error> {
        let fd = self.fd(maps::BACKEND_STATS)?;
        lookup_batch_per_cpu(fd, upto).map_err(|e| err("BACKEND_STATS (batched lookup)", e))
    }
}

impl<E: BorrowMut<Ebpf>> Maps<E> {
    fn array<V: Pod>(&mut self, name: &str) -> Result<Array<&mut MapData, V>, Error> {
        Array::try_from(self.ebpf.borrow_mut().map_mut(name).ok_or_else(|| err(name, anyhow::anyhow!("no such map")))?).map_err(|e| err(name, e))
    }

    fn hash<K: Pod, V: Pod>(&mut self, name: &str) -> Result<HashMap<&mut MapData, K, V>, Error> {
        HashMap::try_from(self.ebpf.borrow_mut().map_mut(name).ok_or_else(|| err(name, anyhow::anyhow!("no such map")))?).map_err(|e| err(name, e))
    }

    /// The memory-mapped connection counters (their `release` and `correct` write).
    pub fn conn_counters(&self) -> Result<ConnCounters, Error> {
        ConnCounters::map(self.data(maps::CONNS)?)
    }

    /// The memory-mapped flow table (its `release`, `remove` and `insert` write).
    pub fn flow_table(&self) -> Result<FlowTable, Error> {
        self.mapped_flows()
    }

    pub fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), Error> {
        self.array::<Backend>(maps::BACKENDS)?.set(id, *backend, 0).map_err(|e| err("BACKENDS", e))
    }

    pub fn set_service(&mut self, key: &ServiceKey, service: &Service) -> Result<(), Error> {
        // The key's filter bit first (never cleared), so the datapath never skips a service.
        let bit = lb_common::service_filter_bit(key);
        let mut filter = self.array::<u64>(maps::SERVICE_FILTER)?;
        let word = filter.get(&(bit / 64), 0).map_err(|e| err("SERVICE_FILTER", e))?;
        filter.set(bit / 64, word | 1 << (bit % 64), 0).map_err(|e| err("SERVICE_FILTER", e))?;
        self.hash::<ServiceKey, Service>(maps::SERVICES)?.insert(*key, *service, 0).map_err(|e| err("SERVICES", e))
    }

    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<(), Error> {
        self.hash::<ServiceKey, Service>(maps::SERVICES)?.remove(key).map_err(|e| err("SERVICES", e))
    }

    /// Writes `ring` at slot `base` of `RINGS` through a shared mapping: one copy. The ring is
    /// written into the half its service does not point at; the service's switch (a map
    /// update, a syscall: a full barrier) publishes it.
    pub fn write_ring(&mut self, base: u32, ring: &[u32]) -> Result<(), Error> {
        let data = self.data(maps::RINGS)?;
        let slots = data.info().map_err(|e| err("RINGS", e))?.max_entries() as usize;
        if base as usize + ring.len() > slots {
            return Err(err("RINGS", anyhow::anyhow!("slots {base}..{} beyond its {slots}", base as usize + ring.len())));
        }
        // An array map's elements are 8 bytes apart whatever the value's size (the kernel
        // rounds it up): each u32 slot is the low half of a u64 (little-endian: bpfel hosts).
        let (m, skip) = crate::flowtab::Mapping::window(data, "RINGS", base as usize * size_of::<u64>(), ring.len() * size_of::<u64>())?;
        // SAFETY: `skip` is within the mapping, 8-aligned (the window starts on a page).
        #[allow(clippy::cast_ptr_alignment, reason = "the window starts on a page and `skip` is a multiple of 8")]
        let at = unsafe { m.at::<u8>().add(skip) }.cast::<u64>();
        for (i, id) in ring.iter().enumerate() {
            // SAFETY: within the mapping (checked above); the datapath reads these slots with
            // plain loads and none of them is live (see above).
            unsafe { at.add(i).write(u64::from(*id)) };
        }
        Ok(())
    }

    /// Overwrites a backend's open-connection counter (reconciliation, tests). Not atomic with
    /// the datapath's add/sub: only for a backend no packet is admitting to, or to correct
    /// drift measured against the flow table.
    pub fn set_conns(&mut self, id: u32, open: u64) -> Result<(), Error> {
        self.array::<Conns>(maps::CONNS)?.set(id, Conns { open }, 0).map_err(|e| err("CONNS", e))
    }

    /// Removes a flow without giving its slot back (tests: a flow table that lost an entry).
    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<(), Error> {
        let table = self.flow_table()?;
        match table.get(key) {
            Some(e) if table.remove(&e) => Ok(()),
            _ => Err(err("FLOWS", anyhow::anyhow!("no such flow"))),
        }
    }
}

/// Reads keys `0..upto` of a per-CPU array of [`TrafficStats`] with `BPF_MAP_LOOKUP_BATCH` (Linux 5.6),
/// summing each key's per-CPU values.
fn lookup_batch_per_cpu(fd: RawFd, upto: u32) -> std::io::Result<Vec<TrafficStats>> {
    type V = TrafficStats;
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    // Per-CPU values come 8-byte aligned, one per possible CPU, key after key.
    let stride = size_of::<V>().next_multiple_of(8);
    let (mut keys, mut values) = (vec![0u32; upto as usize], vec![0u64; upto as usize * cpus * stride / 8]);
    let (mut filled, mut next) = (0usize, 0u32);
    while filled < upto as usize {
        // union bpf_attr, the batch member: in_batch, out_batch, keys, values (u64 each),
        // count, map_fd (u32 each), elem_flags, flags.
        let mut attr = [0u64; 8];
        let mut out_batch = 0u32;
        attr[0] = if filled == 0 { 0 } else { std::ptr::from_ref(&next) as u64 };
        attr[1] = std::ptr::from_mut(&mut out_batch) as u64;
        attr[2] = keys[filled..].as_mut_ptr() as u64;
        attr[3] = values[filled * cpus * stride / 8..].as_mut_ptr() as u64;
        attr[4] = (upto as u64 - filled as u64) | (u64::from(fd as u32) << 32);
        // SAFETY: the buffers hold `count` keys and values from where they point and outlive
        // the call; the kernel writes at most `count` of each.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, attr.as_mut_ptr(), size_of_val(&attr)) };
        let got = (attr[4] & 0xffff_ffff) as usize;
        filled += got;
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            // ENOENT: the end of the map (fewer keys than asked for).
            if e.raw_os_error() == Some(libc::ENOENT) {
                break;
            }
            return Err(e);
        }
        if got == 0 {
            break;
        }
        next = out_batch;
    }
    let mut out = vec![V::default(); upto as usize];
    for (i, &key) in keys[..filled].iter().enumerate() {
        let Some(sum) = out.get_mut(key as usize) else { continue };
        for cpu in 0..cpus {
            let at = (i * cpus + cpu) * stride;
            // SAFETY: within `values` (filled * cpus * stride bytes); `V` is plain old data
            // and the read is unaligned-safe.
            let v: V = unsafe { values.as_ptr().cast::<u8>().add(at).cast::<V>().read_unaligned() };
            sum.add(&v);
        }
    }
    Ok(out)
}
