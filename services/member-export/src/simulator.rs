//! A partner simulator: a real HTTP server that speaks both partner dialects, for the tests,
//! the benchmark and local runs (`partner-simulator`), so deliveries can be seen and checked
//! without the real platform.
//!
//! - `POST /groobee`: the `groobee` bulk upsert ([`crate::partner::groobee`]): the key in
//!   `x-api-key` (missing: −1000; another key: −1001), HTTP 200 with a `processCode`.
//! - `POST /webhook`: a Standard Webhooks receiver ([`crate::partner::webhook`]): the
//!   signature is verified (401 when it does not match or the timestamp is more than five
//!   minutes off).
//! - `POST /alerts`: a Slack-compatible incoming webhook (`{"text": ...}`) for member-export's
//!   alerts, kept in order ([`Simulator::alerts`]).
//!
//! Its [`Behaviour`] can be changed while it runs: a rate limit (answered as HTTP 429 with
//! `Retry-After`, or in the groobee dialect as −1004), a share of server errors (503, or
//! −9999), a share of requests that hang (no answer until the client gives up), a latency
//! range, members it refuses for their own fault, and a configuration error (groobee −1003,
//! webhook 403). It records what it accepted per member ([`Simulator::members`]) and counts
//! what it answered ([`Simulator::counts`]). The wire types are the adapters' own, so both
//! sides share one model of a partial success.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    num::NonZeroU32,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use governor::{DefaultDirectRateLimiter, Quota};
use secrecy::SecretString;

use crate::partner::{
    Channels,
    groobee::{self, code},
    json::Member,
    webhook,
};

/// How the simulated partner behaves; see the module docs.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// Requests per second it takes (`None`: no limit); above it, requests are refused.
    pub rate_limit: Option<NonZeroU32>,
    /// How a rate-limited groobee request is answered: HTTP 429 (`true`) or HTTP 200 with
    /// −1004 (`false`). Webhook requests always get 429.
    pub rate_limit_as_429: bool,
    /// Share of requests answered with a server error (0.0 to 1.0).
    pub error_rate: f64,
    /// Share of requests that never get an answer.
    pub hang_rate: f64,
    /// Each answer waits a uniform time in this range.
    pub latency: (Duration, Duration),
    /// Members refused for their own fault (groobee −1007 in a partial success; webhook 422,
    /// or named in a batch's answer).
    pub refused_members: BTreeSet<String>,
    /// Every request is refused as a configuration error.
    pub configuration_error: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            rate_limit: None,
            rate_limit_as_429: true,
            error_rate: 0.0,
            hang_rate: 0.0,
            latency: (Duration::ZERO, Duration::ZERO),
            refused_members: BTreeSet::new(),
            configuration_error: false,
        }
    }
}

/// What the simulator accepted for one member.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Accepted {
    /// The highest version accepted.
    pub version: u64,
    /// The channel flags of that version.
    pub consent: Channels,
    /// Whether that version was an opt-out.
    pub opt_out: bool,
    /// Whether that version erased the member (its data deleted).
    pub erased: bool,
    /// Whether that version carried an e-mail address.
    pub has_email: bool,
    /// Whether that version carried a phone number.
    pub has_phone: bool,
    /// How many times the member was accepted (any version).
    pub deliveries: u32,
    /// The idempotency key of each webhook delivery, in arrival order.
    pub idempotency_keys: Vec<String>,
    /// The version of each delivery, in arrival order (beside `idempotency_keys` for the
    /// webhook dialect).
    pub versions: Vec<u64>,
}

/// What the simulator answered, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Requests received.
    pub requests: u64,
    /// Requests taken (fully or partly).
    pub accepted: u64,
    /// Requests refused for the rate limit.
    pub rate_limited: u64,
    /// Requests answered with a server error.
    pub errors: u64,
    /// Requests left without an answer.
    pub hung: u64,
    /// Member records taken, over all requests (a member taken twice counts twice).
    pub members_accepted: u64,
    /// Requests refused for the configuration (key, signature, contract).
    pub refused_configuration: u64,
}

struct Shared {
    api_key: String,
    webhook_secret: SecretString,
    behaviour: RwLock<(Behaviour, Option<Arc<DefaultDirectRateLimiter>>)>,
    members: Mutex<BTreeMap<String, Accepted>>,
    counts: Mutex<Counts>,
    alerts: Mutex<Vec<String>>,
}

/// A running simulator; stops when dropped.
#[derive(Clone)]
pub struct Simulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _stop: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Simulator {
    /// Starts a simulator on `listen` (port 0 for any) taking `api_key` (groobee) and
    /// `webhook_secret` (`whsec_<base64>`).
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn start(
        listen: SocketAddr,
        api_key: &str,
        webhook_secret: &str,
        behaviour: Behaviour,
    ) -> anyhow::Result<Self> {
        let limiter = limiter(&behaviour);
        let shared = Arc::new(Shared {
            api_key: api_key.to_owned(),
            webhook_secret: SecretString::from(webhook_secret.to_owned()),
            behaviour: RwLock::new((behaviour, limiter)),
            members: Mutex::new(BTreeMap::new()),
            counts: Mutex::new(Counts::default()),
            alerts: Mutex::new(Vec::new()),
        });
        let router = Router::new()
            .route("/groobee", post(groobee_upsert))
            .route("/webhook", post(webhook_receive))
            .route("/alerts", post(alert_receive))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(error) = served {
                tracing::warn!(%error, "the partner simulator stopped");
            }
        });
        Ok(Self {
            addr,
            shared,
            _stop: Arc::new(stop),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The groobee endpoint.
    pub fn groobee_url(&self) -> url::Url {
        format!("http://{}/groobee", self.addr)
            .parse()
            .expect("a valid URL")
    }

    /// The webhook endpoint.
    pub fn webhook_url(&self) -> url::Url {
        format!("http://{}/webhook", self.addr)
            .parse()
            .expect("a valid URL")
    }

    /// The alert endpoint.
    pub fn alerts_url(&self) -> String {
        format!("http://{}/alerts", self.addr)
    }

    /// The texts of the alerts it received, in order.
    pub fn alerts(&self) -> Vec<String> {
        lock(&self.shared.alerts).clone()
    }

    /// Changes how it behaves from the next request on.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        let limiter = limiter(&behaviour);
        *self
            .shared
            .behaviour
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (behaviour, limiter);
    }

    /// What it accepted, per member.
    pub fn members(&self) -> BTreeMap<String, Accepted> {
        lock(&self.shared.members).clone()
    }

    /// What it answered.
    pub fn counts(&self) -> Counts {
        *lock(&self.shared.counts)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn limiter(behaviour: &Behaviour) -> Option<Arc<DefaultDirectRateLimiter>> {
    // A burst of one second's worth, as a partner's per-second limit allows.
    behaviour
        .rate_limit
        .map(|rate| Arc::new(governor::RateLimiter::direct(Quota::per_second(rate))))
}

/// What the behaviour decides for one request before it is read.
enum Verdict {
    Serve,
    RateLimited,
    Error,
    Hang,
}

impl Shared {
    fn behaviour(&self) -> Behaviour {
        self.behaviour
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .clone()
    }

    async fn verdict(&self, behaviour: &Behaviour) -> Verdict {
        lock(&self.counts).requests += 1;
        let (low, high) = behaviour.latency;
        if high > Duration::ZERO {
            let span = high.saturating_sub(low).as_micros() as u64;
            let wait = low + Duration::from_micros(fastrand::u64(0..=span));
            tokio::time::sleep(wait).await;
        }
        if fastrand::f64() < behaviour.hang_rate {
            lock(&self.counts).hung += 1;
            return Verdict::Hang;
        }
        let limiter = self
            .behaviour
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
            .clone();
        if limiter.is_some_and(|limiter| limiter.check().is_err()) {
            lock(&self.counts).rate_limited += 1;
            return Verdict::RateLimited;
        }
        if fastrand::f64() < behaviour.error_rate {
            lock(&self.counts).errors += 1;
            return Verdict::Error;
        }
        Verdict::Serve
    }

    fn accept(&self, member: &Member, idempotency_key: Option<&str>) {
        lock(&self.counts).members_accepted += 1;
        let mut members = lock(&self.members);
        let accepted = members.entry(member.member_id.clone()).or_default();
        accepted.deliveries += 1;
        accepted.versions.push(member.version);
        if let Some(key) = idempotency_key {
            accepted.idempotency_keys.push(key.to_owned());
        }
        if member.version >= accepted.version {
            accepted.version = member.version;
            accepted.consent = member.opt_in;
            accepted.opt_out = member.opt_out;
            accepted.erased = member.erased;
            accepted.has_email = member.email.is_some();
            accepted.has_phone = member.phone.is_some();
        }
    }
}

async fn hang() -> Response {
    // Longer than any client waits; the client's timeout ends the request.
    tokio::time::sleep(Duration::from_secs(3_600)).await;
    StatusCode::GATEWAY_TIMEOUT.into_response()
}

fn groobee_answer(answer: &groobee::wire::Response) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        serde_json::to_vec(answer).unwrap_or_default(),
    )
        .into_response()
}

async fn groobee_upsert(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let behaviour = shared.behaviour();
    let answer = |process_code| groobee::wire::Response {
        process_code,
        ..Default::default()
    };
    match shared.verdict(&behaviour).await {
        Verdict::Serve => {}
        Verdict::Hang => return hang().await,
        Verdict::RateLimited if behaviour.rate_limit_as_429 => {
            return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")]).into_response();
        }
        Verdict::RateLimited => return groobee_answer(&answer(code::LIMIT_EXCEEDED)),
        Verdict::Error => return groobee_answer(&answer(code::SERVER_ERROR)),
    }
    let refuse = |process_code| {
        lock(&shared.counts).refused_configuration += 1;
        groobee_answer(&answer(process_code))
    };
    match headers.get("x-api-key").and_then(|k| k.to_str().ok()) {
        None => return refuse(code::KEY_MISSING),
        Some(key) if key != shared.api_key => return refuse(code::UNKNOWN_ACCOUNT),
        Some(_) if behaviour.configuration_error => return refuse(code::CONTRACT_EXPIRED),
        Some(_) => {}
    }
    let Ok(request) = serde_json::from_slice::<groobee::wire::Request>(&body) else {
        return groobee_answer(&answer(code::INVALID_DATA));
    };
    if request.members.is_empty() || request.members.len() > groobee::MAX_BATCH {
        return groobee_answer(&answer(code::INVALID_DATA));
    }
    let mut failed = Vec::new();
    for member in &request.members {
        if behaviour.refused_members.contains(&member.member_id) {
            failed.push(groobee::wire::FailedMember {
                member_id: member.member_id.clone(),
                process_code: code::INVALID_PHONE,
            });
        } else {
            shared.accept(member, None);
        }
    }
    lock(&shared.counts).accepted += 1;
    groobee_answer(&groobee::wire::Response {
        process_code: if failed.is_empty() {
            code::SUCCESS
        } else {
            code::PARTIAL_SUCCESS
        },
        message: String::new(),
        failed_members: failed,
    })
}

/// How far a webhook's timestamp may be from the receiver's clock.
const WEBHOOK_TOLERANCE: Duration = Duration::from_secs(300);

async fn webhook_receive(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let behaviour = shared.behaviour();
    match shared.verdict(&behaviour).await {
        Verdict::Serve => {}
        Verdict::Hang => return hang().await,
        Verdict::RateLimited => {
            return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")]).into_response();
        }
        Verdict::Error => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(id), Some(timestamp), Some(signatures)) = (
        header("webhook-id"),
        header("webhook-timestamp").and_then(|t| t.parse::<u64>().ok()),
        header("webhook-signature"),
    ) else {
        lock(&shared.counts).refused_configuration += 1;
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let expected = webhook::signature(&shared.webhook_secret, id, timestamp, &body).ok();
    // The header may hold several space-separated signatures (during a secret rotation).
    let signed = expected
        .is_some_and(|expected| signatures.split(' ').any(|candidate| candidate == expected));
    if !signed || now.abs_diff(timestamp) > WEBHOOK_TOLERANCE.as_secs() {
        lock(&shared.counts).refused_configuration += 1;
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if behaviour.configuration_error {
        lock(&shared.counts).refused_configuration += 1;
        return StatusCode::FORBIDDEN.into_response();
    }
    let key = header("idempotency-key").unwrap_or(id).to_owned();
    if let Ok(event) = serde_json::from_slice::<webhook::wire::Event<Member>>(&body) {
        if behaviour.refused_members.contains(&event.data.member_id) {
            return StatusCode::UNPROCESSABLE_ENTITY.into_response();
        }
        shared.accept(&event.data, Some(&key));
        lock(&shared.counts).accepted += 1;
        return StatusCode::NO_CONTENT.into_response();
    }
    let Ok(event) = serde_json::from_slice::<webhook::wire::Event<webhook::wire::Members>>(&body)
    else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let mut answer = webhook::wire::Answer::default();
    for member in &event.data.members {
        if behaviour.refused_members.contains(&member.member_id) {
            answer.refused.push(webhook::wire::RefusedMember {
                member_id: member.member_id.clone(),
                reason: "invalid_phone".into(),
            });
        } else {
            shared.accept(member, Some(&key));
        }
    }
    lock(&shared.counts).accepted += 1;
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        serde_json::to_vec(&answer).unwrap_or_default(),
    )
        .into_response()
}

async fn alert_receive(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let text = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|message| message["text"].as_str().map(str::to_owned));
    match text {
        Some(text) => {
            lock(&shared.alerts).push(text);
            (StatusCode::OK, "ok").into_response()
        }
        None => (StatusCode::BAD_REQUEST, "invalid_payload").into_response(),
    }
}
