//! Settings of `sync-relay`: defaults < TOML file (`--config`) < `SYNC_RELAY__*` environment.

use std::time::Duration;

use mall_db::DatabaseSettings;
use mall_grpc::{
    ServerSettings,
    authz::{AuthzRule, identities},
    tls::ClientTls,
};
use mall_product::ProductTypes;
use mall_queue::QueueSettings;
use mall_telemetry::TelemetrySettings;
use serde::{Deserialize, Serialize};
use url::Url;

use crate::source::kinesis::KinesisSettings;

/// Environment variable prefix: `SYNC_RELAY__SERVER__LISTEN_ADDR=0.0.0.0:50052`.
pub const ENV_PREFIX: &str = "SYNC_RELAY";

/// Everything `sync-relay` can be configured with; every field has a working default.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// gRPC and admin listeners, limits, timeouts. Default ports 50052 (gRPC) and 9092 (admin).
    pub server: ServerSettings,
    /// Logs and traces.
    pub telemetry: TelemetrySettings,
    /// Where state is kept (quarantine, checkpoints, leases, and the embedded queue).
    /// Default: an SQLite file at `.data/sync-relay.sqlite`.
    pub database: DatabaseSettings,
    /// Where product changes come from.
    pub source: SourceSettings,
    /// The ordered queue between the stages. Default: the embedded queue
    /// `product-changes.fifo` in the relay's database, FIFO, visibility 30s, dead-lettered
    /// after 10 receives.
    pub queue: QueueSettings,
    /// Roll-up, lanes and validation (stage 1).
    pub relay: RelaySettings,
    /// Applying changes to the catalog (stage 2).
    pub apply: ApplySettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            server: ServerSettings::with_ports(50052, 9092).with_rules(default_rules()),
            telemetry: TelemetrySettings::default(),
            database: DatabaseSettings::sqlite_file(".data/sync-relay.sqlite"),
            source: SourceSettings::default(),
            queue: QueueSettings {
                name: "product-changes.fifo".into(),
                fifo: true,
                // A relay killed mid-apply leaves its messages in flight; each such crash
                // costs a receive. Ten leaves room for several crashes before a healthy
                // message would be dead-lettered.
                max_receives: 10,
                ..QueueSettings::default()
            },
            relay: RelaySettings::default(),
            apply: ApplySettings::default(),
        }
    }
}

/// Who may call what with TLS on, unless `[server.authz]` says otherwise: the product
/// producer publishes; the status (whose last error quotes the queue's and the catalog's own
/// messages), pausing, resuming, replaying, the dead letters and the quarantine are for the
/// admins only.
pub fn default_rules() -> Vec<AuthzRule> {
    const SERVICE: &str = "mall.sync.v1.SyncRelayService";
    vec![AuthzRule::new(
        &[&format!("{SERVICE}/PublishProductChanges")],
        &[identities::PRODUCT_PRODUCER],
    )]
}

impl Settings {
    /// Loads settings from the command line, the optional file and the environment.
    ///
    /// # Errors
    /// When a key is unknown or a value is malformed; the error names the key.
    pub fn load() -> Result<Self, mall_config::ConfigError> {
        mall_config::load(ENV_PREFIX)
    }
}

/// Which source feeds stage 1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Only gRPC `PublishProductChanges` (the local default).
    #[default]
    Grpc,
    /// The product team's Kinesis stream; `PublishProductChanges` stays open for backfills.
    Kinesis,
}

/// The `source` section.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceSettings {
    /// `grpc` (default) or `kinesis`.
    pub kind: SourceKind,
    /// The Kinesis stream, when `kind = "kinesis"`.
    pub kinesis: KinesisSettings,
    /// This replica's name in shard leases: unique per replica (the pod name). Default: the
    /// host name and process id.
    pub replica_id: Option<String>,
}

/// The `relay` section: stage 1.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelaySettings {
    /// FIFO lanes (message groups): `hash(product code) mod lanes`. More lanes apply in
    /// parallel; a product's changes always share one lane. Safe to change with messages
    /// queued: a product's old and new lanes may then apply out of order, which the catalog's
    /// commuting writes make harmless (freshness suffers for a moment). Default 16.
    pub lanes: u32,
    /// Largest queue message body, in bytes (base64 text). At most 1 MiB minus the
    /// attributes (SQS); larger bodies carry more changes per message. Default 256 KiB.
    pub max_message_bytes: usize,
    /// Registered product types; must be the catalog's registry. Default: the catalog's
    /// default set.
    pub product_types: ProductTypes,
    /// How often each replica re-reads the shared pause switch. Default 1s.
    #[serde(with = "humantime_serde")]
    pub control_poll_interval: Duration,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            lanes: 16,
            max_message_bytes: 256 * 1024,
            product_types: ProductTypes::default(),
            control_poll_interval: Duration::from_secs(1),
        }
    }
}

/// The `apply` section: stage 2.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApplySettings {
    /// product-catalog's gRPC endpoint. Default `http://127.0.0.1:50051`; `https://...` with
    /// `catalog_tls`.
    pub catalog_url: Url,
    /// Mutual TLS to the catalog (`[apply.catalog_tls]`: `ca_file`, `cert_file`, `key_file`,
    /// optional `server_name`): the relay presents its certificate, whose identity the
    /// catalog's policy allows to write. Files are re-read when they change. Default: none
    /// (plaintext).
    pub catalog_tls: Option<ClientTls>,
    /// Deadline of one BulkUpdateProducts call. Default 10s.
    #[serde(with = "humantime_serde")]
    pub catalog_timeout: Duration,
    /// Queue consumers in this replica, working side by side; each receives a batch (on the
    /// embedded queue from `receive_lanes` lanes) and applies its lanes together in one
    /// catalog call per product type. Default 4.
    pub consumers: usize,
    /// Messages one consumer receives at once (1–1000). The embedded queue hands out a
    /// lane with a backlog as a run of up to 10 messages, so one receive carries several
    /// changes of a busy lane into one BulkUpdateProducts call, from at most `receive_lanes`
    /// lanes (so at most `receive_lanes` × 10 messages); SQS returns at most 10 per call and
    /// makes several calls in a row for more. Default by queue backend
    /// ([`ApplySettings::receive_batch`]): 200 on the embedded queue, 40 on SQS.
    pub receive_batch: Option<usize>,
    /// Lanes (message groups) one consumer takes per receive, so that the replica's
    /// consumers apply different lanes side by side: a lane's messages are held by one
    /// consumer at a time, and a receive that took every lane would leave the other
    /// consumers nothing until its catalog call ended. Default
    /// ([`ApplySettings::receive_lanes`]): `relay.lanes` / `consumers`, rounded up (4 with 16
    /// lanes and 4 consumers). Only the embedded queue heeds it; SQS chooses the groups of a
    /// receive itself.
    pub receive_lanes: Option<usize>,
    /// Long-polling wait of a receive. Default 1s.
    #[serde(with = "humantime_serde")]
    pub receive_wait: Duration,
    /// First wait before retrying an apply that failed; doubles up to `retry_backoff_max`.
    /// Default 100ms.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_initial: Duration,
    /// Longest wait between retries. Default 5s.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
}

impl ApplySettings {
    /// Messages per receive on `backend`: as configured, else 200 on the embedded queue and
    /// 40 on SQS; kept within 1–1000.
    ///
    /// Measured on the relay benchmark (2026-12-04, `--set apply.receive_batch=…`, quick
    /// runs): when changes arrive paced, stage 1 writes few changes per lane message (about
    /// 6 at 5,000 changes/s over 16 lanes), so a receive of 40 messages fed each catalog call
    /// only ~240 changes and stage 2 fell behind: embedded + SQLite at 10,000/s offered p99
    /// event→commit 1.9 s with 40, 0.36 s with 200, 0.15 s with 400; embedded + PostgreSQL
    /// at 5,000/s 6.7 s with 40, 0.25 s with 200. SQS stays at 40: it receives 10 per call,
    /// one call after another, so a deeper receive is that many more round trips before
    /// the first change is applied. A consumer holds at most `receive_batch` ×
    /// `relay.max_message_bytes` of bodies (200 × 256 KiB = 50 MiB in the worst case; the
    /// paced messages above are a few KiB).
    pub fn receive_batch(&self, backend: mall_queue::BackendKind) -> usize {
        let default = match backend {
            mall_queue::BackendKind::Embedded => 200,
            mall_queue::BackendKind::Sqs => 40,
        };
        self.receive_batch.unwrap_or(default).clamp(1, 1000)
    }

    /// Lanes per receive with `lanes` lanes: as configured, else `lanes` / `consumers`
    /// rounded up; at least 1.
    ///
    /// Measured on the relay benchmark (2026-12-04, embedded queue + PostgreSQL, 10,000
    /// changes/s offered over 16 lanes): a receive of 200 took a run of every lane, so one
    /// consumer held all 16 lanes through one catalog call of ~1,000 changes while the other
    /// three found nothing; stage 2 was one catalog call at a time (1.3 of 2 cores busy,
    /// 6,700 changes/s delivered, p99 3.9 s).
    pub fn receive_lanes(&self, lanes: u32) -> usize {
        let lanes = usize::try_from(lanes).unwrap_or(usize::MAX);
        self.receive_lanes
            .unwrap_or_else(|| lanes.div_ceil(self.consumers.max(1)))
            .max(1)
    }
}

impl Default for ApplySettings {
    fn default() -> Self {
        Self {
            catalog_url: Url::parse("http://127.0.0.1:50051").expect("a valid url"),
            catalog_tls: None,
            catalog_timeout: Duration::from_secs(10),
            consumers: 4,
            receive_batch: None,
            receive_lanes: None,
            receive_wait: Duration::from_secs(1),
            retry_backoff_initial: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(5),
        }
    }
}

#[cfg(test)]
mod tests {
    use mall_queue::BackendKind;

    use super::*;

    #[test]
    fn receive_lanes_shares_the_lanes_among_the_consumers_unless_configured() {
        let mut apply = ApplySettings::default();
        assert_eq!(apply.receive_lanes(16), 4);
        assert_eq!(apply.receive_lanes(17), 5, "rounded up: no lane left over");
        assert_eq!(apply.receive_lanes(2), 1);
        apply.consumers = 0;
        assert_eq!(apply.receive_lanes(16), 16);
        apply.receive_lanes = Some(0);
        assert_eq!(apply.receive_lanes(16), 1);
        let parsed: ApplySettings =
            serde_json::from_str(r#"{"receive_lanes": 16}"#).expect("parses");
        assert_eq!(parsed.receive_lanes(16), 16);
    }

    #[test]
    fn receive_batch_defaults_by_backend_and_a_configured_value_wins_within_bounds() {
        let mut apply = ApplySettings::default();
        assert_eq!(apply.receive_batch(BackendKind::Embedded), 200);
        assert_eq!(apply.receive_batch(BackendKind::Sqs), 40);
        apply.receive_batch = Some(64);
        assert_eq!(apply.receive_batch(BackendKind::Embedded), 64);
        assert_eq!(apply.receive_batch(BackendKind::Sqs), 64);
        apply.receive_batch = Some(0);
        assert_eq!(apply.receive_batch(BackendKind::Sqs), 1);
        apply.receive_batch = Some(5_000);
        assert_eq!(apply.receive_batch(BackendKind::Embedded), 1000);
        // From configuration, as operators write it.
        let parsed: ApplySettings =
            serde_json::from_str(r#"{"receive_batch": 120}"#).expect("parses");
        assert_eq!(parsed.receive_batch(BackendKind::Sqs), 120);
    }
}
