//! ksm, the Kinesis Smart Module host: forwards MODE device data from an MQTT
//! broker into Amazon Kinesis Data Streams, with the MODE semantics
//! (subscription filtering, bulk unpacking, partition keys) in a sandboxed
//! WebAssembly component that users can replace.
//!
//! # Layout
//! - `config`: the TOML configuration and its validation.
//! - `pipeline`: the data path, one stage per folder: `source` (MQTT
//!   intake, acknowledgements, the in-flight budget), `route` (each message
//!   to every module's guest; the one record type), `commit` (group commit,
//!   fsync, then acknowledgements), `sink` (PutRecords: window, order,
//!   retries, pacing, KPL aggregation; `sink::api` is the seam to Kinesis).
//! - `store`: the fjall store on disk: the spool (`store::spool`: groups of
//!   records and the sink's bounded window on them), dead letters, activity
//!   logs.
//! - `kinesis`: what Kinesis allows (record and request limits, key
//!   checks), the hash that picks a record's shard, and the KPL's aggregated
//!   record format (`kinesis::aggregate`, public as `aggregate`); a leaf.
//! - `runtime` (the `ksm-runtime` crate, in `host/runtime`) and `bindings`
//!   (the `ksm-bindings` crate, in `host/bindings`, with the bulk payload
//!   format as `bulk`): the wasmtime runtime running the guest component
//!   (`runtime::sandbox`: what a guest may do); `components`: which
//!   component each module runs, hot swap.
//! - `module` and `activity`: a module's settings, status, counters and log;
//!   `metrics`: what `GET /metrics` shows.
//! - `preflight`: what `ksm validate` checks of the files a configuration
//!   names (certificates, keys, secrets).
//! - `tls`: certificates and keys from PEM files, the broker's TLS client
//!   configuration and what a failed handshake means.
//! - `manager`: starts modules, and adds, changes and deletes them while
//!   ksm runs (what the admin API's module endpoints do).
//! - `admin` and `admin_client`: the admin HTTP API and the console it
//!   serves, and the client the CLI uses; `host`: starts and stops all of
//!   the above.
//!
//! The public surface is what the `ksm` binary, the tests and guest authors
//! use: the configuration, the admin API's wire types and client, dead
//! letters as listed, the guest runtime and bindings, and bulk encoding (the
//! conformance suite is the `ksm-conformance` crate, in `host/conformance`).

mod activity;
pub mod admin;
pub mod admin_client;
mod clock;
mod components;
pub mod config;
mod host;
mod kinesis;
pub mod manager;
mod metrics;
mod module;
mod pipeline;
pub mod preflight;
mod store;
pub mod tls;

pub use config::Config;
pub use host::{Host, run};
pub use kinesis::aggregate;
pub use ksm_bindings::{self as bindings, bulk};
pub use ksm_runtime as runtime;
pub use store::dead_letter;
