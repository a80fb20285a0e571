//! End-to-end: real `sagad` on 127.0.0.1, on real PostgreSQL and on a real
//! SQLite file, scripted tonic participants. One test per behaviour of
//! DESIGN.md's execution contract, each run on both stores.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use saga_coordinator::proto::{self, SagaState, StepState};
use tonic::Code;

// Fields drop in order: the coordinator before its database.
struct Env {
    coord: TestCoordinator,
    client: Client,
    svc: Scripted,
    _db: TestDb,
}

async fn env(store: Store) -> Env {
    let db = TestDb::on(store).await;
    let svc = Scripted::default();
    let url = svc.clone().serve().await;
    let mut cfg = test_config(&db);
    cfg.participants = vec![("svc".into(), url)];
    let coord = TestCoordinator::start(cfg).await;
    let client = coord.client().await;
    Env {
        _db: db,
        coord,
        client,
        svc,
    }
}

/// a, b, c: compensatable, idempotent.
fn abc() -> proto::SagaDefinition {
    definition(
        "abc",
        vec![
            step("a", "svc", true, true),
            step("b", "svc", true, true),
            step("c", "svc", true, true),
        ],
    )
}

async fn happy_path_passes_input_and_outputs_forward(store: Store) {
    let mut e = env(store).await;
    register(&mut e.client, abc()).await;
    let saga = start(&mut e.client, "abc", r#"{"order": 7}"#).await;
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&saga), SagaState::Completed);
    assert_eq!(step_states(&saga), vec![StepState::Succeeded; 3]);
    assert_eq!(e.svc.handlers(), vec!["a.do", "b.do", "c.do"]);
    let c = &e.svc.calls_to("c.do")[0].req;
    assert_eq!(c.input_json, r#"{"order": 7}"#);
    assert_eq!(c.outputs_json.len(), 2, "c sees the outputs of a and b");
    assert!(c.outputs_json["a"].contains("a.do"));
    assert_eq!(c.idempotency_key, format!("{}/c/action", saga.saga_id));
    assert_eq!(c.attempt, 1);
    assert_eq!(
        proto::Phase::try_from(c.phase).unwrap(),
        proto::Phase::Action
    );
    assert!(saga.steps[2].output_json.contains("c.do"));
    let k = kinds(&events(&mut e.client, &saga.saga_id).await);
    assert_eq!(
        k,
        vec![
            "started",
            "step_succeeded",
            "step_succeeded",
            "step_succeeded",
            "completed"
        ]
    );
}

async fn refusal_compensates_earlier_steps_in_reverse_not_the_refused_one(store: Store) {
    let mut e = env(store).await;
    register(&mut e.client, abc()).await;
    e.svc
        .script("c.do", vec![Reply::Fail("card declined".into())]);
    let saga = start(&mut e.client, "abc", "{}").await;
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&saga), SagaState::Compensated);
    assert_eq!(
        e.svc.handlers(),
        vec!["a.do", "b.do", "c.do", "b.undo", "a.undo"]
    );
    assert_eq!(
        step_states(&saga),
        vec![
            StepState::Compensated,
            StepState::Compensated,
            StepState::Failed
        ]
    );
    assert!(saga.error.contains("card declined"), "{}", saga.error);
    let undo_b = &e.svc.calls_to("b.undo")[0].req;
    assert!(
        undo_b.action_output_json.contains("b.do"),
        "compensation gets its action's output"
    );
    assert!(
        undo_b.outputs_json.contains_key("a"),
        "compensation gets earlier outputs"
    );
    assert_eq!(
        undo_b.idempotency_key,
        format!("{}/b/compensation", saga.saga_id)
    );
}

/// After an unknown outcome, a refusal does not prove the step never took
/// effect (the earlier attempt may still land): it is compensated too.
async fn refusal_after_an_unknown_outcome_compensates_the_refused_step_too(store: Store) {
    let mut e = env(store).await;
    register(&mut e.client, abc()).await;
    e.svc.script(
        "c.do",
        vec![
            Reply::Status(Code::DeadlineExceeded),
            Reply::Fail("card declined".into()),
        ],
    );
    let saga = start(&mut e.client, "abc", "{}").await;
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&saga), SagaState::Compensated);
    assert_eq!(
        e.svc.handlers(),
        vec!["a.do", "b.do", "c.do", "c.do", "c.undo", "b.undo", "a.undo"]
    );
}

async fn outcome_retry_is_retried_even_when_not_idempotent(store: Store) {
    let mut e = env(store).await;
    let mut def = abc();
    def.steps[1].idempotent = false;
    register(&mut e.client, def).await;
    e.svc.script(
        "b.do",
        vec![Reply::Retry("busy".into()), Reply::Retry("busy".into())],
    );
    let saga = start(&mut e.client, "abc", "{}").await;
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&saga), SagaState::Completed);
    assert_eq!(saga.steps[1].attempts, 3);
    let calls = e.svc.calls_to("b.do");
    assert_eq!(
        calls.iter().map(|c| c.req.attempt).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(calls
        .iter()
        .all(|c| c.req.idempotency_key == calls[0].req.idempotency_key));
}

async fn outcome_retry_budget_spent_compensates_earlier_steps_only(store: Store) {
    let mut e = env(store).await;
    register(&mut e.client, abc()).await;
    e.svc.script("b.do", vec![Reply::Retry("busy".into()); 3]);
    let saga = start(&mut e.client, "abc", "{}").await;
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&saga), SagaState::Compensated);
    assert_eq!(
        step_states(&saga)[..2],
        [StepState::Compensated, StepState::Failed]
    );
    assert!(
        e.svc.calls_to("b.undo").is_empty(),
        "nothing took effect: b is not compensated"
    );
    assert_eq!(e.svc.calls_to("a.undo").len(), 1);
}

async fn transient_errors_are_retried_for_idempotent_steps(store: Store) {
    let mut e = env(store).await;
    register(&mut e.client, abc()).await;
    e.svc.script(
        "b.do",
        vec![
            Reply::Status(Code::Unavailable),
            Reply::Status(Code::Internal),
        ],
    );
    let saga = start(&mut e.client, "abc", "{}").await;
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&saga), SagaState::Completed);
    assert_eq!(saga.steps[1].attempts, 3);
}

async fn every_transient_code_is_retried(store: Store) {
    let mut e = env(store).await;
    let mut def = definition("one", vec![step("a", "svc", true, true)]);
    def.steps[0].retry.as_mut().unwrap().max_attempts = 8;
    register(&mut e.client, def).await;
    let codes = [
        Code::Unavailable,
        Code::DeadlineExceeded,
        Code::ResourceExhausted,
        Code::Aborted,
        Code::Cancelled,
        Code::Internal,
        Code::Unknown,
    ];
    e.svc
        .script("a.do", codes.iter().map(|c| Reply::Status(*c)).collect());
    let saga = start(&mut e.client, "one", "{}").await;
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&saga), SagaState::Completed);
    assert_eq!(saga.steps[0].attempts, 8);
}

async fn unknown_outcome_of_non_idempotent_step_compensates_it_too(store: Store) {
    let mut e = env(store).await;
    let mut def = abc();
    def.steps[1].idempotent = false;
    register(&mut e.client, def).await;
    e.svc.script("b.do", vec![Reply::Status(Code::Unavailable)]);
    let saga = start(&mut e.client, "abc", "{}").await;
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&saga), SagaState::Compensated);
    assert_eq!(e.svc.handlers(), vec!["a.do", "b.do", "b.undo", "a.undo"]);
    assert_eq!(saga.steps[1].attempts, 1, "not idempotent: not retried");
    assert_eq!(
        step_states(&saga)[..2],
        [StepState::Compensated, StepState::Compensated]
    );
}

async fn unknown_outcome_with_budget_spent_compensates_it_too(store: Store) {
    let mut e = env(store).await;
    register(&mut e.client, abc()).await;
    e.svc
        .script("b.do", vec![Reply::Status(Code::Unavailable); 3]);
    let saga = start(&mut e.client, "abc", "{}").await;
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&saga), SagaState::Compensated);
    assert_eq!(
        e.svc.handlers(),
        vec!["a.do", "b.do", "b.do", "b.do", "b.undo", "a.undo"]
    );
}

async fn unknown_outcome_at_or_after_the_pivot_suspends(store: Store) {
    let mut e = env(store).await;
    // a compensatable, p pivot (not idempotent), r retriable.
    let def = definition(
        "piv",
        vec![
            step("a", "svc", true, true),
            step("p", "svc", false, false),
            step("r", "svc", false, true),
        ],
    );
    register(&mut e.client, def).await;
    e.svc.script("p.do", vec![Reply::Status(Code::Unavailable)]);
    let saga = start(&mut e.client, "piv", "{}").await;
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&saga), SagaState::Suspended);
    assert!(
        e.svc.calls_to("a.undo").is_empty(),
        "a pivot that may have applied is never compensated"
    );
    assert!(saga.error.contains("not idempotent"), "{}", saga.error);

    // A retriable step that keeps failing transiently suspends too.
    e.svc
        .script("r.do", vec![Reply::Status(Code::Unavailable); 3]);
    let saga = start(&mut e.client, "piv", "{}").await;
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&saga), SagaState::Suspended);
    assert_eq!(saga.steps[2].attempts, 3);
}

/// "Not now" speaks for one attempt: after an unknown outcome the pivot may
/// still have taken effect (that attempt may land late), so running out of
/// attempts on "not now" suspends instead of compensating around it.
async fn not_now_after_an_unknown_pivot_suspends(store: Store) {
    let mut e = env(store).await;
    let def = definition(
        "piv2",
        vec![step("a", "svc", true, true), step("p", "svc", false, true)],
    );
    register(&mut e.client, def).await;
    e.svc.script(
        "p.do",
        vec![
            Reply::Status(Code::Unavailable),
            Reply::Retry("busy".into()),
            Reply::Retry("busy".into()),
        ],
    );
    let saga = start(&mut e.client, "piv2", "{}").await;
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&saga), SagaState::Suspended, "{}", saga.error);
    assert!(saga.error.contains("outcome is unknown"), "{}", saga.error);
    assert!(
        e.svc.calls_to("a.undo").is_empty(),
        "a pivot that may have applied is never compensated around"
    );
}

async fn refusal_after_the_pivot_suspends(store: Store) {
    let mut e = env(store).await;
    let def = definition(
        "piv",
        vec![
            step("a", "svc", true, true),
            step("p", "svc", false, true),
            step("r", "svc", false, true),
        ],
    );
    register(&mut e.client, def).await;
    e.svc.script("r.do", vec![Reply::Fail("no".into())]);
    let saga = start(&mut e.client, "piv", "{}").await;
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&saga), SagaState::Suspended);
    assert_eq!(saga.steps[2].attempts, 1, "a refusal is not retried");
    assert!(e.svc.calls_to("a.undo").is_empty());
}

async fn misconfiguration_codes_suspend_at_once(store: Store) {
    let mut e = env(store).await;
    register(&mut e.client, abc()).await;
    for (code, name) in [
        (Code::Unimplemented, "UNIMPLEMENTED"),
        (Code::InvalidArgument, "INVALID_ARGUMENT"),
        (Code::NotFound, "NOT_FOUND"),
        (Code::FailedPrecondition, "FAILED_PRECONDITION"),
        (Code::OutOfRange, "OUT_OF_RANGE"),
        (Code::PermissionDenied, "PERMISSION_DENIED"),
        (Code::Unauthenticated, "UNAUTHENTICATED"),
        (Code::DataLoss, "DATA_LOSS"),
    ] {
        e.svc.script("b.do", vec![Reply::Status(code)]);
        let saga = start(&mut e.client, "abc", "{}").await;
        let saga = wait(&mut e.client, &saga.saga_id).await;
        assert_eq!(state(&saga), SagaState::Suspended, "{code:?}");
        assert_eq!(saga.steps[1].attempts, 1, "{code:?}: not retried");
        assert!(
            saga.steps[1].last_error.starts_with(name),
            "{code:?}: {}",
            saga.steps[1].last_error
        );
    }
    assert!(
        e.svc.calls_to("a.undo").is_empty(),
        "a bad deployment does not abort sagas wholesale"
    );
}

async fn compensation_answers_follow_the_table(store: Store) {
    let mut e = env(store).await;
    register(&mut e.client, abc()).await;
    // FAILED counts as RETRY, transient is retried: then it succeeds.
    e.svc.script("c.do", vec![Reply::Fail("no".into())]);
    e.svc.script(
        "b.undo",
        vec![
            Reply::Fail("cannot refuse".into()),
            Reply::Status(Code::Unavailable),
        ],
    );
    let saga = start(&mut e.client, "abc", "{}").await;
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&saga), SagaState::Compensated);
    assert_eq!(saga.steps[1].compensation_attempts, 3);

    // Budget spent: suspended, and a is not compensated before b.
    e.svc.script("c.do", vec![Reply::Fail("no".into())]);
    e.svc
        .script("b.undo", vec![Reply::Retry("later".into()); 3]);
    let saga = start(&mut e.client, "abc", "{}").await;
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&saga), SagaState::Suspended);
    assert_eq!(
        e.svc.calls_to("a.undo").len(),
        1,
        "only the first saga's a.undo"
    );

    // Misconfiguration: suspended at once.
    e.svc.script("c.do", vec![Reply::Fail("no".into())]);
    e.svc
        .script("b.undo", vec![Reply::Status(Code::Unimplemented)]);
    let saga = start(&mut e.client, "abc", "{}").await;
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&saga), SagaState::Suspended);
    assert_eq!(saga.steps[1].compensation_attempts, 1);
}

async fn retries_count_and_back_off_within_the_policy(store: Store) {
    let mut e = env(store).await;
    let mut def = definition("one", vec![step("a", "svc", true, true)]);
    def.steps[0].retry = Some(proto::RetryPolicy {
        max_attempts: 4,
        initial_backoff: Some(ms(40)),
        multiplier: 2.0,
        max_backoff: Some(ms(100)),
    });
    register(&mut e.client, def).await;
    e.svc
        .script("a.do", vec![Reply::Status(Code::Unavailable); 3]);
    let saga = start(&mut e.client, "one", "{}").await;
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&saga), SagaState::Completed);
    let calls = e.svc.calls_to("a.do");
    assert_eq!(calls.len(), 4);
    // Full jitter: each wait is in [0, cap); caps 40, 80, 100 ms. Allow
    // generous scheduling slack above the cap, none below zero.
    let caps = [40u64, 80, 100];
    for (i, pair) in calls.windows(2).enumerate() {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(
            gap <= Duration::from_millis(caps[i] + 400),
            "wait {i} was {gap:?}, cap {} ms",
            caps[i]
        );
    }
    // The scheduled time is recorded, and within the cap of the attempt.
    let evs = events(&mut e.client, &saga.saga_id).await;
    let retries: Vec<_> = evs.iter().filter(|e| e.kind == "step_retry").collect();
    assert_eq!(retries.len(), 3);
    for (i, ev) in retries.iter().enumerate() {
        let at = ev.at.as_ref().unwrap();
        let next = ev.detail.rsplit("next attempt at ").next().unwrap();
        let next = chrono::DateTime::parse_from_rfc3339(next).unwrap();
        let at = chrono::DateTime::from_timestamp(at.seconds, at.nanos as u32).unwrap();
        let wait = (next.with_timezone(&chrono::Utc) - at).num_milliseconds();
        assert!(
            (-5..=caps[i] as i64 + 5).contains(&wait),
            "retry {i}: scheduled {wait} ms after"
        );
    }
}

async fn a_hanging_call_times_out_per_attempt(store: Store) {
    let mut e = env(store).await;
    let mut def = definition("one", vec![step("a", "svc", true, true)]);
    def.steps[0].timeout = Some(ms(150));
    register(&mut e.client, def).await;
    e.svc
        .script("a.do", vec![Reply::Hang, Reply::Hang, Reply::Hang]);
    let saga = start(&mut e.client, "one", "{}").await;
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(
        state(&saga),
        SagaState::Compensated,
        "unknown outcome, budget spent: compensated"
    );
    assert_eq!(saga.steps[0].attempts, 3);
    assert!(
        saga.steps[0].last_error.is_empty(),
        "cleared once compensated"
    );
    assert_eq!(e.svc.calls_to("a.undo").len(), 1);
    let evs = events(&mut e.client, &saga.saga_id).await;
    assert!(
        evs.iter()
            .any(|e| e.kind == "step_unknown" && e.detail.contains("DEADLINE_EXCEEDED")),
        "{evs:#?}"
    );
    let sent = e.svc.calls_to("a.do")[0].req.deadline.unwrap();
    assert!(
        sent.seconds > 0,
        "the participant is told when the coordinator stops waiting"
    );
}

async fn the_saga_deadline_compensates_before_the_pivot(store: Store) {
    let mut e = env(store).await;
    let mut def = abc();
    def.deadline = Some(ms(400));
    register(&mut e.client, def).await;
    e.svc.script("b.do", vec![Reply::Hang]);
    let saga = start(&mut e.client, "abc", "{}").await;
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&saga), SagaState::Compensated);
    assert!(saga.error.contains("deadline"), "{}", saga.error);
    // b's call was cut by the deadline: its outcome is unknown, so b is
    // compensated too, after which a.
    assert_eq!(e.svc.handlers(), vec!["a.do", "b.do", "b.undo", "a.undo"]);
    let k = kinds(&events(&mut e.client, &saga.saga_id).await);
    assert!(k.contains(&"deadline_exceeded".to_string()), "{k:?}");
}

async fn operator_retry_resumes_a_suspended_saga(store: Store) {
    let mut e = env(store).await;
    register(&mut e.client, abc()).await;
    e.svc
        .script("b.do", vec![Reply::Status(Code::Unimplemented)]);
    let saga = start(&mut e.client, "abc", "{}").await;
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&saga), SagaState::Suspended);
    let mut req = tonic::Request::new(proto::RetrySagaRequest {
        saga_id: saga.saga_id.clone(),
        note: "deployed fix".into(),
    });
    req.metadata_mut()
        .insert("x-saga-actor", "alice".parse().unwrap());
    e.client.retry_saga(req).await.unwrap();
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&saga), SagaState::Completed);
    assert_eq!(saga.steps[1].attempts, 2);
    let evs = events(&mut e.client, &saga.saga_id).await;
    let retry = evs.iter().find(|e| e.kind == "operator_retry").unwrap();
    assert_eq!(retry.detail, "by alice: deployed fix");
}

async fn operator_abort_only_before_the_pivot(store: Store) {
    let mut e = env(store).await;
    let def = definition(
        "piv",
        vec![
            step("a", "svc", true, true),
            step("p", "svc", false, true),
            step("r", "svc", false, true),
        ],
    );
    register(&mut e.client, def).await;

    // Suspended at the pivot, which never took effect: abort compensates a.
    e.svc
        .script("p.do", vec![Reply::Status(Code::PermissionDenied)]);
    let saga = start(&mut e.client, "piv", "{}").await;
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&saga), SagaState::Suspended);
    e.client
        .abort_saga(proto::AbortSagaRequest {
            saga_id: saga.saga_id.clone(),
            note: "give up".into(),
        })
        .await
        .unwrap();
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&saga), SagaState::Compensated);
    assert_eq!(e.svc.calls_to("a.undo").len(), 1);

    // Suspended after the pivot: abort is refused and changes nothing.
    e.svc.script("r.do", vec![Reply::Fail("no".into())]);
    let saga = start(&mut e.client, "piv", "{}").await;
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&saga), SagaState::Suspended);
    let before = events(&mut e.client, &saga.saga_id).await.len();
    let err = e
        .client
        .abort_saga(proto::AbortSagaRequest {
            saga_id: saga.saga_id.clone(),
            note: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("pivot"), "{}", err.message());
    assert_eq!(events(&mut e.client, &saga.saga_id).await.len(), before);
}

async fn operator_abort_of_a_running_saga_compensates_the_step_in_flight(store: Store) {
    let mut e = env(store).await;
    register(&mut e.client, abc()).await;
    let (gate, gate_rx) = tokio::sync::watch::channel(false);
    e.svc
        .script("b.do", vec![Reply::Block(gate_rx, "{}".into())]);
    let saga = start(&mut e.client, "abc", "{}").await;
    e.svc.wait_calls("b.do", 1).await;
    e.client
        .abort_saga(proto::AbortSagaRequest {
            saga_id: saga.saga_id.clone(),
            note: "customer cancelled".into(),
        })
        .await
        .unwrap();
    let done = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&done), SagaState::Compensated);
    // a's success was not written yet (idempotent results wait for the next
    // write), so the abort assumes its owner may have reached any step up to
    // the next one that needs a write: c is compensated too, a null
    // compensation, harmless by contract. In reverse order, each once.
    assert_eq!(
        e.svc.handlers(),
        vec!["a.do", "b.do", "c.undo", "b.undo", "a.undo"]
    );
    gate.send(true).unwrap();
    // The late answer cannot change the saga: the abort fenced its owner out.
    e.coord.shutdown().await;
    let coord = TestCoordinator::start(test_config(&e._db)).await;
    let mut c = coord.client().await;
    let after = c
        .get_saga(proto::GetSagaRequest {
            saga_id: saga.saga_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .saga
        .unwrap();
    assert_eq!(state(&after), SagaState::Compensated);
    assert_eq!(step_states(&after), step_states(&done));
}

async fn resolve_needs_a_note_and_a_suspended_saga(store: Store) {
    let mut e = env(store).await;
    register(&mut e.client, abc()).await;
    e.svc
        .script("a.do", vec![Reply::Status(Code::Unimplemented)]);
    let saga = start(&mut e.client, "abc", "{}").await;
    let saga = wait(&mut e.client, &saga.saga_id).await;
    let before = events(&mut e.client, &saga.saga_id).await.len();
    let err = e
        .client
        .resolve_saga(proto::ResolveSagaRequest {
            saga_id: saga.saga_id.clone(),
            note: "  ".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("note:"), "{}", err.message());
    assert_eq!(
        events(&mut e.client, &saga.saga_id).await.len(),
        before,
        "nothing written"
    );
    let done = e
        .client
        .resolve_saga(proto::ResolveSagaRequest {
            saga_id: saga.saga_id.clone(),
            note: "refunded by hand".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .saga
        .unwrap();
    assert_eq!(state(&done), SagaState::Resolved);
    let evs = events(&mut e.client, &saga.saga_id).await;
    assert_eq!(evs.last().unwrap().kind, "operator_resolve");
    assert!(evs.last().unwrap().detail.contains("refunded by hand"));
    // Terminal: nothing more applies.
    let err = e
        .client
        .resolve_saga(proto::ResolveSagaRequest {
            saga_id: saga.saga_id.clone(),
            note: "again".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

async fn no_live_instance_is_transient_and_heartbeats_register_endpoints(store: Store) {
    let mut e = env(store).await;
    let mut s = step("a", "ghost", false, true);
    s.retry.as_mut().unwrap().max_attempts = 2;
    register(&mut e.client, definition("ghost", vec![s])).await;
    let saga = start(&mut e.client, "ghost", "{}").await;
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&saga), SagaState::Suspended);
    assert_eq!(saga.steps[0].attempts, 2, "retried as transient");
    assert!(
        saga.steps[0].last_error.contains("no live instance"),
        "{}",
        saga.steps[0].last_error
    );

    // Register an instance by heartbeat; a retry now reaches it.
    let ghost = Scripted::default();
    let url = ghost.clone().serve().await;
    e.client
        .heartbeat(proto::HeartbeatRequest {
            participant: "ghost".into(),
            instance_id: "g1".into(),
            endpoint: url,
            ttl: Some(ms(60_000)),
            weight: 0,
        })
        .await
        .unwrap();
    e.client
        .retry_saga(proto::RetrySagaRequest {
            saga_id: saga.saga_id.clone(),
            note: String::new(),
        })
        .await
        .unwrap();
    let saga = wait(&mut e.client, &saga.saga_id).await;
    assert_eq!(state(&saga), SagaState::Completed);
    assert_eq!(ghost.calls_to("a.do").len(), 1);
}

/// The caller keeps one channel per live participant instance: when an
/// instance withdraws (or its heartbeat lapses), the next registry refresh
/// drops its channel, and calls go to the instances that remain.
#[tokio::test]
async fn channels_of_dead_participant_instances_are_dropped() {
    use std::sync::Arc;

    use saga_coordinator::domain::{
        CallResult, Defaults, DefinitionDraft, Phase, Saga, SagaId, StepDraft,
    };
    use saga_coordinator::participant::{CallerConfig, Invocation, Participants};
    use saga_coordinator::store::{pg::PgStore, SagaStore};

    let db = TestDb::new().await;
    let saga_coordinator::store::Database::Postgres(pool) =
        saga_coordinator::server::connect(&test_config(&db))
            .await
            .unwrap()
    else {
        panic!("not PostgreSQL")
    };
    let store: Arc<dyn SagaStore> = Arc::new(PgStore::with_write_lanes(pool, 1));
    let beat = |instance_id, endpoint, ttl| saga_coordinator::store::Heartbeat {
        participant: "svc",
        instance_id,
        endpoint,
        weight: 1,
        ttl,
    };
    let caller = Participants::new(
        CallerConfig {
            statics: Default::default(),
            discovery_cache: Duration::ZERO,
            connect_timeout: Duration::from_secs(2),
            json: saga_coordinator::domain::JsonLimits {
                bytes_max: 1 << 20,
                depth_max: 64,
            },
            tls: saga_coordinator::participant::client_tls(None, None),
            require_tls: false,
            token: None,
            balance: Default::default(),
        },
        store.clone(),
    )
    .unwrap();
    let (a, b) = (Scripted::default(), Scripted::default());
    let (url_a, url_b) = (a.clone().serve().await, b.clone().serve().await);
    let ttl = Duration::from_secs(60);
    store
        .participant_heartbeat(&beat("a", &url_a, ttl), None)
        .await
        .unwrap();
    store
        .participant_heartbeat(&beat("b", &url_b, ttl), None)
        .await
        .unwrap();

    let def = DefinitionDraft {
        name: "one".into(),
        steps: vec![StepDraft {
            name: "s".into(),
            participant: "svc".into(),
            action: "s.do".into(),
            idempotent: true,
            ..Default::default()
        }],
        deadline: None,
    }
    .validate(&Defaults::default())
    .unwrap();
    let now = chrono::Utc::now();
    let saga = Saga::new(SagaId(uuid::Uuid::new_v4()), &def, "{}".into(), now);
    let call = || Invocation {
        saga: &saga,
        def: &def,
        step: 0,
        phase: Phase::Action,
        attempt: 1,
        timeout: Duration::from_secs(5),
        deadline: now + chrono::Duration::seconds(5),
        arrive_by: now + chrono::Duration::seconds(5),
        lease_epoch: 1,
        send_by: std::time::Instant::now() + Duration::from_secs(5),
        traceparent: None,
    };
    for _ in 0..2 {
        assert!(matches!(
            caller.invoke(call()).await,
            Some(CallResult::Succeeded(_))
        ));
    }
    assert_eq!((a.calls().len(), b.calls().len()), (1, 1), "round robin");
    assert_eq!(caller.channels(), 2);

    // a withdraws (TTL 0): its channel goes at the next refresh.
    store
        .participant_heartbeat(&beat("a", &url_a, Duration::ZERO), None)
        .await
        .unwrap();
    for _ in 0..2 {
        assert!(matches!(
            caller.invoke(call()).await,
            Some(CallResult::Succeeded(_))
        ));
    }
    assert_eq!(caller.channels(), 1);
    assert_eq!((a.calls().len(), b.calls().len()), (1, 3));
}

/// Every behaviour above runs on PostgreSQL and on SQLite, through the same
/// harness.
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
    happy_path_passes_input_and_outputs_forward,
    refusal_compensates_earlier_steps_in_reverse_not_the_refused_one,
    refusal_after_an_unknown_outcome_compensates_the_refused_step_too,
    outcome_retry_is_retried_even_when_not_idempotent,
    outcome_retry_budget_spent_compensates_earlier_steps_only,
    transient_errors_are_retried_for_idempotent_steps,
    every_transient_code_is_retried,
    unknown_outcome_of_non_idempotent_step_compensates_it_too,
    unknown_outcome_with_budget_spent_compensates_it_too,
    unknown_outcome_at_or_after_the_pivot_suspends,
    not_now_after_an_unknown_pivot_suspends,
    refusal_after_the_pivot_suspends,
    misconfiguration_codes_suspend_at_once,
    compensation_answers_follow_the_table,
    retries_count_and_back_off_within_the_policy,
    a_hanging_call_times_out_per_attempt,
    the_saga_deadline_compensates_before_the_pivot,
    operator_retry_resumes_a_suspended_saga,
    operator_abort_only_before_the_pivot,
    operator_abort_of_a_running_saga_compensates_the_step_in_flight,
    resolve_needs_a_note_and_a_suspended_saga,
    no_live_instance_is_transient_and_heartbeats_register_endpoints,
);
