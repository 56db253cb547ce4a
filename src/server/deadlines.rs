//! Deadlines on a connection that is not doing anything.
//!
//! - **First request.** hyper-util's `auto` builder reads the first bytes of a connection to
//!   tell HTTP/1.1 from HTTP/2, with no timeout of its own, and hyper's `header_read_timeout`
//!   starts only after that. So a client that connects (or finishes a TLS handshake) and then
//!   sends nothing would hold a connection slot for ever, and `max_connections` of them would
//!   shut everyone else out. One deadline, `header_read_timeout` from the accept, covers the
//!   TLS handshake, the first byte and the first request's head together: taken one after the
//!   other, each with its own timeout, they let a slow client hold a slot three times as long.
//! - **Idle HTTP/2.** An HTTP/1.1 connection that sits between requests is closed by hyper
//!   after `header_read_timeout`. An HTTP/2 connection has no such limit, and its keep-alive
//!   pings prove only that the peer is alive: a peer that opens connections, answers pings and
//!   never asks for anything would hold slots for ever too. So an HTTP/2 connection with no
//!   request in flight for `header_read_timeout` is closed as well.
//!
//! - **A client that stops reading.** The response body's own `request_timeout` timer runs
//!   only while hyper polls the body, and hyper stops polling it when the client does not take
//!   what was sent: an HTTP/1.1 socket whose send buffer stays full, an HTTP/2 stream whose
//!   window stays at 0. Such a client would hold its connection, an upstream connection and
//!   the buffered response for ever, and its call would never get a `proxy_result`. So a write
//!   that makes no progress for `request_timeout` fails, and an HTTP/2 connection with a
//!   response still being sent [`OVERDUE_GRACE`] past its request's deadline (or past the
//!   moment the response was ready, if later) is closed: the broker's own handling of a
//!   deadline, a 504 or a cut body, has happened by then.
//!
//! All work at the I/O level: when a deadline passes, the connection's next read or write
//! fails with `TimedOut` and hyper closes it. The idle deadline only ever fires with no request
//! in flight — a request counts until its response body has been sent — so nothing in progress
//! is cut.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The HTTP/2 connection preface's first bytes: a plain connection starting with them speaks
/// HTTP/2 (no HTTP/1 method is `PRI`).
const H2_PREFACE_START: &[u8] = b"PRI ";

/// How long past its deadline a request still in flight on an HTTP/2 connection closes it.
pub const OVERDUE_GRACE: Duration = Duration::from_secs(1);

/// What the service tells the connection's I/O on an HTTP/2 connection: requests started
/// and in flight. (On HTTP/1.1, hyper's own header timer covers idleness, so nothing is
/// counted there.)
#[derive(Debug, Default)]
pub struct Activity {
    /// Requests started plus requests finished: any change is activity.
    events: AtomicU64,
    in_flight: AtomicUsize,
    http2: AtomicBool,
    /// The deadlines of the requests in flight (HTTP/2 has several at once).
    deadlines: Mutex<Vec<Instant>>,
}

impl Activity {
    /// Whether the connection speaks HTTP/2 (known from ALPN or its first bytes).
    pub fn is_http2(&self) -> bool {
        self.http2.load(Ordering::Relaxed)
    }

    /// Notes an HTTP/1.1 request's start (its head has been read): the connection's first
    /// request has come. (A load and, once, a store: no locked add on every request.)
    pub fn request_started(&self) {
        if self.events.load(Ordering::Relaxed) == 0 {
            self.events.store(1, Ordering::Relaxed);
        }
    }

    /// HTTP/2 requests in flight on the connection.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request as in flight until the guard drops: keep it with the response body,
    /// so a long download is not taken for idleness.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.events.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            activity: Arc::clone(self),
            deadline: None,
        }
    }

    /// The earliest deadline of the requests in flight.
    fn earliest_deadline(&self) -> Option<Instant> {
        self.lock_deadlines().iter().min().copied()
    }

    fn lock_deadlines(&self) -> std::sync::MutexGuard<'_, Vec<Instant>> {
        // A push or a removal cannot be left half done.
        self.deadlines.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A request in flight on a connection ([`Activity::request`]).
pub struct InFlight {
    activity: Arc<Activity>,
    deadline: Option<Instant>,
}

impl InFlight {
    /// The response is on its way and must be sent by `deadline`: an HTTP/2 connection still
    /// sending it [`OVERDUE_GRACE`] later is closed. Set once the response head is ready, so
    /// the handler's own time (its timeouts, its audit writes) never closes a connection.
    pub fn due_by(&mut self, deadline: Instant) {
        if self.deadline.replace(deadline).is_none() {
            self.activity.lock_deadlines().push(deadline);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.activity;
        // The end of a request is activity too: the idle time counts from it, however long
        // the request took (the timer may not have been looked at meanwhile).
        activity.events.fetch_add(1, Ordering::Relaxed);
        activity.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(deadline) = self.deadline {
            let mut deadlines = activity.lock_deadlines();
            if let Some(i) = deadlines.iter().position(|d| *d == deadline) {
                deadlines.swap_remove(i);
            }
        }
    }
}

/// How a connection starts: its protocol if known, and by when its first request must have
/// come (its head read), counted from the accept.
#[derive(Clone, Copy, Debug)]
pub struct Opening {
    pub protocol: Protocol,
    pub first_request_by: Instant,
}

/// How the connection speaks, when it is known before the first byte (TLS ALPN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http2,
    /// HTTP/1.1, or (plain connections) told by the first bytes.
    Unknown,
}

/// `io`, whose reads fail with `TimedOut` once a deadline above passes.
pub struct Deadlines<I> {
    io: I,
    within: Duration,
    /// Armed until the first request has started.
    first_request: Option<Pin<Box<Sleep>>>,
    /// Whether the first bytes have been seen (the protocol is known from them).
    sniffed: bool,
    /// Set once the connection is known to speak HTTP/2.
    idle: Option<Idle>,
    activity: Arc<Activity>,
    protocol: Protocol,
    /// The longest a write may wait without progress (`request_timeout`).
    write_within: Duration,
    /// Armed while a write waits for the peer to take bytes.
    write_stalled: Option<Pin<Box<Sleep>>>,
    /// HTTP/2: armed at the earliest in-flight request's deadline plus [`OVERDUE_GRACE`].
    overdue: Option<Pin<Box<Sleep>>>,
}

struct Idle {
    timer: Pin<Box<Sleep>>,
    /// `Activity::events` when the timer was last set.
    seen: u64,
}

impl<I> Deadlines<I> {
    /// `within`: the idle deadline (`header_read_timeout`); `write_within`: the longest a
    /// write may make no progress (`request_timeout`).
    pub fn new(
        io: I,
        opening: Opening,
        within: Duration,
        write_within: Duration,
        activity: Arc<Activity>,
    ) -> Self {
        if opening.protocol == Protocol::Http2 {
            activity.http2.store(true, Ordering::Relaxed);
        }
        Self {
            io,
            within,
            first_request: Some(Box::pin(tokio::time::sleep_until(opening.first_request_by))),
            sniffed: false,
            idle: None,
            activity,
            protocol: opening.protocol,
            write_within,
            write_stalled: None,
            overdue: None,
        }
    }

    /// Whether an HTTP/2 request in flight is [`OVERDUE_GRACE`] past its deadline.
    fn request_overdue(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(deadline) = self.activity.earliest_deadline() else {
            self.overdue = None;
            return false;
        };
        let at = deadline + OVERDUE_GRACE;
        let timer = self
            .overdue
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if timer.deadline() != at {
            timer.as_mut().reset(at);
        }
        timer.as_mut().poll(cx).is_ready()
    }

    /// After a write: progress clears the stall timer; waiting arms it (once) and says whether
    /// it has run out.
    fn write_outcome<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.write_stalled = None;
            return poll;
        }
        let within = self.write_within;
        let stalled = self
            .write_stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(within)))
            .as_mut()
            .poll(cx)
            .is_ready();
        if stalled || self.request_overdue(cx) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took nothing of the response within request_timeout",
            )));
        }
        Poll::Pending
    }

    /// After the first bytes: an HTTP/2 connection starts its idle watch.
    fn first_bytes(&mut self, bytes: &[u8]) {
        self.sniffed = true;
        let h2 = self.protocol == Protocol::Http2
            || bytes.starts_with(H2_PREFACE_START)
            || H2_PREFACE_START.starts_with(bytes);
        if h2 {
            self.activity.http2.store(true, Ordering::Relaxed);
            self.idle = Some(Idle {
                timer: Box::pin(tokio::time::sleep(self.within)),
                seen: self.activity.events.load(Ordering::Relaxed),
            });
        }
    }

    /// Whether a deadline has passed while the connection waits for bytes.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(first) = self.first_request.as_mut() {
            if self.activity.events.load(Ordering::Relaxed) == 0 {
                return first.as_mut().poll(cx).is_ready();
            }
            self.first_request = None;
        }
        let Some(idle) = self.idle.as_mut() else {
            return false;
        };
        let events = self.activity.events.load(Ordering::Relaxed);
        let busy = self.activity.in_flight.load(Ordering::Relaxed) > 0;
        if busy || events != idle.seen {
            // Something happened: the idle time counts from now (and not at all while a
            // request is in flight — its own deadline is request_timeout).
            idle.seen = events;
            idle.timer.as_mut().reset(Instant::now() + self.within);
            if busy {
                return false;
            }
        }
        idle.timer.as_mut().poll(cx).is_ready()
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Deadlines<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if !this.sniffed && buf.filled().len() > before {
                    this.first_bytes(&buf.filled()[before..]);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if this.expired(cx) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no request within header_read_timeout",
            ))),
            Poll::Pending if this.activity.is_http2() && this.request_overdue(cx) => {
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "a response was not taken within request_timeout",
                )))
            }
            other => other,
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Deadlines<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.write_outcome(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.write_outcome(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        // hyper writes a response head and body in one `writev` only when this says so.
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        self.write_outcome(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Closing writes too (TLS `close_notify`): it must not wait for ever either.
        let poll = Pin::new(&mut self.io).poll_shutdown(cx);
        self.write_outcome(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const WITHIN: Duration = Duration::from_millis(200);

    fn wrap(
        io: tokio::io::DuplexStream,
        protocol: Protocol,
    ) -> (Deadlines<tokio::io::DuplexStream>, Arc<Activity>) {
        let activity = Arc::new(Activity::default());
        let opening = Opening {
            protocol,
            first_request_by: Instant::now() + WITHIN,
        };
        (
            Deadlines::new(io, opening, WITHIN, WITHIN * 2, Arc::clone(&activity)),
            activity,
        )
    }

    #[tokio::test]
    async fn a_silent_peer_times_out_and_an_http1_one_is_left_to_hyper() {
        let (client, server) = tokio::io::duplex(64);
        let (mut silent, _) = wrap(server, Protocol::Unknown);
        let mut buf = [0u8; 8];
        let err = silent.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(client);

        // The first bytes, then nothing: the first request's head must still come in time
        // (a byte now and then does not hold the slot).
        let (mut client, server) = tokio::io::duplex(64);
        let (mut http1, _) = wrap(server, Protocol::Unknown);
        let started = std::time::Instant::now();
        client.write_all(b"GET").await.unwrap();
        assert_eq!(http1.read(&mut buf).await.unwrap(), 3);
        let err = tokio::time::timeout(WITHIN * 5, http1.read(&mut buf))
            .await
            .expect("ended by the first request's deadline")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < WITHIN * 2, "{:?}", started.elapsed());
        drop(client);

        let (mut client, server) = tokio::io::duplex(64);
        let (mut http1, activity) = wrap(server, Protocol::Unknown);
        client.write_all(b"GET").await.unwrap();
        assert_eq!(http1.read(&mut buf).await.unwrap(), 3);
        activity.request_started();
        // Past the deadline, after its first request, a quiet HTTP/1 peer is hyper's business.
        let read = tokio::time::timeout(WITHIN * 3, http1.read(&mut buf)).await;
        assert!(read.is_err(), "still waiting: no deadline for it here");
    }

    #[tokio::test]
    async fn a_write_the_peer_never_takes_fails_but_a_slow_reader_keeps_going() {
        let (client, server) = tokio::io::duplex(64);
        let (mut conn, _) = wrap(server, Protocol::Unknown);
        let started = std::time::Instant::now();
        let err = conn.write_all(&[b'x'; 4096]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= WITHIN * 2 - Duration::from_millis(20));

        drop((client, conn));
        // Progress resets the stall timer: a reader taking a little at a time is not cut.
        let (mut slow, server) = tokio::io::duplex(64);
        let (mut conn, _) = wrap(server, Protocol::Unknown);
        let taking = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let mut total = 0;
            while total < 1024 {
                tokio::time::sleep(WITHIN / 2).await;
                total += slow.read(&mut buf).await.unwrap();
            }
        });
        tokio::time::timeout(Duration::from_secs(30), conn.write_all(&[b'x'; 1024]))
            .await
            .unwrap()
            .unwrap();
        taking.await.unwrap();
    }

    #[tokio::test]
    async fn an_http2_request_overdue_closes_the_connection_after_the_grace() {
        let (mut client, server) = tokio::io::duplex(64);
        let (mut h2, activity) = wrap(server, Protocol::Http2);
        let mut buf = [0u8; 8];
        client.write_all(b"x").await.unwrap();
        assert_eq!(h2.read(&mut buf).await.unwrap(), 1);
        let mut request = activity.request();
        request.due_by(Instant::now());
        let started = std::time::Instant::now();
        let err = h2.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= OVERDUE_GRACE - Duration::from_millis(20));
    }

    #[tokio::test]
    async fn an_idle_http2_connection_times_out_but_never_with_a_request_in_flight() {
        let (mut client, server) = tokio::io::duplex(64);
        let (mut h2, activity) = wrap(server, Protocol::Unknown);
        let mut buf = [0u8; 64];
        client.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        assert!(h2.read(&mut buf).await.unwrap() > 0);
        // A request in flight: no idle deadline, however long it takes.
        let request = activity.request();
        let read = tokio::time::timeout(WITHIN * 3, h2.read(&mut buf)).await;
        assert!(read.is_err(), "still waiting while a request is in flight");
        drop(request);
        // Then idle: closed one deadline after the request ended (not at once, although the
        // request took longer than the deadline).
        let started = std::time::Instant::now();
        let err = h2.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= WITHIN - Duration::from_millis(20));

        // ALPN h2 over TLS is known before the first byte: the same watch.
        let (mut client, server) = tokio::io::duplex(64);
        let (mut tls_h2, _) = wrap(server, Protocol::Http2);
        client.write_all(b"x").await.unwrap();
        assert_eq!(tls_h2.read(&mut buf).await.unwrap(), 1);
        let err = tls_h2.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
