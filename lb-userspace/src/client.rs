//! The CLI's client for the control API (HTTP/1.1 over the daemon's Unix socket).

use std::path::Path;

use http_body_util::{BodyExt as _, Full};
use hyper::{body::Bytes, Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

use crate::Error;

/// Sends one request; returns the HTTP status and the JSON body.
pub async fn call(socket: &Path, method: Method, path: &str, body: Option<&Value>) -> Result<(u16, Value), Error> {
    let stream = UnixStream::connect(socket).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => Error::other(
            "the Sluice daemon is not running",
            anyhow::anyhow!("no control socket at {} (start it with `sluice run --config FILE`, or pass --socket)", socket.display()),
        ),
        std::io::ErrorKind::PermissionDenied => Error::Permission { action: "connecting to the control socket" },
        _ => Error::other(format!("connecting to {}", socket.display()), e),
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| Error::other("control API handshake", e))?;
    tokio::spawn(conn);
    let bytes = body.map(|b| serde_json::to_vec(b).expect("json")).unwrap_or_default();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "sluice")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .map_err(|e| Error::other("building the request", e))?;
    let resp = sender.send_request(req).await.map_err(|e| Error::other("control API request", e))?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(|e| Error::other("control API response", e))?.to_bytes();
    let value = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned())) };
    Ok((status, value))
}

/// [`call`], turning a non-2xx answer into an error carrying the daemon's message.
pub async fn ok(socket: &Path, method: Method, path: &str, body: Option<&Value>) -> Result<Value, Error> {
    let (status, value) = call(socket, method, path, body).await?;
    if (200..300).contains(&status) {
        Ok(value)
    } else {
        let msg = value.get("error").and_then(Value::as_str).map_or_else(|| value.to_string(), str::to_owned);
        Err(Error::other("the daemon refused the request", anyhow::anyhow!("{msg}")))
    }
}

/// Runs `f` on a small runtime (the CLI is synchronous).
pub fn block_on<T>(f: impl std::future::Future<Output = Result<T, Error>>) -> Result<T, Error> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| Error::other("starting the runtime", e))?.block_on(f)
}
