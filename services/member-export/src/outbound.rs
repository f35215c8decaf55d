//! The outbound path to the partner, a tower stack in which every attempt takes a rate-limit
//! token:
//!
//! retry (only [`Outcome::Retry`] and [`Outcome::RateLimited`]; jittered exponential backoff
//! from `mall-retry`, or the partner's `Retry-After` when it gave one) → rate limit (the
//! Deployment-wide [`RateLimiter`], which a rate refusal slows down for every replica) →
//! concurrency limit (tower) → the adapter (whose HTTP client bounds each request with the
//! configured timeout).
//!
//! The retry gives up after `max_attempts` with the last outcome; the caller then keeps its
//! queue messages and tries again later (an environment failure never uses up a message's
//! receives).

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tower::{Service, ServiceBuilder, ServiceExt as _, limit::ConcurrencyLimit, retry::Retry};

use crate::{
    metrics::MemberMetrics,
    partner::{AnyPartner, Delivery, Outcome, Partner},
    ratelimit::RateLimiter,
    store::now_micros,
};

/// One request to the partner: a batch and its idempotency key (the same on every attempt).
#[derive(Debug, Clone)]
pub struct Batch {
    /// The members.
    pub deliveries: Arc<[Delivery]>,
    /// Stable across attempts and redeliveries of the same batch.
    pub idempotency_key: String,
    /// Until when (µs since the epoch) the sender's claims on the members are known to hold;
    /// an attempt that could outlast them is not made (see [`PartnerService`]).
    pub claimed_until: Option<Arc<AtomicI64>>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The stack's innermost service: the configured adapter, counted. An attempt whose
/// request could outlast the sender's claims on its members (they were not renewed: the
/// database was unreachable, or another sender took them over) is not made: it answers
/// [`Outcome::Retry`] without a request, and the sender claims again after its wait.
#[derive(Debug, Clone)]
pub struct PartnerService {
    partner: Arc<AnyPartner>,
    /// The longest a request may take (the adapter's timeout).
    request_timeout: Duration,
    metrics: MemberMetrics,
}

impl Service<Batch> for PartnerService {
    type Response = Outcome;
    type Error = Infallible;
    type Future = BoxFuture<Result<Outcome, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, batch: Batch) -> Self::Future {
        let partner = self.partner.clone();
        let metrics = self.metrics.clone();
        let timeout = i64::try_from(self.request_timeout.as_micros()).unwrap_or(i64::MAX);
        Box::pin(async move {
            if let Some(until) = &batch.claimed_until
                && until.load(Ordering::Acquire) < now_micros().saturating_add(timeout)
            {
                return Ok(Outcome::Retry {
                    reason: "the claims on the batch's members may have lapsed".into(),
                    after: None,
                });
            }
            metrics.in_flight.inc();
            let outcome = partner
                .send(&batch.deliveries, &batch.idempotency_key)
                .await;
            metrics.in_flight.dec();
            metrics.count_request(&outcome);
            Ok(outcome)
        })
    }
}

/// Waits for a slot of the shared limit before each call; slows it down on a rate refusal.
#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: RateLimiter,
    metrics: MemberMetrics,
}

impl<S> Service<Batch> for RateLimit<S>
where
    S: Service<Batch, Response = Outcome, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Outcome;
    type Error = Infallible;
    type Future = BoxFuture<Result<Outcome, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Readiness (the concurrency permit) is awaited in the call, per attempt.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, batch: Batch) -> Self::Future {
        let mut inner = self.inner.clone();
        let limiter = self.limiter.clone();
        let metrics = self.metrics.clone();
        Box::pin(async move {
            // The concurrency permit first, then the slot: a slot taken while waiting for a
            // permit would be used late, and late slots go out in bursts.
            let ready = match inner.ready().await {
                Ok(ready) => ready,
                Err(never) => match never {},
            };
            let waited = std::time::Instant::now();
            limiter.acquire().await;
            metrics
                .rate_limit_wait
                .observe(waited.elapsed().as_secs_f64());
            let outcome = ready.call(batch).await;
            if let Ok(Outcome::RateLimited { after }) = &outcome {
                limiter.back_off(*after).await;
            }
            outcome
        })
    }
}

/// The retry policy; see the module docs.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    attempts: u32,
    max_attempts: u32,
    initial: Duration,
    max: Duration,
}

impl tower::retry::Policy<Batch, Outcome, Infallible> for RetryPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _: &mut Batch,
        result: &mut Result<Outcome, Infallible>,
    ) -> Option<Self::Future> {
        let after = match result {
            Ok(Outcome::Retry { after, .. } | Outcome::RateLimited { after }) => *after,
            _ => return None,
        };
        self.attempts += 1;
        if self.attempts >= self.max_attempts {
            return None;
        }
        let backoff = mall_retry::Backoff::after(self.initial, self.max, self.attempts);
        Some(tokio::time::sleep(after.unwrap_or(backoff).min(self.max)))
    }

    fn clone_request(&mut self, batch: &Batch) -> Option<Batch> {
        Some(batch.clone())
    }
}

/// How the stack is shaped.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests in flight at once.
    pub max_concurrency: usize,
    /// Attempts per batch before the caller takes over.
    pub max_attempts: u32,
    /// First retry wait, doubling up to `retry_max`.
    pub retry_initial: Duration,
    /// Longest retry wait (and the longest `Retry-After` honoured).
    pub retry_max: Duration,
    /// The adapter's per-request timeout.
    pub request_timeout: Duration,
}

/// The outbound stack; clones share the rate limit and the concurrency limit.
pub type Outbound = Retry<RetryPolicy, RateLimit<ConcurrencyLimit<PartnerService>>>;

/// Builds the stack for `partner`, limited by `limiter`.
pub fn outbound(
    partner: AnyPartner,
    limiter: RateLimiter,
    limits: Limits,
    metrics: &MemberMetrics,
) -> Outbound {
    ServiceBuilder::new()
        .retry(RetryPolicy {
            attempts: 0,
            max_attempts: limits.max_attempts.max(1),
            initial: limits.retry_initial,
            max: limits.retry_max,
        })
        .layer_fn(|inner| RateLimit {
            inner,
            limiter: limiter.clone(),
            metrics: metrics.clone(),
        })
        .concurrency_limit(limits.max_concurrency.max(1))
        .service(PartnerService {
            request_timeout: limits.request_timeout,
            partner: Arc::new(partner),
            metrics: metrics.clone(),
        })
}

/// Sends `batch` through `outbound`.
pub async fn send(outbound: &Outbound, batch: Batch) -> Outcome {
    match outbound.clone().oneshot(batch).await {
        Ok(outcome) => outcome,
        Err(never) => match never {},
    }
}
