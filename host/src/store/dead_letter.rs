//! Dead letters: data ksm refused, kept in the store with the reason, so
//! nothing acknowledged is ever silently dropped. They survive restarts and
//! can be listed, inspected, replayed and purged (admin API and
//! `ksm dead-letters`).
//!
//! Two kinds are kept: input the guest refused (a whole message, or one bulk
//! record with its index), and records Kinesis refused (with their
//! partition key). Replaying the first kind runs it through the module's
//! guest again; replaying the second puts the record back in the spool.
//!
//! Each dead letter is an entry of the module's `{module}.dead` keyspace.
//! Data of up to [`INLINE_DATA_MAX_BYTES`] is stored in the entry; larger
//! data (a device may send 16 MiB) is kept in a file of its own,
//! `{storage.dir}/dead-letters/{module}/{id:020}`, and the entry holds its
//! length, so big values never pass through the store's memtables, journal
//! and compactions. The file is written and synced (with its directory)
//! before the batch that adds the entry is committed; a crash in between
//! leaves a file no entry names, which the next [`DeadLetterStore::open`]
//! removes. Reads are bounded: a listing page carries at most a data budget
//! ([`PAGE_DATA_BYTES`]), a shown letter's data is read a piece at a time,
//! and replays read the letters a few at a time.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use fjall::{Keyspace, OwnedWriteBatch as WriteBatch};
use serde::{Deserialize, Serialize};

use crate::bindings::bounded;
use crate::clock;
use crate::store::{self, Store, StoreError};

/// Data larger than this is kept in a file of its own rather than in the
/// store's entry.
pub const INLINE_DATA_MAX_BYTES: usize = 64 * 1024;
/// Most data bytes (with the letters' details) one listing page carries; a
/// letter whose data would not fit is listed without it.
pub const PAGE_DATA_BYTES: usize = 4 * 1024 * 1024;
/// Data read and base64-encoded at a time when a letter is shown: a
/// multiple of 3, so the encoded pieces join up into one base64 text.
const READ_CHUNK: usize = 48 * 1024;

/// First byte of an entry holding its JSON details followed by its raw
/// data. Entries of the first version are JSON objects and start with `{`.
const INLINE_ENTRY: u8 = 2;
/// First byte of an entry holding its JSON details followed by the length
/// (`u64`, big-endian) of its data, which is in the letter's own file.
const FILE_ENTRY: u8 = 3;

/// One refused message or record. Its data is a [`Bytes`] view: the dead
/// letters that several modules keep of one message share its payload.
/// (It deserializes from the JSON entries of the store's first version.)
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
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
    #[serde(default)]
    pub record_index: Option<u32>,
    /// For a record the guest produced: its partition key.
    #[serde(default)]
    pub partition_key: Option<String>,
    /// For a record the guest produced: its explicit hash key, if any.
    #[serde(default)]
    pub explicit_hash_key: Option<String>,
    /// The refused bytes (the whole payload, or the one record).
    #[serde(rename = "data_base64", deserialize_with = "base64_data::deserialize")]
    pub data: Bytes,
}

/// What is known of a dead letter besides its data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Details {
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
}

impl Details {
    fn of(letter: &DeadLetter) -> Self {
        Self {
            time: letter.time.clone(),
            reason: letter.reason.clone(),
            topic: letter.topic.clone(),
            record_index: letter.record_index,
            partition_key: letter.partition_key.clone(),
            explicit_hash_key: letter.explicit_hash_key.clone(),
        }
    }

    /// Roughly the bytes they take in a listing.
    fn size(&self) -> usize {
        let optional = |text: &Option<String>| text.as_ref().map_or(0, String::len);
        self.time.len()
            + self.reason.len()
            + self.topic.len()
            + optional(&self.partition_key)
            + optional(&self.explicit_hash_key)
            + 160
    }
}

/// A dead letter as the admin API answers it: its ID, details and data
/// size, and its data in base64 unless the listing page had no room for it
/// (then `data_omitted` is true and the letter is fetched alone).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedLetter {
    /// Its ID in the module's dead-letter store.
    pub id: u64,
    /// Its details.
    #[serde(flatten)]
    pub details: Details,
    /// How many bytes of data it holds.
    pub data_bytes: u64,
    /// The data, unless omitted; base64 on the wire.
    #[serde(
        rename = "data_base64",
        default,
        skip_serializing_if = "Option::is_none",
        with = "base64_data::optional"
    )]
    pub data: Option<Bytes>,
    /// True when the data was left out of a listing page.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub data_omitted: bool,
}

/// Data as a base64 string on the wire.
mod base64_data {
    use super::{BASE64, Bytes};
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Bytes, D::Error> {
        decode(&String::deserialize(deserializer)?)
    }

    fn decode<E: serde::de::Error>(text: &str) -> Result<Bytes, E> {
        BASE64.decode(text).map(Bytes::from).map_err(E::custom)
    }

    /// An optional `data_base64`.
    pub mod optional {
        use super::{BASE64, Bytes};
        use base64::Engine as _;
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(
            data: &Option<Bytes>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            match data {
                Some(data) => serializer.serialize_str(&BASE64.encode(data)),
                None => serializer.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Bytes>, D::Error> {
            Option::<String>::deserialize(deserializer)?
                .map(|text| super::decode(&text))
                .transpose()
        }
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

    /// A dead letter for a record the guest produced but Kinesis refuses;
    /// its keys are the guest's, so they are kept cut ([`bounded`]).
    pub fn for_record(
        reason: impl Into<String>,
        topic: &str,
        partition_key: &str,
        explicit_hash_key: Option<&str>,
        data: Bytes,
    ) -> Self {
        Self {
            partition_key: Some(bounded(partition_key)),
            explicit_hash_key: explicit_hash_key.map(bounded),
            ..Self::new(reason, topic, None, data)
        }
    }

    /// The bytes it takes in memory and in the store, roughly.
    pub fn size(&self) -> usize {
        self.data.len() + self.reason.len() + self.topic.len() + 64
    }
}

/// Where a stored letter's data is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Data {
    /// In the entry (read with it).
    Inline(Bytes),
    /// In the letter's own file, of this many bytes.
    File(u64),
}

/// A stored dead letter, with its data if the entry holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    id: u64,
    details: Details,
    data: Data,
}

impl Entry {
    fn data_bytes(&self) -> u64 {
        match &self.data {
            Data::Inline(data) => data.len() as u64,
            Data::File(len) => *len,
        }
    }

    /// The letter as the admin API shows it.
    fn listed(self, data: Option<Bytes>) -> ListedLetter {
        ListedLetter {
            id: self.id,
            data_bytes: self.data_bytes(),
            data_omitted: data.is_none(),
            details: self.details,
            data,
        }
    }
}

/// The store's value of a letter whose data is in the entry.
fn encode_inline(details: &Details, data: &[u8]) -> Vec<u8> {
    let mut value = encode_head(INLINE_ENTRY, details, data.len());
    value.extend_from_slice(data);
    value
}

/// The store's value of a letter whose `len` bytes of data are in its file.
fn encode_file(details: &Details, len: usize) -> Vec<u8> {
    let mut value = encode_head(FILE_ENTRY, details, 8);
    value.extend_from_slice(&(len as u64).to_be_bytes());
    value
}

/// The version byte, the details' length and the details, with room for `more`.
fn encode_head(version: u8, details: &Details, more: usize) -> Vec<u8> {
    let details = serde_json::to_vec(details).expect("dead-letter details serialize");
    let len = u32::try_from(details.len()).expect("details are small");
    let mut value = Vec::with_capacity(5 + details.len() + more);
    value.push(version);
    value.extend_from_slice(&len.to_be_bytes());
    value.extend_from_slice(&details);
    value
}

/// Reads a stored value: this version's (data inline or in a file) or an
/// earlier version's JSON.
fn decode(id: u64, value: &[u8]) -> Result<Entry, String> {
    let (&version, rest) = value.split_first().ok_or("empty entry")?;
    if version == b'{' {
        let letter: DeadLetter = serde_json::from_slice(value).map_err(|e| e.to_string())?;
        return Ok(Entry {
            id,
            details: Details::of(&letter),
            data: Data::Inline(letter.data),
        });
    }
    if version != INLINE_ENTRY && version != FILE_ENTRY {
        return Err(format!("unknown entry version {version}"));
    }
    let (len, rest) = rest.split_at_checked(4).ok_or("truncated entry")?;
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let (details, rest) = rest.split_at_checked(len).ok_or("truncated entry")?;
    let details: Details = serde_json::from_slice(details).map_err(|e| e.to_string())?;
    let data = if version == INLINE_ENTRY {
        Data::Inline(Bytes::copy_from_slice(rest))
    } else {
        let len: [u8; 8] = rest.try_into().map_err(|_| "truncated entry")?;
        Data::File(u64::from_be_bytes(len))
    };
    Ok(Entry { id, details, data })
}

/// The data files [`DeadLetterStore::stage`] wrote for a batch that is not
/// committed yet. Dropping it removes them (the batch failed, so no entry
/// names them); [`StagedFiles::committed`] keeps them.
#[derive(Debug, Default)]
#[must_use = "dropping it removes the files: call `committed` once the batch is committed"]
pub struct StagedFiles {
    paths: Vec<PathBuf>,
}

impl StagedFiles {
    /// The batch naming the files is committed: keep them.
    pub fn committed(mut self) {
        self.paths.clear();
    }
}

impl Drop for StagedFiles {
    fn drop(&mut self) {
        for path in &self.paths {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A dead letter waiting to be replayed: its details, and its data or where
/// it is; [`DeadLetterStore::load`] reads it whole.
#[derive(Debug)]
pub struct Pending {
    entry: Entry,
}

impl Pending {
    /// Its ID.
    pub fn id(&self) -> u64 {
        self.entry.id
    }

    /// How many bytes of data it holds.
    pub fn data_bytes(&self) -> u64 {
        self.entry.data_bytes()
    }
}

/// One module's dead letters.
pub struct DeadLetterStore {
    store: Store,
    keyspace: Keyspace,
    /// Where the data files are: `{storage.dir}/dead-letters/{module}`.
    dir: PathBuf,
    next_id: AtomicU64,
}

impl std::fmt::Debug for DeadLetterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetterStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl DeadLetterStore {
    /// Opens the dead letters of a module, and removes the data files no
    /// entry names (written before a batch a crash kept from committing).
    pub fn open(store: &Store, module_id: &str) -> Result<Self, StoreError> {
        let keyspace = store.keyspace(module_id, "dead")?;
        let next_id = store::next_seq(&keyspace)?;
        let dir = store.dir().join("dead-letters").join(module_id);
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir).map_err(file_error(&dir))?;
            // The new directories must survive a power loss before files in them do.
            for made in dir.ancestors().skip(1).take(2) {
                sync_dir(made)?;
            }
        }
        let letters = Self {
            store: store.clone(),
            keyspace,
            dir,
            next_id: AtomicU64::new(next_id),
        };
        let removed = letters.remove_orphans()?;
        if removed > 0 {
            tracing::warn!(
                module = module_id,
                removed,
                "removed data files of dead letters whose store entries were never committed"
            );
        }
        Ok(letters)
    }

    /// Removes the data files no entry names; returns how many.
    fn remove_orphans(&self) -> Result<usize, StoreError> {
        let mut removed = 0;
        for file in std::fs::read_dir(&self.dir).map_err(file_error(&self.dir))? {
            let file = file.map_err(file_error(&self.dir))?;
            let name = file.file_name();
            let Some(id) = name
                .to_str()
                .filter(|name| name.len() == 20)
                .and_then(|name| name.parse::<u64>().ok())
            else {
                continue;
            };
            let named = self
                .keyspace
                .get(store::key(id))?
                .is_some_and(|value| value.first() == Some(&FILE_ENTRY));
            if !named {
                let path = file.path();
                std::fs::remove_file(&path).map_err(file_error(&path))?;
                removed += 1;
            }
        }
        if removed > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }

    /// The data file of letter `id`.
    fn file_of(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:020}"))
    }

    /// Adds dead letters to a write batch, giving each its ID. Data larger
    /// than [`INLINE_DATA_MAX_BYTES`] is written to the letter's own file and
    /// synced first; commit the batch, then call
    /// [`StagedFiles::committed`] (dropping the files if it fails). On an
    /// error the batch must not be committed.
    pub fn stage(
        &self,
        batch: &mut WriteBatch,
        letters: Vec<DeadLetter>,
    ) -> Result<StagedFiles, StoreError> {
        let mut files = StagedFiles::default();
        for letter in letters {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let details = Details::of(&letter);
            let value = if letter.data.len() > INLINE_DATA_MAX_BYTES {
                let path = self.file_of(id);
                // Listed before it is written, so a half-written file goes too.
                files.paths.push(path.clone());
                write_synced(&path, &letter.data)?;
                encode_file(&details, letter.data.len())
            } else {
                encode_inline(&details, &letter.data)
            };
            batch.insert(&self.keyspace, store::key(id), value);
        }
        if !files.paths.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(files)
    }

    /// Up to `limit` dead letters with IDs above `after`, oldest first, for
    /// a listing page holding at most `budget` bytes of data and details
    /// (and always at least one letter). Each letter's data is included if
    /// it fits what is left of the budget; a letter whose data cannot fit
    /// even an empty page is listed without it; a letter that would fit an
    /// empty page but not this one ends the page, to lead the next. A
    /// letter whose data file cannot be read is listed without its data.
    pub fn page(
        &self,
        after: u64,
        limit: usize,
        budget: usize,
    ) -> Result<Vec<ListedLetter>, StoreError> {
        let mut page = Vec::new();
        let mut used = 0usize;
        for guard in self.keyspace.range(store::key(after.saturating_add(1))..) {
            if page.len() >= limit || used >= budget {
                break;
            }
            let (key, value) = guard.into_inner()?;
            let entry = self.decode(store::seq_of(&key).unwrap_or_default(), &value)?;
            drop(value);
            let details = entry.details.size();
            let len = usize::try_from(entry.data_bytes()).unwrap_or(usize::MAX);
            let fits_alone = details.saturating_add(len) <= budget;
            let data = if used + details.saturating_add(len) <= budget {
                match self.read_data(&entry) {
                    Ok(Some(data)) => Some(data),
                    // Deleted since it was read.
                    Ok(None) => continue,
                    // Listed without it; fetching it alone says what is wrong.
                    Err(error) => {
                        tracing::warn!("dead letter {}: {error}", entry.id);
                        None
                    }
                }
            } else if !fits_alone {
                None
            } else {
                break;
            };
            used += details + data.as_ref().map_or(0, Bytes::len);
            page.push(entry.listed(data));
        }
        Ok(page)
    }

    /// The dead letter `id` as the admin API shows it, data included, as a
    /// [`Shown`] that yields its JSON text a piece at a time: data in a file
    /// is read and encoded 48 KiB at a time, so showing a letter costs a
    /// bounded amount of memory whatever its size.
    pub fn show(&self, id: u64) -> Result<Option<Shown>, StoreError> {
        let Some(value) = self.keyspace.get(store::key(id))? else {
            return Ok(None);
        };
        let entry = self.decode(id, &value)?;
        drop(value);
        let len = entry.data_bytes();
        // The file is opened, and its size checked, before anything is sent.
        let source = match &entry.data {
            Data::Inline(data) => Source::Inline(data.clone()),
            Data::File(_) => match self.open_data(&entry)? {
                Some((file, path)) => Source::File {
                    file,
                    path,
                    left: len,
                },
                None => return Ok(None),
            },
        };
        let head = ListedLetter {
            data_omitted: false,
            ..entry.listed(None)
        };
        let mut json = serde_json::to_vec(&head).expect("dead-letter details serialize");
        // Reopened to add `data_base64`, last.
        debug_assert_eq!(json.last(), Some(&b'}'));
        json.pop();
        json.extend_from_slice(b",\"data_base64\":\"");
        Ok(Some(Shown {
            head: Some(Bytes::from(json)),
            source: Some(source),
        }))
    }

    /// Dead letters to replay: up to `max_letters` with IDs in
    /// `after + 1 ..= last`, oldest first, holding at most `max_bytes` of
    /// data in memory (data in files is not read yet), and at least one.
    pub fn pending(
        &self,
        after: u64,
        last: u64,
        max_letters: usize,
        max_bytes: usize,
    ) -> Result<Vec<Pending>, StoreError> {
        let mut pending = Vec::new();
        let mut held = 0;
        if after >= last {
            return Ok(pending);
        }
        for guard in self
            .keyspace
            .range(store::key(after + 1)..=store::key(last))
        {
            if pending.len() >= max_letters || (held >= max_bytes && !pending.is_empty()) {
                break;
            }
            let (key, value) = guard.into_inner()?;
            let entry = self.decode(store::seq_of(&key).unwrap_or_default(), &value)?;
            if let Data::Inline(data) = &entry.data {
                held += data.len();
            }
            pending.push(Pending { entry });
        }
        Ok(pending)
    }

    /// A pending letter with its data read; `None` if it was deleted since.
    pub fn load(&self, pending: Pending) -> Result<Option<DeadLetter>, StoreError> {
        let Some(data) = self.read_data(&pending.entry)? else {
            return Ok(None);
        };
        let Entry { id, details, .. } = pending.entry;
        Ok(Some(DeadLetter {
            id,
            time: details.time,
            reason: details.reason,
            topic: details.topic,
            record_index: details.record_index,
            partition_key: details.partition_key,
            explicit_hash_key: details.explicit_hash_key,
            data,
        }))
    }

    /// The highest ID given so far (0 if none).
    pub fn last_id(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed).saturating_sub(1)
    }

    /// Whether dead letter `id` is kept.
    pub fn contains(&self, id: u64) -> Result<bool, StoreError> {
        Ok(self.keyspace.contains_key(store::key(id))?)
    }

    /// How many dead letters are kept with IDs up to `last`.
    pub fn count_through(&self, last: u64) -> Result<usize, StoreError> {
        let mut count = 0;
        for guard in self.keyspace.range(..=store::key(last)) {
            guard.key()?;
            count += 1;
        }
        Ok(count)
    }

    /// Deletes the given dead letters (all of them if `ids` is `None`) and
    /// then their data files; returns how many there were.
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
        // Only now: a file left by a crash here is removed at the next open.
        for id in &ids {
            let path = self.file_of(*id);
            match std::fs::remove_file(&path) {
                Err(error) if error.kind() != ErrorKind::NotFound => {
                    tracing::warn!(
                        "cannot remove {}, the data of a purged dead letter: {error}",
                        path.display()
                    );
                }
                _ => {}
            }
        }
        Ok(ids.len())
    }

    /// A letter's data, from the entry or its file; `None` if the letter was
    /// deleted since it was read.
    fn read_data(&self, entry: &Entry) -> Result<Option<Bytes>, StoreError> {
        if let Data::Inline(data) = &entry.data {
            return Ok(Some(data.clone()));
        }
        let Some((mut file, path)) = self.open_data(entry)? else {
            return Ok(None);
        };
        let len = usize::try_from(entry.data_bytes()).expect("the data's size was checked");
        let mut data = Vec::with_capacity(len);
        (&mut file)
            .take(len as u64 + 1)
            .read_to_end(&mut data)
            .map_err(file_error(&path))?;
        if data.len() != len {
            let detail = format!("its data file changed size ({})", data.len());
            return Err(self.corrupt(entry.id, detail));
        }
        Ok(Some(Bytes::from(data)))
    }

    /// Opens the data file of a letter whose data is in a file, and checks
    /// that it holds as many bytes as the entry says; `None` if the letter
    /// was deleted since it was read.
    fn open_data(&self, entry: &Entry) -> Result<Option<(File, PathBuf)>, StoreError> {
        let path = self.file_of(entry.id);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == ErrorKind::NotFound && !self.contains(entry.id)? => {
                return Ok(None);
            }
            Err(error) => return Err(file_error(&path)(error)),
        };
        let size = file.metadata().map_err(file_error(&path))?.len();
        if size != entry.data_bytes() {
            let detail = format!(
                "its data file holds {size} bytes, not {}",
                entry.data_bytes()
            );
            return Err(self.corrupt(entry.id, detail));
        }
        Ok(Some((file, path)))
    }

    fn decode(&self, id: u64, value: &[u8]) -> Result<Entry, StoreError> {
        decode(id, value).map_err(|detail| self.corrupt(id, detail))
    }

    fn corrupt(&self, id: u64, detail: String) -> StoreError {
        StoreError::Corrupt {
            keyspace: format!("{:?}", self.keyspace.name()),
            seq: id,
            detail,
        }
    }
}

/// Appends the base64 of `data` to `out`.
/// Where a shown letter's data comes from.
enum Source {
    Inline(Bytes),
    File {
        file: File,
        path: PathBuf,
        /// Bytes still to read.
        left: u64,
    },
}

/// A dead letter's JSON text, a piece at a time (see [`DeadLetterStore::show`]).
pub struct Shown {
    head: Option<Bytes>,
    source: Option<Source>,
}

impl std::fmt::Debug for Shown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shown").finish_non_exhaustive()
    }
}

impl Shown {
    /// The next piece of the text, `None` after the last. Reads from a file
    /// block: call it off the async threads.
    pub fn next_piece(&mut self) -> Result<Option<Bytes>, StoreError> {
        if let Some(head) = self.head.take() {
            return Ok(Some(head));
        }
        let Some(source) = &mut self.source else {
            return Ok(None);
        };
        let mut piece = Vec::new();
        match source {
            Source::Inline(data) => {
                encode_into(&mut piece, data);
                self.source = None;
                piece.extend_from_slice(b"\"}");
            }
            Source::File { file, path, left } => {
                // A multiple of 3, so the pieces' base64 joins up.
                let want = usize::try_from((*left).min(READ_CHUNK as u64)).unwrap_or(READ_CHUNK);
                let mut chunk = vec![0; want];
                let read = read_full(file, &mut chunk).map_err(file_error(path))?;
                if read != want {
                    return Err(StoreError::File {
                        path: path.clone(),
                        source: std::io::Error::other(format!(
                            "the data file ended {} bytes early",
                            *left - read as u64
                        )),
                    });
                }
                *left -= read as u64;
                encode_into(&mut piece, &chunk);
                if *left == 0 {
                    self.source = None;
                    piece.extend_from_slice(b"\"}");
                }
            }
        }
        Ok(Some(Bytes::from(piece)))
    }
}

fn encode_into(out: &mut Vec<u8>, data: &[u8]) {
    let start = out.len();
    let len = base64::encoded_len(data.len(), true).expect("a chunk's base64 fits in memory");
    out.resize(start + len, 0);
    BASE64
        .encode_slice(data, &mut out[start..])
        .expect("the buffer is sized for the base64");
}

/// Reads until `buf` is full or the file ends; returns how many bytes.
fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

/// Writes a new file (replacing any) and syncs it.
fn write_synced(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let write = || {
        let mut file = File::create(path)?;
        file.write_all(data)?;
        file.sync_all()
    };
    write().map_err(file_error(path))
}

/// Syncs a directory, so the names in it survive a power loss.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(file_error(dir))
}

fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::File {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh storage directory for one test.
    fn storage(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ksm-dl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// Stores letters and syncs them, as the committer does.
    fn append(store: &Store, letters: &DeadLetterStore, new: Vec<DeadLetter>) {
        let mut batch = store.batch();
        let files = letters.stage(&mut batch, new).unwrap();
        batch.commit().unwrap();
        files.committed();
        store.sync().unwrap();
    }

    fn letter(reason: &str, len: usize, fill: u8) -> DeadLetter {
        DeadLetter::new(
            reason,
            "/devices/1/event",
            None,
            Bytes::from(vec![fill; len]),
        )
    }

    /// The whole text `show` yields, piece by piece.
    fn text(letters: &DeadLetterStore, id: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(mut shown) = letters.show(id)? else {
            return Ok(None);
        };
        let mut text = Vec::new();
        while let Some(piece) = shown.next_piece()? {
            // At most the base64 of inline data (64 KiB) or of one chunk, plus a little.
            assert!(piece.len() <= 100 * 1024, "{}", piece.len());
            text.extend_from_slice(&piece);
        }
        Ok(Some(text))
    }

    fn shown(letters: &DeadLetterStore, id: u64) -> ListedLetter {
        serde_json::from_slice(&text(letters, id).unwrap().unwrap()).unwrap()
    }

    fn data_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.join("dead-letters/mod-a"))
            .unwrap()
            .map(|f| f.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn letters_survive_reopening_and_can_be_purged() {
        let dir = storage("reopen");
        let store = Store::open(&dir).unwrap();
        let letters = DeadLetterStore::open(&store, "mod-a").unwrap();
        append(
            &store,
            &letters,
            vec![
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
                DeadLetter::for_record(
                    "refused",
                    "/devices/1/event",
                    "1",
                    None,
                    Bytes::from_static(b"{}"),
                ),
            ],
        );
        drop(letters);
        drop(store);

        let store = Store::open(&dir).unwrap();
        let letters = DeadLetterStore::open(&store, "mod-a").unwrap();
        let all = letters.page(0, 100, PAGE_DATA_BYTES).unwrap();
        assert_eq!(all.iter().map(|l| l.id).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(all[0].details.reason, "bad version");
        assert_eq!(all[0].data.as_deref(), Some(&b"\x01\x02"[..]));
        assert_eq!(all[0].data_bytes, 2);
        assert_eq!(all[1].details.record_index, Some(3));
        assert_eq!(all[2].details.partition_key.as_deref(), Some("1"));
        assert_eq!(
            letters.page(1, 1, PAGE_DATA_BYTES).unwrap()[0].id,
            2,
            "paged after an ID"
        );
        assert_eq!(shown(&letters, 3).details.reason, "refused");
        assert!(letters.show(4).unwrap().is_none());

        assert_eq!(
            letters.purge(Some(&[2, 9])).unwrap(),
            1,
            "only kept IDs count"
        );
        assert_eq!(letters.count_through(u64::MAX).unwrap(), 2);
        append(&store, &letters, vec![letter("later", 0, 0)]);
        assert_eq!(
            shown(&letters, 4).details.reason,
            "later",
            "IDs are not reused"
        );
        assert_eq!(letters.purge(None).unwrap(), 3);
        assert!(letters.page(0, 10, PAGE_DATA_BYTES).unwrap().is_empty());
        drop(letters);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn large_data_is_kept_in_a_file_of_its_own_and_purged_with_its_letter() {
        let dir = storage("file");
        let store = Store::open(&dir).unwrap();
        let letters = DeadLetterStore::open(&store, "mod-a").unwrap();
        let big = letter("big", INLINE_DATA_MAX_BYTES + 1, b'b');
        let inline = letter("just fits", INLINE_DATA_MAX_BYTES, b'i');
        append(&store, &letters, vec![big.clone(), inline.clone()]);
        assert_eq!(data_files(&dir), [format!("{:020}", 1)], "only the big one");
        let file = std::fs::read(dir.join("dead-letters/mod-a/00000000000000000001")).unwrap();
        assert_eq!(file, big.data, "the file holds the raw data");
        let value = letters.keyspace.get(store::key(1)).unwrap().unwrap();
        assert_eq!(value[0], FILE_ENTRY);
        assert!(
            value.len() < 200,
            "the entry holds no data: {}",
            value.len()
        );
        assert_eq!(
            letters.keyspace.get(store::key(2)).unwrap().unwrap()[0],
            INLINE_ENTRY
        );

        drop(letters);
        drop(store);
        let store = Store::open(&dir).unwrap();
        let letters = DeadLetterStore::open(&store, "mod-a").unwrap();
        let first = shown(&letters, 1);
        assert_eq!(
            first.data.as_ref(),
            Some(&big.data),
            "shown whole after a restart"
        );
        assert_eq!(first.data_bytes, big.data.len() as u64);
        assert!(!first.data_omitted);
        assert_eq!(shown(&letters, 2).data.as_ref(), Some(&inline.data));
        let pending = letters.pending(0, 2, 64, usize::MAX).unwrap();
        assert_eq!(pending.iter().map(Pending::id).collect::<Vec<_>>(), [1, 2]);
        let loaded = letters.load(pending.into_iter().next().unwrap()).unwrap();
        assert_eq!(
            loaded.unwrap(),
            DeadLetter {
                id: 1,
                ..big.clone()
            }
        );

        // A data file that lost bytes: the letter is listed without its
        // data, and showing it says what is wrong.
        let path = dir.join("dead-letters/mod-a/00000000000000000001");
        std::fs::write(&path, &big.data[..1000]).unwrap();
        let listed = letters.page(0, 10, PAGE_DATA_BYTES).unwrap();
        assert!(listed[0].data_omitted && listed[0].data.is_none());
        assert_eq!(listed[1].data.as_ref(), Some(&inline.data));
        let error = text(&letters, 1).unwrap_err().to_string();
        assert!(error.contains("holds 1000 bytes"), "{error}");

        assert_eq!(letters.purge(Some(&[1])).unwrap(), 1);
        assert!(data_files(&dir).is_empty(), "purge removes the file");
        assert!(letters.show(1).unwrap().is_none());
        drop(letters);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_no_entry_names_are_removed_on_open_and_uncommitted_ones_at_once() {
        let dir = storage("orphans");
        let store = Store::open(&dir).unwrap();
        let letters = DeadLetterStore::open(&store, "mod-a").unwrap();
        append(&store, &letters, vec![letter("kept", 100_000, b'k')]);
        // A batch that is never committed: its file goes with it.
        let mut batch = store.batch();
        drop(
            letters
                .stage(&mut batch, vec![letter("lost", 100_000, b'l')])
                .unwrap(),
        );
        drop(batch);
        assert_eq!(data_files(&dir), [format!("{:020}", 1)]);
        // Files a crash left: one for an ID no entry has, one for an inline
        // letter's ID; names that are not IDs are left alone.
        append(&store, &letters, vec![letter("inline", 10, b's')]);
        let files = dir.join("dead-letters/mod-a");
        for name in [
            format!("{:020}", 7),
            format!("{:020}", 3),
            "notes.txt".into(),
        ] {
            std::fs::write(files.join(name), b"half written").unwrap();
        }
        drop(letters);
        drop(store);

        let store = Store::open(&dir).unwrap();
        let letters = DeadLetterStore::open(&store, "mod-a").unwrap();
        assert_eq!(data_files(&dir), [format!("{:020}", 1), "notes.txt".into()]);
        assert_eq!(shown(&letters, 1).data.unwrap().len(), 100_000);
        assert_eq!(&shown(&letters, 3).data.unwrap()[..], &[b's'; 10]);
        drop(letters);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pages_are_bounded_by_bytes_and_big_data_is_left_out() {
        let dir = storage("paging");
        let store = Store::open(&dir).unwrap();
        let letters = DeadLetterStore::open(&store, "mod-a").unwrap();
        let budget = 100_000;
        append(
            &store,
            &letters,
            vec![
                letter("1", 40_000, b'a'),
                letter("2", 40_000, b'b'),
                letter("3 ends a page", 40_000, b'c'),
                letter("4 never fits", 150_000, b'd'),
                letter("5", 10, b'e'),
                letter("6 fits an empty page", 90_000, b'f'),
            ],
        );
        let ids = |page: &[ListedLetter]| page.iter().map(|l| l.id).collect::<Vec<_>>();
        let first = letters.page(0, 100, budget).unwrap();
        assert_eq!(ids(&first), [1, 2], "the third does not fit after two");
        assert!(first.iter().all(|l| l.data.is_some() && !l.data_omitted));
        let second = letters.page(2, 100, budget).unwrap();
        assert_eq!(ids(&second), [3, 4, 5]);
        assert_eq!(second[0].data.as_ref().map(Bytes::len), Some(40_000));
        assert!(second[1].data.is_none() && second[1].data_omitted);
        assert_eq!(second[1].data_bytes, 150_000);
        assert_eq!(second[2].data.as_deref(), Some(&[b'e'; 10][..]));
        let third = letters.page(5, 100, budget).unwrap();
        assert_eq!(ids(&third), [6]);
        assert!(third[0].data.is_some());
        let alone = letters.page(3, 100, budget).unwrap();
        assert_eq!(ids(&alone)[0], 4, "a page holds at least one letter");
        assert_eq!(
            ids(&letters.page(0, 1, budget).unwrap()),
            [1],
            "and at most `limit`"
        );
        assert!(letters.page(6, 100, budget).unwrap().is_empty());

        let wire = serde_json::to_value(&second[1]).unwrap();
        assert_eq!(wire["data_omitted"], true);
        assert_eq!(wire["data_bytes"], 150_000);
        assert!(wire.get("data_base64").is_none(), "{wire}");
        assert_eq!(shown(&letters, 4).data.map(|d| d.len()), Some(150_000));

        let pending = letters.pending(0, 6, 64, 50_000).unwrap();
        assert_eq!(
            pending.iter().map(Pending::id).collect::<Vec<_>>(),
            [1, 2],
            "replays hold a bounded amount of data"
        );
        assert_eq!(letters.pending(0, 6, 3, usize::MAX).unwrap().len(), 3);
        assert_eq!(letters.pending(3, 5, 64, usize::MAX).unwrap().len(), 2);
        assert_eq!(letters.count_through(4).unwrap(), 4);
        drop(letters);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn entries_of_earlier_versions_still_read_and_the_wire_form_is_base64() {
        let letter = DeadLetter::for_record(
            "why",
            "/devices/1/event",
            "1",
            Some("42"),
            Bytes::from_static(b"\x00{}"),
        );
        let details = Details::of(&letter);
        // The first version: the letter as JSON, data in base64.
        let first = serde_json::json!({
            "time": letter.time,
            "reason": "why",
            "topic": "/devices/1/event",
            "partition_key": "1",
            "explicit_hash_key": "42",
            "data_base64": "AHt9",
        });
        let first = decode(9, &serde_json::to_vec(&first).unwrap()).unwrap();
        assert_eq!(first.details, details);
        assert_eq!(first.data, Data::Inline(letter.data.clone()));
        // The second: details, then the data inline; still written for small data.
        let second = decode(9, &encode_inline(&details, &letter.data)).unwrap();
        assert_eq!(second, first);
        // The third: details and the data's length; the data is in a file.
        let third = decode(9, &encode_file(&details, 3)).unwrap();
        assert_eq!(third.data, Data::File(3));
        assert!(decode(1, b"\x02\x00").is_err());
        assert!(decode(1, &encode_file(&details, 3)[..20]).is_err());
        assert!(decode(1, b"\x07").is_err());

        let wire = serde_json::to_value(second.listed(Some(letter.data.clone()))).unwrap();
        assert_eq!(wire["data_base64"], "AHt9");
        assert_eq!(wire["data_bytes"], 3);
        assert_eq!(wire["partition_key"], "1");
        assert!(wire.get("data_omitted").is_none());
        let back: ListedLetter = serde_json::from_value(wire).unwrap();
        assert_eq!(back.data, Some(letter.data));
    }
}
