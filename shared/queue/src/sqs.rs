//! The SQS backend: Amazon SQS (or LocalStack) through aws-sdk-sqs.
//!
//! - Calls are retried by the SDK's standard retry strategy (throttling and server errors,
//!   jittered exponential backoff, `sqs.max_attempts` attempts).
//! - Batch calls can fail entry by entry while the call succeeds. Entries that failed on the
//!   server's side are retried, alone, with backoff; an entry the server refuses for its
//!   content ends the send with [`QueueError::InvalidMessage`]. Nothing is dropped silently.
//! - A send is split into lanes by group (`sqs.send_concurrency` of them) that run at once;
//!   within a lane batches go one after another, so a group's order holds. A retried entry
//!   can land behind a later entry of the same group that succeeded in the same call (SQS
//!   rarely fails single entries for server reasons); consumers guard with versions anyway.
//! - Dead letters live in the dead-letter queue named by the redrive policy; listing and
//!   redriving read it by receiving from it.

use std::{
    collections::{HashMap, HashSet},
    hash::{Hash as _, Hasher as _},
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use anyhow::Context as _;
use aws_config::{BehaviorVersion, Region, retry::RetryConfig, timeout::TimeoutConfig};
use aws_sdk_sqs::{
    Client,
    config::Credentials,
    error::{DisplayErrorContext, ProvideErrorMetadata, SdkError},
    types::{
        ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry, Message,
        MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName,
        SendMessageBatchRequestEntry,
    },
};
use secrecy::ExposeSecret as _;

use crate::{
    DeadLetterMessage, DeadLetterSelection, OutgoingMessage, QueueCounts, QueueError,
    QueueSettings, Receipt, ReceivedMessage, limits, message,
};

/// How long messages read from the dead-letter queue stay hidden while a list or redrive
/// works on them; they are released (or deleted) before it returns.
const DEAD_LETTER_HOLD_SECS: i32 = 60;
/// Dead letters are kept for SQS's longest retention, 14 days.
const DEAD_LETTER_RETENTION_SECS: &str = "1209600";
/// Error codes that mean "slow down".
const THROTTLING_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "RequestThrottled",
    "AWS.SimpleQueueService.RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
];
/// Error codes of a server that failed and may succeed later.
const SERVER_CODES: &[&str] = &[
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "AWS.SimpleQueueService.InternalError",
    "KmsThrottled",
];
/// Error codes that say a receipt is no longer valid.
const RECEIPT_CODES: &[&str] = &[
    "ReceiptHandleIsInvalid",
    "MessageNotInflight",
    "AWS.SimpleQueueService.MessageNotInflight",
    "InvalidParameterValue",
];

#[derive(Debug, Clone)]
pub(crate) struct SqsQueue {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    client: Client,
    name: String,
    url: String,
    dead_letter_url: String,
    fifo: bool,
    /// Visibility timeout of receives, in whole seconds (rounded up).
    visibility_secs: i32,
    max_attempts: u32,
    send_concurrency: usize,
    /// `queue.sqs` attempt and operation timeouts, for receives' own (longer) ones.
    attempt_timeout: Duration,
    operation_timeout: Duration,
}

/// The SDK's timeouts for calls that may wait `wait` on the server (a long poll) on top of
/// the configured attempt and operation timeouts.
fn timeouts(attempt: Duration, operation: Duration, wait: Duration) -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(attempt.min(Duration::from_secs(3)))
        .operation_attempt_timeout(attempt + wait)
        .operation_timeout(operation + wait)
        .build()
}

impl SqsQueue {
    pub(crate) async fn open(settings: &QueueSettings) -> anyhow::Result<Self> {
        let sqs = &settings.sqs;
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(sqs.max_attempts)
                    .with_initial_backoff(Duration::from_millis(50))
                    .with_max_backoff(Duration::from_secs(5)),
            )
            .timeout_config(timeouts(
                sqs.attempt_timeout,
                sqs.operation_timeout,
                Duration::ZERO,
            ));
        if let Some(region) = &sqs.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(endpoint) = &sqs.endpoint_url {
            loader = loader.endpoint_url(endpoint.as_str().trim_end_matches('/'));
        }
        if let (Some(id), Some(secret)) = (&sqs.access_key_id, &sqs.secret_access_key) {
            loader = loader.credentials_provider(Credentials::new(
                id.clone(),
                secret.expose_secret().to_owned(),
                None,
                None,
                "mall-queue settings",
            ));
        }
        let config = loader.load().await;
        anyhow::ensure!(
            config.region().is_some(),
            "queue {} has no AWS region: set queue.sqs.region or AWS_REGION",
            settings.name
        );
        let client = Client::new(&config);

        let name = settings.sqs_queue_name();
        let dead_letter_name = settings.sqs_dead_letter_queue_name();
        let fifo_attribute = |attributes: &mut HashMap<QueueAttributeName, String>| {
            if settings.fifo {
                attributes.insert(QueueAttributeName::FifoQueue, "true".to_owned());
            }
        };
        let mut dead_letter_attributes = HashMap::new();
        fifo_attribute(&mut dead_letter_attributes);
        dead_letter_attributes.insert(
            QueueAttributeName::MessageRetentionPeriod,
            DEAD_LETTER_RETENTION_SECS.to_owned(),
        );
        let dead_letter_url = ensure_queue(
            &client,
            &dead_letter_name,
            dead_letter_attributes,
            sqs.create_queues,
        )
        .await?;

        let visibility_secs = whole_secs(settings.visibility_timeout);
        let mut attributes = HashMap::new();
        fifo_attribute(&mut attributes);
        if sqs.create_queues {
            let arn = client
                .get_queue_attributes()
                .queue_url(&dead_letter_url)
                .attribute_names(QueueAttributeName::QueueArn)
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("{}", DisplayErrorContext(e)))
                .with_context(|| format!("failed to read the ARN of queue {dead_letter_name}"))?
                .attributes
                .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
                .with_context(|| format!("queue {dead_letter_name} has no ARN"))?;
            attributes.insert(
                QueueAttributeName::RedrivePolicy,
                serde_json::json!({
                    "deadLetterTargetArn": arn,
                    "maxReceiveCount": settings.max_receives,
                })
                .to_string(),
            );
            attributes.insert(
                QueueAttributeName::VisibilityTimeout,
                visibility_secs.to_string(),
            );
        }
        let url = ensure_queue(&client, &name, attributes, sqs.create_queues).await?;
        tracing::info!(queue = %settings.name, sqs_queue = %name, dead_letter_queue = %dead_letter_name,
            "sqs queue ready");
        Ok(Self {
            shared: Arc::new(Shared {
                client,
                name: settings.name.clone(),
                url,
                dead_letter_url,
                fifo: settings.fifo,
                visibility_secs,
                max_attempts: sqs.max_attempts,
                send_concurrency: sqs.send_concurrency,
                attempt_timeout: sqs.attempt_timeout,
                operation_timeout: sqs.operation_timeout,
            }),
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.shared.name
    }

    fn error<E, R>(&self, error: SdkError<E, R>) -> QueueError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        let queue = self.shared.name.clone();
        match &error {
            SdkError::ServiceError(context) => {
                let code = context.err().code().unwrap_or_default();
                if THROTTLING_CODES.contains(&code) {
                    QueueError::Throttled {
                        queue,
                        attempts: self.shared.max_attempts,
                    }
                } else if SERVER_CODES.contains(&code) {
                    QueueError::Unavailable {
                        queue,
                        source: anyhow::anyhow!("{}", DisplayErrorContext(error)).into(),
                    }
                } else {
                    QueueError::Other {
                        queue,
                        source: anyhow::anyhow!("{}", DisplayErrorContext(error)),
                    }
                }
            }
            SdkError::DispatchFailure(_)
            | SdkError::TimeoutError(_)
            | SdkError::ResponseError(_) => QueueError::Unavailable {
                queue,
                source: anyhow::anyhow!("{}", DisplayErrorContext(error)).into(),
            },
            _ => QueueError::Other {
                queue,
                source: anyhow::anyhow!("{}", DisplayErrorContext(error)),
            },
        }
    }

    pub(crate) async fn send(&self, messages: Vec<OutgoingMessage>) -> Result<(), QueueError> {
        message::validate(&self.shared.name, self.shared.fifo, &messages)?;
        let lanes = self.shared.send_concurrency.min(messages.len()).max(1);
        let mut by_lane: Vec<Vec<(usize, OutgoingMessage)>> =
            (0..lanes).map(|_| Vec::new()).collect();
        for (index, message) in messages.into_iter().enumerate() {
            let lane = match (&message.group_id, self.shared.fifo) {
                (Some(group), true) => {
                    let mut hasher = std::collections::hash_map::DefaultHasher::new();
                    group.hash(&mut hasher);
                    usize::try_from(hasher.finish() % lanes as u64).unwrap_or_default()
                }
                _ => index % lanes,
            };
            by_lane[lane].push((index, message));
        }
        futures::future::try_join_all(
            by_lane
                .into_iter()
                .filter(|lane| !lane.is_empty())
                .map(|lane| self.send_lane(lane)),
        )
        .await?;
        Ok(())
    }

    /// Sends one lane's messages in batches, one batch after another.
    async fn send_lane(&self, messages: Vec<(usize, OutgoingMessage)>) -> Result<(), QueueError> {
        let mut batch = Vec::with_capacity(limits::SQS_MAX_BATCH_ENTRIES);
        let mut bytes = 0;
        for (index, message) in messages {
            let size = message.size();
            if batch.len() == limits::SQS_MAX_BATCH_ENTRIES
                || (!batch.is_empty() && bytes + size > limits::SQS_MAX_BATCH_BYTES)
            {
                self.send_batch(std::mem::take(&mut batch)).await?;
                bytes = 0;
            }
            bytes += size;
            batch.push((index, message));
        }
        if !batch.is_empty() {
            self.send_batch(batch).await?;
        }
        Ok(())
    }

    /// Sends one batch, retrying entries that failed on the server's side.
    async fn send_batch(
        &self,
        mut pending: Vec<(usize, OutgoingMessage)>,
    ) -> Result<(), QueueError> {
        for attempt in 1..=self.shared.max_attempts {
            let entries = pending
                .iter()
                .enumerate()
                .map(|(position, (_, message))| self.entry(position, message))
                .collect::<Result<Vec<_>, _>>()?;
            let output = self
                .shared
                .client
                .send_message_batch()
                .queue_url(&self.shared.url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| self.error(e))?;
            if output.failed().is_empty() {
                return Ok(());
            }
            let mut failed = HashSet::new();
            for entry in output.failed() {
                let position: usize = entry.id().parse().unwrap_or(usize::MAX);
                let index = pending.get(position).map_or(usize::MAX, |(i, _)| *i);
                if entry.sender_fault() {
                    return Err(QueueError::InvalidMessage {
                        queue: self.shared.name.clone(),
                        index,
                        reason: format!(
                            "SQS refused it: {} {}",
                            entry.code(),
                            entry.message().unwrap_or_default()
                        ),
                    });
                }
                failed.insert(position);
            }
            tracing::warn!(queue = %self.shared.name, failed = failed.len(), attempt,
                "sqs failed some entries of a send batch; retrying them");
            pending = pending
                .into_iter()
                .enumerate()
                .filter(|(position, _)| failed.contains(position))
                .map(|(_, entry)| entry)
                .collect();
            tokio::time::sleep(backoff(attempt)).await;
        }
        Err(QueueError::Unavailable {
            queue: self.shared.name.clone(),
            source: format!(
                "{} entries still failed after {} attempts",
                pending.len(),
                self.shared.max_attempts
            )
            .into(),
        })
    }

    fn entry(
        &self,
        position: usize,
        message: &OutgoingMessage,
    ) -> Result<SendMessageBatchRequestEntry, QueueError> {
        let mut entry = SendMessageBatchRequestEntry::builder()
            .id(position.to_string())
            .message_body(message.body.clone());
        if self.shared.fifo {
            entry = entry
                .set_message_group_id(message.group_id.clone())
                // No id means "never deduplicate": a fresh one each send.
                .message_deduplication_id(
                    message
                        .dedup_id
                        .clone()
                        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()),
                );
        }
        for (name, value) in &message.attributes {
            let value = MessageAttributeValue::builder()
                .data_type("String")
                .string_value(value.clone())
                .build()
                .map_err(|e| self.other(e))?;
            entry = entry.message_attributes(name.clone(), value);
        }
        entry.build().map_err(|e| self.other(e))
    }

    fn other(&self, error: impl std::error::Error + Send + Sync + 'static) -> QueueError {
        QueueError::Other {
            queue: self.shared.name.clone(),
            source: anyhow::Error::new(error),
        }
    }

    pub(crate) async fn receive(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut received = Vec::new();
        loop {
            let want = (max - received.len()).min(limits::SQS_MAX_RECEIVE_PER_CALL);
            let wait_secs = if received.is_empty() {
                whole_secs(
                    deadline
                        .saturating_duration_since(tokio::time::Instant::now())
                        .min(limits::SQS_MAX_WAIT),
                )
            } else {
                0
            };
            let messages = self
                .receive_from(
                    &self.shared.url,
                    want,
                    wait_secs,
                    self.shared.visibility_secs,
                )
                .await?;
            let got = messages.len();
            received.extend(messages.iter().map(|m| self.received(m)));
            if received.len() >= max || (got < want && !received.is_empty()) {
                break;
            }
            if received.is_empty() && tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        Ok(received)
    }

    async fn receive_from(
        &self,
        url: &str,
        max: usize,
        wait_secs: i32,
        visibility_secs: i32,
    ) -> Result<Vec<Message>, QueueError> {
        let output = self
            .shared
            .client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(i32::try_from(max).unwrap_or(10))
            .wait_time_seconds(wait_secs)
            .visibility_timeout(visibility_secs)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .customize()
            .config_override(
                aws_sdk_sqs::config::Builder::default().timeout_config(timeouts(
                    self.shared.attempt_timeout,
                    self.shared.operation_timeout,
                    Duration::from_secs(wait_secs.unsigned_abs().into()),
                )),
            )
            .send()
            .await
            .map_err(|e| self.error(e))?;
        Ok(output.messages.unwrap_or_default())
    }

    fn received(&self, message: &Message) -> ReceivedMessage {
        let system = message.attributes();
        let system = |name: MessageSystemAttributeName| system.and_then(|a| a.get(&name).cloned());
        ReceivedMessage {
            message_id: message.message_id().unwrap_or_default().to_owned(),
            receipt: Receipt(message.receipt_handle().unwrap_or_default().to_owned()),
            body: message.body().unwrap_or_default().to_owned(),
            attributes: message
                .message_attributes()
                .map(|attributes| {
                    attributes
                        .iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.string_value()?.to_owned())))
                        .collect()
                })
                .unwrap_or_default(),
            receive_count: system(MessageSystemAttributeName::ApproximateReceiveCount)
                .and_then(|c| c.parse().ok())
                .unwrap_or(1),
            group_id: system(MessageSystemAttributeName::MessageGroupId),
            sent_time: system(MessageSystemAttributeName::SentTimestamp)
                .and_then(|ms| ms.parse::<u64>().ok())
                .map_or(UNIX_EPOCH, |ms| UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }

    pub(crate) async fn delete(&self, receipts: &[Receipt]) -> Result<(), QueueError> {
        let expired = self.delete_from(&self.shared.url, receipts).await?;
        if expired > 0 {
            return Err(QueueError::ReceiptExpired {
                queue: self.shared.name.clone(),
                count: expired,
            });
        }
        Ok(())
    }

    /// Deletes in batches of 10; returns how many receipts SQS called invalid.
    async fn delete_from(&self, url: &str, receipts: &[Receipt]) -> Result<usize, QueueError> {
        let mut expired = 0;
        for chunk in receipts.chunks(limits::SQS_MAX_BATCH_ENTRIES) {
            let mut pending: Vec<&Receipt> = chunk.iter().collect();
            let mut attempt = 0;
            while !pending.is_empty() {
                attempt += 1;
                let entries = pending
                    .iter()
                    .enumerate()
                    .map(|(position, receipt)| {
                        DeleteMessageBatchRequestEntry::builder()
                            .id(position.to_string())
                            .receipt_handle(receipt.as_str())
                            .build()
                            .map_err(|e| self.other(e))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let output = self
                    .shared
                    .client
                    .delete_message_batch()
                    .queue_url(url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .map_err(|e| self.error(e))?;
                let mut retry = Vec::new();
                for entry in output.failed() {
                    let position: usize = entry.id().parse().unwrap_or(usize::MAX);
                    if entry.sender_fault() || RECEIPT_CODES.contains(&entry.code()) {
                        expired += 1;
                    } else if let Some(receipt) = pending.get(position) {
                        retry.push(*receipt);
                    }
                }
                if !retry.is_empty() {
                    if attempt >= self.shared.max_attempts {
                        return Err(QueueError::Unavailable {
                            queue: self.shared.name.clone(),
                            source: format!(
                                "{} deletes still failed after {attempt} attempts",
                                retry.len()
                            )
                            .into(),
                        });
                    }
                    tracing::warn!(queue = %self.shared.name, failed = retry.len(), attempt,
                        "sqs failed some entries of a delete batch; retrying them");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                pending = retry;
            }
        }
        Ok(expired)
    }

    pub(crate) async fn change_visibility(
        &self,
        receipt: &Receipt,
        visibility: Duration,
    ) -> Result<(), QueueError> {
        let result = self
            .shared
            .client
            .change_message_visibility()
            .queue_url(&self.shared.url)
            .receipt_handle(receipt.as_str())
            .visibility_timeout(whole_secs(visibility))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(context))
                if RECEIPT_CODES.contains(&context.err().code().unwrap_or_default()) =>
            {
                Err(QueueError::ReceiptExpired {
                    queue: self.shared.name.clone(),
                    count: 1,
                })
            }
            Err(error) => Err(self.error(error)),
        }
    }

    async fn approximate(&self, url: &str) -> Result<(u64, u64), QueueError> {
        let attributes = self
            .shared
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .map_err(|e| self.error(e))?
            .attributes
            .unwrap_or_default();
        let number = |name: QueueAttributeName| {
            attributes
                .get(&name)
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_default()
        };
        Ok((
            number(QueueAttributeName::ApproximateNumberOfMessages),
            number(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        ))
    }

    pub(crate) async fn counts(&self) -> Result<QueueCounts, QueueError> {
        let (visible, in_flight) = self.approximate(&self.shared.url).await?;
        let (dead_visible, dead_hidden) = self.approximate(&self.shared.dead_letter_url).await?;
        Ok(QueueCounts {
            visible,
            in_flight,
            dead: dead_visible + dead_hidden,
        })
    }

    /// Receives dead letters until `max` or until none come, holding them hidden.
    async fn hold_dead_letters(
        &self,
        max: usize,
        wait_first: bool,
    ) -> Result<Vec<Message>, QueueError> {
        let mut held = Vec::new();
        while held.len() < max {
            let want = (max - held.len()).min(limits::SQS_MAX_RECEIVE_PER_CALL);
            // Short polls may miss messages on AWS; the first call of a listing waits a second.
            let wait = i32::from(wait_first && held.is_empty());
            let messages = self
                .receive_from(
                    &self.shared.dead_letter_url,
                    want,
                    wait,
                    DEAD_LETTER_HOLD_SECS,
                )
                .await?;
            if messages.is_empty() {
                break;
            }
            held.extend(messages);
        }
        Ok(held)
    }

    /// Makes held dead letters visible again at once.
    async fn release_dead_letters(&self, messages: &[Message]) -> Result<(), QueueError> {
        for chunk in messages.chunks(limits::SQS_MAX_BATCH_ENTRIES) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(position, message)| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(position.to_string())
                        .receipt_handle(message.receipt_handle().unwrap_or_default())
                        .visibility_timeout(0)
                        .build()
                        .map_err(|e| self.other(e))
                })
                .collect::<Result<Vec<_>, _>>()?;
            // A release that fails only delays the letter by the hold time: not worth an error.
            if let Err(error) = self
                .shared
                .client
                .change_message_visibility_batch()
                .queue_url(&self.shared.dead_letter_url)
                .set_entries(Some(entries))
                .send()
                .await
            {
                tracing::warn!(queue = %self.shared.name, error = %DisplayErrorContext(error),
                    "failed to release dead letters after reading them");
            }
        }
        Ok(())
    }

    fn dead_letter(&self, message: &Message) -> DeadLetterMessage {
        let m = self.received(message);
        DeadLetterMessage {
            id: m.message_id,
            group_id: m.group_id,
            body: m.body,
            attributes: m.attributes,
            receive_count: m.receive_count,
            sent_time: m.sent_time,
        }
    }

    pub(crate) async fn list_dead_letters(
        &self,
        page_size: usize,
    ) -> Result<(Vec<DeadLetterMessage>, Option<String>), QueueError> {
        let held = self.hold_dead_letters(page_size, true).await?;
        let letters = held.iter().map(|m| self.dead_letter(m)).collect();
        self.release_dead_letters(&held).await?;
        Ok((letters, None))
    }

    pub(crate) async fn redrive_dead_letters(
        &self,
        selection: DeadLetterSelection,
    ) -> Result<u64, QueueError> {
        let wanted: Option<HashSet<String>> = match selection {
            DeadLetterSelection::All => None,
            DeadLetterSelection::Ids(ids) => Some(ids.into_iter().collect()),
        };
        let mut kept = Vec::new();
        let mut seen = HashSet::new();
        let mut total = 0u64;
        loop {
            let batch = self
                .hold_dead_letters(limits::SQS_MAX_RECEIVE_PER_CALL, true)
                .await?;
            // Stop when nothing new comes (all seen ones are held or gone).
            if batch.is_empty()
                || batch
                    .iter()
                    .all(|m| seen.contains(m.message_id().unwrap_or_default()))
            {
                kept.extend(batch);
                break;
            }
            let (chosen, others): (Vec<Message>, Vec<Message>) = batch.into_iter().partition(|m| {
                wanted
                    .as_ref()
                    .is_none_or(|ids| ids.contains(m.message_id().unwrap_or_default()))
            });
            seen.extend(
                chosen
                    .iter()
                    .chain(&others)
                    .map(|m| m.message_id().unwrap_or_default().to_owned()),
            );
            kept.extend(others);
            if !chosen.is_empty() {
                let outgoing = chosen
                    .iter()
                    .map(|m| {
                        let m = self.received(m);
                        OutgoingMessage {
                            body: m.body,
                            group_id: m.group_id,
                            // A fresh id: the original may still be within its window.
                            dedup_id: None,
                            attributes: m.attributes,
                        }
                    })
                    .collect();
                self.send(outgoing).await?;
                let receipts: Vec<Receipt> = chosen
                    .iter()
                    .map(|m| Receipt(m.receipt_handle().unwrap_or_default().to_owned()))
                    .collect();
                self.delete_from(&self.shared.dead_letter_url, &receipts)
                    .await?;
                total += chosen.len() as u64;
            }
            if wanted
                .as_ref()
                .is_some_and(|ids| ids.iter().all(|id| seen.contains(id)))
            {
                break;
            }
        }
        self.release_dead_letters(&kept).await?;
        if total > 0 {
            tracing::info!(queue = %self.shared.name, messages = total, "redrove dead letters");
        }
        Ok(total)
    }
}

/// Returns the queue's URL, creating it with `attributes` when missing and `create` is set,
/// or bringing an existing one's attributes up to date.
async fn ensure_queue(
    client: &Client,
    name: &str,
    attributes: HashMap<QueueAttributeName, String>,
    create: bool,
) -> anyhow::Result<String> {
    match client.get_queue_url().queue_name(name).send().await {
        Ok(output) => {
            let url = output
                .queue_url
                .with_context(|| format!("sqs returned no url for queue {name}"))?;
            if create {
                let changeable: HashMap<_, _> = attributes
                    .into_iter()
                    .filter(|(k, _)| *k != QueueAttributeName::FifoQueue)
                    .collect();
                if !changeable.is_empty() {
                    client
                        .set_queue_attributes()
                        .queue_url(&url)
                        .set_attributes(Some(changeable))
                        .send()
                        .await
                        .map_err(|e| anyhow::anyhow!("{}", DisplayErrorContext(e)))
                        .with_context(|| {
                            format!("failed to update the attributes of queue {name}")
                        })?;
                }
            }
            Ok(url)
        }
        Err(error)
            if error
                .as_service_error()
                .is_some_and(|e| e.is_queue_does_not_exist()) =>
        {
            anyhow::ensure!(
                create,
                "sqs queue {name} does not exist: create it (with its dead-letter queue and \
                 redrive policy) or set queue.sqs.create_queues = true"
            );
            let output = client
                .create_queue()
                .queue_name(name)
                .set_attributes(Some(attributes))
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("{}", DisplayErrorContext(e)))
                .with_context(|| format!("failed to create sqs queue {name}"))?;
            tracing::info!(sqs_queue = %name, "created sqs queue");
            output
                .queue_url
                .with_context(|| format!("sqs returned no url for new queue {name}"))
        }
        Err(error) => Err(anyhow::anyhow!("{}", DisplayErrorContext(error)))
            .with_context(|| format!("failed to look up sqs queue {name}")),
    }
}

/// Whole seconds, rounded up, as SQS takes them.
fn whole_secs(duration: Duration) -> i32 {
    let secs = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    i32::try_from(secs).unwrap_or(i32::MAX)
}

/// The wait before retrying failed entries after `attempt` attempts: the shared policy
/// (`mall_retry`), from 50 ms doubling up to 5 s.
fn backoff(attempt: u32) -> Duration {
    mall_retry::Backoff::after(Duration::from_millis(50), Duration::from_secs(5), attempt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_up_to_whole_seconds() {
        assert_eq!(whole_secs(Duration::ZERO), 0);
        assert_eq!(whole_secs(Duration::from_millis(1)), 1);
        assert_eq!(whole_secs(Duration::from_secs(30)), 30);
        assert_eq!(whole_secs(Duration::from_millis(1500)), 2);
    }

    #[test]
    fn backoff_grows_and_stays_bounded() {
        assert!(backoff(1) <= Duration::from_millis(100));
        assert!(backoff(30) <= Duration::from_secs(5));
        assert!(backoff(30) >= Duration::from_millis(2500));
    }
}
