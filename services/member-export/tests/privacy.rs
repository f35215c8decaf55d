//! No personal data anywhere but the partner: the whole service runs through its paths
//! (enqueue, delivery, refusals, partner errors, a configuration error, erasure, bad input)
//! with every log line and span of every crate captured at TRACE, then the captured text,
//! `/metrics`, the error messages and the queue are searched for the test's e-mail addresses,
//! phone numbers and names.

use std::{collections::BTreeSet, time::Duration};

use mall_proto::member::v1::{
    Consent, EnqueueMemberChangesRequest, EraseMemberRequest, GetMemberDeliveryStateRequest,
    ListFailedDeliveriesRequest, MarketingProfile, MemberChange,
    member_export_service_client::MemberExportServiceClient,
};
use mall_test_support::{TestDatabase, probe, wait_until};
use member_export::{
    App, Settings,
    partner::PartnerSettings,
    simulator::{Behaviour, Simulator},
};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

fn person(i: usize) -> (String, String, String) {
    (
        format!("private.person{i}@example.org"),
        format!("+8210555{i:05}"),
        format!("Secretname Person{i}"),
    )
}

fn change(i: usize, version: u64, consented: bool) -> MemberChange {
    let (email, phone, name) = person(i);
    MemberChange {
        member_id: format!("M-{i}"),
        version,
        consent: Some(Consent {
            marketing_email: consented,
            marketing_sms: consented,
            ..Consent::default()
        }),
        profile: Some(MarketingProfile {
            email,
            phone,
            display_name: name,
            ..MarketingProfile::default()
        }),
        ..MemberChange::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_personal_data_reaches_logs_spans_metrics_or_errors() {
    let captured = mall_test_support::capture::Captured::install_at_trace();

    let simulator = Simulator::start(
        "127.0.0.1:0".parse().expect("addr"),
        "key",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        Behaviour {
            refused_members: BTreeSet::from(["M-3".to_owned()]),
            error_rate: 0.3,
            ..Behaviour::default()
        },
    )
    .await
    .expect("simulator");
    let database = TestDatabase::sqlite();
    let mut settings = Settings::default();
    settings.server.listen_addr = "127.0.0.1:0".parse().expect("valid address");
    settings.server.admin_addr = "127.0.0.1:0".parse().expect("valid address");
    settings.database.url = database.url().to_owned().into();
    settings.delivery.receive_wait = Duration::from_millis(100);
    settings.delivery.retry_initial = Duration::from_millis(10);
    settings.delivery.retry_max = Duration::from_millis(100);
    settings.delivery.configuration_pause = Duration::from_millis(300);
    settings.alerts.webhook_url = Some(SecretString::from(simulator.alerts_url()));
    settings.partner = PartnerSettings {
        max_batch: Some(2),
        request_timeout: Duration::from_millis(500),
        ..PartnerSettings::groobee(simulator.groobee_url(), SecretString::from("key"))
    };
    let app = App::build(settings).await.expect("app builds");
    let (grpc, admin) = (app.grpc_addr(), app.admin_addr());
    let shutdown = CancellationToken::new();
    tokio::spawn(app.run_until(shutdown.clone().cancelled_owned()));
    let mut client = MemberExportServiceClient::new(probe::channel(grpc));

    let mut errors = Vec::new();
    client
        .enqueue_member_changes(EnqueueMemberChangesRequest {
            request_id: "privacy-1".into(),
            changes: (0..6).map(|i| change(i, 1, i != 5)).collect(),
        })
        .await
        .expect("accepted");
    wait_until("members are delivered", Duration::from_secs(30), || async {
        let members = simulator.members();
        (0..5)
            .filter(|i| *i != 3)
            .all(|i| members.contains_key(&format!("M-{i}")))
            .then_some(())
    })
    .await;
    // A configuration error, then recovery.
    simulator.set_behaviour(Behaviour {
        configuration_error: true,
        ..Behaviour::default()
    });
    client
        .enqueue_member_changes(EnqueueMemberChangesRequest {
            request_id: String::new(),
            changes: vec![change(0, 2, false), change(1, 2, true)],
        })
        .await
        .expect("accepted");
    wait_until(
        "the configuration error is met",
        Duration::from_secs(20),
        || async { (simulator.counts().refused_configuration > 0).then_some(()) },
    )
    .await;
    simulator.set_behaviour(Behaviour::default());
    wait_until(
        "the opt-out is delivered",
        Duration::from_secs(30),
        || async {
            simulator
                .members()
                .get("M-0")
                .is_some_and(|m| m.opt_out)
                .then_some(())
        },
    )
    .await;
    client
        .erase_member(EraseMemberRequest {
            request_id: String::new(),
            member_id: "M-1".into(),
            version: 3,
        })
        .await
        .expect("erased");
    // Bad input whose values are personal data.
    let mut bad = change(7, 1, true);
    if let Some(profile) = bad.profile.as_mut() {
        profile.email = "not-an-address private.person7".into();
        profile.phone = "010 5550 0007 private".into();
    }
    let refused = client
        .enqueue_member_changes(EnqueueMemberChangesRequest {
            request_id: String::new(),
            changes: vec![bad],
        })
        .await
        .expect_err("invalid");
    errors.push(format!("{refused:?}"));
    let listed = client
        .list_failed_deliveries(ListFailedDeliveriesRequest::default())
        .await
        .expect("listed");
    errors.push(format!("{listed:?}"));
    let state = client
        .get_member_delivery_state(GetMemberDeliveryStateRequest {
            member_id: "M-3".into(),
        })
        .await
        .expect("state");
    errors.push(format!("{state:?}"));
    let (_, metrics) = probe::http_get(admin, "/metrics").await;
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let logs = captured.text();
    assert!(logs.len() > 10_000, "the paths ran and logged");
    assert!(
        logs.contains("refuses our configuration"),
        "the configuration error was logged"
    );
    let alerts = simulator.alerts().join("\n");
    let mut secrets: Vec<String> = Vec::new();
    for i in 0..8 {
        let (email, phone, name) = person(i);
        secrets.extend([email, phone, name]);
    }
    secrets.extend(["private.person7".to_owned(), "Secretname".to_owned()]);
    for (what, text) in [
        ("logs and spans", &logs),
        ("/metrics", &metrics),
        ("errors and listings", &errors.join("\n")),
        ("alerts", &alerts),
    ] {
        for secret in &secrets {
            assert!(!text.contains(secret.as_str()), "{what} hold personal data");
        }
    }
}
