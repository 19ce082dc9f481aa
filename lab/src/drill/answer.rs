//! How a trainee (or the scripted responder) names the cause: `sluice lab drill answer CAUSE …`
//! sends one JSON line to a Unix socket in the drill's run directory and reads the verdict back.
//! The drill judges it against the fault it injected; a wrong answer is counted and the drill
//! goes on.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::IpAddr,
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

/// The causes an answer names: a fixed vocabulary (`sluice lab drill --list` says which
/// scenario trains which).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Cause {
    /// A backend's `max_conns` is below the load it must carry.
    LimitTooLow,
    /// A backend failed: its health checks took it out of the ring.
    BackendDown,
    /// A backend was drained (and left so): it takes no new connections.
    BackendDrained,
    /// The flow table is full: new connections are refused `flow_table_full`.
    FlowTableFull,
    /// A SYN flood holds the connection slots.
    SynFlood,
    /// This node's share of a cluster-wide limit is used up.
    ShareExhausted,
    /// A cluster node withdrew its VIPs (or the router stopped sending to it).
    NodeWithdrawn,
    /// The health checks test the wrong thing: healthy backends are out of the ring.
    HealthCheckWrong,
    /// A backend's weight sends it more than its share.
    WeightWrong,
    /// The load balancer is not the cause: it admits and forwards everything.
    NotTheLoadBalancer,
}

impl Cause {
    /// Its name on the command line and in JSON (`limit-too-low`).
    pub fn name(self) -> &'static str {
        match self {
            Self::LimitTooLow => "limit-too-low",
            Self::BackendDown => "backend-down",
            Self::BackendDrained => "backend-drained",
            Self::FlowTableFull => "flow-table-full",
            Self::SynFlood => "syn-flood",
            Self::ShareExhausted => "share-exhausted",
            Self::NodeWithdrawn => "node-withdrawn",
            Self::HealthCheckWrong => "health-check-wrong",
            Self::WeightWrong => "weight-wrong",
            Self::NotTheLoadBalancer => "not-the-load-balancer",
        }
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Answer {
    pub cause: Cause,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// "trainee" or "auto" (the scripted responder).
    #[serde(default)]
    pub by: String,
}

impl Answer {
    /// As typed: `limit-too-low --service web --backend 198.18.0.12`.
    pub fn line(&self) -> String {
        let mut s = self.cause.name().to_owned();
        if let Some(v) = &self.service {
            s.push_str(&format!(" --service {v}"));
        }
        if let Some(v) = &self.backend {
            s.push_str(&format!(" --backend {v}"));
        }
        if let Some(v) = &self.node {
            s.push_str(&format!(" --node {v}"));
        }
        s
    }
}

/// The drill's verdict on an answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reply {
    pub right: bool,
    pub message: String,
    pub wrong_answers: u32,
}

/// The socket in a drill's run directory.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("drill.sock")
}

/// Sends `answer` to the drill running in `dir`; its verdict.
pub fn send(dir: &Path, answer: &Answer) -> Result<Reply> {
    let path = socket_path(dir);
    let mut s = UnixStream::connect(&path).with_context(|| format!("no drill is running ({}): start one with `sluice lab drill`", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_string(answer)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).context("reading the drill's verdict")?;
    serde_json::from_str(&reply).with_context(|| format!("the drill's verdict: {reply:?}"))
}

/// Serves the socket in `dir` on a thread of its own: each connection sends one answer and gets
/// `judge`'s verdict. The thread lives as long as the process (the socket goes with the run
/// directory).
pub fn serve(dir: &Path, judge: impl Fn(Answer) -> Reply + Send + 'static) -> Result<()> {
    let path = socket_path(dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut line = String::new();
            let Ok(reader) = conn.try_clone() else { continue };
            if BufReader::new(reader).read_line(&mut line).is_err() {
                continue;
            }
            let reply = match serde_json::from_str::<Answer>(&line) {
                Ok(a) => judge(a),
                Err(e) => Reply { right: false, message: format!("not an answer ({e}); nothing counted"), wrong_answers: 0 },
            };
            let mut out = serde_json::to_string(&reply).unwrap_or_default();
            out.push('\n');
            let _ = conn.write_all(out.as_bytes());
        }
    });
    Ok(())
}
