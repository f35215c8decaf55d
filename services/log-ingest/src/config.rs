//! Settings of `log-ingest`: defaults < TOML file (`--config`) < `LOG_INGEST__*` environment.

use mall_grpc::ServerSettings;
use mall_telemetry::TelemetrySettings;
use serde::{Deserialize, Serialize};

use crate::mask::{self, PatternSettings};

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
    /// How lines become records.
    pub parsing: ParsingSettings,
    /// Personal data masked out of every record.
    pub masking: MaskingSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            server: ServerSettings::with_ports(50054, 9094),
            telemetry: TelemetrySettings::default(),
            parsing: ParsingSettings::default(),
            masking: MaskingSettings::default(),
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

/// Parsing and multi-line grouping.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParsingSettings {
    /// IANA time zone of timestamps written without an offset (the legacy servers' local
    /// time). Default `Asia/Seoul`: read as UTC they would be 9 hours in the future.
    pub time_zone: String,
    /// Most lines kept in one record; lines after it are counted, not kept. Default 5,000.
    pub max_record_lines: usize,
    /// Most bytes of text kept in one record (message and stack trace). Default 192 KiB,
    /// under Loki's default 256 KB line limit with room for the record's other parts.
    pub max_record_bytes: usize,
}

impl Default for ParsingSettings {
    fn default() -> Self {
        Self {
            time_zone: "Asia/Seoul".to_owned(),
            max_record_lines: 5_000,
            max_record_bytes: 192 * 1024,
        }
    }
}

/// Masking of personal data.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaskingSettings {
    /// Patterns applied in order to every text of every record. Default: e-mail addresses
    /// (`<email>`) and Korean mobile numbers (`<phone>`). An empty list masks nothing.
    pub patterns: Vec<PatternSettings>,
}

impl Default for MaskingSettings {
    fn default() -> Self {
        Self {
            patterns: mask::default_patterns(),
        }
    }
}
