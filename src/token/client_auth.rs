//! Client authentication at the token endpoint (DESIGN §4.1): HTTP Basic credentials,
//! the constant-time secret check, and `keygen client-secret`.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::secret::Secret;
use crate::token::form::form_urldecode;

/// Why an `Authorization: Basic` header could not be read (→ `invalid_client`).
/// Never contains the header or any part of it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientAuthError {
    /// The scheme is not `Basic`, or there are no credentials after it.
    #[error("client authentication must use HTTP Basic")]
    NotBasic,
    /// The credentials are not valid base64.
    #[error("the Basic credentials are not valid base64")]
    BadBase64,
    /// The decoded credentials have no `:` between client id and secret.
    #[error("the Basic credentials have no ':' separator")]
    MissingColon,
    /// The id or secret is not valid form-urlencoding, or the id is not UTF-8.
    #[error("the Basic credentials are not correctly form-urlencoded")]
    BadEncoding,
    /// The client id is empty.
    #[error("the Basic credentials have an empty client id")]
    EmptyClientId,
}

/// Parses `Authorization: Basic base64(id:secret)`; per RFC 6749 §2.3.1 id and secret are
/// form-urlencoded before base64 — decode them. Errors on anything malformed.
pub fn parse_basic(header_value: &[u8]) -> Result<(String, Secret), ClientAuthError> {
    let credentials = strip_basic_scheme(header_value).ok_or(ClientAuthError::NotBasic)?;
    let decoded = Zeroizing::new(
        STANDARD
            .decode(credentials)
            .map_err(|_| ClientAuthError::BadBase64)?,
    );
    // Split on the raw colon: a ':' inside the id or secret arrives as %3A.
    let colon = decoded
        .iter()
        .position(|&b| b == b':')
        .ok_or(ClientAuthError::MissingColon)?;
    let id_bytes = form_urldecode(&decoded[..colon]).ok_or(ClientAuthError::BadEncoding)?;
    let id = String::from_utf8(id_bytes).map_err(|_| ClientAuthError::BadEncoding)?;
    if id.is_empty() {
        return Err(ClientAuthError::EmptyClientId);
    }
    let secret =
        Zeroizing::new(form_urldecode(&decoded[colon + 1..]).ok_or(ClientAuthError::BadEncoding)?);
    Ok((id, Secret::new(secret.as_slice())))
}

/// The credentials after a case-insensitive `Basic` scheme and its spaces, if any.
fn strip_basic_scheme(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(5)?;
    if !scheme.eq_ignore_ascii_case(b"basic") || !rest.starts_with(b" ") {
        return None;
    }
    let credentials = rest.trim_ascii();
    (!credentials.is_empty()).then_some(credentials)
}

/// Constant-time comparison of SHA-256(presented) with the configured digest (subtle).
pub fn secret_matches(presented: &Secret, expected_sha256: &[u8; 32]) -> bool {
    let digest: [u8; 32] = Sha256::digest(presented.expose()).into();
    digest.ct_eq(expected_sha256).into()
}

/// `keygen client-secret`: a new random secret (32 bytes, base64url) and its hex SHA-256,
/// the digest of the secret string exactly as the client will present it.
pub fn generate_client_secret() -> (Secret, String) {
    let mut bytes = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(bytes.as_mut());
    let secret = Secret::new(URL_SAFE_NO_PAD.encode(bytes.as_ref()));
    let digest = hex::encode(Sha256::digest(secret.expose()));
    (secret, digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(raw: &str) -> Vec<u8> {
        format!("Basic {}", STANDARD.encode(raw)).into_bytes()
    }

    #[test]
    fn parses_plain_credentials() {
        let (id, secret) = parse_basic(&basic("sync-bot:s3cr3t")).unwrap();
        assert_eq!(id, "sync-bot");
        assert_eq!(secret.expose(), b"s3cr3t");
    }

    #[test]
    fn decodes_form_urlencoded_id_and_secret() {
        let (id, secret) = parse_basic(&basic("my%20bot:a%3Ab:c+d%25")).unwrap();
        assert_eq!(id, "my bot");
        // The url-encoded ':' is part of the secret, and so is the raw second ':'.
        assert_eq!(secret.expose(), b"a:b:c d%");
    }

    #[test]
    fn scheme_is_case_insensitive_and_an_empty_secret_is_kept_empty() {
        let value = format!("bAsIc   {}  ", STANDARD.encode("bot:"));
        let (id, secret) = parse_basic(value.as_bytes()).unwrap();
        assert_eq!(id, "bot");
        assert!(secret.is_empty());
    }

    fn err(value: &[u8]) -> ClientAuthError {
        parse_basic(value).unwrap_err()
    }

    #[test]
    fn malformed_headers_are_refused() {
        assert_eq!(err(b"Basic !!!notbase64"), ClientAuthError::BadBase64);
        assert_eq!(err(&basic("no-colon-here")), ClientAuthError::MissingColon);
        assert_eq!(err(&basic(":secret")), ClientAuthError::EmptyClientId);
        assert_eq!(err(&basic("bot:bad%zz")), ClientAuthError::BadEncoding);
        assert_eq!(err(&basic("b%FFt:x")), ClientAuthError::BadEncoding);
        for value in [&b"Bearer abc"[..], b"Basic", b"Basic ", b"Basicabc", b""] {
            assert_eq!(err(value), ClientAuthError::NotBasic);
        }
    }

    #[test]
    fn secret_matches_only_the_right_secret() {
        let expected: [u8; 32] = Sha256::digest(b"right").into();
        assert!(secret_matches(&Secret::new("right"), &expected));
        assert!(!secret_matches(&Secret::new("wrong"), &expected));
        assert!(!secret_matches(&Secret::new(""), &expected));
    }

    #[test]
    fn generated_secrets_match_their_digest() {
        let (secret, digest_hex) = generate_client_secret();
        assert_eq!(secret.expose().len(), 43);
        let digest: [u8; 32] = hex::decode(&digest_hex).unwrap().try_into().unwrap();
        assert!(secret_matches(&secret, &digest));
        let (other, _) = generate_client_secret();
        assert_ne!(secret.expose(), other.expose());
        let (id, parsed) = parse_basic(&basic(&format!(
            "bot:{}",
            std::str::from_utf8(secret.expose()).unwrap()
        )))
        .unwrap();
        assert_eq!(id, "bot");
        assert!(secret_matches(&parsed, &digest));
    }
}
