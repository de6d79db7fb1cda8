//! End-to-end benchmark: Mosquitto, a Kinesis endpoint and the `ksm` binary on loopback,
//! driven by QoS 1 publishers; prints records/s, MB/s, publish-to-`PutRecords` latency,
//! ksm's CPU per record, every process's CPU share and ksm's peak memory.
//!
//! ```text
//! cargo bench -p ksm-tests --bench e2e                    # full run, release build
//! cargo bench -p ksm-tests --bench e2e -- --seconds 3     # shorter windows
//! cargo bench -p ksm-tests --bench e2e -- --only bulk     # one shape
//! ```
//!
//! For each shape (events; bulk of 100 × 200 B) it runs, each on a freshly started ksm:
//! 1. the **baseline**: the same publishers against a subscriber that only acknowledges and
//!    counts, so the broker and load generator's own ceiling is known in the same run;
//! 2. ksm against the **blackhole** endpoint (bench-only; `ksm_tests::blackhole`) in a closed
//!    loop, for ksm's maximum;
//! 3. ksm against the blackhole in an open loop at half that maximum, for latency;
//!
//! then ksm against **kinesalite** (a real emulator) for events in a closed loop, to show
//! which process saturates there. Every run checks that every published record was
//! forwarded, none dead-lettered. `BENCHMARKS.md` explains the method and keeps the figures.

mod load;
mod procfs;
mod wire;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
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
/// Longest wait for ksm to forward what was published once publishing stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

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
                return Ok(Mode::Blackhole { port, shards });
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
            other => bail!(
                "unknown argument `{other}`; options: --seconds S --warmup S --publishers N \
                 --devices N --shards N --window RECORDS --only events|bulk --no-kinesalite"
            ),
        }
    }
    Ok(Mode::Bench(options))
}

/// What this process was asked to do.
enum Mode {
    Bench(Options),
    /// Serve the blackhole endpoint (the bench starts itself in this mode).
    Blackhole {
        port: u16,
        shards: u32,
    },
}

fn main() -> anyhow::Result<()> {
    match parse_args()? {
        Mode::Blackhole { port, shards } => {
            let listener = TcpListener::bind(("127.0.0.1", port))?;
            BlackholeKinesis::new(shards).serve(listener)?;
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
}

fn bench(options: &Options) -> anyhow::Result<()> {
    let build = if cfg!(debug_assertions) {
        "dev build: figures are not representative; use `cargo bench`"
    } else {
        "release build"
    };
    eprintln!("ksm e2e bench ({build}); options {options:?}");
    let rig = Rig::start(options)?;
    let mut runs = Vec::new();
    let shapes = match options.only {
        Some(shape) => vec![shape],
        None => vec![Shape::Events, Shape::Bulk],
    };
    // Baselines first: once ksm has connected, its persistent session is subscribed and the
    // broker would queue the baseline's messages for it too.
    for &shape in &shapes {
        runs.push(rig.baseline(shape)?);
    }
    let cold_start = rig.cold_start()?;
    for shape in shapes {
        let max = rig.ksm_run(
            shape,
            Endpoint::Blackhole,
            Pace::Closed {
                window: options.window,
            },
        )?;
        let half = max.records_per_sec / 2.0 / shape.records_per_message() as f64;
        runs.push(max);
        runs.push(rig.ksm_run(shape, Endpoint::Blackhole, Pace::Open { per_sec: half })?);
    }
    if !options.no_kinesalite && options.only != Some(Shape::Bulk) {
        let kinesalite = Kinesalite::start();
        runs.push(rig.ksm_run(
            Shape::Events,
            Endpoint::Kinesalite(&kinesalite),
            Pace::Closed {
                window: options.window,
            },
        )?);
    }
    print_report(options, build, cold_start, &runs);
    Ok(())
}

/// Where ksm puts records.
enum Endpoint<'a> {
    Blackhole,
    Kinesalite(&'a Kinesalite),
}

/// The broker, the blackhole, ksm's files, for every run.
struct Rig {
    options: Options,
    broker: Mosquitto,
    blackhole: ServiceProcess,
    blackhole_port: u16,
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
        let blackhole_port = free_port();
        let mut command = Command::new(std::env::current_exe()?);
        command.args([
            "--blackhole",
            &blackhole_port.to_string(),
            &options.shards.to_string(),
        ]);
        let mut blackhole = ServiceProcess::spawn(
            "blackhole",
            command,
            &dir.path().join("blackhole.log"),
            "(it is this bench binary)",
        );
        blackhole.wait_until("listening", || port_accepts(blackhole_port));
        Ok(Rig {
            options: options.clone(),
            broker,
            blackhole,
            blackhole_port,
            guest,
            ksm,
            dir,
        })
    }

    fn blackhole_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.blackhole_port)
    }

    fn blackhole_call(&self, method: &str, path: &str) -> anyhow::Result<String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.blackhole_port));
        Ok(AdminClient::new(addr).call(method, path)?)
    }

    fn blackhole_stats(&self) -> anyhow::Result<BlackholeStats> {
        Ok(serde_json::from_str(
            &self.blackhole_call("GET", "/stats")?,
        )?)
    }

    /// Starts ksm with the component compiled afresh (an empty cache), then stops it.
    fn cold_start(&self) -> anyhow::Result<f64> {
        let _ = std::fs::remove_dir_all(self.dir.path().join("store/component-cache"));
        let mut ksm = self.start_ksm(&self.blackhole_endpoint())?;
        ksm.process.terminate(Duration::from_secs(10));
        Ok(ksm.startup_ms)
    }

    fn start_ksm(&self, endpoint: &str) -> anyhow::Result<Ksm> {
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

[[modules]]
id = "{MODULE}"
subscribe_events = ["{event}"]
bulk_data_label = "{label}"
region = "us-east-1"
stream_name = "{STREAM}"
"#,
            broker = self.broker.url(),
            guest = self.guest.display(),
            storage = self.dir.path().join("store").display(),
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
            if started.elapsed() > Duration::from_secs(60) {
                bail!("ksm did not become healthy in 60 s; see {}", process.log());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(Ksm {
            startup_ms: started.elapsed().as_secs_f64() * 1000.0,
            pid: process.pid().context("ksm is running")?,
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
        );
        let measured = self.measure(&load, None, || Ok(subscriber.progress(shape)))?;
        let published = load.stop()? * shape.records_per_message();
        let drained = wait_until(DRAIN_TIMEOUT, || subscriber.records() >= published);
        let received = subscriber.records();
        subscriber.stop()?;
        drained.with_context(|| {
            format!(
                "the baseline got {received} of {published} records; the broker's log ends:\n{}",
                log_tail(&self.broker.log())
            )
        })?;
        Ok(Run {
            what: format!("{}: broker only (baseline)", shape.name()),
            ..measured
        })
    }

    fn ksm_run(&self, shape: Shape, endpoint: Endpoint<'_>, pace: Pace) -> anyhow::Result<Run> {
        let (url, endpoint_pid, name) = match endpoint {
            Endpoint::Blackhole => (self.blackhole_endpoint(), self.blackhole.pid(), "blackhole"),
            Endpoint::Kinesalite(kinesalite) => {
                create_stream(&kinesalite.endpoint())?;
                (kinesalite.endpoint(), kinesalite.pid(), "kinesalite")
            }
        };
        let mut ksm = self.start_ksm(&url)?;
        let load = self.load(shape, pace);
        let is_blackhole = name == "blackhole";
        let mut measured = self.measure(&load, Some((&ksm, endpoint_pid, is_blackhole)), || {
            ksm.progress()
        })?;
        let published = load.stop()? * shape.records_per_message();
        wait_until(DRAIN_TIMEOUT, || {
            ksm.forwarded().is_ok_and(|f| f >= published)
        })
        .with_context(|| format!("ksm forwarded {:?} of {published} records", ksm.forwarded()))?;
        let summary = ksm.summary()?;
        let (forwarded, dead) = (summary.counters.forwarded, summary.counters.dead_lettered);
        if forwarded != published || dead != 0 {
            bail!("published {published} records; ksm forwarded {forwarded}, dead-lettered {dead}");
        }
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
        Ok(Run {
            what: format!("{}: ksm → {name}, {pace}", shape.name()),
            ..measured
        })
    }

    fn load(&self, shape: Shape, pace: Pace) -> Load {
        Load::start(
            self.broker.port(),
            shape,
            pace,
            self.options.publishers,
            self.options.devices,
        )
    }

    /// Warms up, then measures one window while telling closed-loop publishers what
    /// `progress` says.
    fn measure(
        &self,
        load: &Load,
        ksm: Option<(&Ksm, Option<u32>, bool)>,
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
        let ksm_pid = ksm.map(|(k, _, _)| k.pid);
        let endpoint_pid = ksm.and_then(|(_, pid, _)| pid);
        let with_blackhole = ksm.is_some_and(|(_, _, b)| b);
        if with_blackhole {
            self.blackhole_call("POST", "/reset")?;
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
        let mut ksm_threads: Vec<(String, f64)> = ksm_pid
            .map(procfs::thread_cpu_seconds)
            .unwrap_or_default()
            .into_iter()
            .map(|(name, seconds)| {
                let before = threads_before.get(&name).copied().unwrap_or(0.0);
                (name, (seconds - before) / elapsed)
            })
            .filter(|(_, cores)| *cores >= 0.01)
            .collect();
        ksm_threads.sort_by(|a, b| b.1.total_cmp(&a.1));
        let records = (last - first) as f64;
        let share = |b: Option<f64>, a: Option<f64>| Some((a? - b?) / elapsed);
        let ksm_cores = share(before.0, after.0);
        let stats = if with_blackhole {
            Some(self.blackhole_stats()?)
        } else {
            None
        };
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
            ..Run::default()
        })
    }
}

/// A running ksm.
struct Ksm {
    process: ServiceProcess,
    pid: u32,
    admin: AdminClient,
    startup_ms: f64,
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

fn print_report(options: &Options, build: &str, cold_start_ms: f64, runs: &[Run]) {
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
    println!("start-up with the component compiled afresh: {cold_start_ms:.0} ms");
    println!();
    println!(
        "| run | records/s | MB/s | latency p50 / p99 ms | ksm µs CPU/record | ksm cores | broker cores | load-gen cores | endpoint cores | ksm peak RSS MB | ksm start-up ms (cached) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for run in runs {
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
    println!();
    println!("ksm's threads, cores each (tokio-rt-worker: all of Tokio's workers together):");
    for run in runs.iter().filter(|run| !run.ksm_threads.is_empty()) {
        let threads: Vec<String> = run
            .ksm_threads
            .iter()
            .map(|(name, cores)| format!("{name} {cores:.2}"))
            .collect();
        println!("- {}: {}", run.what, threads.join(", "));
    }
}
