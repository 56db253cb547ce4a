//! The command line (DESIGN §2): one file per command. [`run`] dispatches and returns the
//! exit code each command documents.

pub mod audit;
pub mod check;
pub mod explain;
pub mod keygen;
pub mod keygen_certs;
pub mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Default `--config`.
pub const DEFAULT_CONFIG: &str = "config/credbroker.toml";

#[derive(Debug, Parser)]
#[command(
    name = "credbroker",
    version,
    about = "Credential brokering proxy: scoped short-lived tokens in, real credentials injected, every use audited"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args, Clone)]
pub struct ConfigArg {
    /// The configuration file.
    #[arg(long, global = true, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker.
    Serve(serve::ServeArgs),
    /// Validate the config and lint it for governance problems (exit 1 on errors).
    Check(ConfigArg),
    /// Would the current config let a client make this call? (0 allow, 1 deny, 2 bad input)
    Explain(explain::ExplainArgs),
    /// Verify, query and report on audit logs.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Generate keys and secrets.
    #[command(subcommand)]
    Keygen(keygen::KeygenCommand),
}

/// Runs a parsed command line; the error case is exit 2 with the message on stderr.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Check(args) => Ok(check::run(&args.config)),
        Command::Explain(args) => Ok(explain::run(&args)),
        Command::Audit(cmd) => audit::run(cmd),
        Command::Keygen(cmd) => keygen::run(cmd),
    }
}
