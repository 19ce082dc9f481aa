//! The datapath's maps and the counting helpers over them. Every map is BTF-described
//! (`#[btf_map]`) so `bpftool map dump` prints field names. Names are `lb_common::maps`.
//! Capacities here are defaults; the loader sets `FLOWS` and `RINGS` at load time.

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, BPF_F_MMAPABLE},
    btf_maps::{Array, HashMap, PerCpuArray, RingBuf},
    macros::btf_map,
};
use lb_common::{
    flow_table_buckets, Backend, Conns, Counter, EventBucket, Flow, FlowBucket, FlowCount, FlowKey, FlowTags, Reason, RefusalEvent, Service, ServiceKey, Stat, TrafficStats,
    DEFAULT_FLOW_CAPACITY, DEFAULT_RING_SLOTS, MAX_BACKENDS, MAX_SERVICES, SERVICE_FILTER_WORDS,
};

use crate::parse::Packet;

/// Packets and bytes by outcome (`Stat`), per CPU: no atomics on the hot path.
/// Writer: datapath. Reader: `sluice status`, the daemon (sums over CPUs).
#[btf_map]
pub static STATS: PerCpuArray<Counter, { Stat::COUNT as usize }> = PerCpuArray::new();

/// (VIP, port, proto) → service; (VIP, 0, 0) marks a VIP for fragments and ICMP.
/// Writer: daemon. Reader: datapath.
#[btf_map]
pub static SERVICES: HashMap<ServiceKey, Service, { MAX_SERVICES as usize * 2 }> = HashMap::new();

/// Bit [`lb_common::service_filter_bit`] of a `SERVICES` key, set by the daemon before it
/// inserts the key and never cleared: a clear bit means "not a service" at the cost of one
/// array load (inlined by the verifier), where a hash-map lookup is a chain of kernel calls.
/// Writer: daemon. Reader: datapath.
#[btf_map]
pub static SERVICE_FILTER: Array<u64, { SERVICE_FILTER_WORDS as usize }> = Array::new();

/// Backend id → address, MAC, state, limit. Id 0 is "none" and never used.
/// Writer: daemon. Reader: datapath.
#[btf_map]
pub static BACKENDS: Array<Backend, { MAX_BACKENDS as usize }> = Array::new();

/// Backend id → open connections. Shared by all CPUs (not per-CPU) and changed only by
/// atomic add/sub, which is what makes limits exact. Memory-mappable, so the daemon's GC and
/// reconciliation change it with the same atomic instructions from userspace.
/// Writer: datapath, GC. Reader: all.
#[btf_map]
pub static CONNS: Array<Conns, { MAX_BACKENDS as usize }, { BPF_F_MMAPABLE as usize }> = Array::new();

/// Maglev rings, back to back: slot `service.ring_base + i` → backend id.
/// Writer: daemon (a new ring is written beside the live one, then the service switches).
/// Reader: datapath. Memory-mappable: the daemon writes a ring with one copy, not one
/// `bpf(2)` call per slot.
#[btf_map]
pub static RINGS: Array<u32, { DEFAULT_RING_SLOTS as usize }, { BPF_F_MMAPABLE as usize }> = Array::new();

/// The flow table: 5-tuple → flow, open-addressed in buckets of 7 ways (`lb_common::FlowBucket`,
/// `crate::flow`), whose tag words are in `FLOW_TAGS`. Not an LRU: when full (`FLOW_COUNT`),
/// new flows are refused with `flow_table_full` rather than live flows evicted.
/// Memory-mappable: the daemon's GC expires flows with the same compare-and-swaps.
/// Writer: datapath, GC. Reader: all.
#[btf_map]
pub static FLOWS: Array<FlowBucket, { flow_table_buckets(DEFAULT_FLOW_CAPACITY) as usize }, { BPF_F_MMAPABLE as usize }> = Array::new();

/// Bucket → what each of its ways holds (`lb_common::FlowTags`); sized with `FLOWS`.
/// Writer: datapath, GC. Reader: all.
#[btf_map]
pub static FLOW_TAGS: Array<FlowTags, { flow_table_buckets(DEFAULT_FLOW_CAPACITY) as usize }, { BPF_F_MMAPABLE as usize }> = Array::new();

/// Flows in `FLOWS` and the capacity the loader set (one shared element, atomic add/sub).
/// Writer: datapath, GC (live), loader (capacity). Reader: all.
#[btf_map]
pub static FLOW_COUNT: Array<FlowCount, 1, { BPF_F_MMAPABLE as usize }> = Array::new();

/// Service id → traffic and refusals, per CPU. Writer: datapath. Reader: daemon.
#[btf_map]
pub static SVC_STATS: PerCpuArray<TrafficStats, { MAX_SERVICES as usize }> = PerCpuArray::new();

/// Backend id → traffic and refusals, per CPU (id 0 collects refusals with no backend).
/// Writer: datapath. Reader: daemon.
#[btf_map]
pub static BACKEND_STATS: PerCpuArray<TrafficStats, { MAX_BACKENDS as usize }> = PerCpuArray::new();

/// Sampled refusal events (rate-limited by `EVENT_BUCKET`). Writer: datapath. Reader: daemon.
#[btf_map]
pub static EVENTS: RingBuf<RefusalEvent, { 256 * 1024 }> = RingBuf::new();

/// The layout version of the pinned maps (`lb_common::SCHEMA_VERSION` at index 0), written by
/// the daemon that created them; a daemon of another schema refuses to adopt them.
/// Writer: daemon. Reader: daemon. Not used per packet.
#[btf_map]
pub static SCHEMA: Array<u32, 1> = Array::new();

/// Per-CPU token bucket for `EVENTS`, so a flood of refusals cannot flood userspace.
#[btf_map]
pub static EVENT_BUCKET: PerCpuArray<EventBucket, 1> = PerCpuArray::new();

/// The balancer's large temporaries. BPF's 512-byte stack is shared by the whole call chain
/// (entry + subprograms), so these live in per-CPU map memory instead of the entry frame.
/// Internal: not pinned, not read by userspace.
pub struct Scratch {
    pub pkt: Packet,
    pub key: FlowKey,
    pub flow: Flow,
    pub skey: ServiceKey,
    /// The service of a SYN, looked up before its flow (`crate::balance`).
    pub svc: Service,
    pub fib: FibParams,
    /// Headers being assembled (RST).
    pub buf: Buf,
    /// This CPU's cached coarse clock (see `crate::coarse_now`): the jiffies value at which
    /// `clock_ns` was read.
    pub clock_jiffies: u64,
    pub clock_ns: u64,
    /// Where the flow table found or claimed a way, passed through memory (`crate::flow`).
    pub way: crate::flow::WayCell,
}

/// An 8-aligned byte buffer, so clearing and copying it are word operations.
#[repr(C, align(8))]
pub struct Buf(pub [u8; 64]);

#[btf_map]
pub static SCRATCH: PerCpuArray<Scratch, 1> = PerCpuArray::new();

#[inline(always)]
pub fn count(stat: Stat, bytes: u64) {
    if let Some(c) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: the per-CPU slot is only touched by this CPU while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// Adds to a service's and a backend's per-CPU traffic counters.
#[inline(always)]
pub fn traffic(service_id: u32, backend_id: u32, bytes: u64, new_flow: bool, adopted: bool) {
    // Two separate lookups and null checks: LLVM would merge a loop's checks into a pointer
    // OR, which the verifier rejects.
    if let Some(s) = SVC_STATS.get_ptr_mut(service_id) {
        add_traffic(s, bytes, new_flow, adopted);
    }
    if let Some(s) = BACKEND_STATS.get_ptr_mut(backend_id) {
        add_traffic(s, bytes, new_flow, adopted);
    }
}

#[inline(always)]
fn add_traffic(s: *mut TrafficStats, bytes: u64, new_flow: bool, adopted: bool) {
    // SAFETY: a per-CPU slot; only this CPU writes it while the program runs.
    unsafe {
        (*s).packets += 1;
        (*s).bytes += bytes;
        (*s).new_flows += u64::from(new_flow);
        (*s).adopted += u64::from(adopted);
    }
}

/// Counts a refusal for the service and the backend (0 = none).
#[inline(always)]
pub fn refusal(service_id: u32, backend_id: u32, reason: Reason) {
    if let Some(s) = SVC_STATS.get_ptr_mut(service_id) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe { *(*s).refused.slot(reason) += 1 };
    }
    if let Some(s) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe { *(*s).refused.slot(reason) += 1 };
    }
}
