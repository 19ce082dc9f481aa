//! Two builds of the balancer in one run: this build (B) against another build's object file
//! (A), for the datapath cases a change is meant to move. Run-to-run noise on a shared VM
//! (±15 %) is larger than most single changes; interleaving A and B within each round (and
//! alternating which goes first) compares them under the same conditions. Not a recorded
//! benchmark: a tool for deciding whether a change is a gain.
//!
//! `cargo build --release -p sluice-tests --bin bench_ab`, keep
//! `target/release/build/lb-userspace-*/out/lb-ebpf` of the build to compare against, then
//! `sudo target/release/bench_ab <that object>` on the new build.

use lb_common::{MODE_IPIP, MODE_L2DSR};
use sluice_tests::{
    bench,
    packet::{tcp, Pkt},
    testrun::XdpRunner,
};

/// A case's frame for packet `i` of the run.
type Frames<'a> = &'a dyn Fn(usize) -> Vec<u8>;

const ROUNDS: usize = 15;
const PER_ROUND: usize = 10_000;

/// Mean prog-stats ns per packet over one round of `frames`.
fn round(x: &mut XdpRunner, frames: Frames, round: usize) -> f64 {
    let batch: Vec<Vec<u8>> = (0..PER_ROUND).map(|i| frames(round * PER_ROUND + i)).collect();
    bench::run_batch(x, &batch).1.as_nanos() as f64
}

fn install(x: &mut XdpRunner) {
    bench::install(x, 8080, MODE_IPIP, u32::MAX, 2);
    bench::install(x, 9090, MODE_L2DSR, 0, 3);
    x.run(&Pkt::tcp4("10.9.0.1:2001", "10.0.0.100:8080").build());
}

fn quartiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 4], v[v.len() / 2], v[3 * v.len() / 4])
}

fn main() {
    let path = std::env::args().nth(1).expect("usage: bench_ab <object file of build A>");
    let raw = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    // The object parser wants the bytes 8-aligned.
    let mut words = vec![0u64; raw.len().div_ceil(8)];
    // SAFETY: a byte view of the u64 buffer, within its length.
    let object = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), raw.len()) };
    object.copy_from_slice(&raw);

    let opts = bench::opts(1 << 20);
    let mut floor = XdpRunner::program(&bench::opts(1024), "floor_pass");
    let mut a = XdpRunner::balancer_from(&opts, object);
    let mut b = XdpRunner::balancer_with(&opts);
    install(&mut a);
    install(&mut b);
    let est = Pkt::tcp4("10.9.0.1:2001", "10.0.0.100:8080").flags(tcp::ACK).payload(&[0; 64]).build();
    // As in bench_datapath: round r enters flows r+1 (flow 0 before the rounds), and its cold
    // packets are ACKs of the flows the round before entered.
    let new_syn = |i: usize| bench::flow_frame(i + PER_ROUND, tcp::SYN);
    let est_cold = |i: usize| bench::flow_frame(i, tcp::ACK);
    for i in 0..PER_ROUND {
        a.run(&bench::flow_frame(i, tcp::SYN));
        b.run(&bench::flow_frame(i, tcp::SYN));
    }
    let refused = |i: usize| Pkt::tcp4(&format!("10.8.0.1:{}", 1024 + i % 60000), "10.0.0.100:9090").build();
    let floor_frame = Pkt::tcp4("10.9.0.1:1000", "10.0.0.99:80").build();
    let cases: [(&str, Frames); 4] =
        [("established flow, ipip", &|_| est.clone()), ("new SYN with admission, ipip", &new_syn), ("established, cold, ipip", &est_cold), ("refused SYN", &refused)];
    let mut res: Vec<Vec<(f64, f64)>> = vec![Vec::new(); cases.len()];
    for r in 0..ROUNDS {
        for (c, (_, frames)) in cases.iter().enumerate() {
            let fl = round(&mut floor, &|_| floor_frame.clone(), r);
            let (ta, tb) = if r % 2 == 0 {
                let ta = round(&mut a, frames, r);
                (ta, round(&mut b, frames, r))
            } else {
                let tb = round(&mut b, frames, r);
                (round(&mut a, frames, r), tb)
            };
            res[c].push((ta / fl, tb / fl));
        }
    }
    println!("{ROUNDS} rounds × {PER_ROUND} packets; ×floor = prog-stats ÷ XDP_PASS floor in the same round (medians)");
    for (c, (name, _)) in cases.iter().enumerate() {
        let (_, ra, _) = quartiles(res[c].iter().map(|x| x.0).collect());
        let (_, rb, _) = quartiles(res[c].iter().map(|x| x.1).collect());
        let (q1, m, q3) = quartiles(res[c].iter().map(|x| x.1 / x.0).collect());
        println!("{name:30} A {ra:5.2}×  B {rb:5.2}×  B/A {m:.3} (quartiles {q1:.3}–{q3:.3})");
    }
}
