//! Handshake tests over real sockets on 127.0.0.1:0 with certificates made at test time.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ProtocolVersion, RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;

const CLIENT_SAN: &str = "spiffe://credbroker.dev/test-client";

/// What the server side saw of one accepted connection.
#[derive(Debug)]
struct Accepted {
    version: Option<ProtocolVersion>,
    alpn: Option<Vec<u8>>,
    identity: Option<PeerIdentity>,
}

/// Accepts one connection with `config`; the handle yields the handshake outcome.
async fn serve_once(
    config: Arc<ServerConfig>,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<io::Result<Accepted>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = TlsAcceptor::from(config).accept(tcp).await?;
        let (_, conn) = tls.get_ref();
        let accepted = Accepted {
            version: conn.protocol_version(),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            identity: peer_identity(conn, None),
        };
        // Echo one byte so the client sees whether the server really accepted it.
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await?;
        tls.write_all(&byte).await?;
        tls.shutdown().await?;
        Ok(accepted)
    });
    (addr, handle)
}

/// Connects, sends one byte and reads it back (which fails if the server refused us).
async fn connect(
    config: ClientConfig,
    addr: std::net::SocketAddr,
    name: &str,
) -> io::Result<Option<Vec<u8>>> {
    let tcp = TcpStream::connect(addr).await?;
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await?;
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    tls.write_all(b"x").await?;
    let mut byte = [0u8; 1];
    tls.read_exact(&mut byte).await?;
    Ok(alpn)
}

fn ca_pem(pki: &DevPki) -> (&Path, &[u8]) {
    (Path::new("ca.pem"), pki.ca_cert_pem.as_bytes())
}

fn server_cfg(pki: &DevPki, client_ca: Option<&DevPki>) -> Arc<ServerConfig> {
    let server = pki.server();
    server_config_from_pem(
        (Path::new("server.pem"), server.cert_pem.as_bytes()),
        (Path::new("server-key.pem"), &server.key_pem),
        client_ca.map(ca_pem),
    )
    .unwrap()
}

/// A test client trusting `pki`'s CA, restricted to `versions`, offering `alpn`, and presenting
/// `cert` if given.
fn client_cfg(
    pki: &DevPki,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
    cert: Option<&IssuedCert>,
) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_cert_pem.as_bytes()).unwrap())
        .unwrap();
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match cert {
        Some(cert) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(cert.key_pem.expose()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

fn rustls_error(err: &io::Error) -> Option<&rustls::Error> {
    err.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
}

#[tokio::test]
async fn tls13_handshake_negotiates_h2() {
    let pki = generate_dev_pki(&[]).unwrap();
    let (addr, server) = serve_once(server_cfg(&pki, None)).await;
    let client = client_cfg(&pki, &[&TLS13], &[b"h2", b"http/1.1"], None);
    let alpn = connect(client, addr, "localhost").await.unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    let accepted = server.await.unwrap().unwrap();
    assert_eq!(accepted.version, Some(ProtocolVersion::TLSv1_3));
    assert_eq!(accepted.alpn.as_deref(), Some(&b"h2"[..]));
    assert!(accepted.identity.is_none());
}

#[tokio::test]
async fn tls12_client_with_http1_only_works() {
    let pki = generate_dev_pki(&[]).unwrap();
    let (addr, server) = serve_once(server_cfg(&pki, None)).await;
    let client = client_cfg(&pki, &[&TLS12], &[b"http/1.1"], None);
    let alpn = connect(client, addr, "127.0.0.1").await.unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    let accepted = server.await.unwrap().unwrap();
    assert_eq!(accepted.version, Some(ProtocolVersion::TLSv1_2));
}

#[tokio::test]
async fn plain_http_to_the_tls_port_fails_the_handshake() {
    let pki = generate_dev_pki(&[]).unwrap();
    let (addr, server) = serve_once(server_cfg(&pki, None)).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let err = server.await.unwrap().unwrap_err();
    assert!(rustls_error(&err).is_some(), "{err}");
}

#[tokio::test]
async fn mtls_client_cert_gives_identity() {
    let pki = generate_dev_pki(&[CLIENT_SAN]).unwrap();
    let cert = pki.client(CLIENT_SAN).unwrap();
    let (addr, server) = serve_once(server_cfg(&pki, Some(&pki))).await;
    let client = client_cfg(&pki, &[&TLS13, &TLS12], &[b"h2"], Some(cert));
    connect(client, addr, "localhost").await.unwrap();
    let identity = server.await.unwrap().unwrap().identity.unwrap();
    assert!(identity.has_san(CLIENT_SAN));
    assert_eq!(identity.sans, vec![CLIENT_SAN.to_owned()]);
    use sha2::Digest as _;
    let expected = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        sha2::Sha256::digest(&cert.cert_der),
    );
    assert_eq!(identity.x5t_s256, expected);
}

#[tokio::test]
async fn mtls_over_tls12_gives_identity() {
    let pki = generate_dev_pki(&[CLIENT_SAN]).unwrap();
    let cert = pki.client(CLIENT_SAN).unwrap();
    let (addr, server) = serve_once(server_cfg(&pki, Some(&pki))).await;
    let client = client_cfg(&pki, &[&TLS12], &[], Some(cert));
    connect(client, addr, "localhost").await.unwrap();
    let identity = server.await.unwrap().unwrap().identity.unwrap();
    assert_eq!(identity.x5t_s256, x5t_s256(&cert.cert_der));
}

#[tokio::test]
async fn client_ca_does_not_require_a_certificate() {
    let pki = generate_dev_pki(&[]).unwrap();
    let (addr, server) = serve_once(server_cfg(&pki, Some(&pki))).await;
    let client = client_cfg(&pki, &[&TLS13], &[b"http/1.1"], None);
    connect(client, addr, "localhost").await.unwrap();
    assert!(server.await.unwrap().unwrap().identity.is_none());
}

#[tokio::test]
async fn client_cert_from_another_ca_is_refused() {
    let pki = generate_dev_pki(&[]).unwrap();
    let other = generate_dev_pki(&[CLIENT_SAN]).unwrap();
    let (addr, server) = serve_once(server_cfg(&pki, Some(&pki))).await;
    // Trusts the right server CA but presents a client cert the server's CA never signed.
    let client = client_cfg(&pki, &[&TLS13], &[], other.client(CLIENT_SAN));
    let client_result = connect(client, addr, "localhost").await;
    let err = server.await.unwrap().unwrap_err();
    assert!(
        matches!(
            rustls_error(&err),
            Some(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer
            ))
        ),
        "{err}"
    );
    // In TLS 1.3 the client finishes first and learns of the refusal on its first read.
    assert!(client_result.is_err());
}

/// Serves `pki.issue_server_cert(hosts)` and connects with `upstream_client_config*`.
async fn upstream_connect(
    pki: &DevPki,
    trust: Option<&DevPki>,
    name: &str,
) -> (
    io::Result<Option<Vec<u8>>>,
    tokio::task::JoinHandle<io::Result<Accepted>>,
) {
    let cert = pki.issue_server_cert(&["upstream.test"]).unwrap();
    let config = server_config_from_pem(
        (Path::new("upstream.pem"), cert.cert_pem.as_bytes()),
        (Path::new("upstream-key.pem"), &cert.key_pem),
        None,
    )
    .unwrap();
    let (addr, server) = serve_once(config).await;
    let client = upstream_client_config_from_pem(trust.map(ca_pem), true).unwrap();
    (connect(client, addr, name).await, server)
}

#[tokio::test]
async fn upstream_trusts_the_extra_ca() {
    let pki = generate_dev_pki(&[]).unwrap();
    let (result, server) = upstream_connect(&pki, Some(&pki), "upstream.test").await;
    assert_eq!(result.unwrap().as_deref(), Some(&b"h2"[..]));
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn upstream_without_the_extra_ca_is_unknown_issuer() {
    let pki = generate_dev_pki(&[]).unwrap();
    let (result, _server) = upstream_connect(&pki, None, "upstream.test").await;
    let err = result.unwrap_err();
    assert!(
        matches!(
            rustls_error(&err),
            Some(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer
            ))
        ),
        "{err}"
    );
}

#[tokio::test]
async fn upstream_with_the_wrong_hostname_fails() {
    let pki = generate_dev_pki(&[]).unwrap();
    let (result, _server) = upstream_connect(&pki, Some(&pki), "other.test").await;
    let err = result.unwrap_err();
    assert!(
        matches!(
            rustls_error(&err),
            Some(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. }
            ))
        ),
        "{err}"
    );
}

#[test]
fn upstream_config_from_a_file_and_alpn_choice() {
    let pki = generate_dev_pki(&[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_cert_pem).unwrap();
    let h2 = upstream_client_config(Some(&ca)).unwrap();
    assert_eq!(
        h2.alpn_protocols,
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    );
    let h1 = upstream_client_config_with(None, false).unwrap();
    assert_eq!(h1.alpn_protocols, vec![b"http/1.1".to_vec()]);
}

#[test]
fn server_config_from_files_and_alpn() {
    let pki = generate_dev_pki(&[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("s.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert, &pki.server().cert_pem).unwrap();
    std::fs::write(&key, pki.server().key_pem.expose()).unwrap();
    let config = server_config(&cert, &key, None).unwrap();
    assert_eq!(
        config.alpn_protocols,
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    );
}

#[test]
fn sec1_keys_load() {
    let pki = generate_dev_pki(&[]).unwrap();
    let sec1_pem = sec1_from_pkcs8_pem(&pki.server().key_pem);
    let config = server_config_from_pem(
        (Path::new("s.pem"), pki.server().cert_pem.as_bytes()),
        (Path::new("k.pem"), &sec1_pem),
        None,
    );
    assert!(config.is_ok(), "{:?}", config.err());
}

/// Rewraps rcgen's PKCS#8 EC key as a SEC1 `EC PRIVATE KEY`: the inner OCTET STRING of PKCS#8.
fn sec1_from_pkcs8_pem(pkcs8: &Secret) -> Secret {
    use x509_parser::der_parser::der::parse_der;
    let PrivateKeyDer::Pkcs8(der) = PrivateKeyDer::from_pem_slice(pkcs8.expose()).unwrap() else {
        panic!("rcgen writes PKCS#8");
    };
    let (_, seq) = parse_der(der.secret_pkcs8_der()).unwrap();
    let items = seq.as_sequence().unwrap();
    let sec1 = items[2].as_slice().unwrap();
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, sec1);
    Secret::new(format!(
        "-----BEGIN EC PRIVATE KEY-----\n{b64}\n-----END EC PRIVATE KEY-----\n"
    ))
}

#[test]
fn errors_name_files_and_never_key_bytes() {
    let pki = generate_dev_pki(&[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let err = server_config(&missing, &missing, None).unwrap_err();
    assert!(matches!(err, TlsError::Read { .. }));
    assert!(err.to_string().contains("missing.pem"));

    // A key file holding a certificate, and a broken key: named, no content quoted.
    let broken = Secret::new(
        "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1zZW50aW5lbA!!\n-----END PRIVATE KEY-----\n",
    );
    let err = server_config_from_pem(
        (Path::new("s.pem"), pki.server().cert_pem.as_bytes()),
        (Path::new("bad-key.pem"), &broken),
        None,
    )
    .unwrap_err();
    assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{err}");
    let shown = format!("{err} {err:?}");
    assert!(shown.contains("bad-key.pem"));
    assert!(!shown.contains("c2VjcmV0"));

    // A key that does not match the certificate.
    let other = generate_dev_pki(&[]).unwrap();
    let err = server_config_from_pem(
        (Path::new("s.pem"), pki.server().cert_pem.as_bytes()),
        (Path::new("other-key.pem"), &other.server().key_pem),
        None,
    )
    .unwrap_err();
    assert!(matches!(err, TlsError::CertKey { .. }), "{err}");

    let err =
        upstream_client_config_from_pem(Some((Path::new("ca.pem"), b"nope")), true).unwrap_err();
    assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
}
