//! The claims of a credbroker access token (DESIGN §4.2, RFC 9068) and the RFC 9396
//! `authorization_details` entries that bind a token to single calls.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};

/// The claims of an access token. Time claims are seconds since the Unix epoch.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AccessClaims {
    /// The broker's issuer URL.
    pub iss: String,
    /// The client id.
    pub sub: String,
    /// The client id again, as RFC 9068 §2.2 requires of JWT access tokens. Optional when
    /// read, so tokens issued before it was added stay valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The audience: the issuer itself (the broker is its own resource server).
    pub aud: String,
    /// Issued at.
    pub iat: i64,
    /// Not before.
    pub nbf: i64,
    /// Expires at.
    pub exp: i64,
    /// Random 128-bit token id (revocation, single use, audit).
    pub jti: String,
    /// Space-separated `connector:operation` items, `*` already expanded.
    pub scope: String,
    /// Calls the token is bound to (RFC 9396), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_details: Option<Vec<AuthorizationDetail>>,
    /// How many times the token may be used, if limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u64>,
    /// Certificate binding (RFC 8705) when the token was issued over mTLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
}

/// One call a token is bound to: `{"type":"credbroker_request","connector":…,"method":…,"path":…}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuthorizationDetail {
    /// Always `credbroker_request`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The connector name.
    pub connector: String,
    /// The HTTP method.
    pub method: String,
    /// The path after `/{connector}`.
    pub path: String,
}

/// The RFC 8705 confirmation claim: the client certificate's SHA-256 thumbprint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Confirmation {
    /// base64url SHA-256 of the certificate's DER.
    #[serde(rename = "x5t#S256")]
    pub x5t_s256: String,
}

impl AccessClaims {
    /// The scope as `(connector, operation)` pairs. Items without a `:` cannot name an
    /// operation, so they are skipped (the broker never issues them).
    pub fn scope_items(&self) -> impl Iterator<Item = (&str, &str)> {
        self.scope
            .split_ascii_whitespace()
            .filter_map(|item| item.split_once(':'))
    }
}

/// A random 128-bit token id, base64url without padding (22 characters).
pub fn new_jti() -> String {
    // ThreadRng is a CSPRNG seeded from the OS, as an unguessable id needs.
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Claims as the broker would issue them, valid from `now` for 300 s.
    pub(crate) fn sample(issuer: &str, now: i64) -> AccessClaims {
        AccessClaims {
            iss: issuer.to_owned(),
            sub: "sync-bot".to_owned(),
            client_id: Some("sync-bot".to_owned()),
            aud: issuer.to_owned(),
            iat: now,
            nbf: now,
            exp: now + 300,
            jti: new_jti(),
            scope: "github:issues.read github:repos.read".to_owned(),
            authorization_details: None,
            max_uses: None,
            cnf: None,
        }
    }

    #[test]
    fn scope_items_split_connector_and_operation() {
        let mut c = sample("https://b", 0);
        c.scope = " github:issues.read  slack:chat.post bogus ".to_owned();
        let items: Vec<_> = c.scope_items().collect();
        assert_eq!(
            items,
            vec![("github", "issues.read"), ("slack", "chat.post")]
        );
    }

    #[test]
    fn optional_claims_are_omitted_and_renamed() {
        let mut c = sample("https://b", 0);
        let json = serde_json::to_value(&c).unwrap();
        assert!(json.get("max_uses").is_none());
        assert!(json.get("cnf").is_none());
        assert!(json.get("authorization_details").is_none());

        c.cnf = Some(Confirmation {
            x5t_s256: "abc".to_owned(),
        });
        c.authorization_details = Some(vec![AuthorizationDetail {
            kind: "credbroker_request".to_owned(),
            connector: "github".to_owned(),
            method: "GET".to_owned(),
            path: "/x".to_owned(),
        }]);
        c.max_uses = Some(1);
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["cnf"]["x5t#S256"], "abc");
        assert_eq!(
            json["authorization_details"][0]["type"],
            "credbroker_request"
        );
        assert_eq!(json["max_uses"], 1);
        let back: AccessClaims = serde_json::from_value(json).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn jti_is_128_bits_and_unique() {
        let a = new_jti();
        assert_eq!(URL_SAFE_NO_PAD.decode(&a).unwrap().len(), 16);
        assert_ne!(a, new_jti());
    }
}
