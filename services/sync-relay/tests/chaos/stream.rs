//! A fresh Kinesis stream on kinesalite for one test.

use std::time::Duration;

use aws_sdk_kinesis::Client;
use sync_relay::source::kinesis::KinesisSettings;

use super::kinesalite;

/// A stream a test made, and how to reach it.
pub struct Stream {
    pub endpoint: String,
    pub name: String,
    pub client: Client,
}

impl Stream {
    /// Creates a stream of `shards` shards on the kinesalite at `MALL_TEST_KINESIS_ENDPOINT`
    /// and waits until it is ACTIVE.
    ///
    /// # Panics
    /// When kinesalite does not answer, saying how to start it.
    pub async fn create(shards: i32) -> Self {
        let endpoint = kinesalite::endpoint();
        let settings = KinesisSettings {
            endpoint_url: Some(endpoint.parse().expect("a valid endpoint url")),
            region: Some("us-east-1".into()),
            access_key_id: Some("test".to_owned().into()),
            secret_access_key: Some("test".to_owned().into()),
            // A put must not be abandoned half way: its outcome would be unknown.
            request_timeout: Duration::from_secs(60),
            ..KinesisSettings::default()
        };
        let name = format!("chaos-{:016x}", fastrand::u64(..));
        let client = kinesalite::create_stream(&settings, &name, shards).await;
        Self {
            endpoint,
            name,
            client,
        }
    }

    /// The relay settings that read this stream as `replica`.
    pub fn relay_settings(&self, replica: &str) -> Vec<(&'static str, String)> {
        vec![
            ("source.kind", "kinesis".into()),
            ("source.replica_id", replica.into()),
            ("source.kinesis.stream_name", self.name.clone()),
            ("source.kinesis.endpoint_url", self.endpoint.clone()),
            ("source.kinesis.region", "us-east-1".into()),
            ("source.kinesis.access_key_id", "test".into()),
            ("source.kinesis.secret_access_key", "test".into()),
            // Short leases: a crashed replica's shards are free again within seconds.
            ("source.kinesis.lease_duration", "3s".into()),
            ("source.kinesis.lease_renew_interval", "500ms".into()),
            ("source.kinesis.idle_poll_interval", "200ms".into()),
            ("source.kinesis.backoff_max", "1s".into()),
        ]
    }
}
