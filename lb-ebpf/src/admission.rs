//! Admission of a new flow: the Maglev ring's choice, the backend's state and its exact
//! connection limit, and the service's spill policy.

use lb_common::{probe_slot, Reason, Service, AT_LIMIT_SHARE, BACKEND_ACTIVE, BACKEND_DRAINING, MAX_PROBES, MAX_SPILL};

use crate::{
    atomic,
    flow::conns_sub,
    maps::{BACKENDS, CONNS, RINGS},
};

/// The backend in ring slot `i` of the flow's probe sequence (0 = none).
#[inline(always)]
pub fn ring_pick(svc: &Service, hash: u32, i: u32) -> u32 {
    if svc.ring_size == 0 {
        return 0;
    }
    let slot = svc.ring_base + probe_slot(hash, i, svc.ring_size);
    RINGS.get(slot).copied().unwrap_or(0)
}

/// Why a backend at its limit refuses: its own limit, or this node's share of a cluster-wide one.
#[inline(always)]
fn at_limit(at_limit: u8) -> Reason {
    if at_limit == AT_LIMIT_SHARE {
        Reason::ShareExhausted
    } else {
        Reason::BackendLimit
    }
}

/// `backend_id`'s open-connection counter and limit if it is active and, by a plain read,
/// below its limit. The plain read lets a backend at its limit refuse without a lock-prefixed
/// add, which would bounce the counter's line between CPUs under a SYN flood and wait for
/// every load still in flight (the flow table lines `flow::warm` started).
#[inline(always)]
fn room(backend_id: u32) -> Result<(*mut u64, u64), Reason> {
    let Some(b) = BACKENDS.get(backend_id) else { return Err(Reason::NoBackend) };
    if b.state != BACKEND_ACTIVE {
        return Err(if b.state == BACKEND_DRAINING { Reason::BackendDraining } else { Reason::BackendDown });
    }
    let limit = u64::from(b.max_conns);
    let Some(c) = CONNS.get_ptr_mut(backend_id) else { return Err(Reason::NoBackend) };
    // SAFETY: shared array value; `open` is only changed atomically.
    let open = unsafe { &raw mut (*c).open };
    // SAFETY: as above; an aligned 64-bit load is atomic.
    if unsafe { core::ptr::read_volatile(open) } >= limit {
        return Err(at_limit(b.at_limit));
    }
    Ok((open, limit))
}

/// Takes a slot on `backend_id` if it is active and under its limit. The add decides and is
/// rolled back when over the limit, so concurrent CPUs can never overshoot: each sees a
/// distinct previous value, and only those that saw one below the limit keep their slot.
#[inline(always)]
fn try_take(backend_id: u32) -> Result<(), Reason> {
    let (open, limit) = room(backend_id)?;
    // SAFETY: `open` points into a CONNS value; it is only changed atomically.
    if unsafe { atomic::fetch_add(open, 1) } >= limit {
        conns_sub(backend_id);
        // Looked up again rather than carried from `room`: returned beside the counter's
        // pointer, the reason was packed into the pointer's register, which the verifier refuses.
        return Err(BACKENDS.get(backend_id).map_or(Reason::BackendLimit, |b| at_limit(b.at_limit)));
    }
    Ok(())
}

/// Whether the flow's first choice is active and below its limit right now (a hint: `admit`
/// decides).
#[inline(always)]
pub fn has_room(svc: &Service, hash: u32) -> bool {
    room(ring_pick(svc, hash, 0)).is_ok()
}

/// Admits a new flow: `Ok(backend)` holding one slot on it, or `Err((reason, backend))`
/// naming the backend the refusal is charged to (the first choice; 0 if none).
#[inline(always)]
pub fn admit(svc: &Service, hash: u32) -> Result<u32, (Reason, u32)> {
    let first = ring_pick(svc, hash, 0);
    if first == 0 {
        return Err((Reason::NoBackend, 0));
    }
    let first_reason = match try_take(first) {
        Ok(()) => return Ok(first),
        Err(r) => r,
    };
    let spill = u32::from(svc.spill).min(MAX_SPILL);
    if spill == 0 {
        return Err((first_reason, first));
    }
    // Spill: the next distinct backends of this flow's probe sequence, at most `spill` of
    // them, within MAX_PROBES ring positions.
    let mut tried = [first, 0, 0, 0];
    let mut n = 1usize;
    let mut i = 1;
    while i < MAX_PROBES {
        let b = ring_pick(svc, hash, i);
        i += 1;
        if b == 0 || b == tried[0] || b == tried[1] || b == tried[2] || b == tried[3] {
            continue;
        }
        if try_take(b).is_ok() {
            return Ok(b);
        }
        if n < tried.len() {
            tried[n] = b;
        }
        n += 1;
        if n > spill as usize {
            break;
        }
    }
    Err((Reason::ServiceSaturated, first))
}
