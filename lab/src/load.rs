//! `sluice lab load`: the lab's load generator. From every client namespace it opens
//! connections to the VIP at a steady rate (open loop, capped at `concurrency` in flight), sends
//! one HTTP request, reads the answer, optionally holds the connection open, and sorts the
//! outcome: ok, refused (a RST: the client sees ECONNREFUSED at once), timeout, or error.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use serde::Serialize;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::Semaphore,
};

use super::{vip, Lab, PORT};

#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// New connections per second, over all clients.
    pub rate: f64,
    /// Connections in flight at most (held ones included), over all clients.
    pub concurrency: usize,
    pub duration: Duration,
    /// Keep each connection open this long after its answer.
    pub hold: Duration,
    /// Ask the backend to answer this slowly.
    pub delay_ms: u64,
    /// Connect + answer must complete within this.
    pub timeout: Duration,
    pub v6: bool,
    /// Connect to these instead of the VIP (round robin): the benchmark's no-balancer baseline.
    pub targets: Vec<SocketAddr>,
}

/// Outcome counters, shared while the load runs (read them for live progress).
#[derive(Default)]
pub struct Counters {
    pub ok: AtomicU64,
    pub refused: AtomicU64,
    pub timeout: AtomicU64,
    pub error: AtomicU64,
    pub open: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
    backends: Mutex<std::collections::BTreeMap<String, u64>>,
    errors: Mutex<Vec<String>>,
    error_kinds: Mutex<std::collections::BTreeMap<String, u64>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub ok: u64,
    pub refused: u64,
    pub timeout: u64,
    pub error: u64,
    pub elapsed_s: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Answers per backend name.
    pub backends: std::collections::BTreeMap<String, u64>,
    /// The first few error messages.
    pub errors: Vec<String>,
    /// Errors by what the client saw ("closed before the answer", "read: … reset …", a status).
    pub error_kinds: std::collections::BTreeMap<String, u64>,
}

impl Counters {
    pub fn report(&self, elapsed: Duration) -> Report {
        let mut l = self.latencies_us.lock().expect("latencies").clone();
        l.sort_unstable();
        let pct = |p: f64| if l.is_empty() { 0.0 } else { l[((l.len() - 1) as f64 * p).round() as usize] as f64 / 1e3 };
        Report {
            ok: self.ok.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            timeout: self.timeout.load(Ordering::Relaxed),
            error: self.error.load(Ordering::Relaxed),
            elapsed_s: elapsed.as_secs_f64(),
            p50_ms: pct(0.5),
            p90_ms: pct(0.9),
            p99_ms: pct(0.99),
            max_ms: pct(1.0),
            backends: self.backends.lock().expect("backends").clone(),
            errors: self.errors.lock().expect("errors").clone(),
            error_kinds: self.error_kinds.lock().expect("error kinds").clone(),
        }
    }

    /// One line of progress.
    pub fn line(&self, elapsed: Duration) -> String {
        format!(
            "{:>5.1}s  ok {:>6}  refused {:>5}  timeout {:>4}  error {:>4}  open {:>5}",
            elapsed.as_secs_f64(),
            self.ok.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
            self.timeout.load(Ordering::Relaxed),
            self.error.load(Ordering::Relaxed),
            self.open.load(Ordering::Relaxed)
        )
    }
}

enum Outcome {
    Refused,
    Timeout,
    Error(String),
}

/// `(head, body)` once `buf` holds a whole HTTP/1.1 message (head and `content-length` body).
pub fn http_message(buf: &[u8]) -> Option<(String, String)> {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let len = head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").and_then(|v| v.trim().parse::<usize>().ok())).unwrap_or(0);
    (body.len() >= len).then(|| (head.to_owned(), body.to_owned()))
}

async fn one(addr: SocketAddr, delay_ms: u64) -> Result<(String, TcpStream), Outcome> {
    let mut s = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Err(Outcome::Refused),
        Err(e) => return Err(Outcome::Error(format!("connect: {e}"))),
    };
    let req = format!("GET /?delay_ms={delay_ms} HTTP/1.1\r\nHost: sluice-lab\r\n\r\n");
    s.write_all(req.as_bytes()).await.map_err(|e| Outcome::Error(format!("send: {e}")))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = s.read(&mut chunk).await.map_err(|e| Outcome::Error(format!("read: {e}")))?;
        if n == 0 {
            return Err(Outcome::Error("closed before the answer".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some((head, body)) = http_message(&buf) {
            if !head.starts_with("HTTP/1.1 200") {
                return Err(Outcome::Error(head.lines().next().unwrap_or("").to_owned()));
            }
            return Ok((body.trim().to_owned(), s));
        }
    }
}

/// Runs the load from every client namespace until `duration` has passed and every connection
/// finished; `counters` can be read meanwhile.
pub fn run(lab: &Lab, spec: &LoadSpec, counters: &Arc<Counters>) -> Result<Report> {
    let clients = lab.spec.clients;
    let started = Instant::now();
    let targets = if spec.targets.is_empty() { vec![SocketAddr::new(vip(spec.v6), PORT)] } else { spec.targets.clone() };
    std::thread::scope(|s| {
        let handles: Vec<_> = (1..=clients)
            .map(|c| {
                let counters = counters.clone();
                let spec = spec.clone();
                let targets = targets.clone();
                s.spawn(move || {
                    lab.run_in(&format!("cl{c}"), move || {
                        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                        rt.block_on(client_loop(&targets, spec, f64::from(clients), counters));
                        anyhow::Ok(())
                    })
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))??;
        }
        anyhow::Ok(())
    })?;
    Ok(counters.report(started.elapsed()))
}

async fn client_loop(targets: &[SocketAddr], spec: LoadSpec, share: f64, counters: Arc<Counters>) {
    let per_client = (spec.concurrency as f64 / share).ceil().max(1.0) as usize;
    let sem = Arc::new(Semaphore::new(per_client));
    let gap = Duration::from_secs_f64(share / spec.rate.max(0.001));
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut k: u32 = 0;
    loop {
        let due = start + gap * k;
        if due.duration_since(start) >= spec.duration {
            break;
        }
        tokio::time::sleep_until(due).await;
        k += 1;
        let Ok(permit) = sem.clone().acquire_owned().await else { break };
        let c = counters.clone();
        let addr = targets[k as usize % targets.len()];
        let (delay, hold, timeout) = (spec.delay_ms, spec.hold, spec.timeout);
        tasks.spawn(async move {
            let t0 = Instant::now();
            let res = match tokio::time::timeout(timeout, one(addr, delay)).await {
                Ok(r) => r,
                Err(_) => Err(Outcome::Timeout),
            };
            match res {
                Ok((name, stream)) => {
                    c.latencies_us.lock().expect("latencies").push(t0.elapsed().as_micros() as u64);
                    *c.backends.lock().expect("backends").entry(name).or_default() += 1;
                    c.ok.fetch_add(1, Ordering::Relaxed);
                    if !hold.is_zero() {
                        c.open.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(hold).await;
                        c.open.fetch_sub(1, Ordering::Relaxed);
                    }
                    drop(stream);
                }
                Err(Outcome::Refused) => {
                    c.refused.fetch_add(1, Ordering::Relaxed);
                }
                Err(Outcome::Timeout) => {
                    c.timeout.fetch_add(1, Ordering::Relaxed);
                }
                Err(Outcome::Error(e)) => {
                    c.error.fetch_add(1, Ordering::Relaxed);
                    *c.error_kinds.lock().expect("error kinds").entry(e.clone()).or_default() += 1;
                    let mut errs = c.errors.lock().expect("errors");
                    if errs.len() < 5 {
                        errs.push(e);
                    }
                }
            }
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}
