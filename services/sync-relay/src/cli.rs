//! `relayctl`: the relay's admin API from a terminal (arguments parsed by clap; `relayctl
//! --help` and `relayctl <command> --help` describe them). Long redrives go page by page and
//! print their progress; a replay follows the shards' lag until they caught up.
//!
//! ```text
//! relayctl [--addr URL] status
//! relayctl [--addr URL] pause [REASON...]
//! relayctl [--addr URL] resume
//! relayctl [--addr URL] dead-letters
//! relayctl [--addr URL] redrive-dead-letters (--all | ID...)
//! relayctl [--addr URL] quarantined
//! relayctl [--addr URL] redrive-quarantined (--all | ID...)
//! relayctl [--addr URL] replay --from RFC3339 [--shard ID]... [--no-wait]
//! ```
//! `--addr` defaults to `$RELAYCTL_ADDR`, then `http://127.0.0.1:50052`.

use std::{io::Write, path::PathBuf, time::Duration};

use anyhow::Context as _;
use mall_grpc::tls::TlsPaths;
use mall_proto::sync::v1::{
    GetRelayStatusRequest, ListDeadLettersRequest, ListQuarantinedRequest, PauseRelayRequest,
    RedriveDeadLettersRequest, RedriveQuarantinedRequest, RelayStatus, ReplayFromRequest,
    ResumeRelayRequest, ShardState, sync_relay_service_client::SyncRelayServiceClient,
};
use tonic::transport::Channel;

/// Ids per redrive call: the API's limit.
const REDRIVE_CHUNK: usize = 1_000;

/// What `relayctl` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Print the relay's state.
    Status,
    /// Pause every replica.
    Pause(String),
    /// Resume every replica.
    Resume,
    /// List every dead letter.
    DeadLetters,
    /// Redrive dead letters: all of them, or these ids.
    RedriveDeadLetters(Selection),
    /// List every quarantined record.
    Quarantined,
    /// Redrive quarantined records: all of them, or these ids.
    RedriveQuarantined(Selection),
    /// Move the Kinesis checkpoints back to a time.
    Replay {
        /// RFC 3339 start time.
        from: String,
        /// Shards; empty for all.
        shards: Vec<String>,
        /// Follow the lag until the shards caught up.
        wait: bool,
    },
}

/// Which records a redrive takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Everything present when it starts.
    All,
    /// These ids.
    Ids(Vec<String>),
}

/// The relay's address and the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// gRPC endpoint of a relay replica.
    pub addr: String,
    /// TLS files from the flags (the binary adds `MALL_TLS_*` for those not given).
    pub tls: TlsPaths,
    /// What to do.
    pub command: Command,
}

/// `relayctl`'s arguments, as clap reads them.
#[derive(Debug, clap::Parser)]
#[command(
    name = "relayctl",
    about = "The sync-relay admin API from a terminal",
    after_help = "--addr defaults to $RELAYCTL_ADDR, then http://127.0.0.1:50052."
)]
struct Cli {
    /// gRPC endpoint of a relay replica.
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
    /// Print the relay's state: pause, shards, lanes, counts, last error.
    Status,
    /// Pause every replica (kept across restarts).
    Pause {
        /// Why, shown in the status.
        #[arg(trailing_var_arg = true)]
        reason: Vec<String>,
    },
    /// Resume every replica.
    Resume,
    /// List every dead letter.
    DeadLetters,
    /// Redrive dead letters behind their lanes, 1,000 per call, with progress.
    RedriveDeadLetters(SelectionArgs),
    /// List every quarantined record.
    Quarantined,
    /// Validate quarantined records again and enqueue those that pass.
    RedriveQuarantined(SelectionArgs),
    /// Move the Kinesis checkpoints back to a time, then follow the lag.
    Replay {
        /// RFC 3339 start time, e.g. 2026-11-25T09:00:00Z.
        #[arg(long, value_name = "RFC3339")]
        from: String,
        /// A shard to replay; repeat for several; none for all.
        #[arg(long = "shard", value_name = "ID")]
        shards: Vec<String>,
        /// Return at once instead of following the lag.
        #[arg(long)]
        no_wait: bool,
    },
}

/// `--all` or ids, exactly one of them.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
struct SelectionArgs {
    /// Everything present when the redrive starts.
    #[arg(long)]
    all: bool,
    /// These ids.
    ids: Vec<String>,
}

impl From<SelectionArgs> for Selection {
    fn from(args: SelectionArgs) -> Self {
        if args.all {
            Self::All
        } else {
            Self::Ids(args.ids)
        }
    }
}

/// Parses the arguments after the program name; `env_addr` is `$RELAYCTL_ADDR`.
///
/// # Errors
/// clap's error, with the usage: [`clap::Error::exit`] prints it (and `--help`) and exits.
pub fn parse(args: &[String], env_addr: Option<String>) -> Result<Invocation, clap::Error> {
    use clap::Parser as _;
    let cli =
        Cli::try_parse_from(std::iter::once("relayctl").chain(args.iter().map(String::as_str)))?;
    let addr = cli
        .addr
        .or(env_addr)
        .unwrap_or_else(|| "http://127.0.0.1:50052".to_owned());
    let command = match cli.command {
        CliCommand::Status => Command::Status,
        CliCommand::Pause { reason } => Command::Pause(reason.join(" ")),
        CliCommand::Resume => Command::Resume,
        CliCommand::DeadLetters => Command::DeadLetters,
        CliCommand::RedriveDeadLetters(selection) => Command::RedriveDeadLetters(selection.into()),
        CliCommand::Quarantined => Command::Quarantined,
        CliCommand::RedriveQuarantined(selection) => Command::RedriveQuarantined(selection.into()),
        CliCommand::Replay {
            from,
            shards,
            no_wait,
        } => Command::Replay {
            from,
            shards,
            wait: !no_wait,
        },
    };
    let tls = TlsPaths {
        ca: cli.tls_ca,
        cert: cli.tls_cert,
        key: cli.tls_key,
        server_name: cli.tls_server_name,
    };
    Ok(Invocation { addr, tls, command })
}

/// Runs `invocation`, writing what it does to `out`.
///
/// # Errors
/// When the relay cannot be reached or refuses the call (its message is shown).
pub async fn run(invocation: Invocation, out: &mut dyn Write) -> anyhow::Result<()> {
    let tls = invocation.tls.client_tls()?;
    let channel =
        mall_grpc::client::connect(&invocation.addr, tls.as_ref(), Duration::from_secs(10))
            .await
            .with_context(|| format!("cannot reach the relay at {}", invocation.addr))?;
    let mut client = SyncRelayServiceClient::new(channel).max_decoding_message_size(64 << 20);
    match invocation.command {
        Command::Status => {
            let status = status(&mut client).await?;
            print_status(&status, out)?;
        }
        Command::Pause(reason) => {
            let status = client
                .pause_relay(PauseRelayRequest { reason })
                .await?
                .into_inner()
                .status
                .unwrap_or_default();
            writeln!(out, "paused: {}", status.pause_reason)?;
        }
        Command::Resume => {
            client.resume_relay(ResumeRelayRequest {}).await?;
            writeln!(out, "resumed")?;
        }
        Command::DeadLetters => {
            let mut token = String::new();
            loop {
                let page = client
                    .list_dead_letters(ListDeadLettersRequest {
                        page_size: 1000,
                        page_token: token,
                    })
                    .await?
                    .into_inner();
                for letter in &page.dead_letters {
                    writeln!(
                        out,
                        "{}\tlane {}\t{} changes\treceived {}x\t{}\t{}",
                        letter.id,
                        letter.lane,
                        letter.change_count,
                        letter.receive_count,
                        letter.product_codes.join(","),
                        letter.last_error
                    )?;
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
        }
        Command::RedriveDeadLetters(selection) => {
            let ids = match selection {
                Selection::Ids(ids) => ids,
                Selection::All => {
                    // Page by page, so a large redrive shows its progress.
                    let total = status(&mut client).await?.dead_letter_count;
                    let mut done = 0;
                    loop {
                        let page = client
                            .list_dead_letters(ListDeadLettersRequest {
                                page_size: REDRIVE_CHUNK as i32,
                                page_token: String::new(),
                            })
                            .await?
                            .into_inner();
                        if page.dead_letters.is_empty() {
                            break;
                        }
                        let ids = page.dead_letters.into_iter().map(|l| l.id).collect();
                        done += redrive_dead_letters(&mut client, ids).await?;
                        writeln!(out, "redriven {done} of {total} dead letters")?;
                    }
                    writeln!(out, "done: {done} dead letters redriven")?;
                    return Ok(());
                }
            };
            let mut done = 0;
            for chunk in ids.chunks(REDRIVE_CHUNK) {
                done += redrive_dead_letters(&mut client, chunk.to_vec()).await?;
                writeln!(out, "redriven {done} of {} dead letters", ids.len())?;
            }
        }
        Command::Quarantined => {
            let mut token = String::new();
            loop {
                let page = client
                    .list_quarantined(ListQuarantinedRequest {
                        page_size: 1000,
                        page_token: token,
                    })
                    .await?
                    .into_inner();
                for record in &page.quarantined_records {
                    writeln!(
                        out,
                        "{}\t{}\t{}\t{} bytes\t{}",
                        record.id,
                        record.source,
                        record.position,
                        record.raw_payload.len(),
                        record.reason
                    )?;
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
        }
        Command::RedriveQuarantined(selection) => {
            let ids: Vec<String> = match selection {
                Selection::Ids(ids) => ids,
                Selection::All => {
                    // Every record present now, a page at a time, oldest first.
                    let mut ids = Vec::new();
                    let mut token = String::new();
                    loop {
                        let page = client
                            .list_quarantined(ListQuarantinedRequest {
                                page_size: 1000,
                                page_token: token,
                            })
                            .await?
                            .into_inner();
                        ids.extend(page.quarantined_records.into_iter().map(|r| r.id));
                        if page.next_page_token.is_empty() {
                            break;
                        }
                        token = page.next_page_token;
                    }
                    ids
                }
            };
            let (mut redriven, mut invalid) = (0, 0);
            for chunk in ids.chunks(REDRIVE_CHUNK) {
                let response = client
                    .redrive_quarantined(RedriveQuarantinedRequest {
                        request_id: String::new(),
                        ids: chunk.to_vec(),
                        all: false,
                    })
                    .await?
                    .into_inner();
                redriven += response.redriven_count;
                invalid += response.still_invalid_count;
                writeln!(
                    out,
                    "checked {} of {} records: {redriven} redriven, {invalid} still invalid",
                    redriven + invalid,
                    ids.len()
                )?;
            }
        }
        Command::Replay { from, shards, wait } => {
            let start = chrono::DateTime::parse_from_rfc3339(&from)
                .with_context(|| format!("--from {from:?} is not an RFC 3339 time"))?;
            let response = client
                .replay_from(ReplayFromRequest {
                    start_time: Some(prost_types::Timestamp {
                        seconds: start.timestamp(),
                        nanos: i32::try_from(start.timestamp_subsec_nanos()).unwrap_or_default(),
                    }),
                    shard_ids: shards,
                })
                .await?
                .into_inner();
            writeln!(
                out,
                "replaying {} shards from {from}",
                response.shard_ids.len()
            )?;
            if wait {
                follow_replay(&mut client, &response.shard_ids, out).await?;
            }
        }
    }
    Ok(())
}

async fn status(client: &mut SyncRelayServiceClient<Channel>) -> anyhow::Result<RelayStatus> {
    Ok(client
        .get_relay_status(GetRelayStatusRequest {})
        .await?
        .into_inner()
        .status
        .unwrap_or_default())
}

async fn redrive_dead_letters(
    client: &mut SyncRelayServiceClient<Channel>,
    ids: Vec<String>,
) -> anyhow::Result<i64> {
    Ok(client
        .redrive_dead_letters(RedriveDeadLettersRequest {
            request_id: String::new(),
            ids,
            all: false,
        })
        .await?
        .into_inner()
        .redriven_count)
}

/// Prints the replayed shards' lag every second until each is caught up (lag 0 with a
/// checkpoint) or finished.
async fn follow_replay(
    client: &mut SyncRelayServiceClient<Channel>,
    shards: &[String],
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    loop {
        let status = status(client).await?;
        let replayed: Vec<_> = status
            .shards
            .iter()
            .filter(|s| shards.contains(&s.shard_id))
            .collect();
        let behind: i64 = replayed.iter().map(|s| s.lag_millis).sum();
        let done = replayed.iter().all(|s| {
            s.state == ShardState::Finished as i32
                || (s.lag_millis == 0 && !s.checkpoint_sequence_number.is_empty())
        });
        writeln!(
            out,
            "{} shards, {} ms behind in total",
            replayed.len(),
            behind
        )?;
        if done {
            writeln!(out, "replay caught up")?;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn print_status(status: &RelayStatus, out: &mut dyn Write) -> std::io::Result<()> {
    if status.paused {
        writeln!(out, "state: paused ({})", status.pause_reason)?;
    } else {
        writeln!(out, "state: running")?;
    }
    writeln!(
        out,
        "applied: {:.1} changes/s (last minute)",
        status.changes_per_second
    )?;
    writeln!(out, "dead letters: {}", status.dead_letter_count)?;
    writeln!(out, "quarantined: {}", status.quarantined_count)?;
    if !status.last_error.is_empty() {
        writeln!(out, "last error: {}", status.last_error)?;
    }
    for shard in &status.shards {
        writeln!(
            out,
            "shard {}\t{:?}\tlag {} ms\towner {}\tcheckpoint {}",
            shard.shard_id,
            ShardState::try_from(shard.state).unwrap_or(ShardState::Unspecified),
            shard.lag_millis,
            shard.lease_owner,
            shard.checkpoint_sequence_number
        )?;
    }
    for lane in &status.lanes {
        writeln!(
            out,
            "lane {}\t{} waiting\t{} in flight",
            lane.lane, lane.visible_messages, lane.in_flight_messages
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn tls_flags_are_global_and_go_together() {
        let parsed = parse(
            &args("status --tls-ca ca.crt --tls-cert admin.crt --tls-key admin.key"),
            None,
        )
        .expect("valid");
        let tls = parsed.tls.client_tls().expect("complete").expect("on");
        assert_eq!(tls.ca_file, PathBuf::from("ca.crt"));
        assert_eq!(tls.cert_file, Some(PathBuf::from("admin.crt")));
        let half =
            parse(&args("status --tls-ca ca.crt --tls-cert admin.crt"), None).expect("parses");
        assert!(
            half.tls.client_tls().is_err(),
            "a certificate needs its key"
        );
        assert_eq!(
            parse(&args("status"), None)
                .expect("valid")
                .tls
                .client_tls()
                .expect("ok"),
            None
        );
    }

    #[test]
    fn commands_parse_with_their_arguments() {
        let parsed = parse(
            &args("--addr http://relay:50052 pause catalog upgrade"),
            None,
        )
        .expect("valid");
        assert_eq!(parsed.addr, "http://relay:50052");
        assert_eq!(parsed.command, Command::Pause("catalog upgrade".into()));
        assert_eq!(
            parse(&args("redrive-quarantined 3 4"), Some("http://x:1".into())).expect("valid"),
            Invocation {
                addr: "http://x:1".into(),
                tls: TlsPaths::default(),
                command: Command::RedriveQuarantined(Selection::Ids(vec!["3".into(), "4".into()]))
            }
        );
        assert_eq!(
            parse(
                &args("replay --from 2026-11-25T10:00:00Z --shard s1 --no-wait"),
                None
            )
            .expect("valid")
            .command,
            Command::Replay {
                from: "2026-11-25T10:00:00Z".into(),
                shards: vec!["s1".into()],
                wait: false
            }
        );
    }

    #[test]
    fn mistakes_get_a_usage_message() {
        for line in [
            "",
            "frobnicate",
            "redrive-dead-letters",
            "redrive-dead-letters --all 3",
            "replay",
        ] {
            assert!(parse(&args(line), None).is_err(), "{line:?}");
        }
    }
}
