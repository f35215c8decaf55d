//! What decoding a forward message, an OTLP export or a TestParse request takes in memory, measured by the
//! allocator: a few kilobytes of gzip or megabytes of one- and two-byte values (nils where
//! a time, an option or a record without a line field is expected; empty log records or
//! lines) must
//! not become gigabytes of decoded values (each tens to hundreds of bytes decoded).
//!
//! One test in this binary, so the allocator's peak is this test's alone (`peak_alloc`
//! counts the whole process).

use std::io::Write as _;

use log_ingest::forward::{self, Frame, Garbage};
use peak_alloc::PeakAlloc;

#[global_allocator]
static ALLOCATOR: PeakAlloc = PeakAlloc;

/// What `f` allocated at its peak beyond what was allocated before it, in bytes.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOCATOR.current_usage();
    ALLOCATOR.reset_peak_usage();
    let out = f();
    (out, ALLOCATOR.peak_usage().saturating_sub(before))
}

/// An array of `n` nils (array32).
fn nils(n: u32) -> Vec<u8> {
    let mut out = vec![0xdd];
    out.extend_from_slice(&n.to_be_bytes());
    out.resize(5 + n as usize, 0xc0);
    out
}

/// A map of `n` pairs whose keys are distinct short texts and values nil (map32).
fn text_keys(n: u32) -> Vec<u8> {
    let mut out = vec![0xdf];
    out.extend_from_slice(&n.to_be_bytes());
    for i in 0..n {
        let key = format!("{i:x}");
        rmp::encode::write_str(&mut out, &key).expect("a Vec takes it");
        out.push(0xc0);
    }
    out
}

/// `[tag, <entries as bin>, options]`: PackedForward, gzip when `gzip`.
fn packed(entries: &[u8], options: &[u8], gzip: bool) -> Vec<u8> {
    let entries = if gzip {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(entries).expect("in memory");
        encoder.finish().expect("in memory")
    } else {
        entries.to_vec()
    };
    let mut out = vec![0x93];
    rmp::encode::write_str(&mut out, "hybris.wrapper").expect("a Vec takes it");
    rmp::encode::write_bin(&mut out, &entries).expect("a Vec takes it");
    out.extend_from_slice(options);
    out
}

/// `{"compressed": "gzip"}`, or no options (nil).
fn gzip_options(gzip: bool) -> Vec<u8> {
    if !gzip {
        return vec![0xc0];
    }
    let mut out = vec![0x81];
    rmp::encode::write_str(&mut out, "compressed").expect("a Vec takes it");
    rmp::encode::write_str(&mut out, "gzip").expect("a Vec takes it");
    out
}

/// An entry `[time, record]` of raw parts.
fn entry(time: &[u8], record: &[u8]) -> Vec<u8> {
    [&[0x92][..], time, record].concat()
}

/// EventTime (fixext8), 2024-10-28 08:12:00 UTC.
const EVENT_TIME: [u8; 10] = [0xd7, 0x00, 0x67, 0x1f, 0x47, 0x00, 0, 0, 0, 0];

#[test]
fn small_inputs_of_tiny_values_never_decode_to_gigabytes() {
    forward_messages();
    otlp_exports();
    test_parse_requests();
}

fn forward_messages() {
    const MAX_INFLATED: usize = 32 << 20;
    const NILS: u32 = 4_000_000;
    // Decoded as values, 4,000,000 nils take 4,000,000 × size_of::<rmpv::Value>() (32 to
    // 48 bytes) and more while their Vec grows: 128 MB at least. Read where they lie, the
    // most any case takes is the inflated entries (4 MB, more while the Vec they inflate
    // into grows) and the room made for their events (1.4 times them).
    let bound = 4 * NILS as usize;

    // A time that is an array of nils, in a gzip entry stream: 4 MB inflated from a
    // few kilobytes.
    let frame = packed(&entry(&nils(NILS), &[0x80]), &gzip_options(true), true);
    assert!(frame.len() < 64 * 1024, "{} bytes sent", frame.len());
    let (decoded, peak) = peak_of(|| forward::decode(&frame, MAX_INFLATED));
    assert!(
        matches!(decoded, Err(Garbage::NotForward(_))),
        "refused as no time: {decoded:?}"
    );
    assert!(peak < bound, "a time of nils took {peak} bytes");

    // The same time as `[time, metadata]`, metadata a map of nils: the time is read, the
    // metadata never decoded; Message mode, not compressed.
    let mut metadata = vec![0xdf];
    metadata.extend_from_slice(&(NILS / 2).to_be_bytes());
    metadata.resize(5 + NILS as usize, 0xc0);
    let mut frame = vec![0x93];
    rmp::encode::write_str(&mut frame, "hybris.wrapper").expect("a Vec takes it");
    frame.extend_from_slice(&[&[0x92][..], &EVENT_TIME, &metadata].concat());
    frame.extend_from_slice(b"\x81\xa3log\xa2ok");
    let (decoded, peak) = peak_of(|| forward::decode(&frame, MAX_INFLATED));
    let Ok(Frame::Message(message)) = decoded else {
        panic!("a message: {decoded:?}")
    };
    assert_eq!(message.events.len(), 1);
    assert!(peak < bound, "metadata of nils took {peak} bytes");

    // Options of a PackedForward message, 2,000,000 pairs of nils before `compressed`:
    // looked up where they lie.
    let mut options = vec![0xdf];
    options.extend_from_slice(&(NILS / 2 + 1).to_be_bytes());
    options.resize(5 + NILS as usize, 0xc0);
    rmp::encode::write_str(&mut options, "compressed").expect("a Vec takes it");
    rmp::encode::write_str(&mut options, "text").expect("a Vec takes it");
    let frame = packed(&entry(&EVENT_TIME, b"\x81\xa3log\xa2ok"), &options, false);
    let (decoded, peak) = peak_of(|| forward::decode(&frame, MAX_INFLATED));
    assert!(
        matches!(&decoded, Ok(Frame::Message(m)) if m.events.len() == 1),
        "a message: {decoded:?}"
    );
    assert!(peak < bound, "options of nils took {peak} bytes");

    // `fluent_signal` whose value is an array of nils: refused undecoded.
    let mut options = vec![0x81];
    rmp::encode::write_str(&mut options, "fluent_signal").expect("a Vec takes it");
    options.extend_from_slice(&nils(NILS));
    let frame = packed(&entry(&EVENT_TIME, b"\x81\xa3log\xa2ok"), &options, false);
    let (decoded, peak) = peak_of(|| forward::decode(&frame, MAX_INFLATED));
    assert!(
        matches!(decoded, Err(Garbage::NotForward(_))),
        "refused: {decoded:?}"
    );
    assert!(peak < bound, "a signal of nils took {peak} bytes");

    // Records without a `log` field are stored as sent, then shown as JSON: one of
    // 2,000,000 nil pairs (in a gzip entry stream, so it is accepted and stored), one of
    // 400,000 distinct text keys. Shown up to the record's cap, never decoded whole.
    let mut nil_pairs = vec![0xdf];
    nil_pairs.extend_from_slice(&(NILS / 2).to_be_bytes());
    nil_pairs.resize(5 + NILS as usize, 0xc0);
    let many_keys = text_keys(400_000);
    let entries = [
        entry(&EVENT_TIME, &nil_pairs),
        entry(&EVENT_TIME, &many_keys),
    ]
    .concat();
    let frame = packed(&entries, &gzip_options(true), true);
    assert!(frame.len() < 4 << 20, "{} bytes sent", frame.len());
    let Ok(Frame::Message(message)) = forward::decode(&frame, MAX_INFLATED) else {
        panic!("records that are maps are stored as they are")
    };
    let max_record_bytes = 192 * 1024;
    let mut shown = Vec::new();
    for event in &message.events {
        let (json, peak) = peak_of(|| event.to_json(max_record_bytes));
        // The object shown, about 64 bytes a key and value of 14 bytes shown.
        assert!(
            peak < 16 * max_record_bytes,
            "a record took {peak} bytes to show"
        );
        shown.push(json);
    }
    assert_eq!(shown[0], "{}", "no key is text");
    let object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&shown[1]).expect("JSON");
    assert!(
        shown[1].len() <= max_record_bytes + 64 && object.len() > 10_000,
        "up to the cap: {} bytes, {} keys",
        shown[1].len(),
        object.len()
    );
    assert_eq!(object.get("0"), Some(&serde_json::Value::from("nil")));
}

fn otlp_exports() {
    use log_ingest::{otlp_input, otlp_wire::Export};
    use opentelemetry_proto::tonic::{
        collector::logs::v1::ExportLogsServiceRequest,
        common::v1::{AnyValue, KeyValue, any_value},
        logs::v1::{LogRecord, ResourceLogs, ScopeLogs},
        resource::v1::Resource,
    };
    const RECORDS: usize = 1_000_000;
    const MAX_BATCH: usize = 4 << 20;
    let text = |s: &str| {
        Some(AnyValue {
            value: Some(any_value::Value::StringValue(s.to_owned())),
        })
    };
    let export = |host: &str, records: Vec<LogRecord>| {
        Export::of(&ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(Resource {
                    attributes: vec![KeyValue {
                        key: "host.name".to_owned(),
                        value: text(host),
                        ..KeyValue::default()
                    }],
                    ..Resource::default()
                }),
                scope_logs: vec![ScopeLogs {
                    log_records: records,
                    ..ScopeLogs::default()
                }],
                ..ResourceLogs::default()
            }],
        })
    };
    // 1,000,000 records of one byte of body, 5 bytes each sent: decoded at once, their
    // structs alone would take 1,000,000 × size_of::<LogRecord>() (about 180 bytes), their
    // events more. Converted one at a time, a batch at a time (the batches handed on and
    // dropped here, as the handler stores them), they take a few batches.
    let tiny = LogRecord {
        body: text("x"),
        ..LogRecord::default()
    };
    let many = export("web-1", vec![tiny.clone(); RECORDS]);
    assert!(
        many.encoded_len() < 8 * RECORDS,
        "{} bytes",
        many.encoded_len()
    );
    // The handler holds at most two batches besides the one being filled (one waiting in
    // its channel, one being stored): so does this.
    let mut held = std::collections::VecDeque::new();
    let mut stored = 0;
    let received = 1_730_103_120_040_000_000;
    let (rejected, peak) = peak_of(|| {
        otlp_input::convert(
            &many,
            received,
            MAX_BATCH,
            &mut |batch| {
                stored += batch.events.len();
                held.push_back(batch);
                if held.len() > 2 {
                    held.pop_front();
                }
                true
            },
            &|| false,
        )
    });
    assert_eq!((stored, rejected.count()), (RECORDS, 0));
    assert!(peak < 32 << 20, "1,000,000 tiny records took {peak} bytes");
    drop(held);

    // A host of 3.9 MiB would be copied into each of 300 records: 1.2 GB. Its records are
    // rejected instead, each with why.
    let wide = export(&"h".repeat(3_900_000), vec![tiny; 300]);
    let mut stored = 0;
    let (rejected, peak) = peak_of(|| {
        otlp_input::convert(
            &wide,
            received,
            MAX_BATCH,
            &mut |batch| {
                stored += batch.events.len();
                true
            },
            &|| false,
        )
    });
    assert_eq!((stored, rejected.count()), (0, 300));
    assert!(
        rejected.message().contains("host.name takes"),
        "{}",
        rejected.message()
    );
    assert!(peak < 1 << 20, "a wide host took {peak} bytes");
}

fn test_parse_requests() {
    use log_ingest::{api_wire::decode_test_parse, parsing::MAX_LINES};
    use mall_proto::logs::v1::TestParseRequest;
    use prost::Message as _;
    // 4,000,000 empty lines, 8 MB sent: decoded, 4,000,000 `String`s of 24 bytes, 96 MB
    // and more while their Vec grows. Counted first, refused undecoded.
    let many = TestParseRequest {
        parser: String::new(),
        lines: vec![String::new(); 4_000_000],
    }
    .encode_to_vec();
    let (decoded, peak) = peak_of(|| decode_test_parse(&many));
    let status = decoded.expect_err("more lines than the contract's limit");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("lines: at most 1000 lines per request, not 4000000"),
        "{}",
        status.message()
    );
    assert!(peak < 1 << 20, "4,000,000 empty lines took {peak} bytes");

    // At the limit the request decodes, as prost decodes it.
    let request = TestParseRequest {
        parser: "log4j".to_owned(),
        lines: (0..MAX_LINES).map(|i| format!("line {i}")).collect(),
    };
    let decoded = decode_test_parse(&request.encode_to_vec()).expect("within the limit");
    assert_eq!(decoded, request);
    // Bytes that are no request: INVALID_ARGUMENT, not prost's INTERNAL.
    let broken = decode_test_parse(&[0x12, 0x05, b'a']).expect_err("a length past the end");
    assert_eq!(broken.code(), tonic::Code::InvalidArgument);
}
