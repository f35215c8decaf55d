//! TestParse over gRPC on a corpus of the legacy format (`tests/fixtures/hybris-wrapper.log`,
//! written by `../shared/bench/gen_hybris_log.py --lines 900 --trace-pct 8 --prefix-stack
//! --seed 7`; its counts are in the `.stats.json` beside it).

use std::time::Duration;

use log_ingest::App;
use mall_proto::logs::v1::{TestParseRequest, log_ingest_service_client::LogIngestServiceClient};
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt as _;

mod corpus;

const CORPUS: &str = include_str!("fixtures/hybris-wrapper.log");
const STATS: &str = include_str!("fixtures/hybris-wrapper.log.stats.json");

async fn client() -> (
    LogIngestServiceClient<Channel>,
    tokio_util::sync::CancellationToken,
    tempfile::TempDir,
) {
    mall_test_support::init_logging();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut settings = corpus::local_settings(dir.path());
    // Another Java layout: `2024-10-28T17:12:00.040+09:00 ERROR [thread] Logger - text`.
    settings
        .parsing
        .parsers
        .push(log_ingest::formats::RegexParserSettings {
            name: "pipe-java".to_owned(),
            regex: r"^(?P<time>\S+) (?P<level>[A-Z]+) +\[(?P<thread>[^\]]+)\] (?P<logger>\S+) - (?P<message>.*)$"
                .to_owned(),
            time_format: String::new(),
        });
    let app = App::build(settings).await.expect("app builds");
    let grpc = app.grpc_addr();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(app.run_until(shutdown.clone().cancelled_owned()));
    let channel = Channel::from_shared(format!("http://{grpc}"))
        .expect("valid uri")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connects");
    (LogIngestServiceClient::new(channel), shutdown, dir)
}

fn stat(name: &str) -> usize {
    let stats: serde_json::Value = serde_json::from_str(STATS).expect("stats are JSON");
    usize::try_from(stats[name].as_u64().expect("a count")).expect("fits")
}

#[tokio::test]
async fn the_legacy_corpus_is_one_record_per_entry_with_every_stack_trace_whole() {
    let (mut client, _shutdown, _dir) = client().await;
    let lines: Vec<String> = CORPUS.lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), stat("lines"));
    for parser in ["hybris-wrapper", ""] {
        let records = client
            .test_parse(TestParseRequest {
                parser: parser.to_owned(),
                lines: lines.clone(),
            })
            .await
            .expect("parses")
            .into_inner()
            .records;
        // One record per entry: each ERROR with a trace is one record with it.
        assert_eq!(records.len(), stat("entries"), "parser {parser:?}");
        assert_eq!(
            records.iter().map(|r| r.line_count).sum::<i32>(),
            i32::try_from(lines.len()).expect("fits")
        );
        let traces: Vec<_> = records
            .iter()
            .filter(|r| !r.stack_trace.is_empty())
            .collect();
        assert_eq!(traces.len(), stat("traces"), "parser {parser:?}");
        for record in &records {
            let first = record.first_line as usize;
            let count = record.line_count as usize;
            // Every line after the header is in the stack trace, without the wrapper's
            // prefix, in order.
            let expected: Vec<&str> = lines[first + 1..first + count]
                .iter()
                .map(|l| l.splitn(5, " | ").nth(4).expect("wrapper prefix"))
                .collect();
            let got: Vec<&str> = if record.stack_trace.is_empty() {
                Vec::new()
            } else {
                record.stack_trace.split('\n').collect()
            };
            let masked: Vec<String> = expected.iter().map(|l| mask_emails(l)).collect();
            assert_eq!(got, masked, "record at line {first}");
            assert!(!record.level.is_empty());
            assert!(!record.thread.is_empty() && !record.logger.is_empty());
            assert!(
                !record.message.contains("@example.com"),
                "masked: {}",
                record.message
            );
            assert!(
                !record.stack_trace.contains("@example.com"),
                "masked: {}",
                record.stack_trace
            );
        }
        // The first line, 2024/10/28 17:12:00.041 in Seoul, is 08:12:00.041 UTC.
        let time = records[0].time.expect("a time");
        assert_eq!((time.seconds, time.nanos), (1_730_103_120, 41_000_000));
        assert_eq!(records[0].first_line, 0);
    }
}

/// What the default e-mail pattern leaves of `line` (the corpus's addresses are
/// `customerN@example.com`).
fn mask_emails(line: &str) -> String {
    let mut out = String::new();
    for (i, word) in line.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        if word.contains("@example.com") {
            out.push_str(&word.replace(
                word.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()),
                "<email>",
            ));
        } else {
            out.push_str(word);
        }
    }
    out
}

#[tokio::test]
async fn bad_requests_name_every_problem() {
    let (mut client, _shutdown, _dir) = client().await;
    let mut lines = vec!["x".to_owned(); 1_000];
    lines[3] = "y".repeat(64 * 1024 + 1);
    // Ingestion splits at line breaks; TestParse takes lines already split.
    lines[5] = "ERROR [main] [X] failed\n\tat x.Y.z(Y.java:1)".to_owned();
    let status = client
        .test_parse(TestParseRequest {
            parser: "nginx".to_owned(),
            lines,
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    let details = status.get_error_details();
    let fields: Vec<String> = details
        .bad_request()
        .expect("field violations")
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert_eq!(fields, ["parser", "lines[3]", "lines[5]"]);
    // Over 1,000 lines, the request is refused before it is decoded (its lines counted in
    // its bytes): that alone is named.
    let status = client
        .test_parse(TestParseRequest {
            parser: "nginx".to_owned(),
            lines: vec![String::new(); 1_001],
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    let violations = status
        .get_error_details()
        .bad_request()
        .expect("field violations")
        .field_violations
        .clone();
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert_eq!(violations[0].field, "lines");
    assert_eq!(
        violations[0].description,
        "at most 1000 lines per request, not 1001"
    );
    // An empty request is no error: no lines, no records.
    let records = client
        .test_parse(TestParseRequest::default())
        .await
        .expect("empty is fine")
        .into_inner()
        .records;
    assert!(records.is_empty());
}

#[tokio::test]
async fn a_tail_with_bad_filters_is_refused_with_field_violations() {
    let (mut client, _shutdown, _dir) = client().await;
    // Not one of the contract's six names: an alias records are read with is refused too.
    for min_level in ["VERBOSE", "STATUS", "SEVERE"] {
        let status = client
            .tail_logs(mall_proto::logs::v1::TailLogsRequest {
                min_level: min_level.to_owned(),
                contains: "x".repeat(1_025),
                ..Default::default()
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument);
        let fields: Vec<String> = status
            .get_error_details()
            .bad_request()
            .expect("field violations")
            .field_violations
            .iter()
            .map(|v| v.field.clone())
            .collect();
        assert_eq!(fields, ["min_level", "contains"], "{min_level}");
    }
}

#[tokio::test]
async fn access_logs_logfmt_and_a_configured_expression_with_its_traces_whole() {
    let (mut client, _shutdown, _dir) = client().await;
    let mut parse = async |parser: &str, lines: &[&str]| {
        client
            .test_parse(TestParseRequest {
                parser: parser.to_owned(),
                lines: lines.iter().map(|l| (*l).to_owned()).collect(),
            })
            .await
            .expect("parsed")
            .into_inner()
            .records
    };
    let access = parse(
        "access-log",
        &[r#"10.0.3.7 - - [28/Oct/2024:17:12:00 +0900] "GET /cart?mail=kim@example.com HTTP/1.1" 502 12 "-" "curl/8" 41"#],
    )
    .await;
    assert_eq!(access.len(), 1);
    assert_eq!(access[0].level, "ERROR");
    assert_eq!(access[0].fields["status"], "502");
    assert_eq!(access[0].fields["duration"], "41");
    // Masked like any record, in the message and in the fields.
    assert_eq!(access[0].fields["path"], "/cart?mail=<email>");
    assert!(!access[0].message.contains("kim@"), "{}", access[0].message);

    let logfmt = parse("logfmt", &["level=error msg=\"pay failed\" order=9"]).await;
    assert_eq!(
        (logfmt[0].level.as_str(), logfmt[0].message.as_str()),
        ("ERROR", "pay failed")
    );
    assert_eq!(logfmt[0].fields["order"], "9");

    let java = parse(
        "pipe-java",
        &[
            "2024-10-28T17:12:00.040+09:00 ERROR [http-12] com.mall.Cart - cart 8812 failed",
            "java.lang.IllegalStateException: broken",
            "\tat com.mall.Cart.add(Cart.java:42)",
            "2024-10-28T17:12:01.000+09:00 INFO  [http-3] com.mall.Cart - fine",
        ],
    )
    .await;
    assert_eq!(java.len(), 2);
    assert_eq!(java[0].logger, "com.mall.Cart");
    assert_eq!(java[0].thread, "http-12");
    assert_eq!(java[0].message, "cart 8812 failed");
    assert_eq!(
        java[0].stack_trace,
        "java.lang.IllegalStateException: broken\n\tat com.mall.Cart.add(Cart.java:42)"
    );
    assert_eq!(java[0].time.expect("a time").seconds, 1_730_103_120);
    assert_eq!(java[1].level, "INFO");
    assert!(java.iter().all(|r| !r.parse_error));
    // A line the expression does not match (not stack trace) joins the record before it,
    // which says it was not parsed, as parse_errors_total counts it.
    let unmatched = parse(
        "pipe-java",
        &[
            "2024-10-28T17:12:00.040+09:00 ERROR [http-12] com.mall.Cart - cart 8812 failed",
            "28/10/2024 17:12:01 a line of another layout",
        ],
    )
    .await;
    assert_eq!(unmatched.len(), 1);
    assert!(unmatched[0].parse_error);
    // So does a wrapper format without the source column, which is not read; its console's
    // default format is.
    let timed = parse(
        "hybris-wrapper",
        &[
            "INFO   | 2024/10/28 17:12:00 | INFO  [main] [X] started",
            "INFO   | 2024/10/28 17:12:00 | more",
        ],
    )
    .await;
    assert_eq!(timed.len(), 1);
    assert!(timed[0].parse_error);
    let console = parse(
        "hybris-wrapper",
        &["jvm 1    | INFO  [main] [X] started", "jvm 1    | more"],
    )
    .await;
    assert_eq!(console.len(), 1);
    assert!(!console[0].parse_error);
    assert_eq!(
        (console[0].logger.as_str(), console[0].message.as_str()),
        ("X", "started\nmore")
    );
}
