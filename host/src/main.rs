//! `ksm`: run the Kinesis Smart Module host, validate its configuration,
//! manage dead letters, encode bulk data payloads and check guest components
//! for conformance.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ksm_host::config::{Config, ConfigError};
use ksm_host::runtime::Runtime;

/// mimalloc gives freed memory back to the operating system, so ksm's
/// memory follows what it holds; glibc keeps the big blocks large messages
/// leave behind.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// List, inspect, replay or purge a module's dead letters (through the
    /// admin API of the running host).
    DeadLetters {
        #[command(subcommand)]
        command: DeadLetterCommand,
        /// Configuration file of the running host (for its admin address).
        #[arg(long, short, global = true, conflicts_with = "admin")]
        config: Option<PathBuf>,
        /// Admin API address of the running host, e.g. 127.0.0.1:8686.
        #[arg(long, global = true)]
        admin: Option<std::net::SocketAddr>,
    },
    /// Run the conformance cases against a guest component (as
    /// `ksm-conformance` does).
    Conformance(ksm_conformance::Options),
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// One line per dead letter: ID, time, topic, reason and data size.
    List {
        /// Module ID.
        module: String,
        /// Print each dead letter as the admin API lists it (JSON, one per
        /// line; data omitted from a page comes without `data_base64`).
        #[arg(long)]
        json: bool,
    },
    /// One dead letter in full, its data decoded when it is text.
    Show {
        /// Module ID.
        module: String,
        /// Dead-letter ID.
        id: u64,
    },
    /// Send dead letters through the module again (after fixing the cause);
    /// each is deleted once its data is safe, or comes back with a new ID.
    Replay {
        /// Module ID.
        module: String,
        /// Dead-letter IDs (default: all).
        ids: Vec<u64>,
    },
    /// Delete dead letters.
    Purge {
        /// Module ID.
        module: String,
        /// Dead-letter IDs.
        #[arg(required_unless_present = "all")]
        ids: Vec<u64>,
        /// Delete all of the module's dead letters.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
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
                // The settings are valid; every component must load and fit the world too.
                let mut components: Vec<(String, PathBuf)> =
                    vec![("component.path".into(), config.component.path.clone())];
                for (i, module) in config.modules.iter().enumerate() {
                    if let Some(own) = &module.component {
                        components.push((format!("modules[{i}].component"), own.clone()));
                    }
                }
                let mut failed = false;
                for (field, component) in components {
                    if let Err(error) = Runtime::load(&component) {
                        eprintln!("{}:\n  - {field}: {error}", path.display());
                        failed = true;
                    }
                }
                for finding in
                    ksm_host::preflight::check(&config, &path, time::OffsetDateTime::now_utc())
                {
                    eprintln!("{}: {finding}", path.display());
                    failed |= finding.severity == ksm_host::preflight::Severity::Error;
                }
                if failed {
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
        Command::Conformance(options) => conformance(&options),
        Command::DeadLetters {
            command,
            config,
            admin,
        } => dead_letters(command, config.as_deref(), admin),
    }
}

/// Runs a `ksm dead-letters` command against the running host.
fn dead_letters(
    command: DeadLetterCommand,
    config: Option<&std::path::Path>,
    admin: Option<std::net::SocketAddr>,
) -> Result<ExitCode> {
    use ksm_host::admin::DeadLetterCount;
    use ksm_host::admin_client::AdminClient;
    use ksm_host::dead_letter::ListedLetter;

    // The address, token and TLS of the config's API; the token of the
    // environment for an address given alone.
    let admin_config = match (admin, config) {
        (Some(listen), _) => ksm_host::config::AdminConfig {
            listen,
            ..Default::default()
        },
        (None, Some(path)) => Config::load(path)?.admin,
        (None, None) => ksm_host::config::AdminConfig::default(),
    };
    let client = AdminClient::for_config(&admin_config).map_err(anyhow::Error::msg)?;
    // `?ids=1,2`, or nothing for all of them.
    let ids_query = |ids: &[u64]| {
        if ids.is_empty() {
            return String::new();
        }
        let list: Vec<String> = ids.iter().map(u64::to_string).collect();
        format!("?ids={}", list.join(","))
    };
    let mut out = std::io::stdout().lock();
    match command {
        DeadLetterCommand::List { module, json } => {
            let mut after = 0;
            loop {
                let body = client.call(
                    "GET",
                    &format!(
                        "/api/modules/{module}/dead-letters?after={after}&limit={DEAD_LETTER_LIST_PAGE}"
                    ),
                )?;
                let page: Vec<ListedLetter> =
                    serde_json::from_str(&body).context("unexpected answer from the admin API")?;
                let Some(last) = page.last() else { break };
                after = last.id;
                for letter in &page {
                    if json {
                        writeln!(out, "{}", serde_json::to_string(letter)?)?;
                    } else {
                        let details = &letter.details;
                        // One line per letter, whatever a topic or reason holds.
                        let field = |text: &str| text.replace(char::is_control, " ");
                        writeln!(
                            out,
                            "{}\t{}\t{}\t{}\t{} bytes",
                            letter.id,
                            details.time,
                            field(&details.topic),
                            field(&details.reason),
                            letter.data_bytes
                        )?;
                    }
                }
            }
        }
        DeadLetterCommand::Show { module, id } => {
            let body = client.call("GET", &format!("/api/modules/{module}/dead-letters/{id}"))?;
            show_dead_letter(&mut out, &body)?;
        }
        DeadLetterCommand::Replay {
            module,
            ids: chosen,
        } => {
            let body = client.call(
                "POST",
                &format!(
                    "/api/modules/{module}/dead-letters/replay{}",
                    ids_query(&chosen)
                ),
            )?;
            let answer: DeadLetterCount = serde_json::from_str(&body)?;
            writeln!(out, "{} dead letters queued for replay", answer.count)?;
        }
        // `--all` and IDs exclude each other: no IDs means all.
        DeadLetterCommand::Purge {
            module,
            ids: chosen,
            all: _,
        } => {
            let body = client.call(
                "DELETE",
                &format!("/api/modules/{module}/dead-letters{}", ids_query(&chosen)),
            )?;
            let answer: DeadLetterCount = serde_json::from_str(&body)?;
            writeln!(out, "{} dead letters deleted", answer.count)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Dead letters `ksm dead-letters list` asks the admin API for at a time.
const DEAD_LETTER_LIST_PAGE: usize = 100;

/// Prints a dead letter the admin API showed, with its data decoded as
/// text when it is UTF-8. The base64 is borrowed from the answer and the
/// output written as it goes, so only the answer and the decoded data are
/// held.
fn show_dead_letter(out: &mut impl Write, answer: &str) -> Result<()> {
    use base64::Engine as _;
    use ksm_host::dead_letter::Details;
    use std::borrow::Cow;

    #[derive(serde::Deserialize)]
    struct Shown<'a> {
        id: u64,
        #[serde(flatten)]
        details: Details,
        data_bytes: u64,
        #[serde(borrow)]
        data_base64: Cow<'a, str>,
    }
    #[derive(serde::Serialize)]
    struct Printed<'a> {
        id: u64,
        #[serde(flatten)]
        details: &'a Details,
        data_bytes: u64,
        data_base64: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        data_text: Option<&'a str>,
    }
    let shown: Shown<'_> =
        serde_json::from_str(answer).context("unexpected answer from the admin API")?;
    let data = base64::engine::general_purpose::STANDARD
        .decode(shown.data_base64.as_bytes())
        .context("the admin API answered data that is not base64")?;
    let printed = Printed {
        id: shown.id,
        details: &shown.details,
        data_bytes: shown.data_bytes,
        data_base64: &shown.data_base64,
        data_text: std::str::from_utf8(&data).ok(),
    };
    let mut out = std::io::BufWriter::new(out);
    serde_json::to_writer_pretty(&mut out, &printed)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KSM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fjall=warn,lsm_tree=warn"));
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

/// Runs the conformance cases against a component (`ksm_conformance::run`),
/// printing each case's line as it finishes and the summary last; fails if
/// any case that applies fails.
fn conformance(options: &ksm_conformance::Options) -> Result<ExitCode> {
    let passed = ksm_conformance::run(options, &mut std::io::stdout().lock())?;
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
