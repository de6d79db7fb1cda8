//! The sink's window on its spool: groups read back in order while memory
//! allows, the rest left on disk until there is room, and settled records
//! taken out of the store.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::group::{self, IndexEntry};
use super::{ModuleSpool, SpoolRecord};
use crate::store::dead_letter::{DeadLetterStore, StagedFiles};
use crate::store::{self, StoreError};

/// What a record costs in memory beside its data: its fields, its place in
/// the sink's queues and its key.
const RECORD_OVERHEAD: usize = 160;

/// The groups a sink holds in memory, and where the rest start on disk.
#[derive(Debug)]
pub struct SpoolReader {
    /// Loaded groups' index entries, by their first seq.
    groups: BTreeMap<u64, IndexEntry>,
    /// Memory the loaded, unsettled records take.
    memory: usize,
    max_memory: usize,
    /// The first group on disk not loaded, if any.
    on_disk_from: Option<u64>,
    /// The seq after the last record loaded.
    loaded_to: u64,
    /// Where groups are decoded, kept to spare the allocator a large
    /// buffer per group.
    decoded: Vec<SpoolRecord>,
}

impl SpoolReader {
    /// A window of at most `max_memory` bytes over `spool`, starting with
    /// whatever an earlier run left in it.
    pub fn new(spool: &ModuleSpool, max_memory: usize) -> Result<Self, StoreError> {
        Ok(Self {
            groups: BTreeMap::new(),
            memory: 0,
            max_memory,
            on_disk_from: spool.first_group()?,
            loaded_to: 0,
            decoded: Vec::new(),
        })
    }

    /// Memory the loaded records take.
    #[cfg(test)]
    pub fn memory(&self) -> usize {
        self.memory
    }

    /// True while groups wait on disk.
    pub fn has_more_on_disk(&self) -> bool {
        self.on_disk_from.is_some()
    }

    /// True when groups wait on disk and half the window is free, so that
    /// they are read back in large runs.
    pub fn wants_refill(&self) -> bool {
        self.on_disk_from.is_some() && self.memory <= self.max_memory / 2
    }

    fn fits(&self, charge: usize) -> bool {
        self.memory == 0 || self.memory + charge <= self.max_memory
    }

    /// Takes a group the committer just spooled: its records, to send, if
    /// nothing older waits on disk and it fits; otherwise it stays on disk
    /// and is read back in its turn.
    pub fn offer(&mut self, records: Vec<SpoolRecord>) -> Vec<SpoolRecord> {
        let Some(first) = records.first().map(|r| r.seq) else {
            return Vec::new();
        };
        if first < self.loaded_to {
            // Already read back from disk.
            return Vec::new();
        }
        let bytes: u64 = records.iter().map(|r| r.size as u64).sum();
        let entry = IndexEntry::new(records.len() as u32, bytes);
        let charge = charge(&entry);
        if self.on_disk_from.is_none() && self.fits(charge) {
            self.loaded_to = first + records.len() as u64;
            self.memory += charge;
            self.groups.insert(first, entry);
            return records;
        }
        self.on_disk_from.get_or_insert(first);
        Vec::new()
    }

    /// Reads groups back from disk, oldest first, while they fit, and hands
    /// their records not yet settled to `take`.
    pub fn refill(
        &mut self,
        spool: &ModuleSpool,
        mut take: impl FnMut(SpoolRecord),
    ) -> Result<(), StoreError> {
        let Some(from) = self.on_disk_from else {
            return Ok(());
        };
        let mut stopped_at = None;
        for guard in spool.index.range(store::key(from)..) {
            let (key, value) = guard.into_inner()?;
            let first = store::seq_of(&key).unwrap_or_default();
            if first < self.loaded_to {
                continue;
            }
            let entry =
                IndexEntry::decode(&value).map_err(|detail| spool.corrupt(first, detail))?;
            let charge = charge(&entry);
            if !self.fits(charge) {
                stopped_at = Some(first);
                break;
            }
            let value = spool.groups.get(&key)?.ok_or_else(|| {
                spool.corrupt(first, "group missing beside its index entry".into())
            })?;
            group::decode_into(
                first,
                Bytes::from(value),
                entry.settled_bits(),
                &mut self.decoded,
            )
            .map_err(|detail| spool.corrupt(first, detail))?;
            self.loaded_to = first + u64::from(entry.count);
            self.memory += charge;
            self.groups.insert(first, entry);
            self.decoded.drain(..).for_each(&mut take);
        }
        self.on_disk_from = stopped_at;
        Ok(())
    }

    /// Settles records (accepted by Kinesis): a group whose records are all
    /// settled leaves the store; a group partly settled says which are.
    /// Handed to the operating system, not synced: a settlement lost in a
    /// crash only means the record is sent again.
    pub fn settle(
        &mut self,
        spool: &ModuleSpool,
        records: &[(u64, usize)],
    ) -> Result<(), StoreError> {
        self.settle_with(spool, records, |_| Ok(StagedFiles::default()))
    }

    /// Settles records and, in the same atomic batch, writes what `also`
    /// adds (dead letters, with the data files they name, kept once the
    /// batch is committed). If `also` or the batch fails, nothing changes.
    pub fn settle_with(
        &mut self,
        spool: &ModuleSpool,
        records: &[(u64, usize)],
        also: impl FnOnce(&mut fjall::OwnedWriteBatch) -> Result<StagedFiles, StoreError>,
    ) -> Result<(), StoreError> {
        let mut updated: BTreeMap<u64, IndexEntry> = BTreeMap::new();
        let (mut count, mut bytes) = (0u64, 0u64);
        for &(seq, size) in records {
            let Some((&first, entry)) = self.groups.range(..=seq).next_back() else {
                continue;
            };
            let Ok(index) = usize::try_from(seq - first) else {
                continue;
            };
            let entry = updated.entry(first).or_insert_with(|| entry.clone());
            if entry.settle(index, size) {
                count += 1;
                bytes += size as u64;
            }
        }
        let mut batch = spool.store.batch();
        for (first, entry) in &updated {
            let key = store::key(*first);
            if entry.is_settled() {
                batch.remove(&spool.groups, key);
                batch.remove(&spool.index, key);
            } else {
                batch.insert(&spool.index, key, entry.encode());
            }
        }
        let files = also(&mut batch)?;
        batch.commit()?;
        files.committed();
        if let Err(error) = spool.store.flush() {
            // Committed all the same; the next sync reports a failing disk.
            tracing::warn!("cannot hand spool removals to the operating system: {error}");
        }
        for (first, entry) in updated {
            if entry.is_settled() {
                self.groups.remove(&first);
            } else {
                self.groups.insert(first, entry);
            }
        }
        let overhead = usize::try_from(count).unwrap_or(usize::MAX) * RECORD_OVERHEAD;
        let freed = usize::try_from(bytes).unwrap_or(usize::MAX) + overhead;
        self.memory = self.memory.saturating_sub(freed);
        spool.removed(count, bytes);
        Ok(())
    }
}

/// Moves every record left in `spool` to `letters` with `reason`, at most
/// `window` bytes of them at a time, each time in one atomic write; for a
/// module deleted with a spool that cannot be sent. Returns how many moved.
/// Nothing else may read the spool meanwhile.
pub fn move_to_dead_letters(
    spool: &ModuleSpool,
    letters: &DeadLetterStore,
    reason: &str,
    window: usize,
) -> Result<u64, StoreError> {
    let mut reader = SpoolReader::new(spool, window)?;
    let mut moved = 0;
    loop {
        let mut records = Vec::new();
        reader.refill(spool, |record| records.push(record))?;
        if records.is_empty() {
            return Ok(moved);
        }
        let dead = records.iter().map(|r| r.dead_letter(reason)).collect();
        let removed: Vec<(u64, usize)> = records.iter().map(|r| (r.seq, r.size)).collect();
        reader.settle_with(spool, &removed, |batch| letters.stage(batch, dead))?;
        moved += records.len() as u64;
    }
}

/// The memory a group's unsettled records take once loaded.
fn charge(entry: &IndexEntry) -> usize {
    let (records, bytes) = entry.unsettled();
    let records = usize::try_from(records).unwrap_or(usize::MAX);
    usize::try_from(bytes)
        .unwrap_or(usize::MAX)
        .saturating_add(records.saturating_mul(RECORD_OVERHEAD))
}
