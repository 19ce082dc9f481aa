//! `cargo xtask bench alerts`: how fast the operator hears about refusals, and what watching
//! costs.
//! - alert latency: in the test lab (namespaces, real TCP, the real daemon), a backend with
//!   `max_conns = 1` holds one connection; each trial makes one more client connect, which the
//!   load balancer refuses with a RST; the time from the client seeing the refusal to the webhook
//!   receiver getting the firing `SluiceRefusingConnections` alert. 20 trials; each waits for the
//!   alert to resolve first.
//! - the daemon's CPU with 1,000 backends (10 services × 100) at a 1 s evaluation interval,
//!   idle traffic: utime + stime from /proc over 30 s.
//! Writes its section of BENCHMARKS.md.

use std::{fmt::Write as _, path::PathBuf, time::{Duration, Instant}};

use sluice_tests::{
    l2lab::{wait_for, Lab},
    netns::{veth, Netns},
    sluice_bin, PinDir,
};

const TRIALS: usize = 20;
const CPU_WINDOW: Duration = Duration::from_secs(30);

fn main() {
    let out_path: PathBuf = std::env::args().nth(1).map_or_else(|| "BENCHMARKS.md".into(), PathBuf::from);
    let latencies = alert_latency();
    let cpu = daemon_cpu();

    let mut sorted = latencies.clone();
    sorted.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let median = sorted[sorted.len() / 2];
    let worst = *sorted.last().expect("trials");
    let mut table = String::from("| measurement | result |\n|---|---:|\n");
    writeln!(table, "| alert latency, first refusal → webhook delivery, median of {TRIALS} | {:.1} ms |", ms(median)).expect("w");
    writeln!(table, "| alert latency, worst of {TRIALS} | {:.1} ms |", ms(worst)).expect("w");
    writeln!(table, "| daemon CPU, 1,000 backends, 1 s evaluation, over {}s | {:.2} % of a core |", CPU_WINDOW.as_secs(), cpu * 100.0).expect("w");
    writeln!(table, "| daemon CPU per second (1,000 backends) | {:.2} ms |", cpu * 1e3).expect("w");
    println!("{table}");
    let all: Vec<String> = latencies.iter().map(|d| format!("{:.0}", ms(*d))).collect();
    let body = format!(
        "## Alerting (`cargo xtask bench alerts`)\n\n\
         Latency: the test lab's namespaces, the real daemon, real TCP; one refused connection per\n\
         trial, from the client's `ECONNREFUSED` to the webhook receiver reading the POST of the\n\
         firing `SluiceRefusingConnections` alert (default `refusals_fire_after = 0s`). CPU: the\n\
         real `sluice run --config` with 10 services × 100 backends, no traffic, no health checks,\n\
         `alerts.interval = 1s`; utime + stime from `/proc/PID/stat` over {}s.\n\n{table}\n\
         All {TRIALS} latencies (ms, in order): {}\n",
        CPU_WINDOW.as_secs(),
        all.join(", ")
    );
    sluice_tests::write_section(&out_path, "bench-alerts", &body);
    println!("wrote {}", out_path.display());
}

fn alert_latency() -> Vec<Duration> {
    let lab = Lab::new(1);
    let (port, posts) = lab.webhook_receiver();
    let alerts = format!("[alerts]\nname = \"bench\"\nresolve_after = \"1s\"\nwebhook = {{ url = \"http://127.0.0.1:{port}/api/v2/alerts\", timeout = \"1s\", retries = 1 }}\n");
    lab.write_config_with(&[(1, "max_conns = 1")], &alerts);
    let mut daemon = lab.start_daemon();
    let (_, held) = lab.connect().expect("the one allowed connection");
    let count = |status: &str| posts.0.lock().expect("posts").iter().filter(|(_, b)| b.contains("SluiceRefusingConnections") && b.contains(status)).count();
    let mut out = Vec::new();
    for trial in 0..TRIALS {
        let before = count("\"status\":\"firing\"");
        let e = lab.connect().expect_err("refused: the backend is at max_conns = 1");
        let refused_at = Instant::now();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        wait_for("the firing alert", || count("\"status\":\"firing\"") > before);
        let at = posts.0.lock().expect("posts").iter().filter(|(_, b)| b.contains("SluiceRefusingConnections") && b.contains("\"status\":\"firing\"")).nth(before).expect("post").0;
        out.push(at.saturating_duration_since(refused_at));
        println!("trial {}: {:.1} ms", trial + 1, out[trial].as_secs_f64() * 1e3);
        wait_for("the resolved alert", || count("\"status\":\"resolved\"") > trial);
        // A gap so the next refusal is not within one evaluation of the last.
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(held);
    let _ = daemon.signal_and_wait(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(10));
    lab.detach();
    out
}

/// CPU share of one core used by an idle daemon with 1,000 backends.
fn daemon_cpu() -> f64 {
    let lb = Netns::new("benchlb");
    let peer = Netns::new("benchpeer");
    veth(&lb, "lb0", &peer, "p0");
    let pins = PinDir::new();
    let dir = std::env::temp_dir().join(format!("sluice-bench-alerts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let sock = dir.join("sluice.sock");
    let mut t = format!(
        "[daemon]\ninterface = \"lb0\"\npin_dir = \"{}\"\ncontrol_socket = \"{}\"\njournal = \"{}\"\nmetrics_listen = \"127.0.0.1:19477\"\n[alerts]\ninterval = \"1s\"\n",
        pins.0.display(),
        sock.display(),
        dir.join("journal.jsonl").display()
    );
    for s in 0..10 {
        write!(t, "[[service]]\nname = \"svc{s}\"\nvip = \"10.1.0.{}\"\nport = 80\nproto = \"tcp\"\nring_size = 10007\n", s + 1).expect("w");
        for b in 0..100 {
            write!(t, "[[service.backend]]\naddress = \"10.2.{s}.{}\"\nmax_conns = 1000\nmac = \"02:00:00:00:{s:02x}:{b:02x}\"\n", b + 1).expect("w");
        }
    }
    let cfg = dir.join("bench.toml");
    std::fs::write(&cfg, t).expect("write");
    let mut d = lb.spawn(lb.command(sluice_bin()).arg("run").arg("--config").arg(&cfg));
    wait_for("the daemon", || {
        if let Some(out) = d.exited() {
            panic!("daemon exited: {}", String::from_utf8_lossy(&out.stderr));
        }
        sock.exists()
    });
    // Past the start-up (ring building) before measuring.
    std::thread::sleep(Duration::from_secs(3));
    let ticks = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        // Fields after the ")" of the command name: utime is the 12th, stime the 13th.
        let rest = stat.rsplit_once(')').expect("stat").1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (t0, c0) = (Instant::now(), ticks(d.id()));
    std::thread::sleep(CPU_WINDOW);
    let (secs, c1) = (t0.elapsed().as_secs_f64(), ticks(d.id()));
    let share = (c1 - c0) as f64 / hz / secs;
    let _ = d.signal_and_wait(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(10));
    let _ = std::process::Command::new(sluice_bin()).arg("detach").arg("--pin-dir").arg(&pins.0).output();
    let _ = std::fs::remove_dir_all(&dir);
    share
}
