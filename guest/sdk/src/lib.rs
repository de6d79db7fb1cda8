//! Write a ksm guest in Rust: implement [`SmartModule`], then
//! `ksm_guest_sdk::export!(MyModule);`, and build with
//! `cargo build --release --target wasm32-wasip2`.
//!
//! The component speaks contract 1.1 (`wit/1.1`, world
//! `smart-module-batch`): a ksm host that knows 1.1 hands it batches, one
//! older host calls it one message at a time through the 1.0 functions. The
//! SDK answers both from the one trait, keeps the configured module between
//! calls, answers `not-configured` before the first successful
//! [`SmartModule::configure`], and keeps the previous module when a later
//! configure is refused.
//!
//! ```ignore
//! use ksm_guest_sdk::{DeviceEvent, KinesisRecord, MessageError, ModuleSettings, SmartModule};
//!
//! struct Everything;
//!
//! impl SmartModule for Everything {
//!     fn configure(_: ModuleSettings) -> Result<Self, ksm_guest_sdk::ConfigureError> {
//!         Ok(Everything)
//!     }
//!     fn device_event(&self, event: DeviceEvent) -> Result<Vec<KinesisRecord>, MessageError> {
//!         Ok(vec![KinesisRecord {
//!             partition_key: event.context.device_id.to_string(),
//!             data: event.payload,
//!             explicit_hash_key: None,
//!         }])
//!     }
//! }
//!
//! ksm_guest_sdk::export!(Everything);
//! ```

use std::any::Any;
use std::cell::RefCell;
use std::marker::PhantomData;

/// The generated bindings of `wit/1.1`; their docs come from the WIT files.
#[allow(missing_docs, unsafe_code)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/1.1",
        world: "smart-module-batch",
        pub_export_macro: true,
        default_bindings_module: "ksm_guest_sdk::bindings",
        export_macro_name: "export_bindings",
    });
}

use bindings::exports::ksm::smart_module::{batch, forwarder};
use bindings::ksm::smart_module::types;

pub use batch::{
    BulkData, BulkKeys, BulkRecords, ConfigureError, DeviceEvent, HomeEvent, Message, MessageError,
    MqttDetails, Outcome, RecordKey, RefusedRecord,
};
pub use types::{
    DeviceContext, FieldFault, HomeContext, KinesisRecord, ModuleSettings, NotByteArray,
    PayloadFault, Span, TooLarge,
};

/// A smart module: what a guest does with each kind of message.
///
/// One value lives per component instance, built by [`SmartModule::configure`]
/// from the module's settings; the host may recycle the instance at any time,
/// so keep no state that must outlive it.
pub trait SmartModule: Sized + 'static {
    /// Builds the module from its settings. An error names the setting at
    /// fault (`invalid-settings`), and the host refuses the module.
    fn configure(settings: ModuleSettings) -> Result<Self, ConfigureError>;

    /// A device event: its records (none: not forwarded), or why the
    /// message is refused (it is dead-lettered with that reason).
    fn device_event(&self, event: DeviceEvent) -> Result<Vec<KinesisRecord>, MessageError>;

    /// A home event; by default forwarded as nothing.
    fn home_event(&self, event: HomeEvent) -> Result<Vec<KinesisRecord>, MessageError> {
        let _ = event;
        Ok(Vec::new())
    }

    /// A bulk data payload: where each record lies in it and their keys; by
    /// default nothing.
    fn bulk_data(&self, bulk: BulkData) -> Result<BulkRecords, MessageError> {
        let _ = bulk;
        Ok(BulkRecords {
            spans: Vec::new(),
            keys: BulkKeys::PerRecord(Vec::new()),
            refused: Vec::new(),
        })
    }
}

/// Exports a [`SmartModule`] as the component's contract 1.1 exports (and
/// the 1.0 ones, for older hosts). Once per component.
#[macro_export]
macro_rules! export {
    ($module:ty) => {
        const _: () = {
            type KsmGuest = $crate::Adapter<$module>;
    $crate::bindings::export_bindings!(KsmGuest with_types_in $crate::bindings);
        };
    };
}

/// The exports of a [`SmartModule`]; used by [`export!`].
#[doc(hidden)]
pub struct Adapter<M>(PhantomData<M>);

thread_local! {
    /// The configured module (wasm is single-threaded; the host calls one
    /// export at a time).
    static MODULE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

fn configure<M: SmartModule>(settings: ModuleSettings) -> Result<(), ConfigureError> {
    let module = M::configure(settings)?;
    MODULE.with_borrow_mut(|slot| *slot = Some(Box::new(module)));
    Ok(())
}

/// The configured module in `slot`, if any.
fn configured<M: SmartModule>(slot: &Option<Box<dyn Any>>) -> Option<&M> {
    slot.as_ref().and_then(|module| module.downcast_ref::<M>())
}

fn with_module<M: SmartModule, T>(
    handle: impl FnOnce(&M) -> Result<T, MessageError>,
) -> Result<T, MessageError> {
    MODULE.with_borrow(|slot| match configured::<M>(slot) {
        Some(module) => handle(module),
        None => Err(MessageError::NotConfigured),
    })
}

/// One message, answered by `module`.
fn outcome<M: SmartModule>(module: &M, message: Message) -> Outcome {
    let answer = match message {
        Message::DeviceEvent(event) => module.device_event(event).map(Outcome::Records),
        Message::HomeEvent(event) => module.home_event(event).map(Outcome::Records),
        Message::BulkData(bulk) => module.bulk_data(bulk).map(Outcome::Bulk),
    };
    answer.unwrap_or_else(Outcome::Refused)
}

impl<M: SmartModule> batch::Guest for Adapter<M> {
    fn configure(settings: ModuleSettings) -> Result<(), ConfigureError> {
        configure::<M>(settings)
    }

    fn handle_batch(messages: Vec<Message>) -> Vec<Outcome> {
        MODULE.with_borrow(|slot| match configured::<M>(slot) {
            Some(module) => messages
                .into_iter()
                .map(|message| outcome(module, message))
                .collect(),
            None => messages
                .iter()
                .map(|_| Outcome::Refused(MessageError::NotConfigured))
                .collect(),
        })
    }
}

impl<M: SmartModule> forwarder::Guest for Adapter<M> {
    fn configure(settings: ModuleSettings) -> Result<(), types::Error> {
        configure::<M>(settings).map_err(|error| match error {
            ConfigureError::InvalidSettings(fault) => types::Error::InvalidSettings(fault),
            ConfigureError::Other(text) => types::Error::Other(text),
        })
    }

    fn handle_device_event(
        context: DeviceContext,
        payload: Vec<u8>,
    ) -> Result<Vec<KinesisRecord>, types::Error> {
        let event = DeviceEvent {
            context,
            payload,
            mqtt: None,
        };
        with_module(|module: &M| module.device_event(event)).map_err(error_1_0)
    }

    fn handle_home_event(
        context: HomeContext,
        payload: Vec<u8>,
    ) -> Result<Vec<KinesisRecord>, types::Error> {
        let event = HomeEvent {
            context,
            payload,
            mqtt: None,
        };
        with_module(|module: &M| module.home_event(event)).map_err(error_1_0)
    }

    fn handle_bulk_data(
        device_id: u64,
        label: String,
        payload: Vec<u8>,
    ) -> Result<types::BulkOutput, types::Error> {
        let bulk = BulkData {
            device_id,
            label,
            payload,
            mqtt: None,
        };
        with_module(|module: &M| module.bulk_data(bulk))
            .and_then(bulk_output_1_0)
            .map_err(error_1_0)
    }
}

/// A 1.1 message error as the 1.0 `error`.
fn error_1_0(error: MessageError) -> types::Error {
    match error {
        MessageError::UnsupportedVersion(found) => types::Error::UnsupportedVersion(found),
        MessageError::MalformedPayload(fault) => types::Error::MalformedPayload(fault),
        MessageError::NotByteArray(element) => types::Error::NotByteArray(element),
        MessageError::RecordTooLarge(record) => types::Error::RecordTooLarge(record),
        MessageError::InvalidEventJson(fault) => types::Error::InvalidEventJson(fault),
        MessageError::InvalidField(fault) => types::Error::InvalidField(fault),
        MessageError::NotConfigured => types::Error::NotConfigured,
        MessageError::Other(text) => types::Error::Other(text),
    }
}

/// 1.1 bulk records as the 1.0 `bulk-output` (one key per record).
fn bulk_output_1_0(records: BulkRecords) -> Result<types::BulkOutput, MessageError> {
    let keys: Vec<RecordKey> = match records.keys {
        BulkKeys::Shared(key) => vec![key; records.spans.len()],
        BulkKeys::PerRecord(keys) if keys.len() == records.spans.len() => keys,
        BulkKeys::PerRecord(keys) => {
            return Err(MessageError::Other(format!(
                "the guest gave {} keys for {} records",
                keys.len(),
                records.spans.len()
            )));
        }
    };
    Ok(types::BulkOutput {
        records: records
            .spans
            .into_iter()
            .zip(keys)
            .map(|(data, key)| types::BulkRecord {
                data,
                partition_key: key.partition_key,
                explicit_hash_key: key.explicit_hash_key,
            })
            .collect(),
        rejected: records
            .refused
            .into_iter()
            .map(|refused| types::RejectedRecord {
                index: refused.index,
                data: refused.data,
                reason: error_1_0(refused.reason),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use batch::Guest as _;
    use forwarder::Guest as _;

    /// Forwards a device event's payload under the subscribed event type's
    /// name; refuses settings without a subscription; bulk: one record per
    /// byte, keys shared.
    struct Echo {
        key: String,
    }

    impl SmartModule for Echo {
        fn configure(settings: ModuleSettings) -> Result<Self, ConfigureError> {
            match settings.subscribe_events.first() {
                Some(key) => Ok(Echo { key: key.clone() }),
                None => Err(ConfigureError::InvalidSettings(FieldFault {
                    field: "subscribe-events".into(),
                    detail: "empty".into(),
                })),
            }
        }

        fn device_event(&self, event: DeviceEvent) -> Result<Vec<KinesisRecord>, MessageError> {
            if event.payload.is_empty() {
                return Err(MessageError::Other("empty".into()));
            }
            Ok(vec![KinesisRecord {
                data: event.payload,
                partition_key: self.key.clone(),
                explicit_hash_key: None,
            }])
        }

        fn bulk_data(&self, bulk: BulkData) -> Result<BulkRecords, MessageError> {
            Ok(BulkRecords {
                spans: (0..bulk.payload.len() as u32)
                    .map(|offset| Span { offset, len: 1 })
                    .collect(),
                keys: BulkKeys::Shared(RecordKey {
                    partition_key: bulk.label,
                    explicit_hash_key: None,
                }),
                refused: Vec::new(),
            })
        }
    }

    type Exports = Adapter<Echo>;

    fn settings(subscribe: &[&str]) -> ModuleSettings {
        ModuleSettings {
            subscribe_events: subscribe.iter().map(|s| s.to_string()).collect(),
            bulk_data_label: None,
            use_uuid: false,
            max_record_size: 1024,
        }
    }

    fn event(payload: &[u8]) -> Message {
        Message::DeviceEvent(DeviceEvent {
            context: DeviceContext {
                device_id: 1,
                home_id: None,
                device_class: None,
                device_ip: None,
                received_at: "2026-01-01T00:00:00Z".into(),
            },
            payload: payload.to_vec(),
            mqtt: None,
        })
    }

    fn keys(outcomes: &[Outcome]) -> Vec<String> {
        outcomes
            .iter()
            .map(|outcome| match outcome {
                Outcome::Records(records) => records[0].partition_key.clone(),
                Outcome::Refused(MessageError::NotConfigured) => "not-configured".into(),
                Outcome::Refused(other) => format!("refused: {other:?}"),
                Outcome::Bulk(_) => "bulk".into(),
            })
            .collect()
    }

    // One test: the module lives in a thread-local, and each test thread
    // starts unconfigured.
    #[test]
    fn configure_then_batches_and_the_1_0_calls() {
        let outcomes = Exports::handle_batch(vec![event(b"a"), event(b"b")]);
        assert_eq!(keys(&outcomes), ["not-configured", "not-configured"]);
        assert!(matches!(
            <Exports as forwarder::Guest>::configure(settings(&[])),
            Err(types::Error::InvalidSettings(_))
        ));

        <Exports as batch::Guest>::configure(settings(&["first"])).unwrap();
        let outcomes = Exports::handle_batch(vec![event(b"a"), event(b""), event(b"c")]);
        assert_eq!(
            keys(&outcomes),
            ["first", "refused: MessageError::Other(\"empty\")", "first"]
        );

        // A refused configure keeps the module; an accepted one replaces it.
        assert!(<Exports as batch::Guest>::configure(settings(&[])).is_err());
        assert_eq!(keys(&Exports::handle_batch(vec![event(b"a")])), ["first"]);
        <Exports as batch::Guest>::configure(settings(&["second"])).unwrap();
        assert_eq!(keys(&Exports::handle_batch(vec![event(b"a")])), ["second"]);

        // The 1.0 calls: the same module, errors and bulk keys in 1.0 form.
        let context = match event(b"") {
            Message::DeviceEvent(e) => e.context,
            _ => unreachable!(),
        };
        let records = Exports::handle_device_event(context.clone(), b"x".to_vec()).unwrap();
        assert_eq!(records[0].partition_key, "second");
        assert!(matches!(
            Exports::handle_device_event(context, Vec::new()),
            Err(types::Error::Other(text)) if text == "empty"
        ));
        let bulk = Exports::handle_bulk_data(7, "label".into(), b"xyz".to_vec()).unwrap();
        let keys: Vec<_> = bulk
            .records
            .iter()
            .map(|r| (r.data.offset, r.partition_key.as_str()))
            .collect();
        assert_eq!(keys, [(0, "label"), (1, "label"), (2, "label")]);
        // Home events are nothing by default.
        let home = HomeContext {
            home_id: 1,
            project_key_id: None,
            project_key_name: None,
            received_at: String::new(),
        };
        assert!(
            Exports::handle_home_event(home, b"{}".to_vec())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn per_record_keys_must_match_the_records() {
        let records = |keys: usize| BulkRecords {
            spans: vec![Span { offset: 0, len: 1 }; 2],
            keys: BulkKeys::PerRecord(
                (0..keys)
                    .map(|i| RecordKey {
                        partition_key: i.to_string(),
                        explicit_hash_key: Some(format!("{i}0")),
                    })
                    .collect(),
            ),
            refused: vec![RefusedRecord {
                index: 2,
                data: Span { offset: 1, len: 9 },
                reason: MessageError::RecordTooLarge(TooLarge {
                    index: 2,
                    size: 9,
                    limit: 8,
                }),
            }],
        };
        let out = bulk_output_1_0(records(2)).unwrap();
        assert_eq!(out.records[1].partition_key, "1");
        assert_eq!(out.records[1].explicit_hash_key.as_deref(), Some("10"));
        assert!(matches!(
            out.rejected[0].reason,
            types::Error::RecordTooLarge(TooLarge { size: 9, .. })
        ));
        assert!(matches!(
            bulk_output_1_0(records(1)),
            Err(MessageError::Other(text)) if text == "the guest gave 1 keys for 2 records"
        ));
    }
}
