//! Probing the VIP as clients do: held connections (the clients' ground truth of what is open)
//! and short ones at a rate, each connection's fate recorded as its client saw it. The chaos,
//! flood and cluster scenarios run their load through here.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use rand::{rngs::StdRng, Rng as _, SeedableRng as _};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use anyhow::Result;

use crate::{load::http_message, Lab};

/// Held connections ask again this often (which also keeps their flows fresh).
const PING: Duration = Duration::from_millis(500);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The load a client namespace puts on the VIP.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    /// New short connections per second over all clients (each holds 0–1.5 s and asks 1–4 times).
    pub rate: f64,
    /// Connections each client holds open through the whole run.
    pub held_per_client: usize,
    /// Seeds each client's choice of how long its short connections stay.
    pub seed: u64,
}

/// The client namespaces' threads, each running [`client`].
pub struct Clients<'scope>(Vec<std::thread::ScopedJoinHandle<'scope, Result<Result<Vec<Conn>>>>>);

/// Starts `clients` clients (in namespaces `cl1`…), each on a thread of `scope` with a runtime
/// of its own, sharing `load` equally.
pub fn start<'scope>(scope: &'scope std::thread::Scope<'scope, '_>, lab: &'scope Lab, clients: u8, addr: SocketAddr, sh: &Arc<Shared>, load: Load) -> Clients<'scope> {
    Clients(
        (1..=clients)
            .map(|c| {
                let sh = sh.clone();
                scope.spawn(move || {
                    lab.run_in(&format!("cl{c}"), move || {
                        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                        anyhow::Ok(rt.block_on(client(c, addr, sh, load, f64::from(clients))))
                    })
                })
            })
            .collect(),
    )
}

impl Clients<'_> {
    /// Every client's connections, once each has finished (the run must have released them).
    pub fn join(self) -> Result<Vec<Conn>> {
        let mut conns = Vec::new();
        for h in self.0 {
            conns.extend(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))??);
        }
        Ok(conns)
    }
}

/// What happened to one connection, as its client saw it.
#[derive(Clone, Debug)]
pub enum Fate {
    Completed,
    Survived,
    Refused,
    ConnectFailed(String),
    Broken(String),
}

impl Fate {
    pub fn why(&self) -> &str {
        match self {
            Self::ConnectFailed(e) | Self::Broken(e) => e,
            _ => "",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Conn {
    pub held: bool,
    pub start: f64,
    pub end: f64,
    /// The backend that answered (`backend-N`), once one did.
    pub backend: Option<u8>,
    pub answers: u32,
    pub fate: Fate,
}

/// What the clients and the fault injector share.
pub struct Shared {
    pub t0: Instant,
    /// Held connections that got their first answer (or failed).
    pub opened: AtomicUsize,
    /// Start the short connections; stop them at `load_until_ms` after `t0`.
    pub go: AtomicBool,
    pub load_until_ms: AtomicU64,
    /// Clients whose short connections have all finished.
    pub short_done: AtomicUsize,
    /// Close the held connections.
    pub close: AtomicBool,
}

impl Shared {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            t0: Instant::now(),
            opened: AtomicUsize::new(0),
            go: AtomicBool::new(false),
            load_until_ms: AtomicU64::new(0),
            short_done: AtomicUsize::new(0),
            close: AtomicBool::new(false),
        })
    }

    pub fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }
}

/// However a run's scope is left (an early `?` included), its clients are released, or the scope
/// would wait for them for ever: the load ends (they read its end every round) and the held
/// connections close.
pub struct Release<'a>(pub &'a Shared);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.load_until_ms.store(1, Ordering::Relaxed);
        self.0.go.store(true, Ordering::Relaxed);
        self.0.close.store(true, Ordering::Relaxed);
    }
}

pub async fn request(s: &mut TcpStream) -> Result<String, String> {
    s.write_all(b"GET / HTTP/1.1\r\nHost: sluice-lab\r\n\r\n").await.map_err(|e| format!("send: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = s.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed by the peer".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some((head, body)) = http_message(&buf) {
            if !head.starts_with("HTTP/1.1 200") {
                return Err(head.lines().next().unwrap_or("").to_owned());
            }
            return Ok(body.trim().to_owned());
        }
    }
}

/// One connection: connect, ask, and ask again every `PING` until `keep` has passed (or, for a
/// held connection, until the run closes it).
async fn connection(addr: SocketAddr, sh: Arc<Shared>, held: bool, keep: Duration) -> Conn {
    let start = sh.now();
    let mut c = Conn { held, start, end: start, backend: None, answers: 0, fate: Fate::Completed };
    let connected = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err(Fate::Refused),
        // Linux reports a RST to the SYN as ECONNREFUSED; ECONNRESET means the handshake had
        // completed and the peer reset the connection before `connect` returned (a backend
        // killed with it in its accept queue). A broken connection, judged like the others.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Err(Fate::Broken(format!("reset right after the handshake: {e}"))),
        Ok(Err(e)) => Err(Fate::ConnectFailed(e.to_string())),
        Err(_) => Err(Fate::ConnectFailed(format!("no answer to the SYN within {CONNECT_TIMEOUT:?}"))),
    };
    let mut s = match connected {
        Ok(s) => s,
        Err(fate) => {
            c.fate = fate;
            c.end = sh.now();
            sh.opened.fetch_add(usize::from(held), Ordering::Relaxed);
            return c;
        }
    };
    let until = tokio::time::Instant::now() + keep;
    let mut first = true;
    loop {
        match tokio::time::timeout(REQUEST_TIMEOUT, request(&mut s)).await {
            Ok(Ok(name)) => {
                c.answers += 1;
                c.backend = name.strip_prefix("backend-").and_then(|n| n.parse().ok());
            }
            Ok(Err(e)) => c.fate = Fate::Broken(e),
            Err(_) => c.fate = Fate::Broken(format!("no answer within {REQUEST_TIMEOUT:?}")),
        }
        if held && first {
            sh.opened.fetch_add(1, Ordering::Relaxed);
            first = false;
        }
        if matches!(c.fate, Fate::Broken(_)) {
            break;
        }
        if held && sh.close.load(Ordering::Relaxed) {
            c.fate = Fate::Survived;
            break;
        }
        if !held && tokio::time::Instant::now() >= until {
            break;
        }
        tokio::time::sleep(PING).await;
    }
    c.end = sh.now();
    c
}

/// One client namespace: its held connections, then short connections at `rate` until the
/// load ends; then it waits for the held ones to be closed.
async fn client(idx: u8, addr: SocketAddr, sh: Arc<Shared>, opts: Load, share: f64) -> Vec<Conn> {
    let mut long_lived = tokio::task::JoinSet::new();
    for _ in 0..opts.held_per_client {
        long_lived.spawn(connection(addr, sh.clone(), true, Duration::ZERO));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while !sh.go.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut rng = StdRng::seed_from_u64(opts.seed ^ (u64::from(idx) << 32));
    let gap = Duration::from_secs_f64(share / opts.rate.max(0.1));
    let mut short = tokio::task::JoinSet::new();
    let mut out = Vec::new();
    let mut next = tokio::time::Instant::now();
    // Read each round: a run may end the load earlier than it first said (`lab cluster`).
    while sh.t0.elapsed() < Duration::from_millis(sh.load_until_ms.load(Ordering::Relaxed)) {
        tokio::time::sleep_until(next).await;
        next += gap;
        let hold = Duration::from_millis(rng.random_range(0..=1500));
        short.spawn(connection(addr, sh.clone(), false, hold));
        while let Some(r) = short.try_join_next() {
            out.push(joined(r));
        }
    }
    while let Some(r) = short.join_next().await {
        out.push(joined(r));
    }
    sh.short_done.fetch_add(1, Ordering::Relaxed);
    while let Some(r) = long_lived.join_next().await {
        out.push(joined(r));
    }
    out
}

/// A connection task's outcome. One that panicked takes its client down with it (and the run,
/// through [`Clients::join`]): a crashed client must not count as no connection at all.
fn joined(r: Result<Conn, tokio::task::JoinError>) -> Conn {
    match r {
        Ok(c) => c,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("a connection task did not finish: {e}"),
    }
}
