//! The validated configuration (DESIGN §3).
//!
//! [`Config::parse`] starts from the file's text so tests need no files; it parses the serde
//! mirror in [`raw`], then converts every part into types that cannot hold an invalid state
//! (compiled patterns, resolved secrets, parsed durations), collecting *every* problem with its
//! file, line and key before failing. [`lint`] adds `check`'s governance findings on top.

mod dynamic;
pub mod lint;
pub mod raw;
mod validate;

pub(crate) use validate::is_loopback_host;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use http::{HeaderName, Method};

use crate::audit::FsyncPolicy;
use crate::policy::{OperationRouter, Pattern};
use crate::secret::{Secret, SecretRef};

/// Default `max_body_bytes` of an operation: 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1 << 20;

/// A whole, valid configuration.
#[derive(Debug)]
pub struct Config {
    /// The file it was read from (for messages and for re-reading on reload).
    pub path: PathBuf,
    /// Built in memory (`serve --dev`): there is no file behind it, so nothing to reload.
    pub in_memory: bool,
    /// Hex SHA-256 of the file's bytes, recorded in the `startup` audit record.
    pub sha256: String,
    pub server: ServerConfig,
    pub admin: Option<AdminConfig>,
    pub tokens: TokensConfig,
    pub audit: AuditConfig,
    pub state: StateConfig,
    /// Connectors in file order; look them up by name with [`Config::connector`].
    pub connectors: Vec<Arc<Connector>>,
    /// Clients in file order; look them up by id with [`Config::client`].
    pub clients: Vec<Arc<Client>>,
    connector_index: crate::ConfigMap<String, usize>,
    client_index: crate::ConfigMap<String, usize>,
}

/// A listener's certificate and key files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[server]`
#[derive(Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub tls: Option<TlsFiles>,
    /// Enables mTLS client authentication.
    pub client_ca: Option<PathBuf>,
    pub max_connections: usize,
    /// Request line plus headers; larger requests get 431.
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    /// The whole proxied request, upstream included.
    pub request_timeout: Duration,
}

/// `[admin]`
#[derive(Debug)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// SHA-256 of the admin bearer token.
    pub token_sha256: [u8; 32],
    pub tls: Option<TlsFiles>,
    /// Connections the admin listener serves at once (default 256); newcomers wait in the
    /// kernel's backlog meanwhile.
    pub max_connections: usize,
    /// Operators with admin tokens of their own (`[[admin.operators]]`).
    pub operators: Vec<Operator>,
}

/// An operator with an admin token of their own: the `actor` of the admin records of what
/// they ask is `<name>@<address>`, not `admin@<address>`.
#[derive(Debug)]
pub struct Operator {
    pub name: String,
    /// SHA-256 of the operator's admin bearer token.
    pub token_sha256: [u8; 32],
}

impl AdminConfig {
    /// Who presented the admin token with this SHA-256: `Some(None)` for the shared token
    /// (`token_sha256`), `Some(Some(name))` for an operator's, `None` for no admin token.
    /// Every configured hash is compared, in constant time, whichever matches.
    pub fn holder(&self, digest: &[u8; 32]) -> Option<Option<&str>> {
        use subtle::ConstantTimeEq;
        let mut found = None;
        if bool::from(digest.ct_eq(&self.token_sha256)) {
            found = Some(None);
        }
        for operator in &self.operators {
            if bool::from(digest.ct_eq(&operator.token_sha256)) {
                found = Some(Some(operator.name.as_str()));
            }
        }
        found
    }
}

/// A GCRA rate: `per_second` sustained, `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

/// `[tokens]`
#[derive(Debug)]
pub struct TokensConfig {
    pub issuer: String,
    /// Ed25519 PKCS#8 PEM; `None` means an ephemeral key (warned by `check`).
    pub signing_key: Option<PathBuf>,
    pub issue_rate_limit: Option<RateLimit>,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub leeway: Duration,
}

/// `[audit]`
#[derive(Debug)]
pub struct AuditConfig {
    pub path: PathBuf,
    pub fsync: FsyncPolicy,
    pub rotate_bytes: Option<u64>,
    /// The reference, kept so `check` can tell a `literal:` key.
    pub hmac_key_ref: Option<SecretRef>,
    pub hmac_key: Option<Secret>,
}

/// `[state]` (DESIGN §3.5, §7).
#[derive(Debug)]
pub struct StateConfig {
    /// Where the `memory` backend keeps revocations and disabled connectors.
    pub dir: PathBuf,
    pub backend: StateBackend,
    /// This process's name among replicas, written into every audit record as `replica`.
    pub replica: Option<String>,
}

/// Where revocations, disabled connectors, `max_uses` counters and rate limits live.
#[derive(Debug, Default)]
pub enum StateBackend {
    /// In this process (revocations and disabled connectors also in `state.dir`).
    #[default]
    Memory,
    /// In a Redis server shared by every replica.
    Redis {
        /// `redis://[user:password@]host[:port][/db]`; a secret, since it may hold a password.
        url: Secret,
        /// The reference, kept so `check` can tell a URL written into the file.
        url_ref: Option<SecretRef>,
    },
}

impl PartialEq for StateBackend {
    /// Compares the resolved URL bytes (in constant time; it may hold a password).
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Memory, Self::Memory) => true,
            (Self::Redis { url: a, .. }, Self::Redis { url: b, .. }) => a == b,
            _ => false,
        }
    }
}

/// One connector: an upstream API and the org-level credential the broker holds for it.
#[derive(Debug)]
pub struct Connector {
    pub name: String,
    pub owner: String,
    pub purpose: String,
    /// The instant from which the connector refuses every call: the day after a date-only
    /// `expires` (so `"2027-06-30"` is usable through that whole day, UTC).
    pub expires_at: DateTime<Utc>,
    /// `expires` as written, for display.
    pub expires_text: String,
    pub upstream: Upstream,
    pub upstream_ca: Option<PathBuf>,
    pub upstream_timeout: Duration,
    pub credential: Credential,
    pub auth: AuthMethod,
    pub rate_limit: Option<RateLimit>,
    pub upstream_request_id_header: Option<HeaderName>,
    pub operations: Vec<Operation>,
    pub router: OperationRouter,
}

/// The upstream's origin and optional base path, split once at load.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// As written, e.g. `https://api.github.com`.
    pub url: String,
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    /// Prefix for every forwarded path, without a trailing slash (often empty).
    pub base_path: String,
    /// Where `/{connector}` alone goes: the upstream's path as written, trailing slash
    /// included (`/` when it has none).
    pub root_path: String,
    /// Whether the host is a loopback address (the only case where `http://` is accepted).
    pub is_loopback: bool,
}

/// Where the connector's real credential comes from.
#[derive(Debug)]
pub enum Credential {
    /// A static secret, resolved at load (and re-read on reload).
    Static { reference: SecretRef, value: Secret },
    /// OAuth2 client credentials (DESIGN §3.7): the broker mints short access tokens.
    OAuth2(OAuth2Credential),
    /// A GitHub App (DESIGN §3.7): the broker mints installation tokens.
    GithubApp(GithubAppCredential),
}

/// `{ type = "oauth2_client_credentials", … }`, validated. The long-term secret is resolved at
/// load, so a reload re-reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OAuth2Credential {
    /// `https://…` (or `http://` on loopback).
    pub token_url: http::Uri,
    pub client_id: String,
    pub client_secret: Secret,
    pub scope: Option<String>,
    pub auth_method: OAuth2AuthMethod,
}

/// How the broker authenticates to the token endpoint (RFC 6749 §2.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OAuth2AuthMethod {
    /// HTTP Basic with the form-urlencoded id and secret (`client_secret_basic`, the default).
    Basic,
    /// `client_id` and `client_secret` in the form body (`client_secret_post`).
    Post,
}

/// `{ type = "github_app", … }`, validated: the private key is a parsable RSA PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GithubAppCredential {
    pub app_id: u64,
    pub installation_id: u64,
    /// PKCS#1 or PKCS#8 PEM.
    pub private_key: Secret,
    /// The API base without a trailing slash (`https://api.github.com` by default).
    pub api: String,
    /// Narrow the installation token to these repositories (names), if set.
    pub repositories: Option<Vec<String>>,
    /// Narrow the installation token to these permissions, if set.
    pub permissions: Option<BTreeMap<String, String>>,
}

/// How the credential is injected (DESIGN §3.8).
#[derive(Clone, Debug)]
pub enum AuthMethod {
    Bearer,
    Header { name: HeaderName, prefix: String },
    Basic { username: String },
    Query { name: String },
}

/// One allowlisted operation of a connector.
#[derive(Debug)]
pub struct Operation {
    pub name: String,
    pub method: Method,
    pub pattern: Pattern,
    /// Allowed query parameter names; `None` allows any.
    pub query: Option<Vec<String>>,
    pub max_body_bytes: u64,
}

/// An integration that may ask for tokens.
#[derive(Debug)]
pub struct Client {
    pub id: String,
    pub owner: String,
    pub secret_sha256: Option<[u8; 32]>,
    pub cert_san: Option<String>,
    pub rate_limit: Option<RateLimit>,
    pub grants: Vec<Grant>,
}

/// Operations of one connector granted to a client, possibly time-bound.
#[derive(Debug)]
pub struct Grant {
    pub connector: String,
    pub operations: Vec<String>,
    pub max_ttl: Option<Duration>,
    /// A time-bound elevation: the grant does not exist from this instant on.
    pub expires: Option<DateTime<Utc>>,
    pub reason: Option<String>,
}

/// What the auditor's commands (`audit verify`, `audit report`) need of a config file: the
/// chain key and the grants. Read without resolving any connector credential or loading any
/// key or certificate: checking the log must not need the organisation's upstream tokens.
#[derive(Debug)]
pub struct AuditorConfig {
    /// `audit.hmac_key`, resolved.
    pub hmac_key: Option<Secret>,
    /// Every client's grants, as written (expired ones included).
    pub grants: Vec<AuditorGrant>,
}

/// One `grants` entry of one client.
#[derive(Debug)]
pub struct AuditorGrant {
    pub client: String,
    pub connector: String,
    pub operations: Vec<String>,
    pub expires: Option<DateTime<Utc>>,
    pub reason: Option<String>,
}

impl AuditorConfig {
    /// Reads the file at `path`: TOML syntax, known keys, the grants, and — `with_key` —
    /// `audit.hmac_key` resolved (a report needs no key: an auditor without it, as §5
    /// advises keeping it off the host, still gets the least-privilege report).
    pub fn load(path: &Path, with_key: bool) -> Result<Self, ConfigErrors> {
        validate::parse_for_auditor(&read_config(path)?, path, with_key)
    }
}

/// The config file's text; an unreadable (or non-UTF-8) file is a one-error [`ConfigErrors`].
pub(crate) fn read_config(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError::new(
            path,
            None,
            "",
            format!("cannot read config: {e}"),
        )])
    })
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        Self::parse(&read_config(path)?, path)
    }

    /// Validates `text` as if read from `path` (relative paths resolve against its folder).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigErrors> {
        validate::parse(text, path)
    }

    pub fn connector(&self, name: &str) -> Option<&Arc<Connector>> {
        self.connector_index.get(name).map(|&i| &self.connectors[i])
    }

    pub fn client(&self, id: &str) -> Option<&Arc<Client>> {
        self.client_index.get(id).map(|&i| &self.clients[i])
    }
}

impl Connector {
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        now >= self.expires_at
    }

    pub fn operation(&self, name: &str) -> Option<&Operation> {
        self.operations.iter().find(|op| op.name == name)
    }
}

impl Client {
    /// The client's grants that still exist at `now` for `connector`.
    pub fn live_grants<'a>(
        &'a self,
        connector: &'a str,
        now: DateTime<Utc>,
    ) -> impl Iterator<Item = &'a Grant> + 'a {
        self.grants
            .iter()
            .filter(move |g| g.connector == connector && g.is_live(now))
    }

    /// The time-bound grant (break-glass elevation) this client holds `operation` on
    /// `connector` by at `now`: `None` when a standing grant gives it too (no elevation was
    /// needed), or nothing does.
    pub fn elevation<'a>(
        &'a self,
        connector: &'a str,
        operation: &str,
        now: DateTime<Utc>,
    ) -> Option<&'a Grant> {
        let covering = || {
            self.live_grants(connector, now)
                .filter(|g| g.operations.iter().any(|op| op == operation))
        };
        if covering().any(|g| g.expires.is_none()) {
            return None;
        }
        covering().next()
    }

    /// Whether a live grant gives this client `operation` on `connector`.
    pub fn is_granted(&self, connector: &str, operation: &str, now: DateTime<Utc>) -> bool {
        self.live_grants(connector, now)
            .any(|g| g.operations.iter().any(|op| op == operation))
    }
}

impl Grant {
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.expires.is_none_or(|e| now < e)
    }
}

/// One problem in a config file, located by file, line and key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(file: &Path, line: Option<usize>, key: &str, message: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            line,
            key: key.to_owned(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[cfg(test)]
mod tests;
