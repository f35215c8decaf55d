//! The gRPC handlers of `mall.logs.v1.LogIngestService`: convert, call the domain, map
//! errors (in `mall_grpc::ServiceError`).

use mall_proto::logs::v1::{
    GetPipelineStatsRequest, GetPipelineStatsResponse, ParsedRecord, TailLogsRequest,
    TestParseRequest, TestParseResponse, log_ingest_service_server::LogIngestService,
};
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
        let request = request.into_inner();
        // Up to 16 MiB of parsing and masking: off the async workers.
        let parsing = self.parsing.clone();
        let records =
            tokio::task::spawn_blocking(move || parsing.test(&request.parser, &request.lines))
                .await
                .map_err(|_| {
                    // Not the panic's message: it may quote the request's lines, which can
                    // hold personal data.
                    mall_grpc::ServiceError::Internal(anyhow::anyhow!("TestParse panicked"))
                })??;
        Ok(Response::new(TestParseResponse {
            records: records.into_iter().map(|r| parsed(r, "")).collect(),
        }))
    }

    type TailLogsStream = TailStream;

    async fn tail_logs(
        &self,
        request: Request<TailLogsRequest>,
    ) -> Result<Response<Self::TailLogsStream>, Status> {
        Ok(Response::new(self.tails.open(request.into_inner())?))
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
    }
}
