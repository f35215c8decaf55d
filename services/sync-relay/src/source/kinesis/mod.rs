//! The Kinesis source: reads every shard of the product team's stream from a checkpoint kept in
//! the relay's database, and never loses a record.
//!
//! - Reading starts after the shard's checkpoint; at TRIM_HORIZON when there is none (never at
//!   LATEST, which loses whatever arrived while the relay was down); AT_TIMESTAMP after
//!   [`replay_from`].
//! - Each GetRecords result is one [`ShardBatch`] for the [`RecordSink`] (the relay's queue
//!   stage). The checkpoint moves to the batch's last record only after the sink returned `Ok`,
//!   i.e. the records are durable downstream; on `Err` the same records are delivered again
//!   after a backoff, never skipped.
//! - Shards are leased in the database, so several replicas split them evenly and take over a
//!   stopped replica's shards: at once when it shut down cleanly (it releases its leases),
//!   after the lease duration when it crashed. Only the lease holder can move a checkpoint.
//! - After a reshard a child shard is read only when its parents are finished (read to their
//!   end), so the changes of one product (one partition key) stay in order.
//! - While the relay is paused no shard is read; leases are kept and renewed.
//!
//! # Layout
//! - [`config`]: [`KinesisSettings`], every knob with its default.
//! - [`lease`]: the `kinesis_shards` table: leases, checkpoints, [`status`], [`replay_from`].
//! - `shards`: shard listing and which leases a replica takes (the balance rule).
//! - `reader`: the loop of one leased shard.
//! - `coordinator`: a replica's lease loop, starting and stopping readers.
//! - `call`, `metrics`: error classes of Kinesis calls, Prometheus (backoff: `mall_retry`).

pub mod config;
pub mod lease;

mod call;
mod coordinator;
mod metrics;
mod reader;
mod shards;

use std::{future::Future, sync::Arc};

use anyhow::Context as _;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use sea_orm::DatabaseConnection;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::KinesisSettings;
pub use lease::{ReplayError, ShardInfo, ShardState, replay_from, status};

use metrics::KinesisMetrics;

/// One Kinesis record as read. The payload is opaque here (a `mall.sync.v1.ProductChange` by
/// contract); it is never logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KinesisRecord {
    /// Shard the record was read from.
    pub shard_id: String,
    /// Kinesis sequence number: increasing within the shard, unique in the stream.
    pub sequence_number: String,
    /// Partition key the producer chose (the product code).
    pub partition_key: String,
    /// The record's payload.
    pub data: Bytes,
    /// When Kinesis accepted the record.
    pub approximate_arrival: DateTime<Utc>,
}

/// Records of one shard from one GetRecords call, in sequence order; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardBatch {
    /// Stream the records come from.
    pub stream: String,
    /// Shard the records come from.
    pub shard_id: String,
    /// The shard's replay epoch when the records were read: raised by every ReplayFrom, so a
    /// replay's deliveries are new to the queue's deduplication while a crash's resend of the
    /// same read is not.
    pub epoch: i64,
    /// The records, in the shard's order.
    pub records: Vec<KinesisRecord>,
}

impl ShardBatch {
    /// Sequence number of the first record: with the last, a deterministic deduplication id
    /// for anything made from this batch, equal on every redelivery.
    pub fn first_sequence_number(&self) -> &str {
        self.records
            .first()
            .map_or("", |r| r.sequence_number.as_str())
    }

    /// The parts a deduplication key of this batch is made from: stream, shard, replay epoch,
    /// first and last sequence number. Equal on every redelivery of the same read; different
    /// after a replay.
    pub fn dedup_parts(&self) -> [String; 5] {
        [
            self.stream.clone(),
            self.shard_id.clone(),
            format!("e{}", self.epoch),
            self.first_sequence_number().to_owned(),
            self.last_sequence_number().to_owned(),
        ]
    }

    /// Sequence number of the last record: where the checkpoint moves once the batch is accepted.
    pub fn last_sequence_number(&self) -> &str {
        self.records
            .last()
            .map_or("", |r| r.sequence_number.as_str())
    }
}

/// Where the source hands its records: the relay's stage 1 (decode, roll up, enqueue).
///
/// `deliver` returns `Ok` only once the records are durable downstream (the queue accepted
/// them); only then does the shard's checkpoint move. On `Err` the source backs off and
/// delivers the same batch again, so a delivery must be idempotent: derive deduplication ids
/// from the stream, shard and sequence numbers, never from time or randomness. A batch can also
/// arrive twice after a crash or a lease takeover (delivered, not yet checkpointed). Batches
/// of one shard are delivered one at a time, in order; different shards concurrently.
///
/// The batch is lent, not given: on failure the same records are delivered again without a
/// copy.
pub trait RecordSink: Send + Sync + 'static {
    /// Makes `batch` durable downstream.
    ///
    /// # Errors
    /// Anything that kept the records from becoming durable; the batch is delivered again.
    fn deliver(&self, batch: &ShardBatch) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// When a shard reader last finished a step; the coordinator renews the lease of a reader
/// only while this is recent, so a reader stuck in a call that never returns loses its shard.
#[derive(Debug, Clone)]
pub(crate) struct Heartbeat {
    base: std::time::Instant,
    /// Milliseconds after `base` of the last step.
    last: Arc<std::sync::atomic::AtomicU64>,
}

impl Heartbeat {
    pub(crate) fn new() -> Self {
        Self {
            base: std::time::Instant::now(),
            last: Arc::default(),
        }
    }

    /// Records a finished step.
    pub(crate) fn beat(&self) {
        let now = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long ago the last step finished.
    pub(crate) fn age(&self) -> std::time::Duration {
        let last =
            std::time::Duration::from_millis(self.last.load(std::sync::atomic::Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last)
    }
}

/// What readers and the coordinator share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) client: aws_sdk_kinesis::Client,
    pub(crate) db: DatabaseConnection,
    pub(crate) settings: KinesisSettings,
    pub(crate) replica_id: String,
    pub(crate) metrics: KinesisMetrics,
}

/// The Kinesis source of one relay replica; see the module docs.
#[derive(Debug)]
pub struct KinesisSource {
    settings: KinesisSettings,
    db: DatabaseConnection,
    replica_id: String,
    metrics: KinesisMetrics,
}

impl KinesisSource {
    /// A source reading `settings.stream_name`, keeping leases and checkpoints in `db` (migrated
    /// with the relay's `Migrator`) under `replica_id` (unique per replica: the pod name), and
    /// counting into `registry`.
    ///
    /// # Errors
    /// When the settings are invalid or the metrics are already registered in `registry`.
    pub fn new(
        settings: KinesisSettings,
        db: DatabaseConnection,
        replica_id: impl Into<String>,
        registry: &mall_telemetry::metrics::Registry,
    ) -> anyhow::Result<Self> {
        settings.validate().map_err(anyhow::Error::msg)?;
        let replica_id = replica_id.into();
        anyhow::ensure!(
            !replica_id.is_empty() && replica_id.len() <= 255,
            "the kinesis replica id must have 1 to 255 characters"
        );
        let metrics = KinesisMetrics::register(registry)
            .context("failed to register the kinesis source metrics")?;
        Ok(Self {
            settings,
            db,
            replica_id,
            metrics,
        })
    }

    /// Reads the stream into `sink` until `shutdown` is cancelled, then stops every reader
    /// (each completes a delivery in progress) and releases its leases. While `paused` holds
    /// `true` no shard is read. Kinesis and database failures are retried with backoff, logged
    /// and counted; they do not end the source.
    ///
    /// # Errors
    /// When no Kinesis client can be built from the settings (no region).
    pub async fn run<S: RecordSink>(
        self,
        sink: S,
        paused: watch::Receiver<bool>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let client = self.settings.client().await?;
        let shared = Arc::new(Shared {
            client,
            db: self.db,
            settings: self.settings,
            replica_id: self.replica_id,
            metrics: self.metrics,
        });
        coordinator::Coordinator::new(shared, sink, paused)
            .run(shutdown)
            .await
    }
}
