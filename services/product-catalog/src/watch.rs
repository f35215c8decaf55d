//! WatchProductChanges: stream the change log from a cursor, then follow it.
//!
//! A stream is a task that reads the log in its `(xid, seq)` order and sends what it read
//! into a small channel, so a slow client slows only its own task (the channel is bounded).
//! The task wakes when this replica commits a change and, for changes committed by other
//! replicas, every `watch_poll_interval`. The head only advances over entries that can no
//! longer be preceded by a later commit (the commit-order watermark, see
//! [`Store::change_log_position`]), so reading `(position, head]` never skips a change that
//! commits later, and one product's changes come in the order they were written.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::Stream;
use mall_grpc::ServiceError;
use mall_product::{ProductTypes, UpdateMask};
use mall_proto::catalog::v1::{
    Product, ProductChangeRecord, WatchProductChangesRequest, WatchProductChangesResponse,
};
use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::{
    metrics::CatalogMetrics,
    store::{ChangeBatch, CommittedBefore, LogPosition, Store, timestamp},
    tokens,
};

/// Changes read from the database per round trip.
const READ_BATCH: u64 = 500;
/// Largest response message: below the 4 MiB a default gRPC client accepts, with room for a
/// product at its largest.
const MAX_RESPONSE_BYTES: usize = 3 * 1024 * 1024;
/// Responses buffered per stream before its task waits for the client.
const STREAM_BUFFER: usize = 2;

/// The stream a WatchProductChanges call returns.
pub type ChangeStream =
    Pin<Box<dyn Stream<Item = Result<WatchProductChangesResponse, Status>> + Send>>;

/// What every watch stream shares.
#[derive(Debug, Clone)]
pub struct Watcher {
    /// The change log.
    pub store: Store,
    /// Registered types, to check the filter.
    pub types: Arc<ProductTypes>,
    /// Bumped after each commit on this replica.
    pub commits: watch::Receiver<u64>,
    /// How often to look for other replicas' commits.
    pub poll_interval: Duration,
    /// Lag and stream counts.
    pub metrics: CatalogMetrics,
    /// Cancelled when the server shuts down: streams end with UNAVAILABLE.
    pub shutdown: CancellationToken,
}

impl Watcher {
    /// Checks the request, finds the start position and starts the stream.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for a malformed request or a cursor ahead of the log; OUT_OF_RANGE for
    /// a cursor older than the retained changes.
    pub async fn start(
        &self,
        request: WatchProductChangesRequest,
    ) -> Result<ChangeStream, ServiceError> {
        let mut violations = mall_grpc::Violations::default();
        if !request.start_cursor.is_empty() && request.from_oldest {
            violations.add(
                "from_oldest",
                "must be false when start_cursor is set; choose one start",
            );
        }
        if !request.product_type.is_empty() && !self.types.contains(&request.product_type) {
            violations.add(
                "product_type",
                format!(
                    "{:?} is not a registered product type; registered: {}",
                    request.product_type,
                    self.types.names().join(", ")
                ),
            );
        }
        violations.into_result()?;
        let cursor = (!request.start_cursor.is_empty())
            .then(|| tokens::parse_cursor(&request.start_cursor))
            .transpose()?;

        let log = self.store.change_log_position().await?;
        let (start, committed_before) = match cursor {
            Some((position, _)) if position < log.pruned_through => return Err(out_of_range()),
            Some((position, _)) if position > log.head => {
                return Err(ServiceError::invalid(
                    "start_cursor",
                    "is ahead of the change log; it was not issued by this catalog",
                ));
            }
            // A cursor of a watch "from now" leaves out what that watch left out.
            Some((position, committed_before)) => (position, committed_before),
            None if request.from_oldest => (log.pruned_through, None),
            None => self.store.now_position().await?,
        };
        let product_type = (!request.product_type.is_empty()).then_some(request.product_type);

        let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(
            self.clone()
                .follow(start, committed_before, product_type, sender),
        );
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
            receiver,
        )))
    }

    async fn follow(
        mut self,
        mut position: LogPosition,
        mut committed_before: Option<CommittedBefore>,
        product_type: Option<String>,
        sender: mpsc::Sender<Result<WatchProductChangesResponse, Status>>,
    ) {
        self.metrics.watchers.inc();
        let _open = scopeguard(self.metrics.watchers.clone());
        loop {
            let log = match self.store.change_log_position().await {
                Ok(log) => log,
                Err(error) => {
                    let _ = sender.send(Err(error.into())).await;
                    return;
                }
            };
            if position < log.pruned_through {
                // The client fell behind the retention while this stream was open.
                let _ = sender.send(Err(out_of_range().into())).await;
                return;
            }
            // Sequence numbers are taken in insert order, not commit order: close enough for a
            // histogram of how far behind a stream is.
            self.metrics
                .watch_lag
                .observe((log.head.seq - position.seq).max(0) as f64);
            if log.head > position {
                let mut batch = match self
                    .store
                    .read_changes(position, log.head, product_type.as_deref(), READ_BATCH)
                    .await
                {
                    Ok(batch) => batch,
                    Err(error) => {
                        let _ = sender.send(Err(error.into())).await;
                        return;
                    }
                };
                if let Some(before) = &committed_before {
                    // A watch from now: leave out what had committed before the call.
                    batch.changes.retain(|c| !before.contains(c.xid));
                }
                let (response, next) = match respond(batch, committed_before.as_ref()) {
                    Ok(answer) => answer,
                    Err(error) => {
                        let _ = sender.send(Err(ServiceError::Internal(error).into())).await;
                        return;
                    }
                };
                position = next;
                // Decided on where the next read starts (a response cut at its size limit
                // starts it earlier than what was read).
                if committed_before
                    .as_ref()
                    .is_some_and(|before| !before.may_follow(position))
                {
                    committed_before = None;
                }
                if sender.send(Ok(response)).await.is_err() {
                    return;
                }
                continue;
            }
            tokio::select! {
                changed = self.commits.changed() => {
                    if changed.is_err() {
                        // The server is going away.
                        let _ = sender.send(Err(shutting_down())).await;
                        return;
                    }
                }
                () = tokio::time::sleep(self.poll_interval) => {}
                () = self.shutdown.cancelled() => {
                    let _ = sender.send(Err(shutting_down())).await;
                    return;
                }
                () = sender.closed() => return,
            }
        }
    }
}

/// Turns what was read into one response within the size limit, and the position after it.
/// Cursors carry `committed_before` while entries after them may be ones it leaves out.
fn respond(
    batch: ChangeBatch,
    committed_before: Option<&CommittedBefore>,
) -> anyhow::Result<(WatchProductChangesResponse, LogPosition)> {
    let mut response = WatchProductChangesResponse::default();
    let mut size = 0;
    let mut position = batch.scanned_through;
    for change in batch.changes {
        let product = Product::decode(change.product.as_slice()).map_err(|e| {
            anyhow::anyhow!("change {} holds an undecodable product: {e}", change.seq)
        })?;
        let record = ProductChangeRecord {
            cursor: tokens::cursor(LogPosition::of(&change), committed_before),
            product: Some(product),
            previous_version: u64::try_from(change.previous_version).unwrap_or_default(),
            commit_time: Some(timestamp(change.commit_time)),
            written_fields: Some(
                UpdateMask::from_bits(u8::try_from(change.written_fields).unwrap_or(u8::MAX))
                    .to_listed_field_mask(),
            ),
            change_version: u64::try_from(change.change_version).unwrap_or_default(),
        };
        let len = record.encoded_len();
        if !response.changes.is_empty() && size + len > MAX_RESPONSE_BYTES {
            // The rest comes in the next response, read again from here.
            position = response
                .changes
                .last()
                .and_then(|c| tokens::parse_cursor(&c.cursor).ok())
                .map(|(position, _)| position)
                .unwrap_or(position);
            break;
        }
        size += len;
        response.changes.push(record);
    }
    response.resume_cursor = tokens::cursor(position, committed_before);
    Ok((response, position))
}

fn out_of_range() -> ServiceError {
    ServiceError::OutOfRange(
        "the cursor is older than the retained changes; start again with from_oldest, or \
         re-read the catalog with ListProducts"
            .into(),
    )
}

fn shutting_down() -> Status {
    Status::unavailable("the server is shutting down; reconnect with the last received cursor")
}

/// Decrements the open-streams gauge when the stream's task ends, however it ends.
fn scopeguard(gauge: mall_telemetry::metrics::IntGauge) -> impl Drop {
    struct Guard(mall_telemetry::metrics::IntGauge);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    Guard(gauge)
}
