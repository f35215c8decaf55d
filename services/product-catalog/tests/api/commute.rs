//! Writes commute: per-field versions, late partial changes, pending products, a product's
//! fixed type, and the migration of rows written under the row-level guard.

use std::time::Duration;

use mall_proto::catalog::v1::{
    BulkUpdateProductsRequest, ListPendingProductsRequest, ListProductsRequest, Product,
    ProductStatus, ProductUpdate, UpdateOutcome, WatchProductChangesRequest,
    WatchProductChangesResponse,
};
use mall_test_support::{Engine, TestDatabase};
use product_catalog::migration::Migrator;
use sea_orm::{ConnectionTrait as _, Database};
use sea_orm_migration::MigratorTrait as _;
use tonic::Streaming;

use crate::both_engines;
use crate::helpers::{TestCatalog, bag, bulk_of, partial, shoe, violations};

fn request(updates: Vec<ProductUpdate>) -> BulkUpdateProductsRequest {
    BulkUpdateProductsRequest {
        product_type: "shoes".into(),
        updates,
        ..Default::default()
    }
}

fn outcomes(response: &mall_proto::catalog::v1::BulkUpdateProductsResponse) -> Vec<(i32, u64)> {
    response
        .results
        .iter()
        .map(|r| (r.outcome, r.stored_version))
        .collect()
}

/// A shoe at `version` whose every field says which change wrote it.
fn marked(code: &str, version: u64) -> Product {
    let mut product = shoe(code, version);
    product.brand = format!("brand v{version}");
    product.category_path = vec![format!("c{version}")];
    product.status = [1, 2, 3, 4][(version % 4) as usize];
    product.descriptions = [("en".to_owned(), format!("d{version}"))].into();
    product
}

/// A WatchProductChanges stream of changes committed from now on.
async fn watch_from_now(catalog: &TestCatalog) -> Streaming<WatchProductChangesResponse> {
    catalog
        .client
        .clone()
        .watch_product_changes(WatchProductChangesRequest::default())
        .await
        .expect("watch starts")
        .into_inner()
}

/// The next message of `stream` that carries changes, within 20 s. Messages that only
/// advance the resume cursor (the contract allows them at any time, e.g. when the watch
/// skips a gap in the log) are passed over.
async fn next_message(
    stream: &mut Streaming<WatchProductChangesResponse>,
) -> WatchProductChangesResponse {
    let read = async {
        loop {
            let message = stream
                .message()
                .await
                .expect("stream healthy")
                .expect("stream open");
            if !message.changes.is_empty() {
                return message;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("a change arrives")
}

async fn a_late_partial_change_lands_where_it_is_the_newest(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    catalog.bulk(bulk_of("shoes", vec![marked("S-1", 4)])).await;
    // v6 (names) commits before v5 (prices, names).
    catalog
        .bulk(request(vec![partial(marked("S-1", 6), &["names"])]))
        .await;
    let late = catalog
        .bulk(request(vec![partial(
            marked("S-1", 5),
            &["prices", "names"],
        )]))
        .await;
    assert_eq!(
        outcomes(&late),
        [(UpdateOutcome::Applied as i32, 6)],
        "the price was written; the product's version stays its newest field's"
    );
    let stored = catalog.get("S-1").await.expect("stored");
    assert_eq!(stored.prices, marked("S-1", 5).prices);
    assert_eq!(stored.names, marked("S-1", 6).names);
    assert_eq!(stored.brand, "brand v4");
    assert_eq!(stored.version, 6);

    // Sent again, it changes nothing.
    let again = catalog
        .bulk(request(vec![partial(
            marked("S-1", 5),
            &["prices", "names"],
        )]))
        .await;
    assert_eq!(outcomes(&again), [(UpdateOutcome::Stale as i32, 6)]);
}

async fn changes_in_any_order_and_batching_end_in_the_version_order_state(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    let paths = mall_product::mask::PATHS;
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    for product in 0..12 {
        let code = format!("S-{product}");
        // Versions 1..=10; every third a full replacement, the rest 1-3 random fields.
        let mut changes: Vec<ProductUpdate> = (1..=10)
            .map(|version| {
                let product = marked(&code, version);
                if version % 3 == 1 {
                    ProductUpdate {
                        product: Some(product),
                        update_mask: None,
                    }
                } else {
                    let mut chosen: Vec<&str> = (0..rng.usize(1..=3))
                        .map(|_| paths[rng.usize(..paths.len())])
                        .collect();
                    chosen.sort_unstable();
                    chosen.dedup();
                    partial(product, &chosen)
                }
            })
            .collect();
        // The expected state: every change in version order, fields replaced whole.
        let mut expected = Product::default();
        for change in &changes {
            let mask = mall_product::UpdateMask::from_field_mask(change.update_mask.as_ref())
                .expect("valid mask");
            mask.apply(&mut expected, change.product.as_ref().expect("set"));
        }
        // Duplicates, shuffled, in requests of 1-4 changes.
        let extra: Vec<ProductUpdate> = (0..5)
            .map(|_| changes[rng.usize(..changes.len())].clone())
            .collect();
        changes.extend(extra);
        rng.shuffle(&mut changes);
        let mut rest = changes.as_slice();
        while !rest.is_empty() {
            let (head, tail) = rest.split_at(rng.usize(1..=4).min(rest.len()));
            catalog.bulk(request(head.to_vec())).await;
            rest = tail;
        }
        let stored = catalog.get(&code).await.expect("created");
        let got = Product {
            code: String::new(),
            product_type: String::new(),
            create_time: None,
            update_time: None,
            ..stored
        };
        assert_eq!(got, expected, "product {code}");
    }
}

async fn a_partial_change_before_the_creation_waits_unseen_and_then_fills_in(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    let mut watch = watch_from_now(&catalog).await;

    let early = catalog
        .bulk(request(vec![partial(marked("S-1", 7), &["prices"])]))
        .await;
    assert_eq!(outcomes(&early), [(UpdateOutcome::Pending as i32, 7)]);
    assert_eq!(
        catalog.get("S-1").await,
        None,
        "a pending product is not found"
    );
    let listed = catalog
        .client
        .clone()
        .list_products(ListProductsRequest::default())
        .await
        .expect("lists")
        .into_inner();
    assert!(listed.products.is_empty(), "nor listed");
    let pending = catalog
        .client
        .clone()
        .list_pending_products(ListPendingProductsRequest::default())
        .await
        .expect("lists pending")
        .into_inner()
        .pending_products;
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].code, "S-1");
    assert_eq!(pending[0].version, 7);
    assert_eq!(
        pending[0].waiting_fields.as_ref().map(|m| m.paths.clone()),
        Some(vec!["prices".to_owned()])
    );

    let creation = catalog.bulk(bulk_of("shoes", vec![marked("S-1", 3)])).await;
    assert_eq!(outcomes(&creation), [(UpdateOutcome::Applied as i32, 7)]);
    let created = catalog.get("S-1").await.expect("created");
    assert_eq!(created.prices, marked("S-1", 7).prices, "the waiting price");
    assert_eq!(
        created.names,
        marked("S-1", 3).names,
        "the rest from the creation"
    );

    // The watcher saw nothing of the pending change, then the creation with every field.
    let message = next_message(&mut watch).await;
    assert_eq!(message.changes.len(), 1);
    let record = &message.changes[0];
    assert_eq!(record.product.as_ref(), Some(&created));
    assert_eq!(record.previous_version, 0);
    assert_eq!(record.change_version, 3);
    assert_eq!(
        record.written_fields.as_ref().map(|m| m.paths.len()),
        Some(mall_product::mask::PATHS.len())
    );
    let none_left = catalog
        .client
        .clone()
        .list_pending_products(ListPendingProductsRequest::default())
        .await
        .expect("lists pending")
        .into_inner();
    assert!(none_left.pending_products.is_empty());
}

async fn a_late_change_is_recorded_with_the_fields_it_wrote(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    catalog.bulk(bulk_of("shoes", vec![marked("S-1", 2)])).await;
    catalog
        .bulk(request(vec![partial(marked("S-1", 9), &["names"])]))
        .await;
    let mut watch = watch_from_now(&catalog).await;
    catalog
        .bulk(request(vec![partial(
            marked("S-1", 5),
            &["names", "prices"],
        )]))
        .await;
    let message = next_message(&mut watch).await;
    let record = &message.changes[0];
    assert_eq!(
        record.written_fields.as_ref().map(|m| m.paths.clone()),
        Some(vec!["prices".to_owned()])
    );
    assert_eq!(record.change_version, 5);
    assert_eq!(
        (
            record.previous_version,
            record.product.as_ref().map(|p| p.version)
        ),
        (9, Some(9))
    );
    assert_eq!(record.product.as_ref(), catalog.get("S-1").await.as_ref());
}

async fn a_product_keeps_the_type_it_was_created_with(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    catalog.bulk(bulk_of("bags", vec![bag("B-1", 1)])).await;
    for update in [
        ProductUpdate {
            product: Some(marked("B-1", 2)),
            update_mask: None,
        },
        partial(marked("B-1", 2), &["prices"]),
    ] {
        let status = catalog
            .client
            .clone()
            .bulk_update_products(request(vec![
                ProductUpdate {
                    product: Some(shoe("S-1", 1)),
                    update_mask: None,
                },
                update,
            ]))
            .await
            .expect_err("refused");
        assert_eq!(violations(&status), ["updates[1].product.product_type"]);
    }
    assert_eq!(
        catalog.get("S-1").await,
        None,
        "the whole request is refused"
    );
    assert_eq!(
        catalog.get("B-1").await.map(|p| p.product_type),
        Some("bags".into())
    );
}

async fn pending_products_expire_after_their_retention(engine: Engine) {
    let catalog = TestCatalog::spawn_with(engine, |s| {
        s.catalog.pending_retention = Duration::ZERO;
        // Only the explicit round below runs.
        s.catalog.maintenance_interval = Duration::from_secs(3600);
    })
    .await;
    catalog
        .bulk(request(vec![partial(marked("TYPO-1", 4), &["names"])]))
        .await;
    catalog.bulk(bulk_of("shoes", vec![marked("S-1", 1)])).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    catalog
        .maintenance
        .run_once()
        .await
        .expect("maintenance runs");
    assert_eq!(catalog.maintenance.metrics.pending_expired.get(), 1);
    assert_eq!(catalog.maintenance.metrics.pending.get(), 0);
    // Its fields are gone: a creation now starts from nothing.
    catalog
        .bulk(bulk_of("shoes", vec![marked("TYPO-1", 2)]))
        .await;
    let created = catalog.get("TYPO-1").await.expect("created");
    assert_eq!(created.names, marked("TYPO-1", 2).names);
    assert!(
        catalog.get("S-1").await.is_some(),
        "visible products never expire"
    );
}

async fn rows_of_the_row_level_guard_migrate_with_every_field_at_their_version(engine: Engine) {
    let database = TestDatabase::new(engine).await;
    let url = match engine {
        // Create the file, as mall_db::connect would.
        Engine::Sqlite => format!("{}?mode=rwc", database.url()),
        Engine::Postgres => database.url().to_owned(),
    };
    let db = Database::connect(url).await.expect("connects");
    Migrator::up(&db, Some(1)).await.expect("first migration");
    db.execute_unprepared(
        "INSERT INTO products (code, product_type, brand, category_path, status, names, \
         descriptions, prices, attributes, version, create_time, update_time) VALUES \
         ('S-1', 'shoes', 'Old', '[]', 1, '{\"en\":\"old\"}', '{}', '{\"KRW\":1000}', '{}', \
         8, 1, 1)",
    )
    .await
    .expect("insert an old row");
    Migrator::up(&db, None).await.expect("the rest");
    drop(db);

    let catalog = TestCatalog::spawn_on(database).await;
    // A late change below the old row's version writes nothing; a newer one writes.
    let late = catalog
        .bulk(request(vec![partial(marked("S-1", 7), &["prices"])]))
        .await;
    assert_eq!(outcomes(&late), [(UpdateOutcome::Stale as i32, 8)]);
    let newer = catalog
        .bulk(request(vec![partial(marked("S-1", 9), &["prices"])]))
        .await;
    assert_eq!(outcomes(&newer), [(UpdateOutcome::Applied as i32, 9)]);
    let stored = catalog.get("S-1").await.expect("stored");
    assert_eq!(stored.brand, "Old");
    assert_eq!(stored.status, ProductStatus::OnSale as i32);
}

both_engines!(
    a_late_partial_change_lands_where_it_is_the_newest,
    changes_in_any_order_and_batching_end_in_the_version_order_state,
    a_partial_change_before_the_creation_waits_unseen_and_then_fills_in,
    a_late_change_is_recorded_with_the_fields_it_wrote,
    a_product_keeps_the_type_it_was_created_with,
    pending_products_expire_after_their_retention,
    rows_of_the_row_level_guard_migrate_with_every_field_at_their_version,
);
