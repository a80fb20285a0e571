//! The worker: drives sagas under leases.
//!
//! ```text
//!   StartSaga ──(insert, leased to us)──┐
//!   LISTEN sagad_due / poll / timer ──▶ claim loop ──(FOR UPDATE SKIP LOCKED)──┐
//!                                                                             ▼
//!   drive(saga, lease):  plan ─▶ [pre-write] ─▶ call participant ─▶ decide ─▶ save (fenced)
//!                          ▲                                                   │
//!                          └───────────────────────────────────────────────────┘
//!                        until Idle (settled) or Wait (released, due again later)
//! ```
//!
//! A saga is driven by one task holding its lease. What that task does is
//! decided by the [`driver`], a pure state machine (see its essay): a
//! decision is written in one statement fenced on the lease's epoch *before*
//! the worker acts on it — except an idempotent action's result, which
//! [`crate::domain::may_defer`] lets wait in memory for the next write (at
//! most [`driver::CHECKPOINT_EVERY`]). This module is the thin runner that
//! carries out the driver's actions against the store and the participants
//! ([`StepCaller`]) and feeds back how they went, with the clock and a
//! random draw; the simulation runs the same driver against an in-memory
//! store. If a write finds the epoch moved on (`LeaseLost`), another
//! coordinator or an operator took the saga and this task drops it at once.
//!
//! Recovery needs little special code: a coordinator that dies leaves its
//! leases to expire; any coordinator then claims the saga, marks the steps
//! the lost owner may have reached unwritten
//! ([`crate::domain::assume_unrecorded`]), and the plan reads where it
//! stands — a non-idempotent action left `RUNNING` becomes recovered
//! (outcome unknown), anything else is simply invoked again with the same
//! idempotency key.
//!
//! Shutdown: `stop` ends claiming and makes every task release its saga at
//! the next step boundary; `abandon` (after the grace period) drops calls in
//! flight. The server then releases whatever this process still holds.

mod clock;
pub mod driver;
#[cfg(test)]
mod sim;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use clock::DbClock;

use crate::domain::{Decision, Definition, EventRecord, Saga, SagaId};
use crate::metrics::Metrics;
use crate::participant::{Invocation, StepCaller};
use crate::store::{Hold, Lease, OwnerId, SagaStore, StoreError};
use crate::telemetry::{CallSpan, Telemetry};
use driver::{Action, Done, Driver, Input, Now};

/// How long before its arrival limit a call that waited for capacity must
/// be sent, for the trip to the participant.
const SEND_TRIP: Duration = Duration::from_millis(100);

/// Waits up to this long get a local timer; longer ones rely on the poll.
const LOCAL_WAKE_MAX: Duration = Duration::from_secs(60);

/// Worker limits and timings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// How long a claim or a write holds a saga.
    pub lease_ttl: Duration,
    /// Most sagas claimed in one query.
    pub claim_batch_max: u32,
    /// Most sagas this process drives at once.
    pub sagas_max: usize,
    /// Fallback poll for due work when no notification arrives.
    pub poll_interval: Duration,
    /// Where spans go (`None`: not exported).
    pub spans: Option<Arc<Telemetry>>,
}

/// The worker's shared state.
pub struct Worker {
    store: Arc<dyn SagaStore>,
    participants: Arc<dyn StepCaller>,
    owner: OwnerId,
    cfg: WorkerConfig,
    clock: DbClock,
    definitions: Mutex<HashMap<(String, u32), Arc<Definition>>>,
    /// The leases this process's drivers hold: their epochs, and the expiry
    /// the last renewal round gave them.
    held: Mutex<HashMap<SagaId, Held>>,
    /// Sagas driven by this process, for local `WaitSaga` callers.
    local: Mutex<LocalWatches>,
    /// Sagas that reached a terminal state here lately: a `WaitSaga` that
    /// arrives just after needs no read.
    recent: Mutex<Recent>,
    metrics: Arc<Metrics>,
    permits: Arc<Semaphore>,
    wake: Notify,
    stop: CancellationToken,
    abandon: CancellationToken,
    tasks: TaskTracker,
}

impl Worker {
    /// A worker; nothing runs until [`Worker::run_claim_loop`] or
    /// [`Worker::drive`] is called.
    pub fn new(
        store: Arc<dyn SagaStore>,
        participants: Arc<dyn StepCaller>,
        owner: OwnerId,
        cfg: WorkerConfig,
        stop: CancellationToken,
        abandon: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Worker {
            metrics,
            local: Mutex::new(LocalWatches::default()),
            held: Mutex::new(HashMap::new()),
            recent: Mutex::new(Recent::default()),
            permits: Arc::new(Semaphore::new(cfg.sagas_max.max(1))),
            store,
            participants,
            owner,
            cfg,
            clock: DbClock::default(),
            definitions: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            stop,
            abandon,
            tasks: TaskTracker::new(),
        })
    }

    /// This process's owner id.
    pub fn owner(&self) -> OwnerId {
        self.owner
    }

    /// The lease duration.
    pub fn lease_ttl(&self) -> Duration {
        self.cfg.lease_ttl
    }

    /// Where spans go, if anywhere.
    pub fn spans(&self) -> Option<&Arc<Telemetry>> {
        self.cfg.spans.as_ref()
    }

    /// The tasks driving sagas (for shutdown).
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Wakes the claim loop (a notification said work is due).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The database's time, as this process estimates it.
    pub fn db_now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Learns the database clock from a `now()` the database returned.
    pub fn observe_db_now(&self, db_now: DateTime<Utc>) {
        self.clock.observe(db_now);
    }

    /// A slot to drive one more saga, if this process has one free and is
    /// not stopping.
    pub fn try_reserve(&self) -> Option<OwnedSemaphorePermit> {
        if self.stop.is_cancelled() {
            return None;
        }
        self.permits.clone().try_acquire_owned().ok()
    }

    /// Drives a saga this process holds the lease of, in its own task.
    /// `recovered`: its last owner stopped without giving it back, so
    /// decisions it had not written yet are lost (see [`assume_unrecorded`]).
    pub fn spawn_drive(
        self: &Arc<Self>,
        saga: Saga,
        lease: Lease,
        recovered: bool,
        permit: OwnedSemaphorePermit,
    ) {
        let span = tracing::info_span!(
            "saga",
            saga_id = %saga.id,
            epoch = lease.epoch,
            trace_id = tracing::field::Empty
        );
        if let Some(t) = &saga.trace {
            span.record("trace_id", t.trace_id());
        }
        let id = saga.id;
        lock(&self.local).open(id, lease.epoch);
        let held = Held {
            epoch: lease.epoch,
            renewed: None,
        };
        lock(&self.held).insert(id, held);
        let this = self.clone();
        self.tasks.spawn(
            async move {
                let last = this.drive(saga, lease, recovered).await;
                {
                    // A later claim of the same saga here may hold it now.
                    let mut held = lock(&this.held);
                    if held.get(&id).is_some_and(|h| h.epoch == lease.epoch) {
                        held.remove(&id);
                    }
                }
                // Hand a settled saga to local waiters; dropping the sender
                // tells them to read the database instead.
                let closed = lock(&this.local).close(id, lease.epoch);
                if let Some(tx) = closed {
                    if last.state.is_settled() {
                        let last = Arc::new(last);
                        // Only terminal states never change again; a
                        // SUSPENDED saga may be retried or aborted by an
                        // operator through any coordinator.
                        if last.state.is_terminal() {
                            this.remember_terminal(last.clone());
                        }
                        tx.send_replace(Some(last));
                    }
                }
                drop(permit);
            }
            .instrument(span),
        );
    }

    /// For a saga this process drives right now, or finished (terminal)
    /// here in the last few seconds: a receiver that has or gets its settled
    /// state (and closes if the saga stops being driven here before that).
    pub fn watch_local(&self, id: SagaId) -> Option<watch::Receiver<Option<Arc<Saga>>>> {
        if let Some(rx) = lock(&self.local).subscribe(id) {
            return Some(rx);
        }
        let recent = lock(&self.recent);
        let saga = recent.by_id.get(&id)?.clone();
        Some(watch::channel(Some(saga)).1)
    }

    fn remember_terminal(&self, saga: Arc<Saga>) {
        let mut recent = lock(&self.recent);
        let now = std::time::Instant::now();
        while let Some((at, old)) = recent.order.front().copied() {
            if now.duration_since(at) < RECENT_KEEP && recent.order.len() < RECENT_MAX {
                break;
            }
            recent.order.pop_front();
            recent.by_id.remove(&old);
        }
        recent.order.push_back((now, saga.id));
        recent.by_id.insert(saga.id, saga);
    }

    /// Claims due sagas until `stop`: woken by notifications, local timers
    /// and, as the guarantee, a poll.
    pub async fn run_claim_loop(self: Arc<Self>) {
        loop {
            self.claim_available().await;
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.cfg.poll_interval) => {}
            }
        }
    }

    /// Renews every lease this process's drivers hold, in one statement per
    /// round, until shutdown has let every driver finish.
    pub async fn run_renewal_loop(self: Arc<Self>) {
        let every = driver::renew_every(self.cfg.lease_ttl);
        loop {
            tokio::select! {
                _ = self.tasks.wait() => return,
                _ = tokio::time::sleep(every) => {}
            }
            self.renew_held().await;
        }
    }

    async fn renew_held(&self) {
        let held: HashMap<SagaId, i64> = lock(&self.held)
            .iter()
            .map(|(id, h)| (*id, h.epoch))
            .collect();
        if held.is_empty() || !self.store.reachable() {
            return;
        }
        let pairs: Vec<(SagaId, i64)> = held.iter().map(|(id, e)| (*id, *e)).collect();
        let renewed = match self
            .store
            .lease_renew(self.owner, &pairs, self.cfg.lease_ttl)
            .await
        {
            Ok(r) => r,
            Err(error) => {
                self.metrics.leases_renewed(None);
                tracing::warn!(%error, leases = pairs.len(), "renewing leases failed; retrying next round");
                return;
            }
        };
        self.metrics
            .leases_renewed(Some(renewed.sagas.len() as u64));
        let Some(until) = renewed.until else { return };
        let mut now_held = lock(&self.held);
        for id in &renewed.sagas {
            if let Some(h) = now_held
                .get_mut(id)
                .filter(|h| Some(&h.epoch) == held.get(id))
            {
                h.renewed = Some(until);
            }
        }
    }

    /// What the last renewal round gave the lease of a saga driven here.
    fn renewed(&self, lease: &Lease) -> Option<DateTime<Utc>> {
        let held = lock(&self.held);
        held.get(&lease.saga_id)
            .filter(|h| h.epoch == lease.epoch)
            .and_then(|h| h.renewed)
    }

    async fn claim_available(self: &Arc<Self>) {
        loop {
            let free = self
                .permits
                .available_permits()
                .min(self.cfg.claim_batch_max as usize);
            // While the database is away, claim nothing (the next poll
            // after it answers again does).
            if free == 0 || self.stop.is_cancelled() || !self.store.reachable() {
                return;
            }
            let claimed = match self
                .store
                .lease_claim_due(self.owner, free as u32, self.cfg.lease_ttl)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "claiming due sagas failed; retrying at the next poll");
                    return;
                }
            };
            let n = claimed.len();
            for c in claimed {
                self.clock.observe(c.db_now);
                if c.unclean {
                    self.metrics.lease_takeover();
                }
                match self.permits.clone().try_acquire_owned() {
                    Ok(permit) => self.spawn_drive(c.saga, c.lease, c.unclean, permit),
                    // Cannot happen (we claimed at most `free`), but if it
                    // did, give the saga back rather than hold it idle.
                    Err(_) => {
                        let _ = self.store.lease_release(&c.lease).await;
                    }
                }
            }
            if n < free {
                return;
            }
        }
    }

    /// A definition version, cached (versions never change once stored).
    pub async fn definition(
        &self,
        name: &str,
        version: u32,
    ) -> Result<Option<Arc<Definition>>, StoreError> {
        let key = (name.to_owned(), version);
        if let Some(d) = lock(&self.definitions).get(&key) {
            return Ok(Some(d.clone()));
        }
        let Some((def, _)) = self.store.definition_get(name, Some(version)).await? else {
            return Ok(None);
        };
        let def = Arc::new(def);
        lock(&self.definitions).insert(key, def.clone());
        Ok(Some(def))
    }

    /// Drives one saga until it settles, waits, or the lease is lost;
    /// returns the saga as driving left it.
    async fn drive(self: &Arc<Self>, saga: Saga, lease: Lease, recovered: bool) -> Saga {
        let def = match self.definition(&saga.definition, saga.version).await {
            Ok(Some(d)) => d,
            Ok(None) => {
                tracing::error!("cannot drive saga: its definition is missing");
                self.release(&lease).await;
                return saga;
            }
            Err(error) => {
                tracing::error!(%error, "cannot drive saga: definition unavailable");
                self.release(&lease).await;
                return saga;
            }
        };
        let (mut driver, marked) = Driver::new(saga, def, lease, self.cfg.lease_ttl, recovered);
        if !marked.is_empty() {
            tracing::info!(
                steps = ?marked,
                "the previous owner stopped without writing: these steps may have taken effect"
            );
        }
        if let Done::GivenBack(Some(until)) = self.run(&mut driver).await {
            self.wake_at(until);
        }
        driver.into_saga()
    }

    /// Carries out the driver's actions until it is done.
    async fn run(&self, driver: &mut Driver) -> Done {
        let mut action = driver.start(self.now());
        loop {
            let input = match action {
                Action::Done(done) => return done,
                Action::Save {
                    decision,
                    settled,
                    hold,
                } => self.save(driver.lease(), &decision, settled, hold).await,
                Action::Extend { ttl } => self.extend(driver.lease(), ttl).await,
                Action::Release => {
                    self.release(driver.lease()).await;
                    Input::Released
                }
                Action::Call {
                    step,
                    phase,
                    attempt,
                    timeout,
                    deadline,
                    arrive_by,
                } => {
                    let call = CallSpan {
                        saga: driver.saga(),
                        def: driver.definition(),
                        step,
                        phase,
                        attempt,
                    };
                    match self
                        .call(&call, driver.lease().epoch, timeout, deadline, arrive_by)
                        .await
                    {
                        Some(input) => input,
                        None => return Done::Dropped,
                    }
                }
            };
            if let Some(until) = self.renewed(driver.lease()) {
                driver.renewed(until);
            }
            action = driver.on(input, self.now());
        }
    }

    /// The time and chance the driver's next step runs with.
    fn now(&self) -> Now {
        Now {
            at: self.clock.now(),
            jitter: rand::random(),
            stopping: self.stop.is_cancelled(),
        }
    }

    /// Calls the participant for one attempt. `None`: shutdown abandoned
    /// the call.
    async fn call(
        &self,
        c: &CallSpan<'_>,
        lease_epoch: i64,
        timeout: Duration,
        deadline: DateTime<Utc>,
        arrive_by: DateTime<Utc>,
    ) -> Option<Input> {
        let span = self
            .spans()
            .zip(c.saga.trace.as_ref())
            .and_then(|(t, trace)| t.attempt_start(trace));
        let left = (arrive_by - self.clock.now()).to_std().unwrap_or_default();
        let send_by = std::time::Instant::now() + left.saturating_sub(SEND_TRIP);
        let inv = Invocation {
            saga: c.saga,
            def: c.def,
            step: c.step,
            phase: c.phase,
            attempt: c.attempt,
            timeout,
            deadline,
            arrive_by,
            lease_epoch,
            send_by,
            traceparent: span.map(|s| s.own.to_string()),
        };
        let started = std::time::Instant::now();
        let in_flight = self.metrics.call_started();
        let result = tokio::select! {
            r = self.participants.invoke(inv) => r,
            _ = self.abandon.cancelled() => {
                tracing::warn!("shutdown grace period over: abandoning a call in flight");
                return None;
            }
        };
        drop(in_flight);
        let Some(result) = result else {
            tracing::debug!(
                step = c.step,
                "not sent: the participant had no capacity in time"
            );
            return Some(Input::NotSent);
        };
        let took = started.elapsed();
        let (step, phase, attempt) = (c.step, c.phase, c.attempt);
        tracing::debug!(step, %phase, attempt, ?result, "participant answered");
        self.metrics
            .step_attempt(&c.def.steps[step].participant, phase, &result, took);
        if let (Some(t), Some(span)) = (self.spans(), span) {
            t.attempt_end(span, c, &result);
        }
        Some(Input::Answered { result, took })
    }

    /// Writes a decision, fenced on the lease.
    async fn save(&self, lease: &Lease, decision: &Decision, settled: bool, hold: Hold) -> Input {
        log_events(&decision.events);
        match self.store.saga_save(lease, decision, settled, hold).await {
            Ok(db_now) => {
                self.clock.observe(db_now);
                if settled {
                    self.settled(&decision.saga, db_now);
                }
                Input::Saved { db_now }
            }
            Err(StoreError::LeaseLost) => {
                self.metrics.lease_lost();
                tracing::warn!(
                    "lease lost: another coordinator or an operator took the saga; dropping it"
                );
                Input::LeaseLost
            }
            Err(error) => {
                // The write may or may not have committed: leave the saga to
                // its lease expiry, then whoever claims it reads the truth.
                tracing::error!(%error, "saving a decision failed; the lease will expire");
                Input::Failed
            }
        }
    }

    /// A saga settled here: metrics, and its span when it ended.
    fn settled(&self, saga: &Saga, db_now: DateTime<Utc>) {
        self.metrics.saga_settled(saga.state);
        let took = (db_now - saga.created_at).to_std().unwrap_or_default();
        self.metrics.saga_settle_time(&saga.definition, took);
        if let Some(t) = self.spans().filter(|_| saga.state.is_terminal()) {
            t.saga_end(saga, db_now);
        }
    }

    /// Extends the lease before a call.
    async fn extend(&self, lease: &Lease, ttl: Duration) -> Input {
        match self.store.lease_extend(lease, ttl).await {
            Ok(until) => Input::Extended { until },
            Err(error) => {
                tracing::warn!(%error, "could not extend the lease before a call; dropping the saga");
                if matches!(error, StoreError::LeaseLost) {
                    self.metrics.lease_lost();
                    Input::LeaseLost
                } else {
                    Input::Failed
                }
            }
        }
    }

    async fn release(&self, lease: &Lease) {
        match self.store.lease_release(lease).await {
            Ok(()) | Err(StoreError::LeaseLost) => {}
            Err(error) => tracing::warn!(%error, "releasing a lease failed; it will expire"),
        }
    }

    /// Wakes the claim loop when a wait ends, if that is sooner than the
    /// next poll would notice.
    fn wake_at(self: &Arc<Self>, until: DateTime<Utc>) {
        let delay = (until - self.clock.now())
            .to_std()
            .unwrap_or(Duration::ZERO);
        // Long waits are left to the poll (late by at most one interval), so
        // that idle sagas do not each hold a timer.
        if delay > LOCAL_WAKE_MAX.max(self.cfg.poll_interval) {
            return;
        }
        let this = self.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = this.stop.cancelled() => {}
                // A little after: the claim compares against the database's
                // clock, which our estimate may trail by a little.
                _ = tokio::time::sleep(delay + Duration::from_millis(2)) => this.wake.notify_one(),
            }
        });
    }
}

type LocalWatch = watch::Sender<Option<Arc<Saga>>>;

/// The sagas drivers here hold, each under the epoch of its lease, for
/// local waiters. A later claim of the same saga here replaces the entry
/// (the earlier waiters' channel closes: they read the database); the
/// earlier driver ending leaves the later one's entry alone.
#[derive(Default)]
struct LocalWatches(HashMap<SagaId, (i64, LocalWatch)>);

impl LocalWatches {
    fn open(&mut self, id: SagaId, epoch: i64) {
        self.0.insert(id, (epoch, watch::channel(None).0));
    }

    /// The channel of the driver of `epoch`, if it is still the one here.
    fn close(&mut self, id: SagaId, epoch: i64) -> Option<LocalWatch> {
        match self.0.get(&id) {
            Some((e, _)) if *e == epoch => self.0.remove(&id).map(|(_, tx)| tx),
            _ => None,
        }
    }

    fn subscribe(&self, id: SagaId) -> Option<watch::Receiver<Option<Arc<Saga>>>> {
        self.0.get(&id).map(|(_, tx)| tx.subscribe())
    }
}

/// A lease a driver here holds.
struct Held {
    epoch: i64,
    /// Its expiry as the last renewal round set it.
    renewed: Option<DateTime<Utc>>,
}

/// How long, and how many, settled sagas are kept for late local waiters.
const RECENT_KEEP: Duration = Duration::from_secs(5);
const RECENT_MAX: usize = 100_000;

#[derive(Default)]
struct Recent {
    by_id: HashMap<SagaId, Arc<Saga>>,
    order: std::collections::VecDeque<(std::time::Instant, SagaId)>,
}

/// Logs a decision's events: the saga's settling at `info`, the rest (one
/// per step attempt: the hot path) at `debug`.
fn log_events(events: &[EventRecord]) {
    for e in events {
        let (kind, step, attempt, detail) =
            (e.kind.as_str(), e.step.as_deref(), e.attempt, &e.detail);
        if e.kind.is_settling() {
            tracing::info!(kind, step, attempt, %detail, "saga event");
        } else {
            tracing::debug!(kind, step, attempt, %detail, "saga event");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod local_tests {
    use super::*;

    #[test]
    fn an_earlier_driver_ending_leaves_a_later_claims_waiters_alone() {
        let id = SagaId(uuid::Uuid::nil());
        let mut w = LocalWatches::default();
        w.open(id, 1);
        let early = w.subscribe(id).expect("watched");
        // Claimed again here (the first driver still ending).
        w.open(id, 2);
        let late = w.subscribe(id).expect("watched");
        assert!(
            early.has_changed().is_err(),
            "the earlier waiters read the database"
        );
        assert!(w.close(id, 1).is_none(), "the earlier driver ends");
        assert!(late.has_changed().is_ok(), "the later waiters still wait");
        assert!(w.subscribe(id).is_some());
        let tx = w.close(id, 2).expect("the later driver's channel");
        drop(tx);
        assert!(w.subscribe(id).is_none());
    }
}
