//! `credbroker audit verify | query | report` (DESIGN §2): thin glue over [`crate::audit`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use super::ConfigPath;
use crate::audit::{self, Decision, Event, GrantInfo, QueryFilter};
use crate::config::Config;
use crate::secret::{Secret, SecretRef};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the hash chain of audit files given in chain order (exit 0 intact, 1 broken).
    Verify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The HMAC key as a secret reference (env:NAME, file:PATH, literal:VALUE).
        #[arg(long)]
        hmac_key: Option<String>,
    },
    /// Filter records: a table by default, JSON lines with --json.
    Query {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        client: Option<String>,
        #[arg(long)]
        connector: Option<String>,
        #[arg(long, value_parser = ["allow", "deny"])]
        decision: Option<String>,
        #[arg(long)]
        event: Option<String>,
        /// RFC 3339 or a relative duration such as 1h, 7d.
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Per connector and client: calls, denials, first/last use, unused grants.
    Report {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: AuditCommand, config: &ConfigPath) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Verify { files, hmac_key } => verify(&files, config, hmac_key.as_deref()),
        AuditCommand::Query {
            files,
            client,
            connector,
            decision,
            event,
            since,
            until,
            json,
        } => {
            let now = chrono::Utc::now();
            let filter = QueryFilter {
                client,
                connector,
                decision: decision.map(|d| {
                    if d == "allow" {
                        Decision::Allow
                    } else {
                        Decision::Deny
                    }
                }),
                event: event.map(|e| parse_event(&e)).transpose()?,
                since: since
                    .map(|s| audit::parse_time(&s, now))
                    .transpose()
                    .context("--since")?,
                until: until
                    .map(|s| audit::parse_time(&s, now))
                    .transpose()
                    .context("--until")?,
            };
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let written = audit::run_query(&files, &filter, json, &mut out)
                .map(|_| ())
                .map_err(anyhow::Error::from)
                .and_then(|()| out.flush().map_err(anyhow::Error::from));
            ok_on_broken_pipe(written)?;
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Report { files, json } => {
            let grants = optional_config(config)?
                .map(|c| grants_of(&c))
                .unwrap_or_default();
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let written = audit::run_report(&files, &grants, json, &mut out)
                .map_err(anyhow::Error::from)
                .and_then(|()| out.flush().map_err(anyhow::Error::from));
            ok_on_broken_pipe(written)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn parse_event(s: &str) -> anyhow::Result<Event> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| anyhow::anyhow!("unknown event `{s}`"))
}

/// A reader stopping early (`| head`) is not an error of the command.
fn ok_on_broken_pipe(result: anyhow::Result<()>) -> anyhow::Result<()> {
    match result {
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) || format!("{e:#}").contains("Broken pipe") =>
        {
            Ok(())
        }
        other => other,
    }
}

/// The config for commands where it only adds information: an explicit `--config` must load;
/// the default file is used when present and valid, and otherwise skipped with a note.
fn optional_config(config: &ConfigPath) -> anyhow::Result<Option<Config>> {
    if config.explicit {
        return Ok(Some(Config::load(&config.path)?));
    }
    if !config.path.exists() {
        return Ok(None);
    }
    match Config::load(&config.path) {
        Ok(c) => Ok(Some(c)),
        Err(e) => {
            eprintln!(
                "note: not using {} (it does not load: {e}); pass --config to choose one",
                config.path.display()
            );
            Ok(None)
        }
    }
}

fn verify(
    files: &[PathBuf],
    config: &ConfigPath,
    hmac_key: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let key: Option<Secret> = match hmac_key {
        Some(_) if config.explicit => {
            anyhow::bail!("give either --config or --hmac-key, not both")
        }
        // A relative file: reference is relative to the current directory here.
        Some(r) => Some(SecretRef::parse(r, Path::new("."))?.resolve()?),
        None => optional_config(config)?.and_then(|c| c.audit.hmac_key),
    };
    match audit::verify_files(files, key.as_ref()) {
        Ok(report) => match &report.failure {
            None => {
                let last = report
                    .last
                    .as_ref()
                    .map(|(seq, hash)| format!("; last record seq {seq}, hash {hash}"))
                    .unwrap_or_default();
                println!("intact: {} records{last}", report.records);
                Ok(ExitCode::SUCCESS)
            }
            Some(failure) => {
                println!(
                    "broken: {failure} ({} records verified before it)",
                    report.records
                );
                Ok(ExitCode::from(1))
            }
        },
        Err(e) => {
            println!("cannot verify: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

/// Every (client, connector, operation) the config grants, for the least-privilege report.
pub fn grants_of(config: &Config) -> Vec<GrantInfo> {
    config
        .clients
        .iter()
        .flat_map(|c| {
            c.grants.iter().flat_map(move |g| {
                g.operations.iter().map(move |op| GrantInfo {
                    client: c.id.clone(),
                    connector: g.connector.clone(),
                    operation: op.clone(),
                    expires: g.expires.map(|e| e.to_rfc3339()),
                    reason: g.reason.clone(),
                })
            })
        })
        .collect()
}
