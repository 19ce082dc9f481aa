//! The flow table: lookups, inserts, TCP state transitions, and giving a connection slot back
//! exactly once.
//!
//! `FLOWS` is an array of buckets (`lb_common::FlowBucket`) searched here with inlined loads:
//! on this kind of machine each kernel hash-map operation is a chain of calls, each paying a
//! return thunk (SRSO), and a new flow used to cost a lookup and an insert of those. A way
//! changes hands only by compare-and-swap on its 64-bit tag word (generation | fingerprint),
//! which is what makes concurrent inserts, FIN/RST on other CPUs and the daemon's GC safe.

use core::ptr::{addr_of_mut, read_volatile, write_volatile};

use lb_common::{
    flow_buckets, flow_fingerprint, Flow, FlowEntry, FlowKey, FLOW_CLOSING, FLOW_ESTABLISHED, FLOW_SYN_SEEN,
    FLOW_WAYS, TAG_FREE, TAG_PENDING,
};

use crate::{
    atomic,
    maps::{CONNS, FLOWS, FLOW_COUNT, FLOW_TAGS, SCRATCH},
    parse::PROTO_TCP,
};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const LOW: u64 = 0xFFFF_FFFF;
/// A way's position is `bucket * POS_STRIDE + way`.
const POS_STRIDE: u64 = 8;
const _: () = assert!(FLOW_WAYS as u64 <= POS_STRIDE);

/// What a packet of a known flow does to it.
pub enum Hit {
    /// Forward to this backend.
    Forward { backend_id: u32 },
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

    fn generation(&self) -> u64 {
        self.word >> 32
    }
}

/// The result of [`insert`].
pub enum Insert {
    /// Inserted: the flow holds `CONNS` slot accounting from now on.
    Done,
    /// Another CPU inserted the same flow at the same moment; follow that one.
    Exists(Found),
    /// Another CPU is inserting a flow with the same fingerprint (this flow, almost surely)
    /// at this moment; this packet holds no entry and no slot.
    Raced,
    /// The table holds `capacity` flows, or both of the flow's buckets are full.
    Full,
}

/// Takes one open-connection slot on `backend_id` without looking at the limit (adoption).
#[inline(always)]
pub fn conns_add(backend_id: u32) -> u64 {
    match CONNS.get_ptr_mut(backend_id) {
        // SAFETY: the value lives in a shared array; only atomic operations touch `open`.
        Some(c) => unsafe { atomic::fetch_add(&raw mut (*c).open, 1) },
        None => 0,
    }
}

#[inline(always)]
pub fn conns_sub(backend_id: u32) {
    if let Some(c) = CONNS.get_ptr_mut(backend_id) {
        // SAFETY: as in conns_add.
        unsafe { atomic::sub(&raw mut (*c).open, 1) };
    }
}

/// Gives the flow's slot back if it still holds one. The compare-and-swap from the way's
/// generation makes this exactly-once even when FIN, RST and GC race on different CPUs, and a
/// no-op for a view of a way that has been reused since.
#[inline(always)]
pub fn release(f: &Found) {
    let flow = f.flow();
    let gen = f.generation();
    // SAFETY: `flow` points into a FLOWS value; `counted` is only changed atomically.
    if unsafe { atomic::cmpxchg(&raw mut (*flow).counted, gen, 0) } == gen {
        // SAFETY: as above; backend_id is written before the way is published.
        conns_sub(unsafe { (*flow).backend_id });
    }
}

/// Frees the flow's way, if it still holds this flow (else someone else removed it first).
#[inline(always)]
pub fn remove(f: &Found) {
    // SAFETY: `tag` points into a FLOWS value; tag words are only changed atomically.
    if unsafe { atomic::cmpxchg(f.tag, f.word, f.word & !LOW) } == f.word {
        count_sub();
        if f.pos / POS_STRIDE != u64::from(f.home) {
            overflow_add(f.home, u64::MAX);
        }
    }
}

/// Adds `v` (wrapping: `u64::MAX` subtracts one) to bucket `b`'s overflow count.
#[inline(always)]
fn overflow_add(b: u32, v: u64) {
    if let Some(tags) = FLOW_TAGS.get_ptr_mut(b) {
        // SAFETY: a FLOW_TAGS value; `overflow` is only changed atomically.
        unsafe { atomic::sub(addr_of_mut!((*tags).overflow), v.wrapping_neg()) };
    }
}

/// Whether some flow whose home is bucket `b` lives in its other bucket.
#[inline(always)]
fn overflowed(b: u32) -> bool {
    // SAFETY: a FLOW_TAGS value; an aligned 64-bit load is atomic.
    FLOW_TAGS.get_ptr_mut(b).is_some_and(|tags| unsafe { read_volatile(addr_of_mut!((*tags).overflow)) } != 0)
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
    unsafe {
        ((*a ^ *b) | (*a.add(1) ^ *b.add(1)) | (*a.add(2) ^ *b.add(2)) | (*a.add(3) ^ *b.add(3)) | (*a.add(4) ^ *b.add(4)))
            == 0
    }
}

/// A way found or claimed, passed through per-CPU memory on purpose. The verifier knows
/// every constant, so a way index returned in a register would make each of the 16 places a
/// flow can be (two buckets × 8 ways) a separate path through the rest of the program, with
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
    unsafe {
        Some(Found {
            entry: addr_of_mut!((*bucket).entries).cast::<FlowEntry>().add(way),
            tag: addr_of_mut!((*tags).words).cast::<u64>().add(way),
            word,
            pos,
            home,
        })
    }
}

/// The position of the way of bucket `b` holding `key`, other than `skip`, and its tag word.
#[inline(always)]
fn find_in(b: u32, key: &FlowKey, fp: u32, skip: u64) -> Option<(u64, u64)> {
    let tags = FLOW_TAGS.get_ptr_mut(b)?;
    let mut way = 0;
    while way < FLOW_WAYS {
        // SAFETY: `tags` is a FLOW_TAGS value and `way` < FLOW_WAYS.
        let tag = unsafe { addr_of_mut!((*tags).words).cast::<u64>().add(way) };
        // SAFETY: as above; an aligned 64-bit load is atomic.
        let word = unsafe { read_volatile(tag) };
        let pos = u64::from(b) * POS_STRIDE + way as u64;
        if word & LOW == u64::from(fp) && pos != skip {
            let bucket = FLOWS.get_ptr_mut(b)?;
            // SAFETY: a FLOWS value and `way` < FLOW_WAYS.
            let entry = unsafe { addr_of_mut!((*bucket).entries).cast::<FlowEntry>().add(way) };
            // The key is read between two reads of the tag: if the way changed hands
            // meanwhile (freed and claimed by another flow), the match is not trusted.
            // SAFETY: as above.
            if key_eq(unsafe { addr_of_mut!((*entry).key) }, key) && unsafe { read_volatile(tag) } == word {
                return Some((pos, word));
            }
        }
        way += 1;
    }
    None
}

/// The way of `key` in its home bucket, or in its other bucket if the home ever overflowed;
/// other than `skip`.
#[inline(always)]
fn find(key: &FlowKey, hash: u32, skip: u64) -> Option<Found> {
    let (home, other) = flow_buckets(hash, config!(flow_buckets));
    let fp = flow_fingerprint(hash);
    let (pos, word) = match find_in(home, key, fp, skip) {
        Some(f) => f,
        None if overflowed(home) => find_in(other, key, fp, skip)?,
        None => return None,
    };
    launder(pos, word, home)
}

/// The flow of `key` (whose flow hash is `hash`), if it is in the table.
#[inline(always)]
pub fn lookup(key: &FlowKey, hash: u32) -> Option<Found> {
    find(key, hash, u64::MAX)
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
        if word & LOW == u64::from(TAG_FREE) {
            // Generation 0 is reserved: `counted == 0` means "holds no slot".
            let gen = match (word >> 32).wrapping_add(1) & LOW {
                0 => 1,
                g => g,
            };
            let pending = gen << 32 | u64::from(fp | TAG_PENDING);
            // SAFETY: as above.
            if unsafe { atomic::cmpxchg(tag, word, pending) } == word {
                return Some((u64::from(b) * POS_STRIDE + way as u64, pending));
            }
        }
        way += 1;
    }
    None
}

/// Whether bucket `b` has a way other than `skip` claimed for fingerprint `fp` and not yet
/// published (its key may not be written yet).
#[inline(always)]
fn pending_in(b: u32, fp: u32, skip: u64) -> bool {
    let Some(tags) = FLOW_TAGS.get_ptr_mut(b) else { return false };
    let mut way = 0;
    while way < FLOW_WAYS {
        // SAFETY: `tags` is a FLOW_TAGS value and `way` < FLOW_WAYS.
        let word = unsafe { read_volatile(addr_of_mut!((*tags).words).cast::<u64>().add(way)) };
        if word & LOW == u64::from(fp | TAG_PENDING) && u64::from(b) * POS_STRIDE + way as u64 != skip {
            return true;
        }
        way += 1;
    }
    false
}

/// Inserts the flow `key` → `flow` after a lookup missed. `flow.counted` is set here (to the
/// way's generation) when `holds_slot`. Exact under races: the table's count is taken first
/// and rolled back over capacity; a way is claimed by compare-and-swap, marked with the
/// flow's fingerprint, in the home bucket or (its overflow count raised first) the other; and
/// right after the claim (a full barrier) the flow's buckets are searched for another claim
/// or entry of the same flow, so of two CPUs inserting one flow at once at least one sees the
/// other and backs off. The entry is then written and published by a plain store: no barrier
/// waits for its cache lines.
#[inline(always)]
pub fn insert(key: &FlowKey, hash: u32, flow: &Flow, holds_slot: bool) -> Insert {
    let Some(count) = FLOW_COUNT.get_ptr_mut(0) else { return Insert::Full };
    // SAFETY: shared array value; `live` is only changed atomically.
    if unsafe { atomic::fetch_add(&raw mut (*count).live, 1) } >= u64::from(config!(flow_capacity)) {
        count_sub();
        return Insert::Full;
    }
    let (home, other) = flow_buckets(hash, config!(flow_buckets));
    let fp = flow_fingerprint(hash);
    let claimed = match claim(home, fp) {
        Some(c) => Some(c),
        None => {
            // Raised before the claim, so no lookup misses the flow once it is published.
            overflow_add(home, 1);
            let c = claim(other, fp);
            if c.is_none() {
                overflow_add(home, u64::MAX);
            }
            c
        }
    };
    let Some(ours) = claimed.and_then(|(pos, word)| launder(pos, word, home)) else {
        count_sub();
        return Insert::Full;
    };
    if let Some(twin) = find(key, hash, ours.pos) {
        remove(&ours);
        return Insert::Exists(twin);
    }
    if pending_in(home, fp, ours.pos) || (overflowed(home) && pending_in(other, fp, ours.pos)) {
        remove(&ours);
        return Insert::Raced;
    }
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
        (*f).last_seen_ns = flow.last_seen_ns;
        (*f).created_ns = flow.created_ns;
        // Stores are not reordered with older stores on x86 (the JIT adds no fence): the
        // entry is complete before the tag says so.
        write_volatile(ours.tag, gen << 32 | u64::from(fp));
    }
    Insert::Done
}

/// Looks the flow up and applies this packet's TCP flags to it.
#[inline(always)]
pub fn on_packet(key: &FlowKey, hash: u32, tcp_flags: u8, now: u64) -> Option<Hit> {
    let found = lookup(key, hash)?;
    apply(&found, key.proto, tcp_flags, now)
}

/// Applies a packet to a flow found in the table.
#[inline(always)]
pub fn apply(found: &Found, proto: u8, tcp_flags: u8, now: u64) -> Option<Hit> {
    // SAFETY: a FLOWS value pointer; racing writers (other CPUs) only write these same
    // plain fields, and slot accounting goes through `release`'s compare-and-swap.
    let f = unsafe { &mut *found.flow() };
    let hit = Hit::Forward { backend_id: f.backend_id };
    f.last_seen_ns = now;
    if proto != PROTO_TCP {
        return Some(hit);
    }
    if tcp_flags & TCP_RST != 0 {
        release(found);
        remove(found);
    } else if tcp_flags & TCP_SYN != 0 && tcp_flags & TCP_ACK == 0 && f.state == FLOW_CLOSING {
        // The client reuses the tuple for a new connection: it must pass admission again.
        release(found);
        remove(found);
        return Some(Hit::Reopen);
    } else if tcp_flags & TCP_FIN != 0 {
        f.state = FLOW_CLOSING;
        release(found);
    } else if f.state == FLOW_SYN_SEEN && tcp_flags & (TCP_ACK | TCP_SYN) == TCP_ACK {
        f.state = FLOW_ESTABLISHED;
    }
    Some(hit)
}
