//! The storage seam: one trait, one method per query.
//!
//! The engine and the API reach storage only through [`SagaStore`], so the saga
//! logic does not depend on PostgreSQL and a second store (an embedded one for
//! `sagad dev`) can sit beside [`pg::PgStore`]. Every line of SQL lives in
//! `store/pg`.
//!
//! Writes of a saga's owner are *fenced*: they carry the [`Lease`] (owner and
//! epoch) that claimed the saga and succeed only while that epoch is current,
//! so a paused or partitioned coordinator cannot overwrite a newer owner's
//! progress ([`StoreError::LeaseLost`]).

pub(crate) mod encode;
pub mod pg;
pub mod sqlite;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::{Decision, Definition, EventKind, Saga, SagaId, SagaState};

/// The database a coordinator runs on.
#[derive(Debug, Clone)]
pub enum Database {
    /// PostgreSQL: several coordinators may share it.
    Postgres(sqlx::PgPool),
    /// One SQLite file: one coordinator (`sagad dev`).
    Sqlite(sqlite::SqliteStore),
}

impl Database {
    /// Answers a trivial query (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Database::Postgres(pool) => {
                sqlx::query("SELECT 1").execute(pool).await?;
                Ok(())
            }
            Database::Sqlite(s) => s.ping().await,
        }
    }
}

/// Identifies one coordinator process (a fresh UUID per start).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OwnerId(pub Uuid);

/// The right to drive one saga, valid while `epoch` is the saga's current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The saga.
    pub saga_id: SagaId,
    /// Who holds it.
    pub owner: OwnerId,
    /// The epoch the claim produced.
    pub epoch: i64,
    /// When it runs out (database clock).
    pub until: DateTime<Utc>,
}

/// A saga as stored, with its concurrency metadata.
#[derive(Debug, Clone)]
pub struct SagaRecord {
    /// The saga.
    pub saga: Saga,
    /// Current lease epoch.
    pub epoch: i64,
    /// Events written so far (an optimistic-concurrency version).
    pub event_seq: i64,
    /// Current owner, if leased.
    pub owner: Option<OwnerId>,
    /// Whether a live lease is held right now (database clock).
    pub leased: bool,
}

/// One participant instance announcing itself.
#[derive(Debug, Clone, Copy)]
pub struct Heartbeat<'a> {
    /// The participant's name.
    pub participant: &'a str,
    /// The instance (unique per process).
    pub instance_id: &'a str,
    /// Where it is served.
    pub endpoint: &'a str,
    /// Its relative share of calls (1 and up).
    pub weight: u32,
    /// How long it counts as live (zero: withdrawn now).
    pub ttl: Duration,
}

/// What one renewal round renewed.
#[derive(Debug, Clone, Default)]
pub struct Renewed {
    /// The new expiry of the leases renewed (store clock; `None` when none
    /// was).
    pub until: Option<DateTime<Utc>>,
    /// The sagas renewed.
    pub sagas: Vec<SagaId>,
}

/// A saga just claimed, with the database clock at the claim.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The saga.
    pub saga: Saga,
    /// The lease.
    pub lease: Lease,
    /// `now()` of the claiming transaction.
    pub db_now: DateTime<Utc>,
    /// The previous owner's lease ran out (or was dropped at shutdown)
    /// without it giving the saga back: what it had not written is lost.
    pub unclean: bool,
}

/// A saga to create.
#[derive(Debug, Clone)]
pub struct NewSaga {
    /// Id.
    pub id: SagaId,
    /// Definition it runs on (with its version).
    pub definition: Definition,
    /// Input (validated JSON text).
    pub input: String,
    /// Take the lease at once (the creating coordinator drives it), or leave
    /// it due for any coordinator.
    pub owner: Option<(OwnerId, Duration)>,
    /// The principal starting it (audit).
    pub started_by: Option<String>,
    /// Its place in a distributed trace.
    pub trace: Option<crate::domain::SagaTrace>,
}

/// When and by whom a definition version was registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// When (database clock).
    pub at: DateTime<Utc>,
    /// The principal (none without authentication).
    pub by: Option<String>,
}

/// What `saga_create` found.
#[derive(Debug, Clone)]
pub enum Created {
    /// Inserted; the lease is present when an owner was asked for.
    New(Saga, Option<Lease>, DateTime<Utc>),
    /// A saga with that id already exists.
    Existing(Saga),
}

/// Filters and paging for `saga_list`.
#[derive(Debug, Clone, Default)]
pub struct SagaQuery {
    /// Empty = any.
    pub states: Vec<SagaState>,
    /// `None` = any.
    pub definition: Option<String>,
    /// Only stuck sagas (see [`StuckRule`]).
    pub stuck: Option<StuckRule>,
    /// Created at or before this time (age filter).
    pub created_before: Option<DateTime<Utc>>,
    /// Page size (already clamped).
    pub limit: u32,
    /// Keyset cursor: the last row of the previous page.
    pub after: Option<(DateTime<Utc>, Uuid)>,
    /// Only sagas this principal started (a client's own listing).
    pub started_by: Option<String>,
    /// Keep a page's sagas (inputs, outputs, errors) within this many
    /// bytes; a first saga is returned however large; `None`: no budget.
    pub bytes_max: Option<usize>,
}

/// "Stuck" (DESIGN.md): SUSPENDED, or not settled and no progress for
/// `idle_for`, or the step in progress has made `attempts_min` attempts.
#[derive(Debug, Clone, Copy)]
pub struct StuckRule {
    /// No progress for this long.
    pub idle_for: Duration,
    /// Attempts of the current step at or beyond this.
    pub attempts_min: u32,
}

/// One page of sagas.
#[derive(Debug, Clone)]
pub struct SagaPage {
    /// The sagas, newest first.
    pub sagas: Vec<Saga>,
    /// Cursor for the next page, if there may be one.
    pub next: Option<(DateTime<Utc>, Uuid)>,
}

/// Counts stop here: the admin view shows "10000+" rather than walk further.
pub const COUNT_CAP: i64 = 10_000;

/// Counts by state (see [`SagaStore::saga_counts`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SagaCounts {
    /// Per state.
    pub by_state: Vec<(SagaState, i64)>,
    /// Stuck sagas.
    pub stuck: i64,
}

/// Sagas started and ended in one minute (see [`SagaStore::saga_activity`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ActivityMinute {
    /// The minute's start (database clock).
    pub minute: DateTime<Utc>,
    /// Sagas created.
    pub started: i64,
    /// Sagas that completed.
    pub completed: i64,
    /// Sagas that finished compensating.
    pub compensated: i64,
    /// Sagas parked for an operator.
    pub suspended: i64,
}

/// One stored history entry.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// 1-based, per saga.
    pub seq: i64,
    /// When (database clock).
    pub at: DateTime<Utc>,
    /// What happened.
    pub kind: EventKind,
    /// Step name.
    pub step: Option<String>,
    /// Attempt.
    pub attempt: u32,
    /// Detail.
    pub detail: String,
    /// For a participant's answer: how long the call took.
    pub took: Option<Duration>,
}

/// How an owner's write ends the hold on a saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Keep the lease, extended by this long from the database's `now()`.
    Keep(Duration),
    /// Release it; the saga is due again at this time (`None`: settled).
    Release(Option<DateTime<Utc>>),
}

/// What a store call can fail with: what happened, not which driver failed
/// (each store turns its driver's errors into these at its own edge).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The lease's epoch is no longer current: someone else drives the saga.
    #[error("lease lost: another coordinator or an operator took the saga over")]
    LeaseLost,
    /// The saga changed since it was read (operator actions).
    #[error("the saga changed concurrently")]
    Conflict,
    /// The saga is being driven right now.
    #[error("the saga is being driven by a coordinator right now")]
    Busy,
    /// The database cannot be reached right now (connection lost, server
    /// restarting or shutting down, no free connection): the same call may
    /// succeed later. The text is the driver's, for the log.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The store is shutting down.
    #[error("the store is shutting down")]
    Stopped,
    /// Anything else: a query the database refused, stored data that does not
    /// parse. A bug, not a condition to retry. The text is for the log.
    #[error("store error: {0}")]
    Internal(String),
}

/// Every query the coordinator makes.
#[async_trait]
pub trait SagaStore: Send + Sync + 'static {
    /// Whether the database answered its last probe (`false`: callers fail
    /// fast rather than wait for a connection that will not come).
    fn reachable(&self) -> bool {
        true
    }

    /// Stores `def` as the next version unless the latest version has the
    /// same content; returns the stored definition and whether it was new.
    /// `by` is the registering principal.
    async fn definition_register(
        &self,
        def: Definition,
        by: Option<&str>,
    ) -> Result<(Definition, bool), StoreError>;
    /// A definition by name and version (`None` = latest).
    async fn definition_get(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<(Definition, Registered)>, StoreError>;
    /// Every version of every definition, by name then version.
    async fn definition_list(&self) -> Result<Vec<(Definition, Registered)>, StoreError>;

    /// Inserts a saga with its `started` event, or finds the existing one.
    async fn saga_create(&self, new: NewSaga) -> Result<Created, StoreError>;
    /// One saga.
    async fn saga_get(&self, id: SagaId) -> Result<Option<SagaRecord>, StoreError>;
    /// A page of sagas, newest first.
    async fn saga_list(&self, query: &SagaQuery) -> Result<SagaPage, StoreError>;
    /// Counts for the admin view: by state (settled states over the last
    /// `window`) and stuck, each up to [`COUNT_CAP`].
    async fn saga_counts(
        &self,
        stuck: StuckRule,
        window: Duration,
    ) -> Result<SagaCounts, StoreError>;
    /// Per minute since `since` (oldest first; minutes with nothing are
    /// left out): sagas started, completed, compensated and suspended.
    async fn saga_activity(&self, since: DateTime<Utc>) -> Result<Vec<ActivityMinute>, StoreError>;
    /// Deletes up to `limit` settled sagas (COMPLETED, COMPENSATED,
    /// RESOLVED) last changed before `settled_before`, oldest first, with
    /// their history; returns how many. One short statement: rows another
    /// purge holds are skipped, never waited for.
    async fn saga_purge(
        &self,
        settled_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError>;
    /// A saga's history, oldest first.
    async fn saga_events(&self, id: SagaId) -> Result<Vec<StoredEvent>, StoreError>;
    /// Writes an owner's decision, fenced on the lease's epoch. Returns the
    /// database's `now()`.
    async fn saga_save(
        &self,
        lease: &Lease,
        decision: &Decision,
        settled: bool,
        hold: Hold,
    ) -> Result<DateTime<Utc>, StoreError>;
    /// Writes an operator's decision if the saga is still at (`epoch`,
    /// `event_seq`); bumps the epoch (fencing out the current owner) and makes
    /// the saga due now. With `require_unleased`, refuses (`Busy`) while a
    /// live lease is held.
    async fn saga_operator_save(
        &self,
        seen: &SagaRecord,
        decision: &Decision,
        settled: bool,
        require_unleased: bool,
    ) -> Result<(), StoreError>;

    /// Claims up to `limit` due sagas for `owner` for `ttl`.
    async fn lease_claim_due(
        &self,
        owner: OwnerId,
        limit: u32,
        ttl: Duration,
    ) -> Result<Vec<Claimed>, StoreError>;
    /// Extends a lease to `now() + ttl`; returns the new expiry.
    async fn lease_extend(&self, lease: &Lease, ttl: Duration)
        -> Result<DateTime<Utc>, StoreError>;
    /// Renews, in one statement, every lease in `held` (saga and epoch) that
    /// `owner` still holds, to `now() + ttl`; a saga another claimed, an
    /// operator took or a write of its own holds right now is left out
    /// (never waited for). Returns the new expiry and the sagas renewed.
    async fn lease_renew(
        &self,
        owner: OwnerId,
        held: &[(SagaId, i64)],
        ttl: Duration,
    ) -> Result<Renewed, StoreError>;
    /// Gives a saga back, due at once, so another coordinator continues it.
    async fn lease_release(&self, lease: &Lease) -> Result<(), StoreError>;
    /// Ends every lease `owner` holds (shutdown), making those sagas due at
    /// once; the next claim sees them as unclean (whatever their drivers had
    /// not written is lost). Returns how many.
    async fn lease_release_all(&self, owner: OwnerId) -> Result<u64, StoreError>;

    /// Records that a participant instance is alive for `ttl` (a zero `ttl`
    /// withdraws it); `by` is the principal that said so.
    async fn participant_heartbeat(
        &self,
        beat: &Heartbeat<'_>,
        by: Option<&str>,
    ) -> Result<(), StoreError>;
    /// Endpoints of the live instances of a participant, with their
    /// weights (the largest, where instances share an endpoint), by URL.
    async fn participant_endpoints(
        &self,
        participant: &str,
    ) -> Result<Vec<(String, u32)>, StoreError>;
}
