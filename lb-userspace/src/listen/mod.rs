//! Serving HTTP on the daemon's listeners (`/metrics`, the peer channel, the control socket) so
//! that no flood of connections can starve the daemon.
//!
//! Without bounds, every connection a client opens and leaves idle holds one of the daemon's
//! file descriptors (and a task and buffers) for as long as the client likes: 1,100 of them
//! under a 1024 open-file limit and the daemon's health checks, journal and control socket
//! fail with EMFILE. So each listener:
//! - serves at most `max_connections` at once; one over the limit is accepted and closed at
//!   once (with a `503` if the socket takes it without waiting), and counted — never left in
//!   the kernel's backlog nor queued;
//! - closes a connection whose request head is not complete within the header timeout from
//!   its opening or from its previous answer: a silent (idle) connection, or a slow-loris
//!   trickling its headers, is closed and counted;
//! - on the TCP listeners, bounds each request after its head (reading its body, computing the
//!   answer, and the client taking the answer: no byte taken for that long) by the request
//!   timeout, and closes the connection past it (counted);
//! - keeps accepting when `accept` fails (EMFILE, ENFILE, ENOBUFS): it counts, logs at most
//!   every 10 s, waits 100 ms and goes on.
//!
//! The limits of every listener, plus what the rest of the daemon needs, fit under the
//! process's open-file limit (`openfiles.rs` raises it and warns at start when they do not).

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{response::IntoResponse as _, Router};
use futures::FutureExt as _;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio_util::sync::CancellationToken;

/// What one connection may read as request head and buffer (hyper's read buffer).
const MAX_BUF: usize = 64 << 10;
/// Wait after a failed accept (EMFILE…) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// A failing accept is logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// What a connection over the limit is told before it is closed.
const BUSY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-type: text/plain\r\ncontent-length: 52\r\n\r\nthis listener serves its maximum of connections now\n";

/// A listener's bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more are closed at once.
    pub max_connections: u32,
    /// The request head must be complete within this from the connection's opening or from its
    /// previous answer.
    pub header_timeout: Duration,
    /// After the head: the body read and the answer computed within this, and no write of the
    /// answer waiting longer than this. `None`: unbounded (the control socket, where a drain
    /// waits for traffic to stop).
    pub request_timeout: Option<Duration>,
}

/// One listener: its name and address, its bounds, and what it counted.
pub struct Listener {
    name: &'static str,
    address: String,
    limits: Limits,
    open: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    timed_out: AtomicU64,
    accept_errors: AtomicU64,
    handshake_failures: AtomicU64,
    /// When a failed accept, a refusal and a failed handshake were last logged.
    last_logged: Mutex<Option<Instant>>,
    refusal_logged: Mutex<Option<Instant>>,
    handshake_logged: Mutex<Option<Instant>>,
}

/// A listener's counts (`sluice status --json`, `/metrics`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerReport {
    /// `control`, `metrics`, `peer`.
    pub name: String,
    pub address: String,
    pub max_connections: u32,
    /// Connections served now.
    pub open: u64,
    /// Connections taken to be served, since the daemon started.
    pub accepted: u64,
    /// Connections closed at once because `max_connections` were served.
    pub refused: u64,
    /// Connections closed by the header or the request timeout.
    pub timed_out: u64,
    /// Accepts that failed (e.g. EMFILE: no file descriptor left).
    pub accept_errors: u64,
    /// TLS handshakes that failed: no certificate, one from another CA, expired, or not TLS.
    #[serde(default)]
    pub handshake_failures: u64,
}

impl Listener {
    pub fn new(name: &'static str, address: String, limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            name,
            address,
            limits,
            open: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            handshake_failures: AtomicU64::new(0),
            last_logged: Mutex::new(None),
            refusal_logged: Mutex::new(None),
            handshake_logged: Mutex::new(None),
        })
    }

    pub fn report(&self) -> ListenerReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ListenerReport {
            name: self.name.to_owned(),
            address: self.address.clone(),
            max_connections: self.limits.max_connections,
            open: get(&self.open),
            accepted: get(&self.accepted),
            refused: get(&self.refused),
            timed_out: get(&self.timed_out),
            accept_errors: get(&self.accept_errors),
            handshake_failures: get(&self.handshake_failures),
        }
    }

    fn refused_one(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let mut last = self.refusal_logged.lock().expect("refusal_logged");
        if last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            *last = Some(Instant::now());
            tracing::warn!(
                listener = self.name,
                address = %self.address,
                "serving its maximum of {} connections: closing more at once (counted in sluice_listener_connections_refused_total; logged at most every {LOG_EVERY:?})",
                self.limits.max_connections
            );
        }
    }

    fn handshake_failed(&self, e: &io::Error) {
        self.handshake_failures.fetch_add(1, Ordering::Relaxed);
        let mut last = self.handshake_logged.lock().expect("handshake_logged");
        if last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            *last = Some(Instant::now());
            let reason = crate::tls::reason_in(e).unwrap_or_else(|| e.to_string());
            tracing::warn!(
                listener = self.name,
                address = %self.address,
                "a TLS handshake failed: {reason}; the connection is closed (counted in sluice_listener_tls_handshake_failures_total; logged at most every {LOG_EVERY:?})"
            );
        }
    }

    fn accept_failed(&self, e: &io::Error) {
        self.accept_errors.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last_logged.lock().expect("last_logged");
        if last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            *last = Some(Instant::now());
            let hint = if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) { " (the daemon is out of file descriptors: see `sluice status`, open files)" } else { "" };
            tracing::error!(listener = self.name, address = %self.address, "accepting a connection failed: {e}{hint}; still serving, retrying every {ACCEPT_BACKOFF:?}");
        }
    }
}

/// What the daemon's listeners accept from: a TCP listener or the control socket's.
pub trait Accept: Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept_io(&self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept_io(&self) -> io::Result<Self::Io> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept_io(&self) -> io::Result<Self::Io> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// Errors of one connection that went away before it was accepted: nothing to wait for.
fn gone_before_accept(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionRefused | io::ErrorKind::Interrupted)
        || e.raw_os_error() == Some(libc::EPROTO)
}

/// Serves `app` on `listener` within `me`'s bounds until `stop`; then closes idle connections,
/// lets those in a request finish, and returns once every connection is closed.
/// With `tls`, every connection is a TLS one (its handshake within the header timeout; a
/// failed one is counted and logged with its reason).
pub async fn serve<A: Accept>(listener: A, app: Router, me: Arc<Listener>, tls: Option<Arc<rustls::ServerConfig>>, stop: CancellationToken) {
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let permits = Arc::new(tokio::sync::Semaphore::new(me.limits.max_connections as usize));
    let app = match me.limits.request_timeout {
        Some(t) => with_request_timeout(app, t, me.clone()),
        None => app,
    };
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(me.limits.header_timeout).max_buf_size(MAX_BUF);
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            a = listener.accept_io() => a,
        };
        let io = match accepted {
            Ok(io) => io,
            Err(e) if gone_before_accept(&e) => continue,
            Err(e) => {
                // EMFILE and the like: the connection stays in the backlog; try again shortly
                // (a level-triggered listener would spin otherwise).
                me.accept_failed(&e);
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            me.refused_one();
            refuse(io);
            continue;
        };
        me.accepted.fetch_add(1, Ordering::Relaxed);
        me.open.fetch_add(1, Ordering::Relaxed);
        let (http, app, me, stop, tls) = (http.clone(), app.clone(), me.clone(), stop.clone(), tls.clone());
        tokio::spawn(async move {
            let _open = Open(&me, permit);
            let io = Stalls::new(io, me.limits.request_timeout);
            let Some(tls) = tls else {
                return connection(io, &http, app, &me, &stop).await;
            };
            // The handshake is bounded like a request head: a client that opens and stays
            // silent, or trickles its hello, is closed at the header timeout.
            match tokio::time::timeout(me.limits.header_timeout, tls.accept(io)).await {
                Ok(Ok(io)) => {
                    let cert = io.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| PeerCert(c.clone().into_owned()));
                    let app = match cert {
                        Some(cert) => app.layer(axum::Extension(cert)),
                        None => app,
                    };
                    connection(io, &http, app, &me, &stop).await;
                }
                Ok(Err(e)) => me.handshake_failed(&e),
                Err(_) => {
                    me.timed_out.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    // Every connection gives its permit back when it closes.
    let _ = permits.acquire_many(me.limits.max_connections).await;
}

/// Serves one connection until it closes, or gracefully at `stop`.
async fn connection<Io: AsyncRead + AsyncWrite + Unpin + Send + 'static>(io: Io, http: &hyper::server::conn::http1::Builder, app: Router, me: &Listener, stop: &CancellationToken) {
    let conn = http.serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        if e.is_timeout() || stalled(&e) {
            me.timed_out.fetch_add(1, Ordering::Relaxed);
        } else {
            tracing::debug!(listener = me.name, "connection: {e}");
        }
    }
}

/// The certificate a TLS client presented (verified against the listener's CA), in each
/// request's extensions: the peer channel ties a node's messages to its certificate.
#[derive(Clone, Debug)]
pub struct PeerCert(pub rustls::pki_types::CertificateDer<'static>);

/// A connection being served: counted open, holding its permit, until dropped (also when its
/// task is aborted).
struct Open<'a>(&'a Listener, #[expect(dead_code, reason = "held until the connection closes")] tokio::sync::OwnedSemaphorePermit);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Tells a connection over the limit so if its socket takes it without waiting, and closes it.
fn refuse<Io: AsyncWrite + Unpin>(mut io: Io) {
    let _ = io.write(BUSY).now_or_never();
}

/// Bounds each request after its head, body and answer included, by `t`: past it, a `408`
/// that closes the connection (counted as timed out).
fn with_request_timeout(app: Router, t: Duration, me: Arc<Listener>) -> Router {
    app.layer(axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
        let me = me.clone();
        async move {
            let Ok(resp) = tokio::time::timeout(t, next.run(req)).await else {
                me.timed_out.fetch_add(1, Ordering::Relaxed);
                return (axum::http::StatusCode::REQUEST_TIMEOUT, [(axum::http::header::CONNECTION, "close")], format!("the request took longer than {t:?}\n")).into_response();
            };
            resp
        }
    }))
}

/// The error a stalled write ends a connection with.
#[derive(Debug)]
struct Stalled(Duration);

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the client took no byte of the answer for {:?}", self.0)
    }
}

impl std::error::Error for Stalled {}

/// Whether a connection ended because its client stopped taking the answer.
fn stalled(e: &hyper::Error) -> bool {
    // An io::Error's `source` skips the error it wraps: look inside each one.
    let is_stall = |s: &(dyn std::error::Error + 'static)| {
        s.is::<Stalled>() || s.downcast_ref::<io::Error>().and_then(io::Error::get_ref).is_some_and(<dyn std::error::Error + Send + Sync>::is::<Stalled>)
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if is_stall(s) {
            return true;
        }
        source = s.source();
    }
    false
}

/// A connection's I/O whose writes fail once none has made progress for `limit`: a client
/// that stops reading the answer (its window at zero) cannot hold the connection forever.
struct Stalls<Io> {
    io: Io,
    limit: Option<Duration>,
    since: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<Io> Stalls<Io> {
    fn new(io: Io, limit: Option<Duration>) -> Self {
        Self { io, limit, since: None }
    }

    /// After a write that did not complete: an error once the writes have waited `limit`.
    fn check(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(limit) = self.limit else { return Poll::Pending };
        let sleep = self.since.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, Stalled(limit)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn after(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match r {
            Poll::Pending => self.check(cx),
            ready @ Poll::Ready(_) => {
                self.since = None;
                ready
            }
        }
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Stalls<Io> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Stalls<Io> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.after(cx, r)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.after(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
