//! The SDK participant and client against a real `sagad` and PostgreSQL.
//! Participants here are known to the coordinator only through heartbeats.
#![allow(clippy::unwrap_used)]

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{test_config, TestCoordinator, TestDb};
use saga_sdk::{
    Client, ClientError, ListQuery, Participant, RegisterOptions, RetryPolicy, SagaDefinition,
    SagaState, StartOptions, Step, StepError, StepState,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Order {
    id: u32,
    amount: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Reservation {
    order: u32,
    slot: String,
}

struct Env {
    client: Client,
    _coord: TestCoordinator,
    _db: TestDb,
}

async fn env() -> Env {
    let db = TestDb::new().await;
    let coord = TestCoordinator::start(test_config(&db)).await;
    let client = Client::connect(format!("http://{}", coord.addr))
        .await
        .unwrap();
    Env {
        client,
        _coord: coord,
        _db: db,
    }
}

fn fast() -> RetryPolicy {
    RetryPolicy::exponential(3, Duration::from_millis(10), Duration::from_millis(40))
}

/// Serves `p` on 127.0.0.1 and registers it by heartbeat.
async fn serve(client: &Client, p: &Participant) -> saga_sdk::Registration {
    let (addr, _) = saga_sdk::serve_local(p.clone(), std::future::pending())
        .await
        .unwrap();
    p.register(
        [client.clone()],
        format!("http://{addr}"),
        RegisterOptions::default(),
    )
    .await
    .unwrap()
}

fn inventory(compensations: Arc<AtomicU32>) -> Participant {
    Participant::builder("inventory")
        .action("reserve", |ctx, order: Order| async move {
            assert_eq!(
                ctx.idempotency_key,
                format!("{}/reserve/action", ctx.saga_id)
            );
            Ok(Reservation {
                order: order.id,
                slot: "A1".into(),
            })
        })
        .compensation(
            "release",
            move |_ctx, order: Order, reservation: Option<Reservation>| {
                let compensations = compensations.clone();
                async move {
                    // The compensation sees the input and its action's output.
                    assert_eq!(reservation.map(|r| r.order), Some(order.id));
                    compensations.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            },
        )
        .build()
}

fn payments(calls: Arc<AtomicU32>) -> Participant {
    Participant::builder("payments")
        .action("charge", move |ctx, order: Order| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let reservation: Reservation = ctx
                    .output("reserve")?
                    .ok_or_else(|| StepError::Contract("no reservation".into()))?;
                if order.amount > 100 {
                    return Err(StepError::refuse("card declined"));
                }
                if order.amount == 13 && ctx.attempt == 1 {
                    return Err(StepError::unknown("gateway timed out"));
                }
                if order.amount == 66 && ctx.attempt == 1 {
                    panic!("bug in the charge handler");
                }
                Ok(format!(
                    "paid {} for slot {}",
                    order.amount, reservation.slot
                ))
            }
        })
        .build()
}

fn order_definition() -> SagaDefinition {
    SagaDefinition::builder("order")
        .step(
            Step::new("reserve", "inventory")
                .compensation("release")
                .idempotent()
                .retry(fast()),
        )
        .step(Step::new("charge", "payments").idempotent().retry(fast()))
        .build()
        .unwrap()
}

#[tokio::test]
async fn typed_round_trip_refusal_retry_and_panic() {
    let e = env().await;
    let (released, charged) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let _inv = serve(&e.client, &inventory(released.clone())).await;
    let _pay = serve(&e.client, &payments(charged.clone())).await;
    let (def, created) = e.client.register(&order_definition()).await.unwrap();
    assert!(created);
    assert_eq!(def.version(), 1);

    // Round trip with typed input and outputs.
    let saga = e
        .client
        .start("order", &Order { id: 1, amount: 42 })
        .await
        .unwrap();
    let saga = e
        .client
        .wait(saga.id, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(saga.state, SagaState::Completed);
    assert_eq!(
        saga.output::<Reservation>("reserve").unwrap(),
        Some(Reservation {
            order: 1,
            slot: "A1".into()
        })
    );
    assert_eq!(
        saga.output::<String>("charge").unwrap().as_deref(),
        Some("paid 42 for slot A1")
    );
    assert_eq!(saga.input::<Order>().unwrap(), Order { id: 1, amount: 42 });

    // A business refusal compensates the reservation.
    let saga = e
        .client
        .start("order", &Order { id: 2, amount: 500 })
        .await
        .unwrap();
    let saga = e
        .client
        .wait(saga.id, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(saga.state, SagaState::Compensated);
    assert_eq!(saga.steps[1].state, StepState::Failed);
    assert!(saga
        .error
        .as_deref()
        .unwrap_or_default()
        .contains("card declined"));
    assert_eq!(released.load(Ordering::SeqCst), 1);

    // An error with an unknown effect is retried (the step is idempotent).
    let saga = e
        .client
        .start("order", &Order { id: 3, amount: 13 })
        .await
        .unwrap();
    let saga = e
        .client
        .wait(saga.id, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(saga.state, SagaState::Completed);
    assert_eq!(saga.steps[1].attempts, 2);

    // A panicking handler answers INTERNAL; the participant keeps serving.
    let saga = e
        .client
        .start("order", &Order { id: 4, amount: 66 })
        .await
        .unwrap();
    let saga = e
        .client
        .wait(saga.id, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(saga.state, SagaState::Completed);
    assert_eq!(saga.steps[1].attempts, 2);
    let events = e.client.events(saga.id).await.unwrap();
    assert!(
        events
            .iter()
            .any(|ev| ev.kind == "step_retry" && ev.detail.starts_with("INTERNAL")),
        "{events:#?}"
    );
    assert_eq!(charged.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn unknown_handlers_answer_unimplemented_and_bad_input_is_a_contract_error() {
    let e = env().await;
    let _inv = serve(&e.client, &inventory(Arc::default())).await;
    let def = SagaDefinition::builder("typo")
        .step(
            Step::new("reserve", "inventory")
                .action("reserv")
                .idempotent(),
        )
        .build()
        .unwrap();
    e.client.register(&def).await.unwrap();
    let saga = e
        .client
        .start("typo", &Order { id: 1, amount: 1 })
        .await
        .unwrap();
    let saga = e
        .client
        .wait(saga.id, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(saga.state, SagaState::Suspended);
    let err = saga.steps[0].last_error.clone().unwrap_or_default();
    assert!(
        err.starts_with("UNIMPLEMENTED") && err.contains("reserv"),
        "{err}"
    );

    e.client.register(&order_definition()).await.unwrap();
    let saga = e
        .client
        .start("order", &serde_json::json!({"unexpected": true}))
        .await
        .unwrap();
    let saga = e
        .client
        .wait(saga.id, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(saga.state, SagaState::Suspended);
    assert!(saga.steps[0]
        .last_error
        .clone()
        .unwrap_or_default()
        .starts_with("INVALID_ARGUMENT"));
}

#[tokio::test]
async fn a_participant_known_by_heartbeat_is_called_until_it_withdraws() {
    let e = env().await;
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    let p = Participant::builder("solo")
        .action("work", move |_ctx, _in: serde_json::Value| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .build();
    let def = SagaDefinition::builder("solo")
        .step(
            Step::new("work", "solo")
                .idempotent()
                .retry(RetryPolicy::exponential(
                    2,
                    Duration::from_millis(5),
                    Duration::from_millis(5),
                )),
        )
        .build()
        .unwrap();
    e.client.register(&def).await.unwrap();
    let registration = serve(&e.client, &p).await;
    assert!(registration.instance_id().starts_with("solo-"));
    let saga = e.client.start("solo", &()).await.unwrap();
    assert_eq!(
        e.client
            .wait(saga.id, Duration::from_secs(20))
            .await
            .unwrap()
            .state,
        SagaState::Completed
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    registration.stop().await;
    let saga = e.client.start("solo", &()).await.unwrap();
    let saga = e
        .client
        .wait(saga.id, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(saga.state, SagaState::Suspended);
    assert!(saga.steps[0]
        .last_error
        .clone()
        .unwrap_or_default()
        .contains("no live instance"));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "a withdrawn instance is not called"
    );
}

#[tokio::test]
async fn the_participant_shares_a_tonic_server_with_other_services() {
    let e = env().await;
    let p = inventory(Arc::default());
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<saga_sdk::proto::participant_service_server::ParticipantServiceServer<Participant>>().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(p.service())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let _reg = p
        .register(
            [e.client.clone()],
            format!("http://{addr}"),
            RegisterOptions::default(),
        )
        .await
        .unwrap();
    let def = SagaDefinition::builder("one")
        .step(
            Step::new("reserve", "inventory")
                .compensation("release")
                .idempotent(),
        )
        .build()
        .unwrap();
    e.client.register(&def).await.unwrap();
    let saga = e
        .client
        .start("one", &Order { id: 9, amount: 1 })
        .await
        .unwrap();
    assert_eq!(
        e.client
            .wait(saga.id, Duration::from_secs(20))
            .await
            .unwrap()
            .state,
        SagaState::Completed
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "saga.v1.ParticipantService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn client_calls_and_typed_errors() {
    let e = env().await;
    let _inv = serve(&e.client, &inventory(Arc::default())).await;
    let _pay = serve(&e.client, &payments(Arc::default())).await;
    e.client.register(&order_definition()).await.unwrap();
    let id = uuid::Uuid::new_v4();
    let opts = || StartOptions {
        saga_id: Some(id),
        version: Some(1),
    };
    let first = e
        .client
        .start_with("order", &Order { id: 5, amount: 5 }, opts())
        .await
        .unwrap();
    assert!(first.created);
    let again = e
        .client
        .start_with("order", &Order { id: 5, amount: 5 }, opts())
        .await
        .unwrap();
    assert!(!again.created);
    let clash = e
        .client
        .start_with("order", &Order { id: 6, amount: 5 }, opts())
        .await;
    assert!(
        matches!(clash, Err(ClientError::AlreadyExists(_))),
        "{clash:?}"
    );
    assert!(matches!(
        e.client.start("nope", &()).await,
        Err(ClientError::NotFound(_))
    ));
    assert!(matches!(
        e.client.get(uuid::Uuid::new_v4()).await,
        Err(ClientError::NotFound(_))
    ));
    let saga = e.client.wait(id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(saga.state, SagaState::Completed);
    let page = e
        .client
        .list(ListQuery {
            states: vec![SagaState::Completed],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.sagas.len(), 1);
    assert!(page.next_page_token.is_none());
    let events = e.client.events(id).await.unwrap();
    assert_eq!(events.first().map(|e| e.kind.as_str()), Some("started"));
    assert_eq!(events.last().map(|e| e.kind.as_str()), Some("completed"));
    let op = e.client.clone().with_actor("alice").unwrap();
    assert!(matches!(
        op.resolve(id, "").await,
        Err(ClientError::InvalidArgument(_))
    ));
    assert!(matches!(
        op.abort(id, "late").await,
        Err(ClientError::FailedPrecondition(_))
    ));
    assert!(matches!(
        op.retry(id, "again").await,
        Err(ClientError::FailedPrecondition(_))
    ));
    let bad = SagaDefinition::builder("x")
        .step(Step::new("a", "p"))
        .step(Step::new("b", "p"))
        .build();
    assert!(bad.is_err(), "checked before sending");
    assert!(matches!(
        Client::connect("http://127.0.0.1:1").await,
        Err(ClientError::Connect { .. })
    ));
}

/// A call that reaches the participant after its deadline is not run: the
/// coordinator's lease may be gone and another coordinator driving the saga.
#[tokio::test]
async fn a_call_that_arrives_after_its_deadline_is_not_run() {
    let runs = Arc::new(AtomicU32::new(0));
    let counter = runs.clone();
    let p = Participant::builder("late")
        .action("act", move |_ctx, _: serde_json::Value| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .build();
    let (addr, _) = saga_sdk::serve_local(p, std::future::pending())
        .await
        .unwrap();
    let mut c = saga_sdk::proto::participant_service_client::ParticipantServiceClient::connect(
        format!("http://{addr}"),
    )
    .await
    .unwrap();
    let ts = |t: std::time::SystemTime| {
        let at = t.duration_since(std::time::UNIX_EPOCH).unwrap();
        prost_types::Timestamp {
            seconds: at.as_secs() as i64,
            nanos: at.subsec_nanos() as i32,
        }
    };
    let request = |deadline: std::time::SystemTime, arrive_by: Option<std::time::SystemTime>| {
        saga_sdk::proto::InvokeRequest {
            saga_id: uuid::Uuid::new_v4().to_string(),
            definition: "d".into(),
            step: "s".into(),
            phase: saga_sdk::proto::Phase::Action as i32,
            handler: "act".into(),
            attempt: 1,
            idempotency_key: "k".into(),
            input_json: "{}".into(),
            deadline: Some(ts(deadline)),
            arrive_by: arrive_by.map(ts),
            ..Default::default()
        }
    };
    let now = std::time::SystemTime::now();
    let (past, future) = (
        now - Duration::from_millis(1),
        now + Duration::from_secs(30),
    );
    // An older coordinator's call: the deadline is the limit.
    let late = c.invoke(request(past, None)).await.unwrap_err();
    assert_eq!(late.code(), tonic::Code::DeadlineExceeded, "{late:?}");
    // The arrival limit passed though the coordinator would still wait.
    let late = c.invoke(request(future, Some(past))).await.unwrap_err();
    assert_eq!(late.code(), tonic::Code::DeadlineExceeded, "{late:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 0, "the handler did not run");
    c.invoke(request(future, None)).await.unwrap();
    c.invoke(request(future, Some(future))).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}
