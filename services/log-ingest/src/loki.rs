//! Loki's push API: `POST /loki/api/v1/push` with a protobuf `PushRequest` compressed with
//! raw (block) snappy; the client that sends our records, with retries.
//!
//! The messages are Loki's `logproto` push types (`pkg/push/push.proto` in grafana/loki),
//! declared here with prost's derive from their published field numbers: four small
//! messages are not worth a code generator or a crate pinned to another prost.
//!
//! Failures, classified: 429, 5xx and connection errors or timeouts are the environment's
//! (retried with jittered backoff, `Retry-After` honoured, until they pass: the buffer
//! holds the records meanwhile); 400 is the records' fault (Loki refuses them for good; the
//! caller narrows it down to the records at fault); 413 says the push is too large (the
//! caller splits it); anything else (401, 403, 404) is the operator's (retried with the
//! same backoff and logged at ERROR: fixing the configuration must not lose what waited).

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
    /// Loki refused it for good (400): its reason (the first line of its answer, uncut up to
    /// 64 KiB: Loki names the stream's labels before the reason), without the records' text.
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
            anyhow::ensure!(
                !tenant.is_empty() && reqwest::header::HeaderValue::from_str(tenant).is_ok(),
                "loki.tenant must be a non-empty header value (visible ASCII)"
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
    /// everything else. `None` when `stop` fired first.
    pub async fn push(
        &self,
        body: Vec<u8>,
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
            let (wait, why) = match sent {
                Ok(response) if response.status().is_success() => return Some(Pushed::Accepted),
                Ok(response) if response.status() == reqwest::StatusCode::PAYLOAD_TOO_LARGE => {
                    return Some(Pushed::TooLarge);
                }
                Ok(response) if response.status() == reqwest::StatusCode::BAD_REQUEST => {
                    let reason = response.text().await.unwrap_or_default();
                    let first = reason.lines().next().unwrap_or_default();
                    let end = first.floor_char_boundary(64 * 1024);
                    return Some(Pushed::Refused(first[..end].to_owned()));
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
                    if !transient {
                        tracing::error!(%status, "Loki refuses our pushes (authentication or URL?); retrying until it is fixed");
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
            tracing::warn!(why, failures, ?wait, "a push to Loki failed; retrying");
            tokio::select! {
                () = stop.cancelled() => return None,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// Loki's reason for refusing an entry (its `discarded_samples_total` reason names), read
/// from its 400 answer's message; `loki_refused` for one not known here.
pub fn refusal_reason(message: &str) -> &'static str {
    const KNOWN: [(&str, &str); 14] = [
        ("timestamp too old", "greater_than_max_sample_age"),
        ("timestamp too new", "too_far_in_future"),
        ("Max entry size", "line_too_long"),
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
        ("Error parsing labels", "invalid_labels"),
        ("label pair is required", "invalid_labels"),
        ("label names; limit", "invalid_labels"),
        ("label value too long", "invalid_labels"),
        ("label name too long", "invalid_labels"),
        ("duplicate label name", "invalid_labels"),
    ];
    let first = message.lines().next().unwrap_or_default();
    KNOWN
        .iter()
        .find(|(says, _)| first.contains(says))
        .map_or("loki_refused", |(_, reason)| reason)
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
            ("something else entirely", "loki_refused"),
        ] {
            // Past 200 characters of labels before the phrase, too.
            let long = message.replacen("{a=", &format!("{{h=\"{}\", a=", "x".repeat(300)), 1);
            assert_eq!(refusal_reason(&long), reason, "{long}");
            assert_eq!(refusal_reason(message), reason, "{message}");
        }
    }
}
