//! A catalog and a relay on fresh databases, and builders for changes.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use mall_proto::{
    catalog::v1::{
        GetProductRequest, Product, product_catalog_service_client::ProductCatalogServiceClient,
    },
    sync::v1::{
        ProductChange, PublishProductChangesRequest, PublishProductChangesResponse,
        sync_relay_service_client::SyncRelayServiceClient,
    },
};
use mall_test_support::{Engine, TestDatabase, probe, wait_until};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;

/// A running product-catalog; stopped when dropped, or with [`Catalog::stop`].
pub struct Catalog {
    pub addr: SocketAddr,
    pub database: TestDatabase,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Catalog {
    /// A catalog on a fresh database, on a free port (or `addr`, to come back on the same one).
    pub async fn start(
        database: TestDatabase,
        addr: Option<SocketAddr>,
        configure: impl FnOnce(&mut product_catalog::Settings),
    ) -> Self {
        let mut settings = product_catalog::Settings::default();
        settings.server.listen_addr = addr.unwrap_or_else(|| "127.0.0.1:0".parse().expect("valid"));
        settings.server.admin_addr = "127.0.0.1:0".parse().expect("valid");
        settings.database.url = database.url().to_owned().into();
        configure(&mut settings);
        let app = product_catalog::App::build(settings)
            .await
            .expect("catalog builds");
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

    /// Stops serving (the port refuses connections) and returns the database for a restart.
    pub async fn stop(mut self) -> (TestDatabase, SocketAddr) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.expect("joined").expect("stopped cleanly");
        }
        let database = std::mem::replace(&mut self.database, TestDatabase::sqlite());
        (database, self.addr)
    }

    pub fn client(&self) -> ProductCatalogServiceClient<Channel> {
        ProductCatalogServiceClient::new(probe::channel(self.addr))
    }

    /// The stored version of `code`, 0 when absent.
    pub async fn version(&self, code: &str) -> u64 {
        match self
            .client()
            .get_product(GetProductRequest { code: code.into() })
            .await
        {
            Ok(response) => response.into_inner().product.map_or(0, |p| p.version),
            Err(status) if status.code() == Code::NotFound => 0,
            Err(status) => panic!("get {code}: {status}"),
        }
    }

    /// Every product among `codes` that exists, by code (BatchGetProducts, 1,000 at a time).
    pub async fn stored(&self, codes: &[String]) -> Result<BTreeMap<String, Product>, Status> {
        let mut found = BTreeMap::new();
        for chunk in codes.chunks(1_000) {
            let results = self
                .client()
                .batch_get_products(mall_proto::catalog::v1::BatchGetProductsRequest {
                    codes: chunk.to_vec(),
                })
                .await?
                .into_inner()
                .results;
            for lookup in results {
                if let Some(product) = lookup.product {
                    found.insert(lookup.code, product);
                }
            }
        }
        Ok(found)
    }

    /// Waits until every `(code, version)` is stored at least at that version.
    pub async fn wait_for(&self, expected: &[(String, u64)], timeout: Duration) {
        let codes: Vec<String> = expected.iter().map(|(c, _)| c.clone()).collect();
        wait_until("the catalog has every change", timeout, || async {
            let stored = self.stored(&codes).await.ok()?;
            expected
                .iter()
                .all(|(code, want)| stored.get(code).map_or(0, |p| p.version) >= *want)
                .then_some(())
        })
        .await;
    }
}

impl Drop for Catalog {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A running relay on the embedded queue; stopped when dropped.
pub struct Relay {
    pub addr: SocketAddr,
    /// The admin port (`/metrics`).
    pub admin: SocketAddr,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Relay {
    /// A relay applying to `catalog`, keeping its state in `database`.
    pub async fn start(
        database: &TestDatabase,
        catalog: SocketAddr,
        configure: impl FnOnce(&mut sync_relay::Settings),
    ) -> Self {
        mall_test_support::init_logging();
        let mut settings = sync_relay::Settings::default();
        settings.server.listen_addr = "127.0.0.1:0".parse().expect("valid");
        settings.server.admin_addr = "127.0.0.1:0".parse().expect("valid");
        settings.database.url = database.url().to_owned().into();
        settings.apply.catalog_url = format!("http://{catalog}").parse().expect("valid url");
        settings.apply.receive_wait = Duration::from_millis(200);
        settings.apply.retry_backoff_max = Duration::from_millis(500);
        settings.queue.visibility_timeout = Duration::from_secs(5);
        settings.queue.embedded.poll_interval = Duration::from_millis(20);
        settings.relay.control_poll_interval = Duration::from_millis(200);
        configure(&mut settings);
        let app = sync_relay::App::build(settings)
            .await
            .expect("relay builds");
        let addr = app.grpc_addr();
        let admin = app.admin_addr();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(app.run_until(shutdown.clone().cancelled_owned()));
        wait_until("the relay serves", Duration::from_secs(10), || async {
            (probe::health(addr, "").await == Some(ServingStatus::Serving)).then_some(())
        })
        .await;
        Self {
            addr,
            admin,
            shutdown,
            task: Some(task),
        }
    }

    /// GetRelayStatus's status, or `None` when the call fails.
    pub async fn status(&self) -> Option<mall_proto::sync::v1::RelayStatus> {
        self.client()
            .get_relay_status(mall_proto::sync::v1::GetRelayStatusRequest {})
            .await
            .ok()?
            .into_inner()
            .status
    }

    /// RedriveQuarantined of every record, expected to succeed.
    pub async fn redrive_all_quarantined(
        &self,
    ) -> mall_proto::sync::v1::RedriveQuarantinedResponse {
        self.client()
            .redrive_quarantined(mall_proto::sync::v1::RedriveQuarantinedRequest {
                all: true,
                ..Default::default()
            })
            .await
            .expect("redrive")
            .into_inner()
    }

    pub fn client(&self) -> SyncRelayServiceClient<Channel> {
        SyncRelayServiceClient::new(probe::channel(self.addr))
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// Publishes `changes` in messages of up to 1,000 and returns the response.
    pub async fn publish(&self, changes: Vec<ProductChange>) -> PublishProductChangesResponse {
        let messages: Vec<_> = changes
            .chunks(1000)
            .map(|c| PublishProductChangesRequest {
                changes: c.to_vec(),
            })
            .collect();
        self.client()
            .publish_product_changes(tokio_stream::iter(messages))
            .await
            .expect("publish succeeds")
            .into_inner()
    }

    /// Stops the relay gracefully.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.expect("joined").expect("stopped cleanly");
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A fresh database for the relay or the catalog.
pub async fn database(engine: Engine) -> TestDatabase {
    TestDatabase::new(engine).await
}

/// A valid full-replacement change of shoe `code` at `version`.
pub fn change(code: &str, version: u64) -> ProductChange {
    mall_test_support::shoe_change(code, version)
}

/// Runs each listed `async fn name(engine: Engine)` on SQLite and PostgreSQL.
#[macro_export]
macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(mall_test_support::Engine::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(mall_test_support::Engine::Postgres).await;
                }
            )*
        }
    };
}
