//! The admin HTTP server: a server-rendered page for people, a JSON API for
//! scripts, `/metrics`, `/healthz` and `/readyz`.
//!
//! Security model: with authentication configured (auth file, JWT key or
//! admin token), every request but `/healthz`, `/readyz`, `/login` and
//! `/logout` passes [`gate`], which finds the principal — from
//! `Authorization: Bearer` (scripts, Prometheus) or from the session cookie
//! set by the login form (people) — and checks its role:
//!
//! ```text
//!   GET  /definitions, /api/definitions      viewer | definer | operator
//!   GET  every other page, /api/*, /metrics  viewer | operator
//!   POST actions (page and JSON API)         operator
//!   no credential → 401 (the page: the login form); no role → 403
//! ```
//!
//! Sessions keep the credential server-side and check it again on every
//! request, so a reloaded auth file or an expired JWT ends them. The cookie
//! is HttpOnly and SameSite=Strict; every form carries a CSRF token (the
//! session's, or a per-process secret without authentication), and the JSON
//! API only accepts `application/json` bodies, so another site cannot make
//! an operator's browser act. Without authentication everything is open
//! (`sagad` then listens on loopback only). All user-supplied text is
//! escaped.

mod html;
mod json;
mod pages;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthError, Authenticator, Need, Principal};
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
    /// What "stuck" means.
    pub stuck: StuckRule,
    /// Rows per page when the request asks for none.
    pub page_rows_default: u32,
    /// Largest page served.
    pub page_rows_max: u32,
    /// How long /readyz waits for the database.
    pub readyz_timeout: Duration,
}

#[derive(Clone)]
struct Session {
    /// The `authorization` value it logged in with, checked on every use.
    credential: String,
    /// The person's name given at login, recorded with their actions.
    name: Option<String>,
    csrf: String,
    expires: Instant,
}

/// Who sent an admin request: put in its extensions by [`gate`].
#[derive(Clone)]
pub(super) struct Caller {
    principal: Arc<Principal>,
    session: Option<Session>,
}

/// Shared state of the admin handlers.
pub struct AdminState {
    ops: Ops,
    pool: PgPool,
    metrics: Arc<Metrics>,
    auth: Arc<Authenticator>,
    cfg: AdminConfig,
    /// CSRF token of forms when no authentication is configured.
    process_csrf: String,
    sessions: Mutex<HashMap<String, Session>>,
}

impl AdminState {
    /// The state of an admin server.
    pub fn new(
        ops: Ops,
        pool: PgPool,
        metrics: Arc<Metrics>,
        auth: Arc<Authenticator>,
        cfg: AdminConfig,
    ) -> Arc<Self> {
        Arc::new(AdminState {
            ops,
            pool,
            metrics,
            auth,
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

    /// The caller: its `Authorization` header, else its session, else
    /// anonymous (allowed only without authentication).
    fn caller(&self, headers: &HeaderMap) -> Result<Caller, AuthError> {
        if let Some(v) = headers.get(header::AUTHORIZATION) {
            let principal = self
                .auth
                .authenticate(Some(v.to_str().unwrap_or("?")), None)?;
            return Ok(Caller {
                principal,
                session: None,
            });
        }
        if let Some(s) = self.session(headers) {
            match self.auth.authenticate(Some(&s.credential), None) {
                Ok(principal) => {
                    return Ok(Caller {
                        principal,
                        session: Some(s),
                    })
                }
                // Revoked or expired since the login.
                Err(_) => self.logout(headers),
            }
        }
        Ok(Caller {
            principal: self.auth.authenticate(None, None)?,
            session: None,
        })
    }

    fn login(&self, credential: String, name: Option<String>) -> (String, Session) {
        let id = random_token();
        let s = Session {
            credential,
            name,
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
        OpsError::Auth(a) => auth_code(a),
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
        HttpError::new(auth_code(&e), e.to_string())
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
        .layer(axum::middleware::from_fn_with_state(state.clone(), gate))
        .with_state(state)
}

/// 401 for no or a refused credential, 403 for a missing role.
fn auth_code(e: &AuthError) -> StatusCode {
    match e {
        AuthError::Missing | AuthError::Invalid(_) => StatusCode::UNAUTHORIZED,
        AuthError::Denied { .. } => StatusCode::FORBIDDEN,
    }
}

/// What a request needs (see the module documentation).
fn need_of(method: &Method, path: &str) -> Need<'static> {
    if method == Method::POST {
        Need::Operate
    } else if path == "/definitions" || path == "/api/definitions" {
        Need::ReadDefinitions
    } else {
        Need::ReadSagas
    }
}

/// Authenticates every request but the probes and the login pages, and
/// checks the role its path needs; refusals are JSON for the API and
/// `/metrics`, pages (the login form for 401) for people.
async fn gate(
    axum::extract::State(st): axum::extract::State<Arc<AdminState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    if matches!(path, "/healthz" | "/readyz" | "/login" | "/logout") {
        return next.run(req).await;
    }
    let need = need_of(req.method(), path);
    let checked = st.caller(req.headers()).and_then(|c| {
        c.principal.require(need)?;
        Ok(c)
    });
    match checked {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) if path.starts_with("/api/") || path == "/metrics" => {
            HttpError::from(e).into_response()
        }
        Err(e) => pages::refused(&st, req.headers(), req.uri(), e),
    }
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
