//! Listeners: accept loop with a connection cap, optional TLS (and mTLS identity), HTTP/1.1
//! and HTTP/2 with bounded header size and header read time, routing to the token endpoint
//! or the proxy, `x-request-id` on every response, and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::HeaderValue;
use http::{HeaderName, Method, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::admin::metrics::{HandshakeFailure, ListenerMetrics};
use crate::broker::Broker;
use crate::config::Config;
use crate::proxy::pipeline::{self, ConnInfo};
use crate::proxy::respond::Refusal;
use crate::proxy::ProxyBody;
use crate::tls::{ClientCaId, TlsError};

mod deadlines;
use deadlines::{Activity, Deadlines, InFlight, Opening, Protocol};

/// A response body that keeps its request counted as in flight until it is sent or dropped.
struct InFlightBody {
    body: ProxyBody,
    _guard: InFlight,
    /// The request's place among the listener's HTTP/2 requests in flight.
    _place: Place,
}

impl http_body::Body for InFlightBody {
    type Data = bytes::Bytes;
    type Error = crate::proxy::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// HTTP/1 header lines per request; more is refused by hyper with 431.
const MAX_HEADERS: usize = 100;
/// HTTP/2 requests in flight on one connection (nginx allows 128, Envoy 100).
const MAX_STREAMS_PER_CONNECTION: u32 = 100;

/// The limits a listener applies to every connection, from `[server]`.
#[derive(Clone, Debug)]
pub struct ListenerLimits {
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    /// Also the drain budget at shutdown.
    pub request_timeout: Duration,
}

/// What a listener serves.
#[derive(Clone)]
pub enum Role {
    /// Token endpoint, well-known documents and the proxy.
    Proxy(Arc<Broker>),
    /// The admin API.
    Admin(Arc<crate::admin::AdminState>),
}

impl Role {
    /// The listener's name in metrics.
    fn name(&self) -> &'static str {
        match self {
            Role::Proxy(_) => "proxy",
            Role::Admin(_) => "admin",
        }
    }

    fn metrics(&self) -> &crate::admin::metrics::Metrics {
        match self {
            Role::Proxy(broker) => &broker.metrics,
            Role::Admin(admin) => &admin.broker.metrics,
        }
    }
}

/// Serves `listener` until `shutdown` resolves, then drains open connections for at most
/// `limits.request_timeout`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<SwappableTls>,
    limits: ListenerLimits,
    role: Role,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // An HTTP/1 connection has one request in flight at a time; HTTP/2 ones up to
    // `MAX_STREAMS_PER_CONNECTION` each. What every request may hold (a 64 KiB token form, a
    // chunked body up to `max_body_bytes`, an upstream connection) is bounded per request, so
    // the listener's HTTP/2 requests in flight are bounded as its connections are.
    let h2_requests = Arc::new(Places::new(limits.max_connections));
    let listener_metrics = role.metrics().listener(role.name(), limits.max_connections);
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192) + 1024)
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        // HPACK counts 32 bytes more a field than the request's own size check does: with
        // that much room, the check in `handle` (and its JSON, audited 431) decides, as on
        // HTTP/1.1, and this bound only stops what is far past it.
        .max_header_list_size(
            u32::try_from(h2_header_list_limit(limits.max_header_bytes)).unwrap_or(u32::MAX),
        )
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        // An idle HTTP/2 connection stays open for reuse, as clients expect; pings find the
        // ones whose peer has vanished, so they do not hold a connection slot for ever.
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(10));
    let builder = Arc::new(ConnectionBuilder {
        http1_only: builder.clone().http1_only(),
        http2_only: builder.clone().http2_only(),
        http: builder,
        h2_requests,
        metrics: listener_metrics,
    });
    // The connections' tasks, whichever worker runs them: what is left of them when the drain
    // ends is stopped here, while the audit log is still open.
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        // Finished connections leave the set (it holds at most `max_connections` running).
        while connections.try_join_next().is_some() {}
        // Take a connection slot first: when all are in use, stop accepting (the kernel's
        // backlog holds newcomers) instead of accepting and dropping.
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = Arc::clone(&permits).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        // Off this runtime's event loop: the worker that serves the connection registers it
        // with its own, so its readiness events never pass through this thread.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot hand the connection to a worker");
                continue;
            }
        };
        // The certificate in force now: a reload changes what the next connection sees.
        let tls = tls.as_ref().map(SwappableTls::acceptor);
        let role = role.clone();
        let builder = Arc::clone(&builder);
        let limits = limits.clone();
        let watcher = graceful.watcher();
        let open = builder.metrics.connection_opened();
        // The connection lives on one worker runtime from here on.
        crate::workers::spawn_into(&mut connections, async move {
            let _permit = permit;
            let _open = open;
            let stream = match TcpStream::from_std(stream) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "cannot register the connection");
                    return;
                }
            };
            serve_connection(stream, peer, tls, limits, role, &builder, watcher).await;
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.request_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown: connections still open after request_timeout; closing them");
        // Dropped now, not with their runtimes after the `shutdown` record: a call cut short
        // writes its `proxy_result` (client gone) as it goes, and the log is still open.
        connections.shutdown().await;
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<Accepting>,
    limits: ListenerLimits,
    role: Role,
    builder: &ConnectionBuilder,
    watcher: hyper_util::server::graceful::Watcher,
) {
    // The handshake, the first byte and the first request's head, all within
    // `header_read_timeout` of the accept: a silent or slow client cannot hold a slot longer.
    let first_request_by = tokio::time::Instant::now() + limits.header_read_timeout;
    let opening = |protocol| Opening {
        protocol,
        first_request_by,
    };
    let Some(Accepting {
        acceptor,
        client_ca,
    }) = tls
    else {
        let info = ConnInfo::new(peer, false, None);
        let opening = opening(Protocol::Unknown);
        return serve_http(stream, opening, info, limits, role, builder, watcher).await;
    };
    let handshake = tokio::time::timeout_at(first_request_by, acceptor.accept(stream)).await;
    let stream = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            // A refused client certificate is worth an operator's attention (an mTLS client
            // locked out, or someone trying certificates); the rest is the internet's noise.
            let why = handshake_failure(&e);
            if why == HandshakeFailure::ClientCertificate {
                tracing::warn!(%peer, error = %e, "TLS handshake failed: client certificate refused");
            } else {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
            }
            builder.metrics.handshake_failed(why);
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            builder.metrics.handshake_failed(HandshakeFailure::Timeout);
            return;
        }
    };
    let client_cert = crate::tls::peer_identity(stream.get_ref().1, client_ca).map(Arc::new);
    let protocol = match stream.get_ref().1.alpn_protocol() {
        Some(b"h2") => Protocol::Http2,
        _ => Protocol::Unknown,
    };
    let info = ConnInfo::new(peer, true, client_cert);
    serve_http(
        stream,
        opening(protocol),
        info,
        limits,
        role,
        builder,
        watcher,
    )
    .await;
}

/// HTTP/1.1 or HTTP/2 on an accepted (and, for TLS, handshaken) connection.
async fn serve_http<I>(
    io: I,
    opening: Opening,
    info: ConnInfo,
    limits: ListenerLimits,
    role: Role,
    builder: &ConnectionBuilder,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer = info.peer;
    let (tls, protocol) = (info.tls, opening.protocol);
    let header_read_timeout = limits.header_read_timeout;
    let info = Arc::new(info);
    let activity = Arc::new(Activity::default());
    let requests = Arc::clone(&activity);
    let h2_requests = Arc::clone(&builder.h2_requests);
    let metrics = builder.metrics.clone();
    let service = service_fn(move |req| {
        let role = role.clone();
        let info = Arc::clone(&info);
        // HTTP/2 only: a request counts as activity until its response body is sent, and
        // the response must be sent by the request's deadline (see `deadlines`); it takes a
        // place among the listener's HTTP/2 requests in flight, or is refused at once — but a
        // connection's only request in flight needs none: whoever holds every place cannot
        // keep a connection from being served at all.
        let in_flight = if requests.is_http2() {
            let deadline = tokio::time::Instant::now() + limits.request_timeout;
            let place = if requests.in_flight() == 0 {
                Some(Place(None))
            } else {
                h2_requests.take()
            };
            if place.is_none() {
                metrics.overloaded();
            }
            Some((requests.request(), deadline, place))
        } else {
            // HTTP/1.1: hyper's header timer covers idleness; the first request's coming
            // only ends the connection's first deadline.
            requests.request_started();
            None
        };
        async move {
            let (mut guard, deadline, place) = match in_flight {
                None => return handle(role, info, limits.max_header_bytes, req).await,
                Some((_, _, None)) => return Ok(overloaded()),
                Some((guard, deadline, Some(place))) => (guard, deadline, place),
            };
            let resp = handle(role, info, limits.max_header_bytes, req).await?;
            Ok::<_, Infallible>(resp.map(|body| {
                guard.due_by(deadline.max(tokio::time::Instant::now()));
                http_body_util::BodyExt::boxed_unsync(InFlightBody {
                    body,
                    _guard: guard,
                    _place: place,
                })
            }))
        }
    });
    // A silent connection, or an HTTP/2 one with nothing in flight, is closed after
    // `header_read_timeout`, as a slow one is.
    let io = Deadlines::new(
        io,
        opening,
        header_read_timeout,
        limits.request_timeout,
        activity,
    );
    let http = match (tls, protocol) {
        (false, _) => &builder.http,
        (true, Protocol::Http2) => &builder.http2_only,
        (true, _) => &builder.http1_only,
    };
    let conn = http.serve_connection(TokioIo::new(io), service);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// The listener's connection settings, and what its connections share.
struct ConnectionBuilder {
    /// Plain connections: HTTP/1.1, or HTTP/2 by prior knowledge (its preface).
    http: auto::Builder<TokioExecutor>,
    /// TLS connections speak what ALPN chose (RFC 9113 §3.3): HTTP/2 only after `h2`,
    /// HTTP/1.1 only otherwise (an HTTP/2 preface there is a malformed HTTP/1.1 request).
    http1_only: auto::Builder<TokioExecutor>,
    http2_only: auto::Builder<TokioExecutor>,
    /// Places for HTTP/2 requests in flight, across the listener's connections.
    h2_requests: Arc<Places>,
    /// Open connections and overload refusals, for `/metrics`.
    metrics: ListenerMetrics,
}

/// Places for HTTP/2 requests in flight across a listener's connections: a count, taken and
/// given back by every request (an atomic each way, no lock).
struct Places {
    taken: AtomicUsize,
    max: usize,
}

/// A request's place, given back when dropped; `Place(None)`: a connection's only request,
/// which needs none.
struct Place(Option<Arc<Places>>);

impl Places {
    fn new(max: usize) -> Self {
        Self {
            taken: AtomicUsize::new(0),
            max,
        }
    }

    /// A place, if one is free.
    fn take(self: &Arc<Self>) -> Option<Place> {
        if self.taken.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.taken.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Place(Some(Arc::clone(self))))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(places) = &self.0 {
            places.taken.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The answer to an HTTP/2 request beyond the listener's places (before any check: it is
/// neither read nor audited, as a connection beyond `max_connections` is not accepted).
fn overloaded() -> Response<ProxyBody> {
    let request_id = RequestId::new();
    let mut resp = Refusal::Overloaded.into_response(request_id.as_str());
    resp.headers_mut().insert(
        HeaderName::from_static("x-request-id"),
        request_id.header().clone(),
    );
    resp
}

/// One request: a fresh request id, the route, and the id on the response.
async fn handle(
    role: Role,
    conn: Arc<ConnInfo>,
    max_header_bytes: usize,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let request_id = RequestId::new();
    // HTTP/1.1 sends no body after a HEAD's answer whatever the response holds; hyper's
    // HTTP/2 server sends it, which a client must take for a protocol error (RFC 9113 §8.1.1).
    let h2_head = req.method() == http::Method::HEAD && req.version() == http::Version::HTTP_2;
    // (An HTTP/1.1 head with more fields than this never gets here: hyper answers a bare 431,
    // unrecorded; raising its cap would allocate in every request's parse.)
    let too_large = header_bytes(&req) > max_header_bytes || req.headers().len() > MAX_HEADERS;
    let mut resp = if too_large {
        match role {
            // A proxy call is recorded, refused or not (DESIGN §5).
            // (Boxed: a rare path, kept out of every call's future.)
            Role::Proxy(broker) if is_proxy_path(req.uri().path()) => {
                Box::pin(pipeline::refuse_oversized_head(
                    broker,
                    req,
                    &conn,
                    &request_id,
                ))
                .await
            }
            _ => Refusal::HeadersTooLarge.into_response(request_id.as_str()),
        }
    } else {
        match role {
            Role::Proxy(broker) => route(broker, req, &conn, &request_id).await,
            Role::Admin(admin) => {
                crate::admin::handle(admin, req, &conn, request_id.as_str()).await
            }
        }
    };
    resp.headers_mut().insert(
        HeaderName::from_static("x-request-id"),
        request_id.header().clone(),
    );
    if h2_head && !http_body::Body::is_end_stream(resp.body()) {
        // The broker's own answers (an upstream's answer to a HEAD has no body to drop).
        resp = resp.map(|_| crate::proxy::respond::full(bytes::Bytes::new()));
    }
    Ok(resp)
}

/// Why a handshake failed, from the error the acceptor gave: rustls refusing the client's
/// certificate, or anything else.
fn handshake_failure(e: &std::io::Error) -> HandshakeFailure {
    let rustls_error = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented) => {
            HandshakeFailure::ClientCertificate
        }
        _ => HandshakeFailure::Other,
    }
}

/// Whether the proxy listener hands `path` to the pipeline (not the token endpoint or the
/// well-known documents [`route`] serves itself).
fn is_proxy_path(path: &str) -> bool {
    !matches!(
        path,
        "/oauth2/token" | "/.well-known/jwks.json" | "/.well-known/oauth-authorization-server"
    )
}

async fn route(
    broker: Arc<Broker>,
    req: Request<Incoming>,
    conn: &ConnInfo,
    id: &RequestId,
) -> Response<ProxyBody> {
    let request_id = id.as_str();
    match req.uri().path() {
        // Boxed: token issuance is rare next to proxied calls, and its future would set the
        // size of every call's.
        "/oauth2/token" => {
            Box::pin(crate::token::endpoint::token(broker, req, conn, request_id)).await
        }
        // GET and HEAD (hyper sends a HEAD answer's headers only); nothing else.
        "/.well-known/jwks.json" | "/.well-known/oauth-authorization-server"
            if !matches!(*req.method(), Method::GET | Method::HEAD) =>
        {
            let mut resp = Refusal::MethodNotAllowed.into_response(request_id);
            resp.headers_mut()
                .insert(http::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            resp
        }
        "/.well-known/jwks.json" => crate::token::endpoint::jwks(&broker),
        "/.well-known/oauth-authorization-server" => crate::token::endpoint::metadata(
            &broker.live(),
            req.uri().authority().map(|a| a.as_str()).or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            }),
        ),
        _ => pipeline::proxy(broker, req, conn, id).await,
    }
}

/// The HTTP/2 header list size (RFC 7541 §4.1: each field's name and value plus 32) allowed
/// for requests within `max_header_bytes` by [`header_bytes`]'s count, as many fields as an
/// HTTP/1.1 request may have and a request line's worth of pseudo-headers.
fn h2_header_list_limit(max_header_bytes: usize) -> usize {
    max_header_bytes.saturating_add(32 * (MAX_HEADERS + 8))
}

/// The request line and header lines as they were on the wire (HTTP/1), approximately for h2.
fn header_bytes<B>(req: &Request<B>) -> usize {
    let uri = req.uri();
    let target = uri.path_and_query().map_or(1, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len() + 8);
    let line = req.method().as_str().len() + target + 12;
    req.headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + line
}

/// A request's id (32 lower-case hex digits), made once as a header value: the response's
/// and the upstream request's `x-request-id` share its bytes.
pub struct RequestId(HeaderValue);

impl RequestId {
    pub fn new() -> Self {
        let mut hex = [0u8; 32];
        // 16 random bytes are 32 hex digits: this cannot fail, and they make a valid value.
        let _ = hex::encode_to_slice(rand::random::<u128>().to_be_bytes(), &mut hex);
        let value = HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(&hex))
            .unwrap_or_else(|_| HeaderValue::from_static("00000000000000000000000000000000"));
        Self(value)
    }

    pub fn as_str(&self) -> &str {
        // Hex digits are visible ASCII.
        self.0.to_str().unwrap_or_default()
    }

    pub fn header(&self) -> &HeaderValue {
        &self.0
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}
/// Binds a listener, naming the address on failure.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// A listener's rustls server config, replaced on reload. Each accepted connection takes the
/// config in force when it is accepted, so a reload changes what new connections see and
/// never closes an open one (an open connection's client certificate stops counting once the
/// `client_ca` it was verified against is no longer in force: [`PeerIdentity::counts`]).
#[derive(Clone)]
pub struct SwappableTls(Arc<ArcSwap<ListenerTlsConfig>>);

/// A listener's rustls config and, with mTLS, the `client_ca` it verifies certificates against.
pub struct ListenerTlsConfig {
    config: Arc<rustls::ServerConfig>,
    client_ca: Option<ClientCaId>,
}

/// What a connection is accepted with: the config in force and its `client_ca`.
pub struct Accepting {
    acceptor: TlsAcceptor,
    client_ca: Option<ClientCaId>,
}

impl SwappableTls {
    pub fn new(config: ListenerTlsConfig) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(config)))
    }

    /// Puts `config` in force for connections accepted from now on.
    pub fn store(&self, config: ListenerTlsConfig) {
        self.0.store(Arc::new(config));
    }

    /// An acceptor with the config in force now.
    pub fn acceptor(&self) -> Accepting {
        let now = self.0.load();
        Accepting {
            acceptor: TlsAcceptor::from(Arc::clone(&now.config)),
            client_ca: now.client_ca,
        }
    }

    /// The `client_ca` in force now (`None` without mTLS).
    pub fn client_ca(&self) -> Option<ClientCaId> {
        self.0.load().client_ca
    }
}

/// The TLS configs of the broker's listeners, loaded at start and re-read on every reload
/// (so a certificate renewed in place is picked up by `credbroker` without a restart).
pub struct ListenerTls {
    /// The proxy listener's; `None` when it serves plain HTTP.
    pub proxy: Option<SwappableTls>,
    /// The admin listener's: outer `None` when there is no admin listener, inner `None` when
    /// it serves plain HTTP.
    pub admin: Option<Option<SwappableTls>>,
}

/// Server configs freshly loaded from a config's files, ready for [`ListenerTls::install`].
pub struct PreparedTls {
    proxy: Option<ListenerTlsConfig>,
    admin: Option<ListenerTlsConfig>,
}

/// Why a listener's TLS config could not be (re)loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenerTlsError {
    /// The certificate, key or client CA of a listener could not be loaded.
    #[error("[{listener}] TLS: {source}")]
    Load {
        /// `server` or `admin`.
        listener: &'static str,
        /// What was wrong with the files (boxed: `TlsError` is large and this is a cold path).
        source: Box<TlsError>,
    },
    /// A reload would turn TLS on or off for a running listener; the socket was set up for
    /// one or the other at start, and silently staying plain would be worse than refusing.
    #[error("[{listener}] TLS cannot be turned {} by a reload; restart credbroker", if *.enable { "on" } else { "off" })]
    ModeChanged {
        /// `server` or `admin`.
        listener: &'static str,
        /// True when the new config adds TLS, false when it removes it.
        enable: bool,
    },
}

impl ListenerTls {
    /// Loads the TLS configs `config` asks for.
    pub fn load(config: &Config) -> Result<Self, ListenerTlsError> {
        let proxy = server_tls(config)?.map(SwappableTls::new);
        let admin = match &config.admin {
            None => None,
            Some(_) => Some(admin_tls(config)?.map(SwappableTls::new)),
        };
        Ok(Self { proxy, admin })
    }

    /// Re-reads the files of `config` for the running listeners; nothing is put in force yet,
    /// so a failure leaves the old certificates serving.
    pub fn prepare(&self, config: &Config) -> Result<PreparedTls, ListenerTlsError> {
        let proxy = same_mode("server", self.proxy.is_some(), server_tls(config)?)?;
        let admin = match &self.admin {
            // The admin listener is not started or stopped by a reload.
            None => None,
            Some(slot) => same_mode("admin", slot.is_some(), admin_tls(config)?)?,
        };
        Ok(PreparedTls { proxy, admin })
    }

    /// Puts prepared configs in force for new connections.
    pub fn install(&self, prepared: PreparedTls) {
        if let (Some(slot), Some(config)) = (&self.proxy, prepared.proxy) {
            slot.store(config);
        }
        if let (Some(Some(slot)), Some(config)) = (&self.admin, prepared.admin) {
            slot.store(config);
        }
    }
}

/// The proxy listener's server config (with the mTLS verifier when `client_ca` is set).
fn server_tls(config: &Config) -> Result<Option<ListenerTlsConfig>, ListenerTlsError> {
    let Some(files) = &config.server.tls else {
        return Ok(None);
    };
    crate::tls::server_config_and_ca(&files.cert, &files.key, config.server.client_ca.as_deref())
        .map(|(config, client_ca)| Some(ListenerTlsConfig { config, client_ca }))
        .map_err(|source| ListenerTlsError::Load {
            listener: "server",
            source: Box::new(source),
        })
}

/// The admin listener's server config (never mTLS: admins use the bearer token).
fn admin_tls(config: &Config) -> Result<Option<ListenerTlsConfig>, ListenerTlsError> {
    let Some(files) = config.admin.as_ref().and_then(|a| a.tls.as_ref()) else {
        return Ok(None);
    };
    crate::tls::server_config(&files.cert, &files.key, None)
        .map(|config| {
            Some(ListenerTlsConfig {
                config,
                client_ca: None,
            })
        })
        .map_err(|source| ListenerTlsError::Load {
            listener: "admin",
            source: Box::new(source),
        })
}

/// `new` if the listener keeps its mode (TLS or plain), else the error naming the change.
fn same_mode(
    listener: &'static str,
    running_tls: bool,
    new: Option<ListenerTlsConfig>,
) -> Result<Option<ListenerTlsConfig>, ListenerTlsError> {
    if running_tls != new.is_some() {
        return Err(ListenerTlsError::ModeChanged {
            listener,
            enable: new.is_some(),
        });
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_32_lower_hex_digits_and_differ() {
        let ids: Vec<String> = (0..64)
            .map(|_| {
                let id = super::RequestId::new();
                assert_eq!(id.header().as_bytes(), id.as_str().as_bytes());
                id.as_str().to_owned()
            })
            .collect();
        for id in &ids {
            assert_eq!(id.len(), 32, "{id}");
            assert!(
                id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
                "{id}"
            );
        }
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
    }
}
