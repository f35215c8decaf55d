//! The marketing platform, behind one trait: what is sent for a member ([`Delivery`]), what
//! the partner answered ([`Outcome`]), and the adapters that speak each partner's dialect,
//! chosen by configuration ([`PartnerSettings`]):
//! - [`groobee`]: the mall's marketing platform. Bulk upserts of up to 1,000 members per
//!   request, an `x-api-key` header, HTTP 200 even on failure with the outcome in a body
//!   field `processCode`;
//! - [`webhook`]: a plain HTTPS webhook, one JSON POST per member or per batch, signed with
//!   the Standard Webhooks headers and carrying an `Idempotency-Key` stable across retries.
//!
//! Every answer is sorted by whose fault it is, so the delivery path can act on it without
//! knowing the dialect: the partner accepted the batch, perhaps refusing some members (their
//! fault: recorded, never retried); the environment failed (retry the whole batch later,
//! without using up anything); the partner limits our rate (every replica slows down); or the
//! partner refuses our configuration (stop deliveries and alert a person at once instead of
//! burning every message's retries).

pub mod groobee;
pub mod webhook;

use std::{fmt, time::Duration};

use tracing::Instrument as _;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// What one request to the partner carries for one member.
#[derive(Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Opaque internal member id (not personal data).
    pub member_id: String,
    /// The member change's source version.
    pub version: u64,
    /// The channels the member consents to.
    pub consent: Channels,
    /// The profile, with the contact data of channels without consent already removed;
    /// `None` for an opt-out (a member who withdrew consent is told to the partner with its
    /// id and channel flags only) and an erasure.
    pub profile: Option<Profile>,
    /// The member left the mall: the partner must delete it.
    pub erase: bool,
    /// When the service recorded this version (µs since the epoch), for the freshness metric.
    pub recorded_micros: i64,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("member_id", &self.member_id)
            .field("version", &self.version)
            .field("consent", &self.consent)
            .field("profile", &self.profile.as_ref().map(|_| "<redacted>"))
            .field("erase", &self.erase)
            .field("recorded_micros", &self.recorded_micros)
            .finish()
    }
}

/// Marketing consent per channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Channels {
    /// Marketing e-mail.
    pub email: bool,
    /// Marketing SMS and messenger messages.
    pub sms: bool,
    /// App push notifications.
    pub push: bool,
}

impl Channels {
    /// Whether any channel is consented to.
    pub fn any(self) -> bool {
        self.email || self.sms || self.push
    }
}

/// A member's marketing profile as sent. PERSONAL DATA: every field; `Debug` prints nothing
/// of it, so a stray `{:?}` in a log or an error cannot leak it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Profile {
    /// E-mail address; only with e-mail consent.
    pub email: Option<String>,
    /// E.164 phone number; only with SMS consent.
    pub phone: Option<String>,
    /// Name to address the member by.
    pub display_name: String,
    /// BCP 47 language tag; empty when unknown.
    pub preferred_language: String,
    /// Membership grade.
    pub grade: String,
    /// Interest tags.
    pub interests: Vec<String>,
}

impl fmt::Debug for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Profile(<redacted>)")
    }
}

/// One member of a batch that the partner refused: the member's fault (an invalid id, a phone
/// number the partner cannot use, a name too long). Recorded and not retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Position of the member in the batch that was sent.
    pub index: usize,
    /// Why, as a short code without personal data (e.g. `groobee:-1007`, `http:422`).
    pub reason: String,
}

/// The partner's answer to one request, by whose fault it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The partner took the batch. Members named in `refused` were refused for their own
    /// fault; every other member was accepted.
    Accepted {
        /// The refused members, by position in the batch.
        refused: Vec<Refusal>,
    },
    /// The partner refused the batch for one of its members but did not say which: send it
    /// again in smaller parts (a batch of one is then refused with this reason).
    Split {
        /// Why, as for [`Refusal::reason`].
        reason: String,
    },
    /// The environment failed (a 5xx, a timeout, a connection error, the partner busy with
    /// another process): nothing was taken; send the whole batch again later.
    Retry {
        /// What failed, without personal data.
        reason: String,
        /// When the partner said to come back, if it did.
        after: Option<Duration>,
    },
    /// The partner limits our rate (HTTP 429, or `processCode` −1004): nothing was taken;
    /// every replica slows down, and the batch is sent again.
    RateLimited {
        /// When the partner said to come back, if it did.
        after: Option<Duration>,
    },
    /// The partner refuses our configuration (key missing or wrong, account unknown or not
    /// approved, contract expired): no retry can succeed; stop deliveries and alert.
    Configuration {
        /// What the partner said, without personal data.
        reason: String,
    },
}

/// A partner dialect: turns a batch into one request and the answer into an [`Outcome`].
pub trait Partner: Send + Sync {
    /// Most members one request may carry.
    fn max_batch(&self) -> usize;

    /// Sends `batch` (1 to [`Partner::max_batch`] members) as one request, with
    /// `idempotency_key` where the dialect carries one (the same on every retry of the same
    /// batch), and sorts the answer. Never fails: transport errors and timeouts are
    /// [`Outcome::Retry`].
    fn send(
        &self,
        batch: &[Delivery],
        idempotency_key: &str,
    ) -> impl Future<Output = Outcome> + Send;
}

/// A member's JSON form, the same in both dialects.
pub mod json {
    use serde::{Deserialize, Serialize};

    use super::{Channels, Delivery};

    /// One member as sent. Contact fields of channels without consent are absent; an opt-out
    /// carries the id, the version and the channel flags only. PERSONAL DATA: `Debug` shows
    /// the id, version and flags only.
    #[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
    #[serde(rename_all = "camelCase")]
    pub struct Member {
        /// Internal member id.
        pub member_id: String,
        /// Source version of the change.
        pub version: u64,
        /// Consent per channel.
        pub opt_in: Channels,
        /// The member withdrew every consent: stop marketing to them.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pub opt_out: bool,
        /// The member left the mall: delete it (an erasure is also an opt-out).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pub erased: bool,
        /// E-mail; only with e-mail consent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub email: Option<String>,
        /// Phone; only with SMS consent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub phone: Option<String>,
        /// Display name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub name: Option<String>,
        /// Preferred language.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub language: Option<String>,
        /// Membership grade.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub grade: Option<String>,
        /// Interest tags.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub interests: Vec<String>,
    }

    impl std::fmt::Debug for Member {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Member")
                .field("member_id", &self.member_id)
                .field("version", &self.version)
                .field("opt_in", &self.opt_in)
                .field("opt_out", &self.opt_out)
                .field("erased", &self.erased)
                .finish_non_exhaustive()
        }
    }

    /// The JSON form of `delivery`.
    pub fn member(delivery: &Delivery) -> Member {
        let profile = delivery.profile.as_ref();
        let text = |value: &str| (!value.is_empty()).then(|| value.to_owned());
        Member {
            member_id: delivery.member_id.clone(),
            version: delivery.version,
            opt_in: delivery.consent,
            opt_out: profile.is_none(),
            erased: delivery.erase,
            email: profile.and_then(|p| p.email.clone()),
            phone: profile.and_then(|p| p.phone.clone()),
            name: profile.and_then(|p| text(&p.display_name)),
            language: profile.and_then(|p| text(&p.preferred_language)),
            grade: profile.and_then(|p| text(&p.grade)),
            interests: profile.map(|p| p.interests.clone()).unwrap_or_default(),
        }
    }
}

/// A partner dialect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PartnerKind {
    /// The mall's marketing platform (see [`groobee`]).
    Groobee,
    /// A Standard Webhooks receiver (see [`webhook`]).
    Webhook,
}

/// Which partner to deliver to, and how to reach it. One flat section (rather than one per
/// dialect) so that a file or the environment can switch `kind` over the defaults.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PartnerSettings {
    /// The dialect.
    pub kind: PartnerKind,
    /// Where to POST, e.g. `https://api.example.com/v1/members/bulk`.
    pub url: url::Url,
    /// groobee: the `x-api-key` value (a secret: never printed). Required for groobee.
    #[serde(serialize_with = "mall_config::serialize_optional_secret")]
    pub api_key: Option<SecretString>,
    /// webhook: the signing secret, `whsec_` and base64 of the key (never printed). Required
    /// for webhook.
    #[serde(serialize_with = "mall_config::serialize_optional_secret")]
    pub secret: Option<SecretString>,
    /// Members per request, 1 to 1,000; default 1,000 for groobee (its maximum) and 1 for
    /// webhook (one `member` event per POST; more sends `members` events).
    pub max_batch: Option<usize>,
    /// How long one request may take, connecting included.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A PEM CA file trusted for an `https://` partner in addition to the system's roots.
    /// Default: none.
    pub ca_file: Option<std::path::PathBuf>,
}

impl Default for PartnerSettings {
    /// The local partner simulator's groobee endpoint (`partner-simulator`).
    fn default() -> Self {
        Self::groobee(
            "http://127.0.0.1:8089/groobee"
                .parse()
                .expect("a valid URL"),
            SecretString::from("local-api-key"),
        )
    }
}

impl PartnerSettings {
    /// A groobee partner at `url` with `api_key`, other settings at their defaults.
    pub fn groobee(url: url::Url, api_key: SecretString) -> Self {
        Self {
            kind: PartnerKind::Groobee,
            url,
            api_key: Some(api_key),
            secret: None,
            max_batch: None,
            request_timeout: Duration::from_secs(10),
            ca_file: None,
        }
    }

    /// A webhook partner at `url` signing with `secret`, other settings at their defaults.
    pub fn webhook(url: url::Url, secret: SecretString) -> Self {
        Self {
            kind: PartnerKind::Webhook,
            api_key: None,
            secret: Some(secret),
            ..Self::groobee(url, SecretString::from(""))
        }
    }
}

/// The configured partner.
#[derive(Debug)]
pub enum AnyPartner {
    /// [`groobee::Groobee`].
    Groobee(groobee::Groobee),
    /// [`webhook::Webhook`].
    Webhook(webhook::Webhook),
}

impl AnyPartner {
    /// The adapter `settings` describe.
    ///
    /// # Errors
    /// When a setting is out of range (the message names it) or the HTTP client cannot be
    /// built.
    pub fn new(settings: &PartnerSettings) -> anyhow::Result<Self> {
        let url = settings.url.clone();
        let client = http_client(settings.request_timeout, settings.ca_file.as_deref())?;
        Ok(match settings.kind {
            PartnerKind::Groobee => {
                let key = settings.api_key.clone().ok_or_else(|| {
                    anyhow::anyhow!("partner.api_key is required for partner.kind = groobee")
                })?;
                let max_batch = settings.max_batch.unwrap_or(groobee::MAX_BATCH);
                Self::Groobee(groobee::Groobee::new(url, key, max_batch, client)?)
            }
            PartnerKind::Webhook => {
                let secret = settings.secret.as_ref().ok_or_else(|| {
                    anyhow::anyhow!("partner.secret is required for partner.kind = webhook")
                })?;
                let max_batch = settings.max_batch.unwrap_or(1);
                Self::Webhook(webhook::Webhook::new(url, secret, max_batch, client)?)
            }
        })
    }
}

impl Partner for AnyPartner {
    fn max_batch(&self) -> usize {
        match self {
            Self::Groobee(p) => p.max_batch(),
            Self::Webhook(p) => p.max_batch(),
        }
    }

    async fn send(&self, batch: &[Delivery], idempotency_key: &str) -> Outcome {
        match self {
            Self::Groobee(p) => p.send(batch, idempotency_key).await,
            Self::Webhook(p) => p.send(batch, idempotency_key).await,
        }
    }
}

/// The HTTP client of an adapter: `timeout` bounds each request, connecting included; an
/// `https://` partner is trusted by the system's roots and the certificates of `ca_file`.
///
/// # Errors
/// When `ca_file` cannot be read or the client cannot be built.
pub fn http_client(
    timeout: Duration,
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("mall-member-export/", env!("CARGO_PKG_VERSION")));
    if let Some(ca_file) = ca_file {
        for cert in
            anyhow::Context::context(mall_grpc::tls::extra_roots(ca_file), "partner.ca_file")?
        {
            builder = builder.add_root_certificate(reqwest::Certificate::from_der(&cert)?);
        }
    }
    Ok(builder.build()?)
}

/// Posts `body` as JSON with `headers`: the response, or the outcome of a request that got
/// none (a transport failure or a timeout, to retry).
async fn post_json(
    client: &reqwest::Client,
    url: &url::Url,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<reqwest::Response, Outcome> {
    // An HTTP client span (semantic conventions), whose context goes out as W3C
    // `traceparent`: the partner's request is the last step of the member change's trace.
    let span = tracing::info_span!(
        "POST",
        otel.kind = "client",
        http.request.method = "POST",
        server.address = url.host_str().unwrap_or_default(),
        server.port = url.port_or_known_default(),
        url.full = %without_query(url),
        http.response.status_code = tracing::field::Empty,
        "error.type" = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    let mut request = client
        .post(url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json");
    let (traceparent, tracestate) = mall_telemetry::propagation::current_trace_headers(&span);
    for (name, value) in [
        (mall_telemetry::propagation::TRACEPARENT, traceparent),
        (mall_telemetry::propagation::TRACESTATE, tracestate),
    ] {
        if let Some(value) = value {
            request = request.header(name, value);
        }
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let sent = request.body(body).send().instrument(span.clone()).await;
    match &sent {
        Ok(response) => {
            let status = response.status();
            span.record("http.response.status_code", status.as_u16());
            // HTTP client conventions: 4xx and 5xx are errors of the client span.
            if status.is_client_error() || status.is_server_error() {
                span.record("error.type", status.as_str());
                span.record("otel.status_code", "error");
            }
        }
        Err(error) => {
            let kind = if error.is_timeout() {
                "timeout"
            } else {
                "transport"
            };
            span.record("error.type", kind);
            span.record("otel.status_code", "error");
        }
    }
    sent.map_err(|error| transport_failure(&error))
}

/// `url` without its query and fragment, for a span attribute (a query could hold a secret).
fn without_query(url: &url::Url) -> url::Url {
    let mut url = url.clone();
    url.set_query(None);
    url.set_fragment(None);
    let _ = url.set_password(None);
    let _ = url.set_username("");
    url
}

/// The wait a `Retry-After` header asks for, in its delay-seconds form (partners that send a
/// date instead are treated as saying nothing).
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// The outcome of a request that got no usable answer.
fn transport_failure(error: &reqwest::Error) -> Outcome {
    // reqwest's message names the URL, never the body; keep only what kind of failure it was.
    let reason = if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connect"
    } else if error.is_body() || error.is_decode() {
        "body"
    } else {
        "transport"
    };
    Outcome::Retry {
        reason: reason.to_owned(),
        after: None,
    }
}

/// The outcome of an HTTP status no dialect explains by its body: 408, 425 and 5xx are the
/// environment's, 429 a rate limit, 401, 403 and 404 our configuration (wrong key, wrong
/// URL), and any other 4xx a request the partner cannot take, which is ours to fix too.
fn by_status(status: reqwest::StatusCode, after: Option<Duration>) -> Outcome {
    let code = status.as_u16();
    match code {
        429 => Outcome::RateLimited { after },
        408 | 425 | 500..=599 => Outcome::Retry {
            reason: format!("http:{code}"),
            after,
        },
        _ => Outcome::Configuration {
            reason: format!("http:{code}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_holds_no_personal_data() {
        let delivery = Delivery {
            member_id: "M-1".into(),
            version: 3,
            consent: Channels {
                email: true,
                sms: false,
                push: false,
            },
            erase: false,
            recorded_micros: 0,
            profile: Some(Profile {
                email: Some("kim@example.com".into()),
                phone: None,
                display_name: "Kim Minji".into(),
                preferred_language: "ko".into(),
                grade: "GOLD".into(),
                interests: vec!["golf".into()],
            }),
        };
        let printed = format!("{delivery:?} {:?}", delivery.profile);
        assert!(printed.contains("M-1"), "{printed}");
        for secret in ["kim@example.com", "Kim Minji", "golf", "GOLD"] {
            assert!(!printed.contains(secret), "{printed} shows {secret}");
        }
    }

    #[test]
    fn statuses_are_sorted_by_whose_fault_they_are() {
        let status = |code| reqwest::StatusCode::from_u16(code).expect("valid");
        assert_eq!(
            by_status(status(429), None),
            Outcome::RateLimited { after: None }
        );
        assert!(matches!(
            by_status(status(503), None),
            Outcome::Retry { .. }
        ));
        assert!(matches!(
            by_status(status(408), None),
            Outcome::Retry { .. }
        ));
        assert!(matches!(
            by_status(status(401), None),
            Outcome::Configuration { .. }
        ));
        assert!(matches!(
            by_status(status(404), None),
            Outcome::Configuration { .. }
        ));
    }

    #[test]
    fn settings_never_print_secrets() {
        let settings: PartnerSettings = serde_json::from_value(serde_json::json!({
            "kind": "groobee",
            "url": "http://127.0.0.1:1/members",
            "api_key": "very-secret-key",
        }))
        .expect("valid settings");
        assert!(AnyPartner::new(&settings).is_ok());
        let webhook_without_secret = PartnerSettings {
            kind: PartnerKind::Webhook,
            ..settings.clone()
        };
        let error = AnyPartner::new(&webhook_without_secret).expect_err("no secret");
        assert!(
            error.to_string().contains("partner.secret is required"),
            "{error}"
        );
        // Serialized only into the in-memory merge of configuration sources; printed
        // (Debug) it is redacted.
        let shown = format!("{settings:?}");
        assert!(!shown.contains("very-secret-key"), "{shown}");
    }
}
