//! The conformance suite: one set of behaviours, run against every backend — embedded on
//! SQLite, embedded on PostgreSQL, and SQS on LocalStack. A consumer written against one
//! works against the others.
//!
//! Waits poll with deadlines (LocalStack notices an expired visibility up to about a second
//! late); nothing sleeps for an exact time, and no test asserts on speed.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use common::{Harness, Target, bodies_by_group, receive_n};
use mall_queue::{DeadLetterSelection, OutgoingMessage, Queue, QueueCounts, QueueError, limits};
use mall_test_support::wait_until;
use tokio::sync::Mutex;

/// Generates one test per backend for each behaviour.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod embedded_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Target::Sqlite).await;
                }
            )*
        }
        mod embedded_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Target::Postgres).await;
                }
            )*
        }
        mod sqs_localstack {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Target::LocalStack).await;
                }
            )*
        }
    };
}

conformance!(
    body_attributes_and_metadata_round_trip,
    order_within_a_group_holds_under_concurrent_consumers,
    a_group_waits_while_its_message_is_in_flight_and_other_groups_flow,
    visibility_runs_out_unless_extended_and_release_redelivers_at_once,
    a_message_received_max_times_is_dead_lettered_and_redriven_behind_its_group,
    redriving_all_dead_letters_keeps_each_groups_order,
    resends_with_the_same_dedup_id_are_dropped_even_after_delete,
    sends_of_any_size_are_batched_and_invalid_messages_refused_whole,
    a_body_at_the_size_limit_round_trips,
    nothing_is_lost_when_a_consumer_stops_without_deleting,
    messages_survive_a_restart,
    counts_follow_messages_through_their_states,
    a_standard_queue_delivers_everything_and_dead_letters_too,
    a_burst_of_10000_messages_arrives_complete_and_in_group_order,
    concurrent_senders_keep_each_senders_order_and_each_group_in_one_receive,
);

const WAIT: Duration = Duration::from_secs(20);
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn message(group: &str, body: &str) -> OutgoingMessage {
    OutgoingMessage::new(body).with_group(group)
}

async fn wait_for_counts(queue: &Queue, expected: QueueCounts) {
    wait_until(
        &format!("the counts of queue {} are {expected:?}", queue.name()),
        WAIT,
        || async {
            let counts = queue.counts().await.expect("counts work");
            (counts == expected).then_some(())
        },
    )
    .await;
}

async fn body_attributes_and_metadata_round_trip(target: Target) {
    let harness = Harness::new(target).await;
    let (queue, _) = harness.queue(|_| {}).await;
    let body = "ünïcødé ✓ {\"sku\":\"A-1\"}\n\ttabbed \u{1F600}";
    let before = SystemTime::now() - Duration::from_secs(60);
    queue
        .send(vec![
            message("lane-7", body)
                .with_dedup_id("shard-0:1-9")
                .with_attribute("traceparent", TRACEPARENT)
                .with_attribute("content-type", "application/x-protobuf"),
        ])
        .await
        .expect("send works");

    let received = receive_n(&queue, 1, false, WAIT).await;
    let m = &received[0];
    assert_eq!(m.body, body);
    assert_eq!(m.group_id.as_deref(), Some("lane-7"));
    assert_eq!(m.receive_count, 1);
    assert!(!m.message_id.is_empty());
    assert_eq!(
        m.attributes,
        BTreeMap::from([
            (
                "content-type".to_owned(),
                "application/x-protobuf".to_owned()
            ),
            ("traceparent".to_owned(), TRACEPARENT.to_owned()),
        ])
    );
    assert!(m.sent_time > before && m.sent_time < SystemTime::now() + Duration::from_secs(60));
    queue
        .delete(std::slice::from_ref(&m.receipt))
        .await
        .expect("deleted");
    wait_for_counts(&queue, QueueCounts::default()).await;
}

async fn order_within_a_group_holds_under_concurrent_consumers(target: Target) {
    const GROUPS: usize = 8;
    const PER_GROUP: usize = 25;
    let harness = Harness::new(target).await;
    let (queue, _) = harness.queue(|_| {}).await;
    // Interleaved: g0-0, g1-0, ..., g7-0, g0-1, ...
    let messages = (0..PER_GROUP)
        .flat_map(|i| (0..GROUPS).map(move |g| message(&format!("g{g}"), &i.to_string())))
        .collect();
    queue.send(messages).await.expect("send works");

    let seen: Arc<Mutex<BTreeMap<String, Vec<usize>>>> = Arc::default();
    let done = Arc::new(AtomicUsize::new(0));
    let consumers: Vec<_> = (0..4)
        .map(|_| {
            let (queue, seen, done) = (queue.clone(), seen.clone(), done.clone());
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                while done.load(Ordering::SeqCst) < GROUPS * PER_GROUP
                    && tokio::time::Instant::now() < deadline
                {
                    let batch = queue
                        .receive(10, Duration::from_millis(500))
                        .await
                        .expect("receive works");
                    // Processing happens before the delete, as a real consumer's would.
                    for m in &batch {
                        let group = m.group_id.clone().expect("fifo messages have a group");
                        let seq: usize = m.body.parse().expect("numeric body");
                        seen.lock().await.entry(group).or_default().push(seq);
                    }
                    let receipts: Vec<_> = batch.iter().map(|m| m.receipt.clone()).collect();
                    queue.delete(&receipts).await.expect("delete works");
                    done.fetch_add(batch.len(), Ordering::SeqCst);
                }
            })
        })
        .collect();
    for consumer in consumers {
        consumer.await.expect("consumer finished");
    }
    let seen = seen.lock().await;
    assert_eq!(seen.len(), GROUPS);
    for (group, sequence) in seen.iter() {
        assert_eq!(
            *sequence,
            (0..PER_GROUP).collect::<Vec<_>>(),
            "group {group} was delivered out of order or incompletely"
        );
    }
}

async fn a_group_waits_while_its_message_is_in_flight_and_other_groups_flow(target: Target) {
    let harness = Harness::new(target).await;
    let (queue, _) = harness.queue(|_| {}).await;
    queue
        .send(vec![
            message("A", "A1"),
            message("A", "A2"),
            message("B", "B1"),
            message("B", "B2"),
        ])
        .await
        .expect("send works");

    let first = receive_n(&queue, 1, false, WAIT).await.remove(0);
    let (held, other) = if first.body == "A1" {
        ("A", "B")
    } else {
        assert_eq!(
            first.body, "B1",
            "the first message of some group comes first"
        );
        ("B", "A")
    };
    // While `first` is in flight its group is blocked; the other group drains completely.
    let mut flowed = Vec::new();
    while flowed.len() < 2 {
        let batch = receive_n(&queue, 1, true, WAIT).await;
        for m in batch {
            assert_eq!(
                m.group_id.as_deref(),
                Some(other),
                "{} was delivered while {held}1 was in flight",
                m.body
            );
            flowed.push(m.body);
        }
    }
    assert_eq!(flowed, [format!("{other}1"), format!("{other}2")]);
    let nothing = queue
        .receive(10, Duration::from_secs(1))
        .await
        .expect("receive works");
    assert!(nothing.is_empty(), "group {held} is still blocked");

    queue.delete(&[first.receipt]).await.expect("deleted");
    let next = receive_n(&queue, 1, true, WAIT).await;
    assert_eq!(next[0].body, format!("{held}2"));
}

async fn visibility_runs_out_unless_extended_and_release_redelivers_at_once(target: Target) {
    let harness = Harness::new(target).await;
    let (queue, _) = harness
        .queue(|s| s.visibility_timeout = Duration::from_secs(1))
        .await;
    queue
        .send(vec![message("g", "slow work")])
        .await
        .expect("send works");

    let first = receive_n(&queue, 1, false, WAIT).await.remove(0);
    assert_eq!(first.receive_count, 1);
    queue
        .change_visibility(&first.receipt, Duration::from_secs(60))
        .await
        .expect("extended");
    // Well past the original second, the extension keeps it hidden.
    let hidden = queue
        .receive(10, Duration::from_secs(3))
        .await
        .expect("receive works");
    assert!(hidden.is_empty(), "an extended message was delivered again");

    queue
        .change_visibility(&first.receipt, Duration::ZERO)
        .await
        .expect("released");
    let second = receive_n(&queue, 1, false, Duration::from_secs(5))
        .await
        .remove(0);
    assert_eq!(second.body, "slow work");
    assert_eq!(second.receive_count, 2);

    // Not deleted and not extended: it comes back once the second runs out.
    let third = receive_n(&queue, 1, false, WAIT).await.remove(0);
    assert_eq!(third.message_id, first.message_id);
    assert_eq!(third.receive_count, 3);
    queue.delete(&[third.receipt]).await.expect("deleted");
    wait_for_counts(&queue, QueueCounts::default()).await;
}

async fn a_message_received_max_times_is_dead_lettered_and_redriven_behind_its_group(
    target: Target,
) {
    let harness = Harness::new(target).await;
    let (queue, _) = harness.queue(|s| s.max_receives = 2).await;
    queue
        .send(vec![
            message("A", "poison").with_attribute("traceparent", TRACEPARENT),
            message("A", "healthy"),
        ])
        .await
        .expect("send works");

    for attempt in 1..=2 {
        let m = receive_n(&queue, 1, false, WAIT).await.remove(0);
        assert_eq!((m.body.as_str(), m.receive_count), ("poison", attempt));
        queue
            .change_visibility(&m.receipt, Duration::ZERO)
            .await
            .expect("released for a retry");
    }
    // The third attempt finds it dead-lettered, and the group moves on.
    let healthy = receive_n(&queue, 1, false, WAIT).await.remove(0);
    assert_eq!(healthy.body, "healthy");
    wait_for_counts(
        &queue,
        QueueCounts {
            visible: 0,
            in_flight: 1,
            dead: 1,
        },
    )
    .await;

    let (letters, next) = queue
        .list_dead_letters(10, None)
        .await
        .expect("listing works");
    assert_eq!(next, None);
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.body, "poison");
    assert_eq!(letter.group_id.as_deref(), Some("A"));
    assert_eq!(
        letter.attributes.get("traceparent").map(String::as_str),
        Some(TRACEPARENT)
    );
    assert!(letter.receive_count >= 2);

    let redriven = queue
        .redrive_dead_letters(DeadLetterSelection::Ids(vec![letter.id.clone()]))
        .await
        .expect("redrive works");
    assert_eq!(redriven, 1);
    // Behind what group A holds: "healthy" is still in flight, so "poison" waits for it.
    let blocked = queue
        .receive(10, Duration::from_secs(1))
        .await
        .expect("receive works");
    assert!(blocked.is_empty(), "a redriven message jumped its group");
    queue.delete(&[healthy.receipt]).await.expect("deleted");
    let again = receive_n(&queue, 1, true, WAIT).await.remove(0);
    assert_eq!(again.body, "poison");
    assert_eq!(again.receive_count, 1, "a redrive starts a new life");
    wait_for_counts(&queue, QueueCounts::default()).await;
}

async fn redriving_all_dead_letters_keeps_each_groups_order(target: Target) {
    let harness = Harness::new(target).await;
    let (queue, _) = harness.queue(|s| s.max_receives = 1).await;
    queue
        .send(vec![
            message("A", "A1"),
            message("B", "B1"),
            message("A", "A2"),
            message("A", "A3"),
        ])
        .await
        .expect("send works");
    // Every delivery fails at once; after one receive each message is dead.
    wait_until("all four messages are dead letters", WAIT, || async {
        for m in queue
            .receive(10, Duration::from_millis(200))
            .await
            .expect("receive works")
        {
            queue
                .change_visibility(&m.receipt, Duration::ZERO)
                .await
                .expect("released");
        }
        (queue.counts().await.expect("counts").dead == 4).then_some(())
    })
    .await;

    let redriven = queue
        .redrive_dead_letters(DeadLetterSelection::All)
        .await
        .expect("redrive works");
    assert_eq!(redriven, 4);
    let received = receive_n(&queue, 4, true, WAIT).await;
    let groups = bodies_by_group(&received);
    assert_eq!(groups["A"], ["A1", "A2", "A3"]);
    assert_eq!(groups["B"], ["B1"]);
    wait_for_counts(&queue, QueueCounts::default()).await;
}

async fn resends_with_the_same_dedup_id_are_dropped_even_after_delete(target: Target) {
    let harness = Harness::new(target).await;
    let (queue, _) = harness.queue(|_| {}).await;
    queue
        .send(vec![
            message("g", "first").with_dedup_id("d1"),
            message("g", "same call duplicate").with_dedup_id("d1"),
        ])
        .await
        .expect("send works");
    queue
        .send(vec![
            message("g", "later duplicate").with_dedup_id("d1"),
            message("g", "second").with_dedup_id("d2"),
            message("h", "no dedup id"),
            message("h", "no dedup id"),
        ])
        .await
        .expect("duplicates are accepted, not refused");

    let received = receive_n(&queue, 4, true, WAIT).await;
    let groups = bodies_by_group(&received);
    assert_eq!(groups["g"], ["first", "second"]);
    assert_eq!(groups["h"], ["no dedup id", "no dedup id"]);

    queue
        .send(vec![message("g", "after delete").with_dedup_id("d1")])
        .await
        .expect("send works");
    let nothing = queue
        .receive(10, Duration::from_secs(2))
        .await
        .expect("receive works");
    assert!(
        nothing.is_empty(),
        "a duplicate was delivered: {:?}",
        nothing.iter().map(|m| &m.body).collect::<Vec<_>>()
    );
    wait_for_counts(&queue, QueueCounts::default()).await;
}

async fn sends_of_any_size_are_batched_and_invalid_messages_refused_whole(target: Target) {
    let harness = Harness::new(target).await;
    let (queue, _) = harness.queue(|_| {}).await;

    // 25 messages in one call: three SQS batches. One group, so order shows the batching.
    let many = (0..25).map(|i| message("one", &i.to_string())).collect();
    queue.send(many).await.expect("send works");
    let received = receive_n(&queue, 25, true, WAIT).await;
    assert_eq!(
        bodies_by_group(&received)["one"],
        (0..25).map(|i| i.to_string()).collect::<Vec<_>>()
    );

    // 25 groups; a receive of at most 10 returns at most 10.
    let spread = (0..25).map(|i| message(&format!("g{i}"), "x")).collect();
    queue.send(spread).await.expect("send works");
    let batch = wait_until("a receive returns messages", WAIT, || async {
        let batch = queue
            .receive(10, Duration::from_secs(1))
            .await
            .expect("receive works");
        (!batch.is_empty()).then_some(batch)
    })
    .await;
    assert!(batch.len() <= 10, "{} > 10", batch.len());
    let receipts: Vec<_> = batch.iter().map(|m| m.receipt.clone()).collect();
    queue.delete(&receipts).await.expect("deleted");
    receive_n(&queue, 25 - batch.len(), true, WAIT).await;

    // Invalid messages: the whole send is refused before anything goes out.
    let mut crowded = message("g", "crowded");
    for i in 0..=limits::MAX_ATTRIBUTES {
        crowded = crowded.with_attribute(format!("a{i}"), "v");
    }
    let cases = [
        (crowded, "attributes"),
        (
            message("g", &"x".repeat(limits::MAX_MESSAGE_BYTES + 1)),
            "bytes",
        ),
        (OutgoingMessage::new("no group"), "group"),
    ];
    for (invalid, reason) in cases {
        let error = queue
            .send(vec![message("g", "valid"), invalid])
            .await
            .expect_err("refused");
        match error {
            QueueError::InvalidMessage {
                index, reason: why, ..
            } => {
                assert_eq!(index, 1);
                assert!(why.contains(reason), "{why}");
            }
            other => panic!("expected InvalidMessage, got {other:?}"),
        }
    }
    let nothing = queue
        .receive(10, Duration::from_secs(1))
        .await
        .expect("receive works");
    assert!(nothing.is_empty(), "part of a refused send went out");
}

async fn a_body_at_the_size_limit_round_trips(target: Target) {
    let harness = Harness::new(target).await;
    let (queue, _) = harness.queue(|_| {}).await;
    let attribute_cost = "traceparent".len() + "String".len() + TRACEPARENT.len();
    // Two full messages in one send: each needs an SQS batch of its own.
    let body = "b".repeat(limits::MAX_MESSAGE_BYTES - attribute_cost);
    let full = message("g", &body).with_attribute("traceparent", TRACEPARENT);
    assert_eq!(full.size(), limits::MAX_MESSAGE_BYTES);
    queue
        .send(vec![full.clone(), full])
        .await
        .expect("a message of exactly the limit is accepted");
    let received = receive_n(&queue, 2, true, WAIT).await;
    assert!(received.iter().all(|m| m.body == body));
}

async fn nothing_is_lost_when_a_consumer_stops_without_deleting(target: Target) {
    let harness = Harness::new(target).await;
    let (queue, _) = harness
        .queue(|s| s.visibility_timeout = Duration::from_secs(1))
        .await;
    let messages = (0..20)
        .map(|i| message(&format!("g{}", i % 4), &i.to_string()))
        .collect();
    queue.send(messages).await.expect("send works");

    // A consumer takes a batch and dies before deleting anything.
    let doomed = queue.clone();
    let abandoned = tokio::spawn(async move {
        let batch = receive_n(&doomed, 1, false, WAIT).await;
        let ids: BTreeSet<String> = batch.iter().map(|m| m.message_id.clone()).collect();
        ids
    })
    .await
    .expect("consumer ran");
    assert!(!abandoned.is_empty());

    let received = receive_n(&queue, 20, true, Duration::from_secs(60)).await;
    let bodies: BTreeSet<usize> = received
        .iter()
        .map(|m| m.body.parse().expect("numeric"))
        .collect();
    assert_eq!(bodies, (0..20).collect());
    for m in received
        .iter()
        .filter(|m| abandoned.contains(&m.message_id))
    {
        assert!(
            m.receive_count >= 2,
            "{} came back as a second delivery",
            m.body
        );
    }
    for (group, bodies) in bodies_by_group(&received) {
        let numbers: Vec<usize> = bodies.iter().map(|b| b.parse().expect("numeric")).collect();
        assert!(
            numbers.windows(2).all(|w| w[0] < w[1]),
            "group {group}: {numbers:?}"
        );
    }
    wait_for_counts(&queue, QueueCounts::default()).await;
}

async fn messages_survive_a_restart(target: Target) {
    let mut harness = Harness::new(target).await;
    let (queue, settings) = harness
        .queue(|s| s.visibility_timeout = Duration::from_secs(1))
        .await;
    queue
        .send((0..5).map(|i| message("g", &i.to_string())).collect())
        .await
        .expect("send works");
    let in_flight = receive_n(&queue, 1, false, WAIT).await;
    assert_eq!(in_flight[0].body, "0");
    drop(queue);

    let queue = harness.restart(&settings).await;
    let received = receive_n(&queue, 5, true, WAIT).await;
    assert_eq!(bodies_by_group(&received)["g"], ["0", "1", "2", "3", "4"]);
    assert_eq!(received[0].receive_count, 2);
    wait_for_counts(&queue, QueueCounts::default()).await;
}

async fn counts_follow_messages_through_their_states(target: Target) {
    let harness = Harness::new(target).await;
    let (queue, _) = harness.queue(|_| {}).await;
    queue
        .send(vec![
            message("a", "1"),
            message("b", "2"),
            message("c", "3"),
        ])
        .await
        .expect("send works");
    wait_for_counts(
        &queue,
        QueueCounts {
            visible: 3,
            in_flight: 0,
            dead: 0,
        },
    )
    .await;
    let taken = receive_n(&queue, 1, false, WAIT).await;
    wait_for_counts(
        &queue,
        QueueCounts {
            visible: 2,
            in_flight: 1,
            dead: 0,
        },
    )
    .await;
    queue
        .delete(&[taken[0].receipt.clone()])
        .await
        .expect("deleted");
    wait_for_counts(
        &queue,
        QueueCounts {
            visible: 2,
            in_flight: 0,
            dead: 0,
        },
    )
    .await;
    let by_group = queue.counts_by_group().await.expect("counts work");
    if harness.is_sqs() {
        assert_eq!(by_group, None, "SQS cannot count by group");
    } else {
        let by_group = by_group.expect("the embedded queue counts by group");
        assert_eq!(by_group.len(), 2);
        assert!(by_group.values().all(|g| g.visible == 1));
    }
}

async fn a_standard_queue_delivers_everything_and_dead_letters_too(target: Target) {
    let harness = Harness::new(target).await;
    let (queue, _) = harness
        .queue(|s| {
            s.fifo = false;
            s.max_receives = 1;
        })
        .await;
    queue
        .send(
            (0..20)
                .map(|i| OutgoingMessage::new(i.to_string()).with_attribute("n", i.to_string()))
                .collect(),
        )
        .await
        .expect("a standard queue needs no groups");
    let received = receive_n(&queue, 20, false, WAIT).await;
    let bodies: BTreeSet<String> = received.iter().map(|m| m.body.clone()).collect();
    assert_eq!(bodies.len(), 20);
    assert!(received.iter().all(|m| m.attributes["n"] == m.body));
    let (fail, ok): (Vec<_>, Vec<_>) = received.into_iter().partition(|m| m.body == "7");
    let receipts: Vec<_> = ok.iter().map(|m| m.receipt.clone()).collect();
    queue.delete(&receipts).await.expect("deleted");
    queue
        .change_visibility(&fail[0].receipt, Duration::ZERO)
        .await
        .expect("released");
    wait_until("the failed message is a dead letter", WAIT, || async {
        let extra = queue
            .receive(10, Duration::from_millis(200))
            .await
            .expect("receive works");
        assert!(extra.is_empty(), "a dead letter was delivered again");
        (queue.counts().await.expect("counts").dead == 1).then_some(())
    })
    .await;
    assert_eq!(
        queue
            .redrive_dead_letters(DeadLetterSelection::All)
            .await
            .expect("redrive works"),
        1
    );
    let back = receive_n(&queue, 1, true, WAIT).await;
    assert_eq!(back[0].body, "7");
    wait_for_counts(&queue, QueueCounts::default()).await;
}

async fn a_burst_of_10000_messages_arrives_complete_and_in_group_order(target: Target) {
    const TOTAL: usize = 10_000;
    const GROUPS: usize = 16;
    let harness = Harness::new(target).await;
    let (queue, _) = harness
        .queue(|s| s.visibility_timeout = Duration::from_secs(300))
        .await;
    // Sent by four producers at once, each owning four groups, 500 messages per call.
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let queue = queue.clone();
            tokio::spawn(async move {
                let mine: Vec<usize> = (0..TOTAL).filter(|i| (i % GROUPS) % 4 == p).collect();
                for chunk in mine.chunks(500) {
                    let messages = chunk
                        .iter()
                        .map(|i| message(&format!("g{}", i % GROUPS), &i.to_string()))
                        .collect();
                    queue.send(messages).await.expect("send works");
                }
            })
        })
        .collect();

    let seen: Arc<Mutex<Vec<(String, usize)>>> = Arc::default();
    let done = Arc::new(AtomicUsize::new(0));
    let consumers: Vec<_> = (0..4)
        .map(|_| {
            let (queue, seen, done) = (queue.clone(), seen.clone(), done.clone());
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
                while done.load(Ordering::SeqCst) < TOTAL {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "only {} of {TOTAL} messages arrived within 240s",
                        done.load(Ordering::SeqCst)
                    );
                    let batch = queue
                        .receive(10, Duration::from_millis(500))
                        .await
                        .expect("receive works");
                    {
                        let mut seen = seen.lock().await;
                        for m in &batch {
                            let group = m.group_id.clone().expect("grouped");
                            seen.push((group, m.body.parse().expect("numeric")));
                        }
                    }
                    let receipts: Vec<_> = batch.iter().map(|m| m.receipt.clone()).collect();
                    queue.delete(&receipts).await.expect("delete works");
                    done.fetch_add(batch.len(), Ordering::SeqCst);
                }
            })
        })
        .collect();
    for producer in producers {
        producer.await.expect("producer finished");
    }
    for consumer in consumers {
        consumer.await.expect("consumer finished");
    }

    let seen = seen.lock().await;
    assert_eq!(seen.len(), TOTAL, "no message twice");
    let mut by_group: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (group, n) in seen.iter() {
        by_group.entry(group).or_default().push(*n);
    }
    assert_eq!(by_group.len(), GROUPS);
    for (group, numbers) in by_group {
        let expected: Vec<usize> = (0..TOTAL)
            .filter(|i| format!("g{}", i % GROUPS) == group)
            .collect();
        assert_eq!(
            numbers, expected,
            "group {group} out of order or incomplete"
        );
    }
    wait_for_counts(&queue, QueueCounts::default()).await;
}

/// Eight senders send to the same four groups at once (on PostgreSQL their transactions
/// commit in parallel, in any order) while four consumers receive: each sender's messages
/// arrive in the order it sent them, every message once, and a group is never in flight in
/// two receives at once.
async fn concurrent_senders_keep_each_senders_order_and_each_group_in_one_receive(target: Target) {
    const SENDERS: usize = 8;
    const SENDS: usize = 25;
    const GROUPS: usize = 4;
    let harness = Harness::new(target).await;
    let (queue, _) = harness.queue(|_| {}).await;
    let senders: Vec<_> = (0..SENDERS)
        .map(|sender| {
            let queue = queue.clone();
            tokio::spawn(async move {
                for i in 0..SENDS {
                    let messages = (0..GROUPS)
                        .map(|g| message(&format!("g{g}"), &format!("{sender}:{i}")))
                        .collect();
                    queue.send(messages).await.expect("send works");
                }
            })
        })
        .collect();
    let total = SENDERS * SENDS * GROUPS;
    let in_flight: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    // (group, sender) → the indexes received, in order.
    type Seen = BTreeMap<(String, usize), Vec<usize>>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let done = Arc::new(AtomicUsize::new(0));
    let consumers: Vec<_> = (0..4)
        .map(|_| {
            let (queue, in_flight, seen, done) =
                (queue.clone(), in_flight.clone(), seen.clone(), done.clone());
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
                while done.load(Ordering::SeqCst) < total {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "every message arrives in time"
                    );
                    let batch = queue
                        .receive(10, Duration::from_millis(200))
                        .await
                        .expect("receive works");
                    // One receive may hold several messages of a group (SQS returns them in
                    // order); no other receive may hold that group meanwhile.
                    let groups: BTreeSet<String> = batch
                        .iter()
                        .map(|m| m.group_id.clone().expect("fifo messages have a group"))
                        .collect();
                    for group in &groups {
                        assert!(
                            in_flight.lock().await.insert(group.clone()),
                            "group {group} was in flight in two receives at once"
                        );
                    }
                    for m in &batch {
                        let group = m.group_id.clone().expect("fifo messages have a group");
                        let (sender, i) = m.body.split_once(':').expect("sender:index");
                        seen.lock()
                            .await
                            .entry((group, sender.parse().expect("sender")))
                            .or_default()
                            .push(i.parse().expect("index"));
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    // Out of the in-flight set before the delete: once deleted, the group's
                    // next message may go to another consumer at once.
                    for group in &groups {
                        in_flight.lock().await.remove(group);
                    }
                    let receipts: Vec<_> = batch.iter().map(|m| m.receipt.clone()).collect();
                    queue.delete(&receipts).await.expect("delete works");
                    done.fetch_add(batch.len(), Ordering::SeqCst);
                }
            })
        })
        .collect();
    for sender in senders {
        sender.await.expect("sender finished");
    }
    for consumer in consumers {
        consumer.await.expect("consumer finished");
    }
    let seen = seen.lock().await;
    assert_eq!(seen.len(), SENDERS * GROUPS);
    for ((group, sender), sequence) in seen.iter() {
        assert_eq!(
            *sequence,
            (0..SENDS).collect::<Vec<_>>(),
            "sender {sender}'s messages to {group} arrived out of order, twice or not at all"
        );
    }
}
