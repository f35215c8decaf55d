//! The `log-ingest` binary: settings, telemetry, app, run until SIGTERM, flush.

use log_ingest::{App, Settings};

/// mimalloc (version 2 here, see Cargo.toml): glibc's malloc spent a large share of a bulk
/// request in consolidating freed chunks (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // mimalloc asks for transparent huge pages (2 MiB) for its arenas, so each thread's
    // first small allocations fault in whole huge pages: measured in the benchmark, half
    // the process's resident memory at idle and tens of MB under load, for no throughput.
    // Off for this process only (the kernel's `madvise` setting stays as it is).
    #[cfg(target_os = "linux")]
    if let Err(error) = nix::sys::prctl::set_thp_disable(true) {
        eprintln!("cannot turn transparent huge pages off ({error}); memory use will be higher");
    }
    // rustls needs its crypto provider chosen before any TLS (ours, AWS's, the partner's).
    mall_grpc::tls::install_crypto_provider();
    let settings = Settings::load()?;
    let telemetry = mall_telemetry::init(log_ingest::SERVICE, &settings.telemetry)?;
    // Before the listeners exist: a SIGTERM as soon as they answer is a clean shutdown.
    let shutdown = mall_grpc::shutdown_signal();
    App::build(settings).await?.run_until(shutdown).await?;
    telemetry.shutdown()
}
