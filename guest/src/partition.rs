//! Partition-key choice.

/// The partition key of a record: a fresh UUIDv4 (lowercase, hyphenated) when
/// `use_uuid` is set, else `id` in decimal (the device ID for device events
/// and bulk data, the home ID for home events).
pub fn partition_key(use_uuid: bool, id: u64) -> String {
    if use_uuid {
        uuid::Uuid::new_v4().hyphenated().to_string()
    } else {
        id.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::partition_key;
    use std::collections::HashSet;

    #[test]
    fn id_in_decimal() {
        assert_eq!(partition_key(false, 0), "0");
        assert_eq!(partition_key(false, 1001), "1001");
        assert_eq!(partition_key(false, u64::MAX), "18446744073709551615");
    }

    #[test]
    fn uuid_v4_shape_and_uniqueness() {
        let keys: HashSet<String> = (0..100).map(|_| partition_key(true, 7)).collect();
        assert_eq!(keys.len(), 100);
        for key in &keys {
            let b = key.as_bytes();
            assert_eq!(b.len(), 36, "{key}");
            for (i, c) in b.iter().enumerate() {
                if [8, 13, 18, 23].contains(&i) {
                    assert_eq!(*c, b'-', "{key}");
                } else {
                    assert!(matches!(c, b'0'..=b'9' | b'a'..=b'f'), "{key}");
                }
            }
            assert_eq!(b[14], b'4', "version nibble: {key}");
            assert!(matches!(b[19], b'8' | b'9' | b'a' | b'b'), "variant: {key}");
        }
    }
}
