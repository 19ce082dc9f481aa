//! `sluice lab serve`: the lab's backend, an HTTP/1.1 server that answers `GET /` with its name.
//! `?delay_ms=N` answers slowly; a client holds a connection open simply by keeping it
//! (keep-alive). `GET /healthz` is for HTTP health checks.

use std::time::Duration;

use axum::{extract::Query, routing::get, Router};
use serde::Deserialize;

#[derive(Deserialize)]
struct Params {
    #[serde(default)]
    delay_ms: u64,
}

/// Serves on `[::]:port` (IPv4 and IPv6) until killed.
pub async fn serve(name: String, port: u16) -> anyhow::Result<()> {
    super::raise_nofile();
    let listener = tokio::net::TcpListener::bind(("::", port)).await.map_err(|e| anyhow::anyhow!("binding [::]:{port}: {e}"))?;
    let app = Router::new()
        .route(
            "/",
            get(move |Query(p): Query<Params>| async move {
                if p.delay_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(p.delay_ms.min(600_000))).await;
                }
                format!("{name}\n")
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    axum::serve(listener, app).await?;
    Ok(())
}
