//! The audit writer (DESIGN §5, §6): one OS thread owns the file and commits records in groups.
//!
//! Callers send `(record, reply)` over a channel. The thread blocks for the first request,
//! drains whatever else is queued (up to [`MAX_BATCH`]), seals the batch in order, writes it
//! with one `write`, and under `fsync = "always"` syncs it with one `fdatasync` before answering
//! every waiter. If the write or sync fails, the file is cut back to its length before the batch
//! and seq/prev stay where they were, so the next batch simply tries again: the broker refuses
//! calls while the disk is full and serves again once it is not. Async callers on a worker
//! hand their records over together (`audit::gather`: one send for all the calls a runtime had
//! ready, so the writer is not woken by the first of them while the worker makes the rest)
//! and get their answers through their worker's relay (`audit::relay`): one cross-thread wake
//! a batch each way.
//!
//! Under `never` and `interval` nobody waits for a sync, and handing each record to another
//! thread would cost two context switches per call for nothing: there the callers seal and
//! write their records themselves, under a mutex, concurrent callers of one worker sharing a
//! write (`audit::gather`), and (for `interval`) a small thread syncs a dirty file every
//! 10 ms. Batching and fail-closed behaviour are the same code either way.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::audit::chain::{self, ZERO_HASH};
use crate::audit::files::{last_rotated_record, open_log, rotate_file, scan_tail, sync_dir};
use crate::audit::gather::{Gathers, Joined};
use crate::audit::record::{Event, Record};
use crate::audit::relay::{Answer, AnswerTx, Relays};
use crate::audit::AuditError;
use crate::secret::Secret;

/// The most records committed in one write.
pub const MAX_BATCH: usize = 1024;
/// Under `always` with many calls in flight, how long the writer first waits for more records
/// before a sync: one `fdatasync` then covers more calls. Each further wait, taken only if
/// records arrived during the last one, is twice as long.
const COMMIT_DELAY: Duration = Duration::from_micros(100);
/// The longest single wait: 100 + 200 + 400 + 800 µs (1.5 ms) at most before a sync.
const MAX_COMMIT_DELAY: Duration = Duration::from_micros(800);
/// The writer waits [`COMMIT_DELAY`] only when at least this many calls per record in the
/// batch are in flight elsewhere (PostgreSQL's `commit_siblings`, relative): their records
/// are coming. With fewer, the wait costs every caller more than the shared sync saves.
const SIBLINGS_PER_RECORD: usize = 4;
/// Under `interval`, the longest a written record waits for its sync.
const SYNC_INTERVAL: Duration = Duration::from_millis(10);
/// Under `always`, the most records waiting for the writer thread (queued, not yet answered),
/// at least: [`AuditLog::expect_in_flight`] raises it to what the listeners let be in flight
/// (each call waits on one record at a time). Only a disk that stopped answering fills it —
/// a healthy one takes a batch per sync —, and past it records are refused (503) instead of
/// piling up in memory while calls time out.
const MAX_QUEUED: usize = 64 * MAX_BATCH;
/// Under `always`, the most memory the records sent to the writer thread and not yet taken by
/// it may hold ([`Record::size_in_memory`]), detached ones included: a record holds its call's
/// path and query, so a count alone would let records of long paths pile up to gigabytes while
/// the disk does not answer. Past it a record someone waits on is refused (503) and a detached
/// one (an outcome nobody waits on) is dropped, logged and counted as a write error.
const MAX_QUEUED_BYTES: usize = 64 << 20;

/// When records reach the disk (DESIGN §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// `fdatasync` before a record is acknowledged (one per batch).
    Always,
    /// Acknowledge after `write`; sync at most 10 ms later.
    Interval,
    /// Never sync: page cache only.
    Never,
}

/// How to open the audit log.
#[derive(Clone, Debug)]
pub struct AuditOptions {
    /// The current log file; rotated files are `PATH.1`, `PATH.2`, … next to it.
    pub path: PathBuf,
    /// When to sync.
    pub fsync: FsyncPolicy,
    /// Rotate once the file is larger than this many bytes.
    pub rotate_bytes: Option<u64>,
    /// Key for an HMAC-SHA256 chain instead of plain SHA-256.
    pub hmac_key: Option<Secret>,
    /// This replica's name (`state.replica`), written into every record (DESIGN §7).
    pub replica: Option<String>,
}

/// Counters for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AuditStats {
    /// Records written.
    pub written: u64,
    /// Failed batch writes or syncs.
    pub write_errors: u64,
    /// Syncs done.
    pub fsyncs: u64,
    /// Total time spent in syncs.
    pub fsync_seconds_sum: f64,
    /// Rotations done.
    pub rotations: u64,
}

/// Called with each sync's duration (for a latency histogram).
pub type FsyncObserver = Arc<dyn Fn(Duration) + Send + Sync>;

/// A handle on the audit log: cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

struct Inner {
    /// The writer thread's queue (`always`), or `None` when callers write inline.
    tx: Option<mpsc::Sender<Msg>>,
    /// The writer itself when callers write inline (`never`, `interval`); `None` inside once
    /// closed.
    inline: Option<Arc<Mutex<Option<Writer>>>>,
    /// Inline callers sharing a write (`audit::gather`).
    gathers: Gathers,
    shared: Arc<Shared>,
    /// The writer thread (`always`) or the interval syncer.
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The last handle gone without `close`: an inline writer writes what it still holds and
/// closes the file (the writer thread does the same when its queue closes).
impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(inline) = &self.inline {
            if let Some(mut writer) = lock(inline).take() {
                writer.finish(None);
            }
        }
    }
}

/// Whether enough calls are in flight besides the `batch` waiting on a sync that holding it
/// back for [`COMMIT_DELAY`] gathers more than it delays.
fn records_are_coming(in_flight: usize, batch: usize) -> bool {
    in_flight.saturating_sub(batch) >= SIBLINGS_PER_RECORD * batch.max(1)
}

/// A proxied call in progress, for the writer's commit delay ([`AuditLog::call_in_flight`]);
/// counts nothing when no writer thread reads the count.
pub struct CallInFlight<'a>(Option<&'a AtomicUsize>);

impl Drop for CallInFlight<'_> {
    fn drop(&mut self) {
        if let Some(count) = self.0 {
            count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A record a background task will append ([`AuditLog::promise`]); dropping it ends the
/// promise, kept or not.
pub struct Promised(Arc<Shared>);

impl Drop for Promised {
    fn drop(&mut self) {
        self.0.promised.fetch_sub(1, Ordering::AcqRel);
        self.0.promise_ended.notify_waiters();
    }
}

/// State the handle and the writer thread share.
struct Shared {
    written: AtomicU64,
    write_errors: AtomicU64,
    fsyncs: AtomicU64,
    fsync_nanos: AtomicU64,
    /// When a write or sync last failed (ms since the Unix epoch; 0: never), for readiness.
    last_failure_ms: AtomicU64,
    rotations: AtomicU64,
    observer: ArcSwapOption<Box<dyn Fn(Duration) + Send + Sync>>,
    /// Under `always`: detached records left here by callers for the writer thread to take
    /// with its next batch, so that queuing one never wakes the thread (a context switch).
    #[allow(clippy::vec_box)]
    deferred: Mutex<Vec<Box<Record>>>,
    /// Set by `close`: later records are refused.
    closed: std::sync::atomic::AtomicBool,
    /// The last `fdatasync` failed: under `interval`, no batch is written (its calls get 503)
    /// until a later one succeeds — records acknowledged meanwhile would not be on disk.
    sync_failing: std::sync::atomic::AtomicBool,
    /// Under `always`: hands answers to async callers on their own runtime.
    relays: Arc<Relays>,
    /// Proxied calls in progress ([`AuditLog::call_in_flight`]).
    calls_in_flight: AtomicUsize,
    /// Records tasks without a caller waiting on them will append ([`AuditLog::promise`]).
    promised: AtomicUsize,
    /// Told when a promise is kept or broken.
    promise_ended: tokio::sync::Notify,
    /// Under `always`: records sent to the writer thread with someone waiting on them, not yet
    /// answered (bounded by `max_queued`).
    queued: AtomicUsize,
    /// [`MAX_QUEUED`], or more ([`AuditLog::expect_in_flight`]).
    max_queued: AtomicUsize,
    /// Under `always`: the memory of the records sent to the writer thread that it has not
    /// taken yet (bounded by [`MAX_QUEUED_BYTES`]).
    queued_bytes: AtomicUsize,
    /// Test hook: this many coming writes fail after writing half their bytes.
    #[cfg(test)]
    inject_failures: std::sync::atomic::AtomicU32,
    /// Test hook: this many coming syncs fail.
    #[cfg(test)]
    inject_sync_failures: std::sync::atomic::AtomicU32,
    /// Test counter: batch writes attempted.
    #[cfg(test)]
    batches: AtomicU64,
}

enum Msg {
    /// A record, and the memory it was counted with in `queued_bytes`.
    Append(Box<Record>, Reply, usize),
    /// A worker's gathered records (`audit::gather`), in the order they came, and their memory.
    Batch(Vec<(Box<Record>, Reply)>, usize),
    /// Close the log, after writing this last record if there is one; the answer is that
    /// record's outcome.
    Close(mpsc::SyncSender<Option<Answer>>, Option<Box<Record>>),
}

/// Why [`AuditLog::append_within`] returned without the record's seq.
pub enum AppendLate {
    /// The record is not in the log (see [`AuditLog::append`]).
    Failed(AuditError),
    /// Not acknowledged by the deadline: the write goes on.
    Pending(PendingAppend),
}

/// A write [`AuditLog::append_within`] stopped waiting for (only a writer thread's answer
/// can be late): it is in the writer's queue.
pub struct PendingAppend {
    log: AuditLog,
}

impl PendingAppend {
    /// Queues `next` behind the pending record: nobody waits for it, but unlike a detached
    /// record (which joins the deferred ones, written first in the next batch) it keeps its
    /// place in the queue.
    pub fn then_queue(self, next: Record) {
        if let Err(e) = self.log.append_behind(next) {
            tracing::error!(error = %e, "cannot queue the audit record that follows a late one");
        }
    }
}

/// Where the writer sends one record's outcome.
enum Reply {
    Async(AnswerTx),
    /// An async caller whose answer goes through its worker's relay.
    Relayed(AnswerTx, usize),
    Blocking(mpsc::SyncSender<Result<u64, AuditError>>),
    /// Nobody waits ([`AuditLog::append_detached`]): the record may ride with the next write.
    Detached,
    /// Nobody waits, but the record keeps its place in the queue ([`PendingAppend`]).
    Ordered,
}

impl Reply {
    /// Sends the outcome; a relayed one is left with its relay, whose worker is then added
    /// to `wake` (for one wake per worker and batch).
    fn send(self, result: Result<u64, AuditError>, relays: &Relays, wake: &mut Vec<usize>) {
        // A waiter that went away (request cancelled) no longer needs the answer.
        match self {
            Self::Relayed(tx, worker) => {
                if relays.deliver(worker, tx, result) && !wake.contains(&worker) {
                    wake.push(worker);
                }
            }
            Self::Async(tx) => drop(tx.send(result)),
            Self::Blocking(tx) => drop(tx.send(result)),
            Self::Detached | Self::Ordered => {}
        }
    }
}

impl AuditLog {
    /// Opens (creating the file and its parent folder if needed), reads the tail, continues
    /// seq/prev, cuts a torn or corrupt tail and writes a `recovered` record. Spawns the writer
    /// thread.
    pub fn open(opts: AuditOptions) -> Result<AuditLog, AuditError> {
        let shared = Arc::new(Shared {
            written: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            fsync_nanos: AtomicU64::new(0),
            last_failure_ms: AtomicU64::new(0),
            rotations: AtomicU64::new(0),
            observer: ArcSwapOption::empty(),
            deferred: Mutex::new(Vec::new()),
            closed: std::sync::atomic::AtomicBool::new(false),
            sync_failing: std::sync::atomic::AtomicBool::new(false),
            relays: Arc::new(Relays::new(crate::workers::count())),
            calls_in_flight: AtomicUsize::new(0),
            promised: AtomicUsize::new(0),
            promise_ended: tokio::sync::Notify::new(),
            queued: AtomicUsize::new(0),
            max_queued: AtomicUsize::new(MAX_QUEUED),
            queued_bytes: AtomicUsize::new(0),
            #[cfg(test)]
            inject_failures: std::sync::atomic::AtomicU32::new(0),
            #[cfg(test)]
            inject_sync_failures: std::sync::atomic::AtomicU32::new(0),
            #[cfg(test)]
            batches: AtomicU64::new(0),
        });
        let policy = opts.fsync;
        let writer = Writer::open(opts, shared.clone())?;
        let spawn_error = |source| AuditError::Io {
            context: "spawning the audit writer thread".into(),
            source,
        };
        let (tx, inline, thread) = if policy == FsyncPolicy::Always {
            let (tx, rx) = mpsc::channel();
            let thread = std::thread::Builder::new()
                .name("audit-writer".into())
                .spawn(move || writer.run(rx))
                .map_err(spawn_error)?;
            (Some(tx), None, Some(thread))
        } else {
            let inline = Arc::new(Mutex::new(Some(writer)));
            let flusher = Arc::downgrade(&inline);
            let thread = Some(
                std::thread::Builder::new()
                    .name("audit-flush".into())
                    .spawn(move || inline_flusher(&flusher))
                    .map_err(spawn_error)?,
            );
            (None, Some(inline), thread)
        };
        Ok(AuditLog {
            inner: Arc::new(Inner {
                tx,
                inline,
                gathers: Gathers::new(crate::workers::count()),
                shared,
                thread: Mutex::new(thread),
            }),
        })
    }

    /// Appends one record; resolves once it is written (and, under `always`, synced).
    /// Returns the record's seq. An error means the record is not in the log: answer 503.
    /// Dropping the future does not withdraw a record already queued; it is still written.
    pub async fn append(&self, record: Record) -> Result<u64, AuditError> {
        if let Some(inline) = &self.inner.inline {
            let Some(slot) = self.inner.gathers.slot_for_caller() else {
                // Off the worker pool: written by this caller alone, now.
                return lock(inline)
                    .as_mut()
                    .ok_or(AuditError::Closed)?
                    .commit_after_pending([&record]);
            };
            return match self.inner.gathers.join(slot, record) {
                Joined::Joiner(answer) => answer.await.map_err(|_| AuditError::Closed)?,
                Joined::Leader(slot) => {
                    let lead = self.lead(slot, None);
                    // Let this runtime's other ready calls reach their audit step and join.
                    tokio::task::yield_now().await;
                    lead.write()
                }
            };
        }
        // Under `always` the writer thread answers; through a relay, its wake-ups stay few.
        // Callers on a worker also hand their records over together (`audit::gather`): one
        // send per gathering, so the writer is woken once for what a runtime had ready, not
        // by the first record of it, preempting the worker that is still making the rest.
        let relay = match self.inner.tx {
            Some(_) => self.inner.shared.relays.for_caller(),
            None => None,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        match relay.zip(self.inner.gathers.slot_for_caller()) {
            Some((worker, slot)) => match self.inner.gathers.join(slot, record) {
                Joined::Joiner(answer) => return answer.await.map_err(|_| AuditError::Closed)?,
                Joined::Leader(slot) => {
                    let lead = self.lead(slot, Some((tx, worker)));
                    tokio::task::yield_now().await;
                    lead.hand_over()?;
                }
            },
            None => self.send(record, Reply::Async(tx))?,
        }
        rx.await.map_err(|_| AuditError::Closed)?
    }

    /// Up to `calls` calls may wait on a record at once (the listeners' bound): records waiting
    /// for the writer are refused only past that many (and never below [`MAX_QUEUED`]), so a
    /// healthy burst is never taken for a stalled disk.
    pub fn expect_in_flight(&self, calls: usize) {
        self.inner
            .shared
            .max_queued
            .store(calls.max(MAX_QUEUED), Ordering::Relaxed);
    }

    /// [`Self::append`], waiting at most until `deadline` for the answer (DESIGN §6: per-request
    /// time is bounded, also when the disk stops answering). Only the writer thread's answer
    /// can be late; inline writes (`never`, `interval`) happen on the caller's thread.
    /// [`AuditError::TimedOut`] means the record may still be written later.
    pub async fn append_by(&self, record: Record, deadline: Instant) -> Result<u64, AuditError> {
        if self.inner.inline.is_some() {
            return self.append(record).await;
        }
        // Boxed: a timer makes a future large, and this one is part of every call's future
        // (a proxied call's is moved and held for each call), inline writes included.
        Box::pin(tokio::time::timeout_at(
            deadline.into(),
            self.append(record),
        ))
        .await
        .unwrap_or(Err(AuditError::TimedOut))
    }

    /// [`Self::append_by`] for a record whose caller owes a second one if the first is late
    /// (a call refused because its allow record was not acknowledged in time): the record
    /// stays queued, and [`PendingAppend::then_queue`] queues the second behind it, in the
    /// writer's order — never before it, in the same write or a later one, and before a
    /// `shutdown` record.
    pub async fn append_within(
        &self,
        record: Record,
        deadline: Instant,
    ) -> Result<u64, AppendLate> {
        match self.append_by(record, deadline).await {
            Ok(seq) => Ok(seq),
            Err(AuditError::TimedOut) => {
                Err(AppendLate::Pending(PendingAppend { log: self.clone() }))
            }
            Err(e) => Err(AppendLate::Failed(e)),
        }
    }

    fn lead(&self, slot: usize, relayed: Option<(AnswerTx, usize)>) -> Lead<'_> {
        Lead {
            log: self,
            slot,
            relayed,
            done: false,
        }
    }

    /// Queues a record without waiting for it to be written. It is in the writer's queue when
    /// this returns, so it is ordered before any record appended later (a `shutdown` record
    /// included). A failed write is counted and logged by the writer; nobody waits on it.
    ///
    /// Nothing is gated on such a record, so it is not written on its own: it joins the next
    /// write (the next allow record, usually) or is written within `SYNC_INTERVAL` — one
    /// write (and under `always` one sync) fewer per proxied call.
    pub fn append_detached(&self, record: Record) -> Result<(), AuditError> {
        self.send(record, Reply::Detached)
    }

    /// Queues `record` behind every record the calling task queued before it, without
    /// waiting: it joins the worker's open gathering (where such a record may still be), or
    /// goes to the writer in order. For the outcome of a call dropped while its allow record
    /// was on its way, or of one whose allow record was late ([`PendingAppend::then_queue`]).
    pub fn append_behind(&self, record: Record) -> Result<(), AuditError> {
        let record = match self.inner.gathers.slot_for_caller() {
            Some(slot) => match self.inner.gathers.join_if_open(slot, record) {
                None => return Ok(()),
                Some(record) => record,
            },
            None => record,
        };
        self.send(record, Reply::Ordered)
    }

    /// Counts a proxied call as in progress until the guard drops. Under `always` the writer
    /// holds a sync back a moment only while many calls are in flight: their records are
    /// about to arrive and share it. Under `never` and `interval` nothing reads the count, so
    /// the hot path does not touch it.
    pub fn call_in_flight(&self) -> CallInFlight<'_> {
        let count = self
            .inner
            .tx
            .is_some()
            .then_some(&self.inner.shared.calls_in_flight);
        if let Some(count) = count {
            count.fetch_add(1, Ordering::Relaxed);
        }
        CallInFlight(count)
    }

    /// Notes that a task nobody waits for (a credential mint running on after its calls gave
    /// up) will append a record, until the guard drops: a stop waits for it
    /// ([`Self::await_promised`]) before the `shutdown` record, which must be the last.
    pub fn promise(&self) -> Promised {
        self.inner.shared.promised.fetch_add(1, Ordering::AcqRel);
        Promised(Arc::clone(&self.inner.shared))
    }

    /// Waits, at most `within`, until no [`Promised`] record is outstanding; false if some
    /// still were.
    pub async fn await_promised(&self, within: Duration) -> bool {
        let shared = &self.inner.shared;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let ended = shared.promise_ended.notified();
            tokio::pin!(ended);
            // Registered before the count is read: an end between the two still wakes it.
            ended.as_mut().enable();
            if shared.promised.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                return false;
            }
        }
    }

    /// Blocking variant for non-async callers (CLI, shutdown paths). Safe to call anywhere,
    /// but it blocks the calling thread until the record is written.
    pub fn append_blocking(&self, record: Record) -> Result<u64, AuditError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(record, Reply::Blocking(tx))?;
        rx.recv().map_err(|_| AuditError::Closed)?
    }

    /// Flushes and stops the writer; appends queued before it complete first, later ones fail
    /// with [`AuditError::Closed`]. Idempotent.
    pub fn close(&self) {
        self.close_after(None);
    }

    /// Writes `last` as the log's final record and closes it, in one step: no record appended
    /// concurrently can land after it (such appends fail with [`AuditError::Closed`]). For the
    /// `shutdown` record. Blocks until written.
    pub fn close_with(&self, last: Record) -> Result<u64, AuditError> {
        self.close_after(Some(last))
            .unwrap_or(Err(AuditError::Closed))
    }

    fn close_after(&self, last: Option<Record>) -> Option<Answer> {
        self.inner.shared.closed.store(true, Ordering::Release);
        // Relays stop once the writer has answered everything (below).
        let _relays_close = RelaysClose(&self.inner.shared.relays);
        let mut written = None;
        if let Some(inline) = &self.inner.inline {
            if let Some(mut writer) = lock(inline).take() {
                written = writer.finish(last.as_ref());
            }
        } else if let Some(queue) = &self.inner.tx {
            let (tx, rx) = mpsc::sync_channel(1);
            if queue.send(Msg::Close(tx, last.map(Box::new))).is_ok() {
                // An error only means the thread already stopped.
                written = rx.recv().ok().flatten();
            }
        }
        let handle = match self.inner.thread.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!("the audit writer thread panicked");
            }
        }
        written
    }

    /// Counters for metrics.
    pub fn stats(&self) -> AuditStats {
        let s = &self.inner.shared;
        AuditStats {
            written: s.written.load(Ordering::Relaxed),
            write_errors: s.write_errors.load(Ordering::Relaxed),
            fsyncs: s.fsyncs.load(Ordering::Relaxed),
            fsync_seconds_sum: Duration::from_nanos(s.fsync_nanos.load(Ordering::Relaxed))
                .as_secs_f64(),
            rotations: s.rotations.load(Ordering::Relaxed),
        }
    }

    /// Whether a write or sync failed within the last `window`: while the log cannot be written
    /// every call is refused, so a load balancer should send its traffic elsewhere. (A window,
    /// not "the last write failed": with no traffic there would be no write to show recovery.)
    pub fn failed_within(&self, window: Duration) -> bool {
        let last = self.inner.shared.last_failure_ms.load(Ordering::Relaxed);
        let window = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        last != 0 && now_ms().saturating_sub(last) < window
    }

    /// Installs a hook called with every sync's duration (e.g. to feed a histogram).
    pub fn set_fsync_observer(&self, observer: FsyncObserver) {
        self.inner
            .shared
            .observer
            .store(Some(Arc::new(Box::new(move |d| observer(d)))));
    }

    fn send(&self, record: Record, reply: Reply) -> Result<(), AuditError> {
        if let Some(inline) = &self.inner.inline {
            let mut guard = lock(inline);
            let writer = guard.as_mut().ok_or(AuditError::Closed)?;
            match reply {
                Reply::Detached => writer.defer(record),
                reply => writer.commit_and_answer(vec![(Box::new(record), reply)]),
            }
            return Ok(());
        }
        if matches!(reply, Reply::Detached) {
            if self.inner.shared.closed.load(Ordering::Acquire) {
                return Err(AuditError::Closed);
            }
            let mut deferred = lock_deferred(&self.inner.shared);
            if deferred.len() < MAX_BATCH {
                deferred.push(Box::new(record));
                return Ok(());
            }
            // A full queue goes to the thread like any record, taking the others along.
        }
        let queue = self.inner.tx.as_ref().ok_or(AuditError::Closed)?;
        let waited_on = usize::from(!matches!(reply, Reply::Detached));
        let bytes = record.size_in_memory();
        if matches!(reply, Reply::Ordered) {
            // What must follow a record already queued (a late allow's outcome, a correction)
            // is never refused: the log would end on the record it corrects. It is bounded by
            // the records it follows, which were counted.
            self.inner.shared.enqueue_unrefused(waited_on, bytes);
        } else if let Err(refused) = self.inner.shared.enqueue(waited_on, bytes) {
            if waited_on == 0 {
                // Nobody to tell but the operator's log and the metrics.
                self.inner.shared.write_failed();
                tracing::error!(
                    request_id = record.request_id.as_deref().unwrap_or("-"),
                    event = record.event.as_str(),
                    "the audit writer's queue is full (the disk is not answering); a record \
                     nobody waits on is dropped"
                );
            }
            return Err(refused);
        }
        queue
            .send(Msg::Append(Box::new(record), reply, bytes))
            .map_err(|_| AuditError::Closed)
    }

    /// Test hook: make the next `n` batch writes fail halfway.
    #[cfg(test)]
    fn inject_write_failures(&self, n: u32) {
        self.inner.shared.inject_failures.store(n, Ordering::SeqCst);
    }

    /// Test hook: make the next `n` syncs fail.
    #[cfg(test)]
    fn inject_sync_failures(&self, n: u32) {
        self.inner
            .shared
            .inject_sync_failures
            .store(n, Ordering::SeqCst);
    }
}

/// A gathering's leader (`audit::gather`): writes what was gathered (or, under `always`, hands
/// it to the writer thread), also when dropped before it got to (its call cancelled), so no
/// joiner is left waiting.
struct Lead<'a> {
    log: &'a AuditLog,
    slot: usize,
    /// Under `always`: where the writer answers the leader's own record, and the worker whose
    /// relay hands out the answers.
    relayed: Option<(AnswerTx, usize)>,
    done: bool,
}

impl Lead<'_> {
    /// Writes the gathering in one batch and answers the joiners; returns the leader's seq.
    fn write(mut self) -> Result<u64, AuditError> {
        self.done = true;
        self.write_gathered()
    }

    /// Under `always`: sends the gathering to the writer thread in one message; the writer
    /// answers every record, the leader's included, through the worker's relay.
    fn hand_over(mut self) -> Result<(), AuditError> {
        self.done = true;
        self.send_gathered()
    }

    fn write_gathered(&self) -> Result<u64, AuditError> {
        let (mut records, mut joiners) = self.log.inner.gathers.take(self.slot);
        let result = match &self.log.inner.inline {
            Some(inline) => match lock(inline).as_mut() {
                Some(writer) => {
                    let result = writer.commit_after_pending(records.iter());
                    if result.is_err() {
                        // Records nobody waits on, queued behind a late one: kept for the
                        // next write, as the writer thread keeps them.
                        let unanswered = records.iter().skip(1).zip(&joiners);
                        let kept = unanswered
                            .filter(|(_, j)| j.is_none())
                            .map(|(r, _)| r.clone());
                        writer.keep_for_next_write(kept.collect());
                    }
                    result
                }
                None => Err(AuditError::Closed),
            },
            None => Err(AuditError::Closed),
        };
        for (i, joiner) in joiners.drain(..).enumerate() {
            // A joiner that went away (request cancelled) no longer needs the answer.
            let answer = match &result {
                Ok(first) => Ok(first + 1 + i as u64),
                Err(e) => Err(e.for_another_record()),
            };
            if let Some(joiner) = joiner {
                let _ = joiner.send(answer);
            }
        }
        records.clear();
        self.log.inner.gathers.recycle(self.slot, records, joiners);
        result
    }

    fn send_gathered(&mut self) -> Result<(), AuditError> {
        let (mut records, mut joiners) = self.log.inner.gathers.take(self.slot);
        let Some((leader, worker)) = self.relayed.take() else {
            return Err(AuditError::Closed);
        };
        let bytes = records.iter().map(Record::size_in_memory).sum();
        if let Err(refused) = self.log.inner.shared.enqueue(records.len(), bytes) {
            // Every caller of the gathering hears why, the leader through its return value.
            for joiner in joiners.drain(..).flatten() {
                let _ = joiner.send(Err(refused.for_another_record()));
            }
            drop(leader);
            records.clear();
            self.log.inner.gathers.recycle(self.slot, records, joiners);
            return Err(refused);
        }
        let replies = std::iter::once(Some(leader)).chain(joiners.drain(..));
        let batch: Vec<_> = records
            .drain(..)
            .zip(replies)
            .map(|(record, tx)| {
                let reply = match tx {
                    Some(tx) => Reply::Relayed(tx, worker),
                    None => Reply::Ordered,
                };
                (Box::new(record), reply)
            })
            .collect();
        self.log.inner.gathers.recycle(self.slot, records, joiners);
        let queue = self.log.inner.tx.as_ref().ok_or(AuditError::Closed)?;
        // A refused send drops the batch, and with it every answer sender: the waiters see
        // the log closed.
        queue
            .send(Msg::Batch(batch, bytes))
            .map_err(|_| AuditError::Closed)
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        if !self.done {
            if self.relayed.is_some() {
                let _ = self.send_gathered();
            } else {
                let _ = self.write_gathered();
            }
        }
    }
}

/// Closes the relays when dropped, i.e. after the writer thread has answered its last batch.
struct RelaysClose<'a>(&'a Relays);

impl Drop for RelaysClose<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The deferred records, then the records being committed: one sized iterator over both
/// (`Chain` does not know its length).
struct Batch<'b, I> {
    pending: std::slice::Iter<'b, Record>,
    records: I,
}

impl<'b, 'r: 'b, I: Iterator<Item = &'r Record>> Iterator for Batch<'b, I> {
    type Item = &'b Record;

    fn next(&mut self) -> Option<&'b Record> {
        match self.pending.next() {
            Some(record) => Some(record),
            None => self.records.next(),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let (low, high) = self.records.size_hint();
        let pending = self.pending.len();
        (low + pending, high.map(|h| h + pending))
    }
}

impl<'b, 'r: 'b, I: ExactSizeIterator<Item = &'r Record>> ExactSizeIterator for Batch<'b, I> {}

/// The deferred-record queue; poisoning cannot leave it half-updated (a push or a drain).
#[allow(clippy::vec_box)]
fn lock_deferred(shared: &Shared) -> std::sync::MutexGuard<'_, Vec<Box<Record>>> {
    shared.deferred.lock().unwrap_or_else(|e| e.into_inner())
}

/// The writer lock; a poisoned lock means a writer panicked between two complete batches,
/// and the file is cut back to its last good length before the next write anyway.
fn lock(m: &Mutex<Option<Writer>>) -> std::sync::MutexGuard<'_, Option<Writer>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// With inline writes: every [`SYNC_INTERVAL`], write deferred records and (under `interval`)
/// sync a dirty file, until the log is closed or its last handle dropped (the thread holds
/// the writer only while it works, so dropping the handles closes the file).
///
/// The `fdatasync` runs on a duplicate of the file descriptor, outside the writer lock: callers
/// (request handlers on the worker runtimes) keep writing while the disk syncs, instead of
/// stalling a whole worker for the length of a sync.
fn inline_flusher(writer: &Weak<Mutex<Option<Writer>>>) {
    // Rounds start one interval apart, the sync's own time included (a record written just
    // after a sync started is synced by the round after, which starts 10 ms after that one,
    // not 10 ms after it ends), so what a power failure can lose is the interval plus at most
    // one sync's duration.
    let mut next_round = Instant::now() + SYNC_INTERVAL;
    loop {
        std::thread::sleep(next_round.saturating_duration_since(Instant::now()));
        next_round = Instant::now() + SYNC_INTERVAL;
        let Some(writer) = writer.upgrade() else {
            return;
        };
        let (file, shared) = {
            let mut guard = lock(&writer);
            let Some(w) = guard.as_mut() else { return };
            w.flush_pending();
            if !(w.dirty && w.policy == FsyncPolicy::Interval) {
                continue;
            }
            let Some(file) = w.file.as_ref().and_then(|f| f.try_clone().ok()) else {
                continue; // still dirty: the next round tries again
            };
            w.dirty = false;
            w.last_sync = Instant::now();
            (file, Arc::clone(&w.shared))
        };
        if let Err(e) = timed_sync(&file, &shared) {
            shared.write_failed();
            tracing::error!(error = %e, "audit log sync failed");
            if let Some(w) = lock(&writer).as_mut() {
                w.dirty = true;
            }
        }
    }
}

/// `fdatasync`, timed and counted.
fn timed_sync(file: &File, shared: &Shared) -> io::Result<()> {
    let started = Instant::now();
    #[cfg(test)]
    if shared
        .inject_sync_failures
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        shared.sync_failing.store(true, Ordering::Release);
        return Err(io::Error::other("injected sync failure"));
    }
    let synced = file.sync_data();
    shared
        .sync_failing
        .store(synced.is_err(), Ordering::Release);
    synced?;
    let took = started.elapsed();
    let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
    shared.fsyncs.fetch_add(1, Ordering::Relaxed);
    shared.fsync_nanos.fetch_add(nanos, Ordering::Relaxed);
    if let Some(observer) = shared.observer.load().as_ref() {
        observer(took);
    }
    Ok(())
}

impl Shared {
    /// Counts `n` more records someone waits on, holding `bytes` between them, for the writer
    /// thread — or refuses them past `max_queued` records or [`MAX_QUEUED_BYTES`].
    fn enqueue(&self, n: usize, bytes: usize) -> Result<(), AuditError> {
        let max = self.max_queued.load(Ordering::Relaxed);
        if self.queued.fetch_add(n, Ordering::Relaxed) + n > max {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            return Err(AuditError::Backlog);
        }
        if self.queued_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes > MAX_QUEUED_BYTES {
            self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            self.queued.fetch_sub(n, Ordering::Relaxed);
            return Err(AuditError::Backlog);
        }
        Ok(())
    }

    /// Counts records as [`Self::enqueue`] does, past the bounds too.
    fn enqueue_unrefused(&self, n: usize, bytes: usize) {
        self.queued.fetch_add(n, Ordering::Relaxed);
        self.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The writer took records holding `bytes` off its queue.
    fn taken(&self, bytes: usize) {
        self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Counts a failed write or sync and remembers when it happened.
    fn write_failed(&self) {
        self.write_errors.fetch_add(1, Ordering::Relaxed);
        self.last_failure_ms
            .store(now_ms().max(1), Ordering::Relaxed);
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How far back the clock may step before `ts` follows it instead of holding still.
const MAX_TS_HOLD: chrono::TimeDelta = chrono::TimeDelta::seconds(2);

/// A record's time: `now`, or the previous record's time `last` when the clock stepped back
/// by at most [`MAX_TS_HOLD`] (see `Writer::next_ts`).
fn monotonic_ts(now: DateTime<Utc>, last: DateTime<Utc>) -> DateTime<Utc> {
    if now >= last {
        now
    } else if last - now <= MAX_TS_HOLD {
        last
    } else {
        tracing::warn!(
            last = %last.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "the clock is behind the audit log's last record: records from now on carry the \
             clock's time, earlier than the record before them"
        );
        now
    }
}

/// The writer's state: the file and where the chain stands.
struct Writer {
    path: PathBuf,
    file: Option<File>,
    /// Length of the file up to the last committed batch.
    len: u64,
    /// True when bytes past `len` may be on disk (a failed cut-back) and must go first.
    needs_cut: bool,
    seq: u64,
    prev: String,
    last_ts: DateTime<Utc>,
    /// Makes each record's `ts` text, the date and time kept within a second.
    ts_text: chain::TsFormatter,
    policy: FsyncPolicy,
    rotate_bytes: Option<u64>,
    key: Option<Secret>,
    replica: Option<String>,
    /// Written but not yet synced (under `interval`).
    dirty: bool,
    /// Detached records waiting to join the next write, and since when the oldest waits.
    /// Held inline: the inline writer takes them unboxed; under the writer thread they come
    /// boxed in messages and are moved out once.
    pending: Vec<Record>,
    pending_since: Option<Instant>,
    last_sync: Instant,
    shared: Arc<Shared>,
    /// The batch buffer, kept between batches (up to [`SCRATCH_KEEP`] bytes).
    scratch: Vec<u8>,
}

/// A batch buffer larger than this is not kept for the next batch.
const SCRATCH_KEEP: usize = 256 * 1024;

impl Writer {
    /// Opens the file, finds where the chain stands, cuts a damaged tail and records the cut.
    fn open(opts: AuditOptions, shared: Arc<Shared>) -> Result<Self, AuditError> {
        let io = |context: String| move |source| AuditError::Io { context, source };
        if let Some(dir) = opts.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        let mut file =
            open_log(&opts.path).map_err(io(format!("opening {}", opts.path.display())))?;
        let len = file
            .metadata()
            .map_err(io(format!("reading {}", opts.path.display())))?
            .len();
        let key = opts.hmac_key.as_ref();
        let scan = scan_tail(&mut file, len, key, &opts.path)?;
        let cut = len - scan.end;
        if cut > 0 {
            file.set_len(scan.end)
                .and_then(|()| file.sync_data())
                .map_err(io(format!(
                    "cutting the torn tail of {}",
                    opts.path.display()
                )))?;
        }
        let last = match scan.last {
            Some(last) => Some(last),
            None => last_rotated_record(&opts.path, key)?,
        };
        let (seq, prev, last_ts) = match last {
            Some(t) => (t.seq, t.hash, t.ts),
            None => (0, ZERO_HASH.to_owned(), DateTime::<Utc>::MIN_UTC),
        };
        let mut writer = Writer {
            path: opts.path,
            file: Some(file),
            len: scan.end,
            needs_cut: false,
            seq,
            prev,
            last_ts,
            ts_text: chain::TsFormatter::default(),
            policy: opts.fsync,
            rotate_bytes: opts.rotate_bytes,
            key: opts.hmac_key,
            replica: opts.replica,
            dirty: false,
            pending: Vec::new(),
            pending_since: None,
            last_sync: Instant::now(),
            shared,
            scratch: Vec::new(),
        };
        if cut > 0 {
            tracing::warn!(path = %writer.path.display(), bytes = cut, "cut a torn audit log tail");
            let mut rec = Record::new(Event::Recovered);
            rec.truncated_bytes = Some(cut);
            writer
                .commit([&rec])
                .and_then(|_| writer.sync())
                .map_err(io("writing the `recovered` record".into()))?;
        }
        Ok(writer)
    }

    /// The thread's loop: take a batch, commit it, answer; sync on time under `interval`.
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let mut closing = None;
        while closing.is_none() {
            let first = match self.next_message(&rx) {
                Some(m) => m,
                None => break,
            };
            let mut appends = Vec::new();
            let mut next = Some(first);
            let mut delay = COMMIT_DELAY;
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Append(rec, reply, bytes) => {
                        self.shared.taken(bytes);
                        appends.push((rec, reply));
                    }
                    Msg::Batch(batch, bytes) => {
                        self.shared.taken(bytes);
                        appends.extend(batch);
                    }
                    Msg::Close(ack, last) => {
                        closing = Some((ack, last));
                        break;
                    }
                }
                if appends.len() < MAX_BATCH {
                    next = rx.try_recv().ok();
                    if next.is_none()
                        && delay <= MAX_COMMIT_DELAY
                        && self.commit_delay(appends.len())
                    {
                        // Sleep rather than wait on the queue: a waiting receiver is woken by
                        // every send, and on a busy core each wake-up is two context switches
                        // (the caller's thread is preempted). Each further wait is twice as
                        // long, and happens only if records arrived during the last one.
                        std::thread::sleep(delay);
                        delay *= 2;
                        next = rx.try_recv().ok();
                    }
                }
            }
            // A batch of detached records only waits for company (or its deadline).
            if closing.is_none() && appends.iter().all(|(_, r)| matches!(r, Reply::Detached)) {
                for (rec, _) in appends {
                    self.defer(*rec);
                }
                continue;
            }
            self.commit_and_answer(appends);
        }
        let (ack, last) = closing.map_or((None, None), |(ack, last)| (Some(ack), last));
        let written = self.finish(last.as_deref());
        // Requests that raced with close get `Closed` when `rx` drops with them.
        drop(rx);
        if let Some(ack) = ack {
            let _ = ack.send(written);
        }
    }

    /// Under `always`, whether to wait a moment for more records before the sync: only when
    /// many more calls are in flight than wait on this batch, so a lone caller or a few
    /// concurrent ones never wait for records that are not coming.
    fn commit_delay(&self, batch: usize) -> bool {
        let in_flight = self.shared.calls_in_flight.load(Ordering::Relaxed);
        self.policy == FsyncPolicy::Always && records_are_coming(in_flight, batch)
    }

    /// Blocks for the next message; wakes up in time to write deferred records (and, under
    /// `interval`, to sync a dirty file).
    fn next_message(&mut self, rx: &mpsc::Receiver<Msg>) -> Option<Msg> {
        loop {
            let sync_due = (self.dirty && self.policy == FsyncPolicy::Interval)
                .then(|| SYNC_INTERVAL.saturating_sub(self.last_sync.elapsed()));
            let flush_due = self
                .pending_since
                .map(|t| SYNC_INTERVAL.saturating_sub(t.elapsed()));
            // With nothing due, still look at the deferred queue every SYNC_INTERVAL.
            let due = sync_due
                .into_iter()
                .chain(flush_due)
                .min()
                .unwrap_or(SYNC_INTERVAL);
            match rx.recv_timeout(due) {
                Ok(msg) => return Some(msg),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.absorb_deferred();
                    self.flush_pending();
                    if self.dirty && self.policy == FsyncPolicy::Interval {
                        // A failure is logged and counted there, and tried again next time.
                        let _ = self.background_sync();
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Takes the detached records callers left in the shared queue (thread mode).
    fn absorb_deferred(&mut self) {
        let mut deferred = lock_deferred(&self.shared);
        if !deferred.is_empty() {
            self.pending_since.get_or_insert_with(Instant::now);
            self.pending
                .extend(deferred.drain(..).map(|record| *record));
        }
    }

    /// Keeps a detached record for the next write; a full queue is written now.
    fn defer(&mut self, record: Record) {
        self.pending.push(record);
        self.pending_since.get_or_insert_with(Instant::now);
        if self.pending.len() >= MAX_BATCH {
            self.flush_pending();
        }
    }

    /// Writes deferred records on their own (their deadline passed, or the log is closing).
    fn flush_pending(&mut self) {
        // A failure is counted and logged by `commit`, and the records kept for the next try.
        let _ = self.commit_after_pending([]);
    }

    /// Commits the deferred records, then `appends`, as one batch (seq in that order), and
    /// answers the waiters. Detached records among `appends` join the deferred ones.
    fn commit_and_answer(&mut self, appends: Vec<(Box<Record>, Reply)>) {
        self.absorb_deferred();
        let mut waiting = Vec::with_capacity(appends.len());
        for (record, reply) in appends {
            match reply {
                Reply::Detached => self.pending.push(*record),
                reply => waiting.push((record, reply)),
            }
        }
        let records: Vec<&Record> = waiting.iter().map(|(r, _)| r.as_ref()).collect();
        let result = self.commit_after_pending(records.iter().copied());
        drop(records);
        let answered = waiting.len();
        let _ = self
            .shared
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
                Some(q.saturating_sub(answered))
            });
        let relays = Arc::clone(&self.shared.relays);
        let mut wake = Vec::new();
        let mut unwritten_ordered = Vec::new();
        for (i, (record, reply)) in waiting.into_iter().enumerate() {
            let answer = match &result {
                Ok(first) => Ok(first + i as u64),
                // A record that follows a late one (its outcome, a correction) has nobody to
                // tell and must not be lost: it is written with the next batch, as the
                // deferred ones are — still after the record it follows.
                Err(_) if matches!(reply, Reply::Ordered) => {
                    unwritten_ordered.push(*record);
                    continue;
                }
                Err(e) => Err(e.for_another_record()),
            };
            reply.send(answer, &relays, &mut wake);
        }
        self.keep_for_next_write(unwritten_ordered);
        for worker in wake {
            relays.wake(worker);
        }
    }

    /// Records committed now, after the deferred ones, in one write. Returns the seq of
    /// `records[0]`. On failure the deferred records are kept for the next write.
    fn commit_after_pending<'r, I>(&mut self, records: I) -> Result<u64, AuditError>
    where
        I: IntoIterator<Item = &'r Record>,
        I::IntoIter: ExactSizeIterator,
    {
        let records = records.into_iter();
        let pending = std::mem::take(&mut self.pending);
        self.pending_since = None;
        if pending.is_empty() && records.len() == 0 {
            return Ok(self.seq + 1);
        }
        // One pass over both, without collecting them into a list first.
        let batch = Batch {
            pending: pending.iter(),
            records,
        };
        let result = self.commit(batch);
        match result {
            Ok(first) => {
                self.after_commit();
                let written = pending.len() as u64;
                self.reuse_pending_list(pending);
                Ok(first + written)
            }
            Err(e) => {
                self.restore_pending(pending);
                Err(AuditError::Write(Arc::new(e)))
            }
        }
    }

    /// Keeps a written batch's deferred-record list (emptied) for the next records: no
    /// regrowth per batch.
    fn reuse_pending_list(&mut self, mut list: Vec<Record>) {
        // (A burst's long list is let go: it should not pin its memory.)
        if self.pending.is_empty() && list.capacity() <= 256 {
            list.clear();
            self.pending = list;
        }
    }

    /// Deferred records whose batch failed: kept for the next write (nobody else will write
    /// them), at most [`MAX_BATCH`] of them, so a long outage cannot grow memory without bound.
    fn restore_pending(&mut self, mut records: Vec<Record>) {
        if records.is_empty() {
            return;
        }
        records.append(&mut self.pending);
        self.pending = records;
        self.drop_beyond_retry_limit();
    }

    /// Records nobody waits on whose batch failed, kept after the deferred ones.
    fn keep_for_next_write(&mut self, records: Vec<Record>) {
        if records.is_empty() {
            return;
        }
        self.pending.extend(records);
        self.drop_beyond_retry_limit();
    }

    /// Past [`MAX_BATCH`] kept records, the newest go: each logged with its `request_id` and
    /// counted as a write error, as a record refused by a full queue is.
    fn drop_beyond_retry_limit(&mut self) {
        self.pending_since.get_or_insert_with(Instant::now);
        if self.pending.len() <= MAX_BATCH {
            return;
        }
        for record in self.pending.drain(MAX_BATCH..) {
            self.shared.write_failed();
            tracing::error!(
                request_id = record.request_id.as_deref().unwrap_or("-"),
                event = record.event.as_str(),
                "audit log unwritable: a record nobody waits on is dropped (beyond the retry limit)"
            );
        }
    }

    /// Housekeeping after a committed batch: rotation. (An `interval` sync is the flusher
    /// thread's job, done outside the writer lock.)
    fn after_commit(&mut self) {
        self.maybe_rotate();
    }

    /// Seals and writes `records` as one batch (synced under `always`). On success the chain
    /// advances and the first record's seq is returned; on failure nothing changed.
    fn commit<'r, I>(&mut self, records: I) -> io::Result<u64>
    where
        I: IntoIterator<Item = &'r Record>,
        I::IntoIter: ExactSizeIterator,
    {
        let records = records.into_iter();
        let count = records.len();
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        let (seq, prev) = self.seal_batch(&mut buf, records);
        let result = self.write_sealed(&buf, count, seq, prev);
        if buf.capacity() <= SCRATCH_KEEP {
            self.scratch = buf;
        }
        result
    }

    /// Writes a sealed batch and advances the chain, or cuts it back.
    fn write_sealed(
        &mut self,
        buf: &[u8],
        records: usize,
        seq: u64,
        prev: String,
    ) -> io::Result<u64> {
        match self.write_batch(buf) {
            Ok(()) => {
                let first = self.seq + 1;
                self.len += buf.len() as u64;
                self.seq = seq;
                self.prev = prev;
                self.shared
                    .written
                    .fetch_add(records as u64, Ordering::Relaxed);
                Ok(first)
            }
            Err(e) => {
                self.shared.write_failed();
                tracing::error!(error = %e, path = %self.path.display(), records,
                    "audit write failed; cutting the batch back");
                self.cut_back();
                Err(e)
            }
        }
    }

    /// Seals the batch into `buf`; returns the last seq and hash.
    fn seal_batch<'r>(
        &mut self,
        buf: &mut Vec<u8>,
        records: impl ExactSizeIterator<Item = &'r Record>,
    ) -> (u64, String) {
        buf.reserve(records.len() * 320);
        let mut seq = self.seq;
        let mut last: Option<chain::HashHex> = None;
        for record in records {
            seq += 1;
            let now = self.next_ts();
            let ts = self.ts_text.format(now);
            // A replica's records name it (a copy, paid only when a name is configured).
            let named;
            let record = match &self.replica {
                Some(name) if record.replica.is_none() => {
                    named = Record {
                        replica: Some(name.clone()),
                        ..record.clone()
                    };
                    &named
                }
                _ => record,
            };
            let prev = last
                .as_ref()
                .map_or(self.prev.as_bytes(), chain::HashHex::as_bytes);
            last = Some(chain::seal_into(
                buf,
                seq,
                ts.as_bytes(),
                record,
                prev,
                self.key.as_ref(),
            ));
            buf.push(b'\n');
        }
        let prev = last.map_or_else(|| self.prev.clone(), |h| h.as_str().to_owned());
        (seq, prev)
    }

    /// Now, but never before the previous record's time, so `ts` grows with `seq` through the
    /// small steps back a clock takes (an NTP correction). A larger step — the clock was set
    /// back, or the log's last record came from a clock that ran ahead — is taken as it is:
    /// holding every later record at that one time until the clock caught up would make their
    /// times useless (`--since`, the report's first and last use), for hours or days.
    fn next_ts(&mut self) -> DateTime<Utc> {
        self.last_ts = monotonic_ts(Utc::now(), self.last_ts);
        self.last_ts
    }

    fn write_batch(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.file.is_none() {
            self.file = Some(open_log(&self.path)?);
            self.needs_cut = true;
        }
        if self.needs_cut {
            self.cut_to_len()?;
        }
        if self.policy == FsyncPolicy::Interval && self.shared.sync_failing.load(Ordering::Acquire)
        {
            // The background sync keeps trying; this batch waits for it to succeed.
            return Err(io::Error::other(
                "the audit log's last sync failed; writing again once one succeeds",
            ));
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("no audit file"))?;
        #[cfg(test)]
        self.shared.batches.fetch_add(1, Ordering::Relaxed);
        #[cfg(test)]
        inject_failure(&self.shared, file, buf)?;
        file.write_all(buf)?;
        if self.policy == FsyncPolicy::Always {
            self.sync()?;
        } else {
            self.dirty = true;
        }
        Ok(())
    }

    /// After a failed batch: remove whatever part of it reached the file.
    fn cut_back(&mut self) {
        self.needs_cut = true;
        if let Err(e) = self.cut_to_len() {
            // Retried before the next batch is written.
            tracing::error!(error = %e, "cannot cut the audit log back after a failed write");
        }
    }

    fn cut_to_len(&mut self) -> io::Result<()> {
        if let Some(file) = self.file.as_mut() {
            file.set_len(self.len)?;
            self.needs_cut = false;
        }
        Ok(())
    }

    /// `fdatasync`, timed and counted.
    fn sync(&mut self) -> io::Result<()> {
        let Some(file) = self.file.as_ref() else {
            return Ok(());
        };
        timed_sync(file, &self.shared)?;
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// An `interval` sync of records already acknowledged: a failure is logged and counted,
    /// and returned for a close to report.
    fn background_sync(&mut self) -> io::Result<()> {
        self.sync().inspect_err(|e| {
            self.shared.write_failed();
            // Keep `dirty` so the next wake-up tries again.
            self.last_sync = Instant::now();
            tracing::error!(error = %e, "audit log sync failed");
        })
    }

    /// Renames a full file to `PATH.N` and continues the chain in a fresh one.
    fn maybe_rotate(&mut self) {
        let Some(max) = self.rotate_bytes else { return };
        if self.len <= max {
            return;
        }
        if self.policy != FsyncPolicy::Never {
            if let Err(e) = self.sync() {
                tracing::error!(error = %e, "audit log sync before rotation failed; not rotating");
                return;
            }
        }
        if let Err(e) = rotate_file(&self.path) {
            tracing::error!(error = %e, "audit log rotation failed; continuing in the same file");
            return;
        }
        self.shared.rotations.fetch_add(1, Ordering::Relaxed);
        // The next batch opens the fresh file (and retries if that fails now).
        self.file = None;
        self.len = 0;
        // A fresh file's `open_log` syncs the folder, the rename with it; only when there is
        // none is the rename synced here.
        match open_log(&self.path) {
            Ok(f) => self.file = Some(f),
            Err(e) => {
                tracing::error!(error = %e, "cannot open a fresh audit log after rotation");
                if self.policy != FsyncPolicy::Never {
                    sync_dir(&self.path);
                }
            }
        }
    }

    /// The end: deferred records, then `last` if given (its outcome is returned), then a
    /// final sync under `interval`.
    fn finish(&mut self, last: Option<&Record>) -> Option<Answer> {
        self.absorb_deferred();
        let written = match last {
            Some(record) => Some(self.commit_after_pending([record])),
            None => {
                self.flush_pending();
                None
            }
        };
        if self.dirty && self.policy == FsyncPolicy::Interval {
            if let Err(e) = self.background_sync() {
                // The closing record is not known to be on disk: said, so the process does
                // not exit 0 as if it were.
                if let Some(Ok(_)) = written {
                    return Some(Err(AuditError::Write(Arc::new(e))));
                }
            }
        }
        written
    }
}

/// Test hook: fail after writing half the batch, as a full disk would.
#[cfg(test)]
fn inject_failure(shared: &Shared, file: &mut File, buf: &[u8]) -> io::Result<()> {
    let take = shared
        .inject_failures
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    if take.is_ok() {
        file.write_all(&buf[..buf.len() / 2])?;
        return Err(io::Error::other("injected write failure"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::files::{highest_rotation, rotated_path, MAX_CUT};
    use crate::audit::verify::{verify_files, FailureReason};
    use std::path::Path;

    fn opts(dir: &Path, fsync: FsyncPolicy) -> AuditOptions {
        AuditOptions {
            path: dir.join("logs/audit.jsonl"),
            fsync,
            rotate_bytes: None,
            hmac_key: None,
            replica: None,
        }
    }

    fn proxy(client: &str) -> Record {
        let mut r = Record::new(Event::Proxy);
        r.client = Some(client.into());
        r
    }

    fn read_lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn file_bytes_follow_the_chain_rule() {
        use sha2::{Digest, Sha256};
        let (_dir, o, log) = open_fresh(FsyncPolicy::Always);
        for i in 0..3 {
            assert_eq!(log.append_blocking(proxy(&format!("c{i}"))).unwrap(), i + 1);
        }
        log.close();
        let mut prev = "0".repeat(64);
        for (i, line) in read_lines(&o.path).iter().enumerate() {
            // Recomputed here from the bytes, independently of chain.rs.
            let cut = line.rfind(",\"hash\":\"").unwrap();
            let b = format!("{}}}", &line[..cut]);
            let hash = hex::encode(Sha256::digest(b.as_bytes()));
            assert_eq!(&line[cut..], format!(",\"hash\":\"{hash}\"}}"));
            assert!(b.starts_with(&format!("{{\"seq\":{},\"ts\":\"", i + 1)));
            assert!(b.ends_with(&format!(",\"prev\":\"{prev}\"}}")));
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let ts = v["ts"].as_str().unwrap();
            assert_eq!(ts.len(), "2026-11-26T05:03:25.123456Z".len());
            assert!(ts.ends_with('Z'));
            prev = hash;
        }
        assert_eq!(log.stats().written, 3);
        assert!(log.stats().fsyncs >= 3);
    }

    #[test]
    fn ts_holds_through_a_small_clock_step_back_and_follows_a_large_one() {
        let now = Utc::now();
        let ms = chrono::TimeDelta::milliseconds;
        assert_eq!(monotonic_ts(now, now - ms(1)), now);
        assert_eq!(monotonic_ts(now, now + ms(500)), now + ms(500));
        assert_eq!(monotonic_ts(now, now + ms(2000)), now + ms(2000));
        assert_eq!(monotonic_ts(now, now + ms(2001)), now);
        assert_eq!(monotonic_ts(now, now + chrono::TimeDelta::days(365)), now);
    }

    /// A log whose last record carries a time far ahead (written while the clock was wrong,
    /// or copied from another host) does not hold the next records at that time.
    #[test]
    fn a_last_record_at_the_largest_seq_is_refused_not_wrapped() {
        let (_dir, o, log) = open_fresh(FsyncPolicy::Never);
        log.close();
        let mut buf = Vec::new();
        let ts = "2026-01-01T00:00:00.000000Z";
        chain::seal_into(
            &mut buf,
            u64::MAX,
            ts.as_bytes(),
            &proxy("a"),
            ZERO_HASH.as_bytes(),
            None,
        );
        buf.push(b'\n');
        std::fs::write(&o.path, &buf).unwrap();
        assert!(matches!(
            AuditLog::open(o.clone()),
            Err(AuditError::TailUnverifiable {
                reason: chain::ChainError::SeqExhausted,
                ..
            })
        ));
        assert_eq!(std::fs::read(&o.path).unwrap(), buf, "left untouched");
    }

    #[test]
    fn a_last_record_from_the_future_does_not_stop_the_clock() {
        let (_dir, o, log) = open_fresh(FsyncPolicy::Never);
        log.append_blocking(proxy("a")).unwrap();
        log.close();
        let future = "2099-01-01T00:00:00.000000Z";
        {
            // Rewrite the one record with a future time, chain intact.
            let line = read_lines(&o.path).remove(0);
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            let mut rec = proxy("a");
            rec.request_id = None;
            let mut buf = Vec::new();
            chain::seal_into(
                &mut buf,
                1,
                future.as_bytes(),
                &rec,
                ZERO_HASH.as_bytes(),
                None,
            );
            buf.push(b'\n');
            assert_ne!(v["ts"], future);
            std::fs::write(&o.path, &buf).unwrap();
        }
        let log = AuditLog::open(o.clone()).unwrap();
        assert_eq!(log.append_blocking(proxy("b")).unwrap(), 2);
        log.close();
        let report = verify_files(std::slice::from_ref(&o.path), None).unwrap();
        assert!(report.is_intact(), "{report:?}");
        let lines = read_lines(&o.path);
        let ts: String = serde_json::from_str::<serde_json::Value>(&lines[1]).unwrap()["ts"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(ts.as_str() < "2099", "{ts}");
        let written = DateTime::parse_from_rfc3339(&ts).unwrap();
        assert!(
            (Utc::now() - written.with_timezone(&Utc))
                .num_seconds()
                .abs()
                < 60
        );
    }

    #[test]
    fn restart_continues_seq_and_chain() {
        let (_dir, o, log) = open_fresh(FsyncPolicy::Never);
        log.append_blocking(proxy("a")).unwrap();
        log.append_blocking(proxy("b")).unwrap();
        log.close();
        assert!(matches!(
            log.append_blocking(proxy("late")),
            Err(AuditError::Closed)
        ));
        let log = AuditLog::open(o.clone()).unwrap();
        assert_eq!(log.append_blocking(proxy("c")).unwrap(), 3);
        drop(log);
        // Dropping every handle also stops the writer after it drained the queue.
        let log = AuditLog::open(o.clone()).unwrap();
        assert_eq!(log.append_blocking(proxy("d")).unwrap(), 4);
        log.close();
        let report = verify_files(std::slice::from_ref(&o.path), None).unwrap();
        assert!(report.is_intact(), "{report:?}");
        assert_eq!(report.records, 4);
        let ts: Vec<String> = read_lines(&o.path)
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["ts"].to_string())
            .collect();
        assert!(
            ts.windows(2).all(|w| w[0] <= w[1]),
            "ts not monotonic: {ts:?}"
        );
    }

    #[test]
    fn torn_tail_is_cut_and_recorded() {
        let (_dir, o, log) = open_fresh(FsyncPolicy::Always);
        log.append_blocking(proxy("a")).unwrap();
        log.append_blocking(proxy("b")).unwrap();
        log.close();
        let torn = b"{\"seq\":3,\"ts\":\"2026-";
        std::fs::OpenOptions::new()
            .append(true)
            .open(&o.path)
            .unwrap()
            .write_all(torn)
            .unwrap();
        assert!(!verify_files(std::slice::from_ref(&o.path), None)
            .unwrap()
            .is_intact());
        let log = AuditLog::open(o.clone()).unwrap();
        assert_eq!(log.append_blocking(proxy("c")).unwrap(), 4);
        log.close();
        let lines = read_lines(&o.path);
        let recovered: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
        assert_eq!(recovered["event"], "recovered");
        assert_eq!(recovered["seq"], 3);
        assert_eq!(recovered["truncated_bytes"], torn.len() as u64);
        assert_intact(&o.path);
    }

    #[test]
    fn a_damaged_tail_longer_than_max_cut_is_not_cut() {
        let (_dir, o, log) = open_fresh(FsyncPolicy::Never);
        log.append_blocking(proxy("a")).unwrap();
        log.close();
        drop(log);
        let intact = std::fs::metadata(&o.path).unwrap().len();
        let garbage = vec![b'x'; usize::try_from(MAX_CUT).unwrap() + 1024];
        std::fs::OpenOptions::new()
            .append(true)
            .open(&o.path)
            .unwrap()
            .write_all(&garbage)
            .unwrap();
        let refused = AuditLog::open(o.clone()).err().expect("too much to cut");
        assert!(
            matches!(refused, AuditError::TailTooDamaged { .. }),
            "{refused}"
        );
        assert_eq!(
            std::fs::metadata(&o.path).unwrap().len(),
            intact + garbage.len() as u64,
            "nothing cut"
        );
    }

    #[test]
    fn nul_lines_and_a_torn_write_are_cut_but_other_lines_and_a_bad_hash_are_refused() {
        let (_dir, o, log) = open_fresh(FsyncPolicy::Never);
        log.append_blocking(proxy("a")).unwrap();
        log.close();
        let intact = std::fs::read(&o.path).unwrap();
        let append = |bytes: &[u8]| {
            std::fs::OpenOptions::new()
                .append(true)
                .open(&o.path)
                .unwrap()
                .write_all(bytes)
                .unwrap();
        };
        // What a crash leaves: NULs where data never reached the disk, a write cut short.
        append(
            b"\0\0\0\n{\"seq\":2,\"ts\":\0\0\0\0\"prev\":\"ab\"}\n{\"seq\":2,\"ts\":\"2026-\0\0",
        );
        let log = AuditLog::open(o.clone()).unwrap();
        log.close();
        assert_intact(&o.path);
        // Complete lines this broker never writes — not JSON, a record with a member renamed —
        // are evidence of something else: the file is left as it is.
        let now = std::fs::read(&o.path).unwrap();
        let last = now[..now.len() - 1]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let renamed = String::from_utf8(now[last..].to_vec())
            .unwrap()
            .replace("\"prev\"", "\"prev_\"");
        for damage in [b"not json\n".to_vec(), renamed.into_bytes()] {
            std::fs::write(&o.path, &intact).unwrap();
            append(&damage);
            let before = std::fs::read(&o.path).unwrap();
            let refused = AuditLog::open(o.clone()).err().expect("not cut");
            assert!(
                matches!(refused, AuditError::TailUnverifiable { .. }),
                "{refused}"
            );
            assert_eq!(std::fs::read(&o.path).unwrap(), before, "nothing cut");
        }
        std::fs::write(&o.path, &intact).unwrap();
        // Opening with a key the file was not written with must not cut a valid log.
        let mut keyed = o.clone();
        keyed.hmac_key = Some(Secret::new("other"));
        let before = std::fs::read(&o.path).unwrap();
        assert!(matches!(
            AuditLog::open(keyed),
            Err(AuditError::TailUnverifiable { .. })
        ));
        assert_eq!(std::fs::read(&o.path).unwrap(), before);
    }

    #[test]
    fn rotation_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path(), FsyncPolicy::Interval);
        o.rotate_bytes = Some(600);
        let log = AuditLog::open(o.clone()).unwrap();
        for i in 0..12 {
            log.append_blocking(proxy(&format!("client-{i}"))).unwrap();
        }
        log.close();
        let n = highest_rotation(&o.path).unwrap();
        assert!(n >= 2, "expected several rotations, got {n}");
        assert_eq!(log.stats().rotations, n);
        let mut files: Vec<PathBuf> = (1..=n).map(|i| rotated_path(&o.path, i)).collect();
        files.push(o.path.clone());
        let report = verify_files(&files, None).unwrap();
        assert!(report.is_intact(), "{report:?}");
        assert_eq!(report.records, 12);
        // A restart with an empty current file continues from the newest rotated file.
        std::fs::write(&o.path, b"").unwrap();
        let log = AuditLog::open(o.clone()).unwrap();
        let last_rotated = verify_files(&files[..files.len() - 1], None).unwrap();
        let next = last_rotated.last.unwrap().0 + 1;
        assert_eq!(log.append_blocking(proxy("after")).unwrap(), next);
        log.close();
        assert!(verify_files(&files, None).unwrap().is_intact());
        drop(log);
        // The newest rotated file compressed: its number stays taken, and a restart that
        // would continue from it refuses rather than fork the chain.
        let newest = rotated_path(&o.path, n);
        std::fs::rename(&newest, newest.with_extension(format!("{n}.gz"))).unwrap();
        std::fs::write(&o.path, b"").unwrap();
        let refused = AuditLog::open(o.clone())
            .err()
            .expect("cannot continue the chain");
        assert!(refused.to_string().contains("decompress"), "{refused}");
        assert_eq!(highest_rotation(&o.path).unwrap(), n);
    }

    #[test]
    fn hmac_chain_verifies_only_with_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path(), FsyncPolicy::Never);
        let key = Secret::new("audit-key");
        o.hmac_key = Some(key.clone());
        let log = AuditLog::open(o.clone()).unwrap();
        log.append_blocking(proxy("a")).unwrap();
        log.close();
        // Restart with the key continues the keyed chain.
        let log = AuditLog::open(o.clone()).unwrap();
        assert_eq!(log.append_blocking(proxy("b")).unwrap(), 2);
        log.close();
        let files = [o.path.clone()];
        assert!(verify_files(&files, Some(&key)).unwrap().is_intact());
        let unkeyed = verify_files(&files, None).unwrap();
        assert_eq!(unkeyed.failure.unwrap().reason, FailureReason::HashMismatch);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commit_gives_consecutive_seqs() {
        let (_dir, o, log) = open_fresh(FsyncPolicy::Always);
        let tasks: Vec<_> = (0..256)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.append(proxy(&format!("c{i}"))).await })
            })
            .collect();
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap().unwrap());
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=256).collect::<Vec<u64>>());
        let stats = log.stats();
        log.close();
        assert_eq!(stats.written, 256);
        // Batching: far fewer syncs than records (one per batch).
        assert!(
            stats.fsyncs < 256,
            "no group commit: {} syncs",
            stats.fsyncs
        );
        assert!(verify_files(&[o.path], None).unwrap().is_intact());
    }

    #[tokio::test]
    async fn detached_records_ride_with_the_next_write_and_never_get_lost() {
        for policy in [
            FsyncPolicy::Always,
            FsyncPolicy::Never,
            FsyncPolicy::Interval,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let o = opts(dir.path(), policy);
            let log = AuditLog::open(o.clone()).unwrap();
            log.append_detached(proxy("first")).unwrap();
            assert_eq!(
                log.append(proxy("second")).await.unwrap(),
                2,
                "{policy:?}: order kept"
            );
            log.append_detached(proxy("third")).unwrap();
            tokio::time::sleep(Duration::from_millis(60)).await;
            assert!(
                std::fs::read_to_string(&o.path)
                    .unwrap()
                    .contains("\"third\""),
                "{policy:?}: written by its deadline"
            );
            log.append_detached(proxy("fourth")).unwrap();
            log.close();
            let lines = read_lines(&o.path);
            let clients: Vec<&str> = ["first", "second", "third", "fourth"]
                .into_iter()
                .filter(|c| lines.iter().any(|l| l.contains(&format!("\"{c}\""))))
                .collect();
            assert_eq!(clients.len(), 4, "{policy:?}: flushed on close");
            assert_intact(&o.path);
        }
    }

    /// A fresh log, used from this thread acting as worker 0 of a pool (so the relay and
    /// write gathering are in play).
    /// The `client` of each record in `path`, in order (the tests name records by it).
    fn clients_in(path: &Path) -> Vec<String> {
        read_lines(path)
            .iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["client"].as_str().unwrap_or_default().to_owned()
            })
            .collect()
    }

    fn open_on_worker_0(policy: FsyncPolicy) -> (tempfile::TempDir, AuditOptions, AuditLog) {
        crate::workers::act_as_worker(0);
        open_fresh(policy)
    }

    /// A fresh log in a temporary folder (kept alive by the returned guard).
    #[test]
    fn the_commit_delay_waits_only_when_many_more_calls_are_in_flight() {
        assert!(!records_are_coming(0, 1), "nothing else in flight");
        assert!(!records_are_coming(1, 1), "the lone caller's own call");
        assert!(!records_are_coming(4, 1));
        assert!(records_are_coming(5, 1), "four others per waiting record");
        assert!(!records_are_coming(32, 16), "half the calls already wait");
        assert!(records_are_coming(256, 10), "most calls are yet to append");
    }

    #[test]
    fn calls_in_flight_are_counted_until_their_guard_drops() {
        let (_dir, _o, log) = open_fresh(FsyncPolicy::Always);
        let count = || log.inner.shared.calls_in_flight.load(Ordering::Relaxed);
        let a = log.call_in_flight();
        let b = log.call_in_flight();
        assert_eq!(count(), 2);
        drop(a);
        assert_eq!(count(), 1);
        drop(b);
        assert_eq!(count(), 0);
    }

    #[test]
    fn under_interval_a_failing_sync_stops_acknowledgements_until_one_succeeds() {
        let (_dir, o, log) = open_fresh(FsyncPolicy::Interval);
        log.append_blocking(proxy("a")).unwrap();
        log.inject_sync_failures(u32::MAX);
        // The background sync of `a` fails (and keeps failing).
        let waited = Instant::now();
        while log.stats().write_errors == 0 {
            assert!(
                waited.elapsed() < Duration::from_secs(5),
                "no sync attempted"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            log.append_blocking(proxy("b")).is_err(),
            "acknowledged while the disk does not sync"
        );
        // The disk recovers: the background sync retries on its own, writes resume.
        log.inject_sync_failures(0);
        let waited = Instant::now();
        let c = loop {
            match log.append_blocking(proxy("c")) {
                Ok(seq) => break seq,
                Err(_) => {
                    assert!(waited.elapsed() < Duration::from_secs(5), "never recovered");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        };
        assert_eq!(c, 2, "b was never written");
        log.close();
        assert_intact(&o.path);
    }

    fn open_fresh(policy: FsyncPolicy) -> (tempfile::TempDir, AuditOptions, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(dir.path(), policy);
        let log = AuditLog::open(o.clone()).unwrap();
        (dir, o, log)
    }

    fn assert_intact(path: &Path) {
        let report = verify_files(std::slice::from_ref(&path.to_path_buf()), None).unwrap();
        assert!(report.is_intact(), "{report:?}");
    }

    /// Appends records of clients `c0`..`c{n-1}` from `n` concurrent tasks; their seqs, in
    /// that order.
    async fn append_concurrently(log: &AuditLog, n: usize) -> Vec<u64> {
        let calls: Vec<_> = (0..n)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.append(proxy(&format!("c{i}"))).await })
            })
            .collect();
        let mut seqs = Vec::new();
        for call in calls {
            let answered = tokio::time::timeout(Duration::from_secs(5), call).await;
            seqs.push(answered.expect("answered in time").unwrap().unwrap());
        }
        seqs
    }

    #[tokio::test]
    async fn concurrent_inline_callers_share_writes_and_each_gets_its_own_seq() {
        for policy in [FsyncPolicy::Never, FsyncPolicy::Interval] {
            let (_dir, o, log) = open_on_worker_0(policy);
            let mut seqs = append_concurrently(&log, 50).await;
            log.close();
            let lines = read_lines(&o.path);
            for (i, seq) in seqs.iter().enumerate() {
                // Each caller's seq is the line holding its own record.
                let line = &lines[usize::try_from(*seq).unwrap() - 1];
                assert!(line.contains(&format!("\"c{i}\"")), "{policy:?}: {line}");
            }
            seqs.sort_unstable();
            assert_eq!(seqs, (1..=50).collect::<Vec<u64>>(), "{policy:?}");
            let writes = log.inner.shared.batches.load(Ordering::Relaxed);
            assert!(
                writes <= 5,
                "{policy:?}: 50 concurrent records took {writes} writes"
            );
            assert_intact(&o.path);
        }
    }

    #[tokio::test]
    async fn under_always_a_workers_callers_hand_over_together_and_get_their_answers_through_its_relay(
    ) {
        let (_dir, o, log) = open_on_worker_0(FsyncPolicy::Always);
        let mut seqs = append_concurrently(&log, 20).await;
        assert!(
            log.inner.shared.relays.running(0),
            "the answers went through worker 0's relay"
        );
        assert_eq!(
            log.inner.shared.batches.load(Ordering::Relaxed),
            1,
            "the 20 records ready together reached the writer in one message: one write"
        );
        log.close();
        let lines = read_lines(&o.path);
        for (i, seq) in seqs.iter().enumerate() {
            let line = &lines[usize::try_from(*seq).unwrap() - 1];
            assert!(line.contains(&format!("\"c{i}\"")), "{line}");
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=20).collect::<Vec<u64>>());
        assert_intact(&o.path);
    }

    #[tokio::test]
    async fn a_leader_dropped_while_gathering_still_writes_for_those_who_joined() {
        for policy in [FsyncPolicy::Never, FsyncPolicy::Always] {
            leader_dropped_while_gathering(policy).await;
        }
    }

    async fn leader_dropped_while_gathering(policy: FsyncPolicy) {
        let (_dir, o, log) = open_on_worker_0(policy);
        let mut leader = Box::pin(log.append(proxy("leader")));
        // First poll: the leader opens the gathering and yields.
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(std::future::Future::poll(leader.as_mut(), &mut cx).is_pending());
        let joiner = tokio::spawn({
            let log = log.clone();
            async move { log.append(proxy("joiner")).await }
        });
        tokio::task::yield_now().await; // the joiner joins and waits
        assert_eq!(
            log.inner.gathers.gathered(0),
            2,
            "the joiner joined the leader"
        );
        drop(leader); // e.g. its client went away
        let answered = tokio::time::timeout(Duration::from_secs(5), joiner).await;
        assert_eq!(
            answered.expect("the joiner was answered").unwrap().unwrap(),
            2
        );
        log.close();
        let lines = read_lines(&o.path);
        assert!(lines[0].contains("\"leader\"") && lines[1].contains("\"joiner\""));
    }

    /// A record queued behind a late one that joined another call's open gathering is kept
    /// when that gathering's batch fails, as one sent alone is (review R1).
    #[tokio::test]
    async fn a_record_behind_in_a_failed_gathering_is_kept_for_the_next_write() {
        for policy in [FsyncPolicy::Never, FsyncPolicy::Always] {
            let (_dir, o, log) = open_on_worker_0(policy);
            let waker = futures_util::task::noop_waker();
            let mut cx = std::task::Context::from_waker(&waker);
            let mut other = Box::pin(log.append(proxy("other")));
            assert!(std::future::Future::poll(other.as_mut(), &mut cx).is_pending());
            log.append_behind(proxy("outcome")).unwrap();
            assert_eq!(log.inner.gathers.gathered(0), 2, "{policy:?}: joined");
            log.inject_write_failures(1);
            let answer = tokio::time::timeout(Duration::from_secs(5), other)
                .await
                .expect("the leader writes");
            assert!(answer.is_err(), "{policy:?}: the batch failed");
            assert!(log.append(proxy("later")).await.is_ok(), "{policy:?}");
            log.close();
            assert_eq!(clients_in(&o.path), ["outcome", "later"], "{policy:?}");
            assert_intact(&o.path);
        }
    }

    /// A call dropped while its allow record waits (`append_behind`, pipeline's `Call`): the
    /// outcome lands right behind the allow, whether the allow is still in the worker's open
    /// gathering (the outcome joins it) or already handed on (the outcome follows it in order).
    #[tokio::test]
    async fn a_record_appended_behind_is_written_after_what_was_queued_before() {
        for policy in [FsyncPolicy::Never, FsyncPolicy::Always] {
            let (_dir, o, log) = open_on_worker_0(policy);
            // 1. The allow is still gathering: the leader has yielded, the call is dropped.
            let mut leader = Box::pin(log.append(proxy("allow-1")));
            let waker = futures_util::task::noop_waker();
            let mut cx = std::task::Context::from_waker(&waker);
            assert!(std::future::Future::poll(leader.as_mut(), &mut cx).is_pending());
            drop(leader);
            log.append_behind(proxy("outcome-1")).unwrap();
            // 2. A gathering is open with another call's record: the outcome of a call whose
            // allow went out before it joins behind it.
            assert!(log.append(proxy("allow-2")).await.is_ok());
            let mut other = Box::pin(log.append(proxy("other")));
            assert!(std::future::Future::poll(other.as_mut(), &mut cx).is_pending());
            log.append_behind(proxy("outcome-2")).unwrap();
            assert_eq!(log.inner.gathers.gathered(0), 2, "{policy:?}: joined");
            assert!(tokio::time::timeout(Duration::from_secs(5), other)
                .await
                .expect("the leader writes")
                .is_ok());
            log.close();
            assert_eq!(
                clients_in(&o.path),
                ["allow-1", "outcome-1", "allow-2", "other", "outcome-2"],
                "{policy:?}"
            );
            assert_intact(&o.path);
        }
    }

    #[tokio::test]
    async fn close_with_writes_the_last_record_after_everything_and_nothing_after_it() {
        for policy in [
            FsyncPolicy::Always,
            FsyncPolicy::Never,
            FsyncPolicy::Interval,
        ] {
            let (_dir, o, log) = open_fresh(policy);
            assert_eq!(log.append(proxy("a")).await.unwrap(), 1);
            log.append_detached(proxy("detached")).unwrap();
            assert_eq!(
                log.close_with(Record::new(Event::Shutdown)).unwrap(),
                3,
                "{policy:?}: after the deferred record"
            );
            assert!(matches!(
                log.append(proxy("late")).await,
                Err(AuditError::Closed)
            ));
            assert!(log.append_detached(proxy("late")).is_err(), "{policy:?}");
            let lines = read_lines(&o.path);
            assert_eq!(lines.len(), 3, "{policy:?}: {lines:?}");
            assert!(lines[2].contains("\"shutdown\""), "{policy:?}");
            assert_intact(&o.path);
        }
    }

    #[tokio::test]
    async fn under_interval_the_flusher_syncs_a_dirty_file_and_only_then() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(opts(dir.path(), FsyncPolicy::Interval)).unwrap();
        log.append(proxy("a")).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while log.stats().fsyncs == 0 {
            assert!(Instant::now() < deadline, "no sync within 5 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let synced = log.stats().fsyncs;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            log.stats().fsyncs,
            synced,
            "a clean file is not synced again"
        );
        log.close();
    }

    #[tokio::test]
    async fn failed_writes_fail_closed_then_recover() {
        // Both paths: the writer thread (always) and inline writes (never, interval).
        for policy in [
            FsyncPolicy::Always,
            FsyncPolicy::Never,
            FsyncPolicy::Interval,
        ] {
            failed_writes_fail_closed_then_recover_with(policy).await;
        }
    }

    async fn failed_writes_fail_closed_then_recover_with(policy: FsyncPolicy) {
        let (_dir, o, log) = open_fresh(policy);
        assert_eq!(log.append(proxy("ok")).await.unwrap(), 1);
        log.inject_write_failures(2);
        assert!(matches!(
            log.append(proxy("x")).await,
            Err(AuditError::Write(_))
        ));
        assert!(matches!(
            log.append(proxy("y")).await,
            Err(AuditError::Write(_))
        ));
        assert_eq!(log.append(proxy("back")).await.unwrap(), 2);
        assert_eq!(log.stats().write_errors, 2);
        log.close();
        let report = verify_files(std::slice::from_ref(&o.path), None).unwrap();
        assert!(report.is_intact(), "{report:?}");
        assert_eq!(report.records, 2);
        assert!(!std::fs::read_to_string(&o.path).unwrap().contains("\"x\""));
    }

    #[tokio::test]
    async fn a_failed_batch_keeps_its_detached_records_for_the_next_write() {
        for policy in [
            FsyncPolicy::Always,
            FsyncPolicy::Never,
            FsyncPolicy::Interval,
        ] {
            let (_dir, o, log) = open_fresh(policy);
            log.inject_write_failures(1);
            log.append_detached(proxy("detached")).unwrap();
            // Whichever write carries the detached record first fails (this one, or the
            // background flush); a later one must still write it.
            let mut tries = 0;
            while log.append(proxy("later")).await.is_err() {
                tries += 1;
                assert!(tries < 3, "{policy:?}: the log did not recover");
            }
            log.close();
            let text = std::fs::read_to_string(&o.path).unwrap();
            assert!(text.contains("\"detached\""), "{policy:?}: {text}");
            assert_intact(&o.path);
        }
    }

    /// Holds the writer thread in its next sync until the returned flag is cleared (a disk
    /// whose `fdatasync` does not return), at most 10 s.
    fn stall_syncs(log: &AuditLog) -> Arc<std::sync::atomic::AtomicBool> {
        let stalled = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let hold = Arc::clone(&stalled);
        log.set_fsync_observer(Arc::new(move |_| {
            let until = Instant::now() + Duration::from_secs(10);
            while hold.load(Ordering::Relaxed) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
        }));
        stalled
    }

    #[tokio::test]
    async fn an_unacknowledged_record_times_out_and_is_still_written() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(dir.path(), FsyncPolicy::Always);
        let log = AuditLog::open(o.clone()).unwrap();
        let stalled = stall_syncs(&log);
        let by = Instant::now() + Duration::from_millis(200);
        let answer = log.append_by(proxy("late"), by).await;
        assert!(matches!(answer, Err(AuditError::TimedOut)), "{answer:?}");
        assert!(Instant::now() < by + Duration::from_secs(2));
        stalled.store(false, Ordering::Relaxed);
        // A healthy disk answers well within the deadline.
        let by = Instant::now() + Duration::from_secs(5);
        assert!(log.append_by(proxy("next"), by).await.is_ok());
        log.close();
        let lines = read_lines(&o.path);
        assert!(lines[lines.len() - 2].contains("\"late\""), "{lines:?}");
        assert_intact(&o.path);
    }

    #[tokio::test]
    async fn records_waiting_for_a_stalled_disk_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(dir.path(), FsyncPolicy::Always);
        let log = AuditLog::open(o).unwrap();
        let stalled = stall_syncs(&log);
        let mut answers = Vec::with_capacity(MAX_QUEUED);
        for _ in 0..MAX_QUEUED {
            let (tx, rx) = tokio::sync::oneshot::channel();
            log.send(proxy("queued"), Reply::Async(tx)).unwrap();
            answers.push(rx);
        }
        // One more is refused, not queued; a detached record (bounded on its own) still is.
        let (tx, _rx) = tokio::sync::oneshot::channel();
        let refused = log.send(proxy("one too many"), Reply::Async(tx));
        assert!(matches!(refused, Err(AuditError::Backlog)), "{refused:?}");
        log.append_detached(proxy("detached")).unwrap();
        stalled.store(false, Ordering::Relaxed);
        for rx in answers {
            assert!(rx.await.unwrap().is_ok());
        }
        assert_eq!(log.inner.shared.queued.load(Ordering::Relaxed), 0);
        let by = Instant::now() + Duration::from_secs(5);
        assert!(log.append_by(proxy("after"), by).await.is_ok());
        log.close();
    }

    #[tokio::test]
    async fn records_waiting_for_a_stalled_disk_are_bounded_in_memory_too() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(dir.path(), FsyncPolicy::Always);
        let log = AuditLog::open(o.clone()).unwrap();
        let stalled = stall_syncs(&log);
        let mib = 1 << 20;
        let long = |client: &str| {
            let mut r = proxy(client);
            r.path = Some("/".repeat(mib));
            r
        };
        let queued_bytes = || log.inner.shared.queued_bytes.load(Ordering::Relaxed);
        // Records of long paths are refused once they hold MAX_QUEUED_BYTES, long before
        // MAX_QUEUED of them (which would be 64 GiB).
        let mut answers = Vec::new();
        let refused = loop {
            let (tx, rx) = tokio::sync::oneshot::channel();
            match log.send(long("queued"), Reply::Async(tx)) {
                Ok(()) => answers.push(rx),
                Err(e) => break e,
            }
            assert!(queued_bytes() <= MAX_QUEUED_BYTES);
            assert!(
                answers.len() <= MAX_QUEUED_BYTES / mib + MAX_BATCH,
                "not bounded by memory"
            );
        };
        assert!(matches!(refused, AuditError::Backlog), "{refused:?}");
        assert!(
            queued_bytes() > MAX_QUEUED_BYTES - 2 * mib,
            "{}",
            queued_bytes()
        );
        // A detached record past the deferred queue's room is dropped too, and counted.
        for _ in 0..MAX_BATCH {
            log.append_detached(proxy("detached")).unwrap();
        }
        let errors = log.stats().write_errors;
        let dropped = log.append_detached(long("detached, long"));
        assert!(matches!(dropped, Err(AuditError::Backlog)), "{dropped:?}");
        assert_eq!(log.stats().write_errors, errors + 1);
        // A small record someone waits on still fits; one that must follow a record already
        // queued is never refused.
        let (tx, small) = tokio::sync::oneshot::channel();
        log.send(proxy("small"), Reply::Async(tx)).unwrap();
        log.append_behind(long("follows a late one")).unwrap();
        stalled.store(false, Ordering::Relaxed);
        for rx in answers {
            assert!(rx.await.unwrap().is_ok());
        }
        assert!(small.await.unwrap().is_ok());
        let by = Instant::now() + Duration::from_secs(5);
        assert!(log.append_by(long("after"), by).await.is_ok());
        assert_eq!(queued_bytes(), 0);
        assert_eq!(log.inner.shared.queued.load(Ordering::Relaxed), 0);
        log.close();
        let lines = read_lines(&o.path);
        let follows = lines.iter().position(|l| l.contains("follows a late one"));
        let after = lines.iter().position(|l| l.contains("\"after\""));
        assert!(follows.is_some() && follows < after, "written, in order");
    }

    /// A record queued behind a late one (`then_queue`, `append_behind`: nobody waits on it)
    /// whose batch fails is kept for the next write, as a detached one is, and lands after the
    /// record it follows.
    #[tokio::test]
    async fn a_record_behind_a_late_one_survives_a_failed_batch() {
        let (_dir, o, log) = open_fresh(FsyncPolicy::Always);
        let stalled = stall_syncs(&log);
        let by = Instant::now() + Duration::from_millis(200);
        let Err(AppendLate::Pending(pending)) = log.append_within(proxy("allow"), by).await else {
            panic!("the allow record should be late");
        };
        // The allow's batch is in its (stalled) sync; the outcome queues behind it.
        pending.then_queue(proxy("outcome"));
        // The disk fills up: the next write fails.
        log.inject_write_failures(1);
        stalled.store(false, Ordering::Relaxed);
        let mut tries = 0;
        while log
            .append_by(proxy("later"), Instant::now() + Duration::from_secs(5))
            .await
            .is_err()
        {
            tries += 1;
            assert!(tries < 5, "never recovered");
        }
        log.close();
        let text = std::fs::read_to_string(&o.path).unwrap();
        let allow = text.find("\"allow\"").expect("the allow");
        let outcome = text.find("\"outcome\"").expect("the outcome, kept");
        assert!(allow < outcome, "{text}");
        assert_intact(&o.path);
    }

    #[test]
    fn under_interval_a_close_whose_final_sync_fails_says_so() {
        let (_dir, _o, log) = open_fresh(FsyncPolicy::Interval);
        log.append_blocking(proxy("a")).unwrap();
        let waited = Instant::now();
        while log.stats().fsyncs == 0 {
            assert!(waited.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(5));
        }
        let errors = log.stats().write_errors;
        log.inject_sync_failures(1);
        let answer = log.close_with(Record::new(Event::Shutdown));
        assert_eq!(
            log.stats().write_errors,
            errors + 1,
            "the final sync failed"
        );
        assert!(matches!(answer, Err(AuditError::Write(_))), "{answer:?}");
    }

    #[test]
    fn fsync_observer_sees_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(opts(dir.path(), FsyncPolicy::Always)).unwrap();
        let seen = Arc::new(AtomicU64::new(0));
        let s = seen.clone();
        log.set_fsync_observer(Arc::new(move |_| {
            s.fetch_add(1, Ordering::Relaxed);
        }));
        log.append_blocking(proxy("a")).unwrap();
        log.close();
        assert_eq!(seen.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn handle_is_send_sync_clone_and_options_hide_the_key() {
        fn assert_handle<T: Send + Sync + Clone + 'static>() {}
        assert_handle::<AuditLog>();
        let mut o = opts(Path::new("/tmp"), FsyncPolicy::Never);
        o.hmac_key = Some(Secret::new("hunter2-sentinel"));
        assert!(!format!("{o:?}").contains("hunter2"));
    }

    #[test]
    fn rotation_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        assert_eq!(highest_rotation(&p).unwrap(), 0);
        for name in [
            "a.jsonl.1",
            "a.jsonl.3",
            "a.jsonl.9.gz",
            "b.jsonl.7",
            "a.jsonl.x",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        assert_eq!(
            highest_rotation(&p).unwrap(),
            9,
            "a compressed file keeps its number"
        );
        std::fs::remove_file(dir.path().join("a.jsonl.9.gz")).unwrap();
        for name in ["a.jsonl.", "a.jsonl..gz", "a.jsonl.7x.gz"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        assert_eq!(highest_rotation(&p).unwrap(), 3);
        assert_eq!(rotated_path(&p, 4), dir.path().join("a.jsonl.4"));
        // A folder that cannot be listed is an error, not "no rotated files".
        assert!(highest_rotation(&dir.path().join("missing/a.jsonl")).is_err());
    }

    #[test]
    fn a_second_writer_on_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(dir.path(), FsyncPolicy::Always);
        let first = AuditLog::open(o.clone()).unwrap();
        first.append_blocking(proxy("a")).unwrap();
        let second = AuditLog::open(o.clone()).err().expect("the file is in use");
        assert!(second.to_string().contains("another process"), "{second}");
        first.append_blocking(proxy("b")).unwrap();
        first.close();
        drop(first);
        // Released with the first writer: a restart continues the chain.
        let again = AuditLog::open(o.clone()).unwrap();
        again.append_blocking(proxy("c")).unwrap();
        again.close();
        let report = verify_files(std::slice::from_ref(&o.path), None).unwrap();
        assert!(report.is_intact(), "{report:?}");
        assert_eq!(report.records, 3, "a, b and c: {report:?}");
    }

    #[test]
    fn rotation_never_replaces_a_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        std::fs::write(&p, b"newest\n").unwrap();
        std::fs::write(dir.path().join("a.jsonl.1"), b"oldest\n").unwrap();
        rotate_file(&p).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("a.jsonl.1")).unwrap(),
            b"oldest\n"
        );
        assert_eq!(
            std::fs::read(dir.path().join("a.jsonl.2")).unwrap(),
            b"newest\n"
        );
        assert!(!p.exists());
    }
}
