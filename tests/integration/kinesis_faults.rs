//! Kinesis failures: throttling (injected by a proxy in front of moto) is
//! retried and reported with what to do; a missing stream makes the data
//! wait, and it is delivered once the stream exists; a record Kinesis
//! refuses becomes a dead letter that can be replayed; records are paced
//! per shard; a stopped host keeps its spool.

use std::time::{Duration, Instant};

use ksm_tests::{RecordingProxy, create_stream, read_all_records};

use crate::support::{Bench, HostOptions, ksm_command, module};

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
