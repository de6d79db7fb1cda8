//! ksm, the Kinesis Smart Module host: forwards MODE device data from an MQTT
//! broker into Amazon Kinesis Data Streams, with the MODE semantics
//! (subscription filtering, bulk unpacking, partition keys) in a sandboxed
//! WebAssembly component that users can replace.
//!
//! # Layout
//! - [`config`]: the TOML configuration and its validation.
//! - [`source`]: MQTT input ([`source::mqtt`]) and MODE topic names ([`source::topic`]).
//! - [`runtime`] and [`bindings`]: the wasmtime runtime running the guest component;
//!   [`runtime::sandbox`]: what a guest may do, and the deadline, clock and memory bounds.
//! - [`components`]: which component each module runs; hot swap.
//! - [`router`]: hands each message to every module's guest; [`router::answer`]: a
//!   guest's answer checked against its budget.
//! - [`sink`]: the Kinesis PutRecords sink ([`sink::kinesis`]).
//! - [`ack`]: late MQTT acknowledgement once records are spooled.
//! - [`spool`] and [`store`]: records on disk until Kinesis accepts them, in groups;
//!   group commit; the sink's bounded window on them.
//! - [`module`], [`activity`], [`dead_letter`]: per-module state, logs and refused data.
//! - [`admin`] and [`admin_client`]: the admin HTTP API, and the client `ksm dead-letters` uses.
//! - [`crash_guard`]: a message alone in flight at two abnormal exits is dead-lettered unrun.
//! - [`inflight`]: the byte budget of messages between the broker and the store.
//! - [`host`]: starts and stops all of the above.
//! - [`bulk`] and [`conformance`]: bulk payload encoding and the guest conformance suite.

pub mod ack;
pub mod activity;
pub mod admin;
pub mod admin_client;
pub mod bindings;
pub mod bulk;
pub mod clock;
pub mod components;
pub mod config;
pub mod conformance;
pub mod crash_guard;
pub mod dead_letter;
pub mod host;
pub mod inflight;
pub mod module;
pub mod router;
pub mod runtime;
pub mod sink;
pub mod source;
pub mod spool;
pub mod store;

pub use config::Config;
pub use host::{Host, run};
