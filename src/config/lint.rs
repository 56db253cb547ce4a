//! `credbroker check` (DESIGN §3.6): every parse/validation error, then the governance
//! warnings of a config that loads — one [`Finding`] a line, each with its location.

use std::collections::HashSet;
use std::fmt::{self, Write as _};
use std::path::Path;

use chrono::{DateTime, Utc};
use toml::Spanned;

use super::raw::{RawConfig, RawCredential};
use super::validate::{is_loopback_host, Ctx};
use super::{Config, ConfigError, StateBackend};
use crate::policy::pattern::Segment;

/// How bad a finding is: errors make `check` exit 1, warnings do not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

/// One line of `check`'s output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    pub location: ConfigError,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        // One finding a line (DESIGN §2): a value quoted from the file that holds a newline or
        // another control character is shown escaped, so it can neither split a finding nor
        // forge another — a backslash too, so an escape is never ambiguous, and the characters
        // that reorder or break text on a terminal (bidi controls, line separators).
        write!(f, "{level}: ")?;
        for c in self.location.to_string().chars() {
            let invisible = matches!(
                c,
                '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}'
            );
            if c.is_control() || invisible || c == '\\' {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// Everything `check` reports for the config `text` read from `path`, errors first.
pub fn check(text: &str, path: &Path, now: DateTime<Utc>) -> Vec<Finding> {
    let parsed = Config::parse(text, path);
    let raw = toml::from_str::<RawConfig>(text).ok();
    let mut cx = Ctx::new(text, path);
    // Files are checked whenever the TOML is readable, so the errors of one run are all of
    // them (warnings need a valid config: they come once the errors are fixed).
    if let Some(raw) = &raw {
        file_errors(&mut cx, raw);
    }
    let files = std::mem::take(&mut cx.errors);
    let (config, raw) = match (parsed, raw) {
        (Ok(config), Some(raw)) => (config, raw),
        (Err(errors), _) => {
            return errors.0.into_iter().chain(files).map(error).collect();
        }
        (Ok(_), None) => return Vec::new(), // cannot happen: it parsed
    };
    cx.errors = files;
    start_errors(&mut cx, &config, &raw);
    let mut findings: Vec<Finding> = std::mem::take(&mut cx.errors)
        .into_iter()
        .map(error)
        .collect();
    warnings(&mut cx, &config, &raw, now);
    findings.extend(cx.errors.into_iter().map(|location| Finding {
        severity: Severity::Warning,
        location,
    }));
    findings
}

fn error(location: ConfigError) -> Finding {
    Finding {
        severity: Severity::Error,
        location,
    }
}

/// Files `serve` will need: report now rather than at start-up, each at its key's line.
fn file_errors(cx: &mut Ctx<'_>, raw: &RawConfig) {
    if let Some(rk) = &raw.tokens.signing_key {
        let key = cx.path(rk.get_ref());
        if let Err(e) = crate::token::SigningKeys::from_pem_file(&key) {
            cx.err(Some(rk.span()), "tokens.signing_key", e.to_string());
        }
    }
    let admin = raw.admin.as_ref();
    let mut files: Vec<(String, Option<&Spanned<String>>)> = vec![
        ("server.tls_cert".into(), raw.server.tls_cert.as_ref()),
        ("server.tls_key".into(), raw.server.tls_key.as_ref()),
        ("server.client_ca".into(), raw.server.client_ca.as_ref()),
        (
            "admin.tls_cert".into(),
            admin.and_then(|a| a.tls_cert.as_ref()),
        ),
        (
            "admin.tls_key".into(),
            admin.and_then(|a| a.tls_key.as_ref()),
        ),
    ];
    for c in &raw.connectors {
        let key = format!("connectors[{}].upstream_ca", c.name.get_ref());
        files.push((key, c.upstream_ca.as_ref()));
    }
    let mut unreadable = false;
    for (key, value) in files.into_iter().filter_map(|(k, v)| Some((k, v?))) {
        let file = cx.path(value.get_ref());
        if let Err(e) = std::fs::metadata(&file) {
            unreadable = true;
            cx.err(
                Some(value.span()),
                &key,
                format!("cannot read {}: {e}", file.display()),
            );
        }
    }
    if !unreadable {
        tls_material_errors(cx, raw);
    }
}

/// What would stop `serve` from starting with this config beyond the config itself: the
/// audit log it must continue (DESIGN §5) and the state it must read (§3.5), looked at
/// without changing either.
fn start_errors(cx: &mut Ctx<'_>, config: &Config, raw: &RawConfig) {
    let key = config.audit.hmac_key.as_ref();
    if let Err(e) = crate::audit::files::check_openable(&config.audit.path, key) {
        let what = match e {
            crate::audit::AuditError::TailUnverifiable { .. } => {
                format!("{e}: serve would refuse to start")
            }
            e => format!("serve could not open the log: {e}"),
        };
        cx.err(Some(raw.audit.path.span()), "audit.path", what);
    }
    if let Err(e) = crate::state::check_readable(&config.state) {
        let span = raw.state.dir.as_ref().map(|d| d.span());
        cx.err(
            span,
            "state.dir",
            format!("serve could not read the state: {e}"),
        );
    }
}

/// The TLS files as `serve` loads them: a key that does not match its certificate, a file
/// without a certificate, a CA file that is not PEM are errors here, not only at start-up.
fn tls_material_errors(cx: &mut Ctx<'_>, raw: &RawConfig) {
    let server = &raw.server;
    let admin = raw.admin.as_ref();
    let listeners = [
        (
            "server",
            server.tls_cert.as_ref(),
            server.tls_key.as_ref(),
            server.client_ca.as_ref(),
        ),
        (
            "admin",
            admin.and_then(|a| a.tls_cert.as_ref()),
            admin.and_then(|a| a.tls_key.as_ref()),
            None,
        ),
    ];
    for (table, cert, key, ca) in listeners {
        let (Some(cert), Some(key)) = (cert, key) else {
            continue;
        };
        let ca_path = ca.map(|c| cx.path(c.get_ref()));
        let built = crate::tls::server_config(
            &cx.path(cert.get_ref()),
            &cx.path(key.get_ref()),
            ca_path.as_deref(),
        );
        if let Err(e) = built {
            // Said of the key whose file is at fault: the CA file's own faults under
            // `client_ca`, everything else (the pair) under `tls_cert`.
            let span = match (ca, ca_path.as_deref()) {
                (Some(ca), Some(path)) if e.concerns(path) => (ca.span(), "client_ca"),
                _ => (cert.span(), "tls_cert"),
            };
            cx.err(Some(span.0), &format!("{table}.{}", span.1), e.to_string());
        }
    }
    for c in &raw.connectors {
        let Some(ca) = &c.upstream_ca else { continue };
        if let Err(e) = crate::tls::upstream_client_config(Some(&cx.path(ca.get_ref()))) {
            let key = format!("connectors[{}].upstream_ca", c.name.get_ref());
            cx.err(Some(ca.span()), &key, e.to_string());
        }
    }
}

fn warnings(cx: &mut Ctx<'_>, config: &Config, raw: &RawConfig, now: DateTime<Utc>) {
    if config.server.tls.is_none() {
        cx.err(
            Some(raw.server.listen.span()),
            "server.listen",
            "plain HTTP listener: tokens and credentials' effects cross the network unencrypted",
        );
    }
    if let Some(admin) = &config.admin {
        let raw_admin = raw.admin.as_ref().map(|a| a.listen.span());
        if admin.tls.is_none() && !is_loopback_host(&admin.listen.ip().to_string()) {
            cx.err(
                raw_admin,
                "admin.listen",
                "plain HTTP admin listener on a non-loopback address",
            );
        }
    }
    if config.tokens.signing_key.is_none() {
        cx.err(
            None,
            "tokens.signing_key",
            "not set: an ephemeral key is used, so tokens die with the process and replicas cannot share them",
        );
    }
    if let Some(r) = &raw.audit.hmac_key {
        literal(cx, r, "audit.hmac_key");
    }
    state_warnings(cx, config, raw);
    connector_warnings(cx, config, raw, now);
    client_warnings(cx, config, raw, now);
}

/// A Redis URL that holds a password in the file, or crosses the network unencrypted.
fn state_warnings(cx: &mut Ctx<'_>, config: &Config, raw: &RawConfig) {
    let (StateBackend::Redis { url, url_ref }, Some(raw_url)) =
        (&config.state.backend, &raw.state.url)
    else {
        return;
    };
    literal(cx, raw_url, "state.url");
    for (file, error) in crate::state::redis::corrupt_journals(&config.state.dir) {
        cx.err(
            raw.state.dir.as_ref().map(|d| d.span()),
            "state.dir",
            format!(
                "the shared-state journal {} is corrupt ({error}): serve starts its replica's \
                 journal afresh and skips another replica's, so until that replica's next \
                 change rewrites it, the kill switches and revocations it held cannot be \
                 restored after Redis loses its data",
                file.display()
            ),
        );
    }
    let Some((loopback, password)) = crate::state::redis::url_facts(url.expose()) else {
        return;
    };
    if password && url_ref.is_none() {
        cx.err(
            Some(raw_url.span()),
            "state.url",
            "the URL holds a password in the config file: give it as env:NAME or file:PATH",
        );
    }
    if !loopback {
        cx.err(
            Some(raw_url.span()),
            "state.url",
            "plain redis:// to a non-loopback host: revocations and counters cross the network unencrypted",
        );
    }
}

fn literal(cx: &mut Ctx<'_>, raw: &Spanned<String>, key: &str) {
    if raw.get_ref().starts_with("literal:") {
        cx.err(
            Some(raw.span()),
            key,
            "literal: secret in the config file (for tests and demos only)",
        );
    }
}

fn connector_warnings(cx: &mut Ctx<'_>, config: &Config, raw: &RawConfig, now: DateTime<Utc>) {
    // Only grants in force count: an operation granted only by an elevation that has
    // expired is granted to no one.
    let granted: HashSet<(&str, &str)> = config
        .clients
        .iter()
        .flat_map(|c| c.grants.iter())
        .filter(|g| g.is_live(now))
        .flat_map(|g| {
            g.operations
                .iter()
                .map(|op| (g.connector.as_str(), op.as_str()))
        })
        .collect();
    for (connector, rc) in config.connectors.iter().zip(&raw.connectors) {
        let key = format!("connectors[{}]", connector.name);
        super::dynamic::usability_warnings(
            cx,
            &connector.credential,
            &rc.credential.span(),
            &format!("{key}.credential"),
        );
        let secrets: Vec<&String> = match rc.credential.get_ref() {
            RawCredential::Reference(r) => vec![r],
            RawCredential::Dynamic(d) => super::dynamic::long_term_secrets(d),
        };
        for r in secrets {
            if r.starts_with("literal:") {
                cx.err(
                    Some(rc.credential.span()),
                    &format!("{key}.credential"),
                    "literal: secret in the config file (for tests and demos only)",
                );
            }
        }
        if connector.is_expired(now) {
            cx.err(
                Some(rc.expires.span()),
                &format!("{key}.expires"),
                "the connector has expired and refuses every call",
            );
        } else if connector.expires_at - now < chrono::Duration::days(30) {
            cx.err(
                Some(rc.expires.span()),
                &format!("{key}.expires"),
                "the connector expires within 30 days",
            );
        }
        if connector.rate_limit.is_none() {
            cx.err(
                Some(rc.name.span()),
                &key,
                "no rate_limit: a misbehaving client can use the credential without bound",
            );
        }
        for (op, rop) in connector.operations.iter().zip(&rc.operations) {
            let op_key = format!("{key}.operations[{}]", op.name);
            if op.pattern.has_catch_all() {
                cx.err(
                    Some(rop.path.span()),
                    &format!("{op_key}.path"),
                    "a {*rest} pattern is broad: it allows every path below it",
                );
            }
            // `*` is a literal byte in a pattern (GitHub's API has no such segment): someone
            // who wrote a glob gets an operation that matches nothing they meant.
            let star = op
                .pattern
                .segments()
                .iter()
                .any(|s| matches!(s, Segment::Literal(l) if l.contains('*')));
            if star {
                cx.err(
                    Some(rop.path.span()),
                    &format!("{op_key}.path"),
                    "'*' is matched literally here, not as a wildcard: {name} matches one \
                     segment, {*rest} the rest of the path",
                );
            }
            // Query names are compared as sent (DESIGN §3.2: encoding variants fail closed),
            // and URL encoders escape these bytes: `$top` arrives as `%24top` from most
            // client libraries, and is refused.
            if let (Some(names), Some(raw_names)) = (&op.query, &rop.query) {
                for (i, (name, raw)) in names.iter().zip(raw_names).enumerate() {
                    // A client copy of the injected parameter is refused (DESIGN §3.8),
                    // whatever the allowlist says.
                    if let super::AuthMethod::Query { name: injected } = &connector.auth {
                        let decoded =
                            crate::proxy::canonical::percent_decode_lossy(name.as_bytes());
                        if decoded == injected.as_bytes() {
                            cx.err(
                                Some(raw.span()),
                                &format!("{op_key}.query[{i}]"),
                                "is the parameter the broker injects the credential as: a \
                                 request that carries it is refused (400), so listing it \
                                 allows nothing",
                            );
                        }
                    }
                    if name.bytes().any(|b| b"$[]!'()*,:@+/?".contains(&b)) {
                        cx.err(
                            Some(raw.span()),
                            &format!("{op_key}.query[{i}]"),
                            "names are compared as sent, and URL encoders percent-encode some \
                             of this name's characters: a client that sends it encoded is \
                             refused (list that spelling too if clients send it)",
                        );
                    }
                }
            }
            if !granted.contains(&(connector.name.as_str(), op.name.as_str())) {
                cx.err(Some(rop.name.span()), &op_key, "granted to no client");
            }
        }
    }
}

fn client_warnings(cx: &mut Ctx<'_>, config: &Config, raw: &RawConfig, now: DateTime<Utc>) {
    for (client, rc) in config.clients.iter().zip(&raw.clients) {
        let key = format!("clients[{}]", client.id);
        // Expired elevations and grants of no operation give the client nothing.
        let grants_anything = client
            .grants
            .iter()
            .any(|g| g.is_live(now) && !g.operations.is_empty());
        if !grants_anything {
            cx.err(Some(rc.id.span()), &key, "has no grants");
        }
        // Anyone could get this client's tokens, and make its calls with the real credential
        // injected: the first secrets a guesser tries. (A warning: DESIGN §3.6 lists the
        // errors, and a config it calls valid must start.)
        if client
            .secret_sha256
            .is_some_and(|h| super::validate::is_well_known_secret(&h))
        {
            cx.err(
                rc.secret_sha256.as_ref().map(|s| s.span()),
                &format!("{key}.secret_sha256"),
                "is the SHA-256 of an empty or well-known secret (anyone could get this \
                 client's tokens); make one with `credbroker keygen client-secret`",
            );
        }
        let mtls = config.server.tls.is_some() && config.server.client_ca.is_some();
        if client.secret_sha256.is_none() && client.cert_san.is_some() && !mtls {
            cx.err(
                Some(rc.id.span()),
                &key,
                "authenticates only by certificate (cert_san), but the proxy listener has no \
                 TLS with client_ca: it can never get a token",
            );
        }
        for (i, (grant, rg)) in client.grants.iter().zip(&rc.grants).enumerate() {
            if !grant.is_live(now) {
                cx.err(
                    Some(rg.span()),
                    &format!("{key}.grants[{i}]"),
                    "time-bound grant has expired and no longer exists",
                );
            }
        }
    }
}
