//! The idempotency barrier (feature `postgres`): exactly-once effects for
//! handlers whose work is in PostgreSQL.
//!
//! [`Barrier::action`] and [`Barrier::compensation`] run the handler's
//! database work in one transaction together with a barrier record keyed by
//! the call's `(saga_id, step, phase)`, so that:
//!
//! - a duplicate action or compensation (a retry, a redelivery after a
//!   coordinator crash, two racing calls) has no second effect, and a
//!   duplicate action returns the first result;
//! - a compensation whose action never ran succeeds as a no-op and is
//!   recorded (*null compensation*);
//! - an action that arrives after its compensation is refused as a business
//!   failure (no *hanging* reservation that nobody will ever release);
//! - a refusal (`StepError::Refused` from `f`) undoes `f`'s work but is
//!   recorded with the attempt that refused: an attempt up to that one
//!   arriving later gets the same refusal without running `f` (one that
//!   hung before reaching the barrier cannot decide differently); a later
//!   attempt (an operator's retry after fixing the cause) runs `f` again;
//!   a compensation finds nothing to undo and marks the action 'skipped'.
//!
//! ```text
//!  action:        insert action row 'done' ──inserted──▶ savepoint, run f(tx):
//!                        │                                 ok: store output, commit
//!                        │                                 refused: undo to the savepoint,
//!                        │                                   row 'refused' + reason, commit
//!                        │ conflict (waits for a racing twin to finish)
//!                        ├─ 'done'    ─▶ return the stored output (no second effect)
//!                        ├─ 'refused' ─▶ the same refusal (a later attempt: run f again)
//!                        └─ 'skipped' ─▶ refused: compensated before it arrived
//!  compensation:  insert compensation row ──conflict──▶ duplicate: done, no effect
//!                        │ inserted
//!                 insert action row 'skipped' ──inserted──▶ null compensation: commit
//!                        │ conflict: the action ran, or refused (then: 'skipped', null compensation)
//!                        └─▶ run f(tx), commit
//! ```
//!
//! The table is created by [`Barrier::create_table`] (or apply
//! [`MIGRATION`] with your own migrations). Your handler's SQL must run on
//! the connection it is given, so it commits or rolls back with the record.

use std::time::Duration;

use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Row};

use crate::participant::{Phase, StepContext, StepError};

/// The barrier table's DDL (idempotent: `CREATE TABLE IF NOT EXISTS`).
pub const MIGRATION: &str = include_str!("../migrations/0001_saga_barrier.sql");

impl From<sqlx::Error> for StepError {
    /// A database error leaves the outcome unknown (the coordinator retries
    /// idempotent steps, and the barrier makes the retry safe).
    fn from(e: sqlx::Error) -> Self {
        StepError::Unknown(format!("database: {e}"))
    }
}

/// Inserts a barrier record unless one exists for (saga, step, phase);
/// returns whether it was inserted. Waits while a racing transaction holds
/// the same key.
async fn mark(
    tx: &mut PgConnection,
    saga: &str,
    step: &str,
    phase: &str,
    state: &str,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO saga_barrier (saga_id, step, phase, state) VALUES ($1, $2, $3, $4)
         ON CONFLICT DO NOTHING",
    )
    .bind(saga)
    .bind(step)
    .bind(phase)
    .bind(state)
    .execute(tx)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// Turns a refused action's record into 'skipped' (its compensation came:
/// no attempt may run it now, not even an operator's retry); whether it
/// was refused.
async fn skip_refused(tx: &mut PgConnection, saga: &str, step: &str) -> Result<bool, sqlx::Error> {
    let n = sqlx::query(
        "UPDATE saga_barrier SET state = 'skipped'
         WHERE saga_id = $1 AND step = $2 AND phase = 'action' AND state = 'refused'",
    )
    .bind(saga)
    .bind(step)
    .execute(tx)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// A recorded refusal (the action row's output): why, and which attempt
/// refused. Attempts up to that one (late arrivals) get it again; a later
/// attempt, an operator's retry, runs the handler again.
struct Refusal {
    reason: String,
    attempt: u32,
}

impl Refusal {
    fn text(&self) -> String {
        serde_json::json!({ "reason": self.reason, "attempt": self.attempt }).to_string()
    }

    /// Reads a record; anything else is a refusal binding every attempt.
    fn parse(output: Option<&str>) -> Refusal {
        let v: serde_json::Value = output
            .and_then(|o| serde_json::from_str(o).ok())
            .unwrap_or_default();
        Refusal {
            reason: v["reason"].as_str().unwrap_or("refused").to_owned(),
            attempt: v["attempt"]
                .as_u64()
                .and_then(|a| u32::try_from(a).ok())
                .unwrap_or(u32::MAX),
        }
    }
}

/// What a duplicate action answers: the first attempt's result, its
/// refusal, or a refusal because the compensation came first.
fn replay<T: DeserializeOwned>(
    ctx: &StepContext,
    saga: &str,
    state: &str,
    output: Option<String>,
) -> Result<T, StepError> {
    match state {
        "skipped" => Err(StepError::Refused(format!(
            "step {:?} of saga {saga} was compensated before its action arrived",
            ctx.step
        ))),
        "refused" => Err(StepError::Refused(Refusal::parse(output.as_deref()).reason)),
        _ => {
            let output = output.unwrap_or_else(|| "null".into());
            serde_json::from_str(&output).map_err(|e| {
                StepError::Contract(format!(
                    "stored output does not fit the handler's type: {e}"
                ))
            })
        }
    }
}

/// The barrier over one PostgreSQL pool.
#[derive(Debug, Clone)]
pub struct Barrier {
    pool: PgPool,
}

impl Barrier {
    /// A barrier whose records live in `pool`'s database, beside the
    /// service's own tables.
    pub fn new(pool: PgPool) -> Self {
        Barrier { pool }
    }

    /// Creates the barrier table if it does not exist.
    pub async fn create_table(&self) -> Result<(), sqlx::Error> {
        sqlx::raw_sql(MIGRATION).execute(&self.pool).await?;
        Ok(())
    }

    /// Deletes barrier records older than `age`, in batches of `batch`
    /// rows (short statements that hold no long locks); returns how many.
    ///
    /// A record is what makes a late duplicate harmless, so `age` must be
    /// longer than any saga of yours can still call this service: at least
    /// the coordinator's `--retention-days` (a settled saga calls nobody),
    /// plus the longest a saga may run.
    pub async fn purge_older_than(&self, age: Duration, batch: u32) -> Result<u64, sqlx::Error> {
        let age_ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
        let mut total = 0;
        loop {
            let n = sqlx::query(
                "DELETE FROM saga_barrier WHERE ctid IN (
                    SELECT ctid FROM saga_barrier
                    WHERE created_at < now() - $1 * interval '1 millisecond'
                    LIMIT $2)",
            )
            .bind(age_ms)
            .bind(i64::from(batch.max(1)))
            .execute(&self.pool)
            .await?
            .rows_affected();
            total += n;
            if n < u64::from(batch.max(1)) {
                return Ok(total);
            }
        }
    }

    /// Runs an action's database work `f` at most once per saga step.
    ///
    /// `f` receives the transaction's connection; what it returns is stored
    /// and returned again to duplicates. A refusal from `f` undoes its work
    /// and is recorded, returned again to attempts up to the one that
    /// refused (a later one, an operator's retry, runs `f` again); any other
    /// [`StepError`] from `f` rolls everything back.
    pub async fn action<T, F>(&self, ctx: &StepContext, f: F) -> Result<T, StepError>
    where
        T: Serialize + DeserializeOwned + Send,
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<T, StepError>>,
    {
        if ctx.phase != Phase::Action {
            return Err(StepError::Contract(
                "Barrier::action called from a compensation".into(),
            ));
        }
        let saga = ctx.saga_id.to_string();
        let mut tx = self.pool.begin().await?;
        let inserted = mark(&mut tx, &saga, &ctx.step, "action", "done").await?;
        if !inserted {
            let row = sqlx::query("SELECT state, output FROM saga_barrier WHERE saga_id = $1 AND step = $2 AND phase = 'action' FOR UPDATE")
                .bind(&saga)
                .bind(&ctx.step)
                .fetch_one(&mut *tx)
                .await?;
            let state: String = row.try_get("state")?;
            let output: Option<String> = row.try_get("output")?;
            // A later attempt than the one that refused comes only from an
            // operator's retry: the handler decides again.
            let retried =
                state == "refused" && ctx.attempt > Refusal::parse(output.as_deref()).attempt;
            if !retried {
                tx.rollback().await?;
                return replay(ctx, &saga, &state, output);
            }
        }
        // A savepoint: a refusal undoes the handler's work but keeps the
        // record, so every later attempt of this step gets the same answer.
        sqlx::query("SAVEPOINT saga_barrier_work")
            .execute(&mut *tx)
            .await?;
        let (state, output, result) = match f(&mut tx).await {
            Ok(value) => {
                let output = serde_json::to_string(&value)
                    .map_err(|e| StepError::Unknown(format!("serializing the output: {e}")))?;
                ("done", output, Ok(value))
            }
            Err(StepError::Refused(why)) => {
                sqlx::query("ROLLBACK TO SAVEPOINT saga_barrier_work")
                    .execute(&mut *tx)
                    .await?;
                let record = Refusal {
                    reason: why.clone(),
                    attempt: ctx.attempt,
                };
                ("refused", record.text(), Err(StepError::Refused(why)))
            }
            Err(e) => return Err(e),
        };
        sqlx::query("UPDATE saga_barrier SET state = $3, output = $4 WHERE saga_id = $1 AND step = $2 AND phase = 'action'")
            .bind(&saga)
            .bind(&ctx.step)
            .bind(state)
            .bind(&output)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        result
    }

    /// Runs a compensation's database work `f` at most once per saga step,
    /// and only if the action took effect here; otherwise records a null
    /// compensation and succeeds.
    pub async fn compensation<F>(&self, ctx: &StepContext, f: F) -> Result<(), StepError>
    where
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<(), StepError>>,
    {
        if ctx.phase != Phase::Compensation {
            return Err(StepError::Contract(
                "Barrier::compensation called from an action".into(),
            ));
        }
        let saga = ctx.saga_id.to_string();
        let mut tx = self.pool.begin().await?;
        let first = mark(&mut tx, &saga, &ctx.step, "compensation", "done").await?;
        if !first {
            tx.rollback().await?;
            return Ok(());
        }
        // Blocks while a racing action holds its row, then either sees it
        // (the action ran: compensate it, unless it refused) or plants
        // 'skipped' (it never will).
        let null = mark(&mut tx, &saga, &ctx.step, "action", "skipped").await?
            || skip_refused(&mut tx, &saga, &ctx.step).await?;
        if !null {
            f(&mut tx).await?;
        } else {
            tracing::info!(saga_id = %saga, step = %ctx.step, "null compensation: the action never ran here");
        }
        tx.commit().await?;
        Ok(())
    }
}
