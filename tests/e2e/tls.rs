//! Issue 4, transport security over real sockets: TLS version policy and ALPN, mTLS token
//! issuance, certificate-bound tokens, upstream TLS with a private CA, HTTP/2 clients, and
//! certificates reloaded without dropping open connections. Every certificate is made at test
//! time with `credbroker::tls::generate_dev_pki`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use credbroker::tls::{generate_dev_pki, x5t_s256, DevPki, IssuedCert};
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::version::{TLS12, TLS13};
use rustls::{ClientConfig, ProtocolVersion, RootCertStore, SupportedProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::support::*;

/// The mTLS-only client of [`tls_config`]: no secret, a certificate with this URI SAN.
const MTLS_SAN: &str = "spiffe://acme.test/mtls-bot";
/// Another client certificate from the same CA, whose SAN belongs to no client.
const OTHER_SAN: &str = "spiffe://acme.test/intruder";

type Reply = (u16, HeaderMap, String);

/// A broker with TLS (and mTLS) on the proxy listener, optionally on the admin listener too.
struct TlsBroker {
    broker: TestBroker,
    pki: DevPki,
}

impl TlsBroker {
    /// `connector` replaces the standard connector's upstream line (e.g. an https upstream).
    async fn start(upstream: SocketAddr, admin_tls: bool, connector: Option<&str>) -> Self {
        Self::start_with(new_pki(), upstream, admin_tls, connector).await
    }

    /// [`TlsBroker::start`] with a CA made beforehand (for upstream certificates signed by it).
    async fn start_with(
        pki: DevPki,
        upstream: SocketAddr,
        admin_tls: bool,
        connector: Option<&str>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        write_pem(dir.path(), "ca.pem", &pki.ca_cert_pem);
        write_cert(dir.path(), "server", pki.server());
        let text = tls_config(upstream, admin_tls, connector);
        let broker = TestBroker::start_in(&text, dir).await;
        Self { broker, pki }
    }

    fn client(&self, san: &str) -> &IssuedCert {
        self.pki.client(san).unwrap()
    }

    /// A TLS 1.3 connection to the proxy listener with ALPN http/1.1, presenting `cert`.
    async fn h1(&self, cert: Option<&IssuedCert>) -> H1 {
        let config = client_config(&self.pki.ca_cert_pem, cert, &[&TLS13], &[b"http/1.1"]);
        H1::connect(self.broker.addr, config).await
    }

    /// An mTLS token for the mTLS-only client (no secret anywhere).
    async fn mtls_token(&self, scope: &str) -> String {
        let mut c = self.h1(Some(self.client(MTLS_SAN))).await;
        let (status, _, body) = c.token("mtls-bot", scope).await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["access_token"].as_str().unwrap().to_owned()
    }
}

/// The audit records once `n` records of `event` are in the log: a `proxy_result` is written
/// when the response body ends, just after the client has read it. Polls for up to 5 s.
async fn audit_with(b: &TestBroker, event: &str, n: usize) -> Vec<serde_json::Value> {
    for _ in 0..500 {
        let records = b.audit();
        if events(&records, event).len() >= n {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("fewer than {n} {event} records after 5 s");
}

/// A CA with the server certificate and the two test client certificates.
fn new_pki() -> DevPki {
    generate_dev_pki(&[MTLS_SAN, OTHER_SAN]).unwrap()
}

/// The standard config with TLS + mTLS on `[server]`, optionally TLS on `[admin]`, and a client
/// that authenticates by certificate only.
fn tls_config(upstream: SocketAddr, admin_tls: bool, connector: Option<&str>) -> String {
    let mut text = standard_config(upstream).replacen(
        "[server]\n",
        "[server]\ntls_cert = \"server.pem\"\ntls_key = \"server-key.pem\"\nclient_ca = \"ca.pem\"\n",
        1,
    );
    if admin_tls {
        text = text.replacen(
            "[admin]\n",
            "[admin]\ntls_cert = \"server.pem\"\ntls_key = \"server-key.pem\"\n",
            1,
        );
    }
    if let Some(line) = connector {
        text = text.replacen(&format!("upstream = \"http://{upstream}\"\n"), line, 1);
    }
    text + &format!(
        r#"
[[clients]]
id = "mtls-bot"
owner = "platform@acme.example"
cert_san = "{MTLS_SAN}"
grants = [ {{ connector = "github", operations = ["issues.read"] }} ]
"#
    )
}

fn write_pem(dir: &Path, name: &str, pem: &str) {
    std::fs::write(dir.join(name), pem).unwrap();
}

/// `NAME.pem` and `NAME-key.pem`.
fn write_cert(dir: &Path, name: &str, cert: &IssuedCert) {
    write_pem(dir, &format!("{name}.pem"), &cert.cert_pem);
    std::fs::write(dir.join(format!("{name}-key.pem")), cert.key_pem.expose()).unwrap();
}

/// A rustls client config trusting `ca_pem` only, with the given versions and ALPN.
fn client_config(
    ca_pem: &str,
    cert: Option<&IssuedCert>,
    versions: &[&'static SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match cert {
        Some(c) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from(c.cert_der.clone())],
                PrivateKeyDer::from_pem_slice(c.key_pem.expose()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    TlsConnector::from(config).connect(name, tcp).await
}

/// An HTTP/1.1 keep-alive connection over TLS (hyper's client).
struct H1 {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
    /// The `x5t#S256` thumbprint of the leaf certificate the server presented.
    server_cert: String,
}

impl H1 {
    async fn connect(addr: SocketAddr, config: Arc<ClientConfig>) -> Self {
        let stream = tls_connect(addr, config).await.expect("TLS handshake");
        let server_cert = x5t_s256(&stream.get_ref().1.peer_certificates().unwrap()[0]);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        Self {
            sender,
            host: addr.to_string(),
            server_cert,
        }
    }

    /// Sends one request; `Err` when the connection failed (e.g. a refused client certificate).
    async fn try_send(&mut self, mut req: Request<String>) -> Result<Reply, hyper::Error> {
        req.headers_mut().insert("host", self.host.parse().unwrap());
        let req = req.map(|b| Full::new(Bytes::from(b)));
        let resp = tokio::time::timeout(Duration::from_secs(10), self.sender.send_request(req))
            .await
            .expect("response in time")?;
        Ok(read_reply(resp).await)
    }

    async fn send(&mut self, req: Request<String>) -> Reply {
        self.try_send(req).await.expect("request over TLS")
    }

    async fn get(&mut self, target: &str, token: &str) -> Reply {
        let req = Request::get(target)
            .header("authorization", format!("Bearer {token}"))
            .body(String::new())
            .unwrap();
        self.send(req).await
    }

    fn token_request(client_id: &str, scope: &str) -> Request<String> {
        let form = form_encode(&[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("scope", scope),
        ]);
        Request::post("/oauth2/token")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
            .unwrap()
    }

    /// `POST /v1/reload` with the admin token (on an admin listener connection).
    async fn reload(&mut self) -> Reply {
        let req = Request::post("/v1/reload")
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(String::new())
            .unwrap();
        self.send(req).await
    }

    /// `tls_client_auth`: `client_id` in the form, the certificate on the connection.
    async fn token(&mut self, client_id: &str, scope: &str) -> Reply {
        self.send(Self::token_request(client_id, scope)).await
    }
}

async fn read_reply(resp: Response<Incoming>) -> Reply {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status.as_u16(),
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// The claims of a JWT, unverified (the broker verified them).
fn claims(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// Writes `bytes`, then reads until the peer closes or `wait` passes.
async fn raw_bytes(addr: SocketAddr, bytes: &[u8], wait: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    out
}

/// Writes `bytes`, then returns the first bytes the peer sends back (empty if it just closes).
async fn raw_first(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("an answer in time")
        .unwrap_or(0);
    buf.truncate(n);
    buf
}

/// A ClientHello with legacy `version` and no `supported_versions` extension (so it offers
/// exactly that version), with TLS 1.2 AEAD suites and the extensions rustls needs: with
/// 0x0303 it gets a ServerHello, so a refusal of 0x0302 is the version and nothing else.
fn client_hello(version: [u8; 2]) -> Vec<u8> {
    let mut hello = version.to_vec();
    hello.extend_from_slice(&[0x42; 32]); // random
    hello.push(0); // session id
                   // ECDHE-ECDSA/RSA AES-128-GCM (TLS 1.2) and two CBC suites a TLS 1.1 client would offer.
    hello.extend_from_slice(&[0x00, 0x08, 0xc0, 0x2b, 0xc0, 0x2f, 0xc0, 0x13, 0x00, 0x2f]);
    hello.extend_from_slice(&[0x01, 0x00]); // null compression
    let extensions: &[u8] = &[
        0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17, // groups: x25519, P-256
        0x00, 0x0b, 0x00, 0x02, 0x01, 0x00, // ec_point_formats: uncompressed
        0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x08, 0x04, // sig algs
    ];
    hello.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    hello.extend_from_slice(extensions);
    let mut handshake = vec![0x01, 0, 0, hello.len() as u8];
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01, 0, handshake.len() as u8];
    record.extend_from_slice(&handshake);
    record
}

#[tokio::test]
async fn version_policy_alpn_and_plain_http_refused() {
    let up = FakeUpstream::start().await;
    let b = TlsBroker::start(up.addr, false, None).await;
    let addr = b.broker.addr;
    let ca = &b.pki.ca_cert_pem;

    // TLS 1.3, ALPN h2 offered first: both negotiated.
    let cfg = client_config(ca, None, &[&TLS13], &[b"h2", b"http/1.1"]);
    let s = tls_connect(addr, cfg).await.expect("TLS 1.3 handshake");
    let (_, conn) = s.get_ref();
    assert_eq!(conn.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));

    // TLS 1.2 works, and an HTTP/1.1-only client gets http/1.1.
    let cfg = client_config(ca, None, &[&TLS12], &[b"http/1.1"]);
    let mut c = H1::connect(addr, cfg).await;
    let (status, _, body) = c
        .send(
            Request::get("/.well-known/jwks.json")
                .body(String::new())
                .unwrap(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let cfg = client_config(ca, None, &[&TLS12], &[b"http/1.1"]);
    let s = tls_connect(addr, cfg).await.unwrap();
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(ProtocolVersion::TLSv1_2)
    );
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));

    // The same hand-made hello as TLS 1.2 is answered with a ServerHello (handshake record)…
    let out = raw_first(addr, &client_hello([3, 3])).await;
    assert_eq!(out.first(), Some(&0x16), "a ServerHello: {out:?}");
    // …and as TLS 1.1 with a fatal protocol_version alert (record type 21, alert 70).
    let out = raw_first(addr, &client_hello([3, 2])).await;
    assert!(out.len() >= 7, "an alert, got {out:?}");
    assert_eq!(out[0], 0x15, "an alert record, not a handshake: {out:?}");
    assert_eq!(&out[5..7], &[2, 70], "fatal protocol_version: {out:?}");

    // Plain HTTP to the TLS port: never an HTTP answer, and the connection is closed.
    let plain = b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\n\r\n";
    let out = raw_bytes(addr, plain, Duration::from_secs(3)).await;
    assert!(
        !out.starts_with(b"HTTP/"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert!(
        out.is_empty() || out[0] == 0x15,
        "nothing or an alert: {out:?}"
    );
}

#[tokio::test]
async fn mtls_token_issuance_and_refusals() {
    let up = FakeUpstream::start().await;
    let b = TlsBroker::start(up.addr, false, None).await;
    let cert = b.client(MTLS_SAN);

    // client_id + a certificate with the client's cert_san: a token, bound to that certificate.
    let mut c = b.h1(Some(cert)).await;
    let (status, _, body) = c.token("mtls-bot", "github:issues.read").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let token = v["access_token"].as_str().unwrap();
    assert_eq!(claims(token)["sub"], "mtls-bot");
    assert_eq!(claims(token)["cnf"]["x5t#S256"], x5t_s256(&cert.cert_der));

    // A valid certificate from the same CA whose SAN is not the client's.
    let mut c = b.h1(Some(b.client(OTHER_SAN))).await;
    let (status, headers, body) = c.token("mtls-bot", "github:issues.read").await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("\"invalid_client\""), "{body}");
    assert_eq!(headers["www-authenticate"], "Basic realm=\"credbroker\"");

    // No certificate at all.
    let mut c = b.h1(None).await;
    let (status, _, body) = c.token("mtls-bot", "github:issues.read").await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("\"invalid_client\""), "{body}");

    // A certificate with the right SAN from another CA: the handshake fails (with TLS 1.3 the
    // client learns it on its first read), so no request is ever answered.
    let rogue = generate_dev_pki(&[MTLS_SAN]).unwrap();
    let cfg = client_config(
        &b.pki.ca_cert_pem,
        rogue.client(MTLS_SAN),
        &[&TLS13],
        &[b"http/1.1"],
    );
    let refused = match tls_connect(b.broker.addr, cfg).await {
        Err(_) => true,
        Ok(stream) => {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let req = H1::token_request("mtls-bot", "github:issues.read")
                .map(|s| Full::new(Bytes::from(s)));
            sender.send_request(req).await.is_err()
        }
    };
    assert!(
        refused,
        "a certificate from another CA must not get an answer"
    );
    // Not audited (no request was read), but counted.
    let counted = "credbroker_tls_handshake_failures_total{listener=\"proxy\",reason=\"client_certificate\"} 1";
    let mut metrics = String::new();
    for _ in 0..200 {
        metrics = b.broker.admin_call("GET", "/metrics", "").await.2;
        if metrics.contains(counted) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(metrics.contains(counted), "{metrics}");

    let records = b.broker.audit();
    let issued = events(&records, "token_issued");
    assert_eq!(issued.len(), 1);
    assert_eq!(issued[0]["client"], "mtls-bot");
    // Both failed authentications named a configured client: recorded with it and its scope,
    // the one without a certificate too.
    let denied = events(&records, "token_denied");
    assert_eq!(denied.len(), 2);
    for r in denied {
        assert_eq!(r["client"], "mtls-bot", "{r}");
        assert_eq!(r["scope"], "github:issues.read", "{r}");
        assert_eq!(r["reason"], "invalid_client", "{r}");
    }
}

/// An open connection's client certificate counts only under the `client_ca` it was verified
/// against: a reload that re-reads the same CA changes nothing, one that puts another CA in
/// force leaves the connection without a certificate — no mTLS token, and its bound tokens
/// refused — until the client reconnects with a certificate the new CA trusts.
#[tokio::test]
async fn a_reload_withdrawing_the_client_ca_ends_open_connections_mtls_identity() {
    let up = FakeUpstream::start().await;
    let b = TlsBroker::start(up.addr, false, None).await;
    let target = "/github/repos/acme/widget/issues";
    let mut open = b.h1(Some(b.client(MTLS_SAN))).await;
    let (status, _, body) = open.token("mtls-bot", "github:issues.read").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let bound = v["access_token"].as_str().unwrap().to_owned();

    // The same CA file read again: the open connection keeps its identity.
    assert_eq!(b.broker.admin_call("POST", "/v1/reload", "").await.0, 200);
    assert_eq!(open.token("mtls-bot", "github:issues.read").await.0, 200);
    assert_eq!(open.get(target, &bound).await.0, 200);

    // Another CA in force: the old connections present no certificate any more.
    let mut more_open = Vec::new();
    for _ in 0..21 {
        more_open.push(b.h1(Some(b.client(MTLS_SAN))).await);
    }
    let new_pki = new_pki();
    write_pem(b.broker.dir.path(), "ca.pem", &new_pki.ca_cert_pem);
    assert_eq!(b.broker.admin_call("POST", "/v1/reload", "").await.0, 200);
    // A bound token on it: refused as no longer valid (not as a stolen token).
    let (status, headers, body) = open.get(target, &bound).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("no longer trusted"), "{body}");
    assert!(headers["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("error=\"invalid_token\""));
    // No token either — by certificate, or with a secret, when it would come unbound — and
    // the connection is closed to be renewed.
    let (status, headers, body) = open.token("mtls-bot", "github:issues.read").await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("\"invalid_client\""), "{body}");
    assert!(body.contains("no longer trusted"), "{body}");
    assert_eq!(headers["connection"], "close");
    assert_eq!(
        up.count(),
        1,
        "only the call before the CA changed was forwarded"
    );

    let records = b.broker.audit();
    let denied = events(&records, "token_denied");
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["client"], "mtls-bot");
    let refused: Vec<_> = events(&records, "proxy")
        .into_iter()
        .filter(|r| r["decision"] == "deny")
        .collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["reason"], "certificate_no_longer_valid");
    assert_eq!(refused[0]["client"], "mtls-bot");
    // Not counted as guessing: past the 20 failures a minute that lock an address out, such
    // refusals are still 401, not 429.
    for mut conn in more_open {
        let (status, _, body) = conn.token("mtls-bot", "github:issues.read").await;
        assert_eq!(status, 401, "{body}");
    }
}

#[tokio::test]
async fn bound_token_refused_without_its_certificate() {
    let up = FakeUpstream::start().await;
    let b = TlsBroker::start(up.addr, false, None).await;
    let token = b.mtls_token("github:issues.read").await;
    let target = "/github/repos/acme/widget/issues";

    // On a connection presenting the same certificate: forwarded.
    let mut same = b.h1(Some(b.client(MTLS_SAN))).await;
    let (status, _, body) = same.get(target, &token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(up.count(), 1);

    // Replayed with another valid client certificate, then with none.
    for cert in [Some(b.client(OTHER_SAN)), None] {
        let mut other = b.h1(cert).await;
        let (status, headers, body) = other.get(target, &token).await;
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("\"invalid_token\""), "{body}");
        assert!(headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("error=\"invalid_token\""));
    }
    assert_eq!(up.count(), 1, "a replayed token never reaches the upstream");

    let records = b.broker.audit();
    let mismatches: Vec<_> = events(&records, "proxy")
        .into_iter()
        .filter(|r| r["reason"] == "certificate_mismatch")
        .collect();
    assert_eq!(mismatches.len(), 2);
    let jti = claims(&token)["jti"].clone();
    for r in mismatches {
        assert_eq!(r["decision"], "deny");
        assert_eq!(r["status"], 401);
        assert_eq!(r["jti"], jti);
    }
    assert!(!std::fs::read_to_string(b.broker.audit_path())
        .unwrap()
        .contains(&token));
}

/// A fake upstream over TLS: answers 200 when it sees the injected credential; records the
/// HTTP version and `x-forwarded-proto` of every request, and the trailers of any request
/// body that had some.
struct TlsUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<(Version, String)>>>,
    trailers: Arc<Mutex<Vec<HeaderMap>>>,
}

impl TlsUpstream {
    async fn start(cert: &IssuedCert) -> Self {
        let server = credbroker::tls::server_config_from_pem(
            (Path::new("upstream.pem"), cert.cert_pem.as_bytes()),
            (Path::new("upstream-key.pem"), &cert.key_pem),
            None,
        )
        .unwrap();
        let acceptor = TlsAcceptor::from(server);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<(Version, String)>>> = Arc::default();
        let trailers: Arc<Mutex<Vec<HeaderMap>>> = Arc::default();
        let (rec, rec_trailers) = (Arc::clone(&seen), Arc::clone(&trailers));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, rec) = (acceptor.clone(), Arc::clone(&rec));
                let rec_trailers = Arc::clone(&rec_trailers);
                tokio::spawn(async move {
                    // A refused handshake (the broker distrusting us) simply ends here.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (rec, rec_trailers) = (Arc::clone(&rec), Arc::clone(&rec_trailers));
                        async move {
                            let resp = answer(&rec, &req);
                            let body = req.into_body().collect().await;
                            if let Some(t) = body.ok().and_then(|b| b.trailers().cloned()) {
                                rec_trailers.lock().unwrap().push(t);
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            seen,
            trailers,
        }
    }

    fn seen(&self) -> Vec<(Version, String)> {
        self.seen.lock().unwrap().clone()
    }
}

fn answer(rec: &Mutex<Vec<(Version, String)>>, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let proto = req
        .headers()
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    rec.lock().unwrap().push((req.version(), proto));
    let expected = format!("Bearer {CREDENTIAL}");
    let ok = req
        .headers()
        .get("authorization")
        .is_some_and(|v| v == expected.as_str());
    let mut resp = Response::new(Full::new(Bytes::from_static(b"{\"ok\":true}")));
    if !ok {
        *resp.status_mut() = StatusCode::UNAUTHORIZED;
    }
    resp
}

/// The connector line pointing at an https upstream on `localhost`, trusting `ca.pem`.
fn https_connector(port: u16) -> String {
    format!("upstream = \"https://localhost:{port}\"\nupstream_ca = \"ca.pem\"\n")
}

/// A broker (plain listener) whose `github` connector calls a TLS upstream on `localhost`:
/// the connector's `upstream_ca` is a dev CA, and the upstream's certificate is signed by it.
/// The plain upstream the standard config named first is returned to keep it alive.
async fn broker_with_tls_upstream() -> (FakeUpstream, TlsUpstream, TestBroker) {
    let unused = FakeUpstream::start().await;
    let pki = generate_dev_pki(&[]).unwrap();
    let up = TlsUpstream::start(&pki.issue_server_cert(&["localhost"]).unwrap()).await;
    let dir = tempfile::tempdir().unwrap();
    write_pem(dir.path(), "ca.pem", &pki.ca_cert_pem);
    let text = standard_config(unused.addr).replacen(
        &format!("upstream = \"http://{}\"\n", unused.addr),
        &https_connector(up.addr.port()),
        1,
    );
    let b = TestBroker::start_in(&text, dir).await;
    (unused, up, b)
}

/// `upstream_ca` is read again by a reload: a trust root removed from the file (rotated to
/// another CA) is no longer trusted by new connections, and an unchanged file keeps its pool.
#[tokio::test]
async fn a_reload_reads_a_changed_upstream_ca_file() {
    let (_unused, up, b) = broker_with_tls_upstream().await;
    let token = b.token("github:issues.read", &[]).await;
    let target = "/github/repos/acme/widget/issues";
    assert_eq!(b.call("GET", target, &token).await.0, 200);
    // Reloading the unchanged file keeps the client: the call goes on the pooled connection.
    assert_eq!(b.admin_call("POST", "/v1/reload", "").await.0, 200);
    assert_eq!(b.call("GET", target, &token).await.0, 200);
    let other = generate_dev_pki(&[]).unwrap();
    write_pem(b.dir.path(), "ca.pem", &other.ca_cert_pem);
    assert_eq!(b.admin_call("POST", "/v1/reload", "").await.0, 200);
    let (status, _, body) = b.call("GET", target, &token).await;
    assert_eq!(status, 502, "the old CA is no longer trusted: {body}");
    assert!(body.contains("UnknownIssuer"), "{body}");
    assert_eq!(up.seen().len(), 2);
    // A file that is no CA fails the reload; the config in force stays.
    std::fs::write(b.dir.path().join("ca.pem"), "not a certificate").unwrap();
    assert_eq!(b.admin_call("POST", "/v1/reload", "").await.0, 400);
}

#[tokio::test]
async fn upstream_over_tls_with_a_private_ca() {
    let (_unused, up, b) = broker_with_tls_upstream().await;
    let token = b.token("github:issues.read", &[]).await;
    for _ in 0..2 {
        let (status, _, body) = b
            .call("GET", "/github/repos/acme/widget/issues", &token)
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter().all(|(v, _)| *v == Version::HTTP_2),
        "h2 to an upstream offering it via ALPN: {seen:?}"
    );
    // The broker's own listener is plain HTTP here, and says so.
    assert_eq!(seen[0].1, "http");
    let records = audit_with(&b, "proxy_result", 2).await;
    let results = events(&records, "proxy_result");
    assert!(results
        .iter()
        .all(|r| r["status"] == 200 && r["error"].is_null()));
}

#[tokio::test]
async fn request_trailers_never_reach_an_http2_upstream() {
    let (_unused, up, b) = broker_with_tls_upstream().await;
    let token = b.token("github:issues.comment", &[]).await;

    // HTTP/2 to the broker (prior knowledge, its listener is plain here): a checked body,
    // then trailers the checks of DESIGN §4.3 never saw — a second credential, the token, a
    // method override.
    let tcp = TcpStream::connect(b.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut trailers = HeaderMap::new();
    trailers.insert("authorization", "Bearer smuggled".parse().unwrap());
    trailers.insert("x-http-method-override", "DELETE".parse().unwrap());
    trailers.insert("x-checksum", "abc".parse().unwrap());
    let frames = vec![
        Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(b"{}"))),
        Ok(http_body::Frame::trailers(trailers)),
    ];
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
    let req = Request::post(format!(
        "http://127.0.0.1:{}/github/repos/acme/widget/issues/7/comments",
        b.addr.port()
    ))
    .header("authorization", format!("Bearer {token}"))
    .header("content-length", "2")
    .body(body)
    .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let (status, _, body) = read_reply(resp).await;
    assert_eq!(status, 200, "{body}");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, Version::HTTP_2, "the upstream speaks HTTP/2");
    assert!(
        up.trailers.lock().unwrap().is_empty(),
        "no request trailers forwarded: {:?}",
        up.trailers.lock().unwrap()
    );
}

#[tokio::test]
async fn untrusted_upstream_certificate_is_502_and_audited() {
    let unused = FakeUpstream::start().await;
    // The upstream's certificate comes from a CA the connector does not trust.
    let rogue = generate_dev_pki(&[]).unwrap();
    let up = TlsUpstream::start(&rogue.issue_server_cert(&["localhost"]).unwrap()).await;
    let b = TlsBroker::start(unused.addr, false, Some(&https_connector(up.addr.port()))).await;
    let token = b.mtls_token("github:issues.read").await;
    let mut c = b.h1(Some(b.client(MTLS_SAN))).await;
    let (status, _, body) = c.get("/github/repos/acme/widget/issues", &token).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("\"upstream_unavailable\""), "{body}");
    assert!(body.contains("certificate"), "{body}");
    assert!(
        up.seen().is_empty(),
        "no request reached the untrusted upstream"
    );
    assert!(unused.requests().is_empty(), "never a fallback");

    let records = b.broker.audit();
    let result = events(&records, "proxy_result");
    assert_eq!(result.len(), 1);
    assert_eq!(result[0]["status"], 502);
    let error = result[0]["error"].as_str().unwrap();
    assert!(error.starts_with("upstream_unavailable"), "{error}");
    assert!(
        error.contains("certificate") && error.contains("UnknownIssuer"),
        "{error}"
    );
}

#[tokio::test]
async fn upstream_certificate_for_another_name_is_refused() {
    let unused = FakeUpstream::start().await;
    // Signed by the trusted CA, but for another host: hostname verification is always on.
    let pki = new_pki();
    let up = TlsUpstream::start(&pki.issue_server_cert(&["other.test"]).unwrap()).await;
    let connector = https_connector(up.addr.port());
    let b = TlsBroker::start_with(pki, unused.addr, false, Some(&connector)).await;
    let token = b.mtls_token("github:issues.read").await;
    let mut c = b.h1(Some(b.client(MTLS_SAN))).await;
    let (status, _, body) = c.get("/github/repos/acme/widget/issues", &token).await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains("(NotValidForName)"),
        "the kind of failure: {body}"
    );
    assert!(
        !body.contains("other.test") && !body.contains("localhost"),
        "not the certificate's names nor the one expected: {body}"
    );
    assert!(up.seen().is_empty());
    let records = b.broker.audit();
    let error = events(&records, "proxy_result")[0]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(error.contains("NotValidForName"), "{error}");
}

/// Over TLS, ALPN decides the protocol (RFC 9113 §3.3): a connection that negotiated
/// `http/1.1`, or nothing, speaks HTTP/1.1 even if an HTTP/2 preface follows.
#[tokio::test]
async fn an_http2_preface_without_alpn_h2_gets_no_http2() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = FakeUpstream::start().await;
    let b = TlsBroker::start(up.addr, false, None).await;
    for alpn in [&[b"http/1.1".as_slice()][..], &[]] {
        let cfg = client_config(&b.pki.ca_cert_pem, None, &[&TLS13], alpn);
        let mut stream = tls_connect(b.broker.addr, cfg).await.unwrap();
        assert_ne!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        // HTTP/1.1 refuses the preface and closes the connection (it must not hang).
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut got));
        assert!(read.await.is_ok(), "no answer and no close");
        assert!(
            got.is_empty() || got.starts_with(b"HTTP/1.1 "),
            "answered in HTTP/2: {:?}",
            &got[..got.len().min(16)]
        );
    }
}

#[tokio::test]
async fn http2_client_through_the_proxy() {
    let up = FakeUpstream::start().await;
    let b = TlsBroker::start(up.addr, false, None).await;
    let token = b.mtls_token("github:issues.read").await;
    let cfg = client_config(
        &b.pki.ca_cert_pem,
        Some(b.client(MTLS_SAN)),
        &[&TLS13],
        &[b"h2"],
    );
    let stream = tls_connect(b.broker.addr, cfg).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let uri = format!(
        "https://localhost:{}/github/repos/acme/widget/issues?state=open",
        b.broker.addr.port()
    );
    // Two streams on one connection.
    for _ in 0..2 {
        let req = Request::get(&uri)
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.version(), Version::HTTP_2);
        let (status, headers, body) = read_reply(resp).await;
        assert_eq!(status, 200, "{body}");
        assert!(headers.contains_key("x-request-id"));
    }
    let seen = up.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].target, "/repos/acme/widget/issues?state=open");
    assert_eq!(seen[0].headers["x-forwarded-proto"], "https");
}

#[tokio::test]
async fn certificates_reload_without_dropping_open_connections() {
    let up = FakeUpstream::start().await;
    let b = TlsBroker::start(up.addr, true, None).await;
    let dir = b.broker.dir.path().to_owned();
    let admin = b.broker.admin.unwrap();
    let cfg = || client_config(&b.pki.ca_cert_pem, None, &[&TLS13], &[b"http/1.1"]);
    let old_cert = x5t_s256(&b.pki.server().cert_der);

    // A keep-alive connection to each listener, opened before the reload.
    let mut open = H1::connect(b.broker.addr, cfg()).await;
    let mut admin_conn = H1::connect(admin, cfg()).await;
    assert_eq!(open.server_cert, old_cert);
    assert_eq!(admin_conn.server_cert, old_cert);
    let jwks = || {
        Request::get("/.well-known/jwks.json")
            .body(String::new())
            .unwrap()
    };
    assert_eq!(open.send(jwks()).await.0, 200);

    // A broken key: the reload fails as a whole and the old certificate keeps serving.
    std::fs::write(dir.join("server-key.pem"), "not a key\n").unwrap();
    let (status, _, body) = admin_conn.reload().await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("server-key.pem"), "{body}");
    assert_eq!(
        H1::connect(b.broker.addr, cfg()).await.server_cert,
        old_cert
    );

    // A renewed certificate in place: new connections to both listeners see it.
    let renewed = b
        .pki
        .issue_server_cert(&["localhost", "127.0.0.1"])
        .unwrap();
    write_cert(&dir, "server", &renewed);
    let (status, _, body) = admin_conn.reload().await;
    assert_eq!(status, 200, "{body}");
    let new_cert = x5t_s256(&renewed.cert_der);
    assert_eq!(
        H1::connect(b.broker.addr, cfg()).await.server_cert,
        new_cert
    );
    assert_eq!(H1::connect(admin, cfg()).await.server_cert, new_cert);

    // The connections opened before the reload still work.
    assert_eq!(open.send(jwks()).await.0, 200);
    let (status, _, _) = admin_conn.reload().await;
    assert_eq!(status, 200);

    let records = b.broker.audit();
    let results: Vec<_> = events(&records, "admin")
        .into_iter()
        .map(|r| r["result"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(results, ["failed", "ok", "ok"]);
}

#[tokio::test]
async fn reload_cannot_switch_a_listener_between_tls_and_plain() {
    let up = FakeUpstream::start().await;
    let b = TlsBroker::start(up.addr, false, None).await;
    // Drop TLS from [server] in the file: refused, TLS stays on.
    let plain = standard_config(up.addr);
    std::fs::write(b.broker.config_path(), plain).unwrap();
    let (status, _, body) = b.broker.admin_call("POST", "/v1/reload", "").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("cannot be turned off"), "{body}");
    let cfg = client_config(&b.pki.ca_cert_pem, None, &[&TLS13], &[b"http/1.1"]);
    let mut c = H1::connect(b.broker.addr, cfg).await;
    let jwks = Request::get("/.well-known/jwks.json")
        .body(String::new())
        .unwrap();
    assert_eq!(c.send(jwks).await.0, 200);
}
