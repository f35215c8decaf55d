//! Writers racing each other: no lost update, no deadlock error, one application per request id.

use std::collections::BTreeMap;

use mall_test_support::{Engine, probe};

use crate::both_engines;
use crate::helpers::{TestCatalog, bulk_of, random_half, shoe};

async fn concurrent_overlapping_bulk_updates_end_at_each_products_highest_version(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    const PRODUCTS: usize = 300;
    const WRITERS: u64 = 8;
    const REQUESTS: u64 = 12;
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let catalog_client = catalog.client.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(writer);
            let mut highest = BTreeMap::new();
            for request in 0..REQUESTS {
                // Each writer touches a random half of the products, in random order, with
                // versions that interleave with the other writers'.
                let version = request * WRITERS + writer + 1;
                let products = random_half(&mut rng, PRODUCTS, version);
                for product in &products {
                    highest.insert(product.code.clone(), version);
                }
                catalog_client
                    .clone()
                    .bulk_update_products(bulk_of("shoes", products))
                    .await
                    .expect("no conflict or deadlock reaches the caller");
            }
            highest
        }));
    }
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for writer in writers {
        for (code, version) in writer.await.expect("writer finished") {
            let entry = expected.entry(code).or_default();
            *entry = (*entry).max(version);
        }
    }
    assert_each_whole_at(&catalog, &expected).await;
}

/// Every product in `expected` is stored whole, with the values of its version (`shoe`).
async fn assert_each_whole_at(catalog: &TestCatalog, expected: &BTreeMap<String, u64>) {
    let codes: Vec<String> = expected.keys().cloned().collect();
    let found = catalog
        .client
        .clone()
        .batch_get_products(mall_proto::catalog::v1::BatchGetProductsRequest { codes })
        .await
        .expect("batch get")
        .into_inner();
    for lookup in found.results {
        let product = lookup.product.expect("every written product exists");
        assert_eq!(product.version, expected[&lookup.code], "{}", lookup.code);
        assert_eq!(product, {
            let mut want = shoe(&lookup.code, product.version);
            want.create_time = product.create_time;
            want.update_time = product.update_time;
            want
        });
    }
}

async fn racing_retries_of_one_request_id_apply_it_once(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    let mut request = bulk_of(
        "shoes",
        (0..200).map(|i| shoe(&format!("S-{i}"), 1)).collect(),
    );
    request.request_id = "race-1".into();
    let attempts: Vec<_> = (0..6)
        .map(|_| {
            let mut client = catalog.client.clone();
            let request = request.clone();
            tokio::spawn(async move {
                client
                    .bulk_update_products(request)
                    .await
                    .expect("succeeds")
                    .into_inner()
            })
        })
        .collect();
    let mut responses = Vec::new();
    for attempt in attempts {
        responses.push(attempt.await.expect("joined"));
    }
    assert!(
        responses.windows(2).all(|w| w[0] == w[1]),
        "all see the first response"
    );
    assert!(
        responses[0]
            .results
            .iter()
            .all(|r| r.outcome == mall_proto::catalog::v1::UpdateOutcome::Applied as i32)
    );
    // Applied once: the change log holds exactly one change per product.
    let mut watch = catalog
        .client
        .clone()
        .watch_product_changes(mall_proto::catalog::v1::WatchProductChangesRequest {
            from_oldest: true,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let mut seen = 0;
    while seen < 200 {
        let message = watch.message().await.expect("stream").expect("open");
        seen += message.changes.len();
    }
    assert_eq!(seen, 200);
}

both_engines!(
    concurrent_overlapping_bulk_updates_end_at_each_products_highest_version,
    racing_retries_of_one_request_id_apply_it_once,
);

/// On PostgreSQL a writer that waited behind a younger one gives up and runs again (see
/// `write_pg`); the retry holds the catalog's write lock exclusively, so it cannot lose that
/// race a second time. With a budget of one retry, heavily overlapping writers still all
/// succeed, and the retries did happen (the test exercises the race, not a lucky schedule).
/// Every product ends whole at its highest version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_one_retry_always_resolves_a_write_conflict() {
    let catalog = TestCatalog::spawn_with(Engine::Postgres, |settings| {
        // Two attempts: the first, and one retry.
        settings.catalog.write_retries = 2;
    })
    .await;
    const PRODUCTS: usize = 200;
    const WRITERS: u64 = 8;
    const REQUESTS: u64 = 15;
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let client = catalog.client.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(writer + 7);
            let mut highest = BTreeMap::new();
            for request in 0..REQUESTS {
                let version = request * WRITERS + writer + 1;
                let products = random_half(&mut rng, PRODUCTS, version);
                for product in &products {
                    highest.insert(product.code.clone(), version);
                }
                client
                    .clone()
                    .bulk_update_products(bulk_of("shoes", products))
                    .await
                    .expect("one retry resolves any conflict");
            }
            highest
        }));
    }
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for writer in writers {
        for (code, version) in writer.await.expect("writer finished") {
            let entry = expected.entry(code).or_default();
            *entry = (*entry).max(version);
        }
    }
    assert_each_whole_at(&catalog, &expected).await;
    let (status, body) = probe::http_get(catalog.admin, "/metrics").await;
    assert_eq!(status, 200);
    let retries: u64 = body
        .lines()
        .find_map(|line| line.strip_prefix("mall_product_catalog_write_retries_total "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("write_retries_total in:\n{body}"));
    assert!(
        retries > 0,
        "the writers never conflicted; the test proves nothing"
    );
}

/// Writers racing to create the same new products: the losers' inserts conflict after their
/// plans were made, and their retries must write the values their requests came with (a plan
/// moves a write's values into its row and gives them back when it does not commit). Each
/// round's highest version is a random writer's, so a retry that lost its values would leave
/// empty fields behind in some round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_retried_creation_writes_the_values_it_came_with() {
    let catalog = TestCatalog::spawn(Engine::Postgres).await;
    const ROUNDS: usize = 12;
    const PRODUCTS: usize = 50;
    const WRITERS: u64 = 4;
    let mut rng = fastrand::Rng::with_seed(11);
    let mut expected = BTreeMap::new();
    for round in 0..ROUNDS {
        let codes: Vec<String> = (0..PRODUCTS).map(|i| format!("R{round}-{i}")).collect();
        let mut versions: Vec<u64> = (1..=WRITERS).collect();
        rng.shuffle(&mut versions);
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(versions.len()));
        let mut writers = Vec::new();
        for version in versions {
            let client = catalog.client.clone();
            let products: Vec<_> = codes.iter().map(|code| shoe(code, version)).collect();
            let start = start.clone();
            writers.push(tokio::spawn(async move {
                start.wait().await;
                client
                    .clone()
                    .bulk_update_products(bulk_of("shoes", products))
                    .await
                    .expect("a retry resolves the race");
            }));
        }
        for writer in writers {
            writer.await.expect("writer finished");
        }
        expected.extend(codes.into_iter().map(|code| (code, WRITERS)));
    }
    assert_each_whole_at(&catalog, &expected).await;
}

/// A retry waits for the exclusive write lock at most 2 s (every writer queues behind it
/// meanwhile) and then counts one more conflict: a writer stuck in flight with the lock held
/// shared stalls writes that long, not for the database's `lock_timeout` (10 s), and the
/// caller hears of persisting conflicts, not of an unavailable database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_retry_stops_waiting_for_a_stuck_writer_and_counts_a_conflict() {
    use sea_orm::{ConnectOptions, ConnectionTrait as _, Database};
    let catalog = TestCatalog::spawn_with(Engine::Postgres, |settings| {
        settings.catalog.write_retries = 2;
    })
    .await;
    catalog.bulk(bulk_of("shoes", vec![shoe("S-1", 1)])).await;
    let mut options = ConnectOptions::new(catalog.database.url().to_owned());
    options.max_connections(1).sqlx_logging(false);
    let other = Database::connect(options).await.expect("connects");
    // Every attempt conflicts: the row says a transaction with a far higher id wrote it.
    other
        .execute_unprepared("UPDATE products SET write_xid = 9000000000000000000")
        .await
        .expect("marks the row");
    // A writer stuck in flight: the write lock (keys "mall", 1) held shared.
    other
        .execute_unprepared("BEGIN; SELECT pg_advisory_xact_lock_shared(1835101292, 1)")
        .await
        .expect("holds the write lock shared");
    let status = catalog
        .client
        .clone()
        .bulk_update_products(bulk_of("shoes", vec![shoe("S-1", 2)]))
        .await
        .expect_err("the conflict persists");
    other.execute_unprepared("ROLLBACK").await.expect("ends");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("conflicting writes"),
        "a conflict, not a lock timeout: {status:?}"
    );
}
