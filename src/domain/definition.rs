//! Saga definitions: the validated, immutable description of a saga's steps.
//!
//! This module owns what a definition *is* and which definitions are legal
//! (names, limits, the Garcia-Molina step order). It knows nothing of storage
//! or wire formats: `api::convert` turns proto messages into a
//! [`DefinitionDraft`], [`DefinitionDraft::validate`] turns that into a
//! [`Definition`] with every default resolved, and the store persists it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ValidationError;

/// Most steps a definition may have.
pub const STEPS_MAX: usize = 100;
/// Longest name (definition, step, participant, handler), in bytes.
pub const NAME_BYTES_MAX: usize = 128;
/// Largest `max_attempts` a retry policy may ask for.
pub const ATTEMPTS_MAX: u32 = 1_000;
/// Shortest accepted per-attempt timeout or backoff.
pub const DURATION_MIN: Duration = Duration::from_millis(1);
/// Longest accepted per-attempt timeout and initial backoff.
pub const TIMEOUT_MAX: Duration = Duration::from_secs(3_600);
/// Longest accepted max backoff.
pub const BACKOFF_MAX: Duration = Duration::from_secs(24 * 3_600);
/// Longest accepted saga deadline.
pub const DEADLINE_MAX: Duration = Duration::from_secs(30 * 24 * 3_600);
/// Largest accepted backoff multiplier.
pub const MULTIPLIER_MAX: f64 = 10.0;

/// Defaults applied where a definition leaves a setting unset.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// Per-attempt timeout.
    pub timeout: Duration,
    /// Retry policy of compensatable steps and the pivot.
    pub action_retry: RetryPolicy,
    /// Retry policy of retriable steps (after the pivot): these must finish, so
    /// they get a larger budget.
    pub retriable_retry: RetryPolicy,
    /// Retry policy of compensations.
    pub compensation_retry: RetryPolicy,
}

impl Default for Defaults {
    fn default() -> Self {
        let policy = |max_attempts| RetryPolicy {
            max_attempts,
            initial_backoff: Duration::from_millis(100),
            multiplier: 2.0,
            max_backoff: Duration::from_secs(10),
        };
        Defaults {
            timeout: Duration::from_secs(10),
            action_retry: policy(3),
            retriable_retry: policy(10),
            compensation_retry: policy(10),
        }
    }
}

/// A resolved retry policy: exponential backoff with full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Upper bound of the first backoff.
    #[serde(with = "millis")]
    pub initial_backoff: Duration,
    /// Growth of the bound per attempt.
    pub multiplier: f64,
    /// Cap of the bound.
    #[serde(with = "millis")]
    pub max_backoff: Duration,
}

/// A step as stored: every default resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepDefinition {
    /// Unique within the definition.
    pub name: String,
    /// Logical participant name.
    pub participant: String,
    /// Handler name of the action.
    pub action: String,
    /// Handler name of the compensation; `None` for the pivot and later steps.
    pub compensation: Option<String>,
    /// May be invoked again with the same idempotency key.
    pub idempotent: bool,
    /// Per-attempt timeout.
    #[serde(with = "millis")]
    pub timeout: Duration,
    /// Policy for the action.
    pub retry: RetryPolicy,
    /// Policy for the compensation.
    pub compensation_retry: RetryPolicy,
}

/// Garcia-Molina's step kinds, derived from the step order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// Has a compensation; comes before the pivot.
    Compensatable,
    /// The first step without a compensation: the point of no return.
    Pivot,
    /// After the pivot: idempotent, retried until it succeeds.
    Retriable,
}

impl StepKind {
    /// Lower-case name for people.
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Compensatable => "compensatable",
            StepKind::Pivot => "pivot",
            StepKind::Retriable => "retriable",
        }
    }
}

/// A validated definition. `version` is 0 until the store assigns one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Definition {
    /// Definition name.
    pub name: String,
    /// Version, assigned by the store (1, 2, ...).
    pub version: u32,
    /// Steps in execution order.
    pub steps: Vec<StepDefinition>,
    /// Time from start after which a saga that has not passed its pivot is
    /// compensated.
    #[serde(with = "opt_millis")]
    pub deadline: Option<Duration>,
}

impl Definition {
    /// Index of the pivot step, if the definition has one.
    pub fn pivot(&self) -> Option<usize> {
        self.steps.iter().position(|s| s.compensation.is_none())
    }

    /// Kind of step `index`.
    pub fn kind(&self, index: usize) -> StepKind {
        match self.pivot() {
            Some(p) if index == p => StepKind::Pivot,
            Some(p) if index > p => StepKind::Retriable,
            _ => StepKind::Compensatable,
        }
    }

    /// The content that decides whether two registrations are "the same":
    /// everything but the version.
    pub fn content_eq(&self, other: &Definition) -> bool {
        self.name == other.name && self.steps == other.steps && self.deadline == other.deadline
    }
}

/// A retry policy as a client sent it: zero or `None` means "the default".
#[derive(Debug, Clone, Default)]
pub struct RetryDraft {
    /// 0 = default.
    pub max_attempts: u32,
    /// `None` = default.
    pub initial_backoff: Option<Duration>,
    /// 0 = default.
    pub multiplier: f64,
    /// `None` = default.
    pub max_backoff: Option<Duration>,
}

/// A step as a client sent it.
#[derive(Debug, Clone, Default)]
pub struct StepDraft {
    /// Step name.
    pub name: String,
    /// Participant name.
    pub participant: String,
    /// Action handler.
    pub action: String,
    /// Compensation handler; empty = none.
    pub compensation: String,
    /// Idempotent flag.
    pub idempotent: bool,
    /// `None` = default.
    pub timeout: Option<Duration>,
    /// Action policy.
    pub retry: RetryDraft,
    /// Compensation policy.
    pub compensation_retry: RetryDraft,
}

/// A definition as a client sent it, before validation.
#[derive(Debug, Clone, Default)]
pub struct DefinitionDraft {
    /// Definition name.
    pub name: String,
    /// Steps in order.
    pub steps: Vec<StepDraft>,
    /// `None` = no deadline.
    pub deadline: Option<Duration>,
}

impl DefinitionDraft {
    /// Checks every rule and resolves defaults. Errors name the field, e.g.
    /// `definition.steps[1].timeout`.
    pub fn validate(self, defaults: &Defaults) -> Result<Definition, ValidationError> {
        check_name("definition.name", &self.name, false)?;
        if self.steps.is_empty() {
            return Err(ValidationError::new(
                "definition.steps",
                "must not be empty",
            ));
        }
        if self.steps.len() > STEPS_MAX {
            return Err(ValidationError::new(
                "definition.steps",
                format!(
                    "has {} steps; at most {STEPS_MAX} are allowed",
                    self.steps.len()
                ),
            ));
        }
        if let Some(d) = self.deadline {
            check_range("definition.deadline", d, DURATION_MIN, DEADLINE_MAX)?;
        }
        let mut pivot: Option<String> = None;
        let mut steps = Vec::with_capacity(self.steps.len());
        for (i, s) in self.steps.into_iter().enumerate() {
            let field = format!("definition.steps[{i}]");
            let step = validate_step(&field, s, pivot.as_deref(), defaults)?;
            if steps.iter().any(|p: &StepDefinition| p.name == step.name) {
                return Err(ValidationError::new(
                    format!("{field}.name"),
                    format!("step name {:?} is used twice", step.name),
                ));
            }
            if step.compensation.is_none() && pivot.is_none() {
                pivot = Some(step.name.clone());
            }
            steps.push(step);
        }
        Ok(Definition {
            name: self.name,
            version: 0,
            steps,
            deadline: self.deadline,
        })
    }
}

fn validate_step(
    field: &str,
    s: StepDraft,
    pivot: Option<&str>,
    defaults: &Defaults,
) -> Result<StepDefinition, ValidationError> {
    check_name(&format!("{field}.name"), &s.name, false)?;
    check_name(&format!("{field}.participant"), &s.participant, false)?;
    check_name(&format!("{field}.action"), &s.action, true)?;
    let compensation = if s.compensation.is_empty() {
        None
    } else {
        check_name(&format!("{field}.compensation"), &s.compensation, true)?;
        Some(s.compensation)
    };
    if let Some(pivot) = pivot {
        // Garcia-Molina order: compensatable* pivot? retriable*.
        if compensation.is_some() {
            return Err(ValidationError::new(
                format!("{field}.compensation"),
                format!(
                    "step {:?} has a compensation but comes after the pivot {pivot:?}; \
                     steps after the point of no return are never compensated \
                     (order must be compensatable* pivot? retriable*)",
                    s.name
                ),
            ));
        }
        if !s.idempotent {
            return Err(ValidationError::new(
                format!("{field}.idempotent"),
                format!(
                    "step {:?} comes after the pivot {pivot:?}, so it is retried until it \
                     succeeds and must be idempotent",
                    s.name
                ),
            ));
        }
    }
    let timeout = match s.timeout {
        None => defaults.timeout,
        Some(t) => check_range(&format!("{field}.timeout"), t, DURATION_MIN, TIMEOUT_MAX)?,
    };
    let action_default = if pivot.is_some() {
        &defaults.retriable_retry
    } else {
        &defaults.action_retry
    };
    let retry = resolve_retry(&format!("{field}.retry"), s.retry, action_default)?;
    let compensation_retry = resolve_retry(
        &format!("{field}.compensation_retry"),
        s.compensation_retry,
        &defaults.compensation_retry,
    )?;
    Ok(StepDefinition {
        name: s.name,
        participant: s.participant,
        action: s.action,
        compensation,
        idempotent: s.idempotent,
        timeout,
        retry,
        compensation_retry,
    })
}

fn resolve_retry(
    field: &str,
    r: RetryDraft,
    default: &RetryPolicy,
) -> Result<RetryPolicy, ValidationError> {
    let max_attempts = match r.max_attempts {
        0 => default.max_attempts,
        n if n > ATTEMPTS_MAX => {
            return Err(ValidationError::new(
                format!("{field}.max_attempts"),
                format!("{n} is more than the limit of {ATTEMPTS_MAX}"),
            ))
        }
        n => n,
    };
    let initial_backoff = match r.initial_backoff {
        None => default.initial_backoff,
        Some(d) => check_range(
            &format!("{field}.initial_backoff"),
            d,
            DURATION_MIN,
            TIMEOUT_MAX,
        )?,
    };
    let multiplier = if r.multiplier == 0.0 {
        default.multiplier
    } else if !(1.0..=MULTIPLIER_MAX).contains(&r.multiplier) {
        // NaN lands here too: `contains` is false for it.
        return Err(ValidationError::new(
            format!("{field}.multiplier"),
            format!("{} is outside 1.0..={MULTIPLIER_MAX}", r.multiplier),
        ));
    } else {
        r.multiplier
    };
    let max_backoff = match r.max_backoff {
        None => default.max_backoff.max(initial_backoff),
        Some(d) => check_range(
            &format!("{field}.max_backoff"),
            d,
            initial_backoff,
            BACKOFF_MAX,
        )?,
    };
    Ok(RetryPolicy {
        max_attempts,
        initial_backoff,
        multiplier,
        max_backoff,
    })
}

fn check_range(
    field: &str,
    d: Duration,
    min: Duration,
    max: Duration,
) -> Result<Duration, ValidationError> {
    if d < min || d > max {
        return Err(ValidationError::new(
            field,
            format!("{d:?} is outside {min:?}..={max:?}"),
        ));
    }
    // Stored with millisecond precision: truncate now so that registering the
    // same content twice compares equal.
    Ok(Duration::from_millis(d.as_millis() as u64))
}

/// Names are 1..=128 bytes of `[A-Za-z0-9_.-]`, starting with a letter or
/// digit; handler names may also use `/` and `:` (e.g. `payments/charge`).
pub fn check_name(field: &str, name: &str, handler: bool) -> Result<(), ValidationError> {
    if name.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(ValidationError::new(
            field,
            format!(
                "is {} bytes; at most {NAME_BYTES_MAX} are allowed",
                name.len()
            ),
        ));
    }
    let ok_char = |c: char| {
        c.is_ascii_alphanumeric()
            || matches!(c, '_' | '.' | '-')
            || (handler && matches!(c, '/' | ':'))
    };
    let starts_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if !starts_ok || !name.chars().all(ok_char) {
        let allowed = if handler {
            "[A-Za-z0-9_.:/-]"
        } else {
            "[A-Za-z0-9_.-]"
        };
        return Err(ValidationError::new(
            field,
            format!("{name:?} must start with a letter or digit and use only {allowed}"),
        ));
    }
    Ok(())
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

mod opt_millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<u64>::deserialize(d).map(|o| o.map(Duration::from_millis))
    }
}
