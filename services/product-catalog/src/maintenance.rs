//! Background upkeep: delete changes past their retention and forgotten request ids, and
//! keep the change-log gauges current.

use std::time::Duration;

use mall_grpc::ServiceError;
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::CatalogMetrics,
    store::{Store, micros, now},
};

/// Changes deleted per transaction, so writers wait at most a moment for a prune.
const PRUNE_BATCH: i64 = 5_000;

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
        let position = self.store.change_log_position().await?;
        self.metrics.head.set(position.head);
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
