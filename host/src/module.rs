//! A running smart module: its settings, activity, spool and dead letters,
//! shared by the router, the committer, its Kinesis sink and the admin API.

use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::activity::{ActivityLog, CounterSnapshot, Counters, Level};
use crate::config::ModuleConfig;
use crate::metrics::ModuleMetrics;
use crate::store::dead_letter::{DeadLetter, DeadLetterStore};
use crate::store::spool::ModuleSpool;
use crate::store::{Store, StoreError};

/// Everything ksm knows about one module while it runs.
#[derive(Debug)]
pub struct Module {
    /// The module's configuration.
    pub config: ModuleConfig,
    /// Counters since start.
    pub counters: Counters,
    /// The activity log.
    pub log: ActivityLog,
    /// Refused data.
    pub dead_letters: DeadLetterStore,
    /// Records waiting for Kinesis.
    pub spool: ModuleSpool,
    /// The component its guest runs (set once loaded, changed by swaps).
    pub component: Mutex<Option<ComponentInfo>>,
    /// Latencies, requests, guest traps and reloads, for `/metrics`.
    pub metrics: ModuleMetrics,
}

impl Module {
    /// Sets up a module over its keyspaces in `store`.
    pub fn open(
        config: ModuleConfig,
        store: &Store,
        spool_max_bytes: u64,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            log: ActivityLog::open(&config.id, store.keyspace(&config.id, "log")?)?,
            counters: Counters::default(),
            dead_letters: DeadLetterStore::open(store, &config.id)?,
            spool: ModuleSpool::open(store, &config.id, spool_max_bytes)?,
            component: Mutex::new(None),
            metrics: ModuleMetrics::default(),
            config,
        })
    }

    /// Counters, with the spool's current size.
    pub fn counters(&self) -> CounterSnapshot {
        self.counters.snapshot(self.spool.len())
    }

    /// Writes one ERROR entry for the refused parts of one message (or of
    /// one request), whose data the caller keeps as dead letters: what was
    /// refused and why, and how many more were.
    pub fn log_refused(&self, letters: &[DeadLetter]) {
        let Some(first) = letters.first() else {
            return;
        };
        let what = match first.record_index {
            Some(index) => format!("record {index} of the message on `{}`", first.topic),
            None if first.partition_key.is_some() => {
                format!("a record from the message on `{}`", first.topic)
            }
            None => format!("message on `{}`", first.topic),
        };
        let message = match letters.len() {
            1 => format!("{what} refused and kept as a dead letter: {}", first.reason),
            n => format!(
                "{n} records refused and kept as dead letters; the first, {what}: {}",
                first.reason
            ),
        };
        self.log.write(Level::Error, message);
    }
}

/// Which component a module runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentInfo {
    /// The component file.
    pub path: PathBuf,
    /// SHA-256 of its content, hex.
    pub sha256: String,
    /// When it was loaded, RFC 3339 UTC.
    pub loaded_at: String,
    /// How long loading, configuring and checking took, milliseconds.
    pub load_ms: u64,
    /// The contract version it speaks (`ksm:smart-module@1.1 (batches)`).
    #[serde(default)]
    pub contract: String,
}

impl ComponentInfo {
    /// The first 12 hex digits of the hash, for logs.
    pub fn short_hash(&self) -> &str {
        self.sha256.get(..12).unwrap_or(&self.sha256)
    }
}
