//! Wiring: connect dependencies, bind listeners, register services.

use std::{future::Future, net::SocketAddr};
use tokio_util::sync::CancellationToken;

use anyhow::Context as _;

use mall_grpc::GrpcServer;

use crate::{
    SERVICE,
    api::LogsApi,
    buffer::{Buffer, Limits},
    config::Settings,
    forward_input::ForwardInput,
    loki::LokiClient,
    metrics::LogMetrics,
    otlp_input::OtlpInput,
    parsing::Parsing,
    pipeline::Pipeline,
    recent::Recent,
    tail::Tails,
};

/// A built `log-ingest`, listeners bound, ready to run.
#[derive(Debug)]
pub struct App {
    server: GrpcServer,
    forward_addr: SocketAddr,
    /// Cancelled by a task that cannot go on (the buffer cannot write, the pipeline
    /// stopped): the process drains and ends with an error, for Kubernetes to restart it.
    fatal: tokio_util::sync::CancellationToken,
}

impl App {
    /// Connects dependencies, runs migrations and binds the listeners.
    ///
    /// # Errors
    /// When a dependency is unreachable or a listener cannot be bound.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let parsing = Parsing::new(&settings.parsing, &settings.masking)?;
        for (source, name) in &settings.pipeline.parsers {
            anyhow::ensure!(
                parsing.formats.named(name).is_some(),
                "pipeline.parsers.{source:?} names parser {name:?}, which does not exist; \
                 the parsers are {}",
                parsing.formats.names().join(", ")
            );
        }
        anyhow::ensure!(
            settings.pipeline.max_open_streams >= 1,
            "pipeline.max_open_streams must be at least 1"
        );
        ensure_workable(&settings)?;
        let limits = Limits {
            max_bytes: settings.buffer.max_bytes,
            segment_bytes: settings.buffer.segment_bytes,
        };
        anyhow::ensure!(
            limits.segment_bytes >= 1 << 20 && limits.max_bytes >= limits.segment_bytes,
            "buffer.segment_bytes must be at least 1 MiB and buffer.max_bytes at least one segment"
        );
        // A message that could never be stored would be retried by its sender forever.
        let largest = (settings.forward.max_message_bytes as u64).saturating_mul(4) + (1 << 20);
        anyhow::ensure!(
            limits.segment_bytes >= largest,
            "buffer.segment_bytes ({}) must hold the largest batch a forward message can make: \
             4 × forward.max_message_bytes + 1 MiB = {largest}",
            limits.segment_bytes
        );
        // An OTLP export is stored in pieces, but one record as large as a call can be must
        // fit a segment, or the whole export would be refused.
        let largest_call = (settings.server.max_message_bytes as u64) + (1 << 20);
        anyhow::ensure!(
            limits.segment_bytes >= largest_call,
            "buffer.segment_bytes ({}) must hold the largest OTLP record a call can carry: \
             server.max_message_bytes + 1 MiB = {largest_call}",
            limits.segment_bytes
        );
        // A message takes up to `max_message_bytes` of the budget while it arrives; an
        // export its bytes and room for its batches, at most the whole budget.
        let forward = &settings.forward;
        ensure_budget(
            ("forward.max_bytes_in_flight", forward.max_bytes_in_flight),
            ("forward.max_message_bytes", forward.max_message_bytes),
        )?;
        ensure_budget(
            (
                "otlp.max_bytes_in_flight",
                settings.otlp.max_bytes_in_flight,
            ),
            (
                "server.max_message_bytes",
                settings.server.max_message_bytes,
            ),
        )?;
        anyhow::ensure!(
            settings.pipeline.max_pending_bytes >= settings.parsing.max_record_bytes,
            "pipeline.max_pending_bytes ({}) must be at least parsing.max_record_bytes ({}): \
             one record in progress must fit",
            settings.pipeline.max_pending_bytes,
            settings.parsing.max_record_bytes
        );
        anyhow::ensure!(
            !forward.message_timeout.is_zero(),
            "forward.message_timeout must be more than zero"
        );
        let (buffer, start) = Buffer::open(&settings.buffer.dir, limits).with_context(|| {
            format!(
                "cannot open the buffer in {}",
                settings.buffer.dir.display()
            )
        })?;
        let loki = LokiClient::new(
            &settings.loki.url,
            settings.loki.tenant.clone(),
            settings.loki.request_timeout,
            (settings.loki.retry_initial, settings.loki.retry_max),
            settings.loki.ca_file.as_deref(),
        )?;
        let mut server = GrpcServer::bind(SERVICE, &settings.server).await?;
        let patterns: Vec<String> = settings
            .masking
            .patterns
            .iter()
            .map(|p| p.name.clone())
            .collect();
        let metrics = LogMetrics::register(server.registry(), &patterns)?;
        metrics
            .buffer_max_bytes
            .set(i64::try_from(settings.buffer.max_bytes).unwrap_or(i64::MAX));
        buffer.report_used_bytes(metrics.buffer_bytes.clone());
        let recent = Recent::seed(&buffer, start);
        let otlp = OtlpInput {
            buffer: buffer.clone(),
            recent: recent.clone(),
            metrics: metrics.clone(),
            budget: std::sync::Arc::new(tokio::sync::Semaphore::new(
                settings.otlp.max_bytes_in_flight,
            )),
            budget_bytes: settings.otlp.max_bytes_in_flight,
        };
        let forward = ForwardInput::bind(
            settings.forward.clone(),
            settings.server.insecure,
            buffer.clone(),
            recent,
            metrics.clone(),
        )
        .await?;
        let forward_addr = forward.local_addr()?;
        // Before the `serving` line, which names only the gRPC and admin listeners: with port 0
        // configured, this is how a test or an operator learns the port.
        tracing::info!(
            %forward_addr,
            tls = settings.forward.tls.is_some(),
            "forward: listening"
        );
        let shutdown = server.shutdown_token();
        let tails = Tails::new(settings.tail.clone(), metrics.clone(), shutdown.clone());
        let pipeline = Pipeline {
            settings: settings.pipeline.clone(),
            zone: parsing.zone,
            caps: parsing.caps,
            masker: parsing.masker.clone(),
            formats: parsing.formats.clone(),
            buffer,
            loki,
            metrics: metrics.clone(),
            tails: tails.clone(),
            derived: std::sync::Arc::new(std::sync::Mutex::new(
                crate::derive::Deriver::register(server.registry(), settings.derived.clone())
                    .context("cannot register the derived metrics")?,
            )),
            metadata_refused: crate::pipeline::MetadataRefused::default(),
            streams: std::sync::Arc::new(std::sync::Mutex::new(crate::labels::Guard::new(
                settings.pipeline.max_streams,
                &settings.pipeline.environment,
            ))),
        };
        // A buffer that cannot write refuses every append from then on, and only a restart
        // (reopening rescans its last segment) recovers: stop the process rather than serve
        // on, green, refusing every sender.
        let fatal = tokio_util::sync::CancellationToken::new();
        let (watched, stop, failing) = (pipeline.buffer.clone(), shutdown.clone(), fatal.clone());
        server.spawn("buffer watch", async move {
            tokio::select! {
                () = watched.failed() => {
                    failing.cancel();
                    anyhow::bail!("the buffer cannot write to its disk; shutting down so the process restarts and reopens it")
                }
                () = stop.cancelled() => Ok(()),
            }
        });
        // A disk that stalls a write holds every input's answer with no way to time it out:
        // not ready then, so load balancers send new connections to the other replicas
        // (and senders whose acknowledgements stall reconnect there).
        let stalled = pipeline.buffer.clone();
        server.set_readiness(move || {
            let ready = buffer_ready(stalled.write_stalled_for());
            async move { ready }
        });
        let until = shutdown.clone();
        server.spawn("forward input", async move {
            forward.run(until).await;
            Ok(())
        });
        let failing = fatal.clone();
        server.spawn("pipeline to Loki", {
            let until = shutdown.clone();
            supervised(pipeline.run(start, until), shutdown, failing)
        });
        server.add_service(crate::api_wire::ContractServer::new(
            LogsApi {
                parsing,
                parsing_now: std::sync::Arc::new(tokio::sync::Semaphore::new(
                    settings.parsing.test_parses_at_once,
                )),
                metrics: metrics.clone(),
                started: chrono::Utc::now(),
                tails,
            },
            settings.server.max_message_bytes,
        ));
        // Bytes of exports counted as they arrive, from the budget the handler uses.
        let budget = otlp.budget.clone();
        server
            .add_service(crate::otlp_input::Receiving::new(
                crate::otlp_wire::LogsServer::new(otlp, settings.server.max_message_bytes),
                budget,
                settings.server.max_message_bytes,
            ))
            .add_descriptor_set(opentelemetry_proto::DESCRIPTORS);
        Ok(Self {
            server,
            forward_addr,
            fatal,
        })
    }

    /// Where gRPC listens (the real port when configured with port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.server.grpc_addr()
    }

    /// Where the admin-only methods' gRPC listener listens, when `server.admin_grpc_addr` is
    /// set.
    pub fn admin_grpc_addr(&self) -> Option<SocketAddr> {
        self.server.admin_grpc_addr()
    }

    /// Where the forward listener listens.
    pub fn forward_addr(&self) -> SocketAddr {
        self.forward_addr
    }

    /// Where the admin HTTP server listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.server.admin_addr()
    }

    /// Serves until `shutdown` completes, or a task cannot go on, then drains.
    ///
    /// # Errors
    /// When a server fails, or a task stopped the process (the buffer cannot write, the
    /// pipeline stopped: its ERROR line says which), so that it exits with a failure.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let fatal = self.fatal.clone();
        let stopped = self.fatal.clone();
        self.server
            .run_until(async move {
                tokio::select! {
                    () = shutdown => {}
                    () = stopped.cancelled() => {}
                }
            })
            .await?;
        anyhow::ensure!(
            !fatal.is_cancelled(),
            "log-ingest stopped itself after draining (the ERROR line before this says why); a restart resumes from its buffer"
        );
        Ok(())
    }
}

/// Refuses settings that would leave the service running but refusing everything, or
/// quietly breaking grouping (a zero where a count or a time is needed), and warns where a
/// setting passes Loki's own default limits.
fn ensure_workable(settings: &Settings) -> anyhow::Result<()> {
    let (forward, pipeline) = (&settings.forward, &settings.pipeline);
    for (name, count) in [
        ("forward.max_connections", forward.max_connections),
        ("forward.max_message_bytes", forward.max_message_bytes),
        ("pipeline.batch_bytes", pipeline.batch_bytes),
        (
            "parsing.test_parses_at_once",
            settings.parsing.test_parses_at_once,
        ),
    ] {
        anyhow::ensure!(count >= 1, "{name} must be at least 1");
    }
    // Each holds its memory and a blocking thread.
    anyhow::ensure!(
        settings.parsing.test_parses_at_once <= 1_024,
        "parsing.test_parses_at_once must be at most 1024"
    );
    // A pair and the place its service holds for its `other` (see `labels`).
    anyhow::ensure!(
        pipeline.max_streams >= 2,
        "pipeline.max_streams must be at least 2"
    );
    for (name, time) in [
        ("forward.idle_timeout", forward.idle_timeout),
        ("forward.handshake_timeout", forward.handshake_timeout),
        ("pipeline.flush_after", pipeline.flush_after),
    ] {
        anyhow::ensure!(!time.is_zero(), "{name} must be more than zero");
    }
    // Loki's default ingestion burst is 6 MB: a larger push would get 429 for ever.
    anyhow::ensure!(
        pipeline.batch_bytes <= MAX_BATCH_BYTES,
        "pipeline.batch_bytes ({}) must be at most {MAX_BATCH_BYTES}: Loki's default \
         ingestion burst is 6 MB, and a push past it is refused (429) however often it is sent",
        pipeline.batch_bytes
    );
    if settings.parsing.max_record_bytes > crate::loki::DEFAULT_MAX_LINE_BYTES {
        tracing::warn!(
            max_record_bytes = settings.parsing.max_record_bytes,
            "parsing.max_record_bytes is above Loki's default max_line_size (256 KB): \
             unless Loki's limit was raised, records past it are refused and dropped"
        );
    }
    Ok(())
}

/// How long a write (and its sync) of the buffer may take before the replica says it is not
/// ready: a healthy volume syncs in milliseconds; Fluent Bit and OTLP exporters time out
/// their own waits for an answer within tens of seconds.
const STALLED_WRITE: std::time::Duration = std::time::Duration::from_secs(30);

/// Readiness, from how long the buffer's write under way has taken ([`STALLED_WRITE`]).
fn buffer_ready(writing_for: Option<std::time::Duration>) -> anyhow::Result<()> {
    match writing_for {
        Some(taken) if taken >= STALLED_WRITE => Err(anyhow::anyhow!(
            "the buffer's disk has not finished a write for {}s",
            taken.as_secs()
        )),
        _ => Ok(()),
    }
}

/// The largest push `pipeline.batch_bytes` may ask for.
const MAX_BATCH_BYTES: usize = 4 << 20;

/// Runs `work` (the pipeline) in a task of its own and waits for it. It ends before
/// `shutdown` only on a bug: a panic in its loop or in a push. Inputs would go on
/// acknowledging into a buffer nobody reads, so the process is stopped instead (through
/// `failing`, the app's own drain), and it restarts and resumes from the buffer.
async fn supervised(
    work: impl Future<Output = ()> + Send + 'static,
    shutdown: CancellationToken,
    failing: CancellationToken,
) -> anyhow::Result<()> {
    // A task of its own: a panic then ends it with an error here instead of unwinding
    // through the server's task tracker, where nobody would see it.
    let ended = tokio::spawn(work).await;
    if ended.is_ok() && shutdown.is_cancelled() {
        return Ok(());
    }
    failing.cancel();
    let how = if ended.is_err() {
        "panicked"
    } else {
        "stopped"
    };
    anyhow::bail!(
        "the pipeline to Loki {how}; shutting down so the process restarts from its buffer"
    )
}

/// A byte budget (`name`, `value`) that holds the largest thing it weighs (`least`) and
/// that a semaphore can count out at once.
fn ensure_budget(
    (name, value): (&str, usize),
    (least_name, least): (&str, usize),
) -> anyhow::Result<()> {
    anyhow::ensure!(
        (least..=crate::forward_input::MAX_BUDGET).contains(&value),
        "{name} ({value}) must be at least {least_name} ({least}) and at most {}",
        crate::forward_input::MAX_BUDGET
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_stalled_for_30_seconds_makes_the_replica_not_ready() {
        use std::time::Duration;
        assert!(buffer_ready(None).is_ok(), "nothing being written");
        assert!(
            buffer_ready(Some(Duration::from_millis(20))).is_ok(),
            "a sync under way"
        );
        assert!(buffer_ready(Some(Duration::from_millis(29_999))).is_ok());
        assert!(
            buffer_ready(Some(Duration::from_secs(30))).is_err(),
            "30 s is stalled"
        );
        let error = buffer_ready(Some(Duration::from_secs(31))).expect_err("stalled");
        assert_eq!(
            error.to_string(),
            "the buffer's disk has not finished a write for 31s"
        );
    }

    /// A panic in the pipeline stops the process through its drain, with a failure;
    /// the pipeline ending at shutdown is no failure.
    #[tokio::test]
    async fn a_panicking_pipeline_stops_the_process() {
        let (shutdown, failing) = (CancellationToken::new(), CancellationToken::new());
        let ended = supervised(
            async { panic!("a bug in the pipeline") },
            shutdown.clone(),
            failing.clone(),
        )
        .await;
        let error = ended.expect_err("a failure");
        assert!(error.to_string().contains("panicked"), "{error}");
        assert!(failing.is_cancelled(), "the app's drain starts");

        let (shutdown, failing) = (CancellationToken::new(), CancellationToken::new());
        shutdown.cancel();
        supervised(async {}, shutdown, failing.clone())
            .await
            .expect("a shutdown");
        assert!(!failing.is_cancelled());
    }
}
