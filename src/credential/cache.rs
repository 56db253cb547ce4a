//! The cache of one minted credential (DESIGN §3.7): served until its refresh point, refreshed
//! by one mint at a time whose result every waiting caller shares, never served once expired.
//!
//! Time comes from a [`Clock`] so the refresh rules are tested without waiting.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use chrono::{DateTime, Utc};

use super::{CredentialError, Minted};

/// The time source for refresh decisions.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// One connector's current credential and its refresh lock.
pub struct Cache {
    clock: Arc<dyn Clock>,
    current: ArcSwapOption<Minted>,
    /// Held for the whole of a mint, so there is at most one in flight.
    refresh: tokio::sync::Mutex<Attempt>,
    /// Mirrors `Attempt::generation`, readable without the lock: a caller notes it before
    /// queueing, and a change once it holds the lock means it waited for someone's attempt.
    generation: AtomicU64,
}

/// How long before its expiry a credential past its refresh point stops being served while the
/// refresh runs (callers then wait for the new one).
const SERVE_MARGIN: chrono::TimeDelta = chrono::TimeDelta::seconds(5);

/// The outcome of the latest mint, kept so callers that waited for it share a failure too.
#[derive(Default)]
struct Attempt {
    generation: u64,
    last_error: Option<CredentialError>,
}

impl Cache {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            current: ArcSwapOption::empty(),
            refresh: tokio::sync::Mutex::new(Attempt::default()),
            generation: AtomicU64::new(0),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// The cached credential if it is before its refresh point (the lock-free fast path).
    pub fn fresh(&self) -> Option<Arc<Minted>> {
        let now = self.clock.now();
        self.current.load_full().filter(|m| now < m.refresh_at)
    }

    /// The cached credential, fresh or minted now by `mint` (called with the current time).
    ///
    /// Callers that queue behind a mint reuse its result — the new credential, or its error —
    /// instead of minting again. A failed refresh still serves a cached credential that has
    /// not expired (it is past its refresh point, not past its life); an expired one never.
    pub async fn get<F, Fut>(&self, mint: F) -> Result<Arc<Minted>, CredentialError>
    where
        F: FnOnce(DateTime<Utc>) -> Fut,
        Fut: Future<Output = Result<Minted, CredentialError>>,
    {
        if let Some(m) = self.fresh() {
            return Ok(m);
        }
        let seen = self.generation.load(Ordering::Acquire);
        let mut attempt = self.refresh.lock().await;
        if let Some(m) = self.fresh() {
            return Ok(m);
        }
        if attempt.generation != seen {
            if let Some(e) = &attempt.last_error {
                return self.unexpired().ok_or_else(|| e.clone());
            }
        }
        let result = mint(self.clock.now()).await;
        attempt.generation += 1;
        self.generation.store(attempt.generation, Ordering::Release);
        match result {
            Ok(minted) => {
                attempt.last_error = None;
                let minted = Arc::new(minted);
                self.current.store(Some(Arc::clone(&minted)));
                Ok(minted)
            }
            Err(e) => {
                attempt.last_error = Some(e.clone());
                self.unexpired().ok_or(e)
            }
        }
    }

    /// The cached credential past its refresh point that may still be served while a refresh
    /// runs: one not within [`SERVE_MARGIN`] (or half its refresh window, if shorter) of its
    /// expiry — a call forwarded with it arrives before it expires.
    pub fn usable(&self) -> Option<Arc<Minted>> {
        let now = self.clock.now();
        self.current.load_full().filter(|m| {
            let window = (m.expires_at - m.refresh_at) / 2;
            let margin = window.min(SERVE_MARGIN);
            now < m.expires_at - margin
        })
    }

    /// Whether a mint is running now.
    pub fn refreshing(&self) -> bool {
        self.refresh.try_lock().is_err()
    }

    /// Drops `used` if it is still the cached credential (the upstream refused it); a newer
    /// credential minted meanwhile stays.
    pub fn invalidate(&self, used: &Arc<Minted>) {
        self.current
            .compare_and_swap(&Some(Arc::clone(used)), None::<Arc<Minted>>);
    }

    /// The cached credential, fresh or not (for the admin view).
    pub fn peek(&self) -> Option<Arc<Minted>> {
        self.current.load_full()
    }

    fn unexpired(&self) -> Option<Arc<Minted>> {
        let now = self.clock.now();
        let m = self.current.load_full().filter(|m| now < m.expires_at)?;
        tracing::warn!(expires_at = %m.expires_at, "refresh failed; serving the cached credential until it expires");
        Some(m)
    }
}

/// A clock tests set by hand.
#[cfg(test)]
pub(crate) struct FakeClock(pub(crate) std::sync::Mutex<DateTime<Utc>>);

#[cfg(test)]
impl FakeClock {
    pub(crate) fn advance(&self, secs: i64) {
        *self.0.lock().unwrap() += chrono::Duration::seconds(secs);
    }
}

#[cfg(test)]
impl Clock for FakeClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;
    use std::time::Duration;

    use chrono::TimeZone;

    use super::*;
    use crate::secret::Secret;

    fn setup() -> (Arc<FakeClock>, Cache) {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let clock = Arc::new(FakeClock(Mutex::new(t0)));
        let cache = Cache::new(Arc::clone(&clock) as Arc<dyn Clock>);
        (clock, cache)
    }

    /// A minter that counts its calls and issues `lifetime`-second credentials.
    fn minter(
        count: &AtomicUsize,
        lifetime: i64,
    ) -> impl FnOnce(DateTime<Utc>) -> std::future::Ready<Result<Minted, CredentialError>> + '_
    {
        move |now| {
            let n = count.fetch_add(1, Ordering::SeqCst);
            let exp = now + chrono::Duration::seconds(lifetime);
            std::future::ready(Minted::new(Secret::new(format!("tok-{n}")), now, exp))
        }
    }

    fn failing(_: DateTime<Utc>) -> std::future::Ready<Result<Minted, CredentialError>> {
        std::future::ready(Err(CredentialError::Status(500)))
    }

    #[tokio::test]
    async fn many_calls_one_mint_then_refresh_60s_before_expiry() {
        let (clock, cache) = setup();
        let n = AtomicUsize::new(0);
        for _ in 0..5 {
            cache.get(minter(&n, 3600)).await.unwrap();
        }
        assert_eq!(n.load(Ordering::SeqCst), 1);
        clock.advance(3600 - 61);
        cache.get(minter(&n, 3600)).await.unwrap();
        assert_eq!(
            n.load(Ordering::SeqCst),
            1,
            "still before the refresh point"
        );
        clock.advance(2);
        let m = cache.get(minter(&n, 3600)).await.unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 2, "refreshed 60 s before expiry");
        assert_eq!(m.token.expose(), b"tok-1");
    }

    #[tokio::test]
    async fn short_lived_credentials_refresh_at_90_percent() {
        let (clock, cache) = setup();
        let n = AtomicUsize::new(0);
        let m = cache.get(minter(&n, 100)).await.unwrap();
        assert_eq!(m.refresh_at - m.issued_at, chrono::Duration::seconds(90));
        clock.advance(89);
        cache.get(minter(&n, 100)).await.unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 1);
        clock.advance(1);
        cache.get(minter(&n, 100)).await.unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn failed_refresh_serves_the_unexpired_credential_but_never_an_expired_one() {
        let (clock, cache) = setup();
        let n = AtomicUsize::new(0);
        cache.get(minter(&n, 300)).await.unwrap();
        clock.advance(280); // past the refresh point (270 s), before expiry
        let m = cache.get(failing).await.unwrap();
        assert_eq!(m.token.expose(), b"tok-0");
        clock.advance(20); // exactly at expiry
        assert!(matches!(
            cache.get(failing).await,
            Err(CredentialError::Status(500))
        ));
    }

    #[tokio::test]
    async fn invalidate_drops_only_the_credential_that_was_refused() {
        let (_clock, cache) = setup();
        let n = AtomicUsize::new(0);
        let first = cache.get(minter(&n, 3600)).await.unwrap();
        cache.invalidate(&first);
        let second = cache.get(minter(&n, 3600)).await.unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 2);
        cache.invalidate(&first); // a late 401 for the old one
        let again = cache.get(minter(&n, 3600)).await.unwrap();
        assert!(Arc::ptr_eq(&second, &again));
        assert_eq!(n.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_mint_and_its_failure() {
        let (_clock, cache) = setup();
        let cache = Arc::new(cache);
        let n = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (cache, n, gate) = (Arc::clone(&cache), Arc::clone(&n), Arc::clone(&gate));
            tasks.push(tokio::spawn(async move {
                cache
                    .get(|_| async move {
                        n.fetch_add(1, Ordering::SeqCst);
                        gate.notified().await;
                        Err(CredentialError::Timeout(Duration::from_secs(10)))
                    })
                    .await
            }));
        }
        // Let every task queue on the lock, then release the one mint.
        while n.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        for t in tasks {
            assert!(t.await.unwrap().is_err());
        }
        assert_eq!(
            n.load(Ordering::SeqCst),
            1,
            "waiters reused the failed attempt"
        );
    }
}
