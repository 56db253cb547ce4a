//! The token endpoint's source-address lockout (DESIGN §4.1): twenty failed client
//! authentications from one address within a minute refuse every token request from it for
//! the rest of that minute, right secret or not.

use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, Ordering};

use dashmap::DashMap;

/// A failed client authentication budget: this many failures from one address within 60
/// seconds lock it out of the token endpoint until the oldest of them is a minute old
/// (DESIGN §4.1).
pub const AUTH_FAILURES_PER_MINUTE: u32 = 20;

/// The most source addresses whose failed authentications are tracked one by one (each ~250
/// bytes; an address's window goes a minute after its last failure). Anyone can make token
/// requests from many addresses (an IPv6 prefix holds billions): past this many, every
/// address not tracked shares one window, so one who fills the table gets no more guesses
/// than one address — and, while it is full, locks out every untracked address with it.
pub(crate) const MAX_LOCKOUT_ADDRESSES: usize = 100_000;

/// Why [`crate::broker::Broker::authenticate_from`] let no client in.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthAttempt<E> {
    /// The address is locked out for this many more seconds; nothing was tried.
    LockedOut(u64),
    /// Authentication failed (and was counted).
    Failed(E),
}

/// The times (Unix seconds) of a source address's latest failed client authentications,
/// at most [`AUTH_FAILURES_PER_MINUTE`], oldest first: a sliding 60-second window, so failures
/// on both sides of a minute boundary still add up.
#[derive(Default)]
struct FailureWindow(std::collections::VecDeque<i64>);

impl FailureWindow {
    /// Runs `authenticate` unless the window is full, and notes a failure at `now`.
    fn attempt<T, E>(
        &mut self,
        now: i64,
        authenticate: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, AuthAttempt<E>> {
        if let Some(left) = self.lockout_left(now) {
            return Err(AuthAttempt::LockedOut(left));
        }
        authenticate().map_err(|e| {
            self.0.push_back(now);
            while self.0.len() > AUTH_FAILURES_PER_MINUTE as usize {
                self.0.pop_front();
            }
            AuthAttempt::Failed(e)
        })
    }

    /// Seconds until the window holds fewer than the limit, if it is full now.
    fn lockout_left(&self, now: i64) -> Option<u64> {
        if self.0.len() < AUTH_FAILURES_PER_MINUTE as usize {
            return None;
        }
        let until = self.0.front().copied()? + 60;
        (until > now).then(|| (until - now) as u64)
    }
}

/// The failed client authentications of each source address (those of the last minute).
pub(crate) struct Lockouts {
    windows: DashMap<IpAddr, FailureWindow>,
    /// The most addresses tracked one by one ([`MAX_LOCKOUT_ADDRESSES`]).
    cap: usize,
    /// The window every address beyond `cap` shares.
    overflow: std::sync::Mutex<FailureWindow>,
    /// The Unix second of the last warning that the cap was reached (one a minute).
    warned: AtomicI64,
}

impl Lockouts {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            windows: DashMap::new(),
            cap,
            overflow: std::sync::Mutex::new(FailureWindow::default()),
            warned: AtomicI64::new(i64::MIN),
        }
    }

    pub(crate) fn left(&self, ip: IpAddr, now: i64) -> Option<u64> {
        match self.windows.get(&ip) {
            Some(w) => w.lockout_left(now),
            None if self.windows.len() >= self.cap => self.shared_window().lockout_left(now),
            None => None,
        }
    }

    fn shared_window(&self) -> std::sync::MutexGuard<'_, FailureWindow> {
        self.overflow.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// See [`crate::broker::Broker::authenticate_from`]. An address keeps an entry only once it has failed.
    pub(crate) fn attempt<T, E>(
        &self,
        ip: IpAddr,
        now: i64,
        authenticate: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, AuthAttempt<E>> {
        if !self.windows.contains_key(&ip) && self.windows.len() >= self.cap {
            let last = self.warned.load(Ordering::Relaxed);
            let due = now >= last.saturating_add(60)
                && self
                    .warned
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok();
            if due {
                tracing::warn!(
                    "failed client authentications of {} source addresses are tracked; until \
                     older ones expire, every other address shares one lockout",
                    self.cap
                );
            }
            return self.shared_window().attempt(now, authenticate);
        }
        let mut w = self.windows.entry(ip).or_default();
        let result = w.attempt(now, authenticate);
        // An address that never failed keeps no entry (its requests are the usual case).
        let untouched = w.0.is_empty();
        drop(w);
        if untouched {
            self.windows.remove_if(&ip, |_, w| w.0.is_empty());
        }
        result
    }

    /// Forgets the addresses whose last failure is a minute old.
    pub(crate) fn sweep(&self, now: i64) {
        self.windows
            .retain(|_, w| w.0.back().is_some_and(|&last| last + 60 > now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failing_addresses_are_tracked_and_only_so_many() {
        let lockouts = Lockouts::new(2);
        let ip = |n: u8| IpAddr::from([127, 0, 0, n]);
        let ok = || Ok::<(), ()>(());
        let fail = || Err::<(), ()>(());
        assert!(lockouts.attempt(ip(1), 100, ok).is_ok());
        assert!(lockouts.windows.is_empty(), "a success leaves nothing");
        for _ in 0..AUTH_FAILURES_PER_MINUTE {
            assert_eq!(
                lockouts.attempt(ip(1), 100, fail),
                Err(AuthAttempt::Failed(()))
            );
        }
        assert_eq!(
            lockouts.attempt(ip(1), 100, ok),
            Err(AuthAttempt::LockedOut(60))
        );
        assert_eq!(lockouts.left(ip(1), 100), Some(60));
        assert!(lockouts.attempt(ip(2), 100, fail).is_err());
        // Full: the addresses beyond share one window — twenty failures between them, from
        // as many addresses as there are, lock them all out; the tracked ones stay tracked.
        for n in 0..AUTH_FAILURES_PER_MINUTE {
            let beyond = ip(3 + n as u8);
            assert_eq!(
                lockouts.attempt(beyond, 100, fail),
                Err(AuthAttempt::Failed(()))
            );
        }
        assert_eq!(lockouts.windows.len(), 2);
        assert_eq!(
            lockouts.attempt(ip(99), 100, ok),
            Err(AuthAttempt::LockedOut(60))
        );
        assert_eq!(lockouts.left(ip(98), 100), Some(60));
        assert!(
            lockouts.attempt(ip(2), 100, ok).is_ok(),
            "a tracked address has its own"
        );
        assert_eq!(
            lockouts.attempt(ip(1), 101, ok),
            Err(AuthAttempt::LockedOut(59))
        );
        // A minute after their last failure, tracked addresses go and make room.
        lockouts.sweep(160);
        assert!(lockouts.windows.is_empty());
        assert!(lockouts.attempt(ip(3), 160, fail).is_err());
        assert_eq!(lockouts.windows.len(), 1);
        assert_eq!(lockouts.left(ip(99), 160), None);
    }

    #[test]
    fn failures_across_a_minute_boundary_still_lock_out() {
        let mut w = FailureWindow::default();
        for _ in 0..19 {
            w.0.push_back(59);
        }
        assert_eq!(w.lockout_left(59), None, "19 failures are within budget");
        w.0.push_back(61);
        assert_eq!(
            w.lockout_left(61),
            Some(58),
            "20 within 60 s, though across :00"
        );
        assert_eq!(
            w.lockout_left(119),
            None,
            "free once the oldest is a minute old"
        );
    }
}
