//! The JSON API: the same data as the page, for scripts.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{AdminState, Caller, HttpError};
use crate::auth;
use crate::domain::{Definition, Saga, SagaId, SagaState, ValidationError};
use crate::ops::{self, OperatorKind, OpsError};
use crate::store::{Registered, SagaQuery, StoredEvent};

/// Filters shared by the page and the API.
pub(super) struct Filters {
    pub states: Vec<SagaState>,
    pub definition: Option<String>,
    pub min_age_secs: Option<u64>,
    pub stuck: bool,
    pub page_size: u32,
    pub page_token: Option<String>,
}

impl Filters {
    /// Parses `state` (comma-separated), `definition`, `min_age_secs`,
    /// `stuck`, `page_size` and `page_token`.
    pub fn parse(
        p: &HashMap<String, String>,
        default_size: u32,
        max_size: u32,
    ) -> Result<Filters, ValidationError> {
        let get = |k: &str| p.get(k).map(|s| s.trim()).filter(|s| !s.is_empty());
        let states = match get("state") {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|s| {
                    SagaState::parse(&s.trim().to_ascii_uppercase()).ok_or_else(|| {
                        ValidationError::new("state", format!("{s:?} is not a saga state"))
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let definition = match get("definition") {
            Some(d) => {
                crate::domain::check_name("definition", d, false)?;
                Some(d.to_owned())
            }
            None => None,
        };
        let number = |k: &str| -> Result<Option<u64>, ValidationError> {
            get(k)
                .map(|v| {
                    v.parse::<u64>().map_err(|_| {
                        ValidationError::new(k, format!("{v:?} is not a whole number"))
                    })
                })
                .transpose()
        };
        let stuck = match get("stuck") {
            None | Some("false") | Some("0") => false,
            Some("true") | Some("1") | Some("on") => true,
            Some(v) => {
                return Err(ValidationError::new(
                    "stuck",
                    format!("{v:?} is not true or false"),
                ))
            }
        };
        let page_size = match number("page_size")? {
            None | Some(0) => default_size,
            Some(n) => n.min(u64::from(max_size)) as u32,
        };
        Ok(Filters {
            states,
            definition,
            min_age_secs: number("min_age_secs")?,
            stuck,
            page_size,
            page_token: get("page_token").map(str::to_owned),
        })
    }

    /// The store query (`stuck` forced on or off by the caller).
    pub fn query(&self, st: &AdminState, stuck: bool) -> Result<SagaQuery, ValidationError> {
        let now = st.ops.worker.db_now();
        Ok(SagaQuery {
            states: self.states.clone(),
            definition: self.definition.clone(),
            stuck: stuck.then_some(st.cfg.stuck),
            created_before: self
                .min_age_secs
                .map(|secs| {
                    ops::older_than("min_age_secs", now, std::time::Duration::from_secs(secs))
                })
                .transpose()?,
            limit: self.page_size,
            after: ops::decode_page_token(self.page_token.as_deref().unwrap_or(""))?,
            started_by: None,
            bytes_max: Some(st.cfg.page_bytes_max),
        })
    }
}

pub(super) fn parse_id(s: &str) -> Result<SagaId, OpsError> {
    Ok(SagaId::parse("saga_id", s)?)
}

fn json_text(s: Option<&str>) -> Value {
    match s {
        None => Value::Null,
        Some(t) => serde_json::from_str(t).unwrap_or_else(|_| Value::String(t.to_owned())),
    }
}

/// A saga as JSON; step names and kinds come from its definition.
pub(super) fn saga_json(s: &Saga, def: &Definition) -> Value {
    let progress = s.progress();
    json!({
        "saga_id": s.id.to_string(),
        "definition": s.definition,
        "version": s.version,
        "state": s.state.as_str(),
        "error": s.error,
        "input": json_text(Some(&s.input)),
        "created_at": s.created_at,
        "updated_at": s.updated_at,
        "started_by": s.started_by,
        "deadline_at": s.deadline_at,
        "current_step": progress.and_then(|(i, _)| def.steps.get(i)).map(|d| d.name.clone()),
        "current_attempts": progress.map(|(_, a)| a),
        "steps": s.steps.iter().enumerate().map(|(i, st)| json!({
            "name": def.steps.get(i).map(|d| d.name.clone()),
            "kind": def.kind(i).as_str(),
            "state": st.state.as_str(),
            "attempts": st.attempts,
            "compensation_attempts": st.compensation_attempts,
            "last_error": st.last_error,
            "output": json_text(st.output.as_deref()),
            "next_attempt_at": st.next_attempt_at,
        })).collect::<Vec<_>>(),
    })
}

pub(super) fn definition_json(d: &Definition, registered: &Registered) -> Value {
    json!({
        "name": d.name,
        "version": d.version,
        "created_at": registered.at,
        "registered_by": registered.by,
        "deadline_ms": d.deadline.map(|x| x.as_millis() as u64),
        "steps": d.steps.iter().enumerate().map(|(i, s)| json!({
            "name": s.name,
            "kind": d.kind(i).as_str(),
            "participant": s.participant,
            "action": s.action,
            "compensation": s.compensation,
            "idempotent": s.idempotent,
            "timeout_ms": s.timeout.as_millis() as u64,
            "retry": s.retry,
            "compensation_retry": s.compensation_retry,
        })).collect::<Vec<_>>(),
    })
}

fn event_json(e: &StoredEvent) -> Value {
    json!({"seq": e.seq, "at": e.at, "kind": e.kind.as_str(), "step": e.step, "attempt": e.attempt, "detail": e.detail})
}

type JsonResult = Result<Json<Value>, HttpError>;

pub(super) async fn stats(State(st): State<Arc<AdminState>>) -> JsonResult {
    let window = std::time::Duration::from_secs(24 * 3_600);
    let counts = st
        .ops
        .store
        .saga_counts(st.cfg.stuck, window)
        .await
        .map_err(OpsError::from)?;
    let mut by_state = serde_json::Map::new();
    for s in SagaState::ALL {
        let n = counts
            .by_state
            .iter()
            .find(|(x, _)| x == s)
            .map_or(0, |(_, n)| *n);
        by_state.insert(s.as_str().to_owned(), json!(n));
    }
    Ok(Json(json!({
        "counts": by_state,
        "stuck": counts.stuck,
        "settled_window_hours": 24,
        "count_cap": crate::store::COUNT_CAP,
    })))
}

pub(super) async fn list(
    State(st): State<Arc<AdminState>>,
    Query(p): Query<HashMap<String, String>>,
) -> JsonResult {
    let f = Filters::parse(&p, st.cfg.page_rows_default, st.cfg.page_rows_max)
        .map_err(OpsError::from)?;
    let page = st
        .ops
        .store
        .saga_list(&f.query(&st, f.stuck).map_err(OpsError::from)?)
        .await
        .map_err(OpsError::from)?;
    let mut sagas = Vec::with_capacity(page.sagas.len());
    for s in &page.sagas {
        let def = st.ops.definition(&s.definition, s.version).await?;
        sagas.push(saga_json(s, &def));
    }
    Ok(Json(
        json!({"sagas": sagas, "next_page_token": page.next.map(ops::encode_page_token)}),
    ))
}

pub(super) async fn saga(State(st): State<Arc<AdminState>>, Path(id): Path<String>) -> JsonResult {
    let rec = st.ops.record(parse_id(&id)?).await?;
    let def = st
        .ops
        .definition(&rec.saga.definition, rec.saga.version)
        .await?;
    Ok(Json(saga_json(&rec.saga, &def)))
}

pub(super) async fn events(
    State(st): State<Arc<AdminState>>,
    Path(id): Path<String>,
) -> JsonResult {
    let id = parse_id(&id)?;
    st.ops.record(id).await?;
    let events = st.ops.store.saga_events(id).await.map_err(OpsError::from)?;
    Ok(Json(
        json!({"events": events.iter().map(event_json).collect::<Vec<_>>()}),
    ))
}

pub(super) async fn definitions(State(st): State<Arc<AdminState>>) -> JsonResult {
    let defs = st
        .ops
        .store
        .definition_list()
        .await
        .map_err(OpsError::from)?;
    Ok(Json(
        json!({"definitions": defs.iter().map(|(d, at)| definition_json(d, at)).collect::<Vec<_>>()}),
    ))
}

/// GET /api/participants: the balancing state of /participants.
pub(super) async fn participants(State(st): State<Arc<AdminState>>) -> JsonResult {
    let pools: Vec<serde_json::Value> = st
        .participants
        .pools()
        .iter()
        .map(|p| {
            json!({
                "participant": p.participant,
                "policy": p.policy.as_str(),
                "in_flight": p.in_flight,
                "in_flight_max": p.in_flight_max,
                "rate_per_sec": p.rate_per_sec,
                "waited": p.waited,
                "not_sent": p.not_sent,
                "rerouted": p.rerouted,
                "instances": p.instances.iter().map(|i| json!({
                    "endpoint": i.endpoint,
                    "weight": i.weight,
                    "in_flight": i.outstanding,
                    "calls": i.calls,
                    "breaker": i.breaker.as_str(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(json!({ "participants": pools })))
}

#[derive(Deserialize)]
pub(super) struct ActBody {
    #[serde(default)]
    note: String,
}

/// POST /api/sagas/{id}/{retry|abort|resolve}, body `{"note": "…"}`.
pub(super) async fn act(
    State(st): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Json<ActBody>, JsonRejection>,
) -> JsonResult {
    let kind = OperatorKind::parse(&action).ok_or_else(|| {
        HttpError::new(
            StatusCode::NOT_FOUND,
            format!("no action {action:?}: use retry, abort or resolve"),
        )
    })?;
    // Only JSON bodies (a cross-site form cannot send one without a preflight).
    let Json(body) = body.map_err(|e| match e {
        JsonRejection::MissingJsonContentType(_) => HttpError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send a JSON body with Content-Type: application/json",
        ),
        // 400 for bad JSON, 413 for a body over --admin-body-bytes-max.
        other => HttpError::new(other.status(), format!("body: {}", other.body_text())),
    })?;
    let actor = caller.principal.actor(
        headers
            .get(auth::ACTOR_HEADER)
            .and_then(|v| v.to_str().ok()),
        "api",
    );
    let id = parse_id(&id)?;
    let (saga, def) = st.ops.operator(id, kind, &actor, &body.note).await?;
    Ok(Json(saga_json(&saga, &def)))
}

#[cfg(test)]
mod tests {
    use super::Filters;
    use proptest::prelude::*;

    proptest! {
        /// The list filters (query string of the page and the API): no
        /// panic, and a refusal names one of the parameters.
        #[test]
        fn fuzz_list_filters(
            pairs in prop::collection::vec(
                (prop_oneof![
                    Just("state"), Just("definition"), Just("min_age_secs"),
                    Just("stuck"), Just("page_size"), Just("page_token"), Just("other")
                ], "\\PC{0,30}|[0-9]{1,25}"),
                0..6,
            )
        ) {
            let map = pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
            match Filters::parse(&map, 50, 500) {
                Ok(f) => prop_assert!(f.page_size >= 1 && f.page_size <= 500),
                Err(e) => prop_assert!(
                    ["state", "definition", "min_age_secs", "stuck", "page_size"].contains(&e.field.as_str()),
                    "{e}"
                ),
            }
        }
    }
}
