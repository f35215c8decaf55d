//! The catalog's storage: products, their change log and remembered request ids, on SQLite or
//! PostgreSQL through sea-orm.
//!
//! # Layout
//! - [`entity`]: the sea-orm entities.
//! - `write`, `write_pg`: [`Store::bulk_write`], one version-guarded, set-based transaction per
//!   request (SQLite through sea-orm, PostgreSQL with array parameters through sqlx).
//! - `read`: [`Store::get`], [`Store::batch_get`], [`Store::list`].
//! - `changes`: the change log: [`Store::read_changes`], [`Store::prune_changes`].
//!
//! # Concurrency
//! On PostgreSQL (`write_pg`), writers lock the rows they update in code order
//! (`SELECT ... FOR UPDATE`), so overlapping requests queue instead of deadlocking; the rare
//! conflict that remains (two requests creating the same new product, or a product last
//! written by a transaction with a higher id) is retried inside the store. Writers commit in
//! parallel: the change log is ordered by `(xid, seq)` and read below a commit-order
//! watermark (`changes`), so a watcher misses nothing and repeats nothing without a lock
//! that orders commits. SQLite has one writer at a time: writes take an in-process lock, so
//! they queue fairly instead of polling the busy timeout, and `BEGIN IMMEDIATE`, so another
//! process cannot slip in between a write's read and its update.

pub mod cache;
pub mod entity;

mod changes;
mod read;
mod write;
mod write_pg;
mod write_sqlite;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::Context as _;
use mall_db::Backend;
use mall_grpc::ServiceError;
use mall_product::FieldVersions;
use mall_proto::catalog::v1::Product;
use prost_types::Timestamp;
use sea_orm::{
    DatabaseConnection, DatabaseTransaction, DbErr, SqliteTransactionMode, TransactionOptions,
    TransactionTrait as _,
};
use tokio::sync::{Mutex, MutexGuard};

pub use cache::ProductCache;
pub use changes::{ChangeBatch, ChangeLogPosition, CommittedBefore, LogPosition};
pub use read::{ListFilter, PendingRow};
pub use write::{OnRefusal, WriteOutcome};

use self::entity::products;
use crate::bulk::Stored;

/// Handle on the catalog's tables; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    db: DatabaseConnection,
    backend: Backend,
    /// SQLite only: one writer at a time, in arrival order.
    write_lock: Option<Arc<Mutex<()>>>,
    /// Attempts of a write after serialization failures and deadlocks.
    write_retries: u32,
    /// `catalog.max_version_jump`; `None`: off.
    max_version_jump: Option<u64>,
    /// Products by code for the read path; see [`cache`].
    cache: ProductCache,
    /// SQLite only: the write connection (`write_sqlite`).
    sqlite_writer: Option<Arc<write_sqlite::SqliteWriter>>,
}

/// A write transaction, holding the SQLite write lock while it lives.
struct WriteTxn<'a> {
    txn: DatabaseTransaction,
    _guard: Option<MutexGuard<'a, ()>>,
}

impl Store {
    /// A store on `db`, which must have the catalog's migrations applied, caching up to
    /// `cache_entries` products for reads (0: no cache).
    ///
    /// # Errors
    /// For an in-memory SQLite database: the catalog writes through a connection of its own
    /// (`write_sqlite`), which needs a file.
    pub fn new(
        db: DatabaseConnection,
        write_retries: u32,
        cache_entries: usize,
    ) -> anyhow::Result<Self> {
        let backend = Backend::of(&db);
        let write_lock = (backend == Backend::Sqlite).then(|| Arc::new(Mutex::new(())));
        let sqlite_writer = match backend {
            Backend::Postgres => None,
            Backend::Sqlite => {
                let options = db.get_sqlite_connection_pool().connect_options();
                let path = options.get_filename();
                let name = path.to_string_lossy();
                anyhow::ensure!(
                    !name.is_empty()
                        && name != ":memory:"
                        && !name.starts_with("file:sqlx-in-memory"),
                    "the catalog keeps its products in an SQLite file or in PostgreSQL; an \
                     in-memory SQLite database is not supported (set database.url to \
                     sqlite://<path>)"
                );
                Some(write_sqlite::SqliteWriter::new(path.to_owned()))
            }
        };
        Ok(Self {
            db,
            backend,
            write_lock,
            write_retries: write_retries.max(1),
            max_version_jump: None,
            cache: ProductCache::new(cache_entries),
            sqlite_writer,
        })
    }

    /// This store with the version guard on: a write whose version is more than `jump` ahead
    /// of its product's stored version is refused (see [`crate::bulk::plan`]).
    #[must_use]
    pub fn with_max_version_jump(mut self, jump: Option<u64>) -> Self {
        self.max_version_jump = jump;
        self
    }

    /// The read cache.
    pub fn cache(&self) -> &ProductCache {
        &self.cache
    }

    /// The connection, for readiness checks.
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    async fn begin_write(&self) -> Result<WriteTxn<'_>, DbErr> {
        let guard = match &self.write_lock {
            Some(lock) => Some(lock.lock().await),
            None => None,
        };
        let txn = self
            .db
            .begin_with_options(TransactionOptions {
                sqlite_transaction_mode: (self.backend == Backend::Sqlite)
                    .then_some(SqliteTransactionMode::Immediate),
                ..TransactionOptions::default()
            })
            .await?;
        Ok(WriteTxn { txn, _guard: guard })
    }
}

/// Maps a database error to what a caller can act on: the database's absence (lost or reset
/// connections, failover, shutdown, exhausted pools, statement and lock timeouts; see
/// [`mall_db::is_unavailable`]) is UNAVAILABLE (retry later), anything else INTERNAL (logged
/// with its cause).
fn db_error(error: DbErr, action: &'static str) -> ServiceError {
    if mall_db::is_unavailable(&error) {
        tracing::warn!(%error, action, "database unavailable");
        return ServiceError::Unavailable(
            "the catalog database is unavailable; retry with backoff".into(),
        );
    }
    ServiceError::Internal(anyhow::Error::new(error).context(action))
}

/// The retries of a conflicted write: the shared policy (`mall_retry`) from 10 ms doubling up
/// to 500 ms, jittered so retrying writers spread out.
fn backoff() -> mall_retry::Backoff {
    mall_retry::Backoff::new(Duration::from_millis(10), Duration::from_millis(500))
}

/// Microseconds since the Unix epoch.
pub fn micros(t: Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(t.nanos / 1_000))
}

/// The timestamp `us` microseconds after the Unix epoch.
pub fn timestamp(us: i64) -> Timestamp {
    Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: i32::try_from(us.rem_euclid(1_000_000) * 1_000).unwrap_or_default(),
    }
}

/// Now, at microsecond precision (what the database keeps).
pub fn now() -> Timestamp {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    timestamp(i64::try_from(now.as_micros()).unwrap_or(i64::MAX))
}

/// The row of `stored`.
fn to_model(stored: &Stored) -> products::Model {
    let product = &stored.product;
    let [
        brand_version,
        category_path_version,
        status_version,
        names_version,
        descriptions_version,
        prices_version,
        attributes_version,
    ] = stored.versions.0.map(to_i64);
    products::Model {
        code: product.code.clone(),
        product_type: product.product_type.clone(),
        brand: product.brand.clone(),
        category_path: json(&product.category_path),
        status: i16::try_from(product.status).unwrap_or_default(),
        names: json(&product.names),
        descriptions: json(&product.descriptions),
        prices: json(&product.prices),
        attributes: mall_product::attributes::to_json_text(product.attributes.as_ref()),
        version: to_i64(product.version),
        create_time: product.create_time.map(micros).unwrap_or_default(),
        update_time: product.update_time.map(micros).unwrap_or_default(),
        brand_version,
        category_path_version,
        status_version,
        names_version,
        descriptions_version,
        prices_version,
        attributes_version,
    }
}

/// A version as the database keeps it (validation caps versions far below `i64::MAX`).
fn to_i64(version: u64) -> i64 {
    i64::try_from(version).unwrap_or(i64::MAX)
}

/// The field versions of `row`.
fn field_versions(row: &products::Model) -> FieldVersions {
    versions_of(
        [
            row.brand_version,
            row.category_path_version,
            row.status_version,
            row.names_version,
            row.descriptions_version,
            row.prices_version,
            row.attributes_version,
        ],
        row.version,
    )
}

/// Field versions from their columns and the row's `version`. This code keeps `version` the
/// highest field version; a row whose `version` is higher was written by a catalog from
/// before field versions (a replica not yet replaced during a rolling upgrade), under the
/// row-level guard: every field counts as written at `version`, which is what that guard
/// meant, so nothing written there moves back.
fn versions_of(columns: [i64; 7], version: i64) -> FieldVersions {
    let versions = FieldVersions(columns.map(|v| u64::try_from(v).unwrap_or_default()));
    let version = u64::try_from(version).unwrap_or_default();
    if version > versions.max() {
        FieldVersions::all(version)
    } else {
        versions
    }
}

/// The product and field versions in `row`.
///
/// # Errors
/// When a JSON column does not parse: the row was not written by this service.
fn stored_from_model(row: products::Model) -> anyhow::Result<Stored> {
    let versions = field_versions(&row);
    Ok(Stored {
        product: from_model(row)?,
        versions,
    })
}

/// The product in `row`.
///
/// # Errors
/// When a JSON column does not parse: the row was not written by this service.
fn from_model(row: products::Model) -> anyhow::Result<Product> {
    fn parse<T: serde::de::DeserializeOwned>(
        text: &str,
        column: &str,
        code: &str,
    ) -> anyhow::Result<T> {
        serde_json::from_str(text)
            .with_context(|| format!("column {column} of product {code:?} is not valid json"))
    }
    let attributes: serde_json::Map<String, serde_json::Value> =
        parse(&row.attributes, "attributes", &row.code)?;
    Ok(Product {
        category_path: parse(&row.category_path, "category_path", &row.code)?,
        names: parse::<BTreeMap<_, _>>(&row.names, "names", &row.code)?,
        descriptions: parse::<BTreeMap<_, _>>(&row.descriptions, "descriptions", &row.code)?,
        prices: parse::<BTreeMap<_, _>>(&row.prices, "prices", &row.code)?,
        attributes: (!attributes.is_empty())
            .then(|| mall_product::attributes::from_json(&attributes)),
        status: i32::from(row.status),
        version: u64::try_from(row.version).unwrap_or_default(),
        create_time: Some(timestamp(row.create_time)),
        update_time: Some(timestamp(row.update_time)),
        code: row.code,
        product_type: row.product_type,
        brand: row.brand,
    })
}

/// JSON text of a list or map of a product.
fn json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).expect("lists and maps of strings and numbers always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_written_without_field_versions_counts_every_field_at_its_version() {
        assert_eq!(versions_of([0; 7], 9), FieldVersions::all(9));
        assert_eq!(
            versions_of([5, 5, 5, 3, 5, 5, 5], 10),
            FieldVersions::all(10)
        );
        let own = versions_of([5, 5, 5, 7, 5, 5, 5], 7);
        assert_eq!(own, FieldVersions([5, 5, 5, 7, 5, 5, 5]));
    }

    #[test]
    fn timestamps_survive_microseconds() {
        for us in [0, 1, 1_800_000_000_123_456, -1] {
            assert_eq!(micros(timestamp(us)), us);
        }
    }

    #[test]
    fn a_product_survives_its_row() {
        let product = Product {
            code: "AP-1".into(),
            product_type: "apparel".into(),
            brand: "Maison".into(),
            category_path: vec!["women".into(), "coats".into()],
            status: 1,
            names: [("ko".to_owned(), "코트".to_owned())].into(),
            descriptions: [("ko".to_owned(), String::new())].into(),
            prices: [("KRW".to_owned(), 129_000)].into(),
            attributes: Some(mall_product::attributes::from_json(
                &serde_json::from_str(r#"{"sizes":["S"]}"#).expect("json"),
            )),
            version: 7,
            create_time: Some(timestamp(1)),
            update_time: Some(timestamp(2)),
        };
        let mut versions = FieldVersions::all(7);
        versions.0[4] = 3;
        let stored = Stored {
            product: product.clone(),
            versions,
        };
        assert_eq!(
            stored_from_model(to_model(&stored)).expect("parses"),
            stored
        );
    }
}
