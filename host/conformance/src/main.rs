//! `ksm-conformance GUEST.wasm`: runs the built-in conformance cases (or
//! `--cases DIR`) against a smart-module component, through ksm's runtime
//! and sandbox, and reports each case, the guest's cost per call kind and a
//! summary; exits non-zero if a case that applies failed.

use std::process::ExitCode;

use clap::Parser;

/// Checks a ksm guest component against the smart-module contract.
#[derive(Parser)]
#[command(name = "ksm-conformance", version)]
struct Cli {
    #[command(flatten)]
    options: ksm_conformance::Options,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match ksm_conformance::run(&cli.options, &mut std::io::stdout().lock()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("ksm-conformance: {e}");
            ExitCode::from(2)
        }
    }
}
