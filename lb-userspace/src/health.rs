//! Health checks: one task per backend that has a `health` table, TCP connect or HTTP GET with
//! an expected status, with rise/fall thresholds. Transitions are sent to the daemon, which
//! takes an unhealthy backend out of its service's ring (state `down`: its open flows keep
//! going) and puts it back when it is healthy again.
//!
//! A check that cannot run for a cause on this node — no route from it (its link is down),
//! no file descriptor or buffer left — is no verdict on the backend: it counts neither way,
//! the backend keeps its place in the ring, and the daemon alerts instead
//! (`SluiceHealthChecksCannotRun`). Taking every backend out of the ring because this node's
//! link went down would move flows to the wrong backend when it comes back.

use crate::key::BackendKey;
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
};

use crate::config::{Config, Health, HealthKind};

/// A backend changed health, or its checks stopped or started running again for a local cause.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub service: String,
    pub address: IpAddr,
    pub healthy: bool,
    /// What the last check saw, for the log and the journal.
    pub detail: String,
    pub kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `healthy` is a verdict on the backend (rise or fall checks in a row).
    Verdict,
    /// The checks cannot run for a cause on this node (`detail`); `healthy` is unchanged.
    LocalFailure,
    /// They run again.
    LocalRecovered,
}

/// What one check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok(String),
    Failed(String),
    /// It could not run for a cause on this node: no verdict on the backend.
    Local(String),
}

/// Errors of this node, not of the backend: no route (the node's link down), no file
/// descriptor, no buffer or memory, no local address.
fn local_cause(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENETUNREACH | libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL))
}

/// One check, with a failure of this node told apart from the backend's.
pub async fn check(target: SocketAddr, h: &Health) -> Outcome {
    match check_inner(target, h).await {
        Ok(d) => Outcome::Ok(d),
        Err((d, Some(e))) if local_cause(&e) => Outcome::Local(format!("{d} (a cause on this node)")),
        Err((d, _)) => Outcome::Failed(d),
    }
}

async fn check_inner(target: SocketAddr, h: &Health) -> Result<String, (String, Option<std::io::Error>)> {
    let connect = tokio::time::timeout(h.timeout, TcpStream::connect(target)).await;
    let mut stream = match connect {
        Err(_) => return Err((format!("TCP connect to {target} timed out after {:?}", h.timeout), None)),
        Ok(Err(e)) => return Err((format!("TCP connect to {target}: {e}"), Some(e))),
        Ok(Ok(s)) => s,
    };
    if h.kind == HealthKind::Tcp {
        return Ok(format!("TCP connect to {target} succeeded"));
    }
    let path = h.path.as_deref().unwrap_or("/");
    let req = format!("GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: sluice-health\r\nConnection: close\r\n\r\n", target.ip());
    let exchange = async {
        stream.write_all(req.as_bytes()).await?;
        let mut buf = vec![0u8; 512];
        let n = stream.read(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    let head = match tokio::time::timeout(h.timeout, exchange).await {
        Err(_) => return Err((format!("HTTP GET {path} on {target} timed out after {:?}", h.timeout), None)),
        Ok(Err(e)) => return Err((format!("HTTP GET {path} on {target}: {e}"), None)),
        Ok(Ok(s)) => s,
    };
    let status: Option<u16> = head.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok());
    match status {
        Some(s) if s == h.expect_status => Ok(format!("HTTP GET {path} on {target}: {s}")),
        Some(s) => Err((format!("HTTP GET {path} on {target}: status {s}, expected {}", h.expect_status), None)),
        None => Err((format!("HTTP GET {path} on {target}: no HTTP status line in the answer"), None)),
    }
}

/// The checks that run, by (service, backend), with the settings they run with.
#[derive(Default)]
pub struct Checks {
    tasks: BTreeMap<BackendKey, (Health, SocketAddr, JoinHandle<()>)>,
}

impl Checks {
    /// Starts, restarts or stops checks so they match `cfg`. A backend starts healthy (it is in
    /// the ring until `fall` checks fail in a row) unless it is in `down` (from before a
    /// restart), then it needs `rise` good checks.
    pub fn sync(&mut self, cfg: &Config, tx: &mpsc::UnboundedSender<Transition>, down: &std::collections::BTreeSet<BackendKey>) {
        let mut wanted = BTreeMap::new();
        for s in &cfg.services {
            for b in &s.backends {
                if let Some(h) = &b.health {
                    let target = SocketAddr::new(b.address, h.port.unwrap_or(s.port));
                    wanted.insert(BackendKey::new(s.name.clone(), b.address), (h.clone(), target));
                }
            }
        }
        self.tasks.retain(|k, (h, t, task)| {
            let keep = wanted.get(k).is_some_and(|(wh, wt)| wh == h && wt == t);
            if !keep {
                task.abort();
            }
            keep
        });
        for (k, (h, target)) in wanted {
            if self.tasks.contains_key(&k) {
                continue;
            }
            let task = tokio::spawn(run(k.service.clone(), k.address, target, h.clone(), !down.contains(&k), tx.clone()));
            self.tasks.insert(k, (h, target, task));
        }
    }
}

impl Drop for Checks {
    fn drop(&mut self) {
        for (_, _, t) in self.tasks.values() {
            t.abort();
        }
    }
}

async fn run(service: String, address: IpAddr, target: SocketAddr, h: Health, mut healthy: bool, tx: mpsc::UnboundedSender<Transition>) {
    let (mut ok_run, mut fail_run) = (0u32, 0u32);
    let mut local = false;
    let mut tick = tokio::time::interval(h.interval.max(Duration::from_millis(10)));
    let send = |healthy: bool, detail: String, kind: Kind| {
        let _ = tx.send(Transition { service: service.clone(), address, healthy, detail, kind });
    };
    loop {
        tick.tick().await;
        let outcome = check(target, &h).await;
        if local && !matches!(outcome, Outcome::Local(_)) {
            local = false;
            // A good run before the local failure is stale; failures still count (checks that
            // alternate between a local failure and a real one must still reach `fall`).
            ok_run = 0;
            send(healthy, "health checks run again".into(), Kind::LocalRecovered);
        }
        match outcome {
            Outcome::Ok(detail) => {
                fail_run = 0;
                ok_run += 1;
                if !healthy && ok_run >= h.rise {
                    healthy = true;
                    send(healthy, detail, Kind::Verdict);
                }
            }
            Outcome::Failed(detail) => {
                ok_run = 0;
                fail_run += 1;
                if healthy && fail_run >= h.fall {
                    healthy = false;
                    send(healthy, detail, Kind::Verdict);
                }
            }
            Outcome::Local(detail) => {
                if !local {
                    local = true;
                    send(healthy, detail, Kind::LocalFailure);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    fn http_server(status: &'static str) -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let mut buf = [0u8; 512];
                let n = c.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                let status = if req.starts_with("GET /healthz ") { status } else { "404 Not Found" };
                let _ = c.write_all(format!("HTTP/1.0 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes());
            }
        });
        addr
    }

    fn health(kind: HealthKind, path: Option<&str>) -> Health {
        Health { kind, interval: Duration::from_millis(100), timeout: Duration::from_millis(500), port: None, path: path.map(Into::into), expect_status: 200, rise: 1, fall: 1 }
    }

    #[tokio::test]
    async fn http_checks_expect_the_status_on_the_path() {
        let ok = http_server("200 OK");
        assert!(matches!(check(ok, &health(HealthKind::Http, Some("/healthz"))).await, Outcome::Ok(_)), "200 on /healthz");
        let Outcome::Failed(e) = check(ok, &health(HealthKind::Http, Some("/other"))).await else { panic!("404 is a failure") };
        assert!(e.contains("status 404, expected 200"), "{e}");
        let failing = http_server("503 Service Unavailable");
        let Outcome::Failed(e) = check(failing, &health(HealthKind::Http, Some("/healthz"))).await else { panic!("503 is a failure") };
        assert!(e.contains("503"), "{e}");
    }

    #[tokio::test]
    async fn tcp_checks_need_a_listener() {
        let ok = http_server("200 OK");
        assert!(matches!(check(ok, &health(HealthKind::Tcp, None)).await, Outcome::Ok(_)), "connect");
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        // Refused is the backend's answer, not a cause on this node.
        let Outcome::Failed(e) = check(closed, &health(HealthKind::Tcp, None)).await else { panic!("refused is a failure") };
        assert!(e.contains("TCP connect"), "{e}");
    }
}
