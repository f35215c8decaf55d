//! Parsers besides the legacy console formats: Tomcat's access log, logfmt, and regular
//! expressions with named captures configured by the operator.

use std::sync::{Arc, LazyLock};

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::record::{self, Level, Record};

/// A parser an operator configures: a regular expression whose named captures become the
/// record's parts. `time`, `level`, `message`, `logger`, `thread` and `trace_id` are the
/// record's own; every other named capture is a field. A line that matches starts a
/// record; one that does not joins the record before it (stack trace lines to its stack
/// trace), so a Java format of another layout still keeps its traces whole.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegexParserSettings {
    /// Its name, as `pipeline.parsers` and TestParse use it.
    pub name: String,
    /// The expression (Rust `regex` syntax: linear time on any input).
    pub regex: String,
}

/// A compiled [`RegexParserSettings`].
#[derive(Debug)]
pub struct RegexParser {
    /// Its name.
    pub name: String,
    regex: Regex,
}

impl RegexParser {
    /// Compiles `settings`.
    ///
    /// # Errors
    /// When the expression does not compile or has no named capture.
    pub fn new(settings: &RegexParserSettings) -> Result<Arc<Self>, String> {
        let regex = Regex::new(&settings.regex).map_err(|e| e.to_string())?;
        if regex.capture_names().flatten().next().is_none() {
            return Err("the expression has no named capture (such as (?P<message>.*))".into());
        }
        Ok(Arc::new(Self {
            name: settings.name.clone(),
            regex,
        }))
    }

    /// The record `line` starts, or `None` when it does not match. `time` reads a time
    /// capture.
    pub fn start(
        &self,
        line: &str,
        index: usize,
        time: impl Fn(&str) -> Option<i64>,
    ) -> Option<Record> {
        let captures = self.regex.captures(line)?;
        let mut record = Record {
            first_line: index,
            line_count: 1,
            ..Record::default()
        };
        for name in self.regex.capture_names().flatten() {
            let Some(value) = captures.name(name).map(|m| m.as_str()) else {
                continue;
            };
            match name {
                "time" => record.time_micros = time(value),
                "level" => record.level = Level::parse(value.trim()),
                "message" => value.clone_into(&mut record.message),
                "logger" => value.clone_into(&mut record.logger),
                "thread" => value.clone_into(&mut record.thread),
                "trace_id" => record.trace_id = record::trace_id(value).unwrap_or_default(),
                other => {
                    record.fields.insert(other.to_owned(), value.to_owned());
                }
            }
        }
        Some(record)
    }
}

/// Tomcat's `AccessLogValve` (and Apache's) common and combined formats, optionally with
/// the time taken (`%D` or `%T`) after them:
/// `%h %l %u %t "%r" %s %b ["%{Referer}i" "%{User-Agent}i"] [%D]`.
static ACCESS_LOG: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r#"^(?P<client>\S+) \S+ \S+ \[(?P<time>[^\]]+)\] "(?P<method>[A-Z]+) (?P<path>[^ "]*)(?: (?P<protocol>[^"]*))?" (?P<status>\d{3}) (?P<bytes>\d+|-)(?: "(?P<referer>[^"]*)" "(?P<user_agent>[^"]*)")?(?: (?P<duration>\d+(?:\.\d+)?))?\s*$"#,
    )
    .expect("a valid expression")
});

/// An access log line as a record: the line is its message (as written, masked later
/// like any other); client, method, path, protocol, status, bytes, referer, user agent and
/// the time taken (`duration`, in the valve's unit) are fields; the level says how the
/// request went (5xx ERROR, 4xx WARN, else INFO). The remote user (`%u`) is not kept as a
/// field: it names a person. `None` when the line is not an access log line.
pub fn access_log(line: &str, index: usize) -> Option<Record> {
    let captures = ACCESS_LOG.captures(line)?;
    let mut record = Record {
        first_line: index,
        line_count: 1,
        message: line.to_owned(),
        ..Record::default()
    };
    record.time_micros = captures
        .name("time")
        .and_then(|t| chrono::DateTime::parse_from_str(t.as_str(), "%d/%b/%Y:%H:%M:%S %z").ok())
        .map(|t| t.timestamp_micros());
    let status = captures.name("status").map_or("", |m| m.as_str());
    record.level = Some(match status.as_bytes().first() {
        Some(b'5') => Level::Error,
        Some(b'4') => Level::Warn,
        _ => Level::Info,
    });
    for name in [
        "client",
        "method",
        "path",
        "protocol",
        "status",
        "bytes",
        "referer",
        "user_agent",
        "duration",
    ] {
        if let Some(value) = captures
            .name(name)
            .map(|m| m.as_str())
            .filter(|v| !v.is_empty())
        {
            record.fields.insert(name.to_owned(), value.to_owned());
        }
    }
    Some(record)
}

/// A logfmt line (`time=… level=info msg="cart failed" cart=8812`) as a record: the usual
/// keys for time, level, message, logger, thread and trace id, the other pairs as fields.
/// `None` when the line has no `key=value` pair. `time` reads a time value.
///
/// Written here: logfmt has no specification beyond its tokens (bare or double-quoted
/// values with backslash escapes), and the crates for it are unmaintained.
pub fn logfmt(line: &str, index: usize, time: impl Fn(&str) -> Option<i64>) -> Option<Record> {
    let pairs = logfmt_pairs(line);
    if pairs.is_empty() {
        return None;
    }
    let mut record = Record {
        first_line: index,
        line_count: 1,
        ..Record::default()
    };
    for (key, value) in pairs {
        match key {
            "time" | "ts" | "timestamp" if record.time_micros.is_none() => {
                if let Some(t) = time(&value) {
                    record.time_micros = Some(t);
                } else {
                    record.fields.insert(key.to_owned(), value);
                }
            }
            "level" | "lvl" | "severity" if Level::parse(&value).is_some() => {
                record.level = Level::parse(&value);
            }
            // The first of two names for the same part wins; the other stays a field.
            "msg" | "message" if record.message.is_empty() => record.message = value,
            "logger" | "target" | "caller" if record.logger.is_empty() => record.logger = value,
            "thread" if record.thread.is_empty() => record.thread = value,
            "trace_id" | "traceId" | "traceID" if record::trace_id(&value).is_some() => {
                record.trace_id = record::trace_id(&value).unwrap_or_default();
            }
            _ => {
                record.fields.insert(key.to_owned(), value);
            }
        }
    }
    Some(record)
}

/// The `key=value` pairs of a logfmt line; a key without `=` is a flag (`true`). None at
/// all when no word has an `=`: free text (`starting server on port 8080`) is not a line of
/// flags.
fn logfmt_pairs(line: &str) -> Vec<(&str, String)> {
    let mut pairs = Vec::new();
    let mut valued = false;
    let mut rest = line.trim_start();
    while !rest.is_empty() {
        let key_end = rest.find(['=', ' ']).unwrap_or(rest.len());
        let key = &rest[..key_end];
        rest = &rest[key_end..];
        let value = if let Some(after) = rest.strip_prefix('=') {
            valued = true;
            if let Some(quoted) = after.strip_prefix('"') {
                let mut value = String::new();
                let mut chars = quoted.char_indices();
                let mut end = quoted.len();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, 't')) => value.push('\t'),
                            Some((_, other)) => value.push(other),
                            None => {}
                        },
                        '"' => {
                            end = i + 1;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                rest = &quoted[end..];
                value
            } else {
                let end = after.find(' ').unwrap_or(after.len());
                rest = &after[end..];
                after[..end].to_owned()
            }
        } else {
            "true".to_owned()
        };
        if !key.is_empty() && key.bytes().all(|b| b.is_ascii_graphic() && b != b'"') {
            pairs.push((key, value));
        } else if !key.is_empty() {
            // Not logfmt (free text): no pairs at all.
            return Vec::new();
        }
        rest = rest.trim_start();
    }
    if !valued {
        pairs.clear();
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tomcat_access_lines_common_combined_and_with_the_time_taken() {
        let r = access_log(
            r#"10.0.3.7 - - [28/Oct/2024:17:12:00 +0900] "GET /shop/en/cart HTTP/1.1" 200 5120 "https://mall.example/shop" "Mozilla/5.0 (X11)" 37"#,
            4,
        )
        .expect("an access line");
        assert_eq!(r.time_micros, Some(1_730_103_120_000_000));
        assert_eq!(r.level, Some(Level::Info));
        assert_eq!(r.fields["method"], "GET");
        assert_eq!(r.fields["path"], "/shop/en/cart");
        assert_eq!(r.fields["protocol"], "HTTP/1.1");
        assert_eq!(r.fields["status"], "200");
        assert_eq!(r.fields["bytes"], "5120");
        assert_eq!(r.fields["referer"], "https://mall.example/shop");
        assert_eq!(r.fields["user_agent"], "Mozilla/5.0 (X11)");
        assert_eq!(r.fields["duration"], "37");
        assert_eq!(r.fields["client"], "10.0.3.7");
        assert_eq!(r.first_line, 4);
        assert!(r.message.starts_with("10.0.3.7 - - ["));

        let common = access_log(
            r#"10.0.3.7 - kim [28/Oct/2024:17:12:00 +0900] "POST /checkout HTTP/1.1" 503 -"#,
            0,
        )
        .expect("the common format");
        assert_eq!(common.level, Some(Level::Error));
        assert_eq!(common.fields["bytes"], "-");
        assert!(
            !common.fields.values().any(|v| v == "kim"),
            "the user is no field"
        );
        assert_eq!(
            access_log(r#"1.2.3.4 - - [x] "GET / HTTP/1.1" 404 0"#, 0).map(|r| r.level),
            Some(Some(Level::Warn))
        );
        assert!(access_log("INFO [main] [X] not an access line", 0).is_none());
    }

    fn seconds(t: &str) -> Option<i64> {
        t.parse::<i64>().ok().map(|s| s * 1_000_000)
    }

    #[test]
    fn logfmt_pairs_quoted_escaped_and_flags() {
        let r = logfmt(
            r#"time=1730103120 level=warn msg="cart \"8812\" slow" logger=cart trace_id=4BF92F3577B34DA6A3CE929D0E0E4736 cart=8812 retry"#,
            2,
            seconds,
        )
        .expect("logfmt");
        assert_eq!(r.time_micros, Some(1_730_103_120_000_000));
        assert_eq!(r.level, Some(Level::Warn));
        assert_eq!(r.message, r#"cart "8812" slow"#);
        assert_eq!(r.logger, "cart");
        assert_eq!(r.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(r.fields["cart"], "8812");
        assert_eq!(r.fields["retry"], "true");
        assert_eq!(r.first_line, 2);
        // A time that does not read stays a field; free text is not logfmt.
        let r = logfmt("time=yesterday msg=x", 0, seconds).expect("logfmt");
        assert_eq!(
            (r.time_micros, r.fields["time"].as_str()),
            (None, "yesterday")
        );
        assert!(logfmt("", 0, seconds).is_none());
        assert!(logfmt(r#"a "quoted" word"#, 0, seconds).is_none());
        // Words without a single `=` are free text, not a line of flags.
        assert!(logfmt("starting server on port 8080", 0, seconds).is_none());
        // A second name for the message stays a field.
        let r = logfmt("msg=first message=second", 0, seconds).expect("logfmt");
        assert_eq!(
            (r.message.as_str(), r.fields["message"].as_str()),
            ("first", "second")
        );
    }

    #[test]
    fn a_configured_expression_names_the_records_parts() {
        let parser = RegexParser::new(&RegexParserSettings {
            name: "pipe".to_owned(),
            regex: r"^(?P<time>\d+) \| (?P<level>\w+) \| (?P<thread>[^|]+) \| (?P<message>.*?)(?: order=(?P<order>\d+))?$".to_owned(),
        })
        .expect("compiles");
        let r = parser
            .start(
                "1730103120 | error | http-12 | cart failed order=77",
                5,
                seconds,
            )
            .expect("matches");
        assert_eq!(r.time_micros, Some(1_730_103_120_000_000));
        assert_eq!(r.level, Some(Level::Error));
        assert_eq!(r.thread, "http-12");
        assert_eq!(r.message, "cart failed");
        assert_eq!(r.fields["order"], "77");
        assert!(parser.start("\tat x.Y.z(Y.java:1)", 6, seconds).is_none());
        assert!(
            RegexParser::new(&RegexParserSettings {
                name: "x".to_owned(),
                regex: "no captures".to_owned()
            })
            .is_err()
        );
        assert!(
            RegexParser::new(&RegexParserSettings {
                name: "x".to_owned(),
                regex: "(?P<unclosed".to_owned()
            })
            .is_err()
        );
    }
}
