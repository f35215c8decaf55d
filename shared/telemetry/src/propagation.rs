//! W3C trace context in and out of the carriers a change travels in.
//!
//! gRPC metadata, queue message attributes and stream record envelopes all reduce to string
//! maps; these functions move the current span's context into such a map and back.

use std::collections::HashMap;

use opentelemetry::{
    Context,
    propagation::{Extractor, Injector},
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The W3C header carrying trace id, parent span id and flags.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header carrying vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";

/// Writes the context of `span` into `carrier` with the global propagator.
pub fn inject(span: &tracing::Span, carrier: &mut dyn Injector) {
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, carrier));
}

/// Reads a context from `carrier` with the global propagator (empty when absent or malformed).
pub fn extract(carrier: &dyn Extractor) -> Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(carrier))
}

/// Makes the context found in `carrier`, if any, the parent of `span`.
pub fn set_parent_from(span: &tracing::Span, carrier: &dyn Extractor) {
    let parent = extract(carrier);
    // Fails only when the OpenTelemetry layer is not installed (some tests): then there is no
    // trace to join and nothing to do.
    let _ = span.set_parent(parent);
}

/// `traceparent` and `tracestate` of `span`, for a carrier that is not a map (an envelope field).
pub fn current_trace_headers(span: &tracing::Span) -> (Option<String>, Option<String>) {
    let mut map: HashMap<String, String> = HashMap::with_capacity(2);
    inject(span, &mut map);
    (map.remove(TRACEPARENT), map.remove(TRACESTATE))
}

/// Makes the given W3C headers, if valid, the parent of `span`.
pub fn set_parent_from_headers(span: &tracing::Span, traceparent: &str, tracestate: &str) {
    if traceparent.is_empty() {
        return;
    }
    let mut map: HashMap<String, String> = HashMap::with_capacity(2);
    map.insert(TRACEPARENT.to_owned(), traceparent.to_owned());
    if !tracestate.is_empty() {
        map.insert(TRACESTATE.to_owned(), tracestate.to_owned());
    }
    set_parent_from(span, &map);
}

/// Makes the first non-empty of `traceparents` (with its tracestate) the parent of `span` and
/// links the valid ones among the next `max_links`, for a span that handles the work of
/// several traces at once.
pub fn follow<'a>(
    span: &tracing::Span,
    traceparents: impl IntoIterator<Item = (&'a str, &'a str)>,
    max_links: usize,
) {
    use opentelemetry::trace::TraceContextExt as _;
    let mut traces = traceparents
        .into_iter()
        .filter(|(traceparent, _)| !traceparent.is_empty());
    if let Some((traceparent, tracestate)) = traces.next() {
        set_parent_from_headers(span, traceparent, tracestate);
    }
    for (traceparent, _) in traces.take(max_links) {
        let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
        let linked = extract(&carrier).span().span_context().clone();
        if linked.is_valid() {
            span.add_link(linked);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::{TraceId, TracerProvider as _};
    use opentelemetry_sdk::{
        error::OTelSdkResult,
        propagation::TraceContextPropagator,
        trace::{SdkTracerProvider, SpanData, SpanExporter},
    };
    use tracing_subscriber::layer::SubscriberExt as _;

    /// Keeps every finished span.
    #[derive(Debug, Clone, Default)]
    struct Collector(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Collector {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().expect("not poisoned").extend(batch);
            Ok(())
        }
    }

    fn traceparent(trace: u8) -> String {
        format!("00-{:032x}-00f067aa0ba902b7-01", u128::from(trace))
    }

    #[test]
    fn follow_parents_the_first_trace_and_links_at_most_max_links_valid_others() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let collector = Collector::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(collector.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let (first, second, third, fourth) = (
            traceparent(1),
            traceparent(2),
            traceparent(3),
            traceparent(4),
        );
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("combined");
            let traces = [
                ("", ""),
                (first.as_str(), ""),
                ("not a traceparent", ""),
                (second.as_str(), ""),
                (third.as_str(), ""),
                (fourth.as_str(), ""),
            ];
            super::follow(&span, traces, 3);
        });

        let spans = collector.0.lock().expect("not poisoned");
        let span = spans
            .iter()
            .find(|s| s.name == "combined")
            .expect("exported");
        assert_eq!(span.span_context.trace_id(), TraceId::from(1u128));
        let linked: Vec<TraceId> = span
            .links
            .iter()
            .map(|l| l.span_context.trace_id())
            .collect();
        // The malformed one takes a place among the three but is not linked.
        assert_eq!(linked, [TraceId::from(2u128), TraceId::from(3u128)]);
    }
}
