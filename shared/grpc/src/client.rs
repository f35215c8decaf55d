//! Outgoing calls: carry the current trace context in gRPC metadata.

use opentelemetry::propagation::Injector;
use tonic::{
    Request, Status,
    metadata::{MetadataKey, MetadataMap, MetadataValue},
    service::Interceptor,
};

/// Interceptor that writes the current span's W3C `traceparent`/`tracestate` into every
/// outgoing request, so the callee's spans join the caller's trace.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContextInterceptor;

impl Interceptor for TraceContextInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        inject_metadata(request.metadata_mut());
        Ok(request)
    }
}

/// Writes the current span's trace context into `metadata`.
pub fn inject_metadata(metadata: &mut MetadataMap) {
    mall_telemetry::propagation::inject(&tracing::Span::current(), &mut MetadataInjector(metadata));
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}
