//! The guest stage, natively and in the sandbox: the reference guest's logic
//! called as a plain Rust library (the `ksm-guest` crate) and through its
//! WebAssembly component on the host's wasmtime runtime, one message per
//! call, so that what the sandbox costs shows on its own.
//!
//! Cases (one criterion group each, with the functions `native` and `wasm`):
//! - `event_subscribed`: a device event the module subscribes to, keyed by
//!   the device ID, whose record (MODE Event JSON) is 200 bytes;
//! - `event_dropped`: the same event, for a module subscribed to other types
//!   (no record: its figures are per message);
//! - `event_uuid`: as `event_subscribed`, keyed by a fresh UUIDv4;
//! - `bulk_10x100B`, `bulk_100x100B`: MessagePack bulk payloads of 10 and 100
//!   records of 100 bytes, keyed by the device ID;
//! - `call_floor`: the 10-record bulk payload under a label the module does
//!   not forward, so the guest answers at once without reading it: what any
//!   call costs (natively next to nothing; in wasm, copying the arguments in,
//!   entering and leaving the instance, lifting the empty answer). Per message.
//!
//! Those cases call the component's 1.0 functions, one message per call.
//! The batch cases call it as the host's router does a 1.1 guest
//! (`Guest::handle`, the messages copied into the call as the host copies
//! them), against the native guest looping over the same messages:
//! - `batch_events_N`: N subscribed device events (as `event_subscribed`);
//! - `batch_bulk100_N`: N bulk payloads of 100 records of 100 bytes;
//! - `batch_floor_N`: N of `call_floor`'s messages: the crossing per message
//!   in a batch (per message);
//!
//! for N = 1, 16, 64 and 256.
//!
//! Throughput is in records (criterion prints elements/s): a figure is per
//! call divided by the records one call yields.
//!
//! Before anything is timed, each case runs once both ways and must give the
//! same answer (record count, data bytes and spans, keys; UUID keys only by
//! their shape), else the bench panics rather than time a broken path.
//!
//! After criterion's report, a table compares the two per record, from the
//! means in the `estimates.json` files this run wrote. In test mode (`cargo bench -- --test`,
//! `cargo test --benches`) criterion writes none and no table is printed.
//!
//! ```text
//! cargo bench -p ksm-tests --bench guest_stage [-- FILTER] [criterion flags]
//! ```

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use criterion::{Criterion, Throughput};
use ksm_conformance::is_uuid_v4;
use ksm_guest::Forwarder;
use ksm_host::bindings::types as wit;
use ksm_host::runtime::{
    Answer as GuestAnswer, Contract, Guest, Input as GuestInput, Mqtt, Runtime,
};
use ksm_tests::artifacts;

/// The device every message comes from.
const DEVICE_ID: u64 = 1001;
/// The bulk data label the modules forward.
const LABEL: &str = "telemetry";
/// A bulk data label no module forwards: the guest answers without reading
/// the payload.
const OTHER_LABEL: &str = "diagnostics";
/// The modules' `max-record-size`: the Kinesis limit, 1 MiB.
const MAX_RECORD_SIZE: u32 = 1024 * 1024;
/// Size of the record a subscribed device event turns into.
const EVENT_RECORD_BYTES: usize = 200;
/// Size of each bulk data record.
const BULK_RECORD_BYTES: usize = 100;
/// Default warm-up per function (`--warm-up-time` overrides it).
const WARM_UP: Duration = Duration::from_secs(1);
/// Default measurement per function (`--measurement-time` overrides it).
const MEASUREMENT: Duration = Duration::from_secs(3);

/// What one call hands the guest.
enum Input {
    /// A device event payload (JSON).
    Event(Vec<u8>),
    /// A bulk data payload (MessagePack) published under a label.
    Bulk {
        /// The label from the topic.
        label: &'static str,
        /// The payload.
        payload: Vec<u8>,
    },
}

/// One benchmarked case: a module's settings and the message it gets.
struct Case {
    /// Criterion group name, and its directory under `target/criterion`.
    name: &'static str,
    /// Event types the module subscribes to.
    subscribe: &'static [&'static str],
    /// Whether keys are UUIDs.
    use_uuid: bool,
    /// The message.
    input: Input,
    /// Records one call yields.
    records: u64,
}

impl Case {
    /// Elements per call for criterion and the table: the records, or the
    /// message itself when it yields none.
    fn elements(&self) -> u64 {
        self.records.max(1)
    }

    fn native_settings(&self) -> ksm_guest::Settings {
        ksm_guest::Settings {
            subscribe_events: self.subscribe.iter().map(|s| (*s).to_owned()).collect(),
            bulk_data_label: Some(LABEL.to_owned()),
            use_uuid: self.use_uuid,
            max_record_size: MAX_RECORD_SIZE,
        }
    }

    fn wasm_settings(&self) -> wit::ModuleSettings {
        let native = self.native_settings();
        wit::ModuleSettings {
            subscribe_events: native.subscribe_events,
            bulk_data_label: native.bulk_data_label,
            use_uuid: native.use_uuid,
            max_record_size: native.max_record_size,
        }
    }
}

/// The device event context, as the host's router fills it for a device in
/// the registry.
fn native_context() -> ksm_guest::DeviceContext {
    ksm_guest::DeviceContext {
        device_id: DEVICE_ID,
        home_id: Some(7),
        device_class: Some("sensor".to_owned()),
        device_ip: None,
        received_at: "2026-01-02T03:04:05.123Z".to_owned(),
    }
}

/// [`native_context`] as the WIT type.
fn wasm_context() -> wit::DeviceContext {
    let native = native_context();
    wit::DeviceContext {
        device_id: native.device_id,
        home_id: native.home_id,
        device_class: native.device_class,
        device_ip: native.device_ip,
        received_at: native.received_at,
    }
}

/// A temperature event padded so that its MODE Event JSON is
/// [`EVENT_RECORD_BYTES`] long.
fn event_payload() -> Vec<u8> {
    let payload = |pad: usize| {
        format!(
            r#"{{"eventType":"temperature","eventData":{{"celsius":21.5,"seq":12345,"pad":"{}"}}}}"#,
            "x".repeat(pad)
        )
        .into_bytes()
    };
    let mut forwarder = Forwarder::new();
    forwarder
        .configure(ksm_guest::Settings {
            subscribe_events: vec!["*".to_owned()],
            bulk_data_label: None,
            use_uuid: false,
            max_record_size: MAX_RECORD_SIZE,
        })
        .expect("the sizing settings are valid");
    let unpadded = forwarder
        .handle_device_event(&native_context(), &payload(0))
        .expect("the unpadded event is valid")[0]
        .data
        .len();
    let pad = EVENT_RECORD_BYTES
        .checked_sub(unpadded)
        .expect("the unpadded event's record is under the target size");
    payload(pad)
}

/// A bulk payload of `count` records of [`BULK_RECORD_BYTES`] each.
fn bulk_payload(count: usize) -> Vec<u8> {
    let mut payload = Vec::new();
    rmp::encode::write_str(&mut payload, "1.0").expect("writing to a Vec cannot fail");
    for i in 0..count {
        let record: Vec<u8> = (0..BULK_RECORD_BYTES)
            .map(|j| b'a' + ((i + j) % 26) as u8)
            .collect();
        rmp::encode::write_bin(&mut payload, &record).expect("writing to a Vec cannot fail");
    }
    payload
}

fn cases() -> Vec<Case> {
    let event = event_payload();
    vec![
        subscribed_event_case("event_subscribed", event.clone()),
        Case {
            name: "event_dropped",
            subscribe: &["humidity", "motion"],
            use_uuid: false,
            input: Input::Event(event.clone()),
            records: 0,
        },
        Case {
            name: "event_uuid",
            subscribe: &["temperature"],
            use_uuid: true,
            input: Input::Event(event),
            records: 1,
        },
        bulk_case("bulk_10x100B", 10),
        bulk_case("bulk_100x100B", 100),
        floor_case("call_floor"),
    ]
}

/// A device event the module subscribes to, keyed by the device ID.
fn subscribed_event_case(name: &'static str, event: Vec<u8>) -> Case {
    Case {
        name,
        subscribe: &["temperature"],
        use_uuid: false,
        input: Input::Event(event),
        records: 1,
    }
}

/// A bulk payload of `records` records of [`BULK_RECORD_BYTES`] under the
/// module's label.
fn bulk_case(name: &'static str, records: usize) -> Case {
    Case {
        name,
        subscribe: &[],
        use_uuid: false,
        input: Input::Bulk {
            label: LABEL,
            payload: bulk_payload(records),
        },
        records: records as u64,
    }
}

/// The 10-record bulk payload under a label the module does not forward:
/// the guest answers without reading it.
fn floor_case(name: &'static str) -> Case {
    Case {
        name,
        subscribe: &[],
        use_uuid: false,
        input: Input::Bulk {
            label: OTHER_LABEL,
            payload: bulk_payload(10),
        },
        records: 0,
    }
}

/// One case's module, both ways.
struct Stage {
    native: Forwarder,
    wasm: Guest,
    native_context: ksm_guest::DeviceContext,
    wasm_context: wit::DeviceContext,
}

impl Stage {
    fn new(runtime: &Runtime, case: &Case) -> Stage {
        let mut native = Forwarder::new();
        native
            .configure(case.native_settings())
            .expect("the native guest takes the case's settings");
        let wasm = runtime
            .instantiate(&case.wasm_settings())
            .expect("the component takes the case's settings");
        Stage {
            native,
            wasm,
            native_context: native_context(),
            wasm_context: wasm_context(),
        }
    }

    /// The native answer, normalised for comparison.
    fn native_answer(&self, input: &Input) -> Answer {
        match input {
            Input::Event(payload) => Answer::events(
                self.native
                    .handle_device_event(&self.native_context, payload)
                    .expect("the native guest takes the event")
                    .into_iter()
                    .map(|r| (r.data, r.partition_key)),
            ),
            Input::Bulk { label, payload } => {
                let out = self
                    .native
                    .handle_bulk_data(DEVICE_ID, label, payload)
                    .expect("the native guest takes the bulk payload");
                Answer::bulk(
                    payload,
                    out.records
                        .into_iter()
                        .map(|r| ((r.data.offset, r.data.len), r.partition_key)),
                    out.rejected.len(),
                )
            }
        }
    }

    /// The component's answer, normalised for comparison.
    fn wasm_answer(&mut self, input: &Input) -> Answer {
        let no_hash_key = |key: &Option<String>| {
            assert_eq!(*key, None, "the guest never sets an explicit hash key");
        };
        match input {
            Input::Event(payload) => Answer::events(
                self.wasm
                    .device_event(&self.wasm_context, payload)
                    .expect("the component runs")
                    .expect("the component takes the event")
                    .into_iter()
                    .map(|r| {
                        no_hash_key(&r.explicit_hash_key);
                        (r.data, r.partition_key)
                    }),
            ),
            Input::Bulk { label, payload } => {
                let out = self
                    .wasm
                    .bulk_data(DEVICE_ID, label, payload)
                    .expect("the component runs")
                    .expect("the component takes the bulk payload");
                Answer::bulk(
                    payload,
                    out.records.into_iter().map(|r| {
                        no_hash_key(&r.explicit_hash_key);
                        ((r.data.offset, r.data.len), r.partition_key)
                    }),
                    out.rejected.len(),
                )
            }
        }
    }

    /// Panics unless both ways give the case's records, and the same ones.
    fn validate(&mut self, case: &Case) {
        let mut native = self.native_answer(&case.input);
        let mut wasm = self.wasm_answer(&case.input);
        if case.use_uuid {
            native.mask_uuid_keys(case.name, "native");
            wasm.mask_uuid_keys(case.name, "wasm");
        }
        assert_eq!(
            native.records.len() as u64,
            case.records,
            "{}: the native guest gave the wrong number of records",
            case.name
        );
        assert_eq!(native.rejected, 0, "{}: native rejections", case.name);
        assert!(
            native == wasm,
            "{}: native and wasm disagree\nnative: {native:?}\nwasm:   {wasm:?}",
            case.name
        );
        if let (Input::Event(_), Some(record)) = (&case.input, native.records.first()) {
            assert_eq!(
                record.data.len(),
                EVENT_RECORD_BYTES,
                "{}: event record size",
                case.name
            );
        }
    }
}

/// The bytes of `payload` a span points at.
fn span_bytes(payload: &[u8], (offset, len): (u32, u32)) -> Vec<u8> {
    let start = offset as usize;
    payload
        .get(start..start + len as usize)
        .expect("the span lies within the payload")
        .to_vec()
}

/// A guest's answer to one message, as compared between the two ways.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    /// The records, in order.
    records: Vec<AnswerRecord>,
    /// How many records the guest refused.
    rejected: usize,
}

/// One record of an [`Answer`].
#[derive(Debug, PartialEq, Eq)]
struct AnswerRecord {
    /// Where the data lies in the payload (bulk data only), offset and length.
    span: Option<(u32, u32)>,
    /// The data.
    data: Vec<u8>,
    /// The partition key.
    key: String,
}

impl Answer {
    /// An event answer: each record's data and key.
    fn events(records: impl Iterator<Item = (Vec<u8>, String)>) -> Answer {
        Answer {
            records: records
                .map(|(data, key)| AnswerRecord {
                    span: None,
                    data,
                    key,
                })
                .collect(),
            rejected: 0,
        }
    }

    /// A bulk answer: each record's span of `payload` (offset, length) and
    /// key, and how many the guest refused.
    fn bulk(
        payload: &[u8],
        records: impl Iterator<Item = ((u32, u32), String)>,
        rejected: usize,
    ) -> Answer {
        Answer {
            records: records
                .map(|(span, key)| AnswerRecord {
                    span: Some(span),
                    data: span_bytes(payload, span),
                    key,
                })
                .collect(),
            rejected,
        }
    }

    /// Checks that every key is a distinct UUIDv4 and replaces it with a
    /// placeholder, so that two answers compare on the rest.
    fn mask_uuid_keys(&mut self, case: &str, side: &str) {
        let mut seen = std::collections::HashSet::new();
        for AnswerRecord { key, .. } in &mut self.records {
            assert!(is_uuid_v4(key), "{case} ({side}): `{key}` is not a UUIDv4");
            assert!(seen.insert(key.clone()), "{case} ({side}): `{key}` twice");
            *key = "<uuid>".to_owned();
        }
    }
}

fn bench(criterion: &mut Criterion, runtime: &Runtime, case: &Case) {
    let mut stage = Stage::new(runtime, case);
    stage.validate(case);
    let mut group = criterion.benchmark_group(case.name);
    group.throughput(Throughput::Elements(case.elements()));
    let Stage {
        native,
        wasm,
        native_context,
        wasm_context,
    } = &mut stage;
    match &case.input {
        Input::Event(payload) => {
            group.bench_function("native", |b| {
                b.iter(|| {
                    native
                        .handle_device_event(native_context, black_box(payload))
                        .expect("the native guest takes the event")
                });
            });
            group.bench_function("wasm", |b| {
                b.iter(|| {
                    wasm.device_event(wasm_context, black_box(payload))
                        .expect("the component runs")
                        .expect("the component takes the event")
                });
            });
        }
        Input::Bulk { label, payload } => {
            group.bench_function("native", |b| {
                b.iter(|| {
                    native
                        .handle_bulk_data(DEVICE_ID, label, black_box(payload))
                        .expect("the native guest takes the bulk payload")
                });
            });
            group.bench_function("wasm", |b| {
                b.iter(|| {
                    wasm.bulk_data(DEVICE_ID, label, black_box(payload))
                        .expect("the component runs")
                        .expect("the component takes the bulk payload")
                });
            });
        }
    }
    group.finish();
}

/// Messages per batch call in the batch cases.
const BATCH_SIZES: [usize; 4] = [1, 16, 64, 256];

/// A batch case: N copies of one message handed over in one go.
struct BatchCase {
    /// Criterion group name.
    name: String,
    /// The module and the message.
    case: Case,
    /// Messages per batch.
    size: usize,
}

impl BatchCase {
    /// Records one batch yields.
    fn records(&self) -> u64 {
        self.case.records * self.size as u64
    }

    /// What the table divides a batch's time by: its records, or its
    /// messages when they yield none.
    fn units(&self) -> f64 {
        match self.records() {
            0 => self.size as f64,
            records => records as f64,
        }
    }
}

fn batch_cases() -> Vec<BatchCase> {
    let event = event_payload();
    let mut cases = Vec::new();
    for size in BATCH_SIZES {
        for (name, case) in [
            (
                "batch_events",
                subscribed_event_case("batch_events", event.clone()),
            ),
            ("batch_bulk100", bulk_case("batch_bulk100", 100)),
            ("batch_floor", floor_case("batch_floor")),
        ] {
            cases.push(BatchCase {
                name: format!("{name}_{size}"),
                case,
                size,
            });
        }
    }
    cases
}

/// The records a guest's answers hold.
fn answered_records(answers: &[ksm_host::runtime::CallResult<GuestAnswer>]) -> u64 {
    answers
        .iter()
        .map(|answer| match answer {
            Ok(Ok(GuestAnswer::Records(records))) => records.len() as u64,
            Ok(Ok(GuestAnswer::Bulk(output))) => output.records.len() as u64,
            other => panic!("the component refused a batch message: {other:?}"),
        })
        .sum()
}

fn bench_batch(criterion: &mut Criterion, runtime: &Runtime, batch: &BatchCase) {
    let case = &batch.case;
    let mut stage = Stage::new(runtime, case);
    stage.validate(case);
    let mqtt = Mqtt {
        topic: "/devices/1001/event",
        content_type: None,
        user_properties: &[],
    };
    let inputs: Vec<GuestInput<'_>> = (0..batch.size)
        .map(|_| match &case.input {
            Input::Event(payload) => GuestInput::DeviceEvent {
                context: &stage.wasm_context,
                payload,
                mqtt,
            },
            Input::Bulk { label, payload } => GuestInput::BulkData {
                device_id: DEVICE_ID,
                label,
                payload,
                mqtt,
            },
        })
        .collect();
    let handled = stage.wasm.handle(&inputs);
    assert_eq!(handled.batch_failed, None, "{}", batch.name);
    assert_eq!(
        answered_records(&handled.answers),
        batch.records(),
        "{}",
        batch.name
    );
    // A 1.1 guest takes a batch in one call; a 1.0 guest (`KSM_GUEST_WASM` may
    // name one) is called once per message.
    let expected_calls = match stage.wasm.contract() {
        Contract::V1_1 => batch.size.div_ceil(ksm_host::runtime::MAX_BATCH_MESSAGES),
        Contract::V1_0 => batch.size,
    };
    assert_eq!(handled.calls, expected_calls, "{}", batch.name);
    let mut group = criterion.benchmark_group(&batch.name);
    group.throughput(Throughput::Elements(batch.units() as u64));
    let native = &stage.native;
    let native_context = &stage.native_context;
    group.bench_function("native", |b| {
        b.iter(|| {
            for _ in 0..batch.size {
                match &case.input {
                    Input::Event(payload) => {
                        black_box(
                            native
                                .handle_device_event(native_context, black_box(payload))
                                .expect("the native guest takes the event"),
                        );
                    }
                    Input::Bulk { label, payload } => {
                        black_box(
                            native
                                .handle_bulk_spans(DEVICE_ID, label, black_box(payload))
                                .expect("the native guest takes the bulk payload"),
                        );
                    }
                }
            }
        });
    });
    let wasm = &mut stage.wasm;
    group.bench_function("wasm", |b| {
        b.iter(|| black_box(wasm.handle(black_box(&inputs))));
    });
    group.finish();
}

/// Where criterion keeps its results: `$CRITERION_HOME`, else
/// `<target>/criterion` (as criterion itself decides).
fn criterion_dir() -> PathBuf {
    std::env::var_os("CRITERION_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| artifacts::target_dir().join("criterion"))
}

/// The mean time per iteration, in ns, criterion saved for `group/function`
/// during this run (written after `started`); `None` when it saved none
/// (test or list mode, filtered out, `--baseline` given).
fn mean_ns(group: &str, function: &str, started: SystemTime) -> Option<f64> {
    let path = criterion_dir()
        .join(group)
        .join(function)
        .join("new/estimates.json");
    let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
    if modified < started {
        return None;
    }
    let text = std::fs::read_to_string(&path).ok()?;
    let estimates: serde_json::Value = serde_json::from_str(&text).ok()?;
    estimates["mean"]["point_estimate"].as_f64()
}

/// Prints native against wasm per record for every case this run measured.
fn print_table(cases: &[Case], started: SystemTime) {
    let rows: Vec<_> = cases
        .iter()
        .filter_map(|case| {
            let native = mean_ns(case.name, "native", started)?;
            let wasm = mean_ns(case.name, "wasm", started)?;
            Some((case, native, wasm))
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    println!();
    println!("guest stage, mean per record (per message where a message yields none), one core:");
    println!(
        "{:<18} {:>8} {:>13} {:>12} {:>11} {:>14} {:>16}",
        "case",
        "rec/call",
        "native ns/rec",
        "wasm ns/rec",
        "wasm/native",
        "+wasm ns/call",
        "wasm rec/s/core"
    );
    for (case, native, wasm) in rows {
        let per = case.elements() as f64;
        println!(
            "{:<18} {:>8} {:>13.1} {:>12.1} {:>10.2}x {:>14.0} {:>16.0}",
            case.name,
            case.records,
            native / per,
            wasm / per,
            wasm / native,
            wasm - native,
            1e9 * per / wasm
        );
    }
}

/// Prints native against wasm per record, and the crossing per message, for
/// every batch case this run measured. The crossing is what the wasm call
/// costs beyond the native work, per message.
fn print_batch_table(cases: &[BatchCase], started: SystemTime) {
    let rows: Vec<_> = cases
        .iter()
        .filter_map(|case| {
            let native = mean_ns(&case.name, "native", started)?;
            let wasm = mean_ns(&case.name, "wasm", started)?;
            Some((case, native, wasm))
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    println!();
    println!(
        "guest stage in batches (1.1 handle-batch), mean per record (per message where a \
         message yields none), one core:"
    );
    println!(
        "{:<18} {:>6} {:>13} {:>12} {:>11} {:>15} {:>16}",
        "case",
        "batch",
        "native ns/rec",
        "wasm ns/rec",
        "wasm/native",
        "+wasm ns/msg",
        "wasm rec/s/core"
    );
    for (case, native, wasm) in rows {
        let records = case.units();
        println!(
            "{:<18} {:>6} {:>13.1} {:>12.1} {:>10.2}x {:>15.0} {:>16.0}",
            case.case.name,
            case.size,
            native / records,
            wasm / records,
            wasm / native,
            (wasm - native) / case.size as f64,
            1e9 * records / wasm
        );
    }
}

fn main() {
    let mut criterion = Criterion::default()
        .warm_up_time(WARM_UP)
        .measurement_time(MEASUREMENT)
        .configure_from_args();
    let path = artifacts::guest_wasm();
    let runtime = Runtime::load(&path)
        .unwrap_or_else(|e| panic!("load the guest component {}: {e}", path.display()));
    let cases = cases();
    let started = SystemTime::now();
    for case in &cases {
        bench(&mut criterion, &runtime, case);
    }
    let batches = batch_cases();
    for batch in &batches {
        bench_batch(&mut criterion, &runtime, batch);
    }
    criterion.final_summary();
    print_table(&cases, started);
    print_batch_table(&batches, started);
}
