//! Loki's push API: `POST /loki/api/v1/push` with a protobuf `PushRequest` compressed with
//! raw (block) snappy; the client that sends our records, with retries.
//!
//! The messages are Loki's `logproto` push types (`pkg/push/push.proto` in grafana/loki),
//! declared here with prost's derive from their published field numbers: four small
//! messages are not worth a code generator or a crate pinned to another prost.
//!
//! Failures, classified: 429, 5xx and connection errors or timeouts are the environment's
//! (retried with jittered backoff, `Retry-After` honoured, until they pass: the buffer
//! holds the records meanwhile); 400 is the records' fault when Loki names a reason of its
//! own (Loki refuses them for good; the caller narrows it down to the records at fault:
//! labels Loki's operator enforces, `enforced_labels`, are one, as Loki discards each stream
//! without them), but a lone record refused with a 400 that names none (a tenant Loki
//! refuses, a proxy's page) is the operator's; 413 says the push is too large (the caller
//! splits it; for one record, a proxy's limit: the caller waits and sends it again);
//! anything else (401, 403, 404, and a 2xx other than 200 and 204: Loki's 260 says its
//! operator blocked ingestion and the push was discarded) is the operator's (retried with
//! the same backoff and logged at ERROR: fixing the configuration must not lose what
//! waited).

use std::time::Duration;

use anyhow::Context as _;

use prost::Message as _;

/// `logproto.PushRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PushRequest {
    /// The streams.
    #[prost(message, repeated, tag = "1")]
    pub streams: Vec<Stream>,
}

/// `logproto.StreamAdapter`: one label set and its entries.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Stream {
    /// Labels in Prometheus' text form: `{service="hybris", level="ERROR"}`.
    #[prost(string, tag = "1")]
    pub labels: String,
    /// Entries, oldest first.
    #[prost(message, repeated, tag = "2")]
    pub entries: Vec<Entry>,
    /// Unused by pushes.
    #[prost(uint64, tag = "3")]
    pub hash: u64,
}

/// `logproto.EntryAdapter`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Entry {
    /// When it was written.
    #[prost(message, optional, tag = "1")]
    pub timestamp: Option<prost_types::Timestamp>,
    /// The line.
    #[prost(string, tag = "2")]
    pub line: String,
    /// Structured metadata (not labels): trace id, logger, thread.
    #[prost(message, repeated, tag = "3")]
    pub structured_metadata: Vec<LabelPair>,
}

/// `logproto.LabelPairAdapter`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LabelPair {
    /// Name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Value.
    #[prost(string, tag = "2")]
    pub value: String,
}

/// The body of a push: the request, protobuf, snappy (raw block format).
pub fn encode(request: &PushRequest) -> Vec<u8> {
    let bytes = request.encode_to_vec();
    snap::raw::Encoder::new()
        .compress_vec(&bytes)
        .expect("snappy compresses any input that fits in memory")
}

/// A push body back into its request (the receiver's side).
///
/// # Errors
/// When it is not snappy, or not a `PushRequest`.
pub fn decode(body: &[u8]) -> Result<PushRequest, String> {
    let bytes = snap::raw::Decoder::new()
        .decompress_vec(body)
        .map_err(|e| format!("not snappy: {e}"))?;
    PushRequest::decode(&bytes[..]).map_err(|e| format!("not a PushRequest: {e}"))
}

/// What became of one push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pushed {
    /// Loki took it.
    Accepted,
    /// Loki refused it for good (400): its answer (up to 64 KiB: Loki names the stream's
    /// labels before the reason, and joins several errors on one line), without the
    /// records' text. For a lone record, only with a reason [`refusal_reason`] knows.
    Refused(String),
    /// Too large for Loki or a proxy before it (413): send it in smaller pieces.
    TooLarge,
}

/// Sends pushes to Loki.
#[derive(Debug, Clone)]
pub struct LokiClient {
    client: reqwest::Client,
    url: String,
    tenant: Option<String>,
    retry_initial: Duration,
    retry_max: Duration,
}

impl LokiClient {
    /// A client of the Loki at `base_url` (`http://loki:3100`), sending `X-Scope-OrgID:
    /// tenant` when set; each request may take `timeout`. An `https://` Loki is trusted by
    /// the system's roots and the certificates of `ca_file`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built or `ca_file` cannot be read.
    pub fn new(
        base_url: &str,
        tenant: Option<String>,
        timeout: Duration,
        retry: (Duration, Duration),
        ca_file: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        // Refused at start-up: otherwise every push fails as if Loki were down, retried
        // for ever while the buffer fills and the process looks healthy.
        let parsed = reqwest::Url::parse(base_url)
            .with_context(|| format!("loki.url ({base_url:?}) is not a URL"))?;
        anyhow::ensure!(
            matches!(parsed.scheme(), "http" | "https") && parsed.host().is_some(),
            "loki.url ({base_url:?}) must be an http:// or https:// URL with a host"
        );
        if let Some(tenant) = &tenant {
            // Loki answers 400 to every push of a tenant it refuses: found here, not as a
            // stalled output.
            anyhow::ensure!(
                valid_tenant(tenant),
                "loki.tenant ({tenant:?}) must be 1 to {MAX_TENANT_CHARS} characters of \
                 A-Z a-z 0-9 ! - _ . * ' ( ), and not . or .. (Loki's rules for tenant IDs; \
                 | and : separate tenants)"
            );
        }
        anyhow::ensure!(
            !timeout.is_zero(),
            "loki.request_timeout must be more than zero"
        );
        anyhow::ensure!(
            !retry.0.is_zero() && retry.0 <= retry.1,
            "loki.retry_initial must be more than zero and at most loki.retry_max"
        );
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout);
        if let Some(ca_file) = ca_file {
            for cert in mall_grpc::tls::extra_roots(ca_file).context("loki.ca_file")? {
                builder = builder.add_root_certificate(reqwest::Certificate::from_der(&cert)?);
            }
        }
        Ok(Self {
            client: builder.build()?,
            url: format!("{}/loki/api/v1/push", base_url.trim_end_matches('/')),
            tenant,
            retry_initial: retry.0,
            retry_max: retry.1,
        })
    }

    /// Pushes `body` (from [`encode`]) until Loki accepts or refuses it for good; waits out
    /// everything else. `None` when `stop` fired first. With `retry_unexplained` (a probe:
    /// a stream without entries, asking whether Loki takes anything), a 400 naming no reason
    /// of a record's own is waited out too.
    pub async fn push(
        &self,
        body: Vec<u8>,
        retry_unexplained: bool,
        stop: &tokio_util::sync::CancellationToken,
        mut on_failure: impl FnMut(&str),
    ) -> Option<Pushed> {
        let mut failures = 0;
        loop {
            let mut request = self
                .client
                .post(&self.url)
                .header("content-type", "application/x-protobuf")
                .body(body.clone());
            if let Some(tenant) = &self.tenant {
                request = request.header("x-scope-orgid", tenant);
            }
            // A shutdown does not wait out a slow request (the records stay in the buffer).
            let sent = tokio::select! {
                sent = request.send() => sent,
                () = stop.cancelled() => return None,
            };
            // Loki's answer to a push it did not take (its first line, cut at 300 bytes), for
            // the retry's WARN line: a 429 names the limit (ingestion rate, a stream's rate,
            // the tenant's streams), and Loki's answers quote labels, never lines. Empty for
            // a timeout or a connection that failed.
            let mut answer = String::new();
            let (wait, why) = match sent {
                // Only these: Loki answers 260 (`block_ingestion_status_code`) to a push it
                // discarded because its operator blocked ingestion.
                Ok(response) if matches!(response.status().as_u16(), 200 | 204) => {
                    return Some(Pushed::Accepted);
                }
                Ok(response) if response.status() == reqwest::StatusCode::PAYLOAD_TOO_LARGE => {
                    return Some(Pushed::TooLarge);
                }
                Ok(response) if response.status() == reqwest::StatusCode::BAD_REQUEST => {
                    let reason = tokio::select! {
                        reason = first_bytes(response, MAX_REASON_BYTES) => reason,
                        () = stop.cancelled() => return None,
                    };
                    if !retry_unexplained || refusal_reason(&reason) != UNKNOWN_REFUSAL {
                        return Some(Pushed::Refused(reason));
                    }
                    // Narrowed down to one record and still no reason Loki gives for a
                    // record: the tenant, a proxy; dropping would lose every record one by
                    // one. Loki's answer quotes labels, never lines.
                    let first = first_line(&reason);
                    answer = first[..first.floor_char_boundary(300)].to_owned();
                    tracing::error!(
                        answer,
                        "Loki refuses a push (400) for no reason of the records' (its tenant, a proxy?); retrying until it is fixed"
                    );
                    (None, "status 400".to_owned())
                }
                Ok(response) => {
                    let status = response.status();
                    let after = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| retry_after(v, std::time::SystemTime::now()));
                    let transient = status == reqwest::StatusCode::TOO_MANY_REQUESTS
                        || status.is_server_error();
                    let said = tokio::select! {
                        said = first_bytes(response, MAX_ANSWER_BYTES) => said,
                        () = stop.cancelled() => return None,
                    };
                    let first = first_line(&said);
                    answer = first[..first.floor_char_boundary(300)].to_owned();
                    if status.is_success() {
                        tracing::error!(%status, answer, "Loki did not store a push (its operator blocked ingestion: block_ingestion_until?); retrying until it takes it");
                    } else if !transient {
                        tracing::error!(%status, answer, "Loki refuses our pushes (authentication or URL?); retrying until it is fixed");
                    }
                    (after, format!("status {}", status.as_u16()))
                }
                Err(error) => (
                    None,
                    if error.is_timeout() {
                        "timeout".to_owned()
                    } else {
                        "connection".to_owned()
                    },
                ),
            };
            failures += 1;
            on_failure(&why);
            let backoff = mall_retry::Backoff::after(self.retry_initial, self.retry_max, failures);
            let wait = wait.map_or(backoff, |after| after.min(self.retry_max).max(backoff));
            if answer.is_empty() {
                tracing::warn!(why, failures, ?wait, "a push to Loki failed; retrying");
            } else {
                tracing::warn!(
                    why,
                    answer,
                    failures,
                    ?wait,
                    "a push to Loki failed; retrying"
                );
            }
            tokio::select! {
                () = stop.cancelled() => return None,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Waits out the backoff after `failures` failed attempts (at `loki.retry_initial`,
    /// doubling to `loki.retry_max`, jittered); false when `stop` fired first.
    pub async fn wait(&self, failures: u32, stop: &tokio_util::sync::CancellationToken) -> bool {
        let wait = mall_retry::Backoff::after(self.retry_initial, self.retry_max, failures);
        tokio::select! {
            () = stop.cancelled() => false,
            () = tokio::time::sleep(wait) => true,
        }
    }
}

/// Loki's rule for tenant IDs (dskit's `tenant.ValidTenantID`), and the separators it
/// reads in them (`|` between tenants, `:` before a subtenant), which the characters
/// leave out already.
fn valid_tenant(tenant: &str) -> bool {
    !tenant.is_empty()
        && tenant.len() <= MAX_TENANT_CHARS
        && tenant != "."
        && tenant != ".."
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!-_.*'()".contains(&b))
}

/// dskit's `MaxTenantIDLength`.
const MAX_TENANT_CHARS: usize = 150;

/// Loki's default `max_line_size`, `256KB`, which Loki reads as 262,144 bytes.
pub const DEFAULT_MAX_LINE_BYTES: usize = 256 * 1024;

/// [`refusal_reason`] of an answer naming no reason known here.
pub const UNKNOWN_REFUSAL: &str = "loki_refused";

/// Most bytes of a refusal's answer read: Loki's answers name a record's problem in a line
/// or two (64 KiB holds hundreds of them); a proxy's error page may be far longer.
const MAX_REASON_BYTES: usize = 64 * 1024;

/// The first line of `answer` with text in it (a proxy's page may begin with blank ones).
fn first_line(answer: &str) -> &str {
    answer
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or_default()
}

/// Most bytes read of an answer to a push that is retried (its first line is logged).
const MAX_ANSWER_BYTES: usize = 4 * 1024;

/// The first `max` bytes of `response`'s body as text (what is not UTF-8 replaced), the
/// rest not read.
async fn first_bytes(mut response: reqwest::Response, max: usize) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < max {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                bytes.extend_from_slice(&chunk[..chunk.len().min(max - bytes.len())])
            }
            Ok(None) | Err(_) => break,
        }
    }
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    // A character the cut split became U+FFFD at the end: the cut is at a character.
    text.truncate(text.floor_char_boundary(max));
    text
}

/// What a 400 refusing entries for their times says of other entries of the same stream in
/// the refused push. Loki's distributor checks every entry of a push before its ingesters
/// see any, stores those it takes, and answers 400 naming entries it refused, each in its
/// own sentence: `entry for stream '<selector>' has timestamp too new: <time>`, or `… too
/// old: <time>, oldest acceptable timestamp is: <bound>` (times to the second, RFC 3339;
/// how many it names depends on its version). Its rules are the same for every entry, by
/// time alone: an entry of that stream older than the bound it gives, or a second or more
/// newer than an entry it found too new, was refused too (the bound lies within that
/// second). Only these sentences are read (not an ingester's "too far behind", whose bound is
/// the stream's own and moves), and only for the stream each names (a sender's host name
/// cannot make them apply to another stream). So a host whose clock or zone is wrong, or a
/// backlog older than Loki keeps, costs fewer requests than halving the push until each
/// entry is alone (about two per entry).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TimeBounds {
    /// Per stream named (its labels, sorted): entries before the first (Unix seconds) were
    /// too old, entries from the second on too new.
    streams: Vec<(Labels, Option<i64>, Option<i64>)>,
}

/// A stream's labels, as (name, value) pairs.
type Labels = Vec<(String, String)>;

impl TimeBounds {
    /// The bounds `message` (a 400's answer) gives; none where it names no time.
    pub fn read(message: &str) -> Self {
        const ENTRY: &str = "entry for stream '";
        const TOO: &str = "' has timestamp too ";
        const OLDEST: &str = ", oldest acceptable timestamp is: ";
        // Loki 3.6+ writes its messages lower-case (not the selectors it quotes).
        let lower = message.to_ascii_lowercase();
        // The RFC 3339 time at the start of `at`, and where it ends.
        let time = |at: usize| {
            let rest = &message[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, ':' | '-' | '+' | '.')))
                .unwrap_or(rest.len());
            chrono::DateTime::parse_from_rfc3339(&rest[..end].to_ascii_uppercase())
                .ok()
                .map(|t| (t.timestamp(), at + end))
        };
        let mut bounds = Self::default();
        for (at, _) in lower.match_indices(ENTRY) {
            let from = at + ENTRY.len();
            let Some(len) = lower[from..].find(TOO) else {
                continue;
            };
            let selector = &message[from..from + len];
            let after = from + len + TOO.len();
            let (old, new) = if lower[after..].starts_with("new: ") {
                let Some((new, _)) = time(after + "new: ".len()) else {
                    continue;
                };
                (None, Some(new.saturating_add(1)))
            } else if lower[after..].starts_with("old: ") {
                let Some((_, end)) = time(after + "old: ".len()) else {
                    continue;
                };
                if !lower[end..].starts_with(OLDEST) {
                    continue;
                }
                let Some((bound, _)) = time(end + OLDEST.len()) else {
                    continue;
                };
                (Some(bound), None)
            } else {
                continue;
            };
            let earliest = |a: Option<i64>, b: Option<i64>| match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            // Loki quotes the labels as it read them: sorted, Go's quoting, and with
            // `service_name` it adds (compared as sets, below).
            let Some(mut labels) = crate::labels::parse_selector(selector) else {
                continue;
            };
            labels.sort();
            match bounds.streams.iter_mut().find(|(s, _, _)| *s == labels) {
                Some((_, o, n)) => (*o, *n) = (earliest(*o, old), earliest(*n, new)),
                None => bounds.streams.push((labels, old, new)),
            }
        }
        bounds
    }

    /// The bounds of the stream whose selector (as sent) is `selector`: Loki's labels are
    /// its labels, and `service_name` where it sent none (Loki adds it).
    fn of(&self, selector: &str) -> Option<(Option<i64>, Option<i64>)> {
        if self.streams.is_empty() {
            return None;
        }
        let mut ours = crate::labels::parse_selector(selector)?;
        ours.sort();
        let sent_service_name = ours.iter().any(|(name, _)| name == SERVICE_NAME);
        self.streams
            .iter()
            .find(|(theirs, _, _)| {
                theirs
                    .iter()
                    .filter(|(name, _)| sent_service_name || name != SERVICE_NAME)
                    .eq(ours.iter())
            })
            .map(|(_, old, new)| (*old, *new))
    }

    /// Why an entry of the refused push in stream `selector` written at `time` was refused,
    /// if these bounds say.
    pub fn refused(
        &self,
        selector: &str,
        time: Option<&prost_types::Timestamp>,
    ) -> Option<&'static str> {
        let seconds = time?.seconds;
        let (old, new) = self.of(selector)?;
        if old.is_some_and(|before| seconds < before) {
            Some("greater_than_max_sample_age")
        } else if new.is_some_and(|from| seconds >= from) {
            Some("too_far_in_future")
        } else {
            None
        }
    }

    /// Whether an entry of stream `selector` written at `time` lies in the second that holds
    /// one of Loki's bounds (refused or taken, these bounds cannot say), and which: the
    /// too-old bound's second holds the stream's oldest entries left, the too-new one's its
    /// newest.
    pub fn unsure(&self, selector: &str, time: Option<&prost_types::Timestamp>) -> Option<Unsure> {
        let (time, (old, new)) = time.zip(self.of(selector))?;
        if old == Some(time.seconds) {
            Some(Unsure::Oldest)
        } else if new == Some(time.seconds.saturating_add(1)) {
            Some(Unsure::Newest)
        } else {
            None
        }
    }
}

/// Which of Loki's bounds an entry's second holds ([`TimeBounds::unsure`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsure {
    /// The too-old bound: the stream's oldest entries left.
    Oldest,
    /// The too-new bound: the stream's newest entries left.
    Newest,
}

/// The label Loki adds to a stream that has none of that name (from `service`, or
/// `unknown_service`), and quotes in its answers.
const SERVICE_NAME: &str = "service_name";

/// Loki's reason for refusing an entry (its `discarded_samples_total` reason names), read
/// from its 400 answer's message, anywhere in it and in any case (Loki 3.6+ writes its
/// messages lower-case; it joins several errors on one line, or on several);
/// [`UNKNOWN_REFUSAL`] for one not known here.
pub fn refusal_reason(message: &str) -> &'static str {
    // Lower-case, as the message is compared.
    const KNOWN: [(&str, &str); 16] = [
        ("timestamp too old", "greater_than_max_sample_age"),
        ("timestamp too new", "too_far_in_future"),
        ("greater than creation grace", "too_far_in_future"),
        ("max entry size", "line_too_long"),
        (
            "this feature is disallowed",
            "disallowed_structured_metadata",
        ),
        (
            "structured metadata too large",
            "structured_metadata_too_large",
        ),
        (
            "too many structured metadata",
            "structured_metadata_too_many",
        ),
        ("too far behind", "too_far_behind"),
        ("out of order", "out_of_order"),
        ("error parsing labels", "invalid_labels"),
        ("label pair is required", "invalid_labels"),
        ("label names; limit", "invalid_labels"),
        ("label value too long", "invalid_labels"),
        ("label name too long", "invalid_labels"),
        ("duplicate label name", "invalid_labels"),
        // `enforced_labels` (of the tenant or of a policy): Loki discards each stream
        // without them, and takes the others.
        ("missing required labels", "missing_enforced_labels"),
    ];
    let message = message.to_ascii_lowercase();
    KNOWN
        .iter()
        .find(|(says, _)| message.contains(says))
        .map_or(UNKNOWN_REFUSAL, |(_, reason)| reason)
}

/// A `Retry-After` value (RFC 9110): seconds, or an HTTP-date (how long until it, zero
/// when it has passed), as a gateway in front of Loki may send it.
fn retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_body_decodes_to_the_request() {
        let request = PushRequest {
            streams: vec![Stream {
                labels: r#"{service="hybris"}"#.to_owned(),
                entries: vec![Entry {
                    timestamp: Some(prost_types::Timestamp {
                        seconds: 1_730_103_120,
                        nanos: 40_000_000,
                    }),
                    line: "cart 8812 failed".to_owned(),
                    structured_metadata: vec![LabelPair {
                        name: "logger".to_owned(),
                        value: "DefaultCartService".to_owned(),
                    }],
                }],
                hash: 0,
            }],
        };
        assert_eq!(decode(&encode(&request)), Ok(request));
        assert!(decode(b"not snappy").is_err());
    }

    #[test]
    fn an_answers_first_line_is_its_first_with_text() {
        assert_eq!(first_line("\n\r\n  <html>\n<body>"), "<html>");
        assert_eq!(first_line("too many\nsecond"), "too many");
        assert_eq!(first_line(" \n\t\n"), "");
    }

    #[test]
    fn retry_after_in_seconds_or_as_an_http_date() {
        let now = httpdate::parse_http_date("Tue, 21 Oct 2025 07:28:00 GMT").expect("a date");
        assert_eq!(retry_after(" 3 ", now), Some(Duration::from_secs(3)));
        assert_eq!(
            retry_after("Tue, 21 Oct 2025 07:28:05 GMT", now),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            retry_after("Tue, 21 Oct 2025 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon", now), None);
    }

    #[test]
    fn a_refusal_naming_times_bounds_the_entries_of_the_streams_it_names() {
        let at = |seconds| prost_types::Timestamp {
            seconds,
            nanos: 999_999_999,
        };
        let seconds = |t: &str| {
            chrono::DateTime::parse_from_rfc3339(t)
                .expect("a time")
                .timestamp()
        };
        let (old, new) = ("2024-10-21T00:00:00Z", "2099-01-01T00:00:00Z");
        let (old_s, new_s) = (seconds(old), seconds(new));
        let (b, c, d) = (r#"{a="b"}"#, r#"{a="c"}"#, r#"{a="d"}"#);
        let bounds = TimeBounds::read(&format!(
            "3 errors like: entry for stream '{b}' has timestamp too old: \
             2024-10-01T00:00:00Z, oldest acceptable timestamp is: {old}\n\
             entry for stream '{c}' has timestamp too new: 2099-01-02T00:00:00Z; \
             entry for stream '{c}' has timestamp too new: {new}"
        ));
        assert_eq!(
            bounds.refused(b, Some(&at(old_s - 1))),
            Some("greater_than_max_sample_age")
        );
        // Within Loki's bound's second: not known to be refused.
        assert_eq!(bounds.refused(b, Some(&at(old_s))), None);
        assert_eq!(bounds.unsure(b, Some(&at(old_s))), Some(Unsure::Oldest));
        assert_eq!(bounds.refused(c, Some(&at(new_s))), None);
        assert_eq!(bounds.unsure(c, Some(&at(new_s))), Some(Unsure::Newest));
        assert_eq!(
            bounds.refused(c, Some(&at(new_s + 1))),
            Some("too_far_in_future")
        );
        // Past the bound: taken, as far as these bounds say.
        assert_eq!(bounds.refused(b, Some(&at(old_s + 1))), None);
        assert_eq!(None, bounds.unsure(b, Some(&at(old_s + 1))));
        assert_eq!(None, bounds.unsure(c, Some(&at(new_s - 1))));
        // Only for the stream named, and never without a time.
        assert_eq!(bounds.refused(b, Some(&at(new_s + 1))), None);
        assert_eq!(bounds.refused(c, Some(&at(old_s - 1))), None);
        assert_eq!(bounds.refused(d, Some(&at(old_s - 1))), None);
        assert_eq!(None, bounds.unsure(d, Some(&at(old_s))));
        assert_eq!(bounds.refused(b, None), None);
        // Lower-case, as Loki 3.6+ writes, with an offset.
        let lower = TimeBounds::read(&format!(
            "entry for stream '{b}' has timestamp too new: 2099-01-01t09:00:00+09:00"
        ));
        assert_eq!(lower.refused(b, Some(&at(new_s))), None);
        assert_eq!(
            lower.refused(b, Some(&at(new_s + 1))),
            Some("too_far_in_future")
        );
        // An ingester's "too far behind" (a bound of the stream's own, which moves), a host
        // name spelling a sentence, or no time read: nothing known.
        let spelt = r#"{host="x' has timestamp too new: 1970-01-01T00:00:00Z"}"#;
        for message in [
            format!(
                "entry too far behind, entry timestamp is: 2024-10-01T00:00:00Z, oldest \
                 acceptable timestamp is: {old}"
            ),
            format!("entry for stream '{b}' has timestamp too new: soon"),
            format!("entry for stream '{b}' has timestamp too old: {old}"),
            format!("max entry size '262144' bytes exceeded for stream '{spelt}'"),
            String::new(),
        ] {
            let bounds = TimeBounds::read(&message);
            assert_eq!(bounds.refused(b, Some(&at(0))), None, "{message}");
            assert_eq!(
                bounds.refused(b, Some(&at(i64::MAX / 2))),
                None,
                "{message}"
            );
        }
        // Loki quotes the labels sorted, with the `service_name` it adds.
        let normal = TimeBounds::read(&format!(
            r#"entry for stream '{{environment="test", host="web-1", service="shop", service_name="shop"}}' has timestamp too new: {new}"#
        ));
        let ours = r#"{service="shop", host="web-1", environment="test"}"#;
        assert_eq!(
            normal.refused(ours, Some(&at(new_s + 1))),
            Some("too_far_in_future")
        );
        let other_host = r#"{service="shop", host="web-2", environment="test"}"#;
        assert_eq!(normal.refused(other_host, Some(&at(new_s + 1))), None);
        // A selector spelling a sentence is not the stream it names.
        let bounds = TimeBounds::read(&format!(
            "entry for stream '{spelt}' has timestamp too new: {new}"
        ));
        assert_eq!(bounds.refused(spelt, Some(&at(new_s + 1))), None);
    }

    #[test]
    fn refusals_are_named_by_lokis_reasons() {
        for (message, reason) in [
            (
                "entry for stream '{a=\"b\"}' has timestamp too old: 2024-10-01T00:00:00Z, oldest acceptable timestamp is: 2024-10-21T00:00:00Z",
                "greater_than_max_sample_age",
            ),
            (
                "entry for stream '{a=\"b\"}' has timestamp too new: 2099-01-01T00:00:00Z",
                "too_far_in_future",
            ),
            (
                "Max entry size '262144' bytes exceeded for stream '{a=\"b\"}' while adding an entry with length '307200' bytes",
                "line_too_long",
            ),
            (
                "stream '{a=\"b\"}' includes structured metadata, but this feature is disallowed. Please see `limits_config.allow_structured_metadata`",
                "disallowed_structured_metadata",
            ),
            (
                "stream '{a=\"b\"}' has label name too long: 'x'",
                "invalid_labels",
            ),
            // Loki 3.6+ writes its messages lower-case.
            (
                "max entry size '262144' bytes exceeded for stream '{a=\"b\"}' while adding an entry with length '307200' bytes",
                "line_too_long",
            ),
            (
                "error parsing labels '{a=\"b\"}' with error: 1:5: parse error: invalid UTF-8 rune",
                "invalid_labels",
            ),
            // Several errors on one line (Loki's grouped errors), or on several.
            (
                "2 errors like: stream '{a=\"b\"}' has an unknown problem; entry for stream '{a=\"b\"}' has timestamp too new: 2099-01-01T00:00:00Z",
                "too_far_in_future",
            ),
            (
                "stream '{a=\"b\"}' has an unknown problem\nentry for stream '{a=\"b\"}' has timestamp too old: 2024-10-01T00:00:00Z",
                "greater_than_max_sample_age",
            ),
            (
                "missing required labels 'team' for user 'fake' for stream '{a=\"b\"}' (policy: '')",
                "missing_enforced_labels",
            ),
            ("something else entirely", "loki_refused"),
            // Not the records' fault: retried, never dropped (see `LokiClient::push`).
            (
                "tenant ID 'shop|x' contains unsupported character '|'",
                UNKNOWN_REFUSAL,
            ),
            (
                "<html><body><h1>400 Bad Request</h1></body></html>",
                UNKNOWN_REFUSAL,
            ),
        ] {
            // Past 200 characters of labels before the phrase, too.
            let long = message.replacen("{a=", &format!("{{h=\"{}\", a=", "x".repeat(300)), 1);
            assert_eq!(refusal_reason(&long), reason, "{long}");
            assert_eq!(refusal_reason(message), reason, "{message}");
        }
    }

    fn client(url: &str, tenant: Option<&str>) -> anyhow::Result<LokiClient> {
        LokiClient::new(
            url,
            tenant.map(str::to_owned),
            Duration::from_secs(5),
            (Duration::from_millis(10), Duration::from_millis(50)),
            None,
        )
    }

    #[test]
    fn tenants_loki_refuses_fail_start_up_naming_the_key() {
        let longest = "t".repeat(150);
        let too_long = "t".repeat(151);
        for good in ["shop", "Mall-prod_1", "a.b", "!*'()", longest.as_str()] {
            assert!(client("http://loki:3100", Some(good)).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "shop|ops",
            "shop:team",
            "shop prod",
            "shop/prod",
            "주문",
            too_long.as_str(),
        ] {
            let error = client("http://loki:3100", Some(bad))
                .expect_err(bad)
                .to_string();
            assert!(error.contains("loki.tenant"), "{bad}: {error}");
        }
    }

    /// A push of `lines` entries of one stream.
    fn body(lines: usize) -> Vec<u8> {
        encode(&PushRequest {
            streams: vec![Stream {
                labels: r#"{service="shop"}"#.to_owned(),
                entries: (0..lines)
                    .map(|i| Entry {
                        timestamp: Some(prost_types::Timestamp {
                            seconds: 1_730_103_120,
                            nanos: i32::try_from(i).expect("few"),
                        }),
                        line: format!("line {i}"),
                        structured_metadata: Vec::new(),
                    })
                    .collect(),
                hash: 0,
            }],
        })
    }

    async fn receiver() -> crate::loki_receiver::LokiReceiver {
        let loki =
            crate::loki_receiver::LokiReceiver::start("127.0.0.1:0".parse().expect("an address"))
                .await
                .expect("starts");
        // The entries here are dated 2024.
        loki.accept_any_time();
        loki
    }

    #[tokio::test]
    async fn a_lone_record_refused_for_no_reason_of_its_own_is_retried_not_refused() {
        let loki = receiver().await;
        let client = client(&loki.url(), None).expect("a client");
        let stop = tokio_util::sync::CancellationToken::new();
        loki.fail_saying(
            axum::http::StatusCode::BAD_REQUEST,
            "tenant ID 'shop|x' contains unsupported character '|'",
            Duration::from_millis(300),
        );
        let mut failures = Vec::new();
        let pushed = client
            .push(body(1), true, &stop, |why| failures.push(why.to_owned()))
            .await;
        assert_eq!(pushed, Some(Pushed::Accepted));
        assert!(!failures.is_empty(), "retried");
        assert!(
            failures.iter().all(|why| why == "status 400"),
            "{failures:?}"
        );
        assert_eq!(loki.received().len(), 1, "nothing dropped");
        // A push of several is refused, for the caller to narrow down.
        loki.fail_saying(
            axum::http::StatusCode::BAD_REQUEST,
            "tenant ID 'shop|x' contains unsupported character '|'",
            Duration::from_secs(60),
        );
        let pushed = client.push(body(2), false, &stop, |_| {}).await;
        assert!(matches!(pushed, Some(Pushed::Refused(_))), "{pushed:?}");
    }

    #[tokio::test]
    async fn a_lone_record_refused_for_a_reason_of_its_own_is_refused() {
        let loki = receiver().await;
        let client = client(&loki.url(), None).expect("a client");
        let stop = tokio_util::sync::CancellationToken::new();
        let long = encode(&PushRequest {
            streams: vec![Stream {
                labels: r#"{service="shop"}"#.to_owned(),
                entries: vec![Entry {
                    timestamp: Some(prost_types::Timestamp {
                        seconds: 1_730_103_120,
                        nanos: 0,
                    }),
                    line: "x".repeat(crate::loki_receiver::MAX_LINE_BYTES + 1),
                    structured_metadata: Vec::new(),
                }],
                hash: 0,
            }],
        });
        let Some(Pushed::Refused(reason)) = client.push(long, true, &stop, |_| {}).await else {
            panic!("refused");
        };
        assert_eq!(refusal_reason(&reason), "line_too_long", "{reason}");
    }

    #[tokio::test]
    async fn a_429_is_retried_no_sooner_than_its_retry_after_and_the_tenant_goes_along() {
        let loki = receiver().await;
        // Backoff of 10 to 50 ms: only `Retry-After: 1` can make the wait a second, and a
        // ceiling of 5 s lets it.
        let client = LokiClient::new(
            &loki.url(),
            Some("shop".to_owned()),
            Duration::from_secs(5),
            (Duration::from_millis(10), Duration::from_secs(5)),
            None,
        )
        .expect("a client");
        let stop = tokio_util::sync::CancellationToken::new();
        // Long enough that the first try, however late on a busy machine, meets it; over
        // before the retry a second after.
        loki.fail(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            Duration::from_millis(900),
        );
        let started = std::time::Instant::now();
        let mut failures = Vec::new();
        let pushed = client
            .push(body(1), true, &stop, |why| failures.push(why.to_owned()))
            .await;
        assert_eq!(pushed, Some(Pushed::Accepted), "429 is not a refusal");
        assert_eq!(
            failures,
            ["status 429"],
            "one wait of a second covers the burst"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(950),
            "{:?}",
            started.elapsed()
        );
        let received = loki.received();
        assert_eq!(received.len(), 1, "stored once");
        assert_eq!(received[0].tenant.as_deref(), Some("shop"), "X-Scope-OrgID");
    }

    /// The retry's WARN line quotes Loki's answer, so on-call can tell which of Loki's limits
    /// a 429 is (the tenant's streams, its ingestion rate, a stream's rate).
    #[tokio::test]
    async fn a_retried_push_logs_lokis_answer() {
        let loki = receiver().await;
        let client = client(&loki.url(), None).expect("a client");
        let says = "Maximum active stream limit exceeded when trying to create stream \
                    {service=\"shop\"}, reduce the number of active streams, user: 'fake'\n\
                    a second line";
        loki.fail_saying(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            says,
            Duration::from_millis(500),
        );
        let (lines, pushed) = {
            let (lines, _default) = mall_test_support::capture::Captured::set_default();
            let stop = tokio_util::sync::CancellationToken::new();
            (lines, client.push(body(1), true, &stop, |_| {}).await)
        };
        assert_eq!(pushed, Some(Pushed::Accepted));
        let logged = lines.text();
        let warn = logged
            .lines()
            .find(|l| l.contains("a push to Loki failed"))
            .unwrap_or_else(|| panic!("a WARN line in {logged}"));
        assert!(
            warn.contains("Maximum active stream limit exceeded") && warn.contains("status 429"),
            "{warn}"
        );
        assert!(
            !warn.contains("a second line"),
            "the first line only: {warn}"
        );
    }

    /// A Loki that answers every push 400 with a body of `announced` bytes, sends `sent`
    /// of them, then holds the connection; a client of it, and a receiver told when each
    /// answer began.
    async fn stalling_400(
        announced: usize,
        sent: usize,
    ) -> (LokiClient, tokio::sync::mpsc::Receiver<()>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let addr = listener.local_addr().expect("bound");
        let (began, answers) = tokio::sync::mpsc::channel::<()>(16);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let began = began.clone();
                tokio::spawn(async move {
                    let mut request = [0; 4096];
                    let _ = socket.read(&mut request).await;
                    let head =
                        format!("HTTP/1.1 400 Bad Request\r\ncontent-length: {announced}\r\n\r\n");
                    let _ = socket.write_all(head.as_bytes()).await;
                    let _ = socket.write_all(&vec![b'x'; sent]).await;
                    let _ = began.try_send(());
                    tokio::time::sleep(Duration::from_secs(60)).await;
                });
            }
        });
        let client = LokiClient::new(
            &format!("http://{addr}"),
            None,
            Duration::from_secs(30),
            (Duration::from_millis(10), Duration::from_millis(50)),
            None,
        )
        .expect("a client");
        (client, answers)
    }

    /// A 400 whose answer is a proxy's endless page: 64 KiB of it is read, and a shutdown
    /// does not wait for the rest.
    #[tokio::test]
    async fn a_refusals_answer_is_read_up_to_64_kib_and_a_shutdown_does_not_wait_for_it() {
        // 100 MB announced, 1 MiB sent.
        let (client, _) = stalling_400(100_000_000, 1 << 20).await;
        let stop = tokio_util::sync::CancellationToken::new();
        let pushed = tokio::time::timeout(
            Duration::from_secs(10),
            client.push(body(1), false, &stop, |_| {}),
        )
        .await
        .expect("64 KiB read, the rest not waited for");
        let Some(Pushed::Refused(reason)) = pushed else {
            panic!("refused: {pushed:?}")
        };
        assert_eq!(reason.len(), MAX_REASON_BYTES);
        // Less than 64 KiB sent, the rest held back: a stop ends the wait.
        let (client, mut began) = stalling_400(100_000, 4).await;
        let pushing = tokio::spawn({
            let stop = stop.clone();
            async move { client.push(body(1), false, &stop, |_| {}).await }
        });
        began.recv().await.expect("the answer began");
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.cancel();
        let pushed = tokio::time::timeout(Duration::from_secs(2), pushing)
            .await
            .expect("a stop ends the read")
            .expect("no panic");
        assert_eq!(pushed, None);
    }

    #[tokio::test]
    async fn a_retry_after_past_retry_max_waits_retry_max() {
        let loki = receiver().await;
        // `Retry-After: 1` from the receiver; a ceiling of 100 ms.
        let client = LokiClient::new(
            &loki.url(),
            None,
            Duration::from_secs(5),
            (Duration::from_millis(10), Duration::from_millis(100)),
            None,
        )
        .expect("a client");
        let stop = tokio_util::sync::CancellationToken::new();
        // Waiting the header's second would fail twice at most; 100 ms apart, about ten
        // times.
        loki.fail(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            Duration::from_secs(1),
        );
        let mut failures = 0;
        let pushed = client.push(body(1), true, &stop, |_| failures += 1).await;
        assert_eq!(pushed, Some(Pushed::Accepted));
        assert!(
            failures >= 3,
            "retried every 100 ms, not once a second: {failures}"
        );
    }

    #[tokio::test]
    async fn a_loki_that_is_down_is_retried_until_it_is_up() {
        // An address nobody listens on, until the receiver starts there.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let client = client(&format!("http://{addr}"), None).expect("a client");
        let stop = tokio_util::sync::CancellationToken::new();
        // Dated now: the receiver is up at once, before it could be told to take old entries.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970");
        let fresh = encode(&PushRequest {
            streams: vec![Stream {
                labels: r#"{service="shop"}"#.to_owned(),
                entries: vec![Entry {
                    timestamp: Some(prost_types::Timestamp {
                        seconds: i64::try_from(now.as_secs()).expect("fits"),
                        nanos: 0,
                    }),
                    line: "line".to_owned(),
                    structured_metadata: Vec::new(),
                }],
                hash: 0,
            }],
        });
        let failures = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let pushing = {
            let failures = failures.clone();
            tokio::spawn(async move {
                client
                    .push(fresh, true, &stop, |why| {
                        crate::lock(&failures).push(why.to_owned());
                    })
                    .await
            })
        };
        mall_test_support::wait_until("a failed try", Duration::from_secs(5), || async {
            (!crate::lock(&failures).is_empty()).then_some(())
        })
        .await;
        let loki = crate::loki_receiver::LokiReceiver::start(addr)
            .await
            .expect("starts where Loki was down");
        let pushed = pushing.await.expect("joins");
        assert_eq!(pushed, Some(Pushed::Accepted));
        assert!(
            crate::lock(&failures).iter().all(|why| why == "connection"),
            "{failures:?}"
        );
        assert_eq!(loki.received().len(), 1, "stored once it was up");
    }

    #[tokio::test]
    async fn a_success_other_than_200_or_204_is_not_taken_for_one() {
        let loki = receiver().await;
        let client = client(&loki.url(), None).expect("a client");
        let stop = tokio_util::sync::CancellationToken::new();
        // Loki's `block_ingestion_status_code` default: the push was discarded.
        let blocked = axum::http::StatusCode::from_u16(260).expect("a status");
        loki.fail(blocked, Duration::from_millis(300));
        let mut failures = Vec::new();
        let pushed = client
            .push(body(1), true, &stop, |why| failures.push(why.to_owned()))
            .await;
        assert_eq!(pushed, Some(Pushed::Accepted));
        assert!(!failures.is_empty(), "retried");
        assert!(
            failures.iter().all(|why| why == "status 260"),
            "{failures:?}"
        );
        assert_eq!(loki.received().len(), 1, "stored once Loki took it");
    }
}
