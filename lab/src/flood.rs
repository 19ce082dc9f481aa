//! `sluice lab flood`: a spoofed-source SYN flood at the VIP from one client namespace (raw
//! frames through an `AF_PACKET` socket), while the other client holds established connections
//! and opens a new one every 100 ms. Measured: whether any held connection broke, how the flood
//! was refused, and how long after the flood stopped new clients got through again (the slots
//! the flood took come back after the SYN timeout, long before the established timeout). Then,
//! as in the chaos run, the counters, the flow table and the clients' open connections must
//! agree.

use std::{
    net::{Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use rand::{rngs::StdRng, Rng as _, SeedableRng as _};
use serde::Serialize;
use tokio::net::TcpStream;

use super::{
    probe,
    report::{self, BackendEnd, Check, Verdict},
    topo::{self, BackendConf, ServiceOpts},
    vip, Lab, PORT, VIP4,
};

pub const BACKENDS: u8 = 2;
/// Each backend's `max_conns`: the flood's free slots are `BACKENDS × LIMIT − HELD`.
pub const LIMIT: u32 = 100;
pub const HELD: usize = 40;
const PROBE_EVERY: Duration = Duration::from_millis(100);
/// New connections in a row that must get through for the clients to count as back (a second's).
const BACK_AFTER: usize = 10;
const PING: Duration = Duration::from_millis(250);

#[derive(Clone, Debug)]
pub struct Options {
    /// SYNs per second.
    pub pps: u32,
    pub duration: Duration,
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self { pps: 20_000, duration: Duration::from_secs(3), seed: 1 }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub syns_sent: u64,
    pub flood_s: f64,
    pub syn_timeout_s: f64,
    /// New flows Sluice admitted / refusals it counted while the flood ran (and its SYNs lived).
    pub admitted: u64,
    pub refused_by_sluice: u64,
    pub held: u64,
    pub held_broken: u64,
    /// New connections of the legitimate client: before, during, after the flood.
    pub probes_before_ok: u64,
    pub probes_before: u64,
    pub probes_during_ok: u64,
    pub probes_during: u64,
    /// From the flood's end until every later new connection got through.
    pub recovered_after_s: f64,
    pub end: Vec<BackendEnd>,
    pub checks: Vec<Check>,
}

impl Verdict for Report {
    fn checks(&self) -> &[Check] {
        &self.checks
    }

    fn markdown(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(s, "# SYN flood in the lab: {} spoofed SYNs in {:.1} s\n\n| figure | value |\n|---|---|", self.syns_sent, self.flood_s);
        let rows = [
            ("SYN timeout", format!("{:.0} s", self.syn_timeout_s)),
            ("new flows admitted while the flood ran (the free slots, then each slot the SYN timeout frees)", self.admitted.to_string()),
            ("refusals Sluice counted with a reason (each a RST)", self.refused_by_sluice.to_string()),
            ("established connections held through it / broken", format!("{} / {}", self.held, self.held_broken)),
            ("legitimate new connections before the flood", format!("{} of {} got through", self.probes_before_ok, self.probes_before)),
            ("legitimate new connections during the flood", format!("{} of {} got through", self.probes_during_ok, self.probes_during)),
            ("after the flood stopped, every new connection got through from", format!("{:.2} s", self.recovered_after_s)),
        ];
        for (k, v) in rows {
            let _ = writeln!(s, "| {k} | {v} |");
        }
        report::end_and_checks_markdown(&mut s, &self.end, &self.checks);
        s
    }
}

/// A link's MAC address and index, in the calling thread's namespace.
pub(crate) fn link(name: &str) -> Result<([u8; 6], u32)> {
    let index = nix::net::if_::if_nametoindex(name).with_context(|| format!("no interface {name}"))?;
    let mac = nix::ifaddrs::getifaddrs()?
        .filter(|a| a.interface_name == name)
        .find_map(|a| a.address.and_then(|s| s.as_link_addr().and_then(nix::sys::socket::LinkAddr::addr)))
        .with_context(|| format!("no MAC address on {name}"))?;
    Ok((mac, index))
}

/// Sends `opts.pps` spoofed SYNs per second for `opts.duration` out of `iface` to `dst_mac`;
/// returns how many were sent. Sources are unused addresses of the lab's subnet (.128–.254) and
/// random ports, so the backends' SYN-ACKs go nowhere, as a real flood's do.
pub(crate) fn send_flood(iface: &str, dst_mac: [u8; 6], opts: &Options) -> Result<u64> {
    let (src_mac, index) = link(iface)?;
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: zeroed sockaddr_ll is valid; the fields set below are what bind(2) needs.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = index.cast_signed();
    sll.sll_protocol = (libc::ETH_P_IP as u16).to_be();
    // SAFETY: a valid sockaddr_ll and its size.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const sll).cast(), size_of::<libc::sockaddr_ll>() as u32) } != 0 {
        bail!("binding to {iface}: {}", std::io::Error::last_os_error());
    }
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let started = Instant::now();
    let (mut sent, mut frame) = (0u64, Vec::with_capacity(64));
    while started.elapsed() < opts.duration {
        // Pace in batches of 100.
        let due = started + Duration::from_secs_f64(sent as f64 / f64::from(opts.pps.max(1)));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        for _ in 0..100 {
            let src = Ipv4Addr::new(198, 18, 0, rng.random_range(128..=254));
            frame.clear();
            etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
                .ipv4(src.octets(), VIP4.octets(), 64)
                .tcp(rng.random_range(1024..=65535), PORT, rng.random(), 64240)
                .syn()
                .write(&mut frame, &[])
                .context("building a SYN")?;
            // SAFETY: a valid buffer and its length.
            if unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) } >= 0 {
                sent += 1;
            } else {
                // A full queue drops the frame (as a NIC would); only count what left.
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ENOBUFS) {
                    bail!("sending on {iface}: {e}");
                }
            }
        }
    }
    Ok(sent)
}

/// A new connection and one request.
async fn probe(addr: SocketAddr) -> bool {
    let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await else { return false };
    matches!(tokio::time::timeout(Duration::from_secs(1), probe::request(&mut s)).await, Ok(Ok(_)))
}

/// What the legitimate client saw.
struct Legit {
    /// The held connections still open (kept open until the counters are compared), by backend.
    alive: Vec<(u8, std::net::TcpStream)>,
    broken: u64,
    /// New connections: (start, got an answer), in order.
    probes: Vec<(f64, bool)>,
}

/// The legitimate client: `HELD` connections asking every `PING`, and a new connection every
/// `PROBE_EVERY`, until `stop`.
/// `streak` counts the new connections in a row that got through.
async fn legit(addr: SocketAddr, t0: Instant, opened: Arc<AtomicBool>, stop: Arc<AtomicBool>, streak: Arc<AtomicUsize>) -> Result<Legit> {
    let mut held = Vec::new();
    for _ in 0..HELD {
        let mut s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await.context("held connection: connect timed out")?.context("held connection")?;
        let name = probe::request(&mut s).await.map_err(|e| anyhow::anyhow!("held connection: {e}"))?;
        let n: u8 = name.strip_prefix("backend-").and_then(|n| n.parse().ok()).context("backend name")?;
        held.push((n, s));
    }
    opened.store(true, Ordering::Relaxed);
    let probes: Arc<Mutex<Vec<(f64, bool)>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    let mut pinger = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut broken = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut next = Vec::new();
                for (n, mut s) in held.drain(..) {
                    match tokio::time::timeout(Duration::from_secs(2), probe::request(&mut s)).await {
                        Ok(Ok(_)) => next.push((n, s)),
                        _ => broken += 1,
                    }
                }
                held = next;
                tokio::time::sleep(PING).await;
            }
            (held, broken)
        })
    };
    while !stop.load(Ordering::Relaxed) {
        let (probes, streak) = (probes.clone(), streak.clone());
        tasks.spawn(async move {
            let t = t0.elapsed().as_secs_f64();
            let ok = probe(addr).await;
            if ok {
                streak.fetch_add(1, Ordering::Relaxed);
            } else {
                streak.store(0, Ordering::Relaxed);
            }
            probes.lock().expect("probes").push((t, ok));
        });
        tokio::time::sleep(PROBE_EVERY).await;
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let (alive, broken) = (&mut pinger).await?;
    let alive = alive.into_iter().map(|(n, s)| Ok((n, s.into_std()?))).collect::<std::io::Result<_>>()?;
    let mut probes = probes.lock().expect("probes").clone();
    probes.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(Legit { alive, broken, probes })
}

/// Runs the flood in `lab` (built with `BACKENDS` backends and 2 clients, no daemon yet).
pub fn run(lab: &Lab, opts: &Options) -> Result<Report> {
    if lab.spec.backends != BACKENDS || lab.spec.clients < 2 {
        bail!("the flood needs a lab with {BACKENDS} backends and 2 clients");
    }
    let conf: Vec<BackendConf> = (1..=BACKENDS).map(|n| BackendConf { n, max_conns: LIMIT, weight: 1 }).collect();
    lab.write_config(&lab.config_text(&conf, &ServiceOpts::default(), |c| c.flows.timeouts = topo::short_timeouts()))?;
    lab.start_daemon()?;
    let syn_timeout = topo::SYN_TIMEOUT;
    let lb_mac = lab.run_in("lb", || link("lb0"))??.0;
    let t0 = Instant::now();
    let (opened, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let streak = Arc::new(AtomicUsize::new(0));
    let addr = SocketAddr::new(vip(false), PORT);

    let (seen, sent, flood_span, before, during, back) = std::thread::scope(|s| -> Result<_> {
        let _stop_guard = super::SetOnDrop(&stop);
        let client = {
            let (opened, stop, streak) = (opened.clone(), stop.clone(), streak.clone());
            s.spawn(move || {
                lab.run_in("cl1", move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                    rt.block_on(legit(addr, t0, opened, stop, streak))
                })
            })
        };
        lab.wait("the held connections", Duration::from_secs(20), || opened.load(Ordering::Relaxed))?;
        // A baseline of new connections, then the flood, then watch recovery.
        std::thread::sleep(Duration::from_secs(1));
        let before = report::status(lab)?;
        let flood_start = t0.elapsed().as_secs_f64();
        let sent = lab.run_in("cl2", || send_flood("cl0", lb_mac, opts))??;
        let flood_end = t0.elapsed().as_secs_f64();
        let during = report::status(lab)?;
        // The flood's last slots come back one SYN timeout after its end. Wait for new
        // connections to get through again, up to the established timeout: slots held as
        // established flows would come back only then, and the check below tells them apart.
        streak.store(0, Ordering::Relaxed);
        let deadline = Instant::now() + topo::ESTABLISHED_TIMEOUT;
        while streak.load(Ordering::Relaxed) < BACK_AFTER && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let back = streak.load(Ordering::Relaxed) >= BACK_AFTER;
        stop.store(true, Ordering::Relaxed);
        let seen = client.join().unwrap_or_else(|p| std::panic::resume_unwind(p))??;
        Ok((seen, sent, (flood_start, flood_end), before, during, back))
    })?;

    // The flood's half-open flows are gone; probes are done: what is left is the held connections.
    std::thread::sleep(syn_timeout + Duration::from_secs(1));
    let end = report::end_state(lab, |n| seen.alive.iter().filter(|(b, _)| *b == n).count() as u64)?;
    let st = report::status(lab)?;

    let (flood_start, flood_end) = flood_span;
    let new_flows = |v: &lb_userspace::api::StatusReport| report::backends(v).iter().map(|b| b.new_flows).sum::<u64>();
    let probes = &seen.probes;
    let count = |from: f64, to: f64, ok: bool| probes.iter().filter(|(t, o)| *t >= from && *t < to && (!ok || *o)).count() as u64;
    // Every probe from this moment on got through.
    let recovered_at = probes.iter().rposition(|(_, ok)| !ok).map_or(flood_end, |i| probes.get(i + 1).map_or(f64::INFINITY, |p| p.0));
    let mut report = Report {
        syns_sent: sent,
        flood_s: flood_end - flood_start,
        syn_timeout_s: syn_timeout.as_secs_f64(),
        admitted: new_flows(&during) - new_flows(&before),
        refused_by_sluice: report::refused_total(&st) - report::refused_total(&before),
        held: HELD as u64,
        held_broken: seen.broken,
        probes_before_ok: count(0.0, flood_start, true),
        probes_before: count(0.0, flood_start, false),
        probes_during_ok: count(flood_start, flood_end, true),
        probes_during: count(flood_start, flood_end, false),
        recovered_after_s: (recovered_at - flood_end).max(0.0),
        end,
        checks: Vec::new(),
    };
    let mut checks = Vec::new();
    let mut check = |what: &str, ok: bool, detail: String| checks.push(Check { what: what.into(), ok, detail });
    check("no established connection broken by the flood", report.held_broken == 0, format!("{} of {} broken", report.held_broken, report.held));
    check(
        "new connections got through before the flood",
        report.probes_before > 0 && report.probes_before_ok == report.probes_before,
        format!("{} of {}", report.probes_before_ok, report.probes_before),
    );
    check(
        "the flood took the free slots (new connections refused during it)",
        report.probes_during > 0 && report.probes_during_ok * 2 < report.probes_during,
        format!("{} of {} got through", report.probes_during_ok, report.probes_during),
    );
    // The last slot taken by the flood is free one SYN timeout later. How long it took is a
    // figure (a wall-clock bound flakes on a loaded machine); that it happened before slots held
    // as established flows would have come back is the behaviour.
    check(
        "new connections get through again after the flood, before the established timeout",
        back,
        format!(
            "after {:.2} s ({BACK_AFTER} in a row; SYN timeout {:.0} s, established timeout {:.0} s)",
            report.recovered_after_s,
            report.syn_timeout_s,
            topo::ESTABLISHED_TIMEOUT.as_secs_f64()
        ),
    );
    checks.push(report::agreement("afterwards counters = flows = what the clients hold", &report.end));
    report.checks = checks;
    drop(seen);
    Ok(report)
}
