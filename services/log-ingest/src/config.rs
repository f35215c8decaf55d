//! Settings of `log-ingest`: defaults < TOML file (`--config`) < `LOG_INGEST__*` environment.

use mall_grpc::{
    ServerSettings,
    authz::{ANY_AUTHENTICATED, AuthzRule, identities},
};
use mall_telemetry::TelemetrySettings;
use serde::{Deserialize, Serialize};

use std::{path::PathBuf, time::Duration};

use crate::{
    derive::DerivedSettings,
    formats::RegexParserSettings,
    forward_input::ForwardSettings,
    mask::{self, PatternSettings},
    pipeline::PipelineSettings,
    tail::TailSettings,
};

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
    /// The Fluent forward protocol's listener.
    pub forward: ForwardSettings,
    /// The OTLP logs input.
    pub otlp: OtlpSettings,
    /// The durable buffer between the inputs and Loki.
    pub buffer: BufferSettings,
    /// Where records go.
    pub loki: LokiSettings,
    /// From the buffer to Loki: streams, parsers per source, batching.
    pub pipeline: PipelineSettings,
    /// TailLogs' limits.
    pub tail: TailSettings,
    /// Metrics derived from the records.
    pub derived: DerivedSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            server: ServerSettings::with_ports(50054, 9094).with_rules(default_rules()),
            telemetry: TelemetrySettings::default(),
            parsing: ParsingSettings::default(),
            masking: MaskingSettings::default(),
            forward: ForwardSettings::default(),
            otlp: OtlpSettings::default(),
            buffer: BufferSettings::default(),
            loki: LokiSettings::default(),
            pipeline: PipelineSettings::default(),
            tail: TailSettings::default(),
            derived: DerivedSettings::default(),
        }
    }
}

/// The OTLP logs input.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtlpSettings {
    /// Bytes of exports (as encoded) being converted and stored at once, all callers
    /// together; an export that would pass it is answered UNAVAILABLE with RetryInfo at
    /// once (the exporter retries), as with a full buffer. Default 64 MiB.
    pub max_bytes_in_flight: usize,
}

impl Default for OtlpSettings {
    fn default() -> Self {
        Self {
            max_bytes_in_flight: 64 * 1024 * 1024,
        }
    }
}

/// Who may call what with TLS on, unless `[server.authz]` says otherwise: the log shippers
/// export OTLP logs, any authenticated caller reads the pipeline's statistics and tries the
/// parser; tailing live (masked) logs is for the admins only.
pub fn default_rules() -> Vec<AuthzRule> {
    const SERVICE: &str = "mall.logs.v1.LogIngestService";
    vec![
        AuthzRule::new(
            &["opentelemetry.proto.collector.logs.v1.LogsService/Export"],
            &[identities::LOG_SHIPPER],
        ),
        AuthzRule::new(
            &[
                &format!("{SERVICE}/GetPipelineStats"),
                &format!("{SERVICE}/TestParse"),
            ],
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

/// Parsing and multi-line grouping.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParsingSettings {
    /// IANA time zone of timestamps written without an offset (the legacy servers' local
    /// time). Default `Asia/Seoul`: read as UTC they would be 9 hours in the future.
    pub time_zone: String,
    /// Most lines in one record: one that reaches it is complete, and the next line starts
    /// a record of its own (nothing is left out). Default 5,000.
    pub max_record_lines: usize,
    /// Most bytes of text kept in one record (message and stack trace). Default 192 KiB,
    /// under Loki's default 256 KB line limit with room for the record's other parts.
    pub max_record_bytes: usize,
    /// Parsers of regular expressions with named captures, by name (besides the built-in
    /// ones); none by default.
    pub parsers: Vec<RegexParserSettings>,
    /// TestParse calls parsing at once, each up to 16 MiB of lines and a few times that in
    /// records and answer; one more is answered RESOURCE_EXHAUSTED with RetryInfo before
    /// its request is read. Default 2 (the cores ingestion needs). At least 1, at most
    /// 1,024.
    pub test_parses_at_once: usize,
}

impl Default for ParsingSettings {
    fn default() -> Self {
        Self {
            time_zone: "Asia/Seoul".to_owned(),
            max_record_lines: 5_000,
            max_record_bytes: 192 * 1024,
            parsers: Vec::new(),
            test_parses_at_once: 2,
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

/// The durable buffer.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BufferSettings {
    /// Its directory (a persistent volume in Kubernetes: acknowledged data lives here).
    /// Default `.data/log-ingest/buffer`.
    pub dir: PathBuf,
    /// Most unacknowledged bytes; beyond it inputs stop acknowledging. Default 1 GiB.
    pub max_bytes: u64,
    /// Largest segment file. Default 64 MiB.
    pub segment_bytes: u64,
}

impl Default for BufferSettings {
    fn default() -> Self {
        Self {
            dir: PathBuf::from(".data/log-ingest/buffer"),
            max_bytes: 1 << 30,
            segment_bytes: 64 << 20,
        }
    }
}

/// Loki.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LokiSettings {
    /// Its base URL. Default `http://127.0.0.1:3100`.
    pub url: String,
    /// `X-Scope-OrgID` for a multi-tenant Loki; none: no header. Checked at start-up
    /// against Loki's rules for tenant IDs (1 to 150 of `A-Z a-z 0-9 ! - _ . * ' ( )`, not
    /// `.` or `..`): Loki would answer 400 to every push of another.
    pub tenant: Option<String>,
    /// Longest one push may take, connecting included. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// First wait after a failed push (doubling, jittered). Default 200 ms.
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Longest wait between attempts (and the most of a `Retry-After` honoured). Default 30 s.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// A PEM CA file trusted for an `https://` Loki in addition to the system's roots (a
    /// private CA). Default: none.
    pub ca_file: Option<std::path::PathBuf>,
}

impl Default for LokiSettings {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:3100".to_owned(),
            tenant: None,
            request_timeout: Duration::from_secs(10),
            retry_initial: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
            ca_file: None,
        }
    }
}

#[cfg(test)]
mod tests {
    /// The parsers `deploy/k8s` names per forward tag load as meant: environment variables
    /// keep the tag's dots in the map's key (names are lowercased: tags must be lowercase).
    #[test]
    fn the_deployments_parsers_per_tag_load_from_its_environment() {
        let manifest = include_str!("../../../deploy/k8s/base/log-ingest.yaml");
        let mut env = Vec::new();
        let mut lines = manifest.lines().map(str::trim);
        while let Some(line) = lines.next() {
            if let Some(name) = line.strip_prefix("- name: LOG_INGEST__PIPELINE__PARSERS__") {
                let value = lines
                    .next()
                    .and_then(|l| l.strip_prefix("value: "))
                    .expect("a value on the next line");
                env.push((
                    format!("LOG_INGEST__PIPELINE__PARSERS__{name}"),
                    value.to_owned(),
                ));
            }
        }
        let settings: crate::Settings =
            mall_config::load_from("LOG_INGEST", mall_config::Sources { file: None, env })
                .expect("loads");
        let parsers = &settings.pipeline.parsers;
        assert_eq!(parsers.len(), 2, "{parsers:?}");
        assert_eq!(parsers["hybris.wrapper"], "hybris-wrapper");
        assert_eq!(parsers["hybris.access"], "access-log");
    }

    /// With TLS on, by default: the log shippers export, any authenticated caller reads
    /// the statistics and tries the parser, and only the admins tail live logs.
    #[test]
    fn by_default_only_the_admins_tail_logs() {
        use mall_grpc::{
            authz::{Decision, Policy, identities},
            listen::{Listener, Peer},
            methods::Methods,
        };
        const SERVICE: &str = "mall.logs.v1.LogIngestService";
        const OTLP: &str = "opentelemetry.proto.collector.logs.v1.LogsService";
        let methods = Methods::from_paths([
            "/mall.logs.v1.LogIngestService/TailLogs",
            "/mall.logs.v1.LogIngestService/TestParse",
            "/mall.logs.v1.LogIngestService/GetPipelineStats",
            "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
        ]);
        let settings = crate::Settings::default();
        let policy = Policy::compile(
            &settings.server.authz,
            &[SERVICE.to_owned(), OTLP.to_owned()],
            &methods,
        )
        .expect("the defaults compile");
        let decide = |path: &str, who: &str| {
            let peer = Peer {
                remote_addr: ([127, 0, 0, 1], 1).into(),
                listener: Listener::Main,
                tls: true,
                identity: Some(who.into()),
            };
            policy.decide(path, Some(&peer))
        };
        let team = "spiffe://mall.internal/ns/storefront/sa/storefront";
        let tail = format!("/{SERVICE}/TailLogs");
        assert_eq!(decide(&tail, team), Decision::Denied);
        assert_eq!(decide(&tail, identities::LOG_SHIPPER), Decision::Denied);
        assert_eq!(decide(&tail, identities::ADMIN), Decision::Allow);
        assert!(policy.admin_only(&tail));
        for method in ["GetPipelineStats", "TestParse"] {
            assert_eq!(
                decide(&format!("/{SERVICE}/{method}"), team),
                Decision::Allow
            );
        }
        let export = format!("/{OTLP}/Export");
        assert_eq!(decide(&export, identities::LOG_SHIPPER), Decision::Allow);
        assert_eq!(decide(&export, team), Decision::Denied);
    }
}
