//! The test harness shared by Sluice's datapath and end-to-end tests:
//! - [`packet`]: a packet builder with correct checksums (checked against etherparse);
//! - [`testrun`]: BPF_PROG_TEST_RUN of the real XDP program, and timing for benchmarks;
//! - [`netns`]: network-namespace topologies that tear down on drop, also on panic.
//!
//! Privileged tests never skip: without root they panic saying why (CI runs as root).

pub mod l2lab;
pub mod netns;
pub mod packet;
pub mod testrun;

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

/// Panics unless running as root: BPF and netns tests must run, not skip.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test loads BPF programs / creates network namespaces and needs root; run the \
         suite as root with `cargo xtask test` (it is not skipped: a skipped privileged test \
         would hide a broken datapath)"
    );
}

/// The `sluice` binary under test: `$SLUICE_BIN` (set by `cargo xtask test`), else the
/// workspace's debug build.
pub fn sluice_bin() -> PathBuf {
    let p = std::env::var_os("SLUICE_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/sluice"),
        PathBuf::from,
    );
    assert!(p.exists(), "sluice binary not found at {}; run the tests with `cargo xtask test`", p.display());
    p
}

static NEXT_PIN: AtomicU32 = AtomicU32::new(0);

/// A private pin directory under /sys/fs/bpf for one test; removed (with its pins) on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new() -> Self {
        let p = PathBuf::from(format!(
            "/sys/fs/bpf/sluice-test-{}-{}",
            std::process::id(),
            NEXT_PIN.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        Self(p)
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
