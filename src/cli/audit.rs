//! `credbroker audit verify | query | report` (DESIGN §2): thin glue over [`crate::audit`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Subcommand;

use super::ConfigPath;
use crate::audit::{self, Decision, Event, GrantInfo, QueryFilter};
use crate::config::AuditorConfig;
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
        /// The oldest files were deleted (retention): accept a chain whose first record has a
        /// seq above 1. Whatever came before that record is not checked.
        #[arg(long)]
        pruned: bool,
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
        AuditCommand::Verify {
            files,
            hmac_key,
            pruned,
        } => verify(&files, config, hmac_key.as_deref(), pruned),
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
            room_for_files(files.len());
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let written = audit::run_query(&files, &filter, json, &mut out)
                .map_err(anyhow::Error::from)
                .and_then(|counts| {
                    out.flush()?;
                    Ok(counts.duplicates)
                });
            say_duplicates(ok_on_broken_pipe(written)?);
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Report { files, json } => {
            let grants = auditor_config(config, false, "the report has no grant findings")?
                .map(|c| grants_of(&c, chrono::Utc::now()));
            room_for_files(files.len());
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let written = audit::run_report(&files, grants.as_deref(), json, &mut out)
                .map_err(anyhow::Error::from)
                .and_then(|duplicates| {
                    out.flush()?;
                    Ok(duplicates)
                });
            say_duplicates(ok_on_broken_pipe(written)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Says on stderr how many copies of records `query` or `report` skipped (a file given twice,
/// an archived copy overlapping the live file), if any: the figures are not what counting the
/// files' lines would give. (`None`: the output's reader went away.)
fn say_duplicates(duplicates: Option<u64>) {
    if let Some(n @ 1..) = duplicates {
        super::serve::say(format_args!(
            "note: skipped {n} duplicate record{} (the same record in more than one of the files given)",
            if n == 1 { "" } else { "s" }
        ));
    }
}

/// `query` and `report` merge their files into one timeline with every file open at once: a
/// long retention set (a thousand rotated files) would pass the common soft limit of 1,024
/// open files. The soft limit is raised toward the hard one, as `serve` does for connections.
fn room_for_files(files: usize) {
    let wanted = u64::try_from(files).unwrap_or(u64::MAX).saturating_add(64);
    if let Err(e) = rlimit::increase_nofile_limit(wanted) {
        super::serve::say(format_args!(
            "warning: cannot raise the open-file limit: {e}"
        ));
    }
}

fn parse_event(s: &str) -> anyhow::Result<Event> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| anyhow::anyhow!("unknown event `{s}`"))
}

/// A reader stopping early (`| head`) is not an error of the command.
fn ok_on_broken_pipe<T>(result: anyhow::Result<T>) -> anyhow::Result<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) || format!("{e:#}").contains("Broken pipe") =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The auditor's part of the config ([`AuditorConfig`]). The file given, or the default one
/// when it exists, must load: falling back to no config would verify a keyed chain as a plain
/// one, which anyone can forge. Only a missing default file means no config, said on stderr
/// with what that leaves out (`without`).
fn auditor_config(
    config: &ConfigPath,
    with_key: bool,
    without: &str,
) -> anyhow::Result<Option<AuditorConfig>> {
    if !config.explicit && !config.path.exists() {
        eprintln!(
            "note: no config at {} ({without}); pass --config to use one",
            config.path.display()
        );
        return Ok(None);
    }
    Ok(Some(AuditorConfig::load(&config.path, with_key)?))
}

fn verify(
    files: &[PathBuf],
    config: &ConfigPath,
    hmac_key: Option<&str>,
    pruned: bool,
) -> anyhow::Result<ExitCode> {
    let key: Option<Secret> = match hmac_key {
        Some(_) if config.explicit => {
            anyhow::bail!("give either --config or --hmac-key, not both")
        }
        // A relative file: reference is relative to the current directory here.
        Some(r) => {
            let key = SecretRef::parse(r, Path::new(""))?.resolve()?;
            anyhow::ensure!(!key.is_empty(), "--hmac-key: the key is empty");
            Some(key)
        }
        None => auditor_config(config, true, "verifying as a plain SHA-256 chain")?
            .and_then(|c| c.hmac_key),
    };
    let opts = audit::VerifyOptions {
        allow_later_start: pruned,
    };
    match audit::verify_files_with(files, key.as_ref(), opts) {
        Ok(report) => {
            println!("{report}");
            Ok(ExitCode::from(u8::from(!report.is_intact())))
        }
        Err(e) => {
            println!("cannot verify: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

/// Every (client, connector, operation) the config grants, for the least-privilege report;
/// a time-bound grant past its `expires` at `now` is marked as no longer live.
pub fn grants_of(config: &AuditorConfig, now: DateTime<Utc>) -> Vec<GrantInfo> {
    config
        .grants
        .iter()
        .flat_map(|g| {
            g.operations.iter().map(move |op| GrantInfo {
                client: g.client.clone(),
                connector: g.connector.clone(),
                operation: op.clone(),
                // `Z`, as every other time the tools and the log print.
                expires: g
                    .expires
                    .map(|e| e.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
                reason: g.reason.clone(),
                live: g.expires.is_none_or(|e| now < e),
            })
        })
        .collect()
}
