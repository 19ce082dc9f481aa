//! The control API: JSON over HTTP on a Unix socket (mode 0600, so root only). The CLI is a
//! client of it (`client.rs`). A handler only translates: each calls one [`Daemon`] method and
//! answers with its result, a type from `types.rs` that the client reads back. Every change
//! goes through the daemon's one change path, so a request that fails changes nothing.

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

mod types;
pub use types::*;

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

/// Binds the control socket, root only (0600) from the moment it appears at `path`.
///
/// `bind` creates the socket with the umask's mode; a `chmod` after it leaves a window in which
/// anyone may connect (and a reader may see the wrong mode). So the socket is bound inside a
/// private 0700 directory beside `path`, set to 0600 there, and renamed into place: `rename` is
/// atomic, so `path` never names a socket with another mode. A directory the daemon creates for
/// it (`/run/sluice`) is 0700.
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    use std::os::unix::fs::DirBuilderExt as _;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| Error::other(format!("creating {}", dir.display()), e))?;
    let private = dir.join(format!(".sluice-bind-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private).map_err(|e| Error::other(format!("creating {}", private.display()), e))?;
    let staged = private.join("sock");
    let bound = (|| {
        let listener = UnixListener::bind(&staged).map_err(|e| Error::other(format!("binding the control socket {} (daemon.control_socket)", path.display()), e))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600)).map_err(|e| Error::other("chmod control socket", e))?;
        std::fs::rename(&staged, path).map_err(|e| Error::other(format!("moving the control socket into place at {}", path.display()), e))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// Serves the API on `listener` within `me`'s bounds (`listen.rs`) until `shutdown`, then
/// removes the socket.
pub async fn serve(listener: UnixListener, path: PathBuf, daemon: Daemon, me: std::sync::Arc<crate::listen::Listener>, shutdown: tokio_util::sync::CancellationToken) {
    tracing::info!(socket = %path.display(), "control API listening");
    crate::listen::serve(listener, router(daemon), me, None, shutdown).await;
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
}
