//! The catalog's own metrics (the gRPC server adds request counts and latency by method and
//! code). Names get the `mall_product_catalog_` prefix from the registry.

use mall_proto::catalog::v1::UpdateOutcome;
use mall_telemetry::metrics::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// Counters and gauges of the catalog; cheap to clone.
#[derive(Debug, Clone)]
pub struct CatalogMetrics {
    /// `write_items_total{source, outcome}`: items written by BulkUpdateProducts (`bulk`) and
    /// ImportProducts (`import`), by applied / pending / stale / invalid (import only).
    pub items: IntCounterVec,
    /// `pending_products`: products whose partial changes wait for the change that creates
    /// them (refreshed by maintenance).
    pub pending: IntGauge,
    /// `pending_products_expired_total`: pending products deleted because their creation
    /// never arrived.
    pub pending_expired: IntCounter,
    /// `write_retries_total`: write transactions retried after a conflict.
    pub retries: IntCounter,
    /// `change_log_head`: highest change-log sequence number committed.
    pub head: IntGauge,
    /// `change_log_oldest_age_seconds`: age of the oldest retained change.
    pub oldest_age: IntGauge,
    /// `watch_streams`: WatchProductChanges streams open now.
    pub watchers: IntGauge,
    /// `watch_lag_changes`: how many changes a watch stream was behind the head each time it
    /// looked (0 when caught up).
    pub watch_lag: Histogram,
}

impl CatalogMetrics {
    /// Registers the metrics in `registry`.
    ///
    /// # Errors
    /// When they are already registered there.
    pub fn register(registry: &Registry) -> mall_telemetry::metrics::Result<Self> {
        let metrics = Self {
            items: IntCounterVec::new(
                Opts::new(
                    "write_items_total",
                    "Product writes by source (bulk, import) and outcome (applied, pending, stale, invalid)",
                ),
                &["source", "outcome"],
            )?,
            pending: IntGauge::new(
                "pending_products",
                "Products whose partial changes wait for the change that creates them",
            )?,
            pending_expired: IntCounter::new(
                "pending_products_expired_total",
                "Pending products deleted because the change creating them never arrived",
            )?,
            retries: IntCounter::new(
                "write_retries_total",
                "Write transactions retried after a serialization failure, deadlock or busy database",
            )?,
            head: IntGauge::new(
                "change_log_head",
                "Highest change-log sequence number committed",
            )?,
            oldest_age: IntGauge::new(
                "change_log_oldest_age_seconds",
                "Age of the oldest change kept for WatchProductChanges",
            )?,
            watchers: IntGauge::new("watch_streams", "WatchProductChanges streams open now")?,
            watch_lag: Histogram::with_opts(
                HistogramOpts::new(
                    "watch_lag_changes",
                    "Changes a watch stream was behind the change-log head when it looked",
                )
                .buckets(vec![0.0, 1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0]),
            )?,
        };
        registry.register(Box::new(metrics.items.clone()))?;
        registry.register(Box::new(metrics.pending.clone()))?;
        registry.register(Box::new(metrics.pending_expired.clone()))?;
        for source in ["bulk", "import"] {
            for outcome in ["applied", "pending", "stale", "invalid"] {
                metrics.items.with_label_values(&[source, outcome]);
            }
        }
        registry.register(Box::new(metrics.retries.clone()))?;
        registry.register(Box::new(metrics.head.clone()))?;
        registry.register(Box::new(metrics.oldest_age.clone()))?;
        registry.register(Box::new(metrics.watchers.clone()))?;
        registry.register(Box::new(metrics.watch_lag.clone()))?;
        Ok(metrics)
    }
}

impl CatalogMetrics {
    /// Counts one item of `source` (`bulk` or `import`) with `outcome`; UNSPECIFIED is a
    /// refused (invalid) item.
    pub fn count_item(&self, source: &str, outcome: UpdateOutcome) {
        let label = match outcome {
            UpdateOutcome::Applied => "applied",
            UpdateOutcome::Pending => "pending",
            UpdateOutcome::Stale => "stale",
            UpdateOutcome::Unspecified => "invalid",
        };
        self.items.with_label_values(&[source, label]).inc();
    }
}
