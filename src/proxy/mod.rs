//! The proxy: DESIGN §4.3's checks in order ([`pipeline`]), the canonical request check,
//! header hygiene, credential injection, forwarding, and the one place refusals become
//! responses.

pub mod body;
pub mod canonical;
pub mod forward;
pub mod headers;
pub mod inject;
pub mod pipeline;
pub(crate) mod redact;
pub mod respond;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;

/// Errors carried by streamed bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every response body the broker sends, and every request body it forwards.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;
