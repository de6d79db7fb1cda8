//! The commit thread: group commit of what the router staged, one sync per
//! group, then the acknowledgements and the hand-over to the sinks.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tokio::sync::mpsc::UnboundedSender;

use crate::activity::{Counters, Level};
use crate::module::Module;
use crate::pipeline::ack::Settlement;
use crate::pipeline::crash_guard::CrashGuard;
use crate::pipeline::inflight::Charge;
use crate::store::dead_letter::{DeadLetter, StagedFiles};
use crate::store::spool::SpoolRecord;
use crate::store::{Store, StoreError};

/// Most messages committed (and synced) together.
const MAX_GROUP: usize = 1024;
/// Most bytes (records and dead letters) committed together; a larger job
/// goes alone. It is also the most one spooled group holds, and a group's
/// data stays in memory until its last record is sent.
const MAX_GROUP_BYTES: usize = 4 * 1024 * 1024;

/// What one module keeps of one message.
#[derive(Debug, Default)]
pub struct Staged {
    /// Records to spool.
    pub records: Vec<SpoolRecord>,
    /// Refused data to keep.
    pub dead_letters: Vec<DeadLetter>,
}

impl Staged {
    /// Bytes of its records, which the spool counts.
    fn bytes(&self) -> u64 {
        self.records.iter().map(|r| r.size as u64).sum()
    }

    /// Bytes it writes to the store: records and dead letters.
    pub fn written_bytes(&self) -> u64 {
        let letters: usize = self.dead_letters.iter().map(DeadLetter::size).sum();
        self.bytes() + letters as u64
    }
}

/// One message's output for every module, committed together; the
/// settlement is settled once it is durable.
pub struct Job {
    /// Per module (in module order), what to keep; `None` for nothing.
    pub staged: Vec<Option<Staged>>,
    /// The message's acknowledgement.
    pub settlement: Settlement,
    /// What the message holds of the in-flight budget, given back once it
    /// is committed.
    pub charge: Charge,
}

impl Job {
    /// Bytes it writes to the store, over every module.
    fn written_bytes(&self) -> usize {
        let bytes: u64 = self
            .staged
            .iter()
            .flatten()
            .map(Staged::written_bytes)
            .sum();
        usize::try_from(bytes).unwrap_or(usize::MAX)
    }
}

/// A module as the committer sees it.
pub struct CommitTarget {
    /// The module.
    pub module: Arc<Module>,
    /// Where spooled records go to be sent.
    pub sink: UnboundedSender<Vec<SpoolRecord>>,
    /// The next spool sequence number.
    pub next_seq: u64,
    /// Whether its spool was found full (and the log said so).
    full: bool,
}

impl CommitTarget {
    /// A module's target: its records get sequence numbers from `next_seq`
    /// on and go to `sink` once committed.
    pub fn new(
        module: Arc<Module>,
        sink: UnboundedSender<Vec<SpoolRecord>>,
        next_seq: u64,
    ) -> Self {
        Self {
            module,
            sink,
            next_seq,
            full: false,
        }
    }
}

/// What the committer's input carries: jobs, and changes to its targets
/// at the place the router made them.
pub enum Work {
    /// One message's output.
    Job(Job),
    /// A change to the targets; `Done` is told once it is applied.
    Change(TargetChange, Done),
}

/// Told once a change is applied.
pub type Done = tokio::sync::oneshot::Sender<()>;

/// A change to the modules the committer writes for.
pub enum TargetChange {
    /// A new module, after the others.
    Add(CommitTarget),
    /// A module that gets no more jobs; dropping its sink's input lets the
    /// sink send what is left in the spool and end.
    Remove(Arc<Module>),
    /// A module's records go to a new sink from now on.
    Sink(Arc<Module>, UnboundedSender<Vec<SpoolRecord>>),
}

/// The commit thread: writes jobs to the store in groups, syncs once per
/// group, then releases the messages' acknowledgements and hands the records
/// to the sinks.
pub struct Committer {
    store: Store,
    targets: Vec<CommitTarget>,
    stopping: Arc<AtomicBool>,
    guard: Arc<CrashGuard>,
}

impl Committer {
    /// A committer over the modules' targets (in module order), telling
    /// `guard` which messages are out of flight. Setting `stopping` makes a
    /// committer that waits for room give up.
    pub fn new(
        store: Store,
        targets: Vec<CommitTarget>,
        stopping: Arc<AtomicBool>,
        guard: Arc<CrashGuard>,
    ) -> Self {
        Self {
            store,
            targets,
            stopping,
            guard,
        }
    }

    /// Commits jobs until the channel closes; a change ends a group and is
    /// applied before the jobs after it.
    pub fn run(mut self, input: std::sync::mpsc::Receiver<Work>) {
        let mut group = Vec::new();
        // Work that did not fit the last group starts the next one.
        let mut next: Option<Work> = None;
        while let Some(first) = next.take().or_else(|| input.recv().ok()) {
            let first = match first {
                Work::Job(job) => job,
                Work::Change(change, done) => {
                    self.change(change);
                    let _ = done.send(());
                    continue;
                }
            };
            let mut bytes = first.written_bytes();
            group.push(first);
            while group.len() < MAX_GROUP && bytes < MAX_GROUP_BYTES {
                let job = match input.try_recv() {
                    Ok(Work::Job(job)) => job,
                    Ok(change) => {
                        next = Some(change);
                        break;
                    }
                    Err(_) => break,
                };
                let more = job.written_bytes();
                if bytes + more > MAX_GROUP_BYTES {
                    next = Some(Work::Job(job));
                    break;
                }
                bytes += more;
                group.push(job);
            }
            self.commit_all(std::mem::take(&mut group));
        }
    }

    fn change(&mut self, change: TargetChange) {
        match change {
            TargetChange::Add(target) => self.targets.push(target),
            TargetChange::Remove(module) => self
                .targets
                .retain(|target| !Arc::ptr_eq(&target.module, &module)),
            TargetChange::Sink(module, sink) => {
                if let Some(target) = self
                    .targets
                    .iter_mut()
                    .find(|target| Arc::ptr_eq(&target.module, &module))
                {
                    target.sink = sink;
                }
            }
        }
    }

    /// Commits a group, splitting it where a spool is full and waiting for
    /// room there.
    fn commit_all(&mut self, group: Vec<Job>) {
        let mut ready: Vec<Job> = Vec::new();
        let mut pending = vec![0u64; self.targets.len()];
        for job in group {
            let fits = job.staged.iter().enumerate().all(|(i, staged)| {
                staged
                    .as_ref()
                    .is_none_or(|s| self.targets[i].module.spool.has_room(pending[i], s.bytes()))
            });
            if !fits {
                self.commit(std::mem::take(&mut ready));
                pending.iter_mut().for_each(|p| *p = 0);
                if !self.wait_for_room(&job) {
                    // Stopping: the message stays unacknowledged.
                    self.guard.end(1);
                    drop(job);
                    continue;
                }
            }
            for (i, staged) in job.staged.iter().enumerate() {
                if let Some(staged) = staged {
                    pending[i] += staged.bytes();
                }
            }
            ready.push(job);
        }
        self.commit(ready);
    }

    fn wait_for_room(&mut self, job: &Job) -> bool {
        for (i, staged) in job.staged.iter().enumerate() {
            let Some(staged) = staged else { continue };
            let target = &mut self.targets[i];
            let spool = &target.module.spool;
            if spool.has_room(0, staged.bytes()) {
                continue;
            }
            if !target.full {
                target.full = true;
                let (records, bytes) = spool.len();
                target.module.log.write(
                    Level::Warn,
                    format!(
                        "spool full ({records} records, {bytes} of {} bytes) while Kinesis does \
                         not take records fast enough: new messages are not acknowledged, so the \
                         broker holds them back, until records are accepted",
                        spool.max_bytes()
                    ),
                );
            }
            if !spool.wait_for_room(0, staged.bytes(), &self.stopping) {
                return false;
            }
        }
        for (i, target) in self.targets.iter_mut().enumerate() {
            if target.full && job.staged[i].is_some() {
                target.full = false;
                target
                    .module
                    .log
                    .write(Level::Info, "spool has room again: acknowledging messages");
            }
        }
        true
    }

    /// Writes the jobs in one batch, syncs, then settles and hands over.
    fn commit(&mut self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let mut batch = self.store.batch();
        let mut spooled: Vec<Vec<SpoolRecord>> = vec![Vec::new(); self.targets.len()];
        let mut dead_letters = vec![0u64; self.targets.len()];
        let mut settlements = Vec::with_capacity(jobs.len());
        // Given back once the group is committed (or has failed).
        let mut charges = Vec::with_capacity(jobs.len());
        let jobs_in_group = jobs.len();
        // Dead letters' data files, kept once the batch naming them is committed.
        let mut files = Vec::new();
        let mut staging: Result<(), StoreError> = Ok(());
        for job in jobs {
            for (i, staged) in job.staged.into_iter().enumerate() {
                let Some(staged) = staged else { continue };
                let target = &mut self.targets[i];
                for mut record in staged.records {
                    record.seq = target.next_seq;
                    target.next_seq += 1;
                    spooled[i].push(record);
                }
                dead_letters[i] += staged.dead_letters.len() as u64;
                if staging.is_ok() {
                    match target
                        .module
                        .dead_letters
                        .stage(&mut batch, staged.dead_letters)
                    {
                        Ok(written) => files.push(written),
                        Err(error) => staging = Err(error),
                    }
                }
            }
            settlements.push(job.settlement);
            charges.push(job.charge);
        }
        // One group per module; counted before it is visible to the sink.
        let mut added = vec![0u64; self.targets.len()];
        for (i, records) in spooled.iter().enumerate() {
            if !records.is_empty() {
                let spool = &self.targets[i].module.spool;
                added[i] = spool.insert_group(&mut batch, records);
                spool.added(records.len() as u64, added[i]);
            }
        }
        // A dead letter's data file that cannot be written fails the group;
        // the files of a group that is not committed are removed (dropped).
        let result = staging.and_then(|()| {
            batch.commit()?;
            files.into_iter().for_each(StagedFiles::committed);
            self.store.sync()
        });
        if let Err(error) = result {
            for target in &self.targets {
                target.module.log.write_limited(
                    "store",
                    Level::Error,
                    format!("cannot write to the store, messages stay unacknowledged: {error}"),
                );
            }
            // Dropping the settlements keeps the messages unacknowledged; the
            // records that were not written are dropped from memory only.
            for (i, records) in spooled.iter().enumerate() {
                let spool = &self.targets[i].module.spool;
                spool.removed(records.len() as u64, added[i]);
            }
            self.guard.end(jobs_in_group);
            return;
        }
        for (i, records) in spooled.into_iter().enumerate() {
            let target = &self.targets[i];
            let counters = &target.module.counters;
            Counters::add(&counters.dead_lettered, dead_letters[i]);
            if records.is_empty() {
                continue;
            }
            Counters::add(&counters.spooled, records.len() as u64);
            // A closed sink (shutdown) leaves the records in the spool.
            let _ = target.sink.send(records);
        }
        for settlement in settlements {
            settlement.settle();
        }
        self.guard.end(jobs_in_group);
    }
}
