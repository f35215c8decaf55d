//! Nothing secret leaks with TLS on: the catalog (on PostgreSQL, its URL carrying a password),
//! the relay and member-export (delivering to a partner with an API key) run a workload over
//! mutual TLS, including refused calls, with every log line and span of every crate captured
//! at TRACE; then the captured text, every `/metrics` and the errors callers saw are searched
//! for the certificates' private keys, the database password, the API key and the members'
//! personal data.

use std::time::Duration;

use mall_grpc::{
    authz::identities,
    tls::{ClientTls, ServerTls},
};
use mall_proto::{
    catalog::v1::{GetProductRequest, product_catalog_service_client::ProductCatalogServiceClient},
    member::v1::{
        Consent, EnqueueMemberChangesRequest, MarketingProfile, MemberChange,
        member_export_service_client::MemberExportServiceClient,
    },
    sync::v1::{
        PauseRelayRequest, ProductChange, PublishProductChangesRequest,
        sync_relay_service_client::SyncRelayServiceClient,
    },
};
use mall_test_support::{
    TestDatabase,
    certs::{Authority, CertFiles, Validity},
    probe, wait_until,
};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const API_KEY: &str = "partner-key-41d8e2";

fn server_tls(ca: &Authority, files: &CertFiles) -> ServerTls {
    ServerTls {
        cert_file: files.cert.clone(),
        key_file: files.key.clone(),
        client_ca_file: ca.ca_file().to_owned(),
        reload_interval: Duration::from_secs(10),
    }
}

fn channel(url: &str, ca: &Authority, who: &CertFiles) -> Channel {
    let tls = ClientTls::new(ca.ca_file(), Some((who.cert.clone(), who.key.clone())));
    mall_grpc::client::lazy_channel(url, Some(&tls), Duration::from_secs(5)).expect("a channel")
}

fn url_of(addr: std::net::SocketAddr) -> String {
    format!("https://localhost:{}", addr.port())
}

fn member(i: usize) -> MemberChange {
    MemberChange {
        member_id: format!("M-{i}"),
        version: 1,
        consent: Some(Consent {
            marketing_email: true,
            marketing_sms: true,
            ..Consent::default()
        }),
        profile: Some(MarketingProfile {
            email: format!("scan.person{i}@example.org"),
            phone: format!("+8210777{i:05}"),
            display_name: format!("Scanname Person{i}"),
            ..MarketingProfile::default()
        }),
        ..MemberChange::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_password_or_personal_data_in_logs_spans_metrics_or_errors() {
    // The catalog's database and a role of its own with a random password, made before any
    // capture starts (the test server's own URL may hold the cluster's password).
    let catalog_db = TestDatabase::postgres().await;
    let (db_url, password) = own_role(&catalog_db).await;
    let captured = mall_test_support::capture::Captured::install_at_trace();
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
    let member_cert = issue(
        "member-export",
        &Authority::spiffe_id("mall-platform", "member-export"),
    );
    let producer = issue("producer", identities::PRODUCT_PRODUCER);
    let member_system = issue("member-system", identities::MEMBER_SYSTEM);
    let reader = issue("reader", &Authority::spiffe_id("shop", "storefront"));
    let shutdown = CancellationToken::new();

    // The catalog on PostgreSQL, as its own role, through a URL with its password.
    let mut settings = product_catalog::Settings::default();
    settings.server.listen_addr = "127.0.0.1:0".parse().expect("valid");
    settings.server.admin_addr = "127.0.0.1:0".parse().expect("valid");
    settings.server.tls = Some(server_tls(&ca, &catalog_cert));
    settings.database.url = db_url.to_string().into();
    let app = product_catalog::App::build(settings)
        .await
        .expect("catalog builds");
    let catalog_url = url_of(app.grpc_addr());
    let catalog_admin = app.admin_addr();
    tokio::spawn(app.run_until(shutdown.clone().cancelled_owned()));

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
    let app = sync_relay::App::build(settings)
        .await
        .expect("relay builds");
    let relay_url = url_of(app.grpc_addr());
    let relay_admin = app.admin_addr();
    tokio::spawn(app.run_until(shutdown.clone().cancelled_owned()));

    let simulator = member_export::simulator::Simulator::start(
        "127.0.0.1:0".parse().expect("addr"),
        API_KEY,
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        member_export::simulator::Behaviour::default(),
    )
    .await
    .expect("simulator");
    let member_db = TestDatabase::sqlite();
    let mut settings = member_export::Settings::default();
    settings.server.listen_addr = "127.0.0.1:0".parse().expect("valid");
    settings.server.admin_addr = "127.0.0.1:0".parse().expect("valid");
    settings.server.tls = Some(server_tls(&ca, &member_cert));
    settings.database.url = member_db.url().to_owned().into();
    settings.delivery.receive_wait = Duration::from_millis(100);
    settings.partner = member_export::partner::PartnerSettings::groobee(
        simulator.groobee_url(),
        SecretString::from(API_KEY),
    );
    let app = member_export::App::build(settings)
        .await
        .expect("member-export builds");
    let member_url = url_of(app.grpc_addr());
    let member_admin = app.admin_addr();
    tokio::spawn(app.run_until(shutdown.clone().cancelled_owned()));

    // The workload: products through the relay into the catalog, members to the partner,
    // and refused calls on each service.
    let mut errors = Vec::new();
    let publisher = SyncRelayServiceClient::new(channel(&relay_url, &ca, &producer));
    let changes: Vec<ProductChange> = (0..20)
        .map(|i| mall_test_support::shoe_change(&format!("S-{i}"), 2))
        .collect();
    wait_until("the relay takes publishes", Duration::from_secs(30), || {
        let (mut publisher, changes) = (publisher.clone(), changes.clone());
        async move {
            publisher
                .publish_product_changes(tokio_stream::iter([PublishProductChangesRequest {
                    changes,
                }]))
                .await
                .ok()
                .map(|_| ())
        }
    })
    .await;
    let mut catalog = ProductCatalogServiceClient::new(channel(&catalog_url, &ca, &reader));
    wait_until(
        "the products are in the catalog",
        Duration::from_secs(30),
        || {
            let mut catalog = catalog.clone();
            async move {
                let product = catalog
                    .get_product(GetProductRequest {
                        code: "S-19".into(),
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .product?;
                (product.version == 2).then_some(())
            }
        },
    )
    .await;
    let mut members = MemberExportServiceClient::new(channel(&member_url, &ca, &member_system));
    members
        .enqueue_member_changes(EnqueueMemberChangesRequest {
            request_id: "scan-1".into(),
            changes: (0..5).map(member).collect(),
        })
        .await
        .expect("enqueued");
    wait_until("members are delivered", Duration::from_secs(30), || async {
        (simulator.members().len() == 5).then_some(())
    })
    .await;
    // Refusals: a reader pausing, a reader enqueueing personal data, an invalid member.
    let refused = SyncRelayServiceClient::new(channel(&relay_url, &ca, &reader))
        .pause_relay(PauseRelayRequest {
            reason: "scan".into(),
        })
        .await
        .expect_err("refused");
    errors.push(format!("{refused:?}"));
    let refused = MemberExportServiceClient::new(channel(&member_url, &ca, &reader))
        .enqueue_member_changes(EnqueueMemberChangesRequest {
            request_id: String::new(),
            changes: vec![member(9)],
        })
        .await
        .expect_err("refused");
    errors.push(format!("{refused:?}"));
    let mut invalid = member(8);
    if let Some(profile) = invalid.profile.as_mut() {
        profile.email = "not-an-address scan.person8".into();
    }
    let refused = members
        .enqueue_member_changes(EnqueueMemberChangesRequest {
            request_id: String::new(),
            changes: vec![invalid],
        })
        .await
        .expect_err("invalid");
    errors.push(format!("{refused:?}"));
    let status = catalog
        .get_product(GetProductRequest {
            code: "missing".into(),
        })
        .await
        .expect_err("not found");
    errors.push(format!("{status:?}"));

    let mut metrics = String::new();
    for admin in [catalog_admin, relay_admin, member_admin] {
        metrics.push_str(&probe::http_get(admin, "/metrics").await.1);
    }
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logs = captured.text();
    assert!(logs.len() > 20_000, "the paths ran and logged");
    assert!(logs.contains("call refused"), "the refusals were logged");

    // What must never appear: every line of every private key's PEM body, the key markers,
    // the database password, the API key, and each member's e-mail, phone and name.
    let mut secrets: Vec<String> = vec!["PRIVATE KEY".into(), password, API_KEY.into()];
    for files in [
        &catalog_cert,
        &relay_cert,
        &member_cert,
        &producer,
        &member_system,
        &reader,
    ] {
        let pem = std::fs::read_to_string(&files.key).expect("the key");
        secrets.extend(
            pem.lines()
                .filter(|l| !l.starts_with("-----") && l.len() >= 16)
                .map(str::to_owned),
        );
    }
    for i in 0..10 {
        let m = member(i);
        let profile = m.profile.expect("a profile");
        secrets.extend([profile.email, profile.phone, profile.display_name]);
    }
    secrets.push("scan.person8".into());
    for (what, text) in [
        ("logs and spans", &logs),
        ("/metrics", &metrics),
        ("errors callers saw", &errors.join("\n")),
    ] {
        for (i, secret) in secrets.iter().enumerate() {
            if let Some(at) = text.find(secret.as_str()) {
                let context = &text[text.floor_char_boundary(at.saturating_sub(300))..at];
                panic!(
                    "{what} hold secret #{i} (of {} listed), after: {context}",
                    secrets.len()
                );
            }
        }
    }
}

/// A login role owning `database`, with a random password: the URL to connect as it, and the
/// password (to look for). The role is named like the test databases (`mall_test_…`).
async fn own_role(database: &TestDatabase) -> (url::Url, String) {
    use sea_orm::ConnectionTrait as _;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let (role, password) = (format!("mall_test_role_{suffix}"), format!("pw-{suffix}"));
    let admin = sea_orm::Database::connect(database.url())
        .await
        .expect("the test database");
    let name = database.url().rsplit('/').next().expect("a database name");
    for statement in [
        format!("CREATE ROLE {role} LOGIN PASSWORD '{password}'"),
        format!("ALTER DATABASE {name} OWNER TO {role}"),
        format!("ALTER SCHEMA public OWNER TO {role}"),
    ] {
        admin
            .execute_unprepared(&statement)
            .await
            .unwrap_or_else(|error| panic!("{statement}: {error}"));
    }
    admin.close().await.ok();
    let mut url = url::Url::parse(database.url()).expect("a URL");
    url.set_username(&role).expect("settable");
    url.set_password(Some(&password)).expect("settable");
    (url, password)
}
