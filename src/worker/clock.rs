//! The database clock, as seen from this process.
//!
//! Leases and deadlines are compared by PostgreSQL against its own `now()`.
//! The worker needs the same clock to plan (is a backoff over? has the
//! deadline passed?), so it keeps the offset between the database's `now()`
//! — returned by every claim and write — and the local wall clock.

use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Utc};

/// Estimates the database's `now()`.
#[derive(Debug, Default)]
pub struct DbClock {
    offset_micros: AtomicI64,
}

impl DbClock {
    /// Records a `now()` the database just returned.
    pub fn observe(&self, db_now: DateTime<Utc>) {
        let offset = (db_now - Utc::now()).num_microseconds().unwrap_or(0);
        self.offset_micros.store(offset, Ordering::Relaxed);
    }

    /// The database's time, estimated.
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + chrono::Duration::microseconds(self.offset_micros.load(Ordering::Relaxed))
    }
}
