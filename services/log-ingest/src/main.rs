//! The `log-ingest` binary: settings, telemetry, app, run until SIGTERM, flush.

use log_ingest::{App, Settings};

/// mimalloc: glibc's malloc spent a large share of a bulk request in consolidating freed
/// chunks (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load()?;
    let telemetry = mall_telemetry::init(log_ingest::SERVICE, &settings.telemetry)?;
    App::build(settings)
        .await?
        .run_until(mall_grpc::shutdown_signal())
        .await?;
    telemetry.shutdown()
}
