//! One structured log record, as parsing builds it and every output reads it.

use std::collections::BTreeMap;

/// Levels in order of severity; what `min_level` filters and Loki's `level` label take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// TRACE (also FINEST/FINER).
    Trace,
    /// DEBUG (also FINE, CONFIG).
    Debug,
    /// INFO (also INFORMATION, NOTICE, and the Tanuki wrapper's STATUS and ADVICE).
    Info,
    /// WARN (also WARNING).
    Warn,
    /// ERROR (also SEVERE, CRITICAL).
    Error,
    /// FATAL (also ALERT, EMERGENCY, PANIC).
    Fatal,
}

impl Level {
    /// Every level, lowest first.
    pub const ALL: [Self; 6] = [
        Self::Trace,
        Self::Debug,
        Self::Info,
        Self::Warn,
        Self::Error,
        Self::Fatal,
    ];

    /// The level a word names, in any case, with the usual aliases of Java, syslog and
    /// tracing; `None` for anything else.
    pub fn parse(word: &str) -> Option<Self> {
        let mut upper = [0_u8; 11];
        let bytes = word.as_bytes();
        if bytes.is_empty() || bytes.len() > upper.len() {
            return None;
        }
        for (to, from) in upper.iter_mut().zip(bytes) {
            *to = from.to_ascii_uppercase();
        }
        Some(match &upper[..bytes.len()] {
            b"TRACE" | b"FINEST" | b"FINER" => Self::Trace,
            // JULI's CONFIG sits between INFO and FINE.
            b"DEBUG" | b"FINE" | b"CONFIG" => Self::Debug,
            b"INFO" | b"INFORMATION" | b"NOTICE" | b"STATUS" | b"ADVICE" => Self::Info,
            b"WARN" | b"WARNING" => Self::Warn,
            b"ERROR" | b"SEVERE" | b"CRITICAL" | b"ERR" => Self::Error,
            b"FATAL" | b"ALERT" | b"EMERGENCY" | b"PANIC" => Self::Fatal,
            _ => return None,
        })
    }

    /// The level a log4j header names: exactly one of the six names in upper case (so a
    /// continuation line such as `Status [200] OK` is not taken for a header).
    pub fn parse_strict(word: &str) -> Option<Self> {
        Some(match word {
            "TRACE" => Self::Trace,
            "DEBUG" => Self::Debug,
            "INFO" => Self::Info,
            "WARN" => Self::Warn,
            "ERROR" => Self::Error,
            "FATAL" => Self::Fatal,
            _ => return None,
        })
    }

    /// Upper case, as the contract spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trace => "TRACE",
            Self::Debug => "DEBUG",
            Self::Info => "INFO",
            Self::Warn => "WARN",
            Self::Error => "ERROR",
            Self::Fatal => "FATAL",
        }
    }
}

/// A record: one log line, or a header line with the lines grouped into it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// When it was written, microseconds since the Unix epoch (UTC); `None` when the record
    /// carries no time (the receive time is used then).
    pub time_micros: Option<i64>,
    /// Its level, when it has one.
    pub level: Option<Level>,
    /// Logger (Java class or category, tracing target).
    pub logger: String,
    /// Thread name.
    pub thread: String,
    /// The message, with continuation lines that are not stack trace joined by `\n`.
    pub message: String,
    /// The exception line, frames, `Caused by:`, `Suppressed:` and `... N more` lines,
    /// joined by `\n`; empty when there is none.
    pub stack_trace: String,
    /// Other key/value pairs (MDC, JSON or OTLP attributes).
    pub fields: BTreeMap<String, String>,
    /// W3C trace id, 32 lowercase hex digits, or empty.
    pub trace_id: String,
    /// Index of its first line in what was parsed (a request, a chunk).
    pub first_line: usize,
    /// How many lines were grouped into it.
    pub line_count: usize,
    /// Bytes of text left out because the record reached its size cap.
    pub truncated_bytes: usize,
    /// Whether the parser could not make sense of it (shipped with the raw text as message).
    pub parse_error: bool,
    /// Whether it is the rest of a record cut from its head (by a cap, the quiet, memory)
    /// and keeps the head's header: `log_records_total` counts the head alone.
    pub continued: bool,
}

impl Record {
    /// A record of one line the parser could not parse: its text as the message.
    pub fn raw(line: &str, first_line: usize) -> Self {
        Self {
            message: line.to_owned(),
            first_line,
            line_count: 1,
            parse_error: true,
            ..Self::default()
        }
    }

    /// Bytes of text it holds (message and stack trace), what the size cap counts.
    pub fn text_len(&self) -> usize {
        self.message.len() + self.stack_trace.len()
    }
}

/// Whether `id` is a trace id we keep: a W3C one (32 hex digits), or a 64-bit B3 one (16,
/// as Spring Cloud Sleuth writes by default), not all zero. Returned as 32 lower-case hex
/// digits: a 64-bit id left-padded with zeros, as OpenTelemetry's B3 propagators and Zipkin
/// ingestion make it, so it names the same trace in Tempo.
pub fn trace_id(id: &str) -> Option<String> {
    let hex = id.bytes().all(|b| b.is_ascii_hexdigit()) && id.bytes().any(|b| b != b'0');
    match id.len() {
        32 if hex => Some(id.to_ascii_lowercase()),
        16 if hex => Some(format!("0000000000000000{}", id.to_ascii_lowercase())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_read_in_any_case_with_their_aliases() {
        assert_eq!(Level::parse("warn"), Some(Level::Warn));
        assert_eq!(Level::parse("WARNING"), Some(Level::Warn));
        assert_eq!(Level::parse("Severe"), Some(Level::Error));
        assert_eq!(Level::parse("STATUS"), Some(Level::Info));
        assert_eq!(Level::parse("INFOS"), None);
        assert_eq!(Level::parse(""), None);
        assert_eq!(Level::parse("EMERGENCYX"), None);
        assert!(Level::Warn > Level::Info);
    }

    #[test]
    fn trace_ids_are_32_hex_digits_not_all_zero() {
        assert_eq!(
            trace_id("4BF92F3577B34DA6A3CE929D0E0E4736").as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id("00000000000000000000000000000000"), None);
        assert_eq!(trace_id("4bf92f3577b34da6a3ce929d0e0e473g"), None);
        // 64-bit (B3, Sleuth): left-padded.
        assert_eq!(
            trace_id("4BF92F3577B34DA6").as_deref(),
            Some("00000000000000004bf92f3577b34da6")
        );
        assert_eq!(trace_id("0000000000000000"), None);
        for other in [
            "4bf92f3577b34da",
            "4bf92f3577b34da6a",
            "4bf92f3577b34da6a3ce929d0e0e47",
        ] {
            assert_eq!(trace_id(other), None, "{other}");
        }
    }
}
