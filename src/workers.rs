//! One single-threaded runtime per core, the way nginx runs one worker process per core.
//!
//! A proxied call is a chain of small steps on two sockets (client and upstream) plus the
//! audit write. On tokio's work-stealing runtime every step pays for cross-thread
//! bookkeeping, and on a machine with one core to spare that bookkeeping is all it buys.
//! Here the accept loop hands each connection to one worker for its whole life; the worker's
//! runtime drives the client connection, the pooled upstream connections it uses (each
//! worker has its own pool, see [`crate::proxy::forward::UpstreamClient`]) and their
//! timers, all on one thread. Measured with `benches/ab.sh` on the reference machine (one
//! core for the broker, 32 connections, `fsync = "never"`): 1.12× the calls/s at 0.92× the
//! CPU per call of tokio's multi-threaded runtime.
//!
//! Worker 0 is the runtime `credbroker serve` starts on (it also runs the listeners, admin
//! API, reloads and signals); workers 1.. are extra threads. With no pool installed (tests,
//! library use) connections are spawned on the caller's runtime, and per-worker machinery
//! that relies on a worker's runtime being driven all the time (the audit relay and write
//! gathering) stands aside: [`current`] is `None` on every thread that is not a worker.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

thread_local! {
    /// The worker this thread runs, if it is one.
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

static POOL: OnceLock<Workers> = OnceLock::new();

/// The process's worker runtimes.
pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    /// Extra worker threads and the senders that let them finish.
    threads: Mutex<Vec<WorkerThread>>,
}

/// How many workers there are (what per-worker state is sized by): 1 without a pool.
pub fn count() -> usize {
    POOL.get().map_or(1, |w| w.handles.len())
}

/// The index of the worker running on this thread, in `0..count()`; `None` off the pool.
pub fn current() -> Option<usize> {
    INDEX.with(Cell::get)
}

/// Makes the calling thread act as worker `index` (tests of per-worker machinery).
#[cfg(test)]
pub(crate) fn act_as_worker(index: usize) {
    INDEX.with(|i| i.set(Some(index)));
}

/// Runs `task` on the next worker, round robin (without a pool, on the caller's runtime), as a
/// member of `set`, so that the caller can stop what is left of its tasks.
pub fn spawn_into<F>(set: &mut JoinSet<()>, task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    match POOL.get() {
        Some(pool) if pool.handles.len() > 1 => {
            let i = pool.next.fetch_add(1, Ordering::Relaxed) % pool.handles.len();
            set.spawn_on(task, &pool.handles[i]);
        }
        _ => {
            set.spawn(task);
        }
    }
}

/// Installs the pool: the calling thread's runtime becomes worker 0 and `total - 1` threads
/// each start a single-threaded runtime. Call once, from inside worker 0's runtime (which must
/// be driven for as long as the process serves), before anything sized by [`count`] is built.
/// A second call is refused.
pub fn install(total: usize) -> std::io::Result<()> {
    let mut handles = vec![Handle::current()];
    let mut threads = Vec::new();
    for index in 1..total.max(1) {
        match start_worker(index) {
            Ok((handle, thread)) => {
                handles.push(handle);
                threads.push(thread);
            }
            Err(e) => {
                stop(threads);
                return Err(e);
            }
        }
    }
    let workers = Workers {
        handles,
        next: AtomicUsize::new(0),
        threads: Mutex::new(threads),
    };
    if let Err(refused) = POOL.set(workers) {
        stop(std::mem::take(
            &mut *refused.threads.lock().unwrap_or_else(|e| e.into_inner()),
        ));
        return Err(std::io::Error::other(
            "the worker pool is already installed",
        ));
    }
    INDEX.with(|i| i.set(Some(0)));
    Ok(())
}

type WorkerThread = (oneshot::Sender<()>, JoinHandle<()>);

/// Worker `index`: a thread driving a single-threaded runtime until told to stop.
fn start_worker(index: usize) -> std::io::Result<(Handle, WorkerThread)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = runtime.handle().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(format!("credbroker-worker-{index}"))
        .spawn(move || {
            INDEX.with(|i| i.set(Some(index)));
            // Runs the connections spawned onto it until the pool shuts down; dropping the
            // runtime then drops whatever is left (idle upstream connections, say).
            runtime.block_on(async {
                let _ = stopped.await;
            });
        })?;
    Ok((handle, (stop, thread)))
}

fn stop(threads: Vec<WorkerThread>) {
    for (stop, thread) in threads {
        let _ = stop.send(());
        if thread.join().is_err() {
            tracing::error!("a worker thread panicked");
        }
    }
}

/// Stops the extra workers, with what still runs on them (idle upstream connections: the
/// listeners have stopped their client connections by then, see `server::serve`). Call after
/// the listeners have drained and before the `shutdown` record, so that it is the log's last.
pub fn shutdown() {
    let Some(pool) = POOL.get() else { return };
    stop(std::mem::take(
        &mut *pool.threads.lock().unwrap_or_else(|e| e.into_inner()),
    ));
}

/// The number of workers `serve` starts: one per core this process may run on.
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
