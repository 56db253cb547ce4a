//! Access-token verification (DESIGN §4.2, §4.3 check 2) with the RFC 8725 rules: the
//! algorithm is pinned to EdDSA, `typ` must be `at+jwt`, `kid` is looked up only among our
//! own keys, `jku`/`x5u`/`jwk`/`x5c` are never followed, time claims must be JSON integers
//! and `exp` is required. Also a bounded cache of tokens already verified.

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use constant_time_eq::constant_time_eq;
use dashmap::DashMap;
use jsonwebtoken::Algorithm;
use serde::de::IgnoredAny;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::secret::Secret;
use crate::token::claims::{AccessClaims, AuthorizationDetail, Confirmation};
use crate::token::keys::{SigningKeys, TOKEN_TYP};

/// Longer tokens are refused before any decoding. Ours are usually well under 2 KiB; the
/// token endpoint issues none longer (a scope of hundreds of operations, or many
/// `authorization_details`, could make one).
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Why a token was refused (or could not be signed). The `Display` text goes into
/// `error_description`, so it never contains the token or any part of it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not a compact JWS of three base64url parts with JSON header and claims, too long,
    /// a claim of the wrong JSON type (such as a string `exp`), or an unknown `crit`.
    #[error("the token is malformed")]
    Malformed,
    /// The header's `alg` is not `EdDSA` (including `none` and every HMAC/RSA algorithm).
    #[error("the token's signing algorithm is not accepted")]
    UnsupportedAlgorithm,
    /// The header's `typ` is missing or is not `at+jwt`.
    #[error("the token is not an access token (typ must be at+jwt)")]
    WrongType,
    /// The `kid` is not ours, or the header points at a key (`jku`, `x5u`, `jwk`, `x5c`).
    #[error("the token names a key this broker does not have")]
    UnknownKey,
    /// The signature does not verify with our key.
    #[error("the token's signature is invalid")]
    BadSignature,
    /// `exp` is in the past by more than the allowed clock skew.
    #[error("the token has expired")]
    Expired,
    /// `nbf` (or `iat`) is in the future by more than the allowed clock skew.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `iss` is not this broker.
    #[error("the token was not issued by this broker")]
    WrongIssuer,
    /// `aud` is not this broker.
    #[error("the token is not meant for this broker")]
    WrongAudience,
    /// A required claim is absent.
    #[error("the token has no `{0}` claim")]
    MissingClaim(&'static str),
    /// Signing failed (an internal error, never the client's fault).
    #[error("cannot sign the token: {0}")]
    Signing(String),
}

/// A token refused by [`TokenVerifier::verify_cached`] or [`TokenVerifier::verify_remembered`]:
/// why, and — when its signature verified, so that its claims are the broker's own — the
/// claims, so that the refusal can name the client and token (an expired token replayed is
/// still someone's token). Compares equal to a [`TokenError`] by its error alone.
#[derive(Debug)]
pub struct Refused {
    pub error: TokenError,
    /// The authentic claims of a token refused for its times, issuer or audience.
    pub genuine: Option<Arc<AccessClaims>>,
}

impl From<TokenError> for Refused {
    fn from(error: TokenError) -> Self {
        Self {
            error,
            genuine: None,
        }
    }
}

impl PartialEq<TokenError> for Refused {
    fn eq(&self, other: &TokenError) -> bool {
        self.error == *other
    }
}

impl Refused {
    /// The refusal of genuine `claims` for `error`.
    fn of(claims: Arc<AccessClaims>, error: TokenError) -> Self {
        Self {
            error,
            genuine: Some(claims),
        }
    }
}

/// The JOSE header as sent; only the members we act on.
#[derive(Deserialize)]
struct WireHeader {
    alg: Option<String>,
    typ: Option<String>,
    kid: Option<String>,
    // Present at all, even as `null`, is what counts for these.
    #[serde(default, deserialize_with = "present")]
    jku: Option<IgnoredAny>,
    #[serde(default, deserialize_with = "present")]
    x5u: Option<IgnoredAny>,
    #[serde(default, deserialize_with = "present")]
    jwk: Option<IgnoredAny>,
    #[serde(default, deserialize_with = "present")]
    x5c: Option<IgnoredAny>,
    #[serde(default, deserialize_with = "present")]
    crit: Option<IgnoredAny>,
}

/// An optional member that, when present, must hold a value of its type: `null` is not
/// "absent". A restricting claim (`cnf`, `max_uses`, `authorization_details`) sent as `null`
/// would otherwise lift its restriction.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// The claims as sent. Every member is optional so that a missing claim gets its own
/// error; time claims are `i64`, so a string, float or out-of-range `exp` fails to parse.
#[derive(Deserialize)]
struct WireClaims {
    iss: Option<String>,
    sub: Option<String>,
    #[serde(default, deserialize_with = "present")]
    client_id: Option<String>,
    aud: Option<String>,
    iat: Option<i64>,
    nbf: Option<i64>,
    exp: Option<i64>,
    jti: Option<String>,
    scope: Option<String>,
    #[serde(default, deserialize_with = "present")]
    authorization_details: Option<Vec<AuthorizationDetail>>,
    #[serde(default, deserialize_with = "present")]
    max_uses: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    cnf: Option<Confirmation>,
}

impl WireClaims {
    /// The validated claims, or the first required claim that is missing (`exp` first).
    fn into_claims(self) -> Result<AccessClaims, TokenError> {
        let claims = AccessClaims {
            exp: self.exp.ok_or(TokenError::MissingClaim("exp"))?,
            iss: self.iss.ok_or(TokenError::MissingClaim("iss"))?,
            aud: self.aud.ok_or(TokenError::MissingClaim("aud"))?,
            sub: self.sub.ok_or(TokenError::MissingClaim("sub"))?,
            client_id: self.client_id,
            iat: self.iat.ok_or(TokenError::MissingClaim("iat"))?,
            nbf: self.nbf.ok_or(TokenError::MissingClaim("nbf"))?,
            jti: self.jti.ok_or(TokenError::MissingClaim("jti"))?,
            scope: self.scope.ok_or(TokenError::MissingClaim("scope"))?,
            authorization_details: self.authorization_details,
            max_uses: self.max_uses,
            cnf: self.cnf,
        };
        // An empty `jti` could not be revoked by it; a `client_id` must name the `sub`
        // (RFC 9068 §2.2; absent in tokens issued before the broker wrote it).
        let foreign_client_id = claims.client_id.as_ref().is_some_and(|c| *c != claims.sub);
        if claims.jti.is_empty() || foreign_client_id {
            return Err(TokenError::Malformed);
        }
        Ok(claims)
    }
}

/// Verifies the broker's own access tokens.
pub struct TokenVerifier {
    keys: Arc<SigningKeys>,
    issuer: String,
    leeway: i64,
    cache: VerifiedTokenCache,
    /// Unique per verifier (a reload makes a new one): a [`TokenMemo`] entry made with
    /// another verifier is not used.
    id: u64,
}

/// Verifier ids; 0 is never handed out.
static NEXT_VERIFIER_ID: AtomicU64 = AtomicU64::new(1);

/// One connection's last verified token. A client sends the same token on call after call
/// of a keep-alive connection; comparing it with the one verified last on that connection
/// skips hashing it for the shared cache (a SHA-256 over ~500 bytes, about a quarter of a
/// microsecond here, on every call). The token is held as a [`Secret`] (zeroized when
/// replaced or when the connection ends); `exp`/`nbf` are checked on every use, and
/// revocation, binding and `max_uses` remain the caller's, as with the shared cache.
#[derive(Default)]
pub struct TokenMemo(Mutex<Option<Remembered>>);

struct Remembered {
    verifier: u64,
    token: Secret,
    claims: Arc<AccessClaims>,
}

/// A copy starts empty: what it remembers belongs to its own connection.
impl Clone for TokenMemo {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl fmt::Debug for TokenMemo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenMemo(**REDACTED**)")
    }
}

impl TokenMemo {
    fn get(&self, verifier: u64, token: &str) -> Option<Arc<AccessClaims>> {
        let memo = self.lock();
        let last = memo.as_ref()?;
        // In constant time: a front proxy that reuses its connections to the broker sends
        // several clients' tokens down one connection, so the remembered token may be
        // another client's. A word at a time (`constant_time_eq`), not `subtle`'s byte at a
        // time through an optimisation barrier, which on a ~500-byte token cost more than
        // the hash this memo saves.
        let same = constant_time_eq(last.token.expose(), token.as_bytes());
        (last.verifier == verifier && same).then(|| Arc::clone(&last.claims))
    }

    fn set(&self, verifier: u64, token: &str, claims: Arc<AccessClaims>) {
        *self.lock() = Some(Remembered {
            verifier,
            token: Secret::new(token),
            claims,
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Remembered>> {
        // A replacement cannot be left half done.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl TokenVerifier {
    pub fn new(keys: Arc<SigningKeys>, issuer: String, leeway_secs: u64) -> Self {
        Self {
            keys,
            issuer,
            leeway: i64::try_from(leeway_secs).unwrap_or(i64::MAX),
            cache: VerifiedTokenCache::new(VerifiedTokenCache::DEFAULT_CAPACITY),
            id: NEXT_VERIFIER_ID.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Like [`verify_cached`](Self::verify_cached), first asking the connection's `memo`: the
    /// token verified last on the connection, by this verifier, is not looked up again.
    pub fn verify_remembered(
        &self,
        token: &str,
        now: i64,
        memo: &TokenMemo,
    ) -> Result<Arc<AccessClaims>, Refused> {
        if let Some(claims) = memo.get(self.id, token) {
            return self.still_in_time(claims, now);
        }
        let claims = self.verify_cached(token, now)?;
        memo.set(self.id, token, Arc::clone(&claims));
        Ok(claims)
    }

    /// Full verification at time `now` (seconds since the epoch): header, signature, then
    /// claims. Claims are only interpreted once the signature has been checked.
    pub fn verify(&self, token: &str, now: i64) -> Result<AccessClaims, TokenError> {
        let claims = self.verify_signed(token)?;
        self.check_claims(&claims, now)?;
        Ok(claims)
    }

    /// Header and signature: the claims, authentic but not yet checked.
    fn verify_signed(&self, token: &str) -> Result<AccessClaims, TokenError> {
        let parts = split_token(token)?;
        self.check_header(&decode_json::<WireHeader>(parts.header)?)?;
        self.check_signature(parts.message, parts.signature)?;
        decode_json::<WireClaims>(parts.payload)?.into_claims()
    }

    /// Claims verified before (memo or cache), checked again for their times at `now`.
    fn still_in_time(
        &self,
        claims: Arc<AccessClaims>,
        now: i64,
    ) -> Result<Arc<AccessClaims>, Refused> {
        match check_times(&claims, now, self.leeway) {
            Ok(()) => Ok(claims),
            Err(e) => Err(Refused::of(claims, e)),
        }
    }

    /// Like [`verify`](Self::verify), but a token verified before is taken from the cache;
    /// `exp`/`nbf` are still checked against `now` on a hit. Revocation and `max_uses`
    /// remain the caller's job.
    pub fn verify_cached(&self, token: &str, now: i64) -> Result<Arc<AccessClaims>, Refused> {
        if let Some(claims) = self.cache.get(token, now) {
            return self.still_in_time(claims, now);
        }
        let claims = Arc::new(self.verify_signed(token)?);
        if let Err(e) = self.check_claims(&claims, now) {
            return Err(Refused::of(claims, e));
        }
        self.cache.insert(token, Arc::clone(&claims));
        Ok(claims)
    }

    /// The keys tokens are verified with.
    pub fn keys(&self) -> &Arc<SigningKeys> {
        &self.keys
    }

    /// The issuer (and audience) tokens must name.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    fn check_header(&self, header: &WireHeader) -> Result<(), TokenError> {
        if header.alg.as_deref() != Some("EdDSA") {
            return Err(TokenError::UnsupportedAlgorithm);
        }
        let typ_ok = header.typ.as_deref().is_some_and(|typ| {
            typ.eq_ignore_ascii_case(TOKEN_TYP) || typ.eq_ignore_ascii_case("application/at+jwt")
        });
        if !typ_ok {
            return Err(TokenError::WrongType);
        }
        // A key named by the token itself is attacker-chosen: never fetched nor trusted.
        let points_at_key = header.jku.is_some()
            || header.x5u.is_some()
            || header.jwk.is_some()
            || header.x5c.is_some();
        // We have one key, so a missing kid is unambiguous; a different kid is not ours.
        let foreign_kid = header.kid.as_deref().is_some_and(|k| k != self.keys.kid());
        if points_at_key || foreign_kid {
            return Err(TokenError::UnknownKey);
        }
        // We understand no JWS extensions, so any `crit` must be refused (RFC 7515 §4.1.11).
        if header.crit.is_some() {
            return Err(TokenError::Malformed);
        }
        Ok(())
    }

    fn check_signature(&self, message: &str, signature: &str) -> Result<(), TokenError> {
        let valid = jsonwebtoken::crypto::verify(
            signature,
            message.as_bytes(),
            self.keys.decoding_key(),
            Algorithm::EdDSA,
        );
        // An empty signature (stripped, or `alg: none`) fails here like any other.
        match valid {
            Ok(true) => Ok(()),
            _ => Err(TokenError::BadSignature),
        }
    }

    fn check_claims(&self, claims: &AccessClaims, now: i64) -> Result<(), TokenError> {
        if claims.iss != self.issuer {
            return Err(TokenError::WrongIssuer);
        }
        if claims.aud != self.issuer {
            return Err(TokenError::WrongAudience);
        }
        check_times(claims, now, self.leeway)
    }
}

/// `exp`, `nbf` and `iat` against `now`, allowing `leeway` seconds of clock skew.
fn check_times(claims: &AccessClaims, now: i64, leeway: i64) -> Result<(), TokenError> {
    // RFC 7519 §4.1.4: the token must not be accepted on or after `exp`.
    if now >= claims.exp.saturating_add(leeway) {
        return Err(TokenError::Expired);
    }
    let latest_start = now.saturating_add(leeway);
    if claims.nbf > latest_start || claims.iat > latest_start {
        return Err(TokenError::NotYetValid);
    }
    Ok(())
}

/// The three parts of a compact JWS, and the signed `header.payload` message.
struct TokenParts<'a> {
    header: &'a str,
    payload: &'a str,
    signature: &'a str,
    message: &'a str,
}

/// Splits `header.payload.signature`; the signature may be empty (checked later, so that
/// an `alg: none` token is refused for its algorithm).
fn split_token(token: &str) -> Result<TokenParts<'_>, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed);
    }
    let (message, signature) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
    let (header, payload) = message.split_once('.').ok_or(TokenError::Malformed)?;
    if payload.contains('.') {
        return Err(TokenError::Malformed);
    }
    Ok(TokenParts {
        header,
        payload,
        signature,
        message,
    })
}

/// The `jti` a token names and its `exp` when that is an integer, read without verifying
/// anything (for an admin who pasted a whole token where its jti was asked: revoking a jti is
/// harmless whoever names it, and the `exp` only says how long the revocation is kept).
pub fn unverified_jti_and_exp(token: &str) -> Option<(String, Option<i64>)> {
    #[derive(Deserialize)]
    struct Claims {
        jti: String,
        #[serde(default)]
        exp: serde_json::Value,
    }
    let parts = split_token(token).ok()?;
    let Claims { jti, exp } = decode_json(parts.payload).ok()?;
    (!jti.is_empty()).then(|| (jti, exp.as_i64()))
}

/// base64url (no padding) JSON of one token part.
fn decode_json<T: for<'de> Deserialize<'de>>(part: &str) -> Result<T, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed)?;
    // RFC 7515 §5.2, RFC 7519 §7.2: UTF-8 JSON throughout — also in members this parser
    // skips unread, and no `\uD800`–`\uDFFF` escape (a surrogate is no character; the
    // broker's own tokens never hold one).
    if std::str::from_utf8(&bytes).is_err() || has_surrogate_escape(&bytes) {
        return Err(TokenError::Malformed);
    }
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
}

/// Whether JSON text holds a `\uD800`–`\uDFFF` escape (any case).
fn has_surrogate_escape(json: &[u8]) -> bool {
    memchr::memmem::find_iter(json, b"\\u").any(|at| {
        matches!(json.get(at + 2), Some(b'd' | b'D'))
            && json
                .get(at + 3)
                .is_some_and(|b| matches!(b.to_ascii_lowercase(), b'8'..=b'9' | b'a'..=b'f'))
    })
}

/// Claims of tokens that passed full verification, keyed by SHA-256 of the token string.
/// Bounded: when full, entries past their `exp` are dropped, and if none are, new tokens
/// are simply not cached (they still verify, only slower).
pub struct VerifiedTokenCache {
    entries: DashMap<[u8; 32], Arc<AccessClaims>>,
    capacity: usize,
    /// The latest `now` seen by `get`, so `insert` can evict without reading a clock.
    last_now: AtomicI64,
    /// While full: the earliest `exp` among the entries at the last eviction scan. Nothing can
    /// be evicted before it, so inserts do not scan the whole cache again until then (at
    /// capacity every new token would otherwise pay a scan of every entry).
    full_until: AtomicI64,
}

impl VerifiedTokenCache {
    /// A size that holds every live token of a busy broker at 300 s lifetimes.
    pub const DEFAULT_CAPACITY: usize = 10_000;

    pub fn new(capacity: usize) -> Self {
        Self {
            entries: DashMap::new(),
            capacity,
            last_now: AtomicI64::new(i64::MIN),
            full_until: AtomicI64::new(i64::MIN),
        }
    }

    /// The cached claims of `token`, unless it is unknown or past its `exp` at `now`.
    pub fn get(&self, token: &str, now: i64) -> Option<Arc<AccessClaims>> {
        self.last_now.fetch_max(now, Ordering::Relaxed);
        let key = cache_key(token);
        let claims = self.entries.get(&key).map(|e| Arc::clone(e.value()))?;
        if claims.exp <= now {
            self.entries.remove(&key);
            return None;
        }
        Some(claims)
    }

    /// Remembers a verified token. The bound is approximate under concurrent inserts.
    pub fn insert(&self, token: &str, claims: Arc<AccessClaims>) {
        // A single-use token passes once: kept, it would only crowd out tokens that are used
        // again (with a token per call, the cache would hold nothing else).
        if claims.max_uses == Some(1) {
            return;
        }
        if self.entries.len() >= self.capacity {
            let now = self.last_now.load(Ordering::Relaxed);
            if now < self.full_until.load(Ordering::Relaxed) {
                return;
            }
            let mut earliest = i64::MAX;
            self.entries.retain(|_, c| {
                let live = c.exp > now;
                if live {
                    earliest = earliest.min(c.exp);
                }
                live
            });
            if self.entries.len() >= self.capacity {
                self.full_until.store(earliest, Ordering::Relaxed);
                return;
            }
        }
        self.entries.insert(cache_key(token), claims);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn cache_key(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header};
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::*;
    use crate::token::claims::tests::sample;
    use crate::token::keys::tests::v1_pem;

    const ISS: &str = "https://broker.test";
    const NOW: i64 = 1_800_000_000;
    const LEEWAY: u64 = 60;

    fn keys() -> Arc<SigningKeys> {
        Arc::new(SigningKeys::from_pem(v1_pem().as_bytes()).unwrap())
    }

    fn verifier() -> TokenVerifier {
        TokenVerifier::new(keys(), ISS.to_owned(), LEEWAY)
    }

    fn b64json(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    fn our_header(keys: &SigningKeys) -> Value {
        json!({"alg": "EdDSA", "typ": "at+jwt", "kid": keys.kid()})
    }

    fn claims_json() -> Value {
        serde_json::to_value(sample(ISS, NOW)).unwrap()
    }

    /// A token with any header and claims, correctly signed with `keys`.
    fn forge(keys: &SigningKeys, header: &Value, claims: &Value) -> String {
        let message = format!("{}.{}", b64json(header), b64json(claims));
        let signature = keys.sign_message(message.as_bytes());
        format!("{message}.{signature}")
    }

    fn verify_forged(header: &Value, claims: &Value) -> Result<AccessClaims, TokenError> {
        let v = verifier();
        let token = forge(v.keys(), header, claims);
        v.verify(&token, NOW)
    }

    fn with_claim(name: &str, value: Value) -> Value {
        let mut c = claims_json();
        c[name] = value;
        c
    }

    #[test]
    fn sign_then_verify_round_trips() {
        let v = verifier();
        let mut claims = sample(ISS, NOW);
        claims.max_uses = Some(3);
        claims.cnf = Some(Confirmation {
            x5t_s256: "thumb".to_owned(),
        });
        let token = v.keys().sign(&claims).unwrap();
        assert_eq!(v.verify(&token, NOW).unwrap(), claims);
        let header: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(token.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(header, our_header(v.keys()));
    }

    #[test]
    fn a_connection_remembers_only_the_exact_token_of_its_own_verifier() {
        let v = verifier();
        let memo = TokenMemo::default();
        let claims = sample(ISS, NOW);
        let token = v.keys().sign(&claims).unwrap();
        assert_eq!(*v.verify_remembered(&token, NOW, &memo).unwrap(), claims);
        assert!(memo.get(v.id, &token).is_some());
        // Remembered: a second use is answered from the memo, times still checked.
        assert_eq!(*v.verify_remembered(&token, NOW, &memo).unwrap(), claims);
        let expired = v
            .verify_remembered(&token, claims.exp + LEEWAY as i64, &memo)
            .unwrap_err();
        assert_eq!(expired, TokenError::Expired);
        // Refused for its time, the token is still known to be this client's.
        assert_eq!(expired.genuine.as_deref(), Some(&claims));
        // One byte changed in the signature is not the remembered token: verified, refused.
        let mut tampered = token.clone().into_bytes();
        let last = tampered.len() - 2;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert!(v.verify_remembered(&tampered, NOW, &memo).is_err());
        // Another verifier (a reload, here with another key) does not use the memo.
        let keys = Arc::new(
            SigningKeys::from_pem(crate::token::generate_signing_key_pem().expose()).unwrap(),
        );
        let other = TokenVerifier::new(keys, ISS.to_owned(), LEEWAY);
        assert_eq!(*v.verify_remembered(&token, NOW, &memo).unwrap(), claims);
        let unknown = other.verify_remembered(&token, NOW, &memo).unwrap_err();
        assert_eq!(unknown, TokenError::UnknownKey);
        assert!(unknown.genuine.is_none(), "not verified: nobody's");
        // A copy of a memo (a cloned connection record) starts empty; nothing prints a token.
        assert!(memo.clone().get(v.id, &token).is_none());
        assert!(!format!("{memo:?}").contains(&token));
    }

    #[test]
    fn a_generated_v2_key_signs_and_verifies() {
        let keys = Arc::new(
            SigningKeys::from_pem(crate::token::generate_signing_key_pem().expose()).unwrap(),
        );
        let v = TokenVerifier::new(Arc::clone(&keys), ISS.to_owned(), 0);
        let token = keys.sign(&sample(ISS, NOW)).unwrap();
        assert!(v.verify(&token, NOW).is_ok());
        // ...and the other key's verifier refuses it.
        assert_eq!(verifier().verify(&token, NOW), Err(TokenError::UnknownKey));
    }

    #[test]
    fn alg_none_is_refused() {
        let header = json!({"alg": "none", "typ": "at+jwt"});
        let unsigned = format!("{}.{}.", b64json(&header), b64json(&claims_json()));
        let v = verifier();
        assert_eq!(
            v.verify(&unsigned, NOW),
            Err(TokenError::UnsupportedAlgorithm)
        );
        assert_eq!(
            verify_forged(&json!({"alg": "None", "typ": "at+jwt"}), &claims_json()),
            Err(TokenError::UnsupportedAlgorithm)
        );
    }

    #[test]
    fn hs256_keyed_with_the_public_key_is_refused() {
        let v = verifier();
        let x = URL_SAFE_NO_PAD.encode(v.keys().public_key());
        for secret in [&v.keys().public_key()[..], x.as_bytes()] {
            let mut header = Header::new(Algorithm::HS256);
            header.typ = Some("at+jwt".to_owned());
            header.kid = Some(v.keys().kid().to_owned());
            let token = jsonwebtoken::encode(
                &header,
                &sample(ISS, NOW),
                &EncodingKey::from_secret(secret),
            )
            .unwrap();
            assert_eq!(v.verify(&token, NOW), Err(TokenError::UnsupportedAlgorithm));
        }
    }

    #[test]
    fn rs256_header_is_refused() {
        let keys = keys();
        let header = json!({"alg": "RS256", "typ": "at+jwt", "kid": keys.kid()});
        assert_eq!(
            verify_forged(&header, &claims_json()),
            Err(TokenError::UnsupportedAlgorithm)
        );
    }

    #[test]
    fn typ_must_be_at_jwt() {
        let keys = keys();
        for typ in [json!("JWT"), json!("jwt"), json!(""), json!(7)] {
            let header = json!({"alg": "EdDSA", "typ": typ, "kid": keys.kid()});
            assert!(verify_forged(&header, &claims_json()).is_err(), "{typ}");
        }
        let no_typ = json!({"alg": "EdDSA", "kid": keys.kid()});
        assert_eq!(
            verify_forged(&no_typ, &claims_json()),
            Err(TokenError::WrongType)
        );
        for typ in ["AT+JWT", "application/at+jwt", "Application/AT+JWT"] {
            let header = json!({"alg": "EdDSA", "typ": typ});
            assert!(verify_forged(&header, &claims_json()).is_ok(), "{typ}");
        }
    }

    #[test]
    fn unknown_kid_and_key_pointing_headers_are_refused() {
        let keys = keys();
        let unknown = json!({"alg": "EdDSA", "typ": "at+jwt", "kid": "someone-else"});
        assert_eq!(
            verify_forged(&unknown, &claims_json()),
            Err(TokenError::UnknownKey)
        );
        for (name, value) in [
            ("jku", json!("https://evil.test/jwks.json")),
            ("x5u", json!("https://evil.test/cert.pem")),
            ("jwk", json!({"kty": "OKP", "crv": "Ed25519", "x": "AAAA"})),
            ("x5c", json!(["MIIB"])),
        ] {
            let mut header = our_header(&keys);
            header[name] = value;
            assert_eq!(
                verify_forged(&header, &claims_json()),
                Err(TokenError::UnknownKey),
                "{name}"
            );
        }
        let mut crit = our_header(&keys);
        crit["crit"] = json!(["exp"]);
        assert_eq!(
            verify_forged(&crit, &claims_json()),
            Err(TokenError::Malformed)
        );
        // We hold one key, so a token without kid is unambiguous.
        let no_kid = json!({"alg": "EdDSA", "typ": "at+jwt"});
        assert!(verify_forged(&no_kid, &claims_json()).is_ok());
    }

    /// A restricting claim sent as `null` is not an absent one (it would lift the
    /// restriction), an empty `jti` could not be revoked, a `client_id` must be the `sub`, and
    /// the JSON must be UTF-8 throughout, with no surrogate escape — even where unread.
    #[test]
    fn null_restrictions_empty_jti_foreign_client_id_and_non_utf8_json_are_refused() {
        let keys = keys();
        for (name, value) in [
            ("cnf", Value::Null),
            ("max_uses", Value::Null),
            ("authorization_details", Value::Null),
            ("client_id", Value::Null),
            ("jti", json!("")),
            ("client_id", json!("someone-else")),
        ] {
            let claims = with_claim(name, value.clone());
            assert_eq!(
                verify_forged(&our_header(&keys), &claims),
                Err(TokenError::Malformed),
                "{name}: {value}"
            );
        }
        let mut jku_null = our_header(&keys);
        jku_null["jku"] = Value::Null;
        assert!(verify_forged(&jku_null, &claims_json()).is_err());
        // Bytes no JSON encoder writes: a 0xFF, a `\ud800` escape, in a member nobody reads.
        let v = verifier();
        let header = b64json(&our_header(v.keys()));
        let claims = serde_json::to_string(&claims_json()).unwrap();
        for unread in [
            &b"\"x\":\"\xff\""[..],
            br#""x":"\ud800""#,
            br#""x":"\uDC00""#,
        ] {
            let mut bytes = claims.as_bytes()[..claims.len() - 1].to_vec();
            bytes.push(b',');
            bytes.extend_from_slice(unread);
            bytes.push(b'}');
            let message = format!("{header}.{}", URL_SAFE_NO_PAD.encode(&bytes));
            let token = format!("{message}.{}", v.keys().sign_message(message.as_bytes()));
            assert_eq!(
                v.verify(&token, NOW),
                Err(TokenError::Malformed),
                "{unread:?}"
            );
        }
        // The control: a client_id that is the sub, and a plain escape, pass.
        let sub = claims_json()["sub"].clone();
        assert!(verify_forged(&our_header(&keys), &with_claim("client_id", sub)).is_ok());
        assert!(verify_forged(&our_header(&keys), &with_claim("note", json!("caf\u{e9}"))).is_ok());
    }

    #[test]
    fn a_token_from_another_key_with_our_kid_fails_the_signature() {
        let v = verifier();
        let other = SigningKeys::ephemeral();
        let token = forge(&other, &our_header(v.keys()), &claims_json());
        assert_eq!(v.verify(&token, NOW), Err(TokenError::BadSignature));
    }

    #[test]
    fn altered_payload_is_refused() {
        let v = verifier();
        let token = v.keys().sign(&sample(ISS, NOW)).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let widened = with_claim("scope", json!("github:admin"));
        let altered = format!("{}.{}.{}", parts[0], b64json(&widened), parts[2]);
        assert_eq!(v.verify(&altered, NOW), Err(TokenError::BadSignature));
    }

    #[test]
    fn stripped_or_mangled_signature_is_refused() {
        let v = verifier();
        let token = v.keys().sign(&sample(ISS, NOW)).unwrap();
        let (message, signature) = token.rsplit_once('.').unwrap();
        assert_eq!(
            v.verify(&format!("{message}."), NOW),
            Err(TokenError::BadSignature)
        );
        assert_eq!(v.verify(message, NOW), Err(TokenError::Malformed));
        assert_eq!(
            v.verify(&format!("{message}.{}", &signature[..40]), NOW),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            v.verify(&format!("{message}.{signature}.x"), NOW),
            Err(TokenError::Malformed)
        );
        assert_eq!(v.verify("", NOW), Err(TokenError::Malformed));
        assert_eq!(
            v.verify(&"a".repeat(MAX_TOKEN_LEN + 1), NOW),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn expiry_is_checked_with_leeway() {
        let v = verifier();
        let leeway = LEEWAY as i64;
        let token = v.keys().sign(&sample(ISS, NOW)).unwrap();
        let exp = NOW + 300;
        assert!(v.verify(&token, exp - 1).is_ok());
        assert!(v.verify(&token, exp + leeway - 1).is_ok(), "within leeway");
        assert_eq!(v.verify(&token, exp + leeway), Err(TokenError::Expired));
        assert_eq!(v.verify(&token, exp + 10_000), Err(TokenError::Expired));
    }

    #[test]
    fn not_before_is_checked_with_leeway() {
        let v = verifier();
        let leeway = LEEWAY as i64;
        let token = v.keys().sign(&sample(ISS, NOW)).unwrap();
        assert!(v.verify(&token, NOW - leeway).is_ok(), "within leeway");
        assert_eq!(
            v.verify(&token, NOW - leeway - 1),
            Err(TokenError::NotYetValid)
        );
        // nbf alone in the future (iat now) is refused too.
        let future_nbf = with_claim("nbf", json!(NOW + leeway + 1));
        assert_eq!(
            verify_forged(&our_header(v.keys()), &future_nbf),
            Err(TokenError::NotYetValid)
        );
    }

    #[test]
    fn issuer_and_audience_must_be_ours() {
        let keys = keys();
        assert_eq!(
            verify_forged(
                &our_header(&keys),
                &with_claim("iss", json!("https://evil"))
            ),
            Err(TokenError::WrongIssuer)
        );
        assert_eq!(
            verify_forged(
                &our_header(&keys),
                &with_claim("aud", json!("https://evil"))
            ),
            Err(TokenError::WrongAudience)
        );
        // An audience array is not what we issue.
        assert_eq!(
            verify_forged(&our_header(&keys), &with_claim("aud", json!([ISS]))),
            Err(TokenError::Malformed)
        );
    }

    /// CVE-2026-25537: jsonwebtoken once treated a non-numeric `exp` as absent and skipped
    /// the expiry check. A string `exp` must be refused, however far in the future.
    #[test]
    fn exp_as_a_string_is_refused() {
        let keys = keys();
        for exp in [
            json!("99999999999"),
            json!(format!("{}", NOW + 300)),
            json!("x"),
        ] {
            assert_eq!(
                verify_forged(&our_header(&keys), &with_claim("exp", exp)),
                Err(TokenError::Malformed)
            );
        }
        for (name, value) in [
            ("exp", json!(1.8e9)),
            ("exp", json!(null)),
            ("nbf", json!("0")),
            ("iat", json!(true)),
            ("exp", json!(u64::MAX)),
        ] {
            assert!(
                verify_forged(&our_header(&keys), &with_claim(name, value.clone())).is_err(),
                "{name}={value}"
            );
        }
    }

    #[test]
    fn missing_exp_is_refused() {
        let keys = keys();
        for name in ["exp", "iss", "aud", "nbf", "iat", "jti", "scope", "sub"] {
            let mut claims = claims_json();
            claims.as_object_mut().unwrap().remove(name);
            let err = verify_forged(&our_header(&keys), &claims).unwrap_err();
            assert!(
                matches!(err, TokenError::MissingClaim(n) if n == name),
                "{name}"
            );
        }
    }

    #[test]
    fn duplicate_claims_are_refused() {
        let v = verifier();
        let payload = format!(
            r#"{{"iss":"{ISS}","sub":"a","aud":"{ISS}","iat":{NOW},"nbf":{NOW},"exp":{},"exp":"x","jti":"j","scope":"a:b"}}"#,
            NOW + 10
        );
        let message = format!(
            "{}.{}",
            b64json(&our_header(v.keys())),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let token = format!("{message}.{}", v.keys().sign_message(message.as_bytes()));
        assert_eq!(v.verify(&token, NOW), Err(TokenError::Malformed));
    }

    #[test]
    fn errors_never_echo_the_token() {
        let v = verifier();
        let token = v.keys().sign(&sample(ISS, NOW)).unwrap();
        let err = v.verify(&token, NOW + 100_000).unwrap_err();
        let text = err.to_string();
        assert!(!text.contains(&token[..20]));
        assert!(!format!("{err:?}").contains(&token[..20]));
    }

    #[test]
    fn cached_verification_still_checks_time() {
        let v = verifier();
        let token = v.keys().sign(&sample(ISS, NOW)).unwrap();
        let first = v.verify_cached(&token, NOW).unwrap();
        let second = v.verify_cached(&token, NOW + 1).unwrap();
        assert!(Arc::ptr_eq(&first, &second), "second call is a cache hit");
        assert_eq!(
            v.verify_cached(&token, NOW - 1000).unwrap_err(),
            TokenError::NotYetValid
        );
        assert_eq!(
            v.verify_cached(&token, NOW + 10_000).unwrap_err(),
            TokenError::Expired
        );
        // A bad token is never cached, so it fails every time.
        let (message, _) = token.rsplit_once('.').unwrap();
        let bad = format!("{message}.AAAA");
        assert!(v.verify_cached(&bad, NOW).is_err());
        assert!(v.verify_cached(&bad, NOW).is_err());
    }

    /// Sample claims with this `exp`.
    fn claims_expiring(exp: i64) -> Arc<AccessClaims> {
        let mut c = sample(ISS, NOW);
        c.exp = exp;
        Arc::new(c)
    }

    #[test]
    fn cache_is_bounded_and_evicts_expired_entries() {
        let cache = VerifiedTokenCache::new(2);
        let claims = claims_expiring;
        cache.insert("a", claims(NOW + 10));
        cache.insert("b", claims(NOW + 100));
        cache.insert("c", claims(NOW + 100));
        assert_eq!(cache.len(), 2, "full and nothing expired: not cached");
        assert!(cache.get("c", NOW).is_none());
        assert!(cache.get("a", NOW).is_some());
        // Once `a` has expired it makes room.
        assert!(cache.get("b", NOW + 20).is_some());
        cache.insert("c", claims(NOW + 100));
        assert_eq!(cache.len(), 2);
        assert!(cache.get("a", NOW + 20).is_none());
        assert!(cache.get("c", NOW + 20).is_some());
        assert!(cache.get("c", NOW + 100).is_none(), "dropped at exp");
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn a_full_cache_scans_again_only_once_an_entry_can_have_expired() {
        let cache = VerifiedTokenCache::new(2);
        let claims = claims_expiring;
        cache.insert("a", claims(NOW + 10));
        cache.insert("b", claims(NOW + 100));
        assert!(cache.get("a", NOW).is_some());
        cache.insert("c", claims(NOW + 100));
        assert_eq!(cache.full_until.load(Ordering::Relaxed), NOW + 10);
        // `a` expired without being asked for: the first insert after NOW + 10 evicts it.
        assert!(cache.get("b", NOW + 5).is_some());
        cache.insert("c", claims(NOW + 100));
        assert!(cache.get("c", NOW + 5).is_none(), "no scan before NOW + 10");
        assert!(cache.get("b", NOW + 11).is_some());
        cache.insert("c", claims(NOW + 100));
        assert!(cache.get("c", NOW + 11).is_some());
    }

    #[test]
    fn single_use_tokens_are_not_cached() {
        let cache = VerifiedTokenCache::new(10);
        let mut once = sample(ISS, NOW);
        once.max_uses = Some(1);
        cache.insert("once", Arc::new(once));
        let mut twice = sample(ISS, NOW);
        twice.max_uses = Some(2);
        cache.insert("twice", Arc::new(twice));
        assert!(cache.get("once", NOW).is_none());
        assert!(cache.get("twice", NOW).is_some());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Changing any one byte of a valid token makes it fail verification.
        #[test]
        fn any_single_byte_change_is_refused(index in any::<prop::sample::Index>(), byte in 0x21u8..0x7f) {
            let v = verifier();
            let token = v.keys().sign(&sample(ISS, NOW)).unwrap();
            let i = index.index(token.len());
            prop_assume!(token.as_bytes()[i] != byte);
            let mut bytes = token.into_bytes();
            bytes[i] = byte;
            let mutated = String::from_utf8(bytes).unwrap();
            prop_assert!(v.verify(&mutated, NOW).is_err());
        }
    }
}
