//! Throughput of send → receive → delete through each backend, the way sync-relay uses a
//! queue: producers sending batches into 16 or 64 FIFO groups while consumers receive up to
//! 10, process in order and delete.
//!
//! ```sh
//! cargo bench -p mall-queue --bench queue                      # sqlite, postgres and sqs
//! cargo bench -p mall-queue --bench queue -- sqlite postgres   # a subset
//! ```
//!
//! PostgreSQL comes from `MALL_TEST_POSTGRES_URL` and LocalStack from
//! `MALL_TEST_SQS_ENDPOINT`, as for the tests (`scripts/localstack.sh start` starts it); a
//! backend that is asked for and unreachable fails the run rather than being skipped.
//! Prints a Markdown table for BENCHMARKS.md.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use mall_queue::{
    BackendKind, OutgoingMessage, PackBudget, Queue, QueueSettings, encode_body, pack,
};
use mall_test_support::{Engine, TestDatabase};
use sea_orm_migration::{MigrationTrait, MigratorTrait};
use secrecy::SecretString;

struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        mall_queue::embedded::migrations()
    }
}

/// Size of one record, about one encoded product change.
const RECORD_BYTES: usize = 200;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Sqlite,
    Postgres,
    Sqs,
}

impl Target {
    fn label(self) -> &'static str {
        match self {
            Self::Sqlite => "embedded, SQLite",
            Self::Postgres => "embedded, PostgreSQL",
            Self::Sqs => "SQS, LocalStack",
        }
    }
}

/// A queue on a backend; holds the database alive for the run.
struct Backend {
    _database: Option<TestDatabase>,
    db: Option<mall_db::sea_orm::DatabaseConnection>,
    endpoint: Option<String>,
}

impl Backend {
    async fn new(target: Target) -> Self {
        let (database, endpoint) = match target {
            Target::Sqlite => (Some(TestDatabase::new(Engine::Sqlite).await), None),
            Target::Postgres => (Some(TestDatabase::new(Engine::Postgres).await), None),
            Target::Sqs => (None, Some(mall_test_support::sqs_endpoint().await)),
        };
        let db = match &database {
            Some(database) => Some(
                mall_db::connect::<Migrator>(&mall_db::DatabaseSettings {
                    url: SecretString::from(database.url().to_owned()),
                    ..mall_db::DatabaseSettings::default()
                })
                .await
                .expect("benchmark database connects"),
            ),
            None => None,
        };
        Self {
            _database: database,
            db,
            endpoint,
        }
    }

    async fn queue(&self) -> Queue {
        self.named_queue(&format!(
            "bench{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ))
        .await
    }

    async fn named_queue(&self, name: &str) -> Queue {
        let mut settings = QueueSettings {
            name: name.to_owned(),
            visibility_timeout: Duration::from_secs(300),
            ..QueueSettings::default()
        };
        if let Some(endpoint) = &self.endpoint {
            settings.backend = BackendKind::Sqs;
            settings.sqs.endpoint_url = Some(endpoint.parse().expect("endpoint is a url"));
            settings.sqs.region = Some("us-east-1".to_owned());
            settings.sqs.access_key_id = Some("test".to_owned());
            settings.sqs.secret_access_key = Some(SecretString::from("test"));
            settings.sqs.create_queues = true;
        }
        Queue::open(&settings, self.db.clone())
            .await
            .expect("benchmark queue opens")
    }
}

/// One measured run.
struct Run {
    messages: usize,
    records_per_message: usize,
    groups: usize,
    consumers: usize,
    elapsed: Duration,
}

/// Sends `bodies` round-robin over `groups` from one producer in calls of 100, while
/// `consumers` receive, delete and count; returns when every message was deleted.
async fn run(
    queue: &Queue,
    bodies: Vec<String>,
    records_per_message: usize,
    groups: usize,
    consumers: usize,
) -> Run {
    let total = bodies.len();
    let start = Instant::now();
    let producer = {
        let queue = queue.clone();
        tokio::spawn(async move {
            let mut messages: Vec<OutgoingMessage> = bodies
                .into_iter()
                .enumerate()
                .map(|(i, body)| {
                    OutgoingMessage::new(body).with_group(format!("lane-{}", i % groups))
                })
                .collect();
            while !messages.is_empty() {
                let rest = messages.split_off(messages.len().min(100));
                queue.send(messages).await.expect("send works");
                messages = rest;
            }
        })
    };
    let done = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..consumers)
        .map(|_| {
            let (queue, done) = (queue.clone(), done.clone());
            tokio::spawn(async move {
                while done.load(Ordering::SeqCst) < total {
                    let batch = queue
                        .receive(10, Duration::from_millis(200))
                        .await
                        .expect("receive works");
                    if batch.is_empty() {
                        continue;
                    }
                    let receipts: Vec<_> = batch.iter().map(|m| m.receipt.clone()).collect();
                    queue.delete(&receipts).await.expect("delete works");
                    done.fetch_add(batch.len(), Ordering::SeqCst);
                }
            })
        })
        .collect();
    let wait = async {
        producer.await.expect("producer finished");
        for worker in workers {
            worker.await.expect("consumer finished");
        }
    };
    tokio::time::timeout(Duration::from_secs(600), wait)
        .await
        .expect("a benchmark run finishes within 10 minutes");
    Run {
        messages: total,
        records_per_message,
        groups,
        consumers,
        elapsed: start.elapsed(),
    }
}

/// Fills queue `name` with `messages` one-record messages over `groups` groups in one
/// statement (sending a million through the API would take minutes), as `send` stores them.
async fn prefill(
    db: &mall_db::sea_orm::DatabaseConnection,
    name: &str,
    messages: usize,
    groups: usize,
) {
    use mall_db::sea_orm::ConnectionTrait as _;
    let body = "x".repeat(RECORD_BYTES);
    // Sent now: older messages would be past the queue's retention.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis();
    let sql = match db.get_database_backend() {
        mall_db::sea_orm::DbBackend::Postgres => format!(
            "INSERT INTO mall_queue_messages (queue, message_id, group_id, body, attributes, \
             sent_at, visible_at, receive_count, dead) \
             SELECT '{name}', 'm' || g, 'lane-' || (g % {groups}), '{body}', '{{}}', {now}, 0, 0, 0 \
             FROM generate_series(0, {messages} - 1) AS g; ANALYZE mall_queue_messages"
        ),
        _ => format!(
            "WITH RECURSIVE n(g) AS (SELECT 0 UNION ALL SELECT g + 1 FROM n WHERE g + 1 < {messages}) \
             INSERT INTO mall_queue_messages (queue, message_id, group_id, body, attributes, \
             sent_at, visible_at, receive_count, dead) \
             SELECT '{name}', 'm' || g, 'lane-' || (g % {groups}), '{body}', '{{}}', {now}, 0, 0, 0 \
             FROM n; ANALYZE"
        ),
    };
    db.execute_unprepared(&sql).await.expect("prefill");
    let stored = db
        .query_one_raw(mall_db::sea_orm::Statement::from_string(
            db.get_database_backend(),
            format!("SELECT count(*) AS n FROM mall_queue_messages WHERE queue = '{name}'"),
        ))
        .await
        .expect("count")
        .expect("a row")
        .try_get::<i64>("", "n")
        .expect("a count");
    assert_eq!(stored, i64::try_from(messages).expect("small"), "prefilled");
}

/// Mean costs from a queue holding `backlog` messages over 1,024 groups (each over
/// [`BACKLOG_RECEIVES`] calls).
struct BacklogCosts {
    /// A receive of up to 10, and the delete of what it got.
    receive: Duration,
    delete: Duration,
    /// A receive of up to 10 from at most 4 groups (sync-relay's consumers ask that way)
    /// while the runs of [`HELD_RECEIVES`] earlier receives are still in flight.
    bounded: Duration,
}

async fn receive_with_backlog(backend: &Backend, backlog: usize) -> BacklogCosts {
    let name = format!(
        "backlog{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    prefill(
        backend.db.as_ref().expect("an embedded backend"),
        &name,
        backlog,
        1_024,
    )
    .await;
    let queue = backend.named_queue(&name).await;
    let (mut receiving, mut deleting) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..BACKLOG_RECEIVES {
        let start = Instant::now();
        let batch = queue
            .receive(10, Duration::ZERO)
            .await
            .expect("receive works");
        receiving += start.elapsed();
        assert_eq!(batch.len(), 10, "the backlog has ten visible group heads");
        let receipts: Vec<_> = batch.iter().map(|m| m.receipt.clone()).collect();
        let start = Instant::now();
        queue.delete(&receipts).await.expect("delete works");
        deleting += start.elapsed();
    }
    // Messages in flight are what a bounded receive checks each candidate group against.
    for _ in 0..HELD_RECEIVES {
        queue
            .receive(10, Duration::ZERO)
            .await
            .expect("receive works");
    }
    let mut bounded = Duration::ZERO;
    for _ in 0..BACKLOG_RECEIVES {
        let start = Instant::now();
        let batch = queue
            .receive_from_groups(10, 4, Duration::ZERO)
            .await
            .expect("receive works");
        bounded += start.elapsed();
        assert!(!batch.is_empty(), "groups are left to receive from");
    }
    BacklogCosts {
        receive: receiving / BACKLOG_RECEIVES,
        delete: deleting / BACKLOG_RECEIVES,
        bounded: bounded / BACKLOG_RECEIVES,
    }
}

/// Receives measured per backlog size (they take 500 messages of the smaller backlog).
const BACKLOG_RECEIVES: u32 = 50;

/// Receives whose messages stay in flight before the bounded receives are measured.
const HELD_RECEIVES: u32 = 20;

/// Bodies of `records` records of [`RECORD_BYTES`], packed base64 into `budget` bytes.
fn packed_bodies(records: usize, budget: usize) -> (Vec<String>, usize) {
    let runs = pack(
        std::iter::repeat_n(RECORD_BYTES, records),
        PackBudget::base64(budget).with_overheads(3, 16),
    )
    .expect("records fit");
    let per_message = runs.first().map_or(0, ExactSizeIterator::len);
    let bodies = runs
        .iter()
        .map(|run| encode_body(&vec![b'r'; 16 + run.len() * (RECORD_BYTES + 3)]))
        .collect();
    (bodies, per_message)
}

fn row(target: Target, scenario: &str, r: &Run) {
    let secs = r.elapsed.as_secs_f64();
    let messages_per_sec = r.messages as f64 / secs;
    println!(
        "| {} | {scenario} | {} | {} | {} | {} | {:.0} | {:.0} |",
        target.label(),
        r.groups,
        r.consumers,
        r.messages,
        r.records_per_message,
        messages_per_sec,
        messages_per_sec * r.records_per_message as f64,
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let asked: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let targets: Vec<Target> = [
        ("sqlite", Target::Sqlite),
        ("postgres", Target::Postgres),
        ("sqs", Target::Sqs),
    ]
    .into_iter()
    .filter(|(name, _)| asked.is_empty() || asked.iter().any(|a| a == name))
    .map(|(_, t)| t)
    .collect();

    println!(
        "| backend | scenario | groups | consumers | messages | records/message | messages/s | records/s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &target in &targets {
        let backend = Backend::new(target).await;
        // Small messages: the cost of the queue itself.
        let small = if target == Target::Sqs { 3_000 } else { 5_000 };
        for consumers in [1, 4] {
            let queue = backend.queue().await;
            let bodies = vec!["x".repeat(RECORD_BYTES); small];
            let r = run(&queue, bodies, 1, 16, consumers).await;
            row(target, "1 record per message", &r);
        }
        // Packed records: what sync-relay moves, at several message budgets.
        for budget in [16 * 1024, 256 * 1024, 1024 * 1024] {
            let (bodies, per_message) = packed_bodies(100_000, budget);
            let queue = backend.queue().await;
            let r = run(&queue, bodies, per_message, 64, 4).await;
            row(target, &format!("packed, {} KiB bodies", budget / 1024), &r);
        }
    }
    // Receive cost against backlog: the embedded queue finds group heads with an index, so a
    // million queued messages should cost a receive about what a thousand do.
    let embedded: Vec<Target> = targets.into_iter().filter(|t| *t != Target::Sqs).collect();
    if !embedded.is_empty() {
        println!(
            "\n| backend | backlog (1,024 groups) | receive of 10, mean | delete of 10, mean | receive vs 1,000 queued | receive of 10 from 4 groups, {HELD_RECEIVES} receives in flight, mean | that vs 1,000 queued |\n|---|---|---|---|---|---|---|"
        );
    }
    for target in embedded {
        let backend = Backend::new(target).await;
        let small = receive_with_backlog(&backend, 1_000).await;
        let large = receive_with_backlog(&backend, 1_000_000).await;
        for (backlog, costs) in [(1_000, &small), (1_000_000, &large)] {
            println!(
                "| {} | {backlog} | {:.2} ms | {:.2} ms | {:.2}× | {:.2} ms | {:.2}× |",
                target.label(),
                costs.receive.as_secs_f64() * 1e3,
                costs.delete.as_secs_f64() * 1e3,
                costs.receive.as_secs_f64() / small.receive.as_secs_f64(),
                costs.bounded.as_secs_f64() * 1e3,
                costs.bounded.as_secs_f64() / small.bounded.as_secs_f64(),
            );
        }
    }
}
