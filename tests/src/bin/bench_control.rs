//! `cargo xtask bench control`: the control plane's costs, measured on the real kernel maps.
//! - loading the XDP object (maps created, programs verified);
//! - applying a config of 100 services × 100 backends from scratch (rings included), and of
//!   1,000 × 10 and 10 × 1,000;
//! - one limit change: from the apply call until a SYN through the real program sees it;
//! - a GC sweep over a 1M-entry flow table (scan only, and expiring everything);
//! - the real `sluice run` with the 100 × 100 config in a namespace: from its start until a SYN
//!   sent on its interface is forwarded, and its resident memory.
//!
//! Writes its section of BENCHMARKS.md. `SLUICE_BENCH_SHORT=1` (the test suite): small configs
//! (5 × 5, 20 × 2, 2 × 20) and a table of 20,000 flows, one load.

use std::{
    fmt::Write as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use lb_common::{Flow, FlowKey, FLOW_ESTABLISHED};
use lb_userspace::{
    config::{self, Timeouts},
    datapath::LoadOptions,
    gc,
    reconcile::Applied,
};
use sluice_tests::{
    bench,
    netns::{veth, Netns},
    packet::Pkt,
    sluice_bin,
    testrun::XdpRunner,
    PinDir,
};

/// The main config's services, backends per service and ring size; the flow table's capacity.
fn plan() -> (u32, u32, u32, u32) {
    bench::pick((100, 100, 10_007, 1_000_000), (5, 5, 503, 20_000))
}

/// The other shapes: (services, backends, ring) many services, and many backends.
fn shapes() -> [(u32, u32, u32); 2] {
    bench::pick([(1000, 10, 1009), (10, 1000, 10_007)], [(20, 2, 211), (2, 20, 2003)])
}

fn socket_path() -> PathBuf {
    std::env::temp_dir().join(format!("sluice-bench-{}.sock", std::process::id()))
}

/// A config of `services` × `backends` (rings of `ring` slots); the first backend's limit is
/// `limit_first`.
#[expect(clippy::many_single_char_names, reason = "the address octets x.y.z of backend g")]
fn config_text(services: u32, backends: u32, ring: u32, limit_first: u32, pins: &str) -> String {
    let (.., flows) = plan();
    let mut t = format!(
        "[daemon]\ninterface = \"lb0\"\npin_dir = \"{pins}\"\ncontrol_socket = \"{}\"\njournal = \"{}\"\n[flows]\ncapacity = {flows}\n",
        socket_path().display(),
        socket_path().with_extension("journal").display()
    );
    for s in 0..services {
        write!(t, "[[service]]\nname = \"svc{s}\"\nvip = \"10.1.{}.{}\"\nport = 80\nproto = \"tcp\"\nring_size = {ring}\n", s / 250, s % 250 + 1).expect("w");
        for b in 0..backends {
            let max = if s == 0 && b == 0 { limit_first } else { 1000 };
            let g = s * backends + b;
            let (x, y, z) = (2 + g / 65536, (g / 256) % 256, g % 256);
            write!(t, "[[service.backend]]\naddress = \"10.{x}.{y}.{z}\"\nmax_conns = {max}\nmac = \"02:00:00:{x:02x}:{y:02x}:{z:02x}\"\n").expect("w");
        }
    }
    t
}

/// Applies `services` × `backends` from scratch, then lowers the first backend's limit to 1
/// while it holds a connection: (the full apply, the change until a SYN to it is refused).
fn apply_and_change(services: u32, backends: u32, ring: u32) -> (Duration, Duration, XdpRunner) {
    let file = std::path::Path::new("bench.toml");
    let (cfg, _) = config::parse(file, &config_text(services, backends, ring, 1000, "/sys/fs/bpf/unused")).unwrap_or_else(|e| panic!("{e}"));
    let ring_slots = 4 * services * ring;
    let (.., flows) = plan();
    let mut x = XdpRunner::balancer_with(&LoadOptions { flow_capacity: flows, ring_slots, ..LoadOptions::default() });
    let mut applied = Applied::new(ring_slots);
    let t0 = Instant::now();
    let changes = applied.apply(&mut x.tables(), &cfg, &|_| None, |t, id| t.conns(id).unwrap_or(0)).expect("apply");
    let full_apply = t0.elapsed();
    assert_eq!(changes.len() as u32, services * (backends + 1));

    // Backend 0 of svc0 holds one connection, its max_conns goes 1000 → 1, and the next SYN to
    // it must be refused.
    let (cfg0, _) = config::parse(file, &config_text(services, backends, ring, 1, "/sys/fs/bpf/unused")).unwrap_or_else(|e| panic!("{e}"));
    let target = applied.services["svc0"].backends.values().find(|b| b.address == "10.2.0.0".parse::<std::net::IpAddr>().expect("ip")).expect("backend").clone();
    let ring = applied.services["svc0"].ring.clone();
    let mut ports = (1024..u16::MAX).filter(|p| {
        let key = lb_userspace::explain::flow_key(format!("10.9.0.1:{p}").parse().expect("src"), "10.1.0.1:80".parse().expect("dst"), config::Proto::Tcp);
        lb_userspace::maglev::first_choice(&ring, &key) == target.id
    });
    let (held, port) = (ports.next().expect("a port"), ports.next().expect("another port"));
    x.run(&Pkt::tcp4(&format!("10.9.0.1:{held}"), "10.1.0.1:80").build());
    let t0 = Instant::now();
    applied.apply(&mut x.tables(), &cfg0, &|_| None, |t, id| t.conns(id).unwrap_or(0)).expect("apply");
    let out = x.run(&Pkt::tcp4(&format!("10.9.0.1:{port}"), "10.1.0.1:80").build());
    let one_change = t0.elapsed();
    assert_eq!(out.data[..6], sluice_tests::packet::CLIENT_MAC, "the SYN right after the change was refused");
    println!("{services} × {backends}: apply {full_apply:?}, one change {one_change:?}");
    (full_apply, one_change, x)
}

fn main() {
    let out_path: PathBuf = bench::out_path();
    let (services, backends, ring, flows) = plan();
    let loads_n = bench::pick(5, 1);
    // 0. Loading the object: maps created, programs verified (median of 5).
    let mut loads: Vec<Duration> = (0..loads_n)
        .map(|_| {
            let t0 = Instant::now();
            let x = XdpRunner::balancer_with(&LoadOptions { flow_capacity: flows, ..LoadOptions::default() });
            let took = t0.elapsed();
            drop(x);
            took
        })
        .collect();
    loads.sort();
    let load = loads[loads.len() / 2];

    // 1, 2. Other shapes first, then 100 × 100, whose runner the GC figures reuse.
    let [(ws, wb, wr), (ds, db, dr)] = shapes();
    let wide = apply_and_change(ws, wb, wr);
    let deep = apply_and_change(ds, db, dr);
    let (full_apply, one_change, mut x) = apply_and_change(services, backends, ring);
    // The GC's flows name backend 1 (any backend of the config).
    let target = 1u32;
    assert_ne!(x.tables().backend(target).expect("backend").family, 0);

    // 3. GC over 1M flows (inserted from userspace: this measures the sweep, not the inserts).
    let table = x.tables().flow_table().expect("mmap");
    let now = gc::now_coarse_ns();
    // Filling to capacity: the last few find both their buckets full (flow_table_full).
    let mut refused = 0u64;
    {
        for i in 0..flows - 1 {
            let mut k = FlowKey { proto: 6, sport_be: ((i % 60000) as u16).to_be_bytes(), dport_be: 80u16.to_be_bytes(), ..FlowKey::default() };
            k.src[..4].copy_from_slice(&(0x0a00_0000 + i / 60000).to_be_bytes());
            k.dst[..4].copy_from_slice(&[10, 1, 0, 1]);
            let f = Flow { backend_id: target, service_id: 0, counted: 0, state: FLOW_ESTABLISHED, last_seen_ns: now, created_ns: now, ..Flow::default() };
            refused += u64::from(table.insert(&k, &f).is_err());
        }
    }
    let held = table.len();
    assert_eq!(held + refused, u64::from(flows), "every flow inserted or refused");
    let conns = x.tables().conn_counters().expect("conns");
    let t0 = Instant::now();
    let scan = gc::sweep(&table, &conns, &Timeouts::default(), gc::now_coarse_ns(), Duration::ZERO);
    let scan_time = t0.elapsed();
    assert_eq!(scan.scanned, held);
    let tiny = Timeouts { syn: Duration::from_nanos(1), established: Duration::from_nanos(1), closing: Duration::from_nanos(1), udp: Duration::from_nanos(1) };
    std::thread::sleep(Duration::from_millis(20));
    let t0 = Instant::now();
    let expire = gc::sweep(&table, &conns, &tiny, gc::now_coarse_ns(), Duration::ZERO);
    let expire_time = t0.elapsed();
    assert_eq!(expire.expired, held);
    drop(conns);
    drop(x);

    // 4. The real daemon with this config: start to forwarding, and memory.
    let (started, rss) = daemon_start_and_rss();

    let mut table = String::new();
    table.push_str("| measurement | result |\n|---|---:|\n");
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    writeln!(table, "| loading the XDP object: maps created, programs verified (median of {loads_n}) | {:.0} ms |", ms(load)).expect("w");
    writeln!(table, "| apply {services} services × {backends} backends from scratch (rings of {ring}) | {:.0} ms |", ms(full_apply)).expect("w");
    writeln!(table, "| one `max_conns` change at {services} × {backends}: apply call → a SYN through the program is refused | {:.2} ms |", ms(one_change)).expect("w");
    writeln!(table, "| apply {ws} services × {wb} backends from scratch (rings of {wr}) | {:.0} ms |", ms(wide.0)).expect("w");
    writeln!(table, "| one `max_conns` change at {ws} × {wb} | {:.2} ms |", ms(wide.1)).expect("w");
    writeln!(table, "| apply {ds} services × {db} backends from scratch (rings of {dr}) | {:.0} ms |", ms(deep.0)).expect("w");
    writeln!(table, "| one `max_conns` change at {ds} × {db} | {:.2} ms |", ms(deep.1)).expect("w");
    writeln!(table, "| `sluice run` with {services} × {backends}: start → the first SYN on its interface forwarded | {:.0} ms |", ms(started)).expect("w");
    writeln!(table, "| filling a table of {flows} flows: refused `flow_table_full` before it was full | {refused} |").expect("w");
    writeln!(table, "| GC sweep of {held} flows, nothing idle (a walk of the mapped table) | {:.0} ms |", scan_time.as_secs_f64() * 1e3).expect("w");
    writeln!(table, "| GC sweep of {held} flows, all idle (the walk + two compare-and-swaps each) | {:.0} ms |", expire_time.as_secs_f64() * 1e3).expect("w");
    writeln!(table, "| daemon resident memory with that config (VmRSS, with the mapped flow table) | {:.1} MiB |", rss.0 as f64 / 1024.0).expect("w");
    writeln!(table, "| of which the daemon's own (RssAnon) | {:.1} MiB |", rss.1 as f64 / 1024.0).expect("w");
    println!("{table}");
    let body = format!(
        "## Control plane (`cargo xtask bench control`)\n\n\
         Machine: {}, {} CPUs. Loads, applies and GC run against the real kernel maps of a loaded\n\
         (not attached) program; the start and memory figures are the real `sluice run --config`\n\
         in a network namespace. Single runs.\n\n{table}",
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned()))
            .unwrap_or_default(),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    sluice_tests::write_section(&out_path, "bench-control", &body);
    println!("wrote {}", out_path.display());
}

/// Starts `sluice run --config` with the 100 × 100 config on a veth in a private namespace and
/// reads its resident memory in KiB once it serves: (VmRSS, RssAnon). VmRSS includes the BPF
/// maps the daemon memory-maps (the flow table: kernel memory, mapped, not the daemon's own);
/// RssAnon is its own heap and stacks.
fn daemon_start_and_rss() -> (Duration, (u64, u64)) {
    let (services, backends, ring, _) = plan();
    let lb = Netns::new("benchlb");
    let peer = Netns::new("benchpeer");
    veth(&lb, "lb0", &peer, "p0");
    let pins = PinDir::new();
    let dir = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cfg = dir.join("bench.toml");
    std::fs::write(&cfg, config_text(services, backends, ring, 1000, pins.0.to_str().expect("utf-8"))).expect("write");
    let t0 = Instant::now();
    let mut d = lb.spawn(lb.command(sluice_bin()).arg("run").arg("--config").arg(&cfg));
    // SYNs to svc0 from the peer, one every 2 ms, until the pinned counters show one forwarded.
    let mut sport = 10_000u16;
    let started = loop {
        if let Some(out) = d.exited() {
            panic!("daemon exited: {}", String::from_utf8_lossy(&out.stderr));
        }
        assert!(t0.elapsed() < Duration::from_mins(2), "nothing forwarded in 120 s");
        sport += 1;
        peer.run(|| sluice_tests::netns::send_raw("p0", &Pkt::tcp4(&format!("10.9.0.1:{sport}"), "10.1.0.1:80").build()));
        let forwarded = lb_userspace::stats::open(&pins.0).ok().and_then(|m| lb_userspace::stats::read(&m).ok()).map_or(0, |s| s.get(lb_common::Stat::Forwarded).packets);
        if forwarded > 0 {
            break t0.elapsed();
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let sock = socket_path();
    let deadline = Instant::now() + Duration::from_mins(1);
    while !sock.exists() {
        if let Some(out) = d.exited() {
            panic!("daemon exited: {}", String::from_utf8_lossy(&out.stderr));
        }
        assert!(Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The daemon applies the config after it starts serving: measure once its memory has
    // stayed within 1 MiB for two seconds (an early reading misses the apply; a short run: for
    // half a second).
    let settle = bench::pick(Duration::from_secs(2), Duration::from_millis(500));
    let read = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", d.id())).unwrap_or_default();
        let kib = |key: &str| -> u64 { status.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0) };
        (kib("VmRSS:"), kib("RssAnon:"))
    };
    let (mut rss, mut stable_since) = (read(), Instant::now());
    while stable_since.elapsed() < settle && Instant::now() < deadline + Duration::from_mins(1) {
        std::thread::sleep(Duration::from_millis(250));
        let now = read();
        if now.0.abs_diff(rss.0) > 1024 {
            stable_since = Instant::now();
        }
        rss = now;
    }
    let _ = d.signal_and_wait(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(10));
    let _ = std::process::Command::new(sluice_bin()).arg("detach").arg("--pin-dir").arg(&pins.0).output();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(sock.with_extension("journal"));
    (started, rss)
}
