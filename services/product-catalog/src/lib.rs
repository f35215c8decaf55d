//! `product-catalog`: the product metadata store other teams read over gRPC, and the target
//! sync-relay applies product changes to in bulk, version-guarded.
//!
//! Every write carries the product's source version and applies only when it is newer than
//! the stored one, so retries, replays and redrives can never move a product back in time.
//! Writes come in bulk (up to 1,000 items of one product type, one transaction, a handful of
//! set-based statements), and every applied change is appended to a change log in the same
//! transaction, which WatchProductChanges streams from a resumable cursor.
//!
//! # Layout
//! - [`config`]: [`Settings`], every knob with its default.
//! - [`app`]: [`App`], wiring dependencies and the gRPC server.
//! - [`api`]: the gRPC handlers.
//! - [`bulk`]: request checks and the version-guarded write plan (pure logic).
//! - [`store`]: the tables and the transactions on them.
//! - [`watch`]: WatchProductChanges streams.
//! - [`import`]: ImportProducts, the initial migration.
//! - [`tokens`]: page tokens and change cursors.
//! - [`maintenance`]: retention of the change log and request ids.
//! - [`metrics`]: the catalog's Prometheus metrics.
//! - [`migration`]: the database schema.

pub mod api;
pub mod app;
pub mod bulk;
pub mod config;
pub mod import;
pub mod maintenance;
pub mod metrics;
pub mod migration;
pub mod store;
pub mod tokens;
pub mod watch;

pub use app::App;
pub use config::Settings;

/// Name of this service in logs, traces, metrics (`mall_product_catalog_*`) and Kubernetes.
pub const SERVICE: &str = "product-catalog";
