//! Wiring: connect dependencies, bind listeners, register services.

use std::{future::Future, net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use mall_grpc::GrpcServer;
use mall_proto::catalog::v1::product_catalog_service_server::ProductCatalogServiceServer;

use crate::{
    SERVICE, api::CatalogApi, config::Settings, maintenance::Maintenance, metrics::CatalogMetrics,
    migration::Migrator, store::Store, watch::Watcher,
};

/// A built `product-catalog`, listeners bound, ready to run.
#[derive(Debug)]
pub struct App {
    server: GrpcServer,
    maintenance: Maintenance,
}

impl App {
    /// Checks the settings, connects and migrates the database and binds the listeners.
    ///
    /// # Errors
    /// When the product type registry is invalid, the database is unreachable or a listener
    /// cannot be bound.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let catalog = settings.catalog;
        catalog
            .product_types
            .check()
            .map_err(|problem| anyhow::anyhow!("invalid catalog.product_types: {problem}"))?;
        let db = mall_db::connect::<Migrator>(&settings.database).await?;
        let mut server = GrpcServer::bind(SERVICE, &settings.server).await?;
        let metrics = CatalogMetrics::register(server.registry())
            .context("failed to register catalog metrics")?;

        let store = Store::new(db, catalog.write_retries, catalog.read_cache_entries)?
            .with_max_version_jump(catalog.max_version_jump);
        server.spawn(
            "read cache follower",
            store
                .clone()
                .follow_for_cache(catalog.watch_poll_interval, server.shutdown_token()),
        );
        let types = Arc::new(catalog.product_types);
        let (commits, commits_seen) = tokio::sync::watch::channel(0u64);
        let watcher = Watcher {
            store: store.clone(),
            types: types.clone(),
            commits: commits_seen,
            poll_interval: catalog.watch_poll_interval,
            metrics: metrics.clone(),
            shutdown: server.shutdown_token(),
        };
        let api = CatalogApi::new(
            store.clone(),
            types,
            metrics.clone(),
            Arc::new(commits),
            watcher,
        );
        let max_message = settings.server.max_message_bytes;
        server.add_service(
            ProductCatalogServiceServer::new(api)
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        );

        let maintenance = Maintenance {
            store: store.clone(),
            metrics,
            change_retention: catalog.change_retention,
            request_id_retention: catalog.request_id_retention,
            pending_retention: catalog.pending_retention,
        };
        server.spawn(
            "maintenance",
            maintenance
                .clone()
                .run(catalog.maintenance_interval, server.shutdown_token()),
        );
        server.set_readiness(move || {
            let db = store.connection().clone();
            async move { mall_db::ping(&db).await }
        });
        Ok(Self {
            server,
            maintenance,
        })
    }

    /// Where gRPC listens (the real port when configured with port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.server.grpc_addr()
    }

    /// Where the admin-only methods' gRPC listener listens, when `server.admin_grpc_addr` is
    /// set.
    pub fn admin_grpc_addr(&self) -> Option<SocketAddr> {
        self.server.admin_grpc_addr()
    }

    /// Where the admin HTTP server listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.server.admin_addr()
    }

    /// The upkeep task (pruning), to run a round on demand.
    pub fn maintenance(&self) -> Maintenance {
        self.maintenance.clone()
    }

    /// Serves until `shutdown` completes, then drains.
    ///
    /// # Errors
    /// When a server fails.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        self.server.run_until(shutdown).await
    }
}
