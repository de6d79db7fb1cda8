//! The router: hands every message to every module's guest, and passes what
//! the guests produce (records and dead letters) to the committer, which
//! writes it to the store and then acknowledges the message.
//!
//! It runs on its own thread: guest calls are synchronous and short (a few
//! microseconds, bounded by the call deadline), and must not stall the async
//! tasks that talk to the broker and to Kinesis.
//!
//! # Layout
//! - [`answer`]: a guest's answer checked against the call's budget.

pub mod answer;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::Instant;

use tokio::sync::mpsc;

use crate::activity::{Counters, Level};
use crate::bindings::types::{DeviceContext, HomeContext};
use crate::clock;
use crate::components::Swap;
use crate::config::DeviceConfig;
use crate::kinesis::check_record;
use crate::metrics::TrapKind;
use crate::module::Module;
use crate::pipeline::commit::{Job, Staged};
use crate::pipeline::crash_guard::{CrashGuard, Fingerprint, Standing, fingerprint};
use crate::pipeline::source::{Message, Replay, ReplayRecord, Topic};
use crate::runtime::{CallResult, Guest, GuestFault};
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

/// Routes messages to modules.
pub struct Router {
    routes: Vec<Route>,
    devices: HashMap<u64, DeviceConfig>,
    budget: Budget,
    guard: Arc<CrashGuard>,
    stopping: Arc<AtomicBool>,
    committer: SyncSender<Job>,
    swaps: Receiver<Swap>,
}

/// Most messages the router takes from its inbox at once (one crash-guard
/// write covers them).
const MAX_BATCH: usize = 256;

impl Router {
    /// A router over the given modules (in configuration order) and device
    /// registry, holding guests to `budget`, telling `guard` what is in
    /// flight, committing through `committer` and taking new guests from
    /// `swaps` between messages. `stopping` ends a wait for the committer.
    pub fn new(
        routes: Vec<Route>,
        devices: &[DeviceConfig],
        budget: Budget,
        guard: Arc<CrashGuard>,
        stopping: Arc<AtomicBool>,
        committer: SyncSender<Job>,
        swaps: Receiver<Swap>,
    ) -> Self {
        Self {
            routes,
            devices: devices.iter().map(|d| (d.id, d.clone())).collect(),
            budget,
            guard,
            stopping,
            committer,
            swaps,
        }
    }

    /// Routes messages until the inbox closes. Dropping the router then
    /// closes the committer's input, so it commits what is left and ends.
    pub fn run(mut self, mut inbox: mpsc::Receiver<Message>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = inbox.blocking_recv() {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match inbox.try_recv() {
                    Ok(message) => batch.push(message),
                    Err(_) => break,
                }
            }
            self.route_batch(std::mem::take(&mut batch));
        }
    }

    /// Routes a batch: runs of clean messages recorded in flight together,
    /// a suspect alone (nothing else in flight until it is committed), a
    /// condemned message straight to the dead letters.
    fn route_batch(&mut self, batch: Vec<Message>) {
        let prints: Vec<Fingerprint> = batch
            .iter()
            .map(|message| fingerprint(&message.topic, &message.payload))
            .collect();
        let standings: Vec<Standing> = prints.iter().map(|p| self.guard.standing(*p)).collect();
        let mut begun = 0;
        for (index, message) in batch.into_iter().enumerate() {
            while let Ok(swap) = self.swaps.try_recv() {
                self.switch(swap);
            }
            let print = prints[index];
            match standings[index] {
                Standing::Clean => {
                    if index >= begun {
                        begun = standings[index..]
                            .iter()
                            .position(|s| *s != Standing::Clean)
                            .map_or(prints.len(), |n| index + n);
                        self.guard.begin(&prints[index..begun]);
                    }
                    self.route(message);
                }
                Standing::Suspect => {
                    let flag = self.stopping.clone();
                    let stopping = move || flag.load(Ordering::Acquire);
                    self.guard.wait_idle(&stopping);
                    self.guard.begin(&[print]);
                    self.route(message);
                    self.guard.wait_idle(&stopping);
                }
                Standing::Condemned => {
                    self.guard.begin(&[print]);
                    self.condemn(message, print);
                }
            }
        }
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
                stage(&route.module, &message, Outcome::Refused(reason.clone()))
            })
            .collect();
        self.send(Job {
            staged,
            settlement: message.settlement,
            charge: message.charge,
        });
    }

    fn send(&self, job: Job) {
        if self.committer.send(job).is_err() {
            self.guard.end(1);
            tracing::warn!("the committer has stopped; message left unacknowledged");
        }
    }

    /// Puts new guests in service: the next message goes to them; the old
    /// instances are dropped.
    fn switch(&mut self, swap: Swap) {
        let started = Instant::now();
        let mut switched = Vec::with_capacity(swap.guests.len());
        for (index, guest, info) in swap.guests {
            let Some(route) = self.routes.get_mut(index) else {
                continue;
            };
            route.guest = guest;
            switched.push((index, info));
        }
        let pause = started.elapsed();
        for (index, info) in switched {
            self.routes[index].module.log.write(
                Level::Info,
                format!(
                    "now running component sha256 {} (switched between two messages in {} µs)",
                    info.short_hash(),
                    pause.as_micros()
                ),
            );
        }
    }

    fn route(&mut self, mut message: Message) {
        #[cfg(debug_assertions)]
        crate::pipeline::crash_guard::abort_if_marked(&message.payload);
        let received_at = clock::format_rfc3339(message.received_at);
        let budget = self.budget;
        let bad_topic_owner = message
            .kind
            .as_ref()
            .err()
            .map(|_| owner_of_bad_topic(&self.routes, &message.topic));
        let mut staged = Vec::with_capacity(self.routes.len());
        for (index, route) in self.routes.iter_mut().enumerate() {
            let for_another = match (&message.replay, bad_topic_owner) {
                (Some(replay), _) => replay.module != index,
                (None, Some(owner)) => owner != index,
                (None, None) => false,
            };
            if for_another {
                staged.push(None);
                continue;
            }
            let module = &route.module;
            Counters::add(&module.counters.received, 1);
            let payload = &message.payload;
            let outcome = match (&message.kind, &message.replay) {
                (
                    _,
                    Some(Replay {
                        record: Some(record),
                        ..
                    }),
                ) => Outcome::Records(vec![replayed(record, &message)], Vec::new()),
                (Err(reason), _) => Outcome::Refused(reason.clone()),
                (Ok(Topic::DeviceEvent { device_id }), _) => {
                    let device = self.devices.get(device_id);
                    let context = DeviceContext {
                        device_id: *device_id,
                        home_id: device.map(|d| d.home_id),
                        device_class: device.and_then(|d| d.class.clone()),
                        device_ip: None,
                        received_at: received_at.clone(),
                    };
                    let answer = timed(module, &mut route.guest, |guest| {
                        guest.device_event(&context, payload)
                    });
                    answer::events(answer, payload.len(), budget)
                }
                (Ok(Topic::HomeEvent { home_id }), _) => {
                    let context = HomeContext {
                        home_id: *home_id,
                        project_key_id: None,
                        project_key_name: None,
                        received_at: received_at.clone(),
                    };
                    let answer = timed(module, &mut route.guest, |guest| {
                        guest.home_event(&context, payload)
                    });
                    answer::events(answer, payload.len(), budget)
                }
                (Ok(Topic::BulkData { device_id, label }), _) => {
                    let answer = timed(module, &mut route.guest, |guest| {
                        guest.bulk_data(*device_id, label, payload)
                    });
                    answer::bulk(answer, payload, &message.topic, budget)
                }
            };
            let kept = stage(module, &message, outcome);
            if !matches!(message.kind, Ok(Topic::BulkData { .. }))
                && let Some(kept) = &kept
            {
                // An event's records are the guest's own bytes, held until committed.
                message
                    .charge
                    .add(kept.records.iter().map(|r| r.data.len()).sum());
            }
            staged.push(kept);
        }
        self.send(Job {
            staged,
            settlement: message.settlement,
            charge: message.charge,
        });
    }
}

/// Runs a guest call, timing it and counting how it ended badly, if it
/// did, and whether the guest's instance was recycled after it.
fn timed<T>(
    module: &Module,
    guest: &mut Guest,
    call: impl FnOnce(&mut Guest) -> CallResult<T>,
) -> CallResult<T> {
    let started = std::time::Instant::now();
    let recycled = guest.recycled();
    let answer = call(guest);
    let metrics = &module.metrics;
    metrics.guest_call.observe(started.elapsed());
    Counters::add(&metrics.guest_recycles, guest.recycled() - recycled);
    if let Err(error) = &answer {
        metrics.guest_trapped(match error.fault() {
            Some(GuestFault::Memory { .. } | GuestFault::Table { .. }) => TrapKind::Memory,
            Some(_) => TrapKind::Deadline,
            None => TrapKind::Trap,
        });
    }
    answer
}

/// The module that keeps a message whose topic is not a MODE topic (one
/// dead letter, not one per module): the first whose bulk data label the
/// topic names, else the first that takes events, else the first.
fn owner_of_bad_topic(routes: &[Route], topic: &str) -> usize {
    let levels: Vec<&str> = topic.split('/').collect();
    let position = |wanted: &dyn Fn(&Route) -> bool| routes.iter().position(wanted);
    let by_label = match levels[..] {
        ["", "devices", _, "bulkData", label] => {
            position(&|route: &Route| route.module.config.bulk_data_label.as_deref() == Some(label))
        }
        _ => None,
    };
    by_label
        .or_else(|| position(&|route: &Route| !route.module.config.subscribe_events.is_empty()))
        .unwrap_or(0)
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
fn stage(module: &Module, message: &Message, outcome: Outcome) -> Option<Staged> {
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
            module.config.max_record_size as usize,
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
