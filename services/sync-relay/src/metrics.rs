//! The relay's own metrics (the Kinesis source and the gRPC server add theirs). Names get the
//! `mall_sync_relay_` prefix from the registry; label values come from bounded sets.

use mall_telemetry::metrics::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

/// Counters of both stages; cheap to clone.
#[derive(Debug, Clone)]
pub struct RelayMetrics {
    /// `changes_received_total{source}`: changes read from `kinesis` or `grpc`.
    pub received: IntCounterVec,
    /// `changes_quarantined_total{stage}`: records put in the quarantine by `ingest`
    /// (undecodable or invalid) or `apply` (refused by the catalog).
    pub quarantined: IntCounterVec,
    /// `queue_messages_sent_total`: lane messages the queue accepted.
    pub messages_sent: IntCounter,
    /// `changes_applied_total{outcome}`: catalog items APPLIED, PENDING (waiting for their
    /// product's creation) or STALE.
    pub applied: IntCounterVec,
    /// `catalog_calls_total{code}`: BulkUpdateProducts calls by gRPC status code.
    pub catalog_calls: IntCounterVec,
    /// `apply_retries_total{kind}`: `transient` retries (the catalog is unavailable; kept in
    /// flight), `operator` retries (the catalog refuses requests as a whole; kept in flight)
    /// and `released` messages (given back to the queue, counting toward dead-lettering).
    pub apply_retries: IntCounterVec,
    /// `change_latency_seconds`: from a change's event time to its lane being applied.
    pub latency: Histogram,
    /// `queue_messages{state}`: lane messages `visible` (the backlog), `in_flight` and `dead`
    /// (refreshed every 10 s; approximate on SQS).
    pub queue: IntGaugeVec,
}

impl RelayMetrics {
    /// Registers the metrics in `registry`.
    ///
    /// # Errors
    /// When they are already registered there.
    pub fn register(registry: &Registry) -> mall_telemetry::metrics::Result<Self> {
        let metrics = Self {
            received: IntCounterVec::new(
                Opts::new("changes_received_total", "Product changes read, by source"),
                &["source"],
            )?,
            quarantined: IntCounterVec::new(
                Opts::new(
                    "changes_quarantined_total",
                    "Records quarantined, by the stage that refused them",
                ),
                &["stage"],
            )?,
            messages_sent: IntCounter::new(
                "queue_messages_sent_total",
                "Lane messages the queue accepted",
            )?,
            applied: IntCounterVec::new(
                Opts::new(
                    "changes_applied_total",
                    "Catalog writes by outcome (applied, pending, stale)",
                ),
                &["outcome"],
            )?,
            catalog_calls: IntCounterVec::new(
                Opts::new(
                    "catalog_calls_total",
                    "BulkUpdateProducts calls by gRPC status code",
                ),
                &["code"],
            )?,
            apply_retries: IntCounterVec::new(
                Opts::new(
                    "apply_retries_total",
                    "Apply retries: transient or operator (messages kept in flight) or released (back to the queue)",
                ),
                &["kind"],
            )?,
            latency: Histogram::with_opts(
                HistogramOpts::new(
                    "change_latency_seconds",
                    "From a change's event time to its lane's apply in the catalog",
                )
                .buckets(vec![
                    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                ]),
            )?,
            queue: IntGaugeVec::new(
                Opts::new("queue_messages", "Lane queue messages by state"),
                &["state"],
            )?,
        };
        registry.register(Box::new(metrics.received.clone()))?;
        registry.register(Box::new(metrics.quarantined.clone()))?;
        registry.register(Box::new(metrics.messages_sent.clone()))?;
        registry.register(Box::new(metrics.applied.clone()))?;
        registry.register(Box::new(metrics.catalog_calls.clone()))?;
        registry.register(Box::new(metrics.apply_retries.clone()))?;
        registry.register(Box::new(metrics.latency.clone()))?;
        registry.register(Box::new(metrics.queue.clone()))?;
        // Every label set exists from the start, so dashboards and alerts see a zero, not
        // nothing, before the first event.
        let preset: [(&IntCounterVec, &[&str]); 5] = [
            (&metrics.received, &["kinesis", "grpc"]),
            (&metrics.quarantined, &["ingest", "apply"]),
            (&metrics.applied, &["applied", "pending", "stale"]),
            (&metrics.catalog_calls, &["OK"]),
            (
                &metrics.apply_retries,
                &["transient", "operator", "released"],
            ),
        ];
        for (counter, values) in preset {
            for value in values {
                counter.with_label_values(&[value]);
            }
        }
        for state in ["visible", "in_flight", "dead"] {
            metrics.queue.with_label_values(&[state]);
        }
        Ok(metrics)
    }
}
