//! What a machine needs for Sluice, in one place: the Debian packages `cargo xtask setup`
//! installs, and every program the build, the tests, the lab and the benchmarks start, with the
//! package that brings it and how setup checks that it answers. A test below reads the sources
//! and fails when they start a program this list does not name.

/// A program something in the workspace starts.
pub struct Tool {
    pub program: &'static str,
    /// The Debian package that installs it (one of `PACKAGES` or `BENCH_PACKAGES`), or `None`
    /// for what every machine of this kind has before setup (cargo, rustup, dpkg, apt).
    pub package: Option<&'static str>,
    /// Arguments that make it print its version and exit 0; setup runs them after installing.
    pub probe: &'static [&'static str],
}

/// Debian packages the build, the tests and the lab need.
/// rustc-web/cargo-web/rust-web-src: a compiler with matching library source, for
/// `-Z build-std=core` on bpfel (rustup's nightly has no rust-src here).
/// llvm-22-dev, libpolly-22-dev, libzstd-dev: to build bpf-linker against LLVM 22.
pub const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    // Operating and testing the datapath: bpftool for the pinned maps, ip/ss, ethtool (checksum
    // offload off on the lab's veths), nsenter/setpriv, sysctl, ping (the lab fills the
    // neighbour tables with it: without ping a node has no MAC for a backend).
    "bpftool",
    "iproute2",
    "ethtool",
    "util-linux",
    "procps",
    "iputils-ping",
    // promtool: `promtool check metrics` on /metrics in the tests; Prometheus itself scrapes
    // /metrics over TLS with basic auth in the tls test.
    "prometheus",
    // curl: the TLS tests speak HTTPS with client certificates to /metrics and the peer channel.
    "curl",
    // BIRD 2: the cluster's BGP speaker (announcing VIPs), run for real by the cluster tests.
    "bird2",
    // etcd: where the nodes of a cluster lease their shares of a cluster-wide limit; started by
    // the cluster tests and `sluice lab cluster --limits` (etcdctl for operators and the docs).
    "etcd-server",
    "etcd-client",
    // protoc and the well-known protos it imports (google/protobuf/*.proto): the etcd-client
    // crate generates its gRPC code at build time and needs both.
    "protobuf-compiler",
    "libprotobuf-dev",
    // nft: the cluster's fault tests and `sluice lab cluster --limits` cut a node off from etcd
    // or its peers with an nftables drop inside a namespace.
    "nftables",
    // amtool: checks the shipped Alertmanager routing (deploy/alertmanager) in the tests; the
    // Alertmanager itself receives the alert webhooks over TLS in alertmanager_tls.
    "prometheus-alertmanager",
    // groupadd/groupdel: the read-only socket's test makes a throwaway group (Debian marks
    // passwd "required", so this only states it).
    "passwd",
    // `cargo xtask package` and its test (tests/tests/package.rs): dpkg-shlibdeps (dpkg-dev)
    // for the package's Depends, strip (binutils), lintian on the .deb, `man -l` on its pages
    // (man-db), `systemd-analyze verify` on its unit (systemd; nothing is started by it).
    "dpkg-dev",
    "binutils",
    "lintian",
    "man-db",
    "systemd",
    // chromium: the status page's test opens it in a real browser (headless) and saves a
    // screenshot.
    "chromium",
    // tmux: the drill's test runs `sluice lab drill` in a terminal and answers from another.
    "tmux",
];

/// The peers Sluice is measured against in `bench e2e` (whose short form the suite runs):
/// installed by setup without starting their services (`setup::peer_load_balancers`).
pub const BENCH_PACKAGES: &[&str] = &["haproxy", "nginx", "libnginx-mod-stream"];

pub const TOOLS: &[Tool] = &[
    Tool { program: "bpftool", package: Some("bpftool"), probe: &["--version"] },
    Tool { program: "ip", package: Some("iproute2"), probe: &["-V"] },
    Tool { program: "ss", package: Some("iproute2"), probe: &["-V"] },
    Tool { program: "ethtool", package: Some("ethtool"), probe: &["--version"] },
    Tool { program: "nsenter", package: Some("util-linux"), probe: &["--version"] },
    Tool { program: "setpriv", package: Some("util-linux"), probe: &["--version"] },
    Tool { program: "mount", package: Some("util-linux"), probe: &["--version"] },
    Tool { program: "sysctl", package: Some("procps"), probe: &["--version"] },
    Tool { program: "ping", package: Some("iputils-ping"), probe: &["-V"] },
    Tool { program: "promtool", package: Some("prometheus"), probe: &["--version"] },
    Tool { program: "prometheus", package: Some("prometheus"), probe: &["--version"] },
    Tool { program: "curl", package: Some("curl"), probe: &["--version"] },
    Tool { program: "amtool", package: Some("prometheus-alertmanager"), probe: &["--version"] },
    // The real Alertmanager: the TLS and basic-auth receiver of the alert webhook tests.
    Tool { program: "prometheus-alertmanager", package: Some("prometheus-alertmanager"), probe: &["--version"] },
    Tool { program: "bird", package: Some("bird2"), probe: &["--version"] },
    // birdc has no --version; -h prints its usage... and exits non-zero, so `bird` stands for both.
    Tool { program: "birdc", package: Some("bird2"), probe: &[] },
    Tool { program: "etcd", package: Some("etcd-server"), probe: &["--version"] },
    Tool { program: "etcdctl", package: Some("etcd-client"), probe: &["version"] },
    Tool { program: "nft", package: Some("nftables"), probe: &["--version"] },
    Tool { program: "groupadd", package: Some("passwd"), probe: &["--help"] },
    Tool { program: "groupdel", package: Some("passwd"), probe: &["--help"] },
    Tool { program: "protoc", package: Some("protobuf-compiler"), probe: &["--version"] },
    Tool { program: "tmux", package: Some("tmux"), probe: &["-V"] },
    Tool { program: "chromium", package: Some("chromium"), probe: &["--version"] },
    Tool { program: "haproxy", package: Some("haproxy"), probe: &["-v"] },
    Tool { program: "nginx", package: Some("nginx"), probe: &["-v"] },
    Tool { program: "dpkg-shlibdeps", package: Some("dpkg-dev"), probe: &["--version"] },
    Tool { program: "strip", package: Some("binutils"), probe: &["--version"] },
    Tool { program: "lintian", package: Some("lintian"), probe: &["--version"] },
    Tool { program: "man", package: Some("man-db"), probe: &["--version"] },
    Tool { program: "systemd-analyze", package: Some("systemd"), probe: &["--version"] },
    Tool { program: "cargo", package: None, probe: &[] },
    Tool { program: "rustup", package: None, probe: &[] },
    Tool { program: "apt-get", package: None, probe: &[] },
    Tool { program: "dpkg-query", package: None, probe: &[] },
    Tool { program: "dpkg-deb", package: None, probe: &[] },
    Tool { program: "id", package: None, probe: &[] },
    // coreutils and dash: every Debian system has them (the cleanup test's stray processes).
    Tool { program: "sh", package: None, probe: &[] },
    Tool { program: "sleep", package: None, probe: &[] },
    Tool { program: "bash", package: None, probe: &[] },
    Tool { program: "gzip", package: None, probe: &[] },
    Tool { program: "md5sum", package: None, probe: &[] },
    Tool { program: "date", package: None, probe: &[] },
];

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, path::Path};

    use super::*;

    /// Every program the workspace starts, read from its sources: `Command::new("x")`,
    /// `command_in(ns, "x")`, `lab.command(ns, "x")` and `ns.output("x", …)`.
    fn started_programs(root: &Path) -> BTreeSet<(String, String)> {
        let mut found = BTreeSet::new();
        let mut stack: Vec<_> = ["lab", "lb-userspace", "tests", "xtask"].iter().map(|d| root.join(d)).collect();
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") && path.file_name().is_some_and(|n| n != "requirements.rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for (pattern, last_arg) in [("Command::new(", false), ("command_in(", true), (".command(", true), (".output(", false)] {
                        for (at, _) in text.match_indices(pattern) {
                            let args = &text[at + pattern.len()..];
                            let Some(end) = args.find(')') else { continue };
                            let args = &args[..end];
                            let arg = if last_arg { args.rsplit(',').next() } else { args.split(',').next() };
                            let arg = arg.unwrap_or_default().trim();
                            // An empty one is a placeholder (`mem::replace(cmd, Command::new(""))`).
                            if let Some(program) = arg.strip_prefix('"').and_then(|a| a.strip_suffix('"')).filter(|p| !p.is_empty()) {
                                found.insert((program.to_string(), path.strip_prefix(root).unwrap().display().to_string()));
                            }
                        }
                    }
                }
            }
        }
        found
    }

    #[test]
    fn every_program_the_workspace_starts_is_installed_by_setup() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let started = started_programs(root);
        // The scan itself must see the programs we know are started, or it proves nothing.
        for known in ["ip", "bird", "etcd", "bpftool", "ping", "nft", "ss"] {
            assert!(started.iter().any(|(p, _)| p == known), "the source scan no longer finds `{known}`: fix the scan");
        }
        let mut missing = Vec::new();
        for (program, file) in &started {
            match TOOLS.iter().find(|t| t.program == program) {
                None => missing.push(format!("{program} (started in {file}) is not in requirements::TOOLS")),
                Some(Tool { package: Some(pkg), .. }) if !PACKAGES.contains(pkg) && !BENCH_PACKAGES.contains(pkg) => {
                    missing.push(format!("{program} (started in {file}) comes from {pkg}, which setup does not install"));
                }
                Some(_) => {}
            }
        }
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }

    #[test]
    fn every_tool_package_is_installed_by_setup() {
        for t in TOOLS {
            if let Some(pkg) = t.package {
                assert!(PACKAGES.contains(&pkg) || BENCH_PACKAGES.contains(&pkg), "{} comes from {pkg}, which no setup step installs", t.program);
            }
        }
    }
}
