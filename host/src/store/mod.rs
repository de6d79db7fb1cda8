//! The host's on-disk store: one fjall database under `storage.dir`, holding
//! per module: `{module}.groups` and `{module}.group-index` (the spool:
//! records waiting for Kinesis, see [`spool`]), `{module}.dead` (dead
//! letters) and `{module}.log` (the activity log); `{module}.spool` is the
//! spool of older versions, converted at start. Keys are big-endian sequence
//! numbers, so every keyspace iterates oldest first. Large dead letters keep
//! their data in files of their own beside the database, under
//! `{storage.dir}/dead-letters/` ([`dead_letter`]).
//!
//! [`Store::flush`] hands writes to the operating system (they then survive
//! a killed process); [`Store::sync`] makes everything written so far survive
//! a power loss, and is what an MQTT acknowledgement waits for.

pub mod dead_letter;
pub mod spool;

use std::path::{Path, PathBuf};

use fjall::{
    Database, Keyspace, KeyspaceCreateOptions, OwnedWriteBatch as WriteBatch, PersistMode,
};

/// Most bytes a keyspace holds in memory before fjall writes them to a table
/// file. Spool records are mostly removed soon after they are written, so
/// small memtables cost little I/O, and they bound both the memory ksm uses
/// and what a restart must replay from the journal (fjall's default, 64 MiB
/// per keyspace, made a restart after heavy load take seconds).
const MAX_MEMTABLE_BYTES: u64 = 8 * 1024 * 1024;
/// Most bytes of journal kept before fjall flushes memtables to free it
/// (fjall's smallest allowed; its default is 512 MiB).
const MAX_JOURNAL_BYTES: u64 = 64 * 1024 * 1024;
/// fjall's block cache. The spool is read once, in order, so caching its
/// blocks only holds memory; logs and dead letters are read rarely.
const CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened (another ksm may be using it).
    #[error(
        "cannot open the store at {path}: {source} (is another ksm running with the same storage.dir?)"
    )]
    Open {
        /// The store's directory.
        path: PathBuf,
        /// What fjall said.
        source: fjall::Error,
    },
    /// Reading or writing failed.
    #[error("store: {0}")]
    Io(#[from] fjall::Error),
    /// A file of the store (a large dead letter's data) could not be
    /// written, read or removed.
    #[error("store: {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An entry could not be decoded.
    #[error("store: entry {seq} of `{keyspace}` is corrupt: {detail}")]
    Corrupt {
        /// The keyspace.
        keyspace: String,
        /// The entry's sequence number.
        seq: u64,
        /// What is wrong with it.
        detail: String,
    },
}

/// The host's database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Database,
    dir: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store in `{dir}/store`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("store");
        let open = || {
            std::fs::create_dir_all(&path)?;
            Database::builder(&path)
                .max_journaling_size(MAX_JOURNAL_BYTES)
                .cache_size(CACHE_BYTES)
                .open()
        };
        let db = open().map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            db,
            dir: dir.to_owned(),
        })
    }

    /// The storage directory (`storage.dir`) the store lives in; files kept
    /// beside the database (large dead letters' data) go under it.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The keyspace `{module}.{kind}`, created if new.
    pub fn keyspace(&self, module: &str, kind: &str) -> Result<Keyspace, StoreError> {
        Ok(self.db.keyspace(&format!("{module}.{kind}"), || {
            KeyspaceCreateOptions::default().max_memtable_size(MAX_MEMTABLE_BYTES)
        })?)
    }

    /// A new atomic write batch.
    pub fn batch(&self) -> WriteBatch {
        self.db.batch()
    }

    /// Makes everything written so far durable (fsync).
    pub fn sync(&self) -> Result<(), StoreError> {
        Ok(self.db.persist(PersistMode::SyncAll)?)
    }

    /// Hands everything written so far to the operating system (no fsync):
    /// it then survives the process being killed, not a power loss.
    pub fn flush(&self) -> Result<(), StoreError> {
        Ok(self.db.persist(PersistMode::Buffer)?)
    }
}

/// The key of sequence number `seq`.
pub fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// The sequence number of a key.
pub fn seq_of(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// The sequence number after the last one in `keyspace` (1 when empty).
pub fn next_seq(keyspace: &Keyspace) -> Result<u64, StoreError> {
    match keyspace.last_key_value() {
        None => Ok(1),
        Some(guard) => {
            let key = guard.key()?;
            Ok(seq_of(&key).map_or(1, |seq| seq + 1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_keys_sort_in_order_and_survive_reopening() {
        let dir = std::env::temp_dir().join(format!("ksm-store-{}", std::process::id()));
        let store = Store::open(&dir).unwrap();
        let keyspace = store.keyspace("mod-a", "spool").unwrap();
        assert_eq!(next_seq(&keyspace).unwrap(), 1);
        for seq in [3u64, 256, 1] {
            keyspace.insert(key(seq), seq.to_string()).unwrap();
        }
        store.sync().unwrap();
        drop(keyspace);
        drop(store);
        let store = Store::open(&dir).unwrap();
        let keyspace = store.keyspace("mod-a", "spool").unwrap();
        let seqs: Vec<u64> = keyspace
            .iter()
            .map(|guard| seq_of(&guard.key().unwrap()).unwrap())
            .collect();
        assert_eq!(seqs, [1, 3, 256]);
        assert_eq!(next_seq(&keyspace).unwrap(), 257);
        drop(keyspace);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
