//! What the inputs put in the buffer: one batch per forward message or OTLP export, its
//! events as they arrived (before parsing, so multi-line grouping runs once, after the
//! buffer, and a restart re-reads whole lines).
//!
//! Encoded as MessagePack: `[source, tag, [[time_nanos, record], …]]`.

use crate::forward::Event;

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
    pub events: Vec<Event>,
}

impl Batch {
    /// The bytes the buffer stores: written straight from the events (building a value
    /// tree first would copy every record once more).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            64 + self.tag.len()
                + self
                    .events
                    .iter()
                    .map(|e| 16 + e.record.len() * 24)
                    .sum::<usize>(),
        );
        let len = |n: usize| u32::try_from(n).expect("a batch is far below 2^32 items");
        let fine = "writing to a Vec cannot fail";
        rmp::encode::write_array_len(&mut out, 3).expect(fine);
        rmp::encode::write_uint(&mut out, self.source as u64).expect(fine);
        rmp::encode::write_str(&mut out, &self.tag).expect(fine);
        rmp::encode::write_array_len(&mut out, len(self.events.len())).expect(fine);
        for event in &self.events {
            rmp::encode::write_array_len(&mut out, 2).expect(fine);
            rmp::encode::write_sint(&mut out, event.time_nanos).expect(fine);
            rmp::encode::write_map_len(&mut out, len(event.record.len())).expect(fine);
            for (key, value) in &event.record {
                rmpv::encode::write_value(&mut out, key).expect(fine);
                rmpv::encode::write_value(&mut out, value).expect(fine);
            }
        }
        out
    }

    /// A batch from the bytes [`Batch::encode`] wrote.
    ///
    /// # Errors
    /// When the bytes are not such a batch (a bug, or a buffer from another version).
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        // Read part by part (no value tree of the whole batch, then taken apart again).
        let bad = || "not a buffered batch".to_owned();
        let mut rd = bytes;
        if rmp::decode::read_array_len(&mut rd).map_err(|_| bad())? != 3 {
            return Err(bad());
        }
        let source = match rmp::decode::read_int::<u8, _>(&mut rd).map_err(|_| bad())? {
            1 => Source::Forward,
            2 => Source::Otlp,
            _ => return Err(bad()),
        };
        let (tag, rest) = rmp::decode::read_str_from_slice(rd).map_err(|_| bad())?;
        let tag = tag.to_owned();
        rd = rest;
        let count = rmp::decode::read_array_len(&mut rd).map_err(|_| bad())?;
        // Reserved up to what the bytes can hold and a batch usually has (a corrupt count
        // cannot reserve much; more grows as read).
        let mut events = Vec::with_capacity((count as usize).min(rd.len() / 3).min(4096));
        for _ in 0..count {
            if rmp::decode::read_array_len(&mut rd).map_err(|_| bad())? != 2 {
                return Err(bad());
            }
            let time_nanos = rmp::decode::read_int::<i64, _>(&mut rd).map_err(|_| bad())?;
            let pairs = rmp::decode::read_map_len(&mut rd).map_err(|_| bad())?;
            let mut record = Vec::with_capacity((pairs as usize).min(rd.len() / 2).min(64));
            for _ in 0..pairs {
                let key = rmpv::decode::read_value(&mut rd).map_err(|e| e.to_string())?;
                let value = rmpv::decode::read_value(&mut rd).map_err(|e| e.to_string())?;
                record.push((key, value));
            }
            events.push(Event { time_nanos, record });
        }
        Ok(Self {
            source,
            tag,
            events,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value;

    #[test]
    fn a_batch_comes_back_as_it_went_in() {
        let batch = Batch {
            source: Source::Forward,
            tag: "hybris.wrapper".to_owned(),
            events: vec![
                Event {
                    time_nanos: 1_730_103_120_040_000_000,
                    record: vec![
                        (Value::from("log"), Value::from("INFO  [main] [X] hello")),
                        (Value::from("raw"), Value::Binary(vec![0xff, 0x00])),
                    ],
                },
                Event {
                    time_nanos: -1,
                    record: vec![],
                },
            ],
        };
        assert_eq!(Batch::decode(&batch.encode()), Ok(batch.clone()));
        assert!(Batch::decode(b"\x93\x01").is_err());
        // What the buffer held before 2026-12-04 (one value tree, minimal lengths) still
        // decodes: a buffer written by the previous version survives the upgrade.
        let tree = Value::Array(vec![
            Value::from(1),
            Value::from("hybris.wrapper"),
            Value::Array(
                batch
                    .events
                    .iter()
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
        assert_eq!(Batch::decode(&old), Ok(batch));
    }
}
