//! Mutual TLS and the per-method policy, with real certificates from a test CA: who may read,
//! who may write, what strangers get, and certificate rotation under load. The TLS layer does
//! not depend on the database engine, so these run on SQLite only.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use mall_grpc::{
    authz::identities,
    tls::{ClientTls, ServerTls},
};
use mall_proto::catalog::v1::{
    GetProductRequest, ListPendingProductsRequest,
    product_catalog_service_client::ProductCatalogServiceClient,
};
use mall_test_support::{
    TestDatabase,
    certs::{Authority, CertFiles, Validity},
    probe, wait_until,
};
use product_catalog::{App, Settings};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_types::StatusExt as _;

use crate::helpers::{bulk_of, shoe};

/// The certificates of one test: the catalog's CA and its callers, and a stranger CA.
struct Pki {
    _dir: tempfile::TempDir,
    ca: Authority,
    server: CertFiles,
    reader: CertFiles,
    relay: CertFiles,
    admin: CertFiles,
    expired_relay: CertFiles,
    rogue_relay: CertFiles,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let ca = Authority::new(dir.path(), "mall").expect("a CA");
        let rogue = Authority::new(dir.path(), "rogue").expect("another CA");
        let issue = |ca: &Authority, name: &str, id: &str, validity| {
            ca.issue(name, Some(id), &[], validity)
                .expect("a certificate")
        };
        let server = issue(
            &ca,
            "product-catalog",
            &Authority::spiffe_id("mall-platform", "product-catalog"),
            Validity::Current,
        );
        Self {
            reader: issue(
                &ca,
                "storefront",
                &Authority::spiffe_id("shop", "storefront"),
                Validity::Current,
            ),
            relay: issue(&ca, "sync-relay", identities::SYNC_RELAY, Validity::Current),
            admin: issue(&ca, "admin", identities::ADMIN, Validity::Current),
            expired_relay: issue(&ca, "expired", identities::SYNC_RELAY, Validity::Expired),
            rogue_relay: issue(&rogue, "rogue", identities::SYNC_RELAY, Validity::Current),
            server,
            ca,
            _dir: dir,
        }
    }

    fn server_tls(&self) -> ServerTls {
        ServerTls {
            cert_file: self.server.cert.clone(),
            key_file: self.server.key.clone(),
            client_ca_file: self.ca.ca_file().to_owned(),
            reload_interval: Duration::from_millis(100),
        }
    }

    fn client_tls(&self, who: Option<&CertFiles>) -> ClientTls {
        ClientTls::new(
            self.ca.ca_file(),
            who.map(|files| (files.cert.clone(), files.key.clone())),
        )
    }
}

struct Catalog {
    url: String,
    /// The admin gRPC listener's URL, when configured.
    admin_url: Option<String>,
    admin: std::net::SocketAddr,
    shutdown: CancellationToken,
    _database: TestDatabase,
}

impl Drop for Catalog {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(pki: &Pki, configure: impl FnOnce(&mut Settings)) -> Catalog {
    mall_test_support::init_logging();
    let database = TestDatabase::sqlite();
    let mut settings = Settings::default();
    settings.server.listen_addr = "127.0.0.1:0".parse().expect("valid address");
    settings.server.admin_addr = "127.0.0.1:0".parse().expect("valid address");
    settings.server.tls = Some(pki.server_tls());
    settings.database.url = database.url().to_owned().into();
    configure(&mut settings);
    let app = App::build(settings).await.expect("the catalog builds");
    let url = format!("https://localhost:{}", app.grpc_addr().port());
    let admin_url = app
        .admin_grpc_addr()
        .map(|addr| format!("https://localhost:{}", addr.port()));
    let admin = app.admin_addr();
    let shutdown = CancellationToken::new();
    tokio::spawn(app.run_until(shutdown.clone().cancelled_owned()));
    let catalog = Catalog {
        url,
        admin_url,
        admin,
        shutdown,
        _database: database,
    };
    // Health needs no client certificate.
    let anonymous = pki.client_tls(None);
    wait_until(
        "the catalog is SERVING over TLS",
        Duration::from_secs(10),
        || async {
            (health(&catalog.url, &anonymous).await == Some(ServingStatus::Serving)).then_some(())
        },
    )
    .await;
    catalog
}

async fn channel(url: &str, tls: &ClientTls) -> Channel {
    mall_grpc::client::lazy_channel(url, Some(tls), Duration::from_secs(5)).expect("a channel")
}

async fn client(url: &str, tls: &ClientTls) -> ProductCatalogServiceClient<Channel> {
    ProductCatalogServiceClient::new(channel(url, tls).await)
}

async fn health(url: &str, tls: &ClientTls) -> Option<ServingStatus> {
    let response = HealthClient::new(channel(url, tls).await)
        .check(HealthCheckRequest::default())
        .await
        .ok()?;
    ServingStatus::try_from(response.into_inner().status).ok()
}

async fn get(client: &mut ProductCatalogServiceClient<Channel>) -> Result<(), Status> {
    match client
        .get_product(GetProductRequest { code: "P-1".into() })
        .await
    {
        Ok(_) => Ok(()),
        Err(status) if status.code() == Code::NotFound => Ok(()),
        Err(status) => Err(status),
    }
}

fn assert_refused(status: &Status, code: Code, reason: &str, method: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    let info = status
        .get_error_details()
        .error_info()
        .cloned()
        .expect("a refusal carries ErrorInfo");
    assert_eq!(info.reason, reason);
    assert_eq!(
        info.metadata.get("method").map(String::as_str),
        Some(method)
    );
    // Nothing about the policy: no identities, no rules.
    assert!(!status.message().contains("spiffe"), "{status:?}");
    assert!(!format!("{info:?}").contains("spiffe"), "{info:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_caller_gets_what_the_policy_gives_it() {
    let pki = Pki::new();
    let catalog = start(&pki, |_| {}).await;
    let get_method = "mall.catalog.v1.ProductCatalogService/GetProduct";
    let bulk_method = "mall.catalog.v1.ProductCatalogService/BulkUpdateProducts";

    // No certificate: health only.
    let mut anonymous = client(&catalog.url, &pki.client_tls(None)).await;
    let status = get(&mut anonymous).await.expect_err("no certificate");
    assert_refused(
        &status,
        Code::Unauthenticated,
        "CLIENT_CERTIFICATE_REQUIRED",
        get_method,
    );

    // A reader reads, and may not write.
    let mut reader = client(&catalog.url, &pki.client_tls(Some(&pki.reader))).await;
    get(&mut reader)
        .await
        .expect("any authenticated caller reads");
    let status = reader
        .bulk_update_products(bulk_of("shoes", vec![shoe("P-1", 1)]))
        .await
        .expect_err("a reader may not write");
    assert_refused(
        &status,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
        bulk_method,
    );

    // The relay writes; the write really happened.
    let mut relay = client(&catalog.url, &pki.client_tls(Some(&pki.relay))).await;
    let response = relay
        .bulk_update_products(bulk_of("shoes", vec![shoe("P-1", 1)]))
        .await
        .expect("the relay writes")
        .into_inner();
    assert_eq!(response.results.len(), 1);
    let product = reader
        .get_product(GetProductRequest { code: "P-1".into() })
        .await
        .expect("the reader sees the write")
        .into_inner()
        .product
        .expect("a product");
    assert_eq!(product.version, 1);

    // A method no rule lists is for the admin only.
    let status = relay
        .list_pending_products(ListPendingProductsRequest::default())
        .await
        .expect_err("not the relay's");
    assert_eq!(status.code(), Code::PermissionDenied);
    let mut admin = client(&catalog.url, &pki.client_tls(Some(&pki.admin))).await;
    admin
        .list_pending_products(ListPendingProductsRequest::default())
        .await
        .expect("the admin may call everything");

    // Certificates from another CA, or expired ones, fail the handshake itself.
    for (who, files) in [
        ("another CA", &pki.rogue_relay),
        ("expired", &pki.expired_relay),
    ] {
        let tls = ClientTls::new(
            pki.ca.ca_file(),
            Some((files.cert.clone(), files.key.clone())),
        );
        let mut stranger = client(&catalog.url, &tls).await;
        let status = stranger
            .bulk_update_products(bulk_of("shoes", vec![shoe("P-2", 1)]))
            .await
            .expect_err(who);
        assert_eq!(status.code(), Code::Unavailable, "{who}: {status:?}");
    }
    // And nothing was written by them.
    let status = reader
        .get_product(GetProductRequest { code: "P-2".into() })
        .await
        .expect_err("P-2 was never written");
    assert_eq!(status.code(), Code::NotFound);

    // A plaintext client cannot talk to a TLS listener at all.
    let plain_url = catalog.url.replace("https://localhost", "http://127.0.0.1");
    let mut plain = ProductCatalogServiceClient::new(
        mall_grpc::client::lazy_channel(&plain_url, None, Duration::from_secs(5)).expect("channel"),
    );
    assert!(get(&mut plain).await.is_err(), "plaintext is not served");

    // Reflection: authenticated callers only.
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            channel(&catalog.url, &pki.client_tls(None)).await,
        );
    let list = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let status = reflection
        .server_reflection_info(tokio_stream::iter([list.clone()]))
        .await
        .expect_err("reflection needs a certificate");
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            channel(&catalog.url, &pki.client_tls(Some(&pki.reader))).await,
        );
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([list]))
        .await
        .expect("a reader may use reflection")
        .into_inner();
    assert!(answers.message().await.expect("an answer").is_some());

    // Decisions are counted by method, caller (named in the policy, else other) and outcome.
    let (_, metrics) = probe::http_get(catalog.admin, "/metrics").await;
    for expected in [
        format!(r#"caller="none",method="/{get_method}",outcome="unauthenticated""#),
        format!(r#"caller="other",method="/{get_method}",outcome="allowed""#),
        format!(r#"caller="other",method="/{bulk_method}",outcome="permission_denied""#),
        format!(
            r#"caller="{}",method="/{bulk_method}",outcome="allowed""#,
            identities::SYNC_RELAY
        ),
    ] {
        assert!(
            metrics.contains(&format!(
                "mall_product_catalog_grpc_authz_decisions_total{{{expected}}}"
            )),
            "{expected} in\n{metrics}"
        );
    }
    assert!(
        metrics.contains(
            r#"mall_product_catalog_grpc_tls_handshake_failures_total{reason="error"} 3"#
        ),
        "two strangers and the plaintext client failed the handshake:\n{metrics}"
    );
    // The reader's identity is not named by the policy, so it is not a label value.
    assert!(!metrics.contains("storefront"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_beyond_loopback_needs_insecure_on_purpose() {
    let database = TestDatabase::sqlite();
    let mut settings = Settings::default();
    settings.server.listen_addr = "0.0.0.0:0".parse().expect("valid address");
    settings.server.admin_addr = "127.0.0.1:0".parse().expect("valid address");
    settings.database.url = database.url().to_owned().into();
    let Err(error) = App::build(settings.clone()).await else {
        panic!("plaintext on 0.0.0.0 is refused");
    };
    let error = format!("{error:#}");
    assert!(
        error.contains("server.insecure") && error.contains("[server.tls]"),
        "{error}"
    );
    settings.server.insecure = true;
    let app = App::build(settings).await.expect("insecure = true starts");
    drop(app);
}

/// Replaces a certificate and key as a rotation does: each file swapped in with a rename.
fn rotate(ca: &Authority, name: &str, id: &str, into: &CertFiles) -> Vec<u8> {
    let fresh = ca
        .issue(&format!("{name}-next"), Some(id), &[], Validity::Current)
        .expect("a certificate");
    std::fs::rename(&fresh.key, &into.key).expect("key swapped");
    std::fs::rename(&fresh.cert, &into.cert).expect("certificate swapped");
    std::fs::read(&into.cert).expect("the new certificate")
}

/// The certificate the server presents to a new connection now.
async fn presented_certificate(url: &str, ca: &Path) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject as _;
    let port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).expect("a CA file") {
        roots
            .add(cert.expect("a certificate"))
            .expect("a usable CA");
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connects");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").expect("a name"),
            tcp,
        )
        .await
        .expect("handshake");
    tls.get_ref().1.peer_certificates().expect("a chain")[0].to_vec()
}

fn pem_to_der(pem: &[u8]) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::CertificateDer::from_pem_slice(pem)
        .expect("a PEM certificate")
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_call() {
    let pki = Pki::new();
    let catalog = start(&pki, |_| {}).await;
    let before = presented_certificate(&catalog.url, pki.ca.ca_file()).await;
    assert_eq!(
        before,
        pem_to_der(&std::fs::read(&pki.server.cert).expect("cert"))
    );

    // Readers on long-lived channels, and a caller that opens a new connection per call, all
    // calling while the server's and the relay's certificates are replaced.
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for fresh_connections in [false, false, true] {
        let (url, tls) = (catalog.url.clone(), pki.client_tls(Some(&pki.relay)));
        let (stop, calls) = (stop.clone(), calls.clone());
        workers.push(tokio::spawn(async move {
            let mut caller = client(&url, &tls).await;
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if fresh_connections {
                    caller = client(&url, &tls).await;
                }
                if let Err(status) = get(&mut caller).await {
                    failures.push(status);
                }
                calls.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let server_id = Authority::spiffe_id("mall-platform", "product-catalog");
    let rotated = rotate(&pki.ca, "product-catalog", &server_id, &pki.server);
    rotate(&pki.ca, "sync-relay", identities::SYNC_RELAY, &pki.relay);
    wait_until(
        "new connections get the rotated certificate",
        Duration::from_secs(10),
        || async {
            (presented_certificate(&catalog.url, pki.ca.ca_file()).await == pem_to_der(&rotated))
                .then_some(())
        },
    )
    .await;
    // Calls go on for a while on the new certificates.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for worker in workers {
        failures.extend(worker.await.expect("a worker joins"));
    }
    assert!(
        calls.load(Ordering::Relaxed) > 50,
        "the callers kept calling"
    );
    assert!(
        failures.is_empty(),
        "no call failed across the rotation: {failures:?}"
    );
}

/// A TLS connection as `who`, opened by hand (no HTTP/2 on top).
async fn raw_tls(
    url: &str,
    pki: &Pki,
    who: &CertFiles,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls_pki_types::pem::PemObject as _;
    let port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(pki.ca.ca_file()).expect("a CA") {
        roots.add(cert.expect("a certificate")).expect("usable");
    }
    let chain = rustls_pki_types::CertificateDer::pem_file_iter(&who.cert)
        .expect("a certificate")
        .collect::<Result<Vec<_>, _>>()
        .expect("PEM");
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&who.key).expect("a key");
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("a client config");
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connects");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").expect("a name"),
            tcp,
        )
        .await
        .expect("handshake")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_do_not_stop_a_normal_caller() {
    use tokio::io::AsyncWriteExt as _;
    let pki = Pki::new();
    let flooder = pki
        .ca
        .issue(
            "flooder",
            Some(&Authority::spiffe_id("shop", "flooder")),
            &[],
            Validity::Current,
        )
        .expect("a certificate");
    let catalog = start(&pki, |settings| {
        settings.server.handshake_timeout = Duration::from_millis(500);
        settings.server.per_caller_concurrency = 4;
    })
    .await;
    let port: u16 = catalog
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port");
    let stop = Arc::new(AtomicBool::new(false));

    // 200 connections that open TCP and never start the TLS handshake.
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connects"),
        );
    }
    // Connections that finish TLS, then send HTTP/2 a byte at a time and never a whole request.
    let mut trickles = Vec::new();
    for _ in 0..10 {
        let mut conn = raw_tls(&catalog.url, &pki, &flooder).await;
        let stop = stop.clone();
        trickles.push(tokio::spawn(async move {
            for byte in b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".iter().cycle() {
                if stop.load(Ordering::Relaxed) || conn.write_all(&[*byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    // Oversized metadata: refused by HTTP/2 itself, the server goes on.
    let mut big = client(&catalog.url, &pki.client_tls(Some(&flooder))).await;
    let mut request = tonic::Request::new(GetProductRequest { code: "P-1".into() });
    request
        .metadata_mut()
        .insert("x-padding", "x".repeat(200 * 1024).parse().expect("ascii"));
    assert!(
        big.get_product(request).await.is_err(),
        "oversized metadata is refused"
    );
    // One caller flooding with 32 calls at a time; its 4 allowed in flight get through.
    let limited = Arc::new(AtomicU64::new(0));
    let mut flood = Vec::new();
    for _ in 0..32 {
        let (url, tls) = (catalog.url.clone(), pki.client_tls(Some(&flooder)));
        let (stop, limited) = (stop.clone(), limited.clone());
        flood.push(tokio::spawn(async move {
            let mut caller = client(&url, &tls).await;
            while !stop.load(Ordering::Relaxed) {
                if let Err(status) = get(&mut caller).await
                    && status.code() == Code::ResourceExhausted
                {
                    limited.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    // Meanwhile a normal caller: every call succeeds, within a generous deadline.
    let mut reader = client(&catalog.url, &pki.client_tls(Some(&pki.reader))).await;
    let mut latencies = Vec::new();
    for _ in 0..200 {
        let started = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(5), get(&mut reader))
            .await
            .expect("answered within 5 s")
            .expect("succeeds");
        latencies.push(started.elapsed());
    }
    latencies.sort();
    eprintln!(
        "normal caller under attack: p50 {:?}, p99 {:?}",
        latencies[100], latencies[197]
    );
    // And a new caller can still connect and call.
    let mut newcomer = client(&catalog.url, &pki.client_tls(Some(&pki.admin))).await;
    get(&mut newcomer)
        .await
        .expect("a new connection is served");

    stop.store(true, Ordering::Relaxed);
    for task in flood.into_iter().chain(trickles) {
        task.await.expect("joins");
    }
    assert!(
        limited.load(Ordering::Relaxed) > 0,
        "the flooding caller met its own limit"
    );
    // The silent connections were closed at the handshake deadline.
    let (_, metrics) = probe::http_get(catalog.admin, "/metrics").await;
    let timeouts: u64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                r#"mall_product_catalog_grpc_tls_handshake_failures_total{reason="timeout"} "#,
            )
        })
        .and_then(|v| v.trim().parse().ok())
        .expect("the timeout counter");
    assert!(
        timeouts >= 200,
        "{timeouts} handshakes timed out:\n{metrics}"
    );
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_admin_listener_admin_methods_are_served_there_only() {
    let pki = Pki::new();
    let catalog = start(&pki, |settings| {
        settings.server.admin_grpc_addr = Some("127.0.0.1:0".parse().expect("an address"));
    })
    .await;
    let admin_url = catalog.admin_url.clone().expect("an admin listener");
    let admin_tls = pki.client_tls(Some(&pki.admin));
    // On the main listener even the admin is sent to the admin listener.
    let status = client(&catalog.url, &admin_tls)
        .await
        .list_pending_products(ListPendingProductsRequest::default())
        .await
        .expect_err("not on the main listener");
    assert_refused(
        &status,
        Code::PermissionDenied,
        "ADMIN_LISTENER_ONLY",
        "mall.catalog.v1.ProductCatalogService/ListPendingProducts",
    );
    // There it is served, to the admin only; other methods are served on both.
    client(&admin_url, &admin_tls)
        .await
        .list_pending_products(ListPendingProductsRequest::default())
        .await
        .expect("the admin listener serves it");
    let reader_tls = pki.client_tls(Some(&pki.reader));
    let status = client(&admin_url, &reader_tls)
        .await
        .list_pending_products(ListPendingProductsRequest::default())
        .await
        .expect_err("still the admin's");
    assert_eq!(status.code(), Code::PermissionDenied);
    get(&mut client(&catalog.url, &reader_tls).await)
        .await
        .expect("reads on the main listener");
    get(&mut client(&admin_url, &reader_tls).await)
        .await
        .expect("and on the admin listener");
    // Callers the policy does not allow get the policy's answer on the main listener, not a
    // hint that the method exists elsewhere.
    let status = client(&catalog.url, &reader_tls)
        .await
        .list_pending_products(ListPendingProductsRequest::default())
        .await
        .expect_err("a reader");
    assert_refused(
        &status,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
        "mall.catalog.v1.ProductCatalogService/ListPendingProducts",
    );
    let status = client(&catalog.url, &pki.client_tls(None))
        .await
        .list_pending_products(ListPendingProductsRequest::default())
        .await
        .expect_err("no certificate");
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_open_streams_count_against_its_limit_until_they_end() {
    let pki = Pki::new();
    let catalog = start(&pki, |settings| {
        settings.server.per_caller_concurrency = 2;
    })
    .await;
    let mut reader = client(&catalog.url, &pki.client_tls(Some(&pki.reader))).await;
    let watch = || {
        let mut reader = reader.clone();
        async move {
            reader
                .watch_product_changes(
                    mall_proto::catalog::v1::WatchProductChangesRequest::default(),
                )
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let first = watch().await.expect("a first stream");
    let second = watch().await.expect("a second stream");
    // Two streams open: a third call of any kind is over the limit.
    let status = get(&mut reader).await.expect_err("over the limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // With RetryInfo: load, to be retried (OTLP exporters drop it without).
    let details = tonic_types::StatusExt::get_error_details(&status);
    assert_eq!(
        details.retry_info().and_then(|r| r.retry_delay),
        Some(Duration::from_secs(1)),
        "{status:?}"
    );
    // Another caller is not affected.
    get(&mut client(&catalog.url, &pki.client_tls(Some(&pki.admin))).await)
        .await
        .expect("another caller");
    // A stream that ends gives its slot back.
    drop(first);
    wait_until(
        "the ended stream's slot is free",
        Duration::from_secs(5),
        || {
            let mut reader = reader.clone();
            async move { get(&mut reader).await.ok() }
        },
    )
    .await;
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_no_http2_preface_is_closed_at_the_deadline() {
    use tokio::io::AsyncReadExt as _;
    let pki = Pki::new();
    let catalog = start(&pki, |settings| {
        settings.server.handshake_timeout = Duration::from_millis(500);
    })
    .await;
    // TLS finishes (a certificate is not needed for that), then nothing more is sent.
    let mut silent = raw_tls(&catalog.url, &pki, &pki.reader).await;
    let mut buf = vec![0; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                // The server's SETTINGS and session tickets.
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the silent connection was closed by the server"
    );
}
