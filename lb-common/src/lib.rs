//! Types shared by Sluice's XDP datapath (`lb-ebpf`) and its userspace (`lb-userspace`).
//!
//! Everything that crosses the kernel/user boundary is defined here once: map names, map
//! key/value layouts, and the enums that index counters. Map values are `#[repr(C)]` with
//! explicit padding and a compile-time size assert, and hold no `bool`/`enum`/`Option`
//! (the kernel and bpftool see raw bytes; a stray padding byte would break hash keys).
#![no_std]

/// Bumped whenever a pinned map's layout or meaning changes; a daemon refuses to adopt pinned
/// maps of another schema.
pub const SCHEMA_VERSION: u32 = 4;

/// The pinned XDP link's file name in the pin directory (the daemon's attachment survives it).
pub const PIN_LINK: &str = "link";

/// Directory under the bpf filesystem where `sluice run` pins its maps by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/sluice";

/// Map names as they appear in the object, in `bpftool map list` and as pin file names.
/// Each map's kind, key → value, writer and reader are documented where it is defined
/// (`lb-ebpf/src/maps.rs`).
pub mod maps {
    pub const STATS: &str = "STATS";
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const CONNS: &str = "CONNS";
    pub const RINGS: &str = "RINGS";
    pub const FLOWS: &str = "FLOWS";
    pub const SVC_STATS: &str = "SVC_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const EVENTS: &str = "EVENTS";
    pub const EVENT_BUCKET: &str = "EVENT_BUCKET";
    pub const SCHEMA: &str = "SCHEMA";
    pub const SERVICE_FILTER: &str = "SERVICE_FILTER";
    pub const FLOW_TAGS: &str = "FLOW_TAGS";
    pub const FLOW_COUNT: &str = "FLOW_COUNT";
    /// Every map the balancer pins.
    pub const ALL: [&str; 14] = [STATS, SERVICES, BACKENDS, CONNS, RINGS, FLOWS, SVC_STATS, BACKEND_STATS, EVENTS, EVENT_BUCKET, SCHEMA, SERVICE_FILTER, FLOW_TAGS, FLOW_COUNT];
}

/// Name of the balancer XDP program in the object.
pub const PROG_BALANCER: &str = "sluice_balancer";
/// Name of the backend-side decapsulation XDP program in the object.
pub const PROG_DECAP: &str = "sluice_decap";
/// Name of the load-time configuration global (a [`Config`]).
pub const GLOBAL_CONFIG: &str = "CONFIG";

/// Services (VIP, port, proto) the datapath can hold; also the size of `SVC_STATS`.
pub const MAX_SERVICES: u32 = 1024;
/// Backends across all services. Id 0 means "none", so ids run 1..MAX_BACKENDS.
pub const MAX_BACKENDS: u32 = 16384;
/// 64-bit words of `SERVICE_FILTER`: a bitmap of 65,536 bits indexed by
/// [`service_filter_bit`].
pub const SERVICE_FILTER_WORDS: u32 = 1024;
/// Default Maglev ring size (prime).
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// Default capacity of `RINGS` in slots (16 services at the default ring size, twice over so a
/// new ring can be written beside the live one); set at load time.
pub const DEFAULT_RING_SLOTS: u32 = 2 * 16 * DEFAULT_RING_SIZE;
/// Default flow table capacity (flows); set at load time.
pub const DEFAULT_FLOW_CAPACITY: u32 = 1 << 20;
/// Entries per bucket of the flow table: their tag words and the bucket's overflow count
/// fill one cache line.
pub const FLOW_WAYS: usize = 7;
/// Low half of a free way's tag word.
pub const TAG_FREE: u32 = 0;
/// Set in the low half of a way's tag word (with the fingerprint) while its claimer writes
/// the entry; lookups do not match it.
pub const TAG_PENDING: u32 = 1;
/// Distinct extra backends a `spill` service may try after its first choice.
pub const MAX_SPILL: u32 = 3;
/// Ring positions probed while looking for distinct spill candidates (bounds the loop).
pub const MAX_PROBES: u32 = 12;
/// Refusal events sent to userspace per second per CPU, unless configured.
pub const DEFAULT_EVENTS_PER_SEC: u32 = 100;

/// A packet and byte count. Value of [`maps::STATS`] (one per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(size_of::<Counter>() == 16);

macro_rules! stats {
    ($($(#[$doc:meta])* $variant:ident = $idx:literal, $name:literal, $malformed:literal;)+) => {
        /// What happened to a packet. Every packet a program sees is counted under exactly one
        /// of these, so their sum is the number of packets seen. The index into [`maps::STATS`].
        ///
        /// Malformed/truncated frames get their own outcome per header so an operator can tell
        /// a broken sender from a broken parser; they are passed to the kernel (which drops
        /// them with its own accounting), never `XDP_ABORTED`.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Stat { $($(#[$doc])* $variant = $idx,)+ }

        impl Stat {
            pub const ALL: &[Self] = &[$(Self::$variant,)+];
            /// Number of variants: the capacity of [`maps::STATS`].
            pub const COUNT: u32 = Self::ALL.len() as u32;

            /// Stable snake_case name, used in `sluice status`, metrics labels and docs.
            pub const fn name(self) -> &'static str {
                match self { $(Self::$variant => $name,)+ }
            }

            /// Whether this outcome means the frame was malformed or truncated.
            pub const fn is_malformed(self) -> bool {
                match self { $(Self::$variant => $malformed,)+ }
            }
        }
    };
}

stats! {
    /// Not IPv4/IPv6 (ARP, LLDP, …): passed.
    NonIp = 0, "non_ip", false;
    /// IPv4/IPv6 carrying neither TCP nor UDP, not for a VIP (ICMP, …): passed.
    OtherL4 = 1, "other_l4", false;
    /// TCP over IPv4, not for a service: passed.
    Tcp4 = 2, "tcp4", false;
    /// UDP over IPv4, not for a service: passed.
    Udp4 = 3, "udp4", false;
    /// TCP over IPv6, not for a service: passed.
    Tcp6 = 4, "tcp6", false;
    /// UDP over IPv6, not for a service: passed.
    Udp6 = 5, "udp6", false;
    /// A fragment not for a VIP (IPv4 MF/offset, IPv6 fragment header): passed.
    Fragment = 6, "fragment", false;
    /// Shorter than an Ethernet header.
    TruncatedEth = 7, "truncated_eth", true;
    /// 802.1Q tag cut short.
    TruncatedVlan = 8, "truncated_vlan", true;
    /// Shorter than the IPv4 header its IHL announces, or than its total length.
    TruncatedIpv4 = 9, "truncated_ipv4", true;
    /// IPv4 header with IHL < 5, version ≠ 4 or a total length shorter than its header.
    BadIpv4 = 10, "bad_ipv4", true;
    /// Shorter than an IPv6 header, its payload length, or one of its extension headers.
    TruncatedIpv6 = 11, "truncated_ipv6", true;
    /// IPv6 with more extension headers than the datapath walks ([`MAX_IPV6_EXT_HEADERS`]).
    Ipv6ExtLimit = 12, "ipv6_ext_limit", false;
    /// TCP header cut short (20 bytes or its data offset).
    TruncatedTcp = 13, "truncated_tcp", true;
    /// TCP data offset < 5.
    BadTcp = 14, "bad_tcp", true;
    /// UDP header cut short.
    TruncatedUdp = 15, "truncated_udp", true;
    /// Sent to a backend (existing, new or adopted flow): `XDP_TX`.
    Forwarded = 16, "forwarded", false;
    /// A new flow refused and answered with a TCP RST: `XDP_TX`.
    RefusedRst = 17, "refused_rst", false;
    /// A new flow refused and dropped (policy `reject = "drop"`, or UDP).
    RefusedDrop = 18, "refused_drop", false;
    /// A fragment for a VIP, dropped by the fragment policy.
    FragmentDropped = 19, "fragment_dropped", false;
    /// An ICMP/ICMPv6 echo request to a VIP, answered: `XDP_TX`.
    IcmpEchoReplied = 20, "icmp_echo_replied", false;
    /// Other ICMP to a VIP (or echo with answering off): passed.
    IcmpPassed = 21, "icmp_passed", false;
    /// ICMP "fragmentation needed" / "packet too big" about a VIP flow, sent to its backend.
    IcmpErrorForwarded = 22, "icmp_error_forwarded", false;
    /// No next hop for an encapsulated packet (no gateway MAC, FIB lookup failed): dropped.
    NoRoute = 23, "no_route", false;
    /// Decap program: an IPIP/IP6IP6/4in6/6in4 packet, outer header stripped: passed.
    Decapsulated = 24, "decapsulated", false;
    /// Decap program: not encapsulated: passed untouched.
    DecapPassthrough = 25, "decap_passthrough", false;
    /// A TCP RST for a service without a flow: forwarded by ring, no flow created.
    ForwardedNoFlow = 26, "forwarded_no_flow", false;
    /// A new flow's first packet dropped, its slot given back, because it could not be
    /// entered in the flow table at that moment: another CPU held its bucket through every
    /// attempt, or a CLOSING twin was removed under it. Rare; the client retransmits.
    FlowBusy = 27, "flow_busy", false;
}

// STATS is indexed by discriminant: ALL must list the variants in index order (tested).

/// IPv6 extension headers (hop-by-hop, routing, destination options) walked before giving up;
/// bounded so the verifier can prove the loop ends.
pub const MAX_IPV6_EXT_HEADERS: u32 = 4;

macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident = $idx:literal, $field:ident, $name:literal;)+) => {
        /// Why a new flow was refused. Counted per service and per backend
        /// ([`Refusals`]), and carried in refusal events.
        #[repr(u8)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason { $($(#[$doc])* $variant = $idx,)+ }

        /// Refusal counters by reason, one named field each so `bpftool` shows the reason.
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct Refusals { $(pub $field: u64,)+ }

        impl Reason {
            pub const ALL: &[Self] = &[$(Self::$variant,)+];
            pub const fn name(self) -> &'static str {
                match self { $(Self::$variant => $name,)+ }
            }
            pub const fn from_u8(v: u8) -> Option<Self> {
                match v { $($idx => Some(Self::$variant),)+ _ => None }
            }
        }

        impl Refusals {
            #[inline(always)]
            pub fn slot(&mut self, r: Reason) -> &mut u64 {
                match r { $(Reason::$variant => &mut self.$field,)+ }
            }
            pub const fn get(&self, r: Reason) -> u64 {
                match r { $(Reason::$variant => self.$field,)+ }
            }
            pub fn total(&self) -> u64 {
                0 $(+ self.$field)+
            }
            /// Adds `o` field by field (summing per-CPU values).
            pub fn add(&mut self, o: &Self) {
                $(self.$field += o.$field;)+
            }
        }
    };
}

reasons! {
    /// The chosen backend is at its `max_conns`.
    BackendLimit = 0, backend_limit, "backend_limit";
    /// `spill` is on and every candidate tried was refused.
    ServiceSaturated = 1, service_saturated, "service_saturated";
    /// The chosen backend is down (failed health checks).
    BackendDown = 2, backend_down, "backend_down";
    /// The chosen backend is draining: no new flows.
    BackendDraining = 3, backend_draining, "backend_draining";
    /// The service has no backend in its ring.
    NoBackend = 4, no_backend, "no_backend";
    /// The flow table is full (it never evicts a live flow).
    FlowTableFull = 5, flow_table_full, "flow_table_full";
    /// A fragment for the VIP, dropped by policy.
    Fragment = 6, fragment, "fragment";
    /// A malformed TCP/UDP header for the VIP.
    Malformed = 7, malformed, "malformed";
    /// The chosen backend's `max_conns` is cluster-wide, this node's share of it is used up,
    /// and the cluster had room when this node last heard from the others (the allocator moves
    /// shares to where the demand is; `backend_limit` once the cluster is full).
    ShareExhausted = 8, share_exhausted, "share_exhausted";
}
const _: () = assert!(size_of::<Refusals>() == 9 * 8);

/// Key of [`maps::SERVICES`]: (VIP, port, protocol). IPv4 VIPs use the first 4 bytes of
/// `addr` (the rest zero). A key with `port_be = [0, 0]` and `proto = 0` is the VIP's own
/// entry: it marks the address as a VIP (fragments, ICMP) and points at its first service.
// Aligned so that copies of the address fields compile to word moves in BPF, not byte loops
// (or calls to a byte-wise memcpy).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: [u8; 16],
    pub port_be: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<ServiceKey>() == 20);

pub const MODE_L2DSR: u8 = 0;
pub const MODE_IPIP: u8 = 1;
pub const REJECT_DROP: u8 = 0;
pub const REJECT_RST: u8 = 1;

/// Value of [`maps::SERVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Index into `SVC_STATS`; also names the service in events.
    pub id: u32,
    /// First slot of this service's ring in `RINGS`. Switching it (one map update) swaps a
    /// fully written new ring in atomically.
    pub ring_base: u32,
    /// Ring size (prime); 0 = no ring (every new flow refused with `no_backend`).
    pub ring_size: u32,
    /// [`MODE_L2DSR`] or [`MODE_IPIP`].
    pub mode: u8,
    /// [`REJECT_RST`] or [`REJECT_DROP`] (UDP is always dropped).
    pub reject: u8,
    /// Distinct extra candidates to try when the first is refused (0 = no spill, max
    /// [`MAX_SPILL`]).
    pub spill: u8,
    /// Which half of its ring region `ring_base` points into (0 or 1); not used by the
    /// datapath, lets a restarted daemon find the region again.
    pub half: u8,
}
const _: () = assert!(size_of::<Service>() == 16);

pub const BACKEND_ACTIVE: u8 = 1;
pub const BACKEND_DRAINING: u8 = 2;
pub const BACKEND_DOWN: u8 = 3;

/// [`Backend::at_limit`]: a refusal at `max_conns` is the backend's own limit (`backend_limit`).
pub const AT_LIMIT_BACKEND: u8 = 0;
/// [`Backend::at_limit`]: a refusal at `max_conns` is this node's share of a cluster-wide limit
/// while the cluster has room (`share_exhausted`).
pub const AT_LIMIT_SHARE: u8 = 1;

/// Value of [`maps::BACKENDS`] (array indexed by backend id; id 0 unused).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// IPv4 in the first 4 bytes, or IPv6.
    pub addr: [u8; 16],
    /// Next-hop MAC for `l2dsr`.
    pub mac: [u8; 6],
    /// 4 or 6; 0 = slot unused.
    pub family: u8,
    /// [`BACKEND_ACTIVE`], [`BACKEND_DRAINING`] or [`BACKEND_DOWN`].
    pub state: u8,
    /// Open connections this node admits: the backend's `max_conns`, or, when that limit is
    /// cluster-wide, this node's share of it.
    pub max_conns: u32,
    /// The service this backend belongs to (below [`MAX_SERVICES`]).
    pub service_id: u16,
    /// What a refusal at `max_conns` is counted as: [`AT_LIMIT_BACKEND`] or [`AT_LIMIT_SHARE`]
    /// (set by the daemon from what it knows of the other nodes).
    pub at_limit: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<Backend>() == 32);

/// Value of [`maps::CONNS`] (a shared array, not per-CPU): open connections of a backend,
/// changed only with atomic add/sub so CPUs never overshoot a limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conns {
    pub open: u64,
}
const _: () = assert!(size_of::<Conns>() == 8);

/// Key of [`maps::FLOWS`]: the 5-tuple as the client sent it.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport_be: [u8; 2],
    pub dport_be: [u8; 2],
    pub proto: u8,
    // Scalars, not `[u8; 3]`: BPF code zeroes an array padding with a call to a byte-wise
    // memset on every packet; scalar fields are plain stores.
    pub _pad0: u8,
    pub _pad1: u16,
}
const _: () = assert!(size_of::<FlowKey>() == 40);

pub const FLOW_SYN_SEEN: u8 = 1;
pub const FLOW_ESTABLISHED: u8 = 2;
pub const FLOW_CLOSING: u8 = 3;
pub const FLOW_UDP: u8 = 4;

/// Value of [`maps::FLOWS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub backend_id: u32,
    pub service_id: u32,
    /// While the flow holds a slot in `CONNS`: its way's generation (the high half of the tag
    /// word, never 0); else 0. Released by a compare-and-swap from that generation to 0, so the
    /// slot is given back exactly once whoever (FIN, RST, GC) gets there first, and never by
    /// someone still holding a pointer to a previous occupant of the way.
    pub counted: u64,
    /// [`FLOW_SYN_SEEN`], [`FLOW_ESTABLISHED`], [`FLOW_CLOSING`] or [`FLOW_UDP`].
    pub state: u8,
    /// 1 if the flow was adopted (seen mid-stream without an entry).
    pub adopted: u8,
    /// The service's forwarding mode when the flow was entered ([`MODE_L2DSR`] or
    /// [`MODE_IPIP`]): a flow's packets are forwarded without looking its service up again,
    /// and a connection keeps its path when its service is changed or removed.
    pub mode: u8,
    pub _pad: [u8; 5],
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE) of the last packet, for GC.
    pub last_seen_ns: u64,
    pub created_ns: u64,
}
const _: () = assert!(size_of::<Flow>() == 40);

/// One way of a [`FlowBucket`]: a flow and its key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    pub key: FlowKey,
    pub flow: Flow,
}
const _: () = assert!(size_of::<FlowEntry>() == 80);

/// Value of [`maps::FLOWS`], an array of buckets: the flow table, open-addressed so that the
/// datapath's lookups and inserts are inlined loads and compare-and-swaps instead of the
/// kernel hash map's chain of calls. A flow lives in its home bucket, or, when that was full,
/// in its other bucket ([`flow_buckets`]). What each way holds is in the bucket's
/// [`FlowTags`] (`FLOW_TAGS`, same index).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowBucket {
    pub entries: [FlowEntry; FLOW_WAYS],
}
const _: () = assert!(size_of::<FlowBucket>() == 560);

/// Value of [`maps::FLOW_TAGS`]: one cache line per bucket in a dense array, so a lookup that
/// misses reads one line (`overflow` counts the flows of this home living in their other
/// bucket, and while it is 0 the other bucket is not read; its bit 63 is the lock a CPU holds
/// while it claims a way for a flow of this home). `words[i]` says what way `i` holds:
/// high half the way's generation (bumped at every claim), low half [`TAG_FREE`], or the
/// flow's [`flow_fingerprint`] (with [`TAG_PENDING`] while the entry is being written). Every
/// change of a tag word is a compare-and-swap against the whole word, so a stale view never
/// frees or claims a way that was reused meanwhile.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowTags {
    pub words: [u64; FLOW_WAYS],
    pub overflow: u64,
}
const _: () = assert!(size_of::<FlowTags>() == 64);

/// Value of [`maps::FLOW_COUNT`] (one element, shared by all CPUs): flows in the table, taken
/// with an atomic add before a way is claimed and rolled back over `capacity`, so the table
/// holds exactly `capacity` flows at most; `capacity` is written by the loader.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCount {
    pub live: u64,
    pub capacity: u64,
}
const _: () = assert!(size_of::<FlowCount>() == 16);

/// Buckets of a flow table for `capacity` flows: 3 of a bucket's 7 ways in use on average
/// when full. Filling an empty table to capacity (simulated with random hashes), ~0.6 % of the
/// flows find their home bucket full and live in their other one, and ~0.01 % find both full
/// and are refused `flow_table_full` before the table is (all of them near the end): the
/// price of reading one cache line per lookup.
pub const fn flow_table_buckets(capacity: u32) -> u32 {
    // At least 64: a small table's few buckets would fill unevenly.
    let b = capacity.div_ceil(3);
    if b < 64 {
        64
    } else {
        b
    }
}

/// A flow's home bucket and its other bucket out of `n` (distinct when `n` > 1):
/// multiply-shift of the hash and of a remix of it, so `n` need not be a power of two.
#[inline(always)]
pub fn flow_buckets(hash: u32, n: u32) -> (u32, u32) {
    let b1 = ((u64::from(hash) * u64::from(n)) >> 32) as u32;
    let h2 = (hash ^ (hash >> 16)).wrapping_mul(0x7feb_352d);
    let h2 = (h2 ^ (h2 >> 15)).wrapping_mul(0x846c_a68b);
    let mut b2 = ((u64::from(h2 ^ (h2 >> 16)) * u64::from(n)) >> 32) as u32;
    if b2 == b1 {
        b2 = if b1 + 1 >= n { 0 } else { b1 + 1 };
    }
    (b1, b2)
}

/// A flow-table tag word: the way's generation in the high half, `low` in the low half.
#[inline(always)]
pub const fn tag_word(generation: u64, low: u32) -> u64 {
    generation << 32 | low as u64
}

/// The generation half of a tag word (what `Flow::counted` holds while the flow has a slot).
#[inline(always)]
pub const fn tag_generation(word: u64) -> u64 {
    word >> 32
}

/// The low half of a tag word: [`TAG_FREE`], or a fingerprint (with [`TAG_PENDING`]).
#[inline(always)]
pub const fn tag_low(word: u64) -> u32 {
    word as u32
}

/// The generation a claim gives the free way whose tag word is `word`: one more, skipping 0
/// (`counted == 0` means "holds no slot").
#[inline(always)]
pub const fn next_generation(word: u64) -> u64 {
    match tag_generation(word).wrapping_add(1) & 0xFFFF_FFFF {
        0 => 1,
        g => g,
    }
}

/// The low half of a live way's tag word: the flow hash with bit 1 set (never [`TAG_FREE`])
/// and bit 0 ([`TAG_PENDING`]) clear.
#[inline(always)]
pub fn flow_fingerprint(hash: u32) -> u32 {
    (hash | 2) & !TAG_PENDING
}
/// Value of `SVC_STATS` and `BACKEND_STATS` (per-CPU arrays indexed by service / backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficStats {
    /// Packets and bytes forwarded.
    pub packets: u64,
    pub bytes: u64,
    /// New flows admitted.
    pub new_flows: u64,
    /// Flows adopted mid-stream.
    pub adopted: u64,
    pub refused: Refusals,
}
const _: () = assert!(size_of::<TrafficStats>() == 32 + 72);

impl TrafficStats {
    /// Adds `o` field by field (summing per-CPU values).
    pub fn add(&mut self, o: &Self) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.new_flows += o.new_flows;
        self.adopted += o.adopted;
        self.refused.add(&o.refused);
    }
}

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// A sampled refusal, sent to userspace through the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefusalEvent {
    pub ts_ns: u64,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport_be: [u8; 2],
    pub dport_be: [u8; 2],
    pub proto: u8,
    pub family: u8,
    /// A [`Reason`].
    pub reason: u8,
    pub _pad: u8,
    pub service_id: u32,
    pub backend_id: u32,
}
const _: () = assert!(size_of::<RefusalEvent>() == 56);

/// Per-CPU token bucket that rate-limits refusal events (value of `EVENT_BUCKET`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBucket {
    pub tokens: u64,
    pub last_ns: u64,
    /// Events not sent because the bucket was empty.
    pub suppressed: u64,
}
const _: () = assert!(size_of::<EventBucket>() == 24);

pub const ICMP_ECHO_PASS: u8 = 0;
pub const ICMP_ECHO_REPLY: u8 = 1;
pub const FRAGMENTS_DROP: u8 = 0;
pub const FRAGMENTS_PASS: u8 = 1;

/// Load-time configuration, a read-only global in the object (`CONFIG`), set with
/// `EbpfLoader::override_global` so the verifier prunes paths a deployment does not use.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// [`ICMP_ECHO_REPLY`] or [`ICMP_ECHO_PASS`] for echo requests to a VIP.
    pub icmp_echo: u8,
    /// [`FRAGMENTS_DROP`] or [`FRAGMENTS_PASS`] for fragments to a VIP.
    pub fragments: u8,
    /// 1 if `gateway_mac` is the next hop for encapsulated packets; else `bpf_fib_lookup`.
    pub has_gateway: u8,
    pub _pad0: u8,
    /// Refusal events per second per CPU (token bucket; burst = one second's worth).
    pub events_per_sec: u32,
    pub gateway_mac: [u8; 6],
    pub _pad1: [u8; 2],
    /// Outer source of IPIP packets; the low 16 bits are XORed with the flow hash so each
    /// flow has a stable source (and backends' RSS spreads flows), per Katran.
    pub encap_src4: [u8; 4],
    pub encap_src6: [u8; 16],
    /// Flows the table may hold (`FLOW_COUNT.capacity`), and its buckets
    /// ([`flow_table_buckets`], the length of `FLOWS`); set by the loader.
    pub flow_capacity: u32,
    pub flow_buckets: u32,
}
const _: () = assert!(size_of::<Config>() == 44);

impl Config {
    pub const DEFAULT: Self = Self {
        icmp_echo: ICMP_ECHO_REPLY,
        fragments: FRAGMENTS_DROP,
        has_gateway: 0,
        _pad0: 0,
        events_per_sec: DEFAULT_EVENTS_PER_SEC,
        gateway_mac: [0; 6],
        _pad1: [0; 2],
        encap_src4: [172, 16, 0, 0],
        encap_src6: [0xfd, 0, 0x51, 0x1c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        flow_capacity: DEFAULT_FLOW_CAPACITY,
        flow_buckets: flow_table_buckets(DEFAULT_FLOW_CAPACITY),
    };
}

impl Default for Config {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The flow hash, the same function in the datapath and in userspace (`explain`, tests):
/// murmur3's finalizer over the 5-tuple's 32-bit words. Cheap in BPF (no loop, no table) and
/// well mixed, so `hash % ring_size` spreads flows evenly.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    #[inline(always)]
    fn mix(h: u32, k: u32) -> u32 {
        let k = k.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
        (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
    }
    // The first nine 32-bit words of the key (addresses, then both ports) in native byte
    // order, read as words: `FlowKey` is 8-aligned, and byte-wise assembly of the words
    // costs ~100 BPF instructions per packet (LLVM's BPF backend cannot merge the loads).
    // SAFETY: FlowKey is repr(C, align(8)), 40 bytes without implicit padding; its first 36
    // bytes are src (16), dst (16), sport_be (2), dport_be (2).
    let w = unsafe { core::ptr::from_ref(key).cast::<[u32; 9]>().read() };
    let mut h: u32 = 0x5175_1ce0; // seed
    h = mix(h, w[0]);
    h = mix(h, w[1]);
    h = mix(h, w[2]);
    h = mix(h, w[3]);
    h = mix(h, w[4]);
    h = mix(h, w[5]);
    h = mix(h, w[6]);
    h = mix(h, w[7]);
    h = mix(h, w[8]);
    h = mix(h, u32::from(key.proto));
    // fmix32
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The bit of `SERVICE_FILTER` a `SERVICES` key sets. The filter is a one-hash Bloom filter
/// in front of the `SERVICES` hash map: the daemon sets a key's bit before inserting the key
/// (and never clears one), so a clear bit proves "not a service" with one array load, without
/// the hash map's lookup call. Multiplicative hashing of the key's five 32-bit words.
#[inline(always)]
pub fn service_filter_bit(key: &ServiceKey) -> u32 {
    // SAFETY: ServiceKey is repr(C, align(4)), 20 bytes without implicit padding.
    let w = unsafe { core::ptr::from_ref(key).cast::<[u32; 5]>().read() };
    let x = w[0] ^ w[1].rotate_left(7) ^ w[2].rotate_left(13) ^ w[3].rotate_left(19) ^ w[4].rotate_left(25);
    x.wrapping_mul(0x9E37_79B1) >> 16
}

/// The ring slot of the `i`-th candidate in a flow's probe sequence: the first is
/// `hash % size`; later ones step by an odd stride derived from the hash, so spill candidates
/// differ per flow (a saturated backend's overflow spreads over the others).
#[inline(always)]
pub fn probe_slot(hash: u32, i: u32, ring_size: u32) -> u32 {
    let stride = (hash >> 16) | 1;
    ((u64::from(hash) + u64::from(i) * u64::from(stride)) % u64::from(ring_size)) as u32
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are plain-old-data: repr(C), explicit padding (sizes asserted
    // above), and any bit pattern is a valid value.
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::Conns {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::FlowEntry {}
    unsafe impl aya::Pod for super::FlowBucket {}
    unsafe impl aya::Pod for super::FlowTags {}
    unsafe impl aya::Pod for super::FlowCount {}
    unsafe impl aya::Pod for super::TrafficStats {}
    unsafe impl aya::Pod for super::RefusalEvent {}
    unsafe impl aya::Pod for super::EventBucket {}
    unsafe impl aya::Pod for super::Config {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_all_is_in_index_order() {
        for (i, s) in Stat::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "{s:?}");
        }
    }

    #[test]
    fn stat_names_are_unique() {
        for a in Stat::ALL {
            for b in Stat::ALL {
                assert!(a == b || a.name() != b.name());
            }
        }
    }

    #[test]
    fn reasons_round_trip_and_index_their_fields() {
        let mut r = Refusals::default();
        for (i, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i);
            assert_eq!(Reason::from_u8(*reason as u8), Some(*reason));
            *r.slot(*reason) += i as u64 + 1;
        }
        for (i, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(r.get(*reason), i as u64 + 1, "{}", reason.name());
        }
        assert_eq!(Reason::from_u8(Reason::ALL.len() as u8), None);
    }

    #[test]
    fn flow_hash_depends_on_every_field() {
        let base = FlowKey {
            src: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst: [10, 0, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sport_be: [0x9c, 0x40],
            dport_be: [0, 80],
            proto: 6,
            _pad0: 0,
            _pad1: 0,
        };
        let h = flow_hash(&base);
        let mut k = base;
        k.src[3] = 2;
        assert_ne!(flow_hash(&k), h);
        let mut k = base;
        k.dst[15] = 1;
        assert_ne!(flow_hash(&k), h);
        let mut k = base;
        k.sport_be[1] ^= 1;
        assert_ne!(flow_hash(&k), h);
        let mut k = base;
        k.dport_be[1] ^= 1;
        assert_ne!(flow_hash(&k), h);
        let mut k = base;
        k.proto = 17;
        assert_ne!(flow_hash(&k), h);
    }

    #[test]
    fn flow_buckets_are_distinct_in_range_and_spread() {
        assert_eq!(flow_table_buckets(1), 64);
        assert_eq!(flow_table_buckets(DEFAULT_FLOW_CAPACITY), 349_526);
        for n in [4u32, 5, 257, 262_144] {
            let mut seen = [0u32; 4];
            for i in 0..20_000u32 {
                let h = i.wrapping_mul(0x9E37_79B9) ^ (i >> 3);
                let (a, b) = flow_buckets(h, n);
                assert!(a < n && b < n && a != b, "{n} {h}");
                if n == 4 {
                    seen[a as usize] += 1;
                }
            }
            if n == 4 {
                assert!(seen.iter().all(|&c| c > 4000), "{seen:?}");
            }
        }
        for h in [0, 1, 2, 3, u32::MAX] {
            assert!(flow_fingerprint(h) != TAG_FREE && flow_fingerprint(h) & TAG_PENDING == 0);
        }
        let w = tag_word(7, flow_fingerprint(9));
        assert_eq!((tag_generation(w), tag_low(w), next_generation(w)), (7, flow_fingerprint(9), 8));
        assert_eq!(next_generation(tag_word(0xFFFF_FFFF, TAG_FREE)), 1, "generation 0 is skipped");
    }

    #[test]
    fn probe_sequence_starts_at_hash_mod_size_and_stays_in_range() {
        for hash in [0u32, 1, 0xdead_beef, u32::MAX] {
            assert_eq!(probe_slot(hash, 0, 65537), hash % 65537);
            for i in 0..MAX_PROBES {
                assert!(probe_slot(hash, i, 13) < 13);
            }
        }
    }
}
