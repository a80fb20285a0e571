//! The embedded store: one SQLite file, one node.
//!
//! ```text
//!   writes ──▶ writer pool (one connection) ──▶ BEGIN IMMEDIATE … COMMIT ─┐
//!   reads  ──▶ reader pool (WAL: readers never wait for the writer) ◀─────┤
//!                                                          <data>/sagad.db (WAL, synchronous=FULL)
//! ```
//!
//! The same contract as [`super::pg::PgStore`], proved by the same
//! conformance suite (`tests/store_conformance.rs`): every owner write is
//! one statement conditioned on the lease's epoch and owner, claims bump
//! the epoch. With a single writer connection, transactions are serial, so
//! a claim never hands one saga to two claimers (what `SKIP LOCKED` gives
//! PostgreSQL). The store's clock is this process's clock (one node, one
//! clock); times are stored as microseconds since the epoch.
//!
//! `synchronous=FULL` makes every commit durable before it returns, so an
//! acknowledged `StartSaga` survives a power loss. The file is locked by the
//! process that opens it (`<file>.lock`): a second `sagad` on it is refused
//! at start — this store is single-node by design; run several coordinators
//! on PostgreSQL.

mod rows;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};

use super::encode::{current_progress, encode_steps, encode_trace, fold_activity, saga_bytes};
use super::{
    ActivityMinute, Claimed, Created, Heartbeat, Hold, Lease, NewSaga, OwnerId, Registered,
    Renewed, SagaCounts, SagaPage, SagaQuery, SagaRecord, SagaStore, StoreError, StoredEvent,
    StuckRule, COUNT_CAP,
};
use crate::domain::{Decision, Definition, EventKind, EventRecord, Saga, SagaId, SagaState};
use rows::{decode_definition, decode_event, decode_saga, from_us, us, SAGA_COLUMNS};

/// The embedded migrations of `migrations/sqlite/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Readers at once (WAL lets them run beside the writer).
const READERS_MAX: u32 = 4;

/// What the store tells the coordinator after a write (as PostgreSQL's
/// `NOTIFY` does): a saga settled, or work became due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// This saga reached a state `WaitSaga` returns on.
    Settled(uuid::Uuid),
    /// A saga became due (now or at a time given back).
    Due,
}

/// Notices kept for a slow listener; beyond, it re-reads.
const NOTICES_MAX: usize = 4_096;

/// The SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    write: SqlitePool,
    read: SqlitePool,
    path: PathBuf,
    notices: tokio::sync::broadcast::Sender<Notice>,
    /// Held while the store is open: the single-node lock.
    _lock: std::sync::Arc<std::fs::File>,
}

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another process holds the file.
    #[error(
        "{0} is in use by another sagad: the SQLite store is single-node \
         (run several coordinators on PostgreSQL)"
    )]
    InUse(PathBuf),
    /// The file or its folder cannot be used.
    #[error("cannot open {path}: {why}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The schema could not be brought up to date.
    #[error("migrating {path}: {why}")]
    Migrate {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

impl SqliteStore {
    /// Opens (creating if missing) the store at `path`, takes its lock and
    /// applies the migrations.
    pub async fn open(path: &Path) -> Result<SqliteStore, OpenError> {
        let io = |why: String| OpenError::Io {
            path: path.to_owned(),
            why,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io(e.to_string()))?;
        }
        let lock_path = path.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io(e.to_string()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(OpenError::InUse(path.to_owned()))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e.to_string())),
        }
        let options = SqliteConnectOptions::from_str("sqlite:")
            .map_err(|e| io(e.to_string()))?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .map_err(|e| io(e.to_string()))?;
        MIGRATOR.run(&write).await.map_err(|e| OpenError::Migrate {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
        let read = SqlitePoolOptions::new()
            .max_connections(READERS_MAX)
            .connect_with(options.read_only(true))
            .await
            .map_err(|e| io(e.to_string()))?;
        Ok(SqliteStore {
            write,
            read,
            path: path.to_owned(),
            notices: tokio::sync::broadcast::channel(NOTICES_MAX).0,
            _lock: std::sync::Arc::new(lock),
        })
    }

    /// The notices of this store's writes.
    pub fn notices(&self) -> tokio::sync::broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    fn notify(&self, n: Notice) {
        // No listener: nobody to tell.
        let _ = self.notices.send(n);
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answers a trivial query (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.read).await.db()?;
        Ok(())
    }

    async fn begin(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        // The one writer connection makes every transaction serial.
        self.write.begin().await.db()
    }
}

/// The store seam's error for a driver error: an unreachable file, a busy
/// database or a closed pool is `Unavailable` (the same call may succeed
/// later); anything else is `Internal`.
trait Db<T> {
    fn db(self) -> Result<T, StoreError>;
}

impl<T> Db<T> for Result<T, sqlx::Error> {
    fn db(self) -> Result<T, StoreError> {
        self.map_err(|e| match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
            sqlx::Error::Database(d)
                if d.code().is_some_and(|c| c == "5" || c == "6" || c == "517") =>
            {
                StoreError::Unavailable(e.to_string())
            }
            _ => StoreError::Internal(e.to_string()),
        })
    }
}

/// The store's clock, at the precision it stores (microseconds, as
/// PostgreSQL's), so a time handed out equals the time read back.
fn now() -> DateTime<Utc> {
    let t = Utc::now();
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

fn plus(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    t + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

fn state_in(states: &[SagaState]) -> String {
    states
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Appends `events` after `base`.
async fn insert_events(
    tx: &mut Transaction<'static, Sqlite>,
    id: SagaId,
    base: i64,
    events: &[EventRecord],
) -> Result<(), StoreError> {
    for (k, e) in events.iter().enumerate() {
        sqlx::query(
            "INSERT INTO saga_events (saga_id, seq, at, kind, step, attempt, detail, took_ms)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(id.0.to_string())
        .bind(base + 1 + k as i64)
        .bind(us(e.at))
        .bind(e.kind.as_str())
        .bind(e.step.as_deref())
        .bind(i64::from(e.attempt))
        .bind(&e.detail)
        .bind(e.took.map(|t| t.as_millis().min(i64::MAX as u128) as i64))
        .execute(&mut **tx)
        .await
        .db()?;
    }
    Ok(())
}

#[async_trait]
impl SagaStore for SqliteStore {
    async fn definition_register(
        &self,
        def: Definition,
        by: Option<&str>,
    ) -> Result<(Definition, bool), StoreError> {
        let mut tx = self.begin().await?;
        let latest = sqlx::query(
            "SELECT version, content, created_at, registered_by FROM saga_definitions
             WHERE name = ? ORDER BY version DESC LIMIT 1",
        )
        .bind(&def.name)
        .fetch_optional(&mut *tx)
        .await
        .db()?;
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
        let content = serde_json::to_string(&stored)
            .map_err(|e| StoreError::Internal(format!("definition: {e}")))?;
        sqlx::query(
            "INSERT INTO saga_definitions (name, version, content, created_at, registered_by)
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&stored.name)
        .bind(i64::from(next_version))
        .bind(content)
        .bind(us(now()))
        .bind(by)
        .execute(&mut *tx)
        .await
        .db()?;
        tx.commit().await.db()?;
        Ok((stored, true))
    }

    async fn definition_get(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<(Definition, Registered)>, StoreError> {
        let row = sqlx::query(
            "SELECT version, content, created_at, registered_by FROM saga_definitions
             WHERE name = ? AND (? IS NULL OR version = ?)
             ORDER BY version DESC LIMIT 1",
        )
        .bind(name)
        .bind(version.map(i64::from))
        .bind(version.map(i64::from))
        .fetch_optional(&self.read)
        .await
        .db()?;
        row.as_ref().map(decode_definition).transpose()
    }

    async fn definition_list(&self) -> Result<Vec<(Definition, Registered)>, StoreError> {
        let rows = sqlx::query(
            "SELECT version, content, created_at, registered_by FROM saga_definitions
             ORDER BY name, version",
        )
        .fetch_all(&self.read)
        .await
        .db()?;
        rows.iter().map(decode_definition).collect()
    }

    async fn saga_create(&self, new: NewSaga) -> Result<Created, StoreError> {
        let at = now();
        let mut saga = Saga::new(new.id, &new.definition, new.input, at);
        saga.started_by = new.started_by;
        saga.trace = new.trace;
        let (owner, until) = match new.owner {
            Some((owner, ttl)) => (Some(owner), Some(plus(at, ttl))),
            None => (None, None),
        };
        let mut tx = self.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO sagas (saga_id, definition, version, state, input, steps, deadline_at,
                                owner, lease_until, next_run_at, lease_epoch, event_seq,
                                current_step, current_attempts, created_at, updated_at,
                                started_by, trace_context)
             VALUES (?, ?, ?, 'RUNNING', ?, ?, ?, ?, ?, ?, 1, 1, 0, 0, ?, ?, ?, ?)
             ON CONFLICT (saga_id) DO NOTHING",
        )
        .bind(saga.id.0.to_string())
        .bind(&saga.definition)
        .bind(i64::from(saga.version))
        .bind(&saga.input)
        .bind(encode_steps(&saga.steps)?)
        .bind(saga.deadline_at.map(us))
        .bind(owner.map(|o| o.0.to_string()))
        .bind(until.map(us))
        .bind(us(until.unwrap_or(at)))
        .bind(us(at))
        .bind(us(at))
        .bind(saga.started_by.as_deref())
        .bind(encode_trace(saga.trace.as_ref())?)
        .execute(&mut *tx)
        .await
        .db()?;
        if inserted.rows_affected() == 0 {
            drop(tx);
            return match self.saga_get(new.id).await? {
                Some(rec) => Ok(Created::Existing(rec.saga)),
                None => Err(StoreError::Conflict),
            };
        }
        let started = EventRecord {
            kind: EventKind::Started,
            step: None,
            attempt: 0,
            detail: format!("{}@{}", new.definition.name, new.definition.version),
            at,
            took: None,
        };
        insert_events(&mut tx, saga.id, 0, std::slice::from_ref(&started)).await?;
        tx.commit().await.db()?;
        if owner.is_none() {
            self.notify(Notice::Due);
        }
        let lease = owner.zip(until).map(|(owner, until)| Lease {
            saga_id: saga.id,
            owner,
            epoch: 1,
            until,
        });
        Ok(Created::New(saga, lease, at))
    }

    async fn saga_get(&self, id: SagaId) -> Result<Option<SagaRecord>, StoreError> {
        let sql = format!(
            "SELECT {SAGA_COLUMNS}, lease_epoch, event_seq, owner, lease_until
             FROM sagas WHERE saga_id = ?"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.0.to_string())
            .fetch_optional(&self.read)
            .await
            .db()?;
        row.map(|row| {
            let until: Option<i64> = row.try_get("lease_until").db()?;
            Ok(SagaRecord {
                saga: decode_saga(&row)?,
                epoch: row.try_get("lease_epoch").db()?,
                event_seq: row.try_get("event_seq").db()?,
                owner: rows::owner(&row)?,
                leased: until.is_some_and(|u| u > us(now())),
            })
        })
        .transpose()
    }

    async fn saga_list(&self, q: &SagaQuery) -> Result<SagaPage, StoreError> {
        let limit = i64::from(q.limit.max(1));
        let mut b = sqlx::QueryBuilder::<Sqlite>::new(format!(
            "SELECT {SAGA_COLUMNS} FROM sagas WHERE 1 = 1"
        ));
        if !q.states.is_empty() {
            b.push(format!(" AND state IN ({})", state_in(&q.states)));
        }
        if let Some(d) = &q.definition {
            b.push(" AND definition = ").push_bind(d.clone());
        }
        if let Some(p) = &q.started_by {
            b.push(" AND started_by = ").push_bind(p.clone());
        }
        if let Some(t) = q.created_before {
            b.push(" AND created_at <= ").push_bind(us(t));
        }
        if let Some((at, id)) = q.after {
            b.push(" AND (created_at, saga_id) < (")
                .push_bind(us(at))
                .push(", ")
                .push_bind(id.to_string())
                .push(")");
        }
        if let Some(rule) = q.stuck {
            b.push(" AND state IN ('RUNNING', 'COMPENSATING', 'SUSPENDED') AND (state = 'SUSPENDED' OR updated_at < ")
                .push_bind(us(now()) - rule.idle_for.as_micros().min(i64::MAX as u128) as i64)
                .push(" OR current_attempts >= ")
                .push_bind(i64::from(rule.attempts_min))
                .push(")");
        }
        b.push(" ORDER BY created_at DESC, saga_id DESC LIMIT ")
            .push_bind(limit + 1);
        let mut rows = b.build().fetch(&self.read);
        let (mut sagas, mut bytes, mut more) = (Vec::new(), 0usize, false);
        while let Some(row) = tokio_stream::StreamExt::next(&mut rows).await {
            let row = row.db()?;
            if sagas.len() as i64 == limit {
                more = true;
                break;
            }
            let saga = decode_saga(&row)?;
            let weight = saga_bytes(&saga);
            // The first saga always goes in, however large; the others
            // only while the page stays within the budget.
            if !sagas.is_empty() && q.bytes_max.is_some_and(|max| bytes + weight > max) {
                more = true;
                break;
            }
            bytes += weight;
            sagas.push(saga);
        }
        let next = more
            .then(|| sagas.last().map(|s: &Saga| (s.created_at, s.id.0)))
            .flatten();
        Ok(SagaPage { sagas, next })
    }

    async fn saga_counts(
        &self,
        stuck: StuckRule,
        window: Duration,
    ) -> Result<SagaCounts, StoreError> {
        let t = now();
        let since = us(t) - window.as_micros().min(i64::MAX as u128) as i64;
        let mut counts = SagaCounts::default();
        for s in SagaState::ALL {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM (SELECT 1 FROM sagas
                 WHERE state = ? AND (? = 0 OR created_at > ?) LIMIT ?)",
            )
            .bind(s.as_str())
            .bind(i64::from(s.is_terminal()))
            .bind(since)
            .bind(COUNT_CAP)
            .fetch_one(&self.read)
            .await
            .db()?;
            counts.by_state.push((*s, n));
        }
        let idle_before = us(t) - stuck.idle_for.as_micros().min(i64::MAX as u128) as i64;
        counts.stuck = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT 1 FROM sagas
             WHERE state IN ('RUNNING', 'COMPENSATING', 'SUSPENDED')
               AND (state = 'SUSPENDED' OR updated_at < ? OR current_attempts >= ?)
             LIMIT ?)",
        )
        .bind(idle_before)
        .bind(i64::from(stuck.attempts_min))
        .bind(COUNT_CAP)
        .fetch_one(&self.read)
        .await
        .db()?;
        Ok(counts)
    }

    async fn saga_activity(&self, since: DateTime<Utc>) -> Result<Vec<ActivityMinute>, StoreError> {
        let rows = sqlx::query(
            "SELECT minute, kind, n FROM (
                SELECT (created_at / 60000000) * 60000000 AS minute, 'started' AS kind,
                       count(*) AS n
                FROM sagas WHERE created_at >= ?1 GROUP BY 1
                UNION ALL
                SELECT (at / 60000000) * 60000000, kind, count(*) FROM saga_events
                WHERE at >= ?1 AND kind IN ('completed', 'compensated', 'suspended')
                GROUP BY 1, 2
             ) ORDER BY minute, kind",
        )
        .bind(us(since))
        .fetch_all(&self.read)
        .await
        .db()?;
        let rows = rows
            .iter()
            .map(|r| {
                Ok((
                    from_us(r.try_get("minute").db()?)?,
                    r.try_get("kind").db()?,
                    r.try_get("n").db()?,
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        fold_activity(rows)
    }

    async fn saga_purge(
        &self,
        settled_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        // History goes by cascade (foreign keys are on).
        let done = sqlx::query(
            "DELETE FROM sagas WHERE saga_id IN (
                SELECT saga_id FROM sagas
                WHERE state IN ('COMPLETED', 'COMPENSATED', 'RESOLVED') AND updated_at < ?
                ORDER BY updated_at LIMIT ?)",
        )
        .bind(us(settled_before))
        .bind(i64::from(limit))
        .execute(&self.write)
        .await
        .db()?;
        Ok(done.rows_affected())
    }

    async fn saga_events(&self, id: SagaId) -> Result<Vec<StoredEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at, kind, step, attempt, detail, took_ms FROM saga_events
             WHERE saga_id = ? ORDER BY seq",
        )
        .bind(id.0.to_string())
        .fetch_all(&self.read)
        .await
        .db()?;
        rows.iter().map(decode_event).collect()
    }

    async fn saga_save(
        &self,
        lease: &Lease,
        d: &Decision,
        settled: bool,
        hold: Hold,
    ) -> Result<DateTime<Utc>, StoreError> {
        let t = now();
        let (owner, until, next_run_at) = match hold {
            Hold::Keep(ttl) => (Some(lease.owner), Some(plus(t, ttl)), Some(plus(t, ttl))),
            Hold::Release(at) => (None, None, at),
        };
        let (current_step, current_attempts) = current_progress(&d.saga);
        let n = d.events.len() as i64;
        let mut tx = self.begin().await?;
        let base: Option<i64> = sqlx::query_scalar(
            "UPDATE sagas SET state = ?, suspended_from = ?, steps = ?, error = ?,
                 current_step = ?, current_attempts = ?, updated_at = ?,
                 event_seq = event_seq + ?, owner = ?, lease_until = ?, next_run_at = ?
             WHERE saga_id = ? AND lease_epoch = ? AND owner = ?
             RETURNING event_seq - ?",
        )
        .bind(d.saga.state.as_str())
        .bind(d.saga.suspended_from.map(|s| s.as_str()))
        .bind(encode_steps(&d.saga.steps)?)
        .bind(d.saga.error.as_deref())
        .bind(current_step.map(i64::from))
        .bind(i64::from(current_attempts))
        .bind(us(t))
        .bind(n)
        .bind(owner.map(|o| o.0.to_string()))
        .bind(until.map(us))
        .bind(next_run_at.map(us))
        .bind(lease.saga_id.0.to_string())
        .bind(lease.epoch)
        .bind(lease.owner.0.to_string())
        .bind(n)
        .fetch_optional(&mut *tx)
        .await
        .db()?;
        let Some(base) = base else {
            return Err(StoreError::LeaseLost);
        };
        insert_events(&mut tx, lease.saga_id, base, &d.events).await?;
        tx.commit().await.db()?;
        if settled {
            self.notify(Notice::Settled(lease.saga_id.0));
        }
        if next_run_at.is_some() && owner.is_none() {
            self.notify(Notice::Due);
        }
        Ok(t)
    }

    async fn saga_operator_save(
        &self,
        seen: &SagaRecord,
        d: &Decision,
        settled: bool,
        require_unleased: bool,
    ) -> Result<(), StoreError> {
        let t = now();
        let (current_step, current_attempts) = current_progress(&d.saga);
        let n = d.events.len() as i64;
        let due = matches!(d.saga.state, SagaState::Running | SagaState::Compensating);
        let mut tx = self.begin().await?;
        let base: Option<i64> = sqlx::query_scalar(
            "UPDATE sagas SET state = ?, suspended_from = ?, steps = ?, error = ?,
                 current_step = ?, current_attempts = ?, updated_at = ?,
                 event_seq = event_seq + ?, lease_epoch = lease_epoch + 1,
                 owner = NULL, lease_until = NULL, next_run_at = ?
             WHERE saga_id = ? AND lease_epoch = ? AND event_seq = ?
               AND NOT (? AND lease_until IS NOT NULL AND lease_until > ?)
             RETURNING event_seq - ?",
        )
        .bind(d.saga.state.as_str())
        .bind(d.saga.suspended_from.map(|s| s.as_str()))
        .bind(encode_steps(&d.saga.steps)?)
        .bind(d.saga.error.as_deref())
        .bind(current_step.map(i64::from))
        .bind(i64::from(current_attempts))
        .bind(us(t))
        .bind(n)
        .bind(due.then(|| us(t)))
        .bind(seen.saga.id.0.to_string())
        .bind(seen.epoch)
        .bind(seen.event_seq)
        .bind(require_unleased)
        .bind(us(t))
        .bind(n)
        .fetch_optional(&mut *tx)
        .await
        .db()?;
        let Some(base) = base else {
            drop(tx);
            let leased = self.saga_get(seen.saga.id).await?.is_some_and(|r| r.leased);
            return Err(if require_unleased && leased {
                StoreError::Busy
            } else {
                StoreError::Conflict
            });
        };
        insert_events(&mut tx, seen.saga.id, base, &d.events).await?;
        tx.commit().await.db()?;
        if settled {
            self.notify(Notice::Settled(seen.saga.id.0));
        }
        if due {
            self.notify(Notice::Due);
        }
        Ok(())
    }

    async fn lease_claim_due(
        &self,
        owner: OwnerId,
        limit: u32,
        ttl: Duration,
    ) -> Result<Vec<Claimed>, StoreError> {
        let t = now();
        let until = plus(t, ttl);
        let mut tx = self.begin().await?;
        let due: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT saga_id, owner FROM sagas
             WHERE next_run_at <= ? AND state IN ('RUNNING', 'COMPENSATING')
               AND (lease_until IS NULL OR lease_until <= ?)
             ORDER BY next_run_at LIMIT ?",
        )
        .bind(us(t))
        .bind(us(t))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .db()?;
        let mut claimed = Vec::with_capacity(due.len());
        for (id, prev_owner) in due {
            let sql = format!(
                "UPDATE sagas SET owner = ?, lease_until = ?, next_run_at = ?,
                                  lease_epoch = lease_epoch + 1
                 WHERE saga_id = ? RETURNING {SAGA_COLUMNS}, lease_epoch"
            );
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(owner.0.to_string())
                .bind(us(until))
                .bind(us(until))
                .bind(id)
                .fetch_one(&mut *tx)
                .await
                .db()?;
            let saga = decode_saga(&row)?;
            claimed.push(Claimed {
                lease: Lease {
                    saga_id: saga.id,
                    owner,
                    epoch: row.try_get("lease_epoch").db()?,
                    until,
                },
                db_now: t,
                unclean: prev_owner.is_some(),
                saga,
            });
        }
        tx.commit().await.db()?;
        Ok(claimed)
    }

    async fn lease_extend(
        &self,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<DateTime<Utc>, StoreError> {
        let until = plus(now(), ttl);
        let done = sqlx::query(
            "UPDATE sagas SET lease_until = ?, next_run_at = ?
             WHERE saga_id = ? AND lease_epoch = ? AND owner = ?",
        )
        .bind(us(until))
        .bind(us(until))
        .bind(lease.saga_id.0.to_string())
        .bind(lease.epoch)
        .bind(lease.owner.0.to_string())
        .execute(&self.write)
        .await
        .db()?;
        if done.rows_affected() == 0 {
            return Err(StoreError::LeaseLost);
        }
        Ok(until)
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
        // `[["<uuid>", epoch], …]`: ids and numbers need no escaping.
        let pairs: Vec<String> = held
            .iter()
            .map(|(id, epoch)| format!("[\"{}\",{epoch}]", id.0))
            .collect();
        let pairs = format!("[{}]", pairs.join(","));
        let until = plus(now(), ttl);
        // One statement, through the primary key: the pairs as a JSON array.
        let rows = sqlx::query(
            "UPDATE sagas SET lease_until = ?1, next_run_at = ?1
             WHERE saga_id IN (SELECT value ->> 0 FROM json_each(?2))
               AND owner = ?3
               AND lease_epoch = (SELECT value ->> 1 FROM json_each(?2)
                                  WHERE value ->> 0 = sagas.saga_id)
             RETURNING saga_id",
        )
        .bind(us(until))
        .bind(pairs)
        .bind(owner.0.to_string())
        .fetch_all(&self.write)
        .await
        .db()?;
        let mut renewed = Renewed::default();
        for row in &rows {
            let id: String = row.try_get("saga_id").db()?;
            renewed.sagas.push(SagaId(rows::uuid(&id)?));
            renewed.until = Some(until);
        }
        Ok(renewed)
    }

    async fn lease_release(&self, lease: &Lease) -> Result<(), StoreError> {
        let done = sqlx::query(
            "UPDATE sagas SET owner = NULL, lease_until = NULL, next_run_at = ?
             WHERE saga_id = ? AND lease_epoch = ? AND owner = ?
               AND state IN ('RUNNING', 'COMPENSATING')",
        )
        .bind(us(now()))
        .bind(lease.saga_id.0.to_string())
        .bind(lease.epoch)
        .bind(lease.owner.0.to_string())
        .execute(&self.write)
        .await
        .db()?;
        if done.rows_affected() == 0 {
            return Err(StoreError::LeaseLost);
        }
        self.notify(Notice::Due);
        Ok(())
    }

    async fn lease_release_all(&self, owner: OwnerId) -> Result<u64, StoreError> {
        let t = us(now());
        let done = sqlx::query(
            "UPDATE sagas SET lease_until = ?, next_run_at = ?
             WHERE owner = ? AND lease_until > ?",
        )
        .bind(t)
        .bind(t)
        .bind(owner.0.to_string())
        .bind(t)
        .execute(&self.write)
        .await
        .db()?;
        if done.rows_affected() > 0 {
            self.notify(Notice::Due);
        }
        Ok(done.rows_affected())
    }

    async fn participant_heartbeat(
        &self,
        beat: &Heartbeat<'_>,
        by: Option<&str>,
    ) -> Result<(), StoreError> {
        let Heartbeat {
            participant,
            instance_id,
            endpoint,
            weight,
            ttl,
        } = *beat;
        let t = now();
        let mut tx = self.begin().await?;
        // Instances dead for an hour are pruned as their peers announce
        // themselves (as on PostgreSQL).
        sqlx::query("DELETE FROM participant_instances WHERE participant = ? AND expires_at < ?")
            .bind(participant)
            .bind(us(t) - 3_600_000_000)
            .execute(&mut *tx)
            .await
            .db()?;
        let live = !ttl.is_zero();
        sqlx::query(
            "INSERT INTO participant_instances
                 (participant, instance_id, endpoint, expires_at, updated_at, registered_by,
                  withdrawn_by, weight)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (participant, instance_id) DO UPDATE
             SET endpoint = excluded.endpoint, expires_at = excluded.expires_at,
                 updated_at = excluded.updated_at, weight = excluded.weight,
                 registered_by = COALESCE(excluded.registered_by, registered_by),
                 withdrawn_by = excluded.withdrawn_by",
        )
        .bind(participant)
        .bind(instance_id)
        .bind(endpoint)
        .bind(us(plus(t, ttl)))
        .bind(us(t))
        .bind(by.filter(|_| live))
        .bind(by.filter(|_| !live))
        .bind(i64::from(weight))
        .execute(&mut *tx)
        .await
        .db()?;
        tx.commit().await.db()?;
        Ok(())
    }

    async fn participant_endpoints(
        &self,
        participant: &str,
    ) -> Result<Vec<(String, u32)>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT endpoint, max(weight) FROM participant_instances
             WHERE participant = ? AND expires_at > ? GROUP BY endpoint ORDER BY endpoint",
        )
        .bind(participant)
        .bind(us(now()))
        .fetch_all(&self.read)
        .await
        .db()?;
        Ok(rows
            .into_iter()
            .map(|(e, w)| (e, u32::try_from(w).unwrap_or(1).max(1)))
            .collect())
    }
}
