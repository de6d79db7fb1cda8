//! The sink loop in process, against a Kinesis of the test's own behind
//! the [`KinesisApi`] seam: what goes in which request, in which order, and
//! how many at once. Real time with a 20 ms round trip; nothing asserts on
//! durations.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_kinesis::operation::put_records::PutRecordsOutput;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, PutRecordsResultEntry};
use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::api::{KinesisApi, Pending, PutRecordsAnswer};
use super::kinesis::KinesisSink;
use super::shards::{ListShardsError, Shard, ShardMap};
use crate::config::{Aggregation, KinesisConfig, ModuleConfig, Ordering};
use crate::kinesis::aggregate::deaggregate;
use crate::kinesis::{StreamLimits, hash_key};
use crate::module::Module;
use crate::store::Store;
use crate::store::spool::{SpoolReader, SpoolRecord};

/// Which entries of a request the test Kinesis fails: given the request's
/// (partition key, data) pairs (one per Kinesis record: an aggregate is
/// one) and how often each data was sent before.
type FailRule = fn(&[(String, Bytes)], &HashMap<Bytes, usize>) -> Vec<bool>;

#[derive(Default)]
struct Seen {
    /// Each request's (key, data) of its user records (aggregates read
    /// back), in the order they arrived.
    requests: Vec<Vec<(String, Bytes)>>,
    /// Kinesis records per request.
    entries: Vec<usize>,
    /// Accepted user records, in the order accepted.
    accepted: Vec<(String, Bytes)>,
    /// Aggregates whose user records do not all belong to the shard it
    /// landed on.
    misplaced: usize,
    /// The data of the user records accepted on the shard they belong to.
    placed_right: HashSet<Bytes>,
    /// How often each data was sent.
    sent: HashMap<Bytes, usize>,
    in_flight: usize,
    most_in_flight: usize,
    keys_in_flight: HashSet<String>,
    /// A key found in two requests at once.
    overlapping_key: Option<String>,
    /// Failed records a later record of their key overtook in a request.
    overtaken: u64,
}

/// A Kinesis that answers after a round trip, fails what `fail` says (as
/// throttled, so nothing is given up) and notes everything; it lists
/// `listed` shards, and places each Kinesis record on one of `stream` by
/// its hash key.
struct TestKinesis {
    seen: Arc<Mutex<Seen>>,
    round_trip: Duration,
    fail: FailRule,
    listed: Option<ShardMap>,
    stream: Option<ShardMap>,
}

/// The user records of a Kinesis record: an aggregate's, or itself.
fn user_records(key: &str, data: &Bytes) -> Vec<(String, Bytes)> {
    match deaggregate(data).expect("aggregates are valid") {
        Some(records) => records
            .into_iter()
            .map(|r| (r.partition_key, r.data))
            .collect(),
        None => vec![(key.to_owned(), data.clone())],
    }
}

impl KinesisApi for TestKinesis {
    fn put(
        &self,
        _stream: &str,
        entries: Vec<PutRecordsRequestEntry>,
    ) -> Pending<PutRecordsAnswer> {
        let request: Vec<(String, Bytes)> = entries
            .iter()
            .map(|e| {
                let data = Bytes::copy_from_slice(e.data().as_ref());
                (e.partition_key().unwrap_or_default().to_owned(), data)
            })
            .collect();
        // Where each Kinesis record lands, and which of its user records
        // belong there.
        let placed: Vec<(String, Vec<bool>)> = entries
            .iter()
            .zip(&request)
            .map(|(entry, (key, data))| {
                let users = user_records(key, data);
                let Some(map) = &self.stream else {
                    return ("shardId-000000000000".to_owned(), vec![true; users.len()]);
                };
                let shard_of = |key: &str, explicit: Option<&str>| {
                    map.shard_of(hash_key(key, explicit))
                        .expect("the map covers every key")
                };
                let landed = shard_of(key, entry.explicit_hash_key());
                let belong = users
                    .iter()
                    .map(|(key, _)| shard_of(key, None) == landed)
                    .collect();
                (map.id(landed).to_owned(), belong)
            })
            .collect();
        let seen = self.seen.clone();
        let round_trip = self.round_trip;
        let fail = self.fail;
        Box::pin(async move {
            let users: Vec<(String, Bytes)> = request
                .iter()
                .flat_map(|(key, data)| user_records(key, data))
                .collect();
            let keys: HashSet<String> = users.iter().map(|(k, _)| k.clone()).collect();
            {
                let mut seen = seen.lock().unwrap();
                seen.in_flight += 1;
                seen.most_in_flight = seen.most_in_flight.max(seen.in_flight);
                for key in &keys {
                    if !seen.keys_in_flight.insert(key.clone()) {
                        seen.overlapping_key = Some(key.clone());
                    }
                }
            }
            tokio::time::sleep(round_trip).await;
            let mut seen = seen.lock().unwrap();
            let failed = fail(&request, &seen.sent);
            let mut accepted_later: HashSet<&str> = HashSet::new();
            for ((key, _), failed) in request.iter().zip(&failed).rev() {
                if !failed {
                    accepted_later.insert(key);
                } else if accepted_later.contains(key.as_str()) {
                    seen.overtaken += 1;
                }
            }
            let mut results = Vec::new();
            for (((key, data), failed), (shard, belong)) in request.iter().zip(&failed).zip(&placed)
            {
                *seen.sent.entry(data.clone()).or_default() += 1;
                let entry = if *failed {
                    PutRecordsResultEntry::builder()
                        .error_code("ProvisionedThroughputExceededException")
                        .error_message("test")
                } else {
                    let users = user_records(key, data);
                    seen.misplaced += usize::from(belong.contains(&false));
                    for ((_, data), belongs) in users.iter().zip(belong) {
                        if *belongs {
                            seen.placed_right.insert(data.clone());
                        }
                    }
                    seen.accepted.extend(users);
                    PutRecordsResultEntry::builder()
                        .sequence_number("1")
                        .shard_id(shard)
                };
                results.push(entry.build());
            }
            for key in &keys {
                seen.keys_in_flight.remove(key);
            }
            seen.in_flight -= 1;
            seen.entries.push(request.len());
            seen.requests.push(users);
            let failed_count = failed.iter().filter(|f| **f).count() as i32;
            Ok(PutRecordsOutput::builder()
                .set_records(Some(results))
                .failed_record_count(failed_count)
                .build()
                .expect("records are set"))
        })
    }

    fn open_shards(&self, _stream: &str) -> Pending<Result<ShardMap, ListShardsError>> {
        // Without a shard map the sink sends without pacing.
        let shards = self.listed.clone().ok_or(ListShardsError::Api {
            code: "AccessDeniedException".into(),
            message: "not in this test".into(),
        });
        Box::pin(async { shards })
    }
}

fn accept_all(request: &[(String, Bytes)], _: &HashMap<Bytes, usize>) -> Vec<bool> {
    vec![false; request.len()]
}

/// A module over a store of its own, removed when dropped.
struct TestModule {
    module: Arc<Module>,
    dir: std::path::PathBuf,
}

impl TestModule {
    fn new(name: &str, aggregation: Aggregation) -> Self {
        let dir = std::env::temp_dir().join(format!("ksm-sink-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();
        let config = ModuleConfig {
            id: "test".into(),
            stream_name: "stream".into(),
            region: "us-east-1".into(),
            aggregation,
            ..ModuleConfig::default()
        };
        let module = Arc::new(Module::open(config, &store, u64::MAX).unwrap());
        Self { module, dir }
    }
}

impl Drop for TestModule {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Records `key{k}` / `{k}:{n}` for keys 0..keys and n in `rounds` (every
/// key's n-th record before any key's n+1-th), seqs from `first`, cut into
/// groups of `group`.
fn groups(
    first: u64,
    keys: usize,
    rounds: std::ops::Range<usize>,
    group: usize,
) -> Vec<Vec<SpoolRecord>> {
    let mut records = Vec::new();
    for n in rounds {
        for k in 0..keys {
            let mut record = SpoolRecord::new(
                Bytes::from(format!("{k}:{n:05}")),
                &format!("key{k}"),
                None,
                "/devices/1/event".into(),
            );
            record.seq = first + records.len() as u64;
            records.push(record);
        }
    }
    records.chunks(group).map(<[SpoolRecord]>::to_vec).collect()
}

struct Run {
    seen: Seen,
    module: TestModule,
}

/// Runs a sink over `before` (spooled before it starts) and `live` (handed
/// over as the committer does), until it has sent everything.
async fn run(
    name: &str,
    config: KinesisConfig,
    window: usize,
    fail: FailRule,
    before: Vec<Vec<SpoolRecord>>,
    live: Vec<Vec<SpoolRecord>>,
) -> Run {
    let kinesis = Kinesis {
        fail,
        listed: None,
        stream: None,
        aggregation: Aggregation::None,
    };
    run_with(name, config, kinesis, window, before, live).await
}

/// How the test Kinesis behaves and what the module asks of it.
struct Kinesis {
    fail: FailRule,
    /// The shards it lists.
    listed: Option<ShardMap>,
    /// The shards it places records on.
    stream: Option<ShardMap>,
    aggregation: Aggregation,
}

/// As [`run`], against `kinesis`.
async fn run_with(
    name: &str,
    config: KinesisConfig,
    kinesis: Kinesis,
    window: usize,
    before: Vec<Vec<SpoolRecord>>,
    live: Vec<Vec<SpoolRecord>>,
) -> Run {
    let Kinesis {
        fail,
        listed,
        stream,
        aggregation,
    } = kinesis;
    let module = TestModule::new(name, aggregation);
    let spool = &module.module.spool;
    for group in &before {
        spool.commit_for_tests(group);
    }
    let reader = SpoolReader::new(spool, window).unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let kinesis = TestKinesis {
        seen: seen.clone(),
        round_trip: Duration::from_millis(20),
        fail,
        listed,
        stream,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let (_stop_tx, stop) = watch::channel(false);
    let sink = KinesisSink::new(
        Arc::new(kinesis),
        module.module.clone(),
        config,
        StreamLimits::default(),
        reader,
        rx,
    );
    let task = tokio::spawn(sink.run(stop));
    for group in live {
        spool.commit_for_tests(&group);
        tx.send(group).unwrap();
    }
    drop(tx);
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("the sink sends everything and stops")
        .unwrap();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    Run { seen, module }
}

fn config(ordering: Ordering, max_in_flight: usize) -> KinesisConfig {
    KinesisConfig {
        ordering,
        max_in_flight,
        linger_ms: 1,
        retry_base_ms: 1,
        retry_max_ms: 4,
        ..KinesisConfig::default()
    }
}

/// Each key's accepted data, in the order accepted.
fn per_key(accepted: &[(String, Bytes)]) -> HashMap<String, Vec<Bytes>> {
    let mut keys: HashMap<String, Vec<Bytes>> = HashMap::new();
    for (key, data) in accepted {
        keys.entry(key.clone()).or_default().push(data.clone());
    }
    keys
}

fn assert_each_once_and_in_order(seen: &Seen, records: usize) {
    assert_eq!(seen.accepted.len(), records);
    let unique: HashSet<&Bytes> = seen.accepted.iter().map(|(_, d)| d).collect();
    assert_eq!(unique.len(), records, "each record accepted once");
    for (key, data) in per_key(&seen.accepted) {
        let mut sorted = data.clone();
        sorted.sort();
        assert_eq!(data, sorted, "{key} in order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_order_sends_many_records_of_a_key_per_request_several_requests_at_once() {
    let live = groups(1, 50, 0..40, 100);
    let run = run(
        "key",
        config(Ordering::Key, 4),
        1 << 30,
        accept_all,
        vec![],
        live,
    )
    .await;
    let seen = &run.seen;
    assert_each_once_and_in_order(seen, 2000);
    assert_eq!(
        seen.overlapping_key, None,
        "a key is in one request at a time"
    );
    assert!(
        (2..=4).contains(&seen.most_in_flight),
        "{} requests at once",
        seen.most_in_flight
    );
    let most_of_a_key = seen
        .requests
        .iter()
        .flat_map(|r| per_key(r).into_values().map(|v| v.len()))
        .max();
    assert!(most_of_a_key > Some(1), "{most_of_a_key:?}");
    assert_eq!(run.module.module.spool.len(), (0, 0));
}

/// Fails a key's first record in a request that carries several of it,
/// the first time that record is sent (as throttled).
fn fail_first_of_each_key(request: &[(String, Bytes)], sent: &HashMap<Bytes, usize>) -> Vec<bool> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for (key, _) in request {
        *counts.entry(key).or_default() += 1;
    }
    let mut seen_keys = HashSet::new();
    request
        .iter()
        .map(|(key, data)| {
            seen_keys.insert(key.as_str()) && counts[key.as_str()] > 1 && !sent.contains_key(data)
        })
        .collect()
}

/// Fails every third entry of a request the first time it is sent.
fn fail_every_third(request: &[(String, Bytes)], sent: &HashMap<Bytes, usize>) -> Vec<bool> {
    request
        .iter()
        .enumerate()
        .map(|(i, (_, data))| i % 3 == 0 && !sent.contains_key(data))
        .collect()
}

/// Fails the second, fifth, eighth... entry of a request the first time it
/// is sent: some Kinesis records of a request fail, the first never does.
fn fail_some_after_the_first(
    request: &[(String, Bytes)],
    sent: &HashMap<Bytes, usize>,
) -> Vec<bool> {
    request
        .iter()
        .enumerate()
        .map(|(i, (_, data))| i % 3 == 1 && !sent.contains_key(data))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_order_counts_every_record_overtaken_by_a_later_one_of_its_key() {
    let live = groups(1, 20, 0..30, 50);
    let run = run(
        "overtaken",
        config(Ordering::Key, 4),
        1 << 30,
        fail_first_of_each_key,
        vec![],
        live,
    )
    .await;
    let seen = &run.seen;
    assert_eq!(seen.accepted.len(), 600);
    assert!(seen.overtaken > 0);
    let counters = run.module.module.counters();
    assert_eq!(counters.reordered, seen.overtaken);
    assert_eq!(counters.forwarded, 600);
    let log = run.module.module.log.entries(crate::activity::Level::Warn);
    assert!(
        log.iter()
            .any(|e| e.message.contains("accepted a later one of the same key")),
        "{log:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_order_sends_one_record_of_a_key_per_request_and_holds_order_under_failures() {
    let live = groups(1, 30, 0..20, 60);
    let run = run(
        "strict",
        config(Ordering::Strict, 4),
        1 << 30,
        fail_every_third,
        vec![],
        live,
    )
    .await;
    let seen = &run.seen;
    assert_each_once_and_in_order(seen, 600);
    assert!(
        seen.requests
            .iter()
            .all(|r| per_key(r).values().all(|v| v.len() == 1))
    );
    assert_eq!(seen.overtaken, 0);
    assert_eq!(run.module.module.counters().reordered, 0);
    assert!(
        seen.requests.len() >= 20,
        "at least one round trip per record of a key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_larger_than_the_window_drains_in_order_from_disk() {
    // 6,000 records spooled before the start, 2,000 while it drains; the
    // window holds about 300.
    let before = groups(1, 40, 0..150, 200);
    let live = groups(6001, 40, 150..200, 200);
    let run = run(
        "drain",
        config(Ordering::Key, 8),
        64 * 1024,
        accept_all,
        before,
        live,
    )
    .await;
    assert_each_once_and_in_order(&run.seen, 8000);
    assert_eq!(run.module.module.spool.len(), (0, 0));
}

/// Four shards splitting the hash-key space evenly.
fn four_shards() -> ShardMap {
    let quarter = u128::MAX / 4 + 1;
    ShardMap::new(
        (0..4u128)
            .map(|i| Shard {
                id: format!("shardId-00000000000{i}"),
                start: i * quarter,
                end: if i == 3 {
                    u128::MAX
                } else {
                    (i + 1) * quarter - 1
                },
            })
            .collect(),
    )
}

/// The map the sink lists while the stream has four shards: the one shard
/// they were split from, as before a resharding the sink has not seen.
fn stale_single_shard() -> ShardMap {
    ShardMap::new(vec![Shard {
        id: "shardId-parent".into(),
        start: 0,
        end: u128::MAX,
    }])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregation_packs_records_per_shard_and_holds_every_key_in_order_under_failures() {
    for (ordering, fail, failing) in [
        (Ordering::Key, accept_all as FailRule, false),
        (Ordering::Key, fail_some_after_the_first, true),
        (Ordering::Strict, fail_some_after_the_first, true),
    ] {
        let live = groups(1, 200, 0..20, 400);
        let kinesis = Kinesis {
            fail,
            listed: Some(four_shards()),
            stream: Some(four_shards()),
            aggregation: Aggregation::Kpl,
        };
        let run = run_with(
            "aggregated",
            config(ordering, 4),
            kinesis,
            1 << 30,
            vec![],
            live,
        )
        .await;
        let seen = &run.seen;
        assert_each_once_and_in_order(seen, 4000);
        assert_eq!(seen.misplaced, 0, "each aggregate is on its records' shard");
        let counters = run.module.module.counters();
        assert_eq!(counters.forwarded, 4000);
        assert_eq!(counters.reordered, 0, "{ordering:?}");
        let entries: usize = seen.entries.iter().sum();
        assert!(
            seen.requests.len() < 50 && entries < 100,
            "{ordering:?}: {} requests, {entries} Kinesis records for 4000 records",
            seen.requests.len()
        );
        assert_eq!(counters.retried > 0, failing, "{ordering:?}: {counters:?}");
        assert!(
            counters.kinesis_records * 10 < counters.forwarded,
            "{ordering:?}: {counters:?}"
        );
        let log = run.module.module.log.entries(crate::activity::Level::Info);
        assert!(
            log.iter()
                .any(|e| e.message.starts_with("aggregation is on")),
            "{log:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_that_lands_on_another_shard_is_sent_again_where_it_belongs() {
    // The sink's map has one shard; the stream has four: aggregates mix
    // records of four shards and land on their first record's.
    let live = groups(1, 40, 0..5, 200);
    let kinesis = Kinesis {
        fail: accept_all,
        listed: Some(stale_single_shard()),
        stream: Some(four_shards()),
        aggregation: Aggregation::Kpl,
    };
    let run = run_with(
        "resharded",
        config(Ordering::Key, 2),
        kinesis,
        1 << 30,
        vec![],
        live,
    )
    .await;
    let seen = &run.seen;
    let log = run.module.module.log.entries(crate::activity::Level::Warn);
    assert!(seen.misplaced > 0, "the test mixes shards");
    assert!(
        log.iter()
            .any(|e| e.message.contains("the stream was resharded")),
        "{log:?}"
    );
    // Every record reached the shard it belongs to, in the end.
    assert_eq!(seen.placed_right.len(), 200);
    let counters = run.module.module.counters();
    assert_eq!(counters.forwarded, 200);
    assert!(counters.retried > 0);
    assert_eq!(run.module.module.spool.len(), (0, 0));
}
