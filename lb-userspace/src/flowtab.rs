//! The flow table (`FLOWS`, `FLOW_TAGS`, `FLOW_COUNT`) memory-mapped, read and changed with the same
//! compare-and-swaps as the datapath (`lb-ebpf/src/flow.rs`): a way's tag word is the
//! generation (high half) and `TAG_FREE` or the flow's fingerprint (low half, `TAG_PENDING`
//! set while the entry is written); a
//! flow holds a `CONNS` slot while its `counted` equals that generation. Through the map
//! syscalls a read-modify-write would race with the CPUs, and a scan of a million flows would
//! be a million copies; here it is a walk over memory.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::{addr_of, addr_of_mut, NonNull},
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::MapData;
use lb_common::{
    flow_buckets, flow_fingerprint, flow_hash, next_generation, tag_generation, tag_low, tag_word, Flow, FlowBucket, FlowCount, FlowKey, FlowTags, FLOW_WAYS, TAG_FREE, TAG_PENDING,
};

use crate::{conns::ConnCounters, Error};

/// A shared read-write mapping of a BPF array created with `BPF_F_MMAPABLE`.
pub(crate) struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// The mapping as an array of `T`. Page-aligned, so aligned for any map value.
    #[allow(clippy::cast_ptr_alignment, reason = "mmap returns a page-aligned address")]
    pub(crate) fn at<T>(&self) -> *mut T {
        self.base.as_ptr().cast::<T>()
    }
}

impl Mapping {
    pub(crate) fn new(data: &MapData, what: &str, bytes: usize) -> Result<Self, Error> {
        Self::pages(data, what, 0, bytes)
    }

    /// Maps only the pages holding bytes `from..from + bytes` of the array: the kernel maps
    /// every page of a BPF array mapping when it is made, so a small write into a large array
    /// (one ring of `RINGS`) maps just what it writes. Returns the mapping and where `from`
    /// is within it.
    pub(crate) fn window(data: &MapData, what: &str, from: usize, bytes: usize) -> Result<(Self, usize), Error> {
        let first = from / 4096 * 4096;
        Ok((Self::pages(data, what, first, from - first + bytes)?, from - first))
    }

    fn pages(data: &MapData, what: &str, offset: usize, bytes: usize) -> Result<Self, Error> {
        let len = bytes.div_ceil(4096).max(1) * 4096;
        // SAFETY: mapping a BPF array fd, shared; the kernel validates the length, the offset
        // (page-aligned, within the array) and the flags.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, data.fd().as_fd().as_raw_fd(), offset as libc::off_t) };
        if p == libc::MAP_FAILED {
            return Err(Error::other(format!("memory-mapping {what}"), std::io::Error::last_os_error()));
        }
        Ok(Self { base: NonNull::new(p.cast()).expect("mmap returned null"), len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// Where a flow lives: bucket and way, and its tag word as it was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub bucket: u32,
    pub way: usize,
    word: u64,
}

/// A flow as read from the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: FlowKey,
    pub flow: Flow,
    pub slot: Slot,
}

impl Entry {
    /// Whether the flow holds a `CONNS` slot.
    pub fn holds_slot(&self) -> bool {
        self.flow.counted != 0 && self.flow.counted == tag_generation(self.slot.word)
    }
}

/// The memory-mapped flow table of a loaded or pinned datapath.
pub struct FlowTable {
    buckets: Mapping,
    tags: Mapping,
    nbuckets: u32,
    count: Mapping,
}

// SAFETY: the mappings are shared memory; the words other CPUs change are only accessed
// atomically, and entries are read as snapshots validated against their tag word.
unsafe impl Send for FlowTable {}
// SAFETY: as above.
unsafe impl Sync for FlowTable {}

impl FlowTable {
    /// Maps `FLOWS`, `FLOW_TAGS` and `FLOW_COUNT`.
    pub fn map(flows: &MapData, tags: &MapData, count: &MapData) -> Result<Self, Error> {
        let nbuckets = flows.info().map_err(|e| Error::other("FLOWS", e))?.max_entries();
        let ntags = tags.info().map_err(|e| Error::other("FLOW_TAGS", e))?.max_entries();
        if ntags != nbuckets {
            return Err(Error::other("FLOW_TAGS", anyhow::anyhow!("{ntags} buckets of tags for {nbuckets} of flows")));
        }
        Ok(Self {
            buckets: Mapping::new(flows, "FLOWS", nbuckets as usize * size_of::<FlowBucket>())?,
            tags: Mapping::new(tags, "FLOW_TAGS", nbuckets as usize * size_of::<FlowTags>())?,
            nbuckets,
            count: Mapping::new(count, "FLOW_COUNT", size_of::<FlowCount>())?,
        })
    }

    fn bucket(&self, b: u32) -> *mut FlowBucket {
        assert!(b < self.nbuckets);
        // SAFETY: in bounds of the mapping (elements are packed, 560 bytes each).
        unsafe { self.buckets.at::<FlowBucket>().add(b as usize) }
    }

    fn tags(&self, b: u32) -> *mut FlowTags {
        assert!(b < self.nbuckets);
        // SAFETY: in bounds of the tags' mapping (64 bytes each).
        unsafe { self.tags.at::<FlowTags>().add(b as usize) }
    }

    fn tag(&self, b: u32, way: usize) -> &AtomicU64 {
        // SAFETY: an 8-aligned word of the tags' mapping, only accessed atomically.
        unsafe { AtomicU64::from_ptr(addr_of_mut!((*self.tags(b)).words[way])) }
    }

    fn overflow(&self, b: u32) -> &AtomicU64 {
        // SAFETY: as in `tag`.
        unsafe { AtomicU64::from_ptr(addr_of_mut!((*self.tags(b)).overflow)) }
    }

    fn counted(&self, b: u32, way: usize) -> &AtomicU64 {
        // SAFETY: as in `tag`.
        unsafe { AtomicU64::from_ptr(addr_of_mut!((*self.bucket(b)).entries[way].flow.counted)) }
    }

    fn live(&self) -> &AtomicU64 {
        // SAFETY: the first word of FLOW_COUNT's mapping, only changed atomically.
        unsafe { AtomicU64::from_ptr(self.count.at::<u64>()) }
    }

    /// The home bucket and the other bucket of `key`.
    pub fn buckets_of(&self, key: &FlowKey) -> (u32, u32) {
        flow_buckets(flow_hash(key), self.nbuckets)
    }

    /// Flows whose home is bucket `b` living in their other bucket.
    pub fn overflow_count(&self, b: u32) -> u64 {
        // Bit 63 is the datapath's insert lock.
        self.overflow(b).load(Ordering::Relaxed) & !lb_common::FLOW_INSERT_LOCK
    }

    /// Flows in the table.
    pub fn len(&self) -> u64 {
        self.live().load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Flows the table may hold.
    pub fn capacity(&self) -> u64 {
        // SAFETY: the second word of FLOW_COUNT's mapping, written once by the loader.
        unsafe { self.count.at::<u64>().add(1).read_volatile() }
    }

    /// The way `b`/`way` if it holds a flow: key and flow copied between two reads of the tag
    /// word, so a way that changed hands meanwhile is not returned.
    fn read(&self, b: u32, way: usize) -> Option<Entry> {
        let word = self.tag(b, way).load(Ordering::Acquire);
        if tag_low(word) == TAG_FREE || tag_low(word) & TAG_PENDING != 0 {
            return None;
        }
        // SAFETY: in bounds; a plain copy that may be torn, validated below.
        let (key, flow) = unsafe {
            let e = addr_of!((*self.bucket(b)).entries[way]);
            (addr_of!((*e).key).read_volatile(), addr_of!((*e).flow).read_volatile())
        };
        std::sync::atomic::fence(Ordering::Acquire);
        (self.tag(b, way).load(Ordering::Relaxed) == word).then_some(Entry { key, flow, slot: Slot { bucket: b, way, word } })
    }

    /// Every flow, bucket by bucket.
    pub fn for_each(&self, mut f: impl FnMut(&Entry)) {
        for b in 0..self.nbuckets {
            for way in 0..FLOW_WAYS {
                if let Some(e) = self.read(b, way) {
                    f(&e);
                }
            }
        }
    }

    pub fn entries(&self) -> Vec<Entry> {
        let mut out = Vec::new();
        self.for_each(|e| out.push(*e));
        out
    }

    /// The flow of `key`, in its home bucket or its other one.
    pub fn get(&self, key: &FlowKey) -> Option<Entry> {
        let hash = flow_hash(key);
        let (b1, b2) = flow_buckets(hash, self.nbuckets);
        let fp = flow_fingerprint(hash);
        [b1, b2].into_iter().flat_map(|b| (0..FLOW_WAYS).map(move |w| (b, w))).find_map(|(b, w)| self.read(b, w).filter(|e| tag_low(e.slot.word) == fp && e.key == *key))
    }

    /// Gives the flow's `CONNS` slot back if it still holds it. Returns whether it did.
    pub fn release(&self, e: &Entry, conns: &ConnCounters) -> bool {
        let gen = tag_generation(e.slot.word);
        let released = self.counted(e.slot.bucket, e.slot.way).compare_exchange(gen, 0, Ordering::AcqRel, Ordering::Relaxed).is_ok();
        if released {
            conns.release(e.flow.backend_id, 1);
        }
        released
    }

    /// Frees the flow's way if it still holds this flow. Returns whether this call freed it.
    pub fn remove(&self, e: &Entry) -> bool {
        let w = e.slot.word;
        let freed = self.tag(e.slot.bucket, e.slot.way).compare_exchange(w, tag_word(tag_generation(w), TAG_FREE), Ordering::AcqRel, Ordering::Relaxed).is_ok();
        if freed {
            self.live().fetch_sub(1, Ordering::AcqRel);
            let (home, _) = flow_buckets(flow_hash(&e.key), self.nbuckets);
            if e.slot.bucket != home {
                self.overflow(home).fetch_sub(1, Ordering::AcqRel);
            }
        }
        freed
    }

    /// Inserts a flow as the datapath would (tests, benchmarks; without the datapath's insert
    /// lock, so not while packets insert the same flow): `Err` if the table is full or the
    /// flow is there already. The flow holds a slot (its `counted` set to the way's
    /// generation) if `flow.counted` is non-zero; taking the `CONNS` slot is the caller's.
    pub fn insert(&self, key: &FlowKey, flow: &Flow) -> Result<(), Error> {
        let full = || Error::other("inserting a flow", anyhow::anyhow!("the flow table is full"));
        if self.get(key).is_some() {
            return Err(Error::other("inserting a flow", anyhow::anyhow!("the flow is in the table already")));
        }
        if self.live().fetch_add(1, Ordering::AcqRel) >= self.capacity() {
            self.live().fetch_sub(1, Ordering::AcqRel);
            return Err(full());
        }
        let hash = flow_hash(key);
        let (home, other) = flow_buckets(hash, self.nbuckets);
        let fp = flow_fingerprint(hash);
        for b in [home, other] {
            if b == other {
                self.overflow(home).fetch_add(1, Ordering::AcqRel);
            }
            for way in 0..FLOW_WAYS {
                let word = self.tag(b, way).load(Ordering::Acquire);
                if tag_low(word) != TAG_FREE {
                    continue;
                }
                let gen = next_generation(word);
                if self.tag(b, way).compare_exchange(word, tag_word(gen, fp | TAG_PENDING), Ordering::AcqRel, Ordering::Relaxed).is_err() {
                    continue;
                }
                let mut flow = *flow;
                flow.counted = if flow.counted != 0 { gen } else { 0 };
                // SAFETY: the way is ours (PENDING) until published below.
                unsafe {
                    let e = addr_of_mut!((*self.bucket(b)).entries[way]);
                    addr_of_mut!((*e).key).write_volatile(*key);
                    addr_of_mut!((*e).flow).write_volatile(flow);
                }
                self.tag(b, way).store(tag_word(gen, fp), Ordering::Release);
                return Ok(());
            }
        }
        self.overflow(home).fetch_sub(1, Ordering::AcqRel);
        self.live().fetch_sub(1, Ordering::AcqRel);
        Err(full())
    }
}
