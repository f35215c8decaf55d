//! The reader of one leased shard: GetRecords from the checkpoint, hand each batch to the
//! sink, move the checkpoint once the sink accepted it, and mark the shard finished at the end
//! of a closed shard.
//!
//! Failures and what the reader does about them:
//! - ExpiredIteratorException (an iterator lives 5 minutes): open a new one from the position
//!   after the last checkpoint; nothing is skipped or read twice.
//! - ProvisionedThroughputExceeded, LimitExceeded, KMS throttling, timeouts, server errors:
//!   back off with jitter and retry the same call.
//! - The sink fails: back off and deliver the same batch again; the checkpoint stays.
//! - The lease is gone (taken over, or a replay reset the shard): the guarded checkpoint
//!   matches no row, and the reader stops; the coordinator decides what comes next.
//!
//! A cancelled reader stops at the next wait or call, but never in the middle of a delivery
//! and its checkpoint, so a shutdown does not cut off a batch the queue is accepting.

use std::sync::Arc;

use aws_sdk_kinesis::types::ShardIteratorType;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use mall_retry::Backoff;
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::{
    Heartbeat, KinesisRecord, RecordSink, ShardBatch, Shared,
    call::{CallError, Operation},
    config::MIN_GET_RECORDS_INTERVAL,
    lease::{self, LeaseToken, entity::Model},
};

/// Where reading starts when there is no open iterator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Position {
    /// The oldest record still in the stream: no checkpoint and no replay.
    TrimHorizon,
    /// The first record that arrived at or after this time: a replay without a checkpoint yet.
    AtTimestamp(DateTime<Utc>),
    /// Right after the last record the sink accepted.
    AfterSequence(String),
}

impl Position {
    /// The position a reader of `row` starts from.
    pub(crate) fn of(row: &Model) -> Self {
        if let Some(sequence) = &row.checkpoint_sequence_number {
            Self::AfterSequence(sequence.clone())
        } else if let Some(at) = row
            .replay_from_ms
            .and_then(DateTime::<Utc>::from_timestamp_millis)
        {
            Self::AtTimestamp(at)
        } else {
            Self::TrimHorizon
        }
    }
}

/// Why a reader stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    /// The shard is closed and was read to its end; it is marked finished and unleased.
    Finished,
    /// The lease no longer matches (taken over, released, or reset by a replay).
    LeaseLost,
    /// The coordinator asked it to stop.
    Cancelled,
}

/// One shard's reader; see the module docs.
pub(crate) struct Reader<S> {
    shared: Arc<Shared>,
    sink: Arc<S>,
    token: LeaseToken,
    position: Position,
    paused: watch::Receiver<bool>,
    cancel: CancellationToken,
    backoff: Backoff,
    /// Lag last written to the database, so an idle shard does not write on every poll.
    stored_lag: Option<i64>,
    /// Beaten after every finished step; see [`Heartbeat`].
    heartbeat: Heartbeat,
}

impl<S: RecordSink> Reader<S> {
    pub(crate) fn new(
        shared: Arc<Shared>,
        sink: Arc<S>,
        token: LeaseToken,
        position: Position,
        paused: watch::Receiver<bool>,
        cancel: CancellationToken,
        heartbeat: Heartbeat,
    ) -> Self {
        let backoff = Backoff::new(shared.settings.backoff_initial, shared.settings.backoff_max);
        Self {
            shared,
            sink,
            token,
            position,
            paused,
            cancel,
            backoff,
            stored_lag: None,
            heartbeat,
        }
    }

    /// Reads the shard until it is finished, the lease is lost, or the reader is cancelled.
    pub(crate) async fn run(mut self) -> Exit {
        let span = tracing::info_span!(
            "kinesis.shard",
            stream = %self.token.stream,
            shard_id = %self.token.shard_id,
            lease_counter = self.token.counter,
        );
        async move {
            tracing::info!(position = ?self.position, "reading shard");
            let exit = self.read().await;
            self.shared.metrics.forget_shard(&self.token.shard_id);
            tracing::info!(?exit, "stopped reading shard");
            exit
        }
        .instrument(span)
        .await
    }

    async fn read(&mut self) -> Exit {
        let mut iterator: Option<String> = None;
        let mut last_call: Option<Instant> = None;
        loop {
            self.heartbeat.beat();
            if *self.paused.borrow() {
                if !self.wait_while_paused().await {
                    return Exit::Cancelled;
                }
                // The iterator may have expired meanwhile; the position is exact anyway.
                iterator = None;
            }
            if let Some(last) = last_call
                && !self.sleep_until(last + MIN_GET_RECORDS_INTERVAL).await
            {
                return Exit::Cancelled;
            }
            let current = match iterator.take() {
                Some(current) => current,
                None => match self.open_iterator().await {
                    Ok(opened) => opened,
                    Err(error) => {
                        if !self.after_failure(&error).await {
                            return Exit::Cancelled;
                        }
                        continue;
                    }
                },
            };
            last_call = Some(Instant::now());
            let output = tokio::select! {
                () = self.cancel.cancelled() => return Exit::Cancelled,
                output = self.get_records(&current) => output,
            };
            let output = match output {
                Ok(output) => output,
                Err(CallError::ExpiredIterator) => {
                    tracing::info!("shard iterator expired; reopening it after the checkpoint");
                    continue;
                }
                Err(error) => {
                    iterator = Some(current);
                    if !self.after_failure(&error).await {
                        return Exit::Cancelled;
                    }
                    continue;
                }
            };
            self.backoff.reset();

            let lag = output.millis_behind_latest.unwrap_or(0);
            self.shared.metrics.lag(&self.token.shard_id, lag);
            let got_records = !output.records.is_empty();
            if got_records {
                let batch = self.batch(output.records);
                self.shared
                    .metrics
                    .records_read(&self.token.shard_id, batch.records.len());
                if !self.deliver(&batch).await {
                    return Exit::Cancelled;
                }
                let last = batch.last_sequence_number().to_owned();
                let write = Write::Checkpoint {
                    sequence_number: &last,
                    lag,
                };
                match self.store(write).await {
                    Some(true) => {
                        self.stored_lag = Some(lag);
                        self.position = Position::AfterSequence(last);
                    }
                    Some(false) => return Exit::LeaseLost,
                    None => return Exit::Cancelled,
                }
            } else if self.stored_lag != Some(lag) {
                // Best effort: lag is for operators, and the next read writes it again.
                match lease::record_lag(&self.shared.db, &self.token, lag).await {
                    Ok(true) => self.stored_lag = Some(lag),
                    Ok(false) => return Exit::LeaseLost,
                    Err(error) => tracing::warn!(%error, "failed to record shard lag"),
                }
            }

            match output.next_shard_iterator {
                Some(next) => iterator = Some(next),
                None => {
                    // A closed shard read to its end: its children may be read now.
                    return match self.store(Write::Finish).await {
                        Some(true) => {
                            tracing::info!("closed shard read to its end; marked finished");
                            Exit::Finished
                        }
                        Some(false) => Exit::LeaseLost,
                        None => Exit::Cancelled,
                    };
                }
            }
            // Caught up: wait before asking again. Behind: go on at the per-shard call rate.
            if !got_records
                && lag == 0
                && !self
                    .sleep_until(Instant::now() + self.shared.settings.idle_poll_interval)
                    .await
            {
                return Exit::Cancelled;
            }
        }
    }

    /// Opens an iterator at the current position.
    #[tracing::instrument(skip_all, fields(position = ?self.position))]
    async fn open_iterator(&self) -> Result<String, CallError> {
        let request = self
            .shared
            .client
            .get_shard_iterator()
            .stream_name(&self.token.stream)
            .shard_id(&self.token.shard_id);
        let request = match &self.position {
            Position::TrimHorizon => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
            Position::AfterSequence(sequence) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(sequence),
            Position::AtTimestamp(at) => request
                .shard_iterator_type(ShardIteratorType::AtTimestamp)
                .timestamp(aws_sdk_kinesis::primitives::DateTime::from_millis(
                    at.timestamp_millis(),
                )),
        };
        let result = tokio::select! {
            () = self.cancel.cancelled() => return Err(CallError::Other {
                operation: Operation::GetShardIterator.as_str(),
                message: "cancelled".into(),
            }),
            result = request.send() => result,
        };
        let output = result
            .map_err(|e| CallError::classify(Operation::GetShardIterator, e))
            .inspect_err(|e| {
                self.shared
                    .metrics
                    .call(Operation::GetShardIterator, e.outcome());
            })?;
        self.shared.metrics.call(Operation::GetShardIterator, "ok");
        output.shard_iterator.ok_or_else(|| CallError::Other {
            operation: Operation::GetShardIterator.as_str(),
            message: "the response has no shard iterator".into(),
        })
    }

    async fn get_records(
        &self,
        iterator: &str,
    ) -> Result<aws_sdk_kinesis::operation::get_records::GetRecordsOutput, CallError> {
        let limit = i32::try_from(self.shared.settings.max_records_per_call).unwrap_or(10_000);
        let output = self
            .shared
            .client
            .get_records()
            .shard_iterator(iterator)
            .limit(limit)
            .send()
            .await
            .map_err(|e| CallError::classify(Operation::GetRecords, e))
            .inspect_err(|e| self.shared.metrics.call(Operation::GetRecords, e.outcome()))?;
        self.shared.metrics.call(Operation::GetRecords, "ok");
        Ok(output)
    }

    fn batch(&self, records: Vec<aws_sdk_kinesis::types::Record>) -> ShardBatch {
        let records = records
            .into_iter()
            .map(|record| KinesisRecord {
                shard_id: self.token.shard_id.clone(),
                sequence_number: record.sequence_number,
                partition_key: record.partition_key.unwrap_or_default(),
                data: Bytes::from(record.data.into_inner()),
                approximate_arrival: record
                    .approximate_arrival_timestamp
                    .and_then(|at| DateTime::from_timestamp(at.secs(), at.subsec_nanos()))
                    .unwrap_or_else(Utc::now),
            })
            .collect();
        ShardBatch {
            stream: self.token.stream.clone(),
            shard_id: self.token.shard_id.clone(),
            epoch: self.token.epoch,
            records,
        }
    }

    /// Hands `batch` to the sink until it accepts it. Returns `false` when cancelled between
    /// attempts (never during one).
    async fn deliver(&mut self, batch: &ShardBatch) -> bool {
        loop {
            let span = tracing::info_span!(
                "kinesis.deliver",
                records = batch.records.len(),
                first_sequence_number = %batch.first_sequence_number(),
                last_sequence_number = %batch.last_sequence_number(),
            );
            let delivered = self.sink.deliver(batch).instrument(span).await;
            self.heartbeat.beat();
            match delivered {
                Ok(()) => {
                    self.shared.metrics.delivered(true);
                    self.backoff.reset();
                    return true;
                }
                Err(error) => {
                    self.shared.metrics.delivered(false);
                    let wait = self.backoff.next_delay();
                    tracing::warn!(
                        error = format!("{error:#}"),
                        records = batch.records.len(),
                        retry_in = ?wait,
                        "failed to deliver kinesis records; delivering the same records again"
                    );
                    if !self.sleep_until(Instant::now() + wait).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Runs a guarded write until the database answers. `Some(false)`: the lease is gone;
    /// `None`: cancelled while the database was failing.
    async fn store(&mut self, write: Write<'_>) -> Option<bool> {
        loop {
            let result = match write {
                Write::Checkpoint {
                    sequence_number,
                    lag,
                } => lease::checkpoint(&self.shared.db, &self.token, sequence_number, lag).await,
                Write::Finish => lease::finish(&self.shared.db, &self.token).await,
            };
            self.heartbeat.beat();
            match result {
                Ok(held) => return Some(held),
                Err(error) => {
                    let wait = self.backoff.next_delay();
                    tracing::warn!(%error, retry_in = ?wait, "failed to write the shard checkpoint");
                    if !self.sleep_until(Instant::now() + wait).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Logs and counts a failed call and waits before the next attempt; `false` when cancelled.
    async fn after_failure(&mut self, error: &CallError) -> bool {
        let wait = self.backoff.next_delay();
        match error {
            CallError::Throttled { .. } => {
                tracing::info!(%error, retry_in = ?wait, "kinesis throttled the shard reader; backing off");
            }
            _ => tracing::warn!(%error, retry_in = ?wait, "kinesis call failed; retrying"),
        }
        self.sleep_until(Instant::now() + wait).await
    }

    /// Waits until the relay is resumed; `false` when cancelled first. Leases stay held (and
    /// renewed) meanwhile, so a resume continues on the same replicas without a reshuffle.
    async fn wait_while_paused(&mut self) -> bool {
        tracing::info!("relay paused; shard reader waiting");
        self.shared.metrics.reader_paused(true);
        let resumed = loop {
            if !*self.paused.borrow_and_update() {
                break true;
            }
            tokio::select! {
                () = self.cancel.cancelled() => break false,
                changed = self.paused.changed() => {
                    if changed.is_err() {
                        // The pause switch is gone for good: stay paused until cancelled.
                        self.cancel.cancelled().await;
                        break false;
                    }
                }
            }
        };
        self.shared.metrics.reader_paused(false);
        if resumed {
            tracing::info!("relay resumed; shard reader continuing from its checkpoint");
        }
        resumed
    }

    /// Sleeps until `deadline`; `false` when cancelled first. A wait is a step: it ends.
    async fn sleep_until(&self, deadline: Instant) -> bool {
        let slept = tokio::select! {
            () = self.cancel.cancelled() => false,
            () = tokio::time::sleep_until(deadline) => true,
        };
        self.heartbeat.beat();
        slept
    }
}

/// A guarded write of the reader's progress.
#[derive(Debug, Clone, Copy)]
enum Write<'a> {
    /// The sink accepted records up to `sequence_number`.
    Checkpoint { sequence_number: &'a str, lag: i64 },
    /// The closed shard was read to its end.
    Finish,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> Model {
        Model {
            stream_name: "s".into(),
            shard_id: "shardId-000000000000".into(),
            parent_shard_id: None,
            adjacent_parent_shard_id: None,
            checkpoint_sequence_number: None,
            finished: false,
            replay_from_ms: None,
            epoch: 0,
            lease_owner: None,
            lease_expires_ms: None,
            lease_counter: 0,
            lag_millis: 0,
        }
    }

    #[test]
    fn a_new_shard_starts_at_the_trim_horizon() {
        assert_eq!(Position::of(&row()), Position::TrimHorizon);
    }

    #[test]
    fn a_checkpoint_wins_over_a_replay_time() {
        let mut row = row();
        row.replay_from_ms = Some(1_700_000_000_000);
        assert_eq!(
            Position::of(&row),
            Position::AtTimestamp(
                DateTime::from_timestamp_millis(1_700_000_000_000).expect("valid time")
            )
        );
        row.checkpoint_sequence_number = Some("42".into());
        assert_eq!(Position::of(&row), Position::AfterSequence("42".into()));
    }
}
