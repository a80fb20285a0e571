//! Helpers shared by the domain's tests and the worker's simulation: small
//! definitions by kind letters, a seedable random source, random answers.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::*;

/// A fixed start time.
pub fn now() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default()
}

/// Retries with short backoffs.
pub fn policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(10),
        multiplier: 2.0,
        max_backoff: Duration::from_millis(100),
    }
}

/// `kinds`: 'c' compensatable, 'p' pivot, 'r' retriable; upper case = not
/// idempotent.
pub fn def(kinds: &str) -> Definition {
    let steps = kinds
        .chars()
        .enumerate()
        .map(|(i, k)| StepDefinition {
            name: format!("s{i}"),
            participant: "svc".into(),
            action: format!("s{i}.do"),
            compensation: k.eq_ignore_ascii_case(&'c').then(|| format!("s{i}.undo")),
            idempotent: k.is_ascii_lowercase(),
            timeout: Duration::from_secs(1),
            retry: policy(3),
            compensation_retry: policy(3),
        })
        .collect();
    Definition {
        name: "d".into(),
        version: 1,
        steps,
        deadline: None,
    }
}

/// splitmix64: small, deterministic, seedable.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A definition of one to five steps of random kinds.
pub fn random_definition(rng: &mut Rng) -> Definition {
    let n = 1 + rng.below(5) as usize;
    let pivot = rng.below(n as u64 + 1) as usize; // n = no pivot
    let kinds: String = (0..n)
        .map(|i| {
            let k = if i < pivot {
                'c'
            } else if i == pivot {
                'p'
            } else {
                'r'
            };
            if i <= pivot && rng.below(3) == 0 {
                k.to_ascii_uppercase()
            } else {
                k
            }
        })
        .collect();
    def(&kinds)
}

/// A participant's answer, drawn.
pub fn random_result(rng: &mut Rng, phase: Phase) -> CallResult {
    match rng.below(100) {
        0..=54 => CallResult::Succeeded(None),
        55..=64 if phase == Phase::Action => CallResult::Failed("no".into()),
        55..=74 => CallResult::Retry("later".into()),
        75..=96 => CallResult::Transient("UNAVAILABLE".into()),
        _ => CallResult::Misconfigured("UNIMPLEMENTED".into()),
    }
}
