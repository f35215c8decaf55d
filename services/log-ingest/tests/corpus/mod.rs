//! The legacy corpus as the tests understand it, independently of the service's parsers:
//! the generator's header lines, the records they start, the masking of its addresses (and
//! of mobile numbers, which the chaos test adds), and forward frames as Fluent Bit sends
//! them; log-ingest started in the test's process, and its GetPipelineStats.

#![allow(dead_code)] // each test binary uses part of it

use rmpv::Value;

/// Settings of an in-process log-ingest for a test: every listener on a free loopback port,
/// the buffer in `dir`.
pub fn local_settings(dir: &std::path::Path) -> log_ingest::Settings {
    let mut settings = log_ingest::Settings::default();
    let any = || "127.0.0.1:0".parse().expect("an address");
    settings.server.listen_addr = any();
    settings.server.admin_addr = any();
    settings.forward.listen_addr = any();
    settings.buffer.dir = dir.to_owned();
    settings
}

/// An in-process log-ingest with its own Loki receiver.
pub struct Running {
    /// The forward listener.
    pub forward: std::net::SocketAddr,
    /// The gRPC port.
    pub grpc: std::net::SocketAddr,
    /// The admin port (`/metrics`).
    pub admin: std::net::SocketAddr,
    /// Where its records go.
    pub loki: log_ingest::loki_receiver::LokiReceiver,
    /// Cancelled: the app shuts down.
    pub shutdown: tokio_util::sync::CancellationToken,
    _dir: tempfile::TempDir,
}

/// [`local_settings`] pushing to `loki_url`, with short retries and waits, environment
/// `test`, `hybris.*` parsed as `hybris-wrapper`.
pub fn corpus_settings(dir: &std::path::Path, loki_url: String) -> log_ingest::Settings {
    use std::time::Duration;
    let mut settings = local_settings(dir);
    settings.loki.url = loki_url;
    settings.loki.retry_initial = Duration::from_millis(50);
    settings.loki.retry_max = Duration::from_millis(500);
    settings
        .pipeline
        .parsers
        .insert("hybris.*".to_owned(), "hybris-wrapper".to_owned());
    settings.pipeline.flush_after = Duration::from_millis(300);
    settings.pipeline.batch_wait = Duration::from_millis(100);
    settings.pipeline.environment = "test".to_owned();
    settings
}

/// [`corpus_settings`] for a test that restarts log-ingest on the buffer in `dir`: quiet
/// completes a record after `flush_after`, and a record rebuilt after the restart waits
/// for its stream a second at most (`restart_grace`).
pub fn restart_settings(
    dir: &std::path::Path,
    loki_url: String,
    flush_after: std::time::Duration,
) -> log_ingest::Settings {
    let mut settings = corpus_settings(dir, loki_url);
    settings.pipeline.flush_after = flush_after;
    settings.pipeline.restart_grace = std::time::Duration::from_secs(1);
    settings
}

/// A directory for a buffer and a Loki receiver (logging set up): what a test restarting
/// log-ingest on the same buffer keeps across the restart.
pub async fn dir_and_loki() -> (tempfile::TempDir, log_ingest::loki_receiver::LokiReceiver) {
    mall_test_support::init_logging();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let loki =
        log_ingest::loki_receiver::LokiReceiver::start("127.0.0.1:0".parse().expect("an address"))
            .await
            .expect("starts");
    // The corpora are dated 2024: as a Loki with `reject_old_samples: false`.
    loki.accept_any_time();
    (dir, loki)
}

/// Starts log-ingest in this process with [`corpus_settings`] and a Loki receiver of its
/// own, then `change`.
pub async fn start_with(change: impl FnOnce(&mut log_ingest::Settings)) -> Running {
    let (dir, loki) = dir_and_loki().await;
    let mut settings = corpus_settings(dir.path(), loki.url());
    change(&mut settings);
    let app = log_ingest::App::build(settings).await.expect("builds");
    let (forward, grpc, admin) = (app.forward_addr(), app.grpc_addr(), app.admin_addr());
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(app.run_until(shutdown.clone().cancelled_owned()));
    Running {
        forward,
        grpc,
        admin,
        loki,
        shutdown,
        _dir: dir,
    }
}

/// Whether the text after the wrapper's prefix is one of the generator's header lines.
pub fn is_header(text: &str) -> bool {
    ["INFO  [", "WARN  [", "DEBUG [", "ERROR ["]
        .iter()
        .any(|h| text.starts_with(h))
}

/// A record as Loki must hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// The `level` label.
    pub level: String,
    /// The header's message then each joined line, addresses and mobile numbers masked.
    pub line: String,
    /// The header's wrapper time, read in Asia/Seoul (UTC+9, no daylight saving since
    /// 1988), in milliseconds since the epoch.
    pub time_ms: i64,
    /// The log4j logger (`[DefaultCartService]`).
    pub logger: String,
    /// The log4j thread (`[hybrisHTTP12]`), not the wrapper's column.
    pub thread: String,
}

/// What Loki must hold for `lines`, record by record.
pub fn expected<S: AsRef<str>>(lines: &[S]) -> Vec<Expected> {
    let mut records: Vec<Expected> = Vec::new();
    for line in lines {
        let columns: Vec<&str> = line.as_ref().splitn(5, " | ").collect();
        let text = *columns.get(4).expect("a wrapper prefix");
        if is_header(text) {
            // `LEVEL [thread] [Logger] message`
            let thread_end = text.find("] [").expect("a logger");
            let after_thread = &text[thread_end + 3..];
            let logger_end = after_thread.find("] ").expect("a message");
            let time =
                chrono::NaiveDateTime::parse_from_str(columns[3].trim(), "%Y/%m/%d %H:%M:%S%.3f")
                    .expect("the wrapper's time");
            records.push(Expected {
                level: text[..5].trim().to_owned(),
                line: mask(&after_thread[logger_end + 2..]),
                time_ms: time.and_utc().timestamp_millis() - 9 * 3_600_000,
                logger: after_thread[..logger_end].to_owned(),
                thread: text[text.find('[').expect("a thread") + 1..thread_end].to_owned(),
            });
        } else {
            let last = records.last_mut().expect("a header first");
            last.line.push('\n');
            last.line.push_str(&mask(text));
        }
    }
    records
}

/// What Loki must hold for `lines`: (level, line) per record, the line being the header's
/// message then each joined line, addresses and mobile numbers masked.
pub fn model<S: AsRef<str>>(lines: &[S]) -> Vec<(String, String)> {
    expected(lines)
        .into_iter()
        .map(|record| (record.level, record.line))
        .collect()
}

/// (level, line) of each entry received, as [`model`] has them.
pub fn levels_and_lines(received: &[log_ingest::loki_receiver::Received]) -> Vec<(String, String)> {
    received
        .iter()
        .map(|r| {
            let level = r
                .labels
                .iter()
                .find(|(k, _)| k == "level")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            (level, r.entry.line.clone())
        })
        .collect()
}

/// `text` with the corpus's addresses (`customerN@example.com`) and mobile numbers
/// (`010-1234-5678`, `+82-10-1234-5678`, each a word of its own) as the default masking
/// leaves them.
pub fn mask(text: &str) -> String {
    let phone = |word: &str| {
        let digits = word
            .strip_prefix("+82-10-")
            .or_else(|| word.strip_prefix("010-"));
        digits.is_some_and(|d| {
            d.len() == 9
                && d.char_indices()
                    .all(|(i, c)| if i == 4 { c == '-' } else { c.is_ascii_digit() })
        })
    };
    text.split(' ')
        .map(|word| match word.find("@example.com") {
            None if phone(word) => "<phone>".to_owned(),
            Some(at) => {
                let start = word[..at]
                    .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '.'))
                    .map_or(0, |i| i + 1);
                format!(
                    "{}<email>{}",
                    &word[..start],
                    &word[at + "@example.com".len()..]
                )
            }
            None => word.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A Forward-mode message of `lines` (tag `hybris.wrapper`, host `hybris-1`) with `chunk`.
pub fn frame<S: AsRef<str>>(chunk: &str, lines: &[S]) -> Vec<u8> {
    frame_of("hybris-1", chunk, lines)
}

/// A Forward-mode message of `lines` from `host` (tag `hybris.wrapper`) with `chunk`.
pub fn frame_of<S: AsRef<str>>(host: &str, chunk: &str, lines: &[S]) -> Vec<u8> {
    frame_from(Some(host), chunk, lines)
}

/// [`frame_of`], its events with a `host` field only when `host` is given.
pub fn frame_from<S: AsRef<str>>(host: Option<&str>, chunk: &str, lines: &[S]) -> Vec<u8> {
    let entries = lines
        .iter()
        .map(|line| {
            let mut record = vec![(Value::from("log"), Value::from(line.as_ref()))];
            if let Some(host) = host {
                record.push((Value::from("host"), Value::from(host)));
            }
            Value::Array(vec![Value::from(1_730_103_120_u32), Value::Map(record)])
        })
        .collect();
    let mut out = Vec::new();
    rmpv::encode::write_value(
        &mut out,
        &Value::Array(vec![
            Value::from("hybris.wrapper"),
            Value::Array(entries),
            Value::Map(vec![(Value::from("chunk"), Value::from(chunk))]),
        ]),
    )
    .expect("encodes");
    out
}

/// An in-process log-ingest started by [`start_app`].
pub struct Started {
    /// The forward listener.
    pub forward: std::net::SocketAddr,
    /// The gRPC port (OTLP, the contract).
    pub grpc: std::net::SocketAddr,
    /// The admin port (`/metrics`).
    pub admin: std::net::SocketAddr,
    /// Cancelled: it shuts down.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Ends once it has shut down.
    pub running: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Started {
    /// Shuts it down as SIGTERM does, and waits until it has.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.running
            .await
            .expect("joins")
            .expect("shuts down cleanly");
    }
}

/// Starts log-ingest in this process with `settings` (a restart: the same settings' buffer
/// directory again).
pub async fn start_app(settings: log_ingest::Settings) -> Started {
    let app = log_ingest::App::build(settings).await.expect("builds");
    let (forward, grpc, admin) = (app.forward_addr(), app.grpc_addr(), app.admin_addr());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(app.run_until(shutdown.clone().cancelled_owned()));
    Started {
        forward,
        grpc,
        admin,
        shutdown,
        running,
    }
}

/// Sends `lines` from `host` in Forward mode chunks of `per_chunk` entries, each
/// acknowledged, on one connection.
pub async fn send_as(addr: std::net::SocketAddr, host: &str, lines: &[&str], per_chunk: usize) {
    send_chunks(addr, host, lines.chunks(per_chunk)).await;
}

/// Sends `chunks` of events (each event's `log` one line, or several joined by line
/// breaks) from `host` in Forward mode, each acknowledged, on one connection.
pub async fn send_chunks<C, S>(
    addr: std::net::SocketAddr,
    host: &str,
    chunks: impl IntoIterator<Item = C>,
) where
    C: AsRef<[S]>,
    S: AsRef<str>,
{
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    for (n, chunk) in chunks.into_iter().enumerate() {
        let id = format!("{n:032x}");
        send_acked(&mut stream, &frame_of(host, &id, chunk.as_ref()), &id).await;
    }
}

/// Writes `frame` on `stream` and waits for its ack of `chunk`.
pub async fn send_acked(stream: &mut tokio::net::TcpStream, frame: &[u8], chunk: &str) {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    stream.write_all(frame).await.expect("writes");
    let mut ack = vec![0; 128];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut ack))
        .await
        .expect("an ack in time")
        .expect("reads");
    let ack = rmpv::decode::read_value(&mut &ack[..n]).expect("msgpack");
    assert_eq!(
        ack,
        Value::Map(vec![(Value::from("ack"), Value::from(chunk))])
    );
}

/// Waits until Loki has accepted `records` (`loki_records_pushed_total` on `/metrics`).
pub async fn wait_pushed(admin: std::net::SocketAddr, records: usize) {
    mall_test_support::wait_until(
        "the records pushed",
        std::time::Duration::from_secs(30),
        || async {
            mall_test_support::probe::http_get(admin, "/metrics")
                .await
                .1
                .lines()
                .find_map(|l| l.strip_prefix("mall_log_ingest_loki_records_pushed_total "))
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|&n| n >= records as f64)
        },
    )
    .await;
}

/// GetPipelineStats of the log-ingest serving gRPC on `grpc`.
pub async fn stats(grpc: std::net::SocketAddr) -> mall_proto::logs::v1::GetPipelineStatsResponse {
    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
        .expect("a uri")
        .connect()
        .await
        .expect("connects");
    mall_proto::logs::v1::log_ingest_service_client::LogIngestServiceClient::new(channel)
        .get_pipeline_stats(mall_proto::logs::v1::GetPipelineStatsRequest {})
        .await
        .expect("stats")
        .into_inner()
}

/// The statistics of the input `name` (`forward`, `otlp`) in `stats`.
pub fn source<'a>(
    stats: &'a mall_proto::logs::v1::GetPipelineStatsResponse,
    name: &str,
) -> &'a mall_proto::logs::v1::SourceStats {
    stats
        .sources
        .iter()
        .find(|s| s.source == name)
        .unwrap_or_else(|| panic!("{name} in {stats:?}"))
}
