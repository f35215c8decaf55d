//! `sync-relay`: moves product changes from Kinesis (or gRPC) through FIFO queue lanes into
//! product-catalog, with no change lost and per-product order kept.
//!
//! Stage 1 reads a source batch, quarantines what cannot be decoded or validated, rolls the
//! valid changes up into one message per lane (`hash(product code) mod lanes`) and sends them
//! to the queue; only then is the source acknowledged (a Kinesis checkpoint, a gRPC
//! response). Stage 2 receives lane messages, merges each lane's changes, applies them with
//! BulkUpdateProducts and deletes the messages only after the catalog committed. The
//! catalog's version guard makes every redelivery, replay and redrive harmless.
//!
//! # Layout
//! - [`config`]: [`Settings`], every knob with its default.
//! - [`app`]: [`App`], wiring dependencies, stages and the gRPC server.
//! - [`api`]: the admin and publish gRPC handlers (check, call, map errors).
//! - [`quarantine`]: quarantine pages and redrives, for the admin API.
//! - [`source`]: where changes come from ([`source::kinesis`]).
//! - [`change`]: decode and validate one change; its lane.
//! - [`ingest`]: stage 1 (quarantine, roll-up, enqueue).
//! - [`rollup`]: changes into lane messages with deterministic deduplication ids.
//! - [`apply`]: stage 2 (receive, merge, apply, delete).
//! - [`control`]: pause switch, last error, apply rate.
//! - [`store`] and [`entity`]: the relay's own tables.
//! - [`metrics`]: the relay's Prometheus metrics.
//! - [`cli`]: `relayctl`, the admin API from a terminal.
//! - [`migration`]: the database schema.

pub mod api;
pub mod app;
pub mod apply;
pub mod change;
pub mod cli;
pub mod config;
pub mod control;
pub mod entity;
pub mod ingest;
pub mod metrics;
pub mod migration;
pub mod quarantine;
pub mod rollup;
pub mod source;
pub mod store;

pub use app::App;
pub use config::Settings;

/// Name of this service in logs, traces, metrics (`mall_sync_relay_*`) and Kubernetes.
pub const SERVICE: &str = "sync-relay";
