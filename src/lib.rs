//! `saga-coordinator`: the `sagad` saga coordinator as a library.
//!
//! # Layout
//! ```text
//! domain/       PURE: definitions + validation, states, plan/decide, backoff
//! store/        trait SagaStore (the storage seam); store/pg holds every line of SQL
//! participant/  calling participants: endpoints, channels, answer -> CallResult
//! worker/       claim -> plan -> decide -> save (fenced); wake-ups; recovery
//! api/          CoordinatorService; convert.rs is the only code touching proto types
//! admin.rs      HTTP: /healthz, /readyz
//! config.rs     flags with environment fallbacks
//! server.rs     start(config, pool, stop) wires every task under one token
//! ```
//! The binaries (`src/bin`) only parse flags and call [`server::run`].

pub mod admin;
pub mod api;
pub mod bench;
pub mod config;
pub mod ctl;
pub mod domain;
pub mod metrics;
pub mod ops;
pub mod participant;
pub mod server;
pub mod store;
pub mod worker;

/// Generated gRPC types (`saga.v1`).
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("saga.v1");
}
