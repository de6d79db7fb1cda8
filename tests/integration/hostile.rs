//! Hostile guests and hostile devices cannot take the host down, stall it,
//! or make it crash-loop. Each test runs the host under a data-size limit
//! (`ulimit -d`), so a host that would eat the machine fails instead.
//!
//! A machine whose cores are all busy does not make good messages look like
//! a guest that loops.
//!
//! Two modules share one host: `hostile` runs the misbehaving fixture and
//! `innocent` the reference guest. For each attack on `hostile`, the host
//! stays up, the attack costs exactly one dead letter, and the innocent
//! module's next event lands within its usual latency plus one deadline.

use std::time::{Duration, Instant};

use ksm_tests::{
    ReadRecord, aws_env, create_stream, guest_wasm, misbehaving_guest_wasm, unique_stream_name,
    wait_for_records,
};

use crate::support::{
    Bench, HostOptions, Ksm, config_with_options, dead_letter_data, machine_to_myself, module,
};

/// The data limit the attacked host runs under.
const DATA_LIMIT_MIB: u64 = 1024;
/// The peak memory the attacked host must stay under.
const PEAK_RSS_BOUND_MIB: u64 = 600;
/// The peak memory a host flooded with 15 MB messages must stay under:
/// its 128 MiB in-flight budget, what the MQTT client reads ahead of it,
/// and the guests' and the allocator's working sets; the refused messages'
/// data goes to files, not through the store (measured: 418 to 430 MiB, and
/// 262 MiB with a 16 MiB budget).
const FLOOD_PEAK_RSS_BOUND_MIB: u64 = 600;
/// The guests' call deadline in the attack tests: above the default 50 ms, so
/// that attacks which only take time (a 30 MB string, a 5 MB record) hit
/// the bound they test, not the deadline, on a machine busy with other tests.
const DEADLINE: Duration = Duration::from_millis(200);
/// Time allowed beyond the usual latency and one deadline (record reads poll).
const SLACK: Duration = Duration::from_secs(3);

/// A MODE event whose `eventType` tells the fixture what to do.
fn attack_event(behaviour: &str) -> String {
    format!(r#"{{"eventType":"{behaviour}","eventData":{{}}}}"#)
}

/// A bulk payload holding one record of `len` bytes.
fn bulk_payload(len: usize) -> Vec<u8> {
    ksm_host::bulk::encode([vec![b'b'; len]])
}

struct Attacked {
    bench: Bench,
    host: Ksm,
    innocent_stream: String,
    innocent_sent: usize,
}

impl Attacked {
    async fn start(prefix: &str) -> Attacked {
        let bench = Bench::new(prefix, 1).await;
        let innocent_stream = unique_stream_name("innocent");
        create_stream(&bench.kinesis, &innocent_stream, 1).await;
        let hostile = module(
            "hostile",
            &bench.stream,
            &format!(
                "subscribe_events = [\"*\"]\nbulk_data_label = \"any\"\ncomponent = \"{}\"",
                misbehaving_guest_wasm().display()
            ),
        );
        let innocent = module(
            "innocent",
            &innocent_stream,
            "subscribe_events = [\"innocent\"]\nbulk_data_label = \"innocent\"",
        );
        let options = HostOptions {
            component: format!(
                "max_records_per_call = 1000\ncall_timeout_ms = {}",
                DEADLINE.as_millis()
            ),
            ..HostOptions::default()
        };
        let config = config_with_options(
            &bench.broker.url(),
            &format!("ksm-{prefix}"),
            &guest_wasm(),
            &[hostile, innocent],
            &options,
        );
        let endpoint = bench.moto.endpoint();
        let host = Ksm::start_limited(&config, aws_env(&endpoint, &endpoint), DATA_LIMIT_MIB);
        Attacked {
            bench,
            host,
            innocent_stream,
            innocent_sent: 0,
        }
    }

    /// Publishes one innocent event and returns how long it took to land.
    async fn innocent_latency(&mut self) -> Duration {
        self.innocent_sent += 1;
        let n = self.innocent_sent;
        let event = format!(r#"{{"eventType":"innocent","eventData":{{"n":{n}}}}}"#);
        let started = Instant::now();
        self.bench.publish(&[("/devices/1001/event", event)]).await;
        let records: Vec<ReadRecord> = wait_for_records(
            &self.bench.kinesis,
            &self.innocent_stream,
            n,
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(records.len(), n, "{}", self.host.log());
        started.elapsed()
    }

    fn hostile_dead_letters(&self) -> Vec<serde_json::Value> {
        self.host
            .get("/api/modules/hostile/dead-letters")
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_attack_costs_its_message_and_the_innocent_module_goes_on() {
    let mut attacked = Attacked::start("hostile").await;
    let usual = attacked.innocent_latency().await;
    let event = "/devices/7/event";
    let attacks: Vec<(&str, String, Vec<u8>, &str)> = vec![
        (
            "sleep 20 s",
            event.into(),
            attack_event("sleep:20000").into(),
            "to wait 20000 ms for the clock",
        ),
        (
            "sleep for ever",
            event.into(),
            attack_event(&format!("sleep:{}", u64::MAX)).into(),
            "for the clock",
        ),
        (
            "endless loop",
            event.into(),
            attack_event("loop").into(),
            "ran past its deadline of 200 ms twice",
        ),
        (
            "memory hog",
            event.into(),
            attack_event("hog").into(),
            "memory limit of 64 MiB",
        ),
        (
            "30 MB error text",
            event.into(),
            attack_event("error:31457280").into(),
            "the guest's text is 31457280 bytes",
        ),
        (
            "10 MB field fault (name and detail)",
            event.into(),
            attack_event("field:10485760").into(),
            "the guest's text is 10485760 bytes",
        ),
        (
            "5000 records",
            event.into(),
            attack_event("records:5000").into(),
            "max_records_per_call (1000)",
        ),
        (
            "5 MB of records",
            event.into(),
            attack_event("output:5000000").into(),
            "max_event_output_bytes",
        ),
        (
            "30 MB partition key",
            event.into(),
            attack_event("key:30000000").into(),
            "partition key has 30000000 characters",
        ),
        (
            "500 overlapping 1 MB spans",
            "/devices/7/bulkData/overlap:500".into(),
            bulk_payload(1_000_000),
            "overlap",
        ),
        (
            "3000 spans",
            "/devices/7/bulkData/spans:3000".into(),
            bulk_payload(1000),
            "3000 records",
        ),
        (
            "3000 refused spans",
            "/devices/7/bulkData/rejected:3000".into(),
            bulk_payload(1_000_000),
            "3000 refused records",
        ),
        (
            "a refused span outside",
            "/devices/7/bulkData/outside".into(),
            bulk_payload(1000),
            "outside the",
        ),
    ];
    let mut report = Vec::new();
    for (expected_letters, (name, topic, payload, reason)) in (1..).zip(attacks) {
        let started = Instant::now();
        attacked
            .bench
            .publish(&[(topic.as_str(), payload.as_slice())])
            .await;
        let latency = attacked.innocent_latency().await;
        let handled_in = started.elapsed();
        assert!(
            attacked.host.is_up(),
            "{name}: the host is down\n{}",
            attacked.host.log()
        );
        let letters = attacked.hostile_dead_letters();
        assert_eq!(
            letters.len(),
            expected_letters,
            "{name}: one dead letter per attack: {letters:?}"
        );
        let letter = &letters[expected_letters - 1];
        let text = letter["reason"].as_str().unwrap_or_default();
        assert!(
            text.contains(reason),
            "{name}: reason {text:?} lacks {reason:?}"
        );
        assert!(
            text.len() < 8 * 1024,
            "{name}: the reason is bounded ({} bytes)",
            text.len()
        );
        assert_eq!(
            dead_letter_data(letter),
            payload,
            "{name}: the message is kept whole"
        );
        assert!(
            latency <= usual + DEADLINE * 2 + SLACK,
            "{name}: the innocent module's event took {latency:?} (usually {usual:?})"
        );
        report.push(format!(
            "{name}: innocent event {} ms (usually {} ms), attack and event handled in {} ms",
            latency.as_millis(),
            usual.as_millis(),
            handled_in.as_millis()
        ));
    }
    let errors = attacked.host.get("/api/modules/hostile/logs?level=error");
    let errors = errors.as_array().expect("a list");
    assert_eq!(
        errors.len(),
        report.len(),
        "one ERROR entry per attack: {errors:?}"
    );
    assert!(
        errors
            .iter()
            .all(|e| e["message"].as_str().is_some_and(|m| m.len() < 8 * 1024)),
        "log entries are bounded"
    );
    let innocent = attacked.host.counters("innocent");
    assert_eq!(innocent["dead_lettered"], 0, "{innocent}");
    let peak = attacked.host.peak_rss_mib();
    for line in &report {
        println!("hostile guest: {line}");
    }
    println!(
        "hostile guest: peak RSS {peak} MiB (bound {PEAK_RSS_BOUND_MIB}, data limit {DATA_LIMIT_MIB})"
    );
    assert!(peak < PEAK_RSS_BOUND_MIB, "peak RSS {peak} MiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_flood_of_15_mb_messages_is_kept_within_the_memory_budget() {
    let _machine = machine_to_myself().await;
    const MESSAGES: usize = 100;
    const SIZE: usize = 15 * 1000 * 1000;
    let bench = Bench::new("flood", 1).await;
    let options = HostOptions {
        mqtt: "inflight_max_mib = 128".into(),
        ..HostOptions::default()
    };
    let config = config_with_options(
        &bench.broker.url(),
        "ksm-flood",
        &guest_wasm(),
        &[module(
            "flooded",
            &bench.stream,
            "subscribe_events = [\"*\"]",
        )],
        &options,
    );
    let endpoint = bench.moto.endpoint();
    let host = Ksm::start_limited(&config, aws_env(&endpoint, &endpoint), DATA_LIMIT_MIB);
    let started = Instant::now();
    // Not an event (no JSON object): each one is refused and kept whole.
    for chunk in 0..MESSAGES / 10 {
        let messages: Vec<(String, Vec<u8>)> = (0..10)
            .map(|i| {
                let mut payload = vec![b'x'; SIZE];
                payload[..8].copy_from_slice(&((chunk * 10 + i) as u64).to_be_bytes());
                ("/devices/1001/event".to_owned(), payload)
            })
            .collect();
        bench.publish(&messages).await;
    }
    let counters = host.wait_for_counters_within("flooded", Duration::from_secs(300), |c| {
        c["dead_lettered"].as_u64() == Some(MESSAGES as u64)
    });
    let took = started.elapsed();
    let peak = host.peak_rss_mib();
    assert!(host.get_raw("/api/health").0 == 200, "{}", host.log());
    assert_eq!(counters["received"], MESSAGES as u64, "{counters}");
    assert_eq!(
        counters["dead_lettered"], MESSAGES as u64,
        "nothing lost: {counters}"
    );
    let last = host.get(&format!("/api/modules/flooded/dead-letters/{MESSAGES}"));
    assert_eq!(dead_letter_data(&last).len(), SIZE);
    println!(
        "device flood: {MESSAGES} x {SIZE} bytes refused and kept in {:.1} s, peak RSS {peak} MiB \
         (in-flight budget 128 MiB, data limit {DATA_LIMIT_MIB} MiB)",
        took.as_secs_f64()
    );
    assert!(peak < FLOOD_PEAK_RSS_BOUND_MIB, "peak RSS {peak} MiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_that_kills_ksm_twice_is_dead_lettered_unrun_on_the_next_start() {
    let bench = Bench::new("crash-loop", 1).await;
    let config = config_with_options(
        &bench.broker.url(),
        "ksm-crash-loop",
        &guest_wasm(),
        &[module(
            "guarded",
            &bench.stream,
            "subscribe_events = [\"*\"]",
        )],
        &HostOptions::default(),
    );
    let endpoint = bench.moto.endpoint();
    let mut env = aws_env(&endpoint, &endpoint);
    env.push(("KSM_TEST_ABORT_ON".into(), "ksm-test-abort".into()));
    let mut host = Ksm::start(&config, env);
    let deadly = r#"{"eventType":"t","eventData":{"note":"ksm-test-abort"}}"#;
    bench.publish(&[("/devices/1001/event", deadly)]).await;
    for run in 1..=2 {
        let status = host.wait_for_exit(Duration::from_secs(30));
        assert!(
            status.is_some_and(|s| !s.success()),
            "run {run}: the test fault aborts ksm ({status:?})\n{}",
            host.log()
        );
        if run == 1 {
            // The broker delivers the message again, and ksm dies again.
            host.spawn_unchecked();
        }
    }
    host.restart();
    let letters = host.wait_for_counters("guarded", |c| c["dead_lettered"] == 1);
    assert_eq!(letters["dead_lettered"], 1, "{letters}\n{}", host.log());
    let letter = host.get("/api/modules/guarded/dead-letters/1");
    let reason = letter["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("twice in a row"), "{reason}");
    assert_eq!(dead_letter_data(&letter), deadly.as_bytes());
    let good = r#"{"eventType":"t","eventData":{"n":1}}"#;
    bench.publish(&[("/devices/1001/event", good)]).await;
    let records = bench.records(1).await;
    assert_eq!(records.len(), 1, "{}", host.log());
    assert!(records[0].data_text().contains(r#""n":1"#));
    assert!(host.module_log("guarded").contains("ended abnormally"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_busy_machine_is_not_a_bad_guest() {
    let _machine = machine_to_myself().await;
    const PAYLOADS: usize = 100;
    const RECORDS: usize = 100;
    let bench = Bench::new("busy", 1).await;
    // One epoch tick: with every core busy, many first tries are cut off by the clock.
    let options = HostOptions {
        component: "call_timeout_ms = 5".into(),
        ..HostOptions::default()
    };
    let config = config_with_options(
        &bench.broker.url(),
        "ksm-busy",
        &guest_wasm(),
        &[module(
            "busy",
            &bench.stream,
            "subscribe_events = [\"*\"]\nbulk_data_label = \"telemetry\"",
        )],
        &options,
    );
    let endpoint = bench.moto.endpoint();
    let host = Ksm::start(&config, aws_env(&endpoint, &endpoint));
    let spinning = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    let spinners: Vec<_> = (0..cores * 3)
        .map(|_| {
            let spinning = spinning.clone();
            std::thread::spawn(move || {
                while spinning.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let payload = ksm_host::bulk::encode((0..RECORDS).map(|_| vec![b'r'; 100]));
    let messages: Vec<(&str, &[u8])> = (0..PAYLOADS)
        .map(|_| ("/devices/1001/bulkData/telemetry", payload.as_slice()))
        .collect();
    bench.publish(&messages).await;
    let counters = host.wait_for_counters_within("busy", Duration::from_secs(120), |c| {
        c["spooled"].as_u64().unwrap_or(0) + c["dead_lettered"].as_u64().unwrap_or(0)
            >= (PAYLOADS * RECORDS) as u64
    });
    spinning.store(false, std::sync::atomic::Ordering::Relaxed);
    spinners
        .into_iter()
        .for_each(|s| s.join().expect("a spinner"));
    assert_eq!(
        counters["dead_lettered"], 0,
        "no valid message is refused: {counters}"
    );
    assert_eq!(
        counters["spooled"],
        (PAYLOADS * RECORDS) as u64,
        "every record is spooled (and its message acknowledged): {counters}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_that_sleeps_does_not_hold_up_shutdown() {
    let mut attacked = Attacked::start("sleepy-stop").await;
    attacked.innocent_latency().await;
    attacked
        .bench
        .publish(&[("/devices/7/event", attack_event("sleep:60000"))])
        .await;
    let asked = Instant::now();
    assert!(
        attacked.host.stop(),
        "a clean exit\n{}",
        attacked.host.log()
    );
    let took = asked.elapsed();
    println!(
        "hostile guest: shutdown with a guest asleep for 60 s took {} ms",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
}
