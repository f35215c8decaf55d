//! `memberctl`: failover jobs and delivery stats from a terminal (arguments parsed by clap;
//! `memberctl --help` and `memberctl <command> --help` describe them). A started job is
//! followed with WatchJob to its end, with a progress bar on a terminal.
//!
//! ```text
//! memberctl [--addr URL] resend --from RFC3339 [--to RFC3339] [--request-id ID] [--no-wait]
//! memberctl [--addr URL] resend-failed [--since RFC3339] [--request-id ID] [--no-wait]
//! memberctl [--addr URL] job ID
//! memberctl [--addr URL] watch ID
//! memberctl [--addr URL] cancel ID
//! memberctl [--addr URL] stats
//! ```
//! `--addr` defaults to `$MEMBERCTL_ADDR`, then `http://127.0.0.1:50053`. A followed job
//! that ends FAILED or CANCELLED makes the command fail (exit code 1).

use std::{io::Write, path::PathBuf, time::Duration};

use anyhow::Context as _;
use mall_grpc::tls::TlsPaths;
use mall_proto::member::v1::{
    CancelJobRequest, FailedDeliveriesScope, GetDeliveryStatsRequest, GetJobRequest, Job, JobKind,
    JobState, StartFailoverJobRequest, TimeRangeScope, WatchJobRequest,
    member_export_service_client::MemberExportServiceClient, start_failover_job_request::Scope,
};
use tonic::transport::Channel;

use crate::jobs::state_name;

/// What `memberctl` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Start a failover job.
    Start {
        /// What it resends.
        scope: JobScope,
        /// Idempotency key; empty for none.
        request_id: String,
        /// Follow it to its end.
        wait: bool,
    },
    /// Print a job.
    Job(String),
    /// Follow a job to its end.
    Watch(String),
    /// Cancel a job.
    Cancel(String),
    /// Print the delivery stats.
    Stats,
}

/// What a job resends; times in RFC 3339 as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobScope {
    /// Members whose data changed in `[from, to)`; `to` unset: until the job starts.
    TimeRange {
        /// Inclusive start.
        from: String,
        /// Exclusive end.
        to: Option<String>,
    },
    /// Members with failed deliveries since a time (all when unset).
    FailedDeliveries {
        /// Inclusive start.
        since: Option<String>,
    },
}

/// The service's address and the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// gRPC endpoint of a member-export replica.
    pub addr: String,
    /// TLS files from the flags (the binary adds `MALL_TLS_*` for those not given).
    pub tls: TlsPaths,
    /// What to do.
    pub command: Command,
}

/// `memberctl`'s arguments, as clap reads them.
#[derive(Debug, clap::Parser)]
#[command(
    name = "memberctl",
    about = "member-export's failover jobs and delivery stats from a terminal",
    after_help = "--addr defaults to $MEMBERCTL_ADDR, then http://127.0.0.1:50053."
)]
struct Cli {
    /// gRPC endpoint of a member-export replica.
    #[arg(long, global = true, value_name = "URL")]
    addr: Option<String>,
    /// PEM CA certificate the server's certificate must chain to: turns TLS on (use an
    /// https:// address). Default $MALL_TLS_CA.
    #[arg(long, global = true, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate (the admin identity's). Default $MALL_TLS_CERT.
    #[arg(long, global = true, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM key of --tls-cert. Default $MALL_TLS_KEY.
    #[arg(long, global = true, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The name the server's certificate must carry when the address does not say it (after
    /// `kubectl port-forward`, e.g. sync-relay.mall-platform.svc). Default
    /// $MALL_TLS_SERVER_NAME, else the address's host.
    #[arg(long, global = true, value_name = "NAME")]
    tls_server_name: Option<String>,
    #[command(subcommand)]
    command: CliCommand,
}

#[derive(Debug, clap::Subcommand)]
enum CliCommand {
    /// Resend every member whose data changed in a time range, with its consent of now,
    /// then follow the job.
    Resend {
        /// Inclusive start, RFC 3339 (e.g. 2026-11-25T09:00:00Z).
        #[arg(long, value_name = "RFC3339")]
        from: String,
        /// Exclusive end, RFC 3339; default: when the job starts running.
        #[arg(long, value_name = "RFC3339")]
        to: Option<String>,
        #[command(flatten)]
        start: StartArgs,
    },
    /// Resend the members whose delivery the partner refused, then follow the job.
    ResendFailed {
        /// Only failures at or after this time, RFC 3339; default: all recorded.
        #[arg(long, value_name = "RFC3339")]
        since: Option<String>,
        #[command(flatten)]
        start: StartArgs,
    },
    /// Print a job.
    Job {
        /// The job's id.
        id: String,
    },
    /// Follow a job to its end.
    Watch {
        /// The job's id.
        id: String,
    },
    /// Cancel a pending or running job.
    Cancel {
        /// The job's id.
        id: String,
    },
    /// Print this replica's delivery counters and the limits in force.
    Stats,
}

#[derive(Debug, clap::Args)]
struct StartArgs {
    /// Idempotency key: running the same command again returns the same job.
    #[arg(long, value_name = "ID", default_value = "")]
    request_id: String,
    /// Return once the job is created instead of following it.
    #[arg(long)]
    no_wait: bool,
}

/// Parses `memberctl`'s arguments (without the program name).
///
/// # Errors
/// A usage error, which prints itself (`error.exit()`).
pub fn parse(args: &[String], env_addr: Option<String>) -> Result<Invocation, clap::Error> {
    use clap::Parser as _;
    let cli =
        Cli::try_parse_from(std::iter::once("memberctl").chain(args.iter().map(String::as_str)))?;
    let addr = cli
        .addr
        .or(env_addr)
        .unwrap_or_else(|| "http://127.0.0.1:50053".to_owned());
    let command = match cli.command {
        CliCommand::Resend { from, to, start } => Command::Start {
            scope: JobScope::TimeRange { from, to },
            request_id: start.request_id,
            wait: !start.no_wait,
        },
        CliCommand::ResendFailed { since, start } => Command::Start {
            scope: JobScope::FailedDeliveries { since },
            request_id: start.request_id,
            wait: !start.no_wait,
        },
        CliCommand::Job { id } => Command::Job(id),
        CliCommand::Watch { id } => Command::Watch(id),
        CliCommand::Cancel { id } => Command::Cancel(id),
        CliCommand::Stats => Command::Stats,
    };
    let tls = TlsPaths {
        ca: cli.tls_ca,
        cert: cli.tls_cert,
        key: cli.tls_key,
        server_name: cli.tls_server_name,
    };
    Ok(Invocation { addr, tls, command })
}

/// Runs `invocation`, writing what it does to `out` (and a progress bar to the terminal,
/// when there is one, while following a job).
///
/// # Errors
/// When the service cannot be reached or refuses the call (its message is shown), or a
/// followed job ends FAILED or CANCELLED.
pub async fn run(invocation: Invocation, out: &mut dyn Write) -> anyhow::Result<()> {
    let tls = invocation.tls.client_tls()?;
    let channel =
        mall_grpc::client::connect(&invocation.addr, tls.as_ref(), Duration::from_secs(10))
            .await
            .with_context(|| format!("cannot reach member-export at {}", invocation.addr))?;
    let mut client = MemberExportServiceClient::new(channel);
    match invocation.command {
        Command::Start {
            scope,
            request_id,
            wait,
        } => {
            let scope = match scope {
                JobScope::TimeRange { from, to } => Scope::TimeRange(TimeRangeScope {
                    start_time: Some(time("--from", &from)?),
                    end_time: to.map(|to| time("--to", &to)).transpose()?,
                }),
                JobScope::FailedDeliveries { since } => {
                    Scope::FailedDeliveries(FailedDeliveriesScope {
                        since: since.map(|since| time("--since", &since)).transpose()?,
                    })
                }
            };
            let job = client
                .start_failover_job(StartFailoverJobRequest {
                    request_id,
                    scope: Some(scope),
                })
                .await?
                .into_inner()
                .job
                .unwrap_or_default();
            writeln!(out, "job {} {}", job.job_id, describe(&job))?;
            if wait {
                follow(&mut client, &job.job_id, out).await?;
            }
        }
        Command::Job(id) => {
            let job = client
                .get_job(GetJobRequest { job_id: id })
                .await?
                .into_inner()
                .job
                .unwrap_or_default();
            writeln!(out, "job {} {}", job.job_id, describe(&job))?;
            if !job.error.is_empty() {
                writeln!(out, "error: {}", job.error)?;
            }
        }
        Command::Watch(id) => follow(&mut client, &id, out).await?,
        Command::Cancel(id) => {
            let job = client
                .cancel_job(CancelJobRequest { job_id: id })
                .await?
                .into_inner()
                .job
                .unwrap_or_default();
            writeln!(out, "job {} {}", job.job_id, describe(&job))?;
        }
        Command::Stats => {
            let stats = client
                .get_delivery_stats(GetDeliveryStatsRequest {})
                .await?
                .into_inner()
                .stats
                .unwrap_or_default();
            writeln!(
                out,
                "delivered {}\tfailed attempts {}\tretrying {}\tskipped without consent {}\tstale {}",
                stats.delivered_count,
                stats.failed_count,
                stats.retrying_count,
                stats.skipped_without_consent_count,
                stats.stale_count
            )?;
            writeln!(
                out,
                "queued {}\tdead letters {}\tin flight {}",
                stats.queued_count, stats.dead_letter_count, stats.in_flight
            )?;
            writeln!(
                out,
                "rate limit {:.1}/s (configured, shared by every replica)\tmax concurrency {}",
                stats.rate_limit_per_second, stats.max_concurrency
            )?;
            writeln!(
                out,
                "alerts this window: {} sent, {} suppressed",
                stats.alerts_sent_count, stats.alerts_suppressed_count
            )?;
        }
    }
    Ok(())
}

/// Follows a job with WatchJob to its end; fails unless it SUCCEEDED.
async fn follow(
    client: &mut MemberExportServiceClient<Channel>,
    id: &str,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut stream = client
        .watch_job(WatchJobRequest {
            job_id: id.to_owned(),
        })
        .await?
        .into_inner();
    // Drawn on stderr, and only on a terminal (indicatif hides it otherwise): `out` gets
    // the final state either way.
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} members ({per_sec}, eta {eta}) {msg}",
        )
        .expect("a valid template"),
    );
    let mut last = None;
    while let Some(message) = stream.message().await? {
        let job = message.job.unwrap_or_default();
        // Members that moved into the range while the job ran can take it past the total.
        bar.set_length(u64::try_from(job.total_count.max(job.processed_count)).unwrap_or_default());
        bar.set_position(u64::try_from(job.processed_count).unwrap_or_default());
        bar.set_message(format!(
            "{} failed, {}",
            job.failed_count,
            state_name(job.state)
        ));
        last = Some(job);
    }
    bar.finish_and_clear();
    let job = last.context("the job's stream ended without a state")?;
    writeln!(out, "job {} {}", job.job_id, describe(&job))?;
    match JobState::try_from(job.state) {
        Ok(JobState::Succeeded) => Ok(()),
        Ok(JobState::Failed) => anyhow::bail!("job {} failed: {}", job.job_id, job.error),
        _ => anyhow::bail!("job {} ended {}", job.job_id, state_name(job.state)),
    }
}

fn time(flag: &str, text: &str) -> anyhow::Result<prost_types::Timestamp> {
    text.parse()
        .map_err(|_| anyhow::anyhow!("{flag} {text:?} is not an RFC 3339 time"))
}

fn describe(job: &Job) -> String {
    let kind = match JobKind::try_from(job.kind) {
        Ok(JobKind::TimeRange) => "time range",
        Ok(JobKind::FailedDeliveries) => "failed deliveries",
        _ => "unknown kind",
    };
    format!(
        "({kind}): {}, {} of {} members processed, {} failed",
        state_name(job.state),
        job.processed_count,
        job.total_count,
        job.failed_count
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn commands_parse_with_their_arguments() {
        let parsed = parse(
            &args("resend --from 2026-11-25T09:00:00Z --to 2026-11-26T09:00:00Z --request-id r1"),
            None,
        )
        .expect("parses");
        assert_eq!(parsed.addr, "http://127.0.0.1:50053");
        assert_eq!(
            parsed.command,
            Command::Start {
                scope: JobScope::TimeRange {
                    from: "2026-11-25T09:00:00Z".into(),
                    to: Some("2026-11-26T09:00:00Z".into()),
                },
                request_id: "r1".into(),
                wait: true,
            }
        );
        let parsed = parse(
            &args("--addr http://member-export:50053 resend-failed --no-wait"),
            Some("http://ignored:1".into()),
        )
        .expect("parses");
        assert_eq!(parsed.addr, "http://member-export:50053");
        assert_eq!(
            parsed.command,
            Command::Start {
                scope: JobScope::FailedDeliveries { since: None },
                request_id: String::new(),
                wait: false,
            }
        );
        let env = parse(&args("cancel j1"), Some("http://env:1".into())).expect("parses");
        assert_eq!(
            (env.addr.as_str(), env.command),
            ("http://env:1", Command::Cancel("j1".into()))
        );
        assert_eq!(
            parse(&args("stats"), None).expect("parses").command,
            Command::Stats
        );
    }

    #[test]
    fn mistakes_get_a_usage_message() {
        for line in ["", "resend", "job", "frobnicate"] {
            assert!(parse(&args(line), None).is_err(), "{line:?}");
        }
        assert!(time("--from", "yesterday").is_err());
        assert!(time("--from", "2026-11-25T09:00:00Z").is_ok());
    }
}
