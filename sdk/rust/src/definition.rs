//! Typed saga definitions, checked before they are sent.

use std::time::Duration;

use crate::proto;

/// Why a definition was refused locally (the coordinator checks again).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct DefinitionError {
    /// The offending field, e.g. `steps[2].compensation`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> DefinitionError {
    DefinitionError {
        field: field.into(),
        message: message.into(),
    }
}

/// A retry policy: exponential backoff with full jitter. Unset values take the
/// coordinator's defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (`None`: default).
    pub max_attempts: Option<u32>,
    /// Upper bound of the first wait.
    pub initial_backoff: Option<Duration>,
    /// Growth of the bound per attempt (≥ 1).
    pub multiplier: Option<f64>,
    /// Cap of the bound.
    pub max_backoff: Option<Duration>,
}

impl RetryPolicy {
    /// `max_attempts` attempts with `initial` first backoff, doubling up to
    /// `max`.
    pub fn exponential(max_attempts: u32, initial: Duration, max: Duration) -> Self {
        RetryPolicy {
            max_attempts: Some(max_attempts),
            initial_backoff: Some(initial),
            multiplier: Some(2.0),
            max_backoff: Some(max),
        }
    }

    fn to_proto(self) -> proto::RetryPolicy {
        proto::RetryPolicy {
            max_attempts: self.max_attempts.unwrap_or(0),
            initial_backoff: self.initial_backoff.map(duration),
            multiplier: self.multiplier.unwrap_or(0.0),
            max_backoff: self.max_backoff.map(duration),
        }
    }
}

pub(crate) fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

/// One step: an action at a participant and, before the pivot, its
/// compensation.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    name: String,
    participant: String,
    action: String,
    compensation: Option<String>,
    idempotent: bool,
    timeout: Option<Duration>,
    retry: RetryPolicy,
    compensation_retry: RetryPolicy,
}

impl Step {
    /// A step `name` at `participant`; its action handler is named like the
    /// step until [`Step::action`] says otherwise.
    pub fn new(name: impl Into<String>, participant: impl Into<String>) -> Self {
        let name = name.into();
        Step {
            action: name.clone(),
            name,
            participant: participant.into(),
            compensation: None,
            idempotent: false,
            timeout: None,
            retry: RetryPolicy::default(),
            compensation_retry: RetryPolicy::default(),
        }
    }

    /// The action's handler name.
    pub fn action(mut self, handler: impl Into<String>) -> Self {
        self.action = handler.into();
        self
    }

    /// The compensation's handler name (makes the step compensatable).
    pub fn compensation(mut self, handler: impl Into<String>) -> Self {
        self.compensation = Some(handler.into());
        self
    }

    /// The action may be invoked again with the same idempotency key (the
    /// barrier makes this true for handlers that use it).
    pub fn idempotent(mut self) -> Self {
        self.idempotent = true;
        self
    }

    /// Per-attempt timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Retry policy of the action.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Retry policy of the compensation.
    pub fn compensation_retry(mut self, policy: RetryPolicy) -> Self {
        self.compensation_retry = policy;
        self
    }
}

/// A saga definition under construction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DefinitionBuilder {
    name: String,
    steps: Vec<Step>,
    deadline: Option<Duration>,
}

/// A checked definition, ready for [`crate::Client::register`].
#[derive(Debug, Clone, PartialEq)]
pub struct SagaDefinition {
    pub(crate) proto: proto::SagaDefinition,
}

impl SagaDefinition {
    /// Starts a definition called `name`.
    pub fn builder(name: impl Into<String>) -> DefinitionBuilder {
        DefinitionBuilder {
            name: name.into(),
            ..Default::default()
        }
    }

    /// The definition's name.
    pub fn name(&self) -> &str {
        &self.proto.name
    }

    /// The version the coordinator assigned (0 before registration).
    pub fn version(&self) -> u32 {
        self.proto.version
    }

    /// The wire form.
    pub fn to_proto(&self) -> proto::SagaDefinition {
        self.proto.clone()
    }
}

impl DefinitionBuilder {
    /// Appends a step.
    pub fn step(mut self, step: Step) -> Self {
        self.steps.push(step);
        self
    }

    /// A deadline: if it passes before the pivot, the saga is compensated.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Checks names and the step order (compensatable* pivot? retriable*)
    /// and builds the definition.
    pub fn build(self) -> Result<SagaDefinition, DefinitionError> {
        check_name("name", &self.name)?;
        if self.steps.is_empty() {
            return Err(err("steps", "must not be empty"));
        }
        let mut pivot: Option<&str> = None;
        for (i, s) in self.steps.iter().enumerate() {
            check_name(&format!("steps[{i}].name"), &s.name)?;
            check_name(&format!("steps[{i}].participant"), &s.participant)?;
            if s.action.is_empty() {
                return Err(err(format!("steps[{i}].action"), "must not be empty"));
            }
            if self.steps[..i].iter().any(|p| p.name == s.name) {
                return Err(err(
                    format!("steps[{i}].name"),
                    format!("step name {:?} is used twice", s.name),
                ));
            }
            match (pivot, &s.compensation) {
                (Some(p), Some(_)) => {
                    return Err(err(
                        format!("steps[{i}].compensation"),
                        format!(
                            "step {:?} comes after the pivot {p:?} and cannot have a compensation",
                            s.name
                        ),
                    ))
                }
                (Some(p), None) if !s.idempotent => {
                    return Err(err(
                        format!("steps[{i}].idempotent"),
                        format!(
                            "step {:?} comes after the pivot {p:?}, so it must be idempotent",
                            s.name
                        ),
                    ))
                }
                (None, None) => pivot = Some(&s.name),
                _ => {}
            }
        }
        let steps = self
            .steps
            .iter()
            .map(|s| proto::StepDefinition {
                name: s.name.clone(),
                participant: s.participant.clone(),
                action: s.action.clone(),
                compensation: s.compensation.clone().unwrap_or_default(),
                idempotent: s.idempotent,
                timeout: s.timeout.map(duration),
                retry: Some(s.retry.to_proto()),
                compensation_retry: Some(s.compensation_retry.to_proto()),
            })
            .collect();
        Ok(SagaDefinition {
            proto: proto::SagaDefinition {
                name: self.name,
                version: 0,
                steps,
                deadline: self.deadline.map(duration),
                created_at: None,
                registered_by: String::new(),
            },
        })
    }
}

fn check_name(field: &str, name: &str) -> Result<(), DefinitionError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(err(field, format!("{name:?} must be 1-128 characters of [A-Za-z0-9_.-], starting with a letter or digit")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_checked_before_sending() {
        let ok = SagaDefinition::builder("order")
            .step(Step::new("reserve", "inventory").compensation("release"))
            .step(Step::new("charge", "payments"))
            .step(Step::new("ship", "shipping").idempotent())
            .build();
        assert!(ok.is_ok());
        let late_comp = SagaDefinition::builder("order")
            .step(Step::new("charge", "payments"))
            .step(
                Step::new("ship", "shipping")
                    .idempotent()
                    .compensation("unship"),
            )
            .build();
        assert_eq!(
            late_comp.map_err(|e| e.field),
            Err("steps[1].compensation".to_owned())
        );
        let not_idem = SagaDefinition::builder("order")
            .step(Step::new("charge", "payments"))
            .step(Step::new("ship", "shipping"))
            .build();
        assert_eq!(
            not_idem.map_err(|e| e.field),
            Err("steps[1].idempotent".to_owned())
        );
        let dup = SagaDefinition::builder("o")
            .step(Step::new("a", "p"))
            .step(Step::new("a", "p").idempotent())
            .build();
        assert_eq!(dup.map_err(|e| e.field), Err("steps[1].name".to_owned()));
        assert!(SagaDefinition::builder("o").build().is_err());
        assert!(SagaDefinition::builder("bad name")
            .step(Step::new("a", "p"))
            .build()
            .is_err());
    }
}
