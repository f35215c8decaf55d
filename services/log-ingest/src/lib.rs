//! `log-ingest`: receives the legacy servers' logs (Fluent forward, OTLP), parses them (Java stack traces kept whole), derives Prometheus metrics and ships them to Loki.
//!
//! # Layout
//! - [`config`]: [`Settings`], every knob with its default.
//! - [`app`]: [`App`], wiring dependencies and the gRPC server.

pub mod app;
pub mod config;

pub use app::App;
pub use config::Settings;

/// Name of this service in logs, traces, metrics (`mall_log_ingest_*`) and Kubernetes.
pub const SERVICE: &str = "log-ingest";
