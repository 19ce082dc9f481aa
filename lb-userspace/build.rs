//! Builds the XDP object (lb-ebpf, target bpfel-unknown-none) with aya-build.
//!
//! The eBPF crate needs `-Z build-std=core`; on these machines that works with Debian's
//! rustc-web + rust-web-src linked into rustup as `debian-bpf` and `RUSTC_BOOTSTRAP=1`
//! (`cargo xtask setup` prepares both; see docs/ARCHITECTURE.md). Override the toolchain with
//! `SLUICE_BPF_TOOLCHAIN`.

use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=SLUICE_BPF_TOOLCHAIN");
    let toolchain = std::env::var("SLUICE_BPF_TOOLCHAIN").unwrap_or_else(|_| "debian-bpf".into());
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
    let package = Package { name: "lb-ebpf", root_dir: root, ..Default::default() };
    aya_build::build_ebpf([package], Toolchain::Custom(&toolchain)).map_err(|e| {
        anyhow::anyhow!(
            "building the XDP object failed: {e:#}\n\
             Run `cargo xtask setup` (as root) to install bpf-linker and the {toolchain} toolchain, \
             and build through `cargo xtask build` (it sets RUSTC_BOOTSTRAP=1)."
        )
    })
}
