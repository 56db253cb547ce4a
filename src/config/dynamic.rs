//! Validation of dynamic credentials (DESIGN §3.7): the token URL or API is `https://` (plain
//! HTTP only on loopback), the long-term secret resolves, and a GitHub App key is an RSA PEM
//! that can actually sign — so `check` finds a bad key before the first call does.

use std::ops::Range;

use jsonwebtoken::{Algorithm, EncodingKey};

use super::raw::RawDynamicCredential;
use super::validate::{is_loopback_host, resolve_secret, Ctx};
use super::{Credential, GithubAppCredential, OAuth2AuthMethod, OAuth2Credential};
use crate::secret::Secret;

/// GitHub's public API, the default `api`.
pub const GITHUB_API: &str = "https://api.github.com";

/// Validates a `credential = { type = … }` table; every problem is reported.
pub(super) fn credential(
    cx: &mut Ctx<'_>,
    raw: &RawDynamicCredential,
    span: Range<usize>,
    key: &str,
) -> Option<Credential> {
    match raw {
        RawDynamicCredential::Oauth2ClientCredentials {
            token_url,
            client_id,
            client_secret,
            scope,
            auth_method,
        } => {
            let url = endpoint(cx, token_url, &span, &format!("{key}.token_url"));
            if client_id.is_empty() {
                cx.err(Some(span.clone()), &format!("{key}.client_id"), "must not be empty");
            }
            let secret = long_term_secret(cx, client_secret, &span, &format!("{key}.client_secret"));
            let method = match auth_method.as_deref() {
                None | Some("basic") => Some(OAuth2AuthMethod::Basic),
                Some("post") => Some(OAuth2AuthMethod::Post),
                Some(other) => {
                    cx.err(
                        Some(span.clone()),
                        &format!("{key}.auth_method"),
                        format!("`{other}` is not one of basic, post"),
                    );
                    None
                }
            };
            if client_id.is_empty() {
                return None;
            }
            Some(Credential::OAuth2(OAuth2Credential {
                token_url: url?,
                client_id: client_id.clone(),
                client_secret: secret?,
                scope: scope.clone().filter(|s| !s.is_empty()),
                auth_method: method?,
            }))
        }
        RawDynamicCredential::GithubApp {
            app_id,
            installation_id,
            private_key,
            api,
            repositories,
            permissions,
        } => {
            for (value, name) in [(app_id, "app_id"), (installation_id, "installation_id")] {
                if *value == 0 {
                    cx.err(Some(span.clone()), &format!("{key}.{name}"), "must be positive");
                }
            }
            let api_text = api.as_deref().unwrap_or(GITHUB_API);
            let api_url = endpoint(cx, api_text, &span, &format!("{key}.api"));
            let pem = long_term_secret(cx, private_key, &span, &format!("{key}.private_key"));
            let pem = pem.filter(|pem| rsa_key_signs(cx, pem, &span, key));
            if repositories
                .as_ref()
                .is_some_and(|r| r.is_empty() || r.iter().any(String::is_empty))
            {
                cx.err(
                    Some(span.clone()),
                    &format!("{key}.repositories"),
                    "must list repository names (omit it for every repository of the installation)",
                );
            }
            if *app_id == 0 || *installation_id == 0 {
                return None;
            }
            api_url?;
            Some(Credential::GithubApp(GithubAppCredential {
                app_id: *app_id,
                installation_id: *installation_id,
                private_key: pem?,
                api: api_text.trim_end_matches('/').to_owned(),
                repositories: repositories.clone(),
                permissions: permissions.clone(),
            }))
        }
    }
}

/// A minting endpoint: absolute, `https://`, or `http://` on a loopback address (tests).
fn endpoint(cx: &mut Ctx<'_>, text: &str, span: &Range<usize>, key: &str) -> Option<http::Uri> {
    let uri: http::Uri = match text.parse() {
        Ok(u) => u,
        Err(e) => {
            cx.err(Some(span.clone()), key, format!("not a URL: {e}"));
            return None;
        }
    };
    let Some(authority) = uri.authority() else {
        cx.err(Some(span.clone()), key, "must be an absolute https:// URL");
        return None;
    };
    if authority.as_str().contains('@') {
        cx.err(Some(span.clone()), key, "must not contain user info");
        return None;
    }
    match uri.scheme_str() {
        Some("https") => Some(uri),
        Some("http") if is_loopback_host(authority.host()) => Some(uri),
        _ => {
            cx.err(
                Some(span.clone()),
                key,
                "must be https:// (http:// only for a loopback address): it carries a secret",
            );
            None
        }
    }
}

fn long_term_secret(
    cx: &mut Ctx<'_>,
    reference: &str,
    span: &Range<usize>,
    key: &str,
) -> Option<Secret> {
    let (_, value) = resolve_secret(cx, reference, Some(span.clone()), key)?;
    if value.is_empty() {
        cx.err(Some(span.clone()), key, "the secret is empty");
        return None;
    }
    Some(value)
}

/// Whether `pem` is an RSA private key (PKCS#1 or PKCS#8) that signs. jsonwebtoken only
/// unwraps the PEM at load; a damaged key body would otherwise first fail at the first mint.
fn rsa_key_signs(cx: &mut Ctx<'_>, pem: &Secret, span: &Range<usize>, key: &str) -> bool {
    let signs = EncodingKey::from_rsa_pem(pem.expose())
        .and_then(|k| jsonwebtoken::crypto::sign(b"credbroker check", &k, Algorithm::RS256));
    if signs.is_err() {
        cx.err(
            Some(span.clone()),
            &format!("{key}.private_key"),
            "not a usable RSA private key PEM (PKCS#1 `RSA PRIVATE KEY` or PKCS#8 `PRIVATE KEY`)",
        );
    }
    signs.is_ok()
}
