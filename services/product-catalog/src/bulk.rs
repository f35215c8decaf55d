//! BulkUpdateProducts and ImportProducts as pure logic: check a request, then plan its writes
//! against the stored products. The store runs the plan in one transaction; nothing here
//! touches the database, so every rule is unit-tested.

use std::collections::BTreeMap;

use mall_grpc::{ServiceError, Violations};
use mall_product::{ProductTypes, UpdateMask, limits::MAX_ITEMS_PER_REQUEST, validate};
use mall_proto::catalog::v1::{BulkUpdateProductsRequest, Product, UpdateOutcome};
use prost_types::Timestamp;

/// Longest `request_id`.
pub const MAX_REQUEST_ID_CHARS: usize = 128;

/// One validated product write: the new values and which fields they replace.
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    /// The new values, with language keys in canonical case.
    pub product: Product,
    /// Fields replaced; every field for a full replacement.
    pub mask: UpdateMask,
}

/// A checked BulkUpdateProducts request.
#[derive(Debug, Clone, PartialEq)]
pub struct BulkRequest {
    /// The idempotency key, when given.
    pub request_id: Option<String>,
    /// The writes, in request order.
    pub writes: Vec<Write>,
}

/// Checks a BulkUpdateProducts request against every rule that does not need the database.
///
/// # Errors
/// INVALID_ARGUMENT naming every problem (items as `updates[<index>]...`).
pub fn check_bulk_request(
    request: BulkUpdateProductsRequest,
    types: &ProductTypes,
) -> Result<BulkRequest, ServiceError> {
    let mut violations = Violations::default();
    if request.request_id.chars().count() > MAX_REQUEST_ID_CHARS {
        violations.add(
            "request_id",
            format!("must be at most {MAX_REQUEST_ID_CHARS} characters"),
        );
    }
    if request.product_type.is_empty() {
        violations.add("product_type", "must not be empty");
    } else if !types.contains(&request.product_type) {
        violations.add(
            "product_type",
            format!(
                "{:?} is not a registered product type; registered: {}",
                request.product_type,
                types.names().join(", ")
            ),
        );
    }
    match request.updates.len() {
        0 => violations.add("updates", "must hold at least one update"),
        n if n > MAX_ITEMS_PER_REQUEST => violations.add(
            "updates",
            format!("holds {n} updates; at most {MAX_ITEMS_PER_REQUEST} per request"),
        ),
        _ => {}
    }
    // Request-level problems first: item problems would only bury them.
    violations.into_result()?;
    let mut violations = Violations::default();

    let mut writes = Vec::with_capacity(request.updates.len());
    for (i, update) in request.updates.into_iter().enumerate() {
        let field = format!("updates[{i}]");
        let Some(product) = update.product else {
            violations.add(format!("{field}.product"), "must be set");
            continue;
        };
        let mask = match UpdateMask::from_field_mask(update.update_mask.as_ref()) {
            Ok(mask) => mask,
            Err(unknown) => {
                for (j, path) in unknown {
                    violations.add(
                        format!("{field}.update_mask.paths[{j}]"),
                        format!(
                            "{path:?} is not a writable field; allowed: {}",
                            mall_product::mask::PATHS.join(", ")
                        ),
                    );
                }
                UpdateMask::full()
            }
        };
        if !product.product_type.is_empty() && product.product_type != request.product_type {
            violations.add(
                format!("{field}.product.product_type"),
                format!(
                    "is {:?} but the request is for product type {:?}; send one request per type",
                    product.product_type, request.product_type
                ),
            );
        }
        mall_product::validate_product(
            &product,
            mask,
            types,
            &format!("{field}.product"),
            &mut violations,
        );
        writes.push(Write {
            product: normalized(product),
            mask,
        });
    }
    violations.into_result()?;
    Ok(BulkRequest {
        request_id: (!request.request_id.is_empty()).then_some(request.request_id),
        writes,
    })
}

/// The input form of a product: language keys canonical, output-only fields cleared.
pub fn normalized(mut product: Product) -> Product {
    validate::normalize(&mut product);
    product.create_time = None;
    product.update_time = None;
    product
}

/// What happened to one write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemResult {
    /// The product the write addressed.
    pub code: String,
    /// APPLIED or STALE.
    pub outcome: UpdateOutcome,
    /// The version stored after the write.
    pub stored_version: u64,
}

/// One applied write, for the change log.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The product after the write, timestamps included.
    pub product: Product,
    /// The version stored before; 0 when the write created the product.
    pub previous_version: u64,
}

/// The final state of one product touched by a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The product to store.
    pub product: Product,
    /// Whether it was stored before the plan (an update) or not (an insert).
    pub existed: bool,
}

/// The writes of one request, decided against the stored products.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// One result per write, in request order.
    pub results: Vec<ItemResult>,
    /// The products to store, by code (so rows are written, and locked, in code order).
    pub rows: BTreeMap<String, Row>,
    /// Applied writes in request order.
    pub changes: Vec<Change>,
}

/// Decides each write in order against `stored` (the products as read in the transaction),
/// as if they were applied one after another: a write applies only when its version is newer
/// than the current one, so a later write of the same code is compared with the result of an
/// earlier one.
///
/// # Errors
/// The violations only the stored state reveals, named `updates[<index>]...`: a partial
/// update of an absent product whose mask lacks `status`, or a partial update of a product
/// stored with another type. Stale writes are never violations.
pub fn plan(
    writes: &[Write],
    mut stored: BTreeMap<String, Product>,
    now: Timestamp,
) -> Result<Plan, ServiceError> {
    let mut violations = Violations::default();
    let mut plan = Plan::default();
    let existed: Vec<String> = stored.keys().cloned().collect();
    for (i, write) in writes.iter().enumerate() {
        let code = &write.product.code;
        let current = stored.get(code);
        if let Some(current) = current
            && write.product.version <= current.version
        {
            plan.results.push(ItemResult {
                code: code.clone(),
                outcome: UpdateOutcome::Stale,
                stored_version: current.version,
            });
            continue;
        }
        let next = match (current, write.mask.is_full()) {
            (_, true) => Product {
                create_time: current.and_then(|c| c.create_time).or(Some(now)),
                update_time: Some(now),
                ..write.product.clone()
            },
            (None, false) if write.mask.has_status() => {
                let mut next = Product {
                    code: code.clone(),
                    product_type: write.product.product_type.clone(),
                    create_time: Some(now),
                    ..Product::default()
                };
                write.mask.apply(&mut next, &write.product);
                next.update_time = Some(now);
                next
            }
            (None, false) => {
                violations.add(
                    format!("updates[{i}].update_mask"),
                    format!(
                        "product {code:?} does not exist; a partial update creates a product \
                         only when its mask includes \"status\""
                    ),
                );
                continue;
            }
            (Some(current), false) => {
                if current.product_type != write.product.product_type {
                    violations.add(
                        format!("updates[{i}].product.product_type"),
                        format!(
                            "product {code:?} is stored as type {:?}; only a full replacement \
                             changes a product's type",
                            current.product_type
                        ),
                    );
                    continue;
                }
                let mut next = current.clone();
                write.mask.apply(&mut next, &write.product);
                next.update_time = Some(now);
                next
            }
        };
        plan.results.push(ItemResult {
            code: code.clone(),
            outcome: UpdateOutcome::Applied,
            stored_version: next.version,
        });
        plan.changes.push(Change {
            previous_version: current.map_or(0, |c| c.version),
            product: next.clone(),
        });
        stored.insert(code.clone(), next);
    }
    violations.into_result()?;
    for change in &plan.changes {
        let code = &change.product.code;
        if let Some(product) = stored.remove(code) {
            plan.rows.insert(
                code.clone(),
                Row {
                    product,
                    existed: existed.binary_search(code).is_ok(),
                },
            );
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use mall_proto::catalog::v1::{ProductStatus, ProductUpdate};
    use prost_types::FieldMask;

    use super::*;

    const NOW: Timestamp = Timestamp {
        seconds: 1_800_000_000,
        nanos: 0,
    };

    fn product(code: &str, version: u64) -> Product {
        Product {
            code: code.into(),
            product_type: "shoes".into(),
            brand: format!("brand v{version}"),
            status: ProductStatus::OnSale as i32,
            names: [("en".to_owned(), format!("{code} v{version}"))].into(),
            prices: [("KRW".to_owned(), 1000 * version as i64)].into(),
            version,
            ..Product::default()
        }
    }

    fn full(code: &str, version: u64) -> Write {
        Write {
            product: product(code, version),
            mask: UpdateMask::full(),
        }
    }

    fn partial(code: &str, version: u64, paths: &[&str]) -> Write {
        Write {
            product: product(code, version),
            mask: UpdateMask::from_field_mask(Some(&FieldMask {
                paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            }))
            .expect("valid mask"),
        }
    }

    fn stored(products: &[Product]) -> BTreeMap<String, Product> {
        products
            .iter()
            .map(|p| {
                let mut p = p.clone();
                p.create_time = Some(Timestamp {
                    seconds: 1,
                    nanos: 0,
                });
                (p.code.clone(), p)
            })
            .collect()
    }

    fn field_names(error: ServiceError) -> Vec<String> {
        match error {
            ServiceError::InvalidArgument(v) => v.into_iter().map(|v| v.field).collect(),
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn newer_versions_apply_and_older_or_equal_ones_are_stale() {
        let plan = plan(
            &[full("A", 5), full("B", 2), full("C", 1)],
            stored(&[product("A", 4), product("B", 2)]),
            NOW,
        )
        .expect("valid");
        let outcomes: Vec<_> = plan
            .results
            .iter()
            .map(|r| (r.code.as_str(), r.outcome, r.stored_version))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("A", UpdateOutcome::Applied, 5),
                ("B", UpdateOutcome::Stale, 2),
                ("C", UpdateOutcome::Applied, 1)
            ]
        );
        assert!(plan.rows["A"].existed);
        assert!(!plan.rows["C"].existed);
        assert!(!plan.rows.contains_key("B"));
        assert_eq!(plan.changes[0].previous_version, 4);
        assert_eq!(plan.changes[1].previous_version, 0);
        // A kept its creation time; C was created now.
        assert_eq!(
            plan.rows["A"].product.create_time.map(|t| t.seconds),
            Some(1)
        );
        assert_eq!(plan.rows["C"].product.create_time, Some(NOW));
    }

    #[test]
    fn later_items_of_one_code_are_compared_with_earlier_ones() {
        let plan = plan(
            &[full("A", 3), full("A", 2), full("A", 7), full("A", 7)],
            BTreeMap::new(),
            NOW,
        )
        .expect("valid");
        let outcomes: Vec<_> = plan.results.iter().map(|r| r.outcome).collect();
        assert_eq!(
            outcomes,
            [
                UpdateOutcome::Applied,
                UpdateOutcome::Stale,
                UpdateOutcome::Applied,
                UpdateOutcome::Stale
            ]
        );
        assert_eq!(plan.results[1].stored_version, 3);
        assert_eq!(plan.rows["A"].product.version, 7);
        assert!(!plan.rows["A"].existed);
        assert_eq!(plan.changes.len(), 2);
        assert_eq!(plan.changes[1].previous_version, 3);
    }

    #[test]
    fn a_partial_update_keeps_the_fields_outside_its_mask() {
        let plan = plan(
            &[partial("A", 9, &["prices"])],
            stored(&[product("A", 4)]),
            NOW,
        )
        .expect("valid");
        let row = &plan.rows["A"].product;
        assert_eq!(row.brand, "brand v4");
        assert_eq!(row.prices.get("KRW"), Some(&9000));
        assert_eq!(row.version, 9);
    }

    #[test]
    fn a_partial_update_creates_a_product_only_with_status_in_the_mask() {
        let error =
            plan(&[partial("A", 1, &["prices"])], BTreeMap::new(), NOW).expect_err("cannot create");
        assert_eq!(field_names(error), ["updates[0].update_mask"]);

        let plan = plan(
            &[partial("A", 1, &["status", "prices"])],
            BTreeMap::new(),
            NOW,
        )
        .expect("creates");
        let row = &plan.rows["A"].product;
        assert_eq!(row.status, ProductStatus::OnSale as i32);
        assert_eq!(row.brand, "", "fields outside the mask start empty");
        assert_eq!(row.product_type, "shoes");
    }

    #[test]
    fn only_a_full_replacement_changes_the_type_and_stale_items_are_never_invalid() {
        let mut bag = product("A", 4);
        bag.product_type = "bags".into();
        let error = plan(
            &[partial("A", 5, &["prices"])],
            stored(std::slice::from_ref(&bag)),
            NOW,
        )
        .expect_err("type differs");
        assert_eq!(field_names(error), ["updates[0].product.product_type"]);

        let stale = plan(&[partial("A", 3, &["prices"])], stored(&[bag.clone()]), NOW)
            .expect("stale is not an error");
        assert_eq!(stale.results[0].outcome, UpdateOutcome::Stale);

        let replaced = plan(&[full("A", 5)], stored(&[bag]), NOW).expect("valid");
        assert_eq!(replaced.rows["A"].product.product_type, "shoes");
    }

    #[test]
    fn a_request_names_each_bad_item_by_index() {
        let mut other_type = product("B", 1);
        other_type.product_type = "bags".into();
        let request = BulkUpdateProductsRequest {
            request_id: String::new(),
            product_type: "shoes".into(),
            updates: vec![
                ProductUpdate {
                    product: Some(product("A", 1)),
                    update_mask: None,
                },
                ProductUpdate {
                    product: Some(other_type),
                    update_mask: None,
                },
                ProductUpdate {
                    product: Some(product("C", 1)),
                    update_mask: Some(FieldMask {
                        paths: vec!["code".into()],
                    }),
                },
                ProductUpdate {
                    product: None,
                    update_mask: None,
                },
            ],
        };
        let error = check_bulk_request(request, &ProductTypes::default()).expect_err("invalid");
        assert_eq!(
            field_names(error),
            [
                "updates[1].product.product_type",
                "updates[2].update_mask.paths[0]",
                "updates[3].product"
            ]
        );
    }

    #[test]
    fn request_level_limits_are_checked_first() {
        let too_many = BulkUpdateProductsRequest {
            request_id: "x".repeat(129),
            product_type: "shoes".into(),
            updates: vec![
                ProductUpdate {
                    product: Some(product("A", 1)),
                    update_mask: None,
                };
                1001
            ],
        };
        let error = check_bulk_request(too_many, &ProductTypes::default()).expect_err("invalid");
        assert_eq!(field_names(error), ["request_id", "updates"]);

        let unknown = BulkUpdateProductsRequest {
            product_type: "spaceships".into(),
            ..BulkUpdateProductsRequest::default()
        };
        let error = check_bulk_request(unknown, &ProductTypes::default()).expect_err("invalid");
        assert_eq!(field_names(error), ["product_type", "updates"]);
    }
}
