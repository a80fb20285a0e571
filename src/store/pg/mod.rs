//! PostgreSQL implementation of [`SagaStore`]: every line of SQL the
//! coordinator runs.
//!
//! Habits: the database clock (`now()`) rules every lease and deadline; an
//! owner's decision is one statement (saga row update + event inserts), so
//! it is one round trip and one commit, shared with other decisions written
//! at the same time (group commit, see `lanes`); claims use
//! `FOR UPDATE SKIP LOCKED` so coordinators never wait on each other.

pub mod hosts;
mod lanes;
mod rows;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgPool, PgRow};
use sqlx::Row;
use uuid::Uuid;

use super::encode::{current_progress, encode_steps, encode_trace, fold_activity, saga_bytes};
use super::{
    ActivityMinute, Claimed, Created, Heartbeat, Hold, Lease, NewSaga, OwnerId, Registered,
    Renewed, SagaCounts, SagaPage, SagaQuery, SagaRecord, SagaStore, StoreError, StoredEvent,
    StuckRule,
};
use crate::domain::{Decision, Definition, EventKind, EventRecord, SagaId};
pub use lanes::{connect_options as lane_connect_options, CREATE_SQL, SAVE_SQL};
use lanes::{CreateRow, EventRow, Lanes, SaveRow};
use rows::{decode_definition, decode_saga, SAGA_COLUMNS};

/// The store seam's error for a driver error: connection loss — I/O, TLS,
/// pool time-outs, a closed pool, an error of severity FATAL or PANIC (the
/// server ended the session, or refused to open one: shutting down,
/// restarting, not accepting connections), SQLSTATE classes 08 (connection
/// exception), 57 (operator intervention: a terminated backend), 53
/// (insufficient resources, such as too many connections) and 58 (system
/// error) — is `Unavailable`, so callers retry; anything else is `Internal`.
impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if is_connection_loss(&e) {
            StoreError::Unavailable(e.to_string())
        } else {
            StoreError::Internal(e.to_string())
        }
    }
}

/// Whether `e` means the database could not be reached or dropped the
/// connection (see `From<sqlx::Error> for StoreError`).
pub fn is_connection_loss(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let fatal = db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some_and(|pg| {
                    matches!(
                        pg.severity(),
                        sqlx::postgres::PgSeverity::Fatal | sqlx::postgres::PgSeverity::Panic
                    )
                });
            fatal
                || db
                    .code()
                    .is_some_and(|c| ["08", "53", "57", "58"].iter().any(|k| c.starts_with(k)))
        }
        // A connection that the server closed mid-message.
        sqlx::Error::Protocol(m) => m.contains("unexpected end") || m.contains("closed"),
        _ => false,
    }
}

/// Notification channel: a saga settled (terminal or suspended).
pub const CHANNEL_SETTLED: &str = "sagad_settled";
/// Notification channel: a saga became due for any coordinator.
pub const CHANNEL_DUE: &str = "sagad_due";

/// Sagas started (by `sagas.created_at`) and settled or parked (by their
/// settling event, through its partial index) per minute since `$1`.
/// Public for the query-plan test.
pub const SAGA_ACTIVITY_SQL: &str = "
    SELECT minute, kind, n FROM (
        SELECT date_trunc('minute', created_at) AS minute, 'started' AS kind, count(*) AS n
        FROM sagas WHERE created_at >= $1 GROUP BY 1
        UNION ALL
        SELECT date_trunc('minute', at), kind, count(*)
        FROM saga_events
        WHERE at >= $1 AND kind IN ('completed', 'compensated', 'suspended')
        GROUP BY 1, 2
    ) a ORDER BY minute, kind";

/// One renewal round: every held lease still ours, skipping rows a write
/// holds (that write extends or releases the lease itself) so that renewal
/// never waits on, nor deadlocks with, the write lanes or a claim.
pub const LEASE_RENEW_SQL: &str = "
    WITH held AS (
        SELECT s.saga_id FROM sagas s
        JOIN unnest($1::uuid[], $2::bigint[]) AS h(saga_id, epoch)
          ON s.saga_id = h.saga_id AND s.lease_epoch = h.epoch
        WHERE s.owner = $3
        FOR UPDATE OF s SKIP LOCKED
    )
    UPDATE sagas s SET lease_until = now() + $4 * interval '1 millisecond',
                       next_run_at = now() + $4 * interval '1 millisecond'
    FROM held WHERE s.saga_id = held.saga_id
    RETURNING s.saga_id, s.lease_until";

/// `saga_purge`: the oldest settled sagas through their partial index, their
/// history by cascade. Public for the query-plan test.
pub const SAGA_PURGE_SQL: &str = "
    WITH doomed AS (
        SELECT saga_id FROM sagas
        WHERE state IN ('COMPLETED', 'COMPENSATED', 'RESOLVED') AND updated_at < $1
        ORDER BY updated_at
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    )
    DELETE FROM sagas s USING doomed d WHERE s.saga_id = d.saga_id";

/// `saga_counts`: per state (settled states only over the recent window),
/// and stuck sagas; each count walks the (state, created_at) index and stops
/// at [`crate::store::COUNT_CAP`], so the admin page costs the same with a
/// million sagas as with ten. One branch per state, each with its state as
/// a literal: a state taken from a list makes the planner pick one generic
/// plan for all of them, a sequential scan that reads the whole table for
/// a state with no rows. Public for the query-plan test.
pub const SAGA_COUNTS_SQL: &str = "
    SELECT 'RUNNING' AS state,
           (SELECT count(*) FROM (SELECT 1 FROM sagas WHERE state = 'RUNNING' LIMIT $4) t) AS n
    UNION ALL
    SELECT 'COMPENSATING',
           (SELECT count(*) FROM (SELECT 1 FROM sagas WHERE state = 'COMPENSATING' LIMIT $4) t)
    UNION ALL
    SELECT 'SUSPENDED',
           (SELECT count(*) FROM (SELECT 1 FROM sagas WHERE state = 'SUSPENDED' LIMIT $4) t)
    UNION ALL
    SELECT 'COMPLETED',
           (SELECT count(*) FROM (SELECT 1 FROM sagas WHERE state = 'COMPLETED'
              AND created_at > now() - $1 * interval '1 millisecond' LIMIT $4) t)
    UNION ALL
    SELECT 'COMPENSATED',
           (SELECT count(*) FROM (SELECT 1 FROM sagas WHERE state = 'COMPENSATED'
              AND created_at > now() - $1 * interval '1 millisecond' LIMIT $4) t)
    UNION ALL
    SELECT 'RESOLVED',
           (SELECT count(*) FROM (SELECT 1 FROM sagas WHERE state = 'RESOLVED'
              AND created_at > now() - $1 * interval '1 millisecond' LIMIT $4) t)
    UNION ALL
    SELECT 'stuck', count(*) FROM (
        SELECT 1 FROM sagas
        WHERE state IN ('RUNNING', 'COMPENSATING', 'SUSPENDED')
          AND (state = 'SUSPENDED' OR updated_at < now() - $2 * interval '1 millisecond' OR current_attempts >= $3)
        LIMIT $4) t";

/// `saga_list`'s statement. Public for the query-plan test.
///
/// The page is cut at its byte budget (`$11`) inside PostgreSQL: each row's
/// weight comes from sizes the table already knows (`octet_length` of a
/// TOASTed input and `pg_column_size` read its header, not the value), so
/// the inputs of rows past the budget are never read or sent. `page_rows`
/// (rows under the row limit) tells the caller whether more follow.
pub fn saga_list_sql() -> String {
    format!(
        "SELECT * FROM (
           SELECT {SAGA_COLUMNS},
                  sum(w.bytes) OVER (ORDER BY s.created_at DESC, s.saga_id DESC
                                     ROWS UNBOUNDED PRECEDING) AS page_bytes,
                  w.bytes AS row_bytes,
                  count(*) OVER () AS page_rows
           FROM ({}) s,
                LATERAL (SELECT octet_length(s.input)::bigint + pg_column_size(s.steps) + 256 AS bytes) w
         ) t
         WHERE $11::bigint IS NULL OR page_bytes = row_bytes OR page_bytes <= $11
         ORDER BY created_at DESC, saga_id DESC",
        saga_list_rows_sql()
    )
}

/// The rows of a saga list page, before the byte budget.
fn saga_list_rows_sql() -> &'static str {
    "SELECT * FROM sagas
         WHERE (cardinality($1::text[]) = 0 OR state = ANY($1))
           AND ($9::text IS NULL OR state = $9)
           AND ($2::text IS NULL OR definition = $2)
           AND ($10::text IS NULL OR started_by = $10)
           AND ($3::timestamptz IS NULL OR created_at <= $3)
           AND ($4::timestamptz IS NULL OR (created_at, saga_id) < ($4, $5::uuid))
           AND ($6::bigint IS NULL
                OR (state IN ('RUNNING', 'COMPENSATING', 'SUSPENDED')
                    AND (state = 'SUSPENDED'
                         OR updated_at < now() - $6 * interval '1 millisecond'
                         OR current_attempts >= $7)))
         ORDER BY created_at DESC, saga_id DESC
         LIMIT $8"
}

/// The embedded migrations of `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Group commit for the hot-path writes (see `lanes`).
    lanes: Arc<Lanes>,
    /// What the database probe last found (always up unless a probe runs:
    /// [`hosts::watch`]).
    health: Arc<hosts::Health>,
}

/// Write lanes of [`PgStore::new`].
pub const WRITE_LANES_DEFAULT: usize = 2;

impl PgStore {
    /// A store over `pool` (migrations must have been applied), with
    /// [`WRITE_LANES_DEFAULT`] write lanes.
    pub fn new(pool: PgPool) -> Self {
        Self::with_write_lanes(pool, WRITE_LANES_DEFAULT)
    }

    /// A store whose saga creations and decisions go through `lanes`
    /// dedicated connections that batch concurrent writes into one
    /// statement each (group commit). They connect on first use.
    pub fn with_write_lanes(pool: PgPool, lanes: usize) -> Self {
        let health = Arc::<hosts::Health>::default();
        PgStore {
            lanes: Arc::new(Lanes::new(pool.clone(), lanes, health.clone())),
            pool,
            health,
        }
    }

    /// This store answers `Unavailable` at once while `health` says the
    /// database is away.
    pub fn with_health(mut self, health: Arc<hosts::Health>) -> Self {
        // Lanes start on first use: new ones cost nothing yet.
        let lanes = Lanes::new(self.pool.clone(), self.lanes.count(), health.clone());
        self.lanes = Arc::new(lanes);
        self.health = health;
        self
    }

    /// The write lanes' figures, for `/metrics`: requests written and the
    /// statements (each its own commit) that wrote them — fewer statements
    /// than requests is group commit at work — and their latency.
    pub fn db_writes(&self) -> Arc<crate::metrics::DbWrites> {
        self.lanes.stats()
    }

    /// The pool, for the notification listener.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Event columns as arrays, for `unnest`.
struct EventArrays {
    kinds: Vec<&'static str>,
    steps: Vec<Option<String>>,
    attempts: Vec<i32>,
    details: Vec<String>,
    ats: Vec<DateTime<Utc>>,
}

fn event_arrays(events: &[EventRecord]) -> EventArrays {
    EventArrays {
        kinds: events.iter().map(|e| e.kind.as_str()).collect(),
        steps: events.iter().map(|e| e.step.clone()).collect(),
        attempts: events.iter().map(|e| e.attempt as i32).collect(),
        details: events.iter().map(|e| e.detail.clone()).collect(),
        ats: events.iter().map(|e| e.at).collect(),
    }
}

#[async_trait]
impl SagaStore for PgStore {
    fn reachable(&self) -> bool {
        self.health.is_up()
    }

    async fn definition_register(
        &self,
        def: Definition,
        by: Option<&str>,
    ) -> Result<(Definition, bool), StoreError> {
        let mut tx = self.pool.begin().await?;
        // Serialise registrations of one name so versions stay dense.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('saga_definitions'), hashtext($1))")
            .bind(&def.name)
            .execute(&mut *tx)
            .await?;
        let latest = sqlx::query(
            "SELECT version, content, created_at, registered_by FROM saga_definitions
             WHERE name = $1 ORDER BY version DESC LIMIT 1",
        )
        .bind(&def.name)
        .fetch_optional(&mut *tx)
        .await?;
        let next_version = match &latest {
            Some(row) => {
                let (existing, _) = decode_definition(row)?;
                if existing.content_eq(&def) {
                    return Ok((existing, false));
                }
                existing.version + 1
            }
            None => 1,
        };
        let stored = Definition {
            version: next_version,
            ..def
        };
        let content = serde_json::to_value(&stored)
            .map_err(|e| StoreError::Internal(format!("definition: {e}")))?;
        sqlx::query(
            "INSERT INTO saga_definitions (name, version, content, registered_by)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(&stored.name)
        .bind(next_version as i32)
        .bind(content)
        .bind(by)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((stored, true))
    }

    async fn definition_get(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<(Definition, Registered)>, StoreError> {
        let row = sqlx::query(
            "SELECT version, content, created_at, registered_by FROM saga_definitions
             WHERE name = $1 AND ($2::int IS NULL OR version = $2)
             ORDER BY version DESC LIMIT 1",
        )
        .bind(name)
        .bind(version.map(|v| v as i32))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(decode_definition).transpose()
    }

    async fn definition_list(&self) -> Result<Vec<(Definition, Registered)>, StoreError> {
        let rows = sqlx::query(
            "SELECT version, content, created_at, registered_by FROM saga_definitions
             ORDER BY name, version",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode_definition).collect()
    }

    async fn saga_create(&self, new: NewSaga) -> Result<Created, StoreError> {
        let steps = encode_steps(&vec![Default::default(); new.definition.steps.len()])?;
        let (owner, ttl) = match new.owner {
            Some((owner, ttl)) => (Some(owner.0), millis(ttl)),
            None => (None, 0),
        };
        let row = self
            .lanes
            .create(CreateRow {
                saga_id: new.id.0,
                definition: new.definition.name.clone(),
                version: new.definition.version as i32,
                input: new.input.clone(),
                steps,
                deadline_ms: new.definition.deadline.map(millis),
                owner,
                ttl_ms: ttl,
                detail: format!("{}@{}", new.definition.name, new.definition.version),
                started_by: new.started_by.clone(),
                trace: encode_trace(new.trace.as_ref())?,
            })
            .await?;
        let Some(row) = row else {
            let existing = self.saga_get(new.id).await?;
            return match existing {
                Some(rec) => Ok(Created::Existing(rec.saga)),
                // Inserted and deleted between our two statements: sagas are
                // never deleted, so this is a conflict worth retrying.
                None => Err(StoreError::Conflict),
            };
        };
        let created_at = row.created_at;
        let mut saga = crate::domain::Saga::new(new.id, &new.definition, new.input, created_at);
        saga.deadline_at = row.deadline_at;
        saga.started_by = new.started_by;
        saga.trace = new.trace;
        let lease = match (new.owner, row.lease_until) {
            (Some((owner, _)), Some(until)) => Some(Lease {
                saga_id: new.id,
                owner,
                epoch: 1,
                until,
            }),
            _ => None,
        };
        Ok(Created::New(saga, lease, created_at))
    }

    async fn saga_get(&self, id: SagaId) -> Result<Option<SagaRecord>, StoreError> {
        let sql = format!(
            "SELECT {SAGA_COLUMNS}, lease_epoch, event_seq, owner,
                    (lease_until IS NOT NULL AND lease_until > now()) AS leased
             FROM sagas s WHERE saga_id = $1"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            Ok(SagaRecord {
                saga: decode_saga(&row)?,
                epoch: row.try_get("lease_epoch")?,
                event_seq: row.try_get("event_seq")?,
                owner: row.try_get::<Option<Uuid>, _>("owner")?.map(OwnerId),
                leased: row.try_get("leased")?,
            })
        })
        .transpose()
    }

    async fn saga_list(&self, q: &SagaQuery) -> Result<SagaPage, StoreError> {
        // One state goes in as an equality, so the (state, created_at) index
        // also gives the order; `= ANY('{X}')` would make PostgreSQL sort.
        let (states, single): (Vec<&str>, Option<&str>) = match q.states.as_slice() {
            [one] => (Vec::new(), Some(one.as_str())),
            many => (many.iter().map(|s| s.as_str()).collect(), None),
        };
        let (after_at, after_id) = q.after.unzip();
        let (idle_ms, attempts_min) = match q.stuck {
            Some(rule) => (Some(millis(rule.idle_for)), Some(rule.attempts_min as i32)),
            None => (None, None),
        };
        let sql = saga_list_sql();
        let limit = i64::from(q.limit.max(1));
        let query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&states)
            .bind(q.definition.as_deref())
            .bind(q.created_before)
            .bind(after_at)
            .bind(after_id)
            .bind(idle_ms)
            .bind(attempts_min)
            .bind(limit + 1)
            .bind(single)
            .bind(q.started_by.as_deref())
            .bind(q.bytes_max.map(|b| i64::try_from(b).unwrap_or(i64::MAX)));
        // Rows are read one at a time and the page ends at the byte budget,
        // so a page of large inputs never sits in memory whole.
        let mut rows = query.fetch(&self.pool);
        let (mut sagas, mut bytes, mut page_rows) = (Vec::new(), 0usize, 0i64);
        while let Some(row) = tokio_stream::StreamExt::next(&mut rows).await {
            let row = row?;
            page_rows = row.try_get("page_rows")?;
            if sagas.len() as i64 == limit {
                break;
            }
            let saga = decode_saga(&row)?;
            let weight = saga_bytes(&saga);
            // The first saga always goes in, however large; the others
            // only while the page stays within the budget.
            if !sagas.is_empty() && q.bytes_max.is_some_and(|max| bytes + weight > max) {
                break;
            }
            bytes += weight;
            sagas.push(saga);
        }
        drop(rows);
        // Fewer sagas than the rows under the limit: cut by the row limit
        // or the budget, so another page follows.
        let full = (sagas.len() as i64) < page_rows;
        let next = full
            .then(|| sagas.last().map(|s| (s.created_at, s.id.0)))
            .flatten();
        Ok(SagaPage { sagas, next })
    }

    async fn saga_counts(
        &self,
        stuck: StuckRule,
        window: Duration,
    ) -> Result<SagaCounts, StoreError> {
        let rows = sqlx::query(SAGA_COUNTS_SQL)
            .bind(millis(window))
            .bind(millis(stuck.idle_for))
            .bind(stuck.attempts_min as i32)
            .bind(super::COUNT_CAP)
            .fetch_all(&self.pool)
            .await?;
        let mut counts = SagaCounts::default();
        for r in rows {
            let state: String = r.try_get("state")?;
            let n: i64 = r.try_get("n")?;
            if state == "stuck" {
                counts.stuck = n;
            } else if let Some(s) = crate::domain::SagaState::parse(&state) {
                counts.by_state.push((s, n));
            }
        }
        Ok(counts)
    }

    async fn saga_activity(&self, since: DateTime<Utc>) -> Result<Vec<ActivityMinute>, StoreError> {
        let rows = sqlx::query(SAGA_ACTIVITY_SQL)
            .bind(since)
            .fetch_all(&self.pool)
            .await?;
        let rows = rows
            .iter()
            .map(|r| Ok((r.try_get("minute")?, r.try_get("kind")?, r.try_get("n")?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        fold_activity(rows)
    }

    async fn saga_purge(
        &self,
        settled_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(SAGA_PURGE_SQL)
            .bind(settled_before)
            .bind(i64::from(limit))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn saga_events(&self, id: SagaId) -> Result<Vec<StoredEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at, kind, step, attempt, detail, took_ms FROM saga_events
             WHERE saga_id = $1 ORDER BY seq",
        )
        .bind(id.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(StoredEvent {
                    seq: r.try_get("seq")?,
                    at: r.try_get("at")?,
                    kind: {
                        let k: String = r.try_get("kind")?;
                        EventKind::parse(&k).ok_or_else(|| {
                            StoreError::Internal(format!("corrupt stored event kind {k:?}"))
                        })?
                    },
                    step: r.try_get("step")?,
                    attempt: r.try_get::<i32, _>("attempt")?.max(0) as u32,
                    detail: r.try_get("detail")?,
                    took: r
                        .try_get::<Option<i32>, _>("took_ms")?
                        .map(|ms| Duration::from_millis(ms.max(0) as u64)),
                })
            })
            .collect()
    }

    async fn saga_save(
        &self,
        lease: &Lease,
        d: &Decision,
        settled: bool,
        hold: Hold,
    ) -> Result<DateTime<Utc>, StoreError> {
        let (release, next_run_at, ttl) = match hold {
            Hold::Keep(ttl) => (false, None, millis(ttl)),
            Hold::Release(at) => (true, at, 0),
        };
        let (current_step, current_attempts) = current_progress(&d.saga);
        let row = SaveRow {
            saga_id: lease.saga_id.0,
            epoch: lease.epoch,
            owner: lease.owner.0,
            state: d.saga.state.as_str(),
            suspended_from: d.saga.suspended_from.map(|s| s.as_str()),
            steps: encode_steps(&d.saga.steps)?,
            error: d.saga.error.clone(),
            current_step,
            current_attempts,
            release,
            ttl_ms: ttl,
            next_run_at,
            settled,
            events: d
                .events
                .iter()
                .map(|e| EventRow {
                    at: e.at,
                    kind: e.kind.as_str(),
                    step: e.step.clone(),
                    attempt: e.attempt.min(i32::MAX as u32) as i32,
                    detail: e.detail.clone(),
                    took_ms: e.took.map(|t| t.as_millis().min(i32::MAX as u128) as i32),
                })
                .collect(),
        };
        self.lanes.save(row).await?.ok_or(StoreError::LeaseLost)
    }

    async fn saga_operator_save(
        &self,
        seen: &SagaRecord,
        d: &Decision,
        settled: bool,
        require_unleased: bool,
    ) -> Result<(), StoreError> {
        let steps = encode_steps(&d.saga.steps)?;
        let ev = event_arrays(&d.events);
        let (current_step, current_attempts) = current_progress(&d.saga);
        let row = sqlx::query(
            "WITH upd AS (
                UPDATE sagas SET
                    state = $4, suspended_from = $5, steps = $6::jsonb, error = $7,
                    current_step = $8, current_attempts = $9,
                    updated_at = now(),
                    event_seq = event_seq + cardinality($10::text[]),
                    lease_epoch = lease_epoch + 1,
                    owner = NULL, lease_until = NULL,
                    next_run_at = CASE WHEN $4 IN ('RUNNING', 'COMPENSATING') THEN now() ELSE NULL END
                WHERE saga_id = $1 AND lease_epoch = $2 AND event_seq = $3
                  AND NOT ($14 AND lease_until IS NOT NULL AND lease_until > now())
                RETURNING saga_id, state, event_seq - cardinality($10::text[]) AS base
             ), ev AS (
                INSERT INTO saga_events (saga_id, seq, at, kind, step, attempt, detail)
                SELECT upd.saga_id, upd.base + e.ord, e.at, e.kind, e.step, e.attempt, e.detail
                FROM upd, unnest($10::text[], $11::text[], $12::int[], $13::text[], $18::timestamptz[])
                     WITH ORDINALITY AS e(kind, step, attempt, detail, at, ord)
             ), settled AS (
                SELECT pg_notify($16, saga_id::text) FROM upd WHERE $15
             ), due AS (
                SELECT pg_notify($17, saga_id::text) FROM upd WHERE state IN ('RUNNING', 'COMPENSATING')
             )
             SELECT (SELECT count(*) FROM upd) AS updated,
                    (SELECT count(*) FROM settled) + (SELECT count(*) FROM due) AS notified,
                    EXISTS (SELECT 1 FROM sagas WHERE saga_id = $1 AND lease_until > now()) AS leased",
        )
        .bind(seen.saga.id.0)
        .bind(seen.epoch)
        .bind(seen.event_seq)
        .bind(d.saga.state.as_str())
        .bind(d.saga.suspended_from.map(|s| s.as_str()))
        .bind(steps)
        .bind(d.saga.error.as_deref())
        .bind(current_step)
        .bind(current_attempts)
        .bind(&ev.kinds)
        .bind(&ev.steps)
        .bind(&ev.attempts)
        .bind(&ev.details)
        .bind(require_unleased)
        .bind(settled)
        .bind(CHANNEL_SETTLED)
        .bind(CHANNEL_DUE)
        .bind(&ev.ats)
        .fetch_one(&self.pool)
        .await?;
        if row.try_get::<i64, _>("updated")? == 0 {
            return Err(if require_unleased && row.try_get::<bool, _>("leased")? {
                StoreError::Busy
            } else {
                StoreError::Conflict
            });
        }
        Ok(())
    }

    async fn lease_claim_due(
        &self,
        owner: OwnerId,
        limit: u32,
        ttl: Duration,
    ) -> Result<Vec<Claimed>, StoreError> {
        let sql = format!(
            "WITH due AS (
                SELECT saga_id, owner AS prev_owner FROM sagas
                WHERE next_run_at <= now()
                  AND state IN ('RUNNING', 'COMPENSATING')
                  AND (lease_until IS NULL OR lease_until <= now())
                ORDER BY next_run_at
                LIMIT $3
                FOR UPDATE SKIP LOCKED
             )
             UPDATE sagas s SET
                owner = $1,
                lease_until = now() + $2 * interval '1 millisecond',
                next_run_at = now() + $2 * interval '1 millisecond',
                lease_epoch = s.lease_epoch + 1
             FROM due WHERE s.saga_id = due.saga_id
             RETURNING {SAGA_COLUMNS}, s.lease_epoch, s.lease_until, now() AS db_now,
                       due.prev_owner IS NOT NULL AS unclean"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(owner.0)
            .bind(millis(ttl))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let saga = decode_saga(row)?;
                Ok(Claimed {
                    lease: Lease {
                        saga_id: saga.id,
                        owner,
                        epoch: row.try_get("lease_epoch")?,
                        until: row.try_get("lease_until")?,
                    },
                    db_now: row.try_get("db_now")?,
                    unclean: row.try_get("unclean")?,
                    saga,
                })
            })
            .collect()
    }

    async fn lease_extend(
        &self,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<DateTime<Utc>, StoreError> {
        let row = sqlx::query(
            "UPDATE sagas SET lease_until = now() + $3 * interval '1 millisecond',
                              next_run_at = now() + $3 * interval '1 millisecond'
             WHERE saga_id = $1 AND lease_epoch = $2 AND owner = $4
             RETURNING lease_until",
        )
        .bind(lease.saga_id.0)
        .bind(lease.epoch)
        .bind(millis(ttl))
        .bind(lease.owner.0)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(row.try_get("lease_until")?),
            None => Err(StoreError::LeaseLost),
        }
    }

    async fn lease_renew(
        &self,
        owner: OwnerId,
        held: &[(SagaId, i64)],
        ttl: Duration,
    ) -> Result<Renewed, StoreError> {
        if held.is_empty() {
            return Ok(Renewed::default());
        }
        let (ids, epochs): (Vec<Uuid>, Vec<i64>) = held.iter().map(|(id, e)| (id.0, *e)).unzip();
        // A pooled connection keeps the plan it made while the table was
        // small (a hash join over a sequential scan: measured, second-long
        // stalls every round over a million sagas); without sequential
        // scans the only plan left is the primary key's, as for the lanes.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET LOCAL enable_seqscan = off")
            .execute(&mut *tx)
            .await?;
        let rows = sqlx::query(LEASE_RENEW_SQL)
            .bind(&ids)
            .bind(&epochs)
            .bind(owner.0)
            .bind(millis(ttl))
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        let mut renewed = Renewed::default();
        for row in &rows {
            renewed.sagas.push(SagaId(row.try_get("saga_id")?));
            renewed.until = Some(row.try_get("lease_until")?);
        }
        Ok(renewed)
    }

    async fn lease_release(&self, lease: &Lease) -> Result<(), StoreError> {
        let row = sqlx::query(
            "WITH upd AS (
                UPDATE sagas SET owner = NULL, lease_until = NULL, next_run_at = now()
                WHERE saga_id = $1 AND lease_epoch = $2 AND owner = $3
                  AND state IN ('RUNNING', 'COMPENSATING')
                RETURNING saga_id
             ), due AS (SELECT pg_notify($4, saga_id::text) FROM upd)
             SELECT (SELECT count(*) FROM upd) AS updated, (SELECT count(*) FROM due) AS notified",
        )
        .bind(lease.saga_id.0)
        .bind(lease.epoch)
        .bind(lease.owner.0)
        .bind(CHANNEL_DUE)
        .fetch_one(&self.pool)
        .await?;
        if row.try_get::<i64, _>("updated")? == 0 {
            return Err(StoreError::LeaseLost);
        }
        Ok(())
    }

    async fn lease_release_all(&self, owner: OwnerId) -> Result<u64, StoreError> {
        let row = sqlx::query(
            "WITH upd AS (
                UPDATE sagas SET lease_until = now(), next_run_at = now()
                WHERE owner = $1 AND lease_until > now() RETURNING saga_id
             ), due AS (SELECT pg_notify($2, '') WHERE EXISTS (SELECT 1 FROM upd))
             SELECT (SELECT count(*) FROM upd) AS released, (SELECT count(*) FROM due) AS notified",
        )
        .bind(owner.0)
        .bind(CHANNEL_DUE)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>("released")?.max(0) as u64)
    }

    async fn participant_heartbeat(
        &self,
        beat: &Heartbeat<'_>,
        by: Option<&str>,
    ) -> Result<(), StoreError> {
        // Instances dead for an hour are pruned as their peers announce
        // themselves, so the table stays small without a sweeper. The
        // principal of the latest live heartbeat is `registered_by`; the
        // one of a withdrawal (ttl 0) `withdrawn_by`.
        sqlx::query(
            "WITH pruned AS (
                DELETE FROM participant_instances
                WHERE participant = $1 AND expires_at < now() - interval '1 hour'
             )
             INSERT INTO participant_instances
                 (participant, instance_id, endpoint, expires_at, registered_by, withdrawn_by,
                  weight)
             VALUES ($1, $2, $3, now() + $4 * interval '1 millisecond',
                     CASE WHEN $4 > 0 THEN $5 END, CASE WHEN $4 = 0 THEN $5 END, $6)
             ON CONFLICT (participant, instance_id) DO UPDATE
             SET endpoint = EXCLUDED.endpoint, expires_at = EXCLUDED.expires_at, updated_at = now(),
                 weight = EXCLUDED.weight,
                 registered_by = COALESCE(EXCLUDED.registered_by, participant_instances.registered_by),
                 withdrawn_by = EXCLUDED.withdrawn_by",
        )
        .bind(beat.participant)
        .bind(beat.instance_id)
        .bind(beat.endpoint)
        .bind(millis(beat.ttl))
        .bind(by)
        .bind(i32::try_from(beat.weight).unwrap_or(i32::MAX))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn participant_endpoints(
        &self,
        participant: &str,
    ) -> Result<Vec<(String, u32)>, StoreError> {
        let rows = sqlx::query(
            "SELECT endpoint, max(weight) AS weight FROM participant_instances
             WHERE participant = $1 AND expires_at > now() GROUP BY endpoint ORDER BY endpoint",
        )
        .bind(participant)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r: &PgRow| {
                let weight: i32 = r.try_get("weight")?;
                Ok((
                    r.try_get("endpoint")?,
                    u32::try_from(weight).unwrap_or(1).max(1),
                ))
            })
            .collect()
    }
}
