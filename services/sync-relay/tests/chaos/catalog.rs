//! product-catalog in the test's process, so it can be stopped for an outage and started
//! again on the same address and database.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use mall_proto::catalog::v1::{
    BatchGetProductsRequest, Product, product_catalog_service_client::ProductCatalogServiceClient,
};
use mall_test_support::{TestDatabase, probe, wait_until};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

/// A running catalog; stopped when dropped.
pub struct Catalog {
    pub addr: SocketAddr,
    database: TestDatabase,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Catalog {
    /// A catalog on `database` (fresh, or the one a stopped catalog used), on a free port or
    /// on `addr` to come back where the relay expects it. Change retention stays at its
    /// default.
    pub async fn start(database: TestDatabase, addr: Option<SocketAddr>) -> Self {
        let mut settings = product_catalog::Settings::default();
        settings.server.listen_addr = addr.unwrap_or_else(|| "127.0.0.1:0".parse().expect("valid"));
        settings.server.admin_addr = "127.0.0.1:0".parse().expect("valid");
        settings.server.drain_timeout = Duration::from_secs(5);
        settings.database.url = database.url().to_owned().into();
        let app = product_catalog::App::build(settings)
            .await
            .expect("the catalog builds");
        let addr = app.grpc_addr();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(app.run_until(shutdown.clone().cancelled_owned()));
        wait_until("the catalog serves", Duration::from_secs(30), || async {
            (probe::health(addr, "").await == Some(ServingStatus::Serving)).then_some(())
        })
        .await;
        Self {
            addr,
            database,
            shutdown,
            task: Some(task),
        }
    }

    /// Stops serving: the port refuses connections until [`Catalog::start`] again with what
    /// this returns.
    pub async fn stop(mut self) -> (TestDatabase, SocketAddr) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await
                .expect("the catalog task joins")
                .expect("the catalog stops cleanly");
        }
        let database = std::mem::replace(&mut self.database, TestDatabase::sqlite());
        (database, self.addr)
    }

    pub fn client(&self) -> ProductCatalogServiceClient<Channel> {
        client(self.addr)
    }

    /// Every product among `codes` that exists, by code (BatchGetProducts, 1,000 at a time).
    pub async fn products(&self, codes: &[String]) -> BTreeMap<String, Product> {
        let mut found = BTreeMap::new();
        for chunk in codes.chunks(1_000) {
            let results = self
                .client()
                .batch_get_products(BatchGetProductsRequest {
                    codes: chunk.to_vec(),
                })
                .await
                .expect("BatchGetProducts answers")
                .into_inner()
                .results;
            for lookup in results {
                if let Some(product) = lookup.product {
                    found.insert(lookup.code, product);
                }
            }
        }
        found
    }
}

impl Drop for Catalog {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A catalog client for `addr`, with room for large watch responses.
pub fn client(addr: SocketAddr) -> ProductCatalogServiceClient<Channel> {
    ProductCatalogServiceClient::new(probe::channel(addr)).max_decoding_message_size(64 << 20)
}
