//! Parsers: one line in, either the start of a record or a line that joins the record
//! before it (see [`crate::multiline`]).
//!
//! Built in, by name:
//! - `hybris-wrapper`: the Tanuki service wrapper's log file line around a log4j line,
//!   `INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | ERROR [thread] [Logger] text`
//!   (its format `LPDZM`; any of its formats with the source column `P` is read, such as
//!   its log file's default `LPTM` or its console's `PM`, `jvm 1    | text`: see
//!   [`wrapper_prefix`]; a format with the time column but not the source, such as `LTM`,
//!   the level alone, `LM`, or a number column after the source not written as the
//!   wrapper writes its process ids are not, and counted as not parsed).
//!   A record starts where the part after the wrapper's prefix is a log4j header (the stack
//!   lines carry the wrapper's prefix and time too, so the prefix alone says nothing), or
//!   at the wrapper's own lines (`STATUS | wrapper  | …`), which do not end the record
//!   they interrupt, a stack trace say (asides: [`crate::multiline`]).
//! - `log4j`: the bare log4j line, `LEVEL [thread] [Logger] text`, optionally after an
//!   ISO-8601 time (`2024-10-28 17:12:00,040`).
//! - `json`: one JSON object per line, as our own services (tracing's JSON format) and most
//!   structured loggers write: time, level, message, logger, thread and trace id under
//!   their usual names, every other scalar in `fields`.
//!
//! - `line`: every line a record of its own, unparsed.
//!
//! An empty name chooses per line: JSON when the line starts with `{`, else the wrapper's
//! line, else a log4j header, else an access log line, else a continuation (not parsed
//! when it has the wrapper's time column but not its source, or a number column after
//! its source that is not written as the wrapper writes its process ids).
//!
//! Hand-written rather than regular expressions: these formats are fixed, and this is the
//! hot path (every line of every legacy server).

use std::str::FromStr as _;

use chrono::{NaiveDate, NaiveDateTime, TimeZone as _};
use chrono_tz::Tz;

use std::sync::Arc;

use crate::{
    formats::{self, RegexParser, RegexParserSettings},
    record::{self, Level, Record},
};

/// Names of the built-in parsers.
pub const BUILT_IN: [&str; 6] = [
    "hybris-wrapper",
    "log4j",
    "json",
    "logfmt",
    "access-log",
    "line",
];

/// A parser, chosen by name.
#[derive(Debug, Clone)]
pub enum Format {
    /// `hybris-wrapper`.
    Wrapper,
    /// `log4j`.
    Log4j,
    /// `json`.
    Json,
    /// `logfmt`: `key=value` pairs, every line a record.
    Logfmt,
    /// `access-log`: Tomcat's (and Apache's) common and combined access log formats.
    AccessLog,
    /// `line`: every line is a record of its own, unparsed (anything without multi-line
    /// records).
    Line,
    /// One configured in `parsing.parsers`: a regular expression with named captures.
    Regex(Arc<RegexParser>),
    /// Chosen per line (the empty name).
    Auto,
}

impl Format {
    /// The parser named `name` (empty: [`Format::Auto`]); `None` when there is no such
    /// parser.
    pub fn named(name: &str) -> Option<Self> {
        Some(match name {
            "" => Self::Auto,
            "hybris-wrapper" => Self::Wrapper,
            "log4j" => Self::Log4j,
            "json" => Self::Json,
            "logfmt" => Self::Logfmt,
            "access-log" => Self::AccessLog,
            "line" => Self::Line,
            _ => return None,
        })
    }
}

/// The parsers by name: the built-in ones and those configured.
#[derive(Debug, Clone, Default)]
pub struct Formats {
    configured: Vec<Arc<RegexParser>>,
}

impl Formats {
    /// The built-in parsers and `configured`.
    ///
    /// # Errors
    /// When an expression does not compile, or a name is empty, taken twice or a built-in
    /// one's.
    pub fn new(configured: &[RegexParserSettings]) -> Result<Self, String> {
        let mut parsers: Vec<Arc<RegexParser>> = Vec::new();
        for (i, settings) in configured.iter().enumerate() {
            let name = &settings.name;
            if name.is_empty()
                || BUILT_IN.contains(&name.as_str())
                || parsers.iter().any(|p| &p.name == name)
            {
                return Err(format!(
                    "parsing.parsers[{i}].name {name:?} must be non-empty, unique and not one \
                     of the built-in parsers ({})",
                    BUILT_IN.join(", ")
                ));
            }
            parsers.push(
                RegexParser::new(settings)
                    .map_err(|e| format!("parsing.parsers[{i}] ({name}): {e}"))?,
            );
        }
        Ok(Self {
            configured: parsers,
        })
    }

    /// The parser named `name` (empty: [`Format::Auto`]); `None` when there is none.
    pub fn named(&self, name: &str) -> Option<Format> {
        Format::named(name).or_else(|| {
            self.configured
                .iter()
                .find(|p| p.name == name)
                .map(|p| Format::Regex(p.clone()))
        })
    }

    /// Every parser's name.
    pub fn names(&self) -> Vec<&str> {
        BUILT_IN
            .iter()
            .copied()
            .chain(self.configured.iter().map(|p| p.name.as_str()))
            .collect()
    }
}

/// What one line is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line<'a> {
    /// It starts a record.
    Start(Record),
    /// A record of its own that does not end the record in progress (a stack trace say):
    /// the Tanuki wrapper's own lines (`Pinging the JVM took 12 seconds to respond`), which
    /// it writes between the JVM's, inside a trace too. With nothing in progress, or a
    /// record at its caps, a start (a line that does not interrupt: a record complete at
    /// once, or held behind a wrapper's line that interrupts held before it, which then
    /// becomes the record in progress).
    Aside {
        record: Record,
        /// Whether the JVM's text right after it is new (the JVM stopped and the wrapper
        /// said so, or started another): the record in progress ends there. Not after its
        /// debug lines (`DEBUG`, and `wrapperp`, its protocol's) or its reports of a slow
        /// ping (`Pinging the JVM took 12 seconds to respond.`) or of its process starved of
        /// CPU, which come between any two of the JVM's lines, a message's too.
        interrupts: bool,
    },
    /// It joins the record before it: its text (after a wrapper's prefix), and whether it
    /// is stack trace (an exception line, a frame, `Caused by:`, `Suppressed:`, `... N
    /// more`).
    Continue {
        /// The text to append.
        text: &'a str,
        /// Whether it is stack trace.
        stack: bool,
        /// Whether the parser expected a record's start here and could not read one (a
        /// configured expression that does not match a line that is not stack trace, the
        /// wrapper's columns in a format not read): the record it joins counts as a parse
        /// error.
        unparsed: bool,
    },
}

/// Parses lines in one source time zone (timestamps without an offset are read in it).
#[derive(Debug, Clone)]
pub struct Parser {
    format: Format,
    zone: Tz,
}

impl Parser {
    /// A parser of `format` reading times without an offset in `zone`.
    pub fn new(format: Format, zone: Tz) -> Self {
        Self { format, zone }
    }

    /// What `line` (without its terminator) is; `index` is its position, for the record's
    /// `first_line`.
    pub fn line<'a>(&self, line: &'a str, index: usize) -> Line<'a> {
        match &self.format {
            Format::Wrapper => self.wrapper(line, index),
            Format::Log4j => self.log4j(line, None, index),
            Format::Line => {
                let mut record = Record::raw(line, index);
                record.parse_error = false;
                Line::Start(record)
            }
            Format::AccessLog => Line::Start(
                formats::access_log(line, index).unwrap_or_else(|| Record::raw(line, index)),
            ),
            Format::Logfmt => Line::Start(
                formats::logfmt(line, index, |t| self.any_time(t))
                    .unwrap_or_else(|| Record::raw(line, index)),
            ),
            Format::Regex(parser) => {
                let time = |t: &str| {
                    if parser.time_format.is_empty() {
                        self.any_time(t)
                    } else {
                        self.formatted_time(t, &parser.time_format)
                    }
                };
                match parser.start(line, index, time) {
                    Some(record) => Line::Start(record),
                    // The JVM's report of an uncaught exception starts a record at ERROR,
                    // whatever the layout (the contract's grouping).
                    None if line.starts_with("Exception in thread \"") => match uncaught(line) {
                        Some(mut record) => {
                            record.first_line = index;
                            Line::Start(record)
                        }
                        None => unmatched(line),
                    },
                    None => unmatched(line),
                }
            }
            Format::Json => Line::Start(
                self.json(line, index)
                    .map(|record| with_message(record, line))
                    .unwrap_or_else(|| Record::raw(line, index)),
            ),
            // A line that merely starts with `{` (a request body printed after a header)
            // is JSON only when it parses as a log record.
            Format::Auto => match line
                .starts_with('{')
                .then(|| self.json(line, index))
                .flatten()
            {
                Some(record)
                    if record.level.is_some()
                        || record.time_micros.is_some()
                        || !record.message.is_empty() =>
                {
                    Line::Start(with_message(record, line))
                }
                _ => self.wrapper(line, index),
            },
        }
    }

    fn wrapper<'a>(&self, line: &'a str, index: usize) -> Line<'a> {
        match wrapper_prefix(line) {
            // The wrapper's own lines (start, stop, restarts, pings; `wrapperp` its
            // protocol's debug lines): records of their own.
            Some(prefix) if prefix.source.starts_with("wrapper") => Line::Aside {
                interrupts: prefix.source != "wrapperp"
                    && prefix.level != Some("DEBUG")
                    // Its reports of a slow ping or of its own process starved of CPU: the
                    // JVM is alive, and goes on writing.
                    && !prefix.rest.starts_with("Pinging the JVM took ")
                    && !prefix
                        .rest
                        .starts_with("Wrapper Process has not received any CPU time for "),
                record: Record {
                    time_micros: prefix
                        .time
                        .and_then(|t| self.timestamp(t, b'/'))
                        .map(|(t, _)| t),
                    level: prefix.level.and_then(Level::parse),
                    logger: "wrapper".to_owned(),
                    message: prefix.rest.to_owned(),
                    first_line: index,
                    line_count: 1,
                    ..Record::default()
                },
            },
            // A number column of a width the wrapper does not write (a process id column
            // is at least 7 wide) after the source: not read (it may be the JVM's text, or a
            // format not known), and nothing behind it would be, so the line says so rather
            // than join the record in progress unseen.
            Some(prefix)
                if !prefix.source.is_empty() && starts_with_a_number_column(prefix.rest) =>
            {
                Line::Continue {
                    text: prefix.rest,
                    stack: false,
                    unparsed: true,
                }
            }
            Some(prefix) if !prefix.source.is_empty() => {
                self.log4j(prefix.rest, prefix.time, index)
            }
            // The wrapper's time column without its source (`LTM`, `TM`): whose line it is
            // cannot be told, and nothing is read behind it, so every line would join the
            // record in progress unseen. Counted as not parsed, so the setting shows in
            // `parse_errors_total` (and TestParse's `parse_error`).
            // So is the level column alone (`LM`) where the parser is the wrapper's.
            Some(prefix)
                if prefix.time.is_some()
                    || (prefix.level.is_some() && matches!(self.format, Format::Wrapper)) =>
            {
                Line::Continue {
                    text: line,
                    stack: false,
                    unparsed: true,
                }
            }
            _ if !matches!(self.format, Format::Auto) => continuation(line),
            _ => match self.log4j(line, None, index) {
                // `"GET /path HTTP/1.1" 200`: the access log's expression runs only on
                // lines holding `" ` (few stack lines do).
                Line::Continue { .. } if line.contains("\" ") => {
                    formats::access_log(line, index).map_or_else(|| continuation(line), Line::Start)
                }
                parsed => parsed,
            },
        }
    }

    /// `text` is the log4j part of a line (all of it without a wrapper); `wrapper_time` the
    /// wrapper's time column, used when the log4j part has no time of its own. Times are
    /// read only for a record's first line (most lines of a trace are not).
    fn log4j<'a>(&self, text: &'a str, wrapper_time: Option<&str>, index: usize) -> Line<'a> {
        let (own_time, after_time) = match text
            .starts_with(|c: char| c.is_ascii_digit())
            .then(|| self.timestamp(text, b'-'))
            .flatten()
        {
            Some((micros, used)) => (Some(micros), text[used..].trim_start()),
            None => (None, text),
        };
        let Some(header) = log4j_header(after_time) else {
            if let Some(mut record) = self.juli(text) {
                record.first_line = index;
                return Line::Start(record);
            }
            return match uncaught(text) {
                Some(mut record) => {
                    record.time_micros = own_time.or_else(|| {
                        wrapper_time
                            .and_then(|t| self.timestamp(t, b'/'))
                            .map(|(t, _)| t)
                    });
                    record.first_line = index;
                    Line::Start(record)
                }
                None => continuation(text),
            };
        };
        let time = own_time.or_else(|| {
            wrapper_time
                .and_then(|t| self.timestamp(t, b'/'))
                .map(|(t, _)| t)
        });
        let (mdc, message) = mdc(header.message);
        let mut record = Record {
            time_micros: time,
            level: Some(header.level),
            logger: header.logger.to_owned(),
            thread: header.thread.to_owned(),
            message: message.to_owned(),
            first_line: index,
            line_count: 1,
            ..Record::default()
        };
        if !header.cronjob.is_empty() {
            record
                .fields
                .insert("cronjob".to_owned(), header.cronjob.to_owned());
        }
        for (key, value) in mdc {
            // Datadog's `dd.trace_id` is a decimal number unless written as 32 hex digits:
            // 16 decimal digits are no 64-bit hex id.
            let id = record::trace_id(value).filter(|_| key != "dd.trace_id" || value.len() == 32);
            match id {
                Some(id) if is_trace_key(key) && record.trace_id.is_empty() => {
                    record.trace_id = id;
                }
                _ => {
                    record.fields.insert(key.to_owned(), value.to_owned());
                }
            }
        }
        if record.trace_id.is_empty()
            && let Some(id) = trace_token(message)
        {
            record.trace_id = id;
        }
        Line::Start(record)
    }

    /// Tomcat's own line (JULI's `OneLineFormatter`, Tomcat's console default, which
    /// Hybris's Tomcat writes between log4j lines): `28-Oct-2024 17:12:00.040 SEVERE
    /// [thread] org.apache.catalina.core.StandardWrapperValve.invoke text`, its time in this
    /// parser's zone, the source (class and method) as the logger; `None` for any other
    /// text.
    fn juli(&self, text: &str) -> Option<Record> {
        let b = text.as_bytes();
        if b.len() < 26 || b[2] != b'-' || b[6] != b'-' || b[11] != b' ' || b[24] != b' ' {
            return None;
        }
        let naive = NaiveDateTime::parse_from_str(&text[..24], "%d-%b-%Y %H:%M:%S%.3f").ok()?;
        let rest = &text[25..];
        let (word, rest) = rest.split_once(' ')?;
        let level = match word {
            "SEVERE" | "WARNING" | "INFO" | "CONFIG" | "FINE" | "FINER" | "FINEST" => {
                Level::parse(word)?
            }
            _ => return None,
        };
        let after = rest.strip_prefix('[')?;
        let end = thread_end(after)?;
        let (logger, message) = after
            .get(end + 2..)
            .unwrap_or_default()
            .split_once(' ')
            .unwrap_or((after.get(end + 2..).unwrap_or_default(), ""));
        Some(Record {
            time_micros: Some(
                self.local_seconds(naive) * 1_000_000
                    + i64::from(naive.and_utc().timestamp_subsec_micros()),
            ),
            level: Some(level),
            thread: after[..end].to_owned(),
            logger: logger.to_owned(),
            message: message.to_owned(),
            line_count: 1,
            ..Record::default()
        })
    }

    /// A JSON object as a record; `None` when the line is not a JSON object.
    fn json(&self, line: &str, index: usize) -> Option<Record> {
        let Ok(serde_json::Value::Object(object)) = serde_json::from_str(line) else {
            return None;
        };
        let mut record = Record {
            first_line: index,
            line_count: 1,
            ..Record::default()
        };
        let mut fields = Vec::new();
        let mut nested = Vec::new();
        for (key, value) in object {
            match value {
                // tracing's JSON without `flatten_event`: the event's fields nested, after
                // the top level's (an event's own `level = …` field is no level of its).
                serde_json::Value::Object(inner) if key == "fields" => {
                    nested.extend(inner.into_iter().map(|(key, value)| (key, value, true)));
                }
                value => fields.push((key, value, false)),
            }
        }
        fields.append(&mut nested);
        // The record's time: the first of these names, in this order (not the object's
        // key order), whose value reads as a time; the others stay fields.
        for name in TIME_KEYS {
            let Some(at) = fields.iter().position(|(key, ..)| key == name) else {
                continue;
            };
            let time = match &fields[at].1 {
                serde_json::Value::String(s) => self.any_time(s),
                // Epoch seconds (zap), milliseconds (pino), micro- or nanoseconds.
                serde_json::Value::Number(n) => n.as_f64().and_then(epoch_micros),
                _ => None,
            };
            if let Some(time) = time {
                record.time_micros = Some(time);
                fields.remove(at);
                break;
            }
        }
        for (key, value, nested) in fields {
            // pino's and bunyan's numeric levels (10 trace … 60 fatal).
            if let ("level", serde_json::Value::Number(n)) = (key.as_str(), &value)
                && record.level.is_none()
                && let Some(level) = n.as_u64().and_then(numeric_level)
            {
                record.level = Some(level);
                continue;
            }
            // A number is no hex trace id (`1234567890123456`, Datadog's decimal one).
            let string = value.is_string();
            let text = match value {
                serde_json::Value::String(s) => s,
                serde_json::Value::Null => continue,
                // Nested values (span lists, objects) stay JSON text.
                other => other.to_string(),
            };
            match key.as_str() {
                "level" | "severity" | "lvl"
                    if record.level.is_none() && Level::parse(&text).is_some() =>
                {
                    record.level = Level::parse(&text);
                }
                // The first of two names for the same part wins; the other stays a field.
                "message" | "msg" if record.message.is_empty() => record.message = text,
                "target" | "logger" | "logger_name" if record.logger.is_empty() => {
                    record.logger = text;
                }
                "threadName" | "thread" | "thread_name" if record.thread.is_empty() => {
                    record.thread = text;
                }
                // Our own services' panics write `backtrace`; ECS (`ecs-logging-java`)
                // writes `error.stack_trace`.
                "stack_trace" | "stacktrace" | "exception" | "backtrace" | "error.stack_trace"
                    if record.stack_trace.is_empty() =>
                {
                    record.stack_trace = text;
                }
                "trace_id" | "traceId" | "traceid"
                    if string
                        && record.trace_id.is_empty()
                        && record::trace_id(&text).is_some() =>
                {
                    record.trace_id = record::trace_id(&text).unwrap_or_default();
                }
                // A nested field does not replace the top level's of the same name: it is
                // kept under its path (`fields.order`).
                _ => {
                    let key = if nested && record.fields.contains_key(&key) {
                        format!("fields.{key}")
                    } else {
                        key
                    };
                    record.fields.entry(key).or_insert(text);
                }
            }
        }
        Some(record)
    }

    /// A time in any form a configured parser's or logfmt's time may take: log4j's and the
    /// wrapper's (`-` or `/` separators, an offset or this parser's zone), RFC 3339, an
    /// access log's `28/Oct/2024:17:12:00 +0900`, or epoch seconds (milliseconds above
    /// 10^11) with an optional fraction.
    ///
    /// The whole text must be the time: `2024-10-28 08:12:00.040 +0000` (Java's `Z` after a
    /// space; Go's `time.String()` adds ` UTC`) reads its offset, and anything else after a
    /// time makes it unreadable rather than read in the wrong zone.
    fn any_time(&self, text: &str) -> Option<i64> {
        let text = text.trim();
        for separator in [b'-', b'/'] {
            let Some((micros, used, own_offset)) = self.timestamp_parts(text, separator) else {
                continue;
            };
            let rest = text[used..].trim_start();
            if rest.is_empty() {
                return Some(micros);
            }
            if own_offset {
                // The offset said it; what follows may name the zone: Java's
                // `ZonedDateTime` (`…+09:00[Asia/Seoul]`) or an abbreviation (`… KST`).
                let zone = (rest.starts_with('[') && rest.ends_with(']') && !rest.contains(' '))
                    || (rest.len() <= 5 && rest.bytes().all(|b| b.is_ascii_alphabetic()));
                return zone.then_some(micros);
            }
            let mut words = rest.split_ascii_whitespace();
            let offset = words.next().unwrap_or_default();
            let abbreviation_only = words
                .next()
                .is_none_or(|a| a.len() <= 5 && a.bytes().all(|b| b.is_ascii_alphabetic()));
            if !abbreviation_only || words.next().is_some() {
                return None;
            }
            let offset = if offset.eq_ignore_ascii_case("UTC") || offset.eq_ignore_ascii_case("GMT")
            {
                "Z"
            } else {
                offset
            };
            let joined = format!("{}{offset}", &text[..used]);
            return match self.timestamp(&joined, separator) {
                // It read the offset, and nothing but it (the time had none of its own).
                Some((micros, read)) if read == joined.len() && read > used => Some(micros),
                _ => None,
            };
        }
        if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
            return Some(t.timestamp_micros());
        }
        if let Ok(t) = chrono::DateTime::parse_from_str(text, "%d/%b/%Y:%H:%M:%S %z") {
            return Some(t.timestamp_micros());
        }
        epoch_micros(text.parse().ok()?)
    }

    /// `yyyy<sep>MM<sep>dd[ T]HH:mm:ss`, then optionally a fraction (`.` or `,`, up to 9
    /// digits, kept to the microsecond) and an offset (`Z`, `±hh:mm`, `±hhmm`, `±hh`): microseconds
    /// since the epoch, and the bytes read. Without an offset the time is read in this
    /// parser's zone. A leap second (`:60`) is read as `:59`.
    fn timestamp(&self, text: &str, separator: u8) -> Option<(i64, usize)> {
        self.timestamp_parts(text, separator)
            .map(|(micros, used, _)| (micros, used))
    }

    /// [`Parser::timestamp`], and whether the text gave its own offset.
    fn timestamp_parts(&self, text: &str, separator: u8) -> Option<(i64, usize, bool)> {
        let b = text.as_bytes();
        if b.len() < 19
            || b[4] != separator
            || b[7] != separator
            || (b[10] != b' ' && b[10] != b'T')
            || b[13] != b':'
            || b[16] != b':'
        {
            return None;
        }
        let number = |range: std::ops::Range<usize>| -> Option<u32> {
            b.get(range)?.iter().try_fold(0_u32, |n, d| {
                d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
            })
        };
        let date = NaiveDate::from_ymd_opt(
            i32::try_from(number(0..4)?).ok()?,
            number(5..7)?,
            number(8..10)?,
        )?;
        let naive: NaiveDateTime =
            date.and_hms_opt(number(11..13)?, number(14..16)?, number(17..19)?.min(59))?;
        let mut used = 19;
        let mut micros = 0_i64;
        if matches!(b.get(19), Some(b'.' | b',')) && b.get(20).is_some_and(u8::is_ascii_digit) {
            used = 20;
            let mut scale = 100_000;
            while let Some(d) = b.get(used).filter(|d| d.is_ascii_digit()) {
                micros += i64::from(d - b'0') * scale;
                scale /= 10;
                used += 1;
            }
        }
        let offset_seconds = match b.get(used) {
            Some(b'Z') => {
                used += 1;
                Some(0)
            }
            Some(sign @ (b'+' | b'-')) => {
                let hours = number(used + 1..used + 3);
                let colon = usize::from(b.get(used + 3) == Some(&b':'));
                let minutes = number(used + 3 + colon..used + 5 + colon);
                // `±hh` alone (log4j2's `X` pattern) when no minutes follow.
                let hours_only = colon == 0 && !b.get(used + 3).is_some_and(u8::is_ascii_digit);
                match (hours, minutes) {
                    (Some(h), Some(m)) if h < 24 && m < 60 => {
                        used += 5 + colon;
                        let seconds = i64::from(h * 3_600 + m * 60);
                        Some(if *sign == b'-' { -seconds } else { seconds })
                    }
                    (Some(h), _) if h < 24 && hours_only => {
                        used += 3;
                        let seconds = i64::from(h * 3_600);
                        Some(if *sign == b'-' { -seconds } else { seconds })
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        let seconds = match offset_seconds {
            Some(offset) => naive.and_utc().timestamp() - offset,
            None => self.local_seconds(naive),
        };
        Some((seconds * 1_000_000 + micros, used, offset_seconds.is_some()))
    }

    /// `naive`, a time in this parser's zone, in seconds since the epoch. A time in a
    /// daylight-saving gap did not happen: it is read with the offset in force just before
    /// the gap (gaps are an hour or less everywhere but in historic corner cases, which
    /// fall back to UTC); a repeated hour is read as its first occurrence.
    fn local_seconds(&self, naive: NaiveDateTime) -> i64 {
        match self.zone.from_local_datetime(&naive).earliest() {
            Some(t) => t.timestamp(),
            None => {
                let hour = chrono::TimeDelta::hours(1);
                match self.zone.from_local_datetime(&(naive - hour)).earliest() {
                    Some(before) => (before + hour).timestamp(),
                    None => naive.and_utc().timestamp(),
                }
            }
        }
    }

    /// `text` read with a configured chrono `format` (whole, after trimming): with an
    /// offset when the format has one, else in this parser's zone; microseconds since the
    /// epoch.
    fn formatted_time(&self, text: &str, format: &str) -> Option<i64> {
        let text = text.trim();
        if let Ok(t) = chrono::DateTime::parse_from_str(text, format) {
            return Some(t.timestamp_micros());
        }
        let naive = NaiveDateTime::parse_from_str(text, format).ok()?;
        // Epoch seconds (`%s`) are UTC whatever the zone.
        let seconds = if format.contains("%s") {
            naive.and_utc().timestamp()
        } else {
            self.local_seconds(naive)
        };
        let micros = seconds * 1_000_000 + i64::from(naive.and_utc().timestamp_subsec_micros());
        (micros < MAX_MICROS).then_some(micros)
    }
}

/// The JVM's report of an exception nothing caught (`Exception in thread "main"
/// java.lang.OutOfMemoryError: Java heap space`, on stderr, no log4j header): a record of
/// its own at ERROR, its line the start of the stack trace, the thread named; `None` for
/// any other text.
fn uncaught(text: &str) -> Option<Record> {
    let rest = text.strip_prefix("Exception in thread \"")?;
    let (thread, _) = rest.split_once("\" ")?;
    Some(Record {
        level: Some(Level::Error),
        thread: thread.to_owned(),
        stack_trace: text.to_owned(),
        line_count: 1,
        ..Record::default()
    })
}

/// A JSON record's time, by the names structured loggers give it, in the order tried.
const TIME_KEYS: [&str; 4] = ["@timestamp", "timestamp", "time", "ts"];

/// An epoch time in microseconds from a number in seconds, milliseconds, microseconds or
/// nanoseconds, told apart by size (any of them is above the next unit's range for dates
/// after 1973 and before 5138); `None` for a number below 10^8 (before 1973 in seconds: a
/// duration or a count under a time's name, not a time), negative or not finite.
fn epoch_micros(number: f64) -> Option<i64> {
    if !number.is_finite() || number < 1e8 {
        return None;
    }
    let micros = if number > 1e17 {
        number / 1e3
    } else if number > 1e14 {
        number
    } else if number > 1e11 {
        number * 1e3
    } else {
        number * 1e6
    };
    // Past the year 9999 (what a protobuf Timestamp holds) it is no time anyone wrote.
    (micros < MAX_MICROS as f64).then(|| micros.round() as i64)
}

/// 10000-01-01T00:00:00Z in microseconds: no time read is at or after it.
const MAX_MICROS: i64 = 253_402_300_800_000_000;

/// pino's and bunyan's numeric levels: 10 trace, 20 debug, 30 info, 40 warn, 50 error,
/// 60 fatal (a number between two is the lower one's).
fn numeric_level(number: u64) -> Option<Level> {
    Some(match number {
        10..20 => Level::Trace,
        20..30 => Level::Debug,
        30..40 => Level::Info,
        40..50 => Level::Warn,
        50..60 => Level::Error,
        60..=100 => Level::Fatal,
        _ => return None,
    })
}

/// `record` with `line` as its message when it has none (a JSON object without a message
/// field): the Loki line then says what was written, with its `\u` escapes of printable
/// characters written out, so that the masks see `kim@example.com` where the line had
/// `kim\u0040example.com`.
fn with_message(mut record: Record, line: &str) -> Record {
    if record.message.is_empty() {
        record.message = formats::printable_escapes_written_out(line, false).into_owned();
    }
    record
}

/// The source time zone named `name` (IANA, such as `Asia/Seoul`).
///
/// # Errors
/// When no zone has that name.
pub fn zone(name: &str) -> Result<Tz, String> {
    Tz::from_str(name).map_err(|_| format!("{name:?} is not an IANA time zone name"))
}

/// The Tanuki wrapper's columns before the logged text.
#[derive(Debug)]
struct WrapperPrefix<'a> {
    /// The level column (`L`), when the format writes one.
    level: Option<&'a str>,
    /// The source column (`P`): `wrapper`, `wrapperp`, `wrapperm` or `jvm 1`; empty when
    /// the format writes none (a format not read).
    source: &'a str,
    /// The time column (`T` or `Z`), when the format writes one.
    time: Option<&'a str>,
    rest: &'a str,
}

/// The wrapper's columns at the start of `line`, as its logger writes them
/// (`wrapper.logfile.format` and `wrapper.console.format`): one column per letter of the
/// format, in the format's order, each of a fixed width (`INFO  `, `jvm 1   `, `main   `,
/// `2024/10/28 17:12:00.040`, `     123`), ` | ` after each, then the text: the log file's
/// default `LPTM`, `LPDZM` as the mall's servers write it, the console's default `PM`,
/// `PTM`, `LPM`, and the columns `Q`, `U`, `R`, `G`, and the process ids `W` and `J` too
/// (`%7d`, wider for a longer id, or `-------`; before the source any number: other
/// number columns after the source are not read, see [`starts_with_a_number_column`]).
/// Each kind of column is read once (the three `%8d` columns `U`, `R`, `G` up to three
/// times, the process ids up to two), so text that looks like a column the line already
/// had (`INFO   | …` written by the JVM after the wrapper's level) stays text.
/// `None` without a level, source or time column; a prefix without a source (`LTM`, `TM`)
/// is a format not read.
fn wrapper_prefix(line: &str) -> Option<WrapperPrefix<'_>> {
    // Hand-written rather than a regular expression: a few short columns, on every line of
    // every legacy server (the hot path); the text after them is never scanned.
    let mut prefix = WrapperPrefix {
        level: None,
        source: "",
        time: None,
        rest: line,
    };
    let (mut thread, mut queued, mut counters, mut pids) = (false, false, 0, 0);
    loop {
        let rest = prefix.rest;
        // The widest column is the time with milliseconds, 23 bytes.
        let window = &rest.as_bytes()[..rest.len().min(25)];
        let Some(bar) = window.iter().position(|&b| b == b'|') else {
            break;
        };
        if bar == 0 || window[bar - 1] != b' ' {
            break;
        }
        let next = match rest.as_bytes().get(bar + 1) {
            Some(b' ') => &rest[bar + 2..],
            None => "",
            Some(_) => break,
        };
        let column = &rest[..bar - 1];
        match column.len() {
            6 if prefix.level.is_none()
                && matches!(
                    column.trim_end(),
                    "DEBUG" | "INFO" | "STATUS" | "WARN" | "ERROR" | "FATAL" | "ADVICE" | "NOTICE"
                ) =>
            {
                prefix.level = Some(column.trim_end());
            }
            7 if !thread
                && matches!(
                    column.trim_end(),
                    "signal" | "main" | "srvmain" | "timer" | "javaio" | "startup" | "unknown"
                ) =>
            {
                thread = true;
            }
            19 | 23 if prefix.time.is_none() && is_wrapper_time(column) => {
                prefix.time = Some(column);
            }
            1 if !queued && (column == "Q" || column == " ") => queued = true,
            // Uptime, quiet time and lag: `%8d`, or `--------` and blanks.
            8 if counters < 3 && is_wrapper_counter(column) => counters += 1,
            // The process ids (`W`, `J`): `%*d` at least 7 wide, `-------` for the JVM's
            // while none runs; before the source (no text of the JVM's there), any number.
            1..=10 if pids < 2 && is_process_id(column, prefix.source.is_empty()) => pids += 1,
            _ if prefix.source.is_empty() && is_wrapper_source(column) => {
                prefix.source = column.trim_end();
            }
            _ => break,
        }
        prefix.rest = next;
    }
    (!prefix.source.is_empty() || prefix.level.is_some() || prefix.time.is_some()).then_some(prefix)
}

/// `wrapper `, `wrapperp`, `wrapperm` (the wrapper's own lines), or `jvm ` and the JVM's
/// number, left-aligned in 4.
fn is_wrapper_source(column: &str) -> bool {
    match column.strip_prefix("jvm ") {
        Some(number) => {
            let digits = number.trim_end_matches(' ');
            !digits.is_empty()
                && digits.bytes().all(|b| b.is_ascii_digit())
                && (number.len() == 4 || (digits.len() == number.len() && digits.len() > 4))
        }
        None => matches!(column, "wrapper " | "wrapperp" | "wrapperm"),
    }
}

/// `%8d` (right-aligned; the quiet time negative when the clock went back), `--------`
/// (uptime past a year) or blanks (no quiet time yet).
fn is_wrapper_counter(column: &str) -> bool {
    let number = column.trim_start_matches(' ');
    let digits = number.strip_prefix('-').unwrap_or(number);
    column == "--------"
        || number.is_empty()
        || (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `text` starts with a column of digits, up to 10 wide, and ` | `: after the
/// source, one [`wrapper_prefix`] did not read as a process id (not right-aligned at
/// least 7 wide: a format not known).
fn starts_with_a_number_column(text: &str) -> bool {
    let b = text.as_bytes();
    let Some(bar) = b.iter().take(12).position(|&c| c == b'|') else {
        return false;
    };
    bar >= 2
        && b[bar - 1] == b' '
        && b.get(bar + 1).is_none_or(|&c| c == b' ')
        && b[..bar - 1].iter().any(u8::is_ascii_digit)
        && b[..bar - 1]
            .iter()
            .all(|c| c.is_ascii_digit() || *c == b' ')
}

/// A process id column as the wrapper writes it (`wrapperLogFormatPrint` in its wrapper.c):
/// `%*d`, 7 wide unless the id is longer, or `-------` (the JVM's, while none runs). `any`:
/// any number, padded on either side or not.
fn is_process_id(column: &str, any: bool) -> bool {
    if column == "-------" {
        return true;
    }
    let digits = if any {
        column.trim_matches(' ')
    } else if column.len() >= 7 {
        column.trim_start_matches(' ')
    } else {
        return false;
    };
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// `yyyy/MM/dd HH:mm:ss`, with `.SSS` or without.
fn is_wrapper_time(column: &str) -> bool {
    let b = column.as_bytes();
    b.len() >= 19
        && b[4] == b'/'
        && b[7] == b'/'
        && b[10] == b' '
        && b[13] == b':'
        && b[16] == b':'
        && (b.len() == 19 || b[19] == b'.')
        && b.iter()
            .enumerate()
            .all(|(i, c)| matches!(i, 4 | 7 | 10 | 13 | 16 | 19) || c.is_ascii_digit())
}

/// A log4j header's parts.
#[derive(Debug)]
struct Log4jHeader<'a> {
    level: Level,
    thread: &'a str,
    /// Hybris's `(%X{CronJob})` before the logger: the cron job the line was written by.
    cronjob: &'a str,
    logger: &'a str,
    message: &'a str,
}

/// `LEVEL [thread] [Logger] message` (the level padded with spaces on either side, as
/// `%-5p` and `%5p` write it; the logger optional).
fn log4j_header(text: &str) -> Option<Log4jHeader<'_>> {
    // `%5p` right-aligns: ` INFO`, ` WARN`.
    let padded = text.len() - text.trim_start_matches(' ').len();
    let text = text.get(padded.min(4)..)?;
    let word_end = text.find(|c: char| !c.is_ascii_alphabetic())?;
    let level = Level::parse_strict(&text[..word_end])?;
    let after = text[word_end..].trim_start_matches(' ');
    if after.len() == text.len() - word_end {
        return None; // no space after the level
    }
    let after = after.strip_prefix('[')?;
    let thread_end = thread_end(after)?;
    let thread = &after[..thread_end];
    let after = after.get(thread_end + 2..).unwrap_or_default();
    // Hybris's pattern writes its cron job context in parentheses before the logger:
    // `[thread] (update-backofficeIndex-CronJob) [SolrIndexerJob] text`.
    let (cronjob, after) = match after.strip_prefix('(').and_then(|c| c.split_once(") [")) {
        Some((cronjob, rest)) if !cronjob.contains(['(', ')']) => {
            (cronjob, &after[after.len() - rest.len() - 1..])
        }
        _ => ("", after),
    };
    let (logger, message) = match after.strip_prefix('[').and_then(|l| {
        let end = l.find(']')?;
        Some((
            &l[..end],
            l[end + 1..].strip_prefix(' ').unwrap_or(&l[end + 1..]),
        ))
    }) {
        Some(parts) => parts,
        None => ("", after),
    };
    Some(Log4jHeader {
        level,
        thread,
        cronjob,
        logger,
        message,
    })
}

/// Where the thread name at the start of `after` (just past its `[`) ends: at the `]` that
/// closes it (brackets inside it balanced, as in WebLogic's `[ACTIVE] ExecuteThread: '1'`)
/// followed by a space or the end; else at the first `] `.
fn thread_end(after: &str) -> Option<usize> {
    let mut depth = 1_usize;
    for (i, byte) in after.bytes().enumerate() {
        match byte {
            b'[' => depth += 1,
            b']' => {
                depth -= 1;
                if depth == 0 {
                    let next = after.as_bytes().get(i + 1);
                    if next.is_none_or(|b| *b == b' ') {
                        return Some(i);
                    }
                    break;
                }
            }
            _ => {}
        }
    }
    after
        .find("] ")
        .or_else(|| after.strip_suffix(']').map(str::len))
}

/// A log4j MDC map at the start of a message, as log4j2's `%X` writes it (`{key=value,
/// key=value} text`) holding a trace id: its pairs and the message after it (an empty one,
/// `{}`, is left out too). A message not starting with one comes back whole: `{pk}` or JSON
/// text is not a map of `key=value`, and a map without a trace key may be the text itself
/// (Java's `Map.toString()` has the same shape: `{orderCode=8812}`).
fn mdc(message: &str) -> (Vec<(&str, &str)>, &str) {
    let whole = (Vec::new(), message);
    let Some(inner) = message.strip_prefix('{') else {
        return whole;
    };
    let Some(end) = inner.find('}') else {
        return whole;
    };
    let rest = &inner[end + 1..];
    let rest = rest.strip_prefix(' ').unwrap_or(rest);
    let body = &inner[..end];
    if body.is_empty() {
        // `%X` with nothing in the MDC: no trace id, nothing for the text.
        return (Vec::new(), rest);
    }
    let mut pairs = Vec::new();
    for pair in body.split(", ") {
        let Some((key, value)) = pair.split_once('=') else {
            return whole;
        };
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return whole;
        }
        pairs.push((key, value));
    }
    if !pairs.iter().any(|(key, _)| is_trace_key(key)) {
        return whole;
    }
    (pairs, rest)
}

/// Whether an MDC key names the trace id (as OpenTelemetry's, Sleuth's, Datadog's and
/// our own instrumentation put it there).
fn is_trace_key(key: &str) -> bool {
    matches!(
        key,
        "trace_id"
            | "traceId"
            | "traceid"
            | "trace-id"
            | "TraceId"
            | "X-B3-TraceId"
            | "dd.trace_id"
    )
}

/// A trace id written into the text as `trace_id=…` or `traceId=…` (or with `:`), 32 or 16
/// hex digits standing alone ([`record::trace_id`]).
fn trace_token(text: &str) -> Option<String> {
    for (at, _) in text.match_indices("race") {
        let Some(key_start) = at.checked_sub(1) else {
            continue;
        };
        let after = &text[at + 4..];
        let value = ["_id=", "Id=", "_id: ", "Id: ", "_id:", "Id:"]
            .iter()
            .find_map(|sep| after.strip_prefix(sep));
        let Some(value) = value else {
            continue;
        };
        if !matches!(text.as_bytes()[key_start], b't' | b'T')
            // Part of a longer key (`entrace_id`, `parent_trace_id`, `span.trace_id`).
            || key_start.checked_sub(1).is_some_and(|b| {
                let b = text.as_bytes()[b];
                b.is_ascii_alphanumeric() || b == b'_' || b == b'.'
            })
        {
            continue;
        }
        // The word after the key: a trace id when it is one whole.
        let word = value
            .bytes()
            .take(33)
            .take_while(u8::is_ascii_alphanumeric)
            .count();
        if let Some(id) = record::trace_id(&value[..word]) {
            return Some(id);
        }
    }
    None
}

/// A line a configured expression does not match: it joins the record before it (stack
/// trace, or a message's next line); one that is not stack trace is counted as not parsed,
/// so an expression that matches too little shows in `parse_errors` rather than merging
/// lines unseen.
fn unmatched(line: &str) -> Line<'_> {
    match continuation(line) {
        Line::Continue { text, stack, .. } => Line::Continue {
            text,
            stack,
            unparsed: !stack,
        },
        start => start,
    }
}

/// A line that joins the record before it; stack trace or not.
fn continuation(text: &str) -> Line<'_> {
    Line::Continue {
        text,
        stack: is_stack(text),
        unparsed: false,
    }
}

/// Whether `text` is a line of a Java stack trace: a frame (`\tat …`), `Caused by:`,
/// `Suppressed:`, `... N more` (or logback's `... N common frames omitted`), or an
/// exception line (`java.lang.IllegalStateException: …`, or the JVM's `Exception in thread
/// "main" java.lang.…` for an uncaught one).
pub fn is_stack(text: &str) -> bool {
    let trimmed = text.trim_start();
    let indented = trimmed.len() < text.len();
    (indented && trimmed.starts_with("at "))
        || trimmed.starts_with("Caused by:")
        || trimmed.starts_with("Exception in thread \"")
        || trimmed.starts_with("Suppressed:")
        || (trimmed.starts_with("... ")
            && trimmed[4..].starts_with(|c: char| c.is_ascii_digit())
            && (trimmed.ends_with(" more") || trimmed.ends_with("frames omitted")))
        || is_exception_line(trimmed)
}

/// `qualified.ClassName` alone or followed by `: message`, where the class is a Java
/// name with at least one package and its simple name says Exception, Error or Throwable
/// (or a message follows).
pub fn is_exception_line(text: &str) -> bool {
    let name_end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '$'))
        .unwrap_or(text.len());
    let name = &text[..name_end];
    let rest = &text[name_end..];
    let Some(dot) = name.rfind('.') else {
        return false;
    };
    if dot == 0 || name.ends_with('.') || !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return false;
    }
    // A thread dump's `java.lang.Thread.State: RUNNABLE` names no exception: the dump goes on
    // in the record it is part of, not counted as an exception in each of its threads.
    if name == "java.lang.Thread.State" {
        return false;
    }
    let simple = &name[dot + 1..];
    let throwable = ["Exception", "Error", "Throwable"]
        .iter()
        .any(|word| simple.contains(word));
    (rest.is_empty() && throwable)
        || (rest.starts_with(": ")
            && (throwable || simple.starts_with(|c: char| c.is_ascii_uppercase())))
        // SAXParseException's own toString: `org.xml.sax.SAXParseException; lineNumber: 1; …`
        || (rest.starts_with("; ") && throwable)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEOUL: Tz = chrono_tz::Asia::Seoul;

    fn start(line: Line<'_>) -> Record {
        match line {
            Line::Start(record) | Line::Aside { record, .. } => record,
            other => panic!("not a record start: {other:?}"),
        }
    }

    /// 2024-10-28 17:12:00.040 in Seoul (UTC+9) is 08:12:00.040 UTC.
    const SEOUL_MICROS: i64 = 1_730_103_120_040_000;

    #[test]
    fn a_wrapper_line_is_read_with_its_log4j_part_in_the_source_zone() {
        let parser = Parser::new(Format::Wrapper, SEOUL);
        let record = start(parser.line(
            "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | ERROR [hybrisHTTP12] [DefaultCartService] cart 8812 failed",
            3,
        ));
        assert_eq!(record.time_micros, Some(SEOUL_MICROS));
        assert_eq!(record.level, Some(Level::Error));
        assert_eq!(record.thread, "hybrisHTTP12");
        assert_eq!(record.logger, "DefaultCartService");
        assert_eq!(record.message, "cart 8812 failed");
        assert_eq!((record.first_line, record.line_count), (3, 1));
        assert!(!record.parse_error);
    }

    #[test]
    fn a_wrapper_line_without_the_thread_column_is_read_too() {
        let parser = Parser::new(Format::Wrapper, chrono_tz::UTC);
        let record = start(parser.line(
            "INFO   | jvm 1    | 2024/10/28 17:12:00.040 | WARN  [main] [X] slow",
            0,
        ));
        assert_eq!(record.level, Some(Level::Warn));
        assert_eq!(record.time_micros, Some(SEOUL_MICROS + 9 * 3_600_000_000));
    }

    #[test]
    fn stack_lines_with_the_wrapper_prefix_continue_the_record() {
        let parser = Parser::new(Format::Wrapper, SEOUL);
        let prefix = "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | ";
        for (text, stack) in [
            (
                "java.lang.IllegalStateException: Cart 1 is in an inconsistent state",
                true,
            ),
            (
                "\tat de.hybris.platform.core.PK.fromLong(PK.java:120)",
                true,
            ),
            ("Caused by: java.io.IOException: Broken pipe", true),
            ("\t... 12 more", true),
            ("\tSuppressed: java.lang.RuntimeException: x", true),
            ("a message printed with System.out", false),
        ] {
            assert_eq!(
                parser.line(&format!("{prefix}{text}"), 1),
                Line::Continue {
                    text,
                    stack,
                    unparsed: false
                },
                "{text:?}"
            );
            // Without the prefix (Fluent Bit's default java multiline input) as well.
            assert_eq!(
                parser.line(text, 1),
                Line::Continue {
                    text,
                    stack,
                    unparsed: false
                },
                "{text:?}"
            );
        }
    }

    /// The wrapper's other formats: its console's default `PM`, `PTM`, `LPM`, the thread
    /// column without a time, the columns `Q`, `U`, `R`, `G` around the time, the process
    /// ids `W`, `J`; in `auto` too.
    #[test]
    fn the_wrappers_other_formats_are_read() {
        for format in [Format::Wrapper, Format::Auto] {
            let parser = Parser::new(format, SEOUL);
            for (line, time) in [
                (
                    "jvm 1    | ERROR [hybrisHTTP12] [DefaultCartService] cart 8812 failed",
                    None,
                ),
                (
                    "INFO   | jvm 1    | ERROR [hybrisHTTP12] [DefaultCartService] cart 8812 failed",
                    None,
                ),
                (
                    "jvm 12345 | ERROR [hybrisHTTP12] [DefaultCartService] cart 8812 failed",
                    None,
                ),
                (
                    "jvm 1    | 2024/10/28 17:12:00 | ERROR [hybrisHTTP12] [DefaultCartService] cart 8812 failed",
                    Some(SEOUL_MICROS - 40_000),
                ),
                (
                    "INFO   | jvm 1    | main    | Q | 2024/10/28 17:12:00.040 |      123 |          |       17 | ERROR [hybrisHTTP12] [DefaultCartService] cart 8812 failed",
                    Some(SEOUL_MICROS),
                ),
                (
                    "2024/10/28 17:12:00.040 | -------- | jvm 1    | ERROR [hybrisHTTP12] [DefaultCartService] cart 8812 failed",
                    Some(SEOUL_MICROS),
                ),
                // The quiet time is negative when the clock went back.
                (
                    "INFO   | jvm 1    |      -12 | 2024/10/28 17:12:00.040 | ERROR [hybrisHTTP12] [DefaultCartService] cart 8812 failed",
                    Some(SEOUL_MICROS),
                ),
                // The process ids (`%7d`; longer for a longer id): `WLPZM`, `LWJPM`, `LPJZM`;
                // before the source, any number is one.
                (
                    "  12345 | INFO   | jvm 1    | 2024/10/28 17:12:00.040 | ERROR [hybrisHTTP12] [DefaultCartService] cart 8812 failed",
                    Some(SEOUL_MICROS),
                ),
                (
                    "INFO   |    4242 | 1234567 | jvm 1    | ERROR [hybrisHTTP12] [DefaultCartService] cart 8812 failed",
                    None,
                ),
                (
                    "INFO   | jvm 1    |   12345 | 2024/10/28 17:12:00.040 | ERROR [hybrisHTTP12] [DefaultCartService] cart 8812 failed",
                    Some(SEOUL_MICROS),
                ),
                (
                    "12 | INFO   | jvm 1    | ERROR [hybrisHTTP12] [DefaultCartService] cart 8812 failed",
                    None,
                ),
            ] {
                let record = start(parser.line(line, 1));
                assert_eq!(
                    (
                        record.level,
                        record.thread.as_str(),
                        record.logger.as_str(),
                        record.message.as_str(),
                        record.time_micros,
                        record.parse_error
                    ),
                    (
                        Some(Level::Error),
                        "hybrisHTTP12",
                        "DefaultCartService",
                        "cart 8812 failed",
                        time,
                        false
                    ),
                    "{line:?}"
                );
            }
            for line in [
                "jvm 1    | \tat a.B.c(B.java:1)",
                "INFO   | jvm 12   | main    | \tat a.B.c(B.java:1)",
            ] {
                assert_eq!(
                    parser.line(line, 1),
                    Line::Continue {
                        text: "\tat a.B.c(B.java:1)",
                        stack: true,
                        unparsed: false
                    },
                    "{line:?}"
                );
            }
            // The wrapper's own lines, its protocol's (`wrapperp`) too: records of their own;
            // the JVM's text after them is new, but for the lines that pass.
            for (line, level, message, new_text) in [
                (
                    "wrapper  | Launching a JVM...",
                    None,
                    "Launching a JVM...",
                    true,
                ),
                (
                    "STATUS | wrapper  | Launching a JVM...",
                    Some(Level::Info),
                    "Launching a JVM...",
                    true,
                ),
                // The JVM's process id while none runs.
                (
                    "------- | STATUS | wrapper  | Launching a JVM...",
                    Some(Level::Info),
                    "Launching a JVM...",
                    true,
                ),
                (
                    "STATUS | wrapper  | ------- | 2024/10/28 17:12:00 | Launching a JVM...",
                    Some(Level::Info),
                    "Launching a JVM...",
                    true,
                ),
                (
                    "DEBUG  | wrapperp | 2024/10/28 17:12:00 | send a packet PING : ping",
                    Some(Level::Debug),
                    "send a packet PING : ping",
                    false,
                ),
                (
                    "DEBUG  | wrapper  | 2024/10/28 17:12:00 | read a packet PING : ping",
                    Some(Level::Debug),
                    "read a packet PING : ping",
                    false,
                ),
                (
                    "STATUS | wrapper  | 2024/10/28 17:12:00 | Pinging the JVM took 12 seconds to respond.",
                    Some(Level::Info),
                    "Pinging the JVM took 12 seconds to respond.",
                    false,
                ),
                (
                    "INFO   | wrapper  | 2024/10/28 17:12:00 | Wrapper Process has not received any CPU time for 31 seconds.  Extending timeouts.",
                    Some(Level::Info),
                    "Wrapper Process has not received any CPU time for 31 seconds.  Extending timeouts.",
                    false,
                ),
                (
                    "ERROR  | wrapper  | 2024/10/28 17:12:00 | JVM appears hung: Timed out waiting for signal from JVM.",
                    Some(Level::Error),
                    "JVM appears hung: Timed out waiting for signal from JVM.",
                    true,
                ),
            ] {
                let Line::Aside { record, interrupts } = parser.line(line, 1) else {
                    panic!("not the wrapper's: {line:?}");
                };
                assert_eq!(
                    (
                        record.logger.as_str(),
                        record.level,
                        record.message.as_str(),
                        interrupts
                    ),
                    ("wrapper", level, message, new_text),
                    "{line:?}"
                );
            }
            // Text that merely has bars, or columns of another width, is no wrapper line; a
            // column the JVM wrote after the wrapper's is text (each column is read once).
            for (line, text) in [
                ("a message | with | bars", "a message | with | bars"),
                (
                    "INFO | jvm x | not the wrapper's",
                    "INFO | jvm x | not the wrapper's",
                ),
                ("INFO | jvm 1 | main | text", "INFO | jvm 1 | main | text"),
                (
                    "INFO   | jvm 1    | 2024/10/28 17:12:00 | INFO   | jvm 1    | text",
                    "INFO   | jvm 1    | text",
                ),
            ] {
                assert_eq!(
                    parser.line(line, 1),
                    Line::Continue {
                        text,
                        stack: false,
                        unparsed: false
                    },
                    "{line:?}"
                );
            }
        }
        // The wrapper's time without its source (`LTM`, `TM`): not read, and says so; a
        // number column after the source not written as a process id (right-aligned, at
        // least 7 wide) too; and the level alone (`LM`) where the parser is the wrapper's
        // (in `auto`, text).
        for format in [Format::Wrapper, Format::Auto] {
            let wrappers = matches!(format, Format::Wrapper);
            let parser = Parser::new(format, SEOUL);
            assert_eq!(
                parser.line(
                    "INFO   | jvm 1    | 12345 | 2024/10/28 17:12:00 | ERROR [t] [X] boom",
                    1
                ),
                Line::Continue {
                    text: "12345 | 2024/10/28 17:12:00 | ERROR [t] [X] boom",
                    stack: false,
                    unparsed: true
                }
            );
            // Left-aligned, it is no process id of the wrapper's either.
            assert_eq!(
                parser.line("INFO   | jvm 1    | 12345   | boom", 1),
                Line::Continue {
                    text: "12345   | boom",
                    stack: false,
                    unparsed: true
                }
            );
            let level_alone = "INFO   | ERROR [hybrisHTTP12] [DefaultCartService] failed";
            assert_eq!(
                parser.line(level_alone, 1),
                Line::Continue {
                    text: level_alone,
                    stack: false,
                    unparsed: wrappers
                }
            );
            for line in [
                "INFO   | 2024/10/28 17:12:00 | ERROR [hybrisHTTP12] [DefaultCartService] failed",
                "2024/10/28 17:12:00.040 | \tat a.B.c(B.java:1)",
            ] {
                assert_eq!(
                    parser.line(line, 1),
                    Line::Continue {
                        text: line,
                        stack: false,
                        unparsed: true
                    },
                    "{line:?}"
                );
            }
        }
        // A trace written through the console's format is one record, no parse error.
        let records = crate::multiline::group_all(
            &Parser::new(Format::Wrapper, SEOUL),
            crate::multiline::Caps {
                lines: 100,
                bytes: 10_000,
            },
            [
                "jvm 1    | ERROR [hybrisHTTP12] [DefaultCartService] cart 8812 failed",
                "jvm 1    | java.lang.IllegalStateException: no cart",
                "jvm 1    | \tat a.B.c(B.java:1)",
                "wrapper  | Pinging the JVM...",
                "jvm 1    | \tat a.B.d(B.java:2)",
                "jvm 1    | INFO  [main] [X] two",
            ],
        );
        let got: Vec<_> = records
            .iter()
            .map(|r| {
                (
                    r.logger.as_str(),
                    r.stack_trace.lines().count(),
                    r.parse_error,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("DefaultCartService", 3, false),
                ("wrapper", 0, false),
                ("X", 0, false)
            ],
            "{records:?}"
        );
    }

    #[test]
    fn the_wrappers_own_lines_are_records_of_their_own() {
        let parser = Parser::new(Format::Wrapper, SEOUL);
        let record = start(parser.line(
            "STATUS | wrapper  | 2024/10/28 17:12:00 | --> Wrapper Started as Daemon",
            0,
        ));
        assert_eq!(record.logger, "wrapper");
        assert_eq!(record.level, Some(Level::Info));
        assert_eq!(record.message, "--> Wrapper Started as Daemon");
    }

    #[test]
    fn tomcats_own_lines_start_records_between_log4j_ones() {
        let parser = Parser::new(Format::Wrapper, SEOUL);
        let record = start(parser.line(
            "INFO   | jvm 1    | main    | 2024/10/28 17:12:01.000 | 28-Oct-2024 17:12:00.040 SEVERE [hybrisHTTP5] org.apache.catalina.core.StandardWrapperValve.invoke Servlet.service() for servlet [DispatcherServlet] threw exception",
            0,
        ));
        assert_eq!(record.time_micros, Some(SEOUL_MICROS), "Tomcat's own time");
        assert_eq!(record.level, Some(Level::Error));
        assert_eq!(record.thread, "hybrisHTTP5");
        assert_eq!(
            record.logger,
            "org.apache.catalina.core.StandardWrapperValve.invoke"
        );
        assert_eq!(
            record.message,
            "Servlet.service() for servlet [DispatcherServlet] threw exception"
        );
        let bare = Parser::new(Format::Auto, SEOUL);
        let record = start(bare.line(
            "28-Oct-2024 17:12:00.040 CONFIG [main] org.apache.catalina.startup.Catalina.load x",
            0,
        ));
        assert_eq!(record.level, Some(Level::Debug));
        // Not a JULI level: text.
        assert!(matches!(
            bare.line("28-Oct-2024 17:12:00.040 HELLO [main] a.B x", 0),
            Line::Continue { .. }
        ));
    }

    #[test]
    fn a_cron_jobs_context_before_the_logger_is_a_field() {
        let parser = Parser::new(Format::Wrapper, SEOUL);
        let record = start(parser.line(
            "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | INFO  [update-backofficeIndex-CronJob::de.hybris.platform.servicelayer.internal.jalo.ServicelayerJob] (update-backofficeIndex-CronJob) [SolrIndexerJob] Started indexer cronjob.",
            0,
        ));
        assert_eq!(record.logger, "SolrIndexerJob");
        assert_eq!(record.message, "Started indexer cronjob.");
        assert_eq!(record.fields["cronjob"], "update-backofficeIndex-CronJob");
        // Parentheses that are the message's own stay in it.
        let record = start(parser.line(
            "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | INFO  [main] (not closed [X] y",
            0,
        ));
        assert_eq!(record.message, "(not closed [X] y");
    }

    #[test]
    fn a_bare_log4j_line_with_and_without_its_own_time() {
        let parser = Parser::new(Format::Log4j, SEOUL);
        let record = start(parser.line(
            "2024-10-28 17:12:00,040 INFO  [main] [de.hybris.Foo] started",
            0,
        ));
        assert_eq!(record.time_micros, Some(SEOUL_MICROS));
        assert_eq!(record.logger, "de.hybris.Foo");
        assert_eq!(record.message, "started");
        let record = start(parser.line("DEBUG [main] no logger here", 0));
        assert_eq!(record.time_micros, None);
        assert_eq!(
            (record.thread.as_str(), record.logger.as_str()),
            ("main", "")
        );
        assert_eq!(record.message, "no logger here");
        assert!(matches!(
            parser.line("INFO has no thread", 0),
            Line::Continue { stack: false, .. }
        ));
    }

    #[test]
    fn json_lines_of_our_own_services() {
        let parser = Parser::new(Format::Auto, SEOUL);
        let record = start(parser.line(
            r#"{"timestamp":"2026-12-03T08:00:12.345678Z","level":"WARN","message":"a delivery round failed; retrying","target":"member_export::deliver","error":"timeout","trace_id":"4BF92F3577B34DA6A3CE929D0E0E4736","attempt":3,"threadName":"tokio-runtime-worker"}"#,
            0,
        ));
        assert_eq!(record.time_micros, Some(1_796_284_812_345_678));
        assert_eq!(record.level, Some(Level::Warn));
        assert_eq!(record.message, "a delivery round failed; retrying");
        assert_eq!(record.logger, "member_export::deliver");
        assert_eq!(record.thread, "tokio-runtime-worker");
        assert_eq!(record.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(record.fields["error"], "timeout");
        assert_eq!(record.fields["attempt"], "3");
        // In auto mode a line that only starts with `{` is not a record of its own.
        assert!(matches!(parser.line("{not json", 4), Line::Continue { .. }));
        assert!(matches!(
            parser.line(r#"{"orderId":1}"#, 4),
            Line::Continue { .. }
        ));
        let json = Parser::new(Format::Json, SEOUL);
        let broken = start(json.line("{not json", 4));
        assert!(broken.parse_error);
        assert_eq!(broken.message, "{not json");
    }

    #[test]
    fn chosen_per_line_access_log_lines_are_records_with_their_fields() {
        let parser = Parser::new(Format::Auto, SEOUL);
        let line = r#"10.0.0.1 - - [28/Oct/2024:17:12:00 +0900] "GET /cart HTTP/1.1" 500 12 45"#;
        let record = start(parser.line(line, 3));
        assert_eq!(record.level, Some(Level::Error));
        assert_eq!(record.fields["status"], "500");
        assert_eq!(record.fields["method"], "GET");
        assert_eq!(record.time_micros, Some(1_730_103_120_000_000));
        // Every line of an access log is a record of its own, never a continuation.
        assert!(matches!(parser.line(line, 4), Line::Start(_)));
        // A stack line quoting something is still a continuation.
        assert!(matches!(
            parser.line("\tat x.Y.z(\"Y.java\" 12)", 5),
            Line::Continue { .. }
        ));
    }

    #[test]
    fn a_local_time_in_a_daylight_saving_gap_is_read_with_the_offset_before_it() {
        let parser = Parser::new(Format::Log4j, chrono_tz::Europe::Berlin);
        // 2024-03-31 02:30 did not happen in Berlin (02:00 CET became 03:00 CEST).
        let record = start(parser.line("2024-03-31 02:30:00,000 INFO  [main] x", 0));
        assert_eq!(record.time_micros, Some(1_711_848_600_000_000)); // 01:30 UTC
    }

    #[test]
    fn epoch_numbers_in_any_unit() {
        let micros = 1_730_103_120_123_456;
        assert_eq!(epoch_micros(1_730_103_120.123_456), Some(micros));
        assert_eq!(epoch_micros(1_730_103_120_123.0), Some(micros - 456));
        assert_eq!(epoch_micros(1_730_103_120_123_456.0), Some(micros));
        // Rounded to the nearest microsecond (a float of seconds is rarely exact).
        assert_eq!(epoch_micros(1_730_103_120_123_456_789.0), Some(micros + 1));
        assert_eq!(epoch_micros(1_730_103_120_123_456_189.0), Some(micros));
        assert_eq!(epoch_micros(0.0), None);
        // A duration or a count under a time's name is no time.
        assert_eq!(epoch_micros(250.0), None);
        assert_eq!(epoch_micros(99_999_999.0), None);
        assert_eq!(epoch_micros(f64::NAN), None);
    }

    #[test]
    fn a_time_is_read_whole_or_not_at_all() {
        let parser = Parser::new(Format::Json, SEOUL);
        let utc = 1_730_103_120_040_000;
        for (time, expected) in [
            // An offset after a space (Java's `yyyy-MM-dd HH:mm:ss.SSS Z`), Go's
            // `time.String()` with its zone's abbreviation, a bare `UTC`.
            ("2024-10-28 08:12:00.040 +0000", Some(utc)),
            ("2024-10-28 08:12:00.040 +0000 UTC", Some(utc)),
            ("2024-10-28 17:12:00.040 +09:00 KST", Some(utc)),
            ("2024-10-28 08:12:00.040 UTC", Some(utc)),
            // Java's `ZonedDateTime`, and an offset followed by its zone's abbreviation.
            ("2024-10-28T17:12:00.040+09:00[Asia/Seoul]", Some(utc)),
            ("2024-10-28T17:12:00.040+09:00 KST", Some(utc)),
            ("2024-10-28 17:12:00.040", Some(utc)),
            // Anything else after the time: not read in the wrong zone, kept as a field.
            ("2024-10-28 17:12:00.040 tomorrow", None),
            ("2024-10-28 08:12:00.040Z +0100", None),
            ("2024-10-28 08:12:00.040 +0000 UTC extra", None),
        ] {
            let record = start(parser.line(&format!(r#"{{"time":"{time}","msg":"x"}}"#), 0));
            assert_eq!(record.time_micros, expected, "{time}");
            assert_eq!(
                record.fields.contains_key("time"),
                expected.is_none(),
                "{time}"
            );
        }
        // Numbers past the year 9999 are no time; fractions round to the microsecond.
        let record = start(parser.line(r#"{"ts":1e300,"msg":"x"}"#, 0));
        assert_eq!(record.time_micros, None);
        assert_eq!(epoch_micros(1e21), None);
        assert_eq!(epoch_micros(253_402_300_799.0), Some(253_402_300_799_000));
        assert_eq!(
            epoch_micros(1_730_103_120.000_000_6),
            Some(1_730_103_120_000_001)
        );
    }

    #[test]
    fn a_configured_expression_with_a_time_format_and_lines_it_does_not_match() {
        let formats = Formats::new(&[RegexParserSettings {
            name: "catalina".to_owned(),
            regex: r"^(?P<time>\d\d-\w{3}-\d{4} [\d:.]+) (?P<level>[A-Z]+) \[(?P<thread>[^\]]+)\] (?P<logger>\S+) (?P<message>.*)$"
                .to_owned(),
            time_format: "%d-%b-%Y %H:%M:%S%.3f".to_owned(),
        }])
        .expect("valid");
        let parser = Parser::new(formats.named("catalina").expect("configured"), SEOUL);
        let record = start(parser.line(
            "28-Oct-2024 17:12:00.040 SEVERE [main] org.apache.catalina.core.StandardService.startInternal failed",
            0,
        ));
        assert_eq!(record.time_micros, Some(SEOUL_MICROS));
        assert_eq!(record.level, Some(Level::Error));
        assert!(!record.parse_error);
        // A stack line joins quietly; another line the expression does not match joins
        // too, but counts as not parsed.
        assert_eq!(
            parser.line("\tat org.apache.Foo.bar(Foo.java:1)", 1),
            Line::Continue {
                text: "\tat org.apache.Foo.bar(Foo.java:1)",
                stack: true,
                unparsed: false
            }
        );
        assert_eq!(
            parser.line("28/10/2024 something else", 2),
            Line::Continue {
                text: "28/10/2024 something else",
                stack: false,
                unparsed: true
            }
        );
        let mut grouper = crate::multiline::Grouper::default();
        let caps = crate::multiline::Caps {
            lines: 100,
            bytes: 10_000,
        };
        let mut out = Vec::new();
        for (i, line) in [
            "28-Oct-2024 17:12:00.040 INFO [main] a.B started",
            "28/10/2024 something else",
        ]
        .iter()
        .enumerate()
        {
            grouper.push(&parser, caps, line, i, (), &mut out);
        }
        grouper.flush(&mut out);
        let (record, ()) = out.pop().expect("pending");
        assert!(record.parse_error, "a line the expression did not match");
        assert_eq!(record.message, "started\n28/10/2024 something else");
        // The JVM's report of an uncaught exception starts a record at ERROR, as in every
        // other layout; its frames join it.
        let record = start(parser.line(
            "Exception in thread \"main\" java.lang.OutOfMemoryError: Java heap space",
            3,
        ));
        assert_eq!(record.level, Some(Level::Error));
        assert_eq!(record.thread, "main");
        assert_eq!(record.first_line, 3);
        assert!(!record.parse_error);
    }

    #[test]
    fn json_numeric_levels_and_objects_without_a_message() {
        let parser = Parser::new(Format::Json, SEOUL);
        for (level, expected) in [
            (10, Level::Trace),
            (30, Level::Info),
            (50, Level::Error),
            (60, Level::Fatal),
        ] {
            let record = start(parser.line(&format!(r#"{{"level":{level},"msg":"x"}}"#), 0));
            assert_eq!(record.level, Some(expected));
            assert!(!record.fields.contains_key("level"));
        }
        let line = r#"{"level":"info","order":1}"#;
        let record = start(parser.line(line, 0));
        assert_eq!(record.message, line, "the line itself, not an empty entry");
        assert_eq!(record.fields["order"], "1");
        let record = start(Parser::new(Format::Auto, SEOUL).line(line, 0));
        assert_eq!(record.message, line);
        // What the masks read: the characters escaped, not their escapes.
        let line =
            r#"{"level":"info","user":"kim\u0040example.com","to":"a\/b \ud55c \ud83d\ude00"}"#;
        let record = start(parser.line(line, 0));
        assert_eq!(
            record.message,
            r#"{"level":"info","user":"kim@example.com","to":"a\/b 한 😀"}"#
        );
    }

    #[test]
    fn json_times_the_first_that_reads_wins_and_numbers_are_epoch_seconds() {
        let parser = Parser::new(Format::Json, SEOUL);
        let record = start(parser.line(
            r#"{"time":"2024-10-28T08:12:00Z","ts":"soon","msg":"x"}"#,
            0,
        ));
        assert_eq!(record.time_micros, Some(1_730_103_120_000_000));
        assert_eq!(record.fields["ts"], "soon");
        let record = start(parser.line(r#"{"ts":1730103120.04,"msg":"x"}"#, 0));
        assert_eq!(record.time_micros, Some(SEOUL_MICROS));
        let record = start(parser.line(r#"{"time":1730103120040,"msg":"x"}"#, 0));
        assert_eq!(record.time_micros, Some(SEOUL_MICROS));
    }

    #[test]
    fn log4j_times_with_more_digits_an_offset_or_a_leap_second() {
        let parser = Parser::new(Format::Log4j, SEOUL);
        for (line, micros) in [
            (
                "2024-10-28 17:12:00,040123 INFO  [main] x",
                SEOUL_MICROS + 123,
            ),
            ("2024-10-28T17:12:00.040+09:00 INFO  [main] x", SEOUL_MICROS),
            ("2024-10-28T08:12:00.040Z INFO  [main] x", SEOUL_MICROS),
            ("2024-10-28T09:12:00.040+0100 INFO  [main] x", SEOUL_MICROS),
            // log4j2's `X`: hours only.
            ("2024-10-28T17:12:00,040+09 INFO  [main] x", SEOUL_MICROS),
            ("2024-10-27T23:12:00.040-09 INFO  [main] x", SEOUL_MICROS),
            (
                "2024-10-28 17:11:60,040 INFO  [main] x",
                SEOUL_MICROS - 1_000_000,
            ),
        ] {
            let record = start(parser.line(line, 0));
            assert_eq!(record.time_micros, Some(micros), "{line}");
            assert_eq!(record.message, "x", "{line}");
        }
    }

    #[test]
    fn only_the_six_upper_case_levels_start_a_log4j_record() {
        let parser = Parser::new(Format::Wrapper, SEOUL);
        let prefix = "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | ";
        for text in [
            "Status [200] OK from payment gateway",
            "error [code=42] declined",
            "Warning [x] y",
        ] {
            assert!(
                matches!(
                    parser.line(&format!("{prefix}{text}"), 0),
                    Line::Continue { stack: false, .. }
                ),
                "{text}"
            );
        }
        // The wrapper's ADVICE level is a level of its column.
        let record = start(parser.line(
            "ADVICE | wrapper  | 2024/10/28 17:12:00 | restart advised",
            0,
        ));
        assert_eq!(record.level, Some(Level::Info));
    }

    #[test]
    fn exception_lines_are_told_from_ordinary_text() {
        assert!(is_stack(
            "Exception in thread \"main\" java.lang.OutOfMemoryError: Java heap space"
        ));
        assert!(is_stack("java.lang.NullPointerException"));
        assert!(is_stack(
            "de.hybris.platform.servicelayer.exceptions.ModelSavingException: [x]: missing"
        ));
        assert!(is_stack(
            "org.apache.solr.client.solrj.SolrServerException: IOException occurred"
        ));
        // SAXParseException writes its own form.
        assert!(is_stack(
            "org.xml.sax.SAXParseException; lineNumber: 1; columnNumber: 1; Content is not allowed in prolog."
        ));
        assert!(!is_stack("Note: something"));
        assert!(!is_stack("   java.lang.Thread.State: RUNNABLE"));
        assert!(is_stack("java.lang.IllegalStateException: RUNNABLE"));
        assert!(!is_stack("cart 8812 recalculated in 12 ms"));
        assert!(!is_stack("at the end of the day"));
        assert!(!is_stack("www.example.com is down"));
    }

    /// log4j's `%5p` right-aligns the level (` INFO`, ` WARN`): such lines start records
    /// too, with and without the wrapper, or every INFO and WARN would join the record
    /// before it.
    #[test]
    fn right_aligned_levels_start_records() {
        let wrapper = Parser::new(Format::Wrapper, SEOUL);
        let record = start(wrapper.line(
            "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 |  INFO [hybrisHTTP1] [X] ok",
            0,
        ));
        assert_eq!(
            (
                record.level,
                record.thread.as_str(),
                record.message.as_str()
            ),
            (Some(Level::Info), "hybrisHTTP1", "ok")
        );
        let log4j = Parser::new(Format::Log4j, SEOUL);
        let record = start(log4j.line(" WARN [main] [X] slow", 0));
        assert_eq!(
            (record.level, record.logger.as_str()),
            (Some(Level::Warn), "X")
        );
        let record = start(log4j.line("2024-10-28 17:12:00,040  WARN [main] [X] slow", 0));
        assert_eq!(record.time_micros, Some(SEOUL_MICROS));
        // Indented text is not a header for that.
        assert!(matches!(
            log4j.line("      INFO [x] quoted in a message", 0),
            Line::Continue { .. }
        ));
    }

    /// A thread name holding brackets (WebLogic's `[ACTIVE] ExecuteThread: …`) ends at the
    /// bracket that closes it.
    #[test]
    fn thread_names_with_brackets_are_read_whole() {
        let parser = Parser::new(Format::Log4j, SEOUL);
        let record = start(parser.line(
            "ERROR [[ACTIVE] ExecuteThread: '1' for queue: 'x'] [DefaultCartService] cart failed",
            0,
        ));
        assert_eq!(record.thread, "[ACTIVE] ExecuteThread: '1' for queue: 'x'");
        assert_eq!(record.logger, "DefaultCartService");
        assert_eq!(record.message, "cart failed");
        // An unbalanced bracket: the first `] ` ends it, as before.
        let record = start(parser.line("ERROR [pool-[1] [X] m", 0));
        assert_eq!(
            (record.thread.as_str(), record.logger.as_str()),
            ("pool-[1", "X")
        );
    }

    /// The trace id from log4j's MDC (`%X`: `{key=value, …}` before the text) or written
    /// into the text as `traceId=…`; the MDC's other entries become fields, and the map
    /// leaves the message.
    #[test]
    fn trace_ids_and_fields_from_the_mdc() {
        let parser = Parser::new(Format::Wrapper, SEOUL);
        let record = start(parser.line(
            "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | ERROR [hybrisHTTP12] [DefaultCartService] {traceId=4BF92F3577B34DA6A3CE929D0E0E4736, spanId=00f067aa0ba902b7, tenant=master} cart 8812 failed",
            0,
        ));
        assert_eq!(record.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(record.message, "cart 8812 failed");
        assert_eq!(
            record
                .fields
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect::<Vec<_>>(),
            [("spanId", "00f067aa0ba902b7"), ("tenant", "master")]
        );
        let log4j = Parser::new(Format::Log4j, SEOUL);
        // An empty MDC (`%X` writes `{}`) is left out.
        let record = start(log4j.line("INFO [main] [X] {} started", 0));
        assert_eq!(record.message, "started");
        // A map without a trace id may be the text itself (Java's Map.toString()).
        let record = start(log4j.line("INFO [main] [X] {orderCode=8812}", 0));
        assert_eq!(record.message, "{orderCode=8812}");
        assert!(record.fields.is_empty());
        // In the text.
        for text in [
            "payment declined trace_id=4bf92f3577b34da6a3ce929d0e0e4736 code=51",
            "payment declined [traceId: 4bf92f3577b34da6a3ce929d0e0e4736]",
        ] {
            let record = start(log4j.line(&format!("WARN [main] [X] {text}"), 0));
            assert_eq!(
                record.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736",
                "{text}"
            );
            assert_eq!(record.message, text);
        }
        // A 64-bit id (B3, Sleuth's default), in the MDC or the text: left-padded, as
        // OpenTelemetry's B3 propagators make it.
        for line in [
            "INFO [main] [X] {X-B3-TraceId=4bf92f3577b34da6, X-B3-SpanId=a3ce929d0e0e4736} paid",
            "INFO [main] [X] paid traceId=4bf92f3577b34da6",
        ] {
            let record = start(log4j.line(line, 0));
            assert_eq!(
                record.trace_id, "00000000000000004bf92f3577b34da6",
                "{line}"
            );
        }
        // Datadog's decimal id is no hex id, though its digits are hex digits.
        let record = start(log4j.line(
            "INFO [main] [X] {dd.trace_id=1234567890123456, dd.span_id=42} paid",
            0,
        ));
        assert_eq!(record.trace_id, "");
        assert_eq!(record.fields["dd.trace_id"], "1234567890123456");
        // Not a map of key=value, or not a trace id: the message stays whole.
        for text in [
            "slow query: SELECT {pk} FROM {Product}",
            "{\"a\":1} posted",
            "entrace_id=4bf92f3577b34da6a3ce929d0e0e4736",
            "parent_trace_id=4bf92f3577b34da6a3ce929d0e0e4736",
            "trace_id=4bf92f3577b34da6a3ce929d0e0e4736ff",
            "trace_id=4bf92f3577b34da6a",
        ] {
            let record = start(log4j.line(&format!("INFO [main] [X] {text}"), 0));
            assert_eq!(
                (record.message.as_str(), record.trace_id.as_str()),
                (text, "")
            );
            assert!(record.fields.is_empty(), "{text}");
        }
    }

    /// A JSON record's time is its `timestamp` before its `time` (whatever the key order),
    /// a small number under a time's name is no time, and a second name for the message,
    /// logger or thread stays a field instead of replacing the first.
    #[test]
    fn json_time_names_in_order_and_second_names_kept() {
        let parser = Parser::new(Format::Json, SEOUL);
        let record = start(parser.line(
            r#"{"timestamp":"2026-12-03T08:00:12.345678Z","level":"INFO","message":"done","msg":"retry","target":"x","time":250}"#,
            0,
        ));
        assert_eq!(record.time_micros, Some(1_796_284_812_345_678));
        assert_eq!(record.message, "done");
        assert_eq!(record.fields["msg"], "retry");
        assert_eq!(record.fields["time"], "250");
        // ECS and logstash's `@timestamp` before a `timestamp` argument of the event.
        let record = start(parser.line(
            r#"{"@timestamp":"2024-10-28T08:12:00Z","timestamp":"2020-01-01T00:00:00Z","msg":"x"}"#,
            0,
        ));
        assert_eq!(record.time_micros, Some(1_730_103_120_000_000));
        let record = start(parser.line(r#"{"time":250,"msg":"x"}"#, 0));
        assert_eq!(record.time_micros, None);
        // The wrapper's separators in a string time.
        let record = start(parser.line(r#"{"time":"2024/10/28 17:12:00.040","msg":"x"}"#, 0));
        assert_eq!(record.time_micros, Some(SEOUL_MICROS));
    }

    /// A record's level is its first name's that reads as a level (`level`, then `lvl`,
    /// then `severity`); the others stay fields. A stack trace under the names our own
    /// panics and ECS write is the record's stack trace.
    #[test]
    fn json_second_level_names_kept_and_stack_traces_under_other_names() {
        let parser = Parser::new(Format::Json, SEOUL);
        let record = start(parser.line(
            r#"{"level":"INFO","severity":"critical","lvl":"debug","msg":"x"}"#,
            0,
        ));
        assert_eq!(record.level, Some(Level::Info));
        assert_eq!(record.fields["severity"], "critical");
        assert_eq!(record.fields["lvl"], "debug");
        let record = start(parser.line(r#"{"severity":"ERROR","msg":"x"}"#, 0));
        assert_eq!(record.level, Some(Level::Error));
        // tracing's JSON without `flatten_event`: the event's own `level` field (nested,
        // sorting before the top level's) is no level of the record.
        let record = start(parser.line(
            r#"{"fields":{"message":"x","level":"debug"},"level":"INFO","target":"a"}"#,
            0,
        ));
        assert_eq!(record.level, Some(Level::Info));
        assert_eq!(record.message, "x");
        assert_eq!(record.fields["level"], "debug");
        // A nested field does not replace the top level's of the same name.
        let record = start(parser.line(
            r#"{"fields":{"message":"x","order":"2"},"level":"INFO","order":"1"}"#,
            0,
        ));
        assert_eq!(record.fields["order"], "1");
        assert_eq!(record.fields["fields.order"], "2");
        for name in ["backtrace", "error.stack_trace"] {
            let line = format!(
                r#"{{"level":"ERROR","msg":"panicked","{name}":"   0: x::y\n   1: main"}}"#
            );
            let record = start(parser.line(&line, 0));
            assert_eq!(record.stack_trace, "   0: x::y\n   1: main", "{name}");
            assert!(!record.fields.contains_key(name));
        }
    }
}
