//! Answers from the writer thread to async callers, one cross-thread wake per batch.
//!
//! Under `fsync = "always"` the writer thread answers every record of a batch. Waking a task
//! that lives on another thread costs a syscall (the runtime's eventfd) each time: with 40
//! records a batch the writer spent more time waking callers than syncing (strace showed 250
//! eventfd writes per `fdatasync`). So each worker runtime has a relay: the writer leaves a
//! batch's answers in the relay's mailbox and wakes only the relay task, which runs on the
//! callers' own thread and hands the answers out there, where waking a task is a queue push.
//!
//! A relay task starts with the first caller on its worker and stops when the log closes or
//! its runtime goes away; whatever is in the mailbox then is answered directly, and so is
//! anything delivered while no relay runs. No answer is ever left behind.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{oneshot, Notify};

use crate::audit::AuditError;

/// One record's outcome: its seq, or why it is not in the log.
pub(super) type Answer = Result<u64, AuditError>;
/// Where a waiting caller expects its answer.
pub(super) type AnswerTx = oneshot::Sender<Answer>;

/// One relay per worker runtime ([`crate::workers`]).
pub(super) struct Relays {
    slots: Box<[Relay]>,
    closed: AtomicBool,
}

struct Relay {
    mailbox: Mutex<Mailbox>,
    wake: Notify,
}

#[derive(Default)]
struct Mailbox {
    /// A relay task is running for this worker and will empty the mailbox.
    running: bool,
    answers: Vec<(AnswerTx, Answer)>,
}

impl Relays {
    pub(super) fn new(workers: usize) -> Self {
        let slots = (0..workers.max(1))
            .map(|_| Relay {
                mailbox: Mutex::new(Mailbox::default()),
                wake: Notify::new(),
            })
            .collect();
        Self {
            slots,
            closed: AtomicBool::new(false),
        }
    }

    /// The relay serving the calling thread's worker, started on the caller's runtime if it
    /// is not running; `None` off the worker pool (the writer then answers directly: a relay
    /// on a runtime nobody drives would never hand its answers out).
    pub(super) fn for_caller(self: &Arc<Self>) -> Option<usize> {
        let worker = crate::workers::current()? % self.slots.len();
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let mut mailbox = self.lock(worker);
        if !mailbox.running && !self.closed.load(Ordering::Acquire) {
            mailbox.running = true;
            drop(mailbox);
            // The guard is an argument, so it is in the future from the start: even a task
            // dropped before its first poll resets `running`.
            runtime.spawn(run(Stopped {
                relays: Arc::clone(self),
                worker,
            }));
        }
        Some(worker)
    }

    /// Leaves an answer for `worker`'s relay (or sends it now if none runs). Returns whether
    /// the relay needs a [`Relays::wake`].
    pub(super) fn deliver(&self, worker: usize, tx: AnswerTx, answer: Answer) -> bool {
        let mut mailbox = self.lock(worker);
        if mailbox.running {
            mailbox.answers.push((tx, answer));
            true
        } else {
            drop(mailbox);
            let _ = tx.send(answer);
            false
        }
    }

    /// Wakes `worker`'s relay to hand out what was delivered (a permit is kept if it is busy).
    pub(super) fn wake(&self, worker: usize) {
        self.slots[worker].wake.notify_one();
    }

    /// The log is closing: every relay hands out what it holds and stops.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for slot in self.slots.iter() {
            slot.wake.notify_one();
        }
    }

    /// Whether `worker`'s relay task runs.
    #[cfg(test)]
    pub(super) fn running(&self, worker: usize) -> bool {
        self.lock(worker).running
    }

    fn lock(&self, worker: usize) -> MutexGuard<'_, Mailbox> {
        // A panic cannot leave a mailbox half-updated (a push or a take).
        self.slots[worker]
            .mailbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn hand_out(&self, worker: usize) {
        let answers = std::mem::take(&mut self.lock(worker).answers);
        for (tx, answer) in answers {
            // A caller that went away (request cancelled) no longer needs the answer.
            let _ = tx.send(answer);
        }
    }
}

/// The relay task of one worker.
async fn run(relay: Stopped) {
    let (relays, worker) = (&relay.relays, relay.worker);
    loop {
        relays.slots[worker].wake.notified().await;
        relays.hand_out(worker);
        if relays.closed.load(Ordering::Acquire) {
            return;
        }
    }
}

/// Runs when the relay task ends for any reason (log closed, runtime shut down): later
/// answers go out directly, and none in the mailbox is lost.
struct Stopped {
    relays: Arc<Relays>,
    worker: usize,
}

impl Drop for Stopped {
    fn drop(&mut self) {
        self.relays.lock(self.worker).running = false;
        self.relays.hand_out(self.worker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_reach_their_callers_through_the_relay() {
        crate::workers::act_as_worker(0);
        let relays = Arc::new(Relays::new(1));
        let worker = relays.for_caller().expect("inside a runtime");
        let (tx, rx) = oneshot::channel();
        let (tx2, rx2) = oneshot::channel();
        let relays2 = Arc::clone(&relays);
        // The writer answers from its own thread.
        std::thread::spawn(move || {
            assert!(relays2.deliver(worker, tx, Ok(7)));
            assert!(relays2.deliver(worker, tx2, Ok(8)));
            relays2.wake(worker);
        })
        .join()
        .unwrap();
        assert_eq!(rx.await.unwrap().unwrap(), 7);
        assert_eq!(rx2.await.unwrap().unwrap(), 8);
    }

    #[test]
    fn off_the_pool_or_outside_a_runtime_the_answer_goes_out_directly() {
        let relays = Arc::new(Relays::new(1));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(
            runtime.block_on(async { relays.for_caller() }).is_none(),
            "not a worker thread"
        );
        crate::workers::act_as_worker(0);
        assert!(relays.for_caller().is_none(), "no runtime");
        let (tx, mut rx) = oneshot::channel();
        assert!(!relays.deliver(0, tx, Ok(1)));
        assert_eq!(rx.try_recv().unwrap().unwrap(), 1);
    }

    #[test]
    fn a_relay_whose_runtime_goes_away_leaves_no_answer_behind() {
        crate::workers::act_as_worker(0);
        let relays = Arc::new(Relays::new(1));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let worker = runtime.block_on(async { relays.for_caller().unwrap() });
        // Let the relay task start and wait.
        runtime.block_on(tokio::task::yield_now());
        let (tx, mut rx) = oneshot::channel();
        assert!(relays.deliver(worker, tx, Ok(3)));
        drop(runtime); // drops the relay task before it handed the answer out
        assert_eq!(rx.try_recv().unwrap().unwrap(), 3);
        let (tx, mut rx) = oneshot::channel();
        assert!(!relays.deliver(worker, tx, Ok(4)), "no relay runs any more");
        assert_eq!(rx.try_recv().unwrap().unwrap(), 4);
    }

    #[tokio::test]
    async fn close_stops_the_relay_after_handing_out() {
        crate::workers::act_as_worker(0);
        let relays = Arc::new(Relays::new(1));
        let worker = relays.for_caller().unwrap();
        tokio::task::yield_now().await;
        let (tx, rx) = oneshot::channel();
        assert!(relays.deliver(worker, tx, Ok(5)));
        relays.close();
        assert_eq!(rx.await.unwrap().unwrap(), 5);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!relays.lock(worker).running);
    }
}
