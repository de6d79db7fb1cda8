//! What Kinesis allows and how it places records, in one leaf that the
//! router, the spool and the sink share: the record and request limits, the
//! checks a record must pass before it is sent, and the hash that picks a
//! record's shard; [`aggregate`] is the KPL's aggregated record format.

pub mod aggregate;

use md5::{Digest, Md5};

/// Most bytes one record may carry, data plus partition key, on every
/// stream (a stream's own limit may be higher: [`StreamLimits`]).
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
/// Most bytes one record may carry on a stream whose limit was raised.
pub const MAX_LARGE_RECORD_BYTES: usize = 10 * 1024 * 1024;
/// Most records one PutRecords request may carry.
pub const MAX_RECORDS_PER_REQUEST: usize = 500;
/// Most bytes one PutRecords request may carry, data plus partition keys.
pub const MAX_BYTES_PER_REQUEST: usize = 5 * 1024 * 1024;
/// Most bytes one PutRecords request may carry to a stream that takes
/// records over 1 MiB.
pub const MAX_LARGE_BYTES_PER_REQUEST: usize = 10 * 1024 * 1024;

/// What one stream takes, beyond what every stream does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Its largest record, data plus partition key (`MaxRecordSizeInKiB`).
    pub max_record_bytes: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            max_record_bytes: MAX_RECORD_BYTES,
        }
    }
}

impl StreamLimits {
    /// The limits of a stream whose `MaxRecordSizeInKiB` is `kib` (a
    /// stream that does not say has the 1 MiB every stream has).
    pub fn from_kib(kib: Option<i32>) -> Self {
        let bytes = kib
            .and_then(|kib| usize::try_from(kib).ok())
            .map_or(MAX_RECORD_BYTES, |kib| kib * 1024);
        Self {
            max_record_bytes: bytes.clamp(MAX_RECORD_BYTES, MAX_LARGE_RECORD_BYTES),
        }
    }

    /// Most bytes of one PutRecords request to the stream.
    pub fn request_bytes(&self) -> usize {
        if self.max_record_bytes > MAX_RECORD_BYTES {
            MAX_LARGE_BYTES_PER_REQUEST
        } else {
            MAX_BYTES_PER_REQUEST
        }
    }
}
/// Partition keys are 1 to 256 Unicode characters.
pub const MAX_PARTITION_KEY_CHARS: usize = 256;

/// Checks a record against Kinesis's own rules (`size` is data plus
/// partition key, at most `max_bytes`: the stream's limit), so one bad
/// record never makes a whole request fail.
pub fn check_record(
    partition_key: &str,
    explicit_hash_key: Option<&str>,
    size: usize,
    max_bytes: usize,
) -> Result<(), String> {
    let key_chars = partition_key.chars().count();
    if key_chars == 0 || key_chars > MAX_PARTITION_KEY_CHARS {
        return Err(format!(
            "partition key has {key_chars} characters; Kinesis takes 1 to {MAX_PARTITION_KEY_CHARS}"
        ));
    }
    if size > max_bytes {
        return Err(format!(
            "record is {size} bytes with its partition key, over the module's limit of \
             {max_bytes} (max_record_size, within what the stream takes)"
        ));
    }
    // Kinesis' pattern is `0|([1-9]\d{0,38})`, within 0..2^128.
    if let Some(key) = explicit_hash_key
        && (!key.bytes().all(|b| b.is_ascii_digit())
            || (key.len() > 1 && key.starts_with('0'))
            || key.parse::<u128>().is_err())
    {
        let shown: String = key.chars().take(48).collect();
        return Err(format!(
            "explicit hash key `{shown}` is not a decimal 128-bit integer without leading zeros"
        ));
    }
    Ok(())
}

/// The 128-bit hash key Kinesis uses to pick a record's shard: the explicit
/// hash key when it is given and parses as a decimal `u128`, otherwise the
/// MD5 digest of the partition key's UTF-8 bytes read as a big-endian number.
pub fn hash_key(partition_key: &str, explicit_hash_key: Option<&str>) -> u128 {
    explicit_hash_key
        .and_then(|key| key.parse().ok())
        .unwrap_or_else(|| u128::from_be_bytes(Md5::digest(partition_key.as_bytes()).into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_checked_against_kinesis_limits() {
        assert!(check_record("1001", None, MAX_RECORD_BYTES, MAX_RECORD_BYTES).is_ok());
        assert!(check_record("1001", None, MAX_RECORD_BYTES + 1, MAX_RECORD_BYTES).is_err());
        assert!(check_record("", None, 1, MAX_RECORD_BYTES).is_err());
        assert!(
            check_record(&"ü".repeat(256), None, 513, MAX_RECORD_BYTES).is_ok(),
            "256 characters, 512 bytes"
        );
        assert!(check_record(&"k".repeat(257), None, 258, MAX_RECORD_BYTES).is_err());
        assert!(
            check_record(
                "k",
                Some("340282366920938463463374607431768211455"),
                2,
                MAX_RECORD_BYTES
            )
            .is_ok()
        );
        assert!(
            check_record(
                "k",
                Some("340282366920938463463374607431768211456"),
                2,
                MAX_RECORD_BYTES
            )
            .is_err()
        );
        assert!(check_record("k", Some("0x10"), 2, MAX_RECORD_BYTES).is_err());
        assert!(check_record("k", Some("0"), 2, MAX_RECORD_BYTES).is_ok());
        assert!(
            check_record("k", Some("042"), 2, MAX_RECORD_BYTES).is_err(),
            "leading zero"
        );
        assert!(check_record("k", Some("00"), 2, MAX_RECORD_BYTES).is_err());
        assert!(check_record("k", Some(""), 2, MAX_RECORD_BYTES).is_err());
    }

    #[test]
    fn a_stream_with_a_raised_limit_takes_larger_records_and_requests() {
        let plain = StreamLimits::from_kib(None);
        assert_eq!(plain, StreamLimits::default());
        assert_eq!(plain.request_bytes(), MAX_BYTES_PER_REQUEST);
        assert_eq!(StreamLimits::from_kib(Some(1024)), plain);
        let large = StreamLimits::from_kib(Some(10240));
        assert_eq!(large.max_record_bytes, 10 * 1024 * 1024);
        assert_eq!(large.request_bytes(), 10 * 1024 * 1024);
        assert_eq!(
            StreamLimits::from_kib(Some(2048)).max_record_bytes,
            2 * 1024 * 1024
        );
        assert!(check_record("k", None, 5_000_000, large.max_record_bytes).is_ok());
        assert!(check_record("k", None, 5_000_000, plain.max_record_bytes).is_err());
    }

    #[test]
    fn hash_key_is_md5_of_partition_key() {
        assert_eq!(hash_key("", None), 0xd41d8cd98f00b204e9800998ecf8427e);
        assert_eq!(
            hash_key("1001", None),
            245593008805097772708903916317730822106
        );
    }

    #[test]
    fn hash_key_prefers_explicit_hash_key() {
        assert_eq!(hash_key("1001", Some("42")), 42);
        assert_eq!(
            hash_key("1001", Some("340282366920938463463374607431768211455")),
            u128::MAX
        );
    }

    #[test]
    fn hash_key_ignores_unparsable_explicit_hash_key() {
        let md5 = hash_key("1001", None);
        assert_eq!(hash_key("1001", Some("not a number")), md5);
        assert_eq!(hash_key("1001", Some("-1")), md5);
        assert_eq!(
            hash_key("1001", Some("340282366920938463463374607431768211456")),
            md5
        );
    }
}
