//! Device and home events through a real Mosquitto and moto, read back shard by shard.

use std::collections::HashSet;
use std::time::Duration;

use ksm_tests::{create_stream, read_all_records, unique_stream_name, wait_for_records};

use crate::support::{Bench, module};

#[tokio::test(flavor = "multi_thread")]
async fn device_and_home_events_land_as_mode_events() {
    let bench = Bench::new("events", 2).await;
    let host = bench.ksm(
        "ksm-events",
        &[module(
            "all-events",
            &bench.stream,
            "subscribe_events = [\"*\"]",
        )],
    );

    bench
        .publish(&[
            (
                "/devices/1001/event",
                r#"{"eventType":"temperature","eventData":{"celsius":21.5}}"#,
            ),
            (
                "/devices/2002/event",
                r#"{"eventType":"door","eventData":{"open":true},"homeId":9,"timestamp":"2026-01-02T03:04:05+09:00"}"#,
            ),
            (
                "/homes/77/event",
                r#"{"eventType":"alarm","eventData":{"armed":false}}"#,
            ),
        ])
        .await;

    let records = bench.records(3).await;
    assert_eq!(records.len(), 3, "records: {records:?}\n{}", host.log());

    let by_type = |t: &str| {
        records
            .iter()
            .find(|r| r.data_json()["eventType"] == t)
            .unwrap_or_else(|| panic!("no {t} record in {records:?}"))
    };
    let temperature = by_type("temperature");
    assert_eq!(temperature.partition_key, "1001");
    let event = temperature.data_json();
    assert_eq!(event["eventData"]["celsius"], 21.5);
    assert_eq!(event["homeId"], 77, "home from the device registry");
    assert_eq!(event["originDeviceId"], 1001);
    assert_eq!(event["originDeviceClass"], "thermostat");
    let timestamp = event["timestamp"].as_str().expect("a timestamp");
    assert!(
        timestamp.starts_with("20") && timestamp.ends_with('Z') && timestamp.contains('T'),
        "receive time in RFC 3339 UTC: {timestamp}"
    );
    let keys: Vec<&str> = event
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "eventType",
            "eventData",
            "timestamp",
            "homeId",
            "originDeviceId",
            "originDeviceClass"
        ]
    );

    let door = by_type("door");
    assert_eq!(door.partition_key, "2002");
    let event = door.data_json();
    assert_eq!(
        event["homeId"], 9,
        "unregistered device: homeId from the payload"
    );
    assert_eq!(event["timestamp"], "2026-01-02T03:04:05+09:00");
    assert!(event.get("originDeviceClass").is_none());

    let alarm = by_type("alarm");
    assert_eq!(
        alarm.partition_key, "77",
        "home events are keyed by home ID"
    );
    let event = alarm.data_json();
    assert_eq!(event["homeId"], 77);
    assert!(event.get("originDeviceId").is_none());

    let counters = host.wait_for_counters("all-events", |c| c["forwarded"] == 3);
    assert_eq!(counters["received"], 3);
    assert_eq!(counters["forwarded"], 3);
    assert_eq!(counters["dead_lettered"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn only_subscribed_event_types_are_forwarded() {
    let bench = Bench::new("filtered", 1).await;
    let kinesis = &bench.kinesis;
    let everything = unique_stream_name("everything");
    create_stream(kinesis, &everything, 1).await;
    let host = bench.ksm(
        "ksm-filters",
        &[
            module(
                "doors-only",
                &bench.stream,
                "subscribe_events = [\"door\", \"温度\"]",
            ),
            module("all", &everything, "subscribe_events = [\"*\"]"),
        ],
    );

    let messages: Vec<(String, String)> = ["door", "window", "Door", "温度", "door"]
        .iter()
        .map(|t| {
            (
                "/devices/1001/event".to_owned(),
                format!(r#"{{"eventType":"{t}","eventData":{{}}}}"#),
            )
        })
        .collect();
    bench.publish(&messages).await;

    let all = wait_for_records(kinesis, &everything, 5, Duration::from_secs(30)).await;
    assert_eq!(all.len(), 5, "{}", host.log());
    host.wait_for_counters("doors-only", |c| c["received"] == 5 && c["forwarded"] == 3);
    let filtered = read_all_records(kinesis, &bench.stream).await;
    let types: Vec<String> = filtered
        .iter()
        .map(|r| {
            r.data_json()["eventType"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(
        types,
        ["door", "温度", "door"],
        "in publish order, one device, one shard"
    );
    let counters = host.counters("doors-only");
    assert_eq!(counters["filtered"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn use_uuid_gives_every_record_a_fresh_uuid_v4_key() {
    let bench = Bench::new("uuid", 4).await;
    let host = bench.ksm(
        "ksm-uuid",
        &[module(
            "uuid-keys",
            &bench.stream,
            "subscribe_events = [\"*\"]\nbulk_data_label = \"raw\"\nuse_uuid = true",
        )],
    );
    let bulk = ksm_host::bulk::encode([b"a".as_slice(), b"b", b"c"]);
    bench
        .publish(&[
            (
                "/devices/1001/event",
                br#"{"eventType":"x","eventData":{}}"#.to_vec(),
            ),
            (
                "/homes/77/event",
                br#"{"eventType":"y","eventData":{}}"#.to_vec(),
            ),
            ("/devices/1001/bulkData/raw", bulk),
        ])
        .await;
    let records = bench.records(5).await;
    assert_eq!(records.len(), 5, "{}", host.log());
    let keys: HashSet<&str> = records.iter().map(|r| r.partition_key.as_str()).collect();
    assert_eq!(keys.len(), 5, "every key is fresh: {keys:?}");
    for key in keys {
        let bytes = key.as_bytes();
        assert_eq!(bytes.len(), 36, "{key}");
        assert_eq!(bytes[14], b'4', "version 4: {key}");
        assert!(
            matches!(bytes[19], b'8' | b'9' | b'a' | b'b'),
            "RFC 4122 variant: {key}"
        );
        assert!(
            key.chars()
                .all(|c| c == '-' || c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
            "{key}"
        );
    }
}
