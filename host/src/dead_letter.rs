//! Dead letters: input ksm refused, kept on disk with the reason, so nothing
//! acknowledged is ever silently dropped.
//!
//! Each module appends to `{storage.dir}/{module}/dead-letters.jsonl`, one
//! JSON object per line, and syncs the file before the MQTT message that
//! carried the data is acknowledged.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use crate::clock;

/// One refused message or record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// When it was refused, RFC 3339 UTC.
    pub time: String,
    /// Why, for people.
    pub reason: String,
    /// MQTT topic the data arrived on.
    pub topic: String,
    /// For a single bulk record: its position in the payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_index: Option<u32>,
    /// The refused bytes (the whole payload, or the one record), base64.
    pub data_base64: String,
}

impl DeadLetter {
    /// A dead letter stamped now.
    pub fn new(
        reason: impl Into<String>,
        topic: &str,
        record_index: Option<u32>,
        data: &[u8],
    ) -> Self {
        Self {
            time: clock::now_rfc3339(),
            reason: reason.into(),
            topic: topic.to_owned(),
            record_index,
            data_base64: BASE64.encode(data),
        }
    }

    /// The refused bytes.
    pub fn data(&self) -> Result<Vec<u8>, base64::DecodeError> {
        BASE64.decode(&self.data_base64)
    }
}

/// Why a dead letter could not be stored or read.
#[derive(Debug, thiserror::Error)]
#[error("dead-letter store {path}: {source}")]
pub struct DeadLetterError {
    path: PathBuf,
    source: std::io::Error,
}

/// One module's dead-letter file.
#[derive(Debug)]
pub struct DeadLetterStore {
    path: PathBuf,
    file: Mutex<File>,
}

impl DeadLetterStore {
    /// Opens (or creates) the store of a module under `dir`.
    pub fn open(dir: &Path, module_id: &str) -> Result<Self, DeadLetterError> {
        let module_dir = dir.join(module_id);
        let path = module_dir.join("dead-letters.jsonl");
        let error = |source| DeadLetterError {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&module_dir).map_err(error)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(error)?;
        Ok(Self {
            path,
            file: Mutex::new(file),
        })
    }

    /// Appends dead letters and syncs them to disk.
    pub fn append(&self, letters: &[DeadLetter]) -> Result<(), DeadLetterError> {
        let mut lines = Vec::new();
        for letter in letters {
            serde_json::to_writer(&mut lines, letter).map_err(|e| self.error(e.into()))?;
            lines.push(b'\n');
        }
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.write_all(&lines).map_err(|e| self.error(e))?;
        file.sync_data().map_err(|e| self.error(e))
    }

    /// Every dead letter, oldest first.
    pub fn list(&self) -> Result<Vec<DeadLetter>, DeadLetterError> {
        let _writer = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let file = File::open(&self.path).map_err(|e| self.error(e))?;
        let mut letters = Vec::new();
        for line in BufReader::new(file).lines() {
            let line = line.map_err(|e| self.error(e))?;
            if line.trim().is_empty() {
                continue;
            }
            let letter = serde_json::from_str(&line).map_err(|e| self.error(e.into()))?;
            letters.push(letter);
        }
        Ok(letters)
    }

    fn error(&self, source: std::io::Error) -> DeadLetterError {
        DeadLetterError {
            path: self.path.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_survive_reopening() {
        let dir = std::env::temp_dir().join(format!("ksm-dl-{}", std::process::id()));
        let store = DeadLetterStore::open(&dir, "mod-a").unwrap();
        store
            .append(&[
                DeadLetter::new("bad version", "/devices/1/bulkData/x", None, b"\x01\x02"),
                DeadLetter::new("too large", "/devices/1/bulkData/x", Some(3), b"abc"),
            ])
            .unwrap();
        drop(store);
        let store = DeadLetterStore::open(&dir, "mod-a").unwrap();
        let letters = store.list().unwrap();
        assert_eq!(letters.len(), 2);
        assert_eq!(letters[0].reason, "bad version");
        assert_eq!(letters[0].data().unwrap(), b"\x01\x02");
        assert_eq!(letters[1].record_index, Some(3));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
