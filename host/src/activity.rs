//! Per-module activity: counters and the activity log that users read to
//! find out what happened to their data (the "LOGS" of a smart module).

use std::collections::VecDeque;
use std::collections::hash_map::{Entry, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::clock;

/// Entries kept per module; older ones are dropped first.
const LOG_CAPACITY: usize = 2_000;
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
    /// Messages or records refused and kept as dead letters.
    pub rejected: AtomicU64,
    /// Records sent again after a failure.
    pub retried: AtomicU64,
    /// Records Kinesis throttled.
    pub throttled: AtomicU64,
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
    /// Messages or records refused and kept as dead letters.
    pub rejected: u64,
    /// Records sent again after a failure.
    pub retried: u64,
    /// Records Kinesis throttled.
    pub throttled: u64,
}

impl Counters {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads all counters.
    pub fn snapshot(&self) -> CounterSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            received: get(&self.received),
            filtered: get(&self.filtered),
            forwarded: get(&self.forwarded),
            rejected: get(&self.rejected),
            retried: get(&self.retried),
            throttled: get(&self.throttled),
        }
    }
}

/// A module's activity log: a bounded ring of entries, mirrored to tracing.
#[derive(Debug)]
pub struct ActivityLog {
    module_id: String,
    entries: Mutex<VecDeque<LogEntry>>,
    repeats: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl ActivityLog {
    /// An empty log for a module.
    pub fn new(module_id: &str) -> Self {
        Self {
            module_id: module_id.to_owned(),
            entries: Mutex::new(VecDeque::new()),
            repeats: Mutex::new(HashMap::new()),
        }
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
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() == LOG_CAPACITY {
            entries.pop_front();
        }
        entries.push_back(entry);
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
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
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
        for i in 0..LOG_CAPACITY + 5 {
            log.write(Level::Info, format!("{i}"));
        }
        let entries = log.entries(Level::Info);
        assert_eq!(entries.len(), LOG_CAPACITY);
        assert_eq!(entries[0].message, "5");
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
