//! Header hygiene (DESIGN §4.3 "Forwarding"): what the upstream never sees from the client,
//! and what the client never sees from the upstream.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::inject::Echoes;

/// Request headers that never leave the broker. `Host` is the upstream's, `x-request-id` is the
/// broker's own, credentials and cookies are the client's business with the broker only.
/// `Expect: 100-continue` was answered by the broker's own listener when the body was read.
const STRIPPED_REQUEST: &[HeaderName] = &[
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    header::COOKIE,
    header::HOST,
    header::FORWARDED,
    header::EXPECT,
];

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the legacy `Proxy-Connection`.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
];

/// Headers some upstream stacks take as the request's real method or target: an allowlisted
/// GET must not turn into a DELETE upstream (method-override headers, DESIGN §4.3), nor
/// `/repos/x` into another path (`X-Original-URL` and `X-Rewrite-URL`, read by IIS URL
/// Rewrite and by frameworks behind it): the path checked is the path that runs.
const REQUEST_OVERRIDES: &[&str] = &[
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-method",
    "x-original-url",
    "x-rewrite-url",
];

/// Names listed in `Connection` headers: hop-by-hop by declaration. Read as bytes: a value
/// that is not all visible ASCII (obs-text) must not hide the names it lists.
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
        .collect()
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// The headers to send upstream: the client's, minus everything §4.3 removes. The caller adds
/// `x-request-id`, `X-Forwarded-*` and the credential afterwards.
pub fn upstream_request_headers(client: &HeaderMap, injected: Option<&HeaderName>) -> HeaderMap {
    let listed = if client.contains_key(header::CONNECTION) {
        connection_listed(client)
    } else {
        Vec::new()
    };
    // Room for what the caller adds (request id, X-Forwarded-*, credential): no regrowth.
    let mut out = HeaderMap::with_capacity(client.len() + 4);
    for (name, value) in client {
        if removed(name, &listed, injected)
            // One framing, stated once: an HTTP/2 request may repeat an identical
            // `content-length` (HTTP/1.1 parsing has folded it already), and a strict
            // HTTP/1.1 upstream refuses two.
            || (name == header::CONTENT_LENGTH && out.contains_key(header::CONTENT_LENGTH))
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// Whether §4.3 removes a client header (`listed`: the names `Connection` lists). A name
/// spelled with `_` for `-` is removed as the dashed name is: CGI-style servers (CGI, many
/// WSGI servers, Rack before CVE-2024-45614's fix) read `X_HTTP_Method_Override` as
/// `X-HTTP-Method-Override` and `X_Forwarded_For` as `X-Forwarded-For`.
fn removed(name: &HeaderName, listed: &[HeaderName], injected: Option<&HeaderName>) -> bool {
    let n = name.as_str();
    if n.contains('_') {
        let dashed = HeaderName::from_bytes(n.replace('_', "-").as_bytes());
        if dashed.is_ok_and(|dashed| removed(&dashed, listed, injected)) {
            return true;
        }
    }
    STRIPPED_REQUEST.contains(name)
        || is_hop_by_hop(name)
        || REQUEST_OVERRIDES.contains(&n)
        || n.starts_with("x-forwarded-")
        || n == "x-request-id"
        || listed.contains(name)
        || injected == Some(name)
}

/// Cleans an upstream response's headers in place: hop-by-hop headers go, and so does any
/// header whose value (or, however contrived, name) carries the injected credential in any
/// form it was sent in (an echo would hand it to the client).
pub fn clean_response_headers(headers: &mut HeaderMap, echoes: &Echoes) {
    // One pass over the headers, which names no list: this runs on every response, and the
    // usual one has nothing to drop but `Connection: keep-alive`.
    let connection = headers.get_all(header::CONNECTION);
    let listed = |name: &HeaderName| {
        connection
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .any(|token| {
                token
                    .trim_ascii()
                    .eq_ignore_ascii_case(name.as_str().as_bytes())
            })
    };
    let mut has_connection = false;
    let mut doomed: Vec<HeaderName> = Vec::new();
    for (name, value) in headers.iter() {
        if name == header::CONNECTION {
            has_connection = true;
            continue;
        }
        if doomed.contains(name) {
            continue;
        }
        if is_hop_by_hop(name) || listed(name) {
            doomed.push(name.clone());
        } else if echoes.found_in_name(name) {
            // The name itself carries the credential: it is not logged either.
            tracing::warn!("upstream response header named with the credential; dropped");
            doomed.push(name.clone());
        } else if echoes.found_in(value.as_bytes()) {
            // Removing drops every value of the name; an echo taints the whole header.
            tracing::warn!(header = %name, "upstream response header echoed the credential; dropped");
            doomed.push(name.clone());
        }
    }
    if has_connection {
        headers.remove(header::CONNECTION);
    }
    for name in doomed {
        headers.remove(&name);
    }
}

/// Makes the response's `Content-Length` say what the client will get. hyper reads the body
/// right — `Transfer-Encoding` over `Content-Length`, a list of equal lengths as one — but
/// leaves the header as the upstream sent it, and forwarding that would frame the answer
/// wrongly (RFC 9112 §6.3: an intermediary removes `Content-Length` when the message also has
/// `Transfer-Encoding`). So: none on a 1xx or 204; left alone where it describes a body that
/// is not sent (a HEAD request, a 304); otherwise the body's exact length, or none when the
/// length is not known in advance. Called before the hop-by-hop headers go.
pub fn normalize_content_length(
    headers: &mut HeaderMap,
    status: http::StatusCode,
    head_request: bool,
    exact_length: Option<u64>,
) {
    if status.is_informational() || status == http::StatusCode::NO_CONTENT {
        headers.remove(header::CONTENT_LENGTH);
        return;
    }
    if head_request
        || status == http::StatusCode::NOT_MODIFIED
        || !headers.contains_key(header::CONTENT_LENGTH)
    {
        return;
    }
    match exact_length {
        Some(n) if !headers.contains_key(header::TRANSFER_ENCODING) => {
            // Usually it already says so: then nothing is rebuilt (this runs on every call).
            let says = headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if says != Some(n) {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            }
        }
        _ => {
            headers.remove(header::CONTENT_LENGTH);
        }
    }
}

/// Whether `Transfer-Encoding` (all its lines) is anything but one `chunked`, which hyper
/// decodes: forwarding such a body after dropping the header would relabel, say, gzip bytes
/// as plain ones (RFC 9112 §6.1: not understood → refused), and `chunked` applied twice
/// (RFC 9112 §7.1 forbids it) would have hyper decode one layer and forward the other as
/// the body.
pub fn has_other_transfer_coding(headers: &HeaderMap) -> bool {
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','));
    match (codings.next(), codings.next()) {
        (None, _) => false,
        (Some(only), None) => !only.trim_ascii().eq_ignore_ascii_case(b"chunked"),
        (Some(_), Some(_)) => true,
    }
}

/// Whether a field value starts or ends with a space or tab (malformed in HTTP/2).
pub fn has_edge_whitespace(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    let edge = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
    edge(bytes.first()) || edge(bytes.last())
}

/// What [`host_is_unambiguous`] asks, for the refusal.
pub const HOST_RULE: &str = "an HTTP/1.1 request needs exactly one Host header, an HTTP/2 one an \
     :authority or one Host, the same when both are sent";

/// RFC 9112 §3.2: an HTTP/1.1 request carries exactly one `Host`; RFC 9113 §8.3.1: an HTTP/2
/// one an `:authority` or a `Host` — at most one `Host`, the same as the `:authority` when
/// both are there (checked by the proxy and the token endpoint alike).
pub fn host_is_unambiguous(version: http::Version, uri: &http::Uri, headers: &HeaderMap) -> bool {
    let mut hosts = headers.get_all(header::HOST).iter();
    let (first, second) = (hosts.next(), hosts.next());
    match version {
        http::Version::HTTP_11 => first.is_some() && second.is_none(),
        http::Version::HTTP_2 => match (uri.authority(), first, second) {
            (_, _, Some(_)) | (None, None, _) => false,
            // Host names compare without case, and a scheme's default port is the same as
            // none (RFC 9110 §4.2.3).
            (Some(authority), Some(host), None) => {
                let scheme = uri.scheme_str();
                without_default_port(authority.as_str().as_bytes(), scheme)
                    .eq_ignore_ascii_case(without_default_port(host.as_bytes(), scheme))
            }
            _ => true,
        },
        _ => true,
    }
}

/// `authority` without an empty port or the default port of `scheme` (`:443` for https, `:80`
/// for http): `example.com:443` and `example.com` name the same origin over TLS.
fn without_default_port<'a>(authority: &'a [u8], scheme: Option<&str>) -> &'a [u8] {
    let default: &[u8] = match scheme {
        Some("https") => b":443",
        Some("http") => b":80",
        _ => b":",
    };
    let trimmed = authority.strip_suffix(default).unwrap_or(authority);
    trimmed.strip_suffix(b":").unwrap_or(trimmed)
}

/// RFC 9113 §8.1.1 and RFC 9112 §6.3: two `content-length` values that differ make the
/// request malformed. hyper and h2 refuse values that differ in number themselves (a 400, an
/// HTTP/2 stream reset, before any check runs, so unrecorded); this refuses, on every
/// version, the same length written two ways (`3` and `03`), which they let through.
pub fn content_lengths_agree(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let first = values.next();
    values.all(|v| Some(v) == first)
}

/// Adds the broker's own forwarding headers, replacing whatever the client sent.
pub fn add_forwarding_headers(
    headers: &mut HeaderMap,
    peer_ip: Option<&HeaderValue>,
    proto: &'static str,
) {
    if let Some(v) = peer_ip {
        headers.insert(HeaderName::from_static("x-forwarded-for"), v.clone());
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(proto),
    );
}

/// RFC 9110 §7.6.3: a gateway adds itself to `Via` on every request it forwards, after the
/// hops the client listed, naming the protocol version it received the request in.
pub fn add_via(headers: &mut HeaderMap, received: http::Version) {
    let hop = match received {
        http::Version::HTTP_2 => "2 credbroker",
        http::Version::HTTP_10 => "1.0 credbroker",
        _ => "1.1 credbroker",
    };
    headers.append(header::VIA, HeaderValue::from_static(hop));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn an_http2_host_agrees_with_its_authority_up_to_case_and_default_port() {
        let h2 = |uri: &str, hosts: &[&str]| {
            let pairs: Vec<_> = hosts.iter().map(|h| ("host", *h)).collect();
            host_is_unambiguous(http::Version::HTTP_2, &uri.parse().unwrap(), &map(&pairs))
        };
        assert!(h2("https://api.example/p", &["API.example"]));
        assert!(h2("https://api.example/p", &["api.example:443"]));
        assert!(h2("https://api.example:443/p", &["api.example"]));
        assert!(h2("http://api.example:80/p", &["api.example:"]));
        assert!(h2("https://[::1]:443/p", &["[::1]"]));
        assert!(!h2("https://api.example/p", &["api.example:80"]));
        assert!(!h2("https://api.example/p", &["api.example:8443"]));
        assert!(!h2("http://api.example/p", &["api.example:443"]));
        assert!(!h2("https://api.example/p", &["other.example"]));
        assert!(!h2(
            "https://api.example/p",
            &["api.example", "api.example"]
        ));
    }

    #[test]
    fn differing_content_lengths_do_not_agree() {
        assert!(content_lengths_agree(&map(&[])));
        assert!(content_lengths_agree(&map(&[("content-length", "5")])));
        assert!(content_lengths_agree(&map(&[
            ("content-length", "5"),
            ("content-length", "5")
        ])));
        assert!(!content_lengths_agree(&map(&[
            ("content-length", "5"),
            ("content-length", "6")
        ])));
    }

    #[test]
    fn request_hygiene_removes_everything_listed() {
        let h = map(&[
            ("authorization", "Bearer t"),
            ("proxy-authorization", "x"),
            ("cookie", "a=b"),
            ("expect", "100-continue"),
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "5"),
            ("te", "trailers"),
            ("trailer", "x"),
            ("upgrade", "h2c"),
            ("proxy-connection", "x"),
            ("x-http-method-override", "DELETE"),
            ("x-http-method", "DELETE"),
            ("x-method-override", "DELETE"),
            ("forwarded", "for=1.2.3.4"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-host", "evil"),
            ("x-request-id", "client-chosen"),
            ("x-original-url", "/admin"),
            ("x-rewrite-url", "/admin"),
            ("x-original-method", "DELETE"),
            ("host", "broker"),
            ("accept", "application/json"),
            ("user-agent", "bot"),
        ]);
        let out = upstream_request_headers(&h, None);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["accept", "user-agent"]);
    }

    /// CGI-style servers read `_` as `-`: the underscore spelling of a removed header is
    /// removed too; other names with `_` are the client's own and pass.
    #[test]
    fn underscore_spellings_of_removed_headers_are_removed() {
        let h = map(&[
            ("x_http_method_override", "DELETE"),
            ("x_http_method", "DELETE"),
            ("x_method_override", "DELETE"),
            ("x_original_url", "/admin"),
            ("x_forwarded_for", "6.6.6.6"),
            ("x_forwarded_host", "evil"),
            ("x-forwarded_proto", "https"),
            ("proxy_authorization", "Basic abc"),
            ("transfer_encoding", "chunked"),
            ("x_request_id", "client-chosen"),
            ("connection", "x-hop"),
            ("x_hop", "1"),
            ("x_api_version", "3"),
            ("accept", "application/json"),
        ]);
        let out = upstream_request_headers(&h, None);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x_api_version", "accept"]);
    }

    #[test]
    fn a_connection_value_with_obs_text_still_names_its_headers() {
        let obs = HeaderValue::from_bytes(b"x-hop, \xff, keep-alive").unwrap();
        assert!(obs.to_str().is_err(), "not visible ASCII");
        let mut h = map(&[("x-hop", "1"), ("accept", "*/*")]);
        h.insert(header::CONNECTION, obs.clone());
        let out = upstream_request_headers(&h, None);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["accept"]);
        // And on the way back.
        let echoes = Echoes::new(
            &crate::config::AuthMethod::Bearer,
            &crate::secret::Secret::new("real-credential-123"),
        );
        let mut h = map(&[("x-hop", "1"), ("content-type", "text/plain")]);
        h.insert(header::CONNECTION, obs);
        clean_response_headers(&mut h, &echoes);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type"]);
    }

    #[test]
    fn only_chunked_counts_as_an_understood_transfer_coding() {
        assert!(!has_other_transfer_coding(&map(&[])));
        assert!(!has_other_transfer_coding(&map(&[(
            "transfer-encoding",
            " Chunked "
        )])));
        assert!(has_other_transfer_coding(&map(&[(
            "transfer-encoding",
            "gzip, chunked"
        )])));
        assert!(has_other_transfer_coding(&map(&[(
            "transfer-encoding",
            "identity"
        )])));
        // `chunked` twice: hyper would decode one layer and forward the other as the body.
        assert!(has_other_transfer_coding(&map(&[(
            "transfer-encoding",
            "chunked, chunked"
        )])));
        assert!(has_other_transfer_coding(&map(&[
            ("transfer-encoding", "chunked"),
            ("transfer-encoding", "chunked"),
        ])));
    }

    #[test]
    fn content_length_says_what_the_client_gets() {
        use http::StatusCode;
        let cl = |h: &HeaderMap| {
            h.get("content-length")
                .map(|v| v.to_str().unwrap().to_owned())
        };
        // Both framings: the chunked body wins and the length goes.
        let mut h = map(&[("content-length", "3"), ("transfer-encoding", "chunked")]);
        normalize_content_length(&mut h, StatusCode::OK, false, None);
        assert_eq!(cl(&h), None);
        // A list of equal lengths becomes one.
        let mut h = map(&[("content-length", "5, 5")]);
        normalize_content_length(&mut h, StatusCode::OK, false, Some(5));
        assert_eq!(cl(&h).as_deref(), Some("5"));
        // None on a 204; untouched for HEAD and 304, where no body follows.
        let mut h = map(&[("content-length", "5")]);
        normalize_content_length(&mut h, StatusCode::NO_CONTENT, false, Some(0));
        assert_eq!(cl(&h), None);
        for (status, head) in [(StatusCode::OK, true), (StatusCode::NOT_MODIFIED, false)] {
            let mut h = map(&[("content-length", "1000")]);
            normalize_content_length(&mut h, status, head, Some(0));
            assert_eq!(cl(&h).as_deref(), Some("1000"));
        }
        // No length is made up where there was none.
        let mut h = map(&[]);
        normalize_content_length(&mut h, StatusCode::OK, false, Some(7));
        assert_eq!(cl(&h), None);
    }

    #[test]
    fn hop_by_hop_response_headers_go_on_either_path() {
        let echoes = Echoes::new(
            &crate::config::AuthMethod::Bearer,
            &crate::secret::Secret::new("real-credential-123"),
        );
        let names = |h: &HeaderMap| {
            let mut n: Vec<String> = h.keys().map(|k| k.to_string()).collect();
            n.sort();
            n
        };
        // The usual answer: only Connection goes.
        let mut h = map(&[
            ("connection", "keep-alive"),
            ("content-type", "application/json"),
            ("date", "Thu, 26 Nov 2026 18:00:00 GMT"),
        ]);
        clean_response_headers(&mut h, &echoes);
        assert_eq!(names(&h), ["content-type", "date"]);
        // Nothing to drop: nothing changes.
        clean_response_headers(&mut h, &echoes);
        assert_eq!(names(&h), ["content-type", "date"]);
        // A header Connection names, and the fixed hop-by-hop set, go as well.
        let mut h = map(&[
            ("connection", "Keep-Alive, X-Private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("trailer", "x-sum"),
            ("proxy-connection", "keep-alive"),
            ("etag", "abc"),
        ]);
        clean_response_headers(&mut h, &echoes);
        assert_eq!(names(&h), ["etag"]);
        // Without Connection, a hop-by-hop header alone still goes.
        let mut h = map(&[("upgrade", "h2c"), ("etag", "abc")]);
        clean_response_headers(&mut h, &echoes);
        assert_eq!(names(&h), ["etag"]);
    }

    #[test]
    fn echoed_credential_is_dropped_from_responses() {
        let mut h = map(&[
            ("x-echo", "Bearer real-credential-123"),
            ("etag", "abc"),
            ("connection", "close"),
        ]);
        let echoes = Echoes::new(
            &crate::config::AuthMethod::Bearer,
            &crate::secret::Secret::new("real-credential-123"),
        );
        clean_response_headers(&mut h, &echoes);
        assert!(h.get("x-echo").is_none());
        assert!(h.get("connection").is_none());
        assert_eq!(h["etag"], "abc");
        // In a name too (parsed names are lower case): the whole header goes.
        let mut h = map(&[("x-real-credential-123-seen", "1"), ("etag", "abc")]);
        let echoes = Echoes::new(
            &crate::config::AuthMethod::Bearer,
            &crate::secret::Secret::new("Real-Credential-123"),
        );
        clean_response_headers(&mut h, &echoes);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["etag"], "abc");
    }
}
