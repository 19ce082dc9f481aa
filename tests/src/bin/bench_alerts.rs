//! `cargo xtask bench alerts`: how fast the operator hears about refusals, and what watching
//! costs.
//! - alert latency: in the test lab (namespaces, real TCP, the real daemon), a backend with
//!   `max_conns = 1` holds one connection; each trial makes one more client connect, which the
//!   load balancer refuses with a RST; the time from the client seeing the refusal to the webhook
//!   receiver getting the firing `SluiceRefusingConnections` alert. 20 trials; each waits for the
//!   alert to resolve first.
//! - the daemon's CPU with 100 to 10,000 backends (services of 100) at a 1 s evaluation
//!   interval, idle traffic: utime + stime from /proc over 20 s; the same with a `/metrics`
//!   scrape every 15 s (Prometheus' default interval); the scrape's time and size; RssAnon.
//!
//! Writes its section of BENCHMARKS.md. `SLUICE_BENCH_SHORT=1` (the test suite): one trial, 100
//! backends, 1 s windows.

use std::{
    fmt::Write as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use sluice_tests::{
    bench,
    l2lab::{wait_for, Lab},
    netns::{veth, Netns},
    sluice_bin, PinDir,
};

/// Latency trials; the window CPU is measured over; the backends configured for the CPU figures
/// (services of 100 backends each).
fn plan() -> (usize, Duration, &'static [u32]) {
    bench::pick((20, Duration::from_secs(20), &[100, 1_000, 3_000, 10_000]), (1, Duration::from_secs(1), &[100]))
}
/// Prometheus' default scrape interval.
const SCRAPE_EVERY: Duration = Duration::from_secs(15);

/// What watching `backends` backends costs.
struct Cost {
    backends: u32,
    /// Share of one core with no scrapes.
    cpu: f64,
    /// The same with a scrape every [`SCRAPE_EVERY`].
    cpu_scraped: f64,
    /// The slowest of the scrapes, and the body's size.
    scrape: Duration,
    scrape_bytes: usize,
    rss_anon_kib: u64,
}

fn main() {
    let out_path: PathBuf = bench::out_path();
    let (trials, cpu_window, sizes) = plan();
    let latencies = alert_latency();
    assert_eq!(latencies.len(), trials, "a latency per trial");
    let costs: Vec<Cost> = sizes.iter().map(|&n| daemon_cost(n)).collect();
    for c in &costs {
        assert!(c.scrape_bytes > 0 && c.rss_anon_kib > 0, "{} backends: a scrape of {} bytes, RssAnon {} KiB", c.backends, c.scrape_bytes, c.rss_anon_kib);
    }
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned()))
        .unwrap_or_default();

    let mut sorted = latencies.clone();
    sorted.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let median = sorted[sorted.len() / 2];
    let worst = *sorted.last().expect("trials");
    let mut table = String::from("| measurement | result |\n|---|---:|\n");
    writeln!(table, "| alert latency, first refusal → webhook delivery, median of {trials} | {:.1} ms |", ms(median)).expect("w");
    writeln!(table, "| alert latency, worst of {trials} | {:.1} ms |", ms(worst)).expect("w");
    writeln!(table, "| trials under 10 ms | {} of {trials} |", latencies.iter().filter(|d| **d < Duration::from_millis(10)).count()).expect("w");
    let mut cost = String::from("| backends | daemon CPU, idle | with a scrape every 15 s | slowest scrape | scrape size | RssAnon |\n|---:|---:|---:|---:|---:|---:|\n");
    for c in &costs {
        writeln!(
            cost,
            "| {} | {:.2} % | {:.2} % | {:.1} ms | {:.1} MB | {:.1} MiB |",
            c.backends,
            c.cpu * 100.0,
            c.cpu_scraped * 100.0,
            ms(c.scrape),
            c.scrape_bytes as f64 / 1e6,
            c.rss_anon_kib as f64 / 1024.0
        )
        .expect("w");
    }
    println!("{table}\n{cost}");
    let svg_dir = out_path.parent().unwrap_or(std::path::Path::new(".")).join("docs/bench");
    std::fs::create_dir_all(&svg_dir).expect("docs/bench");
    let curve = |f: &dyn Fn(&Cost) -> f64| costs.iter().map(|c| (f64::from(c.backends), f(c))).collect::<Vec<_>>();
    sluice_lab::plot::lines(
        &svg_dir.join("alerts-cpu.svg"),
        "Daemon CPU against the number of backends (alerts every 1 s)",
        "backends",
        "% of a core",
        &[("idle".into(), curve(&|c| c.cpu * 100.0)), ("with a scrape every 15 s".into(), curve(&|c| c.cpu_scraped * 100.0))],
    )
    .expect("plot");
    sluice_lab::plot::lines(
        &svg_dir.join("alerts-scrape.svg"),
        "/metrics scrape time against the number of backends",
        "backends",
        "ms",
        &[("slowest scrape".into(), curve(&|c| ms(c.scrape)))],
    )
    .expect("plot");
    let all: Vec<String> = latencies.iter().map(|d| format!("{:.0}", ms(*d))).collect();
    let body = format!(
        "## Alerting (`cargo xtask bench alerts`)\n\n\
         Machine: {cpu_model}, {} CPUs.\n\n\
         Latency: the test lab's namespaces, the real daemon, real TCP; one refused connection per\n\
         trial, from the client's `ECONNREFUSED` to the webhook receiver reading the POST of the\n\
         firing `SluiceRefusingConnections` alert (default `refusals_fire_after = 0s`).\n\n{table}\n\
         All {trials} latencies (ms, in order): {}\n\n\
         What watching costs: the real `sluice run --config` with services of 100 backends, no\n\
         traffic, no health checks, `alerts.interval = 1s`, the default flow table (1M flows: its\n\
         GC sweep is in these figures); utime + stime from `/proc/PID/stat` over {}s, without and\n\
         then with a `/metrics` scrape every 15 s; RssAnon after the scrapes. Plots:\n\
         [CPU](docs/bench/alerts-cpu.svg), [scrape time](docs/bench/alerts-scrape.svg).\n\n{cost}",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        all.join(", "),
        cpu_window.as_secs()
    );
    sluice_tests::write_section(&out_path, "bench-alerts", &body);
    println!("wrote {}", out_path.display());
}

fn alert_latency() -> Vec<Duration> {
    let (trials, ..) = plan();
    let lab = Lab::new(1);
    let (port, posts) = lab.webhook_receiver();
    let alerts = format!("[alerts]\nname = \"bench\"\nresolve_after = \"1s\"\nwebhook = {{ url = \"http://127.0.0.1:{port}/api/v2/alerts\", timeout = \"1s\", retries = 1 }}\n");
    lab.write_config_with(&[(1, "max_conns = 1")], &alerts);
    let mut daemon = lab.start_daemon();
    let (_, held) = lab.connect().expect("the one allowed connection");
    // The engine's first evaluation after the start is its baseline: a refusal before it is
    // counted in the baseline and never alerted. Under load the start's first evaluation can
    // come after the first trial's refusal (which then timed out), so wait for an evaluation
    // that saw the backend: the at-limit alert (1 of 1 open) firing.
    wait_for("the at-limit alert (the engine has evaluated the backend)", || {
        posts.0.lock().expect("posts").iter().any(|(_, b)| b.contains("SluiceBackendAtLimit") && b.contains("\"status\":\"firing\""))
    });
    let count = |status: &str| posts.0.lock().expect("posts").iter().filter(|(_, b)| b.contains("SluiceRefusingConnections") && b.contains(status)).count();
    let mut out = Vec::new();
    for trial in 0..trials {
        let before = count("\"status\":\"firing\"");
        let e = lab.connect().expect_err("refused: the backend is at max_conns = 1");
        let refused_at = Instant::now();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        wait_for("the firing alert", || count("\"status\":\"firing\"") > before);
        let at = posts.0.lock().expect("posts").iter().filter(|(_, b)| b.contains("SluiceRefusingConnections") && b.contains("\"status\":\"firing\"")).nth(before).expect("post").0;
        out.push(at.saturating_duration_since(refused_at));
        println!("trial {}: {:.1} ms", trial + 1, out[trial].as_secs_f64() * 1e3);
        wait_for("the resolved alert", || count("\"status\":\"resolved\"") > trial);
        // A gap so the next refusal is not within one evaluation of the last, and a phase that
        // walks over the 1 s evaluation tick: a refusal just after a periodic evaluation must
        // be as fast as any other.
        std::thread::sleep(Duration::from_millis(300 + (trial as u64 * 137) % 1000));
    }
    drop(held);
    let _ = daemon.signal_and_wait(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(10));
    lab.detach();
    out
}

/// What an idle daemon with `backends` backends costs (services of 100 backends).
fn daemon_cost(backends: u32) -> Cost {
    let lb = Netns::new("benchlb");
    let peer = Netns::new("benchpeer");
    veth(&lb, "lb0", &peer, "p0");
    lb.link_up("lo");
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
    for s in 0..backends.div_ceil(100) {
        // Rings of 1009 slots (10 per backend): 100 services of the default 65537 would not fit
        // the default RINGS.
        write!(t, "[[service]]\nname = \"svc{s}\"\nvip = \"10.1.{}.{}\"\nport = 80\nproto = \"tcp\"\nring_size = 1009\n", s / 250, s % 250 + 1).expect("w");
        for b in 0..100.min(backends - s * 100) {
            write!(t, "[[service.backend]]\naddress = \"10.2.{s}.{}\"\nmax_conns = 1000\nmac = \"02:00:00:00:{:02x}:{b:02x}\"\n", b + 1, s % 256).expect("w");
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
    // Past the start-up (the apply) before measuring: until the API lists every backend.
    wait_for("the config applied", || {
        let out = lb.command(sluice_bin()).arg("status").arg("--json").arg("--socket").arg(&sock).output().expect("sluice status");
        String::from_utf8_lossy(&out.stdout).matches("\"address\"").count() >= backends as usize
    });
    std::thread::sleep(Duration::from_secs(2));
    let ticks = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        // Fields after the ")" of the command name: utime is the 12th, stime the 13th.
        let rest = stat.rsplit_once(')').expect("stat").1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let share = |during: &dyn Fn()| {
        let (t0, c0) = (Instant::now(), ticks(d.id()));
        during();
        (ticks(d.id()) - c0) as f64 / hz / t0.elapsed().as_secs_f64()
    };
    let (_, window, _) = plan();
    let cpu = share(&|| std::thread::sleep(window));
    let scrapes = std::sync::Mutex::new(Vec::new());
    let cpu_scraped = share(&|| {
        let start = Instant::now();
        while start.elapsed() < window {
            let t0 = Instant::now();
            let body = lb.run(|| scrape("127.0.0.1:19477"));
            scrapes.lock().expect("scrapes").push((t0.elapsed(), body.len()));
            std::thread::sleep(SCRAPE_EVERY.min(window.saturating_sub(start.elapsed())));
        }
    });
    let scrapes = scrapes.into_inner().expect("scrapes");
    let (scrape, scrape_bytes) = scrapes.iter().copied().max().expect("a scrape");
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.id())).expect("status");
    let rss_anon_kib = status.lines().find(|l| l.starts_with("RssAnon:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0);
    let _ = d.signal_and_wait(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(10));
    let _ = std::process::Command::new(sluice_bin()).arg("detach").arg("--pin-dir").arg(&pins.0).output();
    let _ = std::fs::remove_dir_all(&dir);
    let c = Cost { backends, cpu, cpu_scraped, scrape, scrape_bytes, rss_anon_kib };
    println!(
        "{backends} backends: {:.2} % idle, {:.2} % scraped, scrape {:?} ({} bytes), RssAnon {} KiB",
        c.cpu * 100.0,
        c.cpu_scraped * 100.0,
        c.scrape,
        c.scrape_bytes,
        c.rss_anon_kib
    );
    c
}

/// GET /metrics over HTTP/1.0 (the body ends when the connection closes).
fn scrape(addr: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut c = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    c.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n").expect("request");
    let mut out = String::new();
    c.read_to_string(&mut out).expect("response");
    assert!(out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"), "{}", out.lines().next().unwrap_or(""));
    out
}
