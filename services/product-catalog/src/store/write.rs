//! Bulk writes: one transaction per request, a handful of set-based statements whatever the
//! number of items. This is the SQLite path (PostgreSQL has its own, `write_pg`, with the
//! same steps in fewer statements).
//!
//! 1. remember the request id (or find the first response and stop);
//! 2. read the stored field versions of every code, and the whole rows of those whose stored
//!    values can survive the request ([`crate::bulk::needs_values`]);
//! 3. plan in memory ([`crate::bulk::plan`]): outcomes, refusals, final rows, change-log
//!    entries;
//! 4. insert the new products, update the existing ones (one multi-row statement each), with
//!    their field versions;
//! 5. append the change log (one statement);
//! 6. store the response for the request id; commit.

use std::collections::BTreeMap;

use mall_grpc::ServiceError;
use mall_grpc::Violations;
use mall_proto::catalog::v1::{BulkUpdateProductsResponse, Product, ProductUpdateResult};
use prost::Message as _;
use sea_orm::{
    ColumnTrait as _, ConnectionTrait as _, DbErr, EntityTrait as _, QueryFilter as _,
    QueryOrder as _, QuerySelect as _, Statement, Value,
    sea_query::{Expr, ExprTrait as _, OnConflict, Query},
};

use super::{
    Store, backoff, db_error, entity::bulk_requests, entity::products, is_retryable, micros, now,
    stored_from_model, timestamp, to_i64, to_model, versions_of,
};
use crate::bulk::{ItemResult, Plan, Refusal, Stored, Write, needs_values, plan};
use mall_db::Backend;

/// What a bulk write does with writes the stored state refuses (a product of another type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRefusal {
    /// Apply nothing and fail with INVALID_ARGUMENT naming each (BulkUpdateProducts).
    RejectRequest,
    /// Apply the others and report the refused ones (ImportProducts).
    SkipItems,
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
        writes: &[Write],
        on_refusal: OnRefusal,
    ) -> Result<WriteOutcome, ServiceError> {
        let mut retries = 0;
        let mut delays = backoff();
        loop {
            let attempt = match self.backend {
                Backend::Postgres => {
                    let pool = self.db.get_postgres_connection_pool();
                    self.attempt_bulk_write_pg(pool, request_id, writes, on_refusal)
                        .await
                }
                Backend::Sqlite => {
                    self.attempt_bulk_write(request_id, writes, on_refusal)
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

    async fn attempt_bulk_write(
        &self,
        request_id: Option<&str>,
        writes: &[Write],
        on_refusal: OnRefusal,
    ) -> Result<Attempt, AttemptError> {
        let write = self.begin_write().await?;
        let txn = &write.txn;
        let now = now();

        if let Some(id) = request_id {
            let remembered = txn
                .execute(
                    Query::insert()
                        .into_table(bulk_requests::Entity)
                        .columns([
                            bulk_requests::Column::RequestId,
                            bulk_requests::Column::CreateTime,
                        ])
                        .values_panic([id.into(), micros(now).into()])
                        .on_conflict(
                            OnConflict::column(bulk_requests::Column::RequestId)
                                .do_nothing()
                                .to_owned(),
                        ),
                )
                .await?
                .rows_affected();
            if remembered == 0 {
                // Seen before. On PostgreSQL a concurrent first attempt has committed by now:
                // the insert waited for it.
                let first = bulk_requests::Entity::find_by_id(id.to_owned())
                    .one(txn)
                    .await?
                    .and_then(|r| r.response)
                    .ok_or(AttemptError::Db(DbErr::RecordNotFound(
                        "the response of a remembered request id".into(),
                    )))?;
                let response = BulkUpdateProductsResponse::decode(first.as_slice())
                    .map_err(|e| AttemptError::Db(DbErr::Custom(e.to_string())))?;
                return Ok(Attempt::Done(WriteOutcome::Replayed(response)));
            }
        }

        let stored = self.read_for_write(txn, writes).await?;
        let (plan, response) = decide(writes, stored, now, on_refusal)?;
        if let Some(conflict) = self.store_rows(txn, &plan).await? {
            return Ok(Attempt::Conflict(conflict));
        }
        self.append_changes(txn, &plan).await?;
        if let Some(id) = request_id {
            txn.execute(
                Query::update()
                    .table(bulk_requests::Entity)
                    .value(bulk_requests::Column::Response, response.encode_to_vec())
                    .and_where(Expr::col(bulk_requests::Column::RequestId).eq(id)),
            )
            .await?;
        }
        write.txn.commit().await?;
        Ok(self.applied(plan))
    }

    /// After the commit of `plan`: says what was dropped, forgets the written products in
    /// this replica's cache (read-your-writes here; other replicas learn it from the change
    /// log), and reports the outcome.
    pub(super) fn applied(&self, plan: Plan) -> Attempt {
        if !plan.dropped_pending.is_empty() {
            // Product codes are not personal data; they let the producer find the mistake.
            tracing::warn!(
                codes = ?plan.dropped_pending,
                "pending products were created under another type than their waiting changes \
                 named; those changes' fields were dropped"
            );
        }
        self.cache.invalidate(plan.rows.keys().map(String::as_str));
        Attempt::Done(WriteOutcome::Applied {
            results: plan.results,
            refused: plan.refused,
            retries: 0,
        })
    }

    /// The stored state the plan needs, locked on PostgreSQL (in code order, so overlapping
    /// requests queue instead of deadlocking). Every code's field versions, type and
    /// creation time are read; whole rows (and their JSON) only where a stored value can
    /// survive the request ([`needs_values`]), which a bulk of full replacements avoids.
    async fn read_for_write(
        &self,
        txn: &sea_orm::DatabaseTransaction,
        writes: &[Write],
    ) -> Result<BTreeMap<String, Stored>, AttemptError> {
        use products::Column as C;
        let mut codes: Vec<&str> = writes.iter().map(|w| w.product.code.as_str()).collect();
        codes.sort_unstable();
        codes.dedup();
        let thin = products::Entity::find()
            .select_only()
            .columns([
                C::Code,
                C::ProductType,
                C::CreateTime,
                C::Version,
                C::BrandVersion,
                C::CategoryPathVersion,
                C::StatusVersion,
                C::NamesVersion,
                C::DescriptionsVersion,
                C::PricesVersion,
                C::AttributesVersion,
            ])
            .filter(C::Code.is_in(codes))
            .order_by_asc(C::Code);
        type ThinRow = (String, String, i64, i64, i64, i64, i64, i64, i64, i64, i64);
        let mut stored: BTreeMap<String, Stored> = thin
            .into_tuple::<ThinRow>()
            .all(txn)
            .await?
            .into_iter()
            .map(
                |(code, product_type, create_time, version, v0, v1, v2, v3, v4, v5, v6)| {
                    let versions = versions_of([v0, v1, v2, v3, v4, v5, v6], version);
                    let product = Product {
                        code: code.clone(),
                        product_type,
                        version: versions.max(),
                        create_time: Some(timestamp(create_time)),
                        ..Product::default()
                    };
                    (code, Stored { product, versions })
                },
            )
            .collect();
        let mut whole: Vec<&str> = stored
            .iter()
            .filter(|(code, s)| needs_values(writes, code, &s.product))
            .map(|(code, _)| code.as_str())
            .collect();
        if !whole.is_empty() {
            whole.sort_unstable();
            let rows = products::Entity::find()
                .filter(C::Code.is_in(whole.drain(..).map(str::to_owned).collect::<Vec<_>>()))
                .all(txn)
                .await?;
            for row in rows {
                let row = stored_from_model(row)
                    .map_err(|e| AttemptError::Fatal(ServiceError::Internal(e)))?;
                stored.insert(row.product.code.clone(), row);
            }
        }
        Ok(stored)
    }

    /// Inserts the new rows and updates the existing ones. Returns a conflict when another
    /// transaction created one of the "new" products since it was read.
    async fn store_rows(
        &self,
        txn: &sea_orm::DatabaseTransaction,
        plan: &Plan,
    ) -> Result<Option<&'static str>, DbErr> {
        const COLUMNS: &str = "code, product_type, brand, category_path, status, names, \
                               descriptions, prices, attributes, version, create_time, \
                               update_time, brand_version, category_path_version, \
                               status_version, names_version, descriptions_version, \
                               prices_version, attributes_version";
        const WIDTH: usize = 19;
        for existed in [false, true] {
            let rows: Vec<_> = plan
                .rows
                .values()
                .filter(|r| r.existed == existed)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let mut values: Vec<Value> = Vec::with_capacity(rows.len() * WIDTH);
            for row in &rows {
                let m = to_model(&row.stored);
                values.extend([
                    m.code.into(),
                    m.product_type.into(),
                    m.brand.into(),
                    m.category_path.into(),
                    m.status.into(),
                    m.names.into(),
                    m.descriptions.into(),
                    m.prices.into(),
                    m.attributes.into(),
                    m.version.into(),
                    m.create_time.into(),
                    m.update_time.into(),
                    m.brand_version.into(),
                    m.category_path_version.into(),
                    m.status_version.into(),
                    m.names_version.into(),
                    m.descriptions_version.into(),
                    m.prices_version.into(),
                    m.attributes_version.into(),
                ]);
            }
            // Written by hand rather than with the query builder: these are the largest
            // statements the catalog sends (19 values a row, up to 1,000 rows), and building
            // them through expression trees cost a noticeable share of a bulk write.
            let on_conflict = if existed {
                // The rows are locked (or SQLite's single writer is us): the guard is a
                // second line of defence, never expected to skip a row. A product's
                // version never goes down, and a write can leave it unchanged (a late
                // change of fields nobody newer wrote).
                "ON CONFLICT (code) DO UPDATE SET \
                 product_type = excluded.product_type, \
                 brand = excluded.brand, category_path = excluded.category_path, \
                 status = excluded.status, names = excluded.names, \
                 descriptions = excluded.descriptions, prices = excluded.prices, \
                 attributes = excluded.attributes, version = excluded.version, \
                 create_time = excluded.create_time, update_time = excluded.update_time, \
                 brand_version = excluded.brand_version, \
                 category_path_version = excluded.category_path_version, \
                 status_version = excluded.status_version, \
                 names_version = excluded.names_version, \
                 descriptions_version = excluded.descriptions_version, \
                 prices_version = excluded.prices_version, \
                 attributes_version = excluded.attributes_version \
                 WHERE products.version <= excluded.version"
            } else {
                "ON CONFLICT (code) DO NOTHING"
            };
            let sql = format!(
                "INSERT INTO products ({COLUMNS}) VALUES {} {on_conflict}",
                placeholders(self.backend, rows.len(), WIDTH)
            );
            let written = txn
                .execute_raw(Statement::from_sql_and_values(
                    txn.get_database_backend(),
                    sql,
                    values,
                ))
                .await?
                .rows_affected();
            if written != rows.len() as u64 {
                return Ok(Some(if existed {
                    "a stored product changed while it was locked"
                } else {
                    "a concurrent request created one of the products"
                }));
            }
        }
        Ok(None)
    }

    async fn append_changes(
        &self,
        txn: &sea_orm::DatabaseTransaction,
        plan: &Plan,
    ) -> Result<(), DbErr> {
        if plan.changes.is_empty() {
            return Ok(());
        }
        let mut values: Vec<Value> = Vec::with_capacity(plan.changes.len() * 8);
        for change in &plan.changes {
            let p = &change.product;
            values.extend([
                p.code.clone().into(),
                p.product_type.clone().into(),
                to_i64(p.version).into(),
                to_i64(change.previous_version).into(),
                p.update_time.map(micros).unwrap_or_default().into(),
                p.encode_to_vec().into(),
                i16::from(change.written.bits()).into(),
                to_i64(change.change_version).into(),
            ]);
        }
        let sql = format!(
            "INSERT INTO product_changes (code, product_type, version, previous_version, \
             commit_time, product, written_fields, change_version) VALUES {}",
            placeholders(self.backend, plan.changes.len(), 8)
        );
        txn.execute_raw(Statement::from_sql_and_values(
            txn.get_database_backend(),
            sql,
            values,
        ))
        .await?;
        Ok(())
    }
}

/// `(?, ?, ...), (...)` for SQLite, `($1, $2, ...), (...)` for PostgreSQL: `rows` tuples of
/// `columns` parameters.
fn placeholders(backend: Backend, rows: usize, columns: usize) -> String {
    use std::fmt::Write as _;
    let mut sql = String::with_capacity(rows * columns * 6);
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ",(" });
        for column in 0..columns {
            if column > 0 {
                sql.push(',');
            }
            match backend {
                Backend::Sqlite => sql.push('?'),
                Backend::Postgres => {
                    let _ = write!(sql, "${}", row * columns + column + 1);
                }
            }
        }
        sql.push(')');
    }
    sql
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

/// Plans `writes` against `stored` and builds the response; with
/// [`OnRefusal::RejectRequest`], a refused write fails the whole request.
pub(super) fn decide(
    writes: &[Write],
    stored: BTreeMap<String, Stored>,
    now: prost_types::Timestamp,
    on_refusal: OnRefusal,
) -> Result<(Plan, BulkUpdateProductsResponse), AttemptError> {
    let plan = plan(writes, stored, now);
    if on_refusal == OnRefusal::RejectRequest && !plan.refused.is_empty() {
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
    let response = BulkUpdateProductsResponse {
        results: plan
            .results
            .iter()
            .map(|r| ProductUpdateResult {
                code: r.code.clone(),
                outcome: r.outcome as i32,
                stored_version: r.stored_version,
            })
            .collect(),
    };
    Ok((plan, response))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_number_every_value_on_postgres() {
        assert_eq!(placeholders(Backend::Sqlite, 2, 3), "(?,?,?),(?,?,?)");
        assert_eq!(
            placeholders(Backend::Postgres, 2, 3),
            "($1,$2,$3),($4,$5,$6)"
        );
    }
}
