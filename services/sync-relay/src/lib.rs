//! `sync-relay`: moves product changes from Kinesis (or gRPC) through SQS FIFO lanes into product-catalog, with no change lost and per-product order kept.
//!
//! # Layout
//! - [`config`]: [`Settings`], every knob with its default.
//! - [`app`]: [`App`], wiring dependencies and the gRPC server.
//! - [`migration`]: the database schema.
//! - [`source`]: where product changes come from ([`source::kinesis`]).

pub mod app;
pub mod config;
pub mod migration;
pub mod source;

pub use app::App;
pub use config::Settings;

/// Name of this service in logs, traces, metrics (`mall_sync_relay_*`) and Kubernetes.
pub const SERVICE: &str = "sync-relay";
