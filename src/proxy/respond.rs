//! The one place where a refusal becomes an HTTP response (DESIGN §4.1, §4.3).
//!
//! Who is at fault decides the status: the client (4xx with the DESIGN error code), the upstream
//! (502/504), or the broker itself (500/503 with a fixed text; the detail goes to the log).
//! Descriptions are fixed strings or built from names the caller already knows — never from a
//! token, a secret or a credential.

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::ProxyBody;

/// Why the broker answered instead of the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// Check 1: the request is malformed or ambiguous (400 `invalid_request`).
    InvalidRequest(String),
    /// Check 1: request line and headers too large (431).
    HeadersTooLarge,
    /// Check 2: no bearer token was sent (401 without an `error` attribute).
    MissingToken,
    /// Checks 2 and 4: the token is not (or no longer) acceptable (401 `invalid_token`).
    InvalidToken(String),
    /// Check 3: the call is outside what the token and the current config allow (403).
    InsufficientScope(String),
    /// Check 5: a rate limit is exhausted (429), with the seconds to wait.
    RateLimited { retry_after_secs: u64 },
    /// Check 6: the body is larger than the operation allows (413).
    RequestTooLarge(u64),
    /// Check 6: the client did not send the body it announced within `request_timeout` (408).
    RequestTimeout,
    /// Check 7: the audit record could not be written (503): nothing was forwarded.
    AuditUnavailable,
    /// A dynamic credential could not be obtained (502): nothing was forwarded.
    CredentialUnavailable,
    /// The shared state (Redis, DESIGN §7) did not answer (503): nothing was forwarded.
    StateUnavailable,
    /// Check 8: the upstream failed (502).
    UpstreamUnavailable(String),
    /// Check 8: the upstream did not answer in time (504).
    UpstreamTimeout,
    /// The listener has as many HTTP/2 requests in flight as it takes (`max_connections`),
    /// and refuses more at once (503, `Retry-After: 1`) rather than buffer without bound.
    Overloaded,
    /// A route that does not exist on this listener (404).
    NotFound,
    /// A known route with the wrong method (405).
    MethodNotAllowed,
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::MissingToken | Self::InvalidToken(_) => StatusCode::UNAUTHORIZED,
            Self::InsufficientScope(_) => StatusCode::FORBIDDEN,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::RequestTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::AuditUnavailable | Self::StateUnavailable | Self::Overloaded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::CredentialUnavailable | Self::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// The DESIGN error code, also used as the audit `reason`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "invalid_request",
            Self::HeadersTooLarge => "request_header_fields_too_large",
            Self::MissingToken | Self::InvalidToken(_) => "invalid_token",
            Self::InsufficientScope(_) => "insufficient_scope",
            Self::RateLimited { .. } => "rate_limited",
            Self::RequestTooLarge(_) => "request_too_large",
            Self::RequestTimeout => "request_timeout",
            Self::AuditUnavailable => "audit_unavailable",
            Self::CredentialUnavailable => "credential_unavailable",
            Self::StateUnavailable => "state_unavailable",
            Self::Overloaded => "overloaded",
            Self::UpstreamUnavailable(_) => "upstream_unavailable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
        }
    }

    pub fn description(&self) -> String {
        match self {
            Self::InvalidRequest(d) | Self::InvalidToken(d) | Self::InsufficientScope(d) => {
                d.clone()
            }
            Self::HeadersTooLarge => "request line and headers are too large".into(),
            Self::MissingToken => "a bearer token is required".into(),
            Self::RateLimited { retry_after_secs } => {
                format!("rate limit exceeded; retry after {retry_after_secs} s")
            }
            Self::RequestTooLarge(max) => format!("request body exceeds {max} bytes"),
            Self::RequestTimeout => "the request body did not arrive in time".into(),
            Self::AuditUnavailable => {
                "the audit log cannot be written; nothing was forwarded".into()
            }
            Self::CredentialUnavailable => {
                "no upstream credential could be obtained; nothing was forwarded".into()
            }
            Self::StateUnavailable => {
                "the shared revocation and rate-limit state cannot be reached; nothing was forwarded"
                    .into()
            }
            Self::UpstreamUnavailable(d) => format!("upstream unavailable: {d}"),
            Self::UpstreamTimeout => "the upstream did not answer in time".into(),
            Self::Overloaded => "too many requests in flight; retry shortly".into(),
            Self::NotFound => "no such endpoint".into(),
            Self::MethodNotAllowed => "method not allowed on this endpoint".into(),
        }
    }

    /// The complete JSON error response, with `x-request-id` set by the caller.
    pub fn into_response(self, request_id: &str) -> Response<ProxyBody> {
        let mut body = serde_json::json!({
            "error": self.code(),
            "error_description": self.description(),
        });
        if !request_id.is_empty() {
            body["request_id"] = request_id.into();
        }
        let mut resp = json_response(self.status(), &body);
        let headers = resp.headers_mut();
        match &self {
            Self::MissingToken => {
                headers.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"credbroker\""),
                );
            }
            Self::InvalidToken(_) => {
                headers.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static(
                        "Bearer realm=\"credbroker\", error=\"invalid_token\"",
                    ),
                );
            }
            Self::InsufficientScope(_) => {
                headers.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static(
                        "Bearer realm=\"credbroker\", error=\"insufficient_scope\"",
                    ),
                );
            }
            Self::RateLimited { retry_after_secs } => {
                headers.insert(RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            // Both pass (a burst, a disk that recovers): say when to come back.
            Self::Overloaded | Self::AuditUnavailable => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        resp
    }
}

/// A JSON body with `Cache-Control: no-store` (every broker answer may concern credentials).
pub fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response<ProxyBody> {
    // Plain data (strings, numbers, maps with string keys) cannot fail to serialise.
    let bytes = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
    let mut resp = Response::new(full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A complete body as a [`ProxyBody`].
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_token_has_no_error_attribute() {
        let r = Refusal::MissingToken.into_response("rid");
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()[WWW_AUTHENTICATE], "Bearer realm=\"credbroker\"");
        let r = Refusal::InvalidToken("expired".into()).into_response("rid");
        assert!(r.headers()[WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .contains("error=\"invalid_token\""));
    }

    #[test]
    fn rate_limited_carries_retry_after() {
        let r = Refusal::RateLimited {
            retry_after_secs: 3,
        }
        .into_response("rid");
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[RETRY_AFTER], "3");
    }
}
