//! Builds the XDP object (lb-ebpf, target bpfel-unknown-none) and puts it in OUT_DIR, where
//! `datapath.rs` embeds it.
//!
//! The eBPF crate needs `-Z build-std=core`; on these machines that works with Debian's
//! rustc-web + rust-web-src linked into rustup as `debian-bpf` and `RUSTC_BOOTSTRAP=1`
//! (`cargo xtask setup` prepares both; see docs/ARCHITECTURE.md). Override the toolchain with
//! `SLUICE_BPF_TOOLCHAIN`. Only the compiler's diagnostics surface as `warning:` lines; cargo's
//! progress shows when `cargo xtask build` builds the object first (then this is a no-op), and
//! in full if the build fails.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    process::Stdio,
};

include!("ebpf_build.rs");

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=SLUICE_BPF_TOOLCHAIN");
    let toolchain = std::env::var("SLUICE_BPF_TOOLCHAIN").unwrap_or_else(|_| "debian-bpf".into());
    let manifest = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest.join("..");
    println!("cargo:rerun-if-changed={}", workspace.join("lb-ebpf").display());
    println!("cargo:rerun-if-changed={}", workspace.join("lb-common").display());
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), std::path::PathBuf::from).join("bpf");
    let mut cmd = ebpf_build_command(&toolchain, &workspace, &target_dir);
    cmd.arg("--message-format=json").stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| anyhow::anyhow!("starting `rustup run {toolchain} cargo build` for the XDP object: {e}; {HINT}"))?;
    let mut stderr = child.stderr.take().expect("piped");
    let progress = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        if msg["reason"] == "compiler-message" {
            for l in msg["message"]["rendered"].as_str().unwrap_or_default().lines() {
                println!("cargo:warning={l}");
            }
        }
    }
    let status = child.wait()?;
    let progress = progress.join().unwrap_or_default();
    if !status.success() {
        anyhow::bail!("building the XDP object failed ({status}):\n{progress}\n{HINT}");
    }
    let object = ebpf_object(&target_dir);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("lb-ebpf");
    std::fs::copy(&object, &out).map_err(|e| anyhow::anyhow!("copying {} to {}: {e}", object.display(), out.display()))?;
    Ok(())
}

const HINT: &str = "Run `cargo xtask setup` (as root) to install bpf-linker and the debian-bpf toolchain, \
                    and build through `cargo xtask build`.";
