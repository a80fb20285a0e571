//! Server-rendered pages for people.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::rejection::FormRejection;
use axum::extract::{Extension, Form, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::charts;
use super::html::{age, esc, page, state_class, url};
use super::json::{parse_id, Filters};
use super::{ops_status, AdminState, Caller, SESSION_COOKIE, SESSION_TTL};
use crate::auth::{self, token_eq, AuthError, Need};
use crate::domain::{Definition, Saga, SagaState};
use crate::ops::OperatorKind;
use crate::ops::OpsError;
use crate::store::Registered;

fn logged_in(st: &AdminState, headers: &HeaderMap) -> Option<bool> {
    st.auth.enabled().then(|| st.session(headers).is_some())
}

/// The page for a refused request: the login form (401) when there is no
/// accepted credential, an error page (403) when the role is missing.
pub(super) fn refused(st: &AdminState, headers: &HeaderMap, uri: &Uri, e: AuthError) -> Response {
    match e {
        AuthError::Denied { .. } => error_page(st, headers, StatusCode::FORBIDDEN, &e.to_string()),
        AuthError::Missing => {
            let next = safe_next(uri.path_and_query().map(|p| p.as_str()));
            login_page(st, headers, StatusCode::UNAUTHORIZED, &next, None)
        }
        AuthError::Invalid(_) => {
            let next = safe_next(uri.path_and_query().map(|p| p.as_str()));
            login_page(
                st,
                headers,
                StatusCode::UNAUTHORIZED,
                &next,
                Some(&e.to_string()),
            )
        }
    }
}

/// An error page (for the gate's refusals too).
pub(super) fn error(
    st: &AdminState,
    headers: &HeaderMap,
    status: StatusCode,
    msg: &str,
) -> Response {
    error_page(st, headers, status, msg)
}

fn error_page(st: &AdminState, headers: &HeaderMap, status: StatusCode, msg: &str) -> Response {
    let body = format!(
        "<div class='flash error'>{}</div><p><a href=/>Back to the list</a></p>",
        esc(msg)
    );
    (status, Html(page("Error", logged_in(st, headers), &body))).into_response()
}

fn ops_error_page(st: &AdminState, headers: &HeaderMap, e: OpsError) -> Response {
    let (status, msg) = ops_status(&e);
    error_page(st, headers, status, &msg)
}

async fn saga_rows(
    st: &AdminState,
    sagas: &[Saga],
    now: chrono::DateTime<chrono::Utc>,
) -> Result<String, OpsError> {
    let mut rows = String::new();
    for s in sagas {
        let def = st.ops.definition(&s.definition, s.version).await?;
        let progress = s.progress();
        let (step, attempts, error) = match progress {
            Some((i, n)) => (
                def.steps.get(i).map(|d| d.name.clone()).unwrap_or_default(),
                n.to_string(),
                s.steps[i]
                    .last_error
                    .clone()
                    .or_else(|| s.error.clone())
                    .unwrap_or_default(),
            ),
            None => (
                String::new(),
                String::new(),
                s.error.clone().unwrap_or_default(),
            ),
        };
        let _ = write!(
            rows,
            "<tr class=saga-row data-state={state}><td><a href=/sagas/{id}><code>{id}</code></a></td><td>{def}@{v}</td>\
             <td class={cls}>{state}</td><td>{step}</td><td>{attempts}</td><td>{error}</td><td>{age}</td><td>{idle}</td></tr>",
            id = s.id,
            def = esc(&s.definition),
            v = s.version,
            cls = state_class(s.state.as_str()),
            state = s.state,
            step = esc(&step),
            error = esc(&error),
            age = age(s.created_at, now),
            idle = age(s.updated_at, now),
        );
    }
    Ok(rows)
}

fn saga_table(id: &str, rows: &str) -> String {
    if rows.is_empty() {
        return "<p class=muted>None.</p>".into();
    }
    format!(
        "<table id={id}><tr><th>Saga</th><th>Definition</th><th>State</th><th>Step</th><th>Attempts</th>\
         <th>Last error</th><th>Age</th><th>Since progress</th></tr>{rows}</table>"
    )
}

/// GET /: counts, stuck sagas first, then every saga, filtered and paged.
pub(super) async fn list(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Query(p): Query<HashMap<String, String>>,
) -> Response {
    match list_body(&st, &p).await {
        Ok(body) => Html(page("Sagas", logged_in(&st, &headers), &body)).into_response(),
        Err(e) => ops_error_page(&st, &headers, e),
    }
}

async fn list_body(st: &Arc<AdminState>, p: &HashMap<String, String>) -> Result<String, OpsError> {
    let f = Filters::parse(p, st.cfg.page_rows_default, st.cfg.page_rows_max)?;
    let now = st.ops.worker.db_now();
    let counts = st
        .ops
        .store
        .saga_counts(st.cfg.stuck, std::time::Duration::from_secs(24 * 3_600))
        .await?;
    let mut body = String::from("<div class=counts>");
    let alarm = |bad: bool| if bad { " alarm" } else { "" };
    let shown = |n: i64| {
        if n >= crate::store::COUNT_CAP {
            format!("{n}+")
        } else {
            n.to_string()
        }
    };
    let _ = write!(
        body,
        "<div class='count{}' id=count-stuck><b>{}</b>stuck</div>",
        alarm(counts.stuck > 0),
        shown(counts.stuck)
    );
    for s in SagaState::ALL {
        let n = counts
            .by_state
            .iter()
            .find(|(x, _)| x == s)
            .map_or(0, |(_, n)| *n);
        let window = if s.is_terminal() { " (24 h)" } else { "" };
        let _ = write!(
            body,
            "<div class='count{}' id=count-{s}><b>{}</b>{s}{window}</div>",
            alarm(*s == SagaState::Suspended && n > 0),
            shown(n)
        );
    }
    body.push_str("</div>");
    body.push_str(&activity(st, now).await?);
    let selected = |s: &str| {
        if f.states.iter().any(|x| x.as_str() == s) {
            " selected"
        } else {
            ""
        }
    };
    let mut options = String::from("<option value=''>any state</option>");
    for s in SagaState::ALL {
        let _ = write!(options, "<option{}>{s}</option>", selected(s.as_str()));
    }
    let _ = write!(
        body,
        "<form method=get class=filters>State <select name=state>{options}</select> \
         Definition <input name=definition value='{}' size=16> \
         Older than <input name=min_age_secs value='{}' size=6> s \
         <button>Filter</button> <a href=/>clear</a></form>",
        esc(f.definition.as_deref().unwrap_or("")),
        f.min_age_secs.map(|s| s.to_string()).unwrap_or_default(),
    );
    if f.page_token.is_none() {
        let mut stuck_q = f.query(st, true)?;
        stuck_q.limit = st.cfg.page_rows_default;
        let stuck = st.ops.store.saga_list(&stuck_q).await?;
        let _ = write!(
            body,
            "<h2>Stuck</h2>{}",
            saga_table("stuck", &saga_rows(st, &stuck.sagas, now).await?)
        );
    }
    let all = st.ops.store.saga_list(&f.query(st, f.stuck)?).await?;
    let _ = write!(
        body,
        "<h2>All sagas</h2>{}",
        saga_table("sagas", &saga_rows(st, &all.sagas, now).await?)
    );
    if let Some(next) = all.next {
        let mut q: Vec<String> = p
            .iter()
            .filter(|(k, _)| *k != "page_token")
            .map(|(k, v)| format!("{}={}", url(k), url(v)))
            .collect();
        q.push(format!(
            "page_token={}",
            url(&crate::ops::encode_page_token(next))
        ));
        let _ = write!(
            body,
            "<p><a id=next-page href='/?{}'>Next page →</a></p>",
            esc(&q.join("&"))
        );
    }
    Ok(body)
}

/// The activity chart, counting again only what may have changed.
async fn activity(
    st: &Arc<AdminState>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<String, OpsError> {
    let lock = || st.activity.lock().unwrap_or_else(|p| p.into_inner());
    let plan = lock().plan(now);
    match plan {
        charts::Recount::No => {}
        charts::Recount::Wait(from) => {
            let fresh = st.ops.store.saga_activity(from).await?;
            lock().merge(from, fresh, now);
        }
        charts::Recount::Background(from) => {
            let st = st.clone();
            tokio::spawn(async move {
                let fresh = st.ops.store.saga_activity(from).await;
                let mut cache = st.activity.lock().unwrap_or_else(|p| p.into_inner());
                match fresh {
                    Ok(fresh) => cache.merge(from, fresh, now),
                    Err(e) => {
                        cache.count_failed();
                        tracing::warn!(error = %e, "counting the activity chart failed");
                    }
                }
            });
        }
    }
    let minutes = lock().minutes(now);
    Ok(charts::activity_svg(&minutes))
}

/// GET /sagas/{id}: input, steps, history, actions.
pub(super) async fn saga(
    State(st): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(p): Query<HashMap<String, String>>,
) -> Response {
    match saga_body(&st, &caller, &id, &p).await {
        Ok(body) => {
            Html(page(&format!("Saga {id}"), logged_in(&st, &headers), &body)).into_response()
        }
        Err(e) => ops_error_page(&st, &headers, e),
    }
}

async fn saga_body(
    st: &AdminState,
    caller: &Caller,
    id: &str,
    p: &HashMap<String, String>,
) -> Result<String, OpsError> {
    let id = parse_id(id)?;
    let rec = st.ops.record(id).await?;
    let (s, def) = (
        &rec.saga,
        st.ops
            .definition(&rec.saga.definition, rec.saga.version)
            .await?,
    );
    let now = st.ops.worker.db_now();
    let mut body = String::new();
    if let Some(m) = p.get("done") {
        let _ = write!(body, "<div class=flash id=flash>{}</div>", esc(m));
    }
    if let Some(m) = p.get("error") {
        let _ = write!(body, "<div class='flash error' id=flash>{}</div>", esc(m));
    }
    let pretty = |t: &str| {
        serde_json::from_str::<serde_json::Value>(t)
            .ok()
            .and_then(|v| serde_json::to_string_pretty(&v).ok())
            .unwrap_or_else(|| t.to_owned())
    };
    let _ = write!(
        body,
        "<h1>Saga <code>{id}</code></h1><table><tr><th>Definition</th><td><a href=/definitions#{d}>{d}@{v}</a></td></tr>\
         <tr><th>State</th><td class={cls} id=saga-state>{state}</td></tr><tr><th>Why</th><td id=saga-error>{err}</td></tr>\
         <tr><th>Started</th><td>{created} ({age} ago)</td></tr><tr><th>Started by</th><td id=started-by>{by}</td></tr><tr><th>Last progress</th><td>{updated} ({idle} ago)</td></tr>\
         <tr><th>Deadline</th><td>{deadline}</td></tr><tr><th>Input</th><td><pre id=saga-input>{input}</pre></td></tr></table>",
        d = esc(&s.definition),
        v = s.version,
        cls = state_class(s.state.as_str()),
        state = s.state,
        err = esc(s.error.as_deref().unwrap_or("")),
        created = s.created_at.to_rfc3339(),
        age = age(s.created_at, now),
        by = esc(s.started_by.as_deref().unwrap_or("— (no authentication)")),
        updated = s.updated_at.to_rfc3339(),
        idle = age(s.updated_at, now),
        deadline = s.deadline_at.map(|d| d.to_rfc3339()).unwrap_or_else(|| "none".into()),
        input = esc(&pretty(&s.input)),
    );
    body.push_str("<h2>Steps</h2><table id=steps><tr><th>Step</th><th>Kind</th><th>Participant</th><th>State</th><th>Attempts</th><th>Compensation attempts</th><th>Next attempt</th><th>Output</th><th>Last error</th></tr>");
    for (i, step) in s.steps.iter().enumerate() {
        let d = def.steps.get(i);
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class={}>{}</td><td>{}</td><td>{}</td><td>{}</td><td><pre>{}</pre></td><td>{}</td></tr>",
            esc(d.map_or("?", |d| d.name.as_str())),
            def.kind(i).as_str(),
            esc(d.map_or("?", |d| d.participant.as_str())),
            state_class(step.state.as_str()),
            step.state,
            step.attempts,
            step.compensation_attempts,
            step.next_attempt_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
            esc(&step.output.as_deref().map(pretty).unwrap_or_default()),
            esc(step.last_error.as_deref().unwrap_or("")),
        );
    }
    body.push_str("</table>");
    body.push_str(&actions(st, caller, s));
    let events = st.ops.store.saga_events(id).await?;
    body.push_str(&charts::timeline(s, &events));
    body.push_str("<h2>History</h2><ol class=timeline id=history>");
    for e in &events {
        let _ = write!(
            body,
            "<li><span class=muted>{}</span> <b>{}</b>{}{} {}</li>",
            e.at.format("%Y-%m-%d %H:%M:%S%.3f"),
            esc(e.kind.as_str()),
            e.step
                .as_deref()
                .map(|s| format!(" · {}", esc(s)))
                .unwrap_or_default(),
            if e.attempt > 0 {
                format!(" · attempt {}", e.attempt)
            } else {
                String::new()
            },
            esc(&e.detail),
        );
    }
    body.push_str("</ol>");
    Ok(body)
}

/// The action forms, for the actions that apply to the saga's state.
fn actions(st: &AdminState, caller: &Caller, s: &Saga) -> String {
    if s.state.is_terminal() {
        return String::new();
    }
    let csrf = match (st.auth.enabled(), &caller.session) {
        (false, _) => st.process_csrf.clone(),
        (true, Some(_)) if !caller.principal.may(Need::Operate) => {
            return format!(
                "<h2>Actions</h2><p id=no-actions>{} cannot retry, abort or resolve: that needs role operator.</p>",
                esc(&caller.principal.name)
            )
        }
        (true, Some(session)) => session.csrf.clone(),
        (true, None) => {
            return format!("<h2>Actions</h2><p><a id=login-to-act href='/login?next=/sagas/{}'>Log in</a> to retry, abort or resolve.</p>", s.id)
        }
    };
    let mut out = String::from("<h2>Actions</h2>");
    let mut form = |action: &str, label: &str, note_required: bool, help: &str| {
        let _ = write!(
            out,
            "<form method=post action=/sagas/{id}/action id={action}-form><fieldset><legend>{label}</legend>\
             <input type=hidden name=action value={action}><input type=hidden name=csrf value={csrf}>\
             <p class=muted>{help}</p>Note <input name=note size=50{req}> \
             <label><input type=checkbox name=confirm value=yes required> I confirm</label> \
             <button id={action}-button>{label}</button></fieldset></form>",
            id = s.id,
            req = if note_required { " required" } else { "" },
        );
    };
    form(
        "retry",
        "Retry",
        false,
        "Resume where it stopped with a fresh retry budget, or run a waiting retry now.",
    );
    if matches!(
        (s.state, s.suspended_from),
        (SagaState::Running, _) | (SagaState::Suspended, Some(SagaState::Running))
    ) {
        form(
            "abort",
            "Abort",
            false,
            "Compensate every step that took effect (only before the pivot).",
        );
    }
    if s.state == SagaState::Suspended {
        form(
            "resolve",
            "Resolve",
            true,
            "Mark it finished by hand; say what you did.",
        );
    }
    out
}

#[derive(Deserialize)]
pub(super) struct ActForm {
    action: String,
    #[serde(default)]
    note: String,
    #[serde(default)]
    confirm: String,
    #[serde(default)]
    csrf: String,
}

/// POST /sagas/{id}/action: runs an operator action, then shows the saga
/// with the result.
pub(super) async fn act(
    State(st): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    Path(id): Path<String>,
    form: Result<Form<ActForm>, FormRejection>,
) -> Response {
    let (actor, csrf) = match (st.auth.enabled(), &caller.session) {
        (false, _) => ("web".to_owned(), st.process_csrf.clone()),
        (true, Some(s)) => (
            caller.principal.actor(s.name.as_deref(), "web"),
            s.csrf.clone(),
        ),
        (true, None) => {
            return error_page(
                &st,
                &headers,
                StatusCode::FORBIDDEN,
                "the page's forms need a login session; scripts use the JSON API",
            )
        }
    };
    let Ok(Form(f)) = form else {
        return error_page(
            &st,
            &headers,
            StatusCode::BAD_REQUEST,
            "the form is incomplete",
        );
    };
    if !token_eq(&f.csrf, &csrf) {
        return error_page(
            &st,
            &headers,
            StatusCode::FORBIDDEN,
            "the form is stale or from another site (CSRF check failed); reload the page",
        );
    }
    if f.confirm != "yes" {
        return error_page(
            &st,
            &headers,
            StatusCode::BAD_REQUEST,
            "tick \"I confirm\" to act",
        );
    }
    let Some(kind) = OperatorKind::parse(&f.action) else {
        return error_page(&st, &headers, StatusCode::BAD_REQUEST, "unknown action");
    };
    let saga_id = match parse_id(&id) {
        Ok(i) => i,
        Err(e) => return ops_error_page(&st, &headers, e),
    };
    let target = match st.ops.operator(saga_id, kind, &actor, &f.note).await {
        Ok((saga, _)) => format!(
            "/sagas/{id}?done={}",
            url(&format!(
                "{} done: the saga is now {}",
                f.action, saga.state
            ))
        ),
        Err(e @ (OpsError::Unavailable { .. } | OpsError::Internal(_))) => {
            return ops_error_page(&st, &headers, e)
        }
        Err(e) => format!(
            "/sagas/{id}?error={}",
            url(&format!("{} refused: {e}", f.action))
        ),
    };
    Redirect::to(&target).into_response()
}

/// GET /definitions: every version, with step kinds.
pub(super) async fn definitions(State(st): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    let defs = match st.ops.store.definition_list().await {
        Ok(d) => d,
        Err(e) => return ops_error_page(&st, &headers, e.into()),
    };
    let mut body = String::from("<h1>Definitions</h1>");
    if defs.is_empty() {
        body.push_str("<p class=muted>None registered yet.</p>");
    }
    for (d, at) in defs.iter().rev() {
        body.push_str(&definition_section(d, at));
    }
    Html(page("Definitions", logged_in(&st, &headers), &body)).into_response()
}

/// GET /participants: how calls are spread over each participant's
/// instances, their breakers, and the back-pressure limits (as this
/// coordinator sees them: each coordinator balances its own calls).
pub(super) async fn participants(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
) -> Response {
    let mut body = String::from(
        "<h1>Participants</h1><p class=muted>As this coordinator calls them (every coordinator \
         balances, breaks and limits its own calls).</p>",
    );
    let pools = st.participants.pools();
    if pools.is_empty() {
        body.push_str("<p class=muted>No participant called yet.</p>");
    }
    for p in &pools {
        let _ = write!(
            body,
            "<h2 id='{n}'>{n}</h2><p>{policy}; in flight {inf}{cap}; {rate}; waited for capacity {w}, \
             not sent in time {ns}, sent to another instance {rr}</p>\
             <table class=instances><tr><th>Instance</th><th>Weight</th><th>In flight</th><th>Calls</th><th>Breaker</th></tr>",
            n = esc(&p.participant),
            policy = p.policy.as_str(),
            inf = p.in_flight,
            cap = p.in_flight_max.map(|m| format!(" of at most {m}")).unwrap_or_default(),
            rate = p
                .rate_per_sec
                .map(|r| format!("at most {r} calls a second"))
                .unwrap_or_else(|| "no rate limit".into()),
            w = p.waited,
            ns = p.not_sent,
            rr = p.rerouted,
        );
        for i in &p.instances {
            let class = match i.breaker.as_str() {
                "closed" => "good",
                "open" => "bad",
                _ => "warn",
            };
            let _ = write!(
                body,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td class={class}>{}</td></tr>",
                esc(&i.endpoint),
                i.weight,
                i.outstanding,
                i.calls,
                i.breaker.as_str()
            );
        }
        body.push_str("</table>");
    }
    Html(page("Participants", logged_in(&st, &headers), &body)).into_response()
}

fn definition_section(d: &Definition, at: &Registered) -> String {
    let mut out = format!(
        "<h2 id={n}>{n}@{v}</h2><p class=muted>registered {at}{by}; deadline {dl}</p><table><tr><th>Step</th><th>Kind</th>\
         <th>Participant</th><th>Action</th><th>Compensation</th><th>Idempotent</th><th>Timeout</th><th>Retry</th></tr>",
        n = esc(&d.name),
        v = d.version,
        at = at.at.to_rfc3339(),
        by = at
            .by
            .as_deref()
            .map(|b| format!(" by {}", esc(b)))
            .unwrap_or_default(),
        dl = d.deadline.map(|x| format!("{x:?}")).unwrap_or_else(|| "none".into()),
    );
    for (i, s) in d.steps.iter().enumerate() {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:?}</td><td>{} attempts, {:?}×{}..{:?}</td></tr>",
            esc(&s.name),
            d.kind(i).as_str(),
            esc(&s.participant),
            esc(&s.action),
            esc(s.compensation.as_deref().unwrap_or("—")),
            if s.idempotent { "yes" } else { "no" },
            s.timeout,
            s.retry.max_attempts,
            s.retry.initial_backoff,
            s.retry.multiplier,
            s.retry.max_backoff,
        );
    }
    out.push_str("</table>");
    out
}

/// Only same-site paths may be the target after login: a `/` followed by
/// visible ASCII, not `//` or `/\\` (another host), no whitespace or control
/// characters (browsers drop tabs and newlines, so `/\t/evil.example` is
/// `//evil.example`; a newline cannot go in a header at all).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.contains('\\')
                && n.len() <= 2_048
                && n.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            n.to_owned()
        }
        _ => "/".to_owned(),
    }
}

/// GET /login.
pub(super) async fn login_form(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Query(p): Query<HashMap<String, String>>,
) -> Response {
    login_page(
        &st,
        &headers,
        StatusCode::OK,
        &safe_next(p.get("next").map(String::as_str)),
        None,
    )
}

fn login_page(
    st: &AdminState,
    headers: &HeaderMap,
    status: StatusCode,
    next: &str,
    error: Option<&str>,
) -> Response {
    if !st.auth.enabled() {
        let body = "<p>No authentication is configured: nothing needs a login (the admin server only listens on loopback).</p>";
        return (status, Html(page("Log in", None, body))).into_response();
    }
    let body = format!(
        "<h1>Log in</h1>{}<form method=post action=/login><input type=hidden name=next value='{}'>\
         <p>Token (from the auth file, a JWT, or the admin token) <input type=password name=token id=token required size=40></p>\
         <p>Your name, recorded with your actions (optional) <input name=name id=name size=24></p>\
         <button id=login-button>Log in</button></form>",
        error.map(|e| format!("<div class='flash error'>{}</div>", esc(e))).unwrap_or_default(),
        esc(next),
    );
    (status, Html(page("Log in", logged_in(st, headers), &body))).into_response()
}

#[derive(Deserialize)]
pub(super) struct LoginForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    token: String,
    #[serde(default)]
    next: String,
}

/// POST /login: sets the session cookie.
pub(super) async fn login(
    State(st): State<Arc<AdminState>>,
    remote: Option<Extension<super::listen::Remote>>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    let Ok(Form(f)) = form else {
        return login_page(
            &st,
            &headers,
            StatusCode::BAD_REQUEST,
            "/",
            Some("the form is incomplete"),
        );
    };
    let next = safe_next(Some(&f.next));
    if !st.auth.enabled() {
        return Redirect::to(&next).into_response();
    }
    let credential = format!("Bearer {}", f.token.trim());
    if let Err(e) = st.auth.authenticate(Some(&credential), None) {
        st.failed(remote.as_ref().map(|Extension(r)| r));
        return login_page(
            &st,
            &headers,
            StatusCode::UNAUTHORIZED,
            &next,
            Some(&e.to_string()),
        );
    }
    let (id, _) = st.login(credential, auth::clean_name(&f.name));
    let cookie = format!(
        "{SESSION_COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        SESSION_TTL.as_secs()
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to(&next)).into_response()
}

/// POST /logout.
pub(super) async fn logout(State(st): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    st.logout(&headers);
    let cookie = format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

#[cfg(test)]
mod tests {
    use super::safe_next;
    use proptest::prelude::*;

    proptest! {
        /// The login form's `next`: whatever is sent, the redirect stays on
        /// this site and is a valid header value (no panic in Redirect).
        #[test]
        fn fuzz_login_next(next in "\\PC{0,40}|[/\\\\\t\n\r ]{0,6}[a-z.%0-9]{0,12}") {
            let out = safe_next(Some(&next));
            prop_assert!(out.starts_with('/') && !out.starts_with("//") && !out.contains('\\'));
            prop_assert!(out.bytes().all(|b| b.is_ascii_graphic()), "{:?}", out);
            prop_assert!(axum::http::HeaderValue::from_str(&out).is_ok());
        }
    }
}
