//! `cargo xtask`: toolchain bootstrap and orchestration for Sluice.

mod layers;
mod package;
mod requirements;
mod setup;

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Sluice's build, test and setup tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks (Debian packages, bpf-linker, toolchain link, bpffs).
    Setup,
    /// Set up, then build the eBPF object and the `sluice` binary.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run a benchmark and record it in BENCHMARKS.md (needs root).
    Bench {
        #[arg(value_enum)]
        which: Bench,
    },
    /// The first command: set up, build, and replay the 2023-05-05 incident in `sluice lab`
    /// (network namespaces on this host; needs root). The report goes to target/lab-report.
    Lab,
    /// Fuzz the datapath longer than the test suite does: the same seeded test, more frames.
    Fuzz {
        /// Frames to feed the program.
        #[arg(long, default_value_t = 20_000_000)]
        frames: u64,
        /// The generator's seed (a failure prints the one to replay).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Set up, build in release, and make the Debian package
    /// target/debian/sluice_<version>-1_amd64.deb (checked with lintian).
    Package,
    /// Set up, build, and run every test (privileged tests included; needs root).
    Test {
        /// Extra arguments passed to `cargo nextest run` (e.g. `-E 'binary(lab_cluster_limits)'`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Check lb-userspace's modules against its layers (issue 29): no new arrow upwards, no
    /// new file over 500 lines. Part of the lints `cargo xtask test` runs.
    Layers {
        /// Also list every arrow upwards with the lines that make it (what to cut).
        #[arg(long)]
        arrows: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Bench {
    /// Per-packet cost of the XDP program against XDP_PASS and MAC-swap floors.
    Datapath,
    /// Control plane: applying 100×100, a limit change reaching the datapath, GC of 1M flows, RSS.
    Control,
    /// Alert latency (first refusal → webhook, 20 trials) and daemon CPU with 1,000 backends.
    Alerts,
    /// XDP forwarding rate on one core (live-frames test runs, real XDP_TX) against the
    /// MAC-swap floor: established and new flows, tables of 10k and 1M flows.
    Xdp,
    /// Sluice against HAProxy and nginx (installed from Debian) on the lab topology: rates,
    /// latency, refusals, CPU per connection, memory with 5,000 idle connections.
    E2e,
    /// Cluster-wide limits: how fast shares move (skew, restart, failure, etcd back) and the
    /// etcd traffic, three runs of `sluice lab cluster --limits`.
    Limits,
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::Layers { arrows } => layers::run(arrows),
        Cmd::Build { release } => {
            setup::run()?;
            build(release)
        }
        Cmd::Package => {
            setup::run()?;
            package::run(true, true).map(|_| ())
        }
        Cmd::Test { args } => {
            setup::run()?;
            test(&args)
        }
        Cmd::Fuzz { frames, seed } => {
            setup::run()?;
            build(false)?;
            let seed = seed.unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs()));
            println!("fuzz: {frames} frames, seed {seed} (rerun: cargo xtask fuzz --frames {frames} --seed {seed})");
            let status = cargo()
                .args(["test", "--release", "--package", "sluice-tests", "--test", "fuzz", "--", "--nocapture"])
                .env("SLUICE_FUZZ_FRAMES", frames.to_string())
                .env("SLUICE_FUZZ_SEED", seed.to_string())
                .status()
                .context("running the fuzz test")?;
            if !status.success() {
                bail!("the datapath fuzz run failed (seed {seed})");
            }
            Ok(())
        }
        Cmd::Lab => {
            setup::run()?;
            build(false)?;
            let report = env_target_dir().join("lab-report");
            let status = Command::new(env_target_dir().join("debug/sluice")).args(["lab", "incident", "--report"]).arg(&report).status().context("running sluice lab incident")?;
            if !status.success() {
                bail!("the incident replay failed (see above)");
            }
            println!("next: `cargo xtask test`; or your own lab: `sudo target/debug/sluice lab up`");
            Ok(())
        }
        Cmd::Bench { which } => {
            setup::run()?;
            let bin = match which {
                Bench::Datapath => "bench-datapath",
                Bench::Control => "bench-control",
                Bench::Alerts => "bench-alerts",
                Bench::Xdp => "bench-xdp",
                Bench::Limits => "bench-limits",
                Bench::E2e => "bench-e2e",
            };
            let root = workspace_root();
            // The benchmarks start the sluice binary (the daemon): build it first, in release.
            build(true)?;
            let status = cargo()
                .current_dir(&root)
                .args(["run", "--release", "--package", "sluice-tests", "--bin", bin, "--"])
                .arg(root.join("BENCHMARKS.md"))
                .env("SLUICE_BIN", env_target_dir().join("release/sluice"))
                .status()
                .with_context(|| format!("running {bin}"))?;
            if !status.success() {
                bail!("{bin} failed");
            }
            Ok(())
        }
    }
}

/// The environment every cargo invocation that builds the eBPF object needs.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // No RUSTC_BOOTSTRAP here: cargo fingerprints it, so host builds with it would not reuse the
    // dependencies `cargo xtask` itself was built with (~30 s on every call). The eBPF build,
    // the one that needs `-Z build-std`, sets it on its own command (ebpf_build.rs).
    cmd.env_remove("RUSTC_BOOTSTRAP");
    cmd.env("PATH", path_with_cargo_bin());
    cmd
}

/// `PATH` with cargo's bin directory (bpf-linker, rustup) in it.
fn path_with_cargo_bin() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    let cargo_bin = std::env::var("CARGO_HOME").map_or_else(|_| format!("{}/.cargo/bin", std::env::var("HOME").unwrap_or_else(|_| "/root".into())), |h| format!("{h}/bin"));
    if path.split(':').any(|p| p == cargo_bin) {
        path
    } else {
        format!("{cargo_bin}:{path}")
    }
}

// `ebpf_build_command` and `ebpf_object`: how the XDP object is built, shared with build.rs.
include!("../../lb-userspace/ebpf_build.rs");

fn build(release: bool) -> Result<()> {
    let started = Instant::now();
    // The XDP object first, with cargo's own progress lines: built inside lb-userspace's build
    // script, they could only surface as `warning:` lines. The build script then finds it built.
    println!("build: the XDP object (lb-ebpf for bpfel-unknown-none)");
    let root = workspace_root();
    let toolchain = std::env::var("SLUICE_BPF_TOOLCHAIN").unwrap_or_else(|_| "debian-bpf".into());
    let bpf_target = env_target_dir().join("bpf");
    let status = ebpf_build_command(&toolchain, &root, &bpf_target).env("PATH", path_with_cargo_bin()).status().context("running the eBPF build")?;
    if !status.success() {
        bail!("building the XDP object failed (see above)");
    }
    println!("build: XDP object {}", ebpf_object(&bpf_target).display());
    println!("build: the sluice and sluice-lab binaries");
    let mut cmd = cargo();
    cmd.args(["build", "--package", "lb-userspace", "--package", "sluice-lab", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build failed");
    }
    println!("build: done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The lints every change passes, as aya's CI runs them: formatting, and clippy with warnings
/// as errors on the host crates. lb-ebpf gets rustc's lints as errors in its own build (see
/// `ebpf_build.rs`): a clippy for bpfel-unknown-none needs the toolchain that builds `core` for
/// it, which has none here. Last, lb-userspace's module layers (layers.rs).
fn lint() -> Result<()> {
    let started = Instant::now();
    let status = cargo().args(["fmt", "--all", "--check"]).status().context("running cargo fmt")?;
    if !status.success() {
        bail!("formatting differs (above): run `cargo fmt --all`");
    }
    let status = cargo()
        .args(["clippy", "--workspace", "--all-targets", "--exclude", "lb-ebpf", "--target-dir"])
        .arg(env_target_dir().join("clippy"))
        .args(["--", "-D", "warnings"])
        .status()
        .context("running cargo clippy")?;
    if !status.success() {
        bail!("clippy found warnings (above)");
    }
    layers::run(false)?;
    println!("lint: cargo fmt --check, clippy -D warnings and layers clean in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    let started = Instant::now();
    lint()?;
    build(false)?;
    // Doc examples first (nextest does not run them).
    // The Debian package, which tests/tests/package.rs unpacks and checks (lintian included),
    // made around the debug binary just built: a release build would add minutes.
    let deb = package::run(false, false)?;
    let status = cargo().args(["test", "--doc", "--package", "lb-common", "--package", "lb-userspace", "--package", "sluice-lab"]).status().context("running the doc tests")?;
    if !status.success() {
        bail!("doc tests failed");
    }
    // Every test in its own process, several at once (.config/nextest.toml says which run one
    // at a time): on 2 cores most of the suite waits on timers, not on the CPU.
    let mut cmd = cargo();
    cmd.args(["nextest", "run", "--package", "xtask", "--package", "lb-common", "--package", "lb-userspace", "--package", "sluice-lab", "--package", "sluice-tests"]);
    cmd.args(extra);
    // The tests find the sluice binary here.
    cmd.env("SLUICE_BIN", env_target_dir().join("debug/sluice"));
    cmd.env("SLUICE_DEB", &deb);
    cmd.stderr(Stdio::piped());
    let mut child = cmd.spawn().context("running cargo nextest (cargo install cargo-nextest if it is missing)")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(child.stderr.take().expect("piped")).lines() {
        let line = line?;
        eprintln!("{line}");
        // "Summary [ 612.3s] 121 tests run: 119 passed, 1 failed, 1 timed out, 3 skipped"
        if let Some(rest) = line.trim_start().strip_prefix("Summary").and_then(|r| r.split_once("tests run:").map(|(_, r)| r.to_owned())) {
            for part in rest.split(',') {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next(), words.next()) {
                    let n: u64 = n.parse().unwrap_or(0);
                    match what {
                        "passed" => passed += n,
                        "failed" | "timed" | "leaky" => failed += n,
                        "skipped" => ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    let secs = started.elapsed().as_secs_f64();
    // Nothing is ignored in CI: an ignored privileged test would be a silent skip.
    println!("sluice tests: {passed} passed, {failed} failed, {ignored} ignored in {secs:.0}s");
    if !status.success() || failed > 0 {
        bail!("tests failed");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    if ignored > 0 {
        bail!("{ignored} tests were ignored; every test must run here");
    }
    Ok(())
}

/// The workspace's root, without a `..` in it: paths printed for the user read as they are.
fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn env_target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), std::path::PathBuf::from)
}
