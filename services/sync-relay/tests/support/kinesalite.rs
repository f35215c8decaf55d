//! kinesalite (a local Kinesis) for the relay's Kinesis tests and its benchmark: where it is,
//! and a fresh stream on it. Included with `#[path]` by each test binary that needs it.

use aws_sdk_kinesis::Client;
pub use mall_test_support::kinesalite::endpoint;
use sync_relay::source::kinesis::KinesisSettings;

/// Creates `stream` with `shards` shards on the kinesalite `settings` point at, and waits
/// until it is ACTIVE.
///
/// # Panics
/// When kinesalite does not answer, saying how to start it.
pub async fn create_stream(settings: &KinesisSettings, stream: &str, shards: i32) -> Client {
    let client = settings.client().await.expect("a kinesis client builds");
    mall_test_support::kinesalite::create_stream(&client, stream, shards).await;
    client
}
