//! The test harness shared by Sluice's datapath and end-to-end tests:
//! - [`packet`]: a packet builder with correct checksums (checked against etherparse);
//! - [`testrun`]: BPF_PROG_TEST_RUN of the real XDP program, and timing for benchmarks;
//! - [`netns`]: network-namespace topologies that tear down on drop, also on panic;
//! - [`bench`]: what the XDP benchmarks share.
//!
//! Privileged tests never skip: without root they panic saying why (CI runs as root).

pub mod bench;
pub mod l2lab;
pub mod labs;
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
    let p = std::env::var_os("SLUICE_BIN").map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/sluice"), PathBuf::from);
    assert!(p.exists(), "sluice binary not found at {}; run the tests with `cargo xtask test`", p.display());
    p
}

static NEXT_PIN: AtomicU32 = AtomicU32::new(0);

/// A private pin directory under /sys/fs/bpf for one test; removed (with its pins) on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new() -> Self {
        let p = PathBuf::from(format!("/sys/fs/bpf/sluice-test-{}-{}", std::process::id(), NEXT_PIN.fetch_add(1, Ordering::Relaxed)));
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

/// Replaces the section between `<!-- NAME:begin -->` and `<!-- NAME:end -->` of a markdown
/// file (BENCHMARKS.md) with `body`, or appends it; text outside the markers is kept.
pub fn write_section(path: &Path, name: &str, body: &str) {
    let (begin, end) = (format!("<!-- {name}:begin -->"), format!("<!-- {name}:end -->"));
    let section = format!("{begin}\n{body}\n{end}\n\n");
    let existing = std::fs::read_to_string(path).unwrap_or_else(|_| "# Sluice benchmarks\n\n".into());
    let updated = match (existing.find(&begin), existing.find(&end)) {
        (Some(a), Some(b)) => format!("{}{section}{}", &existing[..a], existing[b + end.len()..].trim_start_matches('\n')),
        _ => format!("{}\n\n{section}", existing.trim_end()),
    };
    std::fs::write(path, updated).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}
