use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;

fn app() -> Router {
    Router::new()
        .route("/", axum::routing::get(|| async { "hello" }))
        .route("/big", axum::routing::get(|| async { vec![b'x'; 16 << 20] }))
        .route("/body", axum::routing::post(|b: axum::body::Bytes| async move { b.len().to_string() }))
}

async fn start(limits: Limits) -> (std::net::SocketAddr, Arc<Listener>, CancellationToken, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let me = Listener::new("test", addr.to_string(), limits);
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve(l, app(), me.clone(), None, stop.clone()));
    (addr, me, stop, task)
}

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes()).await.expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}

/// Reads until the server closes (EOF or reset); what it said before.
async fn until_closed(s: &mut tokio::net::TcpStream) -> String {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

const LIMITS: Limits = Limits { max_connections: 2, header_timeout: Duration::from_millis(300), request_timeout: Some(Duration::from_millis(500)) };

#[tokio::test]
async fn over_the_limit_is_refused_and_counted_and_idle_ones_time_out() {
    let (addr, me, stop, task) = start(LIMITS).await;
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Two served (idle); the third is told 503 and closed at once.
    let mut third = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let said = tokio::time::timeout(Duration::from_millis(200), until_closed(&mut third)).await.expect("closed at once");
    assert!(said.starts_with("HTTP/1.1 503"), "{said}");
    // The idle ones are closed at the header timeout, which frees their slots.
    for mut s in idle {
        tokio::time::timeout(Duration::from_secs(2), until_closed(&mut s)).await.expect("closed at the header timeout");
    }
    assert!(get(addr, "/").await.ends_with("hello"));
    let r = me.report();
    assert_eq!((r.refused, r.timed_out, r.accepted, r.max_connections), (1, 2, 3, 2), "{r:?}");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(2), task).await.expect("stops").expect("task");
    assert_eq!(me.report().open, 0);
}

#[tokio::test]
async fn a_slow_loris_and_a_slow_body_are_closed() {
    let (addr, me, stop, task) = start(LIMITS).await;
    // A header byte every 100 ms: never complete within 300 ms.
    let mut loris = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let trickle = async {
        for b in b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: 1\r\n" {
            if loris.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the whole head went out: the trickle was not cut");
    };
    tokio::time::timeout(Duration::from_secs(3), trickle).await.expect("cut within the header timeout");
    // A head at once, then a body that never completes: the request timeout answers 408.
    let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"POST /body HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nabc").await.expect("write");
    let said = tokio::time::timeout(Duration::from_secs(2), until_closed(&mut slow)).await.expect("closed");
    assert!(said.starts_with("HTTP/1.1 408"), "{said}");
    assert_eq!(me.report().timed_out, 2);
    stop.cancel();
    task.await.expect("task");
}

#[tokio::test]
async fn a_client_that_does_not_read_the_answer_is_dropped() {
    let (addr, me, stop, task) = start(LIMITS).await;
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n").await.expect("write");
    // Reads nothing: the 16 MiB answer fills both socket buffers and the writes stall.
    let deadline = Instant::now() + Duration::from_secs(5);
    while me.report().timed_out == 0 {
        assert!(Instant::now() < deadline, "a stalled answer held the connection: {:?}", me.report());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(me.report().open, 0);
    drop(s);
    stop.cancel();
    task.await.expect("task");
}

#[tokio::test]
async fn accept_failures_are_counted_and_serving_goes_on() {
    /// Fails its first accepts with EMFILE.
    struct Failing(tokio::net::TcpListener, std::sync::atomic::AtomicU32);
    impl Accept for Failing {
        type Io = tokio::net::TcpStream;
        async fn accept_io(&self) -> io::Result<Self::Io> {
            if self.1.fetch_add(1, Ordering::Relaxed) < 3 {
                return Err(io::Error::from_raw_os_error(libc::EMFILE));
            }
            self.0.accept_io().await
        }
    }
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let me = Listener::new("test", addr.to_string(), LIMITS);
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve(Failing(l, 0.into()), app(), me.clone(), None, stop.clone()));
    assert!(get(addr, "/").await.ends_with("hello"));
    assert_eq!(me.report().accept_errors, 3);
    stop.cancel();
    task.await.expect("task");
}
