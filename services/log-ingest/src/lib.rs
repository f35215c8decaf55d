//! `log-ingest`: receives the legacy servers' logs (Fluent forward, OTLP), parses them (Java stack traces kept whole), derives Prometheus metrics and ships them to Loki.
//!
//! # Layout
//! - [`config`]: [`Settings`], every knob with its default.
//! - [`app`]: [`App`], wiring dependencies and the gRPC server.
//! - [`api`]: the gRPC handlers.
//! - [`record`]: the structured record every stage passes on.
//! - [`parse`]: parsers, one line at a time (the legacy formats, JSON); [`formats`]: access
//!   logs, logfmt and configured regular expressions.
//! - [`multiline`]: multi-line grouping per stream, stack traces kept whole.
//! - [`mask`]: personal data masked out of every record.
//! - [`parsing`]: TestParse, lines parsed as ingestion would.
//! - [`metrics`]: the service's Prometheus metrics (and GetPipelineStats' counters);
//!   [`derive`](mod@derive): metrics derived from the records (levels, exceptions, access logs).
//! - [`forward`]: the Fluent forward protocol's messages (decoding, acks).
//! - [`buffer`]: the durable buffer between inputs and Loki (acknowledge after sync).
//! - [`batch`]: what an input puts in the buffer; [`recent`]: batches sent again are not
//!   stored twice.
//! - [`forward_input`]: the forward protocol's listener (acks after the buffer synced).
//! - [`otlp_input`]: OTLP logs over gRPC (answered after the buffer synced); [`otlp_wire`]:
//!   its server, which weighs an export from its bytes before decoding it.
//! - [`pipeline`]: from the buffer to Loki (grouping, masking, batching, acknowledging).
//! - [`labels`]: Loki labels from a fixed set, and the guard on how many streams they make.
//! - [`tail`]: TailLogs, records as they are ingested, never slowing ingestion.
//! - [`loki`]: Loki's push API and the client; [`loki_receiver`]: a Loki-compatible
//!   receiver for tests, benchmarks and local runs.

pub mod api;
pub mod api_wire;
pub mod app;
pub mod batch;
pub mod buffer;
pub mod config;
pub mod derive;
pub mod formats;
pub mod forward;
pub mod forward_input;
pub mod labels;
pub mod loki;
pub mod loki_receiver;
pub mod mask;
pub mod metrics;
pub mod multiline;
pub mod otlp_input;
pub mod otlp_wire;
pub mod parse;
pub mod parsing;
pub mod pipeline;
pub mod recent;
pub mod record;
pub mod tail;
pub mod wire;

pub use app::App;
pub use config::Settings;

/// Name of this service in logs, traces, metrics (`mall_log_ingest_*`) and Kubernetes.
pub const SERVICE: &str = "log-ingest";

/// A mutex's guard, even after a panic while it was held (the data it guards stays
/// consistent step by step; a poisoned lock must not stop the pipeline).
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
