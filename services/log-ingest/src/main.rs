//! The `log-ingest` binary: settings, telemetry, app, run until SIGTERM, flush.

use log_ingest::{App, Settings};

/// mimalloc (version 2 here, see Cargo.toml): glibc's malloc spent a large share of a bulk
/// request in consolidating freed chunks (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Half the idle resident memory and tens of MB under load were whole huge pages faulted
    // in by mimalloc's arenas (see `mall_grpc::process`).
    mall_grpc::process::disable_transparent_huge_pages();
    // rustls needs its crypto provider chosen before any TLS (ours, AWS's, the partner's).
    mall_grpc::tls::install_crypto_provider();
    let settings = Settings::load()?;
    let telemetry = mall_telemetry::init(log_ingest::SERVICE, &settings.telemetry)?;
    // Before the listeners exist: a SIGTERM as soon as they answer is a clean shutdown.
    let shutdown = mall_grpc::shutdown_signal();
    let ran = App::build(settings).await?.run_until(shutdown).await;
    // Spans and logs flushed either way; a stop of its own ends the process with an error.
    telemetry.shutdown()?;
    ran
}
