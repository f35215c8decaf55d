//! Where product changes come from. Each source hands batches to the relay's first stage and
//! acknowledges upstream only after that stage made them durable.
//!
//! # Layout
//! - [`kinesis`]: the product team's Kinesis stream, checkpointed and leased per shard.

pub mod kinesis;
