//! `saga-coordinator`: the `sagad` saga coordinator as a library.
//!
//! # Layout
//! ```text
//! domain/       PURE: definitions + validation, states, events (an enum),
//!               plan/decide, backoff
//! store/        trait SagaStore (the storage seam) and StoreError (what
//!               happened, not which driver); store/pg holds every line of SQL
//! participant/  calling participants: endpoints, channels, answer -> CallResult
//! worker/       claim -> plan -> decide -> save (fenced); wake-ups; recovery
//! ops.rs        reads and operator actions shared by both edges; OpsError
//! auth.rs       the admin token and the actor, checked at both edges
//! api/          gRPC edge: CoordinatorService; convert.rs is the only code
//!               touching proto types; status.rs maps OpsError once
//! admin/        HTTP edge: page, JSON API, /metrics, /healthz, /readyz; maps
//!               OpsError once for JSON and HTML
//! config.rs     flags with environment fallbacks; limits carry their units
//! tls.rs        rustls on the listeners: mutual TLS, reload without a restart
//! server.rs     start(config, pool, stop) wires every task under one token
//! ```
//! Imports run one way: the edges (`api`, `admin`) use `ops` and `auth`;
//! `ops` uses `worker`, `store` and `domain`; `domain` uses nothing of ours.
//! The wire types come from the `saga-proto` crate, shared with the SDK and
//! the tools. The binary (`src/bin/sagad.rs`) only parses flags and calls
//! [`server::run`].

pub mod admin;
pub mod api;
pub mod auth;
pub mod config;
pub mod domain;
pub mod limits;
pub mod metrics;
pub mod ops;
pub mod participant;
pub mod retention;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod worker;

/// The `saga.v1` wire types (the `saga-proto` crate).
pub use saga_proto as proto;
