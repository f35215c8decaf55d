//! WatchProductChanges: order, resume, filters, retention.

use std::time::Duration;

use mall_proto::catalog::v1::{
    ProductChangeRecord, UpdateOutcome, WatchProductChangesRequest, WatchProductChangesResponse,
};
use mall_test_support::Engine;
use tonic::{Code, Streaming};

use crate::both_engines;
use crate::helpers::{TestCatalog, bag, bulk_of, random_half, shoe, violations};

async fn watch(
    catalog: &TestCatalog,
    request: WatchProductChangesRequest,
) -> Streaming<WatchProductChangesResponse> {
    catalog
        .client
        .clone()
        .watch_product_changes(request)
        .await
        .expect("watch starts")
        .into_inner()
}

/// Reads from `stream` until `count` changes arrived; returns them and the last resume cursor.
async fn take(
    stream: &mut Streaming<WatchProductChangesResponse>,
    count: usize,
) -> (Vec<ProductChangeRecord>, String) {
    let mut changes = Vec::new();
    let mut resume = String::new();
    while changes.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("changes arrive in time")
            .expect("stream healthy")
            .expect("stream open");
        changes.extend(message.changes);
        resume = message.resume_cursor;
    }
    (changes, resume)
}

fn versions(changes: &[ProductChangeRecord]) -> Vec<(String, u64, u64)> {
    changes
        .iter()
        .map(|c| {
            let p = c.product.as_ref().expect("product");
            (p.code.clone(), p.version, c.previous_version)
        })
        .collect()
}

async fn from_oldest_streams_every_change_in_commit_order(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    catalog
        .bulk(bulk_of("shoes", vec![shoe("S-1", 1), shoe("S-2", 1)]))
        .await;
    catalog
        .bulk(bulk_of("shoes", vec![shoe("S-1", 2), shoe("S-1", 1)]))
        .await;
    let mut stream = watch(
        &catalog,
        WatchProductChangesRequest {
            from_oldest: true,
            ..Default::default()
        },
    )
    .await;
    let (changes, _) = take(&mut stream, 3).await;
    assert_eq!(
        versions(&changes),
        [
            ("S-1".to_owned(), 1, 0),
            ("S-2".to_owned(), 1, 0),
            ("S-1".to_owned(), 2, 1)
        ],
        "stale writes are not changes"
    );
    // The stream follows new commits.
    catalog.bulk(bulk_of("shoes", vec![shoe("S-3", 5)])).await;
    let (more, _) = take(&mut stream, 1).await;
    assert_eq!(versions(&more), [("S-3".to_owned(), 5, 0)]);
    assert!(more[0].commit_time.is_some());
}

async fn a_resumed_watch_misses_nothing_and_repeats_nothing(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    let writer = {
        let client = catalog.client.clone();
        tokio::spawn(async move {
            for round in 1..=40u64 {
                let products = (0..25).map(|i| shoe(&format!("S-{i:02}"), round)).collect();
                client
                    .clone()
                    .bulk_update_products(bulk_of("shoes", products))
                    .await
                    .expect("write");
            }
        })
    };
    let mut received = Vec::new();
    let mut cursor = String::new();
    // Disconnect and reconnect several times while the writer runs.
    for _ in 0..5 {
        let mut stream = watch(
            &catalog,
            WatchProductChangesRequest {
                start_cursor: cursor.clone(),
                from_oldest: cursor.is_empty(),
                ..Default::default()
            },
        )
        .await;
        let (changes, _) = take(&mut stream, 100).await;
        cursor = changes.last().expect("some").cursor.clone();
        received.extend(changes);
        drop(stream);
    }
    writer.await.expect("writer done");
    let mut stream = watch(
        &catalog,
        WatchProductChangesRequest {
            start_cursor: cursor,
            ..Default::default()
        },
    )
    .await;
    let (rest, _) = take(&mut stream, 1000 - received.len()).await;
    received.extend(rest);
    let mut expected = Vec::new();
    for round in 1..=40u64 {
        for i in 0..25 {
            expected.push((format!("S-{i:02}"), round, round - 1));
        }
    }
    assert_eq!(versions(&received), expected);
}

async fn from_now_sees_only_later_changes(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    catalog.bulk(bulk_of("shoes", vec![shoe("S-1", 1)])).await;
    let mut stream = watch(&catalog, WatchProductChangesRequest::default()).await;
    catalog.bulk(bulk_of("shoes", vec![shoe("S-2", 1)])).await;
    let (changes, _) = take(&mut stream, 1).await;
    assert_eq!(versions(&changes), [("S-2".to_owned(), 1, 0)]);
}

/// On PostgreSQL a transaction with a lower id can commit after one with a higher: a watch
/// "from now" leaves out an entry that committed before its call even when it sorts after one
/// that committed later, and a watch resumed from a cursor of that stream leaves it out too.
/// (The two entries are written to the log directly, as two other writers' transactions.)
#[tokio::test]
async fn a_watch_resumed_from_a_from_now_cursor_still_leaves_out_what_committed_before() {
    use sea_orm::{ConnectOptions, ConnectionTrait as _, Database};
    let catalog = TestCatalog::spawn(Engine::Postgres).await;
    let connect = || async {
        let mut options = ConnectOptions::new(catalog.database.url().to_owned());
        options.max_connections(1).sqlx_logging(false);
        Database::connect(options).await.expect("connects")
    };
    let entry = |code: &str| {
        let product: String = prost::Message::encode_to_vec(&shoe(code, 1))
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!(
            "INSERT INTO product_changes (code, product_type, version, previous_version, \
             commit_time, product, written_fields, change_version) \
             VALUES ('{code}', 'shoes', 1, 0, 0, '\\x{product}', 127, 1)"
        )
    };
    let (lower, higher) = (connect().await, connect().await);
    lower
        .execute_unprepared("BEGIN; SELECT pg_current_xact_id()")
        .await
        .expect("the lower transaction id is taken");
    higher
        .execute_unprepared(&entry("S-BEFORE"))
        .await
        .expect("a higher transaction commits before the call");
    let mut stream = watch(&catalog, WatchProductChangesRequest::default()).await;
    lower
        .execute_unprepared(&entry("S-AFTER"))
        .await
        .expect("insert");
    lower
        .execute_unprepared("COMMIT")
        .await
        .expect("commits after the call");
    let (changes, _) = take(&mut stream, 1).await;
    assert_eq!(versions(&changes), [("S-AFTER".to_owned(), 1, 0)]);
    drop(stream);

    catalog
        .bulk(bulk_of("shoes", vec![shoe("S-LATER", 1)]))
        .await;
    let mut resumed = watch(
        &catalog,
        WatchProductChangesRequest {
            start_cursor: changes[0].cursor.clone(),
            ..Default::default()
        },
    )
    .await;
    let (changes, _) = take(&mut resumed, 1).await;
    assert_eq!(
        versions(&changes),
        [("S-LATER".to_owned(), 1, 0)],
        "S-BEFORE committed before the first call"
    );
}

async fn a_type_filter_skips_other_types_but_still_advances_the_resume_cursor(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    catalog.bulk(bulk_of("shoes", vec![shoe("S-1", 1)])).await;
    catalog.bulk(bulk_of("bags", vec![bag("B-1", 1)])).await;
    let mut bags = watch(
        &catalog,
        WatchProductChangesRequest {
            from_oldest: true,
            product_type: "bags".into(),
            ..Default::default()
        },
    )
    .await;
    let (changes, _) = take(&mut bags, 1).await;
    assert_eq!(versions(&changes), [("B-1".to_owned(), 1, 0)]);

    // Only shoes change now: the bags watcher gets no change, but its resume cursor moves.
    catalog.bulk(bulk_of("shoes", vec![shoe("S-1", 2)])).await;
    let message = tokio::time::timeout(Duration::from_secs(20), bags.message())
        .await
        .expect("in time")
        .expect("healthy")
        .expect("open");
    assert!(message.changes.is_empty());
    let mut after = watch(
        &catalog,
        WatchProductChangesRequest {
            start_cursor: message.resume_cursor,
            ..Default::default()
        },
    )
    .await;
    catalog.bulk(bulk_of("shoes", vec![shoe("S-9", 1)])).await;
    let (next, _) = take(&mut after, 1).await;
    assert_eq!(
        versions(&next),
        [("S-9".to_owned(), 1, 0)],
        "the skipped change is behind the cursor"
    );
}

async fn a_cursor_older_than_the_retention_is_out_of_range(engine: Engine) {
    let catalog = TestCatalog::spawn_with(engine, |settings| {
        settings.catalog.change_retention = Duration::from_millis(1);
        // Only explicit rounds prune in this test.
        settings.catalog.maintenance_interval = Duration::from_secs(3600);
    })
    .await;
    catalog.bulk(bulk_of("shoes", vec![shoe("S-1", 1)])).await;
    let mut stream = watch(
        &catalog,
        WatchProductChangesRequest {
            from_oldest: true,
            ..Default::default()
        },
    )
    .await;
    let (changes, _) = take(&mut stream, 1).await;
    let old_cursor = changes[0].cursor.clone();
    catalog.bulk(bulk_of("shoes", vec![shoe("S-1", 2)])).await;
    let (_, _) = take(&mut stream, 1).await;
    drop(stream);

    // Everything is past a 1 ms retention once a round runs.
    let status = mall_test_support::wait_until(
        "the old changes are pruned",
        Duration::from_secs(10),
        || async {
            catalog.maintenance.run_once().await.expect("maintenance");
            catalog
                .client
                .clone()
                .watch_product_changes(WatchProductChangesRequest {
                    start_cursor: old_cursor.clone(),
                    ..Default::default()
                })
                .await
                .err()
        },
    )
    .await;
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    // from_oldest still works, and the log keeps sequence numbers after pruning.
    let mut fresh = watch(
        &catalog,
        WatchProductChangesRequest {
            from_oldest: true,
            ..Default::default()
        },
    )
    .await;
    catalog.bulk(bulk_of("shoes", vec![shoe("S-1", 3)])).await;
    let (after, _) = take(&mut fresh, 1).await;
    assert_eq!(versions(&after), [("S-1".to_owned(), 3, 2)]);
}

async fn malformed_watch_requests_are_refused(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    let mut client = catalog.client.clone();
    for (request, field) in [
        (
            WatchProductChangesRequest {
                start_cursor: "YzF8MA".into(),
                from_oldest: true,
                ..Default::default()
            },
            "from_oldest",
        ),
        (
            WatchProductChangesRequest {
                start_cursor: "garbage".into(),
                ..Default::default()
            },
            "start_cursor",
        ),
        (
            WatchProductChangesRequest {
                product_type: "spaceships".into(),
                ..Default::default()
            },
            "product_type",
        ),
    ] {
        let status = client
            .watch_product_changes(request)
            .await
            .expect_err("refused");
        assert_eq!(violations(&status), [field]);
    }
}

/// Eight writers commit in parallel (no lock orders their commits) while two watchers
/// follow: one from the oldest change, one from "now", started midway. Every applied change
/// reaches the first exactly once, and each product's changes come in the order they were
/// written (each record's previous version is the one before it); the second sees an
/// unbroken tail of each product's changes.
async fn parallel_writers_and_watchers_miss_nothing_and_keep_each_products_order(engine: Engine) {
    use std::collections::BTreeMap;
    let catalog = TestCatalog::spawn(engine).await;
    const PRODUCTS: usize = 200;
    const WRITERS: u64 = 8;
    const REQUESTS: u64 = 15;
    let mut oldest = watch(
        &catalog,
        WatchProductChangesRequest {
            from_oldest: true,
            ..Default::default()
        },
    )
    .await;
    let (halfway_tx, halfway_rx) = tokio::sync::oneshot::channel();
    let mut halfway_tx = Some(halfway_tx);
    let mut writers = Vec::new();
    let (progress_tx, mut progress_rx) = tokio::sync::mpsc::unbounded_channel();
    for writer in 0..WRITERS {
        let client = catalog.client.clone();
        let progress = progress_tx.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(writer + 100);
            let mut applied = 0usize;
            for request in 0..REQUESTS {
                let version = request * WRITERS + writer + 1;
                let products = random_half(&mut rng, PRODUCTS, version);
                let response = client
                    .clone()
                    .bulk_update_products(bulk_of("shoes", products))
                    .await
                    .expect("no conflict reaches the caller")
                    .into_inner();
                applied += response
                    .results
                    .iter()
                    .filter(|r| r.outcome == UpdateOutcome::Applied as i32)
                    .count();
                let _ = progress.send(());
            }
            applied
        }));
    }
    drop(progress_tx);
    // Start the second watcher once half of the requests are in.
    let starter = {
        let catalog_client = catalog.client.clone();
        tokio::spawn(async move {
            let mut done = 0;
            while progress_rx.recv().await.is_some() {
                done += 1;
                if done == WRITERS * REQUESTS / 2
                    && let Some(tx) = halfway_tx.take()
                {
                    let stream = catalog_client
                        .clone()
                        .watch_product_changes(WatchProductChangesRequest::default())
                        .await
                        .expect("watch starts")
                        .into_inner();
                    let _ = tx.send(stream);
                }
            }
        })
    };
    let mut applied = 0;
    for writer in writers {
        applied += writer.await.expect("writer finished");
    }
    starter.await.expect("starter");
    let mut from_now = halfway_rx.await.expect("second watcher started");

    let (all, _) = take(&mut oldest, applied).await;
    assert_eq!(all.len(), applied, "every applied change, once");
    let chains = |records: &[ProductChangeRecord]| {
        let mut chains: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
        for (code, version, previous) in versions(records) {
            chains.entry(code).or_default().push((previous, version));
        }
        chains
    };
    let full = chains(&all);
    for (code, chain) in &full {
        for pair in chain.windows(2) {
            assert_eq!(
                pair[1].0, pair[0].1,
                "{code}: changes out of order: {chain:?}"
            );
        }
        assert_eq!(chain[0].0, 0, "{code}: the first change creates it");
    }
    let stored = catalog
        .client
        .clone()
        .batch_get_products(mall_proto::catalog::v1::BatchGetProductsRequest {
            codes: full.keys().cloned().collect(),
        })
        .await
        .expect("batch get")
        .into_inner();
    for lookup in stored.results {
        let product = lookup.product.expect("stored");
        let last = full[&product.code].last().expect("a change").1;
        assert_eq!(
            product.version, last,
            "{}: the last change is the stored state",
            product.code
        );
    }

    // The second watcher: for each product, a tail of the full chain, unbroken.
    let expected_tail: usize = {
        // Read until quiet: it cannot know how many to expect otherwise.
        let mut records = Vec::new();
        while let Ok(message) =
            tokio::time::timeout(Duration::from_secs(2), from_now.message()).await
        {
            let message = message.expect("stream healthy").expect("stream open");
            records.extend(message.changes);
        }
        for (code, tail) in chains(&records) {
            let chain = &full[&code];
            assert!(
                chain.ends_with(&tail),
                "{code}: a watch from now saw {tail:?}, not a tail of {chain:?}"
            );
        }
        records.len()
    };
    assert!(
        expected_tail > 0,
        "the writers went on after the second watch started"
    );
}

both_engines!(
    from_oldest_streams_every_change_in_commit_order,
    a_resumed_watch_misses_nothing_and_repeats_nothing,
    from_now_sees_only_later_changes,
    a_type_filter_skips_other_types_but_still_advances_the_resume_cursor,
    a_cursor_older_than_the_retention_is_out_of_range,
    malformed_watch_requests_are_refused,
    parallel_writers_and_watchers_miss_nothing_and_keep_each_products_order,
);
