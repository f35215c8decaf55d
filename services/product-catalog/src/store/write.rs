//! Bulk writes: one transaction per request, retried on conflicts. Each backend has its own
//! attempt (`write_pg`: constant SQL over arrays; `write_sqlite`: prepared statements), with
//! the same steps:
//!
//! 1. find the first response of a request id seen before, and stop;
//! 2. read (and lock) the stored field versions of every code, and the whole rows of those
//!    whose stored values can survive the request ([`crate::bulk::needing_values`]);
//! 3. plan in memory ([`decide`], [`crate::bulk::plan`]): outcomes, refusals, final rows,
//!    change-log entries (the values of a code written once are moved into its row; an
//!    attempt that does not commit gives them back, [`crate::bulk::Plan::give_back`], so the
//!    next attempt starts from the request as it came);
//! 4. insert the new products, update the existing ones, append the change log, remember the
//!    request id with its response; commit;
//! 5. update this replica's read cache ([`Store::applied`] reports the outcome).

use std::collections::BTreeMap;

use mall_grpc::ServiceError;
use mall_grpc::Violations;
use mall_proto::catalog::v1::{BulkUpdateProductsResponse, ProductUpdateResult};
use prost::Message as _;
use sea_orm::DbErr;

use mall_db::is_retryable;

use super::{Store, backoff, db_error};
use crate::bulk::{ItemResult, Plan, Refusal, Stored, Write, plan};

/// What a bulk write does with writes the stored state refuses (a product of another type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRefusal {
    /// Apply nothing and fail with INVALID_ARGUMENT naming each (BulkUpdateProducts).
    RejectRequest,
    /// Apply the others and report the refused ones (ImportProducts).
    SkipItems,
}

/// What a write attempt decides by, besides the stored state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Rules {
    pub on_refusal: OnRefusal,
    /// `catalog.max_version_jump`: see [`crate::bulk::plan`].
    pub max_version_jump: Option<u64>,
}

/// How a bulk write ended.
#[derive(Debug)]
pub enum WriteOutcome {
    /// Committed now.
    Applied {
        /// One result per write, in request order (UNSPECIFIED for a refused one).
        results: Vec<ItemResult>,
        /// Writes refused and skipped ([`OnRefusal::SkipItems`] only).
        refused: Vec<Refusal>,
        /// Transaction attempts that conflicted and were retried.
        retries: u32,
    },
    /// The request id was seen before; nothing was applied. The first response.
    Replayed(BulkUpdateProductsResponse),
}

pub(super) enum Attempt {
    Done(WriteOutcome),
    /// A conflict a new attempt resolves.
    Conflict(&'static str),
}

impl Store {
    /// Applies `writes` in one transaction under the per-field version guard; see the module
    /// docs. With a `request_id`, a repeated request returns the first response instead.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for a write only the stored state shows to be invalid, with
    /// [`OnRefusal::RejectRequest`] (nothing is applied then); UNAVAILABLE when the database
    /// is unreachable or conflicts persist past the retry budget; INTERNAL for anything else.
    #[tracing::instrument(skip_all, fields(items = writes.len(), request_id = request_id.is_some()), err(level = "debug"))]
    pub async fn bulk_write(
        &self,
        request_id: Option<&str>,
        mut writes: Vec<Write>,
        on_refusal: OnRefusal,
    ) -> Result<WriteOutcome, ServiceError> {
        let rules = Rules {
            on_refusal,
            max_version_jump: self.max_version_jump,
        };
        let mut retries = 0;
        let mut delays = backoff();
        loop {
            let attempt = match &self.sqlite_writer {
                None => {
                    let pool = self.db.get_postgres_connection_pool();
                    self.attempt_bulk_write_pg(pool, request_id, &mut writes, rules, retries > 0)
                        .await
                }
                Some(writer) => {
                    self.attempt_bulk_write_sqlite(writer, request_id, &mut writes, rules)
                        .await
                }
            };
            let error = match attempt {
                Ok(Attempt::Done(WriteOutcome::Applied {
                    results, refused, ..
                })) => {
                    return Ok(WriteOutcome::Applied {
                        results,
                        refused,
                        retries,
                    });
                }
                Ok(Attempt::Done(replayed)) => return Ok(replayed),
                Ok(Attempt::Conflict(reason)) => reason.to_owned(),
                Err(AttemptError::Fatal(error)) => return Err(error),
                Err(AttemptError::Db(error)) if is_retryable(&error) => error.to_string(),
                Err(AttemptError::Db(error)) => return Err(db_error(error, "bulk update")),
            };
            retries += 1;
            if retries >= self.write_retries {
                tracing::warn!(retries, %error, "write conflicts persisted; giving up");
                return Err(ServiceError::Unavailable(
                    "conflicting writes to the same products persisted; retry with backoff \
                     (with the same request_id)"
                        .into(),
                ));
            }
            tracing::debug!(retries, %error, "write conflicted; retrying");
            tokio::time::sleep(delays.next_delay()).await;
        }
    }

    /// After the commit of `plan` (and the cache's update): says what was dropped and
    /// reports the outcome.
    pub(super) fn applied(&self, plan: Plan) -> Attempt {
        if !plan.dropped_pending.is_empty() {
            // Product codes are not personal data; they let the producer find the mistake.
            tracing::warn!(
                codes = ?plan.dropped_pending,
                "pending products were created under another type than their waiting changes \
                 named; those changes' fields were dropped"
            );
        }
        Attempt::Done(WriteOutcome::Applied {
            results: plan.results,
            refused: plan.refused,
            retries: 0,
        })
    }
}

pub(super) enum AttemptError {
    Db(DbErr),
    /// Ends the call with this error; no retry helps.
    Fatal(ServiceError),
}

impl From<DbErr> for AttemptError {
    fn from(error: DbErr) -> Self {
        Self::Db(error)
    }
}

/// Plans `writes` against `stored` and, for a request with a request id (`remember`), encodes
/// the response to remember with it; with [`OnRefusal::RejectRequest`], a refused write fails
/// the whole request.
pub(super) fn decide(
    writes: &mut [Write],
    stored: BTreeMap<String, Stored>,
    now: prost_types::Timestamp,
    rules: Rules,
    remember: bool,
) -> Result<(Plan, Option<Vec<u8>>), AttemptError> {
    let plan = plan(writes, stored, now, rules.max_version_jump);
    if rules.on_refusal == OnRefusal::RejectRequest && !plan.refused.is_empty() {
        let mut violations = Violations::default();
        for refusal in &plan.refused {
            violations.add(
                format!("updates[{}].{}", refusal.index, refusal.field),
                refusal.reason.clone(),
            );
        }
        return Err(AttemptError::Fatal(ServiceError::InvalidArgument(
            violations.into_vec(),
        )));
    }
    let response = remember.then(|| {
        BulkUpdateProductsResponse {
            results: plan
                .results
                .iter()
                .map(|r| ProductUpdateResult {
                    code: r.code.clone(),
                    outcome: r.outcome as i32,
                    stored_version: r.stored_version,
                })
                .collect(),
        }
        .encode_to_vec()
    });
    Ok((plan, response))
}
