//! The admin HTTP server: a server-rendered page for people, a JSON API for
//! scripts, `/metrics`, `/healthz` and `/readyz`.
//!
//! Security model: reads are open (the server listens on loopback unless an
//! admin token is set). Actions — retry, abort, resolve — need the admin
//! token when one is configured: as `Authorization: Bearer` for the JSON
//! API, and through a login form that sets an HttpOnly, SameSite=Strict
//! session cookie for the page. Every form carries a CSRF token (the
//! session's, or a per-process secret when no token is configured), and the
//! JSON API only accepts `application/json` bodies, so another site cannot
//! make an operator's browser act. `sagad` refuses to start with the admin
//! server beyond loopback and no token. All user-supplied text is escaped.

mod html;
mod json;
mod pages;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::auth::AuthError;
use crate::metrics::Metrics;
use crate::ops::{Ops, OpsError};
use crate::store::StuckRule;

/// Name of the session cookie.
const SESSION_COOKIE: &str = "sagad_session";
/// How long a login lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3_600);
/// Most sessions kept at once (oldest dropped first).
const SESSIONS_MAX: usize = 10_000;

/// Settings of the admin server.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// The admin token, if any.
    pub token: Option<String>,
    /// What "stuck" means.
    pub stuck: StuckRule,
    /// Rows per page when the request asks for none.
    pub page_rows_default: u32,
    /// Largest page served.
    pub page_rows_max: u32,
    /// How long /readyz waits for the database.
    pub readyz_timeout: Duration,
}

#[derive(Debug, Clone)]
struct Session {
    actor: String,
    csrf: String,
    expires: Instant,
}

/// Shared state of the admin handlers.
pub struct AdminState {
    ops: Ops,
    pool: PgPool,
    metrics: Arc<Metrics>,
    cfg: AdminConfig,
    /// CSRF token of forms when no admin token is configured.
    process_csrf: String,
    sessions: Mutex<HashMap<String, Session>>,
}

impl AdminState {
    /// The state of an admin server.
    pub fn new(ops: Ops, pool: PgPool, metrics: Arc<Metrics>, cfg: AdminConfig) -> Arc<Self> {
        Arc::new(AdminState {
            ops,
            pool,
            metrics,
            cfg,
            process_csrf: random_token(),
            sessions: Mutex::new(HashMap::new()),
        })
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live session named by the request's cookie.
    fn session(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, SESSION_COOKIE)?;
        let s = self.sessions().get(&id).cloned()?;
        (s.expires > Instant::now()).then_some(s)
    }

    fn login(&self, actor: String) -> (String, Session) {
        let id = random_token();
        let s = Session {
            actor,
            csrf: random_token(),
            expires: Instant::now() + SESSION_TTL,
        };
        let mut all = self.sessions();
        let now = Instant::now();
        all.retain(|_, s| s.expires > now);
        if all.len() >= SESSIONS_MAX {
            if let Some(oldest) = all
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
            {
                all.remove(&oldest);
            }
        }
        all.insert(id.clone(), s.clone());
        (id, s)
    }

    fn logout(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers, SESSION_COOKIE) {
            self.sessions().remove(&id);
        }
    }
}

fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// An HTTP error with a JSON body `{"error": …}` (and `"field"` for bad
/// input).
#[derive(Debug)]
pub struct HttpError(StatusCode, serde_json::Value);

impl HttpError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        HttpError(status, json!({ "error": message.into() }))
    }
}

/// The HTTP status for `e`, and what the client is told (JSON and HTML
/// alike). Unavailable and internal errors are logged here with their
/// detail, which the client never sees.
fn ops_status(e: &OpsError) -> (StatusCode, String) {
    let code = match e {
        OpsError::Invalid(_) => StatusCode::BAD_REQUEST,
        OpsError::NotFound(_) => StatusCode::NOT_FOUND,
        OpsError::AlreadyExists(_) | OpsError::FailedPrecondition(_) | OpsError::Aborted(_) => {
            StatusCode::CONFLICT
        }
        OpsError::Unavailable { detail, .. } => {
            tracing::warn!(error = %detail, "admin: answering 503");
            StatusCode::SERVICE_UNAVAILABLE
        }
        OpsError::Internal(detail) => {
            tracing::error!(error = %detail, "admin: internal error");
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    (code, e.to_string())
}

impl From<OpsError> for HttpError {
    fn from(e: OpsError) -> Self {
        let (code, message) = ops_status(&e);
        match e {
            OpsError::Invalid(v) => HttpError(code, json!({"error": message, "field": v.field})),
            _ => HttpError::new(code, message),
        }
    }
}

impl From<AuthError> for HttpError {
    fn from(e: AuthError) -> Self {
        let code = match e {
            AuthError::Missing => StatusCode::UNAUTHORIZED,
            AuthError::Wrong => StatusCode::FORBIDDEN,
        };
        HttpError::new(code, e.to_string())
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

/// The router.
pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/", get(pages::list))
        .route("/sagas/{id}", get(pages::saga))
        .route("/sagas/{id}/action", post(pages::act))
        .route("/definitions", get(pages::definitions))
        .route("/login", get(pages::login_form).post(pages::login))
        .route("/logout", post(pages::logout))
        .route("/api/stats", get(json::stats))
        .route("/api/sagas", get(json::list))
        .route("/api/sagas/{id}", get(json::saga))
        .route("/api/sagas/{id}/events", get(json::events))
        .route("/api/sagas/{id}/{action}", post(json::act))
        .route("/api/definitions", get(json::definitions))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .fallback(|| async { HttpError::new(StatusCode::NOT_FOUND, "no such page") })
        .with_state(state)
}

async fn metrics(
    axum::extract::State(st): axum::extract::State<Arc<AdminState>>,
) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
}

async fn readyz(
    axum::extract::State(st): axum::extract::State<Arc<AdminState>>,
) -> impl IntoResponse {
    let probe = sqlx::query("SELECT 1").execute(&st.pool);
    match tokio::time::timeout(st.cfg.readyz_timeout, probe).await {
        Ok(Ok(_)) => (StatusCode::OK, Json(json!({"status": "ready"}))),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "error": "database does not answer"})),
        ),
    }
}

/// Serves on `listener` (TCP, or TLS connections) until `stop`.
pub async fn serve<L>(listener: L, state: Arc<AdminState>, stop: CancellationToken)
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    if let Err(error) = axum::serve(listener, router(state))
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!(%error, "admin server failed");
    }
}
