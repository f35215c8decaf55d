//! Wiring: connect dependencies, bind listeners, register services.

use std::{future::Future, net::SocketAddr};

use mall_grpc::GrpcServer;
use mall_proto::logs::v1::log_ingest_service_server::LogIngestServiceServer;

use crate::{SERVICE, api::LogsApi, config::Settings, parsing::Parsing};

/// A built `log-ingest`, listeners bound, ready to run.
#[derive(Debug)]
pub struct App {
    server: GrpcServer,
}

impl App {
    /// Connects dependencies, runs migrations and binds the listeners.
    ///
    /// # Errors
    /// When a dependency is unreachable or a listener cannot be bound.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let parsing = Parsing::new(&settings.parsing, &settings.masking)?;
        let mut server = GrpcServer::bind(SERVICE, &settings.server).await?;
        server.add_service(
            LogIngestServiceServer::new(LogsApi { parsing })
                .max_decoding_message_size(settings.server.max_message_bytes),
        );
        Ok(Self { server })
    }

    /// Where gRPC listens (the real port when configured with port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.server.grpc_addr()
    }

    /// Where the admin HTTP server listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.server.admin_addr()
    }

    /// Serves until `shutdown` completes, then drains.
    ///
    /// # Errors
    /// When a server fails.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        self.server.run_until(shutdown).await
    }
}
