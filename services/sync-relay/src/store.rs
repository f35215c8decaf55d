//! The relay's own tables: quarantine, pause switch, apply failures, admin request ids.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use sea_orm::{
    ColumnTrait as _, ConnectionTrait as _, DatabaseConnection, EntityTrait as _,
    PaginatorTrait as _, QueryFilter as _, QueryOrder as _, QuerySelect as _,
    sea_query::{Expr, ExprTrait as _, OnConflict, Query},
};

use crate::entity::{admin_requests, apply_failures, quarantined_records, relay_state};

/// A record to quarantine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewQuarantined {
    /// Unique per source record, so a redelivered record is quarantined once:
    /// `kinesis:<stream>/<shard>/<sequence number>`, or for records without a stable position
    /// (gRPC) the source and a hash of the bytes.
    pub dedup_key: String,
    /// `kinesis:<stream>/<shard id>`, `grpc`, or `apply:<lane group>` for a change the
    /// catalog refused.
    pub source: String,
    /// Sequence number, stream index or queue message id.
    pub position: String,
    /// Why, naming the offending field.
    pub reason: String,
    /// The record's bytes as received.
    pub raw_payload: Vec<u8>,
}

/// Handle on the relay's tables; cheap to clone.
#[derive(Debug, Clone)]
pub struct RelayStore {
    db: DatabaseConnection,
}

/// The timestamp `us` microseconds after the Unix epoch.
pub fn timestamp_of(us: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: i32::try_from(us.rem_euclid(1_000_000) * 1_000).unwrap_or_default(),
    }
}

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

impl RelayStore {
    /// The relay's tables in `db` (migrated with the relay's `Migrator`).
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    /// The connection, for readiness checks and the Kinesis source.
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Quarantines `records`; one already quarantined (same dedup key) is left as it is.
    /// Returns each record's quarantine id (its `seq`), in order.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn quarantine(&self, records: &[NewQuarantined]) -> anyhow::Result<Vec<i64>> {
        use quarantined_records::Column as C;
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_micros();
        let mut insert = Query::insert();
        insert.into_table(quarantined_records::Entity).columns([
            C::DedupKey,
            C::Source,
            C::Position,
            C::Reason,
            C::RawPayload,
            C::QuarantineTime,
        ]);
        for record in records {
            insert.values_panic([
                record.dedup_key.clone().into(),
                record.source.clone().into(),
                record.position.clone().into(),
                record.reason.clone().into(),
                record.raw_payload.clone().into(),
                now.into(),
            ]);
        }
        insert.on_conflict(OnConflict::column(C::DedupKey).do_nothing().to_owned());
        self.db
            .execute(&insert)
            .await
            .context("failed to quarantine records")?;
        let keys: Vec<&str> = records.iter().map(|r| r.dedup_key.as_str()).collect();
        let stored: std::collections::HashMap<String, i64> = quarantined_records::Entity::find()
            .select_only()
            .columns([C::DedupKey, C::Seq])
            .filter(C::DedupKey.is_in(keys))
            .into_tuple::<(String, i64)>()
            .all(&self.db)
            .await
            .context("failed to read quarantine ids")?
            .into_iter()
            .collect();
        Ok(records
            .iter()
            .map(|r| stored.get(&r.dedup_key).copied().unwrap_or_default())
            .collect())
    }

    /// Up to `limit` quarantined records after `after` (a `seq`), oldest first.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn list_quarantined(
        &self,
        after: i64,
        limit: u64,
    ) -> anyhow::Result<Vec<quarantined_records::Model>> {
        quarantined_records::Entity::find()
            .filter(quarantined_records::Column::Seq.gt(after))
            .order_by_asc(quarantined_records::Column::Seq)
            .limit(limit)
            .all(&self.db)
            .await
            .context("failed to list quarantined records")
    }

    /// The quarantined records with these ids (`seq`), oldest first; unknown ids are skipped.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn quarantined_by_ids(
        &self,
        ids: &[i64],
    ) -> anyhow::Result<Vec<quarantined_records::Model>> {
        quarantined_records::Entity::find()
            .filter(quarantined_records::Column::Seq.is_in(ids.iter().copied()))
            .order_by_asc(quarantined_records::Column::Seq)
            .all(&self.db)
            .await
            .context("failed to read quarantined records")
    }

    /// The id of the newest quarantined record (0 when none).
    ///
    /// # Errors
    /// When the database fails.
    pub async fn last_quarantined(&self) -> anyhow::Result<i64> {
        Ok(quarantined_records::Entity::find()
            .select_only()
            .column_as(quarantined_records::Column::Seq.max(), "seq")
            .into_tuple::<Option<i64>>()
            .one(&self.db)
            .await
            .context("failed to read the newest quarantine id")?
            .flatten()
            .unwrap_or(0))
    }

    /// How many records are quarantined.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn quarantined_count(&self) -> anyhow::Result<u64> {
        quarantined_records::Entity::find()
            .count(&self.db)
            .await
            .context("failed to count quarantined records")
    }

    /// Removes records that were redriven.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn release_quarantined(&self, ids: &[i64]) -> anyhow::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        quarantined_records::Entity::delete_many()
            .filter(quarantined_records::Column::Seq.is_in(ids.iter().copied()))
            .exec(&self.db)
            .await
            .context("failed to remove redriven records from the quarantine")?;
        Ok(())
    }

    /// Records a new reason for a record that failed validation again.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn requarantine(&self, id: i64, reason: &str) -> anyhow::Result<()> {
        use quarantined_records::Column as C;
        self.db
            .execute(
                Query::update()
                    .table(quarantined_records::Entity)
                    .value(C::Reason, reason)
                    .value(C::QuarantineTime, now_micros())
                    .and_where(Expr::col(C::Seq).eq(id)),
            )
            .await
            .context("failed to update a quarantined record")?;
        Ok(())
    }

    /// The pause switch: whether the relay is paused, why, and when it was last set
    /// (microseconds since the epoch).
    ///
    /// # Errors
    /// When the database fails.
    pub async fn pause_state(&self) -> anyhow::Result<relay_state::Model> {
        relay_state::Entity::find_by_id(1)
            .one(&self.db)
            .await
            .context("failed to read the pause switch")?
            .context("relay_state has no row")
    }

    /// Sets the pause switch every replica follows.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn set_paused(&self, paused: bool, reason: &str) -> anyhow::Result<()> {
        use relay_state::Column as C;
        let at = now_micros();
        self.db
            .execute(
                Query::update()
                    .table(relay_state::Entity)
                    .value(C::Paused, paused)
                    .value(C::PauseReason, reason)
                    .value(C::UpdateTime, at)
                    .and_where(Expr::col(C::Id).eq(1)),
            )
            .await
            .context("failed to set the pause switch")?;
        Ok(())
    }

    /// Remembers the last error of queue message `message_id`, shown if it is dead-lettered.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn record_apply_failure(
        &self,
        message_ids: &[String],
        error: &str,
    ) -> anyhow::Result<()> {
        use apply_failures::Column as C;
        if message_ids.is_empty() {
            return Ok(());
        }
        let now = now_micros();
        let mut insert = Query::insert();
        insert.into_table(apply_failures::Entity).columns([
            C::MessageId,
            C::LastError,
            C::UpdateTime,
        ]);
        for id in message_ids {
            insert.values_panic([id.clone().into(), error.into(), now.into()]);
        }
        insert.on_conflict(
            OnConflict::column(C::MessageId)
                .update_columns([C::LastError, C::UpdateTime])
                .to_owned(),
        );
        self.db
            .execute(&insert)
            .await
            .context("failed to record an apply failure")?;
        Ok(())
    }

    /// The recorded last errors of these messages and when they happened (microseconds
    /// since the epoch), by message id.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn apply_failures(
        &self,
        message_ids: &[String],
    ) -> anyhow::Result<std::collections::HashMap<String, (String, i64)>> {
        Ok(apply_failures::Entity::find()
            .filter(apply_failures::Column::MessageId.is_in(message_ids.iter().map(String::as_str)))
            .all(&self.db)
            .await
            .context("failed to read apply failures")?
            .into_iter()
            .map(|f| (f.message_id, (f.last_error, f.update_time)))
            .collect())
    }

    /// Forgets the failures of messages that were finally applied.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn clear_apply_failures(&self, message_ids: &[String]) -> anyhow::Result<()> {
        if message_ids.is_empty() {
            return Ok(());
        }
        apply_failures::Entity::delete_many()
            .filter(apply_failures::Column::MessageId.is_in(message_ids.iter().map(String::as_str)))
            .exec(&self.db)
            .await
            .context("failed to clear apply failures")?;
        Ok(())
    }

    /// Claims an admin `request_id`: `None` when it is new (the caller does the work and
    /// calls [`RelayStore::finish_request`]), or the first call's response when it was seen.
    /// A first call that failed before finishing leaves no response: the id can be reused.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn claim_request(&self, request_id: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let existing = admin_requests::Entity::find_by_id(request_id.to_owned())
            .one(&self.db)
            .await
            .context("failed to read an admin request id")?;
        Ok(existing.and_then(|r| r.response))
    }

    /// Stores the response of an admin request, so a retry returns it.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn finish_request(&self, request_id: &str, response: Vec<u8>) -> anyhow::Result<()> {
        use admin_requests::Column as C;
        let mut insert = Query::insert();
        insert
            .into_table(admin_requests::Entity)
            .columns([C::RequestId, C::Response, C::CreateTime])
            .values_panic([request_id.into(), response.into(), now_micros().into()])
            .on_conflict(
                OnConflict::column(C::RequestId)
                    .update_columns([C::Response])
                    .to_owned(),
            );
        self.db
            .execute(&insert)
            .await
            .context("failed to remember an admin request id")?;
        Ok(())
    }

    /// Forgets admin request ids once they are a day old, checking every hour, until
    /// `shutdown`: the contract remembers them for 24 hours.
    ///
    /// # Errors
    /// Never; failures are logged and retried.
    pub async fn expire_requests(
        self,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<()> {
        const DAY_MICROS: i64 = 24 * 3600 * 1_000_000;
        loop {
            if let Err(error) = self.prune_requests(now_micros() - DAY_MICROS).await {
                tracing::warn!(error = %error, "failed to forget old admin request ids");
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
            }
        }
    }

    /// Forgets admin request ids older than `cutoff` (microseconds since the epoch).
    ///
    /// # Errors
    /// When the database fails.
    pub async fn prune_requests(&self, cutoff: i64) -> anyhow::Result<u64> {
        Ok(admin_requests::Entity::delete_many()
            .filter(admin_requests::Column::CreateTime.lt(cutoff))
            .exec(&self.db)
            .await
            .context("failed to prune admin request ids")?
            .rows_affected)
    }
}
