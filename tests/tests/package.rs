//! The Debian package (`cargo xtask package`, issue 30), unpacked into a temporary root: the
//! binary runs from there, the man pages render, the bash completion completes, the unit
//! verifies, lintian finds no error, and the maintainer scripts start nothing.
//!
//! The package comes from `SLUICE_DEB` (`cargo xtask test` makes it before the suite around
//! the debug binary it built: the same packaging, no release build); without it this test runs
//! `cargo xtask package` itself (a release build: minutes the first time, seconds after).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Instant,
};

/// Warnings lintian may report and that are kept on purpose (see xtask/src/package.rs and the
/// README's "Install" section); any other warning fails the test, an error always does.
const LINTIAN_KEPT: &[&str] = &["initial-upload-closes-no-bugs"];
/// Tags the package overrides (/usr/share/lintian/overrides/sluice, each with its reason).
const LINTIAN_OVERRIDDEN: &[&str] = &["embedded-library"];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf()
}

fn deb() -> PathBuf {
    if let Some(p) = std::env::var_os("SLUICE_DEB") {
        let p = PathBuf::from(p);
        assert!(p.exists(), "SLUICE_DEB={} does not exist", p.display());
        return p;
    }
    let root = workspace_root();
    let t = Instant::now();
    let status =
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args(["xtask", "package"]).current_dir(&root).status().expect("running cargo xtask package");
    assert!(status.success(), "cargo xtask package failed");
    println!("cargo xtask package: {:.1}s", t.elapsed().as_secs_f64());
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    target.join("debian").join(format!("sluice_{}-1_amd64.deb", env!("CARGO_PKG_VERSION")))
}

fn run(cmd: &mut Command) -> Output {
    let what = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(out.status.success(), "{what}: {}\n{}{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A temporary directory removed on drop.
struct TempRoot(PathBuf);

impl Drop for TempRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_package_unpacks_runs_and_passes_lintian() {
    let started = Instant::now();
    let deb = deb();
    let root = TempRoot(std::env::temp_dir().join(format!("sluice-package-test-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&root.0);
    std::fs::create_dir_all(&root.0).expect("temp root");
    control_area(&deb);
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root.0));
    contents(&root.0);
    let (bin, unit) = binary(&root.0);
    man_pages(&root.0);
    bash_completion(&root.0);
    maintainer_scripts(&deb, &root.0);
    unit_verifies(&root.0, &bin, &unit);
    lintian(&deb);
    println!("package checked in {:.1}s", started.elapsed().as_secs_f64());
}

fn control_area(deb: &Path) {
    // The control area: dependencies from the binary's shared libraries, the conffile.
    let info = text(&run(Command::new("dpkg-deb").arg("--info").arg(deb)).stdout);
    for want in ["Package: sluice", &format!("Version: {}-1", env!("CARGO_PKG_VERSION")), "Architecture: amd64", "Depends: libc6 (>= ", "postinst", "prerm", "postrm"] {
        assert!(info.contains(want), "{want:?} not in the control area:\n{info}");
    }
    let conffiles = text(&run(Command::new("dpkg-deb").arg("--info").arg(deb).arg("conffiles")).stdout);
    assert_eq!(conffiles.trim(), "/etc/sluice/sluice.toml", "the conffiles");
    // Every file owned by root.
    let listing = text(&run(Command::new("dpkg-deb").arg("--contents").arg(deb)).stdout);
    for line in listing.lines() {
        assert!(line.split_whitespace().nth(1) == Some("root/root"), "not owned by root: {line}");
    }
    // The lab (a load generator, a SYN flooder, a fault injector) is not for production hosts:
    // no `sluice-lab` binary (the `sluice lab` subcommand's page says where it comes from).
    assert!(!listing.contains("bin/sluice-lab"), "the lab is not for production hosts:\n{listing}");
}

fn contents(root: &Path) {
    let r = |rel: &str| root.join(rel);
    for f in [
        "usr/bin/sluice",
        "lib/systemd/system/sluice.service",
        "etc/sluice/sluice.toml",
        "usr/share/man/man8/sluice.8.gz",
        "usr/share/man/man8/sluice-status.8.gz",
        "usr/share/man/man8/sluice-backend-set-limit.8.gz",
        "usr/share/man/man8/sluice-completions.8.gz",
        "usr/share/bash-completion/completions/sluice",
        "usr/share/zsh/vendor-completions/_sluice",
        "usr/share/fish/vendor_completions.d/sluice.fish",
        "usr/share/sluice/bird/node.conf",
        "usr/share/sluice/bird/router.conf",
        "usr/share/sluice/prometheus/alerts.yml",
        "usr/share/sluice/alertmanager/alertmanager.yml",
        "usr/share/sluice/grafana/sluice.json",
        "usr/share/doc/sluice/README.md",
        "usr/share/doc/sluice/RUNBOOK.md",
        "usr/share/doc/sluice/copyright",
        "usr/share/doc/sluice/changelog.Debian.gz",
    ] {
        assert!(r(f).is_file(), "{f} is not in the package");
    }
    assert!(r("var/lib/sluice").is_dir(), "/var/lib/sluice is not in the package");
    let copyright = std::fs::read_to_string(r("usr/share/doc/sluice/copyright")).expect("copyright");
    assert!(copyright.starts_with("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"), "not DEP-5:\n{copyright}");
    assert!(copyright.contains("\n tokio ") && copyright.contains("\nLicense: MIT\n"), "the linked crates and the licenses are named:\n{copyright}");
}

/// The binary and the unit's text.
fn binary(root: &Path) -> (PathBuf, String) {
    let r = |rel: &str| root.join(rel);
    // The binary runs from the unpacked root, with its XDP object embedded: it checks the
    // packaged config (the example) as valid.
    let bin = r("usr/bin/sluice");
    let version = text(&run(Command::new(&bin).arg("--version")).stdout);
    assert_eq!(version.trim(), format!("sluice {}", env!("CARGO_PKG_VERSION")));
    let check = Command::new(&bin).args(["config", "check"]).arg(r("etc/sluice/sluice.toml")).output().expect("sluice config check");
    assert!(check.status.code().is_some_and(|c| c < 2), "the packaged config is refused: {}{}", text(&check.stdout), text(&check.stderr));
    let unit = std::fs::read_to_string(r("lib/systemd/system/sluice.service")).expect("unit");
    assert!(unit.contains("ExecStart=/usr/bin/sluice run --config /etc/sluice/sluice.toml"), "the unit runs the packaged binary:\n{unit}");

    (bin, unit)
}

fn man_pages(root: &Path) {
    let r = |rel: &str| root.join(rel);
    // Man pages: each renders without a groff warning (what lintian's groff-message checks);
    // sluice(8) names the commands.
    let pages: Vec<PathBuf> = std::fs::read_dir(r("usr/share/man/man8")).expect("man8").flatten().map(|e| e.path()).collect();
    assert!(pages.len() >= 20, "a page per subcommand: {pages:?}");
    for p in &pages {
        let out = run(Command::new("man").args(["--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z"]).arg(p));
        assert!(out.stderr.is_empty(), "{}: {}", p.display(), text(&out.stderr));
    }
    let page = text(&run(Command::new("man").arg("-l").arg(r("usr/share/man/man8/sluice.8.gz")).env("MANPAGER", "cat").env("MANWIDTH", "100")).stdout);
    for want in ["sluice", "SYNOPSIS", "status", "explain", "completions", "--socket"] {
        assert!(page.contains(want), "{want:?} not in sluice(8):\n{page}");
    }
    let sub = text(&run(Command::new("man").arg("-l").arg(r("usr/share/man/man8/sluice-backend-set-limit.8.gz")).env("MANPAGER", "cat")).stdout);
    assert!(sub.contains("--force"), "sluice-backend-set-limit(8):\n{sub}");
}

fn bash_completion(root: &Path) {
    let r = |rel: &str| root.join(rel);
    // The bash completion loads and completes a subcommand and a nested one.
    let complete = |words: &str, cword: usize| -> String {
        let script = format!(
            "source \"$1\" && COMP_WORDS=({words}) && COMP_CWORD={cword} && COMP_LINE=\"{words}\" && COMP_POINT=${{#COMP_LINE}} && _sluice sluice \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\" && echo \"${{COMPREPLY[@]}}\""
        );
        text(&run(Command::new("bash").args(["--norc", "-c", &script, "bash"]).arg(r("usr/share/bash-completion/completions/sluice"))).stdout)
    };
    let top = complete("sluice st", 1);
    assert!(top.split_whitespace().any(|w| w == "status"), "`sluice st<Tab>`: {top:?}");
    let nested = complete("sluice backend se", 2);
    assert!(nested.split_whitespace().any(|w| w == "set-limit"), "`sluice backend se<Tab>`: {nested:?}");
    for f in ["usr/share/zsh/vendor-completions/_sluice", "usr/share/fish/vendor_completions.d/sluice.fish"] {
        let s = std::fs::read_to_string(r(f)).expect("completion");
        assert!(s.contains("set-limit") && s.contains("status"), "{f} does not complete the commands");
    }
}

fn maintainer_scripts(deb: &Path, root: &Path) {
    // The maintainer scripts: valid sh, `set -e`, and nothing that enables, starts or restarts
    // the service (a load balancer attaches when its operator says so).
    let control = root.join("DEBIAN");
    run(Command::new("dpkg-deb").arg("--control").arg(deb).arg(&control));
    for script in ["postinst", "prerm", "postrm"] {
        let path = control.join(script);
        run(Command::new("sh").arg("-n").arg(&path));
        let s = std::fs::read_to_string(&path).expect("script");
        assert!(s.lines().any(|l| l.trim() == "set -e"), "{script} has no `set -e`");
        for line in s.lines().filter(|l| !l.trim_start().starts_with('#') && !l.contains("echo")) {
            for bad in ["enable", " start", "restart", "try-restart", "reload-or-restart"] {
                assert!(!line.contains(bad), "{script} must not {bad:?} the service: {line}");
            }
        }
    }
    let prerm = std::fs::read_to_string(control.join("prerm")).expect("prerm");
    assert!(prerm.contains("\"$1\" = \"remove\""), "prerm stops the daemon on removal only:\n{prerm}");
}

fn unit_verifies(root: &Path, bin: &Path, unit: &str) {
    // systemd accepts the unit, offline. `systemd-analyze verify` checks that ExecStart's
    // binary is executable, and /usr/bin/sluice is not installed here: it verifies a copy whose
    // only change is that path, pointing into the unpacked root. It exits 0 on a setting it
    // ignores, so its output must be empty too.
    let t = Instant::now();
    let verify_dir = root.join("verify");
    std::fs::create_dir_all(&verify_dir).expect("verify dir");
    std::fs::write(verify_dir.join("sluice.service"), unit.replace("/usr/bin/sluice", &bin.display().to_string())).expect("unit copy");
    let verify = Command::new("systemd-analyze").arg("verify").arg(verify_dir.join("sluice.service")).output().expect("systemd-analyze (Debian's systemd)");
    assert!(verify.status.success() && verify.stderr.is_empty() && verify.stdout.is_empty(), "systemd-analyze verify: {}{}", text(&verify.stdout), text(&verify.stderr));
    println!("systemd-analyze verify: clean ({:.1}s)", t.elapsed().as_secs_f64());
}

fn lintian(deb: &Path) {
    // lintian: no error, and no warning beyond those kept on purpose.
    let t = Instant::now();
    let lint = Command::new("lintian").args(["--display-info", "--show-overrides"]).arg(deb).output().expect("lintian (`cargo xtask setup` installs it)");
    let report = text(&lint.stdout);
    println!("lintian ({:.1}s):\n{report}{}", t.elapsed().as_secs_f64(), text(&lint.stderr));
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{}", errors.join("\n"));
    let warnings: Vec<&str> = report.lines().filter(|l| l.starts_with("W:") && !LINTIAN_KEPT.iter().any(|k| l.split_whitespace().nth(2) == Some(*k))).collect();
    assert!(warnings.is_empty(), "lintian warnings not kept on purpose (fix them, or list them with a reason):\n{}", warnings.join("\n"));
    let overridden: Vec<&str> = report.lines().filter(|l| l.starts_with("O:") && !LINTIAN_OVERRIDDEN.iter().any(|k| l.split_whitespace().nth(2) == Some(*k))).collect();
    assert!(overridden.is_empty(), "overrides not known here:\n{}", overridden.join("\n"));
    // 2: a tag of --fail-on's severity, which an overridden error is with --show-overrides.
    assert!(matches!(lint.status.code(), Some(0 | 2)), "lintian failed: {:?} {}", lint.status, text(&lint.stderr));
}
