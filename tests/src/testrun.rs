//! Running the real XDP program in the real kernel with `BPF_PROG_TEST_RUN`: one frame in,
//! the verdict and the output frame out; plus timing for benchmarks.
//!
//! Timing: `repeat > 1` makes the kernel feed the program its own rewritten output from the
//! second run on, which is wrong for a program that rewrites or encapsulates. So
//! [`XdpRunner::time_single_shot`] runs `repeat = 1` in a loop and takes the median of the
//! kernel-measured durations, and [`XdpRunner::time_prog_stats`] reads the kernel's own
//! per-program run_time_ns / run_cnt (BPF_ENABLE_STATS) around the same loop.

use std::time::Duration;

use aya::{
    maps::{MapData, PerCpuArray},
    programs::{TestRun as _, TestRunOptions, Xdp},
    sys::Stats,
    Ebpf,
};
use lb_common::{maps, Counter, PROG_BALANCER, PROG_DECAP};
use lb_userspace::{
    datapath::LoadOptions,
    stats::{self, Snapshot},
    tables::Tables,
};

pub use lb_common::{XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX};

/// Room for the program to grow a frame (encapsulation) in the output buffer.
const HEADROOM_OUT: usize = 256;

#[derive(Debug, Clone)]
pub struct RunResult {
    pub verdict: u32,
    pub data: Vec<u8>,
    pub duration: Duration,
}

/// The balancer loaded into the kernel (not attached anywhere), ready for test runs.
pub struct XdpRunner {
    pub ebpf: Ebpf,
    prog_name: &'static str,
}

impl XdpRunner {
    /// Loads the balancer exactly as `sluice run` does. Panics with the reason if it cannot
    /// (not root, verifier rejection): a datapath test must never silently skip.
    pub fn balancer() -> Self {
        Self::balancer_with(&LoadOptions::default())
    }

    /// The balancer loaded with explicit options (configuration global, map capacities).
    pub fn balancer_with(opts: &LoadOptions) -> Self {
        crate::require_root();
        let ebpf = lb_userspace::datapath::load_balancer_with(opts).unwrap_or_else(|e| panic!("loading the balancer: {e}"));
        Self { ebpf, prog_name: PROG_BALANCER }
    }

    /// The balancer of another build's object (`bench_ab`).
    pub fn balancer_from(opts: &LoadOptions, object: &[u8]) -> Self {
        crate::require_root();
        let ebpf = lb_userspace::datapath::load_program_from(opts, PROG_BALANCER, object).unwrap_or_else(|e| panic!("loading the balancer: {e}"));
        Self { ebpf, prog_name: PROG_BALANCER }
    }

    /// Any program of the object by name (benchmark floors).
    pub fn program(opts: &LoadOptions, name: &'static str) -> Self {
        crate::require_root();
        let ebpf = lb_userspace::datapath::load_program(opts, name).unwrap_or_else(|e| panic!("loading {name}: {e}"));
        Self { ebpf, prog_name: name }
    }

    /// The backend-side decapsulator.
    pub fn decap() -> Self {
        crate::require_root();
        let ebpf = lb_userspace::datapath::load_decap().unwrap_or_else(|e| panic!("loading the decapsulator: {e}"));
        Self { ebpf, prog_name: PROG_DECAP }
    }

    /// The program's tables (services, backends, rings, counters, flows).
    pub fn tables(&mut self) -> Tables<'_> {
        Tables::new(&mut self.ebpf)
    }

    pub fn prog(&mut self) -> &mut Xdp {
        self.ebpf.program_mut(self.prog_name).expect("program in object").try_into().expect("an XDP program")
    }

    /// Runs the program once on `frame`.
    pub fn run(&mut self, frame: &[u8]) -> RunResult {
        let mut out = vec![0u8; frame.len() + HEADROOM_OUT];
        let res = self
            .prog()
            .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..TestRunOptions::new() })
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on a {}-byte frame: {e}", frame.len()));
        out.truncate(res.data_size_out as usize);
        RunResult { verdict: res.return_value, data: out, duration: res.duration }
    }

    /// The STATS map of this loaded instance.
    pub fn stats_map(&self) -> PerCpuArray<&MapData, Counter> {
        PerCpuArray::try_from(self.ebpf.map(maps::STATS).expect("STATS map")).expect("per-CPU array")
    }

    pub fn stats(&self) -> Snapshot {
        stats::read(&self.stats_map()).expect("reading STATS")
    }

    /// Median of `n` kernel-measured single-shot (`repeat = 1`) runs.
    pub fn time_single_shot(&mut self, frame: &[u8], n: usize) -> Duration {
        let mut d: Vec<Duration> = (0..n).map(|_| self.run(frame).duration).collect();
        d.sort();
        d[d.len() / 2]
    }

    /// Average run time per packet from the kernel's program statistics over `n` runs.
    pub fn time_prog_stats(&mut self, frame: &[u8], n: usize) -> Duration {
        // Stats are collected while this fd is open.
        let _stats = aya::sys::enable_stats(Stats::RunTime).expect("BPF_ENABLE_STATS");
        let before = self.prog().info().expect("prog info");
        for _ in 0..n {
            self.run(frame);
        }
        let after = self.prog().info().expect("prog info");
        let runs = after.run_count() - before.run_count();
        assert!(runs >= n as u64, "prog stats counted {runs} runs of {n}");
        after.run_time().checked_sub(before.run_time()).unwrap() / runs as u32
    }
}

/// One IPv4 TCP service on 10.0.0.100 with one backend, for tests that need a service but not
/// a whole config: written the way the daemon writes it (backend, ring, service, VIP entry).
#[derive(Clone, Debug)]
pub struct OneBackend {
    /// Service id; also the backend id, and the ring sits at `id * 13`.
    pub id: u32,
    pub port: u16,
    pub backend: [u8; 4],
    pub mac: [u8; 6],
    pub max_conns: u32,
    pub mode: u8,
}

impl OneBackend {
    pub fn new(id: u32, port: u16, max_conns: u32) -> Self {
        Self { id, port, backend: [10, 0, 1, 11], mac: [2, 0xbb, 0, 0, 0, id as u8], max_conns, mode: lb_common::MODE_L2DSR }
    }
}

impl XdpRunner {
    pub fn install_one(&mut self, o: &OneBackend) {
        use lb_common::{Backend, Service, ServiceKey, BACKEND_ACTIVE, FAMILY_V4, REJECT_RST};
        use lb_userspace::maglev::{self, RingBackend};
        let mut t = self.tables();
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&o.backend);
        let backend = Backend { addr, mac: o.mac, family: FAMILY_V4, state: BACKEND_ACTIVE, max_conns: o.max_conns, service_id: o.id as u16, at_limit: 0, _pad: 0 };
        t.set_backend(o.id, &backend).expect("backend");
        let base = o.id * 13;
        let key = std::net::Ipv4Addr::from(o.backend).to_string();
        t.write_ring(base, &maglev::build(&[RingBackend { id: o.id, key, weight: 1 }], 13)).expect("ring");
        let mut vip = [0u8; 16];
        vip[..4].copy_from_slice(&[10, 0, 0, 100]);
        let svc = Service { id: o.id, ring_base: base, ring_size: 13, mode: o.mode, reject: REJECT_RST, spill: 0, half: 0 };
        t.set_service(&ServiceKey { addr: vip, port_be: o.port.to_be_bytes(), proto: crate::packet::PROTO_TCP, _pad: 0 }, &svc).expect("service");
        t.set_service(&ServiceKey { addr: vip, port_be: [0; 2], proto: 0, _pad: 0 }, &svc).expect("vip entry");
    }
}
