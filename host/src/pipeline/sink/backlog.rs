//! The sink's backlog: spooled records queued per partition key, so that a
//! key's records reach Kinesis in order while different keys go in parallel.
//!
//! A key's records are in at most one request at a time, taken from the
//! head of its queue: up to `max_per_key` of them (`kinesis.ordering =
//! "key"`: as many as a request takes; `"strict"`: one, since Kinesis may
//! fail one record of a request and accept the next, and two records of one
//! key in one request could then land out of order; [`overtaken`] finds
//! those; with aggregation, as many as share one aggregate, which succeeds
//! or fails whole). Which Kinesis record each joins, and what the
//! request's limits and the shards' pacing allow, is [`super::pack`]'s. A key whose record failed waits out its own backoff while other
//! keys go on; its failed records stay at its head and are sent again
//! before anything newer.
//!
//! Each key also has a cap on the size of the requests it may travel in.
//! A request-level server error cannot be pinned on one record of a
//! multi-record request, so it halves the cap of every key in the request:
//! the next requests are halves of it, the records that are fine go through
//! in them, and a record that makes every request fail ends up alone within
//! about nine failures (500, 250, ..., 2, 1), where [`super::retry`] can
//! count its failures. `InvalidArgumentException` drops the caps to 1 at
//! once, to find the refused record. A key's cap goes straight back to full
//! when its record is accepted: the suspicion was on that record, not on the
//! key, and the key's next record is another one.
//!
//! [`Backlog::settle`] decides what becomes of each record of an answered
//! request: accepted, retried, or given up as a dead letter (see
//! [`super::retry`] for when).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::pack::{Batch, Offer, Packer};
use super::retry::{Failure, FailureKind, Health, Place, RetryLimits, Track, counts};
use crate::store::spool::SpoolRecord;

/// A key's cap while nothing narrows it: no limit of its own.
const FULL_CAP: usize = usize::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyState {
    /// In the ready queue.
    Ready,
    /// Records of this key are in a request.
    InFlight,
    /// Waiting out a backoff.
    Waiting,
}

#[derive(Debug)]
struct KeyQueue {
    records: VecDeque<SpoolRecord>,
    failures: u32,
    state: KeyState,
    /// Most records of a request this key may travel in: lowered to narrow
    /// down a failing record, 1 to send it alone.
    cap: usize,
}

/// What Kinesis answered to a request, for [`Backlog::settle`].
#[derive(Debug, Clone, Copy)]
pub enum Answer<'a> {
    /// A 200 answer: for each record of the request, in order, `None` if
    /// Kinesis accepted it, or why its entry failed.
    Entries(&'a [Option<Failure>]),
    /// A 200 answer to a request of aggregates: as `Entries`, with, for
    /// each record, whether its Kinesis record held other records too (a
    /// failure of such an aggregate is not pinned on any one of them).
    Aggregated(&'a [Option<Failure>], &'a [bool]),
    /// The request as a whole failed.
    Request(&'a Failure),
}

/// What becomes of one record of a settled request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Kinesis accepted it.
    Accepted,
    /// It is sent again (after its key's backoff).
    Retry,
    /// It is given up and kept as a dead letter, for this reason.
    DeadLetter(String),
}

/// Records waiting to be sent, per partition key.
#[derive(Debug)]
pub struct Backlog {
    keys: HashMap<Arc<str>, KeyQueue>,
    ready: VecDeque<Arc<str>>,
    waiting: BinaryHeap<Reverse<(Instant, Arc<str>)>>,
    max_per_key: usize,
    records: usize,
    /// Bytes of the records waiting, in flight included.
    bytes: usize,
    /// The failures of records that failed at least once, by spool seq.
    tracks: HashMap<u64, Track>,
    /// How the requests have gone so far, to tell whether others went
    /// through while a record failed.
    health: Health,
    limits: RetryLimits,
}

impl Backlog {
    /// An empty backlog sending up to `max_per_key` records of a key per
    /// request, and giving up a record Kinesis keeps failing within
    /// `limits`.
    pub fn new(max_per_key: usize, limits: RetryLimits) -> Self {
        Self {
            keys: HashMap::new(),
            ready: VecDeque::new(),
            waiting: BinaryHeap::new(),
            max_per_key: max_per_key.max(1),
            records: 0,
            bytes: 0,
            tracks: HashMap::new(),
            health: Health::default(),
            limits,
        }
    }

    /// Records waiting, in flight included.
    pub fn len(&self) -> usize {
        self.records
    }

    /// Bytes of the records waiting, in flight included.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Queues a record behind the earlier ones of its key.
    pub fn push(&mut self, record: SpoolRecord) {
        self.records += 1;
        self.bytes += record.size;
        let key = record.partition_key.clone();
        match self.keys.get_mut(&key) {
            Some(queue) => queue.records.push_back(record),
            None => {
                self.keys.insert(
                    key.clone(),
                    KeyQueue {
                        records: VecDeque::from([record]),
                        failures: 0,
                        state: KeyState::Ready,
                        cap: FULL_CAP,
                    },
                );
                self.ready.push_back(key);
            }
        }
    }

    /// When the earliest key in backoff may go again.
    pub fn next_retry(&self) -> Option<Instant> {
        self.waiting.peek().map(|Reverse((at, _))| *at)
    }

    /// Takes the next request's records: keys in turn, the head records of
    /// each, as `packer` takes them (it packs them into Kinesis records
    /// within the request's limits and paces the shards) and within the
    /// keys' caps (a key joins only a request no larger than its cap).
    pub fn next_batch(&mut self, now: Instant, mut packer: Packer<'_>) -> Batch {
        while let Some(Reverse((at, _))) = self.waiting.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, key))) = self.waiting.pop() else {
                break;
            };
            if let Some(queue) = self.keys.get_mut(&key) {
                queue.state = KeyState::Ready;
                self.ready.push_back(key);
            }
        }
        let mut paced_for: Option<Duration> = None;
        let mut taken_in_all = 0;
        // The request's size limit: the smallest cap of the keys in it.
        let mut limit = FULL_CAP;
        for _ in 0..self.ready.len() {
            if taken_in_all >= limit {
                break;
            }
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            let Some(queue) = self.keys.get_mut(&key) else {
                continue;
            };
            if queue.cap <= taken_in_all {
                // Joining would make the request larger than the key may travel in.
                self.ready.push_back(key);
                continue;
            }
            let room = limit.min(queue.cap);
            let mut taken = 0;
            let mut full = false;
            for record in queue.records.iter().take(self.max_per_key) {
                if taken_in_all >= room {
                    break;
                }
                match packer.offer(record, taken == 0) {
                    Offer::Taken => {
                        taken += 1;
                        taken_in_all += 1;
                    }
                    Offer::KeyDone => break,
                    Offer::Paced(wait) => {
                        paced_for = Some(paced_for.map_or(wait, |w| w.min(wait)));
                        break;
                    }
                    Offer::Full => {
                        full = true;
                        break;
                    }
                }
            }
            if taken == 0 {
                self.ready.push_back(key);
            } else {
                limit = room;
                queue.state = KeyState::InFlight;
            }
            if full {
                break;
            }
        }
        packer.finish(paced_for)
    }

    /// Decides what becomes of each record of a sent request from Kinesis'
    /// `answer` at `now`, and lowers the caps of the keys of a request that
    /// failed with a server error (to half the request's size) or was
    /// refused (to 1). Call [`Backlog::complete`] next, with the records
    /// that left (accepted, or moved to the dead letters).
    pub fn settle(
        &mut self,
        records: &[SpoolRecord],
        answer: Answer<'_>,
        now: Instant,
    ) -> Vec<Verdict> {
        let health_before = self.health;
        match answer {
            Answer::Entries(results) | Answer::Aggregated(results, _) => {
                let shared = match answer {
                    Answer::Aggregated(_, shared) => shared,
                    _ => &[],
                };
                let accepted = results.iter().filter(|r| r.is_none()).count();
                self.health.note(accepted > 0);
                let alone = Place::Entry {
                    others_accepted: accepted > results.len() - accepted,
                };
                records
                    .iter()
                    .zip(results)
                    .enumerate()
                    .map(|(i, (record, result))| match result {
                        None => Verdict::Accepted,
                        Some(failure) => {
                            let place = if shared.get(i).copied().unwrap_or(false) {
                                Place::Aggregate
                            } else {
                                alone
                            };
                            self.fail(record, failure, place, health_before, now)
                        }
                    })
                    .collect()
            }
            Answer::Request(failure) => {
                self.health.note(false);
                let place = Place::Request {
                    records: records.len(),
                };
                match failure.kind {
                    FailureKind::Refused if records.len() == 1 => {
                        return vec![Verdict::DeadLetter(format!(
                            "Kinesis refused the record: {}",
                            failure.detail
                        ))];
                    }
                    FailureKind::Refused => self.narrow(records, 1),
                    FailureKind::Server => self.narrow(records, records.len().div_ceil(2)),
                    FailureKind::Throttled | FailureKind::Unreachable | FailureKind::Stream => {}
                }
                records
                    .iter()
                    .map(|record| self.fail(record, failure, place, health_before, now))
                    .collect()
            }
        }
    }

    /// Notes a failure of `record` and says whether it is retried or given up.
    fn fail(
        &mut self,
        record: &SpoolRecord,
        failure: &Failure,
        place: Place,
        health_before: Health,
        now: Instant,
    ) -> Verdict {
        let track = self.tracks.entry(record.seq).or_default();
        let counted = counts(
            failure.kind,
            place,
            track.healthy_since_previous_failure(health_before),
        );
        let detail = counted.then_some(failure.detail.as_str());
        match track.fail(detail, self.health, now, &self.limits) {
            Some(reason) => Verdict::DeadLetter(reason),
            None => Verdict::Retry,
        }
    }

    /// Lowers the caps of the keys of `records` to at most `cap`: the sink
    /// does so for the records of an aggregate that failed with a server
    /// error, which may be one record's fault, so that the next aggregates
    /// are halves of it and the culprit ends up alone.
    pub fn narrow(&mut self, records: &[SpoolRecord], cap: usize) {
        for record in records {
            if let Some(queue) = self.keys.get_mut(&record.partition_key) {
                queue.cap = queue.cap.min(cap.max(1));
            }
        }
    }

    /// Settles a sent batch: `done[i]` says whether `records[i]` left the
    /// backlog (accepted, or kept as a dead letter). A key with a record
    /// not done waits `backoff(failures)` before it goes again; a key whose
    /// records all left gets its full cap back.
    pub fn complete(
        &mut self,
        records: &[SpoolRecord],
        done: &[bool],
        now: Instant,
        backoff: impl Fn(u32) -> Duration,
    ) {
        // Each key of the request, in order, with whether each of its records
        // left; a key's records in a request are the head of its queue.
        let mut taken: Vec<(&Arc<str>, Vec<bool>)> = Vec::new();
        let mut index: HashMap<&Arc<str>, usize> = HashMap::new();
        for (record, done) in records.iter().zip(done) {
            let key = &record.partition_key;
            let at = *index.entry(key).or_insert_with(|| {
                taken.push((key, Vec::new()));
                taken.len() - 1
            });
            taken[at].1.push(*done);
            if *done {
                self.tracks.remove(&record.seq);
            }
        }
        for (key, marks) in taken {
            let Some(queue) = self.keys.get_mut(key) else {
                continue;
            };
            let head: Vec<SpoolRecord> = queue.records.drain(..marks.len()).collect();
            for (record, done) in head.into_iter().zip(&marks).rev() {
                if *done {
                    self.records -= 1;
                    self.bytes -= record.size;
                } else {
                    queue.records.push_front(record);
                }
            }
            if queue.state != KeyState::InFlight {
                continue;
            }
            if marks.contains(&false) {
                queue.failures = queue.failures.saturating_add(1);
                queue.state = KeyState::Waiting;
                let at = now + backoff(queue.failures);
                self.waiting.push(Reverse((at, key.clone())));
            } else {
                queue.failures = 0;
                queue.cap = FULL_CAP;
                if queue.records.is_empty() {
                    self.keys.remove(key);
                } else {
                    queue.state = KeyState::Ready;
                    self.ready.push_back(key.clone());
                }
            }
        }
    }
}

/// The records of an answered request that Kinesis failed (and that are
/// sent again) while it accepted a later record of their key in it: they
/// land after that record.
pub fn overtaken<'a>(records: &'a [SpoolRecord], verdicts: &[Verdict]) -> Vec<&'a SpoolRecord> {
    let mut accepted_later: HashSet<&Arc<str>> = HashSet::new();
    let mut overtaken = Vec::new();
    for (record, verdict) in records.iter().zip(verdicts).rev() {
        match verdict {
            Verdict::Accepted => {
                accepted_later.insert(&record.partition_key);
            }
            Verdict::Retry if accepted_later.contains(&record.partition_key) => {
                overtaken.push(record);
            }
            Verdict::Retry | Verdict::DeadLetter(_) => {}
        }
    }
    overtaken.reverse();
    overtaken
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinesis::{MAX_BYTES_PER_REQUEST, MAX_RECORDS_PER_REQUEST};
    use crate::pipeline::sink::pack::{AggregateLimits, Entry, PackLimits};
    use crate::pipeline::sink::shards::{Shard, ShardMap, ShardPacer};

    /// The defaults of `kinesis.record_max_attempts` and `record_max_failing_secs`.
    const LIMITS: RetryLimits = RetryLimits {
        max_attempts: 20,
        max_failing: Duration::from_secs(300),
    };

    fn record(seq: u64, key: &str) -> SpoolRecord {
        SpoolRecord {
            seq,
            partition_key: key.into(),
            explicit_hash_key: None,
            hash_key: 0,
            topic: "/devices/1/event".into(),
            size: 10 + key.len(),
            data: bytes::Bytes::from(vec![0u8; 10]),
            received_ms: 0,
        }
    }

    fn seqs(batch: &Batch) -> Vec<u64> {
        batch.records.iter().map(|r| r.seq).collect()
    }

    /// Kinesis' own request limits, without aggregation.
    const PLAIN: PackLimits = PackLimits {
        request_bytes: MAX_BYTES_PER_REQUEST,
        aggregation: None,
    };

    /// A request of plain records, without pacing.
    fn plain() -> Packer<'static> {
        Packer::new(PLAIN, None, Instant::now())
    }

    #[test]
    fn one_record_per_key_per_request_in_order() {
        let mut backlog = Backlog::new(1, LIMITS);
        for (seq, key) in [(1, "a"), (2, "a"), (3, "b"), (4, "a"), (5, "b")] {
            backlog.push(record(seq, key));
        }
        let now = Instant::now();
        let first = backlog.next_batch(now, plain());
        assert_eq!(seqs(&first), [1, 3]);
        assert!(
            backlog.next_batch(now, plain()).records.is_empty(),
            "keys in flight wait for their answer"
        );
        backlog.complete(&first.records, &[true, true], now, |_| Duration::ZERO);
        let second = backlog.next_batch(now, plain());
        assert_eq!(seqs(&second), [2, 5]);
        backlog.complete(&second.records, &[true, true], now, |_| Duration::ZERO);
        assert_eq!(seqs(&backlog.next_batch(now, plain())), [4]);
    }

    #[test]
    fn a_failed_record_is_resent_before_its_key_moves_on_and_others_do_not_wait() {
        let mut backlog = Backlog::new(1, LIMITS);
        for (seq, key) in [(1, "a"), (2, "a"), (3, "b"), (4, "b")] {
            backlog.push(record(seq, key));
        }
        let now = Instant::now();
        let first = backlog.next_batch(now, plain());
        backlog.complete(&first.records, &[false, true], now, |n| {
            Duration::from_millis(100 * u64::from(n))
        });
        assert_eq!(seqs(&backlog.next_batch(now, plain())), [4], "b goes on");
        assert_eq!(backlog.next_retry(), Some(now + Duration::from_millis(100)));
        let later = now + Duration::from_millis(100);
        assert_eq!(
            seqs(&backlog.next_batch(later, plain())),
            [1],
            "a's head again"
        );
        assert_eq!(backlog.len(), 3);
    }

    #[test]
    fn several_records_per_key_when_allowed_and_partial_success_keeps_the_rest() {
        let mut backlog = Backlog::new(3, LIMITS);
        for seq in 1..=5 {
            backlog.push(record(seq, "a"));
        }
        let now = Instant::now();
        let batch = backlog.next_batch(now, plain());
        assert_eq!(seqs(&batch), [1, 2, 3]);
        backlog.complete(&batch.records, &[true, false, true], now, |_| {
            Duration::ZERO
        });
        assert_eq!(seqs(&backlog.next_batch(now, plain())), [2, 4, 5]);
    }

    #[test]
    fn pacing_holds_records_back_and_reports_the_wait() {
        let mut backlog = Backlog::new(1, LIMITS);
        let mut a = record(1, "a");
        a.hash_key = 10;
        let mut b = record(2, "b");
        b.hash_key = u128::MAX;
        backlog.push(a);
        backlog.push(b);
        let half = u128::MAX / 2;
        let map = ShardMap::new(vec![
            Shard {
                id: "low".into(),
                start: 0,
                end: half,
            },
            Shard {
                id: "high".into(),
                start: half + 1,
                end: u128::MAX,
            },
        ]);
        let mut pacer = ShardPacer::new(2, 10, 1_000_000);
        let now = Instant::now();
        for _ in 0..10 {
            assert!(pacer.try_take(0, 1, 1, now));
        }
        let batch = backlog.next_batch(now, Packer::new(PLAIN, Some((&map, &mut pacer)), now));
        assert_eq!(seqs(&batch), [2], "a's shard is at its limit");
        assert_eq!(batch.paced_for, Some(Duration::from_millis(100)));
        assert_eq!(seqs(&backlog.next_batch(now, plain())), [1]);
    }

    #[test]
    fn requests_stay_within_kinesis_limits() {
        let mut backlog = Backlog::new(1, LIMITS);
        for seq in 0..1201 {
            backlog.push(record(seq, &format!("k{seq}")));
        }
        let now = Instant::now();
        let sizes: Vec<usize> = (0..3)
            .map(|_| backlog.next_batch(now, plain()).records.len())
            .collect();
        assert_eq!(sizes, [500, 500, 201]);

        let mut backlog = Backlog::new(1, LIMITS);
        for seq in 0..6 {
            let mut big = record(seq, &format!("k{seq}"));
            big.size = 1024 * 1024;
            backlog.push(big);
        }
        assert_eq!(backlog.next_batch(now, plain()).records.len(), 5, "5 MiB");
    }

    #[test]
    fn a_failed_record_overtaken_by_a_later_one_of_its_key_is_found() {
        let records: Vec<SpoolRecord> = [(1, "a"), (2, "a"), (3, "a"), (4, "b"), (5, "c")]
            .into_iter()
            .map(|(seq, key)| record(seq, key))
            .collect();
        let dead = Verdict::DeadLetter("x".into());
        let verdicts = [
            Verdict::Retry,
            Verdict::Accepted,
            Verdict::Retry,
            Verdict::Retry,
            dead,
        ];
        let found: Vec<u64> = overtaken(&records, &verdicts)
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(
            found,
            [1],
            "3 is last of its key; b and c have no later record"
        );
        let all_failed = vec![Verdict::Retry; 5];
        assert!(overtaken(&records, &all_failed).is_empty());
    }

    #[test]
    fn with_aggregation_a_key_travels_in_one_aggregate_however_many_records_it_has() {
        let limits = PackLimits {
            request_bytes: MAX_BYTES_PER_REQUEST,
            aggregation: Some(AggregateLimits {
                max_bytes: 51_200,
                max_records: 100,
            }),
        };
        let mut backlog = Backlog::new(usize::MAX, LIMITS);
        for seq in 0..250 {
            backlog.push(record(seq, "busy"));
        }
        for seq in 1000..1300 {
            backlog.push(record(seq, &format!("quiet{seq}")));
        }
        let now = Instant::now();
        let batch = backlog.next_batch(now, Packer::new(limits, None, now));
        let busy: Vec<&Entry> = batch.entries.iter().filter(|e| e.records == 100).collect();
        assert_eq!(batch.records.len(), 100 + 300);
        assert_eq!(
            busy.len(),
            1,
            "the busy key fills one aggregate: {:?}",
            batch.entries
        );
        assert!(
            batch.records[..100]
                .iter()
                .all(|r| &*r.partition_key == "busy")
        );
        assert_eq!(seqs(&batch)[..3], [0, 1, 2]);
        assert!(
            batch.entries[1..]
                .iter()
                .all(|e| e.records == 1 && !e.aggregated),
            "without a shard map, keys aggregate apart; one record goes plain"
        );
        backlog.complete(&batch.records, &vec![true; 400], now, |_| Duration::ZERO);
        let next = backlog.next_batch(now, Packer::new(limits, None, now));
        assert_eq!(seqs(&next)[..2], [100, 101], "the key goes on in order");
        assert_eq!(next.entries.len(), 1);
    }

    #[test]
    fn in_key_order_a_key_fills_a_request_and_failed_records_keep_their_place() {
        let mut backlog = Backlog::new(MAX_RECORDS_PER_REQUEST, LIMITS);
        for seq in 1..=600 {
            backlog.push(record(seq, "busy"));
        }
        backlog.push(record(1000, "quiet"));
        let now = Instant::now();
        let first = backlog.next_batch(now, plain());
        assert_eq!(first.records.len(), 500);
        assert_eq!(seqs(&first)[..3], [1, 2, 3]);
        let second = backlog.next_batch(now, plain());
        assert_eq!(seqs(&second), [1000], "busy is in flight");
        let done: Vec<bool> = (1..=500).map(|seq| seq % 100 != 7).collect();
        backlog.complete(&first.records, &done, now, |_| Duration::ZERO);
        assert_eq!(backlog.len(), 100 + 5 + 1);
        let again = backlog.next_batch(now, plain());
        let again = seqs(&again);
        assert_eq!(
            again[..5],
            [7, 107, 207, 307, 407],
            "failed first, in order"
        );
        assert_eq!(again[5], 501);
        assert_eq!(again.len(), 105);
    }

    fn server_error() -> Failure {
        Failure::new(FailureKind::Server, "InternalFailure: boom")
    }

    /// What the simulated Kinesis answers to one request.
    enum Reply {
        Entries(Vec<Option<Failure>>),
        Request(Failure),
    }

    /// Every record accepted.
    fn all_accepted(records: &[SpoolRecord]) -> Reply {
        Reply::Entries(vec![None; records.len()])
    }

    /// A sink over synthetic time: each step sends the next batch (a request
    /// takes 10 ms), has `kinesis` answer it, settles it and waits out the
    /// keys' backoff (100 ms doubling per failure, at most 10 s, no jitter).
    struct Sim {
        backlog: Backlog,
        start: Instant,
        now: Instant,
        /// The seqs of each request, in the order sent.
        requests: Vec<Vec<u64>>,
        /// Accepted seqs, in the order accepted.
        accepted: Vec<u64>,
        /// Seqs given up, with the reason and when.
        dead: Vec<(u64, String, Instant)>,
    }

    impl Sim {
        fn new(limits: RetryLimits) -> Self {
            let now = Instant::now();
            Self {
                backlog: Backlog::new(1, limits),
                start: now,
                now,
                requests: Vec::new(),
                accepted: Vec::new(),
                dead: Vec::new(),
            }
        }

        fn push(&mut self, seq: u64, key: &str) {
            self.backlog.push(record(seq, key));
        }

        /// Sends one request, or waits for the next key in backoff; false
        /// when the backlog is empty.
        fn step(&mut self, kinesis: &mut impl FnMut(&[SpoolRecord]) -> Reply) -> bool {
            let batch = self.backlog.next_batch(self.now, plain());
            if batch.records.is_empty() {
                let Some(at) = self.backlog.next_retry() else {
                    return false;
                };
                self.now = self.now.max(at);
                return true;
            }
            self.requests.push(seqs(&batch));
            let reply = kinesis(&batch.records);
            let verdicts = match &reply {
                Reply::Entries(entries) => {
                    assert_eq!(entries.len(), batch.records.len());
                    self.backlog
                        .settle(&batch.records, Answer::Entries(entries), self.now)
                }
                Reply::Request(failure) => {
                    self.backlog
                        .settle(&batch.records, Answer::Request(failure), self.now)
                }
            };
            let mut done = Vec::new();
            for (record, verdict) in batch.records.iter().zip(verdicts) {
                done.push(verdict != Verdict::Retry);
                match verdict {
                    Verdict::Accepted => self.accepted.push(record.seq),
                    Verdict::DeadLetter(reason) => self.dead.push((record.seq, reason, self.now)),
                    Verdict::Retry => {}
                }
            }
            self.backlog
                .complete(&batch.records, &done, self.now, |failures| {
                    let exponent = failures.clamp(1, 8) - 1;
                    Duration::from_millis(100 << exponent).min(Duration::from_secs(10))
                });
            self.now += Duration::from_millis(10);
            true
        }

        /// The requests that carried `seq`, by their number of records.
        fn sizes_with(&self, seq: u64) -> Vec<usize> {
            self.requests
                .iter()
                .filter(|r| r.contains(&seq))
                .map(Vec::len)
                .collect()
        }

        fn times_accepted(&self, seq: u64) -> usize {
            self.accepted.iter().filter(|s| **s == seq).count()
        }
    }

    #[test]
    fn a_poison_record_among_500_is_isolated_by_halving_and_given_up_while_the_rest_go() {
        let mut sim = Sim::new(LIMITS);
        const POISON: u64 = 123;
        for seq in 0..500 {
            sim.push(seq, &format!("k{seq:03}"));
        }
        // The poison record's key has more records behind it.
        sim.push(1000, "k123");
        sim.push(1001, "k123");
        let mut kinesis = |records: &[SpoolRecord]| {
            if records.iter().any(|r| r.seq == POISON) {
                Reply::Request(server_error())
            } else {
                all_accepted(records)
            }
        };
        // Other devices keep sending meanwhile.
        let mut traffic = 10_000;
        while sim.dead.is_empty() {
            assert!(sim.step(&mut kinesis), "the backlog ran dry first");
            assert!(sim.requests.len() < 50_000, "never given up");
            sim.push(traffic, &format!("t{}", traffic % 10));
            traffic += 1;
        }
        let sizes = sim.sizes_with(POISON);
        let crowded = sizes.iter().take_while(|n| **n > 1).count();
        assert_eq!(sizes[0], 500, "{sizes:?}");
        assert!(
            crowded <= 9,
            "alone only after {crowded} requests: {sizes:?}"
        );
        assert!(sizes[crowded..].iter().all(|n| *n == 1), "{sizes:?}");
        assert_eq!(
            sizes.len() - crowded,
            20,
            "failures alone count (others went through in between); in a crowd they do not"
        );
        let (seq, reason, _) = &sim.dead[0];
        assert_eq!(*seq, POISON);
        assert_eq!(
            reason,
            "Kinesis failed this record 20 times in a row (InternalFailure: boom) while other \
             records went through; kept as a dead letter so the records after it can go"
        );
        for seq in (0..500).filter(|s| *s != POISON) {
            assert_eq!(sim.times_accepted(seq), 1, "record {seq}");
            let failed = sim.sizes_with(seq).len() - 1;
            assert!(
                failed <= 9,
                "record {seq} failed {failed} times beside the poison"
            );
        }
        while sim.step(&mut all_accepted) {}
        assert_eq!(sim.dead.len(), 1);
        let after: Vec<u64> = sim
            .accepted
            .iter()
            .copied()
            .filter(|s| *s == 1000 || *s == 1001)
            .collect();
        assert_eq!(after, [1000, 1001], "the key moves on, in order");
        assert!(sim.backlog.is_empty());
        assert!(sim.backlog.tracks.is_empty(), "nothing tracked once gone");
    }

    #[test]
    fn an_outage_never_gives_up_a_record() {
        // The most eager limits: 2 failures, 1 s.
        let limits = RetryLimits {
            max_attempts: 2,
            max_failing: Duration::from_secs(1),
        };
        let mut sim = Sim::new(limits);
        for seq in 0..150 {
            sim.push(seq, &format!("k{}", seq % 50));
        }
        let outage = [
            Failure::new(FailureKind::Server, "InternalFailure: down"),
            Failure::new(FailureKind::Server, "ServiceUnavailable: 503"),
            Failure::new(
                FailureKind::Unreachable,
                "dispatch failure: connection refused",
            ),
            Failure::new(FailureKind::Unreachable, "timeout"),
        ];
        let mut answers = 0usize;
        let mut kinesis = |records: &[SpoolRecord]| {
            answers += 1;
            match answers % 5 {
                // Or a 200 answer in which every entry failed.
                4 => Reply::Entries(vec![Some(server_error()); records.len()]),
                n => Reply::Request(outage[n].clone()),
            }
        };
        while sim.now < sim.start + Duration::from_secs(3 * 3600) {
            assert!(sim.step(&mut kinesis));
        }
        assert!(
            sim.requests.len() > 1_000,
            "{} requests",
            sim.requests.len()
        );
        let attempts = sim.sizes_with(0).len();
        assert!(attempts > 100, "record 0 was sent {attempts} times");
        assert!(sim.dead.is_empty(), "{:?}", sim.dead);
        assert!(sim.accepted.is_empty());

        // Kinesis is back: everything goes, each key in order, and caps
        // lowered during the outage come back with the first success.
        let before = sim.requests.len();
        while sim.step(&mut all_accepted) {}
        assert!(sim.dead.is_empty());
        assert_eq!(sim.accepted.len(), 150);
        for key in 0..50 {
            let order: Vec<u64> = sim
                .accepted
                .iter()
                .copied()
                .filter(|s| s % 50 == key)
                .collect();
            assert_eq!(order, [key, key + 50, key + 100]);
        }
        let after = sim.requests.len() - before;
        assert!(
            after < 75,
            "{after} requests to drain 150 records of 50 keys"
        );
    }

    #[test]
    fn throttling_and_stream_errors_never_count() {
        let limits = RetryLimits {
            max_attempts: 2,
            max_failing: Duration::from_secs(1),
        };
        for failure in [
            Failure::new(
                FailureKind::Throttled,
                "ProvisionedThroughputExceededException: x",
            ),
            Failure::new(FailureKind::Throttled, "KMSThrottlingException: x"),
            Failure::new(FailureKind::Stream, "KMSDisabledException: x"),
        ] {
            let mut sim = Sim::new(limits);
            sim.push(1, "stuck");
            let mut traffic = 100;
            let mut kinesis = |records: &[SpoolRecord]| {
                Reply::Entries(
                    records
                        .iter()
                        .map(|r| (r.seq == 1).then(|| failure.clone()))
                        .collect(),
                )
            };
            while sim.now < sim.start + Duration::from_secs(3600) {
                assert!(sim.step(&mut kinesis));
                sim.push(traffic, &format!("t{}", traffic % 3));
                traffic += 1;
            }
            assert!(sim.sizes_with(1).len() > 300, "{failure:?}");
            assert!(sim.dead.is_empty(), "{failure:?}: {:?}", sim.dead);
            while sim.step(&mut all_accepted) {}
            assert_eq!(sim.times_accepted(1), 1);
        }
        // Nor does a whole request throttled or failing for the stream.
        for failure in [
            Failure::new(FailureKind::Throttled, "LimitExceededException: x"),
            Failure::new(FailureKind::Stream, "ResourceNotFoundException: x"),
        ] {
            let mut sim = Sim::new(limits);
            sim.push(1, "stuck");
            let mut kinesis = |records: &[SpoolRecord]| {
                if records.iter().any(|r| r.seq == 1) {
                    Reply::Request(failure.clone())
                } else {
                    all_accepted(records)
                }
            };
            for traffic in 100..2_000 {
                assert!(sim.step(&mut kinesis));
                sim.push(traffic, &format!("t{}", traffic % 3));
            }
            assert!(sim.dead.is_empty(), "{failure:?}: {:?}", sim.dead);
        }
    }

    #[test]
    fn a_record_level_error_counts_only_when_others_go_through() {
        let mut sim = Sim::new(LIMITS);
        sim.push(1, "odd");
        let mut kinesis = |records: &[SpoolRecord]| {
            Reply::Entries(
                records
                    .iter()
                    .map(|r| (r.seq == 1).then(server_error))
                    .collect(),
            )
        };
        // Alone in the backlog, nothing else goes through: it never counts.
        while sim.now < sim.start + Duration::from_secs(3600) {
            assert!(sim.step(&mut kinesis));
        }
        let alone = sim.sizes_with(1).len();
        assert!(alone > 300, "{alone} attempts");
        assert!(sim.dead.is_empty());
        // With other records accepted beside it, each failure counts.
        let mut traffic = 100;
        while sim.dead.is_empty() {
            sim.push(traffic, &format!("t{}", traffic % 3));
            traffic += 1;
            assert!(sim.step(&mut kinesis));
        }
        // The first answer beside others shows the stream healthy (its own
        // failure, 1 of 2, is no evidence); each failure after it counts.
        assert_eq!(sim.sizes_with(1).len() - alone, 21);
        assert!(
            sim.dead[0]
                .1
                .starts_with("Kinesis failed this record 20 times in a row")
        );
    }

    #[test]
    fn a_record_failing_for_max_failing_secs_is_given_up() {
        let limits = RetryLimits {
            max_attempts: 1_000,
            max_failing: Duration::from_secs(300),
        };
        let mut sim = Sim::new(limits);
        sim.push(1, "odd");
        let mut first_failure = None;
        let mut traffic = 100;
        while sim.dead.is_empty() {
            let now = sim.now;
            let mut kinesis = |records: &[SpoolRecord]| {
                Reply::Entries(
                    records
                        .iter()
                        .map(|r| {
                            (r.seq == 1).then(|| {
                                first_failure.get_or_insert(now);
                                server_error()
                            })
                        })
                        .collect(),
                )
            };
            assert!(sim.step(&mut kinesis));
            sim.push(traffic, &format!("t{}", traffic % 3));
            traffic += 1;
        }
        let (seq, reason, at) = &sim.dead[0];
        assert_eq!(*seq, 1);
        let failing = *at - first_failure.expect("it failed");
        assert!(
            failing >= limits.max_failing && failing < limits.max_failing + Duration::from_secs(11),
            "given up after {failing:?}"
        );
        assert!(
            reason.starts_with("Kinesis kept failing this record for 30")
                && reason.contains("(InternalFailure: boom)"),
            "{reason}"
        );
        assert!(sim.sizes_with(1).len() < 100);
    }

    #[test]
    fn after_a_dead_letter_the_key_moves_on_in_order_with_its_full_cap() {
        let limits = RetryLimits {
            max_attempts: 3,
            max_failing: Duration::from_secs(300),
        };
        let mut sim = Sim::new(limits);
        for (seq, key) in [(1, "a"), (2, "a"), (3, "a"), (10, "b")] {
            sim.push(seq, key);
        }
        let mut kinesis = |records: &[SpoolRecord]| {
            if records.iter().any(|r| r.seq == 1) {
                Reply::Request(server_error())
            } else {
                all_accepted(records)
            }
        };
        let mut traffic = 100;
        while sim.dead.is_empty() {
            assert!(sim.step(&mut kinesis));
            sim.push(traffic, "b");
            sim.push(traffic + 1, "c");
            traffic += 2;
        }
        assert_eq!(sim.dead[0].0, 1);
        assert_eq!(
            sim.sizes_with(1),
            [2, 1, 1, 1],
            "halved once, then 3 counted"
        );
        let mut kinesis = all_accepted;
        while sim.step(&mut kinesis) {}
        let a: Vec<u64> = sim.accepted.iter().copied().filter(|s| *s < 10).collect();
        assert_eq!(a, [2, 3]);
        assert!(
            sim.sizes_with(2)[0] > 1,
            "the next record goes with others: {:?}",
            sim.sizes_with(2)
        );
    }

    #[test]
    fn a_server_error_halves_the_keys_caps_and_a_success_restores_them() {
        let mut backlog = Backlog::new(1, LIMITS);
        for (seq, key) in [(1, "a"), (2, "b"), (3, "c"), (4, "d"), (5, "e")] {
            backlog.push(record(seq, key));
        }
        let now = Instant::now();
        let batch = backlog.next_batch(now, plain());
        assert_eq!(seqs(&batch), [1, 2, 3, 4, 5]);
        let verdicts = backlog.settle(&batch.records, Answer::Request(&server_error()), now);
        assert_eq!(verdicts, vec![Verdict::Retry; 5]);
        backlog.complete(&batch.records, &[false; 5], now, |_| Duration::ZERO);
        // Caps of 3: the requests are halves (or less) of the failed one.
        let first = backlog.next_batch(now, plain());
        assert_eq!(seqs(&first), [1, 2, 3]);
        let second = backlog.next_batch(now, plain());
        assert_eq!(seqs(&second), [4, 5]);
        // A fresh key joins a capped request, within the cap.
        backlog.push(record(6, "f"));
        backlog.push(record(7, "a"));
        let entries = [None, None, None];
        backlog.settle(&first.records, Answer::Entries(&entries), now);
        backlog.complete(&first.records, &[true; 3], now, |_| Duration::ZERO);
        backlog.settle(&second.records, Answer::Request(&server_error()), now);
        backlog.complete(&second.records, &[false; 2], now, |_| Duration::ZERO);
        // f (full), a (full again after its success), then d and e alone.
        let third = backlog.next_batch(now, plain());
        assert_eq!(seqs(&third), [6, 7]);
        assert_eq!(seqs(&backlog.next_batch(now, plain())), [4]);
        assert_eq!(seqs(&backlog.next_batch(now, plain())), [5]);
    }

    #[test]
    fn a_refused_request_sends_its_records_alone_and_the_refused_one_is_a_dead_letter() {
        let mut backlog = Backlog::new(1, LIMITS);
        for (seq, key) in [(1, "a"), (2, "b"), (3, "c")] {
            backlog.push(record(seq, key));
        }
        let now = Instant::now();
        let refused = Failure::new(FailureKind::Refused, "InvalidArgumentException: bad");
        let batch = backlog.next_batch(now, plain());
        let verdicts = backlog.settle(&batch.records, Answer::Request(&refused), now);
        assert_eq!(verdicts, vec![Verdict::Retry; 3]);
        backlog.complete(&batch.records, &[false; 3], now, |_| Duration::ZERO);
        for expected in [1, 2, 3] {
            let solo = backlog.next_batch(now, plain());
            assert_eq!(seqs(&solo), [expected]);
            let verdict = if expected == 2 {
                let verdicts = backlog.settle(&solo.records, Answer::Request(&refused), now);
                assert_eq!(
                    verdicts,
                    [Verdict::DeadLetter(
                        "Kinesis refused the record: InvalidArgumentException: bad".into()
                    )]
                );
                true
            } else {
                let verdicts = backlog.settle(&solo.records, Answer::Entries(&[None]), now);
                verdicts == [Verdict::Accepted]
            };
            backlog.complete(&solo.records, &[verdict], now, |_| Duration::ZERO);
        }
        assert!(backlog.is_empty());
    }
}
