//! Benchmark of sync-relay end to end (issue 5): product changes from publish until they are
//! visible in the catalog, on two stacks, each figure next to a baseline from the same run:
//!
//! - (a) **embedded**: PublishProductChanges → embedded queue in the relay's SQLite file →
//!   BulkUpdateProducts → catalog on SQLite;
//! - (b) **kinesis**: PutRecords into a multi-shard kinesalite stream → the relay's Kinesis
//!   source (leases and checkpoints in PostgreSQL) → SQS FIFO on LocalStack →
//!   BulkUpdateProducts → catalog on PostgreSQL;
//! - (c) **postgres**: PublishProductChanges → embedded queue in the relay's PostgreSQL
//!   database → BulkUpdateProducts → catalog on PostgreSQL (production's database without
//!   the emulators' latency).
//!
//! Catalog and relay run in this process as their real `App`s (release build), talking gRPC
//! over loopback. Each run changes distinct, already stored products once (one change per
//! product), so every change shows up as exactly one change-log record: a
//! WatchProductChanges stream opened before publishing counts them, and its `commit_time`
//! minus the change's `event_time` (set when the change is handed to the publish call, same
//! machine clock) is the event-to-applied latency.
//!
//! For every size, the same rows are also written with BulkUpdateProducts directly (1,000 per
//! request, the contract's maximum), before and after the relay run, on the same catalog:
//! the raw rate the relay is compared with. Finally paced runs offer 5,000 changes/s (and, on
//! stacks (a) and (c), 10,000) for a while and report the latency percentiles.
//!
//! ```sh
//! scripts/bench.sh relay                                 # both stacks; writes BENCHMARKS.md
//! cargo bench -p sync-relay --bench relay -- embedded    # one stack (or kinesis, postgres), prints only
//! cargo bench -p sync-relay --bench relay -- quick       # 10,000 changes and a short paced run
//! cargo bench -p sync-relay --bench relay -- --set apply.consumers=8   # try a setting
//! ```
//!
//! PostgreSQL, LocalStack and kinesalite come from `MALL_TEST_POSTGRES_URL`,
//! `MALL_TEST_SQS_ENDPOINT` and `MALL_TEST_KINESIS_ENDPOINT`, as for the tests
//! (`scripts/bench.sh relay` starts them); a stack that is asked for and unreachable fails the
//! run rather than being skipped.

#[path = "../tests/support/kinesalite.rs"]
mod kinesalite;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aws_sdk_kinesis::{primitives::Blob, types::PutRecordsRequestEntry};
use futures::StreamExt as _;
use mall_proto::{
    catalog::v1::{
        BulkUpdateProductsRequest, ProductUpdate, WatchProductChangesRequest,
        product_catalog_service_client::ProductCatalogServiceClient,
    },
    sync::v1::{
        ProductChange, PublishProductChangesRequest,
        sync_relay_service_client::SyncRelayServiceClient,
    },
};
use mall_queue::BackendKind;
use mall_test_support::{
    TestDatabase,
    bench::{self, CpuSample, CpuUse},
    probe, wait_until,
};
use prost::Message as _;
use prost_types::Timestamp;
use sync_relay::config::SourceKind;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Changes per end-to-end run.
const SIZES: [usize; 2] = [10_000, 100_000];
/// Offered rates of the paced runs, changes/s: issue 5 set its latency target at 5,000, issue 9
/// at 10,000 on stacks (a) and (c) (stack (b)'s emulators read about 4,000/s; see
/// [`Stack::paced_rates`]).
const PACED_RATES: [usize; 2] = [5_000, 10_000];
/// How long the paced run offers changes.
const PACED_DURATION: Duration = Duration::from_secs(20);
/// The pacer publishes every tick: 100 changes per 20 ms at 5,000/s, 200 at 10,000/s.
const PACED_TICK: Duration = Duration::from_millis(20);
/// Items per BulkUpdateProducts request of the raw baseline (the contract's maximum).
const BULK_BATCH: usize = 1_000;
/// Longest any one run may take before the benchmark gives up.
const RUN_TIMEOUT: Duration = Duration::from_secs(900);
/// Shards of the benchmark's Kinesis stream. Real Kinesis takes 1,000 records/s per shard, so
/// 20,000 changes/s needs at least 20 shards; kinesalite enforces no such limit.
const DEFAULT_SHARDS: i32 = 8;
/// How often a relay run samples the relay's counters for [`read_by_relay`].
const READ_SAMPLE: Duration = Duration::from_millis(50);
/// Records per PutRecords call (the Kinesis maximum is 500).
const PUT_BATCH: usize = 500;

/// The allocator the service binaries use, so the benchmark measures what runs in production.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    // As the service's binary does (see `mall_grpc::process`).
    mall_grpc::process::disable_transparent_huge_pages();
    let options = Options::parse(std::env::args().skip(1))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(options))
}

/// What to run, from the command line.
#[derive(Debug, Clone)]
struct Options {
    stacks: Vec<Stack>,
    sizes: Vec<usize>,
    paced: Duration,
    /// `--set key=value` overrides of the tuned settings, for experiments.
    overrides: BTreeMap<String, String>,
    /// Writes BENCHMARKS.md only for a complete run with the documented settings.
    write_report: bool,
}

impl Options {
    fn parse(args: impl Iterator<Item = String>) -> anyhow::Result<Self> {
        let mut options = Self {
            stacks: Vec::new(),
            sizes: SIZES.to_vec(),
            paced: PACED_DURATION,
            overrides: BTreeMap::new(),
            write_report: true,
        };
        let mut args = args.peekable();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                // cargo bench passes --bench to harness = false targets.
                "--bench" => {}
                "embedded" => options.stacks.push(Stack::Embedded),
                "kinesis" => options.stacks.push(Stack::Kinesis),
                "postgres" => options.stacks.push(Stack::Postgres),
                "quick" => {
                    options.sizes = vec![SIZES[0]];
                    options.paced = Duration::from_secs(8);
                    options.write_report = false;
                }
                "--set" => {
                    let pair = args
                        .next()
                        .ok_or_else(|| anyhow::anyhow!("--set needs key=value"))?;
                    let (key, value) = pair
                        .split_once('=')
                        .ok_or_else(|| anyhow::anyhow!("--set needs key=value, not {pair}"))?;
                    options.overrides.insert(key.to_owned(), value.to_owned());
                    options.write_report = false;
                }
                other => anyhow::bail!(
                    "unknown argument {other:?}; expected embedded, kinesis, postgres, quick or --set key=value"
                ),
            }
        }
        if options.stacks.is_empty() {
            options.stacks = vec![Stack::Embedded, Stack::Kinesis, Stack::Postgres];
        } else if options.stacks.len() < 2 {
            options.write_report = false;
        }
        Ok(options)
    }

    fn get<T: std::str::FromStr>(&self, key: &str, default: T) -> anyhow::Result<T> {
        match self.overrides.get(key) {
            None => Ok(default),
            Some(value) => value
                .parse()
                .map_err(|_| anyhow::anyhow!("--set {key}={value}: not a valid value")),
        }
    }

    fn check_known(&self) -> anyhow::Result<()> {
        const KNOWN: &[&str] = &[
            "relay.lanes",
            "relay.max_message_bytes",
            "apply.consumers",
            "apply.receive_batch",
            "apply.receive_lanes",
            "queue.poll_ms",
            "kinesis.shards",
            "kinesis.max_records",
            "kinesis.idle_poll_ms",
            "sqs.send_concurrency",
            "publishers",
            "relay.db_connections",
            "catalog.db_connections",
        ];
        for key in self.overrides.keys() {
            anyhow::ensure!(
                KNOWN.contains(&key.as_str()),
                "unknown --set key {key}; known: {}",
                KNOWN.join(", ")
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stack {
    Embedded,
    Kinesis,
    Postgres,
}

impl Stack {
    fn label(self) -> &'static str {
        match self {
            Self::Embedded => "(a) gRPC publish, embedded queue, SQLite",
            Self::Kinesis => "(b) Kinesis (kinesalite), SQS (LocalStack), PostgreSQL",
            Self::Postgres => "(c) gRPC publish, embedded queue, PostgreSQL",
        }
    }

    /// The paced runs' offered rates on this stack.
    fn paced_rates(self) -> &'static [usize] {
        match self {
            Self::Kinesis => &PACED_RATES[..1],
            Self::Embedded | Self::Postgres => &PACED_RATES,
        }
    }
}

/// Everything measured in one run.
#[derive(Debug, Default)]
struct Report {
    runs: Vec<RunResult>,
    paced: Vec<PacedResult>,
    notes: Vec<String>,
}

#[derive(Debug)]
struct RunResult {
    stack: Stack,
    changes: usize,
    relay: Measured,
    raw_before: Measured,
    raw_after: Measured,
    /// Changes per BulkUpdateProducts call the relay made, and per queue message.
    per_call: f64,
    per_message: f64,
}

#[derive(Debug)]
struct PacedResult {
    stack: Stack,
    offered: usize,
    measured: Measured,
}

/// One run: when publishing ended, when the last change was visible, latencies.
#[derive(Debug, Clone)]
struct Measured {
    changes: usize,
    /// Publish start until the publisher's last call returned (the relay accepted all: for
    /// gRPC, durable in the queue; for Kinesis, in the stream).
    published: Duration,
    /// Publish start until the watcher received the last change.
    visible: Duration,
    /// Run start until the relay's source had read every change (relay runs only).
    read: Option<Duration>,
    /// Event time to the change-log record's commit time, sorted.
    to_commit: Vec<Duration>,
    /// Event time to the watcher receiving the record, sorted.
    to_visible: Vec<Duration>,
    /// Who used the CPU during the run.
    cpu: CpuUse,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.changes as f64 / self.visible.as_secs_f64()
    }

    fn published_rate(&self) -> f64 {
        self.changes as f64 / self.published.as_secs_f64()
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

async fn run(options: Options) -> anyhow::Result<()> {
    options.check_known()?;
    let telemetry = mall_telemetry::init(
        "sync-relay-bench",
        &mall_telemetry::TelemetrySettings {
            log_filter: "warn".into(),
            ..mall_telemetry::TelemetrySettings::default()
        },
    )?;
    let load_before = bench::load_average();
    let started = Instant::now();
    let mut report = Report::default();
    for &stack in &options.stacks {
        bench_stack(stack, &options, &mut report).await?;
    }
    let load_after = bench::load_average();
    eprintln!("\n{}", table(&report));
    if options.write_report {
        write_report(&report, &load_before, &load_after, started.elapsed())?;
    } else {
        eprintln!("(a partial run or one with --set: BENCHMARKS.md left as it is)");
    }
    telemetry.shutdown()
}

/// Runs every measurement on one stack.
async fn bench_stack(stack: Stack, options: &Options, report: &mut Report) -> anyhow::Result<()> {
    eprintln!("\n== {}", stack.label());
    let running = Running::start(stack, options).await?;
    let largest = options.sizes.iter().copied().max().unwrap_or(0);
    let paced_rate = stack.paced_rates().iter().copied().max().unwrap_or(0);
    let largest = largest.max(paced_rate * options.paced.as_secs() as usize);
    let times = Arc::new(EventTimes::new(largest));

    // Every product exists before the runs: the relay's work is updating them, as in the
    // mall. Seeding is also the warm-up of the catalog (connections, caches).
    let mut version = 1;
    let seed = raw_bulk(&running, &times, largest, version).await?;
    eprintln!(
        "  seeded {largest} products at {:.0} rows/s (inserts)",
        seed.rate()
    );
    // Warm-up of the relay: leases taken, connections open, queue created.
    version += 1;
    let warm = relay_run(&running, &times, 1_000, version).await?;
    eprintln!(
        "  warm-up: 1000 changes through the relay in {:?}",
        warm.visible
    );

    for &size in &options.sizes {
        version += 1;
        let raw_before = raw_bulk(&running, &times, size, version).await?;
        version += 1;
        let counters = running.relay_counters().await;
        let relay = relay_run(&running, &times, size, version).await?;
        let counters = running.relay_counters().await.since(&counters);
        version += 1;
        let raw_after = raw_bulk(&running, &times, size, version).await?;
        eprintln!(
            "  {size}: relay {:.0}/s (accepted at {:.0}/s, all read by the relay after {}) p50 {} p99 {}; raw {:.0} / {:.0} rows/s; \
             {:.0} changes per catalog call, {:.0} per queue message\n    cpu (relay run): {}\n    cpu (raw run): {}",
            relay.rate(),
            relay.published_rate(),
            relay.read.map_or_else(|| "-".to_owned(), ms),
            ms(percentile(&relay.to_commit, 0.5)),
            ms(percentile(&relay.to_commit, 0.99)),
            raw_before.rate(),
            raw_after.rate(),
            counters.per_call(),
            counters.per_message(),
            relay.cpu.describe(),
            raw_before.cpu.describe(),
        );
        report.runs.push(RunResult {
            stack,
            changes: size,
            relay,
            raw_before,
            raw_after,
            per_call: counters.per_call(),
            per_message: counters.per_message(),
        });
    }

    for &rate in stack.paced_rates() {
        version += 1;
        let paced = paced_run(&running, &times, version, rate, options).await?;
        eprintln!(
            "  paced {rate}/s for {:?}: delivered {:.0}/s, p50 {} p99 {} (visible p99 {})\n    cpu: {}",
            options.paced,
            paced.rate(),
            ms(percentile(&paced.to_commit, 0.5)),
            ms(percentile(&paced.to_commit, 0.99)),
            ms(percentile(&paced.to_visible, 0.99)),
            paced.cpu.describe(),
        );
        report.paced.push(PacedResult {
            stack,
            offered: rate,
            measured: paced,
        });
    }
    let dead = running.dead_letters().await?;
    anyhow::ensure!(dead == 0, "the relay dead-lettered {dead} messages");
    running.stop().await
}

// ---------------------------------------------------------------------------------------------
// The stack: a catalog, a relay and, for (b), a stream.

/// A catalog and a relay serving in this process, and how to reach their inputs.
struct Running {
    stack: Stack,
    catalog: ProductCatalogServiceClient<Channel>,
    relay: SyncRelayServiceClient<Channel>,
    relay_admin: SocketAddr,
    kinesis: Option<(aws_sdk_kinesis::Client, String)>,
    publishers: usize,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
    /// PostgreSQL database names, to tell this benchmark's backends from others'.
    database_names: Vec<String>,
    _databases: [TestDatabase; 2],
}

impl Running {
    async fn start(stack: Stack, options: &Options) -> anyhow::Result<Self> {
        let (catalog_db, relay_db) = match stack {
            Stack::Embedded => (TestDatabase::sqlite(), TestDatabase::sqlite()),
            Stack::Kinesis | Stack::Postgres => (
                TestDatabase::postgres().await,
                TestDatabase::postgres().await,
            ),
        };
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();

        let mut catalog = product_catalog::Settings::default();
        catalog.server.listen_addr = "127.0.0.1:0".parse()?;
        catalog.server.admin_addr = "127.0.0.1:0".parse()?;
        catalog.database.url = catalog_db.url().to_owned().into();
        if stack != Stack::Embedded {
            // Room for the relay's parallel lanes, the watcher and the baseline.
            catalog.database.max_connections = options.get("catalog.db_connections", 16)?;
        }
        let app = product_catalog::App::build(catalog).await?;
        let catalog_addr = app.grpc_addr();
        tasks.push(tokio::spawn(
            app.run_until(shutdown.clone().cancelled_owned()),
        ));
        wait_until("the catalog serves", Duration::from_secs(30), || async {
            probe::health(catalog_addr, "").await.map(|_| ())
        })
        .await;

        let mut kinesis = None;
        let mut settings = relay_settings(stack, options)?;
        settings.database.url = relay_db.url().to_owned().into();
        settings.apply.catalog_url = format!("http://{catalog_addr}").parse()?;
        if stack == Stack::Kinesis {
            let shards = options.get("kinesis.shards", DEFAULT_SHARDS)?;
            let stream = format!("relay-bench-{:08x}", fastrand::u32(..));
            let client = kinesalite::create_stream(&settings.source.kinesis, &stream, shards).await;
            settings.source.kinesis.stream_name = stream.clone();
            kinesis = Some((client, stream));
            settings.queue.sqs.endpoint_url =
                Some(mall_test_support::sqs_endpoint().await.parse()?);
        }
        let app = sync_relay::App::build(settings).await?;
        let relay_addr = app.grpc_addr();
        let relay_admin = app.admin_addr();
        tasks.push(tokio::spawn(
            app.run_until(shutdown.clone().cancelled_owned()),
        ));
        wait_until("the relay serves", Duration::from_secs(30), || async {
            probe::health(relay_addr, "").await.map(|_| ())
        })
        .await;

        let big = 64 << 20;
        Ok(Self {
            stack,
            catalog: ProductCatalogServiceClient::new(probe::channel(catalog_addr))
                .max_decoding_message_size(big)
                .max_encoding_message_size(big),
            relay: SyncRelayServiceClient::new(probe::channel(relay_addr))
                .max_decoding_message_size(big)
                .max_encoding_message_size(big),
            relay_admin,
            kinesis,
            publishers: options.get("publishers", 4)?,
            shutdown,
            tasks,
            database_names: [&catalog_db, &relay_db]
                .iter()
                .filter_map(|d| d.url().rsplit_once('/').map(|(_, name)| name.to_owned()))
                .collect(),
            _databases: [catalog_db, relay_db],
        })
    }

    /// Now, with a CPU sample of everything that serves this benchmark.
    fn cpu_sample(&self) -> (Instant, CpuSample) {
        (Instant::now(), CpuSample::now(&self.database_names))
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        for task in self.tasks {
            task.await??;
        }
        Ok(())
    }

    /// The relay's counters from its `/metrics`.
    async fn relay_counters(&self) -> Counters {
        self.admin_client().counters().await
    }

    fn admin_client(&self) -> Admin {
        Admin(self.relay_admin)
    }

    async fn dead_letters(&self) -> anyhow::Result<i64> {
        let status = self
            .relay
            .clone()
            .get_relay_status(mall_proto::sync::v1::GetRelayStatusRequest {})
            .await?
            .into_inner()
            .status
            .ok_or_else(|| anyhow::anyhow!("the relay status is empty"))?;
        anyhow::ensure!(
            status.quarantined_count == 0,
            "the relay quarantined {} changes",
            status.quarantined_count
        );
        Ok(status.dead_letter_count)
    }
}

/// The relay's admin port.
#[derive(Debug, Clone, Copy)]
struct Admin(SocketAddr);

impl Admin {
    /// The relay's counters from its `/metrics`.
    async fn counters(self) -> Counters {
        let (_, text) = probe::http_get(self.0, "/metrics").await;
        let sum = |name: &str, filter: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(name) && l.contains(filter))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        Counters {
            received: sum("mall_sync_relay_changes_received_total", ""),
            calls: sum("mall_sync_relay_catalog_calls_total", "code=\"OK\""),
            messages: sum("mall_sync_relay_queue_messages_sent_total", ""),
            applied: sum("mall_sync_relay_changes_applied_total", ""),
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    received: f64,
    calls: f64,
    messages: f64,
    applied: f64,
}

impl Counters {
    fn since(self, before: &Self) -> Self {
        Self {
            received: self.received - before.received,
            calls: self.calls - before.calls,
            messages: self.messages - before.messages,
            applied: self.applied - before.applied,
        }
    }

    fn per_call(&self) -> f64 {
        self.applied / self.calls.max(1.0)
    }

    fn per_message(&self) -> f64 {
        self.applied / self.messages.max(1.0)
    }
}

/// The relay's settings for `stack`, tuned for throughput where that is a legitimate
/// production setting. Every deviation from the defaults is listed in BENCHMARKS.md by
/// [`tuning`].
fn relay_settings(stack: Stack, options: &Options) -> anyhow::Result<sync_relay::Settings> {
    let mut settings = sync_relay::Settings::default();
    settings.server.listen_addr = "127.0.0.1:0".parse()?;
    settings.server.admin_addr = "127.0.0.1:0".parse()?;
    settings.telemetry.log_filter = "warn".into();
    settings.relay.lanes = options.get("relay.lanes", settings.relay.lanes)?;
    settings.relay.max_message_bytes =
        options.get("relay.max_message_bytes", settings.relay.max_message_bytes)?;
    settings.apply.consumers = options.get("apply.consumers", settings.apply.consumers)?;
    if options.overrides.contains_key("apply.receive_batch") {
        settings.apply.receive_batch = Some(options.get("apply.receive_batch", 0)?);
    }
    if options.overrides.contains_key("apply.receive_lanes") {
        settings.apply.receive_lanes = Some(options.get("apply.receive_lanes", 0)?);
    }
    settings.queue.embedded.poll_interval = Duration::from_millis(options.get(
        "queue.poll_ms",
        settings.queue.embedded.poll_interval.as_millis() as u64,
    )?);
    settings.database.max_connections =
        options.get("relay.db_connections", settings.database.max_connections)?;
    if stack == Stack::Kinesis {
        settings.source.kind = SourceKind::Kinesis;
        let kinesis = &mut settings.source.kinesis;
        kinesis.endpoint_url = Some(kinesalite::endpoint().parse()?);
        kinesis.region = Some("us-east-1".into());
        kinesis.access_key_id = Some("test".to_owned().into());
        kinesis.secret_access_key = Some("test".to_owned().into());
        kinesis.max_records_per_call =
            options.get("kinesis.max_records", kinesis.max_records_per_call)?;
        kinesis.idle_poll_interval = Duration::from_millis(options.get(
            "kinesis.idle_poll_ms",
            kinesis.idle_poll_interval.as_millis() as u64,
        )?);
        let queue = &mut settings.queue;
        queue.backend = BackendKind::Sqs;
        queue.name = format!("relay-bench-{:08x}.fifo", fastrand::u32(..));
        queue.sqs.region = Some("us-east-1".into());
        queue.sqs.access_key_id = Some("test".into());
        queue.sqs.secret_access_key = Some("test".to_owned().into());
        queue.sqs.create_queues = true;
        queue.sqs.send_concurrency =
            options.get("sqs.send_concurrency", queue.sqs.send_concurrency)?;
    }
    Ok(settings)
}

/// The settings [`relay_settings`] changes from the defaults, for the report.
fn tuning(stack: Stack) -> Vec<(&'static str, String, &'static str)> {
    let defaults = sync_relay::Settings::default();
    let tuned = relay_settings(
        stack,
        &Options::parse(std::iter::empty()).expect("no arguments parse"),
    )
    .expect("the benchmark's settings are valid");
    let mut changed = Vec::new();
    let mut compare = |key: &'static str, default: String, value: String, why: &'static str| {
        if default != value {
            changed.push((key, format!("{default} → {value}"), why));
        }
    };
    compare(
        "relay.lanes",
        defaults.relay.lanes.to_string(),
        tuned.relay.lanes.to_string(),
        "",
    );
    compare(
        "apply.consumers",
        defaults.apply.consumers.to_string(),
        tuned.apply.consumers.to_string(),
        "",
    );
    compare(
        "kinesis.idle_poll_interval",
        format!("{:?}", defaults.source.kinesis.idle_poll_interval),
        format!("{:?}", tuned.source.kinesis.idle_poll_interval),
        "",
    );
    changed
}

// ---------------------------------------------------------------------------------------------
// Runs

/// When each product's change of the current run was handed to its publish call, in
/// microseconds since the Unix epoch, by product index.
struct EventTimes(Vec<AtomicI64>);

impl EventTimes {
    fn new(products: usize) -> Self {
        Self((0..products).map(|_| AtomicI64::new(0)).collect())
    }

    fn set(&self, index: usize, micros: i64) {
        self.0[index].store(micros, Ordering::Relaxed);
    }

    fn get(&self, index: usize) -> i64 {
        self.0[index].load(Ordering::Relaxed)
    }
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

fn timestamp(micros: i64) -> Timestamp {
    Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1_000) as i32,
    }
}

fn micros_of(t: &Timestamp) -> i64 {
    t.seconds * 1_000_000 + i64::from(t.nanos) / 1_000
}

/// What the watcher saw of one record.
struct Seen {
    index: usize,
    commit: i64,
    at: i64,
}

/// Opens a WatchProductChanges stream at the head of the change log and collects the next
/// `expected` records, all of which must be at `version`.
async fn watch(
    catalog: &ProductCatalogServiceClient<Channel>,
    expected: usize,
    version: u64,
) -> anyhow::Result<JoinHandle<anyhow::Result<Vec<Seen>>>> {
    let mut stream = catalog
        .clone()
        .watch_product_changes(WatchProductChangesRequest::default())
        .await?
        .into_inner();
    Ok(tokio::spawn(async move {
        let mut seen = Vec::with_capacity(expected);
        while seen.len() < expected {
            let response = tokio::time::timeout(RUN_TIMEOUT, stream.message())
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "no change for {RUN_TIMEOUT:?}; {} of {expected}",
                        seen.len()
                    )
                })??
                .ok_or_else(|| anyhow::anyhow!("the watch stream ended"))?;
            let at = now_micros();
            for record in response.changes {
                let product = record
                    .product
                    .ok_or_else(|| anyhow::anyhow!("a change record without its product"))?;
                anyhow::ensure!(
                    product.version == version,
                    "{} at version {}, expected {version}: a change outside this run",
                    product.code,
                    product.version
                );
                seen.push(Seen {
                    index: index_of(&product.code)?,
                    commit: record.commit_time.as_ref().map_or(0, micros_of),
                    at,
                });
            }
        }
        anyhow::ensure!(
            seen.len() == expected,
            "{} records, expected {expected}",
            seen.len()
        );
        Ok(seen)
    }))
}

/// Joins what the watcher saw with the event times.
fn measured(
    seen: Vec<Seen>,
    times: &EventTimes,
    start: (Instant, CpuSample),
    published: Instant,
    visible: (Instant, CpuSample),
) -> Measured {
    let (start, cpu) = start;
    let (visible, cpu_end) = visible;
    let cpu = cpu.since(&cpu_end, visible - start);
    let mut to_commit = Vec::with_capacity(seen.len());
    let mut to_visible = Vec::with_capacity(seen.len());
    let mut indexes = std::collections::HashSet::with_capacity(seen.len());
    for s in &seen {
        indexes.insert(s.index);
        let event = times.get(s.index);
        to_commit.push(Duration::from_micros((s.commit - event).max(0) as u64));
        to_visible.push(Duration::from_micros((s.at - event).max(0) as u64));
    }
    assert_eq!(indexes.len(), seen.len(), "every product is seen once");
    to_commit.sort_unstable();
    to_visible.sort_unstable();
    Measured {
        changes: seen.len(),
        published: published - start,
        visible: visible - start,
        read: None,
        to_commit,
        to_visible,
        cpu,
    }
}

/// Writes products `0..count` at `version` with BulkUpdateProducts, [`BULK_BATCH`] per
/// request, one request at a time.
async fn raw_bulk(
    running: &Running,
    times: &EventTimes,
    count: usize,
    version: u64,
) -> anyhow::Result<Measured> {
    let changes: Vec<ProductUpdate> = (0..count)
        .map(|i| ProductUpdate {
            product: Some(bench::product(i, version)),
            update_mask: None,
        })
        .collect();
    let watcher = watch(&running.catalog, count, version).await?;
    let start = running.cpu_sample();
    for (chunk, updates) in changes.chunks(BULK_BATCH).enumerate() {
        let now = now_micros();
        for i in 0..updates.len() {
            times.set(chunk * BULK_BATCH + i, now);
        }
        running
            .catalog
            .clone()
            .bulk_update_products(BulkUpdateProductsRequest {
                request_id: String::new(),
                product_type: "apparel".into(),
                updates: updates.to_vec(),
            })
            .await?;
    }
    let published = Instant::now();
    let seen = watcher.await??;
    Ok(measured(
        seen,
        times,
        start,
        published,
        running.cpu_sample(),
    ))
}

/// Publishes one change to each of products `0..count` at `version` through the relay's
/// input and waits until the catalog shows every one.
async fn relay_run(
    running: &Running,
    times: &Arc<EventTimes>,
    count: usize,
    version: u64,
) -> anyhow::Result<Measured> {
    let changes: Vec<ProductChange> = (0..count).map(|i| change(i, version)).collect();
    let watcher = watch(&running.catalog, count, version).await?;
    let start = running.cpu_sample();
    let read = read_by_relay(running, count).await;
    match running.stack {
        Stack::Embedded | Stack::Postgres => publish_grpc(running, times, changes).await?,
        Stack::Kinesis => put_records(running, times, changes).await?,
    }
    let published = Instant::now();
    let seen = tokio::time::timeout(RUN_TIMEOUT, watcher)
        .await
        .map_err(|_| anyhow::anyhow!("the run did not finish in {RUN_TIMEOUT:?}"))???;
    let mut measured = measured(seen, times, start, published, running.cpu_sample());
    measured.read = read.await?.map(|at| at - start.0);
    Ok(measured)
}

/// When the relay's source had read `count` more changes than now (for gRPC: accepted them
/// into the queue), sampled every [`READ_SAMPLE`]: stage 1's share of a run. `None` if the
/// run ended first.
async fn read_by_relay(running: &Running, count: usize) -> JoinHandle<Option<Instant>> {
    let client = running.admin_client();
    let before = client.counters().await.received;
    tokio::spawn(async move {
        let deadline = Instant::now() + RUN_TIMEOUT;
        while Instant::now() < deadline {
            if client.counters().await.received - before >= count as f64 {
                return Some(Instant::now());
            }
            tokio::time::sleep(READ_SAMPLE).await;
        }
        None
    })
}

/// PublishProductChanges from `running.publishers` concurrent calls, each streaming messages
/// of 1,000 changes (the contract's maximum); a change's event time is set when its message
/// is handed to gRPC.
async fn publish_grpc(
    running: &Running,
    times: &Arc<EventTimes>,
    changes: Vec<ProductChange>,
) -> anyhow::Result<()> {
    let messages: Vec<Vec<ProductChange>> = changes
        .chunks(1_000)
        .map(<[ProductChange]>::to_vec)
        .collect();
    let mut per_caller: Vec<Vec<Vec<ProductChange>>> = vec![Vec::new(); running.publishers];
    for (i, message) in messages.into_iter().enumerate() {
        per_caller[i % running.publishers].push(message);
    }
    let calls = per_caller.into_iter().map(|messages| {
        let mut client = running.relay.clone();
        let times = times.clone();
        async move {
            let stream = futures::stream::iter(messages).map(move |mut changes| {
                let now = now_micros();
                for change in &mut changes {
                    times.set(index_of(&change.product_code).expect("our own code"), now);
                    change.event_time = Some(timestamp(now));
                }
                PublishProductChangesRequest { changes }
            });
            let response = client.publish_product_changes(stream).await?.into_inner();
            anyhow::ensure!(
                response.quarantined_count == 0,
                "the relay quarantined {} changes",
                response.quarantined_count
            );
            anyhow::Ok(response.accepted_count as usize)
        }
    });
    let accepted: usize = futures::future::try_join_all(calls)
        .await?
        .into_iter()
        .sum();
    anyhow::ensure!(accepted > 0, "nothing was accepted");
    Ok(())
}

/// PutRecords of [`PUT_BATCH`] records from `running.publishers` concurrent producers,
/// partition key = product code; a record's event time is set when its call is made.
async fn put_records(
    running: &Running,
    times: &Arc<EventTimes>,
    changes: Vec<ProductChange>,
) -> anyhow::Result<()> {
    let (client, stream) = running.kinesis.as_ref().expect("the kinesis stack");
    // Encoded without the event time: appending the encoded `event_time` field when the
    // record is sent sets it (protobuf merges concatenated encodings).
    let records: Vec<(usize, String, Vec<u8>)> = changes
        .iter()
        .map(|c| {
            (
                index_of(&c.product_code).expect("our own code"),
                c.product_code.clone(),
                c.encode_to_vec(),
            )
        })
        .collect();
    let batches: Vec<_> = records.chunks(PUT_BATCH).map(<[_]>::to_vec).collect();
    let mut per_producer: Vec<Vec<_>> = vec![Vec::new(); running.publishers];
    for (i, batch) in batches.into_iter().enumerate() {
        per_producer[i % running.publishers].push(batch);
    }
    let producers = per_producer.into_iter().map(|batches| {
        let client = client.clone();
        let stream = stream.clone();
        let times = times.clone();
        async move {
            for batch in batches {
                put_batch(&client, &stream, &times, batch).await?;
            }
            anyhow::Ok(())
        }
    });
    futures::future::try_join_all(producers).await?;
    Ok(())
}

/// One PutRecords call, retrying the entries Kinesis refused.
async fn put_batch(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    times: &EventTimes,
    mut batch: Vec<(usize, String, Vec<u8>)>,
) -> anyhow::Result<()> {
    let now = now_micros();
    let event = ProductChange {
        event_time: Some(timestamp(now)),
        ..ProductChange::default()
    }
    .encode_to_vec();
    for (index, _, data) in &mut batch {
        times.set(*index, now);
        data.extend_from_slice(&event);
    }
    let mut last_error = String::from("records refused");
    for _attempt in 0..10 {
        let entries = batch
            .iter()
            .map(|(_, key, data)| {
                PutRecordsRequestEntry::builder()
                    .partition_key(key)
                    .data(Blob::new(data.clone()))
                    .build()
                    .expect("partition key and data are set")
            })
            .collect();
        let output = match client
            .put_records()
            .stream_name(stream)
            .set_records(Some(entries))
            .send()
            .await
        {
            Ok(output) => output,
            Err(error) => {
                // kinesalite, busy with the relay's reads, sometimes drops a call: send again.
                last_error = aws_sdk_kinesis::error::DisplayErrorContext(&error).to_string();
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if output.failed_record_count.unwrap_or(0) == 0 {
            return Ok(());
        }
        batch = batch
            .into_iter()
            .zip(output.records)
            .filter(|(_, result)| result.error_code.is_some())
            .map(|(record, _)| record)
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!(
        "kinesis kept refusing {} records: {last_error}",
        batch.len()
    )
}

/// Offers `rate` changes/s for `options.paced`: every [`PACED_TICK`], the next products'
/// changes, event time = the tick. Measures latency under a steady load.
async fn paced_run(
    running: &Running,
    times: &Arc<EventTimes>,
    version: u64,
    rate: usize,
    options: &Options,
) -> anyhow::Result<Measured> {
    let per_tick = rate * PACED_TICK.as_millis() as usize / 1000;
    let ticks = (options.paced.as_millis() / PACED_TICK.as_millis()) as usize;
    let count = per_tick * ticks;
    let watcher = watch(&running.catalog, count, version).await?;
    let start = running.cpu_sample();
    let mut interval = tokio::time::interval(PACED_TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    match running.stack {
        Stack::Embedded | Stack::Postgres => {
            // One publish call per tick, as producers call it: a single call streaming for
            // the whole run would outlast the server's request timeout whenever stage 1
            // falls behind the pace.
            let mut calls = tokio::task::JoinSet::new();
            for tick in 0..ticks {
                interval.tick().await;
                let now = now_micros();
                let changes: Vec<ProductChange> = (tick * per_tick..(tick + 1) * per_tick)
                    .map(|i| {
                        times.set(i, now);
                        let mut c = change(i, version);
                        c.event_time = Some(timestamp(now));
                        c
                    })
                    .collect();
                let mut client = running.relay.clone();
                calls.spawn(async move {
                    client
                        .publish_product_changes(tokio_stream::iter([
                            PublishProductChangesRequest { changes },
                        ]))
                        .await
                        .map(|r| r.into_inner().accepted_count)
                });
            }
            let mut accepted = 0;
            while let Some(result) = calls.join_next().await {
                accepted += result??;
            }
            anyhow::ensure!(accepted as usize == count);
        }
        Stack::Kinesis => {
            let (client, stream) = running.kinesis.as_ref().expect("the kinesis stack");
            let mut calls = tokio::task::JoinSet::new();
            for tick in 0..ticks {
                interval.tick().await;
                let batch = (tick * per_tick..(tick + 1) * per_tick)
                    .map(|i| {
                        let c = change(i, version);
                        (i, c.product_code.clone(), c.encode_to_vec())
                    })
                    .collect();
                let (client, stream, times) = (client.clone(), stream.clone(), times.clone());
                calls.spawn(async move { put_batch(&client, &stream, &times, batch).await });
            }
            while let Some(result) = calls.join_next().await {
                result??;
            }
        }
    }
    let published = Instant::now();
    let seen = tokio::time::timeout(RUN_TIMEOUT, watcher)
        .await
        .map_err(|_| anyhow::anyhow!("the paced run did not finish in {RUN_TIMEOUT:?}"))???;
    Ok(measured(
        seen,
        times,
        start,
        published,
        running.cpu_sample(),
    ))
}

// ---------------------------------------------------------------------------------------------
// Workload

fn index_of(code: &str) -> anyhow::Result<usize> {
    code.strip_prefix("P-")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{code:?} is not a benchmark product"))
}

/// A full replacement of product `i` at `version`.
fn change(i: usize, version: u64) -> ProductChange {
    let product = bench::product(i, version);
    ProductChange {
        product_code: product.code.clone(),
        product_type: product.product_type.clone(),
        version,
        product: Some(product),
        ..ProductChange::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Report

fn ms(duration: Duration) -> String {
    let ms = duration.as_secs_f64() * 1000.0;
    if ms >= 10_000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        format!("{ms:.0} ms")
    }
}

fn table(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| stack | changes | end to end changes/s | published /s | all read by the relay after | event→commit p50 | p99 | raw BulkUpdate rows/s (before / after) | ratio | changes per queue message / catalog call | cores used (relay run) |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for run in &report.runs {
        let raw = (run.raw_before.rate() + run.raw_after.rate()) / 2.0;
        let _ = writeln!(
            out,
            "| {} | {} | **{:.0}** | {:.0} | {} | {} | {} | {:.0} ({:.0} / {:.0}) | **{:.2}** | {:.0} / {:.0} | {:.2} |",
            short(run.stack),
            run.changes,
            run.relay.rate(),
            run.relay.published_rate(),
            run.relay.read.map_or_else(|| "-".to_owned(), ms),
            ms(percentile(&run.relay.to_commit, 0.5)),
            ms(percentile(&run.relay.to_commit, 0.99)),
            raw,
            run.raw_before.rate(),
            run.raw_after.rate(),
            run.relay.rate() / raw,
            run.per_message,
            run.per_call,
            run.relay.cpu.bench,
        );
    }
    let _ = writeln!(
        out,
        "\n| stack | offered changes/s | changes | delivered /s | event→commit p50 | p99 | max | event→visible p99 |\n|---|---|---|---|---|---|---|---|"
    );
    for paced in &report.paced {
        let m = &paced.measured;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {} | **{}** | {} | {} |",
            short(paced.stack),
            paced.offered,
            m.changes,
            m.rate(),
            ms(percentile(&m.to_commit, 0.5)),
            ms(percentile(&m.to_commit, 0.99)),
            ms(percentile(&m.to_commit, 1.0)),
            ms(percentile(&m.to_visible, 0.99)),
        );
    }
    out
}

fn short(stack: Stack) -> &'static str {
    match stack {
        Stack::Embedded => "(a) embedded + SQLite",
        Stack::Kinesis => "(b) Kinesis + SQS + PostgreSQL",
        Stack::Postgres => "(c) embedded + PostgreSQL",
    }
}

fn write_report(
    report: &Report,
    load_before: &str,
    load_after: &str,
    took: Duration,
) -> anyhow::Result<()> {
    let mut section = String::new();
    writeln!(section, "## sync-relay\n")?;
    writeln!(section, "{}\n", bench::machine())?;
    writeln!(
        section,
        "Command: `scripts/bench.sh relay` (release build; catalog, relay and load generator in \
         one process, PostgreSQL {}, LocalStack and kinesalite on the same machine). Load \
         average before / after: {load_before} / {load_after}; the run took {:.0} s.\n",
        bench::postgres_version(),
        took.as_secs_f64()
    )?;
    writeln!(section, "{}", table(report))?;
    for note in &report.notes {
        writeln!(section, "{note}\n")?;
    }
    for stack in [Stack::Embedded, Stack::Kinesis, Stack::Postgres] {
        let changed = tuning(stack);
        if !changed.is_empty() {
            writeln!(
                section,
                "Settings changed from the defaults for {}:\n",
                short(stack)
            )?;
            for (key, change, why) in changed {
                writeln!(section, "- `{key}` {change}: {why}")?;
            }
            writeln!(section)?;
        }
    }
    bench::replace_section("sync-relay", &section)
}
