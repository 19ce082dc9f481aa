//! Alert delivery beyond the log: a webhook (HTTP POST of Alertmanager API v2 JSON, with a
//! timeout and retries; over TLS for `https://`, with basic auth or a bearer token) and a
//! command to exec. Both run on their own task behind a bounded queue, so a dead receiver never
//! blocks the daemon; what cannot be queued is dropped and counted.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use http_body_util::Full;
use hyper::{body::Bytes, header::HeaderValue, Request};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::mpsc,
};

use crate::{
    alerts::{Notification, Status},
    config::{parse_url, Target, WebhookCfg},
};

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

/// A webhook ready to deliver: its URL parsed and, for `https://`, its TLS client
/// configuration built (once, not per post).
pub struct Webhook {
    cfg: WebhookCfg,
    target: Target,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl Webhook {
    pub fn new(cfg: WebhookCfg) -> Result<Self, String> {
        let target = parse_url(&cfg.url).map_err(|e| format!("{}: {e}", cfg.url))?;
        let tls = if target.https {
            let config = crate::tls::client_config(cfg.ca_file.as_deref(), None, "webhook").map_err(|e| format!("{}: {e:#}", cfg.url))?;
            let name = ServerName::try_from(target.host.clone()).map_err(|e| format!("{}: {e}", cfg.url))?;
            Some((tokio_rustls::TlsConnector::from(config), name))
        } else {
            None
        };
        Ok(Self { cfg, target, tls })
    }

    /// The Authorization header, the secret read now (a rotated one is picked up); marked
    /// sensitive. An error names the file, never the secret.
    fn authorization(&self) -> Result<Option<HeaderValue>, String> {
        let value = if let Some(b) = &self.cfg.basic_auth {
            use base64::Engine as _;
            let pw = crate::tls::read_secret(&b.password_file, "basic_auth.password_file").map_err(|e| e.to_string())?;
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{}:{pw}", b.username)))
        } else if let Some(f) = &self.cfg.bearer_token_file {
            format!("Bearer {}", crate::tls::read_secret(f, "bearer_token_file").map_err(|e| e.to_string())?)
        } else {
            return Ok(None);
        };
        let mut h = HeaderValue::from_str(&value).map_err(|_| "the credentials have characters an HTTP header cannot carry".to_owned())?;
        h.set_sensitive(true);
        Ok(Some(h))
    }

    async fn post_once(&self, body: &[u8], authorization: Option<&HeaderValue>) -> Result<u16, String> {
        let auth = &self.target.authority;
        let stream = TcpStream::connect(auth).await.map_err(|e| format!("connect {auth}: {e}"))?;
        let mut req = Request::post(&self.target.path).header("host", auth).header("content-type", "application/json");
        if let Some(a) = authorization {
            req = req.header(hyper::header::AUTHORIZATION, a.clone());
        }
        let req = req.body(Full::new(Bytes::copy_from_slice(body))).map_err(|e| e.to_string())?;
        match &self.tls {
            None => send(stream, req).await,
            Some((connector, name)) => {
                let stream = connector.connect(name.clone(), stream).await.map_err(|e| {
                    let reason = crate::tls::reason_in(&e).unwrap_or_else(|| e.to_string());
                    let trusted = self.cfg.ca_file.as_ref().map_or_else(|| "the system's CAs".to_owned(), |c| format!("ca_file {}", c.display()));
                    format!("TLS handshake with {auth} failed: {reason} (trusting {trusted})")
                })?;
                send(stream, req).await
            }
        }
    }

    /// Delivers: POST with a timeout, retried with backoff on failure or a non-2xx.
    pub async fn post(&self, body: &[u8]) -> Result<(), String> {
        let url = &self.cfg.url;
        let authorization = self.authorization().map_err(|e| format!("{url}: {e}"))?;
        let mut last = String::new();
        for attempt in 0..=self.cfg.retries {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))).await;
            }
            match tokio::time::timeout(self.cfg.timeout, self.post_once(body, authorization.as_ref())).await {
                Ok(Ok(s)) if (200..300).contains(&s) => return Ok(()),
                Ok(Ok(s @ (401 | 403))) => {
                    let what =
                        if authorization.is_some() { "refused the credentials (basic_auth, bearer_token_file)" } else { "wants credentials (basic_auth or bearer_token_file)" };
                    last = format!("HTTP {s}: the receiver {what}");
                }
                Ok(Ok(s)) => last = format!("HTTP {s}"),
                Ok(Err(e)) => last = e,
                Err(_) => last = format!("timed out after {:?}", self.cfg.timeout),
            }
        }
        Err(format!("{url}: {last} (after {} attempts)", self.cfg.retries + 1))
    }
}

/// One HTTP/1.1 request on `stream`; the status.
async fn send<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(stream: S, req: Request<Full<Bytes>>) -> Result<u16, String> {
    let why = |e: hyper::Error| crate::tls::reason_in(&e).map_or_else(|| e.to_string(), |r| format!("TLS: {r}"));
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(why)?;
    tokio::spawn(conn);
    let resp = tx.send_request(req).await.map_err(why)?;
    Ok(resp.status().as_u16())
}

/// The sinks: each has its own queue and task, so a dead webhook delays neither the daemon nor
/// the command sink. `send` never waits.
#[derive(Clone)]
pub struct Sinks {
    queues: Vec<mpsc::Sender<Notification>>,
    pub dropped: Arc<AtomicU64>,
}

async fn deliver_webhook(w: Result<Webhook, String>, mut rx: mpsc::Receiver<Notification>) {
    if let Err(e) = &w {
        tracing::error!("webhook unusable, its alerts will not be delivered: {e}");
    }
    while let Some(n) = rx.recv().await {
        let body = serde_json::to_vec(&vec![alertmanager_json(&n)]).expect("json");
        if let Err(e) = match &w {
            Ok(w) => w.post(&body).await,
            Err(e) => Err(e.clone()),
        } {
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
            tokio::spawn(deliver_webhook(Webhook::new(w), rx));
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
mod tests;
