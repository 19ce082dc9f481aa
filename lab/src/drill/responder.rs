//! The scripted responder of `sluice lab drill --auto`: an on-call engineer who knows the
//! runbook and uses only what a trainee has — the users' report, the `sluice` commands' `--json`
//! output (status, events, timeline, config review), the config file the daemon names, and
//! `sluice lab drill answer`. It knows nothing of the lab or the fault injected: every scenario
//! it solves is diagnosable from the operator's tools alone. Everything it ran is recorded.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context as _, Result};
use lb_userspace::{
    api::{BackendReport, Review, ServiceReport, StatusReport},
    events::Event,
    journal::Entry,
};
use serde::Serialize;

use super::answer::{self, Answer, Cause};

/// How to reach the load balancer, as the drill prints it for a trainee.
#[derive(Clone, Debug)]
pub struct Reach {
    /// The `sluice` binary.
    pub sluice: PathBuf,
    /// Its nodes (one, or a cluster's).
    pub nodes: Vec<Node>,
    /// The drill's run directory (where `sluice lab drill answer` finds it).
    pub drill_dir: PathBuf,
}

/// One load balancer node.
#[derive(Clone, Debug)]
pub struct Node {
    /// Its `cluster.node` name (`lab-lb` alone).
    pub name: String,
    pub socket: PathBuf,
    /// The daemon's journal (`sluice timeline --journal`).
    pub journal: PathBuf,
}

/// What the users reported.
#[derive(Clone, Debug)]
pub struct UserReport {
    pub service: String,
    /// Since when they fail.
    pub since: SystemTime,
    pub text: String,
}

/// A command the responder ran, as typed with `SLUICE_SOCKET` exported.
#[derive(Clone, Debug, Serialize)]
pub struct Used {
    /// Seconds since the users' report.
    pub t_s: f64,
    pub command: String,
    pub why: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Outcome {
    /// What it concluded, in a sentence.
    pub diagnosis: String,
    pub commands: Vec<Used>,
    /// Its fix, if the load balancer's.
    pub fix: Option<String>,
    pub error: Option<String>,
}

struct Ctx<'a> {
    reach: &'a Reach,
    /// The node the commands go to (`SLUICE_SOCKET` is the first's; others get `--socket`).
    node: usize,
    t0: Instant,
    used: Vec<Used>,
}

impl Ctx<'_> {
    fn note(&mut self, command: String, why: &str) {
        self.used.push(Used { t_s: self.t0.elapsed().as_secs_f64(), command, why: why.to_owned() });
    }

    /// `sluice ARGS…` (on the drill's socket); its stdout.
    fn sluice(&mut self, args: &[&str], why: &str) -> Result<String> {
        let node = &self.reach.nodes[self.node];
        let socket = if self.node == 0 { String::new() } else { format!("--socket {} ", node.socket.display()) };
        self.note(format!("sluice {socket}{}", args.join(" ")), why);
        let out = Command::new(&self.reach.sluice).arg("--socket").arg(&node.socket).args(args).output().context("running sluice")?;
        if !out.status.success() {
            bail!("sluice {}: {}{}", args.join(" "), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn status(&mut self, why: &str) -> Result<StatusReport> {
        let out = self.sluice(&["status", "--json"], why)?;
        serde_json::from_str(&out).context("sluice status --json")
    }

    fn timeline(&mut self) -> Result<Vec<Entry>> {
        let journal = self.reach.nodes[self.node].journal.display().to_string();
        let out = self.sluice(&["timeline", "--journal", &journal, "--since", "15m", "--format", "json"], "what changed before the users' report")?;
        serde_json::from_str(&out).context("sluice timeline --format json")
    }

    fn events(&mut self) -> Result<Vec<Event>> {
        let out = self.sluice(&["events", "--json"], "who is refused, and why")?;
        let t = out.trim();
        if t.starts_with('[') {
            return serde_json::from_str(t).context("sluice events --json");
        }
        t.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).context("sluice events --json")).collect()
    }

    fn answer(&mut self, a: &Answer) -> Result<answer::Reply> {
        self.note(format!("sluice lab drill answer {}", a.line()), "name the cause");
        answer::send(&self.reach.drill_dir, a)
    }

    /// Reads the config file the daemon runs, edits it, writes it back and applies it.
    fn apply_edit(&mut self, path: &Path, what: &str, edit: impl FnOnce(&str) -> Result<String>) -> Result<()> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let next = edit(&text)?;
        if next == text {
            bail!("{what}: nothing to change in {}", path.display());
        }
        self.note(format!("$EDITOR {}   # {what}", path.display()), "the fix, in the file the daemon reads");
        std::fs::write(path, next).with_context(|| format!("writing {}", path.display()))?;
        let p = path.display().to_string();
        self.sluice(&["config", "apply", &p, "--force"], "apply the corrected file")?;
        Ok(())
    }
}

/// One backend's view over the two status samples.
struct Seen {
    refused: BTreeMap<String, u64>,
    new_flows: u64,
}

fn service<'a>(st: &'a StatusReport, name: &str) -> Result<&'a ServiceReport> {
    st.services.iter().find(|s| s.name == name).with_context(|| format!("no service \"{name}\" in `sluice status`"))
}

/// A change line of the timeline: `service "web" backend ADDR: KEY A -> B`.
fn change(line: &str, key: &str) -> Option<(IpAddr, String, String)> {
    let rest = line.split_once(" backend ")?.1;
    let (addr, rest) = rest.split_once(": ")?;
    let (a, b) = rest.strip_prefix(key)?.trim().split_once(" -> ")?;
    Some((addr.parse().ok()?, a.trim().to_owned(), b.trim().to_owned()))
}

/// The port a failed health check tried (`… TCP connect to ADDR:PORT: …`).
fn health_port(detail: &str) -> Option<u16> {
    let rest = detail.split_once(" to ")?.1;
    let addr = rest.split([' ', ',']).next()?.trim_end_matches(':');
    addr.parse::<std::net::SocketAddr>().ok().map(|a| a.port())
}

/// `text` with the first `key = …` line of table `[table]` set to `value`.
fn set_table_key(text: &str, table: &str, key: &str, value: &str) -> Result<String> {
    let (mut inside, mut done) = (false, false);
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            inside = t == format!("[{table}]");
        }
        if inside && !done && t.split('=').next().is_some_and(|k| k.trim() == key) {
            out.push_str(&format!("{key} = {value}\n"));
            done = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !done {
        bail!("no {key} in [{table}]");
    }
    Ok(out)
}

/// `text` with backend `addr`'s line `key = …` set to `value`.
pub(super) fn set_backend_key(text: &str, addr: IpAddr, key: &str, value: &str) -> String {
    let mut inside = false;
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            inside = false;
        }
        if t == format!("address = \"{addr}\"") {
            inside = true;
        }
        if inside && t.split('=').next().is_some_and(|k| k.trim() == key) {
            out.push_str(&format!("{key} = {value}\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Runs the responder against the incident the users reported.
pub fn respond(reach: &Reach, report: &UserReport) -> Outcome {
    let mut cx = Ctx { reach, node: 0, t0: Instant::now(), used: Vec::new() };
    let mut out = Outcome::default();
    if let Err(e) = investigate(&mut cx, report, &mut out) {
        out.error = Some(format!("{e:#}"));
    }
    out.commands = cx.used;
    out
}

/// The suspects in order; answered until one is right.
struct Suspect {
    answer: Answer,
    why: String,
    fix: Fix,
}

enum Fix {
    /// Not the load balancer's: say so and who fixes it.
    Nobody(&'static str),
    /// `sluice backend set-limit` for each (backend, limit).
    Limits(Vec<(IpAddr, u32)>),
    Undrain(IpAddr),
    /// Shorter flows.timeouts.closing (seconds).
    Closing(u64),
    /// The health checks' port back to the service's.
    HealthPort(u16),
    /// A backend's weight back.
    Weight(IpAddr, String),
}

#[expect(clippy::too_many_lines, reason = "the runbook, top to bottom")]
fn investigate(cx: &mut Ctx<'_>, report: &UserReport, out: &mut Outcome) -> Result<()> {
    let name = report.service.clone();
    // A cluster: does every node take its share? One that announces nothing gets nothing.
    if cx.reach.nodes.len() > 1 {
        for k in 0..cx.reach.nodes.len() {
            cx.node = k;
            let st = cx.status("is this node announcing its VIPs (cluster)?")?;
            if let Some(c) = st.cluster.as_ref().filter(|c| c.drained || c.announced != c.wanted || c.fenced) {
                let state = if c.drained {
                    "is drained (`sluice node drain`)".to_owned()
                } else if c.fenced {
                    "is fenced (cut off from etcd)".to_owned()
                } else {
                    format!("announces {:?} of {:?} ({})", c.announced, c.wanted, c.error.as_deref().unwrap_or("BIRD lags"))
                };
                let why = format!("node {} {state}: the router sends it nothing new, the other nodes carry it all", c.node);
                let answer = Answer { cause: Cause::NodeWithdrawn, service: None, backend: None, node: Some(c.node.clone()), by: "auto".into() };
                if cx.answer(&answer)?.right {
                    out.diagnosis = why;
                    if c.drained {
                        cx.sluice(&["node", "undrain"], "announce its VIPs again")?;
                        out.fix = Some(format!("undrained node {}", c.node));
                    } else {
                        out.fix = Some(format!("not the load balancer's to fix: node {}'s BIRD ({:?})", c.node, c.error));
                    }
                    return Ok(());
                }
            }
        }
        cx.node = 0;
    }
    // Two samples a second apart: what is refused now, not since the datapath was loaded.
    let s1 = cx.status("the load balancer first: backends, open / limit, refusals, alerts")?;
    let t1 = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let s2 = cx.status("again a second later: refusals and new flows per second")?;
    let dt = t1.elapsed().as_secs_f64();
    let (v1, v2) = (service(&s1, &name)?, service(&s2, &name)?);
    let seen: Vec<Seen> = v2
        .backends
        .iter()
        .map(|b| {
            let before = v1.backends.iter().find(|x| x.address == b.address);
            let refused = b.refused.iter().map(|(r, n)| (r.clone(), n - before.and_then(|x| x.refused.get(r)).copied().unwrap_or(0))).filter(|(_, n)| *n > 0).collect();
            Seen { refused, new_flows: b.new_flows - before.map_or(0, |x| x.new_flows) }
        })
        .collect();
    let by_reason = |reason: &str| seen.iter().map(|s| s.refused.get(reason).copied().unwrap_or(0)).sum::<u64>();
    let refused_rst = |st: &StatusReport| st.outcomes.outcomes.iter().filter(|o| o.outcome.starts_with("refused")).map(|o| o.packets).sum::<u64>();
    let refused_all = refused_rst(&s2) - refused_rst(&s1);
    let admitted: u64 = seen.iter().map(|s| s.new_flows).sum();
    let open: u64 = v2.backends.iter().map(|b| b.open).sum();
    let refusing = refused_all >= 3 && refused_all as f64 > 0.01 * (refused_all + admitted) as f64;
    let alerts: BTreeSet<String> = s2.alerts_firing.iter().map(|a| a.alertname.to_string()).collect();
    let timeline = cx.timeline()?;
    // What changed: the entries after the daemon's start and its first config.
    let changes: Vec<&String> =
        timeline.iter().filter(|e| e.kind == "config").flat_map(|e| &e.details).filter(|d| !d.contains(": add backend") && !d.starts_with("add service")).collect();
    let mut suspects: Vec<Suspect> = Vec::new();
    let for_svc = |cause: Cause, backend: Option<IpAddr>| Answer { cause, service: Some(name.clone()), backend, node: None, by: "auto".into() };

    let down: Vec<&BackendReport> = v2.backends.iter().filter(|b| b.state == "down").collect();
    let draining: Vec<&BackendReport> = v2.backends.iter().filter(|b| b.state == "draining" && !b.removed).collect();
    let full = u64::from(s2.flow_capacity) * 95 / 100;
    // A stray `flow_table_full` past half full is normal (docs/RUNBOOK.md): a share of them is not.
    let table_refusals = by_reason("flow_table_full");
    if (table_refusals >= 3 && table_refusals * 100 >= refused_all + admitted) || s2.flows >= full {
        // Flows live as long as their timeouts: size them to what the table holds.
        let demand = (refused_all + admitted) as f64 / dt;
        let room = (0.6 * f64::from(s2.flow_capacity) - open as f64).max(0.0);
        let secs = ((room / demand.max(1.0)).floor() as u64).max(1);
        suspects.push(Suspect {
            answer: for_svc(Cause::FlowTableFull, None),
            why: format!("{} flows of {} capacity, refusals flow_table_full; {open} connections open, {demand:.0} new/s", s2.flows, s2.flow_capacity),
            fix: Fix::Closing(secs),
        });
    } else if !down.is_empty() {
        // The port the failing checks tried, from the timeline.
        let ports: BTreeSet<u16> =
            timeline.iter().filter(|e| e.kind == "backend" && e.summary.contains("unhealthy")).flat_map(|e| &e.details).filter_map(|d| health_port(d)).collect();
        let wrong_port = ports.iter().any(|p| *p != v2.port);
        if wrong_port || (down.len() == v2.backends.len() && !changes.is_empty()) {
            suspects.push(Suspect {
                answer: for_svc(Cause::HealthCheckWrong, None),
                why: format!("{} of {} backends down at once; their checks tried port(s) {ports:?}, the service is on {}", down.len(), v2.backends.len(), v2.port),
                fix: Fix::HealthPort(v2.port),
            });
        }
        let one = (down.len() == 1).then(|| down[0].address);
        suspects.push(Suspect {
            answer: for_svc(Cause::BackendDown, one),
            why: format!("backend(s) {} down (health checks), the others refuse at their limits", down.iter().map(|b| b.address.to_string()).collect::<Vec<_>>().join(", ")),
            fix: Fix::Nobody("the backend's team restarts it"),
        });
    } else if !draining.is_empty() {
        let a = draining[0].address;
        suspects.push(Suspect {
            answer: for_svc(Cause::BackendDrained, Some(a)),
            why: format!("backend {a} draining (takes no new connections), the others refuse at their limits"),
            fix: Fix::Undrain(a),
        });
    } else if refusing {
        let lowered: Vec<(IpAddr, u32, u32)> = changes
            .iter()
            .filter_map(|d| change(d, "max_conns"))
            .filter_map(|(a, old, new)| Some((a, old.parse::<u32>().ok()?, new.parse::<u32>().ok()?)))
            .filter(|(_, old, new)| new < old)
            .collect();
        let weights: Vec<(IpAddr, String, String)> = changes.iter().filter_map(|d| change(d, "weight")).collect();
        if !lowered.is_empty() {
            let mut last: BTreeMap<IpAddr, u32> = BTreeMap::new();
            for (a, old, _) in &lowered {
                last.entry(*a).or_insert(*old);
            }
            let one = (last.len() == 1).then(|| *last.keys().next().expect("one"));
            suspects.push(Suspect {
                answer: for_svc(Cause::LimitTooLow, one),
                why: format!(
                    "refusals backend_limit; the timeline shows max_conns lowered: {}",
                    lowered.iter().map(|(a, o, n)| format!("{a} {o} -> {n}")).collect::<Vec<_>>().join(", ")
                ),
                fix: Fix::Limits(last.into_iter().collect()),
            });
        }
        if let Some((a, old, new)) = weights.last() {
            suspects.push(Suspect {
                answer: for_svc(Cause::WeightWrong, Some(*a)),
                why: format!("refusals backend_limit on {a}; the timeline shows its weight {old} -> {new}"),
                fix: Fix::Weight(*a, old.clone()),
            });
        }
        if suspects.is_empty() {
            // No change explains it: who is knocking?
            let events = cx.events()?;
            let since = report.since - Duration::from_secs(5);
            let sources: BTreeSet<IpAddr> =
                events.iter().filter(|e| e.service == name && humantime::parse_rfc3339_weak(&e.time).map_or(true, |t| t >= since)).map(|e| e.client.ip()).collect();
            if sources.len() >= 20 {
                suspects.push(Suspect {
                    answer: for_svc(Cause::SynFlood, None),
                    why: format!("every backend at its limit, no change in the timeline, refused connections from {} different addresses", sources.len()),
                    fix: Fix::Nobody("the network team filters the flood upstream"),
                });
            } else {
                // Too little capacity for today's load: raise what the review suggests.
                let review: Review = serde_json::from_str(&cx.sluice(&["config", "review", "--json"], "limits against the peaks")?)?;
                let raise =
                    review.services.iter().filter(|s| s.name == name).flat_map(|s| &s.backends).map(|b| (b.address, (b.suggested as u32).max(b.max_conns * 3 / 2))).collect();
                suspects.push(Suspect {
                    answer: for_svc(Cause::LimitTooLow, None),
                    why: "refusals backend_limit with no change to explain them: too little capacity".into(),
                    fix: Fix::Limits(raise),
                });
            }
        }
    } else {
        suspects.push(Suspect {
            answer: for_svc(Cause::NotTheLoadBalancer, None),
            why: format!(
                "nothing refused ({refused_all} in {dt:.1} s against {admitted} admitted), every backend active, {} of {} flows, alerts firing: {alerts:?}",
                s2.flows, s2.flow_capacity
            ),
            fix: Fix::Nobody("the backends' team: they answer slowly"),
        });
    }

    let mut right = None;
    for s in suspects {
        let reply = cx.answer(&s.answer)?;
        if reply.right {
            out.diagnosis = s.why;
            right = Some(s.fix);
            break;
        }
        out.diagnosis = format!("wrong: {} ({})", s.answer.line(), s.why);
    }
    let Some(fix) = right else { bail!("no suspect was right: {}", out.diagnosis) };
    let config = s2.config.clone();
    out.fix = Some(match fix {
        Fix::Nobody(who) => format!("not the load balancer's to fix: {who}"),
        Fix::Limits(limits) => {
            for (a, n) in &limits {
                cx.sluice(&["backend", "set-limit", &name, &a.to_string(), &n.to_string()], "the limit back to what carried the load")?;
            }
            format!("max_conns back: {limits:?}")
        }
        Fix::Undrain(a) => {
            cx.sluice(&["backend", "undrain", &name, &a.to_string()], "the drained backend back into the ring")?;
            format!("undrained {a}")
        }
        Fix::Closing(secs) => {
            cx.apply_edit(&config, &format!("flows.timeouts.closing = \"{secs}s\""), |t| set_table_key(t, "flows.timeouts", "closing", &format!("\"{secs}s\"")))?;
            format!("flows.timeouts.closing = {secs}s")
        }
        Fix::HealthPort(port) => {
            // The checks' own port goes: they check the service's port again. In a health table
            // (`[service.backend.health]`, as the lab writes it) or an inline `health = { … }`.
            cx.apply_edit(&config, &format!("health checks on port {port}"), |t| {
                let mut table = "";
                let mut out = String::new();
                for l in t.lines() {
                    let line = l.trim_start();
                    if line.starts_with('[') {
                        table = line;
                    }
                    if table == "[service.backend.health]" && line.starts_with("port") {
                        continue;
                    }
                    if line.starts_with("health") && line.contains('{') {
                        let mut kept = l.split(',').filter(|p| !p.trim().starts_with("port")).collect::<Vec<_>>().join(",");
                        if !kept.trim_end().ends_with('}') {
                            kept.push_str(" }");
                        }
                        out.push_str(&kept);
                    } else {
                        out.push_str(l);
                    }
                    out.push('\n');
                }
                Ok(out)
            })?;
            format!("health checks on the service's port {port}")
        }
        Fix::Weight(a, w) => {
            cx.apply_edit(&config, &format!("backend {a} weight = {w}"), |t| Ok(set_backend_key(t, a, "weight", &w)))?;
            format!("backend {a}'s weight back to {w}")
        }
    });
    Ok(())
}
