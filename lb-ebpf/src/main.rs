//! Sluice's XDP programs: `sluice_balancer` and `sluice_decap`. The entry points are thin: each
//! runs its pipeline and counts the one outcome it reached. `Ok` and `Err` are both verdicts
//! (`Err` is an early exit), and no path returns `XDP_ABORTED`.
//!
//! The balancer reads top to bottom: parse → service filter → flow → service → admission → act
//! (a packet of a known flow needs no service lookup: its entry carries mode and service).
//! - `parse`: headers and the one bounds check;
//! - `flow`: the open-addressed flow table, TCP states;
//! - `slots`: a connection slot taken, given back and released exactly once, only there;
//! - `admission`: ring choice, a slot under the exact limit, spill;
//! - `forward` (l2dsr, ipip), `rst` (refusal reply), `icmp`: acting on the packet;
//! - `maps`, `events`: counters and rate-limited refusal events.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

/// One scalar field of `CONFIG` as the loader set it. `Global::load` reads the whole struct
/// with a volatile read, which LLVM's BPF backend splits into 36 byte loads (and spills) on
/// every use; this reads only the field. Volatile: a plain read of an immutable static would
/// be folded to the compiled-in default. The verifier still sees a read-only map value at a
/// constant offset, so it knows the value and prunes the branches a deployment never takes.
macro_rules! config {
    ($field:ident) => {{
        let p = core::ptr::from_ref(&$crate::CONFIG).cast::<lb_common::Config>();
        // SAFETY: `Global<Config>` holds exactly a `Config` (asserted beside CONFIG).
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*p).$field)) }
    }};
}

mod admission;
mod atomic;
mod csum;
mod decap;
mod events;
mod floor;
mod flow;
mod forward;
mod icmp;
mod maps;
mod mem;
mod parse;
mod rst;
mod slots;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::xdp,
    programs::XdpContext,
    Global,
};
use lb_common::{flow_hash, Config, Flow, FlowKey, Reason, Service, ServiceKey, Stat, FLOW_CLOSING, FLOW_ESTABLISHED, FLOW_SYN_SEEN, FLOW_UDP, FRAGMENTS_DROP, REJECT_RST};

use crate::{
    flow::{Hit, Insert, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    maps::SERVICES,
    parse::{Fail, Packet, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP},
};

/// Load-time configuration (`lb_common::Config`), set by the loader with `override_global`.
#[unsafe(no_mangle)]
pub static CONFIG: Global<Config> = Global::new(Config::DEFAULT);
// `config!` and `forward` read CONFIG's fields through a `*const Config` at these offsets.
const _: () = {
    assert!(size_of::<Global<Config>>() == size_of::<Config>());
    assert!(core::mem::offset_of!(Config, gateway_mac) == 8);
    assert!(core::mem::offset_of!(Config, encap_src4) == 16);
    assert!(core::mem::offset_of!(Config, encap_src6) == 20);
};

/// The outcome to count and the XDP action to return.
pub type Verdict = Result<(Stat, u32), (Stat, u32)>;

/// A verdict as one scalar, for functions that are BPF subprograms: those may only return a
/// scalar in r0 (an aggregate would come back as a pointer into their own stack frame).
#[inline(always)]
pub fn pack((stat, action): (Stat, u32)) -> u64 {
    (u64::from(stat as u32) << 32) | u64::from(action)
}

/// The verdict `pack` made. Only for the cold paths (malformed frames, ICMP): a value no
/// `pack` made cannot occur, and would count as `other_l4`.
#[inline(always)]
pub fn unpack(v: u64) -> (Stat, u32) {
    (Stat::from_u32((v >> 32) as u32).unwrap_or(Stat::OtherL4), v as u32)
}

#[xdp]
pub fn sluice_balancer(ctx: XdpContext) -> u32 {
    run_balancer(&ctx)
}

/// The balancer's whole run on one frame (also inlined into the `bench_vary` benchmark entry).
#[inline(always)]
pub fn run_balancer(ctx: &XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let (stat, verdict) = match balance(ctx, len) {
        Ok(v) | Err(v) => v,
    };
    maps::count(stat, len);
    verdict
}

#[xdp]
pub fn sluice_decap(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let (stat, verdict) = match decap::decap(&ctx) {
        Ok(v) | Err(v) => v,
    };
    maps::count(stat, len);
    verdict
}

/// The VIP's own entry (port 0, proto 0), if `addr` is a VIP.
#[inline(always)]
pub fn vip_service(addr: &[u8; 16]) -> Option<Service> {
    let key = ServiceKey { addr: *addr, port_be: [0; 2], proto: 0, _pad: 0 };
    // SAFETY: the value is copied out at once.
    unsafe { SERVICES.get(&key) }.copied()
}

#[inline(always)]
fn balance(ctx: &XdpContext, bytes: u64) -> Verdict {
    let Some(scratch) = maps::SCRATCH.get_ptr_mut(0) else { return Err((Stat::NonIp, xdp_action::XDP_PASS)) };
    // SAFETY: this CPU's scratch slot; nothing else uses it while the program runs, and
    // the fields are borrowed disjointly below.
    let s = unsafe { &mut *scratch };
    parse::parse(ctx, &mut s.pkt).map_err(|f| unpack(parse_failure(&f)))?;
    let pkt = &s.pkt;
    match (pkt.proto, pkt.is_v6) {
        (PROTO_TCP | PROTO_UDP, _) => {}
        (PROTO_ICMP, false) | (PROTO_ICMPV6, true) => {
            let (backend_id, mode) = match icmp::handle(ctx, pkt, &mut s.key).get() {
                icmp::Icmp::Done(v) => return Ok(v),
                icmp::Icmp::Forward { backend_id, mode } => (backend_id, mode),
            };
            let action = forward::forward(ctx, pkt, mode, backend_id, flow_hash(&s.key));
            return sent(action, Stat::IcmpErrorForwarded);
        }
        _ => return Ok((Stat::OtherL4, xdp_action::XDP_PASS)),
    }
    s.skey = ServiceKey { addr: pkt.dst, port_be: pkt.dport_be, proto: pkt.proto, _pad: 0 };
    // The filter first: one array load settles most non-service traffic.
    let bit = lb_common::service_filter_bit(&s.skey);
    let word = maps::SERVICE_FILTER.get(bit / 64).copied().unwrap_or(u64::MAX);
    if (word >> (bit % 64)) & 1 == 0 {
        return Ok((not_service(pkt), xdp_action::XDP_PASS));
    }
    s.key = FlowKey { src: pkt.src, dst: pkt.dst, sport_be: pkt.sport_be, dport_be: pkt.dport_be, proto: pkt.proto, _pad0: 0, _pad1: 0 };
    let key = &s.key;
    let now = coarse_now(&mut s.clock_jiffies, &mut s.clock_ns);
    let hash = flow_hash(key);
    let is_tcp = pkt.proto == PROTO_TCP;
    // A SYN most likely opens a flow: its service is looked up first and, if the first choice
    // has room, the table lines the flow will be written to are fetched while the lookup
    // below waits for the bucket's tags (two random lines of a big table: the misses overlap
    // instead of following each other). Not for a SYN that will be refused: a flood of those
    // would pay for lines it never writes.
    let syn = is_tcp && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let mut early = false;
    if syn {
        // SAFETY: the value is copied out at once (a preallocated hash map's element may be
        // reused for another key while a program still holds a pointer to it).
        if let Some(v) = unsafe { SERVICES.get(&s.skey) } {
            s.svc = *v;
            early = true;
            if admission::has_room(&s.svc, hash) {
                flow::warm(hash);
            }
        }
    }
    // The flow before the service: a flow carries what forwarding needs, so an established
    // connection costs no hash-map call (and keeps its path if its service changes or goes).
    if let Some(hit) = flow::on_packet(key, hash, pkt.tcp_flags, now) {
        if let Some(v) = follow(ctx, pkt, &hit, hash, bytes) {
            return v;
        }
    }
    let svc = if early {
        s.svc
    } else if syn {
        return Ok((not_service(pkt), xdp_action::XDP_PASS));
    } else {
        // SAFETY: the value is copied out at once.
        let Some(v) = (unsafe { SERVICES.get(&s.skey) }).copied() else {
            return Ok((not_service(pkt), xdp_action::XDP_PASS));
        };
        v
    };
    if is_tcp && pkt.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return adopt(ctx, pkt, &svc, key, &mut s.flow, hash, now, bytes);
    }
    match admission::admit(&svc, hash) {
        Ok(backend_id) => {
            let state = if is_tcp { FLOW_SYN_SEEN } else { FLOW_UDP };
            enter(ctx, pkt, &svc, key, &mut s.flow, hash, now, bytes, backend_id, state, Entry::New)
        }
        Err((reason, backend_id)) => refuse(ctx, pkt, &svc, reason, backend_id),
    }
}

/// A packet of a flow in the table: forwarded to the flow's backend in the flow's mode, or
/// `None` for a SYN reopening a closing flow (it goes through admission).
#[inline(always)]
fn follow(ctx: &XdpContext, pkt: &Packet, hit: &Hit, hash: u32, bytes: u64) -> Option<Verdict> {
    match *hit {
        Hit::Forward { backend_id, service_id, mode } => {
            maps::traffic(service_id, backend_id, bytes, false, false);
            Some(sent(forward::forward(ctx, pkt, mode, backend_id, hash), Stat::Forwarded))
        }
        Hit::Reopen => None,
    }
}

/// `CLOCK_MONOTONIC_COARSE` in ns, as `bpf_ktime_get_coarse_ns` returns it, read at most once
/// per tick per CPU. The coarse clock only moves at a tick, when `jiffies` moves too; the
/// verifier inlines `bpf_jiffies64` into one load, while the clock helper is a call (tens of ns
/// here). Flows only need the time for idle timeouts.
#[inline(always)]
fn coarse_now(cached_jiffies: &mut u64, cached_ns: &mut u64) -> u64 {
    // SAFETY: helpers without preconditions.
    let j = unsafe { bpf_jiffies64() };
    if j != *cached_jiffies || *cached_ns == 0 {
        // SAFETY: as above.
        *cached_ns = unsafe { bpf_ktime_get_coarse_ns() };
        *cached_jiffies = j;
    }
    *cached_ns
}

#[inline(always)]
fn forwarded(ctx: &XdpContext, pkt: &Packet, svc: &Service, backend_id: u32, hash: u32) -> Verdict {
    sent(forward::forward(ctx, pkt, svc.mode, backend_id, hash), Stat::Forwarded)
}

/// The outcome of a forwarding attempt: `stat` if it was sent, `no_route` if not.
#[inline(always)]
fn sent(action: u32, stat: Stat) -> Verdict {
    if action == xdp_action::XDP_TX {
        Ok((stat, action))
    } else {
        Err((Stat::NoRoute, action))
    }
}

/// A mid-stream TCP packet without a flow (e.g. the table was lost): re-selected by the ring
/// and adopted without looking at limits. An established connection is never broken to
/// enforce a limit; it still counts as open on its backend.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "inlined into balance; the arguments are its locals")]
fn adopt(ctx: &XdpContext, pkt: &Packet, svc: &Service, key: &FlowKey, flow: &mut Flow, hash: u32, now: u64, bytes: u64) -> Verdict {
    let backend_id = admission::ring_pick(svc, hash, 0);
    if backend_id == 0 {
        maps::refusal(svc.id, 0, Reason::NoBackend);
        return Err((Stat::RefusedDrop, xdp_action::XDP_DROP));
    }
    if pkt.tcp_flags & TCP_RST != 0 {
        maps::traffic(svc.id, backend_id, bytes, false, false);
        return sent(forward::forward(ctx, pkt, svc.mode, backend_id, hash), Stat::ForwardedNoFlow);
    }
    let closing = pkt.tcp_flags & TCP_FIN != 0;
    if !closing {
        slots::take_unlimited(backend_id);
    }
    let state = if closing { FLOW_CLOSING } else { FLOW_ESTABLISHED };
    enter(ctx, pkt, svc, key, flow, hash, now, bytes, backend_id, state, Entry::Adopted { holds_slot: !closing })
}

/// How a flow comes to be entered in the table.
#[derive(Clone, Copy)]
enum Entry {
    /// A new flow, admitted: this packet holds a slot on the backend.
    New,
    /// An established connection seen without a flow; it holds a slot unless it is closing.
    Adopted { holds_slot: bool },
}

/// Enters this packet's flow in the table on `backend_id` and forwards the packet: the one
/// place a flow is entered, for new and adopted flows alike. If the entry fails, the slot the
/// packet took is given back; a new flow is then refused or dropped (its SYN comes back), an
/// adopted connection is forwarded anyway (never broken), holding no slot.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "inlined into balance; the arguments are its locals")]
fn enter(ctx: &XdpContext, pkt: &Packet, svc: &Service, key: &FlowKey, flow: &mut Flow, hash: u32, now: u64, bytes: u64, backend_id: u32, state: u8, entry: Entry) -> Verdict {
    let (adopted, holds_slot) = match entry {
        Entry::New => (false, true),
        Entry::Adopted { holds_slot } => (true, holds_slot),
    };
    // Field by field: a struct literal with a padding array compiles to a memset call.
    flow.backend_id = backend_id;
    flow.service_id = svc.id;
    flow.state = state;
    flow.adopted = u8::from(adopted);
    flow.mode = svc.mode;
    flow.last_seen_ns = now;
    flow.created_ns = now;
    match flow::insert(key, hash, flow, holds_slot) {
        Insert::Done => {}
        Insert::Exists(twin) => {
            // Another CPU entered this flow at the same moment: this packet is one of it.
            if holds_slot {
                slots::give_back(backend_id);
            }
            let hit = flow::apply(&twin, pkt.proto, pkt.tcp_flags, now);
            if let Some(v) = follow(ctx, pkt, &hit, hash, bytes) {
                return v;
            }
            // A CLOSING twin, just removed (Reopen): a new flow's SYN is dropped and its
            // retransmission admitted; an adopted packet goes on below.
            if !adopted {
                return Err((Stat::FlowBusy, xdp_action::XDP_DROP));
            }
        }
        Insert::Full if !adopted => {
            slots::give_back(backend_id);
            return refuse(ctx, pkt, svc, Reason::FlowTableFull, backend_id);
        }
        Insert::Raced if !adopted => {
            // Forwarded without a flow, its ACK would be adopted past the limit; dropped, the
            // SYN comes back in a second.
            slots::give_back(backend_id);
            return Err((Stat::FlowBusy, xdp_action::XDP_DROP));
        }
        Insert::Full | Insert::Raced => {
            if holds_slot {
                slots::give_back(backend_id);
            }
        }
    }
    maps::traffic(svc.id, backend_id, bytes, !adopted, adopted);
    forwarded(ctx, pkt, svc, backend_id, hash)
}

/// Counts the refusal, samples an event, and answers with a RST or drops, per the service.
#[inline(always)]
fn refuse(ctx: &XdpContext, pkt: &Packet, svc: &Service, reason: Reason, backend_id: u32) -> Verdict {
    maps::refusal(svc.id, backend_id, reason);
    events::refusal(pkt, reason, svc.id, backend_id, config!(events_per_sec));
    if pkt.proto == PROTO_TCP && svc.reject == REJECT_RST {
        return match rst::reply(ctx, pkt) {
            xdp_action::XDP_TX => Ok((Stat::RefusedRst, xdp_action::XDP_TX)),
            action => Err((Stat::RefusedDrop, action)),
        };
    }
    Err((Stat::RefusedDrop, xdp_action::XDP_DROP))
}

#[inline(always)]
fn not_service(pkt: &Packet) -> Stat {
    match (pkt.is_v6, pkt.proto) {
        (false, PROTO_TCP) => Stat::Tcp4,
        (false, _) => Stat::Udp4,
        (true, PROTO_TCP) => Stat::Tcp6,
        (true, _) => Stat::Udp6,
    }
}

/// Frames that did not parse: fragments and malformed TCP/UDP sent to a VIP are charged to
/// its service (fragments dropped by default); everything else is passed.
#[inline(never)]
fn parse_failure(f: &Fail) -> u64 {
    let pass = pack((f.stat, xdp_action::XDP_PASS));
    if !f.has_dst {
        return pass;
    }
    let Some(svc) = vip_service(&f.dst) else { return pass };
    if f.stat == Stat::Fragment {
        if config!(fragments) == FRAGMENTS_DROP {
            maps::refusal(svc.id, 0, Reason::Fragment);
            return pack((Stat::FragmentDropped, xdp_action::XDP_DROP));
        }
        return pass;
    }
    maps::refusal(svc.id, 0, Reason::Malformed);
    pass
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
