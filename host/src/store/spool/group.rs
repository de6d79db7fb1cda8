//! How a group of records and its index entry are laid out in the store.
//!
//! A group is every record one commit spooled for one module, with
//! consecutive sequence numbers from its key. Its value (version 3):
//! the record count (u32), when ksm received the first record's message
//! (u64, Unix milliseconds; version 2 has no such field), then per record a flags byte (bit 0: has an
//! explicit hash key), the partition key, the explicit hash key if any and
//! the topic (each a u16 length and UTF-8), the 128-bit hash key (16 bytes)
//! and the data (a u32 length and the bytes); integers are little-endian.
//!
//! Its index entry (version 1) says, without reading the group: the record
//! count (u32), their bytes (u64, data plus partition keys), how many of
//! them are settled (u32) and their bytes (u64), then, once any is settled,
//! a bitmap of the settled records (bit `i % 8` of byte `i / 8`).

use std::sync::Arc;

use bytes::Bytes;

use super::SpoolRecord;

const GROUP_VERSION: u8 = 3;
/// Groups written before receive times were kept.
const GROUP_VERSION_WITHOUT_TIMES: u8 = 2;
const INDEX_VERSION: u8 = 1;
const HAS_EXPLICIT_HASH_KEY: u8 = 1;

/// Encodes records (whose seqs are consecutive) as a group value.
pub fn encode(records: &[SpoolRecord]) -> Vec<u8> {
    let len: usize = records
        .iter()
        .map(|r| {
            let hash_key = r.explicit_hash_key.as_deref().map_or(0, |k| 2 + k.len());
            1 + 2 + r.partition_key.len() + hash_key + 2 + r.topic.len() + 16 + 4 + r.data.len()
        })
        .sum();
    let mut out = Vec::with_capacity(13 + len);
    out.push(GROUP_VERSION);
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    let received_ms = records.first().map_or(0, |r| r.received_ms);
    out.extend_from_slice(&received_ms.to_le_bytes());
    for record in records {
        let flags = if record.explicit_hash_key.is_some() {
            HAS_EXPLICIT_HASH_KEY
        } else {
            0
        };
        out.push(flags);
        put_text(&mut out, &record.partition_key);
        if let Some(key) = &record.explicit_hash_key {
            put_text(&mut out, key);
        }
        put_text(&mut out, &record.topic);
        out.extend_from_slice(&record.hash_key.to_le_bytes());
        out.extend_from_slice(&(record.data.len() as u32).to_le_bytes());
        out.extend_from_slice(&record.data);
    }
    out
}

/// Texts are at most 256 characters (keys) or a topic the broker took;
/// both fit a u16 length.
fn put_text(out: &mut Vec<u8>, text: &str) {
    let bytes = &text.as_bytes()[..text.len().min(usize::from(u16::MAX))];
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Reads a group value back into `records` (emptied first): its records
/// from `first_seq` on, but those that `settled` marks; their data shares
/// `value`. On an error `records` holds a part of the group.
pub fn decode_into(
    first_seq: u64,
    value: Bytes,
    settled: Option<&[u8]>,
    records: &mut Vec<SpoolRecord>,
) -> Result<(), String> {
    records.clear();
    let mut reader = Reader {
        value: &value,
        at: 0,
    };
    let version = reader.take(1)?[0];
    if version != GROUP_VERSION && version != GROUP_VERSION_WITHOUT_TIMES {
        return Err(format!("unknown group version {version}"));
    }
    let count = reader.u32()?;
    let received_ms = if version == GROUP_VERSION {
        u64::from_le_bytes(reader.take(8)?.try_into().map_err(|_| "receive time")?)
    } else {
        0
    };
    records.reserve(count as usize);
    let mut topic: Option<Arc<str>> = None;
    for index in 0..count {
        let flags = reader.take(1)?[0];
        let partition_key = reader.text()?;
        let explicit_hash_key = if flags & HAS_EXPLICIT_HASH_KEY != 0 {
            Some(reader.text()?)
        } else {
            None
        };
        let topic_text = reader.text()?;
        let hash_key = u128::from_le_bytes(reader.take(16)?.try_into().map_err(|_| "hash key")?);
        let data_len = reader.u32()? as usize;
        let start = reader.at;
        reader.take(data_len)?;
        if settled.is_some_and(|bits| is_set(bits, index as usize)) {
            continue;
        }
        // Records of one message share their topic: keep one copy of it.
        let topic = match &topic {
            Some(shared) if **shared == *topic_text => shared.clone(),
            _ => topic.insert(topic_text.into()).clone(),
        };
        records.push(SpoolRecord {
            seq: first_seq + u64::from(index),
            size: data_len + partition_key.len(),
            partition_key: partition_key.into(),
            explicit_hash_key: explicit_hash_key.map(Into::into),
            hash_key,
            topic,
            data: value.slice(start..start + data_len),
            received_ms,
        });
    }
    if reader.at != value.len() {
        return Err("trailing bytes after the last record".into());
    }
    Ok(())
}

struct Reader<'a> {
    value: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.value.len());
        let end = end.ok_or("truncated group")?;
        let part = &self.value[self.at..end];
        self.at = end;
        Ok(part)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| "u32")?,
        ))
    }

    fn text(&mut self) -> Result<&'a str, String> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().map_err(|_| "u16")?);
        std::str::from_utf8(self.take(usize::from(len))?).map_err(|e| e.to_string())
    }
}

/// Whether bit `index` of `bits` is set.
pub fn is_set(bits: &[u8], index: usize) -> bool {
    bits.get(index / 8)
        .is_some_and(|byte| byte & (1 << (index % 8)) != 0)
}

/// A group's index entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// Records in the group.
    pub count: u32,
    /// Their bytes, data plus partition keys.
    pub bytes: u64,
    /// Records settled (accepted, or kept as dead letters).
    pub settled_count: u32,
    /// Their bytes.
    pub settled_bytes: u64,
    /// Which are settled; empty until one is.
    pub settled: Vec<u8>,
}

impl IndexEntry {
    /// The entry of a group just spooled.
    pub fn new(count: u32, bytes: u64) -> Self {
        Self {
            count,
            bytes,
            settled_count: 0,
            settled_bytes: 0,
            settled: Vec::new(),
        }
    }

    /// Marks record `index` (of `size` bytes) settled; false if it already was.
    pub fn settle(&mut self, index: usize, size: usize) -> bool {
        if index >= self.count as usize {
            return false;
        }
        if self.settled.is_empty() {
            self.settled = vec![0; (self.count as usize).div_ceil(8)];
        }
        let Some(byte) = self.settled.get_mut(index / 8) else {
            return false;
        };
        let bit = 1 << (index % 8);
        if *byte & bit != 0 {
            return false;
        }
        *byte |= bit;
        self.settled_count += 1;
        self.settled_bytes += size as u64;
        true
    }

    /// True once every record is settled.
    pub fn is_settled(&self) -> bool {
        self.settled_count >= self.count
    }

    /// Records not yet settled, and their bytes.
    pub fn unsettled(&self) -> (u64, u64) {
        (
            u64::from(self.count - self.settled_count.min(self.count)),
            self.bytes.saturating_sub(self.settled_bytes),
        )
    }

    /// The bitmap of settled records, if any is.
    pub fn settled_bits(&self) -> Option<&[u8]> {
        (!self.settled.is_empty()).then_some(&self.settled[..])
    }

    /// The stored form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(25 + self.settled.len());
        out.push(INDEX_VERSION);
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&self.bytes.to_le_bytes());
        out.extend_from_slice(&self.settled_count.to_le_bytes());
        out.extend_from_slice(&self.settled_bytes.to_le_bytes());
        out.extend_from_slice(&self.settled);
        out
    }

    /// Reads a stored entry.
    pub fn decode(value: &[u8]) -> Result<Self, String> {
        let mut reader = Reader { value, at: 0 };
        let version = reader.take(1)?[0];
        if version != INDEX_VERSION {
            return Err(format!("unknown index version {version}"));
        }
        let count = reader.u32()?;
        let bytes = u64::from_le_bytes(reader.take(8)?.try_into().map_err(|_| "u64")?);
        let settled_count = reader.u32()?;
        let settled_bytes = u64::from_le_bytes(reader.take(8)?.try_into().map_err(|_| "u64")?);
        let settled = value[reader.at..].to_vec();
        if !settled.is_empty() && settled.len() != (count as usize).div_ceil(8) {
            return Err("settled bitmap of the wrong length".into());
        }
        Ok(Self {
            count,
            bytes,
            settled_count,
            settled_bytes,
            settled,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, key: &str, hash_key: Option<&str>, data: &'static [u8]) -> SpoolRecord {
        let mut record = SpoolRecord::new(
            Bytes::from_static(data),
            key,
            hash_key,
            "/devices/1001/bulkData/x".into(),
        );
        record.seq = seq;
        record
    }

    fn decode(
        first_seq: u64,
        value: Bytes,
        settled: Option<&[u8]>,
    ) -> Result<Vec<SpoolRecord>, String> {
        let mut records = vec![record(1, "stale", None, b"")];
        decode_into(first_seq, value, settled, &mut records)?;
        Ok(records)
    }

    #[test]
    fn groups_round_trip_and_skip_settled_records() {
        let records = vec![
            record(7, "1001", None, b"\x00one"),
            record(8, "1001", Some("42"), b""),
            record(9, &"k".repeat(256), None, b"three"),
        ];
        let value = Bytes::from(encode(&records));
        let decoded = decode(7, value.clone(), None).unwrap();
        assert_eq!(decoded.len(), 3);
        for (a, b) in records.iter().zip(&decoded) {
            assert_eq!(a.seq, b.seq);
            assert_eq!(a.partition_key, b.partition_key);
            assert_eq!(a.explicit_hash_key, b.explicit_hash_key);
            assert_eq!(a.hash_key, b.hash_key);
            assert_eq!(a.topic, b.topic);
            assert_eq!(a.size, b.size);
            assert_eq!(a.data, b.data);
        }
        assert!(
            Arc::ptr_eq(&decoded[0].topic, &decoded[2].topic),
            "one topic"
        );
        let mut index = IndexEntry::new(3, 100);
        assert!(index.settle(1, 4));
        assert!(!index.settle(1, 4), "once");
        let left = decode(7, value, index.settled_bits()).unwrap();
        assert_eq!(left.iter().map(|r| r.seq).collect::<Vec<_>>(), [7, 9]);
    }

    #[test]
    fn a_group_keeps_its_receive_time_and_older_groups_read_without_one() {
        let mut first = record(3, "1001", None, b"abc");
        first.received_ms = 1_764_000_000_123;
        let mut second = record(4, "1001", None, b"de");
        second.received_ms = 1_764_000_000_456;
        let value = encode(&[first, second]);
        let decoded = decode(3, Bytes::from(value.clone()), None).unwrap();
        assert!(
            decoded.iter().all(|r| r.received_ms == 1_764_000_000_123),
            "the group's first record's time"
        );
        // The same group as version 2 wrote it: no receive time after the count.
        let mut older = vec![GROUP_VERSION_WITHOUT_TIMES];
        older.extend_from_slice(&value[1..5]);
        older.extend_from_slice(&value[13..]);
        let decoded = decode(3, Bytes::from(older), None).unwrap();
        assert_eq!(decoded.len(), 2);
        assert_eq!(decoded[1].data, Bytes::from_static(b"de"));
        assert!(decoded.iter().all(|r| r.received_ms == 0), "unknown");
    }

    #[test]
    fn index_entries_round_trip_and_count_what_is_left() {
        let mut index = IndexEntry::new(10, 1000);
        assert_eq!(IndexEntry::decode(&index.encode()).unwrap(), index);
        index.settle(0, 100);
        index.settle(9, 150);
        assert_eq!(IndexEntry::decode(&index.encode()).unwrap(), index);
        assert_eq!(index.unsettled(), (8, 750));
        assert!(!index.is_settled());
        assert!(!index.settle(10, 1), "out of range");
    }

    #[test]
    fn corrupt_values_are_reported() {
        let value = encode(&[record(1, "a", None, b"data")]);
        for cut in 0..value.len() {
            let part = Bytes::copy_from_slice(&value[..cut]);
            assert!(decode(1, part, None).is_err(), "cut at {cut}");
        }
        let mut longer = value.clone();
        longer.push(0);
        assert!(decode(1, Bytes::from(longer), None).is_err());
        assert!(IndexEntry::decode(b"\x09").is_err());
        assert!(IndexEntry::decode(&[1; 3]).is_err());
    }
}
