//! The sink's backlog: spooled records queued per partition key, so that a
//! key's records reach Kinesis in order while different keys go in parallel.
//!
//! A PutRecords request carries at most one record per key (by default):
//! Kinesis may fail one record of a request and accept the next, so two
//! records of one key in one request could land out of order. A key whose
//! record failed waits out its own backoff while other keys go on; its
//! failed record stays at its head and is sent again before anything newer.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::spool::SpoolRecord;

/// Most records one PutRecords request may carry.
pub const MAX_RECORDS_PER_REQUEST: usize = 500;
/// Most bytes one PutRecords request may carry, data plus partition keys.
pub const MAX_BYTES_PER_REQUEST: usize = 5 * 1024 * 1024;

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
    /// Sent alone, one record per request, to find a record Kinesis refuses.
    solo: bool,
}

/// The next request's records, or how long until one can be made.
#[derive(Debug, Default)]
pub struct Batch {
    /// Records to send, at most `max_per_key` per key, in key order.
    pub records: Vec<SpoolRecord>,
    /// When records were held back by pacing: the shortest wait.
    pub paced_for: Option<Duration>,
}

/// Records waiting to be sent, per partition key.
#[derive(Debug)]
pub struct Backlog {
    keys: HashMap<Arc<str>, KeyQueue>,
    ready: VecDeque<Arc<str>>,
    waiting: BinaryHeap<Reverse<(Instant, Arc<str>)>>,
    max_per_key: usize,
    records: usize,
    memory: usize,
    memory_budget: usize,
}

impl Backlog {
    /// An empty backlog sending up to `max_per_key` records of a key per
    /// request and holding at most `memory_budget` bytes of data in memory
    /// (the rest is read back from the spool when sent).
    pub fn new(max_per_key: usize, memory_budget: usize) -> Self {
        Self {
            keys: HashMap::new(),
            ready: VecDeque::new(),
            waiting: BinaryHeap::new(),
            max_per_key: max_per_key.max(1),
            records: 0,
            memory: 0,
            memory_budget,
        }
    }

    /// Records waiting, in flight included.
    pub fn len(&self) -> usize {
        self.records
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Queues a record behind the earlier ones of its key.
    pub fn push(&mut self, mut record: SpoolRecord) {
        if let Some(data) = &record.data {
            if self.memory + data.len() > self.memory_budget {
                record.data = None;
            } else {
                self.memory += data.len();
            }
        }
        self.records += 1;
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
                        solo: false,
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
    /// each, within the request limits and as `admit` allows (it paces
    /// shards: `Err(wait)` holds a record back).
    pub fn next_batch(
        &mut self,
        now: Instant,
        mut admit: impl FnMut(&SpoolRecord) -> Result<(), Duration>,
    ) -> Batch {
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
        let mut batch = Batch::default();
        let mut bytes = 0;
        for _ in 0..self.ready.len() {
            if batch.records.len() == MAX_RECORDS_PER_REQUEST {
                break;
            }
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            let Some(queue) = self.keys.get_mut(&key) else {
                continue;
            };
            if queue.solo && !batch.records.is_empty() {
                self.ready.push_back(key);
                continue;
            }
            let limit = if queue.solo { 1 } else { self.max_per_key };
            let mut taken = 0;
            for record in queue.records.iter().take(limit) {
                if batch.records.len() == MAX_RECORDS_PER_REQUEST
                    || bytes + record.size > MAX_BYTES_PER_REQUEST
                {
                    break;
                }
                if let Err(wait) = admit(record) {
                    batch.paced_for = Some(batch.paced_for.map_or(wait, |w| w.min(wait)));
                    break;
                }
                bytes += record.size;
                batch.records.push(record.clone());
                taken += 1;
            }
            if taken == 0 {
                self.ready.push_back(key);
                continue;
            }
            queue.state = KeyState::InFlight;
            if queue.solo {
                break;
            }
        }
        batch
    }

    /// Settles a sent batch: `done[i]` says whether `records[i]` left the
    /// backlog (accepted, or kept as a dead letter). A key with a record
    /// not done waits `backoff(failures)` before it goes again.
    pub fn complete(
        &mut self,
        records: &[SpoolRecord],
        done: &[bool],
        now: Instant,
        backoff: impl Fn(u32) -> Duration,
    ) {
        let mut failed_keys: HashSet<&Arc<str>> = HashSet::new();
        let mut keys: Vec<&Arc<str>> = Vec::new();
        let mut seen: HashSet<&Arc<str>> = HashSet::new();
        for (record, done) in records.iter().zip(done) {
            let key = &record.partition_key;
            if seen.insert(key) {
                keys.push(key);
            }
            let Some(queue) = self.keys.get_mut(key) else {
                continue;
            };
            if *done {
                if let Some(position) = queue.records.iter().position(|r| r.seq == record.seq)
                    && let Some(removed) = queue.records.remove(position)
                {
                    self.records -= 1;
                    if let Some(data) = &removed.data {
                        self.memory -= data.len();
                    }
                }
            } else {
                failed_keys.insert(key);
            }
        }
        for key in keys {
            let Some(queue) = self.keys.get_mut(key) else {
                continue;
            };
            if queue.state != KeyState::InFlight {
                continue;
            }
            let failed = failed_keys.contains(&key);
            if failed {
                queue.failures = queue.failures.saturating_add(1);
                queue.state = KeyState::Waiting;
                let at = now + backoff(queue.failures);
                self.waiting.push(Reverse((at, key.clone())));
            } else {
                queue.failures = 0;
                queue.solo = false;
                if queue.records.is_empty() {
                    self.keys.remove(key);
                } else {
                    queue.state = KeyState::Ready;
                    self.ready.push_back(key.clone());
                }
            }
        }
    }

    /// Marks the keys of `records` to be sent alone, one record per request
    /// (after Kinesis refused a request, to find the record it refuses).
    pub fn isolate(&mut self, records: &[SpoolRecord]) {
        for record in records {
            if let Some(queue) = self.keys.get_mut(&record.partition_key) {
                queue.solo = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, key: &str) -> SpoolRecord {
        SpoolRecord {
            seq,
            partition_key: key.into(),
            explicit_hash_key: None,
            hash_key: 0,
            topic: "/devices/1/event".into(),
            size: 10 + key.len(),
            data: Some(bytes::Bytes::from(vec![0u8; 10])),
        }
    }

    fn seqs(batch: &Batch) -> Vec<u64> {
        batch.records.iter().map(|r| r.seq).collect()
    }

    fn no_pacing(_: &SpoolRecord) -> Result<(), Duration> {
        Ok(())
    }

    #[test]
    fn one_record_per_key_per_request_in_order() {
        let mut backlog = Backlog::new(1, usize::MAX);
        for (seq, key) in [(1, "a"), (2, "a"), (3, "b"), (4, "a"), (5, "b")] {
            backlog.push(record(seq, key));
        }
        let now = Instant::now();
        let first = backlog.next_batch(now, no_pacing);
        assert_eq!(seqs(&first), [1, 3]);
        assert!(
            backlog.next_batch(now, no_pacing).records.is_empty(),
            "keys in flight wait for their answer"
        );
        backlog.complete(&first.records, &[true, true], now, |_| Duration::ZERO);
        let second = backlog.next_batch(now, no_pacing);
        assert_eq!(seqs(&second), [2, 5]);
        backlog.complete(&second.records, &[true, true], now, |_| Duration::ZERO);
        assert_eq!(seqs(&backlog.next_batch(now, no_pacing)), [4]);
    }

    #[test]
    fn a_failed_record_is_resent_before_its_key_moves_on_and_others_do_not_wait() {
        let mut backlog = Backlog::new(1, usize::MAX);
        for (seq, key) in [(1, "a"), (2, "a"), (3, "b"), (4, "b")] {
            backlog.push(record(seq, key));
        }
        let now = Instant::now();
        let first = backlog.next_batch(now, no_pacing);
        backlog.complete(&first.records, &[false, true], now, |n| {
            Duration::from_millis(100 * u64::from(n))
        });
        assert_eq!(seqs(&backlog.next_batch(now, no_pacing)), [4], "b goes on");
        assert_eq!(backlog.next_retry(), Some(now + Duration::from_millis(100)));
        let later = now + Duration::from_millis(100);
        assert_eq!(
            seqs(&backlog.next_batch(later, no_pacing)),
            [1],
            "a's head again"
        );
        assert_eq!(backlog.len(), 3);
    }

    #[test]
    fn several_records_per_key_when_allowed_and_partial_success_keeps_the_rest() {
        let mut backlog = Backlog::new(3, usize::MAX);
        for seq in 1..=5 {
            backlog.push(record(seq, "a"));
        }
        let now = Instant::now();
        let batch = backlog.next_batch(now, no_pacing);
        assert_eq!(seqs(&batch), [1, 2, 3]);
        backlog.complete(&batch.records, &[true, false, true], now, |_| {
            Duration::ZERO
        });
        assert_eq!(seqs(&backlog.next_batch(now, no_pacing)), [2, 4, 5]);
    }

    #[test]
    fn pacing_holds_records_back_and_reports_the_wait() {
        let mut backlog = Backlog::new(1, usize::MAX);
        backlog.push(record(1, "a"));
        backlog.push(record(2, "b"));
        let now = Instant::now();
        let batch = backlog.next_batch(now, |r| {
            if &*r.partition_key == "a" {
                Err(Duration::from_millis(30))
            } else {
                Ok(())
            }
        });
        assert_eq!(seqs(&batch), [2]);
        assert_eq!(batch.paced_for, Some(Duration::from_millis(30)));
        assert_eq!(seqs(&backlog.next_batch(now, no_pacing)), [1]);
    }

    #[test]
    fn requests_stay_within_kinesis_limits() {
        let mut backlog = Backlog::new(1, usize::MAX);
        for seq in 0..1201 {
            backlog.push(record(seq, &format!("k{seq}")));
        }
        let now = Instant::now();
        let sizes: Vec<usize> = (0..3)
            .map(|_| backlog.next_batch(now, no_pacing).records.len())
            .collect();
        assert_eq!(sizes, [500, 500, 201]);

        let mut backlog = Backlog::new(1, usize::MAX);
        for seq in 0..6 {
            let mut big = record(seq, &format!("k{seq}"));
            big.size = 1024 * 1024;
            backlog.push(big);
        }
        assert_eq!(backlog.next_batch(now, no_pacing).records.len(), 5, "5 MiB");
    }

    #[test]
    fn isolated_keys_go_alone() {
        let mut backlog = Backlog::new(1, usize::MAX);
        for (seq, key) in [(1, "a"), (2, "b"), (3, "c")] {
            backlog.push(record(seq, key));
        }
        let now = Instant::now();
        let batch = backlog.next_batch(now, no_pacing);
        backlog.isolate(&batch.records);
        backlog.complete(&batch.records, &[false, false, false], now, |_| {
            Duration::ZERO
        });
        for expected in [1, 2, 3] {
            let solo = backlog.next_batch(now, no_pacing);
            assert_eq!(seqs(&solo), [expected]);
            backlog.complete(&solo.records, &[true], now, |_| Duration::ZERO);
        }
        assert!(backlog.is_empty());
    }

    #[test]
    fn data_beyond_the_memory_budget_is_left_on_disk() {
        let mut backlog = Backlog::new(1, 15);
        backlog.push(record(1, "a"));
        backlog.push(record(2, "b"));
        let batch = backlog.next_batch(Instant::now(), no_pacing);
        assert!(batch.records[0].data.is_some());
        assert!(batch.records[1].data.is_none());
    }
}
