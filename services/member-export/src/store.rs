//! The member table: one row per member holding its newest recorded change (version,
//! consent, times, the profile encrypted by [`crate::crypto`]) and how far it was queued and
//! delivered; and the remembered EnqueueMemberChanges request ids.

use std::collections::{BTreeMap, HashSet};

use mall_db::Backend;
use mall_grpc::ServiceError;
use sea_orm::{
    ColumnTrait as _, ConnectionTrait as _, DatabaseConnection, DatabaseTransaction, DbErr,
    EntityTrait as _, QueryFilter as _, QueryOrder as _, QuerySelect as _, TransactionTrait as _,
    Value,
    sea_query::{Expr, ExprTrait as _, OnConflict},
};

/// `members`: see the module docs. Times are microseconds since the epoch (0: unset).
pub mod members {
    use sea_orm::entity::prelude::*;

    /// A member's row. `profile` is `nonce ‖ AES-256-GCM(encoded MarketingProfile)` under
    /// `key_id`; `queued_version` is the newest version queued for delivery (0: none) and
    /// `delivered_version` the newest the partner accepted (0: never delivered);
    /// `attempted_version` the newest ever sent (recorded before the request). An `erased`
    /// row is a tombstone: no consent, no profile, only the id and the version;
    /// `erase_delivered` says the partner accepted the erasure. `send_owner` holds the member
    /// while one of its requests may be in flight, until `send_until` (0: nobody).
    #[derive(Clone, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "members")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub member_id: String,
        pub version: i64,
        pub consent_email: bool,
        pub consent_sms: bool,
        pub consent_push: bool,
        pub consent_time: i64,
        pub change_time: i64,
        pub profile: Option<Vec<u8>>,
        pub key_id: Option<String>,
        pub queued_version: i64,
        pub delivered_version: i64,
        pub update_time: i64,
        pub erased: bool,
        pub attempted_version: i64,
        pub erase_delivered: bool,
        pub send_owner: i64,
        pub send_until: i64,
    }

    impl std::fmt::Debug for Model {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Member")
                .field("member_id", &self.member_id)
                .field("version", &self.version)
                .field("queued_version", &self.queued_version)
                .field("delivered_version", &self.delivered_version)
                .finish_non_exhaustive()
        }
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `enqueue_requests`: the first response to each request id.
pub mod enqueue_requests {
    use sea_orm::entity::prelude::*;

    /// A remembered request: its encoded EnqueueMemberChangesResponse.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "enqueue_requests")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub request_id: String,
        pub response: Vec<u8>,
        pub create_time: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `failed_deliveries`: deliveries the partner refused for the member's own fault.
pub mod failed_deliveries {
    use sea_orm::entity::prelude::*;

    /// One refusal: which member and version, why (a code, never personal data), when.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "failed_deliveries")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub seq: i64,
        pub member_id: String,
        pub version: i64,
        pub reason: String,
        pub fail_time: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The member table and request ids, on the service's database.
#[derive(Debug, Clone)]
pub struct Store {
    db: DatabaseConnection,
    backend: Backend,
    /// SQLite has one writer: this process's writers take turns here rather than fail with
    /// SQLITE_BUSY when a read transaction needs the write lock.
    write_lock: Option<std::sync::Arc<tokio::sync::Mutex<()>>>,
}

impl Store {
    /// The store on `db`.
    pub fn new(db: DatabaseConnection) -> Self {
        let backend = Backend::of(&db);
        Self {
            write_lock: (backend == Backend::Sqlite)
                .then(|| std::sync::Arc::new(tokio::sync::Mutex::new(()))),
            db,
            backend,
        }
    }

    /// The database.
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// This process's turn to write, on SQLite (one writer); nothing to wait for otherwise.
    /// Every write to this database takes it (the failover jobs' too): with SQLite, a
    /// transaction that read before another connection committed cannot write.
    pub async fn turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.write_lock {
            Some(lock) => Some(lock.lock().await),
            None => None,
        }
    }

    /// A write transaction. On SQLite it takes the write lock when it begins (`BEGIN
    /// IMMEDIATE`, waiting up to the busy timeout): a deferred transaction that read before
    /// another connection (the embedded queue's) committed could not write at all.
    async fn begin_write(&self) -> Result<DatabaseTransaction, ServiceError> {
        self.db
            .begin_with_options(sea_orm::TransactionOptions {
                sqlite_transaction_mode: (self.backend == Backend::Sqlite)
                    .then_some(sea_orm::SqliteTransactionMode::Immediate),
                ..sea_orm::TransactionOptions::default()
            })
            .await
            .map_err(|e| db_error(e, "begin"))
    }

    /// The first response to `request_id`, if it was seen.
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails.
    pub async fn remembered(&self, request_id: &str) -> Result<Option<Vec<u8>>, ServiceError> {
        Ok(enqueue_requests::Entity::find_by_id(request_id.to_owned())
            .one(&self.db)
            .await
            .map_err(|e| db_error(e, "read a request id"))?
            .map(|row| row.response))
    }

    /// Remembers the first response to `request_id` (a concurrent first one wins).
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails.
    pub async fn remember(
        &self,
        request_id: &str,
        response: Vec<u8>,
        now: i64,
    ) -> Result<(), ServiceError> {
        let row = enqueue_requests::ActiveModel {
            request_id: sea_orm::Set(request_id.to_owned()),
            response: sea_orm::Set(response),
            create_time: sea_orm::Set(now),
        };
        enqueue_requests::Entity::insert(row)
            .on_conflict(
                OnConflict::column(enqueue_requests::Column::RequestId)
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(&self.db)
            .await
            .map_err(|e| db_error(e, "remember a request id"))?;
        Ok(())
    }

    /// Runs `decide` on the stored rows of `member_ids` (absent members are not in the map)
    /// in one transaction, with the rows locked on PostgreSQL, and writes back the rows it
    /// returns. A row is written only where its stored version is not newer, so a
    /// concurrent writer of a newer version always wins.
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails; `decide`'s error.
    pub async fn update<T>(
        &self,
        member_ids: &[&str],
        decide: impl FnOnce(
            BTreeMap<String, members::Model>,
        ) -> Result<(Vec<members::Model>, T), ServiceError>,
    ) -> Result<T, ServiceError> {
        let _turn = self.turn().await;
        let txn = self.begin_write().await?;
        let stored = read_locked(&txn, self.backend, member_ids).await?;
        let (rows, result) = decide(stored)?;
        for row in rows {
            write(&txn, self.backend, row).await?;
        }
        txn.commit()
            .await
            .map_err(|e| db_error(e, "commit member changes"))?;
        Ok(result)
    }
}

async fn read_locked(
    txn: &DatabaseTransaction,
    backend: Backend,
    member_ids: &[&str],
) -> Result<BTreeMap<String, members::Model>, ServiceError> {
    let mut ids: Vec<&str> = member_ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut query = members::Entity::find()
        .filter(members::Column::MemberId.is_in(ids))
        .order_by_asc(members::Column::MemberId);
    if backend == Backend::Postgres {
        // Locked in member id order, so two requests cannot deadlock on each other.
        query = query.lock_exclusive();
    }
    Ok(query
        .all(txn)
        .await
        .map_err(|e| db_error(e, "read members"))?
        .into_iter()
        .map(|row| (row.member_id.clone(), row))
        .collect())
}

async fn write(
    txn: &DatabaseTransaction,
    backend: Backend,
    row: members::Model,
) -> Result<(), ServiceError> {
    use members::Column as C;
    let version = row.version;
    let active: members::ActiveModel = row.into();
    // A new member is not locked while a request decides (there is no row yet): of two
    // requests creating it at once, the later write must not lower what the earlier queued.
    let greatest = match backend {
        Backend::Postgres => "GREATEST",
        Backend::Sqlite => "MAX",
    };
    members::Entity::insert(active)
        .on_conflict(
            OnConflict::column(C::MemberId)
                .update_columns([
                    C::Version,
                    C::ConsentEmail,
                    C::ConsentSms,
                    C::ConsentPush,
                    C::ConsentTime,
                    C::ChangeTime,
                    C::Profile,
                    C::KeyId,
                    C::UpdateTime,
                    C::Erased,
                    C::EraseDelivered,
                ])
                .value(
                    C::QueuedVersion,
                    Expr::cust(format!(
                        "{greatest}(members.queued_version, excluded.queued_version)"
                    )),
                )
                .action_and_where(Expr::col((members::Entity, C::Version)).lte(version))
                .to_owned(),
        )
        // A newer version written concurrently makes this write nothing: it lost.
        .exec_without_returning(txn)
        .await
        .map_err(|e| db_error(e, "write a member"))?;
    Ok(())
}

impl Store {
    /// The rows of `member_ids` (absent members are left out).
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails.
    pub async fn members(&self, member_ids: &[&str]) -> Result<Vec<members::Model>, ServiceError> {
        members::Entity::find()
            .filter(members::Column::MemberId.is_in(member_ids.iter().copied()))
            .all(&self.db)
            .await
            .map_err(|e| db_error(e, "read members"))
    }

    /// Claims `members` for sending by `owner` for `lease` and records that each is about
    /// to be sent at the version beside it (before the request, so that a crash after the
    /// partner accepted cannot hide that it may have the member). Left out: a member another
    /// sender holds (its claim not expired), so one member is never in two requests at
    /// once; and a member whose row is no longer at the version (and erasure) beside it, so
    /// what is sent is what the row said when the claim was taken, and any sender after us
    /// sends something at least as new. Returns the members claimed.
    ///
    /// Expiry is on the database's clock on PostgreSQL (replicas' clocks may differ), and
    /// rows are locked in member id order first, as every other writer of `members` does,
    /// so writers cannot deadlock.
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails.
    pub async fn claim(
        &self,
        owner: i64,
        members: &[(&str, i64, bool)],
        lease: std::time::Duration,
    ) -> Result<HashSet<String>, ServiceError> {
        if members.is_empty() {
            return Ok(HashSet::new());
        }
        let lease = i64::try_from(lease.as_micros()).unwrap_or(i64::MAX);
        let mut values: Vec<Value> = vec![owner.into(), lease.into()];
        let now = self.now_sql(&mut values);
        let rows = tuples(
            &mut values,
            members.iter().map(|(id, version, erased)| {
                [
                    Value::from(*id),
                    Value::from(*version),
                    Value::from(*erased),
                ]
            }),
        );
        let sql = format!(
            "UPDATE members SET \
               attempted_version = CASE WHEN members.attempted_version < v.column2 \
                 THEN v.column2 ELSE members.attempted_version END, \
               send_owner = $1, send_until = {now} + $2 \
             FROM (VALUES {rows}) AS v \
             WHERE members.member_id = v.column1 \
               AND members.version = v.column2 AND members.erased = v.column3 \
               AND (members.send_until < {now} OR members.send_owner = $1) \
             RETURNING members.member_id"
        );
        let ids: Vec<&str> = members.iter().map(|m| m.0).collect();
        let _turn = self.turn().await;
        let txn = self.begin_write().await?;
        self.lock_in_order(&txn, &ids).await?;
        let claimed = txn
            .query_all_raw(self.backend.statement(&sql, values))
            .await
            .map_err(|e| db_error(e, "claim members for sending"))?;
        txn.commit()
            .await
            .map_err(|e| db_error(e, "commit a claim"))?;
        claimed
            .iter()
            .map(|row| row.try_get::<String>("", "member_id"))
            .collect::<Result<_, _>>()
            .map_err(|e| db_error(e, "claim members for sending"))
    }

    /// Extends `owner`'s claim on `member_ids` for `lease` from now, while requests are in
    /// flight; how many of them it still held.
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails.
    pub async fn renew(
        &self,
        owner: i64,
        member_ids: &[&str],
        lease: std::time::Duration,
    ) -> Result<u64, ServiceError> {
        if member_ids.is_empty() {
            return Ok(0);
        }
        let lease = i64::try_from(lease.as_micros()).unwrap_or(i64::MAX);
        let mut values: Vec<Value> = vec![owner.into(), lease.into()];
        let now = self.now_sql(&mut values);
        let list = tuples(&mut values, member_ids.iter().map(|id| [Value::from(*id)]));
        let sql = format!(
            "UPDATE members SET send_until = {now} + $2 \
             WHERE send_owner = $1 AND member_id IN ({list})",
            list = list.replace(['(', ')'], "")
        );
        let _turn = self.turn().await;
        self.db
            .execute_raw(self.backend.statement(&sql, values))
            .await
            .map(|result| result.rows_affected())
            .map_err(|e| db_error(e, "renew a claim"))
    }

    /// Ends `owner`'s claim on `member_ids` (nothing of theirs is in flight any more).
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails.
    pub async fn release(&self, owner: i64, member_ids: &[&str]) -> Result<(), ServiceError> {
        use members::Column as C;
        let _turn = self.turn().await;
        members::Entity::update_many()
            .col_expr(C::SendOwner, Expr::value(0_i64))
            .col_expr(C::SendUntil, Expr::value(0_i64))
            .filter(C::SendOwner.eq(owner))
            .filter(C::MemberId.is_in(member_ids.iter().copied()))
            .exec(&self.db)
            .await
            .map(|_| ())
            .map_err(|e| db_error(e, "release a claim"))
    }

    /// `offset` from now, in microseconds, as an SQL expression: on the database's clock on
    /// PostgreSQL (replicas' clocks may differ), on this process's on SQLite (one replica).
    pub fn later(&self, offset: std::time::Duration) -> sea_orm::sea_query::SimpleExpr {
        let offset = i64::try_from(offset.as_micros()).unwrap_or(i64::MAX);
        match self.backend {
            Backend::Postgres => Expr::cust(format!(
                "(extract(epoch from clock_timestamp()) * 1000000)::bigint + {offset}"
            )),
            Backend::Sqlite => Expr::value(now_micros().saturating_add(offset)),
        }
    }

    /// Now, in SQL: the database's clock on PostgreSQL, this process's on SQLite (one
    /// replica), as a parameter pushed onto `values`.
    fn now_sql(&self, values: &mut Vec<Value>) -> String {
        match self.backend {
            Backend::Postgres => {
                "(extract(epoch from clock_timestamp()) * 1000000)::bigint".to_owned()
            }
            Backend::Sqlite => {
                values.push(now_micros().into());
                format!("${}", values.len())
            }
        }
    }

    /// Locks the rows of `member_ids` in member id order (PostgreSQL; SQLite has one
    /// writer).
    async fn lock_in_order(
        &self,
        txn: &DatabaseTransaction,
        member_ids: &[&str],
    ) -> Result<(), ServiceError> {
        if self.backend == Backend::Postgres {
            read_locked(txn, self.backend, member_ids).await?;
        }
        Ok(())
    }

    /// Records that the partner accepted each member at the version beside it (a version
    /// below the recorded one changes nothing; `true` marks an accepted erasure), and the
    /// members it refused, in one transaction; ends `owner`'s claim on all of them.
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails.
    pub async fn delivered(
        &self,
        owner: i64,
        accepted: &[(&str, i64, bool)],
        refused: &[(&str, i64, &str)],
        now: i64,
    ) -> Result<(), ServiceError> {
        let _turn = self.turn().await;
        let txn = self.begin_write().await?;
        let ids: Vec<&str> = accepted
            .iter()
            .map(|a| a.0)
            .chain(refused.iter().map(|r| r.0))
            .collect();
        self.lock_in_order(&txn, &ids).await?;
        if !accepted.is_empty() {
            let mut values: Vec<Value> = vec![owner.into()];
            let rows = tuples(
                &mut values,
                accepted.iter().map(|(id, version, erasure)| {
                    [
                        Value::from(*id),
                        Value::from(*version),
                        Value::from(*erasure),
                    ]
                }),
            );
            // The erasure of this version only: a newer change recorded meanwhile stays.
            let sql = format!(
                "UPDATE members SET \
                   delivered_version = CASE WHEN members.delivered_version < v.column2 \
                     THEN v.column2 ELSE members.delivered_version END, \
                   erase_delivered = CASE WHEN v.column3 AND members.erased \
                     AND members.version = v.column2 THEN true ELSE members.erase_delivered END, \
                   send_until = CASE WHEN members.send_owner = $1 THEN 0 ELSE members.send_until END, \
                   send_owner = CASE WHEN members.send_owner = $1 THEN 0 ELSE members.send_owner END \
                 FROM (VALUES {rows}) AS v \
                 WHERE members.member_id = v.column1"
            );
            txn.execute_raw(self.backend.statement(&sql, values))
                .await
                .map_err(|e| db_error(e, "record deliveries"))?;
        }
        if !refused.is_empty() {
            let ids: Vec<&str> = refused.iter().map(|r| r.0).collect();
            use members::Column as C;
            members::Entity::update_many()
                .col_expr(C::SendOwner, Expr::value(0_i64))
                .col_expr(C::SendUntil, Expr::value(0_i64))
                .filter(C::SendOwner.eq(owner))
                .filter(C::MemberId.is_in(ids))
                .exec(&txn)
                .await
                .map_err(|e| db_error(e, "release refused members"))?;
            let rows =
                refused.iter().map(
                    |(member_id, version, reason)| failed_deliveries::ActiveModel {
                        member_id: sea_orm::Set((*member_id).to_owned()),
                        version: sea_orm::Set(*version),
                        reason: sea_orm::Set((*reason).to_owned()),
                        fail_time: sea_orm::Set(now),
                        ..Default::default()
                    },
                );
            failed_deliveries::Entity::insert_many(rows)
                .exec_without_returning(&txn)
                .await
                .map_err(|e| db_error(e, "record refused deliveries"))?;
        }
        txn.commit()
            .await
            .map_err(|e| db_error(e, "commit deliveries"))
    }
}

/// `($n, $n+1, …), (…)` for each tuple of `rows`, numbering after the `values` already
/// there, which take the tuples' values.
fn tuples<const N: usize>(
    values: &mut Vec<Value>,
    rows: impl Iterator<Item = [Value; N]>,
) -> String {
    let mut sql = String::new();
    for row in rows {
        if !sql.is_empty() {
            sql.push_str(", ");
        }
        sql.push('(');
        for (i, value) in row.into_iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            values.push(value);
            sql.push_str(&format!("${}", values.len()));
        }
        sql.push(')');
    }
    sql
}

/// Now, in microseconds since the epoch (the tables' time unit).
pub fn now_micros() -> i64 {
    i64::try_from(since_epoch().as_micros()).unwrap_or(i64::MAX)
}

/// A protobuf timestamp in microseconds since the epoch (the tables' time unit).
pub fn micros_of(time: prost_types::Timestamp) -> i64 {
    time.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(time.nanos / 1_000))
}

/// Microseconds since the epoch as a protobuf timestamp.
pub fn timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1_000).unwrap_or(0),
    }
}

/// Now, in milliseconds since the epoch (alert windows, pauses).
pub fn now_millis() -> i64 {
    i64::try_from(since_epoch().as_millis()).unwrap_or(i64::MAX)
}

fn since_epoch() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// A database error as the caller should see it: UNAVAILABLE when retrying can help.
pub fn db_error(error: DbErr, doing: &str) -> ServiceError {
    if mall_db::is_unavailable(&error) {
        ServiceError::Unavailable(format!("the database is unavailable ({doing}); retry"))
    } else if mall_db::is_retryable(&error) {
        // A deadlock, a serialization failure, SQLite busy: rolled back, and trying again
        // succeeds.
        ServiceError::Unavailable(format!("a write conflicted ({doing}); retry"))
    } else {
        ServiceError::Internal(anyhow::Error::new(error).context(doing.to_owned()))
    }
}
