//! `audit report`: usage per connector and client, and the least-privilege findings — grants
//! never used in the period the files cover, denied attempts beyond the granted scope, the
//! break-glass elevations the log shows in use, and the time-bound grants with their reasons.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::path::PathBuf;

use serde::Serialize;

use crate::audit::query::{cell, for_each_line, parse_line, QueryError};
use crate::audit::record::{Decision, Event, StoredRecord};

/// Operations listed per connector and client.
const TOP_OPERATIONS: usize = 5;

/// One grant from the current config, as `report` needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GrantInfo {
    /// The client holding the grant.
    pub client: String,
    /// The connector.
    pub connector: String,
    /// The granted operation.
    pub operation: String,
    /// RFC 3339 expiry of a time-bound grant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// Why a time-bound grant was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// False once a time-bound grant has expired: it no longer exists (DESIGN §3.3), so it is
    /// listed among the time-bound grants but is not an unused permission.
    pub live: bool,
}

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// Reading the files failed or a line is not a record.
    #[error(transparent)]
    Read(#[from] QueryError),
    /// Writing the output failed.
    #[error("cannot write the output: {0}")]
    Output(#[from] io::Error),
    /// Serialising the JSON document failed.
    #[error("cannot serialise the report: {0}")]
    Json(#[from] serde_json::Error),
}

/// The whole report; also the `--json` document. The two grant lists are `null` when no
/// config was given: without the grants there is nothing to say, and an empty list would
/// read as "no unused permissions".
#[derive(Debug, Default, Serialize)]
struct Report {
    period: Period,
    usage: Vec<Usage>,
    unused_grants: Option<Vec<UnusedGrant>>,
    beyond_scope: Vec<BeyondScope>,
    elevations_used: Vec<ElevationUse>,
    time_bound_grants: Option<Vec<GrantInfo>>,
}

/// The time the files cover.
#[derive(Debug, Default, Serialize)]
struct Period {
    records: u64,
    first: Option<String>,
    last: Option<String>,
}

/// Proxy use of one connector by one client.
#[derive(Debug, Default, Serialize)]
struct Usage {
    connector: String,
    client: String,
    calls: u64,
    denials: BTreeMap<String, u64>,
    first_use: Option<String>,
    last_use: Option<String>,
    top_operations: Vec<OperationCount>,
    #[serde(skip)]
    operations: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
struct OperationCount {
    operation: String,
    calls: u64,
}

/// A grant with no allowed call in the period.
#[derive(Debug, Serialize)]
struct UnusedGrant {
    client: String,
    connector: String,
    operation: String,
}

/// Denied attempts at a method and path the client's grants do not cover.
#[derive(Debug, Serialize)]
struct BeyondScope {
    client: String,
    connector: String,
    method: String,
    path: String,
    attempts: u64,
    reasons: BTreeSet<String>,
}

/// Tokens issued and calls allowed under time-bound grants, read from the records'
/// `grant_reason` and `grant_expires`: unlike the config's list, it survives the elevation's
/// removal.
#[derive(Debug, Default, Serialize)]
struct ElevationUse {
    client: String,
    reason: Option<String>,
    expires: Option<String>,
    tokens: u64,
    calls: u64,
    first_use: Option<String>,
    last_use: Option<String>,
    /// `connector:operation` of the calls made under it.
    operations: BTreeSet<String>,
}

/// Client, reason, expiry of an elevation in use.
type ElevationKey = (String, Option<String>, Option<String>);

/// Reports on `paths` (read in order; several replicas' files merge) against the current
/// `grants` (`None`: no config, so no grant findings), as a table or, with `json`, one JSON
/// document. Returns how many copies of records already read were skipped
/// (see [`for_each_line`]).
pub fn run_report(
    paths: &[PathBuf],
    grants: Option<&[GrantInfo]>,
    json: bool,
    out: &mut dyn Write,
) -> Result<u64, ReportError> {
    let mut acc = Accumulator::default();
    let duplicates = for_each_line(paths, |path, line_no, line| {
        acc.add(&parse_line(path, line_no, line)?);
        Ok::<(), ReportError>(())
    })?;
    let report = acc.finish(grants);
    if json {
        serde_json::to_writer_pretty(&mut *out, &report)?;
        writeln!(out)?;
    } else {
        write_table(&report, out)?;
    }
    out.flush()?;
    Ok(duplicates)
}

/// Client, connector, method, path of a denied attempt.
type BeyondKey = (String, String, String, String);

/// Totals gathered while streaming the records.
#[derive(Default)]
struct Accumulator {
    period: Period,
    usage: BTreeMap<(String, String), Usage>,
    /// (client, connector, method, path) → attempts and reasons.
    beyond: BTreeMap<BeyondKey, (u64, BTreeSet<String>)>,
    elevations: BTreeMap<ElevationKey, ElevationUse>,
}

impl Accumulator {
    fn add(&mut self, rec: &StoredRecord) {
        self.period.records += 1;
        // Earliest and latest, not first and last read: `ts` may step back with the clock
        // (the writer follows a step of more than 2 s), and the merge is by `ts` only across
        // files. The broker's one fixed UTC format orders as text.
        keep_earliest(&mut self.period.first, &rec.ts);
        keep_latest(&mut self.period.last, &rec.ts);
        let r = &rec.record;
        self.note_elevation(rec);
        if r.event != Event::Proxy {
            return;
        }
        let client = r.client.clone().unwrap_or_else(|| "-".into());
        let connector = r.connector.clone().unwrap_or_else(|| "-".into());
        let usage = self
            .usage
            .entry((connector.clone(), client.clone()))
            .or_insert_with(|| Usage {
                connector: connector.clone(),
                client: client.clone(),
                ..Usage::default()
            });
        match r.decision {
            Some(Decision::Allow) => {
                usage.calls += 1;
                keep_earliest(&mut usage.first_use, &rec.ts);
                keep_latest(&mut usage.last_use, &rec.ts);
                let op = r.operation.clone().unwrap_or_else(|| "-".into());
                *usage.operations.entry(op).or_default() += 1;
            }
            Some(Decision::Deny) => {
                let reason = r.reason.clone().unwrap_or_else(|| "-".into());
                *usage.denials.entry(reason.clone()).or_default() += 1;
                // The broker answers every out-of-scope attempt with 403; a kill switch or an
                // expired connector is 403 too but says nothing about the client.
                let forbidden = r.status == Some(403)
                    && !matches!(reason.as_str(), "connector_disabled" | "connector_expired");
                if forbidden || is_beyond_scope(&reason) {
                    let method = r.method.clone().unwrap_or_else(|| "-".into());
                    let path = r.path.clone().unwrap_or_else(|| "-".into());
                    let entry = self
                        .beyond
                        .entry((client, connector, method, path))
                        .or_default();
                    entry.0 += 1;
                    entry.1.insert(reason);
                }
            }
            None => {}
        }
    }

    /// A token issued or a call allowed under a time-bound grant.
    fn note_elevation(&mut self, rec: &StoredRecord) {
        let r = &rec.record;
        if r.grant_reason.is_none() && r.grant_expires.is_none() {
            return;
        }
        let issued = r.event == Event::TokenIssued;
        let allowed = r.event == Event::Proxy && r.decision == Some(Decision::Allow);
        if !issued && !allowed {
            return;
        }
        let client = r.client.clone().unwrap_or_else(|| "-".into());
        let key = (client, r.grant_reason.clone(), r.grant_expires.clone());
        let used = self
            .elevations
            .entry(key)
            .or_insert_with_key(|(client, reason, expires)| ElevationUse {
                client: client.clone(),
                reason: reason.clone(),
                expires: expires.clone(),
                ..ElevationUse::default()
            });
        keep_earliest(&mut used.first_use, &rec.ts);
        keep_latest(&mut used.last_use, &rec.ts);
        if issued {
            used.tokens += 1;
        } else {
            used.calls += 1;
            used.operations.insert(format!(
                "{}:{}",
                r.connector.as_deref().unwrap_or("-"),
                r.operation.as_deref().unwrap_or("-")
            ));
        }
    }

    fn finish(self, grants: Option<&[GrantInfo]>) -> Report {
        let used: BTreeSet<(&str, &str, &str)> = self
            .usage
            .values()
            .flat_map(|u| {
                u.operations
                    .keys()
                    .map(|op| (u.client.as_str(), u.connector.as_str(), op.as_str()))
            })
            .collect();
        // A permission held through two grants (a permanent one and an elevation) is listed
        // once; an expired elevation is no permission at all.
        let unused_grants = grants.map(|grants| {
            grants
                .iter()
                .filter(|g| g.live)
                .map(|g| {
                    (
                        g.client.as_str(),
                        g.connector.as_str(),
                        g.operation.as_str(),
                    )
                })
                .filter(|key| !used.contains(key))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .map(|(client, connector, operation)| UnusedGrant {
                    client: client.to_owned(),
                    connector: connector.to_owned(),
                    operation: operation.to_owned(),
                })
                .collect()
        });
        let usage = fold_unknown_connectors(self.usage, grants)
            .into_values()
            .map(with_top_operations)
            .collect();
        let beyond_scope = self
            .beyond
            .into_iter()
            .map(
                |((client, connector, method, path), (attempts, reasons))| BeyondScope {
                    client,
                    connector,
                    method,
                    path,
                    attempts,
                    reasons,
                },
            )
            .collect();
        let time_bound_grants = grants.map(|grants| {
            grants
                .iter()
                .filter(|g| g.expires.is_some() || g.reason.is_some())
                .cloned()
                .collect()
        });
        Report {
            period: self.period,
            usage,
            unused_grants,
            beyond_scope,
            elevations_used: self.elevations.into_values().collect(),
            time_bound_grants,
        }
    }
}

fn keep_earliest(kept: &mut Option<String>, ts: &str) {
    if kept.as_deref().is_none_or(|k| ts < k) {
        *kept = Some(ts.to_owned());
    }
}

fn keep_latest(kept: &mut Option<String>, ts: &str) {
    if kept.as_deref().is_none_or(|k| ts > k) {
        *kept = Some(ts.to_owned());
    }
}

/// Fills `top_operations`: most calls first, then by name.
fn with_top_operations(mut u: Usage) -> Usage {
    let mut ops: Vec<OperationCount> = u
        .operations
        .iter()
        .map(|(operation, &calls)| OperationCount {
            operation: operation.clone(),
            calls,
        })
        .collect();
    ops.sort_by(|a, b| {
        b.calls
            .cmp(&a.calls)
            .then_with(|| a.operation.cmp(&b.operation))
    });
    ops.truncate(TOP_OPERATIONS);
    u.top_operations = ops;
    u
}

/// A denial that shows an attempt outside the client's grants (403 `insufficient_scope`, or
/// no operation of the connector matched), as opposed to a bad token or a rate limit.
fn is_beyond_scope(reason: &str) -> bool {
    let r = reason.to_ascii_lowercase().replace(['_', '-'], " ");
    [
        "insufficient scope",
        "no matching operation",
        "no operation",
        "not granted",
    ]
    .iter()
    .any(|k| r.contains(k))
}

/// The row that takes the client-less records of connectors the report does not know.
const UNKNOWN_CONNECTOR: &str = "(unknown connector)";

/// Records without a client (refused before the token was read) name as connector whatever
/// the request's first path segment was — a scanner's `wp-admin` as much as `github`. Such a
/// record keeps its own row only for a connector the report knows (one a client's record
/// names, or a grant of the config); the others share one `(unknown connector)` row.
fn fold_unknown_connectors(
    mut usage: BTreeMap<(String, String), Usage>,
    grants: Option<&[GrantInfo]>,
) -> BTreeMap<(String, String), Usage> {
    let known: BTreeSet<String> = usage
        .values()
        .filter(|u| u.client != "-")
        .map(|u| u.connector.clone())
        .chain(grants.into_iter().flatten().map(|g| g.connector.clone()))
        .collect();
    let strangers: Vec<(String, String)> = usage
        .keys()
        .filter(|(connector, client)| client == "-" && !known.contains(connector))
        .cloned()
        .collect();
    for key in strangers {
        let Some(stray) = usage.remove(&key) else {
            continue;
        };
        let unknown_key = (UNKNOWN_CONNECTOR.to_owned(), "-".to_owned());
        let row = usage.entry(unknown_key).or_insert_with(|| Usage {
            connector: UNKNOWN_CONNECTOR.into(),
            client: "-".into(),
            ..Usage::default()
        });
        for (reason, n) in stray.denials {
            *row.denials.entry(reason).or_default() += n;
        }
    }
    usage
}

fn write_table(r: &Report, out: &mut dyn Write) -> io::Result<()> {
    // Every value read from the file goes through `cell`, times included: `report` does not
    // verify the chain, so a `ts` may hold anything.
    let dash = |v: &Option<String>| v.as_deref().map_or_else(|| "-".into(), cell);
    writeln!(
        out,
        "Period: {} .. {} ({} records)\n",
        dash(&r.period.first),
        dash(&r.period.last),
        r.period.records
    )?;
    writeln!(out, "Usage by connector and client:")?;
    if r.usage.is_empty() {
        writeln!(out, "  (no proxy calls)")?;
    }
    for u in &r.usage {
        let denials: u64 = u.denials.values().sum();
        writeln!(
            out,
            "  {} / {}: {}, {}, first use {}, last use {}",
            cell(&u.connector),
            cell(&u.client),
            plural(u.calls, "call"),
            plural(denials, "denial"),
            dash(&u.first_use),
            dash(&u.last_use)
        )?;
        for (reason, n) in &u.denials {
            writeln!(out, "      denied {n} x {}", cell(reason))?;
        }
        for op in &u.top_operations {
            writeln!(out, "      {:>6}  {}", op.calls, cell(&op.operation))?;
        }
    }
    writeln!(
        out,
        "\nGranted but never used in this period (least privilege):"
    )?;
    match &r.unused_grants {
        None => writeln!(out, "  {NEEDS_CONFIG}")?,
        Some(unused) if unused.is_empty() => writeln!(out, "  (none)")?,
        Some(unused) => {
            for g in unused {
                writeln!(
                    out,
                    "  {} -> {}:{}",
                    cell(&g.client),
                    cell(&g.connector),
                    cell(&g.operation)
                )?;
            }
        }
    }
    writeln!(
        out,
        "\nDenied attempts outside the allowlist, the grants or the token's scope:"
    )?;
    if r.beyond_scope.is_empty() {
        writeln!(out, "  (none)")?;
    }
    for b in &r.beyond_scope {
        let reasons: Vec<String> = b.reasons.iter().map(|r| cell(r)).collect();
        writeln!(
            out,
            "  {} -> {}: {} {} ({} {}: {})",
            cell(&b.client),
            cell(&b.connector),
            cell(&b.method),
            cell(&b.path),
            b.attempts,
            if b.attempts == 1 {
                "attempt"
            } else {
                "attempts"
            },
            reasons.join(", ")
        )?;
    }
    writeln!(
        out,
        "\nBreak-glass elevations in use (time-bound grants, from the log):"
    )?;
    if r.elevations_used.is_empty() {
        writeln!(out, "  (none)")?;
    }
    for e in &r.elevations_used {
        let operations: Vec<String> = e.operations.iter().map(|o| cell(o)).collect();
        writeln!(
            out,
            "  {}: {} (until {}): {}, {}, first use {}, last use {}{}{}",
            cell(&e.client),
            dash(&e.reason),
            dash(&e.expires),
            plural(e.tokens, "token"),
            plural(e.calls, "call"),
            dash(&e.first_use),
            dash(&e.last_use),
            if operations.is_empty() { "" } else { ": " },
            operations.join(", ")
        )?;
    }
    writeln!(out, "\nTime-bound grants:")?;
    match &r.time_bound_grants {
        None => writeln!(out, "  {NEEDS_CONFIG}")?,
        Some(grants) if grants.is_empty() => writeln!(out, "  (none)")?,
        Some(grants) => {
            for g in grants {
                writeln!(
                    out,
                    "  {} -> {}:{} {} {}: {}",
                    cell(&g.client),
                    cell(&g.connector),
                    cell(&g.operation),
                    if g.live { "expires" } else { "EXPIRED" },
                    dash(&g.expires),
                    cell(&dash(&g.reason))
                )?;
            }
        }
    }
    Ok(())
}

/// `1 call`, `2 calls`.
fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("{n} {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// What the grant sections say when no config was given.
const NEEDS_CONFIG: &str = "(unknown: the grants come from the config; pass --config)";

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::audit::record::Record;

    fn proxy(client: &str, op: &str, decision: Decision, reason: Option<&str>) -> Record {
        let mut r = Record::new(Event::Proxy);
        r.client = Some(client.into());
        r.connector = Some("github".into());
        r.operation = (decision == Decision::Allow).then(|| op.to_owned());
        r.method = Some("GET".into());
        r.path = Some(format!("/{op}"));
        r.decision = Some(decision);
        r.reason = reason.map(str::to_owned);
        r
    }

    /// The records as one chained file, a day apart (query's helper writes the chain).
    fn write_log(dir: &Path, records: &[Record]) -> PathBuf {
        let times: Vec<String> = (0..records.len())
            .map(|i| format!("2026-11-2{}T10:00:00.000000Z", i % 10))
            .collect();
        let timed: Vec<(&str, Record)> = times
            .iter()
            .map(String::as_str)
            .zip(records.iter().cloned())
            .collect();
        crate::audit::query::tests::write_log(dir, &timed)
    }

    /// After a clock step back (followed by the writer when over 2 s), the records' times
    /// are not in file order: first and last use are still the earliest and the latest.
    #[test]
    fn first_and_last_use_are_the_earliest_and_latest_times() {
        let dir = tempfile::tempdir().unwrap();
        let allow = proxy("bot", "issues.read", Decision::Allow, None);
        let timed = [
            ("2026-11-25T10:00:00.000000Z", allow.clone()),
            ("2026-11-25T12:00:00.000000Z", allow.clone()),
            ("2026-11-25T09:00:00.000000Z", allow),
        ];
        let path = crate::audit::query::tests::write_log(dir.path(), &timed);
        let mut out = Vec::new();
        run_report(&[path], None, true, &mut out).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let usage = &v["usage"][0];
        assert_eq!(usage["first_use"], "2026-11-25T09:00:00.000000Z");
        assert_eq!(usage["last_use"], "2026-11-25T12:00:00.000000Z");
        assert_eq!(v["period"]["first"], "2026-11-25T09:00:00.000000Z");
        assert_eq!(v["period"]["last"], "2026-11-25T12:00:00.000000Z");
    }

    /// The elevations in use come from the records themselves, with no config: the grant
    /// may be gone from it by the time the report is made.
    #[test]
    fn elevations_in_use_are_read_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let elevated = |mut r: Record| {
            r.grant_reason = Some("INC-4711".into());
            r.grant_expires = Some("2026-12-01T00:00:00Z".into());
            r
        };
        let mut issued = Record::new(Event::TokenIssued);
        issued.client = Some("responder".into());
        let mut refused_token = elevated(issued.clone());
        refused_token.event = Event::TokenDenied;
        let path = write_log(
            dir.path(),
            &[
                elevated(issued),
                elevated(proxy("responder", "issues.comment", Decision::Allow, None)),
                proxy("responder", "issues.read", Decision::Allow, None),
                elevated(proxy("responder", "issues.comment", Decision::Allow, None)),
                refused_token,
            ],
        );
        let mut out = Vec::new();
        run_report(std::slice::from_ref(&path), None, true, &mut out).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let used = v["elevations_used"].as_array().unwrap();
        assert_eq!(used.len(), 1, "{v}");
        assert_eq!(used[0]["client"], "responder");
        assert_eq!(used[0]["reason"], "INC-4711");
        assert_eq!(used[0]["tokens"], 1);
        assert_eq!(used[0]["calls"], 2);
        assert_eq!(used[0]["first_use"], "2026-11-20T10:00:00.000000Z");
        assert_eq!(used[0]["last_use"], "2026-11-23T10:00:00.000000Z");
        assert_eq!(
            used[0]["operations"],
            serde_json::json!(["github:issues.comment"])
        );
        let mut out = Vec::new();
        run_report(&[path], None, false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains(
                "  responder: INC-4711 (until 2026-12-01T00:00:00Z): 1 token, 2 calls, first use \
                 2026-11-20T10:00:00.000000Z, last use 2026-11-23T10:00:00.000000Z: \
                 github:issues.comment\n"
            ),
            "{text}"
        );
    }

    fn grant(client: &str, op: &str, expires: Option<&str>) -> GrantInfo {
        GrantInfo {
            client: client.into(),
            connector: "github".into(),
            operation: op.into(),
            expires: expires.map(str::to_owned),
            reason: expires.map(|_| "incident 42".to_owned()),
            live: true,
        }
    }

    fn fixture(dir: &Path) -> (PathBuf, Vec<GrantInfo>) {
        let path = write_log(
            dir,
            &[
                Record::new(Event::Startup),
                proxy("bot", "read_issues", Decision::Allow, None),
                proxy("bot", "read_issues", Decision::Allow, None),
                proxy(
                    "bot",
                    "delete_repo",
                    Decision::Deny,
                    Some("insufficient_scope"),
                ),
                proxy("bot", "x", Decision::Deny, Some("rate_limited")),
            ],
        );
        let grants = vec![
            grant("bot", "read_issues", None),
            grant("bot", "write_issues", Some("2026-12-01T00:00:00Z")),
        ];
        (path, grants)
    }

    #[test]
    fn least_privilege_findings_in_json() {
        let dir = tempfile::tempdir().unwrap();
        let (path, grants) = fixture(dir.path());
        let mut out = Vec::new();
        run_report(&[path], Some(&grants), true, &mut out).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["period"]["records"], 5);
        assert_eq!(v["usage"][0]["calls"], 2);
        assert_eq!(v["usage"][0]["denials"]["insufficient_scope"], 1);
        assert_eq!(v["usage"][0]["denials"]["rate_limited"], 1);
        assert_eq!(
            v["usage"][0]["top_operations"][0]["operation"],
            "read_issues"
        );
        assert_eq!(v["usage"][0]["first_use"], "2026-11-21T10:00:00.000000Z");
        assert_eq!(v["usage"][0]["last_use"], "2026-11-22T10:00:00.000000Z");
        let unused = v["unused_grants"].as_array().unwrap();
        assert_eq!(unused.len(), 1);
        assert_eq!(unused[0]["operation"], "write_issues");
        let beyond = v["beyond_scope"].as_array().unwrap();
        assert_eq!(beyond.len(), 1, "rate limiting is not beyond scope");
        assert_eq!(beyond[0]["path"], "/delete_repo");
        assert_eq!(v["time_bound_grants"][0]["reason"], "incident 42");
    }

    #[test]
    fn client_less_records_of_unknown_connectors_share_one_row() {
        let dir = tempfile::tempdir().unwrap();
        let scan = |connector: &str| {
            let mut r = proxy("-", "x", Decision::Deny, Some("token_missing"));
            r.client = None;
            r.connector = Some(connector.into());
            r
        };
        let path = write_log(
            dir.path(),
            &[
                proxy("bot", "read_issues", Decision::Allow, None),
                scan("wp-admin"),
                scan(".env"),
                scan("phpmyadmin"),
                scan("github"),
            ],
        );
        let mut out = Vec::new();
        run_report(&[path], None, true, &mut out).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let rows: Vec<(String, String, u64)> = v["usage"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| {
                (
                    u["connector"].as_str().unwrap().to_owned(),
                    u["client"].as_str().unwrap().to_owned(),
                    u["denials"]["token_missing"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        let row = |c: &str, cl: &str, n| (c.to_owned(), cl.to_owned(), n);
        assert_eq!(
            rows,
            [
                row("(unknown connector)", "-", 3),
                row("github", "-", 1),
                row("github", "bot", 0)
            ]
        );
    }

    #[test]
    fn times_and_names_are_escaped_in_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let mut evil = proxy("bot", "read_issues", Decision::Allow, None);
        evil.client = Some("b\u{202e}ot".into());
        let path = write_log(dir.path(), &[evil]);
        // A `ts` holding an escape sequence (report does not verify the chain).
        let text = std::fs::read_to_string(&path).unwrap().replacen(
            "10:00:00.000000Z",
            "10:00:00.000000Z\\u001b[2J",
            1,
        );
        std::fs::write(&path, text).unwrap();
        let mut out = Vec::new();
        run_report(&[path], None, false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{202e}'),
            "{text}"
        );
        assert!(text.contains("\\u{202e}"), "{text}");
    }

    #[test]
    fn table_lists_each_section() {
        let dir = tempfile::tempdir().unwrap();
        let (path, grants) = fixture(dir.path());
        let mut out = Vec::new();
        run_report(&[path], Some(&grants), false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("github / bot: 2 calls, 2 denials"), "{text}");
        assert!(text.contains("bot -> github:write_issues\n"), "{text}");
        assert!(
            text.contains("GET /delete_repo (1 attempt: insufficient_scope)"),
            "{text}"
        );
        assert!(
            text.contains("expires 2026-12-01T00:00:00Z: incident 42"),
            "{text}"
        );
    }

    #[test]
    fn expired_and_duplicate_grants_are_not_unused_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut grants) = fixture(dir.path());
        // write_issues twice (permanent and an elevation), and an expired elevation.
        grants.push(grant("bot", "write_issues", None));
        let mut expired = grant("bot", "admin", Some("2020-01-01T00:00:00Z"));
        expired.live = false;
        grants.push(expired);
        let mut out = Vec::new();
        run_report(std::slice::from_ref(&path), Some(&grants), true, &mut out).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let unused: Vec<&str> = v["unused_grants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["operation"].as_str().unwrap())
            .collect();
        assert_eq!(unused, ["write_issues"]);
        assert_eq!(v["time_bound_grants"][1]["live"], false);
        let mut out = Vec::new();
        run_report(&[path], Some(&grants), false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("bot -> github:admin EXPIRED 2020-01-01T00:00:00Z: incident 42"),
            "{text}"
        );
    }

    #[test]
    fn without_a_config_the_grant_sections_say_so_instead_of_none() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = fixture(dir.path());
        let mut out = Vec::new();
        run_report(std::slice::from_ref(&path), None, true, &mut out).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(v["unused_grants"].is_null() && v["time_bound_grants"].is_null());
        let mut out = Vec::new();
        run_report(&[path], None, false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches(NEEDS_CONFIG).count(), 2, "{text}");
        assert!(!text.contains("(none)\n\nDenied"), "{text}");
    }

    #[test]
    fn reasons_beyond_scope() {
        assert!(is_beyond_scope("insufficient_scope"));
        assert!(is_beyond_scope("no matching operation"));
        assert!(is_beyond_scope("no_matching_operation"));
        assert!(!is_beyond_scope("invalid_token"));
        assert!(!is_beyond_scope("rate_limited"));
    }
}
