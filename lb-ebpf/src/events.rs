//! Refusal events to userspace, rate-limited by a per-CPU token bucket so that a flood of
//! refusals costs userspace at most `events_per_sec` events per CPU per second.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{Reason, RefusalEvent, FAMILY_V4, FAMILY_V6};

use crate::{
    maps::{EVENTS, EVENT_BUCKET},
    parse::Packet,
};

/// One token, in nanotokens: the bucket refills `events_per_sec` tokens per 1e9 ns, so it
/// gains `events_per_sec` nanotokens per ns. Burst: one second's worth.
const TOKEN: u64 = 1_000_000_000;

/// Not inlined: the event is written straight into the ring buffer, in its own stack frame.
#[inline(never)]
pub fn refusal(pkt: &Packet, reason: Reason, service_id: u32, backend_id: u32, per_sec: u32) {
    let Some(bucket) = EVENT_BUCKET.get_ptr_mut(0) else { return };
    // SAFETY: per-CPU slot, only this CPU touches it while the program runs.
    let bucket = unsafe { &mut *bucket };
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let cap = u64::from(per_sec) * TOKEN;
    let elapsed = now.saturating_sub(bucket.last_ns).min(TOKEN);
    bucket.tokens = (bucket.tokens + elapsed * u64::from(per_sec)).min(cap);
    bucket.last_ns = now;
    if bucket.tokens < TOKEN {
        bucket.suppressed += 1;
        return;
    }
    bucket.tokens -= TOKEN;
    let Some(mut entry) = EVENTS.reserve(0) else {
        bucket.suppressed += 1;
        return;
    };
    entry.write(RefusalEvent {
        ts_ns: now,
        src: pkt.src,
        dst: pkt.dst,
        sport_be: pkt.sport_be,
        dport_be: pkt.dport_be,
        proto: pkt.proto,
        family: if pkt.is_v6 { FAMILY_V6 } else { FAMILY_V4 },
        reason: reason as u8,
        _pad: 0,
        service_id,
        backend_id,
    });
    entry.submit(0);
}
