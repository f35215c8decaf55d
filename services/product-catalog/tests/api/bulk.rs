//! BulkUpdateProducts: the version guard, masks, validation and idempotency.

use mall_proto::catalog::v1::{BulkUpdateProductsRequest, ProductStatus, UpdateOutcome};
use mall_test_support::Engine;

use crate::both_engines;
use crate::helpers::{TestCatalog, bag, bulk_of, partial, shoe, violations};

fn outcomes(
    response: &mall_proto::catalog::v1::BulkUpdateProductsResponse,
) -> Vec<(String, UpdateOutcome, u64)> {
    response
        .results
        .iter()
        .map(|r| {
            (
                r.code.clone(),
                UpdateOutcome::try_from(r.outcome).expect("known outcome"),
                r.stored_version,
            )
        })
        .collect()
}

async fn creates_products_and_reports_each_item_in_request_order(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    let response = catalog
        .bulk(bulk_of(
            "shoes",
            vec![shoe("S-2", 4), shoe("S-1", 1), shoe("S-3", 9)],
        ))
        .await;
    assert_eq!(
        outcomes(&response),
        [
            ("S-2".to_owned(), UpdateOutcome::Applied, 4),
            ("S-1".to_owned(), UpdateOutcome::Applied, 1),
            ("S-3".to_owned(), UpdateOutcome::Applied, 9),
        ]
    );
    let stored = catalog.get("S-2").await.expect("stored");
    let mut expected = shoe("S-2", 4);
    expected.create_time = stored.create_time;
    expected.update_time = stored.update_time;
    assert_eq!(stored, expected);
    assert!(stored.create_time.is_some() && stored.create_time == stored.update_time);
}

async fn an_older_or_equal_version_is_stale_and_changes_nothing(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    catalog.bulk(bulk_of("shoes", vec![shoe("S-1", 5)])).await;
    let before = catalog.get("S-1").await.expect("stored");
    let mut older = shoe("S-1", 4);
    older.brand = "Overwritten".into();
    let mut equal = shoe("S-1", 5);
    equal.brand = "Overwritten".into();
    let response = catalog.bulk(bulk_of("shoes", vec![older, equal])).await;
    assert_eq!(
        outcomes(&response),
        [
            ("S-1".to_owned(), UpdateOutcome::Stale, 5),
            ("S-1".to_owned(), UpdateOutcome::Stale, 5),
        ]
    );
    assert_eq!(catalog.get("S-1").await.expect("stored"), before);
}

async fn a_partial_update_writes_only_its_masked_fields(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    catalog.bulk(bulk_of("shoes", vec![shoe("S-1", 1)])).await;
    let mut change = shoe("S-1", 2);
    change.prices = [("KRW".to_owned(), 59_000)].into();
    change.brand = "Ignored, not in the mask".into();
    let response = catalog
        .bulk(BulkUpdateProductsRequest {
            product_type: "shoes".into(),
            updates: vec![partial(change, &["prices"])],
            ..Default::default()
        })
        .await;
    assert_eq!(response.results[0].outcome, UpdateOutcome::Applied as i32);
    let stored = catalog.get("S-1").await.expect("stored");
    assert_eq!(
        stored.prices,
        [("KRW".to_owned(), 59_000)].into(),
        "a map is replaced whole"
    );
    assert_eq!(stored.brand, "Pedala");
    assert_eq!(stored.names, shoe("S-1", 1).names);
    assert_eq!(stored.version, 2);
}

async fn a_full_replacement_clears_what_it_leaves_unset(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    catalog.bulk(bulk_of("shoes", vec![shoe("S-1", 1)])).await;
    let mut bare = shoe("S-1", 2);
    bare.descriptions.clear();
    bare.attributes = None;
    bare.category_path.clear();
    catalog.bulk(bulk_of("shoes", vec![bare])).await;
    let stored = catalog.get("S-1").await.expect("stored");
    assert!(stored.descriptions.is_empty());
    assert!(stored.category_path.is_empty());
    assert_eq!(stored.attributes, None);
}

async fn an_item_of_another_type_is_refused_naming_its_index(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    let status = catalog
        .client
        .clone()
        .bulk_update_products(bulk_of("shoes", vec![shoe("S-1", 1), bag("B-1", 1)]))
        .await
        .expect_err("refused");
    assert_eq!(violations(&status), ["updates[1].product.product_type"]);
    assert_eq!(
        catalog.get("S-1").await,
        None,
        "nothing of a refused request applies"
    );
}

async fn a_runaway_version_is_refused_when_the_guard_is_on(engine: Engine) {
    let catalog = TestCatalog::spawn_with(engine, |settings| {
        settings.catalog.max_version_jump = Some(1_000);
    })
    .await;
    // A new product is not guarded, whatever its version.
    catalog
        .bulk(bulk_of("shoes", vec![shoe("S-1", 5_000)]))
        .await;
    catalog
        .bulk(bulk_of("shoes", vec![shoe("S-1", 6_000)]))
        .await;
    let mut runaway = shoe("S-1", 7_000);
    runaway.version = i64::MAX as u64;
    let status = catalog
        .client
        .clone()
        .bulk_update_products(bulk_of("shoes", vec![runaway]))
        .await
        .expect_err("2^63-1 is refused");
    assert_eq!(violations(&status), ["updates[0].product.version"]);
    assert_eq!(
        catalog.get("S-1").await.map(|p| p.version),
        Some(6_000),
        "the product is not frozen: it keeps its version and takes the next change"
    );
    catalog
        .bulk(bulk_of("shoes", vec![shoe("S-1", 6_001)]))
        .await;
}

async fn every_invalid_field_is_reported_as_a_field_violation(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    let mut bad = shoe("S-1", 1);
    bad.prices.insert("XYZ".into(), 100);
    bad.prices.insert("EUR".into(), -1);
    bad.names.insert("en_US".into(), "Sneaker".into());
    bad.attributes
        .as_mut()
        .expect("set")
        .fields
        .insert("loft_degrees".into(), prost_types::Value::default());
    let mut empty_code = shoe("", 1);
    empty_code.version = 0;
    let long_code = shoe(&"x".repeat(65), 1);
    let status = catalog
        .client
        .clone()
        .bulk_update_products(bulk_of("shoes", vec![bad, empty_code, long_code]))
        .await
        .expect_err("refused");
    assert_eq!(
        violations(&status),
        [
            "updates[0].product.names[\"en_US\"]",
            "updates[0].product.prices[\"EUR\"]",
            "updates[0].product.prices[\"XYZ\"]",
            "updates[0].product.attributes[\"loft_degrees\"]",
            "updates[1].product.code",
            "updates[1].product.version",
            "updates[2].product.code",
        ]
    );

    let unknown_type = catalog
        .client
        .clone()
        .bulk_update_products(bulk_of("spaceships", vec![shoe("S-1", 1)]))
        .await
        .expect_err("refused");
    assert_eq!(violations(&unknown_type), ["product_type"]);
}

async fn more_than_a_thousand_items_or_none_are_refused(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    let many = (0..1001).map(|i| shoe(&format!("S-{i}"), 1)).collect();
    let status = catalog
        .client
        .clone()
        .bulk_update_products(bulk_of("shoes", many))
        .await
        .expect_err("refused");
    assert_eq!(violations(&status), ["updates"]);
    let status = catalog
        .client
        .clone()
        .bulk_update_products(bulk_of("shoes", vec![]))
        .await
        .expect_err("refused");
    assert_eq!(violations(&status), ["updates"]);
    // Exactly the limit is fine.
    let limit = (0..1000).map(|i| shoe(&format!("S-{i:04}"), 1)).collect();
    let response = catalog.bulk(bulk_of("shoes", limit)).await;
    assert_eq!(response.results.len(), 1000);
}

async fn a_partial_update_with_status_in_its_mask_creates_a_product(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    catalog
        .bulk(BulkUpdateProductsRequest {
            product_type: "shoes".into(),
            updates: vec![partial(shoe("S-1", 1), &["status", "prices"])],
            ..Default::default()
        })
        .await;
    let created = catalog.get("S-1").await.expect("created");
    assert_eq!(created.status, ProductStatus::OnSale as i32);
    assert_eq!(created.brand, "", "fields outside the mask start empty");
}

async fn a_repeated_request_id_returns_the_first_result_without_applying_again(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    let mut first = bulk_of("shoes", vec![shoe("S-1", 3)]);
    first.request_id = "0b6f3c1e-retry-me".into();
    let response = catalog.bulk(first.clone()).await;

    // Someone else moves the product on.
    catalog.bulk(bulk_of("shoes", vec![shoe("S-1", 4)])).await;

    // The retry of the first request, even with other content, changes nothing.
    let mut retry = first.clone();
    retry.updates = bulk_of("shoes", vec![shoe("S-1", 9)]).updates;
    let replayed = catalog.bulk(retry).await;
    assert_eq!(replayed, response);
    assert_eq!(catalog.get("S-1").await.expect("stored").version, 4);
}

async fn shuffled_versions_across_many_requests_end_at_the_maximum(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    let mut rng = fastrand::Rng::with_seed(7);
    let mut writes: Vec<(String, u64)> = (0..50)
        .flat_map(|p| (1..=12).map(move |v| (format!("S-{p:02}"), v)))
        .collect();
    rng.shuffle(&mut writes);
    for chunk in writes.chunks(37) {
        let products = chunk.iter().map(|(code, v)| shoe(code, *v)).collect();
        catalog.bulk(bulk_of("shoes", products)).await;
    }
    for p in 0..50 {
        let code = format!("S-{p:02}");
        let stored = catalog.get(&code).await.expect("stored");
        assert_eq!(stored.version, 12, "{code}");
        assert_eq!(stored, {
            let mut expected = shoe(&code, 12);
            expected.create_time = stored.create_time;
            expected.update_time = stored.update_time;
            expected
        });
    }
}

both_engines!(
    creates_products_and_reports_each_item_in_request_order,
    an_older_or_equal_version_is_stale_and_changes_nothing,
    a_partial_update_writes_only_its_masked_fields,
    a_full_replacement_clears_what_it_leaves_unset,
    an_item_of_another_type_is_refused_naming_its_index,
    a_runaway_version_is_refused_when_the_guard_is_on,
    every_invalid_field_is_reported_as_a_field_violation,
    more_than_a_thousand_items_or_none_are_refused,
    a_partial_update_with_status_in_its_mask_creates_a_product,
    a_repeated_request_id_returns_the_first_result_without_applying_again,
    shuffled_versions_across_many_requests_end_at_the_maximum,
);
