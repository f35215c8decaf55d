//! A Loki-compatible push receiver for tests, benchmarks and local runs (Loki itself is not
//! installable here): it decodes snappy protobuf pushes as Loki does, refuses what Loki
//! refuses with Loki's status codes, can be told to fail, and keeps what it accepted.
//!
//! Refused with 400, as Loki's defaults do: entries older than 7 days or more than 10
//! minutes ahead (unless told to take any time, as the tests of 2024's corpora do), labels
//! that do not parse (a raw U+FFFD in them too: Loki's parser takes it for invalid UTF-8),
//! more than 15 labels in a stream, a label value over 2,048 bytes, a line over 256 KB, an
//! entry without a timestamp, an entry with more than 128 structured metadata pairs or more
//! than 64 KB of them, or any structured metadata when told to disallow it (as Loki 2.9
//! does by default, or 3.x with `allow_structured_metadata: false`); with Loki 3.6+'s own
//! messages (lower-case; several joined on one line as `N errors like: …; …`). Like Loki,
//! the valid
//! entries of a push are kept even when others are refused, and an entry identical to one
//! already kept (same stream, time and line) is dropped silently (counted here, so tests
//! see redeliveries). A structured metadata name of underscores only fails the whole push
//! with 500, nothing kept, as Loki 3.7+ does (its OTLP label namer refuses it). Bodies up
//! to Loki's 100 MiB are read (`distributor.max_recv_msg_size`), not axum's 2 MB. Fault
//! injection: answer every push with a status (429 with `Retry-After: 1`, a 5xx, Loki's
//! 260 for blocked ingestion, a 400 whose text is the records' fault or not) for a while,
//! answer 413 to pushes whose body is over a size (a proxy's body limit), or be down (the
//! listener closed). Told to, it refuses an entry older than its stream's last one, as a Loki
//! with `unordered_writes: false` does (not quite: Loki takes one into a new chunk after a
//! cut), which tells a test whether a push went in time order.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use tokio_util::sync::CancellationToken;

use crate::{
    lock,
    loki::{self, Entry},
};

/// Loki's default `reject_old_samples_max_age`: older entries are refused (400).
pub const MAX_SAMPLE_AGE: Duration = Duration::from_secs(7 * 24 * 3_600);

/// Loki's default `creation_grace_period`: entries further ahead are refused (400).
pub const CREATION_GRACE: Duration = Duration::from_secs(10 * 60);

/// Loki's default `max_line_size`.
pub const MAX_LINE_BYTES: usize = crate::loki::DEFAULT_MAX_LINE_BYTES;
/// Loki's default `max_structured_metadata_entries_count`.
pub const MAX_METADATA_ENTRIES: usize = 128;
/// Loki's default `max_structured_metadata_size` (names' and values' bytes per entry).
pub const MAX_METADATA_BYTES: usize = 64 * 1024;
/// Loki's default `distributor.max_recv_msg_size` (100 MiB): the largest push body it
/// reads.
pub const MAX_BODY_BYTES: usize = 100 << 20;
/// Loki's default `max_label_names_per_series`.
pub const MAX_LABELS: usize = 15;

/// One accepted entry with its stream's labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// The stream's labels, parsed.
    pub labels: Vec<(String, String)>,
    /// The entry.
    pub entry: Entry,
    /// The tenant header, if any.
    pub tenant: Option<String>,
}

/// A stream's last entry taken: its time (seconds, nanoseconds) and line.
type Last = ((i64, i32), String);

#[derive(Debug, Default)]
struct Inner {
    received: Vec<Received>,
    seen: std::collections::HashSet<(String, i64, i32, String)>,
    duplicates: u64,
    pushes: u64,
    refused: u64,
    /// Pushes answered with an injected failure.
    failed: u64,
    failing: Option<(StatusCode, String, Instant)>,
    /// Whether entries are kept (and duplicates found); else only counted.
    keep: bool,
    /// Whether an entry with structured metadata is refused.
    disallow_metadata: bool,
    /// Entries whose line holds the first text are refused with the second (the valid
    /// others kept, as Loki keeps them).
    poison: Option<(String, String)>,
    /// Whether an entry's time is taken whatever it is (Loki with `reject_old_samples:
    /// false` and a long `creation_grace_period`); else as Loki's defaults take it.
    any_time: bool,
    /// A push whose body (as sent: compressed) is larger is answered 413, as a proxy in
    /// front of Loki with a body limit answers.
    max_body: Option<usize>,
    /// How long each push waits before it is answered (a slow Loki).
    delay: Duration,
    /// Labels every stream with entries must have (Loki's `enforced_labels`).
    required: Vec<String>,
    /// Per stream (as sent), its last entry's time and line, when entries older than it
    /// are refused (Loki with `unordered_writes: false`); `None`: taken in any order.
    ordered: Option<std::collections::HashMap<String, Last>>,
    entries: u64,
    lines: u64,
}

impl Inner {
    fn count(&mut self, entry: &Entry) {
        self.entries += 1;
        self.lines += 1 + entry.line.bytes().filter(|b| *b == b'\n').count() as u64;
    }
}

/// A running receiver.
#[derive(Debug, Clone)]
pub struct LokiReceiver {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    stop: CancellationToken,
}

impl LokiReceiver {
    /// Starts a receiver on `addr` (port 0 for any).
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn start(addr: SocketAddr) -> std::io::Result<Self> {
        Self::start_keeping(addr, true).await
    }

    /// Starts a receiver that checks and counts what it accepts but keeps none of it
    /// (no [`LokiReceiver::received`], no duplicate detection): for a benchmark's millions
    /// of entries.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn start_counting(addr: SocketAddr) -> std::io::Result<Self> {
        Self::start_keeping(addr, false).await
    }

    async fn start_keeping(addr: SocketAddr, keep: bool) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Mutex::new(Inner {
            keep,
            ..Inner::default()
        }));
        let stop = CancellationToken::new();
        let app = Router::new()
            .route("/loki/api/v1/push", post(push))
            // Loki's own bound on a push body, not axum's default of 2 MB (which a push of
            // `pipeline.batch_bytes` that snappy barely shrinks would pass).
            .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(inner.clone());
        let until = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(until.cancelled_owned())
                .await;
        });
        Ok(Self { addr, inner, stop })
    }

    /// Takes entries of any time, as a Loki configured with `reject_old_samples: false`
    /// would (the test corpora are dated 2024). By default, as Loki's defaults do, an entry
    /// older than [`MAX_SAMPLE_AGE`] or more than [`CREATION_GRACE`] ahead is refused.
    pub fn accept_any_time(&self) {
        lock(&self.inner).any_time = true;
    }

    /// Refuses entries by their times again, as Loki's defaults do (undoes
    /// [`Self::accept_any_time`]).
    pub fn refuse_times_as_loki_does(&self) {
        lock(&self.inner).any_time = false;
    }

    /// Refuses every entry whose line contains `needle`, saying `says` (a 400 whose reason
    /// is the record's own but named in words not known to the pusher), keeping the others.
    pub fn refuse_lines_containing(&self, needle: &str, says: &str) {
        lock(&self.inner).poison = Some((needle.to_owned(), says.to_owned()));
    }

    /// Refuses every stream with entries that lacks one of `names` (Loki's
    /// `enforced_labels`, in its words); a stream without entries is skipped first, as Loki
    /// skips it. Empty: nothing enforced.
    pub fn enforce_labels(&self, names: &[&str]) {
        lock(&self.inner).required = names.iter().map(|n| (*n).to_owned()).collect();
    }

    /// Refuses an entry older than the last one taken in its stream (400, `entry out of
    /// order`), as a Loki configured with `unordered_writes: false` does; one of the same
    /// time and line as that last one is skipped as a duplicate.
    pub fn refuse_out_of_order(&self) {
        lock(&self.inner).ordered = Some(std::collections::HashMap::new());
    }

    /// Its base URL, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything accepted so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.inner).received.clone()
    }

    /// (pushes answered, pushes answered 400, identical entries dropped).
    pub fn counts(&self) -> (u64, u64, u64) {
        let inner = lock(&self.inner);
        (inner.pushes, inner.refused, inner.duplicates)
    }

    /// Pushes answered with a failure [`Self::fail`] or [`Self::fail_saying`] injected.
    pub fn failed(&self) -> u64 {
        lock(&self.inner).failed
    }

    /// (entries accepted, lines in them: each entry's newlines + 1).
    pub fn accepted(&self) -> (u64, u64) {
        let inner = lock(&self.inner);
        (inner.entries, inner.lines)
    }

    /// Refuses (or takes again) entries carrying structured metadata, as Loki does with
    /// `allow_structured_metadata: false`.
    pub fn disallow_structured_metadata(&self, disallow: bool) {
        lock(&self.inner).disallow_metadata = disallow;
    }

    /// Answers every push with `status` for `period` (429 comes with `Retry-After: 1`).
    pub fn fail(&self, status: StatusCode, period: Duration) {
        self.fail_saying(status, "injected failure", period);
    }

    /// Answers every push with `status` and `body` for `period`: a 400 that names no
    /// record's fault (`tenant ID 'a|b' contains unsupported character '|'`, a proxy's
    /// page), say.
    pub fn fail_saying(&self, status: StatusCode, body: &str, period: Duration) {
        lock(&self.inner).failing = Some((status, body.to_owned(), Instant::now() + period));
    }

    /// Answers 413 to every push whose body, as sent (compressed), is over `bytes`, as a
    /// proxy in front of Loki with a body limit (nginx's `client_max_body_size`) does.
    pub fn refuse_bodies_over(&self, bytes: usize) {
        lock(&self.inner).max_body = Some(bytes);
    }

    /// Answers each push `delay` after it arrived (a slow Loki; zero: at once).
    pub fn answer_after(&self, delay: Duration) {
        lock(&self.inner).delay = delay;
    }

    /// Stops listening (a Loki that is down).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

async fn push(State(inner): State<Arc<Mutex<Inner>>>, headers: HeaderMap, body: Bytes) -> Response {
    let delay = lock(&inner).delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut inner = lock(&inner);
    inner.pushes += 1;
    if let Some((status, says, until)) = &inner.failing {
        if Instant::now() < *until {
            let status = *status;
            let says = says.clone();
            inner.failed += 1;
            let mut response = (status, says).into_response();
            if status == StatusCode::TOO_MANY_REQUESTS {
                response
                    .headers_mut()
                    .insert("retry-after", axum::http::HeaderValue::from_static("1"));
            }
            return response;
        }
        inner.failing = None;
    }
    if inner.max_body.is_some_and(|max| body.len() > max) {
        return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large").into_response();
    }
    let request = match loki::decode(&body) {
        Ok(request) => request,
        Err(why) => {
            inner.refused += 1;
            return (StatusCode::BAD_REQUEST, why).into_response();
        }
    };
    // As Loki since 3.4 (a stream without entries is skipped, and answered 204).
    if request.streams.is_empty() {
        inner.refused += 1;
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            "error at least one valid stream is required for ingestion",
        )
            .into_response();
    }
    // Loki 3.7+ turns structured metadata names into label names with Prometheus'
    // otlptranslator, whose error for a name of underscores only reaches the client as a
    // plain error: 500 for the whole push.
    if let Some(name) = request.streams.iter().find_map(|s| {
        s.entries
            .iter()
            .flat_map(|e| &e.structured_metadata)
            .find(|p| !p.name.is_empty() && p.name.bytes().all(|b| b == b'_'))
            .map(|p| p.name.clone())
    }) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("normalization for label name {name:?} resulted in invalid name {name:?}"),
        )
            .into_response();
    }
    let tenant = headers
        .get("x-scope-orgid")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut problems = Vec::new();
    for stream in request.streams {
        let Some(labels) = parse_labels(&stream.labels) else {
            let why = if stream.labels.contains('\u{FFFD}') {
                "parse error: invalid UTF-8 rune"
            } else {
                "parse error"
            };
            problems.push(format!(
                "error parsing labels '{}' with error: {why}",
                stream.labels
            ));
            continue;
        };
        // Loki's distributor skips a stream without entries before it validates anything
        // else (only the labels' syntax is checked, as the push is parsed).
        if stream.entries.is_empty() {
            continue;
        }
        if let Some((_, value)) = labels
            .iter()
            .find(|(_, value)| value.len() > crate::labels::MAX_VALUE_BYTES)
        {
            problems.push(format!(
                "stream '{}' has label value too long: '{value}'",
                stream.labels
            ));
            continue;
        }
        if labels.len() > MAX_LABELS {
            problems.push(format!(
                "entry for stream '{}' has {} label names; limit {MAX_LABELS}",
                stream.labels,
                labels.len()
            ));
            continue;
        }
        // After the labels are validated, as Loki checks them.
        let missing: Vec<&str> = inner
            .required
            .iter()
            .filter(|name| !labels.iter().any(|(n, _)| n == *name))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            problems.push(format!(
                "missing required labels '{}' for user 'fake' for stream '{}' (policy: '')",
                missing.join(","),
                stream.labels
            ));
            continue;
        }
        // Entries refused as out of order (ordered writes), as Loki's ingester names them.
        let mut out_of_order = Vec::new();
        let entries = stream.entries.len();
        for entry in stream.entries {
            let Some(time) = entry.timestamp else {
                problems.push(format!(
                    "stream {}: an entry without a timestamp",
                    stream.labels
                ));
                continue;
            };
            if !inner.any_time {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                let shown = chrono::DateTime::from_timestamp(time.seconds, 0)
                    .map_or_else(|| time.seconds.to_string(), |t| t.to_rfc3339());
                if time.seconds < now - MAX_SAMPLE_AGE.as_secs() as i64 {
                    let oldest =
                        chrono::DateTime::from_timestamp(now - MAX_SAMPLE_AGE.as_secs() as i64, 0)
                            .map_or_else(String::new, |t| t.to_rfc3339());
                    problems.push(format!(
                        "entry for stream '{}' has timestamp too old: {shown}, oldest acceptable timestamp is: {oldest}",
                        as_loki_quotes(&labels)
                    ));
                    continue;
                }
                if time.seconds > now + CREATION_GRACE.as_secs() as i64 {
                    problems.push(format!(
                        "entry for stream '{}' has timestamp too new: {shown}",
                        as_loki_quotes(&labels)
                    ));
                    continue;
                }
            }
            if let Some((needle, says)) = &inner.poison
                && entry.line.contains(needle.as_str())
            {
                problems.push(says.clone());
                continue;
            }
            if entry.line.len() > MAX_LINE_BYTES {
                problems.push(format!(
                    "max entry size '{MAX_LINE_BYTES}' bytes exceeded for stream '{}' while adding an entry with length '{}' bytes",
                    stream.labels,
                    entry.line.len()
                ));
                continue;
            }
            if inner.disallow_metadata && !entry.structured_metadata.is_empty() {
                problems.push(format!(
                    "stream '{}' includes structured metadata, but this feature is disallowed. Please see `limits_config.allow_structured_metadata` or contact your Loki administrator to enable it.",
                    stream.labels
                ));
                continue;
            }
            let metadata_bytes: usize = entry
                .structured_metadata
                .iter()
                .map(|p| p.name.len() + p.value.len())
                .sum();
            if metadata_bytes > MAX_METADATA_BYTES {
                problems.push(format!(
                    "stream '{}' has structured metadata too large: '{metadata_bytes}' bytes, limit: '{MAX_METADATA_BYTES}' bytes. Please see `limits_config.max_structured_metadata_size` or contact your Loki administrator to increase it.",
                    stream.labels
                ));
                continue;
            }
            if entry.structured_metadata.len() > MAX_METADATA_ENTRIES {
                problems.push(format!(
                    "stream '{}' has too many structured metadata labels: '{}', limit: '{MAX_METADATA_ENTRIES}'. Please see `limits_config.max_structured_metadata_entries_count` or contact your Loki administrator to increase it.",
                    stream.labels,
                    entry.structured_metadata.len()
                ));
                continue;
            }
            if let Some(ordered) = &mut inner.ordered {
                let at = (time.seconds, time.nanos);
                match ordered.get(&stream.labels) {
                    Some((last, line)) if *last == at && *line == entry.line => {
                        inner.duplicates += 1;
                        continue;
                    }
                    Some((last, _)) if at < *last => {
                        // As Go's `time.Time.String()` writes it (the fraction to 3, 6 or 9
                        // digits, where Go trims every trailing zero).
                        let nanos = u32::try_from(time.nanos).unwrap_or(0);
                        let shown = chrono::DateTime::from_timestamp(time.seconds, nanos)
                            .map_or_else(
                                || time.seconds.to_string(),
                                |t| t.format("%Y-%m-%d %H:%M:%S%.f +0000 UTC").to_string(),
                            );
                        out_of_order.push(format!(
                            "entry with timestamp {shown} ignored, reason: 'entry out of order',"
                        ));
                        continue;
                    }
                    _ => {
                        ordered.insert(stream.labels.clone(), (at, entry.line.clone()));
                    }
                }
            }
            if !inner.keep {
                inner.count(&entry);
                continue;
            }
            let key = (
                stream.labels.clone(),
                time.seconds,
                time.nanos,
                entry.line.clone(),
            );
            if !inner.seen.insert(key) {
                inner.duplicates += 1;
                continue;
            }
            inner.count(&entry);
            inner.received.push(Received {
                labels: labels.clone(),
                entry,
                tenant: tenant.clone(),
            });
        }
        if !out_of_order.is_empty() {
            problems.push(format!(
                "{}\nuser '{}', total ignored: {} out of {entries} for stream: {}",
                out_of_order.join("\n"),
                tenant.as_deref().unwrap_or("fake"),
                out_of_order.len(),
                stream.labels
            ));
        }
    }
    match problems.len() {
        0 => StatusCode::NO_CONTENT.into_response(),
        1 => {
            inner.refused += 1;
            (StatusCode::BAD_REQUEST, problems.remove(0)).into_response()
        }
        // As Loki groups them: on one line.
        n => {
            inner.refused += 1;
            let body = format!("{n} errors like: {}", problems.join("; "));
            (StatusCode::BAD_REQUEST, body).into_response()
        }
    }
}

/// `labels` as Loki quotes them in its answers (`labels.String()` of what it read): sorted,
/// with the `service_name` it adds (from `service`, else `unknown_service`).
fn as_loki_quotes(labels: &[(String, String)]) -> String {
    let mut labels = labels.to_vec();
    if !labels.iter().any(|(name, _)| name == "service_name") {
        let service = labels
            .iter()
            .find(|(name, _)| name == "service")
            .map_or("unknown_service", |(_, value)| value.as_str())
            .to_owned();
        labels.push(("service_name".to_owned(), service));
    }
    labels.sort();
    let pairs: Vec<(&str, &str)> = labels
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    crate::labels::selector(&pairs)
}

/// Loki's reading of a stream selector (see [`crate::labels::parse_selector`]).
pub use crate::labels::parse_selector as parse_labels;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_as_loki_reads_them() {
        assert_eq!(
            parse_labels(r#"{service="hybris", level="ERROR",host="a\"b"}"#),
            Some(vec![
                ("service".to_owned(), "hybris".to_owned()),
                ("level".to_owned(), "ERROR".to_owned()),
                ("host".to_owned(), "a\"b".to_owned()),
            ])
        );
        for bad in [
            "{}",
            "service=\"x\"",
            "{1a=\"x\"}",
            "{a=\"x\" b=\"y\"}",
            "{a=\"x}",
        ] {
            assert_eq!(parse_labels(bad), None, "{bad}");
        }
        assert_eq!(
            parse_labels(r#"{host="a\ufffdb"}"#),
            Some(vec![("host".to_owned(), "a\u{FFFD}b".to_owned())])
        );
        for bad in [
            "{host=\"a\u{FFFD}b\"}",
            r#"{host="a\uffzz"}"#,
            r#"{host="a\ud800"}"#,
        ] {
            assert_eq!(parse_labels(bad), None, "{bad}");
        }
    }

    /// A push of one entry with one structured metadata pair named `name`.
    fn with_metadata(name: &str) -> Vec<u8> {
        loki::encode(&loki::PushRequest {
            streams: vec![loki::Stream {
                labels: r#"{service="x"}"#.to_owned(),
                entries: vec![Entry {
                    timestamp: Some(prost_types::Timestamp {
                        seconds: 1_730_103_120,
                        nanos: 0,
                    }),
                    line: format!("with {name}"),
                    structured_metadata: vec![loki::LabelPair {
                        name: name.to_owned(),
                        value: "1".to_owned(),
                    }],
                }],
                hash: 0,
            }],
        })
    }

    #[tokio::test]
    async fn a_metadata_name_of_underscores_only_fails_the_push_as_loki_3_7_does() {
        let loki = LokiReceiver::start("127.0.0.1:0".parse().expect("an address"))
            .await
            .expect("starts");
        loki.accept_any_time();
        let client = reqwest::Client::new();
        let url = format!("{}/loki/api/v1/push", loki.url());
        for (name, status) in [
            ("_", 500),
            ("____", 500),
            // What `label_name` makes of the keys that gave those (of `주문번호` too).
            (crate::labels::label_name("_".to_owned()).as_str(), 204),
            ("_id", 204),
        ] {
            let response = client
                .post(&url)
                .body(with_metadata(name))
                .send()
                .await
                .expect("answers");
            assert_eq!(response.status().as_u16(), status, "{name}");
        }
        assert_eq!(loki.received().len(), 2, "nothing of a failed push kept");
    }

    #[tokio::test]
    async fn entries_too_old_or_too_far_ahead_are_refused_as_lokis_defaults_do() {
        let loki = LokiReceiver::start("127.0.0.1:0".parse().expect("an address"))
            .await
            .expect("starts");
        let now = chrono::Utc::now().timestamp();
        let push = |seconds: i64| {
            loki::encode(&loki::PushRequest {
                streams: vec![loki::Stream {
                    labels: r#"{service="x"}"#.to_owned(),
                    entries: vec![Entry {
                        timestamp: Some(prost_types::Timestamp { seconds, nanos: 0 }),
                        line: seconds.to_string(),
                        structured_metadata: Vec::new(),
                    }],
                    hash: 0,
                }],
            })
        };
        let client = reqwest::Client::new();
        let url = format!("{}/loki/api/v1/push", loki.url());
        for (seconds, status, reason) in [
            (now, 204, ""),
            (now - 6 * 24 * 3_600, 204, ""),
            (now - 8 * 24 * 3_600, 400, "greater_than_max_sample_age"),
            // A legacy time read as UTC lands nine hours ahead.
            (now + 9 * 3_600, 400, "too_far_in_future"),
            (now + 5 * 60, 204, ""),
        ] {
            let response = client
                .post(&url)
                .body(push(seconds))
                .send()
                .await
                .expect("answers");
            assert_eq!(response.status().as_u16(), status, "{seconds}");
            let body = response.text().await.expect("a body");
            if status == 400 {
                assert_eq!(crate::loki::refusal_reason(&body), reason, "{body}");
            }
        }
        // Configured as `reject_old_samples: false`, it takes the old one.
        loki.accept_any_time();
        let response = client
            .post(&url)
            .body(push(now - 8 * 24 * 3_600))
            .send()
            .await
            .expect("answers");
        assert_eq!(response.status().as_u16(), 204);
    }

    #[tokio::test]
    async fn entries_with_too_much_structured_metadata_are_refused_as_loki_does() {
        let loki = LokiReceiver::start("127.0.0.1:0".parse().expect("an address"))
            .await
            .expect("starts");
        loki.accept_any_time();
        let push = |pairs: usize, value_bytes: usize| {
            let entry = Entry {
                timestamp: Some(prost_types::Timestamp {
                    seconds: 1_730_103_120,
                    nanos: 0,
                }),
                line: format!("{pairs} pairs"),
                structured_metadata: (0..pairs)
                    .map(|i| loki::LabelPair {
                        name: format!("f{i}"),
                        value: "v".repeat(value_bytes),
                    })
                    .collect(),
            };
            loki::encode(&loki::PushRequest {
                streams: vec![loki::Stream {
                    labels: r#"{service="x"}"#.to_owned(),
                    entries: vec![entry],
                    hash: 0,
                }],
            })
        };
        let client = reqwest::Client::new();
        let url = format!("{}/loki/api/v1/push", loki.url());
        for (pairs, value_bytes, status) in [
            (MAX_METADATA_ENTRIES, 1, 204),
            (MAX_METADATA_ENTRIES + 1, 1, 400),
            (2, MAX_METADATA_BYTES / 2 - 2, 204),
            (2, MAX_METADATA_BYTES / 2, 400),
        ] {
            let response = client
                .post(&url)
                .body(push(pairs, value_bytes))
                .send()
                .await
                .expect("answers");
            assert_eq!(
                response.status().as_u16(),
                status,
                "{pairs} × {value_bytes}"
            );
        }
        assert_eq!(loki.received().len(), 2);
    }

    /// A push of about 4 MB (the most `pipeline.batch_bytes` allows) of text snappy cannot
    /// shrink is taken, as Loki takes bodies up to 100 MiB (axum alone stops at 2 MB).
    #[tokio::test]
    async fn a_push_past_two_megabytes_is_taken_as_loki_takes_it() {
        let loki = LokiReceiver::start("127.0.0.1:0".parse().expect("an address"))
            .await
            .expect("starts");
        loki.accept_any_time();
        // Letters from a linear congruential generator: no repeats for snappy to find.
        let mut state = 0x2545_f491_u64;
        let mut letters = |n: usize| -> String {
            (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    char::from(b'a' + u8::try_from((state >> 33) % 26).expect("below 26"))
                })
                .collect()
        };
        let entries: Vec<Entry> = (0..16)
            .map(|i| Entry {
                timestamp: Some(prost_types::Timestamp {
                    seconds: 1_730_103_120 + i,
                    nanos: 0,
                }),
                line: letters(250_000),
                structured_metadata: Vec::new(),
            })
            .collect();
        let body = loki::encode(&loki::PushRequest {
            streams: vec![loki::Stream {
                labels: r#"{service="x"}"#.to_owned(),
                entries,
                hash: 0,
            }],
        });
        assert!(
            body.len() > 3_000_000,
            "{} bytes: it compressed",
            body.len()
        );
        let response = reqwest::Client::new()
            .post(format!("{}/loki/api/v1/push", loki.url()))
            .body(body)
            .send()
            .await
            .expect("answers");
        assert_eq!(response.status().as_u16(), 204);
        assert_eq!(loki.received().len(), 16);
    }
}
