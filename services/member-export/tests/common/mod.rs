//! The harness of the end-to-end tests: the service on a database of its own (or a given
//! one), the partner simulator over HTTP, the queue seen from outside.

// Each test crate uses part of it.
#![allow(dead_code)]

use std::time::Duration;

use mall_proto::member::v1::{
    Consent, EnqueueMemberChangesRequest, MarketingProfile, MemberChange,
    member_export_service_client::MemberExportServiceClient,
};
use mall_queue::Queue;
use mall_test_support::{Engine, TestDatabase, probe, wait_until};
use member_export::{
    App, Settings,
    partner::PartnerSettings,
    simulator::{Behaviour, Simulator},
};
use sea_orm::Database;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub const KEY: &str = "test-api-key";
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

pub struct Running {
    pub grpc: std::net::SocketAddr,
    pub client: MemberExportServiceClient<Channel>,
    pub admin: std::net::SocketAddr,
    pub simulator: Simulator,
    pub queue: Queue,
    pub url: String,
    /// The database, when this run created it (dropped with it).
    pub _database: Option<TestDatabase>,
    pub shutdown: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[derive(Clone, Copy)]
pub enum Dialect {
    Groobee,
    Webhook,
}

pub async fn start(engine: Engine, dialect: Dialect, behaviour: Behaviour) -> Running {
    let database = TestDatabase::new(engine).await;
    let mut running = start_on(database.url(), dialect, behaviour, |_| {}).await;
    running._database = Some(database);
    running
}

pub async fn start_on(
    url: &str,
    dialect: Dialect,
    behaviour: Behaviour,
    configure: impl FnOnce(&mut Settings),
) -> Running {
    mall_test_support::init_logging();
    let simulator = Simulator::start("127.0.0.1:0".parse().expect("addr"), KEY, SECRET, behaviour)
        .await
        .expect("simulator starts");
    let mut settings = Settings::default();
    settings.server.listen_addr = "127.0.0.1:0".parse().expect("valid address");
    settings.server.admin_addr = "127.0.0.1:0".parse().expect("valid address");
    settings.database.url = url.to_owned().into();
    settings.queue.visibility_timeout = Duration::from_secs(5);
    settings.delivery.receive_wait = Duration::from_millis(100);
    settings.delivery.retry_initial = Duration::from_millis(20);
    settings.delivery.retry_max = Duration::from_millis(200);
    settings.delivery.configuration_pause = Duration::from_millis(500);
    settings.alerts.webhook_url = Some(SecretString::from(simulator.alerts_url()));
    settings.partner = match dialect {
        Dialect::Groobee => PartnerSettings {
            request_timeout: Duration::from_millis(500),
            ..PartnerSettings::groobee(simulator.groobee_url(), SecretString::from(KEY))
        },
        Dialect::Webhook => PartnerSettings {
            request_timeout: Duration::from_millis(500),
            ..PartnerSettings::webhook(simulator.webhook_url(), SecretString::from(SECRET))
        },
    };
    configure(&mut settings);
    let app = App::build(settings.clone()).await.expect("app builds");
    let (grpc, admin) = (app.grpc_addr(), app.admin_addr());
    let shutdown = CancellationToken::new();
    tokio::spawn(app.run_until(shutdown.clone().cancelled_owned()));
    let db = Database::connect(url).await.expect("connects");
    let queue = Queue::open(&settings.queue, Some(db))
        .await
        .expect("queue opens");
    Running {
        grpc,
        client: MemberExportServiceClient::new(probe::channel(grpc)),
        admin,
        simulator,
        queue,
        url: url.to_owned(),
        _database: None,
        shutdown,
    }
}

pub fn change(id: &str, version: u64, email: bool, sms: bool) -> MemberChange {
    MemberChange {
        member_id: id.into(),
        version,
        consent: Some(Consent {
            marketing_email: email,
            marketing_sms: sms,
            ..Consent::default()
        }),
        profile: Some(MarketingProfile {
            email: "someone@example.com".into(),
            phone: "+821012345678".into(),
            display_name: "Kim Minji".into(),
            ..MarketingProfile::default()
        }),
        ..MemberChange::default()
    }
}

pub async fn enqueue(running: &mut Running, changes: Vec<MemberChange>) {
    running
        .client
        .enqueue_member_changes(EnqueueMemberChangesRequest {
            request_id: String::new(),
            changes,
        })
        .await
        .expect("accepted");
}

/// Waits until every queued message was handled (nothing visible or in flight).
pub async fn drained(running: &Running) {
    wait_until("the queue drains", Duration::from_secs(20), || async {
        let counts = running.queue.counts().await.ok()?;
        (counts.visible + counts.in_flight == 0).then_some(())
    })
    .await;
}

pub async fn delivered_at(running: &Running, member: &str, version: u64) {
    wait_until(
        "the partner accepted the member",
        Duration::from_secs(20),
        || async {
            running
                .simulator
                .members()
                .get(member)
                .is_some_and(|m| m.version == version)
                .then_some(())
        },
    )
    .await;
}
