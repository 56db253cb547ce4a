//! The admin listener (DESIGN §4.4): health, reload, revocation, the kill switch and the
//! connector view. Everything but `/healthz` and `/readyz` needs the admin bearer token,
//! compared by SHA-256 in constant time. Every admin action is audited.

pub mod metrics;
pub mod watch;

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use chrono::Utc;
use http::header::AUTHORIZATION;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::audit::{AppendLate, AuditError, Event, Record};
use crate::broker::Broker;
use crate::config::Config;
use crate::proxy::pipeline::ConnInfo;
use crate::proxy::respond::{json_response, Refusal};
use crate::proxy::ProxyBody;
use crate::state::redis::Deferred;
use crate::state::{Change, StateError};

/// Admin request bodies are small JSON objects.
const MAX_ADMIN_BODY: usize = 16 * 1024;

/// What the admin listener needs.
pub struct AdminState {
    pub broker: Arc<Broker>,
    /// SHA-256 of the admin bearer token at start; the config in force takes precedence.
    pub token_sha256: [u8; 32],
}

pub async fn handle(
    state: Arc<AdminState>,
    req: Request<Incoming>,
    conn: &ConnInfo,
    request_id: &str,
) -> Response<ProxyBody> {
    let path = req.uri().path().to_owned();
    let live = state.broker.live();
    let holder = match path.as_str() {
        "/healthz" | "/readyz" => None,
        _ => token_holder(&state, &live, &req),
    };
    match (req.method(), path.as_str()) {
        (&Method::GET | &Method::HEAD, "/healthz") => ok(serde_json::json!({"status": "ok"})),
        (&Method::GET | &Method::HEAD, "/readyz") => readiness(&state.broker).await,
        (_, "/healthz" | "/readyz") => method_not_allowed("GET, HEAD", request_id),
        _ if holder.is_none() => {
            let presented = req.headers().contains_key(AUTHORIZATION);
            state.broker.metrics.admin_denied(presented);
            if let Some(action) = action_of(req.method(), &path) {
                // A wrong token at the kill switch is what monitoring wants to see.
                // Not `admin@…`: whoever it was did not show the admin token.
                let actor = format!("{REFUSED_ACTOR}@{}", conn.peer);
                let record = admin_record(action, None, &actor, "denied", Some(request_id));
                if let Err(e) = state.broker.audit.append_by(record, live.audit_by()).await {
                    tracing::error!(error = %e, "cannot write the admin audit record of a refused call");
                }
            }
            let mut resp = json_response(
                StatusCode::UNAUTHORIZED,
                &serde_json::json!({"error": "invalid_token", "error_description": "admin bearer token required", "request_id": request_id}),
            );
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer realm=\"credbroker-admin\""),
            );
            resp
        }
        (&Method::GET | &Method::HEAD, "/v1/connectors") => {
            let disabled = disabled_connectors(&state.broker).await;
            ok(connectors_view(&state.broker, disabled.as_ref()))
        }
        (&Method::GET | &Method::HEAD, "/metrics") => {
            let disabled = disabled_connectors(&state.broker).await;
            metrics_response(&state.broker, disabled.as_ref(), req.headers())
        }
        // Changes run as their own task: a client that hangs up cannot stop one halfway
        // (audited but not applied, or applied and not audited).
        (&Method::POST, "/v1/reload") => {
            let actor = actor(holder.flatten(), conn);
            let broker = Arc::clone(&state.broker);
            let id = request_id.to_owned();
            let done = tokio::spawn(async move { reload(&broker, &actor, Some(&id)).await });
            let result = done
                .await
                .unwrap_or_else(|_| Err(ReloadError::Invalid("the reload task failed".into())));
            match result {
                Ok(()) => ok(serde_json::json!({"result": "reloaded"})),
                Err(ReloadError::Invalid(e)) => bad(&e, request_id),
                Err(ReloadError::NotAudited) => audit_unavailable(
                    "the audit log cannot be written; the configuration was not reloaded",
                    request_id,
                ),
            }
        }
        (&Method::POST, "/v1/revoke" | "/v1/enable") => {
            let broker = Arc::clone(&state.broker);
            let actor = actor(holder.flatten(), conn);
            let id = request_id.to_owned();
            let enabling = path == "/v1/enable";
            let done = tokio::spawn(async move {
                if enabling {
                    enable(&broker, req, &actor, &id).await
                } else {
                    revoke(&broker, req, &actor, &id).await
                }
            });
            done.await.unwrap_or_else(|_| {
                json_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({"error": "server_error", "error_description": "the admin task failed", "request_id": request_id}),
                )
            })
        }
        (_, "/v1/connectors" | "/v1/reload" | "/v1/revoke" | "/v1/enable" | "/metrics") => {
            let allow = match path.as_str() {
                "/v1/connectors" | "/metrics" => "GET, HEAD",
                _ => "POST",
            };
            method_not_allowed(allow, request_id)
        }
        _ => Refusal::NotFound.into_response(request_id),
    }
}

/// 405 naming the methods the path takes.
fn method_not_allowed(allow: &'static str, request_id: &str) -> Response<ProxyBody> {
    let mut resp = Refusal::MethodNotAllowed.into_response(request_id);
    resp.headers_mut()
        .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
    resp
}

/// How long after a failed audit write `/readyz` says "not ready".
const AUDIT_FAILURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);

/// `/readyz`: 503 while the audit log has failed recently — every call would be refused 503
/// anyway (DESIGN §6), so a load balancer should route around this replica. Once no write
/// has failed for [`AUDIT_FAILURE_WINDOW`] it says ready again, and the next calls show
/// whether the disk has recovered.
async fn readiness(broker: &Broker) -> Response<ProxyBody> {
    if broker.audit.failed_within(AUDIT_FAILURE_WINDOW) {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"status": "audit_unavailable"}),
        );
    }
    // With shared state, a replica that cannot reach Redis refuses every call too.
    if broker.state.reachable().await.is_err() {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"status": "state_unavailable"}),
        );
    }
    ok(serde_json::json!({"status": "ready"}))
}

/// Who holds the admin token the request presents: `Some(None)` for the shared token,
/// `Some(Some(name))` for an operator's own; `None` when it presents no admin token.
fn token_holder<'s, B>(
    state: &AdminState,
    live: &'s crate::broker::Live,
    req: &Request<B>,
) -> Option<Option<&'s str>> {
    // One `Authorization`, as on the proxy: which of two a front proxy would pass on, or
    // log, is anyone's guess.
    if req.headers().get_all(AUTHORIZATION).iter().nth(1).is_some() {
        return None;
    }
    let token = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())?;
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    // The tokens in force are the current config's, so a reload rotates them.
    match &live.config.admin {
        Some(admin) => admin.holder(&digest),
        None => bool::from(digest.ct_eq(&state.token_sha256)).then_some(None),
    }
}

/// The `actor` of an admin record: who asked (`admin` for the shared admin token, an
/// operator's name for their own), and from where. A refused request's is
/// [`REFUSED_ACTOR`]`@ADDRESS`.
fn actor(holder: Option<&str>, conn: &ConnInfo) -> String {
    format!("{}@{}", holder.unwrap_or("admin"), conn.peer)
}

/// Who asked, in the `denied` record of a request that showed no admin token or a wrong one
/// (no operator may take the name).
pub const REFUSED_ACTOR: &str = "anonymous";

/// The admin action a request asks for, if it is one (the endpoints that change something).
fn action_of(method: &Method, path: &str) -> Option<&'static str> {
    if method != Method::POST {
        return None;
    }
    match path {
        "/v1/reload" => Some("reload"),
        "/v1/revoke" => Some("revoke"),
        "/v1/enable" => Some("enable"),
        _ => None,
    }
}

/// An `admin` record: who (`actor`, see [`actor`]) asked for what, and how it went.
fn admin_record(
    action: &str,
    target: Option<&str>,
    actor: &str,
    result: &str,
    request_id: Option<&str>,
) -> Record {
    record_of(action, target, actor.to_owned(), result, request_id)
}

/// An `admin` record of `actor`'s request.
fn record_of(
    action: &str,
    target: Option<&str>,
    actor: String,
    result: &str,
    request_id: Option<&str>,
) -> Record {
    let mut record = Record::new(Event::Admin);
    record.request_id = request_id.map(str::to_owned);
    record.action = Some(action.to_owned());
    record.actor = Some(actor);
    record.target = target.map(str::to_owned);
    record.result = Some(result.to_owned());
    record
}

/// 503 `audit_unavailable`: the action needed an audit record that could not be written.
fn audit_unavailable(description: &str, request_id: &str) -> Response<ProxyBody> {
    json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &serde_json::json!({"error": "audit_unavailable", "error_description": description, "request_id": request_id}),
    )
}

fn ok(body: serde_json::Value) -> Response<ProxyBody> {
    json_response(StatusCode::OK, &body)
}

fn bad(message: &str, request_id: &str) -> Response<ProxyBody> {
    json_response(
        StatusCode::BAD_REQUEST,
        &serde_json::json!({"error": "invalid_request", "error_description": message, "request_id": request_id}),
    )
}

/// Why a reload did not happen.
#[derive(Debug)]
pub enum ReloadError {
    /// The file does not load or does not validate; the old config stays in force.
    Invalid(String),
    /// The reload's audit record could not be written, so it was not put in force.
    NotAudited,
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invalid(e) => f.write_str(e),
            Self::NotAudited => f.write_str("the audit log cannot be written"),
        }
    }
}

fn lock_failed_reload(broker: &Broker) -> std::sync::MutexGuard<'_, Option<String>> {
    broker
        .failed_reload
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Whether the last reload failed on a config file with these bytes (hex SHA-256).
pub fn reload_failed_on(broker: &Broker, sha256: &str) -> bool {
    lock_failed_reload(broker).as_deref() == Some(sha256)
}

/// Re-reads and validates the config file; on success swaps it in, else keeps the old one.
/// Either way the attempt is audited, and a valid config goes in force only once its `ok`
/// record is written: no reload happens unaudited. Used by SIGHUP, the file watcher and
/// `POST /v1/reload`.
pub async fn reload(
    broker: &Broker,
    actor: &str,
    request_id: Option<&str>,
) -> Result<(), ReloadError> {
    // One admin change at a time, from reading the file to putting it in force.
    let _one_at_a_time = broker.admin_changes.lock().await;
    let path = broker.config_path();
    // `serve --dev`: the config was built in memory; a file of that name is not it.
    let prepared = if broker.live().config.in_memory {
        Err(
            "the dev config lives in memory: there is no file to reload; restart to start over"
                .to_owned(),
        )
    } else {
        // Read once here, so that what is remembered of a failed reload is what it read.
        match crate::config::read_config(&path) {
            Err(errors) => Err(errors.to_string()),
            Ok(text) => {
                let tried = hex::encode(Sha256::digest(text.as_bytes()));
                let prepared = Config::parse(&text, &path)
                    .map_err(|errors| errors.to_string())
                    .and_then(|config| {
                        let sha256 = config.sha256.clone();
                        broker
                            .prepare_config(config)
                            .map(|prepared| (prepared, sha256))
                            .map_err(|e| e.to_string())
                    });
                *lock_failed_reload(broker) = prepared.is_err().then_some(tried);
                prepared
            }
        }
    };
    let mut record = Record::new(Event::Admin);
    record.request_id = request_id.map(str::to_owned);
    record.action = Some("reload".into());
    record.actor = Some(actor.to_owned());
    record.target = Some(path.display().to_string());
    record.result = Some(if prepared.is_ok() { "ok" } else { "failed" }.into());
    match &prepared {
        // Which config is in force from here on, as `startup` says for the first one.
        Ok((_, sha256)) => record.config_sha256 = Some(sha256.clone()),
        Err(e) => record.error = Some(e.clone()),
    }
    // A reload that is not installed because its record was late owes a second record
    // saying so (the first may still land, saying `ok`).
    let not_installed = {
        let mut r = record.clone();
        r.result = Some("failed".into());
        r.config_sha256 = None;
        r.error = Some("not installed: its audit record was not acknowledged in time".into());
        r
    };
    let audited = append_or_correct(broker, record, not_installed).await;
    let result = match (prepared, audited) {
        (Ok((prepared, _)), Ok(_)) => {
            prepared.install();
            tracing::info!(config = %path.display(), "configuration reloaded");
            Ok(())
        }
        (Ok(_), Err(e)) => {
            tracing::error!(error = %e, config = %path.display(),
                "the audit log cannot be written; the configuration was not reloaded");
            Err(ReloadError::NotAudited)
        }
        (Err(e), audited) => {
            if let Err(audit_error) = audited {
                tracing::error!(error = %audit_error, "cannot write the admin audit record for a failed reload");
            }
            tracing::error!(config = %path.display(), error = %e, "reload failed; the previous configuration stays in force");
            Err(ReloadError::Invalid(e))
        }
    };
    broker.metrics.reload(result.is_ok());
    result
}

/// OpenMetrics when the scraper asks for it (Prometheus does), else the classic Prometheus
/// text format (DESIGN §4.4).
fn metrics_response(
    broker: &Broker,
    disabled: Option<&HashSet<String>>,
    headers: &http::HeaderMap,
) -> Response<ProxyBody> {
    let accept = headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let openmetrics = broker.metrics.render(broker, disabled);
    let (body, content_type) = if metrics::wants_openmetrics(accept) {
        (openmetrics, metrics::CONTENT_TYPE)
    } else {
        (
            metrics::to_prometheus_text(&openmetrics),
            metrics::CONTENT_TYPE_TEXT,
        )
    };
    let mut resp = Response::new(crate::proxy::respond::full(Bytes::from(body)));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}

/// The connectors switched off, for the views; `None` when the shared state cannot be
/// reached (the views then leave `enabled` out rather than guess).
async fn disabled_connectors(broker: &Broker) -> Option<HashSet<String>> {
    broker
        .state
        .disabled_connectors()
        .await
        .inspect_err(|e| tracing::warn!(error = %e, "cannot read the disabled connectors"))
        .ok()
}

/// Writes the record of a change made only once it is written (a reload, an enable). Admin
/// records are waited for as any other ([`crate::broker::Live::audit_by`]): a disk that stopped answering
/// must not hold an admin change — and the admin lock, and the kill switch behind it — for ever. Not
/// acknowledged in time, the change is not made — but the record may still land saying it
/// was: `correction` then follows it, saying it was not.
async fn append_or_correct(
    broker: &Broker,
    record: Record,
    correction: Record,
) -> Result<u64, AuditError> {
    match broker
        .audit
        .append_within(record, broker.live().audit_by())
        .await
    {
        Ok(seq) => Ok(seq),
        Err(AppendLate::Failed(e)) => Err(e),
        Err(AppendLate::Pending(pending)) => {
            pending.then_queue(correction);
            Err(AuditError::TimedOut)
        }
    }
}

/// What a `jti` given to `/v1/revoke` turned out to be.
enum GivenJti {
    /// A jti (or anything else that is not a token): revoked as given.
    Jti(String),
    /// A whole token pasted in its place: the jti it names, and its `exp` if it says one.
    FromToken { jti: String, exp: Option<i64> },
    /// A token whose `jti` claim cannot be read.
    UnreadableToken,
    /// Neither a jti nor a token: whitespace, a control byte or a `.` inside, or too long —
    /// likely a piece of a token or a header line, which must not be written anywhere.
    NotAJti,
}

/// The longest jti taken as given (the broker's own are 22 characters).
const MAX_JTI_LEN: usize = 128;

/// Tells a jti from a whole JWT pasted in its place (three base64url parts, also as a
/// `Bearer …` header value or with whitespace around it, as copied from a header dump or a
/// file), whose `jti` claim is then read — without verifying it: revoking a jti is harmless
/// whoever names it.
fn given_jti(value: String) -> GivenJti {
    if let Some(token) = token_shaped(&value) {
        return crate::token::verify::unverified_jti_and_exp(token)
            .map_or(GivenJti::UnreadableToken, |(jti, exp)| {
                GivenJti::FromToken { jti, exp }
            });
    }
    let plain = !value.is_empty()
        && value.len() <= MAX_JTI_LEN
        && value.bytes().all(|b| b.is_ascii_graphic() && b != b'.');
    if plain {
        GivenJti::Jti(value)
    } else {
        GivenJti::NotAJti
    }
}

/// The token in `value` if it is shaped like one — three base64url parts, the first two JSON
/// objects (`eyJ…`), alone or as `Bearer <token>`, whitespace around it allowed. (A name
/// with two dots, `acme.triage.bot`, is not one.)
fn token_shaped(value: &str) -> Option<&str> {
    let trimmed = value.trim_ascii();
    let unprefixed = trimmed
        .get(..7)
        .filter(|p| p.eq_ignore_ascii_case("bearer "))
        .map_or(trimmed, |_| trimmed[7..].trim_ascii_start());
    let parts: Vec<&str> = unprefixed.split('.').collect();
    let shaped = parts.len() == 3
        && parts[..2].iter().all(|p| p.starts_with("eyJ"))
        && unprefixed
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    shaped.then_some(unprefixed)
}

/// The longest a single-token revocation is kept (an `exp` beyond it is taken as this).
const MAX_REVOCATION_SECS: i64 = 366 * 24 * 3600;

/// How long any token issued now can stay acceptable: `max_ttl` plus the clock-skew leeway.
/// A `jti` revoked without its `exp` is kept at least that long.
fn longest_life(broker: &Broker) -> i64 {
    let tokens = &broker.live().config.tokens;
    i64::try_from((tokens.max_ttl + tokens.leeway).as_secs()).unwrap_or(i64::MAX / 2)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    jti: Option<String>,
    client: Option<String>,
    connector: Option<String>,
    /// With `jti`: the token's expiry, so the entry can be dropped later (a pasted token's own
    /// `exp` when not given). Without it the entry is kept the longest (a year, or a token's
    /// longest life if that is longer): the `max_ttl` in force now says nothing of tokens
    /// issued before a reload that shortened it, or by an earlier process.
    exp: Option<i64>,
}

/// The longest an admin change waits for its (small) JSON body.
const ADMIN_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The body as `T`; `expected` says what it should be, for the error.
async fn read_json<T: for<'de> Deserialize<'de>>(
    req: Request<Incoming>,
    expected: &str,
) -> Result<T, String> {
    // A few hundred bytes at most: a client that does not send them in time is not waited for.
    let collect = Limited::new(req.into_body(), MAX_ADMIN_BODY).collect();
    let bytes: Bytes = tokio::time::timeout(ADMIN_BODY_TIMEOUT, collect)
        .await
        .map_err(|_| "the body did not arrive in time".to_owned())?
        .map_err(|_| "body too large or cut off".to_owned())?
        .to_bytes();
    // The parser's own message quotes what it choked on (`invalid type: string "…"`, an
    // unknown field's name): a secret pasted in a wrong shape would reach the answer and the
    // audit record. Only where and what kind of error it was is said.
    serde_json::from_slice(&bytes).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Data => "not the expected fields and types",
            serde_json::error::Category::Eof => "cut off",
            serde_json::error::Category::Syntax | serde_json::error::Category::Io => "not JSON",
        };
        format!(
            "invalid JSON body ({what}, at line {} column {}): expected {expected}",
            e.line(),
            e.column()
        )
    })
}

async fn revoke(
    broker: &Arc<Broker>,
    req: Request<Incoming>,
    actor: &str,
    request_id: &str,
) -> Response<ProxyBody> {
    let expected = r#"an object with one of "jti", "client" or "connector""#;
    let mut body: RevokeRequest = match read_json(req, expected).await {
        Ok(b) => b,
        Err(e) => return refused(broker, "revoke", None, actor, &e, request_id).await,
    };
    // A whole token pasted for its jti is revoked by the jti it names; the token itself is
    // never written to the audit log nor echoed back.
    if let Some(given) = body.jti.take() {
        match given_jti(given) {
            GivenJti::Jti(jti) => body.jti = Some(jti),
            // The token's own `exp` says how long its revocation must be kept, unless the
            // admin said it (either is still kept at least as long as a token issued now).
            GivenJti::FromToken { jti, exp } => {
                body.jti = Some(jti);
                body.exp = body.exp.or(exp);
            }
            GivenJti::UnreadableToken => {
                let why = "a token was given as the jti, and its jti claim cannot be read";
                return refused(broker, "revoke", None, actor, why, request_id).await;
            }
            GivenJti::NotAJti => {
                let why = "the jti is not one: it is empty, longer than 128 bytes, or holds \
                           whitespace, a control byte, a non-ASCII byte or a '.'";
                return refused(broker, "revoke", None, actor, why, request_id).await;
            }
        }
    }
    let now = Utc::now().timestamp();
    let (action, target) = match (&body.jti, &body.client, &body.connector) {
        (Some(jti), None, None) => ("revoke", format!("jti:{jti}")),
        (None, Some(client), None) => ("revoke", format!("client:{client}")),
        (None, None, Some(connector)) => ("disable", format!("connector:{connector}")),
        _ => {
            let why = "give exactly one of jti, client, connector";
            return refused(broker, "revoke", None, actor, why, request_id).await;
        }
    };
    let named = body.jti.iter().chain(&body.client).chain(&body.connector);
    if named.clone().any(|v| broker.live().is_held_secret(v)) {
        return refused(broker, action, None, actor, PASTED_SECRET, request_id).await;
    }
    // A token given as the client or connector (its jti was meant): as a client it would be
    // "revoked" — a name no token carries — and written to the log and the state file.
    if body
        .client
        .iter()
        .chain(&body.connector)
        .any(|v| token_shaped(v).is_some())
    {
        return refused(broker, action, None, actor, PASTED_TOKEN, request_id).await;
    }
    if named.clone().any(|v| v.is_empty()) {
        let why = "the jti, client or connector is empty";
        return refused(broker, action, Some(&target), actor, why, request_id).await;
    }
    if let Some(connector) = &body.connector {
        if broker.live().config.connector(connector).is_none() {
            // Not recorded or echoed: it names nothing, and may be anything pasted.
            let why = "unknown connector (the value given is not recorded)";
            return refused(broker, action, None, actor, why, request_id).await;
        }
    }
    // A client the config in force does not name: most likely a typo, but maybe a client
    // just removed (revoked as a backstop, should it come back) or one another replica still
    // has. A revocation only tightens, so it is made — and the answer says so.
    let unknown_client = body
        .client
        .as_ref()
        .is_some_and(|c| broker.live().config.client(c).is_none());
    // A revocation or a kill switch tightens: it takes effect even when it cannot be audited
    // (refusing it because the disk is full would keep a leaked token working), and the
    // answer says so.
    let change = match (body.jti, body.client, body.connector) {
        // Kept at least as long as any token issued now could live, whatever `exp` says (a
        // wrong one must not make the revocation go while the token still passes).
        (Some(jti), ..) => {
            // Never shorter than the longest life, even when that exceeds the usual cap (a
            // `max_ttl` over a year): `clamp` with its bounds crossed would panic.
            let at_least = now.saturating_add(longest_life(broker));
            let at_most = now.saturating_add(MAX_REVOCATION_SECS).max(at_least);
            Change::RevokeJti {
                jti,
                exp: body.exp.unwrap_or(i64::MAX).clamp(at_least, at_most),
            }
        }
        (_, Some(client), _) => Change::RevokeClient { client, at: now },
        (.., Some(connector)) => Change::SetDisabled {
            connector,
            disabled: true,
        },
        _ => unreachable!("exactly one is set, checked above"),
    };
    // One admin change at a time, as `enable` does: a kill switch applied between an
    // enable's record and its taking effect would be undone while the log ends on it.
    let _one_at_a_time = broker.admin_changes.lock().await;
    let result = broker.state.apply(change.clone()).await;
    // What the apply made of changes deferred earlier is recorded before this change.
    audit_replayed(broker).await;
    let (result, to_defer) = match result {
        Err(e) if !e.applied() && broker.state.defers() => (Err(e.deferred()), Some(change)),
        result => (result, None),
    };
    let audited = admin_outcome(broker, action, &target, actor, &result, request_id).await;
    // Kept only once its `deferred` record is written: its `ok` record (once made) cannot
    // come first. Kept even when that record could not be written: it only tightens.
    let result = match to_defer {
        Some(change) => defer(broker, change, result, actor, request_id).await,
        None => result,
    };
    let response = answer(action, &target, result, audited, request_id);
    if unknown_client && response.status() == StatusCode::OK {
        tracing::warn!(%target, "revoked a client the config in force does not name");
        return ok(serde_json::json!({
            "result": "ok", "action": action, "target": target,
            "warning": "the config in force names no such client: check the spelling",
        }));
    }
    response
}

/// A revocation or kill switch the shared state could not take is kept and made there as soon
/// as it can (`state::redis::Deferred`): told only to retry, an operator in the middle of an
/// incident would find the connector serving again once Redis is back. `result` is the
/// `Deferred` error the answer reports; it says so when the journal could not be written.
async fn defer(
    broker: &Broker,
    change: Change,
    result: Result<(), StateError>,
    actor: &str,
    request_id: &str,
) -> Result<(), StateError> {
    let deferred = Deferred {
        change,
        request_id: request_id.to_owned(),
        actor: actor.to_owned(),
    };
    match (broker.state.defer(deferred).await, result) {
        (false, Err(StateError::Deferred(why))) => Err(StateError::Deferred(format!(
            "{why}; kept in memory only (the journal could not be written): a restart before \
             then loses it"
        ))),
        (_, result) => result,
    }
}

/// Audits the deferred revocations and kill switches made in the shared state since the last
/// call: `result: "ok"`, with the request id and actor of the admin call that asked (whose own
/// record says `deferred`). One caller at a time, from taking the list to its last record: an
/// enable's record must not slip in between a switch-off's being taken and its record. Records
/// that cannot be written go back on the list for the next call.
pub async fn audit_replayed(broker: &Broker) {
    let _in_order = broker.replayed_audit.lock().await;
    let mut made = broker.state.take_replayed().into_iter();
    while let Some(change) = made.next() {
        let (action, target) = match &change.change {
            Change::RevokeJti { jti, .. } => ("revoke", format!("jti:{jti}")),
            Change::RevokeClient { client, .. } => ("revoke", format!("client:{client}")),
            Change::SetDisabled {
                connector,
                disabled,
            } => (
                if *disabled { "disable" } else { "enable" },
                format!("connector:{connector}"),
            ),
        };
        let record = record_of(
            action,
            Some(&target),
            change.actor.clone(),
            "ok",
            Some(&change.request_id),
        );
        // Put back also when it is only late (still queued): its batch may yet fail, and a
        // change in force must not go unrecorded. The price, during a long stall, is a copy of
        // the record per try, all landing once the disk answers.
        if let Err(e) = broker
            .audit
            .append_by(record, broker.live().audit_by())
            .await
        {
            tracing::error!(error = %e, action, "cannot write the audit record of a deferred admin change now made; tried again later");
            broker
                .state
                .return_replayed(std::iter::once(change).chain(made).collect());
            return;
        }
    }
}

/// Why a revoke or enable naming a secret is refused (the record has no target).
const PASTED_SECRET: &str = "the value given is a secret the broker holds (a client secret, \
     the admin token or a connector's credential), not a jti, client or connector: nothing \
     was changed, and the value is not recorded";

/// Why a revoke or enable naming a token as a client or connector is refused.
const PASTED_TOKEN: &str = "the value given is a token, not a client or connector: to revoke \
     that token, give it (or its jti) as \"jti\"; nothing was changed, and the value is not \
     recorded";

/// A refused admin call: audited as `failed` with the reason, answered 400.
async fn refused(
    broker: &Broker,
    action: &str,
    target: Option<&str>,
    actor: &str,
    why: &str,
    request_id: &str,
) -> Response<ProxyBody> {
    let mut record = admin_record(action, target, actor, "failed", Some(request_id));
    record.error = Some(why.to_owned());
    if let Err(e) = broker
        .audit
        .append_by(record, broker.live().audit_by())
        .await
    {
        tracing::error!(error = %e, "cannot write the admin audit record of a refused call");
    }
    bad(why, request_id)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnableRequest {
    connector: String,
}

async fn enable(
    broker: &Arc<Broker>,
    req: Request<Incoming>,
    actor: &str,
    request_id: &str,
) -> Response<ProxyBody> {
    let body: EnableRequest = match read_json(req, r#"an object with "connector""#).await {
        Ok(b) => b,
        Err(e) => return refused(broker, "enable", None, actor, &e, request_id).await,
    };
    if broker.live().is_held_secret(&body.connector) {
        return refused(broker, "enable", None, actor, PASTED_SECRET, request_id).await;
    }
    if token_shaped(&body.connector).is_some() {
        return refused(broker, "enable", None, actor, PASTED_TOKEN, request_id).await;
    }
    let target = format!("connector:{}", body.connector);
    // A connector that was removed from the config may still be listed as disabled: enabling
    // it clears the entry. Anything else unknown is a typo worth saying so.
    if broker.live().config.connector(&body.connector).is_none() {
        match broker.state.is_disabled(&body.connector).await {
            Ok(true) => {}
            Ok(false) => {
                // Not recorded or echoed: it names nothing, and may be anything pasted.
                let why = "unknown connector (the value given is not recorded)";
                return refused(broker, "enable", None, actor, why, request_id).await;
            }
            Err(e) => {
                let result = Err(e);
                let audited =
                    admin_outcome(broker, "enable", &target, actor, &result, request_id).await;
                return answer("enable", &target, result, audited, request_id);
            }
        }
    }
    // Enabling loosens: its record is written first, and only then does it take effect (no
    // call can pass under an enable the log does not show). Unreachable shared state is found
    // before that record, so the log does not say `ok` for an enable that cannot be made.
    let _one_at_a_time = broker.admin_changes.lock().await;
    // Revocations and kill switches deferred while Redis could not take them are made (and
    // audited) first: this enable's record must not precede a switch-off that lands after it.
    let ready = match broker.state.ping().await {
        Ok(()) => broker.state.replay_deferred().await,
        Err(e) => Err(e),
    };
    audit_replayed(broker).await;
    if let Err(e) = ready {
        let result = Err(e);
        let audited = admin_outcome(broker, "enable", &target, actor, &result, request_id).await;
        return answer("enable", &target, result, audited, request_id);
    }
    let record = admin_record("enable", Some(&target), actor, "ok", Some(request_id));
    let mut not_made = admin_record("enable", Some(&target), actor, "failed", Some(request_id));
    not_made.error = Some("not made: its audit record was not acknowledged in time".into());
    if let Err(e) = append_or_correct(broker, record, not_made).await {
        tracing::error!(error = %e, %target, "cannot audit an enable; the connector stays disabled");
        return audit_unavailable(
            "the audit log cannot be written; the connector stays disabled",
            request_id,
        );
    }
    let result = broker
        .state
        .apply(Change::SetDisabled {
            connector: body.connector.clone(),
            disabled: false,
        })
        .await;
    if let Err(e) = &result {
        // Not in force (shared state unreachable), or in force but a restart would disable
        // it again (state file): the log says which.
        let mut record = admin_record("enable", Some(&target), actor, outcome(e), Some(request_id));
        record.error = Some(e.to_string());
        if let Err(e) = broker
            .audit
            .append_by(record, broker.live().audit_by())
            .await
        {
            tracing::error!(error = %e, "cannot write the admin audit record of a failed enable");
        }
    }
    answer("enable", &target, result, true, request_id)
}

/// The audit `result` of an admin change that hit a state error.
fn outcome(e: &StateError) -> &'static str {
    match e {
        StateError::Deferred(_) => "deferred",
        StateError::Unconfirmed(_) => "unconfirmed",
        e if e.applied() => "not_persisted",
        _ => "failed",
    }
}

/// Audits an admin action that was applied; returns whether the record was written.
async fn admin_outcome(
    broker: &Broker,
    action: &str,
    target: &str,
    actor: &str,
    result: &Result<(), StateError>,
    request_id: &str,
) -> bool {
    let outcome = result.as_ref().err().map_or("ok", outcome);
    let mut record = admin_record(action, Some(target), actor, outcome, Some(request_id));
    if let Err(e) = result {
        record.error = Some(e.to_string());
    }
    // The change is in force whatever happens to its record: if that cannot be written now,
    // it is kept and written with the next batch the disk takes, so the log does not show
    // refusals (`connector_disabled`, `token_revoked`) that no record explains.
    let mut late = record.clone();
    match broker
        .audit
        .append_by(record, broker.live().audit_by())
        .await
    {
        Ok(_) => true,
        // Still queued: it lands once the disk answers.
        Err(e @ AuditError::TimedOut) => {
            tracing::error!(error = %e, action, target, "admin change is in force but its audit record is late");
            false
        }
        Err(e) => {
            tracing::error!(error = %e, action, target, "admin change is in force but could not be audited now; its record is written once the log takes writes");
            late.error = Some(format!(
                "{}recorded late: the audit log could not be written when the change took effect",
                late.error.map(|e| e + "; ").unwrap_or_default()
            ));
            if let Err(e) = broker.audit.append_detached(late) {
                tracing::error!(error = %e, action, target, "cannot queue the late audit record of an admin change");
            }
            false
        }
    }
}

/// The answer to an admin action. A state-file error still leaves the change in force in
/// memory (a revocation must bite now) and is reported as a 500 so ops know it will not
/// survive a restart; unreachable shared state means the change was not made (503, retry);
/// a missing audit record is a 503.
fn answer(
    action: &str,
    target: &str,
    result: Result<(), StateError>,
    audited: bool,
    request_id: &str,
) -> Response<ProxyBody> {
    if let Err(e) = &result {
        tracing::error!(error = %e, action, target, "admin change failed or was not persisted");
    }
    match (result, audited) {
        (Ok(()), true) => {
            ok(serde_json::json!({"result": "ok", "action": action, "target": target}))
        }
        // Not in force where Redis is reached now: 503, as for a change not made, with what
        // was kept and what to do.
        (Err(e @ StateError::Deferred(_)), true) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"error": "state_unavailable", "kept": true, "action": action, "target": target, "error_description": format!("{e}; until then this replica decides no call and issues no token. Replicas that reach Redis now do not have it: repeat the request on one of them (it is idempotent)"), "request_id": request_id}),
        ),
        (Err(e @ StateError::Deferred(_)), false) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"error": "audit_unavailable", "kept": true, "action": action, "target": target, "error_description": format!("{e}, but the audit log cannot be written. Replicas that reach Redis now do not have it: repeat the request on one of them (it is idempotent)"), "request_id": request_id}),
        ),
        (Err(e @ StateError::Unconfirmed(_)), _) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"error": "state_unavailable", "error_description": format!("not confirmed: {e}; it may still take effect: check GET /v1/connectors and retry (the change is idempotent)"), "request_id": request_id}),
        ),
        (Err(e), _) if !e.applied() => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"error": "state_unavailable", "error_description": format!("not applied: {e}; retry"), "request_id": request_id}),
        ),
        (_, false) => audit_unavailable(
            "in force now, but the audit log cannot be written",
            request_id,
        ),
        (Err(_), true) => json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({"error": "server_error", "error_description": "in force now, but not persisted to the state directory", "request_id": request_id}),
        ),
    }
}

/// The config as ops see it: owners, purposes, expiry, operations, who holds what. No secrets.
fn connectors_view(broker: &Broker, disabled: Option<&HashSet<String>>) -> serde_json::Value {
    let live = broker.live();
    let config = &live.config;
    let now = Utc::now();
    let connectors: Vec<serde_json::Value> = config
        .connectors
        .iter()
        .map(|c| {
            let grants: Vec<serde_json::Value> = config
                .clients
                .iter()
                .flat_map(|cl| cl.grants.iter().filter(|g| g.connector == c.name).map(move |g| (cl, g)))
                .map(|(cl, g)| {
                    serde_json::json!({
                        "client": cl.id,
                        "operations": g.operations,
                        "expires": g.expires.map(|e| e.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
                        "reason": g.reason,
                        "live": g.is_live(now),
                    })
                })
                .collect();
            let mut view = serde_json::json!({
                "name": c.name,
                "owner": c.owner,
                "purpose": c.purpose,
                "expires": c.expires_text,
                "expired": c.is_expired(now),
                "upstream": c.upstream.url,
                "auth": match &c.auth {
                    crate::config::AuthMethod::Bearer => "bearer",
                    crate::config::AuthMethod::Header { .. } => "header",
                    crate::config::AuthMethod::Basic { .. } => "basic",
                    crate::config::AuthMethod::Query { .. } => "query",
                },
                "credential": live.connectors.get(&c.name).and_then(|r| r.dynamic.as_ref())
                    .map_or_else(|| serde_json::json!({"type": "static"}), |d| d.view()),
                "rate_limit": c.rate_limit.map(|r| serde_json::json!({"per_second": r.per_second, "burst": r.burst})),
                "operations": c.operations.iter().map(|o| serde_json::json!({
                    "name": o.name, "method": o.method.as_str(), "path": o.pattern.as_str(),
                    "query": o.query, "max_body_bytes": o.max_body_bytes,
                })).collect::<Vec<_>>(),
                "grants": grants,
                "usage": broker.metrics.usage(&c.name),
            });
            // Left out, not guessed, when the shared state cannot be read.
            if let Some(disabled) = disabled {
                view["enabled"] = (!disabled.contains(&c.name)).into();
            }
            view
        })
        .collect();
    serde_json::json!({ "connectors": connectors, "config_sha256": config.sha256 })
}
