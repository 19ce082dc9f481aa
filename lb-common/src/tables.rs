//! Keys and values of the service, backend and connection maps, and the refusal events.

use crate::Reason;

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

named_u8! {
    /// How a service's packets reach a backend ([`Service::mode`], [`Flow::mode`](crate::Flow::mode)).
    Mode {
        L2dsr = 0, "l2dsr", MODE_L2DSR;
        Ipip = 1, "ipip", MODE_IPIP;
    }
}

named_u8! {
    /// How a refused TCP connection is answered ([`Service::reject`]; UDP is always dropped).
    Reject {
        Drop = 0, "drop", REJECT_DROP;
        Rst = 1, "rst", REJECT_RST;
    }
}

/// A service's mode when its config names none.
impl Default for Mode {
    fn default() -> Self {
        Self::L2dsr
    }
}

/// A refusal's answer when the config names none: a reset, so a client fails at once.
impl Default for Reject {
    fn default() -> Self {
        Self::Rst
    }
}

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

named_u8! {
    /// A backend's state ([`Backend::state`]).
    BackendState {
        /// In its service's ring: takes new flows.
        Active = 1, "active", BACKEND_ACTIVE;
        /// No new flows; open ones continue.
        Draining = 2, "draining", BACKEND_DRAINING;
        /// Failed its health checks: out of the ring, open flows continue.
        Down = 3, "down", BACKEND_DOWN;
    }
}

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

/// What a refusal at a backend's limit counts as: its own limit, or this node's share of a
/// cluster-wide one ([`Backend::at_limit`]).
#[inline(always)]
pub fn at_limit_reason(at_limit: u8) -> Reason {
    if at_limit == AT_LIMIT_SHARE {
        Reason::ShareExhausted
    } else {
        Reason::BackendLimit
    }
}

/// Whether a backend in `state` takes new flows at all, and if not, why.
#[inline(always)]
pub fn state_admits(state: u8) -> Result<(), Reason> {
    if state == BACKEND_ACTIVE {
        Ok(())
    } else if state == BACKEND_DRAINING {
        Err(Reason::BackendDraining)
    } else {
        Err(Reason::BackendDown)
    }
}

/// Whether backend `b` takes a new flow with `open` connections open, and if not, why: the
/// decision the datapath makes (`lb-ebpf/src/slots.rs`, where an atomic add settles races
/// between CPUs) and `sluice explain` shows.
#[inline(always)]
pub fn backend_admits(b: &Backend, open: u64) -> Result<(), Reason> {
    state_admits(b.state)?;
    limit_admits(b, open)
}

/// Whether backend `b`'s limit leaves room with `open` connections open, and if not, what the
/// refusal counts as.
#[inline(always)]
pub fn limit_admits(b: &Backend, open: u64) -> Result<(), Reason> {
    if open >= u64::from(b.max_conns) {
        return Err(at_limit_reason(b.at_limit));
    }
    Ok(())
}
