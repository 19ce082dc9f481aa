//! Labs for tests: `sluice_lab` topologies named like the harness's namespaces, and
//! the check that one left nothing behind.

use std::sync::atomic::{AtomicU32, Ordering};

use lb_userspace::config::Mode;
use sluice_lab::{Lab, Spec};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A lab named like the harness's namespaces (`slc-<pid>-…`, swept if the test is killed).
pub fn lab(backends: u8, clients: u8, mode: Mode) -> Lab {
    crate::require_root();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let prefix = format!("slc-{}-l{n}", std::process::id());
    let dir = std::env::temp_dir().join(format!("sluice-lab-test-{}-{n}", std::process::id()));
    Lab::up(Spec { prefix, backends, clients, mode, servers: true, dir, sluice: crate::sluice_bin() }).expect("lab up")
}

/// Drops the lab and checks it left no namespace, pin or file.
pub fn down_and_check(lab: Lab) {
    let (prefix, dir) = (format!("{}-", lab.spec.prefix), lab.spec.dir.clone());
    drop(lab);
    let netns: Vec<String> =
        std::fs::read_dir("/run/netns").into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(&prefix)).collect();
    assert!(netns.is_empty(), "namespaces left: {netns:?}");
    let pins: Vec<String> =
        std::fs::read_dir("/sys/fs/bpf").into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(&prefix)).collect();
    assert!(pins.is_empty(), "pins left: {pins:?}");
    assert!(!dir.exists(), "{} left", dir.display());
}
