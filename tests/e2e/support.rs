//! Test support: an in-process broker on 127.0.0.1:0 with a temp folder, a recording fake
//! upstream that answers only when it sees the injected credential, and small HTTP clients
//! (hyper for well-formed requests, a raw socket for everything else).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use credbroker::cli::serve::{start, Running};
use credbroker::config::Config;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The client secret every test client uses.
pub const SECRET: &str = "test-client-secret-0123456789";
/// The real credential the broker injects.
pub const CREDENTIAL: &str = "ghs_REAL_ORG_CREDENTIAL_sentinel";
/// The admin bearer token.
pub const ADMIN_TOKEN: &str = "admin-token-sentinel-42";

pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// A request as the fake upstream received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// Path and query exactly as received.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A fake upstream on loopback: records every request; answers 200 with a small JSON body
/// only when `Authorization` carries the expected value (or the check is off), else 401.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

/// How the fake decides whether the credential was injected.
#[derive(Clone)]
pub enum Expect {
    Header(&'static str, String),
    Query(String),
    Nothing,
}

impl FakeUpstream {
    pub async fn start() -> Self {
        Self::start_expecting(Expect::Header(
            "authorization",
            format!("Bearer {CREDENTIAL}"),
        ))
        .await
    }

    pub async fn start_expecting(expect: Expect) -> Self {
        Self::start_with(expect, |_| None).await
    }

    /// `custom` may answer a request itself (redirects, echoes, slow answers…).
    pub async fn start_with(
        expect: Expect,
        custom: fn(&Seen) -> Option<Response<Full<Bytes>>>,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let rec = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let rec = Arc::clone(&rec);
                let expect = expect.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let rec = Arc::clone(&rec);
                        let expect = expect.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let s = Seen {
                                method: parts.method.to_string(),
                                target: parts
                                    .uri
                                    .path_and_query()
                                    .map(|p| p.as_str().to_owned())
                                    .unwrap_or_default(),
                                headers: parts.headers.clone(),
                                body,
                            };
                            rec.lock().unwrap().push(s.clone());
                            if let Some(r) = custom(&s) {
                                return Ok::<_, Infallible>(r);
                            }
                            let ok = match &expect {
                                Expect::Header(name, value) => {
                                    s.headers.get(*name).is_some_and(|v| v == value.as_str())
                                }
                                Expect::Query(pair) => s.target.ends_with(pair.as_str()),
                                Expect::Nothing => true,
                            };
                            let (status, text) = if ok {
                                (
                                    StatusCode::OK,
                                    format!("{{\"ok\":true,\"target\":{:?}}}", s.target),
                                )
                            } else {
                                (
                                    StatusCode::UNAUTHORIZED,
                                    "{\"message\":\"Bad credentials\"}".to_owned(),
                                )
                            };
                            let mut r = Response::new(Full::new(Bytes::from(text)));
                            *r.status_mut() = status;
                            r.headers_mut()
                                .insert("x-github-request-id", "GH-REQ-1".parse().unwrap());
                            Ok(r)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, seen }
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// The standard test config: connector `github` at the fake upstream, client `bot` with
/// `issues.read` and `issues.comment`, plus an ungranted `repos.delete` operation.
pub fn standard_config(upstream: SocketAddr) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
max_header_bytes = 8192
request_timeout = "5s"

[admin]
listen = "127.0.0.1:0"
token_sha256 = "{admin}"

[tokens]
issuer = "credbroker-test"

[audit]
path = "audit.jsonl"
fsync = "always"

[[connectors]]
name = "github"
owner = "platform@acme.example"
purpose = "tests"
expires = "2099-12-31"
upstream = "http://{upstream}"
upstream_timeout = "2s"
credential = "literal:{cred}"
upstream_request_id_header = "x-github-request-id"

  [[connectors.operations]]
  name = "issues.read"
  method = "GET"
  path = "/repos/acme/{{repo}}/issues"
  query = ["state", "per_page", "page"]

  [[connectors.operations]]
  name = "issues.comment"
  method = "POST"
  path = "/repos/acme/widget/issues/{{number}}/comments"
  max_body_bytes = 64

  [[connectors.operations]]
  name = "repos.delete"
  method = "DELETE"
  path = "/repos/acme/{{repo}}"

[[clients]]
id = "bot"
owner = "platform@acme.example"
secret_sha256 = "{secret}"
grants = [ {{ connector = "github", operations = ["issues.read", "issues.comment"], max_ttl = "120s" }} ]

[[clients]]
id = "nogrants"
owner = "platform@acme.example"
secret_sha256 = "{secret}"
"#,
        admin = sha256_hex(ADMIN_TOKEN),
        cred = CREDENTIAL,
        secret = sha256_hex(SECRET),
    )
}

/// A broker running in this test process, with its own temp folder.
pub struct TestBroker {
    pub running: Option<Running>,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
}

impl TestBroker {
    pub async fn start(config_text: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(config_text, dir).await
    }

    pub async fn start_in(config_text: &str, dir: tempfile::TempDir) -> Self {
        let path = dir.path().join("credbroker.toml");
        std::fs::write(&path, config_text).unwrap();
        let config = Config::load(&path).unwrap_or_else(|e| panic!("test config invalid: {e}"));
        let running = start(config).await.unwrap();
        Self {
            addr: running.proxy_addr,
            admin: running.admin_addr,
            running: Some(running),
            dir,
        }
    }

    pub fn audit_path(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("credbroker.toml")
    }

    /// Every audit record so far, parsed.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        audit_records(&self.audit_path())
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// A token for `bot` with `scope` and extra form fields; panics unless 200.
    pub async fn token(&self, scope: &str, extra: &[(&str, &str)]) -> String {
        let (status, _, body) = self.token_request("bot", SECRET, scope, extra).await;
        assert_eq!(status, 200, "token request failed: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["access_token"].as_str().unwrap().to_owned()
    }

    pub async fn token_request(
        &self,
        id: &str,
        secret: &str,
        scope: &str,
        extra: &[(&str, &str)],
    ) -> (u16, HeaderMap, String) {
        let mut form = vec![("grant_type", "client_credentials"), ("scope", scope)];
        form.extend_from_slice(extra);
        let body = form_encode(&form);
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
        let req = Request::post("/oauth2/token")
            .header("authorization", format!("Basic {basic}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .unwrap();
        send(self.addr, req).await
    }

    /// The status of a proxied call (for tests that need nothing else of the answer).
    pub async fn status(&self, method: &str, target: &str, token: &str) -> u16 {
        self.call(method, target, token).await.0
    }

    /// A proxied call with a bearer token.
    pub async fn call(&self, method: &str, target: &str, token: &str) -> (u16, HeaderMap, String) {
        self.call_with(method, target, token, &[], "").await
    }

    pub async fn call_with(
        &self,
        method: &str,
        target: &str,
        token: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, HeaderMap, String) {
        let mut b = Request::builder().method(method).uri(target);
        if !token.is_empty() {
            b = b.header("authorization", format!("Bearer {token}"));
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        send(self.addr, b.body(body.to_owned()).unwrap()).await
    }

    pub async fn admin_call(
        &self,
        method: &str,
        path: &str,
        body: &str,
    ) -> (u16, HeaderMap, String) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .unwrap();
        send(self.admin.expect("admin listener"), req).await
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.broker.audit.close();
        }
    }
}

/// Writes a signing key to `dir/signing.pem` with `credbroker keygen` (the binary under test).
pub fn keygen_signing_key(dir: &Path) -> PathBuf {
    let key = dir.join("signing.pem");
    let ok = std::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
        .args(["keygen", "signing-key", "--out", key.to_str().unwrap()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "keygen signing-key failed");
    key
}

/// The `jti` claim of a token (read without verifying: the test issued it).
pub fn jti_of(token: &str) -> String {
    claims_of(token)["jti"].as_str().unwrap().to_owned()
}

/// A token's claims, as its payload says (not verified).
pub fn claims_of(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

pub fn audit_records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Sends one HTTP/1.1 request over a fresh connection with hyper's client.
pub async fn send(addr: SocketAddr, mut req: Request<String>) -> (u16, HeaderMap, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    req.headers_mut()
        .insert("host", addr.to_string().parse().unwrap());
    let req = req.map(|b| Full::new(Bytes::from(b)));
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("response in time")
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    (
        parts.status.as_u16(),
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// Writes raw bytes, reads until the peer closes or `wait` passes; returns what came back.
pub async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of the first response in raw output ("HTTP/1.1 400 …" → 400).
pub fn raw_status(out: &str) -> Option<u16> {
    out.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Re-computes the chain rule of DESIGN §5 on the file's bytes, independently of the broker.
pub fn verify_chain_independently(path: &Path) -> usize {
    let text = std::fs::read_to_string(path).unwrap();
    let mut prev = "0".repeat(64);
    let mut seq_expected = None;
    let mut n = 0;
    for line in text.split_terminator('\n') {
        let idx = line.rfind(",\"hash\":\"").expect("hash member last");
        let hash = &line[idx + 9..line.len() - 2];
        assert!(line.ends_with("\"}"));
        let b = format!("{}}}", &line[..idx]);
        assert_eq!(
            hex::encode(Sha256::digest(b.as_bytes())),
            hash,
            "hash of line {}",
            n + 1
        );
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["prev"], prev.as_str(), "prev link of line {}", n + 1);
        let seq = v["seq"].as_u64().unwrap();
        if let Some(e) = seq_expected {
            assert_eq!(seq, e, "seq continuity");
        }
        seq_expected = Some(seq + 1);
        prev = hash.to_owned();
        n += 1;
    }
    n
}

/// Records of one event kind.
pub fn events<'a>(records: &'a [serde_json::Value], event: &str) -> Vec<&'a serde_json::Value> {
    records.iter().filter(|r| r["event"] == event).collect()
}

/// An HTTP/2 (prior knowledge) client connection to `addr`, its driving task spawned.
pub async fn h2_connect<B>(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// The broker's `event` records once there are `n` of them (written after the response, so
/// waited for), at most a second.
pub async fn records_eventually(b: &TestBroker, event: &str, n: usize) -> Vec<serde_json::Value> {
    let mut found = Vec::new();
    for _ in 0..50 {
        found = events(&b.audit(), event).into_iter().cloned().collect();
        if found.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    found
}
