//! The WebAssembly component glue: `wit_bindgen` bindings for the
//! `smart-module` world, and conversions between WIT and native types.
//! One [`Forwarder`] per instance lives in a thread-local (wasm is
//! single-threaded; the host calls one handler at a time).

use std::cell::RefCell;

use crate::{BulkOutput, DeviceContext, Error, Forwarder, HomeContext, Record, Settings};

wit_bindgen::generate!({ path: "../wit", world: "smart-module" });

use exports::ksm::smart_module::forwarder::Guest;
use ksm::smart_module::types as wit;

thread_local! {
    static FORWARDER: RefCell<Forwarder> = const { RefCell::new(Forwarder::new()) };
}

/// The exported component.
struct Component;

impl Guest for Component {
    fn configure(settings: wit::ModuleSettings) -> Result<(), wit::Error> {
        let settings = Settings {
            subscribe_events: settings.subscribe_events,
            bulk_data_label: settings.bulk_data_label,
            use_uuid: settings.use_uuid,
            max_record_size: settings.max_record_size,
        };
        FORWARDER
            .with_borrow_mut(|f| f.configure(settings))
            .map_err(to_wit)
    }

    fn handle_device_event(
        context: wit::DeviceContext,
        payload: Vec<u8>,
    ) -> Result<Vec<wit::KinesisRecord>, wit::Error> {
        let context = DeviceContext {
            device_id: context.device_id,
            home_id: context.home_id,
            device_class: context.device_class,
            device_ip: context.device_ip,
            received_at: context.received_at,
        };
        FORWARDER
            .with_borrow(|f| f.handle_device_event(&context, &payload))
            .map(records_to_wit)
            .map_err(to_wit)
    }

    fn handle_home_event(
        context: wit::HomeContext,
        payload: Vec<u8>,
    ) -> Result<Vec<wit::KinesisRecord>, wit::Error> {
        let context = HomeContext {
            home_id: context.home_id,
            project_key_id: context.project_key_id,
            project_key_name: context.project_key_name,
            received_at: context.received_at,
        };
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
                data: wit::Span {
                    offset: r.data.offset,
                    len: r.data.len,
                },
                partition_key: r.partition_key,
                explicit_hash_key: None,
            })
            .collect(),
        rejected: out
            .rejected
            .into_iter()
            .map(|r| wit::RejectedRecord {
                index: r.index,
                data: wit::Span {
                    offset: r.data.offset,
                    len: r.data.len,
                },
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
