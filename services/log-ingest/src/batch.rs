//! What the inputs put in the buffer: one batch per forward message or OTLP export, its
//! events as they arrived (before parsing, so multi-line grouping runs once, after the
//! buffer, and a restart re-reads whole lines).
//!
//! Encoded as MessagePack: `[source, tag, [[time_nanos, record], …]]`.

use rmpv::Value;

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
    /// The bytes the buffer stores.
    pub fn encode(&self) -> Vec<u8> {
        let events = self
            .events
            .iter()
            .map(|e| {
                Value::Array(vec![
                    Value::from(e.time_nanos),
                    Value::Map(e.record.clone()),
                ])
            })
            .collect();
        let value = Value::Array(vec![
            Value::from(self.source as u8),
            Value::from(self.tag.as_str()),
            Value::Array(events),
        ]);
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &value).expect("writing to a Vec cannot fail");
        out
    }

    /// A batch from the bytes [`Batch::encode`] wrote.
    ///
    /// # Errors
    /// When the bytes are not such a batch (a bug, or a buffer from another version).
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let value = rmpv::decode::read_value(&mut &bytes[..]).map_err(|e| e.to_string())?;
        let bad = || "not a buffered batch".to_owned();
        let Value::Array(mut parts) = value else {
            return Err(bad());
        };
        if parts.len() != 3 {
            return Err(bad());
        }
        let Value::Array(events) = parts.pop().ok_or_else(bad)? else {
            return Err(bad());
        };
        let tag = parts
            .pop()
            .and_then(|t| t.as_str().map(str::to_owned))
            .ok_or_else(bad)?;
        let source = match parts.pop().and_then(|s| s.as_u64()) {
            Some(1) => Source::Forward,
            Some(2) => Source::Otlp,
            _ => return Err(bad()),
        };
        let events = events
            .into_iter()
            .map(|event| match event {
                Value::Array(mut pair) if pair.len() == 2 => {
                    let record = match pair.pop() {
                        Some(Value::Map(record)) => record,
                        _ => return Err(bad()),
                    };
                    let time_nanos = pair.pop().and_then(|t| t.as_i64()).ok_or_else(bad)?;
                    Ok(Event { time_nanos, record })
                }
                _ => Err(bad()),
            })
            .collect::<Result<_, _>>()?;
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
        assert_eq!(Batch::decode(&batch.encode()), Ok(batch));
        assert!(Batch::decode(b"\x93\x01").is_err());
    }
}
