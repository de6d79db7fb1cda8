//! KPL aggregation end to end, read back by the KPL's reference
//! de-aggregator (`aws-kinesis-agg`, Python) against moto and kinesalite;
//! and large records where the stream's maximum record size allows them.

use std::collections::HashSet;
use std::time::Duration;

use ksm_tests::proxy::{Poison, PoisonAnswer};
use ksm_tests::{
    Faults, Kinesalite, Mosquitto, RecordingProxy, ReferenceRead, aws_env, create_stream,
    kinesis_client, publish_all, read_all_records, unique_stream_name,
};

use crate::support::{
    Bench, HostOptions, Ksm, ModuleSpec, config, config_with_options, dead_letter_data, module,
};

/// Devices that send events in the tests, and events per device.
const DEVICES: u64 = 300;
const EVENTS_PER_DEVICE: u64 = 3;
/// Records of the one bulk payload.
const BULK_RECORDS: usize = 1000;
/// The device that sends it.
const BULK_DEVICE: u64 = 5000;

fn aggregating(id: &str, stream: &str) -> ModuleSpec {
    module(
        id,
        stream,
        "subscribe_events = [\"*\"]\nbulk_data_label = \"telemetry\"\naggregation = \"kpl\"",
    )
}

/// Events `n` = 0, 1, 2 from each device, every device's `n` before any
/// device's `n + 1`, and one bulk payload of [`BULK_RECORDS`] records.
fn traffic() -> Vec<(String, Vec<u8>)> {
    let mut messages = Vec::new();
    for n in 0..EVENTS_PER_DEVICE {
        for device in 0..DEVICES {
            messages.push((
                format!("/devices/{}/event", 2000 + device),
                format!(r#"{{"eventType":"reading","eventData":{{"n":{n}}},"homeId":77}}"#)
                    .into_bytes(),
            ));
        }
    }
    messages.push((
        format!("/devices/{BULK_DEVICE}/bulkData/telemetry"),
        ksm_host::bulk::encode(bulk_records()),
    ));
    messages
}

fn bulk_records() -> Vec<Vec<u8>> {
    (0..BULK_RECORDS)
        .map(|i| format!("sample-{i:04}").into_bytes())
        .collect()
}

fn user_records() -> usize {
    (DEVICES * EVENTS_PER_DEVICE) as usize + BULK_RECORDS
}

/// What the reference read must show of [`traffic`]: every record once,
/// with its device's partition key, each key in order, each on its
/// shard, each aggregate's MD5 valid; returns how many Kinesis records
/// held them.
fn assert_traffic_read_back(read: &ReferenceRead) -> usize {
    read.assert_well_placed();
    assert_eq!(read.user_records.len(), user_records(), "each record once");
    let distinct: HashSet<(String, Vec<u8>)> = read
        .user_records
        .iter()
        .map(|r| (r.partition_key.clone(), r.data()))
        .collect();
    assert_eq!(distinct.len(), user_records(), "no record twice");
    let keys = read.per_key();
    assert_eq!(keys.len(), DEVICES as usize + 1);
    for device in 0..DEVICES {
        let key = (2000 + device).to_string();
        let order: Vec<u64> = keys[&key]
            .iter()
            .map(|data| {
                let event: serde_json::Value = serde_json::from_slice(data).expect("an event");
                event["eventData"]["n"].as_u64().expect("n")
            })
            .collect();
        assert_eq!(order, [0, 1, 2], "device {key} in order");
    }
    assert_eq!(
        keys[&BULK_DEVICE.to_string()],
        bulk_records(),
        "bulk in order"
    );
    read.kinesis_records.len()
}

#[tokio::test(flavor = "multi_thread")]
async fn aggregates_in_moto_read_back_whole_and_in_order_by_the_reference_deaggregator() {
    let bench = Bench::new("aggregated", 4).await;
    let host = bench.ksm("ksm-aggregated", &[aggregating("packed", &bench.stream)]);
    bench.publish(&traffic()).await;
    let counters = host.wait_for_counters("packed", |c| c["forwarded"] == user_records() as u64);
    assert_eq!(
        counters["forwarded"],
        user_records() as u64,
        "{}",
        host.log()
    );
    let read = ReferenceRead::of_stream(&bench.moto.endpoint(), &bench.stream);
    let kinesis_records = assert_traffic_read_back(&read);
    assert_eq!(
        counters["kinesis_records"], kinesis_records as u64,
        "{counters}"
    );
    assert!(
        kinesis_records * 10 < user_records(),
        "{kinesis_records} Kinesis records for {} records",
        user_records()
    );
    assert!(read.aggregates() > 0);
    // The bulk payload: one or a few aggregates.
    let bulk_holders: HashSet<&str> = read
        .user_records
        .iter()
        .filter(|r| r.partition_key == BULK_DEVICE.to_string())
        .map(|r| r.sequence_number.as_str())
        .collect();
    assert!(
        bulk_holders.len() <= 3,
        "{} Kinesis records hold the bulk payload",
        bulk_holders.len()
    );
    assert!(
        host.module_log("packed").contains("aggregation is on"),
        "{}",
        host.module_log("packed")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn aggregates_in_kinesalite_read_back_by_the_reference_deaggregator() {
    let broker = Mosquitto::start();
    let kinesalite = Kinesalite::start();
    let kinesis = kinesis_client(&kinesalite.endpoint()).await;
    let stream = unique_stream_name("kinesalite-agg");
    create_stream(&kinesis, &stream, 4).await;
    let host = Ksm::start(
        &config(
            &broker.url(),
            "ksm-kinesalite-agg",
            &[aggregating("packed", &stream)],
        ),
        aws_env(&kinesalite.endpoint(), &kinesalite.endpoint()),
    );
    publish_all(&broker.url(), &traffic()).await;
    let counters = host.wait_for_counters("packed", |c| c["forwarded"] == user_records() as u64);
    assert_eq!(
        counters["forwarded"],
        user_records() as u64,
        "{}",
        host.log()
    );
    let read = ReferenceRead::of_stream(&kinesalite.endpoint(), &stream);
    let kinesis_records = assert_traffic_read_back(&read);
    assert_eq!(counters["kinesis_records"], kinesis_records as u64);
    assert!(kinesis_records * 10 < user_records(), "{kinesis_records}");
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_aggregates_go_again_whole_and_every_key_keeps_its_order() {
    let bench = Bench::new("aggregated-faults", 4).await;
    let proxy = RecordingProxy::start(&bench.moto.endpoint());
    proxy.set_faults(Faults {
        fail_record_ratio: 0.3,
        server_error_ratio: 0.1,
        seed: 13,
        ..Faults::default()
    });
    let host = bench.ksm_via(
        &proxy.endpoint(),
        "ksm-aggregated-faults",
        &[aggregating("packed", &bench.stream)],
    );
    // Several rounds, so that aggregates fail while later records wait.
    for _ in 0..3 {
        bench.publish(&traffic()[..DEVICES as usize]).await;
    }
    bench.publish(&traffic()[DEVICES as usize..]).await;
    let expected = user_records() + 2 * DEVICES as usize;
    let counters = host.wait_for_counters_within("packed", Duration::from_secs(60), |c| {
        c["forwarded"] == expected as u64
    });
    assert_eq!(counters["forwarded"], expected as u64, "{}", host.log());
    let stats = proxy.put_records_stats();
    assert!(
        stats.records_failed_injected > 0 && stats.server_errors_injected > 0,
        "{stats:?}"
    );
    assert!(counters["retried"].as_u64() > Some(0), "{counters}");
    assert_eq!(counters["reordered"], 0, "{counters}");
    let read = ReferenceRead::of_stream(&bench.moto.endpoint(), &bench.stream);
    read.assert_well_placed();
    assert_eq!(read.user_records.len(), expected, "each record once");
    for (key, records) in read.per_key() {
        if key == BULK_DEVICE.to_string() {
            assert_eq!(records, bulk_records(), "bulk in order");
            continue;
        }
        let order: Vec<u64> = records
            .iter()
            .map(|data| {
                let event: serde_json::Value = serde_json::from_slice(data).expect("an event");
                event["eventData"]["n"].as_u64().expect("n")
            })
            .collect();
        // Three rounds of n = 0, then n = 1 and 2.
        assert_eq!(order, [0, 0, 0, 1, 2], "device {key} in order");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bulk_payload_of_1000_records_takes_a_few_round_trips() {
    let bench = Bench::new("aggregated-bulk", 1).await;
    let proxy = RecordingProxy::start(&bench.moto.endpoint());
    let host = bench.ksm_via(
        &proxy.endpoint(),
        "ksm-aggregated-bulk",
        &[aggregating("packed", &bench.stream)],
    );
    let payload = ksm_host::bulk::encode(bulk_records());
    bench
        .publish(&[(
            format!("/devices/{BULK_DEVICE}/bulkData/telemetry"),
            payload,
        )])
        .await;
    let counters = host.wait_for_counters("packed", |c| c["forwarded"] == BULK_RECORDS as u64);
    assert_eq!(counters["forwarded"], BULK_RECORDS as u64, "{}", host.log());
    let stats = proxy.put_records_stats();
    assert!(stats.requests <= 3, "{stats:?}");
    assert!(stats.records_received <= 3, "{stats:?}");
    let read = ReferenceRead::of_stream(&bench.moto.endpoint(), &bench.stream);
    read.assert_well_placed();
    assert_eq!(read.per_key()[&BULK_DEVICE.to_string()], bulk_records());
    assert_eq!(
        counters["kinesis_records"],
        read.kinesis_records.len() as u64
    );
}

/// A module sending records of up to 10 MiB, with room for them in a call.
fn large(stream: &str) -> (ModuleSpec, HostOptions) {
    let module = module(
        "large",
        stream,
        "bulk_data_label = \"scans\"\nmax_record_size = 10485760",
    );
    let options = HostOptions {
        // Unpacking 13 MB takes the guest longer than the default 50 ms.
        component:
            "max_event_output_bytes = 10485760\nmax_memory_mib = 128\ncall_timeout_ms = 2000".into(),
        ..HostOptions::default()
    };
    (module, options)
}

#[tokio::test(flavor = "multi_thread")]
async fn records_up_to_10_mib_land_where_the_stream_takes_them() {
    let bench = Bench::new("large", 1).await;
    let summary = bench
        .kinesis
        .describe_stream_summary()
        .stream_name(&bench.stream)
        .send()
        .await
        .expect("describe the stream");
    let arn = summary
        .stream_description_summary()
        .expect("a summary")
        .stream_arn()
        .to_owned();
    bench
        .kinesis
        .update_max_record_size()
        .stream_arn(arn)
        .max_record_size_in_kib(10240)
        .send()
        .await
        .expect("raise the stream's record limit");
    let (module, options) = large(&bench.stream);
    let host = bench.ksm_with(&bench.moto.endpoint(), "ksm-large", &[module], &options);
    // With the partition key ("1001"), the largest is 10 MiB exactly.
    let sizes = [3 * 1024 * 1024, 10 * 1024 * 1024 - 4, 1000];
    let records: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, size)| vec![b'a' + i as u8; *size])
        .collect();
    bench
        .publish(&[(
            "/devices/1001/bulkData/scans",
            ksm_host::bulk::encode(&records),
        )])
        .await;
    let counters = host.wait_for_counters("large", |c| c["forwarded"] == 3);
    assert_eq!(counters["forwarded"], 3, "{}", host.log());
    let landed = read_all_records(&bench.kinesis, &bench.stream).await;
    let landed: Vec<Vec<u8>> = landed.into_iter().map(|r| r.data).collect();
    assert_eq!(landed, records);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_module_larger_than_its_stream_takes_is_refused_at_start_with_the_reason() {
    // moto with the stream's default limit, 1 MiB.
    let bench = Bench::new("too-large", 1).await;
    let (module_spec, options) = large(&bench.stream);
    let text = config_with_options(
        &bench.broker.url(),
        "ksm-too-large",
        &ksm_tests::guest_wasm(),
        &[module_spec],
        &options,
    );
    let log = refused_at_start(
        &text,
        aws_env(&bench.moto.endpoint(), &bench.moto.endpoint()),
    );
    assert!(
        log.contains("module `large` has max_record_size = 10485760")
            && log.contains(&format!(
                "stream `{}` takes records of at most 1048576",
                bench.stream
            ))
            && log.contains("MaxRecordSizeInKiB = 1024")
            && log.contains("UpdateMaxRecordSize"),
        "{log}"
    );

    // kinesalite does not know the field: the stream has the default.
    let kinesalite = Kinesalite::start();
    let kinesis = kinesis_client(&kinesalite.endpoint()).await;
    let stream = unique_stream_name("kinesalite-large");
    create_stream(&kinesis, &stream, 1).await;
    let (module_spec, options) = large(&stream);
    let text = config_with_options(
        &bench.broker.url(),
        "ksm-too-large-2",
        &ksm_tests::guest_wasm(),
        &[module_spec],
        &options,
    );
    let log = refused_at_start(
        &text,
        aws_env(&kinesalite.endpoint(), &kinesalite.endpoint()),
    );
    assert!(
        log.contains(
            "takes records of at most 1048576 bytes (it does not say, so it has the default)"
        ),
        "{log}"
    );

    // Aggregates larger than the stream takes are refused the same way.
    let text = config(
        &bench.broker.url(),
        "ksm-too-large-3",
        &[module(
            "big-aggregates",
            &stream,
            "subscribe_events = [\"*\"]\naggregation = \"kpl\"\naggregation_max_bytes = 2000000",
        )],
    );
    let log = refused_at_start(
        &text,
        aws_env(&kinesalite.endpoint(), &kinesalite.endpoint()),
    );
    assert!(
        log.contains("module `big-aggregates` has aggregation_max_bytes = 2000000"),
        "{log}"
    );
}

/// Starts ksm with `text` and `env`, expects it to refuse to start (exit
/// non-zero within a minute), and returns its log.
fn refused_at_start(text: &str, env: Vec<(String, String)>) -> String {
    let mut host = Ksm::prepare(text, env, None);
    host.spawn_unchecked();
    let status = host.wait_for_exit(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| !s.success()),
        "{status:?}\n{}",
        host.log()
    );
    host.log()
}

/// Marks the poisoned record's data, which the proxy fails wherever it
/// finds it: inside an aggregate too.
const POISON: &str = "poison-in-the-aggregate";

fn reading(id: &str, note: &str) -> String {
    format!(r#"{{"eventType":"t","eventData":{{"id":"{id}","note":"{note}"}},"homeId":77}}"#)
}

/// A poisoned record shares aggregates with many others, which Kinesis
/// fails whole (`answer`) each time: the aggregates are halved until it
/// goes alone, only it becomes a dead letter (as the record it is, not as
/// an aggregate), and once Kinesis takes it, it replays.
async fn a_poison_record_is_narrowed_out_of_its_aggregates(prefix: &str, answer: PoisonAnswer) {
    let bench = Bench::new(prefix, 1).await;
    let proxy = RecordingProxy::start(&bench.moto.endpoint());
    proxy.set_poison(Some(Poison {
        marker: POISON.as_bytes().to_vec(),
        answer,
    }));
    let options = HostOptions {
        kinesis: "record_max_attempts = 4\nrecord_max_failing_secs = 600".into(),
        ..HostOptions::default()
    };
    let host = bench.ksm_with(
        &proxy.endpoint(),
        &format!("ksm-{prefix}"),
        &[aggregating("packed", &bench.stream)],
        &options,
    );
    let mut messages: Vec<(String, String)> = (0..5)
        .map(|n| {
            let note = if n == 1 { POISON } else { "-" };
            (
                "/devices/1001/event".to_owned(),
                reading(&format!("a{n}"), note),
            )
        })
        .collect();
    messages.extend((0..100).map(|d| (format!("/devices/{}/event", 2000 + d), reading("x", "-"))));
    bench.publish(&messages).await;
    let mut others = 100;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while host.counters("packed")["dead_lettered"] == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no dead letter:\n{}",
            host.module_log("packed")
        );
        let more: Vec<(String, String)> = (0..10)
            .map(|d| {
                (
                    format!("/devices/{}/event", 3000 + d),
                    reading(&format!("o{others}"), "-"),
                )
            })
            .collect();
        bench.publish(&more).await;
        others += 10;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expected = 4 + others;
    let counters = host.wait_for_counters("packed", |c| {
        c["forwarded"] == expected as u64 && c["spool_records"] == 0
    });
    assert_eq!(
        counters["forwarded"],
        expected as u64,
        "{counters}\n{}",
        host.log()
    );
    assert_eq!(counters["dead_lettered"], 1, "only the poison: {counters}");
    let letters = host.get("/api/modules/packed/dead-letters");
    let letter = &letters.as_array().expect("a list")[0];
    assert_eq!(letter["partition_key"], "1001", "{letter}");
    let data = dead_letter_data(letter);
    assert!(
        data.starts_with(b"{") && String::from_utf8_lossy(&data).contains(r#""id":"a1""#),
        "kept as its record: {letter}"
    );
    let read = ReferenceRead::of_stream(&bench.moto.endpoint(), &bench.stream);
    read.assert_well_placed();
    let ids_of_1001 = |read: &ReferenceRead| -> Vec<String> {
        read.per_key()["1001"]
            .iter()
            .map(|data| {
                let event: serde_json::Value = serde_json::from_slice(data).expect("an event");
                event["eventData"]["id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    };
    assert_eq!(ids_of_1001(&read), ["a0", "a2", "a3", "a4"]);
    assert_eq!(read.user_records.len(), expected);

    // Kinesis takes it now: replayed, it lands after the others of its key.
    proxy.set_poison(None);
    let (status, body) = host.post("/api/modules/packed/dead-letters/replay");
    assert_eq!(status, 202, "{body}");
    host.wait_for_counters("packed", |c| c["forwarded"] == expected as u64 + 1);
    let read = ReferenceRead::of_stream(&bench.moto.endpoint(), &bench.stream);
    assert_eq!(ids_of_1001(&read), ["a0", "a2", "a3", "a4", "a1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poison_record_in_a_failing_aggregate_is_the_only_dead_letter() {
    a_poison_record_is_narrowed_out_of_its_aggregates("agg-poison-entry", PoisonAnswer::EntryError)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poison_record_in_failing_requests_of_aggregates_is_the_only_dead_letter() {
    a_poison_record_is_narrowed_out_of_its_aggregates("agg-poison-500", PoisonAnswer::ServerError)
        .await;
}
