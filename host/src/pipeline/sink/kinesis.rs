//! The Kinesis sink: sends one module's spooled records with PutRecords,
//! retries what fails (only what fails), and removes from the spool what
//! Kinesis accepted.
//!
//! Records come from the spool through a bounded window ([`SpoolReader`]),
//! wait in a [`Backlog`] per partition key, and go out in up to
//! `kinesis.max_in_flight` requests at once; a key's records are in at most
//! one request at a time, in order. With `kinesis.ordering = "key"` a
//! request carries many records of a key: when Kinesis fails one and
//! accepts a later one of its key, the failed one lands after it, counted
//! as `reordered` and logged. With `"strict"` a request carries one record
//! per key, so order holds even then. With `aggregation = "kpl"` a
//! request's records bound for one shard share KPL aggregates
//! ([`super::pack`]); a key's records in a request share one, which Kinesis
//! accepts or fails whole, so order holds in either mode. Per-shard pacing
//! ([`super::shards`]) keeps each shard under its write limits, so
//! throttling is the exception.
//! Waiting (pacing, backoff, a full window) sleeps until the next deadline
//! or answer.
//!
//! Retries end only for a record Kinesis keeps failing while others go
//! through ([`super::retry`]): it becomes a dead letter so that its key's
//! next records can go. Throttling, an unreachable endpoint, stream-level
//! errors and outages are retried for as long as the spool holds the data.

use std::sync::Arc;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::sts::AssumeRoleProvider;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::config::{Region, SharedCredentialsProvider};
use aws_sdk_kinesis::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::operation::put_records::{PutRecordsError, PutRecordsOutput};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::api::{KinesisApi, PutRecordsAnswer};
use super::backlog::{Answer, Backlog, Verdict, overtaken};
use super::pack::{AggregateLimits, Batch, Entry, PackLimits, Packer};
use super::retry::{Failure, FailureKind, RetryLimits};
use super::shards::{ShardMap, ShardPacer};
use crate::activity::{Counters, Level};
use crate::config::{Aggregation, KinesisConfig, ModuleConfig, Ordering};
use crate::kinesis::aggregate::Aggregate;
use crate::kinesis::{MAX_RECORDS_PER_REQUEST, StreamLimits};
use crate::module::Module;
use crate::store::dead_letter::DeadLetter;
use crate::store::spool::{SpoolReader, SpoolRecord};

/// Most bytes of records in flight per module before no more requests
/// start (one request always may).
const MAX_BYTES_IN_FLIGHT: usize = 16 * 1024 * 1024;
/// Shortest sleep of a sink that pacing holds back.
const PACED_MIN_WAIT: Duration = Duration::from_millis(5);
/// How often the shard map is listed again at most.
const SHARD_REFRESH_MIN: Duration = Duration::from_secs(5);
/// How often the shard map is listed again anyway (to notice resharding).
const SHARD_REFRESH_MAX: Duration = Duration::from_secs(60);

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
    /// A server error (5xx); retry, in smaller requests if it had several
    /// records.
    #[error("{0}")]
    Server(String),
    /// No answer (network trouble, timeouts) or one that cannot be read; retry.
    #[error("{0}")]
    Unreachable(String),
}

impl PutError {
    /// Its Kinesis error code, or what happened when it has none.
    fn code(&self) -> &str {
        match self {
            PutError::Throttled { code, .. }
            | PutError::Stream { code, .. }
            | PutError::Refused { code, .. } => code,
            PutError::Server(_) => "server_error",
            PutError::Unreachable(_) => "unreachable",
        }
    }

    /// The failure as the backlog weighs it.
    fn failure(&self) -> Failure {
        let kind = match self {
            PutError::Throttled { .. } => FailureKind::Throttled,
            PutError::Stream { .. } => FailureKind::Stream,
            PutError::Refused { .. } => FailureKind::Refused,
            PutError::Server(_) => FailureKind::Server,
            PutError::Unreachable(_) => FailureKind::Unreachable,
        };
        Failure::new(kind, self.to_string())
    }
}

/// The kind of a Kinesis error code ksm knows, request- or record-level.
fn code_kind(code: &str) -> Option<FailureKind> {
    match code {
        "ProvisionedThroughputExceededException"
        | "KMSThrottlingException"
        | "LimitExceededException"
        | "ThrottlingException" => Some(FailureKind::Throttled),
        "InvalidArgumentException" | "ValidationException" => Some(FailureKind::Refused),
        "InternalFailure"
        | "InternalFailureException"
        | "ServiceUnavailable"
        | "ServiceUnavailableException" => Some(FailureKind::Server),
        "ResourceNotFoundException"
        | "ResourceInUseException"
        | "AccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "ExpiredTokenException" => Some(FailureKind::Stream),
        code if code.starts_with("KMS") => Some(FailureKind::Stream),
        _ => None,
    }
}

/// How a failed PutRecords request is handled: by its error code, else by
/// its HTTP status (any 5xx is a server error; another code is taken for a
/// stream-level problem); without an answer, the endpoint is unreachable.
fn classify(error: SdkError<PutRecordsError>) -> PutError {
    let server_status = error
        .raw_response()
        .is_some_and(|response| response.status().is_server_error());
    let Some(code) = error.code().map(str::to_owned) else {
        let text = DisplayErrorContext(&error).to_string();
        return if server_status {
            PutError::Server(text)
        } else {
            PutError::Unreachable(text)
        };
    };
    let message = error.message().unwrap_or_default().to_owned();
    let kind = code_kind(&code).unwrap_or(if server_status {
        FailureKind::Server
    } else {
        FailureKind::Stream
    });
    match kind {
        FailureKind::Throttled => PutError::Throttled { code, message },
        FailureKind::Refused => PutError::Refused { code, message },
        FailureKind::Server => PutError::Server(format!("{code}: {message}")),
        FailureKind::Stream | FailureKind::Unreachable => PutError::Stream { code, message },
    }
}

/// How a record failed inside a 200 answer: throttling and stream-level
/// codes (KMS) as such; any other code is a failure of the record.
fn entry_failure(code: &str, message: &str) -> Failure {
    let kind = match code_kind(code) {
        Some(FailureKind::Throttled) => FailureKind::Throttled,
        Some(FailureKind::Stream) => FailureKind::Stream,
        _ => FailureKind::Server,
    };
    Failure::new(kind, format!("{code}: {message}"))
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

/// The shard map and its pacing, once listed.
struct Shards {
    map: ShardMap,
    pacer: ShardPacer,
    listed_at: Instant,
}

/// A Kinesis record of a request in flight.
struct Sent {
    /// How many of the request's records it holds.
    records: usize,
    /// For an aggregate: the shard it was packed for, by ID, and the hash
    /// key that places it there (its first record's).
    aggregate_of: Option<(String, u128)>,
}

/// A request that came back: its records and what Kinesis answered.
struct Answered {
    records: Vec<SpoolRecord>,
    entries: Vec<Sent>,
    bytes: usize,
    result: PutRecordsAnswer,
    /// How long the request took.
    took: Duration,
}

/// One module's sink task.
pub struct KinesisSink {
    api: Arc<dyn KinesisApi>,
    module: Arc<Module>,
    /// The stream it writes to (a module given another one gets a new sink).
    stream_name: String,
    config: KinesisConfig,
    /// What one request may hold, and how records are aggregated.
    pack: PackLimits,
    input: mpsc::UnboundedReceiver<Vec<SpoolRecord>>,
    reader: SpoolReader,
    backlog: Backlog,
    shards: Option<Shards>,
    shards_stale: bool,
    shards_tried_at: Option<Instant>,
    /// Consecutive request-level failures, for the sink-wide backoff.
    failures: u32,
    /// Requests sent and not yet answered.
    in_flight: JoinSet<Answered>,
    /// Their bytes and records.
    in_flight_bytes: usize,
    in_flight_records: usize,
    /// When the last request started.
    last_start: Instant,
    /// No request starts before this (a request as a whole failed).
    paused_until: Option<Instant>,
    /// No request starts before this (pacing held records back).
    paced_until: Option<Instant>,
}

impl KinesisSink {
    /// A sink for the module's stream (which takes `stream`), reading its
    /// spool through `reader` (first what an earlier run left, then what
    /// arrives on `input`).
    pub fn new(
        api: Arc<dyn KinesisApi>,
        module: Arc<Module>,
        config: KinesisConfig,
        stream: StreamLimits,
        reader: SpoolReader,
        input: mpsc::UnboundedReceiver<Vec<SpoolRecord>>,
    ) -> Self {
        let settings = module.config();
        let aggregation = match settings.aggregation {
            Aggregation::None => None,
            Aggregation::Kpl => Some(AggregateLimits {
                max_bytes: settings.aggregation_max_bytes as usize,
                max_records: settings.aggregation_max_records as usize,
            }),
        };
        let per_key = match (aggregation, config.ordering) {
            // A key's records in a request share one aggregate.
            (Some(_), _) => usize::MAX,
            (None, Ordering::Key) => MAX_RECORDS_PER_REQUEST,
            (None, Ordering::Strict) => 1,
        };
        let backlog = Backlog::new(per_key, RetryLimits::from_config(&config));
        Self {
            api,
            module,
            stream_name: settings.stream_name.clone(),
            config,
            pack: PackLimits {
                request_bytes: stream.request_bytes(),
                aggregation,
            },
            input,
            reader,
            backlog,
            shards: None,
            shards_stale: true,
            shards_tried_at: None,
            failures: 0,
            in_flight: JoinSet::new(),
            in_flight_bytes: 0,
            in_flight_records: 0,
            last_start: Instant::now(),
            paused_until: None,
            paced_until: None,
        }
    }

    /// Runs until the input closes and the spool is empty, or until `stop`
    /// turns true; what is left stays in the spool for the next run.
    /// Stopping abandons the requests in flight: their records stay in the
    /// spool (and may land twice if Kinesis had taken them).
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut open = true;
        let mut linger_until: Option<Instant> = None;
        let linger = Duration::from_millis(self.config.linger_ms);
        if let Some(limits) = self.pack.aggregation {
            self.module.log.write(
                Level::Info,
                format!(
                    "aggregation is on: records bound for one shard share KPL aggregated records \
                     of up to {} bytes and {} records each",
                    limits.max_bytes, limits.max_records
                ),
            );
        }
        loop {
            if *stop.borrow() {
                break;
            }
            while let Ok(records) = self.input.try_recv() {
                self.take(records, &mut linger_until, linger);
            }
            self.refill();
            if self.backlog.is_empty() && self.in_flight.is_empty() {
                if !open && !self.reader.has_more_on_disk() {
                    break;
                }
                tokio::select! {
                    records = self.input.recv(), if open => match records {
                        Some(records) => self.take(records, &mut linger_until, linger),
                        None => open = false,
                    },
                    _ = stop.changed() => {}
                }
                continue;
            }
            // Give a batch a moment to fill after a quiet spell.
            if let Some(until) = linger_until
                && open
                && self.in_flight.is_empty()
                && !self.has_full_request(self.backlog.len(), self.backlog.bytes())
                && Instant::now() < until
            {
                tokio::select! {
                    records = self.input.recv() => match records {
                        Some(records) => self.take(records, &mut linger_until, linger),
                        None => open = false,
                    },
                    _ = tokio::time::sleep_until(until) => linger_until = None,
                    _ = stop.changed() => {}
                }
                continue;
            }
            linger_until = None;
            let now = Instant::now();
            let mut wake = [
                self.paused_until,
                self.paced_until,
                self.next_partial(linger),
            ]
            .into_iter()
            .flatten()
            .filter(|at| *at > now)
            .min();
            if wake.is_none() && self.has_window() {
                self.paused_until = None;
                self.paced_until = None;
                self.refresh_shards().await;
                let batch = self.next_batch();
                if let Some(wait) = batch.paced_for {
                    // Held back by pacing: sleep for a while rather than
                    // wake for every token.
                    self.paced_until = Some(now + wait.max(linger).max(PACED_MIN_WAIT));
                }
                if !batch.records.is_empty() {
                    if batch.full {
                        self.paced_until = None;
                    }
                    self.start(batch);
                    continue;
                }
                let retry = self.backlog.next_retry().map(Instant::from_std);
                wake = [retry, self.paced_until].into_iter().flatten().min();
            }
            // With nothing in flight and nothing to wait for, look again
            // in a while (a key's backoff may be all that holds it).
            if wake.is_none() && self.in_flight.is_empty() {
                wake = Some(now + Duration::from_millis(100));
            }
            tokio::select! {
                records = self.input.recv(), if open => match records {
                    Some(records) => self.take(records, &mut linger_until, linger),
                    None => open = false,
                },
                Some(answered) = self.in_flight.join_next(), if !self.in_flight.is_empty() => {
                    match answered {
                        Ok(answered) => self.answered(answered),
                        Err(error) => tracing::error!("a PutRecords task failed: {error}"),
                    }
                }
                _ = sleep_until_or_never(wake) => {}
                _ = stop.changed() => {}
            }
        }
        let (records, _) = self.module.spool.len();
        if records > 0 {
            self.module.log.write(
                Level::Info,
                format!(
                    "stopping with {records} records in the spool; the next sink sends them (after \
                     the restart, or now if the module's destination changed)"
                ),
            );
        }
    }

    /// When another request that may not be full can start beside those in
    /// flight: a linger after the last one started (full requests go at
    /// once), so that requests stay large while the sink keeps up.
    fn next_partial(&self, linger: Duration) -> Option<Instant> {
        let records = self.backlog.len().saturating_sub(self.in_flight_records);
        let bytes = self.backlog.bytes().saturating_sub(self.in_flight_bytes);
        (!self.in_flight.is_empty() && !self.has_full_request(records, bytes))
            .then(|| self.last_start + linger)
    }

    /// Whether `records` of `bytes` bytes fill a request: 500 records
    /// (without aggregation), or the request's bytes.
    fn has_full_request(&self, records: usize, bytes: usize) -> bool {
        bytes >= self.pack.request_bytes
            || (self.pack.aggregation.is_none() && records >= MAX_RECORDS_PER_REQUEST)
    }

    /// True while another request may start: fewer than
    /// `kinesis.max_in_flight` in flight, within the bytes in flight.
    fn has_window(&self) -> bool {
        self.in_flight.len() < self.config.max_in_flight
            && (self.in_flight.is_empty() || self.in_flight_bytes < MAX_BYTES_IN_FLIGHT)
    }

    fn take(
        &mut self,
        records: Vec<SpoolRecord>,
        linger_until: &mut Option<Instant>,
        linger: Duration,
    ) {
        let records = self.reader.offer(records);
        if records.is_empty() {
            return;
        }
        if self.backlog.is_empty() && !linger.is_zero() {
            *linger_until = Some(Instant::now() + linger);
        }
        records.into_iter().for_each(|r| self.backlog.push(r));
    }

    /// Reads the spool's next groups back from disk once there is room.
    fn refill(&mut self) {
        if !self.reader.wants_refill() {
            return;
        }
        let backlog = &mut self.backlog;
        if let Err(error) = self.reader.refill(&self.module.spool, |r| backlog.push(r)) {
            self.module.log.write_limited(
                "store",
                Level::Error,
                format!("cannot read records back from the spool: {error}"),
            );
        }
    }

    /// The next request's records, packed into its Kinesis records and
    /// paced per shard when the map is known.
    fn next_batch(&mut self) -> Batch {
        let now = std::time::Instant::now();
        let shards = self
            .shards
            .as_mut()
            .map(|shards| (&shards.map, &mut shards.pacer));
        let mut packer = Packer::new(self.pack, shards, now);
        if self.shards_stale {
            packer = packer.by_key();
        }
        let batch = self.backlog.next_batch(now, packer);
        self.shards_stale |= batch.unmapped;
        batch
    }

    /// Lists the stream's shards when the map is stale or old (rate-limited).
    async fn refresh_shards(&mut self) {
        let now = Instant::now();
        let old = self
            .shards
            .as_ref()
            .is_some_and(|s| now.duration_since(s.listed_at) >= SHARD_REFRESH_MAX);
        let recently_tried = self
            .shards_tried_at
            .is_some_and(|at| now.duration_since(at) < SHARD_REFRESH_MIN);
        if !(self.shards_stale || old) || recently_tried {
            return;
        }
        self.shards_tried_at = Some(now);
        let stream = &self.stream_name;
        match self.api.open_shards(stream).await {
            Ok(map) => {
                let changed = self
                    .shards
                    .as_ref()
                    .is_none_or(|s| s.map.len() != map.len());
                if changed {
                    self.module.log.write(
                        Level::Info,
                        format!(
                            "stream `{stream}` has {} open shards; pacing each under {} records/s and {} bytes/s",
                            map.len(),
                            self.config.shard_records_per_sec,
                            self.config.shard_bytes_per_sec
                        ),
                    );
                }
                let pacer = ShardPacer::new(
                    map.len(),
                    self.config.shard_records_per_sec,
                    self.config.shard_bytes_per_sec,
                );
                self.shards = Some(Shards {
                    map,
                    pacer,
                    listed_at: now,
                });
                self.shards_stale = false;
            }
            Err(error) => {
                self.module.log.write_limited(
                    "list-shards",
                    Level::Warn,
                    format!(
                        "cannot list the shards of stream `{stream}` ({error}); records are sent \
                         without per-shard pacing. Allow kinesis:ListShards on the stream to enable it"
                    ),
                );
            }
        }
    }

    /// Sends one batch as a request of its own, in flight beside the others.
    fn start(&mut self, batch: Batch) {
        let Batch {
            records, entries, ..
        } = batch;
        let bytes: usize = records.iter().map(|r| r.size).sum();
        let mut request = Vec::with_capacity(entries.len());
        let mut sent = Vec::with_capacity(entries.len());
        let mut rest = records.as_slice();
        for entry in &entries {
            let (own, after) = rest.split_at(entry.records);
            rest = after;
            request.push(self.request_entry(entry, own));
            // Only an aggregate needs its predicted shard's ID back.
            let aggregate_of = entry
                .shard
                .filter(|_| entry.aggregated)
                .zip(self.shards.as_ref())
                .map(|(index, shards)| (shards.map.id(index).to_owned(), own[0].hash_key));
            sent.push(Sent {
                records: entry.records,
                aggregate_of,
            });
        }
        let request = self.api.put(&self.stream_name, request);
        self.in_flight_bytes += bytes;
        self.in_flight_records += records.len();
        self.last_start = Instant::now();
        Counters::add(&self.module.metrics.put_requests, 1);
        self.in_flight.spawn(async move {
            let started = Instant::now();
            let result = request.await;
            Answered {
                records,
                entries: sent,
                bytes,
                result,
                took: started.elapsed(),
            }
        });
    }

    /// The PutRecords entry of one Kinesis record: a record as it is, or an
    /// aggregate placed by its first record's partition key and hash key.
    fn request_entry(&self, entry: &Entry, records: &[SpoolRecord]) -> PutRecordsRequestEntry {
        let first = &records[0];
        let built = if entry.aggregated {
            let data = Aggregate::encode(records.iter().map(|record| {
                (
                    &*record.partition_key,
                    record.explicit_hash_key.as_deref(),
                    &record.data,
                )
            }));
            PutRecordsRequestEntry::builder()
                .data(Blob::new(data))
                .partition_key(&*first.partition_key)
                .explicit_hash_key(first.hash_key.to_string())
                .build()
        } else {
            PutRecordsRequestEntry::builder()
                .data(Blob::from_maybe_shared(first.data.clone()))
                .partition_key(&*first.partition_key)
                .set_explicit_hash_key(first.explicit_hash_key.as_deref().map(str::to_owned))
                .build()
        };
        built.expect("data and partition key are set")
    }

    /// Settles a request that came back.
    fn answered(&mut self, answered: Answered) {
        let Answered {
            records,
            entries,
            bytes,
            result,
            took,
        } = answered;
        self.module.metrics.put_duration.observe(took);
        self.in_flight_bytes -= bytes;
        self.in_flight_records -= records.len();
        let pause = match result {
            Ok(output) => self.put(records, &entries, &output),
            Err(error) => self.request_failed(records, classify(error)),
        };
        if let Some(pause) = pause {
            let until = Instant::now() + pause;
            self.paused_until = Some(self.paused_until.map_or(until, |at| at.max(until)));
        }
    }

    /// Settles the records of a 200 answer; returns how long the whole sink
    /// should pause if the answer cannot be read.
    fn put(
        &mut self,
        records: Vec<SpoolRecord>,
        entries: &[Sent],
        output: &PutRecordsOutput,
    ) -> Option<Duration> {
        let stream = self.stream_name.clone();
        let results = output.records();
        if results.len() != entries.len() {
            let error = PutError::Unreachable(format!(
                "PutRecords answered {} results for {} Kinesis records",
                results.len(),
                entries.len()
            ));
            return self.request_failed(records, error);
        }
        self.failures = 0;
        let now = std::time::Instant::now();
        let mut failures = Vec::with_capacity(records.len());
        let mut throttled = 0u64;
        let mut written = 0u64;
        let mut misplaced: Option<(usize, String)> = None;
        let mut suspect_aggregates = Vec::new();
        let mut last_error = String::new();
        let mut offset = 0;
        for (entry, result) in entries.iter().zip(results) {
            let range = offset..offset + entry.records;
            offset = range.end;
            let own = &records[range.clone()];
            let shard = self.shards.as_mut().and_then(|shards| {
                shards
                    .map
                    .shard_of(own[0].hash_key)
                    .map(|index| (shards, index))
            });
            let Some(code) = result.error_code() else {
                written += 1;
                let landed = result.shard_id().unwrap_or_default();
                match &entry.aggregate_of {
                    Some((predicted, placed_by)) if !landed.is_empty() && predicted != landed => {
                        // The stream was resharded: the aggregate's records
                        // of other hash keys than the one that placed it may
                        // belong to another shard, where KCL consumers look
                        // for them; they go again, as the KPL does.
                        self.shards_stale = true;
                        let reason = Failure::new(
                            FailureKind::Stream,
                            format!(
                                "its aggregate landed on shard {landed}, not {predicted} as the \
                                 shard map predicted (the stream was resharded)"
                            ),
                        );
                        for record in own {
                            if record.hash_key == *placed_by {
                                failures.push(None);
                            } else {
                                let count = misplaced.get_or_insert((0, reason.detail.clone()));
                                count.0 += 1;
                                failures.push(Some(reason.clone()));
                            }
                        }
                    }
                    _ => {
                        if let Some((shards, index)) = &shard
                            && !landed.is_empty()
                            && shards.map.id(*index) != landed
                        {
                            self.shards_stale = true;
                        }
                        failures.extend(own.iter().map(|_| None));
                    }
                }
                continue;
            };
            self.module.metrics.put_failed(code, 1);
            let failure = entry_failure(code, result.error_message().unwrap_or_default());
            if failure.kind == FailureKind::Throttled {
                throttled += own.len() as u64;
                if let Some((shards, index)) = shard {
                    shards.pacer.throttled(index, now);
                }
            }
            if failure.kind == FailureKind::Server && own.len() > 1 {
                suspect_aggregates.push(range);
            }
            last_error.clone_from(&failure.detail);
            failures.extend(own.iter().map(|_| Some(failure.clone())));
        }
        Counters::add(&self.module.counters.kinesis_records, written);
        if let Some((count, detail)) = misplaced {
            self.module.log.write_limited(
                "resharded",
                Level::Warn,
                format!(
                    "{count} aggregated records put to stream `{stream}` are sent again: {detail}; \
                     consumers that read aggregates by shard (the KCL) skip the copies that \
                     landed on the wrong shard"
                ),
            );
        }
        let shared: Vec<bool> = if entries.len() < records.len() {
            entries
                .iter()
                .flat_map(|entry| std::iter::repeat_n(entry.records > 1, entry.records))
                .collect()
        } else {
            Vec::new()
        };
        let answer = if shared.is_empty() {
            Answer::Entries(&failures)
        } else {
            Answer::Aggregated(&failures, &shared)
        };
        let verdicts = self.backlog.settle(&records, answer, now);
        for range in suspect_aggregates {
            let suspects = &records[range];
            self.backlog.narrow(suspects, suspects.len().div_ceil(2));
        }
        self.note_overtaken(&records, &verdicts);
        let accepted: Vec<(u64, usize)> = records
            .iter()
            .zip(&verdicts)
            .filter(|(_, verdict)| **verdict == Verdict::Accepted)
            .map(|(record, _)| (record.seq, record.size))
            .collect();
        if let Err(error) = self.reader.settle(&self.module.spool, &accepted) {
            self.module.log.write_limited(
                "store",
                Level::Error,
                format!("cannot remove sent records from the spool (they will be sent again after a restart): {error}"),
            );
        }
        Counters::add(&self.module.counters.forwarded, accepted.len() as u64);
        self.observe_delivery(&records, &verdicts);
        let failed = retried(&verdicts);
        Counters::add(&self.module.counters.throttled, throttled);
        if failed > 0 {
            Counters::add(&self.module.counters.retried, failed as u64);
            if throttled > 0 {
                self.module.log.write_limited(
                    "throughput",
                    Level::Error,
                    format!(
                        "Kinesis throttled {throttled} of {} records put to stream `{stream}` \
                         (ProvisionedThroughputExceededException); they are being retried: {THROUGHPUT_ADVICE}",
                        records.len()
                    ),
                );
            } else if !last_error.is_empty() {
                // (Records sent again only because their aggregate landed
                // on another shard were logged above.)
                self.module.log.write_limited(
                    "record-failure",
                    Level::Warn,
                    format!(
                        "Kinesis failed {failed} records put to stream `{stream}` ({last_error}); \
                         they are being retried"
                    ),
                );
            }
        }
        let done = self.give_up(&records, &verdicts);
        self.complete(&records, &done);
        None
    }

    /// Observes, for each accepted record whose receive time is known, how
    /// long it took from ksm receiving its message until now.
    fn observe_delivery(&self, records: &[SpoolRecord], verdicts: &[Verdict]) {
        let now_ms = u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
        )
        .unwrap_or(u64::MAX);
        let delivery = &self.module.metrics.delivery;
        for (record, verdict) in records.iter().zip(verdicts) {
            if *verdict == Verdict::Accepted && record.received_ms != 0 {
                delivery.observe(Duration::from_millis(
                    now_ms.saturating_sub(record.received_ms),
                ));
            }
        }
    }

    /// Counts and logs the records Kinesis failed while it accepted a later
    /// record of their key in the same request: they land after it.
    fn note_overtaken(&self, records: &[SpoolRecord], verdicts: &[Verdict]) {
        let overtaken = overtaken(records, verdicts);
        let Some(first) = overtaken.first() else {
            return;
        };
        Counters::add(&self.module.counters.reordered, overtaken.len() as u64);
        let others = match overtaken.len() {
            1 => String::new(),
            n => format!(" ({} more records of this or other keys too)", n - 1),
        };
        self.module.log.write_limited(
            "reordered",
            Level::Warn,
            format!(
                "Kinesis failed a record of partition key `{}` and accepted a later one of the \
                 same key in the same request: the failed record is sent again and lands after \
                 it{others}. Set kinesis.ordering = \"strict\" if order must hold even then",
                first.partition_key
            ),
        );
    }

    fn complete(&mut self, records: &[SpoolRecord], done: &[bool]) {
        let (base, max) = (self.config.retry_base_ms, self.config.retry_max_ms);
        self.backlog
            .complete(records, done, std::time::Instant::now(), |failures| {
                retry_delay(failures, base, max)
            });
    }

    /// Moves the records the verdicts give up to the dead letters; returns
    /// which records left the spool (accepted, or moved).
    fn give_up(&mut self, records: &[SpoolRecord], verdicts: &[Verdict]) -> Vec<bool> {
        records
            .iter()
            .zip(verdicts)
            .map(|(record, verdict)| match verdict {
                Verdict::Accepted => true,
                Verdict::Retry => false,
                Verdict::DeadLetter(reason) => {
                    self.dead_letter(std::slice::from_ref(record), reason)
                }
            })
            .collect()
    }

    fn request_failed(&mut self, records: Vec<SpoolRecord>, error: PutError) -> Option<Duration> {
        let now = std::time::Instant::now();
        let verdicts = self
            .backlog
            .settle(&records, Answer::Request(&error.failure()), now);
        self.module.metrics.put_failed(error.code(), 1);
        let stream = &self.stream_name;
        let log = &self.module.log;
        match &error {
            PutError::Throttled { .. } => {
                Counters::add(&self.module.counters.throttled, records.len() as u64);
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
                    "PutRecords to stream `{stream}` failed ({error}): {}; the data waits in the spool and is retried",
                    advice(code)
                ),
            ),
            PutError::Server(_) if records.len() > 1 => log.write_limited(
                "transient",
                Level::Warn,
                format!(
                    "PutRecords to stream `{stream}` failed ({error}); retrying its {} records \
                     in requests of at most {}, in case one of them causes it",
                    records.len(),
                    records.len().div_ceil(2)
                ),
            ),
            PutError::Server(_) | PutError::Unreachable(_) => log.write_limited(
                "transient",
                Level::Warn,
                format!("PutRecords to stream `{stream}` failed ({error}); retrying"),
            ),
            // One of the records is refused: send them one by one to find it.
            PutError::Refused { .. } if records.len() > 1 => log.write_limited(
                "refused",
                Level::Warn,
                format!("Kinesis refused a request to stream `{stream}` ({error}); sending its records one by one to find the refused one"),
            ),
            PutError::Refused { .. } => {}
        }
        Counters::add(&self.module.counters.retried, retried(&verdicts) as u64);
        let done = self.give_up(&records, &verdicts);
        if let PutError::Refused { .. } = error {
            // The search goes on at once; nothing is wrong with the stream.
            let searching = records.len() > 1;
            let (base, max) = (self.config.retry_base_ms, self.config.retry_max_ms);
            self.backlog.complete(&records, &done, now, |failures| {
                if searching {
                    Duration::ZERO
                } else {
                    retry_delay(failures, base, max)
                }
            });
            return None;
        }
        self.complete(&records, &done);
        Some(self.backoff())
    }

    /// Moves records from the spool to the dead letters with `reason`, in
    /// one atomic write; returns whether they moved (if not, they stay in
    /// the spool and are retried).
    fn dead_letter(&mut self, records: &[SpoolRecord], reason: &str) -> bool {
        let letters: Vec<DeadLetter> = records
            .iter()
            .map(|record| record.dead_letter(reason))
            .collect();
        self.module.log_refused(&letters);
        let count = letters.len() as u64;
        let removed: Vec<(u64, usize)> = records.iter().map(|r| (r.seq, r.size)).collect();
        let module = &self.module;
        let result = self.reader.settle_with(&module.spool, &removed, |batch| {
            module.dead_letters.stage(batch, letters)
        });
        match result {
            Ok(()) => {
                Counters::add(&module.counters.dead_lettered, count);
                true
            }
            Err(error) => {
                module.log.write_limited(
                    "store",
                    Level::Error,
                    format!("cannot move refused records to the dead letters; they stay in the spool: {error}"),
                );
                false
            }
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

/// Sleeps until `at`, or for ever without it.
async fn sleep_until_or_never(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How many records the verdicts send again.
fn retried(verdicts: &[Verdict]) -> usize {
    verdicts.iter().filter(|v| **v == Verdict::Retry).count()
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

    #[test]
    fn error_codes_are_weighed_by_what_they_say_about_the_record() {
        let kind = |code| entry_failure(code, "m").kind;
        assert_eq!(
            kind("ProvisionedThroughputExceededException"),
            FailureKind::Throttled
        );
        assert_eq!(kind("KMSThrottlingException"), FailureKind::Throttled);
        assert_eq!(kind("KMSAccessDeniedException"), FailureKind::Stream);
        assert_eq!(kind("KMSDisabledException"), FailureKind::Stream);
        assert_eq!(kind("InternalFailure"), FailureKind::Server);
        assert_eq!(
            kind("SomethingNew"),
            FailureKind::Server,
            "an entry's own failure"
        );
        assert_eq!(
            entry_failure("InternalFailure", "boom").detail,
            "InternalFailure: boom"
        );
        assert_eq!(code_kind("ServiceUnavailable"), Some(FailureKind::Server));
        assert_eq!(
            code_kind("ResourceNotFoundException"),
            Some(FailureKind::Stream)
        );
        assert_eq!(
            code_kind("AccessDeniedException"),
            Some(FailureKind::Stream)
        );
        assert_eq!(
            code_kind("InvalidArgumentException"),
            Some(FailureKind::Refused)
        );
        assert_eq!(
            code_kind("LimitExceededException"),
            Some(FailureKind::Throttled)
        );
        assert_eq!(
            code_kind("SomethingNew"),
            None,
            "then the HTTP status decides"
        );
    }

    #[test]
    fn requests_without_an_answer_are_unreachable() {
        let error: SdkError<PutRecordsError> = SdkError::timeout_error("attempt timed out");
        let error = classify(error);
        assert!(matches!(error, PutError::Unreachable(_)), "{error:?}");
        assert_eq!(error.failure().kind, FailureKind::Unreachable);
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
