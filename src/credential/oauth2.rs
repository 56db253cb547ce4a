//! OAuth2 client credentials (RFC 6749 §4.4): `POST token_url` with
//! `grant_type=client_credentials` (and `scope`), the client authenticated by HTTP Basic
//! (`basic`, the default; id and secret form-urlencoded first, §2.3.1) or in the body (`post`).

use base64::Engine;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use http::{HeaderValue, Method, Request};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::{exchange, CredentialError, Minted};
use crate::config::{OAuth2AuthMethod, OAuth2Credential};
use crate::proxy::forward::UpstreamClient;
use crate::proxy::inject::percent_encode;
use crate::proxy::respond::full;
use crate::proxy::ProxyBody;
use crate::secret::Secret;

/// The lifetime assumed when the answer has no `expires_in` (DESIGN §3.7).
pub const DEFAULT_EXPIRES_IN: i64 = 300;
/// Longer `expires_in` values are capped: the broker refreshes at least this often.
const MAX_EXPIRES_IN: i64 = 86_400;

/// Fetches one access token.
pub async fn mint(
    client: &UpstreamClient,
    config: &OAuth2Credential,
    now: DateTime<Utc>,
) -> Result<Minted, CredentialError> {
    let body = exchange(client, request(config)?).await?;
    parse(&body, now)
}

/// The token request. The form and the Basic header carry the client secret: both are built
/// in zeroized buffers and the header is marked sensitive.
pub fn request(config: &OAuth2Credential) -> Result<Request<ProxyBody>, CredentialError> {
    let id = percent_encode(config.client_id.as_bytes());
    let secret = Zeroizing::new(percent_encode(config.client_secret.expose()));
    let mut form = Zeroizing::new(String::from("grant_type=client_credentials"));
    if let Some(scope) = &config.scope {
        form.push_str("&scope=");
        form.push_str(&percent_encode(scope.as_bytes()));
    }
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(config.token_url.clone())
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(ACCEPT, "application/json")
        .header(USER_AGENT, "credbroker");
    match config.auth_method {
        OAuth2AuthMethod::Basic => {
            let pair = Zeroizing::new(format!("{id}:{}", secret.as_str()));
            let encoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&*pair));
            let mut value = HeaderValue::from_str(&format!("Basic {}", encoded.as_str()))
                .map_err(|_| CredentialError::Request("client credentials"))?;
            value.set_sensitive(true);
            builder = builder.header(AUTHORIZATION, value);
        }
        OAuth2AuthMethod::Post => {
            form.push_str("&client_id=");
            form.push_str(&id);
            form.push_str("&client_secret=");
            form.push_str(&secret);
        }
    }
    builder
        .body(full(Bytes::copy_from_slice(form.as_bytes())))
        .map_err(|_| CredentialError::Request("token_url"))
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    token_type: Option<serde_json::Value>,
    error: Option<serde_json::Value>,
    expires_in: Option<serde_json::Value>,
}

/// Reads `access_token` and `expires_in` (a number, its fraction dropped, or a numeric string
/// as some servers send; absent means [`DEFAULT_EXPIRES_IN`]) from a token response sent at `sent_at`.
pub fn parse(body: &[u8], sent_at: DateTime<Utc>) -> Result<Minted, CredentialError> {
    let response: TokenResponse = serde_json::from_slice(body)
        .map_err(|_| CredentialError::Malformed("not a JSON token response"))?;
    if response.error.is_some() {
        return Err(CredentialError::Malformed(
            "the token response carries an error",
        ));
    }
    // RFC 6749 §7.1: a token of a type not understood is not used. Only bearer tokens can be
    // injected as configured; a missing `token_type` (which some servers leave out) is taken
    // as bearer.
    match &response.token_type {
        None => {}
        Some(serde_json::Value::String(t)) if t.eq_ignore_ascii_case("bearer") => {}
        Some(_) => return Err(CredentialError::Malformed("token_type is not bearer")),
    }
    let token = response
        .access_token
        .map(|t| Secret::new(Zeroizing::new(t).as_bytes()))
        .ok_or(CredentialError::Malformed("no access_token"))?;
    let expires_in = match response.expires_in {
        None | Some(serde_json::Value::Null) => DEFAULT_EXPIRES_IN,
        // Whole seconds per RFC 6749, but a server sending `3600.0` means an hour: a fraction
        // is dropped (the credential is refreshed a moment early, never late).
        Some(serde_json::Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f.floor() as i64))
            .ok_or(CredentialError::Malformed("expires_in is not a number"))?,
        Some(serde_json::Value::String(s)) => s
            .parse()
            .map_err(|_| CredentialError::Malformed("expires_in is not a number"))?,
        Some(_) => return Err(CredentialError::Malformed("expires_in is not a number")),
    };
    // Clamped below too: `Duration::seconds` panics far out of range (a huge negative
    // value), and a lifetime of zero or less is refused as malformed by `Minted::new`.
    let lifetime = chrono::Duration::seconds(expires_in.clamp(-1, MAX_EXPIRES_IN));
    Minted::new(token, sent_at, sent_at + lifetime)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use http_body_util::BodyExt;

    use super::*;

    fn config(method: OAuth2AuthMethod) -> OAuth2Credential {
        OAuth2Credential {
            token_url: "https://login.example/oauth2/token".parse().unwrap(),
            client_id: "my app".into(),
            client_secret: Secret::new("s3cr:t&x"),
            scope: Some("read write".into()),
            auth_method: method,
        }
    }

    async fn body_of(req: Request<ProxyBody>) -> String {
        let bytes = req.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn basic_auth_form_encodes_id_and_secret_first() {
        let req = request(&config(OAuth2AuthMethod::Basic)).unwrap();
        let auth = req.headers()[AUTHORIZATION].clone();
        assert!(auth.is_sensitive());
        let b64 = auth.to_str().unwrap().strip_prefix("Basic ").unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(decoded, b"my%20app:s3cr%3At%26x");
        assert_eq!(
            body_of(req).await,
            "grant_type=client_credentials&scope=read%20write"
        );
    }

    #[tokio::test]
    async fn post_puts_the_client_in_the_body() {
        let req = request(&config(OAuth2AuthMethod::Post)).unwrap();
        assert!(!req.headers().contains_key(AUTHORIZATION));
        assert_eq!(
            body_of(req).await,
            "grant_type=client_credentials&scope=read%20write&client_id=my%20app&client_secret=s3cr%3At%26x"
        );
    }

    #[test]
    fn expires_in_absent_counts_as_300s_and_strings_and_fractions_are_read() {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let m = parse(br#"{"access_token":"at","token_type":"Bearer"}"#, t0).unwrap();
        assert_eq!(m.expires_at, t0 + chrono::Duration::seconds(300));
        let m = parse(br#"{"access_token":"at","expires_in":"120"}"#, t0).unwrap();
        assert_eq!(m.expires_at, t0 + chrono::Duration::seconds(120));
        assert_eq!(m.token.expose(), b"at");
        let m = parse(br#"{"access_token":"at","expires_in":3600.0}"#, t0).unwrap();
        assert_eq!(m.expires_at, t0 + chrono::Duration::seconds(3600));
        let m = parse(br#"{"access_token":"at","expires_in":59.9}"#, t0).unwrap();
        assert_eq!(
            m.expires_at,
            t0 + chrono::Duration::seconds(59),
            "never late"
        );
    }

    #[test]
    fn malformed_answers_are_refused_without_echoing_them() {
        let t0 = Utc::now();
        for body in [
            &b"not json"[..],
            br#"{"token_type":"Bearer"}"#,
            br#"{"access_token":"at","expires_in":0}"#,
            br#"{"access_token":"at","expires_in":-5}"#,
            br#"{"access_token":"at","expires_in":-9223372036854775807}"#,
            br#"{"access_token":"at","expires_in":"-9000000000000000000"}"#,
            br#"{"access_token":"at","expires_in":0.5}"#,
            br#"{"access_token":"","expires_in":60}"#,
            br#"{"access_token":"leaky","expires_in":[1]}"#,
            br#"{"access_token":"leaky","token_type":"mac","expires_in":60}"#,
            br#"{"access_token":"leaky","token_type":"DPoP","expires_in":60}"#,
            br#"{"access_token":"leaky","error":"invalid_scope","expires_in":60}"#,
        ] {
            let e = parse(body, t0).unwrap_err();
            assert!(!e.to_string().contains("leaky"));
        }
    }
}
