//! Datapath fuzzing through the real program (BPF_PROG_TEST_RUN): seeded random frames, biased
//! toward almost-valid Ethernet / VLAN / IPv4 / IPv6 / TCP / UDP / IPIP / ICMP headers aimed at
//! configured services (four of them: l2dsr, ipip with spill, UDP, IPv6; one backend with a tiny
//! limit; a flow table small enough to fill), mutated at header fields, truncated at and around
//! header boundaries, or junk. For every frame: never XDP_ABORTED (nor any action Sluice does
//! not use), and exactly one outcome counted. Afterwards every backend's open-connection
//! counter equals the flows in the table that hold one of its slots.
//!
//! `SLUICE_FUZZ_FRAMES` (default 1,000,000) and `SLUICE_FUZZ_SEED` choose the run;
//! `cargo xtask fuzz` runs it longer. A failure prints the seed and the frame to replay it.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use lb_common::{Config, Stat};
use lb_userspace::{config, datapath::LoadOptions, reconcile::Applied};
use rand::{rngs::StdRng, Rng as _, SeedableRng as _};
use sluice_tests::{
    packet::{tcp, Pkt},
    testrun::{XdpRunner, XDP_DROP, XDP_PASS, XDP_TX},
};

const RING_SLOTS: u32 = 8 * 257;
/// BPF_PROG_TEST_RUN refuses XDP frames shorter than an Ethernet header (EINVAL), as drivers
/// never deliver them: the shortest frame fuzzed.
const ETH_MIN: usize = 14;
const FLOW_CAPACITY: u32 = 1024;

const CONFIG: &str = r#"
[daemon]
interface = "lo"
[[service]]
name = "web"
vip = "10.0.0.100"
port = 80
proto = "tcp"
ring_size = 257
[[service.backend]]
address = "10.0.1.11"
max_conns = 300
[[service.backend]]
address = "10.0.1.12"
max_conns = 300
[[service.backend]]
address = "10.0.1.13"
max_conns = 3
[[service]]
name = "tunnel"
vip = "10.0.0.100"
port = 8080
proto = "tcp"
mode = "ipip"
ring_size = 257
overflow = { spill = true, reject = "drop" }
[[service.backend]]
address = "10.0.1.21"
max_conns = 50
[[service.backend]]
address = "10.0.1.22"
max_conns = 50
[[service]]
name = "dns"
vip = "10.0.0.100"
port = 53
proto = "udp"
ring_size = 257
[[service.backend]]
address = "10.0.1.31"
max_conns = 200
[[service]]
name = "web6"
vip = "2001:db8::100"
port = 80
proto = "tcp"
mode = "ipip"
ring_size = 257
[[service.backend]]
address = "2001:db8:1::11"
max_conns = 100
"#;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A valid frame of a random kind, from a small pool of addresses and ports so that flows
/// repeat (SYN, then data, FIN, RST on the same 5-tuple).
fn base_frame(rng: &mut StdRng) -> Vec<u8> {
    let src4 = format!("10.9.0.{}:{}", rng.random_range(1..=4), rng.random_range(1000..1200));
    let flags =
        *[tcp::SYN, tcp::SYN, tcp::ACK, tcp::ACK | tcp::PSH, tcp::FIN | tcp::ACK, tcp::RST, tcp::SYN | tcp::ACK, 0, rng.random()].get(rng.random_range(0..9)).expect("index");
    let payload = vec![0x61; rng.random_range(0..3) * 40];
    match rng.random_range(0..14) {
        0..=3 => Pkt::tcp4(&src4, "10.0.0.100:80").flags(flags).payload(&payload).build(),
        4 | 5 => Pkt::tcp4(&src4, "10.0.0.100:8080").flags(flags).payload(&payload).build(),
        6 => Pkt::udp4(&src4, "10.0.0.100:53").payload(&payload).build(),
        7 => Pkt::tcp6(&format!("[2001:db8:9::{}]:{}", rng.random_range(1..4), rng.random_range(1000..1100)), "[2001:db8::100]:80").flags(flags).payload(&payload).build(),
        8 => Pkt::tcp4(&src4, "10.0.0.100:80").flags(flags).with_vlan(rng.random_range(1..4095)).build(),
        9 => Pkt::tcp4(&src4, "10.0.0.100:80").flags(flags).encap4("10.7.0.1", "10.0.0.100").build(),
        10 => Pkt::icmp4_echo("10.9.0.1", "10.0.0.100").build(),
        11 => Pkt::icmp6_echo("2001:db8:9::1", "2001:db8::100").build(),
        12 => Pkt::tcp4(&src4, "10.0.0.99:80").flags(flags).build(),
        _ => Pkt::arp().build(),
    }
}

/// Header offsets worth corrupting in an untagged IPv4/TCP frame, and boundaries worth cutting at.
const FIELDS: [usize; 14] = [12, 13, 14, 16, 17, 20, 21, 22, 23, 24, 46, 47, 54, 58];
const BOUNDARIES: [usize; 10] = [14, 17, 18, 33, 34, 38, 53, 54, 58, 74];

fn mutate(rng: &mut StdRng, f: &mut Vec<u8>) {
    for _ in 0..rng.random_range(1..=3) {
        match rng.random_range(0..6) {
            0 => {
                let i = FIELDS[rng.random_range(0..FIELDS.len())];
                if i < f.len() {
                    f[i] = rng.random();
                }
            }
            1 => {
                if !f.is_empty() {
                    let i = rng.random_range(0..f.len());
                    f[i] ^= 1 << rng.random_range(0..8);
                }
            }
            2 => {
                let cut = BOUNDARIES[rng.random_range(0..BOUNDARIES.len())] + rng.random_range(0..3);
                f.truncate(cut.min(f.len()));
            }
            3 => {
                // EtherType (or the VLAN's inner one) set to something near-valid.
                let t: [u8; 2] = *[[0x08, 0x00], [0x86, 0xdd], [0x81, 0x00], [0x88, 0xa8], [0x08, 0x06], rng.random()].get(rng.random_range(0..6)).expect("index");
                let at = if rng.random_bool(0.7) { 12 } else { 16 };
                if f.len() >= at + 2 {
                    f[at..at + 2].copy_from_slice(&t);
                }
            }
            4 => {
                let n = rng.random_range(1..64);
                f.extend((0..n).map(|_| rng.random::<u8>()));
            }
            _ => {
                // IPv4 flags/fragment offset: MF or an offset (a fragment), or IHL/version.
                if f.len() > 21 {
                    if rng.random_bool(0.5) {
                        f[20] = rng.random::<u8>() & 0x3f;
                        f[21] = rng.random();
                    } else {
                        f[14] = rng.random();
                    }
                }
            }
        }
    }
}

fn frame(rng: &mut StdRng) -> Vec<u8> {
    match rng.random_range(0..20) {
        // Junk of any length (Ethernet-sized or not).
        0 => (0..rng.random_range(ETH_MIN..200)).map(|_| rng.random::<u8>()).collect(),
        1..=8 => base_frame(rng),
        _ => {
            let mut f = base_frame(rng);
            mutate(rng, &mut f);
            f
        }
    }
}

#[test]
fn fuzzed_frames_never_abort_count_once_and_leave_counters_equal_to_flows() {
    let frames = env_u64("SLUICE_FUZZ_FRAMES", 1_000_000);
    let seed = env_u64("SLUICE_FUZZ_SEED", 0x5_1u64 << 32 | 0xce);
    let config = Config { has_gateway: 1, gateway_mac: [2, 0, 0, 0, 0, 0xaa], events_per_sec: 100, ..Config::DEFAULT };
    let mut x = XdpRunner::balancer_with(&LoadOptions { config, flow_capacity: FLOW_CAPACITY, ring_slots: RING_SLOTS });
    let (cfg, _) = config::parse(Path::new("fuzz.toml"), CONFIG).unwrap_or_else(|e| panic!("{e}"));
    let mut applied = Applied::new(RING_SLOTS);
    let mac_of = |_: IpAddr| Some([2, 0xbb, 0, 0, 0, 1]);
    applied.apply(&mut x.tables(), &cfg, &mac_of, |t, id| t.conns(id).expect("conns")).expect("apply");

    let mut rng = StdRng::seed_from_u64(seed);
    let mut verdicts = [0u64; 5];
    let mut checked_total = 0;
    for i in 0..frames {
        let f = frame(&mut rng);
        let out = x.run(&f);
        assert!(matches!(out.verdict, XDP_DROP | XDP_PASS | XDP_TX), "seed {seed:#x}, frame {i}: verdict {} (0 = XDP_ABORTED) for {f:02x?}", out.verdict);
        verdicts[out.verdict as usize] += 1;
        // Exactly one outcome per frame: checked frame by frame for the first 20,000 (a
        // per-CPU map read each), then as a total.
        if i < 20_000 {
            let total = x.stats().total_packets;
            assert_eq!(total, i + 1, "seed {seed:#x}, frame {i}: {} outcomes counted for one frame {f:02x?}", total - checked_total);
            checked_total = total;
        }
    }
    let stats = x.stats();
    assert_eq!(stats.total_packets, frames, "outcomes counted for {frames} frames");
    let hit: BTreeMap<&str, u64> = stats.outcomes.iter().filter(|o| o.packets > 0).map(|o| (o.outcome.as_str(), o.packets)).collect();
    println!("seed {seed:#x}: {frames} frames; verdicts drop {} pass {} tx {}; outcomes {hit:?}", verdicts[1], verdicts[2], verdicts[3]);
    // The generator must reach deep: admission, refusals, every kind of malformed input.
    for must in [
        Stat::Forwarded,
        Stat::RefusedRst,
        Stat::RefusedDrop,
        Stat::ForwardedNoFlow,
        Stat::Fragment,
        Stat::NonIp,
        Stat::TruncatedIpv4,
        Stat::TruncatedTcp,
        Stat::BadIpv4,
        Stat::IcmpEchoReplied,
    ] {
        assert!(stats.get(must).packets > 0, "seed {seed:#x}: no frame reached outcome {}: {hit:?}", must.name());
    }

    // Counters equal flows: every backend's CONNS is the number of flows holding its slot.
    let t = x.tables();
    let mut holding: BTreeMap<u32, u64> = BTreeMap::new();
    let flows = t.flows().expect("flows");
    for (_, f) in &flows {
        if f.counted != 0 {
            *holding.entry(f.backend_id).or_default() += 1;
        }
    }
    let mut ids: Vec<u32> = applied.services.values().flat_map(|s| s.backends.values().map(|b| b.id)).collect();
    ids.sort_unstable();
    for id in ids {
        let conns = t.conns(id).expect("conns");
        assert_eq!(conns, holding.get(&id).copied().unwrap_or(0), "seed {seed:#x}: backend {id}: CONNS says {conns} open, the table holds {:?}", holding.get(&id));
    }
    println!("{} flows in the table (capacity {FLOW_CAPACITY}); open per backend {holding:?}", flows.len());
}

/// The config parser on seeded mutations of a valid config (lines dropped, duplicated or
/// swapped, values replaced, bytes flipped) and on junk: it never panics, and every rejection
/// names the file and says why.
#[test]
fn config_parser_rejects_mutated_configs_with_a_named_reason() {
    let seed = env_u64("SLUICE_FUZZ_SEED", 0x5_1u64 << 32 | 0xce);
    let mut rng = StdRng::seed_from_u64(seed);
    let lines: Vec<&str> = CONFIG.lines().collect();
    let values = ["0", "-1", "4294967296", "\"\"", "\"10.0.0.999\"", "true", "[]", "{}", "\"ipip\"", "\"2001:db8::1\"", "1e9", "\"\\u0000\""];
    let (mut accepted, mut rejected) = (0, 0);
    for case in 0..5000 {
        let mut l: Vec<String> = lines.iter().map(|s| (*s).to_owned()).collect();
        for _ in 0..rng.random_range(1..4) {
            if l.is_empty() {
                break;
            }
            let i = rng.random_range(0..l.len());
            match rng.random_range(0..5) {
                0 => drop(l.remove(i)),
                1 => l.insert(i, l[i].clone()),
                2 => {
                    let j = rng.random_range(0..l.len());
                    l.swap(i, j);
                }
                3 => {
                    if let Some((k, _)) = l[i].split_once(" = ") {
                        l[i] = format!("{k} = {}", values[rng.random_range(0..values.len())]);
                    }
                }
                _ => {
                    let mut b = l[i].clone().into_bytes();
                    if !b.is_empty() {
                        let j = rng.random_range(0..b.len());
                        b[j] = rng.random_range(0x20..0x7f);
                    }
                    l[i] = String::from_utf8_lossy(&b).into_owned();
                }
            }
        }
        let text = if case % 10 == 0 { (0..rng.random_range(0..400)).map(|_| rng.random_range(0x20u8..0x7f) as char).collect() } else { l.join("\n") };
        match config::parse(Path::new("fuzz.toml"), &text) {
            Ok(_) => accepted += 1,
            Err(e) => {
                rejected += 1;
                let msg = e.to_string();
                assert!(msg.contains("fuzz.toml") && msg.len() > "fuzz.toml".len() + 10, "seed {seed:#x} case {case}: rejection without a reason: {msg:?}\n{text}");
            }
        }
    }
    println!("config fuzz, seed {seed:#x}: {accepted} accepted, {rejected} rejected with a named reason");
    assert!(rejected > 1000 && accepted > 100, "the mutations should produce both: {accepted} accepted, {rejected} rejected");
}
