//! What a failed Kinesis call means for the caller: back off, re-open the iterator, or retry.

use std::fmt;

use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};

/// The Kinesis calls the source makes; a bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    CreateStream,
    DescribeStreamSummary,
    ListShards,
    GetShardIterator,
    GetRecords,
}

impl Operation {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::CreateStream => "CreateStream",
            Self::DescribeStreamSummary => "DescribeStreamSummary",
            Self::ListShards => "ListShards",
            Self::GetShardIterator => "GetShardIterator",
            Self::GetRecords => "GetRecords",
        }
    }
}

/// A failed Kinesis call, sorted by what to do about it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// Over the shard's or the account's limits (ProvisionedThroughputExceeded,
    /// LimitExceeded, KMSThrottling): back off with jitter and retry.
    #[error("kinesis {operation} throttled: {message}")]
    Throttled {
        operation: &'static str,
        message: String,
    },
    /// The shard iterator is older than 5 minutes: open a new one from the checkpoint.
    #[error("kinesis shard iterator expired")]
    ExpiredIterator,
    /// The stream or shard does not exist (or is still being created).
    #[error("kinesis {operation}: not found: {message}")]
    NotFound {
        operation: &'static str,
        message: String,
    },
    /// The stream already exists (CreateStream).
    #[error("kinesis {operation}: resource in use: {message}")]
    InUse {
        operation: &'static str,
        message: String,
    },
    /// Anything else: timeouts, connection failures, server errors, refused arguments.
    #[error("kinesis {operation} failed: {message}")]
    Other {
        operation: &'static str,
        message: String,
    },
}

impl CallError {
    /// Sorts an SDK error by its error code; errors without one (timeouts, I/O) are `Other`.
    pub(crate) fn classify<E, R>(operation: Operation, error: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: fmt::Debug,
    {
        let operation = operation.as_str();
        let code = error.code().map(str::to_owned);
        let message = match error.message() {
            Some(message) => message.to_owned(),
            // DisplayErrorContext renders the whole source chain ("dispatch failure: io error ...").
            None => aws_sdk_kinesis::error::DisplayErrorContext(&error).to_string(),
        };
        match code.as_deref() {
            Some(
                "ProvisionedThroughputExceededException"
                | "LimitExceededException"
                | "KMSThrottlingException"
                | "ThrottlingException",
            ) => Self::Throttled { operation, message },
            Some("ExpiredIteratorException") => Self::ExpiredIterator,
            Some("ResourceNotFoundException") => Self::NotFound { operation, message },
            Some("ResourceInUseException") => Self::InUse { operation, message },
            Some(code) => Self::Other {
                operation,
                message: format!("{code}: {message}"),
            },
            None => Self::Other { operation, message },
        }
    }

    /// The metric outcome label of this failure.
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            Self::Throttled { .. } => "throttled",
            Self::ExpiredIterator => "expired_iterator",
            Self::NotFound { .. } => "not_found",
            Self::InUse { .. } => "in_use",
            Self::Other { .. } => "error",
        }
    }
}
