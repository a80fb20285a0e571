//! Backoff: exponential growth of an upper bound, then full jitter.
//!
//! Pure: the random draw comes in as `jitter` in `[0, 1)`.

use std::time::Duration;

use super::RetryPolicy;

/// The upper bound of the wait after the `n`-th failed attempt of the budget
/// (`n` from 1): `min(max_backoff, initial_backoff * multiplier^(n-1))`.
pub fn backoff_cap(policy: &RetryPolicy, n: u32) -> Duration {
    let exp = n.saturating_sub(1).min(1_000) as i32;
    let cap_secs = policy.initial_backoff.as_secs_f64() * policy.multiplier.powi(exp);
    let max = policy.max_backoff;
    if !cap_secs.is_finite() || cap_secs >= max.as_secs_f64() {
        max
    } else {
        Duration::from_secs_f64(cap_secs)
    }
}

/// Full jitter: a wait drawn uniformly from `[0, backoff_cap)`.
pub fn backoff(policy: &RetryPolicy, n: u32, jitter: f64) -> Duration {
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    backoff_cap(policy, n).mul_f64(jitter)
}

/// Whether attempt number `attempt` (total, 1-based) still leaves budget for
/// another one, counting from `budget_from`.
pub fn has_budget(policy: &RetryPolicy, attempt: u32, budget_from: u32) -> bool {
    attempt.saturating_sub(budget_from) < policy.max_attempts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            multiplier: 2.0,
            max_backoff: Duration::from_millis(500),
        }
    }

    #[test]
    fn cap_grows_then_stops_at_max() {
        let caps: Vec<u128> = (1..=6)
            .map(|n| backoff_cap(&policy(), n).as_millis())
            .collect();
        assert_eq!(caps, vec![100, 200, 400, 500, 500, 500]);
    }

    #[test]
    fn jittered_wait_stays_within_cap() {
        for n in 1..=8 {
            for j in 0..=100 {
                let jitter = j as f64 / 100.0;
                let d = backoff(&policy(), n, jitter);
                assert!(
                    d <= backoff_cap(&policy(), n),
                    "n={n} jitter={jitter} d={d:?}"
                );
            }
        }
        assert_eq!(backoff(&policy(), 3, 0.0), Duration::ZERO);
        assert_eq!(backoff(&policy(), 3, f64::NAN), Duration::ZERO);
    }

    #[test]
    fn huge_attempt_numbers_do_not_overflow() {
        assert_eq!(backoff_cap(&policy(), u32::MAX), Duration::from_millis(500));
    }

    #[test]
    fn budget_counts_from_operator_retry() {
        let p = policy();
        assert!(has_budget(&p, 4, 0));
        assert!(!has_budget(&p, 5, 0));
        assert!(has_budget(&p, 5, 1));
        assert!(!has_budget(&p, 6, 1));
    }
}
