//! ImportProducts: the initial load of the whole catalog from the legacy platform, streamed.
//!
//! Each message is validated product by product and its valid products are committed in one
//! transaction. The next message is read and validated while earlier ones commit, and up to
//! [`WRITES_IN_FLIGHT`] messages commit at once, so the client's pace is the database's pace;
//! a broken stream keeps every message committed before it (and possibly the one after, which
//! was in flight). Every product is a full replacement under the per-field version guard, so
//! messages commute and re-running an import is safe: stored versions come back STALE. A
//! product stored with another type is counted invalid, like a malformed one.

use std::sync::Arc;

use futures::{StreamExt as _, stream::FuturesOrdered};

use mall_grpc::{ServiceError, Violations, error::stream_read_error};
use mall_product::{ProductTypes, UpdateMask, limits::MAX_ITEMS_PER_REQUEST};
use mall_proto::catalog::v1::{
    ImportError, ImportProductsRequest, ImportProductsResponse, UpdateOutcome,
};
use tonic::{Status, Streaming};

use crate::{
    bulk::{Write, normalized},
    metrics::CatalogMetrics,
    store::{OnRefusal, Store, WriteOutcome},
};

/// Most invalid products described in the response; `invalid_count` has the total.
const MAX_REPORTED_ERRORS: usize = 1_000;

/// Messages committed at once. Products are full replacements under the per-field version
/// guard, so two messages commit in either order to the same result; with two, the database
/// works on one while the server plans and encodes the other.
const WRITES_IN_FLIGHT: usize = 2;

/// What an import needs.
#[derive(Debug, Clone)]
pub struct Importer {
    /// Where products go.
    pub store: Store,
    /// Registered types.
    pub types: Arc<ProductTypes>,
    /// Import counters.
    pub metrics: CatalogMetrics,
}

/// One message, validated: what to write (with each write's index in the stream), and the
/// products found invalid.
struct Prepared {
    writes: Vec<Write>,
    indexes: Vec<i64>,
    invalid: Vec<ImportError>,
}

impl Importer {
    /// Reads the whole stream, committing each message's valid products.
    ///
    /// Reading and validating the next message overlaps the writes of the ones before (at
    /// most one validated message waits), so the decoding and validation cost hides behind
    /// the database's; [`WRITES_IN_FLIGHT`] messages commit at once.
    ///
    /// # Errors
    /// INVALID_ARGUMENT when a message holds more than 1,000 products (earlier messages stay
    /// committed); RESOURCE_EXHAUSTED for an oversized message; the store's errors.
    pub async fn run(
        &self,
        stream: Streaming<ImportProductsRequest>,
    ) -> Result<ImportProductsResponse, Status> {
        let (sender, mut receiver) = tokio::sync::mpsc::channel(1);
        let read = self.read(stream, sender);
        let write = async move {
            let mut response = ImportProductsResponse::default();
            // Results come back in message order, so errors are reported in stream order.
            let mut writing = FuturesOrdered::new();
            loop {
                tokio::select! {
                    biased;
                    Some(written) = writing.next() => merge(&mut response, written?),
                    prepared = receiver.recv(), if writing.len() < WRITES_IN_FLIGHT => {
                        match prepared {
                            Some(prepared) => writing.push_back(self.write(prepared)),
                            None => break,
                        }
                    }
                }
            }
            while let Some(written) = writing.next().await {
                merge(&mut response, written?);
            }
            Ok::<_, Status>(response)
        };
        // A failed write drops the receiver, which ends the read; a failed read ends the
        // channel, after which the messages read before it are still committed.
        let (read, write) = tokio::join!(read, write);
        let response = write?;
        read?;
        let items = &self.metrics.items;
        items
            .with_label_values(&["import", "applied"])
            .inc_by(response.applied_count.unsigned_abs());
        items
            .with_label_values(&["import", "stale"])
            .inc_by(response.stale_count.unsigned_abs());
        items
            .with_label_values(&["import", "invalid"])
            .inc_by(response.invalid_count.unsigned_abs());
        Ok(response)
    }

    /// Reads and validates messages into `sender` until the stream ends or the writer stops.
    async fn read(
        &self,
        mut stream: Streaming<ImportProductsRequest>,
        sender: tokio::sync::mpsc::Sender<Prepared>,
    ) -> Result<(), Status> {
        let mut index: i64 = 0;
        let mut message = 0usize;
        loop {
            let request = tokio::select! {
                request = stream.message() => request.map_err(stream_read_error)?,
                () = sender.closed() => return Ok(()),
            };
            let Some(request) = request else {
                return Ok(());
            };
            if request.products.len() > MAX_ITEMS_PER_REQUEST {
                return Err(ServiceError::invalid(
                    "products",
                    format!(
                        "message {message} holds {} products; at most {MAX_ITEMS_PER_REQUEST} \
                         per message (the {} products before it are committed)",
                        request.products.len(),
                        index
                    ),
                )
                .into());
            }
            message += 1;
            let mut prepared = Prepared {
                writes: Vec::with_capacity(request.products.len()),
                indexes: Vec::with_capacity(request.products.len()),
                invalid: Vec::new(),
            };
            for product in request.products {
                let mut violations = Violations::default();
                mall_product::validate_product(
                    &product,
                    UpdateMask::full(),
                    &self.types,
                    "product",
                    &mut violations,
                );
                if violations.is_empty() {
                    prepared.indexes.push(index);
                    prepared.writes.push(Write {
                        product: normalized(product),
                        mask: UpdateMask::full(),
                    });
                } else {
                    let reason = violations
                        .into_vec()
                        .into_iter()
                        .map(|v| format!("{}: {}", v.field, v.description))
                        .collect::<Vec<_>>()
                        .join("; ");
                    prepared.invalid.push(ImportError {
                        index,
                        code: product.code,
                        reason,
                    });
                }
                index += 1;
            }
            if sender.send(prepared).await.is_err() {
                return Ok(());
            }
        }
    }

    /// Commits one validated message; its outcomes, counted as a response of its own.
    async fn write(&self, prepared: Prepared) -> Result<ImportProductsResponse, Status> {
        let Prepared {
            writes,
            indexes,
            invalid,
        } = prepared;
        let mut response = ImportProductsResponse::default();
        for error in invalid {
            record_invalid(&mut response, error.index, error.code, error.reason);
        }
        if writes.is_empty() {
            return Ok(response);
        }
        let WriteOutcome::Applied {
            results,
            refused,
            retries,
        } = self
            .store
            .bulk_write(None, writes, OnRefusal::SkipItems)
            .await?
        else {
            unreachable!("a write without a request id is never a replay");
        };
        self.metrics.retries.inc_by(u64::from(retries));
        for result in &results {
            match result.outcome {
                UpdateOutcome::Applied => response.applied_count += 1,
                UpdateOutcome::Stale => response.stale_count += 1,
                // A full replacement carries a status, so it is never pending; refusals are
                // counted below.
                UpdateOutcome::Pending | UpdateOutcome::Unspecified => {}
            }
        }
        for refusal in refused {
            record_invalid(
                &mut response,
                indexes[refusal.index],
                results[refusal.index].code.clone(),
                format!("{}: {}", refusal.field, refusal.reason),
            );
        }
        Ok(response)
    }
}

/// Adds one message's counts and errors to the stream's response.
fn merge(response: &mut ImportProductsResponse, message: ImportProductsResponse) {
    response.applied_count += message.applied_count;
    response.stale_count += message.stale_count;
    response.invalid_count += message.invalid_count;
    let room = MAX_REPORTED_ERRORS.saturating_sub(response.errors.len());
    response
        .errors
        .extend(message.errors.into_iter().take(room));
}

/// Counts an invalid product in `response` and describes it while there is room.
fn record_invalid(response: &mut ImportProductsResponse, index: i64, code: String, reason: String) {
    response.invalid_count += 1;
    if response.errors.len() < MAX_REPORTED_ERRORS {
        response.errors.push(ImportError {
            index,
            code,
            reason,
        });
    }
}
