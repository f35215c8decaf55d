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
