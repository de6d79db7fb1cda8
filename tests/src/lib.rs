//! Test support for ksm: real services on loopback, and helpers that read like the product.
//!
//! Every integration test starts the services it needs on fresh `127.0.0.1` ports and stops
//! them when the handle is dropped, so tests run in parallel without sharing state:
//!
//! ```no_run
//! # async fn example() {
//! use ksm_tests::{Moto, Mosquitto, kinesis, mqtt};
//!
//! let broker = Mosquitto::start();
//! let moto = Moto::start();
//! let client = kinesis::client(&moto.endpoint()).await;
//! let stream = kinesis::unique_stream_name("events");
//! kinesis::create_stream(&client, &stream, 2).await;
//! mqtt::publish_all(&broker.url(), &[("/devices/1001/event", r#"{"eventType":"t"}"#)]).await;
//! let records = kinesis::wait_for_records(&client, &stream, 1, std::time::Duration::from_secs(10)).await;
//! # }
//! ```
//!
//! The services are real programs, never mocks; a missing program fails the test with the
//! command that installs it (`scripts/setup.sh` installs them all). Nothing here reaches AWS.
//!
//! # Layout
//!
//! - [`process`]: spawning a service, its log file, waiting for its port, killing it on drop.
//! - [`mosquitto`]: [`Mosquitto`], an MQTT broker with its own config and port (optionally
//!   persistent across graceful restarts).
//! - [`moto`]: [`Moto`], moto's server (Kinesis and STS over HTTP).
//! - [`kinesalite`]: [`Kinesalite`], a second, independent Kinesis emulator.
//! - [`proxy`]: [`RecordingProxy`], an HTTP proxy that records every request to an emulator
//!   and can play faults (an unreachable endpoint, throttled entries, 500s, slow answers).
//! - [`reference`]: [`ReferenceRead`], a stream read back by the KPL's reference
//!   de-aggregator (Python), with the checks aggregated streams must pass.
//! - [`kinesis`]: SDK clients with fake credentials, the environment for a host process,
//!   stream creation and reading back every record.
//! - [`mqtt`]: publishing with acknowledgements, and a subscriber.
//! - [`load`]: [`LoadPublisher`], numbered QoS 1 messages that survive broker restarts, with
//!   a record of which the broker acknowledged.
//! - [`artifacts`]: the guest component and the host binary, built once per test process.
//! - [`blackhole`]: [`BlackholeKinesis`], a **bench-only** Kinesis endpoint that answers
//!   `PutRecords` without storing anything; never for tests of ksm's behaviour.
//! - this file: [`free_port`], [`TempDir`] and the re-exports.

pub mod artifacts;
pub mod blackhole;
pub mod kinesalite;
pub mod kinesis;
pub mod load;
pub mod mosquitto;
pub mod moto;
pub mod mqtt;
pub mod process;
pub mod proxy;
pub mod reference;
pub mod tls;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub use artifacts::{
    conformance_binary, guest_wasm, js_guest_wasm, ksm_binary, low_battery_guest_wasm,
    misbehaving_guest_wasm, sockets_guest_wasm, workspace_root, wrong_world_guest_wasm,
};
pub use blackhole::{BlackholeKinesis, BlackholeStats};
pub use kinesalite::Kinesalite;
pub use kinesis::{ReadRecord, aws_env, create_stream, read_all_records, unique_stream_name};
pub use kinesis::{client as kinesis_client, wait_for_records};
pub use load::{LoadPlan, LoadPublisher, LoadReport, LoadStats};
pub use mosquitto::Mosquitto;
pub use moto::Moto;
pub use mqtt::publish_all;
pub use proxy::{AcceptedRecord, Faults, PutRecordsStats, RecordedRequest, RecordingProxy};
pub use reference::ReferenceRead;

/// A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it by binding port 0).
///
/// Another process could take it before the caller binds it; on a test machine that race is
/// rare enough, and the services here fail loudly if it happens.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("local address of a bound listener")
        .port()
}

/// A fresh, uniquely named string for this test process: `<prefix>-<pid>-<n>-<time>`.
///
/// Used for stream names, MQTT client ids and temporary directories.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() % 1_000_000_000)
        .unwrap_or(0);
    format!("{prefix}-{}-{n}-{micros}", std::process::id())
}

/// A directory under the system temp dir, removed with everything in it when dropped.
///
/// Set `KSM_KEEP_TEMP=1` to keep it (its path is printed) when debugging a failing test.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a new, empty directory named after `prefix`.
    pub fn new(prefix: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique_name(prefix));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("create temp dir {}: {e}", path.display()));
        TempDir { path }
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("KSM_KEEP_TEMP").is_some() {
            eprintln!("ksm-tests: keeping {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
