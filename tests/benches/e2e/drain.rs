//! The `drain` case: ksm restarted on a spool that holds a backlog, as after an outage.
//!
//! For each `--drain-records` size, ksm first runs with its Kinesis endpoint down (a port
//! nothing listens on: ksm retries for as long as its spool holds the records), takes the
//! records as bulk payloads of 1000 × 200 B (the size rounded up to whole payloads), spools
//! them, and is stopped with SIGTERM. Then a blackhole starts on that port, with the round
//! trip, and ksm starts again on the same store. The run goes from that start until the spool
//! is empty; it has no latency (the records' age is the time the fill took).
//!
//! The payloads come from `--devices` devices in turn, so the spool holds runs of 1000 records
//! of one partition key, from at most as many devices as there are payloads (the report says
//! how many): with `kinesis.ordering = "strict"` a backlog of few keys would drain at about
//! (keys in view) ÷ (round trip); with the default `"key"` a key's records share requests.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use ksm_tests::free_port;

use crate::load::{Load, Pace, Progress, Shape};
use crate::{Case, DRAIN_TIMEOUT, POLL, Report, Rig, Run, START_TIMEOUT, busiest_threads, procfs};

/// How long ksm may take to exit after SIGTERM (it gives its sinks 5 s to send).
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Spooled records per extra second a restarted ksm may take to be ready (it counts its
/// spool's index when it starts).
const SPOOLED_RECORDS_PER_START_SECOND: u64 = 50_000;

/// How one drain went.
struct Drain {
    records: u64,
    /// The devices the records came from: their partition keys.
    devices: u64,
    /// From starting ksm until its spool was empty.
    seconds: f64,
    /// Each time another tenth of the spool (or more, between two polls) had been forwarded:
    /// seconds since ksm was started, and the records forwarded by then.
    marks: Vec<(f64, u64)>,
}

impl Drain {
    fn records_per_sec(&self) -> f64 {
        self.records as f64 / self.seconds
    }

    /// A line for the report: the total and the rate by tenth of the spool.
    fn describe(&self) -> String {
        let mut previous = (0.0, 0);
        let tenths: Vec<String> = self
            .marks
            .iter()
            .map(|&(seconds, forwarded)| {
                let rate = (forwarded - previous.1) as f64 / (seconds - previous.0);
                previous = (seconds, forwarded);
                format!("{} %: {rate:.0}", forwarded * 100 / self.records)
            })
            .collect();
        format!(
            "{} of {} records from {} devices: the spool was empty {:.2} s after ksm was \
             started ({:.0} records/s); records/s by tenth of the spool, the first with ksm's \
             start-up: {}",
            Case::Drain.name(),
            self.records,
            self.devices,
            self.seconds,
            self.records_per_sec(),
            tenths.join(", ")
        )
    }
}

/// Notices a count that stops growing.
struct Stall {
    since: Instant,
    count: u64,
}

impl Stall {
    fn new() -> Stall {
        Stall {
            since: Instant::now(),
            count: 0,
        }
    }

    /// Notes `count`; true once it has not grown for [`DRAIN_TIMEOUT`].
    fn stalled(&mut self, count: u64) -> bool {
        if count > self.count {
            *self = Stall {
                since: Instant::now(),
                count,
            };
        }
        self.since.elapsed() > DRAIN_TIMEOUT
    }
}

impl Rig {
    /// `drain`: a drain of each `--drain-records` size, then the largest's rate against the
    /// smallest's.
    pub(crate) fn drains(&self, report: &mut Report) -> anyhow::Result<()> {
        let mut rates = Vec::new();
        for &records in &self.options.drain_records {
            let (run, drain) = self.drain(records)?;
            report.findings.push(drain.describe());
            rates.push((drain.records, drain.records_per_sec()));
            report.runs.push(run);
        }
        if let [(small, small_rate), .., (large, large_rate)] = rates[..] {
            report.findings.push(format!(
                "{} rate of {large} records against {small}: {large_rate:.0} / {small_rate:.0} \
                 records/s = {:.2}",
                Case::Drain.name(),
                large_rate / small_rate
            ));
        }
        Ok(())
    }

    /// Fills the spool with about `records` records, then measures ksm emptying it.
    fn drain(&self, records: u64) -> anyhow::Result<(Run, Drain)> {
        let per_message = Shape::BigBulk.records_per_message();
        let messages = records.div_ceil(per_message);
        let records = messages * per_message;
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        self.fill_spool(&url, messages)?;
        let blackhole = self.start_blackhole(Case::Drain, port, self.options.shards)?;
        let broker = self.broker.pid().context("the broker is running")?;
        let endpoint = blackhole
            .process
            .pid()
            .context("the blackhole is running")?;
        let before = (
            procfs::cpu_seconds(broker),
            procfs::own_cpu_seconds(),
            procfs::cpu_seconds(endpoint),
        );
        let started = Instant::now();
        let ready_within =
            START_TIMEOUT + Duration::from_secs(records / SPOOLED_RECORDS_PER_START_SECOND);
        let mut ksm = self.start_ksm_within(&url, ready_within, "")?;
        let mut marks = Vec::new();
        let mut stall = Stall::new();
        loop {
            let counters = ksm.summary()?.counters;
            let forwarded = counters.forwarded;
            let tenths = (forwarded * 10 / records).min(10);
            if tenths > marks.len() as u64 {
                let seconds = started.elapsed().as_secs_f64();
                eprintln!("drain: {} % forwarded after {seconds:.1} s", tenths * 10);
                marks.push((seconds, forwarded));
            }
            if forwarded >= records && counters.spool_records == 0 {
                break;
            }
            if stall.stalled(forwarded) {
                bail!(
                    "ksm forwarded {forwarded} of {records} spooled records, and none for \
                     {DRAIN_TIMEOUT:?}; its spool holds {} records; its log: {}",
                    counters.spool_records,
                    ksm.process.log_path().display()
                );
            }
            std::thread::sleep(POLL);
        }
        let elapsed = started.elapsed().as_secs_f64();
        let ksm_cpu = procfs::cpu_seconds(ksm.pid);
        let after = (
            procfs::cpu_seconds(broker),
            procfs::own_cpu_seconds(),
            procfs::cpu_seconds(endpoint),
        );
        ksm.check_forwarded_exactly(records)?;
        let stats = blackhole.stats()?;
        if stats.records < records {
            bail!(
                "ksm counted {records} records forwarded; the blackhole got {}",
                stats.records
            );
        }
        let share = |b: Option<f64>, a: Option<f64>| Some((a? - b?) / elapsed);
        let run = Run {
            what: format!(
                "{}: {records} spooled records, ksm → {}, from its start to an empty spool",
                Case::Drain.name(),
                blackhole.label
            ),
            records_per_sec: records as f64 / elapsed,
            mb_per_sec: Some(stats.data_bytes as f64 / elapsed / 1e6),
            latency_ms: None,
            ksm_us_per_record: ksm_cpu.map(|seconds| seconds / records as f64 * 1e6),
            ksm_cores: ksm_cpu.map(|seconds| seconds / elapsed),
            broker_cores: share(before.0, after.0).unwrap_or_default(),
            loadgen_cores: (after.1 - before.1) / elapsed,
            endpoint_cores: share(before.2, after.2),
            peak_rss_mb: procfs::peak_rss_bytes(ksm.pid).map(|b| b as f64 / 1e6),
            startup_ms: Some(ksm.startup_ms),
            ksm_threads: busiest_threads(ksm.pid, &BTreeMap::new(), elapsed),
            blackhole: Some(stats),
            window_secs: elapsed,
        };
        ksm.process.terminate(Duration::from_secs(10));
        let drain = Drain {
            records,
            devices: messages.min(self.options.devices),
            seconds: elapsed,
            marks,
        };
        Ok((run, drain))
    }

    /// Starts ksm forwarding to `endpoint`, which is down, publishes `messages` payloads of
    /// 1000 records, waits until ksm holds every record in its spool, and stops it.
    fn fill_spool(&self, endpoint: &str, messages: u64) -> anyhow::Result<()> {
        let records = messages * Shape::BigBulk.records_per_message();
        let mut ksm = self.start_ksm(endpoint)?;
        let started = Instant::now();
        let load = Load::start_limited(
            self.broker.port(),
            Shape::BigBulk,
            Pace::Closed {
                window: self.options.window,
            },
            self.options.publishers,
            self.options.devices,
            messages,
        );
        let mut stall = Stall::new();
        loop {
            let counters = ksm.summary()?.counters;
            load.set_progress(Progress {
                taken: counters.received,
                delivered_records: counters.spooled,
            });
            if counters.spool_records >= records {
                break;
            }
            if stall.stalled(counters.spooled) {
                bail!(
                    "ksm spooled {} of {records} records, and none for {DRAIN_TIMEOUT:?}; its \
                     log: {}",
                    counters.spooled,
                    ksm.process.log_path().display()
                );
            }
            std::thread::sleep(POLL);
        }
        let published = load.stop()?;
        let counters = ksm.summary()?.counters;
        if published != messages
            || counters.spool_records != records
            || counters.forwarded != 0
            || counters.dead_lettered != 0
        {
            bail!(
                "published {published} of {messages} payloads; ksm's spool holds {} records of \
                 {records}, it forwarded {} to an endpoint that is down and dead-lettered {}",
                counters.spool_records,
                counters.forwarded,
                counters.dead_lettered
            );
        }
        eprintln!(
            "drain: {records} records spooled in {:.1} s; stopping ksm",
            started.elapsed().as_secs_f64()
        );
        if !ksm.process.terminate(EXIT_TIMEOUT) {
            bail!(
                "ksm did not exit within {EXIT_TIMEOUT:?} of SIGTERM; its log: {}",
                ksm.process.log_path().display()
            );
        }
        Ok(())
    }
}
