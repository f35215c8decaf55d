//! The embedded backend: a queue in the service's own database (SQLite or PostgreSQL), with
//! the semantics of SQS FIFO, durable across restarts and correct with several consumers.
//!
//! # How it works
//! - Every message is a row of `mall_queue_messages` (see [`schema`] for the columns); its
//!   `(xid, id)` is the order of sending (the sending transaction's id on PostgreSQL, 0 on
//!   SQLite, then the autoincrement id). A FIFO group's *head* is its live row lowest in that
//!   order. A group is delivered as a *run*: its head and up to
//!   [`limits::MAX_GROUP_RUN`]` - 1` messages behind it, in order, in one receive (as SQS
//!   returns several messages of a group in one call); while any of them is in flight the
//!   group gives nothing more. Visibility is a timestamp: a row with `visible_at` in the
//!   future is in flight.
//! - A receive reads the head of every group (a loose index scan, one probe per group), then,
//!   in one transaction, takes the oldest heads that are still live and visible (on
//!   PostgreSQL `FOR UPDATE SKIP LOCKED`: concurrent consumers pass each other instead of
//!   waiting), reads the first messages of those groups, and stamps each group's run with a
//!   new visibility and receipt token. A head stays the head until deleted or dead-lettered
//!   (later sends and redrives only append), so a stale read can skip a group but never
//!   deliver out of order; a run needs its head, which the transaction holds. Standard queues
//!   pick the oldest visible rows. (Until 2026-12-03 a group gave one message per receive,
//!   so a consumer moved one message per round trip of a lane with a backlog.)
//! - Sends are one transaction each. On PostgreSQL they commit in parallel (until 2026-12-02
//!   they took a queue-wide advisory lock, which made each wait for the last one's commit):
//!   a receive takes a head only when its transaction id is below the oldest still running
//!   in this database ([`HORIZON`]), so a send that commits late, with a lower id, can never
//!   be overtaken. The price: a long-running writing transaction in this database holds
//!   deliveries back until it ends. (Until 2026-12-04 any on the server did, e.g. a long
//!   write in the catalog's database beside the relay's.) SQLite has a single writer anyway,
//!   and writes start `BEGIN IMMEDIATE`.
//!   Within a process, writers of one queue take turns on an async mutex instead of spinning
//!   on SQLite's busy handler.
//! - Before each receive, rows received `max_receives` times whose visibility ran out are
//!   marked dead. Dead rows stay in the table (`dead = 1`) until redriven, which re-inserts
//!   them with new ids behind what each group holds.
//! - Deduplication ids live in `mall_queue_dedup` until their window ends, also after the
//!   message was deleted, as on SQS.
//! - Long polling: a receive that finds nothing waits for a wake-up from a send, delete or
//!   release in this process, or `embedded.poll_interval`, whichever comes first.
//!
//! Times come from this process's clock: replicas sharing a PostgreSQL database should run
//! NTP, as clock skew shortens or lengthens visibility by as much.

mod schema;
mod sql;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, QueryResult,
    SqliteTransactionMode, Statement, TransactionOptions, TransactionTrait,
};
use tokio::sync::{Mutex, MutexGuard, Notify};

pub use schema::{MIGRATION_NAME, migrations};

use self::sql::Sql;
use crate::{
    DeadLetterMessage, DeadLetterSelection, GroupCounts, OutgoingMessage, QueueCounts, QueueError,
    QueueSettings, Receipt, ReceivedMessage, limits, message,
};

/// On PostgreSQL, the transaction id below which every transaction *of this database* has
/// ended: the oldest id still running here, or the snapshot's `xmax` when none is. A head
/// (or a run's message) is taken only below it (see the module docs). It is
/// `pg_snapshot_xmin` without the transactions of other databases on the same server, which
/// cannot write this table: with the catalog's database beside the relay's, its long bulk
/// writes held every lane back. A running id counts unless `pg_stat_activity` (read after
/// the snapshot, so an id whose transaction ended meanwhile counts) shows it in another
/// database (`datid <>`: a session of no database, or one whose database is hidden, counts).
/// Any role sees `datid` and `backend_xid` of every session (PostgreSQL 15, checked with a
/// role without `pg_read_all_stats`); if a server hid them, every id would count, as
/// before: later deliveries, never reordered ones.
const HORIZON: &str = "(SELECT coalesce(min(x::text::bigint), \
     pg_snapshot_xmax(pg_current_snapshot())::text::bigint) \
     FROM pg_snapshot_xip(pg_current_snapshot()) AS x \
     WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity a \
     WHERE a.backend_xid IS NOT NULL \
     AND a.backend_xid::text::bigint = x::text::bigint % 4294967296 \
     AND a.datid <> (SELECT oid FROM pg_database WHERE datname = current_database())))";

/// Most rows in one multi-row INSERT: far below both engines' bound-parameter limits.
const INSERT_ROWS: usize = 200;
/// Most body bytes in one multi-row INSERT, to keep statements a sensible size.
const INSERT_BYTES: usize = 8 * 1024 * 1024;
/// Rows handled per statement when deleting, deduplicating or redriving.
const CHUNK: usize = 200;

/// A queue stored in the service's database. Clones share the connection pool, the write
/// turn and the wake-up of waiting receivers.
#[derive(Debug, Clone)]
pub(crate) struct EmbeddedQueue {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    name: String,
    fifo: bool,
    visibility_timeout: Duration,
    max_receives: u32,
    dedup_window: Duration,
    poll_interval: Duration,
    db: DatabaseConnection,
    backend: DbBackend,
    /// SQLite has one writer: this process's writers of this queue take turns here rather
    /// than in SQLite's busy handler, which sleeps in steps of up to 100 ms.
    write_turn: Mutex<()>,
    /// Wakes receivers of this process waiting in a long poll when messages may be ready.
    wake: Notify,
}

/// Up to `max` message ids from `runs` (each a group's messages in order, oldest group
/// first), breadth first: every group's head before any group's second message, and so on,
/// so a receive spreads over as many groups as it can (they are applied in parallel) and
/// goes deep only where fewer groups have messages. What is taken of each run is a prefix;
/// the result lists each group's part in order, group after group.
fn fill(runs: &[Vec<i64>], max: usize) -> Vec<i64> {
    let mut taken = vec![0; runs.len()];
    let mut total = 0;
    let deepest = runs.iter().map(Vec::len).max().unwrap_or(0);
    'fill: for depth in 0..deepest {
        for (run, taken) in runs.iter().zip(taken.iter_mut()) {
            if depth < run.len() {
                if total == max {
                    break 'fill;
                }
                *taken += 1;
                total += 1;
            }
        }
    }
    runs.iter()
        .zip(taken)
        .flat_map(|(run, taken)| run[..taken].iter().copied())
        .collect()
}

/// One of the first live messages of a group, as a receive reads them to find its run.
struct RunRow {
    xid: i64,
    id: i64,
    visible_at: i64,
}

/// One row to insert.
struct NewRow {
    message_id: String,
    group_id: String,
    dedup_id: Option<String>,
    body: String,
    attributes: String,
    sent_at: i64,
}

impl EmbeddedQueue {
    pub(crate) async fn open(
        settings: &QueueSettings,
        db: DatabaseConnection,
    ) -> anyhow::Result<Self> {
        let backend = db.get_database_backend();
        anyhow::ensure!(
            matches!(backend, DbBackend::Sqlite | DbBackend::Postgres),
            "the embedded queue runs on SQLite or PostgreSQL, not {backend:?}"
        );
        db.execute_unprepared("SELECT id FROM mall_queue_messages WHERE 1 = 0")
            .await
            .with_context(|| {
                format!(
                    "the embedded queue's tables are missing for queue {}: add \
                     mall_queue::embedded::migrations() to the service's Migrator",
                    settings.name
                )
            })?;
        Ok(Self {
            shared: Arc::new(Shared {
                name: settings.name.clone(),
                fifo: settings.fifo,
                visibility_timeout: settings.visibility_timeout,
                max_receives: settings.max_receives,
                dedup_window: settings.dedup_window,
                poll_interval: settings.embedded.poll_interval,
                db,
                backend,
                write_turn: Mutex::new(()),
                wake: Notify::new(),
            }),
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.shared.name
    }

    fn sql(&self) -> Sql {
        Sql::new(self.shared.backend)
    }

    fn unavailable(&self, error: DbErr) -> QueueError {
        QueueError::Unavailable {
            queue: self.shared.name.clone(),
            source: Box::new(error),
        }
    }

    /// This process's turn to write, on SQLite; PostgreSQL needs none.
    async fn write_turn(&self) -> Option<MutexGuard<'_, ()>> {
        match self.shared.backend {
            DbBackend::Sqlite => Some(self.shared.write_turn.lock().await),
            _ => None,
        }
    }

    /// A write transaction that sends: `BEGIN IMMEDIATE` on SQLite (one writer, so ids are
    /// in commit order). On PostgreSQL sends run in parallel: each row carries its
    /// transaction's id, and a receive orders a group by `(xid, id)` and only takes a head
    /// that no running transaction can still precede (see [`Self::visible_heads`]).
    async fn begin_ordered(&self) -> Result<DatabaseTransaction, QueueError> {
        self.shared
            .db
            .begin_with_options(TransactionOptions {
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                ..TransactionOptions::default()
            })
            .await
            .map_err(|e| self.unavailable(e))
    }

    pub(crate) async fn send(&self, messages: Vec<OutgoingMessage>) -> Result<(), QueueError> {
        message::validate(&self.shared.name, self.shared.fifo, &messages)?;
        let now = now_ms();
        let fifo = self.shared.fifo;
        let _turn = self.write_turn().await;
        let txn = self.begin_ordered().await?;

        let mut keep = vec![true; messages.len()];
        if fifo {
            self.deduplicate(&txn, &messages, &mut keep, now).await?;
        }
        let rows: Vec<NewRow> = messages
            .into_iter()
            .zip(keep)
            .filter(|(_, keep)| *keep)
            .map(|(m, _)| NewRow {
                message_id: uuid::Uuid::new_v4().to_string(),
                // Standard queues have no groups, as on SQS.
                group_id: if fifo {
                    m.group_id.unwrap_or_default()
                } else {
                    String::new()
                },
                dedup_id: if fifo { m.dedup_id } else { None },
                attributes: attributes_json(&m.attributes),
                body: m.body,
                sent_at: now,
            })
            .collect();
        let inserted = rows.len();
        self.insert_rows(&txn, rows, now).await?;
        txn.commit().await.map_err(|e| self.unavailable(e))?;
        tracing::debug!(queue = %self.shared.name, inserted, "messages stored");
        self.shared.wake.notify_waiters();
        Ok(())
    }

    /// Clears `keep` for messages whose deduplication id was seen within the window, earlier
    /// in this call included, and records the new ids.
    async fn deduplicate(
        &self,
        txn: &DatabaseTransaction,
        messages: &[OutgoingMessage],
        keep: &mut [bool],
        now: i64,
    ) -> Result<(), QueueError> {
        let mut sql = self.sql();
        sql.push("DELETE FROM mall_queue_dedup WHERE queue = ")
            .bind(self.shared.name.clone())
            .push(" AND expires_at <= ")
            .bind(now);
        txn.execute_raw(sql.build())
            .await
            .map_err(|e| self.unavailable(e))?;

        let mut seen = HashSet::new();
        let mut candidates = Vec::new();
        for (index, message) in messages.iter().enumerate() {
            if let Some(dedup) = &message.dedup_id {
                if seen.insert(dedup.as_str()) {
                    candidates.push((index, dedup.as_str()));
                } else {
                    keep[index] = false;
                }
            }
        }
        // Inserted in id order: two sends racing with the same ids (a retry beside the
        // original) then wait for each other in one order instead of deadlocking.
        candidates.sort_unstable_by(|a, b| a.1.cmp(b.1));
        let expires_at = now.saturating_add(millis(self.shared.dedup_window));
        for chunk in candidates.chunks(CHUNK) {
            let mut sql = self.sql();
            sql.push("INSERT INTO mall_queue_dedup (queue, dedup_id, expires_at) VALUES ");
            for (i, (_, dedup)) in chunk.iter().enumerate() {
                sql.push(if i == 0 { "(" } else { ", (" })
                    .bind(self.shared.name.clone())
                    .push(", ")
                    .bind((*dedup).to_owned())
                    .push(", ")
                    .bind(expires_at)
                    .push(")");
            }
            sql.push(" ON CONFLICT (queue, dedup_id) DO NOTHING RETURNING dedup_id");
            let fresh: HashSet<String> = txn
                .query_all_raw(sql.build())
                .await
                .map_err(|e| self.unavailable(e))?
                .iter()
                .map(|row| row.try_get::<String>("", "dedup_id"))
                .collect::<Result<_, _>>()
                .map_err(|e| self.unavailable(e))?;
            for (index, dedup) in chunk {
                if !fresh.contains(*dedup) {
                    keep[*index] = false;
                }
            }
        }
        Ok(())
    }

    /// Inserts rows in the order given, visible from `visible_at`.
    async fn insert_rows(
        &self,
        txn: &DatabaseTransaction,
        rows: Vec<NewRow>,
        visible_at: i64,
    ) -> Result<(), QueueError> {
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let mut sql = self.sql();
            sql.push(
                "INSERT INTO mall_queue_messages (queue, message_id, group_id, dedup_id, body, \
                 attributes, sent_at, visible_at, receive_count, dead) VALUES ",
            );
            let (mut count, mut bytes) = (0, 0);
            while count < INSERT_ROWS
                && bytes < INSERT_BYTES
                && let Some(row) = rows.next()
            {
                bytes += row.body.len();
                sql.push(if count == 0 { "(" } else { ", (" })
                    .bind(self.shared.name.clone())
                    .push(", ")
                    .bind(row.message_id)
                    .push(", ")
                    .bind(row.group_id)
                    .push(", ")
                    .bind(row.dedup_id)
                    .push(", ")
                    .bind(row.body)
                    .push(", ")
                    .bind(row.attributes)
                    .push(", ")
                    .bind(row.sent_at)
                    .push(", ")
                    .bind(visible_at)
                    .push(", 0, 0)");
                count += 1;
            }
            txn.execute_raw(sql.build())
                .await
                .map_err(|e| self.unavailable(e))?;
        }
        Ok(())
    }

    pub(crate) async fn receive(
        &self,
        max: usize,
        max_groups: usize,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before looking, so a wake-up between the look and the wait counts.
            let notified = self.shared.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let messages = self.try_receive(max, max_groups).await?;
            let now = tokio::time::Instant::now();
            if !messages.is_empty() || now >= deadline {
                return Ok(messages);
            }
            let nap = self.shared.poll_interval.min(deadline - now);
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(nap) => {}
            }
        }
    }

    async fn try_receive(
        &self,
        max: usize,
        max_groups: usize,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        let now = now_ms();
        let name = &self.shared.name;
        let _turn = self.write_turn().await;

        let mut sql = self.sql();
        sql.push("UPDATE mall_queue_messages SET dead = 1, dead_at = ")
            .bind(now)
            .push(" WHERE queue = ")
            .bind(name.clone())
            .push(" AND dead = 0 AND receive_count >= ")
            .bind(i64::from(self.shared.max_receives))
            .push(" AND visible_at <= ")
            .bind(now);
        let dead = self
            .shared
            .db
            .execute_raw(sql.build())
            .await
            .map_err(|e| self.unavailable(e))?
            .rows_affected();
        if dead > 0 {
            tracing::warn!(queue = %name, messages = dead, max_receives = self.shared.max_receives,
                "moved messages to the dead letters after too many receives");
        }

        let token = format!("{:016x}", fastrand::u64(..));
        let visible_at = now.saturating_add(millis(self.shared.visibility_timeout));
        if self.shared.fifo {
            // Two steps, because planners turn "the heads, joined back" into a loop over
            // every row: first the head of every group, then the oldest visible of them.
            let candidates = self.visible_heads(now, max).await?;
            if candidates.is_empty() {
                return Ok(Vec::new());
            }
            return self
                .receive_runs(candidates, now, (max, max_groups), visible_at, &token)
                .await;
        }
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let mut sql = self.sql();
        if self.shared.backend == DbBackend::Postgres {
            // Placeholders are numbered: the values are bound where the text ends.
            sql.push("WITH picked AS (");
        } else {
            sql.push("UPDATE mall_queue_messages SET visible_at = ")
                .bind(visible_at)
                .push(", receive_count = receive_count + 1, receipt = ")
                .bind(token.clone())
                .push(" WHERE id IN (");
        }
        // The conditions are checked again at the pick: a row another consumer took or
        // deleted meanwhile no longer qualifies.
        sql.push("SELECT id FROM mall_queue_messages WHERE queue = ")
            .bind(name.clone())
            .push(" AND dead = 0 AND visible_at <= ")
            .bind(now)
            .push(" ORDER BY visible_at, id LIMIT ")
            .bind(limit);
        if self.shared.backend == DbBackend::Postgres {
            sql.push(" FOR UPDATE SKIP LOCKED) UPDATE mall_queue_messages u SET visible_at = ")
                .bind(visible_at)
                .push(", receive_count = u.receive_count + 1, receipt = ")
                .bind(token.clone())
                .push(
                    " FROM picked WHERE u.id = picked.id RETURNING u.id, u.message_id, \
                 u.group_id, u.body, u.attributes, u.sent_at, u.receive_count",
                );
        } else {
            sql.push(
                ") RETURNING id, message_id, group_id, body, attributes, sent_at, receive_count",
            );
        }
        let rows = self
            .shared
            .db
            .query_all_raw(sql.build())
            .await
            .map_err(|e| self.unavailable(e))?;
        let mut messages = rows
            .iter()
            .map(|row| self.received(row, &token))
            .collect::<Result<Vec<_>, DbErr>>()
            .map_err(|e| self.unavailable(e))?;
        // RETURNING promises no order; the pick was oldest first.
        messages.sort_by_key(|(id, _)| *id);
        Ok(messages.into_iter().map(|(_, m)| m).collect())
    }

    /// A FIFO receive once the candidate heads are known: in one transaction, take the
    /// oldest of those heads that are still live and visible, at most `max_groups` of them
    /// (on PostgreSQL locking them, `SKIP LOCKED`, so a concurrent consumer passes them by
    /// and takes the next groups), read the first [`limits::MAX_GROUP_RUN`] live messages of
    /// each such group, and stamp each group's run (its head and the messages behind it that
    /// no running transaction can still precede) with the new visibility and receipt, at most
    /// `max` messages in all.
    ///
    /// A group with any of those first messages in flight gives nothing: an earlier run
    /// whose head was released or ran out while the rest of it is still being worked on
    /// keeps the whole group waiting, so two consumers never hold parts of one group. (A run
    /// starts at its group's head and is at most `MAX_GROUP_RUN` long, so an in-flight
    /// message is always among the first `MAX_GROUP_RUN` live ones.) Everything else that
    /// can touch a run's rows needs its head, which this transaction holds.
    async fn receive_runs(
        &self,
        candidates: Vec<i64>,
        now: i64,
        (max, max_groups): (usize, usize),
        visible_at: i64,
        token: &str,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        let postgres = self.shared.backend == DbBackend::Postgres;
        let txn = self.begin_ordered().await?;
        let mut sql = self.sql();
        sql.push("SELECT id, group_id FROM mall_queue_messages h WHERE id IN ")
            .bind_list(candidates)
            .push(" AND dead = 0 AND visible_at <= ")
            .bind(now);
        if max_groups < max {
            // Only groups that can give a run count toward the bound: a head whose run is
            // still partly in flight (released alone, say) is always among the oldest, and
            // would otherwise take a place in every receive, up to all of them. The check
            // below stays, for what changes between this statement and the locks.
            // The run is read first (one probe of the group-order index, at most
            // MAX_GROUP_RUN rows) and filtered after: with the filter outside, PostgreSQL
            // scanned the queue per candidate head (10-28 ms a receive).
            sql.push(
                " AND NOT EXISTS (SELECT 1 FROM (SELECT visible_at FROM mall_queue_messages \
                 WHERE queue = h.queue AND dead = 0 AND group_id = h.group_id \
                 ORDER BY group_id, xid, id LIMIT ",
            )
            .bind(i64::try_from(limits::MAX_GROUP_RUN).unwrap_or(i64::MAX))
            .push(") AS r WHERE r.visible_at > ")
            .bind(now)
            .push(")");
        }
        sql.push(" ORDER BY id LIMIT ")
            .bind(i64::try_from(max.min(max_groups)).unwrap_or(i64::MAX));
        if postgres {
            sql.push(" FOR UPDATE SKIP LOCKED");
        }
        let heads = txn
            .query_all_raw(sql.build())
            .await
            .map_err(|e| self.unavailable(e))?
            .iter()
            .map(|row| {
                Ok((
                    row.try_get::<i64>("", "id")?,
                    row.try_get::<String>("", "group_id")?,
                ))
            })
            .collect::<Result<Vec<_>, DbErr>>()
            .map_err(|e| self.unavailable(e))?;
        if heads.is_empty() {
            return Ok(Vec::new());
        }
        // Read before the runs: whatever ended below it, their statements see.
        let horizon = if postgres {
            txn.query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                format!("SELECT {HORIZON} AS horizon"),
            ))
            .await
            .map_err(|e| self.unavailable(e))?
            .map(|row| row.try_get::<i64>("", "horizon"))
            .transpose()
            .map_err(|e| self.unavailable(e))?
            .unwrap_or(i64::MIN)
        } else {
            // SQLite has one writer: every row there was committed in order.
            i64::MAX
        };
        let mut groups: BTreeMap<String, Vec<RunRow>> = BTreeMap::new();
        // SQLite allows 500 terms in a compound SELECT.
        for chunk in heads.chunks(CHUNK) {
            let mut sql = self.sql();
            for (i, (_, group)) in chunk.iter().enumerate() {
                if i > 0 {
                    sql.push(" UNION ALL ");
                }
                sql.push("SELECT * FROM (SELECT group_id, id, xid, visible_at")
                    .push(" FROM mall_queue_messages WHERE queue = ")
                    .bind(self.shared.name.clone())
                    .push(" AND dead = 0 AND group_id = ")
                    .bind(group.clone())
                    .push(" ORDER BY group_id, xid, id LIMIT ")
                    .bind(i64::try_from(limits::MAX_GROUP_RUN).unwrap_or(i64::MAX))
                    .push(&format!(") AS r{i}"));
            }
            for row in txn
                .query_all_raw(sql.build())
                .await
                .map_err(|e| self.unavailable(e))?
            {
                let read = || -> Result<(String, RunRow), DbErr> {
                    Ok((
                        row.try_get("", "group_id")?,
                        RunRow {
                            xid: row.try_get("", "xid")?,
                            id: row.try_get("", "id")?,
                            visible_at: row.try_get("", "visible_at")?,
                        },
                    ))
                };
                let (group, run_row) = read().map_err(|e| self.unavailable(e))?;
                groups.entry(group).or_default().push(run_row);
            }
        }
        let mut runs: Vec<Vec<i64>> = Vec::with_capacity(heads.len());
        for (head, group) in &heads {
            let Some(rows) = groups.get_mut(group) else {
                continue;
            };
            rows.sort_unstable_by_key(|r| (r.xid, r.id));
            if rows.first().map(|r| r.id) != Some(*head) || rows.iter().any(|r| r.visible_at > now)
            {
                continue;
            }
            runs.push(
                rows.iter()
                    // Transactions below the horizon have all ended: a message they sent
                    // can no longer be preceded by one that commits later.
                    .take_while(|r| r.xid < horizon)
                    .map(|r| r.id)
                    .collect(),
            );
        }
        let picked = fill(&runs, max);
        if picked.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql = self.sql();
        // `dead = 0`: a consumer elsewhere may have dead-lettered a message behind a head
        // meanwhile; its group moves on without it, as after any dead letter.
        sql.push("UPDATE mall_queue_messages SET visible_at = ")
            .bind(visible_at)
            .push(", receive_count = receive_count + 1, receipt = ")
            .bind(token.to_owned())
            .push(" WHERE id IN ")
            .bind_list(picked.clone())
            .push(
                " AND dead = 0 RETURNING id, message_id, group_id, body, attributes, sent_at, \
                 receive_count",
            );
        let rows = txn
            .query_all_raw(sql.build())
            .await
            .map_err(|e| self.unavailable(e))?;
        txn.commit().await.map_err(|e| self.unavailable(e))?;
        let order: HashMap<i64, usize> =
            picked.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let mut messages = rows
            .iter()
            .map(|row| self.received(row, token))
            .collect::<Result<Vec<_>, DbErr>>()
            .map_err(|e| self.unavailable(e))?;
        // RETURNING promises no order: each group's run in its order, oldest groups first.
        messages.sort_by_key(|(id, _)| order.get(id).copied().unwrap_or(usize::MAX));
        Ok(messages.into_iter().map(|(_, m)| m).collect())
    }

    /// The ids of the oldest visible group heads, at most a few times `max` (some may be
    /// taken by other consumers before the pick).
    async fn visible_heads(&self, now: i64, max: usize) -> Result<Vec<i64>, QueueError> {
        let mut sql = self.sql();
        match self.shared.backend {
            // The same loose index scan in SQLite's dialect (no LATERAL): each step seeks the
            // next group in the group-head index, then its oldest message. (GROUP BY reads
            // every queued row: 220 ms a receive with a million queued.)
            DbBackend::Sqlite => {
                let name = self.shared.name.clone();
                sql.push(
                    "WITH RECURSIVE groups(g) AS (SELECT min(group_id) FROM mall_queue_messages \
                     WHERE queue = ",
                )
                .bind(name.clone())
                .push(
                    " AND dead = 0 UNION ALL SELECT (SELECT min(group_id) FROM \
                     mall_queue_messages WHERE queue = ",
                )
                .bind(name.clone())
                .push(
                    " AND dead = 0 AND group_id > groups.g) FROM groups WHERE g IS NOT NULL), \
                     heads AS (SELECT (SELECT id FROM mall_queue_messages WHERE queue = ",
                )
                .bind(name)
                .push(
                    " AND dead = 0 AND group_id = groups.g ORDER BY id LIMIT 1) AS head \
                     FROM groups WHERE g IS NOT NULL) \
                     SELECT m.id AS id, m.visible_at AS visible_at FROM heads \
                     JOIN mall_queue_messages m ON m.id = heads.head",
                );
            }
            _ => {
                // A loose index scan over the group-order index: one probe per group, so a
                // receive costs the same with a backlog of a million messages as with a
                // thousand. (DISTINCT ON reads every queued row: PostgreSQL does not skip.)
                //
                // Sends commit in parallel, so a group's committed head may still be preceded
                // by a send that has not committed. A head is taken only when its
                // transaction id is below every running transaction's: anything that commits
                // later has a higher id and so comes after it. (A long-running writing
                // transaction of this database holds heads back: deliveries wait, never
                // reorder; see `HORIZON`.)
                sql.push(
                    "WITH RECURSIVE heads AS ((SELECT group_id, xid, id, visible_at \
                     FROM mall_queue_messages WHERE queue = ",
                )
                .bind(self.shared.name.clone())
                .push(
                    " AND dead = 0 ORDER BY group_id, xid, id LIMIT 1) UNION ALL \
                     SELECT n.group_id, n.xid, n.id, n.visible_at FROM heads h \
                     CROSS JOIN LATERAL (SELECT group_id, xid, id, visible_at \
                     FROM mall_queue_messages WHERE queue = ",
                )
                .bind(self.shared.name.clone())
                .push(
                    " AND dead = 0 AND group_id > h.group_id ORDER BY group_id, xid, id \
                     LIMIT 1) n) \
                     SELECT id, visible_at FROM heads WHERE xid < ",
                )
                .push(HORIZON);
            }
        };
        let rows = self
            .shared
            .db
            .query_all_raw(sql.build())
            .await
            .map_err(|e| self.unavailable(e))?;
        let mut heads = Vec::new();
        for row in &rows {
            let read = || -> Result<(i64, i64), DbErr> {
                Ok((row.try_get("", "id")?, row.try_get("", "visible_at")?))
            };
            let (id, visible_at) = read().map_err(|e| self.unavailable(e))?;
            if visible_at <= now {
                heads.push(id);
            }
        }
        heads.sort_unstable();
        heads.truncate(max.saturating_mul(3).max(16));
        Ok(heads)
    }

    fn received(&self, row: &QueryResult, token: &str) -> Result<(i64, ReceivedMessage), DbErr> {
        let id: i64 = row.try_get("", "id")?;
        let group: String = row.try_get("", "group_id")?;
        let receive_count: i32 = row.try_get("", "receive_count")?;
        Ok((
            id,
            ReceivedMessage {
                message_id: row.try_get("", "message_id")?,
                receipt: Receipt(format!("{id}.{token}")),
                body: row.try_get("", "body")?,
                attributes: parse_attributes(&row.try_get::<String>("", "attributes")?),
                receive_count: u32::try_from(receive_count).unwrap_or_default(),
                group_id: (!group.is_empty()).then_some(group),
                sent_time: time_of(row.try_get("", "sent_at")?),
            },
        ))
    }

    pub(crate) async fn delete(&self, receipts: &[Receipt]) -> Result<(), QueueError> {
        let mut expired = 0;
        let mut parsed = Vec::with_capacity(receipts.len());
        for receipt in receipts {
            match parse_receipt(receipt) {
                Some(pair) => parsed.push(pair),
                None => expired += 1,
            }
        }
        let _turn = self.write_turn().await;
        for chunk in parsed.chunks(CHUNK) {
            let mut sql = self.sql();
            // `id IN (...)` first: with ORs alone, SQLite may scan the queue's index instead
            // of looking the ids up (70 ms a delete with a million queued).
            sql.push("DELETE FROM mall_queue_messages WHERE id IN ")
                .bind_list(chunk.iter().map(|(id, _)| *id).collect::<Vec<_>>())
                .push(" AND queue = ")
                .bind(self.shared.name.clone())
                .push(" AND dead = 0 AND (");
            for (i, (id, token)) in chunk.iter().enumerate() {
                sql.push(if i == 0 { "(id = " } else { " OR (id = " })
                    .bind(*id)
                    .push(" AND receipt = ")
                    .bind((*token).to_owned())
                    .push(")");
            }
            sql.push(") RETURNING id");
            let deleted: HashSet<i64> = self
                .shared
                .db
                .query_all_raw(sql.build())
                .await
                .map_err(|e| self.unavailable(e))?
                .iter()
                .map(|row| row.try_get::<i64>("", "id"))
                .collect::<Result<_, _>>()
                .map_err(|e| self.unavailable(e))?;
            let missing: Vec<i64> = chunk
                .iter()
                .map(|(id, _)| *id)
                .filter(|id| !deleted.contains(id))
                .collect();
            if !missing.is_empty() {
                // Gone already counts as deleted; still there means delivered again or dead.
                let mut sql = self.sql();
                sql.push("SELECT id FROM mall_queue_messages WHERE queue = ")
                    .bind(self.shared.name.clone())
                    .push(" AND id IN ")
                    .bind_list(missing);
                expired += self
                    .shared
                    .db
                    .query_all_raw(sql.build())
                    .await
                    .map_err(|e| self.unavailable(e))?
                    .len();
            }
        }
        // Deleting a group's head lets its next message go.
        self.shared.wake.notify_waiters();
        if expired > 0 {
            return Err(QueueError::ReceiptExpired {
                queue: self.shared.name.clone(),
                count: expired,
            });
        }
        Ok(())
    }

    pub(crate) async fn change_visibility(
        &self,
        receipt: &Receipt,
        visibility: Duration,
    ) -> Result<(), QueueError> {
        let expired = || QueueError::ReceiptExpired {
            queue: self.shared.name.clone(),
            count: 1,
        };
        let (id, token) = parse_receipt(receipt).ok_or_else(expired)?;
        let now = now_ms();
        let _turn = self.write_turn().await;
        let mut sql = self.sql();
        sql.push("UPDATE mall_queue_messages SET visible_at = ")
            .bind(now.saturating_add(millis(visibility)))
            .push(" WHERE queue = ")
            .bind(self.shared.name.clone())
            .push(" AND id = ")
            .bind(id)
            .push(" AND receipt = ")
            .bind(token.to_owned())
            .push(" AND dead = 0 AND visible_at > ")
            .bind(now);
        let changed = self
            .shared
            .db
            .execute_raw(sql.build())
            .await
            .map_err(|e| self.unavailable(e))?
            .rows_affected();
        if changed == 0 {
            return Err(expired());
        }
        if visibility.is_zero() {
            self.shared.wake.notify_waiters();
        }
        Ok(())
    }

    fn counts_sql(&self, by_group: bool) -> Sql {
        let now = now_ms();
        let mut sql = self.sql();
        sql.push("SELECT ");
        if by_group {
            sql.push("group_id, ");
        }
        sql.push("COALESCE(SUM(CASE WHEN dead = 0 AND visible_at <= ")
            .bind(now)
            .push(" THEN 1 ELSE 0 END), 0) AS visible, ")
            .push("COALESCE(SUM(CASE WHEN dead = 0 AND visible_at > ")
            .bind(now)
            .push(" THEN 1 ELSE 0 END), 0) AS in_flight, ")
            .push("COALESCE(SUM(CASE WHEN dead = 1 THEN 1 ELSE 0 END), 0) AS dead ")
            .push("FROM mall_queue_messages WHERE queue = ")
            .bind(self.shared.name.clone());
        if by_group {
            sql.push(" GROUP BY group_id");
        }
        sql
    }

    pub(crate) async fn counts(&self) -> Result<QueueCounts, QueueError> {
        let row = self
            .shared
            .db
            .query_one_raw(self.counts_sql(false).build())
            .await
            .map_err(|e| self.unavailable(e))?;
        match row {
            Some(row) => {
                let counts = group_counts(&row).map_err(|e| self.unavailable(e))?;
                Ok(QueueCounts {
                    visible: counts.visible,
                    in_flight: counts.in_flight,
                    dead: counts.dead,
                })
            }
            None => Ok(QueueCounts::default()),
        }
    }

    pub(crate) async fn counts_by_group(
        &self,
    ) -> Result<BTreeMap<String, GroupCounts>, QueueError> {
        let rows = self
            .shared
            .db
            .query_all_raw(self.counts_sql(true).build())
            .await
            .map_err(|e| self.unavailable(e))?;
        rows.iter()
            .map(|row| Ok((row.try_get::<String>("", "group_id")?, group_counts(row)?)))
            .collect::<Result<_, DbErr>>()
            .map_err(|e| self.unavailable(e))
    }

    pub(crate) async fn list_dead_letters(
        &self,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<(Vec<DeadLetterMessage>, Option<String>), QueueError> {
        let after = match page_token {
            None | Some("") => 0,
            Some(token) => token
                .parse::<i64>()
                .map_err(|_| QueueError::InvalidArgument {
                    queue: self.shared.name.clone(),
                    reason: "the page token is not one this queue returned".to_owned(),
                })?,
        };
        let mut sql = self.sql();
        sql.push(
            "SELECT id, message_id, group_id, body, attributes, sent_at, receive_count \
             FROM mall_queue_messages WHERE queue = ",
        )
        .bind(self.shared.name.clone())
        .push(" AND dead = 1 AND id > ")
        .bind(after)
        .push(" ORDER BY id LIMIT ")
        .bind(i64::try_from(page_size + 1).unwrap_or(i64::MAX));
        let rows = self
            .shared
            .db
            .query_all_raw(sql.build())
            .await
            .map_err(|e| self.unavailable(e))?;
        let mut page = rows
            .iter()
            .map(|row| self.received(row, ""))
            .collect::<Result<Vec<_>, DbErr>>()
            .map_err(|e| self.unavailable(e))?;
        let next = if page.len() > page_size {
            page.truncate(page_size);
            page.last().map(|(id, _)| id.to_string())
        } else {
            None
        };
        let letters = page
            .into_iter()
            .map(|(_, m)| DeadLetterMessage {
                id: m.message_id,
                group_id: m.group_id,
                body: m.body,
                attributes: m.attributes,
                receive_count: m.receive_count,
                sent_time: m.sent_time,
            })
            .collect();
        Ok((letters, next))
    }

    pub(crate) async fn redrive_dead_letters(
        &self,
        selection: DeadLetterSelection,
    ) -> Result<u64, QueueError> {
        let _turn = self.write_turn().await;
        let mut total = 0u64;
        match selection {
            DeadLetterSelection::All => loop {
                let moved = self.redrive_chunk(None).await?;
                if moved == 0 {
                    break;
                }
                total += moved;
            },
            DeadLetterSelection::Ids(ids) => {
                for chunk in ids.chunks(CHUNK) {
                    total += self.redrive_chunk(Some(chunk)).await?;
                }
            }
        }
        if total > 0 {
            tracing::info!(queue = %self.shared.name, messages = total, "redrove dead letters");
            self.shared.wake.notify_waiters();
        }
        Ok(total)
    }

    /// Moves up to [`CHUNK`] dead letters (those with `ids`, or the oldest) behind the live
    /// messages, in their original order, in one transaction.
    async fn redrive_chunk(&self, ids: Option<&[String]>) -> Result<u64, QueueError> {
        let now = now_ms();
        let txn = self.begin_ordered().await?;
        let mut sql = self.sql();
        sql.push(
            "SELECT id, message_id, group_id, dedup_id, body, attributes, sent_at \
             FROM mall_queue_messages WHERE queue = ",
        )
        .bind(self.shared.name.clone())
        .push(" AND dead = 1");
        if let Some(ids) = ids {
            sql.push(" AND message_id IN ")
                .bind_list(ids.iter().cloned());
        }
        sql.push(" ORDER BY id LIMIT ")
            .bind(i64::try_from(CHUNK).unwrap_or(i64::MAX));
        if self.shared.backend == DbBackend::Postgres {
            // Sends no longer serialize writers: a concurrent redrive of the same dead rows
            // waits here, then finds them gone, instead of queueing a second copy.
            sql.push(" FOR UPDATE");
        }
        let rows = txn
            .query_all_raw(sql.build())
            .await
            .map_err(|e| self.unavailable(e))?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut old_ids = Vec::with_capacity(rows.len());
        let mut new_rows = Vec::with_capacity(rows.len());
        for row in &rows {
            let read = || -> Result<(i64, NewRow), DbErr> {
                Ok((
                    row.try_get("", "id")?,
                    NewRow {
                        message_id: row.try_get("", "message_id")?,
                        group_id: row.try_get("", "group_id")?,
                        dedup_id: row.try_get("", "dedup_id")?,
                        body: row.try_get("", "body")?,
                        attributes: row.try_get("", "attributes")?,
                        sent_at: row.try_get("", "sent_at")?,
                    },
                ))
            };
            let (id, new_row) = read().map_err(|e| self.unavailable(e))?;
            old_ids.push(id);
            new_rows.push(new_row);
        }
        let moved = old_ids.len() as u64;
        self.insert_rows(&txn, new_rows, now).await?;
        let mut sql = self.sql();
        sql.push("DELETE FROM mall_queue_messages WHERE queue = ")
            .bind(self.shared.name.clone())
            .push(" AND id IN ")
            .bind_list(old_ids);
        txn.execute_raw(sql.build())
            .await
            .map_err(|e| self.unavailable(e))?;
        txn.commit().await.map_err(|e| self.unavailable(e))?;
        Ok(moved)
    }
}

fn group_counts(row: &QueryResult) -> Result<GroupCounts, DbErr> {
    let count = |column: &str| -> Result<u64, DbErr> {
        Ok(u64::try_from(row.try_get::<i64>("", column)?).unwrap_or_default())
    };
    Ok(GroupCounts {
        visible: count("visible")?,
        in_flight: count("in_flight")?,
        dead: count("dead")?,
    })
}

/// `"<row id>.<token>"`, as made by a receive.
fn parse_receipt(receipt: &Receipt) -> Option<(i64, &str)> {
    let (id, token) = receipt.as_str().split_once('.')?;
    if token.is_empty() {
        return None;
    }
    Some((id.parse().ok()?, token))
}

fn attributes_json(attributes: &BTreeMap<String, String>) -> String {
    serde_json::to_string(attributes).expect("a map of strings always serializes")
}

/// Attributes as stored; a row written by this crate always parses.
fn parse_attributes(json: &str) -> BTreeMap<String, String> {
    serde_json::from_str(json).unwrap_or_default()
}

fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

fn time_of(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_parse_only_in_their_own_format() {
        assert_eq!(parse_receipt(&Receipt("42.abc".into())), Some((42, "abc")));
        assert_eq!(parse_receipt(&Receipt("42.".into())), None);
        assert_eq!(parse_receipt(&Receipt("x.abc".into())), None);
        assert_eq!(parse_receipt(&Receipt("AQEB...".into())), None);
    }

    #[test]
    fn a_receive_takes_every_groups_head_before_going_deeper() {
        let runs = vec![vec![1, 2, 3], vec![10], vec![20, 21]];
        assert_eq!(fill(&runs, 2), [1, 10], "heads first");
        assert_eq!(
            fill(&runs, 4),
            [1, 2, 10, 20],
            "then second messages, oldest group first"
        );
        assert_eq!(
            fill(&runs, 100),
            [1, 2, 3, 10, 20, 21],
            "each run whole, in order"
        );
        assert!(fill(&runs, 0).is_empty());
        assert!(fill(&[], 10).is_empty());
    }
}
