//! The gRPC edge's error mapping: [`OpsError`] and [`AuthError`] to
//! statuses, once.
//!
//! Client-visible messages name the field and never carry SQL or internal
//! detail; the detail of an unavailable database or an internal error goes to
//! the log here, where it is handled.

use tonic::Status;

use crate::auth::AuthError;
use crate::ops::OpsError;

/// The status a client sees for `e`.
impl From<OpsError> for Status {
    fn from(e: OpsError) -> Status {
        match e {
            OpsError::Invalid(v) => Status::invalid_argument(v.to_string()),
            OpsError::Auth(a) => a.into(),
            OpsError::NotFound(m) => Status::not_found(m),
            OpsError::AlreadyExists(m) => Status::already_exists(m),
            OpsError::FailedPrecondition(m) => Status::failed_precondition(m),
            OpsError::Aborted(m) => Status::aborted(m),
            OpsError::Unavailable { public, detail } => {
                tracing::warn!(error = %detail, "answering UNAVAILABLE");
                Status::unavailable(public)
            }
            OpsError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

/// UNAVAILABLE for a call refused before it starts because the database
/// probe finds the database away (the probe logs that once; calls are not
/// logged one by one).
pub fn unavailable_db() -> Status {
    Status::unavailable(crate::ops::DB_UNAVAILABLE)
}

/// RESOURCE_EXHAUSTED with a retry delay: in the message, and as
/// `grpc-retry-pushback-ms` (what gRPC clients' retry policies read).
pub fn exhausted(message: String, wait: std::time::Duration) -> Status {
    let ms = wait.as_millis().max(1);
    let mut s = Status::resource_exhausted(format!("{message}; retry in {ms} ms"));
    if let Ok(v) = ms.to_string().parse() {
        s.metadata_mut().insert("grpc-retry-pushback-ms", v);
    }
    s
}

/// The status for refused credentials: none or not accepted is
/// UNAUTHENTICATED, a known principal without the role PERMISSION_DENIED.
impl From<AuthError> for Status {
    fn from(e: AuthError) -> Status {
        match e {
            AuthError::Missing | AuthError::Invalid(_) => Status::unauthenticated(e.to_string()),
            AuthError::Denied { .. } => Status::permission_denied(e.to_string()),
        }
    }
}
