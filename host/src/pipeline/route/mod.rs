//! The router: hands every message to every module's guest, and passes what
//! the guests produce (records and dead letters) to the committer, which
//! writes it to the store and then acknowledges the message.
//!
//! It runs on its own thread: guest calls are synchronous and short (a few
//! microseconds, bounded by the call deadline), and must not stall the async
//! tasks that talk to the broker and to Kinesis.
//!
//! Its inbox carries messages and, in the same order, changes to the
//! modules it serves ([`Change`]: new guests, modules added and removed):
//! each change is applied between two messages, and the committer applies
//! its part at the same place in its own input.
//!
//! # Layout
//! - [`answer`]: a guest's answer checked against the call's budget.

pub mod answer;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::time::Instant;

use tokio::sync::mpsc::{self, UnboundedSender};

use crate::activity::{Counters, Level};
use crate::bindings::types::{DeviceContext, HomeContext};
use crate::clock;
use crate::components::Swap;
use crate::config::{DeviceConfig, ModuleConfig};
use crate::kinesis::check_record;
use crate::metrics::TrapKind;
use crate::module::Module;
use crate::pipeline::commit::{CommitTarget, Done, Job, Staged, TargetChange, Work};
use crate::pipeline::crash_guard::{CrashGuard, Fingerprint, Standing, fingerprint};
use crate::pipeline::source::{Message, Replay, ReplayRecord, Topic};
use crate::runtime::{Guest, GuestFault, Handled, Input, Mqtt};
use crate::store::dead_letter::DeadLetter;
use crate::store::spool::SpoolRecord;
use answer::{Budget, Outcome, Produced};

/// One module as the router sees it.
pub struct Route {
    /// The module.
    pub module: Arc<Module>,
    /// Its guest instance.
    pub guest: Guest,
}

/// What the router's inbox carries.
#[allow(
    clippy::large_enum_variant,
    reason = "messages are nearly all of it: boxing them would cost an allocation each"
)]
pub enum Inbound {
    /// A message from the broker, or a replayed dead letter.
    Message(Message),
    /// A change to the modules, applied after the messages before it.
    Change(Box<Change>),
}

/// A change to the modules the router serves.
pub enum Change {
    /// New guests for some modules (a component reloaded, or new settings).
    Swap(Swap),
    /// A new module, and where its output is committed.
    Add {
        /// Its guest.
        route: Box<Route>,
        /// Its spool and sink.
        target: CommitTarget,
        /// Told once the committer has it.
        done: Done,
    },
    /// A module that takes no more messages.
    Remove {
        /// The module.
        module: Arc<Module>,
        /// Told once the committer has let go of its sink.
        done: Done,
    },
    /// A module's spooled records go to a new sink from now on.
    Sink {
        /// The module.
        module: Arc<Module>,
        /// The new sink's input.
        sink: UnboundedSender<Vec<SpoolRecord>>,
        /// Told once the committer sends there.
        done: Done,
    },
}

/// Routes messages to modules.
pub struct Router {
    routes: Vec<Route>,
    devices: HashMap<u64, DeviceConfig>,
    budget: Budget,
    guard: Arc<CrashGuard>,
    stopping: Arc<AtomicBool>,
    committer: SyncSender<Work>,
}

/// Most messages the router takes from its inbox at once (one crash-guard
/// write covers them).
const MAX_BATCH: usize = 256;

impl Router {
    /// A router over the given modules (in configuration order) and device
    /// registry, holding guests to `budget`, telling `guard` what is in
    /// flight and committing through `committer`. `stopping` ends a wait
    /// for the committer.
    pub fn new(
        routes: Vec<Route>,
        devices: &[DeviceConfig],
        budget: Budget,
        guard: Arc<CrashGuard>,
        stopping: Arc<AtomicBool>,
        committer: SyncSender<Work>,
    ) -> Self {
        Self {
            routes,
            devices: devices.iter().map(|d| (d.id, d.clone())).collect(),
            budget,
            guard,
            stopping,
            committer,
        }
    }

    /// Routes messages until the inbox closes. Dropping the router then
    /// closes the committer's input, so it commits what is left and ends.
    pub fn run(mut self, mut inbox: mpsc::Receiver<Inbound>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = inbox.blocking_recv() {
            let mut next = Some(first);
            while let Some(inbound) = next.take() {
                match inbound {
                    Inbound::Message(message) => batch.push(message),
                    Inbound::Change(change) => {
                        self.route_batch(std::mem::take(&mut batch));
                        self.apply(*change);
                    }
                }
                if batch.len() < MAX_BATCH {
                    next = inbox.try_recv().ok();
                }
            }
            self.route_batch(std::mem::take(&mut batch));
        }
    }

    /// Applies a change; the committer's part goes to it behind the jobs
    /// of the messages before.
    fn apply(&mut self, change: Change) {
        let (change, done) = match change {
            Change::Swap(swap) => return self.switch(swap),
            Change::Add {
                route,
                target,
                done,
            } => {
                self.routes.push(*route);
                (TargetChange::Add(target), done)
            }
            Change::Remove { module, done } => {
                self.routes
                    .retain(|route| !Arc::ptr_eq(&route.module, &module));
                (TargetChange::Remove(module), done)
            }
            Change::Sink { module, sink, done } => (TargetChange::Sink(module, sink), done),
        };
        // A stopped committer drops `done`: the change is not applied.
        let _ = self.committer.send(Work::Change(change, done));
    }

    /// Routes a batch: runs of clean messages recorded in flight together
    /// and handed to each module's guest together, a suspect alone (nothing
    /// else in flight until it is committed), a condemned message straight
    /// to the dead letters.
    fn route_batch(&mut self, batch: Vec<Message>) {
        let prints: Vec<Fingerprint> = batch
            .iter()
            .map(|message| fingerprint(&message.topic, &message.payload))
            .collect();
        let standings: Vec<Standing> = prints.iter().map(|p| self.guard.standing(*p)).collect();
        let mut run = Vec::new();
        for (index, message) in batch.into_iter().enumerate() {
            let print = prints[index];
            if standings[index] == Standing::Clean {
                if run.is_empty() {
                    let end = standings[index..]
                        .iter()
                        .position(|s| *s != Standing::Clean)
                        .map_or(prints.len(), |n| index + n);
                    self.guard.begin(&prints[index..end]);
                }
                run.push(message);
                continue;
            }
            self.route_run(std::mem::take(&mut run));
            match standings[index] {
                Standing::Suspect => {
                    let flag = self.stopping.clone();
                    let stopping = move || flag.load(Ordering::Acquire);
                    self.guard.wait_idle(&stopping);
                    self.guard.begin(&[print]);
                    self.route_run(vec![message]);
                    self.guard.wait_idle(&stopping);
                }
                _ => {
                    self.guard.begin(&[print]);
                    self.condemn(message, print);
                }
            }
        }
        self.route_run(run);
    }

    /// Keeps a message as a dead letter in every module without running it:
    /// it was alone in flight at the last two abnormal exits of ksm.
    fn condemn(&mut self, message: Message, print: Fingerprint) {
        let reason = format!(
            "ksm stopped abnormally (crashed or was killed) twice in a row while handling this \
             message alone; it is kept as a dead letter without being run, so it cannot stop ksm \
             again (fingerprint {print:016x})"
        );
        let staged = self
            .routes
            .iter()
            .map(|route| {
                Counters::add(&route.module.counters.received, 1);
                stage(
                    &route.module,
                    &message,
                    Outcome::Refused(reason.clone()),
                    route.module.config().max_record_size,
                )
            })
            .collect();
        self.send(Job {
            staged,
            settlement: message.settlement,
            charge: message.charge,
        });
    }

    fn send(&self, job: Job) {
        if self.committer.send(Work::Job(job)).is_err() {
            self.guard.end(1);
            tracing::warn!("the committer has stopped; message left unacknowledged");
        }
    }

    /// Puts new guests in service: the next message goes to them; the old
    /// instances are dropped.
    fn switch(&mut self, swap: Swap) {
        let started = Instant::now();
        let mut switched = Vec::with_capacity(swap.guests.len());
        for (module, guest, info) in swap.guests {
            let Some(route) = self
                .routes
                .iter_mut()
                .find(|route| Arc::ptr_eq(&route.module, &module))
            else {
                continue;
            };
            route.guest = guest;
            switched.push((module, info));
        }
        let pause = started.elapsed();
        for (module, info) in switched {
            module.log.write(
                Level::Info,
                format!(
                    "now running component sha256 {} (switched between two messages in {} µs)",
                    info.short_hash(),
                    pause.as_micros()
                ),
            );
        }
    }

    /// Routes messages in order: each module's guest gets those of them it
    /// must run in one [`Guest::handle`] (a 1.1 guest in batch calls), then
    /// each message's outcomes go to the committer, in order. A replay for
    /// a module that is gone is left unsettled: its dead letter stays.
    fn route_run(&mut self, mut messages: Vec<Message>) {
        let routed = |message: &Message| {
            message.replay.as_ref().is_none_or(|replay| {
                self.routes
                    .iter()
                    .any(|route| Arc::ptr_eq(&route.module, &replay.module))
            })
        };
        let before = messages.len();
        messages.retain(routed);
        self.guard.end(before - messages.len());
        if messages.is_empty() {
            return;
        }
        #[cfg(debug_assertions)]
        for message in &messages {
            crate::pipeline::crash_guard::abort_if_marked(&message.payload);
        }
        let contexts: Vec<Context> = messages.iter().map(|m| self.context(m)).collect();
        let bad_topic_owners: Vec<Option<Arc<Module>>> = messages
            .iter()
            .map(|m| {
                m.kind
                    .as_ref()
                    .err()
                    .map(|_| owner_of_bad_topic(&self.routes, &m.topic))
            })
            .collect();
        let budget = self.budget;
        // staged[message][module]
        let mut staged: Vec<Vec<Option<Staged>>> = (0..messages.len())
            .map(|_| Vec::with_capacity(self.routes.len()))
            .collect();
        for route in self.routes.iter_mut() {
            let module = &route.module;
            let max_record_size = module.config().max_record_size;
            let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(messages.len());
            let mut inputs = Vec::new();
            let mut called = Vec::new();
            for (position, message) in messages.iter().enumerate() {
                let for_another = match (&message.replay, &bad_topic_owners[position]) {
                    (Some(replay), _) => !Arc::ptr_eq(&replay.module, module),
                    (None, Some(owner)) => !Arc::ptr_eq(owner, module),
                    (None, None) => false,
                };
                if for_another {
                    outcomes.push(None);
                    continue;
                }
                Counters::add(&module.counters.received, 1);
                let direct = match (&message.kind, &message.replay) {
                    (
                        _,
                        Some(Replay {
                            record: Some(record),
                            ..
                        }),
                    ) => Some(Outcome::Records(
                        vec![replayed(record, message)],
                        Vec::new(),
                    )),
                    (Err(reason), _) => Some(Outcome::Refused(reason.clone())),
                    (Ok(_), _) => None,
                };
                if direct.is_none()
                    && let Some(input) = contexts[position].input(message)
                {
                    inputs.push(input);
                    called.push(position);
                }
                outcomes.push(direct);
            }
            if !inputs.is_empty() {
                let handled = timed(module, &mut route.guest, &inputs);
                if let Some(reason) = handled.batch_failed {
                    module.log.write(Level::Warn, reason);
                }
                for (position, answer) in called.iter().zip(handled.answers) {
                    let message = &messages[*position];
                    outcomes[*position] = Some(answer::outcome(
                        answer,
                        &message.payload,
                        &message.topic,
                        budget,
                    ));
                }
            }
            for (position, outcome) in outcomes.into_iter().enumerate() {
                let message = &mut messages[position];
                let Some(outcome) = outcome else {
                    staged[position].push(None);
                    continue;
                };
                let kept = stage(module, message, outcome, max_record_size);
                if !matches!(message.kind, Ok(Topic::BulkData { .. }))
                    && let Some(kept) = &kept
                {
                    // An event's records are the guest's own bytes, held until committed.
                    message
                        .charge
                        .add(kept.records.iter().map(|r| r.data.len()).sum());
                }
                staged[position].push(kept);
            }
        }
        for (message, staged) in messages.into_iter().zip(staged) {
            self.send(Job {
                staged,
                settlement: message.settlement,
                charge: message.charge,
            });
        }
    }

    /// What a guest needs to know of a message beside its payload.
    fn context(&self, message: &Message) -> Context {
        let received_at = || clock::format_rfc3339(message.received_at);
        match &message.kind {
            Ok(Topic::DeviceEvent { device_id }) => {
                let device = self.devices.get(device_id);
                Context::Device(DeviceContext {
                    device_id: *device_id,
                    home_id: device.map(|d| d.home_id),
                    device_class: device.and_then(|d| d.class.clone()),
                    device_ip: None,
                    received_at: received_at(),
                })
            }
            Ok(Topic::HomeEvent { home_id }) => Context::Home(HomeContext {
                home_id: *home_id,
                project_key_id: None,
                project_key_name: None,
                received_at: received_at(),
            }),
            Ok(Topic::BulkData { .. }) | Err(_) => Context::None,
        }
    }
}

/// A message's context for the guest, made once for all modules.
enum Context {
    Device(DeviceContext),
    Home(HomeContext),
    /// Bulk data (its topic says all), or a message no guest runs.
    None,
}

impl Context {
    /// The message as the guest takes it; `None` if no guest runs it.
    fn input<'a>(&'a self, message: &'a Message) -> Option<Input<'a>> {
        let payload = &message.payload[..];
        let mqtt = Mqtt {
            topic: &message.topic,
            content_type: message.properties.content_type.as_deref(),
            user_properties: &message.properties.user_properties,
        };
        Some(match (self, &message.kind) {
            (Context::Device(context), _) => Input::DeviceEvent {
                context,
                payload,
                mqtt,
            },
            (Context::Home(context), _) => Input::HomeEvent {
                context,
                payload,
                mqtt,
            },
            (Context::None, Ok(Topic::BulkData { device_id, label })) => Input::BulkData {
                device_id: *device_id,
                label,
                payload,
                mqtt,
            },
            (Context::None, _) => return None,
        })
    }
}

/// Hands messages to a module's guest, timing the calls and counting those
/// that ended badly, and the guest instances recycled meanwhile.
fn timed(module: &Module, guest: &mut Guest, inputs: &[Input<'_>]) -> Handled {
    let started = std::time::Instant::now();
    let recycled = guest.recycled();
    let handled = guest.handle(inputs);
    let metrics = &module.metrics;
    // One observation per call: a batch call is one call.
    let per_call = started.elapsed() / u32::try_from(handled.calls.max(1)).unwrap_or(u32::MAX);
    for _ in 0..handled.calls {
        metrics.guest_call.observe(per_call);
    }
    Counters::add(&metrics.guest_recycles, guest.recycled() - recycled);
    for answer in &handled.answers {
        if let Err(error) = answer {
            metrics.guest_trapped(match error.fault() {
                Some(GuestFault::Memory { .. } | GuestFault::Table { .. }) => TrapKind::Memory,
                Some(_) => TrapKind::Deadline,
                None => TrapKind::Trap,
            });
        }
    }
    handled
}

/// The module that keeps a message whose topic is not a MODE topic (one
/// dead letter, not one per module): the first whose bulk data label the
/// topic names, else the first that takes events, else the first.
fn owner_of_bad_topic(routes: &[Route], topic: &str) -> Arc<Module> {
    let levels: Vec<&str> = topic.split('/').collect();
    let find = |wanted: &dyn Fn(&ModuleConfig) -> bool| {
        routes
            .iter()
            .find(|route| wanted(&route.module.config()))
            .map(|route| route.module.clone())
    };
    let by_label = match levels[..] {
        ["", "devices", _, "bulkData", label] => {
            find(&|config: &ModuleConfig| config.bulk_data_label.as_deref() == Some(label))
        }
        _ => None,
    };
    by_label
        .or_else(|| find(&|config: &ModuleConfig| !config.subscribe_events.is_empty()))
        .or_else(|| routes.first().map(|route| route.module.clone()))
        .expect("a message is routed only while a module runs")
}

/// A replayed record, produced as it was.
fn replayed(record: &ReplayRecord, message: &Message) -> Produced {
    Produced {
        data: message.payload.clone(),
        partition_key: record.partition_key.clone(),
        explicit_hash_key: record.explicit_hash_key.clone(),
    }
}

/// What a module keeps of a message: records checked against the Kinesis
/// limits (those that break them become dead letters), and dead letters.
fn stage(
    module: &Module,
    message: &Message,
    outcome: Outcome,
    max_record_size: u32,
) -> Option<Staged> {
    let (produced, mut letters) = match outcome {
        Outcome::Refused(reason) => {
            let letter = DeadLetter::new(reason, &message.topic, None, message.payload.clone());
            module.log_refused(std::slice::from_ref(&letter));
            return Some(Staged {
                records: Vec::new(),
                dead_letters: vec![letter],
            });
        }
        Outcome::Records(produced, letters) => (produced, letters),
    };
    if produced.is_empty() && letters.is_empty() {
        Counters::add(&module.counters.filtered, 1);
        return None;
    }
    let mut records = Vec::with_capacity(produced.len());
    let received_ms =
        u64::try_from(message.received_at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
    for (index, record) in produced.into_iter().enumerate() {
        let size = record.data.len() + record.partition_key.len();
        match check_record(
            &record.partition_key,
            record.explicit_hash_key.as_deref(),
            size,
            max_record_size as usize,
        ) {
            Ok(()) => {
                let mut spooled = SpoolRecord::new(
                    record.data,
                    &record.partition_key,
                    record.explicit_hash_key.as_deref(),
                    message.topic.clone(),
                );
                spooled.received_ms = received_ms;
                records.push(spooled);
            }
            Err(reason) => letters.push(DeadLetter::for_record(
                format!(
                    "the module's component returned a record Kinesis would refuse \
                     (output record {index}): {reason}"
                ),
                &message.topic,
                &record.partition_key,
                record.explicit_hash_key.as_deref(),
                record.data,
            )),
        }
    }
    module.log_refused(&letters);
    Some(Staged {
        records,
        dead_letters: letters,
    })
}
