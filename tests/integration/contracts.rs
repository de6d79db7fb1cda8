//! Contract versions side by side: a 1.0 guest (the JavaScript one) and a
//! 1.1 guest (the reference one) in one host, one module each, give the same
//! records; a 1.1 guest gets batches, a failed batch costs only the message
//! at fault, and a 1.1 guest sees each message's MQTT details; a custom guest
//! on the SDK runs as a second module beside the reference one.

use std::collections::BTreeMap;
use std::time::Duration;

use ksm_tests::mqtt::{PublishProperties, publish_one_with_properties};
use ksm_tests::{
    create_stream, js_guest_wasm, low_battery_guest_wasm, misbehaving_guest_wasm, read_all_records,
    unique_stream_name,
};

use crate::support::{Bench, Ksm, module};

/// Devices, events per device and bulk payloads (of [`BULK_RECORDS`] records) published.
const DEVICES: u64 = 30;
const EVENTS_PER_DEVICE: u64 = 10;
const BULK_PAYLOADS: u64 = 20;
const BULK_RECORDS: usize = 10;

/// One line of `/metrics` for `module`: the value of `name`.
fn metric(host: &Ksm, name: &str, module: &str) -> u64 {
    let prefix = format!("{name}{{module=\"{module}\"}} ");
    host.get_raw("/metrics")
        .1
        .lines()
        .find_map(|line| line.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or(0)
}

/// Records of a stream as (partition key, data) with how often each came.
async fn tally(bench: &Bench, stream: &str) -> BTreeMap<(String, Vec<u8>), usize> {
    let mut tally = BTreeMap::new();
    for record in read_all_records(&bench.kinesis, stream).await {
        *tally
            .entry((record.partition_key, record.data))
            .or_default() += 1;
    }
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_of_both_contract_versions_run_side_by_side_and_agree() {
    let bench = Bench::new("contracts", 2).await;
    let js_stream = unique_stream_name("contracts-js");
    create_stream(&bench.kinesis, &js_stream, 2).await;
    let settings = "subscribe_events = [\"*\"]\nbulk_data_label = \"b\"";
    let host = bench.ksm(
        "ksm-contracts",
        &[
            module("rust11", &bench.stream, settings),
            module(
                "js10",
                &js_stream,
                &format!("{settings}\ncomponent = \"{}\"", js_guest_wasm().display()),
            ),
        ],
    );
    let mut messages: Vec<(String, Vec<u8>)> = Vec::new();
    for n in 0..DEVICES * EVENTS_PER_DEVICE {
        let device = 1 + n % DEVICES;
        let event = format!(
            r#"{{"eventType":"reading","eventData":{{"n":{n},"t":21.5,"s":"a\u00e9"}},"homeId":{device}}}"#
        );
        messages.push((format!("/devices/{device}/event"), event.into_bytes()));
    }
    for n in 0..BULK_PAYLOADS {
        let records: Vec<Vec<u8>> = (0..BULK_RECORDS)
            .map(|r| format!("bulk-{n}-{r}").into_bytes())
            .collect();
        let payload = ksm_host::bulk::encode(records.iter().map(Vec::as_slice));
        messages.push((format!("/devices/{}/bulkData/b", 500 + n), payload));
    }
    bench.publish(&messages).await;
    let expected = DEVICES * EVENTS_PER_DEVICE + BULK_PAYLOADS * BULK_RECORDS as u64;
    for id in ["rust11", "js10"] {
        let counters = host.wait_for_counters_within(id, Duration::from_secs(120), |c| {
            c["forwarded"].as_u64().unwrap_or(0) >= expected
        });
        assert_eq!(counters["forwarded"], expected, "{id}: {counters}");
        assert_eq!(counters["dead_lettered"], 0, "{id}: {counters}");
    }
    let rust = tally(&bench, &bench.stream).await;
    let js = tally(&bench, &js_stream).await;
    assert_eq!(rust.values().sum::<usize>() as u64, expected);
    assert!(
        rust == js,
        "a 1.1 guest in batches and a 1.0 guest one message per call give byte for byte the \
         same records ({} and {} distinct)",
        rust.len(),
        js.len()
    );

    let rust_log = host.module_log("rust11");
    let js_log = host.module_log("js10");
    assert!(
        rust_log.contains("ksm:smart-module@1.1 (batches)"),
        "the log names the contract: {rust_log}"
    );
    assert!(
        js_log.contains("ksm:smart-module@1.0 (one message per call)"),
        "{js_log}"
    );
    let messages = messages.len() as u64;
    let rust_calls = metric(&host, "ksm_guest_call_duration_seconds_count", "rust11");
    let js_calls = metric(&host, "ksm_guest_call_duration_seconds_count", "js10");
    assert_eq!(js_calls, messages, "a 1.0 guest: one call per message");
    assert!(
        (1..messages).contains(&rust_calls),
        "a 1.1 guest gets batches while the slower 1.0 guest holds the router: {rust_calls} \
         calls for {messages} messages"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_costs_only_the_message_at_fault_and_guests_see_mqtt_details() {
    let bench = Bench::new("batch-fault", 1).await;
    let host = bench.ksm(
        "ksm-batch-fault",
        &[module(
            "fixture",
            &bench.stream,
            &format!(
                "subscribe_events = [\"*\"]\ncomponent = \"{}\"",
                misbehaving_guest_wasm().display()
            ),
        )],
    );
    // In each burst the first message keeps the guest busy while the others
    // queue up, so they reach it in batches: in the first burst one message
    // traps, in the second one gets a miscounted answer.
    for (burst, odd_one) in [(0u64, "panic"), (1, "miscount")] {
        let mut messages = vec![("/devices/1/event".to_owned(), "sleep:30".to_owned())];
        for n in 0..100 {
            let payload = match n {
                50 => odd_one.to_owned(),
                n => format!("m-{burst}-{n}"),
            };
            messages.push((format!("/devices/{}/event", 1 + n % 7), payload));
        }
        bench.publish(&messages).await;
        let settled = 101 * (burst + 1);
        host.wait_for_counters_within("fixture", Duration::from_secs(60), |c| {
            c["forwarded"].as_u64().unwrap_or(0) + c["dead_lettered"].as_u64().unwrap_or(0)
                >= settled
        });
    }
    let counters = host.counters("fixture");
    assert_eq!(counters["forwarded"], 201, "{counters}");
    assert_eq!(counters["dead_lettered"], 1, "only the panic: {counters}");
    let log = host.module_log("fixture");
    assert!(
        log.contains("messages failed (the guest trapped: wasm trap: wasm `unreachable`")
            && log.contains("they ran again one by one"),
        "the log says a batch failed and was run again: {log}"
    );
    assert!(
        log.contains("outcomes (one per message is the contract)"),
        "the log names the miscounted answer: {log}"
    );
    let letters = host.all_dead_letters("fixture");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(
        letters[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("trapped")),
        "{letters:?}"
    );
    let records = bench.records(201).await;
    assert!(
        records.iter().any(|r| r.data == b"miscount"),
        "the message in the miscounted batch went on alone"
    );

    let properties = PublishProperties {
        content_type: Some("text/plain".to_owned()),
        user_properties: vec![
            ("site".to_owned(), "north".to_owned()),
            ("site".to_owned(), "south".to_owned()),
            ("kind".to_owned(), "probe".to_owned()),
        ],
        ..PublishProperties::default()
    };
    publish_one_with_properties(
        &bench.broker.url(),
        "/devices/42/event",
        b"mqtt".to_vec(),
        properties,
    )
    .await;
    let records = bench.records(202).await;
    let details = records
        .iter()
        .find(|r| r.partition_key == "42")
        .expect("the record of the MQTT details");
    assert_eq!(
        String::from_utf8_lossy(&details.data),
        "/devices/42/event|text/plain|site=north;site=south;kind=probe",
        "the guest saw the topic, the content type and the user properties in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_sdk_guest_runs_beside_the_reference_one_on_a_second_stream() {
    let bench = Bench::new("low-battery", 1).await;
    let alerts = unique_stream_name("low-battery-alerts");
    create_stream(&bench.kinesis, &alerts, 1).await;
    let host = bench.ksm(
        "ksm-low-battery",
        &[
            module("everything", &bench.stream, "subscribe_events = [\"*\"]"),
            module(
                "low-battery",
                &alerts,
                &format!(
                    "subscribe_events = [\"status\"]\ncomponent = \"{}\"",
                    low_battery_guest_wasm().display()
                ),
            ),
        ],
    );
    // Battery levels 0, 5, ..., 95 in `status` events, the same in `reading` events
    // (not subscribed by the alert module), and one payload that is not JSON.
    let mut messages: Vec<(String, Vec<u8>)> = Vec::new();
    for (n, level) in (0..100).step_by(5).enumerate() {
        for kind in ["status", "reading"] {
            let device = 1 + n as u64;
            let event =
                format!(r#"{{"eventType":"{kind}","eventData":{{"battery":{level}}},"homeId":9}}"#);
            messages.push((format!("/devices/{device}/event"), event.into_bytes()));
        }
    }
    messages.push(("/devices/77/event".to_owned(), b"{not json".to_vec()));
    bench.publish(&messages).await;

    let counters = host.wait_for_counters_within("low-battery", Duration::from_secs(60), |c| {
        c["forwarded"].as_u64().unwrap_or(0) >= 4 && c["dead_lettered"].as_u64().unwrap_or(0) >= 1
    });
    assert_eq!(counters["forwarded"], 4, "levels 0, 5, 10, 15: {counters}");
    assert_eq!(
        counters["dead_lettered"], 1,
        "the payload that is not JSON: {counters}"
    );
    let everything = host.wait_for_counters_within("everything", Duration::from_secs(60), |c| {
        c["forwarded"].as_u64().unwrap_or(0) >= 40
    });
    assert_eq!(everything["forwarded"], 40, "{everything}");

    let mut records: Vec<(String, String)> = read_all_records(&bench.kinesis, &alerts)
        .await
        .into_iter()
        .map(|r| {
            (
                r.partition_key,
                String::from_utf8(r.data).expect("JSON records"),
            )
        })
        .collect();
    records.sort();
    let expected: Vec<(String, String)> = [(1, 0.0), (2, 5.0), (3, 10.0), (4, 15.0)]
        .iter()
        .map(|(device, level)| {
            let record = serde_json::json!({
                "deviceId": device,
                "eventType": "status",
                "battery": level,
            });
            (device.to_string(), record.to_string())
        })
        .collect();
    assert_eq!(records.len(), expected.len(), "{records:?}");
    for ((key, data), (want_key, want)) in records.iter().zip(&expected) {
        assert_eq!(key, want_key);
        let mut data: serde_json::Value = serde_json::from_str(data).expect("a JSON record");
        let received = data
            .as_object_mut()
            .and_then(|o| o.remove("receivedAt"))
            .expect("the record carries receivedAt");
        assert!(
            received.as_str().is_some_and(|t| t.ends_with('Z')),
            "{received}"
        );
        let want: serde_json::Value = serde_json::from_str(want).expect("JSON");
        assert_eq!(data, want, "{key}");
    }
    let log = host.module_log("low-battery");
    assert!(log.contains("ksm_example_low_battery.wasm"), "{log}");
    assert!(
        log.contains("message on `/devices/77/event` refused and kept as a dead letter")
            && log.contains("key must be a string"),
        "the guest's error, in the module's log: {log}"
    );
}
