//! Group commit for the owner's hot-path writes: creating sagas and saving
//! decisions.
//!
//! ```text
//!   saga_create / saga_save ──▶ queue ──▶ lane 1 ─┐  (own connection each)
//!                                      ──▶ lane 2 ─┼─▶ one statement per batch:
//!                                      ──▶ …      ─┘   unnest(arrays) → rows, events, pg_notify
//! ```
//!
//! A lane that becomes free takes every request waiting in the queue (up to
//! [`BATCH_MAX`]) and writes them in one statement: one round trip and one
//! commit for all of them. Nothing waits for a batch to fill — with no load
//! a request is written at once, alone; under load the requests that queued
//! while the lanes were busy share the next commit. Each request keeps its
//! own fence: a stale owner's row is simply not updated and only that
//! request hears `LeaseLost`.
//!
//! Lanes hold their own connections rather than borrowing from the pool:
//! sqlx pings a pooled connection on every acquire and release, two round
//! trips per query. A lane pings only a connection idle for a while, and
//! reconnects after an error that may have broken it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgRow};
use sqlx::{ConnectOptions, Connection, Row};
use tokio::sync::{mpsc, oneshot, Mutex};
use uuid::Uuid;

use super::hosts::Health;
use super::{CHANNEL_DUE, CHANNEL_SETTLED};
use crate::domain::EventKind;
use crate::metrics::DbWrites;
use crate::store::StoreError;

/// Most requests written in one statement.
pub const BATCH_MAX: usize = 256;
/// A connection idle longer than this is pinged before use (the database
/// may have restarted meanwhile).
const IDLE_PING: Duration = Duration::from_secs(1);
/// Requests queued beyond this make callers wait (back-pressure).
const QUEUE_MAX: usize = 4_096;

/// A new saga row, leased to `owner` when given.
#[derive(Debug)]
pub struct CreateRow {
    pub saga_id: Uuid,
    pub definition: String,
    pub version: i32,
    pub input: String,
    /// `sagas.steps` as JSON text.
    pub steps: String,
    pub deadline_ms: Option<i64>,
    pub owner: Option<Uuid>,
    pub ttl_ms: i64,
    /// Detail of the `started` event.
    pub detail: String,
    /// The principal starting it.
    pub started_by: Option<String>,
    /// `sagas.trace_context`.
    pub trace: Option<String>,
}

/// What the database assigned to a created saga.
#[derive(Debug)]
pub struct CreatedRow {
    pub lease_until: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub deadline_at: Option<DateTime<Utc>>,
}

/// One event to append.
#[derive(Debug)]
pub struct EventRow {
    pub at: DateTime<Utc>,
    pub kind: &'static str,
    pub step: Option<String>,
    pub attempt: i32,
    pub detail: String,
    pub took_ms: Option<i32>,
}

/// An owner's fenced decision.
#[derive(Debug)]
pub struct SaveRow {
    pub saga_id: Uuid,
    pub epoch: i64,
    pub owner: Uuid,
    pub state: &'static str,
    pub suspended_from: Option<&'static str>,
    pub steps: String,
    pub error: Option<String>,
    pub current_step: Option<i32>,
    pub current_attempts: i32,
    /// Give the lease back (else extend it by `ttl_ms`).
    pub release: bool,
    pub ttl_ms: i64,
    /// When released: when the saga is due again (`None`: never).
    pub next_run_at: Option<DateTime<Utc>>,
    /// Notify `WaitSaga` callers everywhere.
    pub settled: bool,
    pub events: Vec<EventRow>,
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Job {
    /// `None`: the saga id exists already.
    Create(CreateRow, Reply<Option<CreatedRow>>),
    /// `None`: the fence did not hold (lease lost); else the database's `now()`.
    Save(SaveRow, Reply<Option<DateTime<Utc>>>),
}

impl Job {
    fn saga_id(&self) -> Uuid {
        match self {
            Job::Create(r, _) => r.saga_id,
            Job::Save(r, _) => r.saga_id,
        }
    }
    fn fail(self, e: &StoreError) {
        match self {
            Job::Create(_, tx) => drop(tx.send(Err(e.clone()))),
            Job::Save(_, tx) => drop(tx.send(Err(e.clone()))),
        }
    }
}

/// The queue in front of the lanes; lanes start on first use.
#[derive(Debug)]
pub struct Lanes {
    /// Lanes connect where the pool does (which moves on a failover).
    pool: PgPool,
    /// A lane drops its connection when the probe has found the database
    /// away since it connected (it may look alive and be dead).
    health: Arc<Health>,
    count: usize,
    tx: std::sync::OnceLock<mpsc::Sender<Job>>,
    stats: Arc<DbWrites>,
}

impl Lanes {
    /// `count` lanes connecting where `pool` connects.
    pub fn new(pool: PgPool, count: usize, health: Arc<Health>) -> Self {
        Lanes {
            pool,
            health,
            count: count.max(1),
            tx: std::sync::OnceLock::new(),
            stats: Arc::default(),
        }
    }

    /// How many lanes.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The lanes' figures.
    pub fn stats(&self) -> Arc<DbWrites> {
        self.stats.clone()
    }

    fn sender(&self) -> &mpsc::Sender<Job> {
        self.tx.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE_MAX);
            let rx = Arc::new(Mutex::new(rx));
            for _ in 0..self.count {
                let link = Link {
                    pool: self.pool.clone(),
                    health: self.health.clone(),
                    conn: None,
                    last_used: Instant::now(),
                    generation: 0,
                };
                tokio::spawn(lane(rx.clone(), link, self.stats.clone()));
            }
            tx
        })
    }

    async fn submit<T>(&self, job: impl FnOnce(Reply<T>) -> Job) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.sender()
            .send(job(tx))
            .await
            .map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// Inserts a saga with its `started` event.
    pub async fn create(&self, row: CreateRow) -> Result<Option<CreatedRow>, StoreError> {
        self.submit(|tx| Job::Create(row, tx)).await
    }

    /// Writes a fenced decision.
    pub async fn save(&self, row: SaveRow) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.submit(|tx| Job::Save(row, tx)).await
    }
}

/// How a lane connects: as `base`, without sequential scans, planning each
/// statement once.
///
/// Every lane statement reaches `sagas` by primary key, a few rows at a
/// time. Left to itself the planner caches a generic plan built while the
/// table was small — a hash join over a sequential scan — and keeps
/// scanning the whole, growing table on every write until autoanalyze
/// happens to invalidate it. Without sequential scans the only plan left is
/// the index lookup, whatever the statistics say; and as that plan suits
/// every batch, it is made once per connection (by default PostgreSQL would
/// plan these statements afresh on every execution, as their custom plans
/// look cheaper than the generic one).
pub fn connect_options(base: PgConnectOptions) -> PgConnectOptions {
    base.options([
        ("enable_seqscan", "off"),
        ("plan_cache_mode", "force_generic_plan"),
    ])
}

async fn lane(rx: Arc<Mutex<mpsc::Receiver<Job>>>, mut link: Link, stats: Arc<DbWrites>) {
    loop {
        let mut jobs = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else { break };
            let mut jobs = vec![first];
            while jobs.len() < BATCH_MAX {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            jobs
        };
        // One statement per kind, each with unique saga ids (a repeated id
        // goes to the next round, so every request is matched to its row).
        while !jobs.is_empty() {
            let mut seen = std::collections::HashSet::with_capacity(jobs.len());
            let (now, later): (Vec<Job>, Vec<Job>) =
                jobs.into_iter().partition(|j| seen.insert(j.saga_id()));
            jobs = later;
            let (creates, saves): (Vec<Job>, Vec<Job>) =
                now.into_iter().partition(|j| matches!(j, Job::Create(..)));
            for batch in [creates, saves] {
                if !batch.is_empty() {
                    run(&mut link, batch, &stats).await;
                }
            }
        }
    }
    if let Some(c) = link.conn {
        let _ = c.close().await;
    }
}

/// A lane's connection, and how it knows whether to trust it.
struct Link {
    pool: PgPool,
    health: Arc<Health>,
    conn: Option<PgConnection>,
    last_used: Instant,
    /// The probe's generation when the connection was made.
    generation: u64,
}

impl Link {
    /// A usable connection: the one held (pinged if idle a while; dropped
    /// if the database was found away since), or a new one made where the
    /// pool connects.
    async fn get(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        if self.generation != self.health.generation() {
            self.conn = None;
        }
        if self.last_used.elapsed() > IDLE_PING {
            if let Some(c) = self.conn.as_mut() {
                if c.ping().await.is_err() {
                    self.conn = None;
                }
            }
        }
        if self.conn.is_none() {
            self.generation = self.health.generation();
            let options = connect_options((*self.pool.connect_options()).clone());
            self.conn = Some(options.connect().await?);
        }
        self.conn.as_mut().ok_or(sqlx::Error::PoolClosed)
    }
}

/// Writes one batch; on a statement error (rolled back as a whole) each
/// request is tried alone, so one bad request fails only itself.
async fn run(link: &mut Link, batch: Vec<Job>, stats: &DbWrites) {
    let started = Instant::now();
    let result = match link.get().await {
        Ok(c) => write(c, &batch).await,
        Err(e) => Err(e),
    };
    link.last_used = Instant::now();
    // A failed batch is retried request by request below, and those
    // statements count its requests.
    // A lost connection fails every request alike: nothing to retry here.
    let lost = matches!(&result, Err(e) if super::is_connection_loss(e));
    let retried = matches!(result, Err(sqlx::Error::Database(_))) && batch.len() > 1 && !lost;
    let requests = if retried { 0 } else { batch.len() };
    stats.statement(requests, link.last_used.duration_since(started));
    match result {
        Ok(rows) => {
            let notices = Notices::of(&rows);
            answer(batch, rows);
            if let Some(c) = link.conn.as_mut() {
                if let Err(error) = notices.send(c).await {
                    tracing::warn!(%error, "notifying other coordinators failed; they poll");
                    link.conn = None;
                }
            }
        }
        Err(sqlx::Error::Database(e)) if retried => {
            tracing::warn!(error = %e, n = batch.len(), "a batched write failed; writing its requests one by one");
            for job in batch {
                Box::pin(run(link, vec![job], stats)).await;
            }
        }
        Err(e) => {
            if lost || !matches!(e, sqlx::Error::Database(_)) {
                // The connection may be broken, and whether the statement
                // committed is unknown: callers treat it as such.
                link.conn = None;
            }
            let e = StoreError::from(e);
            for job in batch {
                job.fail(&e);
            }
        }
    }
}

/// Rows returned by a batch statement, by saga id.
type Written = std::collections::HashMap<Uuid, PgRow>;

/// What other coordinators hear about a batch once it has committed.
///
/// Not sent inside the writing transaction: PostgreSQL serialises the
/// commits of notifying transactions (a database-wide lock held through the
/// WAL flush), which capped throughput at one commit per flush. A
/// transaction that only notifies writes no WAL and commits at once. If this
/// process dies between the commit and the notice, remote `WaitSaga` calls
/// notice at their next re-check and idle coordinators at their next poll.
#[derive(Default)]
struct Notices {
    settled: Vec<String>,
    due: bool,
}

/// Settled saga ids per notification (the payload limit is 8,000 bytes).
const IDS_PER_NOTICE: usize = 200;

impl Notices {
    fn of(rows: &Written) -> Self {
        let mut n = Notices::default();
        for (id, row) in rows {
            if row.try_get::<bool, _>("settled").unwrap_or(false) {
                n.settled.push(id.to_string());
            }
            n.due |= row.try_get::<bool, _>("due").unwrap_or(false);
        }
        n
    }

    async fn send(self, c: &mut PgConnection) -> Result<(), sqlx::Error> {
        let mut payloads: Vec<String> = self
            .settled
            .chunks(IDS_PER_NOTICE)
            .map(|ids| ids.join(","))
            .collect();
        let mut channels = vec![CHANNEL_SETTLED; payloads.len()];
        if self.due {
            payloads.push(String::new());
            channels.push(CHANNEL_DUE);
        }
        if payloads.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "SELECT count(pg_notify(ch, p)) FROM unnest($1::text[], $2::text[]) AS n(ch, p)",
        )
        .bind(channels)
        .bind(payloads)
        .execute(c)
        .await
        .map(drop)
    }
}

fn answer(batch: Vec<Job>, mut rows: Written) {
    for job in batch {
        match job {
            Job::Create(r, tx) => {
                let out = rows
                    .remove(&r.saga_id)
                    .map(|row| {
                        Ok(CreatedRow {
                            lease_until: row.try_get("lease_until")?,
                            created_at: row.try_get("created_at")?,
                            deadline_at: row.try_get("deadline_at")?,
                        })
                    })
                    .transpose();
                let _ = tx.send(out);
            }
            Job::Save(r, tx) => {
                let out = rows
                    .remove(&r.saga_id)
                    .map(|row| row.try_get("db_now").map_err(StoreError::from))
                    .transpose();
                let _ = tx.send(out);
            }
        }
    }
}

async fn write(c: &mut PgConnection, batch: &[Job]) -> Result<Written, sqlx::Error> {
    let rows = match batch.first() {
        Some(Job::Create(..)) => write_creates(c, batch).await?,
        Some(Job::Save(..)) => write_saves(c, batch).await?,
        None => Vec::new(),
    };
    rows.into_iter()
        .map(|row| Ok((row.try_get::<Uuid, _>("saga_id")?, row)))
        .collect()
}

/// Inserts sagas (skipping ids that exist) with their `started` events.
/// Public for the query-plan test.
pub const CREATE_SQL: &str = "
    WITH v AS (
        SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[], $5::text[],
                             $6::bigint[], $7::uuid[], $8::bigint[], $9::text[], $11::text[],
                             $12::text[])
                 AS t(saga_id, definition, version, input, steps, deadline_ms, owner, ttl, detail,
                      started_by, trace_context)
    ), ins AS (
        INSERT INTO sagas (saga_id, definition, version, state, input, steps, deadline_at,
                           owner, lease_until, next_run_at, lease_epoch, event_seq,
                           current_step, current_attempts, started_by, trace_context)
        SELECT saga_id, definition, version, 'RUNNING', input, steps::jsonb,
               now() + deadline_ms * interval '1 millisecond',
               owner, CASE WHEN owner IS NULL THEN NULL ELSE now() + ttl * interval '1 millisecond' END,
               CASE WHEN owner IS NULL THEN now() ELSE now() + ttl * interval '1 millisecond' END,
               1, 1, 0, 0, started_by, trace_context
        FROM v ORDER BY saga_id
        ON CONFLICT (saga_id) DO NOTHING
        RETURNING saga_id, owner, lease_until, created_at, deadline_at
    ), ev AS (
        INSERT INTO saga_events (saga_id, seq, kind, detail)
        SELECT ins.saga_id, 1, $10, v.detail FROM ins JOIN v ON v.saga_id = ins.saga_id
    )
    SELECT saga_id, lease_until, created_at, deadline_at, false AS settled, owner IS NULL AS due
    FROM ins";

async fn write_creates(c: &mut PgConnection, batch: &[Job]) -> Result<Vec<PgRow>, sqlx::Error> {
    let rows: Vec<&CreateRow> = batch
        .iter()
        .filter_map(|j| match j {
            Job::Create(r, _) => Some(r),
            Job::Save(..) => None,
        })
        .collect();
    sqlx::query(CREATE_SQL)
        .bind(rows.iter().map(|r| r.saga_id).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| r.definition.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.version).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.input.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.steps.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.deadline_ms).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.owner).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.ttl_ms).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.detail.as_str()).collect::<Vec<_>>())
        .bind(EventKind::Started.as_str())
        .bind(
            rows.iter()
                .map(|r| r.started_by.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.trace.as_deref()).collect::<Vec<_>>())
        .fetch_all(c)
        .await
}

/// Fenced decisions: each row is updated only while its lease epoch and
/// owner hold; events go in for the rows updated. Rows are locked in saga
/// id order. Public for the query-plan test.
pub const SAVE_SQL: &str = "
    WITH v AS (
        SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::uuid[], $4::text[], $5::text[],
                             $6::text[], $7::text[], $8::int[], $9::int[], $10::bool[],
                             $11::bigint[], $12::timestamptz[], $13::bool[], $14::int[])
                 AS t(saga_id, epoch, owner, state, suspended_from, steps, error, current_step,
                      current_attempts, release, ttl, next_run_at, settled, n_events)
    ), upd AS (
        UPDATE sagas s SET
            state = v.state, suspended_from = v.suspended_from, steps = v.steps::jsonb,
            error = v.error, current_step = v.current_step, current_attempts = v.current_attempts,
            updated_at = now(),
            event_seq = s.event_seq + v.n_events,
            owner = CASE WHEN v.release THEN NULL ELSE s.owner END,
            lease_until = CASE WHEN v.release THEN NULL ELSE now() + v.ttl * interval '1 millisecond' END,
            next_run_at = CASE WHEN v.release THEN v.next_run_at ELSE now() + v.ttl * interval '1 millisecond' END
        FROM v
        WHERE s.saga_id = ANY($1) AND s.saga_id = v.saga_id
          AND s.lease_epoch = v.epoch AND s.owner = v.owner
        RETURNING s.saga_id, s.event_seq - v.n_events AS base, v.settled, v.release,
                  v.next_run_at AS due_at
    ), ev AS (
        INSERT INTO saga_events (saga_id, seq, at, kind, step, attempt, detail, took_ms)
        SELECT e.saga_id, upd.base + e.ord, e.at, e.kind, e.step, e.attempt, e.detail, e.took_ms
        FROM unnest($15::uuid[], $16::int[], $17::timestamptz[], $18::text[], $19::text[],
                    $20::int[], $21::text[], $22::int[])
             AS e(saga_id, ord, at, kind, step, attempt, detail, took_ms)
        JOIN upd ON upd.saga_id = e.saga_id
    )
    SELECT saga_id, now() AS db_now, settled, release AND due_at IS NOT NULL AS due
    FROM upd";

async fn write_saves(c: &mut PgConnection, batch: &[Job]) -> Result<Vec<PgRow>, sqlx::Error> {
    let mut rows: Vec<&SaveRow> = batch
        .iter()
        .filter_map(|j| match j {
            Job::Save(r, _) => Some(r),
            Job::Create(..) => None,
        })
        .collect();
    rows.sort_unstable_by_key(|r| r.saga_id);
    let events = || {
        rows.iter()
            .flat_map(|r| r.events.iter().map(move |e| (r.saga_id, e)))
    };
    sqlx::query(SAVE_SQL)
        .bind(rows.iter().map(|r| r.saga_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.epoch).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.owner).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.state).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.suspended_from).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.steps.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.error.as_deref()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.current_step).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.current_attempts).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.release).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.ttl_ms).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.next_run_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.settled).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| r.events.len() as i32)
                .collect::<Vec<_>>(),
        )
        .bind(events().map(|(id, _)| id).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .flat_map(|r| 1..=r.events.len() as i32)
                .collect::<Vec<_>>(),
        )
        .bind(events().map(|(_, e)| e.at).collect::<Vec<_>>())
        .bind(events().map(|(_, e)| e.kind).collect::<Vec<_>>())
        .bind(events().map(|(_, e)| e.step.as_deref()).collect::<Vec<_>>())
        .bind(events().map(|(_, e)| e.attempt).collect::<Vec<_>>())
        .bind(events().map(|(_, e)| e.detail.as_str()).collect::<Vec<_>>())
        .bind(events().map(|(_, e)| e.took_ms).collect::<Vec<_>>())
        .fetch_all(c)
        .await
}
