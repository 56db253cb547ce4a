//! TLS for the broker's listeners and its upstream connections (DESIGN §3, §4.1).
//!
//! Every config is built on rustls' `ring` provider with TLS 1.3 and 1.2 only and rustls' safe
//! default cipher suites. The server offers ALPN `h2` and `http/1.1`; with a `client_ca` it
//! verifies client certificates against that CA but does not require one (clients that
//! authenticate with a secret connect without a certificate). [`PeerIdentity`] is what the token
//! endpoint and the proxy learn from a verified client certificate; [`DevPki`] makes throwaway
//! certificates for tests and `credbroker keygen dev-certs`.

mod dev_pki;
mod identity;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::version::{TLS12, TLS13};
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};

use crate::secret::Secret;

pub use dev_pki::{generate_dev_pki, DevPki, IssuedCert};
pub use identity::{peer_identity, x5t_s256, ClientCaId, PeerIdentity};

/// The protocol versions every config allows, newest first.
static VERSIONS: &[&SupportedProtocolVersion] = &[&TLS13, &TLS12];

/// ALPN protocols offered with HTTP/2 enabled, in preference order.
const ALPN_H2_HTTP1: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why TLS material could not be loaded, a config built or a certificate made.
///
/// Variants name files, never key bytes: PEM parse details are left out on purpose because a
/// decoder message could quote part of a private key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file holds no PEM `CERTIFICATE` block, or one that is malformed.
    #[error("no valid PEM certificate in {path}")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The file holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1).
    #[error("no valid PEM private key (PKCS#8, PKCS#1 or SEC1) in {path}")]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// A CA certificate was rejected as a trust anchor.
    #[error("unusable CA certificate in {path}: {source}")]
    BadCa {
        /// The CA file.
        path: PathBuf,
        /// Why rustls rejected it.
        source: rustls::Error,
    },
    /// The client certificate verifier could not be built from the CA file.
    #[error("cannot verify client certificates with {path}: {source}")]
    ClientVerifier {
        /// The `client_ca` file.
        path: PathBuf,
        /// Why the verifier could not be built.
        source: rustls::server::VerifierBuilderError,
    },
    /// rustls refused the certificate and key (for example a key that does not match the
    /// certificate, or an unsupported key type).
    #[error("cannot use certificate {cert} with key {key}: {source}")]
    CertKey {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Why rustls refused them.
        source: rustls::Error,
    },
    /// The provider does not support the required protocol versions (cannot happen with ring).
    #[error("TLS provider unusable: {0}")]
    Provider(rustls::Error),
    /// A DER certificate could not be parsed.
    #[error("cannot parse certificate: {0}")]
    BadCertificate(String),
    /// A subject alternative name is not valid in a certificate (not ASCII, or malformed).
    #[error("invalid subject alternative name {0:?}")]
    InvalidSan(String),
    /// Certificate generation failed.
    #[error("cannot generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file to be written exists already; nothing is overwritten.
    #[error("{path} exists already; refusing to overwrite it")]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl TlsError {
    /// Whether the error is about the file at `path` alone (unreadable, not PEM, an unusable
    /// CA): a config finding then names the key that gave that file.
    pub fn concerns(&self, path: &Path) -> bool {
        match self {
            Self::Read { path: p, .. }
            | Self::NoCertificate { path: p }
            | Self::NoPrivateKey { path: p }
            | Self::BadCa { path: p, .. }
            | Self::ClientVerifier { path: p, .. } => p == path,
            _ => false,
        }
    }
}

/// Loads a PEM certificate chain and PEM private key (PKCS#8, PKCS#1 or SEC1) and builds the
/// server config: TLS 1.2 + 1.3, ALPN ["h2", "http/1.1"], and, with `client_ca`, a
/// `WebPkiClientVerifier` built with `allow_unauthenticated()` (a certificate, if presented,
/// must chain to the CA).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_and_ca(cert, key, client_ca).map(|(config, _)| config)
}

/// [`server_config`], with what identifies the `client_ca` it verifies client certificates
/// against (made from the very bytes the verifier was built from).
pub fn server_config_and_ca(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<(Arc<ServerConfig>, Option<ClientCaId>), TlsError> {
    let chain = read_file(cert)?;
    let key_pem = Secret::new(read_file(key)?);
    let ca = client_ca
        .map(|p| read_file(p).map(|pem| (p, pem)))
        .transpose()?;
    let ca_id = ca.as_ref().map(|(_, pem)| ClientCaId::of(pem));
    let ca = ca.as_ref().map(|(p, pem)| (*p, pem.as_slice()));
    let config = server_config_from_pem((cert, &chain), (key, &key_pem), ca)?;
    Ok((config, ca_id))
}

/// [`server_config`] from PEM bytes already in memory (tests, the dev server). Each path only
/// names the material in error messages.
pub fn server_config_from_pem(
    (cert_path, cert_pem): (&Path, &[u8]),
    (key_path, key_pem): (&Path, &Secret),
    client_ca: Option<(&Path, &[u8])>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = parse_certs(cert_path, cert_pem)?;
    let key = parse_key(key_path, key_pem)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(TlsError::Provider)?;
    let builder = match client_ca {
        Some((ca_path, ca_pem)) => {
            let roots = root_store(ca_path, ca_pem, RootCertStore::empty())?;
            // Not required: clients using client_secret_basic connect without a certificate.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|source| TlsError::ClientVerifier {
                    path: ca_path.to_owned(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::CertKey {
            cert: cert_path.to_owned(),
            key: key_path.to_owned(),
            source,
        })?;
    config.alpn_protocols = alpn(true);
    Ok(Arc::new(config))
}

/// The rustls client config for upstream connections: webpki roots + the PEM certificates in
/// `extra_ca` if given; hostname verification is always on; ALPN h2 + http/1.1.
///
/// hyper-rustls' `HttpsConnectorBuilder::enable_http1/enable_http2` overwrite the ALPN list
/// with the protocols they enable; it matters when the config is used with tokio-rustls directly.
pub fn upstream_client_config(extra_ca: Option<&Path>) -> Result<ClientConfig, TlsError> {
    upstream_client_config_with(extra_ca, true)
}

/// [`upstream_client_config`] with a choice of ALPN: h2 + http/1.1 when `alpn_h2` is true,
/// else http/1.1 only.
pub fn upstream_client_config_with(
    extra_ca: Option<&Path>,
    alpn_h2: bool,
) -> Result<ClientConfig, TlsError> {
    let extra = extra_ca
        .map(|p| read_file(p).map(|pem| (p, pem)))
        .transpose()?;
    upstream_client_config_from_pem(extra.as_ref().map(|(p, pem)| (*p, pem.as_slice())), alpn_h2)
}

/// [`upstream_client_config_with`] from an extra CA already in memory (tests, the dev server).
pub fn upstream_client_config_from_pem(
    extra_ca: Option<(&Path, &[u8])>,
    alpn_h2: bool,
) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some((path, pem)) = extra_ca {
        roots = root_store(path, pem, roots)?;
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(TlsError::Provider)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn(alpn_h2);
    Ok(config)
}

/// The one crypto provider: ring (the crate is built without aws-lc).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn alpn(h2: bool) -> Vec<Vec<u8>> {
    let protocols: &[&[u8]] = if h2 {
        &ALPN_H2_HTTP1
    } else {
        &ALPN_H2_HTTP1[1..]
    };
    protocols.iter().map(|p| p.to_vec()).collect()
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Every `CERTIFICATE` block of `pem`, in order; at least one.
fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let no_cert = || TlsError::NoCertificate {
        path: path.to_owned(),
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| no_cert())?;
    if certs.is_empty() {
        return Err(no_cert());
    }
    Ok(certs)
}

/// The first private key in `pem`, whichever of PKCS#8, PKCS#1 or SEC1 it is.
fn parse_key(path: &Path, pem: &Secret) -> Result<PrivateKeyDer<'static>, TlsError> {
    // The pem error is dropped: its message could quote bytes of the key.
    PrivateKeyDer::from_pem_slice(pem.expose()).map_err(|_| TlsError::NoPrivateKey {
        path: path.to_owned(),
    })
}

/// Adds every certificate of `pem` to `roots` as a trust anchor.
fn root_store(
    path: &Path,
    pem: &[u8],
    mut roots: RootCertStore,
) -> Result<RootCertStore, TlsError> {
    for cert in parse_certs(path, pem)? {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}
