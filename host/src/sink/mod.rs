//! Sinks: where records go once the guest has produced them.

pub mod kinesis;
