//! Fault tests: what ksm loses when something breaks (nothing it
//! acknowledged), against a real broker and a real Kinesis emulator, with a
//! fault-injecting proxy where no emulator can produce the fault.
//!
//! Each test prints a `fault-figures:` line (records sent, lost, duplicated)
//! that `cargo test -- --nocapture` shows.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use ksm_tests::proxy::{Faults, RecordedRequest};
use ksm_tests::{LoadPlan, LoadPublisher, RecordingProxy, read_all_records};

use crate::support::{Bench, HostOptions, Ksm, machine_shared, module};

/// How long a test waits for every expected record to land.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(90);

/// What a stream holds of a load run: how often each message ID landed, and
/// per device the IDs in stream order.
struct Tally {
    counts: HashMap<u64, usize>,
    per_device: BTreeMap<String, Vec<u64>>,
}

impl Tally {
    fn duplicates(&self) -> usize {
        self.counts.values().map(|n| n - 1).sum()
    }

    fn missing(&self, expected: &BTreeSet<u64>) -> Vec<u64> {
        expected
            .iter()
            .copied()
            .filter(|id| !self.counts.contains_key(id))
            .collect()
    }

    /// Devices whose IDs did not land in increasing order (the first
    /// occurrence of each ID counts, so a redelivered duplicate is not a
    /// reordering).
    fn out_of_order(&self) -> Vec<String> {
        self.per_device
            .iter()
            .filter(|(_, ids)| {
                let mut seen = BTreeSet::new();
                let firsts: Vec<u64> = ids.iter().copied().filter(|id| seen.insert(*id)).collect();
                firsts.windows(2).any(|w| w[0] > w[1])
            })
            .map(|(device, _)| device.clone())
            .collect()
    }
}

/// Reads the stream until every ID in `expected` landed (or the timeout).
async fn wait_for_ids(bench: &Bench, expected: &BTreeSet<u64>) -> Tally {
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    loop {
        let records = read_all_records(&bench.kinesis, &bench.stream).await;
        let mut tally = Tally {
            counts: HashMap::new(),
            per_device: BTreeMap::new(),
        };
        for record in &records {
            let id = LoadPlan::id_of(&record.data_json())
                .unwrap_or_else(|| panic!("record without an id: {}", record.data_text()));
            *tally.counts.entry(id).or_default() += 1;
            tally
                .per_device
                .entry(record.partition_key.clone())
                .or_default()
                .push(id);
        }
        if tally.missing(expected).is_empty() || Instant::now() >= deadline {
            return tally;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until `done` holds for the publisher's acknowledged count.
async fn wait_for_acks(publisher: &LoadPublisher, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while publisher.stats().acked < at_least {
        assert!(
            Instant::now() < deadline,
            "the broker acknowledged only {} messages",
            publisher.stats().acked
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn plan(prefix: &str, messages: u64, devices: u64, rate: u64) -> LoadPlan {
    LoadPlan {
        devices,
        messages,
        rate_per_sec: rate,
        max_in_flight: 100,
        client_id_prefix: prefix.to_owned(),
    }
}

fn everything(id: &str, stream: &str) -> crate::support::ModuleSpec {
    module(id, stream, "subscribe_events = [\"*\"]")
}

/// What the broker's log says about messages it dropped (Mosquitto 2.0.11
/// drops QoS 1 messages for a subscriber that falls far behind).
fn broker_drops(log: &str) -> String {
    let drops: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("dropped") || line.contains("Dropping"))
        .collect();
    match drops.first() {
        None => "no drops logged".to_owned(),
        Some(first) => format!("{} drop lines, the first: {first}", drops.len()),
    }
}

/// Asserts that nothing acknowledged is missing and prints the figures.
fn report(test: &str, acked: &BTreeSet<u64>, tally: &Tally, extra: &str) {
    let missing = tally.missing(acked);
    eprintln!(
        "fault-figures: {test}: sent {} acknowledged {} landed {} lost {} duplicated {} {extra}",
        acked.len(),
        acked.len(),
        tally.counts.len(),
        missing.len(),
        tally.duplicates()
    );
    assert!(
        missing.is_empty(),
        "{test}: {} acknowledged messages never reached the stream, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

/// 1. kill -9 (three times) while publishers send: every message the broker
///    acknowledged reaches the stream after the restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_host_loses_no_acknowledged_message() {
    let _machine = machine_shared().await;
    let bench = Bench::new("fault-kill", 2).await;
    let mut host = bench.ksm("ksm-fault-kill", &[everything("crash", &bench.stream)]);
    let publisher = LoadPublisher::start(&bench.broker.url(), plan("kill", 4000, 40, 1000));
    // Three crashes during the load.
    for acked in [800, 1600, 2400] {
        wait_for_acks(&publisher, acked).await;
        host.kill9();
        tokio::time::sleep(Duration::from_millis(300)).await;
        host.restart();
    }
    let load = publisher.finish(Duration::from_secs(60)).await;
    assert!(
        load.missing(4000).is_empty(),
        "the broker did not take every message"
    );
    let tally = wait_for_ids(&bench, &load.acked).await;
    report("kill -9 three times", &load.acked, &tally, "");
    let after = host.wait_for_counters("crash", |c| c["spool_records"] == 0);
    assert_eq!(
        after["spool_records"], 0,
        "the spool drains after the restart: {after}"
    );
}

/// 2. Kinesis unreachable for 30 s under load: messages keep being
///    acknowledged into the spool, which drains once Kinesis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kinesis_outage_fills_the_spool_and_it_drains_after() {
    let _machine = machine_shared().await;
    let bench = Bench::new("fault-outage", 2).await;
    let proxy = RecordingProxy::start(&bench.moto.endpoint());
    let host = bench.ksm_via(
        &proxy.endpoint(),
        "ksm-fault-outage",
        &[everything("outage", &bench.stream)],
    );
    let publisher = LoadPublisher::start(&bench.broker.url(), plan("outage", 2000, 20, 100));
    wait_for_acks(&publisher, 200).await;
    proxy.set_down(true);
    let down_at = Instant::now();
    let mut most_spooled = 0;
    while down_at.elapsed() < Duration::from_secs(30) {
        let counters = host.counters("outage");
        most_spooled = most_spooled.max(counters["spool_records"].as_u64().unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let during = host.counters("outage");
    proxy.set_down(false);
    let load = publisher.finish(Duration::from_secs(60)).await;
    assert!(
        load.missing(2000).is_empty(),
        "ksm must keep acknowledging into the spool while Kinesis is down"
    );
    let tally = wait_for_ids(&bench, &load.acked).await;
    let after = host.wait_for_counters("outage", |c| c["spool_records"] == 0);
    report(
        "kinesis down 30 s",
        &load.acked,
        &tally,
        &format!("most spooled {most_spooled}"),
    );
    assert!(
        most_spooled > 1000,
        "messages published during the outage wait in the spool (at most {most_spooled})"
    );
    assert!(during["retried"].as_u64().unwrap_or(0) > 0, "{during}");
    assert_eq!(after["spool_records"], 0, "the spool drains: {after}");
    assert_eq!(after["spool_bytes"], 0, "{after}");
    assert!(
        host.module_log("outage").contains("PutRecords to stream"),
        "the log says why records wait:\n{}",
        host.module_log("outage")
    );
}

/// 3. Throttled records inside successful PutRecords calls, 500s and slow
///    answers, with `ordering = "strict"`: everything arrives once, each
///    device's records in order, and only what failed was sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_failures_are_retried_alone_and_keep_each_key_in_order() {
    let outcome = partial_failures("strict").await;
    assert!(
        outcome.out_of_order.is_empty(),
        "records of these keys landed out of order: {:?}",
        outcome.out_of_order
    );
    assert_eq!(outcome.reordered_counted, 0);
    assert_eq!(
        outcome.overtaken_by_proxy, 0,
        "no request carries two records of a key"
    );
}

/// 3b. The same faults with `ordering = "key"` (several records of a key per
///     request): nothing is lost or sent twice, and every record the proxy
///     failed while it passed a later record of its key is counted in
///     `reordered` and logged; every key that landed out of order had one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_failures_in_key_order_lose_nothing_and_count_every_broken_order() {
    let outcome = partial_failures("key").await;
    assert!(
        outcome.overtaken_by_proxy > 0,
        "the proxy failed records overtaken by later ones of their key"
    );
    assert_eq!(outcome.reordered_counted, outcome.overtaken_by_proxy);
    let overtaken: BTreeSet<&String> = outcome.overtaken_keys.iter().collect();
    for key in &outcome.out_of_order {
        assert!(
            overtaken.contains(key),
            "key {key} landed out of order without a counted reordering"
        );
    }
    assert!(
        outcome
            .log
            .contains("and accepted a later one of the same key in the same request"),
        "the log says which key: {}",
        outcome.log
    );
}

/// What a partial-failure run showed.
struct PartialOutcome {
    /// Keys whose records landed out of order.
    out_of_order: Vec<String>,
    /// The module's `reordered` counter.
    reordered_counted: u64,
    /// Records the proxy failed while it passed a later record of their key
    /// in the same request, and their keys.
    overtaken_by_proxy: u64,
    overtaken_keys: Vec<String>,
    /// The module's log.
    log: String,
}

/// Runs 1500 events from 30 devices through a proxy that fails 30% of
/// records, answers 5% of requests 500 and slows 10%, with `ordering`;
/// checks what holds in both modes.
async fn partial_failures(ordering: &str) -> PartialOutcome {
    let _machine = machine_shared().await;
    let bench = Bench::new(&format!("fault-partial-{ordering}"), 2).await;
    let proxy = RecordingProxy::start(&bench.moto.endpoint());
    proxy.set_faults(Faults {
        fail_record_ratio: 0.3,
        server_error_ratio: 0.05,
        slow_ratio: 0.1,
        slow_by: Duration::from_millis(300),
        seed: 7,
    });
    let options = HostOptions {
        kinesis: format!("ordering = \"{ordering}\""),
        ..HostOptions::default()
    };
    let host = bench.ksm_with(
        &proxy.endpoint(),
        &format!("ksm-fault-partial-{ordering}"),
        &[everything("partial", &bench.stream)],
        &options,
    );
    let publisher = LoadPublisher::start(&bench.broker.url(), plan("partial", 1500, 30, 0));
    let load = publisher.finish(Duration::from_secs(60)).await;
    let tally = wait_for_ids(&bench, &load.acked).await;
    let stats = proxy.put_records_stats();
    let requests = proxy.requests_for("PutRecords");
    let in_server_errors: u64 = requests
        .iter()
        .filter(|r| r.response_status == 500)
        .map(|r| {
            r.body_json()
                .and_then(|b| b["Records"].as_array().map(Vec::len))
                .unwrap_or(0) as u64
        })
        .sum();
    let overtaken_keys: Vec<String> = requests
        .iter()
        .filter(|r| r.response_status == 200)
        .flat_map(overtaken_in)
        .collect();
    report(
        &format!("ordering {ordering}: 30% throttled records, 5% 500s, 10% slow"),
        &load.acked,
        &tally,
        &format!(
            "{stats:?} records-in-500s {in_server_errors} overtaken {}",
            overtaken_keys.len()
        ),
    );
    assert!(stats.records_failed_injected > 100, "{stats:?}");
    assert!(stats.server_errors_injected > 0, "{stats:?}");
    assert_eq!(tally.duplicates(), 0, "nothing accepted is sent again");
    assert_eq!(
        stats.records_received,
        load.acked.len() as u64 + stats.records_failed_injected + in_server_errors,
        "each record is sent once, plus once more per failure: only failed records are resent"
    );
    assert_eq!(
        stats.records_forwarded,
        load.acked.len() as u64,
        "the emulator received each record exactly once"
    );
    let counters = host.counters("partial");
    assert_eq!(
        counters["retried"].as_u64(),
        Some(stats.records_failed_injected + in_server_errors),
        "{counters}"
    );
    let log = host.module_log("partial");
    assert!(
        log.contains("ProvisionedThroughputExceededException"),
        "throttling is explained in the log"
    );
    PartialOutcome {
        out_of_order: tally.out_of_order(),
        reordered_counted: counters["reordered"].as_u64().unwrap_or(u64::MAX),
        overtaken_by_proxy: overtaken_keys.len() as u64,
        overtaken_keys,
        log,
    }
}

/// The keys of the entries a 200 `PutRecords` answer failed while it
/// accepted a later entry of the same key: one per such entry.
fn overtaken_in(request: &RecordedRequest) -> Vec<String> {
    let (Some(body), Some(answer)) = (request.body_json(), request.response_json()) else {
        return Vec::new();
    };
    let (Some(entries), Some(results)) = (body["Records"].as_array(), answer["Records"].as_array())
    else {
        return Vec::new();
    };
    let mut accepted_later: BTreeSet<&str> = BTreeSet::new();
    let mut overtaken = Vec::new();
    for (entry, result) in entries.iter().zip(results).rev() {
        let key = entry["PartitionKey"].as_str().unwrap_or_default();
        if result
            .get("ErrorCode")
            .is_none_or(serde_json::Value::is_null)
        {
            accepted_later.insert(key);
        } else if accepted_later.contains(key) {
            overtaken.push(key.to_owned());
        }
    }
    overtaken
}

/// 3c. kill -9 while a large spool drains (records published while Kinesis
///     was unreachable): after the restart every acknowledged message lands,
///     and only records whose answers were in flight at the kill land twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_killed_while_draining_a_large_spool_loses_nothing() {
    const MESSAGES: u64 = 6000;
    let _machine = machine_shared().await;
    let bench = Bench::new("fault-drain-kill", 2).await;
    let proxy = RecordingProxy::start(&bench.moto.endpoint());
    proxy.set_down(true);
    let mut host = bench.ksm_via(
        &proxy.endpoint(),
        "ksm-fault-drain-kill",
        &[everything("drain", &bench.stream)],
    );
    let publisher = LoadPublisher::start(&bench.broker.url(), plan("drain", MESSAGES, 50, 0));
    let load = publisher.finish(Duration::from_secs(90)).await;
    assert!(load.missing(MESSAGES).is_empty(), "every message went in");
    host.wait_for_counters_within("drain", Duration::from_secs(60), |c| {
        c["spool_records"] == MESSAGES
    });
    proxy.set_down(false);
    let deadline = Instant::now() + Duration::from_secs(60);
    let forwarded_at_kill = loop {
        let forwarded = host.counters("drain")["forwarded"].as_u64().unwrap_or(0);
        if forwarded >= MESSAGES / 4 || Instant::now() > deadline {
            break forwarded;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    host.kill9();
    assert!(
        (1..MESSAGES).contains(&forwarded_at_kill),
        "killed while draining: {forwarded_at_kill} forwarded"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    host.restart();
    let tally = wait_for_ids(&bench, &load.acked).await;
    report(
        "kill -9 while draining",
        &load.acked,
        &tally,
        &format!("forwarded before the kill {forwarded_at_kill}"),
    );
    // At most kinesis.max_in_flight (8) requests of 500 records were in flight.
    assert!(
        tally.duplicates() <= 8 * 500,
        "{} duplicates: more than the records in flight at the kill",
        tally.duplicates()
    );
    let after = host.wait_for_counters("drain", |c| c["spool_records"] == 0);
    assert_eq!(after["spool_records"], 0, "the spool drains: {after}");
    assert_eq!(after["dead_lettered"], 0, "{after}");
}

/// 4. The broker restarts (gracefully, keeping its sessions) during load:
///    ksm reconnects and resumes; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_under_load_loses_nothing() {
    let _machine = machine_shared().await;
    let mut bench = Bench::persistent_broker("fault-broker", 1).await;
    let host = bench.ksm("ksm-fault-broker", &[everything("broker", &bench.stream)]);
    let publisher = LoadPublisher::start(&bench.broker.url(), plan("broker", 2000, 20, 500));
    wait_for_acks(&publisher, 500).await;
    bench.broker.restart_graceful();
    let load = publisher.finish(Duration::from_secs(60)).await;
    assert!(
        load.missing(2000).is_empty(),
        "the publisher got every message in"
    );
    let tally = wait_for_ids(&bench, &load.acked).await;
    report(
        "broker restart",
        &load.acked,
        &tally,
        &format!("publisher reconnects {}", load.reconnects),
    );
    assert!(
        host.module_log("broker")
            .contains("lost the connection to the MQTT broker"),
        "the log shows the reconnect"
    );
}

/// 5. A full spool stops acknowledging (the broker holds the messages back),
///    the log says why, and nothing is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_holds_messages_back_and_drops_nothing() {
    const MESSAGES: u64 = 500;
    let _machine = machine_shared().await;
    let bench = Bench::new("fault-full", 1).await;
    let proxy = RecordingProxy::start(&bench.moto.endpoint());
    proxy.set_down(true);
    let options = HostOptions {
        storage: "spool_max_mib = 1".into(),
        mqtt: "receive_maximum = 50".into(),
        ..HostOptions::default()
    };
    let host = bench.ksm_with(
        &proxy.endpoint(),
        "ksm-fault-full",
        &[everything("full", &bench.stream)],
        &options,
    );
    // 500 messages of about 8 KiB: 4 MiB, four times the spool, and more than
    // ksm's pipeline holds unacknowledged besides (the committer's group, its
    // queue and the router's run: about 330 messages at receive_maximum 50).
    let filler = "x".repeat(8 * 1024);
    let messages: Vec<(String, String)> = (0..MESSAGES)
        .map(|id| {
            (
                format!("/devices/{}/event", 1 + id % 10),
                format!(
                    r#"{{"eventType":"load","eventData":{{"id":{id},"filler":"{filler}"}},"homeId":1}}"#
                ),
            )
        })
        .collect();
    bench.publish(&messages).await;
    let full = host.wait_for_counters("full", |c| {
        c["spool_bytes"].as_u64().unwrap_or(0) > 900 * 1024
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = host.counters("full");
    let log = host.module_log("full");
    assert!(log.contains("spool full"), "the log says why:\n{log}");
    assert!(
        held["spool_bytes"].as_u64().unwrap_or(0) <= 1024 * 1024 + 16 * 1024,
        "the spool stays within its bound: {held}"
    );
    assert!(
        held["received"].as_u64().unwrap_or(0) < MESSAGES,
        "ksm stops taking messages while full (the broker holds the rest): {held}"
    );
    proxy.set_down(false);
    let expected: BTreeSet<u64> = (0..MESSAGES).collect();
    let tally = wait_for_ids(&bench, &expected).await;
    report(
        "spool full",
        &expected,
        &tally,
        &format!(
            "held back while full: {}",
            MESSAGES - held["received"].as_u64().unwrap_or(0)
        ),
    );
    assert!(full["spool_bytes"].as_u64().unwrap_or(0) > 0);
    assert!(
        host.module_log("full").contains("spool has room again"),
        "the log says when it resumes"
    );
}

/// 6. Two hosts in one shared group split the load; one is killed with
///    SIGKILL and restarted: every acknowledged message arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_group_survives_losing_a_host() {
    let _machine = machine_shared().await;
    let bench = Bench::new("fault-shared", 2).await;
    let options = HostOptions {
        mqtt: "shared_group = \"ksm\"".into(),
        ..HostOptions::default()
    };
    let endpoint = bench.moto.endpoint();
    let modules = [everything("shared", &bench.stream)];
    let first = bench.ksm_with(&endpoint, "ksm-shared-a", &modules, &options);
    let mut second: Ksm = bench.ksm_with(&endpoint, "ksm-shared-b", &modules, &options);
    let publisher = LoadPublisher::start(&bench.broker.url(), plan("shared", 3000, 40, 1000));
    wait_for_acks(&publisher, 1000).await;
    let split = (
        first.counters("shared")["received"].as_u64().unwrap_or(0),
        second.counters("shared")["received"].as_u64().unwrap_or(0),
    );
    second.kill9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    second.restart();
    let load = publisher.finish(Duration::from_secs(60)).await;
    assert!(load.missing(3000).is_empty());
    let tally = wait_for_ids(&bench, &load.acked).await;
    report(
        "shared group, one host killed",
        &load.acked,
        &tally,
        &format!(
            "split before the kill {split:?}; counters after: {} and {}; broker: {}",
            first.counters("shared"),
            second.counters("shared"),
            broker_drops(&bench.broker.log())
        ),
    );
    assert!(
        split.0 > 0 && split.1 > 0,
        "both hosts take messages: {split:?}"
    );
    assert!(
        tally.duplicates() <= 1000,
        "mostly once: {} duplicates",
        tally.duplicates()
    );
}
