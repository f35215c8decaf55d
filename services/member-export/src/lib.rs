//! `member-export`: sends marketing data of consenting members to the external marketing platform through a queue, rate-limited, with retries, capped alerts and a failover job.
//!
//! # Layout
//! - [`config`]: [`Settings`], every knob with its default.
//! - [`app`]: [`App`], wiring dependencies and the gRPC server.
//! - [`migration`]: the database schema.
//! - [`partner`]: the marketing platform behind one trait, one adapter per dialect.
//! - [`simulator`]: a partner simulator for tests, benchmarks and local runs.

pub mod app;
pub mod config;
pub mod migration;
pub mod partner;
pub mod simulator;

pub use app::App;
pub use config::Settings;

/// Name of this service in logs, traces, metrics (`mall_member_export_*`) and Kubernetes.
pub const SERVICE: &str = "member-export";
