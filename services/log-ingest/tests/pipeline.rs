//! End to end: the legacy corpus over the forward protocol (as Fluent Bit sends it, in
//! chunks that cut stack traces apart, acks required) → log-ingest → the Loki-compatible
//! receiver; every entry compared with a model of the corpus built here (records split at
//! the generator's header lines, e-mail addresses masked), through a Loki outage.

use std::time::Duration;

use corpus::{Running, levels_and_lines, model, source, start_with, stats};
use log_ingest::loki_receiver::LokiReceiver;
use rmpv::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

mod corpus;

const CORPUS: &str = include_str!("fixtures/hybris-wrapper.log");

async fn start() -> Running {
    start_with(|_| {}).await
}

/// log-ingest with the legacy tags (`hybris.*`) parsed as Tomcat access logs.
async fn start_parsing_access_logs() -> Running {
    start_with(|settings| {
        settings
            .pipeline
            .parsers
            .insert("hybris.*".to_owned(), "access-log".to_owned());
    })
    .await
}

/// Sends `lines` in Forward mode chunks of `per_chunk` entries, each acknowledged.
async fn send(addr: std::net::SocketAddr, lines: &[&str], per_chunk: usize) {
    corpus::send_as(addr, "hybris-1", lines, per_chunk).await;
}

async fn wait_for(loki: &LokiReceiver, count: usize) {
    mall_test_support::wait_until("Loki has every record", Duration::from_secs(30), || async {
        (loki.received().len() >= count).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_corpus_arrives_in_loki_record_by_record_with_traces_whole_and_addresses_masked() {
    let running = start().await;
    let lines: Vec<&str> = CORPUS.lines().collect();
    let want = model(&lines);
    // Chunks of 37 lines cut many traces apart.
    send(running.forward, &lines, 37).await;
    wait_for(&running.loki, want.len()).await;
    let received = running.loki.received();
    assert_in_order(&received, &want);
    for r in &received {
        let labels: std::collections::BTreeMap<_, _> = r.labels.iter().cloned().collect();
        assert_eq!(labels["service"], "hybris.wrapper");
        assert_eq!(labels["host"], "hybris-1");
        assert_eq!(labels["environment"], "test");
        let names: Vec<&str> = r
            .entry
            .structured_metadata
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names, ["logger", "thread"]);
        assert!(!r.entry.line.contains("@example.com"));
    }
    // Metrics derived from the records: per level, and one exception per trace.
    let metrics = probe_metrics(running.admin).await;
    for level in ["INFO", "WARN", "DEBUG", "ERROR"] {
        let records = want.iter().filter(|(l, _)| l == level).count();
        assert_eq!(
            sample(
                &metrics,
                "mall_log_ingest_log_records_total",
                &[("service_name", "hybris.wrapper"), ("level", level)]
            ),
            records as f64,
            "{level}"
        );
    }
    let traces = want
        .iter()
        .filter(|(_, line)| line.lines().nth(1).is_some_and(|l| l.contains("Exception")))
        .count();
    assert!(traces > 10);
    let exceptions: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("mall_log_ingest_log_exceptions_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(exceptions, traces as f64);
    // Each record's delivery, by the service's clock from its receipt (the corpus' own
    // times are from 2024): every one, each within seconds.
    assert_eq!(
        unlabelled(&metrics, "mall_log_ingest_delivery_freshness_seconds_count"),
        want.len() as f64
    );
    assert_eq!(
        sample(
            &metrics,
            "mall_log_ingest_delivery_freshness_seconds_bucket",
            &[("le", "30.0")]
        ),
        want.len() as f64,
        "{metrics}"
    );
    // The first record's time: 2024/10/28 17:12:00.041 in Seoul.
    let first = received
        .iter()
        .map(|r| r.entry.timestamp.expect("a time"))
        .min_by_key(|t| (t.seconds, t.nanos))
        .expect("some");
    // (Below its millisecond, the tie-breaker.)
    assert_eq!(
        (first.seconds, first.nanos / 1_000_000),
        (1_730_103_120, 41)
    );
}

/// However the same lines are cut into chunks, and into events (an event may hold several
/// lines joined by line breaks), the records in Loki are those grouping makes of the lines
/// in one piece (what TestParse returns): random cuts of the corpus, with the wrapper's own
/// lines dropped in at random places (the trace one falls in kept whole: lines that pass, and
/// restarts, followed where a record starts by the new JVM's first output), one host each.
#[tokio::test]
async fn records_are_the_same_however_the_lines_are_cut_into_chunks_and_events() {
    use proptest::strategy::{Strategy as _, ValueTree as _};
    const P: &str = "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | ";
    // Quiet never completes a record here, however slowly this machine sends: each host's
    // lines end with a header, whose record stays in progress and is not compared.
    let running = start_with(|s| s.pipeline.flush_after = Duration::from_secs(600)).await;
    let defaults = log_ingest::Settings::default().parsing;
    let caps = log_ingest::multiline::Caps {
        lines: defaults.max_record_lines,
        bytes: defaults.max_record_bytes,
    };
    let parser =
        log_ingest::parse::Parser::new(log_ingest::parse::Format::Wrapper, chrono_tz::Asia::Seoul);
    let corpus: Vec<&str> = CORPUS.lines().take(400).collect();
    // Lines that pass (a slow ping) and lines that end the record in progress for the text
    // after them (a restart), in turn. Each its own text: identical lines in one second may
    // collide in Loki (the tie-breaker, across segments), which the restart test covers;
    // here they would hide a loss.
    let wrapper = |n: usize| {
        if n.is_multiple_of(2) {
            format!(
                "STATUS | wrapper  | 2024/10/28 17:12:31 | Pinging the JVM took {n} seconds to respond."
            )
        } else {
            format!(
                "STATUS | wrapper  | 2024/10/28 17:12:31 | on_exit trigger matched.  Restarting the JVM.  (Exit code: {n})"
            )
        }
    };
    // (wrapper lines to drop in, before which corpus line; events per chunk; lines per
    // event), the last two used in turn.
    let plan = (
        proptest::collection::vec(0..corpus.len(), 0..16),
        proptest::collection::vec(1_usize..25, 1..30),
        proptest::collection::vec(1_usize..6, 1..30),
    );
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut hosts = Vec::new();
    for case in 0..8 {
        let (mut drops, per_chunk, per_event) =
            plan.new_tree(&mut runner).expect("a plan").current();
        drops.sort_unstable();
        let mut lines: Vec<String> = corpus.iter().map(|l| (*l).to_owned()).collect();
        let header = |line: &str| {
            line.splitn(5, " | ").nth(4).is_some_and(|t| {
                ["INFO ", "WARN ", "ERROR", "DEBUG"]
                    .iter()
                    .any(|l| t.starts_with(l))
            })
        };
        for (n, before) in drops.into_iter().enumerate().rev() {
            let n = n + 1;
            let mut dropped = vec![wrapper(n)];
            if !n.is_multiple_of(2) && header(corpus[before]) {
                // The new JVM's first output, which joins the wrapper's line.
                dropped.push(format!(
                    "INFO   | jvm 2    | main    | 2024/10/28 17:12:31.000 | WrapperManager: Initializing... {n}"
                ));
            }
            lines.splice(before..before, dropped);
        }
        lines.push(format!("{P}INFO  [main] [L] the end"));
        let mut records =
            log_ingest::multiline::group_all(&parser, caps, lines.iter().map(String::as_str));
        records.pop();
        // (level, line, time in µs: the record's own, else its first line's event's).
        let mut want: Vec<(String, String, i64)> = records
            .into_iter()
            .map(|r| {
                let level = r.level.map_or("unknown", |l| l.as_str()).to_owned();
                let micros = r.time_micros.unwrap_or(1_730_103_120_000_000);
                let mut line = r.message;
                if !r.stack_trace.is_empty() {
                    if !line.is_empty() {
                        line.push('\n');
                    }
                    line.push_str(&r.stack_trace);
                }
                (level, corpus::mask(&line), micros)
            })
            .collect();
        want.sort();
        // Events of 1–5 lines, chunks of 1–24 events.
        let mut events: Vec<String> = Vec::new();
        let mut rest = &lines[..];
        for n in per_event.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (event, after) = rest.split_at((*n).min(rest.len()));
            events.push(event.join("\n"));
            rest = after;
        }
        let mut chunks: Vec<Vec<String>> = Vec::new();
        let mut rest = &events[..];
        for n in per_chunk.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (chunk, after) = rest.split_at((*n).min(rest.len()));
            chunks.push(chunk.to_vec());
            rest = after;
        }
        hosts.push((format!("cut-{case}"), chunks, want));
    }
    for (host, chunks, _) in &hosts {
        corpus::send_chunks(running.forward, host, chunks).await;
    }
    let all: usize = hosts.iter().map(|(_, _, want)| want.len()).sum();
    wait_for(&running.loki, all).await;
    // Time for anything more (a record cut in two) to arrive too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(running.loki.counts().2, 0, "nothing pushed twice");
    let received = running.loki.received();
    for (host, chunks, want) in &hosts {
        let mut got: Vec<(String, String, i64)> = received
            .iter()
            .filter(|r| r.labels.contains(&("host".to_owned(), host.clone())))
            .map(|r| {
                let level = r
                    .labels
                    .iter()
                    .find(|(k, _)| k == "level")
                    .map(|(_, v)| v.clone());
                let time = r.entry.timestamp.expect("a time");
                // The lines' times are milliseconds; below, the tie-breaker.
                let micros = time.seconds * 1_000_000 + i64::from(time.nanos / 1_000_000) * 1_000;
                (level.unwrap_or_default(), r.entry.line.clone(), micros)
            })
            .collect();
        got.sort();
        assert_eq!(&got, want, "{host}, cut into {} chunks", chunks.len());
    }
}

#[tokio::test]
async fn a_500_line_trace_in_50_chunks_over_two_connections_is_one_record() {
    const P: &str = "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | ";
    // Quiet never cuts it, however slowly this machine sends; the header after it ends it.
    let running = start_with(|s| s.pipeline.flush_after = Duration::from_secs(600)).await;
    let mut lines = vec![
        format!(
            "{P}ERROR [hybrisHTTP12] [DefaultCartService] cart 8812 failed for customer7@example.com"
        ),
        format!("{P}java.lang.IllegalStateException: cart 8812 is locked"),
    ];
    for n in 0..496 {
        if n == 300 {
            lines.push(format!(
                "{P}Caused by: java.sql.SQLException: lock wait timeout"
            ));
        }
        lines.push(format!(
            "{P}\tat de.hybris.platform.Frame{n}.call(Frame{n}.java:{n})"
        ));
    }
    lines.push(format!("{P}\t... 42 more"));
    assert_eq!(lines.len(), 500);
    let want = model(&lines);
    assert_eq!(want.len(), 1);
    lines.push(format!("{P}INFO  [main] [L] the end"));
    // Two connections of the same server (one tag, one host), taking turns chunk by chunk.
    let mut connections = [
        tokio::net::TcpStream::connect(running.forward)
            .await
            .expect("connects"),
        tokio::net::TcpStream::connect(running.forward)
            .await
            .expect("connects"),
    ];
    for (n, chunk) in lines.chunks(10).enumerate() {
        let id = format!("{n:032x}");
        corpus::send_acked(&mut connections[n % 2], &corpus::frame(&id, chunk), &id).await;
    }
    assert_eq!(
        lines.chunks(10).len(),
        51,
        "the trace in 50 chunks, the next header in one"
    );
    wait_for(&running.loki, 1).await;
    // Time for anything more (the trace's rest as a record of its own) to arrive too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let received = running.loki.received();
    assert_eq!(
        levels_and_lines(&received),
        want,
        "one record, every line in order"
    );
    assert_eq!(received[0].entry.line.lines().count(), 500);
}

#[tokio::test]
async fn a_loki_outage_is_waited_out_and_counted() {
    // The records go in one push when the input pauses (not one per chunk), so both pushes
    // in flight hold them all however slowly the chunks arrive.
    let began = std::time::SystemTime::now();
    let running = start_with(|s| s.pipeline.batch_wait = Duration::from_secs(30)).await;
    let unpushed = stats(running.grpc).await;
    assert_eq!(unpushed.last_push_time, None, "no push yet");
    running.loki.fail(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(5),
    );
    let lines: Vec<&str> = CORPUS.lines().take(200).collect();
    let want = model(&lines);
    send(running.forward, &lines, 50).await;
    // While Loki is down, every record is parsed and waits in a push being retried: the
    // operator's GetPipelineStats says so (not only while they wait for a push to start),
    // and the buffer's gauge shows what it holds (nothing is acknowledged meanwhile: the
    // buffer-filling alert reads it).
    mall_test_support::wait_until(
        "every record counted as waiting in a failing push, the buffer's bytes shown",
        Duration::from_secs(4),
        || async {
            let stats = stats(running.grpc).await;
            let buffered = unlabelled(
                &probe_metrics(running.admin).await,
                "mall_log_ingest_buffer_bytes",
            );
            (stats.loki_failed_pushes > 0
                && stats.buffered_records == i64::try_from(want.len()).expect("fits")
                && buffered > 0.0
                && stats.buffer_bytes as f64 == buffered)
                .then_some(())
        },
    )
    .await;
    wait_for(&running.loki, want.len()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        running.loki.received().len(),
        want.len(),
        "nothing lost, nothing else"
    );
    assert_eq!(running.loki.counts().2, 0, "nothing pushed twice");
    let stats = stats(running.grpc).await;
    assert!(stats.loki_failed_pushes > 0, "{stats:?}");
    assert_eq!(stats.buffered_records, 0, "nothing waits once Loki took it");
    // The replica's start, and the push that went through after the outage, both within
    // the test (whole seconds: the last push's time is kept in seconds).
    let seconds = |t: std::time::SystemTime| {
        i64::try_from(
            t.duration_since(std::time::UNIX_EPOCH)
                .expect("after 1970")
                .as_secs(),
        )
        .expect("fits")
    };
    let (began, now) = (seconds(began), seconds(std::time::SystemTime::now()));
    let started = stats.stats_start_time.expect("the start").seconds;
    let pushed = stats.last_push_time.expect("a push went through").seconds;
    assert!(
        began <= started && started <= pushed && pushed <= now,
        "{began} {started} {pushed} {now}"
    );
    assert_eq!(
        unpushed.stats_start_time, stats.stats_start_time,
        "the start stays"
    );
    assert_eq!(
        stats.loki_pushed_records,
        i64::try_from(want.len()).expect("fits")
    );
    let forward = source(&stats, "forward");
    assert_eq!(forward.received_records, 200);
    assert_eq!(forward.dropped_records, 0);
    // The same counters on /metrics, for Prometheus.
    let (status, body) = mall_test_support::probe::http_get(running.admin, "/metrics").await;
    assert_eq!(status, 200);
    let value = |series: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{series} on /metrics:\n{body}"))
    };
    assert_eq!(
        value("mall_log_ingest_records_received_total{source=\"forward\"}"),
        200.0
    );
    assert!(value("mall_log_ingest_loki_pushes_total{outcome=\"failed\"}") > 0.0);
    assert_eq!(
        value("mall_log_ingest_loki_records_pushed_total"),
        want.len() as f64
    );
    assert_eq!(
        value("mall_log_ingest_forward_messages_total{outcome=\"stored\"}"),
        4.0
    );
    assert_eq!(value("mall_log_ingest_forward_acks_total"), 4.0);
    assert_eq!(
        value("mall_log_ingest_records_dropped_total{reason=\"loki_refused\",source=\"forward\"}"),
        0.0
    );
    assert!(value("mall_log_ingest_masked_total{pattern=\"email\"}") > 0.0);
    // Each record's delivery counts the outage (5 s): none was in Loki within 2 s of its
    // receipt.
    assert!(body.contains("mall_log_ingest_delivery_freshness_seconds_bucket{le=\"2.0\"} "));
    assert_eq!(
        value("mall_log_ingest_delivery_freshness_seconds_count"),
        want.len() as f64
    );
    assert_eq!(
        sample(
            &body,
            "mall_log_ingest_delivery_freshness_seconds_bucket",
            &[("le", "2.0")]
        ),
        0.0,
        "{body}"
    );
    assert!(value("mall_log_ingest_delivery_freshness_seconds_sum") >= 4.0 * want.len() as f64);
    // Everything pushed is acknowledged: the buffer's gauge falls back to nothing.
    mall_test_support::wait_until("the buffer emptied", Duration::from_secs(10), || async {
        (unlabelled(
            &probe_metrics(running.admin).await,
            "mall_log_ingest_buffer_bytes",
        ) == 0.0)
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_record_loki_refuses_is_dropped_alone_and_counted() {
    let running = start_with(|settings| {
        // Records larger than Loki takes for one line (256 KB) are possible here.
        settings.parsing.max_record_bytes = 1 << 20;
    })
    .await;
    let lines: Vec<String> = CORPUS.lines().take(100).map(str::to_owned).collect();
    let mut with_huge = lines.clone();
    // Before a header, so no trace is cut by it.
    let at = (50..lines.len())
        .find(|i| lines[*i].contains("| INFO  ["))
        .expect("a header");
    with_huge.insert(
        at,
        format!(
            "INFO   | jvm 1    | main    | 2024/10/28 17:12:01.000 | INFO  [main] [Big] {}",
            "z".repeat(300 * 1024)
        ),
    );
    let sent: Vec<&str> = with_huge.iter().map(String::as_str).collect();
    send(running.forward, &sent, 40).await;
    let want = model(&lines.iter().map(String::as_str).collect::<Vec<_>>());
    let records = want.len();
    wait_for(&running.loki, want.len()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got: std::collections::BTreeSet<String> = running
        .loki
        .received()
        .into_iter()
        .map(|r| r.entry.line)
        .collect();
    let wanted: std::collections::BTreeSet<String> = want.into_iter().map(|r| r.1).collect();
    assert_eq!(
        got, wanted,
        "every other record arrived; the huge one did not"
    );
    let stats = stats(running.grpc).await;
    let forward = source(&stats, "forward");
    assert_eq!(forward.dropped_records, 1, "{stats:?}");
    // The derived metrics count what Loki accepted, not the refused record.
    let metrics = probe_metrics(running.admin).await;
    // Counted by Loki's reason.
    let reason =
        "mall_log_ingest_records_dropped_total{reason=\"line_too_long\",source=\"forward\"} 1\n";
    assert!(metrics.contains(reason), "{reason} in {metrics}");
    let shipped: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("mall_log_ingest_log_records_total{"))
        .filter_map(|l| l.split(' ').nth(1)?.parse::<f64>().ok())
        .sum();
    assert_eq!(shipped, records as f64, "{metrics}");
}

/// Hosts whose clocks (or zones) are wrong write times Loki refuses, too far ahead or too
/// old, in the same pushes as a good host's. Loki stores the good entries and answers 400
/// naming the bounds of its rule: every entry past them is dropped at once, counted by
/// Loki's reason, not by halving the push until each is alone (twice as many requests as
/// entries, holding every stream's records behind them).
#[tokio::test]
async fn entries_loki_refuses_for_their_times_are_dropped_at_once_by_the_bounds_it_names() {
    let running = start_with(|s| {
        // Every host's chunk in one push.
        s.pipeline.batch_wait = Duration::from_secs(1);
    })
    .await;
    running.loki.refuse_times_as_loki_does();
    // The legacy servers' local time (Asia/Seoul, UTC+9), as the wrapper writes it.
    let seoul = |shift: chrono::Duration| {
        (chrono::Utc::now() + chrono::Duration::hours(9) + shift)
            .format("%Y/%m/%d %H:%M:%S%.3f")
            .to_string()
    };
    const EACH: usize = 100;
    let hosts = [
        ("web-good", chrono::Duration::zero()),
        ("web-ahead", chrono::Duration::days(2)),
        ("web-behind", chrono::Duration::days(-8)),
    ];
    for (host, shift) in hosts {
        // A line a second (most in a second of their own).
        let lines: Vec<String> = (0..EACH)
            .map(|i| {
                let second = chrono::Duration::seconds(i64::try_from(i).expect("small"));
                format!(
                    "INFO   | jvm 1    | main    | {} | INFO  [main] [Clock] {host} {i}",
                    seoul(shift + second)
                )
            })
            .collect();
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        corpus::send_as(running.forward, host, &lines, EACH).await;
    }
    mall_test_support::wait_until(
        "every entry dealt with",
        Duration::from_secs(20),
        || async {
            let metrics = probe_metrics(running.admin).await;
            let dropped = sample(&metrics, "mall_log_ingest_records_dropped_total", &[]);
            (running.loki.received().len() == EACH && dropped == (2 * EACH) as f64).then_some(())
        },
    )
    .await;
    let mut got: Vec<String> = running
        .loki
        .received()
        .into_iter()
        .map(|r| r.entry.line)
        .collect();
    got.sort();
    let mut want: Vec<String> = (0..EACH).map(|i| format!("web-good {i}")).collect();
    want.sort();
    assert_eq!(got, want, "the good host's entries, each once");
    let metrics = probe_metrics(running.admin).await;
    for reason in ["too_far_in_future", "greater_than_max_sample_age"] {
        assert_eq!(
            sample(
                &metrics,
                "mall_log_ingest_records_dropped_total",
                &[("reason", reason)]
            ),
            EACH as f64,
            "{reason}"
        );
    }
    let (_, refused, _) = running.loki.counts();
    assert!(
        refused <= 6,
        "{refused} pushes refused (halving would take hundreds)"
    );
}

/// A host whose clock stepped back writes lines older than those before them. Loki keeps a
/// stream's entries in time order; one configured for ordered writes (`unordered_writes:
/// false`, the test receiver's mode here) refuses an entry older than one before it in its
/// stream. Sent in time order within a push, none is refused.
#[tokio::test]
async fn a_clock_stepped_back_within_a_push_goes_in_time_order() {
    clock_stepped_back(None, None).await;
}

/// As above, through a proxy whose body limit splits the push (413): the halves go in time
/// order too.
#[tokio::test]
async fn a_clock_stepped_back_within_a_push_split_by_a_proxy_goes_in_time_order() {
    clock_stepped_back(Some(400), None).await;
}

/// As above, with the batch cut into pieces of a few records (`pipeline.batch_bytes`): the
/// pieces go in time order too.
#[tokio::test]
async fn a_clock_stepped_back_within_a_batch_cut_in_pieces_goes_in_time_order() {
    clock_stepped_back(None, Some(600)).await;
}

/// Thirty-five lines, the ten after the first twenty ten seconds before them (a clock set
/// back, then going on past them), sent in one chunk to a Loki
/// refusing entries out of order (and bodies over `limit` bytes, as sent; with batches cut
/// in pieces of `piece` bytes): every entry arrives in time order, no push refused.
async fn clock_stepped_back(limit: Option<usize>, piece: Option<usize>) {
    let running = start_with(|s| {
        // The whole chunk in one batch (the last record completes after `flush_after`; with
        // pieces, pushed at once without it).
        s.pipeline.batch_wait = Duration::from_secs(5);
        if let Some(bytes) = piece {
            s.pipeline.batch_bytes = bytes;
        }
    })
    .await;
    running.loki.refuse_out_of_order();
    if let Some(bytes) = limit {
        running.loki.refuse_bodies_over(bytes);
    }
    let line = |second: u32| {
        format!(
            "INFO   | jvm 1    | main    | 2024/10/28 17:12:{second:02}.000 | INFO  [main] [Clock] at {second}"
        )
    };
    // Twenty seconds, then the clock set back ten, then on past where it was (so the last
    // record, pushed alone when batches are small, is the newest).
    let lines: Vec<String> = (20..40).chain(10..20).chain(40..45).map(line).collect();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    send(running.forward, &lines, lines.len()).await;
    wait_for(&running.loki, lines.len()).await;
    let got: Vec<String> = running
        .loki
        .received()
        .into_iter()
        .map(|r| r.entry.line)
        .collect();
    let want: Vec<String> = (10..45).map(|s| format!("at {s}")).collect();
    assert_eq!(got, want, "every entry, in time order");
    let (pushes, refused, _) = running.loki.counts();
    assert_eq!(refused, 0, "no push refused");
    if piece.is_some() {
        assert!(pushes >= 3, "cut in pieces: {pushes} pushes");
    }
    if limit.is_some() {
        let metrics = probe_metrics(running.admin).await;
        let too_large = sample(
            &metrics,
            "mall_log_ingest_loki_pushes_total",
            &[("outcome", "too_large")],
        );
        assert!(too_large >= 1.0, "the proxy split it ({pushes} pushes)");
    }
}

/// A push answered 413 (a proxy's body limit in front of Loki) is split until it fits,
/// nothing dropped; a record too large alone is the proxy's fault, not the record's: it
/// waits (with the pushes after it) until the limit is raised, then arrives, nothing
/// dropped.
#[tokio::test]
async fn a_push_too_large_is_split_and_a_record_too_large_alone_waits_for_the_proxy() {
    let running = start().await;
    // Compressed bodies over 4 KB are refused: 200 corpus lines in one push are over it;
    // none of their records alone is.
    running.loki.refuse_bodies_over(4 * 1024);
    let lines: Vec<&str> = CORPUS.lines().take(200).collect();
    let first = model(&lines);
    corpus::send_as(running.forward, "hybris-1", &lines, 200).await;
    wait_for(&running.loki, first.len()).await;
    let metrics = probe_metrics(running.admin).await;
    assert!(
        sample(
            &metrics,
            "mall_log_ingest_loki_pushes_total",
            &[("outcome", "too_large")]
        ) >= 1.0,
        "a push was too large: {metrics}"
    );
    assert_eq!(
        sample(&metrics, "mall_log_ingest_records_dropped_total", &[]),
        0.0,
        "split, nothing dropped"
    );
    assert_in_order(&of_host(&running.loki.received(), "hybris-1"), &first);

    // From another server, 40 KB of digits that do not repeat (snappy cannot shrink them
    // under the limit) in one record among others.
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let noise: String = (0..40 * 1024)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from(b'0' + (state % 10) as u8)
        })
        .collect();
    let lines: Vec<String> = CORPUS.lines().take(120).map(str::to_owned).collect();
    let at = (60..lines.len())
        .find(|i| lines[*i].contains("| INFO  ["))
        .expect("a header");
    let mut with_huge = lines.clone();
    // At the time of the header it comes before (each stream's entries go in time order).
    let prefix: Vec<&str> = lines[at].splitn(5, " | ").take(4).collect();
    with_huge.insert(
        at,
        format!("{} | INFO  [main] [Big] {noise}", prefix.join(" | ")),
    );
    let sent: Vec<&str> = with_huge.iter().map(String::as_str).collect();
    let too_large = |metrics: &str| {
        sample(
            metrics,
            "mall_log_ingest_loki_pushes_total",
            &[("outcome", "too_large")],
        )
    };
    let before = too_large(&probe_metrics(running.admin).await);
    corpus::send_as(running.forward, "hybris-2", &sent, 200).await;
    let second = model(&sent);
    // The huge record alone is refused again and again (waiting between), not dropped.
    // Halving its piece (at most 128 records: seven halvings) takes at most seven 413s;
    // twelve mean it was refused alone five times and more.
    mall_test_support::wait_until(
        "the huge record refused alone again and again",
        Duration::from_secs(20),
        || async {
            let metrics = probe_metrics(running.admin).await;
            (too_large(&metrics) >= before + 12.0).then_some(())
        },
    )
    .await;
    let metrics = probe_metrics(running.admin).await;
    assert_eq!(
        sample(&metrics, "mall_log_ingest_records_dropped_total", &[]),
        0.0,
        "nothing dropped: {metrics}"
    );
    assert!(
        running.loki.received().len() < first.len() + second.len(),
        "the huge record waits"
    );
    // The proxy's limit raised: it goes, with every record after it.
    running.loki.refuse_bodies_over(usize::MAX);
    wait_for(&running.loki, first.len() + second.len()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = running.loki.received();
    assert_in_order(&of_host(&received, "hybris-2"), &second);
    assert_eq!(received.len(), first.len() + second.len(), "each once");
    assert_eq!(running.loki.counts().2, 0, "nothing pushed again");
    let stats = stats(running.grpc).await;
    let forward = source(&stats, "forward");
    assert_eq!(forward.dropped_records, 0, "{stats:?}");
}

/// The entries of `received` whose stream's `host` is `host`.
fn of_host(
    received: &[log_ingest::loki_receiver::Received],
    host: &str,
) -> Vec<log_ingest::loki_receiver::Received> {
    received
        .iter()
        .filter(|r| r.labels.iter().any(|(k, v)| k == "host" && v == host))
        .cloned()
        .collect()
}

/// A host (or tag) leaves the service as a label: masked as a record's text is, whatever
/// the sender put there, and counted.
#[tokio::test]
async fn a_host_holding_personal_data_is_masked_in_its_label() {
    let running = start().await;
    let line = "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | INFO  [main] [X] started";
    corpus::send_as(
        running.forward,
        "kim.minsu@example.com_01012345678",
        &[line],
        1,
    )
    .await;
    wait_for(&running.loki, 1).await;
    let received = running.loki.received();
    let host: Vec<&str> = received[0]
        .labels
        .iter()
        .filter(|(k, _)| k == "host")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(host, ["<email>_<phone>"]);
    let metrics = probe_metrics(running.admin).await;
    for pattern in ["email", "kr_mobile"] {
        assert!(
            metrics.contains(&format!(
                "mall_log_ingest_masked_total{{pattern=\"{pattern}\"}} 1"
            )),
            "{pattern} counted"
        );
    }
}

/// Events without the host field (a sender configured without it): the records go, with
/// no host label, and a WARN line, once for the tag's stream, names the tag and the field,
/// since every host of the tag then shares one stream. Events with the field say nothing.
#[tokio::test]
async fn events_without_the_host_field_are_shipped_and_logged_once() {
    // Every task of this (single-threaded) test runtime logs to it.
    let (logged, _default) = mall_test_support::capture::Captured::set_default();
    let running = start().await;
    let lines = [
        "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | INFO  [main] [X] one",
        "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.041 | INFO  [main] [X] two",
    ];
    let mut stream = tokio::net::TcpStream::connect(running.forward)
        .await
        .expect("connects");
    for (n, line) in lines.iter().enumerate() {
        let chunk = format!("{n:032x}");
        let frame = corpus::frame_from(None, &chunk, &[line]);
        corpus::send_acked(&mut stream, &frame, &chunk).await;
    }
    send(running.forward, &lines[..1], 1).await;
    wait_for(&running.loki, 3).await;
    let received = running.loki.received();
    let hosts: Vec<Option<&str>> = received
        .iter()
        .map(|r| {
            r.labels
                .iter()
                .find(|(k, _)| k == "host")
                .map(|(_, v)| v.as_str())
        })
        .collect();
    assert_eq!(hosts.iter().filter(|h| h.is_none()).count(), 2, "{hosts:?}");
    assert_eq!(hosts.iter().filter(|h| **h == Some("hybris-1")).count(), 1);
    let text = logged.text();
    let warns: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("carry no host"))
        .collect();
    assert_eq!(warns.len(), 1, "{text}");
    assert!(
        warns[0].contains("WARN")
            && warns[0].contains("tag=hybris.wrapper")
            && warns[0].contains("host_field=\"host\""),
        "{}",
        warns[0]
    );
}

/// A runaway thread name (a malformed line) would make the entry's structured metadata
/// larger than Loki takes (64 KB), and Loki would refuse the whole record: the logger and
/// thread are cut to 2,048 bytes in metadata, and the record goes.
#[tokio::test]
async fn a_record_with_a_huge_thread_name_is_not_refused() {
    let running = start_with(|_| {}).await;
    let thread = "t".repeat(70_000);
    let line = format!(
        "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | ERROR [{thread}] [X] cart failed"
    );
    send(running.forward, &[line.as_str()], 1).await;
    wait_for(&running.loki, 1).await;
    let received = running.loki.received();
    assert_eq!(received[0].entry.line, "cart failed");
    let kept = received[0]
        .entry
        .structured_metadata
        .iter()
        .find(|p| p.name == "thread")
        .map(|p| p.value.len());
    assert_eq!(kept, Some(2048));
}

/// A record Loki refuses with a 400 in words not known here, while it takes a probe (a
/// stream without entries), is that record's fault: dropped (counted `loki_refused`), first
/// or last in the push or alone, and the output goes on. When Loki takes nothing (its tenant, say), nothing is
/// dropped.
#[tokio::test]
async fn a_record_refused_for_no_known_reason_beside_accepted_ones_is_dropped() {
    let running = start().await;
    running.loki.refuse_lines_containing(
        "poison",
        "stream '{service=\"x\"}' has a problem of a new kind",
    );
    let header = |text: &str| {
        format!("INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | INFO  [main] [X] {text}")
    };
    let lines: Vec<String> = [
        "poison first",
        "ok 1",
        "ok 2",
        "poison again",
        "ok 3",
        "poison",
    ]
    .iter()
    .map(|t| header(t))
    .collect();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    send(running.forward, &lines, lines.len()).await;
    wait_for(&running.loki, 3).await;
    let dropped = || dropped_forward(running.admin, "loki_refused");
    mall_test_support::wait_until("three records dropped", Duration::from_secs(20), || async {
        dropped().await.filter(|n| *n >= 3.0)
    })
    .await;
    let kept: Vec<String> = lines_in(&running.loki);
    assert_eq!(kept, ["ok 1", "ok 2", "ok 3"]);
    assert_eq!(dropped().await, Some(3.0));

    // Everything refused in words not known here (a tenant Loki refuses): nothing dropped;
    // once Loki takes pushes again, everything arrives, in order.
    running.loki.fail_saying(
        axum::http::StatusCode::BAD_REQUEST,
        "tenant ID 'x|y' contains unsupported character '|'",
        Duration::from_secs(3),
    );
    let more: Vec<String> = (4..20).map(|i| header(&format!("ok {i}"))).collect();
    let more: Vec<&str> = more.iter().map(String::as_str).collect();
    send(running.forward, &more, more.len()).await;
    wait_for(&running.loki, 3 + more.len()).await;
    let kept: Vec<String> = lines_in(&running.loki);
    let want: Vec<String> = (1..20).map(|i| format!("ok {i}")).collect();
    assert_eq!(kept, want);
    assert_eq!(dropped().await, Some(3.0), "nothing more dropped");
}

/// Labels Loki's operator enforces (`enforced_labels`): Loki discards each stream without
/// them and takes the others, so a record of such a stream is dropped, counted under
/// Loki's reason (`missing_enforced_labels`), and the others go. (The probe, a stream
/// without entries, is never checked for them.)
#[tokio::test]
async fn records_of_streams_without_labels_loki_enforces_are_dropped_and_counted() {
    let running = start().await;
    running.loki.enforce_labels(&["host"]);
    let header = |text: &str| {
        format!("INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | INFO  [main] [X] {text}")
    };
    let hosted: Vec<String> = (0..4).map(|i| header(&format!("ok {i}"))).collect();
    let hosted: Vec<&str> = hosted.iter().map(String::as_str).collect();
    let bare: Vec<String> = (0..3).map(|i| header(&format!("no host {i}"))).collect();
    let bare: Vec<&str> = bare.iter().map(String::as_str).collect();
    // No host: the `host` label is left out.
    corpus::send_as(running.forward, "", &bare, 3).await;
    send(running.forward, &hosted, 2).await;
    wait_for(&running.loki, hosted.len()).await;
    let dropped = || dropped_forward(running.admin, "missing_enforced_labels");
    mall_test_support::wait_until("three records dropped", Duration::from_secs(20), || async {
        dropped().await.filter(|n| *n >= 3.0)
    })
    .await;
    let kept: Vec<String> = lines_in(&running.loki);
    let want: Vec<String> = (0..4).map(|i| format!("ok {i}")).collect();
    assert_eq!(kept, want);
    assert_eq!(dropped().await, Some(3.0));
}

/// A line longer than `parsing.max_record_bytes` is cut; how much was cut is in the entry's
/// structured metadata, where the record is read.
#[tokio::test]
async fn a_cut_record_says_so_in_loki() {
    let running = start_with(|settings| settings.parsing.max_record_bytes = 1024).await;
    let line = format!(
        "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | ERROR [main] [X] {}",
        "y ".repeat(1_000)
    );
    send(running.forward, &[line.as_str()], 1).await;
    wait_for(&running.loki, 1).await;
    let received = running.loki.received();
    let cut = received[0]
        .entry
        .structured_metadata
        .iter()
        .find(|p| p.name == "truncated_bytes")
        .and_then(|p| p.value.parse::<usize>().ok());
    assert_eq!(cut, Some(2_000 - received[0].entry.line.len()));
}

/// Loki keeps one entry of a stream per timestamp and line: the same line written twice in
/// the same millisecond (the wrapper's precision) must still arrive twice, so the entries'
/// timestamps differ below the millisecond.
#[tokio::test]
async fn identical_lines_in_the_same_millisecond_are_all_kept() {
    let running = start().await;
    let line =
        "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | INFO  [hybrisHTTP1] [Poller] poll";
    send(running.forward, &[line, line, line], 3).await;
    send(running.forward, &[line, line], 2).await;
    wait_for(&running.loki, 5).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = running.loki.received();
    let (_, _, identical) = running.loki.counts();
    assert_eq!(
        (received.len(), identical),
        (5, 0),
        "every line kept, none identical"
    );
    let mut times: Vec<_> = received
        .iter()
        .map(|r| r.entry.timestamp.expect("a time"))
        .map(|t| (t.seconds, t.nanos))
        .collect();
    assert!(
        times.iter().all(|(_, n)| n / 1_000_000 == 40),
        "within the line's millisecond: {times:?}"
    );
    times.sort_unstable();
    times.dedup();
    assert_eq!(times.len(), 5, "{times:?}");
}

/// An access log's times are whole seconds: its lines of one second, identical ones among
/// them, reach Loki each once, and sorted by time (as Grafana shows them) in the file's
/// order, across chunks too.
#[tokio::test]
async fn an_access_logs_lines_of_one_second_keep_their_order_identical_ones_too() {
    let running = start_parsing_access_logs().await;
    let paths = ["/a", "/health", "/b", "/health", "/c", "/health", "/d"];
    let lines: Vec<String> = paths
        .iter()
        .map(|path| {
            format!(r#"10.0.3.7 - - [28/Oct/2024:17:12:00 +0900] "GET {path} HTTP/1.1" 200 2"#)
        })
        .collect();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    send(running.forward, &lines, 3).await;
    wait_for(&running.loki, paths.len()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut received: Vec<((i64, i32), String)> = running
        .loki
        .received()
        .into_iter()
        .map(|r| {
            let time = r.entry.timestamp.expect("a time");
            ((time.seconds, time.nanos), r.entry.line)
        })
        .collect();
    assert_eq!(running.loki.counts().2, 0, "none identical to Loki");
    received.sort();
    let in_time_order: Vec<&str> = received
        .iter()
        .map(|(_, line)| {
            let path = paths
                .iter()
                .find(|p| line.contains(&format!("GET {p} ")))
                .unwrap_or_else(|| panic!("a path in {line}"));
            *path
        })
        .collect();
    assert_eq!(in_time_order, paths, "{received:?}");
    assert!(
        received.iter().all(|((s, _), _)| *s == 1_730_103_120),
        "within the line's second: {received:?}"
    );
}

/// A line that ends with its terminator (Docker's json-file logs keep it; log4j's `%n`) is
/// the line without it, not the line and an empty one.
#[tokio::test]
async fn a_line_ending_with_its_terminator_is_one_line() {
    let running = start().await;
    let one = "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | INFO  [main] [X] one\n";
    let two = "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.041 | INFO  [main] [X] two\r\n";
    send(running.forward, &[one, two], 2).await;
    wait_for(&running.loki, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines: Vec<String> = lines_in(&running.loki);
    assert_eq!(lines, ["one", "two"]);
}

/// Sends one chunk of `lines` from `host` on a new connection: whether it was acknowledged
/// (a full buffer closes the connection without an ack).
async fn try_send(addr: std::net::SocketAddr, host: &str, id: &str, lines: &[&str]) -> bool {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    stream
        .write_all(&corpus::frame_of(host, id, lines))
        .await
        .expect("writes");
    let mut ack = vec![0; 128];
    match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut ack)).await {
        Ok(Ok(n)) if n > 0 => true,
        Ok(_) => false,
        Err(_) => panic!("neither an ack nor a close in 10 s"),
    }
}

/// The beginning of a stack trace (its header, exception line and first frame), its rest
/// sent apart, and the one record they make.
const TRACE_HEAD: [&str; 3] = [
    "INFO   | jvm 1    | main    | 2024/10/28 17:12:01.000 | ERROR [hybrisHTTP1] [Cart] cart 1 failed",
    "java.lang.IllegalStateException: none left",
    "\tat a.B.c(B.java:1)",
];
const TRACE_REST: [&str; 2] = ["\tat a.B.d(B.java:2)", "\tat a.B.e(B.java:3)"];
const TRACE_WHOLE: &str = "cart 1 failed\njava.lang.IllegalStateException: none left\n\tat a.B.c(B.java:1)\n\tat a.B.d(B.java:2)\n\tat a.B.e(B.java:3)";

/// Lines of another host (`web-2`), each different (a chunk with the content of one
/// stored is taken as sent again), each in a chunk of its own.
struct Filler {
    forward: std::net::SocketAddr,
    stored: usize,
}

impl Filler {
    fn new(forward: std::net::SocketAddr) -> Self {
        Self { forward, stored: 0 }
    }

    /// Sends a line of `size` bytes of filler; whether it was stored.
    async fn send(&mut self, size: usize) -> bool {
        let line = format!(
            "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | INFO  [main] [Filler] {} {}",
            self.stored,
            "x".repeat(size)
        );
        let id = format!("{:032x}", self.stored);
        let stored = try_send(self.forward, "web-2", &id, &[&line]).await;
        self.stored += usize::from(stored);
        stored
    }

    /// Fills the buffer to the brim: lines of each size in turn until one is refused.
    async fn fill_to_the_brim(&mut self, sizes: &[usize]) {
        for &size in sizes {
            for _ in 0..200 {
                if !self.send(size).await {
                    break;
                }
            }
        }
    }
}

/// The lines of `host`'s entries in Loki, in arrival order.
fn lines_of(loki: &LokiReceiver, host: &str) -> Vec<String> {
    loki.received()
        .iter()
        .filter(|r| r.labels.iter().any(|(k, v)| k == "host" && v == host))
        .map(|r| r.entry.line.clone())
        .collect()
}

/// Waits until the end of the trace ([`TRACE_REST`]) from `web-1` is in Loki, then checks
/// that the trace is one record.
async fn assert_the_trace_arrives_whole(loki: &LokiReceiver) {
    mall_test_support::wait_until("the rest is in Loki", Duration::from_secs(30), || async {
        lines_of(loki, "web-1")
            .iter()
            .any(|l| l.ends_with("(B.java:3)"))
            .then_some(())
    })
    .await;
    assert_eq!(lines_of(loki, "web-1"), [TRACE_WHOLE]);
}

/// Sends [`TRACE_REST`] from `web-1` until it is stored (a sender resending after its
/// backoff until there is room).
async fn resend_the_rest_until_stored(forward: std::net::SocketAddr) {
    mall_test_support::wait_until(
        "the rest is acknowledged",
        Duration::from_secs(20),
        || async {
            try_send(forward, "web-1", "a2", &TRACE_REST)
                .await
                .then_some(())
        },
    )
    .await;
}

/// The buffer is full (Loki has been down) and refuses the chunk holding the rest of a
/// stack trace; its sender resends it only once there is room again. Meanwhile the stream
/// is quiet, but its record in progress waits for the rest (as after a restart) instead of
/// going as it is: the trace arrives whole.
#[tokio::test]
async fn a_stack_trace_whose_rest_a_full_buffer_refused_arrives_whole() {
    let running = start_with(|s| {
        s.forward.max_message_bytes = 64 * 1024;
        s.server.max_message_bytes = 256 * 1024;
        s.buffer.segment_bytes = 1536 * 1024;
        s.buffer.max_bytes = 6 << 20;
        s.pipeline.restart_grace = Duration::from_secs(30);
    })
    .await;
    running.loki.fail(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(600),
    );
    // A host whose record in progress began before most of the buffer: holding it would
    // keep the acknowledgement there and the buffer full, so it is not held.
    let early =
        "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.500 | WARN  [main] [Early] early";
    assert!(try_send(running.forward, "web-3", "e1", &[early]).await);
    let mut filler = Filler::new(running.forward);
    // Another host's lines first, so that the acknowledgement can free segments before
    // the trace once Loki is back.
    for _ in 0..70 {
        assert!(filler.send(50_000).await);
    }
    assert!(try_send(running.forward, "web-1", "a1", &TRACE_HEAD).await);
    // Then to the brim: large lines, then small ones.
    filler.fill_to_the_brim(&[50_000, 1_000, 0]).await;
    assert!(
        !try_send(running.forward, "web-1", "a2", &TRACE_REST).await,
        "refused: full"
    );
    // Quiet (flush_after, 300 ms) passes many times over while the rest waits.
    tokio::time::sleep(Duration::from_secs(2)).await;
    running
        .loki
        .fail(axum::http::StatusCode::OK, Duration::ZERO);
    // The sender resends after its backoff (Fluent Bit's is a second or more), until
    // there is room.
    tokio::time::sleep(Duration::from_secs(2)).await;
    resend_the_rest_until_stored(running.forward).await;
    // (web-2's last record waits out `restart_grace`: its next chunks were refused too, and
    // this sender does not resend them.)
    assert_the_trace_arrives_whole(&running.loki).await;
    assert!(
        lines_of(&running.loki, "web-3")
            .iter()
            .any(|l| l == "early"),
        "the early record was not held back"
    );
}

/// Loki was down and a backlog waits in the buffer; pushes are slow as it is read. A stream
/// whose latest line came long (`flush_after`) before lines of another stream read since
/// has no more to come: its record goes out with the backlog, not after all of it (which
/// would hold the acknowledgement at its line, and the buffer's bytes with it, until the
/// whole backlog is read).
#[tokio::test]
async fn a_quiet_streams_record_goes_during_a_backlog_not_after_it() {
    let running = start_with(|s| {
        s.pipeline.flush_after = Duration::from_secs(2);
        s.pipeline.batch_bytes = 8 * 1024;
    })
    .await;
    running.loki.fail(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(600),
    );
    let quiet =
        "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.500 | WARN  [main] [Quiet] alone";
    assert!(try_send(running.forward, "web-q", "q1", &[quiet]).await);
    // Another host's lines for twice `flush_after`. The pipeline stops reading once its
    // pushes in flight wait for Loki (well within `flush_after`), so they stay in the buffer.
    let began = std::time::Instant::now();
    let mut chunks = 0;
    while began.elapsed() < Duration::from_secs(4) {
        let lines: Vec<String> = (0..50)
            .map(|i| {
                format!(
                    "INFO   | jvm 1    | main    | 2024/10/28 17:12:01.000 | INFO  [main] [Busy] line {chunks} {i}"
                )
            })
            .collect();
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        assert!(try_send(running.forward, "web-b", &format!("{chunks:032x}"), &lines).await);
        chunks += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let busy = chunks * 50;
    running.loki.answer_after(Duration::from_millis(20));
    running
        .loki
        .fail(axum::http::StatusCode::OK, Duration::ZERO);
    wait_for(&running.loki, busy + 1).await;
    let received = running.loki.received();
    assert_eq!(received.len(), busy + 1, "each record once");
    let at = received
        .iter()
        .position(|r| r.entry.line == "alone")
        .expect("the quiet record");
    // It goes once the lines read were sent two seconds after it: about half of the
    // busy lines come after it (none would, were it judged only at the backlog's end).
    assert!(
        received.len() - at > busy / 5,
        "the quiet record came {at}th of {}",
        received.len()
    );
}

/// As above, but the backlog is read long (past `restart_grace`) after the last refusal,
/// and the rest is stored behind another host's lines that arrived past `flush_after`
/// after the trace's head: while the reader has not read lines that arrived
/// `restart_grace` after the refusal, the record still waits for its rest.
#[tokio::test]
async fn a_stack_trace_whose_rest_a_full_buffer_refused_arrives_whole_after_a_long_catch_up() {
    let running = start_with(|s| {
        s.forward.max_message_bytes = 64 * 1024;
        s.server.max_message_bytes = 256 * 1024;
        s.buffer.segment_bytes = 1536 * 1024;
        s.buffer.max_bytes = 3 << 20;
        s.pipeline.restart_grace = Duration::from_secs(1);
        s.pipeline.batch_bytes = 16 * 1024;
    })
    .await;
    running.loki.fail(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(600),
    );
    let mut filler = Filler::new(running.forward);
    // Most of the buffer before the trace's head, so that holding it holds back less than
    // half of the buffer.
    for _ in 0..105 {
        assert!(filler.send(20_000).await);
    }
    assert!(try_send(running.forward, "web-1", "a1", &TRACE_HEAD).await);
    // The other host's lines after it arrive well past `flush_after` (300 ms) later.
    tokio::time::sleep(Duration::from_millis(600)).await;
    filler.fill_to_the_brim(&[20_000, 1_000, 0]).await;
    assert!(
        !try_send(running.forward, "web-1", "a2", &TRACE_REST).await,
        "refused: full"
    );
    // Loki comes back long after, and slow: the catch-up reads the lines after the head
    // more than `restart_grace` after the last refusal (the rest is stored early in it,
    // once the first pushes free room).
    tokio::time::sleep(Duration::from_secs(2)).await;
    running.loki.answer_after(Duration::from_millis(20));
    running
        .loki
        .fail(axum::http::StatusCode::OK, Duration::ZERO);
    resend_the_rest_until_stored(running.forward).await;
    assert_the_trace_arrives_whole(&running.loki).await;
}

/// A sender writing whole-second times (as `frame_of` does) may send the same line twice
/// in a second on purpose, under two chunk ids: both reach Loki. The same chunk sent again
/// under its id (its ack lost) is recognised and stored once.
#[tokio::test]
async fn the_same_lines_under_two_chunk_ids_are_both_kept_and_a_resend_once() {
    let running = start().await;
    let line = "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | INFO  [main] [Poller] poll";
    for id in [1, 2, 2] {
        let id = format!("{id:032x}");
        assert!(try_send(running.forward, "web-1", &id, &[line]).await);
    }
    wait_for(&running.loki, 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        running.loki.received().len(),
        2,
        "both kept, the resend once"
    );
    assert_eq!(running.loki.counts().2, 0, "none identical");
    let metrics = probe_metrics(running.admin).await;
    assert_eq!(
        sample(
            &metrics,
            "mall_log_ingest_forward_messages_total",
            &[("outcome", "sent_again")]
        ),
        1.0
    );
    // The resend is acknowledged too.
    assert_eq!(
        unlabelled(&metrics, "mall_log_ingest_forward_acks_total"),
        3.0
    );
}

/// A sender without acks (no `chunk` option) never sends a chunk again: the same record
/// twice in a second is two records, both kept.
#[tokio::test]
async fn the_same_record_twice_without_acks_is_two_records() {
    let running = start().await;
    let line = "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | INFO  [main] [Poller] poll";
    let entry = Value::Array(vec![
        Value::from(1_730_103_120_u32),
        Value::Map(vec![
            (Value::from("log"), Value::from(line)),
            (Value::from("host"), Value::from("web-1")),
        ]),
    ]);
    let message = Value::Array(vec![
        Value::from("hybris.wrapper"),
        Value::Array(vec![entry]),
    ]);
    let mut frame = Vec::new();
    rmpv::encode::write_value(&mut frame, &message).expect("encodes");
    let mut stream = tokio::net::TcpStream::connect(running.forward)
        .await
        .expect("connects");
    for _ in 0..2 {
        stream.write_all(&frame).await.expect("writes");
    }
    wait_for(&running.loki, 2).await;
}

/// A Loki that takes no structured metadata (Loki 2.9's default, or 3.x with
/// `allow_structured_metadata: false`) refuses every entry carrying some: that is its
/// configuration, not the records' fault, so they go without it (counted), none dropped.
#[tokio::test]
async fn records_go_without_metadata_to_a_loki_that_refuses_it() {
    let running = start_with(|_| {}).await;
    running.loki.disallow_structured_metadata(true);
    let lines: Vec<&str> = CORPUS.lines().take(100).collect();
    let want = model(&lines);
    // A long host name: Loki names the stream's labels before its reason, past the first
    // 200 characters of its answer.
    let host = format!(
        "ip-10-120-33-201.{}.compute.internal",
        "ap-northeast-2".repeat(6)
    );
    corpus::send_as(running.forward, &host, &lines, 25).await;
    wait_for(&running.loki, want.len()).await;
    let received = running.loki.received();
    assert_eq!(received.len(), want.len(), "every record once");
    assert!(
        received
            .iter()
            .all(|r| r.entry.structured_metadata.is_empty()),
        "none with metadata"
    );
    let stats = stats(running.grpc).await;
    assert!(
        stats.sources.iter().all(|s| s.dropped_records == 0),
        "{stats:?}"
    );
    let metrics = probe_metrics(running.admin).await;
    let stripped = metrics
        .lines()
        .find_map(|l| l.strip_prefix("mall_log_ingest_loki_metadata_refused_total "))
        .and_then(|v| v.parse::<f64>().ok())
        .expect("the counter");
    // Every wrapper record has a logger and thread in metadata.
    assert_eq!(stripped, want.len() as f64, "{metrics}");
    // One push was refused; the rest went without metadata at once (for ten minutes,
    // then one tries with it again).
    assert_eq!(running.loki.counts().1, 1, "pushes refused");
}

/// Many hosts each in the middle of a large trace: past `pipeline.max_pending_bytes` the
/// largest records in progress are completed early (counted), so the memory they hold
/// stays bounded; every line still reaches Loki.
#[tokio::test]
async fn records_in_progress_of_all_hosts_together_stay_within_their_bound() {
    let running = start_with(|settings| {
        settings.parsing.max_record_bytes = 8 * 1024;
        settings.pipeline.max_pending_bytes = 16 * 1024;
        // Long enough that no record completes by quiet while the hosts send (four
        // hosts' records in progress pass the bound).
        settings.pipeline.flush_after = Duration::from_secs(5);
    })
    .await;
    let header = "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | ERROR [main] [X] failed";
    let frame = format!(
        "\tat de.hybris.platform.Foo.bar(Foo.java:{})",
        "1".repeat(60)
    );
    let hosts = 20;
    let lines: Vec<&str> = std::iter::once(header)
        .chain(std::iter::repeat_n(frame.as_str(), 50))
        .collect();
    // ~5 KB per host in progress, ~100 KB in all: past the 16 KiB bound.
    for host in 0..hosts {
        corpus::send_as(
            running.forward,
            &format!("host-{host}"),
            &lines,
            lines.len(),
        )
        .await;
    }
    mall_test_support::wait_until(
        "records completed early",
        Duration::from_secs(20),
        || async {
            probe_metrics(running.admin)
                .await
                .lines()
                .find_map(|l| l.strip_prefix("mall_log_ingest_records_completed_early_total "))
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|n| *n > 0.0)
        },
    )
    .await;
    // Quiet completes the rest; every line arrives, in some record.
    let sent = (hosts * lines.len()) as u64;
    mall_test_support::wait_until("every line in Loki", Duration::from_secs(60), || async {
        (running.loki.accepted().1 >= sent).then_some(())
    })
    .await;
    assert_eq!(running.loki.accepted().1, sent);
}

/// TailLogs while the corpus is ingested: a tail reading as records come gets exactly the
/// matching records, masked, in order; a tail whose client reads nothing (a 1 KiB HTTP/2
/// window) does not hold ingestion back, and what it missed is counted to the record; a
/// shutdown ends the tails with UNAVAILABLE.
#[tokio::test]
async fn tails_get_matching_records_and_a_stalled_tail_never_slows_ingestion() {
    use mall_proto::logs::v1::{
        TailLogsRequest, log_ingest_service_client::LogIngestServiceClient,
    };
    // Room for the matching records of a push (the reading tail), not for the whole corpus
    // (the stalled one).
    let running = start_with(|s| s.tail.buffer_records = 50).await;
    let url = format!("http://{}", running.grpc);
    let mut client = LogIngestServiceClient::new(
        tonic::transport::Endpoint::from_shared(url.clone())
            .expect("a uri")
            .connect()
            .await
            .expect("connects"),
    );
    let mut errors = client
        .tail_logs(TailLogsRequest {
            service: "hybris.wrapper".to_owned(),
            min_level: "ERROR".to_owned(),
            contains: "Exception".to_owned(),
        })
        .await
        .expect("a tail")
        .into_inner();
    let stalled_channel = tonic::transport::Endpoint::from_shared(url)
        .expect("a uri")
        .initial_stream_window_size(Some(1024))
        .connect()
        .await
        .expect("connects");
    let mut stalled = LogIngestServiceClient::new(stalled_channel)
        .tail_logs(TailLogsRequest::default())
        .await
        .expect("a tail")
        .into_inner();

    let lines: Vec<&str> = CORPUS.lines().collect();
    let want = model(&lines);
    // Each record's first line: its index in the chunk of 37 lines it came in.
    let starts = (0..lines.len())
        .filter(|&i| corpus::is_header(lines[i].splitn(5, " | ").nth(4).unwrap_or_default()));
    let want_errors: Vec<(i32, String)> = want
        .iter()
        .zip(starts)
        .filter(|((level, line), _)| level == "ERROR" && line.contains("Exception"))
        .map(|((_, line), start)| (i32::try_from(start % 37).expect("small"), line.clone()))
        .collect();
    assert!(want_errors.len() > 10, "the corpus has traces");
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < want_errors.len() {
            let message = errors.message().await.expect("ok").expect("a message");
            assert_eq!(message.dropped_count, 0, "this tail keeps up");
            for r in message.records {
                assert_eq!(
                    (r.service.as_str(), r.level.as_str()),
                    ("hybris.wrapper", "ERROR")
                );
                got.push((r.first_line, format!("{}\n{}", r.message, r.stack_trace)));
            }
        }
        assert_eq!(got, want_errors);
        errors
    });
    send(running.forward, &lines, 37).await;
    wait_for(&running.loki, want.len()).await;
    let mut errors = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("the reader is done in time")
        .expect("the reader's checks pass");

    // Everything is in Loki while the stalled tail has read nothing: now read it.
    let (mut records, mut dropped) = (0, 0);
    while records + dropped < want.len() {
        let message = tokio::time::timeout(Duration::from_secs(10), stalled.message())
            .await
            .expect("a message in time")
            .expect("ok")
            .expect("a message");
        for r in &message.records {
            assert!(!r.message.contains("@example.com"), "masked: {}", r.message);
        }
        records += message.records.len();
        dropped += usize::try_from(message.dropped_count).expect("not negative");
    }
    assert_eq!(
        records + dropped,
        want.len(),
        "every record sent or counted"
    );
    assert!(dropped > 0, "the stalled tail missed records");
    let metrics = probe_metrics(running.admin).await;
    assert!(
        metrics.contains(&format!(
            "mall_log_ingest_tail_records_dropped_total {dropped}"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("mall_log_ingest_tails_open 2"),
        "{metrics}"
    );

    running.shutdown.cancel();
    let status = tokio::time::timeout(Duration::from_secs(10), errors.message())
        .await
        .expect("ends in time")
        .expect_err("ends with a status");
    assert_eq!(status.code(), tonic::Code::Unavailable);
}

/// The value of the series of `name` with all of `labels` in a /metrics text (0 without).
fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The value of the series `name`, without labels, in a /metrics text.
fn unlabelled(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} on /metrics:\n{metrics}"))
}

/// Forward records dropped for `reason`, as `/metrics` says.
async fn dropped_forward(admin: std::net::SocketAddr, reason: &str) -> Option<f64> {
    let series =
        format!("mall_log_ingest_records_dropped_total{{reason=\"{reason}\",source=\"forward\"}} ");
    probe_metrics(admin)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .and_then(|v| v.parse::<f64>().ok())
}

/// The lines Loki received, in order.
fn lines_in(loki: &LokiReceiver) -> Vec<String> {
    loki.received()
        .iter()
        .map(|r| r.entry.line.clone())
        .collect()
}

async fn probe_metrics(admin: std::net::SocketAddr) -> String {
    let (status, body) = mall_test_support::probe::http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    body
}

/// Every record of `want` (level, line) received, in order within each level (streams of
/// one push may come in any order).
fn assert_in_order(received: &[log_ingest::loki_receiver::Received], want: &[(String, String)]) {
    let got = levels_and_lines(received);
    for level in ["INFO", "WARN", "DEBUG", "ERROR"] {
        let of = |v: &[(String, String)]| -> Vec<String> {
            v.iter()
                .filter(|(l, _)| l == level)
                .map(|(_, line)| line.clone())
                .collect()
        };
        assert_eq!(of(&got), of(want), "{level} records");
    }
    assert_eq!(got.len(), want.len());
}

/// Records past `pipeline.batch_bytes` go in several pushes, in order.
#[tokio::test]
async fn records_past_the_push_size_go_in_pieces_in_order() {
    let running = start_with(|s| s.pipeline.batch_bytes = 4096).await;
    let lines: Vec<&str> = CORPUS.lines().collect();
    let want = model(&lines);
    send(running.forward, &lines, 37).await;
    wait_for(&running.loki, want.len()).await;
    assert_in_order(&running.loki.received(), &want);
    let bytes: usize = want.iter().map(|(_, line)| line.len()).sum();
    let (pushes, _, _) = running.loki.counts();
    assert!(
        pushes as usize >= bytes / 4096,
        "{pushes} pushes for {bytes} bytes"
    );
}

/// Past `pipeline.max_streams` (service, host) pairs, a record's host label is `other` and
/// its host moves to structured metadata: nothing lost, streams bounded.
#[tokio::test]
async fn hosts_past_the_stream_limit_fold_into_other_with_their_name_kept() {
    // One pair, and the place of its service's `other`.
    let running = start_with(|s| s.pipeline.max_streams = 2).await;
    let mut stream = tokio::net::TcpStream::connect(running.forward)
        .await
        .expect("connects");
    for (n, host) in ["web-1", "web-2"].into_iter().enumerate() {
        let entry = Value::Array(vec![
            Value::from(1_730_103_120_u32),
            Value::Map(vec![
                (Value::from("log"), Value::from(format!("line from {host}"))),
                (Value::from("host"), Value::from(host)),
            ]),
        ]);
        let mut frame = Vec::new();
        rmpv::encode::write_value(
            &mut frame,
            &Value::Array(vec![
                Value::from("shop"),
                Value::Array(vec![entry]),
                Value::Map(vec![(Value::from("chunk"), Value::from(format!("c{n}")))]),
            ]),
        )
        .expect("encodes");
        stream.write_all(&frame).await.expect("writes");
        let mut ack = vec![0; 64];
        let _ = stream.read(&mut ack).await.expect("an ack");
        // One at a time: web-1 is the pair admitted first.
        wait_for(&running.loki, n + 1).await;
    }
    let mut received = running.loki.received();
    received.sort_by(|a, b| a.entry.line.cmp(&b.entry.line));
    let host = |r: &log_ingest::loki_receiver::Received| {
        r.labels
            .iter()
            .find(|(k, _)| k == "host")
            .map(|(_, v)| v.clone())
    };
    assert_eq!(host(&received[0]).as_deref(), Some("web-1"));
    assert_eq!(host(&received[1]).as_deref(), Some("other"));
    let metadata: Vec<(&str, &str)> = received[1]
        .entry
        .structured_metadata
        .iter()
        .map(|p| (p.name.as_str(), p.value.as_str()))
        .collect();
    assert_eq!(metadata, [("host", "web-2")]);
    let metrics = probe_metrics(running.admin).await;
    assert!(metrics.contains("mall_log_ingest_streams 1"), "{metrics}");
    assert!(
        metrics.contains("mall_log_ingest_streams_folded_total 1"),
        "{metrics}"
    );
}

/// Past `pipeline.max_open_streams`, a new stream completes the quietest one's record in
/// progress (whole as far as it came) and forgets it: memory bounded, nothing lost.
#[tokio::test]
async fn a_new_stream_past_the_open_stream_limit_completes_the_quietest_ones_record() {
    let running = start_with(|s| {
        s.pipeline.max_open_streams = 2;
        // Only the eviction can complete a record within the test's wait.
        s.pipeline.flush_after = Duration::from_secs(120);
        s.pipeline.restart_grace = Duration::from_secs(120);
    })
    .await;
    let mut stream = tokio::net::TcpStream::connect(running.forward)
        .await
        .expect("connects");
    let prefix = "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | ";
    let header = format!("{prefix}ERROR [t1] [CartService] cart 1 failed");
    let trace = format!("{prefix}java.lang.IllegalStateException: broken");
    let frame_line = format!("{prefix}\tat a.B.c(B.java:1)");
    let sends: [(&str, Vec<&str>); 3] = [
        ("web-1", vec![&header, &trace]),
        ("web-2", vec![&frame_line]),
        ("web-3", vec![&frame_line]),
    ];
    for (n, (host, lines)) in sends.into_iter().enumerate() {
        let frame = corpus::frame_of(host, &format!("c{n}"), &lines);
        stream.write_all(&frame).await.expect("writes");
        let mut ack = vec![0; 64];
        let _ = stream.read(&mut ack).await.expect("an ack");
        // Apart in time, so web-1 is the quietest when web-3 arrives.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for(&running.loki, 1).await;
    let received = running.loki.received();
    assert_eq!(received.len(), 1, "only web-1's record is complete");
    assert_eq!(
        received[0].entry.line,
        "cart 1 failed\njava.lang.IllegalStateException: broken"
    );
    let metrics = probe_metrics(running.admin).await;
    assert!(
        metrics.contains("mall_log_ingest_streams_evicted_total 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mall_log_ingest_open_streams 2\n"),
        "{metrics}"
    );
}

/// A line its source's parser cannot read is shipped as it came and counted in
/// `parse_errors` (GetPipelineStats and `/metrics`); a line it reads is not counted.
#[tokio::test]
async fn a_line_its_parser_cannot_read_is_shipped_raw_and_counted() {
    let running = start_parsing_access_logs().await;
    let access =
        r#"10.0.3.7 - - [28/Oct/2024:17:12:00 +0900] "GET /shop/en/cart HTTP/1.1" 200 5120"#;
    let garbage = "tomcat said something that is not an access log";
    send(running.forward, &[access, garbage], 2).await;
    wait_for(&running.loki, 2).await;
    let lines: Vec<String> = running
        .loki
        .received()
        .into_iter()
        .map(|r| r.entry.line)
        .collect();
    assert!(
        lines.iter().any(|l| l == garbage),
        "shipped as it came: {lines:?}"
    );
    let stats = stats(running.grpc).await;
    let forward = source(&stats, "forward");
    assert_eq!(forward.parse_errors, 1, "{stats:?}");
    let metrics = probe_metrics(running.admin).await;
    assert_eq!(
        sample(
            &metrics,
            "mall_log_ingest_parse_errors_total",
            &[("source", "forward")]
        ),
        1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn a_services_own_json_line_reaches_loki_with_its_trace_id_in_structured_metadata() {
    // Lines parsed per line: JSON when they start with `{`, as the platform's own services'
    // lines arrive from the cluster's Fluent Bit (deploy/k8s/logging).
    let running = start_with(|settings| settings.pipeline.parsers.clear()).await;
    // A line exactly as mall-telemetry writes it (its unit test pins the shape): tracing's
    // flattened JSON with the span's trace_id and span_id at the end.
    let line = r#"{"timestamp":"2026-12-03T17:14:54.463872Z","level":"WARN","message":"the partner failed; the batch waits and is sent again","reason":"HTTP 503","failures":1,"target":"member_export::deliver","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","span_id":"00f067aa0ba902b7"}"#;
    send(running.forward, &[line], 1).await;
    wait_for(&running.loki, 1).await;

    let received = running.loki.received();
    let record = &received[0];
    let labels: std::collections::BTreeMap<_, _> = record.labels.iter().cloned().collect();
    assert_eq!(labels["level"], "WARN");
    let metadata: std::collections::BTreeMap<&str, &str> = record
        .entry
        .structured_metadata
        .iter()
        .map(|p| (p.name.as_str(), p.value.as_str()))
        .collect();
    assert_eq!(
        metadata.get("trace_id"),
        Some(&"4bf92f3577b34da6a3ce929d0e0e4736"),
        "Grafana's Loki → Tempo link reads the trace id from here: {metadata:?}"
    );
    // The event's own fields go along, for LogQL's `| reason="HTTP 503"`.
    assert_eq!(metadata.get("reason"), Some(&"HTTP 503"), "{metadata:?}");
    assert_eq!(metadata.get("failures"), Some(&"1"));
    assert_eq!(metadata.get("span_id"), Some(&"00f067aa0ba902b7"));
    assert!(
        record.entry.line.contains("the partner failed"),
        "{}",
        record.entry.line
    );
    running.shutdown.cancel();
}

/// A rolling update restarts the replica while a stack trace is arriving: its first lines
/// before the SIGTERM, the rest after the restart. The trace reaches Loki whole, once, and
/// no record pushed before the restart is pushed again.
#[tokio::test]
async fn a_stack_trace_cut_by_a_graceful_restart_arrives_whole() {
    let (dir, loki) = corpus::dir_and_loki().await;
    let start = |flush_after| {
        corpus::start_app(corpus::restart_settings(
            dir.path(),
            loki.url(),
            flush_after,
        ))
    };
    let lines: Vec<&str> = CORPUS.lines().collect();
    // The first trace of at least 6 lines, and a few records after it.
    let header = (0..lines.len())
        .find(|&i| {
            lines[i..i + 7]
                .iter()
                .skip(1)
                .all(|l| !corpus::is_header(l.splitn(5, " | ").nth(4).unwrap_or_default()))
        })
        .expect("a long trace in the fixture");
    // The trace and the three records after it.
    let end = (header + 1..lines.len())
        .filter(|&i| corpus::is_header(lines[i].splitn(5, " | ").nth(4).unwrap_or_default()))
        .nth(3)
        .expect("records after the trace");
    let (before, after) = lines[..end].split_at(header + 3);
    let want = model(&lines[..end]);

    // Before the restart, quiet never completes the trace's beginning, however slowly
    // this machine gets to the SIGTERM.
    let first = start(Duration::from_secs(600)).await;
    send(first.forward, before, 10).await;
    // Every record before the trace is complete (the trace's header completes the one
    // before it); once Loki took them, only the trace's beginning is in progress.
    corpus::wait_pushed(first.admin, want.len() - 4).await;
    first.stop().await;

    let second = start(Duration::from_millis(300)).await;
    send(second.forward, after, 10).await;
    wait_for(&loki, want.len()).await;
    // Time for anything pushed twice or split to arrive too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_in_order(&loki.received(), &want);
    assert_eq!(loki.counts().2, 0, "nothing pushed twice");
    second.stop().await;
}

/// A restart in front of a backlog (Loki was down): the reader replays it slowly, and the
/// rest of a trace its sender resends at once after the restart is stored behind another
/// host's new lines. The record rebuilt from the buffer waits for its rest until lines read
/// arrived `restart_grace` after the restart, however long the replay takes by the clock.
#[tokio::test]
async fn a_stack_trace_cut_by_a_restart_in_front_of_a_backlog_arrives_whole() {
    let (dir, loki) = corpus::dir_and_loki().await;
    let settings = || {
        let mut settings =
            corpus::restart_settings(dir.path(), loki.url(), Duration::from_millis(300));
        settings.pipeline.batch_bytes = 16 * 1024;
        // Ample for the sends right after the restart on a loaded machine.
        settings.pipeline.restart_grace = Duration::from_secs(2);
        settings
    };
    loki.fail(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(600),
    );
    let first = corpus::start_app(settings()).await;
    assert!(try_send(first.forward, "web-1", "a1", &TRACE_HEAD).await);
    // A backlog behind it: about 2 MB of another host's lines.
    let mut filler = Filler::new(first.forward);
    for _ in 0..100 {
        assert!(filler.send(20_000).await);
    }
    first.stop().await;

    // Loki back, but slow: the replay (about 100 pushes) takes about 6 s, past
    // `restart_grace`.
    loki.answer_after(Duration::from_millis(60));
    loki.fail(axum::http::StatusCode::OK, Duration::ZERO);
    let second = corpus::start_app(settings()).await;
    // Right after the restart: a third host's lines, then the trace's rest (resent).
    for n in 0..5 {
        let line = format!(
            "INFO   | jvm 1    | main    | 2024/10/28 17:12:02.000 | INFO  [main] [Other] {n}"
        );
        assert!(try_send(second.forward, "web-3", &format!("b{n:031x}"), &[&line]).await);
    }
    assert!(try_send(second.forward, "web-1", "a2", &TRACE_REST).await);
    assert_the_trace_arrives_whole(&loki).await;
    second.stop().await;
}

/// Settings of the tests below: a 3 MiB buffer (two segments of 1.5 MiB), and a record
/// rebuilt after a restart waiting far longer than the tests for its sender.
fn small_buffer_settings(
    dir: &std::path::Path,
    loki: &LokiReceiver,
    flush_after: Duration,
) -> log_ingest::Settings {
    let mut settings = corpus::restart_settings(dir, loki.url(), flush_after);
    settings.forward.max_message_bytes = 64 * 1024;
    settings.server.max_message_bytes = 256 * 1024;
    settings.buffer.segment_bytes = 1536 * 1024;
    settings.buffer.max_bytes = 3 << 20;
    settings.pipeline.batch_bytes = 16 * 1024;
    settings.pipeline.restart_grace = Duration::from_secs(600);
    settings
}

/// A log-ingest with [`small_buffer_settings`], restarted after the beginning of a stack
/// trace from `web-1` ([`TRACE_HEAD`]) was stored (left in progress by the first run):
/// its buffer's directory, its Loki, and the second run.
async fn restarted_with_a_trace_head() -> (tempfile::TempDir, LokiReceiver, corpus::Started) {
    let (dir, loki) = corpus::dir_and_loki().await;
    let settings = |flush_after| small_buffer_settings(dir.path(), &loki, flush_after);
    let first = corpus::start_app(settings(Duration::from_secs(600))).await;
    assert!(try_send(first.forward, "web-1", "a1", &TRACE_HEAD).await);
    first.stop().await;
    // A quiet of 3 s: lines stored and not read yet arrived far less long ago (caught up),
    // however loaded the machine.
    let second = corpus::start_app(settings(Duration::from_secs(3))).await;
    (dir, loki, second)
}

/// After a restart, caught up, a record rebuilt from the buffer whose sender stays quiet
/// waits for its rest only until the buffer refuses an append while the record holds back
/// more than half of it: another host's lines, more than the buffer holds, are stored
/// (after a brief refusal), rather than refused until `restart_grace` ends.
#[tokio::test]
async fn a_rebuilt_record_whose_sender_stays_quiet_does_not_keep_the_buffer_full() {
    let (_dir, loki, second) = restarted_with_a_trace_head().await;
    let mut filler = Filler::new(second.forward);
    // About 4 MB: past the buffer's 3 MiB unless what Loki took is let go. A line refused
    // is sent again, as its sender would.
    for n in 0..200 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !filler.send(20_000).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "filler line {n} refused for 30 s: the rebuilt record keeps the buffer full"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The trace's beginning went as it was, once the buffer refused.
    let head = TRACE_WHOLE.lines().take(3).collect::<Vec<_>>().join("\n");
    mall_test_support::wait_until("the head is in Loki", Duration::from_secs(30), || async {
        (!lines_of(&loki, "web-1").is_empty()).then_some(())
    })
    .await;
    assert_eq!(lines_of(&loki, "web-1"), [head]);
    second.stop().await;
}

/// After a restart, caught up, more than half the buffer arriving behind a rebuilt record
/// does not end its wait while the buffer takes it all: its sender's resend, after that,
/// completes the trace whole.
#[tokio::test]
async fn a_rebuilt_record_waits_past_half_the_buffer_while_nothing_is_refused() {
    let (_dir, loki, second) = restarted_with_a_trace_head().await;
    let mut filler = Filler::new(second.forward);
    // About 2 MB: past half of the 3 MiB (the acknowledgement stays at the trace's head),
    // short of all of it.
    for n in 0..100 {
        assert!(filler.send(20_000).await, "filler line {n} refused");
    }
    // Quiet (`flush_after`) past half, caught up: the record keeps waiting.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    assert!(lines_of(&loki, "web-1").is_empty(), "the head still waits");
    assert!(try_send(second.forward, "web-1", "a2", &TRACE_REST).await);
    assert_the_trace_arrives_whole(&loki).await;
    second.stop().await;
}

/// The wrapper's own lines inside a stack trace (it pings a slow JVM while the JVM writes
/// one), twice the same in one second: the trace arrives whole and each wrapper line as an
/// entry of its own, also across a graceful restart while they are held behind the trace
/// (host 1, whose next wrapper line after the restart does not end the wait for the
/// trace's rest), or after the JVM died and the new JVM's first line joined the wrapper's
/// line (host 2). Records rebuilt from the buffer take the same places, so nothing is
/// pushed twice.
#[tokio::test]
async fn the_wrappers_own_lines_inside_a_trace_leave_it_whole_across_a_restart() {
    const P: &str = "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | ";
    const W: &str = "STATUS | wrapper  | 2024/10/28 17:12:31 | ";
    let (dir, loki) = corpus::dir_and_loki().await;
    let settings = |flush_after| {
        let mut settings = corpus::restart_settings(dir.path(), loki.url(), flush_after);
        // The records rebuilt after the restart wait for their hosts' next chunks however
        // slowly this machine gets to send them.
        settings.pipeline.restart_grace = Duration::from_secs(30);
        settings
    };
    let ping = format!("{W}Pinging the JVM took 12 seconds to respond.");
    let trace = [
        format!("{P}INFO  [main] [L] before"),
        format!("{P}ERROR [hybrisHTTP12] [DefaultCartService] cart 8812 failed"),
        format!("{P}java.lang.IllegalStateException: broken"),
        format!("{P}\tat a.B.c(B.java:1)"),
        ping.clone(),
        format!("{P}\tat a.B.d(B.java:2)"),
        ping,
        format!("{P}\t... 3 more"),
    ];
    let mut one: Vec<String> = trace.to_vec();
    one.push(format!("{P}INFO  [main] [L] after"));
    let mut two: Vec<String> = trace.to_vec();
    two.extend([
        "ERROR  | wrapper  | 2024/10/28 17:12:39 | JVM exited unexpectedly.".to_owned(),
        "INFO   | jvm 2    | main    | 2024/10/28 17:12:40.000 | WrapperManager: Initializing..."
            .to_owned(),
        "INFO   | jvm 2    | main    | 2024/10/28 17:12:41.000 | INFO  [main] [L] after".to_owned(),
    ]);
    let one: Vec<&str> = one.iter().map(String::as_str).collect();
    let two: Vec<&str> = two.iter().map(String::as_str).collect();

    // Host 1: one chunk, both wrapper lines in the same batch, held behind the trace at
    // shutdown. Host 2: the trace and its wrapper lines complete (the new JVM's first line
    // ended it), the wrapper's `JVM exited` with that line in progress at shutdown.
    let first = corpus::start_app(settings(Duration::from_secs(600))).await;
    corpus::send_as(first.forward, "hybris-1", &one[..7], 7).await;
    corpus::send_as(first.forward, "hybris-2", &two[..10], 10).await;
    // `before` of each, and host 2's trace and its two wrapper lines.
    corpus::wait_pushed(first.admin, 2 + 3).await;
    first.stop().await;
    assert_eq!(loki.received().len(), 5, "nothing else before the restart");

    let second = corpus::start_app(settings(Duration::from_millis(300))).await;
    // Host 1 resumes with a wrapper line alone: held behind the rebuilt trace, it is not
    // the trace's sender resuming, so the trace waits on past `flush_after` for its rest.
    let late = format!("{W}Pinging the JVM took 13 seconds to respond.");
    corpus::send_as(second.forward, "hybris-1", &[&late], 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    corpus::send_as(second.forward, "hybris-1", &one[7..], 2).await;
    corpus::send_as(second.forward, "hybris-2", &two[10..], 2).await;
    wait_for(&loki, 5 + 7).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(loki.counts().2, 0, "nothing pushed twice");
    let received = loki.received();
    for host in ["hybris-1", "hybris-2"] {
        let pings: Vec<_> = received
            .iter()
            .filter(|r| r.labels.contains(&("host".to_owned(), host.to_owned())))
            .filter(|r| r.entry.line.starts_with("Pinging the JVM took 12"))
            .map(|r| r.entry.timestamp.expect("a time"))
            .collect();
        assert_eq!(
            pings.len(),
            2,
            "{host}: both, the same line in the same second"
        );
        // Both kept by Loki: the same second, told apart below the millisecond.
        assert_eq!(pings[0].seconds, pings[1].seconds);
        assert_ne!(pings[0], pings[1]);
    }
    let mut got = levels_and_lines(&received);
    got.sort();
    let trace = "cart 8812 failed\njava.lang.IllegalStateException: broken\n\tat a.B.c(B.java:1)\n\
                 \tat a.B.d(B.java:2)\n\t... 3 more";
    let ping = "Pinging the JVM took 12 seconds to respond.";
    let mut want = [
        ("INFO", "before"),
        ("ERROR", trace),
        ("INFO", ping),
        ("INFO", ping),
        ("INFO", "Pinging the JVM took 13 seconds to respond."),
        ("INFO", "after"),
        ("INFO", "before"),
        ("ERROR", trace),
        ("INFO", ping),
        ("INFO", ping),
        (
            "ERROR",
            "JVM exited unexpectedly.\nWrapperManager: Initializing...",
        ),
        ("INFO", "after"),
    ]
    .map(|(level, line)| (level.to_owned(), line.to_owned()));
    want.sort();
    assert_eq!(got, want);
    second.stop().await;
}

/// The wrapper pinging a JVM stalled in the middle of a trace, more often than
/// `flush_after`: the pings are held behind the trace (a frame after one joins it), and the
/// trace is complete after `flush_after` without a line of its own, not held for as long
/// as the pings go on.
#[tokio::test]
async fn wrapper_lines_behind_a_trace_do_not_keep_it_from_going_quiet() {
    const P: &str = "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | ";
    let flush_after = Duration::from_millis(1_500);
    let running = start_with(|s| s.pipeline.flush_after = flush_after).await;
    let ping = |n: usize| {
        format!(
            "STATUS | wrapper  | 2024/10/28 17:12:31 | Pinging the JVM took {n} seconds to respond."
        )
    };
    let trace = [
        format!("{P}ERROR [hybrisHTTP12] [DefaultCartService] cart 8812 failed"),
        format!("{P}java.lang.IllegalStateException: broken"),
        format!("{P}\tat a.B.c(B.java:1)"),
        ping(0),
        format!("{P}\tat a.B.d(B.java:2)"),
    ];
    let trace: Vec<&str> = trace.iter().map(String::as_str).collect();
    send(running.forward, &trace, 1).await;
    let has_trace = || {
        running
            .loki
            .received()
            .iter()
            .any(|r| r.entry.line.starts_with("cart 8812 failed"))
    };
    let started = std::time::Instant::now();
    let mut pings = 0;
    while !has_trace() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the trace is still held after {pings} pings"
        );
        pings += 1;
        send(running.forward, &[&ping(pings)], 1).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The trace is whole; the pings are records of their own.
    let (errors, others): (Vec<_>, Vec<_>) = levels_and_lines(&running.loki.received())
        .into_iter()
        .partition(|(level, _)| level == "ERROR");
    assert_eq!(
        errors,
        [(
            "ERROR".to_owned(),
            "cart 8812 failed\njava.lang.IllegalStateException: broken\n\tat a.B.c(B.java:1)\n\
             \tat a.B.d(B.java:2)"
                .to_owned()
        )]
    );
    assert!(
        others
            .iter()
            .all(|(level, line)| level == "INFO" && line.starts_with("Pinging")),
        "{others:?}"
    );
}

/// Two hosts; a rolling update while one's stack trace is arriving and the other's records
/// go on after it began. After the restart (which reads the buffer again from the batch
/// where the trace began) the trace is whole, and none of the other host's records pushed
/// before the restart is pushed again: the acknowledgement's note skips them in every batch
/// read again, not only the first.
#[tokio::test]
async fn after_a_graceful_restart_no_record_is_pushed_twice() {
    let (dir, loki) = corpus::dir_and_loki().await;
    let settings = |flush_after| corpus::restart_settings(dir.path(), loki.url(), flush_after);
    let lines: Vec<&str> = CORPUS.lines().collect();
    let text = |i: usize| lines[i].splitn(5, " | ").nth(4).unwrap_or_default();
    // Host 1: a trace of at least 6 lines from line 100 on, and the header after it.
    let header = (100..lines.len())
        .find(|&i| {
            corpus::is_header(text(i)) && (i + 1..i + 7).all(|j| !corpus::is_header(text(j)))
        })
        .expect("a long trace in the fixture");
    let next = (header + 1..lines.len())
        .find(|&i| corpus::is_header(text(i)))
        .expect("a record after it");
    let one = &lines[header..=next];
    // Host 2: the first 60 lines, whole records.
    let end = (60..lines.len())
        .find(|&i| corpus::is_header(text(i)))
        .expect("a header");
    let two = &lines[..end];
    let mut want: Vec<(String, String)> = model(one);
    want.extend(model(two));
    want.sort();

    let first = corpus::start_app(settings(Duration::from_secs(600))).await;
    corpus::send_as(first.forward, "hybris-1", &one[..3], 10).await;
    corpus::send_as(first.forward, "hybris-2", two, 10).await;
    // Host 2's records but its last are complete (pushed once they are).
    corpus::wait_pushed(first.admin, model(two).len() - 1).await;
    first.stop().await;

    let second = corpus::start_app(settings(Duration::from_millis(300))).await;
    corpus::send_as(second.forward, "hybris-1", &one[3..], 10).await;
    wait_for(&loki, want.len()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(loki.counts().2, 0, "nothing pushed twice");
    let mut got = levels_and_lines(&loki.received());
    got.sort();
    assert_eq!(got, want);
    second.stop().await;
}

/// A SIGTERM while a push is being retried (Loki briefly refusing) lets it finish, for a
/// few seconds, instead of cutting it off: its records reach Loki before the process ends.
#[tokio::test]
async fn a_push_under_way_at_shutdown_is_let_finish() {
    let (dir, loki) = corpus::dir_and_loki().await;
    let mut settings = corpus::corpus_settings(dir.path(), loki.url());
    // Everything in one push, when the input pauses.
    settings.pipeline.batch_wait = Duration::from_secs(30);
    let app = corpus::start_app(settings).await;
    loki.fail(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_millis(1500),
    );
    let lines: Vec<&str> = CORPUS.lines().take(40).collect();
    let want = model(&lines);
    send(app.forward, &lines, 10).await;
    mall_test_support::wait_until("a push failing", Duration::from_secs(10), || async {
        (stats(app.grpc).await.loki_failed_pushes > 0).then_some(())
    })
    .await;
    app.stop().await;
    assert_eq!(loki.received().len(), want.len(), "pushed before the end");
}

/// A shutdown while both pushes are held up by a Loki outage and more records wait for a
/// push slot: the drain starts at once (the pushes get their few seconds), not after the
/// drain timeout.
#[tokio::test]
async fn a_shutdown_waiting_for_a_push_slot_during_an_outage_is_prompt() {
    let (dir, loki) = corpus::dir_and_loki().await;
    let mut settings = corpus::corpus_settings(dir.path(), loki.url());
    settings.server.drain_timeout = Duration::from_secs(60);
    let app = corpus::start_app(settings).await;
    loki.fail(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(600),
    );
    let lines: Vec<&str> = CORPUS.lines().take(60).collect();
    // Three pushes due, 400 ms apart (batch_wait is 100 ms): two in flight, one waiting.
    // Each part one chunk, so each part's records are read together.
    for part in lines.chunks(20) {
        send(app.forward, part, 20).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    // The pushes failing and as many records waiting as the model counts in the first two
    // parts: the pause after the first cuts the trace across the two into two records (one
    // more), and the second part's last record is still in progress (one fewer). By then
    // the second part's records wait for a slot, and the loop waiting reads no more.
    let two_parts = model(&lines[..40]).len();
    mall_test_support::wait_until("pushes failing", Duration::from_secs(10), || async {
        let stats = stats(app.grpc).await;
        let waiting = usize::try_from(stats.buffered_records).unwrap_or_default();
        (stats.loki_failed_pushes >= 2 && waiting >= two_parts).then_some(())
    })
    .await;
    let started = std::time::Instant::now();
    app.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "stopped after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn when_the_input_pauses_the_last_records_go_at_once_not_after_batch_wait() {
    let running = start_with(|settings| {
        settings.pipeline.batch_wait = Duration::from_secs(120);
    })
    .await;
    let lines: Vec<&str> = CORPUS.lines().take(40).collect();
    let expected = model(&lines).len();
    send(running.forward, &lines, 10).await;
    // `flush_after` (300 ms) completes the last record; nothing else is buffered and no
    // push is sending, so waiting for `batch_wait` (2 minutes) would only add latency.
    mall_test_support::wait_until(
        "Loki has every record, long before batch_wait",
        Duration::from_secs(20),
        || async { (running.loki.received().len() >= expected).then_some(()) },
    )
    .await;
    running.shutdown.cancel();
}

#[tokio::test]
async fn one_quiet_stream_among_busy_ones_does_not_push_early() {
    let running = start_with(|settings| {
        settings.pipeline.batch_wait = Duration::from_secs(120);
        // Room for a slow acknowledgement on a loaded machine: B's gaps stay far below it.
        settings.pipeline.flush_after = Duration::from_secs(1);
    })
    .await;
    // Stream A (`hybris.wrapper`, host hybris-1) sends its records and goes quiet.
    let lines: Vec<&str> = CORPUS.lines().take(20).collect();
    send(running.forward, &lines, 10).await;
    // Stream B (another tag) keeps a record in progress: a header every 100 ms for 2.5 s,
    // so A's quiet (after 1 s) is not a pause of the input and nothing is pushed before
    // `batch_wait`.
    let header = CORPUS.lines().next().expect("a first line");
    let mut busy = tokio::net::TcpStream::connect(running.forward)
        .await
        .expect("connects");
    for n in 0..25 {
        let id = format!("{n:032x}");
        // Each line differs: a chunk with the same records would be taken for one sent again.
        let line = format!("{header} #{n}");
        let entry = Value::Array(vec![
            Value::from(1_730_103_120_u32),
            Value::Map(vec![
                (Value::from("log"), Value::from(line.as_str())),
                (Value::from("host"), Value::from("hybris-1")),
            ]),
        ]);
        let mut frame = Vec::new();
        rmpv::encode::write_value(
            &mut frame,
            &Value::Array(vec![
                Value::from("hybris.busy"),
                Value::Array(vec![entry]),
                Value::Map(vec![(Value::from("chunk"), Value::from(id.as_str()))]),
            ]),
        )
        .expect("encodes");
        busy.write_all(&frame).await.expect("writes");
        let mut ack = vec![0; 128];
        tokio::time::timeout(Duration::from_secs(10), busy.read(&mut ack))
            .await
            .expect("an ack in time")
            .expect("reads");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        running.loki.received().is_empty(),
        "pushed while stream B still had a record in progress"
    );
    // Now B pauses too: the whole input is quiet, and everything goes at once.
    let expected = model(&lines).len() + 25;
    mall_test_support::wait_until(
        "Loki has both streams' records, long before batch_wait",
        Duration::from_secs(20),
        || async { (running.loki.received().len() >= expected).then_some(()) },
    )
    .await;
    running.shutdown.cancel();
}

/// A buffer whose disk fails refuses every append until the process restarts: the process
/// stops by itself (Kubernetes restarts it, and reopening rescans the buffer) instead of
/// serving on with green probes and refusing every sender.
#[tokio::test]
async fn a_buffer_that_cannot_write_stops_the_process() {
    let (dir, loki) = corpus::dir_and_loki().await;
    let mut settings = corpus::corpus_settings(dir.path(), loki.url());
    settings.forward.max_message_bytes = 64 * 1024;
    settings.server.max_message_bytes = 1 << 20;
    settings.buffer.segment_bytes = 2 << 20;
    let app = corpus::start_app(settings).await;
    // The buffer's second segment (the first is number 1) cannot be created: a directory
    // stands where it goes, so the write that fills the first one fails.
    std::fs::create_dir(dir.path().join(format!("{:020}.seg", 2))).expect("mkdir");
    let mut stream = tokio::net::TcpStream::connect(app.forward)
        .await
        .expect("connects");
    let mut acknowledged = 0;
    for n in 0..100 {
        // Each chunk its own text: one repeating another's is taken as sent again.
        let line = format!(
            "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | INFO  [main] [X] {n} {}",
            "x".repeat(1_000)
        );
        let frame = corpus::frame_of("host-1", &format!("{n:032x}"), &vec![line.as_str(); 40]);
        if stream.write_all(&frame).await.is_err() {
            break;
        }
        let mut ack = vec![0; 128];
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut ack)).await {
            Ok(Ok(read)) if read > 0 => acknowledged += 1,
            _ => break,
        }
    }
    assert!(
        (1..60).contains(&acknowledged),
        "the first segment's worth acknowledged, then none: {acknowledged}"
    );
    let ended = tokio::time::timeout(Duration::from_secs(10), app.running)
        .await
        .expect("stopped by itself")
        .expect("joins");
    // After its drain, with an error: the process exits with a failure.
    let error = ended.expect_err("a failure").to_string();
    assert!(error.contains("stopped itself"), "{error}");
}
