//! The Kinesis Producer Library's aggregated record format: many user
//! records in one Kinesis record, which the KCL, Firehose and Lambda (with
//! the kinesis-aggregation library) read back as the user records.
//!
//! An aggregate is the magic bytes [`MAGIC`], an `AggregatedRecord` encoded
//! with protobuf (schema: `aggregated_record.proto` beside this file), and
//! the MD5 digest of those protobuf bytes. Its partition keys and explicit
//! hash keys are in tables that the records point into, so a key that many
//! records share is written once.
//!
//! [`Aggregate`] tracks the exact encoded size of an aggregate as records
//! join it, so the sink can fill one up to a byte limit without encoding it
//! twice; [`Aggregate::encode`] writes it; [`deaggregate`] reads one back.

use std::collections::HashMap;

use bytes::Bytes;
use md5::{Digest, Md5};
use prost::Message;
use prost::encoding::encoded_len_varint;

/// The four bytes every aggregate starts with.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
/// Length of the MD5 digest that ends an aggregate.
const DIGEST_BYTES: usize = 16;
/// Bytes of an aggregate besides its protobuf message.
pub const FRAMING_BYTES: usize = MAGIC.len() + DIGEST_BYTES;

/// An aggregate as protobuf sees it.
#[derive(Clone, PartialEq, Message)]
pub struct AggregatedRecord {
    /// The distinct partition keys of the records.
    #[prost(string, repeated, tag = "1")]
    pub partition_key_table: Vec<String>,
    /// The distinct explicit hash keys of the records that have one.
    #[prost(string, repeated, tag = "2")]
    pub explicit_hash_key_table: Vec<String>,
    /// The user records, in order.
    #[prost(message, repeated, tag = "3")]
    pub records: Vec<Record>,
}

/// One user record of an aggregate.
#[derive(Clone, PartialEq, Message)]
pub struct Record {
    /// Its partition key, as an index into `partition_key_table`.
    #[prost(uint64, required, tag = "1")]
    pub partition_key_index: u64,
    /// Its explicit hash key, if it has one, as an index into
    /// `explicit_hash_key_table`.
    #[prost(uint64, optional, tag = "2")]
    pub explicit_hash_key_index: Option<u64>,
    /// Its data.
    #[prost(bytes = "bytes", required, tag = "3")]
    pub data: Bytes,
    /// Tags; the KPL defines them, ksm writes none.
    #[prost(message, repeated, tag = "4")]
    pub tags: Vec<Tag>,
}

/// A tag of a user record.
#[derive(Clone, PartialEq, Message)]
pub struct Tag {
    /// The tag's key.
    #[prost(string, required, tag = "1")]
    pub key: String,
    /// Its value.
    #[prost(string, optional, tag = "2")]
    pub value: Option<String>,
}

/// A user record read back from an aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// Its partition key.
    pub partition_key: String,
    /// Its explicit hash key, if it has one.
    pub explicit_hash_key: Option<String>,
    /// Its data.
    pub data: Bytes,
}

/// Why a Kinesis record that starts with [`MAGIC`] is not a readable
/// aggregate.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AggregateError {
    /// It is too short to hold a digest.
    #[error("an aggregate of {0} bytes is too short to hold its MD5 digest")]
    TooShort(usize),
    /// The digest does not match the protobuf bytes.
    #[error("the aggregate's MD5 digest does not match its content")]
    Digest,
    /// The protobuf bytes cannot be decoded.
    #[error("the aggregate's protobuf message cannot be decoded: {0}")]
    Protobuf(String),
    /// A record points past the end of a key table.
    #[error("user record {record} names {table} index {index}, past the table's end")]
    Index {
        /// Position of the record in the aggregate.
        record: usize,
        /// Which table.
        table: &'static str,
        /// The index it names.
        index: u64,
    },
}

/// An aggregate being filled: which keys its tables hold, and the exact
/// size its encoding will have.
#[derive(Debug, Clone, Default)]
pub struct Aggregate {
    partition_keys: HashMap<Box<str>, u64>,
    explicit_hash_keys: HashMap<Box<str>, u64>,
    records: usize,
    /// Length of the protobuf message.
    message_bytes: usize,
}

impl Aggregate {
    /// An empty aggregate.
    pub fn new() -> Aggregate {
        Aggregate::default()
    }

    /// User records in it.
    pub fn records(&self) -> usize {
        self.records
    }

    /// Bytes of its encoding: magic, message and digest.
    pub fn bytes(&self) -> usize {
        FRAMING_BYTES + self.message_bytes
    }

    /// Bytes of its encoding once a record with these keys and `data_len`
    /// bytes of data joins it.
    pub fn bytes_with(
        &self,
        partition_key: &str,
        explicit_hash_key: Option<&str>,
        data_len: usize,
    ) -> usize {
        self.bytes() + self.growth(partition_key, explicit_hash_key, data_len)
    }

    /// Adds a record with these keys and `data_len` bytes of data.
    pub fn add(&mut self, partition_key: &str, explicit_hash_key: Option<&str>, data_len: usize) {
        self.message_bytes += self.growth(partition_key, explicit_hash_key, data_len);
        self.records += 1;
        let next = self.partition_keys.len() as u64;
        self.partition_keys
            .entry(partition_key.into())
            .or_insert(next);
        if let Some(key) = explicit_hash_key {
            let next = self.explicit_hash_keys.len() as u64;
            self.explicit_hash_keys.entry(key.into()).or_insert(next);
        }
    }

    /// How many bytes the message grows by when such a record joins.
    fn growth(
        &self,
        partition_key: &str,
        explicit_hash_key: Option<&str>,
        data_len: usize,
    ) -> usize {
        let (pk_index, pk_entry) = table_cost(&self.partition_keys, partition_key);
        let mut record =
            field_bytes(varint_bytes(pk_index)) + field_bytes(length_delimited(data_len));
        let mut tables = pk_entry;
        if let Some(key) = explicit_hash_key {
            let (ehk_index, ehk_entry) = table_cost(&self.explicit_hash_keys, key);
            record += field_bytes(varint_bytes(ehk_index));
            tables += ehk_entry;
        }
        tables + field_bytes(length_delimited(record))
    }

    /// Encodes `records` (partition key, explicit hash key, data), in order,
    /// as one aggregate.
    pub fn encode<'a>(
        records: impl IntoIterator<Item = (&'a str, Option<&'a str>, &'a Bytes)>,
    ) -> Vec<u8> {
        let mut message = AggregatedRecord::default();
        let mut partition_keys: HashMap<&str, u64> = HashMap::new();
        let mut explicit_hash_keys: HashMap<&str, u64> = HashMap::new();
        for (partition_key, explicit_hash_key, data) in records {
            let partition_key_index = *partition_keys.entry(partition_key).or_insert_with(|| {
                message.partition_key_table.push(partition_key.to_owned());
                message.partition_key_table.len() as u64 - 1
            });
            let explicit_hash_key_index = explicit_hash_key.map(|key| {
                *explicit_hash_keys.entry(key).or_insert_with(|| {
                    message.explicit_hash_key_table.push(key.to_owned());
                    message.explicit_hash_key_table.len() as u64 - 1
                })
            });
            message.records.push(Record {
                partition_key_index,
                explicit_hash_key_index,
                data: data.clone(),
                tags: Vec::new(),
            });
        }
        let length = message.encoded_len();
        let mut out = Vec::with_capacity(FRAMING_BYTES + length);
        out.extend_from_slice(&MAGIC);
        message
            .encode(&mut out)
            .expect("a Vec grows to take the message");
        let digest = Md5::digest(&out[MAGIC.len()..]);
        out.extend_from_slice(&digest);
        out
    }
}

/// The index a key would have in a table, and what adding it to the table
/// would cost (nothing if it is there).
fn table_cost(table: &HashMap<Box<str>, u64>, key: &str) -> (u64, usize) {
    match table.get(key) {
        Some(index) => (*index, 0),
        None => (table.len() as u64, field_bytes(length_delimited(key.len()))),
    }
}

/// Bytes of a field with a one-byte tag (field numbers up to 15) and a
/// value of `value_bytes`.
fn field_bytes(value_bytes: usize) -> usize {
    1 + value_bytes
}

/// Bytes of a varint value.
fn varint_bytes(value: u64) -> usize {
    encoded_len_varint(value)
}

/// Bytes of a length-delimited value of `len` bytes, its length included.
fn length_delimited(len: usize) -> usize {
    encoded_len_varint(len as u64) + len
}

/// The user records of a Kinesis record's data: `Ok(None)` if it is not an
/// aggregate (it does not start with [`MAGIC`]), else its records in order.
pub fn deaggregate(data: &[u8]) -> Result<Option<Vec<UserRecord>>, AggregateError> {
    let Some(rest) = data.strip_prefix(&MAGIC) else {
        return Ok(None);
    };
    let Some(message_len) = rest.len().checked_sub(DIGEST_BYTES) else {
        return Err(AggregateError::TooShort(data.len()));
    };
    let (message, digest) = rest.split_at(message_len);
    if Md5::digest(message).as_slice() != digest {
        return Err(AggregateError::Digest);
    }
    let aggregate = AggregatedRecord::decode(message)
        .map_err(|error| AggregateError::Protobuf(error.to_string()))?;
    aggregate
        .records
        .into_iter()
        .enumerate()
        .map(|(position, record)| {
            let lookup = |table: &'static str, keys: &[String], index: u64| {
                usize::try_from(index)
                    .ok()
                    .and_then(|i| keys.get(i))
                    .cloned()
                    .ok_or(AggregateError::Index {
                        record: position,
                        table,
                        index,
                    })
            };
            Ok(UserRecord {
                partition_key: lookup(
                    "partition key",
                    &aggregate.partition_key_table,
                    record.partition_key_index,
                )?,
                explicit_hash_key: record
                    .explicit_hash_key_index
                    .map(|index| {
                        lookup(
                            "explicit hash key",
                            &aggregate.explicit_hash_key_table,
                            index,
                        )
                    })
                    .transpose()?,
                data: record.data,
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Input = (String, Option<String>, Bytes);

    fn encode(records: &[Input]) -> Vec<u8> {
        Aggregate::encode(
            records
                .iter()
                .map(|(pk, ehk, data)| (pk.as_str(), ehk.as_deref(), data)),
        )
    }

    fn tracked(records: &[Input]) -> Aggregate {
        let mut aggregate = Aggregate::new();
        for (pk, ehk, data) in records {
            aggregate.add(pk, ehk.as_deref(), data.len());
        }
        aggregate
    }

    #[test]
    fn an_aggregate_is_magic_protobuf_and_its_md5() {
        let records: Vec<Input> = vec![
            ("1001".into(), None, Bytes::from_static(b"{\"a\":1}")),
            (
                "1002".into(),
                Some("42".into()),
                Bytes::from_static(b"\x00\xff"),
            ),
            ("1001".into(), None, Bytes::from_static(b"")),
        ];
        let data = encode(&records);
        assert_eq!(data[..4], [0xF3, 0x89, 0x9A, 0xC2]);
        let (message, digest) = data[4..].split_at(data.len() - 4 - 16);
        assert_eq!(digest, Md5::digest(message).as_slice());
        let decoded = AggregatedRecord::decode(message).expect("protobuf");
        assert_eq!(decoded.partition_key_table, ["1001", "1002"]);
        assert_eq!(decoded.explicit_hash_key_table, ["42"]);
        let indexes: Vec<(u64, Option<u64>)> = decoded
            .records
            .iter()
            .map(|r| (r.partition_key_index, r.explicit_hash_key_index))
            .collect();
        assert_eq!(indexes, [(0, None), (1, Some(0)), (0, None)]);
        assert_eq!(tracked(&records).bytes(), data.len());
    }

    #[test]
    fn deaggregate_reads_back_the_user_records_in_order() {
        let records: Vec<Input> = vec![
            ("a".into(), None, Bytes::from_static(b"one")),
            ("b".into(), Some("7".into()), Bytes::from_static(b"two")),
            ("a".into(), Some("7".into()), Bytes::from_static(b"three")),
        ];
        let read = deaggregate(&encode(&records))
            .expect("valid")
            .expect("aggregate");
        let read: Vec<Input> = read
            .into_iter()
            .map(|r| (r.partition_key, r.explicit_hash_key, r.data))
            .collect();
        assert_eq!(read, records);
    }

    #[test]
    fn a_plain_record_is_not_an_aggregate() {
        assert_eq!(deaggregate(b"{\"eventType\":\"x\"}"), Ok(None));
        assert_eq!(deaggregate(b""), Ok(None));
    }

    #[test]
    fn a_damaged_aggregate_is_refused() {
        let mut data = encode(&[("a".into(), None, Bytes::from_static(b"one"))]);
        assert_eq!(deaggregate(&data[..10]), Err(AggregateError::TooShort(10)));
        let last = data.len() - 1;
        data[last] ^= 1;
        assert_eq!(deaggregate(&data), Err(AggregateError::Digest));
        // A digest that matches content protobuf cannot read.
        let mut bad = MAGIC.to_vec();
        bad.extend_from_slice(&[0xff, 0xff]);
        let digest = Md5::digest(&bad[4..]);
        bad.extend_from_slice(&digest);
        assert!(matches!(
            deaggregate(&bad),
            Err(AggregateError::Protobuf(_))
        ));
    }

    #[test]
    fn a_record_pointing_past_a_table_is_refused() {
        let message = AggregatedRecord {
            partition_key_table: vec!["a".into()],
            explicit_hash_key_table: Vec::new(),
            records: vec![Record {
                partition_key_index: 3,
                explicit_hash_key_index: None,
                data: Bytes::new(),
                tags: Vec::new(),
            }],
        };
        let mut data = MAGIC.to_vec();
        data.extend_from_slice(&message.encode_to_vec());
        let digest = Md5::digest(&data[4..]);
        data.extend_from_slice(&digest);
        assert_eq!(
            deaggregate(&data),
            Err(AggregateError::Index {
                record: 0,
                table: "partition key",
                index: 3
            })
        );
    }

    #[test]
    fn the_messages_match_the_schema_file() {
        // Each field line of the .proto: label, type, name and number.
        let schema = include_str!("aggregated_record.proto");
        let mut fields: Vec<String> = schema
            .lines()
            .map(str::trim)
            .filter(|line| {
                ["required ", "optional ", "repeated "]
                    .iter()
                    .any(|label| line.starts_with(label))
            })
            .map(|line| line.trim_end_matches(';').to_owned())
            .collect();
        fields.sort();
        let mut expected = vec![
            "repeated string partition_key_table = 1",
            "repeated string explicit_hash_key_table = 2",
            "repeated Record records = 3",
            "required string key = 1",
            "optional string value = 2",
            "required uint64 partition_key_index = 1",
            "optional uint64 explicit_hash_key_index = 2",
            "required bytes data = 3",
            "repeated Tag tags = 4",
        ];
        expected.sort_unstable();
        assert_eq!(fields, expected);
        // And the derived messages encode those numbers and wire types: a
        // record with every field set, read field by field.
        let record = Record {
            partition_key_index: 1,
            explicit_hash_key_index: Some(2),
            data: Bytes::from_static(b"d"),
            tags: vec![Tag {
                key: "k".into(),
                value: Some("v".into()),
            }],
        };
        // Field keys are (number << 3) | wire type: 0 varint, 2 length-delimited.
        assert_eq!(
            record.encode_to_vec(),
            [
                0x08, 1, 0x10, 2, 0x1a, 1, b'd', 0x22, 6, 0x0a, 1, b'k', 0x12, 1, b'v'
            ]
        );
    }

    fn input() -> impl Strategy<Value = Vec<Input>> {
        let key = "[a-z0-9ü]{1,12}";
        let ehk = proptest::option::of("0|[1-9][0-9]{0,38}");
        let data = proptest::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from);
        proptest::collection::vec((key, ehk, data), 1..60)
    }

    proptest! {
        #[test]
        fn any_records_round_trip_and_sizes_are_exact(records in input()) {
            let data = encode(&records);
            prop_assert_eq!(tracked(&records).bytes(), data.len());
            let read = deaggregate(&data).expect("valid").expect("aggregate");
            let read: Vec<Input> = read
                .into_iter()
                .map(|r| (r.partition_key, r.explicit_hash_key, r.data))
                .collect();
            prop_assert_eq!(read, records);
        }

        #[test]
        fn bytes_with_predicts_the_size_after_add(records in input()) {
            let mut aggregate = Aggregate::new();
            for (pk, ehk, data) in &records {
                let predicted = aggregate.bytes_with(pk, ehk.as_deref(), data.len());
                aggregate.add(pk, ehk.as_deref(), data.len());
                prop_assert_eq!(aggregate.bytes(), predicted);
            }
        }
    }
}
