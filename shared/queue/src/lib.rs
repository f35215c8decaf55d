//! One queue API with two backends: Amazon SQS in production, and an embedded queue kept in
//! the service's own database (SQLite or PostgreSQL) so everything runs on a laptop.
//!
//! Both follow the semantics of SQS FIFO, and one conformance suite (`tests/conformance.rs`)
//! runs against embedded-on-SQLite, embedded-on-PostgreSQL and SQS-on-LocalStack:
//!
//! - **groups**: within a FIFO group messages are delivered in the order sent; while a
//!   message of a group is in flight no later message of that group is delivered; other
//!   groups keep flowing. Both may hand out several consecutive messages of one group in one
//!   receive (the embedded queue up to [`limits::MAX_GROUP_RUN`], from the group's head). A
//!   consumer must process a received batch in order per group and may rely on nothing more.
//! - **visibility**: a received message is hidden for the visibility timeout, then delivered
//!   again unless deleted; [`Queue::change_visibility`] extends it or releases it at once.
//! - **dead letters**: a message received `max_receives` times without being deleted moves
//!   to the dead letters at the next attempt; they can be counted, listed and redriven.
//! - **deduplication**: a FIFO message whose deduplication id was sent within the window is
//!   accepted and dropped, also after the first was deleted.
//! - **at least once**: a message is gone only after [`Queue::delete`] with its latest
//!   receipt; a consumer that stops without deleting loses nothing.
//!
//! # Layout
//! - [`Queue`]: open a queue from [`QueueSettings`] and use it; dispatches to a backend.
//! - [`settings`]: the `queue` section of a service's settings.
//! - [`message`]: [`OutgoingMessage`], [`ReceivedMessage`], [`Receipt`], dead letters, counts.
//! - [`error`]: [`QueueError`], one variant per thing a caller can do about it.
//! - [`limits`]: every engine limit in one place.
//! - [`pack`]: pack many small records into as few messages as a byte budget allows.
//! - [`embedded`]: the database backend and the migration a service adds to its own.
//! - `sqs`: the Amazon SQS backend.

pub mod embedded;
pub mod error;
pub mod message;
pub mod pack;
pub mod settings;
mod sqs;

use std::{collections::BTreeMap, time::Duration};

use sea_orm::DatabaseConnection;

pub use error::QueueError;
pub use message::{
    DeadLetterMessage, DeadLetterSelection, GroupCounts, OutgoingMessage, QueueCounts, Receipt,
    ReceivedMessage,
};
pub use pack::{PackBudget, RecordTooLarge, decode_body, encode_body, pack, pack_items};
pub use settings::{BackendKind, EmbeddedSettings, QueueSettings, SqsSettings};

/// FNV-1a (64 bit): a stable hash for FIFO group and deduplication ids (stable across
/// processes, versions and platforms, unlike `std`'s hasher). Written out because it is four
/// lines; not for anything that needs resistance to chosen inputs.
pub fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Limits of the engines. The embedded backend enforces the same ones, so a message that
/// works locally works on SQS.
pub mod limits {
    use std::time::Duration;

    /// Largest message: body plus attribute names, types and values (SQS: 1 MiB).
    pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
    /// Most attributes on one message (SQS).
    pub const MAX_ATTRIBUTES: usize = 10;
    /// Most entries in one SQS batch call; larger sends are split.
    pub const SQS_MAX_BATCH_ENTRIES: usize = 10;
    /// Most bytes in one SQS send batch (all messages together); larger sends are split.
    pub const SQS_MAX_BATCH_BYTES: usize = 1024 * 1024;
    /// Most messages one SQS `ReceiveMessage` returns; larger receives make several calls.
    pub const SQS_MAX_RECEIVE_PER_CALL: usize = 10;
    /// Longest long poll of one SQS call; longer waits make several calls.
    pub const SQS_MAX_WAIT: Duration = Duration::from_secs(20);
    /// Longest visibility timeout (SQS: 12 hours).
    pub const MAX_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(12 * 3600);
    /// Most consecutive messages of one FIFO group one embedded receive hands out (SQS
    /// returns at most 10 messages per call, of one group or several).
    pub const MAX_GROUP_RUN: usize = 10;
    /// Most messages one [`crate::Queue::receive`] returns, whatever `max` asks.
    pub const MAX_RECEIVE: usize = 1000;
    /// Largest page of [`crate::Queue::list_dead_letters`].
    pub const MAX_DEAD_LETTER_PAGE: usize = 1000;
}

/// A queue, embedded or SQS. Cheap to clone; clones share connections.
#[derive(Debug, Clone)]
pub struct Queue {
    inner: Inner,
}

#[derive(Debug, Clone)]
enum Inner {
    Embedded(embedded::EmbeddedQueue),
    Sqs(sqs::SqsQueue),
}

impl Queue {
    /// Opens the queue `settings` describe. The embedded backend needs the service's
    /// database connection, whose migrations include [`embedded::migrations`]; the SQS
    /// backend ignores it, resolves the queue and its dead-letter queue, and creates them
    /// when `sqs.create_queues` is set.
    ///
    /// # Errors
    /// Invalid settings, no database for the embedded backend, its tables missing, or SQS
    /// unreachable or without the queues.
    pub async fn open(
        settings: &QueueSettings,
        db: Option<DatabaseConnection>,
    ) -> anyhow::Result<Self> {
        settings.validate()?;
        let inner = match settings.backend {
            BackendKind::Embedded => {
                let db = db.ok_or_else(|| {
                    anyhow::anyhow!(
                        "queue {} uses the embedded backend, which needs the service's database",
                        settings.name
                    )
                })?;
                Inner::Embedded(embedded::EmbeddedQueue::open(settings, db).await?)
            }
            BackendKind::Sqs => Inner::Sqs(sqs::SqsQueue::open(settings).await?),
        };
        Ok(Self { inner })
    }

    /// The queue's name as configured.
    pub fn name(&self) -> &str {
        match &self.inner {
            Inner::Embedded(q) => q.name(),
            Inner::Sqs(q) => q.name(),
        }
    }

    /// The OpenTelemetry `messaging.system` of its backend: `aws_sqs`, or `mall_embedded` for
    /// the queue in the service's own database.
    pub fn messaging_system(&self) -> &'static str {
        match self.backend() {
            BackendKind::Embedded => "mall_embedded",
            BackendKind::Sqs => "aws_sqs",
        }
    }

    /// Which backend serves it.
    pub fn backend(&self) -> BackendKind {
        match &self.inner {
            Inner::Embedded(_) => BackendKind::Embedded,
            Inner::Sqs(_) => BackendKind::Sqs,
        }
    }

    /// Sends `messages`, any number: split into batches the engine accepts (10 entries and
    /// 1 MiB per SQS call), entries that failed retried with backoff. Messages of one group
    /// keep the order given. Returns `Ok` only when every message was accepted (a
    /// deduplicated one counts as accepted).
    ///
    /// # Errors
    /// [`QueueError::InvalidMessage`] before anything is sent when any message breaks a
    /// [`limits`] rule; [`QueueError::Unavailable`] or [`QueueError::Throttled`] when the
    /// engine kept failing (part may have been sent: resend all with the same dedup ids).
    #[tracing::instrument(skip_all, fields(queue = %self.name(), messages = messages.len()), err)]
    pub async fn send(&self, messages: Vec<OutgoingMessage>) -> Result<(), QueueError> {
        if messages.is_empty() {
            return Ok(());
        }
        match &self.inner {
            Inner::Embedded(q) => q.send(messages).await,
            Inner::Sqs(q) => q.send(messages).await,
        }
    }

    /// Receives up to `max` messages (at most [`limits::MAX_RECEIVE`]), waiting up to `wait`
    /// for the first to arrive (long polling; SQS waits whole seconds, rounded up). Returns
    /// as soon as some are available, so fewer than `max` is normal; empty after `wait`.
    /// Messages of one group come in the order sent.
    ///
    /// # Errors
    /// [`QueueError::Unavailable`] or [`QueueError::Throttled`] when the engine fails.
    pub async fn receive(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        self.receive_from_groups(max, usize::MAX, wait).await
    }

    /// As [`Queue::receive`], taking messages of at most `max_groups` (at least 1) message
    /// groups, so that consumers receiving side by side take different groups and work in
    /// parallel: a FIFO group's messages are held by one consumer at a time, and a receive
    /// that took every group would leave the others nothing until it finished.
    ///
    /// The embedded FIFO queue takes the groups whose heads are oldest. SQS chooses for
    /// itself (it returns as many messages of one group as it can, so that other consumers
    /// get other groups) and ignores `max_groups`, as does a standard queue.
    ///
    /// # Errors
    /// As [`Queue::receive`].
    #[tracing::instrument(name = "receive", skip_all, fields(queue = %self.name(), max = max, max_groups = tracing::field::Empty, received = tracing::field::Empty), err)]
    pub async fn receive_from_groups(
        &self,
        max: usize,
        max_groups: usize,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        let max = max.clamp(1, limits::MAX_RECEIVE);
        let max_groups = max_groups.max(1);
        if max_groups < max {
            tracing::Span::current().record("max_groups", max_groups);
        }
        let messages = match &self.inner {
            Inner::Embedded(q) => q.receive(max, max_groups, wait).await,
            Inner::Sqs(q) => q.receive(max, wait).await,
        }?;
        tracing::Span::current().record("received", messages.len());
        Ok(messages)
    }

    /// Deletes the messages of `receipts`: acknowledges them for good.
    ///
    /// # Errors
    /// [`QueueError::ReceiptExpired`] counting the receipts that were no longer valid (those
    /// messages were not deleted and will come again); the others are deleted all the same.
    /// A message that is already gone counts as deleted.
    #[tracing::instrument(skip_all, fields(queue = %self.name(), receipts = receipts.len()), err)]
    pub async fn delete(&self, receipts: &[Receipt]) -> Result<(), QueueError> {
        if receipts.is_empty() {
            return Ok(());
        }
        match &self.inner {
            Inner::Embedded(q) => q.delete(receipts).await,
            Inner::Sqs(q) => q.delete(receipts).await,
        }
    }

    /// Hides an in-flight message for `visibility` from now: longer to keep working on it,
    /// or [`Duration::ZERO`] to release it for redelivery (and unblock its group) at once.
    ///
    /// # Errors
    /// [`QueueError::ReceiptExpired`] when the message is no longer in flight under this
    /// receipt; [`QueueError::InvalidArgument`] above 12 hours.
    #[tracing::instrument(skip_all, fields(queue = %self.name(), visibility = ?visibility), err)]
    pub async fn change_visibility(
        &self,
        receipt: &Receipt,
        visibility: Duration,
    ) -> Result<(), QueueError> {
        if visibility > limits::MAX_VISIBILITY_TIMEOUT {
            return Err(QueueError::InvalidArgument {
                queue: self.name().to_owned(),
                reason: format!("visibility {visibility:?} is above the limit of 12h"),
            });
        }
        match &self.inner {
            Inner::Embedded(q) => q.change_visibility(receipt, visibility).await,
            Inner::Sqs(q) => q.change_visibility(receipt, visibility).await,
        }
    }

    /// Approximate numbers of visible, in-flight and dead messages (exact on embedded; SQS
    /// reports approximations that lag by up to a minute on AWS).
    ///
    /// # Errors
    /// [`QueueError::Unavailable`] when the engine fails.
    #[tracing::instrument(skip_all, fields(queue = %self.name()), err)]
    pub async fn counts(&self) -> Result<QueueCounts, QueueError> {
        match &self.inner {
            Inner::Embedded(q) => q.counts().await,
            Inner::Sqs(q) => q.counts().await,
        }
    }

    /// The counts of every group that holds messages: `Some` on the embedded backend, `None`
    /// on SQS, which cannot tell. Messages without a group are under `""`.
    ///
    /// # Errors
    /// [`QueueError::Unavailable`] when the database fails.
    #[tracing::instrument(skip_all, fields(queue = %self.name()), err)]
    pub async fn counts_by_group(
        &self,
    ) -> Result<Option<BTreeMap<String, GroupCounts>>, QueueError> {
        match &self.inner {
            Inner::Embedded(q) => q.counts_by_group().await.map(Some),
            Inner::Sqs(_) => Ok(None),
        }
    }

    /// A page of dead letters, oldest first, and the token of the next page (`None` at the
    /// end). `page_size` is clamped to 1..=[`limits::MAX_DEAD_LETTER_PAGE`].
    ///
    /// On SQS the dead-letter queue can only be read by receiving from it: the listed
    /// messages are received and released again at once, there is always a single page
    /// (the token is `None`), and on a FIFO dead-letter queue a page holds the first messages
    /// of each group. [`Queue::counts`] tells how many there are.
    ///
    /// # Errors
    /// [`QueueError::InvalidArgument`] for a malformed token; [`QueueError::Unavailable`].
    #[tracing::instrument(skip_all, fields(queue = %self.name(), page_size), err)]
    pub async fn list_dead_letters(
        &self,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<(Vec<DeadLetterMessage>, Option<String>), QueueError> {
        let page_size = page_size.clamp(1, limits::MAX_DEAD_LETTER_PAGE);
        match &self.inner {
            Inner::Embedded(q) => q.list_dead_letters(page_size, page_token).await,
            Inner::Sqs(q) => q.list_dead_letters(page_size).await,
        }
    }

    /// Puts dead letters back into the queue as new deliveries (receive count 0), in their
    /// original order per group, behind what each group already holds. Returns how many
    /// were redriven.
    ///
    /// On SQS this receives from the dead-letter queue, sends to the queue, then deletes
    /// from the dead-letter queue: a crash in between can leave a message in both (the
    /// version guard of the consumer makes the duplicate harmless). Selected ids behind
    /// unselected messages of the same group in a FIFO dead-letter queue may be out of
    /// reach of one call; the count tells.
    ///
    /// # Errors
    /// [`QueueError::Unavailable`] or [`QueueError::Throttled`] when the engine fails.
    #[tracing::instrument(skip_all, fields(queue = %self.name()), err)]
    pub async fn redrive_dead_letters(
        &self,
        selection: DeadLetterSelection,
    ) -> Result<u64, QueueError> {
        match &self.inner {
            Inner::Embedded(q) => q.redrive_dead_letters(selection).await,
            Inner::Sqs(q) => q.redrive_dead_letters(selection).await,
        }
    }

    /// Checks that the engine answers, for readiness probes.
    ///
    /// # Errors
    /// As [`Queue::counts`].
    pub async fn ping(&self) -> Result<(), QueueError> {
        self.counts().await.map(|_| ())
    }
}

/// Hands the queue's sizes to `report` every `interval` until `shutdown` completes (for the
/// `queue_messages{state}` gauges); a failed read is logged at debug and tried again.
pub async fn watch_counts(
    queue: Queue,
    interval: std::time::Duration,
    shutdown: impl Future<Output = ()>,
    report: impl Fn(QueueCounts),
) {
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        match queue.counts().await {
            Ok(counts) => report(counts),
            Err(error) => {
                tracing::debug!(%error, queue = queue.name(), "cannot read the queue's sizes")
            }
        }
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}
