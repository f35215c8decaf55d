//! Reads: by code, by many codes, and keyset pages in code order.

use std::collections::BTreeMap;

use mall_grpc::ServiceError;
use mall_proto::catalog::v1::Product;
use sea_orm::{
    ColumnTrait as _, Condition, EntityTrait as _, QueryFilter as _, QueryOrder as _,
    QuerySelect as _,
};

use super::{Store, db_error, entity::products, from_model};

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
        let mut condition = Condition::all();
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
