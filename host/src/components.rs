//! Components: which guest component each module runs, and swapping them
//! while ksm runs.
//!
//! A reload (file change, `POST /api/component/reload`, SIGHUP) loads each
//! changed component off the hot path: it compiles it (or takes it from the
//! cache), checks its imports and world, configures an instance per module
//! and runs a quick self-check. Only then does the router switch, between
//! two messages: a message is handled wholly by the old instance or wholly
//! by the new one. A component that fails any step leaves the running one in
//! place, and the modules' logs say why.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::activity::{Counters, Level};
use crate::bindings::types::{DeviceContext, HomeContext, ModuleSettings};
use crate::clock;
use crate::config::ModuleConfig;
use crate::module::{ComponentInfo, Module};
use crate::runtime::{Guest, GuestEngine, RuntimeError};

/// New guests for some modules, switched in by the router before the next
/// message.
pub struct Swap {
    /// Per module index: its new guest and what it runs.
    pub guests: Vec<(usize, Guest, ComponentInfo)>,
}

/// What a reload did with one component file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// The component file.
    pub path: PathBuf,
    /// The modules that run it.
    pub modules: Vec<String>,
    /// `swapped`, `unchanged` or `failed`.
    pub outcome: String,
    /// Its content hash, when it could be read.
    pub sha256: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
}

/// The settings a module's guest is configured with.
pub fn module_settings(config: &ModuleConfig) -> ModuleSettings {
    ModuleSettings {
        subscribe_events: config.subscribe_events.clone(),
        bulk_data_label: config.bulk_data_label.clone(),
        use_uuid: config.use_uuid,
        max_record_size: config.max_record_size,
    }
}

/// Why a component could not be put in service.
#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    /// The file could not be read.
    #[error("cannot read component {path}: {source}")]
    Read {
        /// The component file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The runtime refused it, or a module's instance failed.
    #[error("module `{module}`: {source}")]
    Module {
        /// Module ID.
        module: String,
        /// What the runtime said.
        source: RuntimeError,
    },
    /// Loading failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// The components of all modules, and the way to swap them.
pub struct Components {
    engine: GuestEngine,
    modules: Arc<[Arc<Module>]>,
    /// Component file → indexes of the modules that run it.
    paths: BTreeMap<PathBuf, Vec<usize>>,
    swaps: Mutex<Sender<Swap>>,
    /// Serialises reloads, and remembers each file's last seen stamp.
    stamps: Mutex<BTreeMap<PathBuf, Option<(SystemTime, u64)>>>,
}

impl Components {
    /// Components for `modules` (each runs `component_of(module)`), swapped
    /// in through `swaps`.
    pub fn new(
        engine: GuestEngine,
        modules: Arc<[Arc<Module>]>,
        component_of: impl Fn(&ModuleConfig) -> PathBuf,
        swaps: Sender<Swap>,
    ) -> Self {
        let mut paths: BTreeMap<PathBuf, Vec<usize>> = BTreeMap::new();
        for (index, module) in modules.iter().enumerate() {
            paths
                .entry(component_of(&module.config))
                .or_default()
                .push(index);
        }
        let stamps = paths.keys().map(|p| (p.clone(), stamp(p))).collect();
        Self {
            engine,
            modules,
            paths,
            swaps: Mutex::new(swaps),
            stamps: Mutex::new(stamps),
        }
    }

    /// Loads every component and configures each module's guest (at start).
    pub fn load_all(&self) -> Result<Vec<Guest>, ComponentError> {
        let mut guests: Vec<Option<Guest>> = (0..self.modules.len()).map(|_| None).collect();
        for (path, indexes) in &self.paths {
            for (index, guest, info) in self.prepare(path, indexes)? {
                self.set_running(index, info);
                guests[index] = Some(guest);
            }
        }
        Ok(guests.into_iter().flatten().collect())
    }

    /// Loads the components whose content changed, checks them and swaps
    /// them in; `trigger` says why (for the logs).
    pub fn reload(&self, trigger: &str) -> Vec<ReloadOutcome> {
        let mut stamps = self.stamps.lock().unwrap_or_else(|e| e.into_inner());
        let mut outcomes = Vec::new();
        for (path, indexes) in &self.paths {
            stamps.insert(path.clone(), stamp(path));
            let modules = indexes
                .iter()
                .map(|&i| self.modules[i].config.id.clone())
                .collect();
            let mut outcome = ReloadOutcome {
                path: path.clone(),
                modules,
                outcome: String::new(),
                sha256: None,
                error: None,
            };
            let running = self.running_hash(indexes);
            let result = read_component(path).and_then(|(bytes, hash)| {
                outcome.sha256 = Some(hash.clone());
                if running.as_deref() == Some(hash.as_str()) {
                    return Ok(None);
                }
                self.prepare_bytes(path, &bytes, hash, indexes).map(Some)
            });
            match result {
                Ok(None) => outcome.outcome = "unchanged".into(),
                Ok(Some(guests)) => {
                    let info = guests.first().map(|(_, _, info)| info.clone());
                    for &i in indexes {
                        if let Some(info) = &info {
                            self.modules[i].log.write(
                                Level::Info,
                                format!(
                                    "component {} (sha256 {}, {}) loaded and checked in {} ms ({trigger}); switching to it",
                                    path.display(),
                                    info.short_hash(),
                                    info.contract,
                                    info.load_ms
                                ),
                            );
                        }
                    }
                    let infos: Vec<(usize, ComponentInfo)> = guests
                        .iter()
                        .map(|(index, _, info)| (*index, info.clone()))
                        .collect();
                    let swaps = self.swaps.lock().unwrap_or_else(|e| e.into_inner());
                    if swaps.send(Swap { guests }).is_ok() {
                        // From now on every message goes to the new guests
                        // (the router switches before the next one).
                        for (index, info) in infos {
                            self.set_running(index, info);
                            Counters::add(&self.modules[index].metrics.reloads, 1);
                        }
                        outcome.outcome = "swapped".into();
                    } else {
                        outcome.outcome = "failed".into();
                        outcome.error = Some("ksm is stopping".into());
                    }
                }
                Err(error) => {
                    for &i in indexes {
                        self.modules[i].log.write(
                            Level::Error,
                            format!(
                                "component {} not swapped in ({trigger}), the running one stays: {error}",
                                path.display()
                            ),
                        );
                    }
                    outcome.outcome = "failed".into();
                    outcome.error = Some(error.to_string());
                }
            }
            outcomes.push(outcome);
        }
        outcomes
    }

    /// True if a component file changed since the last look and has stayed
    /// the same since (so a file being written is not loaded half-way).
    pub fn changed_on_disk(
        &self,
        previous: &mut BTreeMap<PathBuf, Option<(SystemTime, u64)>>,
    ) -> bool {
        let stamps = self.stamps.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = false;
        for (path, loaded) in stamps.iter() {
            let now = stamp(path);
            let settled = previous.get(path) == Some(&now);
            if now != *loaded && now.is_some() && settled {
                changed = true;
            }
            previous.insert(path.clone(), now);
        }
        changed
    }

    fn set_running(&self, index: usize, info: ComponentInfo) {
        *self.modules[index]
            .component
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(info);
    }

    fn running_hash(&self, indexes: &[usize]) -> Option<String> {
        let first = *indexes.first()?;
        let component = self.modules[first]
            .component
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        component.as_ref().map(|info| info.sha256.clone())
    }

    fn prepare(
        &self,
        path: &Path,
        indexes: &[usize],
    ) -> Result<Vec<(usize, Guest, ComponentInfo)>, ComponentError> {
        let (bytes, hash) = read_component(path)?;
        self.prepare_bytes(path, &bytes, hash, indexes)
    }

    /// Compiles (or takes from the cache), configures and checks a
    /// component for the given modules.
    fn prepare_bytes(
        &self,
        path: &Path,
        bytes: &[u8],
        sha256: String,
        indexes: &[usize],
    ) -> Result<Vec<(usize, Guest, ComponentInfo)>, ComponentError> {
        let started = Instant::now();
        let runtime = self.engine.load_bytes(path, bytes)?;
        let mut guests = Vec::with_capacity(indexes.len());
        for &index in indexes {
            let module = &self.modules[index];
            let in_module = |source| ComponentError::Module {
                module: module.config.id.clone(),
                source,
            };
            let mut guest = runtime
                .instantiate(&module_settings(&module.config))
                .map_err(in_module)?;
            self_check(&mut guest, module.config.bulk_data_label.as_deref()).map_err(in_module)?;
            guests.push((index, guest));
        }
        let info = ComponentInfo {
            path: path.to_owned(),
            sha256,
            loaded_at: clock::now_rfc3339(),
            load_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            contract: runtime.contract().to_string(),
        };
        Ok(guests
            .into_iter()
            .map(|(index, guest)| (index, guest, info.clone()))
            .collect())
    }
}

/// A quick check that a configured guest answers each call without
/// trapping or running out of time. Its answers may be records or error
/// variants: a guest may filter or refuse the sample; only a failed call
/// fails the check.
fn self_check(guest: &mut Guest, bulk_label: Option<&str>) -> Result<(), RuntimeError> {
    let received_at = clock::now_rfc3339();
    let device = DeviceContext {
        device_id: 0,
        home_id: Some(0),
        device_class: None,
        device_ip: None,
        received_at: received_at.clone(),
    };
    let event = br#"{"eventType":"ksm-self-check","eventData":{}}"#;
    let _answer = guest.device_event(&device, event)?;
    let home = HomeContext {
        home_id: 0,
        project_key_id: None,
        project_key_name: None,
        received_at,
    };
    let _answer = guest.home_event(&home, event)?;
    let payload = crate::bulk::encode([b"ksm-self-check"]);
    let _answer = guest.bulk_data(0, bulk_label.unwrap_or("ksm-self-check"), &payload)?;
    Ok(())
}

/// A file's modification time and length, if it can be read.
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

/// A component file's bytes and their SHA-256, hex.
fn read_component(path: &Path) -> Result<(Vec<u8>, String), ComponentError> {
    let bytes = std::fs::read(path).map_err(|source| ComponentError::Read {
        path: path.to_owned(),
        source,
    })?;
    let hash = sha256(&bytes);
    Ok((bytes, hash))
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
