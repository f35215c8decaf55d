//! What goes into a queue and what comes out, and the limits both backends enforce alike.

use std::{collections::BTreeMap, time::SystemTime};

use crate::{error::QueueError, limits};

/// A message to send.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutgoingMessage {
    /// The payload: text, as on SQS (binary payloads go base64-encoded). With its attributes
    /// at most [`limits::MAX_MESSAGE_BYTES`], and only characters SQS accepts (no control
    /// characters other than tab, line feed and carriage return).
    pub body: String,
    /// FIFO group: messages of one group are delivered in order, one group at a time.
    /// Required on FIFO queues, ignored on standard ones. At most 128 characters.
    pub group_id: Option<String>,
    /// FIFO deduplication id: a message whose id was already sent within the dedup window is
    /// accepted but not delivered. `None` means never deduplicated. Ignored on standard
    /// queues. At most 128 characters.
    pub dedup_id: Option<String>,
    /// String attributes, such as the W3C `traceparent`. At most
    /// [`limits::MAX_ATTRIBUTES`]; names of letters, digits, `-`, `_` and `.`.
    pub attributes: BTreeMap<String, String>,
}

impl OutgoingMessage {
    /// A message with `body` and nothing else.
    pub fn new(body: impl Into<String>) -> Self {
        Self {
            body: body.into(),
            ..Self::default()
        }
    }

    /// Sets the FIFO group.
    #[must_use]
    pub fn with_group(mut self, group_id: impl Into<String>) -> Self {
        self.group_id = Some(group_id.into());
        self
    }

    /// Sets the deduplication id.
    #[must_use]
    pub fn with_dedup_id(mut self, dedup_id: impl Into<String>) -> Self {
        self.dedup_id = Some(dedup_id.into());
        self
    }

    /// Adds a string attribute.
    #[must_use]
    pub fn with_attribute(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(name.into(), value.into());
        self
    }

    /// Size as SQS counts it: the body plus every attribute's name, type (`String`) and value.
    pub fn size(&self) -> usize {
        self.body.len()
            + self
                .attributes
                .iter()
                .map(|(name, value)| name.len() + "String".len() + value.len())
                .sum::<usize>()
    }
}

/// Handle of one delivery of a message, for deleting it or changing its visibility.
/// Only the latest delivery's receipt is valid.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Receipt(pub(crate) String);

impl Receipt {
    /// The opaque handle as text, for logs of ids or for passing between processes.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A receipt from text returned by [`Receipt::as_str`].
    pub fn from_string(receipt: String) -> Self {
        Self(receipt)
    }
}

/// A delivered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// The id the queue gave the message when it was sent; the same on every delivery.
    pub message_id: String,
    /// Handle of this delivery, for [`crate::Queue::delete`] and
    /// [`crate::Queue::change_visibility`].
    pub receipt: Receipt,
    /// The body as sent.
    pub body: String,
    /// The attributes as sent.
    pub attributes: BTreeMap<String, String>,
    /// How many times the message was delivered, this delivery included (1 the first time).
    pub receive_count: u32,
    /// The FIFO group; `None` on standard queues.
    pub group_id: Option<String>,
    /// When the message was sent (millisecond precision).
    pub sent_time: SystemTime,
}

/// A message that was received `max_receives` times without being deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterMessage {
    /// The message id, as [`ReceivedMessage::message_id`]; what
    /// [`DeadLetterSelection::Ids`] takes.
    pub id: String,
    /// The FIFO group; `None` on standard queues.
    pub group_id: Option<String>,
    /// The body as sent.
    pub body: String,
    /// The attributes as sent.
    pub attributes: BTreeMap<String, String>,
    /// Deliveries before it was dead-lettered (approximate on SQS).
    pub receive_count: u32,
    /// When the message was first sent.
    pub sent_time: SystemTime,
}

/// Which dead letters to put back into the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterSelection {
    /// The dead letters with these [`DeadLetterMessage::id`]s; unknown ids are ignored.
    Ids(Vec<String>),
    /// Every dead letter.
    All,
}

/// Approximate numbers of messages, as SQS reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueCounts {
    /// Waiting to be delivered (on FIFO, also those waiting behind an in-flight message of
    /// their group).
    pub visible: u64,
    /// Delivered and neither deleted nor back to visible yet.
    pub in_flight: u64,
    /// Dead letters.
    pub dead: u64,
}

/// [`QueueCounts`] of one FIFO group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupCounts {
    /// Waiting to be delivered.
    pub visible: u64,
    /// Delivered and not yet deleted (at most one).
    pub in_flight: u64,
    /// Dead letters of this group.
    pub dead: u64,
}

/// Checks everything either engine would refuse, so both backends refuse the same messages
/// and nothing of a send goes out when one of its messages is invalid.
pub(crate) fn validate(
    queue: &str,
    fifo: bool,
    messages: &[OutgoingMessage],
) -> Result<(), QueueError> {
    for (index, message) in messages.iter().enumerate() {
        let invalid = |reason: String| QueueError::InvalidMessage {
            queue: queue.to_owned(),
            index,
            reason,
        };
        let size = message.size();
        if size > limits::MAX_MESSAGE_BYTES {
            return Err(invalid(format!(
                "the message is {size} bytes with its attributes; the limit is {}",
                limits::MAX_MESSAGE_BYTES
            )));
        }
        if let Some(c) = message.body.chars().find(|c| !allowed_char(*c)) {
            return Err(invalid(format!(
                "the body holds character U+{:04X}, which SQS refuses",
                u32::from(c)
            )));
        }
        if message.attributes.len() > limits::MAX_ATTRIBUTES {
            return Err(invalid(format!(
                "the message has {} attributes; the limit is {}",
                message.attributes.len(),
                limits::MAX_ATTRIBUTES
            )));
        }
        for (name, value) in &message.attributes {
            if !valid_attribute_name(name) {
                return Err(invalid(format!(
                    "attribute name {name:?} must be 1 to 256 letters, digits, '-', '_' or '.', \
                     not start with 'AWS.' or 'Amazon.', and have no '..'"
                )));
            }
            if value.is_empty() || value.chars().any(|c| !allowed_char(c)) {
                return Err(invalid(format!(
                    "attribute {name:?} must have a non-empty value of characters SQS accepts"
                )));
            }
        }
        if fifo {
            match &message.group_id {
                None => {
                    return Err(invalid("a FIFO queue needs a group id".to_owned()));
                }
                Some(group) if !valid_id(group) => {
                    return Err(invalid(format!(
                        "group id {group:?} must be 1 to 128 printable ASCII characters"
                    )));
                }
                Some(_) => {}
            }
            if let Some(dedup) = &message.dedup_id
                && !valid_id(dedup)
            {
                return Err(invalid(format!(
                    "deduplication id {dedup:?} must be 1 to 128 printable ASCII characters"
                )));
            }
        }
    }
    Ok(())
}

/// The characters SQS accepts in bodies and attribute values.
fn allowed_char(c: char) -> bool {
    matches!(c, '\u{9}' | '\u{A}' | '\u{D}' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
}

fn valid_attribute_name(name: &str) -> bool {
    (1..=256).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && !name.to_ascii_lowercase().starts_with("aws.")
        && !name.to_ascii_lowercase().starts_with("amazon.")
}

/// Group and deduplication ids: 1 to 128 printable ASCII characters (`!` to `~`).
fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| (b'!'..=b'~').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fifo(message: OutgoingMessage) -> Result<(), QueueError> {
        validate("q", true, &[message])
    }

    #[test]
    fn a_plain_fifo_message_with_a_traceparent_is_valid() {
        fifo(
            OutgoingMessage::new("hello")
                .with_group("lane-1")
                .with_dedup_id("shard-1:100-200")
                .with_attribute(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
        )
        .expect("valid");
    }

    #[test]
    fn a_fifo_message_without_a_group_is_refused_by_index() {
        let error = validate(
            "q",
            true,
            &[
                OutgoingMessage::new("a").with_group("g"),
                OutgoingMessage::new("b"),
            ],
        )
        .expect_err("no group");
        assert!(
            matches!(error, QueueError::InvalidMessage { index: 1, .. }),
            "{error}"
        );
    }

    #[test]
    fn a_standard_message_needs_no_group() {
        validate("q", false, &[OutgoingMessage::new("a")]).expect("valid");
    }

    #[test]
    fn too_many_attributes_are_refused() {
        let mut message = OutgoingMessage::new("a").with_group("g");
        for i in 0..=limits::MAX_ATTRIBUTES {
            message = message.with_attribute(format!("a{i}"), "v");
        }
        assert!(matches!(
            fifo(message),
            Err(QueueError::InvalidMessage { .. })
        ));
    }

    #[test]
    fn the_size_limit_counts_attributes_too() {
        let body = "x".repeat(limits::MAX_MESSAGE_BYTES - 10);
        fifo(OutgoingMessage::new(body.clone()).with_group("g")).expect("fits");
        let error = fifo(
            OutgoingMessage::new(body)
                .with_group("g")
                .with_attribute("abc", "def"),
        )
        .expect_err("too large with its attribute");
        assert!(error.to_string().contains("bytes"), "{error}");
    }

    #[test]
    fn control_characters_and_bad_names_are_refused() {
        assert!(fifo(OutgoingMessage::new("a\u{0}b").with_group("g")).is_err());
        assert!(
            fifo(
                OutgoingMessage::new("a")
                    .with_group("g")
                    .with_attribute("AWS.x", "v")
            )
            .is_err()
        );
        assert!(
            fifo(
                OutgoingMessage::new("a")
                    .with_group("g")
                    .with_attribute("a b", "v")
            )
            .is_err()
        );
        assert!(fifo(OutgoingMessage::new("a").with_group("g h")).is_err());
        assert!(fifo(OutgoingMessage::new("a").with_group("x".repeat(129))).is_err());
    }
}
