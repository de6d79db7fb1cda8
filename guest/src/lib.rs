//! The reference ksm guest: MODE "smart module" semantics for Kinesis as a
//! WebAssembly component (contract 1.1, `ksm:smart-module@1.1.0`, world
//! `smart-module-batch`, built on the guest SDK `ksm-guest-sdk`).
//!
//! It decides which device and home events are forwarded, turns them into
//! MODE Event JSON, unpacks MessagePack bulk data payloads into records
//! (as spans of the host's payload, without copying) and picks partition
//! keys. The host does all I/O.
//!
//! # Layout
//! - [`settings`]: module settings, their validation, subscription matching;
//! - [`event`]: event payload checks and the MODE Event JSON;
//! - [`bulk`]: MessagePack bulk payload unpacking into spans;
//! - [`partition`]: partition-key choice (ID or UUIDv4);
//! - [`timestamp`]: strict RFC 3339 check;
//! - [`error`]: the error type, mirroring the WIT `error` variant;
//! - [`Forwarder`] (here): one module instance, tying the above together;
//! - `sdk`: [`Forwarder`] as the SDK's `SmartModule`, and conversions
//!   between this crate's types and the contract's;
//! - `component` (wasm32 only): the export.
//!
//! All of it is plain Rust, unit-tested natively with `cargo test -p ksm-guest`.

pub mod bulk;
pub mod error;
pub mod event;
mod json;
pub mod partition;
pub mod settings;
pub mod timestamp;

// The SDK's `export!` expands to `unsafe` glue; our own code has none.
#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
mod component;
mod sdk;

pub use error::Error;
pub use event::{DeviceContext, HomeContext};
pub use settings::Settings;

use bulk::Span;
use event::{Origin, Payload};
use partition::partition_key;

/// One Kinesis record built from an event (the WIT `kinesis-record`; the
/// explicit hash key is always `none`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Record data: the MODE Event as JSON.
    pub data: Vec<u8>,
    /// Partition key.
    pub partition_key: String,
}

/// One bulk data record: where its data lies in the payload, and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkRecord {
    /// The record's bytes within the payload.
    pub data: Span,
    /// Partition key.
    pub partition_key: String,
}

/// A bulk record refused on its own (for now only for its size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Position of the record among the payload's records, from 0.
    pub index: u32,
    /// Where the refused record's data lies in the payload.
    pub data: Span,
    /// Why it was refused.
    pub reason: Error,
}

/// What a bulk payload turned into (the WIT `bulk-output`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BulkOutput {
    /// Records to put, in payload order.
    pub records: Vec<BulkRecord>,
    /// Records refused one by one.
    pub rejected: Vec<Rejected>,
}

/// One smart-module instance: its settings and the three handlers.
///
/// Handlers called before a successful [`Forwarder::configure`] fail with
/// [`Error::NotConfigured`].
#[derive(Debug, Default)]
pub struct Forwarder {
    settings: Option<Settings>,
}

impl Forwarder {
    /// An instance with no settings yet.
    pub const fn new() -> Self {
        Forwarder { settings: None }
    }

    /// Validates and keeps `settings`, replacing earlier ones. Settings that
    /// fail validation are refused and the earlier ones (if any) stay.
    pub fn configure(&mut self, settings: Settings) -> Result<(), Error> {
        settings.validate()?;
        self.settings = Some(settings);
        Ok(())
    }

    fn settings(&self) -> Result<&Settings, Error> {
        self.settings.as_ref().ok_or(Error::NotConfigured)
    }

    /// Turns a device event into zero or one record; the partition key is
    /// the device ID (or a UUID). See [`event`] for the order of checks.
    pub fn handle_device_event(
        &self,
        context: &DeviceContext,
        payload: &[u8],
    ) -> Result<Vec<Record>, Error> {
        self.handle_event(Origin::Device(context), context.device_id, payload)
    }

    /// Turns a home event into zero or one record; the partition key is the
    /// home ID (or a UUID). See [`event`] for the order of checks.
    pub fn handle_home_event(
        &self,
        context: &HomeContext,
        payload: &[u8],
    ) -> Result<Vec<Record>, Error> {
        self.handle_event(Origin::Home(context), context.home_id, payload)
    }

    fn handle_event(
        &self,
        origin: Origin<'_>,
        id: u64,
        payload: &[u8],
    ) -> Result<Vec<Record>, Error> {
        let settings = self.settings()?;
        let payload = Payload::parse(payload)?;
        if !settings.subscribes_to(payload.event_type()) {
            return Ok(Vec::new());
        }
        let data = payload.into_mode_event(origin)?;
        let partition_key = partition_key(settings.use_uuid, id);
        check_size(0, data.len(), &partition_key, settings.max_record_size)?;
        Ok(vec![Record {
            data,
            partition_key,
        }])
    }

    /// Unpacks a bulk payload published under `label` by `device_id`.
    ///
    /// A label other than the module's gives an empty output without reading
    /// the payload. A malformed payload fails whole (see [`bulk::unpack`]);
    /// a record over `max-record-size` goes to `rejected` and the others
    /// still go. Partition key: the device ID (or a UUID per record).
    pub fn handle_bulk_data(
        &self,
        device_id: u64,
        label: &str,
        payload: &[u8],
    ) -> Result<BulkOutput, Error> {
        self.handle_bulk_spans(device_id, label, payload)
            .map(BulkSpans::into_output)
    }

    /// [`Forwarder::handle_bulk_data`] with the records' keys apart from
    /// their spans: one shared device key, or a UUID per record.
    pub fn handle_bulk_spans(
        &self,
        device_id: u64,
        label: &str,
        payload: &[u8],
    ) -> Result<BulkSpans, Error> {
        let settings = self.settings()?;
        let mut out = BulkSpans {
            spans: Vec::new(),
            keys: BulkKeys::PerRecord(Vec::new()),
            rejected: Vec::new(),
        };
        if !settings.forwards_label(label) {
            return Ok(out);
        }
        // Every record of a payload has the same device key: made once.
        let shared = (!settings.use_uuid).then(|| partition_key(false, device_id));
        let mut per_record = Vec::new();
        for (index, span) in (0u32..).zip(bulk::unpack(payload)?) {
            let uuid = shared.is_none().then(|| partition_key(true, device_id));
            let key = shared.as_deref().or(uuid.as_deref()).unwrap_or_default();
            match check_size(index, span.len as usize, key, settings.max_record_size) {
                Ok(()) => {
                    out.spans.push(span);
                    per_record.extend(uuid);
                }
                Err(reason) => out.rejected.push(Rejected {
                    index,
                    data: span,
                    reason,
                }),
            }
        }
        out.keys = match shared {
            Some(key) => BulkKeys::Shared(key),
            None => BulkKeys::PerRecord(per_record),
        };
        Ok(out)
    }
}

/// The keys of a bulk payload's records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BulkKeys {
    /// Every record has this key (the device ID).
    Shared(String),
    /// One key per record, in record order (UUIDs).
    PerRecord(Vec<String>),
}

/// What a bulk payload turned into, with the keys apart from the spans (the
/// 1.1 WIT `bulk-records`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkSpans {
    /// Where each record lies in the payload, in payload order.
    pub spans: Vec<Span>,
    /// The records' keys.
    pub keys: BulkKeys,
    /// Records refused one by one.
    pub rejected: Vec<Rejected>,
}

impl BulkSpans {
    /// One key per record, as the 1.0 `bulk-output` carries them.
    pub fn into_output(self) -> BulkOutput {
        let keys: Box<dyn Iterator<Item = String>> = match self.keys {
            BulkKeys::Shared(key) => Box::new(std::iter::repeat(key)),
            BulkKeys::PerRecord(keys) => Box::new(keys.into_iter()),
        };
        BulkOutput {
            records: self
                .spans
                .into_iter()
                .zip(keys)
                .map(|(data, partition_key)| BulkRecord {
                    data,
                    partition_key,
                })
                .collect(),
            rejected: self.rejected,
        }
    }
}

/// Kinesis counts the partition key in a record's size: refuses a record of
/// `data_len` bytes with `key` over `limit`.
fn check_size(index: u32, data_len: usize, key: &str, limit: u32) -> Result<(), Error> {
    let size = data_len as u64 + key.len() as u64;
    if size > u64::from(limit) {
        return Err(Error::RecordTooLarge {
            index,
            size,
            limit: u64::from(limit),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarder(events: &[&str], use_uuid: bool, max: u32) -> Forwarder {
        let mut f = Forwarder::new();
        f.configure(Settings {
            subscribe_events: events.iter().map(|s| (*s).to_owned()).collect(),
            bulk_data_label: Some("data".into()),
            use_uuid,
            max_record_size: max,
        })
        .unwrap();
        f
    }

    fn device() -> DeviceContext {
        DeviceContext {
            device_id: 1001,
            home_id: Some(7),
            received_at: "2026-01-02T03:04:05Z".into(),
            ..DeviceContext::default()
        }
    }

    fn home() -> HomeContext {
        HomeContext {
            home_id: 42,
            received_at: "2026-01-02T03:04:05Z".into(),
            ..HomeContext::default()
        }
    }

    fn bulk(records: &[&[u8]]) -> Vec<u8> {
        let mut buf = Vec::new();
        rmp::encode::write_str(&mut buf, "1.0").unwrap();
        for r in records {
            rmp::encode::write_bin(&mut buf, r).unwrap();
        }
        buf
    }

    const EVENT: &[u8] = br#"{"eventType":"temp","eventData":{"c":21}}"#;

    #[test]
    fn handlers_before_configure_fail() {
        let f = Forwarder::new();
        assert_eq!(
            f.handle_device_event(&device(), EVENT),
            Err(Error::NotConfigured)
        );
        assert_eq!(
            f.handle_home_event(&home(), EVENT),
            Err(Error::NotConfigured)
        );
        assert_eq!(
            f.handle_bulk_data(1, "data", b""),
            Err(Error::NotConfigured)
        );
    }

    #[test]
    fn refused_settings_keep_the_earlier_ones() {
        let mut f = forwarder(&["temp"], false, 1000);
        let bad = Settings {
            subscribe_events: vec![],
            bulk_data_label: None,
            use_uuid: false,
            max_record_size: 0,
        };
        assert!(matches!(
            f.configure(bad.clone()),
            Err(Error::InvalidSettings { .. })
        ));
        assert_eq!(f.handle_device_event(&device(), EVENT).unwrap().len(), 1);
        assert_eq!(Forwarder::new().configure(bad).map_err(|_| ()), Err(()));
    }

    #[test]
    fn later_configure_replaces_settings() {
        let mut f = forwarder(&["temp"], false, 1000);
        f.configure(Settings {
            subscribe_events: vec!["other".into()],
            bulk_data_label: None,
            use_uuid: false,
            max_record_size: 1000,
        })
        .unwrap();
        assert_eq!(f.handle_device_event(&device(), EVENT), Ok(vec![]));
    }

    #[test]
    fn event_keys() {
        let f = forwarder(&["*"], false, 1000);
        assert_eq!(
            f.handle_device_event(&device(), EVENT).unwrap()[0].partition_key,
            "1001"
        );
        assert_eq!(
            f.handle_home_event(&home(), EVENT).unwrap()[0].partition_key,
            "42"
        );
        let f = forwarder(&["*"], true, 1000);
        let a = &f.handle_device_event(&device(), EVENT).unwrap()[0].partition_key;
        let b = &f.handle_home_event(&home(), EVENT).unwrap()[0].partition_key;
        assert_eq!((a.len(), b.len()), (36, 36));
        assert_ne!(a, b);
    }

    #[test]
    fn unsubscribed_events_are_dropped_but_malformed_ones_fail() {
        let f = forwarder(&["humidity"], false, 1000);
        assert_eq!(f.handle_device_event(&device(), EVENT), Ok(vec![]));
        // Unsubscribed: eventData is not even checked.
        assert_eq!(
            f.handle_device_event(&device(), br#"{"eventType":"x"}"#),
            Ok(vec![])
        );
        assert!(matches!(
            f.handle_device_event(&device(), b"[]"),
            Err(Error::InvalidEventJson { .. })
        ));
        assert!(matches!(
            f.handle_home_event(&home(), br#"{"eventData":{}}"#),
            Err(Error::InvalidField { .. })
        ));
        let none = forwarder(&[], false, 1000);
        assert_eq!(none.handle_device_event(&device(), EVENT), Ok(vec![]));
    }

    #[test]
    fn event_size_limit_counts_the_key() {
        let f = forwarder(&["*"], false, 1000);
        let len = f.handle_device_event(&device(), EVENT).unwrap()[0]
            .data
            .len();
        let at = u32::try_from(len + 4).unwrap();
        assert!(
            forwarder(&["*"], false, at)
                .handle_device_event(&device(), EVENT)
                .is_ok()
        );
        assert_eq!(
            forwarder(&["*"], false, at - 1).handle_device_event(&device(), EVENT),
            Err(Error::RecordTooLarge {
                index: 0,
                size: u64::from(at),
                limit: u64::from(at - 1)
            })
        );
    }

    #[test]
    fn bulk_label_filter_skips_parsing() {
        let f = forwarder(&[], false, 1000);
        assert_eq!(
            f.handle_bulk_data(1, "other", b"\xc1garbage"),
            Ok(BulkOutput::default())
        );
        assert_eq!(
            f.handle_bulk_data(1, "Data", b""),
            Ok(BulkOutput::default())
        );
        assert!(f.handle_bulk_data(1, "data", b"").is_err());
    }

    #[test]
    fn bulk_records_and_rejections() {
        // Key "1001" is 4 bytes: limit 10 fits 6 data bytes.
        let f = forwarder(&[], false, 10);
        let p = bulk(&[b"aaaaaa", b"bbbbbbb", b"", b"cccccc"]);
        let out = f.handle_bulk_data(1001, "data", &p).unwrap();
        assert_eq!(
            out.records,
            vec![
                BulkRecord {
                    data: Span { offset: 6, len: 6 },
                    partition_key: "1001".into()
                },
                BulkRecord {
                    data: Span { offset: 23, len: 0 },
                    partition_key: "1001".into()
                },
                BulkRecord {
                    data: Span { offset: 25, len: 6 },
                    partition_key: "1001".into()
                },
            ]
        );
        assert_eq!(
            out.rejected,
            vec![Rejected {
                index: 1,
                data: Span { offset: 14, len: 7 },
                reason: Error::RecordTooLarge {
                    index: 1,
                    size: 11,
                    limit: 10
                }
            }]
        );
    }

    #[test]
    fn bulk_uuid_keys_are_fresh_per_record() {
        let f = forwarder(&[], true, 1000);
        let out = f
            .handle_bulk_data(1, "data", &bulk(&[b"a", b"b", b"c"]))
            .unwrap();
        let keys: std::collections::HashSet<_> = out
            .records
            .iter()
            .map(|r| r.partition_key.clone())
            .collect();
        assert_eq!(keys.len(), 3);
    }

    #[test]
    fn bulk_errors_fail_whole() {
        let f = forwarder(&[], false, 1000);
        let mut p = bulk(&[b"a"]);
        p.push(0xc0);
        assert!(matches!(
            f.handle_bulk_data(1, "data", &p),
            Err(Error::NotByteArray { index: 1, .. })
        ));
    }
}
