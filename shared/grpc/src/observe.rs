//! The layer every gRPC call passes through first: trace span, deadline, metrics.
//!
//! For each call it
//! 1. opens a server span whose parent is the caller's W3C trace context (from metadata);
//! 2. bounds the call by the shorter of the server's request timeout and the client's
//!    `grpc-timeout`, answering DEADLINE_EXCEEDED and dropping (so cancelling) the work when
//!    it passes;
//! 3. turns errors from inner layers (load shedding) into gRPC statuses;
//! 4. counts the call and observes its latency by method and status code, when the status is
//!    known: in the response headers (errors), in the trailers (success and streams), or as
//!    CANCELLED when the client went away first.
//!
//! Labels come from bounded sets only: the method is the full gRPC path of a served service,
//! or `unknown` for anything else, so a scanner cannot blow up the series count.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use mall_telemetry::metrics::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use opentelemetry::propagation::Extractor;
use tonic::{Code, Status};
use tower::{BoxError, Layer, Service};
use tracing::Instrument as _;

use crate::methods::Methods;

/// Request counters and latency histograms, registered once per server.
#[derive(Debug, Clone)]
pub struct GrpcMetrics {
    requests: IntCounterVec,
    latency: HistogramVec,
}

impl GrpcMetrics {
    /// Registers `grpc_requests_total` and `grpc_request_duration_seconds` (with the
    /// registry's `mall_<service>` prefix).
    ///
    /// # Errors
    /// When the metrics are already registered in `registry`.
    pub fn register(registry: &Registry) -> mall_telemetry::metrics::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "grpc_requests_total",
                "gRPC calls finished, by method and status code",
            ),
            &["method", "code"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "grpc_request_duration_seconds",
                "Time from the request to the last response byte (status), by method and code",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
            &["method", "code"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        Ok(Self { requests, latency })
    }

    /// Creates the series of every served method at zero: `OK` (count and latency) and the
    /// server-error codes (count), so a dashboard or an alert on a method's error ratio finds
    /// its series before the first call, and `rate()` counts the first error after a start.
    pub fn preinit(&self, methods: &Methods) {
        for method in methods.paths() {
            let labels = [method, code_label(Code::Ok)];
            self.requests.with_label_values(&labels);
            self.latency.with_label_values(&labels);
            for code in SERVER_ERRORS {
                self.requests.with_label_values(&[method, code_label(code)]);
            }
        }
    }
}

/// Builds [`Observe`] services; see the module docs.
#[derive(Debug, Clone)]
pub struct ObserveLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    metrics: GrpcMetrics,
    /// The methods this server serves, the only method label values.
    methods: Arc<Methods>,
    request_timeout: Duration,
}

impl ObserveLayer {
    /// A layer recording into `metrics`, labelling the served `methods` (others `unknown`),
    /// and bounding calls by `request_timeout`.
    pub fn new(metrics: GrpcMetrics, methods: Arc<Methods>, request_timeout: Duration) -> Self {
        Self {
            shared: Arc::new(Shared {
                metrics,
                methods,
                request_timeout,
            }),
        }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service built by [`ObserveLayer`].
#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Observe<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ObservedBody<ResBody>>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        let method = self.method_label(path);
        let (rpc_service, rpc_method) = method
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or((method.as_str(), ""));
        let span = tracing::info_span!(
            "grpc.request",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %rpc_service,
            rpc.method = %rpc_method,
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        mall_telemetry::propagation::set_parent_from(&span, &HeaderExtractor(request.headers()));
        let timeout = client_timeout(request.headers()).map_or(self.shared.request_timeout, |t| {
            t.min(self.shared.request_timeout)
        });
        let recorder = Recorder {
            shared: self.shared.clone(),
            method,
            start: Instant::now(),
            span: span.clone(),
            code: None,
        };

        // The service polled ready is the one that must be called; leave a fresh clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(
            async move {
                let response = match tokio::time::timeout(timeout, inner.call(request)).await {
                    Ok(Ok(response)) => response,
                    Ok(Err(error)) => status_of_layer_error(error.into()).into_http(),
                    Err(_elapsed) => Status::deadline_exceeded(format!(
                        "the call did not finish within {timeout:?} and was abandoned"
                    ))
                    .into_http(),
                };
                let response = oversized_as_resource_exhausted(response);
                let (parts, body) = response.into_parts();
                let recorder = match code_in(&parts.headers) {
                    // Trailers-only response (an error): the status is already known.
                    Some(code) => {
                        recorder.finish(code);
                        None
                    }
                    None => Some(recorder),
                };
                Ok(http::Response::from_parts(
                    parts,
                    ObservedBody {
                        inner: body,
                        recorder,
                    },
                ))
            }
            .instrument(span),
        )
    }
}

impl<S> Observe<S> {
    fn method_label(&self, path: &str) -> String {
        self.shared.methods.label(path).to_owned()
    }
}

/// tonic refuses a request message above the service's `max_decoding_message_size` with
/// OUT_OF_RANGE; the contracts promise RESOURCE_EXHAUSTED, the code gRPC itself uses for size
/// limits, so the refusal is rewritten here, once, for every service.
fn oversized_as_resource_exhausted<B: Default>(response: http::Response<B>) -> http::Response<B> {
    if code_in(response.headers()) == Some(Code::OutOfRange)
        && response
            .headers()
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| {
                m.contains("message%20length%20too%20large")
                    || m.contains("message length too large")
            })
    {
        return crate::error::oversized_message().into_http();
    }
    response
}

/// Maps an error raised by a layer below (not by a handler) to a status.
fn status_of_layer_error(error: BoxError) -> Status {
    if error.is::<tower::load_shed::error::Overloaded>() {
        return Status::unavailable("server is at its concurrency limit; retry with backoff");
    }
    Status::from_error(error)
}

/// Records the outcome of one call exactly once: when finished, or as CANCELLED when dropped
/// before a status was seen (the client went away or the connection broke).
struct Recorder {
    shared: Arc<Shared>,
    method: String,
    start: Instant,
    span: tracing::Span,
    code: Option<Code>,
}

impl Recorder {
    fn finish(mut self, code: Code) {
        self.code = Some(code);
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let code = self.code.unwrap_or(Code::Cancelled);
        // An unknown method of a served service must not become a label value either.
        let method = if code == Code::Unimplemented {
            "unknown"
        } else {
            self.method.as_str()
        };
        let labels = [method, code_label(code)];
        let metrics = &self.shared.metrics;
        metrics.requests.with_label_values(&labels).inc();
        metrics
            .latency
            .with_label_values(&labels)
            .observe(self.start.elapsed().as_secs_f64());
        self.span.record("rpc.grpc.status_code", code as i32);
        if is_server_error(code) {
            self.span.record("otel.status_code", "error");
        }
    }
}

/// The codes that are the server's fault (semantic conventions for a gRPC server span: its
/// status is an error only for these), the same set the error-ratio alerts count.
pub const SERVER_ERRORS: [Code; 5] = [
    Code::Unknown,
    Code::Internal,
    Code::Unavailable,
    Code::DeadlineExceeded,
    Code::DataLoss,
];

/// Whether `code` is one of [`SERVER_ERRORS`].
pub fn is_server_error(code: Code) -> bool {
    SERVER_ERRORS.contains(&code)
}

pin_project_lite::pin_project! {
    /// Response body that reports the call's status when the trailers go out.
    pub struct ObservedBody<B> {
        #[pin]
        inner: B,
        recorder: Option<Recorder>,
    }
}

impl<B> std::fmt::Debug for ObservedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservedBody").finish_non_exhaustive()
    }
}

impl<B: Body> Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        let code = match &frame {
            Some(Ok(frame)) => frame.trailers_ref().map(|t| code_in(t).unwrap_or(Code::Ok)),
            Some(Err(_)) => Some(Code::Internal),
            None => Some(Code::Ok),
        };
        if let Some(code) = code
            && let Some(recorder) = this.recorder.take()
        {
            recorder.finish(code);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn code_in(headers: &HeaderMap) -> Option<Code> {
    let value = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some(Code::from_i32(value))
}

/// Parses the `grpc-timeout` header: up to 8 digits and a unit (H, M, S, m, u, n).
fn client_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The status code as its canonical upper-case name, for the `code` label.
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Reads W3C trace headers out of HTTP/2 request headers (gRPC metadata).
struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(timeout: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert("grpc-timeout", timeout.parse().expect("valid header value"));
        map
    }

    #[test]
    fn grpc_timeout_units_are_understood() {
        assert_eq!(client_timeout(&headers("5S")), Some(Duration::from_secs(5)));
        assert_eq!(
            client_timeout(&headers("250m")),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            client_timeout(&headers("2M")),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            client_timeout(&headers("7u")),
            Some(Duration::from_micros(7))
        );
    }

    #[test]
    fn malformed_grpc_timeout_is_ignored() {
        assert_eq!(client_timeout(&headers("5")), None);
        assert_eq!(client_timeout(&headers("5X")), None);
        assert_eq!(client_timeout(&headers("123456789S")), None);
        assert_eq!(client_timeout(&HeaderMap::new()), None);
    }
}
