//! The audit log's files (DESIGN §5): opening the current file, rotating it, and finding
//! where the chain stands at start — the last intact record of the current file, or of the
//! newest rotated one — so the writer continues `seq` and `prev` from it. Also what `check`
//! asks beforehand: whether `serve` could do all that ([`check_openable`]).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use crate::audit::chain::{self, ChainError};
use crate::audit::AuditError;
use crate::secret::Secret;

/// Start-up reads this much of the file's end first when looking for the last intact record.
const TAIL_WINDOW: u64 = 64 * 1024;
/// Start-up never cuts more than this: a longer damaged tail is left for a human to inspect.
pub(super) const MAX_CUT: u64 = 32 * 1024 * 1024;

/// Opens (or creates) the log for appending, locked for this process (`flock`, released when
/// the file is closed): a second broker started on the same file — a double start, an
/// overlapping restart — would otherwise take the record this one is writing for a torn tail,
/// cut it, and fork the chain.
pub(super) fn open_log(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)?;
    file.try_lock().map_err(|e| match e {
        std::fs::TryLockError::WouldBlock => io::Error::new(
            io::ErrorKind::WouldBlock,
            "another process is writing this audit log",
        ),
        std::fs::TryLockError::Error(e) => e,
    })?;
    // A file just created is durable only once its folder entry is (rare: start, rotation).
    sync_dir(path);
    Ok(file)
}

/// Makes a rename durable. Best effort: not every platform can sync a directory.
pub(super) fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
            tracing::warn!(error = %e, "cannot sync the audit log folder");
        }
    }
}

/// `PATH.N`.
pub(super) fn rotated_path(path: &Path, n: u64) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Renames `path` to the next free `PATH.N`, never over an existing file: a rename replaces
/// its target silently, and a wrong N (say, a folder that could not be listed) would put the
/// newest records over the oldest ones.
pub(super) fn rotate_file(path: &Path) -> io::Result<()> {
    let next = highest_rotation(path)?
        .checked_add(1)
        .ok_or_else(|| io::Error::other("no rotation number is left after the highest one"))?;
    let target = rotated_path(path, next);
    match std::fs::symlink_metadata(&target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::rename(path, &target),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists", target.display()),
        )),
        Err(e) => Err(e),
    }
}

/// Whether `serve` could open the log at `path` with `key` and continue its chain, found
/// without creating, cutting or locking anything (`credbroker check`, which may run beside a
/// broker writing this very file): a folder where the file should be, a file where a folder
/// should be, a last record that does not verify under `key` (a changed `hmac_key`), a
/// newest rotated file that was compressed, a tail too damaged to cut.
pub fn check_openable(path: &Path, key: Option<&Secret>) -> Result<(), AuditError> {
    let io = |context: String| move |source| AuditError::Io { context, source };
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => {
            let mut file = File::open(path).map_err(io(format!("opening {}", path.display())))?;
            // The length of the file opened, not of the one looked at: a rotation in between
            // (a broker is writing it) would make a length read first point past its end.
            let len = file
                .metadata()
                .map_err(io(format!("reading {}", path.display())))?
                .len();
            if scan_tail(&mut file, len, key, path)?.last.is_none() {
                last_rotated_record(path, key)?;
            }
            Ok(())
        }
        Ok(_) => Err(AuditError::Io {
            context: format!("opening {}", path.display()),
            source: io::Error::other("not a regular file"),
        }),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            let folder = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            // `serve` creates the missing folders, which needs the nearest existing one to be
            // a folder.
            if let Some(existing) = folder.ancestors().find(|a| a.exists()) {
                if !existing.is_dir() {
                    return Err(AuditError::Io {
                        context: format!("creating {}", folder.display()),
                        source: io::Error::other(format!("{} is not a folder", existing.display())),
                    });
                }
            }
            // Rotated files can only lie in a folder that exists.
            if folder.is_dir() {
                last_rotated_record(path, key)?;
            }
            Ok(())
        }
        Err(source) => Err(AuditError::Io {
            context: format!("reading {}", path.display()),
            source,
        }),
    }
}

/// The highest N of the existing `PATH.N` files, 0 when there are none; an error when the
/// folder cannot be listed in full (the answer would be a guess).
pub(super) fn highest_rotation(path: &Path) -> io::Result<u64> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(0);
    };
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_owned(),
        None => PathBuf::from("."),
    };
    let mut highest = 0;
    for entry in std::fs::read_dir(dir)? {
        let file = entry?.file_name();
        let n = file
            .to_str()
            .and_then(|f| f.strip_prefix(name))
            .and_then(|f| f.strip_prefix('.'))
            // `audit.jsonl.3`, and also `audit.jsonl.3.gz`: a rotated file compressed since
            // still holds its number, which the next rotation must not take again.
            .map(|n| n.split_once('.').map_or(n, |(number, _)| number))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<u64>().ok());
        highest = highest.max(n.unwrap_or(0));
    }
    Ok(highest)
}

/// The last intact record of a file.
pub(super) struct Tail {
    pub(super) seq: u64,
    pub(super) hash: String,
    pub(super) ts: DateTime<Utc>,
}

/// Where the intact part of a file ends and its last record.
pub(super) struct TailScan {
    pub(super) end: u64,
    pub(super) last: Option<Tail>,
}

/// Finds the last complete line that parses and whose hash re-computes. The bytes after the
/// last `\n` are a torn write (records are written with their newline in one `write`), and
/// complete lines holding a NUL byte — which no record holds raw (JSON escapes it) — what a
/// crash leaves where data never reached the disk (a record's start, NULs, a later record's
/// end): that is the damaged tail. Any other complete line that does not verify — not JSON, a member
/// renamed, a hash that does not re-compute — is no write of this broker's that failed but
/// a wrong key or an altered file: opening fails rather than destroy evidence.
pub(super) fn scan_tail(
    file: &mut File,
    len: u64,
    key: Option<&Secret>,
    path: &Path,
) -> Result<TailScan, AuditError> {
    let scan = find_last_intact(file, len, key, path)?;
    // The search reads ever larger windows, the last past MAX_CUT: what it found may lie
    // further back than start-up may cut.
    if len - scan.end > MAX_CUT {
        return Err(AuditError::TailTooDamaged {
            path: path.to_owned(),
        });
    }
    Ok(scan)
}

fn find_last_intact(
    file: &mut File,
    len: u64,
    key: Option<&Secret>,
    path: &Path,
) -> Result<TailScan, AuditError> {
    let io = |source| AuditError::Io {
        context: format!("reading the tail of {}", path.display()),
        source,
    };
    let mut window = TAIL_WINDOW.min(len);
    loop {
        let start = len - window;
        let mut bytes = Vec::new();
        file.seek(SeekFrom::Start(start)).map_err(io)?;
        Read::take(&mut *file, window)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if let Some(found) = last_intact_line(&bytes, start == 0, key) {
            let (end, tail) = found.map_err(|reason| AuditError::TailUnverifiable {
                path: path.to_owned(),
                reason,
            })?;
            // No log reaches 2^63 records: a `seq` that high is a crafted line, and counting
            // on from it would wrap to 0 (or panic the writer).
            if tail.seq >= 1 << 63 {
                return Err(AuditError::TailUnverifiable {
                    path: path.to_owned(),
                    reason: crate::audit::chain::ChainError::SeqExhausted,
                });
            }
            return Ok(TailScan {
                end: start + end as u64,
                last: Some(tail),
            });
        }
        if start == 0 {
            return Ok(TailScan { end: 0, last: None });
        }
        if window > MAX_CUT {
            return Err(AuditError::TailTooDamaged {
                path: path.to_owned(),
            });
        }
        window = (window * 4).min(len);
    }
}

/// In `bytes` (a file's end; `from_start` when it is the whole file), the end offset and
/// record of the last intact line, or the reason the last parsable line is not intact.
fn last_intact_line(
    bytes: &[u8],
    from_start: bool,
    key: Option<&Secret>,
) -> Option<Result<(usize, Tail), ChainError>> {
    // Complete lines end with `\n`; the first piece is a whole line only at the file's start.
    let mut end = bytes.iter().rposition(|&b| b == b'\n')?;
    loop {
        let begin = match bytes[..end].iter().rposition(|&b| b == b'\n') {
            Some(nl) => nl + 1,
            None if from_start => 0,
            None => return None,
        };
        let line = &bytes[begin..end];
        match chain::check_line(line, None, key) {
            Ok(checked) => {
                let ts = serde_json::from_slice::<crate::audit::record::Envelope>(line)
                    .ok()
                    .and_then(|e| DateTime::parse_from_rfc3339(&e.ts).ok())
                    .map_or(DateTime::<Utc>::MIN_UTC, |t| t.with_timezone(&Utc));
                let tail = Tail {
                    seq: checked.seq,
                    hash: checked.hash,
                    ts,
                };
                return Some(Ok((end + 1, tail)));
            }
            Err(ChainError::Unparsable(_)) if line.contains(&0) => match begin {
                0 => return None,
                _ => end = begin - 1,
            },
            Err(e) => return Some(Err(e)),
        }
    }
}

/// When the current file holds no record: the last record of the newest rotated file.
pub(super) fn last_rotated_record(
    path: &Path,
    key: Option<&Secret>,
) -> Result<Option<Tail>, AuditError> {
    // Not knowing whether there are rotated files would restart the chain at seq 1.
    let n = highest_rotation(path).map_err(|source| AuditError::Io {
        context: format!("listing the rotated files beside {}", path.display()),
        source,
    })?;
    if n == 0 {
        return Ok(None);
    }
    let rotated = rotated_path(path, n);
    // Missing when the newest rotated file was compressed (`.N.gz`): the chain cannot be
    // continued from it, and restarting it would fork it — a human decompresses it.
    let mut file = File::open(&rotated).map_err(|source| AuditError::Io {
        context: format!(
            "opening {}, the newest rotated file, to continue the chain from its last record \
             (if it was compressed, decompress it)",
            rotated.display()
        ),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| AuditError::Io {
            context: format!("reading {}", rotated.display()),
            source,
        })?
        .len();
    Ok(scan_tail(&mut file, len, key, &rotated)?.last)
}
