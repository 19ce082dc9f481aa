//! The control API's client (HTTP/1.1 over the daemon's Unix socket), for the CLI and the lab:
//! [`Client`] sends the `api` types and reads them back.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use http_body_util::{BodyExt as _, Full};
use hyper::{body::Bytes, Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

use serde::{de::DeserializeOwned, Serialize};

use crate::{api, explain::Explanation, Error};

/// The read-only socket's name beside the root one (`daemon.read_socket`, e.g.
/// `/run/sluice/sluice-read.sock`): where a user the root socket refuses is connected instead.
pub const READ_SOCKET_NAME: &str = "sluice-read.sock";

/// Connects to `socket`; if it refuses this user (EACCES) and a read-only socket
/// ([`READ_SOCKET_NAME`]) is beside it, to that one instead, saying nothing: reads answer as
/// on the root socket, a change is refused by the daemon with a message naming the root socket.
async fn connect(socket: &Path) -> Result<UnixStream, Error> {
    let denied = |e: &std::io::Error| e.kind() == std::io::ErrorKind::PermissionDenied;
    let e = match UnixStream::connect(socket).await {
        Ok(s) => return Ok(s),
        Err(e) => e,
    };
    let read = socket.with_file_name(READ_SOCKET_NAME);
    if !denied(&e) || read == socket || !read.exists() {
        return Err(connect_error(socket, e));
    }
    match UnixStream::connect(&read).await {
        Ok(s) => Ok(s),
        Err(r) if denied(&r) => Err(Error::other(
            format!("permission denied while connecting to the control socket {} (root only) and to the read-only socket {}", socket.display(), read.display()),
            anyhow::anyhow!("run sluice as root, or for reads as a member of {}", group_of(&read)),
        )),
        Err(r) => Err(connect_error(&read, r)),
    }
}

/// The group a socket admits (`daemon.read_socket_group`), by name if it has one.
fn group_of(socket: &Path) -> String {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(socket).map_or_else(
        |_| "its group (daemon.read_socket_group)".to_owned(),
        |m| format!("the group {}", nix::unistd::Group::from_gid(m.gid().into()).ok().flatten().map_or_else(|| m.gid().to_string(), |g| g.name)),
    )
}

/// One sentence for a failed connection to `socket`.
fn connect_error(socket: &Path, e: std::io::Error) -> Error {
    use std::os::unix::fs::MetadataExt as _;
    match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => Error::other(
            "the Sluice daemon is not running",
            anyhow::anyhow!("no control socket at {} (start it with `sluice run --config FILE`, or pass --socket)", socket.display()),
        ),
        // A socket open to a group (or named so) is a read-only one: say which group it admits.
        std::io::ErrorKind::PermissionDenied if socket.file_name().is_some_and(|n| n == READ_SOCKET_NAME) || std::fs::metadata(socket).is_ok_and(|m| m.mode() & 0o060 != 0) => {
            Error::other(
                format!("permission denied while connecting to the read-only socket {}", socket.display()),
                anyhow::anyhow!("it admits root and {} only: run sluice as root, or as a member of that group", group_of(socket)),
            )
        }
        std::io::ErrorKind::PermissionDenied => Error::Permission { action: "connecting to the control socket" },
        _ => Error::other(format!("connecting to {}", socket.display()), e),
    }
}

/// Sends one request; returns the HTTP status and the JSON body.
async fn call(socket: &Path, method: Method, path: &str, body: Option<&Value>) -> Result<(u16, Value), Error> {
    let stream = connect(socket).await?;
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
async fn ok(socket: &Path, method: Method, path: &str, body: Option<&Value>) -> Result<Value, Error> {
    let (status, value) = call(socket, method, path, body).await?;
    if (200..300).contains(&status) {
        Ok(value)
    } else {
        let msg = serde_json::from_value::<api::ApiErrorBody>(value.clone()).map_or_else(|_| value.to_string(), |b| b.error);
        Err(Error::other("the daemon refused the request", anyhow::anyhow!("{msg}")))
    }
}

/// The daemon behind a control socket.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self { socket: socket.into() }
    }

    /// Sends `body` (if any) and reads the answer as a `T`; a refusal is an error carrying the
    /// daemon's message.
    async fn send<T: DeserializeOwned>(&self, method: Method, path: &str, body: Option<&impl Serialize>) -> Result<T, Error> {
        let body = body.map(|b| serde_json::to_value(b).expect("api types serialize"));
        let value = ok(&self.socket, method, path, body.as_ref()).await?;
        serde_json::from_value(value).map_err(|e| Error::other(format!("reading the daemon's answer to {path} (is the daemon of another version?)"), e))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        self.send(Method::GET, path, None::<&()>).await
    }

    pub async fn status(&self) -> Result<api::StatusReport, Error> {
        self.get("/v1/status").await
    }

    pub async fn services(&self) -> Result<Vec<api::ServiceReport>, Error> {
        self.get("/v1/services").await
    }

    pub async fn apply(&self, req: &api::ApplyRequest) -> Result<api::ApplyResponse, Error> {
        self.send(Method::POST, "/v1/config/apply", Some(req)).await
    }

    /// `action`: add, remove, drain, undrain, set-limit.
    pub async fn backend(&self, service: &str, address: IpAddr, action: &str, req: &api::BackendRequest) -> Result<api::ApplyResponse, Error> {
        self.send(Method::POST, &format!("/v1/services/{service}/backends/{address}/{action}"), Some(req)).await
    }

    pub async fn explain(&self, q: &api::ExplainQuery) -> Result<Explanation, Error> {
        self.get(&format!("/v1/explain?src={}&dst={}&proto={}", q.src, q.dst, q.proto.name()).replace('[', "%5B").replace(']', "%5D")).await
    }

    pub async fn events(&self, q: &api::EventsQuery) -> Result<Vec<crate::events::Event>, Error> {
        self.get(&format!("/v1/events?after={}&limit={}", q.after, q.limit)).await
    }

    pub async fn raise(&self, req: &api::RaiseRequest) -> Result<api::ApplyResponse, Error> {
        self.send(Method::POST, "/v1/limits/raise", Some(req)).await
    }

    pub async fn review(&self) -> Result<api::Review, Error> {
        self.get("/v1/review").await
    }

    pub async fn history(&self, service: &str, backend: Option<IpAddr>) -> Result<api::HistoryReport, Error> {
        match backend {
            Some(b) => self.get(&format!("/v1/history/{service}/{b}")).await,
            None => self.get(&format!("/v1/history/{service}")).await,
        }
    }

    pub async fn drain(&self, req: &api::DrainRequest) -> Result<api::DrainReport, Error> {
        self.send(Method::POST, "/v1/node/drain", Some(req)).await
    }

    pub async fn undrain(&self) -> Result<crate::announce::Status, Error> {
        self.send(Method::POST, "/v1/node/undrain", None::<&()>).await
    }
}

/// Runs `f` on a small runtime (the CLI is synchronous).
pub fn block_on<T>(f: impl std::future::Future<Output = Result<T, Error>>) -> Result<T, Error> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| Error::other("starting the runtime", e))?.block_on(f)
}
