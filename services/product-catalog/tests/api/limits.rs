//! Limits a caller meets: message size, deadlines; and the metrics that count writes.

use std::time::Duration;

use mall_proto::catalog::v1::UpdateOutcome;
use mall_test_support::{Engine, probe};
use sea_orm::{ConnectOptions, ConnectionTrait as _, Database};
use tonic::Code;

use crate::both_engines;
use crate::helpers::{TestCatalog, bulk_of, shoe};

async fn an_oversized_message_is_resource_exhausted(engine: Engine) {
    let catalog = TestCatalog::spawn_with(engine, |settings| {
        settings.server.max_message_bytes = 64 * 1024;
    })
    .await;
    let big = (0..20)
        .map(|i| {
            let mut product = shoe(&format!("S-{i}"), 1);
            product.descriptions.insert("ko".into(), "가".repeat(5_000));
            product
        })
        .collect();
    let status = catalog
        .client
        .clone()
        .bulk_update_products(bulk_of("shoes", big))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(catalog.get("S-0").await.is_none());
}

/// A call whose deadline passes while it waits for the database is abandoned: the caller
/// gets DEADLINE_EXCEEDED, the transaction never commits, and the connection is usable.
async fn a_call_past_its_deadline_is_abandoned_and_applies_nothing(engine: Engine) {
    // The server's own deadline, so the server (not this client's timer) ends the call; a
    // client's shorter grpc-timeout takes the same path.
    let catalog = TestCatalog::spawn_with(engine, |settings| {
        settings.server.request_timeout = Duration::from_millis(300);
    })
    .await;
    catalog.bulk(bulk_of("shoes", vec![shoe("S-0", 1)])).await;

    // Another client holds the write lock (SQLite) or a table lock (PostgreSQL).
    let mut options = ConnectOptions::new(catalog.database.url().to_owned());
    options.max_connections(1).sqlx_logging(false);
    let blocker = Database::connect(options).await.expect("blocker connects");
    match engine {
        Engine::Sqlite => {
            blocker
                .execute_unprepared("BEGIN IMMEDIATE")
                .await
                .expect("lock");
        }
        Engine::Postgres => {
            blocker.execute_unprepared("BEGIN").await.expect("begin");
            blocker
                .execute_unprepared("LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
                .await
                .expect("lock");
        }
    }

    let mut abandoned = shoe("S-1", 1);
    abandoned.brand = "Abandoned".into();
    let request = tonic::Request::new(bulk_of("shoes", vec![abandoned]));
    let status = catalog
        .client
        .clone()
        .bulk_update_products(request)
        .await
        .expect_err("deadline passes");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    blocker
        .execute_unprepared("ROLLBACK")
        .await
        .expect("unlock");
    blocker.close().await.expect("closed");

    // The same product, same version: APPLIED only if the abandoned write never committed.
    let mut retried = shoe("S-1", 1);
    retried.brand = "Retried".into();
    let response = catalog.bulk(bulk_of("shoes", vec![retried])).await;
    assert_eq!(response.results[0].outcome, UpdateOutcome::Applied as i32);
    assert_eq!(catalog.get("S-1").await.expect("stored").brand, "Retried");
    // And writes keep working: no connection was left inside the abandoned transaction.
    for version in 2..5 {
        catalog
            .bulk(bulk_of("shoes", vec![shoe("S-0", version)]))
            .await;
    }
}

async fn metrics_count_applied_and_stale_items(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    catalog
        .bulk(bulk_of(
            "shoes",
            vec![shoe("S-1", 2), shoe("S-2", 1), shoe("S-1", 1)],
        ))
        .await;
    let (status, body) = probe::http_get(catalog.admin, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "mall_product_catalog_write_items_total{outcome=\"applied\",source=\"bulk\"} 2",
        "mall_product_catalog_write_items_total{outcome=\"stale\",source=\"bulk\"} 1",
    ] {
        assert!(body.contains(line), "{line} in:\n{body}");
    }
}

both_engines!(
    an_oversized_message_is_resource_exhausted,
    a_call_past_its_deadline_is_abandoned_and_applies_nothing,
    metrics_count_applied_and_stale_items,
);
