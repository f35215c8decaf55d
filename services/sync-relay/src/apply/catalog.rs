//! The catalog as stage 2 sees it: one BulkUpdateProducts per type batch, and what each
//! failure means for the messages behind it.

use std::{collections::BTreeMap, time::Duration};

use mall_grpc::{client::TraceContextInterceptor, tls::ClientTls};
use mall_proto::catalog::v1::{
    UpdateOutcome, product_catalog_service_client::ProductCatalogServiceClient,
};
use tonic::{Code, Status, service::interceptor::InterceptedService, transport::Channel};
use tonic_types::StatusExt as _;
use tracing::Instrument as _;

use super::merge::TypeBatch;
use crate::metrics::RelayMetrics;

/// The catalog client: W3C trace context goes out with every call.
pub type CatalogClient =
    ProductCatalogServiceClient<InterceptedService<Channel, TraceContextInterceptor>>;

/// A client of the catalog at `url`, over mutual TLS with `tls`; connects on first use and
/// reconnects after failures.
///
/// # Errors
/// When `url` is not a valid endpoint or the TLS files cannot be loaded.
pub fn connect_catalog(
    url: &url::Url,
    tls: Option<&ClientTls>,
    connect_timeout: Duration,
) -> anyhow::Result<CatalogClient> {
    let channel = mall_grpc::client::lazy_channel(url.as_str(), tls, connect_timeout)?;
    Ok(ProductCatalogServiceClient::with_interceptor(
        channel,
        TraceContextInterceptor,
    ))
}

/// Why a batch was not applied. Only [`Failure::Refused`] (and a single change too large for
/// the catalog) is a change's fault; every other failure keeps the messages in flight and
/// waits, so healthy changes never use up their receives toward the dead-letter queue.
#[derive(Debug)]
pub enum Failure {
    /// The environment: the catalog is down, overloaded, slow, failing inside (INTERNAL), or
    /// the connection broke. Wait with backoff and retry the same batch.
    Transient(String),
    /// The catalog refuses the request as a whole for a reason no change is at fault for (a
    /// product type the relay knows and the catalog does not, a permission, a method it does
    /// not serve): an operator must act. The lane waits and retries; nothing is dead-lettered.
    Operator(String),
    /// The catalog refused these items (index in the batch → reason); nothing was applied.
    Refused(BTreeMap<usize, String>),
    /// The request exceeds the catalog's message size: send it in smaller parts.
    TooLarge,
}

/// Sends `batch` as one BulkUpdateProducts with `deadline`.
///
/// # Errors
/// The [`Failure`] that says what to do next.
pub async fn apply_batch(
    client: &CatalogClient,
    batch: &TypeBatch,
    deadline: Duration,
    metrics: &RelayMetrics,
) -> Result<(), Failure> {
    let mut request = tonic::Request::new(batch.request());
    request.set_timeout(deadline);
    let span =
        mall_grpc::client::call_span("mall.catalog.v1.ProductCatalogService/BulkUpdateProducts");
    let result = client
        .clone()
        .bulk_update_products(request)
        .instrument(span.clone())
        .await;
    let code = match &result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    };
    mall_grpc::client::record_call(&span, code);
    metrics
        .catalog_calls
        .with_label_values(&[mall_grpc::observe::code_label(code)])
        .inc();
    match result {
        Ok(response) => {
            for result in response.into_inner().results {
                let outcome = match UpdateOutcome::try_from(result.outcome) {
                    Ok(UpdateOutcome::Applied) => "applied",
                    Ok(UpdateOutcome::Pending) => "pending",
                    _ => "stale",
                };
                metrics.applied.with_label_values(&[outcome]).inc();
            }
            Ok(())
        }
        Err(status) => Err(classify(&status)),
    }
}

fn classify(status: &Status) -> Failure {
    let described = || format!("{:?}: {}", status.code(), status.message());
    match status.code() {
        // Unknown is what a broken connection or a reset stream looks like; Internal is a
        // catalog failing inside (a bug, a lost database connection): neither is the
        // change's fault.
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Aborted
        | Code::Unknown
        | Code::Internal
        | Code::DataLoss => Failure::Transient(described()),
        Code::ResourceExhausted => {
            let too_large = status
                .get_error_details()
                .error_info()
                .is_some_and(|info| info.reason == "MESSAGE_TOO_LARGE");
            if too_large {
                Failure::TooLarge
            } else {
                Failure::Transient(described())
            }
        }
        Code::InvalidArgument => {
            let refused = refused_items(status);
            if refused.is_empty() {
                Failure::Operator(request_problems(status).unwrap_or_else(described))
            } else {
                Failure::Refused(refused)
            }
        }
        // NotFound, PermissionDenied, Unauthenticated, Unimplemented, FailedPrecondition,
        // OutOfRange, AlreadyExists: about the deployment, not a change.
        _ => Failure::Operator(described()),
    }
}

/// The request-level violations of an INVALID_ARGUMENT (`product_type: ...`), if any.
fn request_problems(status: &Status) -> Option<String> {
    let details = status.get_error_details();
    let problems: Vec<String> = details
        .bad_request()?
        .field_violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect();
    (!problems.is_empty()).then(|| format!("InvalidArgument: {}", problems.join("; ")))
}

/// The items an INVALID_ARGUMENT names (`updates[<index>]...`), with their problems.
fn refused_items(status: &Status) -> BTreeMap<usize, String> {
    let mut refused: BTreeMap<usize, String> = BTreeMap::new();
    let details = status.get_error_details();
    for violation in details
        .bad_request()
        .map(|b| b.field_violations.as_slice())
        .unwrap_or_default()
    {
        // `updates[3].product.product_type` names the relay's request to the catalog; the
        // producer knows its change, so the reason names `product.product_type`.
        let item = violation
            .field
            .strip_prefix("updates[")
            .and_then(|rest| rest.split_once(']'))
            .and_then(|(i, field)| Some((i.parse::<usize>().ok()?, field)));
        if let Some((index, field)) = item {
            let field = field.strip_prefix('.').unwrap_or(field);
            let reason = refused.entry(index).or_default();
            if !reason.is_empty() {
                reason.push_str("; ");
            }
            reason.push_str(&format!("{field}: {}", violation.description));
        }
    }
    refused
}

#[cfg(test)]
mod tests {
    use tonic_types::{ErrorDetails, FieldViolation};

    use super::*;

    #[test]
    fn refused_items_are_found_by_index() {
        let status = Status::with_error_details(
            Code::InvalidArgument,
            "invalid",
            ErrorDetails::with_bad_request(vec![
                FieldViolation::new("updates[3].update_mask", "cannot create"),
                FieldViolation::new("updates[3].product.product_type", "differs"),
                FieldViolation::new("updates[7].product.code", "bad"),
                FieldViolation::new("product_type", "not an item"),
            ]),
        );
        let Failure::Refused(refused) = classify(&status) else {
            panic!("expected Refused");
        };
        assert_eq!(refused.keys().copied().collect::<Vec<_>>(), [3, 7]);
        assert_eq!(
            refused[&3], "update_mask: cannot create; product.product_type: differs",
            "in the producer's terms, without the relay's request index"
        );
    }

    #[test]
    fn only_items_are_refused_and_the_rest_waits() {
        for status in [
            Status::unavailable("down"),
            Status::deadline_exceeded("slow"),
            Status::internal("bug"),
            Status::unknown("connection reset"),
        ] {
            assert!(
                matches!(classify(&status), Failure::Transient(_)),
                "{status:?}"
            );
        }
        for status in [
            Status::invalid_argument("no details"),
            Status::permission_denied("who are you"),
            Status::unimplemented("no such method"),
        ] {
            assert!(
                matches!(classify(&status), Failure::Operator(_)),
                "{status:?}"
            );
        }
        let unknown_type = Status::with_error_details(
            Code::InvalidArgument,
            "invalid",
            ErrorDetails::with_bad_request(vec![FieldViolation::new(
                "product_type",
                "\"beauty\" is not a registered product type",
            )]),
        );
        let Failure::Operator(reason) = classify(&unknown_type) else {
            panic!("a request-level refusal is the operator's");
        };
        assert!(reason.contains("product_type"), "{reason}");
        assert!(matches!(
            classify(&mall_grpc::error::oversized_message()),
            Failure::TooLarge
        ));
    }
}
