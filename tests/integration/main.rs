//! Integration tests for ksm: the host, the guest and real services on loopback.
//!
//! One test binary (faster to link than one per file); each module is one area.
//!
//! # Layout
//!
//! - `harness_smoke`: the test harness itself against Mosquitto, moto and kinesalite.
//! - `support`: the `ksm` binary as a process under test, and its admin API.
//! - `events`, `bulk_data`: MODE events and bulk data end to end, dead letters, logs.
//! - `aggregation`: KPL aggregation against moto and kinesalite, read back by the
//!   reference de-aggregator; large records where the stream allows them.
//! - `console`: the console in headless Chromium (`tests/browser/console.mjs`).
//! - `contracts`: 1.0 and 1.1 guests side by side; batches, a failed batch, MQTT details.
//! - `credentials`: role assumption with an external ID.
//! - `faults`: the delivery guarantees under faults (kill -9, Kinesis outage,
//!   partial failures, broker restart, full spool, shared group).
//! - `dead_letters`: malformed input, and dead letters listed, replayed, purged.
//! - `kinesis_faults`: throttling and a missing stream.
//! - `hostile`: hostile guests and devices under a memory limit: each attack costs one
//!   message, a device flood stays within the in-flight budget, a crash loop is broken.
//! - `admin_access`: the admin token (401 without, 200 with, health open), loopback-only
//!   without a token, bounded bodies, HTTPS, the CLI with a token.
//! - `metrics`: `/metrics` scraped during a run, checked against the stream.
//! - `module_api`: modules added, changed and deleted through the admin API under load,
//!   kept in the configuration file, refused as `ksm validate` refuses them.
//! - `tls_broker`: TLS and mutual-TLS brokers, device identity at the broker, each
//!   connection failure explained, certificate rotation, secrets kept out of logs.
//! - `hot_swap`: components swapped while ksm runs; bad ones refused; per-module components.
//! - `kinesalite`: a second Kinesis implementation.
//! - `packet_limit`: the broker's packet limit: a message too large for ksm is refused at
//!   publish, one at the limit reaches ksm whole.
//! - `recycling`: guest instances recycled before a growing heap reaches the memory limit.
//! - `restart`: the persistent session across restarts.
//! - `untrusted_guest`: a guest that traps, loops or eats memory costs one message.
//! - `validate`: the `validate`, `bulk encode` and `conformance` commands.

mod admin_access;
mod aggregation;
mod bulk_data;
mod console;
mod contracts;
mod credentials;
mod dead_letters;
mod events;
mod faults;
mod harness_smoke;
mod hostile;
mod hot_swap;
mod kinesalite;
mod kinesis_faults;
mod metrics;
mod module_api;
mod packet_limit;
mod recycling;
mod restart;
mod support;
mod tls_broker;
mod untrusted_guest;
mod validate;
