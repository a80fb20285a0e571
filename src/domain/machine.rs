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
use serde::{Deserialize, Serialize};

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
    /// What happened.
    pub kind: EventKind,
    /// Step name; `None` for saga-level events.
    pub step: Option<String>,
    /// Attempt number, 0 where none applies.
    pub attempt: u32,
    /// For people.
    pub detail: String,
    /// When the decision was made (database clock, as the deciding
    /// coordinator estimates it): a deferred decision is written later.
    pub at: DateTime<Utc>,
    /// For the entry that records a call's answer: how long the call took
    /// (it began at `at - took`).
    pub took: Option<std::time::Duration>,
}

string_enum! {
    /// The kinds of entry in a saga's history.
    EventKind {
        /// The saga was started.
        Started = "started",
        /// A non-idempotent action is about to be invoked.
        StepStarted = "step_started",
        /// An action succeeded.
        StepSucceeded = "step_succeeded",
        /// An action was refused (no effect).
        StepFailed = "step_failed",
        /// An attempt failed and another is scheduled.
        StepRetry = "step_retry",
        /// An action's outcome is unknown and it will not be retried.
        StepUnknown = "step_unknown",
        /// Compensation of the saga began.
        Compensating = "compensating",
        /// A compensation attempt failed and another is scheduled.
        CompensationRetry = "compensation_retry",
        /// A compensation succeeded.
        StepCompensated = "step_compensated",
        /// Every step applied.
        Completed = "completed",
        /// Every applied step compensated.
        Compensated = "compensated",
        /// Parked for an operator.
        Suspended = "suspended",
        /// The deadline passed before the pivot.
        DeadlineExceeded = "deadline_exceeded",
        /// Operator retry.
        OperatorRetry = "operator_retry",
        /// Operator abort.
        OperatorAbort = "operator_abort",
        /// Operator resolve.
        OperatorResolve = "operator_resolve",
    }
}

impl EventKind {
    /// Whether this entry ends the saga's run or parks it (logged at
    /// `info`; every other kind is hot-path detail, logged at `debug`).
    pub fn is_settling(self) -> bool {
        matches!(
            self,
            EventKind::Completed
                | EventKind::Compensated
                | EventKind::Suspended
                | EventKind::OperatorResolve
        )
    }
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
    let call = match &fact {
        Fact::Invoked {
            step,
            attempt,
            took,
            ..
        } => Some((*step, *attempt, *took)),
        _ => None,
    };
    match fact {
        Fact::AttemptStarted { step } => d.attempt_started(step)?,
        Fact::Invoked {
            step,
            phase: Phase::Action,
            attempt,
            result,
            ..
        } => d.action_result(step, attempt, result, jitter)?,
        Fact::Invoked {
            step,
            phase: Phase::Compensation,
            attempt,
            result,
            ..
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
    // A call's answer is the first entry of its decision. Where that entry
    // is about the saga (an attempt that suspends it or starts its
    // compensation), it names the step and attempt too, so that every call
    // is in the history.
    if let (Some((step, attempt, took)), Some(first)) = (call, d.events.first_mut()) {
        if first.step.is_none() {
            first.step = def.steps.get(step).map(|s| s.name.clone());
            first.attempt = attempt;
        }
        first.took = Some(took);
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

/// One action attempt's answer, with what the rules need to know about the
/// step (see `Draft::action_result`).
struct ActionAttempt {
    i: usize,
    attempt: u32,
    name: String,
    idempotent: bool,
    kind: StepKind,
    max_attempts: u32,
    maybe_applied_before: bool,
    budget_left: bool,
    retry_at: DateTime<Utc>,
}

/// "step "x" used up its N attempts: why".
fn used_up(name: &str, max_attempts: u32, err: &str) -> String {
    format!("step {name:?} used up its {max_attempts} attempts: {err}")
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
    fn event(&mut self, kind: EventKind, step: Option<usize>, attempt: u32, detail: String) {
        let step = step
            .and_then(|i| self.def.steps.get(i))
            .map(|s| s.name.clone());
        self.events.push(EventRecord {
            kind,
            step,
            attempt,
            detail,
            at: self.now,
            took: None,
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
        self.event(EventKind::StepStarted, Some(i), attempt, String::new());
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
        let (idempotent, policy) = (sd.idempotent, sd.retry);
        let name = self.step_name(i).to_owned();
        self.changed.push(i);
        let step = &mut self.saga.steps[i];
        step.attempts = step.attempts.max(attempt);
        step.next_attempt_at = None;
        let a = ActionAttempt {
            i,
            attempt,
            name,
            idempotent,
            kind: self.def.kind(i),
            max_attempts: policy.max_attempts,
            // A non-idempotent step is RUNNING only through this attempt's
            // pre-write; an idempotent one only after an earlier unknown
            // outcome.
            maybe_applied_before: step.state == StepState::Running && idempotent,
            budget_left: has_budget(&policy, attempt, step.budget_from),
            retry_at: self.now
                + to_chrono(backoff(
                    &policy,
                    attempt - step.budget_from.min(attempt),
                    jitter,
                )),
        };
        match result {
            CallResult::Succeeded(output) => self.action_succeeded(&a, output),
            CallResult::Failed(err) => self.action_refused(&a, err),
            CallResult::Retry(err) => self.action_not_now(&a, err),
            CallResult::Transient(err) => self.action_unknown(&a, err),
            CallResult::Misconfigured(err) => {
                self.action_attempt_failed(&a, &err);
                self.suspend(format!(
                    "step {:?}: participant refused the call: {err}",
                    a.name
                ))
            }
        }
    }

    /// Records a failed attempt of an action: its error, and the step back to
    /// PENDING unless an earlier attempt may have applied it.
    fn action_attempt_failed(&mut self, a: &ActionAttempt, err: &str) {
        let step = &mut self.saga.steps[a.i];
        step.last_error = Some(err.to_owned());
        if !a.maybe_applied_before {
            step.state = StepState::Pending;
        }
        self.event(EventKind::StepFailed, Some(a.i), a.attempt, err.to_owned());
    }

    /// Schedules the next attempt of step `i`'s phase at `at`.
    fn retry_at(&mut self, kind: EventKind, i: usize, attempt: u32, err: &str, at: DateTime<Utc>) {
        self.saga.steps[i].next_attempt_at = Some(at);
        let detail = format!("{err}; next attempt at {}", rfc3339(at));
        self.event(kind, Some(i), attempt, detail);
    }

    fn action_succeeded(
        &mut self,
        a: &ActionAttempt,
        output: Option<String>,
    ) -> Result<(), TransitionError> {
        let step = &mut self.saga.steps[a.i];
        step.state = StepState::Succeeded;
        step.output = output;
        step.last_error = None;
        self.event(
            EventKind::StepSucceeded,
            Some(a.i),
            a.attempt,
            String::new(),
        );
        if current_step(&self.saga).is_none() {
            self.saga.state = SagaState::Completed;
            self.saga.error = None;
            self.event(EventKind::Completed, None, 0, String::new());
        }
        Ok(())
    }

    /// A business refusal: authoritative (with the same idempotency key, a
    /// participant whose earlier attempt applied would have answered that
    /// attempt's result instead), so the step FAILED and the saga
    /// compensates — unless the step is past the pivot, where refusing is not
    /// allowed. One caution: after an earlier attempt's unknown outcome a
    /// compensatable step is compensated too. That attempt may still be on
    /// its way (it hung before the participant's barrier, and the refusal
    /// was decided outside it); a compensation of an action that never took
    /// effect is harmless, and the barrier then turns that attempt away.
    fn action_refused(&mut self, a: &ActionAttempt, err: String) -> Result<(), TransitionError> {
        if a.kind == StepKind::Retriable {
            self.action_attempt_failed(a, &err);
            return self.suspend(format!(
                "step {:?} refused after the pivot, where steps may not refuse: {err}",
                a.name
            ));
        }
        let compensate_it = a.maybe_applied_before && a.kind == StepKind::Compensatable;
        let step = &mut self.saga.steps[a.i];
        step.last_error = Some(err.clone());
        if !compensate_it {
            step.state = StepState::Failed;
        }
        self.event(EventKind::StepFailed, Some(a.i), a.attempt, err.clone());
        self.begin_compensation(format!("step {:?} failed: {err}", a.name));
        Ok(())
    }

    /// "Not now, nothing done": retried under the policy even when not
    /// idempotent; out of budget, the saga compensates (or suspends past the
    /// pivot). "Nothing done" speaks for this attempt only: when an earlier
    /// one's outcome is unknown the step may still have taken effect (that
    /// attempt may yet arrive and apply), so the pivot suspends like any
    /// unknown pivot, and a compensatable step is compensated with the rest.
    fn action_not_now(&mut self, a: &ActionAttempt, err: String) -> Result<(), TransitionError> {
        if a.budget_left {
            let step = &mut self.saga.steps[a.i];
            step.last_error = Some(err.clone());
            if !a.maybe_applied_before {
                step.state = StepState::Pending;
            }
            self.retry_at(EventKind::StepRetry, a.i, a.attempt, &err, a.retry_at);
            return Ok(());
        }
        let why = used_up(&a.name, a.max_attempts, &err);
        if a.kind == StepKind::Retriable {
            self.action_attempt_failed(a, &err);
            return self.suspend(why);
        }
        self.action_attempt_failed(a, &err);
        if a.maybe_applied_before && a.kind == StepKind::Pivot {
            return self.suspend(format!(
                "{why}; an earlier attempt's outcome is unknown, so the pivot may have taken effect"
            ));
        }
        if !a.maybe_applied_before {
            self.saga.steps[a.i].state = StepState::Failed;
        }
        self.begin_compensation(why);
        Ok(())
    }

    /// The outcome is unknown: retried if idempotent and in budget; else the
    /// step may have taken effect — compensate it with the others before the
    /// pivot, suspend from the pivot on.
    fn action_unknown(&mut self, a: &ActionAttempt, err: String) -> Result<(), TransitionError> {
        let step = &mut self.saga.steps[a.i];
        step.last_error = Some(err.clone());
        step.state = StepState::Running;
        if a.idempotent && a.budget_left {
            self.retry_at(EventKind::StepRetry, a.i, a.attempt, &err, a.retry_at);
            return Ok(());
        }
        let why = if a.idempotent {
            format!(
                "step {:?} used up its {} attempts with its outcome unknown: {err}",
                a.name, a.max_attempts
            )
        } else {
            format!(
                "step {:?} is not idempotent and its outcome is unknown: {err}",
                a.name
            )
        };
        self.event(EventKind::StepUnknown, Some(a.i), a.attempt, err);
        if a.kind == StepKind::Compensatable {
            self.begin_compensation(why);
            Ok(())
        } else {
            self.suspend(why)
        }
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
                self.event(EventKind::StepCompensated, Some(i), attempt, String::new());
                if next_compensation(&self.saga, self.def).is_none() {
                    self.saga.state = SagaState::Compensated;
                    self.event(EventKind::Compensated, None, 0, String::new());
                }
                return Ok(());
            }
            CallResult::Misconfigured(err) => {
                step.last_error = Some(err.clone());
                self.event(EventKind::CompensationRetry, Some(i), attempt, err.clone());
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
            self.retry_at(EventKind::CompensationRetry, i, attempt, &err, at);
            Ok(())
        } else {
            self.event(EventKind::CompensationRetry, Some(i), attempt, err.clone());
            let why = used_up(&name, policy.max_attempts, &err);
            self.suspend(format!("compensation of {why}"))
        }
    }

    fn deadline_passed(&mut self) -> Result<(), TransitionError> {
        if self.saga.state != SagaState::Running || !deadline_applies(&self.saga, self.def) {
            return Err(TransitionError::Stale("deadline after the pivot".into()));
        }
        let at = self.saga.deadline_at.map(rfc3339).unwrap_or_default();
        self.event(
            EventKind::DeadlineExceeded,
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
        self.event(EventKind::Compensating, None, 0, reason);
        if next_compensation(&self.saga, self.def).is_none() {
            self.saga.state = SagaState::Compensated;
            self.event(
                EventKind::Compensated,
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
        self.event(EventKind::Suspended, None, 0, reason);
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
            EventKind::OperatorRetry,
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
        self.event(EventKind::OperatorAbort, None, 0, detail.clone());
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
            EventKind::OperatorResolve,
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
