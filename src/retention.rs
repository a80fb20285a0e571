//! Retention: settled sagas (COMPLETED, COMPENSATED, RESOLVED) and their
//! history are deleted `--retention-days` after they settled, so the tables
//! do not grow without bound.
//!
//! ```text
//!   every minute: purge ≤ 500 oldest settled sagas ─┬─ 500 deleted: again, after a pause
//!                                                    └─ fewer: done until the next round
//! ```
//!
//! Each batch is one short statement through a partial index of the
//! settled sagas; rows another coordinator's purge holds are skipped, not
//! waited for, so every coordinator may run this at once. Running sagas and
//! SUSPENDED ones (which wait for an operator) are never touched.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::SagaStore;
use crate::worker::Worker;

/// Sagas deleted per statement.
pub const BATCH_ROWS: u32 = 500;
/// How often a round starts.
const ROUND_EVERY: Duration = Duration::from_secs(60);
/// Between batches of one round: other writes go first.
const BATCH_PAUSE: Duration = Duration::from_millis(20);

/// Deletes settled sagas older than `keep` until `stop`.
pub async fn run(
    store: Arc<dyn SagaStore>,
    worker: Arc<Worker>,
    metrics: Arc<Metrics>,
    keep: Duration,
    stop: CancellationToken,
) {
    let keep = chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::MAX);
    loop {
        round(&*store, &worker, &metrics, keep, &stop).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(ROUND_EVERY) => {}
        }
    }
}

async fn round(
    store: &dyn SagaStore,
    worker: &Worker,
    metrics: &Metrics,
    keep: chrono::Duration,
    stop: &CancellationToken,
) {
    while !stop.is_cancelled() {
        let before = worker.db_now() - keep;
        match store.saga_purge(before, BATCH_ROWS).await {
            Ok(n) => {
                metrics.sagas_purged(n);
                if n > 0 {
                    tracing::debug!(deleted = n, "retention: deleted settled sagas");
                }
                if n < u64::from(BATCH_ROWS) {
                    return;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "retention: deleting settled sagas failed; next round");
                return;
            }
        }
        tokio::time::sleep(BATCH_PAUSE).await;
    }
}
