//! Set-up shared by the in-process pipeline benches: a minimal hyper upstream on loopback, a
//! broker config pointing at it, a keep-alive client and a token.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};

pub const CREDENTIAL: &str = "bench-credential";
pub const SECRET: &str = "bench-secret";

pub async fn upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(|_req: Request<hyper::body::Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                        b"{\"ok\":true}",
                    ))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

pub fn config(dir: &std::path::Path, up: SocketAddr, fsync: &str) -> credbroker::config::Config {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[audit]
path = "audit.jsonl"
fsync = "{fsync}"
[[connectors]]
name = "github"
owner = "o"
purpose = "bench"
expires = "2099-01-01"
upstream = "http://{up}"
credential = "literal:{CREDENTIAL}"
  [[connectors.operations]]
  name = "issues.read"
  method = "GET"
  path = "/repos/acme/{{repo}}/issues"
[[clients]]
id = "bench"
owner = "o"
secret_sha256 = "{}"
grants = [ {{ connector = "github", operations = ["issues.read"] }} ]
"#,
        hex::encode(Sha256::digest(SECRET))
    );
    let path = dir.join("credbroker.toml");
    std::fs::write(&path, &text).unwrap();
    credbroker::config::Config::load(&path).unwrap()
}

pub async fn connect(addr: SocketAddr) -> SendRequest<Empty<Bytes>> {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

pub async fn get(sender: &mut SendRequest<Empty<Bytes>>, uri: &str, auth: &str) {
    let req = Request::get(uri)
        .header("host", "x")
        .header("authorization", auth)
        .body(Empty::new())
        .unwrap();
    // HTTP/1: the connection takes the next request once the previous one is complete.
    sender.ready().await.unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
}

pub async fn token(addr: SocketAddr) -> String {
    use base64::Engine;
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("bench:{SECRET}"));
    let req = Request::post("/oauth2/token")
        .header("host", "x")
        .header("authorization", format!("Basic {basic}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(
            "grant_type=client_credentials&scope=github%3Aissues.read&ttl=900",
        )))
        .unwrap();
    let body = sender
        .send_request(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["access_token"].as_str().unwrap().to_owned()
}
