//! Live module management: modules added, changed and deleted through the
//! admin API while devices publish, with nothing acknowledged lost; each
//! change kept in the configuration file, and refused with the problems
//! `ksm validate` reports for the same settings.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ksm_tests::proxy::RecordingProxy;
use ksm_tests::{ReadRecord, create_stream, publish_all, unique_stream_name, wait_for_records};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::support::{Bench, Ksm, ksm_command, module};

/// Messages a chunk of the load holds; each chunk waits for its PUBACKs.
const CHUNK: u64 = 20;
/// How long the tests wait for records to land.
const RECORD_WAIT: Duration = Duration::from_secs(30);

/// Devices publishing numbered events, `keep` and `drop` in turn, until stopped.
struct Load {
    /// Messages whose publishing has begun.
    begun: Arc<AtomicU64>,
    running: Arc<AtomicBool>,
    task: JoinHandle<u64>,
}

impl Load {
    fn start(broker_url: &str) -> Load {
        let begun = Arc::new(AtomicU64::new(0));
        let running = Arc::new(AtomicBool::new(true));
        let (url, counting, going) = (broker_url.to_owned(), begun.clone(), running.clone());
        let task = tokio::spawn(async move {
            let mut sent = 0;
            while going.load(Ordering::Acquire) {
                let messages: Vec<(String, String)> = (sent..sent + CHUNK).map(event).collect();
                counting.store(sent + CHUNK, Ordering::Release);
                publish_all(&url, &messages).await;
                sent += CHUNK;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            sent
        });
        Load {
            begun,
            running,
            task,
        }
    }

    /// Every message numbered from this one on is published after now.
    fn next(&self) -> u64 {
        self.begun.load(Ordering::Acquire)
    }

    /// Stops after the chunk under way; the number of messages published.
    async fn stop(self) -> u64 {
        self.running.store(false, Ordering::Release);
        self.task.await.expect("the load finishes")
    }
}

/// Message `n`: a `keep` event for even `n`, a `drop` event for odd.
fn event(n: u64) -> (String, String) {
    let kind = if n.is_multiple_of(2) { "keep" } else { "drop" };
    (
        format!("/devices/{}/event", 1 + n % 10),
        format!(r#"{{"eventType":"{kind}","eventData":{{"n":{n}}},"homeId":7}}"#),
    )
}

/// The message numbers of records, each once, failing on a repeat.
fn numbers(records: &[ReadRecord], stream: &str) -> BTreeSet<u64> {
    let mut seen = BTreeSet::new();
    for record in records {
        let event: Value = serde_json::from_slice(&record.data).expect("a MODE event");
        let n = event["eventData"]["n"].as_u64().expect("a numbered event");
        assert!(seen.insert(n), "message {n} landed twice in {stream}");
    }
    seen
}

fn settings(id: &str, stream: &str, events: &[&str]) -> Value {
    json!({
        "id": id,
        "description": format!("{id}, made through the API"),
        "subscribe_events": events,
        "region": "us-east-1",
        "stream_name": stream,
    })
}

fn send(host: &Ksm, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let (status, text) = host
        .admin()
        .send_json(method, path, body)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let answer = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, answer)
}

/// A module's activity log, one message a line, as written.
fn log_messages(host: &Ksm, id: &str) -> String {
    host.get(&format!("/api/modules/{id}/logs"))
        .as_array()
        .expect("log entries")
        .iter()
        .filter_map(|entry| entry["message"].as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

fn summary(host: &Ksm, id: &str) -> Option<Value> {
    host.get("/api/modules")
        .as_array()
        .and_then(|all| all.iter().find(|m| m["id"] == id).cloned())
}

/// Waits (bounded) until a module's spool is empty and it has taken `received` messages.
fn wait_until_sent(host: &Ksm, id: &str, received: u64) {
    let counters = host.wait_for_counters(id, |c| {
        c["received"].as_u64() >= Some(received) && c["spool_records"] == 0
    });
    assert!(
        counters["received"].as_u64() >= Some(received) && counters["spool_records"] == 0,
        "{id}: {counters}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_added_under_load_takes_every_message_after_its_answer_and_stays_after_a_restart()
{
    let bench = Bench::new("api-add", 2).await;
    let second = unique_stream_name("api-add-second");
    create_stream(&bench.kinesis, &second, 1).await;
    let mut host = bench.ksm(
        "ksm-api-add",
        &[module("first", &bench.stream, "subscribe_events = [\"*\"]")],
    );
    let before = std::fs::read_to_string(host.config_path()).expect("the config");

    let load = Load::start(&bench.broker.url());
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, answer) = send(
        &host,
        "POST",
        "/api/modules",
        &settings("second", &second, &["*"]),
    );
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["status"], "running", "{answer}");
    assert_eq!(
        answer["config"]["max_record_size"], 1_048_576,
        "defaults filled in"
    );
    let from = load.next();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let total = load.stop().await;
    assert!(
        from > 0 && total > from + CHUNK,
        "load around the change: {from} of {total}"
    );

    wait_until_sent(&host, "first", total);
    let first = numbers(&bench.records(total as usize).await, "the first stream");
    assert_eq!(first, (0..total).collect(), "the first module lost nothing");
    wait_until_sent(&host, "second", total - from);
    let landed = numbers(
        &wait_for_records(
            &bench.kinesis,
            &second,
            (total - from) as usize,
            RECORD_WAIT,
        )
        .await,
        "the second stream",
    );
    let expected: BTreeSet<u64> = (from..total).collect();
    assert!(
        landed.is_superset(&expected),
        "every message published after the answer reached the new module: missing {:?}",
        expected.difference(&landed).collect::<Vec<_>>()
    );
    let log = log_messages(&host, "second");
    assert!(
        log.contains("created by the admin API (client 127.0.0.1:"),
        "{log}"
    );

    // Kept in the file, the hand-written part as it was; shown without secrets.
    let after = std::fs::read_to_string(host.config_path()).expect("the config");
    assert!(
        after.starts_with(&before),
        "the file was edited, not rewritten:\n{after}"
    );
    assert!(after.contains("id = \"second\""), "{after}");
    let running = host.get("/api/config");
    let ids: Vec<&str> = running["modules"]
        .as_array()
        .expect("modules")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["first", "second"], "{running}");
    assert!(host.stop(), "a clean stop");
    host.restart();
    let restarted = summary(&host, "second").expect("the module is back after a restart");
    assert_eq!(restarted["stream_name"], second.as_str());
    publish_all(&bench.broker.url(), &[event(total)]).await;
    let landed = wait_for_records(&bench.kinesis, &second, landed.len() + 1, RECORD_WAIT).await;
    assert!(numbers(&landed, "the second stream").contains(&total));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_module_switches_between_two_messages_under_load_and_loses_nothing() {
    let bench = Bench::new("api-change", 2).await;
    let moved = unique_stream_name("api-change-moved");
    create_stream(&bench.kinesis, &moved, 1).await;
    let host = bench.ksm(
        "ksm-api-change",
        &[module(
            "changing",
            &bench.stream,
            "subscribe_events = [\"*\"]",
        )],
    );
    let load = Load::start(&bench.broker.url());
    tokio::time::sleep(Duration::from_millis(400)).await;

    // Only `keep` events from now on.
    let done_before = load.next().saturating_sub(CHUNK);
    let (status, answer) = send(
        &host,
        "PUT",
        "/api/modules/changing",
        &settings("changing", &bench.stream, &["keep"]),
    );
    assert_eq!(status, 200, "{answer}");
    let filtered_from = load.next();
    tokio::time::sleep(Duration::from_millis(400)).await;

    // And to another stream.
    let (status, answer) = send(
        &host,
        "PUT",
        "/api/modules/changing",
        &settings("changing", &moved, &["keep"]),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["stream_name"], moved.as_str());
    let moved_from = load.next();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let total = load.stop().await;
    assert!(moved_from > filtered_from, "load between the changes");

    wait_until_sent(&host, "changing", total);
    let at_least = done_before as usize;
    let old = numbers(
        &wait_for_records(&bench.kinesis, &bench.stream, at_least, RECORD_WAIT).await,
        "the first stream",
    );
    let keeps_after: usize = (moved_from..total).filter(|n| n.is_multiple_of(2)).count();
    let new = numbers(
        &wait_for_records(&bench.kinesis, &moved, keeps_after, RECORD_WAIT).await,
        "the new stream",
    );
    for n in 0..total {
        let landed = old.contains(&n) || new.contains(&n);
        match (n.is_multiple_of(2), n) {
            (true, _) => assert!(landed, "keep event {n} was lost"),
            (false, n) if n < done_before => assert!(old.contains(&n), "drop event {n}, before"),
            (false, n) if n >= filtered_from => {
                assert!(!landed, "drop event {n} came after the change")
            }
            // Published while the change was made: one setting or the other.
            (false, _) => {}
        }
        if n >= moved_from {
            assert!(
                !old.contains(&n),
                "message {n} went to the old stream after the move"
            );
            assert!(
                n % 2 == 1 || new.contains(&n),
                "keep event {n} missing from the new stream"
            );
        }
    }
    let log = log_messages(&host, "changing");
    assert!(
        log.contains(r#"changed by the admin API (client 127.0.0.1:"#)
            && log.contains(r#"subscribe_events: ["*"] → ["keep"]"#)
            && log.contains(&format!("stream_name: \"{}\" → \"{moved}\"", bench.stream)),
        "{log}"
    );
    let file = std::fs::read_to_string(host.config_path()).expect("the config");
    assert!(
        file.contains(&format!("stream_name = \"{moved}\"")),
        "{file}"
    );
    assert!(file.contains("subscribe_events = [\"keep\"]"), "{file}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_module_takes_no_more_messages_sends_its_spool_and_then_goes() {
    let bench = Bench::new("api-delete", 1).await;
    let leaving_stream = unique_stream_name("api-delete-leaving");
    create_stream(&bench.kinesis, &leaving_stream, 1).await;
    let proxy = RecordingProxy::start(&bench.moto.endpoint());
    let host = bench.ksm_via(
        &proxy.endpoint(),
        "ksm-api-delete",
        &[
            module("keeper", &bench.stream, "subscribe_events = [\"*\"]"),
            module("leaving", &leaving_stream, "subscribe_events = [\"*\"]"),
        ],
    );
    // Kinesis is out and devices go on publishing: the records wait in the spools.
    proxy.set_down(true);
    let load = Load::start(&bench.broker.url());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, answer) = send(&host, "DELETE", "/api/modules/leaving", &json!({}));
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["state"], "draining");
    let spooled = answer["spool_records"]
        .as_u64()
        .expect("its spool's records");
    assert_eq!(
        summary(&host, "leaving").expect("listed while draining")["status"],
        "draining"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total = load.stop().await;
    host.wait_for_counters("keeper", |c| c["received"] == total);
    let received = host.counters("leaving")["received"]
        .as_u64()
        .expect("a count");
    assert_eq!(
        received, spooled,
        "what it took before the delete is all in its spool, and it took nothing after"
    );
    assert!(
        spooled > 0 && received + CHUNK < total,
        "load before and after the delete: {received} of {total}"
    );
    let (status, answer) = send(
        &host,
        "PUT",
        "/api/modules/leaving",
        &settings("leaving", &leaving_stream, &["*"]),
    );
    assert_eq!(status, 409, "a draining module cannot change: {answer}");
    let (status, answer) = send(
        &host,
        "POST",
        "/api/modules",
        &settings("leaving", &leaving_stream, &["*"]),
    );
    assert_eq!(status, 409, "nor come back while it drains: {answer}");
    let file = std::fs::read_to_string(host.config_path()).expect("the config");
    assert!(
        file.contains("id = \"leaving\""),
        "kept in the file until it is gone"
    );

    proxy.set_down(false);
    let deadline = Instant::now() + RECORD_WAIT;
    while summary(&host, "leaving").is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        summary(&host, "leaving").is_none(),
        "gone once its spool is sent"
    );
    let sent = numbers(
        &wait_for_records(
            &bench.kinesis,
            &leaving_stream,
            received as usize,
            RECORD_WAIT,
        )
        .await,
        "the deleted module's stream",
    );
    assert_eq!(
        sent,
        (0..received).collect(),
        "its spool was sent, and nothing after"
    );
    let kept = numbers(&bench.records(total as usize).await, "the keeper's stream");
    assert_eq!(kept, (0..total).collect());
    let file = std::fs::read_to_string(host.config_path()).expect("the config");
    assert!(!file.contains("id = \"leaving\""), "{file}");
    assert!(file.contains("id = \"keeper\""), "{file}");

    let (status, answer) = send(&host, "DELETE", "/api/modules/keeper", &json!({}));
    assert_eq!(status, 409, "the last module stays: {answer}");
    let (status, _) = send(&host, "DELETE", "/api/modules/leaving", &json!({}));
    assert_eq!(status, 404);
}

/// A module's settings that break every rule a module has, as JSON and as TOML.
const BAD_JSON: &str = r#"{"id": "Bad!", "subscribe_events": [], "bulk_data_label": "a/b",
    "external_id": "x", "region": "", "stream_name": "bad name!", "colour": "red"}"#;
const BAD_TOML: &str = "[[modules]]\nid = \"Bad!\"\nsubscribe_events = []\n\
    bulk_data_label = \"a/b\"\nexternal_id = \"x\"\nregion = \"\"\nstream_name = \"bad name!\"\n\
    colour = \"red\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_changes_are_refused_with_the_problems_ksm_validate_reports_and_change_nothing() {
    let bench = Bench::new("api-refuse", 1).await;
    let host = bench.ksm(
        "ksm-api-refuse",
        &[module("first", &bench.stream, "subscribe_events = [\"*\"]")],
    );
    let file = std::fs::read_to_string(host.config_path()).expect("the config");
    let body: Value = serde_json::from_str(BAD_JSON).expect("JSON");
    let (status, answer) = send(&host, "POST", "/api/modules", &body);
    assert_eq!(status, 422, "{answer}");
    let from_api: BTreeSet<(String, String)> = answer["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .map(|p| {
            (
                p["field"].as_str().unwrap().into(),
                p["message"].as_str().unwrap().into(),
            )
        })
        .collect();
    for field in [
        "id",
        "bulk_data_label",
        "external_id",
        "region",
        "stream_name",
        "colour",
    ] {
        assert!(
            from_api.iter().any(|(f, _)| f == field),
            "{field} in {from_api:?}"
        );
    }

    // The same module in the file: `ksm validate` says the same.
    let dir = ksm_tests::TempDir::new("api-refuse");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, format!("{file}\n{BAD_TOML}")).expect("write the config");
    let (valid, _, errors) = ksm_command(&["validate", "--config", path.to_str().unwrap()]);
    assert!(!valid, "{errors}");
    let from_validate: BTreeSet<(String, String)> = errors
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- modules[1]."))
        .filter_map(|line| line.split_once(": "))
        .map(|(field, message)| (field.to_owned(), message.to_owned()))
        .collect();
    assert_eq!(from_api, from_validate, "the API and `ksm validate` agree");

    // Other refusals.
    let first = settings("first", &bench.stream, &["*"]);
    let (status, answer) = send(&host, "POST", "/api/modules", &first);
    assert_eq!(status, 409, "the ID is taken: {answer}");
    let (status, answer) = send(
        &host,
        "PUT",
        "/api/modules/first",
        &settings("renamed", &bench.stream, &["*"]),
    );
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["problems"][0]["field"], "id");
    let (status, _) = send(
        &host,
        "PUT",
        "/api/modules/missing",
        &settings("missing", &bench.stream, &["*"]),
    );
    assert_eq!(status, 404);
    let (status, _) = send(
        &host,
        "POST",
        "/api/modules",
        &json!({"id": "typed", "use_uuid": "yes"}),
    );
    assert_eq!(status, 400, "a value of the wrong type");
    let refusing = json!({
        "id": "uuid-refused",
        "subscribe_events": ["status"],
        "region": "us-east-1",
        "stream_name": bench.stream,
        "use_uuid": true,
        "component": ksm_tests::low_battery_guest_wasm(),
    });
    let (status, answer) = send(&host, "POST", "/api/modules", &refusing);
    assert_eq!(status, 422, "the component refuses use_uuid: {answer}");
    assert_eq!(answer["problems"][0]["field"], "component", "{answer}");

    assert_eq!(
        std::fs::read_to_string(host.config_path()).expect("the config"),
        file,
        "a refused change writes nothing"
    );
    let ids: Vec<Value> = host
        .get("/api/modules")
        .as_array()
        .expect("modules")
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, [json!("first")]);

    // The same module, accepted, on a component of its own: swapped in, and kept.
    let own = json!({
        "id": "first",
        "subscribe_events": ["status"],
        "region": "us-east-1",
        "stream_name": bench.stream,
        "component": ksm_tests::low_battery_guest_wasm(),
    });
    let before = summary(&host, "first").expect("first")["component"]["sha256"].clone();
    let (status, answer) = send(&host, "PUT", "/api/modules/first", &own);
    assert_eq!(status, 200, "{answer}");
    let running = &answer["component"];
    assert_ne!(running["sha256"], before, "{answer}");
    assert!(
        running["path"]
            .as_str()
            .is_some_and(|path| path.ends_with("ksm_example_low_battery.wasm")),
        "{answer}"
    );
    let file = std::fs::read_to_string(host.config_path()).expect("the config");
    assert!(file.contains("ksm_example_low_battery.wasm"), "{file}");
    let log = log_messages(&host, "first");
    assert!(log.contains("component: null → "), "{log}");
    // The next messages go to it: its own record shape, low batteries only.
    publish_all(
        &bench.broker.url(),
        &[
            (
                "/devices/1001/event",
                r#"{"eventType":"status","eventData":{"battery":80}}"#,
            ),
            (
                "/devices/1001/event",
                r#"{"eventType":"status","eventData":{"battery":12}}"#,
            ),
        ],
    )
    .await;
    wait_until_sent(&host, "first", 2);
    let records = bench.records(1).await;
    assert_eq!(records.len(), 1, "only the low battery");
    let record: Value = serde_json::from_slice(&records[0].data).expect("JSON");
    assert_eq!(record["battery"], 12.0, "{record}");
    assert_eq!(record["deviceId"], 1001, "{record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_whose_stream_never_takes_its_spool_goes_with_it_kept_as_dead_letters_to_replay() {
    let bench = Bench::new("api-stranded", 1).await;
    let missing = unique_stream_name("api-stranded-missing");
    let host = bench.ksm(
        "ksm-api-stranded",
        &[
            module("keeper", &bench.stream, "subscribe_events = [\"*\"]"),
            module("stranded", &missing, "subscribe_events = [\"*\"]"),
        ],
    );
    let messages: Vec<(String, String)> = (0..10).map(event).collect();
    publish_all(&bench.broker.url(), &messages).await;
    host.wait_for_counters("stranded", |c| c["spool_records"] == 10);

    // Its stream does not exist: deleted, it would drain for ever.
    let (status, answer) = send(&host, "DELETE", "/api/modules/stranded", &json!({}));
    assert_eq!(status, 202, "{answer}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        summary(&host, "stranded").expect("still draining")["status"],
        "draining"
    );
    let (status, answer) = send(&host, "DELETE", "/api/modules/stranded", &json!({}));
    assert_eq!(status, 409, "{answer}");
    let (status, answer) = send(
        &host,
        "DELETE",
        "/api/modules/stranded?spool=dead-letters",
        &json!({}),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["state"], "deleted");
    assert_eq!(answer["kept_as_dead_letters"], 10, "{answer}");
    assert!(summary(&host, "stranded").is_none());
    let file = std::fs::read_to_string(host.config_path()).expect("the config");
    assert!(!file.contains("id = \"stranded\""), "{file}");

    // Back, to a stream that exists: its dead letters wait for it, and replay.
    let fixed = unique_stream_name("api-stranded-fixed");
    create_stream(&bench.kinesis, &fixed, 1).await;
    let (status, answer) = send(
        &host,
        "POST",
        "/api/modules",
        &settings("stranded", &fixed, &["*"]),
    );
    assert_eq!(status, 201, "{answer}");
    let letters = host.all_dead_letters("stranded");
    assert_eq!(letters.len(), 10, "{letters:?}");
    assert!(
        letters[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("was deleted by the admin API")),
        "{}",
        letters[0]
    );
    let (status, body) = host.post("/api/modules/stranded/dead-letters/replay");
    assert_eq!(status, 202, "{body}");
    let landed = numbers(
        &wait_for_records(&bench.kinesis, &fixed, 10, RECORD_WAIT).await,
        "the fixed stream",
    );
    assert_eq!(landed, (0..10).collect());
    let kept = numbers(&bench.records(10).await, "the keeper's stream");
    assert_eq!(kept, (0..10).collect());
}
