//! Kinesis failures: throttling (injected by a proxy in front of moto) is
//! retried and reported with what to do; a missing stream makes the data
//! wait, and it is delivered once the stream exists.

use std::time::Duration;

use ksm_tests::{RecordingProxy, create_stream, read_all_records};

use crate::support::{Bench, module};

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
