//! `audit verify`: re-checks the hash chain of one or more files read as one chain, streaming
//! line by line, and reports the first break (file, line number, reason).

use std::fmt;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use crate::audit::chain::{check_line, ChainError, Checked, ZERO_HASH};
use crate::audit::record::{read_line, LineRead, MAX_LINE_BYTES};
use crate::secret::Secret;

/// Why a file could not be verified at all (as opposed to a chain that is broken).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
}

/// How strict the start of the chain is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerifyOptions {
    /// Accept a chain whose first record has `seq > 1` (older rotated files were deleted).
    /// Off by default: then removing the first record is detected too.
    pub allow_later_start: bool,
}

/// The outcome of a verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records that verified (all of them when intact; those before the break otherwise).
    pub records: u64,
    /// The first verified record's seq (above 1 only with `allow_later_start`).
    pub first_seq: Option<u64>,
    /// The last verified record's seq and hash: worth noting down, since a plain chain cannot
    /// itself show that records after it were cut off.
    pub last: Option<(u64, String)>,
    /// The first break, if any.
    pub failure: Option<VerifyFailure>,
}

impl VerifyReport {
    /// True when every record verified.
    pub fn is_intact(&self) -> bool {
        self.failure.is_none()
    }
}

impl fmt::Display for VerifyReport {
    /// One line for `audit verify`: `intact: …` or `broken: FILE:LINE: reason …`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.failure {
            None => {
                write!(f, "intact: {} records", self.records)?;
                if let Some(seq) = self.first_seq.filter(|&seq| seq > 1) {
                    write!(
                        f,
                        " from seq {seq} (what came before it is not in these files)"
                    )?;
                }
                if let Some((seq, hash)) = &self.last {
                    write!(f, "; last record seq {seq}, hash {hash}")?;
                }
                Ok(())
            }
            Some(failure) => write!(
                f,
                "broken: {failure} ({} records verified before it)",
                self.records
            ),
        }
    }
}

/// Where the chain breaks first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyFailure {
    /// The file holding the bad line.
    pub file: PathBuf,
    /// The bad line's number in that file, from 1.
    pub line: u64,
    /// What is wrong with it.
    pub reason: FailureReason,
}

impl fmt::Display for VerifyFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.reason)
    }
}

/// What is wrong with the first bad line.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureReason {
    /// The stored hash does not re-compute (changed bytes, or a wrong or missing key).
    HashMismatch,
    /// `prev` is not the previous record's hash.
    BrokenLink,
    /// `seq` is not the previous seq + 1 (a gap or a repeat).
    SeqNotConsecutive {
        /// previous + 1
        expected: u64,
        /// what the line says
        found: u64,
    },
    /// The line is not a record (with the parser's message).
    Unparsable(String),
    /// `hash` is not the last member or not 64 lowercase hex digits.
    HashNotLast,
    /// The file ends without `\n`: a torn line.
    TornLine,
    /// A line longer than [`MAX_LINE_BYTES`]: not a record (and not read whole).
    LineTooLong,
    /// The record with seq 1 has a `prev` other than 64 zeros.
    FirstPrevNotZero,
    /// The chain does not start at seq 1 (see [`VerifyOptions::allow_later_start`]).
    StartsLate {
        /// The first record's seq.
        seq: u64,
    },
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HashMismatch => {
                f.write_str("hash mismatch: the record was changed, or the key is wrong")
            }
            Self::BrokenLink => f.write_str(
                "broken link: prev is not the previous record's hash (a record was removed, inserted or moved)",
            ),
            Self::SeqNotConsecutive { expected, found } => {
                write!(f, "seq {found} where {expected} was expected")
            }
            Self::Unparsable(why) => write!(f, "unparsable line: {why}"),
            Self::HashNotLast => f.write_str("`hash` is not the last member or is malformed"),
            Self::TornLine => f.write_str("torn line: the file ends without a newline"),
            Self::LineTooLong => write!(
                f,
                "a line longer than {} MiB: not a record",
                MAX_LINE_BYTES >> 20
            ),
            Self::FirstPrevNotZero => f.write_str("the record with seq 1 has a non-zero prev"),
            Self::StartsLate { seq } => write!(
                f,
                "the chain starts at seq {seq}, not 1 (if older files were deleted on purpose, \
                 --pruned verifies from the first record given)"
            ),
        }
    }
}

impl From<ChainError> for FailureReason {
    fn from(e: ChainError) -> Self {
        match e {
            ChainError::HashMismatch => Self::HashMismatch,
            ChainError::BrokenLink { .. } => Self::BrokenLink,
            ChainError::HashNotLast => Self::HashNotLast,
            // The chain's own message already starts "unparsable line: …".
            ChainError::Unparsable(why) => Self::Unparsable(why),
            // Only the writer's start refuses it; to a verifier the line is well formed.
            e @ ChainError::SeqExhausted => Self::Unparsable(e.to_string()),
        }
    }
}

/// Verifies `paths`, read in the given order as one chain that starts at seq 1.
pub fn verify_files(paths: &[PathBuf], key: Option<&Secret>) -> Result<VerifyReport, VerifyError> {
    verify_files_with(paths, key, VerifyOptions::default())
}

/// [`verify_files`] with options.
pub fn verify_files_with(
    paths: &[PathBuf],
    key: Option<&Secret>,
    opts: VerifyOptions,
) -> Result<VerifyReport, VerifyError> {
    let mut state = ChainState {
        key,
        opts,
        records: 0,
        first_seq: None,
        last: None,
    };
    for path in paths {
        if let Some((line, reason)) = state.verify_file(path)? {
            return Ok(state.into_report(Some(VerifyFailure {
                file: path.clone(),
                line,
                reason,
            })));
        }
    }
    Ok(state.into_report(None))
}

/// What carries from one line (and file) to the next.
struct ChainState<'k> {
    key: Option<&'k Secret>,
    opts: VerifyOptions,
    records: u64,
    first_seq: Option<u64>,
    last: Option<Checked>,
}

impl ChainState<'_> {
    /// Verifies one file; returns the first bad line's number and reason.
    fn verify_file(&mut self, path: &Path) -> Result<Option<(u64, FailureReason)>, VerifyError> {
        let io_err = |cause| VerifyError::Io {
            path: path.to_owned(),
            cause,
        };
        let mut reader = BufReader::with_capacity(1 << 16, File::open(path).map_err(io_err)?);
        let mut buf = Vec::with_capacity(1024);
        let mut line_no = 0;
        loop {
            let read = read_line(&mut reader, &mut buf).map_err(io_err)?;
            if read == LineRead::End {
                return Ok(None);
            }
            line_no += 1;
            match read {
                LineRead::Torn => return Ok(Some((line_no, FailureReason::TornLine))),
                LineRead::TooLong => return Ok(Some((line_no, FailureReason::LineTooLong))),
                LineRead::Line | LineRead::End => {}
            }
            if let Err(reason) = self.verify_line(&buf) {
                return Ok(Some((line_no, reason)));
            }
        }
    }

    /// Checks one line against the previous one and advances the state.
    fn verify_line(&mut self, line: &[u8]) -> Result<(), FailureReason> {
        let expected_prev = self.last.as_ref().map(|c| c.hash.as_str());
        let checked = check_line(line, expected_prev, self.key)?;
        match &self.last {
            Some(last) => {
                let expected = last.seq.wrapping_add(1);
                if checked.seq != expected {
                    return Err(FailureReason::SeqNotConsecutive {
                        expected,
                        found: checked.seq,
                    });
                }
            }
            None if checked.seq == 1 && checked.prev != ZERO_HASH => {
                return Err(FailureReason::FirstPrevNotZero)
            }
            None if checked.seq != 1 && !self.opts.allow_later_start => {
                return Err(FailureReason::StartsLate { seq: checked.seq })
            }
            None => {}
        }
        self.records += 1;
        self.first_seq.get_or_insert(checked.seq);
        self.last = Some(checked);
        Ok(())
    }

    fn into_report(self, failure: Option<VerifyFailure>) -> VerifyReport {
        VerifyReport {
            records: self.records,
            first_seq: self.first_seq,
            last: self.last.map(|c| (c.seq, c.hash)),
            failure,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use proptest::prelude::*;

    use super::*;
    use crate::audit::chain::seal;
    use crate::audit::record::{Decision, Event, Record};

    /// Seals `n` records into lines (each with its `\n`).
    fn chain(n: u64, first_seq: u64, first_prev: &str, key: Option<&Secret>) -> Vec<String> {
        let mut prev = first_prev.to_owned();
        (0..n)
            .map(|i| {
                let mut r = Record::new(Event::Proxy);
                r.client = Some(format!("client-{i}"));
                r.decision = Some(if i % 2 == 0 {
                    Decision::Allow
                } else {
                    Decision::Deny
                });
                let ts = format!("2026-11-26T05:03:{:02}.000000Z", i % 60);
                let (line, hash) = seal(first_seq + i, &ts, &r, &prev, key).unwrap();
                prev = hash;
                format!("{line}\n")
            })
            .collect()
    }

    fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        File::create(&path).unwrap().write_all(bytes).unwrap();
        path
    }

    fn verify_bytes(bytes: &[u8]) -> VerifyReport {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), "a.jsonl", bytes);
        verify_files(&[path], None).unwrap()
    }

    #[test]
    fn intact_chain_over_several_files() {
        let dir = tempfile::tempdir().unwrap();
        let lines = chain(5, 1, ZERO_HASH, None);
        let a = write_file(dir.path(), "a.1", lines[..2].concat().as_bytes());
        let empty = write_file(dir.path(), "a.2", b"");
        let b = write_file(dir.path(), "a", lines[2..].concat().as_bytes());
        let report = verify_files(&[a.clone(), empty, b.clone()], None).unwrap();
        assert!(report.is_intact(), "{report:?}");
        assert_eq!(report.records, 5);
        assert_eq!(report.last.as_ref().map(|l| l.0), Some(5));
        assert!(report
            .to_string()
            .starts_with("intact: 5 records; last record seq 5"));
        // Files out of order break the chain at the first line of the later file.
        let report = verify_files(&[b.clone(), a], None).unwrap();
        assert!(report.to_string().starts_with("broken: "), "{report}");
        assert!(
            report.to_string().contains(":1: the chain starts at seq 3"),
            "{report}"
        );
        let failure = report.failure.unwrap();
        assert_eq!(failure.file, b);
        assert_eq!(failure.line, 1);
        assert_eq!(failure.reason, FailureReason::StartsLate { seq: 3 });
    }

    #[test]
    fn later_start_only_when_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let lines = chain(3, 10, &"a".repeat(64), None);
        let p = write_file(dir.path(), "x", lines.concat().as_bytes());
        assert!(!verify_files(std::slice::from_ref(&p), None)
            .unwrap()
            .is_intact());
        let opts = VerifyOptions {
            allow_later_start: true,
        };
        assert!(verify_files_with(&[p], None, opts).unwrap().is_intact());
    }

    #[test]
    fn first_record_needs_zero_prev() {
        let lines = chain(2, 1, &"a".repeat(64), None);
        let failure = verify_bytes(lines.concat().as_bytes()).failure.unwrap();
        assert_eq!(
            (failure.line, failure.reason),
            (1, FailureReason::FirstPrevNotZero)
        );
    }

    #[test]
    fn torn_line_and_missing_file() {
        let lines = chain(3, 1, ZERO_HASH, None);
        let mut bytes = lines.concat().into_bytes();
        bytes.pop();
        let report = verify_bytes(&bytes);
        assert_eq!(report.records, 2);
        let failure = report.failure.unwrap();
        assert_eq!((failure.line, failure.reason), (3, FailureReason::TornLine));
        let missing = verify_files(&[PathBuf::from("/nonexistent/credbroker/x")], None);
        assert!(matches!(missing, Err(VerifyError::Io { .. })));
    }

    #[test]
    fn an_overlong_line_is_refused_without_being_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_file(
            dir.path(),
            "a",
            chain(2, 1, ZERO_HASH, None).concat().as_bytes(),
        );
        // Bytes appended with no newline, more than a record could be (sparse: no disk).
        let file = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        let len = file.metadata().unwrap().len();
        file.set_len(len + MAX_LINE_BYTES + 2).unwrap();
        let report = verify_files(&[p], None).unwrap();
        assert_eq!(report.records, 2);
        let failure = report.failure.unwrap();
        assert_eq!(
            (failure.line, failure.reason),
            (3, FailureReason::LineTooLong)
        );
    }

    #[test]
    fn keyed_chain_verifies_only_with_the_right_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = Secret::new("right");
        let p = write_file(
            dir.path(),
            "k",
            chain(3, 1, ZERO_HASH, Some(&key)).concat().as_bytes(),
        );
        assert!(verify_files(std::slice::from_ref(&p), Some(&key))
            .unwrap()
            .is_intact());
        let wrong = verify_files(std::slice::from_ref(&p), Some(&Secret::new("wrong"))).unwrap();
        assert_eq!(wrong.failure.unwrap().reason, FailureReason::HashMismatch);
        let none = verify_files(&[p], None).unwrap();
        assert_eq!(none.failure.unwrap().reason, FailureReason::HashMismatch);
    }

    /// A single mutation of a valid chain of `n` lines.
    #[derive(Clone, Debug)]
    enum Mutation {
        FlipByte { at: usize, bit: u8 },
        Delete { line: usize },
        Insert { copy: usize, before: usize },
        Swap { a: usize, b: usize },
        Truncate { keep: usize },
    }

    fn mutation(n: usize, total_bytes: usize) -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (0..total_bytes, 0u8..8).prop_map(|(at, bit)| Mutation::FlipByte { at, bit }),
            // Deleting the last record is undetectable by design (DESIGN §5); only before it.
            (0..n - 1).prop_map(|line| Mutation::Delete { line }),
            (0..n, 0..n).prop_map(|(copy, before)| Mutation::Insert { copy, before }),
            (0..n - 1, 0..n - 1)
                .prop_filter("distinct", |(a, b)| a != b)
                .prop_map(|(a, b)| Mutation::Swap { a, b }),
            (1..total_bytes).prop_map(|keep| Mutation::Truncate { keep }),
        ]
    }

    fn apply(lines: &[String], m: &Mutation) -> Vec<u8> {
        let mut lines = lines.to_vec();
        match *m {
            Mutation::FlipByte { at, bit } => {
                let mut bytes = lines.concat().into_bytes();
                bytes[at] ^= 1 << bit;
                return bytes;
            }
            Mutation::Delete { line } => {
                lines.remove(line);
            }
            Mutation::Insert { copy, before } => {
                let l = lines[copy].clone();
                lines.insert(before, l);
            }
            Mutation::Swap { a, b } => lines.swap(a, b),
            Mutation::Truncate { keep } => {
                let mut bytes = lines.concat().into_bytes();
                bytes.truncate(keep);
                return bytes;
            }
        }
        lines.concat().into_bytes()
    }

    const N: usize = 5;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn every_single_mutation_is_detected(
            m in mutation(N, chain(N as u64, 1, ZERO_HASH, None).concat().len())
        ) {
            let lines = chain(N as u64, 1, ZERO_HASH, None);
            let bytes = apply(&lines, &m);
            // Truncating exactly at a line end is a cut tail, which a plain chain cannot see.
            let at_line_end = matches!(m, Mutation::Truncate { .. } if bytes.last() == Some(&b'\n'));
            prop_assume!(!at_line_end);
            let report = verify_bytes(&bytes);
            prop_assert!(!report.is_intact(), "undetected: {:?}", m);
        }
    }
}
