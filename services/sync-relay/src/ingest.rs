//! Stage 1: make a source batch durable. Undecodable or invalid records go to the quarantine
//! with their reason; valid changes are rolled up into lane messages and sent to the queue.
//! Only when both are done does the caller acknowledge upstream (a Kinesis checkpoint, a
//! PublishProductChanges response).

use std::sync::Arc;

use bytes::Bytes;
use mall_product::ProductTypes;
use mall_proto::sync::v1::{ChangeOrigin, ProductChange};
use mall_queue::{OutgoingMessage, PackBudget, Queue, encode_body};
use prost::Message as _;

use crate::{
    change::{self, lane_group},
    control::Control,
    metrics::RelayMetrics,
    rollup,
    source::kinesis::{RecordSink, ShardBatch},
    store::{NewQuarantined, RelayStore},
};

/// Links from an enqueue span to the traces of the changes it carries, at most.
const MAX_TRACE_LINKS: usize = 32;

/// One record of a source batch.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The decoded change, or why the record did not decode.
    pub change: Result<ProductChange, String>,
    /// The record's bytes as received; `None` when the change arrived decoded (gRPC), in
    /// which case its encoding is quarantined.
    pub raw: Option<Bytes>,
    /// Position in the source: sequence number or stream index.
    pub position: String,
    /// Unique per source record, so redelivery quarantines it once (see [`NewQuarantined`]).
    pub quarantine_key: String,
}

/// What became of a source batch.
#[derive(Debug, Default)]
pub struct IngestReport {
    /// Valid changes the queue accepted.
    pub accepted: usize,
    /// Quarantined records: index in the batch, product code as sent, reason, quarantine id.
    pub quarantined: Vec<(usize, String, String, i64)>,
}

/// Stage 1 of one replica; cheap to clone.
#[derive(Debug, Clone)]
pub struct Ingest {
    queue: Queue,
    store: RelayStore,
    types: Arc<ProductTypes>,
    lanes: u32,
    budget: PackBudget,
    metrics: RelayMetrics,
    control: Control,
}

impl Ingest {
    /// Stage 1 over `queue` and the relay's tables.
    pub fn new(
        queue: Queue,
        store: RelayStore,
        types: Arc<ProductTypes>,
        lanes: u32,
        max_message_bytes: usize,
        metrics: RelayMetrics,
        control: Control,
    ) -> Self {
        Self {
            queue,
            store,
            types,
            lanes,
            budget: rollup::budget(max_message_bytes),
            metrics,
            control,
        }
    }

    /// Counts changes read from `source` (`grpc`, `kinesis`).
    pub fn count_received(&self, source: &str, changes: usize) {
        self.metrics
            .received
            .with_label_values(&[source])
            .inc_by(changes as u64);
    }

    /// Makes `records` durable: quarantines the bad ones, enqueues the good ones. `source`
    /// names the source in the quarantine (`grpc`, `kinesis:<stream>/<shard>`); `batch_key`
    /// is deterministic for the batch, so a redelivery is deduplicated by the queue.
    ///
    /// # Errors
    /// When the quarantine or the queue fails; nothing must be acknowledged then, and
    /// redelivering the same batch is safe.
    #[tracing::instrument(skip_all, fields(source, records = records.len()), err)]
    pub async fn ingest(
        &self,
        source: &str,
        batch_key: &str,
        records: Vec<Incoming>,
    ) -> anyhow::Result<IngestReport> {
        let received = prost_types::Timestamp::from(std::time::SystemTime::now());
        let capacity = self.budget.raw_capacity();
        let mut valid = Vec::with_capacity(records.len());
        let mut invalid = Vec::new();
        let mut notices = Vec::new();
        for (index, record) in records.into_iter().enumerate() {
            let (reason, raw, code) = match record.change {
                Err(reason) => (
                    reason,
                    record.raw.map(|b| b.to_vec()).unwrap_or_default(),
                    String::new(),
                ),
                Ok(mut change) => {
                    let origin = ChangeOrigin {
                        source: source.to_owned(),
                        position: record.position.clone(),
                    };
                    let checked = change::validate(&mut change, &self.types).and_then(|()| {
                        // One change must fit one queue message; validation allows products
                        // of a few MiB, messages carry at most `relay.max_message_bytes`.
                        let size = change.encoded_len() + origin.encoded_len() + 12;
                        if size > capacity {
                            Err(format!(
                                "the change is {size} bytes encoded; one queue message carries at \
                                 most {capacity} (relay.max_message_bytes, base64)"
                            ))
                        } else {
                            Ok(())
                        }
                    });
                    match checked {
                        Ok(()) => {
                            if change.event_time.is_none() {
                                change.event_time = Some(received);
                            }
                            valid.push((change, origin));
                            continue;
                        }
                        Err(reason) => {
                            let raw = record
                                .raw
                                .map_or_else(|| change.encode_to_vec(), |b| b.to_vec());
                            (reason, raw, change.product_code)
                        }
                    }
                }
            };
            notices.push((index, code, reason.clone()));
            invalid.push(NewQuarantined {
                dedup_key: record.quarantine_key,
                source: source.to_owned(),
                position: record.position,
                reason,
                raw_payload: raw,
            });
        }

        let ids = self.store.quarantine(&invalid).await?;
        self.metrics
            .quarantined
            .with_label_values(&["ingest"])
            .inc_by(invalid.len() as u64);
        let accepted = valid.len();
        self.enqueue(valid, batch_key).await?;
        Ok(IngestReport {
            accepted,
            quarantined: notices
                .into_iter()
                .zip(ids)
                .map(|((index, code, reason), id)| (index, code, reason, id))
                .collect(),
        })
    }

    /// Rolls valid changes (each with where it came from) up into lane messages and sends
    /// them; `Ok` once the queue accepted every one.
    ///
    /// # Errors
    /// When the queue fails (the whole batch may be resent with the same `batch_key`).
    pub async fn enqueue(
        &self,
        changes: Vec<(ProductChange, ChangeOrigin)>,
        batch_key: &str,
    ) -> anyhow::Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let messages = rollup::roll_up(changes, self.lanes, self.budget, batch_key)?;
        let outgoing: Vec<OutgoingMessage> = messages
            .into_iter()
            .map(|message| {
                let span = tracing::info_span!(
                    "relay.enqueue",
                    otel.kind = "producer",
                    messaging.system = self.queue.messaging_system(),
                    messaging.operation.type = "send",
                    messaging.destination.name = self.queue.name(),
                    lane = message.lane,
                    changes = message.batch.changes.len()
                );
                trace_from_changes(&span, &message.batch.changes);
                let (traceparent, _) = mall_telemetry::propagation::current_trace_headers(&span);
                let mut outgoing =
                    OutgoingMessage::new(encode_body(&message.batch.encode_to_vec()))
                        .with_group(lane_group(message.lane))
                        .with_dedup_id(message.dedup_id);
                if let Some(traceparent) = traceparent {
                    outgoing = outgoing
                        .with_attribute(mall_telemetry::propagation::TRACEPARENT, traceparent);
                }
                outgoing
            })
            .collect();
        let count = outgoing.len();
        if let Err(error) = self.queue.send(outgoing).await {
            self.control
                .record_error(format!("failed to send to the queue: {error}"));
            return Err(error.into());
        }
        self.metrics.messages_sent.inc_by(count as u64);
        Ok(())
    }
}

/// Makes the first change's trace the parent of `span` and links the others, so each
/// producer's trace leads to the relay's handling of its change.
fn trace_from_changes(span: &tracing::Span, changes: &[ProductChange]) {
    let traces = changes
        .iter()
        .filter_map(|c| c.trace_context.as_ref())
        .map(|t| (t.traceparent.as_str(), t.tracestate.as_str()));
    mall_telemetry::propagation::follow(span, traces, MAX_TRACE_LINKS);
}

/// Stage 1 as the Kinesis source's sink: a shard batch becomes durable in the quarantine and
/// the queue before its checkpoint moves.
#[derive(Debug, Clone)]
pub struct KinesisSink {
    /// Stage 1.
    pub ingest: Ingest,
}

impl RecordSink for KinesisSink {
    async fn deliver(&self, batch: &ShardBatch) -> anyhow::Result<()> {
        let source = format!("kinesis:{}/{}", batch.stream, batch.shard_id);
        // Equal on every redelivery of these records (the queue drops the resend), new after
        // a replay (the queue takes it).
        let parts = batch.dedup_parts();
        let batch_key = rollup::dedup_key('k', &parts.each_ref().map(String::as_str));
        let records = batch
            .records
            .iter()
            .map(|record| Incoming {
                change: change::decode(&record.data),
                raw: Some(record.data.clone()),
                position: record.sequence_number.clone(),
                quarantine_key: format!("{source}/{}", record.sequence_number),
            })
            .collect();
        self.ingest.count_received("kinesis", batch.records.len());
        self.ingest.ingest(&source, &batch_key, records).await?;
        Ok(())
    }
}
