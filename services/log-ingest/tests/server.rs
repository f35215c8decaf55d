//! The server every pod runs: health, reflection, metrics, configuration errors, SIGTERM,
//! a disk that refuses a write.

use std::time::Duration;

use log_ingest::App;
use mall_test_support::{probe, process, wait_until};
use tonic_health::pb::health_check_response::ServingStatus;

mod corpus;

const BINARY: &str = env!("CARGO_BIN_EXE_log-ingest");
const CONTRACT: &str = "mall.logs.v1.LogIngestService";
const CORPUS: &str = include_str!("fixtures/hybris-wrapper.log");

#[tokio::test]
async fn serves_health_reflection_and_metrics() {
    mall_test_support::init_logging();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let settings = corpus::local_settings(dir.path());
    let app = App::build(settings).await.expect("app builds");
    let (grpc, admin) = (app.grpc_addr(), app.admin_addr());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(app.run_until(shutdown.clone().cancelled_owned()));

    wait_until("health is SERVING", Duration::from_secs(10), || async {
        (probe::health(grpc, "").await == Some(ServingStatus::Serving)).then_some(())
    })
    .await;

    let services = probe::reflection_services(grpc).await;
    assert!(
        services.iter().any(|s| s == CONTRACT),
        "reflection lists {CONTRACT}: {services:?}"
    );
    assert!(
        services.iter().any(|s| s == "grpc.health.v1.Health"),
        "{services:?}"
    );
    // OTLP's logs service is served on the same port and described by reflection, with the
    // files it imports, so grpcurl can call it.
    let otlp = "opentelemetry.proto.collector.logs.v1.LogsService";
    assert!(services.iter().any(|s| s == otlp), "{services:?}");
    for symbol in [
        otlp,
        "opentelemetry.proto.logs.v1.LogRecord",
        "opentelemetry.proto.common.v1.AnyValue",
        "opentelemetry.proto.resource.v1.Resource",
    ] {
        assert_eq!(
            probe::reflection_files_for(grpc, symbol).await,
            1,
            "reflection describes {symbol}"
        );
    }

    let (status, body) = probe::http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("mall_log_ingest_grpc_requests_total{code=\"OK\",method=\"/grpc.health.v1.Health/Check\"}"),
        "health checks are counted by method and code:\n{body}"
    );
    assert_eq!(probe::http_get(admin, "/readyz").await.0, 200);

    shutdown.cancel();
    running
        .await
        .expect("task joins")
        .expect("server stops cleanly");
}

/// The binary on `buffer`, with a 30 s drain timeout, the forward listener on a port of its
/// choosing (logged in `forward: listening`) and `extra` settings.
fn start_binary(buffer: &str, extra: &[(&str, &str)]) -> process::ServiceProcess {
    let mut env = vec![
        ("LOG_INGEST__SERVER__DRAIN_TIMEOUT", "30s"),
        ("LOG_INGEST__FORWARD__LISTEN_ADDR", "127.0.0.1:0"),
        ("LOG_INGEST__BUFFER__DIR", buffer),
    ];
    env.extend_from_slice(extra);
    process::ServiceProcess::start(BINARY, "LOG_INGEST", &env)
}

#[tokio::test]
async fn sigterm_ends_the_process_with_exit_code_zero_within_the_drain_timeout() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let buffer = dir.path().display().to_string();
    let mut service = start_binary(&buffer, &[]);
    let listening = service.wait_until_serving(Duration::from_secs(30)).await;
    assert_eq!(
        probe::http_get(listening.admin_addr, "/healthz").await.0,
        200
    );

    service.terminate().await;
    // Nothing in flight: well before the drain timeout.
    let status = service.wait_for_exit(Duration::from_secs(10)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
}

/// SIGTERM while a push hangs on Loki (the connection taken, the request read, no answer):
/// the process gives the push its few seconds, exits with code zero well within the drain
/// timeout, and acknowledges nothing of its buffer it did not push, so the next start on
/// the same buffer pushes every record.
#[tokio::test]
async fn sigterm_with_a_push_hanging_on_loki_exits_cleanly_and_loses_nothing() {
    use tokio::io::AsyncReadExt as _;
    mall_test_support::init_logging();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let buffer = dir.path().display().to_string();
    let hanging = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let hanging_url = format!("http://{}", hanging.local_addr().expect("an address"));
    let (asked, mut was_asked) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = hanging.accept().await {
            let reached = asked.clone();
            tokio::spawn(async move {
                let mut sink = vec![0; 64 * 1024];
                while let Ok(n) = socket.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                    reached.send_replace(true);
                }
            });
        }
    });
    let mut service = start_binary(
        &buffer,
        &[
            ("LOG_INGEST__LOKI__URL", &hanging_url),
            ("LOG_INGEST__PIPELINE__BATCH_WAIT", "100ms"),
            ("LOG_INGEST__PIPELINE__FLUSH_AFTER", "300ms"),
        ],
    );
    // The forward port the process bound, from the line it logs before `serving`.
    let listening = service
        .wait_for_message("forward: listening", Duration::from_secs(30))
        .await;
    let forward_port = process::address(&listening, "forward_addr");
    service.wait_until_serving(Duration::from_secs(30)).await;
    service.drain_output("log-ingest");
    let lines: Vec<&str> = CORPUS.lines().take(200).collect();
    corpus::send_as(forward_port, "hybris-1", &lines, 50).await;
    tokio::time::timeout(Duration::from_secs(10), was_asked.wait_for(|asked| *asked))
        .await
        .expect("a push reached Loki in time")
        .expect("the Loki task runs");

    let asked_to_stop = std::time::Instant::now();
    service.terminate().await;
    let status = service.wait_for_exit(Duration::from_secs(25)).await;
    let took = asked_to_stop.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
    // The push gets a few seconds (not the 30 s drain timeout), then the process ends.
    assert!(
        took < Duration::from_secs(15),
        "exited {took:?} after SIGTERM"
    );

    // Started again on the same buffer, with a Loki that answers: every record arrives.
    let loki =
        log_ingest::loki_receiver::LokiReceiver::start("127.0.0.1:0".parse().expect("an address"))
            .await
            .expect("starts");
    loki.accept_any_time();
    let settings = corpus::restart_settings(dir.path(), loki.url(), Duration::from_millis(300));
    let app = corpus::start_app(settings).await;
    every_record_once(&loki, app, &lines).await;
}

/// Waits until `loki` has every record of `lines`, stops `app` (first: a copy pushed later
/// would be compared too), and checks that each arrived once, whole, as sent (Loki drops
/// an entry identical to one it has: none may have been pushed twice).
async fn every_record_once(
    loki: &log_ingest::loki_receiver::LokiReceiver,
    app: corpus::Started,
    lines: &[&str],
) {
    let mut want = corpus::model(lines);
    wait_until("every record in Loki", Duration::from_secs(30), || async {
        (loki.accepted().0 >= want.len() as u64).then_some(())
    })
    .await;
    app.stop().await;
    assert_eq!(loki.counts().2, 0, "entries pushed twice");
    let mut got = corpus::levels_and_lines(&loki.received());
    got.sort();
    want.sort();
    assert_eq!(got, want, "every record once, whole, as sent");
}

/// A disk that refuses a write halfway through it (here a file-size limit: `ulimit -f`,
/// with SIGXFSZ ignored, so a write past it is cut short and the next fails with EFBIG):
/// the chunk in that write is not acknowledged, what reached the segment of it is cut, so
/// the segment ends with the last acknowledged chunk's frame, and the process exits (it
/// would refuse every append from then on). Started again without the limit, it takes the
/// unacknowledged chunk sent again: every record reaches Loki once.
#[tokio::test]
async fn a_write_the_disk_refuses_is_not_acknowledged_and_is_cut_from_the_buffer() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    mall_test_support::init_logging();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let buffer = dir.path().display().to_string();
    // Nothing is pushed before the restart (port 1: nobody listens there): the buffer keeps
    // every segment, and no entry can reach Loki twice.
    let nowhere = "http://127.0.0.1:1";
    // 64 blocks of 512 bytes (POSIX shells, bash as `sh` too): 32 KiB, where the fixture
    // stored takes about 160 KB, a chunk about 9 KB. (On Linux a write past the limit is
    // cut short, then the next fails; elsewhere it may fail whole, leaving nothing to cut.)
    let mut service = process::ServiceProcess::start_in_shell(
        "trap '' XFSZ; ulimit -f 64; exec \"$0\"",
        BINARY,
        "LOG_INGEST",
        &[
            ("LOG_INGEST__SERVER__DRAIN_TIMEOUT", "10s"),
            ("LOG_INGEST__FORWARD__LISTEN_ADDR", "127.0.0.1:0"),
            ("LOG_INGEST__BUFFER__DIR", &buffer),
            ("LOG_INGEST__LOKI__URL", nowhere),
        ],
    );
    let listening = service
        .wait_for_message("forward: listening", Duration::from_secs(30))
        .await;
    let forward = process::address(&listening, "forward_addr");
    service.wait_until_serving(Duration::from_secs(30)).await;

    let lines: Vec<&str> = CORPUS.lines().collect();
    let chunks: Vec<&[&str]> = lines.chunks(50).collect();
    let mut stream = tokio::net::TcpStream::connect(forward)
        .await
        .expect("connects");
    let mut acked = 0;
    for (n, chunk) in chunks.iter().enumerate() {
        let id = format!("{n:032x}");
        stream
            .write_all(&corpus::frame(&id, chunk))
            .await
            .expect("writes");
        let mut answer = vec![0; 128];
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
            .await
            .expect("an answer or a closed connection in time");
        match read {
            Ok(n) if n > 0 => {
                let ack = rmpv::decode::read_value(&mut &answer[..n]).expect("msgpack");
                assert_eq!(
                    ack,
                    rmpv::Value::Map(vec![("ack".into(), id.as_str().into())])
                );
                acked += 1;
            }
            // Closed (or reset): not acknowledged.
            _ => break,
        }
    }
    assert!(
        (1..chunks.len()).contains(&acked),
        "the limit is met after some chunks and before the last: {acked} of {} acknowledged",
        chunks.len()
    );
    service
        .wait_for_message(
            "the log buffer cannot write to its disk; every append is refused until a restart",
            Duration::from_secs(10),
        )
        .await;
    let status = service.wait_for_exit(Duration::from_secs(30)).await;
    assert!(!status.success(), "exits with an error: {status}");

    // The segment holds the acknowledged chunks' frames (`[length u32][crc32 u32][bytes]`),
    // whole, and nothing after them: the failed write's part was cut.
    let segment = std::fs::read_dir(dir.path())
        .expect("lists the buffer")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|e| e == "seg"))
        .max()
        .expect("a segment");
    let bytes = std::fs::read(&segment).expect("reads the segment");
    let (mut at, mut frames) = (0, 0);
    while at < bytes.len() {
        let header = |from: usize| -> u32 {
            bytes
                .get(at + from..at + from + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
                .unwrap_or_else(|| panic!("a frame's header at {at} of {}", bytes.len()))
        };
        let (length, crc) = (header(0) as usize, header(4));
        let batch = bytes
            .get(at + 8..at + 8 + length)
            .unwrap_or_else(|| panic!("a frame of {length} bytes at {at} of {}", bytes.len()));
        assert_eq!(crc32fast::hash(batch), crc, "the frame at {at} is intact");
        at += 8 + length;
        frames += 1;
    }
    assert_eq!(
        (at, frames),
        (bytes.len(), acked),
        "whole frames, one per acknowledged chunk, and nothing after them ({} bytes)",
        bytes.len()
    );

    // Started again without the limit, on the same buffer, with a Loki that answers: the
    // sender sends the chunk it has no ack for, and the rest.
    let loki =
        log_ingest::loki_receiver::LokiReceiver::start("127.0.0.1:0".parse().expect("an address"))
            .await
            .expect("starts");
    loki.accept_any_time();
    let mut settings = corpus::restart_settings(dir.path(), loki.url(), Duration::from_millis(300));
    // The record the failed chunk continues, rebuilt from the buffer, waits for its stream
    // to resume: long enough for a slow start and the chunk's store.
    settings.pipeline.restart_grace = Duration::from_secs(10);
    let app = corpus::start_app(settings).await;
    let mut stream = tokio::net::TcpStream::connect(app.forward)
        .await
        .expect("connects");
    for (n, chunk) in chunks.iter().enumerate().skip(acked) {
        let id = format!("{n:032x}");
        corpus::send_acked(&mut stream, &corpus::frame(&id, chunk), &id).await;
    }
    every_record_once(&loki, app, &lines).await;
}

/// `loki-receiver`, the local Loki `scripts/dev.sh` starts: it says where it listens, takes
/// a push as Loki does and counts it in its report.
#[tokio::test]
async fn the_local_loki_receiver_takes_a_push_and_reports_it() {
    use log_ingest::loki::{Entry, LokiClient, PushRequest, Pushed, Stream, encode};
    use tokio::io::AsyncBufReadExt as _;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_loki-receiver"))
        .args(["--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starts");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut next_line = async || {
        tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("a line in time")
            .expect("reads")
            .expect("a line")
    };
    let first = next_line().await;
    let url = first
        .strip_prefix("Loki receiver on ")
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("says where it listens: {first}"))
        .to_owned();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970");
    let body = encode(&PushRequest {
        streams: vec![Stream {
            labels: r#"{service="shop", level="INFO"}"#.to_owned(),
            entries: vec![Entry {
                timestamp: Some(prost_types::Timestamp {
                    seconds: i64::try_from(now.as_secs()).expect("fits"),
                    nanos: 0,
                }),
                line: "cart 8812 recalculated\n\tat a.B.c(B.java:1)".to_owned(),
                structured_metadata: Vec::new(),
            }],
            hash: 0,
        }],
    });
    let client = LokiClient::new(
        &url,
        None,
        Duration::from_secs(5),
        (Duration::from_millis(50), Duration::from_millis(500)),
        None,
    )
    .expect("a client");
    let stop = tokio_util::sync::CancellationToken::new();
    let pushed = tokio::time::timeout(
        Duration::from_secs(10),
        client.push(body, true, &stop, |_| {}),
    )
    .await
    .expect("answered in time");
    assert_eq!(pushed, Some(Pushed::Accepted));
    loop {
        let report = next_line().await;
        if report == "pushes 1 (refused 0); entries 1, lines 2" {
            break;
        }
        assert!(report.starts_with("pushes 0 "), "{report}");
    }
}

#[tokio::test]
async fn an_invalid_setting_fails_start_up_naming_the_key() {
    let (status, stderr) = process::run_to_exit(
        BINARY,
        &[("LOG_INGEST__SERVER__LISTEN_ADDR", "not-an-address")],
        Duration::from_secs(30),
    )
    .await;
    assert!(!status.success(), "start-up must fail");
    assert!(
        stderr.contains("LOG_INGEST__SERVER__LISTEN_ADDR"),
        "the error names the key: {stderr}"
    );
}

#[tokio::test]
async fn an_unknown_setting_fails_start_up_naming_the_key() {
    let (status, stderr) = process::run_to_exit(
        BINARY,
        &[("LOG_INGEST__SERVER__LISTEN_PORT", "1")],
        Duration::from_secs(30),
    )
    .await;
    assert!(!status.success(), "start-up must fail");
    assert!(
        stderr.contains("listen_port"),
        "the error names the key: {stderr}"
    );
}

/// Settings that cannot work are refused at start-up, naming the keys at fault.
#[tokio::test]
async fn impossible_limits_fail_start_up_naming_the_settings() {
    type Change = fn(&mut log_ingest::Settings);
    let cases: [(&str, Change, &[&str]); 13] = [
        (
            "a tenant Loki refuses",
            |s| s.loki.tenant = Some("shop|ops".to_owned()),
            &["loki.tenant"],
        ),
        (
            "a Loki URL without a scheme",
            |s| s.loki.url = "loki-gateway.observability:3100".to_owned(),
            &["loki.url"],
        ),
        (
            "no wait between Loki retries",
            |s| s.loki.retry_initial = Duration::ZERO,
            &["loki.retry_initial"],
        ),
        (
            "a first Loki retry longer than the longest",
            |s| s.loki.retry_initial = s.loki.retry_max + Duration::from_secs(1),
            &["loki.retry_initial", "loki.retry_max"],
        ),
        (
            "no Loki request time",
            |s| s.loki.request_timeout = Duration::ZERO,
            &["loki.request_timeout"],
        ),
        (
            "no forward connections",
            |s| s.forward.max_connections = 0,
            &["forward.max_connections"],
        ),
        (
            "no quiet time",
            |s| s.pipeline.flush_after = Duration::ZERO,
            &["pipeline.flush_after"],
        ),
        (
            "a push past Loki's burst",
            |s| s.pipeline.batch_bytes = 8 << 20,
            &["pipeline.batch_bytes"],
        ),
        (
            "no open streams",
            |s| s.pipeline.max_open_streams = 0,
            &["pipeline.max_open_streams"],
        ),
        (
            "a forward budget smaller than one message",
            |s| s.forward.max_bytes_in_flight = s.forward.max_message_bytes - 1,
            &["forward.max_bytes_in_flight"],
        ),
        (
            "a segment smaller than one call",
            |s| {
                s.forward.max_message_bytes = 64 * 1024;
                s.buffer.segment_bytes = s.server.max_message_bytes as u64;
            },
            &["buffer.segment_bytes", "server.max_message_bytes"],
        ),
        (
            "records in progress held to less than one record",
            |s| s.pipeline.max_pending_bytes = s.parsing.max_record_bytes - 1,
            &["pipeline.max_pending_bytes", "parsing.max_record_bytes"],
        ),
        (
            "an OTLP budget smaller than one call",
            |s| s.otlp.max_bytes_in_flight = s.server.max_message_bytes - 1,
            &["otlp.max_bytes_in_flight"],
        ),
    ];
    for (case, change, keys) in cases {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut settings = corpus::local_settings(dir.path());
        change(&mut settings);
        let error = App::build(settings).await.expect_err(case).to_string();
        for key in keys {
            assert!(error.contains(key), "{case}: {error}");
        }
    }
}
