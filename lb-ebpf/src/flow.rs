//! The flow table: lookups, inserts, TCP state transitions, and giving a connection slot back
//! exactly once.
//!
//! `FLOWS` and `FLOW_TAGS` are arrays of buckets (`lb_common::FlowBucket`, `FlowTags`)
//! searched here with inlined loads: on this kind of machine each kernel hash-map operation is
//! a chain of calls, each paying a return thunk (SRSO), and a new flow used to cost a lookup
//! and an insert of those. A way changes hands only by compare-and-swap on its 64-bit tag word
//! (generation | fingerprint), which is what makes concurrent inserts, FIN/RST on other CPUs
//! and the daemon's GC safe. `docs/ARCHITECTURE.md` ("The flow table") has the whole design.

use core::ptr::{addr_of_mut, read_volatile, write_volatile};

use lb_common::{
    flow_buckets, flow_fingerprint, next_generation, tag_generation, tag_low, tag_word, Flow, FlowEntry, FlowKey, FLOW_CLOSING, FLOW_ESTABLISHED, FLOW_INSERT_LOCK, FLOW_SYN_SEEN,
    FLOW_WAYS, TAG_FREE, TAG_PENDING,
};

use crate::{
    atomic,
    maps::{FLOWS, FLOW_COUNT, FLOW_TAGS, SCRATCH},
    parse::PROTO_TCP,
    slots,
};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A way's position is `bucket * POS_STRIDE + way`.
const POS_STRIDE: u64 = 8;
const _: () = assert!(FLOW_WAYS as u64 <= POS_STRIDE);
/// Attempts at the insert lock before a SYN goes on without a flow (`Insert::Raced`).
const LOCK_TRIES: u32 = 512;

/// What a packet of a known flow does to it.
pub enum Hit {
    /// Forward to this backend, in this mode, counting the traffic for this service.
    Forward { backend_id: u32, service_id: u32, mode: u8 },
    /// A SYN reusing the tuple of a closing flow: the old flow is gone, admit anew.
    Reopen,
}

/// A flow found in the table: its entry, its way's tag word, the word as it was found, the
/// way's position (`bucket * POS_STRIDE + way`) and the flow's home bucket.
#[derive(Clone, Copy)]
pub struct Found {
    pub entry: *mut FlowEntry,
    tag: *mut u64,
    word: u64,
    pos: u64,
    home: u32,
}

impl Found {
    pub fn flow(&self) -> *mut Flow {
        // SAFETY: `entry` points into a FLOWS value.
        unsafe { addr_of_mut!((*self.entry).flow) }
    }

    pub fn generation(&self) -> u64 {
        tag_generation(self.word)
    }
}

/// The result of [`insert`].
pub enum Insert {
    /// Inserted: the flow holds `CONNS` slot accounting from now on.
    Done,
    /// Another CPU inserted the same flow at the same moment; follow that one.
    Exists(Found),
    /// Another CPU held the flow's home bucket's insert lock through every attempt (it is
    /// inserting a flow of the same home, perhaps this one); this packet holds no entry and
    /// no slot.
    Raced,
    /// The table holds `capacity` flows, or both of the flow's buckets are full.
    Full,
}

/// Gives the flow's slot back if it still holds one ([`slots::release`]).
#[inline(always)]
pub fn release(f: &Found) {
    slots::release(f.flow(), f.generation());
}

/// Frees the flow's way, if it still holds this flow (else someone else removed it first).
#[inline(always)]
pub fn remove(f: &Found) {
    // SAFETY: `tag` points into a FLOW_TAGS value; tag words are only changed atomically.
    if unsafe { atomic::cmpxchg(f.tag, f.word, tag_word(tag_generation(f.word), TAG_FREE)) } == f.word {
        count_sub();
        if f.pos / POS_STRIDE != u64::from(f.home) {
            overflow_sub(f.home);
        }
    }
}

#[inline(always)]
fn overflow_add(b: u32) {
    if let Some(tags) = FLOW_TAGS.get_ptr_mut(b) {
        // SAFETY: a FLOW_TAGS value; `overflow` is only changed atomically.
        unsafe { atomic::fetch_add(addr_of_mut!((*tags).overflow), 1) };
    }
}

#[inline(always)]
fn overflow_sub(b: u32) {
    if let Some(tags) = FLOW_TAGS.get_ptr_mut(b) {
        // SAFETY: as in overflow_add.
        unsafe { atomic::sub(addr_of_mut!((*tags).overflow), 1) };
    }
}

/// Whether some flow whose home is bucket `b` lives in its other bucket.
#[inline(always)]
fn overflowed(b: u32) -> bool {
    // SAFETY: a FLOW_TAGS value; an aligned 64-bit load is atomic.
    FLOW_TAGS.get_ptr_mut(b).is_some_and(|tags| unsafe { read_volatile(addr_of_mut!((*tags).overflow)) } & !FLOW_INSERT_LOCK != 0)
}

#[inline(always)]
fn count_sub() {
    if let Some(c) = FLOW_COUNT.get_ptr_mut(0) {
        // SAFETY: shared array value; `live` is only changed atomically.
        unsafe { atomic::sub(&raw mut (*c).live, 1) };
    }
}

#[inline(always)]
fn key_eq(a: *const FlowKey, b: &FlowKey) -> bool {
    let (a, b) = (a.cast::<u64>(), core::ptr::from_ref(b).cast::<u64>());
    // SAFETY: both are 8-aligned 40-byte keys (5 words); padding is always zero.
    unsafe { ((*a ^ *b) | (*a.add(1) ^ *b.add(1)) | (*a.add(2) ^ *b.add(2)) | (*a.add(3) ^ *b.add(3)) | (*a.add(4) ^ *b.add(4))) == 0 }
}

/// A way found or claimed, passed through per-CPU memory on purpose. The verifier knows
/// every constant, so a way index returned in a register would make each of the 14 places a
/// flow can be (two buckets × 7 ways) a separate path through the rest of the program, with
/// its own constant pointer offsets, and the program would exceed the verifier's budget. A
/// value loaded from a map is unknown to it: one path, with a bounded variable offset.
#[repr(C)]
pub struct WayCell {
    /// `bucket * POS_STRIDE + way`.
    pos: u64,
    /// The way's tag word as it was read or written.
    word: u64,
}

#[inline(always)]
fn cell() -> Option<*mut WayCell> {
    // SAFETY: this CPU's scratch slot; `way` is only used here, within one call.
    SCRATCH.get_ptr_mut(0).map(|s| unsafe { addr_of_mut!((*s).way) })
}

/// The way `pos` and tag word `word` (of a flow whose home is `home`) as the verifier-opaque
/// [`Found`].
#[inline(always)]
fn launder(pos: u64, word: u64, home: u32) -> Option<Found> {
    let c = cell()?;
    // SAFETY: `c` points into this CPU's scratch slot.
    let (pos, word) = unsafe {
        write_volatile(addr_of_mut!((*c).pos), pos);
        write_volatile(addr_of_mut!((*c).word), word);
        (read_volatile(addr_of_mut!((*c).pos)), read_volatile(addr_of_mut!((*c).word)))
    };
    let b = (pos / POS_STRIDE) as u32;
    let (bucket, tags) = (FLOWS.get_ptr_mut(b)?, FLOW_TAGS.get_ptr_mut(b)?);
    // A shift and a mask, which the verifier bounds (it does not bound a remainder by 7).
    let way = (pos % POS_STRIDE) as usize;
    if way >= FLOW_WAYS {
        return None;
    }
    // SAFETY: `bucket` is a FLOWS value and `way` < FLOW_WAYS.
    unsafe { Some(Found { entry: addr_of_mut!((*bucket).entries).cast::<FlowEntry>().add(way), tag: addr_of_mut!((*tags).words).cast::<u64>().add(way), word, pos, home }) }
}

/// The position of the way of bucket `b` holding `key`, and its tag word.
#[inline(always)]
fn find_in(b: u32, key: &FlowKey, fp: u32) -> Option<(u64, u64)> {
    let tags = FLOW_TAGS.get_ptr_mut(b)?;
    let mut way = 0;
    while way < FLOW_WAYS {
        // SAFETY: `tags` is a FLOW_TAGS value and `way` < FLOW_WAYS.
        let tag = unsafe { addr_of_mut!((*tags).words).cast::<u64>().add(way) };
        // SAFETY: as above; an aligned 64-bit load is atomic.
        let word = unsafe { read_volatile(tag) };
        let pos = u64::from(b) * POS_STRIDE + way as u64;
        if tag_low(word) == fp {
            let bucket = FLOWS.get_ptr_mut(b)?;
            // SAFETY: a FLOWS value and `way` < FLOW_WAYS.
            let entry = unsafe { addr_of_mut!((*bucket).entries).cast::<FlowEntry>().add(way) };
            // The key is read between two reads of the tag: if the way changed hands
            // meanwhile (freed and claimed by another flow), the match is not trusted.
            atomic::compiler_barrier();
            // SAFETY: as above.
            let same = key_eq(unsafe { addr_of_mut!((*entry).key) }, key);
            atomic::compiler_barrier();
            // SAFETY: as above.
            if same && unsafe { read_volatile(tag) } == word {
                return Some((pos, word));
            }
        }
        way += 1;
    }
    None
}

/// Starts reading the lines a new flow of hash `hash` will use: its home bucket's tags (which
/// the lookup reads next) and the entry it will most likely be written to (the bucket's first
/// free way is its first way in all but a busy bucket; an entry spans two lines). Nothing
/// waits for these loads, so their misses (random lines of big arrays: nearly always cache
/// and TLB misses) overlap instead of following each other.
#[inline(always)]
pub fn warm(hash: u32) {
    let (home, _) = flow_buckets(hash, config!(flow_buckets));
    let (Some(tags), Some(bucket)) = (FLOW_TAGS.get_ptr_mut(home), FLOWS.get_ptr_mut(home)) else { return };
    // SAFETY: values of FLOW_TAGS and FLOWS; the results are not used.
    unsafe {
        let entry = addr_of_mut!((*bucket).entries).cast::<FlowEntry>();
        let _ = read_volatile(addr_of_mut!((*tags).overflow));
        let _ = read_volatile(addr_of_mut!((*entry).key).cast::<u64>());
        let _ = read_volatile(addr_of_mut!((*entry).flow.created_ns));
    }
}

/// The flow of `key` (whose flow hash is `hash`), if it is in the table: in its home bucket,
/// or in its other bucket if flows of this home ever overflowed there.
#[inline(always)]
pub fn lookup(key: &FlowKey, hash: u32) -> Option<Found> {
    let (home, other) = flow_buckets(hash, config!(flow_buckets));
    let fp = flow_fingerprint(hash);
    let (pos, word) = match find_in(home, key, fp) {
        Some(f) => f,
        None if overflowed(home) => find_in(other, key, fp)?,
        None => return None,
    };
    launder(pos, word, home)
}

/// Claims a free way of bucket `b` for fingerprint `fp`: its tag goes from (g, FREE) to
/// (g+1, fp | PENDING). Returns the way's position and its new tag word.
#[inline(always)]
fn claim(b: u32, fp: u32) -> Option<(u64, u64)> {
    let tags = FLOW_TAGS.get_ptr_mut(b)?;
    let mut way = 0;
    while way < FLOW_WAYS {
        // SAFETY: `tags` is a FLOW_TAGS value and `way` < FLOW_WAYS.
        let tag = unsafe { addr_of_mut!((*tags).words).cast::<u64>().add(way) };
        // SAFETY: as above.
        let word = unsafe { read_volatile(tag) };
        if tag_low(word) == TAG_FREE {
            let pending = tag_word(next_generation(word), fp | TAG_PENDING);
            // SAFETY: as above.
            if unsafe { atomic::cmpxchg(tag, word, pending) } == word {
                return Some((u64::from(b) * POS_STRIDE + way as u64, pending));
            }
        }
        way += 1;
    }
    None
}

/// Takes bucket `b`'s insert lock (bit 63 of its overflow word), trying a bounded number of
/// times: the holder keeps it for a lookup, a compare-and-swap and the entry's stores.
#[inline(always)]
fn lock(b: u32) -> bool {
    let Some(tags) = FLOW_TAGS.get_ptr_mut(b) else { return false };
    // SAFETY: a FLOW_TAGS value; the overflow word is only changed atomically.
    let p = unsafe { addr_of_mut!((*tags).overflow) };
    let mut i = 0;
    while i < LOCK_TRIES {
        // SAFETY: as above.
        let w = unsafe { read_volatile(p) };
        // SAFETY: as above.
        if w & FLOW_INSERT_LOCK == 0 && unsafe { atomic::cmpxchg(p, w, w | FLOW_INSERT_LOCK) } == w {
            return true;
        }
        i += 1;
    }
    false
}

/// Releases bucket `b`'s insert lock with a plain load and store: an atomic here would wait
/// for the entry's stores (often cache misses) to complete; x86 makes the release visible after
/// them anyway. Only the holder raises the overflow count, so the one thing that can be lost
/// is a decrement by a concurrent remove, which leaves the count too high: harmless (a lookup
/// that misses also reads the other bucket), never too low.
#[inline(always)]
fn unlock(b: u32) {
    if let Some(tags) = FLOW_TAGS.get_ptr_mut(b) {
        // SAFETY: as in `lock`.
        unsafe {
            let p = addr_of_mut!((*tags).overflow);
            atomic::compiler_barrier();
            write_volatile(p, read_volatile(p) & !FLOW_INSERT_LOCK);
        }
    }
}

/// Inserts the flow `key` → `flow` after a lookup missed. `flow.counted` is set here (to the
/// way's generation) when `holds_slot`. Exact under races: the table's count is taken first
/// and rolled back over capacity. Then, under the home bucket's insert lock (every insert of
/// this flow takes the same one, and holds it until the entry is published), the flow is
/// looked up again: one inserted meanwhile by another CPU is followed (`Exists`). Otherwise a
/// way is claimed by compare-and-swap (PENDING: other CPUs' lookups and the daemon skip it)
/// in the home bucket or, its overflow count raised first, the other one; the entry is
/// written and published by a plain store. (Releasing the lock right after the claim let two
/// CPUs sending the same SYNs in lockstep each insert the flow, `tests/tests/flow_table.rs`.)
#[inline(always)]
pub fn insert(key: &FlowKey, hash: u32, flow: &Flow, holds_slot: bool) -> Insert {
    let Some(count) = FLOW_COUNT.get_ptr_mut(0) else { return Insert::Full };
    let capacity = u64::from(config!(flow_capacity));
    // A plain read first: a flood against a full table should not bounce this shared line
    // between CPUs with atomic adds.
    // SAFETY: shared array value; `live` is only changed atomically.
    if unsafe { read_volatile(&raw const (*count).live) } >= capacity {
        return Insert::Full;
    }
    // SAFETY: as above.
    if unsafe { atomic::fetch_add(&raw mut (*count).live, 1) } >= capacity {
        count_sub();
        return Insert::Full;
    }
    let (home, other) = flow_buckets(hash, config!(flow_buckets));
    let fp = flow_fingerprint(hash);
    if !lock(home) {
        count_sub();
        return Insert::Raced;
    }
    if let Some(twin) = lookup(key, hash) {
        unlock(home);
        count_sub();
        return Insert::Exists(twin);
    }
    let claimed = match claim(home, fp) {
        Some(c) => Some(c),
        None => {
            // Raised before the claim, so no lookup misses the flow once it is published.
            overflow_add(home);
            let c = claim(other, fp);
            if c.is_none() {
                overflow_sub(home);
            }
            c
        }
    };
    let Some(ours) = claimed.and_then(|(pos, word)| launder(pos, word, home)) else {
        unlock(home);
        count_sub();
        return Insert::Full;
    };
    let gen = ours.generation();
    let entry = ours.entry;
    // SAFETY: the way is ours (PENDING) until published. Word copies: a struct assignment
    // compiles to a byte-wise memcpy call.
    unsafe {
        let (dst, src) = (addr_of_mut!((*entry).key).cast::<u64>(), core::ptr::from_ref(key).cast::<u64>());
        *dst = *src;
        *dst.add(1) = *src.add(1);
        *dst.add(2) = *src.add(2);
        *dst.add(3) = *src.add(3);
        *dst.add(4) = *src.add(4);
        let f = addr_of_mut!((*entry).flow);
        (*f).backend_id = flow.backend_id;
        (*f).service_id = flow.service_id;
        (*f).counted = if holds_slot { gen } else { 0 };
        (*f).state = flow.state;
        (*f).adopted = flow.adopted;
        (*f).mode = flow.mode;
        (*f).last_seen_ns = flow.last_seen_ns;
        (*f).created_ns = flow.created_ns;
        // The entry is complete before the tag says so: the compiler may not sink the stores
        // above past this point, and x86 does not reorder stores with stores.
        atomic::compiler_barrier();
        write_volatile(ours.tag, tag_word(gen, fp));
    }
    unlock(home);
    Insert::Done
}

/// Looks the flow up and applies this packet's TCP flags to it.
#[inline(always)]
pub fn on_packet(key: &FlowKey, hash: u32, tcp_flags: u8, now: u64) -> Option<Hit> {
    let found = lookup(key, hash)?;
    Some(apply(&found, key.proto, tcp_flags, now))
}

/// Applies a packet to a flow found in the table.
#[inline(always)]
pub fn apply(found: &Found, proto: u8, tcp_flags: u8, now: u64) -> Hit {
    // SAFETY: a FLOWS value pointer; racing writers (other CPUs) only write these same
    // plain fields, and slot accounting goes through `release`'s compare-and-swap.
    let f = unsafe { &mut *found.flow() };
    let hit = Hit::Forward { backend_id: f.backend_id, service_id: f.service_id, mode: f.mode };
    f.last_seen_ns = now;
    if proto != PROTO_TCP {
        return hit;
    }
    if tcp_flags & TCP_RST != 0 {
        release(found);
        remove(found);
    } else if tcp_flags & TCP_SYN != 0 && tcp_flags & TCP_ACK == 0 && f.state == FLOW_CLOSING {
        // The client reuses the tuple for a new connection: it must pass admission again.
        release(found);
        remove(found);
        return Hit::Reopen;
    } else if tcp_flags & TCP_FIN != 0 {
        f.state = FLOW_CLOSING;
        release(found);
    } else if f.state == FLOW_SYN_SEEN && tcp_flags & (TCP_ACK | TCP_SYN) == TCP_ACK {
        f.state = FLOW_ESTABLISHED;
    }
    hit
}
