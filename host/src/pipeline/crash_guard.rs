//! The crash-loop guard: defence in depth against a message that makes the
//! host itself die (a bug, a resource it cannot get). Such a message is
//! never acknowledged, so the broker delivers it again after every restart,
//! and every module would stay down.
//!
//! The guard keeps, in `{storage.dir}/in-flight`, the fingerprints of the
//! messages between the router and the store. A clean stop empties it; after
//! an abnormal exit, the next start finds what was in flight then: those
//! messages become suspects (kept in `{storage.dir}/suspects`) and are
//! handled alone, one at a time, so that a further exit is pinned on one
//! message. A message that was alone in flight at two consecutive abnormal
//! exits is kept as a dead letter on the next start without being run.
//!
//! Being alone is what tells a message that kills ksm from one that was
//! merely in flight when a supervisor or the OOM killer stopped it: a
//! process killed from outside under load has many messages in flight, and
//! each of them is then handled alone, for a moment each, so it takes two
//! kills landing in those moments to condemn one.
//!
//! Messages leave flight in the order they entered it (the router hands
//! them to the committer in order, and it commits in order), so the file is
//! a ring of the fingerprints that entered, each with its sequence number,
//! and a watermark: how many have left. The router writes the new entries
//! of each batch it takes, the committer the new watermark after each group:
//! one small write each, whatever is in flight (no fsync: what counts is
//! surviving the process, not a power loss).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

/// Abnormal exits with a message alone in flight after which it is
/// dead-lettered without being run.
pub const STRIKES_TO_DEAD_LETTER: u32 = 2;
/// Entries in the in-flight ring: more than can ever be in flight (the
/// inbox, a router batch, the committer's queue and group together).
const RING_SLOTS: u64 = 1 << 16;
/// Bytes of one ring entry: sequence number and fingerprint.
const SLOT_BYTES: u64 = 16;

/// A message's fingerprint: xxh3 of its topic and payload.
pub type Fingerprint = u64;

/// The fingerprint of a message.
pub fn fingerprint(topic: &str, payload: &[u8]) -> Fingerprint {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(topic.as_bytes());
    hasher.update(&[0xff]);
    hasher.update(payload);
    hasher.digest()
}

/// Why the guard could not set up its files.
#[derive(Debug, thiserror::Error)]
#[error("crash-loop guard: cannot use {path}: {source}")]
pub struct GuardError {
    path: PathBuf,
    source: std::io::Error,
}

/// What a message is to the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Not in flight at the last abnormal exit: handled with the others.
    Clean,
    /// In flight at the last abnormal exit: handled alone.
    Suspect,
    /// Alone in flight at the last two abnormal exits: dead-lettered unrun.
    Condemned,
}

/// Sequence numbers of what entered and left flight.
#[derive(Debug, Default)]
struct Flight {
    /// Messages that entered flight so far.
    entered: u64,
    /// Messages that left it so far.
    left: u64,
}

/// The guard of one host.
#[derive(Debug)]
pub struct CrashGuard {
    file: File,
    suspects: HashMap<Fingerprint, u32>,
    flight: Mutex<Flight>,
    idle: Condvar,
}

impl CrashGuard {
    /// Opens the guard in `dir`: reads what was in flight at the last exit,
    /// updates the strikes, and starts with nothing in flight. Also returns
    /// how many messages were in flight at an abnormal exit, for the log.
    pub fn open(dir: &Path) -> Result<(Self, usize), GuardError> {
        let in_flight_path = dir.join("in-flight");
        let suspects_path = dir.join("suspects");
        let error = |path: &Path| {
            let path = path.to_owned();
            move |source| GuardError { path, source }
        };
        let at_exit = read_in_flight(&in_flight_path).map_err(error(&in_flight_path))?;
        let before = read_strikes(&suspects_path).map_err(error(&suspects_path))?;
        // A strike when a message was alone in flight at the exit; only
        // consecutive exits count, so what was not in flight is forgotten.
        let strike = u32::from(at_exit.len() == 1);
        let suspects: HashMap<Fingerprint, u32> = at_exit
            .iter()
            .map(|print| (*print, before.get(print).copied().unwrap_or(0) + strike))
            .collect();
        if suspects != before {
            write_strikes(&suspects_path, &suspects).map_err(error(&suspects_path))?;
        }
        // A fresh ring: the old entries are behind the new watermark.
        let file = File::create(&in_flight_path).map_err(error(&in_flight_path))?;
        let guard = Self {
            file,
            suspects,
            flight: Mutex::new(Flight::default()),
            idle: Condvar::new(),
        };
        guard.write_watermark(0);
        Ok((guard, at_exit.len()))
    }

    /// What a message with this fingerprint is to the guard.
    pub fn standing(&self, print: Fingerprint) -> Standing {
        match self.suspects.get(&print) {
            None => Standing::Clean,
            Some(&strikes) if strikes >= STRIKES_TO_DEAD_LETTER => Standing::Condemned,
            Some(_) => Standing::Suspect,
        }
    }

    /// Records messages as in flight, before they are handled, in the order
    /// they will leave it.
    pub fn begin(&self, prints: &[Fingerprint]) {
        if prints.is_empty() {
            return;
        }
        let mut flight = self.lock();
        let first = flight.entered;
        flight.entered += prints.len() as u64;
        let mut bytes = Vec::with_capacity(prints.len() * SLOT_BYTES as usize);
        for (seq, print) in (first + 1..).zip(prints) {
            if seq % RING_SLOTS == 0 && !bytes.is_empty() {
                // The ring wraps: write what precedes the wrap first.
                self.write_slots(seq - bytes.len() as u64 / SLOT_BYTES, &bytes);
                bytes.clear();
            }
            bytes.extend_from_slice(&seq.to_le_bytes());
            bytes.extend_from_slice(&print.to_le_bytes());
        }
        let start = flight.entered + 1 - bytes.len() as u64 / SLOT_BYTES;
        self.write_slots(start, &bytes);
    }

    /// Records the next `count` messages as out of flight: committed, or
    /// given up.
    pub fn end(&self, count: usize) {
        if count == 0 {
            return;
        }
        let mut flight = self.lock();
        flight.left = (flight.left + count as u64).min(flight.entered);
        self.write_watermark(flight.left);
        if flight.left == flight.entered {
            self.idle.notify_all();
        }
    }

    /// Waits until nothing is in flight, or `give_up` turns true.
    pub fn wait_idle(&self, give_up: &impl Fn() -> bool) {
        let mut flight = self.lock();
        while flight.left < flight.entered && !give_up() {
            flight = self
                .idle
                .wait_timeout(flight, std::time::Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Marks a clean stop: nothing is in flight.
    pub fn stopped_cleanly(&self) {
        let mut flight = self.lock();
        flight.left = flight.entered;
        self.write_watermark(flight.left);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Flight> {
        self.flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes ring entries from sequence number `first` on (no wrap inside).
    fn write_slots(&self, first: u64, bytes: &[u8]) {
        let offset = 8 + (first % RING_SLOTS) * SLOT_BYTES;
        if let Err(error) = self.file.write_all_at(bytes, offset) {
            tracing::warn!("crash-loop guard: cannot record the messages in flight: {error}");
        }
    }

    fn write_watermark(&self, left: u64) {
        if let Err(error) = self.file.write_all_at(&left.to_le_bytes(), 0) {
            tracing::warn!("crash-loop guard: cannot record the messages in flight: {error}");
        }
    }
}

/// The fingerprints in flight when the file was last written: the ring's
/// entries past the watermark.
fn read_in_flight(path: &Path) -> std::io::Result<HashSet<Fingerprint>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(error) => return Err(error),
    };
    let Some((watermark, ring)) = bytes.split_at_checked(8) else {
        return Ok(HashSet::new());
    };
    let left = u64::from_le_bytes(watermark.try_into().expect("8 bytes"));
    Ok(ring
        .chunks_exact(SLOT_BYTES as usize)
        .filter_map(|slot| {
            let seq = u64::from_le_bytes(slot[..8].try_into().expect("8 bytes"));
            let print = u64::from_le_bytes(slot[8..].try_into().expect("8 bytes"));
            (seq > left).then_some(print)
        })
        .collect())
}

fn read_strikes(path: &Path) -> std::io::Result<HashMap<Fingerprint, u32>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(error) => return Err(error),
    };
    Ok(bytes
        .chunks_exact(12)
        .map(|entry| {
            let print = u64::from_le_bytes(entry[..8].try_into().expect("8 bytes"));
            let strikes = u32::from_le_bytes(entry[8..].try_into().expect("4 bytes"));
            (print, strikes)
        })
        .collect())
}

/// Writes the strikes durably (they must outlive the next crash too).
fn write_strikes(path: &Path, strikes: &HashMap<Fingerprint, u32>) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(strikes.len() * 12);
    for (print, count) in strikes {
        bytes.extend_from_slice(&print.to_le_bytes());
        bytes.extend_from_slice(&count.to_le_bytes());
    }
    let aside = path.with_extension("new");
    let mut file = File::create(&aside)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    std::fs::rename(&aside, path)
}

/// Test-only fault (debug builds): aborts the process when a payload holds
/// the bytes of the environment variable `KSM_TEST_ABORT_ON`, as a host bug
/// triggered by one message would.
#[cfg(debug_assertions)]
pub fn abort_if_marked(payload: &[u8]) {
    static MARK: std::sync::OnceLock<Option<Vec<u8>>> = std::sync::OnceLock::new();
    let mark =
        MARK.get_or_init(|| std::env::var_os("KSM_TEST_ABORT_ON").map(|m| m.into_encoded_bytes()));
    if let Some(mark) = mark
        && !mark.is_empty()
        && payload
            .windows(mark.len())
            .any(|window| window == mark.as_slice())
    {
        eprintln!("ksm: KSM_TEST_ABORT_ON matched a payload: aborting (test fault)");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ksm-guard-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_message_alone_in_flight_at_two_consecutive_abnormal_exits_is_condemned() {
        let dir = dir("two");
        let bad = fingerprint("/devices/1/event", b"boom");
        let good = fingerprint("/devices/1/event", b"fine");
        assert_ne!(bad, good);

        let (guard, in_flight) = CrashGuard::open(&dir).unwrap();
        assert_eq!(in_flight, 0);
        guard.begin(&[good, bad]);
        drop(guard); // an abnormal exit: nothing marked it clean

        let (guard, in_flight) = CrashGuard::open(&dir).unwrap();
        assert_eq!(in_flight, 2);
        assert_eq!(guard.standing(bad), Standing::Suspect);
        assert_eq!(guard.standing(good), Standing::Suspect);
        // Handled alone: the good one is committed, then the bad one kills us.
        guard.begin(&[good]);
        guard.end(1);
        guard.begin(&[bad]);
        drop(guard);

        let (guard, in_flight) = CrashGuard::open(&dir).unwrap();
        assert_eq!(in_flight, 1);
        assert_eq!(guard.standing(bad), Standing::Suspect, "one exit alone");
        assert_eq!(guard.standing(good), Standing::Clean, "not in flight");
        guard.begin(&[bad]);
        drop(guard);

        let (guard, _) = CrashGuard::open(&dir).unwrap();
        assert_eq!(guard.standing(bad), Standing::Condemned, "two exits alone");
        guard.stopped_cleanly();
        drop(guard);

        let (guard, in_flight) = CrashGuard::open(&dir).unwrap();
        assert_eq!(in_flight, 0);
        assert_eq!(guard.standing(bad), Standing::Clean, "a clean stop forgets");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_ring_keeps_what_is_in_flight_across_its_wrap() {
        let dir = dir("ring");
        let (guard, _) = CrashGuard::open(&dir).unwrap();
        let count = RING_SLOTS as usize + 10;
        let prints: Vec<Fingerprint> = (0..count as u64).collect();
        for chunk in prints.chunks(1000) {
            guard.begin(chunk);
        }
        guard.end(count - 3);
        drop(guard);
        let left = read_in_flight(&dir.join("in-flight")).unwrap();
        let expected: HashSet<Fingerprint> = prints[count - 3..].iter().copied().collect();
        assert_eq!(left, expected);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kills_with_many_messages_in_flight_condemn_none() {
        let dir = dir("kills");
        let prints: Vec<Fingerprint> = (0..100u8).map(|n| fingerprint("/t", &[n])).collect();
        for _ in 0..5 {
            let (guard, _) = CrashGuard::open(&dir).unwrap();
            assert!(
                prints
                    .iter()
                    .all(|p| guard.standing(*p) != Standing::Condemned)
            );
            guard.begin(&prints);
            drop(guard);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn waiting_for_idle_ends_when_the_last_message_is_out_of_flight() {
        let dir = dir("idle");
        let (guard, _) = CrashGuard::open(&dir).unwrap();
        let guard = std::sync::Arc::new(guard);
        guard.begin(&[1, 1, 2]);
        let ender = {
            let guard = guard.clone();
            std::thread::spawn(move || {
                guard.end(1);
                guard.end(2);
            })
        };
        guard.wait_idle(&|| false);
        ender.join().unwrap();
        let flight = guard.lock();
        assert_eq!(flight.left, flight.entered);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
