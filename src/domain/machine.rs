//! The saga state machine: what to do next ([`plan`]) and how a fact changes
//! a saga ([`decide`]).
//!
//! ```text
//!             ┌──────────── step refused / unknown outcome before pivot ──────┐
//!             │                                                               ▼
//!  start ─▶ RUNNING ──── last step succeeded ───▶ COMPLETED        COMPENSATING ──▶ COMPENSATED
//!             │  ▲                                                   │  ▲
//!             │  └──── operator retry ───┐      ┌── operator retry ──┘  │
//!             ▼                          │      │                       │
//!         SUSPENDED ◀──── budget spent / misconfiguration / unknown pivot
//!             │                          (operator abort: SUSPENDED/RUNNING ─▶ COMPENSATING)
//!             └── operator resolve ──▶ RESOLVED
//! ```
//!
//! The machine is pure: [`decide`] takes the saga, one [`Fact`], the time and
//! a random draw for jitter, and returns the new saga plus the events to
//! append. The worker persists a [`Decision`] in one transaction and only then
//! acts on it, or keeps it in memory where [`may_defer`] allows. [`plan`] derives the next thing to do from the saga alone, so
//! after a crash the new owner reads the saga and knows where it stands; no
//! cursor is stored that could disagree with the steps.
//!
//! Step states carry the protocol's key distinction: `RUNNING` means "invoked,
//! outcome unknown, may have taken effect", so it is compensated when the saga
//! compensates; `PENDING` and `FAILED` mean nothing took effect, so they are
//! not. Terminal states absorb every fact.

use chrono::{DateTime, Utc};

use super::retry::{backoff, has_budget};
use super::{CallResult, Definition, Fact, Phase, Saga, SagaState, StepKind, StepState};

/// What the worker should do next with a saga it holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Call a participant.
    Invoke {
        /// Step index.
        step: usize,
        /// Which handler.
        phase: Phase,
        /// Attempt number of this phase to send (1-based).
        attempt: u32,
        /// Write [`Fact::AttemptStarted`] before the call (non-idempotent
        /// actions only: a crash during the call leaves an unknown outcome).
        pre_write: bool,
    },
    /// Feed [`Fact::Recovered`]: a non-idempotent action was left `RUNNING`.
    Recover {
        /// Step index.
        step: usize,
    },
    /// Feed [`Fact::DeadlinePassed`].
    DeadlinePassed,
    /// Nothing to do before `until` (a backoff, or the deadline).
    Wait {
        /// Database-clock time.
        until: DateTime<Utc>,
    },
    /// Terminal or suspended: nothing to do.
    Idle,
}

/// A decision: the saga after the fact, and what to append to its history.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The saga as it must be stored.
    pub saga: Saga,
    /// Events to append, in order.
    pub events: Vec<EventRecord>,
    /// Indexes of the steps whose status changed.
    pub changed_steps: Vec<usize>,
}

impl Decision {
    /// Whether the saga's state changed to one `WaitSaga` returns on.
    pub fn settled_now(&self, before: SagaState) -> bool {
        self.saga.state != before && self.saga.state.is_settled()
    }
}

/// One entry of a saga's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// e.g. `step_succeeded` (see [`event_kind`]).
    pub kind: &'static str,
    /// Step name; `None` for saga-level events.
    pub step: Option<String>,
    /// Attempt number, 0 where none applies.
    pub attempt: u32,
    /// For people.
    pub detail: String,
    /// When the decision was made (database clock, as the deciding
    /// coordinator estimates it): a deferred decision is written later.
    pub at: DateTime<Utc>,
}

/// The event kinds written to the history.
pub mod event_kind {
    /// The saga was started.
    pub const STARTED: &str = "started";
    /// A non-idempotent action is about to be invoked.
    pub const STEP_STARTED: &str = "step_started";
    /// An action succeeded.
    pub const STEP_SUCCEEDED: &str = "step_succeeded";
    /// An action was refused (no effect).
    pub const STEP_FAILED: &str = "step_failed";
    /// An attempt failed and another is scheduled.
    pub const STEP_RETRY: &str = "step_retry";
    /// An action's outcome is unknown and it will not be retried.
    pub const STEP_UNKNOWN: &str = "step_unknown";
    /// Compensation of the saga began.
    pub const COMPENSATING: &str = "compensating";
    /// A compensation attempt failed and another is scheduled.
    pub const COMPENSATION_RETRY: &str = "compensation_retry";
    /// A compensation succeeded.
    pub const STEP_COMPENSATED: &str = "step_compensated";
    /// Every step applied.
    pub const COMPLETED: &str = "completed";
    /// Every applied step compensated.
    pub const COMPENSATED: &str = "compensated";
    /// Parked for an operator.
    pub const SUSPENDED: &str = "suspended";
    /// The deadline passed before the pivot.
    pub const DEADLINE_EXCEEDED: &str = "deadline_exceeded";
    /// Operator retry.
    pub const OPERATOR_RETRY: &str = "operator_retry";
    /// Operator abort.
    pub const OPERATOR_ABORT: &str = "operator_abort";
    /// Operator resolve.
    pub const OPERATOR_RESOLVE: &str = "operator_resolve";
}

/// A fact that does not apply to the saga as it stands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// Terminal states absorb.
    #[error("saga is {0}: it is finished and cannot change")]
    Terminal(SagaState),
    /// Resolve needs a suspended saga.
    #[error("saga is {0}, not SUSPENDED: only a suspended saga can be resolved")]
    NotSuspended(SagaState),
    /// Abort after the pivot.
    #[error("the pivot step {0:?} may have taken effect: the saga can no longer be compensated")]
    PivotPassed(String),
    /// Abort while already compensating.
    #[error("saga is already compensating")]
    AlreadyCompensating,
    /// Resolve without a note.
    #[error("note: required")]
    NoteRequired,
    /// A fact about a step or phase the saga is not at (a stale worker).
    #[error("stale fact: {0}")]
    Stale(String),
}

/// The step a running saga is at: the first whose action has not succeeded.
pub fn current_step(saga: &Saga) -> Option<usize> {
    saga.steps
        .iter()
        .position(|s| s.state != StepState::Succeeded)
}

/// The step a compensating saga compensates next: the last one that may have
/// taken effect and is not compensated yet.
pub fn next_compensation(saga: &Saga, def: &Definition) -> Option<usize> {
    (0..saga.steps.len()).rev().find(|&i| {
        matches!(
            saga.steps[i].state,
            StepState::Succeeded | StepState::Running | StepState::Compensating
        ) && def.steps.get(i).is_some_and(|d| d.compensation.is_some())
    })
}

/// Whether the deadline still matters: only until the pivot may have taken
/// effect (after it, the saga must go forward).
fn deadline_applies(saga: &Saga, def: &Definition) -> bool {
    match (current_step(saga), def.pivot()) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(i), Some(p)) => i < p || (i == p && saga.steps[p].state == StepState::Pending),
    }
}

/// What the worker should do next.
pub fn plan(saga: &Saga, def: &Definition, now: DateTime<Utc>) -> Plan {
    match saga.state {
        SagaState::Running => plan_forward(saga, def, now),
        SagaState::Compensating => match next_compensation(saga, def) {
            None => Plan::Idle,
            Some(i) => match saga.steps[i].next_attempt_at {
                Some(t) if t > now => Plan::Wait { until: t },
                _ => Plan::Invoke {
                    step: i,
                    phase: Phase::Compensation,
                    attempt: saga.steps[i].compensation_attempts + 1,
                    pre_write: false,
                },
            },
        },
        _ => Plan::Idle,
    }
}

fn plan_forward(saga: &Saga, def: &Definition, now: DateTime<Utc>) -> Plan {
    let Some(i) = current_step(saga) else {
        return Plan::Idle;
    };
    let step = &saga.steps[i];
    let idempotent = def.steps.get(i).is_some_and(|d| d.idempotent);
    if step.state == StepState::Running && !idempotent {
        return Plan::Recover { step: i };
    }
    let deadline = saga.deadline_at.filter(|_| deadline_applies(saga, def));
    if deadline.is_some_and(|d| d <= now) {
        return Plan::DeadlinePassed;
    }
    match step.next_attempt_at {
        Some(t) if t > now => Plan::Wait {
            until: deadline.map_or(t, |d| d.min(t)),
        },
        _ => Plan::Invoke {
            step: i,
            phase: Phase::Action,
            attempt: step.attempts + 1,
            pre_write: !idempotent,
        },
    }
}

/// Whether step `k`'s action may be invoked only once everything before it
/// is durable: a non-idempotent action (its pre-write), and the pivot (a
/// crash must never lose the results that let the saga still compensate).
fn durable_before(def: &Definition, k: usize) -> bool {
    def.steps.get(k).is_none_or(|s| !s.idempotent) || def.pivot() == Some(k)
}

/// Whether `fact` is an answer to an idempotent action: the only kind of
/// decision a worker may keep in memory for a while (see [`may_defer`]).
pub fn deferrable(fact: &Fact, def: &Definition) -> bool {
    matches!(fact, Fact::Invoked { step, phase: Phase::Action, .. }
        if def.steps.get(*step).is_some_and(|s| s.idempotent))
}

/// Whether a decision on a [`deferrable`] fact, which left the saga `after`
/// with `next` to do, may stay unwritten until the next write of the saga.
///
/// DESIGN.md asks for durability only where losing a decision would break a
/// contract. An idempotent action's result is not such a place: after a
/// crash the action is invoked again with the same key. So while the saga
/// keeps running and the next call is another idempotent action before the
/// pivot (or any action with a pre-write, which then carries the deferred
/// results), the write waits. State changes, waits, compensation and the
/// end are always written, and so is everything before the pivot is
/// invoked. After a crash, [`assume_unrecorded`] widens what may have taken
/// effect to every step the lost coordinator could have reached.
pub fn may_defer(def: &Definition, before: SagaState, after: &Saga, next: &Plan) -> bool {
    if before != SagaState::Running || after.state != SagaState::Running {
        return false;
    }
    match *next {
        Plan::Invoke {
            step,
            phase: Phase::Action,
            pre_write,
            ..
        } => pre_write || !durable_before(def, step),
        _ => false,
    }
}

/// The steps a coordinator that stopped without writing may have invoked
/// beyond what `saga` (as stored) shows: from the current step up to, not
/// including, the next step that needed a write before its call.
pub fn unrecorded_window(saga: &Saga, def: &Definition) -> std::ops::Range<usize> {
    let Some(c) = current_step(saga).filter(|_| saga.state == SagaState::Running) else {
        return 0..0;
    };
    if !def.steps.get(c).is_some_and(|s| s.idempotent) {
        // A non-idempotent step's start and result are always written.
        return c..c;
    }
    let end = (c + 1..saga.steps.len())
        .find(|&k| durable_before(def, k))
        .unwrap_or(saga.steps.len());
    c..end
}

/// For a saga whose last owner stopped without giving it back (its
/// unwritten decisions are lost): marks every step in
/// [`unrecorded_window`] that the record shows `PENDING` as `RUNNING`, "may
/// have taken effect". Going forward they are invoked again with the same
/// keys (idempotent), and if the saga compensates they are compensated (a
/// null compensation where they never ran). Returns the marked steps.
pub fn assume_unrecorded(saga: &mut Saga, def: &Definition) -> Vec<usize> {
    let window = unrecorded_window(saga, def);
    let mut marked = Vec::new();
    for i in window {
        if saga.steps[i].state == StepState::Pending {
            saga.steps[i].state = StepState::Running;
            marked.push(i);
        }
    }
    marked
}

/// Applies `fact` to `saga`. `jitter` is a uniform draw from `[0, 1)`.
pub fn decide(
    saga: &Saga,
    def: &Definition,
    fact: Fact,
    now: DateTime<Utc>,
    jitter: f64,
) -> Result<Decision, TransitionError> {
    if saga.state.is_terminal() {
        return Err(TransitionError::Terminal(saga.state));
    }
    let mut d = Draft {
        saga: saga.clone(),
        def,
        events: Vec::new(),
        changed: Vec::new(),
        now,
    };
    match fact {
        Fact::AttemptStarted { step } => d.attempt_started(step)?,
        Fact::Invoked {
            step,
            phase: Phase::Action,
            attempt,
            result,
        } => d.action_result(step, attempt, result, jitter)?,
        Fact::Invoked {
            step,
            phase: Phase::Compensation,
            attempt,
            result,
        } => d.compensation_result(step, attempt, result, jitter)?,
        Fact::Recovered { step } => {
            let attempt = d.expect_forward(step)?.attempts;
            let why = "outcome unknown: the coordinator driving this step stopped during the call";
            d.action_result(step, attempt, CallResult::Transient(why.into()), jitter)?
        }
        Fact::DeadlinePassed => d.deadline_passed()?,
        Fact::OperatorRetry { actor, note } => d.operator_retry(&actor, &note)?,
        Fact::OperatorAbort { actor, note } => d.operator_abort(&actor, &note)?,
        Fact::OperatorResolve { actor, note } => d.operator_resolve(&actor, &note)?,
    }
    let mut changed = d.changed;
    changed.sort_unstable();
    changed.dedup();
    let mut saga = d.saga;
    saga.updated_at = now;
    Ok(Decision {
        saga,
        events: d.events,
        changed_steps: changed,
    })
}

/// A decision being built.
struct Draft<'a> {
    saga: Saga,
    def: &'a Definition,
    events: Vec<EventRecord>,
    changed: Vec<usize>,
    now: DateTime<Utc>,
}

impl Draft<'_> {
    fn event(&mut self, kind: &'static str, step: Option<usize>, attempt: u32, detail: String) {
        let step = step
            .and_then(|i| self.def.steps.get(i))
            .map(|s| s.name.clone());
        self.events.push(EventRecord {
            kind,
            step,
            attempt,
            detail,
            at: self.now,
        });
    }

    fn step_name(&self, i: usize) -> &str {
        self.def.steps.get(i).map_or("?", |s| s.name.as_str())
    }

    /// The saga must be running and at step `i`.
    fn expect_forward(&self, i: usize) -> Result<&super::Step, TransitionError> {
        if self.saga.state != SagaState::Running || current_step(&self.saga) != Some(i) {
            return Err(TransitionError::Stale(format!(
                "action of step {i} while the saga is {} at step {:?}",
                self.saga.state,
                current_step(&self.saga)
            )));
        }
        Ok(&self.saga.steps[i])
    }

    fn attempt_started(&mut self, i: usize) -> Result<(), TransitionError> {
        let attempt = self.expect_forward(i)?.attempts + 1;
        let step = &mut self.saga.steps[i];
        step.state = StepState::Running;
        step.attempts = attempt;
        step.next_attempt_at = None;
        self.changed.push(i);
        self.event(event_kind::STEP_STARTED, Some(i), attempt, String::new());
        Ok(())
    }

    fn action_result(
        &mut self,
        i: usize,
        attempt: u32,
        result: CallResult,
        jitter: f64,
    ) -> Result<(), TransitionError> {
        self.expect_forward(i)?;
        let Some(sd) = self.def.steps.get(i) else {
            return Err(TransitionError::Stale(format!("no step {i}")));
        };
        let (idempotent, policy, kind) = (sd.idempotent, sd.retry, self.def.kind(i));
        let name = self.step_name(i).to_owned();
        self.changed.push(i);
        let step = &mut self.saga.steps[i];
        step.attempts = step.attempts.max(attempt);
        step.next_attempt_at = None;
        // A non-idempotent step is RUNNING only through this attempt's
        // pre-write; an idempotent one only after an earlier unknown outcome.
        let maybe_applied_before = step.state == StepState::Running && idempotent;
        let budget_left = has_budget(&policy, attempt, step.budget_from);
        let retry_at = self.now
            + to_chrono(backoff(
                &policy,
                attempt - step.budget_from.min(attempt),
                jitter,
            ));
        match result {
            CallResult::Succeeded(output) => {
                step.state = StepState::Succeeded;
                step.output = output;
                step.last_error = None;
                self.event(event_kind::STEP_SUCCEEDED, Some(i), attempt, String::new());
                if current_step(&self.saga).is_none() {
                    self.saga.state = SagaState::Completed;
                    self.saga.error = None;
                    self.event(event_kind::COMPLETED, None, 0, String::new());
                }
            }
            CallResult::Failed(err) => {
                step.last_error = Some(err.clone());
                if kind == StepKind::Retriable {
                    if !maybe_applied_before {
                        step.state = StepState::Pending;
                    }
                    self.event(event_kind::STEP_FAILED, Some(i), attempt, err.clone());
                    return self.suspend(format!(
                        "step {name:?} refused after the pivot, where steps may not refuse: {err}"
                    ));
                }
                // A refusal is authoritative: with the same idempotency key,
                // a participant whose earlier attempt applied would have
                // answered that attempt's result instead.
                step.state = StepState::Failed;
                self.event(event_kind::STEP_FAILED, Some(i), attempt, err.clone());
                self.begin_compensation(format!("step {name:?} failed: {err}"));
            }
            CallResult::Retry(err) => {
                step.last_error = Some(err.clone());
                if !maybe_applied_before {
                    step.state = StepState::Pending;
                }
                if budget_left {
                    step.next_attempt_at = Some(retry_at);
                    self.event(
                        event_kind::STEP_RETRY,
                        Some(i),
                        attempt,
                        format!("{err}; next attempt at {}", rfc3339(retry_at)),
                    );
                } else if kind == StepKind::Retriable {
                    self.event(event_kind::STEP_FAILED, Some(i), attempt, err.clone());
                    return self.suspend(format!(
                        "step {name:?} used up its {} attempts: {err}",
                        policy.max_attempts
                    ));
                } else {
                    if !maybe_applied_before {
                        step.state = StepState::Failed;
                    }
                    self.event(event_kind::STEP_FAILED, Some(i), attempt, err.clone());
                    self.begin_compensation(format!(
                        "step {name:?} used up its {} attempts: {err}",
                        policy.max_attempts
                    ));
                }
            }
            CallResult::Transient(err) => {
                step.last_error = Some(err.clone());
                step.state = StepState::Running;
                if idempotent && budget_left {
                    step.next_attempt_at = Some(retry_at);
                    self.event(
                        event_kind::STEP_RETRY,
                        Some(i),
                        attempt,
                        format!("{err}; next attempt at {}", rfc3339(retry_at)),
                    );
                    return Ok(());
                }
                let why = if idempotent {
                    format!(
                        "step {name:?} used up its {} attempts with its outcome unknown: {err}",
                        policy.max_attempts
                    )
                } else {
                    format!("step {name:?} is not idempotent and its outcome is unknown: {err}")
                };
                self.event(event_kind::STEP_UNKNOWN, Some(i), attempt, err);
                if kind == StepKind::Compensatable {
                    self.begin_compensation(why);
                } else {
                    return self.suspend(why);
                }
            }
            CallResult::Misconfigured(err) => {
                step.last_error = Some(err.clone());
                if !maybe_applied_before {
                    step.state = StepState::Pending;
                }
                self.event(event_kind::STEP_FAILED, Some(i), attempt, err.clone());
                return self.suspend(format!(
                    "step {name:?}: participant refused the call: {err}"
                ));
            }
        }
        Ok(())
    }

    fn compensation_result(
        &mut self,
        i: usize,
        attempt: u32,
        result: CallResult,
        jitter: f64,
    ) -> Result<(), TransitionError> {
        if self.saga.state != SagaState::Compensating
            || next_compensation(&self.saga, self.def) != Some(i)
        {
            return Err(TransitionError::Stale(format!(
                "compensation of step {i} while the saga is {}",
                self.saga.state
            )));
        }
        let policy = self.def.steps[i].compensation_retry;
        let name = self.step_name(i).to_owned();
        self.changed.push(i);
        let step = &mut self.saga.steps[i];
        if step.state != StepState::Compensating {
            // First compensation attempt of this step: its budget starts now.
            step.state = StepState::Compensating;
            step.budget_from = step.compensation_attempts;
        }
        step.compensation_attempts = step.compensation_attempts.max(attempt);
        step.next_attempt_at = None;
        let err = match result {
            CallResult::Succeeded(_) => {
                step.state = StepState::Compensated;
                step.last_error = None;
                self.event(
                    event_kind::STEP_COMPENSATED,
                    Some(i),
                    attempt,
                    String::new(),
                );
                if next_compensation(&self.saga, self.def).is_none() {
                    self.saga.state = SagaState::Compensated;
                    self.event(event_kind::COMPENSATED, None, 0, String::new());
                }
                return Ok(());
            }
            CallResult::Misconfigured(err) => {
                step.last_error = Some(err.clone());
                self.event(
                    event_kind::COMPENSATION_RETRY,
                    Some(i),
                    attempt,
                    err.clone(),
                );
                return self.suspend(format!(
                    "compensation of step {name:?}: participant refused the call: {err}"
                ));
            }
            // A compensation may not refuse: FAILED is treated as RETRY.
            CallResult::Failed(err) | CallResult::Retry(err) | CallResult::Transient(err) => err,
        };
        step.last_error = Some(err.clone());
        if has_budget(&policy, attempt, step.budget_from) {
            let n = attempt - step.budget_from.min(attempt);
            let at = self.now + to_chrono(backoff(&policy, n, jitter));
            step.next_attempt_at = Some(at);
            self.event(
                event_kind::COMPENSATION_RETRY,
                Some(i),
                attempt,
                format!("{err}; next attempt at {}", rfc3339(at)),
            );
            Ok(())
        } else {
            self.event(
                event_kind::COMPENSATION_RETRY,
                Some(i),
                attempt,
                err.clone(),
            );
            self.suspend(format!(
                "compensation of step {name:?} used up its {} attempts: {err}",
                policy.max_attempts
            ))
        }
    }

    fn deadline_passed(&mut self) -> Result<(), TransitionError> {
        if self.saga.state != SagaState::Running || !deadline_applies(&self.saga, self.def) {
            return Err(TransitionError::Stale("deadline after the pivot".into()));
        }
        let at = self.saga.deadline_at.map(rfc3339).unwrap_or_default();
        self.event(
            event_kind::DEADLINE_EXCEEDED,
            None,
            0,
            format!("deadline was {at}"),
        );
        self.begin_compensation(format!(
            "the saga's deadline ({at}) passed before its pivot"
        ));
        Ok(())
    }

    fn begin_compensation(&mut self, reason: String) {
        self.saga.state = SagaState::Compensating;
        self.saga.suspended_from = None;
        self.saga.error = Some(reason.clone());
        self.event(event_kind::COMPENSATING, None, 0, reason);
        if next_compensation(&self.saga, self.def).is_none() {
            self.saga.state = SagaState::Compensated;
            self.event(
                event_kind::COMPENSATED,
                None,
                0,
                "no step had taken effect".into(),
            );
        }
    }

    fn suspend(&mut self, reason: String) -> Result<(), TransitionError> {
        self.saga.suspended_from = Some(self.saga.state);
        self.saga.state = SagaState::Suspended;
        self.saga.error = Some(reason.clone());
        self.event(event_kind::SUSPENDED, None, 0, reason);
        Ok(())
    }

    /// The step whose phase is in progress, for operator retry.
    fn active_step(&self, state: SagaState) -> Option<usize> {
        match state {
            SagaState::Running => current_step(&self.saga),
            SagaState::Compensating => next_compensation(&self.saga, self.def),
            _ => None,
        }
    }

    fn operator_retry(&mut self, actor: &str, note: &str) -> Result<(), TransitionError> {
        let resume = match self.saga.state {
            SagaState::Suspended => self.saga.suspended_from.unwrap_or(SagaState::Running),
            s => s,
        };
        if let Some(i) = self.active_step(resume) {
            let idempotent = self.def.steps.get(i).is_some_and(|s| s.idempotent);
            let step = &mut self.saga.steps[i];
            step.next_attempt_at = None;
            if self.saga.state == SagaState::Suspended {
                step.budget_from = match resume {
                    SagaState::Compensating if step.state == StepState::Compensating => {
                        step.compensation_attempts
                    }
                    SagaState::Compensating => 0,
                    _ => step.attempts,
                };
                // The operator asks to invoke again a non-idempotent action
                // whose outcome was unknown: they take responsibility for it.
                if resume == SagaState::Running && step.state == StepState::Running && !idempotent {
                    step.state = StepState::Pending;
                }
            }
            self.changed.push(i);
        }
        self.saga.state = resume;
        self.saga.suspended_from = None;
        self.event(
            event_kind::OPERATOR_RETRY,
            None,
            0,
            operator_detail(actor, note),
        );
        Ok(())
    }

    fn operator_abort(&mut self, actor: &str, note: &str) -> Result<(), TransitionError> {
        let forward = match (self.saga.state, self.saga.suspended_from) {
            (SagaState::Running, _) => true,
            (SagaState::Suspended, Some(SagaState::Running) | None) => false,
            _ => return Err(TransitionError::AlreadyCompensating),
        };
        let current = current_step(&self.saga);
        if let Some(p) = self.def.pivot() {
            let pivot_touched = self.saga.steps[p..]
                .iter()
                .any(|s| s.state != StepState::Pending);
            // A running saga at its pivot may have the pivot's call in flight.
            if pivot_touched || (forward && current == Some(p)) {
                return Err(TransitionError::PivotPassed(self.step_name(p).to_owned()));
            }
        }
        if let Some(i) = current.filter(|_| forward) {
            // The current step's call may be in flight on its owner: compensate
            // it too (a null compensation is harmless, a missed one is not).
            if self.saga.steps[i].state == StepState::Pending {
                self.saga.steps[i].state = StepState::Running;
                self.changed.push(i);
            }
        }
        for i in 0..self.saga.steps.len() {
            if self.saga.steps[i].next_attempt_at.take().is_some() {
                self.changed.push(i);
            }
        }
        let detail = operator_detail(actor, note);
        self.event(event_kind::OPERATOR_ABORT, None, 0, detail.clone());
        self.saga.state = SagaState::Running;
        self.begin_compensation(format!("aborted by operator ({detail})"));
        Ok(())
    }

    fn operator_resolve(&mut self, actor: &str, note: &str) -> Result<(), TransitionError> {
        if note.trim().is_empty() {
            return Err(TransitionError::NoteRequired);
        }
        if self.saga.state != SagaState::Suspended {
            return Err(TransitionError::NotSuspended(self.saga.state));
        }
        self.saga.state = SagaState::Resolved;
        self.saga.suspended_from = None;
        self.event(
            event_kind::OPERATOR_RESOLVE,
            None,
            0,
            operator_detail(actor, note),
        );
        Ok(())
    }
}

fn operator_detail(actor: &str, note: &str) -> String {
    if note.is_empty() {
        format!("by {actor}")
    } else {
        format!("by {actor}: {note}")
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn to_chrono(d: std::time::Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}
