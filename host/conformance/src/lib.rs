//! The guest conformance suite: cases as data, run against any component
//! of the `ksm:smart-module` contract (`ksm-conformance GUEST.wasm`, or
//! `ksm conformance GUEST.wasm`), through ksm's own runtime and sandbox.
//!
//! A case is a directory holding `case.toml` (module settings, one input, the
//! expected records or error) and any payload files it names. The format is
//! documented in `tests/conformance/README.md`; [`CaseSpec`] is its schema.
//! Cases are grouped by the contract version they need (`1.0/`, `1.1/`): a
//! 1.0 guest skips the 1.1 cases. The cases of `tests/conformance` are built
//! into the crate ([`built_in_cases`], [`write_built_in_cases`]), so an
//! installed binary needs no source tree. Each case runs on a fresh
//! instance, through the call the host makes for one message
//! ([`Guest::one`]: a batch of one for a 1.1 guest); a case that cannot be
//! read or is ill-formed fails with the reason, it never aborts the run.
//!
//! Each case runs under a time limit ([`CaseLimit`], 2 s by default): every
//! guest call gets a deadline of 1/[`DEADLINES_PER_CASE`] of it, so that no
//! guest, however it loops, sleeps or retries, makes a case take much longer
//! than its limit, and a case whose guest runs out of time fails saying so.
//! After [`OUT_OF_TIME_STREAK`] such cases in a row the run stops and the
//! cases left count as failed, so a hopeless guest is reported in seconds.
//!
//! # Layout
//! - [`built_in_cases`] and [`load_cases`] (a directory) give [`Case`]s;
//! - [`CaseSpec`] and its parts: the `case.toml` schema, with [`CaseSpec::check`]
//!   for the rules serde cannot express;
//! - [`Runner`] loads the component under a [`CaseLimit`]; [`Runner::run`] /
//!   [`Runner::run_case`] build the input, call the guest and compare, giving
//!   a [`CaseOutcome`] per case as it finishes ([`Progress`]) and a [`Report`].

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;

use ksm_bindings::types::{
    BulkOutput, DeviceContext, HomeContext, KinesisRecord, ModuleSettings, Span,
};
use ksm_bindings::{GuestError, bulk, describe};
use ksm_runtime::{
    Answer, Contract, Guest, GuestFault, GuestLimits, Input, Mqtt, Runtime, RuntimeError,
};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded_cases.rs"));
}

/// Name of the file describing a case, inside the case's directory.
pub const CASE_FILE: &str = "case.toml";

/// `received_at` of a case input that does not set one.
pub const DEFAULT_RECEIVED_AT: &str = "2026-01-01T00:00:00Z";

/// `max_record_size` of a case that does not set one: Kinesis' 1 MiB.
pub const DEFAULT_MAX_RECORD_SIZE: u32 = 1_048_576;

/// Why the suite could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum ConformanceError {
    /// A directory of cases is missing or unreadable.
    #[error("cannot read the conformance cases in {dir}: {source}")]
    ReadDir {
        /// The cases directory.
        dir: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The built-in cases could not be written out.
    #[error("cannot write the built-in cases to {path}: {source}")]
    WriteCases {
        /// The file being written.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The component could not be loaded.
    #[error(transparent)]
    Load(#[from] RuntimeError),
    /// The report could not be written.
    #[error("cannot write the report: {0}")]
    Output(#[from] std::io::Error),
}

/// Where a case's files are.
#[derive(Debug, Clone)]
pub enum CaseFiles {
    /// A directory on disk.
    Dir(PathBuf),
    /// A built-in case, by its name (`1.0/001-device-event-exact-match`).
    BuiltIn(String),
}

impl CaseFiles {
    /// The bytes of the case's file `name`.
    fn read(&self, name: &str) -> Result<Vec<u8>, String> {
        match self {
            CaseFiles::Dir(dir) => {
                let path = dir.join(name);
                std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
            }
            CaseFiles::BuiltIn(case) => {
                let wanted = format!("{case}/{name}");
                embedded::FILES
                    .iter()
                    .find(|(file, _)| *file == wanted)
                    .map(|(_, bytes)| bytes.to_vec())
                    .ok_or_else(|| format!("the built-in case {case} has no file {name}"))
            }
        }
    }
}

/// One conformance case: its name, files, contract version and parsed
/// `case.toml`.
#[derive(Debug)]
pub struct Case {
    /// The case's name: its directory's, after its version group's
    /// (`1.0/001-device-event-exact-match`; no group for an ungrouped case).
    pub name: String,
    /// Where its files are.
    pub files: CaseFiles,
    /// The contract version a guest must speak for the case to apply.
    pub needs: Contract,
    /// The parsed and checked case, or why it is unusable.
    pub spec: Result<CaseSpec, String>,
}

/// The contract version a group directory stands for.
fn group_contract(name: &str) -> Option<Contract> {
    match name {
        "1.0" => Some(Contract::V1_0),
        "1.1" => Some(Contract::V1_1),
        _ => None,
    }
}

/// The cases built into the crate (`tests/conformance` when it was built),
/// in name order.
pub fn built_in_cases() -> Vec<Case> {
    let mut names: Vec<&str> = embedded::FILES
        .iter()
        .filter_map(|(file, _)| file.strip_suffix(&format!("/{CASE_FILE}")))
        .collect();
    names.sort_unstable();
    names
        .into_iter()
        .map(|name| {
            let files = CaseFiles::BuiltIn(name.to_owned());
            let spec = files
                .read(CASE_FILE)
                .and_then(|bytes| String::from_utf8(bytes).map_err(|e| e.to_string()))
                .and_then(|text| CaseSpec::parse(&text));
            let needs = name
                .split_once('/')
                .and_then(|(group, _)| group_contract(group))
                .unwrap_or(Contract::V1_0);
            Case {
                name: name.to_owned(),
                files,
                needs,
                spec,
            }
        })
        .collect()
}

/// Writes the built-in cases into `dir` as files (`dir/1.0/001-…/case.toml`
/// and the files they name), to read or to start a suite of one's own.
/// Returns how many files it wrote.
pub fn write_built_in_cases(dir: &Path) -> Result<usize, ConformanceError> {
    for (name, bytes) in embedded::FILES {
        let path = dir.join(name);
        let write_error = |source| ConformanceError::WriteCases {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(write_error)?;
        }
        std::fs::write(&path, bytes).map_err(write_error)?;
    }
    Ok(embedded::FILES.len())
}

/// Reads the cases in `dir`, sorted by name: each subdirectory is a case
/// (for contract 1.0), except a group `1.0` or `1.1`, whose subdirectories
/// are cases for that version. Plain files (such as a README) are skipped; a
/// directory without a readable, well-formed `case.toml` becomes a case
/// whose `spec` is the error.
pub fn load_cases(dir: &Path) -> Result<Vec<Case>, ConformanceError> {
    let mut cases = Vec::new();
    for (name, path) in subdirectories(dir)? {
        match group_contract(&name) {
            Some(needs) => {
                for (case, path) in subdirectories(&path)? {
                    cases.push(load_case(format!("{name}/{case}"), path, needs));
                }
            }
            None => cases.push(load_case(name, path, Contract::V1_0)),
        }
    }
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(cases)
}

fn subdirectories(dir: &Path) -> Result<Vec<(String, PathBuf)>, ConformanceError> {
    let read_dir_error = |source| ConformanceError::ReadDir {
        dir: dir.to_owned(),
        source,
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir_error)? {
        let entry = entry.map_err(read_dir_error)?;
        let path = entry.path();
        if path.is_dir() {
            found.push((entry.file_name().to_string_lossy().into_owned(), path));
        }
    }
    Ok(found)
}

fn load_case(name: String, dir: PathBuf, needs: Contract) -> Case {
    let path = dir.join(CASE_FILE);
    let spec = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
        .and_then(|text| CaseSpec::parse(&text));
    Case {
        name,
        files: CaseFiles::Dir(dir),
        needs,
        spec,
    }
}

/// A `case.toml`: what the module is, what it gets, what must come out.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseSpec {
    /// What the case checks, for people.
    pub description: String,
    /// The module settings handed to `configure`.
    #[serde(default)]
    pub settings: SettingsSpec,
    /// The one handler call; absent: the case only checks `configure`.
    pub input: Option<InputSpec>,
    /// Or the messages of one batch, in order (contract 1.1 cases).
    pub batch: Option<Vec<InputSpec>>,
    /// What the guest must answer.
    pub expect: ExpectSpec,
}

/// `[settings]`: the WIT `module-settings`, with defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsSpec {
    /// Event types to forward (default: none).
    #[serde(default)]
    pub subscribe_events: Vec<String>,
    /// Bulk data label (default: none).
    pub bulk_data_label: Option<String>,
    /// UUIDv4 partition keys (default: false).
    #[serde(default)]
    pub use_uuid: bool,
    /// Record size limit (default: [`DEFAULT_MAX_RECORD_SIZE`]).
    #[serde(default = "default_max_record_size")]
    pub max_record_size: u32,
}

const fn default_max_record_size() -> u32 {
    DEFAULT_MAX_RECORD_SIZE
}

impl Default for SettingsSpec {
    fn default() -> Self {
        SettingsSpec {
            subscribe_events: Vec::new(),
            bulk_data_label: None,
            use_uuid: false,
            max_record_size: DEFAULT_MAX_RECORD_SIZE,
        }
    }
}

impl SettingsSpec {
    /// The settings as the WIT type.
    pub fn to_module_settings(&self) -> ModuleSettings {
        ModuleSettings {
            subscribe_events: self.subscribe_events.clone(),
            bulk_data_label: self.bulk_data_label.clone(),
            use_uuid: self.use_uuid,
            max_record_size: self.max_record_size,
        }
    }
}

/// Which handler an input goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InputKind {
    /// `handle-device-event`.
    DeviceEvent,
    /// `handle-home-event`.
    HomeEvent,
    /// `handle-bulk-data`.
    BulkData,
}

/// `[input]`: the context fields of one handler call and its payload.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// The handler.
    pub kind: InputKind,
    /// Device ID (device events and bulk data; required there).
    pub device_id: Option<u64>,
    /// Home ID (required for home events; registry home for device events).
    pub home_id: Option<u64>,
    /// Device class (device events).
    pub device_class: Option<String>,
    /// Device IP (device events).
    pub device_ip: Option<String>,
    /// Project key ID (home events).
    pub project_key_id: Option<String>,
    /// Project key name (home events).
    pub project_key_name: Option<String>,
    /// Reception time (events; default [`DEFAULT_RECEIVED_AT`]).
    pub received_at: Option<String>,
    /// Bulk data label (bulk data; required there).
    pub label: Option<String>,
    /// Payload as UTF-8 text.
    pub payload: Option<String>,
    /// Payload in hex.
    pub payload_hex: Option<String>,
    /// Payload read from this file, relative to the case directory.
    pub payload_file: Option<String>,
    /// Payload as the concatenation of these chunks.
    pub payload_parts: Option<Vec<Chunk>>,
    /// Payload as a bulk data payload encoded by the runner.
    pub bulk: Option<BulkSpec>,
}

/// A byte string described in a case: exactly one of `text`, `hex`,
/// `fill` (with `len`) or `file`, optionally repeated.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chunk {
    /// UTF-8 text. With `repeat`, `{n}` is replaced by the repetition's index.
    pub text: Option<String>,
    /// Hex digits (whitespace ignored).
    pub hex: Option<String>,
    /// This byte, `len` times.
    pub fill: Option<u8>,
    /// Length for `fill`.
    pub len: Option<usize>,
    /// The bytes of this file, relative to the case directory.
    pub file: Option<String>,
    /// How many times (default 1): consecutive bytes in a payload, separate
    /// records in a bulk payload.
    pub repeat: Option<usize>,
}

/// `bulk = { ... }`: a bulk data payload the runner encodes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkSpec {
    /// Version string (default "1.0").
    pub version: Option<String>,
    /// One record per chunk (per repetition of a repeated chunk).
    #[serde(default)]
    pub records: Vec<Chunk>,
    /// Raw bytes in hex appended after the records.
    pub trailer_hex: Option<String>,
}

/// `[expect]`: either `records` (and, for bulk data, `rejected`), or `error`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectSpec {
    /// The records, in order (an empty list: nothing forwarded).
    pub records: Option<Vec<ExpectRecord>>,
    /// Bulk records refused one by one, in order (default: none).
    pub rejected: Option<Vec<ExpectRejected>>,
    /// The error of the call (or of `configure`).
    pub error: Option<ExpectError>,
    /// For a batch: what each message must get, in order (each with
    /// records or error, as a single call's).
    pub outcomes: Option<Vec<ExpectSpec>>,
}

/// One expected record.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectRecord {
    /// Exact partition key.
    pub partition_key: Option<String>,
    /// `true`: the key must be a lowercase hyphenated UUIDv4, distinct from
    /// every other UUID key of the case.
    pub partition_key_uuid: Option<bool>,
    /// Expected explicit hash key (default: none).
    pub explicit_hash_key: Option<String>,
    /// Data is JSON equal to this, key order included at every level.
    pub data_json: Option<String>,
    /// Data is exactly this UTF-8 text (`{n}` replaced when repeated).
    pub data_text: Option<String>,
    /// Data is exactly these bytes, in hex.
    pub data_hex: Option<String>,
    /// Data is this byte `data_len` times.
    pub data_fill: Option<u8>,
    /// Length for `data_fill`.
    pub data_len: Option<usize>,
    /// Data is exactly this file's bytes.
    pub data_file: Option<String>,
    /// Data is this many bytes long (may go with any other `data_*`).
    pub data_size: Option<usize>,
    /// Bulk only: the span's offset in the payload.
    pub offset: Option<u32>,
    /// Bulk only: the span's length.
    pub len: Option<u32>,
    /// This entry stands for this many consecutive records (default 1).
    pub repeat: Option<usize>,
}

/// One expected rejected bulk record.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectRejected {
    /// Position among the payload's records.
    pub index: u32,
    /// The refused record's span offset, if checked.
    pub offset: Option<u32>,
    /// The refused record's span length, if checked.
    pub len: Option<u32>,
    /// Why it was refused.
    pub error: ExpectError,
}

/// An expected guest error: its kind and the fields to compare (fields left
/// out are not compared; `detail` strings never are).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectError {
    /// The WIT case name: `unsupported-version`, `malformed-payload`, ...
    pub kind: String,
    /// `unsupported-version`: the version; `not-byte-array`: the type.
    pub found: Option<String>,
    /// `malformed-payload`, `invalid-event-json`, `not-byte-array`.
    pub offset: Option<u64>,
    /// `not-byte-array`, `record-too-large`.
    pub index: Option<u32>,
    /// `record-too-large`.
    pub size: Option<u64>,
    /// `record-too-large`.
    pub limit: Option<u64>,
    /// `invalid-field`, `invalid-settings`.
    pub field: Option<String>,
}

/// The error kinds and which optional fields each may compare.
const ERROR_KINDS: &[(&str, &[&str])] = &[
    ("unsupported-version", &["found"]),
    ("malformed-payload", &["offset"]),
    ("not-byte-array", &["index", "offset", "found"]),
    ("record-too-large", &["index", "size", "limit"]),
    ("invalid-event-json", &["offset"]),
    ("invalid-field", &["field"]),
    ("invalid-settings", &["field"]),
    ("not-configured", &[]),
    ("other", &[]),
];

impl CaseSpec {
    /// Parses `case.toml` text and [checks](Self::check) it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let spec: CaseSpec = toml::from_str(text).map_err(|e: toml::de::Error| {
            let line = e.span().map(|span| {
                1 + text.as_bytes()[..span.start.min(text.len())]
                    .iter()
                    .filter(|b| **b == b'\n')
                    .count()
            });
            let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
            format!("ill-formed {CASE_FILE}: {}{at}", e.message().trim_end())
        })?;
        spec.check()
            .map_err(|problems| format!("ill-formed {CASE_FILE}: {}", problems.join("; ")))?;
        Ok(spec)
    }

    /// The rules serde cannot check; returns every problem found.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if let Some(input) = &self.input {
            input.check(&mut problems);
        }
        match (&self.batch, &self.expect.outcomes) {
            (Some(_), _) if self.input.is_some() => {
                problems.push("give input or batch, not both".into());
            }
            (Some(batch), Some(outcomes)) => {
                if batch.is_empty() {
                    problems.push("batch: give at least one message".into());
                }
                if outcomes.len() != batch.len() {
                    problems.push(format!(
                        "expect.outcomes: one per batch message ({} messages, {} outcomes)",
                        batch.len(),
                        outcomes.len()
                    ));
                }
                let e = &self.expect;
                if e.records.is_some() || e.rejected.is_some() || e.error.is_some() {
                    problems.push("expect: a batch's answers go in expect.outcomes".into());
                }
                for (i, (input, outcome)) in batch.iter().zip(outcomes).enumerate() {
                    input.check(&mut problems);
                    check_expect(
                        outcome,
                        Some(input),
                        &format!("expect.outcomes[{i}]"),
                        &mut problems,
                    );
                }
            }
            (Some(_), None) => problems.push("expect.outcomes: required with a batch".into()),
            (None, Some(_)) => problems.push("expect.outcomes: only with a batch".into()),
            (None, None) => {
                check_expect(&self.expect, self.input.as_ref(), "expect", &mut problems)
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// Checks one expectation (`at` names it in problems) of a call with `input`.
fn check_expect(
    expect: &ExpectSpec,
    input: Option<&InputSpec>,
    at: &str,
    problems: &mut Vec<String>,
) {
    match (&expect.records, &expect.error) {
        (Some(_), Some(_)) => problems.push(format!("{at}: give records or error, not both")),
        (None, None) => problems.push(format!("{at}: give records (maybe empty) or error")),
        _ => {}
    }
    let bulk = input.map(|i| i.kind) == Some(InputKind::BulkData);
    if expect.rejected.is_some() {
        if expect.error.is_some() {
            problems.push(format!("{at}: rejected goes with records, not error"));
        }
        if !bulk {
            problems.push(format!(
                "{at}.rejected: only bulk-data inputs reject records"
            ));
        }
    }
    if input.is_none() && expect.records.as_ref().is_some_and(|r| !r.is_empty()) {
        problems.push(format!(
            "{at}.records: a case without input produces no records"
        ));
    }
    if expect.outcomes.is_some() && at != "expect" {
        problems.push(format!("{at}.outcomes: outcomes do not nest"));
    }
    for (i, record) in expect.records.iter().flatten().enumerate() {
        record.check(&format!("{at}.records[{i}]"), bulk, problems);
    }
    for (i, rejected) in expect.rejected.iter().flatten().enumerate() {
        rejected
            .error
            .check(&format!("{at}.rejected[{i}].error"), problems);
    }
    if let Some(error) = &expect.error {
        error.check(&format!("{at}.error"), problems);
    }
}

impl InputSpec {
    fn check(&self, problems: &mut Vec<String>) {
        let (required, allowed): (&[&str], &[&str]) = match self.kind {
            InputKind::DeviceEvent => (
                &["device_id"],
                &["home_id", "device_class", "device_ip", "received_at"],
            ),
            InputKind::HomeEvent => (
                &["home_id"],
                &["project_key_id", "project_key_name", "received_at"],
            ),
            InputKind::BulkData => (&["device_id", "label"], &[]),
        };
        let present = [
            ("device_id", self.device_id.is_some()),
            ("home_id", self.home_id.is_some()),
            ("device_class", self.device_class.is_some()),
            ("device_ip", self.device_ip.is_some()),
            ("project_key_id", self.project_key_id.is_some()),
            ("project_key_name", self.project_key_name.is_some()),
            ("received_at", self.received_at.is_some()),
            ("label", self.label.is_some()),
        ];
        for (field, is_set) in present {
            if required.contains(&field) && !is_set {
                problems.push(format!("input.{field} is required for {:?}", self.kind));
            }
            if is_set && !required.contains(&field) && !allowed.contains(&field) {
                problems.push(format!("input.{field} does not apply to {:?}", self.kind));
            }
        }
        let sources = [
            self.payload.is_some(),
            self.payload_hex.is_some(),
            self.payload_file.is_some(),
            self.payload_parts.is_some(),
            self.bulk.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            problems.push(
                "input: give exactly one of payload, payload_hex, payload_file, payload_parts, bulk"
                    .into(),
            );
        }
        if let Some(hex) = &self.payload_hex
            && let Err(e) = decode_hex(hex)
        {
            problems.push(format!("input.payload_hex: {e}"));
        }
        for (i, chunk) in self.payload_parts.iter().flatten().enumerate() {
            chunk.check(&format!("input.payload_parts[{i}]"), problems);
        }
        if let Some(bulk) = &self.bulk {
            for (i, chunk) in bulk.records.iter().enumerate() {
                chunk.check(&format!("input.bulk.records[{i}]"), problems);
            }
            if let Some(Err(e)) = bulk.trailer_hex.as_deref().map(decode_hex) {
                problems.push(format!("input.bulk.trailer_hex: {e}"));
            }
        }
    }

    /// The payload bytes, reading the case's files from `files`.
    pub fn payload(&self, files: &CaseFiles) -> Result<Vec<u8>, String> {
        if let Some(text) = &self.payload {
            return Ok(text.as_bytes().to_vec());
        }
        if let Some(hex) = &self.payload_hex {
            return decode_hex(hex);
        }
        if let Some(file) = &self.payload_file {
            return files.read(file);
        }
        if let Some(parts) = &self.payload_parts {
            let mut payload = Vec::new();
            for part in parts {
                for n in 0..part.repeat.unwrap_or(1) {
                    payload.extend(part.bytes(files, part.repeat.map(|_| n))?);
                }
            }
            return Ok(payload);
        }
        if let Some(bulk) = &self.bulk {
            let mut records = Vec::new();
            for chunk in &bulk.records {
                for n in 0..chunk.repeat.unwrap_or(1) {
                    records.push(chunk.bytes(files, chunk.repeat.map(|_| n))?);
                }
            }
            let version = bulk.version.as_deref().unwrap_or(bulk::VERSION);
            let mut payload = bulk::encode_version(version, &records);
            if let Some(hex) = &bulk.trailer_hex {
                payload.extend(decode_hex(hex)?);
            }
            return Ok(payload);
        }
        Err("input has no payload".into())
    }
}

impl Chunk {
    fn check(&self, at: &str, problems: &mut Vec<String>) {
        let given = [
            self.text.is_some(),
            self.hex.is_some(),
            self.fill.is_some(),
            self.file.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            problems.push(format!("{at}: give exactly one of text, hex, fill, file"));
        }
        if self.fill.is_some() != self.len.is_some() {
            problems.push(format!("{at}: fill and len go together"));
        }
        if let Some(Err(e)) = self.hex.as_deref().map(decode_hex) {
            problems.push(format!("{at}.hex: {e}"));
        }
    }

    /// The chunk's bytes; `n` is the repetition index when `repeat` is set.
    fn bytes(&self, files: &CaseFiles, n: Option<usize>) -> Result<Vec<u8>, String> {
        if let Some(text) = &self.text {
            return Ok(expand(text, n).into_bytes());
        }
        if let Some(hex) = &self.hex {
            return decode_hex(hex);
        }
        if let (Some(fill), Some(len)) = (self.fill, self.len) {
            return Ok(vec![fill; len]);
        }
        if let Some(file) = &self.file {
            return files.read(file);
        }
        Err("chunk has no bytes".into())
    }
}

impl ExpectRecord {
    fn check(&self, at: &str, bulk: bool, problems: &mut Vec<String>) {
        match (&self.partition_key, self.partition_key_uuid) {
            (Some(_), None) | (None, Some(true)) => {}
            _ => problems.push(format!(
                "{at}: give partition_key, or partition_key_uuid = true"
            )),
        }
        let data = [
            self.data_json.is_some(),
            self.data_text.is_some(),
            self.data_hex.is_some(),
            self.data_fill.is_some(),
            self.data_file.is_some(),
        ];
        if data.iter().filter(|d| **d).count() > 1 {
            problems.push(format!(
                "{at}: give at most one of data_json, data_text, data_hex, data_fill, data_file"
            ));
        }
        if self.data_fill.is_some() != self.data_len.is_some() {
            problems.push(format!("{at}: data_fill and data_len go together"));
        }
        if let Some(Err(e)) = self.data_json.as_deref().map(OrderedJson::parse) {
            problems.push(format!("{at}.data_json is not JSON: {e}"));
        }
        if let Some(Err(e)) = self.data_hex.as_deref().map(decode_hex) {
            problems.push(format!("{at}.data_hex: {e}"));
        }
        if !bulk && (self.offset.is_some() || self.len.is_some()) {
            problems.push(format!("{at}: offset and len apply to bulk records only"));
        }
        if self.repeat.unwrap_or(1) > 1 && self.offset.is_some() {
            problems.push(format!("{at}: offset cannot be repeated"));
        }
    }
}

impl ExpectError {
    fn check(&self, at: &str, problems: &mut Vec<String>) {
        let Some((_, allowed)) = ERROR_KINDS.iter().find(|(k, _)| *k == self.kind) else {
            let kinds: Vec<&str> = ERROR_KINDS.iter().map(|(k, _)| *k).collect();
            problems.push(format!(
                "{at}.kind: unknown kind {:?}, expected one of {}",
                self.kind,
                kinds.join(", ")
            ));
            return;
        };
        let given = [
            ("found", self.found.is_some()),
            ("offset", self.offset.is_some()),
            ("index", self.index.is_some()),
            ("size", self.size.is_some()),
            ("limit", self.limit.is_some()),
            ("field", self.field.is_some()),
        ];
        for (field, is_set) in given {
            if is_set && !allowed.contains(&field) {
                problems.push(format!("{at}.{field} does not apply to {}", self.kind));
            }
        }
    }

    /// Compares with the guest's error; `Err` says what differs.
    pub fn compare(&self, actual: &GuestError) -> Result<(), String> {
        let (kind, found, offset, index, size, limit, field) = error_fields(actual);
        let mut diffs = Vec::new();
        if self.kind != kind {
            return Err(format!(
                "expected a {} error, got {}",
                self.kind,
                describe(actual)
            ));
        }
        diff(&mut diffs, "found", self.found.as_ref(), found.as_ref());
        diff(&mut diffs, "offset", self.offset.as_ref(), offset.as_ref());
        diff(&mut diffs, "index", self.index.as_ref(), index.as_ref());
        diff(&mut diffs, "size", self.size.as_ref(), size.as_ref());
        diff(&mut diffs, "limit", self.limit.as_ref(), limit.as_ref());
        diff(&mut diffs, "field", self.field.as_ref(), field.as_ref());
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{kind} error differs: {} ({})",
                diffs.join(", "),
                describe(actual)
            ))
        }
    }
}

/// The fields of a guest error as (kind, found, offset, index, size, limit, field).
type ErrorFields = (
    &'static str,
    Option<String>,
    Option<u64>,
    Option<u32>,
    Option<u64>,
    Option<u64>,
    Option<String>,
);

fn error_fields(e: &GuestError) -> ErrorFields {
    match e {
        GuestError::UnsupportedVersion(v) => (
            "unsupported-version",
            Some(v.clone()),
            None,
            None,
            None,
            None,
            None,
        ),
        GuestError::MalformedPayload(f) => (
            "malformed-payload",
            None,
            Some(f.offset),
            None,
            None,
            None,
            None,
        ),
        GuestError::NotByteArray(n) => (
            "not-byte-array",
            Some(n.found.clone()),
            Some(n.offset),
            Some(n.index),
            None,
            None,
            None,
        ),
        GuestError::RecordTooLarge(t) => (
            "record-too-large",
            None,
            None,
            Some(t.index),
            Some(t.size),
            Some(t.limit),
            None,
        ),
        GuestError::InvalidEventJson(f) => (
            "invalid-event-json",
            None,
            Some(f.offset),
            None,
            None,
            None,
            None,
        ),
        GuestError::InvalidField(f) => (
            "invalid-field",
            None,
            None,
            None,
            None,
            None,
            Some(f.field.clone()),
        ),
        GuestError::InvalidSettings(f) => (
            "invalid-settings",
            None,
            None,
            None,
            None,
            None,
            Some(f.field.clone()),
        ),
        GuestError::NotConfigured => ("not-configured", None, None, None, None, None, None),
        GuestError::Other(_) => ("other", None, None, None, None, None, None),
    }
}

fn diff<T: PartialEq + fmt::Debug>(
    diffs: &mut Vec<String>,
    name: &str,
    expected: Option<&T>,
    actual: Option<&T>,
) {
    if let Some(expected) = expected
        && Some(expected) != actual
    {
        let actual = actual.map_or_else(|| "nothing".to_owned(), |a| format!("{a:?}"));
        diffs.push(format!("{name}: expected {expected:?}, got {actual}"));
    }
}

/// The time limit of a case when none is given (`--case-timeout-ms`), ms.
pub const DEFAULT_CASE_TIMEOUT_MS: u64 = 2000;

/// The shortest case limit, ms: a tenth of a second, so that each call's
/// share stays above the sandbox's 5 ms clock tick.
pub const MIN_CASE_TIMEOUT_MS: u64 = 100;

/// How many guest call deadlines one case's limit holds: each call's
/// deadline is the limit divided by this, so that whatever the guest does, a
/// case ends within about its limit.
///
/// A case starts an instance (its start functions, then `configure`) and
/// makes at most one handler call; the runtime retries: a call cut off by
/// the clock gets a second chance on a fresh instance, and a fresh instance
/// is started after a failed call. At worst, guest code runs 14 times in one
/// case: the start three times (first, after the handler's first try, after
/// its second), each up to four runs (start functions and `configure`, each
/// tried twice), and the handler twice. A first try ends within one deadline
/// of wall-clock time; a second chance within one deadline of the guest's
/// own CPU time, after clock waits that end within one deadline too, so
/// within two. With at most four second chances that take their time (three
/// of `configure`, one of the handler), that is 18 deadlines, on a machine
/// that gives the guest its CPU (a starved second chance ends at its
/// wall-clock backstop instead).
pub const DEADLINES_PER_CASE: u32 = 18;

/// Cases in a row whose guest runs out of time after which the run stops:
/// the cases left are reported as not run and count as failed.
pub const OUT_OF_TIME_STREAK: usize = 3;

/// The time limit of each case of a run, and the guest call deadline it gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaseLimit {
    timeout: Duration,
}

impl CaseLimit {
    /// A limit of `timeout` per case (at least [`MIN_CASE_TIMEOUT_MS`] to
    /// hold its promise).
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }

    /// The case's time limit.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Each guest call's deadline: [`DEADLINES_PER_CASE`] of them fit in the limit.
    pub fn call_timeout(&self) -> Duration {
        self.timeout / DEADLINES_PER_CASE
    }

    /// The sandbox limits to load the component with: the call deadline,
    /// and the default memory limit.
    pub fn guest_limits(&self) -> GuestLimits {
        GuestLimits {
            call_timeout: self.call_timeout(),
            ..GuestLimits::default()
        }
    }
}

impl Default for CaseLimit {
    fn default() -> Self {
        Self::new(Duration::from_millis(DEFAULT_CASE_TIMEOUT_MS))
    }
}

/// How a case ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The guest answered as the case expects.
    Passed,
    /// It did not, or the case could not be run: why.
    Failed(String),
    /// A guest call ran out of its share of the case limit: where and how.
    OutOfTime(String),
    /// The run stopped before this case ([`EarlyStop`]).
    NotRun,
    /// The case does not apply to the guest (it needs a later contract
    /// version): why.
    Skipped(String),
}

/// How one case went.
#[derive(Debug, Clone)]
pub struct CaseOutcome {
    /// The case's name.
    pub name: String,
    /// The case's description (empty when it could not be read or was not run).
    pub description: String,
    /// How it ended.
    pub verdict: Verdict,
}

impl CaseOutcome {
    /// Whether the case passed.
    pub fn passed(&self) -> bool {
        self.verdict == Verdict::Passed
    }
}

/// `ok   NAME`, or `FAIL NAME: reason` (`not run` for a case the run skipped).
impl fmt::Display for CaseOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.verdict {
            Verdict::Passed => write!(f, "ok   {}", self.name),
            Verdict::Failed(reason) | Verdict::OutOfTime(reason) => {
                write!(f, "FAIL {}: {reason}", self.name)
            }
            Verdict::NotRun => write!(f, "FAIL {}: not run", self.name),
            Verdict::Skipped(reason) => write!(f, "skip {}: {reason}", self.name),
        }
    }
}

/// Why a run stopped before its last case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EarlyStop {
    /// The case limit the guest kept running out of.
    pub limit: Duration,
    /// Cases left, not run.
    pub not_run: usize,
}

/// One line saying why the run stopped and what it means for the rest.
impl fmt::Display for EarlyStop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stopped: {OUT_OF_TIME_STREAK} cases in a row ran past the case limit of {} ms; \
             the {} case(s) left are not run and count as failed",
            self.limit.as_millis(),
            self.not_run
        )
    }
}

/// What a run reports as it goes, in order.
#[derive(Debug, Clone, Copy)]
pub enum Progress<'a> {
    /// A case finished (or, after [`Progress::Stopped`], was not run).
    Case(&'a CaseOutcome),
    /// The run stops early; the cases left follow as not run.
    Stopped(&'a EarlyStop),
}

/// The line to print for this step.
impl fmt::Display for Progress<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Progress::Case(outcome) => outcome.fmt(f),
            Progress::Stopped(stop) => stop.fmt(f),
        }
    }
}

/// Every case's outcome, in case order.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// One outcome per case, including those not run.
    pub outcomes: Vec<CaseOutcome>,
    /// Why the run stopped early, if it did.
    pub stopped: Option<EarlyStop>,
}

impl Report {
    /// Number of cases that passed.
    pub fn passed(&self) -> usize {
        self.outcomes.iter().filter(|o| o.passed()).count()
    }

    /// Number of cases that do not apply to the guest.
    pub fn skipped(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| matches!(o.verdict, Verdict::Skipped(_)))
            .count()
    }

    /// Number of cases that failed or were not run.
    pub fn failed(&self) -> usize {
        self.outcomes.len() - self.passed() - self.skipped()
    }

    /// Whether every case that applies passed (and at least one did).
    pub fn all_passed(&self) -> bool {
        self.passed() > 0 && self.failed() == 0
    }

    /// The last line of a run: `conformance: N passed, M failed`, and how
    /// many were skipped if any were.
    pub fn summary(&self) -> String {
        let skipped = match self.skipped() {
            0 => String::new(),
            n => format!(", {n} skipped (for a later contract version)"),
        };
        format!(
            "conformance: {} passed, {} failed{skipped}",
            self.passed(),
            self.failed()
        )
    }
}

/// A component loaded for conformance, under a [`CaseLimit`].
pub struct Runner {
    runtime: Runtime,
    limit: CaseLimit,
}

impl Runner {
    /// Loads (checks, compiles, links) the component with the limit's call deadline.
    pub fn load(component: &Path, limit: CaseLimit) -> Result<Self, RuntimeError> {
        Ok(Self {
            runtime: Runtime::load_with(component, limit.guest_limits())?,
            limit,
        })
    }

    /// Runs the cases in order, each on its own fresh instance, telling
    /// `progress` about each as soon as it finishes. After
    /// [`OUT_OF_TIME_STREAK`] cases in a row whose guest ran out of time
    /// (cases that could not be read neither count nor break the streak),
    /// the run stops: `progress` hears why once, then each case left as not
    /// run.
    pub fn run(&self, cases: &[Case], mut progress: impl FnMut(Progress<'_>)) -> Report {
        let mut report = Report::default();
        let mut streak = 0;
        for (i, case) in cases.iter().enumerate() {
            if streak >= OUT_OF_TIME_STREAK {
                let stop = EarlyStop {
                    limit: self.limit.timeout(),
                    not_run: cases.len() - i,
                };
                progress(Progress::Stopped(&stop));
                for case in &cases[i..] {
                    let outcome = CaseOutcome {
                        name: case.name.clone(),
                        description: String::new(),
                        verdict: Verdict::NotRun,
                    };
                    progress(Progress::Case(&outcome));
                    report.outcomes.push(outcome);
                }
                report.stopped = Some(stop);
                break;
            }
            if case.needs == Contract::V1_1 && self.runtime.contract() == Contract::V1_0 {
                let outcome = CaseOutcome {
                    name: case.name.clone(),
                    description: String::new(),
                    verdict: Verdict::Skipped(
                        "a contract 1.1 case; the guest speaks 1.0".to_owned(),
                    ),
                };
                progress(Progress::Case(&outcome));
                report.outcomes.push(outcome);
                continue;
            }
            let outcome = self.run_case(case);
            match outcome.verdict {
                Verdict::OutOfTime(_) => streak += 1,
                _ if case.spec.is_ok() => streak = 0,
                _ => {}
            }
            progress(Progress::Case(&outcome));
            report.outcomes.push(outcome);
        }
        report
    }

    /// Runs one case on a fresh instance.
    pub fn run_case(&self, case: &Case) -> CaseOutcome {
        let (description, result) = match &case.spec {
            Ok(spec) => (spec.description.clone(), self.run_spec(spec, &case.files)),
            Err(reason) => (String::new(), Err(CaseError::Failed(reason.clone()))),
        };
        CaseOutcome {
            name: case.name.clone(),
            description,
            verdict: match result {
                Ok(()) => Verdict::Passed,
                Err(CaseError::Failed(reason)) => Verdict::Failed(reason),
                Err(CaseError::OutOfTime(reason)) => Verdict::OutOfTime(reason),
            },
        }
    }

    fn run_spec(&self, spec: &CaseSpec, files: &CaseFiles) -> Result<(), CaseError> {
        if let Some(batch) = &spec.batch {
            return self.run_batch(spec, batch, files);
        }
        let payload = match &spec.input {
            Some(input) => Some(input.payload(files)?),
            None => None,
        };
        let answer = self.call(spec, payload)?;
        Ok(compare_answer(answer, &spec.expect, files)?)
    }

    /// Runs a batch case: one `Guest::handle` call, as the router makes for
    /// a run of messages; a 1.1 guest must answer it in one batch call.
    fn run_batch(
        &self,
        spec: &CaseSpec,
        batch: &[InputSpec],
        files: &CaseFiles,
    ) -> Result<(), CaseError> {
        let mut messages = Vec::with_capacity(batch.len());
        for input in batch {
            messages.push(CaseMessage::new(input, input.payload(files)?));
        }
        let mut guest = match self
            .runtime
            .instantiate(&spec.settings.to_module_settings())
        {
            Ok(guest) => guest,
            Err(RuntimeError::Settings(e)) => {
                return Err(CaseError::Failed(format!(
                    "configure refused the settings: {}",
                    describe(&e)
                )));
            }
            Err(e) => return Err(self.runtime_error("configure", e)),
        };
        let inputs: Vec<Input<'_>> = messages.iter().map(CaseMessage::input).collect();
        let handled = guest.handle(&inputs);
        if let Some(reason) = handled.batch_failed {
            return Err(CaseError::Failed(format!(
                "the batch call failed, so the host ran its messages one by one: {reason}"
            )));
        }
        if self.runtime.contract() == Contract::V1_1 && handled.calls != 1 {
            return Err(CaseError::Failed(format!(
                "{} guest calls for a batch of {} messages (one is the contract)",
                handled.calls,
                inputs.len()
            )));
        }
        let outcomes = spec.expect.outcomes.as_deref().unwrap_or_default();
        for (i, ((answer, message), expect)) in handled
            .answers
            .into_iter()
            .zip(messages)
            .zip(outcomes)
            .enumerate()
        {
            let answer = answer.map_err(|e| self.runtime_error("a batch", e))?;
            let answer = answer.map(|answer| Output::of(answer, message.payload));
            compare_answer(answer, expect, files)
                .map_err(|reason| CaseError::Failed(format!("message {i}: {reason}")))?;
        }
        Ok(())
    }

    /// Instantiates (configuring) and makes the case's one call. The outer
    /// `Err` is a runner or runtime failure, the inner one the guest's error.
    fn call(
        &self,
        spec: &CaseSpec,
        payload: Option<Vec<u8>>,
    ) -> Result<Result<Output, GuestError>, CaseError> {
        let mut guest = match self
            .runtime
            .instantiate(&spec.settings.to_module_settings())
        {
            Ok(guest) => guest,
            Err(RuntimeError::Settings(e)) => return Ok(Err(e)),
            Err(e) => return Err(self.runtime_error("configure", e)),
        };
        let (Some(input), Some(payload)) = (&spec.input, payload) else {
            return Ok(Ok(Output::Configured));
        };
        let message = CaseMessage::new(input, payload);
        let phase = match input.kind {
            InputKind::DeviceEvent => "a device event",
            InputKind::HomeEvent => "a home event",
            InputKind::BulkData => "bulk data",
        };
        let answer = guest
            .one(&message.input())
            .map_err(|e| self.runtime_error(phase, e))?;
        Ok(answer.map(|answer| Output::of(answer, message.payload)))
    }

    /// A runtime failure during `phase` (the WIT function) as the case's
    /// failure: out of time if the sandbox stopped the guest for its
    /// deadline or a clock wait past it.
    fn runtime_error(&self, phase: &str, error: RuntimeError) -> CaseError {
        let out_of_time = matches!(
            error.fault(),
            Some(GuestFault::Deadline(_) | GuestFault::OwnWork { .. } | GuestFault::Sleep { .. })
        );
        if out_of_time {
            CaseError::OutOfTime(format!(
                "ran past the case limit of {} ms in {phase} (a call's share is 1/{} of it, \
                 {} ms; {error})",
                self.limit.timeout().as_millis(),
                DEADLINES_PER_CASE,
                self.limit.call_timeout().as_millis()
            ))
        } else {
            CaseError::Failed(format!("runtime, in {phase}: {error}"))
        }
    }
}

/// A case's input as the host would hand it to a guest: its context, its
/// payload and the MQTT topic it would have come on.
struct CaseMessage {
    kind: InputKind,
    device: DeviceContext,
    home: HomeContext,
    label: String,
    topic: String,
    payload: Vec<u8>,
}

impl CaseMessage {
    fn new(input: &InputSpec, payload: Vec<u8>) -> Self {
        let received_at = input
            .received_at
            .clone()
            .unwrap_or_else(|| DEFAULT_RECEIVED_AT.to_owned());
        // `check` guarantees the IDs each kind needs; 0 is never used.
        let device_id = input.device_id.unwrap_or_default();
        let home_id = input.home_id.unwrap_or_default();
        let label = input.label.clone().unwrap_or_default();
        let topic = match input.kind {
            InputKind::DeviceEvent => format!("/devices/{device_id}/event"),
            InputKind::HomeEvent => format!("/homes/{home_id}/event"),
            InputKind::BulkData => format!("/devices/{device_id}/bulkData/{label}"),
        };
        CaseMessage {
            kind: input.kind,
            device: DeviceContext {
                device_id,
                home_id: input.home_id,
                device_class: input.device_class.clone(),
                device_ip: input.device_ip.clone(),
                received_at: received_at.clone(),
            },
            home: HomeContext {
                home_id,
                project_key_id: input.project_key_id.clone(),
                project_key_name: input.project_key_name.clone(),
                received_at,
            },
            label,
            topic,
            payload,
        }
    }

    fn input(&self) -> Input<'_> {
        let mqtt = Mqtt {
            topic: &self.topic,
            content_type: None,
            user_properties: &[],
        };
        match self.kind {
            InputKind::DeviceEvent => Input::DeviceEvent {
                context: &self.device,
                payload: &self.payload,
                mqtt,
            },
            InputKind::HomeEvent => Input::HomeEvent {
                context: &self.home,
                payload: &self.payload,
                mqtt,
            },
            InputKind::BulkData => Input::BulkData {
                device_id: self.device.device_id,
                label: &self.label,
                payload: &self.payload,
                mqtt,
            },
        }
    }
}

/// Why a case did not pass.
enum CaseError {
    /// A wrong answer, a runtime failure, an unusable case: why.
    Failed(String),
    /// The guest ran out of time: where and how.
    OutOfTime(String),
}

impl From<String> for CaseError {
    fn from(reason: String) -> Self {
        CaseError::Failed(reason)
    }
}

/// What a call gave back, for comparison.
enum Output {
    /// `configure` succeeded and there was no input.
    Configured,
    /// An event handler's records.
    Records(Vec<KinesisRecord>),
    /// The bulk handler's output, with the payload its spans point into.
    Bulk(BulkOutput, Vec<u8>),
}

impl Output {
    /// A guest's answer to a message whose payload was `payload`.
    fn of(answer: Answer, payload: Vec<u8>) -> Self {
        match answer {
            Answer::Records(records) => Output::Records(records),
            Answer::Bulk(output) => Output::Bulk(output, payload),
        }
    }
}

/// Expands `repeat`: one entry per expected record, with its repetition
/// index when repeated (for `{n}` in `data_text`).
fn expand_records(records: &[ExpectRecord]) -> Vec<(&ExpectRecord, Option<usize>)> {
    records
        .iter()
        .flat_map(|r| match r.repeat {
            Some(times) => (0..times).map(|n| (r, Some(n))).collect::<Vec<_>>(),
            None => vec![(r, None)],
        })
        .collect()
}

/// An actual record, event or bulk, reduced to what is compared.
struct Actual<'a> {
    data: &'a [u8],
    span: Option<&'a Span>,
    partition_key: &'a str,
    explicit_hash_key: Option<&'a str>,
}

/// Compares a call's answer (or `configure`'s) with what the case expects.
fn compare_answer(
    answer: Result<Output, GuestError>,
    expect: &ExpectSpec,
    files: &CaseFiles,
) -> Result<(), String> {
    match (answer, &expect.error) {
        (Err(actual), Some(expected)) => expected.compare(&actual),
        (Err(actual), None) => Err(format!(
            "expected records, got a {} error: {}",
            error_fields(&actual).0,
            describe(&actual)
        )),
        (Ok(output), Some(expected)) => Err(format!(
            "expected a {} error, got {}",
            expected.kind,
            match output {
                Output::Configured => "a successful configure".to_owned(),
                Output::Records(r) => format!("{} record(s)", r.len()),
                Output::Bulk(b, _) => format!(
                    "{} record(s) and {} rejected",
                    b.records.len(),
                    b.rejected.len()
                ),
            }
        )),
        (Ok(output), None) => {
            let records = expand_records(expect.records.as_deref().unwrap_or_default());
            let rejected = expect.rejected.as_deref().unwrap_or_default();
            compare_output(&output, &records, rejected, files)
        }
    }
}

fn compare_output(
    output: &Output,
    expected: &[(&ExpectRecord, Option<usize>)],
    rejected: &[ExpectRejected],
    files: &CaseFiles,
) -> Result<(), String> {
    let actual: Vec<Actual<'_>> = match output {
        Output::Configured => Vec::new(),
        Output::Records(records) => records
            .iter()
            .map(|r| Actual {
                data: &r.data,
                span: None,
                partition_key: &r.partition_key,
                explicit_hash_key: r.explicit_hash_key.as_deref(),
            })
            .collect(),
        Output::Bulk(out, payload) => {
            let mut actual = Vec::new();
            for (i, r) in out.records.iter().enumerate() {
                actual.push(Actual {
                    data: span_bytes(payload, &r.data).map_err(|e| format!("record {i}: {e}"))?,
                    span: Some(&r.data),
                    partition_key: &r.partition_key,
                    explicit_hash_key: r.explicit_hash_key.as_deref(),
                });
            }
            actual
        }
    };
    if actual.len() != expected.len() {
        return Err(format!(
            "expected {} record(s), got {}",
            expected.len(),
            actual.len()
        ));
    }
    let mut uuids = HashSet::new();
    for (i, (actual, (expected, n))) in actual.iter().zip(expected).enumerate() {
        compare_record(actual, expected, *n, files, &mut uuids)
            .map_err(|e| format!("record {i}: {e}"))?;
    }
    let actual_rejected = match output {
        Output::Bulk(out, payload) => {
            for r in &out.rejected {
                span_bytes(payload, &r.data)
                    .map_err(|e| format!("rejected record {}: {e}", r.index))?;
            }
            out.rejected.as_slice()
        }
        _ => &[],
    };
    if actual_rejected.len() != rejected.len() {
        return Err(format!(
            "expected {} rejected record(s), got {}{}",
            rejected.len(),
            actual_rejected.len(),
            actual_rejected
                .iter()
                .map(|r| format!("; {}: {}", r.index, describe(&r.reason)))
                .collect::<String>()
        ));
    }
    for (i, (actual, expected)) in actual_rejected.iter().zip(rejected).enumerate() {
        let mut diffs = Vec::new();
        diff(
            &mut diffs,
            "index",
            Some(&expected.index),
            Some(&actual.index),
        );
        diff(
            &mut diffs,
            "offset",
            expected.offset.as_ref(),
            Some(&actual.data.offset),
        );
        diff(
            &mut diffs,
            "len",
            expected.len.as_ref(),
            Some(&actual.data.len),
        );
        if !diffs.is_empty() {
            return Err(format!("rejected record {i}: {}", diffs.join(", ")));
        }
        expected
            .error
            .compare(&actual.reason)
            .map_err(|e| format!("rejected record {i}: {e}"))?;
    }
    Ok(())
}

fn compare_record(
    actual: &Actual<'_>,
    expected: &ExpectRecord,
    n: Option<usize>,
    files: &CaseFiles,
    uuids: &mut HashSet<String>,
) -> Result<(), String> {
    if let Some(key) = &expected.partition_key
        && key != actual.partition_key
    {
        return Err(format!(
            "partition key: expected {key:?}, got {:?}",
            actual.partition_key
        ));
    }
    if expected.partition_key_uuid == Some(true) {
        if !is_uuid_v4(actual.partition_key) {
            return Err(format!(
                "partition key {:?} is not a lowercase hyphenated UUIDv4",
                actual.partition_key
            ));
        }
        if !uuids.insert(actual.partition_key.to_owned()) {
            return Err(format!(
                "partition key {:?} is used twice in this case",
                actual.partition_key
            ));
        }
    }
    if expected.explicit_hash_key.as_deref() != actual.explicit_hash_key {
        return Err(format!(
            "explicit hash key: expected {:?}, got {:?}",
            expected.explicit_hash_key, actual.explicit_hash_key
        ));
    }
    if let Some(span) = actual.span {
        let mut diffs = Vec::new();
        diff(
            &mut diffs,
            "offset",
            expected.offset.as_ref(),
            Some(&span.offset),
        );
        diff(&mut diffs, "len", expected.len.as_ref(), Some(&span.len));
        if !diffs.is_empty() {
            return Err(format!("span: {}", diffs.join(", ")));
        }
    }
    if let Some(size) = expected.data_size
        && size != actual.data.len()
    {
        return Err(format!(
            "data size: expected {size} byte(s), got {}",
            actual.data.len()
        ));
    }
    if let Some(json) = &expected.data_json {
        let expected = OrderedJson::parse(json).map_err(|e| format!("data_json: {e}"))?;
        let actual = OrderedJson::parse_bytes(actual.data)
            .map_err(|e| format!("data is not JSON ({e}): {}", preview(actual.data)))?;
        return expected.compare(&actual, "$");
    }
    let want = if let Some(text) = &expected.data_text {
        Some(expand(text, n).into_bytes())
    } else if let Some(hex) = &expected.data_hex {
        Some(decode_hex(hex)?)
    } else if let (Some(fill), Some(len)) = (expected.data_fill, expected.data_len) {
        Some(vec![fill; len])
    } else if let Some(file) = &expected.data_file {
        Some(files.read(file)?)
    } else {
        None
    };
    match want {
        Some(want) if want != actual.data => Err(format!(
            "data differs: expected {} byte(s) {}, got {} byte(s) {}",
            want.len(),
            preview(&want),
            actual.data.len(),
            preview(actual.data)
        )),
        _ => Ok(()),
    }
}

/// The bytes of `span` in `payload`, or why it is out of bounds.
fn span_bytes<'a>(payload: &'a [u8], span: &Span) -> Result<&'a [u8], String> {
    let start = span.offset as usize;
    start
        .checked_add(span.len as usize)
        .and_then(|end| payload.get(start..end))
        .ok_or_else(|| {
            format!(
                "span {}+{} is outside the {}-byte payload",
                span.offset,
                span.len,
                payload.len()
            )
        })
}

/// A short printable view of some bytes, for failure messages.
fn preview(bytes: &[u8]) -> String {
    const MAX: usize = 120;
    let shown = &bytes[..bytes.len().min(MAX)];
    let text = String::from_utf8_lossy(shown);
    let ellipsis = if bytes.len() > MAX { "..." } else { "" };
    format!("{:?}{ellipsis}", text)
}

/// Replaces `{n}` with the repetition index when there is one.
fn expand(text: &str, n: Option<usize>) -> String {
    match n {
        Some(n) => text.replace("{n}", &n.to_string()),
        None => text.to_owned(),
    }
}

/// Decodes hex digits (either case), ignoring ASCII whitespace.
pub fn decode_hex(hex: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = hex.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        return Err(format!("odd number of hex digits ({})", digits.len()));
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(format!("{:?} is not a hex digit", char::from(c))),
    };
    digits
        .chunks_exact(2)
        .map(|pair| Ok(nibble(pair[0])? << 4 | nibble(pair[1])?))
        .collect()
}

/// Whether `key` is a lowercase hyphenated UUID of version 4, RFC 4122 variant.
pub fn is_uuid_v4(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
        })
        && b[14] == b'4'
        && matches!(b[19], b'8' | b'9' | b'a' | b'b')
}

/// A JSON value that keeps object keys in document order, whatever
/// serde_json's `preserve_order` feature, so that key order can be compared.
#[derive(Debug, Clone, PartialEq)]
pub enum OrderedJson {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A number, compared as serde_json compares them (1 ≠ 1.0).
    Number(serde_json::Number),
    /// A string.
    String(String),
    /// An array.
    Array(Vec<OrderedJson>),
    /// An object, keys in document order.
    Object(Vec<(String, OrderedJson)>),
}

impl OrderedJson {
    /// Parses JSON text.
    pub fn parse(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }

    /// Parses JSON bytes.
    pub fn parse_bytes(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }

    /// Compares `self` (expected) with `actual`, keys in order, and says
    /// where the first difference is (`at` is the JSON path so far).
    pub fn compare(&self, actual: &OrderedJson, at: &str) -> Result<(), String> {
        match (self, actual) {
            (OrderedJson::Object(want), OrderedJson::Object(got)) => {
                let want_keys: Vec<&str> = want.iter().map(|(k, _)| k.as_str()).collect();
                let got_keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
                if want_keys != got_keys {
                    return Err(format!(
                        "at {at}: expected keys {want_keys:?} in this order, got {got_keys:?}"
                    ));
                }
                for ((key, w), (_, g)) in want.iter().zip(got) {
                    w.compare(g, &format!("{at}.{key}"))?;
                }
                Ok(())
            }
            (OrderedJson::Array(want), OrderedJson::Array(got)) => {
                if want.len() != got.len() {
                    return Err(format!(
                        "at {at}: expected {} element(s), got {}",
                        want.len(),
                        got.len()
                    ));
                }
                for (i, (w, g)) in want.iter().zip(got).enumerate() {
                    w.compare(g, &format!("{at}[{i}]"))?;
                }
                Ok(())
            }
            (want, got) if want == got => Ok(()),
            (want, got) => Err(format!("at {at}: expected {want}, got {got}")),
        }
    }
}

/// Compact JSON text.
impl fmt::Display for OrderedJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OrderedJson::Null => f.write_str("null"),
            OrderedJson::Bool(b) => write!(f, "{b}"),
            OrderedJson::Number(n) => write!(f, "{n}"),
            OrderedJson::String(s) => write!(f, "{}", serde_json::Value::String(s.clone())),
            OrderedJson::Array(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
            OrderedJson::Object(entries) => {
                f.write_str("{")?;
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{}:{v}", serde_json::Value::String(k.clone()))?;
                }
                f.write_str("}")
            }
        }
    }
}

impl<'de> Deserialize<'de> for OrderedJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(OrderedJsonVisitor)
    }
}

struct OrderedJsonVisitor;

impl<'de> serde::de::Visitor<'de> for OrderedJsonVisitor {
    type Value = OrderedJson;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<OrderedJson, E> {
        Ok(OrderedJson::Null)
    }

    fn visit_bool<E>(self, v: bool) -> Result<OrderedJson, E> {
        Ok(OrderedJson::Bool(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<OrderedJson, E> {
        Ok(OrderedJson::Number(v.into()))
    }

    fn visit_i64<E>(self, v: i64) -> Result<OrderedJson, E> {
        Ok(OrderedJson::Number(v.into()))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<OrderedJson, E> {
        serde_json::Number::from_f64(v)
            .map(OrderedJson::Number)
            .ok_or_else(|| E::custom("a JSON number must be finite"))
    }

    fn visit_str<E>(self, v: &str) -> Result<OrderedJson, E> {
        Ok(OrderedJson::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<OrderedJson, E> {
        Ok(OrderedJson::String(v))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<OrderedJson, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(OrderedJson::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<OrderedJson, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(OrderedJson::Object(entries))
    }
}

/// How long the cost of one kind of call is measured, per form (one
/// message per call; batches).
const COST_TIME: Duration = Duration::from_millis(200);

/// Messages per batch call when measuring a 1.1 guest's batches.
pub const COST_BATCH: usize = 64;

/// What one kind of call costs a guest: the mean over repeated calls on one
/// warm instance, configured with a case's settings, taking that case's
/// input.
#[derive(Debug, Clone)]
pub struct Cost {
    /// The input's kind.
    pub kind: InputKind,
    /// The case whose input was measured.
    pub case: String,
    /// Messages per call: 1, or [`COST_BATCH`] for a batch.
    pub batch: usize,
    /// Records one message gives.
    pub records: usize,
    /// Messages handled while measuring.
    pub messages: u64,
    /// Mean time per message.
    pub per_message: Duration,
}

/// `cost  device-event  2.9 µs per message, 2.9 µs per record (…)`.
impl fmt::Display for Cost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            InputKind::DeviceEvent => "device-event",
            InputKind::HomeEvent => "home-event",
            InputKind::BulkData => "bulk-data",
        };
        let form = match self.batch {
            1 => "one per call".to_owned(),
            n => format!("batches of {n}"),
        };
        let ns = self.per_message.as_secs_f64() * 1e9;
        write!(f, "cost {kind:<12} {form:<14} {ns:>10.0} ns per message")?;
        if self.records > 0 {
            write!(f, ", {:>8.1} ns per record", ns / self.records as f64)?;
        }
        write!(
            f,
            " ({}: {} record(s) per message, {} messages)",
            self.case, self.records, self.messages
        )
    }
}

impl Runner {
    /// What each kind of call costs the guest, measured on one passed case
    /// per kind (for events one giving a record, for bulk data the one with
    /// most records among payloads up to 64 KiB), one message per call and,
    /// for a 1.1 guest, in batches of [`COST_BATCH`].
    pub fn costs(&self, cases: &[Case], report: &Report) -> Vec<Cost> {
        let mut costs = Vec::new();
        for kind in [
            InputKind::DeviceEvent,
            InputKind::HomeEvent,
            InputKind::BulkData,
        ] {
            let Some((case, message, records)) = self.cost_case(cases, report, kind) else {
                continue;
            };
            let mut batches = vec![1];
            if self.runtime.contract() == Contract::V1_1 {
                batches.push(COST_BATCH);
            }
            for batch in batches {
                if let Some((messages, per_message)) = self.measure(case, &message, batch) {
                    costs.push(Cost {
                        kind,
                        case: case.name.clone(),
                        batch,
                        records,
                        messages,
                        per_message,
                    });
                }
            }
        }
        costs
    }

    /// The case measured for `kind`, its message and its records per message.
    fn cost_case<'a>(
        &self,
        cases: &'a [Case],
        report: &Report,
        kind: InputKind,
    ) -> Option<(&'a Case, CaseMessage, usize)> {
        let mut best: Option<(&Case, CaseMessage, usize)> = None;
        for (case, outcome) in cases.iter().zip(&report.outcomes) {
            let Ok(spec) = &case.spec else { continue };
            let Some(input) = spec.input.as_ref().filter(|i| i.kind == kind) else {
                continue;
            };
            if !outcome.passed() || spec.expect.error.is_some() {
                continue;
            }
            let Ok(payload) = input.payload(&case.files) else {
                continue;
            };
            if payload.len() > 64 * 1024 {
                continue;
            }
            let records = match spec.expect.records.as_deref() {
                Some(records) => records.iter().map(|r| r.repeat.unwrap_or(1)).sum(),
                None => 0,
            };
            let better = match (&best, kind) {
                (None, _) => records > 0,
                (Some((_, _, most)), InputKind::BulkData) => records > *most,
                (Some(_), _) => false,
            };
            if better {
                best = Some((case, CaseMessage::new(input, payload), records));
            }
        }
        best
    }

    /// Calls the guest with `batch` copies of `message` per call for
    /// [`COST_TIME`] after a warm-up: messages handled and mean time per
    /// message, or `None` if a call failed.
    fn measure(&self, case: &Case, message: &CaseMessage, batch: usize) -> Option<(u64, Duration)> {
        let settings = case.spec.as_ref().ok()?.settings.to_module_settings();
        let mut guest = self.runtime.instantiate(&settings).ok()?;
        let inputs = vec![message.input(); batch];
        let call = |guest: &mut Guest| -> Option<()> {
            if batch == 1 {
                guest.one(&inputs[0]).ok()?.ok().map(drop)
            } else {
                let handled = guest.handle(&inputs);
                let clean = handled.batch_failed.is_none()
                    && handled.answers.iter().all(|a| matches!(a, Ok(Ok(_))));
                clean.then_some(())
            }
        };
        for _ in 0..3 {
            call(&mut guest)?;
        }
        let start = Instant::now();
        let mut messages = 0u64;
        while start.elapsed() < COST_TIME {
            call(&mut guest)?;
            messages += batch as u64;
        }
        Some((messages, start.elapsed() / u32::try_from(messages).ok()?))
    }
}

/// What to run: the command line of `ksm-conformance` and of
/// `ksm conformance`.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// The component (.wasm) to check.
    #[arg(required_unless_present = "write_cases")]
    pub component: Option<PathBuf>,
    /// Directory of cases (default: the cases built in).
    #[arg(long, value_name = "DIR")]
    pub cases: Option<PathBuf>,
    /// Time limit of each case, ms (at least 100). Each guest call gets
    /// 1/18 of it, so that a case cannot take much longer whatever the
    /// guest does; a case whose guest runs out of it fails, and after 3
    /// such cases in a row the cases left are not run and count as failed.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = DEFAULT_CASE_TIMEOUT_MS,
        value_parser = clap::value_parser!(u64).range(MIN_CASE_TIMEOUT_MS..)
    )]
    pub case_timeout_ms: u64,
    /// Write the built-in cases into DIR as files, and run nothing.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["component", "cases"])]
    pub write_cases: Option<PathBuf>,
}

/// Runs what `options` say, writing each case's line to `out` as it
/// finishes, then the guest's cost per call kind, then the summary line.
/// True if every case that applies passed (or cases were written).
pub fn run(options: &Options, out: &mut impl std::io::Write) -> Result<bool, ConformanceError> {
    if let Some(dir) = &options.write_cases {
        let written = write_built_in_cases(dir)?;
        writeln!(
            out,
            "wrote {written} files of the built-in cases to {}",
            dir.display()
        )?;
        return Ok(true);
    }
    let Some(component) = &options.component else {
        return Ok(false);
    };
    let limit = CaseLimit::new(Duration::from_millis(options.case_timeout_ms));
    let runner = Runner::load(component, limit)?;
    let cases = match &options.cases {
        Some(dir) => load_cases(dir)?,
        None => built_in_cases(),
    };
    writeln!(
        out,
        "{}: {}",
        component.display(),
        runner.runtime.contract()
    )?;
    // Once `out` fails (a closed pipe), the run goes on silently and ends
    // with the error.
    let mut written = Ok(());
    let report = runner.run(&cases, |progress| {
        if written.is_ok() {
            written = writeln!(out, "{progress}").and_then(|()| out.flush());
        }
    });
    written?;
    let costs = runner.costs(&cases, &report);
    if cfg!(debug_assertions) && !costs.is_empty() {
        writeln!(
            out,
            "(costs below are from a debug build of this runner: a release build's are lower)"
        )?;
    }
    for cost in costs {
        writeln!(out, "{cost}")?;
    }
    writeln!(out, "{}", report.summary())?;
    out.flush()?;
    Ok(report.all_passed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex() {
        assert_eq!(
            decode_hex("00ff A3 7f\n10").unwrap(),
            [0, 0xff, 0xa3, 0x7f, 0x10]
        );
        assert_eq!(decode_hex("").unwrap(), Vec::<u8>::new());
        assert!(decode_hex("abc").is_err());
        assert!(decode_hex("zz").is_err());
    }

    #[test]
    fn uuid_shape() {
        assert!(is_uuid_v4("0b4f8a52-1c3d-4e5f-9a6b-7c8d9e0f1a2b"));
        assert!(!is_uuid_v4("0B4F8A52-1C3D-4E5F-9A6B-7C8D9E0F1A2B"));
        assert!(!is_uuid_v4("0b4f8a52-1c3d-1e5f-9a6b-7c8d9e0f1a2b"));
        assert!(!is_uuid_v4("0b4f8a52-1c3d-4e5f-ca6b-7c8d9e0f1a2b"));
        assert!(!is_uuid_v4("0b4f8a521c3d4e5f9a6b7c8d9e0f1a2b"));
        assert!(!is_uuid_v4("1001"));
    }

    #[test]
    fn ordered_json_compares_key_order() {
        let a = OrderedJson::parse(r#"{"a":1,"b":{"x":[1,2.5,"s"],"y":null}}"#).unwrap();
        let same =
            OrderedJson::parse(r#"{ "a": 1, "b": {"x": [1, 2.5, "s"], "y": null} }"#).unwrap();
        assert_eq!(a.compare(&same, "$"), Ok(()));
        let swapped = OrderedJson::parse(r#"{"b":{"x":[1,2.5,"s"],"y":null},"a":1}"#).unwrap();
        assert!(
            a.compare(&swapped, "$")
                .unwrap_err()
                .contains("in this order")
        );
        let nested = OrderedJson::parse(r#"{"a":1,"b":{"y":null,"x":[1,2.5,"s"]}}"#).unwrap();
        assert!(a.compare(&nested, "$").unwrap_err().starts_with("at $.b:"));
        let value = OrderedJson::parse(r#"{"a":1,"b":{"x":[1,2.5,"t"],"y":null}}"#).unwrap();
        assert_eq!(
            a.compare(&value, "$").unwrap_err(),
            r#"at $.b.x[2]: expected "s", got "t""#
        );
        let float = OrderedJson::parse(r#"{"a":1.0,"b":{"x":[1,2.5,"s"],"y":null}}"#).unwrap();
        assert!(a.compare(&float, "$").is_err());
        assert_eq!(a.to_string(), r#"{"a":1,"b":{"x":[1,2.5,"s"],"y":null}}"#);
    }

    fn problems(toml: &str) -> String {
        CaseSpec::parse(toml).unwrap_err()
    }

    #[test]
    fn spec_rules() {
        let ok = r#"
            description = "d"
            [input]
            kind = "bulk-data"
            device_id = 1
            label = "l"
            bulk = { records = [{ text = "a" }] }
            [expect]
            records = [{ partition_key = "1", data_text = "a", offset = 6, len = 1 }]
        "#;
        let spec = CaseSpec::parse(ok).unwrap();
        assert_eq!(spec.settings.max_record_size, DEFAULT_MAX_RECORD_SIZE);
        let payload = spec
            .input
            .as_ref()
            .unwrap()
            .payload(&CaseFiles::Dir(".".into()))
            .unwrap();
        assert_eq!(payload, crate::bulk::encode([b"a"]));

        assert!(problems(&ok.replace("label = \"l\"", "")).contains("input.label is required"));
        assert!(
            problems(&ok.replace("label = \"l\"", "label = \"l\"\nhome_id = 3"))
                .contains("input.home_id does not apply")
        );
        assert!(
            problems(&ok.replace("kind = \"bulk-data\"", "kind = \"x\""))
                .contains("unknown variant")
        );
        assert!(problems(&ok.replace("description", "descr")).contains("unknown field"));
        assert!(
            problems(&ok.replace(
                "data_text = \"a\",",
                "data_text = \"a\", data_hex = \"61\","
            ))
            .contains("at most one of")
        );
        assert!(
            problems(&ok.replace("partition_key = \"1\"", "partition_key_uuid = false"))
                .contains("partition_key")
        );
        assert!(
            problems(&ok.replace(
                "records = [{ partition_key",
                "error = { kind = \"nope\" }\nrecords = [{ partition_key"
            ))
            .contains("not both")
        );
        let bad_error = ok.replace(
            "records = [{ partition_key = \"1\", data_text = \"a\", offset = 6, len = 1 }]",
            "error = { kind = \"record-too-large\", field = \"x\" }",
        );
        assert!(problems(&bad_error).contains("expect.error.field does not apply"));
        let bad_kind = ok.replace(
            "records = [{ partition_key = \"1\", data_text = \"a\", offset = 6, len = 1 }]",
            "error = { kind = \"oops\" }",
        );
        assert!(problems(&bad_kind).contains("unknown kind"));
        assert!(
            problems(&ok.replace("bulk = {", "payload = \"x\"\nbulk = {"))
                .contains("exactly one of payload")
        );
    }

    #[test]
    fn payload_forms() {
        let dir = &CaseFiles::Dir(".".into());
        let input = |extra: &str| -> InputSpec {
            let text = format!("kind = \"device-event\"\ndevice_id = 1\n{extra}");
            toml::from_str(&text).unwrap()
        };
        assert_eq!(input("payload = 'ab'").payload(dir).unwrap(), b"ab");
        assert_eq!(input("payload_hex = '6162'").payload(dir).unwrap(), b"ab");
        assert_eq!(
            input("payload_parts = [{ text = '<' }, { fill = 120, len = 3 }, { text = '{n},', repeat = 3 }, { hex = '3e' }]")
                .payload(dir)
                .unwrap(),
            b"<xxx0,1,2,>"
        );
        let bulk = input(
            "bulk = { version = '2.0', records = [{ text = 'r{n}', repeat = 2 }, { hex = '00' }], trailer_hex = 'c0' }",
        )
        .payload(dir)
        .unwrap();
        let mut want = crate::bulk::encode_version("2.0", [&b"r0"[..], b"r1", b"\0"]);
        want.push(0xc0);
        assert_eq!(bulk, want);
        assert!(
            input("payload_file = 'no-such-file.bin'")
                .payload(dir)
                .is_err()
        );
    }

    #[test]
    fn error_comparison() {
        use ksm_bindings::types::{PayloadFault, TooLarge};
        let expected = ExpectError {
            kind: "record-too-large".into(),
            found: None,
            offset: None,
            index: Some(1),
            size: Some(11),
            limit: None,
            field: None,
        };
        let actual = GuestError::RecordTooLarge(TooLarge {
            index: 1,
            size: 11,
            limit: 10,
        });
        assert_eq!(expected.compare(&actual), Ok(()));
        let other = GuestError::RecordTooLarge(TooLarge {
            index: 2,
            size: 11,
            limit: 10,
        });
        assert!(
            expected
                .compare(&other)
                .unwrap_err()
                .contains("index: expected 1, got 2")
        );
        let kind = GuestError::MalformedPayload(PayloadFault {
            offset: 0,
            detail: "x".into(),
        });
        assert!(
            expected
                .compare(&kind)
                .unwrap_err()
                .contains("expected a record-too-large error")
        );
    }

    /// Every shipped case parses and passes the spec checks, and its input
    /// payload can be built.
    #[test]
    fn shipped_cases_are_well_formed() {
        let cases = built_in_cases();
        assert!(cases.len() >= 40, "only {} cases", cases.len());
        let mut names = HashSet::new();
        for case in &cases {
            let spec = case
                .spec
                .as_ref()
                .unwrap_or_else(|e| panic!("{}: {e}", case.name));
            assert!(!spec.description.trim().is_empty(), "{}", case.name);
            if let Some(input) = &spec.input {
                input
                    .payload(&case.files)
                    .unwrap_or_else(|e| panic!("{}: {e}", case.name));
            }
            let (group, dir) = case
                .name
                .split_once('/')
                .unwrap_or_else(|| panic!("{}: not in a version group", case.name));
            assert!(group_contract(group).is_some(), "{}", case.name);
            let number = dir.split('-').next().unwrap_or_default();
            assert!(
                number.len() == 3 && number.bytes().all(|b| b.is_ascii_digit()),
                "{}: names start with a 3-digit number",
                case.name
            );
            assert!(
                names.insert(number.to_owned()),
                "{}: number used twice (numbers are unique across versions)",
                case.name
            );
        }
    }

    #[test]
    fn each_call_gets_its_share_of_the_case_limit() {
        let limit = CaseLimit::default();
        assert_eq!(
            limit.timeout(),
            Duration::from_millis(DEFAULT_CASE_TIMEOUT_MS)
        );
        assert_eq!(limit.call_timeout(), Duration::from_nanos(111_111_111));
        assert!(limit.call_timeout() * DEADLINES_PER_CASE <= limit.timeout());
        assert_eq!(limit.guest_limits().call_timeout, limit.call_timeout());
        let shortest = CaseLimit::new(Duration::from_millis(MIN_CASE_TIMEOUT_MS));
        assert!(
            shortest.call_timeout() >= Duration::from_millis(5),
            "at least one clock tick per call"
        );
    }

    #[test]
    fn lines_say_how_each_case_ended_and_the_summary_counts_not_run_as_failed() {
        let outcome = |name: &str, verdict| CaseOutcome {
            name: name.into(),
            description: String::new(),
            verdict,
        };
        let report = Report {
            outcomes: vec![
                outcome("001-a", Verdict::Passed),
                outcome("002-b", Verdict::Failed("wrong key".into())),
                outcome(
                    "003-c",
                    Verdict::OutOfTime("ran past the case limit".into()),
                ),
                outcome("004-d", Verdict::NotRun),
            ],
            stopped: Some(EarlyStop {
                limit: Duration::from_millis(2000),
                not_run: 1,
            }),
        };
        let lines: Vec<String> = report.outcomes.iter().map(|o| o.to_string()).collect();
        assert_eq!(
            lines,
            [
                "ok   001-a",
                "FAIL 002-b: wrong key",
                "FAIL 003-c: ran past the case limit",
                "FAIL 004-d: not run"
            ]
        );
        assert_eq!(
            Progress::Stopped(report.stopped.as_ref().unwrap()).to_string(),
            "stopped: 3 cases in a row ran past the case limit of 2000 ms; the 1 case(s) left \
             are not run and count as failed"
        );
        assert_eq!(report.summary(), "conformance: 1 passed, 3 failed");
        assert!(!report.all_passed());
        assert!(!Report::default().all_passed(), "no case is no pass");
    }

    #[test]
    fn unreadable_case_is_a_failed_case() {
        let dir = std::env::temp_dir().join(format!("ksm-conformance-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("001-empty")).unwrap();
        std::fs::create_dir_all(dir.join("002-bad")).unwrap();
        std::fs::write(dir.join("002-bad").join(CASE_FILE), "description = 1").unwrap();
        std::fs::write(dir.join("README.md"), "not a case").unwrap();
        let cases = load_cases(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(cases.len(), 2);
        assert!(cases[0].spec.as_ref().unwrap_err().contains("cannot read"));
        assert!(cases[1].spec.as_ref().unwrap_err().contains("ill-formed"));
        assert!(load_cases(Path::new("/no/such/dir")).is_err());
    }

    #[test]
    fn written_built_in_cases_load_back_with_their_groups() {
        let dir =
            std::env::temp_dir().join(format!("ksm-conformance-write-{}", std::process::id()));
        let written = write_built_in_cases(&dir).unwrap();
        let loaded = load_cases(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let built_in = built_in_cases();
        assert!(written >= built_in.len());
        let summary = |cases: &[Case]| -> Vec<(String, Contract, bool)> {
            cases
                .iter()
                .map(|c| (c.name.clone(), c.needs, c.spec.is_ok()))
                .collect()
        };
        assert_eq!(summary(&loaded), summary(&built_in));
        assert!(built_in.iter().any(|c| c.needs == Contract::V1_1));
        assert!(built_in.iter().any(|c| c.needs == Contract::V1_0));
        // A file a case names reads the same from disk as built in.
        let with_file = built_in
            .iter()
            .find(|c| c.name.ends_with("098-bulk-binary-record-file"))
            .expect("the case with a record file is built in");
        assert!(!with_file.files.read("record.bin").unwrap().is_empty());
    }
}
