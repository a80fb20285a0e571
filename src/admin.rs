//! The admin HTTP server. For now it serves `/healthz` (the process is up)
//! and `/readyz` (the database answers); the admin view, JSON API and
//! metrics are tracked as their own issue.

use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The router.
pub fn router(pool: PgPool) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route(
            "/readyz",
            get(move || {
                let pool = pool.clone();
                async move {
                    let probe = sqlx::query("SELECT 1").execute(&pool);
                    match tokio::time::timeout(Duration::from_secs(2), probe).await {
                        Ok(Ok(_)) => (StatusCode::OK, Json(json!({"status": "ready"}))),
                        _ => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            Json(
                                json!({"status": "not ready", "error": "database does not answer"}),
                            ),
                        ),
                    }
                }
            }),
        )
}

/// Serves until `stop`.
pub async fn serve(listener: TcpListener, pool: PgPool, stop: CancellationToken) {
    let app = router(pool);
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!(%error, "admin server failed");
    }
}
