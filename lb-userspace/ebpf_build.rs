// The one definition of how the XDP object is built, shared (with `include!`) by
// lb-userspace's build.rs, which embeds the object, and by `cargo xtask build`, which builds it
// first with cargo's plain progress output. Both use the same target directory, so the build
// script's build is then a no-op.

/// `cargo build` of `lb-ebpf` for `bpfel-unknown-none` with the toolchain `toolchain` (Debian's
/// rustc linked into rustup, see docs/ARCHITECTURE.md), into `target_dir`.
#[allow(unused_qualifications, reason = "included where `std::path` and `std::process` may or may not be imported")]
pub fn ebpf_build_command(toolchain: &str, workspace: &std::path::Path, target_dir: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new("rustup");
    cmd.args(["run", toolchain, "cargo", "build", "--package", "lb-ebpf", "--bins", "--release", "--target", "bpfel-unknown-none"])
        // core for a target without a prebuilt standard library.
        .args(["-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(workspace)
        // Debian's stable rustc accepts -Z with it (aya-ebpf-cty needs it too).
        .env("RUSTC_BOOTSTRAP", "1")
        // BTF for bpftool and aya; the architecture the eBPF helpers are written for.
        // Warnings are errors: the datapath's crates (lb-ebpf, lb-common) build warning-free
        // with the workspace's lints (registry crates are capped by cargo).
        .env("CARGO_ENCODED_RUSTFLAGS", "--cfg=bpf_target_arch=\"x86_64\"\u{1f}-Cdebuginfo=2\u{1f}-Clink-arg=--btf\u{1f}-Dwarnings")
        // aya-ebpf's build script tracks HOST, which cargo sets for build scripts only: set it
        // here too, or the build script's build and xtask's would each redo the other's.
        .env("HOST", "x86_64-unknown-linux-gnu")
        // A build script's cargo sets these for the host toolchain; the eBPF build needs its own.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_TARGET_DIR");
    cmd
}

/// Where the object lands under `target_dir`.
#[allow(unused_qualifications, reason = "included where `std::path` may or may not be imported")]
pub fn ebpf_object(target_dir: &std::path::Path) -> std::path::PathBuf {
    target_dir.join("bpfel-unknown-none/release/lb-ebpf")
}
