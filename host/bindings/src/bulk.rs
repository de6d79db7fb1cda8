//! Bulk data payloads for the Kinesis smart module: the MessagePack string
//! `"1.0"` followed by one MessagePack byte array (bin) per record, back to
//! back (as MODE's Go example writes them), used by `ksm bulk encode` and by
//! the conformance cases.

/// The only bulk payload version there is.
pub const VERSION: &str = "1.0";

/// Encodes `records` as a version `"1.0"` bulk data payload, one bin per
/// record, in order.
///
/// # Panics
/// When a record is over 4 GiB, which MessagePack cannot hold.
pub fn encode<I>(records: I) -> Vec<u8>
where
    I: IntoIterator,
    I::Item: AsRef<[u8]>,
{
    encode_version(VERSION, records)
}

/// Like [`encode`], with any version string (to build refused payloads).
///
/// # Panics
/// When a record is over 4 GiB, which MessagePack cannot hold.
pub fn encode_version<I>(version: &str, records: I) -> Vec<u8>
where
    I: IntoIterator,
    I::Item: AsRef<[u8]>,
{
    let mut buf = Vec::new();
    // Writing into a Vec cannot fail; only a length over u32::MAX can.
    rmp::encode::write_str(&mut buf, version).expect("a version string under 4 GiB");
    for record in records {
        rmp::encode::write_bin(&mut buf, record.as_ref()).expect("a bulk record under 4 GiB");
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_payload_is_the_version_alone() {
        assert_eq!(encode(Vec::<Vec<u8>>::new()), [0xa3, b'1', b'.', b'0']);
    }

    #[test]
    fn records_use_the_smallest_bin_format() {
        let p = encode([&b"ab"[..], b""]);
        assert_eq!(p, [0xa3, b'1', b'.', b'0', 0xc4, 2, b'a', b'b', 0xc4, 0]);

        let p = encode([vec![7u8; 256]]);
        assert_eq!(&p[4..7], &[0xc5, 0x01, 0x00]);
        assert_eq!(p.len(), 4 + 3 + 256);

        let p = encode([vec![7u8; 65_536]]);
        assert_eq!(&p[4..9], &[0xc6, 0, 1, 0, 0]);
        assert_eq!(p.len(), 4 + 5 + 65_536);
    }

    #[test]
    fn decodes_with_rmp() {
        let records: Vec<Vec<u8>> = vec![b"one".to_vec(), vec![0xff; 300], Vec::new()];
        let p = encode(&records);
        let mut rd = &p[..];
        let mut version = [0u8; 8];
        assert_eq!(rmp::decode::read_str(&mut rd, &mut version).unwrap(), "1.0");
        for want in &records {
            let len = rmp::decode::read_bin_len(&mut rd).unwrap() as usize;
            assert_eq!(&rd[..len], want.as_slice());
            rd = &rd[len..];
        }
        assert!(rd.is_empty());
    }

    #[test]
    fn other_versions() {
        assert_eq!(
            encode_version("2.0", [b"x"]),
            [0xa3, b'2', b'.', b'0', 0xc4, 1, b'x']
        );
    }
}
