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
                cx.err(
                    Some(span.clone()),
                    &format!("{key}.client_id"),
                    "must not be empty",
                );
            }
            let secret =
                long_term_secret(cx, client_secret, &span, &format!("{key}.client_secret"));
            let method = match auth_method.as_deref() {
                None | Some("basic") => Some(OAuth2AuthMethod::Basic),
                Some("post") => Some(OAuth2AuthMethod::Post),
                Some(_) => {
                    cx.err(
                        Some(span.clone()),
                        &format!("{key}.auth_method"),
                        "must be one of basic, post",
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
                    cx.err(
                        Some(span.clone()),
                        &format!("{key}.{name}"),
                        "must be positive",
                    );
                }
            }
            let api_text = api.as_deref().unwrap_or(GITHUB_API);
            let api_url = endpoint(cx, api_text, &span, &format!("{key}.api"))
                .filter(|uri| api_base_is_usable(cx, uri, &span, &format!("{key}.api")));
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

/// `check`'s warnings for a dynamic credential: what the minting side will refuse at every
/// mint (so every call is a 502), though the broker can send it. Warnings, not errors: the
/// rest of the config still loads, and GitHub may name new permission levels.
pub(super) fn usability_warnings(
    cx: &mut Ctx<'_>,
    credential: &Credential,
    span: &Range<usize>,
    key: &str,
) {
    match credential {
        Credential::OAuth2(o) => {
            // Sent as it is (DESIGN §3 drops one trailing newline, not a CRLF's CR).
            if o.client_secret.expose().iter().any(u8::is_ascii_control) {
                cx.err(
                    Some(span.clone()),
                    &format!("{key}.client_secret"),
                    "holds a control byte (the CR of a file saved with CRLF line ends?): it is \
                     sent as it is, and the token endpoint will refuse it",
                );
            }
        }
        Credential::GithubApp(g) => {
            if g.repositories.iter().flatten().any(|r| r.contains('/')) {
                cx.err(
                    Some(span.clone()),
                    &format!("{key}.repositories"),
                    "names a repository with its owner (`acme/widget`): GitHub wants the name \
                     alone (`widget`; the installation's account is the owner) and refuses \
                     the mint (422)",
                );
            }
            for (permission, level) in g.permissions.iter().flatten() {
                if !matches!(level.as_str(), "read" | "write" | "admin") {
                    cx.err(
                        Some(span.clone()),
                        &format!("{key}.permissions.{permission}"),
                        "is not `read`, `write` or `admin`: GitHub refuses the mint (422)",
                    );
                }
            }
        }
        Credential::Static { .. } => {}
    }
}

/// The secret references of a dynamic credential (for `check`'s `literal:` warning).
pub(super) fn long_term_secrets(raw: &RawDynamicCredential) -> Vec<&String> {
    match raw {
        RawDynamicCredential::Oauth2ClientCredentials { client_secret, .. } => vec![client_secret],
        RawDynamicCredential::GithubApp { private_key, .. } => vec![private_key],
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
    // A fragment is never sent (RFC 6749 §3.2 forbids one on a token endpoint): the request
    // would go to a URL other than the one written.
    if text.contains('#') {
        cx.err(Some(span.clone()), key, "must not contain a fragment (`#`)");
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

/// `api` is a base that `/app/installations/…` is appended to: a query would swallow that
/// path, and a non-canonical base (`/a/../b`) would be sent as written, as an upstream's
/// would not be (the app JWT goes with it).
fn api_base_is_usable(cx: &mut Ctx<'_>, uri: &http::Uri, span: &Range<usize>, key: &str) -> bool {
    if uri.query().is_some() {
        cx.err(Some(span.clone()), key, "must not contain a query");
        return false;
    }
    if let Err(e) = super::validate::canonical_base_path(uri) {
        cx.err(Some(span.clone()), key, e);
        return false;
    }
    true
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::pkcs8::{EncodePrivateKey, LineEnding};

    use super::super::{Config, ConfigErrors};
    use super::*;

    /// A config with one connector whose `credential` is `credential`, in folder `dir`.
    fn parse_with(credential: &str, dir: &Path) -> Result<Config, ConfigErrors> {
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:8443"
[audit]
path = "audit.jsonl"
[[connectors]]
name = "gh"
owner = "o"
purpose = "p"
expires = "2099-01-01"
upstream = "https://api.github.com"
credential = {credential}
"#
        );
        Config::parse(&text, &dir.join("credbroker.toml"))
    }

    fn errors(credential: &str, dir: &Path) -> String {
        parse_with(credential, dir).unwrap_err().to_string()
    }

    #[test]
    fn oauth2_is_validated_and_defaults_to_basic() {
        let dir = tempfile::tempdir().unwrap();
        let c = parse_with(
            r#"{ type = "oauth2_client_credentials", token_url = "https://login.example/token", client_id = "id", client_secret = "literal:s", scope = "read" }"#,
            dir.path(),
        )
        .unwrap();
        let Credential::OAuth2(o) = &c.connector("gh").unwrap().credential else {
            panic!("not oauth2");
        };
        assert_eq!(o.auth_method, OAuth2AuthMethod::Basic);
        assert_eq!(o.client_secret.expose(), b"s");
        // Loopback http is fine (tests, sidecars); anything else must be https.
        let loopback = r#"{ type = "oauth2_client_credentials", token_url = "http://127.0.0.1:9/token", client_id = "id", client_secret = "literal:s", auth_method = "post" }"#;
        assert!(parse_with(loopback, dir.path()).is_ok());
        let e = errors(
            r#"{ type = "oauth2_client_credentials", token_url = "http://login.example/token", client_id = "id", client_secret = "env:CREDBROKER_TEST_UNSET_X", auth_method = "jwt" }"#,
            dir.path(),
        );
        assert!(e.contains("credential.token_url: must be https://"), "{e}");
        assert!(
            e.contains("credential.client_secret: environment variable"),
            "{e}"
        );
        assert!(
            e.contains("credential.auth_method: must be one of basic, post") && !e.contains("jwt"),
            "{e}"
        );
        assert!(e.contains(":12:"), "errors carry the line: {e}");
    }

    #[test]
    fn github_app_keys_pkcs1_pkcs8_unreadable_and_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
        std::fs::write(
            dir.path().join("pkcs1.pem"),
            key.to_pkcs1_pem(LineEnding::LF).unwrap().as_bytes(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("pkcs8.pem"),
            key.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("bad.pem"),
            "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n",
        )
        .unwrap();
        let app = |key: &str| {
            format!(
                r#"{{ type = "github_app", app_id = 1, installation_id = 2, private_key = "file:{key}", repositories = ["widget"], permissions = {{ issues = "write" }} }}"#
            )
        };
        for ok in ["pkcs1.pem", "pkcs8.pem"] {
            let c = parse_with(&app(ok), dir.path()).unwrap();
            let Credential::GithubApp(g) = &c.connector("gh").unwrap().credential else {
                panic!("not github_app");
            };
            assert_eq!(g.api, GITHUB_API);
            assert_eq!(g.repositories.as_deref(), Some(&["widget".to_owned()][..]));
        }
        let e = errors(&app("missing.pem"), dir.path());
        assert!(
            e.contains("credential.private_key: cannot read secret file"),
            "{e}"
        );
        let e = errors(&app("bad.pem"), dir.path());
        assert!(e.contains("not a usable RSA private key PEM"), "{e}");
        let e = errors(
            r#"{ type = "github_app", app_id = 0, installation_id = 2, private_key = "file:pkcs1.pem", api = "http://github.example" }"#,
            dir.path(),
        );
        assert!(e.contains("credential.app_id: must be positive"), "{e}");
        assert!(e.contains("credential.api: must be https://"), "{e}");
        assert!(!e.contains("PRIVATE KEY-----"), "no key material in errors");
        // `/app/installations/…` is appended to `api`: a query or fragment would swallow it,
        // a non-canonical base would be sent as written.
        let with_api = |api: &str| {
            format!(
                r#"{{ type = "github_app", app_id = 1, installation_id = 2, private_key = "file:pkcs1.pem", api = "{api}" }}"#
            )
        };
        for (api, why) in [
            ("https://ghe.example/base?x=1", "must not contain a query"),
            (
                "https://ghe.example/base#frag",
                "must not contain a fragment",
            ),
            (
                "https://ghe.example/a/../b",
                "the base path is not canonical",
            ),
            ("https://ghe.example//api", "the base path is not canonical"),
        ] {
            let e = errors(&with_api(api), dir.path());
            assert!(e.contains(&format!("credential.api: {why}")), "{api}: {e}");
        }
        let c = parse_with(&with_api("https://ghe.example/api/v3/"), dir.path()).unwrap();
        let Credential::GithubApp(g) = &c.connector("gh").unwrap().credential else {
            panic!("not github_app");
        };
        assert_eq!(g.api, "https://ghe.example/api/v3");
        // GitHub wants repository names without the owner, and levels it knows: it refuses the
        // mint (422) otherwise — warned, as GitHub may name new levels.
        let w = warnings(
            r#"{ type = "github_app", app_id = 1, installation_id = 2, private_key = "file:pkcs1.pem", repositories = ["acme/widget", "widget"], permissions = { issues = "wirte", metadata = "read" } }"#,
            dir.path(),
        );
        assert!(
            w.contains("credential.repositories: names a repository with its owner"),
            "{w}"
        );
        assert!(
            w.contains("credential.permissions.issues: is not `read`, `write` or `admin`"),
            "{w}"
        );
        assert!(!w.contains("permissions.metadata"), "{w}");
        // A token endpoint may carry a query (RFC 6749 §3.2), never a fragment.
        let oauth = |url: &str| {
            format!(
                r#"{{ type = "oauth2_client_credentials", token_url = "{url}", client_id = "id", client_secret = "literal:s" }}"#
            )
        };
        assert!(parse_with(&oauth("https://l.example/t?api-version=2"), dir.path()).is_ok());
        let e = errors(&oauth("https://l.example/t#frag"), dir.path());
        assert!(
            e.contains("credential.token_url: must not contain a fragment"),
            "{e}"
        );
    }

    /// `check`'s findings for a config whose one connector has `credential`, in `dir`; none
    /// of them an error.
    fn warnings(credential: &str, dir: &Path) -> String {
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:8443\"\n[audit]\npath = \"a.jsonl\"\n[[connectors]]\nname = \"gh\"\nowner = \"o\"\npurpose = \"p\"\nexpires = \"2099-01-01\"\nupstream = \"https://x.example\"\ncredential = {credential}\n"
        );
        let findings = super::super::lint::check(&config, &dir.join("c.toml"), chrono::Utc::now());
        let text: Vec<String> = findings.iter().map(ToString::to_string).collect();
        assert!(text.iter().all(|f| !f.starts_with("error")), "{text:?}");
        text.join("\n")
    }

    /// A client secret read from a file saved with CRLF keeps its CR (one trailing newline is
    /// dropped): sent as it is, refused at every mint — warned, not an error that would stop
    /// the whole config loading.
    #[test]
    fn check_warns_about_a_client_secret_with_a_control_byte() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("crlf.txt"), "s3cret\r\n").unwrap();
        let w = warnings(
            r#"{ type = "oauth2_client_credentials", token_url = "https://l.example/t", client_id = "id", client_secret = "file:crlf.txt" }"#,
            dir.path(),
        );
        assert!(
            w.contains("credential.client_secret: holds a control byte"),
            "{w}"
        );
        assert!(!w.contains("s3cret"), "{w}");
    }

    #[test]
    fn check_warns_about_literal_long_term_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let cred = r#"{ type = "oauth2_client_credentials", token_url = "https://l.example/t", client_id = "id", client_secret = "literal:s" }"#;
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:8443\"\n[audit]\npath = \"a.jsonl\"\n[[connectors]]\nname = \"gh\"\nowner = \"o\"\npurpose = \"p\"\nexpires = \"2099-01-01\"\nupstream = \"https://x.example\"\ncredential = {cred}\n"
        );
        let findings =
            super::super::lint::check(&config, &dir.path().join("c.toml"), chrono::Utc::now());
        assert!(
            findings
                .iter()
                .any(|f| f.to_string().contains("credential: literal: secret")),
            "{findings:?}"
        );
    }
}
