//! A connection slot on a backend (`CONNS`): taken, given back and released here, nowhere
//! else. Admission takes one exactly under the backend's limit ([`take`]); adoption takes one
//! without looking at the limit ([`take_unlimited`]): an established connection is never
//! broken to enforce a limit. The flow that holds a slot carries its way's generation in
//! `Flow::counted`, and [`release`] gives it back exactly once (FIN, RST, a reused tuple; GC
//! does the same from userspace). A packet that took a slot but enters no flow gives it back at
//! once ([`give_back`]).

use lb_common::{at_limit_reason, limit_admits, state_admits, Flow, Reason};

use crate::{
    atomic,
    maps::{BACKENDS, CONNS},
};

/// `backend_id`'s open-connection counter and limit if it is active and, by a plain read,
/// below its limit. The plain read lets a backend at its limit refuse without a lock-prefixed
/// add, which would bounce the counter's line between CPUs under a SYN flood and wait for
/// every load still in flight (the flow table lines `flow::warm` started).
#[inline(always)]
fn room(backend_id: u32) -> Result<(*mut u64, u64), Reason> {
    let Some(b) = BACKENDS.get(backend_id) else { return Err(Reason::NoBackend) };
    // The decision is lb_common's model (what `sluice explain` shows): state, then limit.
    state_admits(b.state)?;
    let Some(c) = CONNS.get_ptr_mut(backend_id) else { return Err(Reason::NoBackend) };
    // SAFETY: shared array value; `open` is only changed atomically.
    let open = unsafe { &raw mut (*c).open };
    // SAFETY: as above; an aligned 64-bit load is atomic.
    limit_admits(b, unsafe { core::ptr::read_volatile(open) })?;
    Ok((open, u64::from(b.max_conns)))
}

/// Whether `backend_id` is active and below its limit right now (a hint: [`take`] decides).
#[inline(always)]
pub fn has_room(backend_id: u32) -> bool {
    room(backend_id).is_ok()
}

/// Takes a slot on `backend_id` if it is active and under its limit. The add decides and is
/// rolled back when over the limit, so concurrent CPUs can never overshoot: each sees a
/// distinct previous value, and only those that saw one below the limit keep their slot.
#[inline(always)]
pub fn take(backend_id: u32) -> Result<(), Reason> {
    let (open, limit) = room(backend_id)?;
    // SAFETY: `open` points into a CONNS value; it is only changed atomically.
    if unsafe { atomic::fetch_add(open, 1) } >= limit {
        give_back(backend_id);
        // Looked up again rather than carried from `room`: returned beside the counter's
        // pointer, the reason was packed into the pointer's register, which the verifier refuses.
        return Err(BACKENDS.get(backend_id).map_or(Reason::BackendLimit, |b| at_limit_reason(b.at_limit)));
    }
    Ok(())
}

/// Takes a slot on `backend_id` whatever its limit (adoption of an established connection).
#[inline(always)]
pub fn take_unlimited(backend_id: u32) {
    if let Some(c) = CONNS.get_ptr_mut(backend_id) {
        // SAFETY: the value lives in a shared array; only atomic operations touch `open`.
        unsafe { atomic::fetch_add(&raw mut (*c).open, 1) };
    }
}

/// Gives back a slot this packet took and no flow holds.
#[inline(always)]
pub fn give_back(backend_id: u32) {
    if let Some(c) = CONNS.get_ptr_mut(backend_id) {
        // SAFETY: as in `take_unlimited`.
        unsafe { atomic::sub(&raw mut (*c).open, 1) };
    }
}

/// Gives back the slot the flow at `flow` holds, if it still holds one for `generation` (its
/// way's generation when it was found). The compare-and-swap makes this exactly-once even when
/// FIN, RST and GC race on different CPUs, and a no-op for a view of a way reused since.
#[inline(always)]
pub fn release(flow: *mut Flow, generation: u64) {
    // Read first: once `counted` is 0 the way may be freed and reused by another flow. A
    // successful exchange proves the way still held this generation when it was read.
    // SAFETY: `flow` points into a FLOWS value; backend_id is written before publishing.
    let backend_id = unsafe { core::ptr::read_volatile(&raw const (*flow).backend_id) };
    // SAFETY: as above; `counted` is only changed atomically.
    if unsafe { atomic::cmpxchg(&raw mut (*flow).counted, generation, 0) } == generation {
        give_back(backend_id);
    }
}
