//! GitHub App installation tokens: an RS256 app JWT (`iss` = the app id as a JSON number,
//! `iat` 60 s in the past, `exp` 9 minutes ahead — GitHub allows at most 10) is exchanged at
//! `POST {api}/app/installations/{id}/access_tokens` for a one-hour installation token,
//! narrowed at the source to the configured `repositories` and `permissions`.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use http::{HeaderValue, Method, Request};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{exchange, CredentialError, Minted};
use crate::config::GithubAppCredential;
use crate::proxy::forward::UpstreamClient;
use crate::proxy::respond::full;
use crate::proxy::ProxyBody;
use crate::secret::Secret;

/// `iat` is backdated this far, as GitHub recommends against clock drift.
const IAT_BACKDATE_SECS: i64 = 60;
/// `exp` this far ahead: under GitHub's 10-minute limit even with a fast local clock.
const EXP_AHEAD_SECS: i64 = 540;

/// A GitHub App installation: its config and its parsed signing key.
pub struct App {
    config: GithubAppCredential,
    /// jsonwebtoken's `Debug` redacts the key; it is zeroized on drop.
    key: EncodingKey,
}

/// The app JWT's claims (GitHub reads exactly these three).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AppClaims {
    pub iat: i64,
    pub exp: i64,
    /// The app id, as a JSON number.
    pub iss: u64,
}

/// The access_tokens request body: only the configured narrowing fields.
#[derive(Serialize)]
struct Narrowing<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    repositories: Option<&'a Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    permissions: Option<&'a BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct InstallationToken {
    token: Option<String>,
    expires_at: Option<String>,
}

impl App {
    /// Parses the key (validated by `check` already, so this fails only on a race with an edit).
    pub fn new(config: GithubAppCredential) -> Result<Self, CredentialError> {
        let key = EncodingKey::from_rsa_pem(config.private_key.expose())
            .map_err(|_| CredentialError::Signing)?;
        Ok(Self { config, key })
    }

    pub fn config(&self) -> &GithubAppCredential {
        &self.config
    }

    /// Mints one installation token.
    pub async fn mint(
        &self,
        client: &UpstreamClient,
        now: DateTime<Utc>,
    ) -> Result<Minted, CredentialError> {
        let jwt = self.app_jwt(now)?;
        let body = exchange(client, self.request(&jwt)?).await?;
        parse(&body, now)
    }

    /// The signed app JWT for `now`.
    pub fn app_jwt(&self, now: DateTime<Utc>) -> Result<Secret, CredentialError> {
        let claims = AppClaims {
            iat: now.timestamp() - IAT_BACKDATE_SECS,
            exp: now.timestamp() + EXP_AHEAD_SECS,
            iss: self.config.app_id,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key)
            .map(Secret::new)
            .map_err(|_| CredentialError::Signing)
    }

    /// `POST {api}/app/installations/{id}/access_tokens` with the app JWT as bearer.
    pub fn request(&self, jwt: &Secret) -> Result<Request<ProxyBody>, CredentialError> {
        let url = format!(
            "{}/app/installations/{}/access_tokens",
            self.config.api, self.config.installation_id
        );
        let body = serde_json::to_vec(&Narrowing {
            repositories: self.config.repositories.as_ref(),
            permissions: self.config.permissions.as_ref(),
        })
        .map_err(|_| CredentialError::Request("narrowing"))?;
        let bearer = Zeroizing::new([b"Bearer ".as_slice(), jwt.expose()].concat());
        let mut auth =
            HeaderValue::from_bytes(&bearer).map_err(|_| CredentialError::Request("app JWT"))?;
        auth.set_sensitive(true);
        Request::builder()
            .method(Method::POST)
            .uri(url)
            .header(ACCEPT, "application/vnd.github+json")
            .header(USER_AGENT, "credbroker")
            .header("x-github-api-version", "2022-11-28")
            .header(CONTENT_TYPE, "application/json")
            .header(AUTHORIZATION, auth)
            .body(full(Bytes::from(body)))
            .map_err(|_| CredentialError::Request("api"))
    }
}

/// Reads `token` and `expires_at` (RFC 3339) from GitHub's answer to a request sent at
/// `sent_at`.
pub fn parse(body: &[u8], sent_at: DateTime<Utc>) -> Result<Minted, CredentialError> {
    let answer: InstallationToken = serde_json::from_slice(body)
        .map_err(|_| CredentialError::Malformed("not a JSON installation token"))?;
    let token = answer
        .token
        .map(|t| Secret::new(Zeroizing::new(t).as_bytes()))
        .ok_or(CredentialError::Malformed("no token"))?;
    let expires_at = answer
        .expires_at
        .as_deref()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .ok_or(CredentialError::Malformed("no RFC 3339 expires_at"))?
        .with_timezone(&Utc);
    Minted::new(token, sent_at, expires_at)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use http_body_util::BodyExt;
    use jsonwebtoken::{DecodingKey, Validation};
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::pkcs8::{EncodePrivateKey, LineEnding};
    use rsa::traits::PublicKeyParts;

    use super::*;

    fn key() -> rsa::RsaPrivateKey {
        rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap()
    }

    fn app(pem: &str, narrow: bool) -> App {
        App::new(GithubAppCredential {
            app_id: 12345,
            installation_id: 678,
            private_key: Secret::new(pem),
            api: "https://api.github.com".into(),
            repositories: narrow.then(|| vec!["widget".to_owned()]),
            permissions: narrow.then(|| BTreeMap::from([("issues".into(), "write".into())])),
        })
        .unwrap()
    }

    fn verify(jwt: &Secret, key: &rsa::RsaPrivateKey) -> AppClaims {
        let public = key.to_public_key();
        let decoding = DecodingKey::from_rsa_raw_components(
            &public.n().to_bytes_be(),
            &public.e().to_bytes_be(),
        );
        let mut v = Validation::new(Algorithm::RS256);
        v.validate_exp = false;
        v.required_spec_claims.clear();
        let jwt = std::str::from_utf8(jwt.expose()).unwrap();
        jsonwebtoken::decode::<AppClaims>(jwt, &decoding, &v)
            .unwrap()
            .claims
    }

    #[tokio::test]
    async fn jwt_claims_signature_and_narrowed_request_pkcs1_and_pkcs8() {
        let k = key();
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let pkcs1 = k.to_pkcs1_pem(LineEnding::LF).unwrap();
        let pkcs8 = k.to_pkcs8_pem(LineEnding::LF).unwrap();
        for pem in [pkcs1.as_str(), pkcs8.as_str()] {
            let jwt = app(pem, true).app_jwt(t0).unwrap();
            let claims = verify(&jwt, &k);
            assert_eq!(claims.iss, 12345);
            assert_eq!(claims.iat, t0.timestamp() - 60);
            assert!(claims.exp <= t0.timestamp() + 600 && claims.exp > t0.timestamp());
            let payload = std::str::from_utf8(jwt.expose())
                .unwrap()
                .split('.')
                .nth(1)
                .unwrap();
            let raw =
                base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
                    .unwrap();
            assert!(String::from_utf8(raw).unwrap().contains("\"iss\":12345"));
        }
        let a = app(&pkcs1, true);
        let req = a.request(&a.app_jwt(t0).unwrap()).unwrap();
        assert_eq!(
            req.uri().to_string(),
            "https://api.github.com/app/installations/678/access_tokens"
        );
        assert_eq!(req.headers()[ACCEPT], "application/vnd.github+json");
        assert_eq!(req.headers()[USER_AGENT], "credbroker");
        assert!(req.headers()[AUTHORIZATION].is_sensitive());
        let body = req.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            &body[..],
            br#"{"repositories":["widget"],"permissions":{"issues":"write"}}"#
        );
        let unnarrowed = app(&pkcs1, false);
        let req = unnarrowed.request(&Secret::new("j")).unwrap();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"{}");
    }

    #[test]
    fn installation_token_answer() {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let m = parse(
            br#"{"token":"ghs_x","expires_at":"2026-01-01T01:00:00Z","permissions":{}}"#,
            t0,
        )
        .unwrap();
        assert_eq!(m.expires_at, t0 + chrono::Duration::hours(1));
        assert_eq!(m.refresh_at, t0 + chrono::Duration::seconds(3540));
        assert!(parse(br#"{"token":"ghs_x"}"#, t0).is_err());
        assert!(parse(br#"{"token":"ghs_x","expires_at":"tomorrow"}"#, t0).is_err());
        assert!(parse(
            br#"{"token":"ghs_x","expires_at":"2025-01-01T00:00:00Z"}"#,
            t0
        )
        .is_err());
    }
}
