//! The travel example, run against a real `sagad`: one trip completes, the
//! other's payment is refused and its bookings are cancelled in the data.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used)]

#[path = "../../../tests/common/mod.rs"]
mod common;
#[path = "../examples/travel.rs"]
mod travel;

use saga_sdk::{SagaState, StepState};
use sqlx::Row;

#[tokio::test]
async fn one_trip_completes_and_one_is_compensated() {
    let db = common::TestDb::new().await;
    let data = common::TestDb::new().await;
    let coord = common::TestCoordinator::start(common::test_config(&db)).await;
    let sagas = travel::run(
        &format!("http://{}", coord.addr),
        &data.url,
        travel::Hotels::Local,
    )
    .await
    .unwrap();
    assert_eq!(
        sagas.iter().map(|s| s.state).collect::<Vec<_>>(),
        vec![SagaState::Completed, SagaState::Compensated]
    );
    let refused = &sagas[1];
    assert_eq!(
        refused.steps.iter().map(|s| s.state).collect::<Vec<_>>(),
        vec![
            StepState::Compensated,
            StepState::Compensated,
            StepState::Failed
        ]
    );
    let pool = data.pool().await;
    let status = |table: &'static str, id: uuid::Uuid| {
        let pool = pool.clone();
        async move {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT status FROM {table} WHERE saga_id = $1"
            )))
            .bind(id.to_string())
            .fetch_one(&pool)
            .await
            .unwrap()
            .get::<String, _>(0)
        }
    };
    assert_eq!(status("flight_bookings", sagas[0].id).await, "booked");
    assert_eq!(status("hotel_bookings", sagas[0].id).await, "booked");
    assert_eq!(status("flight_bookings", refused.id).await, "cancelled");
    assert_eq!(status("hotel_bookings", refused.id).await, "cancelled");
    let payments: i64 = sqlx::query_scalar("SELECT count(*) FROM payments")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(payments, 1);
    pool.close().await;
    drop(coord);
}
