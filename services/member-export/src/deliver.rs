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
//! A member is never in two requests at once: FIFO groups keep one member's messages in one
//! worker, but a failover job, a change of `enqueue.lanes` or a redrive can put it in two
//! places, and an older version landing after a newer one would leave the partner stale. So
//! a batch first claims its members in the member table ([`Store::claim`], renewed while the
//! request is in flight, ended by the recorded answer; `delivery.claim_timeout` after a crash) at the
//! version it read; members another sender holds, or whose row moved on since it was read,
//! wait and are read again.
//!
//! Failures, by whose fault they are:
//! - a member's own (the partner refused it): recorded in `failed_deliveries`, message deleted;
//! - the environment's (5xx, timeouts, rate limits, after the stack's retries): the worker
//!   keeps its messages in flight and tries again after a backoff, for as long as it takes;
//!   only a crash hands them back, so healthy work is never dead-lettered;
//! - our configuration (the partner refuses our key, account or contract): every worker of
//!   this replica stops sending for `configuration_pause`, logged at ERROR; the messages wait.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::StreamExt as _;
use mall_grpc::ServiceError;
use mall_proto::member::v1::{MarketingProfile, MemberDeliveryBatch};
use mall_queue::{Queue, Receipt, ReceivedMessage, decode_body, fnv64};
use prost::Message as _;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{
    alerts::Alerts,
    crypto::ProfileCipher,
    group::{self, Group},
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
    /// Requests one round (or one page of a job) sends at once.
    pub parallel: usize,
    /// How long a claim on members being sent lasts unless renewed (every third of it while
    /// the request is in flight): after a crash, those members wait this long.
    pub claim: Duration,
    /// Counters.
    pub metrics: MemberMetrics,
    /// Failure alerts.
    pub alerts: Alerts,
}

/// A batch waiting to be sent: how many times it failed in a row, whether its members are
/// claimed at the versions it holds.
#[derive(Debug)]
struct Pending {
    batch: Vec<Delivery>,
    failures: u32,
    claimed: bool,
}

/// What a batch sent leaves to do.
#[derive(Debug, Default)]
struct After {
    /// To be sent again (split halves, or rebuilt after a wait).
    again: Vec<Pending>,
    /// Members another sender held, or that changed since they were read.
    deferred: Vec<Delivery>,
    /// Shutdown came during a wait.
    stopped: bool,
}

/// The claims of one [`Workers::send_all`]: their owner id, the members held (renewed), the
/// members claimed and not yet released by a recorded answer (released at the end), and
/// until when (µs since the epoch, this process's clock, conservatively) all of the held
/// ones are known to be held.
#[derive(Debug)]
struct Claims {
    owner: i64,
    held: std::sync::Mutex<BTreeSet<String>>,
    unreleased: std::sync::Mutex<BTreeSet<String>>,
    valid_until: Arc<AtomicI64>,
}

impl Claims {
    /// `batch`'s members are about to be released by the recorded answer: no longer
    /// renewed (so a renewal racing the record does not look like a lost claim).
    fn forget(&self, batch: &[Delivery]) {
        let (mut held, mut unreleased) = (lock(&self.held), lock(&self.unreleased));
        for delivery in batch {
            held.remove(&delivery.member_id);
            unreleased.remove(&delivery.member_id);
        }
    }

    /// `batch` waits to be rebuilt and claimed again: its members are no longer renewed
    /// (a claim that lapsed meanwhile, or a member the rebuild leaves out, must not keep
    /// every renewal short), but still released at the end unless claimed and answered.
    fn pause(&self, batch: &[Delivery]) {
        let mut held = lock(&self.held);
        for delivery in batch {
            held.remove(&delivery.member_id);
        }
    }

    /// The answer of `batch` could not be recorded: its members are still ours, renewed
    /// and released at the end like any other.
    fn keep(&self, batch: &[Delivery]) {
        let (mut held, mut unreleased) = (lock(&self.held), lock(&self.unreleased));
        for delivery in batch {
            held.insert(delivery.member_id.clone());
            unreleased.insert(delivery.member_id.clone());
        }
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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

impl Round {
    /// Adds `other`'s counts (not its messages) to this one's.
    pub fn add(&mut self, other: Self) {
        self.delivered += other.delivered;
        self.refused += other.refused;
        self.skipped += other.skipped;
    }
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
        // Messaging semantic conventions: a consumer span per receive, in the first message's
        // trace (the EnqueueMemberChanges that queued it), linked to the others'.
        let span = tracing::info_span!(
            "member.deliver",
            otel.kind = "consumer",
            messaging.system = self.queue.messaging_system(),
            messaging.operation.type = "process",
            messaging.destination.name = self.queue.name(),
            messaging.batch.message_count = messages.len(),
        );
        let traces = messages
            .iter()
            .filter_map(|m| m.attributes.get(mall_telemetry::propagation::TRACEPARENT))
            .map(|traceparent| (traceparent.as_str(), ""));
        mall_telemetry::propagation::follow(&span, traces, MAX_TRACE_LINKS);
        self.deliver_received(messages, shutdown)
            .instrument(span)
            .await
    }

    /// [`Workers::round`] once its messages are received, in the round's span.
    async fn deliver_received(
        &self,
        messages: Vec<ReceivedMessage>,
        shutdown: &CancellationToken,
    ) -> Result<Round, ServiceError> {
        let mut round = Round {
            messages: messages.len(),
            ..Round::default()
        };
        let wanted = wanted(&messages);
        let ids: Vec<&str> = wanted.keys().map(String::as_str).collect();
        let deliveries = self.prepare(&ids, Mode::Queued, &mut round).await?;
        let receipts: Vec<Receipt> = messages.iter().map(|m| m.receipt.clone()).collect();
        // The messages stay ours for the whole round, however long the partner takes.
        let _heartbeat = self.heartbeat(receipts.clone());
        if !self
            .send_all(deliveries, Mode::Queued, &mut round, shutdown)
            .await?
        {
            return Ok(round);
        }
        self.queue
            .delete(&receipts)
            .await
            .map_err(|e| ServiceError::Unavailable(format!("cannot delete deliveries: {e}")))?;
        Ok(round)
    }

    /// Sends `deliveries` in batches, up to `parallel` requests at once, until each was
    /// accepted, refused or skipped (counted in `round`): the partner's failures are waited
    /// out and the batch rebuilt from the member table before it goes again; members another
    /// sender holds wait until it is done. `false` when `shutdown` came first: no new batch
    /// starts, and the requests in flight end before this returns, so no claim is left
    /// behind.
    ///
    /// Claims: each batch claims its members just before it is sent (recording the version
    /// attempted), one task renews what is held while anything is in flight, each recorded
    /// answer ends its batch's claims, and whatever is left is released at the end; claims
    /// and answers that arrive together are written together ([`crate::group`]). A batch is
    /// not sent once its claims may have lapsed (a renewal did not cover them): it waits and
    /// is claimed again.
    ///
    /// Everything that touches the database happens in tasks of its own, inside the
    /// batches' futures, or while none is running: a batch holding SQLite's write turn is
    /// always polled to the end.
    ///
    /// # Errors
    /// When the database fails (after the requests in flight ended).
    pub async fn send_all(
        &self,
        deliveries: Vec<Delivery>,
        mode: Mode,
        round: &mut Round,
        shutdown: &CancellationToken,
    ) -> Result<bool, ServiceError> {
        let claims = Arc::new(Claims {
            owner: fastrand::i64(1..),
            held: std::sync::Mutex::default(),
            unreleased: std::sync::Mutex::default(),
            valid_until: Arc::new(AtomicI64::new(0)),
        });
        let _renewal = self.keep_claims(claims.clone());
        let writes = Writes {
            claims: self.claimer(claims.owner),
            answers: self.recorder(claims.owner),
        };
        let mut pending: Vec<Pending> = self
            .batches(deliveries)
            .into_iter()
            .map(|batch| Pending {
                batch,
                failures: 0,
                claimed: false,
            })
            .collect();
        let mut deferred: Vec<Delivery> = Vec::new();
        let mut running = futures::stream::FuturesUnordered::new();
        let mut stopping = false;
        let mut error = None;
        let mut busy = 0;
        loop {
            stopping |= shutdown.is_cancelled();
            while !stopping && running.len() < self.parallel.max(1) {
                let Some(next) = pending.pop() else { break };
                running.push(self.send_batch(&claims, &writes, next, mode, shutdown));
            }
            match running.next().await {
                Some(Ok((after, done))) => {
                    round.add(done);
                    pending.extend(after.again);
                    deferred.extend(after.deferred);
                    stopping |= after.stopped;
                }
                Some(Err(e)) => {
                    error = Some(e);
                    stopping = true;
                }
                None if stopping => break,
                None if !pending.is_empty() => {}
                None if deferred.is_empty() => break,
                None => {
                    // Members another sender holds: wait for it, then send what is current.
                    busy += 1;
                    let wait = mall_retry::Backoff::after(BUSY_WAIT, self.retry_max, busy);
                    if !self.hold(wait, shutdown).await {
                        stopping = true;
                        continue;
                    }
                    match self
                        .refresh(&std::mem::take(&mut deferred), mode, round)
                        .await
                    {
                        Ok(batches) => pending.extend(batches.into_iter().map(|batch| Pending {
                            batch,
                            failures: 0,
                            claimed: false,
                        })),
                        Err(e) => {
                            error = Some(e);
                            stopping = true;
                        }
                    }
                }
            }
        }
        // What is still claimed (skipped on a rebuild, or stopped) is nobody's any more.
        let left: Vec<String> = lock(&claims.unreleased).iter().cloned().collect();
        if !left.is_empty() {
            let ids: Vec<&str> = left.iter().map(String::as_str).collect();
            if let Err(e) = self.store.release(claims.owner, &ids).await {
                tracing::warn!(error = %e, "cannot release claims; they expire by themselves");
            }
        }
        match error {
            Some(error) => Err(error),
            None => Ok(!stopping),
        }
    }

    /// Claims (unless held already), sends one batch and records what the partner did;
    /// after a failure, waits and hands back the batch rebuilt from the member table.
    async fn send_batch(
        &self,
        claims: &Claims,
        writes: &Writes,
        next: Pending,
        mode: Mode,
        shutdown: &CancellationToken,
    ) -> Result<(After, Round), ServiceError> {
        let mut round = Round::default();
        let mut after = After::default();
        let Pending {
            batch,
            failures,
            claimed,
        } = next;
        let batch = if claimed {
            batch
        } else {
            let (mine, others) = self.claim(claims, &writes.claims, batch).await?;
            after.deferred = others;
            mine
        };
        if batch.is_empty() {
            return Ok((after, round));
        }
        let outcome = send(
            &self.outbound,
            Batch {
                idempotency_key: idempotency_key(&batch),
                deliveries: batch.clone().into(),
                claimed_until: Some(claims.valid_until.clone()),
            },
        )
        .await;
        let version = |d: &Delivery| i64::try_from(d.version).unwrap_or(i64::MAX);
        let again = |batches: Vec<Vec<Delivery>>, failures, claimed| {
            batches
                .into_iter()
                .map(|batch| Pending {
                    batch,
                    failures,
                    claimed,
                })
                .collect()
        };
        match outcome {
            Outcome::Accepted { refused } => {
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
                claims.forget(&batch);
                let answer = Answer::new(&accepted, &failed);
                if let Err(e) = writes.answers.call(answer).await {
                    claims.keep(&batch);
                    return Err(e);
                }
                if mode == Mode::Queued {
                    let now = now_micros();
                    for (i, delivery) in batch.iter().enumerate() {
                        if !refused_at.contains_key(&i) {
                            let micros = now.saturating_sub(delivery.recorded_micros).max(0);
                            #[allow(clippy::cast_precision_loss)]
                            self.metrics.freshness.observe(micros as f64 / 1e6);
                        }
                    }
                }
                round.delivered += accepted.len();
                round.refused += failed.len();
            }
            Outcome::Split { reason } if batch.len() > 1 => {
                let mut first = batch;
                let second = first.split_off(first.len() / 2);
                tracing::debug!(%reason, "the partner refused a member of a batch; splitting");
                after.again = again(vec![second, first], failures, true);
            }
            Outcome::Split { reason } => {
                let delivery = &batch[0];
                claims.forget(&batch);
                let answer = Answer::new(&[], &[(&delivery.member_id, version(delivery), &reason)]);
                if let Err(e) = writes.answers.call(answer).await {
                    claims.keep(&batch);
                    return Err(e);
                }
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
                    after.stopped = true;
                    return Ok((after, round));
                }
                claims.pause(&batch);
                let batches = self.refresh(&batch, mode, &mut round).await?;
                after.again = again(batches, failures, false);
            }
            Outcome::Retry { .. } | Outcome::RateLimited { .. } => {
                let failures = failures + 1;
                if let Outcome::Retry { reason, .. } = &outcome {
                    tracing::warn!(%reason, failures, "the partner failed; the batch waits and is sent again");
                }
                let wait = mall_retry::Backoff::after(self.retry_initial, self.retry_max, failures);
                if !self.hold(wait, shutdown).await {
                    after.stopped = true;
                    return Ok((after, round));
                }
                claims.pause(&batch);
                let batches = self.refresh(&batch, mode, &mut round).await?;
                after.again = again(batches, failures, false);
            }
        }
        Ok((after, round))
    }

    /// The part of `batch` that could be claimed (now held), and the rest (held by another
    /// sender, or changed since it was read: to be read again). Claimed with whatever other
    /// batches claim at the same moment, just before the batch is sent, so what it sends is
    /// the member's row as it is then (a withdrawal recorded meanwhile wins).
    async fn claim(
        &self,
        claims: &Claims,
        claimer: &Group<ToClaim, Claimed>,
        batch: Vec<Delivery>,
    ) -> Result<(Vec<Delivery>, Vec<Delivery>), ServiceError> {
        let attempt = ToClaim(
            batch
                .iter()
                .map(|d| {
                    let version = i64::try_from(d.version).unwrap_or(i64::MAX);
                    (d.member_id.clone(), version, d.erase)
                })
                .collect(),
        );
        let (got, started) = claimer.call(attempt).await?;
        {
            let (mut held, mut unreleased) = (lock(&claims.held), lock(&claims.unreleased));
            // A member not got is not held, even if it was (its claim lapsed while renewals
            // failed and another sender took it): renewals then cover what is held again.
            for delivery in &batch {
                if !got.contains(&delivery.member_id) {
                    held.remove(&delivery.member_id);
                }
            }
            if held.is_empty() {
                // Nothing older to vouch for: these claims last their lease from before
                // the statement ran.
                claims.valid_until.store(
                    started.saturating_add(micros(self.claim)),
                    Ordering::Release,
                );
            }
            held.extend(got.iter().cloned());
            unreleased.extend(got.iter().cloned());
        }
        Ok(batch.into_iter().partition(|d| got.contains(&d.member_id)))
    }

    /// Claims of one [`Self::send_all`]'s batches (owner `owner`), grouped.
    fn claimer(&self, owner: i64) -> Group<ToClaim, Claimed> {
        let (store, lease) = (self.store.clone(), self.claim);
        Group::spawn(move |requests: Vec<ToClaim>| {
            let store = store.clone();
            async move {
                let started = now_micros();
                let all: Vec<(&str, i64, bool)> = requests
                    .iter()
                    .flat_map(|r| r.0.iter().map(|(id, v, e)| (id.as_str(), *v, *e)))
                    .collect();
                let got = store.claim(owner, &all, lease).await?;
                Ok(requests
                    .iter()
                    .map(|r| {
                        let mine = r.0.iter().filter(|m| got.contains(&m.0));
                        (mine.map(|m| m.0.clone()).collect(), started)
                    })
                    .collect())
            }
        })
    }

    /// Answers of one [`Self::send_all`]'s batches (owner `owner`), recorded in groups.
    fn recorder(&self, owner: i64) -> Group<Answer, ()> {
        let store = self.store.clone();
        Group::spawn(move |answers: Vec<Answer>| {
            let store = store.clone();
            async move {
                let accepted: Vec<(&str, i64, bool)> = answers
                    .iter()
                    .flat_map(|a| a.accepted.iter().map(|(id, v, e)| (id.as_str(), *v, *e)))
                    .collect();
                let refused: Vec<(&str, i64, &str)> = answers
                    .iter()
                    .flat_map(|a| {
                        a.refused
                            .iter()
                            .map(|(id, v, reason)| (id.as_str(), *v, reason.as_str()))
                    })
                    .collect();
                store
                    .delivered(owner, &accepted, &refused, now_micros())
                    .await?;
                Ok(vec![(); answers.len()])
            }
        })
    }

    /// Renews the held claims every third of their lease until dropped; their validity
    /// moves on only when a renewal covered every one of them.
    fn keep_claims(&self, claims: Arc<Claims>) -> AbortOnDrop<()> {
        let store = self.store.clone();
        let lease = self.claim;
        AbortOnDrop(tokio::spawn(async move {
            loop {
                tokio::time::sleep(lease / 3).await;
                let ids: Vec<String> = lock(&claims.held).iter().cloned().collect();
                if ids.is_empty() {
                    continue;
                }
                let started = now_micros();
                let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
                match store.renew(claims.owner, &refs, lease).await {
                    Ok(renewed) if renewed >= ids.len() as u64 => {
                        claims
                            .valid_until
                            .store(started.saturating_add(micros(lease)), Ordering::Release);
                    }
                    Ok(renewed) => tracing::warn!(
                        renewed,
                        held = ids.len(),
                        "claims on members being sent were lost; those batches wait and claim again"
                    ),
                    Err(error) => {
                        tracing::warn!(%error, "cannot renew the claims on members being sent");
                    }
                }
            }
        }))
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
    fn heartbeat(&self, receipts: Vec<Receipt>) -> AbortOnDrop<()> {
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
    pub async fn prepare(
        &self,
        member_ids: &[&str],
        mode: Mode,
        round: &mut Round,
    ) -> Result<Vec<Delivery>, ServiceError> {
        let rows = self.store.members(member_ids).await?;
        self.prepare_rows(&rows, mode, round).await
    }

    /// What to send now for `rows`, read from the member table; see [`Self::prepare`].
    ///
    /// # Errors
    /// When the database fails.
    pub async fn prepare_rows(
        &self,
        rows: &[members::Model],
        mode: Mode,
        round: &mut Round,
    ) -> Result<Vec<Delivery>, ServiceError> {
        let mut deliveries = Vec::new();
        let mut unreadable = Vec::new();
        for row in rows {
            match self.delivery(row, mode) {
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
            self.store
                .delivered(0, &[], &unreadable, now_micros())
                .await?;
            round.refused += unreadable.len();
        }
        Ok(deliveries)
    }

    /// A batch about to be sent again, rebuilt from the member table: a withdrawal, an
    /// erasure or a newer change recorded while it waited wins.
    async fn refresh(
        &self,
        batch: &[Delivery],
        mode: Mode,
        round: &mut Round,
    ) -> Result<Vec<Vec<Delivery>>, ServiceError> {
        let ids: Vec<&str> = batch.iter().map(|d| d.member_id.as_str()).collect();
        let deliveries = self.prepare(&ids, mode, round).await?;
        Ok(self.batches(deliveries))
    }

    fn batches(&self, deliveries: Vec<Delivery>) -> Vec<Vec<Delivery>> {
        deliveries
            .chunks(self.max_batch.max(1))
            .map(<[Delivery]>::to_vec)
            .collect()
    }

    /// What to send for `row` now, if anything (see the module docs).
    fn delivery(&self, row: &members::Model, mode: Mode) -> Next {
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
            if (row.erase_delivered && mode == Mode::Queued) || !known {
                return Next::Skip;
            }
            return Next::Send(bare(row, version, consent, true));
        }
        if row.delivered_version >= row.version && mode == Mode::Queued {
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
            recorded_micros: row.update_time,
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
        recorded_micros: row.update_time,
    }
}

/// Why members are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A queued delivery: a member already delivered at its newest version is skipped.
    Queued,
    /// A failover job: the member's current state is sent even if the partner accepted it
    /// before (it may have lost it); consent and erasure rules are the same.
    Resend,
}

/// Traces a delivery round links besides its parent's.
const MAX_TRACE_LINKS: usize = 32;

/// The first wait for members another sender holds.
const BUSY_WAIT: Duration = Duration::from_millis(50);

/// The grouped writes of one [`Workers::send_all`].
#[derive(Debug)]
struct Writes {
    claims: Group<ToClaim, Claimed>,
    answers: Group<Answer, ()>,
}

/// Members one batch claims: (id, version, erasure).
#[derive(Debug)]
struct ToClaim(Vec<(String, i64, bool)>);

impl group::Members for ToClaim {
    fn members(&self) -> usize {
        self.0.len()
    }
}

/// What a claim got: the members now held, and when its statement started (µs since the
/// epoch, this process's clock).
type Claimed = (HashSet<String>, i64);

/// One batch's answer: accepted (id, version, erasure) and refused (id, version, reason).
#[derive(Debug)]
struct Answer {
    accepted: Vec<(String, i64, bool)>,
    refused: Vec<(String, i64, String)>,
}

impl Answer {
    fn new(accepted: &[(&str, i64, bool)], refused: &[(&str, i64, &str)]) -> Self {
        Self {
            accepted: accepted
                .iter()
                .map(|(id, v, e)| ((*id).to_owned(), *v, *e))
                .collect(),
            refused: refused
                .iter()
                .map(|(id, v, reason)| ((*id).to_owned(), *v, (*reason).to_owned()))
                .collect(),
        }
    }
}

impl group::Members for Answer {
    fn members(&self) -> usize {
        self.accepted.len() + self.refused.len()
    }
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// Aborts a task when dropped (a round's heartbeat ends with the round, however it ends);
/// awaiting it awaits the task.
#[derive(Debug)]
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
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
