//! The CLI behaves like a Unix tool (issue 30): with a running daemon, every read command piped
//! into `head -1` succeeds under `set -o pipefail` without a panic, also when its reader is
//! gone before it writes a byte (stdout a pipe whose read end is closed: every write fails
//! with EPIPE), and keeps its own exit status; every `--json` output parses whole, with
//! nothing else on stdout — `sluice lab chaos --json` included, whose progress goes to stderr.
//!
//! A closed stdout drops the rest of the output and the command ends with its own status (0
//! here): `lb-userspace/src/cli/out.rs` says why EPIPE is handled rather than SIGPIPE reset,
//! which would exit 141 instead.

use std::{
    os::fd::OwnedFd,
    process::{Command, Output, Stdio},
    time::Instant,
};

use serde_json::Value;
use sluice_tests::{
    l2lab::{Lab, VIP},
    sluice_bin,
};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// No panic, no backtrace, no "Broken pipe" on stderr.
fn assert_quiet(what: &str, stderr: &str) {
    for bad in ["panicked", "Broken pipe", "stack backtrace", "RUST_BACKTRACE"] {
        assert!(!stderr.contains(bad), "{what}: {bad:?} on stderr:\n{stderr}");
    }
}

/// How a command's stdout is read.
#[derive(Clone, Copy, PartialEq)]
enum Out {
    Text,
    /// One JSON document.
    Json,
    /// One JSON document per line (`events --json`).
    JsonLines,
}

struct Cli<'a> {
    lab: &'a Lab,
}

impl Cli<'_> {
    fn cmd(&self, args: &[String]) -> Command {
        let mut c = Command::new(sluice_bin());
        c.arg("--socket").arg(self.lab.socket()).args(args).env("RUST_BACKTRACE", "1");
        c
    }

    /// Runs it plainly: (exit code, stdout, stderr).
    fn plain(&self, args: &[String]) -> Output {
        self.cmd(args).output().expect("sluice")
    }

    /// `bash -c 'set -o pipefail; sluice ARGS | head -1'`: the pipeline's status and its stdout.
    fn head(&self, args: &[String]) -> Output {
        Command::new("bash")
            .args(["-c", "set -o pipefail; \"$SLUICE\" --socket \"$SOCKET\" \"$@\" | head -1", "bash"])
            .args(args)
            .env("SLUICE", sluice_bin())
            .env("SOCKET", self.lab.socket())
            .env("RUST_BACKTRACE", "1")
            .output()
            .expect("bash")
    }

    /// Stdout a pipe whose read end is already closed: the first write fails with EPIPE.
    fn closed(&self, args: &[String]) -> Output {
        let (r, w): (OwnedFd, OwnedFd) = nix::unistd::pipe().expect("pipe");
        drop(r);
        self.cmd(args).stdout(Stdio::from(w)).output().expect("sluice")
    }
}

fn args(s: &[&str]) -> Vec<String> {
    s.iter().map(|&a| a.to_owned()).collect()
}

#[test]
fn read_commands_survive_a_closed_pipe_and_json_is_only_json() {
    let started = Instant::now();
    let lab = Lab::new(1);
    // One backend with room for one connection: a second is refused, so events, alerts and
    // the history have something to show.
    lab.write_config_with(&[(1, "max_conns = 1")], "[alerts]\nname = \"lb-pipes\"\nfire_after = \"0s\"\n");
    let _daemon = lab.start_daemon();
    let (_, held) = lab.connect().expect("the first connection");
    assert!(lab.connect().is_err(), "the second connection is refused (max_conns = 1)");
    sluice_tests::l2lab::wait_for("the refusal event", || lab.ctl(&["events", "--json"]).1.contains("backend_limit"));
    let journal = lab.journal().display().to_string();
    let config = lab.config.display().to_string();
    let explain = ["10.70.0.2:40000".to_owned(), format!("{VIP}:80")];

    // Every read command of `sluice --help` (cluster status needs a [cluster] section in text:
    // its JSON form is here), with its JSON form where it has one.
    let cases: Vec<(Vec<String>, Out)> = vec![
        (args(&["status"]), Out::Text),
        (args(&["status", "--json"]), Out::Json),
        (args(&["service", "list"]), Out::Text),
        (args(&["service", "list", "--json"]), Out::Json),
        (args(&["explain", &explain[0], &explain[1]]), Out::Text),
        (args(&["explain", &explain[0], &explain[1], "--json"]), Out::Json),
        (args(&["top", "--once"]), Out::Text),
        (args(&["events"]), Out::Text),
        (args(&["events", "--json"]), Out::JsonLines),
        (args(&["history", "web"]), Out::Text),
        (args(&["history", "web", "10.70.0.11", "--json"]), Out::Json),
        (args(&["timeline", "--since", "1h", "--journal", &journal]), Out::Text),
        (args(&["timeline", "--since", "1h", "--journal", &journal, "--format", "markdown"]), Out::Text),
        (args(&["timeline", "--since", "1h", "--journal", &journal, "--format", "json"]), Out::Json),
        (args(&["config", "review"]), Out::Text),
        (args(&["config", "review", "--json"]), Out::Json),
        (args(&["config", "check", &config]), Out::Text),
        (args(&["config", "check", &config, "--json"]), Out::Json),
        (args(&["config", "apply", "--dry-run", &config]), Out::Text),
        (args(&["cluster", "status", "--json"]), Out::Json),
        (args(&["completions", "bash"]), Out::Text),
        (args(&["completions", "zsh"]), Out::Text),
        (args(&["completions", "fish"]), Out::Text),
        (args(&["--help"]), Out::Text),
        (args(&["--version"]), Out::Text),
    ];

    let cli = Cli { lab: &lab };
    for (a, kind) in &cases {
        let what = format!("sluice {}", a.join(" "));
        let plain = cli.plain(a);
        let (stdout, stderr) = (text(&plain.stdout), text(&plain.stderr));
        assert_quiet(&what, &stderr);
        let code = plain.status.code().expect("an exit code");
        assert!(code == 0 || (a[0] == "config" && a[1] == "check" && code == 1), "{what}: exit {code}\n{stdout}{stderr}");
        assert!(!stdout.is_empty(), "{what}: no output");
        match kind {
            Out::Json => {
                let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{what}: stdout is not one JSON document ({e}):\n{stdout}"));
                assert!(v.is_object() || v.is_array(), "{what}: {v}");
            }
            Out::JsonLines => {
                for line in stdout.lines() {
                    serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("{what}: a line is not JSON ({e}): {line}"));
                }
            }
            Out::Text => {}
        }

        // Into `head -1`: the pipeline succeeds under pipefail with one line. (Not compared with
        // the plain run's first line: the flow count in some moves between runs.)
        let head = cli.head(a);
        assert_quiet(&format!("{what} | head -1"), &text(&head.stderr));
        assert_eq!(head.status.code(), Some(code), "{what} | head -1 under pipefail: {:?}\n{}", head.status, text(&head.stderr));
        let first = text(&head.stdout);
        assert!(first.ends_with('\n') && first.lines().count() == 1, "{what} | head -1: {first:?}");

        // Its reader gone before it writes: the same status, quietly.
        let closed = cli.closed(a);
        assert_quiet(&format!("{what} >closed pipe"), &text(&closed.stderr));
        assert_eq!(closed.status.code(), Some(code), "{what} into a closed pipe: {:?}\n{}", closed.status, text(&closed.stderr));
    }

    // `events --follow` ends when its reader does, even with nothing new to print.
    let t = Instant::now();
    let follow = cli.closed(&args(&["events", "--follow"]));
    assert_quiet("events --follow >closed pipe", &text(&follow.stderr));
    assert_eq!(follow.status.code(), Some(0), "events --follow into a closed pipe: {}", text(&follow.stderr));
    assert!(t.elapsed().as_secs() < 5, "events --follow went on {:?} after its reader was gone", t.elapsed());

    drop(held);
    println!("{} commands, each plain, into head -1 and into a closed pipe, in {:.1}s", cases.len(), started.elapsed().as_secs_f64());
}

/// `sluice lab chaos --json` (the known offender): stdout is the report alone, as JSON; the
/// progress lines are on stderr. A short run: not the chaos test (tests/tests/chaos.rs), only
/// where its lines go.
#[test]
fn lab_chaos_json_prints_only_json() {
    sluice_tests::require_root();
    let started = Instant::now();
    // Under the harness's names (`slc-<pid>-…`: swept if this test is killed), not the lab's
    // own, which a lab someone runs on this machine may hold.
    let prefix = format!("slc-{}-chaos", std::process::id());
    let dir = std::env::temp_dir().join(format!("sluice-lab-test-{}-chaos", std::process::id()));
    let out = Command::new(sluice_bin())
        .args(["lab", "chaos", "--duration", "8s", "--rate", "30", "--json"])
        .env("SLUICE_LAB_PREFIX", &prefix)
        .env("SLUICE_LAB_DIR", &dir)
        .output()
        .expect("sluice lab chaos");
    let left: Vec<String> =
        std::fs::read_dir("/run/netns").into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(&prefix)).collect();
    assert!(left.is_empty() && !dir.exists(), "the lab left namespaces {left:?} or {}", dir.display());
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_quiet("sluice lab chaos --json", &stderr);
    let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("sluice lab chaos --json: stdout is not one JSON document ({e}):\n{stdout}\nstderr:\n{stderr}"));
    assert!(v.get("checks").is_some_and(Value::is_array), "the report's checks: {v}");
    assert!(stderr.contains("held connections open"), "the progress lines go to stderr:\n{stderr}");
    // The exit status is the report's verdict.
    let passed = v["checks"].as_array().expect("checks").iter().all(|c| c["ok"] == true);
    assert_eq!(out.status.success(), passed, "exit {:?} for a report that {}:\n{stdout}", out.status, if passed { "passed" } else { "failed" });
    println!("sluice lab chaos --duration 8s --json: {:.1}s, passed: {passed}", started.elapsed().as_secs_f64());
}
