//! `cargo xtask setup`: bring a fresh Debian 12 machine of this kind to the point where Sluice
//! builds and its privileged tests run. Every step checks first and does nothing when its work
//! is already done, so a second run is a quick no-op. See `../shared/TOOLCHAIN.md` for why each
//! step exists.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::requirements::{BENCH_PACKAGES, PACKAGES, TOOLS};

pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// The rustup name under which Debian's compiler is linked; lb-userspace's build.rs uses it.
pub const BPF_TOOLCHAIN: &str = "debian-bpf";
const BPFFS: &str = "/sys/fs/bpf";

struct Step {
    name: &'static str,
    started: Instant,
}

impl Step {
    fn new(name: &'static str) -> Self {
        Self { name, started: Instant::now() }
    }
    fn done(self, what: &str) {
        println!("setup: {:<28} {:<44} {:>7.2}s", self.name, what, self.started.elapsed().as_secs_f64());
    }
}

pub fn run() -> Result<()> {
    let total = Instant::now();
    if !is_root() {
        bail!(
            "cargo xtask setup must run as root: it installs Debian packages, mounts a bpf \
             filesystem at {BPFFS}, and Sluice's tests load XDP programs and create network \
             namespaces. Run it again as root (e.g. `sudo -E cargo xtask setup`)."
        );
    }
    packages()?;
    peer_load_balancers()?;
    bpf_linker()?;
    toolchain_link()?;
    bpffs()?;
    verify()?;
    println!("setup: complete in {:.2}s", total.elapsed().as_secs_f64());
    Ok(())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]).output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Installs the Debian packages in `list` that are missing.
fn ensure_packages(step_name: &'static str, list: &[&str]) -> Result<()> {
    let step = Step::new(step_name);
    let missing: Vec<&str> = list.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        step.done("all installed");
        return Ok(());
    }
    println!("setup: installing {}", missing.join(" "));
    sh(Command::new("apt-get").arg("update").arg("-q"), "apt-get update")?;
    let status = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!(
            "apt-get could not install {}. Check that Debian's bookworm and \
             bookworm-backports archives are reachable (`apt-cache policy {}`) and install \
             them by hand, then run `cargo xtask setup` again.",
            missing.join(" "),
            missing[0]
        );
    }
    step.done(&format!("installed {}", missing.len()));
    Ok(())
}

/// HAProxy and nginx for `bench e2e` (whose short form runs in the test suite), installed
/// without starting their system services (the benchmark runs its own instances inside the
/// lab's namespaces).
fn peer_load_balancers() -> Result<()> {
    const POLICY: &str = "/usr/sbin/policy-rc.d";
    let ours = !Path::new(POLICY).exists();
    if ours {
        // invoke-rc.d's convention: exit 101 = "action forbidden", so postinst starts nothing.
        std::fs::write(POLICY, "#!/bin/sh\nexit 101\n").context("writing policy-rc.d")?;
        std::fs::set_permissions(POLICY, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let res = ensure_packages("haproxy and nginx", BENCH_PACKAGES);
    if ours {
        let _ = std::fs::remove_file(POLICY);
    }
    res
}

fn packages() -> Result<()> {
    ensure_packages("debian packages", PACKAGES)
}

fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME").map_or_else(|| home().join(".cargo"), PathBuf::from).join("bin")
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

fn bpf_linker() -> Result<()> {
    let step = Step::new("bpf-linker (LLVM 22)");
    let bin = cargo_bin_dir().join("bpf-linker");
    let have = Command::new(&bin).arg("--version").output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    if have.contains(BPF_LINKER_VERSION) {
        step.done(&format!("{BPF_LINKER_VERSION} present"));
        return Ok(());
    }
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    // Build with rustup's stable toolchain, whatever directory override is in force.
    sh(
        Command::new("cargo")
            .args(["+stable", "install", "--locked", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
        "cargo install bpf-linker",
    )?;
    step.done(&format!("built {BPF_LINKER_VERSION}"));
    Ok(())
}

fn toolchain_link() -> Result<()> {
    let step = Step::new("rustup toolchain link");
    let list = Command::new("rustup").args(["toolchain", "list"]).output().context("running rustup (is rustup installed?)")?;
    if String::from_utf8_lossy(&list.stdout).lines().any(|l| l.split_whitespace().next() == Some(BPF_TOOLCHAIN)) {
        step.done(&format!("{BPF_TOOLCHAIN} -> /usr linked"));
        return Ok(());
    }
    if !Path::new("/usr/lib/rustlib/src/rust/library/core").exists() {
        bail!("rust-web-src is installed but /usr/lib/rustlib/src/rust/library/core is missing");
    }
    sh(Command::new("rustup").args(["toolchain", "link", BPF_TOOLCHAIN, "/usr"]), "rustup toolchain link")?;
    step.done(&format!("linked {BPF_TOOLCHAIN} -> /usr"));
    Ok(())
}

fn bpffs() -> Result<()> {
    let step = Step::new("bpffs");
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(BPFFS) && l.split_whitespace().nth(2) == Some("bpf")) {
        step.done(&format!("{BPFFS} mounted"));
        return Ok(());
    }
    sh(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]), "mount -t bpf bpf /sys/fs/bpf")?;
    step.done(&format!("mounted {BPFFS}"));
    Ok(())
}

/// Checks that what setup promises works, so a missing piece fails here, naming its package,
/// and not twenty minutes later inside a build script or a test.
fn verify() -> Result<()> {
    let step = Step::new("verify");
    let mut broken = Vec::new();
    for t in TOOLS.iter().filter(|t| !t.probe.is_empty()) {
        let ok = Command::new(t.program).args(t.probe).output().is_ok_and(|o| o.status.success());
        if !ok {
            broken.push(format!("`{} {}` does not answer: install the Debian package {}", t.program, t.probe.join(" "), t.package.unwrap_or("(base system)")));
        }
    }
    let linker = cargo_bin_dir().join("bpf-linker");
    if !Command::new(&linker).arg("--version").output().is_ok_and(|o| o.status.success()) {
        broken.push(format!("`{} --version` does not answer: run `cargo xtask setup` again (it builds bpf-linker)", linker.display()));
    }
    if !Command::new("rustup").args(["run", BPF_TOOLCHAIN, "rustc", "--version"]).output().is_ok_and(|o| o.status.success()) {
        broken.push(format!("`rustup run {BPF_TOOLCHAIN} rustc --version` fails: install rustc-web, cargo-web and rust-web-src"));
    }
    if let Err(e) = protoc_well_known() {
        broken.push(format!(
            "protoc cannot compile a file that imports google/protobuf/descriptor.proto ({e:#}): install the Debian package libprotobuf-dev (etcd-client's build script needs it)"
        ));
    }
    if !broken.is_empty() {
        bail!("setup installed everything but these do not work:\n  {}", broken.join("\n  "));
    }
    step.done(&format!("{} tools, protoc, bpf-linker, {BPF_TOOLCHAIN} answer", TOOLS.iter().filter(|t| !t.probe.is_empty()).count()));
    Ok(())
}

/// What etcd-client's build script does: compile a proto that imports a well-known one.
fn protoc_well_known() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("sluice-setup-protoc-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let proto = dir.join("check.proto");
    std::fs::write(&proto, "syntax = \"proto3\";\nimport \"google/protobuf/descriptor.proto\";\nmessage Check { google.protobuf.FileDescriptorProto f = 1; }\n")?;
    let out = Command::new("protoc").arg("-I").arg(&dir).arg(format!("--descriptor_set_out={}", dir.join("check.pb").display())).arg(&proto).output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.context("running protoc")?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn sh(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}
