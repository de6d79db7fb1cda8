//! The router: hands every message to every module's guest, and passes what
//! the guests produce (records and dead letters) to the committer, which
//! writes it to the store and then acknowledges the message.
//!
//! It runs on its own thread: guest calls are synchronous and short (a few
//! microseconds, bounded by the call deadline), and must not stall the async
//! tasks that talk to the broker and to Kinesis.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::activity::{Counters, Level};
use crate::bindings::describe;
use crate::bindings::types::{BulkOutput, DeviceContext, HomeContext, KinesisRecord, Span};
use crate::clock;
use crate::components::Swap;
use crate::config::DeviceConfig;
use crate::dead_letter::DeadLetter;
use crate::module::Module;
use crate::runtime::{CallResult, Guest};
use crate::sink::kinesis::check_record;
use crate::source::{Message, Replay, ReplayRecord, Topic};
use crate::spool::{Job, NewRecord, Staged};

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
    committer: SyncSender<Job>,
    swaps: Receiver<Swap>,
}

/// What one module made of one message.
enum Outcome {
    /// Records to put, with refused records to keep.
    Records(Vec<Produced>, Vec<DeadLetter>),
    /// The whole message is refused.
    Refused(String),
}

struct Produced {
    data: Bytes,
    partition_key: String,
    explicit_hash_key: Option<String>,
}

impl Router {
    /// A router over the given modules (in configuration order) and device
    /// registry, committing through `committer` and taking new guests from
    /// `swaps` between messages.
    pub fn new(
        routes: Vec<Route>,
        devices: &[DeviceConfig],
        committer: SyncSender<Job>,
        swaps: Receiver<Swap>,
    ) -> Self {
        Self {
            routes,
            devices: devices.iter().map(|d| (d.id, d.clone())).collect(),
            committer,
            swaps,
        }
    }

    /// Routes messages until the inbox closes. Dropping the router then
    /// closes the committer's input, so it commits what is left and ends.
    pub fn run(mut self, mut inbox: mpsc::Receiver<Message>) {
        while let Some(message) = inbox.blocking_recv() {
            while let Ok(swap) = self.swaps.try_recv() {
                self.switch(swap);
            }
            self.route(message);
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

    fn route(&mut self, message: Message) {
        let received_at = clock::format_rfc3339(message.received_at);
        let mut staged = Vec::with_capacity(self.routes.len());
        for (index, route) in self.routes.iter_mut().enumerate() {
            if message.replay.as_ref().is_some_and(|r| r.module != index) {
                staged.push(None);
                continue;
            }
            let module = &route.module;
            Counters::add(&module.counters.received, 1);
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
                    events(route.guest.device_event(&context, &message.payload))
                }
                (Ok(Topic::HomeEvent { home_id }), _) => {
                    let context = HomeContext {
                        home_id: *home_id,
                        project_key_id: None,
                        project_key_name: None,
                        received_at: received_at.clone(),
                    };
                    events(route.guest.home_event(&context, &message.payload))
                }
                (Ok(Topic::BulkData { device_id, label }), _) => bulk(
                    route.guest.bulk_data(*device_id, label, &message.payload),
                    &message,
                ),
            };
            staged.push(stage(module, &message, outcome));
        }
        let job = Job {
            staged,
            settlement: message.settlement,
        };
        if self.committer.send(job).is_err() {
            tracing::warn!("the committer has stopped; message left unacknowledged");
        }
    }
}

/// A replayed record, produced as it was.
fn replayed(record: &ReplayRecord, message: &Message) -> Produced {
    Produced {
        data: message.payload.clone(),
        partition_key: record.partition_key.clone(),
        explicit_hash_key: record.explicit_hash_key.clone(),
    }
}

fn events(result: CallResult<Vec<KinesisRecord>>) -> Outcome {
    match result {
        Ok(Ok(records)) => Outcome::Records(
            records
                .into_iter()
                .map(|r| Produced {
                    data: Bytes::from(r.data),
                    partition_key: r.partition_key,
                    explicit_hash_key: r.explicit_hash_key,
                })
                .collect(),
            Vec::new(),
        ),
        Ok(Err(error)) => Outcome::Refused(describe(&error)),
        Err(error) => Outcome::Refused(format!(
            "the module's component failed on this message: {error}"
        )),
    }
}

fn bulk(result: CallResult<BulkOutput>, message: &Message) -> Outcome {
    let output = match result {
        Ok(Ok(output)) => output,
        Ok(Err(error)) => return Outcome::Refused(describe(&error)),
        Err(error) => {
            return Outcome::Refused(format!(
                "the module's component failed on this message: {error}"
            ));
        }
    };
    let payload = &message.payload;
    let slice = |span: &Span| {
        let start = span.offset as usize;
        let end = start.checked_add(span.len as usize)?;
        (end <= payload.len()).then(|| payload.slice(start..end))
    };
    let mut records = Vec::with_capacity(output.records.len());
    for record in output.records {
        let Some(data) = slice(&record.data) else {
            return Outcome::Refused(format!(
                "the module's component returned a record span {}+{} outside the {}-byte payload",
                record.data.offset,
                record.data.len,
                payload.len()
            ));
        };
        records.push(Produced {
            data,
            partition_key: record.partition_key,
            explicit_hash_key: record.explicit_hash_key,
        });
    }
    let letters = output
        .rejected
        .iter()
        .map(|rejected| {
            let data = slice(&rejected.data).unwrap_or_default();
            DeadLetter::new(
                describe(&rejected.reason),
                &message.topic,
                Some(rejected.index),
                &data,
            )
        })
        .collect();
    Outcome::Records(records, letters)
}

/// What a module keeps of a message: records checked against the Kinesis
/// limits (those that break them become dead letters), and dead letters.
fn stage(module: &Module, message: &Message, outcome: Outcome) -> Option<Staged> {
    let (produced, mut letters) = match outcome {
        Outcome::Refused(reason) => {
            let letter = DeadLetter::new(reason, &message.topic, None, &message.payload);
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
    for (index, record) in produced.into_iter().enumerate() {
        let size = record.data.len() + record.partition_key.len();
        match check_record(
            &record.partition_key,
            record.explicit_hash_key.as_deref(),
            size,
        ) {
            Ok(()) => records.push(NewRecord {
                data: record.data,
                partition_key: record.partition_key,
                explicit_hash_key: record.explicit_hash_key,
                topic: message.topic.clone(),
            }),
            Err(reason) => letters.push(DeadLetter::for_record(
                format!(
                    "the module's component returned a record Kinesis would refuse \
                     (output record {index}): {reason}"
                ),
                &message.topic,
                &record.partition_key,
                record.explicit_hash_key.as_deref(),
                &record.data,
            )),
        }
    }
    module.log_refused(&letters);
    Some(Staged {
        records,
        dead_letters: letters,
    })
}
