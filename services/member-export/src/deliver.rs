//! Delivery workers: receive queued deliveries, fold them into each member's newest state,
//! re-check consent at send time, send through the outbound stack, record what the partner
//! did, delete the messages.
//!
//! What a member is sent is read from the member table when it is sent, never from the
//! queue: the newest version, its consent (a withdrawal that arrived after the delivery was
//! queued wins) and its profile, with the contact data of channels without consent removed.
//! A member without any consented channel is sent an opt-out (id and flags only) if the
//! partner ever accepted it, and nothing otherwise; an erased member (a tombstone) is sent an
//! erasure on the same condition. A member already delivered at its newest
//! version is not sent again, so queue order and duplicate messages do not matter.
//!
//! Failures, by whose fault they are:
//! - a member's own (the partner refused it): recorded in `failed_deliveries`, message deleted;
//! - the environment's (5xx, timeouts, rate limits, after the stack's retries): the worker
//!   keeps its messages in flight and tries again after a backoff, for as long as it takes;
//!   only a crash hands them back, so healthy work is never dead-lettered;
//! - our configuration (the partner refuses our key, account or contract): every worker of
//!   this replica stops sending for `configuration_pause`, logged at ERROR; the messages wait.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use mall_grpc::ServiceError;
use mall_proto::member::v1::{MarketingProfile, MemberDeliveryBatch};
use mall_queue::{Queue, Receipt, ReceivedMessage, decode_body, fnv64};
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use crate::{
    alerts::Alerts,
    crypto::ProfileCipher,
    metrics::MemberMetrics,
    outbound::{Batch, Outbound, send},
    partner::{Channels, Delivery, Outcome, Profile},
    store::{Store, members, now_micros, now_millis},
};

/// How the workers run.
#[derive(Debug, Clone)]
pub struct Workers {
    /// The member table.
    pub store: Store,
    /// The delivery queue.
    pub queue: Queue,
    /// Profiles at rest.
    pub cipher: Arc<ProfileCipher>,
    /// The outbound stack.
    pub outbound: Outbound,
    /// Members per request.
    pub max_batch: usize,
    /// Messages per receive.
    pub receive_batch: usize,
    /// How long a receive waits for messages.
    pub receive_wait: Duration,
    /// How long a message stays ours; a batch that keeps failing renews it.
    pub visibility_timeout: Duration,
    /// Waits between rounds of a batch the environment keeps failing.
    pub retry_initial: Duration,
    /// The longest of those waits.
    pub retry_max: Duration,
    /// How long every worker stops after the partner refused our configuration.
    pub configuration_pause: Duration,
    /// Until when (ms since the epoch) deliveries are stopped for a configuration error.
    pub paused_until: Arc<AtomicU64>,
    /// Counters.
    pub metrics: MemberMetrics,
    /// Failure alerts.
    pub alerts: Alerts,
}

/// What one round did, for tests and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Round {
    /// Messages received.
    pub messages: usize,
    /// Members the partner accepted.
    pub delivered: usize,
    /// Members the partner refused (recorded).
    pub refused: usize,
    /// Members not sent: already delivered at their newest version, or an opt-out of a
    /// member the partner never accepted.
    pub skipped: usize,
}

impl Workers {
    /// Runs `count` workers until `shutdown`.
    pub async fn run(self, count: usize, shutdown: CancellationToken) {
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..count {
            let this = self.clone();
            let shutdown = shutdown.clone();
            workers.spawn(async move { this.work(shutdown).await });
        }
        while workers.join_next().await.is_some() {}
    }

    async fn work(&self, shutdown: CancellationToken) {
        let mut failures = 0;
        while !shutdown.is_cancelled() {
            let paused = self.paused_for();
            if !paused.is_zero() {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(paused) => continue,
                }
            }
            self.metrics
                .configuration_paused
                .set(i64::from(!self.paused_for().is_zero()));
            match self.round(&shutdown).await {
                Ok(round) => {
                    failures = 0;
                    let count = |outcome: &str, n: usize| {
                        self.metrics
                            .deliveries
                            .with_label_values(&[outcome])
                            .inc_by(n as u64);
                    };
                    count("delivered", round.delivered);
                    count("refused", round.refused);
                    count("skipped", round.skipped);
                }
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%error, "a delivery round failed; retrying");
                    let wait =
                        mall_retry::Backoff::after(self.retry_initial, self.retry_max, failures);
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    fn paused_for(&self) -> Duration {
        let until = self.paused_until.load(Ordering::Acquire);
        Duration::from_millis(until.saturating_sub(now_millis().unsigned_abs()))
    }

    /// One receive and everything it holds, to the end: delivered, refused or skipped, and
    /// the messages deleted; or, on shutdown, left to come back.
    ///
    /// # Errors
    /// When the queue or the database fails (the messages come back after their visibility
    /// timeout).
    pub async fn round(&self, shutdown: &CancellationToken) -> Result<Round, ServiceError> {
        let messages = self
            .queue
            .receive(self.receive_batch, self.receive_wait)
            .await
            .map_err(|e| ServiceError::Unavailable(format!("cannot receive deliveries: {e}")))?;
        if messages.is_empty() {
            return Ok(Round::default());
        }
        let mut round = Round {
            messages: messages.len(),
            ..Round::default()
        };
        let wanted = wanted(&messages);
        let ids: Vec<&str> = wanted.keys().map(String::as_str).collect();
        let deliveries = self.prepare(&ids, &mut round).await?;
        let receipts: Vec<Receipt> = messages.iter().map(|m| m.receipt.clone()).collect();
        // The messages stay ours for the whole round, however long the partner takes.
        let _heartbeat = self.heartbeat(receipts.clone());
        let mut pending: Vec<Vec<Delivery>> = self.batches(deliveries);
        let mut failures = 0;
        while let Some(batch) = pending.pop() {
            let key = idempotency_key(&batch);
            let version = |d: &Delivery| i64::try_from(d.version).unwrap_or(i64::MAX);
            let attempt: Vec<(&str, i64)> = batch
                .iter()
                .map(|d| (d.member_id.as_str(), version(d)))
                .collect();
            self.store.attempted(&attempt).await?;
            let outcome = send(
                &self.outbound,
                Batch {
                    deliveries: batch.clone().into(),
                    idempotency_key: key,
                },
            )
            .await;
            match outcome {
                Outcome::Accepted { refused } => {
                    failures = 0;
                    let refused_at: BTreeMap<usize, &str> = refused
                        .iter()
                        .map(|r| (r.index, r.reason.as_str()))
                        .collect();
                    let accepted: Vec<(&str, i64, bool)> = batch
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| !refused_at.contains_key(i))
                        .map(|(_, d)| (d.member_id.as_str(), version(d), d.erase))
                        .collect();
                    let failed: Vec<(&str, i64, &str)> = refused_at
                        .iter()
                        .filter_map(|(i, reason)| {
                            batch
                                .get(*i)
                                .map(|d| (d.member_id.as_str(), version(d), *reason))
                        })
                        .collect();
                    if !failed.is_empty() {
                        // Member ids and codes only: never what was sent.
                        tracing::warn!(
                            members = ?failed.iter().map(|f| f.0).collect::<Vec<_>>(),
                            reasons = ?failed.iter().map(|f| f.2).collect::<Vec<_>>(),
                            "the partner refused members; recorded in failed_deliveries"
                        );
                    }
                    self.store
                        .delivered(&accepted, &failed, now_micros())
                        .await?;
                    round.delivered += accepted.len();
                    round.refused += failed.len();
                }
                Outcome::Split { reason } if batch.len() > 1 => {
                    let mut first = batch;
                    let second = first.split_off(first.len() / 2);
                    tracing::debug!(%reason, "the partner refused a member of a batch; splitting");
                    pending.push(second);
                    pending.push(first);
                }
                Outcome::Split { reason } => {
                    let delivery = &batch[0];
                    let version = i64::try_from(delivery.version).unwrap_or(i64::MAX);
                    self.store
                        .delivered(
                            &[],
                            &[(&delivery.member_id, version, &reason)],
                            now_micros(),
                        )
                        .await?;
                    round.refused += 1;
                }
                Outcome::Configuration { reason } => {
                    tracing::error!(
                        %reason,
                        pause = ?self.configuration_pause,
                        "the partner refuses our configuration; deliveries stop until it is fixed"
                    );
                    let now = now_millis().unsigned_abs();
                    let until = now.saturating_add(
                        u64::try_from(self.configuration_pause.as_millis()).unwrap_or(u64::MAX),
                    );
                    let before = self.paused_until.fetch_max(until, Ordering::AcqRel);
                    if before <= now {
                        // The first worker of this replica to see it (not paused yet) alerts.
                        self.alert(&format!(
                            "member-export: the partner refuses our configuration ({reason}); \
                             deliveries stop and retry every {:?}",
                            self.configuration_pause
                        ))
                        .await;
                    }
                    if !self.hold(self.configuration_pause, shutdown).await {
                        return Ok(round);
                    }
                    pending.extend(self.refresh(&batch, &mut round).await?);
                }
                Outcome::Retry { reason, .. } => {
                    failures += 1;
                    tracing::warn!(%reason, failures, "the partner failed; the batch waits and is sent again");
                    let wait =
                        mall_retry::Backoff::after(self.retry_initial, self.retry_max, failures);
                    if !self.hold(wait, shutdown).await {
                        return Ok(round);
                    }
                    pending.extend(self.refresh(&batch, &mut round).await?);
                }
                Outcome::RateLimited { .. } => {
                    failures += 1;
                    let wait =
                        mall_retry::Backoff::after(self.retry_initial, self.retry_max, failures);
                    if !self.hold(wait, shutdown).await {
                        return Ok(round);
                    }
                    pending.extend(self.refresh(&batch, &mut round).await?);
                }
            }
        }
        self.queue
            .delete(&receipts)
            .await
            .map_err(|e| ServiceError::Unavailable(format!("cannot delete deliveries: {e}")))?;
        Ok(round)
    }

    /// Raises an alert; a database failure only costs the alert (logged).
    async fn alert(&self, text: &str) {
        if let Err(error) = self.alerts.raise(text).await {
            tracing::warn!(%error, alert = %text, "cannot count an alert; not sent");
        }
    }

    /// Waits `wait` before a batch is sent again (the round's heartbeat keeps its messages in
    /// flight); `false` when shutdown came first (the messages then come back after their
    /// visibility timeout).
    async fn hold(&self, wait: Duration, shutdown: &CancellationToken) -> bool {
        self.metrics.retrying.inc();
        let waited = tokio::select! {
            () = shutdown.cancelled() => false,
            () = tokio::time::sleep(wait) => true,
        };
        self.metrics.retrying.dec();
        waited
    }

    /// Renews the visibility of `receipts` every half visibility timeout until dropped.
    fn heartbeat(&self, receipts: Vec<Receipt>) -> AbortOnDrop {
        let queue = self.queue.clone();
        let visibility = self.visibility_timeout;
        AbortOnDrop(tokio::spawn(async move {
            let every = (visibility / 2).max(Duration::from_millis(10));
            loop {
                tokio::time::sleep(every).await;
                for receipt in &receipts {
                    if let Err(error) = queue.change_visibility(receipt, visibility).await {
                        tracing::warn!(%error, "cannot keep a delivery message in flight");
                    }
                }
            }
        }))
    }

    /// What to send now for `member_ids`, from their rows (consent and data as they are now);
    /// undecryptable profiles are recorded as failed.
    async fn prepare(
        &self,
        member_ids: &[&str],
        round: &mut Round,
    ) -> Result<Vec<Delivery>, ServiceError> {
        let rows = self.store.members(member_ids).await?;
        let mut deliveries = Vec::new();
        let mut unreadable = Vec::new();
        for row in &rows {
            match self.delivery(row) {
                Next::Send(delivery) => deliveries.push(delivery),
                Next::Skip => round.skipped += 1,
                Next::Unreadable => {
                    unreadable.push((row.member_id.as_str(), row.version, UNREADABLE));
                }
            }
        }
        if !unreadable.is_empty() {
            // Not the member's fault, but no retry helps until the key is configured again;
            // recorded, so the failed-deliveries job can resend them then.
            tracing::error!(
                members = ?unreadable.iter().map(|u| u.0).collect::<Vec<_>>(),
                "stored profiles cannot be decrypted (is a key missing from encryption.keys?); \
                 recorded in failed_deliveries"
            );
            self.store.delivered(&[], &unreadable, now_micros()).await?;
            round.refused += unreadable.len();
        }
        Ok(deliveries)
    }

    /// A batch about to be sent again, rebuilt from the member table: a withdrawal, an
    /// erasure or a newer change recorded while it waited wins.
    async fn refresh(
        &self,
        batch: &[Delivery],
        round: &mut Round,
    ) -> Result<Vec<Vec<Delivery>>, ServiceError> {
        let ids: Vec<&str> = batch.iter().map(|d| d.member_id.as_str()).collect();
        let deliveries = self.prepare(&ids, round).await?;
        Ok(self.batches(deliveries))
    }

    fn batches(&self, deliveries: Vec<Delivery>) -> Vec<Vec<Delivery>> {
        deliveries
            .chunks(self.max_batch.max(1))
            .map(<[Delivery]>::to_vec)
            .collect()
    }

    /// What to send for `row` now, if anything (see the module docs).
    fn delivery(&self, row: &members::Model) -> Next {
        let consent = Channels {
            email: row.consent_email,
            sms: row.consent_sms,
            push: row.consent_push,
        };
        let version = u64::try_from(row.version).unwrap_or_default();
        // Whether the partner has, or may have, the member: it accepted it, or it was sent
        // (recorded before the request, so a crash before our record of the answer counts).
        let known = row.delivered_version > 0 || row.attempted_version > 0;
        if row.erased {
            // Tell the partner to delete the member, once, if it may have it.
            if row.erase_delivered || !known {
                return Next::Skip;
            }
            return Next::Send(bare(row, version, consent, true));
        }
        if row.delivered_version >= row.version {
            return Next::Skip;
        }
        if !consent.any() {
            // An opt-out tells the partner to stop: only for a member it may have.
            if !known {
                return Next::Skip;
            }
            return Next::Send(bare(row, version, consent, false));
        }
        let stored = match (&row.key_id, &row.profile) {
            (Some(key_id), Some(sealed)) => {
                let plain = self.cipher.decrypt(&row.member_id, key_id, sealed);
                match plain.map(|plain| MarketingProfile::decode(plain.as_slice())) {
                    Ok(Ok(profile)) => profile,
                    _ => return Next::Unreadable,
                }
            }
            _ => MarketingProfile::default(),
        };
        let text = |s: String| (!s.is_empty()).then_some(s);
        Next::Send(Delivery {
            member_id: row.member_id.clone(),
            version,
            consent,
            profile: Some(Profile {
                email: text(stored.email).filter(|_| consent.email),
                phone: text(stored.phone).filter(|_| consent.sms),
                display_name: stored.display_name,
                preferred_language: stored.preferred_language,
                grade: stored.grade,
                interests: stored.interests,
            }),
            erase: false,
        })
    }
}

/// A delivery without profile data: an erasure, or an opt-out.
fn bare(row: &members::Model, version: u64, consent: Channels, erase: bool) -> Delivery {
    Delivery {
        member_id: row.member_id.clone(),
        version,
        consent,
        profile: None,
        erase,
    }
}

/// Aborts a task when dropped (the round's heartbeat ends with the round, however it ends).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The reason recorded for a profile that cannot be decrypted.
const UNREADABLE: &str = "undecryptable";

/// What to do for one member.
enum Next {
    Send(Delivery),
    /// Nothing to send: delivered at its newest version, or an opt-out of a member the
    /// partner never had.
    Skip,
    /// Its stored profile cannot be decrypted.
    Unreadable,
}

/// The members the messages name, each with the newest version queued for it. A message
/// that does not decode is left alone: it is not ours to fix, and the queue dead-letters it
/// after its receives.
fn wanted(messages: &[ReceivedMessage]) -> BTreeMap<String, u64> {
    let mut wanted = BTreeMap::new();
    for message in messages {
        let batch = decode_body(&message.body)
            .ok()
            .and_then(|bytes| MemberDeliveryBatch::decode(bytes.as_slice()).ok());
        let Some(batch) = batch else {
            tracing::error!(message = %message.message_id, "an undecodable delivery message; it will be dead-lettered");
            continue;
        };
        for delivery in batch.deliveries {
            let version = wanted.entry(delivery.member_id).or_insert(0);
            *version = (*version).max(delivery.version);
        }
    }
    wanted
}

/// The idempotency key of a batch: the same for the same members at the same versions.
fn idempotency_key(batch: &[Delivery]) -> String {
    match batch {
        [one] if one.erase => format!("{}:{}:erase", one.member_id, one.version),
        [one] => format!("{}:{}", one.member_id, one.version),
        many => {
            let text: Vec<String> = many
                .iter()
                .map(|d| format!("{}:{}:{}", d.member_id, d.version, d.erase))
                .collect();
            format!("b{:016x}", fnv64(text.join("|").as_bytes()))
        }
    }
}
