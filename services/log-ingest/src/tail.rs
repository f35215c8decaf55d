//! TailLogs: records as they are ingested (parsed, grouped, masked), to any number of
//! watchers up to a configured maximum, without ever slowing ingestion.
//!
//! The pipeline offers each record it pushes (masked) to every open tail whose filter it
//! matches, with `try_send` into that tail's bounded channel: when a client reads too slowly its
//! channel is full and the record is counted as dropped for that tail (reported in the next
//! message's `dropped_count`), never waited for. When no tail is open the pipeline pays one
//! atomic load per batch.

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use futures::Stream;
use mall_grpc::ServiceError;
use mall_proto::logs::v1::{ParsedRecord, TailLogsRequest, TailLogsResponse};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::{api::parsed, lock, metrics::LogMetrics, record::Level, record::Record};

/// Longest `contains` filter, in characters (the contract's limit).
pub const MAX_CONTAINS_CHARS: usize = 1_024;
/// A response holds records up to about this many bytes (under the 4 MiB a default gRPC
/// client accepts, with room for one record at its cap).
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// A record larger than this (as sent, fields included) is dropped for tails, counted: a
/// response of [`MAX_RESPONSE_BYTES`] and one such record stays under the 4 MiB a default
/// gRPC client accepts (message and stack trace are capped, OTLP attributes are not).
const MAX_RECORD_BYTES: usize = 2 * 1024 * 1024;

/// Limits of TailLogs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TailSettings {
    /// Most tails open at once on a replica; one more gets RESOURCE_EXHAUSTED. Default 16.
    pub max_tails: usize,
    /// Records waiting per tail for its client; beyond it records are dropped for that
    /// tail (and counted). Default 1,000.
    pub buffer_records: usize,
    /// Bytes of records (message and stack trace, plus 256 per record) waiting per tail
    /// at most, whatever their count: records reach 192 KiB each. Default 8 MiB.
    pub buffer_bytes: usize,
}

impl Default for TailSettings {
    fn default() -> Self {
        Self {
            max_tails: 16,
            buffer_records: 1_000,
            buffer_bytes: 8 << 20,
        }
    }
}

/// The stream a TailLogs call returns.
pub type TailStream = Pin<Box<dyn Stream<Item = Result<TailLogsResponse, Status>> + Send>>;

/// The open tails; cheap to clone.
#[derive(Debug, Clone)]
pub struct Tails {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    settings: TailSettings,
    open: Mutex<Vec<Arc<Tail>>>,
    /// `open.len()`, read without the lock on the hot path.
    count: AtomicUsize,
    metrics: LogMetrics,
    shutdown: CancellationToken,
}

#[derive(Debug)]
struct Tail {
    filter: Filter,
    sender: mpsc::Sender<Offered>,
    dropped: AtomicU64,
    /// Woken on a drop, so a drop is reported even when no record follows it.
    dropped_since: tokio::sync::Notify,
    /// Bytes of the records waiting (see [`weight`]).
    queued: AtomicUsize,
    max_bytes: usize,
}

/// A record offered to tails: converted once for every tail it goes to (the pipeline's cost
/// does not grow with the tails it matches), taken out for a response on each tail's own
/// task; with its [`weight`] and encoded size.
#[derive(Debug, Clone)]
struct Offered {
    record: Arc<ParsedRecord>,
    weight: usize,
    encoded: usize,
}

impl Offered {
    fn new(record: ParsedRecord) -> Self {
        Self {
            weight: weight(&record),
            encoded: record.encoded_len(),
            record: Arc::new(record),
        }
    }
}

/// What a waiting record counts against a tail's byte budget: its texts and fields (OTLP
/// attributes can be large), and a little for the rest.
fn weight(record: &ParsedRecord) -> usize {
    let fields: usize = record.fields.iter().map(|(k, v)| k.len() + v.len()).sum();
    [
        &record.message,
        &record.stack_trace,
        &record.logger,
        &record.thread,
        &record.trace_id,
    ]
    .iter()
    .map(|text| text.len())
    .sum::<usize>()
        + fields
        + 256
}

/// What a tail wants.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Filter {
    service: String,
    min_level: Option<Level>,
    contains: String,
}

impl Filter {
    fn matches(&self, record: &Record, service: &str) -> bool {
        (self.service.is_empty() || self.service == service)
            && self
                .min_level
                .is_none_or(|min| record.level.is_some_and(|l| l >= min))
            && (self.contains.is_empty()
                || record.message.contains(&self.contains)
                || record.stack_trace.contains(&self.contains))
    }
}

impl Tails {
    /// No tail open yet; streams end with UNAVAILABLE when `shutdown` is cancelled.
    pub fn new(settings: TailSettings, metrics: LogMetrics, shutdown: CancellationToken) -> Self {
        Self {
            shared: Arc::new(Shared {
                settings,
                open: Mutex::new(Vec::new()),
                count: AtomicUsize::new(0),
                metrics,
                shutdown,
            }),
        }
    }

    /// Opens a tail.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for an unknown `min_level` or a `contains` over 1,024 characters;
    /// RESOURCE_EXHAUSTED when `max_tails` are open.
    pub fn open(&self, request: TailLogsRequest) -> Result<TailStream, ServiceError> {
        let mut violations = mall_grpc::Violations::default();
        let min_level = if request.min_level.is_empty() {
            None
        } else {
            // The contract's six names, in any case; not the aliases records are read with
            // (`SEVERE`, `STATUS`, …), which would make a typo mean a level silently.
            let level = Level::parse_strict(&request.min_level.to_ascii_uppercase());
            if level.is_none() {
                violations.add(
                    "min_level",
                    "must be one of TRACE, DEBUG, INFO, WARN, ERROR, FATAL, or empty for all",
                );
            }
            level
        };
        if request.contains.chars().count() > MAX_CONTAINS_CHARS {
            violations.add(
                "contains",
                format!("must be at most {MAX_CONTAINS_CHARS} characters"),
            );
        }
        violations.into_result()?;
        let (sender, receiver) = mpsc::channel(self.shared.settings.buffer_records.max(1));
        let tail = Arc::new(Tail {
            filter: Filter {
                service: request.service,
                min_level,
                contains: request.contains,
            },
            sender,
            dropped: AtomicU64::new(0),
            dropped_since: tokio::sync::Notify::new(),
            queued: AtomicUsize::new(0),
            max_bytes: self.shared.settings.buffer_bytes,
        });
        {
            let mut open = lock(&self.shared.open);
            if open.len() >= self.shared.settings.max_tails {
                return Err(ServiceError::ResourceExhausted(format!(
                    "{} tails are open, the most this replica serves at once \
                     (tail.max_tails); close one or try later",
                    open.len()
                )));
            }
            open.push(tail.clone());
            self.shared.count.store(open.len(), Ordering::Release);
            self.shared.metrics.tails.set(open.len() as i64);
        }
        let state = Reading {
            receiver,
            guard: Guard {
                shared: self.shared.clone(),
                tail,
            },
            shutdown: self.shared.shutdown.clone(),
            ended: false,
        };
        Ok(Box::pin(futures::stream::unfold(state, Reading::next)))
    }

    /// The tails open now, to offer records to; `None` (one atomic load) when there are
    /// none.
    pub fn tap(&self) -> Option<Tap> {
        if self.shared.count.load(Ordering::Acquire) == 0 {
            return None;
        }
        Some(Tap {
            open: lock(&self.shared.open).clone(),
            dropped: 0,
            metrics: self.shared.metrics.clone(),
        })
    }
}

/// The tails open when a batch of records began; counts its drops when dropped.
#[derive(Debug)]
pub struct Tap {
    open: Vec<Arc<Tail>>,
    dropped: u64,
    metrics: LogMetrics,
}

impl Tap {
    /// Offers a record (masked already) of `service` to every tail it matches; never waits.
    pub fn offer(&mut self, record: &Record, service: &str) {
        // Converted when a first tail has room for it.
        let mut offered: Option<Offered> = None;
        for tail in &self.open {
            if !tail.filter.matches(record, service) {
                continue;
            }
            // No room (by count, then by bytes): dropped for this tail.
            if tail.sender.capacity() == 0 {
                tail.drop_one(&mut self.dropped);
                continue;
            }
            let copy = offered.get_or_insert_with(|| Offered::new(parsed(record.clone(), service)));
            if tail.queued.load(Ordering::Relaxed) + copy.weight > tail.max_bytes
                || copy.encoded > MAX_RECORD_BYTES
            {
                tail.drop_one(&mut self.dropped);
                continue;
            }
            tail.queued.fetch_add(copy.weight, Ordering::Relaxed);
            match tail.sender.try_send(copy.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(copy)) => {
                    tail.queued.fetch_sub(copy.weight, Ordering::Relaxed);
                    tail.drop_one(&mut self.dropped);
                }
                // Its client went away; its guard is removing it.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }
}

impl Tail {
    /// Counts a record dropped for this tail (reported to its client) and in `batch`'s drops
    /// (the metric's, once the batch is done).
    fn drop_one(&self, batch: &mut u64) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        self.dropped_since.notify_one();
        *batch += 1;
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if self.dropped > 0 {
            self.metrics.tail_dropped.inc_by(self.dropped);
        }
    }
}

/// Removes its tail from the open ones when the stream is dropped (the client cancelled,
/// the connection closed, the server stopped).
#[derive(Debug)]
struct Guard {
    shared: Arc<Shared>,
    tail: Arc<Tail>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut open = lock(&self.shared.open);
        open.retain(|t| !Arc::ptr_eq(t, &self.tail));
        self.shared.count.store(open.len(), Ordering::Release);
        self.shared.metrics.tails.set(open.len() as i64);
    }
}

/// One tail's stream state.
struct Reading {
    receiver: mpsc::Receiver<Offered>,
    guard: Guard,
    shutdown: CancellationToken,
    ended: bool,
}

impl Reading {
    /// The next response: the records waiting now (up to about 1 MiB) and the drops since
    /// the previous one, once there is either (drops alone, with no record, when nothing
    /// else comes); UNAVAILABLE once when the server shuts down.
    async fn next(mut self) -> Option<(Result<TailLogsResponse, Status>, Self)> {
        if self.ended {
            return None;
        }
        loop {
            let tail = &self.guard.tail;
            let first = tokio::select! {
                record = self.receiver.recv() => Some(record?),
                // A wake-up whose drop an earlier response reported already finds nothing
                // below and waits again.
                () = tail.dropped_since.notified() => None,
                () = self.shutdown.cancelled() => {
                    self.ended = true;
                    let status = ServiceError::Unavailable(
                        "log-ingest is shutting down; open the tail again on another replica".to_owned(),
                    );
                    return Some((Err(status.into()), self));
                }
            };
            let mut size = first.as_ref().map_or(0, |r| r.encoded);
            let mut offered: Vec<Offered> = first.into_iter().collect();
            while size < MAX_RESPONSE_BYTES {
                let Ok(record) = self.receiver.try_recv() else {
                    break;
                };
                size += record.encoded;
                offered.push(record);
            }
            let taken: usize = offered.iter().map(|r| r.weight).sum();
            tail.queued.fetch_sub(taken, Ordering::Relaxed);
            // The last tail to take a record takes it without a copy.
            let records: Vec<ParsedRecord> = offered
                .into_iter()
                .map(|r| Arc::unwrap_or_clone(r.record))
                .collect();
            let dropped = tail.dropped.swap(0, Ordering::Relaxed);
            if records.is_empty() && dropped == 0 {
                continue;
            }
            let response = TailLogsResponse {
                records,
                dropped_count: i64::try_from(dropped).unwrap_or(i64::MAX),
            };
            return Some((Ok(response), self));
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;

    use super::*;

    fn tails(buffer_records: usize) -> Tails {
        Tails::new(
            TailSettings {
                max_tails: 2,
                buffer_records,
                buffer_bytes: 1 << 20,
            },
            LogMetrics::unregistered(&[]),
            CancellationToken::new(),
        )
    }

    fn record(level: Option<Level>, message: &str) -> Record {
        Record {
            level,
            message: message.to_owned(),
            line_count: 1,
            ..Record::default()
        }
    }

    fn request(service: &str, min_level: &str, contains: &str) -> TailLogsRequest {
        TailLogsRequest {
            service: service.to_owned(),
            min_level: min_level.to_owned(),
            contains: contains.to_owned(),
        }
    }

    #[tokio::test]
    async fn filters_combine_and_a_slow_reader_loses_records_counted_not_ingestion() {
        let tails = tails(1);
        let mut errors = tails.open(request("shop", "warn", "cart")).expect("opens");
        assert!(tails.tap().is_some());
        let records = [
            record(Some(Level::Error), "cart 1 failed"),
            record(Some(Level::Info), "cart 2 fine"),
            record(None, "cart 3 no level"),
            record(Some(Level::Warn), "stock low"),
            record(Some(Level::Warn), "cart 4 slow"),
            record(Some(Level::Fatal), "cart 5 gone"),
        ];
        // Two match (the 2nd-last is another service's); the channel holds one: the second
        // is dropped and counted.
        let services = ["shop", "shop", "shop", "shop", "other", "shop"];
        let mut tap = tails.tap().expect("a tail is open");
        for (record, service) in records.iter().zip(services) {
            tap.offer(record, service);
        }
        let first = errors.next().await.expect("a message").expect("ok");
        let messages: Vec<&str> = first.records.iter().map(|r| r.message.as_str()).collect();
        assert_eq!(messages, ["cart 1 failed"]);
        assert_eq!(first.dropped_count, 1);
        assert_eq!(first.records[0].service, "shop");
        assert_eq!(first.records[0].level, "ERROR");
        tap.offer(&records[5], "shop");
        let second = errors.next().await.expect("a message").expect("ok");
        let messages: Vec<&str> = second.records.iter().map(|r| r.message.as_str()).collect();
        assert_eq!(
            messages,
            ["cart 5 gone"],
            "the dropped one is not sent late"
        );
        assert_eq!(second.dropped_count, 0);
    }

    /// A tail whose queue takes large records (16 MiB), and a record too large for one
    /// message all the same (3 MiB of fields).
    fn a_tail_and_a_record_too_large_for_it() -> (Tails, TailStream, Record) {
        let tails = Tails::new(
            TailSettings {
                max_tails: 1,
                buffer_records: 10,
                buffer_bytes: 16 << 20,
            },
            LogMetrics::unregistered(&[]),
            CancellationToken::new(),
        );
        let tail = tails.open(request("", "", "")).expect("opens");
        let mut huge = record(Some(Level::Error), "small");
        huge.fields
            .insert("attribute".to_owned(), "x".repeat(3 << 20));
        (tails, tail, huge)
    }

    /// A record too large for a message a default client accepts is dropped for the tail,
    /// counted, and the tail goes on.
    #[tokio::test]
    async fn a_record_too_large_for_one_message_is_dropped_counted() {
        let (tails, mut tail, huge) = a_tail_and_a_record_too_large_for_it();
        let mut tap = tails.tap().expect("a tail is open");
        tap.offer(&huge, "shop");
        tap.offer(&record(Some(Level::Error), "next"), "shop");
        drop(tap);
        let message = tail.next().await.expect("a message").expect("ok");
        let messages: Vec<&str> = message.records.iter().map(|r| r.message.as_str()).collect();
        assert_eq!((messages, message.dropped_count), (vec!["next"], 1));
    }

    /// A drop is reported when it happens, in a message of its own when no record follows
    /// it (a tail filtered on a rare record may see none for hours).
    #[tokio::test]
    async fn a_drop_is_reported_even_when_no_record_follows() {
        let (tails, mut tail, huge) = a_tail_and_a_record_too_large_for_it();
        let mut tap = tails.tap().expect("a tail is open");
        tap.offer(&huge, "shop");
        drop(tap);
        let message = tokio::time::timeout(std::time::Duration::from_secs(5), tail.next())
            .await
            .expect("reported without waiting for another record")
            .expect("a message")
            .expect("ok");
        assert_eq!((message.records.len(), message.dropped_count), (0, 1));
        // Reported once: the next message waits for something new.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(200), tail.next())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn large_records_are_bounded_by_bytes_not_only_by_count() {
        let tails = tails(1_000);
        let mut tail = tails.open(request("", "", "")).expect("opens");
        let big = record(Some(Level::Error), &"x".repeat(300 * 1024));
        let mut tap = tails.tap().expect("a tail is open");
        for _ in 0..5 {
            tap.offer(&big, "shop");
        }
        drop(tap);
        // 1 MiB holds three of them; two are dropped and counted.
        let message = tail.next().await.expect("a message").expect("ok");
        assert_eq!((message.records.len(), message.dropped_count), (3, 2));
        // Read, they free their room.
        let mut tap = tails.tap().expect("a tail is open");
        tap.offer(&big, "shop");
        drop(tap);
        let message = tail.next().await.expect("a message").expect("ok");
        assert_eq!((message.records.len(), message.dropped_count), (1, 0));
        // Fields count too (OTLP attributes can be the bulk of a record).
        let mut wide = record(Some(Level::Error), "small");
        wide.fields
            .insert("attribute".to_owned(), "y".repeat(300 * 1024));
        let mut tap = tails.tap().expect("a tail is open");
        for _ in 0..5 {
            tap.offer(&wide, "shop");
        }
        drop(tap);
        let message = tail.next().await.expect("a message").expect("ok");
        assert_eq!((message.records.len(), message.dropped_count), (3, 2));
    }

    #[tokio::test]
    async fn bad_filters_and_one_tail_too_many_are_refused_and_a_closed_tail_frees_its_slot() {
        let tails = tails(10);
        let error = tails
            .open(request("", "LOUD", &"x".repeat(1_025)))
            .err()
            .expect("refused");
        match error {
            ServiceError::InvalidArgument(violations) => {
                let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
                assert_eq!(fields, ["min_level", "contains"]);
            }
            other => panic!("{other:?}"),
        }
        let first = tails.open(request("", "", "")).expect("one");
        let _second = tails.open(request("", "", "")).expect("two");
        assert!(matches!(
            tails.open(request("", "", "")),
            Err(ServiceError::ResourceExhausted(_))
        ));
        drop(first);
        let _third = tails.open(request("", "", "")).expect("a slot again");
    }

    #[tokio::test]
    async fn a_shutdown_ends_every_tail_with_unavailable() {
        let shutdown = CancellationToken::new();
        let tails = Tails::new(
            TailSettings::default(),
            LogMetrics::unregistered(&[]),
            shutdown.clone(),
        );
        let mut tail = tails.open(request("", "", "")).expect("opens");
        shutdown.cancel();
        let status = tail.next().await.expect("a status").expect_err("an error");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(tail.next().await.is_none(), "then the stream ends");
    }
}
