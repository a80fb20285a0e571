//! API errors, mapped once to gRPC statuses.
//!
//! Client-visible messages name the field and never carry SQL or internal
//! detail; the full error goes to the log where it is mapped.

use tonic::{Code, Status};

use crate::domain::{TransitionError, ValidationError};
use crate::store::StoreError;

/// Everything an RPC can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Bad input (INVALID_ARGUMENT).
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// Unknown saga or definition (NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    /// Same saga id, other content (ALREADY_EXISTS).
    #[error("{0}")]
    AlreadyExists(String),
    /// The saga is not in a state where this applies (FAILED_PRECONDITION).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The saga kept changing under an operator action (ABORTED).
    #[error("{0}")]
    Aborted(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<TransitionError> for ApiError {
    fn from(e: TransitionError) -> Self {
        match e {
            TransitionError::NoteRequired => {
                ApiError::Invalid(ValidationError::new("note", "required"))
            }
            other => ApiError::FailedPrecondition(other.to_string()),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::Invalid(v) => Status::invalid_argument(v.to_string()),
            ApiError::NotFound(m) => Status::not_found(m),
            ApiError::AlreadyExists(m) => Status::already_exists(m),
            ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
            ApiError::Aborted(m) => Status::aborted(m),
            ApiError::Store(StoreError::Database(e)) if is_unavailable(&e) => unavailable(&e),
            ApiError::Store(StoreError::Shared(e)) if is_unavailable(&e) => unavailable(&e),
            ApiError::Store(StoreError::Stopped) => {
                Status::new(Code::Unavailable, "coordinator shutting down; try another")
            }
            ApiError::Store(e) => {
                tracing::error!(error = %e, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

fn unavailable(e: &sqlx::Error) -> Status {
    tracing::error!(error = %e, "database unavailable");
    Status::new(Code::Unavailable, "database unavailable; try again")
}

fn is_unavailable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
    )
}
