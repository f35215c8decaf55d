//! `member-export`: sends marketing data of consenting members to the external marketing platform through a queue, rate-limited, with retries, capped alerts and a failover job.
//!
//! # Layout
//! - [`config`]: [`Settings`], every knob with its default.
//! - [`app`]: [`App`], wiring dependencies and the gRPC server.
//! - [`cli`]: `memberctl`, failover jobs and stats from a terminal.
//! - [`alerts`]: failure alerts to a Slack-compatible webhook, capped across replicas.
//! - [`api`]: the gRPC handlers.
//! - [`enqueue`]: EnqueueMemberChanges: record in the member table, queue deliveries.
//! - [`deliver`]: delivery workers: member table → partner, consent checked at send time.
//! - [`jobs`]: failover jobs: resend a time range or the failed deliveries, checkpointed.
//! - [`outbound`]: the tower stack to the partner (retry, rate limit, concurrency).
//! - [`ratelimit`]: the partner's rate, one limit for every replica, backing off on refusals.
//! - [`metrics`]: the service's Prometheus metrics; [`stats`]: GetDeliveryStats.
//! - [`state`]: ListFailedDeliveries and GetMemberDeliveryState.
//! - [`validate`]: request limits and their checks.
//! - [`store`]: the member table and remembered request ids.
//! - [`crypto`]: profiles encrypted at rest (AES-256-GCM); [`reencrypt`]: moves them to the
//!   current key after a rotation.
//! - [`migration`]: the database schema.
//! - [`partner`]: the marketing platform behind one trait, one adapter per dialect.
//! - [`simulator`]: a partner simulator for tests, benchmarks and local runs.

pub mod alerts;
pub mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod deliver;
pub mod enqueue;
pub mod group;
pub mod jobs;
pub mod metrics;
pub mod migration;
pub mod outbound;
pub mod partner;
pub mod ratelimit;
pub mod reencrypt;
pub mod simulator;
pub mod state;
pub mod stats;
pub mod store;
pub mod validate;

pub use app::App;
pub use config::Settings;

/// Name of this service in logs, traces, metrics (`mall_member_export_*`) and Kubernetes.
pub const SERVICE: &str = "member-export";
