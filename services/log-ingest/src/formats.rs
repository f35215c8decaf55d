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
    /// How the `time` capture is written, in chrono's `strftime` syntax (`%d-%b-%Y
    /// %H:%M:%S%.3f` for Tomcat's `catalina.out`), read in the source's zone unless it has
    /// `%z`. Empty: the forms any parser reads (ISO-8601 and RFC 3339, the wrapper's, an
    /// access log's, epoch seconds or milliseconds). A time that does not read stays a
    /// field and marks the record a parse error.
    #[serde(default)]
    pub time_format: String,
}

/// A compiled [`RegexParserSettings`].
#[derive(Debug)]
pub struct RegexParser {
    /// Its name.
    pub name: String,
    regex: Regex,
    /// [`RegexParserSettings::time_format`] (empty: any known form).
    pub time_format: String,
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
        if !settings.time_format.is_empty() && !reads_back(&settings.time_format) {
            return Err(format!(
                "time_format {:?} does not read back a time it writes (chrono strftime, such as \
                 %d-%b-%Y %H:%M:%S%.3f; a date alone, or Java's yyyy-MM-dd, is no format)",
                settings.time_format
            ));
        }
        Ok(Arc::new(Self {
            name: settings.name.clone(),
            regex,
            time_format: settings.time_format.clone(),
        }))
    }

    /// The record `line` starts, or `None` when it does not match. `time` reads a time
    /// capture. A capture of the record's own that does not read (a time, a level, a trace
    /// id) stays a field, and a time that does not read marks the record a parse error. A
    /// record without a message capture has the line as its message.
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
            let mut unread = false;
            match name {
                "time" if !value.trim().is_empty() => {
                    record.time_micros = time(value);
                    unread = record.time_micros.is_none();
                    record.parse_error |= unread;
                }
                "level" => {
                    record.level = Level::parse(value.trim());
                    unread = record.level.is_none() && !value.trim().is_empty();
                }
                "message" => value.clone_into(&mut record.message),
                "logger" => value.clone_into(&mut record.logger),
                "thread" => value.clone_into(&mut record.thread),
                "trace_id" => {
                    record.trace_id = record::trace_id(value).unwrap_or_default();
                    unread = record.trace_id.is_empty() && !value.trim().is_empty();
                }
                _ => unread = true,
            }
            if unread {
                record.fields.insert(name.to_owned(), value.to_owned());
            }
        }
        if record.message.is_empty() {
            line.clone_into(&mut record.message);
        }
        Some(record)
    }
}

/// Whether `format` (chrono strftime) reads back, to the minute, a time it writes: a
/// format with no time in it (`yyyy-MM-dd HH:mm`, Java's, is all literals to chrono), a
/// date alone, or a bad directive would read no time from any line.
fn reads_back(format: &str) -> bool {
    use std::fmt::Write as _;
    let Some(offset) = chrono::FixedOffset::east_opt(9 * 3_600) else {
        return false;
    };
    let Some(sample) = chrono::NaiveDate::from_ymd_opt(2024, 10, 28)
        .and_then(|d| d.and_hms_milli_opt(17, 12, 34, 40))
        .and_then(|t| t.and_local_timezone(offset).single())
    else {
        return false;
    };
    let mut written = String::new();
    if write!(written, "{}", sample.format(format)).is_err() {
        return false;
    }
    let minute = |t: chrono::NaiveDateTime| t.format("%Y-%m-%d %H:%M").to_string();
    let want = minute(sample.naive_local());
    if let Ok(t) = chrono::DateTime::parse_from_str(&written, format) {
        return minute(t.with_timezone(&offset).naive_local()) == want;
    }
    chrono::NaiveDateTime::parse_from_str(&written, format)
        .is_ok_and(|t| minute(t) == want || format.contains("%s"))
}

/// What an access log line's remote user becomes (`-`, none, stays).
pub const USER: &str = "<user>";

/// Tomcat's `AccessLogValve` (and Apache's) common and combined formats, optionally with
/// the time taken (`%D` or `%T`) after them:
/// `%h %l %u %t "%r" %s %b ["%{Referer}i" "%{User-Agent}i"] [%D]`. The valve writes `-`
/// for a request line it could not read (a 400) and for a status it never sent, and
/// escapes `"` and `\` inside quoted parts with a backslash.
static ACCESS_LOG: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r#"^(?P<client>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] "(?:-|(?P<method>[A-Z]+) (?P<path>(?:[^ "\\]|\\.)*)(?: (?P<protocol>(?:[^"\\]|\\.)*))?)" (?P<status>\d{3}|-) (?P<bytes>\d+|-)(?: "(?P<referer>(?:[^"\\]|\\.)*)" "(?P<user_agent>(?:[^"\\]|\\.)*)")?(?: (?P<duration>\d+(?:\.\d+)?))?\s*$"#,
    )
    .expect("a valid expression")
});

/// An access log line as a record: the line is its message (as written but for the remote
/// user, masked later like any other); client, method, path, protocol, status, bytes,
/// referer, user agent and the time taken (`duration`, in the valve's unit) are fields; the
/// level says how the request went (5xx ERROR, 4xx WARN, else INFO). The remote user (`%u`,
/// an HTTP login) names a person: it is no field, and [`USER`] in the message. `None` when
/// the line is not an access log line.
pub fn access_log(line: &str, index: usize) -> Option<Record> {
    let captures = ACCESS_LOG.captures(line)?;
    let message = match captures.name("user") {
        Some(user) if user.as_str() != "-" => {
            format!("{}{USER}{}", &line[..user.start()], &line[user.end()..])
        }
        _ => line.to_owned(),
    };
    let mut record = Record {
        first_line: index,
        line_count: 1,
        message,
        ..Record::default()
    };
    record.time_micros = captures
        .name("time")
        .and_then(|t| chrono::DateTime::parse_from_str(t.as_str(), "%d/%b/%Y:%H:%M:%S %z").ok())
        .map(|t| t.timestamp_micros());
    // No status (`-`): the valve never answered; logged as an ERROR like a 5xx.
    let status = captures.name("status").map_or("", |m| m.as_str());
    record.level = Some(match status.as_bytes().first() {
        Some(b'-') => Level::Error,
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
            record.fields.insert(name.to_owned(), unescape(value));
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
    // Pairs without a message (`Cart recalculated total=12.00`, or metrics-like lines): the
    // line itself, so the entry says what was written, in its order (its `\u` escapes
    // written out for the masks).
    if record.message.is_empty() {
        record.message = printable_escapes_written_out(line, true).into_owned();
    }
    Some(record)
}

/// `text` (JSON, or a logfmt line when `logfmt`) with each `\uXXXX` escape of a printable
/// character (a surrogate pair as one), and each run of `\xHH` escapes that makes printable
/// UTF-8 (logfmt's; JSON has none), written out: the same value, as the masks can read it
/// (`kim\u0040example.com` holds an e-mail address). Escapes of control characters, quotes
/// and backslashes, which the text needs escaped, of a hex digit right after an escape cut
/// short, and in a logfmt line of spaces and `=` (which would make pairs of their own),
/// stay, and so does every other escape.
pub fn printable_escapes_written_out(text: &str, logfmt: bool) -> std::borrow::Cow<'_, str> {
    if !text.contains("\\u") && !text.contains("\\x") {
        return text.into();
    }
    // What may be written out: not a control character, nor what the text needs escaped,
    // nor in a logfmt line a space or `=` (they would make pairs of their own).
    let printable = |c: char| {
        let needs_escape = matches!(c, '"' | '\\') || (logfmt && matches!(c, ' ' | '='));
        !c.is_control() && !needs_escape
    };
    // Whether the text before `at` ends in an escape cut short (`\x4`, `\u00`), which a hex
    // digit written out at `at` would complete.
    let cut_before = |at: usize| {
        let before = &text.as_bytes()[..at];
        let hex = before
            .iter()
            .rev()
            .take(4)
            .take_while(|b| b.is_ascii_hexdigit())
            .count();
        let head = &before[..before.len() - hex];
        (head.ends_with(b"\\x") && hex < 2) || (head.ends_with(b"\\u") && hex < 4)
    };
    // The four hex digits at `at`, as a number.
    let hex4 = |at: usize| {
        text.get(at..at + 4)
            .filter(|digits| digits.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|digits| u32::from_str_radix(digits, 16).ok())
    };
    let mut out = String::with_capacity(text.len());
    let (mut rest, mut at) = (0, 0);
    while let Some(found) = text[at..].find('\\') {
        let slash = at + found;
        let (decoded, len) = match text.as_bytes().get(slash + 1) {
            Some(b'u') => match hex4(slash + 2) {
                Some(high @ 0xD800..=0xDBFF) => match text
                    .get(slash + 6..slash + 8)
                    .filter(|&u| u == "\\u")
                    .and_then(|_| hex4(slash + 8))
                {
                    Some(low @ 0xDC00..=0xDFFF) => (
                        char::from_u32(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)),
                        12,
                    ),
                    _ => (None, 6),
                },
                Some(code) => (char::from_u32(code), 6),
                None => (None, 2),
            },
            // A run of `\xHH` is bytes, UTF-8 as `unescape` reads them: its printable
            // characters written out, the rest of it left escaped.
            Some(b'x') => {
                let (mut bytes, mut end) = (Vec::new(), slash);
                while let Some(byte) = text
                    .get(end..end + 4)
                    .and_then(|escape| escape.strip_prefix("\\x"))
                    .filter(|digits| digits.bytes().all(|b| b.is_ascii_hexdigit()))
                    .and_then(|digits| u8::from_str_radix(digits, 16).ok())
                {
                    bytes.push(byte);
                    end += 4;
                }
                out.push_str(&text[rest..slash]);
                // Byte `i` of the run is written `text[slash + 4 * i..][..4]`.
                let escaped = |from: usize, to: usize| &text[slash + 4 * from..slash + 4 * to];
                let mut at_byte = 0;
                for chunk in bytes.utf8_chunks() {
                    for c in chunk.valid().chars() {
                        let next = at_byte + c.len_utf8();
                        if printable(c)
                            && !(c.is_ascii_hexdigit() && at_byte == 0 && cut_before(slash))
                        {
                            out.push(c);
                        } else {
                            out.push_str(escaped(at_byte, next));
                        }
                        at_byte = next;
                    }
                    let next = at_byte + chunk.invalid().len();
                    out.push_str(escaped(at_byte, next));
                    at_byte = next;
                }
                rest = end;
                (None, (end - slash).max(2))
            }
            // Another escape (`\\` among them: what follows it is text).
            Some(b) if b.is_ascii() => (None, 2),
            _ => (None, 1),
        };
        if let Some(c) =
            decoded.filter(|&c| printable(c) && !(c.is_ascii_hexdigit() && cut_before(slash)))
        {
            out.push_str(&text[rest..slash]);
            out.push(c);
            rest = slash + len;
        }
        at = (slash + len).min(text.len());
    }
    out.push_str(&text[rest..]);
    out.into()
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
                // The value ends at the first `"` not escaped (or with the line).
                let mut chars = quoted.char_indices();
                let (mut content, mut next) = (quoted.len(), quoted.len());
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => {
                            (content, next) = (i, i + 1);
                            break;
                        }
                        _ => {}
                    }
                }
                rest = &quoted[next..];
                unescape(&quoted[..content])
            } else {
                let end = after.find(' ').unwrap_or(after.len());
                rest = &after[end..];
                after[..end].to_owned()
            }
        } else {
            "true".to_owned()
        };
        // A key is any run of bytes past the space but `=` and `"` (as go-logfmt reads
        // them: `사용자=kim` is a pair).
        if !key.is_empty() && key.bytes().all(|b| b > b' ' && b != b'"' && b != 0x7f) {
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

/// `text` with the backslash escapes logfmt writers and access log valves use undone:
/// `\"`, `\\`, `\n`, `\r`, `\t`, `\b`, `\f`, `\/`, `\uXXXX` (a surrogate pair as one
/// character; a lone surrogate as U+FFFD) and Apache's `\xhh` bytes (a run of them read as
/// UTF-8, lossily). An unknown escape keeps its backslash; a text without a backslash is
/// copied as it is.
///
/// Written here: a few dozen lines, and no crate undoes exactly this set outside a JSON
/// string's quotes.
pub fn unescape(text: &str) -> String {
    if !text.contains('\\') {
        return text.to_owned();
    }
    /// The value of the `n` hex digits at the start of `rest`, if they are.
    fn hex(rest: &str, n: usize) -> Option<u32> {
        let digits = rest.get(..n)?;
        digits
            .bytes()
            .all(|b| b.is_ascii_hexdigit())
            .then(|| u32::from_str_radix(digits, 16).ok())
            .flatten()
    }
    let mut out = String::with_capacity(text.len());
    // `\xhh` bytes not yet read as text (a character may take several).
    let mut bytes: Vec<u8> = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find('\\') {
        let before = &rest[..at];
        let after = &rest[at + 1..];
        // A character, or (`None`) a byte of `\xhh`.
        let (decoded, used): (Option<char>, usize) = match after.chars().next() {
            Some('x') => match hex(&after[1..], 2) {
                Some(_) => (None, 3),
                None => (Some('\\'), 0),
            },
            Some('n') => (Some('\n'), 1),
            Some('r') => (Some('\r'), 1),
            Some('t') => (Some('\t'), 1),
            Some('b') => (Some('\u{8}'), 1),
            Some('f') => (Some('\u{c}'), 1),
            Some(c @ ('"' | '\\' | '/')) => (Some(c), 1),
            Some('u') => match hex(&after[1..], 4) {
                Some(high @ 0xD800..=0xDBFF) => {
                    let low = after[5..]
                        .strip_prefix("\\u")
                        .and_then(|l| hex(l, 4))
                        .filter(|low| (0xDC00..=0xDFFF).contains(low));
                    match low {
                        Some(low) => {
                            let code = 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00);
                            (Some(char::from_u32(code).unwrap_or('\u{fffd}')), 11)
                        }
                        None => (Some('\u{fffd}'), 5),
                    }
                }
                Some(code) => (Some(char::from_u32(code).unwrap_or('\u{fffd}')), 5),
                None => (Some('\\'), 0),
            },
            // Unknown (or the text's end): the backslash stays, what follows is text.
            _ => (Some('\\'), 0),
        };
        if !before.is_empty() || decoded.is_some() {
            out.push_str(&String::from_utf8_lossy(&std::mem::take(&mut bytes)));
        }
        out.push_str(before);
        match decoded {
            Some(c) => out.push(c),
            None => bytes.extend(hex(&after[1..], 2).and_then(|b| u8::try_from(b).ok())),
        }
        rest = &after[used..];
    }
    out.push_str(&String::from_utf8_lossy(&bytes));
    out.push_str(rest);
    out
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
            common.message,
            r#"10.0.3.7 - <user> [28/Oct/2024:17:12:00 +0900] "POST /checkout HTTP/1.1" 503 -"#,
            "nor in the line"
        );
        assert_eq!(
            access_log(r#"1.2.3.4 - - [x] "GET / HTTP/1.1" 404 0"#, 0).map(|r| r.level),
            Some(Some(Level::Warn))
        );
        assert!(access_log("INFO [main] [X] not an access line", 0).is_none());
    }

    #[test]
    fn access_lines_tomcat_writes_for_bad_requests_and_escaped_headers() {
        // A request Tomcat could not read: `"-"` as the request line, the status it sent.
        let r = access_log(r#"1.2.3.4 - - [28/Oct/2024:17:12:00 +0900] "-" 400 -"#, 0)
            .expect("a bad request's line");
        assert_eq!(r.fields["status"], "400");
        assert_eq!(r.level, Some(Level::Warn));
        assert!(!r.fields.contains_key("method"));
        // No status at all (`-`): the valve never answered.
        let r = access_log(
            r#"1.2.3.4 - - [28/Oct/2024:17:12:00 +0900] "GET /a HTTP/1.1" - -"#,
            0,
        )
        .expect("no status");
        assert_eq!(r.level, Some(Level::Error));
        // `"` and `\` escaped inside a quoted header; the fields hold them unescaped.
        let r = access_log(
            r#"1.2.3.4 - - [28/Oct/2024:17:12:00 +0900] "GET /a HTTP/1.1" 200 12 "-" "Mozilla \"x\" \\ y" 5"#,
            0,
        )
        .expect("escaped quotes");
        assert_eq!(r.fields["user_agent"], r#"Mozilla "x" \ y"#);
        assert_eq!(r.fields["duration"], "5");
    }

    #[test]
    fn escapes_undone_as_logfmt_writers_and_tomcat_write_them() {
        assert_eq!(unescape("plain"), "plain");
        assert_eq!(unescape(r#"a\"b\\c\nd\re\tf\/g"#), "a\"b\\c\nd\re\tf/g");
        assert_eq!(unescape(r"\u001b[0m \u00e9"), "\u{1b}[0m \u{e9}");
        assert_eq!(unescape(r"\ud83d\ude00"), "\u{1f600}");
        assert_eq!(unescape(r"\ud83d x"), "\u{fffd} x");
        // Unknown or broken escapes keep their backslash.
        assert_eq!(unescape(r"\uzz x\"), r"\uzz x\");
        assert_eq!(unescape(r"\u+123 \q"), r"\u+123 \q");
        // Apache's bytes: a run of them is UTF-8.
        assert_eq!(unescape(r"caf\xc3\xa9 \xff!"), "café \u{fffd}!");
    }

    #[test]
    fn printable_escapes_written_out_keep_what_the_text_needs_escaped() {
        for (json, expected) in [
            (r#"{"a":"\u0040"}"#, r#"{"a":"@"}"#),
            // A backslash escaped, then the text `u0040`: no escape of `@`.
            (r#"{"a":"\\u0040"}"#, r#"{"a":"\\u0040"}"#),
            // Quotes, backslashes and control characters stay escaped, other escapes too.
            (
                r#"{"a":"\u0022\u005c\u005C\u000a\n\u007f\/"}"#,
                r#"{"a":"\u0022\u005c\u005C\u000a\n\u007f\/"}"#,
            ),
            // A lone surrogate stays as written; a pair is one character.
            (r#"{"a":"\ud83d x \ude00"}"#, r#"{"a":"\ud83d x \ude00"}"#),
            (r#"{"a":"\uD83D\uDE00\u0040\ud55c"}"#, r#"{"a":"😀@한"}"#),
            // Cut short.
            (r#"{"a":"\u004"}"#, r#"{"a":"\u004"}"#),
        ] {
            let out = printable_escapes_written_out(json, false);
            assert_eq!(out, expected, "{json}");
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(json) {
                let out: serde_json::Value = serde_json::from_str(&out).expect("still JSON");
                assert_eq!(out, value, "the same value: {json}");
            }
        }
        assert!(matches!(
            printable_escapes_written_out(r#"{"a":"plain\n"}"#, false),
            std::borrow::Cow::Borrowed(_)
        ));
        // logfmt: the line a message-less record shows, `\x` escapes too: a run of them
        // is UTF-8, its printable characters written out, the rest left escaped.
        let line = r#"event=signup user="kim\u0040example.com" to="jos\xc3\xa9\x40\xed\x9a\x8c\xec\x82\xac.kr" bad="\xc3\x22 \xff\x41""#;
        let r = logfmt(line, 0, seconds).expect("logfmt");
        assert_eq!(
            r.message,
            r#"event=signup user="kim@example.com" to="josé@회사.kr" bad="\xc3\x22 \xffA""#
        );
        assert_eq!(r.fields["user"], "kim@example.com");
        // An unquoted value is as written (go-logfmt reads it so); the line is written out.
        let r = logfmt(
            r"event=signup path=D:\b\x64 user=lee\x40example.com",
            0,
            seconds,
        )
        .expect("logfmt");
        assert_eq!(r.fields["path"], r"D:\b\x64");
        assert_eq!(r.message, r"event=signup path=D:\bd user=lee@example.com");
        // A run whose bytes are not all printable UTF-8: its printable characters written
        // out, the rest left escaped.
        let line = r#"to="kim@\xed\x9a\x8c\xec\x82\xac.\xed\x95\x9c\x0a\xff""#;
        assert_eq!(
            printable_escapes_written_out(line, true),
            r#"to="kim@회사.한\x0a\xff""#
        );
        // A hex digit right after a cut escape is left escaped: written out, it would
        // complete that escape.
        for text in [r"\x4\x41", r"\u00\x41", r"\u004\u0041"] {
            assert_eq!(printable_escapes_written_out(text, true), text);
        }
        assert_eq!(printable_escapes_written_out(r"\x4 \x41", true), r"\x4 A");
        // In a logfmt line a space or `=` stays escaped (written out, it would make a
        // pair); in JSON it is written out (a phone's separator).
        assert_eq!(
            printable_escapes_written_out(r"user=kim\x20admin\u003dtrue", true),
            r"user=kim\x20admin\u003dtrue"
        );
        assert_eq!(
            printable_escapes_written_out(r#"{"to":"010\u00201234\u00205678"}"#, false),
            r#"{"to":"010 1234 5678"}"#
        );
    }

    #[test]
    fn logfmt_keys_beyond_ascii_and_lines_without_a_message() {
        let r = logfmt(r#"사용자=kim msg="a\rb\u0041""#, 0, seconds).expect("logfmt");
        assert_eq!(r.fields["사용자"], "kim");
        assert_eq!(r.message, "a\rbA");
        // Pairs without a message: the line itself is the message, in its order.
        let line = "Cart recalculated total=12.00";
        let r = logfmt(line, 0, seconds).expect("logfmt");
        assert_eq!(r.message, line);
        assert_eq!(r.fields["total"], "12.00");
    }

    #[test]
    fn a_configured_time_format_and_captures_that_do_not_read() {
        let parser = RegexParser::new(&RegexParserSettings {
            name: "catalina".to_owned(),
            regex: r"^(?P<time>\S+ \S+) (?P<level>\S+) \[(?P<thread>[^\]]+)\] (?P<logger>\S+) (?P<message>.*)$"
                .to_owned(),
            time_format: "%d-%b-%Y %H:%M:%S%.3f".to_owned(),
        })
        .expect("compiles");
        assert_eq!(parser.time_format, "%d-%b-%Y %H:%M:%S%.3f");
        // What the parser's `time` reads is the caller's (tested in parse.rs); a time it
        // cannot read stays a field and marks the record.
        let r = parser
            .start(
                "28-Oct-2024 17:12:00.040 SEVERE [main] org.apache.catalina.startup.Catalina.start x",
                0,
                |_| None,
            )
            .expect("matches");
        assert!(r.parse_error);
        assert_eq!(r.fields["time"], "28-Oct-2024 17:12:00.040");
        assert_eq!(r.level, Some(Level::Error));
        assert_eq!(r.logger, "org.apache.catalina.startup.Catalina.start");
        // A level or trace id that does not read stays a field; a record without a
        // message capture has the line as its message.
        let parser = RegexParser::new(&RegexParserSettings {
            name: "odd".to_owned(),
            regex: r"^(?P<level>\w+) (?P<trace_id>\S+)".to_owned(),
            time_format: String::new(),
        })
        .expect("compiles");
        let r = parser.start("NOTALEVEL zz", 0, |_| None).expect("matches");
        assert_eq!(
            (
                r.level,
                r.fields["level"].as_str(),
                r.fields["trace_id"].as_str()
            ),
            (None, "NOTALEVEL", "zz")
        );
        assert_eq!(r.message, "NOTALEVEL zz");
        assert!(!r.parse_error, "only a time that does not read is an error");
        for bad in ["%Y-%Q", "yyyy-MM-dd HH:mm:ss.SSS", "%Y-%m-%d"] {
            assert!(
                RegexParser::new(&RegexParserSettings {
                    name: "bad".to_owned(),
                    regex: "(?P<time>.*)".to_owned(),
                    time_format: bad.to_owned(),
                })
                .is_err(),
                "{bad}"
            );
        }
        for good in [
            "%d-%b-%Y %H:%M:%S%.3f",
            "%Y-%m-%dT%H:%M:%S%z",
            "%s",
            "%b %e %H:%M:%S %Y",
        ] {
            assert!(reads_back(good), "{good}");
        }
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
            time_format: String::new(),
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
                regex: "no captures".to_owned(),
                time_format: String::new(),
            })
            .is_err()
        );
        assert!(
            RegexParser::new(&RegexParserSettings {
                name: "x".to_owned(),
                regex: "(?P<unclosed".to_owned(),
                time_format: String::new(),
            })
            .is_err()
        );
    }
}
