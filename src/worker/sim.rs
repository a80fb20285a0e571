//! The simulation: the real [`Driver`], two or three coordinators racing for
//! the same sagas, one in-memory store with the fencing of the real ones,
//! participants with barriers, and a seeded scheduler that interleaves every
//! move at random — claims, writes, calls and their answers (late, past
//! their timeout, or lost), time passing (leases expire, waits end),
//! crashes between any two actions, graceful stops, operators acting at any
//! point. The invariants are checked after every move.
//!
//! ```text
//!   seed ─▶ Rng ─▶ pick a move ─┬─ coordinator claims due sagas (epoch + 1)
//!                               ├─ a coordinator renews its leases (one round)
//!                               ├─ a driver's action runs: Save / Extend / Release
//!                               │   against Mem (fenced), Call at the participant
//!                               ├─ a call's answer arrives → driver.on(Answered)
//!                               ├─ time passes           ├─ a coordinator crashes
//!                               ├─ an operator acts      └─ a coordinator stops
//!                               ▼
//!                          check invariants
//! ```
//!
//! `SAGA_SIM_SEEDS=n` runs seeds `0..n` (default 10,000); `SAGA_SIM_SEED=s`
//! replays one and `SIM_TRACE=1` prints its moves. A failure prints the
//! command that replays it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::driver::{Action, Driver, Input, Now, CHECKPOINT_EVERY};
use crate::domain::testkit::{now as t0, random_definition, random_result, Rng};
use crate::domain::{
    assume_unrecorded, decide, CallResult, Decision, Definition, Fact, Phase, Saga, SagaId,
    SagaState, StepState,
};
use crate::store::{Hold, Lease, OwnerId};

/// The lease every claim and write takes.
const TTL: Duration = Duration::from_secs(2);
/// Moves before a seed must have brought every saga to rest.
const MOVES_MAX: usize = 20_000;
/// Operator actions per saga at most.
const OPERATOR_ACTIONS_MAX: u32 = 3;

/// One saga as the store holds it.
struct Row {
    saga: Saga,
    epoch: i64,
    owner: Option<u64>,
    lease_until: Option<DateTime<Utc>>,
    next_run_at: Option<DateTime<Utc>>,
}

/// The store: the semantics of `SagaStore`'s owner writes, claims and
/// operator writes, in memory.
struct Mem {
    rows: Vec<Row>,
    /// Which owner's writes were accepted under each (saga, epoch).
    writers: HashMap<(usize, i64), u64>,
    /// The epochs an operator began (the others: a claim).
    operator_epochs: std::collections::HashSet<(usize, i64)>,
}

fn owner_id(o: u64) -> OwnerId {
    OwnerId(Uuid::from_u128(u128::from(o) + 1))
}

impl Mem {
    /// Claims due sagas for `owner`, as `lease_claim_due` does.
    fn claim(&mut self, owner: u64, now: DateTime<Utc>, limit: usize) -> Vec<(usize, Lease, bool)> {
        let mut out = Vec::new();
        for (i, r) in self.rows.iter_mut().enumerate() {
            if out.len() == limit {
                break;
            }
            let due = matches!(r.saga.state, SagaState::Running | SagaState::Compensating)
                && r.next_run_at.is_some_and(|t| t <= now);
            if !due {
                continue;
            }
            let unclean = r.owner.is_some();
            r.epoch += 1;
            r.owner = Some(owner);
            let until = now + chrono::Duration::from_std(TTL).unwrap_or_default();
            r.lease_until = Some(until);
            r.next_run_at = Some(until);
            let lease = Lease {
                saga_id: r.saga.id,
                owner: owner_id(owner),
                epoch: r.epoch,
                until,
            };
            out.push((i, lease, unclean));
        }
        out
    }

    /// Whether `lease` is the current one of saga `i`.
    fn holds(&self, i: usize, lease: &Lease, owner: u64) -> bool {
        let r = &self.rows[i];
        r.epoch == lease.epoch && r.owner == Some(owner)
    }

    /// Whether `lease` still holds saga `i` (epoch and owner, as the real
    /// stores check in the statement itself), recording the accepted writer.
    fn fenced(&mut self, i: usize, lease: &Lease, owner: u64) -> Result<bool, String> {
        if !self.holds(i, lease, owner) {
            return Ok(false);
        }
        match self.writers.insert((i, lease.epoch), owner) {
            Some(o) if o != owner => Err(format!(
                "saga {i}: writes of owners {o} and {owner} accepted under epoch {}",
                lease.epoch
            )),
            _ => Ok(true),
        }
    }

    fn save(
        &mut self,
        i: usize,
        owner: u64,
        lease: &Lease,
        d: &Decision,
        hold: Hold,
        now: DateTime<Utc>,
    ) -> Result<Input, String> {
        if !self.fenced(i, lease, owner)? {
            return Ok(Input::LeaseLost);
        }
        let r = &mut self.rows[i];
        r.saga = d.saga.clone();
        match hold {
            Hold::Keep(ttl) => {
                let until = now + chrono::Duration::from_std(ttl).unwrap_or_default();
                r.lease_until = Some(until);
                r.next_run_at = Some(until);
            }
            Hold::Release(at) => {
                r.owner = None;
                r.lease_until = None;
                r.next_run_at = at;
            }
        }
        Ok(Input::Saved { db_now: now })
    }

    fn extend(
        &mut self,
        i: usize,
        owner: u64,
        lease: &Lease,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<Input, String> {
        if !self.fenced(i, lease, owner)? {
            return Ok(Input::LeaseLost);
        }
        let until = now + chrono::Duration::from_std(ttl).unwrap_or_default();
        let r = &mut self.rows[i];
        r.lease_until = Some(until);
        r.next_run_at = Some(until);
        Ok(Input::Extended { until })
    }

    /// One renewal round of `owner`: every lease in `held` it still holds
    /// runs on to `now + TTL`, as `lease_renew` does.
    fn renew(
        &mut self,
        owner: u64,
        held: &[(usize, Lease)],
        now: DateTime<Utc>,
    ) -> Result<Vec<(usize, i64)>, String> {
        let until = now + chrono::Duration::from_std(TTL).unwrap_or_default();
        let mut renewed = Vec::new();
        for (i, lease) in held {
            if self.fenced(*i, lease, owner)? {
                let r = &mut self.rows[*i];
                r.lease_until = Some(until);
                r.next_run_at = Some(until);
                renewed.push((*i, lease.epoch));
            }
        }
        Ok(renewed)
    }

    fn release(
        &mut self,
        i: usize,
        owner: u64,
        lease: &Lease,
        now: DateTime<Utc>,
    ) -> Result<Input, String> {
        if !self.fenced(i, lease, owner)? {
            return Ok(Input::LeaseLost);
        }
        let r = &mut self.rows[i];
        r.owner = None;
        r.lease_until = None;
        r.next_run_at = Some(now);
        Ok(Input::Released)
    }
}

/// What one saga's participants saw.
#[derive(Default)]
struct World {
    /// Effects applied per (step, phase).
    effects: HashMap<(usize, Phase), u32>,
    /// The action may have taken effect (succeeded, or unknown).
    maybe_applied: Vec<bool>,
    /// The action was invoked, or marked as may-have-run by a recovery or
    /// an operator: only these may be compensated.
    reached: Vec<bool>,
    /// Order of first successful compensations.
    compensated: Vec<usize>,
    /// The barrier's record of a compensation per step: a later action of
    /// that step is refused (no hanging).
    barrier: Vec<bool>,
    /// The barrier's success or refusal per idempotent (step, phase), with
    /// the attempt that got it: a duplicate gets it back with no second
    /// effect (the SDK's barrier records a refusal too, undoing the
    /// handler's work; a later attempt than the refusing one, an operator's
    /// retry, runs again).
    first: HashMap<(usize, Phase), (CallResult, u32)>,
    compensation_began: bool,
}

impl World {
    /// The barrier and the handler: a duplicate of a success gets it back;
    /// otherwise the drawn answer, and its effect where it has one.
    fn receive(
        &mut self,
        (step, phase, attempt): (usize, Phase, u32),
        idempotent: bool,
        drawn: CallResult,
        unknown_applies: bool,
    ) -> Result<CallResult, String> {
        if idempotent {
            match self.first.get(&(step, phase)) {
                Some((CallResult::Failed(_), refused_at)) if attempt > *refused_at => {}
                Some((first, _)) => return Ok(first.clone()),
                None => {}
            }
        }
        let applied_before = self.effects.get(&(step, phase)).copied().unwrap_or(0) > 0;
        // An unknown outcome that did apply: the barrier holds the success,
        // and a refusal is the business's own answer, the same every time.
        // "Not now" may come first (a handler shedding load before its
        // barrier), after an earlier attempt applied.
        let result = match drawn {
            CallResult::Failed(_) if idempotent && applied_before => CallResult::Succeeded(None),
            other => other,
        };
        if idempotent && matches!(result, CallResult::Succeeded(_) | CallResult::Failed(_)) {
            self.first.insert((step, phase), (result.clone(), attempt));
        }
        let applies = match result {
            CallResult::Succeeded(_) => true,
            CallResult::Transient(_) => unknown_applies,
            _ => false,
        };
        if applies {
            let n = self.effects.entry((step, phase)).or_default();
            if *n == 0 || !idempotent {
                *n += 1;
            }
            if *n > 1 {
                return Err(format!(
                    "non-idempotent action of step {step} took effect twice"
                ));
            }
            if phase == Phase::Action {
                self.maybe_applied[step] = true;
            }
        }
        if phase == Phase::Compensation && matches!(result, CallResult::Succeeded(_)) {
            self.barrier[step] = true;
            if !self.compensated.contains(&step) {
                if self.compensated.last().is_some_and(|&last| last < step) {
                    return Err(format!(
                        "compensation order: {step} after {:?}",
                        self.compensated
                    ));
                }
                self.compensated.push(step);
            }
        }
        Ok(result)
    }
}

/// A call made, its answer not yet back.
struct InFlight {
    result: CallResult,
    deadline: DateTime<Utc>,
    started: DateTime<Utc>,
}

struct Slot {
    saga: usize,
    driver: Driver,
    action: Action,
    call: Option<InFlight>,
}

struct Coordinator {
    id: u64,
    stopping: bool,
    slots: Vec<Slot>,
}

/// What the seeds exercised, summed (the test checks each happened).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Seen {
    crashes: u64,
    unclean_claims: u64,
    leases_lost: u64,
    stale_calls: u64,
    late_calls_refused: u64,
    deferred_writes: u64,
    operator_actions: u64,
    renewals: u64,
    calls_outliving_a_lease: u64,
    not_sent: u64,
}

impl Seen {
    fn add(&mut self, o: Seen) {
        self.crashes += o.crashes;
        self.unclean_claims += o.unclean_claims;
        self.leases_lost += o.leases_lost;
        self.stale_calls += o.stale_calls;
        self.late_calls_refused += o.late_calls_refused;
        self.deferred_writes += o.deferred_writes;
        self.operator_actions += o.operator_actions;
        self.renewals += o.renewals;
        self.calls_outliving_a_lease += o.calls_outliving_a_lease;
        self.not_sent += o.not_sent;
    }
}

struct Sim {
    stats: Seen,
    rng: Rng,
    trace: bool,
    t: DateTime<Utc>,
    def: Arc<Definition>,
    mem: Mem,
    worlds: Vec<World>,
    coords: Vec<Coordinator>,
    next_id: u64,
    operator_actions: Vec<u32>,
    /// Per saga: the last epoch and state seen.
    seen: Vec<(i64, SagaState)>,
}

/// How a seed ended, for the test's coverage check.
pub(crate) fn simulate(seed: u64) -> Result<(Vec<SagaState>, Seen), String> {
    let mut sim = Sim::new(seed);
    for _ in 0..MOVES_MAX {
        if sim.at_rest() {
            let stats = sim.stats;
            return sim.finish().map(|ends| (ends, stats));
        }
        sim.step()?;
        sim.check()?;
    }
    Err(format!(
        "not at rest after {MOVES_MAX} moves: {:?}",
        sim.mem
            .rows
            .iter()
            .map(|r| r.saga.state)
            .collect::<Vec<_>>()
    ))
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let mut def = random_definition(&mut rng);
        // Timeouts shorter and far longer than the lease (2 s): a call may
        // outlive many leases, renewed in the background.
        for step in &mut def.steps {
            step.timeout = match rng.below(4) {
                0 => Duration::from_millis(5_000 + rng.below(20_000)),
                _ => Duration::from_millis(100 + rng.below(3_000)),
            };
        }
        let def = Arc::new(def);
        let sagas = 1 + rng.below(3) as usize;
        let coords = 2 + rng.below(2);
        let t = t0();
        let rows = (0..sagas)
            .map(|i| Row {
                saga: Saga::new(SagaId(Uuid::from_u128(i as u128 + 1)), &def, "{}".into(), t),
                epoch: 0,
                owner: None,
                lease_until: None,
                next_run_at: Some(t),
            })
            .collect();
        let n = def.steps.len();
        Sim {
            stats: Seen::default(),
            trace: std::env::var_os("SIM_TRACE").is_some(),
            t,
            worlds: (0..sagas)
                .map(|_| World {
                    maybe_applied: vec![false; n],
                    reached: vec![false; n],
                    barrier: vec![false; n],
                    ..Default::default()
                })
                .collect(),
            coords: (0..coords)
                .map(|id| Coordinator {
                    id,
                    stopping: false,
                    slots: Vec::new(),
                })
                .collect(),
            next_id: coords,
            operator_actions: vec![0; sagas],
            seen: vec![(0, SagaState::Running); sagas],
            mem: Mem {
                rows,
                writers: HashMap::new(),
                operator_epochs: Default::default(),
            },
            def,
            rng,
        }
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("[{}] {}", (self.t - t0()).num_milliseconds(), what());
        }
    }

    /// Every saga settled (terminal, or suspended with the operators'
    /// patience spent) and nobody driving one.
    fn at_rest(&self) -> bool {
        self.coords.iter().all(|c| c.slots.is_empty())
            && self.mem.rows.iter().enumerate().all(|(i, r)| {
                r.saga.state.is_terminal()
                    || (r.saga.state == SagaState::Suspended
                        && self.operator_actions[i] >= OPERATOR_ACTIONS_MAX)
            })
    }

    fn step(&mut self) -> Result<(), String> {
        let busy: usize = self.coords.iter().map(|c| c.slots.len()).sum();
        match self.rng.below(100) {
            0..=49 if busy > 0 => self.drive_one(),
            50..=54 => self.renew(),
            0..=69 => {
                self.claim();
                Ok(())
            }
            70..=89 => {
                let ms = match self.rng.below(10) {
                    0 => 1_000 + self.rng.below(3_000),
                    _ => 1 + self.rng.below(200),
                };
                self.t += chrono::Duration::milliseconds(ms as i64);
                Ok(())
            }
            90..=93 => {
                self.crash();
                Ok(())
            }
            94..=95 => {
                self.stop();
                Ok(())
            }
            _ => self.operator(),
        }
    }

    fn now(&mut self, stopping: bool) -> Now {
        Now {
            at: self.t,
            jitter: self.rng.unit(),
            stopping,
        }
    }

    /// A coordinator's renewal round: the leases its drivers hold run on,
    /// and each driver learns it (as the runner tells it between actions).
    fn renew(&mut self) -> Result<(), String> {
        let c = self.rng.below(self.coords.len() as u64) as usize;
        let owner = self.coords[c].id;
        let held: Vec<(usize, Lease)> = self.coords[c]
            .slots
            .iter()
            .map(|s| (s.saga, *s.driver.lease()))
            .collect();
        let renewed = self.mem.renew(owner, &held, self.t)?;
        let until = self.t + chrono::Duration::from_std(TTL).unwrap_or_default();
        for slot in &mut self.coords[c].slots {
            if renewed.contains(&(slot.saga, slot.driver.lease().epoch)) {
                slot.driver.renewed(until);
                self.stats.renewals += 1;
            }
        }
        Ok(())
    }

    fn claim(&mut self) {
        let c = self.rng.below(self.coords.len() as u64) as usize;
        if self.coords[c].stopping {
            return;
        }
        let id = self.coords[c].id;
        let limit = 1 + self.rng.below(2) as usize;
        for (i, lease, unclean) in self.mem.claim(id, self.t, limit) {
            self.stats.unclean_claims += u64::from(unclean);
            let saga = self.mem.rows[i].saga.clone();
            let (mut driver, marked) = Driver::new(saga, self.def.clone(), lease, TTL, unclean);
            for m in &marked {
                self.worlds[i].reached[*m] = true;
            }
            let now = self.now(false);
            let action = driver.start(now);
            self.log(|| format!("c{id} claims saga {i} at epoch {} (unclean {unclean}, marks {marked:?}): {action:?}", lease.epoch));
            self.coords[c].slots.push(Slot {
                saga: i,
                driver,
                action,
                call: None,
            });
        }
    }

    /// Carries out one driver's pending action (or delivers its call's
    /// answer) and feeds back the result.
    fn drive_one(&mut self) -> Result<(), String> {
        let busy: Vec<(usize, usize)> = (0..self.coords.len())
            .flat_map(|c| (0..self.coords[c].slots.len()).map(move |s| (c, s)))
            .collect();
        let (c, s) = busy[self.rng.below(busy.len() as u64) as usize];
        let (owner, stopping) = (self.coords[c].id, self.coords[c].stopping);
        let mut slot = self.coords[c].slots.swap_remove(s);
        let i = slot.saga;
        let lease = *slot.driver.lease();
        let input = match &slot.action {
            Action::Done(done) => {
                self.log(|| format!("c{owner} done with saga {i}: {done:?}"));
                return Ok(());
            }
            Action::Save { decision, hold, .. } => {
                self.mem.save(i, owner, &lease, decision, *hold, self.t)?
            }
            Action::Extend { ttl } => self.mem.extend(i, owner, &lease, *ttl, self.t)?,
            Action::Release => self.mem.release(i, owner, &lease, self.t)?,
            Action::Call { .. } => match self.call_move(&mut slot, owner)? {
                Some(input) => input,
                None => {
                    self.coords[c].slots.push(slot);
                    return Ok(());
                }
            },
        };
        self.stats.leases_lost += u64::from(input == Input::LeaseLost);
        let now = self.now(stopping);
        self.log(|| format!("c{owner} saga {i}: {:?} → {input:?}", short(&slot.action)));
        let was_call = matches!(slot.action, Action::Call { .. });
        slot.action = slot.driver.on(input, now);
        if was_call {
            self.check_kept(&slot)?;
        }
        self.log(|| format!("c{owner} saga {i} next: {:?}", short(&slot.action)));
        self.coords[c].slots.push(slot);
        Ok(())
    }

    /// A call's two moves: it reaches the participant (`None`: the answer
    /// is on its way), then its answer arrives.
    fn call_move(&mut self, slot: &mut Slot, owner: u64) -> Result<Option<Input>, String> {
        let Action::Call {
            step,
            phase,
            attempt,
            deadline,
            arrive_by,
            ..
        } = slot.action
        else {
            return Err("call_move without a call".into());
        };
        let (i, lease) = (slot.saga, *slot.driver.lease());
        if let Some(call) = slot.call.take() {
            let result = if self.t > call.deadline {
                CallResult::Transient("DEADLINE_EXCEEDED".into())
            } else {
                call.result
            };
            let took = (self.t - call.started).to_std().unwrap_or_default();
            self.stats.calls_outliving_a_lease += u64::from(took > TTL);
            return Ok(Some(Input::Answered { result, took }));
        }
        // The participant had no capacity before the arrival limit: the
        // call is not sent (time passes while it waits).
        if self.rng.below(20) == 0 {
            self.stats.not_sent += 1;
            let waited = (arrive_by - self.t).num_milliseconds().max(0) as u64;
            self.t += chrono::Duration::milliseconds(self.rng.below(waited + 1) as i64);
            return Ok(Some(Input::NotSent));
        }
        let current = self.mem.holds(i, &lease, owner);
        self.stats.stale_calls += u64::from(!current);
        // A call that arrives after its arrival limit is refused unrun.
        let result = if self.t > arrive_by {
            self.stats.late_calls_refused += 1;
            CallResult::Transient("DEADLINE_EXCEEDED: arrived late".into())
        } else {
            // Only an operator may take a saga from an owner whose call can
            // still land: a claim waits for the lease, which outlives every
            // call's arrival limit.
            if !current && !self.mem.operator_epochs.contains(&(i, lease.epoch + 1)) {
                return Err(format!(
                    "saga {i}: a call of epoch {} reached the participant after another coordinator claimed the saga",
                    lease.epoch
                ));
            }
            self.participant(i, (step, phase, attempt), current)?
        };
        slot.call = Some(InFlight {
            result,
            started: self.t,
            deadline,
        });
        Ok(None)
    }

    /// After an answer: if it was kept in memory, no decision older than
    /// the checkpoint bound may stay unwritten.
    fn check_kept(&mut self, slot: &Slot) -> Result<(), String> {
        if matches!(slot.action, Action::Save { .. }) {
            return Ok(());
        }
        self.stats.deferred_writes += u64::from(matches!(slot.action, Action::Call { .. }));
        let bound = chrono::Duration::from_std(CHECKPOINT_EVERY).unwrap_or_default();
        match slot.driver.unwritten_since() {
            Some(since) if self.t - since > bound => Err(format!(
                "saga {}: a decision unwritten since {since} kept past the checkpoint bound",
                slot.saga
            )),
            _ => Ok(()),
        }
    }

    /// A participant receives a call: its effect (or none), checked.
    /// `current`: the caller holds the saga's lease (else it is a stale
    /// owner, fenced out of the store but not out of the network).
    fn participant(
        &mut self,
        i: usize,
        (step, phase, attempt): (usize, Phase, u32),
        current: bool,
    ) -> Result<CallResult, String> {
        let idempotent = self.def.steps[step].idempotent || phase == Phase::Compensation;
        let drawn = random_result(&mut self.rng, phase);
        let unknown_applies = self.rng.below(2) == 0;
        let w = &mut self.worlds[i];
        match phase {
            Phase::Action if w.compensation_began && current => {
                return Err(format!(
                    "saga {i}: action of step {step} after compensation began"
                ))
            }
            // The barrier refuses an action whose compensation it recorded.
            Phase::Action if w.barrier[step] => {
                return Ok(CallResult::Failed("compensated already".into()))
            }
            Phase::Action => w.reached[step] = true,
            Phase::Compensation => {
                if !w.reached[step] {
                    return Err(format!(
                        "saga {i}: compensation of step {step}, which never ran nor may have"
                    ));
                }
                w.compensation_began = true;
            }
        }
        let result = w
            .receive((step, phase, attempt), idempotent, drawn, unknown_applies)
            .map_err(|e| format!("saga {i}: {e}"))?;
        if self.trace {
            eprintln!("  participant: saga {i} step {step} {phase} → {result:?}");
        }
        Ok(result)
    }

    /// A coordinator dies: what it held in memory and its calls in flight
    /// are gone (their effects stay); a fresh one starts in its place.
    fn crash(&mut self) {
        let c = self.rng.below(self.coords.len() as u64) as usize;
        let id = self.next_id;
        self.next_id += 1;
        self.stats.crashes += 1;
        let old = std::mem::replace(
            &mut self.coords[c],
            Coordinator {
                id,
                stopping: false,
                slots: Vec::new(),
            },
        );
        self.log(|| {
            format!(
                "c{} crashes holding {} sagas; c{id} starts",
                old.id,
                old.slots.len()
            )
        });
    }

    /// A coordinator is asked to stop: its drivers give their sagas back at
    /// the next step boundary; once it holds none, a fresh one replaces it.
    fn stop(&mut self) {
        let c = self.rng.below(self.coords.len() as u64) as usize;
        if self.coords[c].slots.is_empty() {
            let id = self.next_id;
            self.next_id += 1;
            self.coords[c] = Coordinator {
                id,
                stopping: false,
                slots: Vec::new(),
            };
            return;
        }
        self.coords[c].stopping = true;
        self.log(|| format!("c{} stopping", self.coords[c].id));
    }

    /// An operator acts on a saga, as a careful person would: a suspended
    /// saga whose non-idempotent step did apply is resolved, another
    /// retried; a running one is now and then aborted.
    fn operator(&mut self) -> Result<(), String> {
        let i = self.rng.below(self.mem.rows.len() as u64) as usize;
        if self.operator_actions[i] >= OPERATOR_ACTIONS_MAX {
            return Ok(());
        }
        let row = &self.mem.rows[i];
        let (actor, note) = ("sim".to_owned(), "by hand".to_owned());
        let fact = match row.saga.state {
            SagaState::Suspended => {
                let unknown = (0..self.def.steps.len()).find(|&s| {
                    row.saga.steps[s].state == StepState::Running && !self.def.steps[s].idempotent
                });
                let applied = unknown.is_some_and(|s| {
                    self.worlds[i]
                        .effects
                        .get(&(s, Phase::Action))
                        .copied()
                        .unwrap_or(0)
                        > 0
                });
                if applied {
                    Fact::OperatorResolve { actor, note }
                } else {
                    Fact::OperatorRetry { actor, note }
                }
            }
            SagaState::Running if self.rng.below(4) == 0 => Fact::OperatorAbort { actor, note },
            _ => return Ok(()),
        };
        // As `Ops` does: a saga with an owner may be further on than its
        // record shows.
        let mut saga = row.saga.clone();
        if row.owner.is_some() {
            assume_unrecorded(&mut saga, &self.def);
        }
        let jitter = self.rng.unit();
        let Ok(decision) = decide(&saga, &self.def, fact.clone(), self.t, jitter) else {
            return Ok(());
        };
        self.operator_actions[i] += 1;
        self.stats.operator_actions += 1;
        for (s, step) in decision.saga.steps.iter().enumerate() {
            if step.state == StepState::Running {
                self.worlds[i].reached[s] = true;
            }
        }
        let row = &mut self.mem.rows[i];
        row.epoch += 1;
        self.mem.operator_epochs.insert((i, row.epoch));
        row.owner = None;
        row.lease_until = None;
        row.next_run_at = matches!(
            decision.saga.state,
            SagaState::Running | SagaState::Compensating
        )
        .then_some(self.t);
        row.saga = decision.saga;
        self.log(|| format!("operator on saga {i}: {fact:?}"));
        Ok(())
    }

    /// After every move: epochs only grow, terminal states absorb.
    fn check(&mut self) -> Result<(), String> {
        for (i, r) in self.mem.rows.iter().enumerate() {
            let (epoch, state) = self.seen[i];
            if r.epoch < epoch {
                return Err(format!(
                    "saga {i}: epoch went back from {epoch} to {}",
                    r.epoch
                ));
            }
            if state.is_terminal() && r.saga.state != state {
                return Err(format!(
                    "saga {i}: terminal {state} became {}",
                    r.saga.state
                ));
            }
            self.seen[i] = (r.epoch, r.saga.state);
            // A step recorded as started (a pre-write) or done may have
            // taken effect: compensating it is allowed from now on.
            for (k, step) in r.saga.steps.iter().enumerate() {
                if matches!(step.state, StepState::Running | StepState::Succeeded) {
                    self.worlds[i].reached[k] = true;
                }
            }
        }
        Ok(())
    }

    /// At rest: every saga terminal, or suspended with a reason, and what
    /// the participants saw agrees with how it ended.
    fn finish(self) -> Result<Vec<SagaState>, String> {
        let mut ends = Vec::new();
        for (i, r) in self.mem.rows.iter().enumerate() {
            let (s, w) = (&r.saga, &self.worlds[i]);
            match s.state {
                SagaState::Completed => {
                    if s.steps.iter().any(|st| st.state != StepState::Succeeded) {
                        return Err(format!("saga {i}: completed with a step not succeeded"));
                    }
                }
                SagaState::Compensated => {
                    for (k, applied) in w.maybe_applied.iter().enumerate() {
                        if *applied && self.def.steps[k].compensation.is_none() {
                            return Err(format!(
                                "saga {i}: compensated although step {k} (no compensation) may have applied"
                            ));
                        }
                        if *applied && !w.compensated.contains(&k) {
                            return Err(format!(
                                "saga {i}: compensated but step {k}, which may have applied, was not"
                            ));
                        }
                    }
                }
                SagaState::Suspended if s.error.as_deref().is_none_or(str::is_empty) => {
                    return Err(format!("saga {i}: suspended without a reason"));
                }
                SagaState::Suspended | SagaState::Resolved => {}
                other => return Err(format!("saga {i}: ended {other}, not at rest")),
            }
            ends.push(s.state);
        }
        Ok(ends)
    }
}

/// An action, without the saga it carries (for traces).
fn short(a: &Action) -> String {
    match a {
        Action::Save { decision, hold, .. } => format!(
            "Save({}, {:?}, {} events)",
            decision.saga.state,
            hold,
            decision.events.len()
        ),
        other => format!("{other:?}"),
    }
}

#[test]
fn simulation_of_the_real_driver_keeps_the_invariants() {
    let env = |k: &str| std::env::var(k).ok().and_then(|s| s.parse::<u64>().ok());
    let seeds = match env("SAGA_SIM_SEED") {
        Some(s) => s..s + 1,
        None => 0..env("SAGA_SIM_SEEDS").unwrap_or(10_000),
    };
    let mut ends: HashMap<SagaState, u64> = HashMap::new();
    let mut seen = Seen::default();
    for seed in seeds.clone() {
        match simulate(seed) {
            Ok((states, stats)) => {
                for s in states {
                    *ends.entry(s).or_default() += 1;
                }
                seen.add(stats);
            }
            Err(e) => panic!(
                "seed {seed}: {e}\nreplay: SAGA_SIM_SEED={seed} SIM_TRACE=1 cargo test --lib simulation_of_the_real_driver"
            ),
        }
    }
    println!(
        "simulated {} seeds: ends {ends:?}; {seen:?}",
        seeds.end - seeds.start
    );
    if seeds.end - seeds.start >= 1_000 {
        // And every kind of trouble happened.
        for (what, n) in [
            ("crashes", seen.crashes),
            ("unclean claims", seen.unclean_claims),
            ("lost leases", seen.leases_lost),
            ("calls by a fenced-out owner", seen.stale_calls),
            ("late calls refused", seen.late_calls_refused),
            ("deferred writes", seen.deferred_writes),
            ("operator actions", seen.operator_actions),
            ("background renewals", seen.renewals),
            ("calls outliving a lease", seen.calls_outliving_a_lease),
            ("calls not sent for want of capacity", seen.not_sent),
        ] {
            assert!(n > 0, "no {what} in {seen:?}");
        }
        // The seeds explore every way a saga can end.
        for end in [
            SagaState::Completed,
            SagaState::Compensated,
            SagaState::Suspended,
            SagaState::Resolved,
        ] {
            assert!(
                ends.get(&end).copied().unwrap_or(0) > 0,
                "no saga ended {end}: {ends:?}"
            );
        }
    }
}
