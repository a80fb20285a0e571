//! `saga-proto`: the `saga.v1` wire contract as Rust types.
//!
//! The one place the protobuf files (`saga/v1/*.proto`, copied from the
//! shared contract) are compiled. `sagad`, `saga-sdk`, `sagactl`,
//! `saga-bench` and the tests all use these types, so a message built by one
//! is the same type in every other. Field names and numbers never change
//! meaning; fields, messages and RPCs may be added.
#![allow(missing_docs, clippy::all)]

tonic::include_proto!("saga.v1");

/// The canonical name of a gRPC status code (`INVALID_ARGUMENT`), as the
/// gRPC specification spells it: what `sagad` records for a participant's
/// error and what the tools print.
pub fn status_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
