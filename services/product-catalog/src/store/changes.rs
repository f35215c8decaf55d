//! The change log: read from a position, learn the head, prune by age.

use mall_grpc::ServiceError;
use sea_orm::{
    ColumnTrait as _, ConnectionTrait as _, DbErr, EntityTrait as _, QueryFilter as _,
    QueryOrder as _, QuerySelect as _, RuntimeErr, Statement,
    sea_query::{Expr, ExprTrait as _, Query, SimpleExpr},
};

use mall_db::Backend;

use super::{Store, db_error, entity::change_log_state, entity::product_changes};

/// A place in the change log. Entries are ordered by `(xid, seq)`: on PostgreSQL `xid` is the
/// writing transaction's id and entries become readable only below the commit-order
/// watermark (see [`Store::change_log_position`]); on SQLite `xid` is 0 and `seq` alone is
/// commit order (one writer at a time).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct LogPosition {
    /// Transaction id of the entry (0 on SQLite and for entries older than the column).
    pub xid: i64,
    /// Sequence number of the entry.
    pub seq: i64,
}

impl LogPosition {
    /// The position of `change`.
    pub fn of(change: &product_changes::Model) -> Self {
        Self {
            xid: change.xid,
            seq: change.seq,
        }
    }
}

/// The current snapshot: xmin, xmax and the transactions running between them.
const SNAPSHOT: &str = "SELECT pg_snapshot_xmin(s)::text::bigint, \
    pg_snapshot_xmax(s)::text::bigint, ARRAY(SELECT pg_snapshot_xip(s)::text::bigint) \
    FROM pg_current_snapshot() AS s";

/// Entries the cache follower reads per query.
const FOLLOW_BATCH: u64 = 5_000;

/// How far the cache follower has read: every entry up to `head` (the watermark when it last
/// looked) and, on PostgreSQL, above it every entry of the transactions committed in `seen`
/// (its snapshot when it last looked).
#[derive(Debug, Clone)]
struct Followed {
    head: LogPosition,
    seen: Option<CommittedBefore>,
}

/// The transactions that had committed at one moment (a PostgreSQL snapshot): a watch
/// "from now" leaves out their entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedBefore {
    /// Every transaction below this id had ended.
    xmin: i64,
    /// Every transaction from this id on had not begun.
    xmax: i64,
    /// Between the two, the transactions still running.
    running: Vec<i64>,
}

impl CommittedBefore {
    /// The snapshot of these parts ([`Self::parts`]); `None` when they do not make one.
    pub fn new(xmin: i64, xmax: i64, mut running: Vec<i64>) -> Option<Self> {
        running.sort_unstable();
        running.dedup();
        let inside = running.iter().all(|xid| (xmin..xmax).contains(xid));
        (xmin <= xmax && inside).then_some(Self {
            xmin,
            xmax,
            running,
        })
    }

    /// `xmin`, `xmax` and the transactions running between them.
    pub fn parts(&self) -> (i64, i64, &[i64]) {
        (self.xmin, self.xmax, &self.running)
    }

    /// Whether transaction `xid` had committed (or ended) at that moment.
    pub fn contains(&self, xid: i64) -> bool {
        xid < self.xmin || (xid < self.xmax && self.running.binary_search(&xid).is_err())
    }

    /// Whether an entry at or after `position` may still be one of them.
    pub fn may_follow(&self, position: LogPosition) -> bool {
        position.xid < self.xmax
    }
}

/// Where the change log stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeLogPosition {
    /// Last entry that can be read: every entry up to it is committed, and no entry at or
    /// before it can still commit. The zero position before the first change.
    pub head: LogPosition,
    /// Last entry deleted by retention; a cursor below it is out of range.
    pub pruned_through: LogPosition,
}

/// Changes read from the log, and how far the read looked.
#[derive(Debug, Clone, Default)]
pub struct ChangeBatch {
    /// Matching changes in log order.
    pub changes: Vec<product_changes::Model>,
    /// Every change up to this position has been looked at (including ones the product type
    /// filter skipped).
    pub scanned_through: LogPosition,
}

impl Store {
    /// The head and the pruned-through mark of the change log.
    ///
    /// On PostgreSQL, writers commit in parallel, so an entry with a lower `(xid, seq)` can
    /// commit after one with a higher. The head therefore only counts entries whose
    /// transaction id is below the oldest transaction still running
    /// (`pg_snapshot_xmin(pg_current_snapshot())`): every such transaction has ended, and any
    /// transaction that has not yet ended has a higher id, so its entries will sort after
    /// the head. Reading up to the head in `(xid, seq)` order therefore misses nothing and
    /// repeats nothing, without a lock that would make writers commit one at a time. (A
    /// long-running transaction elsewhere on the server holds the watermark back: watchers
    /// then lag, they never skip.)
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails.
    pub async fn change_log_position(&self) -> Result<ChangeLogPosition, ServiceError> {
        let last = |column: &str| {
            format!(
                "(SELECT {column} FROM product_changes WHERE xid < {} \
                 ORDER BY xid DESC, seq DESC LIMIT 1)",
                self.watermark()
            )
        };
        let row = self
            .db
            .query_one_raw(Statement::from_string(
                self.db.get_database_backend(),
                format!(
                    "SELECT {} AS head_xid, {} AS head_seq, pruned_xid, pruned_through \
                     FROM change_log_state WHERE id = 1",
                    last("xid"),
                    last("seq")
                ),
            ))
            .await
            .map_err(|e| db_error(e, "read change log position"))?
            .ok_or_else(|| {
                ServiceError::Internal(anyhow::anyhow!("change_log_state has no row"))
            })?;
        let get = |column: &str| -> Result<Option<i64>, ServiceError> {
            row.try_get("", column)
                .map_err(|e| db_error(e, "read change log position"))
        };
        let head = LogPosition {
            xid: get("head_xid")?.unwrap_or(0),
            seq: get("head_seq")?.unwrap_or(0),
        };
        let pruned_through = LogPosition {
            xid: get("pruned_xid")?.unwrap_or(0),
            seq: get("pruned_through")?.unwrap_or(0),
        };
        Ok(ChangeLogPosition {
            head: Ord::max(head, pruned_through),
            pruned_through,
        })
    }

    /// Where a watch "from now" starts, and the entries after it that it must leave out
    /// because they committed before now.
    ///
    /// The head lags commits (see [`Self::change_log_position`]), and a transaction with a
    /// lower id may still commit after now: starting at the head would repeat changes that
    /// committed before the call, starting at the highest committed entry would skip ones
    /// that commit after. So on PostgreSQL the start is the current snapshot's `xmin` and
    /// the snapshot itself says which entries after it were already committed.
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails.
    pub async fn now_position(
        &self,
    ) -> Result<(LogPosition, Option<CommittedBefore>), ServiceError> {
        let log = self.change_log_position().await?;
        if self.backend == Backend::Sqlite {
            return Ok((log.head, None));
        }
        use sea_orm::sqlx::Row as _;
        let unavailable = |e| {
            db_error(
                DbErr::Query(RuntimeErr::SqlxError(std::sync::Arc::new(e))),
                "read the current snapshot",
            )
        };
        let row = sea_orm::sqlx::query(SNAPSHOT)
            .fetch_one(self.db.get_postgres_connection_pool())
            .await
            .map_err(unavailable)?;
        let before = CommittedBefore::new(
            row.try_get(0).map_err(unavailable)?,
            row.try_get(1).map_err(unavailable)?,
            row.try_get(2).map_err(unavailable)?,
        )
        .ok_or_else(|| ServiceError::Internal(anyhow::anyhow!("an inconsistent snapshot")))?;
        let start = LogPosition {
            xid: before.xmin,
            seq: 0,
        };
        Ok((Ord::max(start, log.pruned_through), Some(before)))
    }

    /// The SQL of the commit-order watermark: entries with a lower `xid` can be read.
    fn watermark(&self) -> &'static str {
        match self.backend {
            Backend::Postgres => "pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
            // One writer at a time: every committed entry can be read.
            Backend::Sqlite => "9223372036854775807",
        }
    }

    /// Changes after `after` up to `through`, of `product_type` if given, at most `limit`.
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails.
    pub async fn read_changes(
        &self,
        after: LogPosition,
        through: LogPosition,
        product_type: Option<&str>,
        limit: u64,
    ) -> Result<ChangeBatch, ServiceError> {
        use product_changes::Column as C;
        let mut query =
            product_changes::Entity::find().filter(between(self.backend, after, through));
        if let Some(product_type) = product_type {
            query = query.filter(C::ProductType.eq(product_type));
        }
        let changes = query
            .order_by_asc(C::Xid)
            .order_by_asc(C::Seq)
            .limit(limit)
            .all(&self.db)
            .await
            .map_err(|e| db_error(e, "read change log"))?;
        let scanned_through = if (changes.len() as u64) < limit {
            through
        } else {
            changes.last().map_or(through, LogPosition::of)
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
        let mut followed = None;
        loop {
            match self.invalidate_changed(followed).await {
                Ok(next) => followed = Some(next),
                Err(error) => {
                    tracing::warn!(%error, "cannot follow the change log; emptying the read cache");
                    self.cache.clear();
                    followed = None;
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(interval) => {}
            }
        }
    }
    async fn invalidate_changed(
        &self,
        followed: Option<Followed>,
    ) -> Result<Followed, ServiceError> {
        let log = self.change_log_position().await?;
        let Some(Followed {
            head: mut position,
            seen,
        }) = followed.filter(|f| f.head >= log.pruned_through)
        else {
            self.cache.clear();
            let seen = self.invalidate_committed_above(log.head, None).await?;
            return Ok(Followed {
                head: log.head,
                seen,
            });
        };
        while position < log.head {
            let Some(last) = self.invalidate_between(position, log.head).await? else {
                break;
            };
            position = last;
        }
        let seen = self.invalidate_committed_above(log.head, seen).await?;
        Ok(Followed {
            head: log.head,
            seen,
        })
    }

    /// PostgreSQL: invalidates the entries above `head` (the watermark) whose transactions
    /// have committed since the snapshot `seen` of the last poll, and returns this poll's
    /// snapshot. A long-running transaction elsewhere on the server holds the watermark back;
    /// this way it does not hold back other replicas' writes reaching this cache. Each such
    /// entry is invalidated here once, and again when the watermark passes it.
    async fn invalidate_committed_above(
        &self,
        head: LogPosition,
        seen: Option<CommittedBefore>,
    ) -> Result<Option<CommittedBefore>, ServiceError> {
        use sea_orm::sqlx::Row as _;
        if self.backend != Backend::Postgres {
            return Ok(None);
        }
        let failed = |e| {
            db_error(
                DbErr::Query(RuntimeErr::SqlxError(std::sync::Arc::new(e))),
                "read committed changes above the watermark",
            )
        };
        let mut txn = self
            .db
            .get_postgres_connection_pool()
            .begin()
            .await
            .map_err(failed)?;
        // One snapshot for every statement: what this poll saw committed is exactly what the
        // next poll leaves out.
        sea_orm::sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *txn)
            .await
            .map_err(failed)?;
        let row = sea_orm::sqlx::query(SNAPSHOT)
            .fetch_one(&mut *txn)
            .await
            .map_err(failed)?;
        let now = CommittedBefore::new(
            row.try_get(0).map_err(failed)?,
            row.try_get(1).map_err(failed)?,
            row.try_get(2).map_err(failed)?,
        )
        .ok_or_else(|| ServiceError::Internal(anyhow::anyhow!("an inconsistent snapshot")))?;
        // Transactions the last poll did not see committed: those running then, and those
        // from its xmax on (every one, the first time).
        let (running, from) = match &seen {
            Some(seen) => {
                let (_, xmax, running) = seen.parts();
                (running.to_vec(), xmax)
            }
            None => (Vec::new(), 0),
        };
        let mut after = Ord::max(head, LogPosition { xid: from, seq: 0 });
        let mut codes: Vec<(String, i64)> = sea_orm::sqlx::query_as(
            "SELECT code, xid FROM product_changes \
             WHERE xid = ANY($1) AND (xid, seq) > ($2, $3)",
        )
        .bind(&running)
        .bind(head.xid)
        .bind(head.seq)
        .fetch_all(&mut *txn)
        .await
        .map_err(failed)?;
        loop {
            let rows: Vec<(String, i64, i64)> = sea_orm::sqlx::query_as(
                "SELECT code, xid, seq FROM product_changes WHERE (xid, seq) > ($1, $2) \
                 ORDER BY xid, seq LIMIT $3",
            )
            .bind(after.xid)
            .bind(after.seq)
            .bind(FOLLOW_BATCH as i64)
            .fetch_all(&mut *txn)
            .await
            .map_err(failed)?;
            let full = rows.len() as u64 == FOLLOW_BATCH;
            if let Some((_, xid, seq)) = rows.last() {
                after = LogPosition {
                    xid: *xid,
                    seq: *seq,
                };
            }
            codes.extend(rows.into_iter().map(|(code, xid, _)| (code, xid)));
            if !full {
                break;
            }
        }
        txn.commit().await.map_err(failed)?;
        self.cache
            .invalidate_changed(codes.iter().map(|(code, xid)| (code.as_str(), *xid)));
        Ok(Some(now))
    }

    /// Invalidates the products of one batch of entries after `after` up to `through`; the
    /// position of the last, `None` when there was none.
    async fn invalidate_between(
        &self,
        after: LogPosition,
        through: LogPosition,
    ) -> Result<Option<LogPosition>, ServiceError> {
        use product_changes::Column as C;
        let rows: Vec<(i64, i64, String)> = product_changes::Entity::find()
            .select_only()
            .columns([C::Xid, C::Seq, C::Code])
            .filter(between(self.backend, after, through))
            .order_by_asc(C::Xid)
            .order_by_asc(C::Seq)
            .limit(FOLLOW_BATCH)
            .into_tuple()
            .all(&self.db)
            .await
            .map_err(|e| db_error(e, "read changed codes"))?;
        self.cache
            .invalidate_changed(rows.iter().map(|(xid, _, code)| (code.as_str(), *xid)));
        Ok(rows.last().map(|(xid, seq, _)| LogPosition {
            xid: *xid,
            seq: *seq,
        }))
    }

    /// The commit time of the oldest retained change, in microseconds since the epoch.
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails.
    pub async fn oldest_change_time(&self) -> Result<Option<i64>, ServiceError> {
        Ok(product_changes::Entity::find()
            .order_by_asc(product_changes::Column::Xid)
            .order_by_asc(product_changes::Column::Seq)
            .one(&self.db)
            .await
            .map_err(|e| db_error(e, "read oldest change"))?
            .map(|c| c.commit_time))
    }

    /// Deletes changes committed before `cutoff` (microseconds since the epoch), at most
    /// `batch` per transaction so writers are never held up long, in log order up to the
    /// first change that is not old enough, and advances the pruned-through mark. Returns how
    /// many were deleted.
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails.
    pub async fn prune_changes(&self, cutoff: i64, batch: u64) -> Result<u64, ServiceError> {
        use product_changes::Column as C;
        let mut deleted = 0;
        loop {
            let log = self.change_log_position().await?;
            let oldest: Vec<(i64, i64, i64)> = product_changes::Entity::find()
                .select_only()
                .columns([C::Xid, C::Seq, C::CommitTime])
                .filter(between(self.backend, log.pruned_through, log.head))
                .order_by_asc(C::Xid)
                .order_by_asc(C::Seq)
                .limit(batch)
                .into_tuple()
                .all(&self.db)
                .await
                .map_err(|e| db_error(e, "find expired changes"))?;
            let Some(through) = oldest
                .iter()
                .take_while(|(_, _, commit_time)| *commit_time < cutoff)
                .last()
                .map(|(xid, seq, _)| LogPosition {
                    xid: *xid,
                    seq: *seq,
                })
            else {
                return Ok(deleted);
            };
            let write = self
                .begin_write()
                .await
                .map_err(|e| db_error(e, "prune change log"))?;
            let removed = product_changes::Entity::delete_many()
                .filter(between(self.backend, LogPosition::default(), through))
                .exec(&write.txn)
                .await
                .map_err(|e| db_error(e, "prune change log"))?
                .rows_affected;
            write
                .txn
                .execute(
                    Query::update()
                        .table(change_log_state::Entity)
                        .value(change_log_state::Column::PrunedXid, through.xid)
                        .value(change_log_state::Column::PrunedThrough, through.seq)
                        .and_where(Expr::col(change_log_state::Column::Id).eq(1))
                        .and_where(
                            Expr::tuple([
                                Expr::col(change_log_state::Column::PrunedXid),
                                Expr::col(change_log_state::Column::PrunedThrough),
                            ])
                            .lt(position(through)),
                        ),
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

/// Entries after `after` up to and including `through`, in `(xid, seq)` order.
///
/// On PostgreSQL the row comparison scans the `(xid, seq)` index as one range. SQLite turns a
/// row comparison into a range on its first column only, and `xid` is 0 in every row there,
/// so it read the whole log on every call (15 ms a watch read with 230,000 entries): there it
/// is `xid = 0` and bounds on `seq`, exactly the same entries given `xid` = 0. (`xid = 0`
/// stays: with `seq` alone SQLite ranges over the rowid and sorts the whole range for the
/// `ORDER BY xid, seq`; with it, the `(xid, seq)` index gives range and order.)
fn between(backend: Backend, after: LogPosition, through: LogPosition) -> SimpleExpr {
    use std::cmp::Ordering;

    use product_changes::Column as C;
    if backend == Backend::Sqlite {
        // `(0, seq) > (xid, s)`: every entry when xid < 0, none when xid > 0; `seq` ≥ 1.
        let lower = match after.xid.cmp(&0) {
            Ordering::Less => i64::MIN,
            Ordering::Equal => after.seq,
            Ordering::Greater => i64::MAX,
        };
        let upper = match through.xid.cmp(&0) {
            Ordering::Less => i64::MIN,
            Ordering::Equal => through.seq,
            Ordering::Greater => i64::MAX,
        };
        return C::Xid.eq(0).and(C::Seq.gt(lower)).and(C::Seq.lte(upper));
    }
    let entry = || Expr::tuple([Expr::col(C::Xid), Expr::col(C::Seq)]);
    entry()
        .gt(position(after))
        .and(entry().lte(position(through)))
}

/// `position` as a row value, to compare with `(xid, seq)`.
fn position(position: LogPosition) -> SimpleExpr {
    Expr::tuple([Expr::val(position.xid), Expr::val(position.seq)])
}

#[cfg(test)]
mod tests {
    use sea_orm::{EntityTrait as _, QueryFilter as _, QueryTrait as _};

    use super::*;

    fn sqlite_where(after: (i64, i64), through: (i64, i64)) -> String {
        let at = |(xid, seq)| LogPosition { xid, seq };
        product_changes::Entity::find()
            .filter(between(Backend::Sqlite, at(after), at(through)))
            .build(sea_orm::DbBackend::Sqlite)
            .to_string()
            .split_once(" WHERE ")
            .expect("a WHERE clause")
            .1
            .to_owned()
    }

    #[test]
    fn on_sqlite_the_bounds_are_on_seq_and_mean_the_same_entries_as_the_row_comparison() {
        // Every entry there is (0, seq), seq ≥ 1.
        assert_eq!(
            sqlite_where((0, 7), (0, 20)),
            r#""product_changes"."xid" = 0 AND "product_changes"."seq" > 7 AND "product_changes"."seq" <= 20"#
        );
        // Positions of another xid (a forged cursor): all entries after (-1, _), none
        // after (1, _); all up to (1, _), none up to (-1, _).
        assert_eq!(
            sqlite_where((-1, 7), (1, 0)),
            format!(
                r#""product_changes"."xid" = 0 AND "product_changes"."seq" > {} AND "product_changes"."seq" <= {}"#,
                i64::MIN,
                i64::MAX
            )
        );
        assert_eq!(
            sqlite_where((1, 0), (-1, 0)),
            format!(
                r#""product_changes"."xid" = 0 AND "product_changes"."seq" > {} AND "product_changes"."seq" <= {}"#,
                i64::MAX,
                i64::MIN
            )
        );
    }
}
