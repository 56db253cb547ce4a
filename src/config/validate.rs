//! Raw → validated conversion. Every check pushes an error with its line and key and carries
//! on, so one run of `check` reports every problem at once.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use http::{HeaderName, Method};
use sha2::{Digest, Sha256};
use toml::Spanned;

use super::raw::{self, RawConfig, S};
use super::{
    AdminConfig, AuditConfig, AuditorConfig, AuditorGrant, AuthMethod, Client, Config, ConfigError,
    ConfigErrors, Connector, Credential, Grant, Operation, Operator, RateLimit, ServerConfig,
    StateBackend, StateConfig, TlsFiles, TokensConfig, Upstream, DEFAULT_MAX_BODY_BYTES,
};
use crate::audit::FsyncPolicy;
use crate::policy::{OperationRouter, Pattern};
use crate::secret::{Secret, SecretRef};

/// Collects errors for one file and turns byte spans into line numbers.
pub(super) struct Ctx<'a> {
    pub file: &'a Path,
    pub base_dir: PathBuf,
    text: &'a str,
    pub errors: Vec<ConfigError>,
}

impl<'a> Ctx<'a> {
    pub fn new(text: &'a str, file: &'a Path) -> Self {
        let base_dir = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        Self {
            file,
            base_dir,
            text,
            errors: Vec::new(),
        }
    }

    /// 1-based line of a byte offset.
    pub fn line_of(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    pub fn err(&mut self, span: Option<Range<usize>>, key: &str, message: impl Into<String>) {
        let line = span.map(|s| self.line_of(&s));
        self.errors
            .push(ConfigError::new(self.file, line, key, message));
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.base_dir.join(p)
    }
}

pub(super) fn parse(text: &str, file: &Path) -> Result<Config, ConfigErrors> {
    let mut cx = Ctx::new(text, file);
    let Some(raw) = parse_toml(&mut cx, text) else {
        return Err(ConfigErrors(cx.errors));
    };
    let config = convert(&mut cx, raw, text);
    match config {
        Some(config) if cx.errors.is_empty() => Ok(config),
        _ => Err(ConfigErrors(cx.errors)),
    }
}

/// The file as TOML, every key known; a syntax error or an unknown key is recorded in `cx`.
fn parse_toml(cx: &mut Ctx<'_>, text: &str) -> Option<RawConfig> {
    match toml::from_str(text) {
        Ok(raw) => Some(raw),
        Err(e) => {
            // toml's message may span lines; `check` prints one finding a line.
            let message = without_values(e.message().trim()).replace('\n', "; ");
            let span = e.span();
            let key = span
                .as_ref()
                .map(|s| line_key(source_line(text, s.start)).to_owned())
                .unwrap_or_default();
            match missing_field(&message) {
                // serde names what is missing, and the parser points at the header of the
                // table that lacks it (or the line of an inline table's key) — or at nothing
                // (0..0) for a top-level table or key, which has no line to give. Inside a
                // multi-line array the line names no key, and the field alone is said.
                Some(field) => {
                    let top_level = span.as_ref().is_none_or(|s| s.is_empty() && s.start == 0);
                    let table = key.trim_start_matches('[').trim_end_matches(']');
                    let (span, full) = if top_level || table.is_empty() {
                        (span.filter(|_| !top_level), field.to_owned())
                    } else {
                        (span, format!("{table}.{field}"))
                    };
                    cx.err(span, &full, message.clone())
                }
                None => cx.err(span, &key, message),
            }
            None
        }
    }
}

/// The field named by serde's "missing field `x`", if that is the message.
fn missing_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")?
        .strip_suffix('`')
        .filter(|f| !f.is_empty() && !f.contains('`'))
}

/// The auditor's part of the file ([`AuditorConfig`]): the same syntax and key checks, then
/// only the grants read and, `with_key`, `audit.hmac_key` resolved.
pub(super) fn parse_for_auditor(
    text: &str,
    file: &Path,
    with_key: bool,
) -> Result<AuditorConfig, ConfigErrors> {
    let mut cx = Ctx::new(text, file);
    let Some(raw) = parse_toml(&mut cx, text) else {
        return Err(ConfigErrors(cx.errors));
    };
    let hmac_key = if with_key {
        audit(&mut cx, &raw.audit).and_then(|a| a.hmac_key)
    } else {
        None
    };
    let mut grants = Vec::new();
    for client in &raw.clients {
        for (i, g) in client.grants.iter().enumerate() {
            let key = format!("clients[{}].grants[{i}]", client.id.get_ref());
            let Ok(expires) = grant_expiry(&mut cx, g.get_ref(), Some(g.span()), &key) else {
                continue;
            };
            let g = g.get_ref();
            grants.push(AuditorGrant {
                client: client.id.get_ref().clone(),
                connector: g.connector.clone(),
                operations: g.operations.clone(),
                expires,
                reason: g.reason.clone(),
            });
        }
    }
    if cx.errors.is_empty() {
        Ok(AuditorConfig { hmac_key, grants })
    } else {
        Err(ConfigErrors(cx.errors))
    }
}

/// The trimmed text of the line holding `offset`: shows the key a parse error is about.
fn source_line(text: &str, offset: usize) -> &str {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    text[start..end].trim()
}

/// What of a source line an error may quote: the key before `=`, or a `[table]` header —
/// never a value. A value may be a secret pasted where a reference belongs (a mistyped key,
/// a wrong type), and the message goes to `check`'s output, the log, the admin API's answer
/// and an `admin` audit record.
pub(super) fn line_key(line: &str) -> &str {
    if line.starts_with('[') {
        // The header itself, not a comment after it.
        return match line.find(']') {
            Some(i) if line[i + 1..].starts_with(']') => &line[..i + 2],
            Some(i) => &line[..i + 1],
            // An unclosed header (the very error being reported): up to any comment.
            None => line.split('#').next().unwrap_or_default().trim_end(),
        };
    }
    // Only what looks like a key: a line inside a multi-line value (`  "c2VjcmV0=",`) has
    // an `=` too, and what comes before it is a value.
    let Some((key, rest)) = line.split_once('=') else {
        return "";
    };
    // After a key's `=` comes its value; base64 padding (`c2VjcmV0==`) ends in `=`s.
    let rest = rest.trim_start();
    if rest.is_empty() || rest.starts_with('=') {
        return "";
    }
    let key = key.trim();
    let key_chars = key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '"' | '\'' | ' '));
    let balanced = key.matches('"').count() % 2 == 0 && key.matches('\'').count() % 2 == 0;
    if !key.is_empty() && key_chars && balanced {
        key
    } else {
        ""
    }
}

/// serde's message with every value it quotes hidden, for the same reason as [`line_key`]:
/// `invalid type: string "ghp_…", expected …` becomes `invalid type: string "…", expected …`,
/// and `integer`, `boolean` … values and an unknown variant (a `type = "…"` value) shown in
/// backquotes go too. Names in backquotes (an unknown field's, the expected variants) stay:
/// they are what the reader needs.
pub(super) fn without_values(message: &str) -> String {
    const VALUE_KINDS: [&str; 4] = ["integer", "floating point", "boolean", "character"];
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                out.push_str("\"…\"");
                // Skip to the closing quote (serde escapes quotes inside with a backslash).
                let mut escaped = false;
                for c in chars.by_ref() {
                    match c {
                        '\\' if !escaped => escaped = true,
                        '"' if !escaped => break,
                        _ => escaped = false,
                    }
                }
            }
            '`' => {
                let name: String = chars.by_ref().take_while(|&c| c != '`').collect();
                let is_value = VALUE_KINDS.iter().any(|k| out.ends_with(&format!("{k} ")))
                    || out.ends_with("unknown variant ");
                if is_value {
                    out.push('…');
                } else {
                    out.push('`');
                    out.push_str(&name);
                    out.push('`');
                }
            }
            c => out.push(c),
        }
    }
    out
}

fn convert(cx: &mut Ctx<'_>, raw: RawConfig, text: &str) -> Option<Config> {
    let server = server(cx, &raw.server);
    let admin = raw.admin.as_ref().and_then(|a| admin(cx, a));
    if let (Some(server), Some(admin), Some(raw_admin)) = (&server, &admin, &raw.admin) {
        if listeners_collide(server.listen, admin.listen) {
            cx.err(
                Some(raw_admin.listen.span()),
                "admin.listen",
                "the admin listener must not share the proxy listener's address and port",
            );
        }
    }
    let tokens = tokens(cx, &raw.tokens);
    let audit = audit(cx, &raw.audit);
    let state = state(cx, &raw.state);
    let connectors = connectors(cx, &raw.connectors);
    let clients = clients(cx, &raw.clients, &raw.connectors, tokens.as_ref());

    let connector_index = index(connectors.iter().map(|c| c.name.clone()));
    let client_index = index(clients.iter().map(|c| c.id.clone()));
    Some(Config {
        path: cx.file.to_path_buf(),
        in_memory: false,
        sha256: hex::encode(Sha256::digest(text.as_bytes())),
        server: server?,
        admin,
        tokens: tokens?,
        audit: audit?,
        state: state?,
        connectors,
        clients,
        connector_index,
        client_index,
    })
}

/// Whether two listeners would bind the same port on an overlapping address (the same one,
/// or either on all addresses).
fn listeners_collide(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn index(names: impl Iterator<Item = String>) -> crate::ConfigMap<String, usize> {
    names.enumerate().map(|(i, n)| (n, i)).collect()
}

fn server(cx: &mut Ctx<'_>, raw: &raw::RawServer) -> Option<ServerConfig> {
    let listen = socket_addr(cx, &raw.listen, "server.listen");
    let tls = tls_files(cx, &raw.tls_cert, &raw.tls_key, "server");
    let client_ca = raw.client_ca.as_ref().map(|p| cx.path(p.get_ref()));
    if client_ca.is_some() && tls.is_none() {
        cx.err(
            raw.client_ca.as_ref().map(|s| s.span()),
            "server.client_ca",
            "mTLS needs tls_cert and tls_key",
        );
    }
    let max_header_bytes = positive(cx, &raw.max_header_bytes, "server.max_header_bytes", 16384);
    let max_connections =
        connection_limit(cx, &raw.max_connections, "server.max_connections", 10000);
    Some(ServerConfig {
        listen: listen?,
        tls,
        client_ca,
        max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
        max_header_bytes: usize::try_from(max_header_bytes).unwrap_or(usize::MAX),
        header_read_timeout: duration(
            cx,
            &raw.header_read_timeout,
            "server.header_read_timeout",
            10,
        )?,
        request_timeout: duration(cx, &raw.request_timeout, "server.request_timeout", 60)?,
    })
}

fn admin(cx: &mut Ctx<'_>, raw: &raw::RawAdmin) -> Option<AdminConfig> {
    let listen = socket_addr(cx, &raw.listen, "admin.listen");
    let tls = tls_files(cx, &raw.tls_cert, &raw.tls_key, "admin");
    let token_sha256 = sha256_hex(cx, &raw.token_sha256, "admin.token_sha256");
    if token_sha256.is_some_and(|hash| is_well_known(&hash)) {
        // The value is not named: it may be the token someone meant to use.
        cx.err(
            Some(raw.token_sha256.span()),
            "admin.token_sha256",
            "is the SHA-256 of an empty or well-known token (anyone could use the admin API: \
             reload, revoke, the kill switch); use a long random token, e.g. \
             `openssl rand -hex 32`",
        );
    }
    let max_connections = connection_limit(cx, &raw.max_connections, "admin.max_connections", 256);
    let operators = operators(cx, &raw.operators, token_sha256);
    Some(AdminConfig {
        listen: listen?,
        token_sha256: token_sha256?,
        tls,
        max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
        operators: operators?,
    })
}

/// `[[admin.operators]]`: each a name the admin records can carry (letters, digits, `.`, `_`,
/// `-`; not `admin`, the shared token's) and a token of its own — one that no other operator,
/// nor the shared token, has: one token, one actor.
fn operators(
    cx: &mut Ctx<'_>,
    raw: &[raw::RawOperator],
    shared: Option<[u8; 32]>,
) -> Option<Vec<Operator>> {
    let mut operators = Vec::with_capacity(raw.len());
    let mut ok = true;
    let mut taken: Vec<[u8; 32]> = shared.into_iter().collect();
    for (i, op) in raw.iter().enumerate() {
        let key = format!("admin.operators[{i}]");
        let name = op.name.get_ref();
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        let reserved = ["admin", crate::admin::REFUSED_ACTOR]
            .iter()
            .any(|r| name.eq_ignore_ascii_case(r));
        if !valid || reserved {
            cx.err(
                Some(op.name.span()),
                &format!("{key}.name"),
                "must be 1 to 64 letters, digits, '.', '_' or '-', and neither \"admin\" (the \
                 shared token's actor) nor \"anonymous\" (a refused request's)",
            );
            ok = false;
        } else if operators
            .iter()
            .any(|o: &Operator| o.name.eq_ignore_ascii_case(name))
        {
            // Names differing only in case would read as one person in the log.
            cx.err(
                Some(op.name.span()),
                &format!("{key}.name"),
                format!("duplicate operator name {name:?}"),
            );
            ok = false;
        }
        let hash = sha256_hex(cx, &op.token_sha256, &format!("{key}.token_sha256"));
        let Some(hash) = hash else {
            ok = false;
            continue;
        };
        if is_well_known(&hash) {
            cx.err(
                Some(op.token_sha256.span()),
                &format!("{key}.token_sha256"),
                "is the SHA-256 of an empty or well-known token; use a long random token, \
                 e.g. `openssl rand -hex 32`",
            );
            ok = false;
        } else if taken.contains(&hash) {
            // Not which one: the hash names a token.
            cx.err(
                Some(op.token_sha256.span()),
                &format!("{key}.token_sha256"),
                "is another admin identity's token too (the shared token or another \
                 operator's): each operator needs a token of their own",
            );
            ok = false;
        }
        taken.push(hash);
        operators.push(Operator {
            name: name.clone(),
            token_sha256: hash,
        });
    }
    ok.then_some(operators)
}

fn tokens(cx: &mut Ctx<'_>, raw: &raw::RawTokens) -> Option<TokensConfig> {
    let issuer = raw
        .issuer
        .as_ref()
        .map_or_else(|| "credbroker".to_owned(), |s| s.get_ref().clone());
    if issuer.is_empty() {
        cx.err(
            raw.issuer.as_ref().map(|s| s.span()),
            "tokens.issuer",
            "must not be empty",
        );
    }
    let default_ttl = duration(cx, &raw.default_ttl, "tokens.default_ttl", 300);
    let max_ttl = duration(cx, &raw.max_ttl, "tokens.max_ttl", 900);
    // No allowance for clock skew ("0s") is a legitimate choice for a broker whose tokens
    // are checked by the same clock that issued them.
    let leeway = duration_or_zero(cx, &raw.leeway, "tokens.leeway", 5);
    let (default_ttl, max_ttl, leeway) = (default_ttl?, max_ttl?, leeway?);
    // Token lifetimes are whole seconds: less would be silently taken as 1 s.
    for (value, key, raw_value) in [
        (default_ttl, "tokens.default_ttl", &raw.default_ttl),
        (max_ttl, "tokens.max_ttl", &raw.max_ttl),
    ] {
        if value < Duration::from_secs(1) {
            cx.err(
                raw_value.as_ref().map(|s| s.span()),
                key,
                "must be at least 1s",
            );
        }
        // Tokens are short-lived by design; a lifetime of centuries would also put `exp` past
        // what the token's and the audit record's times can say.
        if value > MAX_TOKEN_LIFETIME {
            cx.err(
                raw_value.as_ref().map(|s| s.span()),
                key,
                "must be at most 3653 days (ten years)",
            );
        }
    }
    if default_ttl > max_ttl {
        cx.err(
            raw.default_ttl.as_ref().map(|s| s.span()),
            "tokens.default_ttl",
            "is longer than tokens.max_ttl",
        );
    }
    if leeway > Duration::from_secs(300) {
        cx.err(
            raw.leeway.as_ref().map(|s| s.span()),
            "tokens.leeway",
            "must be at most 5m: a larger clock skew allowance keeps expired tokens alive",
        );
    }
    Some(TokensConfig {
        issuer,
        signing_key: raw.signing_key.as_ref().map(|p| cx.path(p.get_ref())),
        issue_rate_limit: raw
            .issue_rate_limit
            .as_ref()
            .and_then(|r| rate_limit(cx, r, "tokens.issue_rate_limit")),
        default_ttl,
        max_ttl,
        leeway,
    })
}

fn audit(cx: &mut Ctx<'_>, raw: &raw::RawAudit) -> Option<AuditConfig> {
    let fsync = match raw.fsync.as_ref().map(|s| s.get_ref().as_str()) {
        None | Some("always") => Some(FsyncPolicy::Always),
        Some("interval") => Some(FsyncPolicy::Interval),
        Some("never") => Some(FsyncPolicy::Never),
        Some(_) => {
            cx.err(
                raw.fsync.as_ref().map(|s| s.span()),
                "audit.fsync",
                "must be one of always, interval, never",
            );
            None
        }
    };
    if let Some(r) = &raw.rotate_bytes {
        if *r.get_ref() < 4096 {
            cx.err(
                Some(r.span()),
                "audit.rotate_bytes",
                "must be at least 4096",
            );
        }
    }
    let (hmac_key_ref, hmac_key) = match &raw.hmac_key {
        Some(s) => match secret(cx, s, "audit.hmac_key") {
            // Anyone can compute an HMAC with an empty key: it would protect nothing.
            Some((_, v)) if v.is_empty() => {
                cx.err(Some(s.span()), "audit.hmac_key", "the key is empty");
                (None, None)
            }
            Some((r, v)) => (Some(r), Some(v)),
            None => (None, None),
        },
        None => (None, None),
    };
    Some(AuditConfig {
        path: cx.path(raw.path.get_ref()),
        fsync: fsync?,
        rotate_bytes: raw.rotate_bytes.as_ref().map(|r| *r.get_ref()),
        hmac_key_ref,
        hmac_key,
    })
}

fn state(cx: &mut Ctx<'_>, raw: &raw::RawState) -> Option<StateConfig> {
    let backend = match raw.backend.as_ref().map(|b| b.get_ref().as_str()) {
        None | Some("memory") => {
            if let Some(url) = &raw.url {
                cx.err(
                    Some(url.span()),
                    "state.url",
                    "only used with backend = \"redis\"",
                );
            }
            Some(StateBackend::Memory)
        }
        Some("redis") => redis_backend(cx, raw),
        Some(_) => {
            cx.err(
                raw.backend.as_ref().map(|b| b.span()),
                "state.backend",
                "must be one of memory, redis",
            );
            None
        }
    };
    let replica = match &raw.replica {
        Some(r) if !is_replica_name(r.get_ref()) => {
            cx.err(
                Some(r.span()),
                "state.replica",
                "must be 1 to 64 characters of A-Z a-z 0-9 . _ -",
            );
            None
        }
        Some(r) => Some(r.get_ref().clone()),
        // Replicas sharing state need telling apart in their audit records.
        None if matches!(backend, Some(StateBackend::Redis { .. })) => host_name(),
        None => None,
    };
    let dir = raw
        .dir
        .as_ref()
        .map_or_else(|| cx.path("state"), |d| cx.path(d.get_ref()));
    Some(StateConfig {
        dir,
        backend: backend?,
        replica,
    })
}

/// `backend = "redis"`: `url` is required, written as `redis://…` or as a secret reference
/// (`env:`/`file:`) to one, since a Redis URL may carry a password.
fn redis_backend(cx: &mut Ctx<'_>, raw: &raw::RawState) -> Option<StateBackend> {
    let Some(url) = &raw.url else {
        cx.err(None, "state.url", "required with backend = \"redis\"");
        return None;
    };
    let is_reference = ["env:", "file:", "literal:"]
        .iter()
        .any(|p| url.get_ref().starts_with(p));
    let (url_ref, value) = if !is_reference {
        (None, Secret::new(url.get_ref().as_bytes()))
    } else {
        let (r, v) = secret(cx, url, "state.url")?;
        (Some(r), v)
    };
    // The value is never quoted: it may hold a password.
    if let Err(why) = crate::state::redis::check_url(value.expose()) {
        cx.err(Some(url.span()), "state.url", why);
        return None;
    }
    Some(StateBackend::Redis {
        url: value,
        url_ref,
    })
}

fn is_replica_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The host's name (Linux), the default `replica` of a shared-state broker.
fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    is_replica_name(name).then(|| name.to_owned())
}

fn connectors(cx: &mut Ctx<'_>, raws: &[raw::RawConnector]) -> Vec<Arc<Connector>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for raw in raws {
        let key = format!("connectors[{}]", raw.name.get_ref());
        if !seen.insert(raw.name.get_ref().clone()) {
            cx.err(Some(raw.name.span()), &key, "duplicate connector name");
            continue;
        }
        if let Some(c) = connector(cx, raw, &key) {
            out.push(Arc::new(c));
        }
    }
    out
}

fn connector(cx: &mut Ctx<'_>, raw: &raw::RawConnector, key: &str) -> Option<Connector> {
    let name = raw.name.get_ref();
    if !is_connector_name(name) {
        cx.err(
            Some(raw.name.span()),
            &format!("{key}.name"),
            "must be 1-64 characters of a-z, A-Z, 0-9, '-', '_' (it is the proxy path prefix)",
        );
    } else if RESERVED_CONNECTOR_NAMES.contains(&name.as_str()) {
        cx.err(
            Some(raw.name.span()),
            &format!("{key}.name"),
            format!("`{name}` is reserved: /{name}/… is served by the broker itself"),
        );
    }
    required(cx, &raw.owner, &format!("{key}.owner"));
    required(cx, &raw.purpose, &format!("{key}.purpose"));
    let expires_at = expiry(cx, &raw.expires, &format!("{key}.expires"));
    let upstream = upstream(cx, &raw.upstream, &format!("{key}.upstream"));
    let upstream_timeout = duration(
        cx,
        &raw.upstream_timeout,
        &format!("{key}.upstream_timeout"),
        30,
    );
    let credential = credential(cx, &raw.credential, &format!("{key}.credential"));
    let auth = auth(cx, raw.auth.as_ref(), &format!("{key}.auth"));
    // What `serve` will do with a static credential, done now: one it cannot send as `auth`
    // says (a control byte in a header value, say a CRLF file or an env value with a
    // newline) is a config error, not a start-up failure after `check` said yes.
    if let (Some(Credential::Static { value, .. }), Some(auth)) = (&credential, &auth) {
        if crate::proxy::inject::Injection::new(auth, value).is_err() {
            cx.err(
                Some(raw.credential.span()),
                &format!("{key}.credential"),
                "the credential cannot be sent as `auth` says: it holds a byte a header value \
                 may not carry (a control character such as CR or LF)",
            );
        }
    }
    let rate_limit = raw
        .rate_limit
        .as_ref()
        .and_then(|r| rate_limit(cx, r, &format!("{key}.rate_limit")));
    let upstream_request_id_header = raw.upstream_request_id_header.as_ref().and_then(|h| {
        header_name(
            cx,
            h.get_ref(),
            Some(h.span()),
            &format!("{key}.upstream_request_id_header"),
        )
    });
    let (operations, router) = operations(cx, &raw.operations, key);
    Some(Connector {
        name: name.clone(),
        owner: raw.owner.get_ref().clone(),
        purpose: raw.purpose.get_ref().clone(),
        expires_at: expires_at?,
        expires_text: raw.expires.get_ref().clone(),
        upstream: upstream?,
        upstream_ca: raw.upstream_ca.as_ref().map(|p| cx.path(p.get_ref())),
        upstream_timeout: upstream_timeout?,
        credential: credential?,
        auth: auth?,
        rate_limit,
        upstream_request_id_header,
        operations,
        router,
    })
}

/// Path prefixes the proxy listener serves itself (`/oauth2/token`); a connector of that name
/// would be shadowed there. (`.well-known` is not a valid connector name anyway.)
const RESERVED_CONNECTOR_NAMES: [&str; 1] = ["oauth2"];

fn is_connector_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn operations(
    cx: &mut Ctx<'_>,
    raws: &[raw::RawOperation],
    connector_key: &str,
) -> (Vec<Operation>, OperationRouter) {
    let mut router = OperationRouter::new();
    let mut ops = Vec::new();
    let mut seen = HashSet::new();
    for raw in raws {
        let key = format!("{connector_key}.operations[{}]", raw.name.get_ref());
        // A scope item is `connector:operation` and a scope is split on whitespace: a name
        // with any whitespace (a tab, too) would be read back as other operations.
        let name = raw.name.get_ref();
        if name.is_empty()
            || name.contains(':')
            || name.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            cx.err(
                Some(raw.name.span()),
                &key,
                "operation name must be non-empty, without whitespace, control characters or ':'",
            );
        }
        if !seen.insert(raw.name.get_ref().clone()) {
            cx.err(
                Some(raw.name.span()),
                &key,
                "duplicate operation name in this connector",
            );
            continue;
        }
        let method = match Method::from_bytes(raw.method.get_ref().as_bytes()) {
            // CONNECT would open a tunnel past every check, and TRACE has the upstream echo
            // the request back, injected credential included.
            Ok(m) if m == Method::CONNECT || m == Method::TRACE => {
                cx.err(
                    Some(raw.method.span()),
                    &format!("{key}.method"),
                    if m == Method::CONNECT {
                        "CONNECT cannot be proxied: it opens a tunnel past every check"
                    } else {
                        "TRACE cannot be proxied: the upstream would echo the injected credential"
                    },
                );
                None
            }
            Ok(m) if raw.method.get_ref().bytes().all(|b| b.is_ascii_uppercase()) => Some(m),
            _ => {
                cx.err(
                    Some(raw.method.span()),
                    &format!("{key}.method"),
                    "must be an upper-case HTTP method such as GET or POST",
                );
                None
            }
        };
        let pattern = match Pattern::parse(raw.path.get_ref()) {
            Ok(p) => Some(p),
            Err(e) => {
                cx.err(
                    Some(raw.path.span()),
                    &format!("{key}.path"),
                    format!("invalid pattern: {e}"),
                );
                None
            }
        };
        let query = raw.query.as_ref().map(|names| query_names(cx, names, &key));
        let (Some(method), Some(pattern)) = (method, pattern) else {
            continue;
        };
        router.insert(method.clone(), &pattern, ops.len());
        ops.push(Operation {
            name: raw.name.get_ref().clone(),
            method,
            pattern,
            query,
            max_body_bytes: raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES),
        });
    }
    (ops, router)
}

/// An operation's allowed query parameter names. A name is compared with the request's names
/// as sent, byte for byte, so one that no request the canonical check lets through can carry
/// (empty, holding a separator, or a byte the check refuses, or `access_token`) would
/// quietly never match: that is an error, as a pattern that cannot match would be.
fn query_names(cx: &mut Ctx<'_>, names: &[S], op_key: &str) -> Vec<String> {
    // The entry is named by its position, not quoted: a value pasted into the list (an
    // `api_key=…` meant as a restriction) is not echoed.
    for (i, name) in names.iter().enumerate() {
        let n = name.get_ref();
        let unusable = n.is_empty()
            || n.bytes().any(|b| matches!(b, b'&' | b';' | b'='))
            || crate::proxy::canonical::check_query(n).is_err();
        if unusable {
            cx.err(
                Some(name.span()),
                &format!("{op_key}.query[{i}]"),
                "can never match a request's parameter name: names are compared as sent, \
                 without decoding, and hold no '&', ';', '=', '#', space, control or non-ASCII \
                 byte; access_token is always refused",
            );
        }
    }
    names.iter().map(|n| n.get_ref().clone()).collect()
}

fn clients(
    cx: &mut Ctx<'_>,
    raws: &[raw::RawClient],
    connectors: &[raw::RawConnector],
    tokens: Option<&TokensConfig>,
) -> Vec<Arc<Client>> {
    // Grants are checked against the file's names, so a connector with errors of its own does
    // not also show up as "unknown" in every grant that names it; a duplicated connector
    // counts with the operations of all its copies (the duplicate is the one error to report).
    let mut by_name: HashMap<&str, HashSet<&str>> = HashMap::new();
    for c in connectors {
        by_name
            .entry(c.name.get_ref().as_str())
            .or_default()
            .extend(c.operations.iter().map(|o| o.name.get_ref().as_str()));
    }
    let mut seen = HashSet::new();
    let mut sans = HashSet::new();
    let mut out = Vec::new();
    for raw in raws {
        let key = format!("clients[{}]", raw.id.get_ref());
        // One certificate identity, one client: otherwise the holder of the certificate
        // could pick either client with `client_id`.
        if let Some(san) = &raw.cert_san {
            // A DNS name (no `:`) matches whatever its case (see `PeerIdentity::has_san`).
            let identity = match san.get_ref().contains(':') {
                true => san.get_ref().clone(),
                false => san.get_ref().to_ascii_lowercase(),
            };
            if !sans.insert(identity) {
                cx.err(
                    Some(san.span()),
                    &format!("{key}.cert_san"),
                    "another client has the same cert_san",
                );
            }
        }
        let id = raw.id.get_ref();
        if id.is_empty() || id.contains(':') || id.chars().any(char::is_control) {
            cx.err(
                Some(raw.id.span()),
                &key,
                "client id must be non-empty and contain no ':' or control character",
            );
        }
        if !seen.insert(raw.id.get_ref().clone()) {
            cx.err(Some(raw.id.span()), &key, "duplicate client id");
            continue;
        }
        required(cx, &raw.owner, &format!("{key}.owner"));
        let secret_sha256 = raw
            .secret_sha256
            .as_ref()
            .and_then(|s| sha256_hex(cx, s, &format!("{key}.secret_sha256")));
        if raw.secret_sha256.is_none() && raw.cert_san.is_none() {
            cx.err(
                Some(raw.id.span()),
                &key,
                "a client needs secret_sha256 or cert_san to authenticate",
            );
        }
        let grants = raw
            .grants
            .iter()
            .enumerate()
            .filter_map(|(i, g)| grant(cx, g, &format!("{key}.grants[{i}]"), &by_name, tokens))
            .collect();
        out.push(Arc::new(Client {
            id: raw.id.get_ref().clone(),
            owner: raw.owner.get_ref().clone(),
            secret_sha256,
            cert_san: raw.cert_san.as_ref().map(|s| s.get_ref().clone()),
            rate_limit: raw
                .rate_limit
                .as_ref()
                .and_then(|r| rate_limit(cx, r, &format!("{key}.rate_limit"))),
            grants,
        }));
    }
    out
}

fn grant(
    cx: &mut Ctx<'_>,
    spanned: &Spanned<raw::RawGrant>,
    key: &str,
    connectors: &HashMap<&str, HashSet<&str>>,
    tokens: Option<&TokensConfig>,
) -> Option<Grant> {
    let raw = spanned.get_ref();
    let span = Some(spanned.span());
    match connectors.get(raw.connector.as_str()) {
        None => cx.err(
            span.clone(),
            key,
            format!("unknown connector `{}`", raw.connector),
        ),
        Some(ops) => {
            for op in &raw.operations {
                if !ops.contains(op.as_str()) {
                    cx.err(
                        span.clone(),
                        key,
                        format!("connector `{}` has no operation `{op}`", raw.connector),
                    );
                }
            }
        }
    }
    let max_ttl = match &raw.max_ttl {
        Some(t) => match humantime::parse_duration(t) {
            Ok(d) => {
                if tokens.is_some_and(|tk| d > tk.max_ttl) {
                    cx.err(
                        span.clone(),
                        &format!("{key}.max_ttl"),
                        "is above tokens.max_ttl",
                    );
                }
                // Token lifetimes are whole seconds: less would be silently taken as 1 s.
                if d < std::time::Duration::from_secs(1) {
                    cx.err(
                        span.clone(),
                        &format!("{key}.max_ttl"),
                        "must be at least 1s",
                    );
                }
                Some(d)
            }
            Err(e) => {
                cx.err(
                    span.clone(),
                    &format!("{key}.max_ttl"),
                    format!("invalid duration: {e}"),
                );
                None
            }
        },
        None => None,
    };
    let expires = grant_expiry(cx, raw, span, key).ok()?;
    Some(Grant {
        connector: raw.connector.clone(),
        operations: raw.operations.clone(),
        max_ttl,
        expires,
        reason: raw.reason.clone(),
    })
}

/// A grant's `expires` (RFC 3339), or an error at `key.expires` (`Err`) when it does not parse.
fn grant_expiry(
    cx: &mut Ctx<'_>,
    raw: &raw::RawGrant,
    span: Option<Range<usize>>,
    key: &str,
) -> Result<Option<DateTime<Utc>>, ()> {
    let Some(text) = &raw.expires else {
        return Ok(None);
    };
    DateTime::parse_from_rfc3339(text)
        .map(|d| Some(d.with_timezone(&Utc)))
        .map_err(|e| {
            cx.err(
                span,
                &format!("{key}.expires"),
                format!("not an RFC 3339 time: {e}"),
            )
        })
}

fn credential(
    cx: &mut Ctx<'_>,
    raw: &Spanned<raw::RawCredential>,
    key: &str,
) -> Option<Credential> {
    match raw.get_ref() {
        raw::RawCredential::Reference(r) => {
            let (reference, value) = resolve_secret(cx, r, Some(raw.span()), key)?;
            if value.is_empty() {
                cx.err(Some(raw.span()), key, "the credential is empty");
                return None;
            }
            Some(Credential::Static { reference, value })
        }
        raw::RawCredential::Dynamic(d) => super::dynamic::credential(cx, d, raw.span(), key),
    }
}

fn auth(cx: &mut Ctx<'_>, raw: Option<&Spanned<raw::RawAuth>>, key: &str) -> Option<AuthMethod> {
    let Some(raw) = raw else {
        return Some(AuthMethod::Bearer);
    };
    let span = Some(raw.span());
    Some(match raw.get_ref() {
        raw::RawAuth::Bearer {} => AuthMethod::Bearer,
        raw::RawAuth::Header { name, prefix } => {
            let name = header_name(cx, name, span.clone(), &format!("{key}.name"))?;
            if is_reserved_header(&name) {
                cx.err(
                    span,
                    &format!("{key}.name"),
                    "cannot inject into a hop-by-hop or framing header, or one the broker \
                     sets itself (Host, Via, X-Request-Id, X-Forwarded-For, X-Forwarded-Proto)",
                );
                return None;
            }
            if http::HeaderValue::from_str(prefix).is_err() {
                cx.err(span, &format!("{key}.prefix"), "must be visible ASCII");
                return None;
            }
            AuthMethod::Header {
                name,
                prefix: prefix.clone(),
            }
        }
        raw::RawAuth::Basic { username } => {
            if username.contains(':') || username.bytes().any(|b| b.is_ascii_control()) {
                cx.err(
                    span,
                    &format!("{key}.username"),
                    "must not contain ':' or control characters",
                );
                return None;
            }
            AuthMethod::Basic {
                username: username.clone(),
            }
        }
        raw::RawAuth::Query { name } => {
            if name.is_empty() {
                cx.err(span, &format!("{key}.name"), "must not be empty");
                return None;
            }
            AuthMethod::Query { name: name.clone() }
        }
    })
}

/// Headers the broker manages itself; injecting a credential into them would be lost or unsafe.
fn is_reserved_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "host"
            | "connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-connection"
            | "content-length"
            | "x-request-id"
            | "x-forwarded-for"
            | "x-forwarded-proto"
            | "via"
    )
}

fn upstream(cx: &mut Ctx<'_>, raw: &S, key: &str) -> Option<Upstream> {
    let text = raw.get_ref();
    let span = Some(raw.span());
    let uri: http::Uri = match text.parse() {
        Ok(u) => u,
        Err(e) => {
            cx.err(span, key, format!("not a URL: {e}"));
            return None;
        }
    };
    let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned()) else {
        cx.err(span, key, "must be an absolute http(s) URL");
        return None;
    };
    if uri.query().is_some() || authority.as_str().contains('@') {
        cx.err(span, key, "must not contain a query or user info");
        return None;
    }
    let is_loopback = is_loopback_host(authority.host());
    match scheme.as_str() {
        "https" => {}
        "http" if is_loopback => {}
        "http" => {
            cx.err(
                span,
                key,
                "an http:// upstream must be a loopback address; use https://",
            );
            return None;
        }
        other => {
            cx.err(span, key, format!("unsupported scheme `{other}`"));
            return None;
        }
    }
    // The base path is sent as written, in front of every path the checks passed (DESIGN
    // §4.3): it is held to the same canonical form, so `..` or `//` in the config cannot move
    // calls elsewhere on the upstream. A fragment would be dropped silently.
    if text.contains('#') {
        cx.err(span, key, "must not contain a fragment (`#`)");
        return None;
    }
    let base_path = match canonical_base_path(&uri) {
        Ok(base) => base.to_owned(),
        Err(e) => {
            cx.err(span, key, e);
            return None;
        }
    };
    Some(Upstream {
        url: text.clone(),
        scheme,
        authority,
        base_path,
        root_path: uri.path().to_owned(),
        is_loopback,
    })
}

/// The path of a URL that request paths are appended to (an upstream, a GitHub `api`),
/// without its trailing `/`, held to the canonical form of request paths; the error is the
/// finding's text.
pub(super) fn canonical_base_path(uri: &http::Uri) -> Result<&str, String> {
    let base = uri.path().trim_end_matches('/');
    if !base.is_empty() {
        crate::proxy::canonical::check_path(base)
            .map_err(|e| format!("the base path is not canonical: {e}"))?;
    }
    Ok(base)
}

/// `localhost`, `127.0.0.0/8` or `[::1]`.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn expiry(cx: &mut Ctx<'_>, raw: &S, key: &str) -> Option<DateTime<Utc>> {
    let text = raw.get_ref();
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        // Usable through the whole named day (UTC): expired from the next midnight.
        return date
            .succ_opt()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|t| t.and_utc());
    }
    match DateTime::parse_from_rfc3339(text) {
        Ok(t) => Some(t.with_timezone(&Utc)),
        Err(_) => {
            cx.err(
                Some(raw.span()),
                key,
                "must be a date (2027-06-30) or an RFC 3339 time",
            );
            None
        }
    }
}

fn required(cx: &mut Ctx<'_>, raw: &S, key: &str) {
    if raw.get_ref().trim().is_empty() {
        cx.err(Some(raw.span()), key, "is required and must not be empty");
    }
}

fn socket_addr(cx: &mut Ctx<'_>, raw: &S, key: &str) -> Option<SocketAddr> {
    match raw.get_ref().parse() {
        Ok(a) => Some(a),
        Err(_) => {
            cx.err(
                Some(raw.span()),
                key,
                "must be IP:PORT, e.g. 127.0.0.1:8443",
            );
            None
        }
    }
}

fn tls_files(
    cx: &mut Ctx<'_>,
    cert: &Option<S>,
    key: &Option<S>,
    section: &str,
) -> Option<TlsFiles> {
    match (cert, key) {
        (Some(c), Some(k)) => Some(TlsFiles {
            cert: cx.path(c.get_ref()),
            key: cx.path(k.get_ref()),
        }),
        (None, None) => None,
        (Some(s), None) | (None, Some(s)) => {
            cx.err(Some(s.span()), section, "tls_cert and tls_key go together");
            None
        }
    }
}

fn positive(cx: &mut Ctx<'_>, raw: &Option<Spanned<u64>>, key: &str, default: u64) -> u64 {
    match raw {
        Some(v) if *v.get_ref() == 0 => {
            cx.err(Some(v.span()), key, "must be greater than 0");
            default
        }
        Some(v) => *v.get_ref(),
        None => default,
    }
}

/// The most connections a listener may be told to hold at once: far above what one process
/// can serve, and below what its connection counter can count.
const MAX_CONNECTIONS_LIMIT: u64 = 1_000_000;

/// `positive`, and at most [`MAX_CONNECTIONS_LIMIT`].
fn connection_limit(cx: &mut Ctx<'_>, raw: &Option<Spanned<u64>>, key: &str, default: u64) -> u64 {
    let value = positive(cx, raw, key, default);
    if value > MAX_CONNECTIONS_LIMIT {
        let span = raw.as_ref().map(|v| v.span());
        cx.err(
            span,
            key,
            format!("must be at most {MAX_CONNECTIONS_LIMIT}"),
        );
        return default;
    }
    value
}

/// The longest `tokens.default_ttl` / `max_ttl` (a grant's `max_ttl` is under the latter):
/// ten years, far past any sane lifetime, far short of what a time can say.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3653 * 24 * 3600);

fn duration(cx: &mut Ctx<'_>, raw: &Option<S>, key: &str, default_secs: u64) -> Option<Duration> {
    let d = duration_or_zero(cx, raw, key, default_secs)?;
    if d.is_zero() {
        cx.err(
            raw.as_ref().map(|r| r.span()),
            key,
            "must be greater than 0",
        );
        return None;
    }
    Some(d)
}

/// [`duration`], zero allowed.
fn duration_or_zero(
    cx: &mut Ctx<'_>,
    raw: &Option<S>,
    key: &str,
    default_secs: u64,
) -> Option<Duration> {
    let Some(raw) = raw else {
        return Some(Duration::from_secs(default_secs));
    };
    match humantime::parse_duration(raw.get_ref()) {
        Ok(d) => Some(d),
        Err(e) => {
            cx.err(
                Some(raw.span()),
                key,
                format!("invalid duration (e.g. \"60s\", \"5m\"): {e}"),
            );
            None
        }
    }
}

fn rate_limit(
    cx: &mut Ctx<'_>,
    spanned: &Spanned<raw::RawRateLimit>,
    key: &str,
) -> Option<RateLimit> {
    let raw = spanned.get_ref();
    let burst = raw.burst.unwrap_or(raw.per_second);
    if raw.per_second == 0 || burst == 0 {
        cx.err(
            Some(spanned.span()),
            key,
            "per_second and burst must be greater than 0",
        );
        return None;
    }
    Some(RateLimit {
        per_second: raw.per_second,
        burst,
    })
}

/// Whether `hash` is the SHA-256 of the empty string or of a token people try first.
fn is_well_known(hash: &[u8; 32]) -> bool {
    const WELL_KNOWN: [&str; 10] = [
        "",
        "password",
        "admin",
        "changeme",
        "secret",
        "token",
        "123456",
        "letmein",
        "root",
        "credbroker",
    ];
    hashes_one_of(hash, &WELL_KNOWN)
}

/// [`is_well_known`], or the SHA-256 of a secret examples and tests use (`check` warns about
/// a client secret among them).
pub(super) fn is_well_known_secret(hash: &[u8; 32]) -> bool {
    const EXAMPLES: [&str; 8] = [
        "test",
        "test1",
        "test2",
        "demo",
        "example",
        "qwerty",
        "12345678",
        "client-secret",
    ];
    is_well_known(hash) || hashes_one_of(hash, &EXAMPLES)
}

fn hashes_one_of(hash: &[u8; 32], words: &[&str]) -> bool {
    use sha2::{Digest, Sha256};
    words
        .iter()
        .any(|word| <[u8; 32]>::from(Sha256::digest(word.as_bytes())) == *hash)
}

fn sha256_hex(cx: &mut Ctx<'_>, raw: &S, key: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    match hex::decode_to_slice(raw.get_ref(), &mut out) {
        Ok(()) => Some(out),
        Err(_) => {
            cx.err(Some(raw.span()), key, "must be 64 hex digits (a SHA-256)");
            None
        }
    }
}

fn header_name(
    cx: &mut Ctx<'_>,
    name: &str,
    span: Option<Range<usize>>,
    key: &str,
) -> Option<HeaderName> {
    match HeaderName::from_bytes(name.as_bytes()) {
        Ok(h) => Some(h),
        Err(_) => {
            cx.err(span, key, "not a valid HTTP header name");
            None
        }
    }
}

fn secret(cx: &mut Ctx<'_>, raw: &S, key: &str) -> Option<(SecretRef, Secret)> {
    resolve_secret(cx, raw.get_ref(), Some(raw.span()), key)
}

pub(super) fn resolve_secret(
    cx: &mut Ctx<'_>,
    reference: &str,
    span: Option<Range<usize>>,
    key: &str,
) -> Option<(SecretRef, Secret)> {
    let parsed = match SecretRef::parse(reference, &cx.base_dir) {
        Ok(r) => r,
        Err(e) => {
            cx.err(span, key, e.to_string());
            return None;
        }
    };
    match parsed.resolve() {
        Ok(v) => Some((parsed, v)),
        Err(e) => {
            cx.err(span, key, e.to_string());
            None
        }
    }
}
