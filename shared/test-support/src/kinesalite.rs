//! kinesalite (a local Kinesis) for the Kinesis tests and benchmarks: where it is, and a
//! fresh stream on it.

use std::time::Duration;

use aws_sdk_kinesis::{Client, types::StreamStatus};

use crate::wait_until;

/// Where `scripts/kinesalite.sh` starts it.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:4567";

/// `MALL_TEST_KINESIS_ENDPOINT`, or [`DEFAULT_ENDPOINT`].
pub fn endpoint() -> String {
    std::env::var("MALL_TEST_KINESIS_ENDPOINT").unwrap_or_else(|_| DEFAULT_ENDPOINT.to_owned())
}

/// Creates `stream` with `shards` shards through `client` and waits until it is ACTIVE.
///
/// # Panics
/// When kinesalite does not answer, saying how to start it.
pub async fn create_stream(client: &Client, stream: &str, shards: i32) {
    if let Err(error) = client.list_streams().send().await {
        panic!(
            "kinesalite is not reachable at {} ({}). scripts/test.sh and scripts/bench.sh relay \
             start it; or start it with scripts/kinesalite.sh (and set \
             MALL_TEST_KINESIS_ENDPOINT if it is not at {DEFAULT_ENDPOINT})",
            endpoint(),
            aws_sdk_kinesis::error::DisplayErrorContext(&error)
        );
    }
    // kinesalite, like Kinesis, refuses a create while too many streams are being created
    // (LimitExceededException); tests running in parallel can hit that, so try again.
    wait_until("the stream is created", Duration::from_secs(30), || async {
        match client
            .create_stream()
            .stream_name(stream)
            .shard_count(shards)
            .send()
            .await
        {
            Ok(_) => Some(()),
            Err(error) => {
                let limited = error
                    .as_service_error()
                    .is_some_and(|e| e.is_limit_exceeded_exception());
                assert!(
                    limited,
                    "the stream is created: {}",
                    aws_sdk_kinesis::error::DisplayErrorContext(&error)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                None
            }
        }
    })
    .await;
    wait_until("the stream is ACTIVE", Duration::from_secs(30), || async {
        let summary = client
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .ok()?;
        (summary.stream_description_summary()?.stream_status() == &StreamStatus::Active)
            .then_some(())
    })
    .await;
}
