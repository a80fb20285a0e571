//! The only code (besides the participant client) that touches generated
//! proto types: requests to domain values, domain values to responses.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::domain::{
    Definition, DefinitionDraft, RetryDraft, RetryPolicy, Saga, SagaState, StepDraft, StepState,
    ValidationError,
};
use crate::proto;
use crate::store::{Registered, StoredEvent};

/// A proto duration as a std one; negative or malformed is an error naming
/// `field`.
pub fn duration_in(
    field: &str,
    d: Option<&prost_types::Duration>,
) -> Result<Option<Duration>, ValidationError> {
    let Some(d) = d else { return Ok(None) };
    if d.seconds < 0 || d.nanos < 0 {
        return Err(ValidationError::new(field, "must not be negative"));
    }
    if d.nanos >= 1_000_000_000 {
        return Err(ValidationError::new(field, "nanos must be below 1e9"));
    }
    Ok(Some(Duration::new(d.seconds as u64, d.nanos as u32)))
}

/// A std duration as a proto one.
pub fn duration_out(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

/// A timestamp as a proto one.
pub fn timestamp_out(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

fn retry_in(field: &str, r: Option<&proto::RetryPolicy>) -> Result<RetryDraft, ValidationError> {
    let Some(r) = r else {
        return Ok(RetryDraft::default());
    };
    Ok(RetryDraft {
        max_attempts: r.max_attempts,
        initial_backoff: duration_in(
            &format!("{field}.initial_backoff"),
            r.initial_backoff.as_ref(),
        )?,
        multiplier: r.multiplier,
        max_backoff: duration_in(&format!("{field}.max_backoff"), r.max_backoff.as_ref())?,
    })
}

/// A registration request's definition as a draft to validate.
pub fn definition_in(d: Option<proto::SagaDefinition>) -> Result<DefinitionDraft, ValidationError> {
    let d = d.ok_or_else(|| ValidationError::new("definition", "required"))?;
    let mut steps = Vec::with_capacity(d.steps.len().min(crate::domain::STEPS_MAX + 1));
    for (i, s) in d.steps.into_iter().enumerate() {
        let f = format!("definition.steps[{i}]");
        steps.push(StepDraft {
            timeout: duration_in(&format!("{f}.timeout"), s.timeout.as_ref())?,
            retry: retry_in(&format!("{f}.retry"), s.retry.as_ref())?,
            compensation_retry: retry_in(
                &format!("{f}.compensation_retry"),
                s.compensation_retry.as_ref(),
            )?,
            name: s.name,
            participant: s.participant,
            action: s.action,
            compensation: s.compensation,
            idempotent: s.idempotent,
        });
    }
    Ok(DefinitionDraft {
        name: d.name,
        steps,
        deadline: duration_in("definition.deadline", d.deadline.as_ref())?,
    })
}

fn retry_out(r: &RetryPolicy) -> proto::RetryPolicy {
    proto::RetryPolicy {
        max_attempts: r.max_attempts,
        initial_backoff: Some(duration_out(r.initial_backoff)),
        multiplier: r.multiplier,
        max_backoff: Some(duration_out(r.max_backoff)),
    }
}

/// A stored definition as a proto one.
pub fn definition_out(d: &Definition, registered: Option<&Registered>) -> proto::SagaDefinition {
    proto::SagaDefinition {
        name: d.name.clone(),
        version: d.version,
        steps: d
            .steps
            .iter()
            .map(|s| proto::StepDefinition {
                name: s.name.clone(),
                participant: s.participant.clone(),
                action: s.action.clone(),
                compensation: s.compensation.clone().unwrap_or_default(),
                idempotent: s.idempotent,
                timeout: Some(duration_out(s.timeout)),
                retry: Some(retry_out(&s.retry)),
                compensation_retry: Some(retry_out(&s.compensation_retry)),
            })
            .collect(),
        deadline: d.deadline.map(duration_out),
        created_at: registered.map(|r| timestamp_out(r.at)),
        registered_by: registered.and_then(|r| r.by.clone()).unwrap_or_default(),
    }
}

/// A saga state from the wire; `field` names it in errors.
pub fn saga_state_in(field: &str, v: i32) -> Result<SagaState, ValidationError> {
    match proto::SagaState::try_from(v) {
        Ok(proto::SagaState::Running) => Ok(SagaState::Running),
        Ok(proto::SagaState::Compensating) => Ok(SagaState::Compensating),
        Ok(proto::SagaState::Completed) => Ok(SagaState::Completed),
        Ok(proto::SagaState::Compensated) => Ok(SagaState::Compensated),
        Ok(proto::SagaState::Suspended) => Ok(SagaState::Suspended),
        Ok(proto::SagaState::Resolved) => Ok(SagaState::Resolved),
        Ok(proto::SagaState::Unspecified) | Err(_) => Err(ValidationError::new(
            field,
            format!("{v} is not a saga state"),
        )),
    }
}

fn saga_state_out(s: SagaState) -> proto::SagaState {
    match s {
        SagaState::Running => proto::SagaState::Running,
        SagaState::Compensating => proto::SagaState::Compensating,
        SagaState::Completed => proto::SagaState::Completed,
        SagaState::Compensated => proto::SagaState::Compensated,
        SagaState::Suspended => proto::SagaState::Suspended,
        SagaState::Resolved => proto::SagaState::Resolved,
    }
}

fn step_state_out(s: StepState) -> proto::StepState {
    match s {
        StepState::Pending => proto::StepState::Pending,
        StepState::Running => proto::StepState::Running,
        StepState::Succeeded => proto::StepState::Succeeded,
        StepState::Failed => proto::StepState::Failed,
        StepState::Compensating => proto::StepState::Compensating,
        StepState::Compensated => proto::StepState::Compensated,
    }
}

/// A saga as a proto one; step names come from its definition.
pub fn saga_out(s: &Saga, def: &Definition) -> proto::Saga {
    proto::Saga {
        saga_id: s.id.to_string(),
        definition: s.definition.clone(),
        version: s.version,
        state: saga_state_out(s.state) as i32,
        input_json: s.input.clone(),
        steps: s
            .steps
            .iter()
            .enumerate()
            .map(|(i, st)| proto::StepStatus {
                name: def.steps.get(i).map(|d| d.name.clone()).unwrap_or_default(),
                state: step_state_out(st.state) as i32,
                attempts: st.attempts,
                compensation_attempts: st.compensation_attempts,
                last_error: st.last_error.clone().unwrap_or_default(),
                output_json: st.output.clone().unwrap_or_default(),
                next_attempt_at: st.next_attempt_at.map(timestamp_out),
            })
            .collect(),
        error: s.error.clone().unwrap_or_default(),
        created_at: Some(timestamp_out(s.created_at)),
        updated_at: Some(timestamp_out(s.updated_at)),
        started_by: s.started_by.clone().unwrap_or_default(),
    }
}

/// A history entry as a proto one.
pub fn event_out(e: &StoredEvent) -> proto::SagaEvent {
    proto::SagaEvent {
        seq: e.seq.max(0) as u64,
        at: Some(timestamp_out(e.at)),
        kind: e.kind.as_str().to_owned(),
        step: e.step.clone().unwrap_or_default(),
        attempt: e.attempt,
        detail: e.detail.clone(),
    }
}
