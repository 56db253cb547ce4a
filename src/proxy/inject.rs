//! Credential injection (DESIGN §3.8), prepared once per config load so the hot path only
//! clones a ready header value (a reference-counted buffer) or appends a ready query pair.

use std::fmt;

use base64::Engine;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION};

use crate::config::AuthMethod;
use crate::secret::Secret;

/// What the upstream receives, computed from the connector's `auth` and its credential.
#[derive(Clone)]
pub enum Injection {
    /// A header (`Authorization` for bearer and basic), value marked sensitive.
    Header {
        name: HeaderName,
        value: HeaderValue,
    },
    /// `name=value`, both percent-encoded, appended as the last query parameter.
    Query { name: String, pair: Secret },
}

impl fmt::Debug for Injection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Header { name, .. } => write!(f, "Injection::Header({name}: **REDACTED**)"),
            Self::Query { name, .. } => write!(f, "Injection::Query({name}=**REDACTED**)"),
        }
    }
}

/// The credential cannot be carried by the configured method (e.g. a newline in a header).
#[derive(Debug, thiserror::Error)]
#[error("the credential contains bytes that cannot be sent in an HTTP header")]
pub struct InjectError;

impl Injection {
    pub fn new(auth: &AuthMethod, credential: &Secret) -> Result<Self, InjectError> {
        let cred = credential.expose();
        Ok(match auth {
            AuthMethod::Bearer => Self::Header {
                name: AUTHORIZATION,
                value: sensitive([b"Bearer ".as_slice(), cred].concat())?,
            },
            AuthMethod::Header { name, prefix } => Self::Header {
                name: name.clone(),
                value: sensitive([prefix.as_bytes(), cred].concat())?,
            },
            AuthMethod::Basic { username } => {
                let raw = zeroize::Zeroizing::new([username.as_bytes(), b":", cred].concat());
                let encoded = base64::engine::general_purpose::STANDARD.encode(&*raw);
                Self::Header {
                    name: AUTHORIZATION,
                    value: sensitive(format!("Basic {encoded}").into_bytes())?,
                }
            }
            AuthMethod::Query { name } => {
                let mut pair = percent_encode(name.as_bytes());
                pair.push('=');
                pair.push_str(&percent_encode(cred));
                Self::Query {
                    name: name.clone(),
                    pair: Secret::new(pair),
                }
            }
        })
    }

    /// The header name a client must not send itself (§3.8), if the injection is a header.
    pub fn header_name(&self) -> Option<&HeaderName> {
        match self {
            Self::Header { name, .. } => Some(name),
            Self::Query { .. } => None,
        }
    }

    /// The query parameter name a client must not send itself, if the injection is a query.
    pub fn query_name(&self) -> Option<&str> {
        match self {
            Self::Query { name, .. } => Some(name),
            Self::Header { .. } => None,
        }
    }
}

fn sensitive(bytes: Vec<u8>) -> Result<HeaderValue, InjectError> {
    let bytes = zeroize::Zeroizing::new(bytes);
    let mut v = HeaderValue::from_bytes(&bytes).map_err(|_| InjectError)?;
    v.set_sensitive(true);
    Ok(v)
}

/// RFC 3986: every byte outside the unreserved set is percent-encoded (space as `%20`).
pub fn percent_encode(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(bytes.len() * 3);
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(i: &Injection) -> (&str, &[u8]) {
        match i {
            Injection::Header { name, value } => (name.as_str(), value.as_bytes()),
            Injection::Query { .. } => panic!("not a header"),
        }
    }

    #[test]
    fn each_auth_type() {
        let cred = Secret::new("s3cr3t");
        let b = Injection::new(&AuthMethod::Bearer, &cred).unwrap();
        assert_eq!(header(&b), ("authorization", b"Bearer s3cr3t".as_slice()));
        let h = Injection::new(
            &AuthMethod::Header {
                name: HeaderName::from_static("x-api-key"),
                prefix: "Token ".into(),
            },
            &cred,
        )
        .unwrap();
        assert_eq!(header(&h), ("x-api-key", b"Token s3cr3t".as_slice()));
        let basic = Injection::new(
            &AuthMethod::Basic {
                username: "x".into(),
            },
            &cred,
        )
        .unwrap();
        assert_eq!(
            header(&basic),
            ("authorization", b"Basic eDpzM2NyM3Q=".as_slice())
        );
        let q = Injection::new(
            &AuthMethod::Query {
                name: "api_key".into(),
            },
            &Secret::new("a b/c~"),
        )
        .unwrap();
        match q {
            Injection::Query { pair, .. } => assert_eq!(pair.expose(), b"api_key=a%20b%2Fc~"),
            Injection::Header { .. } => panic!(),
        }
    }

    #[test]
    fn debug_is_redacted() {
        let b = Injection::new(&AuthMethod::Bearer, &Secret::new("sentinel-cred")).unwrap();
        assert!(!format!("{b:?}").contains("sentinel"));
    }

    #[test]
    fn newline_in_header_credential_is_refused() {
        assert!(Injection::new(&AuthMethod::Bearer, &Secret::new("a\nb")).is_err());
    }
}
