//! What the inputs put in the buffer: one batch per forward message or OTLP export, its
//! events as they arrived (before parsing, so multi-line grouping runs once, after the
//! buffer, and a restart re-reads whole lines).
//!
//! Encoded as MessagePack: `[source, tag, [[time_nanos, record], …], chunk, received]`,
//! each record the map exactly as the sender encoded it; `chunk` is the sender's chunk id
//! or nil (see [`Batch::encode_with`]), `received` when the input received the batch (Unix
//! milliseconds, always a 9-byte uint64, so [`identity`] can leave it out). The events are
//! kept in that encoded form from the input to the pipeline ([`Events`]): a forward
//! message's records are copied, not decoded and encoded again, and the pipeline looks up
//! only the fields it needs (the line, the host) where they lie, instead of building every
//! key and value of every record twice.

use std::borrow::Cow;

use rmpv::Value;

use crate::forward::{self, Event};

/// Where a batch came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The Fluent forward protocol.
    Forward = 1,
    /// OTLP logs.
    Otlp = 2,
}

/// One batch of events from one input message.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Its input.
    pub source: Source,
    /// The forward tag, or the OTLP `service.name`.
    pub tag: String,
    /// Its events, in order.
    pub events: Events,
    /// When the input received it, in milliseconds since the Unix epoch (0: not known, a
    /// batch stored by a version before 2026-12-06): where the delivery time of its records
    /// is measured from (`delivery_freshness_seconds`), a restart's downtime included.
    pub received_ms: i64,
}

/// Now, in milliseconds since the Unix epoch: a batch's [`Batch::received_ms`]. Never
/// less than what it returned before in this process: the pipeline judges quiet in a
/// backlog by these times, and a wall clock stepped back would make every later line look
/// old (completing records in progress, splitting traces).
pub fn now_ms() -> i64 {
    static LATEST: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    let now = chrono::Utc::now().timestamp_millis();
    LATEST
        .fetch_max(now, std::sync::atomic::Ordering::Relaxed)
        .max(now)
}

/// What says what a stored batch holds, in three pieces to be read one after another: all
/// but its received time, so a batch sent again (after a lost acknowledgement) has the same
/// identity as the first copy, received earlier (see [`crate::recent`]). A batch stored
/// before the received time was kept (`[source, tag, events]`, or with the chunk id after
/// them) reads as the same batch stored now (a header of five parts, nil for no chunk id):
/// a chunk whose first copy the previous version stored is recognised across the upgrade.
/// Anything else (not a batch) is its own identity.
pub fn identity(stored: &[u8]) -> [&[u8]; 3] {
    const HEADER: &[u8] = &[FIVE_PARTS];
    const NO_CHUNK: &[u8] = &[NIL];
    match stored.first() {
        Some(&FIVE_PARTS) => match stored.len().checked_sub(RECEIVED_BYTES) {
            Some(end) if stored[end] == UINT64 => [HEADER, &stored[1..end], &[]],
            _ => [stored, &[], &[]],
        },
        Some(&FOUR_PARTS) => [HEADER, &stored[1..], &[]],
        Some(&THREE_PARTS) => [HEADER, &stored[1..], NO_CHUNK],
        _ => [stored, &[], &[]],
    }
}

/// Fixarrays of five, four and three: the headers of a batch with its received time, and
/// of one stored before it was kept, with and without a chunk id.
const FIVE_PARTS: u8 = 0x95;
const FOUR_PARTS: u8 = 0x94;
const THREE_PARTS: u8 = 0x93;
/// MessagePack's nil.
const NIL: u8 = 0xc0;
/// MessagePack's uint64 marker.
const UINT64: u8 = 0xcf;
/// The received time's bytes: a uint64's marker and its eight bytes.
const RECEIVED_BYTES: usize = 9;

const FINE: &str = "writing to a Vec cannot fail";

/// Events in their buffered form: MessagePack `[time_nanos, record]` pairs back to back,
/// every record a map. Built only by its own methods, so every pair is well formed.
///
/// The pairs are `bytes[start..]`. What comes before `start` is room for a batch's header:
/// an input builds its events after room for it ([`Events::for_batch`]) and a stored batch
/// read back keeps the bytes read ([`Batch::decode_owned`]), so a message's records are
/// copied once, out of its frame, and neither again to be stored nor when read back (when
/// their count was not known as the room was made, they move down a few bytes in place).
/// With messages of megabytes (Fluent Bit's chunks), each copy was megabytes more of memory
/// per message in flight. The stored bytes keep the decoder's allocation: a little more than
/// their size (Forward mode), up to 1.4 times it (the packed modes).
#[derive(Debug, Clone, Default)]
pub struct Events {
    bytes: Vec<u8>,
    /// Where the pairs begin in `bytes`.
    start: usize,
    /// Per event: its time and where its record lies in `bytes[start..]` (found once, when
    /// built).
    index: Index,
}

/// Per event of an [`Events`]: its time and where its record lies.
type Entry = (i64, std::ops::Range<usize>);
type Index = Vec<Entry>;

/// The same events, wherever they lie in their bytes.
impl PartialEq for Events {
    fn eq(&self, other: &Self) -> bool {
        self.pairs() == other.pairs() && self.index == other.index
    }
}

impl Eq for Events {}

/// Bytes a batch's header takes besides its tag, at most: a fixarray, the source, a str's
/// and an array's headers (five bytes each at most).
const HEADER_ROOM: usize = 1 + 1 + 5 + 5;
/// Bytes kept after the events for what follows them when stored: a chunk id of up to 64
/// bytes with its header (Fluent Bit's are 32 hex characters, or 24 base64 ones since
/// 5.0.8) and the received time. A longer id costs a copy, nothing else.
const TRAILER_ROOM: usize = 5 + 64 + RECEIVED_BYTES;

/// The bytes of the header [`Batch::into_stored`] writes for a batch of `count` events
/// tagged with `tag_len` bytes (MessagePack's shortest headers, as `rmp` writes them).
fn header_len(tag_len: usize, count: usize) -> usize {
    let str_header = match tag_len {
        0..32 => 1,
        32..256 => 2,
        256..65_536 => 3,
        _ => 5,
    };
    let array_header = match count {
        0..16 => 1,
        16..65_536 => 3,
        _ => 5,
    };
    1 + 1 + str_header + tag_len + array_header
}

impl Events {
    /// Empty, with room for about `bytes` of events, and for the header and the trailer of
    /// the batch tagged `tag` they will be stored in: [`Batch::into_stored`] writes them
    /// around the events instead of copying them. `count`, when known, is how many events
    /// there will be at most: the header then fills its room exactly (unless fewer events
    /// change its length) and the events stay where they are (otherwise they move down by
    /// the few bytes the header did not take).
    pub fn for_batch(tag: &str, bytes: usize, count: Option<usize>) -> Self {
        let start = match count {
            Some(count) => header_len(tag.len(), count),
            None => HEADER_ROOM + tag.len(),
        };
        let mut buffer = Vec::with_capacity(start + bytes + TRAILER_ROOM);
        buffer.resize(start, 0);
        Self {
            bytes: buffer,
            start,
            index: Vec::new(),
        }
    }

    /// The pairs, encoded back to back.
    fn pairs(&self) -> &[u8] {
        &self.bytes[self.start..]
    }

    /// Whether every event's time is a whole second (a sender that writes no finer time),
    /// or out of range (saturated: it says no finer time either).
    pub fn whole_seconds(&self) -> bool {
        self.index.iter().all(|(nanos, _)| {
            nanos.rem_euclid(1_000_000_000) == 0 || *nanos == i64::MAX || *nanos == i64::MIN
        })
    }

    /// Appends an event whose record is `record`, one whole MessagePack map (the caller
    /// checked it: [`forward::frame_len`] found its end and its marker is a map's).
    pub(crate) fn push_raw(&mut self, time_nanos: i64, record: &[u8]) {
        debug_assert!(is_map(record));
        rmp::encode::write_array_len(&mut self.bytes, 2).expect(FINE);
        rmp::encode::write_sint(&mut self.bytes, time_nanos).expect(FINE);
        let at = self.bytes.len() - self.start;
        self.bytes.extend_from_slice(record);
        self.index
            .push((time_nanos, at..self.bytes.len() - self.start));
    }

    /// Appends a decoded event (OTLP's records, tests).
    pub fn push(&mut self, event: &Event) {
        let len = u32::try_from(event.record.len()).expect("a record is far below 2^32 pairs");
        rmp::encode::write_array_len(&mut self.bytes, 2).expect(FINE);
        rmp::encode::write_sint(&mut self.bytes, event.time_nanos).expect(FINE);
        let at = self.bytes.len() - self.start;
        rmp::encode::write_map_len(&mut self.bytes, len).expect(FINE);
        for (key, value) in &event.record {
            rmpv::encode::write_value(&mut self.bytes, key).expect(FINE);
            rmpv::encode::write_value(&mut self.bytes, value).expect(FINE);
        }
        self.index
            .push((event.time_nanos, at..self.bytes.len() - self.start));
    }

    /// How many events.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Their encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        self.bytes.len() - self.start
    }

    /// The memory they take: their encoded bytes and their index. An entry can grow as it
    /// is buffered (a time of one byte becomes nine, and each event has its index entry),
    /// so a small message of many tiny entries weighs many times its size.
    pub fn weight(&self) -> usize {
        self.encoded_len() + self.index.len() * std::mem::size_of::<Entry>()
    }

    /// The events in order.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            bytes: self.pairs(),
            index: self.index.iter(),
        }
    }

    /// Checks `count` encoded pairs at the start of `bytes`: their index, and the bytes
    /// after them.
    fn read(bytes: &[u8], count: u32) -> Result<(Index, &[u8]), &'static str> {
        let mut rest = bytes;
        let mut index = Vec::with_capacity((count as usize).min(bytes.len() / 3));
        for _ in 0..count {
            let (time_nanos, record, after) = pair(rest)?;
            // The record ends where what follows the pair begins.
            let end = bytes.len() - after.len();
            index.push((time_nanos, end - record.len()..end));
            rest = after;
        }
        Ok((index, rest))
    }
}

impl<'a> IntoIterator for &'a Events {
    type Item = EventRef<'a>;
    type IntoIter = Iter<'a>;
    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

/// The events of an [`Events`], in order.
#[derive(Debug, Clone)]
pub struct Iter<'a> {
    bytes: &'a [u8],
    index: std::slice::Iter<'a, Entry>,
}

impl<'a> Iterator for Iter<'a> {
    type Item = EventRef<'a>;
    fn next(&mut self) -> Option<EventRef<'a>> {
        let (time_nanos, at) = self.index.next()?;
        Some(EventRef {
            time_nanos: *time_nanos,
            record: &self.bytes[at.clone()],
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.index.size_hint()
    }
}

impl ExactSizeIterator for Iter<'_> {}

/// One event of an [`Events`]: its time and its record, still encoded.
#[derive(Debug, Clone, Copy)]
pub struct EventRef<'a> {
    /// Nanoseconds since the Unix epoch.
    pub time_nanos: i64,
    record: &'a [u8],
}

impl<'a> EventRef<'a> {
    /// The value of `key` as text (str, or bin read as UTF-8 with bad bytes replaced);
    /// `None` when the record has no such key or its value is neither.
    pub fn text(&self, key: &str) -> Option<Cow<'a, str>> {
        let mut rest = self.record;
        let pairs = rmp::decode::read_map_len(&mut rest).ok()?;
        for _ in 0..pairs {
            let (k, after) = split_value(rest)?;
            let (v, after) = split_value(after)?;
            rest = after;
            // Keys are str (as rmpv's `as_str` matched them before).
            if k.first()
                .is_some_and(|m| matches!(m, 0xa0..=0xbf | 0xd9..=0xdb))
                && bytes_of(k) == Some(key.as_bytes())
            {
                return bytes_of(v).map(|b| match std::str::from_utf8(b) {
                    Ok(text) => Cow::Borrowed(text),
                    // A str that is not UTF-8 and a bin are read with bad bytes replaced.
                    Err(_) => String::from_utf8_lossy(b),
                });
            }
        }
        None
    }

    /// The record as a JSON object (for a record without a line field, so nothing of it is
    /// lost): its keys that are text, each with its value as text (str and bin as they
    /// are, anything else in MessagePack's text form), a later key over an earlier one.
    ///
    /// At most about `max_bytes` of it (the record is cut there anyway): pairs are read
    /// where they lie, a text value is cut at what is left, and any other value is decoded
    /// alone, only while it fits what is left.
    /// Decoded whole, a record of millions of one-byte values (a few kilobytes of gzip in
    /// a forward message) would take gigabytes.
    pub fn to_json(&self, max_bytes: usize) -> String {
        let mut object = serde_json::Map::new();
        let mut size = 2_usize;
        let mut rest = self.record;
        let pairs = rmp::decode::read_map_len(&mut rest).unwrap_or(0);
        for _ in 0..pairs {
            let Some((k, v, after)) = split_value(rest)
                .and_then(|(k, after)| Some((k, split_value(after)?)))
                .map(|(k, (v, after))| (k, v, after))
            else {
                break;
            };
            rest = after;
            let Some(key) = bytes_of(k).map(String::from_utf8_lossy) else {
                continue;
            };
            let room = max_bytes.saturating_sub(size);
            let value = match bytes_of(v) {
                // Cut at what is left, before the word the cut falls in: an address or a
                // number cut in two would no longer be masked (`multiline::cut`).
                Some(text) => {
                    // Only what the cut can look at, not a value of megabytes.
                    let seen = &text[..text
                        .len()
                        .min(room.saturating_add(crate::multiline::CUT_LOOKAHEAD))];
                    let mut value = String::from_utf8_lossy(seen).into_owned();
                    if crate::multiline::cut(&mut value, room) > 0 {
                        // Cut: nothing after it is shown (a later pair would make the cut
                        // value look whole).
                        object.insert(key.into_owned(), serde_json::Value::String(value));
                        break;
                    }
                    value
                }
                None if v.len() <= room => match rmpv::decode::read_value(&mut &v[..]) {
                    Ok(value) => value.to_string(),
                    Err(_) => break,
                },
                // Past the cut: the rest is not shown.
                None => break,
            };
            size = size.saturating_add(key.len() + value.len() + 6);
            object.insert(key.into_owned(), serde_json::Value::String(value));
            if size >= max_bytes {
                break;
            }
        }
        serde_json::Value::Object(object).to_string()
    }

    /// The whole event, decoded (OTLP's records, which conversion built).
    pub fn to_event(&self) -> Event {
        let record = match rmpv::decode::read_value(&mut &self.record[..]) {
            Ok(Value::Map(pairs)) => pairs,
            _ => unreachable!("a buffered record is a map, checked when read"),
        };
        Event {
            time_nanos: self.time_nanos,
            record,
        }
    }
}

/// Whether `value` starts with a map's marker.
pub(crate) fn is_map(value: &[u8]) -> bool {
    matches!(value.first(), Some(0x80..=0x8f | 0xde | 0xdf))
}

/// The first whole MessagePack value of `bytes`, and what follows it.
pub(crate) fn split_value(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    // Keys, lines, hosts and times are scalars, whose header says their length; arrays
    // and maps are walked.
    let len = match scalar_len(bytes) {
        Some(len) => len,
        None => match forward::frame_len(bytes, bytes.len()) {
            Ok(Some(len)) => len,
            _ => return None,
        },
    };
    (len > 0 && len <= bytes.len()).then(|| bytes.split_at(len))
}

/// The length of the scalar at the start of `bytes` (nil, bool, number, str, bin, ext),
/// read from its header alone; `None` for an array or a map, a header cut short, or a
/// byte that starts no value (for [`forward::frame_len`] to walk or refuse). The lengths
/// are `frame_len`'s for the same markers; a property test below holds the two equal.
fn scalar_len(bytes: &[u8]) -> Option<usize> {
    let (&marker, rest) = bytes.split_first()?;
    let length = |n: usize| {
        rest.get(..n)
            .map(|b| b.iter().fold(0_usize, |acc, x| acc << 8 | usize::from(*x)))
    };
    Some(match marker {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => 1,
        0xa0..=0xbf => 1 + usize::from(marker & 0x1f),
        0xc4 | 0xd9 => 2 + length(1)?,
        0xc5 | 0xda => 3 + length(2)?,
        0xc6 | 0xdb => 5 + length(4)?,
        0xc7 => 3 + length(1)?,
        0xc8 => 4 + length(2)?,
        0xc9 => 6 + length(4)?,
        0xcc | 0xd0 => 2,
        0xcd | 0xd1 => 3,
        0xca | 0xce | 0xd2 => 5,
        0xcb | 0xcf | 0xd3 => 9,
        0xd4 => 3,
        0xd5 => 4,
        0xd6 => 6,
        0xd7 => 10,
        0xd8 => 18,
        _ => return None,
    })
}

/// The payload of a str or bin value (the whole value in `value`).
fn bytes_of(value: &[u8]) -> Option<&[u8]> {
    let (&marker, rest) = value.split_first()?;
    let header = match marker {
        0xa0..=0xbf => 0,
        0xd9 | 0xc4 => 1,
        0xda | 0xc5 => 2,
        0xdb | 0xc6 => 4,
        _ => return None,
    };
    rest.get(header..)
}

/// `[time_nanos, record]` at the start of `bytes`: its parts and what follows it.
fn pair(bytes: &[u8]) -> Result<(i64, &[u8], &[u8]), &'static str> {
    let bad = "not a buffered event";
    let mut rest = bytes;
    if rmp::decode::read_array_len(&mut rest).map_err(|_| bad)? != 2 {
        return Err(bad);
    }
    let time_nanos = rmp::decode::read_int::<i64, _>(&mut rest).map_err(|_| bad)?;
    let (record, rest) = split_value(rest).ok_or(bad)?;
    if !is_map(record) {
        return Err(bad);
    }
    Ok((time_nanos, record, rest))
}

impl Batch {
    /// The bytes the buffer stores.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_with(None)
    }

    /// [`Batch::encode`], with the sender's chunk id (its ack's MessagePack value) as the
    /// fourth part when given (nil otherwise): what is stored then differs between two
    /// batches of the same lines sent under two ids (see [`crate::recent`]). Read back, it is
    /// passed over. The fifth part, the received time, always takes nine bytes (a uint64),
    /// for [`identity`] to leave it out.
    pub fn encode_with(&self, chunk: Option<&[u8]>) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            HEADER_ROOM + self.tag.len() + self.events.encoded_len() + TRAILER_ROOM,
        );
        self.write_header(&mut out);
        out.extend_from_slice(self.events.pairs());
        write_trailer(&mut out, chunk, self.received_ms);
        out
    }

    /// The bytes [`Batch::encode_with`] writes, written around the events where they lie
    /// when there is room for the header before them (events built by
    /// [`Events::for_batch`], or read back by [`Batch::decode_owned`]; copied otherwise): no
    /// allocation of the events' size, and no copy of them unless the header is shorter
    /// than its room.
    pub fn into_stored(self, chunk: Option<&[u8]>) -> Vec<u8> {
        let mut header = Vec::with_capacity(HEADER_ROOM + self.tag.len());
        self.write_header(&mut header);
        debug_assert_eq!(header.len(), header_len(self.tag.len(), self.events.len()));
        let Some(gap) = self.events.start.checked_sub(header.len()) else {
            return self.encode_with(chunk);
        };
        let received_ms = self.received_ms;
        let mut bytes = self.events.bytes;
        bytes[gap..gap + header.len()].copy_from_slice(&header);
        // Room the header did not take (the count was not known when the room was made):
        // the events move down by those few bytes, in place.
        if gap > 0 {
            bytes.drain(..gap);
        }
        write_trailer(&mut bytes, chunk, received_ms);
        bytes
    }

    /// `[5 parts, source, tag, count of events`: what comes before the events.
    fn write_header(&self, out: &mut Vec<u8>) {
        let count = u32::try_from(self.events.len()).expect("a batch is far below 2^32 events");
        rmp::encode::write_array_len(out, 5).expect(FINE);
        rmp::encode::write_uint(out, self.source as u64).expect(FINE);
        rmp::encode::write_str(out, &self.tag).expect(FINE);
        rmp::encode::write_array_len(out, count).expect(FINE);
    }

    /// A batch from the bytes [`Batch::encode`] wrote (every event checked, no record
    /// decoded).
    ///
    /// # Errors
    /// When the bytes are not such a batch (a bug, or a buffer from another version).
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        Self::decode_owned(bytes.to_vec())
    }

    /// [`Batch::decode`], keeping `bytes` (a batch read from the buffer) for its events
    /// rather than copying them.
    ///
    /// # Errors
    /// As [`Batch::decode`].
    pub fn decode_owned(mut bytes: Vec<u8>) -> Result<Self, String> {
        let bad = |why: &str| format!("not a buffered batch: {why}");
        let mut rd = &bytes[..];
        // Three parts at least (a version before 2026-12-06 wrote three, or four with a
        // chunk id); a later version may add parts after the received time (read past
        // here), so a rollback can still read what it wrote, as long as the fifth part
        // stays an unsigned integer (anything else is refused here as not a batch).
        let parts = rmp::decode::read_array_len(&mut rd).map_err(|_| bad("no header"))?;
        if parts < 3 {
            return Err(bad("no header"));
        }
        let source = match rmp::decode::read_int::<u8, _>(&mut rd).map_err(|_| bad("source"))? {
            1 => Source::Forward,
            2 => Source::Otlp,
            _ => return Err(bad("source")),
        };
        let (tag, rest) = rmp::decode::read_str_from_slice(rd).map_err(|_| bad("tag"))?;
        let tag = tag.to_owned();
        rd = rest;
        let count = rmp::decode::read_array_len(&mut rd).map_err(|_| bad("events"))?;
        let start = bytes.len() - rd.len();
        let (index, mut rest) = Events::read(rd, count).map_err(bad)?;
        let end = bytes.len() - rest.len();
        let mut received_ms = 0;
        for part in 3..parts {
            let value =
                rmpv::decode::read_value(&mut rest).map_err(|_| bad("a part after the events"))?;
            if part == 4 {
                received_ms = value
                    .as_u64()
                    .and_then(|ms| i64::try_from(ms).ok())
                    .ok_or_else(|| bad("the received time"))?;
            }
        }
        if !rest.is_empty() {
            return Err(bad("bytes after the events"));
        }
        bytes.truncate(end);
        Ok(Self {
            source,
            tag,
            events: Events {
                bytes,
                start,
                index,
            },
            received_ms,
        })
    }
}

/// What follows the events: the chunk id (or nil) and the received time, always a
/// uint64's nine bytes (see [`identity`]).
fn write_trailer(out: &mut Vec<u8>, chunk: Option<&[u8]>, received_ms: i64) {
    // Exactly: growing by doubling would double a batch of megabytes for a few bytes.
    out.reserve_exact(5 + chunk.map_or(1, <[u8]>::len) + RECEIVED_BYTES);
    match chunk {
        Some(chunk) => rmp::encode::write_bin(out, chunk).expect(FINE),
        None => rmp::encode::write_nil(out).expect(FINE),
    }
    rmp::encode::write_u64(out, u64::try_from(received_ms).unwrap_or(0)).expect(FINE);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch with a part after the events (the chunk id) reads as the same batch;
    /// whole-second times are told apart from finer ones.
    #[test]
    fn parts_after_the_events_are_passed_over_and_whole_seconds_told() {
        let mut batch = Batch {
            source: Source::Forward,
            tag: "hybris.wrapper".to_owned(),
            events: Events::default(),
            received_ms: 1_764_979_200_000,
        };
        batch.events.push(&Event {
            time_nanos: 2_000_000_000,
            record: vec![(Value::from("log"), Value::from("one"))],
        });
        // A time out of range (saturated) says no finer time either.
        batch.events.push(&Event {
            time_nanos: i64::MAX,
            record: vec![(Value::from("log"), Value::from("ms"))],
        });
        assert!(batch.events.whole_seconds());
        let bytes = batch.encode_with(Some(b"\xa2id"));
        assert_eq!(bytes[0], 0x95, "a fixarray of five");
        assert_eq!(Batch::decode(&bytes).expect("reads"), batch);
        assert_ne!(
            bytes,
            batch.encode_with(Some(b"\xa3id2")),
            "the id is in what is stored"
        );
        batch.events.push(&Event {
            time_nanos: 2_000_000_001,
            record: vec![(Value::from("log"), Value::from("two"))],
        });
        assert!(!batch.events.whole_seconds());
    }

    /// Stored in place or copied, a batch is the same bytes, and reads back as the same
    /// batch; built with room for its header (the count known or not), or read back, it is
    /// stored where its events lie.
    #[test]
    fn a_batch_built_with_room_is_stored_in_place_as_the_same_bytes() {
        let build = |mut events: Events, count: u32| {
            for i in 0..count {
                let record = [0x81, 0xa3, b'l', b'o', b'g', 0xa1, b'a' + (i % 26) as u8];
                events.push_raw(i64::from(i) * 7, &record);
            }
            events
        };
        let batch = |tag: &str, events: Events| Batch {
            source: Source::Forward,
            tag: tag.to_owned(),
            events,
            received_ms: 1_764_979_200_000,
        };
        // fixstr, str8, str16 and str32 tags; fixarray, array16 and array32 counts.
        let tags = [
            "t",
            &"x".repeat(200),
            &"long.tag".repeat(40),
            &"y".repeat(70_000),
        ];
        for tag in tags {
            for count in [0, 1, 15, 16, 70_000] {
                let plain = build(Events::default(), count);
                for chunk in [None, Some(&b"\xa2id"[..]), Some(&[0xa0 + 31; 100][..])] {
                    let copied = batch(tag, plain.clone()).encode_with(chunk);
                    for known in [Some(count as usize), None] {
                        // Room for every event (13 bytes at most each): built without
                        // growing, so its bytes stay where they were allocated.
                        let bytes = 13 * count as usize;
                        let room = build(Events::for_batch(tag, bytes, known), count);
                        assert_eq!(room, plain, "equal whatever their room");
                        let allocation = room.bytes.as_ptr();
                        let stored = batch(tag, room).into_stored(chunk);
                        assert_eq!(stored, copied, "{count} events, count known: {known:?}");
                        // Not copied to bytes of its own (a chunk id past the trailer's room
                        // may move it once).
                        if chunk.is_none_or(|c| c.len() <= 64) {
                            assert_eq!(stored.as_ptr(), allocation, "stored where built");
                        }
                    }
                    assert_eq!(
                        batch(tag, plain.clone()).into_stored(chunk),
                        copied,
                        "no room"
                    );
                    let read = copied.clone();
                    let allocation = read.as_ptr();
                    let back = Batch::decode_owned(read).expect("decodes");
                    assert_eq!(back.events.bytes.as_ptr(), allocation, "kept, not copied");
                    assert_eq!(back, batch(tag, plain.clone()));
                    assert_eq!(back.events.len(), count as usize);
                    assert_eq!(back.into_stored(chunk), copied, "read back, stored again");
                }
            }
        }
        // Built for one tag, stored under another: a longer one is copied, a shorter one
        // moves the events down; the bytes are right either way.
        for (built, stored) in [("short", "a.longer.tag"), ("a.longer.tag", "short")] {
            let events = build(Events::for_batch(built, 16, Some(3)), 3);
            let expected = batch(stored, events.clone()).encode_with(None);
            assert_eq!(batch(stored, events).into_stored(None), expected);
        }
    }

    fn events(list: &[Event]) -> Events {
        let mut events = Events::default();
        for event in list {
            events.push(event);
        }
        events
    }

    #[test]
    fn a_batch_comes_back_as_it_went_in() {
        let list = vec![
            Event {
                time_nanos: 1_730_103_120_040_000_000,
                record: vec![
                    (Value::from("log"), Value::from("INFO  [main] [X] hello")),
                    (Value::from("raw"), Value::Binary(vec![0xff, 0x00])),
                    (Value::from(7), Value::from("a key that is not a str")),
                    (Value::from("n"), Value::from(7)),
                ],
            },
            Event {
                time_nanos: -1,
                record: vec![],
            },
        ];
        let mut batch = Batch {
            source: Source::Forward,
            tag: "hybris.wrapper".to_owned(),
            events: events(&list),
            received_ms: 1_764_979_200_123,
        };
        let back = Batch::decode(&batch.encode()).expect("decodes");
        assert_eq!(back, batch);
        let decoded: Vec<Event> = back.events.iter().map(|e| e.to_event()).collect();
        assert_eq!(decoded, list);
        let first = back.events.iter().next().expect("two events");
        assert_eq!(first.text("log").as_deref(), Some("INFO  [main] [X] hello"));
        assert_eq!(first.text("raw").as_deref(), Some("\u{fffd}\0"));
        assert_eq!(first.text("n"), None, "not text");
        assert_eq!(first.text("7"), None, "an integer key is not the text 7");
        assert_eq!(first.text("absent"), None);
        assert!(Batch::decode(b"\x93\x01").is_err());
        // A received time cut short is refused.
        let bytes = batch.encode();
        assert!(Batch::decode(&bytes[..bytes.len() - 1]).is_err());
        // An event cut short, or a record that is not a map, is refused (in the three-part
        // form the events end the batch).
        let mut three = bytes[..bytes.len() - 10].to_vec();
        three[0] = 0x93;
        assert!(Batch::decode(&three).is_ok());
        assert!(Batch::decode(&three[..three.len() - 1]).is_err());
        let mut not_a_map = three[..three.len() - 1].to_vec();
        not_a_map.push(0x90);
        assert!(Batch::decode(&not_a_map).is_err());
        // What the buffer held before 2026-12-04 (one value tree, minimal lengths) still
        // decodes: a buffer written by the previous version survives the upgrade.
        let tree = Value::Array(vec![
            Value::from(1),
            Value::from("hybris.wrapper"),
            Value::Array(
                list.iter()
                    .map(|e| {
                        Value::Array(vec![
                            Value::from(e.time_nanos),
                            Value::Map(e.record.clone()),
                        ])
                    })
                    .collect(),
            ),
        ]);
        let mut old = Vec::new();
        rmpv::encode::write_value(&mut old, &tree).expect("encodes");
        batch.received_ms = 0;
        assert_eq!(
            identity(&old).concat(),
            identity(&batch.encode()).concat(),
            "a chunk that version stored is recognised when sent again now"
        );
        assert_eq!(Batch::decode(&old), Ok(batch), "received when, not known");
    }

    /// A batch's identity leaves its received time out (a resend, received later, is the
    /// same batch) and nothing else: not the chunk id, not an event. A batch stored before
    /// the received time was kept (three parts, or four with a chunk id) reads as the same
    /// batch stored now, nil for no chunk id. Rollback: the previous version's reading
    /// (three parts, what follows passed over) reads a batch written now.
    #[test]
    fn the_identity_is_all_but_the_received_time() {
        let mut batch = Batch {
            source: Source::Forward,
            tag: "hybris.wrapper".to_owned(),
            events: events(&[Event {
                time_nanos: 1_000,
                record: vec![(Value::from("log"), Value::from("one"))],
            }]),
            received_ms: 1_764_979_200_000,
        };
        let joined = |stored: &[u8]| identity(stored).concat();
        let first = batch.encode_with(Some(b"\xa2id"));
        batch.received_ms += 61_000;
        let again = batch.encode_with(Some(b"\xa2id"));
        assert_ne!(first, again);
        assert_eq!(joined(&first), joined(&again));
        assert_eq!(joined(&first), first[..first.len() - 9]);
        assert_ne!(joined(&again), joined(&batch.encode_with(Some(b"\xa3id2"))));
        assert_ne!(joined(&again), joined(&batch.encode()), "no id");
        let back = Batch::decode(&again).expect("decodes");
        assert_eq!(back.received_ms, 1_764_979_261_000);
        let mut other = batch.clone();
        other.events = events(&[Event {
            time_nanos: 1_000,
            record: vec![(Value::from("log"), Value::from("two"))],
        }]);
        assert_ne!(joined(&other.encode()), joined(&batch.encode()));
        // What the previous version stored, three parts (no chunk id) or four: the same
        // batch stored now.
        let mut three = batch.encode();
        three.truncate(three.len() - 10);
        three[0] = 0x93;
        assert_eq!(joined(&three), joined(&batch.encode()));
        assert_eq!(Batch::decode(&three).expect("decodes").received_ms, 0);
        let mut four = batch.encode_with(Some(b"\xa2id"));
        four.truncate(four.len() - 9);
        four[0] = 0x94;
        assert_eq!(joined(&four), joined(&again));
        assert_ne!(joined(&four), joined(&three));
        // Not a batch: itself.
        assert_eq!(joined(b"\x95a"), b"\x95a");
        assert_eq!(joined(b""), b"");
        // A received time that is not a number is not a batch written here.
        let mut bad = batch.encode();
        let at = bad.len() - 9;
        bad.truncate(at);
        bad.push(0xc0);
        assert!(Batch::decode(&bad).is_err());
        // Read as the previous version did: three parts, then every part passed over.
        let mut rest = &again[..];
        assert_eq!(rmp::decode::read_array_len(&mut rest).expect("header"), 5);
        let mut tree = again.as_slice();
        let Value::Array(parts) = rmpv::decode::read_value(&mut tree).expect("one value") else {
            panic!("an array")
        };
        assert!(tree.is_empty());
        assert_eq!(parts[3], Value::Binary(b"\xa2id".to_vec()));
    }

    mod scalars {
        use proptest::prelude::*;

        use super::*;

        fn scalar() -> impl Strategy<Value = Value> {
            prop_oneof![
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                any::<f32>().prop_map(Value::from),
                any::<bool>().prop_map(Value::from),
                Just(Value::Nil),
                ".{0,300}".prop_map(Value::from),
                proptest::collection::vec(any::<u8>(), 0..300).prop_map(Value::Binary),
                // fixext 1, 2, 4, 8, 16, and ext 8 / 16 of other sizes.
                (
                    any::<i8>(),
                    prop_oneof![
                        Just(1_usize),
                        Just(2),
                        Just(4),
                        Just(8),
                        Just(16),
                        0_usize..300
                    ]
                )
                    .prop_map(|(t, n)| Value::Ext(t, vec![7; n])),
            ]
        }

        proptest! {
            /// A scalar's length from its header is what walking it finds, whole or cut.
            #[test]
            fn a_scalars_length_from_its_header_is_what_walking_it_finds(
                value in scalar(),
                cut in 0_usize..400,
            ) {
                let mut bytes = Vec::new();
                rmpv::encode::write_value(&mut bytes, &value).expect("encodes");
                let walked = forward::frame_len(&bytes, bytes.len()).expect("a value");
                prop_assert_eq!(scalar_len(&bytes), walked);
                let cut = &bytes[..cut.min(bytes.len())];
                let split = split_value(cut).map(|(v, _)| v.len());
                let want = forward::frame_len(cut, cut.len()).ok().flatten().filter(|n| *n > 0);
                prop_assert_eq!(split, want);
            }
        }
    }

    #[test]
    fn text_finds_the_first_str_key_of_any_length_only() {
        let long = "a_key_longer_than_thirty_one_bytes_is_a_str8";
        let event = Event {
            time_nanos: 1,
            record: vec![
                (
                    Value::Binary(b"log".to_vec()),
                    Value::from("a bin key is not a str key"),
                ),
                (Value::from("log"), Value::from("first")),
                (Value::from("log"), Value::from("second")),
                (Value::from(long), Value::from("str8")),
            ],
        };
        let events = events(&[event]);
        let event = events.iter().next().expect("one");
        assert_eq!(event.text("log").as_deref(), Some("first"));
        assert_eq!(event.text(long).as_deref(), Some("str8"));
    }

    #[test]
    fn a_record_without_a_line_shows_as_json_up_to_its_cap() {
        let event = Event {
            time_nanos: 1,
            record: vec![
                (Value::from("host"), Value::from("web-1")),
                (
                    Value::Binary(b"file".to_vec()),
                    Value::Binary(b"a.log".to_vec()),
                ),
                (
                    Value::from(7),
                    Value::from("a key that is not text is left out"),
                ),
                (
                    Value::from("nested"),
                    Value::Array(vec![Value::from(1), Value::Nil, Value::from("x")]),
                ),
                (Value::from("host"), Value::from("web-2")),
            ],
        };
        let events = events(&[event]);
        let event = events.iter().next().expect("one");
        // What the pipeline showed before it read pairs one by one: every text key, a
        // later one over an earlier one, values as text.
        let whole = event.to_event();
        let expected: serde_json::Map<String, serde_json::Value> = whole
            .record
            .iter()
            .filter_map(|(k, v)| {
                let value = forward::text(v).map_or_else(|| v.to_string(), |t| t.into_owned());
                Some((
                    forward::text(k)?.into_owned(),
                    serde_json::Value::from(value),
                ))
            })
            .collect();
        let json = event.to_json(1 << 20);
        assert_eq!(json, serde_json::Value::Object(expected).to_string());
        assert_eq!(
            json,
            r#"{"file":"a.log","host":"web-2","nested":"[1, nil, \"x\"]"}"#
        );
        // Cut: pairs are shown until the object reaches the cap, a text value cut there,
        // before the word the cut falls in.
        assert_eq!(event.to_json(10), r#"{"host":"web-1"}"#);
        assert_eq!(event.to_json(5), r#"{"host":""}"#);
        // A value to decode that does not fit what is left ends it (`nested`, 5 bytes sent,
        // with 3 left).
        assert_eq!(event.to_json(35), r#"{"file":"a.log","host":"web-1"}"#);
    }

    /// A value cut inside an address or a number would no longer be masked: the cut goes
    /// before it.
    #[test]
    fn a_json_value_is_cut_before_an_address_the_cap_falls_in() {
        let events = events(&[Event {
            time_nanos: 1,
            record: vec![
                (
                    Value::from("msg"),
                    Value::from("mail to kim.lee@example.com or 010-1234-5678"),
                ),
                (Value::from("a"), Value::from("kim@x.io")),
            ],
        }]);
        let event = events.iter().next().expect("one");
        // The value has the cap less the braces' 2 bytes: 26 ends inside the address. What
        // follows a cut value is not shown, though it would fit (it would make the value
        // look whole).
        assert_eq!(event.to_json(28), r#"{"msg":"mail to "}"#);
        // 40: inside the number.
        assert_eq!(
            event.to_json(42),
            r#"{"msg":"mail to kim.lee@example.com or "}"#
        );
        assert_eq!(
            event.to_json(46),
            r#"{"msg":"mail to kim.lee@example.com or 010-1234-5678"}"#
        );
    }

    #[test]
    fn a_str_that_is_not_utf8_reads_with_bad_bytes_replaced() {
        // {"log": str of [0x61, 0xff]} as some clients send it.
        let record = [0x81, 0xa3, b'l', b'o', b'g', 0xa2, b'a', 0xff];
        let mut events = Events::default();
        events.push_raw(5, &record);
        let event = events.iter().next().expect("one");
        assert_eq!(event.time_nanos, 5);
        assert_eq!(event.text("log").as_deref(), Some("a\u{fffd}"));
    }
}
