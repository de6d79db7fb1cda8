//! The data path, one stage per module, in the order a message travels:
//!
//! - [`source`]: MQTT intake, MODE topic names, sessions; [`ack`]: late
//!   acknowledgement once what a message produced is safe; [`inflight`]: the
//!   byte budget of messages between the broker and the store.
//! - [`route`]: hands batches of messages to each module's guest and builds
//!   the one record type ([`crate::store::spool::SpoolRecord`]);
//!   [`crash_guard`]: a message alone in flight at two abnormal exits is
//!   dead-lettered unrun.
//! - [`commit`]: the committer thread: group commit, one fsync per group,
//!   then the acknowledgements and the hand-over to the sinks.
//! - [`sink`]: per module, PutRecords with a window of requests in flight,
//!   per-key order, retries and per-shard pacing.

pub mod ack;
pub mod commit;
pub mod crash_guard;
pub mod inflight;
pub mod route;
pub mod sink;
pub mod source;
