//! Changes flowing from PublishProductChanges to the catalog.

use std::{collections::BTreeSet, time::Duration};

use mall_proto::sync::v1::{
    ListQuarantinedRequest, PauseRelayRequest, ProductChange, ResumeRelayRequest,
};
use mall_test_support::{Engine, probe, wait_until};
use sync_relay::change::lane_of;

use crate::both_engines;
use crate::helpers::{Catalog, Relay, change, database};

async fn published_changes_reach_the_catalog_at_their_highest_version(engine: Engine) {
    let catalog = Catalog::start(database(engine).await, None, |_| {}).await;
    let relay_db = database(engine).await;
    let relay = Relay::start(&relay_db, catalog.addr, |_| {}).await;

    // 300 products, 5 versions each, every product's versions in a shuffled order.
    let mut rng = fastrand::Rng::with_seed(11);
    let mut changes: Vec<ProductChange> = Vec::new();
    for p in 0..300 {
        let mut versions: Vec<u64> = (1..=5).collect();
        rng.shuffle(&mut versions);
        changes.extend(
            versions
                .into_iter()
                .map(|v| change(&format!("P-{p:03}"), v)),
        );
    }
    rng.shuffle(&mut changes);
    let response = relay.publish(changes).await;
    assert_eq!(response.accepted_count, 1500);
    assert_eq!(response.quarantined_count, 0);

    let expected: Vec<(String, u64)> = (0..300).map(|p| (format!("P-{p:03}"), 5)).collect();
    catalog.wait_for(&expected, Duration::from_secs(60)).await;
    let status = relay.status().await.expect("status");
    assert_eq!(status.dead_letter_count, 0);
    assert!(!status.paused);
}

async fn invalid_changes_are_quarantined_and_reported_and_the_rest_applied(engine: Engine) {
    let catalog = Catalog::start(database(engine).await, None, |_| {}).await;
    let relay_db = database(engine).await;
    let relay = Relay::start(&relay_db, catalog.addr, |_| {}).await;

    let mut wrong_version = change("P-2", 3);
    wrong_version.version = 4;
    let mut bad_currency = change("P-3", 1);
    bad_currency
        .product
        .as_mut()
        .expect("set")
        .prices
        .insert("XYZ".into(), 10);
    let response = relay
        .publish(vec![
            change("P-1", 1),
            wrong_version,
            ProductChange::default(),
            bad_currency,
            change("P-4", 1),
        ])
        .await;
    assert_eq!(response.accepted_count, 2);
    assert_eq!(response.quarantined_count, 3);
    let notices: Vec<_> = response
        .quarantined
        .iter()
        .map(|n| (n.index, n.product_code.as_str()))
        .collect();
    assert_eq!(notices, [(1, "P-2"), (2, ""), (3, "P-3")]);
    assert!(response.quarantined[0].reason.contains("product.version"));
    assert!(response.quarantined[2].reason.contains("prices[\"XYZ\"]"));

    catalog
        .wait_for(
            &[("P-1".into(), 1), ("P-4".into(), 1)],
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(catalog.version("P-3").await, 0);

    let listed = relay
        .client()
        .list_quarantined(ListQuarantinedRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.quarantined_records.len(), 2);
    assert!(!listed.next_page_token.is_empty());
    let first = &listed.quarantined_records[0];
    assert_eq!(
        (first.source.as_str(), first.position.as_str()),
        ("grpc", "1")
    );
    let raw = <ProductChange as prost::Message>::decode(first.raw_payload.as_slice())
        .expect("the raw payload is the change as sent");
    assert_eq!(raw.version, 4);
    let rest = relay
        .client()
        .list_quarantined(ListQuarantinedRequest {
            page_size: 2,
            page_token: listed.next_page_token,
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(rest.quarantined_records.len(), 1);
    assert!(rest.next_page_token.is_empty());

    // Publishing the same invalid change again does not quarantine it twice.
    let again = relay.publish(vec![ProductChange::default()]).await;
    assert_eq!(
        again.quarantined[0].quarantine_id,
        response.quarantined[1].quarantine_id
    );
}

async fn a_catalog_outage_delays_changes_but_loses_none(engine: Engine) {
    let catalog = Catalog::start(database(engine).await, None, |_| {}).await;
    let relay_db = database(engine).await;
    let relay = Relay::start(&relay_db, catalog.addr, |settings| {
        // Far more receives than the outage would take if it counted them.
        settings.queue.max_receives = 2;
    })
    .await;
    let (catalog_db, catalog_addr) = catalog.stop().await;

    let changes: Vec<_> = (0..200).map(|p| change(&format!("P-{p:03}"), 1)).collect();
    assert_eq!(relay.publish(changes).await.accepted_count, 200);
    // The relay notices the outage and keeps retrying.
    wait_until(
        "the relay reports the outage",
        Duration::from_secs(30),
        || async {
            let status = relay.status().await?;
            status.last_error.contains("unavailable").then_some(())
        },
    )
    .await;

    let catalog = Catalog::start(catalog_db, Some(catalog_addr), |_| {}).await;
    let expected: Vec<(String, u64)> = (0..200).map(|p| (format!("P-{p:03}"), 1)).collect();
    catalog.wait_for(&expected, Duration::from_secs(60)).await;
    let status = relay.status().await.expect("status");
    assert_eq!(
        status.dead_letter_count, 0,
        "an outage dead-letters nothing"
    );
}

/// A change of shoe `code` at `version` writing only `paths` (all fields when empty).
fn partial_change(code: &str, version: u64, paths: &[&str]) -> ProductChange {
    let mut change = change(code, version);
    if let Some(product) = change.product.as_mut() {
        product.brand = format!("Pedala v{version}");
    }
    change.update_mask = (!paths.is_empty()).then(|| prost_types::FieldMask {
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
    });
    change
}

async fn changing_the_lane_count_with_changes_queued_loses_nothing(engine: Engine) {
    // Writes commute, so changes of one product split over two lane layouts (queued under
    // 16 lanes, more published under 5) still end in the version-order state.
    let catalog = Catalog::start(database(engine).await, None, |_| {}).await;
    let relay_db = database(engine).await;
    let relay = Relay::start(&relay_db, catalog.addr, |s| s.relay.lanes = 16).await;
    relay
        .client()
        .pause_relay(PauseRelayRequest {
            reason: "change relay.lanes".into(),
        })
        .await
        .expect("pause");
    let codes: Vec<String> = (0..40).map(|p| format!("L-{p:02}")).collect();
    let first: Vec<ProductChange> = codes
        .iter()
        .flat_map(|code| {
            [
                partial_change(code, 1, &[]),
                partial_change(code, 4, &["prices"]),
                partial_change(code, 5, &["names"]),
            ]
        })
        .collect();
    assert_eq!(relay.publish(first).await.accepted_count, 120);
    relay.stop().await;

    // Still paused (the switch is shared); the queue holds the 16-lane messages.
    let relay = Relay::start(&relay_db, catalog.addr, |s| s.relay.lanes = 5).await;
    let second: Vec<ProductChange> = codes
        .iter()
        .flat_map(|code| {
            [
                partial_change(code, 2, &["names", "prices"]),
                partial_change(code, 3, &["brand"]),
                partial_change(code, 6, &["status"]),
            ]
        })
        .collect();
    assert_eq!(relay.publish(second).await.accepted_count, 120);
    relay
        .client()
        .resume_relay(ResumeRelayRequest {})
        .await
        .expect("resume");

    // Version 6 (the status) may be reached before the 16-lane messages (v4's prices among
    // them) are applied: wait for the whole state, not for the version.
    let newest = |code: &str, v: u64| change(code, v).product.expect("set");
    let settled =
        |stored: &std::collections::BTreeMap<String, mall_proto::catalog::v1::Product>| {
            codes.iter().all(|code| {
                stored.get(code).is_some_and(|p| {
                    p.version == 6
                        && p.prices == newest(code, 4).prices
                        && p.names == newest(code, 5).names
                        && p.brand == "Pedala v3"
                })
            })
        };
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if catalog.stored(&codes).await.is_ok_and(|s| settled(&s)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let stored = catalog.stored(&codes).await.expect("read back");
    for code in &codes {
        let product = &stored[code];
        assert_eq!(product.version, 6, "{code}: version");
        assert_eq!(
            product.prices,
            newest(code, 4).prices,
            "{code}: prices of v4"
        );
        assert_eq!(product.names, newest(code, 5).names, "{code}: names of v5");
        assert_eq!(product.brand, "Pedala v3", "{code}: brand of v3");
    }
    assert!(waited.is_ok(), "the state settled within 60 s");
}

async fn a_change_the_catalog_refuses_is_quarantined_with_the_producers_coordinates(
    engine: Engine,
) {
    let catalog = Catalog::start(database(engine).await, None, |_| {}).await;
    let relay_db = database(engine).await;
    let relay = Relay::start(&relay_db, catalog.addr, |_| {}).await;
    let mut bag = change("B-1", 1);
    bag.product_type = "bags".into();
    bag.product.as_mut().expect("set").product_type = "bags".into();
    relay.publish(vec![bag]).await;
    catalog
        .wait_for(&[("B-1".into(), 1)], Duration::from_secs(30))
        .await;

    // Valid for the relay, refused by the catalog: B-1 is stored as a bag.
    let response = relay
        .publish(vec![change("S-1", 1), change("B-1", 2), change("S-2", 1)])
        .await;
    assert_eq!(response.accepted_count, 3);
    catalog
        .wait_for(
            &[("S-1".into(), 1), ("S-2".into(), 1)],
            Duration::from_secs(30),
        )
        .await;
    let quarantined = wait_until(
        "the refused change is quarantined",
        Duration::from_secs(30),
        || async {
            let records = relay
                .client()
                .list_quarantined(ListQuarantinedRequest::default())
                .await
                .ok()?
                .into_inner()
                .quarantined_records;
            (!records.is_empty()).then_some(records)
        },
    )
    .await;
    assert_eq!(quarantined.len(), 1);
    let record = &quarantined[0];
    assert_eq!(
        (record.source.as_str(), record.position.as_str()),
        ("grpc", "1"),
        "the index in the producer's PublishProductChanges stream"
    );
    assert!(
        record.reason.contains("product.product_type") && !record.reason.contains("updates["),
        "in the producer's terms: {}",
        record.reason
    );
    assert_eq!(catalog.version("B-1").await, 1);
}

both_engines!(
    a_change_the_catalog_refuses_is_quarantined_with_the_producers_coordinates,
    published_changes_reach_the_catalog_at_their_highest_version,
    invalid_changes_are_quarantined_and_reported_and_the_rest_applied,
    a_catalog_outage_delays_changes_but_loses_none,
    changing_the_lane_count_with_changes_queued_loses_nothing,
);

/// A catalog so slow that applying a lane outlasts the visibility timeout: the consumer keeps
/// its messages hidden while it waits, so they are not delivered again meanwhile, their
/// deletion works, and they are not dead-lettered although they were applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_slower_than_the_visibility_timeout_keeps_its_messages() {
    use sea_orm::{SqliteTransactionMode, TransactionOptions, TransactionTrait as _};

    let catalog_db = database(Engine::Sqlite).await;
    let catalog_url = catalog_db.url().to_owned();
    let catalog = Catalog::start(catalog_db, None, |_| {}).await;
    let relay_db = database(Engine::Sqlite).await;
    let relay = Relay::start(&relay_db, catalog.addr, |settings| {
        settings.queue.visibility_timeout = Duration::from_secs(1);
        // A second delivery, then one more receive, would dead-letter the message.
        settings.queue.max_receives = 2;
    })
    .await;

    // Another writer holds the catalog's database: every catalog write waits for it (up to
    // the catalog's SQLite busy timeout of 10s), as long as 4 visibility timeouts.
    let blocker = sea_orm::Database::connect(catalog_url.as_str())
        .await
        .expect("the catalog's database opens");
    let held = blocker
        .begin_with_options(TransactionOptions {
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
            ..TransactionOptions::default()
        })
        .await
        .expect("the write lock is taken");
    let response = relay.publish(vec![change("SLOW-1", 1)]).await;
    assert_eq!(response.accepted_count, 1);
    tokio::time::sleep(Duration::from_secs(4)).await;
    held.rollback().await.expect("the write lock is released");

    catalog
        .wait_for(&[("SLOW-1".into(), 1)], Duration::from_secs(30))
        .await;
    let status = wait_until("the queue is empty", Duration::from_secs(30), || async {
        let status = relay.status().await?;
        status
            .lanes
            .iter()
            .all(|l| l.visible_messages == 0 && l.in_flight_messages == 0)
            .then_some(status)
    })
    .await;
    assert_eq!(
        status.dead_letter_count, 0,
        "a slow apply dead-letters nothing: {status:?}"
    );
}

/// The lanes of one receive go to the catalog together, one BulkUpdateProducts per product
/// type, instead of one call per lane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lanes_of_one_receive_are_applied_in_one_catalog_call() {
    let catalog = Catalog::start(database(Engine::Sqlite).await, None, |_| {}).await;
    let relay_db = database(Engine::Sqlite).await;
    // One consumer, receiving up to 10 lane messages at a time.
    let relay = Relay::start(&relay_db, catalog.addr, |settings| {
        settings.apply.consumers = 1;
    })
    .await;
    // Paused while publishing, so that every lane's message waits in the queue.
    relay
        .client()
        .pause_relay(PauseRelayRequest {
            reason: "filling the lanes".into(),
        })
        .await
        .expect("pause");
    let codes: Vec<String> = (0..40).map(|i| format!("L-{i}")).collect();
    let lanes: BTreeSet<u32> = codes.iter().map(|code| lane_of(code, 16)).collect();
    assert!(lanes.len() >= 10, "the products span {} lanes", lanes.len());
    let response = relay
        .publish(codes.iter().map(|code| change(code, 1)).collect())
        .await;
    assert_eq!(response.accepted_count, 40);
    relay
        .client()
        .resume_relay(ResumeRelayRequest {})
        .await
        .expect("resume");

    let expected: Vec<(String, u64)> = codes.iter().map(|code| (code.clone(), 1)).collect();
    catalog.wait_for(&expected, Duration::from_secs(30)).await;
    let (_, metrics) = probe::http_get(relay.admin, "/metrics").await;
    let calls: f64 = metrics
        .lines()
        .filter(|line| line.starts_with("mall_sync_relay_catalog_calls_total"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        calls >= 1.0 && calls < lanes.len() as f64,
        "{calls} catalog calls for {} lanes",
        lanes.len()
    );
}
