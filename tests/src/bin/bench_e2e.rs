//! `cargo xtask bench e2e`: Sluice against what users would pick instead for per-backend
//! connection limits, HAProxy (`mode tcp`, `maxconn` per server) and nginx (`stream`,
//! `max_conns`), in turn on the same `sluice lab` topology: the same namespaces, backends
//! (`sluice lab serve`), load generator (`sluice_lab::load`) and per-backend limits. Plus a baseline
//! without a load balancer (clients straight to the backends, round robin).
//!
//! For each load balancer, at rising offered connection rates: connections completed per
//! second, latency p50/p99 of one short HTTP exchange, refusals by how the client saw them,
//! and CPU per 1,000 completed connections, two ways:
//! - *whole lab over baseline*: busy time of every CPU (/proc/stat) during the step, minus the
//!   baseline's at the same offered rate. Network work runs in softirq context charged to
//!   whichever process happens to run, so only the whole machine sees all of a proxy's cost;
//! - *attributable*: what can be charged to the load balancer by name: the proxy processes'
//!   utime+stime; for Sluice the XDP program's own run time (BPF_ENABLE_STATS) plus its daemon's.
//!
//! Then, with 5,000 idle connections held open through each: the load balancer's memory.
//!
//! `SLUICE_BENCH_SHORT=1` (the test suite): one offered rate (500/s) for 1 s, 200 idle
//! connections, the lab named like the harness's namespaces (`slc-<pid>-…`, swept if killed).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use lb_userspace::config::Mode;
use sluice_lab::{
    backend4,
    load::{self, Counters, LoadSpec, Report},
    plot,
    topo::{BackendConf, ServiceOpts},
    Lab, Spec,
};

const BACKENDS: u8 = 3;
const CLIENTS: u8 = 2;
/// Per-backend connection limit, the same in all three load balancers.
const LIMIT: u32 = 50;
/// The backend answers after this long: connections overlap, so limits matter at high rates.
const DELAY_MS: u64 = 10;
/// How long each offered rate lasts.
fn step_time() -> Duration {
    sluice_tests::bench::pick(Duration::from_secs(4), Duration::from_secs(1))
}

fn rates() -> &'static [f64] {
    sluice_tests::bench::pick(&[500.0, 1000.0, 2000.0, 4000.0, 6000.0, 8000.0], &[500.0])
}

/// Idle connections held open for the memory figures: how many, opened at what rate over how
/// long, held how long.
fn idle_plan() -> (usize, f64, Duration, Duration) {
    sluice_tests::bench::pick((5000, 2500.0, Duration::from_secs(2), Duration::from_secs(12)), (200, 400.0, Duration::from_millis(500), Duration::from_secs(2)))
}

/// The lab's name prefix and directory: a short run's are named like the test harness's (its
/// namespaces are swept if it is killed).
fn lab_names() -> (String, PathBuf) {
    if sluice_tests::bench::short() {
        let pid = std::process::id();
        (format!("slc-{pid}-e2e"), std::env::temp_dir().join(format!("sluice-bench-e2e-{pid}")))
    } else {
        ("sbe".into(), "/run/sluice-bench-e2e".into())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Lb {
    Direct,
    SluiceL2dsr,
    SluiceIpip,
    Haproxy,
    Nginx,
}

impl Lb {
    fn name(self) -> &'static str {
        match self {
            Self::Direct => "no load balancer (baseline)",
            Self::SluiceL2dsr => "Sluice l2dsr",
            Self::SluiceIpip => "Sluice ipip",
            Self::Haproxy => "HAProxy (mode tcp)",
            Self::Nginx => "nginx (stream)",
        }
    }
    fn is_sluice(self) -> bool {
        matches!(self, Self::SluiceL2dsr | Self::SluiceIpip)
    }
}

struct Step {
    lb: Lb,
    rate: f64,
    report: Report,
    /// Busy CPU time of the whole machine during the step, ms.
    busy_ms: f64,
    /// CPU time charged to the load balancer by name, ms.
    lb_ms: f64,
}

impl Step {
    fn per_1k(&self, ms: f64) -> f64 {
        ms / (self.report.ok.max(1) as f64 / 1000.0)
    }
}

struct Memory {
    lb: Lb,
    open: u64,
    rss_kib: u64,
    note: String,
}

fn main() {
    let out_path: PathBuf = sluice_tests::bench::out_path();
    if let Err(e) = run(&out_path) {
        eprintln!("bench-e2e: {e:#}");
        std::process::exit(1);
    }
}

fn run(out_path: &Path) -> Result<()> {
    sluice_tests::require_root();
    for tool in ["haproxy", "nginx"] {
        if std::process::Command::new(tool).arg("-v").output().is_err() {
            bail!("`{tool}` is missing: `cargo xtask bench e2e` installs it (Debian package)");
        }
    }
    // The XDP program's run time is counted while this descriptor is open.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
    let mut steps = Vec::new();
    let mut memory = Vec::new();
    for mode in [Mode::L2dsr, Mode::Ipip] {
        if std::env::var("BENCH_E2E_ONLY").is_ok_and(|o| !o.contains("sluice")) && mode == Mode::Ipip {
            continue;
        }
        let (prefix, dir) = lab_names();
        let lab = Lab::up(Spec { prefix, backends: BACKENDS, clients: CLIENTS, mode, servers: true, dir, sluice: sluice_tests::sluice_bin() })?;
        let lbs: &[Lb] = if mode == Mode::Ipip { &[Lb::SluiceIpip] } else { &[Lb::Direct, Lb::SluiceL2dsr, Lb::Haproxy, Lb::Nginx] };
        // `BENCH_E2E_ONLY=haproxy,nginx`: a subset, for working on one of them.
        let only = std::env::var("BENCH_E2E_ONLY").unwrap_or_default();
        for &lb in lbs.iter().filter(|lb| only.is_empty() || only.split(',').any(|o| lb.name().to_lowercase().starts_with(o))) {
            eprintln!("== {}", lb.name());
            start(&lab, lb, LIMIT)?;
            for &rate in rates() {
                let step = measure(&lab, lb, rate)?;
                eprintln!(
                    "  {rate:>6} conn/s offered: ok {} refused {} timeout {} error {} p50 {:.2} ms p99 {:.2} ms; whole lab {:.0} ms/1k, attributable {:.1} ms/1k",
                    step.report.ok,
                    step.report.refused,
                    step.report.timeout,
                    step.report.error,
                    step.report.p50_ms,
                    step.report.p99_ms,
                    step.per_1k(step.busy_ms),
                    step.per_1k(step.lb_ms)
                );
                if step.report.ok == 0 {
                    bail!("{}: no connection completed at {rate}/s offered: {:?}\n{}", lb.name(), step.report, lab.log_tail(key(lb)));
                }
                steps.push(step);
            }
            stop(&lab, lb);
            if matches!(lb, Lb::SluiceL2dsr | Lb::Haproxy | Lb::Nginx) {
                start(&lab, lb, 4000)?;
                let m = idle_memory(&lab, lb)?;
                eprintln!("  {} idle connections open: {} KiB ({})", m.open, m.rss_kib, m.note);
                memory.push(m);
                stop(&lab, lb);
            }
        }
        drop(lab);
    }
    report(out_path, &steps, &memory)
}

fn backends(limit: u32) -> Vec<BackendConf> {
    (1..=BACKENDS).map(|n| BackendConf { n, max_conns: limit, weight: 1 }).collect()
}

/// Starts `lb` with per-backend limit `limit` and waits until a trickle of connections all
/// succeed through it.
fn start(lab: &Lab, lb: Lb, limit: u32) -> Result<()> {
    let dir = &lab.spec.dir;
    let vip = sluice_lab::vip(false).to_string();
    let vip_on_lo = |add: bool| -> Result<()> {
        let out = std::process::Command::new("ip").args(["-n", &lab.ns("lb"), "addr", if add { "replace" } else { "del" }, &format!("{vip}/32"), "dev", "lo"]).output()?;
        if add && !out.status.success() {
            bail!("adding the VIP to the load balancer's lo: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    match lb {
        Lb::Direct => {}
        Lb::SluiceL2dsr | Lb::SluiceIpip => {
            vip_on_lo(false)?;
            lab.write_config(&lab.config_text(&backends(limit), &ServiceOpts::default(), |_| ()))?;
            lab.start_daemon()?;
        }
        Lb::Haproxy => {
            vip_on_lo(true)?;
            let mut cfg = format!(
                "global\n  # two descriptors per connection; this process may have 20000\n  maxconn 9000\n  log stderr format short local0 warning\n\
                 defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n  \
                 # beyond a server's maxconn, connections wait in the queue this long, then are closed\n  timeout queue 1s\n\
                 frontend web\n  bind {vip}:{port}\n  maxconn 9000\n  default_backend web\n\
                 backend web\n  balance roundrobin\n",
                port = sluice_lab::PORT
            );
            for n in 1..=BACKENDS {
                writeln!(cfg, "  server be{n} {}:{} maxconn {limit}", backend4(n), sluice_lab::PORT)?;
            }
            let path = dir.join("haproxy.cfg");
            std::fs::write(&path, cfg)?;
            lab.spawn("haproxy", lab.command("lb", "haproxy").arg("-db").arg("-f").arg(&path))?;
        }
        Lb::Nginx => {
            vip_on_lo(true)?;
            let mut upstream = String::new();
            for n in 1..=BACKENDS {
                writeln!(upstream, "    server {}:{} max_conns={limit};", backend4(n), sluice_lab::PORT)?;
            }
            let cfg = format!(
                "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\nworker_processes auto;\nworker_rlimit_nofile 20000;\n\
                 daemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\n\
                 events {{ worker_connections 18000; }}\n\
                 stream {{\n  upstream web {{\n{upstream}  }}\n  server {{\n    listen {vip}:{port} backlog=4096;\n    proxy_pass web;\n    proxy_connect_timeout 2s;\n    proxy_timeout 60s;\n  }}\n}}\n",
                d = dir.display(),
                port = sluice_lab::PORT
            );
            let path = dir.join("nginx.conf");
            std::fs::write(&path, cfg)?;
            lab.spawn("nginx", lab.command("lb", "nginx").arg("-e").arg(dir.join("nginx-error.log")).arg("-c").arg(&path))?;
        }
    }
    // Health checks (Sluice) or listeners (proxies) take a moment: wait for 20 of 20.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = load::run(lab, &spec(lb, 100.0, Duration::from_millis(200), Duration::ZERO), &Arc::default())?;
        if r.ok == 20 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} did not carry connections within 20 s: {r:?}\n{}", lb.name(), lab.log_tail(key(lb)));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn key(lb: Lb) -> &'static str {
    match lb {
        Lb::Direct => "",
        Lb::SluiceL2dsr | Lb::SluiceIpip => "daemon",
        Lb::Haproxy => "haproxy",
        Lb::Nginx => "nginx",
    }
}

fn stop(lab: &Lab, lb: Lb) {
    match lb {
        Lb::Direct => {}
        Lb::SluiceL2dsr | Lb::SluiceIpip => {
            lab.stop_daemon();
            // The daemon leaves the datapath attached on purpose (restarts lose no flow).
            let _ = lab.command("lb", &lab.spec.sluice).arg("detach").arg("--pin-dir").arg(lab.pin_dir()).output();
        }
        Lb::Haproxy | Lb::Nginx => {
            lab.stop(key(lb), nix::sys::signal::Signal::SIGTERM);
        }
    }
}

fn spec(lb: Lb, rate: f64, duration: Duration, hold: Duration) -> LoadSpec {
    let targets = if lb == Lb::Direct { (1..=BACKENDS).map(|n| SocketAddr::new(IpAddr::V4(backend4(n)), sluice_lab::PORT)).collect() } else { Vec::new() };
    LoadSpec { rate, concurrency: 20_000, duration, hold, delay_ms: DELAY_MS, timeout: Duration::from_secs(3), v6: false, targets }
}

/// Busy jiffies of all CPUs (everything but idle and iowait), in ms.
fn busy_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle) as f64 * 1000.0 / clock_ticks()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// utime + stime of `pid`, ms.
fn proc_cpu_ms(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which may contain spaces) start at ")".
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    // rest: state ppid … ; utime and stime are fields 14 and 15 of the whole line.
    (f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0)) as f64 * 1000.0 / clock_ticks()
}

/// The load balancer's processes: its main pid and every child (nginx's workers).
fn lb_pids(lab: &Lab, lb: Lb) -> Vec<u32> {
    let Some(main) = std::fs::read_to_string(lab.spec.dir.join(format!("{}.pid", key(lb)))).ok().and_then(|p| p.trim().parse::<u32>().ok()) else {
        return Vec::new();
    };
    let mut pids = vec![main];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            let ppid =
                std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok()));
            if ppid == Some(main) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// The run time of the XDP program attached to the load balancer's `lb0`, ms (prog stats,
/// counted while enabled). By id: other balancers may be loaded on this machine.
fn xdp_ms(lab: &Lab) -> f64 {
    let out = std::process::Command::new("ip").args(["-j", "-n", &lab.ns("lb"), "link", "show", "lb0"]).output();
    let v: Option<serde_json::Value> = out.ok().and_then(|o| serde_json::from_slice(&o.stdout).ok());
    let Some(id) = v.and_then(|v| v[0]["xdp"]["prog"]["id"].as_u64()) else { return 0.0 };
    aya::programs::loaded_programs().flatten().filter(|p| u64::from(p.id()) == id).map(|p| p.run_time().as_secs_f64() * 1000.0).sum()
}

fn lb_ms(lab: &Lab, lb: Lb) -> f64 {
    let procs: f64 = lb_pids(lab, lb).into_iter().map(proc_cpu_ms).sum();
    if lb.is_sluice() {
        procs + xdp_ms(lab)
    } else {
        procs
    }
}

fn measure(lab: &Lab, lb: Lb, rate: f64) -> Result<Step> {
    let (busy0, lb0) = (busy_ms(), lb_ms(lab, lb));
    let report = load::run(lab, &spec(lb, rate, step_time(), Duration::ZERO), &Arc::default())?;
    let (busy1, lb1) = (busy_ms(), lb_ms(lab, lb));
    Ok(Step { lb, rate, report, busy_ms: busy1 - busy0, lb_ms: lb1 - lb0 })
}

/// VmRSS without memory-mapped BPF maps: Sluice's daemon maps its flow table, which is kernel
/// memory (reported apart, from bpftool), not the process's own.
fn rss_kib(pid: u32) -> u64 {
    let vm: u64 = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:").and_then(|v| v.split_whitespace().next()?.parse().ok())))
        .unwrap_or(0);
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut in_map, mut mapped) = (false, 0u64);
    for l in smaps.lines() {
        if l.split_whitespace().next().is_some_and(|a| a.contains('-') && a.chars().all(|c| c.is_ascii_hexdigit() || c == '-')) {
            in_map = l.ends_with("anon_inode:bpf-map");
        } else if let Some(v) = l.strip_prefix("Rss:").filter(|_| in_map) {
            mapped += v.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    vm.saturating_sub(mapped)
}

/// Opens `idle_plan().0` connections through `lb`, holds them, and reads its memory meanwhile.
fn idle_memory(lab: &Lab, lb: Lb) -> Result<Memory> {
    let (idle_conns, rate, opening, hold) = idle_plan();
    let counters = Arc::new(Counters::default());
    let before: u64 = lb_pids(lab, lb).into_iter().map(rss_kib).sum();
    std::thread::scope(|s| {
        let c = counters.clone();
        let load = s.spawn(move || load::run(lab, &spec(lb, rate, opening, hold), &c));
        let deadline = Instant::now() + Duration::from_secs(10);
        while counters.open.load(Ordering::Relaxed) < idle_conns as u64 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(500));
        let open = counters.open.load(Ordering::Relaxed);
        let rss: u64 = lb_pids(lab, lb).into_iter().map(rss_kib).sum();
        let note = if lb.is_sluice() {
            format!("daemon RSS without the mapped flow table, {before} KiB before; the flow table is preallocated kernel memory: {}", flows_memory(lab))
        } else {
            format!("all its processes' RSS, {before} KiB before; kernel socket buffers not included")
        };
        let r = load.join().unwrap_or_else(|p| std::panic::resume_unwind(p))?;
        if open < idle_conns as u64 {
            bail!("{}: only {open} of {idle_conns} connections held open ({r:?})", lb.name());
        }
        Ok(Memory { lb, open, rss_kib: rss, note })
    })
}

/// The flow table's size as bpftool reports it (memlock bytes of FLOWS and FLOW_TAGS), pinned
/// by the daemon.
fn flows_memory(lab: &Lab) -> String {
    let memlock = |name: &str| -> Option<u64> {
        let out = std::process::Command::new("bpftool").args(["-j", "map", "show", "pinned"]).arg(lab.pin_dir().join(name)).output().ok()?;
        serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()?["bytes_memlock"].as_u64()
    };
    match (memlock(lb_common::maps::FLOWS), memlock(lb_common::maps::FLOW_TAGS)) {
        (Some(a), Some(b)) => format!("{} KiB memlock (FLOWS + FLOW_TAGS), the same with 0 or {} connections", (a + b) / 1024, idle_plan().0),
        _ => "size unknown (bpftool failed)".into(),
    }
}

fn report(out_path: &Path, steps: &[Step], memory: &[Memory]) -> Result<()> {
    let svg_dir = out_path.parent().unwrap_or(Path::new(".")).join("docs/bench");
    std::fs::create_dir_all(&svg_dir)?;
    let lbs = [Lb::Direct, Lb::SluiceL2dsr, Lb::SluiceIpip, Lb::Haproxy, Lb::Nginx];
    let baseline: BTreeMap<u64, f64> = steps.iter().filter(|s| s.lb == Lb::Direct).map(|s| (s.rate as u64, s.per_1k(s.busy_ms))).collect();
    let over = |s: &Step| s.per_1k(s.busy_ms) - baseline.get(&(s.rate as u64)).copied().unwrap_or(0.0);

    let mut table = String::from(
        "| load balancer | offered /s | completed /s | p50 ms | p99 ms | refused: RST at once | timeout | other errors (what the client saw) | CPU ms / 1k conns, whole lab | over baseline | attributable |\n\
         |---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|\n",
    );
    for s in steps {
        let r = &s.report;
        let errors = r.error_kinds.iter().map(|(k, v)| format!("{v}× {k}")).collect::<Vec<_>>().join("; ");
        let (over_s, attr) = if s.lb == Lb::Direct { ("—".to_owned(), "—".to_owned()) } else { (format!("{:.0}", over(s)), format!("{:.1}", s.per_1k(s.lb_ms))) };
        writeln!(
            table,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {} | {} | {} | {:.0} | {over_s} | {attr} |",
            s.lb.name(),
            s.rate,
            r.ok as f64 / step_time().as_secs_f64(),
            r.p50_ms,
            r.p99_ms,
            r.refused,
            r.timeout,
            if errors.is_empty() { "0".into() } else { errors },
            s.per_1k(s.busy_ms),
        )?;
    }

    // Headline: Sluice's CPU per connection against HAProxy's at the same offered rate.
    let mut headline = String::from(
        "| offered /s | Sluice l2dsr ÷ HAProxy, over baseline | Sluice l2dsr ÷ HAProxy, attributable | Sluice ipip ÷ HAProxy, attributable |\n|---:|---:|---:|---:|\n",
    );
    for &rate in rates() {
        // The same constant the steps were run at: exact equality is meant.
        #[expect(clippy::float_cmp, reason = "rates are copied from rates(), never computed")]
        let find = |lb: Lb| steps.iter().find(|s| s.lb == lb && s.rate == rate);
        if let (Some(h), Some(l2), Some(ip)) = (find(Lb::Haproxy), find(Lb::SluiceL2dsr), find(Lb::SluiceIpip)) {
            writeln!(headline, "| {rate} | {:.2} | {:.3} | {:.3} |", over(l2) / over(h), l2.per_1k(l2.lb_ms) / h.per_1k(h.lb_ms), ip.per_1k(ip.lb_ms) / h.per_1k(h.lb_ms))?;
        }
    }

    let mut mem = String::from("| load balancer | connections held | resident memory | what |\n|---|---:|---:|---|\n");
    for m in memory {
        writeln!(mem, "| {} | {} | {:.1} MiB | {} |", m.lb.name(), m.open, m.rss_kib as f64 / 1024.0, m.note)?;
    }

    let series = |f: &dyn Fn(&Step) -> f64, with_direct: bool| -> Vec<(String, Vec<(f64, f64)>)> {
        lbs.iter().filter(|lb| with_direct || **lb != Lb::Direct).map(|lb| (lb.name().to_owned(), steps.iter().filter(|s| s.lb == *lb).map(|s| (s.rate, f(s))).collect())).collect()
    };
    plot::lines(
        &svg_dir.join("e2e-throughput.svg"),
        "Connections completed per second",
        "offered connections/s",
        "completed/s",
        &series(&|s| s.report.ok as f64 / step_time().as_secs_f64(), true),
    )?;
    plot::lines(&svg_dir.join("e2e-p99.svg"), "p99 latency of one HTTP exchange", "offered connections/s", "ms", &series(&|s| s.report.p99_ms, true))?;
    plot::lines(&svg_dir.join("e2e-cpu.svg"), "CPU per 1,000 connections, whole lab over the no-balancer baseline", "offered connections/s", "ms", &series(&over, false))?;

    let machine = sluice_tests::bench::machine();
    let body = format!(
        "## End to end against HAProxy and nginx (`cargo xtask bench e2e`)\n\n{machine} HAProxy {hv}, nginx {nv} (Debian's packages).\n\
         The `sluice lab` topology: {CLIENTS} client namespaces, a switch, the load balancer's namespace, {BACKENDS} backends\n\
         running `sluice lab serve`; every load balancer with the same per-backend limit ({LIMIT} connections) and\n\
         round-robin/Maglev spreading. HAProxy: `mode tcp`, `maxconn {LIMIT}` per server, `timeout queue 1s`;\n\
         nginx: `stream`, `max_conns={LIMIT}`, `worker_processes auto`; both on the VIP as a local address.\n\
         Sluice: `sluice run` with the lab's config (`l2dsr`, and `ipip` with `sluice decap` on the backends).\n\
         The load: `sluice_lab::load` from both clients, open loop, each connection one `GET /?delay_ms={DELAY_MS}` answered\n\
         after {DELAY_MS} ms, {}s per offered rate, 3 s timeout. *completed*: answers received ÷ {}s.\n\
         *CPU, whole lab*: busy time of all CPUs (/proc/stat: all but idle and iowait) during the step ÷\n\
         completed connections; *over baseline*: minus the same figure without a load balancer at the same\n\
         offered rate (network work runs in softirq context, charged to whatever process is running, so only\n\
         the whole machine sees all of a proxy's cost; noisy, ±20 ms). *attributable*: the proxy's processes'\n\
         utime+stime; for Sluice its XDP program's run time (BPF_ENABLE_STATS) plus its daemon's utime+stime.\n\n\
         {table}\n\
         Sluice's CPU per connection as a share of HAProxy's at the same offered rate (target ≤ 0.20):\n\n{headline}\n\
         Memory with {idle_conns} idle connections held open through each load balancer (limits raised to 4000 per backend):\n\n{mem}\n\
         Plots: [throughput](docs/bench/e2e-throughput.svg), [p99 latency](docs/bench/e2e-p99.svg),\n\
         [CPU per connection](docs/bench/e2e-cpu.svg).\n",
        step_time().as_secs(),
        step_time().as_secs(),
        idle_conns = idle_plan().0,
        hv = version("haproxy", &["-v"]),
        nv = version("nginx", &["-v"]),
    );
    sluice_tests::write_section(out_path, "bench-e2e", &body);
    println!("{body}");
    println!("wrote {}", out_path.display());
    Ok(())
}

fn version(tool: &str, args: &[&str]) -> String {
    let out =
        std::process::Command::new(tool).args(args).output().map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))).unwrap_or_default();
    out.split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) || w.contains('/') && w.split('/').nth(1).is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit())))
        .map_or_else(|| "?".into(), |w| w.rsplit('/').next().unwrap_or(w).to_owned())
}
