//! Benchmark of log-ingest (issue 11): the legacy corpus over the Fluent forward protocol, end
//! to end, next to what receiving and decoding the same chunks alone can do, in the same run.
//!
//! 1. The corpus (`gen_hybris_log.py --prefix-stack --trace-pct 2`, 2,000,000 lines; cached
//!    under `target/bench-data/`) is cut into four contiguous parts, one per host (a Fluent
//!    Bit per legacy server), each cut at a record's first line, and pre-encoded as Forward
//!    mode messages of 1,000 entries with a `chunk` option, as Fluent Bit sends them.
//! 2. **Baseline**: a listener in this process that only frames and decodes each message
//!    (the service's own decoder, `log_ingest::forward`, which checks each entry and copies
//!    its record without decoding it) and answers its ack at once: the limit of receiving
//!    the work, with nothing stored, parsed or shipped. For reference, a second listener
//!    also appends each message's batch to the service's durable buffer and acks once it
//!    is synced: the limit of receiving the work as the service must (nothing acknowledged
//!    before it is on disk), reported beside the target's baseline, not instead of it.
//! 3. **log-ingest**: the release binary as a child process (its memory its own), buffer on
//!    disk (every ack after `fdatasync`), `hybris-wrapper` parsing with multi-line grouping,
//!    masking, metrics derived from the records, pushes to the Loki-compatible receiver (in this process, counting, keeping
//!    nothing); `pipeline.flush_after = 250ms` (the default, 2 s, would add its wait for
//!    the last record of each stream to the clock), everything else on defaults. Lines/s
//!    from the first send until the receiver holds every line (each
//!    entry's newlines + 1), the peak RSS (`VmHWM`) of the log-ingest process, and the
//!    ratio to the baseline.
//!
//! Four connections, one per host, each sending its next message when the previous one is
//! acknowledged (Fluent Bit with `Require_ack_response true`). `workloads` sends the same
//! corpus in other shapes (one connection, sixteen, 100 and 10,000 entries per message,
//! PackedForward, CompressedPackedForward) and as OTLP exports, each next to its own
//! baseline; `hosts=`, `per_chunk=` and `mode=` run one forward shape alone.
//!
//! ```sh
//! scripts/bench.sh logs                                   # 2,000,000 lines; writes BENCHMARKS.md
//! cargo bench -p log-ingest --bench logs -- quick         # 200,000 lines, prints only
//! cargo bench -p log-ingest --bench logs -- lines=1000000 # another size, prints only
//! scripts/bench.sh logs workloads                         # other shapes; writes BENCHMARKS.md
//! cargo bench -p log-ingest --bench logs -- hosts=1 mode=compressed  # one shape, prints only
//! ```
//!
//! `MALL_BENCH_WRAPPER` runs log-ingest under a profiler (`heaptrack`, `perf record -g`); the
//! figures are then the profiler's, not the service's.
//!
//! The generator is `../shared/bench/gen_hybris_log.py` beside the repository, or the file
//! `MALL_HYBRIS_LOG_GENERATOR` names.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use log_ingest::{
    forward::{self, Frame},
    loki_receiver::LokiReceiver,
};
use mall_test_support::bench;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use rmpv::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const TAG: &str = "hybris.wrapper";
/// Log records per OTLP export: the OpenTelemetry SDKs' batch processor's default.
const OTLP_PER_EXPORT: usize = 512;

/// How the corpus is sent: connections (one per host), entries per message, and the mode.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Workload {
    hosts: usize,
    per_chunk: usize,
    mode: Mode,
}

/// The forward protocol's modes that carry many entries in one message.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `[tag, [entry, …], options]`: what Fluent Bit's `forward` output sends by default.
    Forward,
    /// `[tag, bin(entry entry …), options]`.
    Packed,
    /// PackedForward gzipped, `compressed: "gzip"`: Fluent Bit with `Compress gzip`.
    Compressed,
}

impl Mode {
    fn parse(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "forward" => Self::Forward,
            "packed" => Self::Packed,
            "compressed" => Self::Compressed,
            other => anyhow::bail!("mode={other}: forward, packed or compressed"),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Forward => "Forward",
            Self::Packed => "PackedForward",
            Self::Compressed => "CompressedPackedForward (gzip)",
        }
    }
}

impl Workload {
    /// The benchmark's workload: four hosts, 1,000 entries per message, Forward mode.
    const DEFAULT: Self = Self {
        hosts: 4,
        per_chunk: 1_000,
        mode: Mode::Forward,
    };

    fn describe(self) -> String {
        format!(
            "{} hosts, {} entries per message, {}",
            self.hosts,
            self.per_chunk,
            self.mode.name()
        )
    }
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let quick = args.iter().any(|a| a == "quick");
    let workloads = args.iter().any(|a| a == "workloads");
    let arg = |name: &str| args.iter().find_map(|a| a.strip_prefix(name));
    let lines = arg("lines=")
        .map(str::parse)
        .transpose()
        .context("lines=<count>")?;
    let mut workload = Workload::DEFAULT;
    if let Some(hosts) = arg("hosts=") {
        workload.hosts = hosts.parse().context("hosts=<count>")?;
    }
    if let Some(per_chunk) = arg("per_chunk=") {
        workload.per_chunk = per_chunk.parse().context("per_chunk=<count>")?;
    }
    if let Some(mode) = arg("mode=") {
        workload.mode = Mode::parse(mode)?;
    }
    anyhow::ensure!(
        workload.hosts > 0 && workload.per_chunk > 0,
        "hosts and per_chunk must be at least 1"
    );
    let custom = workload != Workload::DEFAULT;
    anyhow::ensure!(
        !(workloads && custom),
        "workloads runs its own shapes: hosts=, per_chunk= and mode= are for one run"
    );
    let full = lines.is_none() && !quick && !custom;
    let lines = lines.unwrap_or(if quick { 200_000 } else { 2_000_000 });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (name, report) = if workloads {
        (
            "log-ingest-workloads",
            runtime.block_on(run_workloads(lines))?,
        )
    } else {
        ("log-ingest", runtime.block_on(run(lines, workload))?)
    };
    println!("{report}");
    if full {
        let (title, command) = if workloads {
            (
                "### log-ingest: other workloads",
                "`scripts/bench.sh logs workloads` (`cargo bench -p log-ingest --bench logs -- \
                 workloads`)",
            )
        } else {
            (
                "## log-ingest",
                "`scripts/bench.sh logs` (`cargo bench -p log-ingest --bench logs`)",
            )
        };
        let section = format!(
            "{title}\n\n{}\nLoad average before: {}. Command: {command}; see the \
             benchmark's module docs. The client and \
             the Loki-compatible receiver run in the benchmark's process, log-ingest as its \
             release binary in a child process: all share the machine's two cores.\n\n{report}",
            bench::machine(),
            bench::load_average(),
        );
        bench::replace_section(name, &section)?;
    } else {
        eprintln!("(a partial or quick run: BENCHMARKS.md left as it is)");
    }
    Ok(())
}

/// The corpus of `lines` lines: its lines and its record count.
struct Corpus {
    text: String,
    entries: u64,
}

impl Corpus {
    fn load(lines: usize) -> anyhow::Result<Self> {
        let path = corpus(lines)?;
        let text = std::fs::read_to_string(&path)?;
        let stats: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(stats_path(&path))?)?;
        // A corpus left by other arguments or another generator is not this benchmark's.
        anyhow::ensure!(
            stats["seed"] == 42 && stats["prefix_stack"] == true,
            "{} was not generated with `--prefix-stack --seed 42`; delete it and its \
             .stats.json to generate it again",
            path.display()
        );
        let entries = stats["entries"].as_u64().context("entries in the stats")?;
        Ok(Self { text, entries })
    }

    fn lines(&self) -> Vec<&str> {
        self.text.lines().collect()
    }
}

/// The corpus as `workload` sends it: per host, its messages.
fn frames(all: &[&str], workload: Workload) -> Arc<Vec<Vec<Vec<u8>>>> {
    Arc::new(
        split(all, workload.hosts)
            .iter()
            .enumerate()
            .map(|(h, part)| messages(h, part, workload))
            .collect(),
    )
}

/// The decode-only baseline: three runs (each is short, so noisy), the median (seconds) and
/// all of them as text.
async fn baseline(frames: &Arc<Vec<Vec<Vec<u8>>>>) -> anyhow::Result<(f64, String)> {
    let baseline = decode_only().await?;
    let mut runs = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        send_all(baseline, frames).await?;
        runs.push(started.elapsed().as_secs_f64());
    }
    Ok(median(runs))
}

/// For reference (not the target's baseline): receive, decode and store durably before the
/// ack, as the service's input must; three runs (a fresh buffer each), the median (seconds)
/// and all of them as text.
async fn durable(frames: &Arc<Vec<Vec<Vec<u8>>>>) -> anyhow::Result<(f64, String)> {
    let mut runs = Vec::new();
    for _ in 0..3 {
        let dir = tempfile::tempdir()?;
        let durable = decode_and_store(dir.path()).await?;
        let started = Instant::now();
        send_all(durable, frames).await?;
        runs.push(started.elapsed().as_secs_f64());
    }
    Ok(median(runs))
}

/// One end-to-end run of log-ingest.
struct EndToEnd {
    /// Seconds from the first send until Loki holds every line.
    secs: f64,
    /// Seconds until the last ack.
    acked: f64,
    peak_kib: u64,
    service_cpu: f64,
    bench_cpu: f64,
    /// Records counted by the derived metrics.
    derived: f64,
    records: u64,
    lines_in_loki: u64,
}

/// What a run sends to log-ingest: forward messages (shared), or OTLP exports (sent by
/// value, so copied by the caller before the clock starts).
enum Input {
    Forward(Arc<Vec<Vec<Vec<u8>>>>),
    Otlp(Vec<Vec<ExportLogsServiceRequest>>),
}

/// Sends `input` to a fresh log-ingest (its own buffer) and waits until the Loki receiver
/// holds all `want` lines.
async fn end_to_end(input: Input, want: u64) -> anyhow::Result<EndToEnd> {
    let loki = LokiReceiver::start_counting("127.0.0.1:0".parse()?).await?;
    // The corpus is dated 2024: as a Loki with `reject_old_samples: false`.
    loki.accept_any_time();
    let dir = tempfile::tempdir()?;
    let child = LogIngest::start(dir.path(), &loki.url()).await?;
    let bench_cpu_before = cpu_seconds("self");
    let started = Instant::now();
    match input {
        Input::Forward(frames) => send_all(child.forward, &frames).await?,
        Input::Otlp(exports) => send_exports(child.grpc, exports).await?,
    }
    let acked = started.elapsed().as_secs_f64();
    loop {
        let (_, lines) = loki.accepted();
        if lines >= want {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "Loki has {lines} of {want} lines after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let peak_kib = bench::rss_kib(child.pid, "VmHWM");
    let service_cpu = cpu_seconds(&child.pid.to_string());
    let bench_cpu = cpu_seconds("self") - bench_cpu_before;
    let (records, lines_in_loki) = loki.accepted();
    // The derived metrics count a push's records once Loki's answer is back, which may be
    // after the receiver counted them: a few moments to catch up (the clock is stopped).
    let mut derived = 0.0;
    for _ in 0..200 {
        let (_, metrics) = mall_test_support::probe::http_get(child.admin, "/metrics").await;
        derived = metrics
            .lines()
            .filter(|l| l.starts_with("mall_log_ingest_log_records_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if derived >= records as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.stop().await;
    loki.stop();
    Ok(EndToEnd {
        secs,
        acked,
        peak_kib,
        service_cpu,
        bench_cpu,
        derived,
        records,
        lines_in_loki,
    })
}

async fn run(lines: usize, workload: Workload) -> anyhow::Result<String> {
    let corpus = Corpus::load(lines)?;
    let all = corpus.lines();
    let entries = corpus.entries;
    let frames = frames(&all, workload);
    let bytes: usize = frames.iter().flatten().map(Vec::len).sum();
    let mut report = String::new();
    writeln!(
        report,
        "Corpus: {} lines ({} records, {:.1} MB as forward messages), `--prefix-stack \
         --trace-pct 2 --seed 42`; {}, acks on.\n",
        all.len(),
        entries,
        bytes as f64 / 1e6,
        workload.describe(),
    )?;

    let (base_secs, base_note) = baseline(&frames).await?;
    let base_rate = all.len() as f64 / base_secs;

    let (durable_secs, durable_note) = durable(&frames).await?;
    let durable_rate = all.len() as f64 / durable_secs;

    let EndToEnd {
        secs,
        acked,
        peak_kib,
        service_cpu,
        bench_cpu,
        derived,
        records,
        lines_in_loki,
    } = end_to_end(Input::Forward(frames.clone()), all.len() as u64).await?;
    // Every record once (a copy too many would have stopped the clock early), every line,
    // and every record counted by the derived metrics.
    anyhow::ensure!(
        records == entries && lines_in_loki == all.len() as u64 && derived == entries as f64,
        "Loki received {records} records ({lines_in_loki} lines) of {entries} ({} lines); \
         the derived metrics counted {derived}",
        all.len()
    );
    let rate = all.len() as f64 / secs;
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let durable_ratio = rate / durable_rate;

    writeln!(
        report,
        "| run | lines/s | time | note |\n|---|---|---|---|\n\
         | baseline: receive + decode only (acks at once) | {base_rate:.0} | {base_secs:.2} s | the same messages, on as many connections; median of 3 runs ({base_note} s) |\n\
         | for reference: receive + decode + store durably, then ack (the service's buffer: append, `fdatasync`, appends arriving together share a sync) | {durable_rate:.0} | {durable_secs:.2} s | median of 3 runs ({durable_note} s); end to end is {durable_ratio:.2}× of it |\n\
         | log-ingest end to end (forward → buffer → parse, group, mask, derive metrics → Loki) | {rate:.0} | {secs:.2} s | all acknowledged after {acked:.2} s |\n"
    )?;
    writeln!(
        report,
        "- End to end ÷ baseline: **{:.2}×** (target ≥ 0.5×); lines/s: **{rate:.0}** (target ≥ \
         350,000). The baseline frames each message, runs the service's own decoder on it \
         (which checks every entry and copies its record, decoding no record: what the \
         service's input does) and answers at once; end to end adds, per message, an append \
         synced to disk, the SHA-256 that recognises a chunk sent again, and a re-read, and \
         per line the look-up of its fields, the parsing, grouping, masking, derived metrics, \
         protobuf and snappy encoding and an HTTP push.\n\
         - Peak RSS of the log-ingest process: **{:.1} MB** (target ≤ 100 MB).\n\
         - Loki received {records} records holding {lines_in_loki} lines (the generator wrote \
         {entries} records, {} lines).\n\
         - The derived metrics counted {derived} records (`mall_log_ingest_log_records_total`).\n\
         - CPU time during the run: log-ingest {service_cpu:.1} s ({:.2} cores), the \
         benchmark's client and Loki receiver {bench_cpu:.1} s ({:.2} cores), of {cores} cores \
         available.\n\
         - What 0.5× would take: every line in Loki within {half:.2} s, that is {budget:.2} \
         CPU-seconds on the {cores} cores available for everything; the client and the Loki receiver alone \
         (the benchmark's side, decoding every push) used {bench_cpu:.1} s of them in this run.",
        rate / base_rate,
        megabytes(peak_kib),
        all.len(),
        service_cpu / secs,
        bench_cpu / secs,
        half = base_secs * 2.0,
        budget = base_secs * 2.0 * cores as f64,
    )?;
    Ok(report)
}

/// The same corpus in other shapes, each next to its own decode-only baseline: one
/// connection, many, small and large messages, the packed and compressed modes, and OTLP.
async fn run_workloads(lines: usize) -> anyhow::Result<String> {
    let corpus = Corpus::load(lines)?;
    let all = corpus.lines();
    let d = Workload::DEFAULT;
    let workloads = [
        d,
        Workload { hosts: 1, ..d },
        Workload { hosts: 16, ..d },
        Workload {
            per_chunk: 100,
            ..d
        },
        Workload {
            per_chunk: 10_000,
            ..d
        },
        Workload {
            mode: Mode::Packed,
            ..d
        },
        Workload {
            mode: Mode::Compressed,
            ..d
        },
    ];
    let mut report = format!(
        "The corpus of the section above ({} lines, {} records) sent in other shapes. Each \
         row, in the same run: the decode-only baseline (median of 3 runs; all three in \
         seconds), the same with each message stored durably before its ack (median of 3: \
         what a sender waiting for each ack gets through when nothing else runs), and one \
         end-to-end run of a fresh log-ingest, with the CPU it used. Acks on throughout.\n\n\
         | hosts (connections) | per message | mode | baseline lines/s (runs) | durable store lines/s | log-ingest lines/s | ÷ baseline | all acked after | log-ingest CPU | peak RSS |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        all.len(),
        corpus.entries,
    );
    let want = all.len() as u64;
    let check = |name: &str, run: &EndToEnd| {
        anyhow::ensure!(
            run.records == corpus.entries && run.lines_in_loki == want,
            "{name}: Loki received {} records ({} lines) of {} ({want})",
            run.records,
            run.lines_in_loki,
            corpus.entries
        );
        Ok(())
    };
    for workload in workloads {
        let frames = frames(&all, workload);
        let (base_secs, base_runs) = baseline(&frames).await?;
        let base_rate = all.len() as f64 / base_secs;
        let (durable_secs, _) = durable(&frames).await?;
        let durable_rate = all.len() as f64 / durable_secs;
        let run = end_to_end(Input::Forward(frames.clone()), want).await?;
        check(&workload.describe(), &run)?;
        let rate = all.len() as f64 / run.secs;
        writeln!(
            report,
            "| {} | {} entries | {} | {base_rate:.0} ({base_runs} s) | {durable_rate:.0} | \
             {rate:.0} | {:.2}× | {:.2} s | {:.1} s ({:.2} cores) | {:.1} MB |",
            workload.hosts,
            workload.per_chunk,
            workload.mode.name(),
            rate / base_rate,
            run.acked,
            run.service_cpu,
            run.service_cpu / run.secs,
            megabytes(run.peak_kib),
        )?;
        eprintln!("{}: {rate:.0} lines/s", workload.describe());
    }

    // OTLP: the same records as log records' bodies, in exports of 512 (an SDK's batch
    // processor's default), four exporters (one per host), each sending its next export
    // when the previous one is answered.
    let exports = exports(&all, Workload::DEFAULT.hosts, OTLP_PER_EXPORT);
    let count: usize = exports.iter().map(Vec::len).sum();
    let (base_secs, base_runs) = otlp_baseline(&exports).await?;
    let base_rate = all.len() as f64 / base_secs;
    let run = end_to_end(Input::Otlp(exports.to_vec()), want).await?;
    check("OTLP", &run)?;
    let rate = all.len() as f64 / run.secs;
    writeln!(
        report,
        "| {} | {OTLP_PER_EXPORT} records (≈ {:.0} lines) | OTLP Export over gRPC | \
         {base_rate:.0} ({base_runs} s) | – | {rate:.0} | {:.2}× | {:.2} s | {:.1} s ({:.2} \
         cores) | {:.1} MB |",
        Workload::DEFAULT.hosts,
        all.len() as f64 / count as f64,
        rate / base_rate,
        run.acked,
        run.service_cpu,
        run.service_cpu / run.secs,
        megabytes(run.peak_kib),
    )?;
    eprintln!("OTLP: {rate:.0} lines/s");
    writeln!(
        report,
        "\nThe OTLP row's baseline is the benchmark's tonic client sending to a tonic server \
         that only decodes each request and answers, in one process: its figure includes the \
         client's encoding, so it is a lower bound of decoding alone."
    )?;
    Ok(report)
}

/// The corpus as OTLP exports, per host: requests of `per_request` log records (a record's
/// lines, its header and any trace, as the body; `service.name` `hybris.otlp`, which the
/// benchmark's configuration parses as the wrapper format, and the host as `host.name`).
fn exports(all: &[&str], hosts: usize, per_request: usize) -> Vec<Vec<ExportLogsServiceRequest>> {
    use opentelemetry_proto::tonic::{
        common::v1::{AnyValue, KeyValue, any_value},
        logs::v1::{LogRecord, ResourceLogs, ScopeLogs},
        resource::v1::Resource,
    };
    let text = |s: &str| AnyValue {
        value: Some(any_value::Value::StringValue(s.to_owned())),
    };
    split(all, hosts)
        .iter()
        .enumerate()
        .map(|(host, lines)| {
            let resource = Resource {
                attributes: vec![
                    KeyValue {
                        key: "service.name".into(),
                        value: Some(text("hybris.otlp")),
                        ..KeyValue::default()
                    },
                    KeyValue {
                        key: "host.name".into(),
                        value: Some(text(&format!("hybris-{host}"))),
                        ..KeyValue::default()
                    },
                ],
                ..Resource::default()
            };
            // An appender sends a record whole: a header line and the lines of its trace.
            let mut records: Vec<String> = Vec::new();
            for line in lines {
                match records.last_mut() {
                    Some(record) if !is_header(line) => {
                        record.push('\n');
                        record.push_str(line);
                    }
                    _ => records.push((*line).to_owned()),
                }
            }
            records
                .chunks(per_request)
                .map(|chunk| ExportLogsServiceRequest {
                    resource_logs: vec![ResourceLogs {
                        resource: Some(resource.clone()),
                        scope_logs: vec![ScopeLogs {
                            log_records: chunk
                                .iter()
                                .map(|record| LogRecord {
                                    time_unix_nano: 1_730_103_120_000_000_000,
                                    observed_time_unix_nano: 1_730_103_120_000_000_000,
                                    body: Some(text(record)),
                                    ..LogRecord::default()
                                })
                                .collect(),
                            ..ScopeLogs::default()
                        }],
                        ..ResourceLogs::default()
                    }],
                })
                .collect()
        })
        .collect()
}

/// Sends each host's exports on a connection of its own, each after the previous answer.
async fn send_exports(
    addr: SocketAddr,
    exports: Vec<Vec<ExportLogsServiceRequest>>,
) -> anyhow::Result<()> {
    use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
    let mut tasks = tokio::task::JoinSet::new();
    for host in exports {
        tasks.spawn(async move {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                .timeout(Duration::from_secs(60))
                .connect()
                .await?;
            let mut client = LogsServiceClient::new(channel).max_encoding_message_size(64 << 20);
            for request in host {
                let answer = client.export(request).await?.into_inner();
                let rejected = answer.partial_success.map_or(0, |p| p.rejected_log_records);
                anyhow::ensure!(rejected == 0, "{rejected} records rejected");
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// The OTLP baseline: a tonic server that decodes each export and answers at once; three
/// runs, the median (seconds) and all of them as text.
async fn otlp_baseline(exports: &[Vec<ExportLogsServiceRequest>]) -> anyhow::Result<(f64, String)> {
    use opentelemetry_proto::tonic::collector::logs::v1::{
        ExportLogsServiceResponse,
        logs_service_server::{LogsService, LogsServiceServer},
    };
    struct DecodeOnly;
    #[tonic::async_trait]
    impl LogsService for DecodeOnly {
        async fn export(
            &self,
            request: tonic::Request<ExportLogsServiceRequest>,
        ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
            std::hint::black_box(request.into_inner());
            Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(LogsServiceServer::new(DecodeOnly).max_decoding_message_size(64 << 20))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut runs = Vec::new();
    for _ in 0..3 {
        let copy = exports.to_vec();
        let started = Instant::now();
        send_exports(addr, copy).await?;
        runs.push(started.elapsed().as_secs_f64());
    }
    server.abort();
    Ok(median(runs))
}

/// Kibibytes (as `/proc` counts them) in megabytes (10^6 bytes, as the target says).
fn megabytes(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}

/// The median of `runs` (seconds), and all of them as text.
fn median(mut runs: Vec<f64>) -> (f64, String) {
    let all = runs
        .iter()
        .map(|s| format!("{s:.2}"))
        .collect::<Vec<_>>()
        .join(", ");
    runs.sort_by(f64::total_cmp);
    (runs[runs.len() / 2], all)
}

/// The corpus of `lines` lines, generated once.
fn corpus(lines: usize) -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = root.join("target/bench-data");
    std::fs::create_dir_all(&dir)?;
    // Named by the generator's arguments: a corpus of other arguments is not reused.
    let path = dir.join(format!(
        "hybris-wrapper-{lines}-prefix-stack-trace-pct-2-seed-42.log"
    ));
    if path.exists() && stats_path(&path).exists() {
        return Ok(path);
    }
    let generator = std::env::var_os("MALL_HYBRIS_LOG_GENERATOR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../shared/bench/gen_hybris_log.py"));
    anyhow::ensure!(
        generator.exists(),
        "the corpus generator is not at {}; set MALL_HYBRIS_LOG_GENERATOR to gen_hybris_log.py",
        generator.display()
    );
    eprintln!("generating {} …", path.display());
    let status = std::process::Command::new("python3")
        .arg(&generator)
        .args(["--lines", &lines.to_string(), "--prefix-stack"])
        .args(["--trace-pct", "2", "--seed", "42", "--out"])
        .arg(&path)
        .status()?;
    anyhow::ensure!(status.success(), "the generator failed: {status}");
    Ok(path)
}

fn stats_path(corpus: &Path) -> PathBuf {
    let mut name = corpus.as_os_str().to_owned();
    name.push(".stats.json");
    PathBuf::from(name)
}

/// Whether a wrapper line starts a record (its log4j part begins with a level).
fn is_header(line: &str) -> bool {
    line.splitn(5, " | ").nth(4).is_some_and(|text| {
        ["INFO ", "WARN ", "ERROR ", "DEBUG "]
            .iter()
            .any(|level| text.starts_with(level))
    })
}

/// The corpus in `hosts` contiguous parts, each starting at a record's first line.
fn split<'a>(all: &[&'a str], hosts: usize) -> Vec<Vec<&'a str>> {
    let mut parts = Vec::new();
    let mut from = 0;
    for h in 1..=hosts {
        let mut to = (all.len() * h / hosts).max(from);
        while to < all.len() && !is_header(all[to]) {
            to += 1;
        }
        parts.push(all[from..to].to_vec());
        from = to;
    }
    parts
}

/// One host's lines as messages of `workload.per_chunk` entries in its mode
/// (`[[EventTime, {}], record]` entries and a `chunk` option of 32 hex digits; the packed
/// modes add `size`, the entries' count, and gzip's `compressed`).
fn messages(host: usize, lines: &[&str], workload: Workload) -> Vec<Vec<u8>> {
    let host_name = format!("hybris-{host}");
    lines
        .chunks(workload.per_chunk)
        .enumerate()
        .map(|(n, chunk)| {
            let entries: Vec<Value> = chunk
                .iter()
                .map(|line| {
                    let mut time = Vec::with_capacity(8);
                    time.extend_from_slice(&1_730_103_120_u32.to_be_bytes());
                    time.extend_from_slice(&0_u32.to_be_bytes());
                    Value::Array(vec![
                        Value::Array(vec![Value::Ext(0, time), Value::Map(Vec::new())]),
                        Value::Map(vec![
                            (Value::from("log"), Value::from(*line)),
                            (Value::from("host"), Value::from(host_name.as_str())),
                        ]),
                    ])
                })
                .collect();
            let count = entries.len();
            let mut options = vec![(
                Value::from("chunk"),
                Value::from(format!("{host:08x}{n:024x}")),
            )];
            let entries = match workload.mode {
                Mode::Forward => Value::Array(entries),
                Mode::Packed | Mode::Compressed => {
                    let mut packed = Vec::new();
                    for entry in &entries {
                        rmpv::encode::write_value(&mut packed, entry).expect("encoding into a Vec");
                    }
                    options.push((Value::from("size"), Value::from(count)));
                    if workload.mode == Mode::Compressed {
                        use std::io::Write as _;
                        let mut gz = flate2::write::GzEncoder::new(
                            Vec::new(),
                            flate2::Compression::default(),
                        );
                        gz.write_all(&packed).expect("compressing into a Vec");
                        packed = gz.finish().expect("compressing into a Vec");
                        options.push((Value::from("compressed"), Value::from("gzip")));
                    }
                    Value::Binary(packed)
                }
            };
            let mut out = Vec::new();
            rmpv::encode::write_value(
                &mut out,
                &Value::Array(vec![Value::from(TAG), entries, Value::Map(options)]),
            )
            .expect("encoding into a Vec");
            out
        })
        .collect()
}

/// Sends each host's messages on its own connection, each after the previous one's ack.
/// The messages are shared, not copied (a copy would be timed with the sending).
async fn send_all(addr: SocketAddr, frames: &Arc<Vec<Vec<Vec<u8>>>>) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for h in 0..frames.len() {
        let frames = frames.clone();
        tasks.spawn(async move {
            let host = &frames[h];
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let mut ack = vec![0; 256];
            for frame in host {
                stream.write_all(frame).await?;
                let n = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut ack))
                    .await
                    .context("no ack within 60 s")??;
                anyhow::ensure!(n > 0, "the connection closed before an ack");
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// The baseline's listener: frames and decodes each message, acks at once.
async fn decode_only() -> anyhow::Result<SocketAddr> {
    reference_listener(None).await
}

/// The reference listener: frames and decodes each message, appends its batch to a buffer
/// in `dir` (the service's own, synced before it answers) and acks once it is durable.
async fn decode_and_store(dir: &Path) -> anyhow::Result<SocketAddr> {
    use log_ingest::buffer::{Buffer, Limits};
    let (buffer, _) = Buffer::open(
        dir,
        Limits {
            max_bytes: 4 << 30,
            segment_bytes: 64 << 20,
        },
    )?;
    reference_listener(Some(buffer)).await
}

/// A listener that frames and decodes each message, stores its batch in `buffer` when
/// given, and acks.
async fn reference_listener(
    buffer: Option<log_ingest::buffer::Buffer>,
) -> anyhow::Result<SocketAddr> {
    use log_ingest::batch::{Batch, Source};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let buffer = buffer.clone();
            tokio::spawn(async move {
                let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
                let mut read = vec![0; 256 * 1024];
                // Goes on where it stopped after each read, as the service's input does.
                let mut scan = forward::Scan::default();
                loop {
                    let Ok(n) = stream.read(&mut read).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&read[..n]);
                    while let Ok(Some(len)) = scan.resume(&buf, 64 << 20) {
                        scan = forward::Scan::default();
                        let frame: Vec<u8> = buf.drain(..len).collect();
                        let Ok(Frame::Message(message)) = forward::decode(&frame, 256 << 20) else {
                            continue;
                        };
                        std::hint::black_box(&message.events);
                        if let Some(buffer) = &buffer {
                            let batch = Batch {
                                source: Source::Forward,
                                tag: message.tag,
                                events: message.events,
                                received_ms: log_ingest::batch::now_ms(),
                            };
                            if buffer.append(batch.into_stored(None)).await.is_err() {
                                return;
                            }
                        }
                        if let Some(chunk) = message.chunk
                            && stream.write_all(&forward::ack(&chunk)).await.is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// The log-ingest binary, running.
struct LogIngest {
    child: tokio::process::Child,
    pid: u32,
    forward: SocketAddr,
    grpc: SocketAddr,
    admin: SocketAddr,
}

impl LogIngest {
    async fn start(dir: &Path, loki: &str) -> anyhow::Result<Self> {
        let forward = free_port()?;
        let grpc = free_port()?;
        let admin = free_port()?;
        let config = dir.join("log-ingest.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten_addr = \"{}\"\nadmin_addr = \"{}\"\n\
                 [telemetry]\nlog_filter = \"warn\"\n\
                 [forward]\nlisten_addr = \"{forward}\"\n\
                 [buffer]\ndir = \"{}\"\n\
                 [loki]\nurl = \"{loki}\"\n\
                 [pipeline]\nenvironment = \"bench\"\nflush_after = \"250ms\"\n\
                 [pipeline.parsers]\n\"hybris.*\" = \"hybris-wrapper\"\n",
                grpc,
                admin,
                dir.join("buffer").display(),
            ),
        )?;
        // A profiler around the binary, for investigations: `MALL_BENCH_WRAPPER="heaptrack"`.
        let wrapper = std::env::var("MALL_BENCH_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut command = match words.next() {
            Some(program) => {
                let mut command = tokio::process::Command::new(program);
                command.args(words).arg(env!("CARGO_BIN_EXE_log-ingest"));
                command
            }
            None => tokio::process::Command::new(env!("CARGO_BIN_EXE_log-ingest")),
        };
        let mut child = command
            .arg("--config")
            .arg(&config)
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().context("a pid")?;
        let started = Instant::now();
        while tokio::net::TcpStream::connect(forward).await.is_err() {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("log-ingest exited: {status}");
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "log-ingest did not listen"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            child,
            pid,
            forward,
            grpc,
            admin,
        })
    }

    /// SIGTERM (a profiler wrapping it writes its data), then SIGKILL after 10 s.
    async fn stop(mut self) {
        use nix::{sys::signal, unistd::Pid};
        if let Ok(pid) = i32::try_from(self.pid) {
            let _ = signal::kill(Pid::from_raw(pid), signal::Signal::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// User and system CPU seconds a process (`self` or a pid) has used, from `/proc`.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name in parentheses: utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: f64 = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse::<f64>().ok())
        .sum();
    // Linux reports these in USER_HZ, 100 per second on every architecture it runs here.
    ticks / 100.0
}
