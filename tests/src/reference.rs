//! The KPL's reference de-aggregator (the `aws-kinesis-agg` package, Python)
//! run over a whole stream by `tests/emulators/deaggregate.py`, and the
//! checks every aggregated test makes of what it read: each aggregate's
//! MD5 valid and its user records on the shard their hash keys name.

use std::process::Command;

use base64::Engine as _;
use md5::{Digest, Md5};
use serde::Deserialize;

use crate::artifacts::workspace_root;

/// A shard of the stream and the hash keys it takes.
#[derive(Debug, Clone, Deserialize)]
pub struct ReferenceShard {
    /// Shard ID.
    pub id: String,
    /// Lowest hash key, decimal.
    pub starting_hash_key: String,
    /// Highest hash key, decimal.
    pub ending_hash_key: String,
}

/// A Kinesis record as the stream holds it.
#[derive(Debug, Clone, Deserialize)]
pub struct ReferenceKinesisRecord {
    /// Its shard.
    pub shard: String,
    /// Its sequence number.
    pub sequence_number: String,
    /// Its partition key.
    pub partition_key: String,
    /// Whether its data starts with the KPL's magic.
    pub aggregated: bool,
    /// For an aggregate: whether its MD5 matches.
    pub md5_valid: Option<bool>,
    /// How many user records the reference read from it.
    pub user_records: usize,
    /// Its data's length.
    pub bytes: usize,
}

/// A user record as the reference de-aggregator read it.
#[derive(Debug, Clone, Deserialize)]
pub struct ReferenceUserRecord {
    /// The shard of its Kinesis record.
    pub shard: String,
    /// Its Kinesis record's sequence number.
    pub sequence_number: String,
    /// Its place in its Kinesis record.
    pub sub_sequence_number: u64,
    /// Its partition key.
    pub partition_key: String,
    /// Its explicit hash key, if it has one.
    pub explicit_hash_key: Option<String>,
    /// Its data, in base64.
    pub data_base64: String,
}

impl ReferenceUserRecord {
    /// Its data.
    pub fn data(&self) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.data_base64)
            .expect("the reference writes base64")
    }

    /// The hash key that places it: its explicit hash key, or the MD5 of
    /// its partition key.
    pub fn hash_key(&self) -> u128 {
        match &self.explicit_hash_key {
            Some(key) => key.parse().expect("a decimal explicit hash key"),
            None => u128::from_be_bytes(Md5::digest(self.partition_key.as_bytes()).into()),
        }
    }
}

/// A whole stream as the reference de-aggregator read it.
#[derive(Debug, Clone, Deserialize)]
pub struct ReferenceRead {
    /// Its shards.
    pub shards: Vec<ReferenceShard>,
    /// Its Kinesis records, shard by shard in sequence order.
    pub kinesis_records: Vec<ReferenceKinesisRecord>,
    /// Its user records, in the same order.
    pub user_records: Vec<ReferenceUserRecord>,
}

impl ReferenceRead {
    /// Reads every shard of `stream` at `endpoint` with the reference
    /// de-aggregator (panics with its output if it fails).
    pub fn of_stream(endpoint: &str, stream: &str) -> ReferenceRead {
        let script = workspace_root().join("tests/emulators/deaggregate.py");
        let output = Command::new("python3")
            .arg(&script)
            .args(["--endpoint", endpoint, "--stream", stream])
            .output()
            .expect("python3 runs");
        assert!(
            output.status.success(),
            "deaggregate.py failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
            panic!(
                "deaggregate.py wrote no readable JSON ({error}): {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }

    /// Checks what holds of every stream ksm writes aggregates to: each
    /// aggregate's MD5 is valid, and each user record is on the shard its
    /// hash key names (the aggregate's explicit hash key placed it there).
    pub fn assert_well_placed(&self) {
        for record in &self.kinesis_records {
            if record.aggregated {
                assert_eq!(record.md5_valid, Some(true), "{record:?}");
            }
        }
        for user in &self.user_records {
            let shard = self
                .shards
                .iter()
                .find(|s| s.id == user.shard)
                .expect("its shard is listed");
            let (start, end): (u128, u128) = (
                shard.starting_hash_key.parse().expect("decimal"),
                shard.ending_hash_key.parse().expect("decimal"),
            );
            let hash = user.hash_key();
            assert!(
                (start..=end).contains(&hash),
                "user record of key {} ({hash}) is on {}, which takes {start}..={end}",
                user.partition_key,
                user.shard
            );
        }
    }

    /// The data of each partition key's user records, in stream order.
    pub fn per_key(&self) -> std::collections::BTreeMap<String, Vec<Vec<u8>>> {
        let mut keys: std::collections::BTreeMap<String, Vec<Vec<u8>>> = Default::default();
        for user in &self.user_records {
            keys.entry(user.partition_key.clone())
                .or_default()
                .push(user.data());
        }
        keys
    }

    /// Kinesis records that are aggregates.
    pub fn aggregates(&self) -> usize {
        self.kinesis_records.iter().filter(|r| r.aggregated).count()
    }
}
