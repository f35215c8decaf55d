//! The admin API: pause, dead letters, quarantine redrive, status, and its refusals.

use std::{collections::BTreeMap, time::Duration};

use mall_product::{AttributeType, ProductTypeSpec, ProductTypes};
use mall_proto::sync::v1::{
    ListDeadLettersRequest, ListQuarantinedRequest, PauseRelayRequest, ProductChange,
    RedriveDeadLettersRequest, RedriveQuarantinedRequest, ReplayFromRequest, ResumeRelayRequest,
};
use mall_test_support::{Engine, wait_until};
use sync_relay::change::lane_of;
use tonic::Code;

use crate::both_engines;
use crate::helpers::{Catalog, Relay, change, database};

/// The default types plus `beauty`.
fn with_beauty() -> ProductTypes {
    with_types(&["beauty"])
}

/// The default types plus `extra` (each with one string attribute, `shade`).
fn with_types(extra: &[&str]) -> ProductTypes {
    let mut types: BTreeMap<String, ProductTypeSpec> = ProductTypes::default()
        .names()
        .into_iter()
        .map(|name| {
            (
                name.to_owned(),
                ProductTypes::default()
                    .get(name)
                    .cloned()
                    .expect("registered"),
            )
        })
        .collect();
    for name in extra {
        types.insert(
            (*name).to_owned(),
            ProductTypeSpec {
                attributes: [("shade".to_owned(), AttributeType::String)].into(),
            },
        );
    }
    ProductTypes::new(types)
}

fn beauty(code: &str, version: u64) -> ProductChange {
    of_type("beauty", code, version)
}

/// A valid change of `code` as a product of type `product_type`.
fn of_type(product_type: &str, code: &str, version: u64) -> ProductChange {
    let mut change = change(code, version);
    change.product_type = product_type.into();
    change.product.as_mut().expect("set").product_type = product_type.into();
    change
}

/// `count` codes with `prefix` whose lanes (of 16) differ from `avoid`'s.
fn codes_in_other_lanes(prefix: &str, avoid: &str, count: usize) -> Vec<String> {
    let blocked = lane_of(avoid, 16);
    (0..)
        .map(|i| format!("{prefix}-{i:03}"))
        .filter(|code| lane_of(code, 16) != blocked)
        .take(count)
        .collect()
}

async fn pausing_holds_changes_and_resuming_applies_them(engine: Engine) {
    let catalog = Catalog::start(database(engine).await, None, |_| {}).await;
    let relay_db = database(engine).await;
    let relay = Relay::start(&relay_db, catalog.addr, |_| {}).await;
    let idle = relay.status().await.expect("status");
    let lanes: Vec<(i32, i64, i64)> = idle
        .lanes
        .iter()
        .map(|l| (l.lane, l.visible_messages, l.in_flight_messages))
        .collect();
    assert_eq!(
        lanes,
        (0..16).map(|lane| (lane, 0, 0)).collect::<Vec<_>>(),
        "every lane is listed, empty ones included"
    );
    let paused = relay
        .client()
        .pause_relay(PauseRelayRequest {
            reason: "catalog maintenance".into(),
        })
        .await
        .expect("pause")
        .into_inner()
        .status
        .expect("set");
    assert!(paused.paused);
    assert_eq!(paused.pause_reason, "catalog maintenance");

    assert_eq!(
        relay.publish(vec![change("P-1", 1)]).await.accepted_count,
        1
    );
    // Accepted and waiting in its lane, not applied.
    let lane = i32::try_from(lane_of("P-1", 16)).expect("small");
    wait_until(
        "the change waits in its lane",
        Duration::from_secs(10),
        || async {
            let status = relay.status().await?;
            status
                .lanes
                .iter()
                .any(|l| l.lane == lane && l.visible_messages == 1)
                .then_some(())
        },
    )
    .await;
    assert_eq!(catalog.version("P-1").await, 0);

    let resumed = relay
        .client()
        .resume_relay(ResumeRelayRequest {})
        .await
        .expect("resume")
        .into_inner()
        .status
        .expect("set");
    assert!(!resumed.paused);
    catalog
        .wait_for(&[("P-1".into(), 1)], Duration::from_secs(30))
        .await;
}

async fn a_lane_the_catalog_refuses_whole_waits_for_the_operator_while_others_flow(engine: Engine) {
    // The relay knows `beauty`; the catalog does not (yet): it refuses those requests whole.
    // That is no change's fault: the lane waits, nothing is dead-lettered.
    let catalog = Catalog::start(database(engine).await, None, |_| {}).await;
    let relay_db = database(engine).await;
    let relay = Relay::start(&relay_db, catalog.addr, |settings| {
        settings.relay.product_types = with_beauty();
        settings.queue.max_receives = 2;
        settings.queue.visibility_timeout = Duration::from_secs(1);
    })
    .await;

    assert_eq!(
        relay.publish(vec![beauty("B-1", 1)]).await.accepted_count,
        1
    );
    let others = codes_in_other_lanes("P", "B-1", 50);
    let shoes: Vec<_> = others.iter().map(|code| change(code, 1)).collect();
    relay.publish(shoes).await;
    let expected: Vec<(String, u64)> = others.iter().map(|c| (c.clone(), 1)).collect();
    catalog.wait_for(&expected, Duration::from_secs(30)).await;

    let status = wait_until(
        "the relay says an operator must act",
        Duration::from_secs(30),
        || async {
            let status = relay.status().await?;
            status
                .last_error
                .contains("an operator must act")
                .then_some(status)
        },
    )
    .await;
    assert!(status.last_error.contains("product_type"), "{status:?}");
    // Several visibility timeouts later, more than max_receives deliveries' worth: the lane's
    // message is still in flight, never dead-lettered.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let dead = relay
        .client()
        .list_dead_letters(ListDeadLettersRequest::default())
        .await
        .expect("list")
        .into_inner()
        .dead_letters;
    assert!(dead.is_empty(), "{dead:?}");

    // The catalog learns the type; the waiting lane goes through without a redrive.
    let (catalog_db, catalog_addr) = catalog.stop().await;
    let catalog = Catalog::start(catalog_db, Some(catalog_addr), |settings| {
        settings.catalog.product_types = with_beauty();
    })
    .await;
    catalog
        .wait_for(&[("B-1".into(), 1)], Duration::from_secs(30))
        .await;
}

async fn a_change_too_large_for_the_catalog_is_dead_lettered_and_redriven(engine: Engine) {
    // A change larger than the catalog's message limit is the one thing about a message the
    // catalog cannot take at all: it is given back until it is dead-lettered, while the other
    // lanes flow. After the operator raises the limit, a redrive applies it.
    let catalog = Catalog::start(database(engine).await, None, |settings| {
        settings.server.max_message_bytes = 32 * 1024;
    })
    .await;
    let relay_db = database(engine).await;
    let relay = Relay::start(&relay_db, catalog.addr, |settings| {
        settings.queue.max_receives = 2;
    })
    .await;
    let mut big = change("BIG-1", 1);
    if let Some(product) = big.product.as_mut() {
        for language in ["en", "ko", "ja"] {
            product
                .descriptions
                .insert(language.into(), "a long description ".repeat(800));
        }
    }
    assert_eq!(relay.publish(vec![big]).await.accepted_count, 1);
    let others = codes_in_other_lanes("P", "BIG-1", 20);
    relay
        .publish(others.iter().map(|code| change(code, 1)).collect())
        .await;
    let expected: Vec<(String, u64)> = others.iter().map(|c| (c.clone(), 1)).collect();
    catalog.wait_for(&expected, Duration::from_secs(30)).await;

    let dead = wait_until(
        "the oversized change is dead-lettered",
        Duration::from_secs(60),
        || async {
            let page = relay
                .client()
                .list_dead_letters(ListDeadLettersRequest::default())
                .await
                .ok()?
                .into_inner();
            (!page.dead_letters.is_empty()).then_some(page.dead_letters)
        },
    )
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].product_codes, ["BIG-1"]);
    assert_eq!(dead[0].change_count, 1);
    assert_eq!(
        dead[0].lane,
        i32::try_from(lane_of("BIG-1", 16)).expect("small")
    );
    assert!(
        dead[0].last_error.contains("maximum message size"),
        "{}",
        dead[0].last_error
    );

    let (catalog_db, catalog_addr) = catalog.stop().await;
    let catalog = Catalog::start(catalog_db, Some(catalog_addr), |_| {}).await;
    let redriven = relay
        .client()
        .redrive_dead_letters(RedriveDeadLettersRequest {
            request_id: "redrive-1".into(),
            all: true,
            ..Default::default()
        })
        .await
        .expect("redrive")
        .into_inner();
    assert_eq!(redriven.redriven_count, 1);
    catalog
        .wait_for(&[("BIG-1".into(), 1)], Duration::from_secs(30))
        .await;
    // The same request id returns the first response and redrives nothing more.
    let again = relay
        .client()
        .redrive_dead_letters(RedriveDeadLettersRequest {
            request_id: "redrive-1".into(),
            all: true,
            ..Default::default()
        })
        .await
        .expect("redrive")
        .into_inner();
    assert_eq!(again, redriven);
}

async fn a_second_redrive_of_the_same_page_is_not_dropped_as_a_resend(engine: Engine) {
    // Records 1-4: never valid, beauty, spa, never valid. The first redrive (the relay knows
    // beauty) sends record 2; the second (it knows spa too) sends record 3, from a page with
    // the same first and last record. Its messages must not be deduplicated away as a resend
    // of the first redrive's, or record 3 leaves the quarantine without reaching the queue.
    let catalog = Catalog::start(database(engine).await, None, |settings| {
        settings.catalog.product_types = with_types(&["beauty", "spa"]);
    })
    .await;
    let relay_db = database(engine).await;
    let relay = Relay::start(&relay_db, catalog.addr, |_| {}).await;
    let never = ProductChange {
        product_code: "nothing-else".into(),
        ..ProductChange::default()
    };
    // In B-1's lane, so both redrives' messages would carry the same deduplication id if it
    // came from the page rather than from what is sent.
    let spa = (0..)
        .map(|i| format!("S-{i}"))
        .find(|code| lane_of(code, 16) == lane_of("B-1", 16))
        .expect("some code shares the lane");
    let response = relay
        .publish(vec![
            ProductChange::default(),
            beauty("B-1", 1),
            of_type("spa", &spa, 1),
            never,
        ])
        .await;
    assert_eq!(response.quarantined_count, 4);
    relay.stop().await;

    for (known, code) in [
        (vec!["beauty"], "B-1"),
        (vec!["beauty", "spa"], spa.as_str()),
    ] {
        let relay = Relay::start(&relay_db, catalog.addr, |settings| {
            settings.relay.product_types = with_types(&known);
        })
        .await;
        let redriven = relay.redrive_all_quarantined().await;
        assert_eq!(redriven.redriven_count, 1, "{code}");
        catalog
            .wait_for(&[(code.into(), 1)], Duration::from_secs(30))
            .await;
        relay.stop().await;
    }
}

async fn quarantined_records_that_became_valid_are_redriven(engine: Engine) {
    let catalog = Catalog::start(database(engine).await, None, |settings| {
        settings.catalog.product_types = with_beauty();
    })
    .await;
    let relay_db = database(engine).await;
    let relay = Relay::start(&relay_db, catalog.addr, |_| {}).await;
    let response = relay
        .publish(vec![
            beauty("B-1", 1),
            beauty("B-2", 1),
            ProductChange::default(),
        ])
        .await;
    assert_eq!(response.quarantined_count, 3);
    relay.stop().await;

    // The relay learns `beauty`: two records now pass, the empty one never will.
    let relay = Relay::start(&relay_db, catalog.addr, |settings| {
        settings.relay.product_types = with_beauty();
    })
    .await;
    let redriven = relay.redrive_all_quarantined().await;
    assert_eq!(
        (redriven.redriven_count, redriven.still_invalid_count),
        (2, 1)
    );
    catalog
        .wait_for(
            &[("B-1".into(), 1), ("B-2".into(), 1)],
            Duration::from_secs(30),
        )
        .await;
    let left = relay
        .client()
        .list_quarantined(ListQuarantinedRequest::default())
        .await
        .expect("list")
        .into_inner()
        .quarantined_records;
    assert_eq!(left.len(), 1);
    assert!(left[0].reason.contains("product_code"));
}

async fn malformed_admin_requests_are_refused(engine: Engine) {
    let catalog = Catalog::start(database(engine).await, None, |_| {}).await;
    let relay_db = database(engine).await;
    let relay = Relay::start(&relay_db, catalog.addr, |_| {}).await;
    let mut client = relay.client();
    let fields = |status: tonic::Status| {
        use tonic_types::StatusExt as _;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        status
            .get_error_details()
            .bad_request()
            .map(|b| {
                b.field_violations
                    .iter()
                    .map(|v| v.field.clone())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let neither = client
        .redrive_dead_letters(RedriveDeadLettersRequest::default())
        .await
        .expect_err("refused");
    assert_eq!(fields(neither), ["ids"]);
    let both = client
        .redrive_quarantined(RedriveQuarantinedRequest {
            ids: vec!["1".into()],
            all: true,
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(fields(both), ["all"]);
    let long = client
        .pause_relay(PauseRelayRequest {
            reason: "x".repeat(1025),
        })
        .await
        .expect_err("refused");
    assert_eq!(fields(long), ["reason"]);
    let negative = client
        .list_quarantined(ListQuarantinedRequest {
            page_size: -1,
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(fields(negative), ["page_size"]);
    let replay = client
        .replay_from(ReplayFromRequest::default())
        .await
        .expect_err("no kinesis");
    assert_eq!(replay.code(), Code::FailedPrecondition);
}

/// Runs `relayctl` with `args` against `relay`; its stdout, or a panic with its stderr.
async fn relayctl(relay: &Relay, args: &[&str]) -> String {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_relayctl"))
        .arg("--addr")
        .arg(format!("http://{}", relay.addr))
        .args(args)
        .output()
        .await
        .expect("relayctl runs");
    assert!(
        output.status.success(),
        "relayctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

async fn relayctl_drives_the_admin_api_with_progress(engine: Engine) {
    let catalog = Catalog::start(database(engine).await, None, |settings| {
        settings.catalog.product_types = with_beauty();
    })
    .await;
    let relay_db = database(engine).await;
    let relay = Relay::start(&relay_db, catalog.addr, |_| {}).await;
    relay
        .publish(vec![beauty("B-1", 1), beauty("B-2", 1)])
        .await;

    let paused = relayctl(&relay, &["pause", "nightly", "import"]).await;
    assert!(paused.contains("paused: nightly import"), "{paused}");
    let status = relayctl(&relay, &["status"]).await;
    assert!(
        status.contains("state: paused (nightly import)"),
        "{status}"
    );
    assert!(status.contains("quarantined: 2"), "{status}");
    let listed = relayctl(&relay, &["quarantined"]).await;
    assert_eq!(listed.lines().count(), 2, "{listed}");
    assert!(listed.contains("product_type"), "{listed}");
    assert!(relayctl(&relay, &["resume"]).await.contains("resumed"));
    relay.stop().await;

    let relay = Relay::start(&relay_db, catalog.addr, |settings| {
        settings.relay.product_types = with_beauty();
    })
    .await;
    let redriven = relayctl(&relay, &["redrive-quarantined", "--all"]).await;
    assert!(
        redriven.contains("checked 2 of 2 records: 2 redriven, 0 still invalid"),
        "{redriven}"
    );
    catalog
        .wait_for(
            &[("B-1".into(), 1), ("B-2".into(), 1)],
            Duration::from_secs(30),
        )
        .await;
    let dead = relayctl(&relay, &["redrive-dead-letters", "--all"]).await;
    assert!(dead.contains("done: 0 dead letters redriven"), "{dead}");
}

both_engines!(
    relayctl_drives_the_admin_api_with_progress,
    pausing_holds_changes_and_resuming_applies_them,
    a_lane_the_catalog_refuses_whole_waits_for_the_operator_while_others_flow,
    a_change_too_large_for_the_catalog_is_dead_lettered_and_redriven,
    quarantined_records_that_became_valid_are_redriven,
    a_second_redrive_of_the_same_page_is_not_dropped_as_a_resend,
    malformed_admin_requests_are_refused,
);
