//! Who may call what: the per-method policy, checked for every call before it reaches a
//! handler, and a bound on each caller's calls in flight.
//!
//! With TLS on, a caller is the identity in its client certificate ([`crate::listen::Peer`]).
//! Health checks need no identity. Server reflection needs one. Every other method is allowed
//! to the admins and to the callers a rule lists for it (`*` in `callers`: any authenticated
//! caller); a method no rule lists is for the admins only. Refusals are UNAUTHENTICATED
//! (no certificate, or one that names no identity) and PERMISSION_DENIED, each with an
//! `ErrorInfo` carrying the reason and the method, and nothing about the policy itself.
//!
//! Without TLS (the local default on 127.0.0.1, or `server.insecure = true`) there are no
//! identities and the policy is not applied.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use mall_telemetry::metrics::{IntCounterVec, Opts, Registry};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};
use tower::{Layer, Service};

use crate::{
    error::ERROR_DOMAIN,
    listen::{Listener, Peer},
    methods::Methods,
    throttle::Throttle,
};

/// In a rule's `callers`: any caller with a certificate from the configured CA.
pub const ANY_AUTHENTICATED: &str = "*";

/// The identities the default policies name. A deployment with other service accounts or
/// another trust domain sets `server.authz` itself.
pub mod identities {
    /// The operators' identity (relayctl, memberctl, on-call): every method.
    pub const ADMIN: &str = "spiffe://mall.internal/ns/mall-ops/sa/mall-admin";
    /// sync-relay: writes to the catalog.
    pub const SYNC_RELAY: &str = "spiffe://mall.internal/ns/mall-platform/sa/sync-relay";
    /// The legacy commerce platform's product publisher: PublishProductChanges.
    pub const PRODUCT_PRODUCER: &str = "spiffe://mall.internal/ns/commerce/sa/product-producer";
    /// The member system: EnqueueMemberChanges and EraseMember.
    pub const MEMBER_SYSTEM: &str = "spiffe://mall.internal/ns/commerce/sa/member-system";
    /// The log shippers (Fluent Bit, OpenTelemetry collectors): OTLP log export.
    pub const LOG_SHIPPER: &str = "spiffe://mall.internal/ns/logging/sa/log-shipper";
}

/// `[server.authz]`: who may call which methods when TLS is on.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthzSettings {
    /// Identities that may call every method. Default: [`identities::ADMIN`].
    pub admins: Vec<String>,
    /// Who else may call what. Setting `rules` in a configuration file replaces the service's
    /// default rules as a whole (each service documents its defaults).
    pub rules: Vec<AuthzRule>,
}

/// One rule: these callers may call these methods.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuthzRule {
    /// `package.Service/Method` or `package.Service/*`, of a service this server serves.
    pub methods: Vec<String>,
    /// Identities (`spiffe://...` or a DNS name), or `*` for any authenticated caller.
    pub callers: Vec<String>,
}

impl AuthzRule {
    /// A rule allowing `callers` to call `methods`.
    pub fn new(methods: &[&str], callers: &[&str]) -> Self {
        Self {
            methods: methods.iter().map(|&m| m.to_owned()).collect(),
            callers: callers.iter().map(|&c| c.to_owned()).collect(),
        }
    }
}

impl AuthzSettings {
    /// The admin identity and `rules`.
    pub fn with_rules(rules: Vec<AuthzRule>) -> Self {
        Self {
            admins: vec![identities::ADMIN.to_owned()],
            rules,
        }
    }
}

#[derive(Debug, Default)]
struct Allowed {
    anyone: bool,
    identities: HashSet<Arc<str>>,
}

impl Allowed {
    fn add(&mut self, callers: &[Arc<str>]) {
        for caller in callers {
            if &**caller == ANY_AUTHENTICATED {
                self.anyone = true;
            } else {
                self.identities.insert(caller.clone());
            }
        }
    }

    fn allows(&self, identity: &str) -> bool {
        self.anyone || self.identities.contains(identity)
    }
}

/// What the policy says about one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The call may proceed.
    Allow,
    /// No identity: no certificate, or one naming none.
    Unauthenticated,
    /// An identity the policy does not allow for this method.
    Denied,
}

/// The compiled `[server.authz]` of one server.
#[derive(Debug)]
pub struct Policy {
    admins: HashSet<Arc<str>>,
    /// By full path, `/package.Service/Method`.
    methods: HashMap<String, Allowed>,
    /// By service, for `package.Service/*` rules.
    services: HashMap<String, Allowed>,
}

const HEALTH: &str = "grpc.health.v1.Health";
const REFLECTION: [&str; 2] = [
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

impl Policy {
    /// Checks `settings` against the services (`served`) and methods (`methods`) this server
    /// serves and compiles it.
    ///
    /// # Errors
    /// A method pattern that is malformed or names a service or method not served here, or an
    /// empty caller, named by its place in the settings.
    pub fn compile(
        settings: &AuthzSettings,
        served: &[String],
        methods: &Methods,
    ) -> anyhow::Result<Self> {
        let mut policy = Self {
            admins: settings
                .admins
                .iter()
                .map(|a| Arc::from(a.as_str()))
                .collect(),
            methods: HashMap::new(),
            services: HashMap::new(),
        };
        for (i, rule) in settings.rules.iter().enumerate() {
            let callers: Vec<Arc<str>> = rule.callers.iter().map(|c| Arc::from(c.trim())).collect();
            if let Some(j) = callers.iter().position(|c| c.is_empty()) {
                anyhow::bail!("server.authz.rules[{i}].callers[{j}] is empty");
            }
            for (j, pattern) in rule.methods.iter().enumerate() {
                let field = format!("server.authz.rules[{i}].methods[{j}]");
                let (service, method) = pattern.split_once('/').ok_or_else(|| {
                    anyhow::anyhow!(
                        "{field}: {pattern:?} is not package.Service/Method or package.Service/*"
                    )
                })?;
                if !served.iter().any(|s| s == service) {
                    anyhow::bail!("{field}: {service:?} is not a service this server serves");
                }
                if method.is_empty() || method.contains('/') {
                    anyhow::bail!(
                        "{field}: {pattern:?} is not package.Service/Method or package.Service/*"
                    );
                }
                if method != "*" && !methods.contains(&format!("/{pattern}")) {
                    anyhow::bail!("{field}: {service} has no method {method:?}");
                }
                let allowed = if method == "*" {
                    policy.services.entry(service.to_owned()).or_default()
                } else {
                    policy.methods.entry(format!("/{pattern}")).or_default()
                };
                allowed.add(&callers);
            }
        }
        Ok(policy)
    }

    /// What the policy says about a call of `path` (`/package.Service/Method`) from `peer`.
    pub fn decide(&self, path: &str, peer: Option<&Peer>) -> Decision {
        let service = path.trim_start_matches('/').split('/').next().unwrap_or("");
        if service == HEALTH {
            return Decision::Allow;
        }
        let Some(peer) = peer.filter(|p| p.tls) else {
            // Plaintext: no identities exist, so there is nothing to check (see module docs).
            return Decision::Allow;
        };
        let Some(identity) = peer.identity.as_deref() else {
            return Decision::Unauthenticated;
        };
        let allowed = REFLECTION.contains(&service)
            || self.admins.contains(identity)
            || self.methods.get(path).is_some_and(|a| a.allows(identity))
            || self
                .services
                .get(service)
                .is_some_and(|a| a.allows(identity));
        if allowed {
            Decision::Allow
        } else {
            Decision::Denied
        }
    }

    /// Whether `path` is for the admins only: not health or reflection, and no rule lists it.
    pub fn admin_only(&self, path: &str) -> bool {
        let service = path.trim_start_matches('/').split('/').next().unwrap_or("");
        service != HEALTH
            && !REFLECTION.contains(&service)
            && !self.methods.contains_key(path)
            && !self.services.contains_key(service)
    }

    /// Whether the policy names `identity`, so it may be a metric label value.
    fn names(&self, identity: &str) -> bool {
        self.admins.contains(identity)
            || self
                .methods
                .values()
                .chain(self.services.values())
                .any(|a| a.identities.contains(identity))
    }
}

/// Authorization metrics of one server.
#[derive(Debug, Clone)]
pub(crate) struct AuthzMetrics {
    decisions: IntCounterVec,
}

impl AuthzMetrics {
    pub(crate) fn register(registry: &Registry) -> mall_telemetry::metrics::Result<Self> {
        let decisions = IntCounterVec::new(
            Opts::new(
                "grpc_authz_decisions_total",
                "Authorization decisions on calls with TLS on, by method, caller (an identity \
                 the policy names, else other; none without a certificate) and outcome \
                 (allowed, unauthenticated, permission_denied, caller_limit, \
                 admin_listener_only)",
            ),
            &["method", "caller", "outcome"],
        )?;
        registry.register(Box::new(decisions.clone()))?;
        Ok(Self { decisions })
    }
}

struct Shared {
    policy: Policy,
    methods: Arc<Methods>,
    /// Whether the gRPC listeners speak TLS: a request without a [`Peer`] is then refused.
    tls_on: bool,
    metrics: AuthzMetrics,
    per_caller: usize,
    /// Whether `server.admin_grpc_addr` is set: admin-only methods are then refused on the
    /// main listener.
    admin_listener: bool,
    /// One semaphore per identity seen. Identities come only from certificates our CA
    /// issued, so the map is bounded by what the CA issues.
    callers: Mutex<HashMap<Arc<str>, Arc<Semaphore>>>,
    refusals: Throttle,
}

/// Applies the [`Policy`] and the per-caller limit to every call.
#[derive(Clone)]
pub(crate) struct AuthzLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AuthzLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthzLayer").finish_non_exhaustive()
    }
}

impl AuthzLayer {
    pub(crate) fn new(
        policy: Policy,
        methods: Arc<Methods>,
        tls_on: bool,
        metrics: AuthzMetrics,
        per_caller: usize,
        admin_listener: bool,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                policy,
                methods,
                tls_on,
                metrics,
                per_caller,
                admin_listener,
                callers: Mutex::new(HashMap::new()),
                refusals: Throttle::per_minute(20),
            }),
        }
    }
}

impl<S> Layer<S> for AuthzLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorize {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service built by [`AuthzLayer`].
#[derive(Clone)]
pub(crate) struct Authorize<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for Authorize<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorize").finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Authorize<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<PermitBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let shared = &self.shared;
        let path = request.uri().path();
        let peer = request.extensions().get::<Peer>();
        let identity = peer.and_then(|p| p.identity.clone());
        // Without connect info (no path of ours serves so) a TLS server knows no caller.
        let tls = peer.map_or(shared.tls_on, |p| p.tls);
        let health = path.starts_with("/grpc.health.v1.Health/");
        let decision = if !tls || health {
            Decision::Allow
        } else if peer.is_none() {
            Decision::Unauthenticated
        } else {
            shared.policy.decide(path, peer)
        };
        // The admin listener's methods are refused on the main one only to callers the policy
        // lets call them: the others get the policy's own answer, and learn nothing more.
        let on_main_listener = peer.is_none_or(|p| p.listener == Listener::Main);
        let wrong_listener = decision == Decision::Allow
            && shared.admin_listener
            && on_main_listener
            && shared.methods.contains(path)
            && shared.policy.admin_only(path);
        // The service polled ready is the one that must be called; leave a fresh clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if !wrong_listener && (!tls || health) {
            return Box::pin(
                async move { Ok(inner.call(request).await?.map(PermitBody::without)) },
            );
        }
        let method = shared.methods.label(path).to_owned();
        let refusal = match decision {
            _ if wrong_listener => Refusal::AdminListener,
            Decision::Allow => match &identity {
                Some(identity) => match shared.permit(identity) {
                    Some(permit) => {
                        shared.count(&method, Some(identity), "allowed");
                        // Held until the response's last frame: a stream counts as long as it
                        // is open.
                        return Box::pin(async move {
                            let response = inner.call(request).await?;
                            Ok(response.map(|body| PermitBody::with(body, permit)))
                        });
                    }
                    None => Refusal::CallerLimit,
                },
                None => Refusal::Unauthenticated,
            },
            Decision::Unauthenticated => Refusal::Unauthenticated,
            Decision::Denied => Refusal::Denied,
        };
        shared.count(&method, identity.as_deref(), refusal.outcome());
        if let Some(suppressed) = shared.refusals.allow() {
            let remote_addr = peer.map(|p| p.remote_addr);
            tracing::warn!(
                caller = identity.as_deref().unwrap_or("none"),
                remote_addr = ?remote_addr,
                method = %method,
                outcome = refusal.outcome(),
                suppressed,
                "call refused"
            );
        }
        let status = refusal.status(&method, shared.per_caller);
        Box::pin(async move { Ok(status.into_http()) })
    }
}

pin_project_lite::pin_project! {
    /// A response body holding its caller's permit until the last frame is sent (or the
    /// stream is dropped).
    pub(crate) struct PermitBody<B> {
        #[pin]
        inner: B,
        permit: Option<OwnedSemaphorePermit>,
    }
}

impl<B> PermitBody<B> {
    fn with(inner: B, permit: OwnedSemaphorePermit) -> Self {
        Self {
            inner,
            permit: Some(permit),
        }
    }

    fn without(inner: B) -> Self {
        Self {
            inner,
            permit: None,
        }
    }
}

impl<B: Default> Default for PermitBody<B> {
    fn default() -> Self {
        Self::without(B::default())
    }
}

impl<B: http_body::Body> http_body::Body for PermitBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = &frame {
            this.permit.take();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Shared {
    fn count(&self, method: &str, identity: Option<&str>, outcome: &str) {
        let caller = match identity {
            None => "none",
            Some(identity) if self.policy.names(identity) => identity,
            Some(_) => "other",
        };
        self.metrics
            .decisions
            .with_label_values(&[method, caller, outcome])
            .inc();
    }

    fn permit(&self, identity: &Arc<str>) -> Option<OwnedSemaphorePermit> {
        let semaphore = {
            let mut callers = self.callers.lock().unwrap_or_else(|e| e.into_inner());
            callers
                .entry(identity.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_caller)))
                .clone()
        };
        semaphore.try_acquire_owned().ok()
    }
}

enum Refusal {
    AdminListener,
    Unauthenticated,
    Denied,
    CallerLimit,
}

impl Refusal {
    fn outcome(&self) -> &'static str {
        match self {
            Self::AdminListener => "admin_listener_only",
            Self::Unauthenticated => "unauthenticated",
            Self::Denied => "permission_denied",
            Self::CallerLimit => "caller_limit",
        }
    }

    fn status(&self, method: &str, per_caller: usize) -> Status {
        let (code, reason, message) = match self {
            Self::AdminListener => (
                Code::PermissionDenied,
                "ADMIN_LISTENER_ONLY",
                "this method is served on the admin gRPC listener only".to_owned(),
            ),
            Self::Unauthenticated => (
                Code::Unauthenticated,
                "CLIENT_CERTIFICATE_REQUIRED",
                "this method needs a client certificate naming the caller".to_owned(),
            ),
            Self::Denied => (
                Code::PermissionDenied,
                "PERMISSION_DENIED",
                "the caller is not allowed to call this method".to_owned(),
            ),
            Self::CallerLimit => (
                Code::ResourceExhausted,
                "CALLER_CONCURRENCY_LIMIT",
                format!(
                    "the caller has {per_caller} calls in flight (server.per_caller_concurrency); \
                     retry with backoff"
                ),
            ),
        };
        let mut details = ErrorDetails::new();
        details.set_error_info(
            reason,
            ERROR_DOMAIN,
            HashMap::from([(
                "method".to_owned(),
                method.trim_start_matches('/').to_owned(),
            )]),
        );
        if matches!(self, Self::CallerLimit) {
            // Load, not a fault: OTLP exporters (the Collector's, opentelemetry-rust's) drop
            // a RESOURCE_EXHAUSTED that has no RetryInfo, as the OTLP specification says.
            details.set_retry_info(Some(CALLER_LIMIT_RETRY));
        }
        Status::with_error_details(code, message, details)
    }
}

/// How long a caller over `server.per_caller_concurrency` is told to wait (RetryInfo).
const CALLER_LIMIT_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(identity: Option<&str>) -> Peer {
        Peer {
            remote_addr: "127.0.0.1:1".parse().expect("an address"),
            listener: Listener::Main,
            tls: true,
            identity: identity.map(Arc::from),
        }
    }

    fn policy() -> Policy {
        let settings = AuthzSettings {
            admins: vec!["spiffe://t/ns/ops/sa/admin".to_owned()],
            rules: vec![
                AuthzRule::new(&["a.v1.Svc/Get"], &[ANY_AUTHENTICATED]),
                AuthzRule::new(&["a.v1.Svc/Put"], &["spiffe://t/ns/x/sa/writer"]),
                AuthzRule::new(&["b.v1.Other/*"], &["reader.example"]),
            ],
        };
        Policy::compile(
            &settings,
            &["a.v1.Svc".to_owned(), "b.v1.Other".to_owned()],
            &Methods::from_paths(["/a.v1.Svc/Get", "/a.v1.Svc/Put", "/a.v1.Svc/Pause"]),
        )
        .expect("a valid policy")
    }

    #[test]
    fn rules_admins_and_unlisted_methods() {
        let p = policy();
        let reader = peer(Some("spiffe://t/ns/x/sa/reader"));
        let writer = peer(Some("spiffe://t/ns/x/sa/writer"));
        let admin = peer(Some("spiffe://t/ns/ops/sa/admin"));
        let dns = peer(Some("reader.example"));
        assert_eq!(p.decide("/a.v1.Svc/Get", Some(&reader)), Decision::Allow);
        assert_eq!(p.decide("/a.v1.Svc/Put", Some(&reader)), Decision::Denied);
        assert_eq!(p.decide("/a.v1.Svc/Put", Some(&writer)), Decision::Allow);
        // Not listed: admins only.
        assert_eq!(p.decide("/a.v1.Svc/Pause", Some(&writer)), Decision::Denied);
        assert_eq!(p.decide("/a.v1.Svc/Pause", Some(&admin)), Decision::Allow);
        assert_eq!(
            p.decide("/b.v1.Other/Anything", Some(&dns)),
            Decision::Allow
        );
        assert_eq!(
            p.decide("/b.v1.Other/Anything", Some(&reader)),
            Decision::Denied
        );
        // Without a certificate only health; reflection needs one.
        let anonymous = peer(None);
        assert_eq!(
            p.decide("/a.v1.Svc/Get", Some(&anonymous)),
            Decision::Unauthenticated
        );
        assert_eq!(
            p.decide("/grpc.health.v1.Health/Check", Some(&anonymous)),
            Decision::Allow
        );
        assert_eq!(
            p.decide(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                Some(&anonymous)
            ),
            Decision::Unauthenticated
        );
        assert_eq!(
            p.decide(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                Some(&reader)
            ),
            Decision::Allow
        );
        // Plaintext: no policy.
        let plain = Peer {
            tls: false,
            ..peer(None)
        };
        assert_eq!(p.decide("/a.v1.Svc/Put", Some(&plain)), Decision::Allow);
    }

    #[test]
    fn malformed_rules_fail_naming_the_field() {
        let served = ["a.v1.Svc".to_owned()];
        let methods = Methods::from_paths(["/a.v1.Svc/Get"]);
        for (pattern, expected) in [
            ("a.v1.Svc", "rules[0].methods[0]"),
            ("a.v1.Nope/Get", "not a service this server serves"),
            ("a.v1.Svc/Gte", "has no method \"Gte\""),
            ("a.v1.Svc/", "rules[0].methods[0]"),
            ("a.v1.Svc/Get/More", "rules[0].methods[0]"),
        ] {
            let settings = AuthzSettings::with_rules(vec![AuthzRule::new(&[pattern], &["x"])]);
            let error = Policy::compile(&settings, &served, &methods)
                .expect_err(pattern)
                .to_string();
            assert!(error.contains(expected), "{pattern}: {error}");
        }
        let settings = AuthzSettings::with_rules(vec![AuthzRule::new(&["a.v1.Svc/Get"], &[" "])]);
        let error = Policy::compile(&settings, &served, &methods).expect_err("empty caller");
        assert!(error.to_string().contains("callers[0] is empty"), "{error}");
    }

    #[test]
    fn admin_only_methods_are_those_no_rule_lists() {
        let p = policy();
        assert!(p.admin_only("/a.v1.Svc/Pause"));
        assert!(!p.admin_only("/a.v1.Svc/Get"));
        assert!(!p.admin_only("/b.v1.Other/Anything"));
        assert!(!p.admin_only("/grpc.health.v1.Health/Check"));
        assert!(!p.admin_only("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"));
    }

    #[test]
    fn only_named_identities_become_label_values() {
        let p = policy();
        assert!(p.names("spiffe://t/ns/x/sa/writer"));
        assert!(p.names("spiffe://t/ns/ops/sa/admin"));
        assert!(!p.names("spiffe://t/ns/x/sa/reader"));
    }
}
