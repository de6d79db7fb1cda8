//! Kinesis failures: throttling (injected by a proxy in front of moto) is
//! retried and reported with what to do; a missing stream makes the data
//! wait, and it is delivered once the stream exists; a record Kinesis
//! refuses becomes a dead letter that can be replayed; a record Kinesis
//! keeps failing while others go through becomes a dead letter and its key
//! moves on, while an outage dead-letters nothing; records are paced per
//! shard; a stopped host keeps its spool.

use std::time::{Duration, Instant};

use base64::Engine as _;
use ksm_tests::proxy::{Poison, PoisonAnswer};
use ksm_tests::{
    Faults, ReadRecord, RecordedRequest, RecordingProxy, create_stream, read_all_records,
};

use crate::support::{Bench, HostOptions, dead_letter_data, ksm_command, module};

const THROTTLED: &str =
    r#"{"__type":"ProvisionedThroughputExceededException","message":"Rate exceeded for shard"}"#;
const ONE_RECORD_THROTTLED: &str = r#"{"FailedRecordCount":1,"Records":[{"ErrorCode":"ProvisionedThroughputExceededException","ErrorMessage":"Rate exceeded for shard shardId-000000000000"}]}"#;

#[tokio::test(flavor = "multi_thread")]
async fn throttled_records_are_retried_and_the_log_says_what_to_do() {
    let bench = Bench::new("throttled", 1).await;
    let proxy = RecordingProxy::start(&bench.moto.endpoint());
    let host = bench.ksm_via(
        &proxy.endpoint(),
        "ksm-throttled",
        &[module("busy", &bench.stream, "subscribe_events = [\"*\"]")],
    );
    // Two requests throttled whole, then one answered 200 with its only record failed.
    proxy.inject_error("PutRecords", 2, 400, THROTTLED);
    proxy.inject_error("PutRecords", 1, 200, ONE_RECORD_THROTTLED);

    bench
        .publish(&[(
            "/devices/1001/event",
            r#"{"eventType":"t","eventData":{"n":1}}"#,
        )])
        .await;
    let records = bench.records(1).await;
    assert_eq!(records.len(), 1, "{}", host.log());
    let counters = host.wait_for_counters("busy", |c| c["forwarded"] == 1);
    assert_eq!(counters["throttled"], 3, "{counters}");
    assert_eq!(counters["retried"], 3, "{counters}");
    assert_eq!(
        proxy.requests_for("PutRecords").len(),
        4,
        "three refused attempts, one accepted"
    );

    let errors = host.get("/api/modules/busy/logs?level=error");
    let message = errors[0]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("lacks write throughput capacity") && message.contains("add shards"),
        "{errors}"
    );
    // Nothing more arrives later: the record was put exactly once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        read_all_records(&bench.kinesis, &bench.stream).await.len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn data_for_a_missing_stream_waits_until_the_stream_exists() {
    let bench = Bench::without_stream("late-stream").await;
    let host = bench.ksm(
        "ksm-late-stream",
        &[module(
            "patient",
            &bench.stream,
            "subscribe_events = [\"*\"]",
        )],
    );
    bench
        .publish(&[("/devices/1001/event", r#"{"eventType":"t","eventData":{}}"#)])
        .await;

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let errors = loop {
        let errors = host.get("/api/modules/patient/logs?level=error");
        if !errors.as_array().expect("a list").is_empty() || std::time::Instant::now() > deadline {
            break errors;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let message = errors[0]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("ResourceNotFoundException") && message.contains("does not exist"),
        "{errors}"
    );
    assert_eq!(host.counters("patient")["forwarded"], 0);

    create_stream(&bench.kinesis, &bench.stream, 1).await;
    let records = bench.records(1).await;
    assert_eq!(records.len(), 1, "{}", host.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_kinesis_refuses_becomes_a_dead_letter_that_can_be_replayed() {
    let bench = Bench::new("refused", 1).await;
    let proxy = RecordingProxy::start(&bench.moto.endpoint());
    let host = bench.ksm_via(
        &proxy.endpoint(),
        "ksm-refused",
        &[module(
            "strict",
            &bench.stream,
            "subscribe_events = [\"*\"]",
        )],
    );
    proxy.inject_error(
        "PutRecords",
        1,
        400,
        r#"{"__type":"ValidationException","message":"1 validation error detected"}"#,
    );
    bench
        .publish(&[(
            "/devices/1001/event",
            r#"{"eventType":"t","eventData":{"n":1}}"#,
        )])
        .await;
    let counters = host.wait_for_counters("strict", |c| c["dead_lettered"] == 1);
    assert_eq!(counters["dead_lettered"], 1, "{counters}\n{}", host.log());
    assert_eq!(
        counters["spool_records"], 0,
        "moved out of the spool: {counters}"
    );
    let letters = host.get("/api/modules/strict/dead-letters");
    let letter = &letters[0];
    assert_eq!(letter["partition_key"], "1001", "{letter}");
    assert!(
        letter["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("ValidationException"),
        "{letter}"
    );

    let config = host.config_path().display().to_string();
    let (ok, stdout, stderr) =
        ksm_command(&["dead-letters", "replay", "strict", "--config", &config]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("1 dead letters queued"), "{stdout}");
    let records = bench.records(1).await;
    assert_eq!(records[0].partition_key, "1001");
    assert_eq!(records[0].data_json()["eventType"], "t");
}

#[tokio::test(flavor = "multi_thread")]
async fn records_are_paced_per_shard() {
    let bench = Bench::new("paced", 1).await;
    let options = HostOptions {
        kinesis: "shard_records_per_sec = 100".into(),
        ..HostOptions::default()
    };
    let host = bench.ksm_with(
        &bench.moto.endpoint(),
        "ksm-paced",
        &[module("paced", &bench.stream, "subscribe_events = [\"*\"]")],
        &options,
    );
    // 400 devices, one event each: nothing but the pacing holds them back.
    let messages: Vec<(String, String)> = (0..400)
        .map(|n| {
            (
                format!("/devices/{}/event", 10_000 + n),
                format!(r#"{{"eventType":"p","eventData":{{"n":{n}}},"homeId":1}}"#),
            )
        })
        .collect();
    let started = Instant::now();
    bench.publish(&messages).await;
    let records = bench.records(400).await;
    let elapsed = started.elapsed();
    assert_eq!(records.len(), 400);
    // A full bucket lets 100 through at once; the other 300 take 3 s at 100/s.
    assert!(
        elapsed >= Duration::from_millis(2800),
        "400 records to one shard paced at 100/s took only {elapsed:?}"
    );
    let log = host.module_log("paced");
    assert!(
        log.contains("has 1 open shards; pacing each under 100 records/s"),
        "{log}"
    );
    assert_eq!(host.counters("paced")["throttled"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_host_keeps_its_spool_and_resumes_from_it() {
    let bench = Bench::new("resume", 1).await;
    let proxy = RecordingProxy::start(&bench.moto.endpoint());
    proxy.set_down(true);
    let mut host = bench.ksm_via(
        &proxy.endpoint(),
        "ksm-resume",
        &[module(
            "resumed",
            &bench.stream,
            "subscribe_events = [\"*\"]",
        )],
    );
    let messages: Vec<(String, String)> = (0..50)
        .map(|n| {
            (
                "/devices/1001/event".to_owned(),
                format!(r#"{{"eventType":"r","eventData":{{"n":{n}}}}}"#),
            )
        })
        .collect();
    bench.publish(&messages).await;
    let spooled = host.wait_for_counters("resumed", |c| c["spool_records"] == 50);
    assert_eq!(spooled["spool_records"], 50, "{spooled}");
    assert!(host.stop(), "SIGTERM exits cleanly:\n{}", host.log());

    proxy.set_down(false);
    host.restart();
    let records = bench.records(50).await;
    let order: Vec<u64> = records
        .iter()
        .map(|r| r.data_json()["eventData"]["n"].as_u64().unwrap_or(u64::MAX))
        .collect();
    assert_eq!(order, (0..50).collect::<Vec<_>>(), "all of them, in order");
    let log = host.module_log("resumed");
    assert!(log.contains("resuming 50 records"), "{log}");
    assert!(
        log.contains("stopping with 50 records in the spool"),
        "the log from before the restart is kept:\n{log}"
    );
}

/// The bytes that poison a record at the proxy.
const MARKER: &str = "POISON-7f3a";

/// A device event whose data carry `id`, and the marker if `poisoned`.
fn event(id: &str, poisoned: bool) -> String {
    let note = if poisoned { MARKER } else { "-" };
    format!(r#"{{"eventType":"t","eventData":{{"id":"{id}","note":"{note}"}},"homeId":77}}"#)
}

/// The `id`s of the records of partition key `key`, in stream order.
fn ids(records: &[ReadRecord], key: &str) -> Vec<String> {
    records
        .iter()
        .filter(|r| r.partition_key == key)
        .map(|r| {
            r.data_json()["eventData"]["id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// The base64-decoded data of each entry of a recorded `PutRecords`.
fn entries(request: &RecordedRequest) -> Vec<Vec<u8>> {
    let body = request.body_json().unwrap_or_default();
    body["Records"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|entry| {
            base64::engine::general_purpose::STANDARD
                .decode(entry["Data"].as_str().unwrap_or_default())
                .unwrap_or_default()
        })
        .collect()
}

/// The number of entries of each `PutRecords` the proxy saw that carried `text`, in order.
fn requests_carrying(proxy: &RecordingProxy, text: &str) -> Vec<usize> {
    proxy
        .requests_for("PutRecords")
        .iter()
        .map(entries)
        .filter(|entries| {
            entries
                .iter()
                .any(|data| String::from_utf8_lossy(data).contains(text))
        })
        .map(|entries| entries.len())
        .collect()
}

/// Polls `done` every 50 ms until it holds; panics with `what` after `timeout`.
async fn wait_until(what: &str, timeout: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Device 1001's second event is poison at the proxy, answered as `answer` every time, while
/// device 1002 keeps publishing: the poison becomes one dead letter after 4 counted failures,
/// and every other event lands, each device's in order.
async fn a_poison_record_becomes_a_dead_letter_and_its_key_moves_on(
    prefix: &str,
    answer: PoisonAnswer,
) {
    let bench = Bench::new(prefix, 1).await;
    let proxy = RecordingProxy::start(&bench.moto.endpoint());
    proxy.set_poison(Some(Poison {
        marker: MARKER.as_bytes().to_vec(),
        answer,
    }));
    let options = HostOptions {
        kinesis: "record_max_attempts = 4\nrecord_max_failing_secs = 600".into(),
        ..HostOptions::default()
    };
    let host = bench.ksm_with(
        &proxy.endpoint(),
        &format!("ksm-{prefix}"),
        &[module(
            "poisoned",
            &bench.stream,
            "subscribe_events = [\"*\"]",
        )],
        &options,
    );
    let first: Vec<(String, String)> = (0..5)
        .map(|n| {
            (
                "/devices/1001/event".to_owned(),
                event(&format!("a{n}"), n == 1),
            )
        })
        .collect();
    bench.publish(&first).await;
    // Device 1002 goes on meanwhile: other records go through while the poison fails.
    let mut others = 0;
    let deadline = Instant::now() + Duration::from_secs(40);
    while host.counters("poisoned")["dead_lettered"] == 0 {
        assert!(
            Instant::now() < deadline,
            "no dead letter:\n{}",
            host.module_log("poisoned")
        );
        let message = event(&format!("b{others}"), false);
        bench.publish(&[("/devices/1002/event", message)]).await;
        others += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let expected = 4 + others;
    let records = bench.records(expected).await;
    assert_eq!(records.len(), expected, "{}", host.module_log("poisoned"));
    assert_eq!(
        ids(&records, "1001"),
        ["a0", "a2", "a3", "a4"],
        "the key moved on past the poison, in order"
    );
    let device_1002: Vec<String> = (0..others).map(|n| format!("b{n}")).collect();
    assert_eq!(ids(&records, "1002"), device_1002);

    let counters = host.wait_for_counters("poisoned", |c| {
        c["spool_records"] == 0 && c["forwarded"] == expected as u64
    });
    assert_eq!(counters["forwarded"], expected as u64, "{counters}");
    assert_eq!(counters["dead_lettered"], 1, "{counters}");
    assert_eq!(counters["spool_records"], 0, "{counters}");
    assert!(counters["retried"].as_u64() >= Some(3), "{counters}");

    let letters = host.get("/api/modules/poisoned/dead-letters");
    let letters = letters.as_array().expect("a list");
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter["partition_key"], "1001", "{letter}");
    assert!(
        String::from_utf8_lossy(&dead_letter_data(letter)).contains(r#""id":"a1""#),
        "{letter}"
    );
    let reason = letter["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("Kinesis failed this record 4 times in a row (InternalFailure: injected)")
            && reason.contains("while other records went through"),
        "{reason}"
    );
    let errors = host.get("/api/modules/poisoned/logs?level=error");
    let errors = errors.as_array().expect("a list");
    assert_eq!(errors.len(), 1, "{errors:?}");
    let message = errors[0]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("dead letter") && message.contains("4 times in a row"),
        "{message}"
    );

    // On the wire: the poison was sent at least 4 times; as a server error it ends up alone.
    let sizes = requests_carrying(&proxy, MARKER);
    assert!(sizes.len() >= 4, "{sizes:?}");
    let stats = proxy.put_records_stats();
    match answer {
        PoisonAnswer::ServerError => {
            assert_eq!(stats.poison_server_errors, sizes.len() as u64, "{stats:?}");
            assert!(sizes.iter().rev().take(4).all(|n| *n == 1), "{sizes:?}");
        }
        PoisonAnswer::EntryError => {
            assert_eq!(stats.poison_entries_failed, sizes.len() as u64, "{stats:?}");
        }
    }
    assert!(
        proxy
            .accepted_records()
            .iter()
            .all(|r| !r.data_text().contains(MARKER)),
        "the emulator never got the poison"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_whose_requests_kinesis_keeps_failing_becomes_a_dead_letter() {
    a_poison_record_becomes_a_dead_letter_and_its_key_moves_on(
        "poison-500",
        PoisonAnswer::ServerError,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_kinesis_keeps_failing_in_its_answers_becomes_a_dead_letter() {
    a_poison_record_becomes_a_dead_letter_and_its_key_moves_on(
        "poison-entry",
        PoisonAnswer::EntryError,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outage_dead_letters_nothing_and_every_record_lands_after_it() {
    let bench = Bench::new("outage-kept", 1).await;
    let proxy = RecordingProxy::start(&bench.moto.endpoint());
    // The most eager limits there are: two failures, or one second.
    let options = HostOptions {
        kinesis: "record_max_attempts = 2\nrecord_max_failing_secs = 1".into(),
        ..HostOptions::default()
    };
    let host = bench.ksm_with(
        &proxy.endpoint(),
        "ksm-outage-kept",
        &[module(
            "patient",
            &bench.stream,
            "subscribe_events = [\"*\"]",
        )],
        &options,
    );
    let messages = |range: std::ops::Range<u32>| -> Vec<(String, String)> {
        range
            .flat_map(|n| {
                [
                    (
                        "/devices/1001/event".to_owned(),
                        event(&format!("a{n}"), false),
                    ),
                    (
                        "/devices/1002/event".to_owned(),
                        event(&format!("b{n}"), false),
                    ),
                ]
            })
            .collect()
    };

    // Every request answered 500 InternalFailure...
    proxy.set_faults(Faults {
        server_error_ratio: 1.0,
        ..Faults::default()
    });
    bench.publish(&messages(0..5)).await;
    wait_until("20 server errors", Duration::from_secs(30), || {
        proxy.put_records_stats().server_errors_injected >= 20
    })
    .await;
    bench.publish(&messages(5..10)).await;
    // ...then every entry failed with InternalFailure in 200 answers...
    proxy.set_poison(Some(Poison {
        marker: Vec::new(),
        answer: PoisonAnswer::EntryError,
    }));
    proxy.set_faults(Faults::default());
    wait_until("20 failed entries", Duration::from_secs(20), || {
        proxy.put_records_stats().poison_entries_failed >= 20
    })
    .await;
    // ...then no answer at all.
    proxy.set_down(true);
    wait_until("refused connections", Duration::from_secs(20), || {
        proxy.put_records_stats().refused_while_down >= 3
    })
    .await;
    let during = host.counters("patient");
    assert_eq!(during["forwarded"], 0, "{during}");
    assert_eq!(during["dead_lettered"], 0, "{during}");

    proxy.set_poison(None);
    proxy.set_down(false);
    let records = bench.records(20).await;
    assert_eq!(records.len(), 20, "{}", host.module_log("patient"));
    let expected =
        |prefix: &str| -> Vec<String> { (0..10).map(|n| format!("{prefix}{n}")).collect() };
    assert_eq!(ids(&records, "1001"), expected("a"));
    assert_eq!(ids(&records, "1002"), expected("b"));
    let counters = host.wait_for_counters("patient", |c| c["spool_records"] == 0);
    assert_eq!(counters["forwarded"], 20, "{counters}");
    assert_eq!(counters["dead_lettered"], 0, "{counters}");
    assert_eq!(
        host.get("/api/modules/patient/dead-letters"),
        serde_json::json!([])
    );
    // Each first record failed far more often than the limits allow a record Kinesis fails.
    for first in [r#""id":"a0""#, r#""id":"b0""#] {
        let attempts = requests_carrying(&proxy, first).len();
        assert!(attempts >= 8, "{first} was sent {attempts} times");
    }
}
