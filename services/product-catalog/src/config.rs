//! Settings of `product-catalog`: defaults < TOML file (`--config`) < `PRODUCT_CATALOG__*` environment.

use std::time::Duration;

use mall_db::DatabaseSettings;
use mall_grpc::{
    ServerSettings,
    authz::{ANY_AUTHENTICATED, AuthzRule, identities},
};
use mall_product::ProductTypes;
use mall_telemetry::TelemetrySettings;
use serde::{Deserialize, Serialize};

/// Environment variable prefix: `PRODUCT_CATALOG__SERVER__LISTEN_ADDR=0.0.0.0:50051`.
pub const ENV_PREFIX: &str = "PRODUCT_CATALOG";

/// Everything `product-catalog` can be configured with; every field has a working default.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// gRPC and admin listeners, limits, timeouts. Default ports 50051 (gRPC) and 9091 (admin).
    pub server: ServerSettings,
    /// Logs and traces.
    pub telemetry: TelemetrySettings,
    /// Where state is kept. Default: an SQLite file at `.data/product-catalog.sqlite`.
    pub database: DatabaseSettings,
    /// The catalog itself: product types, change-log retention, watch polling.
    pub catalog: CatalogSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            server: ServerSettings::with_ports(50051, 9091).with_rules(default_rules()),
            telemetry: TelemetrySettings::default(),
            database: DatabaseSettings::sqlite_file(".data/product-catalog.sqlite"),
            catalog: CatalogSettings::default(),
        }
    }
}

/// Who may call what with TLS on, unless `[server.authz]` says otherwise: reads for any
/// authenticated caller, writes and imports for the relay (and the admins, who may call
/// everything, ListPendingProducts included).
pub fn default_rules() -> Vec<AuthzRule> {
    const SERVICE: &str = "mall.catalog.v1.ProductCatalogService";
    vec![
        AuthzRule::new(
            &[
                &format!("{SERVICE}/GetProduct"),
                &format!("{SERVICE}/BatchGetProducts"),
                &format!("{SERVICE}/ListProducts"),
                &format!("{SERVICE}/WatchProductChanges"),
            ],
            &[ANY_AUTHENTICATED],
        ),
        AuthzRule::new(
            &[
                &format!("{SERVICE}/BulkUpdateProducts"),
                &format!("{SERVICE}/ImportProducts"),
            ],
            &[identities::SYNC_RELAY],
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

/// The `catalog` section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CatalogSettings {
    /// Registered product types and the attributes each allows: the default set (apparel,
    /// shoes, bags, accessories, golf, outdoor, kids, living) plus what is configured, merged
    /// key by key. sync-relay must be given the same registry.
    pub product_types: ProductTypes,
    /// How long applied changes stay in the change log for WatchProductChanges. A watcher
    /// that falls further behind gets OUT_OF_RANGE. Default 7 days.
    #[serde(with = "humantime_serde")]
    pub change_retention: Duration,
    /// How long a BulkUpdateProducts `request_id` is remembered. Default 24 hours (the
    /// contract promises at least that).
    #[serde(with = "humantime_serde")]
    pub request_id_retention: Duration,
    /// How often expired change-log entries and request ids are deleted. Default 1 minute.
    #[serde(with = "humantime_serde")]
    pub maintenance_interval: Duration,
    /// How often an idle WatchProductChanges stream looks for changes committed by other
    /// replicas; changes committed by this replica wake it at once. Default 200ms.
    #[serde(with = "humantime_serde")]
    pub watch_poll_interval: Duration,
    /// Products kept in memory for GetProduct and BatchGetProducts (about 1–2 KiB each);
    /// 0 reads every product from the database. A write through this replica is visible at
    /// once; through another replica within `watch_poll_interval`. Default 20,000.
    pub read_cache_entries: usize,
    /// How many attempts a write gets after conflicts (overlapping writers, a deadlock, a busy
    /// SQLite file) before the call fails with UNAVAILABLE. On PostgreSQL a retry holds the
    /// catalog's write lock exclusively, so it cannot lose the race that made it retry
    /// again; it can still wait too long for that lock (2 s, behind a stuck writer) or lose
    /// its connection, which the remaining attempts cover. Default 10.
    pub write_retries: u32,
    /// How long a pending product (partial changes whose product was never created, usually
    /// a producer's typo in a code) is kept before maintenance deletes it with a log line.
    /// Default 30 days.
    #[serde(with = "humantime_serde")]
    pub pending_retention: Duration,
    /// The version guard against runaway producers: a write whose version is more than this
    /// far ahead of its product's stored version is refused as that item's fault (INVALID_
    /// ARGUMENT naming `updates[i].product.version`; the relay quarantines it for an operator).
    /// A product that does not exist yet is not guarded. There is no version reset: a
    /// product's version never moves back. Default: off (unset).
    pub max_version_jump: Option<u64>,
}

impl Default for CatalogSettings {
    fn default() -> Self {
        Self {
            product_types: ProductTypes::default(),
            change_retention: Duration::from_secs(7 * 24 * 3600),
            request_id_retention: Duration::from_secs(24 * 3600),
            maintenance_interval: Duration::from_secs(60),
            watch_poll_interval: Duration::from_millis(200),
            read_cache_entries: 20_000,
            write_retries: 10,
            pending_retention: Duration::from_secs(30 * 24 * 3600),
            max_version_jump: None,
        }
    }
}
