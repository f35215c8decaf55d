//! The SQLite write path: one `BEGIN IMMEDIATE` transaction of prepared statements on a
//! connection of its own (rusqlite, on a blocking thread), the same steps and semantics as
//! the PostgreSQL path.
//!
//! Why not sea-orm here: through sqlx, every statement is a message to the driver's worker
//! thread and back, and a multi-row `VALUES` statement of 19,000 parameters costs more to
//! build and bind than to run; rusqlite calls SQLite directly, and a prepared statement per
//! row is SQLite's fastest way to write (the benchmark measures it as the limit). Reads and
//! the other, rarer writes (pruning, expiry) stay on sea-orm; every writer of this process
//! holds the store's write lock, and another process waits on SQLite's own lock (busy
//! timeout), so writes never interleave.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, SyncSender},
    },
    time::Duration,
};

use mall_grpc::ServiceError;
use mall_proto::catalog::v1::{BulkUpdateProductsResponse, Product};
use prost::Message as _;
use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior, params};

use super::{
    Store,
    entity::products,
    micros, stored_from_model, timestamp, to_i64, to_model, versions_of,
    write::{Attempt, AttemptError, Rules, WriteOutcome, decide},
};
use crate::bulk::{Plan, Stored, Write, needing_values};

/// The write connection's page cache, in KiB (SQLite's default is 2 MiB).
const WRITER_CACHE_KIB: i64 = 64 * 1024;

/// The least time between two background checkpoints (each ends with an fsync).
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(50);

/// Log pages after which the writer checkpoints itself (SQLite's default is 1,000, about
/// 4 MiB): only reached when the background checkpointer falls behind.
const WAL_PAGES_BEFORE_WRITER_CHECKPOINTS: i64 = 20_000;

/// How long a write waits for another process's write to finish.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Every code's row in one statement (the codes as a JSON array): a thousand lookups inside
/// SQLite cost a fraction of a thousand statement executions.
const THIN: &str = "SELECT code, product_type, create_time, version, brand_version, \
    category_path_version, status_version, names_version, descriptions_version, \
    prices_version, attributes_version FROM products \
    WHERE code IN (SELECT value FROM json_each(?1))";

const WHOLE: &str = "SELECT code, product_type, brand, category_path, status, names, \
    descriptions, prices, attributes, version, create_time, update_time, brand_version, \
    category_path_version, status_version, names_version, descriptions_version, \
    prices_version, attributes_version FROM products WHERE code = ?1";

const INSERT: &str = "INSERT INTO products (code, product_type, brand, category_path, status, \
    names, descriptions, prices, attributes, version, create_time, update_time, brand_version, \
    category_path_version, status_version, names_version, descriptions_version, \
    prices_version, attributes_version) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)";

/// The guard is a second line of defence: the write lock is held since the rows were read.
const UPDATE: &str = "UPDATE products SET product_type = ?2, brand = ?3, category_path = ?4, \
    status = ?5, names = ?6, descriptions = ?7, prices = ?8, attributes = ?9, version = ?10, \
    create_time = ?11, update_time = ?12, brand_version = ?13, category_path_version = ?14, \
    status_version = ?15, names_version = ?16, descriptions_version = ?17, \
    prices_version = ?18, attributes_version = ?19 WHERE code = ?1 AND version <= ?10";

const LOG: &str = "INSERT INTO product_changes (code, product_type, version, previous_version, \
    commit_time, product, written_fields, change_version) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

const REMEMBERED: &str = "SELECT response FROM bulk_requests WHERE request_id = ?1";

const REMEMBER: &str =
    "INSERT INTO bulk_requests (request_id, response, create_time) VALUES (?1, ?2, ?3)";

/// The write connection, opened on first use (the file is the one the store's pool uses).
#[derive(Debug)]
pub(super) struct SqliteWriter {
    path: PathBuf,
    open: Mutex<Option<Open>>,
}

/// The open write connection and the thread that checkpoints behind it.
#[derive(Debug)]
struct Open {
    connection: Connection,
    /// Wakes the checkpointer after a commit (a full channel means it is already due).
    checkpoint: SyncSender<()>,
}

impl SqliteWriter {
    /// A writer for the SQLite file at `path`.
    pub(super) fn new(path: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            path,
            open: Mutex::new(None),
        })
    }
}

/// What one blocking attempt produced.
enum Done {
    Replayed(BulkUpdateProductsResponse),
    Committed(Plan),
    Busy,
    /// The caller went away (deadline, cancellation) before the commit: rolled back.
    Abandoned,
}

/// Set when the attempt's future is dropped, so the blocking write (which a dropped future
/// cannot stop) rolls back instead of committing for a caller that is gone.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Store {
    /// One attempt of a bulk write on SQLite; see the module docs.
    pub(super) async fn attempt_bulk_write_sqlite(
        &self,
        writer: &Arc<SqliteWriter>,
        request_id: Option<&str>,
        writes: &mut Vec<Write>,
        rules: Rules,
    ) -> Result<Attempt, AttemptError> {
        let _guard = match &self.write_lock {
            Some(lock) => Some(lock.lock().await),
            None => None,
        };
        let writer = writer.clone();
        let request_id = request_id.map(str::to_owned);
        // Lent to the blocking thread, which hands them back (see `write`).
        let mut lent = std::mem::take(writes);
        let now = super::now();
        let abandoned = Arc::new(AtomicBool::new(false));
        let _abandon_on_drop = SetOnDrop(abandoned.clone());
        let done = tokio::task::spawn_blocking(move || {
            // A panic during an earlier write (its transaction rolled back as it unwound)
            // leaves the lock poisoned: start again from a fresh connection.
            let mut open = writer.open.lock().unwrap_or_else(|poisoned| {
                let mut open = poisoned.into_inner();
                *open = None;
                writer.open.clear_poison();
                open
            });
            if open.is_none() {
                match Open::new(&writer.path) {
                    Ok(opened) => *open = Some(opened),
                    Err(error) => return (lent, Err(internal(error))),
                }
            }
            let Open {
                connection,
                checkpoint,
            } = open.as_mut().expect("opened above");
            let result = write(
                connection,
                request_id.as_deref(),
                &mut lent,
                rules,
                now,
                &abandoned,
            );
            if let Ok(Done::Committed(_)) = &result {
                let _ = checkpoint.try_send(());
            }
            let result = match result {
                Err(Failure::Sqlite(error)) if is_busy(&error) => Ok(Done::Busy),
                Err(Failure::Sqlite(error)) => Err(internal(anyhow::Error::new(error))),
                Err(Failure::Attempt(error)) => Err(error),
                Ok(done) => Ok(done),
            };
            (lent, result)
        })
        .await
        .map_err(|e| internal(anyhow::anyhow!("the SQLite write task failed: {e}")))?;
        let (lent, done) = done;
        *writes = lent;
        let done = done?;
        match done {
            Done::Replayed(response) => Ok(Attempt::Done(WriteOutcome::Replayed(response))),
            Done::Busy => Ok(Attempt::Conflict(
                "another process holds the SQLite write lock",
            )),
            Done::Abandoned => Err(internal(anyhow::anyhow!(
                "the caller went away; the write was rolled back"
            ))),
            Done::Committed(plan) => {
                // Read-your-writes on this replica (still under the write lock, so in order).
                self.cache.invalidate(plan.rows.keys().map(String::as_str));
                Ok(self.applied(plan))
            }
        }
    }
}

impl Open {
    /// Opens the write connection (waits for other processes' writes, caches enough prepared
    /// statements for every statement here) and starts its checkpointer.
    fn new(path: &Path) -> anyhow::Result<Self> {
        let connection = connection(path)?;
        // Commits append to the write-ahead log; copying it back into the database file (a
        // checkpoint, with an fsync) is done by a thread of its own, so a write does not
        // wait for it. Should that thread fall behind, the writer checkpoints itself at
        // `WAL_PAGES_BEFORE_WRITER_CHECKPOINTS`, which bounds the log.
        connection.pragma_update(
            None,
            "wal_autocheckpoint",
            WAL_PAGES_BEFORE_WRITER_CHECKPOINTS,
        )?;
        let checkpointer = self::connection(path)?;
        let (checkpoint, due) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("catalog-sqlite-checkpoint".into())
            .spawn(move || checkpoints(&checkpointer, &due))?;
        Ok(Self {
            connection,
            checkpoint,
        })
    }
}

/// A connection to the catalog's file as the writer uses it.
fn connection(path: &Path) -> anyhow::Result<Connection> {
    let connection = Connection::open(path)?;
    connection.busy_timeout(BUSY_TIMEOUT)?;
    // The pool set WAL on the file; these are per connection.
    connection.pragma_update(None, "synchronous", "NORMAL")?;
    connection.pragma_update(None, "foreign_keys", "ON")?;
    // The writer reads every row it writes first: keep the hot part of the catalog in its
    // own page cache rather than going back to the kernel for each page.
    connection.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
    connection.set_prepared_statement_cache_capacity(16);
    Ok(connection)
}

/// The checkpointer: after commits, at most every [`CHECKPOINT_INTERVAL`], copies what the
/// log holds into the database file without blocking the writer or readers (`PASSIVE`).
/// Ends when the writer is dropped.
fn checkpoints(connection: &Connection, due: &Receiver<()>) {
    while due.recv().is_ok() {
        let result = connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
        });
        match result {
            Ok((log, copied)) => tracing::trace!(log, copied, "SQLite checkpoint"),
            // The next commit asks again; the writer's own checkpoints bound the log.
            Err(error) => tracing::debug!(%error, "SQLite checkpoint failed"),
        }
        std::thread::sleep(CHECKPOINT_INTERVAL);
    }
}

enum Failure {
    Sqlite(rusqlite::Error),
    Attempt(AttemptError),
}

impl From<rusqlite::Error> for Failure {
    fn from(error: rusqlite::Error) -> Self {
        Self::Sqlite(error)
    }
}

impl From<AttemptError> for Failure {
    fn from(error: AttemptError) -> Self {
        Self::Attempt(error)
    }
}

fn internal(error: anyhow::Error) -> AttemptError {
    AttemptError::Fatal(ServiceError::Internal(error))
}

fn is_busy(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// The whole attempt, in one transaction (rolled back unless committed).
fn write(
    connection: &mut Connection,
    request_id: Option<&str>,
    writes: &mut [Write],
    rules: Rules,
    now: prost_types::Timestamp,
    abandoned: &AtomicBool,
) -> Result<Done, Failure> {
    if abandoned.load(Ordering::SeqCst) {
        return Ok(Done::Abandoned);
    }
    let txn = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if let Some(id) = request_id {
        let first: Option<Option<Vec<u8>>> = txn
            .prepare_cached(REMEMBERED)?
            .query_row([id], |row| row.get(0))
            .optional()?;
        if let Some(first) = first {
            let first = first.ok_or_else(|| {
                internal(anyhow::anyhow!("a remembered request id has no response"))
            })?;
            let response = BulkUpdateProductsResponse::decode(first.as_slice())
                .map_err(|e| internal(anyhow::Error::new(e)))?;
            return Ok(Done::Replayed(response));
        }
    }
    let stored = read(&txn, writes)?;
    let (plan, response) = decide(writes, stored, now, rules, request_id.is_some())?;
    // Not committed: a next attempt starts from the writes as they came.
    if let Err(error) = store(&txn, &plan, request_id, response, now) {
        plan.give_back(writes);
        return Err(error);
    }
    if abandoned.load(Ordering::SeqCst) {
        // Dropping the transaction rolls it back.
        return Ok(Done::Abandoned);
    }
    if let Err(error) = txn.commit() {
        plan.give_back(writes);
        return Err(error.into());
    }
    Ok(Done::Committed(plan))
}

/// Writes the rows, the change log and the remembered response of `plan`.
fn store(
    txn: &rusqlite::Transaction<'_>,
    plan: &Plan,
    request_id: Option<&str>,
    response: Option<Vec<u8>>,
    now: prost_types::Timestamp,
) -> Result<(), Failure> {
    {
        let mut insert = txn.prepare_cached(INSERT)?;
        let mut update = txn.prepare_cached(UPDATE)?;
        for row in plan.rows.values() {
            let m = to_model(&row.stored);
            let values = params![
                m.code,
                m.product_type,
                m.brand,
                m.category_path,
                m.status,
                m.names,
                m.descriptions,
                m.prices,
                m.attributes,
                m.version,
                m.create_time,
                m.update_time,
                m.brand_version,
                m.category_path_version,
                m.status_version,
                m.names_version,
                m.descriptions_version,
                m.prices_version,
                m.attributes_version,
            ];
            let written = if row.existed {
                update.execute(values)?
            } else {
                insert.execute(values)?
            };
            if written != 1 {
                return Err(internal(anyhow::anyhow!(
                    "product {:?} changed while the write lock was held",
                    m.code
                ))
                .into());
            }
        }
        let mut log = txn.prepare_cached(LOG)?;
        for change in &plan.changes {
            let p = plan.product_after(change);
            log.execute(params![
                p.code,
                p.product_type,
                to_i64(p.version),
                to_i64(change.previous_version),
                p.update_time.map(micros).unwrap_or_default(),
                p.encode_to_vec(),
                i16::from(change.written.bits()),
                to_i64(change.change_version),
            ])?;
        }
        if let (Some(id), Some(response)) = (request_id, response) {
            txn.prepare_cached(REMEMBER)?
                .execute(params![id, response, micros(now)])?;
        }
    }
    Ok(())
}

/// The stored state the plan needs: every code's field versions, type and creation time;
/// whole rows only where a stored value can survive the request ([`needing_values`]).
fn read(
    txn: &rusqlite::Transaction<'_>,
    writes: &[Write],
) -> Result<BTreeMap<String, Stored>, Failure> {
    let mut codes: Vec<&str> = writes.iter().map(|w| w.product.code.as_str()).collect();
    codes.sort_unstable();
    codes.dedup();
    let codes = serde_json::to_string(&codes).map_err(|e| internal(anyhow::Error::new(e)))?;
    let mut stored = BTreeMap::new();
    let mut thin = txn.prepare_cached(THIN)?;
    let mut rows = thin.query([codes])?;
    while let Some(row) = rows.next()? {
        let mut columns = [0i64; 7];
        for (i, column) in columns.iter_mut().enumerate() {
            *column = row.get(4 + i)?;
        }
        let code: String = row.get(0)?;
        let versions = versions_of(columns, row.get(3)?);
        let product = Product {
            code: code.clone(),
            product_type: row.get(1)?,
            version: versions.max(),
            create_time: Some(timestamp(row.get(2)?)),
            ..Product::default()
        };
        stored.insert(code, Stored { product, versions });
    }
    let whole: Vec<String> = needing_values(writes, &stored)
        .into_iter()
        .map(str::to_owned)
        .collect();
    if !whole.is_empty() {
        let mut read_whole = txn.prepare_cached(WHOLE)?;
        for code in whole {
            let model = read_whole.query_row([&code], |row| {
                Ok(products::Model {
                    code: row.get(0)?,
                    product_type: row.get(1)?,
                    brand: row.get(2)?,
                    category_path: row.get(3)?,
                    status: row.get(4)?,
                    names: row.get(5)?,
                    descriptions: row.get(6)?,
                    prices: row.get(7)?,
                    attributes: row.get(8)?,
                    version: row.get(9)?,
                    create_time: row.get(10)?,
                    update_time: row.get(11)?,
                    brand_version: row.get(12)?,
                    category_path_version: row.get(13)?,
                    status_version: row.get(14)?,
                    names_version: row.get(15)?,
                    descriptions_version: row.get(16)?,
                    prices_version: row.get(17)?,
                    attributes_version: row.get(18)?,
                })
            })?;
            let row = stored_from_model(model).map_err(internal)?;
            stored.insert(code, row);
        }
    }
    Ok(stored)
}
