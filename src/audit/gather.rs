//! Concurrent callers on a worker share one write (or, under `always`, one hand-over).
//!
//! Each allow record must be in the file before its call is forwarded, and a `write` of a
//! few hundred bytes costs more in the kernel than sealing the record does. So the first caller
//! on a worker opens a gathering and yields once: the other calls that runtime has ready run
//! up to their own audit step meanwhile and join it. Then the first caller — the leader —
//! writes everything gathered with one `write` and answers the others (on the same thread: a
//! queue push each, no wake-up across threads). A lone caller pays one yield.
//!
//! Under `fsync = "always"` the same gathering is handed to the writer thread in one message
//! instead: waking that thread with the first record preempted the worker (one core) while it
//! was still making the others, and each sync then covered few records. Measured with
//! `benches/ab.sh -f always` against per-record sends: 1.20× the calls/s at 256 connections,
//! 1.04× at 32.
//!
//! A leader whose call is dropped while it waits (its client went away) still writes what was
//! gathered, from `Drop`: nobody who joined is ever left waiting.

use std::sync::{Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::audit::record::Record;
use crate::audit::relay::{Answer, AnswerTx};

/// One gathering per worker runtime ([`crate::workers`]).
pub(super) struct Gathers {
    slots: Box<[Mutex<Gathering>]>,
}

#[derive(Default)]
struct Gathering {
    /// A leader is yielding and will write `records`.
    open: bool,
    /// The leader's record first, then the joiners' in the order they came.
    records: Vec<Record>,
    /// The joiners' answers, for `records[1..]`; `None` for a record nobody waits on, queued
    /// behind a late one ([`Gathers::join_if_open`]), which a failed batch must not lose.
    joiners: Vec<Option<AnswerTx>>,
    /// The lists of the last gathering written, emptied, for the next one: no regrowth
    /// (and copying of records) per gathering.
    spare: Option<(Vec<Record>, Vec<Option<AnswerTx>>)>,
}

/// Lists longer than this are not kept for reuse (a burst should not pin its memory).
const SPARE_KEEP: usize = 256;

/// What [`Gathers::join`] made of the caller.
pub(super) enum Joined {
    /// Yield once, then [`Gathers::take`] the slot and write it.
    Leader(usize),
    /// The leader answers here.
    Joiner(oneshot::Receiver<Answer>),
}

impl Gathers {
    pub(super) fn new(workers: usize) -> Self {
        Self {
            slots: (0..workers.max(1)).map(|_| Mutex::default()).collect(),
        }
    }

    /// The calling worker's gathering; `None` off the worker pool, where a leader's runtime
    /// might not be driven while others wait on it (the caller then writes alone).
    pub(super) fn slot_for_caller(&self) -> Option<usize> {
        crate::workers::current().map(|w| w % self.slots.len())
    }

    /// Joins `slot`'s open gathering, or opens one and leads it.
    pub(super) fn join(&self, slot: usize, record: Record) -> Joined {
        let mut gathering = self.lock(slot);
        gathering.records.push(record);
        if gathering.open {
            let (tx, rx) = oneshot::channel();
            gathering.joiners.push(Some(tx));
            Joined::Joiner(rx)
        } else {
            gathering.open = true;
            Joined::Leader(slot)
        }
    }

    /// Adds `record` to `slot`'s gathering if one is open, behind what it holds; nobody waits
    /// for its answer. Gives the record back when no gathering is open.
    pub(super) fn join_if_open(&self, slot: usize, record: Record) -> Option<Record> {
        let mut gathering = self.lock(slot);
        if !gathering.open {
            return Some(record);
        }
        gathering.records.push(record);
        // `joiners` answers `records[1..]` one for one: nobody receives this one's.
        gathering.joiners.push(None);
        None
    }

    /// Closes the gathering: its records (the leader's first) and the joiners' answers.
    pub(super) fn take(&self, slot: usize) -> (Vec<Record>, Vec<Option<AnswerTx>>) {
        let mut gathering = self.lock(slot);
        gathering.open = false;
        let (records, joiners) = gathering.spare.take().unwrap_or_default();
        (
            std::mem::replace(&mut gathering.records, records),
            std::mem::replace(&mut gathering.joiners, joiners),
        )
    }

    /// Gives back the (emptied) lists [`Gathers::take`] returned, for a later gathering.
    pub(super) fn recycle(
        &self,
        slot: usize,
        records: Vec<Record>,
        joiners: Vec<Option<AnswerTx>>,
    ) {
        if records.is_empty()
            && joiners.is_empty()
            && records.capacity() <= SPARE_KEEP
            && joiners.capacity() <= SPARE_KEEP
        {
            self.lock(slot).spare.get_or_insert((records, joiners));
        }
    }

    /// Records gathered in `slot` so far.
    #[cfg(test)]
    pub(super) fn gathered(&self, slot: usize) -> usize {
        self.lock(slot).records.len()
    }

    fn lock(&self, slot: usize) -> MutexGuard<'_, Gathering> {
        // A push or a take cannot be left half done by a panic.
        self.slots[slot].lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::Event;

    #[test]
    fn the_first_caller_leads_and_the_next_ones_join_until_the_take() {
        let gathers = Gathers::new(1);
        let Joined::Leader(slot) = gathers.join(0, Record::new(Event::Proxy)) else {
            panic!("the first caller leads");
        };
        let Joined::Joiner(mut rx) = gathers.join(0, Record::new(Event::Admin)) else {
            panic!("the second caller joins");
        };
        let (records, joiners) = gathers.take(slot);
        assert_eq!(
            records.iter().map(|r| r.event).collect::<Vec<_>>(),
            [Event::Proxy, Event::Admin]
        );
        assert_eq!(joiners.len(), 1);
        assert!(matches!(
            gathers.join(0, Record::new(Event::Proxy)),
            Joined::Leader(_)
        ));
        for tx in joiners {
            tx.unwrap().send(Ok(2)).unwrap();
        }
        assert_eq!(rx.try_recv().unwrap().unwrap(), 2);
    }

    #[test]
    fn a_record_behind_joins_only_an_open_gathering_and_keeps_answers_aligned() {
        let gathers = Gathers::new(1);
        assert!(gathers
            .join_if_open(0, Record::new(Event::ProxyResult))
            .is_some());
        let Joined::Leader(slot) = gathers.join(0, Record::new(Event::Proxy)) else {
            panic!("the first caller leads");
        };
        assert!(gathers
            .join_if_open(0, Record::new(Event::ProxyResult))
            .is_none());
        let Joined::Joiner(mut rx) = gathers.join(0, Record::new(Event::Admin)) else {
            panic!("a later caller joins");
        };
        let (records, joiners) = gathers.take(slot);
        assert_eq!(
            records.iter().map(|r| r.event).collect::<Vec<_>>(),
            [Event::Proxy, Event::ProxyResult, Event::Admin]
        );
        // One answer per record after the leader's: none for the record nobody waits on, the
        // third record's last.
        assert_eq!(joiners.len(), 2);
        assert!(joiners[0].is_none());
        for (i, tx) in joiners.into_iter().enumerate() {
            if let Some(tx) = tx {
                let _ = tx.send(Ok(i as u64 + 2));
            }
        }
        assert_eq!(rx.try_recv().unwrap().unwrap(), 3);
    }

    #[test]
    fn recycled_lists_serve_the_next_gathering() {
        let gathers = Gathers::new(1);
        for _ in 0..3 {
            gathers.join(0, Record::new(Event::Proxy));
        }
        let (mut records, mut joiners) = gathers.take(0);
        let capacity = records.capacity();
        assert!(capacity >= 3);
        records.clear();
        joiners.clear();
        gathers.recycle(0, records, joiners);
        // The next gathering starts on the kept list; what it gathered is handed out whole.
        let Joined::Leader(slot) = gathers.join(0, Record::new(Event::Admin)) else {
            panic!("a new gathering is led");
        };
        let (records, _) = gathers.take(slot);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].event, Event::Admin);
        assert_eq!(records.capacity(), capacity);
        // A list that still holds something is not kept: the gathering after next does not
        // start on it.
        gathers.recycle(0, vec![Record::new(Event::Proxy)], Vec::new());
        gathers.take(0);
        let (records, _) = gathers.take(0);
        assert_eq!((records.len(), records.capacity()), (0, 0));
    }
}
