//! The flow table's layout: keys, flows, buckets, tag words and their helpers.

/// Entries per bucket of the flow table: their tag words and the bucket's overflow count
/// fill one cache line.
pub const FLOW_WAYS: usize = 7;
/// Low half of a free way's tag word.
pub const TAG_FREE: u32 = 0;
/// Set in the low half of a way's tag word (with the fingerprint) while its claimer writes
/// the entry; lookups do not match it.
pub const TAG_PENDING: u32 = 1;
/// Bit 63 of [`FlowTags::overflow`]: the lock a CPU holds while it claims a way for a flow of
/// this home bucket (the rest of the word counts the flows living in their other bucket).
pub const FLOW_INSERT_LOCK: u64 = 1 << 63;

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

named_u8! {
    /// A flow's state ([`Flow::state`]): what its GC timeout is, and whether it holds a slot.
    FlowState {
        SynSeen = 1, "syn_seen", FLOW_SYN_SEEN;
        Established = 2, "established", FLOW_ESTABLISHED;
        Closing = 3, "closing", FLOW_CLOSING;
        Udp = 4, "udp", FLOW_UDP;
    }
}

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
/// and are refused `flow_table_full` before the table is: none below half full, ~0.08 % of
/// the new flows past 90 % (docs/ARCHITECTURE.md). The price of reading one cache line per
/// lookup; `capacity` is the most the table holds, not a promise that every flow under it fits.
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
