//! The spool: each module's records on disk between the guest and Kinesis.
//!
//! A message is acknowledged to the broker once every record it produced is
//! in the spool (or kept as a dead letter), synced to disk. The spool keeps
//! one entry per commit and module, a *group* of records with consecutive
//! sequence numbers ([`group`]), and beside it a small index entry per
//! group that counts its records and marks those already settled. The
//! Kinesis sink reads groups back in order through a bounded window
//! ([`SpoolReader`]), so its memory does not grow with the backlog, and a
//! group leaves the store as a whole once every record in it is settled
//! (accepted by Kinesis or moved to the dead letters). Partly settled
//! groups have their index entry rewritten, so after a crash only what was
//! not yet settled is sent again.
//!
//! The spool is bounded: when a module's spool is full, the committer
//! ([`crate::pipeline::commit`]) waits, so messages stop being acknowledged
//! and the broker holds them back.

mod group;
mod reader;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fjall::Keyspace;

use group::IndexEntry;
pub use reader::{SpoolReader, move_to_dead_letters};

use crate::kinesis;
use crate::store::dead_letter::DeadLetter;
use crate::store::{self, Store, StoreError};

/// How often a committer waiting for room checks whether ksm is stopping.
const ROOM_POLL: Duration = Duration::from_millis(100);
/// Most records of one group written when an older spool is converted.
const LEGACY_GROUP_RECORDS: usize = 1000;

/// A record on its way to Kinesis: built once from the guest's answer,
/// spooled, sent and settled as this one value.
#[derive(Debug, Clone)]
pub struct SpoolRecord {
    /// Its sequence number in the module's spool (0 until spooled).
    pub seq: u64,
    /// Partition key.
    pub partition_key: Arc<str>,
    /// Explicit hash key.
    pub explicit_hash_key: Option<Arc<str>>,
    /// The 128-bit hash key that picks its shard, worked out once.
    pub hash_key: u128,
    /// MQTT topic the record came from.
    pub topic: Arc<str>,
    /// Data plus partition key, in bytes.
    pub size: usize,
    /// The data.
    pub data: Bytes,
    /// When ksm received its message, Unix milliseconds; 0 if unknown.
    /// Spooled per group (a group keeps its first record's).
    pub received_ms: u64,
}

impl SpoolRecord {
    /// A record not yet spooled.
    pub fn new(
        data: Bytes,
        partition_key: &str,
        explicit_hash_key: Option<&str>,
        topic: Arc<str>,
    ) -> Self {
        Self {
            seq: 0,
            size: data.len() + partition_key.len(),
            hash_key: kinesis::hash_key(partition_key, explicit_hash_key),
            partition_key: partition_key.into(),
            explicit_hash_key: explicit_hash_key.map(Into::into),
            topic,
            data,
            received_ms: 0,
        }
    }

    /// The record as a dead letter, for `reason`.
    pub fn dead_letter(&self, reason: &str) -> DeadLetter {
        DeadLetter::for_record(
            reason,
            &self.topic,
            &self.partition_key,
            self.explicit_hash_key.as_deref(),
            self.data.clone(),
        )
    }
}

#[derive(Debug, Default)]
struct Usage {
    records: u64,
    bytes: u64,
}

/// One module's spool.
pub struct ModuleSpool {
    store: Store,
    /// Groups, by the seq of their first record.
    groups: Keyspace,
    /// Their index entries, by the same key.
    index: Keyspace,
    max_bytes: u64,
    usage: Mutex<Usage>,
    freed: Condvar,
}

impl std::fmt::Debug for ModuleSpool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleSpool").finish_non_exhaustive()
    }
}

impl ModuleSpool {
    /// Opens the spool of `module`, holding at most `max_bytes`: converts
    /// a spool left by an older ksm (one entry per record) into groups, and
    /// counts what is left from the index.
    pub fn open(store: &Store, module: &str, max_bytes: u64) -> Result<Self, StoreError> {
        let spool = Self {
            store: store.clone(),
            groups: store.keyspace(module, "groups")?,
            index: store.keyspace(module, "group-index")?,
            max_bytes,
            usage: Mutex::new(Usage::default()),
            freed: Condvar::new(),
        };
        spool.convert_legacy(&store.keyspace(module, "spool")?)?;
        let mut usage = Usage::default();
        for guard in spool.index.iter() {
            let (key, value) = guard.into_inner()?;
            let seq = store::seq_of(&key).unwrap_or_default();
            let entry = IndexEntry::decode(&value).map_err(|detail| spool.corrupt(seq, detail))?;
            let (records, bytes) = entry.unsettled();
            usage.records += records;
            usage.bytes += bytes;
        }
        *spool.usage() = usage;
        Ok(spool)
    }

    fn usage(&self) -> std::sync::MutexGuard<'_, Usage> {
        self.usage.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records and bytes in the spool, not yet settled.
    pub fn len(&self) -> (u64, u64) {
        let usage = self.usage();
        (usage.records, usage.bytes)
    }

    /// The most bytes the spool holds.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The sequence number after the last spooled record (1 when empty).
    pub fn next_seq(&self) -> Result<u64, StoreError> {
        let Some(guard) = self.index.last_key_value() else {
            return Ok(1);
        };
        let (key, value) = guard.into_inner()?;
        let seq = store::seq_of(&key).unwrap_or_default();
        let entry = IndexEntry::decode(&value).map_err(|detail| self.corrupt(seq, detail))?;
        Ok(seq + u64::from(entry.count))
    }

    /// The key of the oldest group, if any.
    fn first_group(&self) -> Result<Option<u64>, StoreError> {
        match self.index.first_key_value() {
            None => Ok(None),
            Some(guard) => Ok(store::seq_of(&guard.key()?)),
        }
    }

    /// True if `bytes` more fit (an empty spool takes anything, so one huge
    /// message cannot block for ever).
    pub(crate) fn has_room(&self, pending: u64, bytes: u64) -> bool {
        self.fits(self.usage().bytes + pending, bytes)
    }

    fn fits(&self, used: u64, bytes: u64) -> bool {
        used == 0 || used + bytes <= self.max_bytes
    }

    /// Waits until `bytes` more fit beside `pending`, or `stopping` is set.
    pub(crate) fn wait_for_room(&self, pending: u64, bytes: u64, stopping: &AtomicBool) -> bool {
        let mut usage = self.usage();
        loop {
            if self.fits(usage.bytes + pending, bytes) {
                return true;
            }
            if stopping.load(Ordering::Acquire) {
                return false;
            }
            usage = self
                .freed
                .wait_timeout(usage, ROOM_POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub(crate) fn added(&self, records: u64, bytes: u64) {
        let mut usage = self.usage();
        usage.records += records;
        usage.bytes += bytes;
    }

    pub(crate) fn removed(&self, records: u64, bytes: u64) {
        let mut usage = self.usage();
        usage.records = usage.records.saturating_sub(records);
        usage.bytes = usage.bytes.saturating_sub(bytes);
        drop(usage);
        self.freed.notify_all();
    }

    /// Rewrites the records of an older spool, one entry per record
    /// (`{module}.spool`), as groups, oldest first, each group and the
    /// removal of its records in one atomic batch.
    fn convert_legacy(&self, legacy: &Keyspace) -> Result<(), StoreError> {
        if legacy.first_key_value().is_none() {
            return Ok(());
        }
        let mut next = self.next_seq()?;
        let mut records = Vec::new();
        let mut old_keys = Vec::new();
        for guard in legacy.iter() {
            let (key, value) = guard.into_inner()?;
            let old = store::seq_of(&key).unwrap_or_default();
            let mut record = decode_legacy(&value).map_err(|detail| StoreError::Corrupt {
                keyspace: format!("{:?}", legacy.name()),
                seq: old,
                detail,
            })?;
            record.seq = next + records.len() as u64;
            records.push(record);
            old_keys.push(key);
            if records.len() == LEGACY_GROUP_RECORDS {
                next = self.write_converted(legacy, &mut records, &mut old_keys)?;
            }
        }
        if !records.is_empty() {
            self.write_converted(legacy, &mut records, &mut old_keys)?;
        }
        self.store.sync()
    }

    /// Writes converted records as one group and removes their old
    /// entries, atomically; returns the next seq.
    fn write_converted(
        &self,
        legacy: &Keyspace,
        records: &mut Vec<SpoolRecord>,
        old_keys: &mut Vec<fjall::Slice>,
    ) -> Result<u64, StoreError> {
        let mut batch = self.store.batch();
        self.insert_group(&mut batch, records);
        for key in old_keys.drain(..) {
            batch.remove(legacy, key);
        }
        batch.commit()?;
        let next = records.last().map_or(1, |r| r.seq + 1);
        records.clear();
        Ok(next)
    }

    /// Adds a group (records with consecutive seqs) to `batch`; returns its
    /// bytes.
    pub(crate) fn insert_group(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        records: &[SpoolRecord],
    ) -> u64 {
        let bytes: u64 = records.iter().map(|r| r.size as u64).sum();
        let first = records[0].seq;
        batch.insert(&self.groups, store::key(first), group::encode(records));
        let entry = IndexEntry::new(records.len() as u32, bytes);
        batch.insert(&self.index, store::key(first), entry.encode());
        bytes
    }

    fn corrupt(&self, seq: u64, detail: String) -> StoreError {
        StoreError::Corrupt {
            keyspace: format!("{:?}", self.groups.name()),
            seq,
            detail,
        }
    }
}

/// Decodes an entry of an older spool: version 1, then key, explicit hash
/// key and topic (u16 big-endian lengths), then the data.
fn decode_legacy(value: &[u8]) -> Result<SpoolRecord, String> {
    let (&version, mut rest) = value.split_first().ok_or("empty entry")?;
    if version != 1 {
        return Err(format!("unknown entry version {version}"));
    }
    let mut parts = [""; 3];
    for part in &mut parts {
        let (len, tail) = rest.split_at_checked(2).ok_or("truncated entry")?;
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let (text, tail) = tail.split_at_checked(len).ok_or("truncated entry")?;
        *part = std::str::from_utf8(text).map_err(|e| e.to_string())?;
        rest = tail;
    }
    let [key, hash_key, topic] = parts;
    let explicit_hash_key = (!hash_key.is_empty()).then_some(hash_key);
    Ok(SpoolRecord::new(
        Bytes::copy_from_slice(rest),
        key,
        explicit_hash_key,
        topic.into(),
    ))
}

#[cfg(test)]
impl ModuleSpool {
    /// Spools `records` (consecutive seqs) as one group, as the committer
    /// does, for tests of what reads the spool.
    pub(crate) fn commit_for_tests(&self, records: &[SpoolRecord]) {
        let mut batch = self.store.batch();
        let bytes = self.insert_group(&mut batch, records);
        self.added(records.len() as u64, bytes);
        batch.commit().expect("a test store takes the group");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempStore {
        dir: std::path::PathBuf,
        store: Option<Store>,
    }

    impl TempStore {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("ksm-spool-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let store = Store::open(&dir).unwrap();
            Self {
                dir,
                store: Some(store),
            }
        }

        fn store(&self) -> &Store {
            self.store.as_ref().unwrap()
        }

        fn reopen(&mut self) {
            self.store = None;
            self.store = Some(Store::open(&self.dir).unwrap());
        }
    }

    impl Drop for TempStore {
        fn drop(&mut self) {
            self.store = None;
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn records(first: u64, n: u64, size: usize) -> Vec<SpoolRecord> {
        (first..first + n)
            .map(|seq| {
                let mut record = SpoolRecord::new(
                    Bytes::from(vec![seq as u8; size]),
                    &format!("{}", seq % 3),
                    None,
                    "/devices/1/bulkData/x".into(),
                );
                record.seq = seq;
                record
            })
            .collect()
    }

    fn refill(reader: &mut SpoolReader, spool: &ModuleSpool) -> Vec<SpoolRecord> {
        let mut records = Vec::new();
        reader.refill(spool, |r| records.push(r)).unwrap();
        records
    }

    fn seqs(records: &[SpoolRecord]) -> Vec<u64> {
        records.iter().map(|r| r.seq).collect()
    }

    fn settled(records: &[SpoolRecord]) -> Vec<(u64, usize)> {
        records.iter().map(|r| (r.seq, r.size)).collect()
    }

    #[test]
    fn groups_wait_on_disk_beyond_the_window_and_come_back_in_order() {
        let temp = TempStore::new("window");
        let spool = ModuleSpool::open(temp.store(), "m", u64::MAX).unwrap();
        // Each group of 10 records of 1000 bytes costs about 11.6 KB.
        let mut reader = SpoolReader::new(&spool, 30_000).unwrap();
        let mut sent = Vec::new();
        for g in 0..6 {
            let group = records(1 + g * 10, 10, 1000);
            spool.commit_for_tests(&group);
            sent.extend(seqs(&reader.offer(group)));
        }
        assert_eq!(sent, (1..=20).collect::<Vec<_>>(), "two groups fit");
        assert!(reader.has_more_on_disk());
        assert!(!reader.wants_refill());
        assert!(refill(&mut reader, &spool).is_empty(), "no room");
        let first_two: Vec<(u64, usize)> = (1..=20).map(|seq| (seq, 1001)).collect();
        reader.settle(&spool, &first_two).unwrap();
        assert_eq!(reader.memory(), 0);
        assert!(reader.wants_refill());
        let back = refill(&mut reader, &spool);
        assert_eq!(seqs(&back), (21..=40).collect::<Vec<_>>());
        assert_eq!(back[0].data, Bytes::from(vec![21u8; 1000]));
        // A group the committer offers while older ones wait stays on disk.
        let group = records(61, 10, 1000);
        spool.commit_for_tests(&group);
        assert!(reader.offer(group).is_empty());
        reader.settle(&spool, &settled(&back)).unwrap();
        let rest = refill(&mut reader, &spool);
        assert_eq!(seqs(&rest), (41..=60).collect::<Vec<_>>());
        reader.settle(&spool, &settled(&rest)).unwrap();
        let last = refill(&mut reader, &spool);
        assert_eq!(seqs(&last), (61..=70).collect::<Vec<_>>());
        assert!(!reader.has_more_on_disk());
        reader.settle(&spool, &settled(&last)).unwrap();
        assert_eq!(spool.len(), (0, 0));
        assert!(spool.index.first_key_value().is_none(), "every group left");
        assert!(spool.groups.first_key_value().is_none());
        assert_eq!(spool.next_seq().unwrap(), 1);
    }

    #[test]
    fn after_a_restart_only_unsettled_records_are_read_back() {
        let mut temp = TempStore::new("restart");
        {
            let spool = ModuleSpool::open(temp.store(), "m", u64::MAX).unwrap();
            let mut reader = SpoolReader::new(&spool, usize::MAX).unwrap();
            for g in 0..3 {
                let group = records(1 + g * 100, 100, 10);
                spool.commit_for_tests(&group);
                reader.offer(group);
            }
            // Out of order, as several requests in flight settle them.
            let some: Vec<(u64, usize)> = (1..=300)
                .filter(|seq| seq % 7 != 0 && !(101..=200).contains(seq))
                .map(|seq| (seq, 11))
                .collect();
            reader.settle(&spool, &some).unwrap();
            let (records, bytes) = spool.len();
            assert_eq!(records, 100 + 28);
            assert_eq!(bytes, 128 * 11);
        }
        temp.reopen();
        let spool = ModuleSpool::open(temp.store(), "m", u64::MAX).unwrap();
        assert_eq!(spool.len(), (128, 128 * 11));
        assert_eq!(spool.next_seq().unwrap(), 301);
        let mut reader = SpoolReader::new(&spool, usize::MAX).unwrap();
        let back = refill(&mut reader, &spool);
        let expected: Vec<u64> = (1..=300)
            .filter(|seq| seq % 7 == 0 || (101..=200).contains(seq))
            .collect();
        assert_eq!(seqs(&back), expected);
        reader.settle(&spool, &settled(&back)).unwrap();
        assert_eq!(spool.len(), (0, 0));
    }

    #[test]
    fn a_failed_batch_settles_nothing() {
        let temp = TempStore::new("failed");
        let spool = ModuleSpool::open(temp.store(), "m", u64::MAX).unwrap();
        let mut reader = SpoolReader::new(&spool, usize::MAX).unwrap();
        let group = records(1, 4, 10);
        spool.commit_for_tests(&group);
        let group = reader.offer(group);
        let result = reader.settle_with(&spool, &settled(&group), |_| {
            Err(StoreError::Corrupt {
                keyspace: "x".into(),
                seq: 0,
                detail: "refused".into(),
            })
        });
        assert!(result.is_err());
        assert_eq!(spool.len().0, 4);
        reader.settle(&spool, &settled(&group[..2])).unwrap();
        assert_eq!(spool.len().0, 2, "the failed settlement left no mark");
    }

    /// An entry as older versions wrote it.
    fn legacy_entry(key: &str, hash_key: &str, topic: &str, data: &[u8]) -> Vec<u8> {
        let mut out = vec![1];
        for part in [key, hash_key, topic] {
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part.as_bytes());
        }
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn a_spool_of_an_older_version_is_converted_in_order() {
        let mut temp = TempStore::new("legacy");
        {
            let legacy = temp.store().keyspace("m", "spool").unwrap();
            for seq in [3u64, 5, 2500] {
                let data = format!("record {seq}");
                let hash_key = if seq == 5 { "42" } else { "" };
                let value = legacy_entry("1001", hash_key, "/devices/1001/event", data.as_bytes());
                legacy.insert(store::key(seq), value).unwrap();
            }
            for seq in 10..2010u64 {
                legacy
                    .insert(store::key(seq), legacy_entry("7", "", "/t", b"x"))
                    .unwrap();
            }
            temp.store().sync().unwrap();
        }
        temp.reopen();
        let spool = ModuleSpool::open(temp.store(), "m", u64::MAX).unwrap();
        assert_eq!(spool.len().0, 2003);
        let legacy = temp.store().keyspace("m", "spool").unwrap();
        assert!(legacy.first_key_value().is_none(), "old entries removed");
        let mut reader = SpoolReader::new(&spool, usize::MAX).unwrap();
        let back = refill(&mut reader, &spool);
        assert_eq!(seqs(&back), (1..=2003).collect::<Vec<_>>());
        assert_eq!(back[0].data, Bytes::from("record 3"));
        assert_eq!(back[1].explicit_hash_key.as_deref(), Some("42"));
        assert_eq!(back[1].hash_key, 42);
        assert_eq!(back[2002].data, Bytes::from("record 2500"));
        assert_eq!(&*back[2].partition_key, "7");
        assert_eq!(spool.next_seq().unwrap(), 2004);
    }
}
