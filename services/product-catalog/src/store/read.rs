//! Reads: by code, by many codes, and keyset pages in code order. Pending products (rows no
//! change has given a status yet) are invisible here; only [`Store::list_pending`] and the
//! expiry see them.

use std::collections::BTreeMap;

use mall_grpc::ServiceError;
use mall_product::UpdateMask;
use mall_proto::catalog::v1::Product;
use prost_types::Timestamp;
use sea_orm::{
    ColumnTrait as _, Condition, EntityTrait as _, QueryFilter as _, QueryOrder as _,
    QuerySelect as _, sea_query::SimpleExpr,
};

use super::{Store, db_error, entity::products, field_versions, from_model, timestamp};

/// Filters of ListProducts; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ListFilter {
    /// Only this product type.
    pub product_type: Option<String>,
    /// Only this brand (exact).
    pub brand: Option<String>,
    /// Only this status (a ProductStatus value).
    pub status: Option<i32>,
    /// Only products updated strictly after this many microseconds since the epoch.
    pub updated_after: Option<i64>,
}

impl Store {
    /// The product with `code`, if stored.
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails.
    pub async fn get(&self, code: &str) -> Result<Option<Product>, ServiceError> {
        if let Some(product) = self.cache.get(code) {
            return Ok(Some(Product::clone(&product)));
        }
        let ticket = self.cache.ticket();
        let row = products::Entity::find_by_id(code.to_owned())
            .filter(visible())
            .one(&self.db)
            .await
            .map_err(|e| db_error(e, "get product"))?;
        let product = row
            .map(from_model)
            .transpose()
            .map_err(ServiceError::Internal)?;
        if let Some(product) = &product {
            self.cache.insert(ticket, [product.clone()]);
        }
        Ok(product)
    }

    /// The stored products among `codes`, by code.
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails.
    pub async fn batch_get(
        &self,
        codes: &[String],
    ) -> Result<BTreeMap<String, Product>, ServiceError> {
        let mut found = BTreeMap::new();
        let mut missing: Vec<&str> = Vec::new();
        for code in codes {
            match self.cache.get(code) {
                Some(product) => {
                    found.insert(code.clone(), Product::clone(&product));
                }
                None => missing.push(code),
            }
        }
        if missing.is_empty() {
            return Ok(found);
        }
        missing.sort_unstable();
        missing.dedup();
        let ticket = self.cache.ticket();
        let read: Vec<Product> = products::Entity::find()
            .filter(products::Column::Code.is_in(missing))
            .filter(visible())
            .all(&self.db)
            .await
            .map_err(|e| db_error(e, "batch get products"))?
            .into_iter()
            .map(from_model)
            .collect::<anyhow::Result<_>>()
            .map_err(ServiceError::Internal)?;
        self.cache.insert(ticket, read.iter().cloned());
        found.extend(read.into_iter().map(|p| (p.code.clone(), p)));
        Ok(found)
    }

    /// Up to `limit` products matching `filter` with codes after `after`, in code order.
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails.
    pub async fn list(
        &self,
        filter: &ListFilter,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Vec<Product>, ServiceError> {
        use products::Column as C;
        let mut condition = Condition::all().add(visible());
        if let Some(after) = after {
            condition = condition.add(C::Code.gt(after));
        }
        if let Some(product_type) = &filter.product_type {
            condition = condition.add(C::ProductType.eq(product_type.as_str()));
        }
        if let Some(brand) = &filter.brand {
            condition = condition.add(C::Brand.eq(brand.as_str()));
        }
        if let Some(status) = filter.status {
            condition = condition.add(C::Status.eq(i16::try_from(status).unwrap_or_default()));
        }
        if let Some(after) = filter.updated_after {
            condition = condition.add(C::UpdateTime.gt(after));
        }
        products::Entity::find()
            .filter(condition)
            .order_by_asc(C::Code)
            .limit(limit)
            .all(&self.db)
            .await
            .map_err(|e| db_error(e, "list products"))?
            .into_iter()
            .map(from_model)
            .collect::<anyhow::Result<_>>()
            .map_err(ServiceError::Internal)
    }
}

/// A product whose partial changes came before the change that creates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRow {
    /// The code the changes named.
    pub code: String,
    /// The type the changes named.
    pub product_type: String,
    /// The fields written so far.
    pub waiting: UpdateMask,
    /// The newest of their versions.
    pub version: u64,
    /// When the first change arrived.
    pub first_seen: Timestamp,
    /// When the last change arrived.
    pub update_time: Timestamp,
}

/// Rows readers may see: those a change has given a status (a stored product's status is
/// never UNSPECIFIED, so 0 marks a pending row).
fn visible() -> SimpleExpr {
    products::Column::Status.ne(0)
}

/// Pending rows.
fn pending() -> SimpleExpr {
    products::Column::Status.eq(0)
}

impl Store {
    /// Up to `limit` pending products with codes after `after`, in code order.
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails.
    pub async fn list_pending(
        &self,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Vec<PendingRow>, ServiceError> {
        use products::Column as C;
        let mut condition = Condition::all().add(pending());
        if let Some(after) = after {
            condition = condition.add(C::Code.gt(after));
        }
        let rows = products::Entity::find()
            .filter(condition)
            .order_by_asc(C::Code)
            .limit(limit)
            .all(&self.db)
            .await
            .map_err(|e| db_error(e, "list pending products"))?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let versions = field_versions(&row);
                PendingRow {
                    waiting: versions.written(),
                    version: versions.max(),
                    first_seen: timestamp(row.create_time),
                    update_time: timestamp(row.update_time),
                    code: row.code,
                    product_type: row.product_type,
                }
            })
            .collect())
    }

    /// How many products are pending.
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails.
    pub async fn count_pending(&self) -> Result<u64, ServiceError> {
        use sea_orm::PaginatorTrait as _;
        products::Entity::find()
            .filter(pending())
            .count(&self.db)
            .await
            .map_err(|e| db_error(e, "count pending products"))
    }

    /// Deletes pending products first seen before `cutoff` (microseconds since the epoch),
    /// at most `limit`, and returns their codes. A pending row is deleted only while it is
    /// still pending: one that a creation made visible meanwhile stays.
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails.
    pub async fn expire_pending(
        &self,
        cutoff: i64,
        limit: u64,
    ) -> Result<Vec<String>, ServiceError> {
        use products::Column as C;
        let write = self
            .begin_write()
            .await
            .map_err(|e| db_error(e, "expire pending products"))?;
        let mut find = products::Entity::find()
            .select_only()
            .column(C::Code)
            .filter(pending())
            .filter(C::CreateTime.lt(cutoff))
            .order_by_asc(C::Code)
            .limit(limit);
        if self.backend == mall_db::Backend::Postgres {
            find = find.lock_exclusive();
        }
        let codes: Vec<String> = find
            .into_tuple()
            .all(&write.txn)
            .await
            .map_err(|e| db_error(e, "find expired pending products"))?;
        if !codes.is_empty() {
            products::Entity::delete_many()
                .filter(C::Code.is_in(codes.iter().map(String::as_str)))
                .filter(pending())
                .exec(&write.txn)
                .await
                .map_err(|e| db_error(e, "expire pending products"))?;
        }
        write
            .txn
            .commit()
            .await
            .map_err(|e| db_error(e, "expire pending products"))?;
        Ok(codes)
    }
}
