//! The `queue` section of a service's settings.

use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use url::Url;

use crate::limits;

/// Which engine holds the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Tables in the service's own database (SQLite or PostgreSQL): nothing to install.
    #[default]
    Embedded,
    /// Amazon SQS (or LocalStack) through aws-sdk-sqs.
    Sqs,
}

/// One queue: which engine, its name and its delivery rules.
///
/// The same settings mean the same behaviour on both backends; where an engine cannot follow
/// a setting the field says so.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueSettings {
    /// `embedded` or `sqs`. Default `embedded`.
    pub backend: BackendKind,
    /// The queue's name. Embedded: the key of its rows, so several queues share one database.
    /// SQS: the queue name; a FIFO queue's name must end in `.fifo` on SQS, so `.fifo` is
    /// appended when it is missing (`orders` becomes `orders.fifo`). Default `mall`.
    pub name: String,
    /// FIFO delivery: messages carry a group id; within a group they arrive in order and a
    /// group waits while one of its messages is in flight. `false` is a standard queue:
    /// no groups, no deduplication, best-effort order. Default `true`.
    pub fifo: bool,
    /// How long a received message stays hidden before it is delivered again, unless it is
    /// deleted or its visibility is changed. 0s to 12h; SQS counts whole seconds (rounded up).
    /// Default 30s.
    #[serde(with = "humantime_serde")]
    pub visibility_timeout: Duration,
    /// Receives after which a message that is still not deleted moves to the dead letters
    /// instead of being delivered again. 1 to 1000 (the SQS range). Default 5.
    pub max_receives: u32,
    /// FIFO only: a message whose deduplication id was already sent within this window is
    /// accepted but not delivered again, even if the first one was already deleted.
    /// Embedded only; SQS fixes it at 5 minutes. Default 5m.
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
    /// Settings of the embedded backend.
    pub embedded: EmbeddedSettings,
    /// Settings of the SQS backend.
    pub sqs: SqsSettings,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            backend: BackendKind::Embedded,
            name: "mall".to_owned(),
            fifo: true,
            visibility_timeout: Duration::from_secs(30),
            max_receives: 5,
            dedup_window: Duration::from_secs(5 * 60),
            embedded: EmbeddedSettings::default(),
            sqs: SqsSettings::default(),
        }
    }
}

/// The `queue.embedded` section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedSettings {
    /// How often a long-polling receive looks at the table again while it waits. Sends,
    /// deletes and releases through the same process wake waiting receivers at once; this
    /// interval bounds the delay for messages sent by other processes and for visibility
    /// timeouts that run out. Default 100ms.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
}

impl Default for EmbeddedSettings {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(100),
        }
    }
}

/// The `queue.sqs` section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SqsSettings {
    /// Endpoint to call instead of AWS's, for LocalStack: `http://127.0.0.1:4566`.
    /// Default none (the AWS endpoint of the region).
    pub endpoint_url: Option<Url>,
    /// AWS region. Default none: the default provider chain (`AWS_REGION`, profile).
    pub region: Option<String>,
    /// Static access key id. Default none: the default credential chain (environment,
    /// profile, web identity, container or instance role). Both keys or neither.
    pub access_key_id: Option<String>,
    /// Static secret access key, paired with `access_key_id`. Default none.
    #[serde(serialize_with = "mall_config::serialize_optional_secret")]
    pub secret_access_key: Option<SecretString>,
    /// Create the queue and its dead-letter queue when missing, and set the queue's
    /// visibility timeout and redrive policy (`max_receives`) on every start. Off in
    /// production, where queues are infrastructure; on for LocalStack. Default false.
    pub create_queues: bool,
    /// The dead-letter queue. Default `<name>-dlq`; for FIFO `<name without .fifo>-dlq.fifo`
    /// (a FIFO queue needs a FIFO dead-letter queue).
    pub dead_letter_queue: Option<String>,
    /// Attempts per call before giving up, for throttling, server errors and failed batch
    /// entries, with jittered exponential backoff between them. Default 8.
    pub max_attempts: u32,
    /// Send calls in flight at once for one `send`. Messages of one group always go through
    /// the same lane, one call after another, so their order holds. Default 4.
    pub send_concurrency: usize,
    /// Longest one HTTP attempt of a call may take (connecting included; a receive's
    /// long-poll wait comes on top), so a hung endpoint costs an attempt, not the caller's
    /// whole run. Default 5s.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// Longest a call may take with all its attempts and backoffs (a receive's wait comes on
    /// top); then it fails and the caller's own retry takes over. Default 30s.
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
}

impl Default for SqsSettings {
    fn default() -> Self {
        Self {
            endpoint_url: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            create_queues: false,
            dead_letter_queue: None,
            max_attempts: 8,
            send_concurrency: 4,
            attempt_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(30),
        }
    }
}

impl QueueSettings {
    /// Checks the ranges the engines impose.
    ///
    /// # Errors
    /// A message naming the field and its allowed range.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.name.is_empty(), "queue.name must not be empty");
        anyhow::ensure!(
            self.name.len() <= 80
                && self
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'),
            "queue.name {:?} must be at most 80 letters, digits, '-', '_' or '.' (the SQS rule)",
            self.name
        );
        anyhow::ensure!(
            (1..=1000).contains(&self.max_receives),
            "queue.max_receives is {}; it must be 1 to 1000",
            self.max_receives
        );
        anyhow::ensure!(
            self.visibility_timeout <= limits::MAX_VISIBILITY_TIMEOUT,
            "queue.visibility_timeout is {:?}; it must be at most 12h",
            self.visibility_timeout
        );
        anyhow::ensure!(
            !self.dedup_window.is_zero(),
            "queue.dedup_window must be longer than 0s"
        );
        anyhow::ensure!(
            !self.embedded.poll_interval.is_zero(),
            "queue.embedded.poll_interval must be longer than 0s"
        );
        anyhow::ensure!(
            !self.sqs.attempt_timeout.is_zero()
                && self.sqs.operation_timeout >= self.sqs.attempt_timeout,
            "queue.sqs.attempt_timeout must be longer than 0s and queue.sqs.operation_timeout at \
             least as long"
        );
        anyhow::ensure!(
            self.sqs.access_key_id.is_some() == self.sqs.secret_access_key.is_some(),
            "queue.sqs.access_key_id and queue.sqs.secret_access_key go together: set both or neither"
        );
        anyhow::ensure!(
            self.sqs.max_attempts >= 1,
            "queue.sqs.max_attempts must be at least 1"
        );
        anyhow::ensure!(
            self.sqs.send_concurrency >= 1,
            "queue.sqs.send_concurrency must be at least 1"
        );
        Ok(())
    }

    /// The SQS name of the queue: `name`, with `.fifo` appended for a FIFO queue without it.
    pub fn sqs_queue_name(&self) -> String {
        fifo_name(&self.name, self.fifo)
    }

    /// The SQS name of the dead-letter queue; see [`SqsSettings::dead_letter_queue`].
    pub fn sqs_dead_letter_queue_name(&self) -> String {
        match &self.sqs.dead_letter_queue {
            Some(name) => fifo_name(name, self.fifo),
            None => {
                let base = self.name.strip_suffix(".fifo").unwrap_or(&self.name);
                fifo_name(&format!("{base}-dlq"), self.fifo)
            }
        }
    }
}

fn fifo_name(name: &str, fifo: bool) -> String {
    if fifo && !name.ends_with(".fifo") {
        format!("{name}.fifo")
    } else {
        name.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_an_embedded_fifo_queue_that_validates() {
        let settings = QueueSettings::default();
        assert_eq!(settings.backend, BackendKind::Embedded);
        assert!(settings.fifo);
        assert_eq!(settings.visibility_timeout, Duration::from_secs(30));
        assert_eq!(settings.max_receives, 5);
        settings.validate().expect("defaults are valid");
    }

    #[test]
    fn settings_read_from_json_with_humantime_durations() {
        let settings: QueueSettings = serde_json::from_value(serde_json::json!({
            "backend": "sqs",
            "name": "lanes",
            "visibility_timeout": "2m",
            "sqs": { "endpoint_url": "http://127.0.0.1:4566", "create_queues": true }
        }))
        .expect("valid settings");
        assert_eq!(settings.backend, BackendKind::Sqs);
        assert_eq!(settings.visibility_timeout, Duration::from_secs(120));
        assert_eq!(settings.sqs_queue_name(), "lanes.fifo");
        assert_eq!(settings.sqs_dead_letter_queue_name(), "lanes-dlq.fifo");
        assert!(settings.sqs.create_queues);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let error = serde_json::from_value::<QueueSettings>(serde_json::json!({ "nmae": "x" }))
            .expect_err("unknown key");
        assert!(error.to_string().contains("nmae"), "{error}");
    }

    #[test]
    fn standard_queue_names_are_kept_as_they_are() {
        let settings = QueueSettings {
            name: "export".to_owned(),
            fifo: false,
            ..QueueSettings::default()
        };
        assert_eq!(settings.sqs_queue_name(), "export");
        assert_eq!(settings.sqs_dead_letter_queue_name(), "export-dlq");
    }

    #[test]
    fn out_of_range_values_are_named() {
        let settings = QueueSettings {
            max_receives: 0,
            ..QueueSettings::default()
        };
        let error = settings.validate().expect_err("invalid");
        assert!(error.to_string().contains("max_receives"), "{error}");
        let settings = QueueSettings {
            visibility_timeout: Duration::from_secs(13 * 3600),
            ..QueueSettings::default()
        };
        assert!(settings.validate().is_err());
    }
}
