//! The change log: read from a position, learn the head, prune by age.

use mall_grpc::ServiceError;
use sea_orm::{
    ColumnTrait as _, ConnectionTrait as _, EntityTrait as _, QueryFilter as _, QueryOrder as _,
    QuerySelect as _, Statement,
    sea_query::{Expr, ExprTrait as _, Query},
};

use super::{Store, db_error, entity::change_log_state, entity::product_changes};

/// Where the change log stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeLogPosition {
    /// Highest sequence number committed (0 before the first change).
    pub head: i64,
    /// Highest sequence number deleted by retention; a cursor below it is out of range.
    pub pruned_through: i64,
}

/// Changes read from the log, and how far the read looked.
#[derive(Debug, Clone, Default)]
pub struct ChangeBatch {
    /// Matching changes in sequence order.
    pub changes: Vec<product_changes::Model>,
    /// Every change up to this sequence number has been looked at (including ones the
    /// product type filter skipped).
    pub scanned_through: i64,
}

impl Store {
    /// The head and the pruned-through mark of the change log.
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails.
    pub async fn change_log_position(&self) -> Result<ChangeLogPosition, ServiceError> {
        let row = self
            .db
            .query_one_raw(Statement::from_string(
                self.db.get_database_backend(),
                "SELECT (SELECT MAX(seq) FROM product_changes) AS head, pruned_through \
                 FROM change_log_state WHERE id = 1",
            ))
            .await
            .map_err(|e| db_error(e, "read change log position"))?
            .ok_or_else(|| {
                ServiceError::Internal(anyhow::anyhow!("change_log_state has no row"))
            })?;
        let head: Option<i64> = row
            .try_get("", "head")
            .map_err(|e| db_error(e, "read change log head"))?;
        let pruned_through: i64 = row
            .try_get("", "pruned_through")
            .map_err(|e| db_error(e, "read change log prune mark"))?;
        Ok(ChangeLogPosition {
            head: Ord::max(head.unwrap_or(0), pruned_through),
            pruned_through,
        })
    }

    /// Changes after `after` up to `through`, of `product_type` if given, at most `limit`.
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails.
    pub async fn read_changes(
        &self,
        after: i64,
        through: i64,
        product_type: Option<&str>,
        limit: u64,
    ) -> Result<ChangeBatch, ServiceError> {
        use product_changes::Column as C;
        let mut query = product_changes::Entity::find()
            .filter(C::Seq.gt(after))
            .filter(C::Seq.lte(through));
        if let Some(product_type) = product_type {
            query = query.filter(C::ProductType.eq(product_type));
        }
        let changes = query
            .order_by_asc(C::Seq)
            .limit(limit)
            .all(&self.db)
            .await
            .map_err(|e| db_error(e, "read change log"))?;
        let scanned_through = if (changes.len() as u64) < limit {
            through
        } else {
            changes.last().map_or(through, |c| c.seq)
        };
        Ok(ChangeBatch {
            changes,
            scanned_through,
        })
    }

    /// Keeps the read cache in step with writes made through other replicas: reads the
    /// codes of new changes every `interval` and forgets those products, until `shutdown`.
    /// When the log cannot be read, or this follower fell behind its retention, the cache is
    /// emptied instead.
    ///
    /// # Errors
    /// Never; failures are logged and retried.
    pub async fn follow_for_cache(
        self,
        interval: std::time::Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<()> {
        let mut position = None;
        loop {
            match self.invalidate_changed(position).await {
                Ok(next) => position = Some(next),
                Err(error) => {
                    tracing::warn!(%error, "cannot follow the change log; emptying the read cache");
                    self.cache.clear();
                    position = None;
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// Forgets the products changed after `after` (from the head when `None`, emptying the
    /// cache: nothing is known about what changed before). Returns the new position.
    async fn invalidate_changed(&self, after: Option<i64>) -> Result<i64, ServiceError> {
        let log = self.change_log_position().await?;
        let Some(mut position) = after.filter(|p| *p >= log.pruned_through) else {
            self.cache.clear();
            return Ok(log.head);
        };
        while position < log.head {
            let rows: Vec<(i64, String)> = product_changes::Entity::find()
                .select_only()
                .columns([product_changes::Column::Seq, product_changes::Column::Code])
                .filter(product_changes::Column::Seq.gt(position))
                .filter(product_changes::Column::Seq.lte(log.head))
                .order_by_asc(product_changes::Column::Seq)
                .limit(5_000)
                .into_tuple()
                .all(&self.db)
                .await
                .map_err(|e| db_error(e, "read changed codes"))?;
            let Some(last) = rows.last().map(|(seq, _)| *seq) else {
                break;
            };
            self.cache
                .invalidate(rows.iter().map(|(_, code)| code.as_str()));
            position = last;
        }
        Ok(log.head)
    }

    /// The commit time of the oldest retained change, in microseconds since the epoch.
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails.
    pub async fn oldest_change_time(&self) -> Result<Option<i64>, ServiceError> {
        Ok(product_changes::Entity::find()
            .order_by_asc(product_changes::Column::Seq)
            .one(&self.db)
            .await
            .map_err(|e| db_error(e, "read oldest change"))?
            .map(|c| c.commit_time))
    }

    /// Deletes changes committed before `cutoff` (microseconds since the epoch), at most
    /// `batch` per transaction so writers are never held up long, and advances the
    /// pruned-through mark. Returns how many were deleted.
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails.
    pub async fn prune_changes(&self, cutoff: i64, batch: i64) -> Result<u64, ServiceError> {
        let mut deleted = 0;
        loop {
            let position = self.change_log_position().await?;
            let last_old: Option<i64> = product_changes::Entity::find()
                .select_only()
                .column_as(product_changes::Column::Seq.max(), "seq")
                .filter(product_changes::Column::CommitTime.lt(cutoff))
                .filter(product_changes::Column::Seq.lte(position.pruned_through + batch))
                .into_tuple()
                .one(&self.db)
                .await
                .map_err(|e| db_error(e, "find expired changes"))?
                .flatten();
            let Some(through) = last_old.filter(|s| *s > position.pruned_through) else {
                return Ok(deleted);
            };
            let write = self
                .begin_write()
                .await
                .map_err(|e| db_error(e, "prune change log"))?;
            let removed = product_changes::Entity::delete_many()
                .filter(product_changes::Column::Seq.lte(through))
                .exec(&write.txn)
                .await
                .map_err(|e| db_error(e, "prune change log"))?
                .rows_affected;
            write
                .txn
                .execute(
                    Query::update()
                        .table(change_log_state::Entity)
                        .value(change_log_state::Column::PrunedThrough, through)
                        .and_where(Expr::col(change_log_state::Column::Id).eq(1))
                        .and_where(Expr::col(change_log_state::Column::PrunedThrough).lt(through)),
                )
                .await
                .map_err(|e| db_error(e, "advance change log prune mark"))?;
            write
                .txn
                .commit()
                .await
                .map_err(|e| db_error(e, "prune change log"))?;
            deleted += removed;
        }
    }

    /// Forgets BulkUpdateProducts request ids remembered before `cutoff`.
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails.
    pub async fn prune_request_ids(&self, cutoff: i64) -> Result<u64, ServiceError> {
        use super::entity::bulk_requests;
        let write = self
            .begin_write()
            .await
            .map_err(|e| db_error(e, "prune request ids"))?;
        let removed = bulk_requests::Entity::delete_many()
            .filter(bulk_requests::Column::CreateTime.lt(cutoff))
            .exec(&write.txn)
            .await
            .map_err(|e| db_error(e, "prune request ids"))?
            .rows_affected;
        write
            .txn
            .commit()
            .await
            .map_err(|e| db_error(e, "prune request ids"))?;
        Ok(removed)
    }
}
