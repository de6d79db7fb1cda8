//! Dead letters: malformed input from a fuzzer-style generator lands in the
//! dead letters with a reason while the host keeps running, and dead letters
//! survive restarts and can be listed, shown, replayed and purged with
//! `ksm dead-letters`.

use std::collections::BTreeSet;
use std::time::Duration;

use ksm_host::bulk;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::support::{Bench, dead_letter_data, ksm_command, module};

/// One malformed message and what its dead letter must hold.
struct Malformed {
    topic: String,
    payload: Vec<u8>,
    /// The dead letter holds the payload itself (false: the record the guest
    /// made of it, for records too large for Kinesis).
    keeps_payload: bool,
}

/// Malformed input of every kind, from a seeded generator.
fn malformed_inputs(seed: u64) -> Vec<Malformed> {
    let mut rng = StdRng::seed_from_u64(seed);
    let event = |device: u64| format!("/devices/{device}/event");
    let bulk_topic = |device: u64| format!("/devices/{device}/bulkData/telemetry");
    let mut inputs = Vec::new();
    let mut push = |topic: String, payload: Vec<u8>| {
        inputs.push(Malformed {
            topic,
            payload,
            keeps_payload: true,
        });
    };
    for i in 0..40u64 {
        // Random bytes (not JSON; some not UTF-8), as an event and as bulk data.
        let len = rng.random_range(0..300);
        let mut noise: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if noise.first() == Some(&b'{') {
            noise[0] = b'!';
        }
        push(event(1 + i % 5), noise.clone());
        if noise.is_empty() || noise[0] != 0xa3 {
            push(bulk_topic(1 + i % 5), noise);
        }
    }
    for i in 0..20u64 {
        // Bulk payloads cut short inside the version or the first record.
        let full = bulk::encode([vec![b'r'; 50 + i as usize]]);
        // Never right after the version: that is a valid payload of no records.
        let cut = match rng.random_range(1..full.len() - 50) {
            4 => 5,
            cut => cut,
        };
        push(bulk_topic(1), full[..cut].to_vec());
    }
    // A wrong version, and a record that is not a byte array.
    push(bulk_topic(2), bulk::encode_version("2.0", [b"abc"]));
    push(bulk_topic(2), b"\xa31.0\xa5hello".to_vec());
    // Deeply nested JSON, truncated JSON, JSON that is not an event.
    let deep = format!(
        r#"{{"eventType":"deep","eventData":{}1{}}}"#,
        "[".repeat(50_000),
        "]".repeat(50_000)
    );
    push(event(3), deep.into_bytes());
    push(
        event(3),
        br#"{"eventType":"cut","eventData":{"a":"#.to_vec(),
    );
    push(event(3), br#"{"eventData":{}}"#.to_vec());
    push(event(3), br#"[1,2,3]"#.to_vec());
    push(event(3), br#"{"eventType":42,"eventData":{}}"#.to_vec());
    // A topic whose device ID is not a number.
    push(
        "/devices/abc/event".into(),
        br#"{"eventType":"x","eventData":{}}"#.to_vec(),
    );
    // A valid event too large for one Kinesis record (about 1.5 MiB).
    let huge = format!(
        r#"{{"eventType":"huge","eventData":{{"blob":"{}"}},"homeId":1}}"#,
        "h".repeat(1536 * 1024)
    );
    inputs.push(Malformed {
        topic: event(4242),
        payload: huge.into_bytes(),
        keeps_payload: false,
    });
    inputs
}

/// 7. Malformed input of every kind: the host stays up, each lands in the
///    dead letters with a reason and an ERROR entry, and good messages
///    around it still flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_becomes_dead_letters_and_the_host_stays_up() {
    let bench = Bench::new("malformed", 1).await;
    let host = bench.ksm(
        "ksm-malformed",
        &[module(
            "fuzzed",
            &bench.stream,
            "subscribe_events = [\"*\"]\nbulk_data_label = \"telemetry\"",
        )],
    );
    let inputs = malformed_inputs(2026);
    let mut messages: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        messages.push((input.topic.clone(), input.payload.clone()));
        messages.push((
            "/devices/1001/event".into(),
            format!(r#"{{"eventType":"good","eventData":{{"n":{i}}}}}"#).into_bytes(),
        ));
    }
    bench.publish(&messages).await;

    let good = bench.records(inputs.len()).await;
    assert_eq!(
        good.len(),
        inputs.len(),
        "every good message arrives\n{}\n{}",
        host.module_log("fuzzed"),
        host.log()
    );
    let counters = host.wait_for_counters("fuzzed", |c| {
        c["dead_lettered"].as_u64() == Some(inputs.len() as u64)
    });
    assert_eq!(
        counters["dead_lettered"].as_u64(),
        Some(inputs.len() as u64),
        "{counters}\n{}",
        host.log()
    );
    let letters = host.get("/api/modules/fuzzed/dead-letters");
    let letters = letters.as_array().expect("a list");
    assert_eq!(letters.len(), inputs.len());
    let kept: Vec<(String, Vec<u8>)> = letters
        .iter()
        .map(|l| {
            assert!(
                !l["reason"].as_str().unwrap_or("").is_empty(),
                "every dead letter says why: {l}"
            );
            (
                l["topic"].as_str().unwrap_or("").to_owned(),
                dead_letter_data(l),
            )
        })
        .collect();
    for input in &inputs {
        let found = kept.iter().any(|(topic, data)| {
            topic == &input.topic && (!input.keeps_payload || data == &input.payload)
        });
        assert!(
            found,
            "no dead letter for a {}-byte message on {}",
            input.payload.len(),
            input.topic
        );
    }
    let huge = letters
        .iter()
        .find(|l| l["topic"] == "/devices/4242/event")
        .expect("the huge event's dead letter");
    assert!(
        huge["reason"].as_str().unwrap_or("").contains("bytes"),
        "the reason gives the size: {huge}"
    );
    let errors = host.get("/api/modules/fuzzed/logs?level=error");
    assert!(
        errors.as_array().map_or(0, Vec::len) >= inputs.len(),
        "an ERROR entry per refused message"
    );
    let (status, _) = host.get_raw("/api/health");
    assert_eq!(status, 200, "the host is still up");
    eprintln!(
        "fault-figures: malformed input: sent {} malformed and {} good, dead letters {}, good landed {}",
        inputs.len(),
        inputs.len(),
        letters.len(),
        good.len()
    );
}

/// Dead letters survive a restart; once the cause is fixed they can be
/// replayed into the stream, and others purged, with `ksm dead-letters`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_survive_restarts_and_can_be_replayed_and_purged() {
    let bench = Bench::new("replay", 1).await;
    let mut host = bench.ksm(
        "ksm-replay",
        &[module(
            "replayed",
            &bench.stream,
            "subscribe_events = [\"*\"]\nbulk_data_label = \"telemetry\"\nmax_record_size = 100",
        )],
    );
    let big = vec![b'b'; 200];
    bench
        .publish(&[
            (
                "/devices/5/bulkData/telemetry",
                bulk::encode([b"small".to_vec(), big.clone()]),
            ),
            ("/devices/5/event", b"not json".to_vec()),
        ])
        .await;
    let first = bench.records(1).await;
    assert_eq!(first[0].data, b"small");
    host.wait_for_counters("replayed", |c| c["dead_lettered"] == 2);

    // Raise the record limit and restart: the dead letters are still there.
    assert!(host.stop(), "clean exit:\n{}", host.log());
    host.edit_config(|text| text.replace("max_record_size = 100", "max_record_size = 1000"));
    host.restart();
    let config = host.config_path().display().to_string();
    let cli = |args: &[&str]| {
        let mut all = vec!["dead-letters"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--config", &config]);
        let (ok, stdout, stderr) = ksm_command(&all);
        assert!(ok, "ksm {all:?} failed: {stderr}");
        stdout
    };
    let listed = cli(&["list", "replayed"]);
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 2, "{listed}");
    let ids: Vec<&str> = lines
        .iter()
        .map(|l| l.split('\t').next().unwrap_or(""))
        .collect();
    assert!(
        lines[0].contains("/devices/5/bulkData/telemetry"),
        "{listed}"
    );
    let shown = cli(&["show", "replayed", ids[1]]);
    assert!(shown.contains("\"data_text\": \"not json\""), "{shown}");

    // Replay the refused bulk record: it now fits, lands, and its dead letter goes.
    let replayed = cli(&["replay", "replayed", ids[0]]);
    assert!(replayed.contains("1 dead letters queued"), "{replayed}");
    let records = bench.records(2).await;
    assert_eq!(
        records[1].data, big,
        "the replayed record lands after the first"
    );
    assert_eq!(records[1].partition_key, "5");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while host
        .get("/api/modules/replayed/dead-letters")
        .as_array()
        .map_or(0, Vec::len)
        != 1
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the replayed letter stays"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Purge the rest.
    let purged = cli(&["purge", "replayed", "--all"]);
    assert!(purged.contains("1 dead letters deleted"), "{purged}");
    assert_eq!(cli(&["list", "replayed"]), "");
    let missing = ksm_command(&[
        "dead-letters",
        "show",
        "replayed",
        ids[1],
        "--config",
        &config,
    ]);
    assert!(!missing.0 && missing.2.contains("404"), "{missing:?}");
    let remaining: BTreeSet<String> = host
        .module_log("replayed")
        .lines()
        .filter(|l| l.contains("dead letters"))
        .map(str::to_owned)
        .collect();
    assert!(!remaining.is_empty(), "replays and purges are logged");
}
