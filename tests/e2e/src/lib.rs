//! The four services started as processes, wired as in production (the relay reads a Kinesis
//! stream on kinesalite and applies to the catalog; member-export delivers to a webhook
//! receiver that records what it got), for the end-to-end tests in `tests/`.
//!
//! The binaries are the workspace's debug builds next to the test executable
//! (`target/debug/`), which `cargo nextest run --workspace` (the test command) builds.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use aws_sdk_kinesis::{
    config::{Credentials, Region},
    primitives::Blob,
};
use mall_proto::{
    catalog::v1::{GetProductRequest, product_catalog_service_client::ProductCatalogServiceClient},
    sync::v1::ProductChange,
};
use mall_test_support::process::{Listening, ServiceProcess};

/// How long a service may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A service binary built by the workspace.
///
/// # Panics
/// When it has not been built, saying how to build it.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    // target/debug/deps/<test> → target/debug/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run the tests with `cargo nextest run --workspace` (scripts/test.sh \
         does), or `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// One running service.
#[derive(Debug)]
pub struct Running {
    /// Its process.
    pub process: ServiceProcess,
    /// Where it listens.
    pub listening: Listening,
}

impl Running {
    async fn start(name: &str, prefix: &str, env: &[(&str, &str)]) -> Self {
        let path = binary(name);
        let mut process = ServiceProcess::start(path.to_str().expect("utf-8 path"), prefix, env);
        let listening = process.wait_until_serving(START_TIMEOUT).await;
        process.drain_output(name);
        Self { process, listening }
    }
}

/// What the partner's webhook receiver got: each request's `traceparent` header.
#[derive(Debug, Clone, Default)]
pub struct PartnerRequests(Arc<Mutex<Vec<Option<String>>>>);

impl PartnerRequests {
    /// The `traceparent` of every request so far (`None` for a request without one).
    pub fn traceparents(&self) -> Vec<Option<String>> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The four services, a Kinesis stream and a partner receiver.
#[derive(Debug)]
pub struct Platform {
    /// product-catalog.
    pub catalog: Running,
    /// sync-relay, reading [`Platform::stream`].
    pub relay: Running,
    /// member-export, delivering to the receiver behind [`Platform::partner`].
    pub members: Running,
    /// log-ingest.
    pub logs: Running,
    /// Requests member-export made to the partner.
    pub partner: PartnerRequests,
    /// The relay's stream.
    pub stream: String,
    kinesis: aws_sdk_kinesis::Client,
    _partner_server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Platform {
    /// Starts everything; spans go to `otlp_endpoint` when given.
    ///
    /// # Panics
    /// When kinesalite is not reachable (saying how to start it) or a service does not start.
    pub async fn start(otlp_endpoint: Option<&str>) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let db = |name: &str| format!("sqlite://{}/{name}.sqlite", dir.path().display());
        let (partner, partner_addr, partner_server) = start_partner().await;
        let kinesis_endpoint = mall_test_support::kinesalite::endpoint();
        let stream = format!("e2e-{:016x}", fastrand::u64(..));
        let kinesis = kinesis_client(&kinesis_endpoint);
        mall_test_support::kinesalite::create_stream(&kinesis, &stream, 1).await;

        let telemetry = |prefix: &str| -> Vec<(String, String)> {
            let mut env = vec![(
                format!("{prefix}__TELEMETRY__LOG_FILTER"),
                "info".to_owned(),
            )];
            if let Some(endpoint) = otlp_endpoint {
                env.push((
                    format!("{prefix}__TELEMETRY__OTLP_ENDPOINT"),
                    endpoint.to_owned(),
                ));
                // Export spans within a tenth of a second rather than every five.
                env.push(("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()));
            }
            env
        };
        let start = |name: &'static str, prefix: &'static str, mut env: Vec<(String, String)>| {
            env.extend(telemetry(prefix));
            async move {
                let env: Vec<(&str, &str)> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                Running::start(name, prefix, &env).await
            }
        };
        let pairs = |list: &[(&str, String)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect()
        };

        let catalog = start(
            "product-catalog",
            "PRODUCT_CATALOG",
            pairs(&[("PRODUCT_CATALOG__DATABASE__URL", db("catalog"))]),
        )
        .await;
        let relay = start(
            "sync-relay",
            "SYNC_RELAY",
            pairs(&[
                ("SYNC_RELAY__DATABASE__URL", db("relay")),
                (
                    "SYNC_RELAY__APPLY__CATALOG_URL",
                    format!("http://{}", catalog.listening.grpc_addr),
                ),
                ("SYNC_RELAY__SOURCE__KIND", "kinesis".into()),
                ("SYNC_RELAY__SOURCE__REPLICA_ID", "e2e".into()),
                ("SYNC_RELAY__SOURCE__KINESIS__STREAM_NAME", stream.clone()),
                (
                    "SYNC_RELAY__SOURCE__KINESIS__ENDPOINT_URL",
                    kinesis_endpoint.clone(),
                ),
                ("SYNC_RELAY__SOURCE__KINESIS__REGION", "us-east-1".into()),
                ("SYNC_RELAY__SOURCE__KINESIS__ACCESS_KEY_ID", "test".into()),
                (
                    "SYNC_RELAY__SOURCE__KINESIS__SECRET_ACCESS_KEY",
                    "test".into(),
                ),
                ("SYNC_RELAY__SOURCE__KINESIS__LEASE_DURATION", "3s".into()),
                (
                    "SYNC_RELAY__SOURCE__KINESIS__LEASE_RENEW_INTERVAL",
                    "300ms".into(),
                ),
                (
                    "SYNC_RELAY__SOURCE__KINESIS__IDLE_POLL_INTERVAL",
                    "200ms".into(),
                ),
            ]),
        )
        .await;
        let members = start(
            "member-export",
            "MEMBER_EXPORT",
            pairs(&[
                ("MEMBER_EXPORT__DATABASE__URL", db("members")),
                ("MEMBER_EXPORT__PARTNER__KIND", "webhook".into()),
                (
                    "MEMBER_EXPORT__PARTNER__URL",
                    format!("http://{partner_addr}/webhook"),
                ),
                (
                    "MEMBER_EXPORT__PARTNER__SECRET",
                    "whsec_bG9jYWwtd2ViaG9vay1zaWduaW5nLWtleQ==".into(),
                ),
            ]),
        )
        .await;
        let logs = start(
            "log-ingest",
            "LOG_INGEST",
            pairs(&[
                (
                    "LOG_INGEST__BUFFER__DIR",
                    dir.path().join("buffer").display().to_string(),
                ),
                ("LOG_INGEST__FORWARD__LISTEN_ADDR", "127.0.0.1:0".into()),
                // Nothing listens there: records wait in the buffer.
                ("LOG_INGEST__LOKI__URL", "http://127.0.0.1:9".into()),
            ]),
        )
        .await;
        Self {
            catalog,
            relay,
            members,
            logs,
            partner,
            stream,
            kinesis,
            _partner_server: partner_server,
            _dir: dir,
        }
    }

    /// The admin addresses of the services, by service name.
    pub fn admin_addrs(&self) -> [(&'static str, SocketAddr); 4] {
        [
            ("product-catalog", self.catalog.listening.admin_addr),
            ("sync-relay", self.relay.listening.admin_addr),
            ("member-export", self.members.listening.admin_addr),
            ("log-ingest", self.logs.listening.admin_addr),
        ]
    }

    /// Puts `change` on the relay's stream, keyed by its product code, as a producer does.
    ///
    /// # Panics
    /// When Kinesis refuses it.
    pub async fn put_change(&self, change: &ProductChange) {
        use prost::Message as _;
        self.kinesis
            .put_record()
            .stream_name(&self.stream)
            .partition_key(&change.product_code)
            .data(Blob::new(change.encode_to_vec()))
            .send()
            .await
            .expect("the record is put");
    }

    /// Waits until the catalog serves `code` at `version`.
    ///
    /// # Panics
    /// When it does not within a minute.
    pub async fn wait_for_product(&self, code: &str, version: u64) {
        let channel = mall_test_support::probe::channel(self.catalog.listening.grpc_addr);
        let client = ProductCatalogServiceClient::new(channel);
        mall_test_support::wait_until(
            &format!("the catalog serves {code} at version {version}"),
            Duration::from_secs(60),
            || {
                let mut client = client.clone();
                async move {
                    let product = client
                        .get_product(GetProductRequest { code: code.into() })
                        .await
                        .ok()?
                        .into_inner()
                        .product?;
                    (product.version == version).then_some(())
                }
            },
        )
        .await;
    }

    /// SIGTERM to every service and waits for each to exit (spans are flushed at exit).
    pub async fn stop(&mut self) {
        for running in [
            &mut self.relay,
            &mut self.members,
            &mut self.logs,
            &mut self.catalog,
        ] {
            running.process.terminate().await;
            let status = running.process.wait_for_exit(Duration::from_secs(30)).await;
            assert!(status.success(), "a service exits 0 on SIGTERM: {status}");
        }
    }
}

fn kinesis_client(endpoint: &str) -> aws_sdk_kinesis::Client {
    let config = aws_sdk_kinesis::Config::builder()
        .endpoint_url(endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "e2e"))
        .behavior_version(aws_sdk_kinesis::config::BehaviorVersion::latest())
        .build();
    aws_sdk_kinesis::Client::from_conf(config)
}

/// A webhook receiver that accepts everything and records each request's `traceparent`.
async fn start_partner() -> (PartnerRequests, SocketAddr, tokio::task::JoinHandle<()>) {
    let requests = PartnerRequests::default();
    let recorded = requests.clone();
    let app = axum::Router::new().route(
        "/webhook",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let recorded = recorded.clone();
            async move {
                let traceparent = headers
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                recorded
                    .0
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(traceparent);
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port");
    let addr = listener.local_addr().expect("bound");
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (requests, addr, server)
}
