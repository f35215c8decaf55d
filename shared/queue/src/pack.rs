//! Packing many small records into as few messages as a byte budget allows.
//!
//! A queue message costs the same whether it carries one change or a thousand, and SQS
//! bodies are limited to 1 MiB ([`crate::limits::MAX_MESSAGE_BYTES`]). The caller measures
//! each record as it will be encoded; [`pack`] cuts the sequence, in order, into runs that
//! fit the budget. With [`PackBudget::base64`] the budget applies to the base64 text of the
//! concatenated records, which is how binary (protobuf) payloads travel in a text body.

use std::ops::Range;

/// How much fits in one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackBudget {
    /// Most bytes of one message body, after base64 encoding when `base64` is set.
    pub max_bytes: usize,
    /// Bytes each record adds besides its own size (a length prefix, a protobuf field tag).
    pub per_record_overhead: usize,
    /// Bytes each message adds once (an envelope, a header).
    pub per_message_overhead: usize,
    /// Whether the packed bytes are base64-encoded into the body (4 bytes per 3).
    pub base64: bool,
}

impl PackBudget {
    /// A budget of `max_bytes` raw bytes per message, without overheads.
    pub fn raw(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            per_record_overhead: 0,
            per_message_overhead: 0,
            base64: false,
        }
    }

    /// A budget of `max_bytes` of base64 text per message, without overheads.
    pub fn base64(max_bytes: usize) -> Self {
        Self {
            base64: true,
            ..Self::raw(max_bytes)
        }
    }

    /// The same budget with these overheads.
    #[must_use]
    pub fn with_overheads(mut self, per_record: usize, per_message: usize) -> Self {
        self.per_record_overhead = per_record;
        self.per_message_overhead = per_message;
        self
    }

    /// Most raw (unencoded) bytes one message can hold, overheads included.
    pub fn raw_capacity(&self) -> usize {
        if self.base64 {
            // Padded base64 turns n bytes into 4 * ceil(n / 3) characters.
            self.max_bytes / 4 * 3
        } else {
            self.max_bytes
        }
    }
}

/// Length of the padded base64 encoding of `raw` bytes.
pub fn base64_len(raw: usize) -> usize {
    raw.div_ceil(3) * 4
}

/// Encodes packed binary records (a protobuf batch) as a message body: standard base64 with
/// padding, [`base64_len`] characters long.
pub fn encode_body(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decodes a body made by [`encode_body`].
///
/// # Errors
/// When the body is not valid base64.
pub fn decode_body(body: &str) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(body)
}

/// A record that does not fit in a message on its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "record {index} needs {needed} bytes in a message, more than the budget of {capacity} raw bytes"
)]
pub struct RecordTooLarge {
    /// Position of the record.
    pub index: usize,
    /// Raw bytes it needs with its overheads and the message's.
    pub needed: usize,
    /// Raw bytes a message holds.
    pub capacity: usize,
}

/// Cuts records of the given encoded `sizes` into consecutive runs, in order, each fitting
/// `budget`, greedily (so as few runs as possible: each run takes records until the next one
/// would not fit). Returns index ranges into `sizes`; none is empty.
///
/// # Errors
/// [`RecordTooLarge`] naming the first record that does not fit even alone: the caller
/// should quarantine or split it.
pub fn pack(
    sizes: impl IntoIterator<Item = usize>,
    budget: PackBudget,
) -> Result<Vec<Range<usize>>, RecordTooLarge> {
    let capacity = budget.raw_capacity();
    let mut runs = Vec::new();
    let mut start = 0;
    let mut used = budget.per_message_overhead;
    let mut index = 0;
    for size in sizes {
        let cost = size.saturating_add(budget.per_record_overhead);
        let alone = budget.per_message_overhead.saturating_add(cost);
        if alone > capacity {
            return Err(RecordTooLarge {
                index,
                needed: alone,
                capacity,
            });
        }
        if index > start && used.saturating_add(cost) > capacity {
            runs.push(start..index);
            start = index;
            used = budget.per_message_overhead;
        }
        used += cost;
        index += 1;
    }
    if index > start {
        runs.push(start..index);
    }
    Ok(runs)
}

/// [`pack`] applied to owned records: returns the records grouped into messages, in order.
///
/// # Errors
/// As [`pack`].
pub fn pack_items<T>(
    items: Vec<T>,
    size: impl Fn(&T) -> usize,
    budget: PackBudget,
) -> Result<Vec<Vec<T>>, RecordTooLarge> {
    let runs = pack(items.iter().map(&size), budget)?;
    let mut items = items.into_iter();
    Ok(runs
        .into_iter()
        .map(|run| items.by_ref().take(run.len()).collect())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_fill_each_message_before_the_next_starts() {
        let runs = pack([4, 4, 4, 4, 4], PackBudget::raw(10)).expect("fits");
        assert_eq!(runs, vec![0..2, 2..4, 4..5]);
    }

    #[test]
    fn a_record_that_exactly_fills_the_budget_is_alone() {
        let runs = pack([3, 10, 3], PackBudget::raw(10)).expect("fits");
        assert_eq!(runs, vec![0..1, 1..2, 2..3]);
    }

    #[test]
    fn no_records_make_no_messages() {
        assert!(
            pack(std::iter::empty(), PackBudget::raw(10))
                .expect("fits")
                .is_empty()
        );
    }

    #[test]
    fn a_record_larger_than_the_budget_is_named() {
        let error = pack([1, 11, 1], PackBudget::raw(10)).expect_err("too large");
        assert_eq!(error.index, 1);
        assert_eq!(error.capacity, 10);
    }

    #[test]
    fn overheads_count_per_record_and_per_message() {
        // Message overhead 2 and 1 per record: 2 + (3+1) + (3+1) = 10 fits, a third does not.
        let budget = PackBudget::raw(10).with_overheads(1, 2);
        assert_eq!(
            pack([3, 3, 3], budget).expect("fits"),
            vec![0..2, 2..3],
            "two records per message"
        );
        assert!(pack([8], budget).is_err(), "2 + 8 + 1 exceeds 10");
    }

    #[test]
    fn base64_packs_never_exceed_the_budget_once_encoded() {
        let budget = PackBudget::base64(1000).with_overheads(2, 5);
        let sizes: Vec<usize> = (0..500).map(|i| 1 + (i * 37) % 90).collect();
        let runs = pack(sizes.iter().copied(), budget).expect("fits");
        for run in &runs {
            let raw = 5 + sizes[run.clone()].iter().map(|s| s + 2).sum::<usize>();
            let encoded = encode_body(&vec![0u8; raw]);
            assert_eq!(encoded.len(), base64_len(raw));
            assert!(encoded.len() <= 1000, "{} > 1000", encoded.len());
        }
        // Greedy: adding the next record to any run would overflow the budget.
        for pair in runs.windows(2) {
            let raw = 5 + sizes[pair[0].start..=pair[1].start]
                .iter()
                .map(|s| s + 2)
                .sum::<usize>();
            assert!(base64_len(raw) > 1000);
        }
        assert_eq!(runs.iter().map(ExactSizeIterator::len).sum::<usize>(), 500);
    }

    #[test]
    fn bodies_round_trip_through_base64_at_the_predicted_length() {
        for len in [0, 1, 2, 3, 4, 1000] {
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let body = encode_body(&bytes);
            assert_eq!(body.len(), base64_len(len));
            assert_eq!(decode_body(&body).expect("valid base64"), bytes);
        }
        assert!(decode_body("not base64!").is_err());
    }

    #[test]
    fn pack_items_keeps_order_and_every_record() {
        let items: Vec<String> = (0..50).map(|i| "x".repeat(i % 7 + 1)).collect();
        let packs = pack_items(items.clone(), String::len, PackBudget::raw(20)).expect("fits");
        assert!(
            packs
                .iter()
                .all(|p| p.iter().map(String::len).sum::<usize>() <= 20)
        );
        assert_eq!(packs.concat(), items);
    }
}
