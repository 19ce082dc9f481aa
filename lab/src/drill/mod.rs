//! `sluice lab drill`: the postmortem's last lesson ("train people") as a command. A lab under
//! real load, one fault injected without saying which, and only what users would report ("users
//! of web see 14 % of requests fail since 14:02:05; the database team says their side is
//! fine"). The trainee works in another terminal with the ordinary tools (`sluice status`,
//! `top`, `events`, `explain`, `timeline`, `history`, `config review`, `/metrics`), names the
//! cause with `sluice lab drill answer CAUSE …` (a wrong answer is counted and the drill goes
//! on), fixes it with the ordinary commands, and the drill ends when users are served again.
//! Then the score: time to the right cause, time to recovery, wrong answers, the commands that
//! find it fastest, the timeline — as text, and as a markdown drill log a team can keep.
//!
//! `--auto` runs the scripted responder (`responder.rs`) instead of a trainee: it may use only
//! the CLI's `--json` output, so every scenario it solves is diagnosable from the operator's
//! tools alone. Without a scenario, `--auto` runs every one in one lab (a fresh daemon each).
//!
//! - `scenario.rs`: the scenarios, their faults and what the drill heals itself;
//! - `users.rs`: the users (`load.rs` without end) and what they see;
//! - `answer.rs`: the answer socket; `responder.rs`: the scripted responder.

pub mod answer;
pub mod cluster;
pub mod responder;
pub mod scenario;
pub mod users;

use std::{
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use lb_userspace::{config::Mode, journal::Entry, Error};
use rand::{rngs::StdRng, Rng as _, SeedableRng as _};
use serde::Serialize;

use self::{
    answer::{Answer, Cause, Reply},
    responder::{Node, Reach, Used, UserReport},
    scenario::{Fault, Running, Scenario, SCENARIOS},
    users::{Users, Window},
};
use crate::{Lab, Spec};

/// The drill's lab: its run directory (config, journal, control socket, the answer socket)
/// and its namespaces' prefix.
pub const DIR: &str = "/run/sluice-lab-drill";
pub const PREFIX: &str = "slabd";
/// How long the users' failures must last to be reported, and how long they must be served
/// to count as served again.
const REPORT_OVER: Duration = Duration::from_millis(1500);
const SERVED_OVER: Duration = Duration::from_secs(2);
/// A fault that users do not notice within this is a broken scenario.
const SYMPTOM_WITHIN: Duration = Duration::from_secs(30);

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    pub cmd: Option<DrillCmd>,
    /// The scenario (`--list`); by default one drawn by the seed, or with `--auto` every one.
    pub scenario: Option<String>,
    /// List the scenarios, one line each.
    #[arg(long)]
    pub list: bool,
    /// Makes a drill repeatable: which scenario, when the fault hits, which backend. By default
    /// drawn from the clock (and printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// The scripted responder instead of a trainee (it uses only the CLI's --json output).
    #[arg(long)]
    pub auto: bool,
    /// Print the report as JSON on stdout (the progress goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Where the markdown drill log goes.
    #[arg(long, default_value = "sluice-lab-drill-report")]
    pub report: PathBuf,
    /// When the fault hits after the users start (by default drawn by the seed, 10–40 s; with
    /// --auto 3 s, once their open connections are steady).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub fault_after: Option<Duration>,
    /// Give up this long after the users' report (the score says unsolved); by default 15m,
    /// with --auto 1m.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub time_limit: Option<Duration>,
}

#[derive(clap::Subcommand, Debug)]
pub enum DrillCmd {
    /// Name the cause of the running drill's incident (from another terminal); a wrong answer
    /// is counted and the drill goes on.
    Answer {
        #[arg(value_enum)]
        cause: Cause,
        #[arg(long)]
        service: Option<String>,
        #[arg(long)]
        backend: Option<IpAddr>,
        #[arg(long)]
        node: Option<String>,
        /// Print the drill's verdict as JSON.
        #[arg(long)]
        json: bool,
    },
}

impl Args {
    /// Whether this invocation builds a lab (not `--list`, not `answer`).
    pub fn builds_lab(&self) -> bool {
        self.cmd.is_none() && !self.list
    }
}

/// A line of the drill's timeline.
#[derive(Clone, Debug, Serialize)]
pub struct Line {
    /// Seconds from the users' report (negative before it).
    pub t_s: f64,
    pub what: String,
}

/// An answer given.
#[derive(Clone, Debug, Serialize)]
pub struct AnswerLog {
    /// Seconds from the users' report.
    pub t_s: f64,
    pub answer: String,
    pub by: String,
    pub right: bool,
}

/// What the users saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UsersSeen {
    /// The two seconds before the fault.
    pub before: Window,
    /// From the report to their recovery (or the end).
    pub during: Window,
    /// Second by second from the fault: (seconds from the report, connections, failed).
    pub per_second: Vec<(f64, u64, u64)>,
}

/// One scenario's score.
#[derive(Clone, Debug, Serialize)]
pub struct ScenarioReport {
    pub scenario: &'static str,
    /// The run's seed: `sluice lab drill SCENARIO --seed SEED` repeats it.
    pub seed: u64,
    /// The right answer.
    pub cause: Cause,
    pub fault: Option<Fault>,
    pub users_report: Option<String>,
    /// Wall-clock time of the report (RFC 3339).
    pub reported_at: Option<String>,
    /// The right cause named, and users served again.
    pub solved: bool,
    pub cause_named: bool,
    pub recovered: bool,
    /// From the users' report to the right answer.
    pub time_to_cause_s: Option<f64>,
    /// From the users' report to users served again.
    pub time_to_recovery_s: Option<f64>,
    pub wrong_answers: u32,
    pub answers: Vec<AnswerLog>,
    /// The commands the responder used (`--auto`; a trainee's are their own).
    pub commands: Vec<Used>,
    pub responder: Option<String>,
    pub diagnosis: Option<String>,
    pub fix: Option<String>,
    /// What the drill did itself once the cause was named (not the load balancer's to fix).
    pub healed_by_drill: Option<String>,
    /// The commands that find it fastest.
    pub fastest: Vec<&'static str>,
    pub users: UsersSeen,
    pub timeline: Vec<Line>,
    /// The daemon's journal over the scenario (`sluice timeline`).
    pub daemon_timeline: Vec<Entry>,
    pub error: Option<String>,
}

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct DrillReport {
    pub seed: u64,
    pub auto: bool,
    pub solved: usize,
    pub scenarios: Vec<ScenarioReport>,
    pub elapsed_s: f64,
    /// The markdown drill log.
    pub markdown: PathBuf,
}

/// The scenario under way, as the answer socket judges it.
struct Current {
    scenario: &'static Scenario,
    /// The backend / node the fault is about (an answer naming another is wrong).
    backend: Option<IpAddr>,
    node: Option<String>,
    reported: Option<Instant>,
    right: Option<Instant>,
    wrong: u32,
    answers: Vec<AnswerLog>,
}

/// The drill's narrative: printed as it happens (stdout, or stderr with --json) and kept for
/// the report.
struct Narrator {
    json: bool,
    lines: Mutex<Vec<(Instant, String)>>,
}

fn clock() -> String {
    let t = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    t.get(11..19).unwrap_or(&t).to_owned()
}

impl Narrator {
    fn print(&self, text: &str) {
        if self.json {
            eprintln!("{text}");
        } else {
            // A reader that went away does not end the drill, which still has a lab to remove.
            let _ = lb_userspace::cli::out::try_write(format_args!("{text}"), true);
        }
    }
    /// Printed and kept.
    fn say(&self, text: impl AsRef<str>) {
        self.print(&format!("[{}] {}", clock(), text.as_ref()));
        self.keep(text);
    }
    /// Kept only (revealed with the score).
    fn keep(&self, text: impl AsRef<str>) {
        self.lines.lock().expect("lines").push((Instant::now(), text.as_ref().to_owned()));
    }
}

fn spec() -> Spec {
    Spec { prefix: PREFIX.into(), backends: scenario::BACKENDS, clients: 2, mode: Mode::L2dsr, servers: true, dir: DIR.into(), sluice: crate::sluice_bin() }
}

/// `sluice lab drill …`.
pub fn run(a: &Args) -> Result<(), Error> {
    let err = |e: anyhow::Error| Error::other("sluice lab drill", e);
    if let Some(DrillCmd::Answer { cause, service, backend, node, json }) = &a.cmd {
        let reply = answer::send(Path::new(DIR), &Answer { cause: *cause, service: service.clone(), backend: *backend, node: node.clone(), by: "trainee".into() }).map_err(err)?;
        if *json {
            lb_userspace::outln!("{}", serde_json::to_string_pretty(&reply).expect("json"));
        } else {
            lb_userspace::outln!("{}", reply.message);
        }
        return Ok(());
    }
    if a.list {
        for s in SCENARIOS {
            lb_userspace::outln!("{:<22} {}", s.name(), s.about);
        }
        return Ok(());
    }
    let seed = a.seed.unwrap_or_else(|| SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(1, |d| d.as_secs() % 100_000));
    let chosen: Vec<&'static Scenario> = match &a.scenario {
        Some(name) => {
            vec![scenario::find(name).ok_or_else(|| err(anyhow::anyhow!("no scenario {name:?}: one of {}", SCENARIOS.iter().map(Scenario::name).collect::<Vec<_>>().join(", "))))?]
        }
        None if a.auto => SCENARIOS.iter().collect(),
        None => vec![&SCENARIOS[StdRng::seed_from_u64(seed).random_range(0..SCENARIOS.len())]],
    };
    let report = drill(a, seed, &chosen).map_err(err)?;
    if a.json {
        lb_userspace::outln!("{}", serde_json::to_string_pretty(&report).expect("json"));
    } else {
        let _ = lb_userspace::cli::out::try_write(format_args!("{}", text(&report)), false);
    }
    if a.auto && report.solved < report.scenarios.len() {
        return Err(Error::other(
            "sluice lab drill --auto",
            anyhow::anyhow!("{} of {} scenarios unsolved (see the report)", report.scenarios.len() - report.solved, report.scenarios.len()),
        ));
    }
    Ok(())
}

/// The seed of scenario `s` in a run seeded `seed`: the same alone or in the suite.
fn scenario_seed(seed: u64, s: &Scenario) -> u64 {
    let i = SCENARIOS.iter().position(|x| x.cause == s.cause).unwrap_or(0) as u64;
    seed.wrapping_mul(1_000_003).wrapping_add(i)
}

fn drill(a: &Args, seed: u64, chosen: &[&'static Scenario]) -> Result<DrillReport> {
    let started = Instant::now();
    let out = Arc::new(Narrator { json: a.json, lines: Mutex::new(Vec::new()) });
    let current: Arc<Mutex<Option<Current>>> = Arc::default();
    let mut scenarios = Vec::new();
    // The single node's scenarios in one lab, then the cluster's in another.
    for cluster in [false, true] {
        let these: Vec<&'static Scenario> = chosen.iter().copied().filter(|s| s.cluster == cluster).collect();
        if these.is_empty() {
            continue;
        }
        out.print(&format!(
            "Sluice drill, seed {seed}: building the lab ({} backends, 2 clients{})…",
            scenario::BACKENDS,
            if cluster { format!(", {} nodes behind a router's ECMP", cluster::NODES) } else { String::new() }
        ));
        let lab = Lab::up(spec())?;
        {
            let (current, out) = (current.clone(), out.clone());
            answer::serve(&lab.spec.dir, move |a| judge(&current, &out, &a))?;
        }
        let nodes = if cluster {
            cluster::build(&lab)?;
            (1..=cluster::NODES).map(|k| Node { name: format!("n{k}"), socket: cluster::socket(&lab, k), journal: cluster::journal(&lab, k) }).collect()
        } else {
            vec![Node { name: "lab-lb".into(), socket: lab.socket(), journal: lab.journal() }]
        };
        let reach = Reach { sluice: lab.spec.sluice.clone(), nodes, drill_dir: lab.spec.dir.clone() };
        if !a.auto {
            banner(&out, &reach, &lab);
        }
        for s in these {
            out.lines.lock().expect("lines").clear();
            let r = scenario_run(&lab, s, seed, a, &reach, &current, &out);
            *current.lock().expect("current") = None;
            scenarios.push(r);
        }
        lab.down();
    }
    let solved = scenarios.iter().filter(|s| s.solved).count();
    let mut report = DrillReport { seed, auto: a.auto, solved, scenarios, elapsed_s: started.elapsed().as_secs_f64(), markdown: a.report.join("drill.md") };
    std::fs::create_dir_all(&a.report).with_context(|| format!("creating {}", a.report.display()))?;
    std::fs::write(&report.markdown, markdown(&report)).with_context(|| format!("writing {}", report.markdown.display()))?;
    report.markdown = std::fs::canonicalize(&report.markdown).unwrap_or(report.markdown);
    Ok(report)
}

fn banner(out: &Narrator, reach: &Reach, lab: &Lab) {
    let causes: Vec<&str> = <Cause as clap::ValueEnum>::value_variants().iter().map(|c| c.name()).collect();
    let first = &reach.nodes[0];
    let mut others = String::new();
    for n in &reach.nodes[1..] {
        others.push_str(&format!(
            "\x20 node {}: sluice --socket {} …   (journal {}, config {})\n",
            n.name,
            n.socket.display(),
            n.journal.display(),
            n.socket.with_file_name("sluice.toml").display()
        ));
    }
    let who = if reach.nodes.len() > 1 {
        format!("the load balancer cluster (nodes {})", reach.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", "))
    } else {
        format!("the load balancer \"{}\"", first.name)
    };
    out.print(&format!(
        "\nYou are on call for {who}. Users reach service \"web\" at {}:80 through it.\n\
         Work in another terminal, with the ordinary tools:\n\
         \x20 export SLUICE_SOCKET={}\n\
         \x20 sluice status | top | events | explain CLIENT {}:80 | history web | config review\n\
         \x20 sluice timeline --journal {}\n\
         \x20 config file {}   (sluice config apply FILE)\n\
         {others}\
         \x20 /metrics and the status page: nsenter --net=/run/netns/{} curl -s http://127.0.0.1:9477/metrics\n\
         When you know the cause:\n\
         \x20 sluice lab drill answer CAUSE [--service S] [--backend ADDR] [--node N]\n\
         \x20 causes: {}\n\
         Then fix it; the drill ends when users are served again. Ctrl-C gives up (and removes the lab).\n",
        crate::VIP4,
        first.socket.display(),
        crate::VIP4,
        first.journal.display(),
        first.socket.with_file_name("sluice.toml").display(),
        lab.ns("lb"),
        causes.join(", ")
    ));
}

fn judge(current: &Mutex<Option<Current>>, out: &Narrator, a: &Answer) -> Reply {
    let mut cur = current.lock().expect("current");
    let Some(c) = cur.as_mut().filter(|c| c.reported.is_some()) else {
        return Reply { right: false, message: "no incident has been reported yet: wait for the users' report (nothing counted)".into(), wrong_answers: 0 };
    };
    if c.right.is_some() {
        return Reply { right: true, message: format!("already named: {}. Now get the users served again.", c.scenario.cause), wrong_answers: c.wrong };
    }
    let t_s = c.reported.map_or(0.0, |r| r.elapsed().as_secs_f64());
    let backend_ok = a.backend.is_none_or(|b| c.backend == Some(b)) && a.node.as_ref().is_none_or(|n| c.node.as_ref() == Some(n));
    let service_ok = a.service.as_deref().is_none_or(|s| s == "web");
    let right = a.cause == c.scenario.cause && backend_ok && service_ok;
    c.answers.push(AnswerLog { t_s, answer: a.line(), by: a.by.clone(), right });
    let message = if right {
        c.right = Some(Instant::now());
        match c.scenario.healed_by {
            Some(who) => format!("right: {}. Not the load balancer's to fix: {who} now. Watch the users recover.", c.scenario.cause),
            None => format!("right: {}. Now fix it with the ordinary commands; the drill ends when users are served again.", c.scenario.cause),
        }
    } else {
        c.wrong += 1;
        let why = if a.cause == c.scenario.cause { " (the right kind of cause, but not that backend, node or service)" } else { "" };
        format!("not that{why}: {} wrong answer(s) so far; keep looking", c.wrong)
    };
    out.say(format!("answer ({}): {} — {}", if a.by.is_empty() { "trainee" } else { &a.by }, a.line(), if right { "RIGHT" } else { "wrong" }));
    Reply { right, message, wrong_answers: c.wrong }
}

/// Stops the users and the fault's threads however the scenario's scope is left (or the
/// scope would wait for them for ever).
struct StopUsers<'a>(&'a Users, &'a Running);
impl Drop for StopUsers<'_> {
    fn drop(&mut self) {
        self.0.stop();
        self.1.off();
    }
}

/// A fresh daemon on the baseline config: the previous one's datapath detached (a fresh flow
/// table and counters), its journal and load history gone.
fn fresh_daemon(lab: &Lab) -> Result<()> {
    lab.stop_daemon();
    let _ = crate::netns::run(lab.command("lb", &lab.spec.sluice).arg("detach").arg("--pin-dir").arg(lab.pin_dir()));
    for f in [lab.journal(), lab.spec.dir.join("history.bin")] {
        let _ = std::fs::remove_file(f);
    }
    lab.write_config(&scenario::baseline(lab))?;
    lab.start_daemon()
}

#[expect(clippy::too_many_lines, reason = "a drill, top to bottom")]
fn scenario_run(lab: &Lab, sc: &'static Scenario, seed: u64, a: &Args, reach: &Reach, current: &Mutex<Option<Current>>, out: &Narrator) -> ScenarioReport {
    let mut r = ScenarioReport {
        scenario: sc.name(),
        seed,
        cause: sc.cause,
        fault: None,
        users_report: None,
        reported_at: None,
        solved: false,
        cause_named: false,
        recovered: false,
        time_to_cause_s: None,
        time_to_recovery_s: None,
        wrong_answers: 0,
        answers: Vec::new(),
        commands: Vec::new(),
        responder: None,
        diagnosis: None,
        fix: None,
        healed_by_drill: None,
        fastest: sc.fastest.to_vec(),
        users: UsersSeen::default(),
        timeline: Vec::new(),
        daemon_timeline: Vec::new(),
        error: None,
    };
    let mut rng = StdRng::seed_from_u64(scenario_seed(seed, sc));
    let fault_after = a.fault_after.unwrap_or_else(|| if a.auto { users::HOLD } else { Duration::from_secs(rng.random_range(10..=40)) });
    if a.auto {
        out.print(&format!("\n== scenario {} (seed {seed})", sc.name()));
    }
    let time_limit = a.time_limit.unwrap_or(if a.auto { Duration::from_mins(1) } else { Duration::from_mins(15) });
    let started = SystemTime::now();
    let running = Running::default();
    let users = Users::new();
    let mut reported: Option<Instant> = None;
    let result = std::thread::scope(|s| -> Result<()> {
        let _stop = StopUsers(&users, &running);
        if !sc.cluster {
            fresh_daemon(lab)?;
        }
        users.start(s, lab);
        out.say(format!("users start: {:.0} new connections/s to service \"web\", each held {} s", users::RATE, users::HOLD.as_secs()));
        std::thread::sleep(fault_after);
        let t_fault = users.now();
        r.users.before = users.window(t_fault - 2.0, t_fault);
        *current.lock().expect("current") = Some(Current { scenario: sc, backend: None, node: None, reported: None, right: None, wrong: 0, answers: Vec::new() });
        let fault = sc.inject(s, lab, &running, &mut rng)?;
        out.keep(format!("FAULT: {}", fault.what));
        if let Some(c) = current.lock().expect("current").as_mut() {
            c.backend = fault.backend;
            c.node.clone_from(&fault.node);
        }
        r.fault = Some(fault.clone());
        // What the users notice.
        let deadline = Instant::now() + SYMPTOM_WITHIN;
        let seen = loop {
            if let Some(w) = users.failing(REPORT_OVER, 5.0) {
                break w;
            }
            anyhow::ensure!(Instant::now() < deadline, "users noticed nothing within {SYMPTOM_WITHIN:?} of the fault");
            std::thread::sleep(Duration::from_millis(100));
        };
        let since_t = users.first_failure_after(t_fault).unwrap_or(t_fault);
        // Users tell after a while: what failed since it started, a moment more of it.
        std::thread::sleep(Duration::from_millis(500));
        let seen = users.window(since_t, users.now()).max_failed(seen);
        let since = SystemTime::now() - Duration::from_secs_f64((users.now() - since_t).max(0.0));
        let how = if seen.timeout * 2 > seen.failed() {
            format!("hang and time out after {:.1} s", users::TIMEOUT.as_secs_f64())
        } else if seen.refused * 2 > seen.failed() {
            "fail at once (connection refused)".to_owned()
        } else {
            "fail".to_owned()
        };
        let others =
            ["the database team says their side is fine", "the application team asks whether it is the network", "the backends' team sees nothing unusual on their dashboards"];
        let since_clock = humantime::format_rfc3339_seconds(since).to_string();
        let text = format!(
            "users of \"web\" report: {:.0} % of requests {how} since {} UTC; {}.",
            seen.failed_pct(),
            since_clock.get(11..19).unwrap_or(&since_clock),
            others[rng.random_range(0..others.len())]
        );
        out.say(format!("INCIDENT — {text}"));
        let now = Instant::now();
        reported = Some(now);
        r.users_report = Some(text.clone());
        r.reported_at = Some(humantime::format_rfc3339_millis(SystemTime::now()).to_string());
        current.lock().expect("current").as_mut().expect("current").reported = Some(now);
        let t_report = users.now();
        let responder = a.auto.then(|| {
            let report = UserReport { service: "web".into(), since, text };
            s.spawn(move || responder::respond(reach, &report))
        });
        // Watch the users until they are served again.
        let mut healed = false;
        loop {
            let right = current.lock().expect("current").as_ref().and_then(|c| c.right);
            if let (Some(_), Some(who), false) = (right, sc.healed_by, healed) {
                healed = true;
                out.say(format!("the cause is named: {who}"));
                sc.heal(lab, &running, &fault)?;
                r.healed_by_drill = Some(who.to_owned());
            }
            if let Some(at) = users.served(SERVED_OVER).filter(|at| *at >= t_report) {
                r.recovered = true;
                r.time_to_recovery_s = Some(at - t_report);
                let since = SystemTime::now() - Duration::from_secs_f64((users.now() - at).max(0.0));
                let since = humantime::format_rfc3339_seconds(since).to_string();
                out.say(format!("users are served again (since {} UTC)", since.get(11..19).unwrap_or(&since)));
                break;
            }
            if now.elapsed() > time_limit {
                out.say(format!("time is up ({}): the drill ends unsolved", humantime::format_duration(time_limit)));
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        r.users.during = users.window(t_report, users.now());
        let mut t = t_fault;
        while t < users.now() {
            let w = users.window(t, t + 1.0);
            r.users.per_second.push((((t - t_report) * 10.0).round() / 10.0, w.total(), w.failed()));
            t += 1.0;
        }
        users.stop();
        if let Some(h) = responder {
            let o = h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            r.commands = o.commands;
            r.diagnosis = Some(o.diagnosis);
            r.fix = o.fix;
            r.responder = o.error.map(|e| format!("the responder failed: {e}"));
        }
        if !healed {
            sc.heal(lab, &running, &fault)?;
        }
        Ok(())
    });
    if let Err(e) = result {
        out.say(format!("the drill failed: {e:#}"));
        r.error = Some(format!("{e:#}"));
        running_off(lab, sc, &running, r.fault.as_ref());
    }
    if let Some(c) = current.lock().expect("current").take() {
        r.answers = c.answers;
        r.wrong_answers = c.wrong;
        r.cause_named = c.right.is_some();
        r.time_to_cause_s = c.right.zip(c.reported).map(|(a, b)| a.duration_since(b).as_secs_f64());
    }
    r.solved = r.cause_named && r.recovered && r.error.is_none();
    let base = reported.unwrap_or_else(Instant::now);
    r.timeline = out.lines.lock().expect("lines").iter().map(|(t, what)| Line { t_s: signed_secs(*t, base), what: what.clone() }).collect();
    let window = SystemTime::now().duration_since(started).unwrap_or_default() + Duration::from_secs(5);
    r.daemon_timeline = reach.nodes.iter().flat_map(|n| lb_userspace::journal::read(&n.journal, window).unwrap_or_default()).collect();
    r.daemon_timeline.sort_by(|a, b| a.time.cmp(&b.time));
    out.print(&score(&r));
    r
}

/// Turns off what a failed scenario left running.
fn running_off(lab: &Lab, sc: &Scenario, running: &Running, fault: Option<&Fault>) {
    if let Some(f) = fault {
        let _ = sc.heal(lab, running, f);
    }
}

fn signed_secs(t: Instant, base: Instant) -> f64 {
    if t >= base {
        t.duration_since(base).as_secs_f64()
    } else {
        -base.duration_since(t).as_secs_f64()
    }
}

fn secs(v: Option<f64>) -> String {
    v.map_or_else(|| "—".to_owned(), |s| format!("{s:.1} s"))
}

/// One scenario's score as text.
fn score(r: &ScenarioReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\nDrill \"{}\" (seed {}): {}", r.scenario, r.seed, if r.solved { "SOLVED" } else { "NOT SOLVED" });
    let _ = writeln!(s, "  the fault        {}", r.fault.as_ref().map_or("(none injected)", |f| &f.what));
    let _ = writeln!(s, "  users reported   {}", r.users_report.as_deref().unwrap_or("—"));
    let _ = writeln!(s, "  right cause      {} after {} ({} wrong answer(s))", r.cause, secs(r.time_to_cause_s), r.wrong_answers);
    let _ = writeln!(s, "  served again     after {}", secs(r.time_to_recovery_s));
    if let Some(h) = &r.healed_by_drill {
        let _ = writeln!(s, "  healed by drill  {h}");
    }
    if let Some(d) = &r.diagnosis {
        let _ = writeln!(s, "  diagnosis        {d}");
    }
    if let Some(f) = &r.fix {
        let _ = writeln!(s, "  fix              {f}");
    }
    if !r.commands.is_empty() {
        let _ = writeln!(s, "  commands used    {}", r.commands.iter().map(|c| c.command.as_str()).collect::<Vec<_>>().join("; "));
    }
    let _ = writeln!(s, "  fastest          {}", r.fastest.join("; "));
    if let Some(e) = r.error.as_ref().or(r.responder.as_ref()) {
        let _ = writeln!(s, "  error            {e}");
    }
    s
}

fn text(report: &DrillReport) -> String {
    let mut s = format!("\n{} of {} scenario(s) solved (seed {}). Drill log: {}\n", report.solved, report.scenarios.len(), report.seed, report.markdown.display());
    if report.scenarios.len() > 1 {
        for r in &report.scenarios {
            let _ = writeln!(
                s,
                "  {:<22} {:<10} cause after {:<8} served after {:<8} {} wrong",
                r.scenario,
                if r.solved { "solved" } else { "NOT SOLVED" },
                secs(r.time_to_cause_s),
                secs(r.time_to_recovery_s),
                r.wrong_answers
            );
        }
    }
    s
}

/// The drill log: a team keeps it.
pub fn markdown(report: &DrillReport) -> String {
    let mut s = String::new();
    let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let _ = writeln!(s, "# Sluice drill log — {date}\n");
    let _ = writeln!(
        s,
        "Seed {} ({}): {} of {} scenario(s) solved. Repeat it with `sluice lab drill{} --seed {}`.\n",
        report.seed,
        if report.auto { "scripted responder" } else { "trainee" },
        report.solved,
        report.scenarios.len(),
        if report.auto { " --auto" } else { "" },
        report.seed
    );
    let _ = writeln!(s, "| scenario | solved | time to cause | time to recovery | wrong answers |\n|---|---|---|---|---|");
    for r in &report.scenarios {
        let _ =
            writeln!(s, "| {} | {} | {} | {} | {} |", r.scenario, if r.solved { "yes" } else { "**no**" }, secs(r.time_to_cause_s), secs(r.time_to_recovery_s), r.wrong_answers);
    }
    for r in &report.scenarios {
        let _ = writeln!(s, "\n## {} (repeat: `sluice lab drill {} --seed {}`)\n", r.scenario, r.scenario, r.seed);
        let _ = writeln!(s, "- **Users reported:** {}", r.users_report.as_deref().unwrap_or("—"));
        let _ = writeln!(s, "- **The fault:** {}", r.fault.as_ref().map_or("(none injected)", |f| &f.what));
        let _ = writeln!(s, "- **Right cause:** `{}`, named after {} with {} wrong answer(s)", r.cause, secs(r.time_to_cause_s), r.wrong_answers);
        let _ = writeln!(s, "- **Users served again:** after {}", secs(r.time_to_recovery_s));
        if let Some(h) = &r.healed_by_drill {
            let _ = writeln!(s, "- **Not the load balancer's to fix:** {h} (done by the drill once the cause was named)");
        }
        if let Some(d) = &r.diagnosis {
            let _ = writeln!(s, "- **Diagnosis:** {d}");
        }
        if let Some(f) = &r.fix {
            let _ = writeln!(s, "- **Fix:** {f}");
        }
        if let Some(e) = r.error.as_ref().or(r.responder.as_ref()) {
            let _ = writeln!(s, "- **Error:** {e}");
        }
        let _ = writeln!(
            s,
            "- **Users:** {:.1} % failed before the fault, {:.1} % from the report to recovery ({} connections)",
            r.users.before.failed_pct(),
            r.users.during.failed_pct(),
            r.users.during.total()
        );
        let _ = writeln!(s, "- **What finds it fastest:** {}", r.fastest.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", "));
        if !r.answers.is_empty() {
            let _ = writeln!(s, "\nAnswers:\n");
            for a in &r.answers {
                let _ = writeln!(s, "- {:+.1} s `{}` ({}): {}", a.t_s, a.answer, a.by, if a.right { "right" } else { "wrong" });
            }
        }
        if !r.commands.is_empty() {
            let _ = writeln!(s, "\nCommands used:\n");
            for c in &r.commands {
                let _ = writeln!(s, "- {:+.1} s `{}` — {}", c.t_s, c.command, c.why);
            }
        }
        let _ = writeln!(s, "\nTimeline (seconds from the users' report):\n");
        for l in &r.timeline {
            let _ = writeln!(s, "- {:+.1} s {}", l.t_s, l.what);
        }
        if !r.daemon_timeline.is_empty() {
            let _ = writeln!(s, "\nThe load balancer's timeline (`sluice timeline`):\n");
            let md = lb_userspace::journal::markdown(&r.daemon_timeline);
            // Its own heading would break this log's structure.
            s.push_str(md.strip_prefix("## Timeline\n").unwrap_or(&md).trim_start_matches('\n'));
        }
        if !r.users.per_second.is_empty() {
            let _ = writeln!(s, "\nThe users, second by second (from the users' report):\n\n| t | connections | failed |\n|---|---|---|");
            for (t, n, f) in &r.users.per_second {
                let _ = writeln!(s, "| {t:+.1} s | {n} | {f} |");
            }
        }
    }
    s
}
