//! Token buckets per key: the per-principal rate of StartSaga and
//! RegisterDefinition (gRPC edge) and the failed credentials one address
//! may present to the admin server (HTTP edge).
//!
//! ```text
//!   key ──► Bucket { tokens ≤ burst, refilled at rate/s }
//!   take(): a token, or Err(wait until the next one)
//! ```
//!
//! Time is an argument, so the arithmetic is tested without a clock. The
//! map is bounded: past [`KEYS_MAX`] keys, the buckets that are full again
//! (idle keys) are dropped before a new one is added, and if none is, the
//! new key shares the fate of a missing bucket: it is refused until others
//! refill.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most keys remembered at once.
pub const KEYS_MAX: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by key.
#[derive(Debug)]
pub struct KeyedBuckets {
    rate_per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl KeyedBuckets {
    /// `rate_per_sec` tokens a second, at most `burst` saved up.
    pub fn new(rate_per_sec: f64, burst: u32) -> KeyedBuckets {
        KeyedBuckets {
            rate_per_sec,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `key` at `now`, or says how long until one is due.
    pub fn take(&self, key: &str, now: Instant) -> Result<(), Duration> {
        self.with_bucket(key, now, |b| {
            if b.tokens >= 1.0 {
                b.tokens -= 1.0;
                Ok(())
            } else {
                Err(self.wait(b.tokens))
            }
        })
    }

    /// Whether `key` has a token at `now`, without taking it.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
        self.with_bucket(key, now, |b| {
            if b.tokens >= 1.0 {
                Ok(())
            } else {
                Err(self.wait(b.tokens))
            }
        })
    }

    fn wait(&self, tokens: f64) -> Duration {
        if self.rate_per_sec <= 0.0 {
            return Duration::from_secs(60);
        }
        Duration::from_secs_f64(((1.0 - tokens) / self.rate_per_sec).clamp(0.001, 3_600.0))
    }

    fn with_bucket(
        &self,
        key: &str,
        now: Instant,
        f: impl FnOnce(&mut Bucket) -> Result<(), Duration>,
    ) -> Result<(), Duration> {
        let mut all = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = all.get_mut(key) {
            let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
            b.tokens = (b.tokens + elapsed * self.rate_per_sec).min(self.burst);
            b.at = now;
            return f(b);
        }
        if all.len() >= KEYS_MAX {
            let (rate, burst) = (self.rate_per_sec, self.burst);
            all.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
            if all.len() >= KEYS_MAX {
                return Err(self.wait(0.0));
            }
        }
        let mut b = Bucket {
            tokens: self.burst,
            at: now,
        };
        let out = f(&mut b);
        all.insert(key.to_owned(), b);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let b = KeyedBuckets::new(10.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(b.take("ci", t0), Ok(()));
        }
        let wait = b.take("ci", t0).expect_err("empty");
        assert!(
            wait > Duration::from_millis(90) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        assert_eq!(b.take("other", t0), Ok(()), "keys are apart");
        assert_eq!(b.check("ci", t0 + Duration::from_millis(100)), Ok(()));
        assert_eq!(b.take("ci", t0 + Duration::from_millis(100)), Ok(()));
        assert!(b.take("ci", t0 + Duration::from_millis(100)).is_err());
        // A long pause refills up to the burst only.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(b.take("ci", later), Ok(()));
        }
        assert!(b.take("ci", later).is_err());
    }

    #[test]
    fn check_does_not_take() {
        let b = KeyedBuckets::new(1.0, 1);
        let t0 = Instant::now();
        assert_eq!(b.check("a", t0), Ok(()));
        assert_eq!(b.check("a", t0), Ok(()));
        assert_eq!(b.take("a", t0), Ok(()));
        assert!(b.check("a", t0).is_err());
    }
}
