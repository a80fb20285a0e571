//! Fuzzing the parsers that take input from outside, with proptest (every
//! target is pure, so no harness beyond `cargo test` is needed): definition
//! validation, JSON limits, page tokens, the auth file, JWTs and DER. Each
//! runs 256 cases in `cargo test`; for a longer run:
//!
//! ```sh
//! PROPTEST_CASES=200000 cargo test --release --test fuzz
//! ```
//!
//! The properties: no panic, errors name a field and never echo a secret,
//! and what is accepted round-trips or keeps its invariants. Cases that
//! found bugs are kept as fixed examples at the end.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use saga_coordinator::api::convert::definition_in;
use saga_coordinator::auth::{der, file, jwt};
use saga_coordinator::domain::{depth_beyond, Defaults, JsonLimits, STEPS_MAX};
use saga_coordinator::ops::{decode_page_token, encode_page_token};
use saga_coordinator::proto;

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9_.-]{0,12}",
        "\\PC{0,20}",
        Just(String::new()),
        Just("x".repeat(200)),
    ]
}

fn duration() -> impl Strategy<Value = Option<prost_types::Duration>> {
    prop_oneof![
        Just(None),
        (any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| Some(prost_types::Duration { seconds, nanos })),
        (0i64..7_200).prop_map(|seconds| Some(prost_types::Duration { seconds, nanos: 0 })),
    ]
}

fn retry() -> impl Strategy<Value = Option<proto::RetryPolicy>> {
    prop_oneof![
        Just(None),
        (any::<u32>(), duration(), any::<f64>(), duration()).prop_map(
            |(max_attempts, initial_backoff, multiplier, max_backoff)| {
                Some(proto::RetryPolicy {
                    max_attempts,
                    initial_backoff,
                    multiplier,
                    max_backoff,
                })
            }
        ),
    ]
}

fn step() -> impl Strategy<Value = proto::StepDefinition> {
    (
        name(),
        name(),
        name(),
        name(),
        any::<bool>(),
        duration(),
        retry(),
        retry(),
    )
        .prop_map(
            |(
                name,
                participant,
                action,
                compensation,
                idempotent,
                timeout,
                retry,
                compensation_retry,
            )| {
                proto::StepDefinition {
                    name,
                    participant,
                    action,
                    compensation,
                    idempotent,
                    timeout,
                    retry,
                    compensation_retry,
                }
            },
        )
}

proptest! {
    #[test]
    fn fuzz_definition_validation(
        name in name(),
        steps in prop::collection::vec(step(), 0..6),
        deadline in duration(),
    ) {
        let def = proto::SagaDefinition { name, steps, deadline, ..Default::default() };
        match definition_in(Some(def)).and_then(|d| d.validate(&Defaults::default())) {
            Ok(d) => {
                prop_assert!(!d.steps.is_empty() && d.steps.len() <= STEPS_MAX);
                prop_assert!(d.name.len() <= 128);
            }
            Err(e) => prop_assert!(!e.field.is_empty(), "{e}"),
        }
    }

    #[test]
    fn fuzz_json_limits(text in "\\PC{0,64}|[\\[\\]{}\":,0-9a ]{0,64}") {
        let limits = JsonLimits { bytes_max: 1 << 10, depth_max: 4 };
        let verdict = limits.check(&text);
        if verdict.is_ok() {
            prop_assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok());
            prop_assert!(depth_beyond(&text, 4).is_none());
        }
    }

    #[test]
    fn fuzz_json_depth_agrees_with_the_parser(depth in 0usize..12, wide in 0usize..3) {
        let mut text = String::from("1");
        for i in 0..depth {
            text = if i % 2 == 0 {
                format!("[{}{text}]", "0,".repeat(wide))
            } else {
                format!(r#"{{"k{wide}": {text}}}"#)
            };
        }
        let limits = JsonLimits { bytes_max: 1 << 10, depth_max: 6 };
        prop_assert_eq!(limits.check(&text).is_ok(), depth <= 6, "{}", text);
    }

    #[test]
    fn fuzz_page_tokens(token in "\\PC{0,60}|[A-Za-z0-9_-]{0,80}") {
        let _ = decode_page_token(&token);
    }

    #[test]
    fn fuzz_page_tokens_round_trip(micros in 0i64..253_402_300_799_000_000, id in any::<u128>()) {
        let at = chrono::DateTime::from_timestamp_micros(micros).unwrap();
        let id = uuid::Uuid::from_u128(id);
        prop_assert_eq!(decode_page_token(&encode_page_token((at, id))).unwrap(), Some((at, id)));
    }

    #[test]
    fn fuzz_auth_file(text in "\\PC{0,200}", secret in "[a-z]{12}") {
        let text = format!("principals:\n  - {{name: x, token: SECRET{secret}, {text}}}\n");
        if let Err(e) = file::parse(&text) {
            prop_assert!(!e.contains(&format!("SECRET{secret}")), "{}", e);
        }
        let _ = file::parse(&text.replace("token:", "token_sha256:"));
    }

    #[test]
    fn fuzz_jwt(header in "\\PC{0,40}", payload in "\\PC{0,80}", sig in prop::collection::vec(any::<u8>(), 0..70)) {
        use base64::Engine as _;
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let keys = jwt::JwtKeys::parse(b"0123456789abcdef0123456789abcdef").unwrap();
        let token = format!("{}.{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()), b64(&sig));
        prop_assert!(keys.verify(&token, &jwt::JwtRules::default(), 1_800_000_000).is_err());
        let raw = format!("{header}.{payload}");
        let _ = keys.verify(&raw, &jwt::JwtRules::default(), 0);
    }

    #[test]
    fn fuzz_jwt_keys(bytes in prop::collection::vec(any::<u8>(), 0..300), text in "\\PC{0,200}") {
        let _ = jwt::JwtKeys::parse(&bytes);
        let _ = jwt::JwtKeys::parse(format!("-----BEGIN PUBLIC KEY-----\n{text}\n-----END PUBLIC KEY-----\n").as_bytes());
        let _ = jwt::JwtKeys::parse(format!(r#"{{"keys": [{text}]}}"#).as_bytes());
    }

    #[test]
    fn fuzz_der(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = der::certificate_subject(&bytes);
        let _ = der::spki(&bytes);
    }
}

/// What fuzzing and trying from outside found, kept.
#[test]
fn found_cases_stay_fixed() {
    // A DER length of 0x84 0xff.. claimed more than the input holds.
    assert!(der::spki(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_err());
    // A forged cursor far before 1970 reached PostgreSQL as a timestamp.
    use base64::Engine as _;
    let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("-1000000000000000000:{}", uuid::Uuid::new_v4()));
    assert!(decode_page_token(&forged).is_err());
    // Deep nesting went to serde_json's recursion limit.
    let deep = "[".repeat(100_000);
    let limits = JsonLimits {
        bytes_max: 1 << 20,
        depth_max: 64,
    };
    assert!(limits.check(&deep).unwrap_err().contains("the limit is 64"));
}
