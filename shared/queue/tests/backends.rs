//! Behaviour particular to one backend: what the embedded queue promises beyond SQS (counts
//! by group, several queues in one database, strict receipts, its migration living beside a
//! service's own), and how the SQS backend handles missing queues.

mod common;

use std::time::Duration;

use common::{Harness, Target, receive_n};
use mall_queue::{OutgoingMessage, Queue, QueueError, QueueSettings};
use sea_orm_migration::{
    MigrationName, MigrationTrait, MigratorTrait, SchemaManager, async_trait,
    sea_orm::{ConnectionTrait as _, DbErr},
};

macro_rules! embedded {
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
    };
}

/// PostgreSQL: sends commit in parallel, so a group's committed message can have an earlier
/// send before it that has not committed yet. A receive waits for it instead of delivering
/// the later one first (and then both at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_send_that_commits_late_still_comes_first_in_its_group() {
    use sea_orm_migration::sea_orm::TransactionTrait as _;
    let harness = Harness::new(Target::Postgres).await;
    let (queue, settings) = harness.queue(|_| {}).await;
    // A send that has stored its row and not committed yet, as a slow sender's would be.
    let slow = harness.db().begin().await.expect("begin");
    slow.execute_unprepared(&format!(
        "INSERT INTO mall_queue_messages (queue, message_id, group_id, body, attributes, \
         sent_at, visible_at) VALUES ('{}', 'slow-1', 'g', 'first', '{{}}', 0, 0)",
        settings.name
    ))
    .await
    .expect("the slow send stores its row");
    queue
        .send(vec![OutgoingMessage::new("second").with_group("g")])
        .await
        .expect("a later send commits first");
    let early = queue
        .receive(10, Duration::from_millis(300))
        .await
        .expect("receive works");
    assert!(
        early.is_empty(),
        "nothing is delivered while an earlier send may still commit: {early:?}"
    );
    slow.commit().await.expect("the slow send commits");
    let bodies: Vec<String> = receive_n(&queue, 2, true, Duration::from_secs(10))
        .await
        .into_iter()
        .map(|m| m.body)
        .collect();
    assert_eq!(bodies, ["first", "second"], "the group in send order");
}

/// PostgreSQL: a transaction of another database on the same server (the catalog's, beside
/// the relay's queue) cannot write this queue, so it holds nothing back: a group's messages
/// sent while it runs, and the runs behind them, are delivered before it ends. One of this
/// database still holds them back (the test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_databases_running_transaction_holds_no_group_back() {
    use sea_orm_migration::sea_orm::{Database, TransactionTrait as _};
    let harness = Harness::new(Target::Postgres).await;
    let (queue, _) = harness.queue(|_| {}).await;
    let elsewhere = mall_test_support::TestDatabase::postgres().await;
    let other = Database::connect(elsewhere.url())
        .await
        .expect("connects to the other database");
    let running = other.begin().await.expect("begin");
    // An id of its own, as a writing transaction has (it begins before every send below).
    running
        .execute_unprepared("SELECT pg_current_xact_id()")
        .await
        .expect("takes a transaction id");
    let messages: Vec<OutgoingMessage> = (0..3)
        .map(|i| OutgoingMessage::new(format!("m{i}")).with_group("g"))
        .collect();
    queue.send(messages).await.expect("sent");
    queue
        .send(vec![OutgoingMessage::new("h").with_group("h")])
        .await
        .expect("sent");
    let got = queue
        .receive(10, Duration::from_secs(3))
        .await
        .expect("receive works");
    let bodies: Vec<&str> = got.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(
        bodies,
        ["m0", "m1", "m2", "h"],
        "both groups, g as one run, while the other database's transaction runs"
    );
    running.rollback().await.expect("rolls back");
}

embedded!(
    a_group_comes_as_a_run_and_waits_while_any_of_it_is_in_flight,
    receives_one_after_another_take_different_groups_when_told_how_many,
    a_group_blocked_behind_its_run_does_not_use_up_a_bounded_receive,
    counts_by_group_show_where_the_backlog_is,
    queues_sharing_a_database_stay_apart,
    a_stale_receipt_can_neither_delete_nor_extend_a_redelivered_message,
    dead_letters_page_in_order,
    the_queue_migration_runs_beside_a_services_own,
);

/// A group with a backlog gives its head and the messages behind it in one receive (up to
/// `MAX_GROUP_RUN`), so a consumer does not pay a round trip per message; the group then
/// waits while any message of that run is in flight, also after its head alone was released.
async fn a_group_comes_as_a_run_and_waits_while_any_of_it_is_in_flight(target: Target) {
    use mall_queue::limits::MAX_GROUP_RUN;
    let harness = Harness::new(target).await;
    let (queue, _) = harness.queue(|_| {}).await;
    let a: Vec<String> = (1..=MAX_GROUP_RUN + 2).map(|i| format!("A{i}")).collect();
    let mut messages: Vec<OutgoingMessage> = a
        .iter()
        .map(|body| OutgoingMessage::new(body.clone()).with_group("A"))
        .collect();
    messages.extend(["B1", "B2"].map(|body| OutgoingMessage::new(body).with_group("B")));
    queue.send(messages).await.expect("send works");

    let first = queue
        .receive(100, Duration::from_secs(5))
        .await
        .expect("receive works");
    let groups = common::bodies_by_group(&first);
    assert_eq!(
        groups["A"],
        a[..MAX_GROUP_RUN],
        "a run of A, from its head, in order"
    );
    assert_eq!(groups["B"], ["B1", "B2"], "all of B behind its head");

    // The head released, the rest of its run still held: A gives nothing.
    let head = first.iter().find(|m| m.body == "A1").expect("A1 received");
    queue
        .change_visibility(&head.receipt, Duration::ZERO)
        .await
        .expect("released");
    let blocked = queue
        .receive(100, Duration::from_millis(300))
        .await
        .expect("receive works");
    assert!(
        blocked.is_empty(),
        "A was delivered while its run was in flight: {blocked:?}"
    );

    // The rest of the run done: A1 comes again, with what is behind it.
    let rest: Vec<_> = first
        .iter()
        .filter(|m| m.body != "A1")
        .map(|m| m.receipt.clone())
        .collect();
    queue.delete(&rest).await.expect("deleted");
    let second = queue
        .receive(2, Duration::from_secs(5))
        .await
        .expect("receive works");
    let bodies: Vec<&str> = second.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(
        bodies,
        [a[0].as_str(), a[MAX_GROUP_RUN].as_str()],
        "at most `max` in all"
    );
    assert_eq!(second[0].receive_count, 2);
    let receipts: Vec<_> = second.iter().map(|m| m.receipt.clone()).collect();
    queue.delete(&receipts).await.expect("deleted");
    let last = receive_n(&queue, 1, true, Duration::from_secs(5)).await;
    assert_eq!(last[0].body, a[MAX_GROUP_RUN + 1]);
}

/// `receive_from_groups` takes the runs of at most that many groups, the oldest heads first,
/// so consumers receiving one after another (or side by side) get different groups instead
/// of the first one holding them all; the same backlog in one plain receive spreads over
/// every group.
async fn receives_one_after_another_take_different_groups_when_told_how_many(target: Target) {
    let harness = Harness::new(target).await;
    let (queue, _) = harness.queue(|_| {}).await;
    // Sent in this order, so the oldest heads are not the first names.
    let groups = ["G5", "G3", "G1", "G4", "G2"];
    for round in 1..=3 {
        let messages = groups
            .iter()
            .map(|g| OutgoingMessage::new(format!("{g}-{round}")).with_group(*g))
            .collect();
        queue.send(messages).await.expect("send works");
    }
    let mut seen = Vec::new();
    for expected in [["G3", "G5"].as_slice(), &["G1", "G4"], &["G2"]] {
        let received = queue
            .receive_from_groups(100, 2, Duration::from_secs(5))
            .await
            .expect("receive works");
        let by_group = common::bodies_by_group(&received);
        let got: Vec<&str> = by_group.keys().map(String::as_str).collect();
        assert_eq!(got, expected, "the oldest heads' groups not yet held");
        for (group, bodies) in &by_group {
            assert_eq!(
                bodies,
                &[1, 2, 3].map(|round| format!("{group}-{round}")),
                "each group's whole run, in order"
            );
        }
        seen.extend(received);
    }
    let nothing = queue
        .receive_from_groups(100, 2, Duration::from_millis(300))
        .await
        .expect("receive works");
    assert!(nothing.is_empty(), "every group is held: {nothing:?}");

    // Given back, one plain receive takes every group again.
    for message in &seen {
        queue
            .change_visibility(&message.receipt, Duration::ZERO)
            .await
            .expect("released");
    }
    let all = queue
        .receive(100, Duration::from_secs(5))
        .await
        .expect("receive works");
    assert_eq!(common::bodies_by_group(&all).len(), groups.len());
}

/// A group whose head is visible again while the rest of its run is still in flight gives
/// nothing, and must not take one of a bounded receive's places: the next group comes
/// instead. (Such a head is always among the oldest; counted, a few of them would stall every
/// bounded receive until their runs' visibility ran out.)
async fn a_group_blocked_behind_its_run_does_not_use_up_a_bounded_receive(target: Target) {
    let harness = Harness::new(target).await;
    let (queue, _) = harness.queue(|_| {}).await;
    let a = ["A1", "A2", "A3"].map(|body| OutgoingMessage::new(body).with_group("A"));
    queue.send(a.to_vec()).await.expect("send works");
    queue
        .send(vec![OutgoingMessage::new("B1").with_group("B")])
        .await
        .expect("send works");
    let first = queue
        .receive_from_groups(100, 1, Duration::from_secs(5))
        .await
        .expect("receive works");
    let bodies: Vec<&str> = first.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(bodies, ["A1", "A2", "A3"], "the oldest head's group");
    let head = first.iter().find(|m| m.body == "A1").expect("A1 received");
    queue
        .change_visibility(&head.receipt, Duration::ZERO)
        .await
        .expect("released");
    let next = queue
        .receive_from_groups(100, 1, Duration::from_secs(2))
        .await
        .expect("receive works");
    let bodies: Vec<&str> = next.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(
        bodies,
        ["B1"],
        "A is blocked behind its run; B comes instead"
    );
}

async fn counts_by_group_show_where_the_backlog_is(target: Target) {
    let harness = Harness::new(target).await;
    let (queue, _) = harness.queue(|s| s.max_receives = 1).await;
    queue
        .send(vec![
            OutgoingMessage::new("1").with_group("busy"),
            OutgoingMessage::new("2").with_group("busy"),
            OutgoingMessage::new("3").with_group("busy"),
            OutgoingMessage::new("4").with_group("quiet"),
        ])
        .await
        .expect("send works");
    let first = receive_n(&queue, 1, false, Duration::from_secs(10))
        .await
        .remove(0);
    let groups = queue
        .counts_by_group()
        .await
        .expect("counts work")
        .expect("embedded counts by group");
    let held = first.group_id.clone().expect("grouped");
    let busy = groups["busy"];
    let quiet = groups["quiet"];
    if held == "busy" {
        assert_eq!((busy.visible, busy.in_flight, busy.dead), (2, 1, 0));
        assert_eq!((quiet.visible, quiet.in_flight), (1, 0));
    } else {
        assert_eq!((busy.visible, busy.in_flight), (3, 0));
        assert_eq!((quiet.visible, quiet.in_flight), (0, 1));
    }
}

async fn queues_sharing_a_database_stay_apart(target: Target) {
    let harness = Harness::new(target).await;
    let (orders, _) = harness.queue(|_| {}).await;
    let (exports, _) = harness.queue(|s| s.fifo = false).await;
    orders
        .send(vec![OutgoingMessage::new("order").with_group("g")])
        .await
        .expect("send works");
    exports
        .send(vec![OutgoingMessage::new("export")])
        .await
        .expect("send works");
    let from_exports = receive_n(&exports, 1, true, Duration::from_secs(10)).await;
    assert_eq!(from_exports[0].body, "export");
    let nothing = exports
        .receive(10, Duration::from_millis(300))
        .await
        .expect("receive works");
    assert!(nothing.is_empty(), "a queue saw another queue's message");
    let from_orders = receive_n(&orders, 1, true, Duration::from_secs(10)).await;
    assert_eq!(from_orders[0].body, "order");
}

async fn a_stale_receipt_can_neither_delete_nor_extend_a_redelivered_message(target: Target) {
    let harness = Harness::new(target).await;
    let (queue, _) = harness
        .queue(|s| s.visibility_timeout = Duration::from_secs(1))
        .await;
    queue
        .send(vec![OutgoingMessage::new("m").with_group("g")])
        .await
        .expect("send works");
    let first = receive_n(&queue, 1, false, Duration::from_secs(10))
        .await
        .remove(0);
    let second = receive_n(&queue, 1, false, Duration::from_secs(10))
        .await
        .remove(0);
    assert_eq!(second.receive_count, 2);
    queue
        .change_visibility(&second.receipt, Duration::from_secs(60))
        .await
        .expect("the current receipt works");

    let error = queue
        .delete(std::slice::from_ref(&first.receipt))
        .await
        .expect_err("stale receipt");
    assert!(
        matches!(error, QueueError::ReceiptExpired { count: 1, .. }),
        "{error:?}"
    );
    let error = queue
        .change_visibility(&first.receipt, Duration::ZERO)
        .await
        .expect_err("stale receipt");
    assert!(matches!(error, QueueError::ReceiptExpired { .. }));
    let error = queue
        .delete(&[mall_queue::Receipt::from_string("garbage".to_owned())])
        .await
        .expect_err("malformed receipt");
    assert!(matches!(error, QueueError::ReceiptExpired { .. }));

    queue
        .delete(std::slice::from_ref(&second.receipt))
        .await
        .expect("the current receipt deletes");
    queue
        .delete(std::slice::from_ref(&second.receipt))
        .await
        .expect("deleting twice is not an error");
}

async fn dead_letters_page_in_order(target: Target) {
    let harness = Harness::new(target).await;
    let (queue, _) = harness.queue(|s| s.max_receives = 1).await;
    let groups = 7;
    queue
        .send(
            (0..groups)
                .map(|i| OutgoingMessage::new(i.to_string()).with_group(format!("g{i}")))
                .collect(),
        )
        .await
        .expect("send works");
    mall_test_support::wait_until("every message is dead", Duration::from_secs(20), || async {
        for m in queue
            .receive(10, Duration::from_millis(100))
            .await
            .expect("receive works")
        {
            queue
                .change_visibility(&m.receipt, Duration::ZERO)
                .await
                .expect("released");
        }
        (queue.counts().await.expect("counts").dead == groups).then_some(())
    })
    .await;

    let mut bodies = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let (page, next) = queue
            .list_dead_letters(3, token.as_deref())
            .await
            .expect("listing works");
        pages += 1;
        bodies.extend(page.into_iter().map(|m| m.body));
        match next {
            Some(next) => token = Some(next),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(
        bodies,
        (0..groups).map(|i| i.to_string()).collect::<Vec<_>>()
    );
    let error = queue
        .list_dead_letters(3, Some("not-a-token"))
        .await
        .expect_err("bad token");
    assert!(matches!(error, QueueError::InvalidArgument { .. }));
}

/// A service's own table, to show the queue's migration runs beside it.
struct ServiceTable;

impl MigrationName for ServiceTable {
    fn name(&self) -> &str {
        "m20261125_000001_service_table"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for ServiceTable {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("CREATE TABLE service_things (id integer PRIMARY KEY)")
            .await
            .map(|_| ())
    }
}

struct ServiceMigrator;

impl MigratorTrait for ServiceMigrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut all: Vec<Box<dyn MigrationTrait>> = vec![Box::new(ServiceTable)];
        all.extend(mall_queue::embedded::migrations());
        all
    }
}

async fn the_queue_migration_runs_beside_a_services_own(target: Target) {
    let engine = match target {
        Target::Sqlite => mall_test_support::Engine::Sqlite,
        _ => mall_test_support::Engine::Postgres,
    };
    let database = mall_test_support::TestDatabase::new(engine).await;
    let settings = mall_db::DatabaseSettings {
        url: secrecy::SecretString::from(database.url().to_owned()),
        ..mall_db::DatabaseSettings::default()
    };
    // Without the queue's migration, opening says what is missing.
    struct NoQueue;
    impl MigratorTrait for NoQueue {
        fn migrations() -> Vec<Box<dyn MigrationTrait>> {
            vec![Box::new(ServiceTable)]
        }
    }
    let db = mall_db::connect::<NoQueue>(&settings)
        .await
        .expect("connects");
    let error = Queue::open(&QueueSettings::default(), Some(db.clone()))
        .await
        .expect_err("tables missing");
    assert!(
        format!("{error:#}").contains("mall_queue::embedded::migrations()"),
        "{error:#}"
    );
    db.close().await.expect("closes");

    // With it, both tables are there and the migration is applied once, under its name.
    let db = mall_db::connect::<ServiceMigrator>(&settings)
        .await
        .expect("connects");
    db.close().await.expect("closes");
    let db = mall_db::connect::<ServiceMigrator>(&settings)
        .await
        .expect("running the migrations again is a no-op");
    let applied = ServiceMigrator::get_applied_migrations(&db)
        .await
        .expect("applied migrations");
    let names: Vec<String> = applied.iter().map(|m| m.name().to_owned()).collect();
    assert_eq!(
        names,
        [
            "m20261125_000001_service_table",
            mall_queue::embedded::MIGRATION_NAME,
            "m20261202_100001_queue_commit_order",
        ]
    );
    let queue = Queue::open(&QueueSettings::default(), Some(db.clone()))
        .await
        .expect("opens");
    queue
        .send(vec![OutgoingMessage::new("x").with_group("g")])
        .await
        .expect("send works");
    db.execute_unprepared("INSERT INTO service_things (id) VALUES (1)")
        .await
        .expect("the service's table is there too");
}

#[tokio::test]
async fn an_sqs_queue_that_does_not_exist_is_named_unless_created() {
    let harness = Harness::new(Target::LocalStack).await;
    let mut settings = harness.settings();
    settings.sqs.create_queues = false;
    let error = Queue::open(&settings, None)
        .await
        .expect_err("no such queue");
    let text = format!("{error:#}");
    assert!(text.contains("create_queues"), "{text}");
    assert!(
        text.contains(&format!("{}-dlq.fifo", settings.name)),
        "{text}"
    );

    settings.sqs.create_queues = true;
    let queue = Queue::open(&settings, None).await.expect("created");
    assert_eq!(
        queue.counts_by_group().await.expect("answers"),
        None,
        "SQS cannot count by group"
    );
    // Opening again with create_queues finds them and updates their attributes.
    settings.max_receives = 3;
    Queue::open(&settings, None)
        .await
        .expect("reopened")
        .ping()
        .await
        .expect("answers");
}

#[tokio::test]
async fn an_embedded_queue_without_a_database_is_refused_plainly() {
    let error = Queue::open(&QueueSettings::default(), None)
        .await
        .expect_err("no database");
    assert!(error.to_string().contains("database"), "{error}");
}
