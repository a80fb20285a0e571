//! The pure core: definitions, saga states and the state machine.
//!
//! Nothing here does I/O or reads a clock: time and randomness come in as
//! arguments. This module imports no tokio, sqlx, tonic or axum, so every rule
//! of the saga protocol can be tested with plain tables.

/// An enum of named values with `ALL`, `as_str` and `parse` (the stored
/// and displayed names).
macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name { $($(#[$vm])* $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name stored in the database and shown to people.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// Parses [`Self::as_str`]'s output.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

mod definition;
mod json;
mod machine;
pub mod retry;
mod saga;

pub use definition::*;
pub use json::*;
pub use machine::*;
pub use saga::*;

#[cfg(test)]
pub(crate) mod testkit;
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
