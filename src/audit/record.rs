//! The audit record types (DESIGN §5): what callers hand to the writer ([`Record`]) and what
//! the auditor tools read back ([`StoredRecord`]).
//!
//! Field order in [`Record`] is the order members appear on the line, so it is part of the
//! file format: do not reorder fields.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::config::Grant;

/// What happened. Serialised in snake_case (`token_issued`, `proxy_result`, …).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// The token endpoint issued a token.
    TokenIssued,
    /// The token endpoint refused a token.
    TokenDenied,
    /// A proxy call's decision, written before forwarding.
    Proxy,
    /// The outcome of an allowed proxy call.
    ProxyResult,
    /// An admin action: reload, revoke, enable, reload failure.
    Admin,
    /// A dynamic credential was minted.
    CredentialRefreshed,
    /// The broker started.
    #[default]
    Startup,
    /// The broker stopped cleanly.
    Shutdown,
    /// A torn tail was cut at start-up.
    Recovered,
}

impl Event {
    /// The name as written in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TokenIssued => "token_issued",
            Self::TokenDenied => "token_denied",
            Self::Proxy => "proxy",
            Self::ProxyResult => "proxy_result",
            Self::Admin => "admin",
            Self::CredentialRefreshed => "credential_refreshed",
            Self::Startup => "startup",
            Self::Shutdown => "shutdown",
            Self::Recovered => "recovered",
        }
    }
}

/// A proxy call's decision: `"allow"` or `"deny"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The call was allowed (and is forwarded once this record is written).
    Allow,
    /// The call was refused.
    Deny,
}

impl Decision {
    /// The name as written in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// One audit record's event-specific fields. The writer adds `seq`, `ts`, `prev` and `hash`.
///
/// Every optional field is skipped when `None`; names are DESIGN §5's, plus `replica` (§7) and
/// `grant_reason`/`grant_expires` (see [`Record::elevated_by`]). Unknown members
/// are ignored when reading, so newer writers stay readable by older tools.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub event: Event,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connector: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// A token or call that relies on a time-bound grant (a break-glass elevation, DESIGN
    /// §3.3): the grants' reasons ([`Record::elevated_by`]). Not in DESIGN §5's table: the
    /// reason has to outlive the config that held it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_reason: Option<String>,
    /// When the first of those grants ends (RFC 3339, seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_expires: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_in: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_out: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

impl Record {
    /// A record of `event` with every optional field empty.
    pub fn new(event: Event) -> Self {
        Self {
            event,
            ..Self::default()
        }
    }

    /// The memory the record holds (its text fields' allocations and the record itself): what
    /// bounds the records waiting for a disk that stopped answering.
    pub fn size_in_memory(&self) -> usize {
        // Every field named, so that a new text field cannot be missed here unnoticed.
        let Self {
            event: _,
            request_id,
            client,
            connector,
            operation,
            method,
            path,
            query,
            jti,
            peer,
            decision: _,
            reason,
            status: _,
            scope,
            expires_at,
            grant_reason,
            grant_expires,
            duration_ms: _,
            bytes_in: _,
            bytes_out: _,
            upstream_request_id,
            error,
            action,
            actor,
            target,
            result,
            kind,
            version,
            config_sha256,
            truncated_bytes: _,
            replica,
        } = self;
        let texts = [
            request_id,
            client,
            connector,
            operation,
            method,
            path,
            query,
            jti,
            peer,
            reason,
            scope,
            expires_at,
            grant_reason,
            grant_expires,
            upstream_request_id,
            error,
            action,
            actor,
            target,
            result,
            kind,
            version,
            config_sha256,
            replica,
        ];
        let text: usize = texts
            .iter()
            .filter_map(|t| t.as_ref())
            .map(String::capacity)
            .sum();
        std::mem::size_of::<Self>() + text
    }

    /// Marks the record as made under time-bound grants (break-glass elevations): once the
    /// incident is closed and the grant removed from the config, the log still says why the
    /// client could do this. `grant_reason` lists the grants' reasons (distinct, in order,
    /// `; ` between them), `grant_expires` the earliest end. Grants without `expires` are
    /// skipped; with none left both are cleared (a call decided again after a reload may no
    /// longer rely on the elevation it did).
    pub fn elevated_by<'g>(&mut self, grants: impl IntoIterator<Item = &'g Grant>) {
        self.grant_reason = None;
        self.grant_expires = None;
        let mut reasons: Vec<&str> = Vec::new();
        let mut earliest: Option<DateTime<Utc>> = None;
        for grant in grants {
            let Some(expires) = grant.expires else {
                continue;
            };
            earliest = Some(earliest.map_or(expires, |e| e.min(expires)));
            if let Some(reason) = grant.reason.as_deref() {
                if !reasons.contains(&reason) {
                    reasons.push(reason);
                }
            }
        }
        let Some(earliest) = earliest else {
            return;
        };
        self.grant_expires = Some(earliest.to_rfc3339_opts(SecondsFormat::Secs, true));
        self.grant_reason = (!reasons.is_empty()).then(|| reasons.join("; "));
    }
}

/// The members the writer adds around a [`Record`]; read on their own by `verify`, which needs
/// nothing else, and together with the record by `query` and `report`.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct Envelope {
    pub seq: u64,
    pub ts: String,
    pub prev: String,
    pub hash: String,
}

/// A record as read back from a file: the writer's members plus the event's fields.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRecord {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// RFC 3339 UTC time with microseconds, as written.
    pub ts: String,
    /// The previous record's hash (64 zeros for the first record).
    pub prev: String,
    /// This record's hash.
    pub hash: String,
    /// The event and its fields.
    pub record: Record,
}

impl StoredRecord {
    /// Parses one line (without its `\n`). Does not check the hash; that is `verify`'s job.
    ///
    /// Two plain parses instead of `#[serde(flatten)]`: flatten buffers every member into an
    /// intermediate map and is slower than reading the line twice.
    pub fn parse(line: &str) -> Result<Self, serde_json::Error> {
        let envelope: Envelope = serde_json::from_str(line)?;
        let record: Record = serde_json::from_str(line)?;
        Ok(Self {
            seq: envelope.seq,
            ts: envelope.ts,
            prev: envelope.prev,
            hash: envelope.hash,
            record,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_fields_are_skipped_and_order_is_struct_order() {
        let mut r = Record::new(Event::Proxy);
        r.path = Some("/repos".into());
        r.client = Some("bot".into());
        r.decision = Some(Decision::Deny);
        r.status = Some(403);
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"event":"proxy","client":"bot","path":"/repos","decision":"deny","status":403}"#
        );
    }

    #[test]
    fn elevations_name_their_reasons_and_the_earliest_end() {
        let at = |s: &str| Some(s.parse::<DateTime<Utc>>().unwrap());
        let grant = |expires, reason: Option<&str>| Grant {
            connector: "gh".into(),
            operations: vec!["issues.comment".into()],
            max_ttl: None,
            expires,
            reason: reason.map(str::to_owned),
        };
        let standing = grant(None, Some("ignored: not time-bound"));
        let inc = grant(at("2026-12-01T00:00:00Z"), Some("INC-4711"));
        let inc_again = grant(at("2026-11-30T12:00:00.5Z"), Some("INC-4711"));
        let unexplained = grant(at("2026-12-02T00:00:00Z"), None);
        let chg = grant(at("2026-12-03T00:00:00Z"), Some("CHG-9"));
        let mut r = Record::new(Event::TokenIssued);
        r.elevated_by([&standing]);
        assert_eq!(
            (r.grant_reason.as_deref(), r.grant_expires.as_deref()),
            (None, None)
        );
        r.elevated_by([&standing, &inc, &unexplained, &chg, &inc_again]);
        assert_eq!(r.grant_reason.as_deref(), Some("INC-4711; CHG-9"));
        assert_eq!(r.grant_expires.as_deref(), Some("2026-11-30T12:00:00Z"));
        // Decided again under a standing grant: no longer elevated.
        r.elevated_by([&standing]);
        assert_eq!(
            (r.grant_reason.as_deref(), r.grant_expires.as_deref()),
            (None, None)
        );
        let mut r = Record::new(Event::Proxy);
        r.elevated_by([&unexplained]);
        assert_eq!(
            (r.grant_reason.as_deref(), r.grant_expires.as_deref()),
            (None, Some("2026-12-02T00:00:00Z"))
        );
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"event":"proxy","grant_expires":"2026-12-02T00:00:00Z"}"#
        );
    }

    #[test]
    fn default_event_is_startup_and_names_are_snake_case() {
        assert_eq!(Record::default().event, Event::Startup);
        let json = serde_json::to_string(&Event::CredentialRefreshed).unwrap();
        assert_eq!(json, "\"credential_refreshed\"");
        assert_eq!(Event::CredentialRefreshed.as_str(), "credential_refreshed");
    }

    #[test]
    fn stored_record_reads_envelope_and_fields() {
        let line = r#"{"seq":7,"ts":"2026-11-26T05:03:25.123456Z","event":"admin","action":"reload","future_field":1,"prev":"00","hash":"ab"}"#;
        let s = StoredRecord::parse(line).unwrap();
        assert_eq!(s.seq, 7);
        assert_eq!(s.record.event, Event::Admin);
        assert_eq!(s.record.action.as_deref(), Some("reload"));
        assert_eq!(s.hash, "ab");
        assert!(StoredRecord::parse(r#"{"seq":1}"#).is_err());
    }
}

/// The longest line the auditor tools read as a record (32 MiB, the most the writer ever cuts
/// at start-up). Real records are a few hundred bytes; a longer "line" (a sparse file, bytes
/// appended with no newline) is refused without being read whole.
pub const MAX_LINE_BYTES: u64 = 32 * 1024 * 1024;

/// One line of a log file, as the auditor tools read it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LineRead {
    /// A complete line (in the buffer, without its `\n`).
    Line,
    /// The end of the file.
    End,
    /// The file ends without `\n` (in the buffer: the torn bytes).
    Torn,
    /// More than [`MAX_LINE_BYTES`] without a `\n`: not a record, and not read further.
    TooLong,
}

/// Reads the next line into `buf` (cleared first), reading at most [`MAX_LINE_BYTES`] + 1
/// bytes of it.
pub(crate) fn read_line(
    reader: &mut impl std::io::BufRead,
    buf: &mut Vec<u8>,
) -> std::io::Result<LineRead> {
    use std::io::{BufRead as _, Read as _};
    buf.clear();
    let read = reader.take(MAX_LINE_BYTES + 1).read_until(b'\n', buf)?;
    Ok(match buf.last() {
        _ if read == 0 => LineRead::End,
        Some(b'\n') => {
            buf.pop();
            LineRead::Line
        }
        _ if read as u64 > MAX_LINE_BYTES => LineRead::TooLong,
        _ => LineRead::Torn,
    })
}

#[cfg(test)]
mod line_tests {
    use super::*;

    #[test]
    fn lines_are_read_up_to_the_limit() {
        let mut input = std::io::Cursor::new(b"one\ntwo\nthr".to_vec());
        let mut buf = Vec::new();
        assert_eq!(read_line(&mut input, &mut buf).unwrap(), LineRead::Line);
        assert_eq!(buf, b"one");
        assert_eq!(read_line(&mut input, &mut buf).unwrap(), LineRead::Line);
        assert_eq!(read_line(&mut input, &mut buf).unwrap(), LineRead::Torn);
        assert_eq!(buf, b"thr");
        assert_eq!(read_line(&mut input, &mut buf).unwrap(), LineRead::End);
        // A line as long as the limit is a line; one byte more, not a record.
        let mut long = vec![b'x'; MAX_LINE_BYTES as usize];
        long.push(b'\n');
        long.extend_from_slice(b"y".repeat(MAX_LINE_BYTES as usize + 1).as_slice());
        let mut input = std::io::Cursor::new(long);
        assert_eq!(read_line(&mut input, &mut buf).unwrap(), LineRead::Line);
        assert_eq!(read_line(&mut input, &mut buf).unwrap(), LineRead::TooLong);
        assert!(buf.len() as u64 <= MAX_LINE_BYTES + 1);
    }
}
