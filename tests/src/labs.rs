//! Labs for tests: `sluice_lab` topologies named like the harness's namespaces, the check
//! that one left nothing behind, and the assertion of a lab report's checks.

use std::{
    collections::BTreeSet,
    sync::atomic::{AtomicU32, Ordering},
};

use lb_userspace::config::Mode;
use sluice_lab::{report::Verdict, Lab, Spec};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A lab named like the harness's namespaces (`slc-<pid>-…`, swept if the test is killed: its
/// processes die with the test, [`crate::netns::sweep_stale`] removes the rest).
pub fn lab(backends: u8, clients: u8, mode: Mode) -> Lab {
    crate::require_root();
    crate::netns::sweep_stale();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let prefix = format!("slc-{}-l{n}", std::process::id());
    let dir = std::env::temp_dir().join(format!("sluice-lab-test-{}-{n}", std::process::id()));
    Lab::up(Spec { prefix, backends, clients, mode, servers: true, dir, sluice: crate::sluice_bin() }).expect("lab up")
}

/// The lab's namespaces (`PREFIX-…`) and their inodes.
fn namespaces(prefix: &str) -> (Vec<String>, BTreeSet<u64>) {
    let names: Vec<String> =
        std::fs::read_dir("/run/netns").into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(prefix)).collect();
    let inodes = names.iter().filter_map(|n| crate::netns::netns_inode(n)).collect();
    (names, inodes)
}

/// Drops the lab and checks it left no process (in its namespaces, also once their names are
/// gone), namespace, pin or file.
pub fn down_and_check(lab: Lab) {
    let (prefix, dir) = (format!("{}-", lab.spec.prefix), lab.spec.dir.clone());
    let (_, inodes) = namespaces(&prefix);
    assert!(!inodes.is_empty(), "the lab has no namespace {prefix}*");
    drop(lab);
    let procs = crate::netns::processes_in(&inodes);
    assert!(procs.is_empty(), "processes left in the lab's namespaces: {procs:?}");
    let (netns, _) = namespaces(&prefix);
    assert!(netns.is_empty(), "namespaces left: {netns:?}");
    let pins: Vec<String> =
        std::fs::read_dir("/sys/fs/bpf").into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(&prefix)).collect();
    assert!(pins.is_empty(), "pins left: {pins:?}");
    assert!(!dir.exists(), "{} left", dir.display());
}

/// Asserts a lab report's checks, all but those named in `timed`: checks of a wall-clock bound.
/// On a loaded 2-core machine such a bound flakes or passes a slow regression; the figure is
/// printed here (and belongs in `cargo xtask bench`), and the test asserts on its own that the
/// event it times happened. A check named in `timed` must exist, so a renamed one is noticed.
pub fn assert_checks_but_timings(report: &impl Verdict, timed: &[&str]) {
    let checks = report.checks();
    for t in timed {
        assert!(checks.iter().any(|c| c.what == *t), "no check {t:?} in the report (renamed?):\n{}", report.markdown());
    }
    for c in checks.iter().filter(|c| timed.contains(&c.what.as_str())) {
        println!("figure, not asserted here: {} ({}): {}", c.what, if c.ok { "within its bound" } else { "OVER its bound" }, c.detail);
    }
    let failed: Vec<&str> = checks.iter().filter(|c| !c.ok && !timed.contains(&c.what.as_str())).map(|c| c.what.as_str()).collect();
    assert!(failed.is_empty(), "checks failed: {failed:?}\n{}", report.markdown());
}
