//! Prometheus metrics of the Kinesis source, registered on the relay's registry (which adds
//! the `mall_sync_relay_` prefix). Shard ids are label values: a stream has a bounded number
//! of shards, and series of shards this replica no longer reads are removed.

use mall_telemetry::metrics::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use super::call::Operation;

/// The source's counters and gauges; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct KinesisMetrics {
    /// Kinesis calls by operation and outcome (ok, throttled, expired_iterator, not_found,
    /// in_use, error): throttles and iterator expiries included.
    calls: IntCounterVec,
    /// Records read, by shard.
    records_read: IntCounterVec,
    /// Batches handed to the sink, by outcome (ok, failed).
    deliveries: IntCounterVec,
    /// MillisBehindLatest of the last read, by shard this replica reads.
    millis_behind: IntGaugeVec,
    /// Lease changes by kind: taken, stolen, lost, released, finished.
    lease_events: IntCounterVec,
    /// Leases this replica holds.
    leases_held: IntGauge,
    /// Readers of this replica parked because the relay is paused.
    readers_paused: IntGauge,
    /// Failed lease renewals (the database did not answer).
    renew_failures: IntCounter,
}

impl KinesisMetrics {
    /// Registers the metrics in `registry`.
    ///
    /// # Errors
    /// When they are already registered there.
    pub(crate) fn register(registry: &Registry) -> mall_telemetry::metrics::Result<Self> {
        let metrics = Self {
            calls: IntCounterVec::new(
                Opts::new(
                    "kinesis_calls_total",
                    "Kinesis calls, by operation and outcome (ok, throttled, expired_iterator, not_found, in_use, error)",
                ),
                &["operation", "outcome"],
            )?,
            records_read: IntCounterVec::new(
                Opts::new(
                    "kinesis_records_read_total",
                    "Kinesis records read, by shard",
                ),
                &["shard_id"],
            )?,
            deliveries: IntCounterVec::new(
                Opts::new(
                    "kinesis_deliveries_total",
                    "Batches of Kinesis records handed to the queue stage, by outcome (ok, failed)",
                ),
                &["outcome"],
            )?,
            millis_behind: IntGaugeVec::new(
                Opts::new(
                    "kinesis_millis_behind_latest",
                    "How far this replica's reader of a shard is behind its newest record",
                ),
                &["shard_id"],
            )?,
            lease_events: IntCounterVec::new(
                Opts::new(
                    "kinesis_lease_events_total",
                    "Shard lease changes of this replica, by kind (taken, stolen, lost, released, finished, stalled)",
                ),
                &["kind"],
            )?,
            leases_held: IntGauge::new("kinesis_leases_held", "Shard leases this replica holds")?,
            readers_paused: IntGauge::new(
                "kinesis_readers_paused",
                "Shard readers of this replica waiting because the relay is paused",
            )?,
            renew_failures: IntCounter::new(
                "kinesis_lease_renew_failures_total",
                "Lease renewals that failed because the database did not answer",
            )?,
        };
        registry.register(Box::new(metrics.calls.clone()))?;
        registry.register(Box::new(metrics.records_read.clone()))?;
        registry.register(Box::new(metrics.deliveries.clone()))?;
        registry.register(Box::new(metrics.millis_behind.clone()))?;
        registry.register(Box::new(metrics.lease_events.clone()))?;
        registry.register(Box::new(metrics.leases_held.clone()))?;
        registry.register(Box::new(metrics.readers_paused.clone()))?;
        registry.register(Box::new(metrics.renew_failures.clone()))?;
        Ok(metrics)
    }

    pub(crate) fn call(&self, operation: Operation, outcome: &str) {
        self.calls
            .with_label_values(&[operation.as_str(), outcome])
            .inc();
    }

    pub(crate) fn records_read(&self, shard_id: &str, count: usize) {
        self.records_read
            .with_label_values(&[shard_id])
            .inc_by(u64::try_from(count).unwrap_or(u64::MAX));
    }

    pub(crate) fn delivered(&self, ok: bool) {
        self.deliveries
            .with_label_values(&[if ok { "ok" } else { "failed" }])
            .inc();
    }

    pub(crate) fn lag(&self, shard_id: &str, millis: i64) {
        self.millis_behind
            .with_label_values(&[shard_id])
            .set(millis);
    }

    /// Drops the lag series of a shard this replica stopped reading.
    pub(crate) fn forget_shard(&self, shard_id: &str) {
        let _ = self.millis_behind.remove_label_values(&[shard_id]);
    }

    pub(crate) fn lease_event(&self, kind: &str) {
        self.lease_events.with_label_values(&[kind]).inc();
    }

    pub(crate) fn set_leases_held(&self, count: usize) {
        self.leases_held
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub(crate) fn reader_paused(&self, paused: bool) {
        if paused {
            self.readers_paused.inc();
        } else {
            self.readers_paused.dec();
        }
    }

    pub(crate) fn renew_failed(&self) {
        self.renew_failures.inc();
    }
}
