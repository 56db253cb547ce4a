//! Dynamic upstream credentials (DESIGN §3.7): the broker holds a long-term secret (an OAuth2
//! client secret, a GitHub App private key) and mints the short-lived credential it injects.
//!
//! - [`oauth2`]: RFC 6749 §4.4 client credentials against `token_url`;
//! - [`github_app`]: an RS256 app JWT exchanged for a narrowed installation token;
//! - [`cache`]: the per-connector cache, refresh point and single in-flight refresh.
//!
//! A [`DynamicCredential`] lives per connector and survives reloads that leave its config
//! unchanged, so the cache is not thrown away on every reload. Minted tokens are [`Secret`]s;
//! errors and audit records name the endpoint's status, never a token or a secret.

pub mod cache;
pub mod github_app;
pub mod oauth2;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use http::Request;
use http_body_util::{BodyExt, Limited};

use crate::audit::{AuditLog, Event, Record};
use crate::config::{Credential, OAuth2Credential};
use crate::proxy::forward::UpstreamClient;
use crate::proxy::ProxyBody;
use crate::secret::Secret;
use cache::{Cache, Clock, SystemClock};

/// A whole minting exchange (connect, request, response body) must finish within this.
pub const MINT_TIMEOUT: Duration = Duration::from_secs(10);
/// Token responses are small JSON objects; anything larger is refused unread.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// A credential is refreshed at most this long before it expires…
const REFRESH_EARLY: chrono::Duration = chrono::Duration::seconds(60);
/// …and not before this fraction (in tenths) of its lifetime has passed.
const REFRESH_TENTHS: i32 = 9;

/// Which kind of dynamic credential; the audit record's `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    OAuth2ClientCredentials,
    GithubApp,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OAuth2ClientCredentials => "oauth2_client_credentials",
            Self::GithubApp => "github_app",
        }
    }
}

/// A minted credential and its timing.
pub struct Minted {
    /// The short-lived upstream credential.
    pub token: Secret,
    /// When the mint request was sent (the lifetime is counted from there, conservatively).
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// From here on a caller refreshes it: the later of 60 s before expiry and 90 % of the
    /// lifetime (DESIGN §3.7), so it is refreshed at most 60 s early and short-lived ones are
    /// still reused.
    pub refresh_at: DateTime<Utc>,
}

impl Minted {
    /// A credential valid from `issued_at` to `expires_at`; an empty token or a non-positive
    /// lifetime is a malformed answer.
    pub fn new(
        token: Secret,
        issued_at: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<Self, CredentialError> {
        if token.is_empty() {
            return Err(CredentialError::Malformed("empty token"));
        }
        let lifetime = expires_at - issued_at;
        if lifetime <= chrono::Duration::zero() {
            return Err(CredentialError::Malformed(
                "the credential is already expired",
            ));
        }
        let ninety_percent = issued_at + lifetime * REFRESH_TENTHS / 10;
        Ok(Self {
            token,
            issued_at,
            expires_at,
            refresh_at: (expires_at - REFRESH_EARLY).max(ninety_percent),
        })
    }
}

impl fmt::Debug for Minted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Minted")
            .field("token", &self.token)
            .field("expires_at", &self.expires_at)
            .field("refresh_at", &self.refresh_at)
            .finish()
    }
}

/// Why no credential could be minted. Never carries a token, a secret or a response body.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// The endpoint could not be reached or the connection failed.
    #[error("cannot reach the credential endpoint: {0}")]
    Unreachable(String),
    /// The exchange did not finish within [`MINT_TIMEOUT`].
    #[error("the credential endpoint did not answer within {0:?}")]
    Timeout(Duration),
    /// The endpoint answered with a non-success status.
    #[error("the credential endpoint answered HTTP {0}")]
    Status(u16),
    /// The answer was larger than [`MAX_RESPONSE_BYTES`].
    #[error("the credential endpoint's answer exceeds {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
    /// The answer is not the JSON the protocol describes.
    #[error("the credential endpoint's answer is malformed: {0}")]
    Malformed(&'static str),
    /// The GitHub App JWT could not be signed.
    #[error("cannot sign the GitHub App JWT")]
    Signing,
    /// The mint request could not be built (a configured value is not valid in a request).
    #[error("cannot build the mint request: {0}")]
    Request(&'static str),
    /// The credential was minted but its `credential_refreshed` record could not be written:
    /// it is dropped, not used.
    #[error("the minted credential could not be audited; it is not used")]
    Unaudited,
}

/// How one connector mints: the validated config it was built from.
enum Minter {
    OAuth2(OAuth2Credential),
    GithubApp(github_app::App),
}

/// One connector's dynamic credential: how to mint it, and the cache.
pub struct DynamicCredential {
    connector: String,
    minter: Minter,
    client: UpstreamClient,
    cache: Cache,
    mints: AtomicU64,
}

impl DynamicCredential {
    /// The source for `credential`, or `None` for a static one.
    pub fn new(
        connector: &str,
        credential: &Credential,
        client: UpstreamClient,
    ) -> Result<Option<Self>, CredentialError> {
        Self::with_clock(connector, credential, client, Arc::new(SystemClock))
    }

    /// [`DynamicCredential::new`] with a chosen clock (tests).
    pub fn with_clock(
        connector: &str,
        credential: &Credential,
        client: UpstreamClient,
        clock: Arc<dyn Clock>,
    ) -> Result<Option<Self>, CredentialError> {
        let minter = match credential {
            Credential::Static { .. } => return Ok(None),
            Credential::OAuth2(c) => Minter::OAuth2(c.clone()),
            Credential::GithubApp(c) => Minter::GithubApp(github_app::App::new(c.clone())?),
        };
        Ok(Some(Self {
            connector: connector.to_owned(),
            minter,
            client,
            cache: Cache::new(clock),
            mints: AtomicU64::new(0),
        }))
    }

    /// Whether this source was built from exactly `credential` (secrets included), so a
    /// reload may keep it and its cache.
    pub fn same_config(&self, credential: &Credential) -> bool {
        match (&self.minter, credential) {
            (Minter::OAuth2(a), Credential::OAuth2(b)) => a == b,
            (Minter::GithubApp(a), Credential::GithubApp(b)) => a.config() == b,
            _ => false,
        }
    }

    /// Whether this source mints through `client` (the same trust roots).
    pub fn uses(&self, client: &UpstreamClient) -> bool {
        self.client.same(client)
    }

    pub fn kind(&self) -> Kind {
        match self.minter {
            Minter::OAuth2(_) => Kind::OAuth2ClientCredentials,
            Minter::GithubApp(_) => Kind::GithubApp,
        }
    }

    /// A fresh credential: the cached one, or one minted now (lazily, on first use). The mint
    /// runs as its own task so a caller that goes away does not cancel it for the others.
    /// Past its refresh point a cached credential still well before its expiry is served at
    /// once while one refresh runs in the background: the point of refreshing early is that
    /// no call waits for it (a slow or failing token endpoint costs nothing until the
    /// credential is about to expire).
    ///
    /// `request_id` is the call's that needs the credential: a mint it starts is recorded
    /// with it (the calls that wait for that mint share it).
    pub async fn get(
        self: &Arc<Self>,
        audit: &AuditLog,
        request_id: &str,
    ) -> Result<Arc<Minted>, CredentialError> {
        if let Some(m) = self.cache.fresh() {
            return Ok(m);
        }
        let this = Arc::clone(self);
        let audit = audit.clone();
        let request_id = request_id.to_owned();
        let mint = move || {
            // Its `credential_refreshed` record may come after every call waiting for it gave
            // up: a stop waits for it (every mint is audited, DESIGN §3.7).
            let promise = audit.promise();
            tokio::spawn(async move {
                let minted = this
                    .cache
                    .get(|now| this.mint_and_audit(now, &audit, request_id))
                    .await;
                drop(promise);
                minted
            })
        };
        if let Some(m) = self.cache.usable() {
            if !self.cache.refreshing() {
                drop(mint());
            }
            return Ok(m);
        }
        mint()
            .await
            .map_err(|_| CredentialError::Unreachable("the mint task failed".into()))?
    }

    /// Whether `value` is one of this source's secrets: the OAuth2 `client_secret`, or the
    /// credential minted last (an admin value that is one is refused, not recorded).
    pub fn holds(&self, value: &[u8]) -> bool {
        // Compared in constant time: an admin or proxy caller times nothing out of them.
        let same = |held: &[u8]| constant_time_eq::constant_time_eq(held, value);
        let secret = match &self.minter {
            Minter::OAuth2(c) => same(c.client_secret.expose()),
            Minter::GithubApp(_) => false,
        };
        secret | self.cache.peek().is_some_and(|m| same(m.token.expose()))
    }

    /// The credential minted last, if one is held: a deny record must not hold it either.
    pub fn current(&self) -> Option<Arc<Minted>> {
        self.cache.peek()
    }

    /// The upstream answered 401 to `used`: drop it so the next call mints a new one.
    pub fn rejected(&self, used: &Arc<Minted>) {
        tracing::warn!(connector = %self.connector, "upstream refused the minted credential; it will be minted again");
        self.cache.invalidate(used);
    }

    /// `minted` cannot be sent as the connector's `auth` says (the minting side answered a
    /// token with a control byte): drop it, so the next call mints again rather than reusing it.
    pub fn unusable(&self, minted: &Arc<Minted>) {
        tracing::error!(connector = %self.connector, "the minted credential cannot be sent as the connector's auth says (a control byte in a header value); it is discarded and minted again on the next call");
        self.cache.invalidate(minted);
    }

    /// When the cached credential expires, if one is cached.
    pub fn expires_at(&self) -> Option<DateTime<Utc>> {
        self.cache.peek().map(|m| m.expires_at)
    }

    /// How many credentials this source has minted (a metrics counter).
    pub fn mints(&self) -> u64 {
        self.mints.load(Ordering::Relaxed)
    }

    /// The admin view (`GET /v1/connectors`): kind, expiry, mints. No secret.
    pub fn view(&self) -> serde_json::Value {
        serde_json::json!({
            "type": self.kind().as_str(),
            "expires_at": self.expires_at().map(rfc3339),
            "mints": self.mints(),
        })
    }

    async fn mint_and_audit(
        &self,
        now: DateTime<Utc>,
        audit: &AuditLog,
        request_id: String,
    ) -> Result<Minted, CredentialError> {
        let minted = match &self.minter {
            Minter::OAuth2(c) => oauth2::mint(&self.client, c, now).await,
            Minter::GithubApp(app) => app.mint(&self.client, now).await,
        };
        // A lifetime counted from the request may have run out by the time a slow token
        // server answered: forwarding that credential would only earn an upstream 401.
        let minted = minted
            .and_then(|m| {
                if m.expires_at > self.cache.now() {
                    Ok(m)
                } else {
                    Err(CredentialError::Malformed(
                        "the credential had expired by the time it arrived",
                    ))
                }
            })
            .inspect_err(|e| {
                tracing::warn!(connector = %self.connector, kind = self.kind().as_str(), error = %e, "cannot mint the upstream credential");
            })?;
        self.mints.fetch_add(1, Ordering::Relaxed);
        let mut record = Record::new(Event::CredentialRefreshed);
        record.request_id = Some(request_id);
        record.connector = Some(self.connector.clone());
        record.kind = Some(self.kind().as_str().to_owned());
        record.expires_at = Some(rfc3339(minted.expires_at));
        // Every mint is audited (DESIGN §3.7): a credential whose record cannot be written is
        // dropped (zeroized) rather than cached — kept, it would serve call after call once
        // the log recovered, with no record of where it came from.
        // Bounded like the exchange: a disk that stopped answering must not hold the refresh
        // (and every call queued behind it) for ever. A record that lands later names a
        // credential that was never used.
        let by = std::time::Instant::now() + MINT_TIMEOUT;
        if let Err(e) = audit.append_by(record, by).await {
            tracing::error!(error = %e, "cannot write the credential_refreshed audit record; the credential is not used");
            return Err(CredentialError::Unaudited);
        }
        tracing::info!(connector = %self.connector, kind = self.kind().as_str(), expires_at = %minted.expires_at, "minted an upstream credential");
        Ok(minted)
    }
}

impl fmt::Debug for DynamicCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DynamicCredential")
            .field("connector", &self.connector)
            .field("kind", &self.kind())
            .finish_non_exhaustive()
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Sends a mint request and returns the body of a 2xx answer, all within [`MINT_TIMEOUT`] and
/// [`MAX_RESPONSE_BYTES`].
async fn exchange(
    client: &UpstreamClient,
    req: Request<ProxyBody>,
) -> Result<Bytes, CredentialError> {
    let work = async {
        // The same words as for an upstream call: a certificate the trust roots refuse says
        // so (set `upstream_ca`), rather than looking like a closed port.
        let response = client
            .request(req)
            .await
            .map_err(|e| CredentialError::Unreachable(e.describe()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(CredentialError::Status(status.as_u16()));
        }
        Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    CredentialError::TooLarge
                } else {
                    CredentialError::Unreachable("the response body was cut off".into())
                }
            })
    };
    tokio::time::timeout(MINT_TIMEOUT, work)
        .await
        .map_err(|_| CredentialError::Timeout(MINT_TIMEOUT))?
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn refresh_point_is_the_later_of_60s_early_and_90_percent() {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let secs = chrono::Duration::seconds;
        let hour = Minted::new(Secret::new("t"), t0, t0 + secs(3600)).unwrap();
        assert_eq!(hour.refresh_at, t0 + secs(3540));
        let short = Minted::new(Secret::new("t"), t0, t0 + secs(300)).unwrap();
        assert_eq!(short.refresh_at, t0 + secs(270));
        assert!(Minted::new(Secret::new("t"), t0, t0).is_err());
        assert!(Minted::new(Secret::new(""), t0, t0 + secs(5)).is_err());
    }

    #[test]
    fn debug_never_shows_the_token() {
        let t0 = Utc::now();
        let m = Minted::new(
            Secret::new("ghs_sentinel"),
            t0,
            t0 + chrono::Duration::seconds(60),
        )
        .unwrap();
        assert!(!format!("{m:?}").contains("sentinel"));
    }
}

#[cfg(test)]
mod refresh_tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    use chrono::TimeZone;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    use super::*;
    use crate::audit::{AuditOptions, FsyncPolicy};
    use crate::config::OAuth2AuthMethod;
    use cache::FakeClock;

    /// A token endpoint that answers its first request at once (`at-0`, 300 s) and never
    /// answers any later one; returns its address and the requests it saw.
    async fn first_answer_only() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let count = Arc::clone(&count);
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| {
                        let n = count.fetch_add(1, Ordering::SeqCst);
                        async move {
                            if n > 0 {
                                std::future::pending::<()>().await;
                            }
                            let body =
                                r#"{"access_token":"at-0","token_type":"Bearer","expires_in":300}"#;
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(Bytes::from_static(body.as_bytes())),
                            ))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn past_its_refresh_point_a_valid_credential_is_served_while_the_refresh_runs() {
        let (addr, seen) = first_answer_only().await;
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let clock = Arc::new(FakeClock(Mutex::new(t0)));
        let credential = Credential::OAuth2(OAuth2Credential {
            token_url: format!("http://{addr}/token").parse().unwrap(),
            client_id: "app".into(),
            client_secret: Secret::new("s3cret"),
            scope: None,
            auth_method: OAuth2AuthMethod::Post,
        });
        let client = UpstreamClient::new(None).unwrap();
        let source = DynamicCredential::with_clock("gh", &credential, client, clock.clone())
            .unwrap()
            .unwrap();
        let source = Arc::new(source);
        let dir = tempfile::tempdir().unwrap();
        let audit = AuditLog::open(AuditOptions {
            path: dir.path().join("audit.jsonl"),
            fsync: FsyncPolicy::Never,
            rotate_bytes: None,
            hmac_key: None,
            replica: None,
        })
        .unwrap();
        let first = source.get(&audit, "req-1").await.unwrap();
        assert_eq!(first.token.expose(), b"at-0");
        // Past the refresh point (270 s), 20 s before expiry: served at once, refresh started.
        *clock.0.lock().unwrap() = t0 + chrono::Duration::seconds(280);
        let served = tokio::time::timeout(Duration::from_secs(1), source.get(&audit, "req-1"))
            .await
            .expect("not held up by the refresh");
        assert!(Arc::ptr_eq(&served.unwrap(), &first));
        let started = std::time::Instant::now();
        while seen.load(Ordering::SeqCst) < 2 {
            assert!(started.elapsed() < Duration::from_secs(5), "no refresh");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Within 5 s of expiry the cached one is no longer served: callers wait for the mint.
        *clock.0.lock().unwrap() = t0 + chrono::Duration::seconds(296);
        let waited =
            tokio::time::timeout(Duration::from_millis(300), source.get(&audit, "req-1")).await;
        assert!(waited.is_err(), "a credential about to expire was served");
        audit.close();
    }

    /// A token server so slow that the 300 s credential it hands out has run out when it
    /// arrives: nothing is cached, recorded or served — the call gets no credential.
    #[tokio::test]
    async fn a_credential_expired_by_the_time_it_arrives_is_refused() {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let clock = Arc::new(FakeClock(Mutex::new(t0)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_clock = Arc::clone(&clock);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let clock = Arc::clone(&server_clock);
                let svc = service_fn(move |_req| {
                    // The answer takes 400 s of the broker's clock.
                    *clock.0.lock().unwrap() = t0 + chrono::Duration::seconds(400);
                    let body = r#"{"access_token":"at-late","expires_in":300}"#;
                    std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(Bytes::from_static(body.as_bytes())),
                    )))
                });
                tokio::spawn(
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .into_owned(),
                );
            }
        });
        let credential = Credential::OAuth2(OAuth2Credential {
            token_url: format!("http://{addr}/token").parse().unwrap(),
            client_id: "id".into(),
            client_secret: Secret::new("s"),
            scope: None,
            auth_method: OAuth2AuthMethod::Post,
        });
        let client = UpstreamClient::new(None).unwrap();
        let source = DynamicCredential::with_clock("gh", &credential, client, clock)
            .unwrap()
            .unwrap();
        let source = Arc::new(source);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = AuditLog::open(AuditOptions {
            path: path.clone(),
            fsync: FsyncPolicy::Never,
            rotate_bytes: None,
            hmac_key: None,
            replica: None,
        })
        .unwrap();
        let err = source.get(&audit, "req-1").await.unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
        assert!(source.expires_at().is_none(), "nothing cached");
        audit.close();
        let log = std::fs::read_to_string(path).unwrap();
        assert!(!log.contains("credential_refreshed"), "{log}");
    }
}
