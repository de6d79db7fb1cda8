//! What a guest instance may do, and what stops it: the interfaces linked
//! into its world, a monotonic clock whose waits end within the call's
//! deadline, the memory and table limits, and the deadline itself.
//!
//! A call runs first under a wall-clock deadline (epoch interruption: free on
//! the hot path). A call cut off by it gets a second chance on a fresh
//! instance that counts only the guest's own CPU time, so a machine busy with
//! other work does not look like a looping guest; a wall-clock backstop (10×
//! the deadline, at least 5 s) bounds that second run too.

use std::time::{Duration, Instant};

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime::{ResourceLimiter, StoreContextMut, UpdateDeadline};
use wasmtime_wasi::cli::{WasiCli, WasiCliView};
use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView};
use wasmtime_wasi::filesystem::{WasiFilesystem, WasiFilesystemView};
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock;
use wasmtime_wasi::p2::bindings::{cli, clocks, filesystem, random, sync};
use wasmtime_wasi::p2::{DynPollable, Pollable, subscribe};
use wasmtime_wasi::random::WasiRandom;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// How often the engine's epoch advances; deadlines are multiples of it.
pub(super) const EPOCH_TICK: Duration = Duration::from_millis(5);
/// The second chance's wall-clock backstop, as a multiple of the deadline...
const SECOND_CHANCE_WALL_FACTOR: u32 = 10;
/// ...and at least this: a thread starved of CPU on an overloaded machine
/// (or in a throttled container) must not make a good message look like a
/// loop. Only the guest's own CPU time ends a second chance before it.
const SECOND_CHANCE_WALL_MIN: Duration = Duration::from_secs(5);
/// Most elements a guest's tables may hold (their memory is the host's).
const MAX_TABLE_ELEMENTS: usize = 1_000_000;

/// Why the sandbox stopped a guest. Raised as the trap of the call, so the
/// runtime can tell these apart from the guest's own traps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestFault {
    /// The call ran past its wall-clock deadline (first try).
    #[error("ran past its deadline of {} ms", .0.as_millis())]
    Deadline(Duration),
    /// The second try used up its budget of the guest's own CPU time, or
    /// its wall-clock backstop.
    #[error(
        "ran past its deadline of {} ms twice: first on the clock, then on a fresh instance \
         counting only its own CPU time ({} ms of CPU in {} ms)",
        budget.as_millis(), cpu.as_millis(), wall.as_millis()
    )]
    OwnWork {
        /// The deadline.
        budget: Duration,
        /// CPU time the second try used.
        cpu: Duration,
        /// Wall-clock time the second try took.
        wall: Duration,
    },
    /// The guest asked the clock to wake it after its deadline.
    #[error(
        "asked to wait {} ms for the clock, past its call deadline of {} ms (a guest may not \
         wait out the deadline)",
        asked.as_millis(), deadline.as_millis()
    )]
    Sleep {
        /// How long it asked to wait (from now).
        asked: Duration,
        /// The call deadline.
        deadline: Duration,
    },
    /// The guest's linear memory would outgrow the limit.
    #[error(
        "went over its memory limit of {} MiB (it asked for {} MiB)",
        limit / MIB, desired.div_ceil(MIB)
    )]
    Memory {
        /// Bytes it asked for.
        desired: usize,
        /// The limit, bytes.
        limit: usize,
    },
    /// A table would outgrow the limit.
    #[error("grew a table to {desired} elements, over the limit of {MAX_TABLE_ELEMENTS}")]
    Table {
        /// Elements it asked for.
        desired: usize,
    },
}

const MIB: usize = 1024 * 1024;

impl GuestFault {
    /// True if the first try was cut off by the clock, so a second try is due.
    pub fn deserves_second_chance(&self) -> bool {
        matches!(self, GuestFault::Deadline(_))
    }
}

/// How the current call is timed.
#[derive(Debug, Clone, Copy)]
enum Timing {
    /// Wall clock: the epoch deadline ends the call.
    Wall,
    /// Second chance: the guest's own CPU time since `cpu_start`, with a
    /// wall-clock backstop.
    OwnWork {
        cpu_start: Duration,
        wall_start: Instant,
    },
}

/// The sandbox state of one guest store.
pub struct Sandbox {
    call_timeout: Duration,
    max_memory_bytes: usize,
    /// The most linear memory the instance has grown to.
    memory_bytes: usize,
    timing: Timing,
    /// Past this instant the guest may not ask to be woken.
    wake_deadline: Instant,
}

impl Sandbox {
    /// A sandbox with these limits.
    pub fn new(call_timeout: Duration, max_memory_bytes: usize) -> Self {
        Self {
            call_timeout,
            max_memory_bytes,
            memory_bytes: 0,
            timing: Timing::Wall,
            wake_deadline: Instant::now() + call_timeout,
        }
    }

    /// The most linear memory the instance has grown to, bytes.
    pub fn memory_bytes(&self) -> usize {
        self.memory_bytes
    }

    /// Epoch ticks in `duration` (at least one).
    pub(super) fn ticks(duration: Duration) -> u64 {
        let ticks = duration.as_millis() / EPOCH_TICK.as_millis();
        u64::try_from(ticks).unwrap_or(u64::MAX).max(1)
    }

    /// Starts a first try: timed on the wall clock. Returns the epoch ticks
    /// to set as the store's deadline.
    pub(super) fn begin_wall(&mut self) -> u64 {
        self.begin_wall_for(1)
    }

    /// Starts a call that stands for `messages` calls (a batch): timed on
    /// the wall clock, with the deadline of that many calls.
    pub(super) fn begin_wall_for(&mut self, messages: u32) -> u64 {
        let deadline = self.call_timeout.saturating_mul(messages.max(1));
        self.timing = Timing::Wall;
        self.wake_deadline = Instant::now() + deadline;
        Self::ticks(deadline)
    }

    /// Starts a second chance: timed by the guest's own CPU time.
    pub(super) fn begin_own_work(&mut self) -> u64 {
        let wall_start = Instant::now();
        self.timing = Timing::OwnWork {
            cpu_start: thread_cpu_time(),
            wall_start,
        };
        self.wake_deadline = wall_start + self.call_timeout;
        Self::ticks(self.call_timeout)
    }

    /// Called when the epoch deadline is reached: ends the call, or lets a
    /// second chance go on while its CPU budget lasts.
    fn deadline_reached(&self) -> wasmtime::Result<UpdateDeadline> {
        match self.timing {
            Timing::Wall => Err(GuestFault::Deadline(self.call_timeout).into()),
            Timing::OwnWork {
                cpu_start,
                wall_start,
            } => {
                let cpu = thread_cpu_time().saturating_sub(cpu_start);
                let wall = wall_start.elapsed();
                let backstop =
                    (self.call_timeout * SECOND_CHANCE_WALL_FACTOR).max(SECOND_CHANCE_WALL_MIN);
                if cpu >= self.call_timeout || wall >= backstop {
                    return Err(GuestFault::OwnWork {
                        budget: self.call_timeout,
                        cpu,
                        wall,
                    }
                    .into());
                }
                Ok(UpdateDeadline::Continue(Self::ticks(
                    self.call_timeout - cpu,
                )))
            }
        }
    }

    /// The instant a wait of `asked` would end, if it ends within the deadline.
    fn wake_at(&self, asked: Duration) -> Result<Instant, GuestFault> {
        let now = Instant::now();
        match now.checked_add(asked) {
            Some(at) if at <= self.wake_deadline => Ok(at),
            _ => Err(GuestFault::Sleep {
                asked,
                deadline: self.call_timeout,
            }),
        }
    }
}

impl ResourceLimiter for Sandbox {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory_bytes {
            return Err(GuestFault::Memory {
                desired,
                limit: self.max_memory_bytes,
            }
            .into());
        }
        self.memory_bytes = self.memory_bytes.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            return Err(GuestFault::Table { desired }.into());
        }
        Ok(true)
    }
}

/// The CPU time this thread has used.
fn thread_cpu_time() -> Duration {
    let time = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(time.tv_sec).unwrap_or_default(),
        u32::try_from(time.tv_nsec).unwrap_or_default(),
    )
}

/// What each guest store holds: a WASI context that grants nothing, its
/// resources, and the sandbox.
pub struct GuestState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) sandbox: Sandbox,
}

impl GuestState {
    /// A fresh state with these limits.
    pub fn new(call_timeout: Duration, max_memory_bytes: usize) -> Self {
        Self {
            // No environment, arguments, stdio, preopened directories or network.
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            sandbox: Sandbox::new(call_timeout, max_memory_bytes),
        }
    }
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Sets up a store's limits and its deadline handling.
pub(super) fn enforce(store: &mut wasmtime::Store<GuestState>) {
    store.limiter(|state| &mut state.sandbox);
    store.epoch_deadline_callback(|context: StoreContextMut<'_, GuestState>| {
        context.data().sandbox.deadline_reached()
    });
}

// `GRANTED_IMPORTS`, from the `sandbox` world of `wit/1.1/sandbox.wit`
// (build.rs): each is linked below, and nothing else. The WASI ones see a
// context that grants nothing (no environment, arguments, stdio,
// preopened directory or network).
include!(concat!(env!("OUT_DIR"), "/granted_imports.rs"));

/// True if the host gives the import `name` (`wasi:cli/exit@0.2.3`).
pub fn is_granted(name: &str) -> bool {
    let interface = name
        .split_once('@')
        .map_or(name, |(interface, _)| interface);
    GRANTED_IMPORTS.contains(&interface)
}

/// Links exactly the [`GRANTED_IMPORTS`], each by its own adder; the
/// monotonic clock is the sandbox's own. An import the world grants that
/// has no adder here is an error (a test links every one).
pub(super) fn link(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    type State = GuestState;
    let l = linker;
    for name in GRANTED_IMPORTS {
        match *name {
            // Types only: nothing to link.
            "ksm:smart-module/types" => {}
            "wasi:cli/environment" => {
                cli::environment::add_to_linker::<State, WasiCli>(l, State::cli)?;
            }
            "wasi:cli/exit" => cli::exit::add_to_linker::<State, WasiCli>(l, State::cli)?,
            "wasi:cli/stdin" => cli::stdin::add_to_linker::<State, WasiCli>(l, State::cli)?,
            "wasi:cli/stdout" => cli::stdout::add_to_linker::<State, WasiCli>(l, State::cli)?,
            "wasi:cli/stderr" => cli::stderr::add_to_linker::<State, WasiCli>(l, State::cli)?,
            "wasi:cli/terminal-input" => {
                cli::terminal_input::add_to_linker::<State, WasiCli>(l, State::cli)?;
            }
            "wasi:cli/terminal-output" => {
                cli::terminal_output::add_to_linker::<State, WasiCli>(l, State::cli)?;
            }
            "wasi:cli/terminal-stdin" => {
                cli::terminal_stdin::add_to_linker::<State, WasiCli>(l, State::cli)?;
            }
            "wasi:cli/terminal-stdout" => {
                cli::terminal_stdout::add_to_linker::<State, WasiCli>(l, State::cli)?;
            }
            "wasi:cli/terminal-stderr" => {
                cli::terminal_stderr::add_to_linker::<State, WasiCli>(l, State::cli)?;
            }
            "wasi:clocks/monotonic-clock" => {
                monotonic_clock::add_to_linker::<State, BoundedClock>(l, |state| {
                    BoundedClockView {
                        table: &mut state.table,
                        sandbox: &state.sandbox,
                    }
                })?;
            }
            "wasi:clocks/wall-clock" => {
                clocks::wall_clock::add_to_linker::<State, WasiClocks>(l, State::clocks)?;
            }
            "wasi:filesystem/types" => {
                sync::filesystem::types::add_to_linker::<State, WasiFilesystem>(
                    l,
                    State::filesystem,
                )?;
            }
            "wasi:filesystem/preopens" => {
                filesystem::preopens::add_to_linker::<State, WasiFilesystem>(l, State::filesystem)?;
            }
            "wasi:io/error" => {
                sync::io::error::add_to_linker::<State, Table>(l, |state| &mut state.table)?;
            }
            "wasi:io/poll" => {
                sync::io::poll::add_to_linker::<State, Table>(l, |state| &mut state.table)?;
            }
            "wasi:io/streams" => {
                sync::io::streams::add_to_linker::<State, Table>(l, |state| &mut state.table)?;
            }
            "wasi:random/random" => {
                random::random::add_to_linker::<State, WasiRandom>(l, |s| s.wasi.random())?;
            }
            "wasi:random/insecure" => {
                random::insecure::add_to_linker::<State, WasiRandom>(l, |s| s.wasi.random())?;
            }
            "wasi:random/insecure-seed" => {
                random::insecure_seed::add_to_linker::<State, WasiRandom>(l, |s| s.wasi.random())?;
            }
            other => {
                return Err(wasmtime::Error::msg(format!(
                    "the sandbox world grants `{other}`, which ksm cannot link"
                )));
            }
        }
    }
    Ok(())
}

/// The resource table, for the `wasi:io` interfaces.
struct Table;

impl HasData for Table {
    type Data<'a> = &'a mut ResourceTable;
}

/// `wasi:clocks/monotonic-clock` with waits that end within the deadline:
/// asking to be woken after it traps at once, with [`GuestFault::Sleep`].
struct BoundedClock;

impl HasData for BoundedClock {
    type Data<'a> = BoundedClockView<'a>;
}

struct BoundedClockView<'a> {
    table: &'a mut ResourceTable,
    sandbox: &'a Sandbox,
}

/// A wait that ends at a given instant.
struct Wake(tokio::time::Instant);

#[wasmtime_wasi::async_trait]
impl Pollable for Wake {
    async fn ready(&mut self) {
        tokio::time::sleep_until(self.0).await;
    }
}

impl BoundedClockView<'_> {
    fn wait(&mut self, asked: Duration) -> wasmtime::Result<Resource<DynPollable>> {
        let at = self.sandbox.wake_at(asked)?;
        let wake = self.table.push(Wake(tokio::time::Instant::from_std(at)))?;
        subscribe(self.table, wake)
    }
}

impl monotonic_clock::Host for BoundedClockView<'_> {
    fn now(&mut self) -> wasmtime::Result<monotonic_clock::Instant> {
        Ok(monotonic_now())
    }

    fn resolution(&mut self) -> wasmtime::Result<monotonic_clock::Duration> {
        Ok(1)
    }

    fn subscribe_instant(
        &mut self,
        when: monotonic_clock::Instant,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        self.wait(Duration::from_nanos(when.saturating_sub(monotonic_now())))
    }

    fn subscribe_duration(
        &mut self,
        duration: monotonic_clock::Duration,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        self.wait(Duration::from_nanos(duration))
    }
}

/// Nanoseconds on the host's monotonic clock since the process began.
fn monotonic_now() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
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

    #[test]
    fn every_import_the_sandbox_world_grants_links_and_none_is_a_network() {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        let engine = wasmtime::Engine::new(&config).expect("an engine");
        let mut linker = Linker::new(&engine);
        link(&mut linker).expect("an adder for every granted import");
        assert!(GRANTED_IMPORTS.contains(&"wasi:cli/environment"));
        assert!(GRANTED_IMPORTS.contains(&"ksm:smart-module/types"));
        assert!(
            GRANTED_IMPORTS
                .iter()
                .all(|name| !name.starts_with("wasi:sockets/") && !name.starts_with("wasi:http/")),
            "{GRANTED_IMPORTS:?}"
        );
    }

    #[test]
    fn waits_must_end_within_the_deadline() {
        let sandbox = Sandbox::new(Duration::from_millis(50), MIB);
        assert!(sandbox.wake_at(Duration::from_millis(1)).is_ok());
        assert_eq!(
            sandbox.wake_at(Duration::from_secs(20)),
            Err(GuestFault::Sleep {
                asked: Duration::from_secs(20),
                deadline: Duration::from_millis(50),
            })
        );
        assert!(sandbox.wake_at(Duration::MAX).is_err(), "no overflow");
    }

    #[test]
    fn the_first_try_ends_at_the_deadline_and_only_it_gets_a_second_chance() {
        let mut sandbox = Sandbox::new(Duration::from_millis(50), MIB);
        assert_eq!(sandbox.begin_wall(), 10);
        let Err(fault) = sandbox.deadline_reached() else {
            panic!("the first try ends at its deadline");
        };
        let fault = fault.downcast_ref::<GuestFault>().unwrap();
        assert!(fault.deserves_second_chance());

        sandbox.begin_own_work();
        assert!(
            matches!(sandbox.deadline_reached(), Ok(UpdateDeadline::Continue(_))),
            "an idle thread has CPU budget left"
        );
        // 60 ms of this thread's own CPU time, however busy the machine is.
        let spin_until = thread_cpu_time() + Duration::from_millis(60);
        while thread_cpu_time() < spin_until {
            std::hint::spin_loop();
        }
        let Err(fault) = sandbox.deadline_reached() else {
            panic!("60 ms of CPU is over the 50 ms budget");
        };
        let fault = fault.downcast_ref::<GuestFault>().unwrap();
        assert!(matches!(fault, GuestFault::OwnWork { .. }), "{fault}");
        assert!(!fault.deserves_second_chance());
    }

    #[test]
    fn memory_over_the_limit_is_a_fault_that_says_so() {
        let mut sandbox = Sandbox::new(Duration::from_millis(50), 64 * MIB);
        assert!(sandbox.memory_growing(0, 64 * MIB, None).unwrap());
        let fault = sandbox.memory_growing(0, 80 * MIB, None).unwrap_err();
        assert_eq!(
            fault.downcast_ref::<GuestFault>().unwrap().to_string(),
            "went over its memory limit of 64 MiB (it asked for 80 MiB)"
        );
    }
}
