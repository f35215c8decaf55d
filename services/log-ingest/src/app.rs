//! Wiring: connect dependencies, bind listeners, register services.

use std::{future::Future, net::SocketAddr};

use mall_grpc::GrpcServer;

use crate::{SERVICE, config::Settings};

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
        let mut server = GrpcServer::bind(SERVICE, &settings.server).await?;
        // The contract is listed by reflection for review; its calls answer UNIMPLEMENTED
        // until a later issue builds them.
        server.advertise_unimplemented("mall.logs.v1.LogIngestService");
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
