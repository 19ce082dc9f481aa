//! `cargo xtask bench xdp`: packets per second through Sluice's XDP program on one core, with
//! frames injected by BPF_PROG_TEST_RUN in live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`):
//! the program's XDP_TX really transmits, out of one end of a veth pair whose other end drops
//! (an XDP_DROP program), all inside a network namespace of the bench's own. The MAC-swap floor
//! runs the same frames in the same run; the result is Sluice's rate as a share of the floor's.
//!
//! A test run repeats one frame, so for many flows both Sluice (`bench_vary`) and the floor
//! (`floor_vary`) sit behind the same rewrite of the IPv4 source address: frame i comes from
//! `base + i % modulo`. Every measurement checks that each frame reached the intended outcome
//! (forwarded, and for new flows a new flow in the table), so a broken setup cannot pass as fast.
//!
//! Live-frames mode recycles a frame's page without restoring its bytes: a frame the program
//! rewrites in place (a refusal's RST) would come back as a later frame. So the bench's services
//! refuse by dropping (the frame stays as it was), and its flow table is twice the flows it holds,
//! because the table refuses a few new flows in 10,000 once past half full (`flows.capacity` in
//! README.md).
//!
//! `SLUICE_BENCH_SHORT=1` (the test suite): one round, 1,000 flows, few frames.

use std::{fmt::Write as _, net::SocketAddr, path::PathBuf, time::Duration};

use aya::{
    maps::Array,
    programs::{xdp::XdpMode, TestRun as _, TestRunAttrs, TestRunOptions, Xdp},
};
use lb_common::{Reason, Stat, MODE_IPIP, MODE_L2DSR, REJECT_DROP};
use lb_userspace::{config::Proto, explain::flow_key};
use sluice_tests::{
    bench,
    netns::{self, Netns},
    packet::{tcp, Pkt},
    testrun::XdpRunner,
};

/// Rounds; frames per established-flow measurement; the least new flows per round; the table
/// sizes (established flows per service).
fn plan() -> (usize, u32, u32, &'static [u32]) {
    bench::pick((5, 2_000_000, 10_000, &[10_000, 1_000_000]), (1, 20_000, 1_000, &[1_000]))
}
/// Frames a test run hands the program per batch (the kernel's maximum is 256).
const BATCH: u32 = 64;
const VIP: &str = "10.0.0.100";
/// Sources of the prefilled l2dsr and ipip flows, and of the new flows.
const BASE_L2: u32 = u32::from_be_bytes([10, 64, 0, 0]);
const BASE_IPIP: u32 = u32::from_be_bytes([10, 128, 0, 0]);
const BASE_NEW: u32 = u32::from_be_bytes([100, 64, 0, 0]);
const SPORT: u16 = 40000;

/// The `xdp_md` a live run starts from: the frame arrives on `ifindex`, queue 0.
fn ctx(len: usize, ifindex: u32) -> [u8; 24] {
    let mut c = [0u8; 24];
    for (i, v) in [0u32, len as u32, 0, ifindex, 0, 0].into_iter().enumerate() {
        c[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    c
}

/// Runs `frame` `repeat` times in live-frames mode; the kernel's time per frame.
fn live(x: &mut XdpRunner, frame: &[u8], ifindex: u32, repeat: u32) -> Duration {
    let c = ctx(frame.len(), ifindex);
    let opts = TestRunOptions { data_in: Some(frame), ctx_in: Some(&c), repeat, attrs: TestRunAttrs::new().xdp_live_frames(BATCH), ..TestRunOptions::new() };
    x.prog().test_run(opts).unwrap_or_else(|e| panic!("live-frames test run: {e}")).duration
}

/// Frame i's source becomes `base + (seq + i) % modulo` (modulo 0: the frame as built).
fn set_vary(x: &mut XdpRunner, seq: u32, modulo: u32, base: u32) {
    let mut a: Array<_, u32> = Array::try_from(x.ebpf.map_mut("BENCH_VARY").expect("BENCH_VARY")).expect("array");
    for (i, v) in [seq, modulo, base].into_iter().enumerate() {
        a.set(i as u32, v, 0).expect("BENCH_VARY");
    }
}

/// One measurement of Sluice: the frames all forwarded, or the bench stops and says what
/// happened to the others (the run's outcomes, the services' refusals by reason).
fn sluice(x: &mut XdpRunner, frame: &[u8], ifindex: u32, repeat: u32, what: &str) -> Duration {
    let before = x.stats();
    let d = live(x, frame, ifindex, repeat);
    let after = x.stats();
    let got = after.get(Stat::Forwarded).packets - before.get(Stat::Forwarded).packets;
    if got != u64::from(repeat) {
        let outcomes: Vec<String> =
            after.outcomes.iter().zip(&before.outcomes).filter(|(a, b)| a.packets != b.packets).map(|(a, b)| format!("{} {}", a.outcome, a.packets - b.packets)).collect();
        let refusals: Vec<String> = [1, 2]
            .iter()
            .flat_map(|&id| {
                let r = x.tables().service_stats(id).expect("SVC_STATS").refused;
                Reason::ALL.iter().filter(move |&&why| r.get(why) > 0).map(move |&why| format!("service {id}: {} {}", why.name(), r.get(why)))
            })
            .collect();
        panic!("{what}: {got} of {repeat} frames forwarded; this run's outcomes: {}; refusals so far: {}", outcomes.join(", "), refusals.join(", "));
    }
    d
}

fn pps(d: Duration) -> f64 {
    1e9 / d.as_nanos().max(1) as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Pins the calling thread to the last CPU: "one core".
fn pin_to_one_cpu() -> usize {
    let cpu = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) - 1;
    // SAFETY: a zeroed cpu_set_t is valid; sched_setaffinity(0) applies to this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set), 0, "sched_setaffinity");
    }
    cpu
}

struct Row {
    case: String,
    sluice_pps: f64,
    floor_pps: f64,
    ratio: f64,
}

fn main() {
    let out_path: PathBuf = bench::out_path();
    let (rounds, est_frames, _, sizes) = plan();
    let ns = Netns::new("bxdp");
    netns::veth(&ns, "bx0", &ns, "bx1");
    let (rows, cpu) = ns.run(|| {
        let cpu = pin_to_one_cpu();
        let ifindex = nix::net::if_::if_nametoindex("bx0").expect("bx0");
        // The receiving end drops: veth hands XDP_TX frames to its peer only when the peer
        // runs an XDP program.
        let mut sink = XdpRunner::program(&bench::opts(1), "floor_drop");
        let sink_prog: &mut Xdp = sink.prog();
        let _link = sink_prog.attach("bx1", XdpMode::Driver).expect("attaching floor_drop to bx1");
        let mut rows = Vec::new();
        for &flows in sizes {
            rows.extend(table(flows, ifindex));
        }
        (rows, cpu)
    });
    drop(ns);

    assert_eq!(rows.len(), 5 + 3 * (sizes.len() - 1), "a row per case");
    for r in &rows {
        assert!(r.sluice_pps > 0.0 && r.floor_pps > 0.0 && r.ratio.is_finite(), "{}: {} and {} pps", r.case, r.sluice_pps, r.floor_pps);
    }
    let mut table = String::from("| case | sluice Mpps | floor Mpps | sluice ÷ floor | target |\n|---|---:|---:|---:|---|\n");
    for r in &rows {
        let target = if r.case.contains("established") { format!("≥ 0.70 — {}", if r.ratio >= 0.70 { "met" } else { "missed" }) } else { String::new() };
        writeln!(table, "| {} | {:.2} | {:.2} | {:.2} | {target} |", r.case, r.sluice_pps / 1e6, r.floor_pps / 1e6, r.ratio).expect("write");
    }
    println!("{table}");
    let machine = bench::machine();
    let body = format!(
        "## XDP forwarding rate (`cargo xtask bench xdp`)\n\n{machine}\n\
         One core (CPU {cpu}); frames injected with `BPF_PROG_TEST_RUN` in live-frames mode, batches of {BATCH}:\n\
         XDP_TX really transmits, out of a veth whose peer drops with an XDP program, in the bench's own\n\
         namespace. 118-byte TCP frames (64 bytes of payload). Rates are the kernel's time per frame,\n\
         median of {rounds} rounds, cases interleaved; *floor* is the MAC-swap + XDP_TX program behind the same\n\
         source-address rewrite as Sluice (`floor_vary` / `bench_vary`), so the ratio is the rate Sluice keeps.\n\
         *established*: {est_frames} frames walking round-robin over N established flows of the service;\n\
         *new*: SYNs from fresh sources, each admitted and inserted (the round's new flows are removed\n\
         after it, so the table holds N flows per service again). The table's `flows.capacity` is twice\n\
         the flows it holds at most (2 N + the round's new flows; past half full it refuses a few in\n\
         10,000). Every frame is checked forwarded.\n\n{table}"
    );
    sluice_tests::write_section(&out_path, "bench-xdp", &body);
    println!("wrote {}", out_path.display());
}

/// Every case with `flows` established flows per service in the table.
#[expect(clippy::many_single_char_names, reason = "short names for the rows' parts")]
fn table(flows: u32, ifindex: u32) -> Vec<Row> {
    let (rounds, est_frames, least_new, _) = plan();
    let new_frames = (flows / 10).clamp(least_new, 100_000);
    // Twice the most flows it will hold: fuller, a few new flows in 10,000 would find both of
    // their buckets full and be refused (flow_table_full) before the table is.
    let capacity = 2 * (2 * flows + new_frames);
    let mut x = XdpRunner::program(&bench::opts(capacity), "bench_vary");
    // Refusals drop: a RST is written into the frame's page, which live-frames mode hands the
    // program again, unrestored, as a later frame.
    bench::install_with(&mut x, 80, MODE_L2DSR, u32::MAX, 1, REJECT_DROP);
    bench::install_with(&mut x, 8080, MODE_IPIP, u32::MAX, 2, REJECT_DROP);
    let mut swap = XdpRunner::program(&bench::opts(1), "floor_macswap");
    let mut floor = XdpRunner::program(&bench::opts(1), "floor_vary");

    let frame = |port: u16, flags: u8, payload: usize| Pkt::tcp4(&format!("10.9.0.1:{SPORT}"), &format!("{VIP}:{port}")).flags(flags).payload(&vec![0; payload]).build();
    let (syn80, ack80) = (frame(80, tcp::SYN, 0), frame(80, tcp::ACK, 64));
    let (syn8080, ack8080) = (frame(8080, tcp::SYN, 0), frame(8080, tcp::ACK, 64));

    // Prefill: N handshakes per service (SYN admits and inserts, ACK establishes).
    let started = std::time::Instant::now();
    for (base, syn, ack, id) in [(BASE_L2, &syn80, &ack80, 1), (BASE_IPIP, &syn8080, &ack8080, 2)] {
        set_vary(&mut x, 0, flows, base);
        sluice(&mut x, syn, ifindex, flows, &format!("prefill SYN, backend {id}"));
        set_vary(&mut x, 0, flows, base);
        sluice(&mut x, ack, ifindex, flows, &format!("prefill ACK, backend {id}"));
        let open = x.tables().conns(id).expect("conns");
        assert_eq!(open, u64::from(flows), "prefill: backend {id} holds {open} connections, not {flows}");
    }
    println!("{flows} flows per service prefilled in {:.1}s", started.elapsed().as_secs_f64());

    let mut samples: Vec<Vec<(f64, f64)>> = vec![Vec::new(); 5];
    let mut new_seq = 0u32;
    for _ in 0..rounds {
        // One flow, the frame as built: the plain floor.
        set_vary(&mut x, 0, 0, 0);
        let f = pps(live(&mut swap, &ack80, ifindex, est_frames));
        samples[0].push((pps(sluice(&mut x, &ack80, ifindex, est_frames, "one flow, l2dsr")), f));
        let f_ipip = pps(live(&mut swap, &ack8080, ifindex, est_frames));
        samples[1].push((pps(sluice(&mut x, &ack8080, ifindex, est_frames, "one flow, ipip")), f_ipip));

        // N flows: both programs behind the source rewrite.
        set_vary(&mut floor, 0, flows, BASE_L2);
        let f = pps(live(&mut floor, &ack80, ifindex, est_frames));
        set_vary(&mut x, 0, flows, BASE_L2);
        samples[2].push((pps(sluice(&mut x, &ack80, ifindex, est_frames, "established l2dsr")), f));
        set_vary(&mut floor, 0, flows, BASE_IPIP);
        let f = pps(live(&mut floor, &ack8080, ifindex, est_frames));
        set_vary(&mut x, 0, flows, BASE_IPIP);
        samples[3].push((pps(sluice(&mut x, &ack8080, ifindex, est_frames, "established ipip")), f));

        // New flows: fresh sources, admitted and inserted, then removed again.
        set_vary(&mut floor, new_seq, u32::MAX, BASE_NEW);
        let f = pps(live(&mut floor, &syn8080, ifindex, new_frames));
        set_vary(&mut x, new_seq, u32::MAX, BASE_NEW);
        let open = x.tables().conns(2).expect("conns");
        let d = sluice(&mut x, &syn8080, ifindex, new_frames, "new flows");
        let added = x.tables().conns(2).expect("conns") - open;
        assert_eq!(added, u64::from(new_frames), "new flows: {added} admitted of {new_frames}");
        samples[4].push((pps(d), f));
        let mut t = x.tables();
        // One mapping of the table for all of them (a mapping maps every page at once).
        let table = t.flow_table().expect("mmap");
        for i in 0..new_frames {
            let src = SocketAddr::from((BASE_NEW.wrapping_add(new_seq + i).to_be_bytes(), SPORT));
            let dst: SocketAddr = format!("{VIP}:8080").parse().expect("addr");
            let e = table.get(&flow_key(src, dst, Proto::Tcp)).expect("a new flow");
            assert!(table.remove(&e), "removing a new flow");
        }
        t.set_conns(2, open).expect("conns");
        new_seq += new_frames;
    }
    let names = [
        "one established flow, l2dsr (floor: MAC swap)".to_owned(),
        "one established flow, ipip (floor: MAC swap)".to_owned(),
        format!("established, {} flows, l2dsr", human(flows)),
        format!("established, {} flows, ipip", human(flows)),
        format!("new flows (SYN, admission, insert), ipip, table of {}", human(flows)),
    ];
    // The one-flow cases once, with the first table.
    let skip = if flows == plan().3[0] { 0 } else { 2 };
    names
        .into_iter()
        .zip(samples)
        .skip(skip)
        .map(|(case, s)| Row {
            case,
            sluice_pps: median(s.iter().map(|p| p.0).collect()),
            floor_pps: median(s.iter().map(|p| p.1).collect()),
            ratio: median(s.iter().map(|p| p.0 / p.1).collect()),
        })
        .collect()
}

fn human(n: u32) -> String {
    if n >= 1_000_000 {
        format!("{}M", n / 1_000_000)
    } else {
        format!("{}k", n / 1000)
    }
}
