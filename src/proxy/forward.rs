//! Upstream connections: keep-alive connections over HTTPS (rustls, webpki roots plus an
//! optional `upstream_ca`, ALPN h2 or http/1.1) or plain HTTP for loopback upstreams, pooled
//! per worker runtime. Redirects are never followed. DESIGN §4.3 forbids retries because a
//! retried POST could act twice; the one resend here cannot: a request that a reused
//! connection hands back unsent (it had closed while idle) goes out on another connection.
//!
//! Why not hyper-util's pooled client: it checks every call's connection out of a pool shared
//! by all threads and spawns a task per call to put it back. Here a connection belongs to the
//! worker whose runtime drives it ([`crate::workers`]); an HTTP/1 connection goes back to its
//! worker's idle list when the response body ends, in the same poll. With `benches/ab.sh`
//! that was 1.04× calls/s at 0.95× CPU per call at 32 connections and 1.13× at 0.86× at 256.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HOST;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

use super::ProxyBody;

/// TCP connect plus TLS handshake budget; the whole exchange is bounded by `upstream_timeout`
/// as well.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// When an upstream name has several addresses and the first has not answered in this long,
/// the next is tried alongside it (RFC 8305's "connection attempt delay"): a dead first
/// address (a broken IPv6 route, typically) then costs 250 ms, not the whole budget.
const NEXT_ADDRESS_AFTER: Duration = Duration::from_millis(250);
/// An HTTP/2 upstream's flow-control window per response: what it may send ahead of a client
/// that reads slowly (1 MiB: 10 MB/s a stream at 100 ms of round trip; hyper's default is 2).
const H2_STREAM_WINDOW: u32 = 1024 * 1024;
/// … and per shared connection: 128 such responses unread before the others wait — more than
/// the streams upstreams usually allow at once (100–128), so unread answers cannot stall the
/// connection's other calls —, at most 128 MiB buffered for one connection.
const H2_CONNECTION_WINDOW: u32 = 128 * H2_STREAM_WINDOW;

/// The pool's bounds.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// Idle connections are kept this long for reuse; the reaper looks every third of it.
    idle_timeout: Duration,
    /// At most this many idle HTTP/1 connections per origin and worker (so at most this many
    /// times the number of cores per origin in all).
    max_idle_per_origin: usize,
    /// HTTP/2 pings: a shared connection whose path went silent is closed (and replaced) after
    /// `ping_every + ping_timeout` instead of failing every call until TCP gives up.
    ping_every: Duration,
    ping_timeout: Duration,
}

const LIMITS: Limits = Limits {
    idle_timeout: Duration::from_secs(90),
    max_idle_per_origin: 512,
    ping_every: Duration::from_secs(20),
    ping_timeout: Duration::from_secs(10),
};

/// Why an upstream exchange failed. The messages name the failure, never a request's content.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("invalid upstream URI: {0}")]
    Uri(&'static str),
    #[error("could not connect to the upstream: {0}")]
    Connect(#[source] io::Error),
    #[error("the TLS handshake with the upstream failed: {0}")]
    Tls(#[source] io::Error),
    #[error("the upstream exchange failed: {0}")]
    Http(#[source] hyper::Error),
}

impl UpstreamError {
    /// No connection was made (TCP or TLS), so the upstream saw nothing of the request.
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_) | Self::Tls(_))
    }

    /// A short, fixed description (hyper's chain can be long). A TLS failure says so, with
    /// the kind of rustls' reason for a refused certificate (`UnknownIssuer`,
    /// `NotValidForName`, `Expired`…) — only its kind: its details (the certificate's names,
    /// the name expected, times) are for the broker's log, not the client's answer.
    pub fn describe(&self) -> String {
        match self {
            Self::Tls(io) => match tls_error_in(io) {
                Some(rustls::Error::InvalidCertificate(reason)) => {
                    let kind = certificate_error_kind(reason);
                    format!("the upstream's TLS certificate failed verification ({kind})")
                }
                _ => "the TLS handshake with the upstream failed".into(),
            },
            Self::Connect(_) => "could not connect to the upstream".into(),
            Self::Uri(_) => "invalid upstream URI".into(),
            Self::Http(_) => "the upstream connection failed".into(),
        }
    }
}

/// The variant name of a rustls certificate error, without its details: `NotValidForName`
/// for `NotValidForNameContext { expected, presented }`, `Other` for `Other(…)`.
fn certificate_error_kind(reason: &rustls::CertificateError) -> String {
    let debug = format!("{reason:?}");
    let name = debug
        .split(|c: char| !c.is_ascii_alphanumeric())
        .next()
        .unwrap_or_default();
    name.strip_suffix("Context").unwrap_or(name).to_owned()
}

/// The rustls error somewhere in `e`'s source chain. tokio-rustls wraps it in an `io::Error`,
/// whose `source` skips the wrapped error itself, so an `io::Error` is descended through
/// `get_ref` instead.
fn tls_error_in<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cause = Some(e);
    while let Some(err) = cause {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        cause = match err.downcast_ref::<io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

/// Where requests go: an upstream's scheme and authority, worked out once (at config load for
/// a connector).
#[derive(Clone, Debug)]
pub struct Origin {
    /// `scheme://host:port`, the pool key.
    key: Arc<str>,
    scheme: Scheme,
    authority: Authority,
    /// The host to resolve and to name in SNI: IPv6 without its brackets.
    host: Arc<str>,
    port: u16,
    /// HTTP/1's `Host`: the authority without a default port.
    host_header: HeaderValue,
}

impl Origin {
    pub fn new(scheme: &Scheme, authority: &Authority) -> Result<Self, UpstreamError> {
        let default_port = match scheme.as_str() {
            "https" => 443,
            "http" => 80,
            _ => return Err(UpstreamError::Uri("the scheme is neither http nor https")),
        };
        let port = authority.port_u16().unwrap_or(default_port);
        let host = authority.host();
        let host_header = if port == default_port {
            HeaderValue::from_str(host)
        } else {
            HeaderValue::from_str(&format!("{host}:{port}"))
        }
        .map_err(|_| UpstreamError::Uri("the host is not a valid Host header"))?;
        Ok(Self {
            key: format!("{scheme}://{host}:{port}").into(),
            scheme: scheme.clone(),
            authority: authority.clone(),
            host: host.trim_start_matches('[').trim_end_matches(']').into(),
            port,
            host_header,
        })
    }

    /// The origin of an absolute URI.
    pub fn of(uri: &Uri) -> Result<Self, UpstreamError> {
        match (uri.scheme(), uri.authority()) {
            (Some(scheme), Some(authority)) => Self::new(scheme, authority),
            _ => Err(UpstreamError::Uri("the URI is not absolute")),
        }
    }

    fn is_tls(&self) -> bool {
        self.scheme == Scheme::HTTPS
    }
}

/// A client for the upstreams that trust one set of roots; cheap to clone (the pools are
/// shared).
#[derive(Clone)]
pub struct UpstreamClient(Arc<Shared>);

struct Shared {
    tls: TlsConnector,
    limits: Limits,
    /// One pool per worker runtime: a connection is driven by a task on the runtime that
    /// opened it, so a call never hops threads to reach its upstream connection.
    pools: Box<[Mutex<Pool>]>,
}

#[derive(Default)]
struct Pool {
    origins: crate::ConfigMap<Arc<str>, OriginConns>,
    /// Closes expired idle connections while there are any.
    reaper: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct OriginConns {
    /// HTTP/1 connections ready for a request, oldest first.
    idle: VecDeque<IdleH1>,
    /// The origin's HTTP/2 connection, which all of this worker's calls share, and when a call
    /// last took it.
    h2: Option<(http2::SendRequest<ProxyBody>, Instant)>,
}

struct IdleH1 {
    since: Instant,
    sender: http1::SendRequest<ProxyBody>,
}

enum Conn {
    H1(http1::SendRequest<ProxyBody>),
    H2(http2::SendRequest<ProxyBody>),
}

impl UpstreamClient {
    /// A client trusting webpki roots plus the PEM certificates in `extra_ca`.
    pub fn new(extra_ca: Option<&Path>) -> Result<Self, String> {
        // ALPN h2 + http/1.1: the connection speaks whichever the upstream picks.
        let tls = crate::tls::upstream_client_config(extra_ca).map_err(|e| e.to_string())?;
        Ok(Self::with(tls, LIMITS))
    }

    /// Whether both are the same client (same trust roots, same pool).
    pub fn same(&self, other: &UpstreamClient) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    fn with(tls: rustls::ClientConfig, limits: Limits) -> Self {
        Self(Arc::new(Shared {
            tls: TlsConnector::from(Arc::new(tls)),
            limits,
            pools: (0..crate::workers::count())
                .map(|_| Mutex::default())
                .collect(),
        }))
    }

    /// Sends `req`, whose URI is absolute (credential minting).
    pub async fn request(
        &self,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let origin = Origin::of(req.uri())?;
        origin_form(&mut req);
        self.send(&origin, req).await
    }

    /// Sends `req`, whose URI is in origin form (`/path?query`), to `origin`.
    pub async fn send(
        &self,
        origin: &Origin,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let worker = self.worker();
        // Once the shared HTTP/2 connection has handed a request back, this call does not take
        // it again: every turn of the loop then uses up an idle connection or a new one.
        let mut skip_h2 = false;
        loop {
            let (conn, reused) = match self.0.checkout(worker, origin, skip_h2) {
                Some(conn) => (conn, true),
                // Boxed: a connect (TCP, TLS, handshake) is a large future that most calls,
                // on a pooled connection, never run; inline it would size every call's.
                None => (Box::pin(self.connect(worker, origin)).await?, false),
            };
            let mut unsent = match conn {
                Conn::H1(mut sender) => {
                    origin_form(&mut req);
                    req.headers_mut()
                        .entry(HOST)
                        .or_insert_with(|| origin.host_header.clone());
                    match sender.try_send_request(req).await {
                        Ok(response) => {
                            let give_back = GiveBack {
                                client: Arc::clone(&self.0),
                                worker,
                                key: Arc::clone(&origin.key),
                                sender,
                            };
                            return Ok(response.map(|b| UpstreamBody::new(b, Some(give_back))));
                        }
                        Err(unsent) => unsent,
                    }
                }
                Conn::H2(mut sender) => {
                    // HTTP/2 carries the scheme and authority as pseudo-headers, not `Host`.
                    absolute_form(&mut req, origin);
                    req.headers_mut().remove(HOST);
                    match sender.try_send_request(req).await {
                        Ok(response) => return Ok(response.map(|b| UpstreamBody::new(b, None))),
                        Err(unsent) => {
                            // A failed stream leaves the connection to the others; a closed
                            // connection is dropped from the pool.
                            self.0.forget_closed_h2(worker, origin);
                            skip_h2 = true;
                            unsent
                        }
                    }
                }
            };
            // Only a reused connection may have closed unnoticed; a new one failing is an
            // answer. A request that may have reached the upstream is never sent again.
            req = match unsent.take_message() {
                Some(r) if reused => r,
                _ => return Err(UpstreamError::Http(unsent.into_error())),
            };
        }
    }

    /// The pool of the worker running on this thread (worker 0's off the pool).
    fn worker(&self) -> usize {
        crate::workers::current().unwrap_or(0) % self.0.pools.len()
    }

    /// A new connection to `origin`, its driving task spawned on this worker; an HTTP/2 one
    /// is also pooled at once, for the calls that follow.
    async fn connect(&self, worker: usize, origin: &Origin) -> Result<Conn, UpstreamError> {
        let connecting = async {
            let tcp = tcp_connect(&origin.host, origin.port, !origin.is_tls())
                .await
                .map_err(UpstreamError::Connect)?;
            if !origin.is_tls() {
                return Ok((TokioIo::new(Box::new(tcp) as Box<dyn Io>), false));
            }
            let name = ServerName::try_from(origin.host.to_string())
                .map_err(|_| UpstreamError::Uri("the host is not a valid TLS server name"))?;
            let tls = self
                .0
                .tls
                .connect(name, tcp)
                .await
                .map_err(UpstreamError::Tls)?;
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            Ok((TokioIo::new(Box::new(tls) as Box<dyn Io>), h2))
        };
        let (io, h2) = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| UpstreamError::Connect(io::ErrorKind::TimedOut.into()))??;
        // Nothing of the request has been sent if a handshake fails.
        let handshake_failed = |e| UpstreamError::Connect(io::Error::other(e));
        if h2 {
            let limits = &self.0.limits;
            // The connection is shared by every call of this worker to the origin, and a
            // response whose client does not read it keeps its share of the connection's
            // flow-control window: with hyper's defaults (5 MiB for the connection, 2 MiB a
            // stream) three unread large answers stalled everyone else's. Streams get a
            // smaller window and the connection one that only that many of them fill.
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(H2_CONNECTION_WINDOW)
                .timer(TokioTimer::new())
                .keep_alive_interval(limits.ping_every)
                .keep_alive_timeout(limits.ping_timeout)
                .keep_alive_while_idle(true)
                .handshake(io)
                .await
                .map_err(handshake_failed)?;
            tokio::spawn(drive(conn));
            self.0.pool_h2(worker, origin, sender.clone());
            Ok(Conn::H2(sender))
        } else {
            let (sender, conn) = http1::handshake(io).await.map_err(handshake_failed)?;
            tokio::spawn(drive(conn));
            Ok(Conn::H1(sender))
        }
    }
}

/// A TCP or TLS stream; boxed so both kinds share one connection type.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// Runs a connection until it closes. Its errors reach the call that was using it.
async fn drive<F: std::future::Future<Output = hyper::Result<()>>>(conn: F) {
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "upstream connection closed");
    }
}

/// Connects to the first of `host`'s addresses that answers, in resolver order; with
/// `loopback_only` (a plain-HTTP origin), to loopback addresses only. The config accepts
/// `http://` only for a loopback host, and `localhost` is a name: should the resolver (an
/// edited `/etc/hosts`) turn it into another address, the credential would cross the network
/// in clear text. Such an address is never connected to.
async fn tcp_connect(host: &str, port: u16, loopback_only: bool) -> io::Result<TcpStream> {
    let addresses = tokio::net::lookup_host((host, port)).await?;
    if !loopback_only {
        return connect_first(addresses).await;
    }
    let mut loopback = addresses.filter(|a| a.ip().is_loopback()).peekable();
    if loopback.peek().is_none() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "a plain-HTTP upstream must resolve to a loopback address, and this one does not",
        ));
    }
    connect_first(loopback).await
}

/// Tries `addresses` in order, starting the next attempt alongside when one has not answered
/// within [`NEXT_ADDRESS_AFTER`] or has failed; the first connection made wins.
async fn connect_first(mut addresses: impl Iterator<Item = SocketAddr>) -> io::Result<TcpStream> {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let mut attempts = FuturesUnordered::new();
    let mut last_error = None;
    loop {
        if let Some(addr) = addresses.next() {
            attempts.push(TcpStream::connect(addr));
        } else if attempts.is_empty() {
            let none = || io::Error::new(io::ErrorKind::NotFound, "no address");
            return Err(last_error.unwrap_or_else(none));
        }
        let next_after = tokio::time::sleep(NEXT_ADDRESS_AFTER);
        tokio::select! {
            Some(result) = attempts.next() => match result {
                Ok(tcp) => {
                    tcp.set_nodelay(true)?;
                    return Ok(tcp);
                }
                Err(e) => last_error = Some(e),
            },
            () = next_after => {}
        }
    }
}

/// `/path?query` for HTTP/1 (a request handed back by an HTTP/2 connection is absolute).
fn origin_form(req: &mut Request<ProxyBody>) {
    if req.uri().scheme().is_none() {
        return;
    }
    let path = req.uri().path_and_query().cloned();
    *req.uri_mut() = Uri::from(path.unwrap_or_else(|| PathAndQuery::from_static("/")));
}

fn absolute_form(req: &mut Request<ProxyBody>, origin: &Origin) {
    if req.uri().scheme().is_some() {
        return;
    }
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(origin.scheme.clone());
    parts.authority = Some(origin.authority.clone());
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    // Scheme, authority and path are all set, so the parts make a URI.
    *req.uri_mut() = Uri::from_parts(parts).unwrap_or_default();
}

impl Shared {
    fn lock(&self, worker: usize) -> MutexGuard<'_, Pool> {
        self.pools[worker].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A pooled connection to `origin` that is still open: the shared HTTP/2 one, else the
    /// HTTP/1 one idle the shortest time.
    fn checkout(&self, worker: usize, origin: &Origin, skip_h2: bool) -> Option<Conn> {
        let idle_timeout = self.limits.idle_timeout;
        let mut pool = self.lock(worker);
        let conns = pool.origins.get_mut(&*origin.key)?;
        let now = Instant::now();
        if let Some((sender, used)) = conns.h2.as_mut().filter(|_| !skip_h2) {
            if !sender.is_closed() {
                *used = now;
                return Some(Conn::H2(sender.clone()));
            }
            conns.h2 = None;
        }
        while let Some(idle) = conns.idle.pop_back() {
            if now.duration_since(idle.since) >= idle_timeout {
                // The newest has expired, so have all the others.
                conns.idle.clear();
                break;
            }
            if !idle.sender.is_closed() {
                return Some(Conn::H1(idle.sender));
            }
        }
        None
    }

    fn pool_h2(
        self: &Arc<Self>,
        worker: usize,
        origin: &Origin,
        sender: http2::SendRequest<ProxyBody>,
    ) {
        let mut pool = self.lock(worker);
        let conns = pool.origins.entry(Arc::clone(&origin.key)).or_default();
        // Calls that raced to connect each made one; the first stays pooled, the others close
        // when their calls end.
        if conns.h2.as_ref().is_none_or(|(s, _)| s.is_closed()) {
            conns.h2 = Some((sender, Instant::now()));
            self.ensure_reaper(&mut pool, worker);
        }
    }

    /// Drops the origin's pooled HTTP/2 connection if it has closed (whichever one it is by
    /// now: another call may have pooled a new one).
    fn forget_closed_h2(&self, worker: usize, origin: &Origin) {
        if let Some(conns) = self.lock(worker).origins.get_mut(&*origin.key) {
            if conns.h2.as_ref().is_some_and(|(s, _)| s.is_closed()) {
                conns.h2 = None;
            }
        }
    }

    fn put_idle(
        self: &Arc<Self>,
        worker: usize,
        key: Arc<str>,
        sender: http1::SendRequest<ProxyBody>,
    ) {
        let mut pool = self.lock(worker);
        let conns = pool.origins.entry(key).or_default();
        if conns.idle.len() >= self.limits.max_idle_per_origin {
            return; // dropping the sender closes the connection
        }
        conns.idle.push_back(IdleH1 {
            since: Instant::now(),
            sender,
        });
        self.ensure_reaper(&mut pool, worker);
    }

    fn ensure_reaper(self: &Arc<Self>, pool: &mut Pool, worker: usize) {
        if pool.reaper.as_ref().is_some_and(|r| !r.is_finished()) {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let every = self.limits.idle_timeout / 3;
            pool.reaper = Some(rt.spawn(reap(Arc::downgrade(self), worker, every)));
        }
    }
}

/// Closes a worker's connections idle longer than the idle timeout, and those the upstream
/// closed, until none are left or the client is gone.
async fn reap(client: Weak<Shared>, worker: usize, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(client) = client.upgrade() else {
            return;
        };
        let idle_timeout = client.limits.idle_timeout;
        let mut pool = client.lock(worker);
        let now = Instant::now();
        pool.origins.retain(|_, conns| {
            conns
                .idle
                .retain(|i| now.duration_since(i.since) < idle_timeout && !i.sender.is_closed());
            if conns
                .h2
                .as_ref()
                .is_some_and(|(s, used)| s.is_closed() || now.duration_since(*used) >= idle_timeout)
            {
                conns.h2 = None;
            }
            !conns.idle.is_empty() || conns.h2.is_some()
        });
        if pool.origins.is_empty() {
            pool.reaper = None;
            return;
        }
    }
}

/// An HTTP/1 connection to return to its worker's pool once its response has been read.
struct GiveBack {
    client: Arc<Shared>,
    worker: usize,
    key: Arc<str>,
    sender: http1::SendRequest<ProxyBody>,
}

impl GiveBack {
    /// The response has ended. The connection takes a new request once hyper has finished
    /// with this one, which is usually already the case (its task read the end of the body
    /// before this poll); else (a request body still going out) a small task waits for it, at
    /// most the idle timeout. After a `Connection: close` or a failed exchange it never
    /// becomes ready and is dropped.
    fn release(mut self) {
        if self.sender.is_ready() {
            self.client.put_idle(self.worker, self.key, self.sender);
        } else if !self.sender.is_closed() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let wait = self.client.limits.idle_timeout;
                rt.spawn(async move {
                    let ready = tokio::time::timeout(wait, self.sender.ready()).await;
                    if matches!(ready, Ok(Ok(()))) {
                        self.client.put_idle(self.worker, self.key, self.sender);
                    }
                });
            }
        }
    }
}

/// An upstream response body. Read to its end, it returns its HTTP/1 connection to the pool;
/// dropped before that, the connection closes (HTTP/1 cannot skip the rest of a response).
pub struct UpstreamBody {
    inner: Incoming,
    give_back: Option<GiveBack>,
    ended: bool,
}

impl UpstreamBody {
    fn new(inner: Incoming, give_back: Option<GiveBack>) -> Self {
        Self {
            inner,
            give_back,
            ended: false,
        }
    }

    fn release(&mut self) {
        if let Some(g) = self.give_back.take() {
            g.release();
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            None => this.ended = true,
            // Trailers are the last frame, though the body may only say so when polled again
            // (an HTTP/1.1 server that drops them never does).
            Some(Ok(frame)) => this.ended = frame.is_trailers() || this.inner.is_end_stream(),
            Some(Err(_)) => {}
        }
        if this.ended {
            this.release();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("pooled", &self.give_back.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A body nobody polled is read through when it is empty (HEAD, 204, 304, length 0).
        if self.ended || self.inner.is_end_stream() {
            self.release();
        }
    }
}

/// One client per distinct trust configuration, shared across reloads so pools survive them.
#[derive(Default)]
pub struct UpstreamClients {
    by_ca: Mutex<HashMap<Option<CaFile>, UpstreamClient>>,
}

/// An `upstream_ca` file: its path and the SHA-256 of its bytes when it was read.
type CaFile = (PathBuf, [u8; 32]);

impl UpstreamClients {
    /// The client for connectors trusting webpki roots plus `extra_ca`. The file is read
    /// each time (each load or reload): an unchanged file keeps its client and pooled
    /// connections, a changed one — a trust root removed or rotated — gets a new client (and
    /// a broken one fails the reload, as it would fail the next start).
    pub fn get(&self, extra_ca: Option<&Path>) -> Result<UpstreamClient, String> {
        use sha2::{Digest, Sha256};
        let pem = extra_ca
            .map(|path| {
                std::fs::read(path)
                    .map(|pem| (path, pem))
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))
            })
            .transpose()?;
        let key = pem
            .as_ref()
            .map(|(path, pem)| (path.to_path_buf(), Sha256::digest(pem).into()));
        let mut map = self.by_ca.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(&key) {
            return Ok(c.clone());
        }
        let extra = pem.as_ref().map(|(path, pem)| (*path, pem.as_slice()));
        let tls =
            crate::tls::upstream_client_config_from_pem(extra, true).map_err(|e| e.to_string())?;
        let client = UpstreamClient::with(tls, LIMITS);
        // The same file's older contents are no longer trusted by anything loaded from now.
        if let Some((path, _)) = &key {
            map.retain(|k, _| k.as_ref().is_none_or(|(p, _)| p != path));
        }
        map.insert(key, client.clone());
        Ok(client)
    }
}

#[cfg(test)]
mod tests;
