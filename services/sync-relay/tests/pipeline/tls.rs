//! The relay and the catalog with mutual TLS on, as deployed: a producer publishes, the relay
//! applies to the catalog as itself, an admin pauses the relay, a reader may do neither.

use std::time::Duration;

use mall_grpc::{authz::identities, tls::ClientTls};
use mall_proto::{
    catalog::v1::{GetProductRequest, product_catalog_service_client::ProductCatalogServiceClient},
    sync::v1::{
        PauseRelayRequest, PublishProductChangesRequest, ResumeRelayRequest,
        sync_relay_service_client::SyncRelayServiceClient,
    },
};
use mall_test_support::{
    TestDatabase,
    certs::{Authority, CertFiles, Validity},
    wait_until,
};
use tokio_util::sync::CancellationToken;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::helpers::change;

fn channel(url: &str, ca: &Authority, who: Option<&CertFiles>) -> Channel {
    let tls = ClientTls::new(ca.ca_file(), who.map(|f| (f.cert.clone(), f.key.clone())));
    mall_grpc::client::lazy_channel(url, Some(&tls), Duration::from_secs(5)).expect("a channel")
}

async fn wait_serving(url: &str, ca: &Authority) {
    wait_until("SERVING over TLS", Duration::from_secs(30), || async {
        let response = HealthClient::new(channel(url, ca, None))
            .check(HealthCheckRequest::default())
            .await
            .ok()?;
        (response.into_inner().status == ServingStatus::Serving as i32).then_some(())
    })
    .await;
}

fn server_tls(ca: &Authority, files: &CertFiles) -> mall_grpc::tls::ServerTls {
    mall_grpc::tls::ServerTls {
        cert_file: files.cert.clone(),
        key_file: files.key.clone(),
        client_ca_file: ca.ca_file().to_owned(),
        reload_interval: Duration::from_secs(10),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_writes_as_itself_and_only_the_admin_pauses_it() {
    mall_test_support::init_logging();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let ca = Authority::new(dir.path(), "mall").expect("a CA");
    let issue = |name: &str, id: &str| {
        ca.issue(name, Some(id), &[], Validity::Current)
            .expect("a certificate")
    };
    let catalog_cert = issue(
        "product-catalog",
        &Authority::spiffe_id("mall-platform", "product-catalog"),
    );
    let relay_cert = issue("sync-relay", identities::SYNC_RELAY);
    let admin = issue("admin", identities::ADMIN);
    let producer = issue("producer", identities::PRODUCT_PRODUCER);
    let reader = issue("reader", &Authority::spiffe_id("shop", "storefront"));
    let shutdown = CancellationToken::new();

    let catalog_db = TestDatabase::sqlite();
    let mut settings = product_catalog::Settings::default();
    settings.server.listen_addr = "127.0.0.1:0".parse().expect("valid");
    settings.server.admin_addr = "127.0.0.1:0".parse().expect("valid");
    settings.server.tls = Some(server_tls(&ca, &catalog_cert));
    settings.database.url = catalog_db.url().to_owned().into();
    let app = product_catalog::App::build(settings)
        .await
        .expect("catalog builds");
    let catalog_url = format!("https://localhost:{}", app.grpc_addr().port());
    tokio::spawn(app.run_until(shutdown.clone().cancelled_owned()));
    wait_serving(&catalog_url, &ca).await;

    let relay_db = TestDatabase::sqlite();
    let mut settings = sync_relay::Settings::default();
    settings.server.listen_addr = "127.0.0.1:0".parse().expect("valid");
    settings.server.admin_addr = "127.0.0.1:0".parse().expect("valid");
    settings.server.tls = Some(server_tls(&ca, &relay_cert));
    settings.database.url = relay_db.url().to_owned().into();
    settings.apply.catalog_url = catalog_url.parse().expect("a url");
    settings.apply.catalog_tls = Some(ClientTls::new(
        ca.ca_file(),
        Some((relay_cert.cert.clone(), relay_cert.key.clone())),
    ));
    settings.apply.receive_wait = Duration::from_millis(200);
    settings.queue.embedded.poll_interval = Duration::from_millis(20);
    settings.relay.control_poll_interval = Duration::from_millis(200);
    let app = sync_relay::App::build(settings)
        .await
        .expect("relay builds");
    let relay_url = format!("https://localhost:{}", app.grpc_addr().port());
    tokio::spawn(app.run_until(shutdown.clone().cancelled_owned()));
    wait_serving(&relay_url, &ca).await;

    // The reader may not publish; the producer may, and the relay applies it as itself.
    let publish = |who: &CertFiles, code: &str| {
        let mut client = SyncRelayServiceClient::new(channel(&relay_url, &ca, Some(who)));
        let request = PublishProductChangesRequest {
            changes: vec![change(code, 3)],
        };
        async move {
            client
                .publish_product_changes(tokio_stream::iter([request]))
                .await
        }
    };
    let status = publish(&reader, "S-0")
        .await
        .expect_err("a reader may not publish");
    assert_eq!(status.code(), Code::PermissionDenied);
    publish(&producer, "S-1")
        .await
        .expect("the producer publishes");
    let mut catalog = ProductCatalogServiceClient::new(channel(&catalog_url, &ca, Some(&reader)));
    wait_until(
        "the relay applied the change over mutual TLS",
        Duration::from_secs(30),
        || {
            let mut catalog = catalog.clone();
            async move {
                let product = catalog
                    .get_product(GetProductRequest { code: "S-1".into() })
                    .await
                    .ok()?
                    .into_inner()
                    .product?;
                (product.version == 3).then_some(())
            }
        },
    )
    .await;
    let status = catalog
        .get_product(GetProductRequest { code: "S-0".into() })
        .await
        .expect_err("the reader's change never got in");
    assert_eq!(status.code(), Code::NotFound);

    // Pausing is the admin's.
    let mut as_reader = SyncRelayServiceClient::new(channel(&relay_url, &ca, Some(&reader)));
    let status = as_reader
        .pause_relay(PauseRelayRequest {
            reason: "not mine to pause".into(),
        })
        .await
        .expect_err("a reader may not pause");
    assert_eq!(status.code(), Code::PermissionDenied);
    let mut as_admin = SyncRelayServiceClient::new(channel(&relay_url, &ca, Some(&admin)));
    let paused = as_admin
        .pause_relay(PauseRelayRequest {
            reason: "catalog upgrade".into(),
        })
        .await
        .expect("the admin pauses")
        .into_inner()
        .status
        .expect("a status");
    assert!(paused.paused);
    as_admin
        .resume_relay(ResumeRelayRequest {})
        .await
        .expect("the admin resumes");
    shutdown.cancel();
}
