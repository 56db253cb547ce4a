//! The hash-chained JSON-lines audit log (DESIGN §5, §6) and the auditor tools behind
//! `credbroker audit verify | query | report`.
//!
//! - [`record`]: the record types; [`chain`]: the chain rule as pure functions;
//! - [`writer`]: [`AuditLog`], the group-committing writer; [`files`]: opening, rotating and
//!   recovering its files (where the chain stands at start);
//! - [`verify`], [`query`], [`report`]: the library side of the `audit` commands.

use std::path::PathBuf;
use std::sync::Arc;

pub mod chain;
mod encode;
pub mod files;
mod gather;
pub mod query;
pub mod record;
mod relay;
pub mod report;
pub mod verify;
pub mod writer;

pub use chain::{ChainError, ZERO_HASH};
pub use query::{parse_time, run_query, QueryCounts, QueryError, QueryFilter, TimeError};
pub use record::{Decision, Event, Record, StoredRecord};
pub use report::{run_report, GrantInfo, ReportError};

pub use verify::{
    verify_files, verify_files_with, FailureReason, VerifyError, VerifyFailure, VerifyOptions,
    VerifyReport,
};
pub use writer::{
    AppendLate, AuditLog, AuditOptions, AuditStats, FsyncObserver, FsyncPolicy, PendingAppend,
};

/// Why the audit log could not be opened or a record not be appended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// A file operation failed while opening the log.
    #[error("audit log: {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Writing or syncing the batch holding this record failed; the record is not in the log
    /// (the file was cut back). The next append tries again.
    #[error("audit log write failed: {0}")]
    Write(#[source] Arc<std::io::Error>),
    /// The writer was closed.
    #[error("audit log is closed")]
    Closed,
    /// The record was queued but not acknowledged by its deadline (a write or `fdatasync`
    /// that does not return): it may still be written later. Answer 503.
    #[error("audit log: the record was not acknowledged in time (the disk is not answering)")]
    TimedOut,
    /// Too many records already wait for the writer (its disk stopped answering): this one
    /// was refused rather than queued without bound. Answer 503.
    #[error("audit log: too many records are waiting for the disk")]
    Backlog,
    /// The last parsable record does not verify (wrong `hmac_key`, or the file was altered):
    /// the log is left untouched rather than cut.
    #[error("audit log {path}: the last record does not verify ({reason}); wrong hmac_key or an altered file")]
    TailUnverifiable {
        /// The file.
        path: PathBuf,
        /// What is wrong with the record.
        reason: ChainError,
    },
    /// No intact record in the file's last 32 MiB: too much to cut without a human looking.
    #[error("audit log {path}: no intact record near the end of the file; refusing to cut it")]
    TailTooDamaged {
        /// The file.
        path: PathBuf,
    },
}

impl AuditError {
    /// The same failure, for another record of the batch it struck (the I/O error is shared).
    pub(crate) fn for_another_record(&self) -> AuditError {
        match self {
            Self::Write(e) => Self::Write(Arc::clone(e)),
            Self::Closed => Self::Closed,
            Self::Backlog => Self::Backlog,
            other => Self::Write(Arc::new(std::io::Error::other(other.to_string()))),
        }
    }
}
