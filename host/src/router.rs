//! The router: hands every message to every module's guest, and sends what
//! the guests produce to the modules' sinks or dead letters.
//!
//! It runs on its own thread: guest calls are synchronous and short (a few
//! microseconds, bounded by the call deadline), and must not stall the async
//! tasks that talk to the broker and to Kinesis.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::activity::{Counters, Level};
use crate::bindings::describe;
use crate::bindings::types::{BulkOutput, DeviceContext, HomeContext, KinesisRecord, Span};
use crate::clock;
use crate::config::DeviceConfig;
use crate::dead_letter::DeadLetter;
use crate::module::Module;
use crate::runtime::{CallResult, Guest};
use crate::sink::kinesis::SinkRecord;
use crate::source::{Message, Topic};

/// One module as the router sees it.
pub struct Route {
    /// The module.
    pub module: Arc<Module>,
    /// Its guest instance.
    pub guest: Guest,
    /// Its sink's input.
    pub sink: mpsc::Sender<SinkRecord>,
}

/// Routes messages to modules.
pub struct Router {
    routes: Vec<Route>,
    devices: HashMap<u64, DeviceConfig>,
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
    /// A router over the given modules and device registry.
    pub fn new(routes: Vec<Route>, devices: &[DeviceConfig]) -> Self {
        Self {
            routes,
            devices: devices.iter().map(|d| (d.id, d.clone())).collect(),
        }
    }

    /// Routes messages until the inbox closes. Dropping the router then
    /// closes the sinks' inputs, so they flush and finish.
    pub fn run(mut self, mut inbox: mpsc::Receiver<Message>) {
        while let Some(message) = inbox.blocking_recv() {
            self.route(message);
        }
    }

    fn route(&mut self, message: Message) {
        let received_at = clock::format_rfc3339(message.received_at);
        for route in &mut self.routes {
            let module = &route.module;
            Counters::add(&module.counters.received, 1);
            let outcome = match &message.kind {
                Err(reason) => Outcome::Refused(reason.clone()),
                Ok(Topic::DeviceEvent { device_id }) => {
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
                Ok(Topic::HomeEvent { home_id }) => {
                    let context = HomeContext {
                        home_id: *home_id,
                        project_key_id: None,
                        project_key_name: None,
                        received_at: received_at.clone(),
                    };
                    events(route.guest.home_event(&context, &message.payload))
                }
                Ok(Topic::BulkData { device_id, label }) => bulk(
                    route.guest.bulk_data(*device_id, label, &message.payload),
                    &message,
                ),
            };
            deliver(route, &message, outcome);
        }
        message.settlement.settle();
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

fn deliver(route: &mut Route, message: &Message, outcome: Outcome) {
    let module = &route.module;
    let (produced, mut letters) = match outcome {
        Outcome::Refused(reason) => {
            let letter = DeadLetter::new(reason, &message.topic, None, &message.payload);
            if !module.reject(&[letter]) {
                message.settlement.withhold();
            }
            return;
        }
        Outcome::Records(produced, letters) => (produced, letters),
    };
    if produced.is_empty() && letters.is_empty() {
        Counters::add(&module.counters.filtered, 1);
        return;
    }
    let mut accepted = Vec::with_capacity(produced.len());
    for (index, record) in produced.into_iter().enumerate() {
        let record = SinkRecord {
            data: record.data,
            partition_key: record.partition_key,
            explicit_hash_key: record.explicit_hash_key,
            topic: message.topic.clone(),
            settlement: message.settlement.part(),
        };
        match record.check() {
            Ok(()) => accepted.push(record),
            Err(reason) => {
                letters.push(DeadLetter::new(
                    format!(
                        "the module's component returned a record Kinesis would refuse \
                         (output record {index}): {reason}"
                    ),
                    &message.topic,
                    None,
                    &record.data,
                ));
                // Kept as a dead letter below; until then the message's own
                // part holds its acknowledgement back.
                record.settlement.settle();
            }
        }
    }
    if !letters.is_empty() && !module.reject(&letters) {
        message.settlement.withhold();
    }
    for record in accepted {
        if route.sink.blocking_send(record).is_err() {
            module.log.write(
                Level::Warn,
                "the Kinesis sink has stopped; the message stays unacknowledged",
            );
            return;
        }
    }
}
