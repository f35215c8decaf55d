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
//! acknowledged (Fluent Bit with `Require_ack_response true`).
//!
//! ```sh
//! scripts/bench.sh logs                                   # 2,000,000 lines; writes BENCHMARKS.md
//! cargo bench -p log-ingest --bench logs -- quick         # 200,000 lines, prints only
//! cargo bench -p log-ingest --bench logs -- lines=1000000 # another size, prints only
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
    time::{Duration, Instant},
};

use anyhow::Context as _;
use log_ingest::{
    forward::{self, Frame},
    loki_receiver::LokiReceiver,
};
use mall_test_support::bench;
use rmpv::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const HOSTS: usize = 4;
const PER_CHUNK: usize = 1_000;
const TAG: &str = "hybris.wrapper";

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let quick = args.iter().any(|a| a == "quick");
    let lines = args
        .iter()
        .find_map(|a| a.strip_prefix("lines="))
        .map(str::parse)
        .transpose()
        .context("lines=<count>")?;
    let full = lines.is_none() && !quick;
    let lines = lines.unwrap_or(if quick { 200_000 } else { 2_000_000 });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(run(lines))?;
    println!("{report}");
    if full {
        let section = format!(
            "## log-ingest\n\n{}\nLoad average before: {}. Command: `scripts/bench.sh logs` \
             (`cargo bench -p log-ingest --bench logs`; see its module docs). The client and \
             the Loki-compatible receiver run in the benchmark's process, log-ingest as its \
             release binary in a child process: all share the machine's two cores.\n\n{report}",
            bench::machine(),
            bench::load_average(),
        );
        bench::replace_section("log-ingest", &section)?;
    } else {
        eprintln!("(a partial or quick run: BENCHMARKS.md left as it is)");
    }
    Ok(())
}

async fn run(lines: usize) -> anyhow::Result<String> {
    let corpus = corpus(lines)?;
    let text = std::fs::read_to_string(&corpus)?;
    let all: Vec<&str> = text.lines().collect();
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(stats_path(&corpus))?)?;
    let entries = stats["entries"].as_u64().context("entries in the stats")?;
    let parts = split(&all);
    let frames: Vec<Vec<Vec<u8>>> = parts
        .iter()
        .enumerate()
        .map(|(h, part)| messages(h, part))
        .collect();
    let bytes: usize = frames.iter().flatten().map(Vec::len).sum();
    let mut report = String::new();
    writeln!(
        report,
        "Corpus: {} lines ({} records, {:.1} MB as forward messages), `--prefix-stack \
         --trace-pct 2 --seed 42`; {HOSTS} hosts, {PER_CHUNK} entries per message, acks on.\n",
        all.len(),
        entries,
        bytes as f64 / 1e6
    )?;

    // Baseline: receive and decode only; three times (it is short, so noisy), the median.
    let baseline = decode_only().await?;
    let mut base_runs = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        send_all(baseline, &frames).await?;
        base_runs.push(started.elapsed().as_secs_f64());
    }
    let (base_secs, base_note) = median(base_runs);
    let base_rate = all.len() as f64 / base_secs;

    // For reference (not the target's baseline): receive, decode and store durably before
    // the ack, as the service's input must; three runs, the median, a fresh buffer each.
    let mut durable_runs = Vec::new();
    for _ in 0..3 {
        let dir = tempfile::tempdir()?;
        let durable = decode_and_store(dir.path()).await?;
        let started = Instant::now();
        send_all(durable, &frames).await?;
        durable_runs.push(started.elapsed().as_secs_f64());
    }
    let (durable_secs, durable_note) = median(durable_runs);
    let durable_rate = all.len() as f64 / durable_secs;

    // log-ingest end to end.
    let loki = LokiReceiver::start_counting("127.0.0.1:0".parse()?).await?;
    // The corpus is dated 2024: as a Loki with `reject_old_samples: false`.
    loki.accept_any_time();
    let dir = tempfile::tempdir()?;
    let child = LogIngest::start(dir.path(), &loki.url()).await?;
    let bench_cpu_before = cpu_seconds("self");
    let started = Instant::now();
    send_all(child.forward, &frames).await?;
    let acked = started.elapsed().as_secs_f64();
    let want = all.len() as u64;
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
    let (_, metrics) = mall_test_support::probe::http_get(child.admin, "/metrics").await;
    let derived: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("mall_log_ingest_log_records_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let (records, lines_in_loki) = loki.accepted();
    child.stop().await;
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
        peak_kib as f64 / 1024.0,
        all.len(),
        service_cpu / secs,
        bench_cpu / secs,
        half = base_secs * 2.0,
        budget = base_secs * 2.0 * cores as f64,
    )?;
    Ok(report)
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
    let path = dir.join(format!("hybris-wrapper-{lines}.log"));
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

/// The corpus in `HOSTS` contiguous parts, each starting at a record's first line.
fn split<'a>(all: &[&'a str]) -> Vec<Vec<&'a str>> {
    let mut parts = Vec::new();
    let mut from = 0;
    for h in 1..=HOSTS {
        let mut to = (all.len() * h / HOSTS).max(from);
        while to < all.len() && !is_header(all[to]) {
            to += 1;
        }
        parts.push(all[from..to].to_vec());
        from = to;
    }
    parts
}

/// Forward mode messages of one host's lines, as Fluent Bit 5 sends them
/// (`[[EventTime, {}], record]` entries and a 32-hex-digit `chunk`).
fn messages(host: usize, lines: &[&str]) -> Vec<Vec<u8>> {
    let host_name = format!("hybris-{host}");
    lines
        .chunks(PER_CHUNK)
        .enumerate()
        .map(|(n, chunk)| {
            let entries = chunk
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
            let mut out = Vec::new();
            rmpv::encode::write_value(
                &mut out,
                &Value::Array(vec![
                    Value::from(TAG),
                    Value::Array(entries),
                    Value::Map(vec![(
                        Value::from("chunk"),
                        Value::from(format!("{host:08x}{n:024x}")),
                    )]),
                ]),
            )
            .expect("encoding into a Vec");
            out
        })
        .collect()
}

/// Sends each host's messages on its own connection, each after the previous one's ack.
async fn send_all(addr: SocketAddr, frames: &[Vec<Vec<u8>>]) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for host in frames.iter().cloned() {
        tasks.spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let mut ack = vec![0; 256];
            for frame in host {
                stream.write_all(&frame).await?;
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
                loop {
                    let Ok(n) = stream.read(&mut read).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&read[..n]);
                    while let Ok(Some(len)) = forward::frame_len(&buf, 64 << 20) {
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
                            if buffer.append(batch.encode()).await.is_err() {
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
    admin: SocketAddr,
}

impl LogIngest {
    async fn start(dir: &Path, loki: &str) -> anyhow::Result<Self> {
        let forward = free_port()?;
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
                free_port()?,
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
