//! `saga-sdk`: the participant and client SDK for `sagad`.
//!
//! This crate is an empty workspace member for now; the SDK (participant
//! builder, typed client, idempotency barrier) is tracked as its own issue.
