//! The serde mirror of `credbroker.toml` (DESIGN §3): field for field what the file may say,
//! `deny_unknown_fields` everywhere so a typo is an error with its line. No validation here —
//! [`super::Config`] turns this into types that cannot hold an invalid state.
//!
//! Values that later checks may reject are `Spanned`, so those errors can name their line too.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// A string value with its position in the file.
pub type S = Spanned<String>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub server: RawServer,
    pub admin: Option<RawAdmin>,
    #[serde(default)]
    pub tokens: RawTokens,
    pub audit: RawAudit,
    #[serde(default)]
    pub state: RawState,
    #[serde(default)]
    pub connectors: Vec<RawConnector>,
    #[serde(default)]
    pub clients: Vec<RawClient>,
}

/// `[server]`: the token endpoint and proxy listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: S,
    pub tls_cert: Option<S>,
    pub tls_key: Option<S>,
    pub client_ca: Option<S>,
    pub max_connections: Option<Spanned<u64>>,
    pub max_header_bytes: Option<Spanned<u64>>,
    pub header_read_timeout: Option<S>,
    pub request_timeout: Option<S>,
}

/// `[admin]`: admin API, metrics and health, on its own listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: S,
    pub token_sha256: S,
    pub tls_cert: Option<S>,
    pub tls_key: Option<S>,
    pub max_connections: Option<Spanned<u64>>,
    #[serde(default)]
    pub operators: Vec<RawOperator>,
}

/// `[[admin.operators]]`: an operator's own admin token, so the records of what they do name
/// them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOperator {
    pub name: S,
    pub token_sha256: S,
}

/// `[tokens]`: issuing and verifying access tokens.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokens {
    pub issuer: Option<S>,
    pub signing_key: Option<S>,
    pub issue_rate_limit: Option<Spanned<RawRateLimit>>,
    pub default_ttl: Option<S>,
    pub max_ttl: Option<S>,
    pub leeway: Option<S>,
}

/// `[audit]`: the hash-chained audit log.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub path: S,
    pub fsync: Option<S>,
    pub rotate_bytes: Option<Spanned<u64>>,
    pub hmac_key: Option<S>,
}

/// `[state]`: where revocations and disabled connectors are kept (DESIGN §3.5, §7).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    pub dir: Option<S>,
    pub backend: Option<S>,
    pub url: Option<S>,
    pub replica: Option<S>,
}

/// `{ per_second = 50, burst = 100 }`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub per_second: u32,
    pub burst: Option<u32>,
}

/// One `[[connectors]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConnector {
    pub name: S,
    pub owner: S,
    pub purpose: S,
    pub expires: S,
    pub upstream: S,
    pub upstream_ca: Option<S>,
    pub upstream_timeout: Option<S>,
    pub credential: Spanned<RawCredential>,
    pub auth: Option<Spanned<RawAuth>>,
    pub rate_limit: Option<Spanned<RawRateLimit>>,
    pub upstream_request_id_header: Option<S>,
    #[serde(default)]
    pub operations: Vec<RawOperation>,
}

/// `credential = "env:NAME"` or a dynamic credential table (DESIGN §3.7).
#[derive(Debug)]
pub enum RawCredential {
    Reference(String),
    Dynamic(RawDynamicCredential),
}

/// A string is a reference and a table a dynamic credential, told apart by the value's type
/// rather than by trying both (serde's `untagged`), so a typo inside the table is reported
/// as the table's own error (`unknown field \`scopee\``), not as "did not match any variant".
impl<'de> Deserialize<'de> for RawCredential {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawCredential;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a secret reference (\"env:NAME\", \"file:PATH\") or a credential table",
                )
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(RawCredential::Reference(v.to_owned()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                RawDynamicCredential::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawCredential::Dynamic)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A dynamic credential: the broker mints short-lived upstream credentials itself.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RawDynamicCredential {
    Oauth2ClientCredentials {
        token_url: String,
        client_id: String,
        client_secret: String,
        scope: Option<String>,
        auth_method: Option<String>,
    },
    GithubApp {
        app_id: u64,
        installation_id: u64,
        private_key: String,
        api: Option<String>,
        repositories: Option<Vec<String>>,
        permissions: Option<BTreeMap<String, String>>,
    },
}

/// How the credential is put on the upstream request (DESIGN §3.8).
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RawAuth {
    /// A struct variant, not a unit one: serde ignores extra keys next to a unit variant's
    /// tag, and `deny_unknown_fields` must hold here too (`prefix` is not a bearer option).
    Bearer {},
    Header {
        name: String,
        #[serde(default)]
        prefix: String,
    },
    Basic {
        username: String,
    },
    Query {
        name: String,
    },
}

/// One `[[connectors.operations]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOperation {
    pub name: S,
    pub method: S,
    pub path: S,
    pub query: Option<Vec<S>>,
    pub max_body_bytes: Option<u64>,
}

/// One `[[clients]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClient {
    pub id: S,
    pub owner: S,
    pub secret_sha256: Option<S>,
    pub cert_san: Option<S>,
    pub rate_limit: Option<Spanned<RawRateLimit>>,
    #[serde(default)]
    pub grants: Vec<Spanned<RawGrant>>,
}

/// `{ connector = "github", operations = [...], max_ttl = "120s", expires = "…", reason = "…" }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGrant {
    pub connector: String,
    pub operations: Vec<String>,
    pub max_ttl: Option<String>,
    pub expires: Option<String>,
    pub reason: Option<String>,
}
