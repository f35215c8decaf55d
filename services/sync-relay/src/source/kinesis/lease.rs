//! Shard leases and checkpoints in the relay's database (table `kinesis_shards`).
//!
//! One row per shard of a stream. A replica may read a shard only while it holds the row's
//! lease: `lease_owner` is its replica id and `lease_expires_ms` lies ahead. Every write is a
//! conditional `UPDATE` whose row count says whether it won, so no step needs a lock or a
//! transaction across replicas:
//!
//! - **take**: `SET owner = me, counter = counter + 1 WHERE counter = <seen> AND (owner IS NULL
//!   OR expires <= now)`; **steal** is the same with `owner = <victim>` instead of the expiry.
//!   Two replicas racing for one shard cannot both match: the first bumps the counter.
//! - **renew**: `SET expires = now + duration WHERE owner = me`, every renew interval.
//! - **checkpoint** (after the sink accepted a batch), **finish** (closed shard read to its
//!   end) and **lag**: `WHERE owner = me AND counter = <mine> AND epoch = <mine>`. The counter is
//!   a fencing token: a replica whose lease was taken over (it stalled past the expiry) cannot
//!   move the checkpoint any more, and learns so from the zero row count.
//! - **replay**: `SET checkpoint = NULL, replay_from_ms = t, finished = false, epoch = epoch + 1`
//!   on the chosen shards and their descendants. The new epoch fences the current reader off; the
//!   owner notices it at its next renewal and restarts the reader AT_TIMESTAMP.
//! - **release** (shutdown): `SET owner = NULL WHERE owner = me`, so another replica takes over
//!   at once instead of after the lease duration.
//!
//! Times are Unix milliseconds from the replicas' clocks, which must agree to well within the
//! lease duration (NTP does far better).

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait as _, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait as _,
    QueryFilter as _, QueryOrder as _, TransactionTrait as _,
    sea_query::{Expr, ExprTrait as _},
};

/// The `kinesis_shards` table.
pub(crate) mod entity {
    use sea_orm::entity::prelude::*;

    /// One shard of one stream.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "kinesis_shards")]
    pub struct Model {
        /// Kinesis stream name.
        #[sea_orm(primary_key, auto_increment = false)]
        pub stream_name: String,
        /// Kinesis shard id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub shard_id: String,
        /// The shard this one was split from or merged from; read to its end first.
        pub parent_shard_id: Option<String>,
        /// The second parent of a merged shard; read to its end first as well.
        pub adjacent_parent_shard_id: Option<String>,
        /// Last sequence number the sink accepted; reading resumes after it.
        pub checkpoint_sequence_number: Option<String>,
        /// Closed by a reshard and read to its end.
        pub finished: bool,
        /// Read from this time (Unix ms) when there is no checkpoint: a pending replay.
        pub replay_from_ms: Option<i64>,
        /// Raised by every replay, fencing off a reader that started before it.
        pub epoch: i64,
        /// Replica holding the lease, if any.
        pub lease_owner: Option<String>,
        /// When the lease ends unless renewed (Unix ms).
        pub lease_expires_ms: Option<i64>,
        /// Raised by every take, the lease's fencing token.
        pub lease_counter: i64,
        /// MillisBehindLatest of the owner's last GetRecords.
        pub lag_millis: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

use entity::{ActiveModel, Column, Entity, Model};

/// What a replica holds of one shard, and what its writes must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaseToken {
    pub(crate) stream: String,
    pub(crate) shard_id: String,
    pub(crate) owner: String,
    pub(crate) counter: i64,
    pub(crate) epoch: i64,
}

/// A shard as listed by Kinesis: its id and its parents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ListedShard {
    pub(crate) shard_id: String,
    pub(crate) parent_shard_id: Option<String>,
    pub(crate) adjacent_parent_shard_id: Option<String>,
}

/// Reading state of a shard, as the admin API shows it (`mall.sync.v1.ShardState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardState {
    /// Being read, or ready for the next lease owner.
    Reading,
    /// Closed by a reshard and read to its end.
    Finished,
    /// A child shard waiting until its parents are finished, to keep per-product order.
    WaitingForParent,
}

impl From<ShardState> for mall_proto::sync::v1::ShardState {
    fn from(state: ShardState) -> Self {
        match state {
            ShardState::Reading => Self::Reading,
            ShardState::Finished => Self::Finished,
            ShardState::WaitingForParent => Self::WaitingForParent,
        }
    }
}

/// Read progress of one shard, for `GetRelayStatus`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    /// Kinesis shard id.
    pub shard_id: String,
    /// Sequence number of the last record the sink accepted; `None` before the first.
    pub checkpoint: Option<String>,
    /// How far the reader is behind the newest record of the shard (Kinesis
    /// MillisBehindLatest of its last read); 0 when caught up or not being read.
    pub lag_millis: i64,
    /// Replica holding the lease; `None` when unleased (or the lease expired).
    pub lease_owner: Option<String>,
    /// When the lease expires unless renewed; `None` when unleased.
    pub lease_expire_time: Option<DateTime<Utc>>,
    /// Reading state.
    pub state: ShardState,
}

/// Why [`replay_from`] refused.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Some requested shards are not shards of the stream (maps to NOT_FOUND).
    #[error("unknown shards of stream {stream}: {}", shard_ids.join(", "))]
    UnknownShards {
        /// The stream.
        stream: String,
        /// The ids that are not known.
        shard_ids: Vec<String>,
    },
    /// The start time lies in the future (maps to INVALID_ARGUMENT).
    #[error("replay start time {0} is in the future")]
    StartInFuture(DateTime<Utc>),
    /// The database failed (maps to UNAVAILABLE or INTERNAL).
    #[error("failed to reset kinesis checkpoints")]
    Database(#[from] DbErr),
}

/// The current time as Unix milliseconds, the unit of every time in the table.
pub(crate) fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn millis(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Whether `row` is leased to anyone at `now`.
pub(crate) fn is_leased(row: &Model, now: i64) -> bool {
    row.lease_owner.is_some() && row.lease_expires_ms.is_some_and(|expires| expires > now)
}

/// Whether every parent of `row` is finished or gone (aged out of the stream: its rows are
/// pruned once Kinesis no longer lists it, so nothing of it is left to read).
pub(crate) fn parents_finished(row: &Model, by_id: &HashMap<&str, &Model>) -> bool {
    [&row.parent_shard_id, &row.adjacent_parent_shard_id]
        .into_iter()
        .flatten()
        .all(|parent| by_id.get(parent.as_str()).is_none_or(|p| p.finished))
}

/// Every shard row of `stream`, ordered by shard id.
///
/// # Errors
/// When the database fails.
#[tracing::instrument(skip_all, fields(%stream))]
pub(crate) async fn load(db: &impl ConnectionTrait, stream: &str) -> Result<Vec<Model>, DbErr> {
    Entity::find()
        .filter(Column::StreamName.eq(stream))
        .order_by_asc(Column::ShardId)
        .all(db)
        .await
}

/// Records the shards Kinesis lists: inserts new ones (without checkpoint or lease) and
/// deletes rows of shards it no longer lists (closed shards whose records aged out).
/// Returns how many shards were new.
///
/// # Errors
/// When the database fails.
#[tracing::instrument(skip_all, fields(%stream, listed = listed.len()))]
pub(crate) async fn sync_shards(
    db: &DatabaseConnection,
    stream: &str,
    listed: &[ListedShard],
) -> Result<usize, DbErr> {
    if listed.is_empty() {
        // A stream always has an open shard; an empty listing is not a reason to forget rows.
        return Ok(0);
    }
    let txn = db.begin().await?;
    let known: BTreeSet<String> = load(&txn, stream)
        .await?
        .into_iter()
        .map(|row| row.shard_id)
        .collect();
    let new: Vec<ActiveModel> = listed
        .iter()
        .filter(|shard| !known.contains(&shard.shard_id))
        .map(|shard| ActiveModel {
            stream_name: sea_orm::Set(stream.to_owned()),
            shard_id: sea_orm::Set(shard.shard_id.clone()),
            parent_shard_id: sea_orm::Set(shard.parent_shard_id.clone()),
            adjacent_parent_shard_id: sea_orm::Set(shard.adjacent_parent_shard_id.clone()),
            checkpoint_sequence_number: sea_orm::Set(None),
            finished: sea_orm::Set(false),
            replay_from_ms: sea_orm::Set(None),
            epoch: sea_orm::Set(0),
            lease_owner: sea_orm::Set(None),
            lease_expires_ms: sea_orm::Set(None),
            lease_counter: sea_orm::Set(0),
            lag_millis: sea_orm::Set(0),
        })
        .collect();
    let added = new.len();
    if !new.is_empty() {
        // Another replica may insert the same shards at the same moment: theirs win, equal anyway.
        Entity::insert_many(new)
            .on_conflict_do_nothing()
            .exec_without_returning(&txn)
            .await?;
    }
    let listed_ids: Vec<&str> = listed.iter().map(|s| s.shard_id.as_str()).collect();
    let gone: Vec<&String> = known
        .iter()
        .filter(|id| !listed_ids.contains(&id.as_str()))
        .collect();
    if !gone.is_empty() {
        tracing::info!(
            count = gone.len(),
            "forgetting shards kinesis no longer lists"
        );
        Entity::delete_many()
            .filter(Column::StreamName.eq(stream))
            .filter(Column::ShardId.is_in(gone))
            .exec(&txn)
            .await?;
    }
    txn.commit().await?;
    Ok(added)
}

/// Takes the lease of `row` if it is still as seen: unleased or expired (or, when `steal`,
/// still held by the same owner). Returns the token on success, `None` when another replica
/// was quicker.
///
/// # Errors
/// When the database fails.
#[tracing::instrument(skip_all, fields(shard_id = %row.shard_id, steal = steal))]
pub(crate) async fn take(
    db: &DatabaseConnection,
    row: &Model,
    owner: &str,
    duration: std::time::Duration,
    steal: bool,
) -> Result<Option<LeaseToken>, DbErr> {
    let now = now_ms();
    let mut update = Entity::update_many()
        .col_expr(Column::LeaseOwner, Expr::value(owner))
        .col_expr(
            Column::LeaseExpiresMs,
            Expr::value(now.saturating_add(millis(duration))),
        )
        .col_expr(Column::LeaseCounter, Expr::col(Column::LeaseCounter).add(1))
        .col_expr(Column::LagMillis, Expr::value(0i64))
        .filter(Column::StreamName.eq(&row.stream_name))
        .filter(Column::ShardId.eq(&row.shard_id))
        .filter(Column::Finished.eq(false))
        .filter(Column::LeaseCounter.eq(row.lease_counter));
    update = match (&row.lease_owner, steal) {
        (Some(victim), true) => update.filter(Column::LeaseOwner.eq(victim)),
        _ => update.filter(
            // Expired at `expires` itself, as `is_leased` sees it.
            Column::LeaseOwner
                .is_null()
                .or(Column::LeaseExpiresMs.lte(now))
                .or(Column::LeaseExpiresMs.is_null()),
        ),
    };
    let won = update.exec(db).await?.rows_affected == 1;
    Ok(won.then(|| LeaseToken {
        stream: row.stream_name.clone(),
        shard_id: row.shard_id.clone(),
        owner: owner.to_owned(),
        counter: row.lease_counter + 1,
        epoch: row.epoch,
    }))
}

/// Extends every lease `owner` holds on `stream`, except those of shards in `except` (their
/// readers are stuck), by `duration` from now; returns how many.
///
/// # Errors
/// When the database fails.
#[tracing::instrument(skip_all, fields(%stream))]
pub(crate) async fn renew(
    db: &DatabaseConnection,
    stream: &str,
    owner: &str,
    duration: std::time::Duration,
    except: &[String],
) -> Result<u64, DbErr> {
    let expires = now_ms().saturating_add(millis(duration));
    let mut update = Entity::update_many()
        .col_expr(Column::LeaseExpiresMs, Expr::value(expires))
        .filter(Column::StreamName.eq(stream))
        .filter(Column::LeaseOwner.eq(owner));
    if !except.is_empty() {
        update = update.filter(Column::ShardId.is_not_in(except.iter().map(String::as_str)));
    }
    Ok(update.exec(db).await?.rows_affected)
}

/// Gives up every lease `owner` holds on `stream`, so another replica takes over at once.
///
/// # Errors
/// When the database fails.
#[tracing::instrument(skip_all, fields(%stream))]
pub(crate) async fn release_all(
    db: &DatabaseConnection,
    stream: &str,
    owner: &str,
) -> Result<u64, DbErr> {
    Ok(Entity::update_many()
        .col_expr(Column::LeaseOwner, Expr::value(Option::<String>::None))
        .col_expr(Column::LeaseExpiresMs, Expr::value(Option::<i64>::None))
        .col_expr(Column::LagMillis, Expr::value(0i64))
        .filter(Column::StreamName.eq(stream))
        .filter(Column::LeaseOwner.eq(owner))
        .exec(db)
        .await?
        .rows_affected)
}

/// Gives up one lease, if still held under `token`.
///
/// # Errors
/// When the database fails.
#[tracing::instrument(skip_all, fields(shard_id = %token.shard_id))]
pub(crate) async fn release(db: &DatabaseConnection, token: &LeaseToken) -> Result<bool, DbErr> {
    let update = Entity::update_many()
        .col_expr(Column::LeaseOwner, Expr::value(Option::<String>::None))
        .col_expr(Column::LeaseExpiresMs, Expr::value(Option::<i64>::None))
        .col_expr(Column::LagMillis, Expr::value(0i64));
    Ok(guarded(update, token).exec(db).await?.rows_affected == 1)
}

/// Moves the checkpoint to `sequence_number` (and records `lag_millis`), if the lease is still
/// held under `token`. Returns `false` when it is not: the lease was taken over or a replay
/// reset the shard, and this reader must stop.
///
/// # Errors
/// When the database fails.
#[tracing::instrument(skip_all, fields(shard_id = %token.shard_id))]
pub(crate) async fn checkpoint(
    db: &DatabaseConnection,
    token: &LeaseToken,
    sequence_number: &str,
    lag_millis: i64,
) -> Result<bool, DbErr> {
    let update = Entity::update_many()
        .col_expr(
            Column::CheckpointSequenceNumber,
            Expr::value(sequence_number),
        )
        .col_expr(Column::ReplayFromMs, Expr::value(Option::<i64>::None))
        .col_expr(Column::LagMillis, Expr::value(lag_millis));
    Ok(guarded(update, token).exec(db).await?.rows_affected == 1)
}

/// Records the reader's lag without moving the checkpoint; `false` when the lease is gone.
///
/// # Errors
/// When the database fails.
pub(crate) async fn record_lag(
    db: &DatabaseConnection,
    token: &LeaseToken,
    lag_millis: i64,
) -> Result<bool, DbErr> {
    let update = Entity::update_many().col_expr(Column::LagMillis, Expr::value(lag_millis));
    Ok(guarded(update, token).exec(db).await?.rows_affected == 1)
}

/// Marks a closed shard read to its end and gives up its lease, so its children can be read;
/// `false` when the lease is gone.
///
/// # Errors
/// When the database fails.
#[tracing::instrument(skip_all, fields(shard_id = %token.shard_id))]
pub(crate) async fn finish(db: &DatabaseConnection, token: &LeaseToken) -> Result<bool, DbErr> {
    let update = Entity::update_many()
        .col_expr(Column::Finished, Expr::value(true))
        .col_expr(Column::LeaseOwner, Expr::value(Option::<String>::None))
        .col_expr(Column::LeaseExpiresMs, Expr::value(Option::<i64>::None))
        .col_expr(Column::LagMillis, Expr::value(0i64));
    Ok(guarded(update, token).exec(db).await?.rows_affected == 1)
}

/// Restricts `update` to the row of `token`, while the lease and epoch are still the token's.
fn guarded(update: sea_orm::UpdateMany<Entity>, token: &LeaseToken) -> sea_orm::UpdateMany<Entity> {
    update
        .filter(Column::StreamName.eq(&token.stream))
        .filter(Column::ShardId.eq(&token.shard_id))
        .filter(Column::LeaseOwner.eq(&token.owner))
        .filter(Column::LeaseCounter.eq(token.counter))
        .filter(Column::Epoch.eq(token.epoch))
}

/// Read progress of every shard of `stream`, ordered by shard id. Answers from the database,
/// so any replica gives the same answer.
///
/// # Errors
/// When the database fails.
#[tracing::instrument(skip_all, fields(%stream))]
pub async fn status(db: &DatabaseConnection, stream: &str) -> Result<Vec<ShardInfo>, DbErr> {
    let rows = load(db, stream).await?;
    let now = now_ms();
    let by_id: HashMap<&str, &Model> = rows.iter().map(|r| (r.shard_id.as_str(), r)).collect();
    Ok(rows
        .iter()
        .map(|row| {
            let leased = is_leased(row, now);
            let state = if row.finished {
                ShardState::Finished
            } else if parents_finished(row, &by_id) {
                ShardState::Reading
            } else {
                ShardState::WaitingForParent
            };
            ShardInfo {
                shard_id: row.shard_id.clone(),
                checkpoint: row.checkpoint_sequence_number.clone(),
                lag_millis: if leased { row.lag_millis } else { 0 },
                lease_owner: row.lease_owner.clone().filter(|_| leased),
                lease_expire_time: row
                    .lease_expires_ms
                    .filter(|_| leased)
                    .and_then(DateTime::from_timestamp_millis),
                state,
            }
        })
        .collect())
}

/// Moves the checkpoints of `shard_ids` (every shard of `stream` when empty) back to
/// `start_time`: their readers restart from the first record that arrived at or after it
/// (AT_TIMESTAMP). Descendants of a chosen shard (children of a split or merge) are reset as
/// well, so a product's older changes in the parent are read again before its newer ones in
/// the children. A reader holding a reset shard notices within the lease renew interval.
/// Returns the ids of the shards reset, sorted.
///
/// # Errors
/// [`ReplayError::UnknownShards`] when an id is not a shard of the stream (nothing is reset
/// then); [`ReplayError::StartInFuture`]; [`ReplayError::Database`].
#[tracing::instrument(skip_all, fields(%stream, %start_time, requested = shard_ids.len()))]
pub async fn replay_from(
    db: &DatabaseConnection,
    stream: &str,
    start_time: DateTime<Utc>,
    shard_ids: &[String],
) -> Result<Vec<String>, ReplayError> {
    if start_time > Utc::now() {
        return Err(ReplayError::StartInFuture(start_time));
    }
    // The transaction reads, then writes: on SQLite a writer that committed in between makes
    // the upgrade fail at once (SQLITE_BUSY, which the busy timeout does not wait out), on
    // PostgreSQL a deadlock or serialization failure can end it. All of these pass when the
    // whole transaction runs again.
    let mut attempt = 0;
    loop {
        attempt += 1;
        match replay_once(db, stream, start_time, shard_ids).await {
            Err(ReplayError::Database(error))
                if attempt < REPLAY_ATTEMPTS && mall_db::is_retryable(&error) =>
            {
                tracing::debug!(%error, attempt, "replay conflicted with another writer; again");
                tokio::time::sleep(std::time::Duration::from_millis(20 * u64::from(attempt))).await;
            }
            other => return other,
        }
    }
}

/// Attempts of a replay's transaction before its conflict is reported.
const REPLAY_ATTEMPTS: u32 = 10;

async fn replay_once(
    db: &DatabaseConnection,
    stream: &str,
    start_time: DateTime<Utc>,
    shard_ids: &[String],
) -> Result<Vec<String>, ReplayError> {
    let txn = db.begin().await?;
    let rows = load(&txn, stream).await?;
    let known: BTreeSet<&str> = rows.iter().map(|r| r.shard_id.as_str()).collect();
    let unknown: Vec<String> = shard_ids
        .iter()
        .filter(|id| !known.contains(id.as_str()))
        .cloned()
        .collect();
    if !unknown.is_empty() {
        return Err(ReplayError::UnknownShards {
            stream: stream.to_owned(),
            shard_ids: unknown,
        });
    }
    let mut chosen: BTreeSet<String> = if shard_ids.is_empty() {
        known.iter().map(|id| (*id).to_owned()).collect()
    } else {
        shard_ids.iter().cloned().collect()
    };
    // Add descendants until nothing changes: a shard whose parent is chosen is chosen too.
    loop {
        let before = chosen.len();
        for row in &rows {
            let parent_chosen = [&row.parent_shard_id, &row.adjacent_parent_shard_id]
                .into_iter()
                .flatten()
                .any(|parent| chosen.contains(parent));
            if parent_chosen {
                chosen.insert(row.shard_id.clone());
            }
        }
        if chosen.len() == before {
            break;
        }
    }
    if !chosen.is_empty() {
        Entity::update_many()
            .col_expr(
                Column::CheckpointSequenceNumber,
                Expr::value(Option::<String>::None),
            )
            .col_expr(
                Column::ReplayFromMs,
                Expr::value(start_time.timestamp_millis()),
            )
            .col_expr(Column::Finished, Expr::value(false))
            .col_expr(Column::Epoch, Expr::col(Column::Epoch).add(1))
            .col_expr(Column::LagMillis, Expr::value(0i64))
            .filter(Column::StreamName.eq(stream))
            .filter(Column::ShardId.is_in(chosen.iter().map(String::as_str)))
            .exec(&txn)
            .await?;
    }
    txn.commit().await?;
    tracing::info!(
        shards = chosen.len(),
        "kinesis checkpoints reset for replay"
    );
    Ok(chosen.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use mall_test_support::{Engine, TestDatabase};

    use super::*;
    use crate::migration::Migrator;

    async fn database(engine: Engine) -> (TestDatabase, DatabaseConnection) {
        let test_db = TestDatabase::new(engine).await;
        let settings = mall_db::DatabaseSettings {
            url: test_db.url().to_owned().into(),
            ..mall_db::DatabaseSettings::default()
        };
        let db = mall_db::connect::<Migrator>(&settings)
            .await
            .expect("database connects and migrates");
        (test_db, db)
    }

    fn shard(id: &str, parents: &[&str]) -> ListedShard {
        ListedShard {
            shard_id: id.to_owned(),
            parent_shard_id: parents.first().map(|p| (*p).to_owned()),
            adjacent_parent_shard_id: parents.get(1).map(|p| (*p).to_owned()),
        }
    }

    async fn row(db: &DatabaseConnection, id: &str) -> Model {
        load(db, "s")
            .await
            .expect("rows load")
            .into_iter()
            .find(|r| r.shard_id == id)
            .expect("the row exists")
    }

    const LEASE: std::time::Duration = std::time::Duration::from_secs(30);

    async fn lease_rules_hold(engine: Engine) {
        let (_guard, db) = database(engine).await;
        let added = sync_shards(&db, "s", &[shard("a", &[]), shard("b", &[])])
            .await
            .expect("shards recorded");
        assert_eq!(added, 2);
        let seen = row(&db, "a").await;

        let mine = take(&db, &seen, "one", LEASE, false)
            .await
            .expect("take runs")
            .expect("an unleased shard is taken");
        assert!(
            take(&db, &seen, "two", LEASE, false)
                .await
                .expect("take runs")
                .is_none(),
            "a second take of the same row state loses the race"
        );
        let now_held = row(&db, "a").await;
        assert!(
            take(&db, &now_held, "two", LEASE, false)
                .await
                .expect("take runs")
                .is_none(),
            "a live lease is not taken without stealing"
        );

        assert!(checkpoint(&db, &mine, "100", 5).await.expect("runs"));
        let stolen = take(&db, &now_held, "two", LEASE, true)
            .await
            .expect("take runs")
            .expect("a steal of the row as seen wins");
        assert!(
            !checkpoint(&db, &mine, "200", 0).await.expect("runs"),
            "the old owner cannot move the checkpoint after losing the lease"
        );
        assert!(checkpoint(&db, &stolen, "150", 0).await.expect("runs"));
        assert_eq!(
            row(&db, "a").await.checkpoint_sequence_number.as_deref(),
            Some("150")
        );

        // Replay fences off the current reader until it reloads its epoch.
        let past = Utc::now() - chrono::Duration::minutes(5);
        let reset = replay_from(&db, "s", past, &["a".to_owned()])
            .await
            .expect("replay runs");
        assert_eq!(reset, vec!["a".to_owned()]);
        assert!(!checkpoint(&db, &stolen, "160", 0).await.expect("runs"));
        let after = row(&db, "a").await;
        assert_eq!(after.checkpoint_sequence_number, None);
        assert_eq!(after.replay_from_ms, Some(past.timestamp_millis()));
        assert_eq!(
            after.lease_owner.as_deref(),
            Some("two"),
            "replay keeps the lease"
        );

        assert_eq!(release_all(&db, "s", "two").await.expect("runs"), 1);
        let released = row(&db, "a").await;
        assert!(!is_leased(&released, now_ms()));
        assert!(
            take(&db, &released, "one", LEASE, false)
                .await
                .expect("take runs")
                .is_some(),
            "a released shard is taken at once"
        );
    }

    #[tokio::test]
    async fn leases_are_exclusive_fenced_and_released_on_sqlite() {
        lease_rules_hold(Engine::Sqlite).await;
    }

    #[tokio::test]
    async fn leases_are_exclusive_fenced_and_released_on_postgres() {
        lease_rules_hold(Engine::Postgres).await;
    }

    /// Replicas racing for one free shard, each from the row as it saw it: exactly one wins.
    async fn only_one_of_racing_replicas_takes_a_lease(engine: Engine) {
        let (_guard, db) = database(engine).await;
        sync_shards(&db, "s", &[shard("a", &[])])
            .await
            .expect("recorded");
        let seen = row(&db, "a").await;
        let racers = (0..8).map(|i| {
            let (db, seen) = (db.clone(), seen.clone());
            tokio::spawn(
                async move { take(&db, &seen, &format!("replica-{i}"), LEASE, false).await },
            )
        });
        let mut winners = Vec::new();
        for racer in racers {
            if let Some(token) = racer.await.expect("no panic").expect("take runs") {
                winners.push(token.owner);
            }
        }
        assert_eq!(winners.len(), 1, "winners: {winners:?}");
        assert_eq!(row(&db, "a").await.lease_owner.as_ref(), winners.first());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_one_of_racing_replicas_takes_a_lease_on_sqlite() {
        only_one_of_racing_replicas_takes_a_lease(Engine::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_one_of_racing_replicas_takes_a_lease_on_postgres() {
        only_one_of_racing_replicas_takes_a_lease(Engine::Postgres).await;
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over() {
        let (_guard, db) = database(Engine::Sqlite).await;
        sync_shards(&db, "s", &[shard("a", &[])])
            .await
            .expect("recorded");
        let seen = row(&db, "a").await;
        take(&db, &seen, "one", std::time::Duration::ZERO, false)
            .await
            .expect("runs")
            .expect("taken");
        let expired = row(&db, "a").await;
        let token = take(&db, &expired, "two", LEASE, false)
            .await
            .expect("runs")
            .expect("an expired lease is free");
        assert_eq!(token.counter, expired.lease_counter + 1);
    }

    #[tokio::test]
    async fn status_shows_children_waiting_for_their_parent() {
        let (_guard, db) = database(Engine::Sqlite).await;
        sync_shards(
            &db,
            "s",
            &[
                shard("p", &[]),
                shard("q", &[]),
                shard("c1", &["p"]),
                shard("m", &["c1", "q"]),
            ],
        )
        .await
        .expect("recorded");
        let state = |infos: &[ShardInfo], id: &str| {
            infos
                .iter()
                .find(|i| i.shard_id == id)
                .map(|i| i.state)
                .expect("listed")
        };
        let infos = status(&db, "s").await.expect("status");
        assert_eq!(state(&infos, "p"), ShardState::Reading);
        assert_eq!(state(&infos, "c1"), ShardState::WaitingForParent);
        assert_eq!(state(&infos, "m"), ShardState::WaitingForParent);

        let token = take(&db, &row(&db, "p").await, "one", LEASE, false)
            .await
            .expect("runs")
            .expect("taken");
        assert!(finish(&db, &token).await.expect("runs"));
        let infos = status(&db, "s").await.expect("status");
        assert_eq!(state(&infos, "p"), ShardState::Finished);
        assert_eq!(state(&infos, "c1"), ShardState::Reading);
        assert_eq!(
            state(&infos, "m"),
            ShardState::WaitingForParent,
            "a merged shard waits for both parents"
        );
    }

    #[tokio::test]
    async fn replay_resets_descendants_and_refuses_unknown_shards() {
        let (_guard, db) = database(Engine::Sqlite).await;
        sync_shards(
            &db,
            "s",
            &[shard("p", &[]), shard("c", &["p"]), shard("x", &[])],
        )
        .await
        .expect("recorded");
        let past = Utc::now() - chrono::Duration::minutes(1);
        let error = replay_from(&db, "s", past, &["p".to_owned(), "nope".to_owned()])
            .await
            .expect_err("unknown shard");
        assert!(
            matches!(&error, ReplayError::UnknownShards { shard_ids, .. } if shard_ids == &["nope".to_owned()]),
            "{error:?}"
        );
        assert_eq!(row(&db, "p").await.epoch, 0, "nothing was reset");

        let reset = replay_from(&db, "s", past, &["p".to_owned()])
            .await
            .expect("replay");
        assert_eq!(reset, vec!["c".to_owned(), "p".to_owned()]);
        let all = replay_from(&db, "s", past, &[]).await.expect("replay");
        assert_eq!(all.len(), 3);
        let future = Utc::now() + chrono::Duration::minutes(1);
        assert!(matches!(
            replay_from(&db, "s", future, &[]).await,
            Err(ReplayError::StartInFuture(_))
        ));
    }

    #[tokio::test]
    async fn shards_no_longer_listed_are_forgotten() {
        let (_guard, db) = database(Engine::Sqlite).await;
        sync_shards(&db, "s", &[shard("old", &[]), shard("new", &["old"])])
            .await
            .expect("recorded");
        let added = sync_shards(&db, "s", &[shard("new", &["old"])])
            .await
            .expect("recorded");
        assert_eq!(added, 0);
        let rows = load(&db, "s").await.expect("rows");
        assert_eq!(rows.len(), 1);
        let by_id: HashMap<&str, &Model> = rows.iter().map(|r| (r.shard_id.as_str(), r)).collect();
        assert!(
            parents_finished(&rows[0], &by_id),
            "a parent that aged out has nothing left to read"
        );
    }
}
