//! `cargo xtask bench datapath`: per-packet cost of Sluice's XDP program against floor
//! programs measured in the same run, with BPF_PROG_TEST_RUN. Each case is timed two ways:
//! the median kernel-measured duration of single-shot runs (`repeat = 1`), and the kernel's
//! own per-program statistics (run_time_ns / run_cnt). The median of several rounds is
//! reported, as ns and as a ratio to the XDP_PASS floor. Every round checks that each of its
//! frames reached the case's outcome (forwarded, refused, passed). Writes a section of
//! BENCHMARKS.md. `SLUICE_BENCH_SHORT=1` (the test suite): one round of 200 frames per case.

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use lb_common::{Stat, MODE_IPIP, MODE_L2DSR};
use sluice_tests::{
    bench,
    packet::{tcp, Pkt},
    testrun::XdpRunner,
};

/// Rounds, frames per case and round, the balancer's flow capacity.
fn plan() -> (usize, usize, u32) {
    bench::pick((9, 10_000, 1 << 20), (1, 200, 1 << 14))
}

struct Case {
    name: String,
    target: Option<f64>,
    single: Duration,
    stats: Duration,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// One round of `frames` through `x`: (median single-shot, prog-stats average). With
/// `outcome`, each frame must have reached it (the balancer's counters).
fn round(x: &mut XdpRunner, frames: &dyn Fn(usize) -> Vec<u8>, round: usize, outcome: Option<Stat>) -> (Duration, Duration) {
    let (_, per_round, _) = plan();
    let batch: Vec<Vec<u8>> = (0..per_round).map(|i| frames(round * per_round + i)).collect();
    let before = outcome.map(|o| x.stats().get(o).packets);
    let (d, stats) = bench::run_batch(x, &batch);
    if let (Some(o), Some(before)) = (outcome, before) {
        let got = x.stats().get(o).packets - before;
        assert_eq!(got, per_round as u64, "round {round}: {got} of {per_round} frames {o:?}: {:?}", x.stats());
    }
    (median(d), stats)
}

/// 200 → "200", 10000 → "10k", 1048576 → "1M".
fn human(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{}M", n >> 20)
    } else if n >= 1000 {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

fn main() {
    let out_path: PathBuf = bench::out_path();
    let (rounds, per_round, capacity) = plan();
    let syn = |port: u16| Pkt::tcp4(&format!("10.9.0.1:{port}"), "10.0.0.100:80").build();
    let mut cases = Vec::new();

    // The floors use no map; a small flow table spares the memory of two more big ones.
    let mut floor = XdpRunner::program(&bench::opts(1024), "floor_pass");
    let mut swap = XdpRunner::program(&bench::opts(1024), "floor_macswap");
    let mut x = XdpRunner::balancer_with(&bench::opts(capacity));
    bench::install(&mut x, 80, MODE_L2DSR, u32::MAX, 1);
    bench::install(&mut x, 8080, MODE_IPIP, u32::MAX, 2);
    bench::install(&mut x, 9090, MODE_L2DSR, 0, 3);
    x.run(&syn(2000));
    let est = Pkt::tcp4("10.9.0.1:2000", "10.0.0.100:80").flags(tcp::ACK).payload(&[0; 64]).build();
    x.run(&est);
    let est_ipip = Pkt::tcp4("10.9.0.1:2001", "10.0.0.100:8080").flags(tcp::ACK).payload(&[0; 64]).build();
    x.run(&Pkt::tcp4("10.9.0.1:2001", "10.0.0.100:8080").build());
    x.run(&est_ipip);
    let non_service = Pkt::tcp4("10.9.0.1:1000", "10.0.0.99:80").build();
    // Round r's new SYNs are flows r+1 (flow 0 is entered before the rounds); its cold
    // established packets are ACKs of the flows the round before entered, ~40,000 packets ago
    // (their table lines long out of the caches the test-run syscalls keep churning).
    let new_syn = |i: usize| bench::flow_frame(i + per_round, tcp::SYN);
    let est_cold = |i: usize| bench::flow_frame(i, tcp::ACK);
    for i in 0..per_round {
        x.run(&bench::flow_frame(i, tcp::SYN));
    }
    let refused = |i: usize| Pkt::tcp4(&format!("10.8.0.1:{}", 1024 + i % 60000), "10.0.0.100:9090").build();

    // Rounds interleave every case, so a noisy neighbour or frequency change hits the floors
    // and the cases alike; ratios are taken within a round, then the median over rounds.
    let cold = format!("sluice: established, cold ({} flows, {} table), ipip", human(per_round as u64), human(u64::from(capacity)));
    let names: [(&str, Option<f64>); 8] = [
        ("floor: XDP_PASS", None),
        ("floor: MAC swap + XDP_TX", None),
        ("sluice: non-service traffic", Some(1.9)),
        ("sluice: established flow, l2dsr", None),
        ("sluice: established flow, ipip", Some(3.0)),
        (&cold, None),
        ("sluice: new SYN with admission, ipip", Some(6.5)),
        ("sluice: refused SYN (RST)", None),
    ];
    let mut samples: Vec<Vec<(Duration, Duration)>> = vec![Vec::new(); names.len()];
    for r in 0..rounds {
        samples[0].push(round(&mut floor, &|_| syn(1000), r, None));
        samples[1].push(round(&mut swap, &|_| syn(1000), r, None));
        samples[2].push(round(&mut x, &|_| non_service.clone(), r, Some(Stat::Tcp4)));
        samples[3].push(round(&mut x, &|_| est.clone(), r, Some(Stat::Forwarded)));
        samples[4].push(round(&mut x, &|_| est_ipip.clone(), r, Some(Stat::Forwarded)));
        samples[6].push(round(&mut x, &new_syn, r, Some(Stat::Forwarded)));
        samples[5].push(round(&mut x, &est_cold, r, Some(Stat::Forwarded)));
        samples[7].push(round(&mut x, &refused, r, Some(Stat::RefusedRst)));
    }
    let ratios: Vec<(f64, f64)> = (0..names.len())
        .map(|c| {
            let mut rs: Vec<f64> = (0..rounds).map(|r| samples[c][r].0.as_nanos() as f64 / samples[0][r].0.as_nanos() as f64).collect();
            let mut rp: Vec<f64> = (0..rounds).map(|r| samples[c][r].1.as_nanos() as f64 / samples[0][r].1.as_nanos() as f64).collect();
            rs.sort_by(f64::total_cmp);
            rp.sort_by(f64::total_cmp);
            (rs[rounds / 2], rp[rounds / 2])
        })
        .collect();
    for (c, (name, target)) in names.iter().enumerate() {
        cases.push(Case {
            name: (*name).to_owned(),
            target: *target,
            single: median(samples[c].iter().map(|s| s.0).collect()),
            stats: median(samples[c].iter().map(|s| s.1).collect()),
        });
    }
    let mut table = String::new();
    table.push_str("| case | single-shot ns | ×floor | prog-stats ns | ×floor | target (prog-stats) |\n|---|---:|---:|---:|---:|---|\n");
    for (c, (rs, rp)) in cases.iter().zip(ratios) {
        let target = c.target.map_or_else(String::new, |t| format!("≤ {t:.1}× — {}", if rp <= t { "met" } else { "missed" }));
        writeln!(table, "| {} | {} | {rs:.2} | {} | {rp:.2} | {target} |", c.name, c.single.as_nanos(), c.stats.as_nanos()).expect("write");
    }
    for c in &cases {
        assert!(c.single > Duration::ZERO && c.stats > Duration::ZERO, "{}: no time measured", c.name);
    }
    println!("{table}");

    let machine = bench::machine();
    let body = format!(
        "## Datapath (`cargo xtask bench datapath`)\n\n{machine}\n\
         {rounds} rounds × {per_round} packets per case, the cases interleaved within each round; ns are\n\
         medians over rounds, ratios are taken within a round (case ÷ XDP_PASS floor) and then the median.\n\
         *single-shot*: median of the kernel-measured duration of `BPF_PROG_TEST_RUN` with `repeat = 1`\n\
         (includes the test-run harness's own per-call overhead). *prog-stats*: the kernel's per-program\n\
         `run_time_ns / run_cnt` (BPF_ENABLE_STATS) over the same runs: the program alone.\n\n{table}"
    );
    sluice_tests::write_section(&out_path, "bench-datapath", &body);
    println!("wrote {}", out_path.display());
}
