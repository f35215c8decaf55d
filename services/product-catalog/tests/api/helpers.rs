//! `TestCatalog::spawn`: a catalog on a fresh database, and builders for requests.

use std::{net::SocketAddr, time::Duration};

use mall_proto::catalog::v1::{
    BulkUpdateProductsRequest, BulkUpdateProductsResponse, Product, ProductStatus, ProductUpdate,
    product_catalog_service_client::ProductCatalogServiceClient,
};
use mall_test_support::{Engine, TestDatabase, probe, wait_until};
use product_catalog::{App, Settings, maintenance::Maintenance};
use prost_types::{FieldMask, Struct, Value, value::Kind};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;

/// Runs each listed `async fn name(engine: Engine)` as two tests, `sqlite::name` and
/// `postgres::name`, on a multi-threaded runtime (the server and the test share it).
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

/// A running catalog on its own database; stopped when dropped.
pub struct TestCatalog {
    pub client: ProductCatalogServiceClient<Channel>,
    pub admin: SocketAddr,
    pub maintenance: Maintenance,
    pub database: TestDatabase,
    shutdown: CancellationToken,
}

impl TestCatalog {
    /// A catalog with default settings on a fresh `engine` database.
    pub async fn spawn(engine: Engine) -> Self {
        Self::spawn_with(engine, |_| {}).await
    }

    /// A catalog whose settings `configure` adjusted.
    pub async fn spawn_with(engine: Engine, configure: impl FnOnce(&mut Settings)) -> Self {
        Self::start(TestDatabase::new(engine).await, configure).await
    }

    /// A catalog with default settings on `database`, which may hold data already.
    pub async fn spawn_on(database: TestDatabase) -> Self {
        Self::start(database, |_| {}).await
    }

    async fn start(database: TestDatabase, configure: impl FnOnce(&mut Settings)) -> Self {
        mall_test_support::init_logging();
        let mut settings = Settings::default();
        settings.server.listen_addr = "127.0.0.1:0".parse().expect("valid address");
        settings.server.admin_addr = "127.0.0.1:0".parse().expect("valid address");
        settings.database.url = database.url().to_owned().into();
        // The concurrency tests open many transactions at once.
        settings.database.max_connections = 16;
        settings.catalog.watch_poll_interval = Duration::from_millis(50);
        configure(&mut settings);
        let app = App::build(settings).await.expect("catalog builds");
        let (addr, admin) = (app.grpc_addr(), app.admin_addr());
        let maintenance = app.maintenance();
        let shutdown = CancellationToken::new();
        tokio::spawn(app.run_until(shutdown.clone().cancelled_owned()));
        wait_until(
            "the catalog is SERVING",
            Duration::from_secs(10),
            || async {
                (probe::health(addr, "").await == Some(ServingStatus::Serving)).then_some(())
            },
        )
        .await;
        let client = ProductCatalogServiceClient::new(probe::channel(addr))
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024);
        Self {
            client,
            admin,
            maintenance,
            database,
            shutdown,
        }
    }

    /// Sends a bulk update and expects it to succeed.
    pub async fn bulk(&self, request: BulkUpdateProductsRequest) -> BulkUpdateProductsResponse {
        self.client
            .clone()
            .bulk_update_products(request)
            .await
            .expect("bulk update succeeds")
            .into_inner()
    }

    /// The stored product, or `None`.
    pub async fn get(&self, code: &str) -> Option<Product> {
        match self
            .client
            .clone()
            .get_product(mall_proto::catalog::v1::GetProductRequest { code: code.into() })
            .await
        {
            Ok(response) => response.into_inner().product,
            Err(status) if status.code() == Code::NotFound => None,
            Err(status) => panic!("get {code} failed: {status}"),
        }
    }
}

impl Drop for TestCatalog {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A valid, complete shoes product at `version`, whose fields mention the version.
pub fn shoe(code: &str, version: u64) -> Product {
    Product {
        code: code.into(),
        product_type: "shoes".into(),
        brand: "Pedala".into(),
        category_path: vec!["women".into(), "shoes".into(), "sneakers".into()],
        status: ProductStatus::OnSale as i32,
        names: [
            ("ko".to_owned(), format!("스니커즈 {code} v{version}")),
            ("en".to_owned(), format!("Sneaker {code} v{version}")),
        ]
        .into(),
        descriptions: [("en".to_owned(), "Light and quick.".to_owned())].into(),
        prices: [
            ("KRW".to_owned(), 89_000 + version as i64),
            ("USD".to_owned(), 6_900),
        ]
        .into(),
        attributes: Some(Struct {
            fields: [
                ("sizes".to_owned(), strings(&["230", "240", "250"])),
                (
                    "heel_height_mm".to_owned(),
                    Value {
                        kind: Some(Kind::NumberValue(30.0)),
                    },
                ),
            ]
            .into(),
        }),
        version,
        ..Product::default()
    }
}

/// A valid bag (another product type).
pub fn bag(code: &str, version: u64) -> Product {
    Product {
        product_type: "bags".into(),
        attributes: None,
        ..shoe(code, version)
    }
}

fn strings(values: &[&str]) -> Value {
    Value {
        kind: Some(Kind::ListValue(prost_types::ListValue {
            values: values
                .iter()
                .map(|v| Value {
                    kind: Some(Kind::StringValue((*v).to_owned())),
                })
                .collect(),
        })),
    }
}

/// A full replacement of each product.
/// What the concurrency tests' overlapping writers send: shoes at `version` for a random
/// half of the codes `S-000`… below `products`, in random order.
pub fn random_half(rng: &mut fastrand::Rng, products: usize, version: u64) -> Vec<Product> {
    let mut codes: Vec<usize> = (0..products).collect();
    rng.shuffle(&mut codes);
    codes.truncate(products / 2);
    codes
        .iter()
        .map(|p| shoe(&format!("S-{p:03}"), version))
        .collect()
}

pub fn bulk_of(product_type: &str, products: Vec<Product>) -> BulkUpdateProductsRequest {
    BulkUpdateProductsRequest {
        request_id: String::new(),
        product_type: product_type.into(),
        updates: products
            .into_iter()
            .map(|product| ProductUpdate {
                product: Some(product),
                update_mask: None,
            })
            .collect(),
    }
}

/// A partial update of `product` writing `paths`.
pub fn partial(product: Product, paths: &[&str]) -> ProductUpdate {
    ProductUpdate {
        product: Some(product),
        update_mask: Some(FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        }),
    }
}

/// The field paths of an INVALID_ARGUMENT's BadRequest.
pub fn violations(status: &Status) -> Vec<String> {
    use tonic_types::StatusExt as _;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}
