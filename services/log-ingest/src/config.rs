//! Settings of `log-ingest`: defaults < TOML file (`--config`) < `LOG_INGEST__*` environment.

use mall_grpc::ServerSettings;
use mall_telemetry::TelemetrySettings;
use serde::{Deserialize, Serialize};

/// Environment variable prefix: `LOG_INGEST__SERVER__LISTEN_ADDR=0.0.0.0:50054`.
pub const ENV_PREFIX: &str = "LOG_INGEST";

/// Everything `log-ingest` can be configured with; every field has a working default.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// gRPC and admin listeners, limits, timeouts. Default ports 50054 (gRPC) and 9094 (admin).
    pub server: ServerSettings,
    /// Logs and traces.
    pub telemetry: TelemetrySettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            server: ServerSettings::with_ports(50054, 9094),
            telemetry: TelemetrySettings::default(),
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
