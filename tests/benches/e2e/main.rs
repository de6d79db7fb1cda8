//! End-to-end benchmark: Mosquitto, a Kinesis endpoint and the `ksm` binary on loopback,
//! driven by QoS 1 publishers; prints records/s, MB/s, publish-to-`PutRecords` latency,
//! ksm's CPU per record, every process's CPU share and ksm's peak memory.
//!
//! ```text
//! cargo bench -p ksm-tests --bench e2e                    # full run, release build
//! cargo bench -p ksm-tests --bench e2e -- --seconds 3     # shorter windows
//! cargo bench -p ksm-tests --bench e2e -- --only bulk     # one shape
//! cargo bench -p ksm-tests --bench e2e -- --cases paced,drain   # some cases
//! cargo bench -p ksm-tests --bench e2e -- --seconds 2 --warmup 1 --drain-records 20000,100000
//! ```
//!
//! The last is the brief run (CI's): a few minutes in all. The full run's drain alone fills and
//! empties a spool of ten million records (about 2 GB).
//!
//! The cases (`--cases`, comma-separated; all by default), in the order they run, each run on a
//! freshly started ksm:
//! - `baseline`: for each shape (events; bulk of 100 × 200 B), the same publishers against a
//!   subscriber that only acknowledges and counts, so the broker and load generator's own
//!   ceiling is known in the same run;
//! - `blackhole`: for each shape, ksm against the **blackhole** endpoint (bench-only;
//!   `ksm_tests::blackhole`) in a closed loop, for ksm's maximum, then in an open loop at half
//!   that maximum, for latency;
//! - `kinesalite`: ksm against **kinesalite** (a real emulator) for events in a closed loop,
//!   to show which process saturates there;
//! - `rtt-closed`: for each shape, a closed loop against a blackhole that answers every
//!   `PutRecords` a round trip after it arrived;
//! - `bulk-10x500`: bulk from 10 devices, each 5 payloads of 100 × 200 B a second (5,000
//!   records/s in all), open loop, with the round trip: whether ksm keeps up with few devices
//!   sending much (forwarded rate against offered, p99, the spool when the window ends);
//! - `paced`: events at 2.5 times what a 4-shard stream takes (ksm paces each shard under 1000
//!   records/s), open loop, with the round trip; the spool grows in the window, and the run
//!   waits for it to empty. ksm's CPU per record, from ready until its spool is empty, beside
//!   the same figure of the `blackhole` case's closed loop of events;
//! - `aggregation`: for events from 1000 devices, bulk from 10 devices and bulk from 1000
//!   devices, each at a fixed offered rate that both settings sustain (open loop: equal load)
//!   into a stream of 16 shards with the round trip, ksm with `aggregation = "none"` (the
//!   baseline) and then `"kpl"`: user records/s, Kinesis records per user record, PutRecords
//!   requests/s, PUT payload units per million user records, the shards a stream would need
//!   for the measured rate, ksm's CPU per user record and peak memory, on against off, and a
//!   table of what aggregation saves;
//! - `drain`: for each `--drain-records` size, ksm restarted on a spool holding that many
//!   records of 200 B, against the blackhole with the round trip: records/s by tenth of the
//!   spool, the time to empty it, CPU per record, peak memory; and the largest size's rate
//!   against the smallest's.
//!
//! The round trip (`--rtt-ms`) is 20 ms for the cases from `rtt-closed` on, and none for
//! `blackhole` (ksm's own ceiling), unless `--rtt-ms` is given: then it is every blackhole's.
//! (`aggregation` runs every shape whatever `--only` says.)
//! A blackhole answers after its round trip without holding up requests on other connections,
//! as Kinesis does; each case that needs another round trip or shard count starts a blackhole
//! process of its own. `--only events|bulk` keeps the runs of one shape (`bulk-10x500` and
//! `drain` are bulk, `paced` and `kinesalite` events).
//!
//! Every run checks that every published record was forwarded, none dead-lettered.
//! `BENCHMARKS.md` explains the method and keeps the figures.

mod aggregation;
mod cases;
mod drain;
mod load;
mod procfs;
mod wire;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use ksm_host::admin::ModuleSummary;
use ksm_host::admin_client::AdminClient;
use ksm_tests::process::{ServiceProcess, port_accepts};
use ksm_tests::{BlackholeKinesis, BlackholeStats, Kinesalite, Mosquitto, TempDir, free_port};

use load::{BaselineSubscriber, Load, Pace, Progress, Shape};

/// The bench module's ID and stream.
const MODULE: &str = "bench";
const STREAM: &str = "ksm-bench";
/// How often closed-loop publishers learn what was delivered.
const POLL: Duration = Duration::from_millis(10);
/// Longest wait for ksm to forward what was published once publishing stops, beyond twice
/// the time the backlog takes at the rate the window measured; and the longest a drain may go
/// without forwarding anything.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The round trip of the cases that model a deployment, unless `--rtt-ms` says otherwise.
const DEFAULT_RTT_MS: u64 = 20;
/// ksm's default `storage.spool_max_mib`, kept when the drain needs no more.
const DEFAULT_SPOOL_MAX_MIB: u64 = 1024;
/// Spool bytes the bench allows per drain record: 200 B of data, its partition key, and room
/// to spare.
const SPOOL_BYTES_PER_DRAIN_RECORD: u64 = 300;
/// Longest wait for a fresh ksm to be ready (a drain allows more).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// What the usage message lists.
const USAGE: &str = "options: --seconds S --warmup S --publishers N --devices N --shards N \
    --window RECORDS --only events|bulk --cases CASE,... --rtt-ms MS --drain-records N,N \
    --no-kinesalite; cases: baseline, blackhole, kinesalite, rtt-closed, bulk-10x500, paced, \
    aggregation, drain (all by default); a brief run (CI's, a few minutes): --seconds 2 --warmup 1 \
    --drain-records 20000,100000";

/// A case of the bench (`--cases` selects them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    /// Each shape against a broker-only subscriber.
    Baseline,
    /// Each shape, ksm → blackhole: closed loop, then open loop at half the maximum.
    Blackhole,
    /// Events, ksm → kinesalite, closed loop.
    Kinesalite,
    /// Each shape, ksm → blackhole with a round trip, closed loop.
    RttClosed,
    /// Bulk from 10 devices at 500 records/s each, open loop, with a round trip.
    Bulk10x500,
    /// Events at 2.5 times what a 4-shard stream takes, open loop, with a round trip.
    Paced,
    /// Each shape with aggregation off and on, open loop, with a round trip.
    Aggregation,
    /// ksm restarted on a spool holding a backlog, with a round trip.
    Drain,
}

impl Case {
    /// Every case, in the order they run.
    const ALL: [Case; 8] = [
        Case::Baseline,
        Case::Blackhole,
        Case::Kinesalite,
        Case::RttClosed,
        Case::Bulk10x500,
        Case::Paced,
        Case::Aggregation,
        Case::Drain,
    ];

    /// Its name on the command line and in reports.
    fn name(self) -> &'static str {
        match self {
            Case::Baseline => "baseline",
            Case::Blackhole => "blackhole",
            Case::Kinesalite => "kinesalite",
            Case::RttClosed => "rtt-closed",
            Case::Bulk10x500 => "bulk-10x500",
            Case::Paced => "paced",
            Case::Aggregation => "aggregation",
            Case::Drain => "drain",
        }
    }

    fn parse(name: &str) -> anyhow::Result<Case> {
        Case::ALL
            .into_iter()
            .find(|case| case.name() == name)
            .with_context(|| format!("no case `{name}`; {USAGE}"))
    }

    /// Whether the case models a deployment: its blackhole answers after [`DEFAULT_RTT_MS`]
    /// unless `--rtt-ms` says otherwise, and its runs' names start with its own (the other
    /// cases' runs keep the names `BENCHMARKS.md`'s tables use).
    fn models_a_deployment(self) -> bool {
        !matches!(self, Case::Baseline | Case::Blackhole | Case::Kinesalite)
    }
}

/// Command-line options.
#[derive(Debug, Clone)]
struct Options {
    /// Measured seconds per run.
    seconds: f64,
    /// Seconds of load before measuring.
    warmup: f64,
    /// Publisher connections.
    publishers: usize,
    /// Devices (partition keys) the load comes from.
    devices: u64,
    /// Shards of the blackhole's stream (ksm paces each under 1000 records/s and 1 MiB/s,
    /// as Kinesis allows).
    shards: u32,
    /// Closed-loop window, records.
    window: u64,
    /// Only this shape.
    only: Option<Shape>,
    /// Skip the kinesalite run.
    no_kinesalite: bool,
    /// The cases to run (they run in the order of [`Case::ALL`]).
    cases: Vec<Case>,
    /// Every blackhole's round trip, ms; without it, none for the `blackhole` case and
    /// [`DEFAULT_RTT_MS`] for the cases that model a deployment.
    rtt_ms: Option<u64>,
    /// The spools the drain case empties, records, smallest first.
    drain_records: Vec<u64>,
}

impl Options {
    /// Whether `case` runs.
    fn runs(&self, case: Case) -> bool {
        self.cases.contains(&case) && !(case == Case::Kinesalite && self.no_kinesalite)
    }

    /// Whether runs of `shape` run.
    fn runs_shape(&self, shape: Shape) -> bool {
        self.only.is_none_or(|only| only == shape)
    }

    /// The shapes `baseline`, `blackhole` and `rtt-closed` run, each in turn.
    fn shapes(&self) -> Vec<Shape> {
        [Shape::Events, Shape::Bulk]
            .into_iter()
            .filter(|&shape| self.runs_shape(shape))
            .collect()
    }

    /// The round trip of `case`'s blackhole.
    fn rtt(&self, case: Case) -> Duration {
        let default = if case.models_a_deployment() {
            DEFAULT_RTT_MS
        } else {
            0
        };
        Duration::from_millis(self.rtt_ms.unwrap_or(default))
    }

    /// ksm's `storage.spool_max_mib`: its default, or room for the largest drain.
    fn spool_max_mib(&self) -> u64 {
        let largest = self.drain_records.last().copied().unwrap_or(0);
        (largest * SPOOL_BYTES_PER_DRAIN_RECORD)
            .div_ceil(1024 * 1024)
            .max(DEFAULT_SPOOL_MAX_MIB)
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            seconds: 10.0,
            warmup: 3.0,
            publishers: 4,
            devices: 1000,
            shards: 512,
            window: 20_000,
            only: None,
            no_kinesalite: false,
            cases: Case::ALL.to_vec(),
            rtt_ms: None,
            drain_records: vec![100_000, 10_000_000],
        }
    }
}

fn parse_args() -> anyhow::Result<Mode> {
    let mut args = std::env::args().skip(1);
    let mut options = Options::default();
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            // `cargo bench` passes this to every bench binary.
            "--bench" => {}
            "--blackhole" => {
                let port = value()?.parse()?;
                let shards = value()?.parse()?;
                let delay = Duration::from_millis(value()?.parse()?);
                return Ok(Mode::Blackhole {
                    port,
                    shards,
                    delay,
                });
            }
            "--seconds" => options.seconds = value()?.parse()?,
            "--warmup" => options.warmup = value()?.parse()?,
            "--publishers" => options.publishers = value()?.parse()?,
            "--devices" => options.devices = value()?.parse()?,
            "--shards" => options.shards = value()?.parse()?,
            "--window" => options.window = value()?.parse()?,
            "--only" => {
                options.only = Some(match value()?.as_str() {
                    "events" => Shape::Events,
                    "bulk" => Shape::Bulk,
                    other => bail!("--only takes `events` or `bulk`, not `{other}`"),
                })
            }
            "--no-kinesalite" => options.no_kinesalite = true,
            "--cases" => {
                options.cases = value()?
                    .split(',')
                    .map(Case::parse)
                    .collect::<anyhow::Result<_>>()?;
            }
            "--rtt-ms" => options.rtt_ms = Some(value()?.parse()?),
            "--drain-records" => {
                let mut sizes = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<Vec<u64>, _>>()
                    .context("--drain-records takes sizes such as 20000,100000")?;
                if sizes.contains(&0) {
                    bail!("--drain-records takes sizes of at least 1 record");
                }
                sizes.sort_unstable();
                options.drain_records = sizes;
            }
            other => bail!("unknown argument `{other}`; {USAGE}"),
        }
    }
    Ok(Mode::Bench(options))
}

/// What this process was asked to do.
enum Mode {
    Bench(Options),
    /// Serve the blackhole endpoint (the bench starts itself in this mode:
    /// `--blackhole PORT SHARDS DELAY_MS`).
    Blackhole {
        port: u16,
        shards: u32,
        /// How long each `PutRecords` answer waits: the round trip.
        delay: Duration,
    },
}

fn main() -> anyhow::Result<()> {
    match parse_args()? {
        Mode::Blackhole {
            port,
            shards,
            delay,
        } => {
            let listener = TcpListener::bind(("127.0.0.1", port))?;
            BlackholeKinesis::new(shards)
                .with_delay(delay)
                .serve(listener)?;
            Ok(())
        }
        Mode::Bench(options) => bench(&options),
    }
}

/// One measured run.
#[derive(Debug, Default)]
struct Run {
    what: String,
    records_per_sec: f64,
    mb_per_sec: Option<f64>,
    latency_ms: Option<(f64, f64)>,
    ksm_us_per_record: Option<f64>,
    ksm_cores: Option<f64>,
    broker_cores: f64,
    loadgen_cores: f64,
    endpoint_cores: Option<f64>,
    peak_rss_mb: Option<f64>,
    startup_ms: Option<f64>,
    /// ksm's busiest threads (by name) and the cores each used.
    ksm_threads: Vec<(String, f64)>,
    /// What the blackhole counted in the window, when ksm forwarded to one.
    blackhole: Option<BlackholeStats>,
    /// The window, seconds.
    window_secs: f64,
}

/// A run of ksm, with what the cases compare beyond the table.
struct KsmRun {
    run: Run,
    /// ksm's CPU from ready until its spool was empty, per record published, µs: every record
    /// taken in and forwarded once, however far forwarding fell behind the intake meanwhile.
    us_per_record_to_empty: Option<f64>,
    /// Records in ksm's spool when the window ended.
    spool_records_after_window: u64,
    /// Records ksm forwarded over the whole run (its `forwarded`: user records).
    forwarded: u64,
    /// Kinesis records ksm counted as accepted over the whole run (an aggregate once).
    kinesis_records: u64,
}

/// ksm's CPU per record, µs.
#[derive(Debug, Clone, Copy)]
struct CpuPerRecord {
    /// In the window, per record forwarded.
    window: Option<f64>,
    /// From ready until the spool was empty, per record published.
    to_empty: Option<f64>,
}

/// What the bench prints at the end.
#[derive(Default)]
struct Report {
    runs: Vec<Run>,
    /// What the cases found beyond the table, a line each.
    findings: Vec<String>,
    /// Tables of their own some cases print after the findings, each with its heading.
    tables: Vec<String>,
}

fn bench(options: &Options) -> anyhow::Result<()> {
    let build = if cfg!(debug_assertions) {
        "dev build: figures are not representative; use `cargo bench`"
    } else {
        "release build"
    };
    eprintln!("ksm e2e bench ({build}); options {options:?}");
    let rig = Rig::start(options)?;
    let mut report = Report::default();
    let shapes = options.shapes();
    // Baselines first: once ksm has connected, its persistent session is subscribed and the
    // broker would queue the baseline's messages for it too.
    if options.runs(Case::Baseline) {
        for &shape in &shapes {
            report.runs.push(rig.baseline(shape)?);
        }
    }
    let cold_start = rig.cold_start()?;
    let closed = Pace::Closed {
        window: options.window,
    };
    if options.runs(Case::Blackhole) {
        let endpoint = Endpoint::Blackhole(&rig.blackhole);
        for &shape in &shapes {
            let max = rig.ksm_run(Case::Blackhole, &endpoint, shape, closed, options.devices)?;
            let half = max.run.records_per_sec / 2.0 / shape.records_per_message() as f64;
            let open = Pace::Open { per_sec: half };
            report.runs.push(max.run);
            let open = rig.ksm_run(Case::Blackhole, &endpoint, shape, open, options.devices)?;
            report.runs.push(open.run);
        }
    }
    if options.runs(Case::Kinesalite) && options.runs_shape(Shape::Events) {
        let kinesalite = Kinesalite::start();
        create_stream(&kinesalite.endpoint())?;
        let endpoint = Endpoint::Kinesalite(&kinesalite);
        let run = rig.ksm_run(
            Case::Kinesalite,
            &endpoint,
            Shape::Events,
            closed,
            options.devices,
        )?;
        report.runs.push(run.run);
    }
    if options.runs(Case::RttClosed) {
        rig.rtt_closed(&mut report)?;
    }
    if options.runs(Case::Bulk10x500) && options.runs_shape(Shape::Bulk) {
        rig.bulk_10x500(&mut report)?;
    }
    if options.runs(Case::Paced) && options.runs_shape(Shape::Events) {
        rig.paced(&mut report)?;
    }
    if options.runs(Case::Aggregation) {
        rig.aggregation(&mut report)?;
    }
    if options.runs(Case::Drain) && options.runs_shape(Shape::Bulk) {
        rig.drains(&mut report)?;
    }
    print_report(&rig, build, cold_start, &report);
    Ok(())
}

/// Where ksm puts records.
enum Endpoint<'a> {
    Blackhole(&'a Blackhole),
    Kinesalite(&'a Kinesalite),
}

impl Endpoint<'_> {
    fn url(&self) -> String {
        match self {
            Endpoint::Blackhole(blackhole) => blackhole.url(),
            Endpoint::Kinesalite(kinesalite) => kinesalite.endpoint(),
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Endpoint::Blackhole(blackhole) => blackhole.process.pid(),
            Endpoint::Kinesalite(kinesalite) => kinesalite.pid(),
        }
    }

    /// The blackhole, whose counters tell data rate and latency.
    fn blackhole(&self) -> Option<&Blackhole> {
        match self {
            Endpoint::Blackhole(blackhole) => Some(blackhole),
            Endpoint::Kinesalite(_) => None,
        }
    }

    /// Its name in reports.
    fn label(&self) -> &str {
        match self {
            Endpoint::Blackhole(blackhole) => &blackhole.label,
            Endpoint::Kinesalite(_) => "kinesalite",
        }
    }
}

/// A blackhole endpoint in a process of its own: this bench binary in `--blackhole` mode.
struct Blackhole {
    process: ServiceProcess,
    port: u16,
    /// Its name in reports: `blackhole`, with its shards when they are not the usual number
    /// and its round trip when it has one.
    label: String,
}

impl Blackhole {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn call(&self, method: &str, path: &str) -> anyhow::Result<String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        Ok(AdminClient::new(addr).call(method, path)?)
    }

    fn stats(&self) -> anyhow::Result<BlackholeStats> {
        Ok(serde_json::from_str(&self.call("GET", "/stats")?)?)
    }
}

/// The broker, the blackhole, ksm's files, for every run.
struct Rig {
    options: Options,
    broker: Mosquitto,
    /// The `blackhole` case's, with `--shards` shards.
    blackhole: Blackhole,
    guest: PathBuf,
    ksm: PathBuf,
    dir: TempDir,
}

impl Rig {
    fn start(options: &Options) -> anyhow::Result<Rig> {
        let guest = ksm_tests::guest_wasm();
        let ksm = ksm_tests::artifacts::ksm_binary_as_built();
        let broker = Mosquitto::start();
        let dir = TempDir::new("ksm-bench");
        let delay = options.rtt(Case::Blackhole);
        let blackhole = start_blackhole(dir.path(), free_port(), options.shards, delay, options)?;
        Ok(Rig {
            options: options.clone(),
            broker,
            blackhole,
            guest,
            ksm,
            dir,
        })
    }

    /// Starts another blackhole, on `port`, for `case`: `shards` shards and the case's round
    /// trip.
    fn start_blackhole(&self, case: Case, port: u16, shards: u32) -> anyhow::Result<Blackhole> {
        let delay = self.options.rtt(case);
        start_blackhole(self.dir.path(), port, shards, delay, &self.options)
    }

    /// Starts ksm with the component compiled afresh (an empty cache), then stops it.
    fn cold_start(&self) -> anyhow::Result<f64> {
        let _ = std::fs::remove_dir_all(self.dir.path().join("store/component-cache"));
        let mut ksm = self.start_ksm(&self.blackhole.url())?;
        ksm.process.terminate(Duration::from_secs(10));
        Ok(ksm.startup_ms)
    }

    /// Empties ksm's store (its database; the compiled component stays), so that the next ksm
    /// starts without replaying an earlier run's journal. Only while no ksm runs.
    fn clear_store(&self) -> anyhow::Result<()> {
        let database = self.dir.path().join("store/store");
        match std::fs::remove_dir_all(&database) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot empty {}", database.display()))
            }
            _ => Ok(()),
        }
    }

    /// The settings of ksm's config that are not the host's defaults or the rig's plumbing.
    fn ksm_settings(&self) -> String {
        format!("storage.spool_max_mib = {}", self.options.spool_max_mib())
    }

    /// Starts ksm on the rig's store, forwarding to `endpoint`, and waits until it is ready.
    fn start_ksm(&self, endpoint: &str) -> anyhow::Result<Ksm> {
        self.start_ksm_within(endpoint, START_TIMEOUT, "")
    }

    /// Like [`Rig::start_ksm`], waiting up to `timeout` for ksm to be ready, with `module`
    /// (TOML lines) added to the bench module's settings.
    fn start_ksm_within(
        &self,
        endpoint: &str,
        timeout: Duration,
        module: &str,
    ) -> anyhow::Result<Ksm> {
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = format!(
            r#"[mqtt]
url = "{broker}"
client_id = "ksm-bench"

[admin]
listen = "{admin}"

[component]
path = "{guest}"

[storage]
dir = "{storage}"
spool_max_mib = {spool_max_mib}

[[modules]]
id = "{MODULE}"
subscribe_events = ["{event}"]
bulk_data_label = "{label}"
region = "us-east-1"
stream_name = "{STREAM}"
{module}
"#,
            broker = self.broker.url(),
            guest = self.guest.display(),
            storage = self.dir.path().join("store").display(),
            spool_max_mib = self.options.spool_max_mib(),
            event = load::EVENT_TYPE,
            label = load::BULK_LABEL,
        );
        let config_path = self.dir.path().join("ksm.toml");
        std::fs::write(&config_path, config)?;
        let mut command = Command::new(&self.ksm);
        command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .envs(ksm_tests::aws_env(endpoint, endpoint));
        let started = Instant::now();
        let mut process = ServiceProcess::spawn(
            "ksm",
            command,
            &self.dir.path().join("ksm.log"),
            "cargo build -p ksm-host",
        );
        let client = AdminClient::new(admin);
        loop {
            if matches!(client.request("GET", "/api/health"), Ok((200, _))) {
                break;
            }
            process.assert_running();
            if started.elapsed() > timeout {
                bail!(
                    "ksm did not become healthy in {timeout:?}; see {}",
                    process.log()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let pid = process.pid().context("ksm is running")?;
        Ok(Ksm {
            startup_ms: started.elapsed().as_secs_f64() * 1000.0,
            cpu_at_ready: procfs::cpu_seconds(pid),
            pid,
            process,
            admin: client,
        })
    }

    fn baseline(&self, shape: Shape) -> anyhow::Result<Run> {
        let subscriber = BaselineSubscriber::start(self.broker.port(), shape)?;
        let load = self.load(
            shape,
            Pace::Closed {
                window: self.options.window,
            },
            self.options.devices,
        );
        let measured = self.measure(&load, None, || Ok(subscriber.progress(shape)))?;
        let published = load.stop()? * shape.records_per_message();
        let drained = wait_until(DRAIN_TIMEOUT, || subscriber.records() >= published);
        let received = subscriber.records();
        subscriber.stop()?;
        // Mosquitto drops messages for a subscriber that falls behind ("Outgoing messages
        // are being dropped"); the ceiling still stands, marked, and the runs go on.
        let dropped = if drained.is_ok() {
            String::new()
        } else {
            eprintln!(
                "baseline: the subscriber got {received} of {published} records; the broker's \
                 log ends:\n{}",
                log_tail(&self.broker.log())
            );
            format!(
                ", broker dropped {} records",
                published - received.min(published)
            )
        };
        Ok(Run {
            what: format!("{}: broker only (baseline{dropped})", shape.name()),
            ..measured
        })
    }

    /// Publishes `shape` messages from `devices` devices at `pace` to a fresh ksm forwarding
    /// to `endpoint`, measures a window, waits until ksm has forwarded everything, and checks
    /// that it forwarded every record and dead-lettered none.
    fn ksm_run(
        &self,
        case: Case,
        endpoint: &Endpoint<'_>,
        shape: Shape,
        pace: Pace,
        devices: u64,
    ) -> anyhow::Result<KsmRun> {
        self.ksm_run_with(case, endpoint, shape, pace, devices, "")
    }

    /// Like [`Rig::ksm_run`], with `module` (TOML lines) added to the bench module.
    fn ksm_run_with(
        &self,
        case: Case,
        endpoint: &Endpoint<'_>,
        shape: Shape,
        pace: Pace,
        devices: u64,
        module: &str,
    ) -> anyhow::Result<KsmRun> {
        let mut ksm = self.start_ksm_within(&endpoint.url(), START_TIMEOUT, module)?;
        let load = self.load(shape, pace, devices);
        let mut measured = self.measure(&load, Some((&ksm, endpoint)), || ksm.progress())?;
        let spool_records_after_window = ksm.summary()?.counters.spool_records;
        let published = load.stop()? * shape.records_per_message();
        let backlog = published.saturating_sub(ksm.forwarded()?);
        ksm.wait_until_forwarded(published, drain_timeout(backlog, measured.records_per_sec))?;
        ksm.check_forwarded_exactly(published)?;
        let kinesis_records = ksm.summary()?.counters.kinesis_records;
        let us_per_record_to_empty = ksm
            .cpu_since_ready()
            .map(|seconds| seconds / published as f64 * 1e6);
        measured.peak_rss_mb = procfs::peak_rss_bytes(ksm.pid).map(|b| b as f64 / 1e6);
        measured.startup_ms = Some(ksm.startup_ms);
        ksm.process.terminate(Duration::from_secs(10));
        let pace = match pace {
            Pace::Closed { .. } => "closed loop (max)".to_owned(),
            Pace::Open { per_sec } => format!(
                "open loop at {:.0} records/s",
                per_sec * shape.records_per_message() as f64
            ),
        };
        let case = if case.models_a_deployment() {
            format!("{}: ", case.name())
        } else {
            String::new()
        };
        let devices = if devices == self.options.devices {
            String::new()
        } else {
            format!(" from {devices} devices")
        };
        Ok(KsmRun {
            run: Run {
                what: format!(
                    "{case}{}{devices}: ksm → {}, {pace}",
                    shape.name(),
                    endpoint.label()
                ),
                ..measured
            },
            us_per_record_to_empty,
            spool_records_after_window,
            forwarded: published,
            kinesis_records,
        })
    }

    fn load(&self, shape: Shape, pace: Pace, devices: u64) -> Load {
        Load::start(
            self.broker.port(),
            shape,
            pace,
            self.options.publishers,
            devices,
        )
    }

    /// Warms up, then measures one window while telling closed-loop publishers what
    /// `progress` says.
    fn measure(
        &self,
        load: &Load,
        ksm: Option<(&Ksm, &Endpoint<'_>)>,
        mut progress: impl FnMut() -> anyhow::Result<Progress>,
    ) -> anyhow::Result<Run> {
        let mut poll_until = |until: Instant| -> anyhow::Result<u64> {
            loop {
                let now = progress()?;
                load.set_progress(now);
                if Instant::now() >= until {
                    return Ok(now.delivered_records);
                }
                std::thread::sleep(POLL);
            }
        };
        poll_until(Instant::now() + Duration::from_secs_f64(self.options.warmup))?;
        let broker = self.broker.pid().context("the broker is running")?;
        let ksm_pid = ksm.map(|(k, _)| k.pid);
        let endpoint_pid = ksm.and_then(|(_, endpoint)| endpoint.pid());
        let blackhole = ksm.and_then(|(_, endpoint)| endpoint.blackhole());
        if let Some(blackhole) = blackhole {
            blackhole.call("POST", "/reset")?;
        }
        let cpu = |pid: Option<u32>| pid.and_then(procfs::cpu_seconds);
        let before = (
            cpu(ksm_pid),
            cpu(Some(broker)),
            procfs::own_cpu_seconds(),
            cpu(endpoint_pid),
        );
        let threads_before = ksm_pid.map(procfs::thread_cpu_seconds).unwrap_or_default();
        let started = Instant::now();
        let first = poll_until(started)?;
        let last = poll_until(started + Duration::from_secs_f64(self.options.seconds))?;
        let elapsed = started.elapsed().as_secs_f64();
        let after = (
            cpu(ksm_pid),
            cpu(Some(broker)),
            procfs::own_cpu_seconds(),
            cpu(endpoint_pid),
        );
        let ksm_threads = ksm_pid
            .map(|pid| busiest_threads(pid, &threads_before, elapsed))
            .unwrap_or_default();
        let records = (last - first) as f64;
        let share = |b: Option<f64>, a: Option<f64>| Some((a? - b?) / elapsed);
        let ksm_cores = share(before.0, after.0);
        let stats = blackhole.map(Blackhole::stats).transpose()?;
        Ok(Run {
            records_per_sec: records / elapsed,
            mb_per_sec: stats.as_ref().map(|s| s.data_bytes as f64 / elapsed / 1e6),
            latency_ms: stats
                .as_ref()
                .filter(|s| s.latency_samples > 0)
                .map(|s| (s.p50_us as f64 / 1e3, s.p99_us as f64 / 1e3)),
            ksm_us_per_record: ksm_cores.map(|cores| cores * elapsed / records * 1e6),
            ksm_cores,
            broker_cores: share(before.1, after.1).unwrap_or_default(),
            loadgen_cores: (after.2 - before.2) / elapsed,
            endpoint_cores: share(before.3, after.3),
            ksm_threads,
            blackhole: stats,
            window_secs: elapsed,
            ..Run::default()
        })
    }
}

/// Starts a blackhole process on `port` with `shards` shards answering `PutRecords` after
/// `delay`, its log in `dir`, and names it for reports (its shards when they are not
/// `options.shards`).
fn start_blackhole(
    dir: &Path,
    port: u16,
    shards: u32,
    delay: Duration,
    options: &Options,
) -> anyhow::Result<Blackhole> {
    let mut command = Command::new(std::env::current_exe()?);
    command.args([
        "--blackhole",
        &port.to_string(),
        &shards.to_string(),
        &delay.as_millis().to_string(),
    ]);
    let mut process = ServiceProcess::spawn(
        "blackhole",
        command,
        &dir.join(format!("blackhole-{port}.log")),
        "(it is this bench binary)",
    );
    process.wait_until("listening", || port_accepts(port));
    let mut details = Vec::new();
    if shards != options.shards {
        details.push(format!("{shards} shards"));
    }
    if !delay.is_zero() {
        details.push(format!("{} ms round trip", delay.as_millis()));
    }
    let label = if details.is_empty() {
        "blackhole".to_owned()
    } else {
        format!("blackhole ({})", details.join(", "))
    };
    Ok(Blackhole {
        process,
        port,
        label,
    })
}

/// A running ksm.
struct Ksm {
    process: ServiceProcess,
    pid: u32,
    admin: AdminClient,
    startup_ms: f64,
    /// CPU seconds it had used when it became ready.
    cpu_at_ready: Option<f64>,
}

impl Ksm {
    fn summary(&self) -> anyhow::Result<ModuleSummary> {
        let modules: Vec<ModuleSummary> =
            serde_json::from_str(&self.admin.call("GET", "/api/modules")?)?;
        modules
            .into_iter()
            .find(|m| m.id == MODULE)
            .context("the bench module is listed")
    }

    fn forwarded(&self) -> anyhow::Result<u64> {
        Ok(self.summary()?.counters.forwarded)
    }

    fn progress(&self) -> anyhow::Result<Progress> {
        let counters = self.summary()?.counters;
        Ok(Progress {
            taken: counters.received,
            delivered_records: counters.forwarded,
        })
    }

    /// CPU seconds used since it became ready.
    fn cpu_since_ready(&self) -> Option<f64> {
        Some(procfs::cpu_seconds(self.pid)? - self.cpu_at_ready?)
    }

    /// Waits up to `timeout` until it has forwarded `records` records.
    fn wait_until_forwarded(&self, records: u64, timeout: Duration) -> anyhow::Result<()> {
        wait_until(timeout, || self.forwarded().is_ok_and(|f| f >= records)).with_context(|| {
            format!(
                "ksm forwarded {:?} of {records} records; its log: {}",
                self.forwarded(),
                self.process.log_path().display()
            )
        })
    }

    /// Fails unless it forwarded exactly `records` records and dead-lettered none.
    fn check_forwarded_exactly(&self, records: u64) -> anyhow::Result<()> {
        let counters = self.summary()?.counters;
        let (forwarded, dead) = (counters.forwarded, counters.dead_lettered);
        if forwarded != records || dead != 0 {
            bail!("published {records} records; ksm forwarded {forwarded}, dead-lettered {dead}");
        }
        Ok(())
    }
}

/// How long ksm may take to forward a `backlog` left when publishing stopped: twice the time
/// it takes at `rate` (records/s, as the window measured), plus [`DRAIN_TIMEOUT`].
fn drain_timeout(backlog: u64, rate: f64) -> Duration {
    let at_rate = if rate > 0.0 {
        2.0 * backlog as f64 / rate
    } else {
        0.0
    };
    DRAIN_TIMEOUT + Duration::from_secs_f64(at_rate)
}

/// The threads of process `pid` that used at least 1 % of a core since `before` (CPU seconds
/// per thread name), `elapsed` seconds ago, busiest first, with the cores each used.
fn busiest_threads(pid: u32, before: &BTreeMap<String, f64>, elapsed: f64) -> Vec<(String, f64)> {
    let mut threads: Vec<(String, f64)> = procfs::thread_cpu_seconds(pid)
        .into_iter()
        .map(|(name, seconds)| {
            let before = before.get(&name).copied().unwrap_or(0.0);
            (name, (seconds - before) / elapsed)
        })
        .filter(|(_, cores)| *cores >= 0.01)
        .collect();
    threads.sort_by(|a, b| b.1.total_cmp(&a.1));
    threads
}

/// The last lines of a log.
fn log_tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            bail!("not done within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Creates the bench stream on an emulator, with 32 shards: ksm paces each under Kinesis's
/// 1000 records/s, well above what the emulator takes.
fn create_stream(endpoint: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = ksm_tests::kinesis_client(endpoint).await;
        if client
            .describe_stream_summary()
            .stream_name(STREAM)
            .send()
            .await
            .is_err()
        {
            ksm_tests::create_stream(&client, STREAM, 32).await;
        }
    });
    Ok(())
}

fn print_report(rig: &Rig, build: &str, cold_start_ms: f64, report: &Report) {
    let options = &rig.options;
    let opt = |value: Option<f64>, digits: usize| {
        value.map_or_else(|| "–".to_owned(), |v| format!("{v:.digits$}"))
    };
    println!();
    println!(
        "ksm e2e bench, {build}; {} s measured after {} s warm-up per run; {} publishers, {} devices, \
         blackhole with {} shards, closed-loop window {} records",
        options.seconds,
        options.warmup,
        options.publishers,
        options.devices,
        options.shards,
        options.window
    );
    println!(
        "ksm {}: the host's defaults (no [kinesis] section) but {}; round trip {} ms for the \
         blackhole case, {} ms for the cases that model a deployment; drains of {:?} records",
        rig.ksm.display(),
        rig.ksm_settings(),
        options.rtt(Case::Blackhole).as_millis(),
        options.rtt(Case::Drain).as_millis(),
        options.drain_records,
    );
    println!("start-up with the component compiled afresh: {cold_start_ms:.0} ms");
    println!();
    println!(
        "| run | records/s | MB/s | latency p50 / p99 ms | ksm µs CPU/record | ksm cores | broker cores | load-gen cores | endpoint cores | ksm peak RSS MB | ksm start-up ms (cached) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for run in &report.runs {
        println!(
            "| {} | {:.0} | {} | {} | {} | {} | {:.2} | {:.2} | {} | {} | {} |",
            run.what,
            run.records_per_sec,
            opt(run.mb_per_sec, 1),
            run.latency_ms.map_or_else(
                || "–".to_owned(),
                |(p50, p99)| format!("{p50:.1} / {p99:.1}")
            ),
            opt(run.ksm_us_per_record, 2),
            opt(run.ksm_cores, 2),
            run.broker_cores,
            run.loadgen_cores,
            opt(run.endpoint_cores, 2),
            opt(run.peak_rss_mb, 0),
            opt(run.startup_ms, 0),
        );
    }
    if !report.findings.is_empty() {
        println!();
        for finding in &report.findings {
            println!("- {finding}");
        }
    }
    for table in &report.tables {
        println!();
        println!("{table}");
    }
    println!();
    println!("ksm's threads, cores each (tokio-rt-worker: all of Tokio's workers together):");
    for run in report.runs.iter().filter(|run| !run.ksm_threads.is_empty()) {
        let threads: Vec<String> = run
            .ksm_threads
            .iter()
            .map(|(name, cores)| format!("{name} {cores:.2}"))
            .collect();
        println!("- {}: {}", run.what, threads.join(", "));
    }
}
