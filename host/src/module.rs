//! A running smart module: its settings, activity and dead letters, shared by
//! the router, its Kinesis sink and the admin API.

use crate::activity::{ActivityLog, Counters, Level};
use crate::config::ModuleConfig;
use crate::dead_letter::{DeadLetter, DeadLetterError, DeadLetterStore};

/// Everything ksm knows about one module while it runs.
#[derive(Debug)]
pub struct Module {
    /// The module's configuration.
    pub config: ModuleConfig,
    /// Counters since start.
    pub counters: Counters,
    /// The activity log.
    pub log: ActivityLog,
    /// Refused input.
    pub dead_letters: DeadLetterStore,
}

impl Module {
    /// Sets up a module, opening its dead-letter store under `storage_dir`.
    pub fn open(
        config: ModuleConfig,
        storage_dir: &std::path::Path,
    ) -> Result<Self, DeadLetterError> {
        let dead_letters = DeadLetterStore::open(storage_dir, &config.id)?;
        Ok(Self {
            log: ActivityLog::new(&config.id),
            counters: Counters::default(),
            dead_letters,
            config,
        })
    }

    /// Keeps refused data with its reason, counts it and writes an ERROR
    /// entry. Returns `false` if the data could not be stored: then the
    /// message must not be acknowledged.
    pub fn reject(&self, letters: &[DeadLetter]) -> bool {
        for letter in letters {
            let what = match letter.record_index {
                Some(index) => format!("record {index} of the message on `{}`", letter.topic),
                None => format!("message on `{}`", letter.topic),
            };
            self.log.write(
                Level::Error,
                format!(
                    "{what} refused and kept as a dead letter: {}",
                    letter.reason
                ),
            );
        }
        match self.dead_letters.append(letters) {
            Ok(()) => {
                Counters::add(&self.counters.rejected, letters.len() as u64);
                true
            }
            Err(e) => {
                self.log.write(
                    Level::Error,
                    format!("cannot keep refused data, the message stays unacknowledged: {e}"),
                );
                false
            }
        }
    }
}
