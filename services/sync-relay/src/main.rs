//! The `sync-relay` binary: settings, telemetry, app, run until SIGTERM, flush.

use sync_relay::{App, Settings};

/// mimalloc: glibc's malloc spent a large share of a bulk request in consolidating freed
/// chunks (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // First thing (see `mall_grpc::process`): what the runtime allocated already stays as it is.
    mall_grpc::process::disable_transparent_huge_pages();
    // rustls needs its crypto provider chosen before any TLS (ours, AWS's, the partner's).
    mall_grpc::tls::install_crypto_provider();
    let settings = Settings::load()?;
    let telemetry = mall_telemetry::init(sync_relay::SERVICE, &settings.telemetry)?;
    // Before the listeners exist: a SIGTERM as soon as they answer is a clean shutdown.
    let shutdown = mall_grpc::shutdown_signal();
    App::build(settings).await?.run_until(shutdown).await?;
    telemetry.shutdown()
}
