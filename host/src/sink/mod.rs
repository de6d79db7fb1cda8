//! Sinks: where spooled records go.
//!
//! - [`kinesis`]: the PutRecords sink of one module.
//! - [`backlog`]: its per-partition-key queue, which keeps each key in order.
//! - [`shards`]: the stream's shard map and per-shard pacing.

pub mod backlog;
pub mod kinesis;
pub mod shards;
