//! The catalog as stage 2 sees it: one BulkUpdateProducts per type batch, and what each
//! failure means for the messages behind it.

use std::{collections::BTreeMap, time::Duration};

use mall_grpc::client::TraceContextInterceptor;
use mall_proto::catalog::v1::{
    UpdateOutcome, product_catalog_service_client::ProductCatalogServiceClient,
};
use tonic::{
    Code, Status,
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};
use tonic_types::StatusExt as _;

use super::merge::TypeBatch;
use crate::metrics::RelayMetrics;

/// The catalog client: W3C trace context goes out with every call.
pub type CatalogClient =
    ProductCatalogServiceClient<InterceptedService<Channel, TraceContextInterceptor>>;

/// A client of the catalog at `url`; connects on first use and reconnects after failures.
///
/// # Errors
/// When `url` is not a valid endpoint.
pub fn connect_catalog(url: &url::Url, connect_timeout: Duration) -> anyhow::Result<CatalogClient> {
    let channel = Endpoint::from_shared(url.to_string())?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(ProductCatalogServiceClient::with_interceptor(
        channel,
        TraceContextInterceptor,
    ))
}

/// Why a batch was not applied.
#[derive(Debug)]
pub enum Failure {
    /// The catalog could not take it now (down, overloaded, slow): retry the same batch.
    Transient(String),
    /// The catalog refused these items (index in the batch → reason); nothing was applied.
    Refused(BTreeMap<usize, String>),
    /// The request exceeds the catalog's message size: send it in smaller parts.
    TooLarge,
    /// Anything else: retrying the same request at once will not help.
    Permanent(String),
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
    let result = client.clone().bulk_update_products(request).await;
    let code = match &result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    };
    metrics
        .catalog_calls
        .with_label_values(&[mall_grpc::observe::code_label(code)])
        .inc();
    match result {
        Ok(response) => {
            let results = response.into_inner().results;
            let applied = results
                .iter()
                .filter(|r| r.outcome == UpdateOutcome::Applied as i32)
                .count() as u64;
            metrics
                .applied
                .with_label_values(&["applied"])
                .inc_by(applied);
            metrics
                .applied
                .with_label_values(&["stale"])
                .inc_by(results.len() as u64 - applied);
            Ok(())
        }
        Err(status) => Err(classify(&status)),
    }
}

fn classify(status: &Status) -> Failure {
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Aborted
        | Code::Unknown => Failure::Transient(format!("{:?}: {}", status.code(), status.message())),
        Code::ResourceExhausted => {
            let too_large = status
                .get_error_details()
                .error_info()
                .is_some_and(|info| info.reason == "MESSAGE_TOO_LARGE");
            if too_large {
                Failure::TooLarge
            } else {
                Failure::Transient(format!("ResourceExhausted: {}", status.message()))
            }
        }
        Code::InvalidArgument => {
            let refused = refused_items(status);
            if refused.is_empty() {
                Failure::Permanent(format!("InvalidArgument: {}", status.message()))
            } else {
                Failure::Refused(refused)
            }
        }
        other => Failure::Permanent(format!("{other:?}: {}", status.message())),
    }
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
        let index = violation
            .field
            .strip_prefix("updates[")
            .and_then(|rest| rest.split(']').next())
            .and_then(|i| i.parse().ok());
        if let Some(index) = index {
            let reason = refused.entry(index).or_default();
            if !reason.is_empty() {
                reason.push_str("; ");
            }
            reason.push_str(&format!("{}: {}", violation.field, violation.description));
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
        assert!(refused[&3].contains("cannot create") && refused[&3].contains("differs"));
    }

    #[test]
    fn outages_are_transient_and_the_rest_permanent() {
        assert!(matches!(
            classify(&Status::unavailable("down")),
            Failure::Transient(_)
        ));
        assert!(matches!(
            classify(&Status::deadline_exceeded("slow")),
            Failure::Transient(_)
        ));
        assert!(matches!(
            classify(&Status::internal("bug")),
            Failure::Permanent(_)
        ));
        assert!(matches!(
            classify(&Status::invalid_argument("no details")),
            Failure::Permanent(_)
        ));
        assert!(matches!(
            classify(&mall_grpc::error::oversized_message()),
            Failure::TooLarge
        ));
    }
}
