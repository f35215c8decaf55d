//! The Loki-compatible receiver against a Loki client written by others (the npm package
//! winston-loki, protobuf + snappy), so it is not tested only against our own encoder.
//!
//! Needs Node.js with winston-loki: `scripts/test.sh` installs it (`scripts/node-peers.sh`)
//! and sets `MALL_TEST_NODE_MODULES`.

use std::{collections::BTreeSet, path::Path, time::Duration};

use log_ingest::loki_receiver::LokiReceiver;

const CLIENT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/peers/winston_loki_client.js"
);

#[tokio::test]
async fn the_receiver_decodes_what_winston_loki_pushes() {
    mall_test_support::init_logging();
    let modules = std::env::var("MALL_TEST_NODE_MODULES").unwrap_or_else(|_| {
        panic!(
            "MALL_TEST_NODE_MODULES is not set: run `scripts/node-peers.sh` (it installs the npm \
             packages winston-loki and fluent-logger) and export what it prints, or run \
             scripts/test.sh"
        )
    });
    assert!(
        Path::new(&modules).join("winston-loki").is_dir(),
        "no winston-loki in {modules}"
    );
    let loki = LokiReceiver::start("127.0.0.1:0".parse().expect("an address"))
        .await
        .expect("starts");
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("node")
            .env("NODE_PATH", &modules)
            .arg(CLIENT)
            .arg(loki.url())
            .arg("250")
            .output(),
    )
    .await
    .expect("the client finishes")
    .expect("node runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let received = loki.received();
    let lines: BTreeSet<String> = received.iter().map(|r| r.entry.line.clone()).collect();
    let want: BTreeSet<String> = (0..250).map(|i| format!("info line {i}")).collect();
    assert_eq!(lines, want);
    for r in &received {
        let labels: std::collections::BTreeMap<_, _> = r.labels.iter().cloned().collect();
        assert_eq!(
            labels.get("service").map(String::as_str),
            Some("winston-peer")
        );
        assert!(r.entry.timestamp.is_some_and(|t| t.seconds > 1_700_000_000));
    }
    let (_, refused, _) = loki.counts();
    assert_eq!(refused, 0);
}
