//! The idempotency barrier against real PostgreSQL: duplicates (also racing
//! on two connections), null compensation, no hanging.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used)]

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::Duration;

use futures::FutureExt;
use saga_sdk::barrier::Barrier;
use saga_sdk::{Phase, StepContext, StepError};
use sqlx::PgPool;
use tokio::sync::oneshot;

fn ctx(saga: uuid::Uuid, step: &str, phase: Phase) -> StepContext {
    StepContext {
        saga_id: saga,
        definition: "d".into(),
        step: step.into(),
        phase,
        handler: "h".into(),
        attempt: 1,
        idempotency_key: format!(
            "{saga}/{step}/{}",
            if phase == Phase::Action {
                "action"
            } else {
                "compensation"
            }
        ),
        input_json: "null".into(),
        outputs_json: HashMap::new(),
        action_output_json: None,
        deadline: None,
        arrive_by: None,
        lease_epoch: 1,
    }
}

async fn setup() -> (common::TestDb, PgPool, Barrier) {
    let db = common::TestDb::new().await;
    let pool = db.pool().await;
    let barrier = Barrier::new(pool.clone());
    barrier.create_table().await.unwrap();
    barrier.create_table().await.unwrap(); // idempotent
    sqlx::query("CREATE TABLE ledger (saga_id text, step text, kind text)")
        .execute(&pool)
        .await
        .unwrap();
    (db, pool, barrier)
}

async fn ledger(pool: &PgPool, kind: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM ledger WHERE kind = $1")
        .bind(kind)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The handler's own work: one ledger row, and a value to return.
async fn book(c: &StepContext, barrier: &Barrier, value: u32) -> Result<u32, StepError> {
    let (saga, step) = (c.saga_id.to_string(), c.step.clone());
    barrier
        .action(c, |tx| {
            async move {
                sqlx::query("INSERT INTO ledger VALUES ($1, $2, 'booked')")
                    .bind(saga)
                    .bind(step)
                    .execute(&mut *tx)
                    .await?;
                Ok(value)
            }
            .boxed()
        })
        .await
}

async fn cancel(c: &StepContext, barrier: &Barrier) -> Result<(), StepError> {
    let (saga, step) = (c.saga_id.to_string(), c.step.clone());
    barrier
        .compensation(c, |tx| {
            async move {
                sqlx::query("INSERT INTO ledger VALUES ($1, $2, 'cancelled')")
                    .bind(saga)
                    .bind(step)
                    .execute(&mut *tx)
                    .await?;
                Ok(())
            }
            .boxed()
        })
        .await
}

/// Waits until some transaction in this database waits on a lock.
async fn someone_waits_on_a_lock(pool: &PgPool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no transaction blocked on the barrier"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_duplicate_action_has_no_second_effect_and_returns_the_first_result() {
    let (_db, pool, barrier) = setup().await;
    let c = ctx(uuid::Uuid::new_v4(), "hotel", Phase::Action);
    assert_eq!(book(&c, &barrier, 1).await.unwrap(), 1);
    assert_eq!(book(&c, &barrier, 2).await.unwrap(), 1, "the first result");
    assert_eq!(ledger(&pool, "booked").await, 1);
    // A failing handler leaves nothing behind, so a retry runs it again.
    let c2 = ctx(uuid::Uuid::new_v4(), "hotel", Phase::Action);
    let failed = barrier
        .action(&c2, |_tx| {
            async { Err::<u32, _>(StepError::retry_later("full")) }.boxed()
        })
        .await;
    assert!(matches!(failed, Err(StepError::RetryLater(_))));
    assert_eq!(book(&c2, &barrier, 7).await.unwrap(), 7);
    assert_eq!(ledger(&pool, "booked").await, 2);
}

#[tokio::test]
async fn duplicates_racing_on_two_connections_take_effect_once() {
    let (_db, pool, barrier) = setup().await;
    let c = ctx(uuid::Uuid::new_v4(), "flight", Phase::Action);
    let (entered_tx, entered_rx) = oneshot::channel();
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let (b1, c1) = (barrier.clone(), c.clone());
    let first = tokio::spawn(async move {
        let (saga, step) = (c1.saga_id.to_string(), c1.step.clone());
        b1.action(&c1, |tx| {
            async move {
                sqlx::query("INSERT INTO ledger VALUES ($1, $2, 'booked')")
                    .bind(saga)
                    .bind(step)
                    .execute(&mut *tx)
                    .await?;
                let _ = entered_tx.send(());
                let _ = release_rx.await;
                Ok(10u32)
            }
            .boxed()
        })
        .await
    });
    entered_rx.await.unwrap();
    let (b2, c2) = (barrier.clone(), c.clone());
    let second = tokio::spawn(async move { book(&c2, &b2, 20).await });
    someone_waits_on_a_lock(&pool).await;
    release_tx.send(()).unwrap();
    assert_eq!(first.await.unwrap().unwrap(), 10);
    assert_eq!(
        second.await.unwrap().unwrap(),
        10,
        "the duplicate waited and got the first result"
    );
    assert_eq!(ledger(&pool, "booked").await, 1);
}

#[tokio::test]
async fn a_compensation_without_its_action_is_a_recorded_no_op_and_the_late_action_is_refused() {
    let (_db, pool, barrier) = setup().await;
    let saga = uuid::Uuid::new_v4();
    cancel(&ctx(saga, "hotel", Phase::Compensation), &barrier)
        .await
        .unwrap();
    assert_eq!(ledger(&pool, "cancelled").await, 0, "nothing to undo");
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM saga_barrier WHERE saga_id = $1")
        .bind(saga.to_string())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        recorded, 2,
        "the null compensation and the skip marker are recorded"
    );
    let late = book(&ctx(saga, "hotel", Phase::Action), &barrier, 1).await;
    assert!(matches!(late, Err(StepError::Refused(_))), "{late:?}");
    assert_eq!(ledger(&pool, "booked").await, 0, "no hanging booking");
    // Compensating again is a no-op too.
    cancel(&ctx(saga, "hotel", Phase::Compensation), &barrier)
        .await
        .unwrap();
    assert_eq!(ledger(&pool, "cancelled").await, 0);
}

#[tokio::test]
async fn a_duplicate_compensation_undoes_once() {
    let (_db, pool, barrier) = setup().await;
    let saga = uuid::Uuid::new_v4();
    book(&ctx(saga, "car", Phase::Action), &barrier, 1)
        .await
        .unwrap();
    cancel(&ctx(saga, "car", Phase::Compensation), &barrier)
        .await
        .unwrap();
    cancel(&ctx(saga, "car", Phase::Compensation), &barrier)
        .await
        .unwrap();
    assert_eq!(
        (
            ledger(&pool, "booked").await,
            ledger(&pool, "cancelled").await
        ),
        (1, 1)
    );
    // Wrong phase is a contract error, not an effect.
    assert!(matches!(
        book(&ctx(saga, "car", Phase::Compensation), &barrier, 1).await,
        Err(StepError::Contract(_))
    ));
}

#[tokio::test]
async fn a_compensation_racing_its_action_waits_and_then_undoes_it() {
    let (_db, pool, barrier) = setup().await;
    let saga = uuid::Uuid::new_v4();
    let (entered_tx, entered_rx) = oneshot::channel();
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let (b1, c1) = (barrier.clone(), ctx(saga, "seat", Phase::Action));
    let action = tokio::spawn(async move {
        let (s, step) = (c1.saga_id.to_string(), c1.step.clone());
        b1.action(&c1, |tx| {
            async move {
                sqlx::query("INSERT INTO ledger VALUES ($1, $2, 'booked')")
                    .bind(s)
                    .bind(step)
                    .execute(&mut *tx)
                    .await?;
                let _ = entered_tx.send(());
                let _ = release_rx.await;
                Ok(1u32)
            }
            .boxed()
        })
        .await
    });
    entered_rx.await.unwrap();
    let (b2, c2) = (barrier.clone(), ctx(saga, "seat", Phase::Compensation));
    let compensation = tokio::spawn(async move { cancel(&c2, &b2).await });
    someone_waits_on_a_lock(&pool).await;
    release_tx.send(()).unwrap();
    action.await.unwrap().unwrap();
    compensation.await.unwrap().unwrap();
    assert_eq!(
        (
            ledger(&pool, "booked").await,
            ledger(&pool, "cancelled").await
        ),
        (1, 1),
        "the booking is undone"
    );
}

#[tokio::test]
async fn purge_deletes_only_records_older_than_the_age_in_batches() {
    let (_db, pool, barrier) = setup().await;
    for _ in 0..5 {
        let c = ctx(uuid::Uuid::new_v4(), "hotel", Phase::Action);
        book(&c, &barrier, 1).await.unwrap();
    }
    sqlx::query("UPDATE saga_barrier SET created_at = now() - interval '40 days'")
        .execute(&pool)
        .await
        .unwrap();
    let young = ctx(uuid::Uuid::new_v4(), "hotel", Phase::Action);
    book(&young, &barrier, 1).await.unwrap();
    let month = std::time::Duration::from_secs(30 * 86_400);
    assert_eq!(barrier.purge_older_than(month, 2).await.unwrap(), 5);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM saga_barrier")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 1, "the young record stays");
    assert_eq!(barrier.purge_older_than(month, 2).await.unwrap(), 0);
    // The young record still makes a duplicate harmless.
    assert_eq!(book(&young, &barrier, 2).await.unwrap(), 1);
}

/// A handler that does its work, then refuses.
fn books_then_refuses(
    tx: &mut sqlx::PgConnection,
) -> futures::future::BoxFuture<'_, Result<u32, StepError>> {
    async move {
        sqlx::query("INSERT INTO ledger VALUES ('x', 'pay', 'booked')")
            .execute(&mut *tx)
            .await?;
        Err(StepError::refuse("insufficient funds"))
    }
    .boxed()
}

/// A refusal undoes the handler's work and is recorded: an earlier attempt
/// arriving late (one that hung before it reached the barrier) gets the
/// same refusal without running, and the compensation has nothing to undo.
#[tokio::test]
async fn a_refusal_is_recorded_so_late_attempts_get_it_and_its_compensation_is_a_no_op() {
    let (_db, pool, barrier) = setup().await;
    let saga = uuid::Uuid::new_v4();
    let second = StepContext {
        attempt: 2,
        ..ctx(saga, "pay", Phase::Action)
    };
    let first = barrier.action(&second, books_then_refuses).await;
    assert!(
        matches!(&first, Err(StepError::Refused(m)) if m == "insufficient funds"),
        "{first:?}"
    );
    assert_eq!(
        ledger(&pool, "booked").await,
        0,
        "the refused work is undone"
    );
    // Attempt 1, which hung before the barrier, arrives now.
    let again = book(&ctx(saga, "pay", Phase::Action), &barrier, 7).await;
    assert!(
        matches!(&again, Err(StepError::Refused(m)) if m == "insufficient funds"),
        "{again:?}"
    );
    assert_eq!(
        ledger(&pool, "booked").await,
        0,
        "the late attempt does not run"
    );
    cancel(&ctx(saga, "pay", Phase::Compensation), &barrier)
        .await
        .unwrap();
    assert_eq!(ledger(&pool, "cancelled").await, 0, "nothing to undo");
    // Compensated: not even a later attempt runs it now.
    let retried = StepContext {
        attempt: 3,
        ..ctx(saga, "pay", Phase::Action)
    };
    let late = book(&retried, &barrier, 7).await;
    assert!(matches!(late, Err(StepError::Refused(_))), "{late:?}");
    assert_eq!(ledger(&pool, "booked").await, 0, "no hanging booking");
}

/// An operator's retry after a refusal (a later attempt than the one that
/// refused) runs the handler again; its success is then what every
/// duplicate gets, late arrivals of the refused attempt included.
#[tokio::test]
async fn a_later_attempt_than_the_refusing_one_runs_again() {
    let (_db, pool, barrier) = setup().await;
    let saga = uuid::Uuid::new_v4();
    let first = ctx(saga, "pay", Phase::Action);
    let refused = barrier.action(&first, books_then_refuses).await;
    assert!(matches!(refused, Err(StepError::Refused(_))), "{refused:?}");
    let retried = StepContext {
        attempt: 2,
        ..ctx(saga, "pay", Phase::Action)
    };
    assert_eq!(book(&retried, &barrier, 7).await.unwrap(), 7);
    assert_eq!(ledger(&pool, "booked").await, 1);
    assert_eq!(
        book(&first, &barrier, 8).await.unwrap(),
        7,
        "the stored result"
    );
    assert_eq!(ledger(&pool, "booked").await, 1, "no second effect");
}

/// A barrier table made before refusals were recorded (its check allowed
/// only 'done' and 'skipped') is widened by `create_table`, keeping its
/// rows; running it again changes nothing.
#[tokio::test]
async fn create_table_widens_a_table_made_before_refusals_were_recorded() {
    let db = common::TestDb::new().await;
    let pool = db.pool().await;
    sqlx::raw_sql(
        "CREATE TABLE saga_barrier (
            saga_id text NOT NULL, step text NOT NULL, phase text NOT NULL,
            state text NOT NULL, output text,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (saga_id, step, phase),
            CONSTRAINT saga_barrier_phase_valid CHECK (phase IN ('action', 'compensation')),
            CONSTRAINT saga_barrier_state_valid CHECK (state IN ('done', 'skipped')));
         INSERT INTO saga_barrier VALUES ('old', 's', 'action', 'done', '1', now());
         CREATE TABLE ledger (saga_id text, step text, kind text);",
    )
    .execute(&pool)
    .await
    .unwrap();
    let barrier = Barrier::new(pool.clone());
    barrier.create_table().await.unwrap();
    barrier.create_table().await.unwrap();
    let saga = uuid::Uuid::new_v4();
    let refused = barrier
        .action(&ctx(saga, "pay", Phase::Action), books_then_refuses)
        .await;
    assert!(matches!(refused, Err(StepError::Refused(_))), "{refused:?}");
    let states: Vec<String> =
        sqlx::query_scalar("SELECT state FROM saga_barrier ORDER BY saga_id = 'old' DESC")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(states, ["done", "refused"]);
}
