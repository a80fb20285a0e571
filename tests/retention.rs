//! Retention on a running coordinator: settled sagas older than
//! `--retention-days` are deleted with their history, in batches, and
//! counted in `/metrics`; younger ones, running and suspended ones stay.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn settled_sagas_past_the_retention_are_deleted_and_counted() {
    let db = TestDb::new().await;
    let (_svc, mut cfg) = with_svc(&db).await;
    cfg.retention_days = 30;
    // A first coordinator makes the schema and registers the definition.
    let coord = TestCoordinator::start(cfg.clone()).await;
    let mut c = coord.client().await;
    register(
        &mut c,
        definition("abc", vec![step("a", "svc", true, true)]),
    )
    .await;
    coord.shutdown().await;
    // 1,200 completed sagas settled 40 days ago (more than two batches), 5
    // settled 10 days ago, 3 suspended 40 days ago, 2 running.
    let pool = db.pool().await;
    sqlx::query(
        "INSERT INTO sagas (saga_id, definition, version, state, input, steps, created_at,
                            updated_at, next_run_at, error)
         SELECT gen_random_uuid(), 'abc', 1, s.state, '{}', '[{\"state\":\"SUCCEEDED\"}]',
                now() - s.age, now() - s.age,
                CASE WHEN s.state = 'RUNNING' THEN now() + interval '1 hour' END,
                CASE WHEN s.state = 'SUSPENDED' THEN 'parked' END
         FROM (SELECT 'COMPLETED' AS state, interval '40 days' AS age FROM generate_series(1, 1200)
               UNION ALL SELECT 'COMPLETED', interval '10 days' FROM generate_series(1, 5)
               UNION ALL SELECT 'SUSPENDED', interval '40 days' FROM generate_series(1, 3)
               UNION ALL SELECT 'RUNNING', interval '40 days' FROM generate_series(1, 2)) s",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO saga_events (saga_id, seq, at, kind) SELECT saga_id, 1, created_at, 'started' FROM sagas",
    )
    .execute(&pool)
    .await
    .unwrap();

    // The next coordinator's first round deletes the old settled ones.
    let coord = TestCoordinator::start(cfg).await;
    let purged = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("sagad_sagas_purged_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = http(coord.admin, "GET", "/metrics", &[], "").await.body;
        if purged(&metrics) == Some(1_200) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not all purged: {:?}",
            purged(&metrics)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state || CASE WHEN updated_at < now() - interval '30 days' THEN ' old' ELSE ' young' END,
                count(*) FROM sagas GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        left,
        vec![
            ("COMPLETED young".to_owned(), 5),
            ("RUNNING old".to_owned(), 2),
            ("SUSPENDED old".to_owned(), 3),
        ]
    );
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM saga_events e WHERE NOT EXISTS (SELECT 1 FROM sagas s WHERE s.saga_id = e.saga_id)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(orphans, 0, "history goes with its saga");
    coord.shutdown().await;
}
