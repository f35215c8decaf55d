//! The process-level shutdown signal.

/// Completes on SIGTERM (what Kubernetes sends) or SIGINT (Ctrl-C).
///
/// # Panics
/// When the signal handlers cannot be installed, which happens only outside a Tokio runtime
/// with signal support: a programming error at start-up, not a runtime condition.
pub async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler succeeds inside the tokio runtime");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "shutdown requested"),
        _ = terminate.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
    }
}
