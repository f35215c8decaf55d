//! The loop that owns a replica's leases: every renew interval it lists shards (when due),
//! renews its leases, re-reads the shard table, stops readers whose lease or epoch changed,
//! takes or steals leases by [`shards::plan`], and starts a reader for every shard it holds.
//! A reader that finishes a closed shard triggers a listing and a new round at once, so
//! children start promptly. On shutdown it stops the readers (each completes a delivery in
//! progress) and releases its leases, so another replica takes over immediately.
//!
//! While the relay is paused the readers wait and this loop keeps renewing: leases stay where
//! they are, and a resume continues at once on the same replicas. A replica that stops while
//! paused releases its leases as always, and another replica takes them (to read after resume).
//!
//! A lease is renewed only while its reader makes progress: a reader that has not finished a
//! step for `reader_stall_timeout` (stuck in a call that never returns) is told to stop and
//! its lease left to expire, so another replica takes the shard; this replica does not take
//! it back while the stuck reader is still there. Its late checkpoint, if it ever wakes, is
//! fenced off by the lease counter.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use mall_retry::Backoff;
use tokio::{sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;

use super::{
    Heartbeat, RecordSink, Shared,
    call::{CallError, Operation},
    lease::{self, LeaseToken, entity::Model, is_leased, now_ms},
    reader::{Exit, Position, Reader},
    shards,
};

/// A reader task and the lease it reads under.
struct Running {
    token: LeaseToken,
    cancel: CancellationToken,
    heartbeat: Heartbeat,
}

pub(crate) struct Coordinator<S> {
    shared: Arc<Shared>,
    sink: Arc<S>,
    paused: watch::Receiver<bool>,
    /// Readers by shard id, including those told to stop that have not exited yet: a shard
    /// gets a new reader only after the old one is gone.
    readers: HashMap<String, Running>,
    tasks: JoinSet<Exit>,
    task_shards: HashMap<tokio::task::Id, String>,
    next_shard_sync: Instant,
    /// Start of the last successful renewal: our leases are good until this plus the duration.
    renewed_at: Option<Instant>,
}

impl<S: RecordSink> Coordinator<S> {
    pub(crate) fn new(shared: Arc<Shared>, sink: S, paused: watch::Receiver<bool>) -> Self {
        Self {
            shared,
            sink: Arc::new(sink),
            paused,
            readers: HashMap::new(),
            tasks: JoinSet::new(),
            task_shards: HashMap::new(),
            next_shard_sync: Instant::now(),
            renewed_at: None,
        }
    }

    pub(crate) async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let stream = self.shared.settings.stream_name.clone();
        tracing::info!(%stream, replica_id = %self.shared.replica_id, "kinesis source starting");
        if let Some(shard_count) = self.shared.settings.create_stream
            && !self.ensure_stream(shard_count, &shutdown).await
        {
            return Ok(());
        }
        let interval = self.shared.settings.lease_renew_interval;
        while !shutdown.is_cancelled() {
            self.round().await;
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(joined) = self.tasks.join_next_with_id() => self.reader_exited(joined),
                () = tokio::time::sleep(interval) => {}
            }
        }
        self.stop().await;
        Ok(())
    }

    /// One round: list (when due), renew, reconcile, take, start readers.
    async fn round(&mut self) {
        if Instant::now() >= self.next_shard_sync {
            self.sync_shards().await;
        }
        self.renew().await;
        let Some(mut rows) = self.load().await else {
            return;
        };
        self.reconcile(&rows);
        if self.apply_plan(&rows).await {
            let Some(reloaded) = self.load().await else {
                return;
            };
            rows = reloaded;
        }
        self.start_readers(&rows);
    }

    #[tracing::instrument(skip_all)]
    async fn sync_shards(&mut self) {
        let stream = &self.shared.settings.stream_name;
        let listed =
            match shards::list_shards(&self.shared.client, stream, &self.shared.metrics).await {
                Ok(listed) => listed,
                Err(error) => {
                    tracing::warn!(%error, "failed to list kinesis shards; retrying next round");
                    self.next_shard_sync = Instant::now();
                    return;
                }
            };
        match lease::sync_shards(&self.shared.db, stream, &listed).await {
            Ok(added) => {
                if added > 0 {
                    tracing::info!(added, total = listed.len(), "new kinesis shards recorded");
                }
                self.next_shard_sync = Instant::now() + self.shared.settings.shard_sync_interval;
            }
            Err(error) => {
                tracing::warn!(%error, "failed to record kinesis shards; retrying next round");
            }
        }
    }

    async fn renew(&mut self) {
        let started = Instant::now();
        let stuck = self.stuck_readers();
        let settings = &self.shared.settings;
        match lease::renew(
            &self.shared.db,
            &settings.stream_name,
            &self.shared.replica_id,
            settings.lease_duration,
            &stuck,
        )
        .await
        {
            Ok(_) => self.renewed_at = Some(started),
            Err(error) => {
                self.shared.metrics.renew_failed();
                tracing::warn!(%error, "failed to renew kinesis shard leases");
                let expired = self
                    .renewed_at
                    .is_none_or(|at| at.elapsed() >= settings.lease_duration);
                if expired && !self.readers.is_empty() {
                    // Another replica may own our shards by now: stop reading them.
                    tracing::warn!("kinesis leases presumed expired; stopping every reader");
                    for running in self.readers.values() {
                        running.cancel.cancel();
                    }
                }
            }
        }
    }

    /// Shards whose reader has made no progress for `reader_stall_timeout` (never while the
    /// relay is paused: paused readers wait on purpose). Each is told to stop, once.
    fn stuck_readers(&mut self) -> Vec<String> {
        if *self.paused.borrow() {
            for running in self.readers.values() {
                running.heartbeat.beat();
            }
            return Vec::new();
        }
        let limit = self.shared.settings.reader_stall_timeout;
        let mut stuck = Vec::new();
        for (shard_id, running) in &self.readers {
            let age = running.heartbeat.age();
            if age < limit {
                continue;
            }
            if !running.cancel.is_cancelled() {
                tracing::warn!(
                    %shard_id,
                    stalled_secs = age.as_secs(),
                    "kinesis shard reader made no progress; giving its lease up to other replicas"
                );
                self.shared.metrics.lease_event("stalled");
                running.cancel.cancel();
            }
            stuck.push(shard_id.clone());
        }
        stuck
    }

    async fn load(&self) -> Option<Vec<Model>> {
        match lease::load(&self.shared.db, &self.shared.settings.stream_name).await {
            Ok(rows) => Some(rows),
            Err(error) => {
                tracing::warn!(%error, "failed to read the kinesis shard table");
                None
            }
        }
    }

    /// Stops readers whose row no longer carries their lease or epoch.
    fn reconcile(&mut self, rows: &[Model]) {
        let now = now_ms();
        let by_id: HashMap<&str, &Model> = rows.iter().map(|r| (r.shard_id.as_str(), r)).collect();
        for (shard_id, running) in &self.readers {
            if running.cancel.is_cancelled() {
                continue;
            }
            let token = &running.token;
            let row = by_id.get(shard_id.as_str());
            let held = row.is_some_and(|row| {
                row.lease_owner.as_deref() == Some(token.owner.as_str())
                    && row.lease_counter == token.counter
                    && !row.finished
                    && is_leased(row, now)
            });
            if !held {
                tracing::info!(%shard_id, "kinesis lease lost (taken over or expired); stopping its reader");
                self.shared.metrics.lease_event("lost");
                running.cancel.cancel();
            } else if row.is_some_and(|row| row.epoch != token.epoch) {
                tracing::info!(%shard_id, "kinesis shard reset for replay; restarting its reader");
                running.cancel.cancel();
            }
        }
    }

    /// Releases, takes and steals leases as [`shards::plan`] says; `true` when anything changed.
    async fn apply_plan(&mut self, rows: &[Model]) -> bool {
        let me = self.shared.replica_id.clone();
        let plan = shards::plan(rows, &me, now_ms());
        let by_id: HashMap<&str, &Model> = rows.iter().map(|r| (r.shard_id.as_str(), r)).collect();
        let duration = self.shared.settings.lease_duration;
        let mut changed = false;

        for shard_id in &plan.release {
            if let Some(running) = self.readers.get(shard_id) {
                running.cancel.cancel();
            }
            let Some(row) = by_id.get(shard_id.as_str()) else {
                continue;
            };
            let token = LeaseToken {
                stream: row.stream_name.clone(),
                shard_id: row.shard_id.clone(),
                owner: me.clone(),
                counter: row.lease_counter,
                epoch: row.epoch,
            };
            match lease::release(&self.shared.db, &token).await {
                Ok(released) => {
                    if released {
                        tracing::info!(%shard_id, "released a shard that must wait for its parents");
                        self.shared.metrics.lease_event("released");
                    }
                    changed = true;
                }
                Err(error) => {
                    tracing::warn!(%error, %shard_id, "failed to release a kinesis lease")
                }
            }
        }

        let steals = plan.steal.iter().map(|id| (id, true));
        for (shard_id, steal) in plan.take.iter().map(|id| (id, false)).chain(steals) {
            let Some(row) = by_id.get(shard_id.as_str()) else {
                continue;
            };
            if self.readers.contains_key(shard_id) {
                // A reader of ours is still there (stuck, or stopping): leave the shard to
                // other replicas rather than hand it back to a reader that cannot read.
                continue;
            }
            match lease::take(&self.shared.db, row, &me, duration, steal).await {
                Ok(Some(_)) => {
                    changed = true;
                    if steal {
                        tracing::info!(
                            %shard_id,
                            from = row.lease_owner.as_deref().unwrap_or_default(),
                            "took a kinesis lease from a busier replica"
                        );
                        self.shared.metrics.lease_event("stolen");
                    } else {
                        tracing::info!(%shard_id, "took a kinesis lease");
                        self.shared.metrics.lease_event("taken");
                    }
                }
                Ok(None) => tracing::debug!(%shard_id, "another replica took the lease first"),
                Err(error) => tracing::warn!(%error, %shard_id, "failed to take a kinesis lease"),
            }
        }
        changed
    }

    /// Starts a reader for every eligible shard this replica holds that has none.
    fn start_readers(&mut self, rows: &[Model]) {
        let now = now_ms();
        let me = self.shared.replica_id.as_str();
        let eligible = shards::eligible(rows);
        let mut held = 0;
        for row in rows {
            let mine = row.lease_owner.as_deref() == Some(me) && is_leased(row, now);
            if !mine || eligible.get(row.shard_id.as_str()) != Some(&true) {
                continue;
            }
            held += 1;
            if self.readers.contains_key(&row.shard_id) {
                continue;
            }
            let token = LeaseToken {
                stream: row.stream_name.clone(),
                shard_id: row.shard_id.clone(),
                owner: me.to_owned(),
                counter: row.lease_counter,
                epoch: row.epoch,
            };
            let cancel = CancellationToken::new();
            let heartbeat = Heartbeat::new();
            let reader = Reader::new(
                self.shared.clone(),
                self.sink.clone(),
                token.clone(),
                Position::of(row),
                self.paused.clone(),
                cancel.clone(),
                heartbeat.clone(),
            );
            let handle = self.tasks.spawn(reader.run());
            self.task_shards.insert(handle.id(), row.shard_id.clone());
            self.readers.insert(
                row.shard_id.clone(),
                Running {
                    token,
                    cancel,
                    heartbeat,
                },
            );
        }
        self.shared.metrics.set_leases_held(held);
    }

    fn reader_exited(&mut self, joined: Result<(tokio::task::Id, Exit), tokio::task::JoinError>) {
        let (id, exit) = match joined {
            Ok((id, exit)) => (id, Some(exit)),
            Err(error) => {
                tracing::error!(%error, "a kinesis shard reader panicked; it restarts next round");
                (error.id(), None)
            }
        };
        let Some(shard_id) = self.task_shards.remove(&id) else {
            return;
        };
        // A reader stopped by `reconcile` was counted there.
        let stopped_by_us = self
            .readers
            .remove(&shard_id)
            .is_some_and(|running| running.cancel.is_cancelled());
        match exit {
            Some(Exit::Finished) => {
                self.shared.metrics.lease_event("finished");
                // Its children are due now; list at once rather than at the next sync.
                self.next_shard_sync = Instant::now();
            }
            Some(Exit::LeaseLost) if !stopped_by_us => self.shared.metrics.lease_event("lost"),
            Some(Exit::LeaseLost | Exit::Cancelled) | None => {}
        }
    }

    /// Stops every reader (each completes a delivery in progress) and releases the leases.
    async fn stop(&mut self) {
        for running in self.readers.values() {
            running.cancel.cancel();
        }
        while let Some(joined) = self.tasks.join_next_with_id().await {
            self.reader_exited(joined);
        }
        let settings = &self.shared.settings;
        match lease::release_all(
            &self.shared.db,
            &settings.stream_name,
            &self.shared.replica_id,
        )
        .await
        {
            Ok(released) => {
                tracing::info!(released, "kinesis source stopped; leases released");
            }
            Err(error) => tracing::warn!(
                %error,
                "failed to release kinesis leases; other replicas take them when they expire"
            ),
        }
        self.shared.metrics.set_leases_held(0);
    }

    /// Creates the stream when it does not exist and waits until it is ACTIVE. Returns `false`
    /// when shut down first.
    #[tracing::instrument(skip_all, fields(shard_count = shard_count))]
    async fn ensure_stream(&self, shard_count: u32, shutdown: &CancellationToken) -> bool {
        let settings = &self.shared.settings;
        let mut backoff = Backoff::new(settings.backoff_initial, settings.backoff_max);
        loop {
            match self.create_and_wait(shard_count, shutdown).await {
                Ok(()) => return true,
                Err(error) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(%error, retry_in = ?wait, "failed to create the kinesis stream");
                    tokio::select! {
                        () = shutdown.cancelled() => return false,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    async fn create_and_wait(
        &self,
        shard_count: u32,
        shutdown: &CancellationToken,
    ) -> Result<(), CallError> {
        let client = &self.shared.client;
        let metrics = &self.shared.metrics;
        let stream = &self.shared.settings.stream_name;
        let shard_count = i32::try_from(shard_count).unwrap_or(i32::MAX);
        match client
            .create_stream()
            .stream_name(stream)
            .shard_count(shard_count)
            .send()
            .await
        {
            Ok(_) => {
                metrics.call(Operation::CreateStream, "ok");
                tracing::info!(%stream, shard_count, "kinesis stream created");
            }
            Err(error) => {
                let error = CallError::classify(Operation::CreateStream, error);
                metrics.call(Operation::CreateStream, error.outcome());
                if !matches!(error, CallError::InUse { .. }) {
                    return Err(error);
                }
            }
        }
        loop {
            let summary = client
                .describe_stream_summary()
                .stream_name(stream)
                .send()
                .await
                .map_err(|e| CallError::classify(Operation::DescribeStreamSummary, e))
                .inspect_err(|e| metrics.call(Operation::DescribeStreamSummary, e.outcome()))?;
            metrics.call(Operation::DescribeStreamSummary, "ok");
            let active = summary.stream_description_summary().is_some_and(|d| {
                d.stream_status() == &aws_sdk_kinesis::types::StreamStatus::Active
            });
            if active {
                return Ok(());
            }
            // A new stream turns ACTIVE within seconds on AWS, about 50 ms on kinesalite.
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }
}
