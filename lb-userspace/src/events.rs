//! Refusal events: drained from the datapath's `EVENTS` ring buffer every second, named
//! (service, backend, reason, wall-clock time) and kept in a bounded in-memory window that
//! `sluice events [--follow]` reads through the API by sequence number.

use std::borrow::Cow;
use std::{
    collections::VecDeque,
    net::{IpAddr, SocketAddr},
    time::{Duration, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use lb_common::{user::ip_from, Proto, Reason, RefusalEvent};
use serde::Serialize;

use crate::reconcile::Applied;

/// Events kept for `sluice events` (the newest win).
pub const WINDOW: usize = 10_000;

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Event {
    pub seq: u64,
    /// RFC 3339, UTC.
    pub time: String,
    pub client: SocketAddr,
    pub vip: SocketAddr,
    pub proto: Cow<'static, str>,
    pub service: String,
    pub backend: Option<IpAddr>,
    pub reason: Cow<'static, str>,
}

pub struct Events {
    ring: RingBuf<MapData>,
    window: VecDeque<Event>,
    next_seq: u64,
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Events {
    pub fn new(ring: RingBuf<MapData>) -> Self {
        Self { ring, window: VecDeque::new(), next_seq: 1 }
    }

    /// A second descriptor of the ring buffer that becomes readable when the datapath queues an
    /// event: the daemon waits on it to evaluate alerts at once instead of at the next tick.
    pub fn wakeup_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        std::os::fd::AsFd::as_fd(&self.ring).try_clone_to_owned()
    }

    /// Moves what the datapath queued into the window, naming services and backends.
    pub fn drain(&mut self, applied: &Applied) -> usize {
        let (mono, wall) = (monotonic_ns(), SystemTime::now());
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            if item.len() < size_of::<RefusalEvent>() {
                continue;
            }
            // SAFETY: the datapath writes whole RefusalEvent records.
            let ev: RefusalEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            drop(item);
            let service = applied.services.values().find(|s| s.id == ev.service_id);
            let backend = service.and_then(|s| s.backends.values().find(|b| b.id == ev.backend_id)).map(|b| b.address);
            let when = wall.checked_sub(Duration::from_nanos(mono.saturating_sub(ev.ts_ns))).unwrap_or(wall);
            self.window.push_back(Event {
                seq: self.next_seq,
                time: humantime::format_rfc3339_millis(when).to_string(),
                client: SocketAddr::new(ip_from(&ev.src, ev.family), u16::from_be_bytes(ev.sport_be)),
                vip: SocketAddr::new(ip_from(&ev.dst, ev.family), u16::from_be_bytes(ev.dport_be)),
                proto: Proto::from_u8(ev.proto).map_or("unknown", Proto::name).into(),
                service: service.map_or_else(|| format!("#{}", ev.service_id), |s| s.name.clone()),
                backend,
                reason: Reason::from_u8(ev.reason).map_or("unknown", Reason::name).into(),
            });
            self.next_seq += 1;
            n += 1;
            if self.window.len() > WINDOW {
                self.window.pop_front();
            }
        }
        n
    }

    /// Events with a sequence number above `after`, oldest first, at most `limit`.
    pub fn after(&self, after: u64, limit: usize) -> Vec<Event> {
        self.window.iter().filter(|e| e.seq > after).take(limit).cloned().collect()
    }

    /// The last `n` events, oldest first.
    pub fn last(&self, n: usize) -> Vec<Event> {
        self.window.iter().skip(self.window.len().saturating_sub(n)).cloned().collect()
    }
}
