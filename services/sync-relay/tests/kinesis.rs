//! The Kinesis source against kinesalite (a local Kinesis): checkpoints, redelivery, restart,
//! two replicas splitting and taking over shards, resharding, replay and pause.
//!
//! kinesalite comes from `MALL_TEST_KINESIS_ENDPOINT` (default `http://127.0.0.1:4567`), which
//! `scripts/test.sh` starts; each test makes its own stream and its own database. Record
//! payloads are `key:version` text: the source treats them as opaque bytes, and the tests check
//! per-key order by replaying deliveries through a version guard, like the catalog's.

#[path = "support/kinesalite.rs"]
mod kinesalite;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use aws_sdk_kinesis::{Client, primitives::Blob, types::PutRecordsRequestEntry};
use mall_test_support::{Engine, TestDatabase, wait_until};
use sea_orm::DatabaseConnection;
use sync_relay::{
    migration::Migrator,
    source::kinesis::{
        KinesisRecord, KinesisSettings, KinesisSource, RecordSink, ReplayError, ShardBatch,
        ShardInfo, ShardState, replay_from, status,
    },
};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Harness

/// One test's stream, database and settings.
struct Harness {
    /// Keeps the test database alive (SQLite file or PostgreSQL database) for the test.
    _database: TestDatabase,
    db: DatabaseConnection,
    client: Client,
    settings: KinesisSettings,
}

impl Harness {
    /// A fresh stream of `shards` shards on kinesalite and a fresh database on `engine`.
    async fn new(engine: Engine, shards: i32) -> Self {
        mall_test_support::init_logging();
        let endpoint = kinesalite::endpoint();
        let settings = KinesisSettings {
            stream_name: format!("relay-test-{:016x}", fastrand::u64(..)),
            endpoint_url: Some(endpoint.parse().expect("a valid endpoint url")),
            region: Some("us-east-1".into()),
            access_key_id: Some("test".to_owned().into()),
            secret_access_key: Some("test".to_owned().into()),
            create_stream: None,
            // Short leases and intervals keep takeovers and reshards quick in tests.
            lease_duration: Duration::from_secs(2),
            lease_renew_interval: Duration::from_millis(200),
            shard_sync_interval: Duration::from_millis(500),
            max_records_per_call: 100,
            idle_poll_interval: Duration::from_millis(200),
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(300),
            request_timeout: Duration::from_secs(3),
            reader_stall_timeout: Duration::from_secs(20),
        };
        let client = kinesalite::create_stream(&settings, &settings.stream_name, shards).await;
        let database = TestDatabase::new(engine).await;
        let db = mall_db::connect::<Migrator>(&mall_db::DatabaseSettings {
            url: database.url().to_owned().into(),
            ..mall_db::DatabaseSettings::default()
        })
        .await
        .expect("the test database connects and migrates");
        Self {
            _database: database,
            db,
            client,
            settings,
        }
    }

    fn stream(&self) -> &str {
        &self.settings.stream_name
    }

    async fn wait_active(&self) {
        wait_until("the stream is ACTIVE", WAIT, || async {
            let summary = self
                .client
                .describe_stream_summary()
                .stream_name(self.stream())
                .send()
                .await
                .ok()?;
            let status = summary
                .stream_description_summary()?
                .stream_status()
                .clone();
            (status == aws_sdk_kinesis::types::StreamStatus::Active).then_some(())
        })
        .await;
    }

    /// Puts `key:version` for every key, one PutRecords call per version so that each key's
    /// versions enter the stream in order. Returns the shard each record went to.
    async fn put(&self, keys: &[String], versions: std::ops::RangeInclusive<u32>) -> Vec<String> {
        let mut shards = Vec::new();
        for version in versions {
            let entries = keys.iter().map(|key| {
                PutRecordsRequestEntry::builder()
                    .partition_key(key)
                    .data(Blob::new(format!("{key}:{version}")))
                    .build()
                    .expect("a complete entry")
            });
            let output = self
                .client
                .put_records()
                .stream_name(self.stream())
                .set_records(Some(entries.collect()))
                .send()
                .await
                .expect("records are put");
            assert_eq!(
                output.failed_record_count,
                Some(0),
                "kinesalite accepts all"
            );
            shards.extend(output.records.into_iter().filter_map(|r| r.shard_id));
        }
        shards
    }

    /// Starts a source as `replica` delivering into `sink`.
    fn start<S: RecordSink + Clone>(
        &self,
        replica: &str,
        sink: &S,
        paused: watch::Receiver<bool>,
    ) -> RunningSource {
        self.start_with(replica, sink, paused, |_| {})
    }

    /// Starts a source as `replica` with settings `configure` adjusted.
    fn start_with<S: RecordSink + Clone>(
        &self,
        replica: &str,
        sink: &S,
        paused: watch::Receiver<bool>,
        configure: impl FnOnce(&mut KinesisSettings),
    ) -> RunningSource {
        let registry = mall_telemetry::metrics::Registry::new();
        let mut settings = self.settings.clone();
        configure(&mut settings);
        let source = KinesisSource::new(settings, self.db.clone(), replica, &registry)
            .expect("the source builds");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(source.run(sink.clone(), paused, shutdown.clone()));
        RunningSource {
            shutdown,
            task,
            registry,
        }
    }

    async fn status(&self) -> Vec<ShardInfo> {
        status(&self.db, self.stream())
            .await
            .expect("status answers")
    }

    /// Waits until the shard table satisfies `check`.
    async fn wait_for_owners(&self, what: &str, check: impl Fn(&[ShardInfo]) -> bool) {
        wait_until(what, WAIT, || async {
            let infos = self.status().await;
            check(&infos).then_some(())
        })
        .await;
    }
}

struct RunningSource {
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    registry: mall_telemetry::metrics::Registry,
}

impl RunningSource {
    /// Shuts the source down cleanly and waits until it has released its leases.
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the source stops within the wait")
            .expect("the source task does not panic")
            .expect("the source stops without error");
    }

    /// Ends the source as a crash would: its tasks die, its leases stay in the table.
    async fn crash(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    /// Sum of the samples named `name` whose labels include all of `labels`, read from
    /// the exposition as Prometheus reads it.
    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.registry
            .encode()
            .lines()
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
            .filter(|line| {
                labels
                    .iter()
                    .all(|(key, value)| line.contains(&format!("{key}=\"{value}\"")))
            })
            .filter_map(|line| line.split(' ').nth(1)?.parse::<f64>().ok())
            .sum()
    }
}

// ---------------------------------------------------------------------------------------------
// A sink standing in for the queue stage

#[derive(Debug, Default)]
struct Deliveries {
    /// Records accepted, in the order they were accepted (across shards and replicas).
    accepted: Vec<KinesisRecord>,
    /// First sequence number of every failed attempt.
    failed_attempts: Vec<String>,
    /// Shards whose deliveries fail.
    failing: BTreeSet<String>,
    /// All deliveries fail.
    fail_all: bool,
}

/// Records deliveries; can be told to fail. Clones share one record, like replicas share a queue.
#[derive(Debug, Clone, Default)]
struct Collector(Arc<Mutex<Deliveries>>);

impl Collector {
    fn with<T>(&self, f: impl FnOnce(&mut Deliveries) -> T) -> T {
        f(&mut self.0.lock().expect("the lock is not poisoned"))
    }

    fn accepted(&self) -> Vec<KinesisRecord> {
        self.with(|d| d.accepted.clone())
    }

    /// Payloads accepted so far, as text.
    fn payloads(&self) -> Vec<String> {
        self.accepted().iter().map(payload).collect()
    }

    /// Waits until every `key:version` in `expected` was accepted at least once.
    async fn wait_for(&self, what: &str, expected: &[String]) {
        wait_until(what, WAIT, || async {
            let seen: BTreeSet<String> = self.payloads().into_iter().collect();
            expected.iter().all(|e| seen.contains(e)).then_some(())
        })
        .await;
    }
}

impl RecordSink for Collector {
    async fn deliver(&self, batch: &ShardBatch) -> anyhow::Result<()> {
        assert!(!batch.records.is_empty(), "batches are never empty");
        assert!(
            batch.records.iter().all(|r| r.shard_id == batch.shard_id),
            "a batch holds one shard's records"
        );
        self.with(|d| {
            if d.fail_all || d.failing.contains(&batch.shard_id) {
                d.failed_attempts
                    .push(batch.first_sequence_number().to_owned());
                anyhow::bail!("the queue is unavailable (test)");
            }
            d.accepted.extend(batch.records.iter().cloned());
            Ok(())
        })
    }
}

fn payload(record: &KinesisRecord) -> String {
    String::from_utf8(record.data.to_vec()).expect("test payloads are text")
}

/// A sink whose deliveries never return: a reader stuck in a call that hangs.
#[derive(Clone, Default)]
struct HangingSink;

impl RecordSink for HangingSink {
    async fn deliver(&self, _batch: &ShardBatch) -> anyhow::Result<()> {
        std::future::pending().await
    }
}

fn keys(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("P{i:04}")).collect()
}

fn expected(keys: &[String], versions: std::ops::RangeInclusive<u32>) -> Vec<String> {
    versions
        .flat_map(|v| keys.iter().map(move |k| format!("{k}:{v}")))
        .collect()
}

/// Replays `accepted` through a version guard, as the catalog applies changes: every key must
/// reach `last_version` with no version skipped or applied out of order. Repeats are fine
/// (a redelivery after a takeover), and are what the guard turns into no-ops.
fn assert_applied_in_order(accepted: &[KinesisRecord], keys: &[String], last_version: u32) {
    let mut stored: BTreeMap<String, u32> = BTreeMap::new();
    for record in accepted {
        let text = payload(record);
        let (key, version) = text.split_once(':').expect("key:version");
        let version: u32 = version.parse().expect("a version number");
        assert_eq!(
            record.partition_key, key,
            "the partition key is the product"
        );
        let current = stored.entry(key.to_owned()).or_default();
        assert!(
            version <= *current + 1,
            "{key}: version {version} delivered while the last applied was {current}: \
             a version was lost or came out of order"
        );
        *current = (*current).max(version);
    }
    for key in keys {
        assert_eq!(
            stored.get(key),
            Some(&last_version),
            "{key} reached its last version"
        );
    }
}

fn info<'a>(infos: &'a [ShardInfo], shard_id: &str) -> &'a ShardInfo {
    infos
        .iter()
        .find(|i| i.shard_id == shard_id)
        .unwrap_or_else(|| panic!("{shard_id} is listed: {infos:?}"))
}

fn shard(index: u32) -> String {
    format!("shardId-{index:012}")
}

/// Position of the first and last accepted record of `shard_id`.
fn span_of(accepted: &[KinesisRecord], shard_id: &str) -> (usize, usize) {
    let positions: Vec<usize> = accepted
        .iter()
        .enumerate()
        .filter(|(_, r)| r.shard_id == shard_id)
        .map(|(i, _)| i)
        .collect();
    match (positions.first(), positions.last()) {
        (Some(first), Some(last)) => (*first, *last),
        _ => panic!("{shard_id} delivered nothing"),
    }
}

/// A pause switch that stays off (a dropped sender keeps its last value).
fn not_paused() -> watch::Receiver<bool> {
    watch::channel(false).1
}

// ---------------------------------------------------------------------------------------------
// A proxy in front of kinesalite that answers chosen calls with a Kinesis error

/// Per operation (`GetRecords`, ...), what its next calls get: `None` forwards the call to
/// kinesalite, `Some(code)` answers it with that Kinesis error instead.
type Faults = Arc<Mutex<HashMap<String, VecDeque<Option<&'static str>>>>>;

/// kinesalite never throttles and its iterators expire only after 5 minutes; this proxy makes
/// both happen on cue, over the real wire protocol, so the reader's handling is tested as is.
struct FaultProxy {
    endpoint: String,
    faults: Faults,
}

impl FaultProxy {
    async fn start(upstream: &str) -> Self {
        let url: url::Url = upstream.parse().expect("a valid endpoint url");
        let upstream = format!(
            "{}:{}",
            url.host_str().expect("the endpoint has a host"),
            url.port_or_known_default()
                .expect("the endpoint has a port")
        );
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("the proxy binds");
        let endpoint = format!(
            "http://{}",
            listener
                .local_addr()
                .expect("a bound listener has an address")
        );
        let faults = Faults::default();
        let shared = faults.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, faults) = (upstream.clone(), shared.clone());
                tokio::spawn(async move {
                    let _ = proxy_connection(client, &upstream, &faults).await;
                });
            }
        });
        Self { endpoint, faults }
    }

    /// The next calls of `operation` get `plan` (then are forwarded again).
    fn inject(&self, operation: &str, plan: &[Option<&'static str>]) {
        self.faults
            .lock()
            .expect("the lock is not poisoned")
            .insert(operation.to_owned(), plan.iter().copied().collect());
    }

    fn pending(&self, operation: &str) -> usize {
        self.faults
            .lock()
            .expect("the lock is not poisoned")
            .get(operation)
            .map_or(0, VecDeque::len)
    }
}

/// Relays HTTP/1.1 requests of one client connection (keep-alive) to kinesalite, one at a time,
/// answering faulted calls itself. Bodies are Content-Length framed on both sides.
async fn proxy_connection(
    client: TcpStream,
    upstream: &str,
    faults: &Faults,
) -> std::io::Result<()> {
    let mut client = BufReader::new(client);
    let mut server: Option<BufReader<TcpStream>> = None;
    while let Some((head, body)) = read_http_message(&mut client).await? {
        let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let operation = text
            .lines()
            .find_map(|line| line.strip_prefix("x-amz-target:"))
            .and_then(|target| target.trim().rsplit('.').next())
            .unwrap_or_default()
            .to_owned();
        let fault = faults
            .lock()
            .expect("the lock is not poisoned")
            .iter_mut()
            .find(|(name, _)| name.to_ascii_lowercase() == operation)
            .and_then(|(_, plan)| plan.pop_front())
            .flatten();
        if let Some(code) = fault {
            let body = format!(r#"{{"__type":"{code}","message":"injected by the test proxy"}}"#);
            let response = format!(
                "HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.1\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            );
            client.get_mut().write_all(response.as_bytes()).await?;
            continue;
        }
        let server = match &mut server {
            Some(server) => server,
            None => server.insert(BufReader::new(TcpStream::connect(upstream).await?)),
        };
        server.get_mut().write_all(&head).await?;
        server.get_mut().write_all(&body).await?;
        let Some((head, body)) = read_http_message(server).await? else {
            return Ok(());
        };
        client.get_mut().write_all(&head).await?;
        client.get_mut().write_all(&body).await?;
    }
    Ok(())
}

/// Reads one HTTP/1.1 message (head and Content-Length body); `None` when the peer closed.
async fn read_http_message(
    reader: &mut BufReader<TcpStream>,
) -> std::io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&line);
        if line == b"\r\n" {
            break;
        }
    }
    let length = String::from_utf8_lossy(&head)
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await?;
    Ok(Some((head, body)))
}

// ---------------------------------------------------------------------------------------------
// Tests

async fn reads_everything_from_the_trim_horizon_without_a_checkpoint(engine: Engine) {
    let harness = Harness::new(engine, 2).await;
    let keys = keys(10);
    let shards_used: BTreeSet<String> = harness.put(&keys, 1..=3).await.into_iter().collect();
    let sink = Collector::default();
    let source = harness.start("replica-a", &sink, not_paused());

    sink.wait_for(
        "every record put before the start is delivered",
        &expected(&keys, 1..=3),
    )
    .await;
    let accepted = sink.accepted();
    assert_eq!(accepted.len(), 30, "each record is delivered once");
    assert_applied_in_order(&accepted, &keys, 3);

    // The checkpoint is the last delivered record of each shard, written after delivery.
    harness
        .wait_for_owners("each shard is checkpointed at its last record", |infos| {
            shards_used.iter().all(|shard_id| {
                let last = accepted
                    .iter()
                    .rev()
                    .find(|r| &r.shard_id == shard_id)
                    .map(|r| r.sequence_number.clone());
                info(infos, shard_id).checkpoint == last
            })
        })
        .await;
    let infos = harness.status().await;
    assert!(
        infos.iter().all(|i| i.state == ShardState::Reading
            && i.lease_owner.as_deref() == Some("replica-a")
            && i.lease_expire_time.is_some()),
        "{infos:?}"
    );

    source.stop().await;
    let infos = harness.status().await;
    assert!(
        infos.iter().all(|i| i.lease_owner.is_none()),
        "a clean stop releases the leases: {infos:?}"
    );
}

#[tokio::test]
async fn reads_everything_from_the_trim_horizon_without_a_checkpoint_on_sqlite() {
    reads_everything_from_the_trim_horizon_without_a_checkpoint(Engine::Sqlite).await;
}

#[tokio::test]
async fn reads_everything_from_the_trim_horizon_without_a_checkpoint_on_postgres() {
    reads_everything_from_the_trim_horizon_without_a_checkpoint(Engine::Postgres).await;
}

async fn a_failing_sink_keeps_the_checkpoint_and_gets_the_same_records_again(engine: Engine) {
    let harness = Harness::new(engine, 1).await;
    let keys = keys(5);
    harness.put(&keys, 1..=1).await;
    let sink = Collector::default();
    sink.with(|d| d.fail_all = true);
    let source = harness.start("replica-a", &sink, not_paused());

    wait_until("three deliveries failed", WAIT, || async {
        (sink.with(|d| d.failed_attempts.len()) >= 3).then_some(())
    })
    .await;
    let infos = harness.status().await;
    assert_eq!(
        info(&infos, &shard(0)).checkpoint,
        None,
        "a failed delivery does not move the checkpoint"
    );
    let attempts = sink.with(|d| d.failed_attempts.clone());
    assert!(
        attempts.iter().all(|first| first == &attempts[0]),
        "every attempt delivers the same first record: {attempts:?}"
    );

    sink.with(|d| d.fail_all = false);
    sink.wait_for(
        "the records are delivered once the sink recovers",
        &expected(&keys, 1..=1),
    )
    .await;
    let accepted = sink.accepted();
    assert_eq!(accepted.len(), 5, "nothing skipped, nothing doubled");
    assert_eq!(accepted[0].sequence_number, attempts[0]);
    let last = accepted.last().map(|r| r.sequence_number.clone());
    harness
        .wait_for_owners("the checkpoint moves after the success", |infos| {
            info(infos, &shard(0)).checkpoint == last
        })
        .await;
    assert!(source.metric("kinesis_deliveries_total", &[("outcome", "failed")]) >= 3.0);
    source.stop().await;
}

#[tokio::test]
async fn a_failing_sink_keeps_the_checkpoint_and_gets_the_same_records_again_on_sqlite() {
    a_failing_sink_keeps_the_checkpoint_and_gets_the_same_records_again(Engine::Sqlite).await;
}

#[tokio::test]
async fn a_failing_sink_keeps_the_checkpoint_and_gets_the_same_records_again_on_postgres() {
    a_failing_sink_keeps_the_checkpoint_and_gets_the_same_records_again(Engine::Postgres).await;
}

async fn a_restart_resumes_right_after_the_checkpoint(engine: Engine) {
    let harness = Harness::new(engine, 2).await;
    let keys = keys(10);
    harness.put(&keys, 1..=1).await;
    let first_sink = Collector::default();
    let first = harness.start("replica-a", &first_sink, not_paused());
    first_sink
        .wait_for("the first run delivers round 1", &expected(&keys, 1..=1))
        .await;
    first.stop().await;

    harness.put(&keys, 2..=2).await;
    let second_sink = Collector::default();
    let second = harness.start("replica-b", &second_sink, not_paused());
    second_sink
        .wait_for("the second run delivers round 2", &expected(&keys, 2..=2))
        .await;
    let payloads = second_sink.payloads();
    assert_eq!(
        payloads.len(),
        10,
        "only what arrived after the checkpoint is read again: {payloads:?}"
    );
    assert!(payloads.iter().all(|p| p.ends_with(":2")), "{payloads:?}");
    second.stop().await;
}

#[tokio::test]
async fn a_restart_resumes_right_after_the_checkpoint_on_sqlite() {
    a_restart_resumes_right_after_the_checkpoint(Engine::Sqlite).await;
}

#[tokio::test]
async fn a_restart_resumes_right_after_the_checkpoint_on_postgres() {
    a_restart_resumes_right_after_the_checkpoint(Engine::Postgres).await;
}

/// Two replicas on a 4-shard stream split it 2/2; when one stops (cleanly, or by crashing and
/// leaving its leases to expire) the other reads all four, and every key's versions are
/// applied completely and in order across the handover.
async fn two_replicas_split_the_shards_and_one_takes_over(engine: Engine, crash: bool) {
    let harness = Harness::new(engine, 4).await;
    let keys = keys(40);
    let queue = Collector::default();
    let a = harness.start("replica-a", &queue, not_paused());
    let b = harness.start("replica-b", &queue, not_paused());

    harness
        .wait_for_owners("the replicas hold two shards each", |infos| {
            let count = |owner: &str| {
                infos
                    .iter()
                    .filter(|i| i.lease_owner.as_deref() == Some(owner))
                    .count()
            };
            infos.len() == 4 && count("replica-a") == 2 && count("replica-b") == 2
        })
        .await;
    harness.put(&keys, 1..=3).await;
    queue
        .wait_for("both replicas deliver rounds 1-3", &expected(&keys, 1..=3))
        .await;
    let from_b: BTreeSet<String> = harness
        .status()
        .await
        .into_iter()
        .filter(|i| i.lease_owner.as_deref() == Some("replica-b"))
        .map(|i| i.shard_id)
        .collect();

    if crash {
        b.crash().await;
    } else {
        b.stop().await;
    }
    harness.put(&keys, 4..=6).await;
    harness
        .wait_for_owners("replica-a holds all four shards", |infos| {
            infos
                .iter()
                .all(|i| i.lease_owner.as_deref() == Some("replica-a"))
        })
        .await;
    queue
        .wait_for("replica-a delivers rounds 4-6", &expected(&keys, 4..=6))
        .await;
    let accepted = queue.accepted();
    assert_applied_in_order(&accepted, &keys, 6);
    assert!(
        accepted
            .iter()
            .any(|r| from_b.contains(&r.shard_id) && payload(r).ends_with(":6")),
        "replica-a read the shards replica-b had"
    );
    // Two shards from the start (taken, or stolen when replica-b came first), two from replica-b.
    let taken = a.metric("kinesis_lease_events_total", &[("kind", "taken")])
        + a.metric("kinesis_lease_events_total", &[("kind", "stolen")]);
    assert!(taken >= 4.0, "replica-a took four leases: {taken}");
    a.stop().await;
}

#[tokio::test]
async fn two_replicas_split_the_shards_and_one_takes_over_after_a_clean_stop_on_sqlite() {
    two_replicas_split_the_shards_and_one_takes_over(Engine::Sqlite, false).await;
}

#[tokio::test]
async fn two_replicas_split_the_shards_and_one_takes_over_after_a_clean_stop_on_postgres() {
    two_replicas_split_the_shards_and_one_takes_over(Engine::Postgres, false).await;
}

#[tokio::test]
async fn a_crashed_replicas_shards_are_taken_over_when_its_leases_expire_on_sqlite() {
    two_replicas_split_the_shards_and_one_takes_over(Engine::Sqlite, true).await;
}

#[tokio::test]
async fn a_crashed_replicas_shards_are_taken_over_when_its_leases_expire_on_postgres() {
    two_replicas_split_the_shards_and_one_takes_over(Engine::Postgres, true).await;
}

/// Split shard 0 into 1 and 2, then merge those into 3: every child is read only after its
/// parents are finished, so each key's versions stay in order across both reshards.
async fn children_are_read_after_their_parents(engine: Engine) {
    let harness = Harness::new(engine, 1).await;
    let keys = keys(20);
    harness.put(&keys, 1..=2).await;
    harness
        .client
        .split_shard()
        .stream_name(harness.stream())
        .shard_to_split(shard(0))
        // Half of the 128-bit hash key space.
        .new_starting_hash_key("170141183460469231731687303715884105728")
        .send()
        .await
        .expect("kinesalite splits the shard");
    harness.wait_active().await;
    let children: BTreeSet<String> = harness.put(&keys, 3..=4).await.into_iter().collect();
    assert_eq!(
        children,
        BTreeSet::from([shard(1), shard(2)]),
        "after the split, records go to the children"
    );

    // Hold the parent back (its deliveries fail) to see the children wait.
    let queue = Collector::default();
    queue.with(|d| d.failing.insert(shard(0)));
    let source = harness.start("replica-a", &queue, not_paused());
    harness
        .wait_for_owners("the children wait for their parent", |infos| {
            infos.len() == 3
                && info(infos, &shard(0)).state == ShardState::Reading
                && info(infos, &shard(1)).state == ShardState::WaitingForParent
                && info(infos, &shard(2)).state == ShardState::WaitingForParent
        })
        .await;
    wait_until("the parent's delivery failed twice", WAIT, || async {
        (queue.with(|d| d.failed_attempts.len()) >= 2).then_some(())
    })
    .await;
    assert!(
        queue.accepted().is_empty(),
        "no child is read while its parent is unfinished"
    );

    queue.with(|d| d.failing.clear());
    queue
        .wait_for("rounds 1-4 are delivered", &expected(&keys, 1..=4))
        .await;

    // Merge the children while the source runs.
    harness
        .client
        .merge_shards()
        .stream_name(harness.stream())
        .shard_to_merge(shard(1))
        .adjacent_shard_to_merge(shard(2))
        .send()
        .await
        .expect("kinesalite merges the shards");
    harness.wait_active().await;
    let merged: BTreeSet<String> = harness.put(&keys, 5..=6).await.into_iter().collect();
    assert_eq!(merged, BTreeSet::from([shard(3)]));
    queue
        .wait_for("rounds 5-6 are delivered", &expected(&keys, 5..=6))
        .await;

    let accepted = queue.accepted();
    assert_applied_in_order(&accepted, &keys, 6);
    let parent = span_of(&accepted, &shard(0));
    let (left, right) = (span_of(&accepted, &shard(1)), span_of(&accepted, &shard(2)));
    let grandchild = span_of(&accepted, &shard(3));
    assert!(
        left.0 > parent.1 && right.0 > parent.1,
        "split children after their parent"
    );
    assert!(
        grandchild.0 > left.1 && grandchild.0 > right.1,
        "the merged shard after both its parents"
    );
    harness
        .wait_for_owners(
            "closed shards are finished, the merged one is read",
            |infos| {
                [shard(0), shard(1), shard(2)]
                    .iter()
                    .all(|id| info(infos, id).state == ShardState::Finished)
                    && info(infos, &shard(3)).state == ShardState::Reading
            },
        )
        .await;
    source.stop().await;
}

#[tokio::test]
async fn children_are_read_after_their_parents_on_sqlite() {
    children_are_read_after_their_parents(Engine::Sqlite).await;
}

#[tokio::test]
async fn children_are_read_after_their_parents_on_postgres() {
    children_are_read_after_their_parents(Engine::Postgres).await;
}

async fn replay_from_delivers_again_what_arrived_after_the_time(engine: Engine) {
    let harness = Harness::new(engine, 2).await;
    let keys = keys(20);
    harness.put(&keys, 1..=1).await;
    let queue = Collector::default();
    let source = harness.start("replica-a", &queue, not_paused());
    queue
        .wait_for("round 1 is delivered", &expected(&keys, 1..=1))
        .await;
    let round_two_shards: BTreeSet<String> = harness.put(&keys, 2..=2).await.into_iter().collect();
    // kinesalite answers AT_TIMESTAMP only for shards with a record at or after the time.
    assert_eq!(round_two_shards.len(), 2, "round 2 reaches both shards");
    queue
        .wait_for("round 2 is delivered", &expected(&keys, 2..=2))
        .await;

    let accepted = queue.accepted();
    let arrival =
        |round: &'static str| accepted.iter().filter(move |r| payload(r).ends_with(round));
    let start = arrival(":2")
        .map(|r| r.approximate_arrival)
        .min()
        .expect("round 2 arrived");
    assert!(
        arrival(":1").all(|r| r.approximate_arrival < start),
        "round 1 arrived before round 2 (it was delivered before round 2 was put)"
    );

    let unknown = replay_from(
        &harness.db,
        harness.stream(),
        start,
        &["shardId-9".to_owned()],
    )
    .await
    .expect_err("an unknown shard is refused");
    assert!(
        matches!(unknown, ReplayError::UnknownShards { .. }),
        "{unknown:?}"
    );
    let reset = replay_from(&harness.db, harness.stream(), start, &[])
        .await
        .expect("replay is accepted");
    assert_eq!(reset, vec![shard(0), shard(1)]);

    wait_until("round 2 is delivered a second time", WAIT, || async {
        let payloads = queue.payloads();
        expected(&keys, 2..=2)
            .iter()
            .all(|e| payloads.iter().filter(|p| *p == e).count() == 2)
            .then_some(())
    })
    .await;
    let payloads = queue.payloads();
    assert_eq!(
        payloads.len(),
        60,
        "round 1 once, round 2 twice: {payloads:?}"
    );
    assert_applied_in_order(&queue.accepted(), &keys, 2);
    source.stop().await;
}

#[tokio::test]
async fn replay_from_delivers_again_what_arrived_after_the_time_on_sqlite() {
    replay_from_delivers_again_what_arrived_after_the_time(Engine::Sqlite).await;
}

#[tokio::test]
async fn replay_from_delivers_again_what_arrived_after_the_time_on_postgres() {
    replay_from_delivers_again_what_arrived_after_the_time(Engine::Postgres).await;
}

#[tokio::test]
async fn pause_stops_reading_and_resume_continues() {
    let harness = Harness::new(Engine::Sqlite, 2).await;
    let keys = keys(10);
    let (pause, paused) = watch::channel(false);
    let queue = Collector::default();
    let source = harness.start("replica-a", &queue, paused);
    harness.put(&keys, 1..=1).await;
    queue
        .wait_for("round 1 is delivered", &expected(&keys, 1..=1))
        .await;

    pause.send_replace(true);
    wait_until("both readers are parked", WAIT, || async {
        (source.metric("kinesis_readers_paused", &[]) == 2.0).then_some(())
    })
    .await;
    let calls = || source.metric("kinesis_calls_total", &[("operation", "GetRecords")]);
    let calls_when_parked = calls();
    harness.put(&keys, 2..=2).await;
    // Let the source live on for a while: two more shard listings (every 500 ms here) show
    // that its loop runs; the parked readers make no call meanwhile.
    let listings = || source.metric("kinesis_calls_total", &[("operation", "ListShards")]);
    let listed_before = listings();
    wait_until("two more shard listings", WAIT, || async {
        (listings() >= listed_before + 2.0).then_some(())
    })
    .await;
    assert_eq!(calls(), calls_when_parked, "no GetRecords while paused");
    assert_eq!(queue.accepted().len(), 10, "nothing delivered while paused");
    let infos = harness.status().await;
    assert!(
        infos
            .iter()
            .all(|i| i.lease_owner.as_deref() == Some("replica-a")),
        "leases are kept while paused: {infos:?}"
    );

    pause.send_replace(false);
    queue
        .wait_for("round 2 is delivered after resume", &expected(&keys, 2..=2))
        .await;
    assert_applied_in_order(&queue.accepted(), &keys, 2);
    source.stop().await;
}

/// Throttling (ProvisionedThroughputExceeded on GetRecords, LimitExceeded on GetShardIterator)
/// is backed off and retried; an expired iterator is reopened right after the checkpoint. Every
/// record is delivered exactly once, in order.
#[tokio::test]
async fn throttling_and_expired_iterators_lose_and_repeat_nothing() {
    let mut harness = Harness::new(Engine::Sqlite, 1).await;
    let keys = keys(10);
    harness.put(&keys, 1..=4).await;
    let upstream = harness
        .settings
        .endpoint_url
        .as_ref()
        .map(ToString::to_string)
        .expect("the harness sets an endpoint");
    let proxy = FaultProxy::start(&upstream).await;
    harness.settings.endpoint_url = Some(proxy.endpoint.parse().expect("a valid url"));
    // Ten records per call: the 40 records take four calls, so faults land mid-stream.
    harness.settings.max_records_per_call = 10;
    const THROTTLED: Option<&str> = Some("ProvisionedThroughputExceededException");
    const EXPIRED: Option<&str> = Some("ExpiredIteratorException");
    proxy.inject(
        "GetShardIterator",
        &[
            Some("LimitExceededException"),
            None,
            Some("LimitExceededException"),
        ],
    );
    proxy.inject(
        "GetRecords",
        &[
            None, THROTTLED, THROTTLED, None, EXPIRED, None, THROTTLED, EXPIRED,
        ],
    );

    let queue = Collector::default();
    let source = harness.start("replica-a", &queue, not_paused());
    queue
        .wait_for("every record is delivered", &expected(&keys, 1..=4))
        .await;
    assert_eq!(
        proxy.pending("GetRecords"),
        0,
        "every GetRecords fault was served"
    );
    assert_eq!(proxy.pending("GetShardIterator"), 0);
    let accepted = queue.accepted();
    assert_eq!(
        accepted.len(),
        40,
        "nothing skipped and nothing read twice around the faults"
    );
    assert_applied_in_order(&accepted, &keys, 4);
    let calls = |operation: &str, outcome: &str| {
        source.metric(
            "kinesis_calls_total",
            &[("operation", operation), ("outcome", outcome)],
        )
    };
    assert_eq!(calls("GetRecords", "throttled"), 3.0);
    assert_eq!(calls("GetRecords", "expired_iterator"), 2.0);
    assert_eq!(calls("GetShardIterator", "throttled"), 2.0);
    assert!(
        calls("GetShardIterator", "ok") >= 3.0,
        "the iterator was opened once and reopened after each expiry"
    );
    source.stop().await;
}

/// `create_stream` (for local runs) makes a missing stream and waits until it is ACTIVE; a
/// stream that already exists is read as it is.
#[tokio::test]
async fn create_stream_makes_a_missing_stream_and_keeps_an_existing_one() {
    let mut harness = Harness::new(Engine::Sqlite, 1).await;
    harness.settings.stream_name = format!("{}-created", harness.settings.stream_name);
    harness.settings.create_stream = Some(2);
    let keys = keys(10);
    let queue = Collector::default();
    let first = harness.start("replica-a", &queue, not_paused());
    harness
        .wait_for_owners("both shards of the new stream are leased", |infos| {
            infos.len() == 2
                && infos
                    .iter()
                    .all(|i| i.lease_owner.as_deref() == Some("replica-a"))
        })
        .await;
    harness.put(&keys, 1..=1).await;
    queue
        .wait_for("round 1 is delivered", &expected(&keys, 1..=1))
        .await;
    first.stop().await;

    let second = harness.start("replica-b", &queue, not_paused());
    harness.put(&keys, 2..=2).await;
    queue
        .wait_for("round 2 is delivered", &expected(&keys, 2..=2))
        .await;
    assert_eq!(queue.accepted().len(), 20, "the existing stream was kept");
    assert_eq!(
        second.metric(
            "kinesis_calls_total",
            &[("operation", "CreateStream"), ("outcome", "in_use")]
        ),
        1.0
    );
    second.stop().await;
}

async fn a_stuck_reader_loses_its_shard_to_another_replica(engine: Engine) {
    let harness = Harness::new(engine, 1).await;
    let stuck = harness.start_with("replica-a", &HangingSink, not_paused(), |settings| {
        settings.reader_stall_timeout = Duration::from_secs(1);
    });
    harness
        .wait_for_owners("replica-a takes the shard", |infos| {
            !infos.is_empty()
                && infos
                    .iter()
                    .all(|i| i.lease_owner.as_deref() == Some("replica-a"))
        })
        .await;
    let keys = keys(10);
    harness.put(&keys, 1..=1).await;
    // replica-a's delivery hangs; it stops renewing the lease, which expires, and replica-b
    // takes the shard and delivers what replica-a could not.
    let queue = Collector::default();
    let healthy = harness.start("replica-b", &queue, not_paused());
    queue
        .wait_for("replica-b delivers the records", &expected(&keys, 1..=1))
        .await;
    harness
        .wait_for_owners("replica-b holds the shard", |infos| {
            infos
                .iter()
                .all(|i| i.lease_owner.as_deref() == Some("replica-b"))
        })
        .await;
    assert!(stuck.metric("kinesis_lease_events_total", &[("kind", "stalled")]) >= 1.0);
    healthy.stop().await;
    // Its reader never returns from the delivery: end it as a crash would.
    stuck.crash().await;
}

#[tokio::test]
async fn a_stuck_reader_loses_its_shard_to_another_replica_on_sqlite() {
    a_stuck_reader_loses_its_shard_to_another_replica(Engine::Sqlite).await;
}

#[tokio::test]
async fn a_stuck_reader_loses_its_shard_to_another_replica_on_postgres() {
    a_stuck_reader_loses_its_shard_to_another_replica(Engine::Postgres).await;
}
