//! The HTTP side of the authorization server (DESIGN §4.1): `POST /oauth2/token`,
//! `GET /.well-known/jwks.json` and `GET /.well-known/oauth-authorization-server`.
//!
//! Order of work for a token request: source-address lockout, client authentication, form,
//! grant type, issuance rate limit (and a wait for a revocation's cut-off to pass), grants,
//! scope, lifetime, binding, audit, sign. Every
//! outcome is audited; a token is returned only once its `token_issued` record is written.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use http::header::{
    HeaderValue, AUTHORIZATION, CONTENT_TYPE, PRAGMA, RETRY_AFTER, WWW_AUTHENTICATE,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::client_auth::{parse_basic, secret_matches};
use super::form::{parse_authorization_details, parse_token_form, TokenForm};
use super::{new_jti, AccessClaims, AuthorizationDetail, Confirmation};
use crate::audit::{Event, Record};
use crate::broker::{take, AuthAttempt, Broker, Live};
use crate::config::Client;
use crate::proxy::pipeline::ConnInfo;
use crate::proxy::respond::json_response;
use crate::proxy::ProxyBody;
use crate::state::StateStore;
use crate::tls::PeerIdentity;

/// Token request bodies larger than this are refused before parsing.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// An RFC 6749 §5.2 error (plus the broker's own `rate_limited` and `audit_unavailable`).
#[derive(Debug)]
struct TokenError {
    status: StatusCode,
    code: &'static str,
    description: String,
    retry_after: Option<u64>,
    /// The client, once known, for the audit record.
    client: Option<String>,
    /// A configured client that a failed authentication claimed to be: recorded, so an
    /// auditor's `audit query --client` shows guessing at that client's secret. Never an
    /// unknown id (that text is the caller's, and may be anything, a pasted secret included).
    claimed: Option<String>,
    /// Answered with `Connection: close` (HTTP/1.1): what is wrong is the connection itself.
    close: bool,
}

fn error(status: StatusCode, code: &'static str, description: impl Into<String>) -> TokenError {
    TokenError {
        status,
        code,
        description: description.into(),
        retry_after: None,
        client: None,
        claimed: None,
        close: false,
    }
}

fn invalid_request(d: impl Into<String>) -> TokenError {
    error(StatusCode::BAD_REQUEST, "invalid_request", d)
}

fn invalid_scope(d: impl Into<String>) -> TokenError {
    error(StatusCode::BAD_REQUEST, "invalid_scope", d)
}

fn invalid_client(d: impl Into<String>) -> TokenError {
    error(StatusCode::UNAUTHORIZED, "invalid_client", d)
}

/// 503: the shared state (Redis, DESIGN §7) did not answer, so nothing can be decided.
fn state_unavailable() -> TokenError {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "state_unavailable",
        "the shared revocation and rate-limit state cannot be reached; no token was issued",
    )
}

/// What the token endpoint takes from the state: the connectors switched off, one cell of
/// `tokens.issue_rate_limit` for this client, and the client's revocation cut-off (tokens with
/// an `iat` at or before it are refused at every use). In memory, or from Redis in one round
/// trip.
async fn issue_state(
    broker: &Broker,
    live: &Live,
    client: &str,
) -> Result<(HashSet<String>, Option<i64>), TokenError> {
    match &*broker.state {
        StateStore::Memory(revocations) => {
            if let Some(l) = live.issue_limits.get(client) {
                take(l).map_err(rate_limited)?;
            }
            let disabled = revocations.disabled_connectors().into_iter().collect();
            Ok((disabled, revocations.client_cut_off(client)))
        }
        StateStore::Redis(redis) => {
            let shared = redis
                .issue_context(client, live.config.tokens.issue_rate_limit)
                .await
                .map_err(|e| {
                    tracing::error!(error = %e, "shared state unavailable; refusing to issue a token");
                    state_unavailable()
                })?;
            shared.rate.map_err(rate_limited)?;
            // A client revocation's or a lost state's cut-off, which reaches the allowed clock
            // skew ahead (DESIGN §7).
            Ok((shared.disabled, Some(shared.cut_off)))
        }
    }
}

/// The longest a token request waits for a revocation's cut-off to pass: the in-memory cut-off
/// is the revocation's own second (under 1 s to wait), a shared one reaches `tokens.leeway`
/// (at most 5 s) further.
const CUT_OFF_WAIT_MAX: Duration = Duration::from_secs(7);

/// The time to issue the token at: now, or — when a revocation's cut-off reaches this second,
/// so that a token issued now would be refused at every use — just past the cut-off, once it
/// has passed. The request waits for it (a client that was just revoked, and asks again at
/// once, gets a working token a moment later, not an error its OAuth library would not retry);
/// a wait longer than `CUT_OFF_WAIT_MAX` or than `budget` is answered 503 with `Retry-After`.
/// The second member says whether it waited (what was read before may have changed).
async fn past_cut_off(
    cut_off: Option<i64>,
    budget: Duration,
) -> Result<(DateTime<Utc>, bool), TokenError> {
    let now = Utc::now();
    let Some(cut_off) = cut_off.filter(|&c| now.timestamp() <= c) else {
        return Ok((now, false));
    };
    let past = Utc.timestamp_opt(cut_off.saturating_add(1), 0).single();
    let wait = past.and_then(|past| (past - now).to_std().ok());
    match wait {
        // A few milliseconds more: the timer runs on the monotonic clock, the cut-off is on
        // the wall clock, which may be slewed meanwhile.
        Some(wait) if wait <= CUT_OFF_WAIT_MAX.min(budget) => {
            tokio::time::sleep(wait + Duration::from_millis(5)).await;
        }
        _ => return Err(under_cut_off(cut_off)),
    }
    let now = Utc::now();
    if now.timestamp() <= cut_off {
        // The wall clock was set back while the request waited.
        return Err(under_cut_off(cut_off));
    }
    Ok((now, true))
}

/// The connectors switched off, read again after a wait for a cut-off (a kill switch pulled
/// meanwhile must not get a token issued for its connector, DESIGN §3.3), and — in memory — the
/// client's cut-off again (revoked again meanwhile: no token that would never work).
async fn after_the_wait(
    broker: &Broker,
    client: &str,
    now: i64,
) -> Result<HashSet<String>, TokenError> {
    if let StateStore::Memory(revocations) = &*broker.state {
        if let Some(cut_off) = revocations.client_cut_off(client).filter(|&c| now <= c) {
            return Err(under_cut_off(cut_off));
        }
    }
    broker.state.disabled_connectors().await.map_err(|e| {
        tracing::error!(error = %e, "shared state unavailable; refusing to issue a token");
        state_unavailable()
    })
}

/// 503 with the seconds until tokens issued then pass a revocation's cut-off: a token issued
/// now would never work.
fn under_cut_off(cut_off: i64) -> TokenError {
    let now = Utc::now().timestamp();
    TokenError {
        retry_after: Some(u64::try_from(cut_off - now + 1).unwrap_or(1).max(1)),
        ..error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "tokens issued now would fall under a revocation's cut-off; retry after the given seconds",
        )
    }
}

/// The longest token issued: what the proxy verifies at most, and what leaves 1 KiB of
/// `max_header_bytes` (half of a smaller one) for the request line and the other headers.
fn token_size_limit(max_header_bytes: usize) -> usize {
    let others = 1024.min(max_header_bytes / 2);
    crate::token::verify::MAX_TOKEN_LEN.min(max_header_bytes - others)
}

/// 503: the request's record cannot be written, so no token is issued (try again shortly:
/// the broker recovers by itself once the log can be written).
fn audit_unavailable_error() -> TokenError {
    TokenError {
        retry_after: Some(1),
        ..error(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_unavailable",
            "the audit log cannot be written; no token was issued",
        )
    }
}

fn rate_limited(secs: u64) -> TokenError {
    TokenError {
        retry_after: Some(secs.max(1)),
        ..error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many token requests",
        )
    }
}

/// What a successful request produced, before signing.
struct Issued {
    claims: AccessClaims,
    lifetime: u64,
}

/// `POST /oauth2/token`.
pub async fn token(
    broker: Arc<Broker>,
    req: Request<Incoming>,
    conn: &ConnInfo,
    request_id: &str,
) -> Response<ProxyBody> {
    let live = broker.live();
    // However long the request took, its record waits for the disk at most `request_timeout`:
    // a disk that stopped answering gets 503 (issued) or an unwritten record (denied) in time.
    let audit_by = || live.audit_by();
    let mut record = Record::new(Event::TokenDenied);
    record.request_id = Some(request_id.to_owned());
    record.peer = Some(conn.peer_text.clone());
    match issue(&broker, &live, req, conn, &mut record).await {
        Ok(issued) => respond_issued(&broker, &live, issued, record, request_id, audit_by()).await,
        Err(e) => {
            record.client = record.client.take().or(e.client.clone());
            // The metric's client: the authenticated one only (bounded labels).
            let client = record.client.clone();
            record.client = record.client.take().or(e.claimed.clone());
            refuse(&broker, &live, record, e, client, audit_by(), request_id).await
        }
    }
}

/// A refused token request: its `token_denied` record (the error's code as the reason),
/// counted and answered — or 503 when the record cannot be written (DESIGN §4.1: "503 when
/// the audit log cannot be written", refused or not). `client` labels the metric. The
/// requested scope is recorded as shown: never a secret or token sent as the scope (§5).
#[allow(clippy::too_many_arguments)]
async fn refuse(
    broker: &Broker,
    live: &Live,
    mut record: Record,
    e: TokenError,
    client: Option<String>,
    audit_by: std::time::Instant,
    request_id: &str,
) -> Response<ProxyBody> {
    record.reason = Some(e.code.to_owned());
    record.scope = record.scope.map(|s| scope_as_shown(live, &s));
    let e = match broker.audit.append_by(record, audit_by).await {
        Ok(_) => e,
        Err(audit_error) => {
            tracing::error!(error = %audit_error, "cannot write a token_denied audit record");
            audit_unavailable_error()
        }
    };
    broker.metrics.token(client.as_deref(), Some(e.code));
    error_response(e, request_id)
}

async fn issue(
    broker: &Broker,
    live: &Live,
    req: Request<Incoming>,
    conn: &ConnInfo,
    record: &mut Record,
) -> Result<Issued, TokenError> {
    let started = std::time::Instant::now();
    let now = Utc::now();
    let ip = conn.peer.ip();
    if let Some(left) = broker.auth_lockout(ip, now.timestamp()) {
        return Err(rate_limited(left));
    }
    if req.method() != Method::POST {
        return Err(error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "the token endpoint takes POST",
        ));
    }
    let (parts, body) = req.into_parts();
    // RFC 9112 §3.2 and RFC 9113 §8.3.1, as on the proxy.
    if !crate::proxy::headers::host_is_unambiguous(parts.version, &parts.uri, &parts.headers) {
        return Err(invalid_request(crate::proxy::headers::HOST_RULE));
    }
    let form = read_form(&parts.headers, body, live.config.server.request_timeout).await?;
    // Asked again now that the body is in (reading it may have taken a while), and counted
    // at this time, in one step with the attempt.
    let at = Utc::now().timestamp();
    // The connection's client certificate, if it still counts now (unexpired, its CA still
    // in force): it authenticates the client and binds the token (RFC 8705).
    let cert = conn.client_cert_at(at, broker.client_ca_in_force());
    let authenticated = if conn.client_cert.is_some() && cert.is_none() {
        // The connection's certificate stopped counting (expired, or its CA replaced by a
        // reload): no token from it — with a secret, one would come unbound — and, not being
        // a guess, not counted toward the lockout. Closed, so the client reconnects and the
        // handshake decides again.
        Err(AuthAttempt::Failed(stale_certificate(
            live,
            &parts.headers,
            &form,
            parts.version,
        )))
    } else {
        broker.authenticate_from(ip, at, || authenticate(live, &parts.headers, &form, cert))
    };
    let client = match authenticated {
        Ok(client) => client,
        Err(AuthAttempt::LockedOut(left)) => return Err(rate_limited(left)),
        Err(AuthAttempt::Failed(e)) => {
            // A failed authentication that claimed a configured client: what it asked for is
            // recorded too, so an auditor sees what a guesser was after. An unknown
            // claimant's text is not (it may be anything), nor the text of a request whose
            // secret came in the body: it is not kept, so it could not be redacted from it.
            if e.claimed.is_some() && !form.client_secret_present {
                record.scope = form
                    .scope
                    .as_deref()
                    .map(|s| failed_auth_scope(live, s, &parts.headers));
            }
            return Err(e);
        }
    };
    record.client = Some(client.id.clone());
    // The scope asked for, on every record of an authenticated request, refused ones too
    // (`refuse` redacts it; an issued token's record carries the granted scope instead).
    record.scope.clone_from(&form.scope);
    let with_client = |mut e: TokenError| {
        e.client = Some(client.id.clone());
        e
    };
    match form.grant_type.as_deref() {
        None => return Err(with_client(invalid_request("grant_type is required"))),
        Some("client_credentials") => {}
        Some(_) => {
            return Err(with_client(error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "only client_credentials is supported",
            )))
        }
    }
    let (mut disabled, cut_off) = issue_state(broker, live, &client.id)
        .await
        .map_err(with_client)?;
    // The time the token is issued at (and every time check below is made at): after the
    // state's answer, and past a revocation's cut-off that would refuse it.
    let budget = live
        .config
        .server
        .request_timeout
        .saturating_sub(started.elapsed());
    let (now, waited) = past_cut_off(cut_off, budget).await.map_err(with_client)?;
    if waited {
        disabled = after_the_wait(broker, &client.id, now.timestamp())
            .await
            .map_err(with_client)?;
    }
    // A client with no grants at all is unauthorized (a grant of no operation grants nothing);
    // one whose only grant expired gets invalid_scope below (DESIGN §3.3).
    if client.grants.iter().all(|g| g.operations.is_empty()) {
        return Err(with_client(error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            "the client holds no grants",
        )));
    }
    let requested = form
        .scope
        .as_deref()
        .ok_or_else(|| with_client(invalid_request("scope is required")))?;
    let scope = resolve_scope(live, &disabled, client, requested, now).map_err(with_client)?;
    let lifetime = lifetime(live, client, &form, &scope, now).map_err(with_client)?;
    let max_uses = parse_max_uses(&form).map_err(with_client)?;
    let details = match &form.authorization_details {
        Some(json) => Some(check_details(live, json, &scope).map_err(with_client)?),
        None => None,
    };
    // Once the elevation is removed from the config, the log still says why it was allowed.
    record.elevated_by(
        scope
            .iter()
            .filter_map(|(c, o)| client.elevation(c, o, now)),
    );
    let iat = now.timestamp();
    let claims = AccessClaims {
        iss: live.config.tokens.issuer.clone(),
        sub: client.id.clone(),
        client_id: Some(client.id.clone()),
        aud: live.config.tokens.issuer.clone(),
        iat,
        nbf: iat,
        exp: iat + lifetime as i64,
        jti: new_jti(),
        scope: scope
            .iter()
            .map(|(c, o)| format!("{c}:{o}"))
            .collect::<Vec<_>>()
            .join(" "),
        authorization_details: details,
        max_uses,
        cnf: cert.map(|c| Confirmation {
            x5t_s256: c.x5t_s256.clone(),
        }),
    };
    Ok(Issued { claims, lifetime })
}

/// The form body, read within `budget` (`server.request_timeout`): a client that stops
/// sending it gets 408 instead of holding the connection open.
async fn read_form(
    headers: &http::HeaderMap,
    body: Incoming,
    budget: std::time::Duration,
) -> Result<TokenForm, TokenError> {
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(invalid_request(
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    let bytes: Bytes = tokio::time::timeout(budget, Limited::new(body, MAX_FORM_BYTES).collect())
        .await
        .map_err(|_| {
            error(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request",
                "the request body did not arrive in time",
            )
        })?
        .map_err(|_| invalid_request("the request body is too large or was cut off"))?
        .to_bytes();
    let form = parse_token_form(&bytes).map_err(|e| invalid_request(e.to_string()))?;
    Ok(form)
}

/// `client_secret_basic`, or RFC 8705 `tls_client_auth` (`client_id` + certificate SAN).
/// `cert` is the connection's client certificate if it still counts
/// ([`ConnInfo::client_cert_at`]).
fn authenticate<'l>(
    live: &'l Live,
    headers: &http::HeaderMap,
    form: &TokenForm,
    cert: Option<&PeerIdentity>,
) -> Result<&'l Client, TokenError> {
    // client_secret_post is an authentication method this server does not offer: an
    // authentication failure (RFC 6749 §5.2), counted toward the source's lockout.
    if form.client_secret_present {
        // Recorded with the configured client it names, as a wrong Basic secret is: a guessing
        // run sent this way shows up under the client it targets.
        let claimed = form
            .client_id
            .as_deref()
            .and_then(|id| live.config.client(id));
        return Err(TokenError {
            claimed: claimed.map(|c| c.id.clone()),
            ..invalid_client(
                "client_secret in the body is not supported; use HTTP Basic (client_secret_basic)",
            )
        });
    }
    // One authentication per request (RFC 6749 §2.3), as check 1 of the proxy insists too:
    // with two, which one counts would be the server's guess.
    if headers.get_all(AUTHORIZATION).iter().nth(1).is_some() {
        return Err(invalid_request("more than one Authorization header"));
    }
    if let Some(value) = headers.get(AUTHORIZATION) {
        let (id, secret) = parse_basic(value.as_bytes())
            .map_err(|_| invalid_client("malformed Basic client authentication"))?;
        if form.client_id.as_deref().is_some_and(|f| f != id) {
            return Err(invalid_request(
                "client_id in the body differs from the authenticated client",
            ));
        }
        let client = live.config.client(&id);
        let expected = client.and_then(|c| c.secret_sha256.as_ref());
        // Hashed whether or not the client exists and has a secret, so the answer's timing
        // does not tell which client ids do (no secret has an all-zero SHA-256).
        let matches = secret_matches(&secret, expected.unwrap_or(&[0; 32]));
        let ok = expected.is_some() && matches;
        return match (ok, client) {
            (true, Some(c)) => Ok(c),
            _ => Err(authentication_failed(client)),
        };
    }
    let Some(id) = form.client_id.as_deref() else {
        return Err(invalid_client(AUTHENTICATION_REQUIRED));
    };
    let client = live.config.client(id);
    let Some(cert) = cert else {
        // A configured client named without a certificate: a failed authentication of that
        // client, recorded with it like a wrong secret.
        return Err(TokenError {
            claimed: client.map(|c| c.id.clone()),
            ..invalid_client(AUTHENTICATION_REQUIRED)
        });
    };
    match client {
        Some(c) if c.cert_san.as_deref().is_some_and(|san| cert.has_san(san)) => Ok(c),
        client => Err(authentication_failed(client)),
    }
}

const AUTHENTICATION_REQUIRED: &str =
    "client authentication is required (HTTP Basic or a client certificate)";

/// `invalid_client` for a connection whose client certificate no longer counts, naming the
/// configured client the request claimed (by Basic or `client_id`), if any.
fn stale_certificate(
    live: &Live,
    headers: &http::HeaderMap,
    form: &TokenForm,
    version: http::Version,
) -> TokenError {
    let basic = headers
        .get(AUTHORIZATION)
        .and_then(|v| parse_basic(v.as_bytes()).ok())
        .map(|(id, _)| id);
    let id = basic.as_deref().or(form.client_id.as_deref());
    TokenError {
        claimed: id
            .and_then(|id| live.config.client(id))
            .map(|c| c.id.clone()),
        close: version < http::Version::HTTP_2,
        ..invalid_client(
            "the connection's client certificate has expired or its CA is no longer trusted; \
             reconnect with a valid certificate",
        )
    }
}

/// `invalid_client`, naming the configured client that was claimed, if any (for the record).
fn authentication_failed(claimed: Option<&std::sync::Arc<Client>>) -> TokenError {
    TokenError {
        claimed: claimed.map(|c| c.id.clone()),
        ..invalid_client("client authentication failed")
    }
}

/// Expands and checks `scope`: every item must be granted now, or the request fails whole.
fn resolve_scope(
    live: &Live,
    disabled: &HashSet<String>,
    client: &Client,
    requested: &str,
    now: DateTime<Utc>,
) -> Result<Vec<(String, String)>, TokenError> {
    let mut out: Vec<(String, String)> = Vec::new();
    let items: Vec<&str> = requested.split(' ').filter(|s| !s.is_empty()).collect();
    if items.is_empty() {
        return Err(invalid_scope("scope is empty"));
    }
    for item in items {
        let Some((connector_name, op)) = item.split_once(':') else {
            return Err(invalid_scope(format!(
                "`{}` is not connector:operation",
                short(&scope_as_shown(live, item))
            )));
        };
        let connector = live
            .config
            .connector(connector_name)
            .filter(|c| !c.is_expired(now) && !disabled.contains(&c.name))
            .ok_or_else(|| {
                invalid_scope(format!(
                    "connector `{}` is unknown, expired or disabled",
                    short(&scope_as_shown(live, connector_name))
                ))
            })?;
        let ops: Vec<String> = if op == "*" {
            connector
                .operations
                .iter()
                .filter(|o| client.is_granted(&connector.name, &o.name, now))
                .map(|o| o.name.clone())
                .collect()
        } else if connector.operation(op).is_some() && client.is_granted(&connector.name, op, now) {
            vec![op.to_owned()]
        } else {
            Vec::new()
        };
        if ops.is_empty() {
            return Err(invalid_scope(format!(
                "`{}` is not granted to this client",
                short(&scope_as_shown(live, item))
            )));
        }
        for op in ops {
            let pair = (connector.name.clone(), op);
            if !out.contains(&pair) {
                out.push(pair);
            }
        }
    }
    Ok(out)
}

/// At most 80 characters of client input in a message, so an error never carries a blob.
fn short(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The most of a failed authentication's scope that is recorded: its caller is not
/// authenticated (the source lockout bounds how often it can write a record, this how much).
const MAX_FAILED_AUTH_SCOPE: usize = 256;

/// The scope a failed authentication asked for, as recorded: shown as every denial's is
/// ([`scope_as_shown`]), an item holding the password it presented `REDACTED` too (a wrong or
/// old secret pasted into the scope: not one the broker holds, so `scope_as_shown` cannot
/// know it), and whole items up to [`MAX_FAILED_AUTH_SCOPE`] bytes, then `…`.
fn failed_auth_scope(live: &Live, scope: &str, headers: &http::HeaderMap) -> String {
    let presented = headers
        .get(AUTHORIZATION)
        .and_then(|v| parse_basic(v.as_bytes()).ok())
        .map(|(_, secret)| secret)
        .filter(|secret| !secret.is_empty());
    let holds_password = |item: &str| {
        presented
            .as_ref()
            .is_some_and(|p| memchr::memmem::find(item.as_bytes(), p.expose()).is_some())
    };
    let mut out = String::new();
    for item in scope_as_shown(live, scope).split(' ') {
        let item = if holds_password(item) {
            "REDACTED"
        } else {
            item
        };
        if out.len() + 1 + item.len() > MAX_FAILED_AUTH_SCOPE {
            out.push_str(if out.is_empty() { "…" } else { " …" });
            break;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(item);
    }
    out
}

/// A requested scope as recorded and quoted: an item that is a secret the broker holds (a
/// client's secret — the caller's own, pasted in the wrong field —, a credential, …) or is
/// shaped like a token is `REDACTED`. Never echoed, never written.
fn scope_as_shown(live: &Live, scope: &str) -> String {
    let items: Vec<&str> = scope
        .split(' ')
        .map(|item| {
            // Also as either side of `connector:operation` (`github:<credential>`).
            let (connector, operation) = item.split_once(':').unwrap_or((item, ""));
            let held = [item, connector, operation]
                .iter()
                .any(|part| live.is_held_secret(part));
            if held {
                "REDACTED"
            } else {
                item
            }
        })
        .collect();
    let mut shown = Some(items.join(" "));
    crate::proxy::redact::redact_jwt_shapes(&mut shown);
    shown.unwrap_or_default()
}

/// min(`ttl` or `default_ttl`, each item's grant `max_ttl`, `tokens.max_ttl`) — DESIGN
/// §4.1's rule as it stands. A time-bound grant's `expires` does not shorten it: past that
/// moment the grant no longer exists, and check 3 refuses the token's calls under it (403,
/// `not_granted`, DESIGN §3.3), which says why, where an expired token would not.
fn lifetime(
    live: &Live,
    client: &Client,
    form: &TokenForm,
    scope: &[(String, String)],
    now: DateTime<Utc>,
) -> Result<u64, TokenError> {
    let tokens = &live.config.tokens;
    let requested = match form.ttl.as_deref() {
        Some(t) => match t.parse::<u64>() {
            Ok(n) if n >= 1 => Duration::from_secs(n),
            _ => return Err(invalid_request("ttl must be a positive number of seconds")),
        },
        None => tokens.default_ttl,
    };
    let mut limit = requested.min(tokens.max_ttl);
    for (connector, op) in scope {
        // The most generous live grant that covers the item decides that item's cap.
        let best = client
            .live_grants(connector, now)
            .filter(|g| g.operations.iter().any(|o| o == op))
            .map(|g| g.max_ttl.unwrap_or(tokens.max_ttl))
            .max()
            .unwrap_or(Duration::ZERO);
        limit = limit.min(best);
    }
    Ok(limit.as_secs().max(1))
}

fn parse_max_uses(form: &TokenForm) -> Result<Option<u64>, TokenError> {
    match form.max_uses.as_deref() {
        None => Ok(None),
        Some(s) => match s.parse::<u64>() {
            Ok(n) if n >= 1 => Ok(Some(n)),
            _ => Err(invalid_request("max_uses must be an integer of at least 1")),
        },
    }
}

/// RFC 9396 details must each name a call that an operation in the granted scope allows.
fn check_details(
    live: &Live,
    json: &str,
    scope: &[(String, String)],
) -> Result<Vec<AuthorizationDetail>, TokenError> {
    let details = parse_authorization_details(json).map_err(|e| invalid_request(e.to_string()))?;
    if details.is_empty() {
        return Err(invalid_request("authorization_details is empty"));
    }
    for d in &details {
        let Some(connector) = live.config.connector(&d.connector) else {
            return Err(invalid_scope(
                "authorization_details names an unknown connector",
            ));
        };
        let Ok(method) = Method::from_bytes(d.method.as_bytes()) else {
            return Err(invalid_request(
                "authorization_details has an invalid method",
            ));
        };
        if crate::proxy::canonical::check_path(&d.path).is_err() {
            return Err(invalid_request(
                "authorization_details has a non-canonical path",
            ));
        }
        let covered = connector
            .router
            .find(&method, &d.path, |i| {
                let op = &connector.operations[i].name;
                scope.iter().any(|(c, o)| c == &connector.name && o == op)
            })
            .is_some();
        if !covered {
            return Err(invalid_scope(
                "authorization_details names a call outside the requested scope",
            ));
        }
    }
    Ok(details)
}

async fn respond_issued(
    broker: &Broker,
    live: &Live,
    issued: Issued,
    mut record: Record,
    request_id: &str,
    audit_by: std::time::Instant,
) -> Response<ProxyBody> {
    let Issued { claims, lifetime } = issued;
    let token = match live.verifier.keys().sign(&claims) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "token signing failed");
            return error_response(
                error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "the token could not be signed",
                ),
                request_id,
            );
        }
    };
    // A token the proxy would refuse as malformed (or whose header would not fit in
    // `max_header_bytes`) is not issued: the client would get 200 for a token that can never
    // be used, and a fresh one would fail the same way.
    let limit = token_size_limit(live.config.server.max_header_bytes);
    if token.len() > limit {
        let e = invalid_request(format!(
            "the token would be {} bytes, more than the {limit} the proxy accepts: ask for \
             fewer operations or authorization_details",
            token.len()
        ));
        let client = record.client.clone();
        return refuse(broker, live, record, e, client, audit_by, request_id).await;
    }
    record.event = Event::TokenIssued;
    record.scope = Some(claims.scope.clone());
    record.jti = Some(claims.jti.clone());
    record.expires_at = Utc
        .timestamp_opt(claims.exp, 0)
        .single()
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    let client = record.client.clone();
    // A record not acknowledged in time may still be written later: a `token_issued` for a
    // token nobody received (its jti appears in no call), never a token without its record.
    if let Err(e) = broker.audit.append_by(record, audit_by).await {
        broker
            .metrics
            .token(client.as_deref(), Some("audit_unavailable"));
        tracing::error!(error = %e, "audit log unavailable; refusing to issue a token");
        return error_response(audit_unavailable_error(), request_id);
    }
    broker.metrics.token(client.as_deref(), None);
    if let StateStore::Memory(_) = &*broker.state {
        broker.issued_max_uses(&claims);
    }
    let body = TokenAnswer {
        access_token: &token,
        token_type: "Bearer",
        expires_in: lifetime,
        scope: &claims.scope,
        authorization_details: claims.authorization_details.as_deref(),
    };
    let mut resp = json_response(StatusCode::OK, &body);
    resp.headers_mut()
        .insert(PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

/// A successful token answer (RFC 6749 §5.1), its members in DESIGN §4.1's order.
#[derive(serde::Serialize)]
struct TokenAnswer<'a> {
    access_token: &'a str,
    token_type: &'static str,
    expires_in: u64,
    scope: &'a str,
    /// RFC 9396 §7: the granted authorization_details are returned with the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    authorization_details: Option<&'a [crate::token::claims::AuthorizationDetail]>,
}

fn error_response(e: TokenError, request_id: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({
        "error": e.code,
        "error_description": description_text(&e.description),
        "request_id": request_id,
    });
    let mut resp = json_response(e.status, &body);
    if e.status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"credbroker\""),
        );
    }
    if e.status == StatusCode::METHOD_NOT_ALLOWED {
        resp.headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static("POST"));
    }
    if let Some(secs) = e.retry_after {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    if e.close {
        resp.headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// RFC 6749 §5.2: `error_description` holds only %x20-21 / %x23-5B / %x5D-7E. A description
/// quoting what the client sent (a scope item) may hold anything else: each such character is
/// shown as `?`.
fn description_text(description: &str) -> std::borrow::Cow<'_, str> {
    let allowed = |c: char| matches!(c, ' '..='~') && c != '"' && c != '\\';
    if description.chars().all(allowed) {
        return description.into();
    }
    description
        .chars()
        .map(|c| if allowed(c) { c } else { '?' })
        .collect::<String>()
        .into()
}

/// `GET /.well-known/jwks.json`
pub fn jwks(broker: &Broker) -> Response<ProxyBody> {
    let value: serde_json::Value =
        serde_json::from_str(&broker.signing_keys().jwks_json()).unwrap_or_default();
    let mut resp = json_response(StatusCode::OK, &value);
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    resp
}

/// `GET /.well-known/oauth-authorization-server` (RFC 8414).
///
/// URLs use the authority the client reached the broker by (its `Host`), when it is a plain
/// host\[:port\]: behind `0.0.0.0` or a port mapping, the listen address would be unreachable.
pub fn metadata(live: &Live, host: Option<&str>) -> Response<ProxyBody> {
    let server = &live.config.server;
    let scheme = if server.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let host = host.filter(|h| {
        !h.is_empty()
            && h.len() <= 255
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
    });
    let base = match host {
        Some(h) => format!("{scheme}://{h}"),
        None => format!("{scheme}://{}", server.listen),
    };
    let mut auth_methods = vec!["client_secret_basic"];
    if server.client_ca.is_some() {
        auth_methods.push("tls_client_auth");
    }
    let body = serde_json::json!({
        "issuer": live.config.tokens.issuer,
        "token_endpoint": format!("{base}/oauth2/token"),
        "jwks_uri": format!("{base}/.well-known/jwks.json"),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": auth_methods,
        // Only client_credentials: no authorization endpoint, so no response types.
        "response_types_supported": [],
        "authorization_details_types_supported": ["credbroker_request"],
        "tls_client_certificate_bound_access_tokens": server.client_ca.is_some(),
        // No `scopes_supported` (RFC 8414 §2: RECOMMENDED): this document is served to anyone,
        // and the list would lay out every connector and operation, expired and disabled ones
        // too, to whoever asks. A client learns its scope from its grants.
    });
    json_response(StatusCode::OK, &body)
}

#[cfg(test)]
mod tests {
    use super::{past_cut_off, token_size_limit, CUT_OFF_WAIT_MAX};
    use chrono::Utc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_token_is_issued_past_a_cut_off_that_reaches_this_second() {
        let long = Duration::from_secs(60);
        // No cut-off, or one already past: now, at once.
        let before = Utc::now();
        let (at, waited) = past_cut_off(None, long).await.unwrap();
        assert!(at >= before && !waited);
        let past = Utc::now().timestamp() - 1;
        let (at, waited) = past_cut_off(Some(past), long).await.unwrap();
        assert!(at.timestamp() > past && at - before < chrono::Duration::milliseconds(500));
        assert!(!waited);
        // A cut-off at this second: the answer comes once it has passed.
        let cut_off = Utc::now().timestamp();
        let (at, waited) = past_cut_off(Some(cut_off), long).await.unwrap();
        assert!(at.timestamp() > cut_off && waited, "{at} is past {cut_off}");
        assert!(Utc::now().timestamp() > cut_off);
    }

    #[tokio::test]
    async fn a_cut_off_beyond_the_wait_allowed_is_answered_503_with_retry_after() {
        let far = Utc::now().timestamp() + CUT_OFF_WAIT_MAX.as_secs() as i64 + 5;
        let e = past_cut_off(Some(far), Duration::from_secs(60))
            .await
            .unwrap_err();
        assert_eq!(e.status, 503);
        assert_eq!(e.code, "temporarily_unavailable");
        let retry = e.retry_after.unwrap();
        assert!((CUT_OFF_WAIT_MAX.as_secs()..=CUT_OFF_WAIT_MAX.as_secs() + 7).contains(&retry));
        // Within the wait allowed, but not within the request's time.
        let near = Utc::now().timestamp() + 2;
        let started = std::time::Instant::now();
        let e = past_cut_off(Some(near), Duration::from_millis(500))
            .await
            .unwrap_err();
        assert_eq!(e.code, "temporarily_unavailable");
        assert!(
            started.elapsed() < Duration::from_millis(400),
            "refused at once"
        );
    }

    #[test]
    fn the_token_size_limit_leaves_room_for_the_rest_of_the_head() {
        assert_eq!(token_size_limit(16384), 8192, "the proxy's own limit");
        assert_eq!(token_size_limit(8192), 7168, "1 KiB for the rest");
        assert_eq!(token_size_limit(1500), 750, "half of a small head");
        assert_eq!(token_size_limit(1), 1);
    }
}
