//! Sinks: where spooled records go.
//!
//! - [`kinesis`]: the PutRecords sink of one module.
//! - [`api`]: the calls it makes to Kinesis (the SDK client, or a test's).
//! - [`backlog`]: its per-partition-key queue, which keeps each key in order
//!   and decides what becomes of each record after an answer.
//! - [`retry`]: when a record Kinesis keeps failing is given up.
//! - [`shards`]: the stream's shard map and per-shard pacing.

pub mod api;
pub mod backlog;
pub mod kinesis;
pub mod retry;
pub mod shards;

#[cfg(test)]
mod tests;
