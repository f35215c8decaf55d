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
//! Failures: a record with a malformed trace or span id (not 16 or 8 bytes) is the
//! record's fault: it is rejected and counted in `partial_success`, the rest stored. A full
//! buffer is the environment's: the whole export gets UNAVAILABLE with RetryInfo and
//! nothing is acknowledged (the exporter retries; batches stored before the buffer filled
//! are recognised when they come again, see [`crate::recent`]).

use std::{sync::Arc, time::Duration};

use prost::Message as _;
use tokio::sync::Semaphore;

use opentelemetry_proto::tonic::{
    collector::logs::v1::{
        ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
        logs_service_server::LogsService,
    },
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
    recent::{Recent, Stored},
    record::{self, Level, Record},
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

/// The attribute OpenTelemetry's semantic conventions give an exception's stack trace
/// (the Java and Python appenders send the message as the body and the trace here).
const EXCEPTION_STACKTRACE: &str = "exception.stacktrace";

/// The `LogsService` handler.
#[derive(Debug, Clone)]
pub struct OtlpInput {
    /// Where exports go.
    pub buffer: Buffer,
    /// Batches stored already (an export sent again after a lost answer).
    pub recent: Recent,
    /// Counters.
    pub metrics: LogMetrics,
    /// `otlp.max_bytes_in_flight`: bytes of exports as they arrive, then at least their
    /// encoded size, and their [`weight`] where it has room.
    pub budget: Arc<Semaphore>,
    /// The budget's size: the most one export takes of it.
    pub budget_bytes: usize,
}

#[tonic::async_trait]
impl LogsService for OtlpInput {
    async fn export(
        &self,
        request: Request<ExportLogsServiceRequest>,
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
        let request = request.into_inner();
        // Held until the export is stored: exports being converted and stored at once stay
        // within the budget; past it, the caller retries (nothing of it was taken).
        // At least its encoded size, at most `server.max_message_bytes`, which start-up holds
        // within the budget (and within what `try_acquire_many` counts).
        let encoded = request.encoded_len();
        let size = encoded.min(crate::forward_input::MAX_BUDGET);
        let had = from_body.as_ref().map_or(0, |p| p.num_permits());
        let in_flight = if had >= size {
            Some(from_body)
        } else {
            // More than its body took (a gzip export inflates): its bytes are all read, so
            // waiting stalls no connection. Holding nothing while it waits (what the body
            // took goes back first), in turn with other waiters: a large export is not
            // refused for ever by smaller ones taking the room it waits for.
            drop(from_body);
            let wanted = u32::try_from(size).unwrap_or(u32::MAX);
            tokio::time::timeout(TOP_UP_WAIT, self.budget.clone().acquire_many_owned(wanted))
                .await
                .ok()
                .and_then(Result::ok)
                .map(Some)
        };
        let Some(in_flight) = in_flight else {
            let records = request
                .resource_logs
                .iter()
                .flat_map(|r| &r.scope_logs)
                .map(|s| s.log_records.len())
                .sum();
            count("refused_busy", records);
            return Err(busy());
        };
        // And what it weighs in memory beyond that ([`weight`]: several times its bytes for
        // many small records), if the budget has room for it now: taken, it keeps new calls
        // out (refused at their first frame) until this one is stored. Never waited for: an
        // export wholly received and counted as sent is not refused for it, nor made to wait
        // in turn behind others (one heavy export would hold up every other call).
        let held = in_flight.as_ref().map_or(0, |p| p.num_permits());
        let extra = weight(&request, encoded)
            .min(self.budget_bytes)
            .min(crate::forward_input::MAX_BUDGET)
            .saturating_sub(held);
        let more = self
            .budget
            .clone()
            .try_acquire_many_owned(u32::try_from(extra).unwrap_or(u32::MAX))
            .ok();
        let _held_until_stored = (in_flight, more);
        // Converting a large export is CPU work: off the runtime's workers, so the other
        // inputs and the pipeline go on meanwhile.
        let (batches, rejected) = tokio::task::spawn_blocking(move || batches(request, received))
            .await
            // Not the error itself: what a panic said may quote the export's records.
            .map_err(|_| Status::internal("converting the export failed"))?;
        for batch in batches {
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
            return Err(match error {
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
            }
            .into());
        }
        // Counted once the export is answered: one refused above comes again with the same
        // malformed records, which would otherwise be counted on every retry.
        count("rejected", rejected.count);
        Ok(Response::new(ExportLogsServiceResponse {
            partial_success: (rejected.count > 0).then(|| ExportLogsPartialSuccess {
                rejected_log_records: i64::try_from(rejected.count).unwrap_or(i64::MAX),
                error_message: rejected.message(),
            }),
        }))
    }
}

/// The OTLP service with the bytes of each export counted against `otlp.max_bytes_in_flight`
/// as they arrive, before tonic has the export whole (it reads and decodes it before the
/// handler can weigh it). A frame that would pass the budget fails its call at once with
/// UNAVAILABLE and RetryInfo, as the handler's own refusal does; nothing of it is taken.
/// Nothing waits: a call held back here would hold its unread bytes in the connection's
/// shared HTTP/2 window and stall the other calls on that connection (why an earlier
/// version, which queued calls, was reverted). A refused call's stream is reset, and HTTP/2
/// gives its window back.
///
/// What an export's body took is handed to its handler ([`BodyPermits`], in the request's
/// extensions): an export wholly received is not refused for room that other calls took
/// between its last frame and its handler. One that needs more (a gzip export inflates)
/// waits for it in turn, up to [`TOP_UP_WAIT`]; what it weighs in memory beyond that
/// ([`weight`]) it takes only where the budget has room at once. A call counts at most
/// `max_message_bytes` (tonic decodes one message of a unary call; bytes after it are not
/// counted), so one export at the limit always fits the budget. Bytes are counted as sent:
/// a gzip export's inflated form (at most `server.max_message_bytes`) is uncounted from its
/// decoding to its handler (README, `otlp.max_bytes_in_flight`).
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

/// Records an export rejected, and why (the first reason, with how many others).
#[derive(Debug, Default)]
struct Rejected {
    count: usize,
    first: Option<String>,
}

impl Rejected {
    fn add(&mut self, why: String) {
        self.count += 1;
        self.first.get_or_insert(why);
    }

    fn message(&self) -> String {
        let first = self.first.clone().unwrap_or_default();
        match self.count {
            0 | 1 => first,
            n => format!("{first} (and {} more)", n - 1),
        }
    }
}

/// An export's records as batches per `service.name` (in order of first appearance, split
/// at about [`MAX_BATCH_BYTES`]), and what was rejected.
fn batches(request: ExportLogsServiceRequest, received_nanos: i64) -> (Vec<Batch>, Rejected) {
    // Per service: its events, decoded (split into batches at the end).
    let mut services: Vec<(String, Vec<Event>)> = Vec::new();
    let mut rejected = Rejected::default();
    for (r, resource_logs) in request.resource_logs.into_iter().enumerate() {
        let resource = resource_logs.resource.unwrap_or_default().attributes;
        let service = attribute(&resource, "service.name")
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| UNKNOWN_SERVICE.to_owned());
        let host = attribute(&resource, "host.name").unwrap_or_default();
        let kept: Vec<(Value, Value)> = RESOURCE_FIELDS
            .iter()
            .filter_map(|key| {
                let value = attribute(&resource, key).filter(|v| !v.is_empty())?;
                Some((Value::from(*key), Value::from(value)))
            })
            .collect();
        let at = match services.iter().position(|(tag, _)| *tag == service) {
            Some(at) => at,
            None => {
                services.push((service, Vec::new()));
                services.len() - 1
            }
        };
        for (s, scope_logs) in resource_logs.scope_logs.into_iter().enumerate() {
            let scope = scope_logs.scope.map(|s| s.name).unwrap_or_default();
            for (l, log) in scope_logs.log_records.into_iter().enumerate() {
                let path = format!("resource_logs[{r}].scope_logs[{s}].log_records[{l}]");
                match event(log, &scope, &host, &kept, received_nanos) {
                    // An event that large is no log line (Loki takes 256 KB): JSON of a
                    // binary or control characters. Refused alone, so the export's other
                    // records are stored and the sender does not retry it for ever.
                    Ok(event) if event_bytes(&event) > MAX_BATCH_BYTES => rejected.add(format!(
                        "{path}: takes {} bytes buffered, more than {MAX_BATCH_BYTES}",
                        event_bytes(&event)
                    )),
                    Ok(event) => services[at].1.push(event),
                    Err(why) => rejected.add(format!("{path}: {why}")),
                }
            }
        }
    }
    services.retain(|(_, events)| !events.is_empty());
    (
        services
            .into_iter()
            // By the forward input's clock, which never goes back (the pipeline judges
            // quiet in a backlog by it).
            .flat_map(|(tag, events)| split(tag, events, crate::batch::now_ms()))
            .collect(),
        rejected,
    )
}

/// About what an export takes in memory from its handler's start until it is stored: its
/// decoded form (prost's structs, every string and bytes field an allocation of its own)
/// and what conversion builds from it (an [`Event`] per record, an rmpv pair per key and
/// value, then the encoded batches). Its encoded bytes count twice (the strings decoded, then
/// converted), and each record and attribute its structures: many small records take several
/// times their encoded size, which the encoded size alone would let past the budget. An
/// estimate (allocators round up; nested values count by their bytes only), not a measure.
/// `encoded` is its encoded size (`encoded_len`, which walks it: the caller has it).
pub fn weight(request: &ExportLogsServiceRequest, encoded: usize) -> usize {
    use std::mem::size_of;
    /// An allocation's bookkeeping and rounding, about.
    const ALLOCATION: usize = 32;
    /// A record's structs: its prost form, its event, and the event's up to ten pairs of
    /// the buffer's keys (`body`, `severity_number`, …) with their values.
    const PER_RECORD: usize =
        size_of::<LogRecord>() + size_of::<Event>() + 10 * (2 * size_of::<Value>() + ALLOCATION);
    /// An attribute's: its prost form and its key and value as decoded, then converted.
    const PER_ATTRIBUTE: usize = size_of::<KeyValue>() + 2 * size_of::<Value>() + 4 * ALLOCATION;
    let (mut records, mut attributes) = (0_usize, 0_usize);
    for resource_logs in &request.resource_logs {
        attributes += resource_logs
            .resource
            .as_ref()
            .map_or(0, |r| r.attributes.len());
        for scope_logs in &resource_logs.scope_logs {
            records += scope_logs.log_records.len();
            attributes += scope_logs
                .log_records
                .iter()
                .map(|l| l.attributes.len())
                .sum::<usize>();
        }
    }
    encoded
        .saturating_mul(2)
        .saturating_add(records.saturating_mul(PER_RECORD))
        .saturating_add(attributes.saturating_mul(PER_ATTRIBUTE))
}

/// A buffered batch holds about this many bytes of an export at most: an export of up to
/// `server.max_message_bytes` (16 MiB) becomes several batches, each far under a segment,
/// so the buffer never refuses an export as too large.
const MAX_BATCH_BYTES: usize = 4 << 20;

/// A service's events in consecutive batches of about [`MAX_BATCH_BYTES`] at most (one
/// event each at least).
/// `received_ms`: when the export arrived (each batch's [`Batch::received_ms`]).
fn split(tag: String, events: Vec<Event>, received_ms: i64) -> Vec<Batch> {
    let piece = |events: Events| Batch {
        source: Source::Otlp,
        tag: tag.clone(),
        events,
        received_ms,
    };
    let mut pieces = Vec::new();
    // Built with room for the batch's header: stored without another copy.
    let mut current = Events::for_batch(&tag, 0, None);
    for event in &events {
        let size = event_bytes(event);
        if !current.is_empty() && current.encoded_len() + size > MAX_BATCH_BYTES {
            pieces.push(piece(std::mem::replace(
                &mut current,
                Events::for_batch(&tag, 0, None),
            )));
        }
        current.push(event);
    }
    if !current.is_empty() {
        pieces.push(piece(current));
    }
    pieces
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

/// One record as a buffered event; the reason when it is malformed.
fn event(
    log: LogRecord,
    scope: &str,
    host: &str,
    resource: &[(Value, Value)],
    received_nanos: i64,
) -> Result<Event, String> {
    if !matches!(log.trace_id.len(), 0 | 16) {
        return Err(format!(
            "trace_id has {} bytes; it must have 16 or none",
            log.trace_id.len()
        ));
    }
    if !matches!(log.span_id.len(), 0 | 8) {
        return Err(format!(
            "span_id has {} bytes; it must have 8 or none",
            log.span_id.len()
        ));
    }
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
    Ok(Event {
        time_nanos,
        record: fields,
    })
}

/// The text of a string attribute of `attributes`.
fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .map(text)
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
        common::v1::{InstrumentationScope, KeyValueList},
        logs::v1::{ResourceLogs, ScopeLogs},
        resource::v1::Resource,
    };

    use super::*;

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
        let (batches, rejected) = batches(request, 5);
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
    fn malformed_ids_are_rejected_one_by_one_and_the_rest_kept() {
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
        let (batches, rejected) = batches(request, 5);
        assert_eq!(rejected.count, 2);
        assert_eq!(
            rejected.message(),
            "resource_logs[0].scope_logs[0].log_records[0]: trace_id has 15 bytes; \
             it must have 16 or none (and 1 more)"
        );
        // The storefront batch lost its only record and is not stored at all.
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].tag, UNKNOWN_SERVICE);
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
        let (batches, _) = batches(request, 5);
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
        let event = event(log, "", "", &[], 1_000_000).expect("valid");
        assert_eq!(event.time_nanos, 1_000_000);
    }
}
