//! The cases that model a deployment with live load: a round trip on every `PutRecords`
//! (`rtt-closed`), few devices sending much (`bulk-10x500`) and a stream too small for the
//! load (`paced`). Each starts a blackhole of its own with the round trip.

use ksm_tests::free_port;

use crate::load::{Pace, Shape};
use crate::{Case, CpuPerRecord, Endpoint, Report, Rig};

/// `bulk-10x500`: the devices, and the payloads (of 100 records) each sends a second.
const FEW_DEVICES: u64 = 10;
const PAYLOADS_PER_DEVICE_PER_SEC: f64 = 5.0;
/// `bulk-10x500` kept up when ksm forwarded at least this share of the offered rate in the
/// window and its spool held at most a second of the offered load when the window ended.
pub(crate) const KEPT_UP_SHARE: f64 = 0.95;
/// `paced`: the stream's shards, the records/s ksm lets each take at most (as Kinesis
/// allows), and the load offered, as a multiple of what the shards take.
const PACED_SHARDS: u32 = 4;
pub(crate) const SHARD_RECORDS_PER_SEC: f64 = 1000.0;
const PACED_OVERLOAD: f64 = 2.5;
/// `paced` forwarding more than this multiple of what the shards take gets a note.
const PACED_ABOVE_LIMIT: f64 = 1.02;

impl Rig {
    /// `rtt-closed`: each shape in a closed loop against a blackhole with the round trip.
    pub(crate) fn rtt_closed(&self, report: &mut Report) -> anyhow::Result<()> {
        let blackhole = self.start_blackhole(Case::RttClosed, free_port(), self.options.shards)?;
        let endpoint = Endpoint::Blackhole(&blackhole);
        let closed = Pace::Closed {
            window: self.options.window,
        };
        for shape in self.options.shapes() {
            let run = self.ksm_run(
                Case::RttClosed,
                &endpoint,
                shape,
                closed,
                self.options.devices,
            )?;
            report.runs.push(run.run);
        }
        Ok(())
    }

    /// `bulk-10x500`: 10 devices each sending 5 bulk payloads of 100 records a second, open
    /// loop, with the round trip; finds whether ksm kept up.
    pub(crate) fn bulk_10x500(&self, report: &mut Report) -> anyhow::Result<()> {
        let blackhole = self.start_blackhole(Case::Bulk10x500, free_port(), self.options.shards)?;
        let messages_per_sec = FEW_DEVICES as f64 * PAYLOADS_PER_DEVICE_PER_SEC;
        let offered = messages_per_sec * Shape::Bulk.records_per_message() as f64;
        let run = self.ksm_run(
            Case::Bulk10x500,
            &Endpoint::Blackhole(&blackhole),
            Shape::Bulk,
            Pace::Open {
                per_sec: messages_per_sec,
            },
            FEW_DEVICES,
        )?;
        let forwarded = run.run.records_per_sec;
        let backlog = run.spool_records_after_window;
        let kept_up = forwarded >= KEPT_UP_SHARE * offered && backlog as f64 <= offered;
        let p99 = run
            .run
            .latency_ms
            .map_or_else(|| "–".to_owned(), |(_, p99)| format!("{p99:.1} ms"));
        report.findings.push(format!(
            "{}: offered {offered:.0} records/s from {FEW_DEVICES} devices; ksm forwarded \
             {forwarded:.0} records/s ({:.0} %), p99 {p99}, {backlog} records in its spool when \
             the window ended: {}",
            Case::Bulk10x500.name(),
            100.0 * forwarded / offered,
            if kept_up {
                "kept up"
            } else {
                "fell behind (the backlog was forwarded after the window)"
            },
        ));
        report.runs.push(run.run);
        Ok(())
    }

    /// `paced`: events at 2.5 times what a 4-shard stream takes, open loop, with the round
    /// trip; then the same load against a stream with shards to spare (`--shards`), so the
    /// one difference is pacing, and ksm's CPU per record in both.
    pub(crate) fn paced(&self, report: &mut Report) -> anyhow::Result<()> {
        let takes = f64::from(PACED_SHARDS) * SHARD_RECORDS_PER_SEC;
        let offered = PACED_OVERLOAD * takes;
        let pace = Pace::Open { per_sec: offered };
        let blackhole = self.start_blackhole(Case::Paced, free_port(), PACED_SHARDS)?;
        let run = self.ksm_run(
            Case::Paced,
            &Endpoint::Blackhole(&blackhole),
            Shape::Events,
            pace,
            self.options.devices,
        )?;
        drop(blackhole);
        let roomy = self.start_blackhole(Case::Paced, free_port(), self.options.shards)?;
        let twin = self.ksm_run(
            Case::Paced,
            &Endpoint::Blackhole(&roomy),
            Shape::Events,
            pace,
            self.options.devices,
        )?;
        let paced = CpuPerRecord {
            window: run.run.ksm_us_per_record,
            to_empty: run.us_per_record_to_empty,
        };
        let unpaced = Some(CpuPerRecord {
            window: twin.run.ksm_us_per_record,
            to_empty: twin.us_per_record_to_empty,
        });
        let compared = |paced: Option<f64>, unpaced: Option<f64>| match (paced, unpaced) {
            (Some(paced), Some(unpaced)) => {
                format!(
                    "{paced:.2} µs, unpaced {unpaced:.2} µs: × {:.2}",
                    paced / unpaced
                )
            }
            (Some(paced), None) => format!("{paced:.2} µs"),
            (None, _) => "–".to_owned(),
        };
        let above_limit = if run.run.records_per_sec > PACED_ABOVE_LIMIT * takes {
            " (more than the shards take: ksm's per-shard allowance starts full, a second's \
             worth, which a short warm-up leaves in the window)"
        } else {
            ""
        };
        let unpaced_note = format!(
            "unpaced: the same load into {} shards, which take it all",
            self.options.shards
        );
        report.findings.push(format!(
            "{}: {PACED_SHARDS} shards take {takes:.0} records/s, {offered:.0} offered; ksm \
             forwarded {:.0} records/s in the window{above_limit}. ksm CPU per record from \
             ready until its spool was empty (each record taken in and forwarded once): {}; in \
             the window, per record forwarded (while taking in {PACED_OVERLOAD} times as many): \
             {} ({unpaced_note})",
            Case::Paced.name(),
            run.run.records_per_sec,
            compared(paced.to_empty, unpaced.and_then(|u| u.to_empty)),
            compared(paced.window, unpaced.and_then(|u| u.window)),
        ));
        report.runs.push(run.run);
        report.runs.push(twin.run);
        Ok(())
    }
}
