//! The pool over real loopback sockets, against a hand-written HTTP/1 upstream whose
//! connection handling each test chooses.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use std::future::Future as _;

use super::*;

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
const CHUNKED: &[u8] =
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
const NO_CONTENT: &[u8] = b"HTTP/1.1 204 No Content\r\n\r\n";
const TRAILERS: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n5\r\nhello\r\n0\r\nx-sum: 1\r\n\r\n";

/// What the upstream does after reading a request.
#[derive(Clone, Copy)]
enum Then {
    /// Answers and waits for the next request.
    Answer(&'static [u8]),
    /// Answers, then closes without saying so (`keep-alive` as far as the client knows).
    AnswerAndClose(&'static [u8]),
    /// Closes without answering: the request was sent, so it must not be sent again.
    Close,
    /// Sends the head and a part of a long body, then stalls.
    Stall,
}

struct Upstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

impl Upstream {
    async fn start(then: Then) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (c, r) = (Arc::clone(&connections), Arc::clone(&requests));
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(sock, then, Arc::clone(&r)));
            }
        });
        Self {
            addr,
            connections,
            requests,
        }
    }

    fn origin(&self) -> Origin {
        Origin::new(&Scheme::HTTP, &self.addr.to_string().parse().unwrap()).unwrap()
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn serve(mut sock: TcpStream, then: Then, requests: Arc<AtomicUsize>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            requests.fetch_add(1, Ordering::SeqCst);
            match then {
                Then::Answer(reply) => sock.write_all(reply).await.unwrap(),
                Then::AnswerAndClose(reply) => {
                    sock.write_all(reply).await.unwrap();
                    return;
                }
                Then::Close => return,
                Then::Stall => {
                    let head = b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nstart";
                    sock.write_all(head).await.unwrap();
                    // Hold the connection open without finishing the body.
                    let _ = sock.read(&mut chunk).await;
                    return;
                }
            }
        }
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn get(path: &str) -> Request<ProxyBody> {
    let body = Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut req = Request::new(body);
    *req.uri_mut() = path.parse().unwrap();
    req
}

fn client() -> UpstreamClient {
    UpstreamClient::new(None).unwrap()
}

fn client_with(limits: Limits) -> UpstreamClient {
    UpstreamClient::with(crate::tls::upstream_client_config(None).unwrap(), limits)
}

/// Polls `done` every 5 ms for up to two seconds.
async fn eventually(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..400 {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    done()
}

async fn read_all(response: Response<UpstreamBody>) -> Bytes {
    response.into_body().collect().await.unwrap().to_bytes()
}

#[tokio::test]
async fn sequential_calls_reuse_one_connection_whatever_the_body_framing() {
    for (reply, expected) in [(OK, "hello"), (CHUNKED, "hello"), (NO_CONTENT, "")] {
        let up = Upstream::start(Then::Answer(reply)).await;
        let (client, origin) = (client(), up.origin());
        for _ in 0..20 {
            let response = client.send(&origin, get("/x")).await.unwrap();
            assert_eq!(read_all(response).await, expected);
        }
        assert_eq!(up.requests(), 20);
        assert_eq!(
            up.connections(),
            1,
            "{}",
            String::from_utf8_lossy(reply).lines().next().unwrap()
        );
    }
}

#[tokio::test]
async fn a_response_that_ends_before_its_request_body_returns_the_connection_once_both_are_done() {
    let up = Upstream::start(Then::Answer(OK)).await;
    let (client, origin) = (client(), up.origin());
    let (send_body, body) = tokio::sync::oneshot::channel();
    let mut req = get("/upload");
    *req.body_mut() = LateBody(Some(body)).boxed_unsync();
    req.headers_mut()
        .insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("5"));
    // The upstream answers on the head alone; the connection is still sending the body.
    let response = client.send(&origin, req).await.unwrap();
    assert_eq!(read_all(response).await, "hello");
    assert_eq!(idle_count(&client, &origin), 0, "not reusable mid-request");
    send_body.send(Bytes::from_static(b"12345")).unwrap();
    for _ in 0..100 {
        if idle_count(&client, &origin) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        idle_count(&client, &origin),
        1,
        "pooled once the body went out"
    );
    read_all(client.send(&origin, get("/x")).await.unwrap()).await;
    assert_eq!(up.connections(), 1);
}

/// A five-byte request body that arrives when the test sends it.
struct LateBody(Option<tokio::sync::oneshot::Receiver<Bytes>>);

impl Body for LateBody {
    type Data = Bytes;
    type Error = super::super::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let Some(rx) = self.0.as_mut() else {
            return Poll::Ready(None);
        };
        let data = ready!(Pin::new(rx).poll(cx));
        self.0 = None;
        Poll::Ready(data.ok().map(|d| Ok(Frame::data(d))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(5)
    }
}

/// Trailers end a body: one read up to them and no further (as an HTTP/1.1 server does, which
/// drops them) returns its connection.
#[tokio::test]
async fn a_body_read_up_to_its_trailers_returns_its_connection() {
    let up = Upstream::start(Then::Answer(TRAILERS)).await;
    let (client, origin) = (client(), up.origin());
    for _ in 0..3 {
        let mut body = client.send(&origin, get("/x")).await.unwrap().into_body();
        loop {
            let frame = body.frame().await.unwrap().unwrap();
            if frame.is_trailers() {
                break;
            }
        }
        drop(body);
        assert!(eventually(|| idle_count(&client, &origin) == 1).await);
    }
    assert_eq!(up.connections(), 1);
}

#[tokio::test]
async fn an_unread_empty_body_still_returns_its_connection() {
    let up = Upstream::start(Then::Answer(NO_CONTENT)).await;
    let (client, origin) = (client(), up.origin());
    for _ in 0..5 {
        // Dropped without a poll, as hyper's server does with a body that is already done.
        let response = client.send(&origin, get("/x")).await.unwrap();
        assert_eq!(response.status(), 204);
    }
    assert_eq!(up.connections(), 1);
}

#[tokio::test]
async fn concurrent_calls_each_get_a_connection_and_all_come_back() {
    let up = Upstream::start(Then::Answer(OK)).await;
    let (client, origin) = (client(), up.origin());
    let calls = (0..8).map(|_| {
        let (client, origin) = (client.clone(), origin.clone());
        async move { read_all(client.send(&origin, get("/x")).await.unwrap()).await }
    });
    for body in futures_util::future::join_all(calls).await {
        assert_eq!(body, "hello");
    }
    assert_eq!(up.connections(), 8);
    assert_eq!(idle_count(&client, &origin), 8);
    // The next round reuses them: no new connection.
    for _ in 0..8 {
        read_all(client.send(&origin, get("/x")).await.unwrap()).await;
    }
    assert_eq!(up.connections(), 8);
}

#[tokio::test]
async fn idle_connections_close_after_the_idle_timeout() {
    let up = Upstream::start(Then::Answer(OK)).await;
    let limits = Limits {
        idle_timeout: Duration::from_millis(300),
        ..LIMITS
    };
    let (client, origin) = (client_with(limits), up.origin());
    read_all(client.send(&origin, get("/x")).await.unwrap()).await;
    assert_eq!(idle_count(&client, &origin), 1);
    let pooled = Instant::now();
    assert!(
        eventually(|| idle_count(&client, &origin) == 0).await,
        "the reaper closed it"
    );
    // The connection was pooled a moment before `pooled` was read: allow for that.
    assert!(
        pooled.elapsed() >= limits.idle_timeout - Duration::from_millis(20),
        "not before its time"
    );
    read_all(client.send(&origin, get("/x")).await.unwrap()).await;
    assert_eq!(up.connections(), 2);
}

#[tokio::test]
async fn an_expired_idle_connection_is_not_checked_out() {
    let up = Upstream::start(Then::Answer(OK)).await;
    let (client, origin) = (client(), up.origin());
    read_all(client.send(&origin, get("/x")).await.unwrap()).await;
    {
        let mut pool = client.0.lock(client.worker());
        let conns = pool.origins.get_mut(&*origin.key).unwrap();
        conns.idle[0].since = Instant::now() - LIMITS.idle_timeout;
    }
    read_all(client.send(&origin, get("/x")).await.unwrap()).await;
    assert_eq!(up.connections(), 2);
}

#[tokio::test]
async fn idle_connections_are_capped_per_origin() {
    let up = Upstream::start(Then::Answer(OK)).await;
    let limits = Limits {
        max_idle_per_origin: 2,
        ..LIMITS
    };
    let (client, origin) = (client_with(limits), up.origin());
    let calls =
        (0..4).map(|_| async { read_all(client.send(&origin, get("/x")).await.unwrap()).await });
    futures_util::future::join_all(calls).await;
    assert_eq!(up.connections(), 4);
    assert_eq!(idle_count(&client, &origin), 2);
}

#[tokio::test]
async fn connection_close_is_never_pooled() {
    const CLOSE: &[u8] = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nhello";
    // The upstream says close but keeps its socket open.
    let up = Upstream::start(Then::Answer(CLOSE)).await;
    let (client, origin) = (client(), up.origin());
    for _ in 0..3 {
        read_all(client.send(&origin, get("/x")).await.unwrap()).await;
        tokio::task::yield_now().await;
        assert_eq!(idle_count(&client, &origin), 0);
    }
    assert_eq!(up.connections(), 3);
}

#[tokio::test]
async fn an_unsent_request_on_a_dead_pooled_connection_goes_out_on_a_new_one() {
    let up = Upstream::start(Then::Answer(OK)).await;
    let (client, origin) = (client(), up.origin());
    // A pooled connection whose peer is gone and whose task has not noticed yet.
    let (ours, theirs) = tokio::io::duplex(1024);
    drop(theirs);
    let (sender, conn) = http1::handshake::<_, ProxyBody>(TokioIo::new(ours))
        .await
        .unwrap();
    tokio::spawn(drive(conn));
    client
        .0
        .put_idle(client.worker(), Arc::clone(&origin.key), sender);
    assert_eq!(idle_count(&client, &origin), 1);
    let body = read_all(client.send(&origin, get("/x")).await.unwrap()).await;
    assert_eq!(body, "hello");
    assert_eq!(up.requests(), 1);
    assert_eq!(up.connections(), 1);
}

#[tokio::test]
async fn a_new_connection_that_fails_is_an_answer_not_a_reason_to_dial_again() {
    // Accepts and at once closes every connection.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            drop(sock);
        }
    });
    let origin = Origin::new(&Scheme::HTTP, &addr.to_string().parse().unwrap()).unwrap();
    let client = client();
    let call = client.send(&origin, get("/x"));
    let result = tokio::time::timeout(Duration::from_secs(2), call).await;
    assert!(result.expect("an answer, not a loop").is_err());
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_request_a_reused_connection_delivered_is_never_sent_again() {
    // Answers the first request on a connection; reads the second and closes unanswered.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&requests);
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = sock.read(&mut buf).await.unwrap();
        seen.fetch_add(1, Ordering::SeqCst);
        sock.write_all(OK).await.unwrap();
        let _ = sock.read(&mut buf).await.unwrap();
        seen.fetch_add(1, Ordering::SeqCst);
        drop(sock);
        // A second connection would be accepted (and counted) here.
        if listener.accept().await.is_ok() {
            seen.fetch_add(100, Ordering::SeqCst);
        }
    });
    let origin = Origin::new(&Scheme::HTTP, &addr.to_string().parse().unwrap()).unwrap();
    let client = client();
    read_all(client.send(&origin, get("/1")).await.unwrap()).await;
    assert_eq!(idle_count(&client, &origin), 1);
    let err = client.send(&origin, get("/2")).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Http(_)), "{err}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(requests.load(Ordering::SeqCst), 2, "each request sent once");
}

#[tokio::test]
async fn a_connection_the_upstream_closed_while_idle_is_replaced_without_losing_the_call() {
    let up = Upstream::start(Then::AnswerAndClose(OK)).await;
    let (client, origin) = (client(), up.origin());
    for _ in 0..5 {
        let body = read_all(client.send(&origin, get("/x")).await.unwrap()).await;
        assert_eq!(body, "hello");
        // Let the client see the close, as it would between real calls.
        let seen_closed = eventually(|| {
            let pool = client.0.lock(client.worker());
            let conns = pool.origins.get(&*origin.key);
            conns.is_none_or(|c| c.idle.iter().all(|i| i.sender.is_closed()))
        });
        assert!(seen_closed.await);
    }
    assert_eq!(up.requests(), 5, "each call reached the upstream once");
    assert_eq!(up.connections(), 5);
}

#[tokio::test]
async fn a_request_the_upstream_received_is_never_sent_again() {
    let up = Upstream::start(Then::Close).await;
    let (client, origin) = (client(), up.origin());
    let err = client.send(&origin, get("/x")).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Http(_)), "{err}");
    assert!(!err.is_connect());
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn a_body_dropped_before_its_end_closes_its_connection() {
    let up = Upstream::start(Then::Stall).await;
    let (client, origin) = (client(), up.origin());
    let response = client.send(&origin, get("/x")).await.unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.data_ref().unwrap(), "start");
    drop(body);
    assert_eq!(idle_count(&client, &origin), 0);
    // The next call needs a new connection: the old one is mid-response.
    let _ = client.send(&origin, get("/x")).await.unwrap();
    assert_eq!(up.connections(), 2);
}

#[tokio::test]
async fn connection_refused_is_a_connect_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let origin = Origin::new(&Scheme::HTTP, &addr.to_string().parse().unwrap()).unwrap();
    let err = client().send(&origin, get("/x")).await.unwrap_err();
    assert!(err.is_connect(), "{err}");
}

/// A plain-HTTP origin is only ever connected to on a loopback address (the credential would
/// cross the network in clear text): one whose name resolves elsewhere is refused before any
/// connection is tried.
#[tokio::test]
async fn a_plain_http_origin_off_loopback_is_never_connected_to() {
    let origin = Origin::new(&Scheme::HTTP, &"192.0.2.1:80".parse().unwrap()).unwrap();
    let err = client().send(&origin, get("/x")).await.unwrap_err();
    assert!(err.is_connect(), "{err}");
    let source = std::error::Error::source(&err)
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        format!("{err} {source}").contains("loopback"),
        "{err} / {source}"
    );
    // A loopback one is connected to as before.
    let up = Upstream::start(Then::Answer(OK)).await;
    let origin = Origin::new(&Scheme::HTTP, &up.addr.to_string().parse().unwrap()).unwrap();
    assert!(client().send(&origin, get("/x")).await.is_ok());
}

#[tokio::test]
async fn an_address_that_never_answers_costs_a_moment_not_the_connect_budget() {
    // A listener whose accept queue is full drops further SYNs: connecting to it hangs.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let silent = socket.listen(1).unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let mut queued = Vec::new();
    while tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(silent_addr))
        .await
        .map(|c| queued.push(c))
        .is_ok()
    {
        assert!(queued.len() < 64, "the accept queue never filled");
    }
    let up = Upstream::start(Then::Answer(OK)).await;
    let started = Instant::now();
    let tcp = connect_first([silent_addr, up.addr].into_iter())
        .await
        .unwrap();
    assert_eq!(tcp.peer_addr().unwrap(), up.addr);
    let took = started.elapsed();
    assert!(
        took >= NEXT_ADDRESS_AFTER && took < NEXT_ADDRESS_AFTER * 4,
        "second address tried after {took:?}"
    );
}

#[tokio::test]
async fn absolute_uris_go_to_their_origin_in_origin_form_with_a_host() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = sock.read(&mut buf).await.unwrap();
        sock.write_all(OK).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    let mut req = get("/");
    *req.uri_mut() = format!("http://{addr}/token?a=1").parse().unwrap();
    read_all(client().request(req).await.unwrap()).await;
    let head = seen.await.unwrap();
    assert!(head.starts_with("GET /token?a=1 HTTP/1.1\r\n"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("host: {addr}\r\n")),
        "{head}"
    );
}

#[test]
fn origins_key_and_host_header() {
    let o = Origin::of(&"https://api.example:443/v3".parse().unwrap()).unwrap();
    assert_eq!(&*o.key, "https://api.example:443");
    assert_eq!(o.host_header, "api.example");
    let o = Origin::of(&"http://[::1]:8080/".parse().unwrap()).unwrap();
    assert_eq!(&*o.host, "::1");
    assert_eq!(o.port, 8080);
    assert_eq!(o.host_header, "[::1]:8080");
    assert!(Origin::of(&"ftp://x/".parse().unwrap()).is_err());
    assert!(Origin::of(&"/relative".parse().unwrap()).is_err());
}

fn idle_count(client: &UpstreamClient, origin: &Origin) -> usize {
    let pool = client.0.lock(client.worker());
    pool.origins.get(&*origin.key).map_or(0, |c| c.idle.len())
}

/// HTTPS upstreams that pick h2 by ALPN.
mod h2 {
    use std::sync::atomic::AtomicBool;

    use hyper::service::service_fn;

    use super::*;

    /// What the upstream saw of a request: version, URI authority, `Host` header.
    type Seen = (http::Version, Option<String>, Option<HeaderValue>);

    struct H2Upstream {
        port: u16,
        connections: Arc<AtomicUsize>,
        seen: Arc<Mutex<Vec<Seen>>>,
        ca_pem: String,
    }

    /// Answers "hello", except on `/fail`, whose stream it resets, and `/big` (4 MiB).
    async fn h2_upstream() -> H2Upstream {
        let pki = crate::tls::generate_dev_pki(&[]).unwrap();
        let cert = pki.issue_server_cert(&["localhost"]).unwrap();
        let server = crate::tls::server_config_from_pem(
            (Path::new("upstream.pem"), cert.cert_pem.as_bytes()),
            (Path::new("upstream-key.pem"), &cert.key_pem),
            None,
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let seen: Arc<Mutex<Vec<_>>> = Arc::default();
        let (count, log) = (Arc::clone(&connections), Arc::clone(&seen));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (acceptor, log) = (acceptor.clone(), Arc::clone(&log));
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req: Request<Incoming>| {
                        log.lock().unwrap().push((
                            req.version(),
                            req.uri().authority().map(|a| a.to_string()),
                            req.headers().get(HOST).cloned(),
                        ));
                        async move {
                            if req.uri().path() == "/fail" {
                                return Err("reset this stream");
                            }
                            let body = match req.uri().path() {
                                "/big" => Bytes::from(vec![b'x'; 4 << 20]),
                                _ => Bytes::from_static(b"hello"),
                            };
                            let body = http_body_util::Full::new(body);
                            Ok(Response::new(body))
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        H2Upstream {
            port,
            connections,
            seen,
            ca_pem: pki.ca_cert_pem,
        }
    }

    fn tls_client(ca_pem: &str, limits: Limits) -> UpstreamClient {
        let ca = Some((Path::new("ca.pem"), ca_pem.as_bytes()));
        let config = crate::tls::upstream_client_config_from_pem(ca, true).unwrap();
        UpstreamClient::with(config, limits)
    }

    fn origin(port: u16) -> Origin {
        Origin::new(
            &Scheme::HTTPS,
            &format!("localhost:{port}").parse().unwrap(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_worker_shares_one_connection_and_names_the_authority_not_host() {
        let up = h2_upstream().await;
        let (client, origin) = (tls_client(&up.ca_pem, LIMITS), origin(up.port));
        let first = client.send(&origin, get("/x")).await.unwrap();
        assert_eq!(first.version(), http::Version::HTTP_2);
        assert_eq!(read_all(first).await, "hello");
        let calls = (0..8)
            .map(|_| async { read_all(client.send(&origin, get("/x")).await.unwrap()).await });
        for body in futures_util::future::join_all(calls).await {
            assert_eq!(body, "hello");
        }
        assert_eq!(up.connections.load(Ordering::SeqCst), 1);
        let seen = up.seen.lock().unwrap();
        assert_eq!(seen.len(), 9);
        let authority = format!("localhost:{}", up.port);
        for (version, uri_authority, host) in seen.iter() {
            assert_eq!(*version, http::Version::HTTP_2);
            assert_eq!(uri_authority.as_deref(), Some(authority.as_str()));
            assert_eq!(*host, None, "h2 names the authority as :authority only");
        }
    }

    #[tokio::test]
    async fn a_failed_stream_leaves_the_shared_connection_to_the_others() {
        let up = h2_upstream().await;
        let (client, origin) = (tls_client(&up.ca_pem, LIMITS), origin(up.port));
        read_all(client.send(&origin, get("/x")).await.unwrap()).await;
        let err = client.send(&origin, get("/fail")).await.unwrap_err();
        assert!(matches!(err, UpstreamError::Http(_)), "{err}");
        read_all(client.send(&origin, get("/x")).await.unwrap()).await;
        assert_eq!(up.connections.load(Ordering::SeqCst), 1);
    }

    /// The worker's one HTTP/2 connection is shared by every caller: responses a caller does
    /// not read (its client stopped reading) must not use up the connection's flow-control
    /// window and stall everyone else's calls to the upstream.
    #[tokio::test]
    async fn unread_responses_do_not_stall_the_shared_connection() {
        let up = h2_upstream().await;
        let (client, origin) = (tls_client(&up.ca_pem, LIMITS), origin(up.port));
        let mut unread = Vec::new();
        for _ in 0..8 {
            unread.push(client.send(&origin, get("/big")).await.unwrap());
        }
        // Give the upstream time to fill whatever windows it was given.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let answer = tokio::time::timeout(Duration::from_secs(2), async {
            read_all(client.send(&origin, get("/x")).await.unwrap()).await
        })
        .await;
        assert_eq!(
            answer.ok().as_deref(),
            Some(&b"hello"[..]),
            "a call behind unread ones"
        );
        assert_eq!(up.connections.load(Ordering::SeqCst), 1);
        drop(unread);
    }

    /// A TCP relay to `to` whose connections open so far can be made to swallow every byte
    /// (a path gone silent); connections opened later pass.
    async fn relay(to: u16) -> (u16, Arc<Mutex<Vec<Arc<AtomicBool>>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let flags: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let all = Arc::clone(&flags);
        tokio::spawn(async move {
            while let Ok((a, _)) = listener.accept().await {
                let b = TcpStream::connect(("127.0.0.1", to)).await.unwrap();
                let silent = Arc::new(AtomicBool::new(false));
                all.lock().unwrap().push(Arc::clone(&silent));
                let (ar, aw) = a.into_split();
                let (br, bw) = b.into_split();
                tokio::spawn(pipe(ar, bw, Arc::clone(&silent)));
                tokio::spawn(pipe(br, aw, silent));
            }
        });
        (port, flags)
    }

    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        silent: Arc<AtomicBool>,
    ) {
        let mut buf = [0u8; 16384];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0 {
                break;
            }
            if !silent.load(Ordering::SeqCst) && to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        // Keep the write half open: silence, not a close.
        std::future::pending::<()>().await;
    }

    #[tokio::test]
    async fn a_connection_whose_path_went_silent_is_replaced_once_its_pings_go_unanswered() {
        let up = h2_upstream().await;
        let (port, flags) = relay(up.port).await;
        let limits = Limits {
            ping_every: Duration::from_millis(100),
            ping_timeout: Duration::from_millis(100),
            ..LIMITS
        };
        let (client, origin) = (tls_client(&up.ca_pem, limits), origin(port));
        read_all(client.send(&origin, get("/x")).await.unwrap()).await;
        for silent in flags.lock().unwrap().iter() {
            silent.store(true, Ordering::SeqCst);
        }
        let closed = eventually(|| {
            let pool = client.0.lock(client.worker());
            let h2 = pool.origins.get(&*origin.key).and_then(|c| c.h2.as_ref());
            h2.is_none_or(|(sender, _)| sender.is_closed())
        });
        assert!(closed.await, "the unanswered pings closed it");
        let call = client.send(&origin, get("/x"));
        let response = tokio::time::timeout(Duration::from_secs(2), call).await;
        assert_eq!(read_all(response.unwrap().unwrap()).await, "hello");
        assert_eq!(up.connections.load(Ordering::SeqCst), 2);
    }
}
