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

use clap::{Parser, Subcommand};

/// Default `--config`.
pub const DEFAULT_CONFIG: &str = "config/credbroker.toml";

#[derive(Debug, Parser)]
#[command(
    name = "credbroker",
    version,
    about = "Credential brokering proxy: scoped short-lived tokens in, real credentials injected, every use audited"
)]
pub struct Cli {
    /// The configuration file (every command takes it; default config/credbroker.toml).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// `--config` as given, or the default, and whether it was given.
#[derive(Clone, Debug)]
pub struct ConfigPath {
    pub path: PathBuf,
    pub explicit: bool,
}

impl ConfigPath {
    fn from_arg(arg: Option<PathBuf>) -> Self {
        match arg {
            Some(path) => Self {
                path,
                explicit: true,
            },
            None => Self {
                path: PathBuf::from(DEFAULT_CONFIG),
                explicit: false,
            },
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker.
    Serve(serve::ServeArgs),
    /// Validate the config and lint it for governance problems (exit 1 on errors).
    Check,
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
    let config = ConfigPath::from_arg(cli.config);
    match cli.command {
        Command::Serve(args) => serve::run(args, &config),
        Command::Check => Ok(check::run(&config.path)),
        Command::Explain(args) => Ok(explain::run(&args, &config.path)),
        Command::Audit(cmd) => audit::run(cmd, &config),
        // Keys and secrets do not depend on a config; `--config` is accepted and unused.
        Command::Keygen(cmd) => keygen::run(cmd),
    }
}

/// An error and its causes on one line, each cause once: most of our errors already quote
/// their cause (`cannot use certificate …: KeyMismatch`), and anyhow's `{:#}` would repeat it.
pub fn describe(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

#[cfg(test)]
mod describe_tests {
    /// An error that quotes its source in its own message, as most of ours do.
    #[derive(Debug)]
    struct Quoting(std::io::Error);

    impl std::fmt::Display for Quoting {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "cannot write x: {}", self.0)
        }
    }

    impl std::error::Error for Quoting {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn each_cause_is_told_once() {
        let quoted = anyhow::Error::new(Quoting(std::io::Error::other("disk on fire")))
            .context("saving state");
        assert_eq!(
            format!("{quoted:#}"),
            "saving state: cannot write x: disk on fire: disk on fire",
            "what anyhow alone prints"
        );
        assert_eq!(
            super::describe(&quoted),
            "saving state: cannot write x: disk on fire"
        );
        let plain = anyhow::anyhow!("root cause").context("outer");
        assert_eq!(super::describe(&plain), "outer: root cause");
    }
}
