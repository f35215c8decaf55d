//! The forward listener against a client written by others (the npm package fluent-logger,
//! acknowledgements required) and against frames as Fluent Bit sends them: everything
//! acknowledged is in the buffer, and garbage closes only its own connection.
//!
//! Needs Node.js and fluent-logger: `scripts/test.sh` installs it and sets
//! `MALL_TEST_NODE_MODULES` (or run `scripts/node-peers.sh` and export what it prints).

use std::{path::Path, time::Duration};

use log_ingest::{
    batch::Batch,
    buffer::{Buffer, Limits, Position},
    forward_input::{ForwardInput, ForwardSettings},
    metrics::LogMetrics,
    recent::Recent,
};
use rmpv::Value;
use secrecy::SecretString;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

const CLIENT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/peers/fluent_logger_client.js"
);

struct Listener {
    addr: std::net::SocketAddr,
    buffer: Buffer,
    metrics: LogMetrics,
    start: Position,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

async fn listener(shared_key: Option<&str>, limits: Limits) -> Listener {
    listener_with(shared_key, limits, |_| {}).await
}

async fn listener_with(
    shared_key: Option<&str>,
    limits: Limits,
    change: impl FnOnce(&mut ForwardSettings),
) -> Listener {
    mall_test_support::init_logging();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (buffer, start) = Buffer::open(dir.path(), limits).expect("opens");
    let mut settings = ForwardSettings {
        listen_addr: "127.0.0.1:0".parse().expect("an address"),
        shared_key: shared_key.map(SecretString::from),
        idle_timeout: Duration::from_secs(10),
        max_message_bytes: MAX_MESSAGE_BYTES as usize,
        ..ForwardSettings::default()
    };
    change(&mut settings);
    let metrics = LogMetrics::unregistered(&[]);
    let input = ForwardInput::bind(
        settings,
        false,
        buffer.clone(),
        Recent::default(),
        metrics.clone(),
    )
    .await
    .expect("binds");
    let addr = input.local_addr().expect("an address");
    let shutdown = CancellationToken::new();
    tokio::spawn(input.run(shutdown.clone()));
    Listener {
        addr,
        buffer,
        metrics,
        start,
        shutdown,
        _dir: dir,
    }
}

/// `forward.max_message_bytes` in these tests.
const MAX_MESSAGE_BYTES: u32 = 1 << 20;

const LIMITS: Limits = Limits {
    max_bytes: 64 << 20,
    segment_bytes: 8 << 20,
};

/// Every buffered event as (tag, log line, time).
fn buffered(listener: &Listener) -> Vec<(String, String, i64)> {
    let mut reader = listener.buffer.reader(listener.start);
    let mut out = Vec::new();
    while let Some((bytes, _)) = reader.try_next().expect("reads") {
        let batch = Batch::decode(&bytes).expect("a batch");
        for event in batch.events.iter() {
            out.push((
                batch.tag.clone(),
                event.text("log").expect("a log").into_owned(),
                event.time_nanos,
            ));
        }
    }
    out
}

fn node_modules() -> String {
    std::env::var("MALL_TEST_NODE_MODULES").unwrap_or_else(|_| {
        panic!(
            "MALL_TEST_NODE_MODULES is not set: run `scripts/node-peers.sh` (it installs the npm \
             package fluent-logger) and export what it prints, or run scripts/test.sh"
        )
    })
}

async fn fluent_logger(
    addr: std::net::SocketAddr,
    mode: &str,
    count: usize,
    key: Option<&str>,
) -> std::process::Output {
    let modules = node_modules();
    assert!(
        Path::new(&modules).join("fluent-logger").is_dir(),
        "no fluent-logger in {modules}"
    );
    let mut command = tokio::process::Command::new("node");
    command
        .env("NODE_PATH", &modules)
        .arg(CLIENT)
        .arg(addr.port().to_string())
        .arg(mode)
        .arg(count.to_string())
        .arg(format!("legacy.{mode}"));
    if let Some(key) = key {
        command.arg(key);
    }
    tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the client finishes")
        .expect("node runs")
}

#[tokio::test]
async fn fluent_logger_in_every_mode_gets_acks_only_for_what_is_in_the_buffer() {
    let listener = listener(None, LIMITS).await;
    for mode in ["Message", "PackedForward", "CompressedPackedForward"] {
        let output = fluent_logger(listener.addr, mode, 300, None).await;
        assert!(
            output.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let events = buffered(&listener);
    for mode in ["Message", "PackedForward", "CompressedPackedForward"] {
        let lines: Vec<(&str, i64)> = events
            .iter()
            .filter(|(tag, _, _)| *tag == format!("legacy.{mode}"))
            .map(|(_, line, time)| (line.as_str(), *time))
            .collect();
        let want: Vec<String> = (0..300).map(|i| format!("line {i}")).collect();
        assert_eq!(
            lines.iter().map(|l| l.0).collect::<Vec<_>>(),
            want,
            "{mode}: every acknowledged line, once, in order"
        );
        // EventTime with nanoseconds, as sent.
        assert_eq!(lines[7].1, 1_730_103_120 * 1_000_000_000 + 7, "{mode}");
    }
    listener.shutdown.cancel();
}

#[tokio::test]
async fn the_shared_key_handshake_admits_the_right_key_only() {
    let listener = listener(Some("secure-communication-is-awesome"), LIMITS).await;
    let output = fluent_logger(
        listener.addr,
        "PackedForward",
        50,
        Some("secure-communication-is-awesome"),
    )
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = fluent_logger(listener.addr, "PackedForward", 5, Some("a-wrong-key")).await;
    assert!(!output.status.success(), "a wrong key is refused");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("shared key mismatch"),
        "the PONG says why: {stderr}"
    );
    assert_eq!(buffered(&listener).len(), 50);
    // Counted for the operator (a key no sender matches shows nowhere else); the sender
    // with the right key closed its own connection, which is not counted.
    closed_for(&listener, "handshake", 1).await;
    assert_eq!(closes(&listener, "garbage"), 0);
    // A sender without the key sends its first message as if it were a PING: a handshake
    // failure too, not garbage. A peer that closes before its PING (a TCP health check)
    // is neither.
    let mut keyless = tokio::net::TcpStream::connect(listener.addr)
        .await
        .expect("connects");
    keyless
        .write_all(&fluent_bit_frame("k1", &["x".repeat(8 * 1024).as_str()]))
        .await
        .expect("writes");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), keyless.read_to_end(&mut rest)).await;
    closed_for(&listener, "handshake", 2).await;
    drop(
        tokio::net::TcpStream::connect(listener.addr)
            .await
            .expect("connects"),
    );
    closed_for(&listener, "peer_closed", 1).await;
    assert_eq!(closes(&listener, "handshake"), 2);
    assert_eq!(closes(&listener, "garbage"), 0);
}

/// Connections the listener closed for `reason`.
fn closes(listener: &Listener, reason: &str) -> u64 {
    listener
        .metrics
        .connections_closed
        .with_label_values(&[reason])
        .get()
}

/// Waits until exactly `count` connections were closed for `reason` (the count follows the
/// close the peer saw).
async fn closed_for(listener: &Listener, reason: &str, count: u64) {
    mall_test_support::wait_until("the close counted", Duration::from_secs(5), || async {
        (closes(listener, reason) >= count).then_some(())
    })
    .await;
    assert_eq!(closes(listener, reason), count, "{reason}");
}

/// Past `max_connections` one more connection is closed at once (counted `too_many`); the
/// connections open go on, and a slot given back takes a new one.
#[tokio::test]
async fn a_connection_past_max_connections_is_closed_at_once() {
    let listener = listener_with(None, LIMITS, |s| {
        s.max_connections = 2;
        s.idle_timeout = Duration::from_secs(120);
    })
    .await;
    let connect = || tokio::net::TcpStream::connect(listener.addr);
    let mut first = connect().await.expect("connects");
    send_acked(&mut first, &fluent_bit_frame("a1", &["a1"]), "a1").await;
    let mut second = connect().await.expect("connects");
    send_acked(&mut second, &fluent_bit_frame("b1", &["b1"]), "b1").await;
    let mut third = connect().await.expect("the kernel accepts it");
    let mut rest = [0; 16];
    let closed = tokio::time::timeout(Duration::from_secs(3), third.read(&mut rest))
        .await
        .expect("closed at once, not after idle_timeout");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    closed_for(&listener, "too_many", 1).await;
    send_acked(&mut first, &fluent_bit_frame("a2", &["a2"]), "a2").await;
    send_acked(&mut second, &fluent_bit_frame("b2", &["b2"]), "b2").await;
    drop(first);
    // The slot comes back once the listener sees the close.
    let mut fourth =
        mall_test_support::wait_until("a slot given back", Duration::from_secs(5), || async {
            let mut stream = connect().await.ok()?;
            let frame = fluent_bit_frame("d1", &["d1"]);
            stream.write_all(&frame).await.ok()?;
            let mut buf = vec![0; 64];
            let n = tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf))
                .await
                .ok()?
                .ok()?;
            (n > 0).then_some(stream)
        })
        .await;
    send_acked(&mut fourth, &fluent_bit_frame("d2", &["d2"]), "d2").await;
    let lines: Vec<String> = buffered(&listener).into_iter().map(|e| e.1).collect();
    assert_eq!(lines, ["a1", "b1", "a2", "b2", "d1", "d2"]);
    listener.shutdown.cancel();
}

/// A peer that stops reading (its receive window closed) holds the write of its ack for at
/// most `handshake_timeout`, not for ever: its chunk is stored (a resend is recognised) and
/// the connection closed, counted `slow`.
#[tokio::test]
async fn a_peer_that_stops_reading_its_acks_is_closed_after_the_handshake_timeout() {
    let limits = Limits {
        max_bytes: 128 << 20,
        segment_bytes: 64 << 20,
    };
    let listener = listener_with(None, limits, |s| {
        s.idle_timeout = Duration::from_secs(120);
        s.handshake_timeout = Duration::from_millis(500);
        s.max_message_bytes = 20 << 20;
    })
    .await;
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("a small receive buffer");
    let mut stream = socket.connect(listener.addr).await.expect("connects");
    // An ack echoes its chunk id: one of 16 MiB cannot all be written to a peer that reads
    // nothing (Linux grows a socket's send buffer up to `tcp_wmem`'s maximum, 4 MiB by
    // default; the peer's receive buffer is 4 KiB).
    let chunk = "c".repeat(16 << 20);
    stream
        .write_all(&fluent_bit_frame(&chunk, &["a line"]))
        .await
        .expect("writes");
    closed_for(&listener, "slow", 1).await;
    let lines: Vec<String> = buffered(&listener).into_iter().map(|e| e.1).collect();
    assert_eq!(lines, ["a line"], "stored before the ack");
    listener.shutdown.cancel();
}

/// A peer that connects to a listener with a shared key and never sends its PING holds a
/// connection slot for `handshake_timeout`, not `idle_timeout`.
#[tokio::test]
async fn a_peer_silent_after_helo_is_closed_after_the_handshake_timeout() {
    let listener = listener_with(Some("a-key"), LIMITS, |s| {
        s.idle_timeout = Duration::from_secs(120);
        s.handshake_timeout = Duration::from_millis(300);
    })
    .await;
    let mut stream = tokio::net::TcpStream::connect(listener.addr)
        .await
        .expect("connects");
    let mut helo = vec![0; 256];
    let n = stream.read(&mut helo).await.expect("reads the HELO");
    let helo = rmpv::decode::read_value(&mut &helo[..n]).expect("msgpack");
    assert_eq!(helo[0].as_str(), Some("HELO"));
    let mut rest = [0; 16];
    // Well under the default handshake_timeout (10 s): the configured one applies.
    let closed = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut rest))
        .await
        .expect("closed after handshake_timeout, long before idle_timeout");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    closed_for(&listener, "slow", 1).await;
    listener.shutdown.cancel();
}

/// A message that has begun arriving holds `max_message_bytes` of `max_bytes_in_flight`
/// until it is whole: with room for one, a second connection's message waits (unread,
/// unacknowledged) until the first is stored, then goes through.
#[tokio::test]
async fn messages_past_the_bytes_in_flight_wait_for_room() {
    let listener = listener_with(None, LIMITS, |s| {
        s.max_bytes_in_flight = s.max_message_bytes;
    })
    .await;
    let connect = || tokio::net::TcpStream::connect(listener.addr);
    // A quiet connection takes nothing.
    let _quiet = connect().await.expect("connects");
    let first = fluent_bit_frame(&format!("{:032x}", 1), &["one", "two", "three"]);
    let second = fluent_bit_frame(&format!("{:032x}", 2), &["four"]);
    let mut a = connect().await.expect("connects");
    let (head, tail) = first.split_at(first.len() / 2);
    a.write_all(head).await.expect("writes");
    // The listener has read the first half and taken the budget (the quiet connection
    // took nothing).
    let max = i64::from(MAX_MESSAGE_BYTES);
    mall_test_support::wait_until("the budget taken", Duration::from_secs(5), || async {
        (listener.metrics.in_flight_bytes.get() == max).then_some(())
    })
    .await;
    let mut b = connect().await.expect("connects");
    b.write_all(&second).await.expect("writes");
    let mut answer = [0; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), b.read(&mut answer))
            .await
            .is_err(),
        "the second message waits while the first holds the budget"
    );
    assert_eq!(
        listener.metrics.in_flight_bytes.get(),
        max,
        "the second message, read whole, waits for its share"
    );
    assert!(buffered(&listener).is_empty());
    a.write_all(tail).await.expect("writes");
    assert_eq!(
        read_ack(&mut a).await["ack"].as_str(),
        Some(&*format!("{:032x}", 1))
    );
    assert_eq!(
        read_ack(&mut b).await["ack"].as_str(),
        Some(&*format!("{:032x}", 2))
    );
    assert_eq!(buffered(&listener).len(), 4);
    // Each given back once acknowledged (the connections read their next message).
    mall_test_support::wait_until("the budget given back", Duration::from_secs(5), || async {
        (listener.metrics.in_flight_bytes.get() == 0).then_some(())
    })
    .await;
    listener.shutdown.cancel();
}

/// A sender that stalls in the middle of a message (a server gone while flushing) holds its
/// share of the budget for `message_timeout`, not `idle_timeout`: then its connection is
/// closed and the others go on.
#[tokio::test]
async fn a_sender_stalled_mid_message_is_closed_after_the_message_timeout() {
    let listener = listener_with(None, LIMITS, |s| {
        s.max_bytes_in_flight = s.max_message_bytes;
        s.idle_timeout = Duration::from_secs(120);
        s.message_timeout = Duration::from_millis(500);
    })
    .await;
    let frame = fluent_bit_frame(&format!("{:032x}", 1), &["one", "two"]);
    let mut stalled = tokio::net::TcpStream::connect(listener.addr)
        .await
        .expect("connects");
    stalled
        .write_all(&frame[..frame.len() / 2])
        .await
        .expect("writes");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut other = tokio::net::TcpStream::connect(listener.addr)
        .await
        .expect("connects");
    let id = format!("{:032x}", 2);
    other
        .write_all(&fluent_bit_frame(&id, &["three"]))
        .await
        .expect("writes");
    // `read_ack` waits 5 s at most: far less than `idle_timeout`.
    assert_eq!(
        read_ack(&mut other).await["ack"].as_str(),
        Some(id.as_str())
    );
    let mut rest = [0; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut rest))
        .await
        .expect("the stalled connection is closed");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    assert_eq!(buffered(&listener).len(), 1);
    listener.shutdown.cancel();
}

fn encode(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, value).expect("encodes");
    out
}

/// Forward mode as Fluent Bit sends it: `[[EventTime, {}], record]` entries and a chunk
/// id (32 hex digits up to Fluent Bit 5.0.8, 24 base64 characters since).
fn fluent_bit_frame(chunk: &str, lines: &[&str]) -> Vec<u8> {
    let mut time = 1_730_103_120_u32.to_be_bytes().to_vec();
    time.extend_from_slice(&5_u32.to_be_bytes());
    let entries = lines
        .iter()
        .map(|line| {
            Value::Array(vec![
                Value::Array(vec![Value::Ext(0, time.clone()), Value::Map(vec![])]),
                Value::Map(vec![(Value::from("log"), Value::from(*line))]),
            ])
        })
        .collect();
    encode(&Value::Array(vec![
        Value::from("hybris.wrapper"),
        Value::Array(entries),
        Value::Map(vec![(Value::from("chunk"), Value::from(chunk))]),
    ]))
}

/// Sends `frame` and expects the ack of `chunk`.
async fn send_acked(stream: &mut tokio::net::TcpStream, frame: &[u8], chunk: &str) {
    stream.write_all(frame).await.expect("writes");
    assert_eq!(
        read_ack(stream).await,
        Value::Map(vec![(Value::from("ack"), Value::from(chunk))])
    );
}

async fn read_ack(stream: &mut tokio::net::TcpStream) -> Value {
    let mut buf = vec![0; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("an answer in time")
        .expect("reads");
    rmpv::decode::read_value(&mut &buf[..n]).expect("msgpack")
}

#[tokio::test]
async fn a_fluent_bit_chunk_is_acked_byte_for_byte_and_garbage_closes_only_its_connection() {
    let listener = listener(None, LIMITS).await;
    let chunk = "0123456789abcdef0123456789abcdef";
    let mut good = tokio::net::TcpStream::connect(listener.addr)
        .await
        .expect("connects");
    // Sent in two pieces, the first cut inside the frame.
    let frame = fluent_bit_frame(chunk, &["first", "second"]);
    good.write_all(&frame[..10]).await.expect("writes");
    tokio::time::sleep(Duration::from_millis(50)).await;
    good.write_all(&frame[10..]).await.expect("writes");
    assert_eq!(
        read_ack(&mut good).await,
        Value::Map(vec![(Value::from("ack"), Value::from(chunk))])
    );
    // Garbage on another connection: it is closed; the first one still works.
    let mut bad = tokio::net::TcpStream::connect(listener.addr)
        .await
        .expect("connects");
    bad.write_all(&[0xc1, 0x00, 0x01]).await.expect("writes");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), bad.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "garbage closes its connection: {closed:?}"
    );
    closed_for(&listener, "garbage", 1).await;
    // A TCP heartbeat (nil), then a message without a chunk (no answer), then one with.
    good.write_all(&[0xc0]).await.expect("writes");
    good.write_all(&encode(&Value::Array(vec![
        Value::from("hybris.wrapper"),
        Value::from(1_730_103_120_u32),
        Value::Map(vec![(Value::from("log"), Value::from("third"))]),
    ])))
    .await
    .expect("writes");
    good.write_all(&fluent_bit_frame("c2", &["fourth"]))
        .await
        .expect("writes");
    assert_eq!(
        read_ack(&mut good).await,
        Value::Map(vec![(Value::from("ack"), Value::from("c2"))])
    );
    let lines: Vec<String> = buffered(&listener).into_iter().map(|e| e.1).collect();
    assert_eq!(lines, ["first", "second", "third", "fourth"]);
}

#[tokio::test]
async fn a_full_buffer_is_not_acknowledged_and_the_connection_closes() {
    let limits = Limits {
        max_bytes: 600,
        segment_bytes: 600,
    };
    // An idle timeout far past the test's waits: only the refusal can close the connection.
    let listener = listener_with(None, limits, |s| s.idle_timeout = Duration::from_secs(120)).await;
    let mut stream = tokio::net::TcpStream::connect(listener.addr)
        .await
        .expect("connects");
    let line = "x".repeat(100);
    let mut acked = 0;
    for i in 0..10 {
        let chunk = format!("chunk-{i}");
        let line = format!("{i} {line}");
        if stream
            .write_all(&fluent_bit_frame(&chunk, &[&line]))
            .await
            .is_err()
        {
            break;
        }
        let mut buf = vec![0; 64];
        // Refused means closed, not left hanging: the sender learns it at once and retries.
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("each message is acknowledged or its connection closed at once")
        {
            Ok(n) if n > 0 => {
                let ack = rmpv::decode::read_value(&mut &buf[..n]).expect("msgpack");
                assert_eq!(
                    ack,
                    Value::Map(vec![(Value::from("ack"), Value::from(chunk.as_str()))])
                );
                acked += 1;
            }
            _ => break,
        }
    }
    assert!(
        (1..10).contains(&acked),
        "some acknowledged, then refused: {acked}"
    );
    closed_for(&listener, "full", 1).await;
    // What was acknowledged is exactly what the buffer holds.
    assert_eq!(buffered(&listener).len(), acked);
}

/// A message without `chunk` comes from a sender that wants no ack and never resends:
/// with the buffer full it waits for room, its connection open and unread, and is stored
/// once there is room; none is lost and they stay in order.
#[tokio::test]
async fn a_message_without_chunk_waits_for_room_in_a_full_buffer() {
    let limits = Limits {
        max_bytes: 600,
        segment_bytes: 600,
    };
    let listener = listener_with(None, limits, |s| s.idle_timeout = Duration::from_secs(120)).await;
    let mut stream = tokio::net::TcpStream::connect(listener.addr)
        .await
        .expect("connects");
    let line = "x".repeat(100);
    let sent: Vec<String> = (0..10).map(|i| format!("{i} {line}")).collect();
    for line in &sent {
        // Forward mode without options: `[tag, [[time, {"log": line}]]]`.
        let frame = encode(&Value::Array(vec![
            Value::from("hybris.wrapper"),
            Value::Array(vec![Value::Array(vec![
                Value::from(1_730_103_120),
                Value::Map(vec![(Value::from("log"), Value::from(line.as_str()))]),
            ])]),
        ]));
        stream.write_all(&frame).await.expect("writes");
    }
    // The buffer fills: some are stored, the rest wait.
    let mut reader = listener.buffer.reader(listener.start);
    let mut stored = Vec::new();
    let mut read = |stored: &mut Vec<String>| -> Option<Position> {
        let mut last = None;
        while let Some((bytes, after)) = reader.try_next().expect("reads") {
            let batch = Batch::decode(&bytes).expect("a batch");
            stored.extend(
                batch
                    .events
                    .iter()
                    .map(|e| e.text("log").expect("a log").into_owned()),
            );
            last = Some(after);
        }
        last
    };
    // Some stored (however slowly this machine gets to them), then the buffer is full: the
    // rest cannot be stored before room is made below.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut after = read(&mut stored);
    while stored.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "nothing stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = read(&mut stored).or(after);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    after = read(&mut stored).or(after);
    assert!(
        stored.len() < 10,
        "some stored, then the buffer is full: {}",
        stored.len()
    );
    // Room, as the pipeline makes it when Loki takes what was read: the rest go in.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stored.len() < sent.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still waiting: {} of {} stored",
            stored.len(),
            sent.len()
        );
        if let Some(at) = after {
            listener.buffer.acknowledge(at).expect("acknowledges");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = read(&mut stored).or(after);
    }
    assert_eq!(stored, sent, "every message once, in order");
    assert_eq!(closes(&listener, "full"), 0, "the connection stayed open");
    assert!(
        stream
            .try_read(&mut [0; 8])
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "nothing answered, the connection still open"
    );
}

/// A PING refused (a wrong digest, or not a PING at all) gets a PONG that says why and
/// carries no digest of the key (one over a salt the peer chose would let anyone who can
/// connect guess the key offline), as fluentd answers; then the connection is closed.
#[tokio::test]
async fn a_refused_ping_gets_a_pong_that_reveals_nothing_of_the_key() {
    let listener = listener(Some("secure-communication-is-awesome"), LIMITS).await;
    let wrong_digest = Value::Array(
        ["PING", "fluent-bit-host", "salt", &"0".repeat(128), "", ""]
            .map(Value::from)
            .to_vec(),
    );
    let cut_short = Value::Array(vec![Value::from("PING"), Value::from("fluent-bit-host")]);
    for (ping, why) in [
        (wrong_digest, "shared key mismatch"),
        (cut_short, "not a PING"),
    ] {
        let mut stream = tokio::net::TcpStream::connect(listener.addr)
            .await
            .expect("connects");
        let mut buf = vec![0; 512];
        let n = stream.read(&mut buf).await.expect("reads HELO");
        assert!(n > 0, "a HELO");
        stream.write_all(&encode(&ping)).await.expect("writes PING");
        let n = stream.read(&mut buf).await.expect("reads PONG");
        let pong = rmpv::decode::read_value(&mut &buf[..n]).expect("msgpack");
        assert_eq!(
            pong,
            Value::Array(
                [
                    Value::from("PONG"),
                    Value::Boolean(false),
                    Value::from(why),
                    Value::from(""),
                    Value::from(""),
                ]
                .to_vec()
            )
        );
        assert_eq!(stream.read(&mut buf).await.expect("reads"), 0, "closed");
    }
}

/// Fluent Bit's PING: its salt is 16 random bytes in a msgpack str (not UTF-8), and the
/// digest is SHA-512 over the raw bytes (computed here independently of the server).
#[tokio::test]
async fn a_handshake_with_a_binary_salt_as_fluent_bit_sends_it() {
    use sha2::{Digest as _, Sha512};
    let key = "secure-communication-is-awesome";
    let listener = listener(Some(key), LIMITS).await;
    let mut stream = tokio::net::TcpStream::connect(listener.addr)
        .await
        .expect("connects");
    let mut buf = vec![0; 512];
    let n = stream.read(&mut buf).await.expect("reads HELO");
    let helo = rmpv::decode::read_value(&mut &buf[..n]).expect("msgpack");
    let nonce = match &helo {
        Value::Array(parts) if parts[0].as_str() == Some("HELO") => parts[1]
            .as_map()
            .expect("options")
            .iter()
            .find(|(k, _)| k.as_str() == Some("nonce"))
            .map(|(_, v)| match v {
                Value::Binary(b) => b.clone(),
                Value::String(s) => s.as_bytes().to_vec(),
                other => panic!("nonce {other:?}"),
            })
            .expect("a nonce"),
        other => panic!("not a HELO: {other:?}"),
    };
    let salt: Vec<u8> = (0..16_u8).map(|i| 0x80 | i.wrapping_mul(37)).collect();
    assert!(std::str::from_utf8(&salt).is_err(), "the salt is not UTF-8");
    let hex = |parts: &[&[u8]]| {
        let mut h = Sha512::new();
        for p in parts {
            h.update(p);
        }
        h.finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let digest = hex(&[&salt, b"fluent-bit-host", &nonce, key.as_bytes()]);
    // The salt as a str of raw bytes (msgpack str 8), the rest as ordinary values.
    let mut ping = vec![0x96];
    ping.extend(encode(&Value::from("PING")));
    ping.extend(encode(&Value::from("fluent-bit-host")));
    ping.push(0xd9);
    ping.push(16);
    ping.extend(&salt);
    ping.extend(encode(&Value::from(digest.as_str())));
    ping.extend(encode(&Value::from("")));
    ping.extend(encode(&Value::from("")));
    stream.write_all(&ping).await.expect("writes PING");
    let n = stream.read(&mut buf).await.expect("reads PONG");
    let pong = rmpv::decode::read_value(&mut &buf[..n]).expect("msgpack");
    let Value::Array(parts) = pong else {
        panic!("not a PONG")
    };
    assert_eq!(parts[0].as_str(), Some("PONG"));
    assert_eq!(parts[1], Value::Boolean(true), "accepted: {parts:?}");
    let server = parts[3].as_str().expect("a hostname");
    assert_eq!(
        parts[4].as_str(),
        Some(hex(&[&salt, server.as_bytes(), &nonce, key.as_bytes()]).as_str()),
        "the server proves it knows the key"
    );
    send_acked(
        &mut stream,
        &fluent_bit_frame("c1", &["after the handshake"]),
        "c1",
    )
    .await;
}

/// A chunk sent again after its ack was lost is acknowledged again but stored once, even
/// under another chunk id (what is recognised is its content: its times are finer than a
/// second, as Fluent Bit's are).
#[tokio::test]
async fn a_chunk_sent_again_is_acknowledged_and_stored_once() {
    let listener = listener(None, LIMITS).await;
    for id in ["first-attempt", "second-attempt"] {
        let mut stream = tokio::net::TcpStream::connect(listener.addr)
            .await
            .expect("connects");
        stream
            .write_all(&fluent_bit_frame(id, &["one", "two"]))
            .await
            .expect("writes");
        assert_eq!(
            read_ack(&mut stream).await,
            Value::Map(vec![(Value::from("ack"), Value::from(id))])
        );
    }
    let lines: Vec<String> = buffered(&listener).into_iter().map(|e| e.1).collect();
    assert_eq!(lines, ["one", "two"]);
}

/// A Fluent Bit whose `forward` output also matches a metrics input sends their chunks
/// here (`fluent_signal` 1, cmetrics' own encoding in the bin): each is acknowledged (or
/// Fluent Bit would retry it for ever) and nothing is stored; the connection goes on.
#[tokio::test]
async fn metrics_sent_by_mistake_are_acknowledged_not_stored() {
    let listener = listener(None, LIMITS).await;
    let mut stream = tokio::net::TcpStream::connect(listener.addr)
        .await
        .expect("connects");
    let cmetrics = encode(&Value::Map(vec![(Value::from("meta"), Value::Map(vec![]))]));
    let metrics = encode(&Value::Array(vec![
        Value::from("node.metrics"),
        Value::Binary(cmetrics),
        Value::Map(vec![
            (Value::from("chunk"), Value::from("m1")),
            (Value::from("fluent_signal"), Value::from(1)),
        ]),
    ]));
    send_acked(&mut stream, &metrics, "m1").await;
    send_acked(&mut stream, &fluent_bit_frame("l1", &["a line"]), "l1").await;
    let counted = |outcome: &str| listener.metrics.chunks.with_label_values(&[outcome]).get();
    assert_eq!((counted("not_logs"), counted("stored")), (1, 1));
    let lines: Vec<String> = buffered(&listener).into_iter().map(|e| e.1).collect();
    assert_eq!(lines, ["a line"]);
}

#[tokio::test]
async fn over_tls_a_chunk_is_acknowledged_and_plaintext_is_not_served() {
    mall_test_support::init_logging();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let ca = mall_test_support::certs::Authority::new(dir.path(), "mall").expect("a CA");
    let server = ca
        .issue(
            "log-ingest",
            None,
            &[],
            mall_test_support::certs::Validity::Current,
        )
        .expect("a certificate");
    let (buffer, start) = Buffer::open(dir.path(), LIMITS).expect("opens");
    let settings = ForwardSettings {
        listen_addr: "127.0.0.1:0".parse().expect("an address"),
        tls: Some(mall_grpc::tls::ServerTls {
            cert_file: server.cert.clone(),
            key_file: server.key.clone(),
            client_ca_file: ca.ca_file().to_owned(),
            reload_interval: Duration::from_secs(10),
        }),
        handshake_timeout: Duration::from_secs(1),
        ..ForwardSettings::default()
    };
    let metrics = LogMetrics::unregistered(&[]);
    let input = ForwardInput::bind(
        settings,
        false,
        buffer.clone(),
        Recent::default(),
        metrics.clone(),
    )
    .await
    .expect("binds");
    let addr = input.local_addr().expect("an address");
    let shutdown = CancellationToken::new();
    tokio::spawn(input.run(shutdown.clone()));
    let listener = Listener {
        addr,
        buffer,
        metrics,
        start,
        shutdown,
        _dir: dir,
    };

    // A shipper trusting our CA, without a client certificate (the shared key, when set,
    // authenticates it).
    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = std::fs::read(ca.ca_file()).expect("the CA");
    for cert in
        <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::pem_slice_iter(
            &ca_pem,
        )
    {
        roots.add(cert.expect("a certificate")).expect("usable");
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").expect("a name"),
            tcp,
        )
        .await
        .expect("the TLS handshake");
    let chunk = "0123456789abcdef0123456789abcdef";
    tls.write_all(&fluent_bit_frame(chunk, &["over tls"]))
        .await
        .expect("writes");
    tls.flush().await.expect("flushes");
    let mut buf = vec![0; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
        .await
        .expect("an ack in time")
        .expect("reads");
    assert_eq!(
        rmpv::decode::read_value(&mut &buf[..n]).expect("msgpack"),
        Value::Map(vec![(Value::from("ack"), Value::from(chunk))])
    );
    let lines: Vec<String> = buffered(&listener).into_iter().map(|e| e.1).collect();
    assert_eq!(lines, ["over tls"]);

    // A plaintext message is not a TLS handshake: the connection closes, nothing is stored.
    let mut plain = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    plain
        .write_all(&fluent_bit_frame("c2", &["plaintext"]))
        .await
        .expect("writes");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(_))), "closed: {closed:?}");
    assert!(!String::from_utf8_lossy(&rest).contains("ack"));
    assert_eq!(buffered(&listener).len(), 1);
    closed_for(&listener, "tls", 1).await;
    // A TCP health check opens and closes: no certificate refused.
    drop(
        tokio::net::TcpStream::connect(addr)
            .await
            .expect("connects"),
    );
    closed_for(&listener, "peer_closed", 1).await;
    assert_eq!(closes(&listener, "tls"), 1);
    listener.shutdown.cancel();
}

#[tokio::test]
async fn plaintext_beyond_loopback_is_refused_unless_insecure() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (buffer, _) = Buffer::open(dir.path(), LIMITS).expect("opens");
    let settings = ForwardSettings {
        listen_addr: "0.0.0.0:0".parse().expect("an address"),
        ..ForwardSettings::default()
    };
    let bind = |insecure| {
        ForwardInput::bind(
            settings.clone(),
            insecure,
            buffer.clone(),
            Recent::default(),
            LogMetrics::unregistered(&[]),
        )
    };
    let error = bind(false).await.expect_err("refused").to_string();
    assert!(
        error.contains("forward.listen_addr") && error.contains("server.insecure"),
        "{error}"
    );
    bind(true).await.expect("insecure = true binds");
}
