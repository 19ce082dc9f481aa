//! Admission of a new flow: the Maglev ring's choice, a slot under the backend's exact
//! connection limit (`slots`), and the service's spill policy.

use lb_common::{probe_slot, Reason, Service, MAX_PROBES, MAX_SPILL};

use crate::{maps::RINGS, slots};

/// The backend in ring slot `i` of the flow's probe sequence (0 = none).
#[inline(always)]
pub fn ring_pick(svc: &Service, hash: u32, i: u32) -> u32 {
    if svc.ring_size == 0 {
        return 0;
    }
    let slot = svc.ring_base + probe_slot(hash, i, svc.ring_size);
    RINGS.get(slot).copied().unwrap_or(0)
}

/// Whether the flow's first choice is active and below its limit right now (a hint: `admit`
/// decides).
#[inline(always)]
pub fn has_room(svc: &Service, hash: u32) -> bool {
    slots::has_room(ring_pick(svc, hash, 0))
}

/// Admits a new flow: `Ok(backend)` holding one slot on it, or `Err((reason, backend))`
/// naming the backend the refusal is charged to (the first choice; 0 if none).
///
/// A spill that finds every candidate full is `service_saturated`, unless one of them refused
/// only for lack of this node's share of a cluster-wide limit: then more share would have
/// admitted it, and it is `share_exhausted`, the demand the allocator grants share for. (As
/// `service_saturated` it was no demand, and a cluster whose shares were all 0 stayed so.)
#[inline(always)]
pub fn admit(svc: &Service, hash: u32) -> Result<u32, (Reason, u32)> {
    let first = ring_pick(svc, hash, 0);
    if first == 0 {
        return Err((Reason::NoBackend, 0));
    }
    let first_reason = match slots::take(first) {
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
    let mut share_short = first_reason == Reason::ShareExhausted;
    let mut n = 1usize;
    let mut i = 1;
    while i < MAX_PROBES {
        let b = ring_pick(svc, hash, i);
        i += 1;
        if b == 0 || b == tried[0] || b == tried[1] || b == tried[2] || b == tried[3] {
            continue;
        }
        match slots::take(b) {
            Ok(()) => return Ok(b),
            Err(r) => share_short |= r == Reason::ShareExhausted,
        }
        if n < tried.len() {
            tried[n] = b;
        }
        n += 1;
        if n > spill as usize {
            break;
        }
    }
    Err((if share_short { Reason::ShareExhausted } else { Reason::ServiceSaturated }, first))
}
