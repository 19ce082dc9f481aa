//! The status page in a real browser (issue 30): a lab whose one backend is at its limit
//! (`max_conns` lowered from 4 to 2 with `--force` under 3 open connections, one of them then
//! closed, one more client refused), the alerts firing; headless Chromium (Debian's) opens
//! `http://127.0.0.1:9477/` inside the load balancer's namespace and runs the page's script:
//! the DOM marks the backend AT LIMIT, shows the alert naming `max_conns`, the refusal and the
//! forced change, and has refreshed by itself (rates need a second sample). `/status.json`
//! parses as the daemon's own type and says open == max_conns. Screenshots (desktop and phone
//! sizes) go to `target/status-page.png` and `target/status-page-phone.png`.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::PathBuf,
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use lb_userspace::statuspage::Page;
use nix::sys::signal::Signal;
use sluice_tests::{
    l2lab::{wait_for, Lab},
    netns::spawn_tied,
    pki::bcrypt_hash,
};

const BACKEND: &str = "10.70.0.11";
const USER: &str = "operator";
const PASSWORD: &str = "look-at-the-load-balancer";

/// Writes the lab's config with `max_conns` and the web config (basic auth) for the listener.
fn write_config(lab: &Lab, max_conns: u32) {
    let alerts = "[alerts]\nname = \"lb-status\"\nfire_after = \"1s\"\nresolve_after = \"30s\"\n";
    lab.write_config_with(&[(1, &format!("max_conns = {max_conns}"))], alerts);
    let text = std::fs::read_to_string(&lab.config).expect("config");
    let web = lab.dir.join("web.yml");
    std::fs::write(&lab.config, text.replacen("[daemon]\n", &format!("[daemon]\nmetrics_web_config = \"{}\"\n", web.display()), 1)).expect("config");
}

/// `GET path` from the metrics listener in the load balancer's namespace, with the basic auth
/// credentials or without: (head, body).
fn get(lab: &Lab, path: &str, auth: bool) -> (String, String) {
    let credentials = if auth { format!("Authorization: Basic {}\r\n", base64(format!("{USER}:{PASSWORD}").as_bytes())) } else { String::new() };
    lab.lb.run(|| {
        let mut s = TcpStream::connect("127.0.0.1:9477").expect("metrics listener");
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{credentials}\r\n").as_bytes()).expect("request");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("response");
        let (head, body) = text.split_once("\r\n\r\n").expect("a response");
        (head.to_owned(), body.to_owned())
    })
}

fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() { char::from(ABC[(n >> (18 - 6 * i)) as usize & 63]) } else { '=' });
        }
    }
    out
}

fn status(lab: &Lab) -> Page {
    let (head, body) = get(lab, "/status.json", true);
    assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
    assert!(head.to_ascii_lowercase().contains("content-type: application/json"), "{head}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status.json does not parse ({e}): {body}"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"), PathBuf::from)
}

/// Runs headless Chromium in the load balancer's namespace with `args` on the page, with its own
/// profile and home in `profile`; killed if it has not finished in a minute.
fn chromium(lab: &Lab, profile: &std::path::Path, args: &[&str]) -> Output {
    let mut cmd = lab.lb.command("chromium");
    cmd.args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check", "--disable-background-networking"])
        .arg(format!("--user-data-dir={}", profile.join("profile").display()))
        // The page refreshes every 2 s: 5 s of virtual time lets it fetch at least twice.
        .arg("--virtual-time-budget=5000")
        .args(args)
        // The credentials in the address, as a bookmark may hold them.
        .arg(format!("http://{USER}:{PASSWORD}@127.0.0.1:9477/"))
        .env("HOME", profile)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = spawn_tied(&mut cmd).expect("chromium (Debian's chromium; `cargo xtask setup` installs it)");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(out) = rx.recv_timeout(Duration::from_mins(1)) else {
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        panic!("chromium {args:?} did not finish in a minute");
    };
    let out = out.expect("chromium's output");
    assert!(out.status.success(), "chromium {args:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    out
}

/// The element of `dom` whose start tag holds `marker` (e.g. an attribute), up to its matching
/// closing tag (elements of the same tag inside it counted).
fn element<'a>(dom: &'a str, tag: &str, marker: &str) -> &'a str {
    let at = dom.find(marker).unwrap_or_else(|| panic!("the DOM has no {marker}:\n{dom}"));
    let (open, close) = (format!("<{tag}"), format!("</{tag}>"));
    let start = dom[..at].rfind(&open).expect("the element's start");
    let (mut depth, mut i) = (0usize, start);
    loop {
        let next_open = dom[i + 1..].find(&open).map(|o| i + 1 + o);
        let next_close = dom[i + 1..].find(&close).map(|c| i + 1 + c).expect("the element's end");
        match next_open {
            Some(o) if o < next_close && dom[o + open.len()..].starts_with([' ', '>']) => {
                depth += 1;
                i = o;
            }
            Some(o) if o < next_close => i = o,
            _ if depth == 0 => return &dom[start..next_close + close.len()],
            _ => {
                depth -= 1;
                i = next_close;
            }
        }
    }
}

/// Text only: tags dropped, the entities the DOM serializer writes decoded.
fn text(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                out.push(' ');
            }
            _ if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&quot;", "\"").replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
}

#[test]
fn chromium_shows_the_backend_at_its_limit_and_the_alert_naming_max_conns() {
    assert_eq!(base64(b"sluice:pw"), "c2x1aWNlOnB3");
    assert_eq!(base64(b"ab"), "YWI=");
    let started = Instant::now();
    let lab = Lab::new(1);
    // The listener asks for a password: the page is protected as /metrics is.
    std::fs::write(lab.dir.join("web.yml"), format!("basic_auth_users:\n  {USER}: '{}'\n", bcrypt_hash(PASSWORD))).expect("web.yml");
    write_config(&lab, 4);
    let mut daemon = lab.start_daemon();
    for path in ["/", "/status.json", "/metrics"] {
        let (head, _) = get(&lab, path, false);
        assert!(head.starts_with("HTTP/1.1 401") || head.starts_with("HTTP/1.0 401"), "{path} without credentials: {head}");
    }

    // Three clients hold connections; max_conns is lowered to 2 below them: the guard refuses,
    // the operator forces it (both journaled); one client leaves, and the backend is at 2 of 2.
    let mut held: Vec<TcpStream> = (0..3).map(|_| lab.connect().expect("a connection under the limit").1).collect();
    write_config(&lab, 2);
    let config = lab.config.to_str().expect("utf-8");
    let (code, out, err) = lab.ctl(&["config", "apply", config]);
    assert_ne!(code, 0, "the guard refuses a limit below the open connections: {out}{err}");
    let (code, out, err) = lab.ctl(&["config", "apply", "--force", config]);
    assert_eq!(code, 0, "{out}{err}");
    drop(held.pop());
    wait_for("2 open connections", || status(&lab).services[0].backends[0].open == 2);
    let refused = lab.connect().map(|_| ()).map_err(|e| e.kind());
    assert_eq!(refused, Err(std::io::ErrorKind::ConnectionRefused), "a third client is refused with a RST");
    wait_for("SluiceBackendAtLimit firing", || status(&lab).alerts.iter().any(|a| a.alertname == "SluiceBackendAtLimit"));

    // /status.json: the daemon's own type, the backend at its limit, the alert, the refusal and
    // the forced change.
    let page = status(&lab);
    let b = &page.services[0].backends[0];
    assert_eq!(b.address.to_string(), BACKEND);
    assert!(b.open == 2 && b.max_conns == 2 && b.at_limit && (b.saturation - 1.0).abs() < 1e-9, "{b:?}");
    assert_eq!(b.refused.get("backend_limit"), Some(&1), "{b:?}");
    let at_limit = page.alerts.iter().find(|a| a.alertname == "SluiceBackendAtLimit").expect("at-limit alert");
    assert!(at_limit.description.contains("max_conns") && at_limit.summary.contains(BACKEND), "{at_limit:?}");
    assert!(page.events.last().is_some_and(|e| e.reason == "backend_limit" && e.backend.is_some_and(|a| a.to_string() == BACKEND)), "{:?}", page.events);
    assert!(page.journal.iter().any(|j| j.summary.contains("--force")), "{:?}", page.journal);
    assert!(page.journal.iter().any(|j| j.summary.contains("refused by the guard")), "{:?}", page.journal);

    // The page itself: HTML with a policy that loads nothing from elsewhere.
    let (head, html) = get(&lab, "/", true);
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("content-type: text/html") && lower.contains("content-security-policy: default-src 'none'"), "{head}");
    assert!(html.contains("status.json"), "{html}");

    // In the browser, after its scripts ran for 5 s of virtual time.
    let tmp = lab.dir.join("chromium");
    std::fs::create_dir_all(&tmp).expect("chromium's home");
    let t = Instant::now();
    let dom = String::from_utf8(chromium(&lab, &tmp, &["--dump-dom"]).stdout).expect("utf-8 DOM");
    println!("chromium --dump-dom: {:.1} s", t.elapsed().as_secs_f64());
    let row = element(&dom, "tr", &format!("data-backend=\"web/{BACKEND}\""));
    assert!(row.contains("class=\"at-limit\"") && row.contains("AT LIMIT"), "the backend's row is not marked AT LIMIT:\n{row}");
    let row_text = text(row);
    assert!(row_text.contains("2 / 2") && row_text.contains("backend_limit 1"), "{row_text}");
    let alert = text(element(&dom, "div", "data-alert=\"SluiceBackendAtLimit\""));
    assert!(alert.contains("max_conns") && alert.contains(BACKEND) && alert.contains("2 of 2"), "the alert's text on the page: {alert}");
    // What the page shows: the DOM without the script's own text (its string literals would
    // match anything).
    let shown = match (dom.find("<script>"), dom.find("</script>")) {
        (Some(a), Some(b)) => format!("{}{}", &dom[..a], &dom[b..]),
        _ => panic!("the page's script is gone from the DOM:\n{dom}"),
    };
    let all = text(&shown);
    assert!(all.contains("SluiceRefusingConnections"), "{all}");
    assert!(all.contains("backend_limit") && all.contains("FORCED") && all.contains("REFUSED BY THE GUARD"), "the refusal, the refused and the forced change: {all}");
    assert!(all.contains("standalone") && all.contains("not used (no [cluster.limits]"), "the node: {all}");
    assert!(all.contains("forwarded") && all.contains("refused_rst"), "the datapath's outcomes: {all}");
    // It fetched /status.json again by itself: rates need a second sample.
    let meta = text(element(&dom, "span", "id=\"meta\""));
    assert!(meta.contains("updated ") && !meta.contains("rates after the next sample"), "no second sample: {meta}");
    assert!(element(&dom, "div", "id=\"error\"").contains("hidden"), "the page could not read status.json: {all}");

    // Screenshots for people (and the README): a desktop window and a phone's.
    let target = target_dir();
    std::fs::create_dir_all(&target).expect("target dir");
    for (name, size) in [("status-page.png", "1200,900"), ("status-page-phone.png", "390,1400")] {
        let png = target.join(name);
        let _ = std::fs::remove_file(&png);
        chromium(&lab, &tmp, &[&format!("--screenshot={}", png.display()), &format!("--window-size={size}"), "--hide-scrollbars"]);
        let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000, "{} is not a screenshot", png.display());
        println!("screenshot: {}", png.display());
    }

    drop(held);
    let out = daemon.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    lab.detach();
    println!("status page test: {:.1} s", started.elapsed().as_secs_f64());
}
