//! Merge (stage 2): the changes of one lane, in queue order, become the fewest catalog writes
//! that end in the same state as applying every change one by one.
//!
//! Per product, changes are put in version order (the producer's order may be shuffled) and
//! a change is dropped when later changes of the product write every field it writes: when
//! it would apply, so would they, and they overwrite all of it. A full replacement thus drops
//! everything before it, and a run of price updates collapses into the newest. Partial updates
//! that write different fields are not merged into one: if the catalog already holds a version
//! between them, a merged write would put the older one's fields back over it. They go to
//! the catalog as separate items of one request, in version order, and its version guard
//! decides each. The result is one write list per product type (BulkUpdateProducts takes one
//! type per request), each at most [`MAX_ITEMS_PER_REQUEST`] items.

use std::collections::BTreeMap;

use mall_product::{UpdateMask, limits::MAX_ITEMS_PER_REQUEST};
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
        // Stable: equal versions keep queue order, and the first of them is kept below.
        changes.sort_by_key(|c| c.version);
        changes.dedup_by_key(|c| c.version);
        let mut covered = UpdateMask::default();
        let mut kept = Vec::new();
        for mut change in changes.into_iter().rev() {
            let mask = UpdateMask::from_field_mask(change.update_mask.as_ref())
                .unwrap_or_else(|_| UpdateMask::full());
            if covered.covers(mask) && !kept.is_empty() {
                continue;
            }
            covered = covered.union(mask);
            change.update_mask = mask.to_field_mask();
            kept.push(change);
        }
        kept.reverse();
        for change in kept {
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
    fn a_full_replacement_drops_everything_before_it() {
        let batches = merge(vec![
            change("A", "shoes", 1, &[]),
            change("A", "shoes", 2, &["prices"]),
            change("A", "shoes", 3, &[]),
            change("A", "shoes", 4, &["names"]),
        ]);
        assert_eq!(
            written(&batches),
            [
                ("shoes".into(), "A".into(), 3),
                ("shoes".into(), "A".into(), 4)
            ]
        );
    }

    #[test]
    fn shuffled_versions_are_put_in_order_and_covered_ones_collapse() {
        let batches = merge(vec![
            change("A", "shoes", 5, &["prices"]),
            change("A", "shoes", 2, &["prices"]),
            change("A", "shoes", 4, &["names"]),
            change("A", "shoes", 3, &["prices", "names"]),
            change("A", "shoes", 5, &["prices"]),
        ]);
        // v2 and v3 are covered by v4 (names) + v5 (prices); v4 and v5 write different fields.
        assert_eq!(
            written(&batches),
            [
                ("shoes".into(), "A".into(), 4),
                ("shoes".into(), "A".into(), 5)
            ]
        );
    }

    #[test]
    fn disjoint_partial_updates_stay_separate_items() {
        let batches = merge(vec![
            change("A", "shoes", 1, &["prices"]),
            change("A", "shoes", 2, &["names"]),
        ]);
        assert_eq!(batches[0].changes.len(), 2);
        assert_eq!(
            batches[0].request().updates[0].update_mask,
            Some(FieldMask {
                paths: vec!["prices".into()]
            })
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
                ("bags".into(), "B".into(), 1)
            ],
            "A's v1 is replaced by its v2, of another type; products in first-seen order"
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
