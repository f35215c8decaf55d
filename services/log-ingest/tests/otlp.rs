//! OTLP logs over gRPC: opentelemetry-otlp's log exporter (a client written by others,
//! gzip on) → log-ingest → the Loki-compatible receiver, every entry compared whole;
//! `partial_success` for malformed records; UNAVAILABLE with RetryInfo while the buffer is
//! full, and every record stored before or after it in Loki once Loki is back.

use std::time::{Duration, SystemTime};

use log_ingest::loki_receiver::LokiReceiver;
use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry_otlp::{WithExportConfig as _, WithTonicConfig as _};
use opentelemetry_proto::tonic::{
    collector::logs::v1::{ExportLogsServiceRequest, logs_service_client::LogsServiceClient},
    common::v1::{AnyValue as ProtoValue, KeyValue, any_value},
    logs::v1::{LogRecord, ResourceLogs, ScopeLogs},
    resource::v1::Resource,
};

mod corpus;

use corpus::start_with;

async fn wait_for(loki: &LokiReceiver, count: usize) {
    mall_test_support::wait_until("Loki has every record", Duration::from_secs(30), || async {
        (loki.received().len() >= count).then_some(())
    })
    .await;
}

fn label<'a>(labels: &'a [(String, String)], name: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn metadata(entry: &log_ingest::loki::Entry) -> Vec<(&str, &str)> {
    entry
        .structured_metadata
        .iter()
        .map(|p| (p.name.as_str(), p.value.as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_from_opentelemetry_otlps_exporter_reach_loki_whole_and_masked() {
    let app = start_with(|s| {
        // This service sends raw log4j lines as bodies: parsed, the OTLP fields fill in.
        s.pipeline
            .parsers
            .insert("hybris-otlp".to_owned(), "log4j".to_owned());
    })
    .await;
    let endpoint = format!("http://{}", app.grpc);
    let provider = |service: &str, compression| {
        let exporter = opentelemetry_otlp::LogExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_compression(compression)
            .with_timeout(Duration::from_secs(10))
            .build()
            .expect("an exporter");
        opentelemetry_sdk::logs::SdkLoggerProvider::builder()
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service.to_owned())
                    .with_attribute(opentelemetry::KeyValue::new("host.name", "web-1"))
                    .build(),
            )
            .with_batch_exporter(exporter)
            .build()
    };
    // The two encodings exporters use most (the Collector's default, and zstd).
    let (storefront, hybris) = (
        provider("storefront", opentelemetry_otlp::Compression::Gzip),
        provider("hybris-otlp", opentelemetry_otlp::Compression::Zstd),
    );
    let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_730_103_120_040_123);
    let trace = opentelemetry::TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("hex");
    let span = opentelemetry::SpanId::from_hex("00f067aa0ba902b7").expect("hex");

    let logger = storefront.logger("com.mall.cart.CartService");
    let mut record = logger.create_log_record();
    record.set_timestamp(at);
    record.set_severity_number(Severity::Error);
    record.set_severity_text("ERROR");
    record.set_body(AnyValue::from("checkout failed for kim@example.com"));
    record.add_attribute("thread.name", "hybrisHTTP12");
    record.add_attribute("cart", 8812_i64);
    record.add_attribute("customer.email", "kim@example.com");
    record.set_trace_context(trace, span, None);
    logger.emit(record);

    let logger = hybris.logger("wrapper");
    let mut record = logger.create_log_record();
    record.set_timestamp(at);
    record.set_severity_number(Severity::Info);
    record.set_body(AnyValue::from(
        "2024-10-28 17:12:00,040 WARN  [hybrisHTTP3] [StockService] low stock\n\
         java.lang.IllegalStateException: none left\n\tat com.mall.Stock.take(Stock.java:42)",
    ));
    record.set_trace_context(trace, span, None);
    logger.emit(record);

    // The SDK's batch processor blocks its caller while it exports.
    tokio::task::spawn_blocking(move || {
        storefront.force_flush().expect("storefront's export");
        hybris.force_flush().expect("hybris' export");
    })
    .await
    .expect("flushed");
    wait_for(&app.loki, 2).await;
    let mut received = app.loki.received();
    received.sort_by_key(|r| label(&r.labels, "service").map(str::to_owned));
    assert_eq!(received.len(), 2, "{received:?}");

    let hybris = &received[0];
    assert_eq!(
        hybris.labels,
        [
            ("service", "hybris-otlp"),
            ("level", "WARN"),
            ("host", "web-1"),
            ("environment", "test")
        ]
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
    );
    assert_eq!(
        hybris.entry.line,
        "low stock\njava.lang.IllegalStateException: none left\n\tat com.mall.Stock.take(Stock.java:42)"
    );
    assert_eq!(
        metadata(&hybris.entry),
        [
            ("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736"),
            ("logger", "StockService"),
            ("thread", "hybrisHTTP3"),
            // OTLP attributes and the span id, as fields.
            ("span_id", "00f067aa0ba902b7")
        ]
    );
    // Its own time (17:12:00,040 in Asia/Seoul is 08:12:00.040 UTC), not the OTLP
    // record's (which is 123 µs later).
    let time = hybris.entry.timestamp.expect("a time");
    assert_eq!(
        (time.seconds, time.nanos / 1_000_000),
        (1_730_103_120, 40),
        "below the ms: a tie-breaker"
    );

    let store = &received[1];
    assert_eq!(
        store.labels,
        [
            ("service", "storefront"),
            ("level", "ERROR"),
            ("host", "web-1"),
            ("environment", "test")
        ]
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
    );
    assert_eq!(store.entry.line, "checkout failed for <email>");
    assert_eq!(
        metadata(&store.entry),
        [
            ("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736"),
            ("logger", "com.mall.cart.CartService"),
            ("thread", "hybrisHTTP12"),
            // Attributes as fields, masked like the line, named as label names.
            ("cart", "8812"),
            ("customer_email", "<email>"),
            ("span_id", "00f067aa0ba902b7")
        ]
    );
    let time = store.entry.timestamp.expect("a time");
    assert_eq!((time.seconds, time.nanos / 1_000), (1_730_103_120, 40_123));

    let metrics = reqwest_text(format!("http://{}/metrics", app.admin)).await;
    for line in [
        "mall_log_ingest_otlp_records_total{outcome=\"stored\"} 2",
        "mall_log_ingest_records_received_total{source=\"otlp\"} 2",
        "mall_log_ingest_masked_total{pattern=\"email\"} 2",
        // The derived count links to the record's trace (an OpenMetrics exemplar).
        "mall_log_ingest_log_records_total{level=\"ERROR\",service_name=\"storefront\"} 1 # {trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\"} 1.0",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
}

async fn reqwest_text(url: String) -> String {
    let response = reqwest::get(url).await.expect("metrics answer");
    response.text().await.expect("a body")
}

fn string(s: &str) -> Option<ProtoValue> {
    Some(ProtoValue {
        value: Some(any_value::Value::StringValue(s.to_owned())),
    })
}

fn export(service: &str, records: Vec<LogRecord>) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: vec![KeyValue {
                    key: "service.name".to_owned(),
                    value: string(service),
                    ..KeyValue::default()
                }],
                ..Resource::default()
            }),
            scope_logs: vec![ScopeLogs {
                log_records: records,
                ..ScopeLogs::default()
            }],
            ..ResourceLogs::default()
        }],
    }
}

fn log(body: &str, nanos: u64) -> LogRecord {
    LogRecord {
        time_unix_nano: nanos,
        body: string(body),
        ..LogRecord::default()
    }
}

/// A record OTLP's receiver cannot take: more attributes than log-ingest decodes in one
/// (`otlp_input::MAX_VALUES_PER_RECORD`).
fn malformed(body: &str, nanos: u64) -> LogRecord {
    LogRecord {
        attributes: (0..=log_ingest::otlp_input::MAX_VALUES_PER_RECORD)
            .map(|i| KeyValue {
                key: format!("a{i}"),
                ..KeyValue::default()
            })
            .collect(),
        ..log(body, nanos)
    }
}

async fn client(grpc: std::net::SocketAddr) -> LogsServiceClient<tonic::transport::Channel> {
    LogsServiceClient::connect(format!("http://{grpc}"))
        .await
        .expect("connects")
}

/// A graceful restart while a forward stream has a record in progress reads the buffer
/// again from the batch where that record began; OTLP records stored after it were pushed
/// before the restart and are not pushed again.
#[tokio::test]
async fn otlp_records_are_not_pushed_again_after_a_graceful_restart() {
    let (dir, loki) = corpus::dir_and_loki().await;
    let settings = |flush_after| corpus::restart_settings(dir.path(), loki.url(), flush_after);
    let p = "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | ";
    let trace = [
        format!("{p}ERROR [main] [Cart] failed"),
        format!("{p}java.lang.IllegalStateException: no cart"),
        format!("{p}\tat a.B.c(B.java:1)"),
        format!("{p}\tat a.B.d(B.java:2)"),
        format!("{p}INFO  [main] [Cart] next"),
    ];
    let trace: Vec<&str> = trace.iter().map(String::as_str).collect();

    let first = corpus::start_app(settings(Duration::from_secs(600))).await;
    // The trace begins (in progress: quiet never completes it here) …
    corpus::send_as(first.forward, "hybris-1", &trace[..2], 10).await;
    // … then OTLP records are stored and pushed.
    let records = (0..3)
        .map(|i| log(&format!("otlp {i}"), 1_730_103_120_000_000_000 + i))
        .collect();
    client(first.grpc)
        .await
        .export(export("storefront", records))
        .await
        .expect("stored");
    corpus::wait_pushed(first.admin, 3).await;
    first.shutdown.cancel();
    first
        .running
        .await
        .expect("joins")
        .expect("shuts down cleanly");

    let second = corpus::start_app(settings(Duration::from_millis(300))).await;
    corpus::send_as(second.forward, "hybris-1", &trace[2..], 10).await;
    // The three OTLP records, the whole trace, and the record after it.
    wait_for(&loki, 5).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(loki.counts().2, 0, "nothing pushed twice");
    let lines: Vec<String> = loki.received().into_iter().map(|r| r.entry.line).collect();
    assert_eq!(lines.len(), 5, "{lines:?}");
    assert!(
        lines.contains(&"failed\njava.lang.IllegalStateException: no cart\n\tat a.B.c(B.java:1)\n\tat a.B.d(B.java:2)".to_owned()),
        "{lines:?}"
    );
    second.shutdown.cancel();
    second
        .running
        .await
        .expect("joins")
        .expect("shuts down cleanly");
}

#[tokio::test]
async fn malformed_records_are_rejected_in_partial_success_and_the_rest_stored() {
    let app = start_with(|_| {}).await;
    let mut client = client(app.grpc).await;
    // An id of another length than OTLP's is invalid: "not associated with a trace", its
    // record kept without it, with a warning.
    let odd_span = LogRecord {
        span_id: vec![7; 3],
        ..log("odd span", 3)
    };
    let answer = client
        .export(export(
            "storefront",
            vec![log("good", 2), malformed("bad", 1), odd_span],
        ))
        .await
        .expect("answered")
        .into_inner();
    let partial = answer.partial_success.expect("a partial success");
    assert_eq!(partial.rejected_log_records, 1);
    assert_eq!(
        partial.error_message,
        "resource_logs[0].scope_logs[0].log_records[1]: holds 10002 attributes and values, \
         more than 10000; resource_logs[0].scope_logs[0].log_records[2]: span_id has 3 \
         bytes, not 8: kept without it"
    );
    wait_for(&app.loki, 2).await;
    let received = app.loki.received();
    assert_eq!(
        received
            .iter()
            .map(|r| r.entry.line.as_str())
            .collect::<Vec<_>>(),
        ["good", "odd span"]
    );
    let kept = metadata(&received[1].entry);
    assert!(kept.is_empty(), "no span id: {kept:?}");
    assert_eq!(label(&received[0].labels, "level"), Some("unknown"));

    // A whole export that is fine has no partial success at all.
    let answer = client
        .export(export("storefront", vec![log("fine", 3)]))
        .await
        .expect("answered")
        .into_inner();
    assert_eq!(answer.partial_success, None);
    // GetPipelineStats counts the record refused, apart from those stored (and from
    // Loki's drops).
    let stats = corpus::stats(app.grpc).await;
    let otlp = corpus::source(&stats, "otlp");
    assert_eq!(
        (
            otlp.received_records,
            otlp.rejected_records,
            otlp.dropped_records
        ),
        (3, 1, 0),
        "{stats:?}"
    );
    assert_eq!(corpus::source(&stats, "forward").rejected_records, 0);
}

#[tokio::test]
async fn a_full_buffer_answers_unavailable_with_retry_info_and_loses_nothing_stored() {
    let app = start_with(|s| {
        s.forward.max_message_bytes = 64 * 1024;
        // A segment holds the largest record a call can carry.
        s.server.max_message_bytes = 1 << 20;
        s.buffer.segment_bytes = 2 << 20;
        s.buffer.max_bytes = 2 << 20;
    })
    .await;
    // Loki refuses (503) until told otherwise: nothing leaves the buffer.
    app.loki.fail(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(600),
    );
    let mut client = client(app.grpc).await;
    let body = "x".repeat(100 * 1024);
    let mut stored = Vec::new();
    let mut refused = None;
    for i in 0..40_u64 {
        let line = format!("{i} {body}");
        match client
            .export(export("storefront", vec![log(&line, 1_000 + i)]))
            .await
        {
            Ok(_) => stored.push(line),
            Err(status) => {
                refused = Some((i, status));
                break;
            }
        }
    }
    let (i, status) = refused.expect("the buffer filled up");
    assert!(!stored.is_empty(), "some stored before it filled");
    assert_retry_later(&status, "BUFFER_FULL");

    // Refused again, now with a malformed record beside it, and one whose trace id has 15
    // bytes (kept without it): the rejection and the id are counted once, when the export
    // is taken, however often it was refused before.
    let line = format!("{i} {body}");
    let odd_id = format!("{} with a trace id of 15 bytes", 100 + i);
    let with_bad = || {
        let odd = LogRecord {
            trace_id: vec![7; 15],
            ..log(&odd_id, 2_000)
        };
        export(
            "storefront",
            vec![log(&line, 1_000 + i), malformed("bad", 1), odd],
        )
    };
    for _ in 0..3 {
        let status = client.export(with_bad()).await.expect_err("still full");
        assert_retry_later(&status, "BUFFER_FULL");
    }

    // Loki back: the buffer drains, the refused export is taken when sent again.
    app.loki
        .fail(axum::http::StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO);
    let answer =
        mall_test_support::wait_until("the export is taken", Duration::from_secs(30), || {
            let mut client = client.clone();
            let request = with_bad();
            async move { client.export(request).await.ok() }
        })
        .await
        .into_inner();
    assert_eq!(
        answer.partial_success.map(|p| p.rejected_log_records),
        Some(1)
    );
    let metrics = reqwest_text(format!("http://{}/metrics", app.admin)).await;
    let rejected = "mall_log_ingest_otlp_records_total{outcome=\"rejected\"} 1\n";
    assert!(metrics.contains(rejected), "{rejected} in\n{metrics}");
    let removed = "mall_log_ingest_otlp_ids_removed_total 1\n";
    assert!(metrics.contains(removed), "{removed} in\n{metrics}");
    stored.push(line);
    stored.push(odd_id);
    wait_for(&app.loki, stored.len()).await;
    let mut lines: Vec<String> = app
        .loki
        .received()
        .into_iter()
        .map(|r| r.entry.line)
        .collect();
    lines.sort_by_key(|l| l.split(' ').next().and_then(|n| n.parse::<u64>().ok()));
    assert_eq!(lines, stored, "every stored record once, none other");
}

/// The OTLP input on its own, as the tests that call its handler directly use it.
struct Alone {
    input: log_ingest::otlp_input::OtlpInput,
    buffer: log_ingest::buffer::Buffer,
    start: log_ingest::buffer::Position,
    budget: std::sync::Arc<tokio::sync::Semaphore>,
}

/// The OTLP input with a buffer in `dir` of `max_bytes` in segments of `segment_bytes`, and
/// a budget of `budget` bytes.
fn alone(dir: &std::path::Path, max_bytes: u64, segment_bytes: u64, budget: usize) -> Alone {
    let (buffer, start) = log_ingest::buffer::Buffer::open(
        dir,
        log_ingest::buffer::Limits {
            max_bytes,
            segment_bytes,
        },
    )
    .expect("opens");
    let budget_semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(budget));
    Alone {
        input: log_ingest::otlp_input::OtlpInput {
            buffer: buffer.clone(),
            recent: log_ingest::recent::Recent::default(),
            metrics: log_ingest::metrics::LogMetrics::unregistered(&[]),
            budget: budget_semaphore.clone(),
            budget_bytes: budget,
        },
        buffer,
        start,
        budget: budget_semaphore,
    }
}

/// Exports being converted and stored at once stay within `otlp.max_bytes_in_flight` (an
/// export takes its bytes and room for a few batches, at most the whole budget): one that
/// would pass it waits for room (up to a second, holding nothing), then is answered
/// UNAVAILABLE with RetryInfo, nothing taken, and goes through when sent again with room.
#[tokio::test]
async fn an_export_past_the_bytes_in_flight_is_refused_for_a_retry() {
    use log_ingest::otlp_wire::Export;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let Alone {
        input,
        buffer,
        start,
        budget,
    } = alone(dir.path(), 64 << 20, 8 << 20, 1 << 20);
    let request = || {
        tonic::Request::new(Export::of(&export(
            "storefront",
            vec![log("one", 1_000), log("two", 2_000)],
        )))
    };
    // Other exports hold all but a few bytes of it.
    let held = budget
        .clone()
        .try_acquire_many_owned((1 << 20) - 8)
        .expect("free");
    let started = std::time::Instant::now();
    let status = input.export(request()).await.expect_err("refused");
    assert_retry_later(&status, "BUSY");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "refused after waiting a second for room, not at once: {:?}",
        started.elapsed()
    );
    assert!(
        buffer.reader(start).try_next().expect("reads").is_none(),
        "nothing stored"
    );
    // Room made while it waits: it goes through.
    let (stored, ()) = tokio::join!(input.export(request()), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(held);
    });
    stored.expect("stored once room was made within the second");
    assert!(buffer.reader(start).try_next().expect("reads").is_some());
    assert_eq!(budget.available_permits(), 1 << 20, "given back");
}

/// Batches are cut to fit the buffer's segments, however small they are configured: an
/// export that converts to more than a segment (here the resource's fields, copied into
/// each of its records) is stored in several batches, not refused as too large.
#[tokio::test]
async fn an_export_larger_than_a_segment_once_converted_is_stored_in_pieces() {
    use log_ingest::otlp_wire::Export;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let segment_bytes = 2 << 20;
    let Alone {
        input,
        buffer,
        start,
        ..
    } = alone(dir.path(), 64 << 20, segment_bytes, 64 << 20);
    let mut request = export(
        "storefront",
        (0..8_000_u64).map(|n| log(&n.to_string(), n + 1)).collect(),
    );
    let resource = request.resource_logs[0]
        .resource
        .as_mut()
        .expect("a resource");
    for key in ["k8s.pod.name", "service.instance.id"] {
        resource.attributes.push(KeyValue {
            key: key.to_owned(),
            value: string(&"p".repeat(300)),
            ..KeyValue::default()
        });
    }
    assert!(
        prost::Message::encoded_len(&request) < 1 << 20,
        "a small export"
    );
    let answer = input
        .export(tonic::Request::new(Export::of(&request)))
        .await
        .expect("stored")
        .into_inner();
    assert!(answer.partial_success.is_none(), "{answer:?}");
    let mut reader = buffer.reader(start);
    let (mut batches, mut records) = (0, 0);
    while let Some((bytes, _)) = reader.try_next().expect("reads") {
        assert!(bytes.len() as u64 <= segment_bytes, "{} bytes", bytes.len());
        batches += 1;
        records += log_ingest::batch::Batch::decode(&bytes)
            .expect("a batch")
            .events
            .len();
    }
    assert_eq!(records, 8_000);
    assert!(
        batches >= 3,
        "{batches} batches of about 2 MiB for about 5 MB"
    );
}

/// A buffer that fills in the middle of an export: the export is answered UNAVAILABLE
/// (`BUFFER_FULL`) with what was stored kept and the budget given back; sent again once
/// there is room, its stored batches are recognised and the rest stored: every record once,
/// in order.
#[tokio::test]
async fn an_export_the_buffer_fills_in_the_middle_of_goes_in_whole_when_sent_again() {
    use log_ingest::otlp_wire::Export;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let Alone {
        input,
        buffer,
        start,
        budget,
    } = alone(dir.path(), 8 << 20, 4 << 20, 64 << 20);
    // 12 records of 900 KB: batches of four (under a 4 MiB segment), three in all; the
    // buffer holds two.
    let body = "z".repeat(900_000);
    let request = Export::of(&export(
        "storefront",
        (0..12_u64)
            .map(|n| log(&format!("{n:02} {body}"), 1_000 + n))
            .collect(),
    ));
    let status = input
        .export(tonic::Request::new(request.clone()))
        .await
        .expect_err("the buffer fills");
    assert_retry_later(&status, "BUFFER_FULL");
    assert_eq!(budget.available_permits(), 64 << 20, "given back");
    let mut reader = buffer.reader(start);
    let mut stored = Vec::new();
    let mut read = |stored: &mut Vec<String>| {
        let mut after = None;
        while let Some((bytes, at)) = reader.try_next().expect("reads") {
            let batch = log_ingest::batch::Batch::decode(&bytes).expect("a batch");
            for event in batch.events.iter() {
                let otlp = log_ingest::otlp_input::record(&event.to_event());
                stored.push(otlp.body[..2].to_owned());
            }
            after = Some(at);
        }
        after
    };
    let after = read(&mut stored).expect("some stored");
    assert_eq!(stored.len(), 8, "two batches of four");
    // Room, as the pipeline makes it once Loki has them.
    buffer.acknowledge(after).expect("acknowledges");
    let answer = input
        .export(tonic::Request::new(request))
        .await
        .expect("stored")
        .into_inner();
    assert!(answer.partial_success.is_none(), "{answer:?}");
    read(&mut stored);
    let want: Vec<String> = (0..12).map(|n| format!("{n:02}")).collect();
    assert_eq!(stored, want, "every record once, in order");
    assert_eq!(budget.available_permits(), 64 << 20, "given back");
}

/// `status` asks the exporter to retry in 5 s, for `reason`.
fn assert_retry_later(status: &tonic::Status, reason: &str) {
    use tonic_types::StatusExt as _;
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let details = status.get_error_details();
    assert_eq!(
        details.retry_info().and_then(|r| r.retry_delay),
        Some(Duration::from_secs(5))
    );
    assert_eq!(
        details.error_info().map(|e| e.reason.as_str()),
        Some(reason)
    );
}

/// A request body sent as the test hands it frames, held open in between.
struct Held(tokio::sync::mpsc::Receiver<bytes::Bytes>);

impl http_body::Body for Held {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        self.0
            .poll_recv(cx)
            .map(|data| data.map(|data| Ok(http_body::Frame::data(data))))
    }
}

/// Starts an export whose message header announces 2,000,000 bytes, of which 1.5 MiB are
/// sent; the rest never comes (the call ends when the returned sender is dropped).
async fn hold(
    channel: &tonic::transport::Channel,
    grpc: std::net::SocketAddr,
) -> (
    tokio::sync::mpsc::Sender<bytes::Bytes>,
    tokio::task::JoinHandle<Result<http::Response<tonic::body::Body>, tonic::transport::Error>>,
) {
    use tower::ServiceExt as _;
    let (send, frames) = tokio::sync::mpsc::channel(2);
    let mut head = vec![0_u8];
    head.extend_from_slice(&2_000_000_u32.to_be_bytes());
    send.send(bytes::Bytes::from(head)).await.expect("open");
    send.send(bytes::Bytes::from(vec![0_u8; 3 << 19]))
        .await
        .expect("open");
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{grpc}/opentelemetry.proto.collector.logs.v1.LogsService/Export"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(Held(frames)))
        .expect("a request");
    let held = tokio::spawn(channel.clone().oneshot(request));
    // Room for its bytes to arrive before anything else is sent.
    tokio::time::sleep(Duration::from_millis(100)).await;
    (send, held)
}

/// The `grpc-status` of a raw answer: in its headers for a trailers-only answer, else in
/// its trailers (where an OK answer has it).
async fn grpc_status(answer: http::Response<tonic::body::Body>) -> Option<Vec<u8>> {
    use http_body::Body as _;
    let (parts, mut body) = answer.into_parts();
    if let Some(status) = parts.headers.get("grpc-status") {
        return Some(status.as_bytes().to_vec());
    }
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        let Ok(frame) = frame else { return None };
        if let Ok(trailers) = frame.into_trailers() {
            return trailers.get("grpc-status").map(|s| s.as_bytes().to_vec());
        }
    }
    None
}

/// The bytes of an export still arriving count against `otlp.max_bytes_in_flight` before
/// tonic has it whole: while 1.5 MiB of one export have arrived and its sender holds the
/// rest back, an export of 800 KiB is answered UNAVAILABLE with RetryInfo at once, nothing
/// of it taken; once the held call ends, its bytes are given back and the export goes
/// through. Every record stored reaches Loki once.
#[tokio::test]
async fn bytes_of_exports_still_arriving_count_against_the_budget() {
    let app = start_with(|s| {
        s.server.max_message_bytes = 2 << 20;
        s.otlp.max_bytes_in_flight = 2 << 20;
        s.forward.max_message_bytes = 64 * 1024;
        s.buffer.segment_bytes = 4 << 20;
    })
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.grpc))
        .expect("an address")
        .connect()
        .await
        .expect("connects");
    let mut client = client(app.grpc).await;
    let body = "y".repeat(100 * 1024);
    let records = |n: u64| -> Vec<LogRecord> {
        (0..8)
            .map(|i| log(&format!("{n} {i} {body}"), 1_000 + n * 8 + i))
            .collect()
    };
    let (mut send, mut held) = hold(&channel, app.grpc).await;
    let mut stored = 0_u64;
    let refused = loop {
        assert!(
            stored < 20,
            "no export was refused while 1.5 MiB of another arrived"
        );
        let answer = client.export(export("storefront", records(stored))).await;
        stored += u64::from(answer.is_ok());
        if held.is_finished() {
            // Its bytes and the export's arrived together and the held call was the one
            // refused: hold again.
            (send, held) = hold(&channel, app.grpc).await;
            continue;
        }
        if let Err(status) = answer {
            break status;
        }
    };
    assert_retry_later(&refused, "BUSY");
    // The held call ends short of its message: an error for it, and its bytes given back.
    drop(send);
    let answer = held.await.expect("joins").expect("answered");
    let status = grpc_status(answer).await;
    assert!(
        status.as_deref().is_some_and(|s| s != b"0"),
        "a call whose message never ended is answered with an error, not {status:?}"
    );
    client
        .export(export("storefront", records(stored)))
        .await
        .expect("stored once the held bytes are given back");
    stored += 1;
    let expected = usize::try_from(stored * 8).expect("small");
    wait_for(&app.loki, expected).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        app.loki.received().len(),
        expected,
        "every stored record once"
    );
}

/// An export as large as a call may be goes through when `otlp.max_bytes_in_flight` is
/// exactly `server.max_message_bytes` (the least start-up allows): its body's bytes, with
/// the gRPC message prefix, are not counted past the limit, and what they took is handed to
/// its handler, which needs no more than the whole budget.
#[tokio::test]
async fn an_export_at_the_size_limit_fits_the_least_budget() {
    use prost::Message as _;
    let limit = 2 << 20;
    let app = start_with(|s| {
        s.server.max_message_bytes = limit;
        s.otlp.max_bytes_in_flight = limit;
        s.forward.max_message_bytes = 64 * 1024;
        s.buffer.segment_bytes = 4 << 20;
    })
    .await;
    // A body that makes the export 2 bytes under the limit.
    let mut body_len = limit - 100;
    let request = loop {
        let request = export("storefront", vec![log(&"z".repeat(body_len), 1_000)]);
        let len = request.encoded_len();
        if len == limit - 2 {
            break request;
        }
        body_len = body_len + (limit - 2) - len;
    };
    client(app.grpc)
        .await
        .export(request)
        .await
        .expect("stored: it fits the budget");
}
