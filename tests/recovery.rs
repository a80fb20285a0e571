//! Crashes and takeovers: a coordinator dies mid-step, another finishes the
//! saga; a coordinator whose lease was taken over cannot write any more.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use saga_coordinator::proto::{self, SagaState, StepState};
use tokio::sync::watch;

fn participants(url: &str) -> Vec<(String, String)> {
    vec![("svc".into(), url.into())]
}

/// A coordinator with a 1 s lease over one participant `svc`, and an
/// "abc" definition of three idempotent, compensatable steps registered.
async fn three_idempotent_steps(
    store: Store,
) -> (
    TestDb,
    Scripted,
    saga_coordinator::config::Config,
    TestCoordinator,
    Client,
) {
    let db = TestDb::on(store).await;
    let svc = Scripted::default();
    let url = svc.clone().serve().await;
    let mut cfg = test_config(&db);
    cfg.participants = participants(&url);
    cfg.lease_ttl_ms = 1_000;
    let first = TestCoordinator::start(cfg.clone()).await;
    let mut c1 = first.client().await;
    register(
        &mut c1,
        definition(
            "abc",
            vec![
                step("a", "svc", true, true),
                step("b", "svc", true, true),
                step("c", "svc", true, true),
            ],
        ),
    )
    .await;
    (db, svc, cfg, first, c1)
}

async fn a_crashed_coordinators_saga_is_finished_by_another_without_double_effects(store: Store) {
    // `_db` (not `_`) keeps the database until the test ends.
    let (_db, svc, cfg, first, mut c1) = three_idempotent_steps(store).await;
    let (gate, gate_rx) = watch::channel(false);
    svc.script(
        "b.do",
        vec![
            Reply::Block(gate_rx.clone(), r#"{"b":1}"#.into()),
            Reply::Block(gate_rx, r#"{"b":1}"#.into()),
        ],
    );
    let saga = start(&mut c1, "abc", "{}").await;
    svc.wait_calls("b.do", 1).await;

    first.crash().await;
    let second = TestCoordinator::start(cfg).await;
    let mut c2 = second.client().await;
    // The second coordinator claims the saga once the lease expires and
    // invokes b again with the same key; then b is released.
    svc.wait_calls("b.do", 2).await;
    gate.send(true).unwrap();
    let done = wait(&mut c2, &saga.saga_id).await;
    assert_eq!(state(&done), SagaState::Completed);
    let b_calls = svc.calls_to("b.do");
    assert!(b_calls
        .iter()
        .all(|c| c.req.idempotency_key == format!("{}/b/action", saga.saga_id)));
    assert!(
        svc.effects().values().all(|n| *n == 1),
        "no effect happened twice"
    );
    // a's success was not written before b was called (an idempotent
    // step's result waits for the next write), so the second coordinator
    // invokes a again, with the same key: the barrier gives its first
    // result back and nothing happens twice.
    let a_calls = svc.calls_to("a.do");
    assert_eq!(a_calls.len(), 2);
    assert!(a_calls
        .iter()
        .all(|c| c.req.idempotency_key == format!("{}/a/action", saga.saga_id)));
    assert_eq!(svc.calls_to("c.do").len(), 1);
    let k = kinds(&events(&mut c2, &saga.saga_id).await);
    assert_eq!(
        k.iter().filter(|k| *k == "step_succeeded").count(),
        3,
        "{k:?}"
    );
    let metrics = http(second.admin, "GET", "/metrics", &[], "").await.body;
    assert!(
        metrics.contains("sagad_lease_takeovers_total 1\n"),
        "the takeover is counted: {metrics}"
    );
    second.shutdown().await;
}

async fn steps_a_lost_coordinator_reached_without_writing_are_compensated(store: Store) {
    // `_db` (not `_`) keeps the database until the test ends.
    let (_db, svc, cfg, first, mut c1) = three_idempotent_steps(store).await;
    // The first coordinator gets a and b done (results not written yet:
    // idempotent results wait for the next write) and dies calling c.
    // Then b's service goes down for the second coordinator.
    let (_gate, gate_rx) = watch::channel(false);
    svc.script("c.do", vec![Reply::Block(gate_rx, "{}".into())]);
    svc.script(
        "b.do",
        vec![
            Reply::Succeed("{}".into()),
            Reply::Status(tonic::Code::Unavailable),
            Reply::Status(tonic::Code::Unavailable),
            Reply::Status(tonic::Code::Unavailable),
        ],
    );
    let saga = start(&mut c1, "abc", "{}").await;
    svc.wait_calls("c.do", 1).await;
    first.crash().await;

    let second = TestCoordinator::start(cfg).await;
    let mut c2 = second.client().await;
    let done = wait(&mut c2, &saga.saga_id).await;
    assert_eq!(state(&done), SagaState::Compensated);
    // The record showed only the start, so the second coordinator assumed
    // the first may have reached every step up to the next one that needs a
    // write (here: all of them). c, never answered, is compensated too.
    let undos: Vec<String> = svc
        .handlers()
        .into_iter()
        .filter(|h| h.ends_with(".undo"))
        .collect();
    assert_eq!(undos, vec!["c.undo", "b.undo", "a.undo"]);
    assert_eq!(svc.calls_to("a.do").len(), 2, "a invoked again, same key");
    second.shutdown().await;
}

async fn a_non_idempotent_step_in_flight_at_a_crash_has_an_unknown_outcome(store: Store) {
    let db = TestDb::on(store).await;
    let svc = Scripted::default();
    let url = svc.clone().serve().await;
    let mut cfg = test_config(&db);
    cfg.participants = participants(&url);
    cfg.lease_ttl_ms = 1_000;
    let first = TestCoordinator::start(cfg.clone()).await;
    let mut c1 = first.client().await;
    register(
        &mut c1,
        definition(
            "ab",
            vec![step("a", "svc", true, true), step("b", "svc", true, false)],
        ),
    )
    .await;
    let (_gate, gate_rx) = watch::channel(false);
    svc.script("b.do", vec![Reply::Block(gate_rx, "{}".into())]);
    let saga = start(&mut c1, "ab", "{}").await;
    svc.wait_calls("b.do", 1).await;
    first.crash().await;

    let second = TestCoordinator::start(cfg).await;
    let mut c2 = second.client().await;
    let done = wait(&mut c2, &saga.saga_id).await;
    // b may have taken effect and may not be invoked twice: compensate it.
    assert_eq!(state(&done), SagaState::Compensated);
    assert_eq!(
        svc.calls_to("b.do").len(),
        1,
        "a non-idempotent action is never re-invoked"
    );
    assert_eq!(
        svc.handlers()[2..],
        ["b.undo".to_string(), "a.undo".to_string()]
    );
    assert_eq!(
        step_states(&done),
        vec![StepState::Compensated, StepState::Compensated]
    );
    second.shutdown().await;
}

#[tokio::test]
async fn a_coordinator_whose_lease_was_taken_over_cannot_change_the_saga() {
    let db = TestDb::new().await;
    let svc = Scripted::default();
    let url = svc.clone().serve().await;
    let mut cfg = test_config(&db);
    cfg.participants = participants(&url);
    let first = TestCoordinator::start(cfg.clone()).await;
    let mut c1 = first.client().await;
    register(
        &mut c1,
        definition(
            "ab",
            vec![step("a", "svc", true, true), step("b", "svc", true, true)],
        ),
    )
    .await;
    let (gate, gate_rx) = watch::channel(false);
    svc.script(
        "b.do",
        vec![
            Reply::Block(gate_rx, r#""late""#.into()),
            Reply::Succeed(r#""fresh""#.into()),
        ],
    );
    let saga = start(&mut c1, "ab", "{}").await;
    svc.wait_calls("b.do", 1).await;

    // The first coordinator stalls (as in a long pause or a partition) past
    // its lease: simulate the expiry in the database, the clock that rules.
    let pool = db.pool().await;
    sqlx::query("UPDATE sagas SET lease_until = now() - interval '1 second', next_run_at = now() - interval '1 second'")
        .execute(&pool)
        .await
        .unwrap();
    let second = TestCoordinator::start(cfg).await;
    let mut c2 = second.client().await;
    let done = wait(&mut c2, &saga.saga_id).await;
    assert_eq!(state(&done), SagaState::Completed);
    assert_eq!(done.steps[1].output_json, r#""fresh""#);
    let events_before = events(&mut c2, &saga.saga_id).await.len();

    // The stalled call returns; the first coordinator tries to save it.
    // Its graceful shutdown waits for that attempt to end.
    gate.send(true).unwrap();
    first.shutdown().await;
    let after = c2
        .get_saga(proto::GetSagaRequest {
            saga_id: saga.saga_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .saga
        .unwrap();
    assert_eq!(
        after.steps[1].output_json, r#""fresh""#,
        "the stale owner's result was fenced out"
    );
    assert_eq!(events(&mut c2, &saga.saga_id).await.len(), events_before);
    second.shutdown().await;
}

/// Leases are renewed in the background, so a step whose timeout is ten
/// minutes does not hold its saga that long after its coordinator dies:
/// another takes over within the lease (1 s) plus a poll (0.2 s) and a
/// margin for this machine.
#[tokio::test]
async fn a_crashed_coordinators_long_call_is_taken_over_within_the_lease() {
    let db = TestDb::new().await;
    let svc = Scripted::default();
    let url = svc.clone().serve().await;
    let mut cfg = test_config(&db);
    cfg.participants = participants(&url);
    cfg.lease_ttl_ms = 1_000;
    let first = TestCoordinator::start(cfg.clone()).await;
    let second = TestCoordinator::start(cfg).await;
    let mut c1 = first.client().await;
    let mut slow = step("a", "svc", true, true);
    slow.timeout = Some(ms(600_000));
    register(&mut c1, definition("slow", vec![slow])).await;
    svc.script("a.do", vec![Reply::Hang, Reply::Succeed("{}".into())]);
    let saga = start(&mut c1, "slow", "{}").await;
    svc.wait_calls("a.do", 1).await;
    // Several renewals while the call hangs: the lease is not taken.
    let held = std::time::Instant::now();
    while held.elapsed() < Duration::from_millis(2_500) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(svc.calls_to("a.do").len(), 1, "taken over while renewed");
    }
    let crashed = std::time::Instant::now();
    first.crash().await;
    svc.wait_calls("a.do", 2).await;
    let calls = svc.calls_to("a.do");
    let took = calls[1].at.duration_since(crashed);
    assert!(
        calls[0].req.lease_epoch >= 1,
        "calls carry their lease's epoch"
    );
    assert!(
        calls[1].req.lease_epoch > calls[0].req.lease_epoch,
        "a takeover's is newer"
    );
    assert!(
        took < Duration::from_millis(1_000 + 200 + 2_000),
        "taken over after {took:?}, not within the lease plus a poll"
    );
    let mut c2 = second.client().await;
    assert_eq!(
        state(&wait(&mut c2, &saga.saga_id).await),
        SagaState::Completed
    );
    second.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_releases_sagas_for_others_at_once() {
    let db = TestDb::new().await;
    let svc = Scripted::default();
    let url = svc.clone().serve().await;
    let mut cfg = test_config(&db);
    cfg.participants = participants(&url);
    // A lease far longer than the test: only a release lets the second
    // coordinator continue.
    cfg.lease_ttl_ms = 600_000;
    let first = TestCoordinator::start(cfg.clone()).await;
    let mut c1 = first.client().await;
    register(
        &mut c1,
        definition(
            "ab",
            vec![step("a", "svc", true, true), step("b", "svc", true, true)],
        ),
    )
    .await;
    let (gate, gate_rx) = watch::channel(false);
    svc.script("a.do", vec![Reply::Block(gate_rx, "{}".into())]);
    let saga = start(&mut c1, "ab", "{}").await;
    svc.wait_calls("a.do", 1).await;
    // Shut down while a's call is in flight; the call finishes within the
    // grace period, its result is saved, and the saga is released. The gate
    // opens once the shutdown has begun (health turns NOT_SERVING, or the
    // stream ends), so a's answer arrives at a stopping coordinator.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", first.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: "saga.v1.CoordinatorService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    assert_eq!(watch.message().await.unwrap().unwrap().status, serving);
    let stopping = tokio::spawn(first.shutdown());
    while let Ok(Some(m)) = watch.message().await {
        if m.status != serving {
            break;
        }
    }
    gate.send(true).unwrap();
    stopping.await.unwrap();
    assert!(
        svc.calls_to("b.do").is_empty(),
        "a stopping coordinator starts no new step"
    );

    let second = TestCoordinator::start(cfg).await;
    let mut c2 = second.client().await;
    let done = wait(&mut c2, &saga.saga_id).await;
    assert_eq!(state(&done), SagaState::Completed);
    assert_eq!(
        svc.calls_to("a.do").len(),
        1,
        "a's result survived the shutdown"
    );
    second.shutdown().await;
}

/// Recovery after a crash runs on PostgreSQL and on SQLite (one node: the
/// next coordinator starts after the crashed one is gone).
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(#[tokio::test] async fn $name() { super::$name(super::Store::Postgres).await; })*
        }
        mod sqlite {
            $(#[tokio::test] async fn $name() { super::$name(super::Store::Sqlite).await; })*
        }
    };
}

on_both_stores!(
    a_crashed_coordinators_saga_is_finished_by_another_without_double_effects,
    steps_a_lost_coordinator_reached_without_writing_are_compensated,
    a_non_idempotent_step_in_flight_at_a_crash_has_an_unknown_outcome,
);
