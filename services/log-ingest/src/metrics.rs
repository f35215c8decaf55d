//! log-ingest's metrics (`mall_log_ingest_` prefix from the registry), the one source of the
//! pipeline's counters (GetPipelineStats reads them too). Label values come from small fixed
//! sets, each registered at start so a series exists before its first event; no record text
//! is ever a label.

use mall_telemetry::metrics::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// Sources of records.
pub const SOURCES: [&str; 2] = ["forward", "otlp"];
/// Why records were dropped: Loki's refusals (400) by Loki's own reason names (as its
/// `loki_discarded_samples_total` counts them; `loki_refused` for a reason not known here, while Loki takes a probe).
/// A record is never dropped for a 413 (a proxy's limit, waited out).
pub const DROP_REASONS: [&str; 11] = [
    "loki_refused",
    "greater_than_max_sample_age",
    "too_far_in_future",
    "line_too_long",
    "invalid_labels",
    "structured_metadata_too_large",
    "structured_metadata_too_many",
    "too_far_behind",
    "out_of_order",
    // Labels Loki's operator enforces (`enforced_labels`), which the stream lacks.
    "missing_enforced_labels",
    // Loki refuses structured metadata, for a push whose records carry none to strip (they
    // go without it otherwise): what else Loki said is the records' fault.
    "disallowed_structured_metadata",
];
/// `delivery_freshness_seconds`' buckets: a record is usually in Loki within a few seconds
/// (a push waits `pipeline.batch_wait`, a record its quiet time); minutes mean an outage or
/// a backlog, hours a long one (a full buffer drained).
pub const DELIVERY_BUCKETS: [f64; 13] = [
    0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 21600.0,
];
/// What became of each push attempt.
const PUSHES: [&str; 4] = ["accepted", "failed", "refused", "too_large"];
/// What became of each forward message.
pub const CHUNKS: [&str; 5] = [
    "stored",
    "sent_again",
    "refused_full",
    "refused_error",
    "not_logs",
];
/// Why a forward connection ended other than between messages (`forward_input::Closed::
/// reason`), and `too_many` for one past `forward.max_connections`. `peer_closed`: the peer
/// closed or reset it mid-message or mid-handshake (health checks, scanners, senders giving
/// up), apart from `tls` and `handshake`, which a wrong CA or shared key gives.
pub const CLOSES: [&str; 10] = [
    "too_many",
    "tls",
    "handshake",
    "slow",
    "idle",
    "garbage",
    "full",
    "buffer",
    "io",
    "peer_closed",
];
/// What became of each OTLP log record.
pub const OTLP_OUTCOMES: [&str; 6] = [
    "stored",
    "sent_again",
    "rejected",
    "refused_full",
    "refused_busy",
    "refused_error",
];

/// The service's counters and gauges; cheap to clone.
#[derive(Debug, Clone)]
pub struct LogMetrics {
    /// `records_received_total{source}`: events stored in the buffer by the inputs (forward
    /// entries before grouping, OTLP records); one sent again after a lost answer is not
    /// counted again.
    pub received: IntCounterVec,
    /// `parse_errors_total{source}`: records shipped with their raw text as the parser could
    /// not read them.
    pub parse_errors: IntCounterVec,
    /// `records_dropped_total{source,reason}`: records Loki refused for good.
    pub dropped: IntCounterVec,
    /// `loki_pushes_total{outcome}`: push attempts by `accepted`, `failed` (retried),
    /// `refused` (400) and `too_large` (413: a piece is halved; one record is retried, a
    /// proxy's limit).
    pub pushes: IntCounterVec,
    /// `loki_records_pushed_total`: records Loki accepted.
    pub pushed: IntCounter,
    /// `loki_last_push_timestamp_seconds`: when Loki last accepted a push (0: never).
    pub last_push: IntGauge,
    /// `delivery_freshness_seconds`: per record Loki accepted, the time from the input
    /// receiving it (its first line's forward message or OTLP export, before it was stored
    /// and acknowledged) to Loki accepting it: the wait for the rest of a stack trace, for
    /// quiet and for a push, the push and its retries, and a restart's downtime for records
    /// read again after it. By the service's wall clock, not the record's own time (the
    /// legacy servers' clocks and zones are theirs). See [`DELIVERY_BUCKETS`].
    pub delivery: Histogram,
    /// `records_waiting`: records parsed and not yet answered by Loki (waiting for a push,
    /// or in one being sent or retried).
    pub waiting: IntGauge,
    /// `masked_total{pattern}`: matches masked, per configured pattern.
    pub masked: IntCounterVec,
    /// `buffer_bytes`: unacknowledged bytes in the durable buffer.
    pub buffer_bytes: IntGauge,
    /// `buffer_max_bytes`: the buffer's bound (`buffer.max_bytes`); inputs stop acknowledging
    /// when `buffer_bytes` reaches it (the "buffer filling" alert divides by it).
    pub buffer_max_bytes: IntGauge,
    /// `buffer_corrupt_total`: stretches of the buffer skipped because a disk fault
    /// corrupted them (a frame that fails its checksum, a batch that does not decode):
    /// acknowledged records lost, which cannot be counted in records.
    pub buffer_corrupt: IntCounter,
    /// `forward_messages_total{outcome}`: forward messages with events, by `stored`,
    /// `sent_again` (already stored: acknowledged again), `refused_full`, `refused_error`
    /// and `not_logs` (metrics or traces: acknowledged, dropped).
    pub chunks: IntCounterVec,
    /// `forward_acks_total`: acknowledgements written to forward senders: a chunk's once its
    /// records are stored (or were already); a chunk without entries, or of metrics or
    /// traces (dropped), at once. A stored chunk whose ack could not be written (the
    /// connection gone) is not counted; its sender sends it again.
    pub acks: IntCounter,
    /// `forward_connections`: forward connections open now.
    pub connections: IntGauge,
    /// `forward_in_flight_bytes`: bytes of `forward.max_bytes_in_flight` taken now by
    /// messages: one not whole at a read takes `forward.max_message_bytes`, then (or at once,
    /// read whole) its own size until it is stored and acknowledged. At the bound,
    /// connections stop reading (their senders wait): the forward input's memory, but for
    /// a message read whole at once, which waits for its share uncounted.
    pub in_flight_bytes: IntGauge,
    /// `forward_connections_closed_total{reason}`: forward connections that ended other than
    /// by the sender closing between messages, by [`CLOSES`]: a shared key or TLS setting
    /// that no sender matches shows here (`handshake`, `tls`), as nothing else does.
    pub connections_closed: IntCounterVec,
    /// `otlp_records_total{outcome}`: OTLP log records by `stored`, `sent_again` (an
    /// export already stored), `rejected` (refused alone: `partial_success`), `refused_full`,
    /// `refused_busy` (past `otlp.max_bytes_in_flight`) and `refused_error` (the exporter
    /// retries those).
    pub otlp: IntCounterVec,
    /// `otlp_ids_removed_total`: trace and span ids of OTLP records removed for their length
    /// (not 16 or 8 bytes); their records are kept, without them.
    pub otlp_ids_removed: IntCounter,
    /// `streams`: (service, host) pairs with Loki streams of their own.
    pub streams: IntGauge,
    /// `streams_folded_total`: records whose service or host label became `other` (the
    /// stream limit was reached; the values are in structured metadata).
    pub streams_folded: IntCounter,
    /// `streams_evicted_total`: streams whose multi-line state was dropped to stay within
    /// `pipeline.max_open_streams` (each one's record in progress was completed).
    pub streams_evicted: IntCounter,
    /// `fields_omitted_total`: record fields left out of Loki's structured metadata (past
    /// 64 fields or 16 KiB of them in one record, or a name taken already).
    pub fields_omitted: IntCounter,
    /// `loki_metadata_refused_total`: records pushed without their structured metadata
    /// because Loki refuses it (`allow_structured_metadata` off): their lines went, their
    /// trace id, logger, thread and fields did not.
    pub metadata_refused: IntCounter,
    /// `records_completed_early_total`: records in progress completed before their end to
    /// keep the records in progress of all streams within `pipeline.max_pending_bytes`.
    pub completed_early: IntCounter,
    /// `open_streams`: streams (tag and host) whose multi-line state is kept now (at most
    /// `pipeline.max_open_streams`).
    pub open_streams: IntGauge,
    /// `tails_open`: TailLogs streams open now.
    pub tails: IntGauge,
    /// `tail_records_dropped_total`: records skipped for TailLogs clients reading too slowly
    /// (summed over tails).
    pub tail_dropped: IntCounter,
    /// Names of the masking patterns, in configured order.
    patterns: Vec<String>,
}

impl LogMetrics {
    /// Registers the metrics in `registry`, with a series per masking pattern in `patterns`.
    ///
    /// # Errors
    /// When they are already registered there.
    pub fn register(
        registry: &Registry,
        patterns: &[String],
    ) -> mall_telemetry::metrics::Result<Self> {
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let metrics = Self {
            received: counter_vec(
                "records_received_total",
                "Events received and stored in the buffer (forward entries before grouping), by source",
                &["source"],
            )?,
            parse_errors: counter_vec(
                "parse_errors_total",
                "Records the parser could not read, by source",
                &["source"],
            )?,
            dropped: counter_vec(
                "records_dropped_total",
                "Records Loki refused for good, by source and reason",
                &["source", "reason"],
            )?,
            pushes: counter_vec(
                "loki_pushes_total",
                "Push attempts to Loki, by outcome",
                &["outcome"],
            )?,
            pushed: IntCounter::new("loki_records_pushed_total", "Records Loki accepted")?,
            last_push: IntGauge::new(
                "loki_last_push_timestamp_seconds",
                "When Loki last accepted a push",
            )?,
            delivery: Histogram::with_opts(
                HistogramOpts::new(
                    "delivery_freshness_seconds",
                    "Per record Loki accepted, seconds from the input receiving it to Loki accepting it",
                )
                .buckets(DELIVERY_BUCKETS.to_vec()),
            )?,
            waiting: IntGauge::new(
                "records_waiting",
                "Records parsed and not yet answered by Loki",
            )?,
            masked: counter_vec("masked_total", "Matches masked, by pattern", &["pattern"])?,
            buffer_bytes: IntGauge::new(
                "buffer_bytes",
                "Unacknowledged bytes in the durable buffer",
            )?,
            buffer_max_bytes: IntGauge::new(
                "buffer_max_bytes",
                "The durable buffer's bound; inputs stop acknowledging at it",
            )?,
            buffer_corrupt: IntCounter::new(
                "buffer_corrupt_total",
                "Stretches of the durable buffer skipped because a disk fault corrupted them",
            )?,
            chunks: counter_vec(
                "forward_messages_total",
                "Forward messages with events (or of another signal than logs), by outcome",
                &["outcome"],
            )?,
            acks: IntCounter::new(
                "forward_acks_total",
                "Acknowledgements written to forward senders (a chunk's once its records are stored)",
            )?,
            connections: IntGauge::new("forward_connections", "Forward connections open now")?,
            in_flight_bytes: IntGauge::new(
                "forward_in_flight_bytes",
                "Bytes of forward.max_bytes_in_flight taken now by messages arriving or being stored",
            )?,
            connections_closed: counter_vec(
                "forward_connections_closed_total",
                "Forward connections that ended other than between messages, by reason",
                &["reason"],
            )?,
            otlp: counter_vec(
                "otlp_records_total",
                "OTLP log records, by outcome",
                &["outcome"],
            )?,
            otlp_ids_removed: IntCounter::new(
                "otlp_ids_removed_total",
                "Trace and span ids of OTLP records removed for their length (the records kept)",
            )?,
            streams: IntGauge::new(
                "streams",
                "(service, host) pairs with Loki streams of their own",
            )?,
            streams_folded: IntCounter::new(
                "streams_folded_total",
                "Records whose service or host label became other (stream limit reached)",
            )?,
            streams_evicted: IntCounter::new(
                "streams_evicted_total",
                "Streams whose multi-line state was dropped at pipeline.max_open_streams",
            )?,
            fields_omitted: IntCounter::new(
                "fields_omitted_total",
                "Record fields left out of Loki's structured metadata (too many or too large)",
            )?,
            metadata_refused: IntCounter::new(
                "loki_metadata_refused_total",
                "Records pushed without their structured metadata because Loki refuses it",
            )?,
            completed_early: IntCounter::new(
                "records_completed_early_total",
                "Records in progress completed early to stay within pipeline.max_pending_bytes",
            )?,
            open_streams: IntGauge::new(
                "open_streams",
                "Streams (tag and host) whose multi-line state is kept now",
            )?,
            tails: IntGauge::new("tails_open", "TailLogs streams open now")?,
            tail_dropped: IntCounter::new(
                "tail_records_dropped_total",
                "Records skipped for TailLogs clients reading too slowly",
            )?,
            patterns: patterns.to_vec(),
        };
        registry.register(Box::new(metrics.received.clone()))?;
        registry.register(Box::new(metrics.parse_errors.clone()))?;
        registry.register(Box::new(metrics.dropped.clone()))?;
        registry.register(Box::new(metrics.metadata_refused.clone()))?;
        registry.register(Box::new(metrics.completed_early.clone()))?;
        registry.register(Box::new(metrics.pushes.clone()))?;
        registry.register(Box::new(metrics.pushed.clone()))?;
        registry.register(Box::new(metrics.last_push.clone()))?;
        registry.register(Box::new(metrics.delivery.clone()))?;
        registry.register(Box::new(metrics.waiting.clone()))?;
        registry.register(Box::new(metrics.masked.clone()))?;
        registry.register(Box::new(metrics.buffer_bytes.clone()))?;
        registry.register(Box::new(metrics.buffer_corrupt.clone()))?;
        registry.register(Box::new(metrics.buffer_max_bytes.clone()))?;
        registry.register(Box::new(metrics.chunks.clone()))?;
        registry.register(Box::new(metrics.acks.clone()))?;
        registry.register(Box::new(metrics.connections.clone()))?;
        registry.register(Box::new(metrics.in_flight_bytes.clone()))?;
        registry.register(Box::new(metrics.connections_closed.clone()))?;
        registry.register(Box::new(metrics.otlp.clone()))?;
        registry.register(Box::new(metrics.otlp_ids_removed.clone()))?;
        registry.register(Box::new(metrics.streams.clone()))?;
        registry.register(Box::new(metrics.streams_folded.clone()))?;
        registry.register(Box::new(metrics.streams_evicted.clone()))?;
        registry.register(Box::new(metrics.fields_omitted.clone()))?;
        registry.register(Box::new(metrics.open_streams.clone()))?;
        registry.register(Box::new(metrics.tails.clone()))?;
        registry.register(Box::new(metrics.tail_dropped.clone()))?;
        for source in SOURCES {
            metrics.received.with_label_values(&[source]);
            metrics.parse_errors.with_label_values(&[source]);
            for reason in DROP_REASONS {
                metrics.dropped.with_label_values(&[source, reason]);
            }
        }
        for outcome in PUSHES {
            metrics.pushes.with_label_values(&[outcome]);
        }
        for outcome in CHUNKS {
            metrics.chunks.with_label_values(&[outcome]);
        }
        for outcome in OTLP_OUTCOMES {
            metrics.otlp.with_label_values(&[outcome]);
        }
        for reason in CLOSES {
            metrics.connections_closed.with_label_values(&[reason]);
        }
        for pattern in patterns {
            metrics.masked.with_label_values(&[pattern]);
        }
        Ok(metrics)
    }

    /// Metrics in a registry of their own (tests, benchmarks).
    pub fn unregistered(patterns: &[String]) -> Self {
        Self::register(&Registry::new(), patterns).expect("a fresh registry takes them")
    }

    /// Observes the delivery of a record received at `received_ms` and accepted by Loki at
    /// `now_ms` (Unix milliseconds); nothing when its receipt is not known (0: stored by a
    /// version that did not keep it). A wall clock stepped back counts as no time.
    pub fn observe_delivery(&self, now_ms: i64, received_ms: i64) {
        if received_ms > 0 {
            self.delivery
                .observe(now_ms.saturating_sub(received_ms).max(0) as f64 / 1_000.0);
        }
    }

    /// Adds masking counts (one per pattern, in configured order).
    pub fn add_masked(&self, counts: &[u64]) {
        for (pattern, count) in self.patterns.iter().zip(counts) {
            if *count > 0 {
                self.masked.with_label_values(&[pattern]).inc_by(*count);
            }
        }
    }
}
