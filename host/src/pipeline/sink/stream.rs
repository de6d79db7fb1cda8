//! What a module's stream takes beyond what every stream does: its maximum
//! record size (`MaxRecordSizeInKiB`, from DescribeStreamSummary), read at
//! start for a module that sends Kinesis records over 1 MiB, so that a
//! module the stream cannot take is refused with the reason rather than
//! turning its large records into dead letters.

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::error::DisplayErrorContext;

use crate::config::ModuleConfig;
use crate::kinesis::{MAX_RECORD_BYTES, StreamLimits};

/// The limits of `module`'s stream, read only when the module needs more
/// than every stream takes; `Err` says why the module cannot start.
pub async fn module_stream_limits(
    client: &Client,
    module: &ModuleConfig,
) -> Result<StreamLimits, String> {
    let largest = module.largest_kinesis_record() as usize;
    if largest <= MAX_RECORD_BYTES {
        return Ok(StreamLimits::default());
    }
    let stream = &module.stream_name;
    let field = if module.max_record_size as usize == largest {
        "max_record_size"
    } else {
        "aggregation_max_bytes"
    };
    let summary = client
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await
        .map_err(|error| {
            format!(
                "module `{}` has {field} = {largest}, above the {MAX_RECORD_BYTES} bytes every \
                 stream takes, so ksm reads stream `{stream}`'s maximum record size, and \
                 DescribeStreamSummary failed: {}. Allow kinesis:DescribeStreamSummary on the \
                 stream, or lower {field} to {MAX_RECORD_BYTES}",
                module.id,
                DisplayErrorContext(&error)
            )
        })?;
    let kib = summary
        .stream_description_summary()
        .and_then(|summary| summary.max_record_size_in_kib());
    let limits = StreamLimits::from_kib(kib);
    if largest > limits.max_record_bytes {
        let told = kib.map_or_else(
            || "it does not say, so it has the default".to_owned(),
            |kib| format!("MaxRecordSizeInKiB = {kib}"),
        );
        return Err(format!(
            "module `{}` has {field} = {largest}, but stream `{stream}` takes records of at most \
             {} bytes ({told}); raise the stream's limit (UpdateMaxRecordSize) or lower {field}",
            module.id, limits.max_record_bytes
        ));
    }
    Ok(limits)
}
