//! The broker's shared state: the configuration in force (swapped atomically on reload) with
//! everything precomputed from it, and the state that outlives a config — signing keys, audit
//! log, revocations, `max_uses` counters and token-endpoint failure windows.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};

use crate::admin::metrics::Metrics;
use crate::audit::AuditLog;
use crate::config::{Config, Connector, Credential, RateLimit};
use crate::credential::{CredentialError, DynamicCredential};
use crate::proxy::forward::{Origin, UpstreamClient, UpstreamClients};
use crate::proxy::inject::{Echoes, InjectError, Injection};
use crate::server::{ListenerTls, ListenerTlsError, PreparedTls};
use crate::state::StateStore;
pub use crate::token::lockout::AuthAttempt;
use crate::token::lockout::{Lockouts, MAX_LOCKOUT_ADDRESSES};
use crate::token::{SigningKeys, TokenVerifier};

/// Everything shared by all connections.
/// A validated config, built and ready to take over ([`Broker::prepare_config`]).
pub struct PreparedConfig<'b> {
    broker: &'b Broker,
    live: Live,
    tls: PreparedTls,
}

impl PreparedConfig<'_> {
    /// Puts the config in force: the next request sees it. Cannot fail.
    pub fn install(self) {
        self.broker.live.store(Arc::new(self.live));
        self.broker.listener_tls.install(self.tls);
    }
}

pub struct Broker {
    live: ArcSwap<Live>,
    pub audit: AuditLog,
    /// Revocations, disabled connectors and (with Redis) counters and rate limits.
    pub state: Arc<StateStore>,
    /// Counters and histograms served at `GET /metrics`.
    pub metrics: Arc<Metrics>,
    uses: UseCounters,
    auth_failures: Lockouts,
    upstream_clients: UpstreamClients,
    /// The listeners' TLS configs, re-read on every reload.
    pub listener_tls: ListenerTls,
    /// Held by admin changes from check to audit to effect (reloads, enables): two reloads
    /// at once could otherwise put the older file in force after the newer one.
    pub admin_changes: tokio::sync::Mutex<()>,
    /// Held while the audit records of deferred changes made since are written
    /// (`admin::audit_replayed`): one writer at a time, so none overtakes another's.
    pub replayed_audit: tokio::sync::Mutex<()>,
    /// The SHA-256 (hex) of the config file's bytes that the last reload failed on, whatever
    /// triggered it: the file watcher does not try the same bytes again (one broken save, one
    /// failed reload record).
    pub failed_reload: std::sync::Mutex<Option<String>>,
}

/// The config in force and what is derived from it. Requests hold an `Arc<Live>` for their
/// whole life, so a reload never changes the rules under a request in flight.
pub struct Live {
    pub config: Arc<Config>,
    pub verifier: TokenVerifier,
    pub connectors: crate::ConfigMap<String, ConnectorRuntime>,
    pub client_limits: crate::ConfigMap<String, Arc<DefaultDirectRateLimiter>>,
    pub issue_limits: crate::ConfigMap<String, Arc<DefaultDirectRateLimiter>>,
}

/// Per-connector values prepared at load so the hot path allocates as little as possible.
pub struct ConnectorRuntime {
    pub injection: Injection,
    /// The forms of the credential an upstream must not echo back and a record must not hold.
    /// For an OAuth2 connector, its `client_secret` instead (records only: the upstream never
    /// sees it; the minted credential's forms are made per call).
    pub echoes: Arc<Echoes>,
    /// A dynamic credential's source and cache (DESIGN §3.7), kept across reloads that leave
    /// it unchanged. For such a connector `injection` carries no credential:
    /// `injection` only names the header or parameter check 1 refuses from clients, and the
    /// pipeline builds the real injection per call from the minted token.
    pub dynamic: Option<Arc<DynamicCredential>>,
    pub client: UpstreamClient,
    pub limiter: Option<Arc<DefaultDirectRateLimiter>>,
    /// Where calls go: the upstream's scheme and authority.
    pub origin: Origin,
    /// The upstream's base path, to which the request path and query are appended.
    pub base_path: String,
    /// Where `/{connector}` alone goes: the upstream's path as configured (`/` when none).
    pub root_path: String,
    /// This connector's metric series, resolved at load.
    pub metrics: Arc<crate::admin::metrics::ConnectorMetrics>,
}

/// The `max_uses` counters of the `memory` backend (check 4), by `jti`.
///
/// They live in this process only, so a token issued before it started has a count nobody
/// knows any more (a restart must not give a spent single-use token its uses back): such a
/// token is refused. `iat` has whole seconds, so for the start's own second the counters also
/// remember which `max_uses` tokens this process issued in it.
///
/// A spent token's counter lives as long as the token could pass check 2, and a little longer
/// ([`USES_KEPT_PAST_EXP_SECS`]): with single-use tokens, one a call, that is one counter for
/// every call of the last `max_ttl` and some minutes, so each is kept small (32 bytes of key
/// and count, no allocation of its own).
struct UseCounters {
    counts: DashMap<UseKey, Uses>,
    /// The Unix second this process started in.
    booted: i64,
    /// `max_uses` tokens issued by this process with `iat <= booted`, by `jti`, with `exp`.
    issued_at_boot: DashMap<UseKey, i64>,
}

/// A `jti` as a counter's key: the 16 random bytes the broker's own `jti`s encode
/// ([`crate::token::new_jti`]), or the first 16 bytes of the SHA-256 of any other text (only
/// the broker's own tokens get here, so nobody chooses a `jti` to collide with another).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct UseKey([u8; 16]);

impl UseKey {
    fn of(jti: &str) -> Self {
        use base64::Engine;
        let mut key = [0u8; 16];
        let decoded =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode_slice(jti.as_bytes(), &mut key);
        if decoded != Ok(16) {
            key.copy_from_slice(&Sha256::digest(jti.as_bytes())[..16]);
        }
        Self(key)
    }
}

/// How long past its token's `exp` a `max_uses` counter is kept: longer than any
/// `tokens.leeway` (at most 300 s), so a spent token cannot pass check 2 with a counter
/// started afresh, plus 5 minutes for this host's clock being stepped (a counter dropped while
/// the clock ran ahead, before it was set right). (Unlike Redis's keys, which another
/// machine's clock expires, these are judged by the clock check 2 reads.)
const USES_KEPT_PAST_EXP_SECS: i64 = 600;

struct Uses {
    count: u64,
    exp: i64,
}

/// Check 4's verdict on one use of a `max_uses` token.
#[derive(Debug, PartialEq, Eq)]
pub enum Spend {
    /// A use was left, and is now spent.
    Spent,
    /// Every use was spent.
    Exhausted,
    /// Issued before this process started: its uses are unknown.
    Unknown,
}

impl UseCounters {
    fn new(booted: i64) -> Self {
        Self {
            counts: DashMap::new(),
            booted,
            issued_at_boot: DashMap::new(),
        }
    }

    /// Notes a `max_uses` token this process issues (only one issued in its start's second
    /// needs telling apart from an older process's).
    fn issued(&self, jti: &str, iat: i64, exp: i64) {
        if iat <= self.booted {
            self.issued_at_boot.insert(UseKey::of(jti), exp);
        }
    }

    /// Counts one use of a `max_uses` token.
    fn consume(&self, jti: &str, max_uses: u64, iat: i64, exp: i64) -> Spend {
        let key = UseKey::of(jti);
        if iat <= self.booted && !self.issued_at_boot.contains_key(&key) {
            return Spend::Unknown;
        }
        let mut entry = self.counts.entry(key).or_insert(Uses { count: 0, exp });
        if entry.count >= max_uses {
            return Spend::Exhausted;
        }
        entry.count += 1;
        Spend::Spent
    }

    /// Forgets the counters of expired tokens — not at `exp`: check 2 accepts a token up to
    /// `tokens.leeway` past it, and a counter forgotten then would start again at zero.
    fn sweep(&self, now: i64) {
        self.counts
            .retain(|_, u| u.exp.saturating_add(USES_KEPT_PAST_EXP_SECS) >= now);
        self.issued_at_boot
            .retain(|_, exp| exp.saturating_add(USES_KEPT_PAST_EXP_SECS) >= now);
    }
}

/// Why a config could not be put in force.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The new config changes settings that only take effect at start-up.
    #[error("these settings only change with a restart: {}; reload refused, the running config stays", .0.join(", "))]
    RestartNeeded(Vec<&'static str>),
    /// A connector's credential cannot be injected as configured.
    #[error("connector {connector}: {source}")]
    Injection {
        connector: String,
        source: InjectError,
    },
    /// An upstream TLS configuration could not be built.
    #[error("connector {connector}: {message}")]
    UpstreamTls { connector: String, message: String },
    /// The upstream URL names no origin a connection can be made to.
    #[error("connector {connector}: {source}")]
    Upstream {
        connector: String,
        source: crate::proxy::forward::UpstreamError,
    },
    /// A dynamic credential's source could not be built (e.g. its key stopped parsing).
    #[error("connector {connector}: {source}")]
    DynamicCredential {
        connector: String,
        source: CredentialError,
    },
    /// The signing key file could not be loaded (the running key stays in force).
    #[error("tokens.signing_key: {0}; the running key stays in force (a restart would fail the same way)")]
    SigningKey(crate::token::keys::KeyError),
    /// A listener's certificate, key or client CA could not be loaded (or a reload would
    /// switch a listener between TLS and plain HTTP).
    #[error(transparent)]
    ListenerTls(#[from] ListenerTlsError),
}

impl Broker {
    pub fn new(
        config: Config,
        keys: Arc<SigningKeys>,
        audit: AuditLog,
        state: StateStore,
    ) -> Result<Self, LoadError> {
        let upstream_clients = UpstreamClients::default();
        let listener_tls = ListenerTls::load(&config)?;
        let metrics = Arc::new(Metrics::new());
        metrics.observe_audit(&audit);
        let live = Live::build(Arc::new(config), &keys, &upstream_clients, &metrics, None)?;
        Ok(Self {
            live: ArcSwap::from_pointee(live),
            audit,
            state: Arc::new(state),
            metrics,
            uses: UseCounters::new(chrono::Utc::now().timestamp()),
            auth_failures: Lockouts::new(MAX_LOCKOUT_ADDRESSES),
            upstream_clients,
            listener_tls,
            admin_changes: tokio::sync::Mutex::new(()),
            replayed_audit: tokio::sync::Mutex::new(()),
            failed_reload: std::sync::Mutex::new(None),
        })
    }

    /// The proxy listener's `client_ca` in force now (`None` without mTLS): a connection's
    /// client certificate counts only under the CA it was verified against.
    pub fn client_ca_in_force(&self) -> Option<crate::tls::ClientCaId> {
        self.listener_tls.proxy.as_ref()?.client_ca()
    }

    /// The config in force, for one request's lifetime.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Whether `live` is still the config in force (no reload since it was loaded). Cheaper
    /// than [`Self::live`]: no reference is taken.
    pub fn live_is(&self, live: &Arc<Live>) -> bool {
        Arc::ptr_eq(&self.live.load(), live)
    }

    /// Puts a new, already validated config in force; rate limiters whose quota did not change
    /// keep their state, so a reload is not a way around a limit.
    /// Listener certificates are re-read too, before anything is swapped: a bad certificate
    /// fails the whole reload and the old config and certificates stay in force.
    pub fn swap_config(&self, config: Config) -> Result<(), LoadError> {
        self.prepare_config(config)?.install();
        Ok(())
    }

    /// Everything of [`Broker::swap_config`] that can fail, without installing anything: the
    /// reload is audited between the two, so a reload that cannot be audited never happens.
    pub fn prepare_config(&self, config: Config) -> Result<PreparedConfig<'_>, LoadError> {
        let old = self.live();
        let fixed = restart_only_changes(&old.config, &config);
        if !fixed.is_empty() {
            return Err(LoadError::RestartNeeded(fixed));
        }
        let keys = signing_keys_for(&config, &old)?;
        let tls = self.listener_tls.prepare(&config)?;
        let live = Live::build(
            Arc::new(config),
            &keys,
            &self.upstream_clients,
            &self.metrics,
            Some(&old),
        )?;
        Ok(PreparedConfig {
            broker: self,
            live,
            tls,
        })
    }

    /// The key tokens are signed with now (and the JWKS publishes).
    pub fn signing_keys(&self) -> Arc<SigningKeys> {
        Arc::clone(self.live().verifier.keys())
    }

    pub fn config_path(&self) -> PathBuf {
        self.live().config.path.clone()
    }

    /// Counts one use of a `max_uses` token (memory backend).
    pub fn consume_use(&self, claims: &crate::token::AccessClaims, max_uses: u64) -> Spend {
        self.uses
            .consume(&claims.jti, max_uses, claims.iat, claims.exp)
    }

    /// Notes a `max_uses` token just issued (memory backend), so that its uses are known.
    pub fn issued_max_uses(&self, claims: &crate::token::AccessClaims) {
        if claims.max_uses.is_some() {
            self.uses.issued(&claims.jti, claims.iat, claims.exp);
        }
    }

    /// Forgets what expired tokens and old authentication failures left behind.
    pub fn sweep_expired(&self, now: i64) {
        self.uses.sweep(now);
        self.auth_failures.sweep(now);
        if let crate::state::StateStore::Memory(revocations) = &*self.state {
            revocations.sweep(now);
        }
    }

    /// The seconds `ip` stays locked out of the token endpoint: it failed client
    /// authentication [`crate::token::lockout::AUTH_FAILURES_PER_MINUTE`] times within the last 60 seconds.
    pub fn auth_lockout(&self, ip: IpAddr, now: i64) -> Option<u64> {
        self.auth_failures.left(ip, now)
    }

    /// Runs a token request's client `authenticate` unless `ip` is locked out, counting a
    /// failure at `now` — in one step under the address's entry, so requests from one address
    /// that were all let in before any of them failed (say, each holding back its body) still
    /// get no more than the budget of attempts between them, and none after it, right secret
    /// or not.
    pub fn authenticate_from<T, E>(
        &self,
        ip: IpAddr,
        now: i64,
        authenticate: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, AuthAttempt<E>> {
        self.auth_failures.attempt(ip, now, authenticate)
    }
}

impl Live {
    /// Whether `value`, given where a name belongs (an admin target, a scope item), is in fact
    /// a secret the broker holds: a client secret or the admin token (compared by SHA-256, as
    /// they are configured; also inside a pasted HTTP Basic value), `audit.hmac_key`, a
    /// connector's static credential, an OAuth2 `client_secret` or the credential minted
    /// last. It must then be neither recorded nor echoed (DESIGN §5).
    pub fn is_held_secret(&self, value: &str) -> bool {
        if value.is_empty() {
            return false;
        }
        let config = &self.config;
        let matches_hashed = |candidate: &[u8]| {
            let digest: [u8; 32] = Sha256::digest(candidate).into();
            let admin = config.admin.as_ref();
            let hashed = config
                .clients
                .iter()
                .filter_map(|c| c.secret_sha256)
                .chain(admin.map(|a| a.token_sha256))
                .chain(
                    admin
                        .into_iter()
                        .flat_map(|a| &a.operators)
                        .map(|o| o.token_sha256),
                );
            let mut known = false;
            for secret in hashed {
                // Every one compared, in constant time: the answer says nothing of which.
                known |= bool::from(subtle::ConstantTimeEq::ct_eq(&secret[..], &digest[..]));
            }
            known
        };
        let bytes = value.as_bytes();
        matches_hashed(bytes)
            || basic_secret(value).is_some_and(|s| matches_hashed(&s))
            || config
                .audit
                .hmac_key
                .as_ref()
                .is_some_and(|k| constant_time_eq::constant_time_eq(k.expose(), bytes))
            || self
                .connectors
                .values()
                .any(|c| c.echoes.is(bytes) || c.dynamic.as_ref().is_some_and(|d| d.holds(bytes)))
    }

    /// How long any audit record is waited for from now (`server.request_timeout`): under
    /// `fsync = "always"` a disk that stopped answering must not hold a request, a token or an
    /// admin change for ever.
    pub fn audit_by(&self) -> std::time::Instant {
        std::time::Instant::now() + self.config.server.request_timeout
    }

    fn build(
        config: Arc<Config>,
        keys: &Arc<SigningKeys>,
        upstream_clients: &UpstreamClients,
        metrics: &Metrics,
        old: Option<&Live>,
    ) -> Result<Self, LoadError> {
        let verifier = TokenVerifier::new(
            Arc::clone(keys),
            config.tokens.issuer.clone(),
            config.tokens.leeway.as_secs(),
        );
        let mut connectors = crate::ConfigMap::default();
        for c in &config.connectors {
            // A dynamic connector has no credential yet: an empty one gives the injection's
            // names for check 1, and nothing else reads it.
            let value = match &c.credential {
                Credential::Static { value, .. } => value.clone(),
                _ => crate::secret::Secret::new(Vec::new()),
            };
            let injection =
                Injection::new(&c.auth, &value).map_err(|source| LoadError::Injection {
                    connector: c.name.clone(),
                    source,
                })?;
            let client = upstream_clients
                .get(c.upstream_ca.as_deref())
                .map_err(|message| LoadError::UpstreamTls {
                    connector: c.name.clone(),
                    message,
                })?;
            let dynamic = dynamic_credential(c, &client, old)?;
            let old_limiter = old
                .and_then(|o| o.connectors.get(&c.name))
                .and_then(|r| r.limiter.clone());
            let old_rate = old
                .and_then(|o| o.config.connector(&c.name))
                .and_then(|oc| oc.rate_limit);
            let origin =
                Origin::new(&c.upstream.scheme, &c.upstream.authority).map_err(|source| {
                    LoadError::Upstream {
                        connector: c.name.clone(),
                        source,
                    }
                })?;
            connectors.insert(
                c.name.clone(),
                ConnectorRuntime {
                    injection,
                    echoes: Arc::new(recorded_echoes(c, &value)),
                    dynamic,
                    client,
                    limiter: limiter(c.rate_limit, old_rate, old_limiter),
                    origin,
                    base_path: c.upstream.base_path.clone(),
                    root_path: c.upstream.root_path.clone(),
                    metrics: metrics.for_connector(c),
                },
            );
        }
        let mut client_limits = crate::ConfigMap::default();
        let mut issue_limits = crate::ConfigMap::default();
        for cl in &config.clients {
            let old_client = old.and_then(|o| o.config.client(&cl.id));
            let prev = old.and_then(|o| o.client_limits.get(&cl.id)).cloned();
            if let Some(l) = limiter(cl.rate_limit, old_client.and_then(|c| c.rate_limit), prev) {
                client_limits.insert(cl.id.clone(), l);
            }
            let prev = old.and_then(|o| o.issue_limits.get(&cl.id)).cloned();
            let old_rate = old.and_then(|o| o.config.tokens.issue_rate_limit);
            if let Some(l) = limiter(config.tokens.issue_rate_limit, old_rate, prev) {
                issue_limits.insert(cl.id.clone(), l);
            }
        }
        Ok(Self {
            config,
            verifier,
            connectors,
            client_limits,
            issue_limits,
        })
    }
}

/// The connector's dynamic credential source: the one in force when its config (secrets
/// included) and trust roots are unchanged, so its cache survives the reload; else a new one.
fn dynamic_credential(
    c: &Connector,
    client: &UpstreamClient,
    old: Option<&Live>,
) -> Result<Option<Arc<DynamicCredential>>, LoadError> {
    // Same trust roots: the same client (`UpstreamClients` gives a new one when the
    // `upstream_ca` file's bytes changed, not only its path).
    let previous = old.and_then(|o| {
        let d = o.connectors.get(&c.name)?.dynamic.as_ref()?;
        (d.uses(client) && d.same_config(&c.credential)).then(|| Arc::clone(d))
    });
    if previous.is_some() {
        return Ok(previous);
    }
    DynamicCredential::new(&c.name, &c.credential, client.clone())
        .map(|d| d.map(Arc::new))
        .map_err(|source| LoadError::DynamicCredential {
            connector: c.name.clone(),
            source,
        })
}

/// Settings read once at start-up (listeners, the audit log, state, whether there is a signing
/// key file at all — its key is read again, see [`signing_keys_for`]): a reload
/// that changes them would be answered "reloaded" while the old values stay in force, so it
/// is refused instead, naming each one.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let (o, n) = (&old.server, &new.server);
    let admin_listen = |c: &Config| c.admin.as_ref().map(|a| a.listen);
    let admin_connections = |c: &Config| c.admin.as_ref().map(|a| a.max_connections);
    let checks: [(&'static str, bool); 15] = [
        ("server.listen", o.listen != n.listen),
        (
            "server.max_connections",
            o.max_connections != n.max_connections,
        ),
        (
            "server.max_header_bytes",
            o.max_header_bytes != n.max_header_bytes,
        ),
        (
            "server.header_read_timeout",
            o.header_read_timeout != n.header_read_timeout,
        ),
        (
            "server.request_timeout",
            o.request_timeout != n.request_timeout,
        ),
        (
            "[admin] listen (or adding/removing [admin])",
            admin_listen(old) != admin_listen(new),
        ),
        (
            "admin.max_connections",
            admin_connections(old).is_some_and(|o| admin_connections(new).is_some_and(|n| o != n)),
        ),
        (
            // A key file is read again on reload (another path too); the ephemeral key of a
            // config without one is the start's, and cannot be swapped for or from a file.
            "tokens.signing_key (adding or removing it)",
            old.tokens.signing_key.is_some() != new.tokens.signing_key.is_some(),
        ),
        ("audit.path", old.audit.path != new.audit.path),
        ("audit.fsync", old.audit.fsync != new.audit.fsync),
        (
            "audit.rotate_bytes",
            old.audit.rotate_bytes != new.audit.rotate_bytes,
        ),
        ("audit.hmac_key", old.audit.hmac_key != new.audit.hmac_key),
        ("state.dir", old.state.dir != new.state.dir),
        (
            "state.backend / state.url",
            old.state.backend != new.state.backend,
        ),
        ("state.replica", old.state.replica != new.state.replica),
    ];
    checks
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(name, _)| name)
        .collect()
}

/// The signing key for a config being reloaded: the key file is read again, so replacing it
/// and reloading rotates the key (the JWKS publishes the new one, and every token signed with
/// the old one is refused from then on: what an emergency rotation wants). The same key keeps
/// the running one (and the verified-token cache's meaning); an unreadable or invalid file
/// refuses the reload, the running key staying in force. Without a key file, the ephemeral
/// key of the start stays.
fn signing_keys_for(config: &Config, old: &Live) -> Result<Arc<SigningKeys>, LoadError> {
    let running = old.verifier.keys();
    let Some(path) = &config.tokens.signing_key else {
        return Ok(Arc::clone(running));
    };
    let on_disk = SigningKeys::from_pem_file(path).map_err(LoadError::SigningKey)?;
    if on_disk.kid() == running.kid() {
        return Ok(Arc::clone(running));
    }
    tracing::warn!(
        kid = on_disk.kid(),
        "the signing key changed: tokens signed with the previous key are refused from now on"
    );
    Ok(Arc::new(on_disk))
}

/// A limiter for `rate`, reusing `previous` when the quota is unchanged.
fn limiter(
    rate: Option<RateLimit>,
    previous_rate: Option<RateLimit>,
    previous: Option<Arc<DefaultDirectRateLimiter>>,
) -> Option<Arc<DefaultDirectRateLimiter>> {
    let rate = rate?;
    if previous_rate == Some(rate) {
        if let Some(p) = previous {
            return Some(p);
        }
    }
    let per_second = NonZeroU32::new(rate.per_second)?;
    let burst = NonZeroU32::new(rate.burst)?;
    Some(Arc::new(RateLimiter::direct(
        Quota::per_second(per_second).allow_burst(burst),
    )))
}

/// Takes one cell from `limiter`; on refusal, the whole seconds until the next one.
pub fn take(limiter: &DefaultDirectRateLimiter) -> Result<(), u64> {
    limiter.check().map_err(|not_until| {
        let wait: Duration = not_until.wait_time_from(DefaultClock::default().now());
        wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
    })
}

/// What a record of this connector's calls must not hold: its static credential in every
/// form it is sent in; for an OAuth2 connector, the `client_secret` the broker mints with (a
/// minted credential is looked for per call: it changes).
fn recorded_echoes(c: &crate::config::Connector, value: &crate::secret::Secret) -> Echoes {
    match &c.credential {
        Credential::OAuth2(oauth2) => {
            Echoes::new(&crate::config::AuthMethod::Bearer, &oauth2.client_secret)
        }
        _ => Echoes::new(&c.auth, value),
    }
}

/// The secret part of an HTTP Basic value (`Basic base64(id:secret)`, or the base64 alone).
fn basic_secret(value: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let trimmed = value.trim_ascii();
    let encoded = trimmed
        .get(..6)
        .filter(|p| p.eq_ignore_ascii_case("basic "))
        .map_or(trimmed, |_| trimmed[6..].trim_ascii_start());
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some(decoded[colon + 1..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spent_token_stays_spent_while_the_leeway_still_accepts_it() {
        let uses = UseCounters::new(0);
        let (iat, exp) = (500, 1_000);
        assert_eq!(uses.consume("j", 1, iat, exp), Spend::Spent);
        assert_eq!(uses.consume("j", 1, iat, exp), Spend::Exhausted);
        // Past `exp`, within any leeway (at most 300 s), a sweep keeps the counter.
        uses.sweep(exp + 1);
        uses.sweep(exp + 300);
        assert_eq!(
            uses.consume("j", 1, iat, exp),
            Spend::Exhausted,
            "spent, not counted afresh"
        );
        // Long after, when no leeway accepts the token any more, the counter goes.
        uses.sweep(exp + USES_KEPT_PAST_EXP_SECS);
        assert_eq!(uses.consume("j", 1, iat, exp), Spend::Exhausted);
        uses.sweep(exp + USES_KEPT_PAST_EXP_SECS + 1);
        assert!(uses.counts.is_empty());
    }

    #[test]
    fn counters_are_keyed_by_the_jtis_own_bytes_or_a_digest() {
        let jti = crate::token::new_jti();
        let key = UseKey::of(&jti);
        use base64::Engine;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&jti)
            .unwrap();
        assert_eq!(key.0[..], raw[..]);
        // Any other text (longer, shorter, not base64url) still has a key of its own.
        let others = [
            "j",
            "",
            "AAAAAAAAAAAAAAAAAAAAAA==",
            "AAAAAAAAAAAAAAAAAAAAAAAA",
        ];
        let keys: std::collections::HashSet<[u8; 16]> =
            others.iter().map(|t| UseKey::of(t).0).collect();
        assert_eq!(keys.len(), others.len());
        assert!(!keys.contains(&[0u8; 16]), "not the all-zero jti's key");
        assert_eq!(std::mem::size_of::<(UseKey, Uses)>(), 32);
    }

    #[test]
    fn uses_of_a_token_issued_before_the_process_started_are_unknown() {
        let booted = 1_000;
        let uses = UseCounters::new(booted);
        // Issued by an earlier process: before this one's second, or within it.
        assert_eq!(uses.consume("old", 5, booted - 1, 2_000), Spend::Unknown);
        assert_eq!(
            uses.consume("same-second", 5, booted, 2_000),
            Spend::Unknown
        );
        // Issued by this process in its first second, and after it.
        uses.issued("mine", booted, 2_000);
        assert_eq!(uses.consume("mine", 1, booted, 2_000), Spend::Spent);
        assert_eq!(uses.consume("mine", 1, booted, 2_000), Spend::Exhausted);
        uses.issued("later", booted + 1, 2_000);
        assert!(
            uses.issued_at_boot.len() == 1,
            "only the first second is remembered"
        );
        assert_eq!(uses.consume("later", 1, booted + 1, 2_000), Spend::Spent);
        uses.sweep(2_000 + USES_KEPT_PAST_EXP_SECS + 1);
        assert!(uses.issued_at_boot.is_empty() && uses.counts.is_empty());
    }
}
