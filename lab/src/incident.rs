//! `sluice lab incident`: the 2023-05-05 outage replayed in a few minutes, with Sluice as the
//! load balancer. Normal traffic; a config change sets `max_conns` far too low; a surge; Sluice
//! refuses with RST, the alert fires naming the setting, `status` and `explain` point at it;
//! the fix is applied live; refusals stop; the alert resolves. Each step is printed as it
//! happens, then the timeline; a report (markdown + SVG plot) is written. Every expectation is
//! checked: the run fails if any did not happen.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    sync::{atomic::Ordering, Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use lb_userspace::{alerts::Notification, api::StatusReport};

use super::{
    load::{self, Counters, LoadSpec},
    plot::{self, Point},
    topo::{BackendConf, ServiceOpts},
    Lab,
};

const GOOD_LIMIT: u32 = 200;
const BAD_LIMIT: u32 = 10;
const BACKENDS: u8 = 3;

/// A line of the replay on stdout, where it is the command's output. A reader that went away
/// (`sluice lab incident | head`) does not end the replay, which still has a lab to remove.
macro_rules! progress_line {
    ($($arg:tt)*) => {
        let _ = lb_userspace::cli::out::try_write(format_args!($($arg)*), true);
    };
}

pub struct Options {
    pub report_dir: PathBuf,
}

/// The printed narrative, kept for the report.
struct Narrator {
    t0: Instant,
    text: Mutex<String>,
}

impl Narrator {
    fn say(&self, line: impl AsRef<str>) {
        let l = format!("[{:>6.1}s] {}", self.t0.elapsed().as_secs_f64(), line.as_ref());
        progress_line!("{l}");
        let mut t = self.text.lock().expect("text");
        t.push_str(&l);
        t.push('\n');
    }
    fn block(&self, text: &str) {
        for l in text.lines() {
            progress_line!("           {l}");
        }
        let mut t = self.text.lock().expect("text");
        t.push_str("```\n");
        t.push_str(text.trim_end());
        t.push_str("\n```\n");
    }
}

fn status(lab: &Lab) -> Result<StatusReport> {
    lb_userspace::client::block_on(lb_userspace::client::Client::new(lab.socket()).status()).map_err(|e| anyhow::anyhow!("{e}"))
}

/// `sluice --socket S args…` as an operator would type it: (command line, output).
fn sluice(lab: &Lab, args: &[&str]) -> (String, String, bool) {
    let out = Command::new(&lab.spec.sluice).arg("--socket").arg(lab.socket()).args(args).output();
    let line = format!("$ sluice {}", args.join(" "));
    match out {
        Ok(o) => (line, format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)), o.status.success()),
        Err(e) => (line, e.to_string(), false),
    }
}

fn sample(lab: &Lab, t: f64) -> Option<(Point, StatusReport)> {
    let s = status(lab).ok()?;
    let mut p = Point { t, ..Point::default() };
    for b in s.services.iter().flat_map(|svc| &svc.backends) {
        p.backends.insert(b.address.to_string(), (b.open, u64::from(b.max_conns)));
        p.refused += b.refused.values().sum::<u64>();
    }
    Some((p, s))
}

struct Check {
    what: &'static str,
    ok: bool,
    detail: String,
}

/// Runs the scenario in `lab` (built with 3 backends, servers on). Returns whether every
/// expectation held.
#[expect(clippy::too_many_lines, reason = "the scenario reads top to bottom")]
pub fn run(lab: &Lab, opts: &Options) -> Result<bool> {
    std::fs::create_dir_all(&opts.report_dir).with_context(|| format!("creating {}", opts.report_dir.display()))?;
    let n = Narrator { t0: Instant::now(), text: Mutex::new(String::new()) };
    let mut checks: Vec<Check> = Vec::new();
    let alerts = |c: &mut lb_userspace::config::Config| {
        c.alerts.name = Some("lab-lb".into());
        (c.alerts.interval, c.alerts.fire_after, c.alerts.resolve_after) = (Duration::from_secs(1), Duration::from_secs(2), Duration::from_secs(3));
    };
    let conf = |limit: u32| -> Vec<BackendConf> { (1..=BACKENDS).map(|n| BackendConf { n, max_conns: limit, weight: 1 }).collect() };
    lab.write_config(&lab.config_text(&conf(GOOD_LIMIT), &ServiceOpts::default(), alerts))?;
    n.say(format!("Sluice lab: {BACKENDS} backends, {} clients, service \"web\" {}:80, max_conns = {GOOD_LIMIT} per backend", lab.spec.clients, super::VIP4));
    lab.start_daemon()?;
    n.say("the daemon is up (sluice run --config in the load balancer's namespace)");

    // Sample the daemon's view every 250 ms for the plot.
    let points: Arc<Mutex<Vec<Point>>> = Arc::default();
    let marks: Arc<Mutex<Vec<(f64, String)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let first_alert: Arc<Mutex<Option<(f64, Notification)>>> = Arc::default();
    let mark = |label: &str| marks.lock().expect("marks").push((n.t0.elapsed().as_secs_f64(), label.to_owned()));

    std::thread::scope(|s| -> Result<()> {
        // Stops the sampler however this scope is left (an early `?` included), or the scope
        // would wait for it for ever.
        let stopper = super::SetOnDrop(&stop);
        let sampler = s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let t = n.t0.elapsed().as_secs_f64();
                if let Some((p, st)) = sample(lab, t) {
                    points.lock().expect("points").push(p);
                    let mut fa = first_alert.lock().expect("alert");
                    if fa.is_none() {
                        // The alert about refusals (not, say, a saturation forecast from the ramp).
                        let about_refusals = |a: &&Notification| matches!(a.alertname.as_ref(), "SluiceRefusingConnections" | "SluiceBackendAtLimit" | "SluiceServiceSaturated");
                        if let Some(a) = st.alerts_firing.iter().find(about_refusals) {
                            *fa = Some((t, a.clone()));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        });

        // 1. Normal traffic.
        n.say("step 1 — normal traffic: 40 connections/s, each held 1 s, for 6 s");
        let normal = load::run(
            lab,
            &LoadSpec {
                rate: 40.0,
                concurrency: 100,
                duration: Duration::from_secs(6),
                hold: Duration::from_secs(1),
                delay_ms: 0,
                timeout: Duration::from_secs(3),
                v6: false,
                targets: Vec::new(),
            },
            &Arc::default(),
        )?;
        n.say(format!(
            "  ok {} refused {} timeout {} error {}; p50 {:.1} ms p99 {:.1} ms; per backend {:?}",
            normal.ok, normal.refused, normal.timeout, normal.error, normal.p50_ms, normal.p99_ms, normal.backends
        ));
        checks.push(Check {
            what: "normal traffic is served by every backend, nothing refused",
            ok: normal.refused == 0 && normal.timeout == 0 && normal.error == 0 && normal.backends.len() == usize::from(BACKENDS),
            detail: format!("{normal:?}"),
        });

        // 2. The misconfiguration.
        lab.write_config(&lab.config_text(&conf(BAD_LIMIT), &ServiceOpts::default(), alerts))?;
        mark("max_conns 200 → 10");
        let path = lab.config_path().display().to_string();
        let (line, out, ok) = sluice(lab, &["config", "apply", &path]);
        n.say(format!("step 2 — a config review \"tightens\" max_conns from {GOOD_LIMIT} to {BAD_LIMIT}; the guard judges it against the load it just carried:"));
        n.block(&format!("{line}\n{out}"));
        let named = out.contains("refused, nothing changed")
            && out.contains(&format!("max_conns {GOOD_LIMIT} -> {BAD_LIMIT}"))
            && out.contains("peak of")
            && out.contains("% of its connections would have been refused");
        checks.push(Check { what: "the guard refused the change and named the numbers", ok: !ok && named, detail: out.clone() });
        let (line, out, ok) = sluice(lab, &["config", "apply", &path, "--force"]);
        n.say("  the operator, sure of the review, forces it:");
        n.block(&format!("{line}\n{out}"));
        checks.push(Check {
            what: "the misconfiguration is applied (forced)",
            ok: ok && out.contains(&format!("max_conns {GOOD_LIMIT} -> {BAD_LIMIT}")) && out.contains("FORCED"),
            detail: out.clone(),
        });

        // 3. The surge, with the diagnosis and the fix applied while it runs.
        n.say("step 3 — a surge: 60 connections/s, each held 3 s, for 14 s (≈ 180 open wanted, 3 × 10 allowed)");
        let counters = Arc::new(Counters::default());
        let surge_spec = LoadSpec {
            rate: 60.0,
            concurrency: 400,
            duration: Duration::from_secs(14),
            hold: Duration::from_secs(3),
            delay_ms: 0,
            timeout: Duration::from_secs(3),
            v6: false,
            targets: Vec::new(),
        };
        let surge_started = n.t0.elapsed().as_secs_f64();
        mark("surge");
        let surge = {
            let (spec, c) = (surge_spec.clone(), counters.clone());
            s.spawn(move || load::run(lab, &spec, &c))
        };
        // The first refusal as the clients see it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while counters.refused.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let first_refusal = n.t0.elapsed().as_secs_f64();
        n.say(format!("  clients are refused: {}", counters.line(Duration::from_secs_f64(first_refusal - surge_started))));
        // The alert (the deadline only ends the wait; how long it took is a figure).
        let deadline = Instant::now() + Duration::from_secs(20);
        while first_alert.lock().expect("alert").is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let alert = first_alert.lock().expect("alert").clone();
        if let Some((t, a)) = &alert {
            mark("alert fires");
            n.say(format!("  ALERT {} after {:.1} s:", a.alertname, t - first_refusal));
            n.block(&format!("{}\n{}", a.summary, a.description));
        }
        let alert_ok = alert.as_ref().is_some_and(|(_, a)| {
            let text = format!("{}\n{}", a.summary, a.description);
            text.contains("Sluice load balancer lab-lb") && text.contains("max_conns")
        });
        let after = alert.as_ref().map_or_else(|| "none within 20 s".to_owned(), |(t, _)| format!("{:.1} s after the first refusal", t - first_refusal));
        checks.push(Check { what: "an alert naming the load balancer and max_conns fires after the first refusal", ok: alert_ok, detail: format!("{after}: {alert:?}") });
        // The diagnosis.
        n.say("  the on-call engineer looks at the load balancer first:");
        let (line, out, _) = sluice(lab, &["status"]);
        let head: String = out.lines().take_while(|l| !l.trim().is_empty() || out.lines().next() == Some(l)).take(12).collect::<Vec<_>>().join("\n");
        n.block(&format!("{line}\n{head}"));
        checks.push(Check {
            what: "`sluice status` shows backends AT LIMIT",
            ok: out.contains("AT LIMIT") || out.contains(&format!("{BAD_LIMIT}/{BAD_LIMIT}")),
            detail: head.clone(),
        });
        let (_, ev, _) = sluice(lab, &["events", "--json"]);
        let refused_client =
            ev.lines().filter_map(|l| serde_json::from_str::<lb_userspace::events::Event>(l).ok()).find(|e| e.reason == "backend_limit").map(|e| e.client.to_string());
        if let Some(client) = &refused_client {
            let (line, out, _) = sluice(lab, &["explain", client, &format!("{}:80", super::VIP4)]);
            n.block(&format!("{line}\n{}", out.trim_end()));
            checks.push(Check {
                what: "`sluice explain` of a refused client names max_conns",
                ok: out.contains("max_conns") && (out.contains("REFUSED") || out.contains("refused")),
                detail: out,
            });
        } else {
            checks.push(Check { what: "`sluice explain` of a refused client names max_conns", ok: false, detail: format!("no backend_limit event: {ev}") });
        }
        // The engineer takes a few seconds to read it; the surge goes on meanwhile.
        while n.t0.elapsed().as_secs_f64() < surge_started + 6.0 {
            std::thread::sleep(Duration::from_millis(50));
        }
        // The fix.
        lab.write_config(&lab.config_text(&conf(GOOD_LIMIT), &ServiceOpts::default(), alerts))?;
        let (line, out, ok) = sluice(lab, &["config", "apply", &path]);
        // Refusals the datapath counted by the time the fix is in its maps (`apply` returned).
        let refused_by_lb_at_fix = super::report::status(lab).map(|st| super::report::refused_total(&st));
        let fixed_at = n.t0.elapsed().as_secs_f64();
        mark("fix applied");
        let refused_at_fix = counters.refused.load(Ordering::Relaxed);
        n.say(format!("step 4 — the fix, applied live ({:.1} s after the first refusal):", fixed_at - first_refusal));
        n.block(&format!("{line}\n{out}"));
        checks.push(Check { what: "the fix is applied", ok: ok && out.contains(&format!("max_conns {BAD_LIMIT} -> {GOOD_LIMIT}")), detail: out });
        let report = surge.join().unwrap_or_else(|p| std::panic::resume_unwind(p))?;
        let refused_by_lb_at_end = super::report::status(lab).map(|st| super::report::refused_total(&st));
        n.say(format!("  surge over: ok {} refused {} (all before the fix: {}) timeout {} error {}", report.ok, report.refused, refused_at_fix, report.timeout, report.error));
        checks.push(Check { what: "clients were refused with a RST at once, not timeouts", ok: report.refused > 0 && report.timeout == 0, detail: format!("{report:?}") });
        // Counted where the refusing happens: a client may see a RST sent before the fix after it.
        checks.push(Check {
            what: "refusals stop once the fix is applied",
            ok: refused_by_lb_at_fix.is_ok() && refused_by_lb_at_fix.as_ref().ok() == refused_by_lb_at_end.as_ref().ok() && report.ok > 0,
            detail: format!(
                "the load balancer refused {refused_by_lb_at_fix:?} by the fix, {refused_by_lb_at_end:?} at the surge's end; the clients saw {refused_at_fix} refused by the fix, {} at the end",
                report.refused
            ),
        });

        // 5. Resolution.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut resolved = false;
        while Instant::now() < deadline {
            if status(lab).is_ok_and(|s| s.alerts_firing.is_empty()) {
                resolved = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        mark("resolved");
        n.say(if resolved { "step 5 — every alert resolved".to_owned() } else { "step 5 — alerts still firing after 20 s".to_owned() });
        checks.push(Check { what: "the alerts resolve", ok: resolved, detail: String::new() });
        drop(stopper);
        let _ = sampler.join();
        Ok(())
    })?;

    lab.stop_daemon();
    let entries = lb_userspace::journal::read(&lab.journal(), Duration::from_hours(1)).unwrap_or_default();
    let timeline = lb_userspace::journal::markdown(&entries);
    progress_line!("\n{timeline}");
    let order = ["refused by the guard", "max_conns 200 -> 10", "alert Sluice", "max_conns 10 -> 200", "resolved"];
    let positions: Vec<Option<usize>> = order.iter().map(|w| timeline.find(w)).collect();
    checks.push(Check {
        what: "the timeline has the change, the alert, the fix and the resolution, in order",
        ok: positions.iter().all(Option::is_some) && positions.windows(2).all(|w| w[0] < w[1]),
        detail: format!("{positions:?}"),
    });

    let svg = opts.report_dir.join("incident.svg");
    plot::draw(&svg, "Sluice lab incident: open connections vs max_conns", &points.lock().expect("points"), &marks.lock().expect("marks"))?;
    let passed = checks.iter().all(|c| c.ok);
    let mut md = String::from("# Sluice lab: the 2023-05-05 incident, replayed\n\n");
    writeln!(md, "Result: **{}**\n\n![open connections vs max_conns](incident.svg)\n\n## Checks\n", if passed { "every expectation held" } else { "FAILED" })?;
    for c in &checks {
        writeln!(md, "- [{}] {}", if c.ok { "x" } else { " " }, c.what)?;
    }
    writeln!(md, "\n## What happened\n\n{}\n{timeline}", n.text.lock().expect("text"))?;
    std::fs::write(opts.report_dir.join("report.md"), md)?;
    progress_line!("checks:");
    for c in &checks {
        progress_line!("  {} {}", if c.ok { "ok  " } else { "FAIL" }, c.what);
        if !c.ok {
            progress_line!("       {}", c.detail.replace('\n', "\n       "));
        }
    }
    progress_line!("report: {} (and incident.svg)", opts.report_dir.join("report.md").display());
    Ok(passed)
}

/// Where reports go by default: `./sluice-lab-report`.
pub fn default_report_dir() -> &'static Path {
    Path::new("sluice-lab-report")
}
