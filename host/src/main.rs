//! `ksm`: run the Kinesis Smart Module host, validate its configuration,
//! encode bulk data payloads and check guest components for conformance.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ksm_host::config::{Config, ConfigError};
use ksm_host::runtime::{GuestLimits, Runtime};

/// Deadline of one guest call during `ksm conformance`.
const CONFORMANCE_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Parser)]
#[command(
    name = "ksm",
    version,
    about = "Forward MODE device data from MQTT to Amazon Kinesis"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the host: connect to the broker and forward data to Kinesis.
    Run {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration file and list every problem in it; also check
    /// that the component loads.
    Validate {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Bulk data payloads.
    Bulk {
        #[command(subcommand)]
        command: BulkCommand,
    },
    /// Run the conformance cases against a guest component.
    Conformance {
        /// The component (.wasm) to check.
        component: PathBuf,
        /// Directory of cases (default: the cases built into ksm).
        #[arg(long)]
        cases: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum BulkCommand {
    /// Write the bulk data payload holding each file as one record to stdout.
    Encode {
        /// Files, one record each, in order.
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run { config } => {
            init_tracing();
            let config = Config::load(&config)?;
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            runtime.block_on(ksm_host::run(config, shutdown_signal()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { config: path } => match Config::load(&path) {
            Ok(config) => {
                // The settings are valid; the component must load and fit the world too.
                if let Err(error) = Runtime::load(&config.component.path) {
                    eprintln!("{}:\n  - component.path: {error}", path.display());
                    return Ok(ExitCode::FAILURE);
                }
                println!(
                    "{}: valid ({} module(s), {} device(s))",
                    path.display(),
                    config.modules.len(),
                    config.devices.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(error @ (ConfigError::Invalid { .. } | ConfigError::Parse { .. })) => {
                eprintln!("{error}");
                Ok(ExitCode::FAILURE)
            }
            Err(error) => Err(error.into()),
        },
        Command::Bulk {
            command: BulkCommand::Encode { files },
        } => {
            let records = files
                .iter()
                .map(|path| {
                    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
                })
                .collect::<Result<Vec<_>>>()?;
            let payload = ksm_host::bulk::encode(&records);
            std::io::stdout()
                .lock()
                .write_all(&payload)
                .context("cannot write to stdout")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Conformance { component, cases } => conformance(&component, cases.as_deref()),
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KSM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM can be handled");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

/// Runs the conformance cases against a component; fails if any case fails.
fn conformance(component: &std::path::Path, cases: Option<&std::path::Path>) -> Result<ExitCode> {
    use ksm_host::conformance;
    // Conformance checks what a guest does, not how fast: a generous deadline
    // keeps a loaded machine from failing cases.
    let limits = GuestLimits {
        call_timeout: CONFORMANCE_CALL_TIMEOUT,
        ..GuestLimits::default()
    };
    let runtime = Runtime::load_with(component, limits)?;
    let dir = cases.map_or_else(conformance::default_cases_dir, std::path::Path::to_owned);
    let cases = conformance::load_cases(&dir)?;
    let report = conformance::run_all(&runtime, &cases);
    println!("{report}");
    Ok(if report.all_passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
