//! GetProduct and BatchGetProducts.

use mall_proto::catalog::v1::{BatchGetProductsRequest, GetProductRequest};
use mall_test_support::Engine;
use tonic::Code;

use crate::both_engines;
use crate::helpers::{TestCatalog, bulk_of, shoe, violations};

async fn get_returns_the_product_or_not_found(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    catalog.bulk(bulk_of("shoes", vec![shoe("S-1", 2)])).await;
    let mut client = catalog.client.clone();
    let product = client
        .get_product(GetProductRequest { code: "S-1".into() })
        .await
        .expect("found")
        .into_inner()
        .product
        .expect("set");
    assert_eq!(product.version, 2);

    let missing = client
        .get_product(GetProductRequest {
            code: "S-404".into(),
        })
        .await
        .expect_err("absent");
    assert_eq!(missing.code(), Code::NotFound);
    assert!(missing.message().contains("S-404"));

    let malformed = client
        .get_product(GetProductRequest {
            code: "no spaces".into(),
        })
        .await
        .expect_err("malformed");
    assert_eq!(violations(&malformed), ["code"]);
}

async fn batch_get_keeps_request_order_and_reports_missing_codes(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    catalog
        .bulk(bulk_of("shoes", vec![shoe("S-1", 1), shoe("S-2", 2)]))
        .await;
    let mut client = catalog.client.clone();
    let results = client
        .batch_get_products(BatchGetProductsRequest {
            codes: vec!["S-2".into(), "S-9".into(), "S-1".into(), "S-2".into()],
        })
        .await
        .expect("batch get")
        .into_inner()
        .results;
    let summary: Vec<_> = results
        .iter()
        .map(|r| {
            (
                r.code.as_str(),
                r.found,
                r.product.as_ref().map(|p| p.version),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("S-2", true, Some(2)),
            ("S-9", false, None),
            ("S-1", true, Some(1)),
            ("S-2", true, Some(2))
        ]
    );

    let too_many = client
        .batch_get_products(BatchGetProductsRequest {
            codes: (0..1001).map(|i| format!("S-{i}")).collect(),
        })
        .await
        .expect_err("refused");
    assert_eq!(violations(&too_many), ["codes"]);
    let malformed = client
        .batch_get_products(BatchGetProductsRequest {
            codes: vec!["S-1".into(), String::new()],
        })
        .await
        .expect_err("refused");
    assert_eq!(violations(&malformed), ["codes[1]"]);
}

/// A transaction left open elsewhere on the PostgreSQL server holds the change log's
/// commit-order watermark back; another replica's committed write still reaches this
/// replica's cache within the follower's poll, not when that transaction ends.
#[tokio::test]
async fn a_long_transaction_elsewhere_does_not_hold_back_another_replicas_write() {
    use sea_orm::{ConnectOptions, ConnectionTrait as _, Database};
    let first = TestCatalog::spawn(Engine::Postgres).await;
    let url = first.database.url().to_owned();
    let second = TestCatalog::spawn_with(Engine::Postgres, |settings| {
        settings.database.url = url.clone().into();
    })
    .await;
    first.bulk(bulk_of("shoes", vec![shoe("S-1", 1)])).await;
    assert_eq!(first.get("S-1").await.map(|p| p.version), Some(1));

    let mut options = ConnectOptions::new(url);
    options.max_connections(1).sqlx_logging(false);
    let forgotten = Database::connect(options).await.expect("connects");
    forgotten
        .execute_unprepared("BEGIN; SELECT pg_current_xact_id()")
        .await
        .expect("a transaction with an id stays open");
    second.bulk(bulk_of("shoes", vec![shoe("S-1", 2)])).await;
    mall_test_support::wait_until(
        "the other replica's write reaches this cache while the transaction is open",
        std::time::Duration::from_secs(10),
        || async { (first.get("S-1").await.map(|p| p.version) == Some(2)).then_some(()) },
    )
    .await;
    forgotten
        .execute_unprepared("ROLLBACK")
        .await
        .expect("ends");
}

/// Two replicas on one database: each serves reads from its cache, a write through one is
/// visible through it at once and through the other once its change-log follower ran.
async fn a_write_through_another_replica_reaches_this_replicas_cache(engine: Engine) {
    let first = TestCatalog::spawn(engine).await;
    let url = first.database.url().to_owned();
    let second = TestCatalog::spawn_with(engine, |settings| {
        settings.database.url = url.into();
    })
    .await;
    first.bulk(bulk_of("shoes", vec![shoe("S-1", 1)])).await;
    // Both replicas now cache version 1.
    assert_eq!(first.get("S-1").await.map(|p| p.version), Some(1));
    assert_eq!(second.get("S-1").await.map(|p| p.version), Some(1));

    second.bulk(bulk_of("shoes", vec![shoe("S-1", 2)])).await;
    assert_eq!(
        second.get("S-1").await.map(|p| p.version),
        Some(2),
        "a replica reads its own writes"
    );
    mall_test_support::wait_until(
        "the other replica's cache follows the change log",
        std::time::Duration::from_secs(10),
        || async { (first.get("S-1").await.map(|p| p.version) == Some(2)).then_some(()) },
    )
    .await;
    let batch = first
        .client
        .clone()
        .batch_get_products(BatchGetProductsRequest {
            codes: vec!["S-1".into()],
        })
        .await
        .expect("batch get")
        .into_inner();
    assert_eq!(
        batch.results[0].product.as_ref().map(|p| p.version),
        Some(2)
    );
}

both_engines!(
    a_write_through_another_replica_reaches_this_replicas_cache,
    get_returns_the_product_or_not_found,
    batch_get_keeps_request_order_and_reports_missing_codes,
);
