//! How domain values are laid out in a store's columns, whatever the
//! database: the steps and the trace context as JSON text, the listing's
//! denormalised progress. Each store decodes its own rows with these.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::domain::{Definition, Saga, SagaState, SagaTrace, Step, StepState};

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

pub(crate) fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
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

pub(crate) fn decode_steps(value: serde_json::Value) -> Result<Vec<Step>, StoreError> {
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

pub(crate) fn parse_state(s: &str) -> Result<SagaState, StoreError> {
    SagaState::parse(s).ok_or_else(|| corrupt("saga state", s))
}

/// `sagas.trace_context`.
pub fn encode_trace(trace: Option<&SagaTrace>) -> Result<Option<String>, StoreError> {
    trace
        .map(|t| serde_json::to_string(t).map_err(|e| StoreError::Internal(e.to_string())))
        .transpose()
}

pub(crate) fn decode_trace(text: Option<String>) -> Result<Option<SagaTrace>, StoreError> {
    text.map(|t| serde_json::from_str(&t).map_err(|e| corrupt("trace context", e)))
        .transpose()
}

/// The denormalised listing columns: the step in progress and the attempts
/// of its current phase.
pub fn current_progress(saga: &Saga) -> (Option<i32>, i32) {
    match saga.progress() {
        Some((at, attempts)) => (Some(at as i32), attempts.min(i32::MAX as u32) as i32),
        None => (None, 0),
    }
}

/// A stored definition's content (JSON) at `version`.
pub(crate) fn decode_definition_content(
    content: serde_json::Value,
    version: i64,
) -> Result<Definition, StoreError> {
    let mut def: Definition =
        serde_json::from_value(content).map_err(|e| corrupt("definition", e))?;
    def.version = version.clamp(0, i64::from(u32::MAX)) as u32;
    Ok(def)
}

/// What a saga weighs in a list answer: its input, outputs and errors.
pub(crate) fn saga_bytes(s: &crate::domain::Saga) -> usize {
    let steps: usize = s
        .steps
        .iter()
        .map(|st| {
            st.output.as_ref().map_or(0, String::len)
                + st.last_error.as_ref().map_or(0, String::len)
                + 64
        })
        .sum();
    s.input.len() + s.error.as_ref().map_or(0, String::len) + steps + 256
}

/// Per-minute activity from `(minute, kind, n)` rows ordered by minute, as
/// both stores' activity queries return them.
pub(crate) fn fold_activity(
    rows: impl IntoIterator<Item = (DateTime<Utc>, String, i64)>,
) -> Result<Vec<super::ActivityMinute>, StoreError> {
    let mut out: Vec<super::ActivityMinute> = Vec::new();
    for (minute, kind, n) in rows {
        if out.last().is_none_or(|m| m.minute != minute) {
            out.push(super::ActivityMinute {
                minute,
                ..Default::default()
            });
        }
        let Some(m) = out.last_mut() else { continue };
        match kind.as_str() {
            "started" => m.started = n,
            "completed" => m.completed = n,
            "compensated" => m.compensated = n,
            "suspended" => m.suspended = n,
            other => return Err(StoreError::Internal(format!("activity kind {other:?}"))),
        }
    }
    Ok(out)
}
