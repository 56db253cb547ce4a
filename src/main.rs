//! The `credbroker` binary: parse the command line, run the command, choose the exit code.
//! Every command's logic lives in the library (`credbroker::cli`).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = credbroker::cli::Cli::parse();
    match credbroker::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("credbroker: {e:#}");
            ExitCode::from(2)
        }
    }
}
