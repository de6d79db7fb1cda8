//! A running smart module: its settings, activity, spool and dead letters,
//! shared by the router, the committer, its Kinesis sink and the admin API;
//! and the set of modules running now, which the admin API changes.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

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
    /// Module ID (it never changes; a module with another ID is another module).
    pub id: String,
    /// The module's configuration now; see [`Module::config`].
    config: RwLock<Arc<ModuleConfig>>,
    /// Deleted: it takes no more messages, and goes once its spool is empty.
    draining: AtomicBool,
    /// Held while a replay of its dead letters runs.
    pub replay: Arc<tokio::sync::Mutex<()>>,
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
            id: config.id.clone(),
            config: RwLock::new(Arc::new(config)),
            draining: AtomicBool::new(false),
            replay: Arc::default(),
        })
    }

    /// The module's configuration now (a change through the admin API
    /// replaces it between two messages).
    pub fn config(&self) -> Arc<ModuleConfig> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the configuration (the ID stays).
    pub fn set_config(&self, config: ModuleConfig) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
    }

    /// Whether it was deleted and is sending what is left in its spool.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Marks it deleted.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// The component it runs now, if loaded.
    pub fn component(&self) -> Option<ComponentInfo> {
        self.component
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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

/// The modules running now, in configuration order; the admin API adds,
/// replaces and removes them while ksm runs.
#[derive(Debug, Default)]
pub struct ModuleSet(RwLock<Arc<[Arc<Module>]>>);

impl ModuleSet {
    /// A set of these modules.
    pub fn new(modules: Vec<Arc<Module>>) -> Self {
        Self(RwLock::new(modules.into()))
    }

    /// The modules now.
    pub fn all(&self) -> Arc<[Arc<Module>]> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The module with this ID.
    pub fn get(&self, id: &str) -> Option<Arc<Module>> {
        self.all().iter().find(|m| m.id == id).cloned()
    }

    /// Adds a module at the end.
    pub fn push(&self, module: Arc<Module>) {
        let mut modules = self.0.write().unwrap_or_else(|e| e.into_inner());
        *modules = modules.iter().cloned().chain([module]).collect();
    }

    /// Removes a module.
    pub fn remove(&self, module: &Arc<Module>) {
        let mut modules = self.0.write().unwrap_or_else(|e| e.into_inner());
        *modules = modules
            .iter()
            .filter(|m| !Arc::ptr_eq(m, module))
            .cloned()
            .collect();
    }
}
