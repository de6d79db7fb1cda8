//! How one request's records become its Kinesis records (the entries of a
//! PutRecords request), within Kinesis' limits and each shard's pacing.
//!
//! Without aggregation each record is an entry of its own. With
//! `aggregation = "kpl"`, records bound for the same shard (by the shard
//! map the sink keeps; by partition key while it has none, or while it is
//! stale) share KPL
//! aggregates of at most `aggregation_max_bytes` and
//! `aggregation_max_records`, in the order they join; a record too big to
//! share one goes alone, as a plain record. All records of a key in one
//! request are in one entry, so they succeed or fail together and a key's
//! order holds in every ordering mode. An aggregate counts as one record
//! against its shard's 1000 records/s, and its bytes against its 1 MiB/s.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::shards::{ShardMap, ShardPacer};
use crate::kinesis::MAX_RECORDS_PER_REQUEST;
use crate::kinesis::aggregate::Aggregate;
use crate::store::spool::SpoolRecord;

/// What a sink may put in one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackLimits {
    /// Most bytes of one request, data plus partition keys.
    pub request_bytes: usize,
    /// Aggregates' limits, when records are aggregated.
    pub aggregation: Option<AggregateLimits>,
}

/// How large an aggregate may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AggregateLimits {
    /// Most bytes, its data plus its partition key.
    pub max_bytes: usize,
    /// Most user records.
    pub max_records: usize,
}

/// What became of a record offered to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// It joined the request.
    Taken,
    /// It does not fit with its key's earlier records; the key's next
    /// records wait for another request.
    KeyDone,
    /// Its shard is at its limit for this long; its key waits.
    Paced(Duration),
    /// The request is full.
    Full,
}

/// One Kinesis record of a request: one record, or an aggregate of several.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// How many of the batch's records it holds, taken in order.
    pub records: usize,
    /// Whether they travel as a KPL aggregate (always when more than one).
    pub aggregated: bool,
    /// The predicted shard, when the map knows it.
    pub shard: Option<usize>,
    /// Its bytes as Kinesis counts them: data plus partition key.
    pub bytes: usize,
}

/// Which records may share an aggregate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Group {
    /// Those bound for one shard.
    Shard(usize),
    /// Those of one partition key, while the shards are not known.
    Key(Arc<str>),
}

/// An entry being filled.
#[derive(Debug)]
struct Filling {
    records: Vec<SpoolRecord>,
    /// Its aggregate's size so far; `None` for a plain record.
    aggregate: Option<Aggregate>,
    shard: Option<usize>,
    bytes: usize,
}

/// A request being packed.
pub struct Packer<'a> {
    limits: PackLimits,
    shards: Option<(&'a ShardMap, &'a mut ShardPacer)>,
    now: Instant,
    entries: Vec<Filling>,
    bytes: usize,
    /// The aggregate each group fills now.
    open: HashMap<Group, usize>,
    /// The entry of the key being offered.
    current: Option<usize>,
    full: bool,
    /// A record's hash key fell outside every known shard.
    unmapped: bool,
    /// Aggregate per partition key even where the shard is known.
    by_key: bool,
}

/// A packed request: its records, entry by entry.
#[derive(Debug, Default)]
pub struct Batch {
    /// The records, each entry's in a run, in key order within it.
    pub records: Vec<SpoolRecord>,
    /// The entries, in order; their `records` add up to `records.len()`.
    pub entries: Vec<Entry>,
    /// When records were held back by pacing: the shortest wait.
    pub paced_for: Option<Duration>,
    /// Whether the request reached a limit (entries or bytes).
    pub full: bool,
    /// Whether a record's shard was not in the map (it is stale).
    pub unmapped: bool,
}

impl<'a> Packer<'a> {
    /// A request within `limits`, paced per shard at `now` when the map
    /// is known.
    pub fn new(
        limits: PackLimits,
        shards: Option<(&'a ShardMap, &'a mut ShardPacer)>,
        now: Instant,
    ) -> Packer<'a> {
        Packer {
            limits,
            shards,
            now,
            entries: Vec::new(),
            bytes: 0,
            open: HashMap::new(),
            current: None,
            full: false,
            unmapped: false,
            by_key: false,
        }
    }

    /// The same request, aggregating per partition key whatever the shard
    /// map says: while the map is stale, records a key shares with no
    /// other land exactly where they belong.
    pub fn by_key(self) -> Packer<'a> {
        Packer {
            by_key: true,
            ..self
        }
    }

    /// Offers the request `record`: the first of its key in this request
    /// (`first_of_key`), or the next one.
    pub fn offer(&mut self, record: &SpoolRecord, first_of_key: bool) -> Offer {
        if first_of_key {
            self.current = None;
        }
        let shard = self.shard_of(record);
        let Some(limits) = self.limits.aggregation else {
            return self.plain(record, shard);
        };
        if !first_of_key {
            return match self.current {
                Some(index) if self.entries[index].aggregate.is_some() => {
                    self.join(index, record, limits)
                }
                _ => Offer::KeyDone,
            };
        }
        let alone = Aggregate::new().bytes_with(
            &record.partition_key,
            record.explicit_hash_key.as_deref(),
            record.data.len(),
        ) + record.partition_key.len();
        if alone > limits.max_bytes {
            return self.plain(record, shard);
        }
        let group = match shard {
            Some(shard) if !self.by_key => Group::Shard(shard),
            _ => Group::Key(record.partition_key.clone()),
        };
        if let Some(&index) = self.open.get(&group) {
            match self.join(index, record, limits) {
                Offer::KeyDone => {}
                offer => return offer,
            }
        }
        let offer = self.start(record, shard, Some(Aggregate::new()), alone);
        if offer == Offer::Taken {
            self.open.insert(group, self.entries.len() - 1);
        }
        offer
    }

    /// What was packed, with the shortest pacing wait met.
    pub fn finish(self, paced_for: Option<Duration>) -> Batch {
        let mut batch = Batch {
            paced_for,
            full: self.full || self.entries.len() >= MAX_RECORDS_PER_REQUEST,
            unmapped: self.unmapped,
            ..Batch::default()
        };
        for entry in self.entries {
            batch.entries.push(Entry {
                records: entry.records.len(),
                aggregated: entry.aggregate.is_some() && entry.records.len() > 1,
                shard: entry.shard,
                bytes: match &entry.aggregate {
                    Some(_) if entry.records.len() == 1 => entry.records[0].size,
                    _ => entry.bytes,
                },
            });
            batch.records.extend(entry.records);
        }
        batch
    }

    fn shard_of(&mut self, record: &SpoolRecord) -> Option<usize> {
        let (map, _) = self.shards.as_ref()?;
        let shard = map.shard_of(record.hash_key);
        self.unmapped |= shard.is_none();
        shard
    }

    /// Makes `record` a plain entry of its own.
    fn plain(&mut self, record: &SpoolRecord, shard: Option<usize>) -> Offer {
        self.start(record, shard, None, record.size)
    }

    /// Starts a new entry with `record`, of `bytes` bytes.
    fn start(
        &mut self,
        record: &SpoolRecord,
        shard: Option<usize>,
        aggregate: Option<Aggregate>,
        bytes: usize,
    ) -> Offer {
        if self.entries.len() >= MAX_RECORDS_PER_REQUEST
            || self.bytes + bytes > self.limits.request_bytes
        {
            self.full = true;
            return Offer::Full;
        }
        if let Err(wait) = self.pace(shard, 1, bytes) {
            return Offer::Paced(wait);
        }
        let mut aggregate = aggregate;
        if let Some(aggregate) = &mut aggregate {
            aggregate.add(
                &record.partition_key,
                record.explicit_hash_key.as_deref(),
                record.data.len(),
            );
        }
        self.bytes += bytes;
        self.entries.push(Filling {
            records: vec![record.clone()],
            aggregate,
            shard,
            bytes,
        });
        self.current = Some(self.entries.len() - 1);
        Offer::Taken
    }

    /// Adds `record` to the aggregate at `index`, if it fits.
    fn join(&mut self, index: usize, record: &SpoolRecord, limits: AggregateLimits) -> Offer {
        let entry = &self.entries[index];
        let Some(aggregate) = &entry.aggregate else {
            return Offer::KeyDone;
        };
        let key = entry.records[0].partition_key.len();
        let bytes = aggregate.bytes_with(
            &record.partition_key,
            record.explicit_hash_key.as_deref(),
            record.data.len(),
        ) + key;
        let growth = bytes - entry.bytes;
        if aggregate.records() >= limits.max_records || bytes > limits.max_bytes {
            return Offer::KeyDone;
        }
        if self.bytes + growth > self.limits.request_bytes {
            self.full = true;
            return Offer::Full;
        }
        if let Err(wait) = self.pace(entry.shard, 0, growth) {
            return Offer::Paced(wait);
        }
        let entry = &mut self.entries[index];
        if let Some(aggregate) = &mut entry.aggregate {
            aggregate.add(
                &record.partition_key,
                record.explicit_hash_key.as_deref(),
                record.data.len(),
            );
        }
        entry.records.push(record.clone());
        entry.bytes = bytes;
        self.bytes += growth;
        self.current = Some(index);
        Offer::Taken
    }

    /// Takes `records` Kinesis records and `bytes` bytes from `shard`'s
    /// allowance, or says how long until it has them.
    fn pace(&mut self, shard: Option<usize>, records: u32, bytes: usize) -> Result<(), Duration> {
        let (Some(shard), Some((_, pacer))) = (shard, self.shards.as_mut()) else {
            return Ok(());
        };
        if pacer.try_take(shard, records, bytes, self.now) {
            Ok(())
        } else {
            Err(pacer.wait_time(shard, records, bytes, self.now))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinesis::MAX_BYTES_PER_REQUEST;
    use crate::pipeline::sink::shards::Shard;

    fn record(seq: u64, key: &str, bytes: usize) -> SpoolRecord {
        let mut record = SpoolRecord::new(
            bytes::Bytes::from(vec![b'x'; bytes]),
            key,
            None,
            "/devices/1/event".into(),
        );
        record.seq = seq;
        record
    }

    fn aggregated(max_bytes: usize, max_records: usize) -> PackLimits {
        PackLimits {
            request_bytes: MAX_BYTES_PER_REQUEST,
            aggregation: Some(AggregateLimits {
                max_bytes,
                max_records,
            }),
        }
    }

    fn one_shard() -> ShardMap {
        ShardMap::new(vec![Shard {
            id: "shardId-000000000000".into(),
            start: 0,
            end: u128::MAX,
        }])
    }

    #[test]
    fn records_of_a_shard_share_aggregates_up_to_their_limits() {
        let map = one_shard();
        let mut pacer = ShardPacer::new(1, 1000, 1 << 20);
        let now = Instant::now();
        let mut packer = Packer::new(aggregated(51_200, 3), Some((&map, &mut pacer)), now);
        for seq in 0..7 {
            assert_eq!(
                packer.offer(&record(seq, &format!("k{seq}"), 100), true),
                Offer::Taken
            );
        }
        let batch = packer.finish(None);
        let sizes: Vec<(usize, bool)> = batch
            .entries
            .iter()
            .map(|e| (e.records, e.aggregated))
            .collect();
        assert_eq!(sizes, [(3, true), (3, true), (1, false)]);
        assert_eq!(batch.entries[0].shard, Some(0));
        // An aggregate's bytes: framing, tables and records, and its key.
        let mut aggregate = Aggregate::new();
        for key in ["k0", "k1", "k2"] {
            aggregate.add(key, None, 100);
        }
        assert_eq!(batch.entries[0].bytes, aggregate.bytes() + 2);
        assert_eq!(batch.entries[2].bytes, 102, "one record goes plain");
    }

    #[test]
    fn by_key_records_of_one_shard_aggregate_apart() {
        let map = one_shard();
        let mut pacer = ShardPacer::new(1, 1000, 1 << 20);
        let now = Instant::now();
        let mut packer =
            Packer::new(aggregated(51_200, 100), Some((&map, &mut pacer)), now).by_key();
        for (seq, key, first) in [(1, "a", true), (2, "a", false), (3, "b", true)] {
            assert_eq!(packer.offer(&record(seq, key, 10), first), Offer::Taken);
        }
        let batch = packer.finish(None);
        let sizes: Vec<usize> = batch.entries.iter().map(|e| e.records).collect();
        assert_eq!(sizes, [2, 1], "a's two records, then b's");
        assert_eq!(batch.entries[1].shard, Some(0), "still paced by its shard");
    }

    #[test]
    fn a_record_too_big_to_share_goes_alone_and_ends_its_keys_turn() {
        let mut packer = Packer::new(aggregated(1000, 100), None, Instant::now());
        assert_eq!(packer.offer(&record(1, "big", 2000), true), Offer::Taken);
        assert_eq!(packer.offer(&record(2, "big", 10), false), Offer::KeyDone);
        assert_eq!(packer.offer(&record(3, "small", 10), true), Offer::Taken);
        assert_eq!(packer.offer(&record(4, "small", 10), false), Offer::Taken);
        let batch = packer.finish(None);
        let sizes: Vec<(usize, bool)> = batch
            .entries
            .iter()
            .map(|e| (e.records, e.aggregated))
            .collect();
        assert_eq!(sizes, [(1, false), (2, true)]);
        assert_eq!(batch.entries[0].bytes, 2003);
    }

    #[test]
    fn a_keys_records_stay_in_one_aggregate() {
        // Without a shard map, keys aggregate apart; a key's next record
        // that does not fit its aggregate waits for the next request.
        let mut packer = Packer::new(aggregated(300, 100), None, Instant::now());
        assert_eq!(packer.offer(&record(1, "a", 100), true), Offer::Taken);
        assert_eq!(packer.offer(&record(2, "a", 100), false), Offer::Taken);
        assert_eq!(packer.offer(&record(3, "a", 100), false), Offer::KeyDone);
        assert_eq!(packer.offer(&record(4, "b", 100), true), Offer::Taken);
        let batch = packer.finish(None);
        assert_eq!(batch.entries.len(), 2);
        assert_eq!(
            batch.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [1, 2, 4]
        );
    }

    #[test]
    fn requests_stay_within_their_bytes_and_entries() {
        let limits = PackLimits {
            request_bytes: 10_000,
            aggregation: Some(AggregateLimits {
                max_bytes: 4000,
                max_records: 1000,
            }),
        };
        let mut packer = Packer::new(limits, None, Instant::now());
        let offers: Vec<Offer> = (0..30)
            .map(|seq| packer.offer(&record(seq, &format!("k{seq}"), 1000), true))
            .collect();
        assert_eq!(offers.iter().filter(|o| **o == Offer::Taken).count(), 9);
        assert_eq!(offers[9], Offer::Full);
        let batch = packer.finish(None);
        assert!(batch.full);
        assert!(batch.entries.iter().map(|e| e.bytes).sum::<usize>() <= 10_000);

        let plain = PackLimits {
            request_bytes: MAX_BYTES_PER_REQUEST,
            aggregation: None,
        };
        let mut packer = Packer::new(plain, None, Instant::now());
        let taken = (0..600)
            .take_while(|seq| packer.offer(&record(*seq, "k", 1), *seq == 0) == Offer::Taken)
            .count();
        assert_eq!(taken, MAX_RECORDS_PER_REQUEST);
    }

    #[test]
    fn an_aggregate_is_paced_as_one_record_and_its_bytes() {
        let map = one_shard();
        let mut pacer = ShardPacer::new(1, 2, 1 << 20);
        let now = Instant::now();
        let mut packer = Packer::new(aggregated(1000, 100), Some((&map, &mut pacer)), now);
        // Two aggregates a second: the third waits, records joining do not.
        let mut offers = Vec::new();
        for seq in 0..20 {
            offers.push(packer.offer(&record(seq, &format!("k{seq}"), 150), true));
        }
        let taken = offers.iter().filter(|o| **o == Offer::Taken).count();
        assert!(
            matches!(offers[19], Offer::Paced(wait) if wait > Duration::ZERO),
            "{offers:?}"
        );
        let batch = packer.finish(None);
        assert_eq!(batch.entries.len(), 2);
        assert_eq!(batch.records.len(), taken);
        assert!(taken > 2, "{taken} records in two aggregates");
    }
}
