//! The spool: each module's records on disk between the guest and Kinesis.
//!
//! A message is acknowledged to the broker once every record it produced is
//! in the spool (or kept as a dead letter), synced to disk. The Kinesis sink
//! reads the spool, sends, and removes only what Kinesis accepted; after a
//! crash or a restart it resumes from what is left. The spool is bounded:
//! when a module's spool is full, [`Committer`] waits, so messages stop
//! being acknowledged and the broker holds them back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fjall::Keyspace;
use tokio::sync::mpsc::UnboundedSender;

use crate::ack::Settlement;
use crate::activity::{Counters, Level};
use crate::crash_guard::CrashGuard;
use crate::dead_letter::{DeadLetter, StagedFiles};
use crate::inflight::Charge;
use crate::module::Module;
use crate::sink::shards;
use crate::store::{self, Store, StoreError};

/// Most messages committed (and synced) together.
const MAX_GROUP: usize = 1024;
/// Most bytes (records and dead letters) committed together; a larger job
/// goes alone.
const MAX_GROUP_BYTES: usize = 16 * 1024 * 1024;
/// How often a committer waiting for room checks whether ksm is stopping.
const ROOM_POLL: Duration = Duration::from_millis(100);

/// A record the guest produced, before it is spooled.
#[derive(Debug, Clone)]
pub struct NewRecord {
    /// Record data.
    pub data: Bytes,
    /// Partition key.
    pub partition_key: String,
    /// Explicit hash key, if the guest chose one.
    pub explicit_hash_key: Option<String>,
    /// MQTT topic the record came from.
    pub topic: Arc<str>,
}

impl NewRecord {
    /// Bytes the record counts against Kinesis limits: data plus partition key.
    pub fn size(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }
}

/// A record in the spool.
#[derive(Debug, Clone)]
pub struct SpoolRecord {
    /// Its key in the spool.
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
    /// The data, if held in memory; otherwise read back from disk.
    pub data: Option<Bytes>,
}

/// Encodes a record for the spool: version 1, key, hash key, topic, data.
fn encode(record: &NewRecord) -> Vec<u8> {
    let key = record.partition_key.as_bytes();
    let hash_key = record.explicit_hash_key.as_deref().unwrap_or("").as_bytes();
    let topic = record.topic.as_bytes();
    let mut out =
        Vec::with_capacity(7 + key.len() + hash_key.len() + topic.len() + record.data.len());
    out.push(1);
    for part in [key, hash_key, topic] {
        let len = u16::try_from(part.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&part[..usize::from(len)]);
    }
    out.extend_from_slice(&record.data);
    out
}

/// Decodes a spool entry: the record and its data.
fn decode(seq: u64, value: &[u8]) -> Result<(SpoolRecord, &[u8]), String> {
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
    let record = SpoolRecord {
        seq,
        partition_key: key.into(),
        hash_key: shards::hash_key(key, explicit_hash_key),
        explicit_hash_key: explicit_hash_key.map(Into::into),
        topic: topic.into(),
        size: rest.len() + key.len(),
        data: None,
    };
    Ok((record, rest))
}

#[derive(Debug, Default)]
struct Usage {
    records: u64,
    bytes: u64,
}

/// One module's spool.
pub struct ModuleSpool {
    store: Store,
    keyspace: Keyspace,
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
    /// Opens the spool of `module`, holding at most `max_bytes`.
    pub fn open(store: &Store, module: &str, max_bytes: u64) -> Result<Self, StoreError> {
        Ok(Self {
            store: store.clone(),
            keyspace: store.keyspace(module, "spool")?,
            max_bytes,
            usage: Mutex::new(Usage::default()),
            freed: Condvar::new(),
        })
    }

    fn usage(&self) -> std::sync::MutexGuard<'_, Usage> {
        self.usage.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records and bytes in the spool.
    pub fn len(&self) -> (u64, u64) {
        let usage = self.usage();
        (usage.records, usage.bytes)
    }

    /// The most bytes the spool holds.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Everything left in the spool, oldest first, with data held in memory
    /// up to `memory_budget` bytes. Also sets the spool's usage.
    pub fn recover(&self, memory_budget: usize) -> Result<Vec<SpoolRecord>, StoreError> {
        let mut records = Vec::new();
        let mut in_memory = 0;
        let mut bytes = 0u64;
        for guard in self.keyspace.iter() {
            let (key, value) = guard.into_inner()?;
            let seq = store::seq_of(&key).unwrap_or_default();
            let (mut record, data) =
                decode(seq, &value).map_err(|detail| self.corrupt(seq, detail))?;
            if in_memory + data.len() <= memory_budget {
                in_memory += data.len();
                record.data = Some(Bytes::copy_from_slice(data));
            }
            bytes += record.size as u64;
            records.push(record);
        }
        let mut usage = self.usage();
        usage.records = records.len() as u64;
        usage.bytes = bytes;
        Ok(records)
    }

    /// The sequence number after the last spooled record.
    pub fn next_seq(&self) -> Result<u64, StoreError> {
        store::next_seq(&self.keyspace)
    }

    /// A record's data, from memory or from disk.
    pub fn data(&self, record: &SpoolRecord) -> Result<Bytes, StoreError> {
        if let Some(data) = &record.data {
            return Ok(data.clone());
        }
        let value = self
            .keyspace
            .get(store::key(record.seq))?
            .ok_or_else(|| self.corrupt(record.seq, "missing from the spool".into()))?;
        let (_, data) =
            decode(record.seq, &value).map_err(|detail| self.corrupt(record.seq, detail))?;
        Ok(Bytes::copy_from_slice(data))
    }

    /// Removes records Kinesis accepted (no sync: a removal lost in a crash
    /// only means the record is sent again).
    pub fn remove(&self, records: &[(u64, usize)]) -> Result<(), StoreError> {
        self.remove_with(records, |_| Ok(StagedFiles::default()))
    }

    /// Removes records and, in the same atomic batch, writes what `also`
    /// adds (dead letters, with the data files they name, kept once the
    /// batch is committed). If `also` fails, nothing is written.
    pub fn remove_with(
        &self,
        records: &[(u64, usize)],
        also: impl FnOnce(&mut fjall::OwnedWriteBatch) -> Result<StagedFiles, StoreError>,
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut batch = self.store.batch();
        for (seq, _) in records {
            batch.remove(&self.keyspace, store::key(*seq));
        }
        let files = also(&mut batch)?;
        batch.commit()?;
        files.committed();
        // Survives a killed process, so a crash resends less.
        self.store.flush()?;
        let mut usage = self.usage();
        usage.records = usage.records.saturating_sub(records.len() as u64);
        let freed: u64 = records.iter().map(|(_, size)| *size as u64).sum();
        usage.bytes = usage.bytes.saturating_sub(freed);
        drop(usage);
        self.freed.notify_all();
        Ok(())
    }

    /// True if `bytes` more fit (an empty spool takes anything, so one huge
    /// message cannot block for ever).
    fn has_room(&self, pending: u64, bytes: u64) -> bool {
        self.fits(self.usage().bytes + pending, bytes)
    }

    fn fits(&self, used: u64, bytes: u64) -> bool {
        used == 0 || used + bytes <= self.max_bytes
    }

    /// Waits until `bytes` more fit beside `pending`, or `stopping` is set.
    fn wait_for_room(&self, pending: u64, bytes: u64, stopping: &AtomicBool) -> bool {
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

    fn added(&self, records: u64, bytes: u64) {
        let mut usage = self.usage();
        usage.records += records;
        usage.bytes += bytes;
    }

    fn corrupt(&self, seq: u64, detail: String) -> StoreError {
        StoreError::Corrupt {
            keyspace: format!("{:?}", self.keyspace.name()),
            seq,
            detail,
        }
    }
}

/// What one module keeps of one message.
#[derive(Debug, Default)]
pub struct Staged {
    /// Records to spool.
    pub records: Vec<NewRecord>,
    /// Refused data to keep.
    pub dead_letters: Vec<DeadLetter>,
}

impl Staged {
    /// Bytes of its records, which the spool counts.
    fn bytes(&self) -> u64 {
        self.records.iter().map(|r| r.size() as u64).sum()
    }

    /// Bytes it writes to the store: records and dead letters.
    pub fn written_bytes(&self) -> u64 {
        let letters: usize = self.dead_letters.iter().map(DeadLetter::size).sum();
        self.bytes() + letters as u64
    }
}

/// One message's output for every module, committed together; the
/// settlement is settled once it is durable.
pub struct Job {
    /// Per module (in module order), what to keep; `None` for nothing.
    pub staged: Vec<Option<Staged>>,
    /// The message's acknowledgement.
    pub settlement: Settlement,
    /// What the message holds of the in-flight budget, given back once it
    /// is committed.
    pub charge: Charge,
}

impl Job {
    /// Bytes it writes to the store, over every module.
    fn written_bytes(&self) -> usize {
        let bytes: u64 = self
            .staged
            .iter()
            .flatten()
            .map(Staged::written_bytes)
            .sum();
        usize::try_from(bytes).unwrap_or(usize::MAX)
    }
}

/// A module as the committer sees it.
pub struct CommitTarget {
    /// The module.
    pub module: Arc<Module>,
    /// Where spooled records go to be sent.
    pub sink: UnboundedSender<Vec<SpoolRecord>>,
    /// The next spool sequence number.
    pub next_seq: u64,
}

/// The commit thread: writes jobs to the store in groups, syncs once per
/// group, then releases the messages' acknowledgements and hands the records
/// to the sinks.
pub struct Committer {
    store: Store,
    targets: Vec<CommitTarget>,
    stopping: Arc<AtomicBool>,
    guard: Arc<CrashGuard>,
    full: Vec<bool>,
}

impl Committer {
    /// A committer over the modules' targets (in module order), telling
    /// `guard` which messages are out of flight. Setting `stopping` makes a
    /// committer that waits for room give up.
    pub fn new(
        store: Store,
        targets: Vec<CommitTarget>,
        stopping: Arc<AtomicBool>,
        guard: Arc<CrashGuard>,
    ) -> Self {
        let full = vec![false; targets.len()];
        Self {
            store,
            targets,
            stopping,
            guard,
            full,
        }
    }

    /// Commits jobs until the channel closes.
    pub fn run(mut self, jobs: std::sync::mpsc::Receiver<Job>) {
        let mut group = Vec::new();
        // A job that did not fit the last group starts the next one.
        let mut next: Option<Job> = None;
        while let Some(first) = next.take().or_else(|| jobs.recv().ok()) {
            let mut bytes = first.written_bytes();
            group.push(first);
            while group.len() < MAX_GROUP && bytes < MAX_GROUP_BYTES {
                let Ok(job) = jobs.try_recv() else { break };
                let more = job.written_bytes();
                if bytes + more > MAX_GROUP_BYTES {
                    next = Some(job);
                    break;
                }
                bytes += more;
                group.push(job);
            }
            self.commit_all(std::mem::take(&mut group));
        }
    }

    /// Commits a group, splitting it where a spool is full and waiting for
    /// room there.
    fn commit_all(&mut self, group: Vec<Job>) {
        let mut ready: Vec<Job> = Vec::new();
        let mut pending = vec![0u64; self.targets.len()];
        for job in group {
            let fits = job.staged.iter().enumerate().all(|(i, staged)| {
                staged
                    .as_ref()
                    .is_none_or(|s| self.targets[i].module.spool.has_room(pending[i], s.bytes()))
            });
            if !fits {
                self.commit(std::mem::take(&mut ready));
                pending.iter_mut().for_each(|p| *p = 0);
                if !self.wait_for_room(&job) {
                    // Stopping: the message stays unacknowledged.
                    self.guard.end(1);
                    drop(job);
                    continue;
                }
            }
            for (i, staged) in job.staged.iter().enumerate() {
                if let Some(staged) = staged {
                    pending[i] += staged.bytes();
                }
            }
            ready.push(job);
        }
        self.commit(ready);
    }

    fn wait_for_room(&mut self, job: &Job) -> bool {
        for (i, staged) in job.staged.iter().enumerate() {
            let Some(staged) = staged else { continue };
            let target = &self.targets[i];
            let spool = &target.module.spool;
            if spool.has_room(0, staged.bytes()) {
                continue;
            }
            if !self.full[i] {
                self.full[i] = true;
                let (records, bytes) = spool.len();
                target.module.log.write(
                    Level::Warn,
                    format!(
                        "spool full ({records} records, {bytes} of {} bytes) while Kinesis does \
                         not take records fast enough: new messages are not acknowledged, so the \
                         broker holds them back, until records are accepted",
                        spool.max_bytes()
                    ),
                );
            }
            if !spool.wait_for_room(0, staged.bytes(), &self.stopping) {
                return false;
            }
        }
        for (i, full) in self.full.iter_mut().enumerate() {
            if *full && job.staged[i].is_some() {
                *full = false;
                self.targets[i]
                    .module
                    .log
                    .write(Level::Info, "spool has room again: acknowledging messages");
            }
        }
        true
    }

    /// Writes the jobs in one batch, syncs, then settles and hands over.
    fn commit(&mut self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let mut batch = self.store.batch();
        let mut spooled: Vec<Vec<SpoolRecord>> = vec![Vec::new(); self.targets.len()];
        let mut dead_letters = vec![0u64; self.targets.len()];
        let mut settlements = Vec::with_capacity(jobs.len());
        // Given back once the group is committed (or has failed).
        let mut charges = Vec::with_capacity(jobs.len());
        let jobs_in_group = jobs.len();
        // Dead letters' data files, kept once the batch naming them is committed.
        let mut files = Vec::new();
        let mut staging: Result<(), StoreError> = Ok(());
        for job in jobs {
            for (i, staged) in job.staged.into_iter().enumerate() {
                let Some(staged) = staged else { continue };
                let target = &mut self.targets[i];
                for record in staged.records {
                    let seq = target.next_seq;
                    target.next_seq += 1;
                    batch.insert(
                        &target.module.spool.keyspace,
                        store::key(seq),
                        encode(&record),
                    );
                    spooled[i].push(SpoolRecord {
                        seq,
                        size: record.size(),
                        hash_key: shards::hash_key(
                            &record.partition_key,
                            record.explicit_hash_key.as_deref(),
                        ),
                        partition_key: record.partition_key.into(),
                        explicit_hash_key: record.explicit_hash_key.map(Into::into),
                        topic: record.topic,
                        data: Some(record.data),
                    });
                }
                dead_letters[i] += staged.dead_letters.len() as u64;
                if staging.is_ok() {
                    match target
                        .module
                        .dead_letters
                        .stage(&mut batch, staged.dead_letters)
                    {
                        Ok(written) => files.push(written),
                        Err(error) => staging = Err(error),
                    }
                }
            }
            settlements.push(job.settlement);
            charges.push(job.charge);
        }
        // A dead letter's data file that cannot be written fails the group;
        // the files of a group that is not committed are removed (dropped).
        let result = staging.and_then(|()| {
            batch.commit()?;
            files.into_iter().for_each(StagedFiles::committed);
            self.store.sync()
        });
        if let Err(error) = result {
            for target in &self.targets {
                target.module.log.write_limited(
                    "store",
                    Level::Error,
                    format!("cannot write to the store, messages stay unacknowledged: {error}"),
                );
            }
            // Dropping the settlements keeps the messages unacknowledged; the
            // records that were not written are dropped from memory only.
            self.guard.end(jobs_in_group);
            return;
        }
        for (i, records) in spooled.into_iter().enumerate() {
            let target = &self.targets[i];
            let counters = &target.module.counters;
            Counters::add(&counters.dead_lettered, dead_letters[i]);
            if records.is_empty() {
                continue;
            }
            let bytes: u64 = records.iter().map(|r| r.size as u64).sum();
            target.module.spool.added(records.len() as u64, bytes);
            Counters::add(&counters.spooled, records.len() as u64);
            // A closed sink (shutdown) leaves the records in the spool.
            let _ = target.sink.send(records);
        }
        for settlement in settlements {
            settlement.settle();
        }
        self.guard.end(jobs_in_group);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let record = NewRecord {
            data: Bytes::from_static(b"\x00payload"),
            partition_key: "1001".into(),
            explicit_hash_key: Some("42".into()),
            topic: "/devices/1001/event".into(),
        };
        let value = encode(&record);
        let (decoded, data) = decode(7, &value).unwrap();
        assert_eq!(decoded.seq, 7);
        assert_eq!(&*decoded.partition_key, "1001");
        assert_eq!(decoded.explicit_hash_key.as_deref(), Some("42"));
        assert_eq!(&*decoded.topic, "/devices/1001/event");
        assert_eq!(data, b"\x00payload");
        assert_eq!(decoded.size, record.size());
    }

    #[test]
    fn corrupt_entries_are_reported() {
        assert!(decode(1, b"").is_err());
        assert!(decode(1, b"\x02").is_err());
        assert!(decode(1, b"\x01\x00\x09ab").is_err());
    }
}
