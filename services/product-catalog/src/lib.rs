//! `product-catalog`: the product metadata store other teams read over gRPC, and the target sync-relay applies product changes to in bulk, version-guarded.
//!
//! # Layout
//! - [`config`]: [`Settings`], every knob with its default.
//! - [`app`]: [`App`], wiring dependencies and the gRPC server.
//! - [`migration`]: the database schema.

pub mod app;
pub mod config;
pub mod migration;

pub use app::App;
pub use config::Settings;

/// Name of this service in logs, traces, metrics (`mall_product_catalog_*`) and Kubernetes.
pub const SERVICE: &str = "product-catalog";
