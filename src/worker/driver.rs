//! The driver: what to do next with one saga this coordinator holds the
//! lease of, as a pure state machine. No I/O, no clock, no randomness: the
//! runner (`Worker::drive`, or the simulation) carries out each [`Action`]
//! and reports how it went as an [`Input`], with the time and a random draw.
//!
//! ```text
//!            ┌─────────────────────── Saved (kept) / Answered (deferred) ─────┐
//!            ▼                                                                 │
//!   start ─▶ plan ──Invoke, pre-write──▶ Save ──Saved──▶ cover ──▶ Call ──Answered──▶ decide
//!            │  └──Invoke──▶ cover: arrival uncovered? ─▶ Extend ──Extended──▶ Call   │
//!            │                                                                       ▼
//!            ├──Wait/Idle/stop──▶ give back: Save(release) or Release ─▶ Done   keep in memory
//!            │                                                              (may_defer, not
//!            └──Recover/DeadlinePassed──▶ decide                             stopping, before
//!                                                                            the checkpoint)
//!                                                                            or Save(hold)
//!   LeaseLost or a failed write, at any point ──▶ Done(Dropped)
//! ```
//!
//! Driving one saga is strictly sequential — one write or one call at a
//! time — so every input yields exactly the next action.
//!
//! The rules, as the module essay of `worker` gives them: a decision is
//! written, fenced on the lease's epoch, *before* it is acted on, except an
//! idempotent action's result, which [`may_defer`] lets wait in memory for
//! the next write (at most [`CHECKPOINT_EVERY`] after the first of them). A
//! write extends the lease and, when the next plan is a wait or the saga
//! settled, releases it in the same statement. The runner renews every
//! lease it holds in the background ([`renew_every`], one statement for all
//! of them) and tells the driver ([`Driver::renewed`]); a call may last far
//! longer than a lease. Before a call the lease as known must leave the
//! call time to reach its participant ([`send_window`]) plus a margin for
//! clocks ([`arrival_margin`]), else it is extended first; the call carries
//! that limit (`arrive_by`) and participants refuse a call that arrives
//! later. So a coordinator paused past its lease cannot act on a saga
//! another has claimed: its writes are fenced, its calls are refused. On stop, the saga is given back
//! at the next step boundary, with whatever memory holds. After a lost
//! lease, nothing more: another coordinator or an operator has the saga.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::domain::{
    assume_unrecorded, decide, deferrable, may_defer, plan, CallResult, Decision, Definition,
    EventRecord, Fact, Phase, Plan, Saga,
};
use crate::store::{Hold, Lease};

/// Deferred decisions are written at the latest this long after the first
/// of them, so the record (and the admin view) never trails a saga by more.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// What the runner must do next.
// One action exists at a time per saga, moved from driver to runner: the
// size of `Save` costs nothing worth a box on the hot path.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write this decision, fenced on the lease ([`crate::store::SagaStore::saga_save`]);
    /// answer [`Input::Saved`].
    Save {
        /// The saga and its new history entries.
        decision: Decision,
        /// The saga reached a state `WaitSaga` returns on.
        settled: bool,
        /// Keep the lease, or give the saga back.
        hold: Hold,
    },
    /// Extend the lease by `ttl` from the store's clock; answer
    /// [`Input::Extended`].
    Extend {
        /// How long.
        ttl: Duration,
    },
    /// Call the participant; answer [`Input::Answered`].
    Call {
        /// Step index.
        step: usize,
        /// Which handler.
        phase: Phase,
        /// Attempt number of the phase.
        attempt: u32,
        /// How long to wait for the answer.
        timeout: Duration,
        /// When the coordinator stops waiting (store clock).
        deadline: DateTime<Utc>,
        /// When the call must have reached the participant (store clock):
        /// the lease outlives it by [`arrival_margin`], and participants
        /// refuse a call that arrives later (a coordinator paused between
        /// here and the send must not act on a saga it no longer holds).
        arrive_by: DateTime<Utc>,
    },
    /// Give the lease back with nothing to write; answer [`Input::Released`].
    Release,
    /// Stop driving the saga.
    Done(Done),
}

/// Why driving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    /// Given back, due again at this time (`None`: settled, or nothing to
    /// do until an operator acts).
    GivenBack(Option<DateTime<Utc>>),
    /// The lease was lost, or a write failed: whoever claims the saga next
    /// reads where it stands.
    Dropped,
}

/// How the runner's last action went.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The write went through; the store's clock at the write.
    Saved {
        /// The store's `now()`.
        db_now: DateTime<Utc>,
    },
    /// The lease now runs until this time.
    Extended {
        /// New expiry (store clock).
        until: DateTime<Utc>,
    },
    /// The lease was given back (or was already gone).
    Released,
    /// The participant answered (or the call failed: the result says how).
    Answered {
        /// What came back.
        result: CallResult,
        /// How long the call took.
        took: Duration,
    },
    /// The call was not sent: the participant had no capacity before its
    /// arrival limit. Nothing reached it; the same attempt is asked again
    /// under a lease covering a new arrival limit.
    NotSent,
    /// A write or an extension found the epoch moved on.
    LeaseLost,
    /// A write or an extension failed otherwise; it may or may not have
    /// committed.
    Failed,
}

/// The time and chance an input arrives with.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// The store's clock, as the runner estimates it.
    pub at: DateTime<Utc>,
    /// A uniform draw from `[0, 1)` (backoff jitter).
    pub jitter: f64,
    /// The coordinator is stopping: give the saga back at the next step
    /// boundary.
    pub stopping: bool,
}

/// What an outstanding action was for.
#[derive(Debug, Clone, PartialEq)]
enum Waiting {
    /// Nothing outstanding (before the first action, or done).
    Nothing,
    /// A pre-write; then the call of this plan.
    PreWrite(Call),
    /// A decision's write.
    Decision { saga: Box<Saga>, hold: Hold },
    /// Giving the saga back.
    GiveBack(Option<DateTime<Utc>>),
    /// An extension before this call.
    Extend(Call),
    /// This call.
    Call(Call),
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Call {
    step: usize,
    phase: Phase,
    attempt: u32,
    timeout: Duration,
    /// Set when the lease is known to cover the call's arrival.
    deadline: DateTime<Utc>,
    arrive_by: DateTime<Utc>,
}

/// Decisions made but not written yet (see [`may_defer`]).
#[derive(Debug, Default)]
struct Unwritten {
    /// Events of the deferred decisions, in order.
    events: Vec<EventRecord>,
    /// The saga in memory differs from its record.
    dirty: bool,
    /// When the first of them was made (store clock).
    since: Option<DateTime<Utc>>,
}

/// Drives one saga under one lease. See the module documentation.
#[derive(Debug)]
pub struct Driver {
    saga: Saga,
    def: Arc<Definition>,
    lease: Lease,
    lease_ttl: Duration,
    unwritten: Unwritten,
    waiting: Waiting,
}

impl Driver {
    /// A driver for a saga just claimed (or created) under `lease`.
    /// `recovered`: its last owner stopped without giving it back, so the
    /// decisions it had not written are lost; the steps it may have reached
    /// are marked as may-have-taken-effect ([`assume_unrecorded`]) and
    /// returned.
    pub fn new(
        mut saga: Saga,
        def: Arc<Definition>,
        lease: Lease,
        lease_ttl: Duration,
        recovered: bool,
    ) -> (Driver, Vec<usize>) {
        let marked = if recovered {
            assume_unrecorded(&mut saga, &def)
        } else {
            Vec::new()
        };
        let unwritten = Unwritten {
            dirty: !marked.is_empty(),
            ..Default::default()
        };
        let driver = Driver {
            saga,
            def,
            lease,
            lease_ttl,
            unwritten,
            waiting: Waiting::Nothing,
        };
        (driver, marked)
    }

    /// The saga as this driver holds it (ahead of its record while
    /// decisions are deferred).
    pub fn saga(&self) -> &Saga {
        &self.saga
    }

    /// The lease.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The definition.
    pub fn definition(&self) -> &Definition {
        &self.def
    }

    /// When the oldest decision still unwritten was made, if any.
    pub fn unwritten_since(&self) -> Option<DateTime<Utc>> {
        self.unwritten.since
    }

    /// The saga, when driving is done.
    pub fn into_saga(self) -> Saga {
        self.saga
    }

    /// The first action.
    pub fn start(&mut self, now: Now) -> Action {
        self.advance(now)
    }

    /// The next action, given how the last one went.
    pub fn on(&mut self, input: Input, now: Now) -> Action {
        let waiting = std::mem::replace(&mut self.waiting, Waiting::Nothing);
        match (waiting, input) {
            (Waiting::Nothing, _) => Action::Done(Done::Dropped),
            (_, Input::LeaseLost | Input::Failed) => Action::Done(Done::Dropped),
            (Waiting::PreWrite(call), Input::Saved { db_now }) => {
                self.saved(db_now, Hold::Keep(self.lease_ttl));
                self.cover(call, now)
            }
            (Waiting::Decision { saga, hold }, Input::Saved { db_now }) => {
                self.saved(db_now, hold);
                self.saga = *saga;
                match hold {
                    Hold::Keep(_) => self.advance(now),
                    Hold::Release(at) => Action::Done(Done::GivenBack(at)),
                }
            }
            (Waiting::GiveBack(at), Input::Saved { .. } | Input::Released) => {
                Action::Done(Done::GivenBack(at))
            }
            (Waiting::Extend(call), Input::Extended { until }) => {
                self.renewed(until);
                self.call(call)
            }
            (Waiting::Call(call), Input::NotSent) => self.not_sent(call, now),
            (Waiting::Call(call), Input::Answered { result, took }) => {
                let fact = Fact::Invoked {
                    step: call.step,
                    phase: call.phase,
                    attempt: call.attempt,
                    result,
                    took,
                };
                self.apply(fact, now)
            }
            // An input that does not answer what was asked: a runner bug.
            // Stop touching the saga; its lease expires.
            (waiting, input) => {
                tracing::error!(
                    ?waiting,
                    ?input,
                    "driver: unexpected input; dropping the saga"
                );
                Action::Done(Done::Dropped)
            }
        }
    }

    /// A write went through: the lease runs on from the store's clock, and
    /// memory no longer holds anything the record lacks.
    fn saved(&mut self, db_now: DateTime<Utc>, hold: Hold) {
        if let Hold::Keep(ttl) = hold {
            self.lease.until = db_now + to_chrono(ttl);
        }
        self.unwritten = Unwritten::default();
    }

    /// Plans from where the saga stands until an action needs the runner.
    fn advance(&mut self, now: Now) -> Action {
        let fact = match plan(&self.saga, &self.def, now.at) {
            // Only right after a claim: every write that leads here has
            // already released the lease.
            Plan::Idle => return self.give_back(None),
            Plan::Wait { until } => return self.give_back(Some(until)),
            Plan::DeadlinePassed => Fact::DeadlinePassed,
            Plan::Recover { step } => Fact::Recovered { step },
            Plan::Invoke {
                step,
                phase,
                attempt,
                pre_write,
            } => {
                if now.stopping {
                    return self.give_back(Some(now.at));
                }
                let call = Call {
                    step,
                    phase,
                    attempt,
                    timeout: self.call_timeout(step, phase, now.at),
                    deadline: now.at,
                    arrive_by: now.at,
                };
                if !pre_write {
                    return self.cover(call, now);
                }
                let started = Fact::AttemptStarted { step };
                match decide(&self.saga, &self.def, started, now.at, now.jitter) {
                    Ok(decision) => {
                        self.saga = decision.saga.clone();
                        let decision = self.with_unwritten(decision);
                        self.waiting = Waiting::PreWrite(call);
                        return Action::Save {
                            decision,
                            settled: false,
                            hold: Hold::Keep(self.lease_ttl),
                        };
                    }
                    Err(error) => return self.refused(&error, now),
                }
            }
        };
        self.apply(fact, now)
    }

    /// The wait for a call: the step's timeout, capped by the saga's
    /// deadline for an action up to the pivot (DeadlinePassed follows at the
    /// next plan).
    fn call_timeout(&self, step: usize, phase: Phase, now: DateTime<Utc>) -> Duration {
        let mut timeout = self.def.steps[step].timeout;
        if let (Some(d), Phase::Action) = (self.saga.deadline_at, phase) {
            if self.def.pivot().is_none_or(|p| step <= p) {
                let left = (d - now).to_std().unwrap_or(Duration::ZERO);
                timeout = timeout.min(left.max(Duration::from_millis(1)));
            }
        }
        timeout
    }

    /// Makes sure the lease outlives the call's arrival with a margin,
    /// then calls. The lease need not cover the whole call: it is renewed
    /// in the background while the call runs ([`Driver::renewed`]), and if
    /// renewal stops (a paused or cut-off coordinator), the participant
    /// refuses a call that had not arrived by then.
    fn cover(&mut self, mut call: Call, now: Now) -> Action {
        call.deadline = now.at + to_chrono(call.timeout);
        let window = to_chrono(send_window(self.lease_ttl).min(call.timeout));
        if self.arrival_limit() >= now.at + window {
            return self.call(call);
        }
        self.waiting = Waiting::Extend(call);
        Action::Extend {
            ttl: self.lease_ttl,
        }
    }

    /// The latest arrival the lease as known covers with the margin.
    fn arrival_limit(&self) -> DateTime<Utc> {
        self.lease.until - to_chrono(arrival_margin(self.lease_ttl))
    }

    /// A call not sent for want of capacity is asked again (also while
    /// stopping: its attempt may be written as started, and giving the saga
    /// back now would leave its outcome unknown), unless the saga's deadline
    /// passed meanwhile (its waiting action counts as reached: what may
    /// have run is compensated).
    fn not_sent(&mut self, mut call: Call, now: Now) -> Action {
        let before_pivot = self.def.pivot().is_none_or(|p| call.step <= p);
        let deadline_passed = self.saga.deadline_at.is_some_and(|d| now.at >= d);
        if call.phase == Phase::Action && before_pivot && deadline_passed {
            return self.apply(Fact::DeadlinePassed, now);
        }
        call.timeout = self.call_timeout(call.step, call.phase, now.at);
        if self.checkpoint_due(now) {
            // The wait may have outlasted the checkpoint bound: write what
            // memory holds first.
            let decision = Decision {
                saga: self.saga.clone(),
                events: std::mem::take(&mut self.unwritten.events),
                changed_steps: Vec::new(),
            };
            self.waiting = Waiting::PreWrite(call);
            return Action::Save {
                decision,
                settled: false,
                hold: Hold::Keep(self.lease_ttl),
            };
        }
        self.cover(call, now)
    }

    /// The oldest unwritten decision is at the checkpoint bound.
    fn checkpoint_due(&self, now: Now) -> bool {
        self.unwritten
            .since
            .is_some_and(|t| now.at - t >= to_chrono(CHECKPOINT_EVERY))
    }

    /// The lease was renewed in the background to `until` (store clock);
    /// an older renewal than what the driver knows changes nothing.
    pub fn renewed(&mut self, until: DateTime<Utc>) {
        if until > self.lease.until {
            self.lease.until = until;
        }
    }

    fn call(&mut self, mut call: Call) -> Action {
        call.arrive_by = call.deadline.min(self.arrival_limit());
        self.waiting = Waiting::Call(call);
        Action::Call {
            step: call.step,
            phase: call.phase,
            attempt: call.attempt,
            timeout: call.timeout,
            deadline: call.deadline,
            arrive_by: call.arrive_by,
        }
    }

    /// Decides one fact; keeps it in memory where [`may_defer`] allows,
    /// else asks for it to be written.
    fn apply(&mut self, fact: Fact, now: Now) -> Action {
        let keepable = deferrable(&fact, &self.def);
        let decision = match decide(&self.saga, &self.def, fact, now.at, now.jitter) {
            Ok(d) => d,
            Err(error) => return self.refused(&error, now),
        };
        let next = plan(&decision.saga, &self.def, now.at);
        let checkpoint_due = self.checkpoint_due(now);
        if keepable
            && !now.stopping
            && !checkpoint_due
            && may_defer(&self.def, self.saga.state, &decision.saga, &next)
        {
            self.unwritten.events.extend(decision.events);
            self.unwritten.dirty = true;
            self.unwritten.since.get_or_insert(now.at);
            self.saga = decision.saga;
            return self.advance(now);
        }
        let hold = match next {
            Plan::Idle => Hold::Release(None),
            Plan::Wait { until } => Hold::Release(Some(until)),
            _ if now.stopping => Hold::Release(Some(now.at)),
            _ => Hold::Keep(self.lease_ttl),
        };
        let settled = decision.settled_now(self.saga.state);
        let decision = self.with_unwritten(decision);
        self.waiting = Waiting::Decision {
            saga: Box::new(decision.saga.clone()),
            hold,
        };
        Action::Save {
            decision,
            settled,
            hold,
        }
    }

    /// The state machine refused a fact (a bug, or a stale view): give the
    /// saga back, due at once, so that a fresh claim reads it again.
    fn refused(&mut self, error: &crate::domain::TransitionError, now: Now) -> Action {
        tracing::error!(%error, "state machine refused a fact; releasing the saga");
        self.give_back(Some(now.at))
    }

    /// A decision carrying the deferred decisions' events before its own.
    fn with_unwritten(&mut self, mut decision: Decision) -> Decision {
        if !self.unwritten.events.is_empty() {
            let mut events = std::mem::take(&mut self.unwritten.events);
            events.append(&mut decision.events);
            decision.events = events;
        }
        decision
    }

    /// Gives the saga back, due again at `at`: written whole if memory holds
    /// anything its record lacks, else a bare release.
    fn give_back(&mut self, at: Option<DateTime<Utc>>) -> Action {
        self.waiting = Waiting::GiveBack(at);
        if !self.unwritten.dirty {
            return Action::Release;
        }
        let decision = Decision {
            saga: self.saga.clone(),
            events: std::mem::take(&mut self.unwritten.events),
            changed_steps: Vec::new(),
        };
        Action::Save {
            decision,
            settled: false,
            hold: Hold::Release(at),
        }
    }
}

/// How early before the lease ends a call must reach its participant: the
/// participants' clocks may differ from the store's by up to this much.
pub fn arrival_margin(lease_ttl: Duration) -> Duration {
    lease_ttl / 3
}

/// The least time a call is given to reach its participant; a lease that
/// leaves less is extended first.
fn send_window(lease_ttl: Duration) -> Duration {
    lease_ttl / 4
}

/// How often a coordinator renews the leases it holds: often enough that a
/// renewed lease always leaves a call its send window.
pub fn renew_every(lease_ttl: Duration) -> Duration {
    lease_ttl / 5
}

fn to_chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}
