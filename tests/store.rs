//! The PostgreSQL store's fencing: epochs only grow, and every write of an
//! owner whose epoch is no longer current is refused and changes nothing.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::TestDb;
use saga_coordinator::domain::{
    decide, CallResult, DefinitionDraft, Fact, Phase, SagaId, StepDraft,
};
use saga_coordinator::store::pg::{PgStore, MIGRATOR};
use saga_coordinator::store::{Created, Hold, NewSaga, OwnerId, SagaStore, StoreError};

async fn setup() -> (TestDb, PgStore, saga_coordinator::domain::Definition) {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    MIGRATOR.run(&pool).await.unwrap();
    let store = PgStore::new(pool);
    let draft = DefinitionDraft {
        name: "d".into(),
        steps: vec![
            StepDraft {
                name: "a".into(),
                participant: "p".into(),
                action: "a".into(),
                compensation: "u".into(),
                idempotent: true,
                ..Default::default()
            },
            StepDraft {
                name: "b".into(),
                participant: "p".into(),
                action: "b".into(),
                compensation: "u".into(),
                idempotent: true,
                ..Default::default()
            },
        ],
        deadline: None,
    };
    let def = draft.validate(&Default::default()).unwrap();
    let (def, _) = store.definition_register(def, None).await.unwrap();
    (db, store, def)
}

async fn expire_leases(db: &TestDb) {
    let pool = db.pool().await;
    sqlx::query("UPDATE sagas SET lease_until = now() - interval '1 ms', next_run_at = now() - interval '1 ms' WHERE owner IS NOT NULL")
        .execute(&pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_stale_owner_cannot_write_extend_or_release() {
    let (db, store, def) = setup().await;
    let id = SagaId(uuid::Uuid::new_v4());
    let trace = saga_coordinator::domain::SagaTrace {
        traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        tracestate: Some("vendor=x".into()),
        caller_span: Some("0102030405060708".into()),
        saga_span: true,
    };
    let created = store
        .saga_create(NewSaga {
            id,
            definition: def.clone(),
            input: "{}".into(),
            owner: None,
            started_by: None,
            trace: Some(trace.clone()),
        })
        .await
        .unwrap();
    assert!(matches!(created, Created::New(_, None, _)));
    let (a, b) = (OwnerId(uuid::Uuid::new_v4()), OwnerId(uuid::Uuid::new_v4()));
    let ttl = Duration::from_secs(60);

    let claimed_a = store.lease_claim_due(a, 10, ttl).await.unwrap();
    assert_eq!(claimed_a.len(), 1);
    assert!(
        store.lease_claim_due(b, 10, ttl).await.unwrap().is_empty(),
        "a live lease is not claimed"
    );
    expire_leases(&db).await;
    let claimed_b = store.lease_claim_due(b, 10, ttl).await.unwrap();
    assert_eq!(claimed_b.len(), 1);
    let (la, lb) = (claimed_a[0].lease, claimed_b[0].lease);
    assert!(lb.epoch > la.epoch, "epochs only grow");

    // A decides on its stale copy: every write is refused.
    let saga = claimed_a[0].saga.clone();
    let fact = Fact::Invoked {
        step: 0,
        phase: Phase::Action,
        attempt: 1,
        result: CallResult::Succeeded(None),
        took: std::time::Duration::from_millis(7),
    };
    let d = decide(&saga, &def, fact.clone(), claimed_a[0].db_now, 0.0).unwrap();
    let before = store.saga_get(id).await.unwrap().unwrap();
    assert!(matches!(
        store.saga_save(&la, &d, false, Hold::Keep(ttl)).await,
        Err(StoreError::LeaseLost)
    ));
    assert!(matches!(
        store.lease_extend(&la, ttl).await,
        Err(StoreError::LeaseLost)
    ));
    assert!(matches!(
        store.lease_release(&la).await,
        Err(StoreError::LeaseLost)
    ));
    let after = store.saga_get(id).await.unwrap().unwrap();
    assert_eq!(after.saga, before.saga);
    assert_eq!(
        (after.epoch, after.event_seq),
        (before.epoch, before.event_seq)
    );
    assert!(store
        .saga_events(id)
        .await
        .unwrap()
        .iter()
        .all(|e| e.kind.as_str() == "started"));

    // B's write goes through.
    store
        .saga_save(&lb, &d, false, Hold::Keep(ttl))
        .await
        .unwrap();
    let rec = store.saga_get(id).await.unwrap().unwrap();
    assert_eq!(rec.event_seq, 2);
    // The trace context is kept with the saga (a takeover reads it back),
    // and a call's answer keeps how long the call took.
    assert_eq!(rec.saga.trace, Some(trace));
    let events = store.saga_events(id).await.unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].took, None);
    assert_eq!(events[1].took, Some(Duration::from_millis(7)));

    // An operator's write fences B out in turn.
    let op = decide(
        &rec.saga,
        &def,
        Fact::OperatorAbort {
            actor: "op".into(),
            note: "x".into(),
        },
        rec.saga.updated_at,
        0.0,
    )
    .unwrap();
    store
        .saga_operator_save(&rec, &op, false, false)
        .await
        .unwrap();
    let rec2 = store.saga_get(id).await.unwrap().unwrap();
    assert!(rec2.epoch > lb.epoch);
    assert!(rec2.owner.is_none());
    let d2 = decide(
        &rec.saga,
        &def,
        Fact::Invoked {
            step: 1,
            phase: Phase::Action,
            attempt: 1,
            result: CallResult::Succeeded(None),
            took: std::time::Duration::from_millis(7),
        },
        rec.saga.updated_at,
        0.0,
    )
    .unwrap();
    assert!(matches!(
        store.saga_save(&lb, &d2, true, Hold::Release(None)).await,
        Err(StoreError::LeaseLost)
    ));
    // A second operator write from the same stale read is a conflict.
    assert!(matches!(
        store.saga_operator_save(&rec, &op, false, false).await,
        Err(StoreError::Conflict)
    ));
}

#[tokio::test]
async fn operator_retry_of_a_saga_being_driven_is_busy_and_release_all_is_per_owner() {
    let (_db, store, def) = setup().await;
    let (a, b) = (OwnerId(uuid::Uuid::new_v4()), OwnerId(uuid::Uuid::new_v4()));
    let ttl = Duration::from_secs(60);
    let ida = SagaId(uuid::Uuid::new_v4());
    let idb = SagaId(uuid::Uuid::new_v4());
    store
        .saga_create(NewSaga {
            id: ida,
            definition: def.clone(),
            input: "1".into(),
            owner: Some((a, ttl)),
            started_by: None,
            trace: None,
        })
        .await
        .unwrap();
    store
        .saga_create(NewSaga {
            id: idb,
            definition: def.clone(),
            input: "2".into(),
            owner: Some((b, ttl)),
            started_by: None,
            trace: None,
        })
        .await
        .unwrap();
    let rec = store.saga_get(ida).await.unwrap().unwrap();
    assert!(rec.leased);
    let op = decide(
        &rec.saga,
        &def,
        Fact::OperatorRetry {
            actor: "op".into(),
            note: String::new(),
        },
        rec.saga.updated_at,
        0.0,
    )
    .unwrap();
    assert!(matches!(
        store.saga_operator_save(&rec, &op, false, true).await,
        Err(StoreError::Busy)
    ));

    assert_eq!(store.lease_release_all(a).await.unwrap(), 1);
    assert!(!store.saga_get(ida).await.unwrap().unwrap().leased);
    assert!(
        store.saga_get(idb).await.unwrap().unwrap().leased,
        "another owner's lease is untouched"
    );
    // Released work is due at once.
    let claimed = store
        .lease_claim_due(OwnerId(uuid::Uuid::new_v4()), 10, ttl)
        .await
        .unwrap();
    assert_eq!(
        claimed.iter().map(|c| c.saga.id).collect::<Vec<_>>(),
        vec![ida]
    );
}

#[tokio::test]
async fn concurrent_claims_never_hand_out_the_same_saga() {
    let (_db, store, def) = setup().await;
    for i in 0..40 {
        let id = SagaId(uuid::Uuid::new_v4());
        store
            .saga_create(NewSaga {
                id,
                definition: def.clone(),
                input: i.to_string(),
                owner: None,
                started_by: None,
                trace: None,
            })
            .await
            .unwrap();
    }
    let store = std::sync::Arc::new(store);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let owner = OwnerId(uuid::Uuid::new_v4());
            let mut got = Vec::new();
            loop {
                let c = store
                    .lease_claim_due(owner, 3, Duration::from_secs(60))
                    .await
                    .unwrap();
                if c.is_empty() {
                    return got;
                }
                got.extend(c.into_iter().map(|c| c.saga.id));
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!((n, all.len()), (40, 40), "each saga claimed exactly once");
}

#[tokio::test]
async fn concurrent_decisions_share_statements_and_keep_their_own_fences() {
    let (_db, store, def) = setup().await;
    let owner = OwnerId(uuid::Uuid::new_v4());
    let ttl = Duration::from_secs(60);
    let mut held = Vec::new();
    for i in 0..64 {
        let created = store
            .saga_create(NewSaga {
                id: SagaId(uuid::Uuid::new_v4()),
                definition: def.clone(),
                input: i.to_string(),
                owner: Some((owner, ttl)),
                started_by: None,
                trace: None,
            })
            .await
            .unwrap();
        let Created::New(saga, Some(lease), at) = created else {
            panic!("created without a lease")
        };
        held.push((saga, lease, at));
    }
    // One owner's lease is stale (its epoch moved on): only its write fails.
    held[7].1.epoch += 1;
    let stale = held[7].0.id;
    let (requests_before, statements_before) = store.db_writes().counts();
    let mut tasks = tokio::task::JoinSet::new();
    for (saga, lease, at) in held {
        let (store, def) = (store.clone(), def.clone());
        tasks.spawn(async move {
            let fact = Fact::Invoked {
                step: 0,
                phase: Phase::Action,
                attempt: 1,
                result: CallResult::Succeeded(Some(format!("{{\"n\":{}}}", saga.input))),
                took: std::time::Duration::from_millis(7),
            };
            let d = decide(&saga, &def, fact, at, 0.0).unwrap();
            (
                saga.id,
                store.saga_save(&lease, &d, false, Hold::Keep(ttl)).await,
            )
        });
    }
    let mut results = Vec::new();
    while let Some(r) = tasks.join_next().await {
        results.push(r.unwrap());
    }
    for (id, result) in &results {
        let events = store.saga_events(*id).await.unwrap();
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        let rec = store.saga_get(*id).await.unwrap().unwrap();
        if *id == stale {
            assert!(matches!(result, Err(StoreError::LeaseLost)), "{result:?}");
            assert_eq!(kinds, vec!["started"]);
            assert_eq!(rec.saga.steps[0].output, None);
        } else {
            assert!(result.is_ok(), "{result:?}");
            assert_eq!(kinds, vec!["started", "step_succeeded"]);
            assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
            assert_eq!(
                rec.saga.steps[0].output.as_deref(),
                Some(format!("{{\"n\":{}}}", rec.saga.input).as_str()),
                "each saga got its own decision"
            );
        }
    }
    let (requests, statements) = store.db_writes().counts();
    let (requests, statements) = (requests - requests_before, statements - statements_before);
    assert_eq!(requests, 64);
    assert!(
        statements < requests,
        "64 concurrent decisions share statements (group commit): {statements} statements"
    );
}

/// The lanes' statements reach `sagas` through its primary key even with
/// the planner's worst information: the generic plan (the one lanes use)
/// made while the table is empty and never analysed.
/// A plain connection gets a hash join over a sequential scan there, and
/// keeps it while the table grows.
#[tokio::test]
async fn lane_statements_find_sagas_by_key_whatever_the_statistics() {
    use saga_coordinator::store::pg::{lane_connect_options, CREATE_SQL, SAVE_SQL};
    use sqlx::ConnectOptions;
    let db = TestDb::new().await;
    let pool = db.pool().await;
    MIGRATOR.run(&pool).await.unwrap();
    let options = lane_connect_options(pool.connect_options().as_ref().clone());
    let mut conn = options.connect().await.unwrap();
    let mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(mode, "force_generic_plan", "lanes plan once");
    let id = "'{00000000-0000-0000-0000-000000000001}'";
    let statements = [
        (
            "lane_save",
            SAVE_SQL,
            "uuid[], bigint[], uuid[], text[], text[], text[], text[], int[], int[], bool[], \
             bigint[], timestamptz[], bool[], int[], uuid[], int[], timestamptz[], text[], \
             text[], int[], text[], int[]",
            format!(
                "{id}, '{{1}}', {id}, '{{COMPLETED}}', '{{NULL}}', '{{\"[]\"}}', '{{NULL}}', \
                 '{{1}}', '{{1}}', '{{t}}', '{{1}}', '{{NULL}}', '{{t}}', '{{1}}', {id}, '{{1}}', \
                 '{{2026-01-01T00:00:00Z}}', '{{completed}}', '{{NULL}}', '{{0}}', '{{x}}', '{{5}}'"
            ),
        ),
        (
            "lane_create",
            CREATE_SQL,
            "uuid[], text[], int[], text[], text[], bigint[], uuid[], bigint[], text[], text, text[], \
             text[]",
            format!(
                "{id}, '{{d}}', '{{1}}', '{{null}}', '{{\"[]\"}}', '{{NULL}}', {id}, '{{1}}', \
                 '{{x}}', 'started', '{{ci}}', '{{NULL}}'"
            ),
        ),
    ];
    for (name, sql, types, args) in statements {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "PREPARE {name}({types}) AS {sql}"
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        let plan: serde_json::Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "EXPLAIN (FORMAT JSON) EXECUTE {name}({args})"
        )))
        .fetch_one(&mut conn)
        .await
        .unwrap();
        println!("generic plan for {name}: {plan}");
        let mut scans = Vec::new();
        table_scans(&plan, &mut scans);
        for (node, index, cond) in scans {
            assert!(
                index == "sagas_pkey" && cond.contains("saga_id"),
                "{name}: {node} on {index:?} ({cond:?}) instead of a primary key lookup: {plan}"
            );
        }
    }
}

/// Every node of a JSON plan that reads a table: (node type, index, index
/// condition); a sequential scan has neither.
fn table_scans(plan: &serde_json::Value, out: &mut Vec<(String, String, String)>) {
    let field = |k: &str| {
        plan.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_owned()
    };
    let node = field("Node Type");
    if matches!(
        node.as_str(),
        "Seq Scan" | "Index Scan" | "Index Only Scan" | "Bitmap Index Scan"
    ) {
        out.push((node, field("Index Name"), field("Index Cond")));
    }
    let children = plan.get("Plans").or_else(|| plan.get("Plan"));
    match children {
        Some(serde_json::Value::Array(nodes)) => nodes.iter().for_each(|n| table_scans(n, out)),
        Some(n) => table_scans(n, out),
        None => {}
    }
    if let serde_json::Value::Array(nodes) = plan {
        nodes.iter().for_each(|n| table_scans(n, out));
    }
}
