//! The catalog's own metrics (the gRPC server adds request counts and latency by method and
//! code). Names get the `mall_product_catalog_` prefix from the registry.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Counters and gauges of the catalog; cheap to clone.
#[derive(Debug, Clone)]
pub struct CatalogMetrics {
    /// `write_items_total{source, outcome}`: items written by BulkUpdateProducts (`bulk`) and
    /// ImportProducts (`import`), by APPLIED / STALE / INVALID (import only).
    pub items: IntCounterVec,
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
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = Self {
            items: IntCounterVec::new(
                Opts::new(
                    "write_items_total",
                    "Product writes by source (bulk, import) and outcome (applied, stale, invalid)",
                ),
                &["source", "outcome"],
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
        registry.register(Box::new(metrics.retries.clone()))?;
        registry.register(Box::new(metrics.head.clone()))?;
        registry.register(Box::new(metrics.oldest_age.clone()))?;
        registry.register(Box::new(metrics.watchers.clone()))?;
        registry.register(Box::new(metrics.watch_lag.clone()))?;
        Ok(metrics)
    }
}
