//! What only the PostgreSQL store has: group commit through its write lanes
//! (each decision keeps its own fence) and the lanes' query plans. The
//! store contract itself is in `store_conformance.rs`, run against both
//! stores.
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
    use saga_coordinator::store::pg::{
        lane_connect_options, CREATE_SQL, LEASE_RENEW_SQL, SAVE_SQL,
    };
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
        // The renewal runs with sequential scans off too (in its own
        // transaction).
        (
            "lease_renew",
            LEASE_RENEW_SQL,
            "uuid[], bigint[], uuid, bigint",
            format!("{id}, '{{1}}', '00000000-0000-0000-0000-000000000001', 5000"),
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
            // The renewal may also start from this owner's leases (the
            // partial index of owned sagas: only those held right now).
            let by_owner = name == "lease_renew"
                && index == "sagas_owner_release_idx"
                && cond.contains("owner");
            assert!(
                (index == "sagas_pkey" && cond.contains("saga_id")) || by_owner,
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
