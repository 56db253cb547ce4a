//! Streaming bodies with accounting: request bodies are passed through with a byte limit,
//! response bodies are counted, bounded by the request deadline, and report how they ended
//! so the `proxy_result` record can be written — also when the client goes away mid-stream.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::forward::UpstreamBody;
use super::headers;
use super::inject::Echoes;
use super::BoxError;

/// A client request body forwarded as it streams in, refused past `limit` bytes; `uploaded`
/// is told once the `expected` bytes have all come (the upstream's own time starts then).
/// It fails at the request's `deadline`: an upstream may answer before it has read the whole
/// body and go on reading, and a client trickling the rest must not hold both connections
/// past the request's time.
pub struct LimitedBody {
    inner: Incoming,
    limit: u64,
    seen: Arc<AtomicU64>,
    expected: u64,
    uploaded: Arc<tokio::sync::Notify>,
    deadline: Instant,
    /// Armed the first time the client keeps the body waiting (most bodies never do).
    timer: Option<Pin<Box<Sleep>>>,
}

impl LimitedBody {
    pub fn new(
        inner: Incoming,
        limit: u64,
        seen: Arc<AtomicU64>,
        expected: u64,
        uploaded: Arc<tokio::sync::Notify>,
        deadline: Instant,
    ) -> Self {
        Self {
            inner,
            limit,
            seen,
            expected,
            uploaded,
            deadline,
            timer: None,
        }
    }
}

/// Reading the client's own request body failed (it went away, or broke the framing) while
/// the body streamed upstream: the client's fault, told apart from the upstream's by
/// [`client_body_error`].
#[derive(Debug, thiserror::Error)]
#[error("the client's request body failed: {0}")]
pub struct ClientBodyFailed(#[source] hyper::Error);

/// The client's own body error, when `error` (an upstream exchange's) comes from it.
pub fn client_body_error<'e>(
    error: &'e (dyn std::error::Error + 'static),
) -> Option<&'e hyper::Error> {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(failed) = e.downcast_ref::<ClientBodyFailed>() {
            return Some(&failed.0);
        }
        cause = e.source();
    }
    None
}

/// Whether a `T` is somewhere in `error`'s source chain.
fn caused_by<T: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<T>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// The client had not sent its whole request body by the request's deadline.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body did not arrive within request_timeout")]
pub struct RequestBodyTimeout;

/// Whether `error` (an upstream exchange's) is the request body's deadline.
pub fn request_body_timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    caused_by::<RequestBodyTimeout>(error)
}

/// The request body grew past the operation's `max_body_bytes` while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the operation's max_body_bytes")]
pub struct BodyTooLarge;

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            return match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let total = this.seen.fetch_add(data.len() as u64, Ordering::Relaxed)
                            + data.len() as u64;
                        if total > this.limit {
                            return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                        }
                        if total >= this.expected {
                            // A permit is kept if nobody waits yet.
                            this.uploaded.notify_one();
                        }
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    // Request trailers (HTTP/2, or chunked HTTP/1) are never forwarded: they
                    // are header fields that none of the checks of DESIGN §4.3 saw — a second
                    // credential, the broker's token, a method override — and an HTTP/2
                    // upstream connection would send them on as they came.
                    Err(_trailers) => continue,
                },
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(ClientBodyFailed(e))))),
                Poll::Ready(None) => {
                    this.uploaded.notify_one();
                    Poll::Ready(None)
                }
                Poll::Pending => {
                    let deadline = this.deadline;
                    let timer = this
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    match timer.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(RequestBodyTimeout)))),
                        Poll::Pending => Poll::Pending,
                    }
                }
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How a streamed response ended, for the `proxy_result` record.
pub struct Outcome {
    pub bytes_out: u64,
    pub error: Option<&'static str>,
}

type OnDone = Box<dyn FnOnce(Outcome) + Send>;

/// An upstream response body on its way to the client.
pub struct ObservedBody {
    inner: UpstreamBody,
    bytes: u64,
    deadline: Instant,
    /// Armed at the first wait for the upstream: most bodies arrive in the first poll, and
    /// then need no timer at all.
    timer: Option<Pin<Box<Sleep>>>,
    on_done: Option<OnDone>,
    /// The credential's forms, for trailers: they are header fields too.
    echoes: Arc<Echoes>,
}

impl ObservedBody {
    pub fn new(
        inner: UpstreamBody,
        deadline: Instant,
        echoes: Arc<Echoes>,
        on_done: OnDone,
    ) -> Self {
        Self {
            inner,
            bytes: 0,
            deadline,
            timer: None,
            on_done: Some(on_done),
            echoes,
        }
    }

    fn finish(&mut self, error: Option<&'static str>) {
        if let Some(done) = self.on_done.take() {
            done(Outcome {
                bytes_out: self.bytes,
                error,
            });
        }
    }
}

/// The response body did not finish within the request's deadline.
#[derive(Debug, thiserror::Error)]
#[error("response body exceeded request_timeout")]
pub struct BodyTimeout;

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                // Data ready at every poll must not outrun the deadline either: a client
                // reading slowly keeps the body busy, and is cut here, not by its connection.
                if Instant::now() >= this.deadline {
                    this.finish(Some("request_timeout while streaming the response"));
                    return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
                }
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                    return Poll::Ready(Some(Ok(frame)));
                }
                // Trailers (which reach HTTP/2 clients) get the response headers' cleaning:
                // hop-by-hop fields and any carrying the credential go. They are the body's
                // last frame: the response is complete (an HTTP/1.1 server drops them and
                // asks for nothing more, so the end would otherwise look like a client gone).
                Poll::Ready(Some(Ok(match frame.into_trailers() {
                    Ok(mut trailers) => {
                        headers::clean_response_headers(&mut trailers, &this.echoes);
                        this.finish(None);
                        Frame::trailers(trailers)
                    }
                    Err(other) => other,
                })))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(Some("upstream body error"));
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => {
                this.finish(None);
                Poll::Ready(None)
            }
            Poll::Pending => {
                let deadline = this.deadline;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.as_mut().poll(cx).is_ready() {
                    this.finish(Some("request_timeout while streaming the response"));
                    return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.finish(None);
        } else if Instant::now() >= self.deadline {
            // The connection was closed for it (`server::deadlines`): hyper had stopped
            // asking for more, so this body's own timer never ran.
            self.finish(Some(
                "request_timeout while streaming the response (the client stopped taking it)",
            ));
        } else {
            self.finish(Some("client went away before the response ended"));
        }
    }
}
