//! Server bootstrap shared by every mall service.
//!
//! Every service builds a [`GrpcServer`], adds its gRPC services, a readiness probe and its
//! background workers, and runs it until a shutdown signal. The server brings what every pod
//! needs, so a service's own code is only its domain:
//!
//! - `grpc.health.v1` (SERVING only while the readiness probe passes) and server reflection
//!   (v1 and v1alpha, listing only the services actually served);
//! - a tower stack around every call: W3C trace-context extraction and a span, Prometheus
//!   request counts and latency by method and status code, a deadline, load shedding above a
//!   global concurrency limit;
//! - mutual TLS when configured (certificates reloaded when they change) and a per-method
//!   authorization policy over the callers' certificate identities;
//! - an admin HTTP server with `/metrics`, `/healthz` and `/readyz`;
//! - graceful shutdown on SIGTERM/SIGINT: stop accepting, drain calls and background work
//!   within a timeout.
//!
//! # Layout
//! - [`settings`]: the `server` section of a service's settings.
//! - [`error`]: [`ServiceError`], the one mapping from domain errors to `tonic::Status`.
//! - [`observe`]: the tracing/metrics/deadline layer.
//! - [`server`]: [`GrpcServer`], wiring and the run loop.
//! - [`admin`]: the admin HTTP server.
//! - [`tls`]: certificate files (reloaded when they change) and identities in certificates.
//! - [`listen`]: accepting connections: a connection bound, TLS handshakes with a deadline.
//! - [`authz`]: the per-method policy and the per-caller limit.
//! - [`methods`]: the methods a server serves, the only method label values.
//! - [`client`]: channels to other services (TLS when configured) and trace-context
//!   propagation for outgoing calls.
//! - [`shutdown`]: the SIGTERM/SIGINT future, [`shutdown_signal`].
//! - [`process`]: process-wide settings a binary makes first (transparent huge pages off).

pub mod admin;
pub mod authz;
pub mod client;
pub mod error;
pub mod listen;
pub mod methods;
pub mod observe;
pub mod process;
pub mod server;
pub mod settings;
pub mod shutdown;
mod throttle;
pub mod tls;

pub use error::{FieldViolation, ServiceError, Violations};
pub use server::{GrpcServer, Readiness};
pub use settings::ServerSettings;
pub use shutdown::shutdown_signal;
