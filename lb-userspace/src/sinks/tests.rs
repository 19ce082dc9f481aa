use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;
use crate::config::{BasicAuth, Severity};

/// One delivery through a webhook made for it.
async fn post(cfg: &WebhookCfg, body: &[u8]) -> Result<(), String> {
    Webhook::new(cfg.clone())?.post(body).await
}

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
    let hanging = WebhookCfg { timeout: Duration::from_hours(1), retries: 3, ..WebhookCfg::new(format!("http://{addr}/alerts")) };
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
    let cfg = crate::config::AlertsCfg { name: Some("lb-1".into()), labels: [("team".to_owned(), "netops".to_owned())].into(), fire_after: Duration::ZERO, ..Default::default() };
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
}

#[test]
fn urls_parse_or_say_why_not() {
    let t = |url: &str| parse_url(url).map(|t| (t.https, t.host, t.port, t.authority, t.path));
    let ok = |https, host: &str, port, auth: &str, path: &str| Ok((https, host.to_owned(), port, auth.to_owned(), path.to_owned()));
    assert_eq!(t("http://127.0.0.1:9093/api/v2/alerts"), ok(false, "127.0.0.1", 9093, "127.0.0.1:9093", "/api/v2/alerts"));
    assert_eq!(t("http://am.example"), ok(false, "am.example", 80, "am.example:80", "/"));
    assert_eq!(t("https://am.example/api/v2/alerts?x=1"), ok(true, "am.example", 443, "am.example:443", "/api/v2/alerts?x=1"));
    assert_eq!(t("https://[2001:db8::1]:9093/a"), ok(true, "2001:db8::1", 9093, "[2001:db8::1]:9093", "/a"));
    assert_eq!(t("https://[::1]/a"), ok(true, "::1", 443, "[::1]:443", "/a"));
    for (url, why) in [
        ("ftp://x/", "only http://"),
        ("HTTPS://x/", "only http://"),
        ("https://user:pw@x/", "credentials in the URL"),
        ("http://x:0/", "not a port"),
        ("http://x:99999/", "not a port"),
        ("http://x:port/", "not a port"),
        ("https:///a", "no host"),
        ("http://:80/a", "no host"),
        ("http://2001:db8::1/", "in brackets"),
        ("https://[2001:db8::1/", "closing ]"),
        ("https://[::1]9093/", "[address]:port"),
        ("https://bad_name!/", "neither a DNS name nor an IP address"),
    ] {
        let e = parse_url(url).expect_err(url);
        assert!(e.contains(why), "{url}: {e}");
        assert!(!e.contains("pw"), "{url}: {e}");
    }
}

/// A directory for one test's files, removed on drop.
struct Dir(PathBuf);
impl Dir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("sluice-sinks-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        Self(d)
    }
    /// Writes `text` to `name` with `mode`; its path.
    fn file(&self, name: &str, text: &str, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let f = self.0.join(name);
        std::fs::write(&f, text).expect("write");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).expect("chmod");
        f
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The findings of a config whose `[alerts]` has `webhooks`: (severity, key, message).
fn findings(webhooks: &str) -> Vec<(Severity, String, String)> {
    let text = format!("[daemon]\ninterface = \"eth0\"\n[alerts]\n{webhooks}\n");
    let found = match crate::config::parse(Path::new("sluice.toml"), &text) {
        Ok((_, warnings)) => warnings,
        Err(r) => r.findings,
    };
    found.into_iter().map(|f| (f.severity, f.key, f.message)).collect()
}

#[test]
fn webhook_tls_and_credential_keys_are_validated_naming_the_key() {
    let d = Dir::new("validate");
    let pw = d.file("pw", "s3cret\n", 0o600);
    let open_pw = d.file("pw-open", "s3cret\n", 0o644);
    let token = d.file("token", "t0ken", 0o600);
    let empty = d.file("empty", "", 0o600);
    let not_a_ca = d.file("ca.pem", "not a certificate\n", 0o644);
    let (pw, open_pw, token, empty, not_a_ca) = (pw.display(), open_pw.display(), token.display(), empty.display(), not_a_ca.display());
    let missing = d.0.join("missing");
    let missing = missing.display();

    // Accepted: https with a bearer token (system CAs), https with basic auth.
    assert_eq!(findings(&format!("webhooks = [{{ url = \"https://am.example/api/v2/alerts\", bearer_token_file = \"{token}\" }}]")), []);
    let (cfg, _) = crate::config::parse(
        Path::new("sluice.toml"),
        &format!(
            "[daemon]\ninterface = \"eth0\"\n[alerts]\nwebhook = {{ url = \"https://127.0.0.1:9093/\", basic_auth = {{ username = \"sluice\", password_file = \"{pw}\" }} }}\n"
        ),
    )
    .expect("valid");
    let w = cfg.alerts.webhook.expect("webhook");
    assert_eq!(w.basic_auth, Some(BasicAuth { username: "sluice".into(), password_file: pw.to_string().into() }));
    assert_eq!((w.timeout, w.retries, w.ca_file), (Duration::from_secs(2), 3, None));

    let e = Severity::Error;
    let cases: Vec<(String, Severity, &str, Vec<String>)> = vec![
        (
            format!("webhooks = [{{ url = \"https://x/\", basic_auth = {{ username = \"u\", password_file = \"{pw}\" }}, bearer_token_file = \"{token}\" }}]"),
            e,
            "alerts.webhooks[0].bearer_token_file",
            vec!["one kind of credentials".into()],
        ),
        (
            format!("webhooks = [{{ url = \"https://x/\" }}, {{ url = \"https://y/\", basic_auth = {{ username = \"u\", password_file = \"{open_pw}\" }} }}]"),
            e,
            "alerts.webhooks[1].basic_auth.password_file",
            vec![open_pw.to_string(), "0644".into(), "chmod 600".into()],
        ),
        (
            format!("webhooks = [{{ url = \"https://x/\", bearer_token_file = \"{missing}\" }}]"),
            e,
            "alerts.webhooks[0].bearer_token_file",
            vec![missing.to_string(), "No such file".into()],
        ),
        (format!("webhooks = [{{ url = \"https://x/\", bearer_token_file = \"{empty}\" }}]"), e, "alerts.webhooks[0].bearer_token_file", vec!["empty".into()]),
        (
            format!("webhooks = [{{ url = \"https://x/\", basic_auth = {{ username = \"a:b\", password_file = \"{pw}\" }} }}]"),
            e,
            "alerts.webhooks[0].basic_auth.username",
            vec!["without ':'".into()],
        ),
        (format!("webhooks = [{{ url = \"https://x/\", ca_file = \"{not_a_ca}\" }}]"), e, "alerts.webhooks[0].ca_file", vec![not_a_ca.to_string(), "no certificate".into()]),
        (format!("webhooks = [{{ url = \"https://x/\", ca_file = \"{missing}\" }}]"), e, "alerts.webhooks[0].ca_file", vec![missing.to_string()]),
        (format!("webhooks = [{{ url = \"http://x/\", ca_file = \"{not_a_ca}\" }}]"), e, "alerts.webhooks[0].ca_file", vec!["http:// URL".into()]),
        ("webhook = { url = \"https://u:p@x/\" }".into(), e, "alerts.webhook.url", vec!["credentials in the URL".into()]),
        // A password inline is no key (deny_unknown_fields).
        (
            "webhooks = [{ url = \"https://x/\", basic_auth = { username = \"u\", password = \"p\" } }]".into(),
            e,
            "alerts.webhooks[0].basic_auth.password",
            vec!["unknown field `password`".into()],
        ),
        ("webhooks = [{ url = \"https://x/\", ca = \"/c\" }]".into(), e, "alerts.webhooks[0].ca", vec!["unknown field `ca`".into()]),
        (format!("webhooks = [{{ url = \"http://x/\", bearer_token_file = \"{token}\" }}]"), Severity::Warning, "alerts.webhooks[0].url", vec!["plain http://".into()]),
    ];
    for (toml, severity, key, words) in cases {
        let f = findings(&toml);
        let hit = f.iter().find(|(s, k, _)| *s == severity && k == key).unwrap_or_else(|| panic!("{toml}: no {severity:?} at {key}: {f:?}"));
        for w in &words {
            assert!(hit.2.contains(w.as_str()), "{toml}: {:?} lacks {w:?}", hit.2);
        }
        assert!(f.iter().all(|(_, _, m)| !m.contains("s3cret") && !m.contains("t0ken")), "a secret in a finding: {f:?}");
    }
}

/// A receiver that records each request and answers with the next of `statuses` (the last
/// one again when they run out).
async fn recording_receiver(statuses: &'static [&'static str]) -> (std::net::SocketAddr, Arc<tokio::sync::Mutex<Vec<String>>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let got = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    tokio::spawn(async move {
        for i in 0.. {
            let Ok((mut c, _)) = l.accept().await else { break };
            let mut buf = vec![0u8; 8192];
            let n = c.read(&mut buf).await.unwrap_or(0);
            g.lock().await.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            let status = statuses[i.min(statuses.len() - 1)];
            let _ = c.write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes()).await;
        }
    });
    (addr, got)
}

/// The credentials go in the Authorization header, read from their file at each delivery
/// (a rotated password is used at once); a refusal says so without the secret.
#[tokio::test]
async fn credentials_are_read_at_each_delivery_and_never_in_an_error() {
    use base64::Engine as _;
    let d = Dir::new("creds");
    let pw = d.file("pw", "first-pw\n", 0o600);
    let (addr, got) = recording_receiver(&["200 OK", "200 OK", "401 Unauthorized"]).await;
    let cfg = WebhookCfg {
        timeout: Duration::from_secs(1),
        retries: 0,
        basic_auth: Some(BasicAuth { username: "sluice".into(), password_file: pw.clone() }),
        ..WebhookCfg::new(format!("http://{addr}/api/v2/alerts"))
    };
    let hook = Webhook::new(cfg).expect("webhook");
    let basic = |p: &str| base64::engine::general_purpose::STANDARD.encode(format!("sluice:{p}"));
    hook.post(b"[]").await.expect("delivered");
    d.file("pw", "second-pw\n", 0o600);
    hook.post(b"[]").await.expect("delivered");
    let e = hook.post(b"[]").await.expect_err("401");
    assert!(e.contains("HTTP 401") && e.contains("refused the credentials"), "{e}");
    assert!(!e.contains("second-pw") && !e.contains(&basic("second-pw")), "{e}");
    let got = got.lock().await;
    assert!(got[0].contains(&format!("authorization: Basic {}\r\n", basic("first-pw"))), "{}", got[0]);
    assert!(got[1].contains(&format!("authorization: Basic {}\r\n", basic("second-pw"))), "{}", got[1]);
    drop(got);
    // A password file made readable by others since the config was checked: refused at
    // delivery, naming the file, and nothing is sent.
    d.file("pw", "second-pw\n", 0o644);
    let e = hook.post(b"[]").await.expect_err("permissive file");
    assert!(e.contains("0644") && e.contains(&pw.display().to_string()) && !e.contains("second-pw"), "{e}");

    // A bearer token.
    let token = d.file("token", "tok-1\n", 0o600);
    let (addr, got) = recording_receiver(&["200 OK"]).await;
    let hook = Webhook::new(WebhookCfg { bearer_token_file: Some(token), ..WebhookCfg::new(format!("http://{addr}/")) }).expect("webhook");
    hook.post(b"[]").await.expect("delivered");
    assert!(got.lock().await[0].to_lowercase().contains("authorization: bearer tok-1"));
}

/// https:// to a receiver that does not speak TLS: the handshake fails and says so.
#[tokio::test]
async fn https_to_a_plain_receiver_fails_the_handshake() {
    let (addr, _) = recording_receiver(&["200 OK"]).await;
    let cfg = WebhookCfg { timeout: Duration::from_secs(2), retries: 0, ..WebhookCfg::new(format!("https://{addr}/")) };
    let e = tokio::time::timeout(Duration::from_secs(30), post(&cfg, b"[]")).await.expect("gives up").expect_err("not TLS");
    assert!(e.contains(&format!("TLS handshake with {addr} failed")) && e.contains("the system's CAs"), "{e}");
}

#[tokio::test]
async fn webhook_retries_then_delivers_and_gives_up_on_a_dead_receiver() {
    // A receiver that fails the first request with 500, then accepts.
    let (addr, got) = recording_receiver(&["500 Internal Server Error", "200 OK"]).await;
    let cfg = WebhookCfg { timeout: Duration::from_secs(1), retries: 2, ..WebhookCfg::new(format!("http://{addr}/api/v2/alerts")) };
    let body = serde_json::to_vec(&vec![alertmanager_json(&n(Status::Firing))]).expect("json");
    post(&cfg, &body).await.expect("delivered on the retry");
    let got = got.lock().await;
    assert_eq!(got.len(), 2);
    assert!(got[1].starts_with("POST /api/v2/alerts") && got[1].contains("SluiceBackendAtLimit"), "{}", got[1]);

    // Nobody listening: fails after its retries (the outer deadline only turns a hang into a
    // failure).
    let dead = WebhookCfg { timeout: Duration::from_millis(200), retries: 1, ..WebhookCfg::new("http://127.0.0.1:9/x") };
    let e = tokio::time::timeout(Duration::from_secs(30), post(&dead, &body)).await.expect("post gives up").expect_err("dead receiver");
    assert!(e.contains("after 2 attempts") && e.contains("connect"), "{e}");
    // A receiver that never answers: each attempt ends at the timeout, then the next one.
    let (addr, accepted) = hanging_receiver().await;
    let hanging = WebhookCfg { timeout: Duration::from_millis(200), retries: 1, ..WebhookCfg::new(format!("http://{addr}/x")) };
    let e = tokio::time::timeout(Duration::from_secs(30), post(&hanging, &body)).await.expect("post gives up").expect_err("hanging receiver");
    assert!(e.contains("timed out after 200ms") && e.contains("after 2 attempts"), "{e}");
    assert_eq!(accepted.load(Ordering::Relaxed), 2, "one connection per attempt");
}
