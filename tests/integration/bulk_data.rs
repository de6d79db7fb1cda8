//! Bulk data: MessagePack payloads unpacked into records, refused payloads
//! kept as dead letters with ERROR log entries.

use ksm_tests::read_all_records;

use crate::support::{Bench, dead_letter_data, module};

#[tokio::test(flavor = "multi_thread")]
async fn bulk_records_arrive_in_order_and_bad_input_becomes_dead_letters() {
    let bench = Bench::new("bulk", 2).await;
    let host = bench.ksm(
        "ksm-bulk",
        &[module(
            "telemetry",
            &bench.stream,
            "bulk_data_label = \"telemetry\"\nmax_record_size = 100",
        )],
    );

    let good: Vec<Vec<u8>> = (0..20)
        .map(|i| format!("reading-{i:02}").into_bytes())
        .collect();
    let mut oversize = vec![b"small-1".to_vec(), vec![b'x'; 97], b"small-2".to_vec()];
    oversize.push(Vec::new());
    let mut wrong_version = Vec::new();
    rmp::encode::write_str(&mut wrong_version, "2.0").unwrap();
    rmp::encode::write_bin(&mut wrong_version, b"r").unwrap();
    let mut not_bin = ksm_host::bulk::encode([b"ok".as_slice()]);
    rmp::encode::write_str(&mut not_bin, "a string, not bytes").unwrap();
    let truncated = {
        let mut payload = ksm_host::bulk::encode([vec![7u8; 50]]);
        payload.truncate(payload.len() - 10);
        payload
    };

    bench
        .publish(&[
            (
                "/devices/1001/bulkData/telemetry",
                ksm_host::bulk::encode(&good),
            ),
            (
                "/devices/1001/bulkData/other-label",
                ksm_host::bulk::encode([b"no"]),
            ),
            (
                "/devices/1001/bulkData/telemetry",
                ksm_host::bulk::encode(&oversize),
            ),
            ("/devices/1001/bulkData/telemetry", wrong_version.clone()),
            ("/devices/1001/bulkData/telemetry", not_bin.clone()),
            ("/devices/1001/bulkData/telemetry", truncated.clone()),
            (
                "/devices/1001/bulkData/telemetry",
                ksm_host::bulk::encode::<[&[u8]; 0]>([]),
            ),
        ])
        .await;

    // 20 good records, then small-1, small-2 and the empty record of the oversize payload.
    let counters = host.wait_for_counters("telemetry", |c| {
        c["forwarded"] == 23 && c["dead_lettered"] == 4
    });
    assert_eq!(counters["received"], 7, "{counters}");
    assert_eq!(counters["forwarded"], 23, "{counters}\n{}", host.log());
    assert_eq!(counters["dead_lettered"], 4, "{counters}");
    assert_eq!(
        counters["filtered"], 2,
        "other label and the empty payload: {counters}"
    );

    let records = bench.records(23).await;
    assert_eq!(records.len(), 23);
    assert!(records.iter().all(|r| r.partition_key == "1001"));
    let data: Vec<Vec<u8>> = records.iter().map(|r| r.data.clone()).collect();
    let mut expected = good.clone();
    expected.extend([b"small-1".to_vec(), b"small-2".to_vec(), Vec::new()]);
    assert_eq!(data, expected, "one key, one shard: publish order kept");

    let letters = host.get("/api/modules/telemetry/dead-letters");
    let letters = letters.as_array().expect("a list");
    assert_eq!(letters.len(), 4, "{letters:?}");
    let reason = |i: usize| letters[i]["reason"].as_str().unwrap_or_default().to_owned();
    assert!(
        reason(0).contains("record 1") && reason(0).contains("101 bytes"),
        "{}",
        reason(0)
    );
    assert_eq!(letters[0]["record_index"], 1);
    assert_eq!(
        dead_letter_data(&letters[0]),
        vec![b'x'; 97],
        "the refused record is kept"
    );
    assert!(reason(1).contains("2.0"), "{}", reason(1));
    assert_eq!(
        dead_letter_data(&letters[1]),
        wrong_version,
        "the whole payload is kept"
    );
    assert!(
        reason(2).contains("str") && reason(2).contains("element 1"),
        "{}",
        reason(2)
    );
    assert_eq!(dead_letter_data(&letters[2]), not_bin);
    assert!(reason(3).contains("truncated"), "{}", reason(3));
    assert_eq!(dead_letter_data(&letters[3]), truncated);
    for letter in letters {
        assert_eq!(letter["topic"], "/devices/1001/bulkData/telemetry");
    }

    let errors = host.get("/api/modules/telemetry/logs?level=error");
    let errors = errors.as_array().expect("a list");
    assert_eq!(errors.len(), 4, "one ERROR entry per refusal: {errors:?}");
    assert!(errors.iter().all(|e| e["level"] == "ERROR"));
    assert!(
        errors.iter().any(|e| e["message"]
            .as_str()
            .unwrap_or_default()
            .contains("unsupported bulk data version")),
        "{errors:?}"
    );
    let all = host.get("/api/modules/telemetry/logs");
    assert!(
        all.as_array().expect("a list").len() > errors.len(),
        "INFO entries too"
    );
    let (status, _) = host.get_raw("/api/modules/telemetry/logs?level=loud");
    assert_eq!(status, 400);
    let (status, _) = host.get_raw("/api/modules/nope/logs");
    assert_eq!(status, 404);

    // Nothing was forwarded for the other label.
    assert_eq!(
        read_all_records(&bench.kinesis, &bench.stream).await.len(),
        23
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn events_that_are_not_mode_events_become_dead_letters() {
    let bench = Bench::new("bad-events", 1).await;
    let host = bench.ksm(
        "ksm-bad-events",
        &[module(
            "events",
            &bench.stream,
            "subscribe_events = [\"*\"]",
        )],
    );
    bench
        .publish(&[
            ("/devices/1001/event", "not json".to_owned()),
            ("/devices/1001/event", r#"{"eventData":{}}"#.to_owned()),
            (
                "/devices/3003/event",
                r#"{"eventType":"x","eventData":{}}"#.to_owned(),
            ),
            (
                "/devices/abc/event",
                r#"{"eventType":"x","eventData":{}}"#.to_owned(),
            ),
            (
                "/devices/1001/event",
                r#"{"eventType":"ok","eventData":{}}"#.to_owned(),
            ),
        ])
        .await;
    let counters =
        host.wait_for_counters("events", |c| c["forwarded"] == 1 && c["dead_lettered"] == 4);
    assert_eq!(counters["dead_lettered"], 4, "{counters}\n{}", host.log());
    let letters = host.get("/api/modules/events/dead-letters");
    let reasons: Vec<&str> = letters
        .as_array()
        .expect("a list")
        .iter()
        .map(|l| l["reason"].as_str().unwrap_or_default())
        .collect();
    assert!(reasons[0].contains("JSON"), "{reasons:?}");
    assert!(reasons[1].contains("eventType"), "{reasons:?}");
    assert!(
        reasons[2].contains("homeId"),
        "unknown device, no homeId: {reasons:?}"
    );
    assert!(
        reasons[3].contains("abc"),
        "bad device ID in the topic: {reasons:?}"
    );
    let records = read_all_records(&bench.kinesis, &bench.stream).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].data_json()["eventType"], "ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_on_a_bad_topic_is_one_dead_letter_in_the_module_it_names() {
    let bench = Bench::new("bad-topics", 1).await;
    let host = bench.ksm(
        "ksm-bad-topics",
        &[
            module("events", &bench.stream, "subscribe_events = [\"*\"]"),
            module(
                "telemetry",
                &bench.stream,
                "bulk_data_label = \"telemetry\"",
            ),
        ],
    );
    let event = r#"{"eventType":"x","eventData":{}}"#;
    let bulk = ksm_host::bulk::encode([b"r"]);
    bench
        .publish(&[
            // Device 1 in disguise: not its topic.
            ("/devices/0001/event", event.as_bytes()),
            ("/devices/x1/bulkData/telemetry", bulk.as_slice()),
        ])
        .await;
    let events = host.wait_for_counters("events", |c| c["dead_lettered"] == 1);
    let telemetry = host.wait_for_counters("telemetry", |c| c["dead_lettered"] == 1);
    assert_eq!(events["dead_lettered"], 1, "{events}");
    assert_eq!(telemetry["dead_lettered"], 1, "{telemetry}");
    let kept_by = |module: &str| host.get(&format!("/api/modules/{module}/dead-letters"));
    let event_letter = &kept_by("events")[0];
    assert_eq!(event_letter["topic"], "/devices/0001/event");
    assert!(
        event_letter["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no leading zeros")),
        "{event_letter}"
    );
    assert_eq!(
        kept_by("telemetry")[0]["topic"],
        "/devices/x1/bulkData/telemetry"
    );
    // Each module saw only the message it keeps.
    assert_eq!(events["received"], 1, "{events}");
    assert_eq!(telemetry["received"], 1, "{telemetry}");
}
