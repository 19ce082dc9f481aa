//! `sluice lab drill` (issue 31): every scenario is solved by the scripted responder, which
//! may use only the CLI's `--json` output — so every fault is diagnosable from the operator's
//! tools alone — with the time to the cause, the time to recovery and the commands it used in
//! the JSON, and the markdown drill log written. Run through the real binaries
//! (`sluice lab …` execs `sluice-lab`), as an operator would. And the drill in a terminal
//! (tmux): started in one, answered (wrongly, then rightly) and fixed from another, the score
//! read in the first. The two share the drill's lab: one at a time.

use std::{
    path::PathBuf,
    process::Command,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde_json::Value;
use sluice_tests::{require_root, sluice_bin};

static SERIAL: Mutex<()> = Mutex::new(());

fn sluice(args: &[&str]) -> std::process::Output {
    Command::new(sluice_bin()).args(args).output().expect("running sluice")
}

/// The scenarios `sluice lab drill --list` names.
fn listed() -> Vec<String> {
    let out = sluice(&["lab", "drill", "--list"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_whitespace().next().map(str::to_owned)).collect()
}

fn report_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sluice-drill-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A command the responder ran reads with `--json` (or `--format json`), or is a change an
/// operator makes (a limit, an undrain, a corrected file applied) or the answer itself.
fn honest(command: &str) -> bool {
    // Another node of a cluster: `sluice --socket PATH …`.
    let owned = command.strip_prefix("sluice --socket ").and_then(|r| r.split_once(' ')).map(|(_, rest)| format!("sluice {rest}"));
    let command = owned.as_deref().unwrap_or(command);
    let changes = ["sluice backend set-limit ", "sluice backend undrain ", "sluice node undrain", "sluice config apply ", "sluice lab drill answer ", "$EDITOR "];
    changes.iter().any(|c| command.starts_with(c)) || (command.starts_with("sluice ") && (command.contains(" --json") || command.contains("--format json")))
}

#[test]
fn drill_auto_solves_every_scenario_from_the_cli_json_alone() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let names = listed();
    assert!(names.len() >= 8, "--list shows {} scenarios: {names:?}", names.len());
    assert!(names.iter().any(|n| n == "not-the-load-balancer"), "{names:?}");
    let dir = report_dir("auto");
    let started = Instant::now();
    let out = sluice(&["lab", "drill", "--auto", "--json", "--seed", "1", "--report", &dir.display().to_string()]);
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}\nstderr:\n{stderr}", String::from_utf8_lossy(&out.stdout)));
    println!("{stderr}");
    println!("drill --auto: {} scenarios in {:.0} s", names.len(), elapsed.as_secs_f64());
    let scenarios = report["scenarios"].as_array().expect("scenarios");
    for name in &names {
        let s = scenarios.iter().find(|s| s["scenario"] == name.as_str()).unwrap_or_else(|| panic!("no report for {name}"));
        let what = || serde_json::to_string_pretty(s).unwrap_or_default();
        assert_eq!(s["error"], Value::Null, "{name}: {}", what());
        assert_eq!(s["solved"], true, "{name} not solved:\n{}", what());
        // The right cause, named by the responder.
        let answers = s["answers"].as_array().expect("answers");
        assert!(answers.iter().any(|a| a["right"] == true && a["by"] == "auto" && a["answer"].as_str().is_some_and(|t| t.starts_with(name.as_str()))), "{name}: {}", what());
        for key in ["time_to_cause_s", "time_to_recovery_s"] {
            assert!(s[key].as_f64().is_some_and(|t| t >= 0.0), "{name}: {key} missing: {}", what());
        }
        let commands = s["commands"].as_array().expect("commands");
        assert!(commands.len() >= 3, "{name}: too few commands: {}", what());
        for c in commands {
            let c = c["command"].as_str().expect("command");
            assert!(honest(c), "{name}: the responder ran {c:?}, which is not the CLI's --json output");
        }
        assert!(!s["users_report"].as_str().unwrap_or_default().is_empty() && s["timeline"].as_array().is_some_and(|t| !t.is_empty()), "{name}: {}", what());
    }
    assert!(out.status.success(), "exit {:?}\n{stderr}", out.status);
    let md = std::fs::read_to_string(report["markdown"].as_str().expect("markdown path")).expect("the drill log");
    for name in &names {
        assert!(md.contains(&format!("## {name} ")), "the drill log has no section for {name}:\n{md}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tmux session running a command; on drop it is interrupted (Ctrl-C: the drill removes its
/// lab) and killed.
struct Tmux(String);

impl Tmux {
    fn start(command: &str) -> Self {
        let name = format!("sluice-drill-{}", std::process::id());
        let _ = Command::new("tmux").args(["kill-session", "-t", &name]).output();
        let out = Command::new("tmux").args(["new-session", "-d", "-s", &name, "-x", "200", "-y", "50", command]).output().expect("tmux (cargo xtask setup installs it)");
        assert!(out.status.success(), "tmux new-session: {}", String::from_utf8_lossy(&out.stderr));
        Self(name)
    }

    /// Everything the terminal showed (its history too).
    fn screen(&self) -> String {
        let out = Command::new("tmux").args(["capture-pane", "-p", "-J", "-S", "-", "-t", &self.0]).output().expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_for(&self, text: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let screen = self.screen();
            if screen.contains(text) {
                return screen;
            }
            assert!(Instant::now() < deadline, "the terminal never showed {text:?} within {within:?}:\n{screen}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["send-keys", "-t", &self.0, "C-c", ""]).output();
        std::thread::sleep(Duration::from_secs(3));
        let _ = Command::new("tmux").args(["kill-session", "-t", &self.0]).output();
    }
}

fn answer(args: &[&str]) -> Value {
    let mut all = vec!["lab", "drill", "answer"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = sluice(&all);
    assert!(out.status.success(), "sluice lab drill answer {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("the verdict as JSON")
}

#[test]
fn drill_in_a_terminal_answered_and_fixed_from_another() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = report_dir("tmux");
    let sluice_path = sluice_bin();
    // Seed 1, as in the suite above: the same backend is drained alone as there.
    let term = Tmux::start(&format!("{} lab drill backend-drained --seed 1 --fault-after 3s --report {}; echo DRILL-EXIT=$?; sleep 600", sluice_path.display(), dir.display()));
    // What a trainee reads: how to reach the daemon, then the users' report.
    let screen = term.wait_for("INCIDENT", Duration::from_secs(90));
    let socket = screen.lines().find_map(|l| l.trim().strip_prefix("export SLUICE_SOCKET=")).map(|s| s.split_whitespace().next().unwrap_or_default().to_owned());
    let socket = socket.unwrap_or_else(|| panic!("the drill does not say how to reach its daemon:\n{screen}"));
    assert!(screen.contains("sluice lab drill answer CAUSE"), "{screen}");
    assert!(!screen.contains("drain web"), "the drill gives the fault away:\n{screen}");
    // A wrong answer is counted and the drill goes on.
    let wrong = answer(&["limit-too-low", "--service", "web"]);
    assert_eq!(wrong["right"], false, "{wrong}");
    assert_eq!(wrong["wrong_answers"], 1, "{wrong}");
    // The trainee looks: one backend is draining.
    let out = Command::new(&sluice_path).args(["--socket", &socket, "status", "--json"]).output().expect("sluice status");
    let status: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("sluice status --json: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    let draining: Vec<String> = status["services"][0]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .filter(|b| b["state"] == "draining")
        .map(|b| b["address"].as_str().expect("address").to_owned())
        .collect();
    // Repeatable: seed 1 drains the same backend in the suite and alone (rand's StdRng, pinned
    // by Cargo.lock).
    assert_eq!(draining, ["198.18.0.12"], "{status}");
    let right = answer(&["backend-drained", "--service", "web", "--backend", &draining[0]]);
    assert_eq!(right["right"], true, "{right}");
    term.wait_for("RIGHT", Duration::from_secs(10));
    // The fix, with the ordinary command; the drill ends when users are served again.
    let out = Command::new(&sluice_path).args(["--socket", &socket, "backend", "undrain", "web", &draining[0]]).output().expect("sluice backend undrain");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let screen = term.wait_for("DRILL-EXIT=", Duration::from_mins(1));
    assert!(screen.contains("DRILL-EXIT=0"), "{screen}");
    assert!(screen.contains("users are served again") && screen.contains("SOLVED") && screen.contains("(1 wrong answer(s))"), "{screen}");
    let md = std::fs::read_to_string(dir.join("drill.md")).expect("the drill log");
    assert!(md.contains("## backend-drained") && md.contains("`limit-too-low --service web` (trainee): wrong") && md.contains("time to cause"), "{md}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// docs/RUNBOOK.md links each alert's section to the drill that trains it (or says there is
/// none yet), and every drill it names is one `--list` shows.
#[test]
fn runbook_links_each_alert_to_a_real_drill() {
    let names = listed();
    let runbook = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/RUNBOOK.md")).expect("docs/RUNBOOK.md");
    let sections: Vec<&str> = runbook.split("\n## ").skip(1).collect();
    assert!(sections.len() >= 10, "{} sections", sections.len());
    for section in sections {
        let title = section.lines().next().unwrap_or_default();
        let drill = section.lines().find(|l| l.starts_with("**Drill:**")).unwrap_or_else(|| panic!("section {title} names no drill"));
        for named in drill.split('`').skip(1).step_by(2) {
            // A drill (`sluice lab drill X` or `X`), not a refusal reason (`backend_limit`).
            let scenario = named.strip_prefix("sluice lab drill ").unwrap_or(named);
            if scenario.starts_with("--") || scenario.contains(['_', ' ']) {
                continue;
            }
            assert!(names.iter().any(|n| n == scenario), "section {title}: `{named}` is no scenario of --list {names:?}");
        }
    }
}
