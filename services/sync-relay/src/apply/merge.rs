//! Merge (stage 2): the changes of one lane, in queue order, become catalog requests that end
//! in the same state as applying every change one by one.
//!
//! Per product, changes are put in version order (the producer's order may be shuffled) and
//! exact duplicates (the same version: a version names one change) are dropped. Nothing
//! else is: each change goes to the catalog as its own item, and the catalog's per-field
//! version guard decides each field. Folding changes together would be wrong two ways. An
//! item has one version, so folding v3{prices} into v8{names} would store the price at v8 and
//! wrongly refuse a late v5{prices}. And dropping a change that a newer one covers loses it
//! when the newer one is then refused and quarantined. The result is one write list per
//! product type (BulkUpdateProducts takes one type per request), each at most
//! [`MAX_ITEMS_PER_REQUEST`] items.

use std::collections::BTreeMap;

use mall_product::limits::MAX_ITEMS_PER_REQUEST;
use mall_proto::{
    catalog::v1::{BulkUpdateProductsRequest, ProductUpdate},
    sync::v1::ProductChange,
};

/// One BulkUpdateProducts worth of writes.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeBatch {
    /// The product type of every write.
    pub product_type: String,
    /// The changes to write, each product's in version order.
    pub changes: Vec<ProductChange>,
}

impl TypeBatch {
    /// The catalog request for these changes.
    pub fn request(&self) -> BulkUpdateProductsRequest {
        BulkUpdateProductsRequest {
            request_id: String::new(),
            product_type: self.product_type.clone(),
            updates: self
                .changes
                .iter()
                .map(|change| ProductUpdate {
                    product: change.product.clone(),
                    update_mask: change.update_mask.clone(),
                })
                .collect(),
        }
    }
}

/// Plans the catalog writes for `changes` (valid, in queue order).
pub fn merge(changes: Vec<ProductChange>) -> Vec<TypeBatch> {
    // Products in first-seen order, each with its changes.
    let mut order: Vec<String> = Vec::new();
    let mut by_product: BTreeMap<String, Vec<ProductChange>> = BTreeMap::new();
    for change in changes {
        let entry = by_product.entry(change.product_code.clone()).or_default();
        if entry.is_empty() {
            order.push(change.product_code.clone());
        }
        entry.push(change);
    }

    let mut by_type: BTreeMap<String, TypeBatch> = BTreeMap::new();
    for code in order {
        let Some(mut changes) = by_product.remove(&code) else {
            continue;
        };
        // Stable: equal versions keep queue order, and the first of them is kept.
        changes.sort_by_key(|c| c.version);
        changes.dedup_by_key(|c| c.version);
        for change in changes {
            by_type
                .entry(change.product_type.clone())
                .or_insert_with(|| TypeBatch {
                    product_type: change.product_type.clone(),
                    changes: Vec::new(),
                })
                .changes
                .push(change);
        }
    }

    by_type
        .into_values()
        .flat_map(|batch| {
            batch
                .changes
                .chunks(MAX_ITEMS_PER_REQUEST)
                .map(|changes| TypeBatch {
                    product_type: batch.product_type.clone(),
                    changes: changes.to_vec(),
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use mall_proto::catalog::v1::Product;
    use prost_types::FieldMask;

    use super::*;

    fn change(code: &str, product_type: &str, version: u64, paths: &[&str]) -> ProductChange {
        ProductChange {
            product_code: code.into(),
            product_type: product_type.into(),
            version,
            product: Some(Product {
                code: code.into(),
                product_type: product_type.into(),
                version,
                ..Product::default()
            }),
            update_mask: (!paths.is_empty()).then(|| FieldMask {
                paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            }),
            ..ProductChange::default()
        }
    }

    fn written(batches: &[TypeBatch]) -> Vec<(String, String, u64)> {
        batches
            .iter()
            .flat_map(|b| {
                b.request().updates.into_iter().map(|u| {
                    let p = u.product.expect("set");
                    (b.product_type.clone(), p.code, p.version)
                })
            })
            .collect()
    }

    #[test]
    fn every_version_stays_its_own_item_in_version_order() {
        let batches = merge(vec![
            change("A", "shoes", 5, &["prices"]),
            change("A", "shoes", 2, &["prices"]),
            change("A", "shoes", 4, &["names"]),
            change("A", "shoes", 3, &[]),
            change("A", "shoes", 5, &["prices"]),
        ]);
        // v2 and v3 are covered by newer changes but are kept: if v4 or v5 were refused,
        // dropping them would lose their fields.
        assert_eq!(
            written(&batches),
            [
                ("shoes".into(), "A".into(), 2),
                ("shoes".into(), "A".into(), 3),
                ("shoes".into(), "A".into(), 4),
                ("shoes".into(), "A".into(), 5)
            ]
        );
        let masks: Vec<_> = batches[0]
            .request()
            .updates
            .into_iter()
            .map(|u| u.update_mask.map(|m| m.paths))
            .collect();
        assert_eq!(
            masks,
            [
                Some(vec!["prices".to_owned()]),
                None,
                Some(vec!["names".to_owned()]),
                Some(vec!["prices".to_owned()])
            ],
            "each item keeps its own mask"
        );
    }

    #[test]
    fn products_of_different_types_go_to_different_requests() {
        let batches = merge(vec![
            change("A", "shoes", 1, &[]),
            change("B", "bags", 1, &[]),
            change("A", "bags", 2, &[]),
        ]);
        assert_eq!(
            written(&batches),
            [
                ("bags".into(), "A".into(), 2),
                ("bags".into(), "B".into(), 1),
                ("shoes".into(), "A".into(), 1)
            ],
            "products in first-seen order within a type; the catalog decides which type stands"
        );
    }

    #[test]
    fn requests_hold_at_most_the_catalogs_limit() {
        let changes = (0..2_500)
            .map(|i| change(&format!("P-{i}"), "shoes", 1, &[]))
            .collect();
        let sizes: Vec<_> = merge(changes).iter().map(|b| b.changes.len()).collect();
        assert_eq!(sizes, [1000, 1000, 500]);
    }
}
