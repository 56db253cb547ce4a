//! `credbroker audit verify | query | report` (DESIGN §2): thin glue over [`crate::audit`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use crate::audit::{self, Decision, Event, GrantInfo, QueryFilter};
use crate::config::Config;
use crate::secret::{Secret, SecretRef};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the hash chain of audit files given in chain order (exit 0 intact, 1 broken).
    Verify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Take the HMAC key from this config's audit.hmac_key.
        #[arg(long, conflicts_with = "hmac_key")]
        config: Option<PathBuf>,
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
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Verify {
            files,
            config,
            hmac_key,
        } => verify(&files, config.as_deref(), hmac_key.as_deref()),
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
            audit::run_query(&files, &filter, json, &mut out)?;
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Report {
            files,
            config,
            json,
        } => {
            let grants = match config {
                Some(path) => grants_of(&Config::load(&path)?),
                None => Vec::new(),
            };
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            audit::run_report(&files, &grants, json, &mut out)?;
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn parse_event(s: &str) -> anyhow::Result<Event> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| anyhow::anyhow!("unknown event `{s}`"))
}

fn verify(
    files: &[PathBuf],
    config: Option<&Path>,
    hmac_key: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let key: Option<Secret> = match (config, hmac_key) {
        (Some(path), _) => Config::load(path)?.audit.hmac_key,
        // A relative file: reference is relative to the current directory here.
        (None, Some(r)) => Some(SecretRef::parse(r, Path::new("."))?.resolve()?),
        (None, None) => None,
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
