//! Sources: where device data comes from, and the messages they hand on.

pub mod mqtt;
pub mod topic;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use time::OffsetDateTime;

use crate::module::Module;
use crate::pipeline::ack::Settlement;
use crate::pipeline::inflight::Charge;
pub use topic::{SUBSCRIPTIONS, Topic};

/// One inbound message, on its way to every module.
pub struct Message {
    /// The MQTT topic it arrived on.
    pub topic: Arc<str>,
    /// What the topic says the message is, or why it cannot be used.
    pub kind: Result<Topic, String>,
    /// The payload, untouched.
    pub payload: Bytes,
    /// When ksm received it.
    pub received_at: OffsetDateTime,
    /// Released when everything the message produced is safe.
    pub settlement: Settlement,
    /// Set when a dead letter is replayed: only this module sees it.
    pub replay: Option<Replay>,
    /// What it holds of the in-flight budget until it is committed.
    pub charge: Charge,
    /// The MQTT 5 properties guests may route on (1.1 guests see them).
    pub properties: Properties,
}

/// The MQTT 5 properties of a message that guests see.
#[derive(Debug, Clone, Default)]
pub struct Properties {
    /// The publisher's content type.
    pub content_type: Option<String>,
    /// User properties, in the order they came.
    pub user_properties: Vec<(String, String)>,
}

/// A dead letter sent through one module again.
#[derive(Debug, Clone)]
pub struct Replay {
    /// The module.
    pub module: Arc<Module>,
    /// For a record Kinesis refused: its keys. The record is spooled as it is,
    /// without the guest. `None`: the payload goes through the guest.
    pub record: Option<ReplayRecord>,
}

/// The keys of a replayed record.
#[derive(Debug, Clone)]
pub struct ReplayRecord {
    /// Partition key.
    pub partition_key: String,
    /// Explicit hash key.
    pub explicit_hash_key: Option<String>,
}

/// Whether the source is connected and subscribed (the host is ready when
/// it is), how often its connection failed, and what it has yet to
/// acknowledge.
#[derive(Debug, Default)]
pub struct SourceStatus {
    connected: AtomicBool,
    subscribed: AtomicBool,
    connection_failures: AtomicU64,
    unacknowledged: AtomicU64,
}

impl SourceStatus {
    /// Records a new connection, and whether its subscriptions are in place
    /// already (a resumed session keeps them).
    pub fn connected(&self, subscribed: bool) {
        self.connected.store(true, Ordering::Release);
        self.subscribed.store(subscribed, Ordering::Release);
    }

    /// Records that the broker granted the subscriptions.
    pub fn subscribed(&self) {
        self.subscribed.store(true, Ordering::Release);
    }

    /// Records a failed or lost connection.
    pub fn disconnected(&self) {
        self.connected.store(false, Ordering::Release);
        self.connection_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Failed or lost connections since start.
    pub fn connection_failures(&self) -> u64 {
        self.connection_failures.load(Ordering::Relaxed)
    }

    /// Records a QoS 1 message received, to be acknowledged.
    pub fn to_acknowledge(&self) {
        self.unacknowledged.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a message acknowledged.
    pub fn acknowledged(&self) {
        self.unacknowledged.fetch_sub(1, Ordering::Relaxed);
    }

    /// QoS 1 messages received and not yet acknowledged.
    pub fn unacknowledged(&self) -> u64 {
        self.unacknowledged.load(Ordering::Relaxed)
    }

    /// Connected, and messages on every MODE topic reach ksm.
    pub fn is_ready(&self) -> bool {
        self.connected.load(Ordering::Acquire) && self.subscribed.load(Ordering::Acquire)
    }

    /// Connected to the broker.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }
}
