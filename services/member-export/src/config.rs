//! Settings of `member-export`: defaults < TOML file (`--config`) < `MEMBER_EXPORT__*` environment.

use std::{collections::BTreeMap, time::Duration};

use mall_db::DatabaseSettings;
use mall_grpc::{
    ServerSettings,
    authz::{ANY_AUTHENTICATED, AuthzRule, identities},
};
use mall_queue::QueueSettings;
use mall_telemetry::TelemetrySettings;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::{alerts::AlertSettings, partner::PartnerSettings};

/// Environment variable prefix: `MEMBER_EXPORT__SERVER__LISTEN_ADDR=0.0.0.0:50053`.
pub const ENV_PREFIX: &str = "MEMBER_EXPORT";

/// Everything `member-export` can be configured with; every field has a working default.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// gRPC and admin listeners, limits, timeouts. Default ports 50053 (gRPC) and 9093 (admin).
    pub server: ServerSettings,
    /// Logs and traces.
    pub telemetry: TelemetrySettings,
    /// Where state is kept (the member table, and the embedded queue). Default: an SQLite
    /// file at `.data/member-export.sqlite`.
    pub database: DatabaseSettings,
    /// The delivery queue. Default: the embedded FIFO queue `member-deliveries.fifo`.
    pub queue: QueueSettings,
    /// How changes are queued.
    pub enqueue: EnqueueSettings,
    /// Encryption of profiles at rest.
    pub encryption: EncryptionSettings,
    /// The marketing platform. Default: the `groobee` dialect of the local partner simulator
    /// (`partner-simulator`, started by `scripts/dev.sh`).
    pub partner: PartnerSettings,
    /// Delivery workers and the outbound limits.
    pub delivery: DeliverySettings,
    /// Failure alerts, capped across replicas.
    pub alerts: AlertSettings,
    /// Failover jobs.
    pub jobs: JobSettings,
}

/// Failover jobs (StartFailoverJob).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobSettings {
    /// How often an idle replica looks for a job to run (or to resume after a crash).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Members a job reads per page, and checkpoints after (1–1000). Up to 4 pages are in
    /// flight at once; after a crash, those not checkpointed are sent again.
    pub page_size: u64,
    /// How long a replica holds the running job without renewing it (it renews every
    /// second): after a crash, another replica resumes the job this much later.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
}

impl Default for JobSettings {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(2),
            page_size: 1_000,
            lease: Duration::from_secs(30),
        }
    }
}

/// Delivery workers and the outbound stack's limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliverySettings {
    /// Workers in this replica; each receives a batch of messages and sends it. 0 stops
    /// delivering (enqueueing goes on). Default: by the partner's batch size, see
    /// [`DeliverySettings::shape`].
    pub workers: Option<usize>,
    /// Queue messages per receive (1–1000). Default: see [`DeliverySettings::shape`].
    pub receive_batch: Option<usize>,
    /// How long a receive waits for messages.
    #[serde(with = "humantime_serde")]
    pub receive_wait: Duration,
    /// Requests per second to the partner (its published or agreed limit), for the whole
    /// Deployment: replicas on one PostgreSQL database share it; on SQLite the one replica
    /// keeps it. A 429 or −1004 halves it for every replica.
    pub rate_limit_per_second: u32,
    /// How long the rate takes to climb back to `rate_limit_per_second` after the partner
    /// refused for rate (linearly, from wherever backoff left it).
    #[serde(with = "humantime_serde")]
    pub rate_limit_recovery: Duration,
    /// Requests to the partner in flight at once.
    pub max_concurrency: usize,
    /// Attempts of one request (5xx, timeouts, 429) before the batch waits and starts over.
    pub max_attempts: u32,
    /// First wait after a failed attempt, doubling (jittered) up to `retry_max`.
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Longest wait between attempts; also caps a `Retry-After`.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// How long deliveries stop after the partner refused our configuration (key, account,
    /// contract) before trying again.
    #[serde(with = "humantime_serde")]
    pub configuration_pause: Duration,
    /// How long a member being sent stays claimed by its sender without renewal (renewed
    /// every third of it while the request is in flight): after a crash, its members wait
    /// this long before another replica or a failover job may send them. At least twice
    /// `partner.request_timeout`: a request is only made while its claims outlast it.
    #[serde(with = "humantime_serde")]
    pub claim_timeout: Duration,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            workers: None,
            receive_batch: None,
            receive_wait: Duration::from_secs(1),
            rate_limit_per_second: 400,
            rate_limit_recovery: Duration::from_secs(30),
            max_concurrency: 16,
            max_attempts: 5,
            retry_initial: Duration::from_millis(200),
            retry_max: Duration::from_secs(10),
            configuration_pause: Duration::from_secs(60),
            claim_timeout: Duration::from_secs(30),
        }
    }
}

impl DeliverySettings {
    /// The workers and the messages each receives, as configured or else what delivered
    /// fastest for the partner's batch size (`scripts/bench.sh member`, BENCHMARKS.md):
    /// - batches (`max_batch` > 1, groobee's 1,000): **one worker receiving 5 × `lanes`**
    ///   (320 for 64 lanes). A receive takes every lane's head before any lane's second
    ///   message, so a deep one holds ~5 messages a lane, ~5,000 members: five full
    ///   requests at once. Two workers of 32 (~500 members a round) delivered 1.6–1.75×
    ///   slower.
    /// - one member per request (webhook's default): **four workers of `lanes` / 4** (4 × 16
    ///   for 64 lanes), so rounds overlap: one waits for the partner while another is in the
    ///   database.
    ///
    /// `receive_batch` is kept within 1–1000.
    pub fn shape(&self, max_batch: usize, lanes: u32) -> (usize, usize) {
        let lanes = usize::try_from(lanes).unwrap_or(usize::MAX).max(1);
        let (workers, receive_batch) = if max_batch > 1 {
            (1, lanes.saturating_mul(5))
        } else {
            (4, (lanes / 4).max(1))
        };
        (
            self.workers.unwrap_or(workers),
            self.receive_batch.unwrap_or(receive_batch).clamp(1, 1000),
        )
    }
}

/// How EnqueueMemberChanges queues deliveries.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnqueueSettings {
    /// FIFO groups of the delivery queue: `hash(member id) mod lanes`, so one member's
    /// deliveries stay in order. 1 to 1,000.
    pub lanes: u32,
}

impl Default for EnqueueSettings {
    fn default() -> Self {
        Self { lanes: 64 }
    }
}

/// Keys that encrypt profiles in the member table (AES-256-GCM). Each stored profile names
/// the key it was encrypted with, so keys can rotate: add a key, make it `current`, keep the
/// old ones until every row moved.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EncryptionSettings {
    /// The key id new profiles are encrypted with; must be in `keys`.
    pub current: String,
    /// Key id → base64 of 32 random bytes (secrets: never printed). The default holds a
    /// fixed development key, which the service warns about at start; production sets its
    /// own from a Secret.
    #[serde(serialize_with = "serialize_keys")]
    pub keys: BTreeMap<String, SecretString>,
    /// How often profiles sealed under another key than `current` are moved to it (after a
    /// rotation; a pass with nothing to move costs one query).
    #[serde(with = "humantime_serde")]
    pub reencrypt_interval: Duration,
}

/// The built-in development key's id.
pub const DEVELOPMENT_KEY_ID: &str = "development";

impl Default for EncryptionSettings {
    fn default() -> Self {
        Self {
            current: DEVELOPMENT_KEY_ID.into(),
            keys: BTreeMap::from([(
                DEVELOPMENT_KEY_ID.to_owned(),
                // Base64 of 32 fixed bytes: local runs and tests only.
                SecretString::from("bWFsbC1tZW1iZXItZXhwb3J0LWRldmVsb3BtZW50LWs="),
            )]),
            reencrypt_interval: Duration::from_secs(60),
        }
    }
}

/// The keys into the defaults the configuration sources are merged over (as
/// `mall_config::serialize_secret` does for one secret; `Debug` still redacts them).
fn serialize_keys<S: serde::Serializer>(
    keys: &BTreeMap<String, SecretString>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    use secrecy::ExposeSecret as _;
    use serde::ser::SerializeMap as _;
    let mut map = serializer.serialize_map(Some(keys.len()))?;
    for (id, key) in keys {
        map.serialize_entry(id, key.expose_secret())?;
    }
    map.end()
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            server: ServerSettings::with_ports(50053, 9093).with_rules(default_rules()),
            telemetry: TelemetrySettings::default(),
            database: DatabaseSettings::sqlite_file(".data/member-export.sqlite"),
            queue: QueueSettings {
                name: "member-deliveries.fifo".into(),
                fifo: true,
                // Environment failures never give messages back (workers hold them), so
                // receives are only used up by crashes: room for several.
                max_receives: 10,
                ..QueueSettings::default()
            },
            enqueue: EnqueueSettings::default(),
            encryption: EncryptionSettings::default(),
            partner: PartnerSettings::default(),
            delivery: DeliverySettings::default(),
            alerts: AlertSettings::default(),
            jobs: JobSettings::default(),
        }
    }
}

/// Who may call what with TLS on, unless `[server.authz]` says otherwise: the member system
/// enqueues changes and erases members, any authenticated caller reads the delivery
/// statistics; failover jobs, failed deliveries and one member's delivery state are for the
/// admins only.
pub fn default_rules() -> Vec<AuthzRule> {
    const SERVICE: &str = "mall.member.v1.MemberExportService";
    vec![
        AuthzRule::new(
            &[
                &format!("{SERVICE}/EnqueueMemberChanges"),
                &format!("{SERVICE}/EraseMember"),
            ],
            &[identities::MEMBER_SYSTEM],
        ),
        AuthzRule::new(
            &[&format!("{SERVICE}/GetDeliveryStats")],
            &[ANY_AUTHENTICATED],
        ),
    ]
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

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret as _;

    use super::*;
    use crate::partner::PartnerKind;

    fn load(env: &[(&str, &str)]) -> Result<Settings, mall_config::ConfigError> {
        mall_config::load_from(
            ENV_PREFIX,
            mall_config::Sources {
                file: None,
                env: env
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            },
        )
    }

    #[test]
    fn the_environment_switches_the_partner_and_sets_keys_and_secrets() {
        let settings = load(&[
            ("MEMBER_EXPORT__PARTNER__KIND", "webhook"),
            (
                "MEMBER_EXPORT__PARTNER__URL",
                "https://hooks.example.com/members",
            ),
            (
                "MEMBER_EXPORT__PARTNER__SECRET",
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            ),
            ("MEMBER_EXPORT__ENCRYPTION__CURRENT", "k1"),
            (
                "MEMBER_EXPORT__ENCRYPTION__KEYS__K1",
                "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
            ),
        ])
        .expect("valid settings");
        assert_eq!(settings.partner.kind, PartnerKind::Webhook);
        assert!(crate::partner::AnyPartner::new(&settings.partner).is_ok());
        assert!(crate::crypto::ProfileCipher::new(&settings.encryption).is_ok());
        assert_eq!(
            settings.encryption.keys["k1"].expose_secret(),
            "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
        );
        let error = load(&[("MEMBER_EXPORT__PARTNER__API_KY", "typo")]).expect_err("unknown key");
        assert!(error.to_string().contains("api_ky"), "{error}");
    }

    #[test]
    fn delivery_workers_default_by_batch_size_and_configured_values_win() {
        let defaults = DeliverySettings::default();
        assert_eq!(
            defaults.shape(1_000, 64),
            (1, 320),
            "batches: one deep receive"
        );
        assert_eq!(
            defaults.shape(1, 64),
            (4, 16),
            "one per request: overlapping rounds"
        );
        assert_eq!(
            defaults.shape(1_000, 400),
            (1, 1000),
            "capped at 1,000 a receive"
        );
        assert_eq!(defaults.shape(1, 2), (4, 1));
        let settings = load(&[
            ("MEMBER_EXPORT__DELIVERY__WORKERS", "0"),
            ("MEMBER_EXPORT__DELIVERY__RECEIVE_BATCH", "10"),
        ])
        .expect("valid settings");
        assert_eq!(settings.delivery.shape(1_000, 64), (0, 10));
        let settings =
            load(&[("MEMBER_EXPORT__DELIVERY__RECEIVE_BATCH", "5000")]).expect("valid settings");
        assert_eq!(settings.delivery.shape(1, 64), (4, 1000));
    }
}
