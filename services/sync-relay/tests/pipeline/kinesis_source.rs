//! The relay reading Kinesis (kinesalite): protobuf and JSON records, bad records quarantined
//! once with their shard and sequence number, status per shard, and a replay that changes
//! nothing stored.

use std::time::Duration;

use aws_sdk_kinesis::{Client, primitives::Blob, types::PutRecordsRequestEntry};
use mall_proto::sync::v1::{ListQuarantinedRequest, ReplayFromRequest, ShardState};
use mall_test_support::Engine;
use prost::Message as _;
use sync_relay::{config::SourceKind, source::kinesis::KinesisSettings};

use crate::both_engines;
use crate::helpers::{Catalog, Relay, change, database};
use crate::kinesalite;

fn kinesis_settings() -> KinesisSettings {
    let endpoint = kinesalite::endpoint();
    KinesisSettings {
        stream_name: format!("relay-pipeline-{:016x}", fastrand::u64(..)),
        endpoint_url: Some(endpoint.parse().expect("a valid endpoint url")),
        region: Some("us-east-1".into()),
        access_key_id: Some("test".to_owned().into()),
        secret_access_key: Some("test".to_owned().into()),
        lease_duration: Duration::from_secs(3),
        lease_renew_interval: Duration::from_millis(300),
        idle_poll_interval: Duration::from_millis(200),
        ..KinesisSettings::default()
    }
}

async fn stream(settings: &KinesisSettings, shards: i32) -> Client {
    kinesalite::create_stream(settings, &settings.stream_name, shards).await
}

/// A relay reading `kinesis` as replica-a.
async fn kinesis_relay(
    database: &mall_test_support::TestDatabase,
    catalog: std::net::SocketAddr,
    kinesis: &KinesisSettings,
) -> Relay {
    Relay::start(database, catalog, |settings| {
        settings.source.kind = SourceKind::Kinesis;
        settings.source.kinesis = kinesis.clone();
        settings.source.replica_id = Some("replica-a".into());
    })
    .await
}

async fn put(client: &Client, stream: &str, records: Vec<(String, Vec<u8>)>) {
    let entries = records
        .into_iter()
        .map(|(key, data)| {
            PutRecordsRequestEntry::builder()
                .partition_key(key)
                .data(Blob::new(data))
                .build()
                .expect("a complete entry")
        })
        .collect();
    let output = client
        .put_records()
        .stream_name(stream)
        .set_records(Some(entries))
        .send()
        .await
        .expect("records are put");
    assert_eq!(output.failed_record_count, Some(0));
}

async fn kinesis_records_reach_the_catalog_and_bad_ones_are_quarantined_once(engine: Engine) {
    let catalog = Catalog::start(database(engine).await, None, |_| {}).await;
    let kinesis = kinesis_settings();
    let client = stream(&kinesis, 2).await;
    let relay_db = database(engine).await;
    let relay = kinesis_relay(&relay_db, catalog.addr, &kinesis).await;

    let json = r#"{"productCode":"J-1","productType":"shoes","version":"2",
        "product":{"code":"J-1","productType":"shoes","status":"PRODUCT_STATUS_ON_SALE",
        "names":{"en":"Sneaker"},"prices":{"KRW":"59000"},"version":"2"}}"#;
    let bad_json = r#"{"productCode":"J-2","productType":"shoes","version":"x"}"#;
    put(
        &client,
        &kinesis.stream_name,
        vec![
            ("P-1".into(), change("P-1", 1).encode_to_vec()),
            ("J-1".into(), json.as_bytes().to_vec()),
            ("G-1".into(), vec![0xff, 0x00, 0x13, 0x37]),
            ("J-2".into(), bad_json.as_bytes().to_vec()),
            ("P-1".into(), change("P-1", 2).encode_to_vec()),
        ],
    )
    .await;
    catalog
        .wait_for(
            &[("P-1".into(), 2), ("J-1".into(), 2)],
            Duration::from_secs(30),
        )
        .await;

    let status = relay.status().await.expect("status");
    assert_eq!(status.shards.len(), 2);
    assert!(
        status
            .shards
            .iter()
            .all(|s| s.state == ShardState::Reading as i32 && s.lease_owner == "replica-a")
    );
    assert_eq!(status.quarantined_count, 2);

    let quarantined = relay
        .client()
        .list_quarantined(ListQuarantinedRequest::default())
        .await
        .expect("list")
        .into_inner()
        .quarantined_records;
    assert_eq!(quarantined.len(), 2);
    for record in &quarantined {
        assert!(
            record
                .source
                .starts_with(&format!("kinesis:{}/shardId-", kinesis.stream_name)),
            "{}",
            record.source
        );
        assert!(!record.position.is_empty(), "the sequence number is kept");
    }
    let payloads: Vec<&[u8]> = quarantined
        .iter()
        .map(|r| r.raw_payload.as_slice())
        .collect();
    assert!(payloads.contains(&[0xff, 0x00, 0x13, 0x37].as_slice()));
    assert!(payloads.contains(&bad_json.as_bytes()));

    // Replaying the whole stream applies nothing new and quarantines nothing twice.
    let replayed = relay
        .client()
        .replay_from(ReplayFromRequest {
            start_time: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: 0,
            }),
            shard_ids: Vec::new(),
        })
        .await
        .expect("replay")
        .into_inner();
    assert_eq!(replayed.shard_ids.len(), 2);
    // A sentinel behind the replayed records of each shard (explicit hash keys at both ends
    // of the key space): once both are applied, both shards were read again to the end.
    for (code, hash) in [
        ("P-9a", "0"),
        ("P-9b", "340282366920938463463374607431768211455"),
    ] {
        let entry = PutRecordsRequestEntry::builder()
            .partition_key(code)
            .explicit_hash_key(hash)
            .data(Blob::new(change(code, 1).encode_to_vec()))
            .build()
            .expect("a complete entry");
        client
            .put_records()
            .stream_name(&kinesis.stream_name)
            .records(entry)
            .send()
            .await
            .expect("sentinel put");
    }
    catalog
        .wait_for(
            &[("P-9a".into(), 1), ("P-9b".into(), 1)],
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(catalog.version("P-1").await, 2);
    let after = relay
        .client()
        .list_quarantined(ListQuarantinedRequest::default())
        .await
        .expect("list")
        .into_inner()
        .quarantined_records;
    assert_eq!(
        after.len(),
        2,
        "a replayed bad record is not quarantined twice"
    );
}

/// The relay's `changes_applied_total` summed over outcomes: catalog items written, stale
/// ones included.
async fn items_applied(relay: &Relay) -> u64 {
    let (status, body) = mall_test_support::probe::http_get(relay.admin, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|line| line.starts_with("mall_sync_relay_changes_applied_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn two_replays_within_the_dedup_window_both_take_effect(engine: Engine) {
    // Each replay raises the shard's epoch, which is part of its deliveries' deduplication
    // ids: a replay right after the first read (well within the queue's 5-minute window) is
    // not dropped as a resend, and neither is a second one.
    let catalog = Catalog::start(database(engine).await, None, |_| {}).await;
    let kinesis = kinesis_settings();
    let client = stream(&kinesis, 1).await;
    let relay_db = database(engine).await;
    let relay = kinesis_relay(&relay_db, catalog.addr, &kinesis).await;
    let codes: Vec<String> = (0..5).map(|i| format!("R-{i}")).collect();
    put(
        &client,
        &kinesis.stream_name,
        codes
            .iter()
            .map(|code| (code.clone(), change(code, 1).encode_to_vec()))
            .collect(),
    )
    .await;
    let expected: Vec<(String, u64)> = codes.iter().map(|c| (c.clone(), 1)).collect();
    catalog.wait_for(&expected, Duration::from_secs(30)).await;
    // The relay counts a lane's changes after the catalog committed them: wait for it.
    let mut applied = mall_test_support::wait_until(
        "the first read is counted as applied",
        Duration::from_secs(30),
        || async {
            let now = items_applied(&relay).await;
            (now >= 5).then_some(now)
        },
    )
    .await;
    assert_eq!(applied, 5);

    for round in 1..=2 {
        relay
            .client()
            .replay_from(ReplayFromRequest {
                start_time: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: 0,
                }),
                shard_ids: Vec::new(),
            })
            .await
            .expect("replay");
        let before = applied;
        applied = mall_test_support::wait_until(
            &format!("replay {round} reaches the catalog again"),
            Duration::from_secs(30),
            || async {
                let now = items_applied(&relay).await;
                (now >= before + 5).then_some(now)
            },
        )
        .await;
    }
    // Replayed changes are STALE in the catalog: nothing moved.
    for code in &codes {
        assert_eq!(catalog.version(code).await, 1);
    }
}

both_engines!(
    kinesis_records_reach_the_catalog_and_bad_ones_are_quarantined_once,
    two_replays_within_the_dedup_window_both_take_effect,
);
