//! The `redis` state backend (DESIGN §7): revocations, disabled connectors, `max_uses`
//! counters and rate limits shared by every replica, so a token revoked on one replica is
//! refused by all, a single-use token is used once across all of them, and a rate limit is
//! one budget.
//!
//! Every decision is made *in* Redis by a Lua script, atomically, on Redis's clock: a proxy
//! call's checks 2 to 5 (revocation, kill switch, `max_uses`, rate limits) cost one round trip
//! ([`RedisState::admit`]). Rate limits are GCRA (the algorithm governor uses in memory),
//! with the theoretical arrival time kept per key in microseconds.
//!
//! Failure is closed: when Redis does not answer within [`STATE_TIMEOUT`], the call is refused
//! (503 `state_unavailable`), never let through on local knowledge.
//!
//! Keys (all under `credbroker:`): `revoked:jti:<jti>` (expires an hour after the token),
//! `revoked:clients` (hash: client → the second up to which its tokens are revoked),
//! `disabled` (set of connectors), `uses:<jti>` (counter, expires with the revocation entry),
//! `rate:client:<id>`, `rate:connector:<name>`, `rate:issue:<id>` (GCRA times).

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, IntoConnectionInfo, Script};

use super::{Change, StateError};
use crate::config::RateLimit;
use crate::secret::Secret;

/// The longest a call waits for Redis (connecting included) before it is refused.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(1);

const PREFIX: &str = "credbroker:";
const REVOKED_CLIENTS: &str = "credbroker:revoked:clients";
const DISABLED: &str = "credbroker:disabled";
/// A revoked `jti` and a `max_uses` counter are kept this long past the token's `exp`: longer
/// than any clock-skew leeway, so neither goes while its token could still pass.
const KEEP_PAST_EXP_SECS: i64 = 3600;

/// Shared by the scripts: `gcra(key, per_second, burst, now_us)` takes one cell and returns 0,
/// or returns the microseconds until one is free (taking nothing).
const GCRA: &str = r"
local function gcra(key, per_second, burst, now)
  per_second = tonumber(per_second)
  burst = tonumber(burst)
  if per_second <= 0 then return 0 end
  local interval = 1000000 / per_second
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local wait = tat - now - interval * (burst - 1)
  if wait > 0 then return wait end
  local next_tat = tat + interval
  redis.call('SET', key, string.format('%.0f', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1000)
  return 0
end
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
";

/// Checks 2 to 5 of one proxy call, in DESIGN §4.3's order. Returns `{verdict, wait_us}`.
/// KEYS: revoked jti, revoked clients, disabled set, uses counter, client rate, connector rate.
/// ARGV: client, iat, connector ('' when unknown), '1' when the call passed check 3 locally,
/// max_uses (0: none), unix second the counter may go, client per_second/burst, connector
/// per_second/burst (0: no limit).
const ADMIT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return {'revoked', 0} end
local cut = redis.call('HGET', KEYS[2], ARGV[1])
if cut and tonumber(ARGV[2]) <= tonumber(cut) then return {'revoked', 0} end
if ARGV[3] ~= '' and redis.call('SISMEMBER', KEYS[3], ARGV[3]) == 1 then return {'disabled', 0} end
if ARGV[4] ~= '1' then return {'not_authorized', 0} end
local max = tonumber(ARGV[5])
if max > 0 then
  local used = redis.call('INCR', KEYS[4])
  if used == 1 then redis.call('EXPIREAT', KEYS[4], ARGV[6]) end
  if used > max then return {'uses_spent', 0} end
end
local now = now_us()
local wait = gcra(KEYS[5], ARGV[7], ARGV[8], now)
if wait > 0 then return {'client_limited', wait} end
wait = gcra(KEYS[6], ARGV[9], ARGV[10], now)
if wait > 0 then return {'connector_limited', wait} end
return {'ok', 0}
";

/// One GCRA take. KEYS: the limit's key. ARGV: per_second, burst. Returns the wait in µs.
const TAKE: &str = "return gcra(KEYS[1], ARGV[1], ARGV[2], now_us())";

/// A client revocation only ever moves forward (replicas' clocks differ by a little).
const REVOKE_CLIENT: &str = r"
local at = redis.call('HGET', KEYS[1], ARGV[1])
if not at or tonumber(at) < tonumber(ARGV[2]) then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
";

/// Whether a URL (the resolved `state.url`) can be used; the reason never quotes it.
pub fn check_url(url: &[u8]) -> Result<(), &'static str> {
    let text = std::str::from_utf8(url).map_err(|_| "not a valid redis:// URL")?;
    if !text.starts_with("redis://") {
        return Err("must be a redis:// URL (TLS to Redis, rediss://, is not in this build)");
    }
    text.into_connection_info()
        .map(|_| ())
        .map_err(|_| "not a valid redis:// URL")
}

/// Whether the URL names a loopback host (a plain connection elsewhere crosses the network
/// unencrypted), and whether it carries a password (which belongs in `env:`/`file:`).
pub fn url_facts(url: &[u8]) -> Option<(bool, bool)> {
    let info = std::str::from_utf8(url).ok()?.into_connection_info().ok()?;
    let loopback = match info.addr() {
        redis::ConnectionAddr::Tcp(host, _) => {
            crate::config::is_loopback_host(host.trim_start_matches('[').trim_end_matches(']'))
        }
        _ => false,
    };
    Some((loopback, info.redis_settings().password().is_some()))
}

/// What Redis decided about one proxy call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Every shared check passed: a use was counted and the rate-limit cells taken.
    Admitted,
    /// The token's `jti` or its client was revoked.
    Revoked,
    /// The connector is switched off.
    Disabled,
    /// The call failed check 3 locally (and was neither revoked nor disabled): nothing spent.
    NotAuthorized,
    /// A `max_uses` token has no use left.
    UsesSpent,
    /// The client's rate limit is exhausted; whole seconds to wait.
    ClientLimited(u64),
    /// The connector's rate limit is exhausted; whole seconds to wait.
    ConnectorLimited(u64),
}

/// What [`RedisState::admit`] needs to know about a call.
pub struct AdmitRequest<'a> {
    pub jti: &'a str,
    pub client: &'a str,
    pub iat: i64,
    pub exp: i64,
    /// The connector, when it is configured (else the kill switch is not asked).
    pub connector: Option<&'a str>,
    /// Whether the call passed the local part of check 3 (operation, scope, grant).
    pub authorized: bool,
    pub max_uses: Option<u64>,
    pub client_limit: Option<RateLimit>,
    pub connector_limit: Option<RateLimit>,
}

/// The connection to Redis (multiplexed, reconnecting) and the scripts.
pub struct RedisState {
    conn: ConnectionManager,
    /// When Redis last answered (ms since the Unix epoch; 0: never), for `/readyz`.
    last_answer_ms: AtomicU64,
    admit: Script,
    take: Script,
    revoke_client: Script,
}

/// The connection holds the URL, which may hold a password: nothing of it is printed.
impl fmt::Debug for RedisState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RedisState")
    }
}

impl RedisState {
    /// Prepares the connection; it is made on first use and remade after a failure. Must be
    /// called within a tokio runtime.
    pub fn open(url: &Secret) -> Result<Self, StateError> {
        let bad = || StateError::Unavailable("state.url is not a valid redis:// URL".into());
        let text = std::str::from_utf8(url.expose()).map_err(|_| bad())?;
        let client = redis::Client::open(text).map_err(|_| bad())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(STATE_TIMEOUT))
            .set_response_timeout(Some(STATE_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn =
            ConnectionManager::new_lazy_with_config(client, config).map_err(|e| unavailable(&e))?;
        Ok(Self {
            conn,
            last_answer_ms: AtomicU64::new(0),
            admit: Script::new(&format!("{GCRA}{ADMIT}")),
            take: Script::new(&format!("{GCRA}{TAKE}")),
            revoke_client: Script::new(REVOKE_CLIENT),
        })
    }

    /// Whether Redis answers: at once if it answered within the last second, else a `PING`.
    /// (`/readyz`: every call is refused while it does not, so a load balancer should route
    /// around this replica.)
    pub async fn reachable(&self) -> Result<(), StateError> {
        if now_ms().saturating_sub(self.last_answer_ms.load(Ordering::Relaxed)) < 1000 {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let ping = redis::cmd("PING");
        self.bounded(ping.query_async::<()>(&mut conn)).await
    }

    /// Awaits a Redis operation for at most [`STATE_TIMEOUT`] (a reconnect included).
    async fn bounded<T>(
        &self,
        op: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StateError> {
        let result = match tokio::time::timeout(STATE_TIMEOUT, op).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(unavailable(&e)),
            Err(_) => Err(StateError::Unavailable(
                "Redis did not answer in time".into(),
            )),
        };
        if result.is_ok() {
            self.last_answer_ms.store(now_ms(), Ordering::Relaxed);
        }
        result
    }

    /// Checks 2 (revocation), 3 (kill switch), 4 (`max_uses`) and 5 (rate limits) of a proxy
    /// call in one atomic script.
    pub async fn admit(&self, call: &AdmitRequest<'_>) -> Result<Admission, StateError> {
        let (client_rate, client_burst) = quota(call.client_limit);
        let (connector_rate, connector_burst) = quota(call.connector_limit);
        let mut invocation = self.admit.prepare_invoke();
        invocation
            .key(format!("{PREFIX}revoked:jti:{}", call.jti))
            .key(REVOKED_CLIENTS)
            .key(DISABLED)
            .key(format!("{PREFIX}uses:{}", call.jti))
            .key(format!("{PREFIX}rate:client:{}", call.client))
            .key(format!(
                "{PREFIX}rate:connector:{}",
                call.connector.unwrap_or("")
            ))
            .arg(call.client)
            .arg(call.iat)
            .arg(call.connector.unwrap_or(""))
            .arg(if call.authorized { "1" } else { "0" })
            .arg(call.max_uses.unwrap_or(0))
            .arg(call.exp.saturating_add(KEEP_PAST_EXP_SECS))
            .arg(client_rate)
            .arg(client_burst)
            .arg(connector_rate)
            .arg(connector_burst);
        let mut conn = self.conn.clone();
        let (verdict, wait_us): (String, f64) =
            self.bounded(invocation.invoke_async(&mut conn)).await?;
        Ok(match verdict.as_str() {
            "ok" => Admission::Admitted,
            "revoked" => Admission::Revoked,
            "disabled" => Admission::Disabled,
            "not_authorized" => Admission::NotAuthorized,
            "uses_spent" => Admission::UsesSpent,
            "client_limited" => Admission::ClientLimited(whole_seconds(wait_us)),
            "connector_limited" => Admission::ConnectorLimited(whole_seconds(wait_us)),
            other => {
                return Err(StateError::Unavailable(format!(
                    "unexpected answer from the admit script: {other}"
                )))
            }
        })
    }

    /// Takes one cell of the token endpoint's per-client limit; on refusal, the seconds to
    /// wait.
    pub async fn take_issue_cell(
        &self,
        client: &str,
        limit: RateLimit,
    ) -> Result<Result<(), u64>, StateError> {
        let (rate, burst) = quota(Some(limit));
        let mut conn = self.conn.clone();
        let mut invocation = self.take.prepare_invoke();
        invocation
            .key(format!("{PREFIX}rate:issue:{client}"))
            .arg(rate)
            .arg(burst);
        let wait_us: f64 = self.bounded(invocation.invoke_async(&mut conn)).await?;
        Ok(if wait_us > 0.0 {
            Err(whole_seconds(wait_us))
        } else {
            Ok(())
        })
    }

    pub async fn disabled_connectors(&self) -> Result<HashSet<String>, StateError> {
        let mut conn = self.conn.clone();
        self.bounded(conn.smembers(DISABLED)).await
    }

    pub async fn is_disabled(&self, connector: &str) -> Result<bool, StateError> {
        let mut conn = self.conn.clone();
        self.bounded(conn.sismember(DISABLED, connector)).await
    }

    /// Applies an admin change; an error means it was not applied.
    pub async fn apply(&self, change: &Change) -> Result<(), StateError> {
        let mut conn = self.conn.clone();
        match change {
            Change::RevokeJti { jti, exp } => {
                let until = exp.saturating_add(KEEP_PAST_EXP_SECS);
                let key = format!("{PREFIX}revoked:jti:{jti}");
                // SET … EXAT: one command, so the entry never exists without its expiry.
                let mut cmd = redis::cmd("SET");
                cmd.arg(&key).arg(1).arg("EXAT").arg(until);
                self.bounded(cmd.query_async::<()>(&mut conn)).await
            }
            Change::RevokeClient { client, at } => {
                let mut invocation = self.revoke_client.prepare_invoke();
                invocation.key(REVOKED_CLIENTS).arg(client).arg(*at);
                self.bounded(invocation.invoke_async::<i64>(&mut conn))
                    .await
                    .map(|_| ())
            }
            Change::SetDisabled {
                connector,
                disabled: true,
            } => self
                .bounded(conn.sadd::<_, _, i64>(DISABLED, connector))
                .await
                .map(|_| ()),
            Change::SetDisabled {
                connector,
                disabled: false,
            } => self
                .bounded(conn.srem::<_, _, i64>(DISABLED, connector))
                .await
                .map(|_| ()),
        }
    }
}

/// A limit as the scripts take it: `(per_second, burst)`, `(0, 0)` for none.
fn quota(limit: Option<RateLimit>) -> (u32, u32) {
    limit.map_or((0, 0), |l| (l.per_second, l.burst.max(1)))
}

/// Whole seconds to wait, at least 1 (a `Retry-After` of 0 invites an immediate retry).
fn whole_seconds(wait_us: f64) -> u64 {
    ((wait_us / 1_000_000.0).ceil() as u64).max(1)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A Redis error as a message that cannot carry the URL or its password: only its kind.
fn unavailable(e: &redis::RedisError) -> StateError {
    let what = if e.is_timeout() {
        "Redis did not answer in time".to_owned()
    } else if e.is_connection_refusal() {
        "Redis refused the connection".to_owned()
    } else if e.is_io_error() || e.is_connection_dropped() {
        "the connection to Redis failed".to_owned()
    } else {
        format!("Redis answered with an error ({:?})", e.kind())
    };
    StateError::Unavailable(what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_without_quoting_them() {
        assert!(check_url(b"redis://127.0.0.1:6379/0").is_ok());
        assert!(check_url(b"redis://:hunter2@10.0.0.5").is_ok());
        for bad in [
            &b"rediss://10.0.0.5"[..],
            b"http://x",
            b"redis://[::1",
            b"\xff",
        ] {
            let why = check_url(bad).unwrap_err();
            assert!(!why.contains("10.0.0.5") && !why.contains("::1"), "{why}");
        }
    }

    #[test]
    fn url_facts_tell_loopback_and_password() {
        assert_eq!(url_facts(b"redis://127.0.0.1:6379"), Some((true, false)));
        assert_eq!(url_facts(b"redis://localhost"), Some((true, false)));
        assert_eq!(url_facts(b"redis://:pw@10.0.0.5"), Some((false, true)));
    }

    #[test]
    fn waits_round_up_to_whole_seconds() {
        assert_eq!(whole_seconds(1.0), 1);
        assert_eq!(whole_seconds(1_000_000.0), 1);
        assert_eq!(whole_seconds(1_000_001.0), 2);
    }
}
