//! The `aggregation` case: what KPL aggregation (`aggregation = "kpl"`) saves a stream and
//! costs ksm, against the same load without it (`"none"`, the baseline) in the same run.
//!
//! Each shape runs twice, each time on a freshly started ksm with an empty store (so that
//! neither replays the other's journal at start, which shows in start-up and peak memory):
//! aggregation off, then on, open loop at one offered rate that both settings sustain, so
//! that the two are compared at equal load, into a blackhole of 16 shards with the round
//! trip. The shapes: events from 1000 devices, and bulk payloads of 100 × 200 B from 10 devices and from 1000. The blackhole reads
//! every aggregate back into its user records; its counts over the window give Kinesis records
//! per user record, PutRecords requests/s, PUT payload units per million user records and the
//! shards a stream would need for the measured rate; ksm's `/proc` gives CPU per user record
//! and peak memory. As in every run, every record published must be forwarded (ksm counts
//! user records) and none dead-lettered; and ksm's own count of Kinesis records must equal its
//! records without aggregation and be no more than them with it.
//!
//! The offered rates sit between whole shards' worth (7,500 and 2,500 records/s), so that a
//! window measuring a little above the offered rate does not round up to one more shard. Bulk
//! from 10 devices is offered 250 records/s a device: three of the ten devices' keys hash to
//! one shard of the 16, which takes 1000 records/s without aggregation. A fourth load, bulk
//! from those 10 devices at `bulk-10x500`'s 500 records/s a device, puts 1500 records/s on
//! that shard: without aggregation ksm paces it and falls behind (its backlog is forwarded
//! after the window, so every record still arrives), which the tables mark; that comparison
//! is at equal offered load, not equal forwarded load.

use anyhow::{Context as _, bail};
use ksm_tests::free_port;

use crate::cases::{KEPT_UP_SHARE, SHARD_RECORDS_PER_SEC};
use crate::load::{Pace, Shape};
use crate::{Case, Endpoint, KsmRun, Report, Rig, Run};

/// The shards of the case's stream.
const AGGREGATION_SHARDS: u32 = 16;
/// Each shape the case runs: from how many devices, at how many user records a second offered.
const AGGREGATION_SHAPES: [(Shape, u64, f64); 4] = [
    (Shape::Events, 1000, 7500.0),
    (Shape::Bulk, 10, 2500.0),
    (Shape::Bulk, 1000, 7500.0),
    (Shape::Bulk, 10, 5000.0),
];
/// The settings each shape runs with, in order (name, the module's TOML line): the baseline
/// first.
const SETTINGS: [(&str, &str); 2] = [
    ("off", "aggregation = \"none\""),
    ("on", "aggregation = \"kpl\""),
];
/// Bytes a shard takes a second: data plus partition keys.
const SHARD_BYTES_PER_SEC: f64 = 1024.0 * 1024.0;

/// What a run's window put on the stream, and what it cost ksm.
struct Carried {
    /// User records forwarded a second (ksm's `forwarded`).
    user_records_per_sec: f64,
    /// Kinesis records per user record.
    kinesis_per_user_record: f64,
    /// Mean size of a Kinesis record: data plus partition key, bytes.
    bytes_per_kinesis_record: f64,
    /// User records per PutRecords request.
    user_records_per_request: f64,
    /// PutRecords requests a second.
    requests_per_sec: f64,
    /// PUT payload units per million user records.
    units_per_million: f64,
    /// Publish-to-`PutRecords` latency of the user records, p50 and p99, ms.
    latency_ms: Option<(f64, f64)>,
    /// Shards a stream needs for the window's rate: the larger of Kinesis records/s ÷ 1000
    /// and bytes/s ÷ 1 MiB, rounded up.
    shards_needed: f64,
    /// The same before rounding up.
    shards_used: f64,
    /// ksm's CPU per user record forwarded, µs.
    cpu_us_per_user_record: Option<f64>,
    /// ksm's peak resident memory, MB.
    peak_rss_mb: Option<f64>,
}

impl Carried {
    /// The figures of `run`, from the blackhole's counts over its window; fails if the
    /// blackhole counted nothing or could not read back an aggregate.
    fn of(run: &Run) -> anyhow::Result<Carried> {
        let stats = run
            .blackhole
            .as_ref()
            .context("the blackhole kept no counts")?;
        if stats.malformed_aggregates > 0 {
            bail!(
                "{}: the blackhole could not read back {} of ksm's aggregates",
                run.what,
                stats.malformed_aggregates
            );
        }
        if stats.requests == 0 || stats.user_records == 0 {
            bail!("{}: nothing reached the blackhole in the window", run.what);
        }
        let secs = run.window_secs;
        let (requests, kinesis) = (stats.requests as f64, stats.records as f64);
        let user_records = stats.user_records as f64;
        let kinesis_per_sec = kinesis / secs;
        let bytes_per_sec = stats.kinesis_bytes as f64 / secs;
        let shards_used =
            (kinesis_per_sec / SHARD_RECORDS_PER_SEC).max(bytes_per_sec / SHARD_BYTES_PER_SEC);
        Ok(Carried {
            user_records_per_sec: run.records_per_sec,
            kinesis_per_user_record: kinesis / user_records,
            bytes_per_kinesis_record: stats.kinesis_bytes as f64 / kinesis,
            user_records_per_request: user_records / requests,
            requests_per_sec: requests / secs,
            units_per_million: stats.payload_units as f64 / user_records * 1e6,
            latency_ms: run.latency_ms,
            shards_needed: shards_used.ceil(),
            shards_used,
            cpu_us_per_user_record: run.ksm_us_per_record,
            peak_rss_mb: run.peak_rss_mb,
        })
    }

    /// Its cells in the case's table, after the shape and setting.
    fn cells(&self) -> String {
        format!(
            "{:.0} | {:.4} | {:.0} | {:.1} | {:.1} | {:.0} | {:.0} ({:.2}) | {} | {} | {} |",
            self.user_records_per_sec,
            self.kinesis_per_user_record,
            self.bytes_per_kinesis_record,
            self.user_records_per_request,
            self.requests_per_sec,
            self.units_per_million,
            self.shards_needed,
            self.shards_used,
            self.latency_ms.map_or_else(
                || "–".to_owned(),
                |(p50, p99)| format!("{p50:.1} / {p99:.1}")
            ),
            optional(self.cpu_us_per_user_record, 2),
            optional(self.peak_rss_mb, 0),
        )
    }

    /// The cells of the on ÷ off row: each figure of `on` over the same figure of `off`.
    fn ratio_cells(on: &Carried, off: &Carried) -> String {
        let pairs = [
            (on.user_records_per_sec, off.user_records_per_sec),
            (on.kinesis_per_user_record, off.kinesis_per_user_record),
            (on.bytes_per_kinesis_record, off.bytes_per_kinesis_record),
            (on.user_records_per_request, off.user_records_per_request),
            (on.requests_per_sec, off.requests_per_sec),
            (on.units_per_million, off.units_per_million),
            (on.shards_needed, off.shards_needed),
        ];
        let mut cells: Vec<String> = pairs
            .into_iter()
            .map(|(on, off)| format!("× {}", ratio(Some(on), Some(off))))
            .collect();
        let latency = |run: &Carried, p99: bool| {
            run.latency_ms
                .map(|(p50, p99_ms)| if p99 { p99_ms } else { p50 })
        };
        cells.push(format!(
            "× {} / × {}",
            ratio(latency(on, false), latency(off, false)),
            ratio(latency(on, true), latency(off, true))
        ));
        cells.push(format!(
            "× {}",
            ratio(on.cpu_us_per_user_record, off.cpu_us_per_user_record)
        ));
        cells.push(format!("× {}", ratio(on.peak_rss_mb, off.peak_rss_mb)));
        format!("{} |", cells.join(" | "))
    }
}

/// `value` with `digits` decimals, or a dash without one.
fn optional(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{v:.digits$}"))
}

/// `on ÷ off`, with two decimals from 1 up and three significant digits below, or a dash when
/// either is missing or off is 0.
fn ratio(on: Option<f64>, off: Option<f64>) -> String {
    match (on, off) {
        (Some(on), Some(off)) if off > 0.0 && on > 0.0 => {
            let quotient = on / off;
            let digits = if quotient >= 1.0 {
                2
            } else {
                (2.0 - quotient.log10().floor()) as usize
            };
            format!("{quotient:.digits$}")
        }
        (Some(_), Some(off)) if off > 0.0 => "0".to_owned(),
        _ => "–".to_owned(),
    }
}

/// A shape as the case's tables name it: what, from how many devices, at what offered rate.
fn shape_label(shape: Shape, devices: u64, offered: f64) -> String {
    format!(
        "{} from {devices} devices, {offered:.0} records/s",
        shape.name()
    )
}

impl Rig {
    /// `aggregation`: each shape with aggregation off, then on, at the same offered rate
    /// (open loop) into a 16-shard stream with the round trip; a table of what the stream
    /// carried and what ksm spent, on against off, and one of what aggregation saves.
    pub(crate) fn aggregation(&self, report: &mut Report) -> anyhow::Result<()> {
        let blackhole = self.start_blackhole(Case::Aggregation, free_port(), AGGREGATION_SHARDS)?;
        let endpoint = Endpoint::Blackhole(&blackhole);
        let mut figures = Vec::new();
        let mut savings = Vec::new();
        for (shape, devices, offered) in AGGREGATION_SHAPES {
            let pace = Pace::Open {
                per_sec: offered / shape.records_per_message() as f64,
            };
            let label = shape_label(shape, devices, offered);
            let mut carried = Vec::new();
            let mut fell_behind = Vec::new();
            for (setting, module) in SETTINGS {
                self.clear_store()?;
                let run =
                    self.ksm_run_with(Case::Aggregation, &endpoint, shape, pace, devices, module)?;
                check_kinesis_records(&run, setting == "on")?;
                let KsmRun { mut run, .. } = run;
                run.what = format!(
                    "{}: {} from {devices} devices, aggregation {setting}: ksm → {}, open loop \
                     at {offered:.0} records/s",
                    Case::Aggregation.name(),
                    shape.name(),
                    blackhole.label
                );
                let figures_of_run = Carried::of(&run)?;
                let behind = if figures_of_run.user_records_per_sec < KEPT_UP_SHARE * offered {
                    fell_behind.push(setting);
                    " (behind the offered rate)"
                } else {
                    ""
                };
                figures.push(format!(
                    "| {label}{behind} | {setting} | {}",
                    figures_of_run.cells()
                ));
                carried.push(figures_of_run);
                report.runs.push(run);
            }
            let [off, on] = [&carried[0], &carried[1]];
            let label = match fell_behind.as_slice() {
                [] => label,
                settings => format!(
                    "{label} (aggregation {} fell behind)",
                    settings.join(" and ")
                ),
            };
            figures.push(format!(
                "| {label} | on ÷ off | {}",
                Carried::ratio_cells(on, off)
            ));
            let saved = [
                (
                    "Kinesis records per million user records",
                    off.kinesis_per_user_record * 1e6,
                    on.kinesis_per_user_record * 1e6,
                ),
                (
                    "PutRecords requests/s",
                    off.requests_per_sec,
                    on.requests_per_sec,
                ),
                (
                    "payload units per million user records",
                    off.units_per_million,
                    on.units_per_million,
                ),
                ("shards needed", off.shards_needed, on.shards_needed),
            ];
            for (figure, off, on) in saved {
                let digits = if figure.starts_with("PutRecords") {
                    1
                } else {
                    0
                };
                savings.push(format!(
                    "| {label} | {figure} | {off:.digits$} | {on:.digits$} | {} |",
                    ratio(Some(on), Some(off))
                ));
            }
        }
        let rtt = self.options.rtt(Case::Aggregation).as_millis();
        let mut table = vec![
            format!(
                "{}: each shape offered one rate, open loop, with aggregation off (\"none\", the \
                 baseline) and then on (\"kpl\"), so the two carry equal load; each run on a \
                 fresh ksm, into a {AGGREGATION_SHARDS}-shard stream with a {rtt} ms round trip; \
                 the blackhole's counts over the window (bytes: data plus partition key; shards \
                 needed: the larger of Kinesis records/s ÷ 1000 and bytes/s ÷ 1 MiB, rounded up; \
                 before rounding in brackets)",
                Case::Aggregation.name()
            ),
            String::new(),
            "| shape | aggregation | user records/s | Kinesis records per user record | bytes per \
             Kinesis record | user records per request | PutRecords/s | payload units per M \
             user records | shards needed | latency p50 / p99 ms | ksm µs CPU/user record | ksm peak \
             RSS MB |"
                .to_owned(),
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|".to_owned(),
        ];
        table.extend(figures);
        report.tables.push(table.join("\n"));
        let mut table = vec![
            format!(
                "{}: what it saves, on against off at the same load:",
                Case::Aggregation.name()
            ),
            String::new(),
            "| shape | figure | off | on | on ÷ off |".to_owned(),
            "|---|---|---:|---:|---:|".to_owned(),
        ];
        table.extend(savings);
        report.tables.push(table.join("\n"));
        Ok(())
    }
}

/// Fails unless ksm's own count of Kinesis records accepted, over the whole run, fits its
/// setting: as many as its records without aggregation, at most as many with it.
fn check_kinesis_records(run: &KsmRun, aggregated: bool) -> anyhow::Result<()> {
    let (kinesis, forwarded) = (run.kinesis_records, run.forwarded);
    let fits = if aggregated {
        (1..=forwarded).contains(&kinesis)
    } else {
        kinesis == forwarded
    };
    if !fits {
        bail!(
            "ksm counted {kinesis} Kinesis records for {forwarded} records forwarded, \
             aggregation {}",
            if aggregated { "on" } else { "off" }
        );
    }
    Ok(())
}
