//! From the buffer to Loki: batches read in order, their lines parsed and grouped per
//! stream (multi-line records whole), masked, pushed to Loki in batches bounded by bytes
//! and time, and the buffer acknowledged only as far as nothing before it is still needed.
//!
//! What may be acknowledged after a push: the position after the last batch read, or the
//! start of the batch where a record still in progress began, whichever is earlier. After
//! a crash the pipeline re-reads from there: records in progress are rebuilt whole; records
//! pushed already may be pushed again, which Loki ignores (it drops an entry identical in
//! stream, time and line to one it has, when it takes unordered writes, its default; with
//! ordered writes it refuses one older than the stream's last as out of order).
//!
//! A stream is a forward tag (or OTLP service) plus the value of a configured record field
//! naming the host (`host`): each has its own multi-line state, its record in progress
//! complete after `flush_after` without a line of its own (the wrapper's lines held behind
//! it do not count).

// foldhash, not SipHash: streams are looked up for every event; their keys are the
// senders' tags and hosts, and foldhash is seeded per process.
use foldhash::{HashMap, HashMapExt as _};
use std::{
    sync::{Arc, Mutex, atomic::AtomicUsize},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::{
    batch::{Batch, EventRef, Source},
    buffer::{Buffer, Position, Reader},
    derive::{Deriver, Observation},
    labels,
    loki::{self, LokiClient, Pushed},
    mask::Masker,
    metrics::LogMetrics,
    multiline::{self, Caps, Grouper},
    otlp_input,
    parse::{Format, Formats, Parser},
    record::Record,
    tail::Tails,
};

/// How the pipeline reads events and batches pushes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineSettings {
    /// The record field holding the line (Fluent Bit's `log`).
    pub line_field: String,
    /// The record field naming the host (or file): part of the stream, and the `host`
    /// label.
    pub host_field: String,
    /// Parser per forward tag or OTLP service (`hybris.wrapper = "hybris-wrapper"`; a key
    /// ending in `*` matches a prefix, the longest one where several do); unlisted sources
    /// are parsed per line.
    pub parsers: std::collections::BTreeMap<String, String>,
    /// A stream's record in progress is complete after this long without a line of its
    /// own (the wrapper's lines held behind it do not count), by when lines arrived:
    /// while the buffer holds more to read (a backlog), once a line of another stream read
    /// arrived this long after its latest; once everything is read, by the clock.
    #[serde(with = "humantime_serde")]
    pub flush_after: Duration,
    /// After a restart, a record in progress rebuilt from the buffer waits for a line of
    /// its own from its stream (its sender retries what was not acknowledged) rather than
    /// `flush_after`, but at most this long: a trace cut by the restart stays whole.
    #[serde(with = "humantime_serde")]
    pub restart_grace: Duration,
    /// The `environment` label of every stream.
    pub environment: String,
    /// A push holds at most this many bytes of lines (well under Loki's 6 MB burst).
    pub batch_bytes: usize,
    /// Most (service, host) pairs that get streams of their own, counting the place each
    /// admitted service holds for (service, `other`); records of others get `other` (see
    /// [`crate::labels`]). Default 300: each pair makes a stream per level (seven with
    /// `unknown`), and each replica admits its own, so two replicas stay under Loki's
    /// default `max_global_streams_per_user` of 5,000 for the tenant ((300 + 1) × 7 × 2 =
    /// 4,214 at most, however many services); past that Loki refuses new streams (429) and
    /// the output waits. At least 2.
    pub max_streams: usize,
    /// Most streams (tag and host) whose multi-line state is kept: a record in progress,
    /// or ten minutes after their last line. A new stream past it completes and forgets
    /// the quietest eighth (their records in progress go to Loki as they are).
    pub max_open_streams: usize,
    /// Text of the records in progress of all streams together, at most about this many
    /// bytes (checked after every quarter of it read, and every 4 MiB): past it, the
    /// largest are completed early, to three quarters of it (counted in
    /// `records_completed_early_total`; the rest of such a trace is a record of its own).
    /// At least `parsing.max_record_bytes`.
    pub max_pending_bytes: usize,
    /// A record waits at most this long for its push (it goes at once when the whole
    /// input pauses: `flush_after` completed the last record in progress of every stream).
    #[serde(with = "humantime_serde")]
    pub batch_wait: Duration,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self {
            line_field: "log".to_owned(),
            host_field: "host".to_owned(),
            parsers: std::collections::BTreeMap::new(),
            flush_after: Duration::from_secs(2),
            restart_grace: Duration::from_secs(60),
            environment: "local".to_owned(),
            batch_bytes: 1024 * 1024,
            max_streams: 300,
            max_open_streams: 10_000,
            max_pending_bytes: 64 * 1024 * 1024,
            batch_wait: Duration::from_secs(1),
        }
    }
}

fn source_label(source: Source) -> &'static str {
    match source {
        Source::Forward => "forward",
        Source::Otlp => "otlp",
    }
}

/// A push running: its task, and the position (with its note) to acknowledge after it.
type InFlight = std::collections::VecDeque<tokio::task::JoinHandle<bool>>;

/// Pushes at most in flight: one sending while the next masks, labels and encodes. Each
/// holds its records and their encoded body (snappy: about the records' bytes at most).
const PUSHES_IN_FLIGHT: usize = 2;

/// Acknowledgements waiting to be written at most (the acker coalesces them).
const ACKS_WAITING: usize = 64;

/// A push's place in the order: it prepares after `prepared_after` (so TailLogs and stream
/// admission see records in order, and the two pushes never contend
/// for their locks), sends after `after` said its push went through, then tells `done`,
/// and hands its position to the acker.
#[derive(Debug)]
struct Turn {
    prepared_after: Option<tokio::sync::oneshot::Receiver<()>>,
    prepared: tokio::sync::oneshot::Sender<()>,
    after: Option<tokio::sync::oneshot::Receiver<bool>>,
    done: tokio::sync::oneshot::Sender<bool>,
    acks: tokio::sync::mpsc::Sender<(Position, Vec<u8>)>,
    acknowledge: (Position, Vec<u8>),
}

/// Writes acknowledgements off the pipeline's path: each push that went through hands its
/// position here, and it is written (two syncs) while the next records are read and
/// pushed; positions arriving during a write are coalesced into the latest (a later
/// position covers an earlier one).
#[derive(Debug)]
struct Acker {
    sender: tokio::sync::mpsc::Sender<(Position, Vec<u8>)>,
    task: tokio::task::JoinHandle<()>,
}

impl Acker {
    fn spawn(buffer: Buffer) -> Self {
        let (sender, mut receiver) = tokio::sync::mpsc::channel(ACKS_WAITING);
        let task = tokio::spawn(async move {
            while let Some(mut latest) = receiver.recv().await {
                while let Ok(newer) = receiver.try_recv() {
                    latest = newer;
                }
                let (position, note): (Position, Vec<u8>) = latest;
                let buffer = buffer.clone();
                let written =
                    tokio::task::spawn_blocking(move || buffer.acknowledge_with(position, &note))
                        .await
                        .map_err(|e| std::io::Error::other(format!("the write {}", ended(&e))))
                        .and_then(|r| r);
                if let Err(error) = written {
                    tracing::error!(
                        %error,
                        "cannot record the buffer's position; records after it may be pushed again after a restart"
                    );
                }
            }
        });
        Self { sender, task }
    }

    /// Writes what was handed over and stops.
    async fn close(self) {
        drop(self.sender);
        if let Err(error) = self.task.await {
            tracing::error!("the acknowledging task {}", ended(&error));
        }
    }
}

/// How long a shutdown waits for the last push.
const DRAIN: Duration = Duration::from_secs(5);

/// The pipeline's parts.
#[derive(Debug)]
pub struct Pipeline {
    /// Settings.
    pub settings: PipelineSettings,
    /// Source time zone and caps.
    pub zone: chrono_tz::Tz,
    /// Caps on a record.
    pub caps: Caps,
    /// Masking.
    pub masker: Masker,
    /// The parsers by name.
    pub formats: Formats,
    /// Where batches come from.
    pub buffer: Buffer,
    /// Where records go.
    pub loki: LokiClient,
    /// Counters and gauges.
    pub metrics: LogMetrics,
    /// TailLogs' open tails, offered every record pushed.
    pub tails: Tails,
    /// The streams admitted (one push at a time takes it).
    pub streams: Arc<Mutex<labels::Guard>>,
    /// Metrics derived from the records (one push at a time takes it).
    pub derived: Arc<Mutex<Deriver>>,
    /// When Loki last refused structured metadata (see [`MetadataRefused`]).
    pub metadata_refused: MetadataRefused,
}

/// Whether Loki refuses structured metadata (`allow_structured_metadata` off): from its
/// refusal on, pushes go without metadata for [`METADATA_REPROBE`], then one goes with it
/// again to see whether Loki now allows it (so a misconfigured Loki costs one refused
/// push per period, not one per push).
#[derive(Debug, Clone, Default)]
pub struct MetadataRefused(Arc<Mutex<Option<Instant>>>);

/// How long pushes go without metadata after Loki refused it, before trying with it again.
const METADATA_REPROBE: Duration = Duration::from_secs(600);

impl MetadataRefused {
    /// Whether pushes go without metadata now.
    fn now(&self) -> bool {
        crate::lock(&self.0).is_some_and(|at| at.elapsed() < METADATA_REPROBE)
    }

    /// Loki refused metadata just now.
    fn refused(&self) {
        *crate::lock(&self.0) = Some(Instant::now());
    }
}

/// Where a line came from: what a record takes from its first line.
#[derive(Debug, Clone, Copy, Default)]
struct Origin {
    /// Where the batch (chunk) holding the line starts.
    at: Position,
    /// The line's place in that batch: a record's `first_line` as the contract has it.
    chunk_line: usize,
    /// The time of the event the line came in, for records without one.
    event_time: i64,
    /// When its batch was received ([`Batch::received_ms`]): a record's delivery time is
    /// measured from its first line's.
    received_ms: i64,
}

impl Origin {
    /// The tie-breaker of a record beginning here ([`tie_breaker`]).
    fn tie(&self) -> u32 {
        tie_breaker(self.at, self.chunk_line)
    }
}

/// One stream's state.
#[derive(Debug)]
struct StreamState {
    /// Its record in progress (and the asides held behind it), each record with the
    /// [`Origin`] of its first line.
    grouper: Grouper<Origin>,
    parser: Parser,
    source: Source,
    /// Its tag and host as received: its key, and the note's.
    tag: Arc<str>,
    host: Arc<str>,
    /// Its tag and host as they leave the service (labels, TailLogs, metric labels):
    /// masked as a record's text is. Shared with every record of the stream on its way
    /// to Loki (a clone per record).
    shown: (Arc<str>, Arc<str>),
    /// Lines since the replica started (read again or new), for the grouping's own
    /// book-keeping.
    lines: usize,
    last_line: Instant,
    /// When its record in progress last got a line (not one held behind it): its quiet is
    /// judged from here, so the wrapper pinging a stalled JVM does not hold it.
    last_joined: Instant,
    /// When the batches of those two lines were received ([`Batch::received_ms`]; 0: not
    /// known): quiet in a backlog is judged from here.
    last_line_ms: i64,
    last_joined_ms: i64,
    /// The head of a cut trace its grouper keeps (see [`Grouper::cut`]) and since when, by
    /// the clock and by when the lines read then arrived.
    cut_seen: Option<(u64, Instant, i64)>,
    /// Whether a line of its own (not held behind its record in progress) arrived since
    /// this replica started (not only lines read again from the buffer).
    resumed: bool,
    /// Per batch not yet acknowledged (by where it starts): this stream's first line in it
    /// and how many it has there, for the note left with an acknowledgement.
    batches: std::collections::BTreeMap<Position, (usize, usize)>,
    /// Where the batch of its latest line of its own (not held behind its record in
    /// progress) starts.
    last_at: Position,
    /// Since when its record in progress has been held back because the buffer refused an
    /// append after its latest line of its own (see the quiet check in [`Pipeline::run`]).
    held_since: Option<Instant>,
}

impl StreamState {
    /// Its record in progress (and the asides held behind it), completed into `ready`:
    /// the stream is being forgotten, or its records held too much.
    fn complete(&mut self, ready: &mut Vec<Ready>) {
        let mut out = Vec::new();
        self.grouper.flush(&mut out);
        ready.extend(out.into_iter().map(|completed| self.ready(completed)));
    }

    /// Its record in progress, quiet, completed into `ready` ([`Grouper::flush_quiet`]: a
    /// wrapper's line that came last, but for lines that pass, becomes the record in
    /// progress, quiet from the stream's latest line). Whether any was.
    fn complete_quiet(&mut self, ready: &mut Vec<Ready>) -> bool {
        let mut out = Vec::new();
        self.grouper.flush_quiet(&mut out);
        if let Some((_, origin)) = self.grouper.pending() {
            // A record of its own now: its line is its own.
            self.last_joined = self.last_line;
            self.last_joined_ms = self.last_line_ms;
            self.last_at = origin.at;
            self.held_since = None;
        }
        let any = !out.is_empty();
        ready.extend(out.into_iter().map(|completed| self.ready(completed)));
        any
    }

    /// Times the head of a cut trace its grouper keeps, from when it was first seen, and
    /// forgets it after [`CUT_KEPT`] (the wrapper's lines do not move this clock), by the
    /// clock or by when the lines read arrived (`read_ms`, a [`Batch::received_ms`]; 0: not
    /// known), as quiet is judged: in a backlog, lines that arrived a minute apart are read
    /// moments apart, and the rest of a trace placed just after a head so much older could
    /// fall behind what Loki takes of its stream.
    fn age_cut(&mut self, now: Instant, read_ms: i64) {
        let kept_ms = i64::try_from(CUT_KEPT.as_millis()).unwrap_or(i64::MAX);
        self.cut_seen = match (self.grouper.cut(), self.cut_seen) {
            (None, _) => None,
            (Some(cut), Some((seen, since, since_ms))) if seen == cut => {
                let read_past = since_ms > 0 && read_ms.saturating_sub(since_ms) >= kept_ms;
                if now.duration_since(since) >= CUT_KEPT || read_past {
                    self.grouper.forget_cut();
                    None
                } else {
                    Some((seen, since, since_ms))
                }
            }
            (Some(cut), _) => Some((cut, now, read_ms)),
        };
    }

    /// A record of this stream completed, ready for Loki.
    fn ready(&self, (mut record, origin): (Record, Origin)) -> Ready {
        record.first_line = origin.chunk_line;
        Ready {
            record,
            source: self.source,
            tag: self.shown.0.clone(),
            host: self.shown.1.clone(),
            fallback_nanos: origin.event_time,
            tie: origin.tie(),
            received_ms: origin.received_ms,
        }
    }

    /// The first line of the record in progress (of the stream's `lines`) and where the
    /// batch holding it starts: every line from there on is held (not yet pushed).
    fn pending_from(&self) -> Option<(usize, Position)> {
        self.grouper
            .pending()
            .map(|(line, origin)| (line, origin.at))
    }
}

/// The tie-breaker (0–999,999) of a record whose first line is `line` of the batch at
/// `at`: Loki keeps one entry of a stream per timestamp and line, so two identical lines in
/// the same millisecond (a wrapper line twice) or second (an access log's precision) would
/// otherwise be one. [`entry_nanos`] puts it below the entry's millisecond, or its
/// microsecond when the time has one.
///
/// Made from where the record's first line is in the buffer, so a record rebuilt after a
/// restart has the same one and Loki collapses it with the copy pushed before. Within a
/// segment, batches' offsets grow and a line's place in its batch is less than the batch's
/// bytes: records later in the buffer get larger values, wrapping around every 10^6 bytes
/// (and at a segment's start). So records of one second or millisecond keep their order in
/// Loki, but where a wrap falls between them, and identical ones collide only 10^6 bytes
/// apart (once in 10^6 across segments); below a microsecond, once in 1,000.
fn tie_breaker(at: Position, line: usize) -> u32 {
    // Segments start at unrelated points (a fixed mix, not a seeded hasher: it must be the
    // same in every process).
    let start = at.segment.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16;
    let line = u64::try_from(line).unwrap_or(u64::MAX);
    u32::try_from(start.wrapping_add(at.offset).wrapping_add(line) % 1_000_000).unwrap_or(0)
}

/// An entry's time in nanoseconds: `nanos` (the record's) with the tie-breaker `tie` below
/// its millisecond when it has none below (a log4j or wrapper line's milliseconds, an
/// access log's seconds: a microsecond-precise time whose microseconds are 000 moves less
/// than a millisecond), else below its microsecond.
fn entry_nanos(nanos: i64, tie: u32) -> i64 {
    let unit = if nanos.rem_euclid(1_000_000) == 0 {
        1_000_000
    } else {
        1_000
    };
    nanos
        .saturating_sub(nanos.rem_euclid(unit))
        .saturating_add(i64::from(tie) % unit)
}

/// Stream (tag and host) of the pipeline's state.
type StreamKey = (String, String);

/// The streams with multi-line state, and what is left of those evicted.
#[derive(Debug, Default)]
struct Streams {
    open: HashMap<StreamKey, StreamState>,
    /// Per stream forgotten (evicted, or idle for ten minutes), its lines in each batch
    /// not yet acknowledged: all in records completed when it was forgotten, so the note
    /// counts them as pushed. Dropped as the acknowledgements pass them.
    evicted: HashMap<StreamKey, std::collections::BTreeMap<Position, usize>>,
    /// Bytes of lines grouped since the records in progress were last weighed.
    fed: usize,
    /// The latest [`Batch::received_ms`] read: how far the input's clock has got in what
    /// was read, for quiet in a backlog.
    read_ms: i64,
}

/// A stream without a record in progress is forgotten after this long without a line.
const IDLE_STREAM: Duration = Duration::from_secs(600);

/// How long after its head was cut (by the quiet, memory, the caps) the rest of a trace may
/// come and still keep the head's header and time (just after it): past the Tanuki
/// wrapper's default ping timeout (30 s), after which it restarts a stalled JVM, and far
/// within what Loki takes out of order in a stream (about an hour). Later, the rest is a
/// record without a header at its own time.
const CUT_KEPT: Duration = Duration::from_secs(60);

impl Streams {
    /// When the records in progress hold more than `max` bytes of text together (the
    /// wrapper's lines held behind them counted), completes the largest (into `ready`)
    /// until they hold at most three quarters of it; returns how many it completed.
    fn complete_largest_past(&mut self, max: usize, ready: &mut Vec<Ready>) -> u64 {
        let mut held: usize = self.open.values().map(|s| s.grouper.pending_len()).sum();
        if held <= max {
            return 0;
        }
        let mut largest: Vec<(usize, StreamKey)> = self
            .open
            .iter()
            .filter(|(_, s)| s.grouper.is_pending())
            .map(|(key, s)| (s.grouper.pending_len(), key.clone()))
            .collect();
        largest.sort_unstable_by_key(|(len, _)| std::cmp::Reverse(*len));
        let mut completed = 0_u64;
        for (len, key) in largest {
            if held <= max / 4 * 3 {
                break;
            }
            if let Some(state) = self.open.get_mut(&key) {
                state.complete(ready);
                held -= len;
                completed += 1;
            }
        }
        completed
    }

    /// Forgets the streams without a record in progress and without a line for
    /// [`IDLE_STREAM`].
    fn forget_idle(&mut self, now: Instant) {
        let idle: Vec<StreamKey> = self
            .open
            .iter()
            .filter(|(_, s)| {
                !s.grouper.is_pending() && now.duration_since(s.last_line) >= IDLE_STREAM
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in idle {
            self.forget(&key);
        }
    }

    /// The `count` streams to evict: those with nothing to keep (no record in progress,
    /// no line since the last acknowledgement) first, then the quietest.
    fn to_evict(&self, count: usize) -> Vec<StreamKey> {
        let mut order: Vec<(bool, Instant, &StreamKey)> = self
            .open
            .iter()
            .map(|(key, state)| {
                let keeps = state.grouper.is_pending() || !state.batches.is_empty();
                (keeps, state.last_line, key)
            })
            .collect();
        let count = count.min(order.len());
        if count == 0 {
            return Vec::new();
        }
        order.select_nth_unstable_by_key(count - 1, |(keeps, last_line, _)| (*keeps, *last_line));
        order[..count]
            .iter()
            .map(|(_, _, key)| (*key).clone())
            .collect()
    }

    /// How far an acknowledgement may go when everything before `cursor` was read: to
    /// `cursor`, or to the start of the batch holding the first line of the earliest
    /// record still in progress (everything read is in a record ready or in progress).
    fn acknowledgeable(&self, cursor: Position) -> Position {
        self.open
            .values()
            .filter_map(|s| s.pending_from().map(|(_, at)| at))
            .fold(cursor, std::cmp::min)
    }

    /// Removes a stream's state, remembering its lines in batches not yet acknowledged.
    fn forget(&mut self, key: &StreamKey) -> Option<StreamState> {
        let state = self.open.remove(key)?;
        if !state.batches.is_empty() {
            let remembered = self.evicted.entry(key.clone()).or_default();
            for (&at, &(_, lines)) in &state.batches {
                *remembered.entry(at).or_default() += lines;
            }
        }
        Some(state)
    }
}

/// A record ready for Loki, with its stream.
#[derive(Debug)]
struct Ready {
    record: Record,
    source: Source,
    tag: Arc<str>,
    host: Arc<str>,
    fallback_nanos: i64,
    /// Its tie-breaker ([`tie_breaker`], [`entry_nanos`]).
    tie: u32,
    /// When its (first line's) batch was received ([`Batch::received_ms`]; 0: not known).
    received_ms: i64,
}

impl Pipeline {
    /// Runs from `start` until `shutdown`.
    pub async fn run(self, start: Position, shutdown: CancellationToken) {
        let mut reader: Reader = self.buffer.reader(start);
        // What is read again that was pushed before a restart.
        let mut replay = Replay::read(
            self.buffer.note(),
            self.buffer.end(),
            split_of(&self.settings),
        );
        // What was durable at start is read again; lines after it are new.
        let (replayed, started) = (self.buffer.end(), (Instant::now(), crate::batch::now_ms()));
        let mut streams = Streams::default();
        let mut ready: Vec<Ready> = Vec::new();
        let mut ready_bytes = 0_usize;
        let mut oldest: Option<Instant> = None;
        // Whether quiet completed a record since the last push and left no stream with a
        // record in progress.
        let mut paused = false;
        let mut cursor = start;
        let mut in_flight = InFlight::new();
        // Records in the pushes in flight (for `records_waiting`).
        let pushing = Arc::new(AtomicUsize::new(0));
        let mut previous: Option<tokio::sync::oneshot::Receiver<bool>> = None;
        let mut previous_prepared: Option<tokio::sync::oneshot::Receiver<()>> = None;
        let acker = Acker::spawn(self.buffer.clone());
        // Stops the pushes: a few seconds after a shutdown, not at once (a push under way
        // is let finish, so its records are acknowledged rather than pushed again).
        let push_stop = CancellationToken::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        // Not a burst of ticks after the loop waited long for a push slot (a Loki outage):
        // each walks every open stream.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    let stop = push_stop.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(DRAIN).await;
                        stop.cancel();
                    });
                    self.drain((streams, &replay), ready, cursor, (in_flight, &pushing, &push_stop), acker).await;
                    return;
                }
                next = reader.next() => match next {
                    Ok((bytes, after)) => {
                        match Batch::decode_owned(bytes) {
                            // An OTLP batch's records are whole when read, so all of one read
                            // before the note was made were pushed: not again.
                            Ok(batch) if batch.source == Source::Otlp && replay.pushed_before(cursor) => {}
                            Ok(batch) => {
                                streams.read_ms = streams.read_ms.max(batch.received_ms);
                                let new = cursor >= replayed;
                                self.feed(batch, cursor, new, &mut streams, &mut ready, &mut replay.skips);
                                self.metrics.open_streams.set(i64::try_from(streams.open.len()).unwrap_or(i64::MAX));
                            }
                            Err(why) => {
                                tracing::error!(%why, "a buffered batch does not decode; skipped");
                                self.metrics.buffer_corrupt.inc();
                                replay.give_up();
                            }
                        }
                        replay.reached(after);
                        cursor = after;
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::InvalidData => {
                        // Synced data the disk corrupted: retrying would stall every input
                        // behind it. Its batches are lost; say so loudly.
                        let (from, to) = reader.skip_segment();
                        tracing::error!(%error, segment = from.segment, offset = from.offset, to_segment = to.segment, to_offset = to.offset, "the buffer is corrupt; what was written of this segment after this point is skipped");
                        self.metrics.buffer_corrupt.inc();
                        cursor = to;
                        replay.give_up();
                    }
                    Err(error) => {
                        tracing::error!(%error, "cannot read the buffer; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        reader = self.buffer.reader(cursor);
                        continue;
                    }
                },
                _ = tick.tick() => {
                    let at_end = reader.at_end();
                    // For the waits after a restart or a refusal, caught up also when the
                    // lines read arrived within `flush_after`: a batch stored and not read
                    // yet (the reader a moment behind) is no backlog. (Not for quiet: a
                    // line not read yet may continue a record.)
                    let lag = crate::batch::now_ms().saturating_sub(streams.read_ms);
                    let caught_up = at_end
                        || (0..i64::try_from(self.settings.flush_after.as_millis()).unwrap_or(i64::MAX))
                            .contains(&lag);
                    if self.complete_quiet(&mut streams, &mut ready, (at_end, caught_up), started) {
                        // Pushed at once when nothing else comes: not in a backlog.
                        paused |= at_end;
                    }
                    // The whole input paused (not one sparse stream among busy ones): the
                    // records it completed go at once.
                    paused &= streams.open.values().all(|s| !s.grouper.is_pending());
                    streams.forget_idle(Instant::now());
                    self.metrics.open_streams.set(i64::try_from(streams.open.len()).unwrap_or(i64::MAX));
                }
            }
            while in_flight
                .front()
                .is_some_and(tokio::task::JoinHandle::is_finished)
            {
                if !finish(&mut in_flight).await {
                    acker.close().await;
                    return;
                }
            }
            if !ready.is_empty() {
                oldest.get_or_insert_with(Instant::now);
                ready_bytes = ready.iter().map(|r| r.record.text_len() + 64).sum();
            }
            // Waiting: here, and in the pushes in flight (which take theirs off as they end,
            // so a push held up by a Loki outage is counted while this loop waits for it).
            let waiting = ready.len() + pushing.load(std::sync::atomic::Ordering::Relaxed);
            self.metrics
                .waiting
                .set(i64::try_from(waiting).unwrap_or(i64::MAX));
            // Full, waited long enough, or nothing more to wait for: the whole input paused
            // (quiet completed a record and no stream has one in progress; judged only
            // once everything durable is read), so the last records go at once.
            let due = oldest.is_some_and(|t| t.elapsed() >= self.settings.batch_wait)
                || ready_bytes >= self.settings.batch_bytes
                || paused;
            if ready.is_empty() || !due {
                continue;
            }
            // A push slot first. A shutdown while waiting for one goes to the drain with
            // these records still ready (waiting on: a Loki outage would hold the pushes in
            // flight, and the shutdown, until the drain timeout).
            let mut stopping = false;
            while in_flight.len() >= PUSHES_IN_FLIGHT {
                let joined = tokio::select! {
                    () = shutdown.cancelled() => {
                        stopping = true;
                        break;
                    }
                    joined = in_flight.front_mut().expect("pushes in flight") => joined,
                };
                in_flight.pop_front();
                if !went_through(joined) {
                    acker.close().await;
                    return;
                }
            }
            if stopping {
                continue;
            }
            let acknowledge = streams.acknowledgeable(cursor);
            // The next push's records come in about as many: room for them at once rather
            // than by doubling (a record is a few hundred bytes to move on each growth).
            let room = ready.len();
            let records = std::mem::replace(&mut ready, Vec::with_capacity(room));
            (oldest, ready_bytes, paused) = (None, 0, false);
            let note = note(&mut streams, acknowledge, cursor, &replay);
            // Pushes prepare at once and send one after another (a stream's entries reach
            // Loki in order, acknowledgements are written in order); they run while the
            // next records are read and grouped.
            let (done, next) = tokio::sync::oneshot::channel();
            let (prepared, next_prepared) = tokio::sync::oneshot::channel();
            let turn = Turn {
                prepared_after: previous_prepared.replace(next_prepared),
                prepared,
                after: previous.replace(next),
                done,
                acks: acker.sender.clone(),
                acknowledge: (acknowledge, note),
            };
            pushing.fetch_add(records.len(), std::sync::atomic::Ordering::Relaxed);
            in_flight.push_back(tokio::spawn(self.pusher(&pushing).push(
                records,
                push_stop.clone(),
                turn,
            )));
        }
    }

    /// Completes the records in progress of the streams gone quiet (`flush_after` without
    /// a line of their own) into `ready`; whether any was. Quiet is judged by when lines
    /// arrived: once everything durable is read (`at_end`), by the clock; before (a
    /// backlog, behind slow pushes or after a Loki outage), by the arrival of the lines
    /// read since ([`Batch::received_ms`]): a stream whose latest line came `flush_after`
    /// before lines read since has no more, as its next would be in the buffer before
    /// them. Its record would otherwise hold the acknowledgement, and the buffer's bytes,
    /// until the whole backlog is read (refusing the inputs all along when it is full).
    ///
    /// Two waits come first, each at most `restart_grace`, judged the same way (by the
    /// clock once `caught_up`: at the end, or reading lines that arrived within
    /// `flush_after`; in a backlog, until lines read arrived that long after). Both
    /// last only while the record holds back at most half the buffer (it keeps the
    /// acknowledgement at its first batch: holding more could keep the buffer full, refusing
    /// the very lines it waits for); caught up, the restart's goes on past half the buffer
    /// until the buffer has refused an append since the restart (there, what comes after
    /// the record grows only as fast as senders send, and the wait is for a sender that
    /// resends within seconds):
    /// - after a restart (`started`: when, by both clocks), a record rebuilt from the
    ///   buffer waits for a line of its own (its sender resends what was not
    ///   acknowledged);
    /// - after the buffer refused an append (it was full) later than a stream's latest line
    ///   of its own, that stream's next chunk may have been refused, which its sender
    ///   resends after its backoff: its record waits for it, from the refusal (at the end,
    ///   from when it was first held).
    fn complete_quiet(
        &self,
        streams: &mut Streams,
        ready: &mut Vec<Ready>,
        (at_end, caught_up): (bool, bool),
        started: (Instant, i64),
    ) -> bool {
        let now = Instant::now();
        let (grace, flush_after) = (self.settings.restart_grace, self.settings.flush_after);
        let read_ms = streams.read_ms;
        // Whether lines read arrived `wait` after `ms` (0: a batch stored by a version
        // before received times, older than any line read with one).
        let read_past = |ms: i64, wait: Duration| {
            read_ms > 0
                && (ms == 0
                    || read_ms.saturating_sub(ms)
                        >= i64::try_from(wait.as_millis()).unwrap_or(i64::MAX))
        };
        let refusal = self.buffer.last_refused();
        let mut any = false;
        // Measured only where it decides (it sums the buffer's segments).
        let within_half = |state: &StreamState| {
            state.pending_from().is_some_and(|(_, from)| {
                self.buffer.bytes_from(from) <= self.buffer.max_bytes() / 2
            })
        };
        for state in streams.open.values_mut() {
            let quiet = if at_end {
                now.duration_since(state.last_joined) >= flush_after
            } else {
                read_past(state.last_joined_ms, flush_after)
            };
            if quiet {
                let waited = state.resumed
                    || if caught_up {
                        now.duration_since(started.0) >= grace
                            || (refusal.is_some_and(|r| r.when >= started.0) && !within_half(state))
                    } else {
                        read_past(started.1, grace) || !within_half(state)
                    };
                let refused = refusal.is_some_and(|r| {
                    state.last_at < r.end
                        && if caught_up {
                            now.duration_since(r.when) < grace
                        } else {
                            !read_past(r.ms, grace)
                        }
                }) && within_half(state);
                let held = refused
                    && (!caught_up
                        || now.duration_since(*state.held_since.get_or_insert(now)) < grace);
                if waited && !held {
                    any |= state.complete_quiet(ready);
                }
            }
            // Caught up, arrival times are the clock's (the latest line read may be long
            // past: an idle input, a refusal's hold).
            state.age_cut(
                now,
                if at_end {
                    crate::batch::now_ms()
                } else {
                    read_ms
                },
            );
        }
        any
    }

    fn pusher(&self, pushing: &Arc<AtomicUsize>) -> Pusher {
        Pusher {
            pushing: pushing.clone(),
            loki: self.loki.clone(),
            metrics: self.metrics.clone(),
            batch_bytes: self.settings.batch_bytes,
            masker: self.masker.clone(),
            max_record_bytes: self.caps.bytes,
            tails: self.tails.clone(),
            streams: self.streams.clone(),
            derived: self.derived.clone(),
            metadata_refused: self.metadata_refused.clone(),
        }
    }

    /// On shutdown: lets the pushes under way finish and pushes the records completed,
    /// until `push_stop` (a few seconds), and acknowledges them as a push in the loop
    /// does. Records still in progress are not completed: their lines stay in the buffer
    /// (the acknowledgement stops at the batch holding the first of them, its note
    /// skipping the lines already pushed), so after a restart they are rebuilt from their
    /// first line and the rest of a stack trace, sent after the restart, joins them
    /// instead of starting a record of its own. Whatever is not pushed stays in the buffer
    /// too.
    async fn drain(
        &self,
        (mut streams, replay): (Streams, &Replay),
        ready: Vec<Ready>,
        cursor: Position,
        (mut in_flight, pushing, push_stop): (InFlight, &Arc<AtomicUsize>, &CancellationToken),
        acker: Acker,
    ) {
        // What the pushes under way do not finish by `push_stop` stays in the buffer and is
        // pushed after the restart.
        let mut finished = true;
        while !in_flight.is_empty() {
            finished &= finish(&mut in_flight).await;
        }
        if !ready.is_empty() && finished {
            let acknowledge = streams.acknowledgeable(cursor);
            let note = note(&mut streams, acknowledge, cursor, replay);
            let (done, _) = tokio::sync::oneshot::channel();
            let (prepared, _) = tokio::sync::oneshot::channel();
            let turn = Turn {
                prepared_after: None,
                prepared,
                after: None,
                done,
                acks: acker.sender.clone(),
                acknowledge: (acknowledge, note),
            };
            pushing.fetch_add(ready.len(), std::sync::atomic::Ordering::Relaxed);
            self.pusher(pushing)
                .push(ready, push_stop.clone(), turn)
                .await;
        }
        acker.close().await;
    }

    /// Parses and groups one batch (which starts at `at`) into `ready`.
    fn feed(
        &self,
        batch: Batch,
        at: Position,
        new: bool,
        streams: &mut Streams,
        ready: &mut Vec<Ready>,
        skips: &mut HashMap<(String, String), usize>,
    ) {
        let source = batch.source;
        if source == Source::Otlp {
            self.feed_otlp(batch, at, ready);
            return;
        }
        let parser = Parser::new(self.format_of(&batch.tag), self.zone);
        let mut out = Vec::new();
        // A batch arrives at once: one clock read for all its lines.
        let now = Instant::now();
        // One key reused for every run's lookup (no allocation unless a stream is new).
        let mut key = (batch.tag.clone(), String::new());
        let host_field = self.settings.host_field.as_str();
        let host_is = |event: &EventRef<'_>, host: &str| {
            event.text(host_field).as_deref().unwrap_or_default() == host
        };
        let mut events = batch.events.iter().peekable();
        // Lines of the batch (of every stream in it) before the current one.
        let mut chunk_line = 0_usize;
        // A run of events of one host (a forward message is usually one host's): one
        // look-up of its stream.
        while let Some(event) = events.next() {
            key.1.clear();
            let host = event.text(host_field);
            if let Some(host) = &host {
                key.1.push_str(host);
            }
            if !streams.open.contains_key(&key) {
                if streams.open.len() >= self.settings.max_open_streams {
                    self.evict(streams, ready);
                }
                let shown = (self.shown(&batch.tag), self.shown(&key.1));
                if host.as_deref().is_none_or(str::is_empty) {
                    // A sender configured without the field (Fluent Bit's `hostname_key`):
                    // nothing fails, but every host of the tag shares one stream, where one
                    // host's trace can take another's lines. Once per stream opened (again
                    // after it was idle for `IDLE_STREAM` or evicted, and after a restart).
                    tracing::warn!(
                        tag = %shown.0,
                        host_field,
                        "events of this tag carry no host (or an empty one) in their host \
                         field: all their hosts share one stream (one host's stack trace can \
                         take another's lines) and no host label; set the sender's host field \
                         (Fluent Bit's forward output: `hostname_key host`) or \
                         `pipeline.host_field`"
                    );
                }
                streams.open.insert(
                    key.clone(),
                    StreamState {
                        grouper: Grouper::default(),
                        parser: parser.clone(),
                        source,
                        tag: Arc::from(batch.tag.as_str()),
                        host: Arc::from(key.1.as_str()),
                        shown,
                        lines: 0,
                        last_line: now,
                        last_joined: now,
                        last_line_ms: batch.received_ms,
                        last_joined_ms: batch.received_ms,
                        cut_seen: None,
                        batches: std::collections::BTreeMap::new(),
                        resumed: false,
                        last_at: at,
                        held_since: None,
                    },
                );
            }
            let state = streams.open.get_mut(&key).expect("inserted above");
            // A head kept too long (a backlog read long after it was cut) is forgotten
            // before its rest could take it.
            state.age_cut(now, batch.received_ms);
            let first = state.lines;
            // Whether a line of the run was not held behind the record in progress.
            let mut joined = false;
            let mut next = Some(event);
            while let Some(event) = next {
                let line = line_of(&event, &self.settings.line_field, self.caps.bytes);
                for text in without_terminator(&line).split('\n') {
                    let text = text.strip_suffix('\r').unwrap_or(text);
                    let in_chunk = chunk_line;
                    chunk_line += 1;
                    if let Some(skip) = skips.get_mut(&key).filter(|n| **n > 0) {
                        // Pushed before the restart, as part of a record that began earlier.
                        *skip -= 1;
                        state.lines += 1;
                        continue;
                    }
                    streams.fed += text.len();
                    let origin = Origin {
                        at,
                        chunk_line: in_chunk,
                        event_time: event.time_nanos,
                        received_ms: batch.received_ms,
                    };
                    state.grouper.push(
                        &state.parser,
                        self.caps,
                        text,
                        state.lines,
                        origin,
                        &mut out,
                    );
                    ready.extend(out.drain(..).map(|completed| state.ready(completed)));
                    joined |= !state.grouper.latest_held();
                    state.lines += 1;
                }
                next = events.next_if(|e| host_is(e, &key.1));
            }
            state.age_cut(now, batch.received_ms);
            // This batch's lines of the stream: where they start, how many.
            state.batches.entry(at).or_insert((first, 0)).1 += state.lines - first;
            state.last_line = now;
            state.last_line_ms = batch.received_ms;
            if joined {
                // Its record in progress got a line of its own (the waits for one end):
                // lines held behind it (the wrapper pinging a stalled JVM) leave it quiet.
                state.last_joined = now;
                state.last_joined_ms = batch.received_ms;
                state.last_at = at;
                state.held_since = None;
                state.resumed |= new;
            }
        }
        let max = self.settings.max_pending_bytes;
        if streams.fed >= (max / 4).min(4 << 20) {
            streams.fed = 0;
            self.hold_pending_within(streams, ready);
        }
    }

    /// Completes the largest records in progress while their text passes
    /// `max_pending_bytes`, down to three quarters of it: many hosts each in the middle of a
    /// large trace would otherwise hold up to `max_open_streams` × `max_record_bytes`.
    fn hold_pending_within(&self, streams: &mut Streams, ready: &mut Vec<Ready>) {
        let completed = streams.complete_largest_past(self.settings.max_pending_bytes, ready);
        self.metrics.completed_early.inc_by(completed);
    }

    /// Makes room for a new stream: completes and forgets an eighth of the streams (at
    /// least one), chosen by [`Streams::to_evict`]. Their records in progress go to
    /// `ready` as they are; their lines in batches not yet acknowledged are remembered in
    /// `streams.evicted`, so the acknowledgement's note still skips them after a restart.
    fn evict(&self, streams: &mut Streams, ready: &mut Vec<Ready>) {
        let chosen = streams.to_evict((streams.open.len() / 8).max(1));
        self.metrics.streams_evicted.inc_by(chosen.len() as u64);
        for key in chosen {
            if let Some(mut state) = streams.forget(&key) {
                state.complete(ready);
            }
        }
    }

    /// An OTLP batch's records: each is whole already (no grouping across records), so
    /// it is ready at once. A service with a parser configured has its bodies parsed (a
    /// log4j line, a stack trace); the record's OTLP severity, trace id, logger, thread
    /// and attributes fill in what the body does not say.
    fn feed_otlp(&self, batch: Batch, at: Position, ready: &mut Vec<Ready>) {
        let parser = self
            .configured_format(&batch.tag)
            .map(|format| Parser::new(format, self.zone));
        let tag = self.shown(&batch.tag);
        // The host of the records before, as received and as shown: a batch's records
        // are mostly of one host.
        let mut host: (String, Arc<str>) = (String::new(), Arc::from(""));
        // Records of the batch before the current one (for the tie-breaker).
        let mut n = 0_usize;
        for event in &batch.events {
            let otlp = otlp_input::record(&event.to_event());
            if otlp.host != host.0 {
                host = (otlp.host.clone(), self.shown(&otlp.host));
            }
            let records = match &parser {
                None => {
                    let mut record = otlp.record;
                    record.message = otlp.body;
                    let kept = without_terminator(&record.message).len();
                    record.message.truncate(kept);
                    multiline::cap_first(&mut record, self.caps);
                    vec![record]
                }
                Some(parser) => {
                    let lines = without_terminator(&otlp.body)
                        .split('\n')
                        .map(|l| l.strip_suffix('\r').unwrap_or(l));
                    let mut records = multiline::group_all(parser, self.caps, lines);
                    for record in &mut records {
                        merge(record, &otlp.record);
                    }
                    // A trace sent as `exception.stacktrace` belongs to the record the body
                    // ends with, unless the body wrote a trace itself.
                    if !otlp.record.stack_trace.is_empty()
                        && records.iter().all(|r| r.stack_trace.is_empty())
                        && let Some(last) = records.last_mut()
                    {
                        last.stack_trace.clone_from(&otlp.record.stack_trace);
                        multiline::cap_first(last, self.caps);
                    }
                    records
                }
            };
            for record in records {
                ready.push(Ready {
                    record,
                    source: Source::Otlp,
                    tag: Arc::clone(&tag),
                    host: Arc::clone(&host.1),
                    fallback_nanos: event.time_nanos,
                    tie: tie_breaker(at, n),
                    received_ms: batch.received_ms,
                });
                n += 1;
            }
        }
    }

    /// `value`, a tag or host (labels, TailLogs' service, metric labels), masked as a
    /// record's text is, its matches counted.
    fn shown(&self, value: &str) -> Arc<str> {
        let mut text = value.to_owned();
        let mut counts = vec![0; self.masker.len()];
        self.masker.text(&mut text, &mut counts);
        self.metrics.add_masked(&counts);
        Arc::from(text)
    }

    fn format_of(&self, tag: &str) -> Format {
        self.configured_format(tag).unwrap_or(Format::Auto)
    }

    /// The parser configured for a forward tag or OTLP service, if any.
    fn configured_format(&self, tag: &str) -> Option<Format> {
        parser_named_for(&self.settings.parsers, tag).and_then(|n| self.formats.named(n))
    }
}

/// The parser name `parsers` gives `tag`: its own entry, else the `*` pattern of the longest
/// prefix it starts with (`hybris.access*` before `hybris.*` before `*`), whatever the
/// patterns' order.
fn parser_named_for<'a>(
    parsers: &'a std::collections::BTreeMap<String, String>,
    tag: &str,
) -> Option<&'a str> {
    let name = parsers.get(tag).or_else(|| {
        parsers
            .iter()
            .filter_map(|(k, v)| Some((k.strip_suffix('*')?, v)))
            .filter(|(prefix, _)| tag.starts_with(prefix))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, v)| v)
    });
    name.map(String::as_str)
}

/// Fills in what a record parsed from an OTLP body does not say from the OTLP record
/// around it (`otlp`: its severity, time, trace id, logger, thread, attributes).
fn merge(record: &mut Record, otlp: &Record) {
    if record.level.is_none() {
        record.level = otlp.level;
    }
    if record.time_micros.is_none() {
        record.time_micros = otlp.time_micros;
    }
    for (to, from) in [
        (&mut record.trace_id, &otlp.trace_id),
        (&mut record.logger, &otlp.logger),
        (&mut record.thread, &otlp.thread),
    ] {
        if to.is_empty() {
            to.clone_from(from);
        }
    }
    for (key, value) in &otlp.fields {
        record
            .fields
            .entry(key.clone())
            .or_insert_with(|| value.clone());
    }
}

/// What a push needs, apart from the pipeline: it masks, derives metrics, labels, encodes
/// and sends on a task of its own while the pipeline reads and groups the next records.
#[derive(Debug, Clone)]
struct Pusher {
    /// Records in pushes not yet ended, this one's included until it ends.
    pushing: Arc<AtomicUsize>,
    loki: LokiClient,
    metrics: LogMetrics,
    batch_bytes: usize,
    masker: Masker,
    /// The record cap's bytes ([`Masker::record`]'s `cap`).
    max_record_bytes: usize,
    tails: Tails,
    streams: Arc<Mutex<labels::Guard>>,
    derived: Arc<Mutex<Deriver>>,
    metadata_refused: MetadataRefused,
}

impl Pusher {
    /// Masks `records`, offers them to TailLogs and makes them Loki entries with their
    /// streams' labels.
    fn prepare(&self, records: Vec<Ready>) -> Vec<Item> {
        let mut counts = vec![0; self.masker.len()];
        let mut items: Vec<Item> = Vec::with_capacity(records.len());
        let mut tap = self.tails.tap();
        let mut streams = crate::lock(&self.streams);
        streams.set_now(Instant::now());
        for mut ready in records {
            self.masker
                .record(&mut ready.record, &mut counts, self.max_record_bytes);
            if let Some(tap) = &mut tap {
                tap.offer(&ready.record, &ready.tag);
            }
            if ready.record.parse_error {
                self.metrics
                    .parse_errors
                    .with_label_values(&[source_label(ready.source)])
                    .inc();
            }
            items.push(self.item(ready, &mut streams));
        }
        self.metrics
            .streams
            .set(i64::try_from(streams.admitted()).unwrap_or(i64::MAX));
        self.metrics.add_masked(&counts);
        items
    }

    /// A record as a Loki entry with its stream's labels.
    fn item(&self, ready: Ready, streams: &mut labels::Guard) -> Item {
        let observation = Observation::of(&ready.record);
        let mut record = ready.record;
        let labels = streams.labels(&ready.tag, record.level, &ready.host);
        if !labels.folded.is_empty() {
            self.metrics.streams_folded.inc();
        }
        let nanos = record
            .time_micros
            .map_or(ready.fallback_nanos, |m| m.saturating_mul(1_000));
        let nanos = entry_nanos(nanos, ready.tie);
        let mut metadata: Vec<loki::LabelPair> = labels
            .folded
            .into_iter()
            .map(|(name, mut value)| {
                cap_value(&mut value);
                loki::LabelPair {
                    name: name.to_owned(),
                    value,
                }
            })
            .collect();
        let labels = labels.selector;
        for (name, value) in [
            ("trace_id", &mut record.trace_id),
            ("logger", &mut record.logger),
            ("thread", &mut record.thread),
        ] {
            if !value.is_empty() {
                let mut value = std::mem::take(value);
                cap_value(&mut value);
                metadata.push(loki::LabelPair {
                    name: name.to_owned(),
                    value,
                });
            }
        }
        // A cut is visible where the record is read, as TestParse and TailLogs show it.
        if record.truncated_bytes > 0 {
            metadata.push(loki::LabelPair {
                name: "truncated_bytes".to_owned(),
                value: record.truncated_bytes.to_string(),
            });
        }
        if !record.fields.is_empty() {
            let omitted = add_fields(&mut metadata, std::mem::take(&mut record.fields));
            if omitted > 0 {
                self.metrics.fields_omitted.inc_by(omitted as u64);
            }
        }
        let mut line = record.message;
        if !record.stack_trace.is_empty() {
            // A record that is only a stack trace (its header went in another) starts with it.
            if !line.is_empty() {
                line.push('\n');
            }
            line.push_str(&record.stack_trace);
        }
        Item {
            labels,
            source: ready.source,
            service: ready.tag,
            received_ms: ready.received_ms,
            observation,
            entry: loki::Entry {
                timestamp: Some(prost_types::Timestamp {
                    seconds: nanos.div_euclid(1_000_000_000),
                    nanos: i32::try_from(nanos.rem_euclid(1_000_000_000)).unwrap_or(0),
                }),
                line,
                structured_metadata: metadata,
            },
        }
    }

    /// Prepares `records` at once, then, in its turn, pushes them in pieces of at most
    /// `batch_bytes` (retrying each until Loki answers for good), counts, and hands its
    /// position to the acker; `false` when `stop` came first (or a push before it stopped).
    async fn push(self, records: Vec<Ready>, stop: CancellationToken, turn: Turn) -> bool {
        let _waiting = Waiting {
            pushing: self.pushing.clone(),
            count: records.len(),
        };
        if let Some(before) = turn.prepared_after {
            // Err: the push before it panicked; its records were never offered.
            let _ = before.await;
        }
        let items = self.prepare(records);
        let _ = turn.prepared.send(());
        // Encoded (protobuf, snappy) before the turn: while the push before waits for
        // Loki's answer, not after it.
        let pieces = self.pieces(items);
        let ours = match turn.after {
            Some(before) => before.await.unwrap_or(false) && self.send_all(pieces, &stop).await,
            None => self.send_all(pieces, &stop).await,
        };
        if ours {
            // The acker ends only after every push did: a failed send cannot happen here.
            let _ = turn.acks.send(turn.acknowledge).await;
        }
        let _ = turn.done.send(ours);
        ours
    }

    /// `items` cut into pieces of at most `batch_bytes`, each encoded as a push, the piece
    /// to send first last (the pieces are split off from the end, so the items are moved
    /// once, not pushed one by one; [`Pusher::send_all`] pops them).
    fn pieces(&self, mut items: Vec<Item>) -> Vec<Piece> {
        // While Loki refuses structured metadata, encoded without it.
        if self.metadata_refused.now() {
            self.strip_metadata(&mut items);
        }
        // Each stream in time order, across the pieces and the halves of a refused one, not
        // only within each push ([`encode`]).
        in_time_order(&mut items);
        // Where each piece after the first starts.
        let mut starts = Vec::new();
        let (mut from, mut bytes) = (0, 0);
        for (i, item) in items.iter().enumerate() {
            let size = item.size();
            if i > from && bytes + size > self.batch_bytes {
                starts.push(i);
                (from, bytes) = (i, 0);
            }
            bytes += size;
        }
        let mut pieces: Vec<Piece> = Vec::with_capacity(starts.len() + 1);
        for &start in starts.iter().rev() {
            pieces.push(Piece::encoded(items.split_off(start)));
        }
        if !items.is_empty() {
            pieces.push(Piece::encoded(items));
        }
        pieces
    }

    /// Pushes `pieces` (from the last); see [`Pusher::push`].
    async fn send_all(&self, mut pieces: Vec<Piece>, stop: &CancellationToken) -> bool {
        // A piece Loki refuses (400) or finds too large (413) is halved until the record
        // at fault is alone, and only that one is dropped (a lone record found too large
        // waits, below): for a 400, when Loki's answer
        // names a reason of the record's own, or names none while Loki takes a probe
        // (else the lone record waits: a tenant or proxy Loki refuses must not drop every
        // record one by one). But where a 400 names the times its rule refused entries of a
        // stream by ([`loki::TimeBounds`]), the stream's entries past them are dropped at
        // once and the rest sent again.
        //
        // Records Loki refused for good: how many, and the first one's stream and reason (one
        // log line per push, not one per record: after a long outage every record of a push
        // may be too old).
        let mut refused: Option<(usize, Arc<str>, String)> = None;
        // A lone record Loki refuses with a 400 naming no reason known here is its own fault
        // if Loki takes a probe (its tenant, authentication and any proxy before it
        // are fine), else Loki's (a tenant it refuses, a proxy's page): so a probe is
        // sent, waited out until Loki takes it, and the record is sent once more; refused
        // again for no reason known, it is dropped (`loki_refused`).
        let mut proven = false;
        // Pushes of one record refused as too large so far (see below).
        let mut too_large = 0_u32;
        while let Some(Piece {
            items: mut piece,
            body,
        }) = pieces.pop()
        {
            // Whether Loki has just taken a probe and this is the record sent again.
            let again = std::mem::take(&mut proven);
            // Loki came to refuse structured metadata after this piece was encoded: encoded
            // again without it.
            let body = if self.metadata_refused.now() && self.strip_metadata(&mut piece) > 0 {
                None
            } else {
                body
            };
            match self.send(&mut piece, body, stop).await {
                None => return false,
                Some(Pushed::Refused(reason))
                    if piece.len() == 1
                        && !again
                        && loki::refusal_reason(&reason) == loki::UNKNOWN_REFUSAL =>
                {
                    if !self.probe(stop).await {
                        return false;
                    }
                    proven = true;
                    pieces.push(Piece::unencoded(piece));
                }
                Some(Pushed::Accepted) => {
                    too_large = 0;
                    // The wall clock as it is (not `now_ms`, held back after the clock
                    // stepped back): the alerts read the last push's time.
                    let now_ms = chrono::Utc::now().timestamp_millis();
                    self.metrics.pushed.inc_by(piece.len() as u64);
                    self.metrics.last_push.set(now_ms.div_euclid(1_000));
                    {
                        let mut derived = crate::lock(&self.derived);
                        for item in &piece {
                            derived.observe(&item.observation, &item.service);
                        }
                    }
                    for item in &piece {
                        self.metrics.observe_delivery(now_ms, item.received_ms);
                    }
                }
                // Loki takes no structured metadata (its configuration, not the records'
                // fault): the records go without it rather than not at all.
                Some(Pushed::Refused(reason))
                    if loki::refusal_reason(&reason) == "disallowed_structured_metadata"
                        && piece
                            .iter()
                            .any(|i| !i.entry.structured_metadata.is_empty()) =>
                {
                    // Once per re-probe period: a standing configuration, not an event.
                    tracing::error!(
                        "Loki refuses structured metadata (limits_config.allow_structured_metadata is off, or its schema is older than v13): records are pushed without their trace id, logger, thread and fields until it is allowed (counted in loki_metadata_refused_total; tried again every 10 minutes)"
                    );
                    self.metadata_refused.refused();
                    self.strip_metadata(&mut piece);
                    pieces.push(Piece::unencoded(piece));
                }
                // Loki refuses a stream without a label its operator enforces as a whole,
                // before its entries, for as long as the rule stands: split by stream
                // rather than in halves, and a stream refused alone is dropped at once,
                // not one record at a time (two requests a record, every push).
                Some(Pushed::Refused(reason))
                    if loki::refusal_reason(&reason) == "missing_enforced_labels" =>
                {
                    let mut streams = by_stream(piece);
                    if streams.len() > 1 {
                        // Popped in the order they came.
                        while let Some(stream) = streams.pop() {
                            pieces.push(Piece::unencoded(stream));
                        }
                    } else if let Some(piece) = streams.pop()
                        && let Some(first_item) = piece.first()
                    {
                        self.metrics
                            .dropped
                            .with_label_values(&[
                                source_label(first_item.source),
                                "missing_enforced_labels",
                            ])
                            .inc_by(piece.len() as u64);
                        let first = refused.get_or_insert_with(|| {
                            let start = reason.ceil_char_boundary(reason.len().saturating_sub(300));
                            (0, first_item.labels.clone(), reason[start..].to_owned())
                        });
                        first.0 += piece.len();
                    }
                }
                Some(pushed @ (Pushed::Refused(_) | Pushed::TooLarge)) if piece.len() > 1 => {
                    // Entries refused for their times, by the bounds Loki's answer gives,
                    // dropped at once, those in a bound's second sent again apart from the
                    // rest (taken, as far as the bounds say); where none was, in halves (a
                    // Loki naming only its last refusal would otherwise cost a round per
                    // second of entries).
                    let bounds = match &pushed {
                        Pushed::Refused(reason) => loki::TimeBounds::read(reason),
                        Pushed::TooLarge | Pushed::Accepted => loki::TimeBounds::default(),
                    };
                    // (Each with the reason its bound gives.)
                    let (mut past, mut rest) = (Vec::new(), Vec::new());
                    for item in piece {
                        match bounds.refused(&item.labels, item.entry.timestamp.as_ref()) {
                            Some(why) => past.push((item, why)),
                            None => rest.push(item),
                        }
                    }
                    if let Pushed::Refused(reason) = &pushed {
                        for (item, why) in &past {
                            self.dropped(&mut refused, item, why, reason);
                        }
                    }
                    if past.is_empty() {
                        let mut first = rest;
                        let second = first.split_off(first.len() / 2);
                        pieces.push(Piece::unencoded(second));
                        pieces.push(Piece::unencoded(first));
                    } else {
                        // In time order, as a stream's entries go: a too-old bound's second
                        // (the stream's oldest left), the rest, a too-new bound's second
                        // (its newest).
                        let (mut oldest, mut middle, mut newest) =
                            (Vec::new(), Vec::new(), Vec::new());
                        for item in rest {
                            match bounds.unsure(&item.labels, item.entry.timestamp.as_ref()) {
                                Some(loki::Unsure::Oldest) => oldest.push(item),
                                Some(loki::Unsure::Newest) => newest.push(item),
                                None => middle.push(item),
                            }
                        }
                        // Popped last to first.
                        for piece in [newest, middle, oldest] {
                            if !piece.is_empty() {
                                pieces.push(Piece::unencoded(piece));
                            }
                        }
                    }
                }
                // A reason Loki gives for this record, or none while it takes a probe:
                // the drop is counted under Loki's own name (`loki_refused` for none known).
                Some(Pushed::Refused(reason)) => {
                    self.dropped(
                        &mut refused,
                        &piece[0],
                        loki::refusal_reason(&reason),
                        &reason,
                    );
                }
                // One record is never too large for Loki (its own limit is 100 MB; a record
                // is at most `parsing.max_record_bytes` and capped metadata): a proxy before
                // it has a smaller body limit. The environment's, not the record's: waited
                // out (an ERROR line each time, as for a refused probe) and sent again.
                Some(Pushed::TooLarge) => {
                    too_large = too_large.saturating_add(1);
                    // (Counted as a `too_large` push, which `MallLokiUnreachable` counts as
                    // it counts failed ones: the output waits until the limit is raised.)
                    tracing::error!(
                        labels = %piece[0].labels,
                        bytes = piece[0].size(),
                        failures = too_large,
                        "a push of one record was refused as too large (413): a proxy before Loki has a body limit below one record, or Loki's own (100 MB by default) was lowered; retrying until it is raised"
                    );
                    if !self.loki.wait(too_large, stop).await {
                        return false;
                    }
                    pieces.push(Piece::unencoded(piece));
                }
            }
        }
        if let Some((count, labels, reason)) = refused {
            // Loki's reason and the first record's stream, never a record's text (Loki's
            // reason quotes labels, not lines).
            tracing::warn!(
                records = count,
                first_labels = %labels,
                first_reason = %reason,
                "Loki refused records of this push for good; they are dropped (counted by reason in records_dropped_total)"
            );
        }
        true
    }

    /// Counts `item` dropped: Loki refused it for good, for `why` (one of its reasons), as
    /// `reason` (its answer) says; the first one dropped in a push is `refused`'s (logged
    /// once the push is done).
    fn dropped(
        &self,
        refused: &mut Option<(usize, Arc<str>, String)>,
        item: &Item,
        why: &'static str,
        reason: &str,
    ) {
        self.metrics
            .dropped
            .with_label_values(&[source_label(item.source), why])
            .inc();
        let first = refused.get_or_insert_with(|| {
            // Loki's message names the labels (logged beside it) before the reason: its
            // end says why.
            let start = reason.ceil_char_boundary(reason.len().saturating_sub(300));
            (0, item.labels.clone(), reason[start..].to_owned())
        });
        first.0 += 1;
    }

    /// Takes the structured metadata off `piece`'s entries (Loki refuses it), counting
    /// the records that had some; how many that is.
    fn strip_metadata(&self, piece: &mut [Item]) -> u64 {
        let mut stripped = 0;
        for item in piece {
            if !item.entry.structured_metadata.is_empty() {
                item.entry.structured_metadata.clear();
                stripped += 1;
            }
        }
        self.metrics.metadata_refused.inc_by(stripped);
        stripped
    }

    /// Sends Loki a push of one stream without entries until it takes one (a 400 naming no
    /// reason is waited out too): its tenant, authentication and any proxy before it are
    /// fine then. `false` when `stop` fired first. Loki skips a stream without entries
    /// before validating it, storing nothing (a push of no streams at all it refuses, 422,
    /// since 3.4).
    async fn probe(&self, stop: &CancellationToken) -> bool {
        let body = loki::encode(&loki::PushRequest {
            streams: vec![loki::Stream {
                labels: r#"{service="log-ingest"}"#.to_owned(),
                ..loki::Stream::default()
            }],
        });
        let pushes = &self.metrics.pushes;
        self.loki
            .push(body, true, stop, |_| {
                pushes.with_label_values(&["failed"]).inc();
            })
            .await
            .is_some()
    }

    /// One push of `items`, as `body` when it was encoded already (else encoded here).
    async fn send(
        &self,
        items: &mut [Item],
        body: Option<Vec<u8>>,
        stop: &CancellationToken,
    ) -> Option<Pushed> {
        let body = body.unwrap_or_else(|| encode(items));
        let pushes = &self.metrics.pushes;
        let outcome = self
            .loki
            .push(body, false, stop, |_| {
                pushes.with_label_values(&["failed"]).inc();
            })
            .await;
        let label = match &outcome {
            Some(Pushed::Accepted) => "accepted",
            Some(Pushed::Refused(_)) => "refused",
            Some(Pushed::TooLarge) => "too_large",
            None => return None,
        };
        pushes.with_label_values(&[label]).inc();
        outcome
    }
}

/// `items` as one push's body, grouped into streams, each stream's entries in time order
/// (stable: entries of one time keep theirs). Their entries are moved into the request to
/// encode it and moved back after (a piece may be sent again, halved).
///
/// A stream's records come in the order they were read, which is not always their times'
/// order: the hosts folded into one `other` stream, a sender whose clock stepped back, two
/// records of one millisecond across a wrap of the tie-breaker. Loki keeps a stream's
/// entries in time order, and takes them out of order only with `unordered_writes` (its
/// default, which log-ingest needs: entries sent again after a refusal or a restart, and
/// hosts of `other` a push apart, reach it out of order); within a push they go in order.
fn encode(items: &mut [Item]) -> Vec<u8> {
    let mut at: HashMap<&str, usize> = HashMap::new();
    let mut streams: Vec<(loki::Stream, Vec<usize>)> = Vec::new();
    for (i, item) in items.iter_mut().enumerate() {
        let s = *at.entry(&item.labels).or_insert_with(|| {
            streams.push((
                loki::Stream {
                    labels: item.labels.to_string(),
                    entries: Vec::new(),
                    hash: 0,
                },
                Vec::new(),
            ));
            streams.len() - 1
        });
        streams[s].0.entries.push(std::mem::take(&mut item.entry));
        streams[s].1.push(i);
    }
    drop(at);
    for (stream, owners) in &mut streams {
        // One pass where they are in order already, as each stream is once
        // [`in_time_order`] has run ([`Pusher::pieces`]); a safeguard for bodies made
        // otherwise.
        if !stream.entries.is_sorted_by_key(entry_time) {
            let mut pairs: Vec<(loki::Entry, usize)> =
                stream.entries.drain(..).zip(owners.drain(..)).collect();
            pairs.sort_by_key(|(entry, _)| entry_time(entry));
            (stream.entries, *owners) = pairs.into_iter().unzip();
        }
    }
    let (streams, owners): (Vec<loki::Stream>, Vec<Vec<usize>>) = streams.into_iter().unzip();
    let mut request = loki::PushRequest { streams };
    let body = loki::encode(&request);
    for (stream, owners) in request.streams.iter_mut().zip(owners) {
        for (entry, i) in stream.entries.drain(..).zip(owners) {
            items[i].entry = entry;
        }
    }
    body
}

/// Puts each stream's items in time order, those of one time in the order they came.
///
/// As a rule they are already: a host writes its lines in time order. Then they are left as
/// they came (one look-up per item), interleaved by host: pieces and halves are cut from
/// them in order, so each stream goes in order across them too. Where a stream is not
/// (hosts folded into `other`, a clock set back, a tie-breaker's wrap), the whole batch is
/// put in time order, by (time, index) keys, the items then swapped into place
/// (`sort_by_cached_key`; an item is about 200 bytes, which a merge sort of the items
/// would move several times). Sorting every batch cost about 3% of the benchmark's
/// throughput, where hosts' chunks interleave.
fn in_time_order(items: &mut [Item]) {
    let mut last: HashMap<&str, Option<(i64, i32)>> = HashMap::new();
    let in_order = items.iter().all(|item| {
        let time = entry_time(&item.entry);
        last.insert(&item.labels, time)
            .is_none_or(|before| before <= time)
    });
    if !in_order {
        drop(last);
        items.sort_by_cached_key(|item| entry_time(&item.entry));
    }
}

/// An entry's time, to sort by.
fn entry_time(entry: &loki::Entry) -> Option<(i64, i32)> {
    entry.timestamp.as_ref().map(|t| (t.seconds, t.nanos))
}

/// Some of a push's items, and their body when encoded already.
#[derive(Debug)]
struct Piece {
    items: Vec<Item>,
    body: Option<Vec<u8>>,
}

impl Piece {
    fn encoded(mut items: Vec<Item>) -> Self {
        let body = encode(&mut items);
        Self {
            items,
            body: Some(body),
        }
    }

    fn unencoded(items: Vec<Item>) -> Self {
        Self { items, body: None }
    }
}

/// Fields in one entry's structured metadata at most, and their names' and values' bytes
/// at most: well inside Loki's defaults (128 entries, 64 KB per entry, over which it
/// refuses the whole entry), so a record with many or large fields still goes, without
/// those that do not fit.
const MAX_FIELDS: usize = 64;
const MAX_FIELD_BYTES: usize = 16 * 1024;

/// The longest logger, thread or folded label value kept in structured metadata (Loki's
/// label value limit): with the fields' 16 KiB, an entry's metadata stays far inside the
/// 64 KB over which Loki refuses the whole entry, so a record is never dropped for a
/// runaway thread name.
const MAX_METADATA_VALUE_BYTES: usize = 2048;

/// Cuts `value` to [`MAX_METADATA_VALUE_BYTES`], at a character boundary.
fn cap_value(value: &mut String) {
    let end = value.floor_char_boundary(MAX_METADATA_VALUE_BYTES);
    value.truncate(end);
}

/// `items` by stream, each stream's in their order, the streams in the order they first
/// came.
fn by_stream(items: Vec<Item>) -> Vec<Vec<Item>> {
    let mut streams: Vec<Vec<Item>> = Vec::new();
    let mut at: HashMap<Arc<str>, usize> = HashMap::new();
    for item in items {
        let s = *at.entry(item.labels.clone()).or_insert_with(|| {
            streams.push(Vec::new());
            streams.len() - 1
        });
        streams[s].push(item);
    }
    streams
}

/// Adds a record's `fields` (JSON keys, OTLP attributes, logfmt pairs, captures, an access
/// log's parts) to its structured metadata, their names made label names (`http.method`
/// → `http_method`, as Loki names OTLP attributes) so LogQL can filter on them. Empty
/// values, names taken already and what passes [`MAX_FIELDS`] or [`MAX_FIELD_BYTES`] are
/// left out; how many of the fields that is.
fn add_fields(
    metadata: &mut Vec<loki::LabelPair>,
    fields: std::collections::BTreeMap<String, String>,
) -> usize {
    let (mut added, mut bytes, mut omitted) = (0, 0, 0);
    for (name, value) in fields {
        if value.is_empty() {
            continue;
        }
        let name = labels::label_name(name);
        if added >= MAX_FIELDS
            || bytes + name.len() + value.len() > MAX_FIELD_BYTES
            || metadata.iter().any(|p| p.name == name)
        {
            omitted += 1;
            continue;
        }
        bytes += name.len() + value.len();
        added += 1;
        metadata.push(loki::LabelPair { name, value });
    }
    omitted
}

/// A push's records, counted (by the pipeline, when it spawned the push) as waiting until the
/// push ends, however it ends. Only the pipeline's loop sets the gauge from the count (no
/// second writer races it); it comes round at least every 100 ms while idle, and as soon
/// as the push it waits for ends.
struct Waiting {
    pushing: Arc<AtomicUsize>,
    count: usize,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.pushing
            .fetch_sub(self.count, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Waits for the oldest push in flight; whether it went through.
async fn finish(in_flight: &mut InFlight) -> bool {
    let Some(push) = in_flight.pop_front() else {
        return true;
    };
    went_through(push.await)
}

/// How a task that failed ended, for a log line: not tokio's error itself, which repeats
/// what a panic said, and that may quote a record (the panic hook logged where it happened).
fn ended(error: &tokio::task::JoinError) -> &'static str {
    if error.is_panic() {
        "panicked"
    } else {
        "was cancelled"
    }
}

/// Whether a push that ended went through (a panic did not).
fn went_through(joined: Result<bool, tokio::task::JoinError>) -> bool {
    match joined {
        Ok(through) => through,
        Err(error) => {
            tracing::error!(
                "a push to Loki {}; its records stay in the buffer",
                ended(&error)
            );
            false
        }
    }
}

/// One Loki entry with its stream.
#[derive(Debug)]
struct Item {
    labels: std::sync::Arc<str>,
    source: Source,
    /// The forward tag or OTLP service (for the derived metrics).
    service: Arc<str>,
    /// What it adds to the derived metrics once Loki accepted it.
    observation: Observation,
    /// When its (first line's) batch was received (0: not known).
    received_ms: i64,
    entry: loki::Entry,
}

impl Item {
    /// About the bytes it adds to a push.
    fn size(&self) -> usize {
        self.labels.len()
            + self.entry.line.len()
            + self
                .entry
                .structured_metadata
                .iter()
                .map(|p| p.name.len() + p.value.len())
                .sum::<usize>()
            + 16
    }
}

/// What to leave with an acknowledgement at `position`, made when everything before
/// `until` has been read: per stream, how many of its lines from `position` on belong to
/// records already completed (pushed with or before the push this acknowledgement follows),
/// so a restart reading again from `position` neither pushes those records again nor
/// their tails as records of their own. Every line read before `until` is in such a record
/// or in its stream's record in progress (or an aside held behind it: see
/// [`multiline`]), which come after them in the stream's order.
/// Forgets what is before `position`.
fn note(streams: &mut Streams, position: Position, until: Position, replay: &Replay) -> Vec<u8> {
    // Per stream, summed: an evicted stream's lines came before those of the stream of the
    // same name opened again after it.
    let mut skips: std::collections::BTreeMap<StreamKey, usize> = std::collections::BTreeMap::new();
    for (key, lines) in &mut streams.evicted {
        *lines = lines.split_off(&position);
        let all: usize = lines.values().sum();
        if all > 0 {
            *skips.entry(key.clone()).or_default() += all;
        }
    }
    streams.evicted.retain(|_, lines| !lines.is_empty());
    for state in streams.open.values_mut() {
        state.batches = state.batches.split_off(&position);
        let Some(&(first, _)) = state.batches.values().next() else {
            continue;
        };
        // From its first line at or after `position` to the first of its record in
        // progress (or to the last it read).
        let skip = state.pending_from().map_or(state.lines, |(line, _)| line) - first;
        if skip > 0 {
            *skips
                .entry((state.tag.to_string(), state.host.to_string()))
                .or_default() += skip;
        }
    }
    // Made while a replay's skips are not used up: a stream's lines still to skip come
    // after those read (every one of which it skipped), and the batches the earlier note
    // covered (OTLP ones included) were pushed before the restart.
    for ((tag, host), left) in &replay.skips {
        *skips.entry((tag.clone(), host.clone())).or_default() += left;
    }
    let until = replay.until.map_or(until, |before| until.max(before));
    let skips: Vec<(String, String, usize)> = skips
        .into_iter()
        .filter(|(_, skip)| *skip > 0)
        .map(|((tag, host), skip)| (tag, host, skip))
        .collect();
    serde_json::to_vec(&Note {
        until: (until.segment, until.offset),
        skips,
        split: replay.split.clone(),
    })
    .unwrap_or_default()
}

/// What a restart reads again that was pushed before it, from the acknowledgement's note.
#[derive(Debug, Default)]
struct Replay {
    /// Per stream, how many of its next lines to skip.
    skips: HashMap<(String, String), usize>,
    /// Before where the note's batches end (`None`: a note from before it said so, whose
    /// skips are for the first batch only).
    until: Option<Position>,
    /// How lines are split now ([`split_of`]), for the notes made from here on.
    split: String,
}

impl Replay {
    /// From a note, for a buffer ending at `end` (a note past the end, where the buffer
    /// lost data, skips nothing: pushing twice is better than skipping lines never pushed).
    fn read(note: &[u8], end: Position, split: String) -> Self {
        let (skips, until) = read_note(note, &split);
        let mut replay = Self {
            skips,
            until,
            split,
        };
        if until.is_some_and(|until| until > end) {
            replay.give_up();
        }
        replay
    }

    /// Whether a batch starting at `at` was read before the note was made (so an OTLP
    /// batch's records, whole when read, were pushed).
    fn pushed_before(&self, at: Position) -> bool {
        self.until.is_some_and(|until| at < until)
    }

    /// Reading has reached `at`: the skips end there (or after the first batch).
    fn reached(&mut self, at: Position) {
        if self.until.is_none_or(|until| at >= until) {
            self.skips.clear();
        }
    }

    /// A batch the note counted cannot be read: the skips stop (left over, they would fall
    /// on later lines never pushed).
    fn give_up(&mut self) {
        self.skips.clear();
        self.until = None;
    }
}

/// An acknowledgement's note, as written.
#[derive(Debug, Serialize, Deserialize)]
struct Note {
    /// Where reading had got to (segment, offset): the skips apply before it.
    until: (u64, u64),
    /// Per stream (tag, host): lines to skip.
    skips: Vec<(String, String, usize)>,
    /// How the lines were told apart and counted ([`split_of`]); empty in notes written
    /// before it was kept.
    #[serde(default)]
    split: String,
}

/// How events are split into streams and lines, for a note: its counts hold only where
/// the events are split the same way after a restart (the same `line_field` and
/// `host_field`, and the same code: [`SPLIT_VERSION`]).
fn split_of(settings: &PipelineSettings) -> String {
    serde_json::to_string(&(SPLIT_VERSION, &settings.line_field, &settings.host_field))
        .unwrap_or_default()
}

/// The version of how events are split into streams and lines: raise it when that changes,
/// so that notes counted the old way are not applied to lines split the new way.
const SPLIT_VERSION: u32 = 1;

/// The skips a note holds, and before where they apply (none when it is empty or
/// unreadable, or when its lines were split otherwise than `split` says: then the records
/// it counted are pushed again, rather than lines never pushed skipped). A note written
/// before `until` was kept (a bare list) applies to the first batch only, as it was meant.
fn read_note(note: &[u8], split: &str) -> (HashMap<(String, String), usize>, Option<Position>) {
    let (skips, until) = match serde_json::from_slice::<Note>(note) {
        Ok(note) if !note.split.is_empty() && note.split != split => {
            tracing::warn!(
                "the buffer's note was made with other `pipeline.line_field` or `host_field` \
                 settings (or another version): records pushed before the restart may be \
                 pushed again, and the tail of one cut there go as a record of its own"
            );
            (Vec::new(), None)
        }
        Ok(note) => (
            note.skips,
            Some(Position {
                segment: note.until.0,
                offset: note.until.1,
            }),
        ),
        Err(_) => (
            serde_json::from_slice::<Vec<(String, String, usize)>>(note).unwrap_or_default(),
            None,
        ),
    };
    let skips = skips
        .into_iter()
        .map(|(tag, host, skip)| ((tag, host), skip))
        .collect();
    (skips, until)
}

/// `text` without one final line terminator (`\n` or `\r\n`): Docker's json-file logs and
/// log4j's `%n` end every line with one, which would otherwise be an empty line of its own
/// (a record of its own, or a blank line added to the message).
fn without_terminator(text: &str) -> &str {
    let text = text.strip_suffix('\n').unwrap_or(text);
    text.strip_suffix('\r').unwrap_or(text)
}

/// The line of an event: its line field, or (without one) the record as JSON so nothing
/// is lost, up to `max_bytes` (`parsing.max_record_bytes`, where it would be cut anyway).
fn line_of<'a>(event: &EventRef<'a>, field: &str, max_bytes: usize) -> std::borrow::Cow<'a, str> {
    event
        .text(field)
        .unwrap_or_else(|| event.to_json(max_bytes).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::Format;

    fn at(offset: u64) -> Position {
        Position { segment: 0, offset }
    }

    fn state(
        lines: usize,
        pending_from: Option<(usize, Position)>,
        batches: &[(Position, (usize, usize))],
    ) -> StreamState {
        let mut state = StreamState {
            grouper: Grouper::default(),
            parser: Parser::new(Format::Line, chrono_tz::UTC),
            source: Source::Forward,
            tag: Arc::from("hybris.wrapper"),
            host: Arc::from("web-1"),
            shown: (Arc::from("hybris.wrapper"), Arc::from("web-1")),
            lines,
            last_line: Instant::now(),
            last_joined: Instant::now(),
            last_line_ms: 0,
            last_joined_ms: 0,
            cut_seen: None,
            resumed: true,
            batches: batches.iter().copied().collect(),
            last_at: Position::default(),
            held_since: None,
        };
        state.pending_from_line(pending_from);
        state
    }

    impl StreamState {
        /// Makes its record in progress one that began at `from` (a line of the stream,
        /// in the batch at a position), or none.
        fn pending_from_line(&mut self, from: Option<(usize, Position)>) {
            self.grouper.flush(&mut Vec::new());
            if let Some((line, at)) = from {
                let caps = Caps {
                    lines: 10,
                    bytes: 100,
                };
                let origin = Origin {
                    at,
                    ..Origin::default()
                };
                let mut out = Vec::new();
                self.grouper
                    .push(&self.parser, caps, "a line", line, origin, &mut out);
                assert!(out.is_empty());
            }
            assert_eq!(self.pending_from(), from);
        }
    }

    #[test]
    fn a_tag_takes_its_own_parser_else_the_longest_matching_pattern() {
        let parsers: std::collections::BTreeMap<String, String> = [
            ("*", "json"),
            ("hybris.*", "hybris-wrapper"),
            ("hybris.access*", "access-log"),
            ("hybris.accesslog", "log4j"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        for (tag, parser) in [
            ("hybris.wrapper", Some("hybris-wrapper")),
            ("hybris.access.1", Some("access-log")),
            ("hybris.accesslog", Some("log4j")),
            ("shop", Some("json")),
        ] {
            assert_eq!(parser_named_for(&parsers, tag), parser, "{tag}");
        }
        let without_catch_all: std::collections::BTreeMap<String, String> =
            [("hybris.*".to_owned(), "hybris-wrapper".to_owned())].into();
        assert_eq!(parser_named_for(&without_catch_all, "shop"), None);
    }

    /// Records in buffer order get growing tie-breakers within a segment, so lines of one
    /// second or millisecond keep their order in Loki; the same place gives the same one.
    #[test]
    fn tie_breakers_follow_the_buffer_and_go_below_the_millisecond_or_microsecond() {
        // Batches of 300 bytes, up to 3 records each (a line's place is below its bytes).
        let ties: Vec<u32> = (0..100_u64)
            .flat_map(|batch| (0..3).map(move |line| tie_breaker(at(batch * 300), line)))
            .collect();
        assert!(ties.windows(2).all(|w| w[0] < w[1]), "{ties:?}");
        assert_eq!(tie_breaker(at(600), 2), tie_breaker(at(600), 2));
        let other = Position {
            segment: 7,
            offset: 600,
        };
        assert_eq!(tie_breaker(other, 2), tie_breaker(other, 2));
        assert!(tie_breaker(other, 0) < 1_000_000);

        let second = 1_730_103_120 * 1_000_000_000_i64;
        // Whole seconds (an access log) and milliseconds: below the millisecond.
        assert_eq!(entry_nanos(second, 123_456), second + 123_456);
        assert_eq!(
            entry_nanos(second + 40_000_000, 999_999),
            second + 40_999_999
        );
        // Microseconds: below the microsecond; nanoseconds replaced.
        assert_eq!(
            entry_nanos(second + 40_123_000, 123_456),
            second + 40_123_456
        );
        assert_eq!(
            entry_nanos(second + 40_123_789, 123_456),
            second + 40_123_456
        );
        // Before 1970 too (times are checked elsewhere; this only must not move past the
        // millisecond).
        assert_eq!(entry_nanos(-1_000_000, 5), -1_000_000 + 5);
    }

    /// An item of stream `labels` with `line`, at `seconds` past 1970.
    fn item_at(labels: &str, line: &str, seconds: i64) -> Item {
        Item {
            labels: Arc::from(labels),
            source: Source::Forward,
            service: Arc::from("shop"),
            observation: Observation::default(),
            received_ms: 0,
            entry: loki::Entry {
                line: line.to_owned(),
                timestamp: Some(prost_types::Timestamp { seconds, nanos: 0 }),
                ..loki::Entry::default()
            },
        }
    }

    /// A push Loki refuses for a label it enforces is split by stream: each stream's records
    /// in their order, the streams in the order they first came.
    #[test]
    fn items_split_by_stream_keep_their_order() {
        let item = |labels: &str, line: &str| item_at(labels, line, 0);
        let items = vec![
            item("{host=\"a\"}", "a1"),
            item("{service=\"x\"}", "x1"),
            item("{host=\"a\"}", "a2"),
            item("{service=\"x\"}", "x2"),
            item("{host=\"b\"}", "b1"),
        ];
        let lines: Vec<Vec<String>> = by_stream(items)
            .iter()
            .map(|s| s.iter().map(|i| i.entry.line.clone()).collect())
            .collect();
        assert_eq!(lines, [vec!["a1", "a2"], vec!["x1", "x2"], vec!["b1"]]);
    }

    /// A push's streams each go in time order (a Loki with ordered writes refuses an entry
    /// older than one before it); the items keep their own entries, in their order, for a
    /// push sent again.
    #[test]
    fn a_push_sends_each_streams_entries_in_time_order() {
        let (a, b) = ("{host=\"a\"}", "{host=\"other\"}");
        let sent = [
            (b, "b at 30", 30),
            (a, "a at 10", 10),
            (b, "b at 10", 10),
            (a, "a at 20", 20),
            (b, "b at 20, first", 20),
            (b, "b at 20, second", 20),
            (b, "b at 5", 5),
        ];
        let mut items: Vec<Item> = sent
            .iter()
            .map(|(labels, line, seconds)| item_at(labels, line, *seconds))
            .collect();
        let request = loki::decode(&encode(&mut items)).expect("decodes");
        let pushed: Vec<(&str, Vec<&str>)> = request
            .streams
            .iter()
            .map(|s| {
                let lines = s.entries.iter().map(|e| e.line.as_str()).collect();
                (s.labels.as_str(), lines)
            })
            .collect();
        assert_eq!(
            pushed,
            [
                (
                    b,
                    vec![
                        "b at 5",
                        "b at 10",
                        "b at 20, first",
                        "b at 20, second",
                        "b at 30"
                    ]
                ),
                (a, vec!["a at 10", "a at 20"]),
            ]
        );
        let kept: Vec<(&str, &str, i64)> = items
            .iter()
            .map(|i| {
                let seconds = i.entry.timestamp.as_ref().map_or(-1, |t| t.seconds);
                (&*i.labels, i.entry.line.as_str(), seconds)
            })
            .collect();
        assert_eq!(kept, sent, "each item keeps its own entry, in its place");
    }

    /// A batch with a stream out of order is put in time order as a whole before it is cut
    /// in pieces, items of one time in the order they came, whatever their stream (200 of
    /// them, past the lengths a sort handles by insertion, which would keep ties in order
    /// whatever its keys); one whose streams are each in order is left as it came.
    #[test]
    fn a_batch_goes_in_time_order_ties_as_they_came() {
        let streams = ["{host=\"a\"}", "{host=\"b\"}"];
        let mut items: Vec<Item> = (0..200_i64)
            .map(|i| item_at(streams[(i % 2) as usize], &i.to_string(), (i * 7) % 3))
            .collect();
        in_time_order(&mut items);
        // Each stream in order already, interleaved: left as they came.
        let (a, b) = (streams[0], streams[1]);
        let mut interleaved = vec![
            item_at(a, "a 5", 5),
            item_at(b, "b 1", 1),
            item_at(a, "a 6", 6),
            item_at(b, "b 2", 2),
        ];
        in_time_order(&mut interleaved);
        let lines: Vec<&str> = interleaved.iter().map(|i| i.entry.line.as_str()).collect();
        assert_eq!(lines, ["a 5", "b 1", "a 6", "b 2"]);
        let got: Vec<(i64, i64)> = items
            .iter()
            .map(|item| {
                let seconds = item.entry.timestamp.as_ref().map_or(-1, |t| t.seconds);
                (seconds, item.entry.line.parse().expect("a number"))
            })
            .collect();
        let mut want: Vec<(i64, i64)> = (0..200).map(|i| ((i * 7) % 3, i)).collect();
        want.sort_unstable();
        assert_eq!(got, want, "by time, then in the order they came");
    }

    #[test]
    fn fields_join_the_structured_metadata_within_its_bounds() {
        let pair = |name: &str, value: &str| loki::LabelPair {
            name: name.to_owned(),
            value: value.to_owned(),
        };
        let mut metadata = vec![pair("logger", "a.B")];
        let fields = [
            ("http.method", "GET"),
            ("logger", "taken already"),
            ("empty", ""),
            ("big", &"x".repeat(MAX_FIELD_BYTES)),
            ("status", "500"),
            // A name Loki 3.7+ would store as `http_method` too, overwriting one value.
            ("http:.method", "POST"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(add_fields(&mut metadata, fields), 3);
        assert_eq!(
            metadata,
            [
                pair("logger", "a.B"),
                pair("http_method", "GET"),
                pair("status", "500")
            ]
        );
        let many = (0..MAX_FIELDS + 5)
            .map(|i| (format!("f{i:03}"), "v".to_owned()))
            .collect();
        let mut metadata = Vec::new();
        assert_eq!(add_fields(&mut metadata, many), 5);
        assert_eq!(metadata.len(), MAX_FIELDS);
    }

    /// The head of a cut trace is kept for [`CUT_KEPT`] from when it was first seen,
    /// whatever comes meanwhile that leaves it (the wrapper's lines); a new cut has its own
    /// clock. By the clock, or by when the lines read arrived (a backlog read in moments).
    #[test]
    fn a_cut_traces_head_is_forgotten_a_while_after_the_cut() {
        let mut s = state(0, None, &[]);
        s.parser = Parser::new(Format::Wrapper, chrono_tz::Asia::Seoul);
        let caps = Caps {
            lines: 100,
            bytes: 10_000,
        };
        let push = |s: &mut StreamState, line: &str| {
            let mut out = Vec::new();
            s.grouper
                .push(&s.parser, caps, line, 0, Origin::default(), &mut out);
        };
        let cut = |s: &mut StreamState| {
            push(
                s,
                "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | ERROR [main] [X] failed",
            );
            push(s, "\tat a.B.c(B.java:1)");
            assert!(s.complete_quiet(&mut Vec::new()));
        };
        let t0 = Instant::now();
        cut(&mut s);
        s.age_cut(t0, 0);
        let first = s.grouper.cut().expect("a head kept");
        // A wrapper line starts a record meanwhile: the head stays, on the same clock.
        push(
            &mut s,
            "ERROR  | wrapper  | 2024/10/28 17:12:31 | JVM appears hung: Timed out waiting for signal from JVM.",
        );
        s.age_cut(t0 + CUT_KEPT - Duration::from_secs(1), 0);
        assert_eq!(s.grouper.cut(), Some(first));
        s.age_cut(t0 + CUT_KEPT, 0);
        assert_eq!(s.grouper.cut(), None);
        // Another cut, later: its own clock.
        cut(&mut s);
        let second = s.grouper.cut().expect("a head kept");
        assert_ne!(second, first);
        let t1 = t0 + CUT_KEPT + Duration::from_secs(5);
        s.age_cut(t1, 0);
        s.age_cut(t1 + CUT_KEPT - Duration::from_secs(1), 0);
        assert_eq!(s.grouper.cut(), Some(second));
        s.age_cut(t1 + CUT_KEPT, 0);
        assert_eq!(s.grouper.cut(), None);
        // In a backlog: lines that arrived a minute after the cut, read a second after it.
        let arrived = 1_730_103_120_000_i64;
        cut(&mut s);
        let third = s.grouper.cut().expect("a head kept");
        let t2 = t1 + CUT_KEPT + Duration::from_secs(5);
        s.age_cut(t2, arrived);
        s.age_cut(t2 + Duration::from_secs(1), arrived + 59_999);
        assert_eq!(s.grouper.cut(), Some(third));
        // Arrival times not known (0) judge nothing.
        s.age_cut(t2 + Duration::from_secs(1), 0);
        assert_eq!(s.grouper.cut(), Some(third));
        s.age_cut(t2 + Duration::from_secs(1), arrived + 60_000);
        assert_eq!(s.grouper.cut(), None);
    }

    /// Eviction takes a stream with nothing to keep before an older one with a record in
    /// progress or lines not yet acknowledged.
    #[test]
    fn eviction_takes_streams_with_nothing_to_keep_first_then_the_quietest() {
        let key = |host: &str| ("hybris.wrapper".to_owned(), host.to_owned());
        let earlier = Instant::now();
        let later = earlier + Duration::from_secs(1);
        let mut streams = Streams::default();
        let mut unacknowledged = state(1, None, &[(at(10), (0, 1))]);
        unacknowledged.last_line = earlier;
        let mut idle = state(1, None, &[]);
        idle.last_line = later;
        let mut quieter = state(1, None, &[(at(20), (0, 1))]);
        quieter.last_line = earlier - Duration::from_secs(1);
        streams.open.insert(key("web-1"), unacknowledged);
        streams.open.insert(key("web-2"), idle);
        streams.open.insert(key("web-3"), quieter);
        assert_eq!(streams.to_evict(1), [key("web-2")]);
        let mut two = streams.to_evict(2);
        two.sort();
        assert_eq!(two, [key("web-2"), key("web-3")]);
        assert_eq!(streams.to_evict(9).len(), 3);
    }

    /// Past `max_pending_bytes` the largest records in progress are completed, largest
    /// first, until three quarters of it are held; the others keep theirs.
    #[test]
    fn records_in_progress_past_their_bound_complete_largest_first_to_three_quarters() {
        let key = |host: &str| ("hybris.wrapper".to_owned(), host.to_owned());
        let pending = |host: &str, len: usize| {
            let mut s = state(1, None, &[]);
            s.host = Arc::from(host);
            s.shown.1 = Arc::from(host);
            let caps = Caps {
                lines: 10,
                bytes: 10_000,
            };
            let mut out = Vec::new();
            s.grouper.push(
                &s.parser,
                caps,
                &"x".repeat(len),
                0,
                Origin::default(),
                &mut out,
            );
            assert!(out.is_empty());
            assert_eq!(s.grouper.pending_len(), len);
            s
        };
        let streams = || {
            let mut streams = Streams::default();
            for (host, len) in [("a", 100), ("b", 400), ("c", 300), ("d", 50)] {
                streams.open.insert(key(host), pending(host, len));
            }
            streams.open.insert(key("idle"), state(1, None, &[]));
            streams
        };
        let held = |streams: &Streams| -> Vec<(String, usize)> {
            let mut held: Vec<_> = streams
                .open
                .iter()
                .map(|(k, s)| (k.1.clone(), s.grouper.pending_len()))
                .collect();
            held.sort();
            held
        };
        let hosts =
            |ready: &[Ready]| -> Vec<String> { ready.iter().map(|r| r.host.to_string()).collect() };

        // 850 held, within 850: nothing.
        let mut within = streams();
        let mut ready = Vec::new();
        assert_eq!(within.complete_largest_past(850, &mut ready), 0);
        assert!(ready.is_empty());

        // Past 600: the largest (400) brings it to 450, three quarters of 600.
        let mut past = streams();
        assert_eq!(past.complete_largest_past(600, &mut ready), 1);
        assert_eq!(hosts(&ready), ["b"]);
        assert_eq!(ready[0].record.text_len(), 400, "completed whole");
        let want = |v: &[(&str, usize)]| -> Vec<(String, usize)> {
            v.iter().map(|(h, l)| ((*h).to_owned(), *l)).collect()
        };
        assert_eq!(
            held(&past),
            want(&[("a", 100), ("b", 0), ("c", 300), ("d", 50), ("idle", 0)])
        );

        // Past 500: 400 leaves 450, within 500 but not within 375; then 300, leaving 150.
        let mut far = streams();
        ready.clear();
        assert_eq!(far.complete_largest_past(500, &mut ready), 2);
        assert_eq!(hosts(&ready), ["b", "c"]);
        assert_eq!(
            held(&far),
            want(&[("a", 100), ("b", 0), ("c", 0), ("d", 50), ("idle", 0)])
        );
    }

    /// A stream evicted and opened again: the note skips the evicted one's lines, then the
    /// lines of the one opened again before its record in progress, in every batch from the
    /// acknowledged one on.
    #[test]
    fn a_note_counts_an_evicted_streams_lines_before_those_of_the_stream_opened_again() {
        let key = ("hybris.wrapper".to_owned(), "web-1".to_owned());
        let mut streams = Streams::default();
        streams
            .evicted
            .insert(key.clone(), [(at(0), 3), (at(10), 2)].into());
        // Opened again in the batch at 10: five lines there and four at 20, the record in
        // progress from its second line.
        streams.open.insert(
            key.clone(),
            state(9, Some((1, at(10))), &[(at(10), (0, 5)), (at(20), (5, 4))]),
        );
        let (skips, until) = read_note(&note(&mut streams, at(10), at(30), &Replay::default()), "");
        assert_eq!(skips.get(&key), Some(&(2 + 1)));
        assert_eq!(until, Some(at(30)));
        assert_eq!(
            streams.evicted[&key].keys().copied().collect::<Vec<_>>(),
            [at(10)]
        );
        // Its record in progress began in the batch at 20, at its eighth line: the seven
        // before it are in records pushed, in both batches.
        streams
            .open
            .get_mut(&key)
            .expect("open")
            .pending_from_line(Some((7, at(20))));
        let (skips, _) = read_note(&note(&mut streams, at(10), at(30), &Replay::default()), "");
        assert_eq!(skips.get(&key), Some(&(2 + 7)));
        // Past every batch the evicted one had: forgotten; no record in progress: every
        // line from the acknowledged batch on.
        streams
            .open
            .get_mut(&key)
            .expect("open")
            .pending_from_line(None);
        let (skips, _) = read_note(&note(&mut streams, at(20), at(30), &Replay::default()), "");
        assert_eq!(skips.get(&key), Some(&4));
        assert!(streams.evicted.is_empty());
    }

    /// A note made while a replay still has lines to skip carries them on, to where the
    /// earlier note's batches end; a note past the buffer's end skips nothing.
    #[test]
    fn a_note_made_during_a_replay_keeps_what_is_left_to_skip() {
        let key = ("hybris.wrapper".to_owned(), "web-1".to_owned());
        let mut streams = Streams::default();
        // Four of its lines read again (all skipped: no record in progress), six to go.
        streams.open.insert(
            key.clone(),
            state(4, None, &[(at(10), (0, 2)), (at(20), (2, 2))]),
        );
        let split = split_of(&PipelineSettings::default());
        let replay = Replay {
            skips: [(key.clone(), 6)].into_iter().collect(),
            until: Some(at(50)),
            split: split.clone(),
        };
        let written = note(&mut streams, at(10), at(30), &replay);
        let (skips, until) = read_note(&written, &split);
        assert_eq!(skips.get(&key), Some(&(4 + 6)));
        assert_eq!(until, Some(at(50)));
        assert!(Replay::read(&written, at(50), split.clone()).skips.len() == 1);
        let lost = Replay::read(&written, at(40), split);
        assert!(lost.skips.is_empty() && lost.until.is_none());
    }

    /// A note counted with other `line_field` or `host_field` settings skips nothing after
    /// the restart (its counts are of other lines, or other streams); one from before notes
    /// said how they split lines is read as before.
    #[test]
    fn a_note_of_lines_split_otherwise_skips_nothing() {
        let key = ("hybris.wrapper".to_owned(), "web-1".to_owned());
        let mut streams = Streams::default();
        streams
            .open
            .insert(key.clone(), state(4, None, &[(at(10), (0, 4))]));
        let settings = PipelineSettings::default();
        let replay = Replay {
            split: split_of(&settings),
            ..Replay::default()
        };
        let written = note(&mut streams, at(10), at(30), &replay);
        assert_eq!(
            read_note(&written, &split_of(&settings)).0.get(&key),
            Some(&4)
        );
        let other = PipelineSettings {
            host_field: "hostname".to_owned(),
            ..PipelineSettings::default()
        };
        assert_eq!(
            read_note(&written, &split_of(&other)),
            (HashMap::new(), None)
        );
        let older = br#"{"until":[0,30],"skips":[["hybris.wrapper","web-1",4]]}"#;
        assert_eq!(read_note(older, &split_of(&other)).0.get(&key), Some(&4));
    }

    /// A note as written before it said where its skips end applies to the first batch.
    #[test]
    fn a_note_without_its_end_is_read_as_before() {
        let (skips, until) = read_note(br#"[["hybris.wrapper","web-1",3]]"#, "");
        assert_eq!(
            skips.get(&("hybris.wrapper".to_owned(), "web-1".to_owned())),
            Some(&3)
        );
        assert_eq!(until, None);
        assert_eq!(read_note(b"", "").0.len(), 0);
    }
}
