//! Alert delivery beyond the log: a webhook (HTTP POST of Alertmanager API v2 JSON, with a
//! timeout and retries) and a command to exec. Both run on their own task behind a bounded
//! queue, so a dead receiver never blocks the daemon; what cannot be queued is dropped and
//! counted.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use http_body_util::Full;
use hyper::{body::Bytes, Request};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::{net::TcpStream, sync::mpsc};

use crate::alerts::{Notification, Status};

/// `[alerts.webhook]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookCfg {
    /// `http://host:port/path` (plain HTTP; e.g. Alertmanager's `/api/v2/alerts`).
    pub url: String,
    #[serde(default = "d_timeout", deserialize_with = "crate::config::duration")]
    pub timeout: Duration,
    #[serde(default = "d_retries")]
    pub retries: u32,
}

fn d_timeout() -> Duration {
    Duration::from_secs(2)
}
fn d_retries() -> u32 {
    3
}

/// Alertmanager API v2 postable alert.
pub fn alertmanager_json(n: &Notification) -> Value {
    let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let mut a = json!({
        "labels": n.labels,
        "annotations": { "summary": n.summary, "description": n.description, "runbook_url": n.runbook_url },
        "status": match n.status { Status::Firing => "firing", Status::Resolved => "resolved" },
    });
    if n.status == Status::Resolved {
        a["endsAt"] = Value::String(now);
    } else {
        a["startsAt"] = Value::String(now);
    }
    a
}

/// Splits `http://host:port/path` into (authority, path).
pub(crate) fn parse_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("http://")?;
    let (auth, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    let auth = if auth.contains(':') { auth.to_owned() } else { format!("{auth}:80") };
    Some((auth, path))
}

async fn post_once(auth: &str, path: &str, body: &[u8]) -> Result<u16, String> {
    let stream = TcpStream::connect(auth).await.map_err(|e| format!("connect {auth}: {e}"))?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::post(path).header("host", auth).header("content-type", "application/json").body(Full::new(Bytes::copy_from_slice(body))).map_err(|e| e.to_string())?;
    let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.status().as_u16())
}

/// Delivers to a webhook: POST with a timeout, retried with backoff on failure or a non-2xx.
pub async fn post(cfg: &WebhookCfg, body: &[u8]) -> Result<(), String> {
    let (auth, path) = parse_url(&cfg.url).ok_or_else(|| format!("{}: only http://host[:port]/path URLs are supported", cfg.url))?;
    let mut last = String::new();
    for attempt in 0..=cfg.retries {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))).await;
        }
        match tokio::time::timeout(cfg.timeout, post_once(&auth, &path, body)).await {
            Ok(Ok(s)) if (200..300).contains(&s) => return Ok(()),
            Ok(Ok(s)) => last = format!("HTTP {s}"),
            Ok(Err(e)) => last = e,
            Err(_) => last = format!("timed out after {:?}", cfg.timeout),
        }
    }
    Err(format!("{}: {last} (after {} attempts)", cfg.url, cfg.retries + 1))
}

/// The sinks: each has its own queue and task, so a dead webhook delays neither the daemon nor
/// the command sink. `send` never waits.
#[derive(Clone)]
pub struct Sinks {
    queues: Vec<mpsc::Sender<Notification>>,
    pub dropped: Arc<AtomicU64>,
}

async fn deliver_webhook(w: WebhookCfg, mut rx: mpsc::Receiver<Notification>) {
    while let Some(n) = rx.recv().await {
        let body = serde_json::to_vec(&vec![alertmanager_json(&n)]).expect("json");
        if let Err(e) = post(&w, &body).await {
            tracing::error!(alert = %n.alertname, "webhook delivery failed: {e}");
        }
    }
}

async fn deliver_command(argv: Vec<String>, mut rx: mpsc::Receiver<Notification>) {
    while let Some(n) = rx.recv().await {
        let status = match n.status {
            Status::Firing => "firing",
            Status::Resolved => "resolved",
        };
        let mut cmd = tokio::process::Command::new(&argv[0]);
        // The open-file limit the daemon started with, not the one it raised (`openfiles.rs`).
        // SAFETY: restore_for_child makes one async-signal-safe call (setrlimit).
        unsafe {
            cmd.pre_exec(crate::openfiles::restore_for_child);
        }
        let run = cmd
            .args(&argv[1..])
            .env("SLUICE_ALERT", n.alertname.as_ref())
            .env("SLUICE_ALERT_STATUS", status)
            .env("SLUICE_ALERT_SUMMARY", &n.summary)
            .env("SLUICE_ALERT_DESCRIPTION", &n.description)
            .env("SLUICE_ALERT_RUNBOOK_URL", &n.runbook_url)
            .env("SLUICE_ALERT_LABELS", serde_json::to_string(&n.labels).unwrap_or_default())
            .envs(n.labels.iter().map(|(k, v)| (format!("SLUICE_LABEL_{}", k.to_uppercase()), v)))
            .kill_on_drop(true)
            .status();
        match tokio::time::timeout(Duration::from_secs(10), run).await {
            Ok(Ok(s)) if s.success() => {}
            Ok(Ok(s)) => tracing::error!(alert = %n.alertname, "alert command {argv:?} exited with {s}"),
            Ok(Err(e)) => tracing::error!(alert = %n.alertname, "alert command {argv:?}: {e}"),
            Err(_) => tracing::error!(alert = %n.alertname, "alert command {argv:?} timed out"),
        }
    }
}

impl Sinks {
    pub fn start(webhooks: Vec<WebhookCfg>, command: Option<Vec<String>>) -> Self {
        let mut queues = Vec::new();
        for w in webhooks {
            let (tx, rx) = mpsc::channel(256);
            tokio::spawn(deliver_webhook(w, rx));
            queues.push(tx);
        }
        if let Some(argv) = command.filter(|a| !a.is_empty()) {
            let (tx, rx) = mpsc::channel(256);
            tokio::spawn(deliver_command(argv, rx));
            queues.push(tx);
        }
        Self { queues, dropped: Arc::new(AtomicU64::new(0)) }
    }

    pub fn send(&self, n: &Notification) {
        for q in &self.queues {
            if q.try_send(n.clone()).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    fn n(status: Status) -> Notification {
        let labels: BTreeMap<String, String> =
            [("alertname", "SluiceBackendAtLimit"), ("service", "web"), ("backend", "10.0.0.11")].into_iter().map(|(a, b)| (a.into(), b.into())).collect();
        Notification {
            status,
            alertname: "SluiceBackendAtLimit".into(),
            severity: "critical".into(),
            labels,
            summary: "s".into(),
            description: "d".into(),
            runbook_url: "r#sluicebackendatlimit".into(),
        }
    }

    /// Polls `f` until it holds; a generous deadline only turns a hang into a failure.
    async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !f() {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A receiver that accepts connections, holds them and never answers; counts them.
    async fn hanging_receiver() -> (std::net::SocketAddr, Arc<AtomicU64>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let accepted = Arc::new(AtomicU64::new(0));
        let a = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((c, _)) = l.accept().await {
                a.fetch_add(1, Ordering::Relaxed);
                held.push(c);
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn a_hanging_webhook_does_not_delay_the_command_sink() {
        let file = std::env::temp_dir().join(format!("sluice-sink-{}", std::process::id()));
        let _ = std::fs::remove_file(&file);
        // Its timeout is far beyond the test's deadline: a sink queued behind it never runs.
        let (addr, accepted) = hanging_receiver().await;
        let hanging = WebhookCfg { url: format!("http://{addr}/alerts"), timeout: Duration::from_hours(1), retries: 3 };
        let cmd = vec!["sh".into(), "-c".into(), format!("echo \"$SLUICE_ALERT $SLUICE_ALERT_STATUS\" >> {}", file.display())];
        let sinks = Sinks::start(vec![hanging], Some(cmd));
        let says = |what: &str| std::fs::read_to_string(&file).is_ok_and(|t| t.contains(what));
        // The first notification: the webhook hangs on it.
        sinks.send(&n(Status::Firing));
        eventually("the webhook to hang on the first notification", || accepted.load(Ordering::Relaxed) == 1).await;
        // The second, while it hangs: the command sink runs both, whichever order a serial
        // delivery would have taken.
        sinks.send(&n(Status::Resolved));
        eventually("the command sink to run both notifications", || says("SluiceBackendAtLimit firing") && says("SluiceBackendAtLimit resolved")).await;
        assert_eq!(accepted.load(Ordering::Relaxed), 1, "the webhook is still on its first attempt");
        let _ = std::fs::remove_file(&file);
    }

    /// The routing labels and the runbook reach every sink: the engine puts them on the
    /// notification, the webhook's JSON and the command's environment carry them.
    #[tokio::test]
    async fn labels_and_the_runbook_reach_the_webhook_and_the_command() {
        let cfg =
            crate::alerts::AlertsCfg { name: Some("lb-1".into()), labels: [("team".to_owned(), "netops".to_owned())].into(), fire_after: Duration::ZERO, ..Default::default() };
        let mut engine = crate::alerts::Engine::new(cfg);
        let sample = crate::alerts::Sample {
            backends: vec![crate::alerts::BackendSample {
                service: "web".into(),
                backend: "10.0.0.11".into(),
                open: 5,
                max_conns: 5,
                active: true,
                refused: lb_common::Refusals::default(),
                cluster: None,
            }],
            service_labels: [("web".to_owned(), [("owner".to_owned(), "checkout".to_owned())].into())].into(),
            ..Default::default()
        };
        let now = std::time::Instant::now();
        let fired = engine.evaluate(now, sample);
        let at_limit = fired.iter().find(|n| n.alertname == "SluiceBackendAtLimit").expect("fires").clone();
        assert_eq!(at_limit.labels["team"], "netops");
        assert_eq!(at_limit.labels["owner"], "checkout");
        assert!(at_limit.runbook_url.ends_with("#sluicebackendatlimit"), "{}", at_limit.runbook_url);
        let j = alertmanager_json(&at_limit);
        assert_eq!((j["labels"]["team"].as_str(), j["annotations"]["runbook_url"].as_str()), (Some("netops"), Some(at_limit.runbook_url.as_str())));
        let file = std::env::temp_dir().join(format!("sluice-sink-labels-{}", std::process::id()));
        let _ = std::fs::remove_file(&file);
        let cmd = vec!["sh".into(), "-c".into(), format!("echo \"$SLUICE_LABEL_TEAM $SLUICE_LABEL_OWNER $SLUICE_ALERT_RUNBOOK_URL\" >> {}", file.display())];
        let sinks = Sinks::start(Vec::new(), Some(cmd));
        sinks.send(&at_limit);
        let want = format!("netops checkout {}", at_limit.runbook_url);
        eventually("the command to get the labels", || std::fs::read_to_string(&file).is_ok_and(|t| t.contains(&want))).await;
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn alertmanager_shape() {
        let f = alertmanager_json(&n(Status::Firing));
        assert_eq!(f["labels"]["alertname"], "SluiceBackendAtLimit");
        assert!(f["startsAt"].is_string() && f.get("endsAt").is_none());
        let r = alertmanager_json(&n(Status::Resolved));
        assert!(r["endsAt"].is_string());
        assert_eq!(parse_url("http://127.0.0.1:9093/api/v2/alerts"), Some(("127.0.0.1:9093".into(), "/api/v2/alerts".into())));
        assert_eq!(parse_url("https://x/"), None);
    }

    #[tokio::test]
    async fn webhook_retries_then_delivers_and_gives_up_on_a_dead_receiver() {
        // A receiver that fails the first request with 500, then accepts.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let got = Arc::new(tokio::sync::Mutex::new(Vec::new()));
        let g = got.clone();
        tokio::spawn(async move {
            for i in 0.. {
                let (mut c, _) = l.accept().await.expect("accept");
                let mut buf = vec![0u8; 8192];
                let n = c.read(&mut buf).await.unwrap_or(0);
                g.lock().await.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                let status = if i == 0 { "500 Internal Server Error" } else { "200 OK" };
                let _ = c.write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes()).await;
            }
        });
        let cfg = WebhookCfg { url: format!("http://{addr}/api/v2/alerts"), timeout: Duration::from_secs(1), retries: 2 };
        let body = serde_json::to_vec(&vec![alertmanager_json(&n(Status::Firing))]).expect("json");
        post(&cfg, &body).await.expect("delivered on the retry");
        let got = got.lock().await;
        assert_eq!(got.len(), 2);
        assert!(got[1].starts_with("POST /api/v2/alerts") && got[1].contains("SluiceBackendAtLimit"), "{}", got[1]);

        // Nobody listening: fails after its retries (the outer deadline only turns a hang into a
        // failure).
        let dead = WebhookCfg { url: "http://127.0.0.1:9/x".into(), timeout: Duration::from_millis(200), retries: 1 };
        let e = tokio::time::timeout(Duration::from_secs(30), post(&dead, &body)).await.expect("post gives up").expect_err("dead receiver");
        assert!(e.contains("after 2 attempts") && e.contains("connect"), "{e}");
        // A receiver that never answers: each attempt ends at the timeout, then the next one.
        let (addr, accepted) = hanging_receiver().await;
        let hanging = WebhookCfg { url: format!("http://{addr}/x"), timeout: Duration::from_millis(200), retries: 1 };
        let e = tokio::time::timeout(Duration::from_secs(30), post(&hanging, &body)).await.expect("post gives up").expect_err("hanging receiver");
        assert!(e.contains("timed out after 200ms") && e.contains("after 2 attempts"), "{e}");
        assert_eq!(accepted.load(Ordering::Relaxed), 2, "one connection per attempt");
    }
}
