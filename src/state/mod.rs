//! Where revocations, disabled connectors, `max_uses` counters and rate limits live
//! (DESIGN §3.5, §7): in this process (`memory`, the default; revocations and disabled
//! connectors also in `state.dir`), or in a Redis server shared by every replica (`redis`).
//!
//! The `memory` backend is read synchronously on the hot path; the counters and rate limiters
//! of that backend live in [`crate::broker::Broker`] and [`crate::broker::Live`]. The `redis`
//! backend answers all of a proxy call's shared checks in one round trip
//! ([`redis::RedisState::admit`]).

pub mod local;
pub mod redis;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

pub use local::Revocations;
pub use redis::RedisState;

/// A revoked `jti` and a `max_uses` counter are kept this long past the token's `exp`: longer
/// than any clock-skew leeway (`tokens.leeway`, at most 5 minutes), so neither goes while its
/// token could still pass check 2.
pub const KEEP_PAST_EXP_SECS: i64 = 3600;

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// Reading or writing the state file failed.
    #[error("state file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The state file is not valid JSON of the expected shape.
    #[error("state file {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// The shared state (Redis) could not be reached or refused: nothing was changed there.
    #[error("shared state unavailable: {0}")]
    Unavailable(String),
    /// The shared state did not answer in time: a change may still be made (changes are
    /// idempotent: retry).
    #[error("shared state did not confirm in time: {0}")]
    Unconfirmed(String),
    /// The shared state could not take a revocation or kill switch now: it is kept in this
    /// replica's journal, in force here (no call is decided until it is made), and made in
    /// Redis as soon as it takes it ([`redis::Deferred`]).
    #[error("shared state could not take it now ({0}): kept by this replica and made there as soon as it can")]
    Deferred(String),
}

impl StateError {
    /// Whether the change it reports was made all the same: a state-file error leaves it in
    /// force in memory (not persisted); unreachable shared state means it was not made.
    pub fn applied(&self) -> bool {
        !matches!(
            self,
            Self::Unavailable(_) | Self::Unconfirmed(_) | Self::Deferred(_)
        )
    }

    /// The same cause, for a change that was kept to be made later instead.
    pub fn deferred(&self) -> Self {
        match self {
            Self::Unavailable(m) | Self::Unconfirmed(m) | Self::Deferred(m) => {
                Self::Deferred(m.clone())
            }
            other => Self::Deferred(other.to_string()),
        }
    }
}

/// Whether `serve` could read the state in `config.dir`, found without writing anything
/// (`credbroker check`): the folder is a folder (or can be created), the `memory` backend's
/// file parses, and under `redis` every replica's journal there can be read.
pub fn check_readable(config: &crate::config::StateConfig) -> Result<(), StateError> {
    let dir = &config.dir;
    let not_a_folder = |path: &std::path::Path| StateError::Io {
        path: dir.clone(),
        source: std::io::Error::other(format!("{} is not a folder", path.display())),
    };
    if let Some(existing) = dir.ancestors().find(|a| a.exists()) {
        if !existing.is_dir() {
            return Err(not_a_folder(existing));
        }
    }
    Revocations::load(dir)?;
    if matches!(config.backend, crate::config::StateBackend::Redis { .. }) {
        redis::check_journals(dir)?;
    }
    Ok(())
}

/// The backend in force for this process (chosen at start; a reload cannot change it).
#[derive(Debug)]
pub enum StateStore {
    Memory(Revocations),
    Redis(Box<RedisState>),
}

impl StateStore {
    /// Opens the configured backend. Redis is connected lazily: a broker whose Redis is down
    /// starts, and refuses calls (503) until it answers.
    /// `skew_secs`: the clock skew allowed between replicas (`tokens.leeway`).
    pub fn open(config: &crate::config::StateConfig, skew_secs: i64) -> Result<Self, StateError> {
        match &config.backend {
            crate::config::StateBackend::Memory => {
                Ok(Self::Memory(Revocations::load(&config.dir)?))
            }
            crate::config::StateBackend::Redis { url, .. } => {
                let redis =
                    RedisState::open(url, &config.dir, config.replica.as_deref(), skew_secs)?;
                Ok(Self::Redis(Box::new(redis)))
            }
        }
    }

    /// Whether the state can be used now (the memory backend always can).
    pub async fn reachable(&self) -> Result<(), StateError> {
        match self {
            Self::Memory(_) => Ok(()),
            Self::Redis(r) => r.reachable().await,
        }
    }

    /// Whether the state answers now (no cached answer): an enable asks before it is audited.
    pub async fn ping(&self) -> Result<(), StateError> {
        match self {
            Self::Memory(_) => Ok(()),
            Self::Redis(r) => r.ping().await,
        }
    }

    /// The connectors switched off by the kill switch.
    pub async fn disabled_connectors(&self) -> Result<HashSet<String>, StateError> {
        match self {
            Self::Memory(r) => Ok(r.disabled_connectors().into_iter().collect()),
            Self::Redis(r) => r.disabled_connectors().await,
        }
    }

    pub async fn is_disabled(&self, connector: &str) -> Result<bool, StateError> {
        match self {
            Self::Memory(r) => Ok(r.is_disabled(connector)),
            Self::Redis(r) => r.is_disabled(connector).await,
        }
    }

    /// Applies an admin change. On `memory` it is in force at once and then written to the
    /// state file on a blocking thread (it ends in an `fsync`; the async worker also serves
    /// proxy calls), waited for at most [`PERSIST_WAIT`]: an error means "in force, not
    /// persisted" — also when the disk does not answer, so that an admin change held by a
    /// hung write (and the admin lock with it) never keeps a later kill switch waiting. On
    /// `redis` an error means it was not applied.
    pub async fn apply(self: &Arc<Self>, change: Change) -> Result<(), StateError> {
        match &**self {
            Self::Memory(r) => {
                r.apply_in_memory(&change);
                let this = Arc::clone(self);
                let write = tokio::task::spawn_blocking(move || match &*this {
                    Self::Memory(r) => r.persist(),
                    Self::Redis(_) => unreachable!("matched Memory above"),
                });
                let not_written = |why: String| StateError::Io {
                    path: PathBuf::from("state"),
                    source: std::io::Error::other(why),
                };
                match tokio::time::timeout(PERSIST_WAIT, write).await {
                    Ok(Ok(written)) => written,
                    Ok(Err(e)) => Err(not_written(e.to_string())),
                    Err(_) => Err(not_written(format!(
                        "the state file was not written within {} s (the write goes on)",
                        PERSIST_WAIT.as_secs()
                    ))),
                }
            }
            Self::Redis(r) => r.apply(&change).await,
        }
    }

    /// Whether a change the state could not take can be kept to be made later (`redis`; the
    /// `memory` backend takes every change at once).
    pub fn defers(&self) -> bool {
        matches!(self, Self::Redis(_))
    }

    /// Keeps a tightening change Redis could not take ([`RedisState::defer`]); returns whether
    /// it was written to the journal (`false` on the `memory` backend, which never defers).
    pub async fn defer(&self, deferred: redis::Deferred) -> bool {
        match self {
            Self::Memory(_) => false,
            Self::Redis(r) => r.defer(deferred).await,
        }
    }

    /// Makes the changes deferred while Redis could not take them, if any: a change whose
    /// audit record is written before it is made (an enable) must come after them, in the log
    /// as in Redis.
    pub async fn replay_deferred(&self) -> Result<(), StateError> {
        match self {
            Self::Memory(_) => Ok(()),
            Self::Redis(r) => r.replay_deferred().await,
        }
    }

    /// How many revocations and kill switches wait for Redis ([`RedisState::defer`]).
    pub fn deferred_count(&self) -> usize {
        match self {
            Self::Memory(_) => 0,
            Self::Redis(r) => r.deferred_count(),
        }
    }

    /// Puts back made changes whose audit records could not be written, ahead of any since.
    pub fn return_replayed(&self, unrecorded: Vec<redis::Deferred>) {
        if let Self::Redis(r) = self {
            r.return_replayed(unrecorded);
        }
    }

    /// The deferred changes made in Redis since the last call, for their audit records.
    pub fn take_replayed(&self) -> Vec<redis::Deferred> {
        match self {
            Self::Memory(_) => Vec::new(),
            Self::Redis(r) => r.take_replayed(),
        }
    }
}

/// The longest an admin change waits for the state file to be written (`memory` backend).
#[cfg(not(test))]
pub const PERSIST_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
#[cfg(test)]
pub const PERSIST_WAIT: std::time::Duration = std::time::Duration::from_millis(300);

/// An admin change of the revocation state (kept as JSON in a shared-state journal while it
/// waits for Redis: see [`redis::Deferred`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// Revoke one token, kept until its `exp` (Unix seconds) is well past.
    RevokeJti { jti: String, exp: i64 },
    /// Revoke every token of a client issued at or before the second `at`.
    RevokeClient { client: String, at: i64 },
    /// The kill switch: `true` disables the connector, `false` enables it again.
    SetDisabled { connector: String, disabled: bool },
}

impl Change {
    /// Whether it only takes away (a revocation, a kill switch): such a change may wait for
    /// Redis (kept, and enforced on this replica meanwhile); an enable may not.
    pub fn tightens(&self) -> bool {
        !matches!(
            self,
            Self::SetDisabled {
                disabled: false,
                ..
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_state_file_write_that_hangs_holds_no_change_back() {
        let dir = tempfile::tempdir().unwrap();
        let revocations = Revocations::load(dir.path()).unwrap();
        let state = Arc::new(StateStore::Memory(revocations));
        let StateStore::Memory(r) = &*state else {
            unreachable!()
        };
        r.stall_writes
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let started = std::time::Instant::now();
        let revoke = Change::RevokeClient {
            client: "bot".into(),
            at: 1_000,
        };
        let first = state.apply(revoke).await;
        assert!(first.as_ref().is_err_and(StateError::applied), "{first:?}");
        // The next change (a kill switch) is in force at once, though its write queues behind.
        let kill = Change::SetDisabled {
            connector: "github".into(),
            disabled: true,
        };
        assert!(state.apply(kill).await.is_err());
        assert!(
            started.elapsed() < PERSIST_WAIT * 4,
            "{:?}",
            started.elapsed()
        );
        assert!(r.is_disabled("github") && r.is_revoked("j", "bot", 1_000));
        // Once the disk answers, the file holds both.
        r.stall_writes
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let again = Revocations::load(dir.path()).unwrap();
            if again.is_disabled("github") && again.is_revoked("j", "bot", 1_000) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never written");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}
