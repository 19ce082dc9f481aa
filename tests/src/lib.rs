//! The test harness shared by Sluice's datapath and end-to-end tests:
//! - [`packet`]: a packet builder with correct checksums (checked against etherparse);
//! - [`testrun`]: BPF_PROG_TEST_RUN of the real XDP program, and timing for benchmarks;
//! - [`netns`], [`l2lab`]: network-namespace topologies that tear down on drop, also on panic
//!   (from the lab's crate, `sluice-lab`, which builds the lab's own from the same primitives);
//! - [`bench`]: what the XDP benchmarks share.
//!
//! Privileged tests never skip: without root they panic saying why (CI runs as root).

pub mod bench;
pub mod labs;
pub mod packet;
pub mod pki;
pub mod testrun;

use std::path::Path;

pub use sluice_lab::{l2lab, l2lab::sluice_bin, netns, netns::require_root, PinDir};

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

/// Asserts that `metrics` is valid Prometheus text, by the real `promtool check metrics`.
pub fn promtool_check(metrics: &str) {
    use std::io::Write as _;
    let mut p = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus; `cargo xtask setup` installs it)");
    p.stdin.take().expect("stdin").write_all(metrics.as_bytes()).expect("write");
    let out = p.wait_with_output().expect("promtool");
    assert!(out.status.success(), "promtool check metrics: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}
