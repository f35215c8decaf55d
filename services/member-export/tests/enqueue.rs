//! EnqueueMemberChanges over gRPC, on SQLite and PostgreSQL with the embedded queue: what is
//! recorded (profiles encrypted), what is queued (ids and versions only), idempotency, stale
//! changes, consent and opt-outs, and bad input.

use std::time::Duration;

use mall_proto::member::v1::{
    Consent, EnqueueMemberChangesRequest, MarketingProfile, MemberChange, MemberDeliveryBatch,
    TraceContext, member_export_service_client::MemberExportServiceClient,
};
use mall_queue::Queue;
use mall_test_support::{Engine, TestDatabase, probe};
use member_export::{App, Settings};
use prost::Message as _;
use sea_orm::{ConnectionTrait as _, Database};
use tokio_util::sync::CancellationToken;
use tonic::{Code, transport::Channel};

struct Running {
    client: MemberExportServiceClient<Channel>,
    queue: Queue,
    database: TestDatabase,
    settings: Settings,
    shutdown: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(engine: Engine) -> Running {
    mall_test_support::init_logging();
    let database = TestDatabase::new(engine).await;
    let mut settings = Settings::default();
    settings.server.listen_addr = "127.0.0.1:0".parse().expect("valid address");
    settings.server.admin_addr = "127.0.0.1:0".parse().expect("valid address");
    settings.database.url = database.url().to_owned().into();
    settings.enqueue.lanes = 4;
    // No delivery workers: the test reads the queue itself.
    settings.delivery.workers = Some(0);
    let app = App::build(settings.clone()).await.expect("app builds");
    let grpc = app.grpc_addr();
    let shutdown = CancellationToken::new();
    tokio::spawn(app.run_until(shutdown.clone().cancelled_owned()));
    let db = Database::connect(database.url()).await.expect("connects");
    let queue = Queue::open(&settings.queue, Some(db))
        .await
        .expect("queue opens");
    Running {
        client: MemberExportServiceClient::new(probe::channel(grpc)),
        queue,
        database,
        settings,
        shutdown,
    }
}

fn change(id: &str, version: u64, consented: bool) -> MemberChange {
    MemberChange {
        member_id: id.into(),
        version,
        consent: Some(Consent {
            marketing_email: consented,
            marketing_sms: consented,
            ..Consent::default()
        }),
        profile: Some(MarketingProfile {
            email: format!("{}@example.com", id.to_lowercase()),
            phone: "+821012345678".into(),
            display_name: "Kim Minji".into(),
            preferred_language: "ko".into(),
            grade: "GOLD".into(),
            interests: vec!["golf".into()],
        }),
        change_time: Some(prost_types::Timestamp {
            seconds: 1_800_000_000,
            nanos: 0,
        }),
        trace_context: Some(TraceContext {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            tracestate: String::new(),
        }),
    }
}

fn request(request_id: &str, changes: Vec<MemberChange>) -> EnqueueMemberChangesRequest {
    EnqueueMemberChangesRequest {
        request_id: request_id.into(),
        changes,
    }
}

/// Every delivery queued so far, as (member id, version), taking the messages off the queue.
async fn queued(queue: &Queue) -> Vec<(String, u64)> {
    let mut deliveries = Vec::new();
    loop {
        let messages = queue
            .receive(100, Duration::from_millis(200))
            .await
            .expect("receives");
        if messages.is_empty() {
            break;
        }
        for message in &messages {
            assert!(
                !message.body.contains('@'),
                "a queue message carries no profile"
            );
            let body = mall_queue::decode_body(&message.body).expect("base64");
            let batch = MemberDeliveryBatch::decode(body.as_slice()).expect("a delivery batch");
            deliveries.extend(
                batch
                    .deliveries
                    .into_iter()
                    .map(|d| (d.member_id, d.version)),
            );
        }
        let receipts: Vec<_> = messages.iter().map(|m| m.receipt.clone()).collect();
        queue.delete(&receipts).await.expect("deletes");
    }
    deliveries.sort();
    deliveries
}

async fn changes_are_recorded_encrypted_and_queued_by_id(engine: Engine) {
    let mut running = start(engine).await;
    let response = running
        .client
        .enqueue_member_changes(request(
            "",
            vec![
                change("M-1", 2, true),
                change("M-2", 1, true),
                change("M-1", 1, true),
                change("M-3", 1, false),
            ],
        ))
        .await
        .expect("accepted")
        .into_inner();
    assert_eq!(response.accepted_count, 2);
    assert_eq!(response.stale_count, 1, "M-1 v1 is older than v2");
    assert_eq!(response.skipped_without_consent_count, 1);
    assert_eq!(
        queued(&running.queue).await,
        [("M-1".to_owned(), 2), ("M-2".to_owned(), 1)]
    );

    // The member table holds the profile encrypted: no e-mail, phone or name in any row.
    let db = Database::connect(running.database.url())
        .await
        .expect("connects");
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT member_id, version, profile, key_id FROM members ORDER BY member_id",
        ))
        .await
        .expect("reads");
    assert_eq!(
        rows.len(),
        3,
        "the skipped member's version is recorded too"
    );
    for row in &rows {
        let profile: Vec<u8> = row.try_get("", "profile").expect("profile");
        for secret in [&b"example.com"[..], b"+821012345678", b"Kim Minji"] {
            assert!(
                !profile.windows(secret.len()).any(|w| w == secret),
                "a profile is stored in the clear"
            );
        }
        let key: String = row.try_get("", "key_id").expect("key id");
        assert_eq!(key, "development");
    }
    let _ = &running.settings;
}

async fn a_request_id_answers_again_without_queueing_again(engine: Engine) {
    let mut running = start(engine).await;
    let first = running
        .client
        .enqueue_member_changes(request("req-1", vec![change("M-1", 1, true)]))
        .await
        .expect("accepted")
        .into_inner();
    assert_eq!(queued(&running.queue).await, [("M-1".to_owned(), 1)]);
    // The same id with other content: the first response, nothing recorded or queued.
    let again = running
        .client
        .enqueue_member_changes(request("req-1", vec![change("M-9", 1, true)]))
        .await
        .expect("answered")
        .into_inner();
    assert_eq!(again, first);
    assert!(queued(&running.queue).await.is_empty());
}

async fn a_withdrawal_after_a_queued_delivery_is_queued_as_an_opt_out(engine: Engine) {
    let mut running = start(engine).await;
    running
        .client
        .enqueue_member_changes(request("", vec![change("M-1", 1, true)]))
        .await
        .expect("accepted");
    let withdrawal = running
        .client
        .enqueue_member_changes(request(
            "",
            vec![change("M-1", 2, false), change("M-2", 1, false)],
        ))
        .await
        .expect("accepted")
        .into_inner();
    assert_eq!(withdrawal.opt_out_count, 1, "M-1 had a delivery queued");
    assert_eq!(
        withdrawal.skipped_without_consent_count, 1,
        "M-2 was never queued nor delivered"
    );
    assert_eq!(
        queued(&running.queue).await,
        [("M-1".to_owned(), 1), ("M-1".to_owned(), 2)]
    );
}

async fn bad_input_is_refused_naming_fields_never_values(engine: Engine) {
    let mut running = start(engine).await;
    let mut bad = change("M-1", 0, true);
    bad.consent = None;
    let mut profile = bad.profile.take().expect("set");
    profile.email = "kim-at-example".into();
    profile.phone = "010-1234-5678".into();
    profile.display_name = "N".repeat(101);
    bad.profile = Some(profile);
    let status = running
        .client
        .enqueue_member_changes(request(
            "",
            vec![change("M-0", 1, true), bad, change("", 1, true)],
        ))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    let details =
        tonic_types::StatusExt::get_details_bad_request(&status).expect("field violations");
    let mut fields: Vec<&str> = details
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "changes[1].consent",
            "changes[1].profile.display_name",
            "changes[1].profile.email",
            "changes[1].profile.phone",
            "changes[1].version",
            "changes[2].member_id",
            // An empty id makes the e-mail "@example.com": no local part.
            "changes[2].profile.email",
        ]
    );
    let shown = format!("{status:?}");
    for value in ["kim-at-example", "010-1234-5678", "NNNN"] {
        assert!(!shown.contains(value), "the error echoes a value: {shown}");
    }
    assert!(
        queued(&running.queue).await.is_empty(),
        "nothing was queued"
    );
    let none = running
        .client
        .enqueue_member_changes(request("", vec![]))
        .await
        .expect_err("no changes");
    assert_eq!(none.code(), Code::InvalidArgument);
}

macro_rules! both_engines {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(mall_test_support::Engine::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(mall_test_support::Engine::Postgres).await;
                }
            )*
        }
    };
}

both_engines!(
    changes_are_recorded_encrypted_and_queued_by_id,
    a_request_id_answers_again_without_queueing_again,
    a_withdrawal_after_a_queued_delivery_is_queued_as_an_opt_out,
    bad_input_is_refused_naming_fields_never_values,
);
