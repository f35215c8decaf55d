//! The admin HTTP server: `/metrics` for Prometheus, `/healthz` and `/readyz` for probes and
//! people with curl.

use axum::{
    Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get,
};
use mall_telemetry::metrics::{CONTENT_TYPE, Registry};

/// What the admin handlers read.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// Metrics rendered on `/metrics`.
    pub registry: Registry,
    /// Whether the readiness probe last passed; `/readyz` answers 200 or 503 from it.
    pub(crate) ready: crate::server::Ready,
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// OpenMetrics text (Prometheus asks for it first; it is the format that carries exemplars).
async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        state.registry.encode(),
    )
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.ready.get() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: a dependency is unreachable\n",
        )
    }
}
