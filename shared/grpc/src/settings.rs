//! The `server` section shared by every service's settings.

use std::{net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    authz::{AuthzRule, AuthzSettings},
    tls::ServerTls,
};

/// Listeners, limits and timeouts of a service's gRPC and admin servers.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Address the gRPC server listens on. Each service has its own default port
    /// (product-catalog 50051, sync-relay 50052, member-export 50053, log-ingest 50054) on
    /// 127.0.0.1; pods set `0.0.0.0:<port>`.
    pub listen_addr: SocketAddr,
    /// A second gRPC listener for the admin-only methods (those no `authz` rule lists:
    /// pause, redrives, failover jobs, ...). When set, the same services are served on both
    /// listeners, and the main one refuses admin-only methods (PERMISSION_DENIED, reason
    /// `ADMIN_LISTENER_ONLY`), so a NetworkPolicy can keep them inside the operations
    /// namespace. Default: none (everything on `listen_addr`).
    pub admin_grpc_addr: Option<SocketAddr>,
    /// Mutual TLS on the gRPC listener: this server's certificate and the CA of its callers'
    /// certificates (`[server.tls]`, see [`ServerTls`]). Without it the listener is plaintext,
    /// which it refuses on an address other than loopback unless `insecure` is set.
    pub tls: Option<ServerTls>,
    /// Serve plaintext gRPC on a non-loopback address (no TLS, no identities, no
    /// authorization): only for a network that is trusted as a whole. Default false.
    pub insecure: bool,
    /// Who may call which methods when TLS is on (`[server.authz]`, see [`AuthzSettings`]).
    /// Each service has its own default rules; the admins may call everything.
    pub authz: AuthzSettings,
    /// Connections open at once; a new one beyond it is closed at once. Default 1024.
    pub max_connections: usize,
    /// Longest time a TLS handshake may take before its connection is closed. Default 10s.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Calls in flight at once from one caller identity (TLS on); beyond it the caller gets
    /// RESOURCE_EXHAUSTED (`CALLER_CONCURRENCY_LIMIT`, RetryInfo 1 s: load, to be retried),
    /// so one flooding caller cannot take
    /// the whole `concurrency_limit` from the others. Default 256.
    pub per_caller_concurrency: usize,
    /// Address of the admin HTTP server (`/metrics`, `/healthz`, `/readyz`). Each service has
    /// its own default port (9091 to 9094, in the same order) on 127.0.0.1.
    pub admin_addr: SocketAddr,
    /// Longest time a unary call (or the start of a streaming call) may take. A client's own
    /// shorter `grpc-timeout` wins. Default 30s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Calls in flight at once across all connections; calls beyond it are refused at once
    /// with UNAVAILABLE instead of queueing. Default 1024.
    pub concurrency_limit: usize,
    /// Largest request message a service accepts, in bytes; larger ones get
    /// RESOURCE_EXHAUSTED. Default 16 MiB (a 1,000-item bulk update of rich products fits).
    pub max_message_bytes: usize,
    /// How often the readiness probe (database, queue) runs. Default 5s.
    #[serde(with = "humantime_serde")]
    pub readiness_interval: Duration,
    /// How long shutdown waits for in-flight calls and background work before giving up.
    /// Kubernetes' grace period (30s by default) must be longer. Default 20s.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl ServerSettings {
    /// The defaults, listening on 127.0.0.1 at the given gRPC and admin ports.
    pub fn with_ports(grpc_port: u16, admin_port: u16) -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], grpc_port)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            ..Self::default()
        }
    }

    /// These settings with `rules` as the authorization rules (the admins keep every method).
    #[must_use]
    pub fn with_rules(mut self, rules: Vec<AuthzRule>) -> Self {
        self.authz.rules = rules;
        self
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_grpc_addr: None,
            tls: None,
            insecure: false,
            authz: AuthzSettings::with_rules(Vec::new()),
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            per_caller_concurrency: 256,
            request_timeout: Duration::from_secs(30),
            concurrency_limit: 1024,
            max_message_bytes: 16 * 1024 * 1024,
            readiness_interval: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(20),
        }
    }
}
