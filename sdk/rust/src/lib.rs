//! # saga-sdk
//!
//! The Rust SDK for [`sagad`](https://example.invalid/saga-coordinator): write
//! saga participants, define sagas, start and watch them.
//!
//! - [`Participant`]: register named action and compensation handlers over
//!   typed (serde) inputs and outputs, serve them as
//!   `saga.v1.ParticipantService` (alone, or on your own tonic server beside
//!   your services), and announce the endpoint to the coordinator.
//! - [`Client`]: register [`SagaDefinition`]s (checked before sending), start
//!   sagas, wait, get, list, read history, and the operator calls.
//! - `barrier` (feature `postgres`): exactly-once effects for handlers whose
//!   work is in PostgreSQL.
//!
//! A handler answers `Ok(output)`, or [`StepError::Refused`] (a business
//! refusal: nothing happened, the saga compensates), [`StepError::RetryLater`]
//! (nothing happened, call again), or [`StepError::Unknown`] (something went
//! wrong and the effect is unknown; idempotent steps are retried). A handler
//! that panics answers `INTERNAL`, and the participant keeps serving.
//!
//! ```
//! use saga_sdk::{Participant, SagaDefinition, Step, StepError};
//! use saga_sdk::proto::participant_service_server::ParticipantService;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct Order { amount: u32 }
//! #[derive(Serialize, Deserialize)]
//! struct Payment { id: String }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // The saga: reserve stock, then charge (the pivot: no way back).
//! let definition = SagaDefinition::builder("order")
//!     .step(Step::new("reserve", "inventory").compensation("release").idempotent())
//!     .step(Step::new("charge", "payments").idempotent())
//!     .build()
//!     .expect("a valid definition");
//! assert_eq!(definition.name(), "order");
//!
//! // The payments participant.
//! let payments = Participant::builder("payments")
//!     .action("charge", |ctx, order: Order| async move {
//!         if order.amount > 100 {
//!             return Err(StepError::refuse("card declined"));
//!         }
//!         Ok(Payment { id: format!("P-{}", ctx.attempt) })
//!     })
//!     .build();
//!
//! // What the coordinator sends (normally over gRPC):
//! let call = |amount: u32| saga_sdk::proto::InvokeRequest {
//!     saga_id: "6d1f2c8e-3f4a-4b6c-9d0e-1a2b3c4d5e6f".into(),
//!     step: "charge".into(),
//!     handler: "charge".into(),
//!     phase: saga_sdk::proto::Phase::Action as i32,
//!     attempt: 1,
//!     input_json: format!(r#"{{"amount": {amount}}}"#),
//!     ..Default::default()
//! };
//! let ok = payments.invoke(tonic::Request::new(call(42))).await.unwrap().into_inner();
//! assert_eq!(ok.outcome, saga_sdk::proto::Outcome::Succeeded as i32);
//! assert_eq!(ok.output_json, r#"{"id":"P-1"}"#);
//! let refused = payments.invoke(tonic::Request::new(call(500))).await.unwrap().into_inner();
//! assert_eq!(refused.outcome, saga_sdk::proto::Outcome::Failed as i32);
//! # }
//! ```
//!
//! Against a running coordinator:
//!
//! ```no_run
//! # use saga_sdk::{Client, Participant, RegisterOptions, SagaDefinition, Step};
//! # async fn run(definition: SagaDefinition, payments: Participant) -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::connect("http://127.0.0.1:50051").await?;
//! client.register(&definition).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7001").await?;
//! tokio::spawn(payments.clone().serve(listener, std::future::pending()));
//! let registration = payments
//!     .register([client.clone()], "http://127.0.0.1:7001", RegisterOptions::default())
//!     .await?;
//! let saga = client.start("order", &serde_json::json!({"amount": 42})).await?;
//! let saga = client.wait(saga.id, std::time::Duration::from_secs(30)).await?;
//! println!("{:?}", saga.state);
//! registration.stop().await;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

#[cfg(feature = "postgres")]
pub mod barrier;
mod client;
mod definition;
mod participant;
mod trace;

pub use client::{
    Client, ClientError, ClientTls, ListQuery, Saga, SagaEvent, SagaPage, SagaState, StartOptions,
    Started, StepState, StepStatus,
};
pub use definition::{DefinitionBuilder, DefinitionError, RetryPolicy, SagaDefinition, Step};
pub use participant::{
    serve_local, Participant, ParticipantBuilder, Phase, RegisterOptions, Registration, ServerTls,
    StepContext, StepError,
};

/// The `saga.v1` wire types (the `saga-proto` crate), for code that needs
/// them directly: the same types `sagad` uses.
pub use saga_proto as proto;
