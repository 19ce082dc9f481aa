//! The control API: JSON over HTTP on a Unix socket (mode 0600, so root only). The CLI is a
//! client of it (`client.rs`). A handler only translates: each calls one [`Daemon`] method and
//! answers with its result, a type from `types.rs` that the client reads back. Every change
//! goes through the daemon's one change path, so a request that fails changes nothing.
//!
//! With `daemon.read_socket`, the same router also answers on a second socket, mode 0660 and
//! owned by `daemon.read_socket_group`, behind [`read_only`]: every GET answers, every other
//! method is refused with a 403 naming the root socket (HAProxy's stats socket levels).

use std::{
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use axum::{
    extract::{Path as UrlPath, Query, State as AxState},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use tokio::net::UnixListener;

use crate::{
    daemon::{Daemon, Refused},
    explain::Explanation,
    Error,
};

pub use crate::wire::*;

/// An error response: status and a message that says what to do.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ApiErrorBody { error: self.1 })).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        Self(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
    }
}

impl From<Refused> for ApiError {
    fn from(r: Refused) -> Self {
        let status = match r {
            Refused::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refused::NotFound(_) => StatusCode::NOT_FOUND,
            Refused::Conflict(_) => StatusCode::CONFLICT,
            Refused::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        };
        Self(status, r.to_string())
    }
}

type Answer<T> = Result<Json<T>, ApiError>;

async fn get_status(AxState(d): AxState<Daemon>) -> Answer<StatusReport> {
    Ok(Json(d.status()?))
}

async fn get_services(AxState(d): AxState<Daemon>) -> Answer<Vec<ServiceReport>> {
    Ok(Json(d.services()?))
}

async fn post_config_apply(AxState(d): AxState<Daemon>, Json(req): Json<ApplyRequest>) -> Answer<ApplyResponse> {
    Ok(Json(d.apply_config(req).await?))
}

async fn get_review(AxState(d): AxState<Daemon>) -> Json<Review> {
    Json(d.review())
}

async fn get_history(AxState(d): AxState<Daemon>, UrlPath(service): UrlPath<String>) -> Answer<HistoryReport> {
    Ok(Json(d.history(&service, None)?))
}

async fn get_history_backend(AxState(d): AxState<Daemon>, UrlPath((service, address)): UrlPath<(String, IpAddr)>) -> Answer<HistoryReport> {
    Ok(Json(d.history(&service, Some(address))?))
}

/// `POST /v1/services/{service}/backends/{address}/{action}`: add, remove, drain, undrain,
/// set-limit.
async fn post_backend(
    AxState(d): AxState<Daemon>,
    UrlPath((service, address, action)): UrlPath<(String, IpAddr, String)>,
    body: Option<Json<BackendRequest>>,
) -> Answer<ApplyResponse> {
    Ok(Json(d.edit_backend(&service, address, &action, body.map(|b| b.0).unwrap_or_default()).await?))
}

async fn get_explain(AxState(d): AxState<Daemon>, Query(q): Query<ExplainQuery>) -> Answer<Explanation> {
    Ok(Json(d.explain(&q)?))
}

async fn post_raise(AxState(d): AxState<Daemon>, Json(req): Json<RaiseRequest>) -> Answer<ApplyResponse> {
    Ok(Json(d.raise_limit(req).await?))
}

async fn get_events(AxState(d): AxState<Daemon>, Query(q): Query<EventsQuery>) -> Json<Vec<crate::events::Event>> {
    Json(d.events(&q))
}

async fn post_drain(AxState(d): AxState<Daemon>, body: Option<Json<DrainRequest>>) -> Answer<DrainReport> {
    Ok(Json(d.drain(body.map(|b| b.0).unwrap_or_default()).await?))
}

async fn post_undrain(AxState(d): AxState<Daemon>) -> Answer<crate::announce::Status> {
    Ok(Json(d.undrain().await?))
}

/// The API's routes. Reads are GET, every change is POST: [`read_only`] lets GET (and HEAD)
/// through and nothing else, so a GET must never change what the daemon does. Each is a read:
/// - `/v1/status`, `/v1/services`: the config, the applied tables and the datapath's counters,
///   looked up (the `&mut` they take is the map handles', not a write).
/// - `/v1/explain`: looks the flow up in the flow table and the ring; inserts nothing.
/// - `/v1/review`, `/v1/history/…`: the config and the in-memory load history.
/// - `/v1/events`: moves sampled refusal events from the kernel's ring buffer into the
///   daemon's window, as the main loop does whenever the buffer wakes it, and may bring forward
///   the alert evaluation that loop would run (at most once per `MIN_EVAL_GAP`, as for a
///   refusal): what the daemon does is the same, only sooner. `after` is the caller's cursor;
///   reading consumes nothing another reader would see.
pub fn router(daemon: Daemon) -> Router {
    Router::new()
        .route("/v1/node/drain", post(post_drain))
        .route("/v1/node/undrain", post(post_undrain))
        .route("/v1/events", get(get_events))
        .route("/v1/limits/raise", post(post_raise))
        .route("/v1/status", get(get_status))
        .route("/v1/services", get(get_services))
        .route("/v1/config/apply", post(post_config_apply))
        .route("/v1/services/{service}/backends/{address}/{action}", post(post_backend))
        .route("/v1/explain", get(get_explain))
        .route("/v1/review", get(get_review))
        .route("/v1/history/{service}", get(get_history))
        .route("/v1/history/{service}/{address}", get(get_history_backend))
        .layer(axum::extract::DefaultBodyLimit::max(1 << 20))
        .with_state(daemon)
}

/// The router of the read-only socket: `app` (the one API router, not a copy) behind a layer
/// that lets GET and HEAD through and answers anything else with a 403 and `refusal`, before
/// the request reaches a handler (or is even routed): nothing changes.
pub fn read_only(app: Router, refusal: String) -> Router {
    let refusal: std::sync::Arc<str> = refusal.into();
    app.layer(axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
        let refusal = refusal.clone();
        async move {
            if matches!(*req.method(), axum::http::Method::GET | axum::http::Method::HEAD) {
                next.run(req).await
            } else {
                ApiError(StatusCode::FORBIDDEN, refusal.to_string()).into_response()
            }
        }
    }))
}

/// What the read-only socket answers to a change: where changes go.
pub fn read_only_refusal(read: &Path, root: &Path) -> String {
    format!("this is the read-only socket {}: changes go through the root socket {} (as root: sluice --socket {} …)", read.display(), root.display(), root.display())
}

/// Binds the control socket, root only (0600) from the moment it appears at `path`.
///
/// `bind` creates the socket with the umask's mode; a `chmod` after it leaves a window in which
/// anyone may connect (and a reader may see the wrong mode). So the socket is bound inside a
/// private 0700 directory beside `path`, set to 0600 there, and renamed into place: `rename` is
/// atomic, so `path` never names a socket with another mode. A directory the daemon creates for
/// it (`/run/sluice`) is 0700 (0710 for the group of a read-only socket in it: [`bind_read`]).
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    bind_as(path, 0o600, None, "the control socket", "daemon.control_socket")
}

/// Binds the read-only socket (`daemon.read_socket`): as [`bind`], but mode 0660 and owned by
/// `group` (`daemon.read_socket_group`) from the moment it appears. Its directory must let the
/// group reach it. The daemon's own directory (the root socket's `root`'s, e.g. the
/// `/run/sluice` that [`bind`] or systemd's `RuntimeDirectoryMode=0700` made 0700, or one it
/// creates now) becomes 0710 and the group's: the group can reach the sockets but not list
/// them, and the root socket stays 0600. Any other directory, or a parent, that keeps the
/// group out is an error naming it: the daemon does not loosen a directory that is not its own.
pub fn bind_read(path: &Path, group: &str, root: &Path) -> Result<UnixListener, Error> {
    let gid = match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => g.gid,
        Ok(None) => {
            return Err(Error::other(
                "daemon.read_socket_group",
                anyhow::anyhow!("no group named \"{group}\" on this machine: create it (`groupadd {group}`) or name an existing one"),
            ))
        }
        Err(e) => return Err(Error::other(format!("daemon.read_socket_group: looking up the group \"{group}\""), e)),
    };
    let canonical = |p: &Path| std::fs::canonicalize(parent(p)).ok();
    let ours = !parent(path).exists() || canonical(path).is_some_and(|d| Some(d) == canonical(root));
    bind_as(path, 0o660, Some(Group { gid, name: group, ours }), "the read-only socket", "daemon.read_socket")
}

/// The group a socket is for, and whether its directory is the daemon's own to open to it.
#[derive(Clone, Copy)]
struct Group<'a> {
    gid: nix::unistd::Gid,
    name: &'a str,
    ours: bool,
}

/// The directory a socket's `path` is in.
fn parent(path: &Path) -> &Path {
    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

fn bind_as(path: &Path, mode: u32, group: Option<Group<'_>>, what: &str, key: &str) -> Result<UnixListener, Error> {
    use std::os::unix::fs::DirBuilderExt as _;
    let dir = parent(path);
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| Error::other(format!("creating {}", dir.display()), e))?;
    if let Some(g) = group {
        open_to_group(dir, g, path, key)?;
    }
    let private = dir.join(format!(".sluice-bind-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private).map_err(|e| Error::other(format!("creating {}", private.display()), e))?;
    let staged = private.join("sock");
    let bound = (|| {
        let listener = UnixListener::bind(&staged).map_err(|e| Error::other(format!("binding {what} {} ({key})", path.display()), e))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode)).map_err(|e| Error::other(format!("chmod {what}"), e))?;
        if let Some(g) = group {
            std::os::unix::fs::chown(&staged, None, Some(g.gid.as_raw())).map_err(|e| Error::other(format!("giving {what} to the group {} ({key}_group)", g.name), e))?;
        }
        std::fs::rename(&staged, path).map_err(|e| Error::other(format!("moving {what} into place at {}", path.display()), e))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// Makes sure members of the group can reach a socket in `dir` (search permission on it and on
/// every directory above it). The daemon's own `dir`, if private (this user's, and group and
/// others have nothing but the group's search), becomes 0710 and the group's; anything else is
/// left alone and, if it keeps the group out, is an error that names it.
fn open_to_group(dir: &Path, g: Group<'_>, path: &Path, key: &str) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt as _;
    let Group { gid, name: group, ours } = g;
    let dir = std::fs::canonicalize(dir).map_err(|e| Error::other(format!("resolving {}", dir.display()), e))?;
    let stat = |d: &Path| std::fs::metadata(d).map_err(|e| Error::other(format!("reading {}", d.display()), e));
    let searchable = |m: &std::fs::Metadata| m.mode() & 0o001 != 0 || (m.mode() & 0o010 != 0 && m.gid() == gid.as_raw());
    let keeps_out = |d: &Path, m: &std::fs::Metadata| {
        let owner = |g: u32| nix::unistd::Group::from_gid(g.into()).ok().flatten().map_or_else(|| g.to_string(), |g| g.name);
        Error::other(
            key.to_owned(),
            anyhow::anyhow!(
                "the group {group} cannot reach {}: {} is mode {:04o} (group {}), which does not let the group search it; give it o+x, or g+x with group {group}, or put the socket in a directory the group can reach",
                path.display(),
                d.display(),
                m.mode() & 0o7777,
                owner(m.gid())
            ),
        )
    };
    for above in dir.ancestors().skip(1) {
        let m = stat(above)?;
        if !searchable(&m) {
            return Err(keeps_out(above, &m));
        }
    }
    let m = stat(&dir)?;
    if searchable(&m) {
        return Ok(());
    }
    if ours && m.uid() == nix::unistd::geteuid().as_raw() && m.mode() & 0o067 == 0 {
        std::os::unix::fs::chown(&dir, None, Some(gid.as_raw())).map_err(|e| Error::other(format!("giving {} to the group {group} ({key})", dir.display()), e))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode((m.mode() & 0o700) | 0o010)).map_err(|e| Error::other(format!("chmod g+x {} ({key})", dir.display()), e))?;
        tracing::info!(dir = %dir.display(), group, "made the socket directory searchable (not readable) by the read-only socket's group");
        return Ok(());
    }
    Err(keeps_out(&dir, &m))
}

/// Serves the API on `listener` within `me`'s bounds (`listen.rs`) until `shutdown`, then
/// removes the socket.
pub async fn serve(listener: UnixListener, path: PathBuf, daemon: Daemon, me: std::sync::Arc<crate::listen::Listener>, shutdown: tokio_util::sync::CancellationToken) {
    tracing::info!(socket = %path.display(), "control API listening");
    crate::listen::serve(listener, router(daemon), me, None, shutdown).await;
    let _ = std::fs::remove_file(&path);
}

/// Serves the API read-only ([`read_only`]) on the read socket `path` until `shutdown`, then
/// removes the socket; a change is refused naming the root socket `root`.
pub async fn serve_read(
    listener: UnixListener,
    path: PathBuf,
    root: PathBuf,
    daemon: Daemon,
    me: std::sync::Arc<crate::listen::Listener>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    tracing::info!(socket = %path.display(), "read-only control API listening");
    crate::listen::serve(listener, read_only(router(daemon), read_only_refusal(&path, &root)), me, None, shutdown).await;
    let _ = std::fs::remove_file(&path);
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};

    use super::*;

    /// Under a umask that would leave a freshly bound socket open to everyone, a watcher polling
    /// the socket's path while it is bound over and over never sees it with any mode but 0600
    /// (binding and then chmod-ing in place fails this within a few hundred rounds).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_socket_is_never_seen_open() {
        let dir = std::env::temp_dir().join(format!("sluice-bind-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("run/sluice.sock");
        // SAFETY: umask only changes this process's file-creation mask.
        let old = unsafe { libc::umask(0) };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seen = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(m) = std::fs::symlink_metadata(&path) {
                        if m.file_type().is_socket() {
                            assert_eq!(m.mode() & 0o777, 0o600, "the control socket was visible with mode {:o}", m.mode() & 0o777);
                            seen += 1;
                        }
                    }
                }
                seen
            })
        };
        for _ in 0..500 {
            let l = bind(&path).expect("bind");
            drop(l);
            let _ = std::fs::remove_file(&path);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let seen = watcher.join();
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let seen = seen.expect("watcher saw only 0600");
        assert!(seen > 0, "the watcher never saw the socket: the test proves nothing");
        let run = std::fs::metadata(dir.join("run")).expect("dir");
        assert_eq!(run.mode() & 0o777, 0o700, "the socket's directory is created 0700");
        assert_eq!(std::fs::read_dir(dir.join("run")).expect("dir").count(), 0, "no staging directory left behind");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// One raw request (`Connection: close`) on a Unix socket: (status, body).
    async fn raw(path: &Path, request: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::UnixStream::connect(path).await.expect("connect");
        s.write_all(request.as_bytes()).await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (status, out.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_owned()))
    }

    /// The read-only layer over a router: GET and HEAD reach their handlers; POST, PUT, DELETE,
    /// PATCH, on a route or not, are refused with a 403 and the message, and never reach one.
    #[tokio::test]
    async fn the_read_only_layer_refuses_every_change() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let dir = std::env::temp_dir().join(format!("sluice-read-only-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("r.sock");
        let changes = std::sync::Arc::new(AtomicU32::new(0));
        let app = {
            let c = changes.clone();
            Router::new().route("/v1/status", get(|| async { "ok" })).route(
                "/v1/config/apply",
                post(move || {
                    c.fetch_add(1, Ordering::Relaxed);
                    async { "applied" }
                }),
            )
        };
        let refusal = read_only_refusal(&path, Path::new("/run/sluice/sluice.sock"));
        let app = read_only(app, refusal.clone());
        let me = crate::listen::Listener::new(
            "read",
            path.display().to_string(),
            crate::listen::Limits { max_connections: 4, header_timeout: std::time::Duration::from_secs(5), request_timeout: None },
        );
        let stop = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(crate::listen::serve(UnixListener::bind(&path).expect("bind"), app, me, None, stop.clone()));
        let head =
            |method: &str, uri: &str| format!("{method} {uri} HTTP/1.1\r\nHost: sluice\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}");
        assert_eq!(raw(&path, &head("GET", "/v1/status")).await, (200, "ok".to_owned()));
        assert_eq!(raw(&path, &head("HEAD", "/v1/status")).await.0, 200);
        for (method, uri) in [("POST", "/v1/config/apply"), ("PUT", "/v1/config/apply"), ("DELETE", "/v1/status"), ("PATCH", "/v1/status"), ("POST", "/v1/nope")] {
            let (status, body) = raw(&path, &head(method, uri)).await;
            assert_eq!(status, 403, "{method} {uri}: {body}");
            let b: ApiErrorBody = serde_json::from_str(&body).expect("an error body");
            assert_eq!(b.error, refusal);
        }
        assert!(refusal.contains("read-only socket") && refusal.contains("/run/sluice/sluice.sock"), "{refusal}");
        assert_eq!(changes.load(Ordering::Relaxed), 0, "a refused change reached its handler");
        stop.cancel();
        server.await.expect("server");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// The read-only socket: 0660 and the group's; the daemon's own 0700 directory (the root
    /// socket's) becomes 0710 and the group's, the root socket stays 0600; a private directory
    /// that is not the daemon's is left alone, and the error names it and its mode.
    #[tokio::test]
    async fn the_read_socket_is_the_groups_and_its_directory_lets_the_group_in() {
        let gid = nix::unistd::getegid();
        let group = nix::unistd::Group::from_gid(gid).expect("group").expect("a named group").name;
        let dir = std::env::temp_dir().join(format!("sluice-bind-read-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let (root, read) = (dir.join("run/sluice.sock"), dir.join("run/sluice-read.sock"));
        let _root = bind(&root).expect("bind root");
        assert_eq!(std::fs::metadata(dir.join("run")).expect("dir").mode() & 0o777, 0o700);
        let first = bind_read(&read, &group, &root).expect("bind read");
        let m = std::fs::metadata(&read).expect("read socket");
        assert!(m.file_type().is_socket());
        assert_eq!((m.mode() & 0o777, m.gid()), (0o660, gid.as_raw()), "read socket mode/group");
        assert_eq!(std::fs::metadata(&root).expect("root socket").mode() & 0o777, 0o600, "the root socket stays 0600");
        let d = std::fs::metadata(dir.join("run")).expect("dir");
        assert_eq!((d.mode() & 0o777, d.gid()), (0o710, gid.as_raw()), "the daemon's directory: searchable by the group only");
        // Bound again (a restart): the same.
        drop(first);
        let _again = bind_read(&read, &group, &root).expect("bind read again");
        assert_eq!(std::fs::metadata(&read).expect("read socket").mode() & 0o777, 0o660);
        // A private directory that is not the root socket's: not loosened, named in the error.
        let other = dir.join("other");
        std::fs::create_dir(&other).expect("other");
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let e = bind_read(&other.join("r.sock"), &group, &root).expect_err("a private foreign directory").to_string();
        assert!(e.contains("daemon.read_socket") && e.contains("mode 0700") && e.contains(&other.display().to_string()), "{e}");
        assert_eq!(std::fs::metadata(&other).expect("other").mode() & 0o777, 0o700, "left alone");
        assert!(!other.join("r.sock").exists());
        let e = bind_read(&read, "no-such-group-sluice", &root).expect_err("unknown group").to_string();
        assert!(e.contains("daemon.read_socket_group") && e.contains("no-such-group-sluice"), "{e}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
