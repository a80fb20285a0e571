//! Saga instances: states, per-step status, and the facts that move them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A saga's id: a UUID, chosen by the caller or by the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SagaId(pub Uuid);

impl SagaId {
    /// Parses a saga id given in `field` (the one parser for every edge).
    /// Bad input is named by its field, and not echoed whole: an id longer
    /// than a UUID is cut in the message.
    /// The nil UUID is refused: it is no saga's id (sagad uses it as a
    /// signal inside).
    pub fn parse(field: &str, s: &str) -> Result<SagaId, crate::domain::ValidationError> {
        let id = Uuid::parse_str(s).map_err(|_| {
            let shown: String = s.chars().take(40).collect();
            let more = if shown.len() < s.len() { "…" } else { "" };
            crate::domain::ValidationError::new(field, format!("{shown:?}{more} is not a UUID"))
        })?;
        if id.is_nil() {
            return Err(crate::domain::ValidationError::new(
                field,
                "the nil UUID is not a saga id",
            ));
        }
        Ok(SagaId(id))
    }
}

impl std::fmt::Display for SagaId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

string_enum! {
    /// Where a saga is in its life.
    SagaState {
        /// Going forward.
        Running = "RUNNING",
        /// Running compensations in reverse order.
        Compensating = "COMPENSATING",
        /// Every step applied.
        Completed = "COMPLETED",
        /// Every applied step compensated.
        Compensated = "COMPENSATED",
        /// Needs an operator.
        Suspended = "SUSPENDED",
        /// Finished by an operator's hand.
        Resolved = "RESOLVED",
    }
}

impl SagaState {
    /// No transition leaves a terminal state.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            SagaState::Completed | SagaState::Compensated | SagaState::Resolved
        )
    }

    /// The states `WaitSaga` returns on: terminal, or needing an operator.
    pub fn is_settled(self) -> bool {
        self.is_terminal() || self == SagaState::Suspended
    }
}

string_enum! {
    /// Where one step is.
    StepState {
        /// Not started, or nothing took effect yet.
        Pending = "PENDING",
        /// Invoked and its outcome is not known: it may have taken effect.
        Running = "RUNNING",
        /// The action succeeded.
        Succeeded = "SUCCEEDED",
        /// The action was refused: it did not take effect.
        Failed = "FAILED",
        /// The compensation was tried and has not succeeded yet.
        Compensating = "COMPENSATING",
        /// The compensation succeeded.
        Compensated = "COMPENSATED",
    }
}

string_enum! {
    /// Which handler of a step is invoked.
    Phase {
        /// The step's action.
        Action = "action",
        /// The step's compensation.
        Compensation = "compensation",
    }
}

/// One step's status inside a saga.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Step {
    /// State.
    pub state: StepState,
    /// Action attempts made, in all.
    pub attempts: u32,
    /// Compensation attempts made, in all.
    pub compensation_attempts: u32,
    /// Attempts of the current phase made before the last operator retry:
    /// the retry budget counts from here.
    pub budget_from: u32,
    /// Last error, for people.
    pub last_error: Option<String>,
    /// The action's output (JSON text).
    pub output: Option<String>,
    /// When the next attempt is due, while waiting out a backoff.
    pub next_attempt_at: Option<DateTime<Utc>>,
}

// The enum is declared by `string_enum!`, which cannot carry `#[default]`.
#[allow(clippy::derivable_impls)]
impl Default for StepState {
    fn default() -> Self {
        StepState::Pending
    }
}

/// A saga instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Saga {
    /// Id.
    pub id: SagaId,
    /// Definition name.
    pub definition: String,
    /// Definition version it runs on.
    pub version: u32,
    /// State.
    pub state: SagaState,
    /// For a suspended saga: the state an operator's retry resumes.
    pub suspended_from: Option<SagaState>,
    /// Input (JSON text).
    pub input: String,
    /// One entry per step of the definition.
    pub steps: Vec<Step>,
    /// Why it is compensating, compensated or suspended.
    pub error: Option<String>,
    /// When the saga's deadline passes (database clock).
    pub deadline_at: Option<DateTime<Utc>>,
    /// When it was started (database clock).
    pub created_at: DateTime<Utc>,
    /// When it last changed (database clock).
    pub updated_at: DateTime<Utc>,
    /// The principal that started it (none without authentication).
    pub started_by: Option<String>,
    /// Where its spans hang in a distributed trace (none: no trace).
    pub trace: Option<SagaTrace>,
}

/// A saga's place in a distributed trace, kept with the saga so that it
/// survives a crash and a takeover. The API edge parses and checks the
/// headers; here they are opaque text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaTrace {
    /// W3C `traceparent` of the span every step attempt is a child of: the
    /// saga's own span when `sagad` exports spans, else the caller's.
    pub traceparent: String,
    /// W3C `tracestate`, passed on unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
    /// The caller's span (16 hex digits): the saga span's parent, when
    /// `sagad` made a saga span and the caller sent a context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller_span: Option<String>,
    /// `traceparent` names the saga's own span, which `sagad` emits when the
    /// saga ends (else it is the caller's span, passed on as it came).
    #[serde(default)]
    pub saga_span: bool,
}

impl SagaTrace {
    /// The trace id (32 hex digits), for logs and people.
    pub fn trace_id(&self) -> &str {
        self.traceparent.get(3..35).unwrap_or("")
    }
}

impl Saga {
    /// A new running saga with every step pending.
    pub fn new(
        id: SagaId,
        definition: &super::Definition,
        input: String,
        now: DateTime<Utc>,
    ) -> Saga {
        let deadline_at = definition
            .deadline
            .and_then(|d| chrono::Duration::from_std(d).ok())
            .map(|d| now + d);
        Saga {
            id,
            definition: definition.name.clone(),
            version: definition.version,
            state: SagaState::Running,
            suspended_from: None,
            input,
            steps: vec![Step::default(); definition.steps.len()],
            error: None,
            deadline_at,
            created_at: now,
            updated_at: now,
            started_by: None,
            trace: None,
        }
    }
}

impl Saga {
    /// The step in progress and the attempts of its current phase: for
    /// listings and the "stuck" rule.
    pub fn progress(&self) -> Option<(usize, u32)> {
        let at = match self.state {
            SagaState::Running => self
                .steps
                .iter()
                .position(|s| s.state != StepState::Succeeded),
            SagaState::Compensating => self.steps.iter().rposition(|s| {
                matches!(
                    s.state,
                    StepState::Succeeded | StepState::Running | StepState::Compensating
                )
            }),
            SagaState::Suspended => self.steps.iter().rposition(|s| s.last_error.is_some()),
            _ => None,
        }?;
        let s = &self.steps[at];
        let attempts = match s.state {
            StepState::Compensating => s.compensation_attempts,
            _ => s.attempts,
        };
        Some((at, attempts))
    }
}

/// What a participant's answer (or the lack of one) means, after the status
/// code has been classified (see DESIGN.md, "What a participant's answer
/// means").
#[derive(Debug, Clone, PartialEq)]
pub enum CallResult {
    /// OK, `OUTCOME_SUCCEEDED`, with the output (JSON text, `None` = null).
    Succeeded(Option<String>),
    /// OK, `OUTCOME_FAILED`: a business refusal, no effect.
    Failed(String),
    /// OK, `OUTCOME_RETRY`: not now, no effect.
    Retry(String),
    /// The call went wrong and the outcome is unknown (transport, overload,
    /// deadline, internal error).
    Transient(String),
    /// The call was refused in a way retrying cannot fix (unknown handler,
    /// wrong contract, auth, a response that breaks the contract).
    Misconfigured(String),
}

/// A fact the state machine reacts to.
#[derive(Debug, Clone, PartialEq)]
pub enum Fact {
    /// About to invoke a non-idempotent action: written down first so that a
    /// crash during the call is known to have an unknown outcome.
    AttemptStarted {
        /// Step index.
        step: usize,
    },
    /// A call returned (or failed).
    Invoked {
        /// Step index.
        step: usize,
        /// Which handler.
        phase: Phase,
        /// Attempt number of this phase (1-based).
        attempt: u32,
        /// What came back.
        result: CallResult,
        /// How long the call took (the history's timeline shows it).
        took: std::time::Duration,
    },
    /// A claimed saga has a non-idempotent action in `RUNNING`: the previous
    /// owner stopped during the call, so its outcome is unknown.
    Recovered {
        /// Step index.
        step: usize,
    },
    /// The saga's deadline passed before its pivot.
    DeadlinePassed,
    /// Operator: resume a suspended saga, or make a waiting retry happen now.
    OperatorRetry {
        /// Who.
        actor: String,
        /// Why.
        note: String,
    },
    /// Operator: force compensation (only before the pivot).
    OperatorAbort {
        /// Who.
        actor: String,
        /// Why.
        note: String,
    },
    /// Operator: mark a suspended saga finished by hand.
    OperatorResolve {
        /// Who.
        actor: String,
        /// Why (required).
        note: String,
    },
}
