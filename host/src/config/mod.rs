//! The configuration file (TOML): what the user writes, with defaults and a
//! `validate()` that reports every problem with the field it concerns.

mod admin;
pub mod file;
mod mqtt;

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use admin::{AdminConfig, AdminTlsConfig, TOKEN_ENV};
pub use mqtt::{Broker, MqttConfig, MqttTlsConfig, PASSWORD_ENV};

/// Every Kinesis stream takes records this large, counting data plus
/// partition key; it is also `max_record_size`'s default.
pub const KINESIS_MAX_RECORD_BYTES: u32 = 1024 * 1024;
/// A stream whose maximum record size was raised takes records up to this.
pub const KINESIS_LARGE_RECORD_BYTES: u32 = 10 * 1024 * 1024;
/// The KPL's default largest aggregate, `aggregation_max_bytes`' default.
const AGGREGATION_MAX_BYTES: u32 = 51_200;
/// Smallest `aggregation_max_bytes` (the KPL's too).
const AGGREGATION_MIN_BYTES: u32 = 64;
/// Most user records one aggregate may hold.
const AGGREGATION_RECORDS_LIMIT: u32 = 1_000_000;
/// Kinesis stream names are 1 to 128 characters.
const STREAM_NAME_MAX_CHARS: usize = 128;
/// STS accepts external IDs of 2 to 1224 characters.
const EXTERNAL_ID_CHARS: std::ops::RangeInclusive<usize> = 2..=1224;
/// IAM role names are 1 to 64 characters.
const ROLE_NAME_MAX_CHARS: usize = 64;

/// The whole configuration of one ksm host.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Config {
    /// MQTT broker connection.
    pub mqtt: MqttConfig,
    /// Admin HTTP API.
    pub admin: AdminConfig,
    /// The smart-module component every module runs.
    pub component: ComponentConfig,
    /// Where ksm keeps data on disk (dead letters).
    pub storage: StorageConfig,
    /// How records are batched and retried on their way to Kinesis.
    pub kinesis: KinesisConfig,
    /// Device registry: home and class of known devices.
    pub devices: Vec<DeviceConfig>,
    /// The smart modules, each forwarding to one Kinesis stream.
    pub modules: Vec<ModuleConfig>,
    /// The file it was read from, where module changes made through the
    /// admin API are written back ([`file`]); `None`: they last until ksm stops.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// Which WebAssembly component holds the module logic, and its sandbox limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct ComponentConfig {
    /// Path of the `.wasm` component (relative to the working directory).
    pub path: PathBuf,
    /// Longest a single guest call may run before it is interrupted, milliseconds.
    pub call_timeout_ms: u64,
    /// Most linear memory one guest instance may use, MiB.
    pub max_memory_mib: u32,
    /// How often component files are checked for changes, which are then
    /// swapped in, milliseconds; 0 turns watching off.
    pub watch_interval_ms: u64,
    /// Most records (and, apart, most refused records) one guest call may
    /// return; a call that returns more costs its message.
    pub max_records_per_call: u32,
    /// Most record bytes one event call may return, summed over its records.
    pub max_event_output_bytes: u32,
    /// A guest instance whose memory has grown past this many MiB is
    /// replaced by a fresh one after its call; by default three quarters
    /// of `max_memory_mib`.
    pub recycle_above_mib: Option<u32>,
    /// A guest instance is replaced by a fresh one after this many calls;
    /// 0: never.
    pub recycle_after_calls: u64,
}

impl ComponentConfig {
    /// The memory past which an instance is recycled, bytes.
    pub fn recycle_above_bytes(&self) -> usize {
        let mib = self
            .recycle_above_mib
            .unwrap_or(self.max_memory_mib / 4 * 3);
        mib as usize * 1024 * 1024
    }
}

impl Default for ComponentConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            call_timeout_ms: 50,
            max_memory_mib: 64,
            watch_interval_ms: 1000,
            max_records_per_call: 100_000,
            max_event_output_bytes: 4 * 1024 * 1024,
            recycle_above_mib: None,
            recycle_after_calls: 0,
        }
    }
}

/// On-disk storage settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct StorageConfig {
    /// Directory of the store: spools, dead letters and activity logs.
    pub dir: PathBuf,
    /// Most bytes (record data plus partition keys) one module's spool
    /// holds; when full, ksm stops acknowledging messages, MiB.
    pub spool_max_mib: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("ksm-data"),
            spool_max_mib: 1024,
        }
    }
}

/// Batching and retry settings for PutRecords.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct KinesisConfig {
    /// How long a batch waits for more records before it is sent, milliseconds.
    pub linger_ms: u64,
    /// First retry delay after a failure, milliseconds (doubles per attempt, with jitter).
    pub retry_base_ms: u64,
    /// Longest retry delay, milliseconds.
    pub retry_max_ms: u64,
    /// Timeout of one PutRecords attempt, milliseconds.
    pub request_timeout_ms: u64,
    /// Records per second ksm writes to one shard at most (Kinesis takes 1000).
    pub shard_records_per_sec: u32,
    /// Bytes per second ksm writes to one shard at most (Kinesis takes 1 MiB).
    pub shard_bytes_per_sec: u64,
    /// A record Kinesis fails this many times in a row for the same reason
    /// (not throttling, not an unreachable endpoint) while other records go
    /// through is kept as a dead letter, so the records after it can go.
    pub record_max_attempts: u32,
    /// Or once it has kept failing that way for this long, seconds.
    pub record_max_failing_secs: u64,
    /// How a partition key's records are kept in order.
    pub ordering: Ordering,
    /// Most PutRecords requests in flight at once per module.
    pub max_in_flight: usize,
}

/// How the sink keeps each partition key's records in order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// Many records of a key per request, in order; a key is in at most one
    /// request at a time. A record Kinesis fails while it accepts a later
    /// one of its key lands after it: counted as `reordered` and logged.
    #[default]
    Key,
    /// At most one record of a key per request, so order holds even then;
    /// a key gets at most one record per round trip.
    Strict,
}

impl Default for KinesisConfig {
    fn default() -> Self {
        Self {
            linger_ms: 20,
            retry_base_ms: 100,
            retry_max_ms: 10_000,
            request_timeout_ms: 10_000,
            shard_records_per_sec: 1000,
            shard_bytes_per_sec: 1024 * 1024,
            record_max_attempts: 20,
            record_max_failing_secs: 300,
            ordering: Ordering::Key,
            max_in_flight: 8,
        }
    }
}

/// One entry of the device registry.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct DeviceConfig {
    /// Device ID, as in `/devices/{id}/...` topics.
    pub id: u64,
    /// Home the device belongs to (`homeId` of its events).
    pub home_id: u64,
    /// Device class (`originDeviceClass` of its events).
    pub class: Option<String>,
}

/// One smart module: which data goes to which Kinesis stream, and how.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct ModuleConfig {
    /// Module ID: 3+ characters, lowercase letters and digits, `-` and `_`
    /// allowed after the first.
    pub id: String,
    /// Free text for people.
    pub description: String,
    /// Event types to forward; `*` forwards all.
    pub subscribe_events: Vec<String>,
    /// Bulk data label to forward (`/devices/{id}/bulkData/{label}`).
    pub bulk_data_label: Option<String>,
    /// IAM role to assume for writing to the stream; absent: the default
    /// credential chain.
    pub role_arn: Option<String>,
    /// External ID to pass when assuming `role_arn`.
    pub external_id: Option<String>,
    /// AWS region of the stream.
    pub region: String,
    /// Kinesis stream name.
    pub stream_name: String,
    /// Use a fresh UUIDv4 as every record's partition key.
    pub use_uuid: bool,
    /// Largest record, data plus partition key, bytes: at most 1 MiB, or
    /// up to 10 MiB for a stream whose maximum record size allows it.
    pub max_record_size: u32,
    /// This module's own component; by default it runs `component.path`.
    pub component: Option<PathBuf>,
    /// Whether records are packed into KPL aggregates.
    pub aggregation: Aggregation,
    /// Largest aggregate, bytes, data plus its partition key (the KPL's
    /// default, 51200); at most the stream's record limit.
    pub aggregation_max_bytes: u32,
    /// Most user records in one aggregate.
    pub aggregation_max_records: u32,
}

/// How a module's records become Kinesis records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregation {
    /// One Kinesis record per record, as the guest made it.
    #[default]
    None,
    /// Records bound for the same shard share Kinesis records in the KPL's
    /// aggregated format, which KCL consumers, Firehose and Lambda (with
    /// the kinesis-aggregation library) read as the records themselves.
    Kpl,
}

impl ModuleConfig {
    /// The largest Kinesis record this module sends: a record, or an
    /// aggregate.
    pub fn largest_kinesis_record(&self) -> u32 {
        match self.aggregation {
            Aggregation::None => self.max_record_size,
            Aggregation::Kpl => self.max_record_size.max(self.aggregation_max_bytes),
        }
    }
}

impl Default for ModuleConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            description: String::new(),
            subscribe_events: Vec::new(),
            bulk_data_label: None,
            role_arn: None,
            external_id: None,
            region: String::new(),
            stream_name: String::new(),
            use_uuid: false,
            max_record_size: KINESIS_MAX_RECORD_BYTES,
            component: None,
            aggregation: Aggregation::None,
            aggregation_max_bytes: AGGREGATION_MAX_BYTES,
            aggregation_max_records: 1000,
        }
    }
}

/// One thing wrong with a configuration, and the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// Dotted path of the field, e.g. `modules[0].role_arn`.
    pub field: String,
    /// What is wrong, for people.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or a value has the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// The file parsed but has problems.
    #[error("{} problem(s) in {path}:\n{}", problems.len(), list(problems))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// The component file module `module` runs: its own, or `component.path`.
    pub fn component_of(&self, module: &ModuleConfig) -> PathBuf {
        module
            .component
            .clone()
            .unwrap_or_else(|| self.component.path.clone())
    }

    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::from_toml(&text, path)?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// Parses and validates configuration text; `path` is only used in messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut unknown = Vec::new();
        let deserializer = toml::Deserializer::parse(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: parse_message(text, &e),
        })?;
        let config: Config = serde_ignored::deserialize(deserializer, |key| {
            unknown.push(Problem {
                field: field_path(&key),
                message: "unknown key".to_owned(),
            })
        })
        .map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: parse_message(text, &e),
        })?;
        let mut problems = unknown;
        problems.extend(config.validate());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    /// Returns every problem in the configuration; empty when it is usable.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        self.mqtt.validate(&mut problems);
        self.admin.validate(&mut problems);
        let mut report = |field: String, message: String| problems.push(Problem { field, message });
        if self.component.path.as_os_str().is_empty() {
            report(
                "component.path".into(),
                "required: path of the .wasm component".into(),
            );
        }
        if self.component.call_timeout_ms == 0 {
            report(
                "component.call_timeout_ms".into(),
                "must be at least 1".into(),
            );
        }
        if self.component.max_memory_mib == 0 {
            report(
                "component.max_memory_mib".into(),
                "must be at least 1".into(),
            );
        }
        if self.kinesis.retry_base_ms == 0 || self.kinesis.retry_base_ms > self.kinesis.retry_max_ms
        {
            report(
                "kinesis.retry_base_ms".into(),
                "must be at least 1 and at most kinesis.retry_max_ms".into(),
            );
        }
        if self.kinesis.request_timeout_ms < 100 {
            report(
                "kinesis.request_timeout_ms".into(),
                "must be at least 100".into(),
            );
        }
        if self.kinesis.shard_records_per_sec == 0 || self.kinesis.shard_records_per_sec > 1000 {
            report(
                "kinesis.shard_records_per_sec".into(),
                "must be 1 to 1000 (a shard takes 1000 records/s)".into(),
            );
        }
        if self.kinesis.shard_bytes_per_sec < 1024 || self.kinesis.shard_bytes_per_sec > 1024 * 1024
        {
            report(
                "kinesis.shard_bytes_per_sec".into(),
                "must be 1024 to 1048576 (a shard takes 1 MiB/s)".into(),
            );
        }
        if self.component.max_records_per_call == 0 {
            report(
                "component.max_records_per_call".into(),
                "must be at least 1".into(),
            );
        }
        if self.component.max_event_output_bytes < KINESIS_MAX_RECORD_BYTES {
            report(
                "component.max_event_output_bytes".into(),
                format!("must be at least {KINESIS_MAX_RECORD_BYTES} (one record of 1 MiB)"),
            );
        }
        if let Some(mib) = self.component.recycle_above_mib
            && (mib == 0 || mib > self.component.max_memory_mib)
        {
            report(
                "component.recycle_above_mib".into(),
                format!(
                    "must be between 1 and component.max_memory_mib ({}); leave it out for \
                     three quarters of it",
                    self.component.max_memory_mib
                ),
            );
        }
        if self.kinesis.record_max_attempts < 2 {
            report(
                "kinesis.record_max_attempts".into(),
                "must be at least 2".into(),
            );
        }
        if self.kinesis.record_max_failing_secs == 0 {
            report(
                "kinesis.record_max_failing_secs".into(),
                "must be at least 1".into(),
            );
        }
        if !(1..=64).contains(&self.kinesis.max_in_flight) {
            report("kinesis.max_in_flight".into(), "must be 1 to 64".into());
        }
        if self.storage.spool_max_mib == 0 {
            report("storage.spool_max_mib".into(), "must be at least 1".into());
        }
        let mut device_ids = HashSet::new();
        for (i, device) in self.devices.iter().enumerate() {
            if !device_ids.insert(device.id) {
                report(
                    format!("devices[{i}].id"),
                    format!("device {} is listed twice", device.id),
                );
            }
        }

        if self.modules.is_empty() {
            report("modules".into(), "at least one module is required".into());
        }
        let mut module_ids = HashSet::new();
        for (i, module) in self.modules.iter().enumerate() {
            let field = |name: &str| format!("modules[{i}].{name}");
            if let Err(message) = check_module_id(&module.id) {
                report(field("id"), message);
            } else if !module_ids.insert(module.id.as_str()) {
                report(
                    field("id"),
                    format!("module ID `{}` is used twice", module.id),
                );
            }
            if module.subscribe_events.is_empty() && module.bulk_data_label.is_none() {
                report(
                    field("subscribe_events"),
                    "either subscribe_events or bulk_data_label is required".into(),
                );
            }
            if module.subscribe_events.iter().any(|e| e.is_empty()) {
                report(
                    field("subscribe_events"),
                    "event types must not be empty".into(),
                );
            }
            if let Some(label) = &module.bulk_data_label
                && let Err(message) = check_topic_level(label)
            {
                report(field("bulk_data_label"), message);
            }
            if module
                .component
                .as_ref()
                .is_some_and(|path| path.as_os_str().is_empty())
            {
                report(
                    field("component"),
                    "must be a path; leave it out to run component.path".into(),
                );
            }
            if let Some(arn) = &module.role_arn
                && let Err(message) = check_role_arn(arn)
            {
                report(field("role_arn"), message);
            }
            if let Some(external_id) = &module.external_id {
                if module.role_arn.is_none() {
                    report(
                        field("external_id"),
                        "is only used with role_arn; set role_arn or remove external_id".into(),
                    );
                } else if let Err(message) = check_external_id(external_id) {
                    report(field("external_id"), message);
                }
            }
            if let Err(message) = check_region(&module.region) {
                report(field("region"), message);
            }
            if let Err(message) = check_stream_name(&module.stream_name) {
                report(field("stream_name"), message);
            }
            if module.max_record_size == 0 || module.max_record_size > KINESIS_LARGE_RECORD_BYTES {
                report(
                    field("max_record_size"),
                    format!(
                        "must be between 1 and {KINESIS_LARGE_RECORD_BYTES} (10 MiB; above \
                         {KINESIS_MAX_RECORD_BYTES}, 1 MiB, only for a stream whose maximum \
                         record size allows it)"
                    ),
                );
            } else if module.max_record_size > self.component.max_event_output_bytes {
                report(
                    field("max_record_size"),
                    format!(
                        "is above component.max_event_output_bytes ({}), so no event could \
                         make a record this large; raise that too",
                        self.component.max_event_output_bytes
                    ),
                );
            }
            if !(AGGREGATION_MIN_BYTES..=KINESIS_LARGE_RECORD_BYTES)
                .contains(&module.aggregation_max_bytes)
            {
                report(
                    field("aggregation_max_bytes"),
                    format!(
                        "must be between {AGGREGATION_MIN_BYTES} and {KINESIS_LARGE_RECORD_BYTES} \
                         (above {KINESIS_MAX_RECORD_BYTES} only for a stream whose maximum record \
                         size allows it); the KPL's default is {AGGREGATION_MAX_BYTES}"
                    ),
                );
            }
            if !(1..=AGGREGATION_RECORDS_LIMIT).contains(&module.aggregation_max_records) {
                report(
                    field("aggregation_max_records"),
                    format!("must be between 1 and {AGGREGATION_RECORDS_LIMIT}"),
                );
            }
        }
        problems
    }

    /// The problems of this configuration that concern its module at
    /// `index`, each named by its field within the module (`stream_name`),
    /// and those of the module list as a whole (`modules`).
    pub fn module_problems(&self, index: usize) -> Vec<Problem> {
        let prefix = format!("modules[{index}].");
        self.validate()
            .into_iter()
            .filter_map(|problem| {
                let field = match problem.field.strip_prefix(&prefix) {
                    Some(field) => field.to_owned(),
                    None if problem.field == "modules" => problem.field,
                    None => return None,
                };
                Some(Problem { field, ..problem })
            })
            .collect()
    }

    /// The registry entry of a device, if it is registered.
    pub fn device(&self, id: u64) -> Option<&DeviceConfig> {
        self.devices.iter().find(|d| d.id == id)
    }
}

/// Keys whose values are never shown in messages.
const SECRET_KEYS: [&str; 1] = ["password"];

/// A TOML error as `line L, column C: key: what`, without the offending
/// line's text (the TOML crate quotes it, and it may hold a password); the
/// parser's own words are kept unless the key is a secret.
fn parse_message(text: &str, error: &toml::de::Error) -> String {
    let Some(span) = error.span() else {
        return error.message().to_owned();
    };
    let start = span.start.min(text.len());
    let before = text.get(..start).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    let line_text = text.lines().nth(line - 1).unwrap_or_default();
    let key = line_text
        .split_once('=')
        .map(|(key, _)| key.trim().trim_matches('"'))
        .filter(|key| !key.is_empty() && !key.starts_with('['));
    let section = text
        .lines()
        .take(line - 1)
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix("[[")
                .and_then(|l| l.strip_suffix("]]"))
                .or_else(|| l.strip_prefix('[').and_then(|l| l.strip_suffix(']')))
        })
        .last();
    let what = match key {
        Some(key) if SECRET_KEYS.contains(&key) => {
            "invalid value (not shown: it is a secret)".to_owned()
        }
        _ => error.message().trim().to_owned(),
    };
    match (section, key) {
        (Some(section), Some(key)) => {
            format!("line {line}, column {column}: `{section}.{key}`: {what}")
        }
        (None, Some(key)) => format!("line {line}, column {column}: `{key}`: {what}"),
        _ => format!("line {line}, column {column}: {what}"),
    }
}

/// Writes a key path the way problems name fields: `modules[1].surprise`.
pub(crate) fn field_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => {
            let parent = field_path(parent);
            if parent.is_empty() {
                key.clone()
            } else {
                format!("{parent}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

/// Most bytes of a secret file ksm reads (a password or token).
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// The first line of a file holding a secret, without its line ending.
fn read_secret_file(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_SECRET_FILE_BYTES).read_to_string(&mut text))
        .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let secret = text.lines().next().unwrap_or_default().trim_end();
    if secret.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(secret.to_owned())
}

/// Module IDs: 3+ chars of lowercase letters and digits, `-` and `_` after the first.
fn check_module_id(id: &str) -> Result<(), String> {
    let mut chars = id.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if id.len() < 3 || !first_ok || !rest_ok {
        return Err(format!(
            "`{id}` is not a valid module ID: use 3 or more lowercase letters and digits, \
             with `-` and `_` allowed after the first character"
        ));
    }
    Ok(())
}

/// A bulk data label is one MQTT topic level.
fn check_topic_level(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("must not be empty".into());
    }
    if label.contains(['/', '+', '#', '\0']) {
        return Err(format!(
            "`{label}` must be one MQTT topic level: no `/`, `+`, `#`"
        ));
    }
    Ok(())
}

/// `arn:PARTITION:iam::ACCOUNT:role/[PATH/]NAME`.
fn check_role_arn(arn: &str) -> Result<(), String> {
    let bad =
        || format!("`{arn}` is not an IAM role ARN; expected arn:aws:iam::123456789012:role/NAME");
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let [prefix, partition, service, region, account, resource] = parts[..] else {
        return Err(bad());
    };
    let partition_ok = matches!(
        partition,
        "aws" | "aws-cn" | "aws-us-gov" | "aws-iso" | "aws-iso-b"
    );
    let account_ok = account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit());
    let Some(path_and_name) = resource.strip_prefix("role/") else {
        return Err(bad());
    };
    let name = path_and_name.rsplit('/').next().unwrap_or_default();
    let name_ok = !name.is_empty()
        && name.chars().count() <= ROLE_NAME_MAX_CHARS
        && path_and_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+=,.@_-/".contains(c));
    if prefix != "arn"
        || !partition_ok
        || service != "iam"
        || !region.is_empty()
        || !account_ok
        || !name_ok
    {
        return Err(bad());
    }
    Ok(())
}

/// STS external IDs: 2 to 1224 characters of `[\w+=,.@:/-]`.
fn check_external_id(id: &str) -> Result<(), String> {
    let len = id.chars().count();
    let chars_ok = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_+=,.@:/-".contains(c));
    if !EXTERNAL_ID_CHARS.contains(&len) || !chars_ok {
        return Err(format!(
            "must be 2 to 1224 characters of letters, digits and _+=,.@:/- (got {len} characters)"
        ));
    }
    Ok(())
}

fn check_region(region: &str) -> Result<(), String> {
    if region.is_empty() {
        return Err("required: AWS region of the stream, e.g. us-east-1".into());
    }
    if !region
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(format!("`{region}` is not an AWS region name"));
    }
    Ok(())
}

fn check_stream_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("required: name of the Kinesis stream".into());
    }
    if name.len() > STREAM_NAME_MAX_CHARS
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        return Err(format!(
            "`{name}` is not a valid stream name: 1 to 128 letters, digits, `_`, `.`, `-`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[mqtt]
url = "mqtt://127.0.0.1:1883"
[admin]
listen = "127.0.0.1:8686"
[component]
path = "target/wasm32-wasip2/release/ksm_guest.wasm"
[[devices]]
id = 1001
home_id = 77
class = "thermostat"
[[modules]]
id = "sensor-stream"
description = "every event"
subscribe_events = ["*"]
bulk_data_label = "telemetry"
role_arn = "arn:aws:iam::123456789012:role/ksm-writer"
external_id = "ext-42"
region = "us-east-1"
stream_name = "sensors"
use_uuid = false
"#;

    fn problems(text: &str) -> Vec<Problem> {
        match Config::from_toml(text, Path::new("test.toml")) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { problems, .. }) => problems,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    fn fields(text: &str) -> Vec<String> {
        problems(text).into_iter().map(|p| p.field).collect()
    }

    #[test]
    fn the_issue_example_is_valid() {
        let config = Config::from_toml(EXAMPLE, Path::new("x")).unwrap();
        assert_eq!(config.modules[0].max_record_size, KINESIS_MAX_RECORD_BYTES);
        assert_eq!(config.mqtt.client_id, "ksm");
        assert_eq!(config.device(1001).unwrap().home_id, 77);
    }

    #[test]
    fn example_files_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen > 0, "no example configs in {}", dir.display());
    }

    #[test]
    fn module_ids_follow_the_rules() {
        for good in ["abc", "a-b", "a_b", "1ab", "sensor-stream_2"] {
            assert!(check_module_id(good).is_ok(), "{good}");
        }
        for bad in ["ab", "-ab", "_ab", "Abc", "ab c", "abé", ""] {
            assert!(check_module_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn role_arns_are_checked() {
        assert!(check_role_arn("arn:aws:iam::123456789012:role/ksm-writer").is_ok());
        assert!(check_role_arn("arn:aws-cn:iam::123456789012:role/path/to/w+=,.@_-").is_ok());
        for bad in [
            "arn:aws:iam::12345678901:role/x",
            "arn:aws:iam::123456789012:user/x",
            "arn:aws:s3::123456789012:role/x",
            "arn:aws:iam:us-east-1:123456789012:role/x",
            "arn:aws:iam::123456789012:role/",
            "role/x",
        ] {
            assert!(check_role_arn(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let text = r#"
[mqtt]
url = "http://broker"
colour = "blue"
shared_group = "a/b"
[component]
path = ""
[storage]
spool_max_mib = 0
[kinesis]
shard_records_per_sec = 1001
shard_bytes_per_sec = 10
max_in_flight = 0
[[modules]]
id = "AB"
external_id = "x"
max_record_size = 20000000
aggregation = "kpl"
aggregation_max_bytes = 10
aggregation_max_records = 0
[[modules]]
id = "dup"
subscribe_events = ["*"]
region = "us-east-1"
stream_name = "s"
colour = "red"
[[modules]]
id = "dup"
bulk_data_label = "a/b"
role_arn = "nope"
region = "us-east-1"
stream_name = "bad name!"
"#;
        let found = fields(text);
        for expected in [
            "mqtt.colour",
            "modules[1].colour",
            "mqtt.url",
            "mqtt.shared_group",
            "storage.spool_max_mib",
            "kinesis.shard_records_per_sec",
            "kinesis.shard_bytes_per_sec",
            "kinesis.max_in_flight",
            "component.path",
            "modules[0].id",
            "modules[0].subscribe_events",
            "modules[0].external_id",
            "modules[0].region",
            "modules[0].stream_name",
            "modules[0].max_record_size",
            "modules[0].aggregation_max_bytes",
            "modules[0].aggregation_max_records",
            "modules[2].id",
            "modules[2].bulk_data_label",
            "modules[2].role_arn",
            "modules[2].stream_name",
        ] {
            assert!(
                found.iter().any(|f| f == expected),
                "{expected} missing from {found:?}"
            );
        }
        assert!(!found.contains(&"modules[1].id".to_owned()), "{found:?}");
    }

    #[test]
    fn large_records_need_room_in_an_event_call() {
        let text = EXAMPLE.replace(
            "stream_name = \"sensors\"",
            "stream_name = \"sensors\"\nmax_record_size = 5242880",
        );
        assert_eq!(
            fields(&text),
            ["modules[0].max_record_size"],
            "5 MiB records, 4 MiB of event output"
        );
        let text = text.replace(
            "[component]",
            "[component]\nmax_event_output_bytes = 10485760",
        );
        assert_eq!(fields(&text), Vec::<String>::new());
    }

    #[test]
    fn guests_are_recycled_at_three_quarters_of_their_memory_unless_told() {
        let config: Config = toml::from_str(EXAMPLE).expect("example parses");
        assert_eq!(config.component.recycle_above_bytes(), 48 * 1024 * 1024);
        assert_eq!(config.component.recycle_after_calls, 0);
        for (value, valid) in [("0", false), ("1", true), ("64", true), ("65", false)] {
            let text = EXAMPLE.replace(
                "[component]",
                &format!("[component]\nrecycle_above_mib = {value}"),
            );
            let found = fields(&text);
            assert_eq!(
                found.is_empty(),
                valid,
                "recycle_above_mib = {value}: {found:?}"
            );
        }
    }

    #[test]
    fn aggregation_is_off_unless_asked_for() {
        let config: Config = toml::from_str(EXAMPLE).expect("example parses");
        assert_eq!(config.modules[0].aggregation, Aggregation::None);
        assert_eq!(
            config.modules[0].largest_kinesis_record(),
            KINESIS_MAX_RECORD_BYTES
        );
        let text = EXAMPLE.replace(
            "stream_name = \"sensors\"",
            "stream_name = \"sensors\"\naggregation = \"kpl\"\naggregation_max_bytes = 2000000",
        );
        let config: Config = toml::from_str(&text).expect("parses");
        assert_eq!(config.modules[0].aggregation, Aggregation::Kpl);
        assert_eq!(config.modules[0].aggregation_max_records, 1000);
        assert_eq!(config.modules[0].largest_kinesis_record(), 2_000_000);
    }

    #[test]
    fn external_id_needs_role_arn() {
        let text = EXAMPLE.replace(
            "role_arn = \"arn:aws:iam::123456789012:role/ksm-writer\"\n",
            "",
        );
        let found = problems(&text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].field, "modules[0].external_id");
    }

    #[test]
    fn wrong_types_are_parse_errors() {
        let text = EXAMPLE.replace("use_uuid = false", "use_uuid = \"yes\"");
        let err = Config::from_toml(&text, Path::new("x")).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        assert!(err.to_string().contains("use_uuid"), "{err}");
    }

    #[test]
    fn parse_errors_name_the_place_and_never_show_a_password() {
        let secret = "hunter2-secret";
        for text in [
            format!("[mqtt]\nurl = \"mqtt://h\"\nusername = \"u\"\npassword = \"{secret}\n"),
            format!("[mqtt]\nurl = \"mqtt://h\"\nusername = \"u\"\npassword = {secret}\n"),
            format!("[mqtt]\nurl = \"mqtt://h\"\nusername = \"u\"\npassword = [\"{secret}\"]\n"),
        ] {
            let err = Config::from_toml(&text, Path::new("x")).unwrap_err();
            let shown = err.to_string();
            assert!(matches!(err, ConfigError::Parse { .. }), "{shown}");
            assert!(!shown.contains(secret), "{shown}");
            assert!(shown.contains("line 4"), "{shown}");
        }
    }
}
