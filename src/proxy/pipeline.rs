//! The proxy request pipeline — DESIGN §4.3's table, in order, in one function
//! (`stages`). Each stage is a small function named for its check; any refusal is audited
//! as a `proxy` deny record and answered by [`Refusal::into_response`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, UPGRADE};
use http::{HeaderName, Method, Request, Response, Uri};
use http_body::Body as _;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;

use super::body::{self, LimitedBody, ObservedBody, Outcome};
use super::canonical;
use super::headers;
use super::inject::{Echoes, Injection};
use super::redact::{
    presented_tokens, recorded_query, redact_jwt_shapes, redact_query_param, redact_token,
    token_copied_elsewhere,
};
use super::respond::{full, Refusal};
use super::ProxyBody;
use crate::audit::{AppendLate, AuditError, AuditLog, Decision, Event, PendingAppend, Record};
use crate::broker::{take, Broker, ConnectorRuntime, Live, Spend};
use crate::config::{Client, Connector, Operation};
use crate::credential::{DynamicCredential, Minted};
use crate::server::RequestId;
use crate::state::redis::{Admission, AdmitRequest};
use crate::state::{RedisState, StateStore};
use crate::tls::{ClientCaId, PeerIdentity};
use crate::token::verify::{TokenError, TokenMemo};
use crate::token::AccessClaims;

/// What the listener knows about the connection a request came on.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    /// The verified client certificate, on an mTLS connection that presented one.
    pub client_cert: Option<Arc<PeerIdentity>>,
    /// `peer` as text and its IP as a header value, made once per connection for audit
    /// records and `X-Forwarded-For`.
    pub peer_text: String,
    pub peer_ip_value: Option<HeaderValue>,
    /// The token verified last on this connection.
    pub token_memo: TokenMemo,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, tls: bool, client_cert: Option<Arc<PeerIdentity>>) -> Self {
        Self {
            peer,
            tls,
            client_cert,
            peer_text: peer.to_string(),
            peer_ip_value: HeaderValue::try_from(peer.ip().to_string()).ok(),
            token_memo: TokenMemo::default(),
        }
    }

    /// The client certificate this connection presented, if it still identifies the client at
    /// `now` (Unix seconds) with `in_force` the listener's `client_ca` now
    /// ([`PeerIdentity::counts`]).
    pub fn client_cert_at(&self, now: i64, in_force: Option<ClientCaId>) -> Option<&PeerIdentity> {
        self.client_cert
            .as_deref()
            .filter(|cert| cert.counts(now, in_force))
    }
}

/// A refusal plus the specific cause recorded in the audit log's `reason`.
#[derive(Debug)]
pub struct Denial {
    pub refusal: Refusal,
    pub reason: &'static str,
}

impl From<Refusal> for Denial {
    fn from(refusal: Refusal) -> Self {
        let reason = refusal.code();
        Self { refusal, reason }
    }
}

fn deny(refusal: Refusal, reason: &'static str) -> Denial {
    Denial { refusal, reason }
}

/// The request target split at the connector: `/github/repos/x` → (`github`, `/repos/x`).
struct Target<'a> {
    connector: &'a str,
    /// The path after `/{connector}`, exactly as received (`/` when nothing follows).
    path: &'a str,
    query: Option<&'a str>,
}

/// Everything the `proxy` audit record says about the request, filled in as stages learn it,
/// and how far the call got in the log.
struct AuditFacts {
    record: Record,
    stage: Stage,
}

/// The reason of a call whose client went away before it was decided.
const CLIENT_CLOSED: &str = "client_closed";

/// Which records a call still owes the audit log (see [`Call`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// No decision recorded yet.
    Deciding,
    /// The allow record is queued, not yet acknowledged. A call dropped now queues its outcome
    /// (not forwarded) behind it, never before it.
    AllowQueued,
    /// The allow record is written, the outcome not yet.
    Allowed,
    /// Every record is written or handed to something that writes it.
    Recorded,
}

/// One call's audit facts, with the promise that a call dropped midway — its client went
/// away while a credential was minted or the upstream was thinking — still leaves its
/// records: a `proxy` deny (`client_closed`) if no decision was recorded, a `proxy_result`
/// if the allow record was. An auditor never sees a call (or a spent `max_uses` use) without
/// a trace.
struct Call<'a> {
    audit: &'a AuditLog,
    /// The config the call started under: what its deny record must not hold comes from it.
    live: &'a Live,
    facts: AuditFacts,
    started: Instant,
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        let record = match self.facts.stage {
            Stage::Recorded => return,
            Stage::AllowQueued => {
                let mut record = self.facts.take_for_result();
                record.duration_ms = Some(self.started.elapsed().as_millis() as u64);
                record.bytes_in = Some(0);
                record.bytes_out = Some(0);
                record.error = Some(
                    "not forwarded: the client went away while its allow record was being written"
                        .into(),
                );
                if let Err(e) = self.audit.append_behind(record) {
                    log_unqueued(&e, "the audit record of an abandoned call");
                }
                return;
            }
            Stage::Deciding => {
                // Redacted as every deny record is (`record_denial`).
                self.facts.redact_credential_parameter(self.live);
                let mut record = std::mem::take(&mut self.facts.record);
                record.decision = Some(Decision::Deny);
                record.reason = Some(CLIENT_CLOSED.into());
                record
            }
            Stage::Allowed => {
                let mut record = self.facts.take_for_result();
                record.duration_ms = Some(self.started.elapsed().as_millis() as u64);
                record.error = Some("client went away before the upstream answered".into());
                record
            }
        };
        if let Err(e) = self.audit.append_detached(record) {
            log_unqueued(&e, "the audit record of an abandoned call");
        }
    }
}

/// Says that a record nobody waits on could not be queued — unless the writer already said so
/// naming the record (a full queue while the disk is not answering), once is enough.
fn log_unqueued(e: &AuditError, what: &str) {
    if !matches!(e, AuditError::Backlog) {
        tracing::error!(error = %e, "cannot queue {what}");
    }
}

/// Handles one proxied call end to end.
pub async fn proxy(
    broker: Arc<Broker>,
    req: Request<Incoming>,
    conn: &ConnInfo,
    id: &RequestId,
) -> Response<ProxyBody> {
    let request_id = id.as_str();
    let started = Instant::now();
    let _in_flight = broker.audit.call_in_flight();
    let live = broker.live();
    let mut call = Call {
        audit: &broker.audit,
        live: &live,
        facts: AuditFacts::new(&req, conn, request_id),
        started,
    };
    let facts = &mut call.facts;
    match stages(&broker, &live, req, conn, id, facts, started).await {
        Ok(response) => response,
        Err(denial) => record_denial(&broker, &live, facts, denial, started, request_id).await,
    }
}

/// A call whose request line and headers exceed `max_header_bytes` (but not hyper's own
/// buffer, which answers a bare 431 itself): refused 431 before any check reads it, and
/// recorded as a `proxy` deny (`headers_too_large`) like every other refusal.
pub async fn refuse_oversized_head(
    broker: Arc<Broker>,
    req: Request<Incoming>,
    conn: &ConnInfo,
    id: &RequestId,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let live = broker.live();
    let mut facts = AuditFacts::new(&req, conn, id.as_str());
    let denial = deny(Refusal::HeadersTooLarge, "headers_too_large");
    record_denial(&broker, &live, &mut facts, denial, started, id.as_str()).await
}

/// Counts and records a refused call, then answers it.
async fn record_denial(
    broker: &Broker,
    live: &Live,
    facts: &mut AuditFacts,
    denial: Denial,
    started: Instant,
    request_id: &str,
) -> Response<ProxyBody> {
    let took = started.elapsed();
    // What the metric is labelled by (the append takes the record).
    let mut labels = Record::new(Event::Proxy);
    labels.connector.clone_from(&facts.record.connector);
    labels.operation.clone_from(&facts.record.operation);
    facts.deny(&denial);
    facts.redact_credential_parameter(live);
    facts.stage = Stage::Recorded;
    let record = std::mem::take(&mut facts.record);
    // Nothing waits on a deny record but the answer's order after it: bounded all the same,
    // so a disk that stopped answering cannot hold the call forever. While the log cannot be
    // written the broker refuses with 503 (DESIGN §6), a refusal too: the call is refused
    // either way, and the answer (and the metric) say why nothing is being decided now.
    let refusal = match broker.audit.append_by(record, live.audit_by()).await {
        Ok(_) => denial.refusal,
        Err(e) => {
            tracing::error!(error = %e, "cannot write the audit record of a denied call");
            Refusal::AuditUnavailable
        }
    };
    let reason = match refusal {
        Refusal::AuditUnavailable => refusal.code(),
        _ => denial.reason,
    };
    broker
        .metrics
        .proxy_denied(&live.config, &labels, reason, took);
    refusal.into_response(request_id)
}

/// DESIGN §4.3, rows 1 to 8.
async fn stages(
    broker: &Arc<Broker>,
    live: &Arc<Live>,
    req: Request<Incoming>,
    conn: &ConnInfo,
    request_id: &RequestId,
    facts: &mut AuditFacts,
    started: Instant,
) -> Result<Response<ProxyBody>, Denial> {
    let (mut parts, body) = req.into_parts();
    // The target borrows from its own copy of the URI (a reference-counted clone), so `parts`
    // can move into the upstream request later.
    let uri = parts.uri.clone();
    // 1. The target is canonical and unambiguous; every later decision is on these bytes.
    let target = canonical_target(live, &parts.method, &uri, parts.version, &parts.headers)?;
    facts.target(&target);
    // 2. The bearer token is genuine, current, unrevoked, and bound to this connection.
    // The wall clock, read once for the call's checks (a read and its calendar arithmetic
    // cost more than passing it along).
    let wall = chrono::Utc::now();
    let claims = authenticate(broker, live, &parts.headers, conn, facts, wall.timestamp())?;
    // 3. An operation of the connector *as configured now* matches, is in scope, is granted.
    let (connector, runtime, op_index) = match &*broker.state {
        StateStore::Memory(_) => {
            let found = authorize(broker, live, &claims, &parts.method, &target, wall, facts)?;
            facts.operation(&found.0.operations[found.2].name);
            // 4. A `max_uses` token still has a use left.
            spend_use(broker, &claims)?;
            // 5. The client's and the connector's rate limits.
            rate_limit(live, found.1, &claims.sub)?;
            found
        }
        // 2–5 on the state shared by every replica, in one round trip.
        StateStore::Redis(redis) => {
            let local = check_binding(broker, &claims, conn, wall.timestamp()).and_then(|()| {
                authorize(broker, live, &claims, &parts.method, &target, wall, facts)
            });
            // Boxed, as every rare path with a large future is here: a call's future is
            // as large as its largest await, and it is moved and held for every call.
            Box::pin(shared_checks(
                redis,
                live,
                &claims,
                target.connector,
                local,
                facts,
                Taking::UsesAndRates,
            ))
            .await?
        }
    };
    let operation = &connector.operations[op_index];
    // 6. The body fits the operation's `max_body_bytes`.
    let bytes_in = Arc::new(AtomicU64::new(0));
    let body_deadline = started + live.config.server.request_timeout;
    // Whether the call waited since its checks (a chunked upload read whole, a credential
    // minted): then it is decided again before its allow record.
    let mut waited = false;
    let (body, uploaded) = noting_wait(
        bounded_body(
            body,
            &mut parts.headers,
            operation.max_body_bytes,
            &bytes_in,
            body_deadline,
        ),
        &mut waited,
    )
    .await?;
    // 6½ (DESIGN §3.7). The upstream credential: static, cached, or minted now — within the
    // request's time, like everything else (the mint itself carries on for the next call).
    let credential = if runtime.dynamic.is_none() {
        CallCredential::Static(runtime)
    } else {
        noting_wait(
            tokio::time::timeout_at(
                tokio::time::Instant::from_std(body_deadline),
                upstream_credential(broker, connector, runtime, request_id.as_str()),
            ),
            &mut waited,
        )
        .await
        .map_err(|_| {
            tracing::warn!(connector = %connector.name, "no upstream credential within request_timeout; refusing the call");
            deny(Refusal::CredentialUnavailable, "credential_unavailable")
        })??
    };
    if waited || !broker.live_is(live) {
        Box::pin(decide_again(
            broker,
            &parts.headers,
            conn,
            &parts.method,
            &target,
            facts,
        ))
        .await?;
    }
    // The request as it will leave, credential injected (in memory only: nothing is sent
    // before its allow record is durable, and a request that cannot be built is a deny).
    let upstream_req = upstream_request(
        parts,
        body,
        &target,
        connector,
        runtime,
        credential.injection(),
        conn,
        request_id.header(),
    )?;
    // 7. The allow record is durable before anything leaves, within the request's time. Once
    // queued it is written even if this call is dropped while waiting; once acknowledged, the
    // call owes its outcome.
    facts.redact_credential(credential.echoes());
    if runtime.dynamic.is_some() {
        // An OAuth2 connector's `client_secret` (see `ConnectorRuntime::echoes`).
        facts.redact_credential(&runtime.echoes);
    }
    let allow = facts.take_for_allow();
    facts.stage = Stage::AllowQueued;
    let written = match broker.audit.append_within(allow, body_deadline).await {
        Ok(_) => Ok(()),
        // Still queued: it may yet be written, so its outcome follows it — not forwarded.
        Err(AppendLate::Pending(pending)) => {
            return Ok(not_forwarded(broker, live, facts, started, pending));
        }
        Err(AppendLate::Failed(e)) => Err(e),
    };
    if let Err(e) = written {
        // The deny record says all the allow record would have.
        facts.refill(
            upstream_req.method(),
            &target,
            &claims,
            &operation.name,
            conn,
        );
        // Made again from the request: redacted again with the credential this call used
        // (the deny path looks for the one minted last, which may be newer).
        facts.redact_credential(credential.echoes());
        facts.stage = Stage::Deciding;
        tracing::error!(error = %e, "audit log unavailable; refusing to forward");
        return Err(Denial::from(Refusal::AuditUnavailable));
    }
    facts.stage = Stage::Allowed;
    runtime.metrics.allowed(op_index);
    // 8. Forward, stream the answer back, audit the outcome.
    Ok(forward(
        broker,
        live,
        connector,
        runtime,
        &credential,
        upstream_req,
        facts,
        Upload { bytes_in, uploaded },
        started,
    )
    .await)
}

/// Check 1 (DESIGN §4.3): origin-form, canonical path and query, no `Upgrade`, one
/// `Authorization`, no client copy of the injected header or query parameter.
fn canonical_target<'a>(
    live: &Live,
    method: &Method,
    uri: &'a Uri,
    version: http::Version,
    headers: &http::HeaderMap,
) -> Result<Target<'a>, Denial> {
    let bad =
        |reason: &'static str, text: &str| deny(Refusal::InvalidRequest(text.to_owned()), reason);
    // Origin-form is an HTTP/1 request-line rule. An HTTP/2 request always has `:scheme` and
    // `:authority`, which hyper puts in the URI; they are ignored (the upstream is the
    // connector's), and the path and query below are checked the same way.
    if version < http::Version::HTTP_2 && (uri.scheme().is_some() || uri.authority().is_some()) {
        return Err(bad(
            "absolute_form_target",
            "the request target must be origin-form (/path?query)",
        ));
    }
    let path = uri.path();
    canonical::check_path(path)
        .map_err(|e| deny(Refusal::InvalidRequest(e.to_string()), "non_canonical_path"))?;
    if let Some(q) = uri.query() {
        canonical::check_query(q).map_err(|e| {
            deny(
                Refusal::InvalidRequest(e.to_string()),
                "non_canonical_query",
            )
        })?;
    }
    // RFC 9112 §3.2, RFC 9113 §8.3.1: one Host, or an HTTP/2 `:authority` it agrees with (the
    // broker sends the upstream its own, but a front proxy may have routed on another).
    if !headers::host_is_unambiguous(version, uri, headers) {
        return Err(bad("bad_host", headers::HOST_RULE));
    }
    // RFC 9113 §8.2.1: an HTTP/2 field value never starts or ends with whitespace (HTTP/1.1
    // parsing trims it, so only HTTP/2 can bring it).
    if version == http::Version::HTTP_2 && headers.values().any(headers::has_edge_whitespace) {
        return Err(bad(
            "malformed_header",
            "an HTTP/2 field value starts or ends with whitespace",
        ));
    }
    if !headers::content_lengths_agree(headers) {
        return Err(bad("malformed_header", "the content-length values differ"));
    }
    if headers.contains_key(UPGRADE) {
        return Err(bad("upgrade_refused", "protocol upgrades are not proxied"));
    }
    if headers::has_other_transfer_coding(headers) {
        return Err(bad(
            "unsupported_transfer_coding",
            "only the chunked transfer coding is accepted",
        ));
    }
    if headers.get_all(AUTHORIZATION).iter().nth(1).is_some() {
        return Err(bad(
            "duplicate_authorization",
            "more than one Authorization header",
        ));
    }
    if presented_tokens(headers).any(|token| token_copied_elsewhere(method, uri, headers, token)) {
        return Err(bad(
            "token_outside_authorization",
            "the access token must be sent in the Authorization header only",
        ));
    }
    let (connector, path) = canonical::split_target(path);
    if let Some(runtime) = live.connectors.get(connector) {
        refuse_injected_copy(&runtime.injection, headers, uri.query())?;
    }
    Ok(Target {
        connector,
        path,
        query: uri.query(),
    })
}

/// DESIGN §3.8: the upstream must never receive two values for the credential.
fn refuse_injected_copy(
    injection: &Injection,
    headers: &http::HeaderMap,
    query: Option<&str>,
) -> Result<(), Denial> {
    let copy = match injection {
        Injection::Header { name, .. } => {
            name != AUTHORIZATION
                && (headers.contains_key(name) || has_underscore_alias(headers, name))
        }
        Injection::Query { name, .. } => query.is_some_and(|q| canonical::query_has_param(q, name)),
    };
    if copy {
        return Err(deny(
            Refusal::InvalidRequest(
                "the request carries the credential header or parameter the broker injects".into(),
            ),
            "client_supplied_credential",
        ));
    }
    Ok(())
}

/// Whether the request has a header whose name is `name` with `-` and `_` swapped anywhere
/// (`x_api_key` for `x-api-key`, or the other way): CGI-style servers read both as one header
/// (`HTTP_X_API_KEY`), so the upstream could see the client's value beside, or instead of,
/// the injected one.
fn has_underscore_alias(headers: &http::HeaderMap, name: &http::HeaderName) -> bool {
    let name = name.as_str().as_bytes();
    let dash_or_underscore = |b: &u8| matches!(b, b'-' | b'_');
    let same = |a: &u8, b: &u8| a == b || (dash_or_underscore(a) && dash_or_underscore(b));
    name.iter().any(dash_or_underscore)
        && headers.keys().any(|k| {
            let k = k.as_str().as_bytes();
            k.len() == name.len() && k.iter().zip(name).all(|(a, b)| same(a, b))
        })
}

/// Check 2: the bearer token. Once its signature verifies, `facts` names its client and
/// `jti`, so a revoked or replayed (wrong certificate) token is audited as that token.
fn authenticate(
    broker: &Broker,
    live: &Live,
    headers: &http::HeaderMap,
    conn: &ConnInfo,
    facts: &mut AuditFacts,
    now: i64,
) -> Result<Arc<AccessClaims>, Denial> {
    let token = bearer_token(headers)?;
    let claims = live
        .verifier
        // Verified tokens are cached by a hash of the token, and the last one on each
        // connection as it is (exp/nbf re-checked on every hit); revocation, binding and
        // max_uses below are checked on every call regardless.
        .verify_remembered(token, now, &conn.token_memo)
        .map_err(|refused| {
            // A genuine token refused for its times (or issuer, audience) is still a client's
            // token: its record names the client and the token, as a revoked one's does.
            if let Some(claims) = &refused.genuine {
                facts.token(claims);
            }
            let reason = match refused.error {
                TokenError::Expired => "token_expired",
                TokenError::NotYetValid => "token_not_yet_valid",
                _ => "token_invalid",
            };
            deny(Refusal::InvalidToken(refused.error.to_string()), reason)
        })?;
    facts.token(&claims);
    // With shared state, revocation is asked of Redis together with checks 3 to 5, and the
    // certificate binding is checked after it (`stages`), in this order.
    if let StateStore::Memory(r) = &*broker.state {
        if r.is_revoked(&claims.jti, &claims.sub, claims.iat) {
            return Err(revoked());
        }
        check_binding(broker, &claims, conn, now)?;
    }
    Ok(claims)
}

fn revoked() -> Denial {
    deny(
        Refusal::InvalidToken("the token has been revoked".into()),
        "token_revoked",
    )
}

/// The last part of check 2: a certificate-bound token (`cnf`) only on a connection that
/// presented that certificate, and while it still counts at `now` (unexpired, its CA still in
/// force: a connection cannot outlast the certificate it was bound by).
fn check_binding(
    broker: &Broker,
    claims: &AccessClaims,
    conn: &ConnInfo,
    now: i64,
) -> Result<(), Denial> {
    let Some(cnf) = &claims.cnf else {
        return Ok(());
    };
    let presented = conn.client_cert_at(now, broker.client_ca_in_force());
    if presented.is_some_and(|c| c.x5t_s256 == cnf.x5t_s256) {
        return Ok(());
    }
    // The right certificate, on a connection that outlived it: not a stolen token.
    let outlived = presented.is_none()
        && conn
            .client_cert
            .as_ref()
            .is_some_and(|c| c.x5t_s256 == cnf.x5t_s256);
    Err(if outlived {
        deny(
            Refusal::InvalidToken(
                "the client certificate this token is bound to has expired or its CA is no \
                 longer trusted; reconnect with a valid certificate"
                    .into(),
            ),
            "certificate_no_longer_valid",
        )
    } else {
        deny(
            Refusal::InvalidToken(
                "the token is bound to a client certificate this connection did not present".into(),
            ),
            "certificate_mismatch",
        )
    })
}

/// The token from `Authorization: Bearer …` (scheme case-insensitive, RFC 6750 §2.1).
fn bearer_token(headers: &http::HeaderMap) -> Result<&str, Denial> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Err(deny(Refusal::MissingToken, "token_missing"));
    };
    let value = value.to_str().map_err(|_| {
        deny(
            Refusal::InvalidToken("malformed Authorization header".into()),
            "token_invalid",
        )
    })?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        // Another scheme (Basic, …) carries no bearer token at all: RFC 6750 §3.1 answers
        // without an error code, as for no header.
        Some((scheme, _)) if !scheme.eq_ignore_ascii_case("bearer") => {
            Err(deny(Refusal::MissingToken, "token_missing"))
        }
        _ => Err(deny(
            Refusal::InvalidToken("the Authorization header must be `Bearer <token>`".into()),
            "token_invalid",
        )),
    }
}

/// Check 3: the call against the current config, the token's scope and its grants.
fn authorize<'l>(
    broker: &Broker,
    live: &'l Live,
    claims: &AccessClaims,
    method: &Method,
    target: &Target<'_>,
    now: chrono::DateTime<chrono::Utc>,
    facts: &mut AuditFacts,
) -> Result<(&'l Connector, &'l ConnectorRuntime, usize), Denial> {
    let scope = |reason, text: String| deny(Refusal::InsufficientScope(text), reason);
    let config = &live.config;
    let (Some(connector), Some(runtime)) = (
        config.connector(target.connector),
        live.connectors.get(target.connector),
    ) else {
        return Err(scope("unknown_connector", "no such connector".into()));
    };
    // (With shared state, the kill switch is asked of Redis with checks 4 and 5.)
    if matches!(&*broker.state, StateStore::Memory(r) if r.is_disabled(&connector.name)) {
        return Err(scope(
            "connector_disabled",
            format!("connector {} is disabled", connector.name),
        ));
    }
    if connector.is_expired(now) {
        return Err(scope(
            "connector_expired",
            format!("connector {} has expired", connector.name),
        ));
    }
    let Some(client) = config.client(&claims.sub) else {
        return Err(scope(
            "client_unknown",
            "the token's client is no longer configured".into(),
        ));
    };
    let mut why = "no_matching_operation";
    // The first operation that matched but was refused: the record names it (which ungranted
    // operation was tried is what a least-privilege review asks).
    let mut refused = None;
    let found = connector.router.find(method, target.path, |i| {
        let op = &connector.operations[i];
        let verdict = judge(client, claims, connector, op, method, target, now);
        if let Err(reason) = verdict {
            if refused.is_none() {
                (why, refused) = (reason, Some(i));
            }
        }
        verdict.is_ok()
    });
    if let (None, Some(i)) = (found, refused) {
        facts.operation(&connector.operations[i].name);
    }
    if let Some(i) = found {
        // A call made under a break-glass elevation says so, and why (see `Record::elevated_by`).
        let op = &connector.operations[i].name;
        facts
            .record
            .elevated_by(client.elevation(&connector.name, op, now));
    }
    match found {
        Some(i) => Ok((connector, runtime, i)),
        None => Err(scope(
            why,
            match why {
                "no_matching_operation" => format!(
                    "no operation of connector {} allows {method} on this path",
                    connector.name
                ),
                "query_not_allowed" => "a query parameter is not allowed by the operation".into(),
                "not_in_token_scope" => "the operation is not in the token's scope".into(),
                "not_in_authorization_details" => {
                    "the call is not the one the token's authorization_details name".into()
                }
                _ => "the operation is not granted to this client".into(),
            },
        )),
    }
}

/// Whether one matching operation may serve this call; the error is the audit reason.
fn judge(
    client: &Client,
    claims: &AccessClaims,
    connector: &Connector,
    op: &Operation,
    method: &Method,
    target: &Target<'_>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), &'static str> {
    if let (Some(allowed), Some(q)) = (&op.query, target.query) {
        if !canonical::query_names(q).all(|n| allowed.iter().any(|a| a == n)) {
            return Err("query_not_allowed");
        }
    }
    if !claims
        .scope_items()
        .any(|(c, o)| c == connector.name && o == op.name)
    {
        return Err("not_in_token_scope");
    }
    if let Some(details) = &claims.authorization_details {
        let bound = details.iter().any(|d| {
            d.connector == connector.name && d.method == method.as_str() && d.path == target.path
        });
        if !bound {
            return Err("not_in_authorization_details");
        }
    }
    if !client.is_granted(&connector.name, &op.name, now) {
        return Err("not_granted");
    }
    Ok(())
}

/// Check 4: single-use and `max_uses` tokens.
fn spend_use(broker: &Broker, claims: &AccessClaims) -> Result<(), Denial> {
    let Some(max) = claims.max_uses else {
        return Ok(());
    };
    match broker.consume_use(claims, max) {
        Spend::Spent => Ok(()),
        Spend::Exhausted => Err(deny(
            Refusal::InvalidToken("the token's max_uses are spent".into()),
            "max_uses_exhausted",
        )),
        // A restart must not give a spent token its uses back.
        Spend::Unknown => Err(deny(
            Refusal::InvalidToken(
                "the token's max_uses were counted by an earlier run of the broker".into(),
            ),
            "max_uses_unknown",
        )),
    }
}

/// Check 5: the client's limit, then the connector's.
fn rate_limit(live: &Live, runtime: &ConnectorRuntime, client: &str) -> Result<(), Denial> {
    if let Some(l) = live.client_limits.get(client) {
        take(l).map_err(|s| {
            deny(
                Refusal::RateLimited {
                    retry_after_secs: s.max(1),
                },
                "client_rate_limited",
            )
        })?;
    }
    if let Some(l) = &runtime.limiter {
        take(l).map_err(|s| {
            deny(
                Refusal::RateLimited {
                    retry_after_secs: s.max(1),
                },
                "connector_rate_limited",
            )
        })?;
    }
    Ok(())
}

/// Checks 2 to 5 against the state shared by replicas (DESIGN §7): Redis answers revocation,
/// kill switch, `max_uses` and rate limits in one atomic script, and its verdict is combined
/// with the local one of check 3 in §4.3's order. No answer from Redis refuses the call.
async fn shared_checks<'l>(
    redis: &RedisState,
    live: &'l Live,
    claims: &AccessClaims,
    connector_name: &str,
    authorized: Result<(&'l Connector, &'l ConnectorRuntime, usize), Denial>,
    facts: &mut AuditFacts,
    taking: Taking,
) -> Result<(&'l Connector, &'l ConnectorRuntime, usize), Denial> {
    // A certificate mismatch is check 2: the kill switch (check 3) is not asked.
    let binding_failed = matches!(&authorized, Err(d) if d.reason == "certificate_mismatch");
    let connector = live
        .config
        .connector(connector_name)
        .filter(|_| !binding_failed);
    let found = authorized.as_ref().ok();
    let call = AdmitRequest {
        jti: &claims.jti,
        client: &claims.sub,
        iat: claims.iat,
        exp: claims.exp,
        connector: connector.map(|c| c.name.as_str()),
        authorized: found.is_some(),
        max_uses: claims.max_uses.filter(|_| taking == Taking::UsesAndRates),
        client_limit: live
            .config
            .client(&claims.sub)
            .and_then(|c| c.rate_limit)
            .filter(|_| taking == Taking::UsesAndRates),
        connector_limit: found
            .and_then(|(c, ..)| c.rate_limit)
            .filter(|_| taking == Taking::UsesAndRates),
    };
    let verdict = redis.admit(&call).await.map_err(|e| {
        tracing::error!(error = %e, "shared state unavailable; refusing the call");
        deny(Refusal::StateUnavailable, "state_unavailable")
    })?;
    let limited =
        |retry_after_secs, reason| Err(deny(Refusal::RateLimited { retry_after_secs }, reason));
    if verdict == Admission::Revoked {
        return Err(revoked());
    }
    if let Some((c, _, i)) = found {
        facts.operation(&c.operations[*i].name);
    }
    match verdict {
        Admission::Revoked => Err(revoked()),
        Admission::Disabled => Err(deny(
            Refusal::InsufficientScope(format!("connector {connector_name} is disabled")),
            "connector_disabled",
        )),
        Admission::Admitted | Admission::NotAuthorized => authorized,
        Admission::UsesSpent => Err(deny(
            Refusal::InvalidToken("the token's max_uses are spent".into()),
            "max_uses_exhausted",
        )),
        Admission::ClientLimited(secs) => limited(secs, "client_rate_limited"),
        Admission::ConnectorLimited(secs) => limited(secs, "connector_rate_limited"),
    }
}

/// What [`shared_checks`] takes from the shared state besides its answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Taking {
    /// A use of a `max_uses` token and the rate limits' cells (checks 4 and 5).
    UsesAndRates,
    /// Nothing: the call was admitted once already ([`decide_again`]).
    Nothing,
}

/// Polls `future` to its end, noting in `waited` whether it ever had to wait.
async fn noting_wait<F: std::future::Future>(future: F, waited: &mut bool) -> F::Output {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| {
        let poll = future.as_mut().poll(cx);
        *waited |= poll.is_pending();
        poll
    })
    .await
}

/// Checks 2 and 3 again, on what is in force now, for a call that waited after them (a
/// chunked upload read whole, a credential minted) or whose config was replaced meanwhile:
/// a revocation, kill switch, token expiry, key rotation or reload acknowledged in the
/// meantime applies to it before anything leaves (DESIGN §3.4: "removing an operation takes
/// effect at once"); only the moment between this check and the allow record's queuing is
/// left, not the wait. The call must pass under both configs and goes out as it was prepared
/// under the first. The use and rate-limit cells already taken are not taken again.
async fn decide_again(
    broker: &Broker,
    headers: &http::HeaderMap,
    conn: &ConnInfo,
    method: &Method,
    target: &Target<'_>,
    facts: &mut AuditFacts,
) -> Result<(), Denial> {
    let live = broker.live();
    let wall = chrono::Utc::now();
    let claims = authenticate(broker, &live, headers, conn, facts, wall.timestamp())?;
    match &*broker.state {
        StateStore::Memory(_) => {
            authorize(broker, &live, &claims, method, target, wall, facts)?;
        }
        StateStore::Redis(redis) => {
            let local = check_binding(broker, &claims, conn, wall.timestamp())
                .and_then(|()| authorize(broker, &live, &claims, method, target, wall, facts));
            shared_checks(
                redis,
                &live,
                &claims,
                target.connector,
                local,
                facts,
                Taking::Nothing,
            )
            .await?;
        }
    }
    Ok(())
}

/// Check 6. A declared length is checked at once and the body streams through a guard; a
/// chunked body is read up to the limit first, since nothing may leave before the decision.
async fn bounded_body(
    body: Incoming,
    headers: &mut http::HeaderMap,
    max: u64,
    seen: &Arc<AtomicU64>,
    deadline: Instant,
) -> Result<(ProxyBody, Option<Arc<tokio::sync::Notify>>), Denial> {
    let too_large = || Denial::from(Refusal::RequestTooLarge(max));
    if body.is_end_stream() {
        return Ok((full(Bytes::new()), None));
    }
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(len) if len > max => Err(too_large()),
        Some(len) => {
            // Streamed as it comes: the upstream's time starts once it has all come.
            let uploaded = Arc::new(tokio::sync::Notify::new());
            let body = LimitedBody::new(
                body,
                max,
                Arc::clone(seen),
                len,
                Arc::clone(&uploaded),
                tokio::time::Instant::from_std(deadline),
            );
            Ok((body.boxed_unsync(), Some(uploaded)))
        }
        None => {
            // A chunked body is read whole here (to know its size before anything is
            // forwarded), so a client that stops sending must not hold the call open: the
            // read ends with the request's time budget.
            let limit = usize::try_from(max).unwrap_or(usize::MAX);
            let collected = tokio::time::timeout_at(
                tokio::time::Instant::from_std(deadline),
                Limited::new(body, limit).collect(),
            )
            .await
            .map_err(|_| deny(Refusal::RequestTimeout, "request_body_timeout"))?;
            let bytes = collected
                .map_err(|e| {
                    if e.downcast_ref::<LengthLimitError>().is_some() {
                        too_large()
                    } else if client_went_away(&*e) {
                        // Nobody is there to answer: recorded as a call dropped midway is.
                        deny(
                            Refusal::InvalidRequest("the client went away mid-body".into()),
                            CLIENT_CLOSED,
                        )
                    } else {
                        // A broken chunked encoding is the client's malformed request.
                        deny(
                            Refusal::InvalidRequest("malformed or truncated request body".into()),
                            "malformed_body",
                        )
                    }
                })?
                .to_bytes();
            seen.store(bytes.len() as u64, Ordering::Relaxed);
            // Sent whole with its length, which hyper states itself — except for an empty body
            // (chunked `0`, or HTTP/2 DATA frames with nothing in them), which it would send
            // with no framing at all: some origins answer that with 411.
            if bytes.is_empty() {
                headers.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
            }
            Ok((full(bytes), None))
        }
    }
}

/// Whether reading the request body failed because the client left: an HTTP/1.1 connection
/// closed or reset inside the body, an HTTP/2 stream reset by the client or its connection
/// gone.
/// (A reset with `NO_ERROR` reaches us as the body's end: h2 reads it so.)
fn client_went_away(e: &(dyn std::error::Error + 'static)) -> bool {
    let Some(hyper_error) = e.downcast_ref::<hyper::Error>() else {
        return false;
    };
    if hyper_error.is_incomplete_message() || hyper_error.is_closed() {
        return true;
    }
    let mut source = std::error::Error::source(hyper_error);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            return h2.is_io() || (h2.is_remote() && (h2.is_reset() || h2.is_go_away()));
        }
        // HTTP/1.1: the connection ended (or was reset) inside the body.
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::{
                BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof,
            };
            return matches!(
                io.kind(),
                UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
            );
        }
        source = cause.source();
    }
    false
}

/// A call's request body on its way up: bytes taken from the client so far, and (for a body
/// streamed as it comes) the signal that it has all come.
struct Upload {
    bytes_in: Arc<AtomicU64>,
    uploaded: Option<Arc<tokio::sync::Notify>>,
}

/// The credential one call injects: the connector's static one, or a minted one.
enum CallCredential<'r> {
    Static(&'r ConnectorRuntime),
    Minted {
        source: &'r Arc<DynamicCredential>,
        minted: Arc<Minted>,
        injection: Injection,
        echoes: Arc<Echoes>,
    },
}

impl CallCredential<'_> {
    fn injection(&self) -> &Injection {
        match self {
            Self::Static(runtime) => &runtime.injection,
            Self::Minted { injection, .. } => injection,
        }
    }

    /// The forms of the credential an upstream must not echo back.
    fn echoes(&self) -> &Arc<Echoes> {
        match self {
            Self::Static(runtime) => &runtime.echoes,
            Self::Minted { echoes, .. } => echoes,
        }
    }

    /// A 401 to a minted credential drops it, so the next call mints anew (never a replay).
    fn upstream_answered(&self, status: http::StatusCode) {
        if let Self::Minted { source, minted, .. } = self {
            if status == http::StatusCode::UNAUTHORIZED {
                source.rejected(minted);
            }
        }
    }
}

/// DESIGN §3.7, between checks 6 and 7: a dynamic connector's credential, cached or minted;
/// none to be had → 502 `credential_unavailable`, audited, nothing forwarded.
async fn upstream_credential<'r>(
    broker: &Broker,
    connector: &Connector,
    runtime: &'r ConnectorRuntime,
    request_id: &str,
) -> Result<CallCredential<'r>, Denial> {
    let Some(source) = &runtime.dynamic else {
        return Ok(CallCredential::Static(runtime));
    };
    let unavailable = || deny(Refusal::CredentialUnavailable, "credential_unavailable");
    // DESIGN §3.7: no fresh credential, whatever the cause (an unaudited mint too), is 502.
    let minted = source.get(&broker.audit, request_id).await.map_err(|e| {
        tracing::warn!(connector = %connector.name, error = %e, "no upstream credential; refusing the call");
        unavailable()
    })?;
    let injection = Injection::new(&connector.auth, &minted.token).map_err(|_| {
        source.unusable(&minted);
        unavailable()
    })?;
    let echoes = Arc::new(Echoes::new(&connector.auth, &minted.token));
    Ok(CallCredential::Minted {
        source,
        minted,
        injection,
        echoes,
    })
}

/// The request as the upstream receives it: same method, the same path and query bytes
/// after the connector's base, hygienic headers, the broker's request id, the credential.
#[allow(clippy::too_many_arguments)]
fn upstream_request(
    parts: http::request::Parts,
    body: ProxyBody,
    target: &Target<'_>,
    connector: &Connector,
    runtime: &ConnectorRuntime,
    injection: &Injection,
    conn: &ConnInfo,
    request_id: &HeaderValue,
) -> Result<Request<ProxyBody>, Denial> {
    // Origin form: the client picks the connection (and, for HTTP/2, the authority) from
    // the connector's origin.
    let mut uri = String::with_capacity(runtime.base_path.len() + target.path.len() + 64);
    // `/{connector}` alone is matched as `/`, but nothing follows the connector: it goes to
    // the upstream as configured (DESIGN §4.3: `upstream` plus the bytes after
    // `/{connector}`), its trailing slash kept, `/` when it has no path. (A path `/` here is
    // always that case: `/{connector}/` is an empty segment that check 1 refused.)
    if target.path == "/" {
        uri.push_str(&runtime.root_path);
    } else {
        uri.push_str(&runtime.base_path);
        uri.push_str(target.path);
    }
    // Before the injected pair: `?` without a query, `&` after one (none after an empty
    // query or a trailing `&`, which would make an empty parameter).
    let mut sep = Some('?');
    if let Some(q) = target.query {
        uri.push('?');
        uri.push_str(q);
        sep = (!q.is_empty() && !q.ends_with('&')).then_some('&');
    }
    if let Injection::Query { pair, .. } = injection {
        uri.extend(sep);
        // The pair is ASCII by construction (percent-encoded).
        uri.push_str(std::str::from_utf8(pair.expose()).unwrap_or_default());
    }
    // From the String itself: no copy.
    let uri = Uri::try_from(uri).map_err(|_| {
        tracing::error!(connector = %connector.name, "could not build the upstream URI");
        Denial::from(Refusal::UpstreamUnavailable("invalid upstream URI".into()))
    })?;
    let mut hdrs = headers::upstream_request_headers(&parts.headers, injection.header_name());
    // The response's value too: shared bytes, not a copy.
    hdrs.insert(HeaderName::from_static("x-request-id"), request_id.clone());
    headers::add_forwarding_headers(
        &mut hdrs,
        conn.peer_ip_value.as_ref(),
        if conn.tls { "https" } else { "http" },
    );
    headers::add_via(&mut hdrs, parts.version);
    if let Injection::Header { name, value } = injection {
        hdrs.insert(name.clone(), value.clone());
    }
    let mut req = Request::new(body);
    *req.method_mut() = parts.method;
    *req.uri_mut() = uri;
    *req.headers_mut() = hdrs;
    Ok(req)
}

/// Check 8 and the way back: bounded wait for the upstream, cleaned response headers, a
/// streamed body whose end writes the `proxy_result` record.
#[allow(clippy::too_many_arguments)]
async fn forward(
    broker: &Arc<Broker>,
    live: &Live,
    connector: &Connector,
    runtime: &ConnectorRuntime,
    credential: &CallCredential<'_>,
    req: Request<ProxyBody>,
    facts: &mut AuditFacts,
    upload: Upload,
    started: Instant,
) -> Response<ProxyBody> {
    let Upload { bytes_in, uploaded } = upload;
    let request_deadline = started + live.config.server.request_timeout;
    let sent = Instant::now();
    let wait = connector
        .upstream_timeout
        .min(request_deadline.saturating_duration_since(sent));
    let head_request = req.method() == Method::HEAD;
    let declared_body = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let exchange = runtime.client.send(&runtime.origin, req);
    let result = match uploaded {
        // Nothing left to upload: the upstream has `upstream_timeout` from now.
        None => tokio::time::timeout(wait, exchange).await.map_err(|_| ()),
        // A body still coming from the client: `upstream_timeout` counts from its end, and
        // the whole within the request's deadline (a slow upload is the client's time).
        Some(uploaded) => {
            let upstream_clock = async {
                uploaded.notified().await;
                tokio::time::sleep(connector.upstream_timeout).await;
            };
            let deadline = tokio::time::Instant::from_std(request_deadline);
            // Boxed (a body still on its way is the less common case: GETs have none): see
            // `stages`.
            Box::pin(tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    answer = exchange => Ok(answer),
                    () = upstream_clock => Err(()),
                }
            }))
            .await
            .map_err(|_| ())
            .and_then(|r| r)
        }
    };
    let took = sent.elapsed();
    // Every path from here writes the outcome in this poll, or hands it to the response body.
    facts.stage = Stage::Recorded;
    // Out of time while the client had not sent all the body it announced: the client's
    // delay, not the upstream's (and not an upstream error in the metrics). An upstream that
    // stops reading a large body would look the same; for bodies that fit the socket
    // buffers, as most API calls' do, it is the client.
    let client_stalled =
        result.is_err() && declared_body.is_some_and(|len| bytes_in.load(Ordering::Relaxed) < len);
    // The exchange failed because the client's body did (it went away mid-upload, or broke
    // the framing): the client's doing too, not an upstream error.
    let client_body = match &result {
        Ok(Err(e)) => body::client_body_error(e),
        _ => None,
    };
    let client_failed = client_body.is_some();
    // … and it went away: its answer goes nowhere, so the outcome records none.
    let client_left = client_body.is_some_and(|b| client_went_away(b));
    // … or it did not come within the request's time.
    let client_stalled =
        client_stalled || matches!(&result, Ok(Err(e)) if body::request_body_timed_out(e));
    match &result {
        Ok(Ok(_)) => runtime.metrics.upstream_ok(took),
        Err(_) if client_stalled => {}
        Ok(Err(_)) if client_failed || client_stalled => {}
        failed => broker
            .metrics
            .upstream_result(&connector.name, took, failed),
    }
    // The call's facts are spent from here (its stage is `Recorded`): the outcome takes them.
    let mut result_record = facts.take_for_result();
    let answer = match result {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(_)) if client_failed => Err(Refusal::InvalidRequest(
            "the client's request body broke off".into(),
        )),
        Ok(Err(_)) if client_stalled => Err(Refusal::RequestTimeout),
        Ok(Err(e)) => {
            tracing::warn!(connector = %connector.name, error = %e, "upstream request failed");
            Err(Refusal::UpstreamUnavailable(e.describe()))
        }
        Err(_) if client_stalled => Err(Refusal::RequestTimeout),
        Err(_) => Err(Refusal::UpstreamTimeout),
    }
    .and_then(|response| {
        credential.upstream_answered(response.status());
        match unusable_answer(&response) {
            Some(why) => {
                broker.metrics.upstream_unusable(&connector.name);
                Err(Refusal::UpstreamUnavailable(why.into()))
            }
            None => Ok(response),
        }
    });
    let response = match answer {
        Ok(response) => response,
        Err(refusal) => {
            // Boxed (the failure path): see `stages`.
            return Box::pin(finish_failed(
                broker,
                result_record,
                refusal,
                &bytes_in,
                started,
                client_left,
            ))
            .await;
        }
    };
    let (mut parts, body) = response.into_parts();
    headers::normalize_content_length(
        &mut parts.headers,
        parts.status,
        head_request,
        body.size_hint().exact(),
    );
    headers::clean_response_headers(&mut parts.headers, credential.echoes());
    // The upstream's own reason phrase (`404 Whatever`) is not passed on: it carries no
    // meaning (RFC 9112 §4) and could echo the credential. The client gets the standard one,
    // or none for a status that has none (hyper would write `<none>`).
    parts.extensions.remove::<hyper::ext::ReasonPhrase>();
    if parts.status.canonical_reason().is_none() {
        parts
            .extensions
            .insert(hyper::ext::ReasonPhrase::from_static(b""));
    }
    // The client is answered in the broker's own HTTP version, not the upstream's (RFC 9110
    // §6.2): an HTTP/1.0 upstream must not turn a keep-alive HTTP/1.1 connection into 1.0.
    parts.version = http::Version::HTTP_11;
    result_record.status = Some(parts.status.as_u16());
    result_record.upstream_request_id = connector
        .upstream_request_id_header
        .as_ref()
        .and_then(|h| parts.headers.get(h))
        .map(|v| recorded_request_id(v.as_bytes()));
    let audit = broker.audit.clone();
    let metrics = Arc::clone(&runtime.metrics);
    let on_done = Box::new(move |outcome: Outcome| {
        let elapsed = started.elapsed();
        metrics.request_done(elapsed);
        result_record.duration_ms = Some(elapsed.as_millis() as u64);
        result_record.bytes_in = Some(bytes_in.load(Ordering::Relaxed));
        result_record.bytes_out = Some(outcome.bytes_out);
        result_record.error = outcome.error.map(str::to_owned);
        // Queued synchronously, so it precedes a later `shutdown` record; the response is
        // already on its way, so nothing waits for the write.
        if let Err(e) = audit.append_detached(result_record) {
            log_unqueued(&e, "a proxy_result audit record");
        }
    });
    let deadline = tokio::time::Instant::from_std(request_deadline);
    let body =
        ObservedBody::new(body, deadline, Arc::clone(credential.echoes()), on_done).boxed_unsync();
    Response::from_parts(parts, body)
}

/// Why an upstream answer cannot be relayed, if it cannot.
fn unusable_answer<B: http_body::Body>(response: &Response<B>) -> Option<&'static str> {
    if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        // Never asked for (check 1 refuses `Upgrade`), and not a response to relay: the
        // client would be left on a connection switched to who knows what.
        return Some("the upstream switched protocols unasked");
    }
    // (A HEAD, 204 or 304 answer may name codings: no body follows to relabel.)
    (response.body().size_hint().exact() != Some(0)
        && headers::has_other_transfer_coding(response.headers()))
    .then_some("the upstream used a transfer coding other than chunked")
}

/// The most of an upstream request id a `proxy_result` record keeps: real ones are tens of
/// bytes, and the record must stay bounded whatever the upstream sends.
const MAX_RECORDED_REQUEST_ID: usize = 256;

/// The upstream's request id as recorded: its first [`MAX_RECORDED_REQUEST_ID`] bytes (a
/// header value that is a `str` is visible ASCII, so any cut is on a character).
fn recorded_request_id(id: &[u8]) -> String {
    // Bounded before anything is copied (a header may be hundreds of kilobytes); UTF-8 as it
    // is, any other byte as U+FFFD (an id left out would lose the auditor's join key), cut on
    // a character boundary.
    let head = &id[..id.len().min(MAX_RECORDED_REQUEST_ID + 3)];
    let text = String::from_utf8_lossy(head);
    let mut cut = text.len().min(MAX_RECORDED_REQUEST_ID);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text[..cut].to_owned()
}

/// The answer to a call whose allow record was queued but not acknowledged within the
/// request's time (a write or `fdatasync` that does not return): 503, and a `proxy_result`
/// queued behind the allow record saying nothing was forwarded, for when the disk answers.
fn not_forwarded(
    broker: &Broker,
    live: &Live,
    facts: &mut AuditFacts,
    started: Instant,
    allow: PendingAppend,
) -> Response<ProxyBody> {
    let refusal = Refusal::AuditUnavailable;
    tracing::error!("the audit log did not acknowledge the allow record within request_timeout; refusing to forward");
    let took = started.elapsed();
    broker
        .metrics
        .proxy_denied(&live.config, &facts.record, refusal.code(), took);
    let mut record = facts.take_for_result();
    record.status = Some(refusal.status().as_u16());
    record.duration_ms = Some(took.as_millis() as u64);
    record.bytes_in = Some(0);
    record.bytes_out = Some(0);
    record.error = Some(
        "not forwarded: the audit log did not acknowledge the allow record within request_timeout"
            .into(),
    );
    facts.stage = Stage::Recorded;
    let request_id = record.request_id.clone().unwrap_or_default();
    allow.then_queue(record);
    refusal.into_response(&request_id)
}

async fn finish_failed(
    broker: &Broker,
    mut record: Record,
    refusal: Refusal,
    bytes_in: &AtomicU64,
    started: Instant,
    client_left: bool,
) -> Response<ProxyBody> {
    let request_id = record.request_id.clone().unwrap_or_default();
    let elapsed = started.elapsed();
    record.duration_ms = Some(elapsed.as_millis() as u64);
    record.bytes_in = Some(bytes_in.load(Ordering::Relaxed));
    record.bytes_out = Some(0);
    if client_left {
        // No status: the answer below reaches nobody (as a call that goes away while its
        // upstream thinks, see `Call`).
        record.error = Some("client went away while sending the request body".into());
    } else {
        record.status = Some(refusal.status().as_u16());
        // The record keeps the reason (e.g. a refused upstream certificate), not just the code.
        record.error = Some(match &refusal {
            Refusal::UpstreamUnavailable(detail) | Refusal::InvalidRequest(detail) => {
                format!("{}: {detail}", refusal.code())
            }
            other => other.code().to_owned(),
        });
    }
    let connector = record.connector.as_deref().unwrap_or_default();
    broker.metrics.request_done(connector, elapsed);
    // Bounded: the call is over, and a disk that stopped answering must not hold its answer.
    if let Err(e) = broker
        .audit
        .append_by(record, broker.live().audit_by())
        .await
    {
        tracing::error!(error = %e, "cannot write a proxy_result audit record");
    }
    refusal.into_response(&request_id)
}

impl AuditFacts {
    fn new<B>(req: &Request<B>, conn: &ConnInfo, request_id: &str) -> Self {
        let mut record = Record::new(Event::Proxy);
        record.request_id = Some(request_id.to_owned());
        record.method = Some(req.method().as_str().to_owned());
        record.peer = Some(conn.peer_text.clone());
        // Split as `canonical_target` will, so a call refused by check 1 is still recorded
        // with its connector and the upstream path (DESIGN §5); without a connector segment,
        // or without a leading `/` (`OPTIONS *`), the whole target is kept as sent.
        let full = req.uri().path();
        match canonical::split_target(full) {
            _ if !full.starts_with('/') => record.path = Some(full.to_owned()),
            ("", _) => record.path = Some(full.to_owned()),
            (connector, rest) => {
                record.connector = Some(connector.to_owned());
                record.path = Some(rest.to_owned());
            }
        }
        record.query = req.uri().query().map(recorded_query);
        // A token sent without `Authorization` (refused 401) is still a token, wherever it
        // stands (a JWT is also a valid method token and connector segment).
        for field in [&mut record.method, &mut record.connector, &mut record.path] {
            redact_jwt_shapes(field);
        }
        // A copy of the token in the target (refused by check 1) is not recorded either.
        for token in presented_tokens(req.headers()) {
            let fields = [
                &mut record.method,
                &mut record.connector,
                &mut record.path,
                &mut record.query,
            ];
            for field in fields {
                redact_token(field, token);
            }
        }
        Self {
            record,
            stage: Stage::Deciding,
        }
    }

    /// A refused call carrying its own copy of the credential parameter the connector injects
    /// (`auth = { type = "query" }`) most likely carries the real credential there (an
    /// integration still configured with it): its value is not recorded (DESIGN §5), whatever
    /// the call was refused for. (An allowed call never has one: check 1 refuses it.)
    fn redact_credential_parameter(&mut self, live: &Live) {
        let name = self.record.connector.as_deref();
        let runtime = name.and_then(|c| live.connectors.get(c));
        // Looked up before any field is redacted.
        let connector = name.and_then(|c| live.config.connector(c)).cloned();
        if let (Some(Injection::Query { name, .. }), Some(query)) =
            (runtime.map(|r| &r.injection), self.record.query.as_mut())
        {
            *query = redact_query_param(query, name);
        }
        match runtime {
            Some(runtime) => {
                self.redact_credential(&runtime.echoes);
                if let Some(connector) = &connector {
                    self.redact_minted_credential(connector, runtime);
                }
            }
            // No such connector: it may be a secret sent as one (a credential, a client
            // secret in the wrong place).
            None => {
                if let Some(name) = self.record.connector.as_mut() {
                    if live.is_held_secret(name) {
                        "REDACTED".clone_into(name);
                    }
                }
            }
        }
    }

    /// A dynamic connector's `echoes` hold no minted credential: the one minted last is looked
    /// for too (a client that got hold of it sends it in the path or query, say). Deny records
    /// only: an allowed call is redacted with the credential it is forwarded with.
    fn redact_minted_credential(&mut self, connector: &Connector, runtime: &ConnectorRuntime) {
        if let Some(minted) = runtime.dynamic.as_ref().and_then(|d| d.current()) {
            self.redact_credential(&Echoes::new(&connector.auth, &minted.token));
        }
    }

    /// The connector's real credential sent by the client itself — in the path, the query,
    /// as the connector segment (an integration still configured with it) — is not recorded
    /// (DESIGN §5): a field that holds it in any form is `REDACTED` whole. Most fields are
    /// shorter than any credential, and cost one length comparison.
    fn redact_credential(&mut self, echoes: &Echoes) {
        let record = &mut self.record;
        for field in [
            &mut record.method,
            &mut record.connector,
            &mut record.path,
            &mut record.query,
        ] {
            if let Some(text) = field.as_mut() {
                if echoes.fits_in(text) && echoes.found_in(text.as_bytes()) {
                    "REDACTED".clone_into(text);
                }
            }
        }
    }

    /// The allow record, made of the facts themselves (not a copy: that would be a string
    /// allocation per field on every call). The facts keep what the outcome record needs
    /// (request id, client, connector); should the allow not be written, [`Self::refill`]
    /// makes the rest again for the deny record.
    fn take_for_allow(&mut self) -> Record {
        let mut allow = std::mem::replace(&mut self.record, Record::new(Event::Proxy));
        allow.decision = Some(Decision::Allow);
        self.record.request_id = allow.request_id.clone();
        self.record.client = allow.client.clone();
        self.record.connector = allow.connector.clone();
        allow
    }

    /// A `proxy_result` record naming the call (request id, client, connector), which takes
    /// them from the facts: the call's outcome is the last record it writes.
    fn take_for_result(&mut self) -> Record {
        let mut result = Record::new(Event::ProxyResult);
        result.request_id = self.record.request_id.take();
        result.client = self.record.client.take();
        result.connector = self.record.connector.take();
        result
    }

    /// The facts [`Self::take_for_allow`] gave away, made again from where they came from
    /// (`new`, `target`, `token`, `operation`). By then check 1 has refused any copy of the
    /// token in the method, path or query, so there is nothing to redact but what `new` does
    /// without knowing the token (`access_token` values, anything shaped like a JWT).
    fn refill(
        &mut self,
        method: &Method,
        target: &Target<'_>,
        claims: &AccessClaims,
        operation: &str,
        conn: &ConnInfo,
    ) {
        self.record.method = Some(method.as_str().to_owned());
        self.record.peer = Some(conn.peer_text.clone());
        self.target(target);
        self.record.query = target.query.map(recorded_query);
        self.token(claims);
        self.operation(operation);
    }

    fn target(&mut self, target: &Target<'_>) {
        // Usually what `new` already split off: then nothing is copied again.
        // Set again only when `new` recorded something else (a field it redacted): redacted
        // again then.
        if set_text(&mut self.record.connector, target.connector) {
            redact_jwt_shapes(&mut self.record.connector);
        }
        if set_text(&mut self.record.path, target.path) {
            redact_jwt_shapes(&mut self.record.path);
        }
    }

    fn token(&mut self, claims: &AccessClaims) {
        self.record.client = Some(claims.sub.clone());
        self.record.jti = Some(claims.jti.clone());
    }

    fn operation(&mut self, name: &str) {
        self.record.operation = Some(name.to_owned());
    }

    fn deny(&mut self, denial: &Denial) {
        // Only allowed calls name the elevation they were made under (check 3 noted it; a
        // later check refused the call).
        self.record.grant_reason = None;
        self.record.grant_expires = None;
        self.record.decision = Some(Decision::Deny);
        self.record.reason = Some(denial.reason.to_owned());
        // A client that went away receives no answer: none is recorded.
        self.record.status =
            (denial.reason != CLIENT_CLOSED).then(|| denial.refusal.status().as_u16());
    }
}

/// Sets a recorded field to `text`, reusing what it holds when that is the same; true if it
/// changed.
fn set_text(field: &mut Option<String>, text: &str) -> bool {
    let changed = field.as_deref() != Some(text);
    if changed {
        *field = Some(text.to_owned());
    }
    changed
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_header_spelled_with_dashes_and_underscores_swapped_is_an_alias() {
        use super::has_underscore_alias;
        let headers = |names: &[&str]| {
            let mut h = http::HeaderMap::new();
            for n in names {
                h.insert(
                    http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    http::HeaderValue::from_static("v"),
                );
            }
            h
        };
        let dashed = http::HeaderName::from_static("x-api-key");
        let underscored = http::HeaderName::from_static("x_api_key");
        for alias in ["x_api_key", "x-api_key", "x_api-key"] {
            assert!(has_underscore_alias(&headers(&[alias]), &dashed), "{alias}");
        }
        for alias in ["x-api-key", "x_api-key"] {
            assert!(
                has_underscore_alias(&headers(&[alias]), &underscored),
                "{alias}"
            );
        }
        for other in ["x-api-keys", "xapikey", "x.api.key"] {
            assert!(
                !has_underscore_alias(&headers(&[other]), &dashed),
                "{other}"
            );
        }
        let plain = http::HeaderName::from_static("apikey");
        assert!(!has_underscore_alias(&headers(&["apikey"]), &plain));
    }

    /// A target that does not start with `/` (refused by check 1) is recorded as sent, not
    /// split into a connector and a path that was never there.
    #[test]
    fn a_target_without_a_leading_slash_is_recorded_whole() {
        use super::{AuditFacts, ConnInfo};
        let conn = ConnInfo::new("192.0.2.7:40000".parse().unwrap(), false, None);
        for (method, target, connector, path) in [
            ("OPTIONS", "*", None, "*"),
            ("GET", "/github/repos", Some("github"), "/repos"),
            ("GET", "/github", Some("github"), "/"),
        ] {
            let req = http::Request::builder()
                .method(method)
                .uri(target)
                .body(())
                .unwrap();
            let facts = AuditFacts::new(&req, &conn, "0123456789abcdef0123456789abcdef");
            assert_eq!(facts.record.connector.as_deref(), connector, "{target}");
            assert_eq!(facts.record.path.as_deref(), Some(path), "{target}");
        }
    }

    #[test]
    fn the_allow_record_takes_the_facts_and_a_failed_write_gets_them_back() {
        use super::{AuditFacts, ConnInfo, Target};
        use crate::audit::record::{Decision, Event, Record};
        let conn = ConnInfo::new("192.0.2.7:40000".parse().unwrap(), false, None);
        let req = http::Request::get("/github/repos/acme/widget/issues?state=open&access_token=x")
            .body(())
            .unwrap();
        let target = Target {
            connector: "github",
            path: "/repos/acme/widget/issues",
            query: Some("state=open&access_token=x"),
        };
        let claims = crate::token::claims::tests::sample("https://broker.test", 1_800_000_000);
        // The facts as the stages gather them up to the allow record.
        let mut facts = AuditFacts::new(&req, &conn, "0123456789abcdef0123456789abcdef");
        facts.target(&target);
        facts.token(&claims);
        facts.operation("issues.read");
        let gathered = facts.record.clone();
        assert_eq!(
            gathered.query.as_deref(),
            Some("state=open&access_token=REDACTED")
        );
        let allow = facts.take_for_allow();
        assert_eq!(
            allow,
            Record {
                decision: Some(Decision::Allow),
                ..gathered.clone()
            }
        );
        // What the outcome record needs stays with the facts, nothing else.
        let mut kept = Record::new(Event::Proxy);
        kept.request_id = gathered.request_id.clone();
        kept.client = gathered.client.clone();
        kept.connector = gathered.connector.clone();
        assert_eq!(facts.record, kept);
        // The write failed: the deny record will say everything the allow would have.
        facts.refill(&http::Method::GET, &target, &claims, "issues.read", &conn);
        assert_eq!(facts.record, gathered);
    }
}
