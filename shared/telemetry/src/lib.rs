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
            .with(tracing_subscriber::fmt::layer().event_format(json_format()))
            .try_init(),
    }
    .context("a tracing subscriber is already installed")?;
    std::panic::set_hook(Box::new(log_panic));

    Ok(Telemetry { provider })
}

/// A panic as one ERROR event (a JSON line in deployment, like every other line), naming
/// where it happened, and what it said only when std hands it over as a `&'static str`:
/// `panic!` with a bare literal, `assert!` without a message, `unwrap` on `None`. Any other
/// message was formatted at run time and can quote the data at hand (slicing a string
/// quotes the string; `Result::unwrap` the error), and logs must carry no member's e-mail
/// address or phone number; that includes `expect`'s messages, which std formats too (the
/// location names the call). The backtrace (with `RUST_BACKTRACE=1`) gives the rest. When
/// `telemetry.log_filter` leaves this crate's errors out, a line goes to stderr instead.
fn log_panic(info: &std::panic::PanicHookInfo<'_>) {
    let location = info
        .location()
        .map_or_else(String::new, |l| format!("{}:{}", l.file(), l.line()));
    // `panic!("literal")` carries a `&'static str`; a formatted message, a `String`.
    let message = info
        .payload()
        .downcast_ref::<&'static str>()
        .copied()
        .unwrap_or("(formatted at run time: not logged, it may quote the data at hand)");
    let thread = std::thread::current();
    let thread = thread.name().unwrap_or("unnamed");
    let backtrace = std::backtrace::Backtrace::capture();
    // Only when captured: otherwise it reads "disabled backtrace".
    let backtrace = (backtrace.status() == std::backtrace::BacktraceStatus::Captured)
        .then(|| backtrace.to_string());
    if tracing::enabled!(tracing::Level::ERROR) {
        tracing::error!(%location, thread, panic = message, backtrace, "panicked");
    } else {
        let backtrace = backtrace.map(|b| format!("\n{b}")).unwrap_or_default();
        eprintln!("thread '{thread}' panicked at {location}: {message}{backtrace}");
    }
}

/// The JSON line format: tracing-subscriber's flattened JSON plus `trace_id` and `span_id`.
fn json_format()
-> WithTraceIds<tracing_subscriber::fmt::format::Format<tracing_subscriber::fmt::format::Json>> {
    WithTraceIds(
        tracing_subscriber::fmt::format()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false),
    )
}

/// Adds `"trace_id"` and `"span_id"` of the span an event happens in to a JSON line, so log-ingest
/// puts the trace id into Loki's structured metadata and Grafana links the line to its trace.
///
/// Written here because tracing-subscriber's JSON format has no hook for extra keys; the ids
/// come from the OpenTelemetry context that tracing-opentelemetry activates on span entry.
#[derive(Debug, Clone)]
struct WithTraceIds<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for WithTraceIds<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use opentelemetry::trace::TraceContextExt as _;
        let mut line = String::with_capacity(256);
        self.0.format_event(
            ctx,
            tracing_subscriber::fmt::format::Writer::new(&mut line),
            event,
        )?;
        let context = opentelemetry::Context::current();
        let span = context.span();
        let ids = span.span_context();
        // The inner format ends the object with `}` and a newline.
        if ids.is_valid()
            && let Some(end) = line.rfind('}')
        {
            line.insert_str(
                end,
                &format!(
                    ",\"trace_id\":\"{}\",\"span_id\":\"{}\"",
                    ids.trace_id(),
                    ids.span_id()
                ),
            );
        }
        writer.write_str(&line)
    }
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

#[cfg(test)]
mod tests {
    use std::{
        io::Write,
        sync::{Arc, Mutex},
    };

    use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    /// Lines written by the formatter.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("not poisoned").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_the_trace_and_span_of_their_span_and_none_outside() {
        let lines = Lines::default();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(super::json_format())
                    .with_writer(move || writer.clone()),
            );
        let (trace_id, span_id) = tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside");
            let span = tracing::info_span!("work");
            let _entered = span.enter();
            tracing::info!(member = 3, "inside \"quoted\" }}");
            let context = span.context();
            let ids = context.span().span_context().clone();
            (ids.trace_id().to_string(), ids.span_id().to_string())
        });

        let text = String::from_utf8(lines.0.lock().expect("not poisoned").clone()).expect("utf-8");
        let parsed: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
            .collect();
        assert_eq!(parsed.len(), 2, "{text}");
        assert_eq!(parsed[0]["message"], "outside");
        assert!(parsed[0].get("trace_id").is_none(), "{text}");
        assert_eq!(parsed[1]["message"], "inside \"quoted\" }");
        assert_eq!(parsed[1]["member"], 3);
        assert_eq!(parsed[1]["trace_id"], trace_id.as_str());
        assert_eq!(parsed[1]["span_id"], span_id.as_str());
        assert_ne!(trace_id, "00000000000000000000000000000000");
    }

    /// A panic is one JSON line with its location; a message formatted at run time (which
    /// may quote a member's address) is left out, a literal kept.
    #[test]
    fn a_panic_is_logged_where_it_happened_without_the_data_it_quoted() {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .event_format(super::json_format())
                .with_writer(move || writer.clone()),
        );
        // The hook runs on the panicking thread, under its default subscriber. Nothing is
        // asserted while it is set: a failure would go to `lines`, not the test's output.
        std::panic::set_hook(Box::new(super::log_panic));
        let panicked = tracing::subscriber::with_default(subscriber, || {
            let text = String::from("주문 kim.minji@example.com");
            let cut = std::hint::black_box(4);
            [
                std::panic::catch_unwind(|| text[..cut].len()).is_err(),
                std::panic::catch_unwind(|| panic!("the books are inconsistent")).is_err(),
            ]
        });
        drop(std::panic::take_hook());
        assert_eq!(panicked, [true, true]);

        let text = String::from_utf8(lines.0.lock().expect("not poisoned").clone()).expect("utf-8");
        assert!(!text.contains("kim.minji"), "{text}");
        let parsed: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
            .collect();
        assert_eq!(parsed.len(), 2, "{text}");
        for event in &parsed {
            assert_eq!(event["level"], "ERROR");
            assert_eq!(event["message"], "panicked");
            assert!(
                event["location"]
                    .as_str()
                    .is_some_and(|l| l.contains("telemetry/src/lib.rs:")),
                "{text}"
            );
        }
        assert_eq!(
            parsed[0]["panic"],
            "(formatted at run time: not logged, it may quote the data at hand)"
        );
        assert_eq!(parsed[1]["panic"], "the books are inconsistent");
    }
}
