//! Stage 2: receive lane messages, merge them, apply them to the catalog, delete them.
//!
//! A consumer receives a batch from its share of the lanes (`apply.receive_lanes` on the
//! embedded queue, so the replica's consumers call the catalog side by side) and splits it by
//! lane; within a lane, messages are handled in
//! the order received, and a lane whose apply fails gives all of its messages of this batch
//! back, so no later change of a product overtakes an earlier one. A message is deleted only
//! after the catalog committed its changes.
//!
//! The lanes of one batch are first applied together: their changes are merged into one
//! BulkUpdateProducts per product type (lanes hold disjoint products, so this is the same as
//! applying them one lane after another), and their messages are deleted with one call. The
//! catalog writes a few large transactions instead of one small one per lane, which is where
//! most of stage 2's time went. If that fails for a reason other than an outage, each lane is
//! applied on its own, so one failing lane never holds the others back; the writes that did
//! commit are harmless to repeat under the version guard.
//!
//! Failures are sorted by whose fault they are; only a change's own fault uses up receives:
//! - the environment (the catalog is unreachable, overloaded, slow or failing inside:
//!   UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, a broken connection): retry with jittered
//!   backoff while keeping the messages in flight (their visibility is extended), so an
//!   outage never pushes healthy messages toward the dead-letter queue;
//! - the operator (the catalog refuses the request as a whole: a product type it does not
//!   know, a permission): the same wait, logged at ERROR and shown in GetRelayStatus as
//!   needing an operator; nothing is dead-lettered, and the lane resumes once it is fixed;
//! - the change (INVALID_ARGUMENT naming `updates[i]`): quarantine those changes and apply
//!   the rest;
//! - the message (it does not decode, or one change exceeds the catalog's message size):
//!   record the error, give the messages back after a backoff; after `queue.max_receives`
//!   deliveries the queue dead-letters them, while the other lanes keep flowing.
//!
//! # Layout
//! - [`merge`]: the changes of a lane into the fewest equivalent catalog writes.
//! - `catalog`: the catalog client and how its errors are classified.

pub mod merge;

mod catalog;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::{Duration, Instant, SystemTime},
};

use futures::future::join_all;
use mall_proto::sync::v1::{ProductChange, ProductChangeBatch};
use mall_queue::{Queue, Receipt, ReceivedMessage, decode_body};
use mall_retry::Backoff;
use prost::Message as _;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

pub use catalog::{CatalogClient, connect_catalog};

use crate::{
    config::ApplySettings,
    control::Control,
    metrics::RelayMetrics,
    store::{NewQuarantined, RelayStore},
};
use catalog::{Failure, apply_batch};
use merge::TypeBatch;

/// Stage 2 of one replica; cheap to clone (one clone per consumer).
#[derive(Debug, Clone)]
pub struct Applier {
    queue: Queue,
    catalog: CatalogClient,
    store: RelayStore,
    settings: ApplySettings,
    /// The queue's visibility timeout: how long a received message stays ours.
    visibility: Duration,
    metrics: RelayMetrics,
    control: Control,
}

/// How one lane's messages ended.
enum LaneOutcome {
    Applied,
    /// Given back to the queue (or left to expire at shutdown).
    Returned,
}

/// Why applying a set of changes stopped before all were committed.
enum Stopped {
    /// The catalog cannot take them as they are; the message says why.
    Failed(String),
    /// The catalog refuses a request as a whole (an operator must act), and the caller asked
    /// not to wait for that here: several lanes applied together fall back to one lane at a
    /// time, so only the lane at fault waits.
    NeedsOperator(String),
    /// The relay is shutting down; the messages return when their visibility runs out.
    Shutdown,
}

/// Where a change came from, for the quarantine: its lane and the id of the lane's first
/// message in this batch.
type Origin<'a> = &'a (dyn Fn(&ProductChange) -> (String, String) + Sync);

/// Links from a combined apply's span to the traces of the lanes it applies, at most.
const MAX_TRACE_LINKS: usize = 32;

impl Applier {
    /// Stage 2 over `queue`, applying to `catalog`.
    pub fn new(
        queue: Queue,
        catalog: CatalogClient,
        store: RelayStore,
        settings: ApplySettings,
        visibility: Duration,
        metrics: RelayMetrics,
        control: Control,
    ) -> Self {
        Self {
            queue,
            catalog,
            store,
            settings,
            visibility,
            metrics,
            control,
        }
    }

    /// Receives and applies until `shutdown`; while paused, receives nothing.
    ///
    /// # Errors
    /// Never; failures are logged, recorded and retried.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut paused = self.control.paused();
        let mut backoff = self.backoff();
        loop {
            if *paused.borrow_and_update() {
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    _ = paused.changed() => continue,
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                result = self.run_once(&shutdown) => match result {
                    Ok(_) => backoff.reset(),
                    Err(error) => {
                        tracing::warn!(error = %error, "failed to receive from the queue");
                        self.control.record_error(format!("failed to receive from the queue: {error}"));
                        tokio::select! {
                            () = shutdown.cancelled() => return Ok(()),
                            () = tokio::time::sleep(backoff.next_delay()) => {}
                        }
                    }
                },
            }
        }
    }

    /// One round: receive a batch (waiting up to the receive wait) and apply its lanes.
    /// Returns how many messages were received.
    ///
    /// # Errors
    /// When the queue cannot be read.
    pub async fn run_once(&self, shutdown: &CancellationToken) -> anyhow::Result<usize> {
        let messages = self
            .queue
            .receive_from_groups(
                self.settings.receive_batch(self.queue.backend()),
                self.settings.receive_lanes.unwrap_or(usize::MAX),
                self.settings.receive_wait,
            )
            .await?;
        let received = messages.len();
        if self.control.is_paused() {
            // Paused while this receive waited: give the messages back untouched.
            for message in &messages {
                if let Err(error) = self
                    .queue
                    .change_visibility(&message.receipt, Duration::ZERO)
                    .await
                {
                    tracing::warn!(error = %error, "failed to give a message back at pause; it returns when its visibility expires");
                }
            }
            return Ok(received);
        }
        let mut lanes: BTreeMap<String, Vec<ReceivedMessage>> = BTreeMap::new();
        for message in messages {
            lanes
                .entry(message.group_id.clone().unwrap_or_default())
                .or_default()
                .push(message);
        }
        if lanes.len() == 1 {
            for (lane, messages) in lanes {
                self.apply_lane(lane, messages, shutdown).await;
            }
        } else {
            self.apply_lanes(lanes, shutdown).await;
        }
        Ok(received)
    }

    /// Applies several lanes' messages together (see the module docs); lanes whose messages
    /// do not decode, and every lane if the combined apply fails, go through
    /// [`Applier::apply_lane`] one by one.
    async fn apply_lanes(
        &self,
        lanes: BTreeMap<String, Vec<ReceivedMessage>>,
        shutdown: &CancellationToken,
    ) {
        let mut together: Vec<(String, Vec<ReceivedMessage>, Decoded)> = Vec::new();
        let mut alone = Vec::new();
        for (lane, messages) in lanes {
            match decode_all(&lane, &messages) {
                Ok(decoded) => together.push((lane, messages, decoded)),
                // Gives the lane's messages back with the reason.
                Err(_) => alone.push((lane, messages)),
            }
        }
        let outcome = if together.len() < 2 {
            alone.extend(
                together
                    .drain(..)
                    .map(|(lane, messages, _)| (lane, messages)),
            );
            None
        } else {
            let span = tracing::info_span!(
                "relay.apply",
                otel.kind = "consumer",
                messaging.system = self.queue.messaging_system(),
                messaging.operation.type = "process",
                messaging.destination.name = self.queue.name(),
                messaging.batch.message_count =
                    together.iter().map(|(_, m, _)| m.len()).sum::<usize>(),
                lanes = together.len(),
                messages = together.iter().map(|(_, m, _)| m.len()).sum::<usize>()
            );
            link_traces(&span, together.iter().flat_map(|(_, m, _)| m));
            Some(
                self.apply_together(&mut together, shutdown)
                    .instrument(span)
                    .await,
            )
        };
        match outcome {
            Some(Err(Stopped::Failed(error) | Stopped::NeedsOperator(error))) => {
                tracing::warn!(
                    error,
                    lanes = together.len(),
                    "applying lanes together failed; applying each lane on its own"
                );
                // Each lane starts its own visibility clock at a full timeout: make it true,
                // as the combined apply may have used up much of the last extension.
                let to_extend = together.iter().filter(|_| !self.visibility.is_zero());
                for (_, messages, _) in to_extend {
                    for message in messages {
                        if let Err(error) = self
                            .queue
                            .change_visibility(&message.receipt, self.visibility)
                            .await
                        {
                            tracing::warn!(error = %error, "failed to extend visibility");
                        }
                    }
                }
                alone.extend(
                    together
                        .into_iter()
                        .map(|(lane, messages, _)| (lane, messages)),
                );
            }
            Some(Err(Stopped::Shutdown)) => return,
            Some(Ok(())) | None => {}
        }
        join_all(
            alone
                .into_iter()
                .map(|(lane, messages)| self.apply_lane(lane, messages, shutdown)),
        )
        .await;
    }

    async fn apply_together(
        &self,
        lanes: &mut [(String, Vec<ReceivedMessage>, Decoded)],
        shutdown: &CancellationToken,
    ) -> Result<(), Stopped> {
        let mut origins = Origins::default();
        let mut changes = Vec::new();
        for (_, _, decoded) in lanes.iter_mut() {
            changes.append(&mut decoded.changes);
            origins.extend(std::mem::take(&mut decoded.origins));
        }
        let messages: Vec<&ReceivedMessage> =
            lanes.iter().flat_map(|(_, messages, _)| messages).collect();
        let receipts: Vec<Receipt> = messages.iter().map(|m| m.receipt.clone()).collect();
        let origin = |change: &ProductChange| origins.of(change);
        let applied = Applied::of(&changes);
        let label = lane_numbers(lanes.iter().map(|(lane, _, _)| lane.as_str()));
        self.apply_changes(&label, &receipts, changes, &origin, false, shutdown)
            .await?;
        let ids: Vec<String> = messages.iter().map(|m| m.message_id.clone()).collect();
        let retried = messages.iter().any(|m| m.receive_count > 1);
        self.finish(&label, &receipts, &ids, retried, applied).await;
        Ok(())
    }

    async fn apply_lane(
        &self,
        lane: String,
        messages: Vec<ReceivedMessage>,
        shutdown: &CancellationToken,
    ) -> LaneOutcome {
        let span = tracing::info_span!(
            "relay.apply",
            otel.kind = "consumer",
            messaging.system = self.queue.messaging_system(),
            messaging.operation.type = "process",
            messaging.destination.name = self.queue.name(),
            messaging.batch.message_count = messages.len(),
            lanes = %lane_numbers([lane.as_str()]),
            messages = messages.len()
        );
        if let Some(traceparent) = messages
            .first()
            .and_then(|m| m.attributes.get(mall_telemetry::propagation::TRACEPARENT))
        {
            mall_telemetry::propagation::set_parent_from_headers(&span, traceparent, "");
        }
        self.apply_lane_in_span(&lane, messages, shutdown)
            .instrument(span)
            .await
    }

    async fn apply_lane_in_span(
        &self,
        lane: &str,
        messages: Vec<ReceivedMessage>,
        shutdown: &CancellationToken,
    ) -> LaneOutcome {
        let receipts: Vec<Receipt> = messages.iter().map(|m| m.receipt.clone()).collect();
        let ids: Vec<String> = messages.iter().map(|m| m.message_id.clone()).collect();
        let label = lane_numbers([lane]);
        let Decoded { changes, origins } = match decode_all(lane, &messages) {
            Ok(decoded) => decoded,
            Err(error) => {
                return self
                    .give_back(&ids, &receipts, &error, messages_attempt(&messages))
                    .await;
            }
        };
        let origin = |change: &ProductChange| origins.of(change);
        let applied = Applied::of(&changes);
        match self
            .apply_changes(&label, &receipts, changes, &origin, true, shutdown)
            .await
        {
            Ok(()) => {}
            Err(Stopped::Shutdown) => return LaneOutcome::Returned,
            Err(Stopped::Failed(error) | Stopped::NeedsOperator(error)) => {
                return self
                    .give_back(&ids, &receipts, &error, messages_attempt(&messages))
                    .await;
            }
        }
        let retried = messages.iter().any(|m| m.receive_count > 1);
        self.finish(&label, &receipts, &ids, retried, applied).await;
        LaneOutcome::Applied
    }

    /// Applies `changes`, decoded from the messages of `receipts` (kept hidden meanwhile):
    /// merged into the fewest catalog writes, retried through outages, refused ones
    /// quarantined. With `hold_for_operator`, a request refused as a whole is retried until
    /// an operator fixes the cause; without, it ends the call with
    /// [`Stopped::NeedsOperator`]. `Ok` once every change is committed or quarantined.
    async fn apply_changes(
        &self,
        label: &str,
        receipts: &[Receipt],
        changes: Vec<ProductChange>,
        origin: Origin<'_>,
        hold_for_operator: bool,
        shutdown: &CancellationToken,
    ) -> Result<(), Stopped> {
        let mut visible_until = Instant::now() + self.visibility;
        let mut pending: VecDeque<TypeBatch> = merge::merge(changes).into();
        while let Some(mut batch) = pending.pop_front() {
            let mut backoff = self.backoff();
            loop {
                let applied = apply_batch(
                    &self.catalog,
                    &batch,
                    self.settings.catalog_timeout,
                    &self.metrics,
                );
                match self
                    .keep_visible(label, receipts, &mut visible_until, applied)
                    .await
                {
                    Ok(()) => break,
                    Err(Failure::TooLarge) if batch.changes.len() > 1 => {
                        // Halves, in order: each product's changes stay in version order.
                        let second = batch.changes.split_off(batch.changes.len() / 2);
                        pending.push_front(TypeBatch {
                            product_type: batch.product_type.clone(),
                            changes: second,
                        });
                        pending.push_front(batch);
                        break;
                    }
                    Err(Failure::TooLarge) => {
                        return Err(Stopped::Failed(
                            "one change exceeds the catalog's maximum message size".into(),
                        ));
                    }
                    Err(Failure::Refused(refused)) => {
                        let (bad, rest): (Vec<_>, Vec<_>) = batch
                            .changes
                            .into_iter()
                            .enumerate()
                            .partition(|(i, _)| refused.contains_key(i));
                        // Kept hidden while the relay's database takes the records: an outage
                        // of it must not make the lane's messages visible and count receives.
                        let quarantined =
                            self.quarantine_refused(label, origin, bad, &refused, shutdown);
                        self.keep_visible(label, receipts, &mut visible_until, quarantined)
                            .await?;
                        batch.changes = rest.into_iter().map(|(_, c)| c).collect();
                        if batch.changes.is_empty() {
                            break;
                        }
                    }
                    Err(Failure::Operator(error)) if !hold_for_operator => {
                        return Err(Stopped::NeedsOperator(error));
                    }
                    Err(failure @ (Failure::Transient(_) | Failure::Operator(_))) => {
                        self.record_wait(label, &failure);
                        // The messages stay ours while the outage or misconfiguration lasts.
                        let wait = tokio::time::sleep(backoff.next_delay());
                        tokio::select! {
                            () = shutdown.cancelled() => return Err(Stopped::Shutdown),
                            () = self.keep_visible(label, receipts, &mut visible_until, wait) => {}
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// A retry sequence from `apply.retry_backoff_initial` to `retry_backoff_max`.
    fn backoff(&self) -> Backoff {
        Backoff::new(
            self.settings.retry_backoff_initial,
            self.settings.retry_backoff_max,
        )
    }

    /// Counts, logs and shows in the relay's status why a batch waits.
    fn record_wait(&self, label: &str, failure: &Failure) {
        match failure {
            Failure::Operator(error) => {
                self.metrics
                    .apply_retries
                    .with_label_values(&["operator"])
                    .inc();
                self.control.record_error(format!(
                    "the catalog refuses the lane's requests as a whole; an operator must act \
                     (the lane waits, nothing is dead-lettered): {error}"
                ));
                tracing::error!(
                    lanes = label,
                    error = %error,
                    "the catalog refuses requests as a whole; waiting for an operator"
                );
            }
            Failure::Transient(error) => {
                self.metrics
                    .apply_retries
                    .with_label_values(&["transient"])
                    .inc();
                self.control
                    .record_error(format!("catalog unavailable: {error}"));
                tracing::warn!(lanes = label, error = %error, "catalog unavailable; retrying");
            }
            Failure::Refused(_) | Failure::TooLarge => {}
        }
    }

    /// After the catalog committed: deletes the messages, clears their recorded failures
    /// (when they were delivered before), counts and observes the latency of `applied`.
    async fn finish(
        &self,
        label: &str,
        receipts: &[Receipt],
        ids: &[String],
        retried: bool,
        applied: Applied,
    ) {
        if let Err(error) = self.queue.delete(receipts).await {
            // The catalog has the changes; a redelivery is a no-op under the version guard.
            tracing::warn!(lanes = label, error = %error, "failed to delete applied messages");
        }
        if retried && let Err(error) = self.store.clear_apply_failures(ids).await {
            tracing::warn!(lanes = label, error = %error, "failed to clear recorded apply failures");
        }
        self.control.record_applied(applied.count);
        let now = SystemTime::now();
        for time in applied.event_times {
            self.metrics
                .latency
                .observe(now.duration_since(time).unwrap_or_default().as_secs_f64());
        }
    }

    /// Runs `work` while keeping the lane's messages hidden from other consumers: whenever
    /// less than half of the visibility timeout is left, it is extended. A lane can take
    /// longer than the timeout (several type batches, a slow or unavailable catalog); if a
    /// message became visible meanwhile it would be delivered again while still being applied,
    /// its receipt here would expire so it could not be deleted, and every such delivery would
    /// count towards dead-lettering a message that was applied each time.
    async fn keep_visible<T>(
        &self,
        lanes: &str,
        receipts: &[Receipt],
        visible_until: &mut Instant,
        work: impl Future<Output = T>,
    ) -> T {
        if self.visibility.is_zero() {
            // Nothing to keep: a zero timeout hides nothing.
            return work.await;
        }
        tokio::pin!(work);
        loop {
            let renew_at = *visible_until - self.visibility / 2;
            tokio::select! {
                biased;
                output = &mut work => return output,
                () = tokio::time::sleep_until(renew_at.into()) => {
                    let renewed = Instant::now() + self.visibility;
                    for receipt in receipts {
                        if let Err(error) =
                            self.queue.change_visibility(receipt, self.visibility).await
                        {
                            tracing::warn!(lanes, error = %error, "failed to extend visibility");
                        }
                    }
                    *visible_until = renewed;
                }
            }
        }
    }

    /// Records `error` for the messages and gives them back to the queue after a backoff
    /// that grows with their deliveries; the queue dead-letters them after `max_receives`.
    async fn give_back(
        &self,
        ids: &[String],
        receipts: &[Receipt],
        error: &str,
        attempt: u32,
    ) -> LaneOutcome {
        tracing::warn!(error, "apply failed; giving the messages back to the queue");
        self.metrics
            .apply_retries
            .with_label_values(&["released"])
            .inc();
        self.control.record_error(error);
        if let Err(failure) = self.store.record_apply_failure(ids, error).await {
            tracing::warn!(error = %failure, "failed to record an apply failure");
        }
        let delay = Backoff::after(
            self.settings.retry_backoff_initial,
            self.settings.retry_backoff_max,
            attempt,
        );
        for receipt in receipts {
            if let Err(error) = self.queue.change_visibility(receipt, delay).await {
                tracing::warn!(error = %error, "failed to give a message back; it returns when its visibility expires");
            }
        }
        LaneOutcome::Returned
    }

    async fn quarantine_refused(
        &self,
        lanes: &str,
        origin: Origin<'_>,
        refused: Vec<(usize, ProductChange)>,
        reasons: &BTreeMap<usize, String>,
        shutdown: &CancellationToken,
    ) -> Result<(), Stopped> {
        let records: Vec<NewQuarantined> = refused
            .into_iter()
            .map(|(i, change)| {
                let raw = change.encode_to_vec();
                let (source, position) = origin(&change);
                NewQuarantined {
                    dedup_key: format!("apply:{:016x}", crate::rollup::fnv64(&raw)),
                    source,
                    position,
                    reason: format!(
                        "refused by the catalog: {}",
                        reasons.get(&i).cloned().unwrap_or_default()
                    ),
                    raw_payload: raw,
                }
            })
            .collect();
        tracing::warn!(
            lanes,
            refused = records.len(),
            "the catalog refused changes; quarantining them"
        );
        self.metrics
            .quarantined
            .with_label_values(&["apply"])
            .inc_by(records.len() as u64);
        // Retried until it works (the refused changes must not vanish) or the relay stops
        // (the messages return and are refused again).
        let mut backoff = self.backoff();
        while let Err(error) = self.store.quarantine(&records).await {
            tracing::warn!(error = %error, "failed to quarantine refused changes; retrying");
            tokio::select! {
                () = shutdown.cancelled() => return Err(Stopped::Shutdown),
                () = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
        Ok(())
    }
}

/// The lane numbers of queue groups (`lane-3`), comma-separated, for logs: `3` or `1,3,7`.
fn lane_numbers<'a>(groups: impl IntoIterator<Item = &'a str>) -> String {
    groups
        .into_iter()
        .map(|group| group.strip_prefix("lane-").unwrap_or(group))
        .collect::<Vec<_>>()
        .join(",")
}

/// The highest delivery count among `messages`: how many times this lane was tried.
fn messages_attempt(messages: &[ReceivedMessage]) -> u32 {
    messages.iter().map(|m| m.receive_count).max().unwrap_or(1)
}

/// Makes the first message's trace the parent of `span` and links the others' (at most
/// [`MAX_TRACE_LINKS`]), so each lane's trace leads to the combined apply.
fn link_traces<'a>(span: &tracing::Span, messages: impl Iterator<Item = &'a ReceivedMessage>) {
    let traces = messages
        .filter_map(|m| m.attributes.get(mall_telemetry::propagation::TRACEPARENT))
        .map(|traceparent| (traceparent.as_str(), ""));
    mall_telemetry::propagation::follow(span, traces, MAX_TRACE_LINKS);
}

/// The changes of a lane's messages, and where each came from.
struct Decoded {
    /// In queue order.
    changes: Vec<ProductChange>,
    origins: Origins,
}

/// Where changes came from, for the quarantine of those the catalog refuses: the producer's
/// coordinates carried in the batch, or, for batches written without them, the lane and the
/// queue message.
#[derive(Debug, Default)]
struct Origins {
    /// By product code and version.
    by_change: HashMap<(String, u64), (String, String)>,
}

impl Origins {
    fn add(&mut self, lane: &str, message_id: &str, batch: &ProductChangeBatch) {
        for (i, change) in batch.changes.iter().enumerate() {
            let origin = batch.origins.get(i).map_or_else(
                || (format!("apply:{lane}"), message_id.to_owned()),
                |o| (o.source.clone(), o.position.clone()),
            );
            self.by_change
                .entry((change.product_code.clone(), change.version))
                .or_insert(origin);
        }
    }

    fn extend(&mut self, other: Self) {
        for (key, origin) in other.by_change {
            self.by_change.entry(key).or_insert(origin);
        }
    }

    /// (source, position) of `change`.
    fn of(&self, change: &ProductChange) -> (String, String) {
        self.by_change
            .get(&(change.product_code.clone(), change.version))
            .cloned()
            .unwrap_or_else(|| ("apply".to_owned(), String::new()))
    }
}

/// The changes of `messages` (of `lane`), in order, with their origins.
///
/// # Errors
/// Which message is not a `ProductChangeBatch`, and why.
fn decode_all(lane: &str, messages: &[ReceivedMessage]) -> Result<Decoded, String> {
    let mut decoded = Decoded {
        changes: Vec::new(),
        origins: Origins::default(),
    };
    for message in messages {
        let batch = decode_batch(&message.body).map_err(|reason| {
            format!(
                "queue message {} is not a ProductChangeBatch: {reason}",
                message.message_id
            )
        })?;
        decoded.origins.add(lane, &message.message_id, &batch);
        decoded.changes.extend(batch.changes);
    }
    Ok(decoded)
}

/// What an apply reports once committed: how many changes, and their event times.
struct Applied {
    count: usize,
    event_times: Vec<SystemTime>,
}

impl Applied {
    fn of(changes: &[ProductChange]) -> Self {
        Self {
            count: changes.len(),
            event_times: changes
                .iter()
                .filter_map(|c| c.event_time.and_then(|t| SystemTime::try_from(t).ok()))
                .collect(),
        }
    }
}

/// Decodes a queue body: base64 of an encoded `ProductChangeBatch`.
fn decode_batch(body: &str) -> Result<ProductChangeBatch, String> {
    let bytes = decode_body(body).map_err(|e| e.to_string())?;
    ProductChangeBatch::decode(bytes.as_slice()).map_err(|e| e.to_string())
}
