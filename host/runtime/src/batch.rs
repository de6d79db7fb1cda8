//! Messages handed to a guest several at a time, and what each became.
//!
//! A 1.1 guest takes a batch in one call (`batch.handle-batch`); a 1.0 guest
//! is called once per message. Either way the caller gets one answer per
//! message, in order, with the 1.0 types the rest of the host uses: a 1.1
//! guest's answers are turned into them here (its error cases are the 1.0
//! cases; a shared bulk key is given to every record).

use ksm_bindings::GuestError;
use ksm_bindings::types::{BulkOutput, BulkRecord, DeviceContext, HomeContext, KinesisRecord};
use ksm_bindings::v1_1::batch;

/// One message for a guest, borrowing the host's data.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// A device event.
    DeviceEvent {
        /// Where it came from.
        context: &'a DeviceContext,
        /// The raw payload.
        payload: &'a [u8],
        /// What the broker said about it.
        mqtt: Mqtt<'a>,
    },
    /// A home event.
    HomeEvent {
        /// Where it came from.
        context: &'a HomeContext,
        /// The raw payload.
        payload: &'a [u8],
        /// What the broker said about it.
        mqtt: Mqtt<'a>,
    },
    /// A bulk data payload.
    BulkData {
        /// Device that published it.
        device_id: u64,
        /// The topic's label.
        label: &'a str,
        /// The raw payload.
        payload: &'a [u8],
        /// What the broker said about it.
        mqtt: Mqtt<'a>,
    },
}

/// What the broker said about a message: passed to 1.1 guests only.
#[derive(Debug, Clone, Copy)]
pub struct Mqtt<'a> {
    /// The topic.
    pub topic: &'a str,
    /// MQTT 5 content type.
    pub content_type: Option<&'a str>,
    /// MQTT 5 user properties, in order.
    pub user_properties: &'a [(String, String)],
}

impl Input<'_> {
    /// The payload's length, bytes.
    pub fn payload_len(&self) -> usize {
        match self {
            Input::DeviceEvent { payload, .. }
            | Input::HomeEvent { payload, .. }
            | Input::BulkData { payload, .. } => payload.len(),
        }
    }

    /// The message as the 1.1 contract carries it (the payload copied: the
    /// bindings own their lists).
    pub(super) fn to_message(self) -> batch::Message {
        let mqtt = |mqtt: &Mqtt<'_>| {
            Some(batch::MqttDetails {
                topic: mqtt.topic.to_owned(),
                content_type: mqtt.content_type.map(str::to_owned),
                user_properties: mqtt.user_properties.to_vec(),
            })
        };
        match self {
            Input::DeviceEvent {
                context,
                payload,
                mqtt: details,
            } => batch::Message::DeviceEvent(batch::DeviceEvent {
                context: context.clone(),
                payload: payload.to_vec(),
                mqtt: mqtt(&details),
            }),
            Input::HomeEvent {
                context,
                payload,
                mqtt: details,
            } => batch::Message::HomeEvent(batch::HomeEvent {
                context: context.clone(),
                payload: payload.to_vec(),
                mqtt: mqtt(&details),
            }),
            Input::BulkData {
                device_id,
                label,
                payload,
                mqtt: details,
            } => batch::Message::BulkData(batch::BulkData {
                device_id,
                label: label.to_owned(),
                payload: payload.to_vec(),
                mqtt: mqtt(&details),
            }),
        }
    }
}

/// What a guest made of one message.
#[derive(Debug)]
pub enum Answer {
    /// An event's records (none: not subscribed).
    Records(Vec<KinesisRecord>),
    /// A bulk payload's records, as views of the payload.
    Bulk(BulkOutput),
}

/// A 1.1 outcome as the host's answer to the message it belongs to: an
/// event outcome for a bulk payload (or the other way round) is the guest's
/// error, and so is a per-record key list of the wrong length.
pub(super) fn answer(input: &Input<'_>, outcome: batch::Outcome) -> Result<Answer, GuestError> {
    match (input, outcome) {
        (_, batch::Outcome::Refused(error)) => Err(message_error(error)),
        (Input::DeviceEvent { .. } | Input::HomeEvent { .. }, batch::Outcome::Records(records)) => {
            Ok(Answer::Records(records))
        }
        (Input::BulkData { .. }, batch::Outcome::Bulk(bulk)) => bulk_output(bulk).map(Answer::Bulk),
        (Input::BulkData { .. }, batch::Outcome::Records(_)) => Err(GuestError::Other(
            "the guest answered a bulk data payload with event records (outcome `records`, \
             not `bulk`)"
                .to_owned(),
        )),
        (_, batch::Outcome::Bulk(_)) => Err(GuestError::Other(
            "the guest answered an event with bulk records (outcome `bulk`, not `records`)"
                .to_owned(),
        )),
    }
}

fn bulk_output(bulk: batch::BulkRecords) -> Result<BulkOutput, GuestError> {
    let batch::BulkRecords {
        spans,
        keys,
        refused,
    } = bulk;
    let keys: Vec<batch::RecordKey> = match keys {
        batch::BulkKeys::Shared(key) => vec![key; spans.len()],
        batch::BulkKeys::PerRecord(keys) if keys.len() == spans.len() => keys,
        batch::BulkKeys::PerRecord(keys) => {
            return Err(GuestError::Other(format!(
                "the guest gave {} per-record keys for {} bulk records",
                keys.len(),
                spans.len()
            )));
        }
    };
    let records = spans
        .into_iter()
        .zip(keys)
        .map(|(data, key)| BulkRecord {
            data,
            partition_key: key.partition_key,
            explicit_hash_key: key.explicit_hash_key,
        })
        .collect();
    let rejected = refused
        .into_iter()
        .map(|refused| ksm_bindings::types::RejectedRecord {
            index: refused.index,
            data: refused.data,
            reason: message_error(refused.reason),
        })
        .collect();
    Ok(BulkOutput { records, rejected })
}

/// A 1.1 message error as the 1.0 error with the same meaning.
pub(super) fn message_error(error: batch::MessageError) -> GuestError {
    use batch::MessageError as E;
    match error {
        E::UnsupportedVersion(found) => GuestError::UnsupportedVersion(found),
        E::MalformedPayload(fault) => GuestError::MalformedPayload(fault),
        E::NotByteArray(element) => GuestError::NotByteArray(element),
        E::RecordTooLarge(record) => GuestError::RecordTooLarge(record),
        E::InvalidEventJson(fault) => GuestError::InvalidEventJson(fault),
        E::InvalidField(fault) => GuestError::InvalidField(fault),
        E::NotConfigured => GuestError::NotConfigured,
        E::Other(text) => GuestError::Other(text),
    }
}

/// A 1.1 configure error as the 1.0 error with the same meaning.
pub(super) fn configure_error(error: batch::ConfigureError) -> GuestError {
    match error {
        batch::ConfigureError::InvalidSettings(fault) => GuestError::InvalidSettings(fault),
        batch::ConfigureError::Other(text) => GuestError::Other(text),
    }
}
