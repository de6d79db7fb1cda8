//! Per-module activity: counters and the activity log that users read to
//! find out what happened to their data (the "LOGS" of a smart module).
//!
//! The log is kept in the store, so it survives restarts; the newest
//! [`LOG_RETENTION`] entries of each module are kept.

use std::collections::VecDeque;
use std::collections::hash_map::{Entry, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fjall::Keyspace;
use serde::{Deserialize, Serialize};

use crate::clock;
use crate::store::{self, StoreError};

/// Entries kept per module, in memory and on disk; older ones are dropped first.
pub const LOG_RETENTION: usize = 10_000;
/// A repeated message (same key) is written at most once per this interval;
/// the next entry says how many were folded into it.
const REPEAT_INTERVAL: Duration = Duration::from_secs(10);

/// Severity of a log entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Level {
    /// Normal activity.
    Info,
    /// Something unusual that ksm handled.
    Warn,
    /// Something the user must look at: data was refused or cannot be delivered.
    Error,
}

impl std::str::FromStr for Level {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "info" => Ok(Level::Info),
            "warn" | "warning" => Ok(Level::Warn),
            "error" => Ok(Level::Error),
            other => Err(format!("unknown level `{other}`: use info, warn or error")),
        }
    }
}

/// One activity log entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogEntry {
    /// When it happened, RFC 3339 UTC.
    pub time: String,
    /// Severity.
    pub level: Level,
    /// What happened and, for errors, what to do.
    pub message: String,
}

/// Counters of one module since start.
#[derive(Debug, Default)]
pub struct Counters {
    /// MQTT messages handed to the module.
    pub received: AtomicU64,
    /// Messages the module is not subscribed to.
    pub filtered: AtomicU64,
    /// Records Kinesis accepted.
    pub forwarded: AtomicU64,
    /// Kinesis records Kinesis accepted: as `forwarded` without
    /// aggregation; with it, an aggregate counts once.
    pub kinesis_records: AtomicU64,
    /// Messages or records refused and kept as dead letters.
    pub dead_lettered: AtomicU64,
    /// Records written to the spool.
    pub spooled: AtomicU64,
    /// Records sent again after a failure.
    pub retried: AtomicU64,
    /// Records Kinesis throttled.
    pub throttled: AtomicU64,
    /// Records that landed after a later record of their key (`ordering = "key"`).
    pub reordered: AtomicU64,
}

/// A copy of the counters, for the admin API.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// MQTT messages handed to the module.
    pub received: u64,
    /// Messages the module is not subscribed to.
    pub filtered: u64,
    /// Records Kinesis accepted.
    pub forwarded: u64,
    /// Kinesis records Kinesis accepted (an aggregate counts once).
    #[serde(default)]
    pub kinesis_records: u64,
    /// Messages or records refused and kept as dead letters.
    pub dead_lettered: u64,
    /// Records written to the spool.
    pub spooled: u64,
    /// Records sent again after a failure.
    pub retried: u64,
    /// Records Kinesis throttled.
    pub throttled: u64,
    /// Records that landed after a later record of their key (`ordering = "key"`).
    #[serde(default)]
    pub reordered: u64,
    /// Records in the spool now, waiting for Kinesis.
    pub spool_records: u64,
    /// Bytes in the spool now (data plus partition keys).
    pub spool_bytes: u64,
}

impl Counters {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads all counters, with the spool's current size.
    pub fn snapshot(&self, spool: (u64, u64)) -> CounterSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            received: get(&self.received),
            filtered: get(&self.filtered),
            forwarded: get(&self.forwarded),
            kinesis_records: get(&self.kinesis_records),
            dead_lettered: get(&self.dead_lettered),
            spooled: get(&self.spooled),
            retried: get(&self.retried),
            throttled: get(&self.throttled),
            reordered: get(&self.reordered),
            spool_records: spool.0,
            spool_bytes: spool.1,
        }
    }
}

/// A module's activity log: a bounded ring of entries, mirrored to tracing
/// and, when opened on a keyspace, to disk.
#[derive(Debug)]
pub struct ActivityLog {
    module_id: String,
    entries: Mutex<Ring>,
    repeats: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

#[derive(Default)]
struct Ring {
    entries: VecDeque<LogEntry>,
    disk: Option<Keyspace>,
    next_seq: u64,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").finish_non_exhaustive()
    }
}

impl ActivityLog {
    /// An empty log for a module, in memory only.
    pub fn new(module_id: &str) -> Self {
        Self {
            module_id: module_id.to_owned(),
            entries: Mutex::new(Ring::default()),
            repeats: Mutex::new(HashMap::new()),
        }
    }

    /// A module's log kept in `keyspace`, with the entries kept there.
    pub fn open(module_id: &str, keyspace: Keyspace) -> Result<Self, StoreError> {
        let next_seq = store::next_seq(&keyspace)?;
        let first = next_seq.saturating_sub(LOG_RETENTION as u64);
        let mut entries = VecDeque::new();
        for guard in keyspace.range(store::key(first)..) {
            let value = guard.value()?;
            if let Ok(entry) = serde_json::from_slice(&value) {
                entries.push_back(entry);
            }
        }
        let log = Self::new(module_id);
        *log.entries.lock().unwrap_or_else(|e| e.into_inner()) = Ring {
            entries,
            disk: Some(keyspace),
            next_seq,
        };
        Ok(log)
    }

    /// Appends an entry.
    pub fn write(&self, level: Level, message: impl Into<String>) {
        let message = message.into();
        match level {
            Level::Info => tracing::info!(module = %self.module_id, "{message}"),
            Level::Warn => tracing::warn!(module = %self.module_id, "{message}"),
            Level::Error => tracing::error!(module = %self.module_id, "{message}"),
        }
        let entry = LogEntry {
            time: clock::now_rfc3339(),
            level,
            message,
        };
        let mut ring = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(disk) = &ring.disk {
            let seq = ring.next_seq;
            let value = serde_json::to_vec(&entry).expect("a log entry serializes");
            // A log that cannot be written to disk still works in memory.
            let _ = disk.insert(store::key(seq), value);
            if let Some(old) = seq.checked_sub(LOG_RETENTION as u64) {
                let _ = disk.remove(store::key(old));
            }
            ring.next_seq += 1;
        }
        if ring.entries.len() == LOG_RETENTION {
            ring.entries.pop_front();
        }
        ring.entries.push_back(entry);
    }

    /// Appends an entry unless one with the same `key` was written in the
    /// last few seconds; then it is counted and the next one mentions it.
    pub fn write_limited(&self, key: &'static str, level: Level, message: impl Into<String>) {
        let folded = {
            let mut repeats = self.repeats.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            match repeats.entry(key) {
                Entry::Occupied(mut seen) => {
                    let (last, count) = seen.get_mut();
                    if now.duration_since(*last) < REPEAT_INTERVAL {
                        *count += 1;
                        return;
                    }
                    let folded = *count;
                    *last = now;
                    *count = 0;
                    folded
                }
                Entry::Vacant(slot) => {
                    slot.insert((now, 0));
                    0
                }
            }
        };
        let message = message.into();
        if folded > 0 {
            self.write(
                level,
                format!("{message} ({folded} similar entries folded since the last one)"),
            );
        } else {
            self.write(level, message);
        }
    }

    /// Entries at or above `level`, oldest first.
    pub fn entries(&self, level: Level) -> Vec<LogEntry> {
        let ring = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        ring.entries
            .iter()
            .filter(|e| e.level >= level)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_filter_by_level() {
        let log = ActivityLog::new("abc");
        log.write(Level::Info, "one");
        log.write(Level::Error, "two");
        log.write(Level::Warn, "three");
        let errors: Vec<_> = log
            .entries(Level::Error)
            .into_iter()
            .map(|e| e.message)
            .collect();
        assert_eq!(errors, ["two"]);
        assert_eq!(log.entries(Level::Warn).len(), 2);
        assert_eq!(log.entries(Level::Info).len(), 3);
    }

    #[test]
    fn the_log_is_bounded() {
        let log = ActivityLog::new("abc");
        for i in 0..LOG_RETENTION + 5 {
            log.write(Level::Info, format!("{i}"));
        }
        let entries = log.entries(Level::Info);
        assert_eq!(entries.len(), LOG_RETENTION);
        assert_eq!(entries[0].message, "5");
    }

    #[test]
    fn the_log_survives_reopening_within_its_retention() {
        let dir = std::env::temp_dir().join(format!("ksm-log-{}", std::process::id()));
        let store = crate::store::Store::open(&dir).unwrap();
        let log = ActivityLog::open("abc", store.keyspace("abc", "log").unwrap()).unwrap();
        for i in 0..LOG_RETENTION + 3 {
            log.write(Level::Info, format!("{i}"));
        }
        drop(log);
        let keyspace = store.keyspace("abc", "log").unwrap();
        assert_eq!(
            keyspace.len().unwrap(),
            LOG_RETENTION,
            "old entries are removed from disk"
        );
        let log = ActivityLog::open("abc", keyspace).unwrap();
        let entries = log.entries(Level::Info);
        assert_eq!(entries.len(), LOG_RETENTION);
        assert_eq!(entries[0].message, "3");
        log.write(Level::Error, "after restart");
        assert_eq!(log.entries(Level::Error)[0].message, "after restart");
        drop(log);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn repeated_entries_are_folded() {
        let log = ActivityLog::new("abc");
        for _ in 0..5 {
            log.write_limited("throttle", Level::Error, "throttled");
        }
        assert_eq!(log.entries(Level::Info).len(), 1);
    }

    #[test]
    fn levels_parse() {
        assert_eq!("ERROR".parse::<Level>().unwrap(), Level::Error);
        assert_eq!("warning".parse::<Level>().unwrap(), Level::Warn);
        assert!("loud".parse::<Level>().is_err());
    }
}
