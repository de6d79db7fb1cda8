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

use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use fjall::{Keyspace, OwnedWriteBatch as WriteBatch};
use serde::{Deserialize, Serialize};

use crate::clock;
use crate::store::{self, Store, StoreError};

/// First byte of a dead letter stored as its JSON details followed by its
/// raw data (the data is never base64-encoded in the store). Entries
/// written by earlier versions are JSON objects and start with `{`.
const BINARY_ENTRY: u8 = 2;

/// One refused message or record. Its data is a [`Bytes`] view: the dead
/// letters that several modules keep of one message share its payload.
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
    /// The refused bytes (the whole payload, or the one record); base64 on the wire.
    #[serde(rename = "data_base64", with = "base64_data")]
    pub data: Bytes,
}

/// The details of a stored dead letter, without its data.
#[derive(Serialize, Deserialize)]
struct Details {
    time: String,
    reason: String,
    topic: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    record_index: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    partition_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    explicit_hash_key: Option<String>,
}

/// `data` as a base64 string on the wire.
mod base64_data {
    use super::{BASE64, Bytes};
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(data: &Bytes, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&BASE64.encode(data))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Bytes, D::Error> {
        let text = String::deserialize(deserializer)?;
        BASE64
            .decode(text)
            .map(Bytes::from)
            .map_err(serde::de::Error::custom)
    }
}

impl DeadLetter {
    /// A dead letter for refused input, stamped now; `data` is shared, not copied.
    pub fn new(
        reason: impl Into<String>,
        topic: &str,
        record_index: Option<u32>,
        data: Bytes,
    ) -> Self {
        Self {
            id: 0,
            time: clock::now_rfc3339(),
            reason: reason.into(),
            topic: topic.to_owned(),
            record_index,
            partition_key: None,
            explicit_hash_key: None,
            data,
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
            ..Self::new(reason, topic, None, Bytes::copy_from_slice(data))
        }
    }

    /// The bytes it takes in memory and in the store, roughly.
    pub fn size(&self) -> usize {
        self.data.len() + self.reason.len() + self.topic.len() + 64
    }

    /// The store's value: the details as JSON, then the raw data.
    fn encode(&self) -> Vec<u8> {
        let details = serde_json::to_vec(&Details {
            time: self.time.clone(),
            reason: self.reason.clone(),
            topic: self.topic.clone(),
            record_index: self.record_index,
            partition_key: self.partition_key.clone(),
            explicit_hash_key: self.explicit_hash_key.clone(),
        })
        .expect("dead-letter details serialize");
        let len = u32::try_from(details.len()).expect("details are small");
        let mut value = Vec::with_capacity(5 + details.len() + self.data.len());
        value.push(BINARY_ENTRY);
        value.extend_from_slice(&len.to_be_bytes());
        value.extend_from_slice(&details);
        value.extend_from_slice(&self.data);
        value
    }

    /// Reads a stored value (this version's, or an earlier version's JSON).
    fn decode(id: u64, value: &[u8]) -> Result<Self, String> {
        if value.first() == Some(&b'{') {
            let mut letter: DeadLetter =
                serde_json::from_slice(value).map_err(|e| e.to_string())?;
            letter.id = id;
            return Ok(letter);
        }
        let rest = match value.split_first() {
            Some((&BINARY_ENTRY, rest)) => rest,
            _ => return Err("unknown entry format".into()),
        };
        let (len, rest) = rest.split_at_checked(4).ok_or("truncated entry")?;
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let (details, data) = rest.split_at_checked(len).ok_or("truncated entry")?;
        let details: Details = serde_json::from_slice(details).map_err(|e| e.to_string())?;
        Ok(Self {
            id,
            time: details.time,
            reason: details.reason,
            topic: details.topic,
            record_index: details.record_index,
            partition_key: details.partition_key,
            explicit_hash_key: details.explicit_hash_key,
            data: Bytes::copy_from_slice(data),
        })
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
        for letter in letters {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            batch.insert(&self.keyspace, store::key(id), letter.encode());
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
        DeadLetter::decode(id, value).map_err(|detail| StoreError::Corrupt {
            keyspace: format!("{:?}", self.keyspace.name()),
            seq: id,
            detail,
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
                DeadLetter::new(
                    "bad version",
                    "/devices/1/bulkData/x",
                    None,
                    Bytes::from_static(b"\x01\x02"),
                ),
                DeadLetter::new(
                    "too large",
                    "/devices/1/bulkData/x",
                    Some(3),
                    Bytes::from_static(b"abc"),
                ),
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
        assert_eq!(&all[0].data[..], b"\x01\x02");
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
            .append(vec![DeadLetter::new("later", "/t", None, Bytes::new())])
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

    #[test]
    fn entries_of_earlier_versions_still_read_and_the_wire_form_is_base64() {
        let letter = DeadLetter::for_record("why", "/devices/1/event", "1", Some("42"), b"\x00{}");
        let wire = serde_json::to_value(&letter).unwrap();
        assert_eq!(wire["data_base64"], "AHt9");
        let old = serde_json::to_vec(&letter).unwrap();
        assert_eq!(DeadLetter::decode(9, &old).unwrap().data, letter.data);
        let new = DeadLetter::decode(9, &letter.encode()).unwrap();
        assert_eq!(new, DeadLetter { id: 9, ..letter });
        assert!(DeadLetter::decode(1, b"\x02\x00").is_err());
    }
}
