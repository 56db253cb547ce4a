//! Credential injection (DESIGN §3.8), prepared once per config load so the hot path only
//! clones a ready header value (a reference-counted buffer) or appends a ready query pair.

use std::fmt;

use base64::Engine;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION};

use super::canonical;
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

/// The forms in which an injected credential could come back in an upstream response header:
/// as it is; as the `basic` auth's base64 of `user:credential`; as the `query` auth's
/// percent-encoding (a redirect's `Location` repeating the query). A header value holding
/// escapes is also compared after decoding them, whatever their case. An upstream echoing any
/// of these would hand the credential to the client (DESIGN §4.3). Prepared once per
/// credential, as each response is checked against them.
pub struct Echoes {
    /// The raw credential first; forms shorter than [`MIN_ECHO`] are left out (they would
    /// match ordinary header values).
    forms: Vec<Secret>,
}

/// The shortest form looked for.
const MIN_ECHO: usize = 4;

impl fmt::Debug for Echoes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Echoes({} forms, **REDACTED**)", self.forms.len())
    }
}

impl Echoes {
    pub fn new(auth: &AuthMethod, credential: &Secret) -> Self {
        let cred = credential.expose();
        let mut forms = vec![credential.clone()];
        match auth {
            AuthMethod::Basic { username } => {
                let raw = zeroize::Zeroizing::new([username.as_bytes(), b":", cred].concat());
                let encoded = base64::engine::general_purpose::STANDARD.encode(&*raw);
                // Without its padding, so an echo that drops or re-pads it still matches.
                forms.push(Secret::new(encoded.trim_end_matches('=')));
            }
            AuthMethod::Query { .. } => {
                let encoded = percent_encode(cred);
                if encoded.as_bytes() != cred {
                    forms.push(Secret::new(encoded));
                }
            }
            AuthMethod::Bearer | AuthMethod::Header { .. } => {}
        }
        forms.retain(|f| f.expose().len() >= MIN_ECHO);
        Self { forms }
    }

    /// Whether `value` carries the credential in one of its forms — as it is, or after up to
    /// two rounds of `%XX` decoding (a redirect may carry an encoded URL that itself holds the
    /// encoded credential), with `+` read as a space or not.
    pub fn found_in(&self, value: &[u8]) -> bool {
        if self.any_form_in(value) {
            return true;
        }
        if self.forms.is_empty() || !value.iter().any(|&b| b == b'%' || b == b'+') {
            return false;
        }
        let mut current = zeroize::Zeroizing::new(value.to_vec());
        for _ in 0..2 {
            let spaced: Vec<u8> = current
                .iter()
                .map(|&b| if b == b'+' { b' ' } else { b })
                .collect();
            let spaced = zeroize::Zeroizing::new(canonical::percent_decode_lossy(&spaced));
            if self.any_form_in(&spaced) {
                return true;
            }
            let decoded = zeroize::Zeroizing::new(canonical::percent_decode_lossy(&current));
            if self.any_form_in(&decoded) {
                return true;
            }
            if !decoded.contains(&b'%') {
                break;
            }
            current = decoded;
        }
        false
    }

    /// Whether `value` is the credential in one of its forms, whole (compared in constant
    /// time): a name that merely contains a short credential is not one.
    pub fn is(&self, value: &[u8]) -> bool {
        let mut found = false;
        for form in &self.forms {
            found |= constant_time_eq::constant_time_eq(form.expose(), value);
        }
        found
    }

    /// Whether `text` may hold the credential: long enough for its shortest form (the cheap
    /// test a recorded field passes first — most are shorter than any credential).
    pub fn fits_in(&self, text: &str) -> bool {
        self.forms.iter().any(|f| text.len() >= f.expose().len())
    }

    fn any_form_in(&self, value: &[u8]) -> bool {
        self.forms.iter().any(|f| contains(value, f.expose()))
    }

    /// Whether a header name (lower case, as parsed) carries the credential in one of its
    /// forms, compared ignoring ASCII case: the name lost the credential's capitals.
    pub fn found_in_name(&self, name: &http::HeaderName) -> bool {
        let name = name.as_str().as_bytes();
        self.forms.iter().any(|f| {
            let form = f.expose();
            name.len() >= form.len()
                && name
                    .windows(form.len())
                    .any(|w| w.eq_ignore_ascii_case(form))
        })
    }
}

/// A linear-time search (a crafted value of near-copies cannot make it quadratic).
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.len() >= needle.len() && memchr::memmem::find(haystack, needle).is_some()
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

    proptest::proptest! {
        /// Whatever the credential's bytes, a response header that repeats what was sent —
        /// the whole injected header value, or the whole injected query pair — is caught.
        #[test]
        fn an_echo_of_what_was_sent_is_always_caught(
            cred in proptest::collection::vec(0x20u8..0x7f, 4..40),
            before in "[ -~]{0,8}",
            after in "[ -~]{0,8}",
        ) {
            let secret = Secret::new(cred.clone());
            for auth in [
                AuthMethod::Bearer,
                AuthMethod::Basic { username: "u".into() },
                AuthMethod::Query { name: "key".into() },
                AuthMethod::Header { name: HeaderName::from_static("x-k"), prefix: "T ".into() },
            ] {
                let echoes = Echoes::new(&auth, &secret);
                let sent = match Injection::new(&auth, &secret).unwrap() {
                    Injection::Header { value, .. } => value.as_bytes().to_vec(),
                    Injection::Query { pair, .. } => pair.expose().to_vec(),
                };
                let echoed = [before.as_bytes(), &sent, after.as_bytes()].concat();
                proptest::prop_assert!(echoes.found_in(&echoed), "{auth:?}");
            }
        }
    }

    #[test]
    fn echoes_cover_every_form_the_credential_was_sent_in() {
        let cred = Secret::new("QRY CRED/+&=é~");
        let query = Echoes::new(&AuthMethod::Query { name: "k".into() }, &cred);
        assert!(query.found_in("QRY CRED/+&=é~".as_bytes()));
        assert!(query.found_in(b"https://x.example/r?a=1&k=QRY%20CRED%2F%2B%26%3D%C3%A9~"));
        assert!(!query.found_in(b"k=QRY%20cred"), "only part of it");
        assert!(
            query.found_in(b"k=QRY%20CRED%2f%2b%26%3d%c3%a9~"),
            "lower-case escapes"
        );
        assert!(!query.found_in(b"k=other%20value"));
        let basic = Echoes::new(
            &AuthMethod::Basic {
                username: "x".into(),
            },
            &Secret::new("BASCRED-xyz"),
        );
        assert!(basic.found_in(b"Basic eDpCQVNDUkVELXh5eg=="));
        assert!(basic.found_in(b"before eDpCQVNDUkVELXh5eg after"));
        assert!(!basic.found_in(b"Basic eDpvdGhlcg=="));
        // A base64 API key under `query` auth, in a redirect's doubly encoded `next`.
        let key = Secret::new("AB+cd/ef==");
        let query = Echoes::new(&AuthMethod::Query { name: "k".into() }, &key);
        assert!(query.found_in(b"/login?next=%2Fr%3Fk%3DAB%252Bcd%252Fef%253D%253D"));
        // `basic`'s base64 (with `+`/`/`) arriving percent-encoded, and a `+` for a space.
        let basic = Echoes::new(
            &AuthMethod::Basic {
                username: "x".into(),
            },
            &Secret::new("s>>?s>>?"),
        );
        assert!(basic.found_in(b"Basic%20eDpzPj4%2Fcz4%2BPw"));
        let spaced = Echoes::new(&AuthMethod::Bearer, &Secret::new("two words"));
        assert!(spaced.found_in(b"q=two+words"));
        let bearer = Echoes::new(&AuthMethod::Bearer, &Secret::new("tok-123"));
        assert!(bearer.found_in(b"Bearer tok-123"));
        assert!(
            !bearer.found_in(b"%zz%4"),
            "malformed escapes are not an error"
        );
        // A dynamic connector before its first mint: nothing to look for.
        assert!(!Echoes::new(&AuthMethod::Bearer, &Secret::new("")).found_in(b"anything"));
        assert!(!format!("{bearer:?}").contains("tok-123"));
    }

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
