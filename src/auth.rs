//! Who is calling: the admin token and the operator's name.
//!
//! Both edges — the gRPC API and the admin HTTP server — check credentials
//! and read the actor here, so the rules (bearer syntax, constant-time
//! comparison, the one actor header and how its value is cleaned) exist
//! once. This module knows nothing of tonic or axum: the edges hand it the
//! header values and map [`AuthError`] to their own status codes.

/// The metadata key (gRPC) and header (HTTP) that names who performs an
/// operator action; recorded in the saga's history.
pub const ACTOR_HEADER: &str = "x-saga-actor";

/// Longest actor name kept (characters); the rest is cut.
pub const ACTOR_CHARS_MAX: usize = 64;

/// Why a request's credentials were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization: Bearer <token>` was sent (401 / UNAUTHENTICATED).
    #[error("operator actions need the admin token: send authorization: Bearer <token>")]
    Missing,
    /// A token was sent but it is not the admin token (403 / PERMISSION_DENIED).
    #[error("the admin token is wrong")]
    Wrong,
}

/// Checks an `authorization` header value against the admin token. With no
/// token configured every caller passes.
pub fn check_admin_token(
    expected: Option<&str>,
    authorization: Option<&str>,
) -> Result<(), AuthError> {
    let Some(expected) = expected else {
        return Ok(());
    };
    match authorization.and_then(|v| v.strip_prefix("Bearer ")) {
        None => Err(AuthError::Missing),
        Some(given) if token_eq(given, expected) => Ok(()),
        Some(_) => Err(AuthError::Wrong),
    }
}

/// Compares secrets in time independent of where they differ.
pub fn token_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The actor named by a request (the [`ACTOR_HEADER`] value, a login name):
/// control characters dropped, at most [`ACTOR_CHARS_MAX`] characters,
/// `fallback` when nothing is left.
pub fn actor(raw: Option<&str>, fallback: &str) -> String {
    let name: String = raw
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_control())
        .take(ACTOR_CHARS_MAX)
        .collect();
    let name = name.trim();
    if name.is_empty() {
        fallback.to_owned()
    } else {
        name.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_token_rules() {
        assert_eq!(check_admin_token(None, None), Ok(()));
        let t = Some("0123456789abcdef");
        assert_eq!(check_admin_token(t, None), Err(AuthError::Missing));
        assert_eq!(
            check_admin_token(t, Some("0123456789abcdef")),
            Err(AuthError::Missing),
            "the Bearer scheme is required"
        );
        assert_eq!(
            check_admin_token(t, Some("Bearer 0123456789abcdeX")),
            Err(AuthError::Wrong)
        );
        assert_eq!(
            check_admin_token(t, Some("Bearer 0123456789abcdef")),
            Ok(())
        );
    }

    #[test]
    fn actors_are_cleaned() {
        assert_eq!(actor(None, "grpc"), "grpc");
        assert_eq!(actor(Some(" \u{7}\n "), "api"), "api");
        assert_eq!(actor(Some("carol\r\n"), "api"), "carol");
        assert_eq!(actor(Some(&"x".repeat(200)), "api").len(), ACTOR_CHARS_MAX);
    }
}
