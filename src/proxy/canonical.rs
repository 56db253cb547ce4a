//! The canonical request check (DESIGN §4.3, check 1): the raw request path and query are
//! refused unless they are in a form that every upstream reads the same way, because the path
//! that is matched against the allowlist is the path that is forwarded, byte for byte —
//! nothing here decodes or normalises, it only says yes or no.
//!
//! Also the query helpers the pipeline needs: parameter names, percent-decoding, and the
//! "does the client already send this parameter" test used for `access_token` and for the
//! `auth = { type = "query" }` injection (§3.8).

use http::Uri;
use thiserror::Error;

/// Why a request target is not canonical. Every variant is answered with 400
/// `invalid_request`; the message names the rule and never echoes the offending bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CanonicalError {
    /// The request target is absolute-form (`http://host/path`) or authority-form
    /// (`host:port`): it carries a scheme or an authority. Only origin-form is accepted.
    #[error("request target must be origin-form (a path), not absolute or authority form")]
    NotOriginForm,
    /// The path does not start with `/` (empty, or asterisk-form `*`).
    #[error("request path must start with '/'")]
    NoLeadingSlash,
    /// The path has an empty segment: `//` or a trailing `/` (only the root path `/` may end in `/`).
    #[error("request path has an empty segment ('//' or a trailing '/')")]
    EmptySegment,
    /// The path has a `.` or `..` segment.
    #[error("request path has a '.' or '..' segment")]
    DotSegment,
    /// The path contains a backslash, which some servers treat as `/`.
    #[error("request path contains a backslash")]
    Backslash,
    /// The path contains `;`, which some servers treat as a path-parameter delimiter.
    #[error("request path contains ';'")]
    Semicolon,
    /// The path contains `?`; the query must be passed separately (`uri.path()` never has one).
    #[error("request path contains '?'")]
    QuestionMark,
    /// A control byte (0x00–0x1F, 0x7F) or a space.
    #[error("request target contains a control byte or a space")]
    ControlOrSpace,
    /// A byte of 0x80 or above (non-ASCII); such bytes must be percent-encoded.
    #[error("request target contains a non-ASCII byte")]
    NonAscii,
    /// A `#` fragment; fragments are never sent to a server.
    #[error("request target contains a '#' fragment")]
    Fragment,
    /// A `%` not followed by two hex digits.
    #[error("request target has a malformed percent-encoding")]
    MalformedPercent,
    /// The path percent-encodes `/`, `\`, `.`, `%`, a control byte or a byte >= 0x80
    /// (`%2f`, `%2e`, `%5c`, `%25`, overlong `%c0%ae`, full-width `%ef%bc%8f`, ...).
    #[error("request path percent-encodes a character that must not be encoded there")]
    ForbiddenEncoding,
    /// The query has an `access_token` parameter: the token belongs in the `Authorization`
    /// header only (RFC 6750 §2.3 is not supported).
    #[error("the access token must be sent in the Authorization header, not in the query")]
    AccessTokenInQuery,
}

/// Checks a request target as hyper parsed it: origin-form, canonical path, clean query.
///
/// `uri` is the request's `req.uri()`; the fragment, if the client sent one, is already gone
/// (see [`check_path`]).
pub fn check_target(uri: &Uri) -> Result<(), CanonicalError> {
    if uri.scheme().is_some() || uri.authority().is_some() {
        return Err(CanonicalError::NotOriginForm);
    }
    check_path(uri.path())?;
    uri.query().map_or(Ok(()), check_query)
}

/// Checks the raw path of the request target (as received, before any decoding; hyper's
/// `uri.path()`): starts with '/', no empty segment (`//`), no `.` or `..` segment, no backslash,
/// no ';', no control byte or byte >= 0x80 or space, no '#', percent-encoding must be well-formed
/// (`%` + 2 hex) and must not encode `/`, `\`, `.`, `%`, a control byte (00-1F, 7F) or any
/// byte >= 0x80 (so `%2e`, `%2E`, `%2f`, `%5c`, `%25`, `%c0%ae`, `%ef%bc%8f` … are refused). Other
/// percent-encodings (e.g. `%20`, `%40`) are allowed and forwarded as they are.
///
/// Only the root path `/` may end in `/`: a trailing slash is an empty segment, and no
/// pattern can match one. A `?` is refused too (a path never contains one).
///
/// What hyper 1.x (http 1.x, httparse) hands the service for an HTTP/1.1 request target —
/// recorded by the test `hyper_request_target_behaviour` below:
/// - `#` fragment: hyper does **not** refuse it; the `http` crate drops `#…` silently, so
///   `GET /a?x=1#frag` arrives as path `/a`, query `x=1`. The fragment is thus dropped and can
///   never be forwarded as long as the broker forwards `uri.path()`/`uri.query()`, never raw bytes.
/// - non-ASCII: a target that is valid UTF-8 (`/caf\xc3\xa9`, `?q=\xc3\xa9`) is **accepted**
///   and reaches the service as is; invalid UTF-8 (`\xff`), control bytes, a tab and
///   `` ` `` / `<` / `>` are answered 400 by hyper itself. `"`, `{`, `}`, `|`, `^` in the path pass.
/// - no normalisation: `/a/../b`, `//x`, `/a%2fb`, `/a\b`, `/a;b`, `%zz` all reach the service
///   unchanged, so this function is the only guard.
/// - absolute-form (`GET http://evil.example/x?y=1`) is **accepted**: the service sees
///   path `/x`, query `y=1`, `uri.authority()` = `evil.example`, `uri.scheme()` = `http`
///   (also for `HTTP://`). Authority-form (`GET host:443`) gives an empty path and an authority;
///   asterisk-form gives path `*`. The service must therefore refuse any request with
///   `uri.authority().is_some()` or `uri.scheme().is_some()` — [`check_target`] does — and
///   not rely on this function alone (absolute-form yields a path that passes it).
pub fn check_path(path: &str) -> Result<(), CanonicalError> {
    let rest = path
        .strip_prefix('/')
        .ok_or(CanonicalError::NoLeadingSlash)?;
    check_path_bytes(path.as_bytes())?;
    if rest.is_empty() {
        return Ok(());
    }
    // By bytes: paths are short, and `str::split`'s searcher costs more to set up per
    // segment than the segment costs to scan (`/` is ASCII, never inside a UTF-8 sequence).
    for segment in rest.as_bytes().split(|&b| b == b'/') {
        match segment {
            b"" => return Err(CanonicalError::EmptySegment),
            b"." | b".." => return Err(CanonicalError::DotSegment),
            _ => {}
        }
    }
    Ok(())
}

/// Checks the raw query: no control byte, byte >= 0x80, space, '#'; well-formed percent-encoding;
/// refuses a parameter named `access_token` → [`CanonicalError::AccessTokenInQuery`].
///
/// The name is compared after percent-decoding (`access%5Ftoken` is refused) and, unlike
/// RFC 6750's exact name, ASCII case-insensitively: some upstream frameworks (ASP.NET, for one)
/// bind query names case-insensitively, and refusing `Access_Token` costs nothing. Parameters
/// split on `;` as well as `&` (see [`query_names`]). Percent-encoded non-ASCII is allowed in
/// the query (search terms need it); the query is forwarded as it is.
pub fn check_query(query: &str) -> Result<(), CanonicalError> {
    let bytes = query.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                decode_escape(bytes, i).ok_or(CanonicalError::MalformedPercent)?;
                i += 3;
                continue;
            }
            b'#' => return Err(CanonicalError::Fragment),
            b => check_common_byte(b)?,
        }
        i += 1;
    }
    if query_has_param(query, "access_token") {
        return Err(CanonicalError::AccessTokenInQuery);
    }
    Ok(())
}

/// Splits a proxy path at its connector: `/github/repos/x` → (`github`, `/repos/x`), and
/// `/github` → (`github`, `/`). The connector is empty when the path starts with `//` or is `/`.
/// Nothing is decoded or normalised: the rest is forwarded byte for byte.
pub fn split_target(path: &str) -> (&str, &str) {
    let rest = path.strip_prefix('/').unwrap_or(path);
    // A byte search (see `check_path`): `/` is ASCII, so `i` is a char boundary.
    match rest.bytes().position(|b| b == b'/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    }
}

/// Iterates the raw names of query parameters (`a=1&b&c=` → a, b, c), skipping empty pieces.
///
/// Pieces are separated by `&` and also by `;`, which some servers still accept as a
/// separator: `a=1;access_token=x` must not hide a parameter from the checks. A value holding
/// a `;` therefore shows up as an extra name, and an operation's `query` allowlist refuses it —
/// fail closed.
pub fn query_names(query: &str) -> impl Iterator<Item = &str> {
    query
        .split(['&', ';'])
        .filter(|piece| !piece.is_empty())
        .map(|piece| piece.split_once('=').map_or(piece, |(name, _)| name))
}

/// Percent-decodes into bytes, keeping a malformed escape as it is (for searching text as a
/// lenient upstream or client would read it).
pub fn percent_decode_lossy(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], decode_escape(bytes, i)) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// Percent-decodes into bytes (for comparing names); invalid sequences → None.
///
/// `+` is left as is (this is URI decoding, not form decoding).
pub fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            out.push(decode_escape(bytes, i)?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// True if the query has a parameter that names `name` (see [`names_param`]).
pub fn query_has_param(query: &str, name: &str) -> bool {
    query_names(query).any(|raw| names_param(raw, name))
}

/// Whether a raw query parameter name stands for `name`: its percent-decoded bytes are `name`
/// (ASCII case-insensitive, and with `.`, space and `[` read as `_`, as PHP rewrites them), or
/// `name` followed by a byte that cannot continue a name — the array and map forms `name[]`,
/// `name[0]`, `name.x` that PHP, Rails and others bind to `name`, and `name%3D…`, a whole
/// `name=value` encoded into a name. Longer names such as `api_keys` or `access_token_hint` do
/// not. A name that does not decode is compared as it is.
pub fn names_param(raw: &str, name: &str) -> bool {
    let decoded = percent_decode(raw);
    let bytes = decoded.as_deref().unwrap_or(raw.as_bytes());
    // PHP drops leading spaces (`+` is a space in a form) and reads `.`, space and `[` as `_`.
    let start = bytes
        .iter()
        .take_while(|&&b| b == b' ' || b == b'+')
        .count();
    let bytes = &bytes[start..];
    let php = |b: u8| match b {
        b'.' | b' ' | b'+' | b'[' => b'_',
        b => b.to_ascii_lowercase(),
    };
    match bytes.get(..name.len()) {
        Some(head)
            if head
                .iter()
                .zip(name.as_bytes())
                .all(|(&h, &n)| php(h) == php(n)) =>
        {
            bytes
                .get(name.len())
                .is_none_or(|&next| !(next.is_ascii_alphanumeric() || next == b'_' || next == b'-'))
        }
        _ => false,
    }
}

/// The byte rules of the path, in one pass.
fn check_path_bytes(bytes: &[u8]) -> Result<(), CanonicalError> {
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let decoded = decode_escape(bytes, i).ok_or(CanonicalError::MalformedPercent)?;
                if is_forbidden_encoded(decoded) {
                    return Err(CanonicalError::ForbiddenEncoding);
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(CanonicalError::Backslash),
            b';' => return Err(CanonicalError::Semicolon),
            b'?' => return Err(CanonicalError::QuestionMark),
            b'#' => return Err(CanonicalError::Fragment),
            b => check_common_byte(b)?,
        }
        i += 1;
    }
    Ok(())
}

/// Rules shared by path and query: no control byte, space or non-ASCII byte.
fn check_common_byte(b: u8) -> Result<(), CanonicalError> {
    match b {
        0x00..=0x20 | 0x7f => Err(CanonicalError::ControlOrSpace),
        0x80..=0xff => Err(CanonicalError::NonAscii),
        _ => Ok(()),
    }
}

/// Bytes that must not be smuggled into a path segment by percent-encoding: they would
/// become separators, dot segments, double encodings or non-ASCII once an upstream decodes.
fn is_forbidden_encoded(b: u8) -> bool {
    matches!(b, b'/' | b'\\' | b'.' | b'%' | 0x00..=0x1f | 0x7f | 0x80..=0xff)
}

/// Decodes the `%XX` escape starting at `bytes[at]` (which is `%`); `None` if malformed.
fn decode_escape(bytes: &[u8], at: usize) -> Option<u8> {
    let hi = hex_value(*bytes.get(at + 1)?)?;
    let lo = hex_value(*bytes.get(at + 2)?)?;
    Some(hi << 4 | lo)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;

    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::{Request, Response};
    use hyper_util::rt::TokioIo;
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::policy::Pattern;
    use CanonicalError::*;

    #[test]
    fn accepts_canonical_paths() {
        for path in [
            "/",
            "/repos/acme/widget/issues",
            "/a/b%20c/%40d",
            "/a/%41%7e",
            "/a.b/..c/c../...",
            "/a/{x}/\"|^",
            "/~user/x-y_z",
        ] {
            assert_eq!(check_path(path), Ok(()), "{path:?}");
        }
    }

    #[test]
    fn refuses_non_canonical_paths() {
        let cases: &[(&str, CanonicalError)] = &[
            ("", NoLeadingSlash),
            ("*", NoLeadingSlash),
            ("a/b", NoLeadingSlash),
            ("//", EmptySegment),
            ("//evil.example/x", EmptySegment),
            ("/a//b", EmptySegment),
            ("/a/", EmptySegment),
            ("/.", DotSegment),
            ("/a/./b", DotSegment),
            ("/a/..", DotSegment),
            ("/../etc/passwd", DotSegment),
            ("/a\\b", Backslash),
            ("/a;b", Semicolon),
            ("/a;jsessionid=1", Semicolon),
            ("/a?b", QuestionMark),
            ("/a#b", Fragment),
            ("/a b", ControlOrSpace),
            ("/a\tb", ControlOrSpace),
            ("/a\0b", ControlOrSpace),
            ("/a\x7fb", ControlOrSpace),
            ("/caf\u{e9}", NonAscii),
            ("/a\u{ff0f}b", NonAscii),
            ("/a%", MalformedPercent),
            ("/a%2", MalformedPercent),
            ("/a%zz", MalformedPercent),
            ("/a%2g", MalformedPercent),
            ("/a%%41", MalformedPercent),
            ("/a%2fb", ForbiddenEncoding),
            ("/a%2Fb", ForbiddenEncoding),
            ("/%2e%2e/x", ForbiddenEncoding),
            ("/%2E", ForbiddenEncoding),
            ("/a/.%2e", ForbiddenEncoding),
            ("/a%5cb", ForbiddenEncoding),
            ("/a%5Cb", ForbiddenEncoding),
            ("/a%252fb", ForbiddenEncoding),
            ("/%c0%ae%c0%ae/x", ForbiddenEncoding),
            ("/a%ef%bc%8fb", ForbiddenEncoding),
            ("/a%00", ForbiddenEncoding),
            ("/a%1f", ForbiddenEncoding),
            ("/a%7F", ForbiddenEncoding),
            ("/a%0d%0aX-Injected:%201", ForbiddenEncoding),
        ];
        for (path, want) in cases {
            assert_eq!(check_path(path), Err(*want), "{path:?}");
        }
    }

    #[test]
    fn error_messages_do_not_echo_input() {
        let secret = "/s3cr3t-token;x";
        let msg = check_path(secret).unwrap_err().to_string();
        assert!(!msg.contains("s3cr3t"), "{msg}");
        assert_eq!(msg, "request path contains ';'");
        let msg = check_query("access_token=s3cr3t").unwrap_err().to_string();
        assert!(!msg.contains("s3cr3t"), "{msg}");
    }

    #[test]
    fn query_rules() {
        for query in [
            "",
            "a=1&b&c=",
            "q=caf%C3%A9",
            "a=%2f%2e%25",
            "x=a+b",
            "a=1;b=2",
            "=x",
        ] {
            assert_eq!(check_query(query), Ok(()), "{query:?}");
        }
        let cases: &[(&str, CanonicalError)] = &[
            ("a=b c", ControlOrSpace),
            ("a=\n", ControlOrSpace),
            ("a=\u{e9}", NonAscii),
            ("a=1#frag", Fragment),
            ("a=%zz", MalformedPercent),
            ("a=%", MalformedPercent),
            ("access_token=x", AccessTokenInQuery),
            ("a=1&access_token", AccessTokenInQuery),
            ("a=1&access_token=", AccessTokenInQuery),
            ("access%5Ftoken=x", AccessTokenInQuery),
            ("%61ccess_token=x", AccessTokenInQuery),
            ("Access_Token=x", AccessTokenInQuery),
            ("a=1;access_token=x", AccessTokenInQuery),
        ];
        for (query, want) in cases {
            assert_eq!(check_query(query), Err(*want), "{query:?}");
        }
        // Only the name counts: a value that looks like the name is fine.
        assert_eq!(check_query("x=access_token"), Ok(()));
        assert_eq!(check_query("access_token_hint=1"), Ok(()));
        for hidden in [
            "access_token[]=t",
            "x=1&access_token%3Dt",
            "Access_Token.0=t",
        ] {
            assert_eq!(
                check_query(hidden),
                Err(CanonicalError::AccessTokenInQuery),
                "{hidden}"
            );
        }
    }

    #[test]
    fn query_names_and_params() {
        let names: Vec<&str> = query_names("a=1&b&c=&&=v&d=x=y;e").collect();
        assert_eq!(names, ["a", "b", "c", "", "d", "e"]);
        assert_eq!(query_names("").count(), 0);
        assert!(query_has_param("x=1&API_KEY=2", "api_key"));
        assert!(query_has_param("api%5Fkey=2", "api_key"));
        assert!(query_has_param("a=1&api_key", "api_key"));
        assert!(!query_has_param("x=api_key", "api_key"));
        assert!(!query_has_param("api_keys=1", "api_key"));
        assert!(!query_has_param("api_key-id=1", "api_key"));
        for framework_form in [
            "api_key[]=2",
            "api_key[0]=2",
            "api_key.x=2",
            "API_KEY%5B%5D=2",
        ] {
            assert!(
                query_has_param(framework_form, "api_key"),
                "{framework_form}"
            );
        }
        assert!(
            query_has_param("api_key%3D2", "api_key"),
            "name=value encoded as a name"
        );
        for php_rewrites in [
            "api.key=2",
            "api%20key=2",
            "api[key=2",
            "API.KEY[]=2",
            "api+key=2",
            "+api_key=2",
            "%20api_key=2",
        ] {
            assert!(query_has_param(php_rewrites, "api_key"), "{php_rewrites}");
        }
        assert!(!query_has_param("apixkey=2", "api_key"));
        assert!(query_has_param("a%zz=1", "a%zz"));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb%2fc+d"), Some(b"a/b/c+d".to_vec()));
        assert_eq!(percent_decode("%c0%AE"), Some(vec![0xc0, 0xae]));
        assert_eq!(percent_decode(""), Some(vec![]));
        for bad in ["%", "%2", "%g0", "a%2", "%%"] {
            assert_eq!(percent_decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn target_must_be_origin_form() {
        let ok: Uri = "/a/b?c=1".parse().unwrap();
        assert_eq!(check_target(&ok), Ok(()));
        let absolute: Uri = "http://evil.example/a/b".parse().unwrap();
        assert_eq!(check_target(&absolute), Err(NotOriginForm));
        let authority: Uri = "evil.example:443".parse().unwrap();
        assert_eq!(check_target(&authority), Err(NotOriginForm));
        let star: Uri = "*".parse().unwrap();
        assert_eq!(check_target(&star), Err(NoLeadingSlash));
        let token: Uri = "/a?access_token=x".parse().unwrap();
        assert_eq!(check_target(&token), Err(AccessTokenInQuery));
    }

    /// Starts a hyper http1 server whose service answers with what it saw in the URI.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| {
                    let uri = req.uri();
                    let seen = format!(
                        "path={:?} query={:?} authority={:?} scheme={:?}",
                        uri.path(),
                        uri.query(),
                        uri.authority().map(|a| a.as_str()),
                        uri.scheme_str()
                    );
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(seen)))) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        addr
    }

    /// Sends `GET <target> HTTP/1.1` as raw bytes; returns the status code and the body.
    async fn send_raw(addr: SocketAddr, target: &[u8]) -> (u16, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut req = b"GET ".to_vec();
        req.extend_from_slice(target);
        req.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(&req).await.unwrap();
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8_lossy(&out);
        let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        (status, body.to_owned())
    }

    /// Documents (and pins, so an upgrade that changes it is noticed) what hyper hands the
    /// service for unusual request targets; see the doc comment on `check_path`.
    #[tokio::test]
    async fn hyper_request_target_behaviour() {
        let seen =
            |path: &str, query: Option<&str>, authority: Option<&str>, scheme: Option<&str>| {
                format!("path={path:?} query={query:?} authority={authority:?} scheme={scheme:?}")
            };
        let addr = echo_server().await;
        let cases: Vec<(&[u8], u16, String)> = vec![
            // The fragment is dropped by the http crate before the service sees the URI.
            (b"/a#frag", 200, seen("/a", None, None, None)),
            (b"/a?x=1#frag", 200, seen("/a", Some("x=1"), None, None)),
            // Valid UTF-8 passes hyper; invalid UTF-8 is refused by hyper.
            (b"/caf\xc3\xa9", 200, seen("/caf\u{e9}", None, None, None)),
            (
                b"/a?q=\xc3\xa9",
                200,
                seen("/a", Some("q=\u{e9}"), None, None),
            ),
            (b"/caf\xff", 400, String::new()),
            // Absolute-form is accepted: only the authority/scheme give it away.
            (
                b"http://evil.example/x?y=1",
                200,
                seen("/x", Some("y=1"), Some("evil.example"), Some("http")),
            ),
            (
                b"https://evil.example:8443/a/../b",
                200,
                seen("/a/../b", None, Some("evil.example:8443"), Some("https")),
            ),
            (
                b"evil.example:443",
                200,
                seen("", None, Some("evil.example:443"), None),
            ),
            (b"*", 200, seen("*", None, None, None)),
            // No normalisation at all.
            (
                b"//evil.example/x",
                200,
                seen("//evil.example/x", None, None, None),
            ),
            (b"/a/../b", 200, seen("/a/../b", None, None, None)),
            (b"/a%2fb", 200, seen("/a%2fb", None, None, None)),
            (b"/a\\b", 200, seen("/a\\b", None, None, None)),
            (b"/a;b", 200, seen("/a;b", None, None, None)),
            (b"/a%zz", 200, seen("/a%zz", None, None, None)),
            // Refused by hyper itself.
            (b"/a\x01b", 400, String::new()),
            (b"/a\tb", 400, String::new()),
            (b"/a`b", 400, String::new()),
        ];
        for (target, status, body) in cases {
            let got = send_raw(addr, target).await;
            assert_eq!(got, (status, body), "{:?}", String::from_utf8_lossy(target));
        }
    }

    /// Path pieces for the property tests: segments, dots, slashes, encodings, case variants.
    fn path_piece() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "a",
            "A",
            "repos",
            "Repos",
            "x.y",
            ".",
            "..",
            "/",
            "//",
            "%2e",
            "%2E",
            "%2f",
            "%2F",
            "%5c",
            "%25",
            "%20",
            "%41",
            "%c0%ae",
            "%ef%bc%8f",
            "%",
            "%z",
            ";",
            "\\",
            " ",
            "#",
            "é",
        ])
    }

    proptest! {
        #[test]
        fn accepted_and_matched_paths_are_canonical(
            pieces in prop::collection::vec(path_piece(), 0..10),
        ) {
            let path = format!("/{}", pieces.concat());
            let patterns = ["/", "/{a}", "/{a}/{b}", "/repos/{*rest}", "/{*all}", "/a/{b}/{c}"]
                .map(|p| Pattern::parse(p).unwrap());
            if check_path(&path).is_ok() {
                let matched = patterns.iter().any(|p| p.matches(&path));
                if matched {
                    // What matched is exactly what will be forwarded: nothing was rewritten.
                    let forwarded = path.clone();
                    prop_assert_eq!(&forwarded, &path);
                    let rest = &path[1..];
                    if !rest.is_empty() {
                        prop_assert!(rest.split('/').all(|s| !s.is_empty() && s != "." && s != ".."));
                    }
                    let lower = path.to_ascii_lowercase();
                    for bad in ["%2f", "%2e", "%5c", "%25", "%c0", "%ef", "\\", ";", "#", " "] {
                        prop_assert!(!lower.contains(bad), "{:?} contains {:?}", path, bad);
                    }
                    prop_assert!(path.is_ascii());
                }
            }
        }

        #[test]
        fn checks_never_panic(s in any::<String>()) {
            let _ = check_path(&s);
            let _ = check_query(&s);
            let _ = percent_decode(&s);
            let _ = query_has_param(&s, "access_token");
        }

        #[test]
        fn checks_never_panic_on_url_like_input(s in "[ -~é]{0,40}") {
            let _ = check_path(&s);
            let _ = check_query(&s);
            if check_path(&s).is_ok() {
                prop_assert!(s.starts_with('/') && !s.contains("//") && s.is_ascii());
            }
        }

        #[test]
        fn percent_decode_inverts_encoding(bytes in prop::collection::vec(any::<u8>(), 0..32)) {
            let encoded: String = bytes.iter().map(|b| format!("%{b:02X}")).collect();
            prop_assert_eq!(percent_decode(&encoded), Some(bytes));
        }
    }
}
