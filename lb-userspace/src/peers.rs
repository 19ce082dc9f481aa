//! Counts that follow the flows: the peer channel between the nodes of a cluster.
//!
//! When the router rehashes (a node joins, leaves, is drained or fails), some flows arrive at a
//! node that has no entry for them; it adopts them (mid-stream, same backend: every node builds
//! the same rings) and counts a slot. The node they left still holds their entry and slot until
//! its idle timeout (2 h when established), and would refuse connections for a backend it
//! believes fuller than it is. So each node tells its peers, about once a second, which flows it
//! adopted and how long ago; a peer holding one of them releases its slot and drops the entry if
//! its last packet there came before the adoption (the flow has moved; a flow that still arrives
//! there is left alone). The GC's own compare-and-swaps make it exact: a slot is given back once.
//!
//! The channel: HTTP POST `/v1/peer/moved` on `cluster.peer_listen`, JSON, with a timestamp
//! and a message identity checked against replays, authenticated by either or both of:
//! - mutual TLS (`cluster.tls`): each node has its own certificate from the cluster's CA; a
//!   sender's message must name a node its certificate is for (a DNS name in its subject
//!   alternative names), and a sender checks the receiver's certificate against the address it
//!   connects to (an IP address in its names). Encrypted: the 5-tuples are not in clear, and a
//!   message cannot be captured on the wire to be replayed.
//! - HMAC-SHA256 over the body and a key every node shares (`cluster.peer_key_file`): plaintext,
//!   for a lab or a trusted network. With TLS it adds a second, independent check (a node must
//!   also hold the cluster's key, not only a certificate from a CA that may sign other things);
//!   it is optional there.
//!
//! A peer that cannot be reached gets the batch again each second for a minute (a node
//! restarting or coming back learns what moved meanwhile).

use std::{
    collections::VecDeque,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    body::Bytes,
    extract::State as AxState,
    http::{HeaderMap, StatusCode},
    routing::post,
    Router,
};
use hmac::{Hmac, Mac as _};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{daemon::Daemon, Error};
pub use crate::{
    gc::adopted_since,
    status::peers::{Batch, Moved, Stats},
};

pub const HEADER: &str = "x-sluice-hmac";
/// A message older (or newer) than this is refused: a replay, or clocks too far apart.
const MAX_SKEW: Duration = Duration::from_mins(1);
/// How long undelivered batches are kept for a peer.
const KEEP: Duration = Duration::from_mins(1);
/// Flows per message.
const BATCH: usize = 5000;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Message {
    node: String,
    /// Wall clock at sending, ms since the epoch (replay and skew check).
    sent_ms: u64,
    flows: Vec<Moved>,
    /// The sender reaches etcd (its last round of `[cluster.limits]` succeeded).
    #[serde(default)]
    etcd: bool,
    /// Per backend, the most connections the sender may hold from now on: its open ones or
    /// its limit, whichever is larger. Without etcd a node never raises a limit, so the number
    /// only falls; the allocator reserves it for a node whose lease is gone (`limits.rs`).
    /// `None` from a version that does not say.
    #[serde(default)]
    holds: Option<crate::shares::Holds>,
}

/// Per backend, the most connections this node may hold from now on: `max(open, limit)`.
fn holds_now(daemon: &Daemon) -> crate::shares::Holds {
    daemon.read(|st| {
        let mut out = crate::shares::Holds::new();
        for s in st.applied().services.values() {
            for b in s.backends.values().filter(|b| !b.removed) {
                out.insert(crate::shares::key(&s.name, b.address), st.open(b.id).max(u64::from(b.limit)));
            }
        }
        out
    })
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// How this node authenticates the peer channel: the shared key, mutual TLS, or both.
#[derive(Clone)]
pub struct Credentials {
    pub key: Option<Arc<Vec<u8>>>,
    pub tls: Option<crate::tls::Mutual>,
    /// The peers' addresses (`cluster.peers`): with TLS, a sender's certificate must name one,
    /// so a certificate the same CA gave another host (etcd's, say) cannot speak as a node.
    pub peers: Arc<Vec<std::net::IpAddr>>,
}

impl Credentials {
    /// Reads `cluster.peer_key_file` and `cluster.tls` (checked private).
    pub fn load(cfg: &crate::config::ClusterCfg) -> Result<Self, Error> {
        Ok(Self {
            key: cfg.peer_key_file.as_deref().map(read_key).transpose()?.map(Arc::new),
            tls: cfg.tls.as_ref().map(|t| crate::tls::Mutual::load(t, "cluster.tls")).transpose()?,
            peers: Arc::new(cfg.peers.iter().map(SocketAddr::ip).collect()),
        })
    }
}

/// Reads the shared key (at least 16 bytes; a trailing newline is not part of it); refused if
/// others than its owner may read it.
pub fn read_key(path: &Path) -> Result<Vec<u8>, Error> {
    crate::tls::check_private(path, "cluster.peer_key_file")?;
    let key = std::fs::read(path).map_err(|e| Error::other(format!("reading cluster.peer_key_file {}", path.display()), e))?;
    let key = key.strip_suffix(b"\n").unwrap_or(&key).to_vec();
    if key.len() < 16 {
        return Err(Error::other(
            format!("cluster.peer_key_file {}", path.display()),
            anyhow::anyhow!("the key has {} bytes; use at least 16 (e.g. `head -c 32 /dev/urandom | base64 > FILE`)", key.len()),
        ));
    }
    Ok(key)
}

/// The HMAC-SHA256 of `body` under `key`, in hex: the `x-sluice-hmac` header.
pub fn sign(key: &[u8], body: &[u8]) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(body);
    m.finalize().into_bytes().iter().fold(String::new(), |mut s, b| {
        use std::fmt::Write as _;
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn verify(key: &[u8], body: &[u8], hex: &str) -> bool {
    let Some(tag) = (0..hex.len()).step_by(2).map(|i| hex.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect::<Option<Vec<u8>>>() else { return false };
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(body);
    // Constant-time comparison.
    m.verify_slice(&tag).is_ok()
}

/// Sends each batch of adopted flows to every peer, keeping what a peer did not take for
/// `KEEP` and trying again every second. Each peer has a task of its own, with its own queue
/// and tick: a peer that does not answer (a failed node still in `cluster.peers`, its packets
/// dropped: 3 s per try) delays only what goes to it. With one loop for all, every round
/// waited for the slowest peer and took one batch: in the limits lab, with n3 failed, the
/// slots of flows that moved between n1 and n2 were released 3–6 s late, and half the
/// cluster's capacity was counted for connections the backend no longer held.
#[expect(clippy::too_many_arguments, reason = "the sender's inputs, each from another part of the daemon")]
pub fn spawn_sender(
    node: String,
    peers: Vec<SocketAddr>,
    creds: Credentials,
    daemon: Daemon,
    stats: Arc<Mutex<Stats>>,
    etcd_ok: Arc<std::sync::atomic::AtomicBool>,
    mut rx: mpsc::UnboundedReceiver<Batch>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut feeds = Vec::new();
        let mut tasks = Vec::new();
        for peer in peers {
            let (tx, peer_rx) = mpsc::unbounded_channel();
            feeds.push(tx);
            let to = To { peer, node: node.clone(), creds: creds.clone(), daemon: daemon.clone(), stats: stats.clone(), etcd_ok: etcd_ok.clone() };
            tasks.push(tokio::spawn(to.run(peer_rx, stop.clone())));
        }
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                got = rx.recv() => match got {
                    Some((at, flows)) if !flows.is_empty() => {
                        for f in &feeds {
                            let _ = f.send((at, flows.clone()));
                        }
                    }
                    Some(_) => {}
                    None => break,
                },
            }
        }
        drop(feeds);
        for t in tasks {
            let _ = t.await;
        }
    })
}

/// One peer's end of the sender.
struct To {
    peer: SocketAddr,
    node: String,
    creds: Credentials,
    daemon: Daemon,
    stats: Arc<Mutex<Stats>>,
    etcd_ok: Arc<std::sync::atomic::AtomicBool>,
}

impl To {
    /// Delivers each batch as it comes (with every batch that came meanwhile), and a heartbeat
    /// after a second without one.
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Batch>, stop: CancellationToken) {
        let mut queue: VecDeque<Batch> = VecDeque::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                got = rx.recv() => match got {
                    Some(b) => queue.push_back(b),
                    None => break,
                },
                _ = tick.tick() => {}
            }
            while let Ok(b) = rx.try_recv() {
                queue.push_back(b);
            }
            let etcd = self.etcd_ok.load(std::sync::atomic::Ordering::Relaxed);
            // Read before sending: it only falls while this node lacks etcd, so the peer gets
            // an upper bound however long the message takes.
            let holds = holds_now(&self.daemon);
            let error = deliver(self.peer, &self.node, &self.creds, &mut queue, &self.daemon, &self.stats, etcd, &holds).await;
            tick.reset();
            let key = self.peer.to_string();
            let mut s = self.stats.lock().expect("stats");
            s.pending.retain(|(p, _)| *p != key);
            let pending = queue.iter().filter(|(_, f)| !f.is_empty()).count();
            if pending > 0 {
                s.pending.push((key.clone(), pending));
                s.pending.sort();
            }
            match error {
                Some(e) if s.peer_errors.get(&key) != Some(&e) => {
                    tracing::warn!("peer channel: {e} (kept for a minute and sent again)");
                    s.peer_errors.insert(key, e.clone());
                    s.last_error = Some(e);
                }
                Some(_) => {}
                None => {
                    s.peer_errors.remove(&key);
                    s.last_error = s.peer_errors.values().next().cloned();
                }
            }
        }
    }
}

/// Sends a peer its queued batches, oldest first, until one fails (kept for the next round).
/// With nothing queued, an empty message: the heartbeat that says whether this node reaches etcd
/// and what it may hold.
#[expect(clippy::too_many_arguments, reason = "one delivery's inputs, each from the sender's loop")]
async fn deliver(
    peer: SocketAddr,
    node: &str,
    creds: &Credentials,
    q: &mut VecDeque<Batch>,
    daemon: &Daemon,
    stats: &Arc<Mutex<Stats>>,
    etcd: bool,
    holds: &crate::shares::Holds,
) -> Option<String> {
    q.retain(|(at, _)| at.elapsed() < KEEP);
    if q.is_empty() {
        q.push_back((std::time::Instant::now(), Vec::new()));
    }
    while let Some((at, flows)) = q.front() {
        // Ages grow while a batch waits.
        let waited = at.elapsed().as_millis() as u64;
        let empty: &[Moved] = &[];
        let chunks: Vec<&[Moved]> = if flows.is_empty() { vec![empty] } else { flows.chunks(BATCH).collect() };
        for chunk in chunks {
            let msg = Message {
                node: node.to_owned(),
                sent_ms: now_ms(),
                flows: chunk.iter().map(|m| Moved { ago_ms: m.ago_ms + waited, ..*m }).collect(),
                etcd,
                holds: Some(holds.clone()),
            };
            match send(peer, creds, &msg).await {
                // A flow the peer still receives moved back there after this node adopted it
                // (the router rehashed again): this node's entry is the stale one.
                Ok(answer) => {
                    let (released, _, _, _) = daemon.settle_moved(&answer.active);
                    let closed = daemon.release_closed(&answer.closed);
                    stats.lock().expect("stats").released += released + closed;
                }
                Err(e) => return Some(format!("peer {peer}: {e}")),
            }
        }
        q.pop_front();
    }
    None
}

async fn send(peer: SocketAddr, creds: &Credentials, msg: &Message) -> Result<Answer, String> {
    let body = serde_json::to_vec(msg).map_err(|e| e.to_string())?;
    let mut req = hyper::Request::post("/v1/peer/moved").header("host", peer.to_string()).header("content-type", "application/json");
    if let Some(key) = &creds.key {
        req = req.header(HEADER, sign(key, &body));
    }
    let req = req.body(http_body_util::Full::new(Bytes::from(body))).map_err(|e| e.to_string())?;
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(peer).await.map_err(|e| format!("connect: {e}"))?;
        match &creds.tls {
            None => exchange(stream, req).await,
            Some(tls) => {
                // The receiver's certificate must be for the address this node connects to.
                let name = rustls::pki_types::ServerName::IpAddress(peer.ip().into());
                let stream = tokio_rustls::TlsConnector::from(tls.client.clone())
                    .connect(name, stream)
                    .await
                    .map_err(|e| format!("TLS: {}", crate::tls::reason_in(&e).unwrap_or_else(|| e.to_string())))?;
                exchange(stream, req).await
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(3), exchange).await.map_err(|_| "no answer within 3 s".to_owned())?
}

/// One request on a fresh connection, and its answer.
async fn exchange<Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static>(io: Io, req: hyper::Request<http_body_util::Full<Bytes>>) -> Result<Answer, String> {
    use http_body_util::BodyExt as _;
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let text = resp.into_body().collect().await.map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned()).unwrap_or_default();
        if status.is_success() {
            Ok(serde_json::from_str(&text).unwrap_or_default())
        } else {
            Err(format!("{status}: {text}"))
        }
    }
}

#[derive(Clone)]
struct Receiver {
    daemon: Daemon,
    creds: Credentials,
    stats: Arc<Mutex<Stats>>,
    /// Identities (the MAC, or the body's SHA-256) of the messages taken within the skew
    /// window, with their `sent_ms`: the same message twice is a replay (a retry is a new
    /// message: its timestamp differs).
    seen: Arc<Mutex<std::collections::HashMap<String, u64>>>,
}

/// Serves `/v1/peer/moved` on `listen` within `me`'s bounds (`listen.rs`: a flood of idle or
/// slow connections is refused and timed out, counted) until `stop`.
pub async fn serve(
    listen: SocketAddr,
    creds: Credentials,
    daemon: Daemon,
    stats: Arc<Mutex<Stats>>,
    me: Arc<crate::listen::Listener>,
    stop: CancellationToken,
) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| Error::other(format!("binding the peer channel on {listen} (cluster.peer_listen)"), e))?;
    tracing::info!(%listen, "peer channel listening");
    let app = Router::new().route("/v1/peer/moved", post(moved)).layer(axum::extract::DefaultBodyLimit::max(4 << 20)).with_state(Receiver {
        daemon,
        creds: creds.clone(),
        stats,
        seen: Arc::default(),
    });
    crate::listen::serve(listener, app, me, creds.tls.map(|t| t.server), stop).await;
    Ok(())
}

async fn moved(AxState(r): AxState<Receiver>, cert: Option<axum::Extension<crate::listen::PeerCert>>, headers: HeaderMap, body: Bytes) -> (StatusCode, String) {
    let refuse = |code: StatusCode, why: String| {
        r.stats.lock().expect("stats").refused += 1;
        tracing::warn!("peer channel: refused a message: {why}");
        (code, why)
    };
    let id = match &r.creds.key {
        Some(key) => {
            let Some(tag) = headers.get(HEADER).and_then(|v| v.to_str().ok()) else { return refuse(StatusCode::UNAUTHORIZED, format!("no {HEADER} header")) };
            if !verify(key, &body, tag) {
                return refuse(StatusCode::UNAUTHORIZED, "the HMAC does not match (another cluster.peer_key_file?)".into());
            }
            // As verify reads it: a tag in other letter case is the same message.
            tag.to_ascii_lowercase()
        }
        None => sign(b"message identity", &body),
    };
    let msg: Message = match serde_json::from_slice(&body) {
        Ok(m) => m,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("malformed: {e}")),
    };
    if r.creds.tls.is_some() {
        // The TLS layer verified the certificate against the cluster's CA; it must also be
        // this node's: a node cannot speak for another.
        match &cert {
            Some(c) if !crate::tls::cert_is_for(&c.0 .0, &msg.node) => {
                return refuse(StatusCode::FORBIDDEN, format!("the message says it is from node {:?}, and the client certificate is not for that name", msg.node))
            }
            Some(c) if !r.creds.peers.iter().any(|ip| crate::tls::cert_is_for(&c.0 .0, &ip.to_string())) => {
                return refuse(StatusCode::FORBIDDEN, format!("the client certificate of {:?} names none of cluster.peers' addresses: not a peer of this node", msg.node))
            }
            Some(_) => {}
            None => return refuse(StatusCode::UNAUTHORIZED, "no client certificate (cluster.tls)".into()),
        }
    }
    let now = now_ms();
    let window = MAX_SKEW.as_millis() as u64;
    if now.abs_diff(msg.sent_ms) > window {
        return refuse(StatusCode::BAD_REQUEST, format!("sent {} ms away from this node's clock (a replay, or clocks apart)", now.abs_diff(msg.sent_ms)));
    }
    {
        let mut seen = r.seen.lock().expect("seen");
        seen.retain(|_, sent| now.abs_diff(*sent) <= 2 * window);
        if seen.insert(id, msg.sent_ms).is_some() {
            drop(seen);
            return refuse(StatusCode::CONFLICT, "the same message again: a replay".into());
        }
    }
    let (released, ignored, active, closed) = r.daemon.settle_moved(&msg.flows);
    let mut s = r.stats.lock().expect("stats");
    if msg.etcd {
        s.etcd_seen.insert(msg.node.clone(), std::time::Instant::now());
    } else {
        s.etcd_seen.remove(&msg.node);
    }
    if let Some(h) = msg.holds {
        s.holds_seen.insert(msg.node.clone(), (std::time::Instant::now(), h));
    }
    s.released += released;
    s.ignored += ignored;
    s.still_here += active.len() as u64;
    drop(s);
    if released > 0 {
        tracing::info!(peer = %msg.node, released, "released the slots of flows that moved to a peer");
    }
    // The flows that still arrive here go back to the sender: its entry is the stale one.
    let answer = Answer { released, ignored, active, closed };
    (StatusCode::OK, serde_json::to_string(&answer).unwrap_or_default())
}

/// A receiver's answer: what it did, and the reported flows whose packets arrive there, with
/// how long ago their last packet came (`ago_ms`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Answer {
    pub released: u64,
    pub ignored: u64,
    pub active: Vec<Moved>,
    /// Reported flows that had closed here (a FIN seen): what the sender adopted was a late
    /// packet of a finished connection, and its entry must not hold a slot for 2 h.
    #[serde(default)]
    pub closed: Vec<Moved>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_verify_only_with_the_key_and_body() {
        let key = b"0123456789abcdef0123";
        let tag = sign(key, b"body");
        assert!(verify(key, b"body", &tag));
        assert!(!verify(key, b"bodY", &tag));
        assert!(!verify(b"another key of 16+ bytes", b"body", &tag));
        assert!(!verify(key, b"body", "zz"));
    }

    #[test]
    fn keys_are_read_and_checked() {
        let dir = std::env::temp_dir().join(format!("sluice-peers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let private = |f: &str| std::fs::set_permissions(dir.join(f), std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
        std::fs::write(dir.join("short"), "abc\n").expect("write");
        private("short");
        let e = read_key(&dir.join("short")).expect_err("too short").to_string();
        assert!(e.contains("3 bytes") && e.contains("peer_key_file"), "{e}");
        std::fs::write(dir.join("good"), "0123456789abcdef0123\n").expect("write");
        let e = read_key(&dir.join("good")).expect_err("0644: readable by others").to_string();
        assert!(e.contains("0644") && e.contains("chmod 600"), "{e}");
        private("good");
        assert_eq!(read_key(&dir.join("good")).expect("key"), b"0123456789abcdef0123");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
