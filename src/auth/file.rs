//! The auth file (`--auth-file`): principals, the SHA-256 of their tokens,
//! client-certificate subjects and roles.
//!
//! ```yaml
//! principals:
//!   - name: checkout
//!     token_sha256: 5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
//!     roles: [client, viewer]
//!   - name: bank-a
//!     cert_subject: "CN=bank-a,O=Example"
//!     roles: ["participant:bank_a"]
//! ```
//!
//! Only hashes are stored, so the file is not a list of passwords; it is
//! still worth keeping private (it says who may do what). Unknown keys are
//! errors, so `token: …` (a plaintext token by mistake) is refused rather
//! than ignored. Errors name the entry and field, never a value.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;

use super::{Principal, Role};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    principals: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    #[serde(default)]
    token_sha256: Option<String>,
    #[serde(default)]
    cert_subject: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
}

/// The principals of an auth file, indexed for lookups.
#[derive(Debug, Default)]
pub struct Principals {
    /// By the SHA-256 of their token.
    pub by_token: HashMap<[u8; 32], Arc<Principal>>,
    /// By their client certificate's subject (normalised).
    pub by_subject: HashMap<String, Arc<Principal>>,
}

/// Parses an auth file's text.
pub fn parse(text: &str) -> Result<Principals, String> {
    let file: File = serde_norway::from_str(text).map_err(|e| {
        // serde_norway's messages name keys and positions, not values.
        format!("not an auth file ({e})")
    })?;
    let mut out = Principals::default();
    let mut names = std::collections::HashSet::new();
    for (i, e) in file.principals.into_iter().enumerate() {
        let at = |field: &str| format!("principals[{i}].{field}");
        let name = super::clean_name(&e.name).ok_or_else(|| {
            format!(
                "{}: must be 1 to {} printable characters",
                at("name"),
                super::ACTOR_CHARS_MAX
            )
        })?;
        if !names.insert(name.clone()) {
            return Err(format!("{}: {name:?} appears twice", at("name")));
        }
        let roles = e
            .roles
            .iter()
            .enumerate()
            .map(|(j, r)| {
                Role::parse(r).map_err(|why| format!("{}: {why}", at(&format!("roles[{j}]"))))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if e.token_sha256.is_none() && e.cert_subject.is_none() {
            return Err(format!(
                "{}: give token_sha256 or cert_subject (or both)",
                at("name")
            ));
        }
        let principal = Arc::new(Principal::named(name, roles));
        if let Some(hex) = &e.token_sha256 {
            let digest = hex_digest(hex)
                .ok_or_else(|| format!("{}: must be 64 hex digits", at("token_sha256")))?;
            if out.by_token.insert(digest, principal.clone()).is_some() {
                return Err(format!(
                    "{}: the same token is given twice",
                    at("token_sha256")
                ));
            }
        }
        if let Some(subject) = &e.cert_subject {
            let key = normalise_subject(subject);
            if key.is_empty() {
                return Err(format!("{}: is empty", at("cert_subject")));
            }
            if out.by_subject.insert(key, principal).is_some() {
                return Err(format!(
                    "{}: the same subject is given twice",
                    at("cert_subject")
                ));
            }
        }
    }
    Ok(out)
}

fn hex_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// A subject as compared: `TYPE=value` parts trimmed, joined by `,`.
pub fn normalise_subject(s: &str) -> String {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8";

    #[test]
    fn a_good_file() {
        let p = parse(&format!(
            "principals:\n  - name: checkout\n    token_sha256: {HASH}\n    roles: [client, viewer]\n  \
             - name: bank-a\n    cert_subject: 'CN=bank-a, O=Example'\n    roles: ['participant:bank_a']\n"
        ))
        .expect("parses");
        assert_eq!(p.by_token.len(), 1);
        let bank = &p.by_subject["CN=bank-a,O=Example"];
        assert_eq!(bank.name, "bank-a");
        assert_eq!(bank.roles, vec![Role::Participant("bank_a".into())]);
    }

    #[test]
    fn mistakes_name_the_field_and_never_the_value() {
        let cases = [
            ("principals:\n  - name: a\n    token: hunter2hunter2\n", "unknown field `token`"),
            ("principals:\n  - name: a\n    token_sha256: abc\n", "principals[0].token_sha256"),
            (
                &format!("principals:\n  - name: a\n    token_sha256: {HASH}\n    roles: [root]\n"),
                "principals[0].roles[0]",
            ),
            ("principals:\n  - name: a\n", "principals[0].name: give token_sha256"),
            (
                &format!(
                    "principals:\n  - {{name: a, token_sha256: {HASH}}}\n  - {{name: a, cert_subject: CN=x}}\n"
                ),
                "principals[1].name",
            ),
            (
                &format!(
                    "principals:\n  - {{name: a, token_sha256: {HASH}}}\n  - {{name: b, token_sha256: {HASH}}}\n"
                ),
                "the same token",
            ),
            ("- just a list\n", "not an auth file"),
        ];
        for (text, want) in cases {
            let err = parse(text).expect_err(text);
            assert!(err.contains(want), "{err:?} should mention {want:?}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }
}
