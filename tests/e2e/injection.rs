//! DESIGN §3.8: each `auth` type, and refusal of a client-supplied copy.

use crate::support::*;

fn config_with_auth(upstream: std::net::SocketAddr, auth: &str) -> String {
    standard_config(upstream).replace(
        "upstream_request_id_header = \"x-github-request-id\"",
        &format!("upstream_request_id_header = \"x-github-request-id\"\nauth = {auth}"),
    )
}

#[tokio::test]
async fn header_with_prefix() {
    let up =
        FakeUpstream::start_expecting(Expect::Header("x-api-key", format!("Token {CREDENTIAL}")))
            .await;
    let b = TestBroker::start(&config_with_auth(
        up.addr,
        r#"{ type = "header", name = "X-Api-Key", prefix = "Token " }"#,
    ))
    .await;
    let token = b.token("github:issues.read", &[]).await;
    let (s, _, body) = b
        .call("GET", "/github/repos/acme/widget/issues", &token)
        .await;
    assert_eq!(s, 200, "{body}");
    assert!(!up.requests()[0].headers.contains_key("authorization"));
    let (s, _, _) = b
        .call_with(
            "GET",
            "/github/repos/acme/widget/issues",
            &token,
            &[("x-api-key", "mine")],
            "",
        )
        .await;
    assert_eq!(s, 400, "client copy of the injected header");
    // Nor under a spelling CGI-style servers read as the same header.
    for alias in ["x_api_key", "X_Api-Key", "x-api_key"] {
        let (s, _, _) = b
            .call_with(
                "GET",
                "/github/repos/acme/widget/issues",
                &token,
                &[(alias, "mine")],
                "",
            )
            .await;
        assert_eq!(s, 400, "{alias}");
    }
    // A header that merely looks alike is not one.
    let (s, _, _) = b
        .call_with(
            "GET",
            "/github/repos/acme/widget/issues",
            &token,
            &[("x_api_keys", "mine")],
            "",
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn basic() {
    use base64::Engine;
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("x:{CREDENTIAL}"))
    );
    let up = FakeUpstream::start_expecting(Expect::Header("authorization", expected)).await;
    let b = TestBroker::start(&config_with_auth(
        up.addr,
        r#"{ type = "basic", username = "x" }"#,
    ))
    .await;
    let token = b.token("github:issues.read", &[]).await;
    assert_eq!(
        b.status("GET", "/github/repos/acme/widget/issues", &token)
            .await,
        200
    );
}

#[tokio::test]
async fn query_parameter_is_appended_last_and_encoded() {
    let up = FakeUpstream::start_expecting(Expect::Query(format!("api_key={CREDENTIAL}"))).await;
    let b = TestBroker::start(&config_with_auth(
        up.addr,
        r#"{ type = "query", name = "api_key" }"#,
    ))
    .await;
    let token = b.token("github:issues.read", &[]).await;
    let (s, _, body) = b
        .call("GET", "/github/repos/acme/widget/issues?state=open", &token)
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        up.requests()[0].target,
        format!("/repos/acme/widget/issues?state=open&api_key={CREDENTIAL}")
    );
    let (s, _, _) = b
        .call(
            "GET",
            "/github/repos/acme/widget/issues?API%5FKEY=x",
            &token,
        )
        .await;
    assert_eq!(
        s, 400,
        "client copy of the injected parameter, after decoding"
    );
    assert_eq!(up.count(), 1);
    // An empty query or a trailing `&` gets no empty parameter before the credential.
    for (target, sent) in [
        ("/github/repos/acme/widget/issues?", "?api_key="),
        (
            "/github/repos/acme/widget/issues?state=open&",
            "?state=open&api_key=",
        ),
    ] {
        let (s, _, body) = b.call("GET", target, &token).await;
        assert_eq!(s, 200, "{target}: {body}");
        let seen = up.requests().last().unwrap().target.clone();
        assert_eq!(
            seen,
            format!("/repos/acme/widget/issues{sent}{CREDENTIAL}"),
            "{target}"
        );
    }
}

/// DESIGN §5: a client that still holds the real credential and sends it as the parameter
/// the broker injects is refused (§3.8), and the refusal's record does not keep the value.
#[tokio::test]
async fn a_refused_copy_of_the_credential_parameter_is_not_recorded() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&config_with_auth(
        up.addr,
        r#"{ type = "query", name = "api_key" }"#,
    ))
    .await;
    let token = b.token("github:issues.read", &[]).await;
    let forms = [
        format!("state=open&api_key={CREDENTIAL}"),
        format!("API_KEY={CREDENTIAL}&page=2"),
        format!("api%5Fkey={CREDENTIAL}"),
        format!("api_key[]={CREDENTIAL}"),
    ];
    for query in &forms {
        let target = format!("/github/repos/acme/widget/issues?{query}");
        let (s, _, body) = b.call("GET", &target, &token).await;
        assert_eq!(s, 400, "{query}: {body}");
    }
    // Refused for something else first (a non-canonical path): not recorded either.
    let dotted = format!("/github/repos/acme/../issues?api_key={CREDENTIAL}");
    assert_eq!(b.status("GET", &dotted, &token).await, 400);
    let doubled = format!("/github//repos?api_key={CREDENTIAL}");
    assert_eq!(b.status("GET", &doubled, &token).await, 400);
    assert_eq!(up.count(), 0);
    let records = b.audit();
    let denials: Vec<_> = events(&records, "proxy")
        .into_iter()
        .filter(|r| r["reason"] == "client_supplied_credential")
        .collect();
    assert_eq!(denials.len(), forms.len());
    let queries: Vec<&str> = denials
        .iter()
        .map(|r| r["query"].as_str().unwrap())
        .collect();
    assert_eq!(
        queries,
        [
            "state=open&api_key=REDACTED",
            "API_KEY=REDACTED&page=2",
            "api%5Fkey=REDACTED",
            "REDACTED",
        ]
    );
    let others: Vec<&str> = events(&records, "proxy")
        .into_iter()
        .filter(|r| r["reason"] != "client_supplied_credential")
        .map(|r| r["query"].as_str().unwrap())
        .collect();
    assert_eq!(others, ["api_key=REDACTED", "api_key=REDACTED"]);
    let log = std::fs::read_to_string(b.audit_path()).unwrap();
    assert!(!log.contains(CREDENTIAL));
}

#[tokio::test]
async fn echoed_credential_header_is_dropped() {
    fn echo(_: &Seen) -> Option<http::Response<http_body_util::Full<bytes::Bytes>>> {
        let mut r =
            http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")));
        r.headers_mut().insert(
            "x-debug-auth",
            format!("Bearer {CREDENTIAL}").parse().unwrap(),
        );
        r.headers_mut()
            .insert("location", "https://elsewhere.example/".parse().unwrap());
        *r.status_mut() = http::StatusCode::FOUND;
        Some(r)
    }
    let up = FakeUpstream::start_with(Expect::Nothing, echo).await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    let token = b.token("github:issues.read", &[]).await;
    let (s, h, _) = b
        .call("GET", "/github/repos/acme/widget/issues", &token)
        .await;
    assert_eq!(s, 302, "redirects are passed back, not followed");
    assert!(!h.contains_key("x-debug-auth"));
    assert_eq!(up.count(), 1);
}

/// DESIGN §4.3: an echo of the credential in the form it was sent — `basic`'s base64, `query`'s
/// percent-encoding (a redirect repeating the query) — is dropped like a raw one.
#[tokio::test]
async fn echoes_of_the_encoded_credential_are_dropped_too() {
    /// Hands back what the upstream received: its `Authorization`, and its target in a redirect.
    fn echo(seen: &Seen) -> Option<http::Response<http_body_util::Full<bytes::Bytes>>> {
        let mut r =
            http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")));
        if let Some(auth) = seen.headers.get("authorization") {
            r.headers_mut().insert("x-echo-auth", auth.clone());
        }
        let location = format!("https://elsewhere.example{}", seen.target);
        r.headers_mut()
            .insert("location", location.parse().unwrap());
        r.headers_mut().insert("x-kept", "yes".parse().unwrap());
        *r.status_mut() = http::StatusCode::FOUND;
        Some(r)
    }
    // A credential with bytes that each encoding changes.
    const ODD: &str = "odd cred/+&=~x";
    for auth in [
        r#"{ type = "basic", username = "x" }"#,
        r#"{ type = "query", name = "api_key" }"#,
    ] {
        let up = FakeUpstream::start_with(Expect::Nothing, echo).await;
        let config = config_with_auth(up.addr, auth)
            .replace(&format!("literal:{CREDENTIAL}"), &format!("literal:{ODD}"));
        assert!(config.contains(ODD));
        let b = TestBroker::start(&config).await;
        let token = b.token("github:issues.read", &[]).await;
        let (s, h, _) = b
            .call("GET", "/github/repos/acme/widget/issues?state=open", &token)
            .await;
        assert_eq!(s, 302, "{auth}");
        assert_eq!(h["x-kept"], "yes", "{auth}");
        assert!(!h.contains_key("x-echo-auth"), "{auth}: {h:?}");
        if auth.contains("query") {
            assert!(!h.contains_key("location"), "{auth}: {h:?}");
        } else {
            assert!(h.contains_key("location"), "{auth}: nothing secret in it");
        }
    }
}

/// A raw upstream that answers every request with `response`, as bytes.
async fn raw_upstream(response: &'static [u8]) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        seen.clear();
                        if s.write_all(response).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Sends one GET over HTTP/2 (prior knowledge) and returns status, headers, body and trailers.
async fn h2_get(
    addr: std::net::SocketAddr,
    target: &str,
    token: &str,
) -> (u16, http::HeaderMap, bytes::Bytes, Option<http::HeaderMap>) {
    use http_body_util::BodyExt;
    let mut sender = h2_connect(addr).await;
    let req = http::Request::get(format!("http://{addr}{target}"))
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (
        parts.status.as_u16(),
        parts.headers,
        collected.to_bytes(),
        trailers,
    )
}

/// DESIGN §4.3: trailers are header fields too. An upstream trailer carrying the credential
/// never reaches an HTTP/2 client (HTTP/1.1 clients get no trailers at all); others do.
#[tokio::test]
async fn trailers_echoing_the_credential_are_dropped() {
    const ANSWER: &str = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n4\r\nTRLR\r\n0\r\nX-Checksum: abc\r\nX-Leak: ghs_REAL_ORG_CREDENTIAL_sentinel\r\n\r\n";
    assert!(ANSWER.contains(CREDENTIAL));
    let up = raw_upstream(ANSWER.as_bytes()).await;
    let b = TestBroker::start(&standard_config(up)).await;
    let token = b.token("github:issues.read", &[]).await;
    let (status, _, body, trailers) =
        h2_get(b.addr, "/github/repos/acme/widget/issues", &token).await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"TRLR");
    let trailers = trailers.expect("the harmless trailer is passed on");
    assert_eq!(trailers["x-checksum"], "abc");
    assert!(!trailers.contains_key("x-leak"), "{trailers:?}");
}

/// A response that ends with trailers has ended: its outcome record carries no error, over
/// HTTP/1.1 (which drops the trailers) and HTTP/2 (which passes them on) alike.
#[tokio::test]
async fn a_response_ending_with_trailers_is_recorded_as_complete() {
    const ANSWER: &str = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n3\r\nabc\r\n0\r\nX-Checksum: 123\r\n\r\n";
    let up = raw_upstream(ANSWER.as_bytes()).await;
    let b = TestBroker::start(&standard_config(up)).await;
    let token = b.token("github:issues.read", &[]).await;
    let (status, _, body) = b
        .call("GET", "/github/repos/acme/widget/issues", &token)
        .await;
    assert_eq!((status, body.as_str()), (200, "abc"));
    let (status, _, body, _) = h2_get(b.addr, "/github/repos/acme/widget/issues", &token).await;
    assert_eq!((status, &body[..]), (200, &b"abc"[..]));
    let results = records_eventually(&b, "proxy_result", 2).await;
    assert_eq!(results.len(), 2, "{results:?}");
    for r in &results {
        assert_eq!(r["status"], 200, "{r}");
        assert!(r.get("error").is_none(), "{r}");
        assert_eq!(r["bytes_out"], 3, "{r}");
    }
}

/// The client is answered in HTTP/1.1 whatever version the upstream spoke (RFC 9110 §6.2), so
/// its keep-alive connection stays one; and an upstream request id is recorded bounded.
#[tokio::test]
async fn an_http_1_0_upstream_is_answered_as_http_1_1_and_its_request_id_recorded_bounded() {
    // UTF-8 is recorded too (escaped as JSON needs), cut at 256 bytes on a character boundary:
    // the second `é` would straddle it.
    let id = format!("é{}é{}", "R".repeat(253), "R".repeat(1000));
    let answer =
        format!("HTTP/1.0 200 OK\r\nContent-Length: 2\r\nx-github-request-id: {id}\r\n\r\nok");
    let up = raw_upstream(Box::leak(answer.into_bytes().into_boxed_slice())).await;
    let b = TestBroker::start(&standard_config(up)).await;
    let token = b.token("github:issues.read", &[]).await;
    let call = format!(
        "GET /github/repos/acme/widget/issues HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    );
    // Two calls on one connection: the first answer kept it open.
    let out = raw(
        b.addr,
        format!("{call}{call}").as_bytes(),
        std::time::Duration::from_millis(500),
    )
    .await;
    assert_eq!(out.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{out}");
    assert!(!out.contains("HTTP/1.0"), "{out}");
    let results = records_eventually(&b, "proxy_result", 2).await;
    assert_eq!(results.len(), 2, "{results:?}");
    assert_eq!(
        results[0]["upstream_request_id"],
        format!("é{}", "R".repeat(253))
    );
}

/// The status line's reason phrase is the upstream's own text: one that echoes the credential
/// must not reach the client. The broker sends the standard phrase for the status instead.
#[tokio::test]
async fn the_upstream_reason_phrase_is_not_passed_on() {
    const ANSWER: &str =
        "HTTP/1.1 404 Bearer ghs_REAL_ORG_CREDENTIAL_sentinel\r\nContent-Length: 2\r\n\r\nno";
    assert!(ANSWER.contains(CREDENTIAL));
    let status_line = |answer: &'static [u8]| async move {
        let up = raw_upstream(answer).await;
        let b = TestBroker::start(&standard_config(up)).await;
        let token = b.token("github:issues.read", &[]).await;
        let request = format!(
            "GET /github/repos/acme/widget/issues HTTP/1.1\r\nHost: x\r\n\
             Authorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        );
        raw(
            b.addr,
            request.as_bytes(),
            std::time::Duration::from_secs(5),
        )
        .await
    };
    let out = status_line(ANSWER.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 404 Not Found\r\n"), "{out}");
    assert!(!out.contains(CREDENTIAL), "{out}");
    // A status without a standard phrase gets none (not hyper's `<none>`).
    let out = status_line(b"HTTP/1.1 299 Upstream Words\r\nContent-Length: 2\r\n\r\nok").await;
    assert!(out.starts_with("HTTP/1.1 299 \r\n"), "{out}");
}

/// RFC 9112 §6.3: an upstream answer with both `Content-Length` and `Transfer-Encoding` is
/// read as chunked, and the client must not get the stale length with it; an unasked
/// `101 Switching Protocols` is an upstream failure, not an answer to relay.
#[tokio::test]
async fn contradictory_framing_and_unasked_upgrades_from_the_upstream() {
    let both: &'static [u8] =
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let up = raw_upstream(both).await;
    let b = TestBroker::start(&standard_config(up)).await;
    let token = b.token("github:issues.read", &[]).await;
    let (s, h, body) = b
        .call("GET", "/github/repos/acme/widget/issues", &token)
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        body, "hello",
        "the whole decoded body, not the stale length's worth"
    );
    assert!(h.get("content-length").is_none_or(|v| v == "5"), "{h:?}");
    let (s, h, body, _) = h2_get(b.addr, "/github/repos/acme/widget/issues", &token).await;
    assert_eq!((s, &body[..]), (200, &b"hello"[..]));
    assert!(h.get("content-length").is_none_or(|v| v == "5"), "{h:?}");

    let gzip: &'static [u8] =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let up = raw_upstream(gzip).await;
    let b = TestBroker::start(&standard_config(up)).await;
    let token = b.token("github:issues.read", &[]).await;
    let (s, _, body) = b
        .call("GET", "/github/repos/acme/widget/issues", &token)
        .await;
    assert_eq!(
        s, 502,
        "a coding the broker does not decode is not relabelled: {body}"
    );
    // A 502 like any failed exchange, so it is counted as one.
    let (_, _, metrics) = b.admin_call("GET", "/metrics", "").await;
    assert!(
        metrics
            .contains("credbroker_upstream_errors_total{connector=\"github\",kind=\"failed\"} 1"),
        "{metrics}"
    );

    let switching: &'static [u8] =
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nRAWDATA";
    let up = raw_upstream(switching).await;
    let b = TestBroker::start(&standard_config(up)).await;
    let token = b.token("github:issues.read", &[]).await;
    let (s, _, body) = b
        .call("GET", "/github/repos/acme/widget/issues", &token)
        .await;
    assert_eq!(s, 502, "{body}");
    assert!(
        body.contains("upstream_unavailable") && !body.contains("RAWDATA"),
        "{body}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let records = b.audit();
    let results = events(&records, "proxy_result");
    assert_eq!(results[0]["status"], 502, "{records:?}");
}

/// Over HTTP/2, the broker's own answers to HEAD carry no body (RFC 9113 §8.1.1: a client must
/// treat one as a protocol error): the well-known documents, a 401, the token endpoint's 405.
#[tokio::test]
async fn answers_to_head_over_http2_have_no_body() {
    use http_body_util::BodyExt;
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    let mut sender = h2_connect(b.addr).await;
    for (target, status) in [
        ("/.well-known/jwks.json", 200),
        ("/.well-known/oauth-authorization-server", 200),
        ("/github/repos/acme/widget/issues", 401),
        ("/oauth2/token", 405),
    ] {
        let req = http::Request::head(format!("http://{}{target}", b.addr))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), status, "{target}");
        assert!(resp.headers().contains_key("x-request-id"), "{target}");
        let body = resp.into_body().collect().await.expect(target).to_bytes();
        assert!(body.is_empty(), "{target}: {body:?}");
    }
}
