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

mod charts;
mod html;
mod json;
mod listen;
mod pages;

pub use listen::serve;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::store::Database;
use axum::extract::Request;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::auth::{AuthError, Authenticator, Need, Principal};
use crate::limits::KeyedBuckets;
use crate::metrics::Metrics;
use crate::ops::{Ops, OpsError};
use crate::participant::Participants;
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
    /// Byte budget of a saga list page.
    pub page_bytes_max: usize,
    /// Largest request body.
    pub body_bytes_max: usize,
    /// How long a client may take to send a request's headers.
    pub header_timeout: Duration,
    /// Failed credentials per address per minute before 429.
    pub auth_failures_per_minute: u32,
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
    db: Database,
    /// The participant caller, for its balancing state.
    participants: Arc<Participants>,
    metrics: Arc<Metrics>,
    auth: Arc<Authenticator>,
    cfg: AdminConfig,
    /// CSRF token of forms when no authentication is configured.
    process_csrf: String,
    /// Failed credentials by peer address.
    failures: KeyedBuckets,
    sessions: Mutex<HashMap<String, Session>>,
    /// The list page's activity chart, by minute.
    activity: Mutex<charts::ActivityCache>,
}

impl AdminState {
    /// The state of an admin server.
    pub fn new(
        ops: Ops,
        db: Database,
        participants: Arc<Participants>,
        metrics: Arc<Metrics>,
        auth: Arc<Authenticator>,
        cfg: AdminConfig,
    ) -> Arc<Self> {
        Arc::new(AdminState {
            ops,
            db,
            participants,
            metrics,
            auth,
            failures: KeyedBuckets::new(
                f64::from(cfg.auth_failures_per_minute) / 60.0,
                cfg.auth_failures_per_minute,
            ),
            cfg,
            process_csrf: random_token(),
            sessions: Mutex::new(HashMap::new()),
            activity: Mutex::new(charts::ActivityCache::default()),
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
        .route("/participants", get(pages::participants))
        .route("/api/participants", get(json::participants))
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
        .layer(axum::extract::DefaultBodyLimit::max(
            state.cfg.body_bytes_max,
        ))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

/// Headers on every answer: no framing (clickjacking), no sniffing, no
/// referrer to other sites, and a content policy that allows the page's own inline style,
/// same-origin images and forms, and nothing else (no script at all).
async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    for (k, v) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        // same-origin, not no-referrer: with no-referrer browsers send
        // `Origin: null` on our own forms, which the Origin check refuses.
        (header::REFERRER_POLICY, "same-origin"),
    ] {
        h.insert(k, header::HeaderValue::from_static(v));
    }
    r
}

/// The address a request came from (for counting failed credentials).
fn peer(req: &Request) -> String {
    peer_ip(req.extensions().get::<listen::Remote>())
}

fn peer_ip(remote: Option<&listen::Remote>) -> String {
    remote.map_or_else(|| "unknown".to_owned(), |r| r.0.ip().to_string())
}

impl AdminState {
    /// Counts a failed credential from `remote`.
    fn failed(&self, remote: Option<&listen::Remote>) {
        let _ = self
            .failures
            .take(&peer_ip(remote), std::time::Instant::now());
    }
}

/// A POST whose `Origin` is another site: refused (with SameSite=Strict
/// cookies and CSRF tokens this is a third line of defence).
fn cross_site(req: &Request) -> bool {
    if req.method() != Method::POST {
        return false;
    }
    let (Some(origin), Some(host)) = (
        req.headers()
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok()),
        req.headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok()),
    ) else {
        return false;
    };
    let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    origin_host != host
}

/// 429 with `Retry-After`, JSON or a page.
fn too_many(st: &AdminState, req: &Request, wait: Duration, api: bool) -> Response {
    let secs = wait.as_secs().max(1);
    let msg = format!("too many failed credentials from this address; retry in {secs} s");
    let mut r = if api {
        HttpError::new(StatusCode::TOO_MANY_REQUESTS, msg).into_response()
    } else {
        pages::error(st, req.headers(), StatusCode::TOO_MANY_REQUESTS, &msg)
    };
    if let Ok(v) = header::HeaderValue::from_str(&secs.to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
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
    let api = path.starts_with("/api/") || path == "/metrics";
    if cross_site(&req) {
        let msg = "a form from another site is refused";
        return if api {
            HttpError::new(StatusCode::FORBIDDEN, msg).into_response()
        } else {
            pages::error(&st, req.headers(), StatusCode::FORBIDDEN, msg)
        };
    }
    if matches!(path, "/healthz" | "/readyz" | "/logout")
        || (path == "/login" && req.method() != Method::POST)
    {
        return next.run(req).await;
    }
    let ip = peer(&req);
    let now = std::time::Instant::now();
    if let Err(wait) = st.failures.check(&ip, now) {
        return too_many(&st, &req, wait, api);
    }
    if path == "/login" {
        // Counts its own failures (pages::login).
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
        Err(e) => {
            if matches!(e, AuthError::Invalid(_)) {
                st.failed(req.extensions().get::<listen::Remote>());
            }
            if api {
                HttpError::from(e).into_response()
            } else {
                pages::refused(&st, req.headers(), req.uri(), e)
            }
        }
    }
}

/// `/metrics`: this process's counters, and the database's saga counts
/// (the admin page's capped counts; left out if the database does not
/// answer within --readyz-timeout-ms, so a scrape never hangs).
async fn metrics(
    axum::extract::State(st): axum::extract::State<Arc<AdminState>>,
) -> impl IntoResponse {
    let window = Duration::from_secs(24 * 3_600);
    let read = st.ops.store.saga_counts(st.cfg.stuck, window);
    let counts = match tokio::time::timeout(st.cfg.readyz_timeout, read).await {
        Ok(Ok(c)) => Some(crate::metrics::StateCounts {
            by_state: c.by_state,
            stuck: c.stuck,
        }),
        _ => None,
    };
    let mut text = st.metrics.render(counts.as_ref());
    crate::metrics::render_pools(&mut text, &st.participants.pools());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

async fn readyz(
    axum::extract::State(st): axum::extract::State<Arc<AdminState>>,
) -> impl IntoResponse {
    let probe = async {
        if !st.ops.store.reachable() {
            // The probe found it away: no need to wait for a connection.
            return Err(crate::store::StoreError::Unavailable("probe failed".into()));
        }
        st.db.ping().await
    };
    match tokio::time::timeout(st.cfg.readyz_timeout, probe).await {
        Ok(Ok(_)) => (StatusCode::OK, Json(json!({"status": "ready"}))),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "error": "database does not answer"})),
        ),
    }
}
