//! Sinks: where spooled records go.
//!
//! - [`kinesis`]: the PutRecords sink of one module.
//! - [`api`]: the calls it makes to Kinesis (the SDK client, or a test's).
//! - [`backlog`]: its per-partition-key queue, which keeps each key in order
//!   and decides what becomes of each record after an answer.
//! - [`pack`]: how a request's records become its Kinesis records (one
//!   each, or KPL aggregates per shard), within the request's limits.
//! - [`retry`]: when a record Kinesis keeps failing is given up.
//! - [`shards`]: the stream's shard map and per-shard pacing.
//! - [`stream`]: the stream's own record limit, read at start when needed.

pub mod api;
pub mod backlog;
pub mod kinesis;
pub mod pack;
pub mod retry;
pub mod shards;
pub mod stream;

#[cfg(test)]
mod tests;
