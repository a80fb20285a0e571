//! Row encoding and decoding: the only place that knows how domain types are
//! laid out in columns.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use crate::domain::{Definition, Saga, SagaId, SagaState, SagaTrace, Step, StepState};
use crate::store::{Registered, StoreError};

/// The columns [`decode_saga`] reads, qualified with `s.` (alias `sagas s`).
pub const SAGA_COLUMNS: &str = "s.saga_id, s.definition, s.version, s.state, s.suspended_from, \
     s.input, s.steps, s.error, s.deadline_at, s.created_at, s.updated_at, s.started_by, s.trace_context";

/// A step as stored inside `sagas.steps`.
#[derive(Serialize, Deserialize)]
struct StoredStep {
    state: String,
    #[serde(default)]
    attempts: u32,
    #[serde(default)]
    compensation_attempts: u32,
    #[serde(default)]
    budget_from: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next_attempt_at: Option<DateTime<Utc>>,
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("corrupt stored {what}: {e}"))
}

/// `sagas.steps` (JSON text) from the domain's steps.
pub fn encode_steps(steps: &[Step]) -> Result<String, StoreError> {
    let stored: Vec<StoredStep> = steps
        .iter()
        .map(|s| StoredStep {
            state: s.state.as_str().to_owned(),
            attempts: s.attempts,
            compensation_attempts: s.compensation_attempts,
            budget_from: s.budget_from,
            last_error: s.last_error.clone(),
            output: s.output.clone(),
            next_attempt_at: s.next_attempt_at,
        })
        .collect();
    serde_json::to_string(&stored).map_err(|e| corrupt("steps", e))
}

fn decode_steps(value: serde_json::Value) -> Result<Vec<Step>, StoreError> {
    let stored: Vec<StoredStep> = serde_json::from_value(value).map_err(|e| corrupt("steps", e))?;
    stored
        .into_iter()
        .map(|s| {
            Ok(Step {
                state: StepState::parse(&s.state).ok_or_else(|| corrupt("step state", &s.state))?,
                attempts: s.attempts,
                compensation_attempts: s.compensation_attempts,
                budget_from: s.budget_from,
                last_error: s.last_error,
                output: s.output,
                next_attempt_at: s.next_attempt_at,
            })
        })
        .collect()
}

fn parse_state(s: &str) -> Result<SagaState, StoreError> {
    SagaState::parse(s).ok_or_else(|| corrupt("saga state", s))
}

/// A saga from a row holding [`SAGA_COLUMNS`].
pub fn decode_saga(row: &PgRow) -> Result<Saga, StoreError> {
    let state: String = row.try_get("state")?;
    let suspended_from: Option<String> = row.try_get("suspended_from")?;
    Ok(Saga {
        id: SagaId(row.try_get::<Uuid, _>("saga_id")?),
        definition: row.try_get("definition")?,
        version: row.try_get::<i32, _>("version")?.max(0) as u32,
        state: parse_state(&state)?,
        suspended_from: suspended_from.as_deref().map(parse_state).transpose()?,
        input: row.try_get("input")?,
        steps: decode_steps(row.try_get("steps")?)?,
        error: row.try_get("error")?,
        deadline_at: row.try_get("deadline_at")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        started_by: row.try_get("started_by")?,
        trace: decode_trace(row.try_get("trace_context")?)?,
    })
}

/// `sagas.trace_context`.
pub fn encode_trace(trace: Option<&SagaTrace>) -> Result<Option<String>, StoreError> {
    trace
        .map(|t| serde_json::to_string(t).map_err(|e| StoreError::Internal(e.to_string())))
        .transpose()
}

fn decode_trace(text: Option<String>) -> Result<Option<SagaTrace>, StoreError> {
    text.map(|t| serde_json::from_str(&t).map_err(|e| corrupt("trace context", e)))
        .transpose()
}

/// A definition and its registration from `(version, content, created_at,
/// registered_by)`.
pub fn decode_definition(row: &PgRow) -> Result<(Definition, Registered), StoreError> {
    let content: serde_json::Value = row.try_get("content")?;
    let mut def: Definition =
        serde_json::from_value(content).map_err(|e| corrupt("definition", e))?;
    def.version = row.try_get::<i32, _>("version")?.max(0) as u32;
    Ok((
        def,
        Registered {
            at: row.try_get("created_at")?,
            by: row.try_get("registered_by")?,
        },
    ))
}

/// The denormalised listing columns: the step in progress and the attempts
/// of its current phase.
pub fn current_progress(saga: &Saga) -> (Option<i32>, i32) {
    match saga.progress() {
        Some((at, attempts)) => (Some(at as i32), attempts.min(i32::MAX as u32) as i32),
        None => (None, 0),
    }
}
