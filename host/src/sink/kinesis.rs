//! The Kinesis sink: batches one module's records into PutRecords calls,
//! retries what fails (only what fails, in order), and settles each record
//! once Kinesis accepted it or it was kept as a dead letter.
//!
//! Ordering: one request is in flight per module, and records that failed are
//! put back at the head of the queue in their original order, so they are
//! resent before anything newer. A partition key's records therefore reach
//! the stream in order, except when Kinesis fails an earlier record and
//! accepts a later one of the same key inside one request; the earlier one is
//! then resent by itself and lands after it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::sts::AssumeRoleProvider;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::config::{Region, SharedCredentialsProvider};
use aws_sdk_kinesis::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use bytes::Bytes;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::ack::Settlement;
use crate::activity::{Counters, Level};
use crate::config::{KinesisConfig, ModuleConfig};
use crate::dead_letter::DeadLetter;
use crate::module::Module;

/// Most records one PutRecords request may carry.
pub const MAX_RECORDS_PER_REQUEST: usize = 500;
/// Most bytes one PutRecords request may carry, data plus partition keys.
pub const MAX_BYTES_PER_REQUEST: usize = 5 * 1024 * 1024;
/// Most bytes one record may carry, data plus partition key.
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
/// Partition keys are 1 to 256 Unicode characters.
pub const MAX_PARTITION_KEY_CHARS: usize = 256;

/// One record on its way to Kinesis.
pub struct SinkRecord {
    /// Record data.
    pub data: Bytes,
    /// Partition key.
    pub partition_key: String,
    /// Explicit hash key, if the guest chose one.
    pub explicit_hash_key: Option<String>,
    /// MQTT topic the record came from (for dead letters).
    pub topic: Arc<str>,
    /// The message's outstanding part this record stands for.
    pub settlement: Settlement,
}

impl SinkRecord {
    fn size(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }

    /// Checks the record against Kinesis's own rules, so one bad record
    /// never makes a whole request fail.
    pub fn check(&self) -> Result<(), String> {
        let key_chars = self.partition_key.chars().count();
        if key_chars == 0 || key_chars > MAX_PARTITION_KEY_CHARS {
            return Err(format!(
                "partition key has {key_chars} characters; Kinesis takes 1 to {MAX_PARTITION_KEY_CHARS}"
            ));
        }
        if self.size() > MAX_RECORD_BYTES {
            return Err(format!(
                "record is {} bytes with its partition key; Kinesis takes at most {MAX_RECORD_BYTES}",
                self.size()
            ));
        }
        if let Some(key) = &self.explicit_hash_key
            && (key.is_empty() || !key.bytes().all(|b| b.is_ascii_digit()) || key.len() > 39)
        {
            return Err(format!(
                "explicit hash key `{key}` is not a decimal 128-bit integer"
            ));
        }
        Ok(())
    }
}

/// Builds the Kinesis client of a module: region, credentials (the assumed
/// role with its external ID, or the default chain), no SDK retries (the
/// sink retries itself) and a per-attempt timeout.
pub async fn client(module: &ModuleConfig, kinesis: &KinesisConfig) -> Client {
    let region = Region::new(module.region.clone());
    let base = aws_config::defaults(BehaviorVersion::latest())
        .region(region.clone())
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .operation_attempt_timeout(Duration::from_millis(kinesis.request_timeout_ms))
                .build(),
        )
        .load()
        .await;
    let Some(role_arn) = &module.role_arn else {
        return Client::new(&base);
    };
    let mut role = AssumeRoleProvider::builder(role_arn.clone())
        .session_name(format!("ksm-{}", module.id))
        .region(region)
        .configure(&base);
    if let Some(external_id) = &module.external_id {
        role = role.external_id(external_id.clone());
    }
    let credentials = SharedCredentialsProvider::new(role.build().await);
    let config = base
        .into_builder()
        .credentials_provider(credentials)
        .build();
    Client::new(&config)
}

/// How a failed PutRecords attempt is handled.
#[derive(Debug, thiserror::Error)]
enum PutError {
    /// The stream lacks capacity; retry later.
    #[error("{code}: {message}")]
    Throttled { code: String, message: String },
    /// The stream or its permissions need fixing; the data waits.
    #[error("{code}: {message}")]
    Stream { code: String, message: String },
    /// Kinesis refused the request's content; its records become dead letters.
    #[error("{code}: {message}")]
    Refused { code: String, message: String },
    /// Network trouble, timeouts or server errors; retry.
    #[error("{0}")]
    Transient(String),
}

fn classify<R>(
    error: SdkError<aws_sdk_kinesis::operation::put_records::PutRecordsError, R>,
) -> PutError
where
    R: std::fmt::Debug,
{
    let Some(code) = error.code().map(str::to_owned) else {
        return PutError::Transient(DisplayErrorContext(&error).to_string());
    };
    let message = error.message().unwrap_or_default().to_owned();
    match code.as_str() {
        "ProvisionedThroughputExceededException"
        | "KMSThrottlingException"
        | "LimitExceededException"
        | "ThrottlingException" => PutError::Throttled { code, message },
        "InvalidArgumentException" | "ValidationException" => PutError::Refused { code, message },
        "InternalFailure"
        | "InternalFailureException"
        | "ServiceUnavailable"
        | "ServiceUnavailableException" => PutError::Transient(format!("{code}: {message}")),
        _ => PutError::Stream { code, message },
    }
}

/// What to tell the user about a stream-level error.
fn advice(code: &str) -> &'static str {
    match code {
        "ResourceNotFoundException" => {
            "the stream does not exist in this region: create it or fix stream_name and region"
        }
        "AccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "ExpiredTokenException" => {
            "the credentials may not write to the stream: allow kinesis:PutRecords on the stream \
             for the role, and check role_arn and external_id"
        }
        "ResourceInUseException" => "the stream is being created, updated or deleted: wait",
        code if code.starts_with("KMS") => {
            "the stream's KMS key cannot be used: check the key's state and the role's kms permissions"
        }
        _ => "check the stream and the module's settings",
    }
}

const THROUGHPUT_ADVICE: &str = "the stream lacks write throughput capacity. Send less data \
     (fewer or smaller messages from devices) or add shards to the stream \
     (each shard takes 1 MiB/s or 1000 records/s)";

/// One module's sink task.
pub struct KinesisSink {
    client: Client,
    module: Arc<Module>,
    config: KinesisConfig,
    records: mpsc::Receiver<SinkRecord>,
    queue: VecDeque<SinkRecord>,
    failures: u32,
}

impl KinesisSink {
    /// A sink that sends what arrives on `records` to the module's stream.
    pub fn new(
        client: Client,
        module: Arc<Module>,
        config: KinesisConfig,
        records: mpsc::Receiver<SinkRecord>,
    ) -> Self {
        Self {
            client,
            module,
            config,
            records,
            queue: VecDeque::new(),
            failures: 0,
        }
    }

    /// Runs until the record channel closes and the queue is empty, or until
    /// `stop` turns true; records still queued then stay unsettled, so their
    /// messages stay unacknowledged at the broker.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            if *stop.borrow() {
                break;
            }
            if self.queue.is_empty() {
                tokio::select! {
                    record = self.records.recv() => match record {
                        Some(record) => self.queue.push_back(record),
                        None => break,
                    },
                    _ = stop.changed() => continue,
                }
            }
            self.linger().await;
            let batch = self.take_batch();
            let delay = self.send(batch).await;
            if let Some(delay) = delay {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => {}
                }
            }
        }
        if !self.queue.is_empty() {
            self.module.log.write(
                Level::Warn,
                format!(
                    "stopping with {} records not yet accepted by Kinesis; their messages stay \
                     unacknowledged and the broker will deliver them again",
                    self.queue.len()
                ),
            );
        }
    }

    /// Waits up to the linger time for more records while a batch has room.
    async fn linger(&mut self) {
        let deadline = Instant::now() + Duration::from_millis(self.config.linger_ms);
        while self.queue.len() < MAX_RECORDS_PER_REQUEST {
            tokio::select! {
                record = self.records.recv() => match record {
                    Some(record) => self.queue.push_back(record),
                    None => return,
                },
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    fn take_batch(&mut self) -> Vec<SinkRecord> {
        take_batch(&mut self.queue)
    }

    /// Sends one batch; returns how long to wait before the next attempt
    /// when something must be retried.
    async fn send(&mut self, batch: Vec<SinkRecord>) -> Option<Duration> {
        let stream = &self.module.config.stream_name;
        let entries = batch
            .iter()
            .map(|record| {
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(record.data.to_vec()))
                    .partition_key(&record.partition_key)
                    .set_explicit_hash_key(record.explicit_hash_key.clone())
                    .build()
                    .expect("data and partition key are set")
            })
            .collect();
        let result = self
            .client
            .put_records()
            .stream_name(stream)
            .set_records(Some(entries))
            .send()
            .await;
        let output = match result {
            Ok(output) => output,
            Err(error) => return self.request_failed(batch, classify(error)),
        };
        let results = output.records();
        if results.len() != batch.len() {
            let error = PutError::Transient(format!(
                "PutRecords answered {} results for {} records",
                results.len(),
                batch.len()
            ));
            return self.request_failed(batch, error);
        }
        let mut retry = Vec::new();
        let mut throttled = 0u64;
        let mut accepted = 0u64;
        let mut last_error = String::new();
        for (record, result) in batch.into_iter().zip(results) {
            match result.error_code() {
                None => {
                    accepted += 1;
                    record.settlement.settle();
                }
                Some(code) => {
                    if code == "ProvisionedThroughputExceededException"
                        || code.starts_with("KMSThrottling")
                    {
                        throttled += 1;
                    }
                    last_error = format!("{code}: {}", result.error_message().unwrap_or_default());
                    retry.push(record);
                }
            }
        }
        Counters::add(&self.module.counters.forwarded, accepted);
        if retry.is_empty() {
            self.failures = 0;
            return None;
        }
        let failed = retry.len();
        Counters::add(&self.module.counters.retried, failed as u64);
        Counters::add(&self.module.counters.throttled, throttled);
        if throttled > 0 {
            self.module.log.write_limited(
                "throughput",
                Level::Error,
                format!(
                    "Kinesis throttled {throttled} of {} records put to stream `{stream}` \
                     (ProvisionedThroughputExceededException); they are being retried: {THROUGHPUT_ADVICE}",
                    failed as u64 + accepted
                ),
            );
        } else {
            self.module.log.write_limited(
                "record-failure",
                Level::Warn,
                format!(
                    "Kinesis failed {failed} records put to stream `{stream}` ({last_error}); \
                     they are being retried"
                ),
            );
        }
        self.requeue(retry);
        Some(self.backoff())
    }

    fn request_failed(&mut self, batch: Vec<SinkRecord>, error: PutError) -> Option<Duration> {
        let stream = &self.module.config.stream_name;
        let log = &self.module.log;
        match &error {
            PutError::Throttled { .. } => {
                Counters::add(&self.module.counters.throttled, batch.len() as u64);
                log.write_limited(
                    "throughput",
                    Level::Error,
                    format!("PutRecords to stream `{stream}` was throttled ({error}); retrying: {THROUGHPUT_ADVICE}"),
                );
            }
            PutError::Stream { code, .. } => log.write_limited(
                "stream",
                Level::Error,
                format!(
                    "PutRecords to stream `{stream}` failed ({error}): {}; the data waits and is retried",
                    advice(code)
                ),
            ),
            PutError::Transient(_) => log.write_limited(
                "transient",
                Level::Warn,
                format!("PutRecords to stream `{stream}` failed ({error}); retrying"),
            ),
            PutError::Refused { .. } => {
                let letters: Vec<DeadLetter> = batch
                    .iter()
                    .map(|r| DeadLetter::new(format!("Kinesis refused the request: {error}"), &r.topic, None, &r.data))
                    .collect();
                if self.module.reject(&letters) {
                    batch.into_iter().for_each(|r| r.settlement.settle());
                }
                return None;
            }
        }
        Counters::add(&self.module.counters.retried, batch.len() as u64);
        self.requeue(batch);
        Some(self.backoff())
    }

    /// Puts failed records back at the head of the queue, in their order.
    fn requeue(&mut self, records: Vec<SinkRecord>) {
        for record in records.into_iter().rev() {
            self.queue.push_front(record);
        }
    }

    fn backoff(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        retry_delay(
            self.failures,
            self.config.retry_base_ms,
            self.config.retry_max_ms,
        )
    }
}

/// Takes the next batch from the head of the queue, within the request
/// limits (the 500-record and 5 MiB limits of one PutRecords request).
fn take_batch(queue: &mut VecDeque<SinkRecord>) -> Vec<SinkRecord> {
    let mut bytes = 0;
    let mut count = 0;
    for record in queue.iter() {
        if count == MAX_RECORDS_PER_REQUEST || bytes + record.size() > MAX_BYTES_PER_REQUEST {
            break;
        }
        bytes += record.size();
        count += 1;
    }
    queue.drain(..count).collect()
}

/// The delay before retry number `failures` (from 1): exponential from
/// `base_ms`, capped at `max_ms`, with jitter over its upper half.
fn retry_delay(failures: u32, base_ms: u64, max_ms: u64) -> Duration {
    let exponent = failures.clamp(1, 21) - 1;
    let ceiling = base_ms.saturating_mul(1 << exponent).min(max_ms);
    Duration::from_millis(rand::rng().random_range(ceiling / 2..=ceiling))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(len: usize, key: &str) -> SinkRecord {
        SinkRecord {
            data: Bytes::from(vec![0u8; len]),
            partition_key: key.to_owned(),
            explicit_hash_key: None,
            topic: "/devices/1/event".into(),
            settlement: Settlement::new(None),
        }
    }

    #[test]
    fn batches_hold_at_most_500_records() {
        let mut queue: VecDeque<_> = (0..1201).map(|_| record(10, "k")).collect();
        let sizes: Vec<usize> = std::iter::from_fn(|| {
            let batch = take_batch(&mut queue);
            (!batch.is_empty()).then_some(batch.len())
        })
        .collect();
        assert_eq!(sizes, [500, 500, 201]);
    }

    #[test]
    fn batches_hold_at_most_5_mib_counting_keys() {
        let mut queue: VecDeque<_> = (0..6)
            .map(|_| record(MAX_RECORD_BYTES - 4, "1001"))
            .collect();
        assert_eq!(take_batch(&mut queue).len(), 5, "exactly 5 MiB fits");
        let mut queue: VecDeque<_> = (0..6)
            .map(|_| record(MAX_RECORD_BYTES - 3, "1001"))
            .collect();
        assert_eq!(take_batch(&mut queue).len(), 4, "one byte more does not");
    }

    #[test]
    fn records_are_checked_against_kinesis_limits() {
        assert!(record(MAX_RECORD_BYTES - 4, "1001").check().is_ok());
        assert!(record(MAX_RECORD_BYTES - 3, "1001").check().is_err());
        assert!(record(1, "").check().is_err());
        assert!(
            record(1, &"ü".repeat(256)).check().is_ok(),
            "256 characters, 512 bytes"
        );
        assert!(record(1, &"k".repeat(257)).check().is_err());
        let mut hashed = record(1, "k");
        hashed.explicit_hash_key = Some("340282366920938463463374607431768211455".into());
        assert!(hashed.check().is_ok());
        hashed.explicit_hash_key = Some("0x10".into());
        assert!(hashed.check().is_err());
    }

    #[test]
    fn retry_delays_grow_and_are_capped() {
        for _ in 0..100 {
            let first = retry_delay(1, 100, 10_000).as_millis();
            assert!((50..=100).contains(&first), "{first}");
            let fourth = retry_delay(4, 100, 10_000).as_millis();
            assert!((400..=800).contains(&fourth), "{fourth}");
            let late = retry_delay(40, 100, 10_000).as_millis();
            assert!((5_000..=10_000).contains(&late), "{late}");
        }
    }
}
