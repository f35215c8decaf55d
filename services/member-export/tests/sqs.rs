//! The delivery path on the production stack: PostgreSQL for the member table and Amazon SQS
//! (LocalStack, started by `scripts/test.sh`) for the delivery queue. The embedded queue's
//! tests (deliver.rs) prove the rules; these prove the same rules hold when the queue is a
//! real FIFO SQS queue: consent at send time, opt-outs, partner failures waited out with
//! nothing dead-lettered.

mod common;

use std::time::Duration;

use common::{Dialect, change, delivered_at, drained, enqueue, start_on};
use mall_queue::BackendKind;
use mall_test_support::{Engine, TestDatabase, wait_until};
use member_export::simulator::Behaviour;

/// The service on `database` with its delivery queue on LocalStack: a FIFO queue of its own
/// (and its dead-letter queue, which the queue's counts include).
async fn start_on_sqs(
    database: &TestDatabase,
    dialect: Dialect,
    behaviour: Behaviour,
) -> common::Running {
    let endpoint = mall_test_support::sqs_endpoint().await;
    start_on(database.url(), dialect, behaviour, move |settings| {
        let queue = &mut settings.queue;
        queue.backend = BackendKind::Sqs;
        queue.name = format!("member-deliveries-{:016x}", fastrand::u64(..));
        queue.sqs.endpoint_url = Some(endpoint.parse().expect("an endpoint URL"));
        queue.sqs.region = Some("us-east-1".to_owned());
        queue.sqs.access_key_id = Some("test".to_owned());
        queue.sqs.secret_access_key = Some("test".to_owned().into());
        queue.sqs.create_queues = true;
    })
    .await
}

#[tokio::test]
async fn consent_is_checked_at_send_time_and_withdrawals_become_opt_outs_on_sqs() {
    let database = TestDatabase::new(Engine::Postgres).await;
    let mut running = start_on_sqs(&database, Dialect::Groobee, Behaviour::default()).await;
    assert_eq!(running.queue.backend(), BackendKind::Sqs);
    enqueue(
        &mut running,
        vec![
            change("M-1", 1, true, true),
            change("M-2", 3, true, false),
            // Withdrawn before any worker sent it: the partner is told nothing.
            change("M-W", 1, true, true),
            change("M-W", 2, false, false),
        ],
    )
    .await;
    delivered_at(&running, "M-1", 1).await;
    delivered_at(&running, "M-2", 3).await;
    drained(&running).await;
    let members = running.simulator.members();
    assert!(members["M-1"].has_email && members["M-1"].has_phone);
    assert!(
        members["M-2"].has_email && !members["M-2"].has_phone,
        "no phone without SMS consent"
    );
    assert!(!members.contains_key("M-W"), "never sent without consent");

    // Delivered, then withdrawn: an opt-out without contact data.
    enqueue(&mut running, vec![change("M-1", 2, false, false)]).await;
    delivered_at(&running, "M-1", 2).await;
    let member = &running.simulator.members()["M-1"];
    assert!(member.opt_out && !member.has_email && !member.has_phone);
}

#[tokio::test]
async fn partner_failures_are_waited_out_and_nothing_is_dead_lettered_on_sqs() {
    let database = TestDatabase::new(Engine::Postgres).await;
    let flaky = Behaviour {
        error_rate: 0.3,
        ..Behaviour::default()
    };
    let mut running = start_on_sqs(&database, Dialect::Webhook, flaky).await;
    let changes: Vec<_> = (0..40)
        .map(|i| change(&format!("M-{i:02}"), 2, true, i % 2 == 0))
        .collect();
    enqueue(&mut running, changes).await;
    wait_until(
        "every member is delivered at its version",
        Duration::from_secs(60),
        || async {
            let members = running.simulator.members();
            (members.len() == 40 && members.values().all(|m| m.version == 2)).then_some(())
        },
    )
    .await;
    assert!(
        running.simulator.counts().errors > 0,
        "the partner did fail some requests"
    );
    drained(&running).await;
    // Every duplicate delivery (an acceptance racing a timeout) carries its first key.
    for (id, member) in running.simulator.members() {
        assert!(
            member
                .idempotency_keys
                .iter()
                .all(|k| *k == format!("{id}:2")),
            "{id}: {:?}",
            member.idempotency_keys
        );
    }
    assert_eq!(
        running.queue.counts().await.expect("counts").dead,
        0,
        "nothing was dead-lettered"
    );
}
