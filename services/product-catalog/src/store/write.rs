//! Bulk writes: one transaction per request, a handful of set-based statements whatever the
//! number of items.
//!
//! 1. remember the request id (or find the first response and stop);
//! 2. read (and on PostgreSQL lock, in code order) the stored versions of every code, and the
//!    whole rows of those a partial update touches;
//! 3. plan in memory ([`crate::bulk::plan`]): outcomes, final rows, change-log entries;
//! 4. insert the new products, update the existing ones (one multi-row statement each);
//! 5. append the change log (one statement) under the change-log lock;
//! 6. store the response for the request id; commit.

use std::collections::BTreeMap;

use mall_grpc::ServiceError;
use mall_proto::catalog::v1::{BulkUpdateProductsResponse, Product, ProductUpdateResult};
use prost::Message as _;
use sea_orm::{
    ColumnTrait as _, ConnectionTrait as _, DbErr, EntityTrait as _, QueryFilter as _,
    QueryOrder as _, QuerySelect as _, Statement, Value,
    sea_query::{Expr, ExprTrait as _, OnConflict, Query},
};

use super::{
    Store, backoff, db_error, entity::bulk_requests, entity::products, from_model, is_retryable,
    micros, now, timestamp, to_model,
};
use crate::bulk::{ItemResult, Plan, Write, plan};
use mall_db::Backend;

/// Key of the PostgreSQL advisory lock that orders change-log appends (ASCII "mallchng").
const CHANGE_LOG_LOCK: i64 = 0x6d61_6c6c_6368_6e67;

/// How a bulk write ended.
#[derive(Debug)]
pub enum WriteOutcome {
    /// Committed now.
    Applied {
        /// One result per write, in request order.
        results: Vec<ItemResult>,
        /// Transaction attempts that conflicted and were retried.
        retries: u32,
    },
    /// The request id was seen before; nothing was applied. The first response.
    Replayed(BulkUpdateProductsResponse),
}

enum Attempt {
    Done(WriteOutcome),
    /// A conflict a new attempt resolves.
    Conflict(&'static str),
}

impl Store {
    /// Applies `writes` in one transaction under the version guard; see the module docs.
    /// With a `request_id`, a repeated request returns the first response instead.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for a write only the stored state shows to be invalid (nothing is
    /// applied then); UNAVAILABLE when the database is unreachable or conflicts persist past
    /// the retry budget; INTERNAL for anything else.
    #[tracing::instrument(skip_all, fields(items = writes.len(), request_id = request_id.is_some()), err)]
    pub async fn bulk_write(
        &self,
        request_id: Option<&str>,
        writes: &[Write],
    ) -> Result<WriteOutcome, ServiceError> {
        let mut retries = 0;
        loop {
            let error = match self.attempt_bulk_write(request_id, writes).await {
                Ok(Attempt::Done(WriteOutcome::Applied { results, .. })) => {
                    return Ok(WriteOutcome::Applied { results, retries });
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
            tokio::time::sleep(backoff(retries)).await;
        }
    }

    async fn attempt_bulk_write(
        &self,
        request_id: Option<&str>,
        writes: &[Write],
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
        let plan = plan(writes, stored, now).map_err(AttemptError::Fatal)?;
        if let Some(conflict) = self.store_rows(txn, &plan).await? {
            return Ok(Attempt::Conflict(conflict));
        }
        self.append_changes(txn, &plan).await?;

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
        // Read-your-writes on this replica; other replicas learn it from the change log.
        self.cache.invalidate(plan.rows.keys().map(String::as_str));
        Ok(Attempt::Done(WriteOutcome::Applied {
            results: plan.results,
            retries: 0,
        }))
    }

    /// The stored state the plan needs, locked on PostgreSQL (in code order, so overlapping
    /// requests queue instead of deadlocking). A full replacement only needs a product's
    /// version, type and creation time, so whole rows (and their JSON) are read only for the
    /// products a partial update touches.
    async fn read_for_write(
        &self,
        txn: &sea_orm::DatabaseTransaction,
        writes: &[Write],
    ) -> Result<BTreeMap<String, Product>, AttemptError> {
        use products::Column as C;
        let mut codes: Vec<&str> = writes.iter().map(|w| w.product.code.as_str()).collect();
        codes.sort_unstable();
        codes.dedup();
        let mut thin = products::Entity::find()
            .select_only()
            .columns([C::Code, C::ProductType, C::Version, C::CreateTime])
            .filter(C::Code.is_in(codes))
            .order_by_asc(C::Code);
        if self.backend == Backend::Postgres {
            thin = thin.lock_exclusive();
        }
        let mut stored: BTreeMap<String, Product> = thin
            .into_tuple::<(String, String, i64, i64)>()
            .all(txn)
            .await?
            .into_iter()
            .map(|(code, product_type, version, create_time)| {
                (
                    code.clone(),
                    Product {
                        code,
                        product_type,
                        version: u64::try_from(version).unwrap_or_default(),
                        create_time: Some(timestamp(create_time)),
                        ..Product::default()
                    },
                )
            })
            .collect();
        let mut partial: Vec<&str> = writes
            .iter()
            .filter(|w| !w.mask.is_full() && stored.contains_key(&w.product.code))
            .map(|w| w.product.code.as_str())
            .collect();
        if !partial.is_empty() {
            partial.sort_unstable();
            partial.dedup();
            // Already locked above: a plain read sees them as they are.
            for row in products::Entity::find()
                .filter(C::Code.is_in(partial))
                .all(txn)
                .await?
            {
                let product =
                    from_model(row).map_err(|e| AttemptError::Fatal(ServiceError::Internal(e)))?;
                stored.insert(product.code.clone(), product);
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
                               descriptions, prices, attributes, version, create_time, update_time";
        for existed in [false, true] {
            let rows: Vec<_> = plan
                .rows
                .values()
                .filter(|r| r.existed == existed)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let mut values: Vec<Value> = Vec::with_capacity(rows.len() * 12);
            for row in &rows {
                let m = to_model(&row.product);
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
                ]);
            }
            // Written by hand rather than with the query builder: these are the largest
            // statements the catalog sends (12 values a row, up to 1,000 rows), and building
            // them through expression trees cost a noticeable share of a bulk write.
            let on_conflict = if existed {
                // The rows are locked (or SQLite's single writer is us): the guard is a
                // second line of defence, never expected to skip a row.
                "ON CONFLICT (code) DO UPDATE SET product_type = excluded.product_type, \
                 brand = excluded.brand, category_path = excluded.category_path, \
                 status = excluded.status, names = excluded.names, \
                 descriptions = excluded.descriptions, prices = excluded.prices, \
                 attributes = excluded.attributes, version = excluded.version, \
                 update_time = excluded.update_time \
                 WHERE products.version < excluded.version"
            } else {
                "ON CONFLICT (code) DO NOTHING"
            };
            let sql = format!(
                "INSERT INTO products ({COLUMNS}) VALUES {} {on_conflict}",
                placeholders(self.backend, rows.len(), 12)
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
        if self.backend == Backend::Postgres {
            // Held to commit: sequence numbers become visible in the order they were taken.
            txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({CHANGE_LOG_LOCK})"))
                .await?;
        }
        let mut values: Vec<Value> = Vec::with_capacity(plan.changes.len() * 6);
        for change in &plan.changes {
            let p = &change.product;
            values.extend([
                p.code.clone().into(),
                p.product_type.clone().into(),
                i64::try_from(p.version).unwrap_or(i64::MAX).into(),
                i64::try_from(change.previous_version)
                    .unwrap_or(i64::MAX)
                    .into(),
                p.update_time.map(micros).unwrap_or_default().into(),
                p.encode_to_vec().into(),
            ]);
        }
        let sql = format!(
            "INSERT INTO product_changes (code, product_type, version, previous_version, \
             commit_time, product) VALUES {}",
            placeholders(self.backend, plan.changes.len(), 6)
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

enum AttemptError {
    Db(DbErr),
    /// Ends the call with this error; no retry helps.
    Fatal(ServiceError),
}

impl From<DbErr> for AttemptError {
    fn from(error: DbErr) -> Self {
        Self::Db(error)
    }
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
