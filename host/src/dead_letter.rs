//! Dead letters: data ksm refused, kept in the store with the reason, so
//! nothing acknowledged is ever silently dropped. They survive restarts and
//! can be listed, inspected, replayed and purged (admin API and
//! `ksm dead-letters`).
//!
//! Two kinds are kept: input the guest refused (a whole message, or one bulk
//! record with its index), and records Kinesis refused (with their
//! partition key). Replaying the first kind runs it through the module's
//! guest again; replaying the second puts the record back in the spool.

use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use fjall::{Keyspace, OwnedWriteBatch as WriteBatch};
use serde::{Deserialize, Serialize};

use crate::clock;
use crate::store::{self, Store, StoreError};

/// One refused message or record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Its ID in the module's dead-letter store (0 until stored).
    #[serde(default)]
    pub id: u64,
    /// When it was refused, RFC 3339 UTC.
    pub time: String,
    /// Why, for people.
    pub reason: String,
    /// MQTT topic the data arrived on.
    pub topic: String,
    /// For a single bulk record: its position in the payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_index: Option<u32>,
    /// For a record the guest produced: its partition key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_key: Option<String>,
    /// For a record the guest produced: its explicit hash key, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explicit_hash_key: Option<String>,
    /// The refused bytes (the whole payload, or the one record), base64.
    pub data_base64: String,
}

impl DeadLetter {
    /// A dead letter for refused input, stamped now.
    pub fn new(
        reason: impl Into<String>,
        topic: &str,
        record_index: Option<u32>,
        data: &[u8],
    ) -> Self {
        Self {
            id: 0,
            time: clock::now_rfc3339(),
            reason: reason.into(),
            topic: topic.to_owned(),
            record_index,
            partition_key: None,
            explicit_hash_key: None,
            data_base64: BASE64.encode(data),
        }
    }

    /// A dead letter for a record the guest produced but Kinesis refuses.
    pub fn for_record(
        reason: impl Into<String>,
        topic: &str,
        partition_key: &str,
        explicit_hash_key: Option<&str>,
        data: &[u8],
    ) -> Self {
        Self {
            partition_key: Some(partition_key.to_owned()),
            explicit_hash_key: explicit_hash_key.map(str::to_owned),
            ..Self::new(reason, topic, None, data)
        }
    }

    /// The refused bytes.
    pub fn data(&self) -> Result<Vec<u8>, base64::DecodeError> {
        BASE64.decode(&self.data_base64)
    }
}

/// One module's dead letters.
pub struct DeadLetterStore {
    store: Store,
    keyspace: Keyspace,
    next_id: AtomicU64,
}

impl std::fmt::Debug for DeadLetterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetterStore").finish_non_exhaustive()
    }
}

impl DeadLetterStore {
    /// Opens the dead-letter keyspace of a module.
    pub fn open(store: &Store, module_id: &str) -> Result<Self, StoreError> {
        let keyspace = store.keyspace(module_id, "dead")?;
        let next_id = store::next_seq(&keyspace)?;
        Ok(Self {
            store: store.clone(),
            keyspace,
            next_id: AtomicU64::new(next_id),
        })
    }

    /// Adds dead letters to a write batch, giving each its ID.
    pub fn stage(&self, batch: &mut WriteBatch, letters: Vec<DeadLetter>) {
        for mut letter in letters {
            letter.id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let value = serde_json::to_vec(&letter).expect("a dead letter serializes");
            batch.insert(&self.keyspace, store::key(letter.id), value);
        }
    }

    /// Stores dead letters and syncs them to disk.
    pub fn append(&self, letters: Vec<DeadLetter>) -> Result<(), StoreError> {
        let mut batch = self.store.batch();
        self.stage(&mut batch, letters);
        batch.commit()?;
        self.store.sync()
    }

    /// Up to `limit` dead letters with IDs above `after`, oldest first.
    pub fn list(&self, after: u64, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let start = store::key(after.saturating_add(1));
        self.keyspace
            .range(start..)
            .take(limit)
            .map(|guard| {
                let (key, value) = guard.into_inner()?;
                self.decode(store::seq_of(&key).unwrap_or_default(), &value)
            })
            .collect()
    }

    /// The dead letter `id`, if kept.
    pub fn get(&self, id: u64) -> Result<Option<DeadLetter>, StoreError> {
        self.keyspace
            .get(store::key(id))?
            .map(|value| self.decode(id, &value))
            .transpose()
    }

    /// How many dead letters are kept.
    pub fn count(&self) -> Result<usize, StoreError> {
        Ok(self.keyspace.len()?)
    }

    /// Deletes the given dead letters (all of them if `ids` is `None`);
    /// returns how many there were.
    pub fn purge(&self, ids: Option<&[u64]>) -> Result<usize, StoreError> {
        let ids: Vec<u64> = match ids {
            Some(ids) => ids
                .iter()
                .copied()
                .filter(|id| self.keyspace.contains_key(store::key(*id)).unwrap_or(false))
                .collect(),
            None => self
                .keyspace
                .iter()
                .filter_map(|guard| guard.key().ok().and_then(|key| store::seq_of(&key)))
                .collect(),
        };
        let mut batch = self.store.batch();
        for id in &ids {
            batch.remove(&self.keyspace, store::key(*id));
        }
        batch.commit()?;
        self.store.sync()?;
        Ok(ids.len())
    }

    fn decode(&self, id: u64, value: &[u8]) -> Result<DeadLetter, StoreError> {
        serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
            keyspace: format!("{:?}", self.keyspace.name()),
            seq: id,
            detail: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_survive_reopening_and_can_be_purged() {
        let dir = std::env::temp_dir().join(format!("ksm-dl-{}", std::process::id()));
        let store = Store::open(&dir).unwrap();
        let letters = DeadLetterStore::open(&store, "mod-a").unwrap();
        letters
            .append(vec![
                DeadLetter::new("bad version", "/devices/1/bulkData/x", None, b"\x01\x02"),
                DeadLetter::new("too large", "/devices/1/bulkData/x", Some(3), b"abc"),
                DeadLetter::for_record("refused", "/devices/1/event", "1", None, b"{}"),
            ])
            .unwrap();
        drop(letters);
        drop(store);

        let store = Store::open(&dir).unwrap();
        let letters = DeadLetterStore::open(&store, "mod-a").unwrap();
        let all = letters.list(0, 100).unwrap();
        assert_eq!(all.iter().map(|l| l.id).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(all[0].reason, "bad version");
        assert_eq!(all[0].data().unwrap(), b"\x01\x02");
        assert_eq!(all[1].record_index, Some(3));
        assert_eq!(all[2].partition_key.as_deref(), Some("1"));
        assert_eq!(letters.list(1, 1).unwrap()[0].id, 2, "paged after an ID");
        assert_eq!(letters.get(3).unwrap().unwrap().reason, "refused");

        assert_eq!(
            letters.purge(Some(&[2, 9])).unwrap(),
            1,
            "only kept IDs count"
        );
        assert_eq!(letters.count().unwrap(), 2);
        letters
            .append(vec![DeadLetter::new("later", "/t", None, b"")])
            .unwrap();
        assert_eq!(
            letters.get(4).unwrap().unwrap().reason,
            "later",
            "IDs are not reused"
        );
        assert_eq!(letters.purge(None).unwrap(), 3);
        assert!(letters.list(0, 10).unwrap().is_empty());
        drop(letters);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
