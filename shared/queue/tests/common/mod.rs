//! What every queue test needs: a fresh queue on a chosen backend, and helpers to drain it.

#![allow(dead_code, unreachable_pub)]

use std::{collections::BTreeMap, time::Duration};

use mall_db::{DatabaseSettings, sea_orm::DatabaseConnection};
use mall_queue::{BackendKind, Queue, QueueSettings, ReceivedMessage};
use mall_test_support::{Engine, TestDatabase};
use sea_orm_migration::{MigrationTrait, MigratorTrait};
use secrecy::SecretString;

/// Where a test's queue lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Embedded, in a fresh SQLite file.
    Sqlite,
    /// Embedded, in a fresh PostgreSQL database.
    Postgres,
    /// SQS on LocalStack.
    LocalStack,
}

/// The migrations a service would run: only the queue's here.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        mall_queue::embedded::migrations()
    }
}

/// A backend for one test: its database (embedded) or endpoint (SQS).
pub struct Harness {
    pub target: Target,
    database: Option<TestDatabase>,
    db: Option<DatabaseConnection>,
    endpoint: Option<String>,
}

impl Harness {
    pub async fn new(target: Target) -> Self {
        mall_test_support::init_logging();
        let mut harness = Self {
            target,
            database: None,
            db: None,
            endpoint: None,
        };
        match target {
            Target::Sqlite | Target::Postgres => {
                let engine = if target == Target::Sqlite {
                    Engine::Sqlite
                } else {
                    Engine::Postgres
                };
                harness.database = Some(TestDatabase::new(engine).await);
                harness.db = Some(harness.connect().await);
            }
            Target::LocalStack => {
                harness.endpoint = Some(mall_test_support::sqs_endpoint().await);
            }
        }
        harness
    }

    async fn connect(&self) -> DatabaseConnection {
        let database = self.database.as_ref().expect("an embedded target");
        let settings = DatabaseSettings {
            url: SecretString::from(database.url().to_owned()),
            ..DatabaseSettings::default()
        };
        mall_db::connect::<Migrator>(&settings)
            .await
            .expect("test database connects and migrates")
    }

    /// Settings of a new, uniquely named queue on this backend, FIFO unless changed.
    /// The embedded queue's database connection (embedded targets only).
    pub fn db(&self) -> &DatabaseConnection {
        self.db.as_ref().expect("an embedded target has a database")
    }

    pub fn settings(&self) -> QueueSettings {
        let name = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        let mut settings = QueueSettings {
            name,
            ..QueueSettings::default()
        };
        // Long polls of other processes are not woken; keep the tests brisk anyway.
        settings.embedded.poll_interval = Duration::from_millis(50);
        if let Some(endpoint) = &self.endpoint {
            settings.backend = BackendKind::Sqs;
            settings.sqs.endpoint_url = Some(endpoint.parse().expect("endpoint is a url"));
            settings.sqs.region = Some("us-east-1".to_owned());
            settings.sqs.access_key_id = Some("test".to_owned());
            settings.sqs.secret_access_key = Some(SecretString::from("test"));
            settings.sqs.create_queues = true;
        }
        settings
    }

    /// Opens a queue with `settings`.
    pub async fn open(&self, settings: &QueueSettings) -> Queue {
        Queue::open(settings, self.db.clone())
            .await
            .expect("queue opens")
    }

    /// A new FIFO queue with default settings changed by `change`.
    pub async fn queue(&self, change: impl FnOnce(&mut QueueSettings)) -> (Queue, QueueSettings) {
        let mut settings = self.settings();
        change(&mut settings);
        (self.open(&settings).await, settings)
    }

    /// What a service restart does: closes the database pool and opens a new one (embedded),
    /// or a new client (SQS), and reopens the queue.
    pub async fn restart(&mut self, settings: &QueueSettings) -> Queue {
        if let Some(db) = self.db.take() {
            db.close().await.expect("pool closes");
            self.db = Some(self.connect().await);
        }
        self.open(settings).await
    }

    pub fn is_sqs(&self) -> bool {
        self.target == Target::LocalStack
    }
}

/// Receives until `count` messages arrived (deleting each at once when `delete`), or panics
/// after `timeout`.
pub async fn receive_n(
    queue: &Queue,
    count: usize,
    delete: bool,
    timeout: Duration,
) -> Vec<ReceivedMessage> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut received = Vec::new();
    while received.len() < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "received {} of {count} messages within {timeout:?}",
            received.len()
        );
        let batch = queue
            .receive(count - received.len(), Duration::from_secs(1))
            .await
            .expect("receive works");
        if delete && !batch.is_empty() {
            let receipts: Vec<_> = batch.iter().map(|m| m.receipt.clone()).collect();
            queue.delete(&receipts).await.expect("delete works");
        }
        received.extend(batch);
    }
    received
}

/// Bodies grouped by group id, in the order received.
pub fn bodies_by_group(messages: &[ReceivedMessage]) -> BTreeMap<String, Vec<String>> {
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for message in messages {
        groups
            .entry(message.group_id.clone().unwrap_or_default())
            .or_default()
            .push(message.body.clone());
    }
    groups
}
