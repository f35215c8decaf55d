//! The Fluent forward protocol (v1), as Fluent Bit's `forward` output and the fluent-logger
//! libraries send it: decoding of one message, and the answers we write.
//!
//! A connection carries a sequence of MessagePack values. [`Scan`] finds where the next
//! one ends without decoding it, going on where it stopped as more arrives (so a slow
//! sender costs one look at each byte, not one decode per read, and a declared length can
//! never make us allocate more than what arrived); then
//! [`decode`] reads it as one of the protocol's modes:
//! - Message: `[tag, time, record]` or `[tag, time, record, options]`;
//! - Forward: `[tag, [[time, record], …], options?]`;
//! - PackedForward: `[tag, bin or str of concatenated [time, record], options?]`;
//! - CompressedPackedForward: the same with `options.compressed = "gzip"` (one or more
//!   concatenated gzip members; `"text"`, as fluent-logger sends, means not compressed).
//!
//! A time is an integer (seconds), EventTime (MessagePack extension 0: seconds and
//! nanoseconds, big-endian u32 each, as fixext8 or ext8), or `[time, {metadata}]` (Fluent
//! Bit's event format with metadata). A `nil` value is a TCP heartbeat. With a `chunk`
//! option the sender wants `{"ack": chunk}` back ([`ack`]), the chunk echoed byte for byte.
//! Fluent Bit's group markers (EventTime `0xFFFFFFFF` or `0xFFFFFFFE` seconds) are not
//! records and are skipped; a message whose `fluent_signal` option names metrics or traces
//! is [`Frame::NotLogs`].
//!
//! The scanner is ours (no MessagePack crate answers "is a whole value here yet?" without
//! decoding it), and it also cuts a message into its parts: records are not decoded here,
//! only checked to be whole maps and copied as they came ([`crate::batch::Events`]); the
//! small parts (times, options) are decoded with `rmpv`, gzip with `flate2`.

use std::io::Read as _;

use rmpv::Value;

use crate::batch::{Events, is_map, split_value};

/// Why a frame is refused (the connection is closed, with this in a log line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Garbage {
    /// Bytes that are not MessagePack (0xc1), or nesting deeper than logs ever need.
    #[error("not MessagePack: {0}")]
    NotMessagePack(&'static str),
    /// A value larger than the configured limit.
    #[error("a message of more than {0} bytes")]
    TooLarge(usize),
    /// MessagePack, but not a forward-protocol message.
    #[error("not a forward protocol message: {0}")]
    NotForward(&'static str),
    /// A compressed entry stream that does not inflate.
    #[error("compressed entries do not inflate: {0}")]
    Compression(String),
}

/// Deepest nesting of arrays and maps accepted (a log record is rarely deeper than 4).
pub const MAX_DEPTH: usize = 32;

/// The length of the MessagePack value at the start of `buf`: `Ok(None)` while it is
/// incomplete (read more); an error for bytes that are not MessagePack, nesting past
/// [`MAX_DEPTH`], or a value that is, or declares itself, longer than `max` bytes.
///
/// # Errors
/// [`Garbage::NotMessagePack`] or [`Garbage::TooLarge`].
pub fn frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, Garbage> {
    Scan::default().resume(buf, max)
}

/// A scan for the end of one MessagePack value that goes on where it stopped when more of
/// it arrives: each byte is looked at once however slowly the value comes (a scan from the
/// start after every read would cost a sender trickling a message of millions of tiny
/// items quadratic time, holding a worker).
#[derive(Debug, Clone)]
pub struct Scan {
    /// Items still to read at each open level (innermost last); on the stack, since a scan
    /// also runs once per record and per looked-up field.
    open: [u64; MAX_DEPTH],
    depth: usize,
    /// Where the next item starts (past the end of what arrived while a string's bytes are
    /// still to come).
    pos: usize,
    /// Items still to read at the current level.
    pending: u64,
}

impl Default for Scan {
    fn default() -> Self {
        Self {
            open: [0; MAX_DEPTH],
            depth: 0,
            pos: 0,
            pending: 1,
        }
    }
}

impl Scan {
    /// [`frame_len`] of `buf`, which holds what an earlier call on this scan saw and
    /// perhaps more after it (the same bytes at the start: they are not looked at again).
    ///
    /// # Errors
    /// As [`frame_len`]; after an error the scan means nothing.
    pub fn resume(&mut self, buf: &[u8], max: usize) -> Result<Option<usize>, Garbage> {
        loop {
            if self.pos > buf.len() {
                // A string's or extension's bytes are still arriving.
                return Ok(None);
            }
            if self.pending == 0 {
                if self.depth == 0 {
                    return Ok(Some(self.pos));
                }
                self.depth -= 1;
                self.pending = self.open[self.depth];
                continue;
            }
            let pos = self.pos;
            let Some(&byte) = buf.get(pos) else {
                return Ok(None);
            };
            let need = |n: usize| -> Option<u64> {
                buf.get(pos + 1..pos + 1 + n)
                    .map(|b| b.iter().fold(0_u64, |acc, x| acc << 8 | u64::from(*x)))
            };
            // (bytes of header, bytes of payload, items it contains); `None`: the header
            // is not all here yet (nothing is taken: the item is read again whole).
            let Some((header, payload, items)) = item(byte, need)? else {
                return Ok(None);
            };
            self.pending -= 1;
            let end = (pos as u64)
                .saturating_add(header as u64)
                .saturating_add(payload);
            // Every item takes at least a byte: a declared count past the limit is refused
            // now.
            if end.saturating_add(items) > max as u64 {
                return Err(Garbage::TooLarge(max));
            }
            self.pos = usize::try_from(end).map_err(|_| Garbage::TooLarge(max))?;
            if items > 0 {
                if self.depth >= MAX_DEPTH {
                    return Err(Garbage::NotMessagePack("nested too deeply"));
                }
                self.open[self.depth] = self.pending;
                self.depth += 1;
                self.pending = items;
            }
        }
    }
}

/// The item whose marker is `byte`: (bytes of header, bytes of payload, items it
/// contains), or `None` while the bytes of its length (`need(n)`: the `n` after the
/// marker) have not all arrived.
fn item(
    byte: u8,
    need: impl Fn(usize) -> Option<u64>,
) -> Result<Option<(usize, u64, u64)>, Garbage> {
    let with = |n: usize, header: usize, shape: fn(u64) -> (u64, u64)| {
        need(n).map(|len| {
            let (payload, items) = shape(len);
            (header, payload, items)
        })
    };
    let bytes = |len: u64| (len, 0);
    let array = |len: u64| (0, len);
    let map = |len: u64| (0, len * 2);
    Ok(match byte {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => Some((1, 0, 0)),
        0x80..=0x8f => Some((1, 0, u64::from(byte & 0x0f) * 2)),
        0x90..=0x9f => Some((1, 0, u64::from(byte & 0x0f))),
        0xa0..=0xbf => Some((1, u64::from(byte & 0x1f), 0)),
        0xc1 => return Err(Garbage::NotMessagePack("byte 0xc1 is never used")),
        0xc4 | 0xd9 => with(1, 2, bytes),
        0xc5 | 0xda => with(2, 3, bytes),
        0xc6 | 0xdb => with(4, 5, bytes),
        // ext 8/16/32: length, then a type byte.
        0xc7 => with(1, 3, bytes),
        0xc8 => with(2, 4, bytes),
        0xc9 => with(4, 6, bytes),
        0xca => Some((1, 4, 0)),
        0xcb => Some((1, 8, 0)),
        0xcc | 0xd0 => Some((1, 1, 0)),
        0xcd | 0xd1 => Some((1, 2, 0)),
        0xce | 0xd2 => Some((1, 4, 0)),
        0xcf | 0xd3 => Some((1, 8, 0)),
        // fixext 1/2/4/8/16: a type byte, then the data.
        0xd4 => Some((2, 1, 0)),
        0xd5 => Some((2, 2, 0)),
        0xd6 => Some((2, 4, 0)),
        0xd7 => Some((2, 8, 0)),
        0xd8 => Some((2, 16, 0)),
        0xdc => with(2, 3, array),
        0xdd => with(4, 5, array),
        0xde => with(2, 3, map),
        0xdf => with(4, 5, map),
    })
}

/// One decoded forward message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Its tag (Fluent Bit's `Tag`: the source, such as `hybris.wrapper`).
    pub tag: String,
    /// Its events, in order, each record as the sender encoded it (not decoded).
    pub events: Events,
    /// The `chunk` option as it was encoded (a MessagePack value), to echo in the ack.
    pub chunk: Option<Vec<u8>>,
}

/// One event, decoded: a time and a record (OTLP's records before they are buffered; a
/// buffered event on the paths that need every field).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Nanoseconds since the Unix epoch.
    pub time_nanos: i64,
    /// The record's keys and values (a `log` line, a host, a file, …).
    pub record: Vec<(Value, Value)>,
}

/// A str or bin value as text.
pub fn text(value: &Value) -> Option<std::borrow::Cow<'_, str>> {
    match value {
        // Checked as UTF-8 when decoded already: only invalid text is checked again.
        Value::String(s) => Some(match s.as_str() {
            Some(text) => std::borrow::Cow::Borrowed(text),
            None => String::from_utf8_lossy(s.as_bytes()),
        }),
        Value::Binary(b) => Some(String::from_utf8_lossy(b)),
        _ => None,
    }
}

/// What one frame is.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// `nil`: a TCP heartbeat; nothing to do.
    Heartbeat,
    /// A message of events.
    Message(Message),
    /// A message of metrics, traces or another signal that is not logs (Fluent Bit's
    /// `fluent_signal` option, when a `forward` output matches a metrics or traces input):
    /// nothing here reads it. Its `chunk` is acknowledged all the same, or the sender would
    /// retry it for ever (with `Retry_Limit no_limits`), its stuck chunks counting against
    /// the output's storage limit, which then drops the oldest chunks: logs among them.
    NotLogs {
        /// The message's tag.
        tag: String,
        /// The `fluent_signal` value (1 metrics, 2 traces, and so on).
        signal: i64,
        /// The `chunk` option as encoded, if any.
        chunk: Option<Vec<u8>>,
    },
}

/// Decodes the frame `bytes` (exactly one value, as [`frame_len`] found it); compressed
/// entries may inflate to at most `max_inflated` bytes, and the message's events with its
/// tag may weigh that much at most ([`Events::weight`]: a few kilobytes of gzip can inflate
/// to millions of empty entries, each taking memory and buffer space far beyond its size),
/// so what is decoded always fits the buffer's segment (at least `max_inflated` + 1 MiB).
///
/// The records are checked to be whole maps and copied as they are: nothing of a record
/// is decoded here (the pipeline reads the fields it needs after the buffer).
///
/// # Errors
/// [`Garbage`] when it is not a forward protocol message.
pub fn decode(bytes: &[u8], max_inflated: usize) -> Result<Frame, Garbage> {
    let undecodable = || Garbage::NotMessagePack("a value does not decode");
    let mut rest = bytes;
    match bytes.first() {
        Some(0xc0) => return Ok(Frame::Heartbeat),
        Some(0x90..=0x9f | 0xdc | 0xdd) => {}
        Some(_) => return Err(Garbage::NotForward("a message is an array")),
        None => return Err(undecodable()),
    }
    let count = rmp::decode::read_array_len(&mut rest).map_err(|_| undecodable())?;
    if !(2..=4).contains(&count) {
        return Err(Garbage::NotForward("a message has 2 to 4 elements"));
    }
    let (tag, after) = split_value(rest).ok_or_else(undecodable)?;
    rest = after;
    let tag = match str_payload(tag) {
        Some(tag) => std::str::from_utf8(tag)
            .map_err(|_| Garbage::NotForward("the tag is not UTF-8"))?
            .to_owned(),
        None => return Err(Garbage::NotForward("the tag is not a string")),
    };
    let after_tag = rest;
    // Forward mode: `[tag, [[time, record], …], options?]`. Its entries are read where they
    // lie, not first cut out as one part and then again one by one.
    if let Some(entries) = forward_entries(rest) {
        if count > 3 {
            return Err(Garbage::NotForward("forward modes have 2 or 3 elements"));
        }
        let mut rest = entries.rest;
        // A time may grow from 1 to 9 bytes as a buffered integer.
        // A count the sender declared is believed only as far as its bytes could hold
        // (an entry takes 3 at least).
        let believed = (entries.count as usize).min(rest.len() / 3);
        let mut events = Events::for_batch(
            &tag,
            (rest.len() + 8 * believed).min(max_inflated),
            Some(believed),
        );
        for _ in 0..entries.count {
            match push_entry(&mut events, rest) {
                Some(Ok(after)) => rest = after,
                // Metrics or traces in Forward mode (Fluent Bit's `fluentd_compat`) are not
                // entries of records; their options, after them, say so.
                failed => {
                    let error = match failed {
                        Some(Err(error)) => error,
                        _ => undecodable(),
                    };
                    return match other_signal(&tag, count, after_tag)? {
                        Some(frame) => Ok(frame),
                        None => Err(error),
                    };
                }
            }
            within(&events, &tag, max_inflated)?;
        }
        let options = match count {
            3 => Some(split_value(rest).ok_or_else(undecodable)?.0),
            _ => None,
        };
        if let Some(signal) = signal(options)?.filter(|s| *s != LOGS) {
            return Ok(Frame::NotLogs {
                tag,
                signal,
                chunk: chunk(options)?,
            });
        }
        return message(tag, events, options, max_inflated);
    }
    // The other modes' parts, whole.
    let mut parts: [&[u8]; 4] = [&[]; 4];
    for part in parts.iter_mut().take(count as usize).skip(1) {
        let (value, after) = split_value(rest).ok_or_else(undecodable)?;
        *part = value;
        rest = after;
    }
    // Message mode's third element is the record; PackedForward's is the options (a map
    // too), so the second tells them apart: a time (which may itself be `[time,
    // metadata]`), or entries as bin or str.
    let is_time = matches!(
        parts[1][0],
        0x00..=0x7f | 0xe0..=0xff | 0xcc..=0xd3 | 0xca | 0xcb | 0xc7..=0xc9 | 0xd4..=0xd8 | 0x90..=0x9f | 0xdc | 0xdd
    );
    let message_mode = count >= 3 && is_map(parts[2]) && is_time;
    if !message_mode && count > 3 {
        return Err(Garbage::NotForward("forward modes have 2 or 3 elements"));
    }
    // [tag, time, record, options?] or [tag, packed entries, options?]
    let options_at = if message_mode { 3 } else { 2 };
    let options = (count as usize > options_at).then(|| parts[options_at]);
    // Metrics and traces come as PackedForward of their own encoding, not entries.
    if let Some(signal) = signal(options)?.filter(|s| *s != LOGS) {
        return Ok(Frame::NotLogs {
            tag,
            signal,
            chunk: chunk(options)?,
        });
    }
    let events = if message_mode {
        let mut events = Events::for_batch(&tag, parts[2].len() + 16, Some(1));
        let nanos = time_nanos_of(parts[1])?;
        if !is_group_marker(parts[1]) {
            events.push_raw(nanos, parts[2]);
        }
        events
    } else {
        match str_payload(parts[1]).or_else(|| bin_payload(parts[1])) {
            Some(packed_entries) => packed(packed_entries, options, max_inflated, &tag)?,
            None => return Err(Garbage::NotForward("entries are an array, bin or str")),
        }
    };
    message(tag, events, options, max_inflated)
}

/// Forward mode's entries at the start of `bytes`: an array that is empty or whose first
/// element is an array (a time written as `[time, metadata]` starts with a time).
struct ForwardEntries<'a> {
    count: u32,
    rest: &'a [u8],
}

fn forward_entries(bytes: &[u8]) -> Option<ForwardEntries<'_>> {
    if !matches!(bytes.first(), Some(0x90..=0x9f | 0xdc | 0xdd)) {
        return None;
    }
    let mut rest = bytes;
    let count = rmp::decode::read_array_len(&mut rest).ok()?;
    (count == 0 || matches!(rest.first(), Some(0x90..=0x9f | 0xdc | 0xdd)))
        .then_some(ForwardEntries { count, rest })
}

/// The `chunk` option exactly as the sender encoded it (the ack echoes it byte for byte),
/// from the options (a map or nil, if any).
fn chunk(options: Option<&[u8]>) -> Result<Option<Vec<u8>>, Garbage> {
    Ok(option(options, b"chunk")?.map(<[u8]>::to_vec))
}

/// A message of `events` tagged `tag`, with the `chunk` of its options; refused when they
/// weigh more than `max` together (the chunk id may be stored with the batch, which must
/// fit a segment).
fn message(
    tag: String,
    events: Events,
    options: Option<&[u8]>,
    max: usize,
) -> Result<Frame, Garbage> {
    let chunk = chunk(options)?;
    let chunk_len = chunk.as_ref().map_or(0, Vec::len);
    if events
        .weight()
        .saturating_add(tag.len())
        .saturating_add(chunk_len)
        > max
    {
        return Err(Garbage::TooLarge(max));
    }
    Ok(Frame::Message(Message { tag, events, chunk }))
}

/// Fluent Bit's `fluent_signal` for logs.
const LOGS: i64 = 0;

/// The `fluent_signal` option (Fluent Bit's: 0 logs, 1 metrics, 2 traces, 3 blobs, 4
/// profiles), from the options (a map or nil, if any); `None` without it.
fn signal(options: Option<&[u8]>) -> Result<Option<i64>, Garbage> {
    let Some(value) = option(options, b"fluent_signal")? else {
        return Ok(None);
    };
    // An integer takes 9 bytes at most: anything longer is refused undecoded (decoded, a
    // few megabytes of nils would take tens of times that).
    if value.len() > 9 {
        return Err(Garbage::NotForward("fluent_signal is an integer"));
    }
    match read(value)? {
        // Past i64: no signal Fluent Bit knows, and not logs.
        Value::Integer(i) => Ok(Some(i.as_i64().unwrap_or(i64::MAX))),
        _ => Err(Garbage::NotForward("fluent_signal is an integer")),
    }
}

/// The value of the option `name` (a str key), whole as encoded, from the options (a map
/// or nil, if any).
fn option<'a>(options: Option<&'a [u8]>, name: &[u8]) -> Result<Option<&'a [u8]>, Garbage> {
    let undecodable = || Garbage::NotMessagePack("a value does not decode");
    let Some(options) = options.filter(|o| o.first() != Some(&0xc0)) else {
        return Ok(None);
    };
    if !is_map(options) {
        return Err(Garbage::NotForward("options are a map"));
    }
    let mut rest = options;
    let pairs = rmp::decode::read_map_len(&mut rest).map_err(|_| undecodable())?;
    for _ in 0..pairs {
        let (key, after) = split_value(rest).ok_or_else(undecodable)?;
        let (value, after) = split_value(after).ok_or_else(undecodable)?;
        rest = after;
        if str_payload(key) == Some(name) {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

/// A Forward mode message (`count` parts, `after_tag` what follows its tag) whose options
/// name a signal other than logs, as [`Frame::NotLogs`]; `None` for one that does not.
fn other_signal(tag: &str, count: u32, after_tag: &[u8]) -> Result<Option<Frame>, Garbage> {
    if count != 3 {
        return Ok(None);
    }
    let Some((_, after)) = split_value(after_tag) else {
        return Ok(None);
    };
    let Some((options, _)) = split_value(after) else {
        return Ok(None);
    };
    Ok(match signal(Some(options))?.filter(|s| *s != LOGS) {
        Some(signal) => Some(Frame::NotLogs {
            tag: tag.to_owned(),
            signal,
            chunk: chunk(Some(options))?,
        }),
        None => None,
    })
}

/// Whether an entry's time (one whole value, as sent) marks the start or end of a group
/// rather than a record: Fluent Bit's group markers (a group of OTLP records' resource and
/// scope; forwarded as they are since Fluent Bit 5.0.5) are EventTime with seconds
/// `0xFFFFFFFF` (start) or `0xFFFFFFFE` (end) and no nanoseconds, alone or as `[EventTime,
/// metadata]`, their record the group's attributes, not a log line. Only those two
/// EventTime values are markers (as in Fluent Bit's own decoder); any other time is read as
/// a time, integers and floats of those seconds too (in 2106).
fn is_group_marker(time: &[u8]) -> bool {
    let time = time.strip_prefix(&[0x92]).unwrap_or(time);
    let data = match time {
        [0xd7, 0x00, data @ ..] | [0xc7, 8, 0x00, data @ ..] => data,
        _ => return false,
    };
    matches!(
        data.get(..8),
        Some([0xff, 0xff, 0xff, 0xff | 0xfe, 0, 0, 0, 0])
    )
}

/// The payload of a str value at the start of `value`.
fn str_payload(value: &[u8]) -> Option<&[u8]> {
    payload(value, |marker| match marker {
        0xa0..=0xbf => Some((1, usize::from(marker & 0x1f))),
        0xd9 => Some((2, 1)),
        0xda => Some((3, 2)),
        0xdb => Some((5, 4)),
        _ => None,
    })
}

/// The payload of a bin value at the start of `value`.
fn bin_payload(value: &[u8]) -> Option<&[u8]> {
    payload(value, |marker| match marker {
        0xc4 => Some((2, 1)),
        0xc5 => Some((3, 2)),
        0xc6 => Some((5, 4)),
        _ => None,
    })
}

/// The payload after a header that `header` describes by its marker: (header bytes, and
/// either a fixed length for a fix type or the length's size in bytes).
fn payload(value: &[u8], header: impl Fn(u8) -> Option<(usize, usize)>) -> Option<&[u8]> {
    let marker = *value.first()?;
    let (skip, size) = header(marker)?;
    let len = if skip == 1 {
        size
    } else {
        value
            .get(1..skip)?
            .iter()
            .fold(0_usize, |acc, b| acc << 8 | usize::from(*b))
    };
    value.get(skip..skip.checked_add(len)?)
}

/// `{"ack": chunk}`, the answer to a message that carried `chunk` (`raw`, as it was
/// encoded).
pub fn ack(raw_chunk: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + raw_chunk.len());
    out.push(0x81); // a map of one pair
    out.extend_from_slice(&[0xa3, b'a', b'c', b'k']);
    out.extend_from_slice(raw_chunk);
    out
}

fn read(bytes: &[u8]) -> Result<Value, Garbage> {
    let mut reader = bytes;
    rmpv::decode::read_value_with_max_depth(&mut reader, MAX_DEPTH + 1)
        .map_err(|_| Garbage::NotMessagePack("a value does not decode"))
}

/// Refuses a message whose events (with its `tag`) weigh more than `max`.
fn within(events: &Events, tag: &str, max: usize) -> Result<(), Garbage> {
    if events.weight().saturating_add(tag.len()) > max {
        return Err(Garbage::TooLarge(max));
    }
    Ok(())
}

/// The events of a PackedForward entry stream of the message tagged `tag`, inflated first
/// when the options (a map or nil, if any; read where they lie, never decoded whole) say
/// gzip.
fn packed(
    bytes: &[u8],
    options: Option<&[u8]>,
    max_inflated: usize,
    tag: &str,
) -> Result<Events, Garbage> {
    // A value that is not a str reads as "", refused below.
    let compressed = option(options, b"compressed")?.map(|v| str_payload(v).unwrap_or_default());
    let inflated;
    let mut stream = match compressed {
        // fluent-logger says "text" for entries that are not compressed.
        None | Some(b"text") => bytes,
        Some(b"gzip") => {
            // Several gzip members may follow each other (Fluent Bit appends them).
            let mut out = Vec::new();
            flate2::read::MultiGzDecoder::new(bytes)
                .take(max_inflated as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| Garbage::Compression(e.to_string()))?;
            if out.len() > max_inflated {
                return Err(Garbage::TooLarge(max_inflated));
            }
            inflated = out;
            &inflated[..]
        }
        Some(_) => {
            return Err(Garbage::NotForward(
                "compressed is not \"gzip\" or \"text\"",
            ));
        }
    };
    // A time may grow from 1 to 9 bytes as a buffered integer; entries take 20 at least.
    let mut events = Events::for_batch(
        tag,
        (stream.len() + stream.len() / 20 * 8).min(max_inflated),
        None,
    );
    while !stream.is_empty() {
        stream = match push_entry(&mut events, stream) {
            Some(entry) => {
                within(&events, tag, max_inflated)?;
                entry?
            }
            None => {
                // Not MessagePack says more than "cut short". A length past the end is cut
                // short too (the scan's "more than N bytes" would name a limit the message
                // is not over).
                if let Err(error @ Garbage::NotMessagePack(_)) = frame_len(stream, stream.len()) {
                    return Err(error);
                }
                return Err(Garbage::NotForward(
                    "an entry is cut short or declares more than the entries hold",
                ));
            }
        };
    }
    Ok(events)
}

/// The entry `[time, record]` at the start of `bytes` onto `events`; what follows it.
/// `None` when it is cut short; an error when it is not an entry.
fn push_entry<'a>(events: &mut Events, bytes: &'a [u8]) -> Option<Result<&'a [u8], Garbage>> {
    let not_an_entry = || Garbage::NotForward("an entry is [time, record]");
    let mut rest = bytes;
    match bytes.first()? {
        0x90..=0x9f | 0xdc | 0xdd => {}
        _ => return Some(Err(not_an_entry())),
    }
    match rmp::decode::read_array_len(&mut rest) {
        Ok(2) => {}
        Ok(_) => return Some(Err(not_an_entry())),
        Err(_) => return None,
    }
    let (time, rest) = split_value(rest)?;
    let (record, rest) = split_value(rest)?;
    if !is_map(record) {
        return Some(Err(Garbage::NotForward("a record is a map")));
    }
    Some(time_nanos_of(time).map(|nanos| {
        if !is_group_marker(time) {
            events.push_raw(nanos, record);
        }
        rest
    }))
}

/// A scalar time takes this many bytes at most (EventTime as ext8).
const MAX_TIME_BYTES: usize = 11;

/// The time at the start of `time` (one whole value) in nanoseconds.
///
/// Only a scalar of [`MAX_TIME_BYTES`] at most is decoded, and of `[time, metadata]` only
/// the time: anything else is refused undecoded. Decoded, a few kilobytes of gzip holding
/// an array of millions of nils would take gigabytes.
fn time_nanos_of(time: &[u8]) -> Result<i64, Garbage> {
    let not_a_time = || Garbage::NotForward("a time is an integer, EventTime or [time, metadata]");
    match time {
        // EventTime as fixext8, what Fluent Bit sends, read in place.
        [0xd7, 0x00, data @ ..] if data.len() == 8 => {
            Ok(event_time(data.try_into().expect("8 bytes")))
        }
        // `[time, metadata]`, Fluent Bit 5's default: the metadata is not read.
        [0x90..=0x9f | 0xdc | 0xdd, ..] => {
            let mut pair = time;
            match rmp::decode::read_array_len(&mut pair) {
                Ok(2) if !matches!(pair.first(), Some(0x90..=0x9f | 0xdc | 0xdd)) => {
                    match split_value(pair) {
                        Some((inner, metadata)) if is_map(metadata) => time_nanos_of(inner),
                        _ => Err(not_a_time()),
                    }
                }
                _ => Err(not_a_time()),
            }
        }
        _ if time.len() <= MAX_TIME_BYTES => time_nanos(&read(time)?),
        _ => Err(not_a_time()),
    }
}

/// EventTime's data: seconds and nanoseconds, big-endian u32 each.
fn event_time(data: &[u8; 8]) -> i64 {
    let seconds = i64::from(u32::from_be_bytes([data[0], data[1], data[2], data[3]]));
    let nanos = i64::from(u32::from_be_bytes([data[4], data[5], data[6], data[7]]));
    seconds * 1_000_000_000 + nanos.min(999_999_999)
}

/// An integer, a float or EventTime (`[time, metadata]` is taken apart before).
fn time_nanos(time: &Value) -> Result<i64, Garbage> {
    const BILLION: i64 = 1_000_000_000;
    match time {
        // Seconds, as Fluentd and Fluent Bit take them. One out of range (milliseconds, as
        // some clients can be set to send) is the record's fault, not the message's: it
        // saturates, so a record without a time of its own goes to Loki with a time Loki
        // refuses (dropped, counted by reason) instead of every record of the message
        // being refused, and resent for ever.
        Value::Integer(i) => Ok(i.as_i64().map_or(i64::MAX, |s| s.saturating_mul(BILLION))),
        // Likewise (`as` saturates; NaN is 0, a time Loki refuses).
        Value::F64(f) => Ok((f * 1e9) as i64),
        Value::F32(f) => Ok((f64::from(*f) * 1e9) as i64),
        Value::Ext(0, data) if data.len() == 8 => {
            Ok(event_time(data.as_slice().try_into().expect("8 bytes")))
        }
        _ => Err(Garbage::NotForward(
            "a time is an integer, EventTime or [time, metadata]",
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use proptest::prelude::*;
    use rmpv::Value;

    use super::*;

    const MAX: usize = 1 << 20;

    fn encode(value: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, value).expect("encodes");
        out
    }

    fn s(text: &str) -> Value {
        Value::from(text)
    }

    fn record(line: &str) -> Value {
        Value::Map(vec![(s("log"), s(line)), (s("host"), s("hybris-1"))])
    }

    /// EventTime 1730103120.040000000 as fixext8.
    fn event_time() -> Value {
        let mut data = 1_730_103_120_u32.to_be_bytes().to_vec();
        data.extend_from_slice(&40_000_000_u32.to_be_bytes());
        Value::Ext(0, data)
    }

    const NANOS: i64 = 1_730_103_120_040_000_000;

    fn message(frame: &[u8]) -> Message {
        assert_eq!(frame_len(frame, MAX), Ok(Some(frame.len())));
        match decode(frame, MAX).expect("decodes") {
            Frame::Message(message) => message,
            other => panic!("not a message of logs: {other:?}"),
        }
    }

    fn lines(message: &Message) -> Vec<String> {
        message
            .events
            .iter()
            .map(|e| e.text("log").expect("a log").into_owned())
            .collect()
    }

    /// EventTime with `seconds` and `nanos`.
    fn event_time_of(seconds: u32, nanos: u32) -> Value {
        let mut data = seconds.to_be_bytes().to_vec();
        data.extend_from_slice(&nanos.to_be_bytes());
        Value::Ext(0, data)
    }

    /// EventTime with `seconds` and no nanoseconds, as `[EventTime, {}]`.
    fn marked(seconds: u32) -> Value {
        Value::Array(vec![event_time_of(seconds, 0), Value::Map(vec![])])
    }

    /// Fluent Bit 5.0.5+ forwards chunks as they are, OTLP group markers included: they
    /// are not records, in any mode, as fixext8 or ext8; times next to them (`0xFFFFFFFD`,
    /// the same seconds with nanoseconds, or as an integer) are read as times.
    #[test]
    fn fluent_bits_group_markers_are_not_records() {
        let group = Value::Map(vec![(s("resource"), Value::Map(vec![]))]);
        let entries = vec![
            Value::Array(vec![marked(0xFFFF_FFFF), group.clone()]),
            Value::Array(vec![
                Value::Array(vec![event_time(), Value::Map(vec![])]),
                record("in the group"),
            ]),
            Value::Array(vec![event_time_of(0xFFFF_FFFE, 0), Value::Map(vec![])]),
            Value::Array(vec![marked(0xFFFF_FFFD), record("2106")]),
            Value::Array(vec![event_time_of(0xFFFF_FFFF, 1), record("2106 and 1 ns")]),
            Value::Array(vec![
                Value::from(0xFFFF_FFFF_u32),
                record("2106 as an integer"),
            ]),
        ];
        let kept = [
            "in the group",
            "2106",
            "2106 and 1 ns",
            "2106 as an integer",
        ];
        let forward = encode(&Value::Array(vec![
            s("otel"),
            Value::Array(entries.clone()),
        ]));
        assert_eq!(lines(&message(&forward)), kept);
        let mut stream: Vec<u8> = entries.iter().flat_map(encode).collect();
        // A marker `[[EventTime as ext8, {}], record]` by hand (rmpv writes fixext8).
        stream.extend([
            0x92, 0x92, 0xc7, 8, 0, 0xff, 0xff, 0xff, 0xfe, 0, 0, 0, 0, 0x80,
        ]);
        stream.extend(encode(&record("an ext8 marker's group")));
        let packed = encode(&Value::Array(vec![s("otel"), Value::Binary(stream)]));
        assert_eq!(lines(&message(&packed)), kept);
        let lone = encode(&Value::Array(vec![
            s("otel"),
            marked(0xFFFF_FFFF),
            group,
            Value::Map(vec![(s("chunk"), s("c1"))]),
        ]));
        let lone = message(&lone);
        assert!(lone.events.is_empty());
        assert_eq!(lone.chunk.as_deref(), Some(&encode(&s("c1"))[..]));
    }

    /// Metrics and traces (`fluent_signal` 1 and 2, their own encoding in the bin) are told
    /// apart with their chunk, to be acknowledged; logs (`fluent_signal` 0) are decoded.
    #[test]
    fn messages_of_other_signals_are_told_apart_with_their_chunk() {
        let cmetrics = encode(&Value::Map(vec![(s("meta"), Value::Map(vec![]))]));
        for signal in [1, 2] {
            let frame = encode(&Value::Array(vec![
                s("metrics"),
                Value::Binary(cmetrics.clone()),
                Value::Map(vec![
                    (s("chunk"), s("m1")),
                    (s("fluent_signal"), Value::from(signal)),
                ]),
            ]));
            assert_eq!(
                decode(&frame, MAX),
                Ok(Frame::NotLogs {
                    tag: "metrics".to_owned(),
                    signal,
                    chunk: Some(encode(&s("m1"))),
                })
            );
        }
        let entries: Vec<u8> = encode(&Value::Array(vec![event_time(), record("a line")]));
        let logs = encode(&Value::Array(vec![
            s("hybris.wrapper"),
            Value::Binary(entries),
            Value::Map(vec![
                (s("chunk"), s("l1")),
                (s("size"), Value::from(1)),
                (s("fluent_signal"), Value::from(0)),
            ]),
        ]));
        assert_eq!(lines(&message(&logs)), ["a line"]);
        // Forward mode (Fluent Bit's `fluentd_compat`): metrics are not entries of records,
        // and the options after them say what they are; so are entries that would decode.
        let time = Value::from(1_730_103_120_u32);
        let compat = |record: Value| {
            encode(&Value::Array(vec![
                s("metrics"),
                Value::Array(vec![Value::Array(vec![time.clone(), record])]),
                Value::Map(vec![
                    (s("chunk"), s("m2")),
                    (s("fluent_signal"), Value::from(1)),
                ]),
            ]))
        };
        for record in [Value::Array(vec![Value::Map(vec![])]), record("a map")] {
            assert_eq!(
                decode(&compat(record), MAX),
                Ok(Frame::NotLogs {
                    tag: "metrics".to_owned(),
                    signal: 1,
                    chunk: Some(encode(&s("m2"))),
                })
            );
        }
        // A signal that is not a number is refused, even before entries that decode.
        let entries: Vec<u8> = encode(&Value::Array(vec![event_time(), record("a line")]));
        let odd = encode(&Value::Array(vec![
            s("metrics"),
            Value::Binary(entries),
            Value::Map(vec![(s("fluent_signal"), s("metrics"))]),
        ]));
        assert!(decode(&odd, MAX).is_err());
        assert!(
            decode(
                &encode(&Value::Array(vec![s("x"), Value::Binary(cmetrics)])),
                MAX
            )
            .is_err()
        );
    }

    #[test]
    fn message_mode_with_an_integer_time_and_options() {
        let chunk = s("p8n9gmxTQVC8/nh2wlKKeQ==");
        let frame = encode(&Value::Array(vec![
            s("hybris.wrapper"),
            Value::from(1_730_103_120_u32),
            record("a line"),
            Value::Map(vec![(s("chunk"), chunk.clone())]),
        ]));
        let message = message(&frame);
        assert_eq!(message.tag, "hybris.wrapper");
        let first = message.events.iter().next().expect("one event");
        assert_eq!(first.time_nanos, 1_730_103_120 * 1_000_000_000);
        assert_eq!(lines(&message), ["a line"]);
        assert_eq!(message.chunk.as_deref(), Some(&encode(&chunk)[..]));
        assert_eq!(first.text("host").as_deref(), Some("hybris-1"));
    }

    #[test]
    fn an_integer_time_out_of_range_saturates_instead_of_refusing_the_message() {
        // Milliseconds, and an unsigned integer past i64: the records are kept (their own
        // times, where the line has one, are used; Loki refuses the rest, counted).
        for (time, nanos) in [
            (Value::from(1_730_103_120_040_u64), i64::MAX),
            (Value::from(u64::MAX), i64::MAX),
            (Value::from(-1_730_103_120_040_i64), i64::MIN),
            (Value::F64(1.730_103_120_040e12), i64::MAX),
            (Value::F64(f64::NEG_INFINITY), i64::MIN),
            (Value::F64(f64::NAN), 0),
        ] {
            let frame = encode(&Value::Array(vec![
                s("hybris.wrapper"),
                time,
                record("a line"),
            ]));
            let message = message(&frame);
            let first = message.events.iter().next().expect("one event");
            assert_eq!(first.time_nanos, nanos);
            assert_eq!(lines(&message), ["a line"]);
        }
    }

    #[test]
    fn forward_mode_with_event_time_as_fixext8_and_ext8_and_with_metadata() {
        let fixext = encode(&event_time());
        assert_eq!(fixext[0], 0xd7);
        // The same time as ext8 (0xc7, length 8, type 0).
        let mut ext8 = vec![0xc7, 8, 0];
        ext8.extend_from_slice(&fixext[2..]);
        // [tag, [[t, r], [t, r], [[t, {meta}], r]], {chunk}] by hand, to hold the ext8.
        let mut frame = vec![0x93];
        frame.extend(encode(&s("app")));
        frame.push(0x93);
        frame.push(0x92);
        frame.extend(&fixext);
        frame.extend(encode(&record("one")));
        frame.push(0x92);
        frame.extend(&ext8);
        frame.extend(encode(&record("two")));
        frame.push(0x92);
        frame.push(0x92);
        frame.extend(&fixext);
        frame.extend(encode(&Value::Map(vec![(s("otlp"), Value::Map(vec![]))])));
        frame.extend(encode(&record("three")));
        let chunk = "0123456789abcdef0123456789abcdef";
        frame.extend(encode(&Value::Map(vec![
            (s("chunk"), s(chunk)),
            (s("size"), Value::from(3)),
        ])));
        let message = message(&frame);
        assert_eq!(lines(&message), ["one", "two", "three"]);
        assert!(message.events.iter().all(|e| e.time_nanos == NANOS));
        assert_eq!(message.chunk.as_deref(), Some(&encode(&s(chunk))[..]));
        let ack = ack(message.chunk.as_deref().expect("a chunk"));
        assert_eq!(
            rmpv::decode::read_value(&mut &ack[..]).expect("decodes"),
            Value::Map(vec![(s("ack"), s(chunk))])
        );
    }

    fn entries(lines: &[&str]) -> Vec<u8> {
        lines
            .iter()
            .flat_map(|l| encode(&Value::Array(vec![event_time(), record(l)])))
            .collect()
    }

    #[test]
    fn packed_forward_as_bin_and_as_old_raw_str() {
        let packed = entries(&["a", "b"]);
        let frame = encode(&Value::Array(vec![s("t"), Value::Binary(packed.clone())]));
        assert_eq!(lines(&message(&frame)), ["a", "b"]);
        // Clients of MessagePack before bin existed send the entries as str 32 of raw bytes
        // (not UTF-8).
        let mut frame = vec![0x92];
        frame.extend(encode(&s("t")));
        frame.push(0xdb);
        frame.extend(u32::try_from(packed.len()).expect("small").to_be_bytes());
        frame.extend(&packed);
        assert_eq!(lines(&message(&frame)), ["a", "b"]);
    }

    #[test]
    fn compressed_packed_forward_with_several_gzip_members() {
        let mut gz = Vec::new();
        for part in [&["a", "b"][..], &["c"][..]] {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(&entries(part)).expect("compresses");
            gz.extend(encoder.finish().expect("finishes"));
        }
        let frame = encode(&Value::Array(vec![
            s("t"),
            Value::Binary(gz),
            Value::Map(vec![(s("compressed"), s("gzip")), (s("chunk"), s("c1"))]),
        ]));
        let message = message(&frame);
        assert_eq!(lines(&message), ["a", "b", "c"]);
        // Inflating past the limit is refused, not buffered.
        assert_eq!(decode(&frame, 10), Err(Garbage::TooLarge(10)));
    }

    /// A few kilobytes of gzip inflating to a million empty entries (`[5, {}]`, 3 bytes
    /// each, 33 once buffered with its index) stay within the inflation limit, but what they
    /// would take buffered does not: refused, not buffered (a message that can never be
    /// stored would be sent again for ever; a larger one took hundreds of MB to decode).
    /// So are uncompressed entries that weigh past it; real entries stay well within.
    #[test]
    fn tiny_entries_that_would_weigh_past_the_limit_are_refused() {
        let max = 1 << 20;
        let tiny = [0x92, 0x05, 0x80].repeat((4 * max) / 3 - 1);
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(&tiny).expect("compresses");
        let gz = encoder.finish().expect("finishes");
        let frame = encode(&Value::Array(vec![
            s("t"),
            Value::Binary(gz),
            Value::Map(vec![(s("compressed"), s("gzip")), (s("chunk"), s("c1"))]),
        ]));
        assert!(frame.len() < 64 * 1024, "{} bytes", frame.len());
        // (Not assert_eq: a failure would print a million entries.)
        let refused = |frame: &[u8]| matches!(decode(frame, 4 * max), Err(Garbage::TooLarge(limit)) if limit == 4 * max);
        assert!(refused(&frame), "gzip of tiny entries refused");

        let mut forward = vec![0x92, 0xa1, b't', 0xdd];
        let count = u32::try_from(max / 3 - 10).expect("small");
        forward.extend(count.to_be_bytes());
        forward.extend([0x92, 0x05, 0x80].repeat(count as usize));
        assert_eq!(frame_len(&forward, max), Ok(Some(forward.len())));
        assert!(refused(&forward), "tiny entries refused");

        // A chunk id counts too: it may be stored with the batch.
        let frame = encode(&Value::Array(vec![
            s("t"),
            Value::Binary(entries(&["a line"])),
            Value::Map(vec![(s("chunk"), s(&"c".repeat(4 * max)))]),
        ]));
        assert!(refused(&frame), "a chunk id past the limit refused");

        // A megabyte of realistic entries (EventTime, a short line) is taken.
        let line = entries(&["GET /cart 200"; 20_000]);
        let frame = encode(&Value::Array(vec![s("t"), Value::Binary(line)]));
        assert!(frame.len() < max);
        assert!(
            matches!(decode(&frame, 4 * max), Ok(Frame::Message(m)) if m.events.len() == 20_000),
            "realistic entries taken"
        );
    }

    /// A scan resumed after each byte finds the same end as one over the whole value, and
    /// does not look again at what it has passed (here overwritten with a byte that is never
    /// MessagePack: a scan from the start would refuse it).
    #[test]
    fn a_resumed_scan_goes_on_where_it_stopped() {
        let frame = encode(&Value::Array(vec![
            s("t"),
            Value::Array(vec![Value::Array(vec![event_time(), record("x")]); 20]),
            Value::Map(vec![(s("chunk"), Value::Binary(vec![7; 300]))]),
        ]));
        let mut scan = Scan::default();
        let mut seen = Vec::new();
        for (i, &byte) in frame.iter().enumerate() {
            seen.push(byte);
            let found = scan.resume(&seen, MAX).expect("never looks back");
            let want = (i + 1 == frame.len()).then_some(frame.len());
            assert_eq!(found, want, "after byte {i}");
            // What it has passed, it never reads again.
            let passed = scan.pos.min(seen.len());
            seen[..passed].fill(0xc1);
        }
        assert!(seen.iter().all(|&b| b == 0xc1), "passed every byte");
    }

    #[test]
    fn nil_is_a_heartbeat_and_empty_forward_is_no_events() {
        assert_eq!(frame_len(&[0xc0], MAX), Ok(Some(1)));
        assert_eq!(decode(&[0xc0], MAX), Ok(Frame::Heartbeat));
        let frame = encode(&Value::Array(vec![
            s("t"),
            Value::Array(vec![]),
            Value::Map(vec![]),
        ]));
        assert!(message(&frame).events.is_empty());
    }

    #[test]
    fn a_value_is_found_only_once_it_is_whole() {
        let frame = encode(&Value::Array(vec![
            s("t"),
            Value::Binary(entries(&["x"; 50])),
        ]));
        for cut in 0..frame.len() {
            assert_eq!(frame_len(&frame[..cut], MAX), Ok(None), "cut at {cut}");
        }
        let mut two = frame.clone();
        two.extend(&frame);
        assert_eq!(frame_len(&two, MAX), Ok(Some(frame.len())));
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        assert!(matches!(
            frame_len(&[0xc1], MAX),
            Err(Garbage::NotMessagePack(_))
        ));
        // An array claiming 2^32-1 elements, or a bin of 4 GiB: refused before any arrives.
        assert_eq!(
            frame_len(&[0xdd, 0xff, 0xff, 0xff, 0xff], MAX),
            Err(Garbage::TooLarge(MAX))
        );
        assert_eq!(
            frame_len(&[0xc6, 0xff, 0xff, 0xff, 0xff], MAX),
            Err(Garbage::TooLarge(MAX))
        );
        let deep = vec![0x91; MAX_DEPTH + 2];
        assert!(matches!(
            frame_len(&deep, MAX),
            Err(Garbage::NotMessagePack(_))
        ));
        for (value, why) in [
            (Value::from(3), "not an array"),
            (
                Value::Array(vec![Value::from(1), Value::Array(vec![])]),
                "tag not a string",
            ),
            (
                Value::Array(vec![s("t"), Value::from(1), s("not a map")]),
                "record not a map",
            ),
            (
                Value::Array(vec![
                    s("t"),
                    Value::Array(vec![Value::Array(vec![Value::from(1)])]),
                ]),
                "entry of one",
            ),
            (
                Value::Array(vec![s("t"), Value::Binary(vec![0x92, 0x01])]),
                "cut short entry",
            ),
            (
                Value::Array(vec![
                    s("t"),
                    Value::Binary(vec![1]),
                    Value::Map(vec![(s("compressed"), s("zstd"))]),
                ]),
                "unknown compression",
            ),
            (
                Value::Array(vec![
                    s("t"),
                    Value::Array(vec![Value::Array(vec![
                        Value::Array(vec![event_time(), s("metadata not a map")]),
                        record("x"),
                    ])]),
                ]),
                "[time, metadata] without a map",
            ),
            (
                Value::Array(vec![
                    s("t"),
                    Value::Array(vec![Value::Array(vec![Value::from("noon"), record("x")])]),
                ]),
                "a time that is text",
            ),
            (
                Value::Array(vec![
                    s("t"),
                    Value::Array(vec![
                        Value::Array(vec![event_time(), record("x")]),
                        Value::from(1),
                    ]),
                ]),
                "forward entries that are not all entries",
            ),
            (
                Value::Array(vec![
                    s("t"),
                    Value::Binary(vec![1, 2, 3]),
                    Value::Map(vec![(s("compressed"), s("gzip"))]),
                ]),
                "not gzip",
            ),
            (
                Value::Array(vec![
                    s("t"),
                    Value::Array(vec![Value::Array(vec![
                        Value::Array(vec![Value::Nil; 12]),
                        record("x"),
                    ])]),
                ]),
                "a time that is an array",
            ),
            (
                Value::Array(vec![
                    s("t"),
                    Value::Binary(vec![]),
                    Value::Map(vec![(
                        s("fluent_signal"),
                        Value::Array(vec![Value::Nil; 9]),
                    )]),
                ]),
                "a signal that is an array",
            ),
        ] {
            // Each refused as what it is: not a forward message, or entries that do not
            // inflate (never, say, as not MessagePack or too large).
            let error = decode(&encode(&value), MAX).expect_err(why);
            if why == "not gzip" {
                assert!(matches!(error, Garbage::Compression(_)), "{why}: {error}");
            } else {
                assert!(matches!(error, Garbage::NotForward(_)), "{why}: {error}");
            }
        }
    }

    /// A time as a sender may write it, and what it means in nanoseconds.
    fn time_strategy() -> impl Strategy<Value = (Value, i64)> {
        (0_u32..2_000_000_000, 0_u32..1_000_000_000, 0_u8..4).prop_map(|(secs, nanos, form)| {
            let mut data = secs.to_be_bytes().to_vec();
            data.extend_from_slice(&nanos.to_be_bytes());
            let event_time = Value::Ext(0, data);
            let exact = i64::from(secs) * 1_000_000_000 + i64::from(nanos);
            match form {
                0 => (Value::from(secs), i64::from(secs) * 1_000_000_000),
                1 => (event_time, exact),
                2 => (
                    Value::Array(vec![event_time, Value::Map(vec![(s("k"), s("v"))])]),
                    exact,
                ),
                _ => (
                    Value::Array(vec![Value::from(secs), Value::Map(vec![])]),
                    i64::from(secs) * 1_000_000_000,
                ),
            }
        })
    }

    fn record_strategy() -> impl Strategy<Value = Vec<(Value, Value)>> {
        let value = prop_oneof![
            ".{0,40}".prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            proptest::collection::vec(any::<u8>(), 0..20).prop_map(Value::Binary),
            Just(Value::Nil),
            Just(Value::Map(vec![(
                s("nested"),
                Value::Array(vec![Value::from(1)])
            )])),
        ];
        proptest::collection::vec(("[a-z]{1,6}".prop_map(Value::from), value), 0..6)
    }

    proptest! {
        /// Every mode decodes to the events a full MessagePack decoding of the same frame
        /// gives (times in nanoseconds, records pair for pair), with the chunk as sent.
        #[test]
        fn every_mode_decodes_to_what_the_sender_encoded(
            events in proptest::collection::vec((time_strategy(), record_strategy()), 1..6),
            mode in 0_u8..4,
            chunk_id in "[0-9a-f]{32}",
        ) {
            let options = Value::Map(vec![(s("size"), Value::from(events.len())), (s("chunk"), s(&chunk_id))]);
            let entry = |(time, record): &((Value, i64), Vec<(Value, Value)>)| {
                Value::Array(vec![time.0.clone(), Value::Map(record.clone())])
            };
            let packed: Vec<u8> = events.iter().flat_map(|e| encode(&entry(e))).collect();
            let (frame, expected) = match mode {
                // Message mode carries one event.
                0 => (
                    Value::Array(vec![s("t"), events[0].0.0.clone(), Value::Map(events[0].1.clone()), options]),
                    &events[..1],
                ),
                1 => (Value::Array(vec![s("t"), Value::Array(events.iter().map(entry).collect()), options]), &events[..]),
                2 => (Value::Array(vec![s("t"), Value::Binary(packed), options]), &events[..]),
                _ => {
                    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    encoder.write_all(&packed).expect("compresses");
                    let gz = encoder.finish().expect("finishes");
                    let options = Value::Map(vec![(s("compressed"), s("gzip")), (s("chunk"), s(&chunk_id))]);
                    (Value::Array(vec![s("t"), Value::Binary(gz), options]), &events[..])
                }
            };
            let message = message(&encode(&frame));
            let decoded: Vec<Event> = message.events.iter().map(|e| e.to_event()).collect();
            let wanted: Vec<Event> = expected
                .iter()
                .map(|((_, nanos), record)| Event { time_nanos: *nanos, record: record.clone() })
                .collect();
            prop_assert_eq!(decoded, wanted);
            prop_assert_eq!(message.chunk, Some(encode(&s(&chunk_id))));
        }

        /// Mutated and cut frames never panic or loop: each is a value, incomplete, or
        /// refused.
        #[test]
        fn mutated_frames_never_panic(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
            cut in any::<prop::sample::Index>(),
            gzip in any::<bool>(),
            mode in 0_u8..3,
        ) {
            let packed = entries(&["first line", "second line", "third"]);
            let (stream, options) = if gzip {
                let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                encoder.write_all(&packed).expect("compresses");
                (encoder.finish().expect("finishes"), Value::Map(vec![(s("compressed"), s("gzip")), (s("chunk"), s("c"))]))
            } else {
                (packed, Value::Map(vec![(s("chunk"), s("c"))]))
            };
            let mut frame = match mode {
                0 => encode(&Value::Array(vec![s("tag"), Value::Binary(stream), options])),
                1 => encode(&Value::Array(vec![
                    s("tag"),
                    Value::Array(vec![
                        Value::Array(vec![event_time(), record("first line")]),
                        Value::Array(vec![Value::Array(vec![event_time(), Value::Map(vec![])]), record("second")]),
                    ]),
                    options,
                ])),
                _ => encode(&Value::Array(vec![s("tag"), event_time(), record("one line"), options])),
            };
            for (at, byte) in flips {
                let i = at.index(frame.len());
                frame[i] = byte;
            }
            let frame = &frame[..cut.index(frame.len() + 1)];
            if let Ok(Some(len)) = frame_len(frame, 4096) {
                prop_assert!(len <= frame.len());
                let _ = decode(&frame[..len], 4096);
            }
        }
    }
}
