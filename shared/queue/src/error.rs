//! What can go wrong, as variants a caller can act on.

/// Boxed source of an engine error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The engine could not be reached or failed (network, database, server error) after
    /// retries. Retry later; a `send` that failed may have delivered part of its messages,
    /// so resend all of them with the same deduplication ids.
    #[error("queue {queue} is unavailable")]
    Unavailable {
        /// The queue's name.
        queue: String,
        /// What the engine said.
        #[source]
        source: BoxError,
    },
    /// The engine kept throttling requests through every attempt. Slow down and retry.
    #[error("queue {queue} kept throttling requests through {attempts} attempts")]
    Throttled {
        /// The queue's name.
        queue: String,
        /// Attempts made.
        attempts: u32,
    },
    /// A message can never be sent as it is (too large, too many attributes, a FIFO message
    /// without a group, a character SQS refuses). Nothing of that `send` was sent. Do not
    /// retry it: fix or quarantine the message.
    #[error("message {index} cannot be sent to queue {queue}: {reason}")]
    InvalidMessage {
        /// The queue's name.
        queue: String,
        /// Position of the message in the `send` call.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A receipt is no longer valid: the message's visibility ran out (it may have been
    /// delivered again, to this or another consumer) or the receipt is malformed. The message
    /// was not deleted or changed; expect it again.
    #[error("{count} receipt(s) of queue {queue} expired or are invalid")]
    ReceiptExpired {
        /// The queue's name.
        queue: String,
        /// How many of the receipts given.
        count: usize,
    },
    /// An argument is outside what the engine accepts, such as a visibility above 12 hours.
    #[error("invalid request to queue {queue}: {reason}")]
    InvalidArgument {
        /// The queue's name.
        queue: String,
        /// What is wrong.
        reason: String,
    },
    /// Anything else, such as a missing queue or denied permissions.
    #[error("queue {queue} failed")]
    Other {
        /// The queue's name.
        queue: String,
        /// The cause.
        #[source]
        source: anyhow::Error,
    },
}

impl QueueError {
    /// Whether trying the same call again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::Throttled { .. })
    }
}
