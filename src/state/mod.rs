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
}

impl StateError {
    /// Whether the change it reports was made all the same: a state-file error leaves it in
    /// force in memory (not persisted); unreachable shared state means it was not made.
    pub fn applied(&self) -> bool {
        !matches!(self, Self::Unavailable(_) | Self::Unconfirmed(_))
    }
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
    /// proxy calls): an error means "in force, not persisted". On `redis` an error means it
    /// was not applied.
    pub async fn apply(self: &Arc<Self>, change: Change) -> Result<(), StateError> {
        match &**self {
            Self::Memory(_) => {
                let this = Arc::clone(self);
                tokio::task::spawn_blocking(move || match &*this {
                    Self::Memory(r) => change.apply_to(r),
                    Self::Redis(_) => unreachable!("matched Memory above"),
                })
                .await
                .unwrap_or_else(|e| {
                    Err(StateError::Io {
                        path: PathBuf::from("state"),
                        source: std::io::Error::other(e.to_string()),
                    })
                })
            }
            Self::Redis(r) => r.apply(&change).await,
        }
    }
}

/// An admin change of the revocation state.
#[derive(Clone, Debug)]
pub enum Change {
    /// Revoke one token, kept until its `exp` (Unix seconds) is well past.
    RevokeJti { jti: String, exp: i64 },
    /// Revoke every token of a client issued at or before the second `at`.
    RevokeClient { client: String, at: i64 },
    /// The kill switch: `true` disables the connector, `false` enables it again.
    SetDisabled { connector: String, disabled: bool },
}

impl Change {
    fn apply_to(&self, r: &Revocations) -> Result<(), StateError> {
        match self {
            Self::RevokeJti { jti, exp } => r.revoke_jti(jti, *exp, chrono::Utc::now().timestamp()),
            Self::RevokeClient { client, at } => r.revoke_client(client, *at),
            Self::SetDisabled {
                connector,
                disabled,
            } => r.set_disabled(connector, *disabled),
        }
    }
}
