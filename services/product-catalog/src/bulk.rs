//! BulkUpdateProducts and ImportProducts as pure logic: check a request, then plan its writes
//! against the stored products. The store runs the plan in one transaction; nothing here
//! touches the database, so every rule is unit-tested.

use std::collections::{BTreeMap, HashMap};

use foldhash::fast::RandomState;
use mall_grpc::{ServiceError, Violations};
use mall_product::{
    FieldVersions, ProductTypes, UpdateMask, limits::MAX_ITEMS_PER_REQUEST, validate,
};
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
    /// APPLIED, PENDING or STALE; UNSPECIFIED for a refused write (see [`Plan::refused`]).
    pub outcome: UpdateOutcome,
    /// The product's version after the write: its newest field's version.
    pub stored_version: u64,
}

/// A write that only the stored state shows to be wrong: the item's fault, never retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Index of the write in the request.
    pub index: usize,
    /// The offending field, relative to the item (`product.product_type`).
    pub field: &'static str,
    /// Why, in the caller's terms.
    pub reason: String,
}

/// One write that changed a visible product, for the change log.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The product's code.
    pub code: String,
    /// The product after the write, timestamps included, when a later write of the same
    /// request changed it again; `None` for the last change of its code, whose product is its
    /// final row in [`Plan::rows`] (a copy of every product saved). Read it with
    /// [`Plan::product_after`].
    product: Option<Product>,
    /// The product's version before; 0 when the write made it visible (created it).
    pub previous_version: u64,
    /// The fields this write made visible: those it wrote, or every field the product has
    /// when it created the product (fields that waited in a pending row included).
    pub written: UpdateMask,
    /// The source version of the write.
    pub change_version: u64,
}

/// A product as stored: its values and the version of the change that wrote each field.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// The values; `version` is the highest field version.
    pub product: Product,
    /// Per field, the version of the change that last wrote it.
    pub versions: FieldVersions,
}

impl Stored {
    /// A row that no field has been written to yet.
    fn empty(code: &str, product_type: &str, now: Timestamp) -> Self {
        Self {
            product: Product {
                code: code.to_owned(),
                product_type: product_type.to_owned(),
                create_time: Some(now),
                ..Product::default()
            },
            versions: FieldVersions::default(),
        }
    }

    /// Whether the product still waits for the change that creates it: no change has set its
    /// `status` yet. A pending product is invisible to readers.
    pub fn is_pending(&self) -> bool {
        self.versions.status() == 0
    }
}

/// The final state of one product touched by a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// What to store.
    pub stored: Stored,
    /// Whether it was stored before the plan (an update) or not (an insert).
    pub existed: bool,
}

/// The writes of one request, decided against the stored products.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// One result per write, in request order.
    pub results: Vec<ItemResult>,
    /// Writes refused for what the stored state shows; they change nothing.
    pub refused: Vec<Refusal>,
    /// The products to store, by code (so rows are written, and locked, in code order).
    pub rows: BTreeMap<String, Row>,
    /// Writes that changed a visible product, in request order.
    pub changes: Vec<Change>,
    /// Pending products replaced by a creation of another type: their waiting fields were
    /// written under the wrong type and are gone.
    pub dropped_pending: Vec<String>,
    /// Writes whose values were moved into their row, not copied, and the fields moved: the
    /// writes of a code written once in the request (see [`Plan::give_back`]).
    moved: Vec<(usize, UpdateMask)>,
}

impl Plan {
    /// Gives `writes` (those the plan was made from) back the values [`plan`] moved out of
    /// them: for a plan that is not committed and whose writes are tried again.
    ///
    /// # Panics
    /// When `writes` are not the plan's: a moved write always has its row in
    /// [`Plan::rows`] (it wrote a field, so it is APPLIED or PENDING, and no other write of
    /// the request touched that row).
    pub fn give_back(mut self, writes: &mut [Write]) {
        for (index, fields) in std::mem::take(&mut self.moved) {
            let write = &mut writes[index];
            let row = self
                .rows
                .get_mut(&write.product.code)
                .expect("a moved write's row is in its plan");
            fields.swap_fields(&mut row.stored.product, &mut write.product);
        }
    }

    /// The product as `change` (one of [`Plan::changes`]) left it.
    ///
    /// # Panics
    /// When `change` is not one of this plan's changes.
    pub fn product_after<'a>(&'a self, change: &'a Change) -> &'a Product {
        match &change.product {
            Some(product) => product,
            None => &self.rows[&change.code].stored.product,
        }
    }
}

/// Decides each write in request order against `stored` (the products as read in the
/// transaction), as if they were applied one after another.
///
/// A write stores each field of its mask whose stored version is older than its own
/// ([`UpdateMask::apply_newer`]): APPLIED when it wrote a field of a visible product, PENDING
/// when the product still lacks a `status` (a partial change that arrived before the change
/// creating its product), STALE when every field it carries is already newer or equal. The
/// result does not depend on the order of the writes, within a request or across requests.
///
/// A write naming another product type than the stored product's is refused: a product's
/// type is set by the change that creates it. While a product is pending its type is only
/// provisional: a write that creates it (with a status) under another type replaces the
/// pending row, whose waiting fields were written under the wrong type and are dropped
/// ([`Plan::dropped_pending`]); so a mistyped early change cannot block the real creation.
///
/// With `max_version_jump`, a write whose version is more than that far ahead of its visible
/// product's version is refused (`product.version`): a runaway producer's version near 2^63
/// would otherwise freeze the product for good, as no later change could ever be newer. A
/// product that does not exist yet (or is still pending) is not guarded.
///
/// The values of a code written only once in the request are moved into its row rather than
/// copied: such a write is left holding its row's previous values until [`Plan::give_back`].
/// (Planning was 11 % of the catalog's process time in a profile of its bulk benchmark, two
/// thirds of it that copying.) The writes of a code written more than once are copied, as a
/// later one may need what an earlier one wrote.
pub fn plan(
    writes: &mut [Write],
    stored: BTreeMap<String, Stored>,
    now: Timestamp,
    max_version_jump: Option<u64>,
) -> Plan {
    let mut plan = Plan {
        results: Vec::with_capacity(writes.len()),
        changes: Vec::with_capacity(writes.len()),
        ..Plan::default()
    };
    // One slot per code, found once per write: a BTreeMap of stored products taken out and
    // put back per write, and maps of counts and latest changes beside it, were two thirds
    // of planning's time in a profile of the bulk benchmark (string comparisons and copies
    // of codes). foldhash: codes are the callers', and colliding ones would need the seed.
    let mut slots: HashMap<String, Slot, RandomState> =
        HashMap::with_capacity_and_hasher(writes.len(), RandomState::default());
    for (code, stored) in stored {
        slots.insert(code, Slot::new(Some(stored)));
    }
    for write in writes.iter() {
        match slots.get_mut(write.product.code.as_str()) {
            Some(slot) => slot.writes += 1,
            None => {
                let mut slot = Slot::new(None);
                slot.writes = 1;
                slots.insert(write.product.code.clone(), slot);
            }
        }
    }
    for (index, write) in writes.iter_mut().enumerate() {
        let slot = slots
            .get_mut(write.product.code.as_str())
            .expect("every written code has a slot (above)");
        let code = &write.product.code;
        let change_version = write.product.version;
        if slot.stored.as_ref().is_some_and(|current| {
            current.is_pending()
                && write.mask.has_status()
                && current.product.product_type != write.product.product_type
        }) {
            slot.stored = None;
            plan.dropped_pending.push(code.clone());
        }
        if let Some(current) = &slot.stored
            && current.product.product_type != write.product.product_type
        {
            plan.refused.push(Refusal {
                index,
                field: "product.product_type",
                reason: format!(
                    "product {code:?} is stored as type {:?}; a product's type is set by the \
                     change that creates it and never changes",
                    current.product.product_type
                ),
            });
            plan.results.push(ItemResult {
                code: code.clone(),
                outcome: UpdateOutcome::Unspecified,
                stored_version: current.product.version,
            });
            continue;
        }
        if let (Some(jump), Some(current)) = (max_version_jump, &slot.stored)
            && !current.is_pending()
            && write.product.version > current.product.version.saturating_add(jump)
        {
            plan.refused.push(Refusal {
                index,
                field: "product.version",
                reason: format!(
                    "version {} is more than {jump} ahead of the stored version {} \
                     (catalog.max_version_jump); a version that far ahead is taken for a \
                     producer's mistake",
                    write.product.version, current.product.version
                ),
            });
            plan.results.push(ItemResult {
                code: code.clone(),
                outcome: UpdateOutcome::Unspecified,
                stored_version: current.product.version,
            });
            continue;
        }
        // Taken out (not copied) while this write is decided; put back below.
        let current = slot.stored.take();
        let was_visible = current.as_ref().is_some_and(|c| !c.is_pending());
        let previous_version = current
            .as_ref()
            .filter(|_| was_visible)
            .map_or(0, |c| c.product.version);
        let mut next =
            current.unwrap_or_else(|| Stored::empty(code, &write.product.product_type, now));
        // The product as the code's latest change left it, should this write change it again.
        let before = slot.last_change.is_some().then(|| next.product.clone());
        let code = code.clone();
        let written = if slot.writes == 1 {
            let written = write.mask.apply_newer_swapping(
                &mut next.product,
                &mut next.versions,
                &mut write.product,
            );
            if !written.is_empty() {
                plan.moved.push((index, written));
            }
            written
        } else {
            write
                .mask
                .apply_newer(&mut next.product, &mut next.versions, &write.product)
        };
        if written.is_empty() {
            plan.results.push(ItemResult {
                code,
                outcome: UpdateOutcome::Stale,
                stored_version: next.product.version,
            });
            slot.stored = Some(next);
            continue;
        }
        if let Some(before) = before
            && let Some(earlier) = slot.last_change.take()
        {
            // That change is no longer its code's last: keep the product it left.
            plan.changes[earlier].product = Some(before);
        }
        next.product.update_time = Some(now);
        let visible = !next.is_pending();
        if visible && !was_visible {
            // Created now: a pending row's first-seen time is not the product's.
            next.product.create_time = Some(now);
        }
        slot.touched = true;
        if visible {
            slot.last_change = Some(plan.changes.len());
            plan.changes.push(Change {
                code: code.clone(),
                product: None,
                previous_version,
                written: if was_visible {
                    written
                } else {
                    next.versions.written()
                },
                change_version,
            });
        }
        plan.results.push(ItemResult {
            code,
            outcome: if visible {
                UpdateOutcome::Applied
            } else {
                UpdateOutcome::Pending
            },
            stored_version: next.product.version,
        });
        slot.stored = Some(next);
    }
    // A touched slot always holds its product: every write that is not refused puts its
    // product back (above), and a refused one leaves the stored product where it found it.
    let mut rows: Vec<Option<(String, Row)>> = slots
        .into_iter()
        .filter(|(_, slot)| slot.touched)
        .filter_map(|(code, slot)| {
            let stored = slot.stored?;
            let existed = slot.existed;
            Some(Some((code, Row { stored, existed })))
        })
        .collect();
    // In code order through a permutation: a row is a few hundred bytes, and sorting the rows
    // themselves (what `BTreeMap::from_iter` does with unsorted input) moved each about
    // log2(n) times, 60 % of planning. Sorted input is only checked, then built in one pass.
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_unstable_by(|&a, &b| code_of(&rows[a]).cmp(code_of(&rows[b])));
    plan.rows = order
        .into_iter()
        .filter_map(|index| rows[index].take())
        .collect();
    plan
}

fn code_of(row: &Option<(String, Row)>) -> &str {
    row.as_ref().map_or("", |(code, _)| code)
}

/// One product while [`plan`] decides a request.
struct Slot {
    /// Its state so far; `None` while not stored and not yet written (or a pending row
    /// replaced by a creation of another type is being rewritten).
    stored: Option<Stored>,
    /// Whether it was stored before the request (its row is updated, not inserted).
    existed: bool,
    /// Writes of its code in the request: the values of a code written once are moved.
    writes: usize,
    /// Whether a write of the request wrote a field of it (APPLIED or PENDING): it is a row.
    touched: bool,
    /// Its latest change in [`Plan::changes`] whose product is not copied yet (see
    /// [`Change::product`]).
    last_change: Option<usize>,
}

impl Slot {
    fn new(stored: Option<Stored>) -> Self {
        Self {
            existed: stored.is_some(),
            stored,
            writes: 0,
            touched: false,
            last_change: None,
        }
    }
}

/// The codes among `stored` (read with their versions and type only) whose stored values the
/// plan needs, not only their versions, in code order: every one unless the first write of
/// its code in `writes` is a full replacement of its type newer than every stored field (so
/// it applies and overwrites everything); otherwise some stored value can survive into a row
/// or a change-log entry.
pub fn needing_values<'a>(writes: &[Write], stored: &'a BTreeMap<String, Stored>) -> Vec<&'a str> {
    // The first write of each code, found in one pass (a search of the request per stored
    // product compared half a million codes in a request of 1,000).
    let mut first: HashMap<&str, &Write> = HashMap::with_capacity(writes.len());
    for write in writes {
        first.entry(write.product.code.as_str()).or_insert(write);
    }
    stored
        .iter()
        .filter(|(code, s)| {
            first.get(code.as_str()).is_none_or(|first| {
                !(first.mask.is_full()
                    && first.product.version > s.product.version
                    && first.product.product_type == s.product.product_type)
            })
        })
        .map(|(code, _)| code.as_str())
        .collect()
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

    /// Stored rows whose every field has the row's version.
    fn stored(products: &[Product]) -> BTreeMap<String, Stored> {
        products
            .iter()
            .map(|p| {
                let mut p = p.clone();
                p.create_time = Some(Timestamp {
                    seconds: 1,
                    nanos: 0,
                });
                let versions = FieldVersions::all(p.version);
                (
                    p.code.clone(),
                    Stored {
                        product: p,
                        versions,
                    },
                )
            })
            .collect()
    }

    fn field_names(error: ServiceError) -> Vec<String> {
        match error {
            ServiceError::InvalidArgument(v) => v.into_iter().map(|v| v.field).collect(),
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    fn outcomes(plan: &Plan) -> Vec<(&str, UpdateOutcome, u64)> {
        plan.results
            .iter()
            .map(|r| (r.code.as_str(), r.outcome, r.stored_version))
            .collect()
    }

    #[test]
    fn newer_versions_apply_and_older_or_equal_ones_are_stale() {
        let plan = plan(
            &mut [full("A", 5), full("B", 2), full("C", 1)],
            stored(&[product("A", 4), product("B", 2)]),
            NOW,
            None,
        );
        assert_eq!(
            outcomes(&plan),
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
            plan.rows["A"].stored.product.create_time.map(|t| t.seconds),
            Some(1)
        );
        assert_eq!(plan.rows["C"].stored.product.create_time, Some(NOW));
    }

    #[test]
    fn later_items_of_one_code_are_compared_with_earlier_ones() {
        let plan = plan(
            &mut [full("A", 3), full("A", 2), full("A", 7), full("A", 7)],
            BTreeMap::new(),
            NOW,
            None,
        );
        let kinds: Vec<_> = plan.results.iter().map(|r| r.outcome).collect();
        assert_eq!(
            kinds,
            [
                UpdateOutcome::Applied,
                UpdateOutcome::Stale,
                UpdateOutcome::Applied,
                UpdateOutcome::Stale
            ]
        );
        assert_eq!(plan.results[1].stored_version, 3);
        assert_eq!(plan.rows["A"].stored.product.version, 7);
        assert!(!plan.rows["A"].existed);
        assert_eq!(plan.changes.len(), 2);
        assert_eq!(plan.changes[1].previous_version, 3);
    }

    #[test]
    fn a_partial_update_keeps_the_fields_outside_its_mask() {
        let plan = plan(
            &mut [partial("A", 9, &["prices"])],
            stored(&[product("A", 4)]),
            NOW,
            None,
        );
        let row = &plan.rows["A"].stored.product;
        assert_eq!(row.brand, "brand v4");
        assert_eq!(row.prices.get("KRW"), Some(&9000));
        assert_eq!(row.version, 9);
        assert_eq!(plan.changes[0].written, partial("A", 9, &["prices"]).mask);
        assert_eq!(plan.changes[0].change_version, 9);
    }

    #[test]
    fn a_late_partial_update_still_writes_the_fields_nobody_newer_wrote() {
        // v6 (names) committed first; v5 (prices) arrives late and must not be lost.
        let first = plan(
            &mut [full("A", 4), partial("A", 6, &["names"])],
            BTreeMap::new(),
            NOW,
            None,
        );
        let stored_now: BTreeMap<_, _> = first
            .rows
            .into_iter()
            .map(|(code, row)| (code, row.stored))
            .collect();
        let late = plan(
            &mut [partial("A", 5, &["prices", "names"])],
            stored_now,
            NOW,
            None,
        );
        assert_eq!(outcomes(&late), [("A", UpdateOutcome::Applied, 6)]);
        let row = &late.rows["A"].stored;
        assert_eq!(row.product.prices.get("KRW"), Some(&5000));
        assert_eq!(row.product.names["en"], "A v6", "the newer names stay");
        assert_eq!(
            late.changes[0].written,
            partial("A", 5, &["prices"]).mask,
            "the change log says only prices were written"
        );
        assert_eq!(late.changes[0].previous_version, 6);
        assert_eq!(late.changes[0].change_version, 5);
    }

    #[test]
    fn a_partial_update_before_its_creation_waits_in_a_pending_row() {
        let early = plan(
            &mut [partial("A", 5, &["prices"])],
            BTreeMap::new(),
            NOW,
            None,
        );
        assert_eq!(outcomes(&early), [("A", UpdateOutcome::Pending, 5)]);
        assert!(
            early.changes.is_empty(),
            "a pending product is not in the change log"
        );
        let row = &early.rows["A"].stored;
        assert!(row.is_pending());

        let later = Timestamp {
            seconds: NOW.seconds + 60,
            nanos: 0,
        };
        let creation = plan(
            &mut [full("A", 3)],
            [("A".to_owned(), row.clone())].into(),
            later,
            None,
        );
        assert_eq!(outcomes(&creation), [("A", UpdateOutcome::Applied, 5)]);
        let created = &creation.rows["A"].stored.product;
        assert_eq!(
            created.prices.get("KRW"),
            Some(&5000),
            "the newer pending price stays"
        );
        assert_eq!(created.brand, "brand v3");
        assert_eq!(created.create_time, Some(later));
        assert_eq!(creation.changes[0].previous_version, 0);
        assert!(creation.changes[0].written.is_full());
    }

    #[test]
    fn a_partial_update_with_status_creates_the_product() {
        let plan = plan(
            &mut [partial("A", 1, &["status", "prices"])],
            BTreeMap::new(),
            NOW,
            None,
        );
        assert_eq!(outcomes(&plan), [("A", UpdateOutcome::Applied, 1)]);
        let row = &plan.rows["A"].stored.product;
        assert_eq!(row.status, ProductStatus::OnSale as i32);
        assert_eq!(row.brand, "", "fields outside the mask start empty");
        assert_eq!(row.product_type, "shoes");
    }

    #[test]
    fn a_write_of_another_type_is_refused_whatever_its_version() {
        let mut bag = product("A", 4);
        bag.product_type = "bags".into();
        for write in [partial("A", 5, &["prices"]), full("A", 5), full("A", 3)] {
            let plan = plan(
                &mut [full("B", 1), write],
                stored(std::slice::from_ref(&bag)),
                NOW,
                None,
            );
            assert_eq!(plan.refused.len(), 1);
            assert_eq!(plan.refused[0].index, 1);
            assert_eq!(plan.refused[0].field, "product.product_type");
            assert!(
                !plan.rows.contains_key("A"),
                "a refused write changes nothing"
            );
            assert!(plan.rows.contains_key("B"));
        }
    }

    /// Whether [`needing_values`] names `stored`.
    fn needs_values(writes: &[Write], code: &str, stored: &Product) -> bool {
        let stored = BTreeMap::from([(
            code.to_owned(),
            Stored {
                product: stored.clone(),
                versions: FieldVersions::all(stored.version),
            },
        )]);
        needing_values(writes, &stored) == [code]
    }

    #[test]
    fn the_first_full_replacement_newer_than_every_field_needs_no_stored_values() {
        let at = |version| product("A", version);
        let writes = [full("A", 5), partial("B", 5, &["prices"]), full("C", 2)];
        assert!(!needs_values(&writes, "A", &at(4)));
        assert!(
            needs_values(&writes, "A", &at(5)),
            "an equal field version may survive"
        );
        assert!(needs_values(&writes, "B", &product("B", 1)));
        assert!(needs_values(&writes, "C", &product("C", 3)));
        assert!(needs_values(
            &[partial("A", 9, &["names"]), full("A", 10)],
            "A",
            &at(1)
        ));
        let mut bag = at(1);
        bag.product_type = "bags".into();
        assert!(
            needs_values(&writes, "A", &bag),
            "a first write of another type is refused; the next one builds on stored values"
        );
    }

    #[test]
    fn a_plan_given_back_restores_refused_stale_and_replacing_writes_too() {
        // A is pending under another type (the creation replaces it), B is stored as bags
        // (a write of shoes is refused), C is newer than its write (stale), D is new.
        let mut typo = partial("A", 7, &["prices"]);
        typo.product.product_type = "bags".into();
        let mut stored: BTreeMap<_, _> = plan(&mut [typo], BTreeMap::new(), NOW, None)
            .rows
            .into_iter()
            .map(|(code, row)| (code, row.stored))
            .collect();
        let mut bag = product("B", 4);
        bag.product_type = "bags".into();
        stored.extend(self::stored(&[bag, product("C", 9)]));
        let mut writes = vec![
            full("A", 3),
            full("B", 5),
            partial("C", 8, &["names"]),
            full("D", 1),
        ];
        let before = writes.clone();
        let first = plan(&mut writes, stored.clone(), NOW, None);
        assert_eq!(first.dropped_pending, ["A"]);
        assert_eq!(first.refused.len(), 1);
        assert_eq!(
            outcomes(&first)[2],
            ("C", UpdateOutcome::Stale, 9),
            "C is stale"
        );
        first.give_back(&mut writes);
        assert_eq!(writes, before);
        assert_eq!(plan(&mut writes, stored.clone(), NOW, None), {
            let mut fresh = before.clone();
            plan(&mut fresh, stored, NOW, None)
        });
    }

    #[test]
    fn a_creation_of_another_type_replaces_a_pending_product() {
        let mut typo = partial("A", 7, &["prices"]);
        typo.product.product_type = "bags".into();
        let pending = plan(&mut [typo], BTreeMap::new(), NOW, None);
        assert_eq!(outcomes(&pending), [("A", UpdateOutcome::Pending, 7)]);
        let stored: BTreeMap<_, _> = pending
            .rows
            .into_iter()
            .map(|(code, row)| (code, row.stored))
            .collect();

        // A partial of another type still cannot touch it: it cannot create the product.
        let other = plan(
            &mut [partial("A", 8, &["names"])],
            stored.clone(),
            NOW,
            None,
        );
        assert_eq!(other.refused.len(), 1);

        let creation = plan(&mut [full("A", 3)], stored, NOW, None);
        assert!(creation.refused.is_empty());
        assert_eq!(creation.dropped_pending, ["A"]);
        let created = &creation.rows["A"].stored.product;
        assert_eq!(created.product_type, "shoes");
        assert_eq!(
            created.prices.get("KRW"),
            Some(&3000),
            "the mistyped price is gone"
        );
        assert_eq!(created.version, 3);
        assert!(
            creation.rows["A"].existed,
            "the pending row is replaced in place"
        );
    }

    /// Property tests: applying changes commutes.
    mod commutes {
        use proptest::prelude::*;

        use super::*;

        /// One change of product "P": its version, the mask's bits (0 is a full
        /// replacement) and a seed for its values.
        fn change(version: u64, bits: u8, seed: u64) -> Write {
            let mask = if bits == 0 {
                UpdateMask::full()
            } else {
                UpdateMask::from_bits(bits)
            };
            let mut product = product("P", version);
            product.brand = format!("brand {seed}");
            product.category_path = vec![format!("c{seed}")];
            product.status = [1, 2, 3, 4][(seed % 4) as usize];
            product.descriptions = [("ko".to_owned(), format!("d{seed}"))].into();
            product.prices = [("KRW".to_owned(), seed as i64)].into();
            Write { product, mask }
        }

        /// The reference: every change applied whole, in version order, to an empty product;
        /// `None` while no change has set the status (the product would be pending).
        fn in_version_order(changes: &[Write]) -> Option<Product> {
            let mut sorted: Vec<&Write> = changes.iter().collect();
            sorted.sort_by_key(|w| w.product.version);
            sorted.dedup_by_key(|w| w.product.version);
            let mut product = Product {
                code: "P".into(),
                product_type: "shoes".into(),
                ..Product::default()
            };
            let mut has_status = false;
            for write in sorted {
                write.mask.apply(&mut product, &write.product);
                has_status |= write.mask.has_status();
            }
            has_status.then_some(product)
        }

        /// Applies `requests` one after another, as separate transactions would.
        fn apply(requests: &[Vec<Write>]) -> Option<Stored> {
            let mut stored = BTreeMap::new();
            for writes in requests {
                let plan = plan(&mut writes.clone(), stored.clone(), NOW, None);
                assert!(plan.refused.is_empty());
                for (code, row) in plan.rows {
                    stored.insert(code, row.stored);
                }
            }
            stored.remove("P")
        }

        fn values(mut product: Product) -> Product {
            product.create_time = None;
            product.update_time = None;
            product
        }

        /// Up to 12 changes with distinct versions (a version names one change), each full or
        /// partial; then the same changes with duplicates, shuffled and cut into requests.
        fn scenario() -> impl Strategy<Value = (Vec<Write>, Vec<Vec<Write>>)> {
            prop::collection::btree_map(1u64..40, (0u8..128, any::<u64>()), 1..12)
                .prop_map(|by_version| {
                    by_version
                        .into_iter()
                        .map(|(version, (bits, seed))| change(version, bits, seed))
                        .collect::<Vec<_>>()
                })
                .prop_flat_map(|changes| {
                    let n = changes.len();
                    let deliveries = prop::collection::vec(0..n, n..n * 3)
                        .prop_map({
                            let changes = changes.clone();
                            move |extra| {
                                let mut all = changes.clone();
                                all.extend(extra.into_iter().map(|i| changes[i].clone()));
                                all
                            }
                        })
                        .prop_shuffle();
                    (
                        Just(changes),
                        deliveries,
                        prop::collection::vec(1usize..5, 1..20),
                    )
                })
                .prop_map(|(changes, deliveries, cuts)| {
                    let mut requests = Vec::new();
                    let mut rest = deliveries.as_slice();
                    for cut in cuts.into_iter().cycle() {
                        if rest.is_empty() {
                            break;
                        }
                        let (head, tail) = rest.split_at(cut.min(rest.len()));
                        requests.push(head.to_vec());
                        rest = tail;
                    }
                    (changes, requests)
                })
        }

        proptest! {
            #[test]
            fn any_order_batching_and_duplicates_end_in_the_version_order_state(
                (changes, requests) in scenario()
            ) {
                let expected = in_version_order(&changes);
                let got = apply(&requests).expect("some change was applied");
                match expected {
                    Some(expected) => {
                        prop_assert!(!got.is_pending());
                        prop_assert_eq!(values(got.product), values(expected));
                    }
                    None => prop_assert!(got.is_pending(), "no change set a status"),
                }
            }

            #[test]
            fn applying_any_change_again_changes_nothing(
                (changes, requests) in scenario(), pick in any::<prop::sample::Index>()
            ) {
                let stored = apply(&requests).expect("some change was applied");
                let again = &changes[pick.index(changes.len())];
                let plan = plan(
                    &mut [again.clone()],
                    [("P".to_owned(), stored.clone())].into(),
                    NOW,
                    None,
                );
                prop_assert_eq!(plan.results[0].outcome, UpdateOutcome::Stale);
                prop_assert!(plan.rows.is_empty() && plan.changes.is_empty());
            }

            #[test]
            fn a_plan_given_back_leaves_its_writes_as_they_came(
                (_changes, requests) in scenario(), other_code in any::<bool>()
            ) {
                // Each request against the state the ones before it left, as retried attempts
                // see it; half the runs give every write a code of its own, so that all of
                // them are moved rather than copied.
                let mut stored = BTreeMap::new();
                for (r, writes) in requests.iter().enumerate() {
                    let mut writes = writes.clone();
                    if other_code {
                        for (i, write) in writes.iter_mut().enumerate() {
                            write.product.code = format!("P{r}-{i}");
                        }
                    }
                    let before = writes.clone();
                    let first = plan(&mut writes, stored.clone(), NOW, None);
                    first.give_back(&mut writes);
                    prop_assert_eq!(&writes, &before);
                    let again = plan(&mut writes, stored.clone(), NOW, None);
                    for (code, row) in again.rows {
                        stored.insert(code, row.stored);
                    }
                }
            }

            #[test]
            fn replaying_the_change_log_rebuilds_the_product(
                (_changes, requests) in scenario()
            ) {
                // A watcher keeps the last record's product; it must equal the stored one.
                let mut stored = BTreeMap::new();
                let mut watched: Option<Product> = None;
                for writes in &requests {
                    let plan = plan(&mut writes.clone(), stored.clone(), NOW, None);
                    for change in &plan.changes {
                        prop_assert!(!change.written.is_empty());
                        watched = Some(plan.product_after(change).clone());
                    }
                    for (code, row) in plan.rows {
                        stored.insert(code, row.stored);
                    }
                }
                let stored = stored.remove("P").expect("some change was applied");
                if stored.is_pending() {
                    prop_assert!(watched.is_none());
                } else {
                    prop_assert_eq!(watched, Some(stored.product));
                }
            }
        }
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

    #[test]
    fn the_version_guard_refuses_runaway_versions_of_existing_products_only() {
        let stored_a = stored(&[full("A", 10).product]);
        // At the limit: applied. One past it: refused, naming the field; nothing written.
        let at = plan(&mut [full("A", 110)], stored_a.clone(), NOW, Some(100));
        assert_eq!(outcomes(&at), [("A", UpdateOutcome::Applied, 110)]);
        let past = plan(&mut [full("A", 111)], stored_a.clone(), NOW, Some(100));
        assert_eq!(outcomes(&past), [("A", UpdateOutcome::Unspecified, 10)]);
        assert_eq!(past.refused.len(), 1);
        assert_eq!(past.refused[0].field, "product.version");
        assert!(
            past.refused[0].reason.contains("more than 100 ahead"),
            "{:?}",
            past.refused
        );
        assert!(past.rows.is_empty() && past.changes.is_empty());
        // Off: anything newer applies.
        let off = plan(&mut [full("A", 1 << 40)], stored_a, NOW, None);
        assert_eq!(off.refused.len(), 0);
        // A product that does not exist yet is not guarded, nor is a pending one.
        let new = plan(&mut [full("B", 1_000_000)], BTreeMap::new(), NOW, Some(100));
        assert_eq!(new.refused.len(), 0);
        let early = plan(
            &mut [partial("C", 5, &["prices"])],
            BTreeMap::new(),
            NOW,
            None,
        );
        let pending = [("C".to_owned(), early.rows["C"].stored.clone())].into();
        let creation = plan(&mut [full("C", 5_000)], pending, NOW, Some(100));
        assert_eq!(creation.refused.len(), 0);
        assert_eq!(outcomes(&creation), [("C", UpdateOutcome::Applied, 5_000)]);
    }
}
