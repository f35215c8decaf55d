//! One trace follows a change from its producer to the catalog: the trace context in the
//! change's envelope becomes the parent of the relay's enqueue span, travels as the queue
//! message's `traceparent` attribute to the apply span, and as gRPC metadata into the
//! catalog's BulkUpdateProducts span. Spans of both services are collected in memory.

#[allow(dead_code)]
#[path = "pipeline/helpers.rs"]
mod pipeline_helpers;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use mall_proto::sync::v1::TraceContext;
use mall_test_support::Engine;
use opentelemetry::trace::{TraceId, TracerProvider as _};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    propagation::TraceContextPropagator,
    trace::{SdkTracerProvider, SpanData, SpanExporter},
};
use pipeline_helpers::{Catalog, Relay, change, database};
use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};

/// Keeps every finished span.
#[derive(Debug, Clone, Default)]
struct Collector(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Collector {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().expect("not poisoned").extend(batch);
        Ok(())
    }
}

/// The producer's trace: what a producer writes into `ProductChange.trace_context`.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producers_trace_reaches_the_catalogs_bulk_update() {
    let collector = Collector::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(collector.clone())
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new("info"))
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
        .init();

    let catalog = Catalog::start(database(Engine::Sqlite).await, None, |_| {}).await;
    let relay_db = database(Engine::Sqlite).await;
    let relay = Relay::start(&relay_db, catalog.addr, |_| {}).await;
    let mut traced = change("T-1", 1);
    traced.trace_context = Some(TraceContext {
        traceparent: format!("00-{TRACE_ID}-00f067aa0ba902b7-01"),
        tracestate: String::new(),
    });
    relay.publish(vec![traced]).await;
    catalog
        .wait_for(&[("T-1".into(), 1)], Duration::from_secs(30))
        .await;

    let trace_id = TraceId::from_hex(TRACE_ID).expect("a valid trace id");
    // Spans are exported when they end; the apply span ends after the catalog answered.
    mall_test_support::wait_until(
        "the enqueue, apply and catalog spans are exported in the producer's trace",
        Duration::from_secs(10),
        || async {
            let spans = collector.0.lock().expect("not poisoned").clone();
            let names: Vec<String> = spans
                .iter()
                .filter(|s| s.span_context.trace_id() == trace_id)
                .map(|s| s.name.to_string())
                .collect();
            [
                "relay.enqueue",
                "relay.apply",
                "mall.catalog.v1.ProductCatalogService/BulkUpdateProducts",
            ]
            .iter()
            .all(|expected| names.iter().any(|n| n == expected))
            .then_some(())
        },
    )
    .await;
}
