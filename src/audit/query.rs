//! `audit query`: streams the records of one or more files (merged by time) through a filter and
//! prints the matches as an aligned table or, with `--json`, as the original lines unchanged.
//! Also the shared line reader for `report` and the `--since`/`--until` time parser.

use std::fs::File;
use std::io::{self, BufReader, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveDate, Utc};

use crate::audit::record::{read_line, Decision, Event, LineRead, StoredRecord, MAX_LINE_BYTES};

/// Why a query could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        cause: io::Error,
    },
    /// A complete line is not a record (run `audit verify` on the file).
    #[error("{path}:{line}: not an audit record: {reason}")]
    BadLine {
        /// The file.
        path: PathBuf,
        /// The line's number, from 1.
        line: u64,
        /// The parser's message.
        reason: String,
    },
    /// Writing the output failed.
    #[error("cannot write the output: {0}")]
    Output(#[source] io::Error),
}

/// Why a `--since`/`--until` value was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TimeError {
    /// Neither RFC 3339, a date, nor a duration like `30m`, `1h`, `7d`.
    #[error("`{0}` is not an RFC 3339 time, a YYYY-MM-DD date, or a duration like 30m, 1h, 7d")]
    Invalid(String),
}

/// Which records to show. Every set field must match.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueryFilter {
    /// `client` equals this.
    pub client: Option<String>,
    /// `connector` equals this.
    pub connector: Option<String>,
    /// `decision` equals this.
    pub decision: Option<Decision>,
    /// `event` equals this.
    pub event: Option<Event>,
    /// `ts` at or after this (inclusive).
    pub since: Option<DateTime<Utc>>,
    /// `ts` before this (exclusive).
    pub until: Option<DateTime<Utc>>,
}

impl QueryFilter {
    /// True when the record passes every set condition.
    pub fn matches(&self, rec: &StoredRecord) -> bool {
        let r = &rec.record;
        let eq = |want: &Option<String>, have: &Option<String>| {
            want.as_ref().is_none_or(|w| have.as_ref() == Some(w))
        };
        // An admin action on a client or connector (a revocation, a kill switch) names it as
        // its `target`: it is part of that client's or connector's history too.
        let named = |want: &Option<String>, have: &Option<String>, kind: &str| {
            eq(want, have) || want.as_ref().is_some_and(|w| is_target(r, kind, w))
        };
        named(&self.client, &r.client, "client")
            && named(&self.connector, &r.connector, "connector")
            && self.decision.is_none_or(|d| r.decision == Some(d))
            && self.event.is_none_or(|e| r.event == e)
            && self.time_matches(&rec.ts)
    }

    fn time_matches(&self, ts: &str) -> bool {
        if self.since.is_none() && self.until.is_none() {
            return true;
        }
        let Ok(t) = DateTime::parse_from_rfc3339(ts) else {
            return false;
        };
        let t = t.with_timezone(&Utc);
        self.since.is_none_or(|s| t >= s) && self.until.is_none_or(|u| t < u)
    }

    /// Substrings a matching line contains as written by the writer (serde_json escaping):
    /// one of each group, so most non-matching lines are skipped without parsing them.
    fn needles(&self) -> Vec<Vec<String>> {
        let member = |name: &str, value: &str| {
            // Serialising a string cannot fail.
            let quoted = serde_json::to_string(value).unwrap_or_default();
            format!("\"{name}\":{quoted}")
        };
        let mut needles = Vec::new();
        for (kind, want) in [("client", &self.client), ("connector", &self.connector)] {
            if let Some(w) = want {
                let target = member("target", &format!("{kind}:{w}"));
                needles.push(vec![member(kind, w), target]);
            }
        }
        if let Some(d) = self.decision {
            needles.push(vec![member("decision", d.as_str())]);
        }
        if let Some(e) = self.event {
            needles.push(vec![member("event", e.as_str())]);
        }
        needles
    }
}

/// Parses `--since`/`--until`: RFC 3339, a `YYYY-MM-DD` date (midnight UTC), or a duration
/// such as `30m`, `1h`, `7d`, `1h30m` meaning that long before `now`.
pub fn parse_time(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, TimeError> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        if let Some(t) = d.and_hms_opt(0, 0, 0) {
            return Ok(t.and_utc());
        }
    }
    humantime::parse_duration(s)
        .ok()
        .and_then(|d| chrono::Duration::from_std(d).ok())
        .and_then(|d| now.checked_sub_signed(d))
        .ok_or_else(|| TimeError::Invalid(s.to_owned()))
}

/// What [`run_query`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueryCounts {
    /// Records printed.
    pub printed: u64,
    /// Copies of records already read, skipped ([`for_each_line`]).
    pub duplicates: u64,
}

/// Prints the records of `paths` (merged by time, see [`for_each_line`]) that pass `filter` to
/// `out`; says how many, and how many copies were skipped.
/// A torn final line (no `\n`, e.g. a write in progress) is skipped.
pub fn run_query(
    paths: &[PathBuf],
    filter: &QueryFilter,
    json: bool,
    out: &mut dyn Write,
) -> Result<QueryCounts, QueryError> {
    let needles = filter.needles();
    let mut table = Table::new();
    let mut count = 0;
    let duplicates = for_each_line(paths, |path, line_no, line| {
        if !needles
            .iter()
            .all(|any| any.iter().any(|n| line.contains(n.as_str())))
        {
            return Ok(());
        }
        let rec = parse_line(path, line_no, line)?;
        if !filter.matches(&rec) {
            return Ok(());
        }
        count += 1;
        if json {
            writeln!(out, "{line}").map_err(QueryError::Output)
        } else {
            table.push(row(&rec), out).map_err(QueryError::Output)
        }
    })?;
    if !json {
        table.finish(out).map_err(QueryError::Output)?;
    }
    Ok(QueryCounts {
        printed: count,
        duplicates,
    })
}

/// Parses a line into a record, or the `BadLine` error for it.
pub(crate) fn parse_line(path: &Path, line: u64, text: &str) -> Result<StoredRecord, QueryError> {
    StoredRecord::parse(text).map_err(|e| QueryError::BadLine {
        path: path.to_owned(),
        line,
        reason: e.to_string(),
    })
}

/// Calls `f` with each complete line (without `\n`) of `paths`, streaming, merged by `ts`.
///
/// Each file is read in its own order. Across files the line with the earliest `ts` goes
/// first, and on a tie the file given first: several replicas' logs come out as one timeline
/// (DESIGN §7), and one chain's rotated files (whose times grow, but for a clock step back of
/// more than 2 s, which the writer follows) in chain order, even if
/// they were given out of order. `ts` is compared as text: the broker writes one fixed UTC
/// format. A torn last line (no `\n`) ends its file.
///
/// A record given twice — the same file named twice, an archived copy overlapping the live
/// file — is passed once, and how many copies were skipped is returned (for the caller to
/// say): counted twice it would inflate every figure of a report. The copies meet within a
/// few lines of each other in the merge, so only the latest [`RECENT_HASHES`] are remembered.
pub(crate) fn for_each_line<E: From<QueryError>>(
    paths: &[PathBuf],
    mut f: impl FnMut(&Path, u64, &str) -> Result<(), E>,
) -> Result<u64, E> {
    let mut sources = paths
        .iter()
        .map(|path| LineSource::open(path))
        .collect::<Result<Vec<_>, _>>()?;
    for source in &mut sources {
        source.advance()?;
    }
    let mut recent = RecentHashes::default();
    loop {
        let next = sources
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.ts().map(|ts| (ts, i)))
            .min()
            .map(|(_, i)| i);
        let Some(i) = next else { break };
        let source = &mut sources[i];
        if recent.is_new(source.line()) {
            f(source.path, source.line_no, source.line())?;
        }
        source.advance()?;
    }
    Ok(recent.duplicates)
}

/// How many of the latest records' hashes [`for_each_line`] remembers to skip copies.
const RECENT_HASHES: usize = 1 << 16;

/// The latest records passed: the first 128 bits of their `hash`, and a hash of the whole
/// line, keyed per process — a line that only copies another record's `hash` member is not
/// taken for that record.
#[derive(Default)]
struct RecentHashes {
    line_hasher: foldhash::fast::RandomState,
    seen: std::collections::HashSet<(u128, u64)>,
    order: std::collections::VecDeque<(u128, u64)>,
    duplicates: u64,
}

impl RecentHashes {
    /// False for a line that repeats one of the latest passed.
    fn is_new(&mut self, line: &str) -> bool {
        use std::hash::BuildHasher;
        // `…,"hash":"<64 lower-case hex>"}`: anything else is not deduplicated (and fails to
        // parse).
        let Some(hex) = line
            .strip_suffix("\"}")
            .and_then(|l| {
                l.len()
                    .checked_sub(64)
                    .filter(|&start| l.is_char_boundary(start))
                    .map(|start| l.split_at(start))
            })
            .filter(|(head, hex)| {
                head.ends_with(",\"hash\":\"")
                    && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            })
            .map(|(_, hex)| hex)
        else {
            return true;
        };
        let Ok(prefix) = u128::from_str_radix(&hex[..32], 16) else {
            return true;
        };
        let key = (prefix, self.line_hasher.hash_one(line));
        if !self.seen.insert(key) {
            self.duplicates += 1;
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > RECENT_HASHES {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}

/// One file's lines, one at a time.
struct LineSource<'p> {
    path: &'p Path,
    reader: BufReader<File>,
    /// The current line (without `\n`), valid while `has_line`.
    buf: Vec<u8>,
    has_line: bool,
    line_no: u64,
}

impl<'p> LineSource<'p> {
    fn open(path: &'p Path) -> Result<Self, QueryError> {
        let file = File::open(path).map_err(|cause| QueryError::Io {
            path: path.to_owned(),
            cause,
        })?;
        Ok(Self {
            path,
            reader: BufReader::with_capacity(1 << 16, file),
            buf: Vec::with_capacity(1024),
            has_line: false,
            line_no: 0,
        })
    }

    /// Reads the next complete line; at the end (or a torn last line) there is none.
    fn advance(&mut self) -> Result<(), QueryError> {
        let read = read_line(&mut self.reader, &mut self.buf).map_err(|cause| QueryError::Io {
            path: self.path.to_owned(),
            cause,
        })?;
        self.has_line = read == LineRead::Line;
        if read == LineRead::TooLong {
            // Not a torn write (those are short): not a record, even at the end.
            return Err(QueryError::BadLine {
                path: self.path.to_owned(),
                line: self.line_no + 1,
                reason: format!("longer than {} MiB", MAX_LINE_BYTES >> 20),
            });
        }
        if !self.has_line {
            return Ok(());
        }
        self.line_no += 1;
        if let Err(e) = std::str::from_utf8(&self.buf) {
            return Err(QueryError::BadLine {
                path: self.path.to_owned(),
                line: self.line_no,
                reason: e.to_string(),
            });
        }
        Ok(())
    }

    /// The current line, checked as UTF-8 by `advance`.
    fn line(&self) -> &str {
        std::str::from_utf8(&self.buf).unwrap_or_default()
    }

    /// The current line's `ts` text (empty when it has none: it is then parsed, and refused,
    /// first); `None` once the file is done.
    fn ts(&self) -> Option<&str> {
        if !self.has_line {
            return None;
        }
        let line = self.line();
        let ts = line
            .find("\"ts\":\"")
            .map(|at| &line[at + 6..])
            .and_then(|rest| rest.split_once('"'))
            .map_or("", |(ts, _)| ts);
        Some(ts)
    }
}

const COLUMNS: [&str; 11] = [
    "TS",
    "SEQ",
    "EVENT",
    "CLIENT",
    "CONNECTOR",
    "OPERATION",
    "METHOD",
    "PATH",
    "DECISION",
    "STATUS",
    "REASON",
];
/// Rows looked at to size the columns before printing starts; later rows reuse the widths.
const SIZING_ROWS: usize = 200;
/// No column is padded wider than this; longer values push the rest of their row right.
const MAX_WIDTH: usize = 48;

type Row = [String; 11];

/// Whether `r` is an admin action on the client or connector (`kind`) named `name`.
fn is_target(r: &crate::audit::Record, kind: &str, name: &str) -> bool {
    r.event == Event::Admin
        && r.target
            .as_deref()
            .and_then(|t| t.strip_prefix(kind))
            .and_then(|t| t.strip_prefix(':'))
            == Some(name)
}

fn row(rec: &StoredRecord) -> Row {
    let r = &rec.record;
    if r.event == Event::Admin {
        return admin_row(rec);
    }
    [
        cell(&rec.ts),
        seq_cell(rec),
        r.event.as_str().to_owned(),
        opt(&r.client),
        opt(&r.connector),
        opt(if r.operation.is_some() {
            &r.operation
        } else {
            &r.action
        }),
        opt(&r.method),
        opt(&r.path),
        r.decision.map_or("-", Decision::as_str).to_owned(),
        r.status.map_or_else(|| "-".to_owned(), |s| s.to_string()),
        opt(if r.reason.is_some() {
            &r.reason
        } else {
            &r.error
        }),
    ]
}

/// An optional text field's cell (`-` when absent).
fn opt(v: &Option<String>) -> String {
    v.as_deref().map_or_else(|| "-".to_owned(), cell)
}

/// SEQ: several replicas' files merge, each numbering its own chain, so SEQ names the chain.
fn seq_cell(rec: &StoredRecord) -> String {
    match &rec.record.replica {
        Some(replica) => format!("{}:{}", cell(replica), rec.seq),
        None => rec.seq.to_string(),
    }
}

/// An admin action's row: the client or connector it acted on in their columns, any other
/// target (a config file, a token's jti) and who acted under PATH, its `result` under
/// DECISION — so a refused reload does not look like an accepted one.
fn admin_row(rec: &StoredRecord) -> Row {
    let r = &rec.record;
    let target = r.target.as_deref().unwrap_or_default();
    let (client, connector, other) = match target.split_once(':') {
        Some(("client", c)) => (cell(c), "-".to_owned(), None),
        Some(("connector", c)) => ("-".to_owned(), cell(c), None),
        _ => ("-".to_owned(), "-".to_owned(), r.target.as_deref()),
    };
    let by = r.actor.as_deref().map(|a| format!("by {a}"));
    let path = match (other, by) {
        (Some(t), Some(by)) => cell(&format!("{t} {by}")),
        (Some(t), None) => cell(t),
        (None, Some(by)) => cell(&by),
        (None, None) => "-".to_owned(),
    };
    [
        cell(&rec.ts),
        seq_cell(rec),
        r.event.as_str().to_owned(),
        client,
        connector,
        opt(&r.action),
        "-".to_owned(),
        path,
        opt(&r.result),
        "-".to_owned(),
        opt(&r.error),
    ]
}

/// A value made safe for a terminal: control characters (escape sequences in a path an
/// attacker chose) are shown escaped, never sent raw.
pub(crate) fn cell(v: &str) -> String {
    if !v.chars().any(misleads_a_terminal) {
        return v.to_owned();
    }
    v.chars()
        .map(|c| {
            if misleads_a_terminal(c) {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Characters a table cell shows escaped: controls (escape sequences, line breaks), and the
/// invisible ones that reorder or hide text on a terminal with bidi support (U+202E shows the
/// rest of a row reversed): bidi marks, embeddings, overrides and isolates, zero-width
/// characters, line and paragraph separators, the byte order mark.
fn misleads_a_terminal(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{206F}'
                | '\u{FEFF}'
        )
}

/// An aligned table that streams: widths come from the first rows, later rows reuse them.
struct Table {
    widths: Option<[usize; 11]>,
    pending: Vec<Row>,
}

impl Table {
    fn new() -> Self {
        Self {
            widths: None,
            pending: Vec::new(),
        }
    }

    fn push(&mut self, row: Row, out: &mut dyn Write) -> io::Result<()> {
        match &self.widths {
            Some(w) => write_row(out, w, &row),
            None => {
                self.pending.push(row);
                if self.pending.len() >= SIZING_ROWS {
                    self.start(out)?;
                }
                Ok(())
            }
        }
    }

    /// Sizes the columns from the pending rows and prints the header and those rows.
    fn start(&mut self, out: &mut dyn Write) -> io::Result<()> {
        let mut widths = COLUMNS.map(str::len);
        for row in &self.pending {
            for (w, v) in widths.iter_mut().zip(row) {
                *w = (*w).max(v.chars().count().min(MAX_WIDTH));
            }
        }
        let header = COLUMNS.map(str::to_owned);
        write_row(out, &widths, &header)?;
        for row in self.pending.drain(..) {
            write_row(out, &widths, &row)?;
        }
        self.widths = Some(widths);
        Ok(())
    }

    fn finish(&mut self, out: &mut dyn Write) -> io::Result<()> {
        if self.widths.is_none() {
            self.start(out)?;
        }
        out.flush()
    }
}

fn write_row(out: &mut dyn Write, widths: &[usize; 11], row: &Row) -> io::Result<()> {
    let last = row.len() - 1;
    let mut line = String::with_capacity(160);
    for (i, (v, w)) in row.iter().zip(widths).enumerate() {
        if i == last {
            line.push_str(v);
        } else {
            // SEQ and STATUS are numbers: right-aligned.
            let cell = if i == 1 || i == 9 {
                format!("{v:>w$}  ")
            } else {
                format!("{v:<w$}  ")
            };
            line.push_str(&cell);
        }
    }
    writeln!(out, "{}", line.trim_end())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::audit::chain::{seal, ZERO_HASH};
    use crate::audit::record::Record;

    /// Writes records (with their times) as one chained file.
    pub(crate) fn write_log(dir: &Path, records: &[(&str, Record)]) -> PathBuf {
        let mut prev = ZERO_HASH.to_owned();
        let mut text = String::new();
        for (i, (ts, r)) in records.iter().enumerate() {
            let (line, hash) = seal(i as u64 + 1, ts, r, &prev, None).unwrap();
            prev = hash;
            text.push_str(&line);
            text.push('\n');
        }
        let path = dir.join("audit.jsonl");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn proxy(client: &str, connector: &str, decision: Decision) -> Record {
        let mut r = Record::new(Event::Proxy);
        r.client = Some(client.into());
        r.connector = Some(connector.into());
        r.decision = Some(decision);
        r.method = Some("GET".into());
        r.path = Some("/repos/acme/w/issues".into());
        r
    }

    fn sample(dir: &Path) -> PathBuf {
        let mut startup = Record::new(Event::Startup);
        startup.version = Some("0.1.0".into());
        let mut evil = proxy("bot", "github", Decision::Deny);
        evil.path = Some("/x\u{1b}[31m".into());
        write_log(
            dir,
            &[
                ("2026-11-25T10:00:00.000000Z", startup),
                (
                    "2026-11-25T10:00:01.000000Z",
                    proxy("bot", "github", Decision::Allow),
                ),
                (
                    "2026-11-25T11:00:00.000000Z",
                    proxy("sync", "slack", Decision::Allow),
                ),
                ("2026-11-26T09:00:00.000000Z", evil),
            ],
        )
    }

    #[test]
    fn several_files_merge_into_one_timeline() {
        let dir = tempfile::tempdir().unwrap();
        // Allow records of `client`s at the given seconds, in one replica's own file.
        let log = |name: &str, entries: &[(u32, &str)]| {
            let stamped: Vec<(String, Record)> = entries
                .iter()
                .map(|(sec, client)| {
                    let ts = format!("2026-01-01T00:00:{sec:02}.000000Z");
                    (ts, proxy(client, "gh", Decision::Allow))
                })
                .collect();
            let records: Vec<(&str, Record)> = stamped
                .iter()
                .map(|(ts, r)| (ts.as_str(), r.clone()))
                .collect();
            let sub = dir.path().join(name);
            std::fs::create_dir(&sub).unwrap();
            write_log(&sub, &records)
        };
        let a = log("a", &[(1, "a1"), (3, "a2"), (5, "a3")]);
        let b = log("b", &[(2, "b1"), (3, "b2"), (4, "b3")]);
        let clients = |paths: &[PathBuf]| {
            let (_, out) = query(paths, &QueryFilter::default(), true);
            out.lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["client"].clone())
                .map(|c| c.as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        // By time; on a tie, the file given first.
        assert_eq!(
            clients(&[a.clone(), b.clone()]),
            ["a1", "b1", "a2", "b2", "b3", "a3"]
        );
        assert_eq!(clients(&[b, a]), ["a1", "b1", "b2", "a2", "b3", "a3"]);
    }

    /// The same file given twice, or a copy overlapping it: each record is passed once.
    #[test]
    fn a_record_given_twice_is_passed_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        let copy = dir.path().join("copy.jsonl");
        let text = std::fs::read_to_string(&path).unwrap();
        // The archived copy holds the first three records only.
        let first_three: String = text.split_inclusive('\n').take(3).collect();
        std::fs::write(&copy, first_three).unwrap();
        let records = text.lines().count() as u64;
        let all = QueryFilter::default();
        assert_eq!(query(&[path.clone(), path.clone()], &all, true).0, records);
        let (n, out) = query(&[copy, path.clone()], &all, true);
        assert_eq!(n, records);
        assert_eq!(out, text);
        let mut seen = RecentHashes::default();
        assert!(seen.is_new("not a record") && seen.is_new("not a record"));
        assert!(seen.is_new("{\"hash\":\"é\"}"));
        assert_eq!(seen.duplicates, 0);
    }

    #[test]
    fn an_overlong_last_line_is_an_error_not_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = sample(dir.path());
        let file = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        let len = file.metadata().unwrap().len();
        file.set_len(len + MAX_LINE_BYTES + 2).unwrap();
        let mut out = Vec::new();
        let r = run_query(&[p], &QueryFilter::default(), true, &mut out);
        assert!(
            matches!(r, Err(QueryError::BadLine { line: 5, .. })),
            "{r:?}"
        );
    }

    fn query(paths: &[PathBuf], filter: &QueryFilter, json: bool) -> (u64, String) {
        let mut out = Vec::new();
        let n = run_query(paths, filter, json, &mut out).unwrap().printed;
        (n, String::from_utf8(out).unwrap())
    }

    #[test]
    fn filters_combine() {
        let dir = tempfile::tempdir().unwrap();
        let p = [sample(dir.path())];
        let all = QueryFilter::default();
        assert_eq!(query(&p, &all, true).0, 4);
        let bot = QueryFilter {
            client: Some("bot".into()),
            ..Default::default()
        };
        assert_eq!(query(&p, &bot, true).0, 2);
        let bot_deny = QueryFilter {
            decision: Some(Decision::Deny),
            ..bot.clone()
        };
        assert_eq!(query(&p, &bot_deny, true).0, 1);
        let startup = QueryFilter {
            event: Some(Event::Startup),
            ..Default::default()
        };
        assert_eq!(query(&p, &startup, true).0, 1);
        let slack = QueryFilter {
            connector: Some("slack".into()),
            ..Default::default()
        };
        assert_eq!(query(&p, &slack, true).0, 1);
        let window = QueryFilter {
            since: Some(parse_time("2026-11-25T10:00:01Z", Utc::now()).unwrap()),
            until: Some(parse_time("2026-11-26", Utc::now()).unwrap()),
            ..Default::default()
        };
        assert_eq!(query(&p, &window, true).0, 2);
    }

    #[test]
    fn json_output_is_the_original_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = sample(dir.path());
        let filter = QueryFilter {
            client: Some("sync".into()),
            ..Default::default()
        };
        let (_, out) = query(std::slice::from_ref(&p), &filter, true);
        let original = std::fs::read_to_string(&p).unwrap();
        assert_eq!(out, format!("{}\n", original.lines().nth(2).unwrap()));
    }

    #[test]
    fn admin_actions_show_their_target_and_result_and_join_its_history() {
        let dir = tempfile::tempdir().unwrap();
        let admin = |action: &str, target: &str, result: &str| {
            let mut r = Record::new(Event::Admin);
            r.action = Some(action.into());
            r.actor = Some("admin@127.0.0.1:50000".into());
            r.target = Some(target.into());
            r.result = Some(result.into());
            r
        };
        let path = write_log(
            dir.path(),
            &[
                (
                    "2026-11-25T10:00:00.000000Z",
                    admin("reload", "/etc/cb.toml", "denied"),
                ),
                (
                    "2026-11-25T10:00:01.000000Z",
                    admin("reload", "/etc/cb.toml", "ok"),
                ),
                (
                    "2026-11-25T10:00:02.000000Z",
                    admin("disable", "connector:gh", "ok"),
                ),
                (
                    "2026-11-25T10:00:03.000000Z",
                    admin("revoke", "client:bot2", "ok"),
                ),
                (
                    "2026-11-25T10:00:04.000000Z",
                    proxy("bot2", "gh", Decision::Deny),
                ),
                // A client named like the target's kind is not matched by it.
                (
                    "2026-11-25T10:00:05.000000Z",
                    admin("revoke", "client:bot22", "ok"),
                ),
            ],
        );
        let (_, table) = query(std::slice::from_ref(&path), &QueryFilter::default(), false);
        let lines: Vec<&str> = table.lines().collect();
        let col = |name: &str| lines[0].find(name).unwrap();
        let at = |line: &str, c: usize| line[c..].split_whitespace().next().unwrap().to_owned();
        assert_eq!(at(lines[1], col("DECISION")), "denied");
        assert_eq!(at(lines[2], col("DECISION")), "ok");
        assert!(
            lines[1].contains("/etc/cb.toml by admin@127.0.0.1:50000"),
            "{table}"
        );
        assert_eq!(at(lines[3], col("CONNECTOR")), "gh");
        assert_eq!(at(lines[4], col("CLIENT")), "bot2");
        let client = QueryFilter {
            client: Some("bot2".into()),
            ..QueryFilter::default()
        };
        let (n, out) = query(std::slice::from_ref(&path), &client, true);
        assert_eq!(n, 2, "{out}");
        assert!(out.contains("\"target\":\"client:bot2\""));
        let connector = QueryFilter {
            connector: Some("gh".into()),
            ..QueryFilter::default()
        };
        let (n, out) = query(std::slice::from_ref(&path), &connector, true);
        assert_eq!(n, 2, "{out}");
        assert!(out.contains("\"target\":\"connector:gh\""));
    }

    #[test]
    fn table_is_aligned_and_escapes_control_characters() {
        let dir = tempfile::tempdir().unwrap();
        let (n, out) = query(&[sample(dir.path())], &QueryFilter::default(), false);
        assert_eq!(n, 4);
        assert!(!out.contains('\u{1b}'), "raw escape in table output");
        assert!(out.contains("/x\\u{1b}[31m"));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5);
        assert!(lines[0].starts_with("TS"));
        let col = lines[0].find("EVENT").unwrap();
        assert_eq!(&lines[1][col..col + 7], "startup");
        assert_eq!(&lines[2][col..col + 5], "proxy");
    }

    #[test]
    fn torn_last_line_is_skipped_but_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = sample(dir.path());
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.extend_from_slice(b"{\"seq\":5,");
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(
            query(std::slice::from_ref(&p), &QueryFilter::default(), true).0,
            4
        );
        bytes.extend_from_slice(b"\n");
        std::fs::write(&p, &bytes).unwrap();
        let err = run_query(&[p], &QueryFilter::default(), true, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, QueryError::BadLine { line: 5, .. }), "{err}");
    }

    #[test]
    fn relative_and_absolute_times() {
        let now = DateTime::parse_from_rfc3339("2026-11-26T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let at = |s: &str| parse_time(s, now).unwrap().to_rfc3339();
        assert_eq!(at("1h"), "2026-11-26T11:00:00+00:00");
        assert_eq!(at("30m"), "2026-11-26T11:30:00+00:00");
        assert_eq!(at("7d"), "2026-11-19T12:00:00+00:00");
        assert_eq!(at("2026-11-20T01:02:03+02:00"), "2026-11-19T23:02:03+00:00");
        assert_eq!(at("2026-11-20"), "2026-11-20T00:00:00+00:00");
        assert!(parse_time("yesterday", now).is_err());
        assert!(parse_time("", now).is_err());
    }
}
