//! The WebAssembly component glue: `wit_bindgen` bindings for the
//! `smart-module-batch` world (contract 1.1: the 1.0 forwarder and batches),
//! and conversions between WIT and native types. One [`Forwarder`] per
//! instance lives in a thread-local (wasm is single-threaded; the host calls
//! one function at a time).

use std::cell::RefCell;

use crate::{
    BulkKeys, BulkOutput, BulkSpans, DeviceContext, Error, Forwarder, HomeContext, Record, Settings,
};

wit_bindgen::generate!({ path: "../wit/1.1", world: "smart-module-batch" });

use exports::ksm::smart_module::batch;
use exports::ksm::smart_module::forwarder::Guest;
use ksm::smart_module::types as wit;

thread_local! {
    static FORWARDER: RefCell<Forwarder> = const { RefCell::new(Forwarder::new()) };
}

/// The exported component.
struct Component;

fn configure(settings: wit::ModuleSettings) -> Result<(), Error> {
    let settings = Settings {
        subscribe_events: settings.subscribe_events,
        bulk_data_label: settings.bulk_data_label,
        use_uuid: settings.use_uuid,
        max_record_size: settings.max_record_size,
    };
    FORWARDER.with_borrow_mut(|f| f.configure(settings))
}

fn device_context(context: wit::DeviceContext) -> DeviceContext {
    DeviceContext {
        device_id: context.device_id,
        home_id: context.home_id,
        device_class: context.device_class,
        device_ip: context.device_ip,
        received_at: context.received_at,
    }
}

fn home_context(context: wit::HomeContext) -> HomeContext {
    HomeContext {
        home_id: context.home_id,
        project_key_id: context.project_key_id,
        project_key_name: context.project_key_name,
        received_at: context.received_at,
    }
}

impl Guest for Component {
    fn configure(settings: wit::ModuleSettings) -> Result<(), wit::Error> {
        configure(settings).map_err(to_wit)
    }

    fn handle_device_event(
        context: wit::DeviceContext,
        payload: Vec<u8>,
    ) -> Result<Vec<wit::KinesisRecord>, wit::Error> {
        let context = device_context(context);
        FORWARDER
            .with_borrow(|f| f.handle_device_event(&context, &payload))
            .map(records_to_wit)
            .map_err(to_wit)
    }

    fn handle_home_event(
        context: wit::HomeContext,
        payload: Vec<u8>,
    ) -> Result<Vec<wit::KinesisRecord>, wit::Error> {
        let context = home_context(context);
        FORWARDER
            .with_borrow(|f| f.handle_home_event(&context, &payload))
            .map(records_to_wit)
            .map_err(to_wit)
    }

    fn handle_bulk_data(
        device_id: u64,
        label: String,
        payload: Vec<u8>,
    ) -> Result<wit::BulkOutput, wit::Error> {
        FORWARDER
            .with_borrow(|f| f.handle_bulk_data(device_id, &label, &payload))
            .map(bulk_to_wit)
            .map_err(to_wit)
    }
}

impl batch::Guest for Component {
    fn configure(settings: wit::ModuleSettings) -> Result<(), batch::ConfigureError> {
        configure(settings).map_err(|error| match error {
            Error::InvalidSettings { field, detail } => {
                batch::ConfigureError::InvalidSettings(wit::FieldFault { field, detail })
            }
            other => batch::ConfigureError::Other(other.to_string()),
        })
    }

    fn handle_batch(messages: Vec<batch::Message>) -> Vec<batch::Outcome> {
        FORWARDER.with_borrow(|f| {
            messages
                .into_iter()
                .map(|message| outcome(f, message))
                .collect()
        })
    }
}

/// One message of a batch, answered as it would be alone.
fn outcome(f: &Forwarder, message: batch::Message) -> batch::Outcome {
    let answer = match message {
        batch::Message::DeviceEvent(event) => f
            .handle_device_event(&device_context(event.context), &event.payload)
            .map(|records| batch::Outcome::Records(records_to_wit(records))),
        batch::Message::HomeEvent(event) => f
            .handle_home_event(&home_context(event.context), &event.payload)
            .map(|records| batch::Outcome::Records(records_to_wit(records))),
        batch::Message::BulkData(bulk) => f
            .handle_bulk_spans(bulk.device_id, &bulk.label, &bulk.payload)
            .map(|spans| batch::Outcome::Bulk(bulk_spans_to_wit(spans))),
    };
    answer.unwrap_or_else(|error| batch::Outcome::Refused(to_message_error(error)))
}

fn span_to_wit(span: crate::bulk::Span) -> wit::Span {
    wit::Span {
        offset: span.offset,
        len: span.len,
    }
}

fn key(partition_key: String) -> batch::RecordKey {
    batch::RecordKey {
        partition_key,
        explicit_hash_key: None,
    }
}

fn bulk_spans_to_wit(out: BulkSpans) -> batch::BulkRecords {
    batch::BulkRecords {
        spans: out.spans.into_iter().map(span_to_wit).collect(),
        keys: match out.keys {
            BulkKeys::Shared(shared) => batch::BulkKeys::Shared(key(shared)),
            BulkKeys::PerRecord(keys) => {
                batch::BulkKeys::PerRecord(keys.into_iter().map(key).collect())
            }
        },
        refused: out
            .rejected
            .into_iter()
            .map(|r| batch::RefusedRecord {
                index: r.index,
                data: span_to_wit(r.data),
                reason: to_message_error(r.reason),
            })
            .collect(),
    }
}

fn to_message_error(e: Error) -> batch::MessageError {
    use batch::MessageError as M;
    match to_wit(e) {
        wit::Error::UnsupportedVersion(found) => M::UnsupportedVersion(found),
        wit::Error::MalformedPayload(fault) => M::MalformedPayload(fault),
        wit::Error::NotByteArray(element) => M::NotByteArray(element),
        wit::Error::RecordTooLarge(record) => M::RecordTooLarge(record),
        wit::Error::InvalidEventJson(fault) => M::InvalidEventJson(fault),
        wit::Error::InvalidField(fault) => M::InvalidField(fault),
        wit::Error::NotConfigured => M::NotConfigured,
        wit::Error::InvalidSettings(fault) => M::Other(format!(
            "module setting `{}`: {}",
            fault.field, fault.detail
        )),
        wit::Error::Other(text) => M::Other(text),
    }
}

fn records_to_wit(records: Vec<Record>) -> Vec<wit::KinesisRecord> {
    records
        .into_iter()
        .map(|r| wit::KinesisRecord {
            data: r.data,
            partition_key: r.partition_key,
            explicit_hash_key: None,
        })
        .collect()
}

fn bulk_to_wit(out: BulkOutput) -> wit::BulkOutput {
    wit::BulkOutput {
        records: out
            .records
            .into_iter()
            .map(|r| wit::BulkRecord {
                data: span_to_wit(r.data),
                partition_key: r.partition_key,
                explicit_hash_key: None,
            })
            .collect(),
        rejected: out
            .rejected
            .into_iter()
            .map(|r| wit::RejectedRecord {
                index: r.index,
                data: span_to_wit(r.data),
                reason: to_wit(r.reason),
            })
            .collect(),
    }
}

fn to_wit(e: Error) -> wit::Error {
    match e {
        Error::UnsupportedVersion(found) => wit::Error::UnsupportedVersion(found),
        Error::MalformedPayload { offset, detail } => {
            wit::Error::MalformedPayload(wit::PayloadFault { offset, detail })
        }
        Error::NotByteArray {
            index,
            offset,
            found,
        } => wit::Error::NotByteArray(wit::NotByteArray {
            index,
            offset,
            found,
        }),
        Error::RecordTooLarge { index, size, limit } => {
            wit::Error::RecordTooLarge(wit::TooLarge { index, size, limit })
        }
        Error::InvalidEventJson { offset, detail } => {
            wit::Error::InvalidEventJson(wit::PayloadFault { offset, detail })
        }
        Error::InvalidField { field, detail } => {
            wit::Error::InvalidField(wit::FieldFault { field, detail })
        }
        Error::InvalidSettings { field, detail } => {
            wit::Error::InvalidSettings(wit::FieldFault { field, detail })
        }
        Error::NotConfigured => wit::Error::NotConfigured,
        Error::Other(text) => wit::Error::Other(text),
    }
}

export!(Component);
