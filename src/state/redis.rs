//! The `redis` state backend (DESIGN §7): revocations, disabled connectors, `max_uses`
//! counters and rate limits shared by every replica, so a token revoked on one replica is
//! refused by all, a single-use token is used once across all of them, and a rate limit is
//! one budget.
//!
//! Every decision is made *in* Redis by a Lua script, atomically, on Redis's clock: a proxy
//! call's checks 2 to 5 (revocation, kill switch, `max_uses`, rate limits) cost one round trip
//! ([`RedisState::admit`]). Rate limits are GCRA (the algorithm governor uses in memory), with
//! the theoretical arrival time kept per key in microseconds, on Redis's clock. Tokens carry
//! their issuing replica's clock (`iat`), so the cut-off of a client revocation reaches the
//! allowed clock skew (`tokens.leeway`, at most 5 s) past the revoking replica's clock.
//!
//! Failure is closed: when Redis does not answer within [`STATE_TIMEOUT`], the call is refused
//! (503 `state_unavailable`), never let through on local knowledge.
//!
//! Redis losing data (a restart without persistence, a flush, a restore of an older snapshot,
//! a failover to a replica that lagged, eviction) must not undo revocations. The state carries
//! an *epoch* (`<id>:<cut-off second>`) and a change counter (`generation`, raised by every
//! revocation, kill switch and spent use); every script checks both before it decides or
//! changes anything, and each replica remembers the epoch and the highest counter it saw (in
//! memory and in its journal in `state.dir`). A replica that finds another epoch, or a lower
//! counter, starts or adopts a new epoch, whose cut-off refuses every token issued up to it
//! (their revocations and use counters may be gone; tokens are short-lived and clients fetch
//! new ones), and every replica seeds Redis again from its journal — the revocations it made
//! and the kill switches in force — where a newer change always wins (a later revocation
//! cut-off; for kill switches, see [`switch_replaces`]). A Redis that may evict keys is not
//! trusted at all ([`RedisState::watch`]), nor is one that refuses writes (a read-only replica
//! after a failover, out of memory): a revocation could not be made there.
//!
//! Keys (all under `credbroker:`): `epoch`; `revoked:jti:<jti>` (expires when its token can no
//! longer pass); `revoked:clients` (hash: client → the second up to which its tokens are
//! revoked); `revoked:before` (every token issued up to this second, set by a new epoch);
//! `generation`;
//! `switches` (hash: connector → `<1 disabled | 0 enabled>:<generation>:<epoch made in>`);
//! `uses:<jti>`;
//! `rate:client:<id>`, `rate:connector:<name>`, `rate:issue:<id>` (GCRA times);
//! `write-probe` (written each watch round, expires by itself).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, RedisError, Script};
use serde::{Deserialize, Serialize};

mod scripts;

use super::local::Entries;
use super::{Change, Revocations, StateError};
use crate::config::RateLimit;
use crate::secret::Secret;
use crate::state::KEEP_PAST_EXP_SECS;
use scripts::{
    ADMIT, COMMON, ISSUE, RESYNC, REVOKE_CLIENT, REVOKE_JTI, SEED, SWITCH, SWITCH_ORDER,
};

/// The longest a call waits for Redis (connecting included) before it is refused.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often each replica looks at the shared state without being asked (see
/// [`RedisState::watch`]).
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

const PREFIX: &str = "credbroker:";
/// Why a decision waits: changes asked for while Redis could not take them come first.
const DEFERRED_WAITING: &str =
    "revocations or kill switches asked for while Redis could not take them are not made there yet";
const EPOCH: &str = "credbroker:epoch";
const REVOKED_CLIENTS: &str = "credbroker:revoked:clients";
const REVOKED_BEFORE: &str = "credbroker:revoked:before";
const SWITCHES: &str = "credbroker:switches";
/// Counts changes that must not be lost (revocations, kill switches, spent uses): a replica
/// that finds it lower than it saw knows Redis went back to older data.
const GENERATION: &str = "credbroker:generation";

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
    /// The token's `jti` or its client was revoked (or it predates lost state).
    Revoked,
    /// The connector is switched off.
    Disabled,
    /// The call failed check 2 or 3 locally (and was neither revoked nor disabled): nothing
    /// spent.
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
    /// The connector whose kill switch to ask (`None`: unknown, or the call already failed
    /// check 2 locally).
    pub connector: Option<&'a str>,
    /// Whether the call passed the local parts of checks 2 and 3.
    pub authorized: bool,
    pub max_uses: Option<u64>,
    pub client_limit: Option<RateLimit>,
    pub connector_limit: Option<RateLimit>,
}

/// What the token endpoint learns from Redis in one round trip.
pub struct IssueContext {
    /// The latest second up to which tokens of this client are refused (a client revocation
    /// or a lost state's cut-off): a token issued before it passes would not work.
    pub cut_off: i64,
    /// The connectors switched off.
    pub disabled: HashSet<String>,
    /// `Err(seconds)` when `tokens.issue_rate_limit` refuses this client now.
    pub rate: Result<(), u64>,
}

/// What a replica changed itself, kept in `state.dir` to seed Redis again after it lost its
/// data (see the module docs). Times are Redis's.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Journal {
    /// Revoked token ids and the second their entry may go.
    jtis: HashMap<String, i64>,
    /// Per client: every token with `iat` up to this second is revoked.
    clients: HashMap<String, i64>,
    /// Kill switches in force, as this replica last knew them.
    switches: HashMap<String, SwitchEntry>,
    /// The epoch this replica last saw.
    #[serde(default)]
    epoch: String,
    /// The highest generation this replica saw (see [`GENERATION`]).
    #[serde(default)]
    generation: u64,
    /// Revocations and kill switches asked for while Redis could not take them, oldest first:
    /// not in Redis yet ([`RedisState::replay_deferred`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    deferred: Vec<Deferred>,
    /// The request ids of deferred changes this replica made that another journal in the
    /// folder still holds (a replica that is gone never rewrites its journal): not taken in
    /// and made again at the next start, which would switch a connector off again after an
    /// enable. Kept while some other journal holds them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    made: Vec<String>,
}

/// A revocation or kill switch asked for while Redis did not answer or could not take it.
/// Rather than being lost (the operator told to retry, and the connector serving again once
/// Redis is back), it is kept in this replica's journal and made in Redis, in the order asked,
/// as soon as Redis takes it; until then this replica decides nothing (every call and token
/// request waits for it to be made, and is refused while Redis does not answer anyway).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deferred {
    pub change: Change,
    /// The admin request that asked for it, and who asked: its audit records carry both.
    pub request_id: String,
    pub actor: String,
}

/// One connector's kill switch: on or off, the generation the change raised, and the epoch it
/// was made in (empty: unknown, e.g. taken in from the `memory` backend). Kept in the journal
/// as `[disabled, generation, epoch]` (journals written before the epoch was kept have
/// `[disabled, generation]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "SwitchRepr", into = "SwitchRepr")]
struct SwitchEntry {
    disabled: bool,
    generation: i64,
    epoch: String,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum SwitchRepr {
    Tagged(bool, i64, String),
    Untagged(bool, i64),
}

impl From<SwitchRepr> for SwitchEntry {
    fn from(r: SwitchRepr) -> Self {
        let (disabled, generation, epoch) = match r {
            SwitchRepr::Tagged(d, g, e) => (d, g, e),
            SwitchRepr::Untagged(d, g) => (d, g, String::new()),
        };
        Self {
            disabled,
            generation,
            epoch,
        }
    }
}

impl From<SwitchEntry> for SwitchRepr {
    fn from(e: SwitchEntry) -> Self {
        SwitchRepr::Tagged(e.disabled, e.generation, e.epoch)
    }
}

impl SwitchEntry {
    /// Reads Redis's `<1|0>:<generation>[:<epoch>]`.
    fn parse(value: &str) -> Option<Self> {
        let (flag, rest) = value.split_once(':')?;
        let (generation, epoch) = rest.split_once(':').unwrap_or((rest, ""));
        Some(Self {
            disabled: flag == "1",
            generation: generation.parse().ok()?,
            epoch: epoch.to_owned(),
        })
    }
}

/// Whether kill-switch entry `a` replaces `b` while `current` is the epoch in force: the same
/// order as the seed script's (`scripts::SWITCH_ORDER`, where the reasons are). A change of the
/// current epoch beats one made before it; two of the current epoch go by generation; of two
/// made before the last loss, a switch-off wins (their order may be lost), else the generation.
fn switch_replaces(a: &SwitchEntry, b: &SwitchEntry, current: &str) -> bool {
    let (a_now, b_now) = (a.epoch == current, b.epoch == current);
    if a_now != b_now {
        return a_now;
    }
    if !a_now && a.disabled != b.disabled {
        return a.disabled;
    }
    a.generation > b.generation
}

/// The connection to Redis (multiplexed, reconnecting) and the scripts.
pub struct RedisState {
    /// The clock skew allowed between replicas, in seconds (`tokens.leeway` at start).
    skew_secs: i64,
    client: redis::Client,
    /// Replaced after an error a reconnect does not mend (a wrong password fixed in Redis, a
    /// stuck connection), at most once a second.
    conn: ArcSwap<ConnectionManager>,
    rebuilt_ms: AtomicU64,
    /// When Redis last answered (ms since the Unix epoch; 0: never), for `/readyz`.
    last_answer_ms: AtomicU64,
    /// When a Redis operation last failed (same scale): an answer before it no longer says
    /// Redis answers.
    last_failure_ms: AtomicU64,
    /// The epoch this replica has seeded (empty: none yet).
    epoch: ArcSwap<String>,
    /// One resync at a time; holds how the last one ended, for the calls that waited on it.
    resyncing: tokio::sync::Mutex<LastResync>,
    /// Resyncs attempted (bumped at the end of each, under `resyncing`).
    resyncs: AtomicU64,
    journal: Mutex<Journal>,
    journal_file: PathBuf,
    journal_writing: tokio::sync::Mutex<()>,
    admit: Script,
    issue: Script,
    resync: Script,
    seed: Script,
    revoke_jti: Script,
    revoke_client: Script,
    switch: Script,
    /// The highest generation seen: Redis showing a lower one went back to older data.
    seen_generation: AtomicU64,
    /// Why Redis cannot be trusted to keep what it is told (it may evict keys), if so: every
    /// decision is refused until that changes.
    unsafe_store: Mutex<Option<String>>,
    /// Why Redis refuses writes, if it does (a read-only replica after a failover, out of
    /// memory under `noeviction`, a failing save with `stop-writes-on-bgsave-error`): a
    /// revocation or kill switch could not be made while calls whose decision only reads went
    /// on, so every decision is refused until a write goes through again ([`Self::watch`]
    /// tries one each round).
    unwritable: Mutex<Option<String>>,
    /// Redis stopped evicting keys, and the new epoch that must follow (keys may have gone
    /// meanwhile: revocations, `max_uses` counters) is not started yet: no decision until a
    /// rolled-back resync succeeds — the round that noticed may fail to make it (an OOM is
    /// likely just then), and the next round would not know it is owed.
    epoch_owed: std::sync::atomic::AtomicBool,
    /// `INFO` was refused once (said once in the log).
    info_refused: std::sync::atomic::AtomicBool,
    /// The journal holds deferred changes: decisions wait until they are made in Redis.
    deferring: std::sync::atomic::AtomicBool,
    /// One replay of the deferred changes at a time.
    replaying: tokio::sync::Mutex<()>,
    /// Deferred changes made in Redis and not yet audited ([`Self::take_replayed`]), and the
    /// signal that there are some ([`Self::replayed_made`]).
    replayed: Mutex<Vec<Deferred>>,
    replayed_ready: tokio::sync::Notify,
}

/// The connection holds the URL, which may hold a password: nothing of it is printed.
impl fmt::Debug for RedisState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RedisState")
    }
}

/// How the last resync attempt ended ([`RedisState::resync`]).
#[derive(Default)]
struct LastResync {
    failure: Option<Failure>,
    rolled_back: bool,
}

/// Why a Redis operation failed: no answer in time (a write may still happen), or a definite
/// failure.
#[derive(Clone)]
struct Failure {
    timed_out: bool,
    message: String,
}

impl From<Failure> for StateError {
    fn from(f: Failure) -> Self {
        if f.timed_out {
            StateError::Unconfirmed(f.message)
        } else {
            StateError::Unavailable(f.message)
        }
    }
}

impl RedisState {
    /// Prepares the connection; it is made on first use and remade after a failure. Must be
    /// called within a tokio runtime. The journal is `state_dir/shared-<replica>.json`.
    /// `skew_secs` is the clock skew allowed between replicas (`tokens.leeway`): cut-offs
    /// reach that far past the local clock.
    pub fn open(
        url: &Secret,
        state_dir: &Path,
        replica: Option<&str>,
        skew_secs: i64,
    ) -> Result<Self, StateError> {
        let bad = || StateError::Unavailable("state.url is not a valid redis:// URL".into());
        let text = std::str::from_utf8(url.expose()).map_err(|_| bad())?;
        let client = redis::Client::open(text).map_err(|_| bad())?;
        let conn = connect(&client)?;
        let journal_file = state_dir.join(format!("shared-{}.json", replica.unwrap_or("default")));
        let mut journal = load_journal(&journal_file)?;
        // Journals other replica names left in this folder (the name defaults to the host
        // name, new with every container): what they knew is taken in, so a renamed replica
        // still knows the epoch — and sets its cut-off when Redis lost its data — and keeps
        // the kill switches in force.
        let siblings = sibling_journals(state_dir, &journal_file)?;
        journal.forget_made_unless_held(&siblings);
        let made: HashSet<String> = siblings
            .iter()
            .flat_map(|j| &j.made)
            .chain(&journal.made)
            .cloned()
            .collect();
        for other in siblings {
            journal.take_in(other, &made);
        }
        // The `memory` backend's file in the same folder is seeded too (a move to shared
        // state keeps its revocations); it no longer changes, so it is read once, here.
        // A file that cannot be read or parsed stops the start, as it stops the `memory`
        // backend's: taken as empty, its kill switches would be lifted unseen.
        journal.adopt(Revocations::load(state_dir)?.entries());
        let script = |body: &str| Script::new(&format!("{COMMON}{body}"));
        Ok(Self {
            skew_secs,
            client,
            conn: ArcSwap::from_pointee(conn),
            rebuilt_ms: AtomicU64::new(0),
            last_answer_ms: AtomicU64::new(0),
            last_failure_ms: AtomicU64::new(0),
            epoch: ArcSwap::from_pointee(String::new()),
            resyncing: tokio::sync::Mutex::new(LastResync::default()),
            resyncs: AtomicU64::new(0),
            journal: Mutex::new(journal.clone()),
            journal_file,
            journal_writing: tokio::sync::Mutex::new(()),
            admit: script(ADMIT),
            issue: script(ISSUE),
            resync: Script::new(RESYNC),
            seed: Script::new(&format!("{SWITCH_ORDER}{SEED}")),
            seen_generation: AtomicU64::new(journal.generation),
            unsafe_store: Mutex::new(None),
            unwritable: Mutex::new(None),
            epoch_owed: std::sync::atomic::AtomicBool::new(false),
            info_refused: std::sync::atomic::AtomicBool::new(false),
            deferring: std::sync::atomic::AtomicBool::new(!journal.deferred.is_empty()),
            replaying: tokio::sync::Mutex::new(()),
            replayed: Mutex::new(Vec::new()),
            replayed_ready: tokio::sync::Notify::new(),
            revoke_jti: script(REVOKE_JTI),
            revoke_client: script(REVOKE_CLIENT),
            switch: script(SWITCH),
        })
    }

    /// Checks 2 (revocation), 3 (kill switch), 4 (`max_uses`) and 5 (rate limits) of a proxy
    /// call in one atomic script.
    pub async fn admit(&self, call: &AdmitRequest<'_>) -> Result<Admission, StateError> {
        self.replay_deferred().await?;
        let (client_rate, client_burst) = quota(call.client_limit);
        let (connector_rate, connector_burst) = quota(call.connector_limit);
        let jti_key = format!("{PREFIX}revoked:jti:{}", call.jti);
        let uses_key = format!("{PREFIX}uses:{}", call.jti);
        let client_key = format!("{PREFIX}rate:client:{}", call.client);
        let connector_key = format!("{PREFIX}rate:connector:{}", call.connector.unwrap_or(""));
        let seen_generation = self.seen_generation.load(Ordering::Relaxed);
        let (verdict, wait_us, generation): (String, f64, u64) = self
            .in_epoch(|epoch| {
                let mut invocation = self.admit.prepare_invoke();
                invocation
                    .key(EPOCH)
                    .key(&jti_key)
                    .key(REVOKED_CLIENTS)
                    .key(REVOKED_BEFORE)
                    .key(&uses_key)
                    .key(&client_key)
                    .key(&connector_key)
                    .key(GENERATION)
                    .arg(epoch)
                    .arg(call.client)
                    .arg(call.iat)
                    .arg(call.connector.unwrap_or(""))
                    .arg(if call.authorized { "1" } else { "0" })
                    .arg(call.max_uses.unwrap_or(0))
                    .arg(call.exp.saturating_add(KEEP_PAST_EXP_SECS))
                    .arg(client_rate)
                    .arg(client_burst)
                    .arg(connector_rate)
                    .arg(connector_burst)
                    .arg(seen_generation);
                invocation
            })
            .await
            .map_err(StateError::from)?;
        self.saw_generation(generation);
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

    /// The disabled connectors and one cell of the client's issue-rate limit, in one round
    /// trip.
    pub async fn issue_context(
        &self,
        client: &str,
        limit: Option<RateLimit>,
    ) -> Result<IssueContext, StateError> {
        self.replay_deferred().await?;
        let (rate, burst) = quota(limit);
        let key = format!("{PREFIX}rate:issue:{client}");
        let reply: Vec<redis::Value> = self
            .in_epoch(|epoch| {
                let mut invocation = self.issue.prepare_invoke();
                invocation
                    .key(&key)
                    .arg(epoch)
                    .arg(self.seen_generation.load(Ordering::Relaxed))
                    .arg(rate)
                    .arg(burst)
                    .arg(client);
                invocation
            })
            .await
            .map_err(StateError::from)?;
        let text = |v: &redis::Value| redis::from_redis_value_ref::<String>(v).ok();
        let number =
            |v: Option<&redis::Value>| v.and_then(|v| redis::from_redis_value_ref::<i64>(v).ok());
        let (Some(wait_us), Some(cut_off)) = (number(reply.get(1)), number(reply.get(2))) else {
            return Err(StateError::Unavailable(
                "unexpected answer from the issue script".into(),
            ));
        };
        Ok(IssueContext {
            cut_off,
            disabled: reply.iter().skip(3).filter_map(text).collect(),
            rate: if wait_us > 0 {
                Err(whole_seconds(wait_us as f64))
            } else {
                Ok(())
            },
        })
    }

    pub async fn disabled_connectors(&self) -> Result<HashSet<String>, StateError> {
        let switches: HashMap<String, String> = self
            .run(redis::cmd("HGETALL").arg(SWITCHES).clone())
            .await?;
        let mut disabled: HashSet<String> = switches
            .into_iter()
            .filter(|(_, v)| v.starts_with('1'))
            .map(|(k, _)| k)
            .collect();
        disabled.extend(self.deferred_switch_offs());
        Ok(disabled)
    }

    pub async fn is_disabled(&self, connector: &str) -> Result<bool, StateError> {
        let v: Option<String> = self
            .run(redis::cmd("HGET").arg(SWITCHES).arg(connector).clone())
            .await?;
        Ok(v.is_some_and(|v| v.starts_with('1'))
            || self.deferred_switch_offs().iter().any(|c| c == connector))
    }

    /// The connectors whose kill switch waits for Redis: in force here already.
    fn deferred_switch_offs(&self) -> Vec<String> {
        let journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        journal
            .deferred
            .iter()
            .filter_map(|d| match &d.change {
                Change::SetDisabled {
                    connector,
                    disabled: true,
                } => Some(connector.clone()),
                _ => None,
            })
            .collect()
    }

    /// Whether Redis answers: at once if it answered within the last second and nothing failed
    /// since, else a `PING`.
    /// (`/readyz`: every call is refused while it does not, so a load balancer should route
    /// around this replica.)
    pub async fn reachable(&self) -> Result<(), StateError> {
        if let Some(why) = self.untrusted() {
            return Err(StateError::Unavailable(why));
        }
        let answered = self.last_answer_ms.load(Ordering::Relaxed);
        let failed = self.last_failure_ms.load(Ordering::Relaxed);
        if now_ms().saturating_sub(answered) < 1000 && failed < answered {
            return Ok(());
        }
        self.ping().await
    }

    /// Whether Redis answers now.
    pub async fn ping(&self) -> Result<(), StateError> {
        // A PING changes nothing: no answer means unavailable, not "may still take effect".
        self.run::<()>(redis::cmd("PING"))
            .await
            .map_err(|e| match e {
                StateError::Unconfirmed(m) => StateError::Unavailable(m),
                e => e,
            })
    }

    /// Applies an admin change, then notes it in this replica's journal. An error means it
    /// was not made (`Unavailable`) or may not have been (`Unconfirmed`). Changes deferred
    /// earlier are made first: the operators' order is kept.
    pub async fn apply(&self, change: &Change) -> Result<(), StateError> {
        self.replay_deferred().await?;
        self.make(change).await?;
        self.save_journal().await;
        Ok(())
    }

    /// Keeps a tightening change Redis could not take, to be made once it can
    /// ([`Deferred`]). Returns whether the journal holding it was written: if not, it is kept
    /// in memory only, and a restart before Redis takes it loses it.
    pub async fn defer(&self, deferred: Deferred) -> bool {
        debug_assert!(deferred.change.tightens());
        self.note(|j| {
            // One entry once (a retry is another request: kept again, made again, harmless).
            if !j.deferred.contains(&deferred) {
                j.deferred.push(deferred);
            }
            self.deferring.store(true, Ordering::Release);
        });
        self.save_journal().await
    }

    /// Makes the deferred changes in Redis, if any (one atomic load when there are none: this
    /// runs before every shared decision).
    pub async fn replay_deferred(&self) -> Result<(), StateError> {
        if !self.deferring.load(Ordering::Acquire) {
            return Ok(());
        }
        // Boxed: the rare path stays out of every call's future.
        Box::pin(self.replay_deferred_now()).await
    }

    /// Makes the deferred changes in Redis, oldest first, each removed from the journal (and
    /// the journal saved) once made, before its audit record is owed: a crash in between makes
    /// it again rather than never. Replaying is harmless: revocations are idempotent (a client
    /// revocation is made with the second it was asked in) and a kill switch made twice is
    /// still off. The `deferring` flag changes only under the journal lock, with the list.
    async fn replay_deferred_now(&self) -> Result<(), StateError> {
        let Ok(_one) = tokio::time::timeout(STATE_TIMEOUT, self.replaying.lock()).await else {
            return Err(StateError::Unavailable(DEFERRED_WAITING.into()));
        };
        loop {
            let next = {
                let journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
                if journal.deferred.is_empty() {
                    self.deferring.store(false, Ordering::Release);
                }
                journal.deferred.first().cloned()
            };
            let Some(deferred) = next else {
                return Ok(());
            };
            if let Err(e) = self.make(&deferred.change).await {
                return Err(StateError::Unavailable(format!("{DEFERRED_WAITING}: {e}")));
            }
            self.note(|j| {
                if j.deferred.first() == Some(&deferred) {
                    j.deferred.remove(0);
                }
                j.made.push(deferred.request_id.clone());
            });
            self.save_journal().await;
            tracing::warn!(request_id = %deferred.request_id, "a revocation or kill switch deferred while Redis could not take it is now made there");
            self.replayed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(deferred);
            self.replayed_ready.notify_one();
        }
    }

    /// Returns once a deferred change was made in Redis since the last call (at once if one
    /// was since then): its audit record is owed.
    pub async fn replayed_made(&self) {
        self.replayed_ready.notified().await;
    }

    /// How many changes wait for Redis.
    pub fn deferred_count(&self) -> usize {
        self.journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .deferred
            .len()
    }

    /// Puts back made changes whose audit records could not be written, ahead of any since.
    pub fn return_replayed(&self, unrecorded: Vec<Deferred>) {
        let mut list = self.replayed.lock().unwrap_or_else(|e| e.into_inner());
        list.splice(0..0, unrecorded);
    }

    /// The deferred changes made in Redis since the last call (for their audit records).
    pub fn take_replayed(&self) -> Vec<Deferred> {
        std::mem::take(&mut *self.replayed.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Makes one change in Redis and notes it in the journal (not saved).
    async fn make(&self, change: &Change) -> Result<(), StateError> {
        let seen = || self.seen_generation.load(Ordering::Relaxed);
        let (verdict, generation, value): (String, u64, i64) = match change {
            Change::RevokeJti { jti, exp } => {
                let until = exp.saturating_add(KEEP_PAST_EXP_SECS);
                let key = format!("{PREFIX}revoked:jti:{jti}");
                self.in_epoch(|epoch| {
                    let mut invocation = self.revoke_jti.prepare_invoke();
                    invocation.key(&key).arg(epoch).arg(seen()).arg(until);
                    invocation
                })
                .await?
            }
            // Tokens carry their issuing replica's clock: the cut-off reaches `skew` seconds
            // past this one's, so a replica whose clock is ahead cannot slip a token under it
            // (tokens of the client issued in those seconds are refused too).
            Change::RevokeClient { client, at } => {
                let cut = at.saturating_add(self.skew_secs);
                self.in_epoch(|epoch| {
                    let mut invocation = self.revoke_client.prepare_invoke();
                    invocation
                        .key(REVOKED_CLIENTS)
                        .arg(epoch)
                        .arg(seen())
                        .arg(client)
                        .arg(cut);
                    invocation
                })
                .await?
            }
            Change::SetDisabled {
                connector,
                disabled,
            } => {
                let flag = if *disabled { "1" } else { "0" };
                self.in_epoch(|epoch| {
                    let mut invocation = self.switch.prepare_invoke();
                    invocation
                        .key(SWITCHES)
                        .arg(epoch)
                        .arg(seen())
                        .arg(connector)
                        .arg(flag);
                    invocation
                })
                .await?
            }
        };
        if verdict != "ok" {
            return Err(StateError::Unavailable(format!(
                "unexpected answer from Redis: {verdict}"
            )));
        }
        self.saw_generation(generation);
        self.note(|j| match change {
            Change::RevokeJti { jti, exp } => {
                j.jtis
                    .insert(jti.clone(), exp.saturating_add(KEEP_PAST_EXP_SECS));
            }
            Change::RevokeClient { client, .. } => {
                let entry = j.clients.entry(client.clone()).or_insert(value);
                *entry = (*entry).max(value);
            }
            Change::SetDisabled {
                connector,
                disabled,
            } => {
                let entry = SwitchEntry {
                    disabled: *disabled,
                    generation: value,
                    epoch: self.epoch.load().as_str().to_owned(),
                };
                j.switches.insert(connector.clone(), entry);
            }
        });
        Ok(())
    }

    /// Adopts the epoch in force (starting one if the state is new or lost) and seeds Redis
    /// with this replica's journal. Done before this replica's first decision and whenever
    /// the epoch changed; also at start-up, so a move from the `memory` backend is seeded at
    /// once.
    ///
    /// Calls that find a resync under way take its outcome instead of each making their own
    /// after it: behind a Redis that is down (a replica that never reached it since it
    /// started) they would otherwise be answered one attempt apart, the last long after
    /// `request_timeout`. The wait for the attempt under way is bounded as the attempt is.
    async fn resync(&self, seen: &str, rolled_back: bool) -> Result<(), Failure> {
        let attempts_before = self.resyncs.load(Ordering::Acquire);
        let Ok(mut last) = tokio::time::timeout(STATE_TIMEOUT, self.resyncing.lock()).await else {
            return Err(Failure {
                timed_out: false,
                message: "Redis did not answer in time".into(),
            });
        };
        if self.epoch.load().as_str() != seen {
            return Ok(()); // another call resynced meanwhile
        }
        // An attempt ended while this call waited for it: its outcome is this call's — unless
        // this call must start a new epoch and that attempt did not try to.
        if self.resyncs.load(Ordering::Acquire) != attempts_before
            && (last.rolled_back || !rolled_back)
        {
            return last.failure.clone().map_or(Ok(()), Err);
        }
        let outcome = self.resync_now(seen, rolled_back).await;
        *last = LastResync {
            failure: outcome.as_ref().err().cloned(),
            rolled_back,
        };
        self.resyncs.fetch_add(1, Ordering::Release);
        outcome
    }

    /// One resync attempt; the caller holds `resyncing`.
    async fn resync_now(&self, seen: &str, rolled_back: bool) -> Result<(), Failure> {
        let known = match seen {
            "" => self
                .journal
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .epoch
                .clone(),
            seen => seen.to_owned(),
        };
        let mut conn = self.connection();
        let mut invocation = self.resync.prepare_invoke();
        let cut_off = chrono::Utc::now().timestamp() + self.skew_secs;
        invocation
            .key(EPOCH)
            .key(REVOKED_BEFORE)
            .key(GENERATION)
            .arg(crate::token::new_jti())
            .arg(&known)
            .arg(cut_off)
            .arg(self.seen_generation.load(Ordering::Relaxed))
            .arg(if rolled_back { "1" } else { "0" });
        let epoch: String = self.bounded(invocation.invoke_async(&mut conn)).await?;
        if !known.is_empty() && known != epoch {
            tracing::error!(rolled_back, "the shared state in Redis was lost or went back to older data since this replica last saw it (a restart without persistence, a restore, a failover, a flush): tokens issued until now are refused, and kill switches and revocations are restored from the replicas' journals");
        }
        let mut invocation = self.seed.prepare_invoke();
        invocation.arg(self.seed_json());
        self.bounded(invocation.invoke_async::<i64>(&mut conn))
            .await?;
        if known != epoch {
            self.note(|j| j.epoch.clone_from(&epoch));
            self.save_journal().await;
        }
        self.epoch.store(Arc::new(epoch));
        if rolled_back {
            self.epoch_owed.store(false, Ordering::Release);
        }
        Ok(())
    }

    /// Every [`WATCH_INTERVAL`]: notices lost state even without calls (resyncing then);
    /// copies the kill switches in force into this replica's journal, so whichever replica
    /// notices a loss first restores every switch, not only its own; and seeds Redis with the
    /// journal again, so a change lost in a way no counter shows (a shallow rollback that other
    /// replicas' changes then covered) comes back within a round. Seeding is idempotent: only
    /// an entry Redis lacks, or has older, is written.
    pub async fn watch(&self) {
        self.watch_round().await;
        if let Err(e) = self.replay_deferred().await {
            tracing::warn!(error = %e, "deferred revocations or kill switches are not made yet");
        }
    }

    async fn watch_round(&self) {
        let adopted = self.epoch.load_full();
        // Read before asking: this replica's own calls may raise it meanwhile, and only a
        // counter below what was seen *before* the question is a step back.
        let seen_before = self.seen_generation.load(Ordering::Relaxed);
        let mut conn = self.connection();
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(EPOCH).cmd("GET").arg(GENERATION);
        pipe.cmd("HGETALL").arg(SWITCHES);
        type Seen = (Option<String>, Option<u64>, HashMap<String, String>);
        let seen: Result<Seen, _> = self.bounded(pipe.query_async(&mut conn)).await;
        let Ok((epoch, generation, switches)) = seen else {
            return; // refused calls say so; the next round tries again
        };
        self.probe_writes().await;
        let evicted_maybe = self.check_eviction().await;
        let rolled_back = generation.unwrap_or(0) < seen_before
            || evicted_maybe
            || self.epoch_owed.load(Ordering::Acquire);
        if adopted.is_empty() || epoch.as_deref() != Some(adopted.as_str()) || rolled_back {
            if let Err(f) = self.resync(&adopted, rolled_back).await {
                tracing::warn!(error = %StateError::from(f), "cannot resync the shared state");
            }
            return;
        }
        self.saw_generation(generation.unwrap_or(0));
        let generation = self.seen_generation.load(Ordering::Relaxed);
        let mut changed = false;
        self.note(|j| {
            for (connector, value) in &switches {
                let Some(theirs) = SwitchEntry::parse(value) else {
                    continue;
                };
                let mine = j.switches.get(connector);
                if mine.is_none_or(|mine| switch_replaces(&theirs, mine, &adopted)) {
                    j.switches.insert(connector.clone(), theirs);
                    changed = true;
                }
            }
            if j.generation < generation {
                j.generation = generation;
                changed = true;
            }
        });
        if changed {
            self.save_journal().await;
        }
        let mut invocation = self.seed.prepare_invoke();
        invocation.arg(self.seed_json());
        if let Err(f) = self
            .bounded(invocation.invoke_async::<i64>(&mut conn))
            .await
        {
            tracing::warn!(error = %StateError::from(f), "cannot seed the shared state from the journal");
        }
    }

    /// Reads `INFO memory`: a Redis that may evict keys cannot keep revocations, so decisions
    /// are refused while it may (an error in the log says how to fix it). A Redis that does
    /// not answer `INFO` is trusted.
    /// Returns true when Redis stopped being able to evict: keys may have gone meanwhile, so
    /// the caller starts a new epoch (as after a loss) and the journals re-seed.
    async fn check_eviction(&self) -> bool {
        let info: Result<String, _> = self.run(redis::cmd("INFO").arg("memory").clone()).await;
        let info = match info {
            Ok(info) => info,
            Err(e) => {
                if !self.info_refused.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "cannot read INFO memory from Redis: its eviction policy is not checked; it must be maxmemory-policy noeviction");
                }
                return false;
            }
        };
        let risk = eviction_risk(&info);
        let mut current = self.unsafe_store.lock().unwrap_or_else(|e| e.into_inner());
        if risk == *current {
            return false;
        }
        // Recovered only when the risk is gone, not when its wording changed.
        let recovered = current.is_some() && risk.is_none();
        if recovered {
            // Owed before the risk is lifted: no decision slips in between.
            self.epoch_owed.store(true, Ordering::Release);
        }
        match &risk {
            Some(why) => tracing::error!("{why}; refusing every call until it is"),
            None => tracing::warn!("Redis no longer evicts keys: starting a new epoch (keys may have gone meanwhile), then deciding calls again"),
        }
        current.clone_from(&risk);
        recovered
    }

    /// Joins the shared state at start-up (seeding it from the journal and the `memory`
    /// backend's file), so a move to shared state is seeded at once, not at the first call.
    pub async fn join(&self) -> Result<(), StateError> {
        let _ = self.check_eviction().await;
        let seen = self.epoch.load_full();
        if seen.is_empty() {
            self.resync(&seen, false).await?;
        }
        Ok(())
    }

    /// Runs a decision script in the current epoch: after a resync first when this replica
    /// has none or the script finds the epoch changed (once; a second change is an error).
    async fn in_epoch<'s, T: redis::FromRedisValue>(
        &'s self,
        build: impl Fn(&str) -> redis::ScriptInvocation<'s>,
    ) -> Result<T, Failure> {
        for _ in 0..2 {
            if let Some(why) = self.untrusted() {
                return Err(Failure {
                    timed_out: false,
                    message: why,
                });
            }
            let epoch = self.epoch.load_full();
            if epoch.is_empty() {
                self.resync(&epoch, false).await?;
                continue;
            }
            let mut conn = self.connection();
            let reply: redis::Value = self.bounded(build(&epoch).invoke_async(&mut conn)).await?;
            match first_word(&reply) {
                Some(b"epoch") => self.resync(&epoch, false).await?,
                Some(b"rollback") => self.resync(&epoch, true).await?,
                _ => {
                    return redis::from_redis_value(reply).map_err(|e| Failure {
                        timed_out: false,
                        message: format!("unexpected answer from Redis: {e}"),
                    })
                }
            }
        }
        Err(Failure {
            timed_out: false,
            message: "the shared state changed twice during one call".into(),
        })
    }

    /// Why no decision can be trusted to Redis now, if so: it may evict keys, or it refuses
    /// writes.
    fn untrusted(&self) -> Option<String> {
        let lock = |m: &Mutex<Option<String>>| m.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let owed = || {
            self.epoch_owed.load(Ordering::Acquire).then(|| {
                "Redis may have evicted keys before it stopped evicting: a new epoch is being \
                 started"
                    .to_owned()
            })
        };
        lock(&self.unsafe_store)
            .or_else(|| lock(&self.unwritable))
            .or_else(owed)
    }

    /// Notes whether Redis takes writes, saying so in the log when that changes.
    fn note_writable(&self, refusal: Option<String>) {
        let mut current = self.unwritable.lock().unwrap_or_else(|e| e.into_inner());
        match (&*current, &refusal) {
            (None, Some(why)) => tracing::error!(
                "{why}: revocations and kill switches cannot be made, so every call is refused \
                 until it takes writes again (a read-only replica after a failover: point \
                 state.url at the primary)"
            ),
            (Some(_), None) => tracing::warn!("Redis takes writes again: deciding calls again"),
            _ => {}
        }
        *current = refusal;
    }

    /// One write each watch round ([`Self::watch`]): the only way to notice that Redis stopped
    /// taking writes while the calls' decisions only read, and that it takes them again.
    async fn probe_writes(&self) {
        let mut probe = redis::cmd("SET");
        probe
            .arg(format!("{PREFIX}write-probe"))
            .arg("1")
            .arg("PX")
            .arg(WATCH_INTERVAL.as_millis() as u64 * 5);
        if self.run::<()>(probe).await.is_ok() {
            self.note_writable(None);
        }
    }

    fn saw_generation(&self, generation: u64) {
        self.seen_generation
            .fetch_max(generation, Ordering::Relaxed);
    }

    fn connection(&self) -> ConnectionManager {
        ConnectionManager::clone(&self.conn.load())
    }

    /// One command, bounded; a read.
    async fn run<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, StateError> {
        let mut conn = self.connection();
        Ok(self.bounded(cmd.query_async(&mut conn)).await?)
    }

    /// Awaits a Redis operation for at most [`STATE_TIMEOUT`] (a reconnect included). An error
    /// that reconnecting does not mend gets a fresh connection for the next call.
    async fn bounded<T>(
        &self,
        op: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Failure> {
        let result = match tokio::time::timeout(STATE_TIMEOUT, op).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if let Some(why) = write_refusal(&e) {
                    self.note_writable(Some(why));
                }
                // A new connection re-resolves `state.url`: after a failover behind a name,
                // VIP or proxy, the node that now refuses writes (READONLY) is no longer the
                // one it leads to, and redis-rs does not reconnect for that by itself.
                if !e.is_io_error() {
                    self.rebuild();
                }
                Err(fail(&e))
            }
            Err(_) => {
                self.rebuild();
                Err(Failure {
                    timed_out: true,
                    message: "Redis did not answer in time".into(),
                })
            }
        };
        let at = if result.is_ok() {
            &self.last_answer_ms
        } else {
            &self.last_failure_ms
        };
        at.store(now_ms(), Ordering::Relaxed);
        result
    }

    /// A new connection manager (at most once a second): the client library reconnects by
    /// itself only after I/O errors, not after a refused `AUTH` or a connection that hangs.
    fn rebuild(&self) {
        let now = now_ms();
        let last = self.rebuilt_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < 1000
            || self
                .rebuilt_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        match connect(&self.client) {
            Ok(conn) => self.conn.store(Arc::new(conn)),
            Err(e) => tracing::warn!(error = %e, "cannot prepare a new Redis connection"),
        }
    }

    fn note(&self, change: impl FnOnce(&mut Journal)) {
        change(&mut self.journal.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Writes the journal (on a blocking thread: it ends in an fsync). A failure is logged:
    /// the change is in force in Redis; only the copy that re-seeds a wiped Redis is behind.
    async fn save_journal(&self) -> bool {
        // One writer at a time (they share the temp file), each writing the journal as it is
        // once its turn comes: the last write holds every change.
        let _one = self.journal_writing.lock().await;
        let now = chrono::Utc::now().timestamp();
        let snapshot = {
            let mut j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
            j.jtis.retain(|_, until| *until > now);
            j.generation = j
                .generation
                .max(self.seen_generation.load(Ordering::Relaxed));
            j.clone()
        };
        let file = self.journal_file.clone();
        let written =
            tokio::task::spawn_blocking(move || super::local::write_atomic(&file, &snapshot)).await;
        let error = match written {
            Ok(Ok(())) => return true,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(error = %error, "cannot write the shared-state journal");
        false
    }

    /// The seed for Redis: this replica's journal.
    fn seed_json(&self) -> String {
        let seed = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        serde_json::json!({
            "jtis": seed.jtis.iter().map(|(j, u)| serde_json::json!([j, u])).collect::<Vec<_>>(),
            "clients": seed.clients.iter().map(|(c, a)| serde_json::json!([c, a])).collect::<Vec<_>>(),
            "switches": seed.switches.iter().map(|(c, e)| serde_json::json!([c, e.disabled, e.generation, e.epoch])).collect::<Vec<_>>(),
        })
        .to_string()
    }
}

impl Journal {
    /// Takes in what another replica's journal in the same folder knew; on a kill switch both
    /// know, this one's stands unless the other's replaces it by [`switch_replaces`]'s rule.
    /// Its deferred changes are taken too, unless some replica already made them (`made`, by
    /// request id): a replica restarted under a new name — the host name, new with every
    /// container — makes what its old name was asked. Made by two live replicas, they are
    /// made twice, which is harmless ([`RedisState::replay_deferred`]).
    fn take_in(&mut self, other: Journal, made: &HashSet<String>) {
        for deferred in other.deferred {
            if !made.contains(&deferred.request_id) && !self.deferred.contains(&deferred) {
                self.deferred.push(deferred);
            }
        }
        for (jti, until) in other.jtis {
            let entry = self.jtis.entry(jti).or_insert(until);
            *entry = (*entry).max(until);
        }
        for (client, at) in other.clients {
            let entry = self.clients.entry(client).or_insert(at);
            *entry = (*entry).max(at);
        }
        let current = self.epoch.clone();
        for (connector, theirs) in other.switches {
            match self.switches.get(&connector) {
                Some(ours) if !switch_replaces(&theirs, ours, &current) => {}
                _ => {
                    self.switches.insert(connector, theirs);
                }
            }
        }
        // An epoch known to any replica here beats none: only a replica that knew one can
        // tell a loss of Redis's data from a first start.
        if self.epoch.is_empty() && other.generation >= self.generation {
            self.epoch = other.epoch;
        }
        self.generation = self.generation.max(other.generation);
    }

    /// Keeps only the `made` ids some other journal still holds as deferred: the rest can
    /// never be taken in again.
    fn forget_made_unless_held(&mut self, others: &[Journal]) {
        let held: HashSet<&str> = others
            .iter()
            .flat_map(|j| &j.deferred)
            .map(|d| d.request_id.as_str())
            .collect();
        self.made.retain(|id| held.contains(id.as_str()));
    }

    /// Takes in the `memory` backend's revocations and kill switches; what the journal holds
    /// already stays (it is newer).
    fn adopt(&mut self, legacy: Entries) {
        for (jti, exp) in legacy.jtis {
            self.jtis
                .entry(jti)
                .or_insert(exp.saturating_add(KEEP_PAST_EXP_SECS));
        }
        for (client, at) in legacy.clients {
            let entry = self.clients.entry(client).or_insert(at);
            *entry = (*entry).max(at);
        }
        for connector in legacy.disabled {
            // Older than any change made with shared state.
            self.switches.entry(connector).or_insert(SwitchEntry {
                disabled: true,
                generation: 0,
                epoch: String::new(),
            });
        }
    }
}

/// Reads every replica's journal in `state_dir`, as [`RedisState::open`] does (`check`).
pub(crate) fn check_journals(state_dir: &Path) -> Result<(), StateError> {
    sibling_journals(state_dir, Path::new("")).map(drop)
}

/// The journals of other replica names in `state_dir` (`shared-*.json` but `own`).
fn sibling_journals(state_dir: &Path, own: &Path) -> Result<Vec<Journal>, StateError> {
    let entries = match std::fs::read_dir(state_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(StateError::Io {
                path: state_dir.to_path_buf(),
                source,
            })
        }
    };
    let mut journals = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|source| StateError::Io {
                path: state_dir.to_path_buf(),
                source,
            })?
            .path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("shared-") && name.ends_with(".json") && path != own {
            journals.push(load_journal(&path)?);
        }
    }
    Ok(journals)
}

/// The journals in `state_dir` that do not parse, with why (`check`: serve starts on them, see
/// [`load_journal`]).
pub(crate) fn corrupt_journals(state_dir: &Path) -> Vec<(PathBuf, String)> {
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return Vec::new(); // an unreadable folder is `check_readable`'s error
    };
    let mut corrupt: Vec<(PathBuf, String)> = entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("shared-") && n.ends_with(".json"))
        })
        .filter_map(|path| {
            let bytes = std::fs::read(&path).ok()?;
            let error = serde_json::from_slice::<Journal>(&bytes).err()?;
            Some((path, error.to_string()))
        })
        .collect();
    corrupt.sort();
    corrupt
}

/// The journal, if any. A corrupt one is logged and replaced by the next write: it is a safety
/// net for a Redis that lost its data, not the store, so it does not keep the broker from
/// starting (nor does `explain`, which only reads, touch it).
fn load_journal(file: &Path) -> Result<Journal, StateError> {
    match std::fs::read(file) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(journal) => Ok(journal),
            Err(e) => {
                tracing::error!(file = %file.display(), error = %e,
                    "the shared-state journal is corrupt; starting an empty one (the next change replaces the file)");
                Ok(Journal::default())
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Journal::default()),
        Err(source) => Err(StateError::Io {
            path: file.to_path_buf(),
            source,
        }),
    }
}

fn connect(client: &redis::Client) -> Result<ConnectionManager, StateError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(STATE_TIMEOUT))
        .set_response_timeout(Some(STATE_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    ConnectionManager::new_lazy_with_config(client.clone(), config)
        .map_err(|e| StateError::from(fail(&e)))
}

/// A limit as the scripts take it: `(per_second, burst)`, `(0, 0)` for none.
fn quota(limit: Option<RateLimit>) -> (u32, u32) {
    limit.map_or((0, 0), |l| (l.per_second, l.burst.max(1)))
}

/// Whole seconds to wait, at least 1 (a `Retry-After` of 0 invites an immediate retry).
fn whole_seconds(wait_us: f64) -> u64 {
    ((wait_us / 1_000_000.0).ceil() as u64).max(1)
}

/// The first element of an array reply, as bytes (a script's verdict).
fn first_word(reply: &redis::Value) -> Option<&[u8]> {
    match reply {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::BulkString(b)) => Some(b.as_slice()),
            _ => None,
        },
        _ => None,
    }
}

/// Why a Redis configured this way may drop what it is told (`INFO memory`), if it may: with a
/// memory limit, any policy but `noeviction` can evict a revocation.
fn eviction_risk(info: &str) -> Option<String> {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let limit: u64 = field("maxmemory")?.parse().ok()?;
    let policy = field("maxmemory_policy")?;
    (limit > 0 && policy != "noeviction").then(|| {
        format!("Redis may evict keys (maxmemory {limit}, maxmemory-policy {policy}): a revocation could vanish; set maxmemory-policy noeviction")
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Why Redis refused a command for not taking writes now, if that is the error.
fn write_refusal(e: &RedisError) -> Option<String> {
    match e.code()? {
        code @ ("READONLY" | "OOM" | "MISCONF" | "NOREPLICAS" | "MASTERDOWN") => {
            Some(format!("Redis refuses writes ({code})"))
        }
        _ => None,
    }
}

/// A Redis error as a message that cannot carry the URL or its password: only its kind.
fn fail(e: &RedisError) -> Failure {
    let message = if e.is_timeout() {
        "Redis did not answer in time".to_owned()
    } else if e.is_connection_refusal() {
        "Redis refused the connection".to_owned()
    } else if e.is_io_error() || e.is_connection_dropped() {
        "the connection to Redis failed".to_owned()
    } else {
        format!("Redis answered with an error ({:?})", e.kind())
    };
    Failure {
        timed_out: e.is_timeout(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unreadable_memory_backend_file_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("revocations.json"), b"{").unwrap();
        // Connected lazily: nothing listens there, and nothing needs to.
        let url = Secret::new("redis://127.0.0.1:9/0");
        let opened = RedisState::open(&url, dir.path(), Some("a"), 5);
        assert!(
            matches!(opened, Err(StateError::Corrupt { .. })),
            "{:?}",
            opened.err()
        );
    }

    #[test]
    fn expiries_set_in_scripts_keep_counters_as_long_as_the_broker_does() {
        // `keep_until` floors an expiry at Redis's clock + KEEP_PAST_EXP_SECS.
        assert!(COMMON.contains(&format!("+ {KEEP_PAST_EXP_SECS})")));
    }

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
    fn only_a_redis_that_cannot_evict_is_trusted() {
        let info = |limit: u64, policy: &str| {
            format!("# Memory\r\nused_memory:1000\r\nmaxmemory:{limit}\r\nmaxmemory_human:0B\r\nmaxmemory_policy:{policy}\r\n")
        };
        assert_eq!(eviction_risk(&info(0, "allkeys-lru")), None, "no limit");
        assert_eq!(eviction_risk(&info(1 << 30, "noeviction")), None);
        for policy in [
            "allkeys-lru",
            "volatile-lru",
            "volatile-ttl",
            "allkeys-random",
        ] {
            let why = eviction_risk(&info(1 << 30, policy)).expect(policy);
            assert!(why.contains(policy) && why.contains("noeviction"), "{why}");
        }
        assert_eq!(eviction_risk("garbage"), None, "unreadable: trusted");
    }

    fn switch(disabled: bool, generation: i64, epoch: &str) -> SwitchEntry {
        SwitchEntry {
            disabled,
            generation,
            epoch: epoch.into(),
        }
    }

    #[test]
    fn a_kill_switch_made_since_the_last_loss_beats_any_made_before_it() {
        let now = "e2:100";
        // A change of the current epoch wins, whatever the counters (which a loss resets).
        let kill_now = switch(true, 8, now);
        let stale_enable = switch(false, 18, "e1:50");
        assert!(switch_replaces(&kill_now, &stale_enable, now));
        assert!(!switch_replaces(&stale_enable, &kill_now, now));
        let enable_now = switch(false, 9, now);
        let stale_kill = switch(true, 40, "e1:50");
        assert!(
            switch_replaces(&enable_now, &stale_kill, now),
            "an enable can win too"
        );
        // Within the current epoch: by generation.
        assert!(switch_replaces(&switch(false, 9, now), &kill_now, now));
        assert!(!switch_replaces(&kill_now, &switch(false, 9, now), now));
        // Both from before the loss: their order may be lost, so the kill wins.
        let lost_enable = switch(false, 5, "e1:50");
        let kill_after_rollback = switch(true, 4, "e1:50");
        assert!(switch_replaces(&kill_after_rollback, &lost_enable, now));
        assert!(!switch_replaces(&lost_enable, &kill_after_rollback, now));
        assert!(switch_replaces(
            &switch(true, 7, "e0:1"),
            &switch(true, 6, "e1:50"),
            now
        ));
    }

    #[test]
    fn switch_entries_read_both_formats() {
        assert_eq!(
            SwitchEntry::parse("1:12:abc:1700000000"),
            Some(switch(true, 12, "abc:1700000000"))
        );
        assert_eq!(SwitchEntry::parse("0:7"), Some(switch(false, 7, "")));
        assert_eq!(SwitchEntry::parse("garbage"), None);
        let old: Journal =
            serde_json::from_str(r#"{"jtis":{},"clients":{},"switches":{"gh":[true,3]}}"#).unwrap();
        assert_eq!(old.switches["gh"], switch(true, 3, ""));
        let again: Journal = serde_json::from_str(
            &serde_json::to_string(&Journal {
                switches: HashMap::from([("gh".into(), switch(false, 4, "e:1"))]),
                ..Journal::default()
            })
            .unwrap(),
        )
        .unwrap();
        assert_eq!(again.switches["gh"], switch(false, 4, "e:1"));
    }

    fn kill(connector: &str) -> Deferred {
        Deferred {
            change: Change::SetDisabled {
                connector: connector.into(),
                disabled: true,
            },
            request_id: format!("r-{connector}"),
            actor: "admin@127.0.0.1:9".into(),
        }
    }

    /// Nothing listens on port 9: the connection is made lazily, and never is here.
    fn unreachable_state(dir: &Path, replica: &str) -> Arc<RedisState> {
        let url = Secret::new("redis://127.0.0.1:9/0");
        Arc::new(RedisState::open(&url, dir, Some(replica), 5).unwrap())
    }

    /// A replay that finds nothing to make while a change is being deferred (its journal
    /// write slow) must not leave the change kept with the flag that makes it cleared.
    #[tokio::test]
    async fn a_change_deferred_during_a_replay_stays_owed() {
        let dir = tempfile::tempdir().unwrap();
        let state = unreachable_state(dir.path(), "a");
        state.deferring.store(true, Ordering::Release); // as a replay that just emptied it
        let slow_fsync = state.journal_writing.lock().await;
        let replay = tokio::spawn({
            let s = Arc::clone(&state);
            async move { s.replay_deferred().await }
        });
        let defer = tokio::spawn({
            let s = Arc::clone(&state);
            async move { s.defer(kill("github")).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(slow_fsync);
        let _ = replay.await.unwrap();
        assert!(defer.await.unwrap(), "journal written");
        let owed = state.journal.lock().unwrap().deferred.len();
        assert_eq!(owed, 1);
        assert!(state.deferring.load(Ordering::Acquire), "kept but not owed");
    }

    /// A replica restarted under a new name (the host name, new with every container) makes
    /// what its old name was asked while Redis could not take it.
    #[tokio::test]
    async fn a_renamed_replica_takes_in_its_predecessors_deferred_changes() {
        let dir = tempfile::tempdir().unwrap();
        let old = Journal {
            deferred: vec![kill("github")],
            ..Journal::default()
        };
        let file = dir.path().join("shared-old-pod.json");
        std::fs::write(file, serde_json::to_vec(&old).unwrap()).unwrap();
        let state = unreachable_state(dir.path(), "new-pod");
        assert_eq!(state.journal.lock().unwrap().deferred, old.deferred);
        assert!(state.deferring.load(Ordering::Acquire));
        // The same entry kept twice is kept once.
        assert!(state.defer(kill("github")).await);
        assert_eq!(state.journal.lock().unwrap().deferred.len(), 1);
    }

    /// A change taken in from a journal its replica never rewrites (it is gone) is made once:
    /// the replica that made it notes so, and no later start (under any name) makes it again —
    /// which would switch the connector off again after an enable.
    #[tokio::test]
    async fn a_deferred_change_taken_in_and_made_is_not_taken_in_again() {
        let dir = tempfile::tempdir().unwrap();
        let gone = Journal {
            deferred: vec![kill("github")],
            ..Journal::default()
        };
        let file = dir.path().join("shared-gone.json");
        std::fs::write(file, serde_json::to_vec(&gone).unwrap()).unwrap();
        // What the replica that took it in wrote once it made it.
        let maker = Journal {
            made: vec!["r-github".into()],
            ..Journal::default()
        };
        let file = dir.path().join("shared-maker.json");
        std::fs::write(file, serde_json::to_vec(&maker).unwrap()).unwrap();
        for name in ["maker", "later"] {
            let state = unreachable_state(dir.path(), name);
            assert!(state.journal.lock().unwrap().deferred.is_empty(), "{name}");
            assert!(!state.deferring.load(Ordering::Acquire), "{name}");
        }
        // Once no journal holds it any more, its id is forgotten.
        std::fs::remove_file(dir.path().join("shared-gone.json")).unwrap();
        let state = unreachable_state(dir.path(), "maker");
        assert!(state.journal.lock().unwrap().made.is_empty());
    }

    /// Deferred changes survive a restart in the journal, in order; a journal written before
    /// they existed still reads, and one with none writes no `deferred` member.
    #[test]
    fn deferred_changes_are_kept_in_the_journal_in_order() {
        let kept = |change| Deferred {
            change,
            request_id: "r1".into(),
            actor: "admin@127.0.0.1:9".into(),
        };
        let journal = Journal {
            deferred: vec![
                kept(Change::SetDisabled {
                    connector: "gh".into(),
                    disabled: true,
                }),
                kept(Change::RevokeClient {
                    client: "bot".into(),
                    at: 5,
                }),
                kept(Change::RevokeJti {
                    jti: "j".into(),
                    exp: 9,
                }),
            ],
            ..Journal::default()
        };
        let text = serde_json::to_string(&journal).unwrap();
        let again: Journal = serde_json::from_str(&text).unwrap();
        assert_eq!(again.deferred, journal.deferred, "{text}");
        let old: Journal =
            serde_json::from_str(r#"{"jtis":{},"clients":{},"switches":{}}"#).unwrap();
        assert!(old.deferred.is_empty());
        assert!(!serde_json::to_string(&old).unwrap().contains("deferred"));
    }

    #[test]
    fn waits_round_up_to_whole_seconds() {
        assert_eq!(whole_seconds(1.0), 1);
        assert_eq!(whole_seconds(1_000_000.0), 1);
        assert_eq!(whole_seconds(1_000_001.0), 2);
    }
}
