//! The one place where domain errors become gRPC statuses.
//!
//! Handlers return `Result<_, ServiceError>`; `From<ServiceError> for Status` attaches the
//! rich error details callers act on: a `BadRequest` with one field violation per problem for
//! INVALID_ARGUMENT, and one `ErrorInfo` (reason, domain, metadata) on every error. Internal
//! errors are logged once, with their whole chain, and reach callers as a generic message with
//! the trace id that finds the log line (also in `ErrorInfo.metadata["trace_id"]`); a database's
//! or a queue's own error text never reaches a caller.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

/// Bytes of field violations listed in one error (see `From<ServiceError> for Status`).
const MAX_VIOLATION_BYTES: usize = 8 * 1024;

/// `ErrorInfo.domain` of every error the mall services return.
pub const ERROR_DOMAIN: &str = "platform.mall";

/// One problem with one field of a request, such as `updates[3].product.prices["USD"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the field, in the request's own field names (`updates[3].product.code`).
    pub field: String,
    /// What is wrong and what is allowed, in lowercase words.
    pub description: String,
}

/// An error a gRPC handler returns; the variants are what a caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request is malformed; nothing was changed. One violation per problem found.
    #[error("invalid argument: {} problem(s)", .0.len())]
    InvalidArgument(Vec<FieldViolation>),
    /// The named resource does not exist.
    #[error("{resource} {name:?} not found")]
    NotFound {
        /// Kind of resource, such as `product`.
        resource: &'static str,
        /// Its name or key.
        name: String,
    },
    /// The system is not in a state that allows the call (for example, replay without Kinesis).
    #[error("{message}")]
    FailedPrecondition {
        /// Machine-readable reason, UPPER_SNAKE_CASE.
        reason: &'static str,
        /// What is wrong, for a person.
        message: String,
    },
    /// A position (cursor, timestamp) is outside what is retained.
    #[error("{0}")]
    OutOfRange(String),
    /// A limit was exceeded (message size, items per request).
    #[error("{0}")]
    ResourceExhausted(String),
    /// A dependency is temporarily unreachable; the call can be retried with backoff.
    #[error("{0}")]
    Unavailable(String),
    /// This server cannot take the work now (a full buffer) but will soon: UNAVAILABLE with
    /// a `RetryInfo` saying how long to wait, which OTLP exporters and gRPC retry policies
    /// honour.
    #[error("{message}")]
    RetryLater {
        /// Machine-readable reason, UPPER_SNAKE_CASE.
        reason: &'static str,
        /// What is wrong, for a person.
        message: String,
        /// How long to wait before trying again.
        retry_after: std::time::Duration,
    },
    /// The caller asks for more at once than this server gives any caller (a limit on
    /// concurrent calls, a rate): RESOURCE_EXHAUSTED with a `RetryInfo` saying how long to
    /// wait. The caller's load, not the server's fault (no server-error alert counts it).
    #[error("{message}")]
    Throttled {
        /// Machine-readable reason, UPPER_SNAKE_CASE.
        reason: &'static str,
        /// What is wrong, for a person.
        message: String,
        /// How long to wait before trying again.
        retry_after: std::time::Duration,
    },
    /// The caller's deadline passed before the work finished; nothing was committed.
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// Anything else: a bug or an unexpected failure. Logged; callers see a generic message.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ServiceError {
    /// An INVALID_ARGUMENT with a single violation.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation {
            field: field.into(),
            description: description.into(),
        }])
    }

    /// The gRPC code this error is sent as.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotFound { .. } => Code::NotFound,
            Self::FailedPrecondition { .. } => Code::FailedPrecondition,
            Self::OutOfRange(_) => Code::OutOfRange,
            Self::ResourceExhausted(_) | Self::Throttled { .. } => Code::ResourceExhausted,
            Self::Unavailable(_) | Self::RetryLater { .. } => Code::Unavailable,
            Self::DeadlineExceeded => Code::DeadlineExceeded,
            Self::Internal(_) => Code::Internal,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::InvalidArgument(_) => "INVALID_ARGUMENT",
            Self::NotFound { .. } => "NOT_FOUND",
            Self::FailedPrecondition { reason, .. }
            | Self::RetryLater { reason, .. }
            | Self::Throttled { reason, .. } => reason,
            Self::OutOfRange(_) => "OUT_OF_RANGE",
            Self::ResourceExhausted(_) => "RESOURCE_EXHAUSTED",
            Self::Unavailable(_) => "UNAVAILABLE",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Self::Internal(_) => "INTERNAL",
        }
    }
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        let code = error.code();
        let mut metadata = HashMap::new();
        let mut details = ErrorDetails::new();
        let message = match &error {
            ServiceError::InvalidArgument(violations) => {
                // The details travel base64-encoded in a trailer, and HTTP/2 clients refuse
                // header blocks above 16 KiB by default (the whole call then fails with
                // PROTOCOL_ERROR instead of this error): list violations up to a budget, then
                // say how many more there are.
                let mut budget = MAX_VIOLATION_BYTES;
                let mut listed = 0;
                for v in violations {
                    let size = v.field.len() + v.description.len() + 8;
                    if size > budget {
                        break;
                    }
                    budget -= size;
                    listed += 1;
                    details.add_bad_request_violation(v.field.clone(), v.description.clone());
                }
                if listed < violations.len() {
                    details.add_bad_request_violation(
                        String::new(),
                        format!(
                            "{} more problem(s) not listed; fix these and send again",
                            violations.len() - listed
                        ),
                    );
                }
                let first = violations
                    .first()
                    .map(|v| format!(": {}: {}", v.field, v.description))
                    .unwrap_or_default();
                format!("invalid request, {} problem(s){first}", violations.len())
            }
            ServiceError::NotFound { resource, name } => {
                metadata.insert("resource".to_owned(), (*resource).to_owned());
                metadata.insert("name".to_owned(), name.clone());
                error.to_string()
            }
            ServiceError::RetryLater { retry_after, .. }
            | ServiceError::Throttled { retry_after, .. } => {
                details.set_retry_info(Some(*retry_after));
                error.to_string()
            }
            ServiceError::Internal(cause) => {
                // The cause (a database's or a queue's own message) stays in the log; the
                // caller gets the trace id to quote, which finds that log line.
                tracing::error!(error = ?cause, "internal error");
                match current_trace_id() {
                    Some(trace_id) => {
                        let message = format!(
                            "internal error; the server logged the cause under trace id {trace_id}"
                        );
                        metadata.insert("trace_id".to_owned(), trace_id);
                        message
                    }
                    None => "internal error; the cause was logged by the server".to_owned(),
                }
            }
            _ => error.to_string(),
        };
        details.set_error_info(error.reason(), ERROR_DOMAIN, metadata);
        Status::with_error_details(code, message, details)
    }
}

/// The current span's trace id, when it belongs to a trace.
fn current_trace_id() -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let context = tracing::Span::current().context();
    let span = context.span();
    let span_context = span.span_context();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

/// The status for a request message above the server's maximum message size.
pub fn oversized_message() -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info("MESSAGE_TOO_LARGE", ERROR_DOMAIN, HashMap::new());
    Status::with_error_details(
        Code::ResourceExhausted,
        "the request message exceeds the server's maximum message size \
         (server.max_message_bytes); split it into smaller messages",
        details,
    )
}

/// Maps an error met while reading a client stream: an oversized message becomes
/// RESOURCE_EXHAUSTED (see [`oversized_message`]); anything else is returned as it is.
pub fn stream_read_error(status: Status) -> Status {
    if status.code() == Code::OutOfRange && status.message().contains("message length too large") {
        oversized_message()
    } else {
        status
    }
}

/// Collects field violations while validating a request, so a caller learns every problem at
/// once instead of one per round trip.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

/// More violations than this are not reported individually; a request that bad is clear enough.
const MAX_VIOLATIONS: usize = 100;

impl Violations {
    /// Records a violation of `field`.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        if self.0.len() < MAX_VIOLATIONS {
            self.0.push(FieldViolation {
                field: field.into(),
                description: description.into(),
            });
        }
    }

    /// How many violations were recorded.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The recorded violations.
    pub fn into_vec(self) -> Vec<FieldViolation> {
        self.0
    }

    /// Whether nothing has been recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(())` when nothing was recorded, otherwise the INVALID_ARGUMENT error.
    ///
    /// # Errors
    /// [`ServiceError::InvalidArgument`] with every recorded violation.
    pub fn into_result(self) -> Result<(), ServiceError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ServiceError::InvalidArgument(self.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_carries_every_field_violation_and_error_info() {
        let mut violations = Violations::default();
        violations.add("updates[0].code", "must not be empty");
        violations.add("updates[2].prices[\"XYZ\"]", "unknown currency");
        let status = Status::from(violations.into_result().expect_err("has violations"));
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let bad_request = details.bad_request().expect("bad request details");
        assert_eq!(bad_request.field_violations.len(), 2);
        assert_eq!(
            bad_request.field_violations[1].field,
            "updates[2].prices[\"XYZ\"]"
        );
        let info = details.error_info().expect("error info");
        assert_eq!(info.reason, "INVALID_ARGUMENT");
        assert_eq!(info.domain, ERROR_DOMAIN);
    }

    #[test]
    fn retry_later_is_unavailable_with_how_long_to_wait() {
        let status = Status::from(ServiceError::RetryLater {
            reason: "BUFFER_FULL",
            message: "full".to_owned(),
            retry_after: std::time::Duration::from_secs(5),
        });
        assert_eq!(status.code(), Code::Unavailable);
        let details = status.get_error_details();
        let retry = details.retry_info().expect("retry info");
        assert_eq!(retry.retry_delay, Some(std::time::Duration::from_secs(5)));
        assert_eq!(
            details.error_info().expect("error info").reason,
            "BUFFER_FULL"
        );
    }

    #[test]
    fn throttled_is_resource_exhausted_with_how_long_to_wait() {
        let status = Status::from(ServiceError::Throttled {
            reason: "BUSY",
            message: "busy".to_owned(),
            retry_after: std::time::Duration::from_secs(1),
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        let details = status.get_error_details();
        let retry = details.retry_info().expect("retry info");
        assert_eq!(retry.retry_delay, Some(std::time::Duration::from_secs(1)));
        assert_eq!(details.error_info().expect("error info").reason, "BUSY");
    }

    #[test]
    fn many_long_violations_stay_within_an_http2_header_block() {
        let violations = (0..100)
            .map(|i| FieldViolation {
                field: format!("updates[{i}].product.product_type"),
                description: format!(
                    "product \"P-{i:06}\" is stored as type \"apparel\"; a product's type is set \
                     by the change that creates it and never changes"
                ),
            })
            .collect();
        let status = Status::from(ServiceError::InvalidArgument(violations));
        let encoded = status.into_http::<tonic::body::Body>();
        let header_bytes: usize = encoded
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 32)
            .sum();
        assert!(header_bytes < 16 * 1024, "{header_bytes} bytes of headers");
        let status = Status::from_header_map(encoded.headers()).expect("a status");
        let listed = status
            .get_error_details()
            .bad_request()
            .expect("a bad request")
            .field_violations
            .clone();
        assert!(listed.len() > 10, "{}", listed.len());
        let last = listed.last().expect("one");
        assert!(
            last.description.contains("more problem(s) not listed"),
            "{last:?}"
        );
        assert_eq!(
            listed[0].field, "updates[0].product.product_type",
            "the first ones are listed as they came"
        );
    }

    #[test]
    fn internal_errors_do_not_leak_their_cause_to_callers() {
        let error = ServiceError::Internal(anyhow::anyhow!("password=hunter2 connection refused"));
        let status = Status::from(error);
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("hunter2"));
    }

    #[test]
    fn internal_errors_name_the_trace_that_finds_their_cause() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let (status, trace_id) = tracing::subscriber::with_default(subscriber, || {
            use opentelemetry::trace::TraceContextExt as _;
            use tracing_opentelemetry::OpenTelemetrySpanExt as _;
            let span = tracing::info_span!("call");
            let _entered = span.enter();
            let trace_id = span.context().span().span_context().trace_id().to_string();
            let error = ServiceError::Internal(anyhow::anyhow!("relation \"products\" is locked"));
            (Status::from(error), trace_id)
        });
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("products"), "{status:?}");
        assert!(status.message().contains(&trace_id), "{status:?}");
        let info = status
            .get_error_details()
            .error_info()
            .cloned()
            .expect("info");
        assert_eq!(info.metadata.get("trace_id"), Some(&trace_id));
    }

    #[test]
    fn not_found_names_the_resource() {
        let status = Status::from(ServiceError::NotFound {
            resource: "product",
            name: "P-1".into(),
        });
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().contains("P-1"));
        let info = status
            .get_error_details()
            .error_info()
            .cloned()
            .expect("info");
        assert_eq!(
            info.metadata.get("resource").map(String::as_str),
            Some("product")
        );
    }
}
