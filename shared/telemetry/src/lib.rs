//! Logging, tracing and trace-context propagation shared by every service.
//!
//! - Logs go through `tracing`: readable text locally, one JSON object per line in deployment
//!   (shipped by the node's log agent to log-ingest and on to Loki).
//! - Spans are OpenTelemetry spans. They are exported over OTLP/gRPC when an endpoint is
//!   configured; without one they still carry W3C trace ids, so a trace that enters a service
//!   (gRPC metadata, queue attribute, stream envelope) leaves it with the same trace id.
//! - Prometheus metrics live in a [`metrics::Registry`] owned by each app, not a global one,
//!   so several apps can run in one test process; `mall-grpc` serves it on `/metrics` in the
//!   OpenMetrics format (exemplars included).
//!
//! # Layout
//! - [`TelemetrySettings`]: the `telemetry` section of every service's settings.
//! - [`init`] / [`Telemetry::shutdown`]: install the subscriber; flush spans at exit.
//! - [`propagation`]: W3C `traceparent` in and out of carriers (metadata, attributes, envelopes).
//! - [`metrics`]: counters, gauges and histograms (exemplars where asked) and their registry.

pub mod metrics;
pub mod propagation;

use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider},
};
use serde::{Deserialize, Serialize};
use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _, util::SubscriberInitExt as _};

/// How log lines are written to stdout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    #[default]
    Text,
    /// One JSON object per line, for a log agent (deployment).
    Json,
}

/// The `telemetry` section of a service's settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// Log line format. Default `text`; the Kubernetes manifests set `json`.
    pub log_format: LogFormat,
    /// Which events are logged, in `RUST_LOG` syntax. Default `info`.
    pub log_filter: String,
    /// OTLP/gRPC collector endpoint for spans, such as `http://otel-collector:4317`.
    /// Default: none, spans are not exported (trace ids still propagate).
    pub otlp_endpoint: Option<url::Url>,
    /// A PEM CA file trusted for an `https://` collector in addition to the system's roots.
    /// Default: none.
    pub otlp_ca_file: Option<std::path::PathBuf>,
    /// Share of new traces (those without a sampled parent) that are recorded, 0.0 to 1.0.
    /// Default 1.0. A parent's sampling decision is always followed.
    pub trace_sample_ratio: f64,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            log_filter: "info".to_owned(),
            otlp_endpoint: None,
            otlp_ca_file: None,
            trace_sample_ratio: 1.0,
        }
    }
}

/// Handle on the installed telemetry; call [`Telemetry::shutdown`] before exiting so buffered
/// spans are exported.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

/// How long shutdown waits for the span exporter to flush.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Installs the global `tracing` subscriber and the W3C propagator for `service_name`.
///
/// # Errors
/// When the log filter does not parse or the OTLP exporter cannot be built.
pub fn init(service_name: &'static str, settings: &TelemetrySettings) -> anyhow::Result<Telemetry> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let resource = Resource::builder()
        .with_service_name(service_name)
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
        settings.trace_sample_ratio.clamp(0.0, 1.0),
    )));
    let mut provider = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_sampler(sampler);
    if let Some(endpoint) = &settings.otlp_endpoint {
        use opentelemetry_otlp::WithTonicConfig as _;
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.as_str());
        if endpoint.scheme() == "https" {
            let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
            if let Some(ca_file) = &settings.otlp_ca_file {
                let pem = std::fs::read(ca_file).with_context(|| {
                    format!(
                        "telemetry.otlp_ca_file: failed to read {}",
                        ca_file.display()
                    )
                })?;
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
            }
            builder = builder.with_tls_config(tls);
        }
        let exporter = builder
            .build()
            .context("failed to build the otlp span exporter")?;
        provider = provider.with_batch_exporter(exporter);
    }
    let provider = provider.build();
    let tracer = provider.tracer(service_name);

    let filter = EnvFilter::try_new(&settings.log_filter)
        .with_context(|| format!("invalid telemetry.log_filter {:?}", settings.log_filter))?;
    let otel = tracing_opentelemetry::layer().with_tracer(tracer);
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    match settings.log_format {
        LogFormat::Text => registry.with(tracing_subscriber::fmt::layer()).try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false),
            )
            .try_init(),
    }
    .context("a tracing subscriber is already installed")?;

    Ok(Telemetry { provider })
}

impl Telemetry {
    /// Flushes buffered spans and stops the exporter.
    ///
    /// # Errors
    /// When the exporter fails to flush within a few seconds.
    pub fn shutdown(self) -> anyhow::Result<()> {
        self.provider
            .shutdown_with_timeout(FLUSH_TIMEOUT)
            .context("failed to flush spans at shutdown")
    }
}
