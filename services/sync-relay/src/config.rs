//! Settings of `sync-relay`: defaults < TOML file (`--config`) < `SYNC_RELAY__*` environment.

use mall_db::DatabaseSettings;
use mall_grpc::ServerSettings;
use mall_telemetry::TelemetrySettings;
use serde::Deserialize;

/// Environment variable prefix: `SYNC_RELAY__SERVER__LISTEN_ADDR=0.0.0.0:50052`.
pub const ENV_PREFIX: &str = "SYNC_RELAY";

/// Everything `sync-relay` can be configured with; every field has a working default.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// gRPC and admin listeners, limits, timeouts. Default ports 50052 (gRPC) and 9092 (admin).
    pub server: ServerSettings,
    /// Logs and traces.
    pub telemetry: TelemetrySettings,
    /// Where state is kept. Default: an SQLite file at `.data/sync-relay.sqlite`.
    pub database: DatabaseSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            server: ServerSettings::with_ports(50052, 9092),
            telemetry: TelemetrySettings::default(),
            database: DatabaseSettings::sqlite_file(".data/sync-relay.sqlite"),
        }
    }
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
