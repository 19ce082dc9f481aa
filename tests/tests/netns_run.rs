//! `sluice run` attached to a veth in its own namespace counts real packets sent from another
//! namespace; `sluice status` and `bpftool` read them from the pins; SIGTERM detaches cleanly.

use std::{
    net::{TcpStream, UdpSocket},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use serde_json::Value;
use sluice_tests::{
    netns::{send_raw, veth, Netns},
    packet::{Pkt, L4, PROTO_TCP},
    sluice_bin, PinDir,
};

const UDP4: u64 = 25;
const TCP4: u64 = 7;
const UDP6: u64 = 11;
const RAW_TRUNCATED_TCP: u64 = 3;

fn status(pins: &Path) -> Value {
    let out = Command::new(sluice_bin()).args(["status", "--json", "--pin-dir"]).arg(pins).output().expect("sluice status");
    assert!(out.status.success(), "sluice status: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

fn packets(v: &Value, outcome: &str) -> u64 {
    v["outcomes"].as_array().expect("outcomes").iter().find(|o| o["outcome"] == outcome).unwrap_or_else(|| panic!("no outcome {outcome}"))["packets"].as_u64().expect("packets")
}

#[test]
fn sluice_run_counts_real_packets_from_another_namespace() {
    let lb = Netns::new("lb");
    let client = Netns::new("cl");
    veth(&lb, "lb0", &client, "cl0");
    lb.addr_add("lb0", "10.201.0.1/24");
    client.addr_add("cl0", "10.201.0.2/24");
    lb.addr_add("lb0", "fd00:201::1/64");
    client.addr_add("cl0", "fd00:201::2/64");
    let lb_mac = lb.mac("lb0");
    let cl_mac = client.mac("cl0");

    let pins = PinDir::new();
    let mut daemon = lb.spawn(lb.command(sluice_bin()).args(["run", "--iface", "lb0", "--pin-dir"]).arg(&pins.0));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pins.0.join("STATS").exists() {
        if let Some(out) = daemon.exited() {
            panic!("sluice run exited early ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
        }
        assert!(Instant::now() < deadline, "sluice run did not pin its maps within 20s");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(lb.link_show("lb0").contains("xdp"), "no XDP program on lb0: {}", lb.link_show("lb0"));
    let base = status(&pins.0);

    client.run(|| {
        let udp = UdpSocket::bind("0.0.0.0:0").expect("bind");
        for i in 0..UDP4 {
            udp.send_to(format!("datagram {i}").as_bytes(), "10.201.0.1:9").expect("send udp4");
        }
        for _ in 0..TCP4 {
            // Nothing listens on 81: the SYN is answered by a RST, exactly one packet in.
            let err = TcpStream::connect_timeout(&"10.201.0.1:81".parse().expect("addr"), Duration::from_secs(5));
            assert!(err.is_err(), "connection to a closed port succeeded");
        }
        let udp6 = UdpSocket::bind("[::]:0").expect("bind6");
        for _ in 0..UDP6 {
            udp6.send_to(b"v6", "[fd00:201::1]:9").expect("send udp6");
        }
        for _ in 0..RAW_TRUNCATED_TCP {
            let mut p = Pkt::udp4("10.201.0.2:1234", "10.201.0.1:80");
            p.v4_mut().l4 = L4::Raw { proto: PROTO_TCP, payload: vec![0; 12] };
            p.dst_mac = lb_mac;
            p.src_mac = cl_mac;
            send_raw("cl0", &p.build());
        }
    });

    let want = [("udp4", UDP4), ("tcp4", TCP4), ("udp6", UDP6), ("truncated_tcp", RAW_TRUNCATED_TCP)];
    let deadline = Instant::now() + Duration::from_secs(10);
    let now = loop {
        let now = status(&pins.0);
        if want.iter().all(|(o, n)| packets(&now, o) - packets(&base, o) >= *n) || Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for (outcome, n) in want {
        assert_eq!(packets(&now, outcome) - packets(&base, outcome), n, "{outcome} packets counted");
    }
    let total = now["total_packets"].as_u64().expect("total");
    let sum: u64 = now["outcomes"].as_array().expect("outcomes").iter().map(|o| o["packets"].as_u64().expect("n")).sum();
    assert_eq!(total, sum, "total is the sum of the outcomes");

    // bpftool reads the pinned map with field names (BTF), not hex.
    let dump = Command::new("bpftool").args(["map", "dump", "pinned"]).arg(pins.0.join("STATS")).output().expect("bpftool");
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.status.success() && text.contains("\"packets\"") && text.contains("\"bytes\""), "bpftool dump: {text}");

    let out = daemon.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10));
    assert!(out.status.success(), "sluice run exit: {} {}", out.status, String::from_utf8_lossy(&out.stderr));
    assert!(!lb.link_show("lb0").contains("xdp"), "XDP still attached after SIGTERM");
    assert!(!pins.0.join("STATS").exists(), "pins left behind after SIGTERM");
}

/// Under systemd (`JOURNAL_STREAM` set) every log line is plain text with a syslog priority
/// prefix (`<6>` info) and no colour codes or timestamps, which journald adds itself; the help
/// says which mode detaches on SIGTERM and which keeps forwarding.
#[test]
fn logs_under_systemd_are_journald_lines_and_the_help_tells_the_modes_apart() {
    let lb = Netns::new("jr");
    let peer = Netns::new("jp");
    veth(&lb, "lb0", &peer, "p0");
    let pins = PinDir::new();
    let mut run = lb.spawn(lb.command(sluice_bin()).env("JOURNAL_STREAM", "8:12345").env("RUST_LOG", "info").args(["run", "--iface", "lb0", "--pin-dir"]).arg(&pins.0));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lb.link_show("lb0").contains("xdp") {
        assert!(run.exited().is_none() && Instant::now() < deadline, "sluice run did not attach");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = run.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sluice run exit: {} {log}", out.status);
    assert!(log.lines().count() >= 2, "{log}");
    assert!(has_date_time("2026-12-05T14:15:00.123456Z  INFO sluice: attached") && !has_date_time("<6>sluice: attached to lb0 at 10:15"), "the timestamp matcher");
    for line in log.lines() {
        assert!(line.starts_with("<6>") || line.starts_with("<4>") || line.starts_with("<3>"), "not a journald line: {line:?}");
        assert!(!line.contains('\u{1b}'), "colour codes: {line:?}");
        // `<6>target: message`: the event's target right after the priority, no time or level.
        let target = line[3..].split_once(": ").map_or("", |(t, _)| t);
        assert!(!target.is_empty() && target.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "not `<N>target: message`: {line:?}");
        assert!(!has_date_time(line), "a timestamp: {line:?}");
    }
    let help = Command::new(sluice_bin()).args(["run", "--help"]).output().expect("help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("the datapath keeps forwarding") && help.contains("detached and its pins removed"), "{help}");
}

/// Whether `line` holds a date and time as loggers write them (`2026-12-05T14:15:00`,
/// `2026-12-05 14:15:00`).
fn has_date_time(line: &str) -> bool {
    let shape = b"dddd-dd-dd?dd:dd";
    line.as_bytes().windows(shape.len()).any(|w| {
        w.iter().zip(shape).all(|(c, s)| match s {
            b'd' => c.is_ascii_digit(),
            b'?' => *c == b'T' || *c == b' ',
            s => c == s,
        })
    })
}
