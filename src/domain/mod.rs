//! The pure core: definitions, saga states and the state machine.
//!
//! Nothing here does I/O or reads a clock: time and randomness come in as
//! arguments. This module imports no tokio, sqlx, tonic or axum, so every rule
//! of the saga protocol can be tested with plain tables.

mod definition;
mod machine;
pub mod retry;
mod saga;

pub use definition::*;
pub use machine::*;
pub use saga::*;

#[cfg(test)]
mod tests;

/// Bad input, naming the offending field (e.g. `definition.steps[2].timeout`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// The field, in the request's own terms.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ValidationError {
    /// An error for `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError {
            field: field.into(),
            message: message.into(),
        }
    }
}
