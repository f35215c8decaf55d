//! Roll-up (stage 1): valid changes, in source order, become as few queue messages as the
//! byte budget allows, one FIFO group (lane) per message.
//!
//! Order is the point: the changes of one product always fall in one lane, keep their source
//! order inside it, and a lane's messages are sent in order, so stage 2 sees every product's
//! changes in the order the producer made them. Deduplication ids are derived from the source
//! batch (`dedup_key`), never from time or chance, so a resend after a crash is dropped by
//! the queue within its window (and by the catalog's version guard after it).

use mall_proto::sync::v1::{ChangeOrigin, ProductChange, ProductChangeBatch};
use mall_queue::{PackBudget, RecordTooLarge, pack_items};
use prost::Message as _;

use crate::change::lane_of;

/// The changes of one lane that go into one queue message.
#[derive(Debug, Clone, PartialEq)]
pub struct LaneMessage {
    /// The lane, `lane_of(product_code)`.
    pub lane: u32,
    /// `<dedup_key>-l<lane>-p<part>`: equal on every resend of the same source batch.
    pub dedup_id: String,
    /// The changes, in source order.
    pub batch: ProductChangeBatch,
}

/// Splits `changes` (each with where it came from) by lane and packs each lane's run into
/// messages within `budget` (the base64 body size: see [`budget`]).
///
/// # Errors
/// When one change alone does not fit the budget (validation keeps changes far smaller).
pub fn roll_up(
    changes: Vec<(ProductChange, ChangeOrigin)>,
    lanes: u32,
    budget: PackBudget,
    dedup_key: &str,
) -> Result<Vec<LaneMessage>, RecordTooLarge> {
    let mut by_lane: std::collections::BTreeMap<u32, Vec<(ProductChange, ChangeOrigin)>> =
        std::collections::BTreeMap::new();
    for (change, origin) in changes {
        by_lane
            .entry(lane_of(&change.product_code, lanes))
            .or_default()
            .push((change, origin));
    }
    let mut messages = Vec::new();
    for (lane, changes) in by_lane {
        let size = |(change, origin): &(ProductChange, ChangeOrigin)| {
            change.encoded_len() + origin.encoded_len()
        };
        let parts = pack_items(changes, size, budget)?;
        for (part, pairs) in parts.into_iter().enumerate() {
            let (changes, origins) = pairs.into_iter().unzip();
            messages.push(LaneMessage {
                lane,
                dedup_id: format!("{dedup_key}-l{lane}-p{part}"),
                batch: ProductChangeBatch { changes, origins },
            });
        }
    }
    Ok(messages)
}

/// The packing budget for message bodies of at most `max_body_bytes`: base64 of a
/// `ProductChangeBatch`, whose every change costs its encoding and its origin's, each with a
/// field tag and a length prefix (at most 1 + 5 bytes).
pub fn budget(max_body_bytes: usize) -> PackBudget {
    PackBudget::base64(max_body_bytes).with_overheads(12, 0)
}

/// FNV-1a (64 bit) of `parts` joined by `|`, as 16 hex digits: short, stable deduplication
/// keys from long source positions.
pub fn dedup_key(prefix: char, parts: &[&str]) -> String {
    format!("{prefix}{:016x}", fnv64(parts.join("|").as_bytes()))
}

/// FNV-1a (64 bit), shared with the other users of the queue.
pub use mall_queue::fnv64;

#[cfg(test)]
mod tests {
    use mall_queue::encode_body;

    use super::*;

    fn change(code: &str, version: u64) -> (ProductChange, ChangeOrigin) {
        (
            ProductChange {
                product_code: code.into(),
                product_type: "shoes".into(),
                version,
                ..ProductChange::default()
            },
            ChangeOrigin {
                source: "kinesis:product-changes/shardId-000000000001".into(),
                position: format!("49{version:056}"),
            },
        )
    }

    #[test]
    fn each_lane_keeps_the_source_order_of_its_changes() {
        let changes: Vec<_> = (0..200)
            .map(|i| change(&format!("P-{}", i % 20), i / 20 + 1))
            .collect();
        let messages = roll_up(changes.clone(), 4, budget(1 << 20), "k1").expect("fits");
        for lane in 0..4 {
            let in_lane: Vec<_> = messages
                .iter()
                .filter(|m| m.lane == lane)
                .flat_map(|m| {
                    m.batch
                        .changes
                        .clone()
                        .into_iter()
                        .zip(m.batch.origins.clone())
                })
                .collect();
            let expected: Vec<_> = changes
                .iter()
                .filter(|(c, _)| lane_of(&c.product_code, 4) == lane)
                .cloned()
                .collect();
            assert_eq!(in_lane, expected, "lane {lane}");
        }
    }

    #[test]
    fn messages_stay_within_the_budget_and_ids_are_deterministic() {
        let changes: Vec<_> = (0..500).map(|i| change(&format!("P-{i}"), 1)).collect();
        let budget = budget(2_000);
        let first = roll_up(changes.clone(), 2, budget, "k9").expect("fits");
        assert!(first.len() > 2, "split into several messages");
        for message in &first {
            assert!(encode_body(&message.batch.encode_to_vec()).len() <= 2_000);
        }
        let again = roll_up(changes, 2, budget, "k9").expect("fits");
        assert_eq!(first, again);
        let ids: std::collections::BTreeSet<_> = first.iter().map(|m| &m.dedup_id).collect();
        assert_eq!(ids.len(), first.len(), "ids are unique within a batch");
    }

    #[test]
    fn dedup_keys_are_short_and_stable() {
        let key = dedup_key('k', &["stream", "shardId-000000000001", "4953", "4960"]);
        assert_eq!(key.len(), 17);
        assert_eq!(
            key,
            dedup_key('k', &["stream", "shardId-000000000001", "4953", "4960"])
        );
        assert_ne!(
            key,
            dedup_key('k', &["stream", "shardId-000000000001", "4953", "4961"])
        );
    }
}
