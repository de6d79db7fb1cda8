//! An example ksm guest on the guest SDK: a module that forwards a device
//! event only when its `eventData.battery` is a number below [`THRESHOLD`],
//! say to a maintenance team's stream beside the module that forwards
//! everything. Home events and bulk data are not forwarded.
//!
//! Its record is its own, not the MODE Event: `{"deviceId":…,"eventType":…,
//! "battery":…,"receivedAt":…}`, partition key the device ID. The module's
//! `subscribe_events` applies as usual; `use_uuid` is refused.

use ksm_guest_sdk::{
    ConfigureError, DeviceEvent, FieldFault, KinesisRecord, MessageError, ModuleSettings,
    PayloadFault, SmartModule, TooLarge,
};
use serde::{Deserialize, Serialize};

/// Events whose battery level is below this are forwarded.
pub const THRESHOLD: f64 = 20.0;

/// The module, as configured.
pub struct LowBattery {
    subscribe_events: Vec<String>,
    max_record_size: u32,
}

/// The parts of an event payload the module reads.
#[derive(Deserialize)]
struct Event<'a> {
    #[serde(rename = "eventType", borrow)]
    event_type: &'a str,
    #[serde(rename = "eventData")]
    event_data: Data,
}

#[derive(Deserialize)]
struct Data {
    battery: Option<serde_json::Value>,
}

/// The record the module writes.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Record<'a> {
    device_id: u64,
    event_type: &'a str,
    battery: f64,
    received_at: &'a str,
}

impl SmartModule for LowBattery {
    fn configure(settings: ModuleSettings) -> Result<Self, ConfigureError> {
        if settings.use_uuid {
            return Err(ConfigureError::InvalidSettings(FieldFault {
                field: "use-uuid".into(),
                detail: "this module keys records by device ID only".into(),
            }));
        }
        Ok(LowBattery {
            subscribe_events: settings.subscribe_events,
            max_record_size: settings.max_record_size,
        })
    }

    fn device_event(&self, message: DeviceEvent) -> Result<Vec<KinesisRecord>, MessageError> {
        let event: Event = serde_json::from_slice(&message.payload).map_err(|e| {
            MessageError::InvalidEventJson(PayloadFault {
                offset: error_offset(&message.payload, &e),
                detail: e.to_string(),
            })
        })?;
        let subscribed = self
            .subscribe_events
            .iter()
            .any(|s| s == "*" || s == event.event_type);
        let battery = event.event_data.battery.and_then(|b| b.as_f64());
        let Some(battery) = battery.filter(|level| subscribed && *level < THRESHOLD) else {
            return Ok(Vec::new());
        };
        let device_id = message.context.device_id;
        let data = serde_json::to_vec(&Record {
            device_id,
            event_type: event.event_type,
            battery,
            received_at: &message.context.received_at,
        })
        .map_err(|e| MessageError::Other(format!("cannot write the record: {e}")))?;
        let partition_key = device_id.to_string();
        let size = data.len() + partition_key.len();
        if size > self.max_record_size as usize {
            return Err(MessageError::RecordTooLarge(TooLarge {
                index: 0,
                size: size as u64,
                limit: self.max_record_size.into(),
            }));
        }
        Ok(vec![KinesisRecord {
            data,
            partition_key,
            explicit_hash_key: None,
        }])
    }
}

/// The byte offset of a JSON error: the payload's length when it ends
/// early, else where serde_json's line and column point.
fn error_offset(payload: &[u8], e: &serde_json::Error) -> u64 {
    if e.is_eof() {
        return payload.len() as u64;
    }
    let line_start: usize = payload
        .split_inclusive(|b| *b == b'\n')
        .take(e.line().saturating_sub(1))
        .map(<[u8]>::len)
        .sum();
    (line_start + e.column().saturating_sub(1)) as u64
}

#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
mod component {
    ksm_guest_sdk::export!(crate::LowBattery);
}
