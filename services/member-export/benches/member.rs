//! Benchmark of member-export (issue 10), each figure next to the limit it is measured
//! against, from the same run:
//!
//! 1. **limited**: the partner simulator takes 400 requests/s (429 above it); one replica on
//!    SQLite, webhook dialect (one member per request), a backlog that never runs dry.
//!    Achieved requests/s over a steady window ÷ 400, and the share refused for rate.
//! 2. **shared**: the same partner, two replicas on one PostgreSQL database, each configured
//!    with 400/s: together ÷ 400 (the limit is the Deployment's, not each replica's).
//! 3. **unlimited**: a partner without a limit answering in 20 ms. EnqueueMemberChanges
//!    durable throughput (4 clients, 1,000 changes per request, no workers); then members/s
//!    delivered from that backlog with `groobee` (batches up to 1,000) and with `webhook` (one
//!    member per request), each next to the same simulator driven directly by the adapter
//!    with the same concurrency (the partner's and the socket's own limit).
//! 4. **failover**: 1,000,000 members in the member table (SQLite), a failover job over all of
//!    them, `groobee` at 20 requests/s (20,000 members/s allowed): members/s ÷ 20,000, and
//!    the peak RSS of the member-export process (the real binary, a child process).
//!
//! ```sh
//! scripts/bench.sh member                                   # everything; writes BENCHMARKS.md
//! cargo bench -p member-export --bench member -- limited    # one part (shared, unlimited, failover), prints only
//! cargo bench -p member-export --bench member -- unlimited groobee   # part 3, one dialect
//! cargo bench -p member-export --bench member -- quick      # shorter windows, 100,000 failover members
//! ```
//!
//! PostgreSQL comes from `MALL_TEST_POSTGRES_URL` (`scripts/bench.sh member` starts it).

use std::{
    fmt::Write as _,
    net::SocketAddr,
    num::NonZeroU32,
    path::Path,
    time::{Duration, Instant},
};

use mall_proto::member::v1::{
    Consent, EnqueueMemberChangesRequest, GetJobRequest, JobState, MarketingProfile, MemberChange,
    StartFailoverJobRequest, TimeRangeScope,
    member_export_service_client::MemberExportServiceClient, start_failover_job_request::Scope,
};
use mall_test_support::{TestDatabase, bench, probe};
use member_export::{
    App, Settings,
    partner::{AnyPartner, Channels, Delivery, Partner as _, PartnerSettings, Profile},
    simulator::{Behaviour, Counts, Simulator},
};
use prost::Message as _;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const KEY: &str = "bench-api-key";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// The partner's limit in parts 1 and 2.
const LIMIT: u32 = 400;
/// The failover job's rate in part 4, requests/s.
const FAILOVER_RATE: u32 = 20;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    // As the service's binary does (see `mall_grpc::process`).
    mall_grpc::process::disable_transparent_huge_pages();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let quick = args.iter().any(|a| a == "quick");
    let parts: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| {
            [
                "limited",
                "shared",
                "unlimited",
                "failover",
                "groobee",
                "webhook",
            ]
            .contains(a)
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(parts, quick))
}

async fn run(parts: Vec<&str>, quick: bool) -> anyhow::Result<()> {
    let all = parts.is_empty();
    let wants = |part| all || parts.contains(&part);
    let window = if quick {
        Duration::from_secs(8)
    } else {
        Duration::from_secs(20)
    };
    let mut report = String::new();
    if wants("limited") {
        report += &limited(window).await?;
    }
    if wants("shared") {
        report += &shared(window).await?;
    }
    if wants("unlimited") || args_name_dialect(&parts) {
        let dialects: Vec<&str> = ["groobee", "webhook"]
            .into_iter()
            .filter(|d| !args_name_dialect(&parts) || parts.contains(d))
            .collect();
        report += &unlimited(if quick { 50_000 } else { 200_000 }, &dialects).await?;
    }
    if wants("failover") {
        report += &failover(if quick { 100_000 } else { 1_000_000 }).await?;
    }
    println!("{report}");
    if all && !quick {
        let section = format!(
            "## member-export\n\n{}\nLoad average before: {}. Command: `scripts/bench.sh member` \
             (`cargo bench -p member-export --bench member`; see its module docs). The partner \
             simulator runs in the benchmark's process (parts 1–3 also run member-export there, \
             as its real `App`; part 4 runs the `member-export` binary as a child process so \
             its memory is its own), so both share the machine's cores.\n\n{report}",
            bench::machine(),
            bench::load_average(),
        );
        bench::replace_section("member-export", &section)?;
    } else {
        eprintln!("(a partial or quick run: BENCHMARKS.md left as it is)");
    }
    Ok(())
}

/// A member-export `App` in this process.
struct Replica {
    grpc: SocketAddr,
    shutdown: CancellationToken,
}

impl Replica {
    async fn start(settings: Settings) -> anyhow::Result<Self> {
        let app = App::build(settings).await?;
        let grpc = app.grpc_addr();
        let shutdown = CancellationToken::new();
        tokio::spawn(app.run_until(shutdown.clone().cancelled_owned()));
        Ok(Self { grpc, shutdown })
    }

    fn client(&self) -> MemberExportServiceClient<Channel> {
        MemberExportServiceClient::new(probe::channel(self.grpc))
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn settings(url: &str, partner: PartnerSettings) -> Settings {
    let mut settings = Settings::default();
    settings.server.listen_addr = "127.0.0.1:0".parse().expect("an address");
    settings.server.admin_addr = "127.0.0.1:0".parse().expect("an address");
    settings.database.url = url.to_owned().into();
    settings.partner = partner;
    settings.delivery.receive_wait = Duration::from_millis(100);
    settings
}

fn member(i: usize, version: u64) -> MemberChange {
    MemberChange {
        member_id: format!("B-{i:08}"),
        version,
        consent: Some(Consent {
            marketing_email: true,
            marketing_sms: i.is_multiple_of(2),
            ..Consent::default()
        }),
        profile: Some(profile(i)),
        change_time: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }),
        ..MemberChange::default()
    }
}

fn profile(i: usize) -> MarketingProfile {
    MarketingProfile {
        email: format!("member{i}@example.com"),
        phone: format!("+8210{i:08}"),
        display_name: format!("Member {i}"),
        preferred_language: "ko".into(),
        grade: "gold".into(),
        interests: vec!["outerwear".into(), "shoes".into()],
    }
}

/// Enqueues members `from..to` with `clients` concurrent callers, 1,000 per request; the
/// members/s it took.
async fn enqueue(
    client: &MemberExportServiceClient<Channel>,
    from: usize,
    to: usize,
    clients: usize,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let chunks: Vec<(usize, usize)> = (from..to)
        .step_by(1_000)
        .map(|start| (start, (start + 1_000).min(to)))
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..clients {
        let mut client = client.clone();
        let mine: Vec<(usize, usize)> = chunks
            .iter()
            .copied()
            .skip(worker)
            .step_by(clients)
            .collect();
        tasks.spawn(async move {
            for (start, end) in mine {
                client
                    .enqueue_member_changes(EnqueueMemberChangesRequest {
                        request_id: String::new(),
                        changes: (start..end).map(|i| member(i, 1)).collect(),
                    })
                    .await?;
            }
            Ok::<_, tonic::Status>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok((to - from) as f64 / started.elapsed().as_secs_f64())
}

/// The simulator's counts over `window`, after `warmup`.
async fn steady(simulator: &Simulator, warmup: Duration, window: Duration) -> (Counts, Duration) {
    tokio::time::sleep(warmup).await;
    let (before, started) = (simulator.counts(), Instant::now());
    tokio::time::sleep(window).await;
    let after = simulator.counts();
    let elapsed = started.elapsed();
    (
        Counts {
            requests: after.requests - before.requests,
            accepted: after.accepted - before.accepted,
            rate_limited: after.rate_limited - before.rate_limited,
            errors: after.errors - before.errors,
            hung: after.hung - before.hung,
            refused_configuration: after.refused_configuration - before.refused_configuration,
            members_accepted: after.members_accepted - before.members_accepted,
        },
        elapsed,
    )
}

async fn simulator(behaviour: Behaviour) -> anyhow::Result<Simulator> {
    Simulator::start("127.0.0.1:0".parse()?, KEY, SECRET, behaviour).await
}

fn limited_partner() -> Behaviour {
    Behaviour {
        rate_limit: NonZeroU32::new(LIMIT),
        latency: (Duration::from_millis(1), Duration::from_millis(5)),
        ..Behaviour::default()
    }
}

fn limited_settings(url: &str, simulator: &Simulator) -> Settings {
    let mut settings = settings(
        url,
        PartnerSettings::webhook(simulator.webhook_url(), SecretString::from(SECRET)),
    );
    settings.delivery.rate_limit_per_second = LIMIT;
    settings
}

/// Members enqueued for a limited run: the window and its warm-up at twice the limit.
fn backlog(window: Duration) -> usize {
    (window.as_secs() as usize + 10) * LIMIT as usize * 2
}

async fn limited(window: Duration) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let url = sqlite_url(dir.path(), "limited");
    let simulator = simulator(limited_partner()).await?;
    let replica = Replica::start(limited_settings(&url, &simulator)).await?;
    enqueue(&replica.client(), 0, backlog(window), 4).await?;
    let (counts, elapsed) = steady(&simulator, Duration::from_secs(3), window).await;
    replica.stop().await;
    let achieved = counts.accepted as f64 / elapsed.as_secs_f64();
    let refused = counts.rate_limited as f64 / counts.requests.max(1) as f64;
    let mut out = String::new();
    writeln!(
        out,
        "### 1. A partner limited to {LIMIT} requests/s, one replica (SQLite)\n"
    )?;
    writeln!(
        out,
        "| achieved requests/s | ÷ the limit | refused for rate | window |"
    )?;
    writeln!(out, "|---|---|---|---|")?;
    writeln!(
        out,
        "| {achieved:.0} | **{:.3}** (target ≥ 0.98) | {:.3} % of {} requests (target < 0.1 %) | {:.0} s |\n",
        achieved / f64::from(LIMIT),
        refused * 100.0,
        counts.requests,
        elapsed.as_secs_f64()
    )?;
    Ok(out)
}

async fn shared(window: Duration) -> anyhow::Result<String> {
    let database = TestDatabase::new(mall_test_support::Engine::Postgres).await;
    let simulator = simulator(limited_partner()).await?;
    let first = Replica::start(limited_settings(database.url(), &simulator)).await?;
    let second = Replica::start(limited_settings(database.url(), &simulator)).await?;
    enqueue(&first.client(), 0, backlog(window), 4).await?;
    let (counts, elapsed) = steady(&simulator, Duration::from_secs(3), window).await;
    first.stop().await;
    second.stop().await;
    let achieved = counts.accepted as f64 / elapsed.as_secs_f64();
    let refused = counts.rate_limited as f64 / counts.requests.max(1) as f64;
    let mut out = String::new();
    writeln!(
        out,
        "### 2. Two replicas sharing that limit (PostgreSQL), each configured with {LIMIT}/s\n"
    )?;
    writeln!(
        out,
        "| together requests/s | ÷ the limit | refused for rate | window |"
    )?;
    writeln!(out, "|---|---|---|---|")?;
    writeln!(
        out,
        "| {achieved:.0} | **{:.3}** (target 0.95–1.02) | {:.3} % of {} requests | {:.0} s |\n",
        achieved / f64::from(LIMIT),
        refused * 100.0,
        counts.requests,
        elapsed.as_secs_f64()
    )?;
    Ok(out)
}

/// Members/s the adapter alone gets from the simulator: `requests` requests of `batch`
/// members, `concurrency` at once.
async fn adapter_alone(
    partner: PartnerSettings,
    batch: usize,
    concurrency: usize,
    requests: usize,
) -> anyhow::Result<f64> {
    let partner = std::sync::Arc::new(AnyPartner::new(&partner)?);
    let deliveries: std::sync::Arc<[Delivery]> = (0..batch)
        .map(|i| {
            let p = profile(i);
            Delivery {
                member_id: format!("A-{i:08}"),
                version: 1,
                consent: Channels {
                    email: true,
                    sms: true,
                    push: false,
                },
                profile: Some(Profile {
                    email: Some(p.email),
                    phone: Some(p.phone),
                    display_name: p.display_name,
                    preferred_language: p.preferred_language,
                    grade: p.grade,
                    interests: p.interests,
                }),
                erase: false,
                recorded_micros: 0,
            }
        })
        .collect();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let (partner, deliveries) = (partner.clone(), deliveries.clone());
        tasks.spawn(async move {
            for i in (worker..requests).step_by(concurrency) {
                partner.send(&deliveries, &format!("k{i}")).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok((requests * batch) as f64 / started.elapsed().as_secs_f64())
}

/// Whether the arguments name one dialect of part 3 (`unlimited groobee`).
fn args_name_dialect(parts: &[&str]) -> bool {
    parts.iter().any(|p| ["groobee", "webhook"].contains(p))
}

async fn unlimited(members: usize, dialects: &[&str]) -> anyhow::Result<String> {
    let behaviour = Behaviour {
        latency: (Duration::from_millis(20), Duration::from_millis(20)),
        ..Behaviour::default()
    };
    let mut out = String::new();
    writeln!(
        out,
        "### 3. A partner without a limit, 20 ms per answer; {members} members, SQLite\n"
    )?;
    writeln!(
        out,
        "| what | members/s | baseline, same run | ratio | target |\n|---|---|---|---|---|"
    )?;
    for &dialect in dialects {
        let dir = tempfile::tempdir()?;
        let url = sqlite_url(dir.path(), dialect);
        let simulator = simulator(behaviour.clone()).await?;
        let partner = match dialect {
            "groobee" => PartnerSettings::groobee(simulator.groobee_url(), SecretString::from(KEY)),
            _ => PartnerSettings::webhook(simulator.webhook_url(), SecretString::from(SECRET)),
        };
        let (batch, concurrency) = if dialect == "groobee" {
            (1_000, 16)
        } else {
            (1, 128)
        };
        // The backlog first, with no worker, so enqueueing is measured on its own.
        let mut quiet = settings(&url, partner.clone());
        quiet.delivery.workers = Some(0);
        let replica = Replica::start(quiet).await?;
        let enqueued = enqueue(&replica.client(), 0, members, 4).await?;
        replica.stop().await;
        if dialect == "groobee" {
            writeln!(
                out,
                "| EnqueueMemberChanges, durable (4 clients × 1,000 per request) | {enqueued:.0} | | | |"
            )?;
        }
        let mut busy = settings(&url, partner.clone());
        busy.delivery.rate_limit_per_second = 1_000_000;
        busy.delivery.max_concurrency = concurrency;
        // Workers and receive depth are the service's defaults for the partner's batch size
        // (`DeliverySettings::shape`: 1 × 320 with batches, 4 × 16 one per request).
        let started = Instant::now();
        let replica = Replica::start(busy).await?;
        loop {
            if simulator.counts().members_accepted >= members as u64 {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(900),
                "{dialect}: the backlog did not drain in 15 minutes"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let rate = members as f64 / started.elapsed().as_secs_f64();
        replica.stop().await;
        let requests = if dialect == "groobee" { 200 } else { 20_000 };
        let alone = adapter_alone(partner, batch, concurrency, requests).await?;
        let (what, target) = if dialect == "groobee" {
            (
                "delivered, `groobee`, batches up to 1,000 (a round of 320 messages holds ~5,000), 1 worker (the default with batches), 16 in flight",
                "≥ 20,000/s",
            )
        } else {
            (
                "delivered, `webhook`, one member per request, 4 workers of 16 (the default), 128 in flight",
                "≥ 5,000/s",
            )
        };
        writeln!(
            out,
            "| {what} | {rate:.0} | adapter alone, same batches and concurrency: {alone:.0} | **{:.2}** | {target} |",
            rate / alone
        )?;
    }
    out.push('\n');
    Ok(out)
}

async fn failover(members: usize) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let url = sqlite_url(dir.path(), "failover");
    let loaded = Instant::now();
    preload(&url, members).await?;
    let load_time = loaded.elapsed();
    let simulator = simulator(Behaviour {
        latency: (Duration::from_millis(20), Duration::from_millis(20)),
        ..Behaviour::default()
    })
    .await?;
    let (grpc, admin) = (free_port()?, free_port()?);
    let binary = env!("CARGO_BIN_EXE_member-export");
    let mut child = tokio::process::Command::new(binary)
        .env("MEMBER_EXPORT__SERVER__LISTEN_ADDR", grpc.to_string())
        .env("MEMBER_EXPORT__SERVER__ADMIN_ADDR", admin.to_string())
        .env("MEMBER_EXPORT__DATABASE__URL", &url)
        .env("MEMBER_EXPORT__PARTNER__KIND", "groobee")
        .env(
            "MEMBER_EXPORT__PARTNER__URL",
            simulator.groobee_url().to_string(),
        )
        .env("MEMBER_EXPORT__PARTNER__API_KEY", KEY)
        .env("MEMBER_EXPORT__DELIVERY__WORKERS", "0")
        .env(
            "MEMBER_EXPORT__DELIVERY__RATE_LIMIT_PER_SECOND",
            FAILOVER_RATE.to_string(),
        )
        .env("MEMBER_EXPORT__JOBS__POLL_INTERVAL", "100ms")
        .env("MEMBER_EXPORT__TELEMETRY__LOG_FILTER", "warn")
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let pid = child.id().unwrap_or_default();
    let mut client = loop {
        if let Ok(channel) = Channel::from_shared(format!("http://{grpc}"))?
            .connect()
            .await
        {
            break MemberExportServiceClient::new(channel);
        }
        anyhow::ensure!(child.try_wait()?.is_none(), "member-export exited at start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let idle_rss = bench::rss_kib(pid, "VmRSS");
    let started = Instant::now();
    let job = client
        .start_failover_job(StartFailoverJobRequest {
            request_id: String::new(),
            scope: Some(Scope::TimeRange(TimeRangeScope {
                start_time: Some(prost_types::Timestamp {
                    seconds: 1_600_000_000,
                    nanos: 0,
                }),
                end_time: None,
            })),
        })
        .await?
        .into_inner()
        .job
        .unwrap_or_default();
    let done = loop {
        let job = client
            .get_job(GetJobRequest {
                job_id: job.job_id.clone(),
            })
            .await?
            .into_inner()
            .job
            .unwrap_or_default();
        if job.state != JobState::Pending as i32 && job.state != JobState::Running as i32 {
            break job;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(1_800),
            "the failover job did not finish in 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let elapsed = started.elapsed();
    let peak = bench::rss_kib(pid, "VmHWM");
    child.kill().await?;
    anyhow::ensure!(
        done.state == JobState::Succeeded as i32 && done.processed_count == members as i64,
        "the failover job ended {done:?}"
    );
    let rate = members as f64 / elapsed.as_secs_f64();
    let allowed = f64::from(FAILOVER_RATE) * 1_000.0;
    let mut out = String::new();
    writeln!(
        out,
        "### 4. A failover job over {members} members (SQLite), `groobee`, {FAILOVER_RATE} requests/s of 1,000\n"
    )?;
    writeln!(
        out,
        "| members/s | ÷ allowed ({allowed:.0}/s) | job time | peak RSS of member-export | RSS before the job | loading the table |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|")?;
    writeln!(
        out,
        "| {rate:.0} | **{:.3}** (target ≥ 0.95) | {:.1} s | **{:.0} MB** (target < 200 MB) | {:.0} MB | {:.0} s (direct inserts, not measured against anything) |\n",
        rate / allowed,
        elapsed.as_secs_f64(),
        peak as f64 / 1024.0,
        idle_rss as f64 / 1024.0,
        load_time.as_secs_f64()
    )?;
    Ok(out)
}

/// Writes `members` consented members straight into the member table, profiles encrypted
/// as EnqueueMemberChanges would (the job reads them as stored; how they got there is not
/// what is measured).
async fn preload(url: &str, members: usize) -> anyhow::Result<()> {
    use sea_orm::{ConnectionTrait as _, TransactionTrait as _};
    let db = mall_db::connect::<member_export::migration::Migrator>(&mall_db::DatabaseSettings {
        url: url.to_owned().into(),
        ..Default::default()
    })
    .await?;
    let cipher = member_export::crypto::ProfileCipher::new(
        &member_export::config::EncryptionSettings::default(),
    )?;
    for chunk in (0..members).collect::<Vec<_>>().chunks(10_000) {
        let txn = db.begin().await?;
        for rows in chunk.chunks(500) {
            let mut sql = String::from(
                "INSERT INTO members (member_id, version, consent_email, consent_sms, \
                 consent_push, consent_time, change_time, profile, key_id, queued_version, \
                 delivered_version, update_time) VALUES ",
            );
            let mut values: Vec<sea_orm::Value> = Vec::new();
            for (n, &i) in rows.iter().enumerate() {
                let id = format!("F-{i:08}");
                let (key_id, sealed) = cipher.encrypt(&id, &profile(i).encode_to_vec());
                if n > 0 {
                    sql.push(',');
                }
                let at = values.len();
                write!(
                    sql,
                    "(${}, 1, true, false, false, 0, {}, ${}, ${}, 1, 1, 0)",
                    at + 1,
                    1_700_000_000_000_000_i64 + i as i64,
                    at + 2,
                    at + 3
                )?;
                values.extend([id.into(), sealed.into(), key_id.into()]);
            }
            txn.execute_raw(mall_db::Backend::Sqlite.statement(&sql, values))
                .await?;
        }
        txn.commit().await?;
    }
    Ok(())
}

fn sqlite_url(dir: &Path, name: &str) -> String {
    format!("sqlite://{}/{name}.sqlite", dir.display())
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}
