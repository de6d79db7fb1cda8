//! The wasmtime runtime: loads the smart-module component once, and gives
//! each module its own configured, reusable, sandboxed guest instance.
//!
//! The guest is untrusted. It gets a WASI context with nothing granted (no
//! preopened directories, environment, arguments, stdio or network); a
//! component that imports anything beyond [`GRANTED_IMPORTS`] (the imports
//! of the `sandbox` world of `wit/1.1/sandbox.wit`, read at build time) is
//! refused when it is loaded: sockets, HTTP, any other interface. Every call
//! runs under a deadline and a memory limit ([`sandbox`]): a guest that
//! traps, loops, sleeps or overruns them fails that one call, and its
//! instance is replaced before the next call.
//!
//! An instance is also recycled (replaced by a fresh, configured one
//! between two calls) once its memory passes a high-water mark or after a
//! number of calls ([`GuestLimits`]), so that a guest whose heap only grows
//! does not reach the memory limit in the middle of a message; and a call
//! that does reach it on an instance that served earlier calls gets a
//! second try on a fresh one, so only a message that is too much for a
//! fresh instance fails.
//!
//! A component of contract 1.1 (it exports `batch`) is handed several
//! messages in one call ([`Guest::handle`]); a 1.0 component is called once
//! per message. If a batch call fails, its messages run again one by one on a
//! fresh instance, so a message at fault costs only itself.
//!
//! # Layout
//! - [`sandbox`]: the linked interfaces, the bounded clock, limits and deadlines.
//! - [`batch`]: messages as a guest takes them, and one answer per message.

pub mod batch;
pub mod sandbox;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, Store};

pub use batch::{Answer, Input, Mqtt};
use ksm_bindings::types::{BulkOutput, DeviceContext, HomeContext, KinesisRecord, ModuleSettings};
use ksm_bindings::{GuestError, describe, v1_0, v1_1};
use sandbox::{EPOCH_TICK, Sandbox};
pub use sandbox::{GRANTED_IMPORTS, GuestFault, GuestState};

/// Sandbox limits for every guest instance.
#[derive(Debug, Clone, Copy)]
pub struct GuestLimits {
    /// Longest one call may run.
    pub call_timeout: Duration,
    /// Most linear memory one instance may grow to, bytes.
    pub max_memory_bytes: usize,
    /// An instance whose memory has grown past this many bytes is replaced
    /// after its call.
    pub recycle_above_bytes: usize,
    /// An instance is replaced after this many calls; 0: never.
    pub recycle_after_calls: u64,
}

impl Default for GuestLimits {
    fn default() -> Self {
        let max_memory_bytes = 64 * 1024 * 1024;
        Self {
            call_timeout: Duration::from_millis(50),
            max_memory_bytes,
            recycle_above_bytes: max_memory_bytes / 4 * 3,
            recycle_after_calls: 0,
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
    /// The sandbox stopped the guest: deadline, clock wait, memory or table limit.
    #[error("the guest {0}")]
    Fault(GuestFault),
    /// The guest trapped by itself (a panic, `unreachable`, a bad access...).
    #[error("the guest trapped: {0:#}")]
    Trap(wasmtime::Error),
}

impl RuntimeError {
    /// Sorts a failed call: a sandbox fault, or the guest's own trap.
    fn from_call(error: wasmtime::Error) -> Self {
        match error.downcast_ref::<GuestFault>() {
            Some(fault) => RuntimeError::Fault(fault.clone()),
            None => RuntimeError::Trap(error),
        }
    }

    /// The sandbox fault behind this error, if it is one.
    pub fn fault(&self) -> Option<&GuestFault> {
        match self {
            RuntimeError::Fault(fault) => Some(fault),
            _ => None,
        }
    }
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
            .find(|(name, _)| !sandbox::is_granted(name))
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
        let batches = component_type
            .exports(engine)
            .any(|(name, _)| name.starts_with(BATCH_EXPORT));
        let mut linker = Linker::<GuestState>::new(engine);
        sandbox::link(&mut linker).map_err(link_error)?;
        let instance_pre = linker.instantiate_pre(&component).map_err(link_error)?;
        let pre = if batches {
            Pre::V1_1(v1_1::SmartModuleBatchPre::new(instance_pre).map_err(link_error)?)
        } else {
            Pre::V1_0(v1_0::SmartModulePre::new(instance_pre).map_err(link_error)?)
        };
        Ok(Runtime {
            engine: self.clone(),
            pre,
        })
    }
}

/// The export that makes a component a 1.1 guest (any 1.x version from 1.1).
const BATCH_EXPORT: &str = "ksm:smart-module/batch@1.";

/// Which version of the contract a component speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contract {
    /// 1.0: one message per call.
    V1_0,
    /// 1.1: batches too.
    V1_1,
}

impl std::fmt::Display for Contract {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Contract::V1_0 => "ksm:smart-module@1.0 (one message per call)",
            Contract::V1_1 => "ksm:smart-module@1.1 (batches)",
        })
    }
}

/// A linked component, by the contract version it speaks.
#[derive(Clone)]
enum Pre {
    V1_0(v1_0::SmartModulePre<GuestState>),
    V1_1(v1_1::SmartModuleBatchPre<GuestState>),
}

/// An instance's exports, by contract version.
enum Bindings {
    V1_0(v1_0::SmartModule),
    V1_1(v1_1::SmartModuleBatch),
}

/// Calls a `forwarder` function on either version's bindings (both use the
/// same Rust types).
macro_rules! forwarder {
    ($bindings:expr, $forwarder:ident => $call:expr) => {
        match $bindings {
            Bindings::V1_0(bindings) => {
                let $forwarder = bindings.ksm_smart_module_forwarder();
                $call
            }
            Bindings::V1_1(bindings) => {
                let $forwarder = bindings.ksm_smart_module_forwarder();
                $call
            }
        }
    };
}

/// A loaded, compiled and linked component, ready to instantiate.
#[derive(Clone)]
pub struct Runtime {
    engine: GuestEngine,
    pre: Pre,
}

impl Runtime {
    /// The contract version the component speaks.
    pub fn contract(&self) -> Contract {
        match self.pre {
            Pre::V1_0(_) => Contract::V1_0,
            Pre::V1_1(_) => Contract::V1_1,
        }
    }

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
        let (store, bindings) = self.configured(settings)?;
        Ok(Guest {
            runtime: self.clone(),
            settings: settings.clone(),
            store,
            bindings,
            calls: 0,
            recycled: 0,
        })
    }

    /// A new instance, configured; a `configure` cut off by the clock gets
    /// its second chance, as every call does.
    fn configured(
        &self,
        settings: &ModuleSettings,
    ) -> Result<(Store<GuestState>, Bindings), RuntimeError> {
        match self.try_configured(settings, Sandbox::begin_wall) {
            Err(error)
                if error
                    .fault()
                    .is_some_and(GuestFault::deserves_second_chance) =>
            {
                self.try_configured(settings, Sandbox::begin_own_work)
            }
            other => other,
        }
    }

    fn try_configured(
        &self,
        settings: &ModuleSettings,
        begin: fn(&mut Sandbox) -> u64,
    ) -> Result<(Store<GuestState>, Bindings), RuntimeError> {
        let (mut store, bindings) = self.new_instance()?;
        let ticks = begin(&mut store.data_mut().sandbox);
        store.set_epoch_deadline(ticks);
        let configured = match &bindings {
            Bindings::V1_0(bindings) => bindings
                .ksm_smart_module_forwarder()
                .call_configure(&mut store, settings),
            Bindings::V1_1(bindings) => bindings
                .ksm_smart_module_batch()
                .call_configure(&mut store, settings)
                .map(|answer| answer.map_err(batch::configure_error)),
        };
        configured
            .map_err(RuntimeError::from_call)?
            .map_err(RuntimeError::Settings)?;
        Ok((store, bindings))
    }

    fn new_instance(&self) -> Result<(Store<GuestState>, Bindings), RuntimeError> {
        let limits = &self.engine.limits;
        let state = GuestState::new(limits.call_timeout, limits.max_memory_bytes);
        let mut store = Store::new(&self.engine.engine, state);
        sandbox::enforce(&mut store);
        // Instantiation runs guest code (start functions): under the deadline too.
        let ticks = store.data_mut().sandbox.begin_wall();
        store.set_epoch_deadline(ticks);
        let bindings = match &self.pre {
            Pre::V1_0(pre) => pre.instantiate(&mut store).map(Bindings::V1_0),
            Pre::V1_1(pre) => pre.instantiate(&mut store).map(Bindings::V1_1),
        }
        .map_err(|error| match RuntimeError::from_call(error) {
            RuntimeError::Trap(error) => RuntimeError::Instantiate(error),
            fault => fault,
        })?;
        Ok((store, bindings))
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
    bindings: Bindings,
    /// Messages the current instance has served.
    calls: u64,
    /// Instances recycled so far.
    recycled: u64,
}

/// What a guest call returns: the guest's own answer, or a runtime failure.
pub type CallResult<T> = Result<Result<T, GuestError>, RuntimeError>;

/// What a guest made of a batch of messages: one answer per message, in order.
#[derive(Debug)]
pub struct Handled {
    /// The answers, one per message.
    pub answers: Vec<CallResult<Answer>>,
    /// Why a batch call's answer could not be used, if one could not (the
    /// messages then ran one by one): for the module's log.
    pub batch_failed: Option<String>,
    /// Guest calls made.
    pub calls: usize,
}

/// Most messages in one batch call.
pub const MAX_BATCH_MESSAGES: usize = 256;

/// A batch call's payloads together take at most this share of the guest's
/// memory limit (1/8): a batch of big messages is split into several calls.
const BATCH_MEMORY_SHARE: usize = 8;

impl Guest {
    /// The contract version the guest speaks.
    pub fn contract(&self) -> Contract {
        self.runtime.contract()
    }

    /// Turns a device event into records (see the WIT `handle-device-event`).
    pub fn device_event(
        &mut self,
        context: &DeviceContext,
        payload: &[u8],
    ) -> CallResult<Vec<KinesisRecord>> {
        self.call(1, |bindings, store| {
            forwarder!(bindings, f => f.call_handle_device_event(store, context, payload))
        })
    }

    /// Turns a home event into records (see the WIT `handle-home-event`).
    pub fn home_event(
        &mut self,
        context: &HomeContext,
        payload: &[u8],
    ) -> CallResult<Vec<KinesisRecord>> {
        self.call(1, |bindings, store| {
            forwarder!(bindings, f => f.call_handle_home_event(store, context, payload))
        })
    }

    /// Unpacks a bulk data payload (see the WIT `handle-bulk-data`).
    pub fn bulk_data(
        &mut self,
        device_id: u64,
        label: &str,
        payload: &[u8],
    ) -> CallResult<BulkOutput> {
        self.call(1, |bindings, store| {
            forwarder!(bindings, f => f.call_handle_bulk_data(store, device_id, label, payload))
        })
    }

    /// Handles one message in one call: a 1.1 guest's is a batch of one
    /// (so it sees the message's MQTT details, as in any batch), a 1.0
    /// guest's the forwarder function for its kind.
    pub fn one(&mut self, input: &Input<'_>) -> CallResult<Answer> {
        if matches!(self.bindings, Bindings::V1_1(_)) {
            let message = [input.to_message()];
            let outcomes = self.call(1, |bindings, store| match bindings {
                Bindings::V1_1(bindings) => bindings
                    .ksm_smart_module_batch()
                    .call_handle_batch(store, &message),
                Bindings::V1_0(_) => Err(wasmtime::Error::msg("a 1.0 guest takes no batches")),
            })?;
            return Ok(match <[_; 1]>::try_from(outcomes) {
                Ok([outcome]) => batch::answer(input, outcome),
                Err(outcomes) => Err(GuestError::Other(format!(
                    "the guest answered a batch of one message with {} outcomes (one per \
                     message is the contract)",
                    outcomes.len()
                ))),
            });
        }
        match *input {
            Input::DeviceEvent {
                context, payload, ..
            } => Ok(self.device_event(context, payload)?.map(Answer::Records)),
            Input::HomeEvent {
                context, payload, ..
            } => Ok(self.home_event(context, payload)?.map(Answer::Records)),
            Input::BulkData {
                device_id,
                label,
                payload,
                ..
            } => Ok(self.bulk_data(device_id, label, payload)?.map(Answer::Bulk)),
        }
    }

    /// Handles messages: a 1.1 guest in batch calls of up to
    /// [`MAX_BATCH_MESSAGES`] (fewer when their payloads are big), a 1.0
    /// guest one call per message. A batch call that fails (a trap, the
    /// deadline, the memory limit, not one outcome per message) is made
    /// again one message per call ([`Guest::one`]), on a fresh instance, so
    /// each message gets the answer it would get alone.
    pub fn handle(&mut self, inputs: &[Input<'_>]) -> Handled {
        let mut handled = Handled {
            answers: Vec::with_capacity(inputs.len()),
            batch_failed: None,
            calls: 0,
        };
        if matches!(self.bindings, Bindings::V1_0(_)) {
            for input in inputs {
                handled.answers.push(self.one(input));
                handled.calls += 1;
            }
            return handled;
        }
        let max_bytes = self.runtime.engine.limits.max_memory_bytes / BATCH_MEMORY_SHARE;
        let mut rest = inputs;
        while !rest.is_empty() {
            let mut take = 0;
            let mut bytes = 0;
            while take < rest.len().min(MAX_BATCH_MESSAGES) {
                bytes += rest[take].payload_len();
                if take > 0 && bytes > max_bytes {
                    break;
                }
                take += 1;
            }
            let (chunk, later) = rest.split_at(take);
            rest = later;
            if let [input] = chunk {
                handled.answers.push(self.one(input));
                handled.calls += 1;
                continue;
            }
            handled.calls += 1;
            match self.batch(chunk) {
                Ok(answers) => handled.answers.extend(answers),
                Err(reason) => {
                    handled.batch_failed = Some(reason);
                    // A failed instance may not be entered again. If no fresh
                    // one can be made now, each call below tries again.
                    let _ = self.replace_instance();
                    for input in chunk {
                        handled.answers.push(self.one(input));
                        handled.calls += 1;
                    }
                }
            }
        }
        handled
    }

    /// One batch call; `Err` says why its answer cannot be used.
    fn batch(&mut self, chunk: &[Input<'_>]) -> Result<Vec<CallResult<Answer>>, String> {
        let messages: Vec<v1_1::batch::Message> = chunk.iter().map(|i| i.to_message()).collect();
        let calls = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
        let Bindings::V1_1(bindings) = &self.bindings else {
            return Err("the guest does not take batches".to_owned());
        };
        let ticks = self.store.data_mut().sandbox.begin_wall_for(calls);
        self.store.set_epoch_deadline(ticks);
        let outcomes = bindings
            .ksm_smart_module_batch()
            .call_handle_batch(&mut self.store, &messages)
            .map_err(|error| {
                let why = match RuntimeError::from_call(error) {
                    RuntimeError::Trap(trap) => format!("the guest trapped: {}", trap.root_cause()),
                    other => other.to_string(),
                };
                format!(
                    "a batch call of {} messages failed ({why}); they ran again one by one",
                    chunk.len()
                )
            })?;
        if outcomes.len() != chunk.len() {
            return Err(format!(
                "the guest answered a batch of {} messages with {} outcomes (one per message is \
                 the contract); they ran again one by one",
                chunk.len(),
                outcomes.len()
            ));
        }
        let answers = chunk
            .iter()
            .zip(outcomes)
            .map(|(input, outcome)| Ok(batch::answer(input, outcome)))
            .collect();
        self.served(chunk.len() as u64);
        Ok(answers)
    }

    /// Instances recycled so far (memory past its high-water mark, or
    /// enough calls served).
    pub fn recycled(&self) -> u64 {
        self.recycled
    }

    /// Runs one call: first under the wall-clock deadline; if that cut it
    /// off, once more on a fresh instance that counts only the guest's own
    /// CPU time (a busy machine is not a looping guest); if it ran out of
    /// memory on an instance that had served earlier calls, once more on a
    /// fresh instance. After a failure the instance is replaced, since a
    /// trapped instance may not be entered again; after a success, it is
    /// recycled when due.
    fn call<T>(
        &mut self,
        messages: u64,
        f: impl Fn(&Bindings, &mut Store<GuestState>) -> wasmtime::Result<T>,
    ) -> Result<T, RuntimeError> {
        let used = self.calls > 0;
        let error = match self.attempt(Sandbox::begin_wall, &f) {
            Ok(value) => {
                self.served(messages);
                return Ok(value);
            }
            Err(error) => error,
        };
        self.replace_instance()?;
        let begin = match error.fault() {
            Some(fault) if fault.deserves_second_chance() => Sandbox::begin_own_work,
            Some(GuestFault::Memory { .. }) if used => Sandbox::begin_wall,
            _ => return Err(error),
        };
        match self.attempt(begin, &f) {
            Ok(value) => {
                self.served(messages);
                Ok(value)
            }
            Err(second) => {
                self.replace_instance()?;
                // A memory fault's second try is on the wall clock: if a busy
                // machine runs it out of time, the memory fault stays the reason.
                let memory_first = matches!(error.fault(), Some(GuestFault::Memory { .. }));
                let out_of_time = matches!(second.fault(), Some(GuestFault::Deadline(_)));
                Err(if memory_first && out_of_time {
                    error
                } else {
                    second
                })
            }
        }
    }

    /// Counts the messages the instance served in a call, and recycles the
    /// instance when its memory passed the high-water mark or it served its
    /// share.
    fn served(&mut self, messages: u64) {
        self.calls += messages;
        let limits = &self.runtime.engine.limits;
        let grown = self.store.data().sandbox.memory_bytes() > limits.recycle_above_bytes;
        let worn = limits.recycle_after_calls > 0 && self.calls >= limits.recycle_after_calls;
        if grown || worn {
            // If no fresh instance can be made now, this one goes on serving.
            if self.replace_instance().is_ok() {
                self.recycled += 1;
            }
        }
    }

    fn attempt<T>(
        &mut self,
        begin: fn(&mut Sandbox) -> u64,
        f: &impl Fn(&Bindings, &mut Store<GuestState>) -> wasmtime::Result<T>,
    ) -> Result<T, RuntimeError> {
        let ticks = begin(&mut self.store.data_mut().sandbox);
        self.store.set_epoch_deadline(ticks);
        f(&self.bindings, &mut self.store).map_err(RuntimeError::from_call)
    }

    /// A fresh, configured instance in place of the current one. If the
    /// guest cannot be configured again, the current one stays: the next
    /// call finds it unusable and tries again.
    fn replace_instance(&mut self) -> Result<(), RuntimeError> {
        let (store, bindings) = self.runtime.configured(&self.settings)?;
        self.store = store;
        self.bindings = bindings;
        self.calls = 0;
        Ok(())
    }
}
