//! The whole in-process pipeline against a loopback upstream: one keep-alive client sends a
//! proxied GET through a real broker (token check, allowlist, rate-limit-free, audit with
//! fsync=never and =always) to a minimal hyper upstream; compared with calling the upstream
//! directly over the same kind of connection.
//!
//! `cargo bench --bench pipeline`

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};

const CREDENTIAL: &str = "bench-credential";
const SECRET: &str = "bench-secret";

async fn upstream() -> SocketAddr {
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

fn config(dir: &std::path::Path, up: SocketAddr, fsync: &str) -> credbroker::config::Config {
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

async fn connect(addr: SocketAddr) -> SendRequest<Empty<Bytes>> {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn get(sender: &mut SendRequest<Empty<Bytes>>, uri: &str, auth: &str) {
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

async fn token(addr: SocketAddr) -> String {
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

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let up = rt.block_on(upstream());
    let mut group = c.benchmark_group("pipeline");
    group.sample_size(30);

    let mut direct = rt.block_on(connect(up));
    let auth = format!("Bearer {CREDENTIAL}");
    // Requests go one after another on one keep-alive connection: latency, not throughput.
    group.bench_function("direct_upstream_get", |b| {
        b.iter_custom(|n| {
            rt.block_on(async {
                let start = std::time::Instant::now();
                for _ in 0..n {
                    get(&mut direct, "/repos/acme/widget/issues", &auth).await;
                }
                start.elapsed()
            })
        })
    });
    for fsync in ["never", "always"] {
        let sub = dir.path().join(fsync);
        std::fs::create_dir_all(&sub).unwrap();
        let running = rt
            .block_on(credbroker::cli::serve::start(config(&sub, up, fsync)))
            .unwrap();
        let addr = running.proxy_addr;
        let bearer = format!("Bearer {}", rt.block_on(token(addr)));
        let mut client = rt.block_on(connect(addr));
        group.bench_function(format!("through_broker_fsync_{fsync}"), |b| {
            b.iter_custom(|n| {
                rt.block_on(async {
                    let start = std::time::Instant::now();
                    for _ in 0..n {
                        get(&mut client, "/github/repos/acme/widget/issues", &bearer).await;
                    }
                    start.elapsed()
                })
            })
        });
        rt.block_on(running.shutdown());
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
