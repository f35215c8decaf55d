//! The gRPC handlers of `mall.logs.v1.LogIngestService`: convert, call the domain, map
//! errors (in `mall_grpc::ServiceError`).

use mall_proto::logs::v1::{
    GetPipelineStatsRequest, GetPipelineStatsResponse, ParsedRecord, TailLogsRequest,
    TestParseRequest, TestParseResponse, log_ingest_service_server::LogIngestService,
};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status};

use mall_proto::logs::v1::SourceStats;

use crate::{
    metrics::{DROP_REASONS, LogMetrics, SOURCES},
    parsing::Parsing,
    record::Record,
    tail::{TailStream, Tails},
};

/// The service's handlers.
#[derive(Debug, Clone)]
pub struct LogsApi {
    /// TestParse.
    pub parsing: Parsing,
    /// TestParse calls parsing now, at most `parsing.test_parses_at_once` (it is a tool for
    /// people, and callers the mesh lets in must not take the memory and cores ingestion
    /// needs).
    pub parsing_now: Arc<Semaphore>,
    /// The pipeline's counters.
    pub metrics: LogMetrics,
    /// When this replica started (the counters' start).
    pub started: chrono::DateTime<chrono::Utc>,
    /// TailLogs.
    pub tails: Tails,
}

#[tonic::async_trait]
impl LogIngestService for LogsApi {
    async fn get_pipeline_stats(
        &self,
        _request: Request<GetPipelineStatsRequest>,
    ) -> Result<Response<GetPipelineStatsResponse>, Status> {
        let m = &self.metrics;
        let count = |c: u64| i64::try_from(c).unwrap_or(i64::MAX);
        let sources = SOURCES
            .iter()
            .map(|source| SourceStats {
                source: (*source).to_owned(),
                received_records: count(m.received.with_label_values(&[source]).get()),
                parse_errors: count(m.parse_errors.with_label_values(&[source]).get()),
                dropped_records: count(
                    DROP_REASONS
                        .iter()
                        .map(|reason| m.dropped.with_label_values(&[source, reason]).get())
                        .sum(),
                ),
                // Only OTLP refuses single records (`partial_success`).
                rejected_records: if *source == "otlp" {
                    count(m.otlp.with_label_values(&["rejected"]).get())
                } else {
                    0
                },
            })
            .collect();
        let last = m.last_push.get();
        Ok(Response::new(GetPipelineStatsResponse {
            sources,
            loki_pushed_records: count(m.pushed.get()),
            loki_failed_pushes: count(m.pushes.with_label_values(&["failed"]).get()),
            buffered_records: m.waiting.get(),
            last_push_time: (last > 0).then_some(prost_types::Timestamp {
                seconds: last,
                nanos: 0,
            }),
            stats_start_time: Some(timestamp(self.started.timestamp_micros())),
            buffer_bytes: m.buffer_bytes.get(),
        }))
    }

    async fn test_parse(
        &self,
        request: Request<TestParseRequest>,
    ) -> Result<Response<TestParseResponse>, Status> {
        let slot = self.test_parse_slot()?;
        self.test_parse_in(slot, request).await
    }

    type TailLogsStream = TailStream;

    async fn tail_logs(
        &self,
        request: Request<TailLogsRequest>,
    ) -> Result<Response<Self::TailLogsStream>, Status> {
        Ok(Response::new(self.tails.open(request.into_inner())?))
    }
}

impl LogsApi {
    /// A slot to run TestParse in, taken before its request is read (the server's route,
    /// [`crate::api_wire`], takes it before decoding: a call told to wait holds nothing);
    /// RESOURCE_EXHAUSTED with RetryInfo when as many as it takes run already (the callers'
    /// load, not the server's fault: no server-error alert counts it).
    ///
    /// # Errors
    /// As said.
    pub fn test_parse_slot(&self) -> Result<OwnedSemaphorePermit, Status> {
        self.parsing_now.clone().try_acquire_owned().map_err(|_| {
            mall_grpc::ServiceError::Throttled {
                reason: "TEST_PARSES_AT_ONCE",
                message: "log-ingest is running as many TestParse calls as it runs at once \
                          (parsing.test_parses_at_once)"
                    .to_owned(),
                retry_after: std::time::Duration::from_secs(1),
            }
            .into()
        })
    }

    /// TestParse in `slot` (from [`Self::test_parse_slot`], held until it is done).
    ///
    /// # Errors
    /// INVALID_ARGUMENT for a bad request (see the contract).
    pub async fn test_parse_in(
        &self,
        slot: OwnedSemaphorePermit,
        request: Request<TestParseRequest>,
    ) -> Result<Response<TestParseResponse>, Status> {
        let request = request.into_inner();
        // Up to 16 MiB of parsing and masking: off the async workers.
        let parsing = self.parsing.clone();
        let (records, slot) = tokio::task::spawn_blocking(move || {
            (parsing.test(&request.parser, &request.lines), slot)
        })
        .await
        .map_err(|_| {
            // Not the panic's message: it may quote the request's lines, which can
            // hold personal data.
            mall_grpc::ServiceError::Internal(anyhow::anyhow!("TestParse panicked"))
        })?;
        let response = TestParseResponse {
            records: records?.into_iter().map(|r| parsed(r, "")).collect(),
        };
        drop(slot);
        Ok(Response::new(response))
    }
}

fn timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1_000).unwrap_or_default(),
    }
}

/// The contract's record of `record`, emitted by `service`.
pub fn parsed(record: Record, service: &str) -> ParsedRecord {
    ParsedRecord {
        time: record.time_micros.map(timestamp),
        level: record
            .level
            .map(|l| l.as_str().to_owned())
            .unwrap_or_default(),
        logger: record.logger,
        thread: record.thread,
        message: record.message,
        stack_trace: record.stack_trace,
        fields: {
            let mut fields = record.fields;
            if record.truncated_bytes > 0 {
                // The record reached its cap (parsing.max_record_*): say what is missing.
                fields.insert(
                    "truncated_bytes".to_owned(),
                    record.truncated_bytes.to_string(),
                );
            }
            fields
        },
        trace_id: record.trace_id,
        first_line: i32::try_from(record.first_line).unwrap_or(i32::MAX),
        line_count: i32::try_from(record.line_count).unwrap_or(i32::MAX),
        service: service.to_owned(),
        parse_error: record.parse_error,
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::StatusExt as _;

    use super::*;
    use crate::{
        config::{MaskingSettings, ParsingSettings},
        tail::TailSettings,
    };

    /// `parsing.test_parses_at_once` here.
    const AT_ONCE: usize = 2;

    fn api() -> LogsApi {
        let metrics = LogMetrics::unregistered(&[]);
        LogsApi {
            parsing: Parsing::new(&ParsingSettings::default(), &MaskingSettings::default())
                .expect("the default parsing"),
            parsing_now: Arc::new(Semaphore::new(AT_ONCE)),
            metrics: metrics.clone(),
            started: chrono::Utc::now(),
            tails: Tails::new(
                TailSettings::default(),
                metrics,
                tokio_util::sync::CancellationToken::new(),
            ),
        }
    }

    fn request() -> Request<TestParseRequest> {
        Request::new(TestParseRequest {
            parser: String::new(),
            lines: vec!["2024-10-28 17:12:00,040 INFO [main] [Boot] up".to_owned()],
        })
    }

    /// The server's route answers a call past the limit before it reads the request: a call told to wait
    /// holds none of its bytes (its body here never ends).
    #[tokio::test]
    async fn the_servers_route_answers_busy_before_reading_the_request() {
        use std::{
            pin::Pin,
            task::{Context, Poll},
        };
        use tower::Service as _;

        struct Endless;
        impl http_body::Body for Endless {
            type Data = bytes::Bytes;
            type Error = std::convert::Infallible;
            fn poll_frame(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
                Poll::Pending
            }
        }

        let api = api();
        let _running = api
            .parsing_now
            .clone()
            .try_acquire_many_owned(u32::try_from(AT_ONCE).expect("small"))
            .expect("free");
        let mut server = crate::api_wire::ContractServer::new(api, 1 << 20);
        let request = http::Request::builder()
            .method("POST")
            .uri("http://log-ingest/mall.logs.v1.LogIngestService/TestParse")
            .header("content-type", "application/grpc")
            .body(tonic::body::Body::new(Endless))
            .expect("a request");
        let response =
            tokio::time::timeout(std::time::Duration::from_secs(5), server.call(request))
                .await
                .expect("answered without reading the body")
                .expect("infallible");
        let status = tonic::Status::from_header_map(response.headers()).expect("a status");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert_eq!(
            status
                .get_error_details()
                .error_info()
                .map(|e| e.reason.as_str()),
            Some("TEST_PARSES_AT_ONCE")
        );
    }

    /// As many TestParse calls as run at once take every slot: one more is answered
    /// RESOURCE_EXHAUSTED with RetryInfo at once, and goes through once a slot is free.
    #[tokio::test]
    async fn a_test_parse_past_those_running_at_once_is_told_to_retry() {
        let api = api();
        let running = api
            .parsing_now
            .clone()
            .try_acquire_many_owned(u32::try_from(AT_ONCE).expect("small"))
            .expect("free");
        let status = api.test_parse(request()).await.expect_err("busy");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        let details = status.get_error_details();
        assert_eq!(
            details.retry_info().and_then(|r| r.retry_delay),
            Some(std::time::Duration::from_secs(1))
        );
        assert_eq!(
            details.error_info().map(|e| e.reason.as_str()),
            Some("TEST_PARSES_AT_ONCE")
        );
        drop(running);
        let records = api
            .test_parse(request())
            .await
            .expect("parsed")
            .into_inner();
        assert_eq!(records.records.len(), 1);
        assert_eq!(
            api.parsing_now.available_permits(),
            AT_ONCE,
            "its slot given back"
        );
    }
}
