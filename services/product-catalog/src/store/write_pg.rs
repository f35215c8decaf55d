//! The PostgreSQL write path: constant SQL with array parameters, so a request of any size
//! is three statements, each parsed and planned once per connection.
//!
//! 1. `LOCK`: lock the stored rows of the request's codes in code order and read their field
//!    versions (and the transaction ids that last wrote them);
//! 2. `ROWS`: only when a stored value can survive the request ([`needing_values`]), read
//!    those rows whole;
//! 3. plan in memory ([`crate::bulk::plan`]);
//! 4. `WRITE`: one statement inserts the new products, updates the existing ones, appends
//!    the change log and remembers the request id with its response, all from `unnest` of
//!    arrays (binary parameters, no per-row SQL).
//!
//! # Commit order without a global lock
//! Writers commit in parallel. The change log is read in `(xid, seq)` order below the
//! commit-order watermark (see `changes`), which misses nothing and repeats nothing. One
//! product's changes must also be in the order they were written: a transaction that locks
//! a product last written by a transaction with a *higher* id (it took its id before that
//! one and waited for it) gives up and runs again with a new, higher id. Overlapping writers
//! of one product are rare (the relay's lanes partition products), so this retry is too.
//!
//! A retry must not lose the same race again: under steady overlap (several writers of the
//! same products, each waiting at its first rows while a younger one overtakes it) a retry
//! with a fresh id can conflict again and again until the budget runs out. So every first
//! attempt holds the catalog's write lock ([`WRITE_LOCK`], a transaction-level advisory
//! lock) *shared*, and a retry holds it *exclusively*: it starts once the writers in flight
//! have finished and none starts beside it, so no writer's row lock stands in its way,
//! nobody overtakes it, and it cannot lose that race. (Maintenance's expiry of pending rows
//! locks rows without the write lock; it never writes `write_xid`, so it only delays.) The
//! lock is taken before the first row lock, while the transaction has no id yet. Writers
//! that do not overlap never wait for each other; one conflict costs a pause of all writers,
//! across replicas, until the writes in flight end: a retry waits for the lock at most
//! [`EXCLUSIVE_WAIT`] (a writer stuck longer, say on a vanished replica's session, would
//! otherwise stall every write), and then counts as one more conflict. During a rolling
//! upgrade from a version without the lock, its replicas' writes do not take it.
//!
//! A retry that finds its request id committed meanwhile (a client's retry through another
//! replica) answers with that first response, as a first attempt would.

use mall_product::{attributes, mask::PATHS};
use mall_proto::catalog::v1::BulkUpdateProductsResponse;
use prost::Message as _;
use sea_orm::{
    DbErr, RuntimeErr,
    sqlx::{
        self, Arguments as _, PgPool, Row as _,
        encode::IsNull,
        error::BoxDynError,
        postgres::{
            PgArgumentBuffer, PgArguments, PgBindIterExt as _, PgHasArrayType, PgRow, PgTypeInfo,
        },
    },
};
use std::{
    cell::Cell,
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use super::{
    Store,
    entity::products,
    micros, stored_from_model, timestamp, to_i64, versions_of,
    write::{Attempt, AttemptError, Rules, WriteOutcome, decide},
};
use crate::bulk::{Change, Plan, Stored, Write, needing_values};
use mall_proto::catalog::v1::Product;

/// Locks the request's stored products in code order; reads what the plan needs of each.
const LOCK: &str = "SELECT code, product_type, create_time, version, brand_version, \
    category_path_version, status_version, names_version, descriptions_version, \
    prices_version, attributes_version, write_xid, pg_current_xact_id()::text::bigint AS me \
    FROM products WHERE code = ANY($1) ORDER BY code FOR UPDATE";

/// The catalog's write lock, taken before `LOCK`: shared by a first attempt, exclusive by a
/// retry (see the module docs). The two-key form keeps it apart from single-key advisory
/// locks; the keys spell "mall" and 1.
const WRITE_LOCK: (i32, i32) = (0x6d61_6c6c, 1);
const WRITE_LOCK_SHARED: &str = "SELECT pg_advisory_xact_lock_shared($1, $2)";
const WRITE_LOCK_EXCLUSIVE: &str = "SELECT pg_advisory_xact_lock($1, $2)";
/// Longest wait of a retry for the exclusive write lock (`lock_timeout` for that statement
/// only; every writer queues behind it meanwhile).
const EXCLUSIVE_WAIT: &str = "2s";
/// PostgreSQL's `lock_not_available`: a lock wait ran past `lock_timeout`.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// Whole rows (already locked by `LOCK`).
const ROWS: &str = "SELECT code, product_type, brand, category_path, status, names, \
    descriptions, prices, attributes, version, create_time, update_time, brand_version, \
    category_path_version, status_version, names_version, descriptions_version, \
    prices_version, attributes_version FROM products WHERE code = ANY($1)";

/// A stored response, for a request id seen before.
const REMEMBERED: &str = "SELECT response FROM bulk_requests WHERE request_id = $1";

/// Every write of a request in one statement. Rows `$1..$20` (`$20`: whether the product was
/// stored before); change-log entries `$21..$28`; the request id, its response and time
/// `$29..$31` (`$29` NULL without a request id). Answers how many products were created and
/// updated, whether the request id was new, and the transaction's id.
const WRITE: &str = "WITH input AS ( \
      SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int2[], \
        $6::text[], $7::text[], $8::text[], $9::text[], $10::int8[], $11::int8[], \
        $12::int8[], $13::int8[], $14::int8[], $15::int8[], $16::int8[], $17::int8[], \
        $18::int8[], $19::int8[], $20::bool[]) \
      AS i(code, product_type, brand, category_path, status, names, descriptions, prices, \
        attributes, version, create_time, update_time, brand_version, \
        category_path_version, status_version, names_version, descriptions_version, \
        prices_version, attributes_version, existed)), \
    created AS ( \
      INSERT INTO products (code, product_type, brand, category_path, status, names, \
        descriptions, prices, attributes, version, create_time, update_time, brand_version, \
        category_path_version, status_version, names_version, descriptions_version, \
        prices_version, attributes_version, write_xid) \
      SELECT code, product_type, brand, category_path, status, names, descriptions, prices, \
        attributes, version, create_time, update_time, brand_version, \
        category_path_version, status_version, names_version, descriptions_version, \
        prices_version, attributes_version, pg_current_xact_id()::text::bigint \
      FROM input WHERE NOT existed \
      ON CONFLICT (code) DO NOTHING RETURNING 1), \
    updated AS ( \
      UPDATE products p SET product_type = i.product_type, brand = i.brand, \
        category_path = i.category_path, status = i.status, names = i.names, \
        descriptions = i.descriptions, prices = i.prices, attributes = i.attributes, \
        version = i.version, create_time = i.create_time, update_time = i.update_time, \
        brand_version = i.brand_version, category_path_version = i.category_path_version, \
        status_version = i.status_version, names_version = i.names_version, \
        descriptions_version = i.descriptions_version, prices_version = i.prices_version, \
        attributes_version = i.attributes_version, \
        write_xid = pg_current_xact_id()::text::bigint \
      FROM input i WHERE i.existed AND p.code = i.code AND p.version <= i.version \
      RETURNING 1), \
    logged AS ( \
      INSERT INTO product_changes (code, product_type, version, previous_version, \
        commit_time, product, written_fields, change_version) \
      SELECT code, product_type, version, previous_version, commit_time, product, \
        written_fields, change_version \
      FROM unnest($21::text[], $22::text[], $23::int8[], $24::int8[], $25::int8[], \
        $26::bytea[], $27::int2[], $28::int8[]) WITH ORDINALITY \
        AS c(code, product_type, version, previous_version, commit_time, product, \
          written_fields, change_version, n) \
      ORDER BY n), \
    remembered AS ( \
      INSERT INTO bulk_requests (request_id, response, create_time) \
      SELECT $29::text, $30::bytea, $31::int8 WHERE $29::text IS NOT NULL \
      ON CONFLICT (request_id) DO NOTHING RETURNING 1) \
    SELECT (SELECT count(*) FROM created) AS created, (SELECT count(*) FROM updated) AS updated, \
      (SELECT count(*) FROM remembered) AS remembered, \
      pg_current_xact_id()::text::bigint AS xid";

impl Store {
    /// One attempt of a bulk write on PostgreSQL; see the module docs.
    pub(super) async fn attempt_bulk_write_pg(
        &self,
        pool: &PgPool,
        request_id: Option<&str>,
        writes: &mut [Write],
        rules: Rules,
        retry: bool,
    ) -> Result<Attempt, AttemptError> {
        if let Some(id) = request_id
            && let Some(first) = remembered(pool, id).await?
        {
            return Ok(Attempt::Done(WriteOutcome::Replayed(first)));
        }
        let now = super::now();
        let mut txn = pool.begin().await.map_err(db)?;
        if retry {
            if !lock_exclusively(&mut txn).await? {
                return Ok(Attempt::Conflict(
                    "writes in flight held the write lock past the retry's wait",
                ));
            }
        } else {
            sqlx::query(WRITE_LOCK_SHARED)
                .bind(WRITE_LOCK.0)
                .bind(WRITE_LOCK.1)
                .execute(&mut *txn)
                .await
                .map_err(db)?;
        }
        let Some(stored) = read_for_write(&mut txn, writes).await? else {
            return Ok(Attempt::Conflict(
                "a product was last written by a transaction that began after this one",
            ));
        };
        let (plan, response) = decide(writes, stored, now, rules, request_id.is_some())?;
        let xid = match commit(pool, txn, &plan, request_id, response, now).await {
            Ok(Ok(xid)) => xid,
            // Not committed: a next attempt starts from the writes as they came.
            Ok(Err(attempt)) => {
                plan.give_back(writes);
                return Ok(attempt);
            }
            Err(error) => {
                plan.give_back(writes);
                return Err(error);
            }
        };
        // Read-your-writes here, and no database reads for what was just written; other
        // replicas learn it from the change log. Pending rows are invisible: forgotten.
        let mut plan = plan;
        let (visible, pending): (Vec<_>, Vec<_>) = std::mem::take(&mut plan.rows)
            .into_values()
            .partition(|row| row.stored.product.status != 0);
        self.cache
            .invalidate(pending.iter().map(|row| row.stored.product.code.as_str()));
        self.cache
            .put_written(visible.into_iter().map(|row| row.stored.product), xid);
        Ok(self.applied(plan))
    }
}

/// Writes `plan` and commits: the commit's transaction id (the read cache's order), or what
/// the attempt ends in without committing.
async fn commit(
    pool: &PgPool,
    mut txn: sqlx::Transaction<'static, sqlx::Postgres>,
    plan: &Plan,
    request_id: Option<&str>,
    response: Option<Vec<u8>>,
    now: prost_types::Timestamp,
) -> Result<Result<i64, Attempt>, AttemptError> {
    let Written {
        created,
        updated,
        new_request,
        xid,
    } = write(&mut txn, plan, request_id, response, now).await?;
    let existing = plan.rows.values().filter(|r| r.existed).count();
    if created != plan.rows.len() - existing {
        return Ok(Err(Attempt::Conflict(
            "a concurrent request created one of the products",
        )));
    }
    if updated != existing {
        return Ok(Err(Attempt::Conflict(
            "a stored product changed while it was locked",
        )));
    }
    if let Some(id) = request_id
        && !new_request
    {
        // A concurrent attempt of the same request committed first (this insert waited for
        // it): roll back and answer with its response.
        txn.rollback().await.map_err(db)?;
        return Ok(Err(match remembered(pool, id).await? {
            Some(first) => Attempt::Done(WriteOutcome::Replayed(first)),
            None => Attempt::Conflict("the same request id committed concurrently"),
        }));
    }
    txn.commit().await.map_err(db)?;
    Ok(Ok(xid))
}

/// Takes the write lock exclusively, waiting at most [`EXCLUSIVE_WAIT`]; `false` when that
/// ran out (the transaction is then aborted: drop it).
async fn lock_exclusively(txn: &mut sqlx::PgConnection) -> Result<bool, AttemptError> {
    let previous: String = sqlx::query_scalar("SELECT current_setting('lock_timeout')")
        .fetch_one(&mut *txn)
        .await
        .map_err(db)?;
    let set = "SELECT set_config('lock_timeout', $1, true)";
    sqlx::query(set)
        .bind(EXCLUSIVE_WAIT)
        .execute(&mut *txn)
        .await
        .map_err(db)?;
    match sqlx::query(WRITE_LOCK_EXCLUSIVE)
        .bind(WRITE_LOCK.0)
        .bind(WRITE_LOCK.1)
        .execute(&mut *txn)
        .await
    {
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(LOCK_NOT_AVAILABLE) => {
            return Ok(false);
        }
        other => {
            other.map_err(db)?;
        }
    }
    sqlx::query(set)
        .bind(previous)
        .execute(&mut *txn)
        .await
        .map_err(db)?;
    Ok(true)
}

/// The first response to `request_id`, if it was seen before.
async fn remembered(
    pool: &PgPool,
    request_id: &str,
) -> Result<Option<BulkUpdateProductsResponse>, AttemptError> {
    let Some(row) = sqlx::query(REMEMBERED)
        .bind(request_id)
        .fetch_optional(pool)
        .await
        .map_err(db)?
    else {
        return Ok(None);
    };
    let response: Option<Vec<u8>> = row.try_get(0).map_err(db)?;
    let response = response.ok_or(AttemptError::Db(DbErr::RecordNotFound(
        "the response of a remembered request id".into(),
    )))?;
    BulkUpdateProductsResponse::decode(response.as_slice())
        .map(Some)
        .map_err(|e| AttemptError::Db(DbErr::Custom(e.to_string())))
}

/// Locks and reads what the plan needs (see [`super::write`]); `None` when a product was
/// last written by a transaction with a higher id than this one (retry).
async fn read_for_write(
    txn: &mut sqlx::PgConnection,
    writes: &[Write],
) -> Result<Option<BTreeMap<String, Stored>>, AttemptError> {
    let mut codes: Vec<&str> = writes.iter().map(|w| w.product.code.as_str()).collect();
    codes.sort_unstable();
    codes.dedup();
    let rows = sqlx::query(LOCK)
        .bind(&codes)
        .fetch_all(&mut *txn)
        .await
        .map_err(db)?;
    let mut stored = BTreeMap::new();
    for row in rows {
        let write_xid: i64 = row.try_get(11).map_err(db)?;
        let me: i64 = row.try_get(12).map_err(db)?;
        if write_xid > me {
            return Ok(None);
        }
        let code: String = row.try_get(0).map_err(db)?;
        let mut columns = [0i64; 7];
        for (i, column) in columns.iter_mut().enumerate() {
            *column = row.try_get(4 + i).map_err(db)?;
        }
        let versions = versions_of(columns, row.try_get(3).map_err(db)?);
        let product = Product {
            code: code.clone(),
            product_type: row.try_get(1).map_err(db)?,
            version: versions.max(),
            create_time: Some(timestamp(row.try_get(2).map_err(db)?)),
            ..Product::default()
        };
        stored.insert(code, Stored { product, versions });
    }
    let whole = needing_values(writes, &stored);
    if !whole.is_empty() {
        let rows = sqlx::query(ROWS)
            .bind(&whole)
            .fetch_all(&mut *txn)
            .await
            .map_err(db)?;
        for row in rows {
            let row = stored_from_model(model(&row).map_err(db)?)
                .map_err(|e| AttemptError::Fatal(mall_grpc::ServiceError::Internal(e)))?;
            stored.insert(row.product.code.clone(), row);
        }
    }
    Ok(Some(stored))
}

/// The row `ROWS` read.
fn model(row: &PgRow) -> Result<products::Model, sqlx::Error> {
    Ok(products::Model {
        code: row.try_get(0)?,
        product_type: row.try_get(1)?,
        brand: row.try_get(2)?,
        category_path: row.try_get(3)?,
        status: row.try_get(4)?,
        names: row.try_get(5)?,
        descriptions: row.try_get(6)?,
        prices: row.try_get(7)?,
        attributes: row.try_get(8)?,
        version: row.try_get(9)?,
        create_time: row.try_get(10)?,
        update_time: row.try_get(11)?,
        brand_version: row.try_get(12)?,
        category_path_version: row.try_get(13)?,
        status_version: row.try_get(14)?,
        names_version: row.try_get(15)?,
        descriptions_version: row.try_get(16)?,
        prices_version: row.try_get(17)?,
        attributes_version: row.try_get(18)?,
    })
}

/// What `WRITE` did.
struct Written {
    /// Products created.
    created: usize,
    /// Products updated.
    updated: usize,
    /// Whether the request id was new (false without one).
    new_request: bool,
    /// The transaction's id: the commit order of its products' writes.
    xid: i64,
}

/// Runs `WRITE` for `plan`.
async fn write(
    txn: &mut sqlx::PgConnection,
    plan: &Plan,
    request_id: Option<&str>,
    response: Option<Vec<u8>>,
    now: prost_types::Timestamp,
) -> Result<Written, AttemptError> {
    let arguments =
        arguments(plan, request_id, response, now).map_err(|e| db(sqlx::Error::Encode(e)))?;
    let row = sqlx::query_with(WRITE, arguments)
        .fetch_one(&mut *txn)
        .await
        .map_err(db)?;
    let count = |i: usize| -> Result<usize, AttemptError> {
        let n: i64 = row.try_get(i).map_err(db)?;
        Ok(usize::try_from(n).unwrap_or_default())
    };
    Ok(Written {
        created: count(0)?,
        updated: count(1)?,
        new_request: count(2)? == 1,
        xid: row.try_get(3).map_err(db)?,
    })
}

/// `WRITE`'s parameters for `plan`. Each array is encoded straight from the plan into the
/// statement's buffer ([`PgBindIterExt::bind_iter`], [`Json`], [`Encoded`]), reserved up
/// front ([`BYTES_PER_ITEM`]): building the columns as vectors of owned strings first copied
/// every value twice.
fn arguments(
    plan: &Plan,
    request_id: Option<&str>,
    response: Option<Vec<u8>>,
    now: prost_types::Timestamp,
) -> Result<PgArguments, BoxDynError> {
    let rows = || plan.rows.values().map(|row| &row.stored);
    let products = || rows().map(|row| &row.product);
    let version = |field: usize| rows().map(move |row| to_i64(row.versions.0[field]));
    // Looked up once: each change-log column reads them.
    let change_list: Vec<(&Change, &Product)> = plan
        .changes
        .iter()
        .map(|c| (c, plan.product_after(c)))
        .collect();
    let changes = || change_list.iter().copied();
    // Rows plus change-log entries; the buffer is reserved from the size of the last
    // statement's JSON and protobuf values, plus about what the other columns take.
    let items = plan.rows.len() + change_list.len();
    let written = Cell::new(0);
    let mut arguments = PgArguments::default();
    arguments.reserve(31, items * (BYTES_PER_ITEM.load(Ordering::Relaxed) + 256));
    let a = &mut arguments;
    a.add(products().map(|p| p.code.as_str()).bind_iter())?;
    a.add(products().map(|p| p.product_type.as_str()).bind_iter())?;
    a.add(products().map(|p| p.brand.as_str()).bind_iter())?;
    a.add(
        products()
            .map(|p| Json(&p.category_path, &written))
            .bind_iter(),
    )?;
    a.add(
        products()
            .map(|p| i16::try_from(p.status).unwrap_or_default())
            .bind_iter(),
    )?;
    a.add(products().map(|p| Json(&p.names, &written)).bind_iter())?;
    a.add(
        products()
            .map(|p| Json(&p.descriptions, &written))
            .bind_iter(),
    )?;
    a.add(products().map(|p| Json(&p.prices, &written)).bind_iter())?;
    a.add(
        products()
            .map(|p| Json(attributes::as_json(p.attributes.as_ref()), &written))
            .bind_iter(),
    )?;
    a.add(products().map(|p| to_i64(p.version)).bind_iter())?;
    a.add(
        products()
            .map(|p| p.create_time.map(micros).unwrap_or_default())
            .bind_iter(),
    )?;
    a.add(
        products()
            .map(|p| p.update_time.map(micros).unwrap_or_default())
            .bind_iter(),
    )?;
    // The field versions, in the mask's order (`PATHS`).
    for field in 0..PATHS.len() {
        a.add(version(field).bind_iter())?;
    }
    a.add(plan.rows.values().map(|row| row.existed).bind_iter())?;
    a.add(changes().map(|(_, p)| p.code.as_str()).bind_iter())?;
    a.add(changes().map(|(_, p)| p.product_type.as_str()).bind_iter())?;
    a.add(changes().map(|(_, p)| to_i64(p.version)).bind_iter())?;
    a.add(
        changes()
            .map(|(c, _)| to_i64(c.previous_version))
            .bind_iter(),
    )?;
    a.add(
        changes()
            .map(|(_, p)| p.update_time.map(micros).unwrap_or_default())
            .bind_iter(),
    )?;
    a.add(changes().map(|(_, p)| Encoded(p, &written)).bind_iter())?;
    a.add(
        changes()
            .map(|(c, _)| i16::from(c.written.bits()))
            .bind_iter(),
    )?;
    a.add(changes().map(|(c, _)| to_i64(c.change_version)).bind_iter())?;
    a.add(request_id)?;
    a.add(response)?;
    a.add(micros(now))?;
    if let Some(hint) = bytes_per_item(written.get(), items) {
        BYTES_PER_ITEM.store(hint, Ordering::Relaxed);
    }
    Ok(arguments)
}

/// The [`BYTES_PER_ITEM`] hint a statement of `items` items whose values took `written` bytes
/// leaves, at most [`MAX_BYTES_PER_ITEM`]; none for an empty statement (the hint stays).
fn bytes_per_item(written: usize, items: usize) -> Option<usize> {
    Some(written.checked_div(items)?.min(MAX_BYTES_PER_ITEM))
}

/// Bytes per item (row or change-log entry) that the JSON and protobuf values of this
/// process's last `WRITE` took, from which the next one's buffer is reserved: grown by
/// doubling as it filled (to a megabyte or more), the buffer was copied at every step.
static BYTES_PER_ITEM: AtomicUsize = AtomicUsize::new(1_024);

/// The most [`BYTES_PER_ITEM`] assumes: one request of a few very large products (32
/// descriptions of 20,000 characters pass validation) must not make the next request of
/// 1,000 reserve gigabytes; beyond this a buffer grows as it fills. A request of 1,000
/// products (2,000 items: rows and change-log entries) reserves at most about 8.7 MB.
const MAX_BYTES_PER_ITEM: usize = 4 << 10;

/// A value written as the JSON text the catalog stores (a `text` parameter), serialized
/// straight into the statement's buffer; adds the bytes it took to the counter.
struct Json<'c, T>(T, &'c Cell<usize>);

impl<T: serde::Serialize> sqlx::Type<sqlx::Postgres> for Json<'_, T> {
    fn type_info() -> PgTypeInfo {
        <&str as sqlx::Type<sqlx::Postgres>>::type_info()
    }
}

impl<T: serde::Serialize> PgHasArrayType for Json<'_, T> {
    fn array_type_info() -> PgTypeInfo {
        <&str as PgHasArrayType>::array_type_info()
    }
}

impl<T: serde::Serialize> sqlx::Encode<'_, sqlx::Postgres> for Json<'_, T> {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        let start = buf.len();
        serde_json::to_writer(&mut **buf, &self.0)?;
        self.1.set(self.1.get() + buf.len() - start);
        Ok(IsNull::No)
    }
}

/// A product protobuf-encoded (a `bytea` parameter) straight into the statement's buffer;
/// adds the bytes it took to the counter.
struct Encoded<'a>(&'a Product, &'a Cell<usize>);

impl sqlx::Type<sqlx::Postgres> for Encoded<'_> {
    fn type_info() -> PgTypeInfo {
        <&[u8] as sqlx::Type<sqlx::Postgres>>::type_info()
    }
}

impl PgHasArrayType for Encoded<'_> {
    fn array_type_info() -> PgTypeInfo {
        <&[u8] as PgHasArrayType>::array_type_info()
    }
}

impl sqlx::Encode<'_, sqlx::Postgres> for Encoded<'_> {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        let buf: &mut Vec<u8> = buf;
        let start = buf.len();
        // Not `encode`, which first computes the whole message's length (a walk of all of
        // it) only to check the buffer's capacity: a `Vec` grows as needed. `encode_raw` is
        // what `encode` and `encode_to_vec` call after that check.
        self.0.encode_raw(buf);
        self.1.set(self.1.get() + buf.len() - start);
        Ok(IsNull::No)
    }
}

/// A driver error as the store's other paths see it (so retry and UNAVAILABLE
/// classification stay in one place).
fn db(error: sqlx::Error) -> AttemptError {
    AttemptError::Db(DbErr::Exec(RuntimeErr::SqlxError(Arc::new(error))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bulk::Stored;
    use mall_product::mask::FieldVersions;
    use prost_types::{Struct, Value, value::Kind};

    /// What the statement's `text` or `bytea` parameter holds for `value`.
    fn encoded(value: impl sqlx::Encode<'static, sqlx::Postgres>) -> Vec<u8> {
        let mut buf = PgArgumentBuffer::default();
        assert!(matches!(value.encode_by_ref(&mut buf), Ok(IsNull::No)));
        buf.to_vec()
    }

    #[test]
    fn the_buffer_hint_is_the_mean_size_capped_and_an_empty_statement_leaves_it() {
        assert_eq!(bytes_per_item(1_400_000, 2_000), Some(700));
        // One product with 32 descriptions of 20,000 characters: about 2.6 MB.
        assert_eq!(bytes_per_item(2_600_000, 2), Some(MAX_BYTES_PER_ITEM));
        assert_eq!(bytes_per_item(0, 0), None);
    }

    #[test]
    fn values_are_encoded_as_the_stored_text_and_bytes_of_every_backend() {
        let attributes = Struct {
            fields: [
                ("size".to_owned(), Kind::StringValue("270 \"mm\"\n".into())),
                ("count".to_owned(), Kind::NumberValue(3.5)),
                ("sale".to_owned(), Kind::BoolValue(true)),
            ]
            .into_iter()
            .map(|(k, kind)| (k, Value { kind: Some(kind) }))
            .collect(),
        };
        let product = Product {
            code: "SHOE-1".into(),
            product_type: "shoes".into(),
            brand: "Brand \u{1F45F}".into(),
            category_path: vec!["신발".into(), "운동화".into()],
            status: 1,
            names: [("ko".to_owned(), "운동화 \"1\"".to_owned())].into(),
            descriptions: [("en".to_owned(), "tab\there".to_owned())].into(),
            prices: [("KRW".to_owned(), 129_000)].into(),
            attributes: Some(attributes),
            version: 7,
            ..Product::default()
        };
        // What SQLite stores (and PostgreSQL stored before this encoding).
        let model = super::super::to_model(&Stored {
            product: product.clone(),
            versions: FieldVersions::all(7),
        });
        let counted = Cell::new(0);
        let json = |value| String::from_utf8(value).expect("JSON is UTF-8");
        assert_eq!(
            json(encoded(Json(&product.category_path, &counted))),
            model.category_path
        );
        assert_eq!(json(encoded(Json(&product.names, &counted))), model.names);
        assert_eq!(
            json(encoded(Json(&product.descriptions, &counted))),
            model.descriptions
        );
        assert_eq!(json(encoded(Json(&product.prices, &counted))), model.prices);
        let attributes = attributes::as_json(product.attributes.as_ref());
        assert_eq!(json(encoded(Json(attributes, &counted))), model.attributes);
        assert_eq!(
            json(encoded(Json(attributes::as_json(None), &counted))),
            "{}"
        );
        assert_eq!(
            encoded(Encoded(&product, &counted)),
            product.encode_to_vec()
        );
        let expected = [
            &model.category_path,
            &model.names,
            &model.descriptions,
            &model.prices,
            &model.attributes,
        ]
        .iter()
        .map(|text| text.len())
        .sum::<usize>()
            + 2
            + product.encoded_len();
        assert_eq!(counted.get(), expected, "every byte written is counted");
    }
}
