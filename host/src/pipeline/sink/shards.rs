//! Per-shard rate limiting for the Kinesis sink, in the manner of the KPL.
//!
//! Kinesis routes a record to the shard whose hash-key range holds the MD5
//! digest of its partition key (or its explicit hash key, when it has one). A
//! shard takes 1 MiB/s and 1000 records/s of writes and throttles whatever is
//! beyond. ksm works out each record's shard itself and paces every shard
//! under those limits, so that throttling is rare.

use std::time::{Duration, Instant};

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::operation::list_shards;
use aws_sdk_kinesis::types;

/// One open shard and the hash keys it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// Shard ID, such as `shardId-000000000000`.
    pub id: String,
    /// Lowest hash key the shard takes.
    pub start: u128,
    /// Highest hash key the shard takes (inclusive).
    pub end: u128,
}

/// The open shards of a stream, sorted by the start of their hash-key range.
#[derive(Debug, Clone, Default)]
pub struct ShardMap {
    shards: Vec<Shard>,
}

impl ShardMap {
    /// A map of `shards`, in any order.
    pub fn new(mut shards: Vec<Shard>) -> ShardMap {
        shards.sort_by_key(|shard| shard.start);
        ShardMap { shards }
    }

    /// Index of the shard whose range holds `hash`, or `None` if none does.
    pub fn shard_of(&self, hash: u128) -> Option<usize> {
        let starting_at_or_before = self.shards.partition_point(|shard| shard.start <= hash);
        let index = starting_at_or_before.checked_sub(1)?;
        (hash <= self.shards[index].end).then_some(index)
    }

    /// ID of the shard at `index`.
    ///
    /// # Panics
    /// If `index` is not below [`ShardMap::len`].
    pub fn id(&self, index: usize) -> &str {
        &self.shards[index].id
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        self.shards.len()
    }
}

/// Why the shards of a stream could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum ListShardsError {
    /// The ListShards call failed.
    #[error("{code}: {message}")]
    Api {
        /// Kinesis error code, or `Unknown` if the failure had none.
        code: String,
        /// What went wrong.
        message: String,
    },
    /// Kinesis described a shard's hash-key range in a way ksm cannot read.
    #[error("shard {shard} has a bad hash-key range: {detail}")]
    BadRange {
        /// Shard ID.
        shard: String,
        /// What is wrong with the range.
        detail: String,
    },
}

/// The open shards of `stream`, from ListShards (all pages of it).
pub async fn list_open_shards(client: &Client, stream: &str) -> Result<ShardMap, ListShardsError> {
    let mut shards = Vec::new();
    let mut next_token: Option<String> = None;
    loop {
        // The API refuses the stream name alongside a next token.
        let request = match next_token.take() {
            Some(token) => client.list_shards().next_token(token),
            None => client.list_shards().stream_name(stream),
        };
        let page = request.send().await.map_err(api_error)?;
        for shard in page.shards() {
            if let Some(open) = open_shard(shard)? {
                shards.push(open);
            }
        }
        match page.next_token() {
            Some(token) => next_token = Some(token.to_owned()),
            None => return Ok(ShardMap::new(shards)),
        }
    }
}

fn api_error<R: std::fmt::Debug>(
    error: SdkError<list_shards::ListShardsError, R>,
) -> ListShardsError {
    match error.code() {
        Some(code) => ListShardsError::Api {
            code: code.to_owned(),
            message: error.message().unwrap_or_default().to_owned(),
        },
        None => ListShardsError::Api {
            code: "Unknown".to_owned(),
            message: DisplayErrorContext(&error).to_string(),
        },
    }
}

/// `shard` with its hash-key range read, or `None` if it is closed (its
/// sequence-number range has an end).
fn open_shard(shard: &types::Shard) -> Result<Option<Shard>, ListShardsError> {
    let closed = shard
        .sequence_number_range()
        .is_some_and(|range| range.ending_sequence_number().is_some());
    if closed {
        return Ok(None);
    }
    let bad_range = |detail: String| ListShardsError::BadRange {
        shard: shard.shard_id().to_owned(),
        detail,
    };
    let range = shard
        .hash_key_range()
        .ok_or_else(|| bad_range("missing".to_owned()))?;
    let parse = |key: &str| {
        key.parse::<u128>()
            .map_err(|error| bad_range(format!("{key:?}: {error}")))
    };
    let start = parse(range.starting_hash_key())?;
    let end = parse(range.ending_hash_key())?;
    if start > end {
        return Err(bad_range(format!("starts at {start}, after its end {end}")));
    }
    Ok(Some(Shard {
        id: shard.shard_id().to_owned(),
        start,
        end,
    }))
}

/// Slack for floating-point error when comparing token counts.
const TOKEN_TOLERANCE: f64 = 1e-6;

/// A token bucket that holds one second's worth of tokens and refills at that
/// rate.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    capacity: f64,
}

impl Bucket {
    fn full(capacity: f64) -> Bucket {
        Bucket {
            tokens: capacity,
            capacity,
        }
    }

    /// The bucket once `elapsed` more time has passed.
    fn after(self, elapsed: Duration) -> Bucket {
        let tokens = self.tokens + self.capacity * elapsed.as_secs_f64();
        Bucket {
            tokens: tokens.min(self.capacity),
            ..self
        }
    }

    /// Tokens that must be present to take `amount`: never more than the
    /// bucket holds, so an oversized take goes through once it is full.
    fn needed(&self, amount: f64) -> f64 {
        amount.min(self.capacity)
    }

    fn can_take(&self, amount: f64) -> bool {
        self.tokens + TOKEN_TOLERANCE >= self.needed(amount)
    }

    /// Takes `amount`, all of it, so an oversized take leaves a debt that
    /// keeps the average rate within the limit.
    fn take(&mut self, amount: f64) {
        self.tokens -= amount;
    }

    fn wait_time(&self, amount: f64) -> Duration {
        let deficit = self.needed(amount) - self.tokens;
        if deficit <= TOKEN_TOLERANCE {
            return Duration::ZERO;
        }
        // Rounded up, so that the tokens are there once the wait is over.
        Duration::from_nanos((deficit * 1e9 / self.capacity).ceil() as u64)
    }
}

/// One shard's buckets.
#[derive(Debug, Clone, Copy)]
struct ShardBuckets {
    records: Bucket,
    bytes: Bucket,
    /// When the buckets were last brought up to date; `None` while untouched
    /// (and so still full).
    refilled_at: Option<Instant>,
}

impl ShardBuckets {
    /// The buckets as they stand at `now`.
    fn at(&self, now: Instant) -> ShardBuckets {
        let Some(refilled_at) = self.refilled_at else {
            return ShardBuckets {
                refilled_at: Some(now),
                ..*self
            };
        };
        let elapsed = now.saturating_duration_since(refilled_at);
        ShardBuckets {
            records: self.records.after(elapsed),
            bytes: self.bytes.after(elapsed),
            refilled_at: Some(refilled_at.max(now)),
        }
    }
}

/// Paces writes to each shard with two token buckets, one for records and
/// one for bytes, each holding one second's worth and starting full.
#[derive(Debug, Clone)]
pub struct ShardPacer {
    shards: Vec<ShardBuckets>,
}

impl ShardPacer {
    /// A pacer for `shards` shards (indices as in a [`ShardMap`]), each
    /// allowed `records_per_sec` records and `bytes_per_sec` bytes a second.
    pub fn new(shards: usize, records_per_sec: u32, bytes_per_sec: u64) -> Self {
        let buckets = ShardBuckets {
            records: Bucket::full(f64::from(records_per_sec)),
            bytes: Bucket::full(bytes_per_sec as f64),
            refilled_at: None,
        };
        ShardPacer {
            shards: vec![buckets; shards],
        }
    }

    /// Takes `records` records of `bytes` bytes in all from `shard`'s
    /// allowance if it suffices at `now`, and says whether it did (an
    /// aggregate is one record; bytes joining an aggregate are no record).
    /// A take larger than the whole byte allowance goes through once the
    /// byte bucket is full.
    ///
    /// # Panics
    /// If `shard` is not below the number of shards.
    pub fn try_take(&mut self, shard: usize, records: u32, bytes: usize, now: Instant) -> bool {
        let buckets = &mut self.shards[shard];
        *buckets = buckets.at(now);
        let (records, bytes) = (f64::from(records), bytes as f64);
        if !(buckets.records.can_take(records) && buckets.bytes.can_take(bytes)) {
            return false;
        }
        buckets.records.take(records);
        buckets.bytes.take(bytes);
        true
    }

    /// How long after `now` [`ShardPacer::try_take`] would take `records`
    /// records of `bytes` bytes from `shard`; zero if it would now.
    ///
    /// # Panics
    /// If `shard` is not below the number of shards.
    pub fn wait_time(&self, shard: usize, records: u32, bytes: usize, now: Instant) -> Duration {
        let buckets = self.shards[shard].at(now);
        let records_wait = buckets.records.wait_time(f64::from(records));
        let bytes_wait = buckets.bytes.wait_time(bytes as f64);
        records_wait.max(bytes_wait)
    }

    /// Records that Kinesis found `shard` over its limit at `now`: empties
    /// both its buckets, so it waits about a refill before taking more.
    ///
    /// # Panics
    /// If `shard` is not below the number of shards.
    pub fn throttled(&mut self, shard: usize, now: Instant) {
        let buckets = &mut self.shards[shard];
        *buckets = buckets.at(now);
        for bucket in [&mut buckets.records, &mut buckets.bytes] {
            bucket.tokens = bucket.tokens.min(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    fn shard(id: &str, start: u128, end: u128) -> Shard {
        Shard {
            id: id.to_owned(),
            start,
            end,
        }
    }

    #[test]
    fn shard_map_finds_the_shard_holding_a_hash() {
        let half = u128::MAX / 2;
        let map = ShardMap::new(vec![shard("b", half + 1, u128::MAX), shard("a", 0, half)]);
        assert_eq!(map.len(), 2);
        assert_ne!(map.len(), 0);
        let id_of = |hash| map.shard_of(hash).map(|index| map.id(index));
        assert_eq!(id_of(0), Some("a"));
        assert_eq!(id_of(half), Some("a"));
        assert_eq!(id_of(half + 1), Some("b"));
        assert_eq!(id_of(u128::MAX), Some("b"));
    }

    #[test]
    fn shard_map_reports_gaps() {
        let map = ShardMap::new(vec![shard("a", 10, 19), shard("b", 30, 39)]);
        assert_eq!(map.shard_of(9), None);
        assert_eq!(map.shard_of(10), Some(0));
        assert_eq!(map.shard_of(20), None);
        assert_eq!(map.shard_of(39), Some(1));
        assert_eq!(map.shard_of(40), None);
        assert_eq!(ShardMap::new(Vec::new()).shard_of(0), None);
        assert_eq!(ShardMap::new(Vec::new()).len(), 0);
    }

    fn sdk_shard(start: &str, end: &str, ending_sequence_number: Option<&str>) -> types::Shard {
        let hash_key_range = types::HashKeyRange::builder()
            .starting_hash_key(start)
            .ending_hash_key(end)
            .build()
            .expect("hash-key range");
        let sequence_number_range = types::SequenceNumberRange::builder()
            .starting_sequence_number("1")
            .set_ending_sequence_number(ending_sequence_number.map(str::to_owned))
            .build()
            .expect("sequence-number range");
        types::Shard::builder()
            .shard_id("shardId-000000000001")
            .hash_key_range(hash_key_range)
            .sequence_number_range(sequence_number_range)
            .build()
            .expect("shard")
    }

    #[test]
    fn open_shard_reads_the_range_of_open_shards() {
        let open = open_shard(&sdk_shard(
            "0",
            "340282366920938463463374607431768211455",
            None,
        ))
        .expect("readable");
        assert_eq!(open, Some(shard("shardId-000000000001", 0, u128::MAX)));
    }

    #[test]
    fn open_shard_skips_closed_shards() {
        let closed = open_shard(&sdk_shard("0", "10", Some("99"))).expect("readable");
        assert_eq!(closed, None);
    }

    #[test]
    fn open_shard_rejects_bad_ranges() {
        for (start, end) in [("x", "10"), ("0", "-1"), ("10", "9")] {
            let error = open_shard(&sdk_shard(start, end, None)).expect_err("bad range");
            assert!(
                matches!(&error, ListShardsError::BadRange { shard, .. } if shard == "shardId-000000000001"),
                "{error}"
            );
        }
    }

    /// How many records of `bytes` bytes `shard` takes at `now`, up to `limit`.
    fn take_all(pacer: &mut ShardPacer, bytes: usize, now: Instant, limit: usize) -> usize {
        (0..limit)
            .take_while(|_| pacer.try_take(0, 1, bytes, now))
            .count()
    }

    #[test]
    fn records_are_limited_per_second() {
        let mut pacer = ShardPacer::new(1, 1000, MIB as u64);
        let start = Instant::now();
        assert_eq!(take_all(&mut pacer, 10, start, 2000), 1000);
        assert!(!pacer.try_take(0, 1, 10, start));
        let later = start + Duration::from_millis(100);
        assert_eq!(take_all(&mut pacer, 10, later, 2000), 100);
    }

    #[test]
    fn bytes_are_limited_per_second() {
        let mut pacer = ShardPacer::new(1, 1000, 100_000);
        let start = Instant::now();
        assert_eq!(take_all(&mut pacer, 1000, start, 2000), 100);
        assert!(!pacer.try_take(0, 1, 1000, start));
        let later = start + Duration::from_millis(100);
        assert_eq!(take_all(&mut pacer, 1000, later, 2000), 10);
    }

    #[test]
    fn shards_are_paced_apart() {
        let mut pacer = ShardPacer::new(2, 10, MIB as u64);
        let now = Instant::now();
        assert_eq!(take_all(&mut pacer, 1, now, 100), 10);
        assert!(pacer.try_take(1, 1, 1, now));
    }

    #[test]
    fn buckets_hold_at_most_one_second() {
        let mut pacer = ShardPacer::new(1, 1000, MIB as u64);
        let start = Instant::now();
        assert!(pacer.try_take(0, 1, 1, start));
        let much_later = start + Duration::from_secs(60);
        assert_eq!(take_all(&mut pacer, 1, much_later, 5000), 1000);
    }

    #[test]
    fn oversized_record_passes_when_bucket_is_full_and_leaves_a_debt() {
        let mut pacer = ShardPacer::new(1, 1000, 100_000);
        let start = Instant::now();
        assert!(pacer.try_take(0, 1, MIB, start));
        assert!(!pacer.try_take(0, 1, 1, start));
        // The debt is repaid at 100 000 bytes a second.
        let wait = pacer.wait_time(0, 1, MIB, start);
        assert!(wait > Duration::from_secs(10), "{wait:?}");
        assert!(pacer.try_take(0, 1, MIB, start + wait));
    }

    #[test]
    fn bytes_joining_an_aggregate_take_no_record() {
        let mut pacer = ShardPacer::new(1, 2, MIB as u64);
        let now = Instant::now();
        assert!(pacer.try_take(0, 1, 100, now));
        assert!(pacer.try_take(0, 1, 100, now));
        assert!(!pacer.try_take(0, 1, 100, now), "two records a second");
        assert!(pacer.try_take(0, 0, 100, now), "into an aggregate");
        assert_eq!(pacer.wait_time(0, 0, 100, now), Duration::ZERO);
        assert_eq!(pacer.wait_time(0, 1, 100, now), Duration::from_millis(500));
    }

    #[test]
    fn throttled_empties_both_buckets() {
        let mut pacer = ShardPacer::new(1, 1000, MIB as u64);
        let start = Instant::now();
        pacer.throttled(0, start);
        assert!(!pacer.try_take(0, 1, 1, start));
        assert_eq!(pacer.wait_time(0, 1, 0, start), Duration::from_millis(1));
        assert_eq!(pacer.wait_time(0, 1, MIB, start), Duration::from_secs(1));
        let later = start + Duration::from_millis(100);
        assert_eq!(take_all(&mut pacer, 1, later, 2000), 100);
    }

    #[test]
    fn wait_time_is_zero_when_try_take_would_succeed() {
        let mut pacer = ShardPacer::new(1, 1000, MIB as u64);
        let now = Instant::now();
        assert_eq!(pacer.wait_time(0, 1, MIB, now), Duration::ZERO);
        assert!(pacer.try_take(0, 1, MIB, now));
    }

    #[test]
    fn wait_time_is_consistent_with_try_take() {
        let mut pacer = ShardPacer::new(1, 1000, 1_000_000);
        let mut now = Instant::now();
        for bytes in [700, 1, 1000, 333_333, 1_000_000, 5] {
            take_all(&mut pacer, bytes, now, 2000);
            let wait = pacer.wait_time(0, 1, bytes, now);
            assert!(wait > Duration::ZERO, "{bytes} bytes");
            let just_before = now + wait.saturating_sub(Duration::from_micros(1));
            assert!(!pacer.try_take(0, 1, bytes, just_before), "{bytes} bytes");
            now += wait;
            assert_eq!(pacer.wait_time(0, 1, bytes, now), Duration::ZERO);
            assert!(pacer.try_take(0, 1, bytes, now), "{bytes} bytes");
        }
    }
}
