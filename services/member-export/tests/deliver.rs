//! Delivery end to end: EnqueueMemberChanges → queue → workers → the partner simulator over
//! HTTP, on SQLite and PostgreSQL. Consent is checked at send time, withdrawals become
//! opt-outs, refused members are recorded, and neither partner failures nor a configuration
//! error dead-letter anything.

mod common;

use std::{collections::BTreeSet, time::Duration};

use common::{Dialect, change, delivered_at, drained, enqueue, start, start_on};

use mall_proto::member::v1::{
    EnqueueMemberChangesRequest, EraseMemberRequest, GetDeliveryStatsRequest,
    GetMemberDeliveryStateRequest, ListFailedDeliveriesRequest,
};
use mall_test_support::{Engine, TestDatabase, probe, wait_until};
use member_export::{Settings, simulator::Behaviour};
use sea_orm::{ConnectionTrait as _, Database};
use secrecy::SecretString;

async fn consented_members_are_sent_with_only_their_consented_contact_data(
    engine: Engine,
    dialect: Dialect,
) {
    let mut running = start(engine, dialect, Behaviour::default()).await;
    enqueue(
        &mut running,
        vec![change("M-1", 1, true, true), change("M-2", 3, true, false)],
    )
    .await;
    delivered_at(&running, "M-1", 1).await;
    delivered_at(&running, "M-2", 3).await;
    let members = running.simulator.members();
    assert!(members["M-1"].has_email && members["M-1"].has_phone);
    assert!(
        members["M-2"].has_email && !members["M-2"].has_phone,
        "no phone without SMS consent"
    );
    if let Dialect::Webhook = dialect {
        assert_eq!(members["M-2"].idempotency_keys, ["M-2:3"]);
    }
    drained(&running).await;

    // The replica's counters, in GetDeliveryStats and in /metrics, without personal data.
    let stats = running
        .client
        .get_delivery_stats(GetDeliveryStatsRequest {})
        .await
        .expect("stats")
        .into_inner()
        .stats
        .expect("set");
    assert_eq!(stats.delivered_count, 2);
    assert_eq!((stats.queued_count, stats.dead_letter_count), (0, 0));
    assert!((stats.rate_limit_per_second - 400.0).abs() < f64::EPSILON);
    let (status, metrics) = probe::http_get(running.admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("mall_member_export_deliveries_total{outcome=\"delivered\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("mall_member_export_partner_requests_total{outcome=\"accepted\"}"));
    for personal in ["someone@example.com", "+821012345678", "Kim Minji"] {
        assert!(!metrics.contains(personal), "/metrics shows personal data");
    }
}

async fn a_withdrawal_overtaking_its_queued_change_sends_nothing_and_a_later_one_an_opt_out(
    engine: Engine,
) {
    let mut running = start(engine, Dialect::Groobee, Behaviour::default()).await;
    // Queued with consent, withdrawn before any worker sent it: the partner never had the
    // member, so it is told nothing.
    enqueue(
        &mut running,
        vec![
            change("M-W", 1, true, true),
            change("M-W", 2, false, false),
            change("M-OK", 1, true, false),
        ],
    )
    .await;
    delivered_at(&running, "M-OK", 1).await;
    drained(&running).await;
    assert!(!running.simulator.members().contains_key("M-W"));

    // Delivered, then withdrawn: the partner gets an opt-out, without contact data.
    enqueue(&mut running, vec![change("M-OK", 2, false, false)]).await;
    delivered_at(&running, "M-OK", 2).await;
    let member = &running.simulator.members()["M-OK"];
    assert!(member.opt_out && !member.consent.any());
    assert!(!member.has_email && !member.has_phone);
}

async fn refused_members_are_recorded_and_the_rest_delivered(engine: Engine) {
    let behaviour = Behaviour {
        refused_members: BTreeSet::from(["M-BAD".to_owned()]),
        ..Behaviour::default()
    };
    let mut running = start(engine, Dialect::Groobee, behaviour).await;
    enqueue(
        &mut running,
        vec![
            change("M-BAD", 4, true, true),
            change("M-OK", 1, true, true),
        ],
    )
    .await;
    delivered_at(&running, "M-OK", 1).await;
    drained(&running).await;
    let db = Database::connect(&running.url).await.expect("connects");
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT member_id, version, reason FROM failed_deliveries",
        ))
        .await
        .expect("reads");
    let failed: Vec<(String, i64, String)> = rows
        .iter()
        .map(|r| {
            (
                r.try_get("", "member_id").expect("member"),
                r.try_get("", "version").expect("version"),
                r.try_get("", "reason").expect("reason"),
            )
        })
        .collect();
    assert_eq!(
        failed,
        [("M-BAD".to_owned(), 4, "groobee:-1007".to_owned())]
    );
    assert_eq!(running.queue.counts().await.expect("counts").dead, 0);

    // The same, for callers: listed, and in the member's delivery state.
    let listed = running
        .client
        .list_failed_deliveries(ListFailedDeliveriesRequest::default())
        .await
        .expect("lists")
        .into_inner();
    let listed: Vec<(&str, u64, &str)> = listed
        .failed_deliveries
        .iter()
        .map(|f| (f.member_id.as_str(), f.version, f.reason.as_str()))
        .collect();
    assert_eq!(listed, [("M-BAD", 4, "groobee:-1007")]);
    let state = |member: &str| {
        let mut client = running.client.clone();
        let member = member.to_owned();
        async move {
            client
                .get_member_delivery_state(GetMemberDeliveryStateRequest { member_id: member })
                .await
        }
    };
    let bad = state("M-BAD")
        .await
        .expect("found")
        .into_inner()
        .state
        .expect("set");
    assert_eq!(
        (bad.version, bad.delivered_version, bad.pending),
        (4, 0, true)
    );
    assert_eq!(bad.failures.len(), 1);
    let ok = state("M-OK")
        .await
        .expect("found")
        .into_inner()
        .state
        .expect("set");
    assert_eq!(
        (ok.version, ok.delivered_version, ok.pending),
        (1, 1, false)
    );
    assert!(ok.consented && ok.failures.is_empty());
    assert_eq!(
        state("M-NEVER").await.expect_err("unknown").code(),
        tonic::Code::NotFound
    );
    let refused = running
        .client
        .list_failed_deliveries(ListFailedDeliveriesRequest {
            page_size: 1_001,
            page_token: "not-a-token".into(),
            member_id: String::new(),
        })
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
}

/// Pages of failed deliveries: newest first, each once, a token bound to its filter.
#[tokio::test]
async fn failed_deliveries_come_in_pages_newest_first() {
    let refused: BTreeSet<String> = (0..5).map(|i| format!("M-{i}")).collect();
    let behaviour = Behaviour {
        refused_members: refused,
        ..Behaviour::default()
    };
    let mut running = start(Engine::Sqlite, Dialect::Groobee, behaviour).await;
    for i in 0..5 {
        enqueue(
            &mut running,
            vec![change(&format!("M-{i}"), 1, true, false)],
        )
        .await;
        drained(&running).await;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = running
            .client
            .list_failed_deliveries(ListFailedDeliveriesRequest {
                page_size: 2,
                page_token: token,
                member_id: String::new(),
            })
            .await
            .expect("a page")
            .into_inner();
        assert!(page.failed_deliveries.len() <= 2);
        seen.extend(page.failed_deliveries.into_iter().map(|f| f.member_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ["M-4", "M-3", "M-2", "M-1", "M-0"]);
    let one = running
        .client
        .list_failed_deliveries(ListFailedDeliveriesRequest {
            page_size: 0,
            page_token: String::new(),
            member_id: "M-2".into(),
        })
        .await
        .expect("filtered")
        .into_inner();
    assert_eq!(one.failed_deliveries.len(), 1);
    assert!(one.next_page_token.is_empty());
}

async fn partner_failures_and_a_configuration_error_dead_letter_nothing(engine: Engine) {
    let failing = Behaviour {
        error_rate: 1.0,
        ..Behaviour::default()
    };
    let database = TestDatabase::new(engine).await;
    let mut running = start_on(database.url(), Dialect::Groobee, failing, |settings| {
        // Long enough that the test fixes the partner before the first pause ends.
        settings.delivery.configuration_pause = Duration::from_secs(2);
        // Alert windows are aligned to the epoch: with the default hour, a run across a full
        // hour read its count from the new, empty window (it happened in CI at 20:00 UTC).
        // One window for the whole run: the count read is the one its alert went into.
        settings.alerts.window = Duration::from_secs(100 * 365 * 24 * 3600);
    })
    .await;
    enqueue(&mut running, vec![change("M-1", 1, true, true)]).await;
    wait_until(
        "the partner failed a few times",
        Duration::from_secs(20),
        || async { (running.simulator.counts().errors >= 6).then_some(()) },
    )
    .await;
    // The partner refuses our contract now: deliveries stop instead of retrying at full pace.
    running.simulator.set_behaviour(Behaviour {
        configuration_error: true,
        ..Behaviour::default()
    });
    wait_until(
        "the configuration error is seen",
        Duration::from_secs(20),
        || async { (running.simulator.counts().refused_configuration >= 1).then_some(()) },
    )
    .await;
    let refused = running.simulator.counts().refused_configuration;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        running.simulator.counts().refused_configuration <= refused + 1,
        "deliveries pause after a configuration error"
    );
    running.simulator.set_behaviour(Behaviour::default());
    delivered_at(&running, "M-1", 1).await;
    drained(&running).await;
    assert_eq!(
        running.queue.counts().await.expect("counts").dead,
        0,
        "nothing was dead-lettered"
    );
    let alerts = running.simulator.alerts();
    assert_eq!(
        alerts.len(),
        1,
        "one alert for the configuration error: {alerts:?}"
    );
    assert!(
        alerts[0].contains("refuses our configuration (groobee:-1003)"),
        "{alerts:?}"
    );
    let stats = running
        .client
        .get_delivery_stats(GetDeliveryStatsRequest {})
        .await
        .expect("stats")
        .into_inner()
        .stats
        .expect("set");
    assert_eq!(stats.alerts_sent_count, 1, "the shared window's count");
}

async fn erasure_deletes_here_tells_the_partner_and_keeps_older_changes_out(engine: Engine) {
    let mut running = start(engine, Dialect::Groobee, Behaviour::default()).await;
    enqueue(&mut running, vec![change("M-1", 1, true, true)]).await;
    delivered_at(&running, "M-1", 1).await;
    let client = running.client.clone();
    let erase = |member: &str, version: u64| {
        let mut client = client.clone();
        let member = member.to_owned();
        async move {
            client
                .erase_member(EraseMemberRequest {
                    request_id: String::new(),
                    member_id: member,
                    version,
                })
                .await
        }
    };
    let erased = erase("M-1", 2).await.expect("erased").into_inner();
    assert!(erased.erased && erased.partner_erasure_queued);
    delivered_at(&running, "M-1", 2).await;
    let at_partner = &running.simulator.members()["M-1"];
    assert!(at_partner.erased && !at_partner.has_email && !at_partner.consent.any());

    // Here only the tombstone remains: no profile, no consent.
    let db = Database::connect(&running.url).await.expect("connects");
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT profile, consent_email, version FROM members WHERE member_id = 'M-1'",
        ))
        .await
        .expect("reads");
    let profile: Option<Vec<u8>> = rows[0].try_get("", "profile").expect("profile");
    let consent: bool = rows[0].try_get("", "consent_email").expect("consent");
    assert!(profile.is_none() && !consent);

    // An older change cannot bring the data back; nothing more reaches the partner.
    let late = running
        .client
        .enqueue_member_changes(EnqueueMemberChangesRequest {
            request_id: String::new(),
            changes: vec![change("M-1", 1, true, true)],
        })
        .await
        .expect("answered")
        .into_inner();
    assert_eq!(late.stale_count, 1);
    assert!(!erase("M-1", 1).await.expect("answered").into_inner().erased);
    // Not even a retry of a change of the erasure's own version.
    let same = running
        .client
        .enqueue_member_changes(EnqueueMemberChangesRequest {
            request_id: String::new(),
            changes: vec![change("M-1", 2, true, true)],
        })
        .await
        .expect("answered")
        .into_inner();
    assert_eq!(
        same.stale_count, 1,
        "an erasure's version cannot bring the data back"
    );

    // An erasure of the very version the partner has is still sent.
    enqueue(&mut running, vec![change("M-2", 3, true, false)]).await;
    delivered_at(&running, "M-2", 3).await;
    assert!(
        erase("M-2", 3)
            .await
            .expect("erased")
            .into_inner()
            .partner_erasure_queued
    );
    wait_until(
        "the erasure reaches the partner",
        Duration::from_secs(20),
        || async { running.simulator.members()["M-2"].erased.then_some(()) },
    )
    .await;

    // A member the partner never had is erased here only.
    let never = erase("M-NEW", 1).await.expect("erased").into_inner();
    assert!(never.erased && !never.partner_erasure_queued);
    drained(&running).await;
    assert!(!running.simulator.members().contains_key("M-NEW"));
    assert_eq!(
        erase("", 0).await.expect_err("invalid").code(),
        tonic::Code::InvalidArgument
    );
}

/// A profile encrypted with a key that is no longer configured cannot be sent: the member is
/// recorded as a failed delivery (to resend once the key is back), not sent without its data.
#[tokio::test]
async fn a_profile_whose_key_is_gone_is_recorded_not_sent() {
    let database = TestDatabase::new(Engine::Sqlite).await;
    let url = database.url();
    fn key(settings: &mut Settings, id: &str, secret: &str) {
        settings.encryption.current = id.to_owned();
        settings.encryption.keys = [(id.to_owned(), SecretString::from(secret.to_owned()))].into();
    }
    {
        let mut first = start_on(url, Dialect::Groobee, Behaviour::default(), |settings| {
            key(
                settings,
                "k1",
                "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
            );
            settings.delivery.workers = Some(0);
        })
        .await;
        enqueue(&mut first, vec![change("M-1", 1, true, true)]).await;
    }
    let running = start_on(url, Dialect::Groobee, Behaviour::default(), |settings| {
        key(
            settings,
            "k2",
            "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=",
        )
    })
    .await;
    drained(&running).await;
    assert!(running.simulator.members().is_empty(), "nothing was sent");
    let db = Database::connect(url).await.expect("connects");
    let reasons = db
        .query_all_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT reason FROM failed_deliveries WHERE member_id = 'M-1'",
        ))
        .await
        .expect("reads");
    assert_eq!(reasons.len(), 1);
    let reason: String = reasons[0].try_get("", "reason").expect("reason");
    assert_eq!(reason, "undecryptable");
}

/// A partner that fails every request: after a period with enough requests, one alert about
/// the failure rate (and not another within the alert window).
#[tokio::test]
async fn a_high_failure_rate_raises_one_alert() {
    let database = TestDatabase::new(Engine::Sqlite).await;
    let failing = Behaviour {
        error_rate: 1.0,
        ..Behaviour::default()
    };
    let mut running = start_on(database.url(), Dialect::Groobee, failing, |settings| {
        settings.alerts.failure_rate_period = Duration::from_millis(300);
        settings.alerts.failure_rate_min_requests = 3;
    })
    .await;
    enqueue(&mut running, vec![change("M-1", 1, true, true)]).await;
    wait_until("a failure-rate alert", Duration::from_secs(20), || async {
        running
            .simulator
            .alerts()
            .iter()
            .any(|a| a.contains("requests to the partner failed"))
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    let alerts = running.simulator.alerts();
    assert_eq!(
        alerts
            .iter()
            .filter(|a| a.contains("requests to the partner failed"))
            .count(),
        1,
        "{alerts:?}"
    );
}

/// The partner accepted a member but the service crashed before recording it: the attempt
/// was recorded before the request, so a later withdrawal is still sent as an opt-out.
#[tokio::test]
async fn a_withdrawal_after_an_unrecorded_acceptance_is_still_an_opt_out() {
    let mut running = start(Engine::Sqlite, Dialect::Groobee, Behaviour::default()).await;
    enqueue(&mut running, vec![change("M-1", 1, true, true)]).await;
    delivered_at(&running, "M-1", 1).await;
    drained(&running).await;
    // What a crash between the partner's answer and our record leaves behind.
    let db = Database::connect(&running.url).await.expect("connects");
    db.execute_unprepared("UPDATE members SET delivered_version = 0, queued_version = 0")
        .await
        .expect("forgets the delivery");
    enqueue(&mut running, vec![change("M-1", 2, false, false)]).await;
    delivered_at(&running, "M-1", 2).await;
    assert!(running.simulator.members()["M-1"].opt_out);
}

#[tokio::test]
async fn a_withdrawal_recorded_while_a_round_is_being_sent_wins_for_members_not_yet_sent() {
    // One request at a time, a second each: a round of six members takes about six.
    // Each member is claimed (and its row read) just before its own request, so a
    // withdrawal recorded meanwhile keeps every member not yet sent from being sent with
    // its contact data; only the one in flight then may have been (and gets an opt-out).
    let slow = Behaviour {
        latency: (Duration::from_secs(1), Duration::from_secs(1)),
        ..Behaviour::default()
    };
    let database = TestDatabase::new(Engine::Sqlite).await;
    let mut running = start_on(database.url(), Dialect::Webhook, slow, |settings| {
        settings.delivery.workers = Some(1);
        settings.delivery.max_concurrency = 1;
        settings.partner.request_timeout = Duration::from_secs(5);
        settings.delivery.claim_timeout = Duration::from_secs(10);
    })
    .await;
    let ids: Vec<String> = (1..=6).map(|i| format!("M-{i}")).collect();
    enqueue(
        &mut running,
        ids.iter().map(|id| change(id, 1, true, true)).collect(),
    )
    .await;
    wait_until(
        "the partner accepted a first member",
        Duration::from_secs(20),
        || async { (!running.simulator.members().is_empty()).then_some(()) },
    )
    .await;
    let sent_before: BTreeSet<String> = running.simulator.members().into_keys().collect();
    let withdrawn: Vec<&String> = ids.iter().filter(|id| !sent_before.contains(*id)).collect();
    enqueue(
        &mut running,
        withdrawn
            .iter()
            .map(|id| change(id, 2, false, false))
            .collect(),
    )
    .await;
    drained(&running).await;
    let members = running.simulator.members();
    let reached: Vec<&&String> = withdrawn
        .iter()
        .filter(|id| members.contains_key(id.as_str()))
        .collect();
    assert!(
        reached.len() <= 1,
        "only the member in flight may have reached the partner, not {reached:?}"
    );
    for id in reached {
        let member = &members[id.as_str()];
        assert!(
            member.opt_out && !member.has_email,
            "{id} was told of the withdrawal"
        );
    }
}

/// A partner slower than the visibility timeout: the round keeps its messages in flight, so
/// no other worker sends the same member again meanwhile.
#[tokio::test]
async fn a_slow_partner_does_not_make_messages_visible_mid_send() {
    let slow = Behaviour {
        latency: (Duration::from_millis(2_500), Duration::from_millis(2_500)),
        ..Behaviour::default()
    };
    let database = TestDatabase::new(Engine::Sqlite).await;
    let mut running = start_on(database.url(), Dialect::Groobee, slow, |settings| {
        settings.queue.visibility_timeout = Duration::from_secs(1);
        settings.partner.request_timeout = Duration::from_secs(10);
    })
    .await;
    enqueue(&mut running, vec![change("M-1", 1, true, true)]).await;
    delivered_at(&running, "M-1", 1).await;
    drained(&running).await;
    // Long enough for a second send, had the message come back mid-send, to finish.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(running.simulator.members()["M-1"].deliveries, 1);
    assert_eq!(running.queue.counts().await.expect("counts").dead, 0);
}

/// A key rotation: the old key stays configured beside the new current one, the service
/// moves every profile to the new key, and then the old key can go: deliveries still work.
#[tokio::test]
async fn after_a_key_rotation_profiles_move_to_the_new_key_and_the_old_one_can_go() {
    const OLD: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    const NEW: &str = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";
    let database = TestDatabase::new(Engine::Sqlite).await;
    let url = database.url();
    {
        let mut before = start_on(url, Dialect::Groobee, Behaviour::default(), |settings| {
            settings.encryption.current = "k1".into();
            settings.encryption.keys = [("k1".to_owned(), SecretString::from(OLD))].into();
            settings.delivery.workers = Some(0);
        })
        .await;
        let changes = (0..3)
            .map(|i| change(&format!("M-{i}"), 1, true, true))
            .collect();
        enqueue(&mut before, changes).await;
    }
    let key_ids = || async {
        let db = Database::connect(url).await.expect("connects");
        let rows = db
            .query_all_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                "SELECT DISTINCT key_id FROM members",
            ))
            .await
            .expect("reads");
        rows.iter()
            .map(|r| r.try_get::<String>("", "key_id").expect("key id"))
            .collect::<Vec<_>>()
    };
    assert_eq!(key_ids().await, ["k1"]);
    {
        let _rotating = start_on(url, Dialect::Groobee, Behaviour::default(), |settings| {
            settings.encryption.current = "k2".into();
            settings.encryption.keys = [
                ("k1".to_owned(), SecretString::from(OLD)),
                ("k2".to_owned(), SecretString::from(NEW)),
            ]
            .into();
            settings.encryption.reencrypt_interval = Duration::from_millis(100);
            settings.delivery.workers = Some(0);
        })
        .await;
        wait_until(
            "every profile is under k2",
            Duration::from_secs(20),
            || async { (key_ids().await == ["k2"]).then_some(()) },
        )
        .await;
    }
    // Only the new key now: the profiles still decrypt and are delivered with their data.
    let after = start_on(url, Dialect::Groobee, Behaviour::default(), |settings| {
        settings.encryption.current = "k2".into();
        settings.encryption.keys = [("k2".to_owned(), SecretString::from(NEW))].into();
    })
    .await;
    for i in 0..3 {
        delivered_at(&after, &format!("M-{i}"), 1).await;
    }
    assert!(after.simulator.members().values().all(|m| m.has_email));
}

/// The engine-parameterized tests, once per engine.
macro_rules! on_both_engines {
    ($($name:ident => $test:ident $(, $extra:expr)?;)*) => {
        mod sqlite {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    $test(Engine::Sqlite $(, $extra)?).await;
                }
            )*
        }
        mod postgres {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    $test(Engine::Postgres $(, $extra)?).await;
                }
            )*
        }
    };
}

on_both_engines! {
    groobee_sends_consented_members_with_only_consented_contact_data =>
        consented_members_are_sent_with_only_their_consented_contact_data, Dialect::Groobee;
    webhook_sends_consented_members_with_only_consented_contact_data =>
        consented_members_are_sent_with_only_their_consented_contact_data, Dialect::Webhook;
    withdrawals =>
        a_withdrawal_overtaking_its_queued_change_sends_nothing_and_a_later_one_an_opt_out;
    refusals => refused_members_are_recorded_and_the_rest_delivered;
    failures => partner_failures_and_a_configuration_error_dead_letter_nothing;
    erasure => erasure_deletes_here_tells_the_partner_and_keeps_older_changes_out;
}
