//! Bulk data payloads: the MessagePack string `"1.0"` then zero or more byte
//! arrays (`bin 8/16/32`), back to back (not inside a MessagePack array).
//!
//! [`unpack`] decodes the markers by hand in one pass and returns where each
//! byte array's content lies in the payload, without copying it.

use crate::error::Error;

/// The only bulk payload version there is.
pub const VERSION: &[u8] = b"1.0";

/// A byte range of the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Offset of the first byte, from the start of the payload.
    pub offset: u32,
    /// Number of bytes.
    pub len: u32,
}

/// The type family of a MessagePack value, as named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `nil`.
    Nil,
    /// `true` / `false`.
    Bool,
    /// Any integer format.
    Int,
    /// `float 32/64`.
    Float,
    /// Any string format.
    Str,
    /// `bin 8/16/32`: a byte array.
    Bin,
    /// Any array format.
    Array,
    /// Any map format.
    Map,
    /// Any extension format.
    Ext,
}

impl Kind {
    /// The type's name in errors (`not-byte-array.found`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Nil => "nil",
            Kind::Bool => "bool",
            Kind::Int => "int",
            Kind::Float => "float",
            Kind::Str => "str",
            Kind::Bin => "bin",
            Kind::Array => "array",
            Kind::Map => "map",
            Kind::Ext => "ext",
        }
    }
}

/// The decoded header of one MessagePack value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    kind: Kind,
    /// Bytes of marker, length and (for ext) type fields.
    header_len: usize,
    /// Bytes that follow the header: content of str/bin/ext, number bytes.
    body_len: usize,
    /// Values nested inside: `n` for arrays, `2n` for maps.
    children: u64,
}

/// Why a header could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeadError {
    /// The byte at `pos` is 0xc1, which MessagePack never uses.
    InvalidMarker,
    /// The header of the value runs past the end of the payload.
    Truncated { kind: Kind, header_len: usize },
}

/// Reads the header of the value whose marker is at `buf[pos]` (`pos` must be
/// in bounds).
fn head(buf: &[u8], pos: usize) -> Result<Head, HeadError> {
    let marker = buf[pos];
    let fixed = |kind, body_len| Head {
        kind,
        header_len: 1,
        body_len,
        children: 0,
    };
    // (kind, bytes of the length field, extra header bytes) for the formats
    // whose length is read from the payload.
    let (kind, len_bytes, extra) = match marker {
        0x00..=0x7f | 0xe0..=0xff => return Ok(fixed(Kind::Int, 0)),
        0x80..=0x8f => {
            return Ok(Head {
                kind: Kind::Map,
                header_len: 1,
                body_len: 0,
                children: 2 * u64::from(marker & 0x0f),
            });
        }
        0x90..=0x9f => {
            return Ok(Head {
                kind: Kind::Array,
                header_len: 1,
                body_len: 0,
                children: u64::from(marker & 0x0f),
            });
        }
        0xa0..=0xbf => return Ok(fixed(Kind::Str, usize::from(marker & 0x1f))),
        0xc0 => return Ok(fixed(Kind::Nil, 0)),
        0xc1 => return Err(HeadError::InvalidMarker),
        0xc2 | 0xc3 => return Ok(fixed(Kind::Bool, 0)),
        0xca => return Ok(fixed(Kind::Float, 4)),
        0xcb => return Ok(fixed(Kind::Float, 8)),
        0xcc | 0xd0 => return Ok(fixed(Kind::Int, 1)),
        0xcd | 0xd1 => return Ok(fixed(Kind::Int, 2)),
        0xce | 0xd2 => return Ok(fixed(Kind::Int, 4)),
        0xcf | 0xd3 => return Ok(fixed(Kind::Int, 8)),
        0xd4..=0xd8 => {
            // fixext 1/2/4/8/16: marker, type byte, data.
            let data = 1usize << (marker - 0xd4);
            let head = Head {
                kind: Kind::Ext,
                header_len: 2,
                body_len: data,
                children: 0,
            };
            return if buf.len() - pos < 2 {
                Err(HeadError::Truncated {
                    kind: Kind::Ext,
                    header_len: 2,
                })
            } else {
                Ok(head)
            };
        }
        0xc4 => (Kind::Bin, 1, 0),
        0xc5 => (Kind::Bin, 2, 0),
        0xc6 => (Kind::Bin, 4, 0),
        0xc7 => (Kind::Ext, 1, 1),
        0xc8 => (Kind::Ext, 2, 1),
        0xc9 => (Kind::Ext, 4, 1),
        0xd9 => (Kind::Str, 1, 0),
        0xda => (Kind::Str, 2, 0),
        0xdb => (Kind::Str, 4, 0),
        0xdc => (Kind::Array, 2, 0),
        0xdd => (Kind::Array, 4, 0),
        0xde => (Kind::Map, 2, 0),
        0xdf => (Kind::Map, 4, 0),
    };
    let header_len = 1 + len_bytes + extra;
    let Some(len_field) = buf.get(pos + 1..pos + 1 + len_bytes) else {
        return Err(HeadError::Truncated { kind, header_len });
    };
    if buf.len() - pos < header_len {
        return Err(HeadError::Truncated { kind, header_len });
    }
    let n = len_field
        .iter()
        .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    Ok(match kind {
        Kind::Array => Head {
            kind,
            header_len,
            body_len: 0,
            children: n,
        },
        Kind::Map => Head {
            kind,
            header_len,
            body_len: 0,
            children: 2 * n,
        },
        _ => Head {
            kind,
            header_len,
            // At most u32::MAX, which fits usize on every target we build for;
            // saturate rather than wrap anywhere else (the value is then truncated).
            body_len: usize::try_from(n).unwrap_or(usize::MAX),
            children: 0,
        },
    })
}

/// A complete value found by [`skip_value`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Value {
    kind: Kind,
    /// Offset just past the value's header (start of a str/bin content).
    content: usize,
    /// Offset just past the whole value.
    end: usize,
}

/// Walks over the whole value starting at `start` (nested values included),
/// iteratively so that deep nesting cannot overflow the stack.
///
/// Errors: a truncated value is reported at `start`; a 0xc1 byte at its own
/// offset.
fn skip_value(buf: &[u8], start: usize) -> Result<Value, Error> {
    let top = read_head(buf, start, start)?;
    let content = start + top.header_len;
    let mut pos = content
        .checked_add(top.body_len)
        .filter(|end| *end <= buf.len())
        .ok_or_else(|| {
            Error::malformed(
                start,
                format!(
                    "truncated {}: {} content bytes announced, {} left",
                    top.kind.name(),
                    top.body_len,
                    buf.len() - content
                ),
            )
        })?;
    let mut pending = top.children;
    while pending > 0 {
        if pos >= buf.len() {
            return Err(Error::malformed(
                start,
                format!(
                    "truncated {}: the payload ends with {pending} nested value(s) missing",
                    top.kind.name()
                ),
            ));
        }
        let h = read_head(buf, pos, start)?;
        pending = (pending - 1).saturating_add(h.children);
        pos = (pos + h.header_len)
            .checked_add(h.body_len)
            .filter(|end| *end <= buf.len())
            .ok_or_else(|| {
                Error::malformed(
                    start,
                    format!(
                        "truncated {}: a nested {} at byte {pos} runs past the end",
                        top.kind.name(),
                        h.kind.name()
                    ),
                )
            })?;
    }
    Ok(Value {
        kind: top.kind,
        content,
        end: pos,
    })
}

/// [`head`] with its errors turned into [`Error::MalformedPayload`]; `start`
/// is the offset of the top-level value being read.
fn read_head(buf: &[u8], pos: usize, start: usize) -> Result<Head, Error> {
    head(buf, pos).map_err(|e| match e {
        HeadError::InvalidMarker => Error::malformed(pos, "0xc1 is not a valid MessagePack marker"),
        HeadError::Truncated { kind, header_len } => Error::malformed(
            start,
            format!(
                "truncated {} header: {header_len} bytes needed, {} left",
                kind.name(),
                buf.len() - pos
            ),
        ),
    })
}

/// Unpacks a bulk payload into the spans of its byte arrays, in order.
///
/// Errors (the whole payload is refused):
/// - empty payload, first value not a string, a 0xc1 marker, a truncated
///   value: [`Error::MalformedPayload`] (offset of the value, or of the 0xc1
///   byte);
/// - a version string other than `"1.0"`: [`Error::UnsupportedVersion`];
/// - a complete element that is not a byte array: [`Error::NotByteArray`].
pub fn unpack(payload: &[u8]) -> Result<Vec<Span>, Error> {
    if u32::try_from(payload.len()).is_err() {
        return Err(Error::Other("bulk payload over 4 GiB".to_owned()));
    }
    if payload.is_empty() {
        return Err(Error::malformed(
            0,
            "empty payload, expected the version string \"1.0\"",
        ));
    }
    let first = read_head(payload, 0, 0)?;
    if first.kind != Kind::Str {
        return Err(Error::malformed(
            0,
            format!(
                "expected the version string \"1.0\", found {}",
                first.kind.name()
            ),
        ));
    }
    let version = skip_value(payload, 0)?;
    let found = &payload[version.content..version.end];
    if found != VERSION {
        return Err(Error::UnsupportedVersion(
            String::from_utf8_lossy(found).into_owned(),
        ));
    }
    let mut spans = Vec::new();
    let mut pos = version.end;
    while pos < payload.len() {
        let value = skip_value(payload, pos)?;
        if value.kind != Kind::Bin {
            return Err(Error::NotByteArray {
                index: u32::try_from(spans.len()).unwrap_or(u32::MAX),
                offset: pos as u64,
                found: value.kind.name().to_owned(),
            });
        }
        // Both fit u32: the payload length does (checked above).
        spans.push(Span {
            offset: u32::try_from(value.content).unwrap_or(u32::MAX),
            len: u32::try_from(value.end - value.content).unwrap_or(u32::MAX),
        });
        pos = value.end;
    }
    Ok(spans)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// "1.0" as a fixstr.
    const V: [u8; 4] = [0xa3, b'1', b'.', b'0'];

    fn payload(rest: &[u8]) -> Vec<u8> {
        let mut p = V.to_vec();
        p.extend_from_slice(rest);
        p
    }

    fn encode(records: &[&[u8]]) -> Vec<u8> {
        let mut buf = Vec::new();
        rmp::encode::write_str(&mut buf, "1.0").unwrap();
        for r in records {
            rmp::encode::write_bin(&mut buf, r).unwrap();
        }
        buf
    }

    fn malformed_offset(r: Result<Vec<Span>, Error>) -> u64 {
        match r {
            Err(Error::MalformedPayload { offset, .. }) => offset,
            other => panic!("expected malformed-payload, got {other:?}"),
        }
    }

    fn not_byte_array(r: Result<Vec<Span>, Error>) -> (u32, u64, String) {
        match r {
            Err(Error::NotByteArray {
                index,
                offset,
                found,
            }) => (index, offset, found),
            other => panic!("expected not-byte-array, got {other:?}"),
        }
    }

    #[test]
    fn version_only_is_empty() {
        assert_eq!(unpack(&V), Ok(vec![]));
    }

    #[test]
    fn spans_point_at_bin_contents() {
        let big = vec![7u8; 70_000];
        let mid = vec![9u8; 300];
        let p = encode(&[b"ab", b"", &mid, &big]);
        let spans = unpack(&p).unwrap();
        assert_eq!(
            spans,
            vec![
                Span { offset: 6, len: 2 },  // bin8: c4 02
                Span { offset: 10, len: 0 }, // bin8: c4 00
                Span {
                    offset: 13,
                    len: 300
                }, // bin16: c5 01 2c
                Span {
                    offset: 13 + 300 + 5,
                    len: 70_000
                }, // bin32
            ]
        );
        for (s, want) in spans.iter().zip([&b"ab"[..], b"", &mid, &big]) {
            assert_eq!(&p[s.offset as usize..(s.offset + s.len) as usize], want);
        }
    }

    #[test]
    fn version_in_every_str_format() {
        for header in [&[0xd9u8, 3][..], &[0xda, 0, 3], &[0xdb, 0, 0, 0, 3]] {
            let mut p = header.to_vec();
            p.extend_from_slice(b"1.0\xc4\x01x");
            let spans = unpack(&p).unwrap();
            assert_eq!(spans.len(), 1);
            assert_eq!(spans[0].len, 1);
        }
    }

    #[test]
    fn other_versions_are_unsupported() {
        let mut p = Vec::new();
        rmp::encode::write_str(&mut p, "2.0").unwrap();
        assert_eq!(unpack(&p), Err(Error::UnsupportedVersion("2.0".into())));
        assert_eq!(
            unpack(&[0xa0]),
            Err(Error::UnsupportedVersion(String::new()))
        );
        assert_eq!(
            unpack(&[0xa4, b'1', b'.', b'0', b' ']),
            Err(Error::UnsupportedVersion("1.0 ".into()))
        );
    }

    #[test]
    fn empty_and_non_str_first_values_are_malformed() {
        assert_eq!(malformed_offset(unpack(&[])), 0);
        // bin "1.0", int, array, nil, invalid marker.
        for p in [
            &[0xc4u8, 3, b'1', b'.', b'0'][..],
            &[0x01],
            &[0x91, 0xa3, b'1', b'.', b'0'],
            &[0xc0],
            &[0xc1],
        ] {
            assert_eq!(malformed_offset(unpack(p)), 0, "{p:?}");
        }
    }

    #[test]
    fn truncated_version_is_malformed() {
        assert_eq!(malformed_offset(unpack(&[0xa3, b'1', b'.'])), 0);
        assert_eq!(malformed_offset(unpack(&[0xd9])), 0);
        assert_eq!(malformed_offset(unpack(&[0xda, 0])), 0);
    }

    #[test]
    fn truncated_header_and_content_report_the_value_start() {
        // bin8 without its length byte, after one good record at 4..7.
        assert_eq!(
            malformed_offset(unpack(&payload(&[0xc4, 1, b'a', 0xc4]))),
            7
        );
        // bin16 / bin32 with half a length field.
        assert_eq!(malformed_offset(unpack(&payload(&[0xc5, 0]))), 4);
        assert_eq!(malformed_offset(unpack(&payload(&[0xc6, 0, 0, 1]))), 4);
        // content cut short.
        assert_eq!(malformed_offset(unpack(&payload(&[0xc4, 5, 1, 2]))), 4);
        assert_eq!(
            malformed_offset(unpack(&payload(&[0xc6, 0xff, 0xff, 0xff, 0xff, 1]))),
            4
        );
    }

    #[test]
    fn invalid_marker_reports_its_own_offset() {
        assert_eq!(malformed_offset(unpack(&payload(&[0xc1]))), 4);
        // Nested inside an array element: offset of the 0xc1 byte.
        assert_eq!(malformed_offset(unpack(&payload(&[0x92, 0x01, 0xc1]))), 6);
    }

    #[test]
    fn non_bin_elements_name_their_type() {
        let cases: [(&[u8], &str); 17] = [
            (&[0xc0], "nil"),
            (&[0xc2], "bool"),
            (&[0xc3], "bool"),
            (&[0x05], "int"),
            (&[0xff], "int"),
            (&[0xd3, 0, 0, 0, 0, 0, 0, 0, 1], "int"),
            (&[0xcf, 0, 0, 0, 0, 0, 0, 0, 1], "int"),
            (&[0xca, 0, 0, 0, 0], "float"),
            (&[0xcb, 0, 0, 0, 0, 0, 0, 0, 0], "float"),
            (&[0xa1, b'x'], "str"),
            (&[0x92, 0x01, 0xa1, b'x'], "array"),
            (&[0xdc, 0, 1, 0xc0], "array"),
            (&[0x81, 0x01, 0x02], "map"),
            (&[0xde, 0, 1, 0x01, 0x91, 0xc0], "map"),
            (&[0xd4, 1, 0], "ext"),
            (
                &[
                    0xd8, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                ],
                "ext",
            ),
            (&[0xc7, 2, 5, 0, 0], "ext"),
        ];
        for (element, name) in cases {
            let p = payload(&[&[0xc4, 1, b'a'][..], element].concat());
            assert_eq!(
                not_byte_array(unpack(&p)),
                (1, 7, name.to_owned()),
                "{element:?}"
            );
        }
    }

    #[test]
    fn truncated_non_bin_elements_are_malformed_not_wrong_type() {
        for element in [
            &[0xa3, b'x'][..],   // str content
            &[0x92, 0x01],       // array missing an element
            &[0x81, 0x01],       // map missing a value
            &[0x91, 0xa5, b'x'], // nested str content
            &[0xcb, 0, 0],       // float64 bytes
            &[0xd4, 1],          // fixext1 data
            &[0xd4],             // fixext type byte
            &[0xc8, 0, 5, 1, 0], // ext16 data
            &[0xdd, 0, 0, 0],    // array32 length
        ] {
            assert_eq!(
                malformed_offset(unpack(&payload(element))),
                4,
                "{element:?}"
            );
        }
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        let mut p = payload(&vec![0x91; 1_000_000]);
        p.push(0xc0);
        assert_eq!(not_byte_array(unpack(&p)), (0, 4, "array".to_owned()));
        let p = payload(&vec![0x91; 1_000_000]);
        assert_eq!(malformed_offset(unpack(&p)), 4);
    }

    #[test]
    fn huge_announced_lengths_are_truncated() {
        assert_eq!(
            malformed_offset(unpack(&payload(&[0xdd, 0xff, 0xff, 0xff, 0xff]))),
            4
        );
        assert_eq!(
            malformed_offset(unpack(&payload(&[0xdf, 0xff, 0xff, 0xff, 0xff, 0xc0]))),
            4
        );
    }

    #[test]
    fn many_records() {
        let records: Vec<Vec<u8>> = (0..1000u32).map(|i| i.to_string().into_bytes()).collect();
        let refs: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
        let p = encode(&refs);
        let spans = unpack(&p).unwrap();
        assert_eq!(spans.len(), 1000);
        for (i, s) in spans.iter().enumerate() {
            assert_eq!(
                &p[s.offset as usize..(s.offset + s.len) as usize],
                i.to_string().as_bytes()
            );
        }
    }
}
