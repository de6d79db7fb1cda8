//! The reference guest as a [`SmartModule`] of the guest SDK, and the
//! conversions between this crate's types and the contract's.

use ksm_guest_sdk as sdk;
use sdk::{
    BulkKeys as SdkBulkKeys, BulkRecords, ConfigureError, FieldFault, KinesisRecord, MessageError,
    ModuleSettings, NotByteArray, PayloadFault, RecordKey, RefusedRecord, SmartModule, TooLarge,
};

use crate::{BulkKeys, BulkSpans, DeviceContext, Error, Forwarder, HomeContext, Record, Settings};

impl SmartModule for Forwarder {
    fn configure(settings: ModuleSettings) -> Result<Self, ConfigureError> {
        let mut forwarder = Forwarder::new();
        forwarder
            .configure(settings_from(settings))
            .map_err(configure_error)?;
        Ok(forwarder)
    }

    fn device_event(&self, event: sdk::DeviceEvent) -> Result<Vec<KinesisRecord>, MessageError> {
        self.handle_device_event(&device_context(event.context), &event.payload)
            .map(records)
            .map_err(message_error)
    }

    fn home_event(&self, event: sdk::HomeEvent) -> Result<Vec<KinesisRecord>, MessageError> {
        self.handle_home_event(&home_context(event.context), &event.payload)
            .map(records)
            .map_err(message_error)
    }

    fn bulk_data(&self, bulk: sdk::BulkData) -> Result<BulkRecords, MessageError> {
        self.handle_bulk_spans(bulk.device_id, &bulk.label, &bulk.payload)
            .map(bulk_records)
            .map_err(message_error)
    }
}

/// The contract's module settings as this crate's.
fn settings_from(settings: ModuleSettings) -> Settings {
    Settings {
        subscribe_events: settings.subscribe_events,
        bulk_data_label: settings.bulk_data_label,
        use_uuid: settings.use_uuid,
        max_record_size: settings.max_record_size,
    }
}

/// The contract's device context as this crate's.
fn device_context(context: sdk::DeviceContext) -> DeviceContext {
    DeviceContext {
        device_id: context.device_id,
        home_id: context.home_id,
        device_class: context.device_class,
        device_ip: context.device_ip,
        received_at: context.received_at,
    }
}

/// The contract's home context as this crate's.
fn home_context(context: sdk::HomeContext) -> HomeContext {
    HomeContext {
        home_id: context.home_id,
        project_key_id: context.project_key_id,
        project_key_name: context.project_key_name,
        received_at: context.received_at,
    }
}

/// Event records as the contract's.
fn records(records: Vec<Record>) -> Vec<KinesisRecord> {
    records
        .into_iter()
        .map(|r| KinesisRecord {
            data: r.data,
            partition_key: r.partition_key,
            explicit_hash_key: None,
        })
        .collect()
}

fn span(span: crate::bulk::Span) -> sdk::Span {
    sdk::Span {
        offset: span.offset,
        len: span.len,
    }
}

fn key(partition_key: String) -> RecordKey {
    RecordKey {
        partition_key,
        explicit_hash_key: None,
    }
}

/// Bulk spans and keys as the contract's bulk records.
fn bulk_records(out: BulkSpans) -> BulkRecords {
    BulkRecords {
        spans: out.spans.into_iter().map(span).collect(),
        keys: match out.keys {
            BulkKeys::Shared(shared) => SdkBulkKeys::Shared(key(shared)),
            BulkKeys::PerRecord(keys) => {
                SdkBulkKeys::PerRecord(keys.into_iter().map(key).collect())
            }
        },
        refused: out
            .rejected
            .into_iter()
            .map(|r| RefusedRecord {
                index: r.index,
                data: span(r.data),
                reason: message_error(r.reason),
            })
            .collect(),
    }
}

/// A settings error as the contract's configure error.
fn configure_error(error: Error) -> ConfigureError {
    match error {
        Error::InvalidSettings { field, detail } => {
            ConfigureError::InvalidSettings(FieldFault { field, detail })
        }
        other => ConfigureError::Other(other.to_string()),
    }
}

/// A message's error as the contract's.
fn message_error(error: Error) -> MessageError {
    match error {
        Error::UnsupportedVersion(found) => MessageError::UnsupportedVersion(found),
        Error::MalformedPayload { offset, detail } => {
            MessageError::MalformedPayload(PayloadFault { offset, detail })
        }
        Error::NotByteArray {
            index,
            offset,
            found,
        } => MessageError::NotByteArray(NotByteArray {
            index,
            offset,
            found,
        }),
        Error::RecordTooLarge { index, size, limit } => {
            MessageError::RecordTooLarge(TooLarge { index, size, limit })
        }
        Error::InvalidEventJson { offset, detail } => {
            MessageError::InvalidEventJson(PayloadFault { offset, detail })
        }
        Error::InvalidField { field, detail } => {
            MessageError::InvalidField(FieldFault { field, detail })
        }
        Error::NotConfigured => MessageError::NotConfigured,
        Error::InvalidSettings { field, detail } => {
            MessageError::Other(format!("module setting `{field}`: {detail}"))
        }
        Error::Other(text) => MessageError::Other(text),
    }
}
