//! The guest's error type, one case per case of the WIT `error` variant.

use std::fmt;

/// Why the guest refused an input; mirrors the WIT `error` variant case by case
/// so that `component.rs` converts it without loss.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The bulk payload's version string is not "1.0"; carries the version found.
    UnsupportedVersion(String),
    /// The bulk payload is not a valid sequence of MessagePack values.
    MalformedPayload {
        /// Offset from the start of the payload, in bytes.
        offset: u64,
        /// What was found or expected there.
        detail: String,
    },
    /// A bulk element is a complete MessagePack value but not a byte array.
    NotByteArray {
        /// Position of the element among the payload's records, from 0.
        index: u32,
        /// Offset of the element in the payload, in bytes.
        offset: u64,
        /// MessagePack type found instead (`nil`, `bool`, `int`, `float`,
        /// `str`, `array`, `map`, `ext`).
        found: String,
    },
    /// A record is over the module's `max-record-size`.
    RecordTooLarge {
        /// Position of the record in its payload, from 0 (0 for events).
        index: u32,
        /// Size in bytes, data plus partition key.
        size: u64,
        /// The module's `max-record-size`.
        limit: u64,
    },
    /// The event payload is not valid JSON, or not a JSON object.
    InvalidEventJson {
        /// Byte offset of the error from the start of the payload.
        offset: u64,
        /// What went wrong there.
        detail: String,
    },
    /// A required event field is missing or has the wrong type.
    InvalidField {
        /// JSON field name, as MODE spells it (`eventType`, `homeId`, ...).
        field: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The settings passed to `configure` are unusable.
    InvalidSettings {
        /// Settings field name, as WIT spells it (`max-record-size`, ...).
        field: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A handler was called before `configure`.
    NotConfigured,
    /// Anything else; the text says what.
    Other(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidField`].
    pub fn invalid_field(field: &str, detail: impl Into<String>) -> Self {
        Error::InvalidField {
            field: field.to_owned(),
            detail: detail.into(),
        }
    }

    /// Shorthand for [`Error::MalformedPayload`].
    pub fn malformed(offset: usize, detail: impl Into<String>) -> Self {
        Error::MalformedPayload {
            offset: offset as u64,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::UnsupportedVersion(found) => {
                write!(
                    f,
                    "unsupported bulk payload version {found:?}, expected \"1.0\""
                )
            }
            Error::MalformedPayload { offset, detail } => {
                write!(f, "malformed bulk payload at byte {offset}: {detail}")
            }
            Error::NotByteArray {
                index,
                offset,
                found,
            } => write!(
                f,
                "bulk element {index} at byte {offset} is a MessagePack {found}, not a byte array"
            ),
            Error::RecordTooLarge { index, size, limit } => {
                write!(
                    f,
                    "record {index} is {size} bytes, over the limit of {limit}"
                )
            }
            Error::InvalidEventJson { offset, detail } => {
                write!(
                    f,
                    "event payload is not a JSON object (byte {offset}): {detail}"
                )
            }
            Error::InvalidField { field, detail } => write!(f, "event field {field}: {detail}"),
            Error::InvalidSettings { field, detail } => write!(f, "setting {field}: {detail}"),
            Error::NotConfigured => f.write_str("the module was not configured"),
            Error::Other(text) => f.write_str(text),
        }
    }
}

impl std::error::Error for Error {}
