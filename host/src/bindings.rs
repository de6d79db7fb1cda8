//! Host bindings of the `ksm:smart-module` WIT world: the one `bindgen!`
//! invocation, plus readable descriptions of the guest's error variants.

/// The generated bindings; their docs come from the WIT files.
#[allow(missing_docs)]
mod generated {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "smart-module",
    });
}

pub use generated::exports::ksm::smart_module::forwarder;
pub use generated::ksm::smart_module::types;
pub use generated::{SmartModule, SmartModulePre};
pub use types::Error as GuestError;

/// A one-line description of a guest error, for module logs and dead letters.
pub fn describe(error: &GuestError) -> String {
    match error {
        GuestError::UnsupportedVersion(found) => {
            format!("unsupported bulk data version `{found}`: only \"1.0\" is supported")
        }
        GuestError::MalformedPayload(fault) => format!(
            "malformed bulk data payload at byte {}: {}",
            fault.offset, fault.detail
        ),
        GuestError::NotByteArray(element) => format!(
            "bulk data element {} at byte {} is a MessagePack {}, not a byte array",
            element.index, element.offset, element.found
        ),
        GuestError::RecordTooLarge(record) => format!(
            "record {} is {} bytes (data plus partition key), over the module's limit of {}",
            record.index, record.size, record.limit
        ),
        GuestError::InvalidEventJson(fault) => format!(
            "event payload is not a JSON object (byte {}): {}",
            fault.offset, fault.detail
        ),
        GuestError::InvalidField(fault) => {
            format!("event field `{}`: {}", fault.field, fault.detail)
        }
        GuestError::InvalidSettings(fault) => {
            format!("module setting `{}`: {}", fault.field, fault.detail)
        }
        GuestError::NotConfigured => "the guest was called before configure".to_owned(),
        GuestError::Other(text) => text.clone(),
    }
}
