//! ImportProducts: the initial load of the whole catalog from the legacy platform, streamed.
//!
//! Each message is validated product by product and its valid products are committed in one
//! transaction, message after message (the next one is read and validated meanwhile, at most
//! one ahead), so a broken stream keeps what it committed and the client's pace is the
//! database's pace. Every product is a full replacement under
//! the per-field version guard, so re-running an import is safe: stored versions come back
//! STALE. A product stored with another type is counted invalid, like a malformed one.

use std::sync::Arc;

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
    /// Reading and validating the next message overlaps the write of the one before (at most
    /// one validated message waits), so the decoding and validation cost hides behind the
    /// database's; messages are still committed one by one, in order.
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
            while let Some(prepared) = receiver.recv().await {
                self.write(prepared, &mut response).await?;
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

    /// Commits one validated message and counts its outcomes in `response`.
    async fn write(
        &self,
        prepared: Prepared,
        response: &mut ImportProductsResponse,
    ) -> Result<(), Status> {
        let Prepared {
            writes,
            indexes,
            invalid,
        } = prepared;
        for error in invalid {
            record_invalid(response, error.index, error.code, error.reason);
        }
        if writes.is_empty() {
            return Ok(());
        }
        let WriteOutcome::Applied {
            results,
            refused,
            retries,
        } = self
            .store
            .bulk_write(None, &writes, OnRefusal::SkipItems)
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
                response,
                indexes[refusal.index],
                writes[refusal.index].product.code.clone(),
                format!("{}: {}", refusal.field, refusal.reason),
            );
        }
        Ok(())
    }
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
