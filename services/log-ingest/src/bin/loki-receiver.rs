//! `loki-receiver`: the Loki-compatible receiver ([`log_ingest::loki_receiver`]) as a
//! process, for local runs (`scripts/dev.sh`, where no Loki is installed) and manual
//! experiments. It checks each push as Loki does, counts what it accepted and keeps none of
//! it (what log-ingest ships is seen with TailLogs); logs its counts every few seconds when
//! they changed; stops on Ctrl-C or SIGTERM.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use log_ingest::loki_receiver::LokiReceiver;

/// A Loki push endpoint for local runs: `POST /loki/api/v1/push` (protobuf, snappy).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Where to listen (log-ingest's default `loki.url` is `http://127.0.0.1:3100`).
    #[arg(long, default_value = "127.0.0.1:3100")]
    listen: SocketAddr,
    /// Take entries of any time (for corpora with old timestamps, such as the benchmark
    /// generator's 2024 lines); by default, as Loki's defaults do, entries older than 7
    /// days or more than 10 minutes ahead are refused.
    #[arg(long)]
    accept_any_time: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Listened for from the start: a signal while a report prints is not missed.
    let stop = mall_grpc::shutdown_signal();
    tokio::pin!(stop);
    let receiver = LokiReceiver::start_counting(args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (a Loki or another loki-receiver there? see --listen)",
                args.listen
            )
        })?;
    if args.accept_any_time {
        receiver.accept_any_time();
    }
    println!(
        "Loki receiver on {} (POST /loki/api/v1/push)",
        receiver.url()
    );
    let mut report = tokio::time::interval(Duration::from_secs(5));
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported = None;
    loop {
        tokio::select! {
            () = &mut stop => return Ok(()),
            _ = report.tick() => {
                let now = (receiver.counts(), receiver.accepted());
                if reported != Some(now) {
                    let ((pushes, refused, _), (entries, lines)) = now;
                    println!("pushes {pushes} (refused {refused}); entries {entries}, lines {lines}");
                    reported = Some(now);
                }
            }
        }
    }
}
