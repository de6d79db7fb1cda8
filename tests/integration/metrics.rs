//! `GET /metrics` scraped while a host forwards events and bulk data to two
//! modules: the Prometheus text format (content type, family types,
//! histogram buckets), and each module's figures checked against what its
//! stream received and what its guest was called with.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ksm_tests::{create_stream, read_all_records, unique_stream_name, wait_for_records};

use crate::support::{Bench, Ksm, module, raw_http};

/// The module that takes every event (and no bulk data).
const EVENTS: &str = "all-events";
/// The module that takes door events and bulk data labelled `raw`.
const BULK: &str = "doors-and-raw";

/// How long the figures may take to settle once the records are in the streams.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// A scrape, parsed.
#[derive(Debug)]
struct Scrape {
    /// Family name to type, from the `# TYPE` lines.
    types: HashMap<String, String>,
    samples: Vec<Sample>,
    text: String,
}

impl Scrape {
    /// Parses the text format; panics on a line it cannot read.
    fn parse(text: &str) -> Scrape {
        let mut types = HashMap::new();
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
                types.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            samples.push(parse_sample(line).unwrap_or_else(|| panic!("bad sample line {line:?}")));
        }
        Scrape {
            types,
            samples,
            text: text.to_owned(),
        }
    }

    /// The value of the one sample `name` with exactly `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .collect();
        match found[..] {
            [one] => one.value,
            _ => panic!(
                "{} samples {name}{labels:?} in:\n{}",
                found.len(),
                self.text
            ),
        }
    }

    /// The value of `name{module="..."}`, as a count.
    fn of(&self, name: &str, module: &str) -> u64 {
        let value = self.value(name, &[("module", module)]);
        assert!(
            value >= 0.0 && value.fract() == 0.0,
            "{name}{{module={module:?}}} = {value}"
        );
        value as u64
    }

    /// The samples of histogram `family` of `module`: its buckets (bound,
    /// cumulative count) in the order given, and its count.
    fn histogram(&self, family: &str, module: &str) -> (Vec<(f64, f64)>, f64) {
        let bucket = format!("{family}_bucket");
        let buckets = self
            .samples
            .iter()
            .filter(|s| s.name == bucket && s.labels.contains(&label("module", module)))
            .map(|s| {
                let le = s
                    .labels
                    .iter()
                    .find(|(k, _)| k == "le")
                    .map(|(_, v)| v.parse::<f64>().expect("a bucket bound"))
                    .expect("a bucket has `le`");
                (le, s.value)
            })
            .collect();
        let count = self.value(&format!("{family}_count"), &[("module", module)]);
        (buckets, count)
    }
}

fn label(name: &str, value: &str) -> (String, String) {
    (name.to_owned(), value.to_owned())
}

/// `name{a="x",b="y"} value [timestamp]`, label values with `\\`, `\"` and `\n` escapes.
fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices();
        let mut key = String::new();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => break i,
                ',' | ' ' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '"' => break,
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            other => value.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                other => key.push(other),
            }
        };
        rest = &inner[end + 1..];
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// `GET /metrics` with the host's client, parsed.
fn scrape(host: &Ksm) -> Scrape {
    let (status, body) = host.get_raw("/metrics");
    assert_eq!(status, 200, "{body}");
    Scrape::parse(&body)
}

/// Checks the families' declared types, that every sample belongs to a
/// declared family, and that histogram buckets are cumulative and end at
/// `+Inf` = `_count`.
fn check_format(scrape: &Scrape) {
    for (family, kind) in [
        ("ksm_messages_received_total", "counter"),
        ("ksm_records_forwarded_total", "counter"),
        ("ksm_kinesis_records_forwarded_total", "counter"),
        ("ksm_putrecords_requests_total", "counter"),
        ("ksm_guest_traps_total", "counter"),
        ("ksm_mqtt_connection_failures_total", "counter"),
        ("ksm_delivery_latency_seconds", "histogram"),
        ("ksm_guest_call_duration_seconds", "histogram"),
        ("ksm_putrecords_duration_seconds", "histogram"),
        ("ksm_spool_records", "gauge"),
        ("ksm_spool_bytes", "gauge"),
        ("ksm_mqtt_connected", "gauge"),
        ("ksm_acknowledgements_pending", "gauge"),
    ] {
        assert_eq!(
            scrape.types.get(family).map(String::as_str),
            Some(kind),
            "# TYPE of {family} in:\n{}",
            scrape.text
        );
    }
    for sample in &scrape.samples {
        let family = [
            sample.name.as_str(),
            sample.name.trim_end_matches("_bucket"),
            sample.name.trim_end_matches("_count"),
            sample.name.trim_end_matches("_sum"),
        ]
        .into_iter()
        .find(|family| scrape.types.contains_key(*family));
        assert!(
            family.is_some(),
            "{} has no # TYPE in:\n{}",
            sample.name,
            scrape.text
        );
    }
    for family in [
        "ksm_delivery_latency_seconds",
        "ksm_guest_call_duration_seconds",
        "ksm_putrecords_duration_seconds",
    ] {
        for module in [EVENTS, BULK] {
            let (buckets, count) = scrape.histogram(family, module);
            assert!(buckets.len() > 1, "{family} {module}: {buckets:?}");
            assert!(
                buckets
                    .windows(2)
                    .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                "{family} {module}: bounds rise, counts are cumulative: {buckets:?}"
            );
            assert_eq!(
                buckets.last().copied(),
                Some((f64::INFINITY, count)),
                "{family} {module}: the last bucket is +Inf and holds every observation"
            );
        }
    }
}

/// An event of type `t` from device `device` (registered or not: it says its home).
fn event(device: u64, t: &str) -> (String, Vec<u8>) {
    (
        format!("/devices/{device}/event"),
        format!(r#"{{"eventType":"{t}","eventData":{{}},"homeId":77}}"#).into_bytes(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_what_each_module_received_and_kinesis_accepted() {
    let bench = Bench::new("metrics-events", 2).await;
    let bulk_stream = unique_stream_name("metrics-bulk");
    create_stream(&bench.kinesis, &bulk_stream, 1).await;
    let host = bench.ksm(
        "ksm-metrics",
        &[
            module(EVENTS, &bench.stream, "subscribe_events = [\"*\"]"),
            module(
                BULK,
                &bulk_stream,
                "subscribe_events = [\"door\"]\nbulk_data_label = \"raw\"",
            ),
        ],
    );

    // The format, before anything happened: every figure is there, at zero.
    let answer = raw_http(host.admin_addr(), "GET /metrics", &[]).expect("GET /metrics");
    assert_eq!(answer.status, 200, "{answer:?}");
    let content_type = answer.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "Prometheus text format 0.0.4: {content_type:?}"
    );
    let before = Scrape::parse(&answer.body);
    check_format(&before);
    for module in [EVENTS, BULK] {
        for name in [
            "ksm_messages_received_total",
            "ksm_records_forwarded_total",
            "ksm_putrecords_requests_total",
            "ksm_spool_records",
        ] {
            assert_eq!(before.of(name, module), 0, "{name} {module} at start");
        }
    }
    assert_eq!(
        before.value("ksm_mqtt_connected", &[]),
        1.0,
        "ready, so connected"
    );

    // 8 events (3 doors), 2 bulk payloads of `raw` (7 records), 1 of another label.
    let mut messages: Vec<(String, Vec<u8>)> = Vec::new();
    for (device, t) in [
        (1001, "door"),
        (1001, "window"),
        (2002, "window"),
        (2002, "door"),
        (1001, "window"),
        (2002, "window"),
        (1001, "door"),
    ] {
        messages.push(event(device, t));
    }
    messages.push((
        "/homes/77/event".into(),
        br#"{"eventType":"alarm","eventData":{}}"#.to_vec(),
    ));
    let raw = |n: usize, tag: &str| {
        let records: Vec<Vec<u8>> = (0..n).map(|i| format!("{tag}-{i}").into_bytes()).collect();
        ksm_host::bulk::encode(&records)
    };
    messages.push(("/devices/1001/bulkData/raw".into(), raw(3, "a")));
    messages.push(("/devices/2002/bulkData/raw".into(), raw(4, "b")));
    messages.push(("/devices/1001/bulkData/other".into(), raw(2, "c")));
    bench.publish(&messages).await;
    let received = messages.len() as u64;
    let (events_forwarded, bulk_forwarded) = (8, 3 + 7);

    let timeout = Duration::from_secs(30);
    let events = wait_for_records(&bench.kinesis, &bench.stream, 8, timeout).await;
    assert_eq!(events.len(), 8, "{}", host.log());
    let bulk = wait_for_records(&bench.kinesis, &bulk_stream, 10, timeout).await;
    assert_eq!(bulk.len(), 10, "{}", host.log());

    // Wait (bounded) until every record is counted, spooled no more and acknowledged.
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let settled = |s: &Scrape| {
        s.of("ksm_records_forwarded_total", EVENTS) == events_forwarded
            && s.of("ksm_records_forwarded_total", BULK) == bulk_forwarded
            && [EVENTS, BULK].iter().all(|m| {
                s.of("ksm_spool_records", m) == 0
                    && s.of("ksm_putrecords_requests_total", m)
                        == s.of("ksm_putrecords_duration_seconds_count", m)
            })
            && s.value("ksm_acknowledgements_pending", &[]) == 0.0
    };
    let after = loop {
        let scrape = scrape(&host);
        if settled(&scrape) || Instant::now() >= deadline {
            break scrape;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    check_format(&after);

    let stream_counts = [
        (
            EVENTS,
            read_all_records(&bench.kinesis, &bench.stream).await.len(),
        ),
        (
            BULK,
            read_all_records(&bench.kinesis, &bulk_stream).await.len(),
        ),
    ];
    for ((module, in_stream), expected_filtered) in stream_counts.into_iter().zip([3, 6]) {
        let forwarded = after.of("ksm_records_forwarded_total", module);
        assert_eq!(
            forwarded, in_stream as u64,
            "{module}: forwarded = what its stream holds\n{}",
            after.text
        );
        assert_eq!(
            after.of("ksm_kinesis_records_forwarded_total", module),
            forwarded,
            "{module}: without aggregation, one Kinesis record per record"
        );
        let counters = host.counters(module);
        assert_eq!(
            after.of("ksm_messages_received_total", module),
            received,
            "{module}"
        );
        assert_eq!(counters["received"], received, "{module}: same as the API");
        assert_eq!(
            after.of("ksm_messages_filtered_total", module),
            expected_filtered,
            "{module}"
        );
        assert_eq!(
            counters["forwarded"], forwarded,
            "{module}: same as the API"
        );
        assert_eq!(
            after.of("ksm_records_spooled_total", module),
            forwarded,
            "{module}"
        );
        assert_eq!(after.of("ksm_dead_letters_total", module), 0, "{module}");
        assert_eq!(after.of("ksm_records_retried_total", module), 0, "{module}");
        let requests = after.of("ksm_putrecords_requests_total", module);
        assert!(
            (1..=forwarded).contains(&requests),
            "{module}: {requests} PutRecords requests for {forwarded} records"
        );
        assert_eq!(
            after.of("ksm_putrecords_duration_seconds_count", module),
            requests,
            "{module}: every request answered and timed"
        );
        assert_eq!(
            after.of("ksm_delivery_latency_seconds_count", module),
            forwarded,
            "{module}: one delivery latency per accepted record"
        );
        let calls = after.of("ksm_guest_call_duration_seconds_count", module);
        assert!(
            (1..=received).contains(&calls),
            "{module}: {calls} guest calls for {received} messages (a batch is one call)"
        );
        assert_eq!(after.of("ksm_spool_records", module), 0, "{module}");
        assert_eq!(after.of("ksm_spool_bytes", module), 0, "{module}");
        for kind in ["trap", "deadline", "memory"] {
            let traps = after.value(
                "ksm_guest_traps_total",
                &[("module", module), ("kind", kind)],
            );
            assert_eq!(traps, 0.0, "{module}: no guest {kind}");
        }
        assert_eq!(
            after.of("ksm_component_reloads_total", module),
            0,
            "{module}"
        );
    }
    assert_eq!(after.value("ksm_mqtt_connected", &[]), 1.0);
    assert_eq!(
        after.value("ksm_acknowledgements_pending", &[]),
        0.0,
        "{}",
        after.text
    );
    assert_eq!(after.value("ksm_mqtt_connection_failures_total", &[]), 0.0);
    assert!(
        !after
            .samples
            .iter()
            .any(|s| s.name == "ksm_putrecords_failures_total"),
        "no failure to count:\n{}",
        after.text
    );
}
