//! `partner-simulator`: the partner simulator ([`member_export::simulator`]) as a process, for
//! local runs (`scripts/dev.sh`) and manual experiments. Logs what it answered every few
//! seconds when that changed; stops on Ctrl-C or SIGTERM (what `scripts/dev.sh` and a
//! container runtime send; as a container's first process it would otherwise ignore it).

use std::{net::SocketAddr, num::NonZeroU32, time::Duration};

use clap::Parser;
use member_export::simulator::{Behaviour, Simulator};

/// A marketing partner for local runs: `POST /groobee` (bulk upsert, `x-api-key`) and
/// `POST /webhook` (Standard Webhooks).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:8089")]
    listen: SocketAddr,
    /// The groobee API key it accepts.
    #[arg(long, default_value = "local-api-key")]
    api_key: String,
    /// The webhook signing secret (`whsec_` and base64 of the key).
    #[arg(long, default_value = "whsec_bG9jYWwtd2ViaG9vay1zaWduaW5nLWtleQ==")]
    webhook_secret: String,
    /// Requests per second it takes; more are refused (0: no limit).
    #[arg(long, default_value_t = 0)]
    rate_limit: u32,
    /// Refuse over the rate in the groobee dialect (HTTP 200, −1004) instead of HTTP 429.
    #[arg(long)]
    rate_limit_as_process_code: bool,
    /// Share of requests answered with a server error (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Share of requests never answered (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    hang_rate: f64,
    /// Latency of each answer, in milliseconds (uniform up to this).
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Listened for from the start: a signal while a report prints is not missed.
    let stop = mall_grpc::shutdown_signal();
    tokio::pin!(stop);
    let behaviour = Behaviour {
        rate_limit: NonZeroU32::new(args.rate_limit),
        rate_limit_as_429: !args.rate_limit_as_process_code,
        error_rate: args.error_rate,
        hang_rate: args.hang_rate,
        latency: (Duration::ZERO, Duration::from_millis(args.latency_ms)),
        ..Behaviour::default()
    };
    let simulator =
        Simulator::start(args.listen, &args.api_key, &args.webhook_secret, behaviour).await?;
    println!(
        "partner simulator on http://{} (POST /groobee, POST /webhook)",
        simulator.addr()
    );
    let mut report = tokio::time::interval(Duration::from_secs(5));
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported = None;
    loop {
        tokio::select! {
            () = &mut stop => return Ok(()),
            _ = report.tick() => {
                let counts = simulator.counts();
                let members = simulator.members().len();
                let now = (counts, members);
                if reported == Some(now) {
                    continue;
                }
                reported = Some(now);
                println!(
                    "requests {} accepted {} rate-limited {} errors {} hung {} refused {}; members {}",
                    counts.requests,
                    counts.accepted,
                    counts.rate_limited,
                    counts.errors,
                    counts.hung,
                    counts.refused_configuration,
                    members
                );
            }
        }
    }
}
