//! OTLP logs over gRPC (`opentelemetry.proto.collector.logs.v1.LogsService/Export`) on the
//! service's gRPC port: each export's records go into the durable buffer, in batches per
//! resource's `service.name` of about 4 MiB at most, and the export is answered only once
//! every batch is synced.
//!
//! What a record becomes (the pipeline reads it back in [`record`](fn@record)): its body (a string, or
//! any other value as JSON), severity, attributes (values as text, structured ones as
//! JSON), trace and span ids, its scope's name (the logger, as OpenTelemetry's Java
//! appenders set it) and the resource's `host.name`.
//!
//! Failures: a record that does not decode, is too large or holds too many values is the
//! record's fault: it is rejected and counted in `partial_success`, the rest stored (one
//! with a malformed trace or span id, not 16 or 8 bytes, is kept without it, with a
//! warning there; see [`convert`] for every reason). A full
//! buffer is the environment's: the whole export gets UNAVAILABLE with RetryInfo and
//! nothing is acknowledged (the exporter retries; batches stored before the buffer filled
//! are recognised when they come again, see [`crate::recent`]).

use std::{sync::Arc, time::Duration};

use prost::Message as _;
use tokio::sync::Semaphore;

use opentelemetry_proto::tonic::{
    collector::logs::v1::{ExportLogsPartialSuccess, ExportLogsServiceResponse},
    common::v1::{AnyValue, KeyValue, any_value},
    logs::v1::LogRecord,
};
use rmpv::Value;
use tonic::{Request, Response, Status};

use mall_grpc::ServiceError;

use crate::{
    batch::{Batch, Events, Source},
    buffer::{Buffer, BufferError},
    forward::Event,
    metrics::LogMetrics,
    otlp_wire::Export,
    recent::{Recent, Stored},
    record::{self, Level, Record},
    wire::fields,
};

/// `service.name` of a resource without one, as the OpenTelemetry specification says.
pub const UNKNOWN_SERVICE: &str = "unknown_service";

/// How long an export wholly received waits for room in `otlp.max_bytes_in_flight`.
const TOP_UP_WAIT: Duration = Duration::from_secs(1);

/// How long an exporter is asked to wait before sending again when the buffer is full.
const RETRY_AFTER: Duration = Duration::from_secs(5);

// The keys of an OTLP event in the buffer. Ours, not OTLP attribute names: an attribute
// cannot collide with them (attributes are kept in a map of their own).
const BODY: &str = "body";
const SEVERITY_NUMBER: &str = "severity_number";
const SEVERITY_TEXT: &str = "severity_text";
const TRACE_ID: &str = "trace_id";
const SPAN_ID: &str = "span_id";
const SCOPE: &str = "scope";
const HOST: &str = "host";
const ATTRIBUTES: &str = "attributes";
const EVENT_NAME: &str = "event_name";
const RESOURCE: &str = "resource";

/// Resource attributes kept as a record's fields (besides `service.name` and `host.name`,
/// its stream): what tells a service's replicas and deployments apart where `host.name` is
/// not set (Kubernetes SDKs set the pod's name instead). The others (`telemetry.sdk.*`,
/// `process.*`, `os.*`) say nothing a log reader needs and would cost every record.
const RESOURCE_FIELDS: [&str; 9] = [
    "service.instance.id",
    "service.namespace",
    "service.version",
    "deployment.environment.name",
    "deployment.environment",
    "k8s.namespace.name",
    "k8s.pod.name",
    "k8s.container.name",
    "container.id",
];

/// Whether conversion copies the resource attribute `key` into each record: `Some(true)`
/// with the key (a kept field), `Some(false)` without it (`host.name`, under our own key),
/// `None` when not (what [`crate::otlp_wire`] counts).
pub(crate) fn copied_resource_key(key: &[u8]) -> Option<bool> {
    if key == b"host.name" {
        return Some(false);
    }
    RESOURCE_FIELDS
        .iter()
        .any(|kept| kept.as_bytes() == key)
        .then_some(true)
}

/// The attribute OpenTelemetry's semantic conventions give an exception's stack trace
/// (the Java and Python appenders send the message as the body and the trace here).
const EXCEPTION_STACKTRACE: &str = "exception.stacktrace";

/// The `LogsService/Export` handler (served by [`crate::otlp_wire::LogsServer`]).
#[derive(Debug, Clone)]
pub struct OtlpInput {
    /// Where exports go.
    pub buffer: Buffer,
    /// Batches stored already (an export sent again after a lost answer).
    pub recent: Recent,
    /// Counters.
    pub metrics: LogMetrics,
    /// `otlp.max_bytes_in_flight`: bytes of exports as they arrive, then what they take
    /// being converted and stored ([`in_memory`]) until they are stored.
    pub budget: Arc<Semaphore>,
    /// The budget's size: the most one export takes of it.
    pub budget_bytes: usize,
}

impl OtlpInput {
    /// Stores an export ([`Export`]: its framing checked, not yet decoded) and answers it
    /// once stored.
    ///
    /// # Errors
    /// UNAVAILABLE with RetryInfo when the budget or the buffer has no room (nothing
    /// acknowledged; the exporter retries).
    pub async fn export(
        &self,
        request: Request<Export>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        let received = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX);
        let count = |outcome: &str, n: usize| {
            self.metrics
                .otlp
                .with_label_values(&[outcome])
                .inc_by(n as u64);
        };
        // What its body took while it arrived (see `Receiving`), if it came that way.
        let from_body = request
            .extensions()
            .get::<BodyPermits>()
            .and_then(BodyPermits::take);
        let export = request.into_inner();
        let max_batch = batch_limit(self.buffer.largest_batch());
        // Held until the export is stored: exports being converted and stored at once stay
        // within the budget; past it, the caller retries (nothing of it was taken). At most
        // the whole budget (one export then goes alone).
        let need = in_memory(&export, max_batch)
            .min(self.budget_bytes)
            .min(crate::forward_input::MAX_BUDGET);
        let had = from_body.as_ref().map_or(0, |p| p.num_permits());
        let held = if had >= need {
            Some(from_body)
        } else {
            // More than its body took: its bytes are all read, so waiting stalls no
            // connection. Holding nothing while it waits (what the body took goes back
            // first), in turn with other waiters: a large export is not refused for ever by
            // smaller ones taking the room it waits for.
            drop(from_body);
            let wanted = u32::try_from(need).unwrap_or(u32::MAX);
            tokio::time::timeout(TOP_UP_WAIT, self.budget.clone().acquire_many_owned(wanted))
                .await
                .ok()
                .and_then(Result::ok)
                .map(Some)
        };
        let Some(held) = held else {
            count("refused_busy", export.records());
            return Err(busy());
        };
        // Until the export is stored and the converter has stopped, whichever comes last
        // (a caller gone away drops this call, not the converter at once).
        let held = Arc::new(held);
        // Decoding and converting a large export is CPU work: off the runtime's workers, so
        // the other inputs and the pipeline go on meanwhile. One record at a time, each
        // batch handed over to be stored as it fills; the converter waits while one is
        // being stored (at most one more waits in the channel).
        let (batches, mut filled) = tokio::sync::mpsc::channel(1);
        let converting = tokio::task::spawn_blocking({
            let held = held.clone();
            move || {
                let _held = held;
                let stop = batches.clone();
                convert(
                    &export,
                    received,
                    max_batch,
                    &mut |batch| batches.blocking_send(batch).is_ok(),
                    &|| stop.is_closed(),
                )
            }
        });
        let mut refused = None;
        while let Some(batch) = filled.recv().await {
            let records = batch.events.len();
            let error = match self
                .recent
                .store(&self.buffer, batch.into_stored(None))
                .await
            {
                Ok(Stored::New) => {
                    count("stored", records);
                    self.metrics
                        .received
                        .with_label_values(&["otlp"])
                        .inc_by(records as u64);
                    continue;
                }
                Ok(Stored::SentAgain) => {
                    count("sent_again", records);
                    continue;
                }
                Err(error) => error,
            };
            refused = Some(match error {
                BufferError::Full(_) => {
                    count("refused_full", records);
                    ServiceError::RetryLater {
                        reason: "BUFFER_FULL",
                        message: "log-ingest's buffer is full until Loki catches up; \
                                  nothing of this export was acknowledged"
                            .to_owned(),
                        retry_after: RETRY_AFTER,
                    }
                }
                BufferError::TooLarge(bytes) => {
                    count("refused_error", records);
                    ServiceError::ResourceExhausted(format!(
                        "one service's records in this export take {bytes} bytes \
                         buffered, more than a buffer segment holds; send smaller exports"
                    ))
                }
                BufferError::Io(error) => {
                    count("refused_error", records);
                    tracing::error!(%error, "cannot store an OTLP export");
                    ServiceError::Unavailable(
                        "log-ingest cannot write its buffer; retry later".to_owned(),
                    )
                }
            });
            break;
        }
        // The converter stops at its next batch once the channel is closed; its memory is
        // held from the budget until then.
        drop(filled);
        let rejected = converting
            .await
            // Not the error itself: what a panic said may quote the export's records.
            .map_err(|_| Status::internal("converting the export failed"))?;
        if let Some(refused) = refused {
            return Err(refused.into());
        }
        // Counted once the export is answered: one refused above comes again with the same
        // malformed records, which would otherwise be counted on every retry.
        count("rejected", rejected.count);
        self.metrics
            .otlp_ids_removed
            .inc_by(rejected.warnings as u64);
        Ok(Response::new(ExportLogsServiceResponse {
            // With no record rejected, the message warns (OTLP's way of saying so).
            partial_success: rejected.any().then(|| ExportLogsPartialSuccess {
                rejected_log_records: i64::try_from(rejected.count).unwrap_or(i64::MAX),
                error_message: rejected.message(),
            }),
        }))
    }
}

/// The OTLP service with the bytes of each export counted against `otlp.max_bytes_in_flight`
/// as they arrive, before tonic has the export whole (it reads the message whole before the
/// handler can weigh it). A frame that would pass the budget fails its call at once with
/// UNAVAILABLE and RetryInfo, as the handler's own refusal does; nothing of it is taken.
/// Nothing waits: a call held back here would hold its unread bytes in the connection's
/// shared HTTP/2 window and stall the other calls on that connection (why an earlier
/// version, which queued calls, was reverted). A refused call's stream is reset, and HTTP/2
/// gives its window back.
///
/// What an export's body took is handed to its handler ([`BodyPermits`], in the request's
/// extensions): an export wholly received is not refused for room that other calls took
/// between its last frame and its handler; the rest of what it takes ([`in_memory`]) it
/// waits for in turn, up to [`TOP_UP_WAIT`]. A call counts at most `max_message_bytes`
/// (tonic reads one message of a unary call; bytes after it are not counted). Bytes are
/// counted as sent: a gzip export's inflated form (at most `server.max_message_bytes`) is
/// uncounted from its decompression until its handler has its room (README,
/// `otlp.max_bytes_in_flight`).
///
/// A `tower` service of our own rather than a `tower` layer: the server routes by the inner
/// service's name (`NamedService`), which a layer's service does not carry.
#[derive(Debug, Clone)]
pub struct Receiving<S> {
    inner: S,
    budget: Arc<Semaphore>,
    max_message_bytes: usize,
}

impl<S> Receiving<S> {
    /// `inner` with its request bodies counted against `budget`, at most
    /// `max_message_bytes` each.
    pub fn new(inner: S, budget: Arc<Semaphore>, max_message_bytes: usize) -> Self {
        Self {
            inner,
            budget,
            max_message_bytes,
        }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Receiving<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for Receiving<S>
where
    S: tower::Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let (mut parts, body) = request.into_parts();
        let handoff = BodyPermits::default();
        parts.extensions.insert(handoff.clone());
        let body = tonic::body::Body::new(Counted {
            body,
            budget: self.budget.clone(),
            left: self.max_message_bytes,
            held: None,
            handoff,
        });
        self.inner.call(http::Request::from_parts(parts, body))
    }
}

/// The budget a request's body took, handed over to its handler when tonic drops the body
/// (after decoding the export, before calling the handler).
#[derive(Debug, Clone, Default)]
pub struct BodyPermits(Arc<std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>>);

impl BodyPermits {
    fn take(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        crate::lock(&self.0).take()
    }
}

/// A request body whose bytes hold permits of the budget; they go to the handler (through
/// [`BodyPermits`]) when it is dropped, or back to the budget with the request.
struct Counted {
    body: tonic::body::Body,
    budget: Arc<Semaphore>,
    /// Bytes it may still count (`max_message_bytes` less what it counted).
    left: usize,
    held: Option<tokio::sync::OwnedSemaphorePermit>,
    handoff: BodyPermits,
}

impl http_body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Status>>> {
        let this = &mut *self;
        let frame = std::task::ready!(std::pin::Pin::new(&mut this.body).poll_frame(cx));
        if let Some(data) = frame.as_ref().and_then(|f| f.as_ref().ok()?.data_ref()) {
            let size = data.len().min(this.left);
            this.left -= size;
            // At most `max_message_bytes`, which start-up holds within what
            // `try_acquire_many` counts.
            match this
                .budget
                .clone()
                .try_acquire_many_owned(u32::try_from(size).unwrap_or(u32::MAX))
            {
                Ok(permit) => match &mut this.held {
                    Some(held) => held.merge(permit),
                    None => this.held = Some(permit),
                },
                Err(_) => return std::task::Poll::Ready(Some(Err(busy()))),
            }
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            *crate::lock(&self.handoff.0) = Some(held);
        }
    }
}

/// The answer to an export that would pass `otlp.max_bytes_in_flight`.
fn busy() -> Status {
    ServiceError::RetryLater {
        reason: "BUSY",
        message: "log-ingest is receiving and storing as many exports as \
                  otlp.max_bytes_in_flight allows; nothing of this export was acknowledged"
            .to_owned(),
        retry_after: RETRY_AFTER,
    }
    .into()
}

/// Records an export rejected, and why (the first reason, with how many others); and
/// records kept with a malformed part left out (warnings, which OTLP's `partial_success`
/// carries with no record rejected).
#[derive(Debug, Default)]
pub struct Rejected {
    count: usize,
    first: Option<String>,
    warnings: usize,
    first_warning: Option<String>,
}

impl Rejected {
    fn add(&mut self, why: String) {
        self.count += 1;
        self.first.get_or_insert(why);
    }

    /// Keeps a record with `why` said (its only cause: an id removed for its length).
    fn warn(&mut self, why: String) {
        self.warnings += 1;
        self.first_warning.get_or_insert(why);
    }

    /// How many records were rejected.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Whether there is anything to say: records rejected, or kept with a warning.
    pub fn any(&self) -> bool {
        self.count + self.warnings > 0
    }

    /// Why: the first reason, with how many others; then the first warning, with how many
    /// others.
    pub fn message(&self) -> String {
        let said = |first: &Option<String>, n: usize| {
            let first = first.clone().unwrap_or_default();
            match n {
                0 | 1 => first,
                n => format!("{first} (and {} more)", n - 1),
            }
        };
        match (self.count, self.warnings) {
            (_, 0) => said(&self.first, self.count),
            (0, _) => said(&self.first_warning, self.warnings),
            _ => format!(
                "{}; {}",
                said(&self.first, self.count),
                said(&self.first_warning, self.warnings)
            ),
        }
    }
}

/// What `export` takes in memory while it is converted and stored (what
/// `otlp.max_bytes_in_flight` counts): its bytes, and what conversion makes of them, at
/// most four batches of `max_batch` at a time (the batches being filled, one waiting to be
/// stored, one being stored, and the record being converted, decoded then as an event).
/// What conversion makes: up to eight times the export's bytes (its text decoded, then as
/// JSON where it is not a string, control characters six bytes each, then buffered),
/// three times what is copied into each record (a key-value list copied as JSON), and a
/// little for each record's event. Records are decoded one at a time, each at most
/// `max_batch` as sent and [`MAX_VALUES_PER_RECORD`] values. An estimate: batches being
/// filled grow by doubling, and their spare room is not counted.
pub fn in_memory(export: &Export, max_batch: usize) -> usize {
    /// A record's event beyond its text: its index entry, keys and time.
    const PER_EVENT: usize = 128;
    let converted = export
        .encoded_len()
        .saturating_mul(8)
        .saturating_add(export.copied().saturating_mul(3))
        .saturating_add(export.records().saturating_mul(PER_EVENT));
    export
        .encoded_len()
        .saturating_add(converted.min(max_batch.saturating_mul(4)))
}

/// Most bytes one export's records may take buffered, their events together: four times
/// the largest export gRPC takes at the default `server.max_message_bytes`, as the forward
/// input allows a message, or eight times the export's own bytes where that is more
/// ([`buffered_at_most`]). Past it (a small export whose resource's fields, copied into each
/// of millions of records, would fill the buffer), records are rejected (`partial_success`).
pub const MAX_EXPORT_BUFFERED: usize = 64 << 20;

/// What `export`'s records may take buffered (see [`MAX_EXPORT_BUFFERED`]).
pub fn buffered_at_most(export: &Export) -> usize {
    MAX_EXPORT_BUFFERED.max(export.encoded_len().saturating_mul(8))
}

/// Most values one record may hold: its attributes and the values nested in its body and
/// attributes. Decoded, each takes a hundred bytes and more, sent, a few: a record past it
/// is rejected alone (`partial_success`) rather than decoded.
pub const MAX_VALUES_PER_RECORD: usize = 10_000;

/// Most bytes of a value copied into each of a resource's or a scope's records (its
/// `service.name`, `host.name` and kept fields, its scope's name), as sent: Loki's default
/// `max_label_value_length`. One longer has its records rejected (`partial_success`); a few
/// bytes of it in the export would otherwise become megabytes buffered.
pub const MAX_COPIED_BYTES: usize = 2_048;

/// Decodes and converts `export`'s records one at a time into batches per service of
/// `max_batch` bytes at most (events and their index; the batches being filled together
/// too), handing each to `emit` as it fills, the rest at the end in order of their
/// services' first records. Until `emit` says stop (`false`) or `stop` says so (checked
/// between records: the caller went away). What was rejected, and why.
///
/// `export`'s framing is checked already ([`Export::scan`]); a record that does not decode
/// all the same (a string that is not UTF-8) is rejected alone.
pub fn convert(
    export: &Export,
    received_nanos: i64,
    max_batch: usize,
    emit: &mut dyn FnMut(Batch) -> bool,
    stop: &dyn Fn() -> bool,
) -> Rejected {
    let mut rejected = Rejected::default();
    let mut buffered = 0_usize;
    let most = buffered_at_most(export);
    let mut batcher = Batcher {
        open: Vec::new(),
        open_bytes: 0,
        max_batch,
        // By the forward input's clock, which never goes back (the pipeline judges quiet
        // in a backlog by it).
        received_ms: crate::batch::now_ms(),
        emit,
    };
    for (r, resource_logs) in fields(export.bytes(), 1).flatten().enumerate() {
        let resource = ResourceFields::read(resource_logs);
        for (s, scope_logs) in fields(resource_logs, 2).flatten().enumerate() {
            let scope = scope_name(scope_logs);
            for (l, bytes) in fields(scope_logs, 2).flatten().enumerate() {
                let path = format!("resource_logs[{r}].scope_logs[{s}].log_records[{l}]");
                if stop() {
                    return rejected;
                }
                let (resource, scope) = match (&resource, &scope) {
                    (Ok(resource), Ok(scope)) => (resource, scope),
                    (Err(why), _) | (_, Err(why)) => {
                        rejected.add(format!("{path}: {why}"));
                        continue;
                    }
                };
                // Larger sent than a batch may hold: it would be refused once converted.
                if bytes.len() > max_batch {
                    rejected.add(format!(
                        "{path}: takes {} bytes, more than {max_batch} buffered",
                        bytes.len()
                    ));
                    continue;
                }
                let values = crate::otlp_wire::values_in_record(bytes).unwrap_or(usize::MAX);
                if values > MAX_VALUES_PER_RECORD {
                    rejected.add(format!(
                        "{path}: holds {values} attributes and values, more than \
                         {MAX_VALUES_PER_RECORD}"
                    ));
                    continue;
                }
                let mut log = match LogRecord::decode(bytes) {
                    Ok(log) => log,
                    Err(error) => {
                        rejected.add(format!("{path}: does not decode: {error}"));
                        continue;
                    }
                };
                // OTLP: an id of another length is invalid, the record "not associated
                // with a trace" (its line is kept, as its sender would not resend it;
                // warned of and counted in `otlp_ids_removed_total` once the record is kept).
                let mut removed = Vec::new();
                for (name, id, len) in [
                    ("trace_id", &mut log.trace_id, 16),
                    ("span_id", &mut log.span_id, 8),
                ] {
                    if !matches!(id.len(), 0) && id.len() != len {
                        removed.push(format!(
                            "{path}: {name} has {} bytes, not {len}: kept without it",
                            id.len()
                        ));
                        id.clear();
                    }
                }
                match event(log, scope, &resource.host, &resource.kept, received_nanos) {
                    // An event that large is no log line (Loki takes 256 KB): JSON of a
                    // binary or control characters. Refused alone, so the export's other
                    // records are stored and the sender does not retry it for ever.
                    event if event_bytes(&event) > max_batch => rejected.add(format!(
                        "{path}: takes {} bytes buffered, more than {max_batch}",
                        event_bytes(&event)
                    )),
                    event if buffered + event_bytes(&event) > most => {
                        rejected.add(format!(
                            "{path}: the export's records take more than {most} bytes \
                             buffered (its resource's and scope's fields are copied into each)"
                        ));
                    }
                    event => {
                        buffered += event_bytes(&event);
                        if !batcher.push(&resource.service, &event) {
                            return rejected;
                        }
                        for why in removed {
                            rejected.warn(why);
                        }
                    }
                }
            }
        }
    }
    batcher.finish();
    rejected
}

/// What a resource gives each of its records: its service (the batch's tag), host and
/// kept fields.
struct ResourceFields {
    service: String,
    host: String,
    kept: Vec<(Value, Value)>,
}

impl ResourceFields {
    /// Those of `resource_logs`' resource (`ResourceLogs { resource = 1 (Resource {
    /// attributes = 1 }) }`, merged when repeated): only the attributes it needs are
    /// decoded, the first of each key, as decoding the whole resource would find them.
    /// Why its records are rejected when one of them is too long to copy into each, or
    /// does not decode.
    fn read(resource_logs: &[u8]) -> Result<Self, String> {
        let mut found: Vec<(&'static str, String)> = Vec::new();
        let pairs = fields(resource_logs, 1)
            .flatten()
            .flat_map(|resource| fields(resource, 1).flatten());
        for pair in pairs {
            let key = fields(pair, 1).flatten().last().unwrap_or_default();
            let Some(&wanted) = ["service.name", "host.name"]
                .iter()
                .chain(&RESOURCE_FIELDS)
                .find(|k| k.as_bytes() == key)
            else {
                continue;
            };
            if found.iter().any(|(k, _)| *k == wanted) {
                continue;
            }
            let too_long = |len: usize| {
                format!(
                    "the resource's {wanted} takes {len} bytes, more than the \
                     {MAX_COPIED_BYTES} copied into each of its records"
                )
            };
            // Far past it as sent: not decoded at all.
            if pair.len() > 4 * MAX_COPIED_BYTES {
                return Err(too_long(pair.len()));
            }
            let pair = KeyValue::decode(pair)
                .map_err(|error| format!("the resource's {wanted} does not decode: {error}"))?;
            let value = pair.value.as_ref().map(text).unwrap_or_default();
            if value.len() > MAX_COPIED_BYTES {
                return Err(too_long(value.len()));
            }
            found.push((wanted, value));
        }
        let take = |key: &str| {
            found
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.clone())
        };
        Ok(Self {
            service: take("service.name")
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| UNKNOWN_SERVICE.to_owned()),
            host: take("host.name").unwrap_or_default(),
            kept: RESOURCE_FIELDS
                .iter()
                .filter_map(|key| {
                    let value = take(key).filter(|v| !v.is_empty())?;
                    Some((Value::from(*key), Value::from(value)))
                })
                .collect(),
        })
    }
}

/// The scope's name of `scope_logs` (`ScopeLogs { scope = 1 (InstrumentationScope { name =
/// 1 }) }`, the last one when repeated, as decoding merges them); why its records are
/// rejected when it is too long to copy into each or not UTF-8.
fn scope_name(scope_logs: &[u8]) -> Result<String, String> {
    let name = fields(scope_logs, 1)
        .flatten()
        .filter_map(|scope| fields(scope, 1).flatten().last())
        .last()
        .unwrap_or_default();
    if name.len() > MAX_COPIED_BYTES {
        return Err(format!(
            "its scope's name takes {} bytes, more than the {MAX_COPIED_BYTES} copied into each \
             of its records",
            name.len()
        ));
    }
    String::from_utf8(name.to_vec()).map_err(|_| "its scope's name is not UTF-8".to_owned())
}

/// Batches being filled at once in a conversion, for that many services (an export's
/// records interleaving more services make smaller batches).
const OPEN_BATCHES: usize = 16;

/// Events into batches per service, each handed to `emit` when it would pass `max_batch`
/// bytes (events and index, [`Events::weight`]; one event each at least), and the largest
/// one when those being filled together would, or when a service more than
/// [`OPEN_BATCHES`] comes: memory holds about one batch being filled, however the
/// services' records interleave.
struct Batcher<'e> {
    /// Per service, in order of its first record since its last batch: its batch being
    /// filled (never empty).
    open: Vec<(String, Events)>,
    /// Their weights together.
    open_bytes: usize,
    max_batch: usize,
    received_ms: i64,
    emit: &'e mut dyn FnMut(Batch) -> bool,
}

impl Batcher<'_> {
    /// Adds `event` of `service`; `false` when `emit` said stop.
    fn push(&mut self, service: &str, event: &Event) -> bool {
        let size = event_bytes(event) + std::mem::size_of::<(i64, std::ops::Range<usize>)>();
        let mut at = self.open.iter().position(|(tag, _)| tag == service);
        if let Some(i) = at
            && self.open[i].1.weight() + size > self.max_batch
        {
            if !self.take(i) {
                return false;
            }
            at = None;
        }
        while !self.open.is_empty()
            && (self.open_bytes + size > self.max_batch
                || (at.is_none() && self.open.len() >= OPEN_BATCHES))
        {
            let largest = (0..self.open.len())
                .max_by_key(|i| self.open[*i].1.weight())
                .unwrap_or_default();
            if !self.take(largest) {
                return false;
            }
            at = self.open.iter().position(|(tag, _)| tag == service);
        }
        let at = match at {
            Some(at) => at,
            None => {
                // Built with room for the batch's header: stored without another copy.
                let events = Events::for_batch(service, 0, None);
                self.open_bytes += events.weight();
                self.open.push((service.to_owned(), events));
                self.open.len() - 1
            }
        };
        let events = &mut self.open[at].1;
        let before = events.weight();
        events.push(event);
        self.open_bytes += events.weight() - before;
        true
    }

    /// Hands `self.open[at]`'s batch to `emit`; what `emit` said.
    fn take(&mut self, at: usize) -> bool {
        let (tag, events) = self.open.remove(at);
        self.open_bytes -= events.weight();
        (self.emit)(Batch {
            source: Source::Otlp,
            tag,
            events,
            received_ms: self.received_ms,
        })
    }

    /// Hands every batch being filled to `emit`, in order of their services' first records.
    fn finish(&mut self) {
        while !self.open.is_empty() {
            if !self.take(0) {
                return;
            }
        }
    }
}

/// A buffered batch holds about this many bytes of an export at most: an export of up to
/// `server.max_message_bytes` (16 MiB) becomes several batches, each far under a segment,
/// so the buffer never refuses an export as too large.
const MAX_BATCH_BYTES: usize = 4 << 20;

/// What a batch of an export may hold where the buffer takes batches of `largest` bytes at
/// most: [`MAX_BATCH_BYTES`], or less where segments are small (start-up lets them be as
/// small as `server.max_message_bytes` + 1 MiB), with room for the batch's header and for
/// [`event_bytes`] being an estimate.
fn batch_limit(largest: usize) -> usize {
    MAX_BATCH_BYTES.min(largest.saturating_sub(64 << 10))
}

/// About the bytes an event takes buffered: its texts and a little for each value.
fn event_bytes(event: &Event) -> usize {
    fn value(v: &Value) -> usize {
        match v {
            Value::String(s) => s.as_bytes().len() + 5,
            Value::Binary(b) => b.len() + 5,
            Value::Map(pairs) => {
                pairs
                    .iter()
                    .map(|(k, v)| value(k) + value(v))
                    .sum::<usize>()
                    + 5
            }
            Value::Array(items) => items.iter().map(value).sum::<usize>() + 5,
            _ => 9,
        }
    }
    event
        .record
        .iter()
        .map(|(k, v)| value(k) + value(v))
        .sum::<usize>()
        + 16
}

/// One record as a buffered event.
fn event(
    log: LogRecord,
    scope: &str,
    host: &str,
    resource: &[(Value, Value)],
    received_nanos: i64,
) -> Event {
    // (Ids of another length than OTLP's were left out by the caller.)
    // The time it happened, else when it was observed, else when it arrived here.
    let time_nanos = [log.time_unix_nano, log.observed_time_unix_nano]
        .into_iter()
        .find(|t| *t > 0)
        .and_then(|t| i64::try_from(t).ok())
        .unwrap_or(received_nanos);
    let mut fields = vec![(
        Value::from(BODY),
        Value::from(log.body.as_ref().map(text).unwrap_or_default()),
    )];
    let mut put = |key: &str, value: Value| fields.push((Value::from(key), value));
    if log.severity_number != 0 {
        put(SEVERITY_NUMBER, Value::from(log.severity_number));
    }
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    // An all-zero span id is W3C's "none".
    let span_id = if log.span_id.iter().all(|b| *b == 0) {
        String::new()
    } else {
        hex(&log.span_id)
    };
    for (key, value) in [
        (SEVERITY_TEXT, log.severity_text),
        (TRACE_ID, hex(&log.trace_id)),
        (SPAN_ID, span_id),
        (SCOPE, scope.to_owned()),
        (HOST, host.to_owned()),
        (EVENT_NAME, log.event_name),
    ] {
        if !value.is_empty() {
            put(key, Value::from(value));
        }
    }
    if !log.attributes.is_empty() {
        let attributes = log
            .attributes
            .iter()
            .map(|kv| {
                (
                    Value::from(kv.key.as_str()),
                    Value::from(kv.value.as_ref().map(text).unwrap_or_default()),
                )
            })
            .collect();
        put(ATTRIBUTES, Value::Map(attributes));
    }
    if !resource.is_empty() {
        put(RESOURCE, Value::Map(resource.to_vec()));
    }
    Event {
        time_nanos,
        record: fields,
    }
}

/// A value as text: strings as they are (bytes that are UTF-8 too, so masking sees them),
/// everything else as JSON.
fn text(value: &AnyValue) -> String {
    match &value.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BytesValue(b)) if std::str::from_utf8(b).is_ok() => {
            String::from_utf8_lossy(b).into_owned()
        }
        None => String::new(),
        Some(_) => json(value).to_string(),
    }
}

fn json(value: &AnyValue) -> serde_json::Value {
    use serde_json::Value as J;
    match &value.value {
        None | Some(any_value::Value::StringValueStrindex(_)) => J::Null,
        Some(any_value::Value::StringValue(s)) => J::from(s.as_str()),
        Some(any_value::Value::BoolValue(b)) => J::from(*b),
        Some(any_value::Value::IntValue(i)) => J::from(*i),
        Some(any_value::Value::DoubleValue(d)) => J::from(*d),
        // Text when it is UTF-8 (masking reads it), else base64.
        Some(any_value::Value::BytesValue(b)) => match std::str::from_utf8(b) {
            Ok(text) => J::from(text),
            Err(_) => {
                use base64::Engine as _;
                J::from(base64::engine::general_purpose::STANDARD.encode(b))
            }
        },
        Some(any_value::Value::ArrayValue(a)) => J::Array(a.values.iter().map(json).collect()),
        Some(any_value::Value::KvlistValue(kv)) => J::Object(
            kv.values
                .iter()
                .map(|kv| (kv.key.clone(), kv.value.as_ref().map_or(J::Null, json)))
                .collect(),
        ),
    }
}

/// The level an OTLP severity number names (1–4 TRACE … 21–24 FATAL), else its text's.
fn level(number: i64, text: Option<&str>) -> Option<Level> {
    match number {
        1..=4 => Some(Level::Trace),
        5..=8 => Some(Level::Debug),
        9..=12 => Some(Level::Info),
        13..=16 => Some(Level::Warn),
        17..=20 => Some(Level::Error),
        21..=24 => Some(Level::Fatal),
        _ => text.and_then(Level::parse),
    }
}

/// What the pipeline knows of a buffered OTLP event besides its body.
#[derive(Debug)]
pub struct Otlp {
    /// Its body.
    pub body: String,
    /// The resource's `host.name`.
    pub host: String,
    /// The record, with everything but the body's text (level, logger, trace id, fields).
    pub record: Record,
}

/// A buffered OTLP event as a record: body as the message, scope as the logger, the
/// `thread.name` attribute as the thread, other attributes (and the span id) as fields.
pub fn record(event: &Event) -> Otlp {
    let mut out = Otlp {
        body: String::new(),
        host: String::new(),
        record: Record {
            time_micros: Some(event.time_nanos.div_euclid(1_000)),
            line_count: 1,
            ..Record::default()
        },
    };
    let mut severity: (i64, Option<String>) = (0, None);
    for (key, value) in &event.record {
        let text = || {
            crate::forward::text(value)
                .map(|t| t.into_owned())
                .unwrap_or_default()
        };
        match key.as_str() {
            Some(BODY) => out.body = text(),
            Some(HOST) => out.host = text(),
            Some(SEVERITY_NUMBER) => severity.0 = value.as_i64().unwrap_or_default(),
            Some(SEVERITY_TEXT) => severity.1 = Some(text()),
            Some(TRACE_ID) => out.record.trace_id = record::trace_id(&text()).unwrap_or_default(),
            Some(SPAN_ID) => {
                out.record.fields.insert("span_id".to_owned(), text());
            }
            Some(SCOPE) => out.record.logger = text(),
            Some(EVENT_NAME) => {
                out.record.fields.insert("event_name".to_owned(), text());
            }
            Some(RESOURCE) => {
                let Value::Map(attributes) = value else {
                    continue;
                };
                for (k, v) in attributes {
                    if let (Some(k), Some(v)) = (crate::forward::text(k), crate::forward::text(v)) {
                        out.record.fields.insert(k.into_owned(), v.into_owned());
                    }
                }
            }
            Some(ATTRIBUTES) => {
                let Value::Map(attributes) = value else {
                    continue;
                };
                for (k, v) in attributes {
                    let (Some(k), Some(v)) = (crate::forward::text(k), crate::forward::text(v))
                    else {
                        continue;
                    };
                    if k == "thread.name" {
                        out.record.thread = v.into_owned();
                    } else if k == EXCEPTION_STACKTRACE && !v.is_empty() {
                        // The whole trace, where the contract keeps it (capped with the
                        // message, searched by TailLogs, counted by exception class).
                        out.record.stack_trace = v.into_owned();
                    } else if k != "span_id" || !out.record.fields.contains_key("span_id") {
                        // The record's own span id, read before or after, wins over an
                        // attribute of that name.
                        out.record.fields.insert(k.into_owned(), v.into_owned());
                    }
                }
            }
            _ => {}
        }
    }
    out.record.level = level(severity.0, severity.1.as_deref());
    // An event without a body (`event_name` set, the data in attributes): its name is the
    // line, not an empty one.
    if out.body.is_empty()
        && let Some(name) = out.record.fields.get("event_name")
    {
        out.body.clone_from(name);
    }
    out
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::{
        collector::logs::v1::ExportLogsServiceRequest,
        common::v1::{InstrumentationScope, KeyValueList},
        logs::v1::{ResourceLogs, ScopeLogs},
        resource::v1::Resource,
    };

    use super::*;

    /// `request`'s batches, all of them, and what was rejected.
    fn batches(
        request: ExportLogsServiceRequest,
        received_nanos: i64,
        max_batch: usize,
    ) -> (Vec<Batch>, Rejected) {
        let mut batches = Vec::new();
        let mut emit = |b| {
            batches.push(b);
            true
        };
        let rejected = convert(
            &Export::of(&request),
            received_nanos,
            max_batch,
            &mut emit,
            &|| false,
        );
        (batches, rejected)
    }

    fn string(s: &str) -> Option<AnyValue> {
        Some(AnyValue {
            value: Some(any_value::Value::StringValue(s.to_owned())),
        })
    }

    fn kv(key: &str, value: Option<AnyValue>) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value,
            ..KeyValue::default()
        }
    }

    fn export(records: Vec<LogRecord>, service: Option<&str>) -> ResourceLogs {
        ResourceLogs {
            resource: Some(Resource {
                attributes: service
                    .map(|s| {
                        vec![
                            kv("service.name", string(s)),
                            kv("host.name", string("web-1")),
                        ]
                    })
                    .unwrap_or_default(),
                ..Resource::default()
            }),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope {
                    name: "com.mall.Cart".to_owned(),
                    ..InstrumentationScope::default()
                }),
                log_records: records,
                ..ScopeLogs::default()
            }],
            ..ResourceLogs::default()
        }
    }

    fn bodies(batches: &[Batch]) -> Vec<(String, String)> {
        batches
            .iter()
            .flat_map(|b| {
                b.events
                    .iter()
                    .map(|e| (b.tag.clone(), record(&e.to_event()).body))
            })
            .collect()
    }

    fn logs(bodies: &[&str]) -> Vec<LogRecord> {
        bodies
            .iter()
            .map(|body| LogRecord {
                time_unix_nano: 1_730_103_120_040_000_000,
                body: string(body),
                ..LogRecord::default()
            })
            .collect()
    }

    /// Each record is refused alone, with why, past the caps that keep its decoding and
    /// its copies small: more than 10,000 values, a resource's copied field or a scope's
    /// name of more than 2,048 bytes, or bytes that do not decode (a body that is not
    /// UTF-8); the export's other records are stored.
    #[test]
    fn records_past_the_caps_are_rejected_alone() {
        let many = LogRecord {
            body: string("many"),
            attributes: (0..=MAX_VALUES_PER_RECORD / 2)
                .map(|i| kv(&i.to_string(), string("v")))
                .collect(),
            ..LogRecord::default()
        };
        let mut first = export(logs(&["kept 1", "Xnot utf-8"]), Some("shop"));
        first.scope_logs[0].log_records.push(many);
        let mut wide_host = export(logs(&["wide host"]), Some("shop"));
        wide_host.resource.as_mut().expect("a resource").attributes[1] =
            kv("host.name", string(&"h".repeat(MAX_COPIED_BYTES + 1)));
        let mut wide_scope = export(logs(&["wide scope"]), Some("shop"));
        wide_scope.scope_logs[0].scope = Some(InstrumentationScope {
            name: "s".repeat(MAX_COPIED_BYTES + 1),
            ..InstrumentationScope::default()
        });
        let last = export(logs(&["kept 2"]), Some("shop"));
        let request = ExportLogsServiceRequest {
            resource_logs: vec![first, wide_host, wide_scope, last],
        };
        // The body "Xnot utf-8" made invalid UTF-8 where it lies.
        let mut bytes = request.encode_to_vec();
        let at = bytes
            .windows(10)
            .position(|w| w == b"Xnot utf-8")
            .expect("the body");
        bytes[at] = 0xff;
        let scanned = Export::scan(bytes.into()).expect("its framing is right");
        let mut batches = Vec::new();
        let rejected = convert(
            &scanned,
            5,
            MAX_BATCH_BYTES,
            &mut |b| {
                batches.push(b);
                true
            },
            &|| false,
        );
        let kept: Vec<String> = bodies(&batches).into_iter().map(|(_, b)| b).collect();
        assert_eq!(kept, ["kept 1", "kept 2"]);
        assert_eq!(rejected.count(), 4, "{}", rejected.message());
        let message = rejected.message();
        assert!(
            message.starts_with("resource_logs[0].scope_logs[0].log_records[1]: does not decode"),
            "{message}"
        );
        // The others' reasons, one by one.
        let many = ExportLogsServiceRequest {
            resource_logs: vec![export(
                vec![LogRecord {
                    attributes: (0..=MAX_VALUES_PER_RECORD / 2)
                        .map(|i| kv(&i.to_string(), string("v")))
                        .collect(),
                    ..LogRecord::default()
                }],
                Some("shop"),
            )],
        };
        assert!(
            batches_of(many)
                .1
                .message()
                .contains("holds 10002 attributes and values, more than 10000")
        );
        let host = ExportLogsServiceRequest {
            resource_logs: vec![{
                let mut r = export(logs(&["x"]), Some("shop"));
                r.resource.as_mut().expect("a resource").attributes[1] =
                    kv("host.name", string(&"h".repeat(MAX_COPIED_BYTES + 1)));
                r
            }],
        };
        assert!(
            batches_of(host)
                .1
                .message()
                .contains("the resource's host.name takes")
        );
        let scope = ExportLogsServiceRequest {
            resource_logs: vec![{
                let mut r = export(logs(&["x"]), Some("shop"));
                r.scope_logs[0].scope = Some(InstrumentationScope {
                    name: "s".repeat(MAX_COPIED_BYTES + 1),
                    ..InstrumentationScope::default()
                });
                r
            }],
        };
        assert!(
            batches_of(scope)
                .1
                .message()
                .contains("its scope's name takes")
        );
    }

    fn batches_of(request: ExportLogsServiceRequest) -> (Vec<Batch>, Rejected) {
        batches(request, 5, MAX_BATCH_BYTES)
    }

    /// A service's records share batches however the export interleaves its resources, and
    /// batches come in order of their services' first records.
    #[test]
    fn interleaved_services_share_their_batches() {
        let request = ExportLogsServiceRequest {
            resource_logs: vec![
                export(logs(&["a1"]), Some("a")),
                export(logs(&["b1"]), Some("b")),
                export(logs(&["a2"]), Some("a")),
            ],
        };
        let (batches, _) = batches_of(request);
        assert_eq!(
            bodies(&batches),
            [("a", "a1"), ("a", "a2"), ("b", "b1")].map(|(t, b)| (t.to_owned(), b.to_owned()))
        );
        assert_eq!(batches.len(), 2);
    }

    /// An export's records take at most MAX_EXPORT_BUFFERED buffered (a small export's
    /// bound): past it (fields copied into millions of tiny records would fill the buffer),
    /// the rest are rejected.
    #[test]
    fn an_export_past_what_it_may_buffer_has_the_rest_rejected() {
        let mut resource = export(logs(&["x"; 4_000]), Some("shop"));
        let attributes = &mut resource.resource.as_mut().expect("a resource").attributes;
        for key in RESOURCE_FIELDS {
            attributes.push(kv(key, string(&"k".repeat(MAX_COPIED_BYTES - 64))));
        }
        let request = ExportLogsServiceRequest {
            resource_logs: vec![resource],
        };
        assert!(request.encoded_len() < 100_000);
        let (batches, rejected) = batches_of(request);
        let kept: usize = batches.iter().map(|b| b.events.len()).sum();
        let buffered: usize = batches.iter().map(|b| b.events.encoded_len()).sum();
        assert!(kept > 3_000 && kept < 4_000, "{kept}");
        assert_eq!(kept + rejected.count(), 4_000);
        assert!(buffered <= MAX_EXPORT_BUFFERED + (1 << 20), "{buffered}");
        assert!(
            rejected
                .message()
                .contains("the export's records take more than"),
            "{}",
            rejected.message()
        );
    }

    #[test]
    fn records_keep_body_severity_ids_scope_and_attributes() {
        let log = LogRecord {
            time_unix_nano: 1_730_103_120_040_000_000,
            severity_number: 17,
            severity_text: "oops".to_owned(),
            body: string("cart 8812 failed"),
            attributes: vec![
                kv("thread.name", string("hybrisHTTP12")),
                // Not the record's span id, which wins.
                kv("span_id", string("an attribute")),
                kv(
                    "order",
                    Some(AnyValue {
                        value: Some(any_value::Value::KvlistValue(KeyValueList {
                            values: vec![kv(
                                "id",
                                Some(AnyValue {
                                    value: Some(any_value::Value::IntValue(7)),
                                }),
                            )],
                        })),
                    }),
                ),
            ],
            trace_id: vec![0x4b; 16],
            span_id: vec![0x01; 8],
            ..LogRecord::default()
        };
        let request = ExportLogsServiceRequest {
            resource_logs: vec![export(vec![log], Some("storefront"))],
        };
        let (batches, rejected) = batches(request, 5, MAX_BATCH_BYTES);
        assert_eq!(rejected.count, 0);
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].tag, "storefront");
        // Through the buffer's encoding and back, as the pipeline reads it.
        let batch = Batch::decode(&batches[0].encode()).expect("decodes");
        let otlp = record(&batch.events.iter().next().expect("one").to_event());
        assert_eq!(otlp.body, "cart 8812 failed");
        assert_eq!(otlp.host, "web-1");
        let r = otlp.record;
        assert_eq!(r.time_micros, Some(1_730_103_120_040_000));
        assert_eq!(r.level, Some(Level::Error), "the number wins over the text");
        assert_eq!(r.trace_id, "4b".repeat(16));
        assert_eq!(r.fields["span_id"], "01".repeat(8));
        assert_eq!(r.logger, "com.mall.Cart");
        assert_eq!(r.thread, "hybrisHTTP12");
        assert_eq!(r.fields["order"], r#"{"id":7}"#);
    }

    #[test]
    fn stack_traces_events_pods_and_text_in_bytes_are_kept_where_they_are_read() {
        let bytes = |b: &[u8]| {
            Some(AnyValue {
                value: Some(any_value::Value::BytesValue(b.to_vec())),
            })
        };
        let trace = "java.lang.IllegalStateException: broken\n\tat a.B.c(B.java:1)";
        let logs = vec![
            // What the OpenTelemetry Java and Python appenders send for an exception.
            LogRecord {
                body: string("cart failed"),
                attributes: vec![
                    kv("exception.type", string("java.lang.IllegalStateException")),
                    kv("exception.stacktrace", string(trace)),
                    kv("raw", bytes(b"to kim@example.com")),
                    kv("binary", bytes(&[0xff, 0x00])),
                ],
                span_id: vec![0; 8],
                ..LogRecord::default()
            },
            // An event: a name, no body.
            LogRecord {
                event_name: "page_view".to_owned(),
                ..LogRecord::default()
            },
            // Too large to be a log line (JSON of control characters grows sixfold).
            LogRecord {
                body: Some(AnyValue {
                    value: Some(any_value::Value::ArrayValue(
                        opentelemetry_proto::tonic::common::v1::ArrayValue {
                            values: vec![string(&"\u{1}".repeat(1 << 20)).expect("a value")],
                        },
                    )),
                }),
                ..LogRecord::default()
            },
        ];
        let mut resource_logs = export(logs, Some("storefront"));
        if let Some(resource) = &mut resource_logs.resource {
            resource
                .attributes
                .push(kv("k8s.pod.name", string("storefront-7d9f-x2")));
            resource
                .attributes
                .push(kv("telemetry.sdk.name", string("opentelemetry")));
        }
        let (batches, rejected) = batches(
            ExportLogsServiceRequest {
                resource_logs: vec![resource_logs],
            },
            5,
            MAX_BATCH_BYTES,
        );
        assert_eq!(rejected.count, 1);
        assert!(
            rejected
                .message()
                .starts_with("resource_logs[0].scope_logs[0].log_records[2]: takes "),
            "{}",
            rejected.message()
        );
        let batch = Batch::decode(&batches[0].encode()).expect("decodes");
        let mut events = batch.events.iter();
        let first = record(&events.next().expect("the exception").to_event());
        assert_eq!(first.body, "cart failed");
        assert_eq!(first.record.stack_trace, trace);
        assert!(!first.record.fields.contains_key("exception.stacktrace"));
        assert_eq!(
            first.record.fields["exception.type"],
            "java.lang.IllegalStateException"
        );
        assert_eq!(
            first.record.fields["raw"], "to kim@example.com",
            "masked later as text"
        );
        assert_eq!(first.record.fields["binary"], r#""/wA=""#);
        assert!(
            !first.record.fields.contains_key("span_id"),
            "all zeros: none"
        );
        assert_eq!(first.record.fields["k8s.pod.name"], "storefront-7d9f-x2");
        assert!(!first.record.fields.contains_key("telemetry.sdk.name"));
        let event = record(&events.next().expect("the event").to_event());
        assert_eq!(event.body, "page_view");
        assert_eq!(event.record.fields["event_name"], "page_view");
        assert!(events.next().is_none());
    }

    #[test]
    fn records_with_malformed_ids_are_kept_without_them_with_a_warning() {
        let good = LogRecord {
            body: string("fine"),
            severity_text: "warning".to_owned(),
            observed_time_unix_nano: 42,
            ..LogRecord::default()
        };
        let bad_trace = LogRecord {
            trace_id: vec![1; 15],
            ..good.clone()
        };
        let bad_span = LogRecord {
            span_id: vec![1; 9],
            ..good.clone()
        };
        let request = ExportLogsServiceRequest {
            resource_logs: vec![
                export(vec![bad_trace, good.clone()], None),
                export(vec![bad_span], Some("storefront")),
            ],
        };
        let (batches, rejected) = batches(request, 5, MAX_BATCH_BYTES);
        assert_eq!(rejected.count, 0, "{}", rejected.message());
        assert!(rejected.any(), "warned");
        assert_eq!(
            rejected.message(),
            "resource_logs[0].scope_logs[0].log_records[0]: trace_id has 15 bytes, not 16: \
             kept without it (and 1 more)"
        );
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[0].tag, UNKNOWN_SERVICE);
        assert_eq!(batches[1].tag, "storefront");
        let kept: Vec<_> = batches
            .iter()
            .flat_map(|b| b.events.iter().map(|e| record(&e.to_event())))
            .collect();
        assert_eq!(kept.len(), 3, "every record kept");
        for parsed in &kept {
            assert_eq!(parsed.body, "fine");
            assert_eq!(parsed.record.trace_id, "", "no trace");
            assert_eq!(parsed.record.fields.get("span_id"), None);
        }
        let r = record(&batches[0].events.iter().next().expect("one").to_event()).record;
        assert_eq!(
            r.time_micros,
            Some(0),
            "observed time when there is no time"
        );
        assert_eq!(
            r.level,
            Some(Level::Warn),
            "the text when there is no number"
        );

        // A record with a malformed id that is rejected all the same (small as sent, too
        // large to buffer once its resource's fields are copied into it) is rejected, not
        // also warned of as kept.
        let small = LogRecord {
            body: string("small"),
            trace_id: vec![1; 15],
            ..LogRecord::default()
        };
        let mut resource_logs = export(vec![small], Some("storefront"));
        resource_logs
            .resource
            .as_mut()
            .expect("a resource")
            .attributes
            .push(kv("service.version", string(&"y".repeat(1_500))));
        let request = ExportLogsServiceRequest {
            resource_logs: vec![resource_logs],
        };
        let (stored, rejected) = self::batches(request, 5, 1_024);
        assert!(stored.is_empty());
        assert!(
            rejected
                .message()
                .contains("bytes buffered, more than 1024"),
            "rejected once converted, after its ids were read: {}",
            rejected.message()
        );
        assert_eq!(
            (rejected.count, rejected.warnings),
            (1, 0),
            "{}",
            rejected.message()
        );
    }

    #[test]
    fn a_large_export_is_buffered_in_pieces_in_order() {
        let body = "x".repeat(1 << 20);
        let records = (0..10)
            .map(|i| LogRecord {
                body: string(&format!("{i} {body}")),
                ..LogRecord::default()
            })
            .collect();
        let request = ExportLogsServiceRequest {
            resource_logs: vec![export(records, Some("storefront"))],
        };
        let (batches, _) = batches(request, 5, MAX_BATCH_BYTES);
        assert_eq!(
            batches.len(),
            4,
            "three records of 1 MiB and a little fit under 4 MiB"
        );
        let bodies: Vec<String> = batches
            .iter()
            .flat_map(|b| b.events.iter())
            .map(|e| record(&e.to_event()).body[..2].to_owned())
            .collect();
        let want: Vec<String> = (0..10).map(|i| format!("{i} ")).collect();
        assert_eq!(bodies, want);
        assert!(
            batches
                .iter()
                .all(|b| b.encode().len() <= MAX_BATCH_BYTES + (2 << 20))
        );
    }

    #[test]
    fn a_record_without_any_time_has_the_time_it_arrived() {
        let log = LogRecord {
            body: string("x"),
            ..LogRecord::default()
        };
        let event = event(log, "", "", &[], 1_000_000);
        assert_eq!(event.time_nanos, 1_000_000);
    }
}
