//! The process-level shutdown signal.

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};

/// A future that completes on SIGTERM (what Kubernetes sends) or SIGINT (Ctrl-C).
///
/// The handlers are installed when this is called, not when the future is first polled:
/// call it before binding listeners, so a SIGTERM that arrives as soon as the service is
/// reachable (a quick rollout, a test) is a clean shutdown, not the default action that kills
/// the process.
///
/// # Panics
/// When the signal handlers cannot be installed, which happens only outside a Tokio runtime
/// with signal support: a programming error at start-up, not a runtime condition.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    let mut terminate = signal(SignalKind::terminate())
        .expect("installing a SIGTERM handler succeeds inside the tokio runtime");
    let mut interrupt = signal(SignalKind::interrupt())
        .expect("installing a SIGINT handler succeeds inside the tokio runtime");
    async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!(signal = "SIGINT", "shutdown requested"),
            _ = terminate.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
        }
    }
}
