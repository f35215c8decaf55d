//! Helpers for the workspace's integration tests.
//!
//! - [`TestDatabase`]: a fresh, isolated database per test, SQLite or PostgreSQL.
//! - [`wait_until`]: poll a condition with a deadline instead of sleeping a fixed time.
//! - [`init_logging`]: tests are silent unless `TEST_LOG=1`.
//! - [`probe`]: what a client sees of a running server: health, reflection, `/metrics`.
//! - [`process`]: a service binary run as a child process, for signal and start-up tests.
//! - [`sqs_endpoint`]: the LocalStack (SQS) endpoint for queue tests.
//! - [`bench`]: the benchmarks' sample product and BENCHMARKS.md sections.
//! - [`capture`]: everything a process logs, kept for tests that search it.
//! - [`certs`]: a local CA and certificates for the mutual TLS tests and `scripts/certs.sh`.
//! - [`kinesalite`]: the local Kinesis and a fresh stream on it; [`shoe_change`]: a valid
//!   product change, as a producer writes it.
//! - [`otlp`]: an OTLP trace receiver, for tests of whole span trees.
//!
//! PostgreSQL comes from `MALL_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`), which `scripts/test.sh` provides. When it is
//! unreachable the test fails with a message that says how to start it: tests are never
//! silently skipped.

pub mod bench;
pub mod capture;
pub mod certs;
pub mod kinesalite;
pub mod otlp;
pub mod probe;
pub mod process;

use std::{future::Future, time::Duration};

use sea_orm::{ConnectionTrait as _, Database};

/// Default server for PostgreSQL tests: the local cluster `scripts/test.sh` checks or starts.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Prefix of the per-test databases, so `scripts/test.sh` can drop leftovers.
pub const DATABASE_PREFIX: &str = "mall_test_";

/// Which engine a test database runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// A temporary SQLite file.
    Sqlite,
    /// A fresh database on the test PostgreSQL server.
    Postgres,
}

/// A database that only one test uses.
#[derive(Debug)]
pub struct TestDatabase {
    url: String,
    engine: Engine,
    // Keeps the SQLite file alive (and removes it) for the test's lifetime.
    _dir: Option<tempfile::TempDir>,
}

impl TestDatabase {
    /// A fresh database on `engine`.
    pub async fn new(engine: Engine) -> Self {
        match engine {
            Engine::Sqlite => Self::sqlite(),
            Engine::Postgres => Self::postgres().await,
        }
    }

    /// A fresh SQLite file in a temporary directory.
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory can be created");
        let url = format!("sqlite://{}/test.sqlite", dir.path().display());
        Self {
            url,
            engine: Engine::Sqlite,
            _dir: Some(dir),
        }
    }

    /// A freshly created database on the test PostgreSQL server.
    ///
    /// # Panics
    /// When the server is unreachable, with instructions to start it.
    pub async fn postgres() -> Self {
        let server = postgres_server_url();
        let admin = Database::connect(server.as_str())
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "PostgreSQL is not reachable at {server} ({error}). Run the tests with \
                 scripts/test.sh, which starts it, or start a server and set \
                 MALL_TEST_POSTGRES_URL to a URL whose user may CREATE DATABASE"
                )
            });
        let name = format!("{DATABASE_PREFIX}{}", uuid::Uuid::new_v4().simple());
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|error| panic!("failed to create test database {name}: {error}"));
        admin.close().await.ok();
        let base = server
            .rsplit_once('/')
            .map_or(server.as_str(), |(base, _)| base);
        Self {
            url: format!("{base}/{name}"),
            engine: Engine::Postgres,
            _dir: None,
        }
    }

    /// The connection URL, for a service's `database.url`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The engine behind it.
    pub fn engine(&self) -> Engine {
        self.engine
    }
}

fn postgres_server_url() -> String {
    std::env::var("MALL_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned())
}

/// Default SQS endpoint for tests: the LocalStack `scripts/test.sh` starts.
pub const DEFAULT_SQS_ENDPOINT: &str = "http://127.0.0.1:4566";

/// The SQS endpoint for tests: `MALL_TEST_SQS_ENDPOINT`, default [`DEFAULT_SQS_ENDPOINT`].
///
/// # Panics
/// When nothing accepts connections there, with instructions to start LocalStack.
pub async fn sqs_endpoint() -> String {
    let endpoint =
        std::env::var("MALL_TEST_SQS_ENDPOINT").unwrap_or_else(|_| DEFAULT_SQS_ENDPOINT.to_owned());
    let authority = endpoint
        .split_once("://")
        .map_or(endpoint.as_str(), |(_, rest)| rest)
        .trim_end_matches('/')
        .to_owned();
    let reachable = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(authority.as_str()),
    )
    .await;
    if !matches!(reachable, Ok(Ok(_))) {
        panic!(
            "LocalStack (SQS) is not reachable at {endpoint}. Run the tests with scripts/test.sh, \
             which installs and starts it, or start it with 'scripts/localstack.sh start' (and set \
             MALL_TEST_SQS_ENDPOINT when it listens elsewhere)"
        );
    }
    endpoint
}

/// Polls `condition` every 20 ms until it returns `Some`, and returns that value.
///
/// # Panics
/// When `timeout` passes first, naming `what` was awaited.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Installs a test log subscriber when `TEST_LOG=1`; otherwise tests stay silent.
pub fn init_logging() {
    if std::env::var_os("TEST_LOG").is_some_and(|v| v == "1") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new(
                        "debug,sqlx=warn,h2=info,hyper=info,tower=info",
                    )
                }),
            )
            .with_test_writer()
            .try_init();
    }
}

/// A valid full-replacement change of shoe `code` at `version` (its name and price differ by
/// version), as a producer writes it to the stream or PublishProductChanges.
pub fn shoe_change(code: &str, version: u64) -> mall_proto::sync::v1::ProductChange {
    use mall_proto::catalog::v1::{Product, ProductStatus};
    mall_proto::sync::v1::ProductChange {
        product_code: code.into(),
        product_type: "shoes".into(),
        version,
        product: Some(Product {
            code: code.into(),
            product_type: "shoes".into(),
            brand: "Pedala".into(),
            status: ProductStatus::OnSale as i32,
            names: [("ko".to_owned(), format!("운동화 {code} v{version}"))].into(),
            prices: [(
                "KRW".to_owned(),
                79_000 + i64::try_from(version).unwrap_or(i64::MAX - 79_000),
            )]
            .into(),
            version,
            ..Product::default()
        }),
        ..mall_proto::sync::v1::ProductChange::default()
    }
}
