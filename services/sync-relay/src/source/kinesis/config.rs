//! [`KinesisSettings`]: which stream to read, how to reach it, and the lease and polling knobs.

use std::time::Duration;

use anyhow::Context as _;
use aws_config::{BehaviorVersion, retry::RetryConfig, timeout::TimeoutConfig};
use aws_sdk_kinesis::config::{Credentials, Region};
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};
use url::Url;

/// Kinesis allows at most 10,000 records per GetRecords call.
pub const MAX_RECORDS_PER_CALL: u32 = 10_000;

/// Kinesis allows 5 GetRecords calls per second per shard: no shard is polled more often than this.
pub const MIN_GET_RECORDS_INTERVAL: Duration = Duration::from_millis(200);

/// The Kinesis source of `sync-relay` (the `kinesis` section the relay's settings embed).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KinesisSettings {
    /// Name of the stream the product team writes product changes to. Default `product-changes`.
    pub stream_name: String,
    /// Kinesis endpoint, for a local emulator (kinesalite) or a VPC endpoint. Default: none, the
    /// regional AWS endpoint.
    pub endpoint_url: Option<Url>,
    /// AWS region, such as `eu-central-1`. Default: none, taken from the AWS default chain
    /// (`AWS_REGION`, the profile, instance metadata); start-up fails when that finds none.
    pub region: Option<String>,
    /// Static access key id, for emulators and places without an AWS role. Default: none, the
    /// AWS default credential chain (environment, profile, web identity, container or instance
    /// role). Set both keys or neither.
    #[serde(serialize_with = "mall_config::serialize_optional_secret")]
    pub access_key_id: Option<SecretString>,
    /// Static secret access key that goes with `access_key_id`. Default: none.
    #[serde(serialize_with = "mall_config::serialize_optional_secret")]
    pub secret_access_key: Option<SecretString>,
    /// Creates the stream with this many shards when it does not exist: a convenience for local
    /// runs and tests; production streams are made by their owners. Default: none (never create).
    pub create_stream: Option<u32>,
    /// How long a shard lease lasts without renewal. After a replica stops without releasing
    /// its leases (a crash), its shards wait this long before another replica takes them.
    /// Replica clocks must agree to well within it. Default 30s.
    #[serde(with = "humantime_serde")]
    pub lease_duration: Duration,
    /// How often leases are renewed, new or expired leases taken, the shard table re-read (so
    /// a replay or a stolen lease is noticed within it), and lag written. Must be well under
    /// `lease_duration`. Default 5s.
    #[serde(with = "humantime_serde")]
    pub lease_renew_interval: Duration,
    /// How often the stream's shards are listed to find new ones (after a reshard). A reader
    /// reaching the end of a closed shard also triggers a listing. Default 60s.
    #[serde(with = "humantime_serde")]
    pub shard_sync_interval: Duration,
    /// Most records per GetRecords call, and so per batch handed to the sink; at most 10,000.
    /// Default 1,000.
    pub max_records_per_call: u32,
    /// Wait between GetRecords calls on a shard that is caught up (no records, no lag). Kinesis
    /// allows 5 calls per second per shard, shared by every consumer of the stream; busy shards
    /// are polled every 200 ms at most. At least 200ms. Default 1s.
    #[serde(with = "humantime_serde")]
    pub idle_poll_interval: Duration,
    /// First wait after a throttle, a failed call or a failed delivery; doubles with each
    /// failure in a row, with full jitter. Default 100ms.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Longest wait between retries. Default 10s.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Longest a single Kinesis call may take before it is abandoned and retried. Default 10s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A shard reader that has not finished a step (a read, a delivery attempt, a checkpoint
    /// write, a backoff) for this long is stuck: its lease is no longer renewed and it is
    /// told to stop, so another replica takes the shard once the lease expires. Must exceed
    /// the longest delivery attempt (the queue's operation timeout). Default 2m.
    #[serde(with = "humantime_serde")]
    pub reader_stall_timeout: Duration,
}

impl Default for KinesisSettings {
    fn default() -> Self {
        Self {
            stream_name: "product-changes".to_owned(),
            endpoint_url: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            create_stream: None,
            lease_duration: Duration::from_secs(30),
            lease_renew_interval: Duration::from_secs(5),
            shard_sync_interval: Duration::from_secs(60),
            max_records_per_call: 1_000,
            idle_poll_interval: Duration::from_secs(1),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            reader_stall_timeout: Duration::from_secs(120),
        }
    }
}

impl KinesisSettings {
    /// Checks the settings that serde cannot: ranges and pairs.
    ///
    /// # Errors
    /// The first problem, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.stream_name.is_empty() || self.stream_name.len() > 128 {
            return Err("kinesis.stream_name must have 1 to 128 characters".into());
        }
        if !(1..=MAX_RECORDS_PER_CALL).contains(&self.max_records_per_call) {
            return Err(format!(
                "kinesis.max_records_per_call must be between 1 and {MAX_RECORDS_PER_CALL}"
            ));
        }
        if self.create_stream == Some(0) {
            return Err("kinesis.create_stream must be at least 1 shard".into());
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return Err(
                "kinesis.access_key_id and kinesis.secret_access_key go together: set both or neither"
                    .into(),
            );
        }
        if self.lease_renew_interval.is_zero() || self.lease_renew_interval >= self.lease_duration {
            return Err(
                "kinesis.lease_renew_interval must be above zero and below kinesis.lease_duration"
                    .into(),
            );
        }
        if self.shard_sync_interval.is_zero() {
            return Err("kinesis.shard_sync_interval must be above zero".into());
        }
        if self.idle_poll_interval < MIN_GET_RECORDS_INTERVAL {
            return Err(format!(
                "kinesis.idle_poll_interval must be at least {MIN_GET_RECORDS_INTERVAL:?} \
                 (Kinesis allows 5 GetRecords calls per second per shard)"
            ));
        }
        if self.backoff_initial.is_zero() || self.backoff_initial > self.backoff_max {
            return Err(
                "kinesis.backoff_initial must be above zero and at most kinesis.backoff_max".into(),
            );
        }
        if self.reader_stall_timeout <= self.lease_renew_interval {
            return Err("kinesis.reader_stall_timeout must exceed lease_renew_interval".into());
        }
        if self.request_timeout.is_zero() {
            return Err("kinesis.request_timeout must be above zero".into());
        }
        Ok(())
    }

    /// Builds a Kinesis client from these settings: static credentials or the default chain,
    /// the endpoint override, a per-call timeout, and no SDK retries (the source retries every
    /// call itself, with backoff and metrics, so nothing is retried twice over).
    ///
    /// # Errors
    /// When no region is configured and the AWS default chain finds none.
    pub async fn client(&self) -> anyhow::Result<aws_sdk_kinesis::Client> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_timeout(self.request_timeout)
                    .build(),
            );
        if let Some(region) = &self.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let (Some(id), Some(secret)) = (&self.access_key_id, &self.secret_access_key) {
            loader = loader.credentials_provider(Credentials::new(
                id.expose_secret(),
                secret.expose_secret(),
                None,
                None,
                "sync-relay-settings",
            ));
        }
        if let Some(url) = &self.endpoint_url {
            loader = loader.endpoint_url(url.as_str().trim_end_matches('/'));
        }
        let config = loader.load().await;
        config.region().context(
            "kinesis.region is not set and the AWS default chain (AWS_REGION, profile, instance \
             metadata) found none",
        )?;
        Ok(aws_sdk_kinesis::Client::new(&config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads the settings the way the relay does, from `SYNC_RELAY__KINESIS__*` variables.
    fn load(env: &[(&str, &str)]) -> Result<KinesisSettings, String> {
        #[derive(Debug, Default, Deserialize, Serialize)]
        #[serde(default, deny_unknown_fields)]
        struct Relay {
            kinesis: KinesisSettings,
        }
        let sources = mall_config::Sources {
            file: None,
            env: env
                .iter()
                .map(|(k, v)| (format!("SYNC_RELAY__KINESIS__{k}"), (*v).to_owned()))
                .collect(),
        };
        mall_config::load_from::<Relay>("SYNC_RELAY", sources)
            .map(|relay| relay.kinesis)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let settings = KinesisSettings::default();
        settings.validate().expect("defaults are valid");
        assert_eq!(settings.lease_duration, Duration::from_secs(30));
        assert_eq!(settings.max_records_per_call, 1_000);
        assert!(settings.create_stream.is_none());
    }

    #[test]
    fn durations_and_urls_parse_from_text() {
        let settings = load(&[
            ("STREAM_NAME", "s"),
            ("ENDPOINT_URL", "http://127.0.0.1:4567"),
            ("LEASE_DURATION", "3s"),
            ("LEASE_RENEW_INTERVAL", "500ms"),
            ("ACCESS_KEY_ID", "id"),
            ("SECRET_ACCESS_KEY", "hunter2"),
        ])
        .expect("loads");
        assert_eq!(settings.lease_duration, Duration::from_secs(3));
        assert_eq!(settings.lease_renew_interval, Duration::from_millis(500));
        assert_eq!(
            settings.endpoint_url.as_ref().map(Url::as_str),
            Some("http://127.0.0.1:4567/")
        );
        assert!(
            !format!("{settings:?}").contains("hunter2"),
            "secrets are redacted in debug output: {settings:?}"
        );
        settings.validate().expect("valid");
    }

    #[test]
    fn an_unknown_key_is_rejected() {
        let error = load(&[("STREAM", "s")]).expect_err("unknown key");
        assert!(error.contains("SYNC_RELAY__KINESIS__STREAM"), "{error}");
    }

    #[test]
    fn validation_names_the_offending_key() {
        type Break = fn(&mut KinesisSettings);
        let cases: [(&str, Break); 6] = [
            ("max_records_per_call", |s| s.max_records_per_call = 10_001),
            ("secret_access_key", |s| {
                s.access_key_id = Some(SecretString::from("id"));
            }),
            ("lease_renew_interval", |s| {
                s.lease_renew_interval = s.lease_duration;
            }),
            ("idle_poll_interval", |s| {
                s.idle_poll_interval = Duration::from_millis(100);
            }),
            ("create_stream", |s| s.create_stream = Some(0)),
            ("backoff_initial", |s| {
                s.backoff_initial = Duration::from_secs(60);
            }),
        ];
        for (key, break_it) in cases {
            let mut settings = KinesisSettings::default();
            break_it(&mut settings);
            let error = settings.validate().expect_err(key);
            assert!(error.contains(key), "{key}: {error}");
        }
    }
}
