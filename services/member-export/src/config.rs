//! Settings of `member-export`: defaults < TOML file (`--config`) < `MEMBER_EXPORT__*` environment.

use mall_db::DatabaseSettings;
use mall_grpc::ServerSettings;
use mall_telemetry::TelemetrySettings;
use serde::{Deserialize, Serialize};

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
    /// Where state is kept. Default: an SQLite file at `.data/member-export.sqlite`.
    pub database: DatabaseSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            server: ServerSettings::with_ports(50053, 9093),
            telemetry: TelemetrySettings::default(),
            database: DatabaseSettings::sqlite_file(".data/member-export.sqlite"),
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
