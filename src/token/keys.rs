//! The broker's Ed25519 signing key (DESIGN §2 `keygen signing-key`, §4.2): loading it from a
//! PKCS#8 PEM or generating one, its `kid` and JWKS, and signing access tokens.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::secret::Secret;
use crate::token::claims::AccessClaims;
use crate::token::TokenError;

/// The JOSE `typ` of our tokens (RFC 9068 §2.1).
pub(crate) const TOKEN_TYP: &str = "at+jwt";

/// Why a signing key could not be loaded. Never contains key bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key file could not be read.
    #[error("cannot read signing key file {path}: {source}")]
    Unreadable {
        /// The file that was named.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The input holds no PKCS#8 `PRIVATE KEY` PEM block.
    #[error("no PKCS#8 `PRIVATE KEY` PEM block found{}", in_path(.0))]
    NotPkcs8(Option<PathBuf>),
    /// The PKCS#8 block is not a valid Ed25519 key (wrong algorithm, corrupt, or the
    /// embedded public key does not match the private key).
    #[error("the PKCS#8 key is not a valid Ed25519 key{}", in_path(.0))]
    NotEd25519(Option<PathBuf>),
}

/// " in PATH" for error messages about a file, nothing for in-memory input.
fn in_path(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!(" in {}", p.display()))
        .unwrap_or_default()
}

/// The broker's Ed25519 signing key and its public half. Debug prints the kid only.
pub struct SigningKeys {
    /// Signs tokens (the PKCS#8 DER inside is redacted by jsonwebtoken's own `Debug`).
    encoding: EncodingKey,
    /// Verifies our own tokens.
    decoding: DecodingKey,
    /// The raw 32-byte public key.
    public: [u8; 32],
    /// RFC 7638 thumbprint of the public JWK.
    kid: String,
    /// `GET /.well-known/jwks.json`, computed once.
    jwks: String,
}

impl SigningKeys {
    /// Parses an Ed25519 PKCS#8 PEM, v1 (as `openssl genpkey -algorithm ed25519` writes) or v2.
    pub fn from_pem(pem: &[u8]) -> Result<Self, KeyError> {
        let der = pkcs8_der_from_pem(pem).ok_or(KeyError::NotPkcs8(None))?;
        Self::from_pkcs8_der(&der).ok_or(KeyError::NotEd25519(None))
    }

    /// Reads and parses a PEM file; errors name the path, never the bytes.
    pub fn from_pem_file(path: &Path) -> Result<Self, KeyError> {
        let pem = Zeroizing::new(std::fs::read(path).map_err(|source| KeyError::Unreadable {
            path: path.to_owned(),
            source,
        })?);
        let der = pkcs8_der_from_pem(&pem).ok_or_else(|| KeyError::NotPkcs8(Some(path.into())))?;
        Self::from_pkcs8_der(&der).ok_or_else(|| KeyError::NotEd25519(Some(path.into())))
    }

    /// A fresh random key held only in memory (dev mode, or no signing_key configured).
    pub fn ephemeral() -> Self {
        let der = generate_pkcs8_der();
        // A key ring has just generated is always a valid Ed25519 PKCS#8 v2 document.
        Self::from_pkcs8_der(&der).expect("a freshly generated Ed25519 key parses")
    }

    /// The key id: the RFC 7638 JWK thumbprint (base64url SHA-256), stable per key.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// `{"keys":[{"kty":"OKP","crv":"Ed25519","x":"…","kid":"…","alg":"EdDSA","use":"sig"}]}`
    pub fn jwks_json(&self) -> String {
        self.jwks.clone()
    }

    /// Signs the claims as a compact JWS with header `{"alg":"EdDSA","typ":"at+jwt","kid":…}`.
    pub fn sign(&self, claims: &AccessClaims) -> Result<String, TokenError> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.typ = Some(TOKEN_TYP.to_owned());
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| TokenError::Signing(e.to_string()))
    }

    /// The raw 32-byte Ed25519 public key.
    pub fn public_key(&self) -> &[u8; 32] {
        &self.public
    }

    /// The key jsonwebtoken verifies our signatures with.
    pub(crate) fn decoding_key(&self) -> &DecodingKey {
        &self.decoding
    }

    /// Signs arbitrary `header.payload` bytes, so tests can forge tokens with odd headers.
    #[cfg(test)]
    pub(crate) fn sign_message(&self, message: &[u8]) -> String {
        jsonwebtoken::crypto::sign(message, &self.encoding, Algorithm::EdDSA).unwrap()
    }

    /// Builds the keys from PKCS#8 DER; `None` if it is not a consistent Ed25519 key.
    fn from_pkcs8_der(der: &[u8]) -> Option<Self> {
        // ring accepts v1 (public key derived) and v2 (embedded public key checked
        // against the private key), which is exactly the tolerance we want.
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).ok()?;
        let public: [u8; 32] = pair.public_key().as_ref().try_into().ok()?;
        let x = URL_SAFE_NO_PAD.encode(public);
        let kid = jwk_thumbprint(&x);
        let jwks = serde_json::json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig",
        }]})
        .to_string();
        let keys = Self {
            encoding: EncodingKey::from_ed_der(der),
            decoding: DecodingKey::from_ed_der(&public),
            public,
            kid,
            jwks,
        };
        keys.signs_verifiably().then_some(keys)
    }

    /// Whether jsonwebtoken accepts the key and its signatures verify with the public key
    /// ring derived, so that a key that loads can always sign (checked once, at load).
    fn signs_verifiably(&self) -> bool {
        const PROBE: &[u8] = b"credbroker signing key self-test";
        jsonwebtoken::crypto::sign(PROBE, &self.encoding, Algorithm::EdDSA)
            .and_then(|sig| {
                jsonwebtoken::crypto::verify(&sig, PROBE, &self.decoding, Algorithm::EdDSA)
            })
            .unwrap_or(false)
    }
}

impl fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKeys")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// The PEM label of a PKCS#8 private key (RFC 7468 §10).
const PEM_LABEL: &str = "PRIVATE KEY";

/// A new Ed25519 key as a PKCS#8 v1 `PRIVATE KEY` PEM, for `keygen signing-key`.
pub fn generate_signing_key_pem() -> Secret {
    let der = pkcs8_v1_from_v2(&generate_pkcs8_der());
    let b64 = Zeroizing::new(STANDARD.encode(&*der));
    let mut pem = Zeroizing::new(format!("-----BEGIN {PEM_LABEL}-----\n"));
    // RFC 7468 lines are at most 64 characters; base64 output is ASCII so byte chunks are chars.
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {PEM_LABEL}-----\n"));
    Secret::new(pem.as_bytes())
}

/// A fresh PKCS#8 v2 Ed25519 key in DER.
fn generate_pkcs8_der() -> Zeroizing<Vec<u8>> {
    // ring fails here only if the operating system's random source fails, and then
    // no key (and no token) can safely be made at all.
    let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .expect("the OS random number generator is available");
    Zeroizing::new(doc.as_ref().to_vec())
}

/// The PKCS#8 v1 encoding of an Ed25519 key (RFC 8410: version 0, the 32-byte seed, no
/// public key) — what `openssl genpkey -algorithm ed25519` writes and what every OpenSSL can
/// read; ring produces v2 (with the public key), which OpenSSL 3.0 refuses.
fn pkcs8_v1_from_v2(v2: &[u8]) -> Zeroizing<Vec<u8>> {
    /// SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING (32) } }
    const V1_PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    /// The same header as ring writes it for v2: version 1, then the seed at offset 16.
    const SEED_MARKER: [u8; 4] = [0x04, 0x22, 0x04, 0x20];
    let seed = v2
        .windows(SEED_MARKER.len())
        .position(|w| w == SEED_MARKER)
        .map(|i| i + SEED_MARKER.len())
        .and_then(|start| v2.get(start..start + 32));
    match seed {
        Some(seed) => Zeroizing::new([V1_PREFIX.as_slice(), seed].concat()),
        // Not ring's layout: keep the v2 document, which the broker itself loads.
        None => Zeroizing::new(v2.to_vec()),
    }
}

/// The DER of the first `PRIVATE KEY` block, ignoring any other PEM blocks.
fn pkcs8_der_from_pem(pem: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let mut rest = pem;
    while let Ok(Some((item, next))) = rustls_pemfile::read_one_from_slice(rest) {
        if let rustls_pemfile::Item::Pkcs8Key(key) = item {
            return Some(Zeroizing::new(key.secret_pkcs8_der().to_vec()));
        }
        rest = next;
    }
    None
}

/// RFC 7638 thumbprint of an OKP key: members in lexicographic order, no whitespace.
fn jwk_thumbprint(x: &str) -> String {
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn keygen_writes_pkcs8_v1_that_loads() {
        let pem = generate_signing_key_pem();
        let der = pkcs8_der_from_pem(pem.expose()).unwrap();
        assert_eq!(
            &der[..5],
            &[0x30, 0x2e, 0x02, 0x01, 0x00],
            "PKCS#8 v1, as openssl writes"
        );
        assert_eq!(der.len(), 48);
        let keys = SigningKeys::from_pem(pem.expose()).unwrap();
        let token = keys.sign(&sample_claims_for_keygen_test()).unwrap();
        assert_eq!(token.split('.').count(), 3);
    }

    fn sample_claims_for_keygen_test() -> AccessClaims {
        AccessClaims {
            iss: "i".into(),
            sub: "s".into(),
            client_id: None,
            aud: "i".into(),
            iat: 1,
            nbf: 1,
            exp: 2,
            jti: "j".into(),
            scope: "c:o".into(),
            authorization_details: None,
            max_uses: None,
            cnf: None,
        }
    }

    /// RFC 8032 §7.1 test vector 1: the secret (seed) and public key of a published example.
    const RFC8032_SEED: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
    const RFC8032_PUBLIC: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    /// The RFC 8032 test key as a PKCS#8 v1 PEM (what `openssl genpkey` writes), made at test
    /// time: the standard header, then the seed.
    pub(crate) fn v1_pem() -> String {
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend(hex::decode(RFC8032_SEED).unwrap());
        let label = "PRIVATE KEY";
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            STANDARD.encode(der)
        )
    }

    #[test]
    fn v1_pem_loads_with_the_rfc8032_public_key() {
        let keys = SigningKeys::from_pem(v1_pem().as_bytes()).unwrap();
        assert_eq!(hex::encode(keys.public_key()), RFC8032_PUBLIC);
    }

    #[test]
    fn jwks_has_the_right_x_and_kid() {
        let keys = SigningKeys::from_pem(v1_pem().as_bytes()).unwrap();
        let jwks: serde_json::Value = serde_json::from_str(&keys.jwks_json()).unwrap();
        let key = &jwks["keys"][0];
        let x = URL_SAFE_NO_PAD.encode(hex::decode(RFC8032_PUBLIC).unwrap());
        assert_eq!(key["x"], x);
        assert_eq!(key["kty"], "OKP");
        assert_eq!(key["crv"], "Ed25519");
        assert_eq!(key["alg"], "EdDSA");
        assert_eq!(key["use"], "sig");
        assert_eq!(key["kid"], keys.kid());
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
        // No private member may ever appear in the JWKS.
        assert!(key.get("d").is_none());
    }

    #[test]
    fn kid_is_the_rfc7638_thumbprint_and_stable() {
        let a = SigningKeys::from_pem(v1_pem().as_bytes()).unwrap();
        let b = SigningKeys::from_pem(v1_pem().as_bytes()).unwrap();
        assert_eq!(a.kid(), b.kid());
        let expected = URL_SAFE_NO_PAD.encode(Sha256::digest(
            format!(
                r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
                URL_SAFE_NO_PAD.encode(hex::decode(RFC8032_PUBLIC).unwrap())
            )
            .as_bytes(),
        ));
        assert_eq!(a.kid(), expected);
        assert_ne!(a.kid(), SigningKeys::ephemeral().kid());
    }

    #[test]
    fn generated_pem_is_well_formed_and_loads() {
        let pem = generate_signing_key_pem();
        let text = std::str::from_utf8(pem.expose()).unwrap();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(text.ends_with("-----END PRIVATE KEY-----\n"));
        assert!(text.lines().all(|l| l.len() <= 64));
        let keys = SigningKeys::from_pem(pem.expose()).unwrap();
        assert_ne!(
            keys.kid(),
            SigningKeys::from_pem(v1_pem().as_bytes()).unwrap().kid()
        );
    }

    #[test]
    fn from_pem_file_errors_name_the_path_not_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = SigningKeys::from_pem_file(&missing).unwrap_err();
        assert!(err.to_string().contains("missing.pem"));

        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "sentinel-secret-bytes").unwrap();
        let err = SigningKeys::from_pem_file(&bad).unwrap_err();
        assert!(matches!(err, KeyError::NotPkcs8(_)));
        assert!(err.to_string().contains("bad.pem"));
        assert!(!err.to_string().contains("sentinel"));

        let good = dir.path().join("good.pem");
        std::fs::write(&good, v1_pem()).unwrap();
        assert!(SigningKeys::from_pem_file(&good).is_ok());
    }

    #[test]
    fn non_ed25519_and_inconsistent_keys_are_refused() {
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let err = SigningKeys::from_pem(ec.serialize_pem().as_bytes()).unwrap_err();
        assert!(matches!(err, KeyError::NotEd25519(None)));

        // A v2 document whose embedded public key was tampered with.
        let mut der = generate_pkcs8_der().to_vec();
        let last = der.len() - 1;
        der[last] ^= 1;
        assert!(SigningKeys::from_pkcs8_der(&der).is_none());
    }

    #[test]
    fn debug_prints_only_the_kid() {
        let keys = SigningKeys::from_pem(v1_pem().as_bytes()).unwrap();
        let debug = format!("{keys:?}");
        assert!(debug.contains(keys.kid()));
        assert!(!debug.contains("MC4CAQAw"));
        assert!(!debug.contains(&URL_SAFE_NO_PAD.encode(hex::decode(RFC8032_PUBLIC).unwrap())));
    }
}
