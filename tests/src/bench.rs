//! What the XDP benchmarks share: load options, one TCP service with one backend written the
//! way the daemon writes it, and the machine line of the report.

use lb_common::{Backend, Config, Service, ServiceKey, BACKEND_ACTIVE, FAMILY_V4, REJECT_RST};
use lb_userspace::{
    datapath::LoadOptions,
    maglev::{self, RingBackend},
};

use std::{path::PathBuf, time::Duration};

use crate::{
    packet::{tcp, Pkt, PROTO_TCP},
    testrun::XdpRunner,
};

/// Flow `i` of many to the service on 10.0.0.100:8080: its SYN, or (other `flags`) a packet
/// of it with 64 bytes of payload. Distinct sources spread the flows over the flow table.
pub fn flow_frame(i: usize, flags: u8) -> Vec<u8> {
    let ip = format!("10.{}.{}.{}", 20 + i / 65536 % 200, i / 256 % 256, i % 256);
    let p = Pkt::tcp4(&format!("{ip}:{}", 1024 + i % 60000), "10.0.0.100:8080").flags(flags);
    if flags == tcp::SYN {
        p.build()
    } else {
        p.payload(&[0; 64]).build()
    }
}

/// Runs each frame once through `x` with the kernel's run-time statistics on: the
/// kernel-measured duration of each run and the program's mean run time (prog-stats).
pub fn run_batch(x: &mut XdpRunner, batch: &[Vec<u8>]) -> (Vec<Duration>, Duration) {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let before = x.prog().info().expect("info");
    let d: Vec<Duration> = batch.iter().map(|f| x.run(f).duration).collect();
    let after = x.prog().info().expect("info");
    let runs = after.run_count() - before.run_count();
    (d, after.run_time().checked_sub(before.run_time()).unwrap() / runs as u32)
}

/// A gateway MAC (so `ipip` needs no FIB), room for four 65537-slot rings, `flows` flows.
pub fn opts(flows: u32) -> LoadOptions {
    LoadOptions { config: Config { has_gateway: 1, gateway_mac: [2, 0, 0, 0, 0, 0xaa], ..Config::DEFAULT }, flow_capacity: flows, ring_slots: 4 * 65537 }
}

/// `SLUICE_BENCH_SHORT=1`: the test suite's short form of a benchmark (`tests/tests/benches.rs`):
/// one round, few frames, the smallest sizes. It shows that the benchmark runs and that what it
/// measures happened (the same checks as a full run); its timings mean nothing and nothing
/// asserts them.
pub fn short() -> bool {
    std::env::var("SLUICE_BENCH_SHORT").is_ok_and(|v| v == "1")
}

/// `full` in a benchmark's run, `short` in its short form ([`short`]).
pub fn pick<T>(full: T, short_form: T) -> T {
    if short() {
        short_form
    } else {
        full
    }
}

/// The file a benchmark writes its section to: its first argument, else `BENCHMARKS.md`. A
/// short run must be given a file, and one that is not `BENCHMARKS.md`: its figures are no
/// record.
pub fn out_path() -> PathBuf {
    let arg = std::env::args().nth(1).map(PathBuf::from);
    if !short() {
        return arg.unwrap_or_else(|| "BENCHMARKS.md".into());
    }
    let path = arg.expect("a short run (SLUICE_BENCH_SHORT=1) writes to the file given as its argument, never BENCHMARKS.md");
    assert!(path.file_name().is_none_or(|n| n != "BENCHMARKS.md"), "a short run (SLUICE_BENCH_SHORT=1) must not rewrite {}", path.display());
    path
}

/// Service `id` on 10.0.0.100:`port`/TCP with backend 10.0.1.`id`, a 65537-slot ring; a
/// refusal answered with a RST.
pub fn install(x: &mut XdpRunner, port: u16, mode: u8, max_conns: u32, id: u32) {
    install_with(x, port, mode, max_conns, id, REJECT_RST);
}

/// [`install`] with the service's refusal: `REJECT_RST` or `REJECT_DROP`.
pub fn install_with(x: &mut XdpRunner, port: u16, mode: u8, max_conns: u32, id: u32, reject: u8) {
    let mut t = x.tables();
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&[10, 0, 1, id as u8]);
    t.set_backend(id, &Backend { addr, mac: [2, 0xbb, 0, 0, 0, id as u8], family: FAMILY_V4, state: BACKEND_ACTIVE, max_conns, service_id: id as u16, at_limit: 0, _pad: 0 })
        .expect("backend");
    let ring = maglev::build(&[RingBackend { id, key: format!("10.0.1.{id}"), weight: 1 }], 65537);
    let base = (id - 1) * 65537;
    t.write_ring(base, &ring).expect("ring");
    let mut vip = [0u8; 16];
    vip[..4].copy_from_slice(&[10, 0, 0, 100]);
    let svc = Service { id, ring_base: base, ring_size: 65537, mode, reject, spill: 0, half: 0 };
    t.set_service(&ServiceKey { addr: vip, port_be: port.to_be_bytes(), proto: PROTO_TCP, _pad: 0 }, &svc).expect("service");
}

/// "Machine: <cpu>, N CPUs, kernel <release>."
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned()))
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("Machine: {cpu}, {cpus} CPUs, kernel {}.", kernel.trim())
}
