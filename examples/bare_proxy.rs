//! The floor under credbroker's load figures (`benches/load.sh`): the same stack — hyper 1.x
//! on one tokio `current_thread` runtime, as each broker worker runs — proxying with an
//! injected `Authorization` header and nothing else: no checks, no audit, no pool (one
//! upstream connection per client connection). What this costs per call is what hyper and
//! tokio cost; what credbroker costs beyond it is its own work. It allocates with mimalloc,
//! as the broker does, so the allocator is not part of the difference.
//!
//! `cargo run --release --example bare_proxy -- LISTEN_ADDR UPSTREAM_ADDR CREDENTIAL`
//! (plain HTTP on both sides; a load tool, not a product).

use std::net::SocketAddr;
use std::sync::Arc;

use http::{header::AUTHORIZATION, HeaderValue, Request};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, credential] = args.as_slice() else {
        eprintln!("usage: bare_proxy LISTEN_ADDR UPSTREAM_ADDR CREDENTIAL");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN_ADDR is host:port");
    let upstream: SocketAddr = upstream.parse().expect("UPSTREAM_ADDR is host:port");
    let auth = HeaderValue::from_str(&format!("Bearer {credential}")).expect("a header value");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(serve(listen, upstream, auth));
}

async fn serve(listen: SocketAddr, upstream: SocketAddr, auth: HeaderValue) {
    let listener = TcpListener::bind(listen).await.expect("bind");
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let auth = auth.clone();
        tokio::spawn(async move {
            if let Err(e) = relay(client, upstream, auth).await {
                eprintln!("bare_proxy: {e}");
            }
        });
    }
}

/// One client connection, relayed over one upstream connection.
async fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    auth: HeaderValue,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    client.set_nodelay(true)?;
    let up = TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(up)).await?;
    tokio::spawn(conn);
    let sender: Arc<Mutex<SendRequest<Incoming>>> = Arc::new(Mutex::new(sender));
    let service = service_fn(move |mut req: Request<Incoming>| {
        let sender = Arc::clone(&sender);
        req.headers_mut().insert(AUTHORIZATION, auth.clone());
        async move { sender.lock().await.send_request(req).await }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(client), service)
        .await?;
    Ok(())
}
