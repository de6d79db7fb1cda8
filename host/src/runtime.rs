//! The wasmtime runtime: loads the smart-module component once, and gives
//! each module its own configured, reusable, sandboxed guest instance.
//!
//! The guest gets a WASI context with nothing granted: no preopened
//! directories, no environment, no arguments, no stdio, no network. A
//! component that imports anything beyond [`GRANTED_IMPORTS`] (sockets,
//! HTTP, or any non-WASI interface) is refused when it is loaded. Every call
//! runs under a deadline (epoch interruption) and a memory limit; a guest
//! that traps or overruns them fails that one call, and its instance is
//! replaced before the next call.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::bindings::types::{
    BulkOutput, DeviceContext, HomeContext, KinesisRecord, ModuleSettings,
};
use crate::bindings::{GuestError, SmartModule, SmartModulePre, describe};

/// How often the engine's epoch advances; call deadlines are multiples of it.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The interfaces (any version) a guest may import. Each WASI one is linked to a
/// WASI context that grants nothing: the environment and arguments are
/// empty, stdio is closed, no directory is preopened (so the filesystem
/// interfaces show no files), and there is no network. Language runtimes
/// import these whether or not they use them.
pub const GRANTED_IMPORTS: &[&str] = &[
    // The contract's own types (no functions).
    "ksm:smart-module/types",
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:clocks/monotonic-clock",
    "wasi:clocks/wall-clock",
    "wasi:filesystem/types",
    "wasi:filesystem/preopens",
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
];

/// True if the host gives the import `name` (`wasi:cli/exit@0.2.3`).
fn is_granted(name: &str) -> bool {
    let interface = name
        .split_once('@')
        .map_or(name, |(interface, _)| interface);
    GRANTED_IMPORTS.contains(&interface)
}

/// Sandbox limits for every guest instance.
#[derive(Debug, Clone, Copy)]
pub struct GuestLimits {
    /// Longest one call may run.
    pub call_timeout: Duration,
    /// Most linear memory one instance may grow to, bytes.
    pub max_memory_bytes: usize,
}

impl Default for GuestLimits {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_millis(50),
            max_memory_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Why the runtime could not load, start or call a guest.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The file is missing or is not a valid component.
    #[error("cannot load component {path}: {source:#}")]
    Load {
        /// The component file.
        path: PathBuf,
        /// What went wrong.
        source: wasmtime::Error,
    },
    /// The component imports an interface the host does not give.
    #[error(
        "component {path} imports `{import}`, which ksm does not give to guests: a guest gets \
         no sockets, HTTP, files, environment or credentials (granted: WASI cli, clocks, io, \
         random, and filesystem with nothing preopened)"
    )]
    Import {
        /// The component file.
        path: PathBuf,
        /// The refused import.
        import: String,
    },
    /// The engine could not be set up.
    #[error("cannot set up the WebAssembly engine: {0:#}")]
    Engine(wasmtime::Error),
    /// The compiled-component cache could not be set up.
    #[error("cannot use {dir} for compiled components: {source:#}")]
    Cache {
        /// The cache directory.
        dir: PathBuf,
        /// What went wrong.
        source: wasmtime::Error,
    },
    /// The component does not export the `ksm:smart-module` world.
    #[error("component {path} does not fit the ksm:smart-module world: {source:#}")]
    Link {
        /// The component file.
        path: PathBuf,
        /// What went wrong.
        source: wasmtime::Error,
    },
    /// Creating an instance failed.
    #[error("cannot instantiate the component: {0:#}")]
    Instantiate(wasmtime::Error),
    /// The guest refused the module settings.
    #[error("the guest refused the module settings: {}", describe(.0))]
    Settings(GuestError),
    /// The guest trapped, ran past its deadline or its memory limit.
    #[error("the guest failed: {0:#}")]
    Trap(wasmtime::Error),
}

/// Stops the epoch ticker thread when the last engine user goes away.
struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The wasmtime engine every guest runs on: its sandbox limits, its epoch
/// ticker and (optionally) a cache of compiled components. Cheap to clone.
#[derive(Clone)]
pub struct GuestEngine {
    engine: Engine,
    limits: GuestLimits,
    _ticker: Arc<EpochTicker>,
}

impl GuestEngine {
    /// An engine with these limits; with `cache_dir`, compiled components
    /// are kept there, keyed by their content and the engine's version and
    /// settings, so loading a component again takes milliseconds.
    pub fn new(limits: GuestLimits, cache_dir: Option<&Path>) -> Result<Self, RuntimeError> {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        if let Some(dir) = cache_dir {
            let cache_error = |source| RuntimeError::Cache {
                dir: dir.to_owned(),
                source,
            };
            std::fs::create_dir_all(dir).map_err(|e| cache_error(e.into()))?;
            let dir = std::path::absolute(dir).map_err(|e| cache_error(e.into()))?;
            let mut cache = wasmtime::CacheConfig::new();
            cache.with_directory(dir);
            config.cache(Some(wasmtime::Cache::new(cache).map_err(cache_error)?));
        }
        let engine = Engine::new(&config).map_err(RuntimeError::Engine)?;
        let ticker = Arc::new(start_epoch_ticker(&engine));
        Ok(Self {
            engine,
            limits,
            _ticker: ticker,
        })
    }

    /// Loads, checks (imports and world), compiles and links a component.
    pub fn load(&self, path: &Path) -> Result<Runtime, RuntimeError> {
        let bytes = std::fs::read(path).map_err(|source| RuntimeError::Load {
            path: path.to_owned(),
            source: source.into(),
        })?;
        self.load_bytes(path, &bytes)
    }

    /// Like [`GuestEngine::load`], for a component already read from `path`.
    pub fn load_bytes(&self, path: &Path, bytes: &[u8]) -> Result<Runtime, RuntimeError> {
        let engine = &self.engine;
        let component = Component::new(engine, bytes).map_err(|source| RuntimeError::Load {
            path: path.to_owned(),
            source,
        })?;
        let component_type = component.component_type();
        if let Some((import, _)) = component_type
            .imports(engine)
            .find(|(name, _)| !is_granted(name))
        {
            return Err(RuntimeError::Import {
                path: path.to_owned(),
                import: import.to_owned(),
            });
        }
        let link_error = |source| RuntimeError::Link {
            path: path.to_owned(),
            source,
        };
        let mut linker = Linker::<GuestState>::new(engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(link_error)?;
        let instance_pre = linker.instantiate_pre(&component).map_err(link_error)?;
        let pre = SmartModulePre::new(instance_pre).map_err(link_error)?;
        Ok(Runtime {
            engine: self.clone(),
            pre,
        })
    }
}

/// A loaded, compiled and linked component, ready to instantiate.
#[derive(Clone)]
pub struct Runtime {
    engine: GuestEngine,
    pre: SmartModulePre<GuestState>,
}

/// What each guest store holds: an empty WASI context and the limits.
pub struct GuestState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl Runtime {
    /// Loads a component with the default limits.
    pub fn load(path: &Path) -> Result<Runtime, RuntimeError> {
        Self::load_with(path, GuestLimits::default())
    }

    /// Loads, compiles and links a component on an engine of its own.
    pub fn load_with(path: &Path, limits: GuestLimits) -> Result<Runtime, RuntimeError> {
        GuestEngine::new(limits, None)?.load(path)
    }

    /// Creates an instance and configures it with one module's settings.
    pub fn instantiate(&self, settings: &ModuleSettings) -> Result<Guest, RuntimeError> {
        let (store, bindings) = self.new_instance()?;
        let mut guest = Guest {
            runtime: self.clone(),
            settings: settings.clone(),
            store,
            bindings,
        };
        guest.configure()?;
        Ok(guest)
    }

    fn new_instance(&self) -> Result<(Store<GuestState>, SmartModule), RuntimeError> {
        let state = GuestState {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(self.engine.limits.max_memory_bytes)
                .trap_on_grow_failure(true)
                .build(),
        };
        let mut store = Store::new(&self.engine.engine, state);
        store.limiter(|state| &mut state.limits);
        store.set_epoch_deadline(self.deadline_ticks());
        store.epoch_deadline_trap();
        let bindings = self
            .pre
            .instantiate(&mut store)
            .map_err(RuntimeError::Instantiate)?;
        Ok((store, bindings))
    }

    fn deadline_ticks(&self) -> u64 {
        let ticks = self.engine.limits.call_timeout.as_millis() / EPOCH_TICK.as_millis();
        u64::try_from(ticks).unwrap_or(u64::MAX).max(1)
    }
}

fn start_epoch_ticker(engine: &Engine) -> EpochTicker {
    let stop = Arc::new(AtomicBool::new(false));
    let engine = engine.clone();
    let flag = stop.clone();
    std::thread::Builder::new()
        .name("ksm-epoch".into())
        .spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
            }
        })
        .expect("the OS can start the epoch ticker thread");
    EpochTicker { stop }
}

/// One module's guest instance: configured once, called once per message.
pub struct Guest {
    runtime: Runtime,
    settings: ModuleSettings,
    store: Store<GuestState>,
    bindings: SmartModule,
}

/// What a guest call returns: the guest's own answer, or a runtime failure.
pub type CallResult<T> = Result<Result<T, GuestError>, RuntimeError>;

impl Guest {
    /// Turns a device event into records (see the WIT `handle-device-event`).
    pub fn device_event(
        &mut self,
        context: &DeviceContext,
        payload: &[u8],
    ) -> CallResult<Vec<KinesisRecord>> {
        self.call(|bindings, store| {
            bindings
                .ksm_smart_module_forwarder()
                .call_handle_device_event(store, context, payload)
        })
    }

    /// Turns a home event into records (see the WIT `handle-home-event`).
    pub fn home_event(
        &mut self,
        context: &HomeContext,
        payload: &[u8],
    ) -> CallResult<Vec<KinesisRecord>> {
        self.call(|bindings, store| {
            bindings
                .ksm_smart_module_forwarder()
                .call_handle_home_event(store, context, payload)
        })
    }

    /// Unpacks a bulk data payload (see the WIT `handle-bulk-data`).
    pub fn bulk_data(
        &mut self,
        device_id: u64,
        label: &str,
        payload: &[u8],
    ) -> CallResult<BulkOutput> {
        self.call(|bindings, store| {
            bindings
                .ksm_smart_module_forwarder()
                .call_handle_bulk_data(store, device_id, label, payload)
        })
    }

    fn configure(&mut self) -> Result<(), RuntimeError> {
        let settings = self.settings.clone();
        self.call(|bindings, store| {
            bindings
                .ksm_smart_module_forwarder()
                .call_configure(store, &settings)
        })?
        .map_err(RuntimeError::Settings)
    }

    /// Runs one call under the deadline; after a failure the instance is
    /// replaced, since a trapped instance may not be entered again.
    fn call<T>(
        &mut self,
        f: impl FnOnce(&SmartModule, &mut Store<GuestState>) -> wasmtime::Result<T>,
    ) -> Result<T, RuntimeError> {
        self.store.set_epoch_deadline(self.runtime.deadline_ticks());
        match f(&self.bindings, &mut self.store) {
            Ok(value) => Ok(value),
            Err(trap) => {
                self.replace_instance()?;
                Err(RuntimeError::Trap(trap))
            }
        }
    }

    fn replace_instance(&mut self) -> Result<(), RuntimeError> {
        let (store, bindings) = self.runtime.new_instance()?;
        self.store = store;
        self.bindings = bindings;
        let settings = self.settings.clone();
        self.store.set_epoch_deadline(self.runtime.deadline_ticks());
        self.bindings
            .ksm_smart_module_forwarder()
            .call_configure(&mut self.store, &settings)
            .map_err(RuntimeError::Trap)?
            .map_err(RuntimeError::Settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_granted_interfaces_pass_whatever_their_version() {
        assert!(is_granted("wasi:cli/environment@0.2.3"));
        assert!(is_granted("wasi:io/streams@0.2.0"));
        assert!(is_granted("wasi:random/random"));
        assert!(!is_granted("wasi:sockets/tcp@0.2.3"));
        assert!(!is_granted("wasi:http/outgoing-handler@0.2.3"));
        assert!(!is_granted("wasi:cli/environment-extra@0.2.3"));
        assert!(!is_granted("acme:secrets/vault"));
    }
}
