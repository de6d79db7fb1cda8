//! Host bindings of the `ksm:smart-module` WIT contract, version by version
//! ([`v1_0`], [`v1_1`]), plus readable descriptions of the guest's errors. A
//! crate of its own, so that what binds the contract can be used without the
//! rest of the host; the host re-exports it as `ksm_host::bindings`.
//!
//! Both versions share one set of Rust types for the 1.0 items (`types`):
//! 1.1 changed none of them, so a 1.1 guest's records and contexts are the
//! very values a 1.0 guest's are, and the host handles both with one code path.

/// Contract 1.0.0 (`wit/1.0`): the `smart-module` world, one message per call.
pub mod v1_0 {
    /// The generated bindings; their docs come from the WIT files.
    #[allow(missing_docs)]
    mod generated {
        wasmtime::component::bindgen!({
            path: "../../wit/1.0",
            world: "smart-module",
        });
    }

    pub use generated::exports::ksm::smart_module::forwarder;
    pub use generated::ksm::smart_module::types;
    pub use generated::{SmartModule, SmartModulePre};
}

/// Contract 1.1.0 (`wit/1.1`): the `smart-module-batch` world, which adds
/// batches to everything of 1.0.
pub mod v1_1 {
    /// The generated bindings; their docs come from the WIT files.
    #[allow(missing_docs)]
    mod generated {
        wasmtime::component::bindgen!({
            path: "../../wit/1.1",
            world: "smart-module-batch",
            with: {
                "ksm:smart-module/types": crate::v1_0::types,
            },
        });
    }

    pub use generated::exports::ksm::smart_module::{batch, forwarder};
    pub use generated::{SmartModuleBatch, SmartModuleBatchPre};
}

pub mod bulk;

pub use types::Error as GuestError;
pub use v1_0::types;

/// Most bytes of guest-chosen text (error details, field names) ksm keeps:
/// longer text is cut there, with a note of its full length.
pub const MAX_GUEST_TEXT_BYTES: usize = 4096;

/// Most bytes of a guest-chosen name (a field, a MessagePack type) ksm keeps.
const MAX_GUEST_NAME_BYTES: usize = 256;

/// Guest-chosen text, cut to [`MAX_GUEST_TEXT_BYTES`] (at a character
/// boundary) with a note of how long it was.
pub fn bounded(text: &str) -> String {
    bounded_to(text, MAX_GUEST_TEXT_BYTES)
}

/// A guest-chosen name, cut like [`bounded`] but shorter.
fn name(text: &str) -> String {
    bounded_to(text, MAX_GUEST_NAME_BYTES)
}

fn bounded_to(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_owned();
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}… (cut: the guest's text is {} bytes)",
        &text[..end],
        text.len()
    )
}

/// A one-line description of a guest error, for module logs and dead
/// letters; the guest's own text in it is [`bounded`].
pub fn describe(error: &GuestError) -> String {
    match error {
        GuestError::UnsupportedVersion(found) => format!(
            "unsupported bulk data version `{}`: only \"1.0\" is supported",
            name(found)
        ),
        GuestError::MalformedPayload(fault) => format!(
            "malformed bulk data payload at byte {}: {}",
            fault.offset,
            bounded(&fault.detail)
        ),
        GuestError::NotByteArray(element) => format!(
            "bulk data element {} at byte {} is a MessagePack {}, not a byte array",
            element.index,
            element.offset,
            name(&element.found)
        ),
        GuestError::RecordTooLarge(record) => format!(
            "record {} is {} bytes (data plus partition key), over the module's limit of {}",
            record.index, record.size, record.limit
        ),
        GuestError::InvalidEventJson(fault) => format!(
            "event payload is not a JSON object (byte {}): {}",
            fault.offset,
            bounded(&fault.detail)
        ),
        GuestError::InvalidField(fault) => format!(
            "event field `{}`: {}",
            name(&fault.field),
            bounded(&fault.detail)
        ),
        GuestError::InvalidSettings(fault) => format!(
            "module setting `{}`: {}",
            name(&fault.field),
            bounded(&fault.detail)
        ),
        GuestError::NotConfigured => "the guest was called before configure".to_owned(),
        GuestError::Other(text) => bounded(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_text_is_bounded_with_a_note() {
        assert_eq!(bounded("short"), "short");
        let long = "é".repeat(30_000);
        let cut = bounded(&long);
        assert!(cut.len() < MAX_GUEST_TEXT_BYTES + 64, "{}", cut.len());
        assert!(
            cut.ends_with("(cut: the guest's text is 60000 bytes)"),
            "{cut}"
        );
        let error = GuestError::InvalidField(types::FieldFault {
            field: "f".repeat(10_000_000),
            detail: "d".repeat(10_000_000),
        });
        assert!(describe(&error).len() < MAX_GUEST_TEXT_BYTES + 512);
    }
}
