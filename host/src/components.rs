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
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use tokio::sync::mpsc::WeakSender;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::activity::{Counters, Level};
use crate::bindings::types::{DeviceContext, HomeContext, ModuleSettings};
use crate::clock;
use crate::config::ModuleConfig;
use crate::module::{ComponentInfo, Module};
use crate::pipeline::route::{Change, Inbound};
use crate::runtime::{Guest, GuestEngine, RuntimeError};

/// New guests for some modules, switched in by the router before the next
/// message.
pub struct Swap {
    /// Per module: its new guest and what it runs.
    pub guests: Vec<(Arc<Module>, Guest, ComponentInfo)>,
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
    /// The router's inbox, where swaps go (held weakly, so that it does
    /// not keep the router running at shutdown).
    inbox: WeakSender<Inbound>,
    /// Held through a reload and through a module's change, so that one
    /// never undoes the other.
    state: Mutex<State>,
}

/// Which modules run which file, and each file's last seen stamp.
#[derive(Default)]
struct State {
    paths: BTreeMap<PathBuf, Vec<Arc<Module>>>,
    stamps: BTreeMap<PathBuf, Option<(SystemTime, u64)>>,
}

impl State {
    fn attach(&mut self, path: &Path, module: &Arc<Module>) {
        self.paths
            .entry(path.to_owned())
            .or_default()
            .push(module.clone());
        self.stamps
            .entry(path.to_owned())
            .or_insert_with(|| stamp(path));
    }

    fn detach(&mut self, module: &Arc<Module>) {
        for modules in self.paths.values_mut() {
            modules.retain(|m| !Arc::ptr_eq(m, module));
        }
        self.paths.retain(|_, modules| !modules.is_empty());
        let paths = &self.paths;
        self.stamps.retain(|path, _| paths.contains_key(path));
    }
}

impl Components {
    /// No components yet; swaps go into `inbox`.
    pub fn new(engine: GuestEngine, inbox: WeakSender<Inbound>) -> Self {
        Self {
            engine,
            inbox,
            state: Mutex::new(State::default()),
        }
    }

    /// Loads each component once and configures a guest for each of the
    /// modules that run it (at start); the guests come in module order.
    pub fn load_all(
        &self,
        modules: &[(Arc<Module>, PathBuf)],
    ) -> Result<Vec<Guest>, ComponentError> {
        let mut by_path: BTreeMap<&Path, Vec<usize>> = BTreeMap::new();
        for (index, (_, path)) in modules.iter().enumerate() {
            by_path.entry(path).or_default().push(index);
        }
        let mut guests: Vec<Option<Guest>> = (0..modules.len()).map(|_| None).collect();
        let mut state = self.lock();
        for (path, indexes) in by_path {
            let (bytes, hash) = read_component(path)?;
            let chosen: Vec<Arc<Module>> = indexes.iter().map(|&i| modules[i].0.clone()).collect();
            for ((module, guest, info), index) in self
                .prepare_bytes(path, &bytes, hash, &chosen)?
                .into_iter()
                .zip(indexes)
            {
                set_running(&module, info);
                state.attach(path, &module);
                guests[index] = Some(guest);
            }
        }
        Ok(guests.into_iter().flatten().collect())
    }

    /// A guest of the component at `path`, configured with `settings` and
    /// checked, for `module` (not yet in service: see [`Components::put_in_service`]).
    pub fn prepare(
        &self,
        path: &Path,
        module: &Arc<Module>,
        settings: &ModuleConfig,
    ) -> Result<(Guest, ComponentInfo), ComponentError> {
        let (bytes, sha256) = read_component(path)?;
        let started = Instant::now();
        let runtime = self.engine.load_bytes(path, &bytes)?;
        let in_module = |source| ComponentError::Module {
            module: module.id.clone(),
            source,
        };
        let mut guest = runtime
            .instantiate(&module_settings(settings))
            .map_err(in_module)?;
        self_check(&mut guest, settings.bulk_data_label.as_deref()).map_err(in_module)?;
        let info = component_info(path, sha256, started, runtime.contract().to_string());
        Ok((guest, info))
    }

    /// Puts a prepared guest in service for a running module, between two
    /// messages, with `apply` run first (under the reload lock, so that a
    /// reload meanwhile configures with what `apply` set); the module then
    /// counts as running `path`. False if ksm is stopping.
    pub fn put_in_service(
        &self,
        module: &Arc<Module>,
        path: &Path,
        guest: Guest,
        info: ComponentInfo,
        apply: impl FnOnce(),
    ) -> bool {
        let mut state = self.lock();
        apply();
        let Some(inbox) = self.inbox.upgrade() else {
            return false;
        };
        let swap = Swap {
            guests: vec![(module.clone(), guest, info.clone())],
        };
        if inbox
            .blocking_send(Inbound::Change(Box::new(Change::Swap(swap))))
            .is_err()
        {
            return false;
        }
        set_running(module, info);
        state.detach(module);
        state.attach(path, module);
        true
    }

    /// Registers a module whose prepared guest the router gets with the
    /// module itself.
    pub fn attach(&self, module: &Arc<Module>, path: &Path, info: ComponentInfo) {
        set_running(module, info);
        self.lock().attach(path, module);
    }

    /// Forgets a module: reloads no longer configure a guest for it.
    pub fn detach(&self, module: &Arc<Module>) {
        self.lock().detach(module);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads the components whose content changed, checks them and swaps
    /// them in; `trigger` says why (for the logs).
    pub fn reload(&self, trigger: &str) -> Vec<ReloadOutcome> {
        let mut state = self.lock();
        let mut outcomes = Vec::new();
        let paths: Vec<(PathBuf, Vec<Arc<Module>>)> = state
            .paths
            .iter()
            .map(|(path, modules)| (path.clone(), modules.clone()))
            .collect();
        for (path, modules) in &paths {
            state.stamps.insert(path.clone(), stamp(path));
            let mut outcome = ReloadOutcome {
                path: path.clone(),
                modules: modules.iter().map(|m| m.id.clone()).collect(),
                outcome: String::new(),
                sha256: None,
                error: None,
            };
            let running = modules
                .first()
                .and_then(|m| m.component())
                .map(|info| info.sha256);
            let result = read_component(path).and_then(|(bytes, hash)| {
                outcome.sha256 = Some(hash.clone());
                if running.as_deref() == Some(hash.as_str()) {
                    return Ok(None);
                }
                self.prepare_bytes(path, &bytes, hash, modules).map(Some)
            });
            match result {
                Ok(None) => outcome.outcome = "unchanged".into(),
                Ok(Some(guests)) => {
                    if let Some((_, _, info)) = guests.first() {
                        for module in modules {
                            module.log.write(
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
                    let infos: Vec<(Arc<Module>, ComponentInfo)> = guests
                        .iter()
                        .map(|(module, _, info)| (module.clone(), info.clone()))
                        .collect();
                    let sent = self.inbox.upgrade().is_some_and(|inbox| {
                        inbox
                            .blocking_send(Inbound::Change(Box::new(Change::Swap(Swap { guests }))))
                            .is_ok()
                    });
                    if sent {
                        // From now on every message goes to the new guests
                        // (the router switches before the next one).
                        for (module, info) in infos {
                            set_running(&module, info);
                            Counters::add(&module.metrics.reloads, 1);
                        }
                        outcome.outcome = "swapped".into();
                    } else {
                        outcome.outcome = "failed".into();
                        outcome.error = Some("ksm is stopping".into());
                    }
                }
                Err(error) => {
                    for module in modules {
                        module.log.write(
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
        let state = self.lock();
        let mut changed = false;
        for (path, loaded) in state.stamps.iter() {
            let now = stamp(path);
            let settled = previous.get(path) == Some(&now);
            if now != *loaded && now.is_some() && settled {
                changed = true;
            }
            previous.insert(path.clone(), now);
        }
        changed
    }

    /// Compiles (or takes from the cache), configures and checks a
    /// component for the given modules, each with its settings now.
    fn prepare_bytes(
        &self,
        path: &Path,
        bytes: &[u8],
        sha256: String,
        modules: &[Arc<Module>],
    ) -> Result<Vec<(Arc<Module>, Guest, ComponentInfo)>, ComponentError> {
        let started = Instant::now();
        let runtime = self.engine.load_bytes(path, bytes)?;
        let mut guests = Vec::with_capacity(modules.len());
        for module in modules {
            let in_module = |source| ComponentError::Module {
                module: module.id.clone(),
                source,
            };
            let settings = module.config();
            let mut guest = runtime
                .instantiate(&module_settings(&settings))
                .map_err(in_module)?;
            self_check(&mut guest, settings.bulk_data_label.as_deref()).map_err(in_module)?;
            guests.push((module.clone(), guest));
        }
        let info = component_info(path, sha256, started, runtime.contract().to_string());
        Ok(guests
            .into_iter()
            .map(|(module, guest)| (module, guest, info.clone()))
            .collect())
    }
}

fn component_info(
    path: &Path,
    sha256: String,
    started: Instant,
    contract: String,
) -> ComponentInfo {
    ComponentInfo {
        path: path.to_owned(),
        sha256,
        loaded_at: clock::now_rfc3339(),
        load_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        contract,
    }
}

fn set_running(module: &Module, info: ComponentInfo) {
    *module.component.lock().unwrap_or_else(|e| e.into_inner()) = Some(info);
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
