//! The `log-ingest` binary: settings, telemetry, app, run until SIGTERM, flush.

use log_ingest::{App, Settings};

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
