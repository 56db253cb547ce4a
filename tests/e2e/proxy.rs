//! DESIGN §4.3: each row of the table, allowed and refused, and that refused calls never
//! reach the upstream; header hygiene; byte-identical forwarding.

use std::time::Duration;

use crate::support::*;

#[tokio::test]
async fn allowed_call_is_forwarded_with_the_credential_and_correlated() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    let token = b.token("github:issues.read", &[]).await;
    let (status, headers, body) = b
        .call(
            "GET",
            "/github/repos/acme/widget/issues?state=open&per_page=5",
            &token,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let rid = headers["x-request-id"].to_str().unwrap().to_owned();
    let seen = up.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].target,
        "/repos/acme/widget/issues?state=open&per_page=5"
    );
    assert_eq!(
        seen[0].headers["authorization"],
        format!("Bearer {CREDENTIAL}").as_str()
    );
    assert_eq!(seen[0].headers["x-request-id"], rid.as_str());
    assert_eq!(seen[0].headers["host"], up.addr.to_string().as_str());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let records = b.audit();
    let allow = events(&records, "proxy");
    assert_eq!(allow[0]["decision"], "allow");
    assert_eq!(allow[0]["operation"], "issues.read");
    assert_eq!(allow[0]["path"], "/repos/acme/widget/issues");
    assert_eq!(allow[0]["request_id"], rid.as_str());
    let result = events(&records, "proxy_result");
    assert_eq!(result[0]["status"], 200);
    assert_eq!(result[0]["upstream_request_id"], "GH-REQ-1");
    assert_eq!(result[0]["request_id"], rid.as_str());
}

#[tokio::test]
async fn the_upstream_target_is_the_base_path_plus_the_bytes_after_the_connector() {
    let up = FakeUpstream::start().await;
    let root_op = "  [[connectors.operations]]\n  name = \"root\"\n  method = \"GET\"\n  path = \"/\"\n\n  [[connectors.operations]]\n  name = \"issues.read\"";
    let config = |base: &str| {
        standard_config(up.addr)
            .replace(
                &format!("upstream = \"http://{}\"", up.addr),
                &format!("upstream = \"http://{}{base}\"", up.addr),
            )
            .replace(
                "  [[connectors.operations]]\n  name = \"issues.read\"",
                root_op,
            )
            .replace(
                "operations = [\"issues.read\",",
                "operations = [\"root\", \"issues.read\",",
            )
    };
    for (base, calls) in [
        (
            "/base/v1",
            [
                ("/github", "/base/v1"),
                ("/github?state=open", "/base/v1?state=open"),
                (
                    "/github/repos/acme/widget/issues",
                    "/base/v1/repos/acme/widget/issues",
                ),
            ],
        ),
        (
            "/base/v1/",
            [
                ("/github", "/base/v1/"),
                ("/github?state=open", "/base/v1/?state=open"),
                (
                    "/github/repos/acme/widget/issues",
                    "/base/v1/repos/acme/widget/issues",
                ),
            ],
        ),
        (
            "",
            [
                ("/github", "/"),
                ("/github?state=open", "/?state=open"),
                (
                    "/github/repos/acme/widget/issues",
                    "/repos/acme/widget/issues",
                ),
            ],
        ),
    ] {
        let b = TestBroker::start(&config(base)).await;
        let token = b.token("github:root github:issues.read", &[]).await;
        for (target, sent) in calls {
            let before = up.count();
            let (s, _, body) = b.call("GET", target, &token).await;
            assert_eq!(s, 200, "{base} {target}: {body}");
            assert_eq!(up.requests()[before].target, sent, "{base} {target}");
        }
    }
}

/// A chunked upload is read whole and forwarded with its length — an empty one too (hyper
/// frames an empty body with nothing, and some origins answer that with 411).
#[tokio::test]
async fn a_chunked_body_reaches_the_upstream_with_its_length() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    let token = b.token("github:issues.comment", &[]).await;
    for (chunks, body) in [("2\r\nab\r\n0\r\n\r\n", "ab"), ("0\r\n\r\n", "")] {
        let before = up.count();
        let request = format!(
            "POST /github/repos/acme/widget/issues/1/comments HTTP/1.1\r\nHost: x\r\n\
             Authorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\
             Connection: close\r\n\r\n{chunks}"
        );
        let out = raw(b.addr, request.as_bytes(), Duration::from_secs(5)).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let seen = &up.requests()[before];
        assert_eq!(seen.body, body.as_bytes());
        assert_eq!(seen.headers["content-length"], body.len().to_string());
        assert!(seen.headers.get("transfer-encoding").is_none());
    }
}

#[tokio::test]
async fn each_refusal_has_its_status_and_never_reaches_the_upstream() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    let token = b
        .token("github:issues.read github:issues.comment", &[])
        .await;
    let cases: Vec<(&str, &str, String, u16, &str)> = vec![
        // check 1: canonical path
        (
            "GET",
            "/github/repos/acme/widget/../x/issues",
            token.clone(),
            400,
            "invalid_request",
        ),
        (
            "GET",
            "/github/repos/acme//widget/issues",
            token.clone(),
            400,
            "invalid_request",
        ),
        (
            "GET",
            "/github/repos/acme/widget%2fissues",
            token.clone(),
            400,
            "invalid_request",
        ),
        (
            "GET",
            "/github/repos/acme/widget/issues?access_token=abc",
            token.clone(),
            400,
            "invalid_request",
        ),
        // check 2: token
        (
            "GET",
            "/github/repos/acme/widget/issues",
            String::new(),
            401,
            "invalid_token",
        ),
        (
            "GET",
            "/github/repos/acme/widget/issues",
            "not.a.jwt".into(),
            401,
            "invalid_token",
        ),
        // check 3: allowlist, scope, grant
        (
            "DELETE",
            "/github/repos/acme/widget",
            token.clone(),
            403,
            "insufficient_scope",
        ),
        (
            "GET",
            "/github/repos/ACME/widget/issues",
            token.clone(),
            403,
            "insufficient_scope",
        ),
        (
            "GET",
            "/github/repos/acme/widget/issues?sort=x",
            token.clone(),
            403,
            "insufficient_scope",
        ),
        (
            "GET",
            "/nosuch/repos/acme/widget/issues",
            token.clone(),
            403,
            "insufficient_scope",
        ),
    ];
    for (method, target, tok, status, code) in cases {
        let (s, headers, body) = b.call(method, target, &tok).await;
        assert_eq!(s, status, "{method} {target}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], code, "{method} {target}");
        assert!(v["request_id"].is_string());
        assert!(headers.contains_key("x-request-id"));
        if status == 401 {
            let www = headers["www-authenticate"].to_str().unwrap();
            assert!(www.starts_with("Bearer realm=\"credbroker\""), "{www}");
            assert_eq!(www.contains("error="), !tok.is_empty(), "{www}");
        }
    }
    // check 6: body over max_body_bytes (64)
    let big = "x".repeat(100);
    let (s, _, _) = b
        .call_with(
            "POST",
            "/github/repos/acme/widget/issues/1/comments",
            &token,
            &[("content-type", "text/plain")],
            &big,
        )
        .await;
    assert_eq!(s, 413);
    assert_eq!(up.count(), 0, "no refused call may reach the upstream");
    // and every refusal is audited as a deny
    let denies: Vec<_> = b
        .audit()
        .into_iter()
        .filter(|r| r["event"] == "proxy" && r["decision"] == "deny")
        .collect();
    assert_eq!(denies.len(), 11);
    assert!(denies
        .iter()
        .all(|d| d["reason"].is_string() && d["status"].is_number()));
    let canonical = denies
        .iter()
        .find(|d| d["reason"] == "non_canonical_path")
        .unwrap();
    assert_eq!(
        canonical["connector"], "github",
        "check-1 denials name the connector"
    );
    assert!(
        canonical["path"].as_str().unwrap().starts_with("/repos/"),
        "{canonical}"
    );
}

#[tokio::test]
async fn token_scope_limits_calls_even_when_granted() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    let token = b.token("github:issues.read", &[]).await;
    let (s, _, body) = b
        .call_with(
            "POST",
            "/github/repos/acme/widget/issues/1/comments",
            &token,
            &[],
            "hi",
        )
        .await;
    assert_eq!(s, 403, "{body}");
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn max_uses_and_single_call_binding() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    let token = b.token("github:issues.read", &[("max_uses", "2")]).await;
    for _ in 0..2 {
        assert_eq!(
            b.status("GET", "/github/repos/acme/widget/issues", &token)
                .await,
            200
        );
    }
    let (s, _, body) = b
        .call("GET", "/github/repos/acme/widget/issues", &token)
        .await;
    assert_eq!(s, 401, "{body}");
    assert_eq!(up.count(), 2);

    let details = r#"[{"type":"credbroker_request","connector":"github","method":"GET","path":"/repos/acme/widget/issues"}]"#;
    let bound = b
        .token("github:issues.read", &[("authorization_details", details)])
        .await;
    assert_eq!(
        b.status("GET", "/github/repos/acme/widget/issues", &bound)
            .await,
        200
    );
    let (s, _, _) = b
        .call("GET", "/github/repos/acme/gadget/issues", &bound)
        .await;
    assert_eq!(s, 403, "authorization_details binds the token to one call");
    assert_eq!(up.count(), 3);
}

#[tokio::test]
async fn header_hygiene() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    let token = b.token("github:issues.read", &[]).await;
    let hdrs = [
        ("cookie", "session=1"),
        ("proxy-authorization", "Basic x"),
        ("connection", "x-hop"),
        ("x-hop", "1"),
        ("keep-alive", "timeout=5"),
        ("x-http-method-override", "DELETE"),
        ("x-http-method", "DELETE"),
        ("x-method-override", "DELETE"),
        ("forwarded", "for=6.6.6.6"),
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-host", "evil.example"),
        ("x-request-id", "client-chosen"),
        ("accept", "application/vnd.github+json"),
        ("via", "1.1 corp-proxy"),
    ];
    let (s, _, body) = b
        .call_with("GET", "/github/repos/acme/widget/issues", &token, &hdrs, "")
        .await;
    assert_eq!(s, 200, "{body}");
    let seen = &up.requests()[0];
    for gone in [
        "cookie",
        "proxy-authorization",
        "x-hop",
        "keep-alive",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "forwarded",
        "x-forwarded-host",
    ] {
        assert!(
            !seen.headers.contains_key(gone),
            "{gone} must not be forwarded"
        );
    }
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_ne!(seen.headers["x-request-id"], "client-chosen");
    assert_eq!(seen.headers["accept"], "application/vnd.github+json");
    assert_eq!(seen.headers.get_all("authorization").iter().count(), 1);
    // RFC 9110 §7.6.3: the broker adds itself to `Via`, after the client's hops.
    let via: Vec<_> = seen.headers.get_all("via").iter().collect();
    assert_eq!(via, ["1.1 corp-proxy", "1.1 credbroker"]);
}

#[tokio::test]
async fn upgrade_and_duplicate_authorization_are_refused() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    let token = b.token("github:issues.read", &[]).await;
    let req = format!(
        "GET /github/repos/acme/widget/issues HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(
        raw_status(&raw(b.addr, req.as_bytes(), Duration::from_secs(2)).await),
        Some(400)
    );
    let req = format!(
        "GET /github/repos/acme/widget/issues HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    );
    assert_eq!(
        raw_status(&raw(b.addr, req.as_bytes(), Duration::from_secs(2)).await),
        Some(400)
    );
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn oversized_headers_get_431_and_garbage_never_panics() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    let big = format!(
        "GET /github/x HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(9000)
    );
    assert_eq!(
        raw_status(&raw(b.addr, big.as_bytes(), Duration::from_secs(2)).await),
        Some(431)
    );
    let out = raw(
        b.addr,
        b"\x00\x01\x02 garbage \xff\xfe\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(out.is_empty() || raw_status(&out) == Some(400), "{out}");
    // still serving
    let token = b.token("github:issues.read", &[]).await;
    assert_eq!(
        b.status("GET", "/github/repos/acme/widget/issues", &token)
            .await,
        200
    );
    assert_eq!(up.count(), 1);
}

/// A head over `max_header_bytes` (8192 here) that hyper's own buffer still takes gets the
/// broker's JSON 431 — and, being a proxy call, its `proxy` deny record (DESIGN §5: denied
/// calls are recorded too), under the answer's request id.
#[tokio::test]
async fn a_431_from_the_broker_is_audited() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    let head = format!(
        "GET /github/repos/acme/widget/issues?state=open HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(8300)
    );
    let out = raw(b.addr, head.as_bytes(), Duration::from_secs(2)).await;
    assert_eq!(raw_status(&out), Some(431), "{out}");
    assert!(out.contains("\"request_header_fields_too_large\""), "{out}");
    let request_id = out
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .expect("the broker's own answer")
        .trim()
        .to_owned();
    let records = b.audit();
    let denied = events(&records, "proxy")
        .into_iter()
        .find(|r| r["request_id"] == request_id.as_str())
        .expect("recorded");
    assert_eq!(denied["decision"], "deny");
    assert_eq!(denied["reason"], "headers_too_large");
    assert_eq!(denied["status"], 431);
    assert_eq!(denied["connector"], "github");
    assert_eq!(denied["path"], "/repos/acme/widget/issues");
    assert_eq!(denied["query"], "state=open");
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn upstream_down_is_502_and_audited() {
    let up = FakeUpstream::start().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let b = TestBroker::start(&standard_config(dead_addr)).await;
    let token = b.token("github:issues.read", &[]).await;
    let (s, _, body) = b
        .call("GET", "/github/repos/acme/widget/issues", &token)
        .await;
    assert_eq!(s, 502, "{body}");
    assert!(body.contains("upstream_unavailable"));
    let records = b.audit();
    assert_eq!(events(&records, "proxy_result")[0]["status"], 502);
    drop(up);
}

/// DESIGN §4.3: the checks run in their table's order, so a call failing two of them gets the
/// earlier one's answer, and a later check's state is not touched by an earlier refusal (a
/// 403 spends no `max_uses` use; a spent token is refused before the rate limit is taken).
#[tokio::test]
async fn checks_run_in_the_designed_order() {
    let up = FakeUpstream::start().await;
    let config = standard_config(up.addr).replacen(
        "grants = [",
        "rate_limit = { per_second = 1, burst = 3 }\ngrants = [",
        1,
    );
    let b = TestBroker::start(&config).await;
    let read = "/github/repos/acme/widget/issues";
    let comment = "/github/repos/acme/widget/issues/1/comments";
    // 1 before 2: a non-canonical path without any token.
    assert_eq!(
        b.status("GET", "/github/repos/acme/../issues", "").await,
        400
    );
    assert_eq!(b.status("GET", "/github//repos", "").await, 400);
    // 2 before 3: a bad token on a path no operation allows.
    assert_eq!(
        b.status("DELETE", "/github/repos/acme/widget", "not-a-token")
            .await,
        401
    );
    let (s, _, _) = b.call("GET", "/nosuch/x", "not-a-token").await;
    assert_eq!(s, 401);
    // 3 before 4: an out-of-scope call spends no use of a single-use token.
    let once = b.token("github:issues.read", &[("max_uses", "1")]).await;
    assert_eq!(
        b.status("DELETE", "/github/repos/acme/widget", &once).await,
        403
    );
    assert_eq!(
        b.status("GET", read, &once).await,
        200,
        "its one use is still there"
    );
    // 4 before 5, and 5 before 6: with the client's cells used up (burst 3 at 1 a second),
    // the spent token is refused as spent, not as rate-limited, and a call both rate-limited
    // and too large (max_body_bytes 64) gets 429. Both follow the first 429 at once: no cell
    // comes back in between, however slow the machine.
    let token = b
        .token("github:issues.read github:issues.comment", &[])
        .await;
    let mut allowed = 1;
    loop {
        match b.status("GET", read, &token).await {
            200 => allowed += 1,
            429 => break,
            other => panic!("{other}"),
        }
        assert!(allowed < 50, "the client rate limit never bit");
    }
    assert_eq!(b.status("GET", read, &once).await, 401);
    let big = "x".repeat(1000);
    let (s, h, _) = b.call_with("POST", comment, &token, &[], &big).await;
    assert_eq!(s, 429);
    assert!(h.contains_key("retry-after"));
    assert_eq!(up.count(), allowed);
    let records = b.audit();
    let reasons: Vec<&str> = events(&records, "proxy")
        .iter()
        .filter(|r| r["decision"] == "deny")
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        [
            "non_canonical_path",
            "non_canonical_path",
            "token_invalid",
            "token_invalid",
            "not_in_token_scope",
            "client_rate_limited",
            "max_uses_exhausted",
            "client_rate_limited",
        ]
    );
}
