//! Dead letters: malformed input from a fuzzer-style generator lands in the
//! dead letters with a reason while the host keeps running, and dead letters
//! survive restarts and can be listed, shown, replayed and purged with
//! `ksm dead-letters`.

use std::collections::BTreeSet;
use std::time::Duration;

use ksm_host::bulk;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use ksm_tests::{aws_env, guest_wasm};

use crate::support::{
    Bench, HostOptions, Ksm, config_with_options, dead_letter_data, ksm_command, machine_to_myself,
    module,
};

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
    // More than one page: the listing pages 100 letters at a time by default.
    let first_page = host.get("/api/modules/fuzzed/dead-letters");
    assert_eq!(
        first_page.as_array().map(Vec::len),
        Some(100),
        "{first_page}"
    );
    let letters = host.all_dead_letters("fuzzed");
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
    assert!(lines[0].ends_with("\t200 bytes"), "{listed}");
    assert!(lines[1].ends_with("\t8 bytes"), "{listed}");
    let as_json = cli(&["list", "replayed", "--json"]);
    let as_json: Vec<serde_json::Value> = as_json
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(as_json.len(), 2);
    assert_eq!(dead_letter_data(&as_json[1]), b"not json");
    assert_eq!(as_json[0]["record_index"], 1);
    assert_eq!(as_json[0]["data_bytes"], 200);
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

/// The data limit of the host keeping big dead letters.
const BIG_DATA_LIMIT_MIB: u64 = 1024;
/// Its in-flight budget (`mqtt.inflight_max_mib`), which bounds what it
/// holds of messages being taken and of letters being replayed.
const BIG_INFLIGHT_MIB: u64 = 64;
/// The peak memory that host must stay under while it takes the letters:
/// the in-flight budget, what the MQTT client reads ahead of it (up to 10
/// messages), the guest's memory and the allocator's slack (measured:
/// 359 to 415 MiB).
const BIG_INTAKE_PEAK_RSS_BOUND_MIB: u64 = 600;
/// The peak memory the restarted host must stay under while it lists and
/// shows them: its working set and one shown letter, about 20 MB of JSON
/// (measured: 72 to 82 MiB).
const BIG_READ_PEAK_RSS_BOUND_MIB: u64 = 160;
/// The peak memory it must stay under once it has also replayed them: the
/// letters in flight (the in-flight budget) and the guest refusing them
/// again on top of that (measured: 144 to 157 MiB).
const BIG_REPLAY_PEAK_RSS_BOUND_MIB: u64 = 260;
/// Big refused messages, and their size.
const BIG_LETTERS: usize = 41;
const BIG_SIZE: usize = 15 * 1000 * 1000;
/// Medium ones, whose data a listing page carries, four to a page.
const MEDIUM_LETTERS: usize = 6;
const MEDIUM_SIZE: usize = 1000 * 1000;
/// Answers of the admin API that must stay smaller than this.
const PAGE_BOUND_BYTES: usize = 8 * 1024 * 1024;

/// A message the reference guest refuses whole (not a JSON object), of
/// `size` bytes, numbered `n` in its first 8 bytes.
fn refused_payload(n: usize, size: usize) -> Vec<u8> {
    let mut payload = vec![b'x'; size];
    payload[..8].copy_from_slice(&(n as u64).to_be_bytes());
    payload
}

/// The data files of a module's dead letters: name and size, by name.
fn data_files(host: &Ksm, module: &str) -> Vec<(String, u64)> {
    let dir = host.storage_dir().join("dead-letters").join(module);
    let mut files: Vec<(String, u64)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|file| {
            let file = file.expect("a directory entry");
            let size = file.metadata().expect("file metadata").len();
            (file.file_name().to_string_lossy().into_owned(), size)
        })
        .collect();
    files.sort();
    files
}

/// The IDs of a module's dead letters, paging `limit` at a time; checks
/// every page's size and that it holds no more than `limit` (and 1000).
fn paged_ids(host: &Ksm, module: &str, limit: &str) -> Vec<u64> {
    let mut ids = Vec::new();
    let mut after = 0;
    loop {
        let path = format!("/api/modules/{module}/dead-letters?after={after}&limit={limit}");
        let (status, body) = host.get_raw(&path);
        assert_eq!(status, 200, "GET {path}: {body}");
        assert!(
            body.len() < PAGE_BOUND_BYTES,
            "GET {path}: {} bytes",
            body.len()
        );
        let page: Vec<serde_json::Value> = serde_json::from_str(&body).expect("a JSON list");
        let most = limit.parse::<usize>().map_or(1000, |limit| limit.min(1000));
        assert!(page.len() <= most, "GET {path}: {} letters", page.len());
        let Some(last) = page.last() else {
            return ids;
        };
        after = last["id"].as_u64().expect("an ID");
        ids.extend(page.iter().map(|l| l["id"].as_u64().expect("an ID")));
    }
}

/// Shows one dead letter through the admin API: its data.
fn shown_data(host: &Ksm, module: &str, id: u64) -> Vec<u8> {
    let letter = host.get(&format!("/api/modules/{module}/dead-letters/{id}"));
    assert_eq!(letter["id"], id, "{}", letter["reason"]);
    let data = dead_letter_data(&letter);
    assert_eq!(letter["data_bytes"], data.len());
    data
}

/// 41 refused messages of 15 MB: each dead letter's data is a file of its
/// own; the letters survive a restart (which removes a file no letter
/// names); listing pages stay small and reach every letter, a huge `limit`
/// is capped, a letter is shown whole, replaying all of them brings each
/// back as a new dead letter, and purging removes the files, all while the
/// host's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_dead_letters_live_in_files_and_are_read_within_a_memory_bound() {
    let _machine = machine_to_myself().await;
    let bench = Bench::new("big-letters", 1).await;
    let options = HostOptions {
        mqtt: format!("inflight_max_mib = {BIG_INFLIGHT_MIB}"),
        ..HostOptions::default()
    };
    let config = config_with_options(
        &bench.broker.url(),
        "ksm-big-letters",
        &guest_wasm(),
        &[module("big", &bench.stream, "subscribe_events = [\"*\"]")],
        &options,
    );
    let endpoint = bench.moto.endpoint();
    let mut host = Ksm::start_limited(&config, aws_env(&endpoint, &endpoint), BIG_DATA_LIMIT_MIB);
    let topic = "/devices/1001/event";
    let numbers: Vec<usize> = (0..BIG_LETTERS).collect();
    // A few at a time, so the test itself stays small.
    for chunk in numbers.chunks(4) {
        let messages: Vec<(&str, Vec<u8>)> = chunk
            .iter()
            .map(|&n| (topic, refused_payload(n, BIG_SIZE)))
            .collect();
        bench.publish(&messages).await;
    }
    let medium: Vec<(&str, Vec<u8>)> = (0..MEDIUM_LETTERS)
        .map(|n| (topic, refused_payload(BIG_LETTERS + n, MEDIUM_SIZE)))
        .collect();
    bench.publish(&medium).await;
    let all = (BIG_LETTERS + MEDIUM_LETTERS) as u64;
    let counters = host.wait_for_counters_within("big", Duration::from_secs(300), |c| {
        c["dead_lettered"].as_u64() == Some(all)
    });
    assert_eq!(counters["dead_lettered"], all, "{counters}\n{}", host.log());
    let intake_peak = host.peak_rss_mib();

    // Each letter's data is a file of its own, holding exactly its bytes.
    let expected: Vec<(String, u64)> = (1..=all)
        .map(|id| {
            let size = if id as usize <= BIG_LETTERS {
                BIG_SIZE
            } else {
                MEDIUM_SIZE
            };
            (format!("{id:020}"), size as u64)
        })
        .collect();
    assert_eq!(data_files(&host, "big"), expected);

    // A restart keeps them, and removes a file no letter names (as a crash
    // between writing a letter's file and committing the letter leaves).
    assert!(host.stop(), "clean exit:\n{}", host.log());
    let orphan = host
        .storage_dir()
        .join("dead-letters/big")
        .join(format!("{:020}", 999));
    std::fs::write(&orphan, b"written before a crash").expect("write a stray file");
    host.restart();
    assert!(!orphan.exists(), "the stray file is removed on start");
    assert_eq!(data_files(&host, "big"), expected);

    // The first page lists the big letters without their data and carries
    // the data of as many medium ones as fit 4 MiB; the next page the rest.
    let (status, body) = host.get_raw("/api/modules/big/dead-letters");
    assert_eq!(status, 200, "{body}");
    let first_page_bytes = body.len();
    assert!(
        first_page_bytes < PAGE_BOUND_BYTES,
        "{first_page_bytes} bytes"
    );
    let page: Vec<serde_json::Value> = serde_json::from_str(&body).expect("a JSON list");
    drop(body);
    assert_eq!(page.len(), BIG_LETTERS + 4);
    for letter in &page[..BIG_LETTERS] {
        assert_eq!(letter["data_bytes"], BIG_SIZE, "{}", letter["id"]);
        assert_eq!(letter["data_omitted"], true);
        assert!(letter.get("data_base64").is_none());
        assert!(!letter["reason"].as_str().unwrap_or_default().is_empty());
        assert_eq!(letter["topic"], topic);
    }
    for (n, letter) in page[BIG_LETTERS..].iter().enumerate() {
        assert!(letter.get("data_omitted").is_none(), "{}", letter["id"]);
        assert_eq!(
            dead_letter_data(letter),
            refused_payload(BIG_LETTERS + n, MEDIUM_SIZE)
        );
    }
    drop(page);
    let every: Vec<u64> = (1..=all).collect();
    assert_eq!(
        paged_ids(&host, "big", "100"),
        every,
        "reachable page by page"
    );
    assert_eq!(paged_ids(&host, "big", "7"), every, "and 7 at a time");
    assert_eq!(
        paged_ids(&host, "big", "18446744073709551615"),
        every,
        "a huge limit is capped, not refused"
    );
    let smallest = host.get("/api/modules/big/dead-letters?limit=0");
    assert_eq!(
        smallest.as_array().map(Vec::len),
        Some(1),
        "at least one letter"
    );

    // One letter shown is exactly its bytes, through the API and the CLI.
    assert_eq!(shown_data(&host, "big", 17), refused_payload(16, BIG_SIZE));
    let config_path = host.config_path().display().to_string();
    let (ok, shown, stderr) = ksm_command(&[
        "dead-letters",
        "show",
        "big",
        "41",
        "--config",
        &config_path,
    ]);
    assert!(ok, "{stderr}");
    let shown: serde_json::Value = serde_json::from_str(&shown).expect("the letter as JSON");
    assert_eq!(shown["id"], 41);
    assert_eq!(shown["data_bytes"], BIG_SIZE);
    let text = shown["data_text"].as_str().expect("the data is text");
    assert_eq!(text.as_bytes(), refused_payload(40, BIG_SIZE));
    drop(shown);
    let (ok, listed, stderr) =
        ksm_command(&["dead-letters", "list", "big", "--config", &config_path]);
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), all as usize, "{listed}");
    assert!(
        lines[..BIG_LETTERS]
            .iter()
            .all(|l| l.ends_with("\t15000000 bytes")),
        "{listed}"
    );
    let reading_peak = host.peak_rss_mib();

    // The medium ones are purged by ID, files and all.
    let medium_ids: Vec<String> = (BIG_LETTERS as u64 + 1..=all)
        .map(|id| id.to_string())
        .collect();
    let purged = host.delete(&format!(
        "/api/modules/big/dead-letters?ids={}",
        medium_ids.join(",")
    ));
    assert_eq!(purged["count"], MEDIUM_LETTERS);
    assert_eq!(data_files(&host, "big"), expected[..BIG_LETTERS]);

    // Replaying all of them: still refused, each comes back as a new dead
    // letter, and the old one goes.
    let (status, body) = host.post("/api/modules/big/dead-letters/replay");
    assert_eq!(status, 202, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(answer["count"], BIG_LETTERS);
    let counters = host.wait_for_counters_within("big", Duration::from_secs(300), |c| {
        c["dead_lettered"].as_u64() == Some(BIG_LETTERS as u64)
    });
    assert_eq!(
        counters["dead_lettered"],
        BIG_LETTERS,
        "{counters}\n{}",
        host.log()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let replayed = loop {
        let ids = paged_ids(&host, "big", "100");
        if ids.iter().all(|&id| id > BIG_LETTERS as u64) {
            break ids;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replayed letters are deleted: {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(replayed.len(), BIG_LETTERS, "{replayed:?}");
    let mut seen = Vec::new();
    for id in [replayed[0], replayed[BIG_LETTERS - 1]] {
        let data = shown_data(&host, "big", id);
        let n = u64::from_be_bytes(data[..8].try_into().expect("8 bytes")) as usize;
        assert_eq!(data, refused_payload(n, BIG_SIZE));
        seen.push(n);
    }
    assert_ne!(seen[0], seen[1]);
    let files = data_files(&host, "big");
    let names: Vec<String> = replayed.iter().map(|id| format!("{id:020}")).collect();
    assert_eq!(
        files
            .iter()
            .map(|(name, _)| name.clone())
            .collect::<Vec<_>>(),
        names
    );
    assert!(files.iter().all(|(_, size)| *size == BIG_SIZE as u64));
    let replaying_peak = host.peak_rss_mib();

    // Purging all removes the files.
    let purged = host.delete("/api/modules/big/dead-letters");
    assert_eq!(purged["count"], BIG_LETTERS);
    assert!(data_files(&host, "big").is_empty());
    assert!(paged_ids(&host, "big", "100").is_empty());

    println!(
        "big dead letters: {BIG_LETTERS} x {BIG_SIZE} bytes; first listing page \
         {first_page_bytes} bytes; peak RSS {intake_peak} MiB taking them (bound \
         {BIG_INTAKE_PEAK_RSS_BOUND_MIB}), after a restart {reading_peak} MiB listing and \
         showing them (bound {BIG_READ_PEAK_RSS_BOUND_MIB}) and {replaying_peak} MiB with \
         replaying them (bound {BIG_REPLAY_PEAK_RSS_BOUND_MIB}); in-flight budget \
         {BIG_INFLIGHT_MIB} MiB, data limit {BIG_DATA_LIMIT_MIB} MiB"
    );
    assert!(
        intake_peak < BIG_INTAKE_PEAK_RSS_BOUND_MIB,
        "peak RSS {intake_peak} MiB taking them"
    );
    assert!(
        reading_peak < BIG_READ_PEAK_RSS_BOUND_MIB,
        "peak RSS {reading_peak} MiB listing and showing them"
    );
    assert!(
        replaying_peak < BIG_REPLAY_PEAK_RSS_BOUND_MIB,
        "peak RSS {replaying_peak} MiB replaying them"
    );
}

/// When a big dead letter's file cannot be written (here its directory is
/// a file, as a full disk would fail it too), its message is not
/// acknowledged and nothing is kept; once the directory is back, the broker
/// delivers the message again after a restart and its dead letter is kept
/// whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_whose_file_cannot_be_written_leaves_its_message_unacknowledged() {
    let bench = Bench::new("unwritable", 1).await;
    let mut host = bench.ksm(
        "ksm-unwritable",
        &[module("kept", &bench.stream, "subscribe_events = [\"*\"]")],
    );
    let dir = host.storage_dir().join("dead-letters/kept");
    std::fs::remove_dir(&dir).expect("the module's dead-letter directory, empty");
    std::fs::write(&dir, b"not a directory").expect("a file in its place");
    let payload = refused_payload(7, 100_000);
    bench.publish(&[("/devices/1001/event", &payload)]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !host
        .module_log("kept")
        .contains("cannot write to the store, messages stay unacknowledged")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the failed write is logged:\n{}",
            host.module_log("kept")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counters = host.counters("kept");
    assert_eq!(counters["received"], 1, "{counters}");
    assert_eq!(counters["dead_lettered"], 0, "{counters}");
    assert_eq!(
        host.get("/api/modules/kept/dead-letters"),
        serde_json::json!([])
    );

    assert!(host.stop(), "clean exit:\n{}", host.log());
    std::fs::remove_file(&dir).expect("remove the file");
    std::fs::create_dir(&dir).expect("the directory back");
    host.restart();
    let counters = host.wait_for_counters("kept", |c| c["dead_lettered"] == 1);
    assert_eq!(
        counters["dead_lettered"],
        1,
        "delivered again: {counters}\n{}",
        host.log()
    );
    let letters = host.get("/api/modules/kept/dead-letters");
    assert_eq!(letters.as_array().map(Vec::len), Some(1), "{letters}");
    let id = letters[0]["id"].as_u64().expect("an ID");
    assert_eq!(dead_letter_data(&letters[0]), payload);
    assert_eq!(
        data_files(&host, "kept"),
        [(format!("{id:020}"), payload.len() as u64)]
    );
}
