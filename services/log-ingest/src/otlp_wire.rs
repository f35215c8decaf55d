//! OTLP's `LogsService/Export` on the wire: an export is walked, never decoded whole.
//!
//! Decoded, protobuf's smallest values take far more than their bytes: an empty log record
//! is 2 bytes sent and a few hundred decoded (prost's struct, then conversion's event), so
//! 16 MiB of them, or a few kilobytes of gzip inflating to that, would take gigabytes if
//! the export were decoded at once, as the server `opentelemetry-proto` generates does
//! before any handler runs. Here the codec only checks the message's framing
//! ([`Export::scan`]: lengths, varints, nesting; no allocation), and the handler
//! ([`crate::otlp_input::OtlpInput::export`]) decodes one record at a time, storing the
//! batches as they fill: an export takes its own bytes and a few batches in memory, however
//! its records are shaped.
//!
//! The server for the method is ours for that codec; it is what tonic generates (a unary
//! method through [`tonic::server::Grpc`]) with a decoder that walks instead of decoding.

use std::{future::Future, pin::Pin, sync::Arc};

use bytes::{Buf as _, Bytes};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use prost::Message as _;
use tonic::{
    Status,
    codec::{CompressionEncoding, DecodeBuf, EnabledCompressionEncodings},
};

use crate::{
    otlp_input::OtlpInput,
    wire::{Fields, fields},
};

/// The method's path; the service's name is what reflection and routing know it by.
const EXPORT: &str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";
const SERVICE: &str = "opentelemetry.proto.collector.logs.v1.LogsService";

/// Deepest nesting of values (arrays and key-value lists in a body or an attribute) a scan
/// follows; prost refuses deeper messages too (its recursion limit is 100).
const MAX_NESTING: usize = 64;

/// An export as received: its bytes, its framing checked, not decoded.
#[derive(Debug, Clone)]
pub struct Export {
    bytes: Bytes,
    records: usize,
    copied: usize,
}

impl Export {
    /// Walks `bytes` as an `ExportLogsServiceRequest`: every length, varint and nesting of
    /// the messages conversion reads (resources, scopes, records and their values).
    ///
    /// # Errors
    /// Why the bytes are not one (a length past the end, a bad varint, too deep).
    pub fn scan(bytes: Bytes) -> Result<Self, &'static str> {
        let mut totals = Totals::default();
        for resource_logs in fields(&bytes, 1) {
            scan_resource_logs(resource_logs?, &mut totals)?;
        }
        Ok(Self {
            bytes,
            records: totals.records,
            copied: totals.copied,
        })
    }

    /// `request`, encoded and walked (for callers in this process and tests).
    pub fn of(request: &ExportLogsServiceRequest) -> Self {
        Self::scan(request.encode_to_vec().into()).expect("prost's encoding walks")
    }

    /// How many log records it holds.
    pub fn records(&self) -> usize {
        self.records
    }

    /// The bytes conversion copies into its records, summed over them: each resource's
    /// `host.name` and kept fields and each scope's name, as sent, once per record.
    pub fn copied(&self) -> usize {
        self.copied
    }

    /// Its encoded size.
    pub fn encoded_len(&self) -> usize {
        self.bytes.len()
    }

    /// Its bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// What a scan counts.
#[derive(Debug, Default)]
struct Totals {
    records: usize,
    /// Key-value pairs and values (attributes, and the values nested in bodies and
    /// attributes), each a struct of its own decoded.
    values: usize,
    /// See [`Export::copied`].
    copied: usize,
}

/// How many values a log record's bytes hold: its attributes and the values in its body
/// and attributes, nested ones too (each a struct of its own decoded).
///
/// # Errors
/// As [`Export::scan`].
pub fn values_in_record(bytes: &[u8]) -> Result<usize, &'static str> {
    let mut totals = Totals::default();
    scan_record(bytes, &mut totals)?;
    Ok(totals.values)
}

/// `ResourceLogs { resource = 1 (Resource { attributes = 1 }), scope_logs = 2 }`.
fn scan_resource_logs(bytes: &[u8], totals: &mut Totals) -> Result<(), &'static str> {
    // What is copied into each of its records: the first of each copied key (as
    // conversion looks them up), its key too where conversion keeps it.
    let mut seen: Vec<&[u8]> = Vec::new();
    let mut per_record = 0_usize;
    for resource in fields(bytes, 1) {
        for pair in fields(resource?, 1) {
            let pair = pair?;
            scan_pair(pair, totals, 0)?;
            let key = fields(pair, 1).last().transpose()?.unwrap_or_default();
            let Some(with_key) = crate::otlp_input::copied_resource_key(key) else {
                continue;
            };
            if !seen.contains(&key) {
                seen.push(key);
                let value = fields(pair, 2).last().transpose()?.map_or(0, <[u8]>::len);
                per_record += value + if with_key { key.len() } else { 0 };
            }
        }
    }
    for scope_logs in fields(bytes, 2) {
        let (records, scope_name) = scan_scope_logs(scope_logs?, totals)?;
        totals.copied = totals
            .copied
            .saturating_add(records.saturating_mul(per_record + scope_name));
    }
    Ok(())
}

/// `ScopeLogs { scope = 1 (InstrumentationScope { name = 1 }), log_records = 2 }`: its
/// records, and its scope's name's length.
fn scan_scope_logs(bytes: &[u8], totals: &mut Totals) -> Result<(usize, usize), &'static str> {
    let mut name = 0;
    for scope in fields(bytes, 1) {
        if let Some(last) = fields(scope?, 1).last() {
            name = last?.len();
        }
    }
    let mut records = 0;
    for record in fields(bytes, 2) {
        records += 1;
        scan_record(record?, totals)?;
    }
    totals.records += records;
    Ok((records, name))
}

/// `LogRecord { body = 5, attributes = 6 }` (its other fields are scalars and bytes).
fn scan_record(bytes: &[u8], totals: &mut Totals) -> Result<(), &'static str> {
    let mut fields = Fields(bytes);
    while let Some((number, value)) = fields.next_field()? {
        match (number, value) {
            (5, Some(body)) => scan_value(body, totals, 0)?,
            (6, Some(pair)) => scan_pair(pair, totals, 0)?,
            _ => {}
        }
    }
    Ok(())
}

/// `KeyValue { key = 1, value = 2 }`.
fn scan_pair(bytes: &[u8], totals: &mut Totals, depth: usize) -> Result<(), &'static str> {
    totals.values = totals.values.saturating_add(1);
    let mut fields = Fields(bytes);
    while let Some((number, value)) = fields.next_field()? {
        if let (2, Some(value)) = (number, value) {
            scan_value(value, totals, depth + 1)?;
        }
    }
    Ok(())
}

/// `AnyValue { array_value = 5 (ArrayValue { values = 1 }), kvlist_value = 6
/// (KeyValueList { values = 1 }) }`; its other kinds are scalars, strings and bytes.
fn scan_value(bytes: &[u8], totals: &mut Totals, depth: usize) -> Result<(), &'static str> {
    if depth > MAX_NESTING {
        return Err("values are nested too deep");
    }
    totals.values = totals.values.saturating_add(1);
    let mut fields = Fields(bytes);
    while let Some((number, value)) = fields.next_field()? {
        let (5 | 6, Some(list)) = (number, value) else {
            continue;
        };
        let mut items = Fields(list);
        while let Some((item_number, item)) = items.next_field()? {
            match (number, item_number, item) {
                (5, 1, Some(value)) => scan_value(value, totals, depth + 1)?,
                (6, 1, Some(pair)) => scan_pair(pair, totals, depth + 1)?,
                _ => {}
            }
        }
    }
    Ok(())
}

/// The OTLP logs service: `Export` through its own codec (`ExportCodec`), every other path
/// UNIMPLEMENTED (what an exporter drops rather than retries).
#[derive(Debug, Clone)]
pub struct LogsServer {
    input: Arc<OtlpInput>,
    max_decoding_message_size: usize,
}

impl LogsServer {
    /// `input`'s service, taking exports of up to `max_decoding_message_size` bytes (after
    /// decompression: gzip, zstd and deflate, as the Collector and the SDKs may send).
    pub fn new(input: OtlpInput, max_decoding_message_size: usize) -> Self {
        Self {
            input: Arc::new(input),
            max_decoding_message_size,
        }
    }
}

impl tonic::server::NamedService for LogsServer {
    const NAME: &'static str = SERVICE;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl tower::Service<http::Request<tonic::body::Body>> for LogsServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() != EXPORT {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let (input, limit) = (self.input.clone(), self.max_decoding_message_size);
        Box::pin(async move {
            let mut accept = EnabledCompressionEncodings::default();
            for encoding in [
                CompressionEncoding::Gzip,
                CompressionEncoding::Zstd,
                CompressionEncoding::Deflate,
            ] {
                accept.enable(encoding);
            }
            let mut grpc = tonic::server::Grpc::new(ExportCodec)
                .apply_compression_config(accept, EnabledCompressionEncodings::default())
                .apply_max_message_size_config(Some(limit), None);
            Ok(grpc.unary(ExportMethod(input), request).await)
        })
    }
}

/// The handler, as tonic's unary call wants it.
struct ExportMethod(Arc<OtlpInput>);

impl tonic::server::UnaryService<Export> for ExportMethod {
    type Response = ExportLogsServiceResponse;
    type Future = BoxFuture<Result<tonic::Response<ExportLogsServiceResponse>, Status>>;

    fn call(&mut self, request: tonic::Request<Export>) -> Self::Future {
        let input = self.0.clone();
        Box::pin(async move { input.export(request).await })
    }
}

/// Answers encoded by prost; requests walked ([`Export::scan`]), not decoded.
#[derive(Debug, Clone, Copy, Default)]
struct ExportCodec;

impl tonic::codec::Codec for ExportCodec {
    type Encode = ExportLogsServiceResponse;
    type Decode = Export;
    type Encoder = tonic_prost::ProstEncoder<ExportLogsServiceResponse>;
    type Decoder = ExportDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ExportDecoder
    }
}

#[derive(Debug)]
struct ExportDecoder;

impl tonic::codec::Decoder for ExportDecoder {
    type Item = Export;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Export>, Status> {
        // The message's bytes as tonic holds them (split off its buffer, not copied).
        let bytes = src.copy_to_bytes(src.remaining());
        Export::scan(bytes).map(Some).map_err(not_an_export)
    }
}

/// INVALID_ARGUMENT for bytes that are not an `ExportLogsServiceRequest` (prost's own
/// decoding error would be INTERNAL, as tonic maps it).
pub fn not_an_export(why: impl std::fmt::Display) -> Status {
    mall_grpc::ServiceError::InvalidArgument(vec![mall_grpc::FieldViolation {
        field: "resource_logs".to_owned(),
        description: format!("not an OTLP ExportLogsServiceRequest: {why}"),
    }])
    .into()
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::{
        common::v1::{AnyValue, ArrayValue, InstrumentationScope, KeyValue, any_value},
        logs::v1::{LogRecord, ResourceLogs, ScopeLogs},
        resource::v1::Resource,
    };

    use super::*;

    fn text(value: &str) -> Option<AnyValue> {
        Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        })
    }

    fn pair(key: &str, value: Option<AnyValue>) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value,
            ..KeyValue::default()
        }
    }

    fn request(
        resource: Vec<KeyValue>,
        scope: &str,
        records: Vec<LogRecord>,
    ) -> ExportLogsServiceRequest {
        ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(Resource {
                    attributes: resource,
                    ..Resource::default()
                }),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: scope.to_owned(),
                        ..InstrumentationScope::default()
                    }),
                    log_records: records,
                    ..ScopeLogs::default()
                }],
                ..ResourceLogs::default()
            }],
        }
    }

    #[test]
    fn a_scan_counts_records_and_values_as_decoding_finds_them() {
        let nested = AnyValue {
            value: Some(any_value::Value::ArrayValue(ArrayValue {
                values: vec![text("a"), text("b")].into_iter().flatten().collect(),
            })),
        };
        let records = vec![
            LogRecord {
                body: text("one"),
                attributes: vec![pair("a", text("x")), pair("list", Some(nested))],
                ..LogRecord::default()
            },
            LogRecord::default(),
        ];
        let resource = vec![pair("service.name", text("shop"))];
        let export = Export::of(&request(resource, "cart", records.clone()));
        assert_eq!(export.records(), 2);
        let decoded = ExportLogsServiceRequest::decode(export.bytes()).expect("decodes");
        assert_eq!(decoded.resource_logs[0].scope_logs[0].log_records, records);
        // The body (1); attribute `a` and its value (2); `list`, its array and the array's
        // two values (4).
        assert_eq!(values_in_record(&records[0].encode_to_vec()), Ok(7));
        assert_eq!(values_in_record(&records[1].encode_to_vec()), Ok(0));
    }

    #[test]
    fn bytes_that_are_no_export_are_refused_with_why() {
        for (bytes, why) in [
            (&[0x0a, 0x05, 0x01][..], "a length past the end"),
            (&[0x0a, 0x80][..], "a malformed varint"),
            (&[0x00][..], "a field numbered 0"),
            (&[0x0b][..], "a group or an unknown wire type"),
        ] {
            assert_eq!(
                Export::scan(Bytes::copy_from_slice(bytes)).map(|e| e.records()),
                Err(why),
                "{bytes:02x?}"
            );
        }
        // Nesting past the limit: a value that is an array holding an array, and so on.
        let mut value = AnyValue::default();
        for _ in 0..=MAX_NESTING + 1 {
            value = AnyValue {
                value: Some(any_value::Value::ArrayValue(ArrayValue {
                    values: vec![value],
                })),
            };
        }
        let records = vec![LogRecord {
            body: Some(value),
            ..LogRecord::default()
        }];
        let bytes = request(vec![], "", records).encode_to_vec();
        assert_eq!(
            Export::scan(bytes.into()).map(|e| e.records()),
            Err("values are nested too deep")
        );
    }
}
