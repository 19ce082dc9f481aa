//! The benchmarks' short forms: each `cargo xtask bench …` binary run once with
//! `SLUICE_BENCH_SHORT=1` (one round, few frames, the smallest sizes), writing its section to a
//! file of its own in a temporary directory, never BENCHMARKS.md. A benchmark that no longer runs
//! fails here. No time is asserted: each binary checks that what it measures happened (every
//! frame forwarded, the alert delivered, every step reached) and exits non-zero if not; this
//! test checks that it exited 0 and wrote its section, a table of figures that are numbers.
//!
//! One at a time (they pin a CPU, start daemons and labs); each prints how long it took.

use std::{
    path::PathBuf,
    process::Command,
    sync::{Mutex, PoisonError},
    time::Instant,
};

use sluice_tests::{require_root, sluice_bin};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A directory removed on drop, also when the test fails.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the benchmark binary `exe` (`bench-NAME`) in its short form; its section's table rows,
/// as cells.
fn short_run(name: &str, exe: &str) -> Vec<Vec<String>> {
    require_root();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = TempDir(std::env::temp_dir().join(format!("sluice-bench-short-{}-{name}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("temporary directory");
    let out = dir.0.join("benchmarks.md");
    let started = Instant::now();
    let run = Command::new(exe).arg(&out).env("SLUICE_BENCH_SHORT", "1").env("SLUICE_BIN", sluice_bin()).output().unwrap_or_else(|e| panic!("running {exe}: {e}"));
    let (stdout, stderr) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "bench-{name} (short form) failed: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}", run.status);
    println!("bench-{name}, short form: {:.1} s\n{stdout}", started.elapsed().as_secs_f64());
    let text = std::fs::read_to_string(&out).unwrap_or_else(|e| panic!("bench-{name} wrote no {}: {e}", out.display()));
    let (begin, end) = (format!("<!-- bench-{name}:begin -->"), format!("<!-- bench-{name}:end -->"));
    let section = match (text.find(&begin), text.find(&end)) {
        (Some(a), Some(b)) if a < b => &text[a..b],
        _ => panic!("bench-{name} wrote no section {begin} … {end}:\n{text}"),
    };
    // Table rows: every `|` line but headers and their `|---|` rules.
    let lines: Vec<&str> = section.lines().collect();
    lines
        .iter()
        .enumerate()
        .filter(|(i, l)| l.starts_with('|') && !l.starts_with("|---") && lines.get(i + 1).is_none_or(|n| !n.starts_with("|---")))
        .map(|(_, l)| l.trim_matches('|').split('|').map(|c| c.trim().to_owned()).collect())
        .collect()
}

/// The number a cell starts with ("12.5 ms" → 12.5).
fn number(cell: &str) -> f64 {
    let n: String = cell.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    n.parse().unwrap_or_else(|_| panic!("{cell:?} is not a figure"))
}

/// The row whose first cell starts with `what`.
fn row<'a>(rows: &'a [Vec<String>], what: &str) -> &'a [String] {
    rows.iter().find(|r| r[0].starts_with(what)).unwrap_or_else(|| panic!("no row {what:?} in {rows:#?}"))
}

#[test]
fn bench_datapath_runs_in_short() {
    let rows = short_run("datapath", env!("CARGO_BIN_EXE_bench-datapath"));
    assert_eq!(rows.len(), 8, "a row per case: {rows:#?}");
    for r in &rows {
        // single-shot ns and prog-stats ns
        assert!(number(&r[1]) > 0.0 && number(&r[3]) > 0.0, "{r:?}");
    }
}

#[test]
fn bench_control_runs_in_short() {
    let rows = short_run("control", env!("CARGO_BIN_EXE_bench-control"));
    assert_eq!(rows.len(), 13, "a row per measurement: {rows:#?}");
    // Times of a few ms may print as 0 ms: figures, not checked here (the binary checks what
    // they time: the change refuses, the sweeps scan and expire every flow, the daemon forwards).
    for r in &rows {
        number(&r[1]);
    }
    assert!(number(&row(&rows, "daemon resident memory")[1]) > 0.0, "{rows:#?}");
    // A table at 20,000 flows' capacity, filled to it: ~0.01 % refused (README: flows.capacity).
    assert!(number(&row(&rows, "filling a table of 20000 flows")[1]) < 100.0, "{rows:#?}");
}

#[test]
fn bench_alerts_runs_in_short() {
    let rows = short_run("alerts", env!("CARGO_BIN_EXE_bench-alerts"));
    assert!(number(&row(&rows, "alert latency, first refusal")[1]) > 0.0, "{rows:#?}");
    let cost = row(&rows, "100");
    assert!(number(&cost[5]) > 0.0, "RssAnon with 100 backends: {cost:?}");
}

#[test]
fn bench_xdp_runs_in_short() {
    let rows = short_run("xdp", env!("CARGO_BIN_EXE_bench-xdp"));
    assert_eq!(rows.len(), 5, "a row per case: {rows:#?}");
    for r in &rows {
        assert!(number(&r[1]) > 0.0 && number(&r[2]) > 0.0, "Sluice and floor Mpps: {r:?}");
    }
    row(&rows, "new flows (SYN, admission, insert), ipip, table of 1k");
}

#[test]
fn bench_e2e_runs_in_short() {
    let rows = short_run("e2e", env!("CARGO_BIN_EXE_bench-e2e"));
    for lb in ["no load balancer", "Sluice l2dsr", "Sluice ipip", "HAProxy", "nginx"] {
        let r = row(&rows, lb);
        assert!(number(&r[2]) > 0.0, "{lb}: no connection completed: {r:?}");
    }
    // Memory with the idle connections held, through Sluice, HAProxy and nginx.
    let held = rows.iter().filter(|r| r.len() == 4 && r[2].ends_with("MiB") && number(&r[1]) >= 200.0).count();
    assert_eq!(held, 3, "{rows:#?}");
}

#[test]
fn bench_limits_runs_in_short() {
    let rows = short_run("limits", env!("CARGO_BIN_EXE_bench-limits"));
    let run = row(&rows, "1");
    assert_eq!(run.len(), 9, "{run:?}");
    for skew in &run[1..4] {
        assert!(number(skew) >= 0.0, "a skew's time to 95 %: {run:?}");
    }
    assert!(run[8].contains(" held"), "{run:?}");
}
