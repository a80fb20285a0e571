//! The gRPC API's contract: validation (status code, the field named, and
//! nothing written), definition versions, idempotent start, listing.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use saga_coordinator::proto::{self, SagaState};
use tonic::Code;

struct Env {
    coord: TestCoordinator,
    client: Client,
    svc: Scripted,
    db: TestDb,
}

async fn env() -> Env {
    env_with(|_| {}).await
}

/// A coordinator with one participant `svc`, with `tweak` applied to the
/// test configuration.
async fn env_with(tweak: impl FnOnce(&mut saga_coordinator::config::Config)) -> Env {
    let db = TestDb::new().await;
    let svc = Scripted::default();
    let url = svc.clone().serve().await;
    let mut cfg = test_config(&db);
    cfg.participants = vec![("svc".into(), url)];
    tweak(&mut cfg);
    let coord = TestCoordinator::start(cfg).await;
    let client = coord.client().await;
    Env {
        coord,
        client,
        svc,
        db,
    }
}

async fn count(db: &TestDb, table: &str) -> i64 {
    let pool = db.pool().await;
    let n: (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    n.0
}

fn valid() -> proto::SagaDefinition {
    definition(
        "order",
        vec![
            step("reserve", "svc", true, true),
            step("charge", "svc", false, false),
            step("ship", "svc", false, true),
        ],
    )
}

#[tokio::test]
async fn invalid_definitions_are_refused_naming_the_field_and_nothing_is_written() {
    let mut e = env().await;
    type Edit = fn(&mut proto::SagaDefinition);
    let cases: Vec<(&str, Edit)> = vec![
        ("definition.name", |d| d.name.clear()),
        ("definition.name", |d| d.name = "bad name!".into()),
        ("definition.name", |d| d.name = "x".repeat(200)),
        ("definition.steps", |d| d.steps.clear()),
        ("definition.steps", |d| {
            d.steps = (0..101)
                .map(|i| step(&format!("s{i}"), "svc", true, true))
                .collect()
        }),
        ("definition.steps[1].name", |d| {
            d.steps[1].name = "reserve".into()
        }),
        ("definition.steps[0].name", |d| d.steps[0].name.clear()),
        ("definition.steps[0].participant", |d| {
            d.steps[0].participant.clear()
        }),
        ("definition.steps[0].action", |d| d.steps[0].action.clear()),
        ("definition.steps[0].compensation", |d| {
            d.steps[0].compensation = "un do".into()
        }),
        ("definition.steps[0].timeout", |d| {
            d.steps[0].timeout = Some(ms(0))
        }),
        ("definition.steps[0].timeout", |d| {
            d.steps[0].timeout = Some(prost_types::Duration {
                seconds: 7_200,
                nanos: 0,
            })
        }),
        ("definition.steps[0].timeout", |d| {
            d.steps[0].timeout = Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            })
        }),
        ("definition.steps[0].retry.max_attempts", |d| {
            d.steps[0].retry.as_mut().unwrap().max_attempts = 5_000
        }),
        ("definition.steps[0].retry.multiplier", |d| {
            d.steps[0].retry.as_mut().unwrap().multiplier = 0.5
        }),
        ("definition.steps[0].retry.multiplier", |d| {
            d.steps[0].retry.as_mut().unwrap().multiplier = f64::NAN
        }),
        ("definition.steps[0].retry.initial_backoff", |d| {
            d.steps[0].retry.as_mut().unwrap().initial_backoff = Some(ms(0))
        }),
        ("definition.steps[0].retry.max_backoff", |d| {
            d.steps[0].retry.as_mut().unwrap().max_backoff = Some(ms(1))
        }),
        ("definition.steps[0].compensation_retry.max_attempts", |d| {
            d.steps[0].compensation_retry.as_mut().unwrap().max_attempts = 1_001
        }),
        ("definition.deadline", |d| d.deadline = Some(ms(0))),
        // Garcia-Molina order: a compensatable step after the pivot.
        ("definition.steps[2].compensation", |d| {
            d.steps[2].compensation = "ship.undo".into()
        }),
        // A step after the pivot must be idempotent.
        ("definition.steps[2].idempotent", |d| {
            d.steps[2].idempotent = false
        }),
    ];
    for (field, edit) in cases {
        let mut def = valid();
        edit(&mut def);
        let err = e
            .client
            .register_definition(proto::RegisterDefinitionRequest {
                definition: Some(def),
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{field}: {}",
            err.message()
        );
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "expected {field}, got {}",
            err.message()
        );
    }
    let err = e
        .client
        .register_definition(proto::RegisterDefinitionRequest { definition: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("definition:"));
    assert_eq!(count(&e.db, "saga_definitions").await, 0, "nothing written");
    assert!(e
        .client
        .list_definitions(proto::ListDefinitionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .definitions
        .is_empty());
}

#[tokio::test]
async fn the_order_error_names_the_step() {
    let mut e = env().await;
    let mut def = valid();
    def.steps[2].compensation = "ship.undo".into();
    let err = e
        .client
        .register_definition(proto::RegisterDefinitionRequest {
            definition: Some(def),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("\"ship\""), "{}", err.message());
    assert!(
        err.message().contains("\"charge\""),
        "names the pivot too: {}",
        err.message()
    );
}

#[tokio::test]
async fn identical_content_keeps_its_version_and_changes_get_the_next() {
    let mut e = env().await;
    let r = e
        .client
        .register_definition(proto::RegisterDefinitionRequest {
            definition: Some(valid()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.created);
    let v1 = r.definition.unwrap();
    assert_eq!(v1.version, 1);
    assert!(v1.created_at.is_some());
    // Defaults are resolved and returned.
    assert_eq!(v1.steps[1].retry.as_ref().unwrap().max_attempts, 3);

    let r = e
        .client
        .register_definition(proto::RegisterDefinitionRequest {
            definition: Some(valid()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.created);
    assert_eq!(r.definition.unwrap().version, 1);

    // Spelling out the defaults is the same content.
    let mut same = valid();
    same.steps[1].retry = v1.steps[1].retry;
    let r = e
        .client
        .register_definition(proto::RegisterDefinitionRequest {
            definition: Some(same),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.created, "explicit defaults are the same content");

    let mut changed = valid();
    changed.steps[0].timeout = Some(ms(1_234));
    let r = e
        .client
        .register_definition(proto::RegisterDefinitionRequest {
            definition: Some(changed),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.created);
    assert_eq!(r.definition.unwrap().version, 2);

    let latest = e
        .client
        .get_definition(proto::GetDefinitionRequest {
            name: "order".into(),
            version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(latest.definition.unwrap().version, 2);
    let first = e
        .client
        .get_definition(proto::GetDefinitionRequest {
            name: "order".into(),
            version: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.definition.unwrap().steps[0].timeout, Some(ms(5_000)));
    let err = e
        .client
        .get_definition(proto::GetDefinitionRequest {
            name: "order".into(),
            version: 9,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = e
        .client
        .get_definition(proto::GetDefinitionRequest {
            name: "".into(),
            version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let all = e
        .client
        .list_definitions(proto::ListDefinitionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .definitions;
    assert_eq!(
        all.iter().map(|d| d.version).collect::<Vec<_>>(),
        vec![1, 2]
    );
}

#[tokio::test]
async fn running_sagas_keep_the_version_they_started_on() {
    let mut e = env().await;
    register(
        &mut e.client,
        definition("d", vec![step("a", "svc", true, true)]),
    )
    .await;
    let (gate, gate_rx) = tokio::sync::watch::channel(false);
    e.svc
        .script("a.do", vec![Reply::Block(gate_rx, "{}".into())]);
    let s1 = start(&mut e.client, "d", "{}").await;
    e.svc.wait_calls("a.do", 1).await;
    register(
        &mut e.client,
        definition(
            "d",
            vec![step("a", "svc", true, true), step("b", "svc", true, true)],
        ),
    )
    .await;
    gate.send(true).unwrap();
    let s1 = wait(&mut e.client, &s1.saga_id).await;
    assert_eq!((s1.version, s1.steps.len()), (1, 1));
    let s2 = start(&mut e.client, "d", "{}").await;
    let s2 = wait(&mut e.client, &s2.saga_id).await;
    assert_eq!((s2.version, s2.steps.len()), (2, 2));
}

#[tokio::test]
async fn invalid_starts_are_refused_and_nothing_is_written() {
    let mut e = env().await;
    register(&mut e.client, valid()).await;
    let req = |f: fn(&mut proto::StartSagaRequest)| {
        let mut r = proto::StartSagaRequest {
            definition: "order".into(),
            input_json: "{}".into(),
            ..Default::default()
        };
        f(&mut r);
        r
    };
    let cases: Vec<(Code, &str, proto::StartSagaRequest)> = vec![
        (
            Code::InvalidArgument,
            "input_json",
            req(|r| r.input_json = "{not json".into()),
        ),
        (
            Code::InvalidArgument,
            "input_json",
            req(|r| r.input_json = format!("\"{}\"", "x".repeat(1 << 20))),
        ),
        (
            Code::InvalidArgument,
            "saga_id",
            req(|r| r.saga_id = "not-a-uuid".into()),
        ),
        (
            Code::InvalidArgument,
            "definition",
            req(|r| r.definition.clear()),
        ),
        (
            Code::NotFound,
            "definition",
            req(|r| r.definition = "nope".into()),
        ),
        (Code::NotFound, "definition", req(|r| r.version = 7)),
    ];
    for (code, field, r) in cases {
        let err = e.client.start_saga(r).await.unwrap_err();
        assert_eq!(err.code(), code, "{field}: {}", err.message());
        if code == Code::InvalidArgument {
            assert!(
                err.message().starts_with(&format!("{field}:")),
                "{}",
                err.message()
            );
        }
    }
    assert_eq!(count(&e.db, "sagas").await, 0);
    assert_eq!(count(&e.db, "saga_events").await, 0);
    assert!(e.svc.calls().is_empty());
}

#[tokio::test]
async fn ids_the_coordinator_chooses_are_time_ordered() {
    let mut e = env().await;
    register(&mut e.client, valid()).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let s = start(&mut e.client, "order", "{}").await;
        ids.push(uuid::Uuid::parse_str(&s.saga_id).unwrap());
    }
    assert!(ids.iter().all(|id| id.get_version_num() == 7), "{ids:?}");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
}

#[tokio::test]
async fn start_is_idempotent_on_a_caller_chosen_id() {
    let mut e = env().await;
    register(&mut e.client, valid()).await;
    let id = uuid::Uuid::new_v4().to_string();
    let start = |input: &str| proto::StartSagaRequest {
        definition: "order".into(),
        saga_id: id.clone(),
        input_json: input.into(),
        ..Default::default()
    };
    let first = e
        .client
        .start_saga(start(r#"{"a": 1, "b": [1, 2]}"#))
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    assert_eq!(first.saga.as_ref().unwrap().saga_id, id);
    // The same JSON value, spelled differently: the same saga.
    let again = e
        .client
        .start_saga(start(r#"{"b":[1,2],"a":1}"#))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.saga.unwrap().saga_id, id);
    let err = e.client.start_saga(start(r#"{"a": 2}"#)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(count(&e.db, "sagas").await, 1);
    wait(&mut e.client, &id).await;
    assert_eq!(e.svc.calls_to("reserve.do").len(), 1, "started once");
}

#[tokio::test]
async fn get_and_events_check_their_ids() {
    let mut e = env().await;
    let err = e
        .client
        .get_saga(proto::GetSagaRequest {
            saga_id: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let missing = uuid::Uuid::new_v4().to_string();
    let err = e
        .client
        .get_saga(proto::GetSagaRequest {
            saga_id: missing.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = e
        .client
        .get_saga_events(proto::GetSagaEventsRequest {
            saga_id: missing.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = e
        .client
        .wait_saga(proto::WaitSagaRequest {
            saga_id: missing,
            timeout: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = e
        .client
        .retry_saga(proto::RetrySagaRequest {
            saga_id: "zz".into(),
            note: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn wait_returns_the_saga_as_it_stands_after_its_timeout() {
    let mut e = env().await;
    register(
        &mut e.client,
        definition("d", vec![step("a", "svc", true, true)]),
    )
    .await;
    let (_gate, gate_rx) = tokio::sync::watch::channel(false);
    e.svc
        .script("a.do", vec![Reply::Block(gate_rx, "{}".into())]);
    let s = start(&mut e.client, "d", "{}").await;
    let got = e
        .client
        .wait_saga(proto::WaitSagaRequest {
            saga_id: s.saga_id,
            timeout: Some(ms(200)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&got.saga.unwrap()), SagaState::Running);
}

#[tokio::test]
async fn list_filters_and_pages() {
    let mut e = env().await;
    register(
        &mut e.client,
        definition("ok", vec![step("a", "svc", true, true)]),
    )
    .await;
    register(
        &mut e.client,
        definition("bad", vec![step("b", "svc", true, true)]),
    )
    .await;
    e.svc
        .script("b.do", vec![Reply::Status(Code::Unimplemented)]);
    let mut ids = Vec::new();
    for _ in 0..5 {
        let s = start(&mut e.client, "ok", "{}").await;
        wait(&mut e.client, &s.saga_id).await;
        ids.push(s.saga_id);
    }
    let bad = start(&mut e.client, "bad", "{}").await;
    wait(&mut e.client, &bad.saga_id).await;

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = e
            .client
            .list_sagas(proto::ListSagasRequest {
                definition: "ok".into(),
                page_size: 2,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.sagas.len() <= 2);
        seen.extend(page.sagas.into_iter().map(|s| s.saga_id));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 3);
    ids.reverse();
    assert_eq!(seen, ids, "newest first, each once");

    let suspended = e
        .client
        .list_sagas(proto::ListSagasRequest {
            states: vec![SagaState::Suspended as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        suspended
            .sagas
            .iter()
            .map(|s| s.saga_id.clone())
            .collect::<Vec<_>>(),
        vec![bad.saga_id.clone()]
    );
    let stuck = e
        .client
        .list_sagas(proto::ListSagasRequest {
            stuck_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stuck.sagas.len(), 1, "only the suspended saga is stuck");
    let completed = e
        .client
        .list_sagas(proto::ListSagasRequest {
            states: vec![SagaState::Completed as i32],
            definition: "bad".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(completed.sagas.is_empty());

    let err = e
        .client
        .list_sagas(proto::ListSagasRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("page_token:"));
    let err = e
        .client
        .list_sagas(proto::ListSagasRequest {
            states: vec![0],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.message().starts_with("states[0]:"), "{}", err.message());
}

#[tokio::test]
async fn heartbeats_are_validated() {
    let mut e = env().await;
    let hb = |f: fn(&mut proto::HeartbeatRequest)| {
        let mut r = proto::HeartbeatRequest {
            participant: "svc".into(),
            instance_id: "i1".into(),
            endpoint: "http://127.0.0.1:1".into(),
            ttl: Some(ms(5_000)),
            weight: 0,
        };
        f(&mut r);
        r
    };
    for (field, r) in [
        ("participant", hb(|r| r.participant.clear())),
        ("instance_id", hb(|r| r.instance_id.clear())),
        ("endpoint", hb(|r| r.endpoint = "127.0.0.1:1".into())),
        ("ttl", hb(|r| r.ttl = Some(ms(1)))),
    ] {
        let err = e.client.heartbeat(r).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "{}",
            err.message()
        );
    }
    assert_eq!(count(&e.db, "participant_instances").await, 0);
    e.client.heartbeat(hb(|_| {})).await.unwrap();
    assert_eq!(count(&e.db, "participant_instances").await, 1);
    let _ = &e.coord;
}

#[tokio::test]
async fn stuck_means_suspended_or_idle_or_retrying_beyond_a_threshold() {
    let db = TestDb::new().await;
    let svc = Scripted::default();
    let url = svc.clone().serve().await;
    let mut cfg = test_config(&db);
    cfg.participants = vec![("svc".into(), url)];
    cfg.stuck_attempts = 1;
    let coord = TestCoordinator::start(cfg.clone()).await;
    let mut c = coord.client().await;
    let mut s = step("a", "svc", true, true);
    s.retry = Some(proto::RetryPolicy {
        max_attempts: 5,
        initial_backoff: Some(ms(1)),
        multiplier: 1.0,
        max_backoff: Some(ms(1)),
    });
    register(&mut c, definition("d", vec![s])).await;
    let (_gate, gate_rx) = tokio::sync::watch::channel(false);
    // Saga x: one failed attempt, then blocked in the second: retrying.
    svc.script(
        "a.do",
        vec![
            Reply::Status(Code::Unavailable),
            Reply::Block(gate_rx.clone(), "{}".into()),
        ],
    );
    let x = start(&mut c, "d", "{}").await;
    svc.wait_calls("a.do", 2).await;
    // Saga y: blocked in its first attempt: progressing, not stuck.
    svc.script("a.do", vec![Reply::Block(gate_rx, "{}".into())]);
    let y = start(&mut c, "d", "{}").await;
    svc.wait_calls("a.do", 3).await;
    let stuck = c
        .list_sagas(proto::ListSagasRequest {
            stuck_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stuck
            .sagas
            .iter()
            .map(|s| s.saga_id.clone())
            .collect::<Vec<_>>(),
        vec![x.saga_id.clone()]
    );
    coord.crash().await;

    // With "no progress for 0 ms", every unsettled saga is stuck.
    cfg.stuck_after_ms = 0;
    cfg.stuck_attempts = 100;
    let coord = TestCoordinator::start(cfg).await;
    let mut c = coord.client().await;
    let stuck = c
        .list_sagas(proto::ListSagasRequest {
            stuck_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut ids: Vec<_> = stuck.sagas.iter().map(|s| s.saga_id.clone()).collect();
    ids.sort();
    let mut want = vec![x.saga_id, y.saga_id];
    want.sort();
    assert_eq!(ids, want);
}

/// Losing the database is UNAVAILABLE (gRPC) and 503 (HTTP) — a condition to
/// retry — never INTERNAL: a backend terminated under a StartSaga (what a
/// PostgreSQL restart does: SQLSTATE 57P01 or an I/O error), and a database
/// that refuses connections under reads.
#[tokio::test]
async fn losing_the_database_is_unavailable_on_grpc_and_http() {
    // One write lane, so the lane that wrote the first saga writes the next.
    let mut e = env_with(|cfg| cfg.db_write_lanes = 1).await;
    register(&mut e.client, valid()).await;
    // The sagas' first calls hang (5 s timeout), so between the starts
    // nothing else writes through the lane and meets its dead connection.
    e.svc
        .script("reserve.do", (0..12).map(|_| Reply::Hang).collect());
    let req = || proto::StartSagaRequest {
        definition: "order".into(),
        version: 1,
        input_json: "{}".into(),
        ..Default::default()
    };
    let first = e
        .client
        .start_saga(req())
        .await
        .unwrap()
        .into_inner()
        .saga
        .unwrap();

    // A lane idle for a second pings its connection first and reconnects
    // unseen; on a slow machine that can happen, so try a few times. Every
    // failure must be UNAVAILABLE, and one must be seen.
    let mut unavailable = 0;
    for _ in 0..10 {
        e.db.terminate_sessions(false).await;
        match e.client.start_saga(req()).await {
            Ok(_) => continue,
            Err(err) => {
                assert_eq!(err.code(), Code::Unavailable, "{err:?}");
                assert_eq!(err.message(), "database unavailable; try again");
                unavailable += 1;
                break;
            }
        }
    }
    assert_eq!(unavailable, 1, "a StartSaga on a terminated connection");
    // The lane reconnects: the caller's retry goes through.
    e.client.start_saga(req()).await.unwrap();

    e.db.terminate_sessions(true).await;
    let err = e
        .client
        .get_saga(proto::GetSagaRequest {
            saga_id: first.saga_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let r = http(
        e.coord.admin,
        "GET",
        &format!("/api/sagas/{}", first.saga_id),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"], "database unavailable; try again");
    e.db.accept_connections().await;
    // Calls are refused at once until the database probe (every 500 ms)
    // finds it back; then they go through.
    let back = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while http(e.coord.admin, "GET", "/readyz", &[], "").await.status != 200 {
        assert!(
            std::time::Instant::now() < back,
            "the coordinator never saw the database back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    e.client
        .get_saga(proto::GetSagaRequest {
            saga_id: first.saga_id,
        })
        .await
        .unwrap();
}
