//! Background upkeep: delete changes past their retention, forgotten request ids and pending
//! products whose creation never came, and keep the change-log and pending gauges current.

use std::time::Duration;

use mall_grpc::ServiceError;
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::CatalogMetrics,
    store::{Store, micros, now},
};

/// Changes deleted per transaction, so writers wait at most a moment for a prune.
const PRUNE_BATCH: u64 = 5_000;
/// Pending products expired per round; the rest wait for the next round.
const EXPIRE_BATCH: u64 = 1_000;
/// Codes of expired pending products named in the log line; the count has the total.
const LOGGED_CODES: usize = 20;

/// The upkeep task; [`Maintenance::run_once`] is one round, for tests and the loop.
#[derive(Debug, Clone)]
pub struct Maintenance {
    /// The catalog's tables.
    pub store: Store,
    /// Gauges to update.
    pub metrics: CatalogMetrics,
    /// How long changes are kept.
    pub change_retention: Duration,
    /// How long request ids are remembered.
    pub request_id_retention: Duration,
    /// How long pending products are kept.
    pub pending_retention: Duration,
}

impl Maintenance {
    /// Runs a round every `interval` until `shutdown`; a failed round is logged and retried
    /// at the next one.
    ///
    /// # Errors
    /// Never; the signature suits `GrpcServer::spawn`.
    pub async fn run(self, interval: Duration, shutdown: CancellationToken) -> anyhow::Result<()> {
        loop {
            if let Err(error) = self.run_once().await {
                tracing::warn!(%error, "catalog maintenance failed; retrying next round");
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// Prunes what expired and refreshes the gauges.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn run_once(&self) -> Result<(), ServiceError> {
        let now = micros(now());
        let changes = self
            .store
            .prune_changes(now - as_micros(self.change_retention), PRUNE_BATCH)
            .await?;
        let requests = self
            .store
            .prune_request_ids(now - as_micros(self.request_id_retention))
            .await?;
        if changes > 0 || requests > 0 {
            tracing::info!(changes, requests, "pruned expired changes and request ids");
        }
        let expired = self
            .store
            .expire_pending(now - as_micros(self.pending_retention), EXPIRE_BATCH)
            .await?;
        if !expired.is_empty() {
            self.metrics.pending_expired.inc_by(expired.len() as u64);
            // Product codes are not personal data; they let the producer find its typo.
            tracing::warn!(
                count = expired.len(),
                codes = ?&expired[..expired.len().min(LOGGED_CODES)],
                retention_secs = self.pending_retention.as_secs(),
                "deleted pending products whose creating change never arrived"
            );
        }
        self.metrics
            .pending
            .set(i64::try_from(self.store.count_pending().await?).unwrap_or(i64::MAX));
        let position = self.store.change_log_position().await?;
        self.metrics.head.set(position.head.seq);
        let oldest = self.store.oldest_change_time().await?;
        self.metrics
            .oldest_age
            .set(oldest.map_or(0, |t| (now - t).max(0) / 1_000_000));
        Ok(())
    }
}

fn as_micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}
