//! DESIGN §4.1 / §4.2: the token endpoint's successes and every error code.

use crate::support::*;

#[tokio::test]
async fn issues_a_scoped_token_with_capped_lifetime() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    let (s, headers, body) = b
        .token_request("bot", SECRET, "github:*", &[("ttl", "9999")])
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 120, "capped by the grant's max_ttl");
    assert_eq!(
        v["scope"], "github:issues.read github:issues.comment",
        "`*` expanded explicitly"
    );
    let token = v["access_token"].as_str().unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header: serde_json::Value = serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
    assert_eq!(header["alg"], "EdDSA");
    assert_eq!(header["typ"], "at+jwt");
    assert!(header["kid"].is_string());
    let claims: serde_json::Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    assert_eq!(claims["sub"], "bot");
    assert_eq!(claims["client_id"], "bot", "RFC 9068 §2.2");
    assert_eq!(claims["iss"], "credbroker-test");
    assert_eq!(claims["aud"], "credbroker-test");
    assert!(claims["exp"].is_i64() && claims["jti"].as_str().unwrap().len() >= 22);
    // the secret and the token never reach the audit log
    let audit = std::fs::read_to_string(b.audit_path()).unwrap();
    assert!(!audit.contains(SECRET) && !audit.contains(token));
    let issued = b.audit();
    let rec = events(&issued, "token_issued");
    assert_eq!(rec[0]["client"], "bot");
    assert_eq!(rec[0]["jti"], claims["jti"]);
}

#[tokio::test]
async fn every_error_code() {
    let up = FakeUpstream::start().await;
    // A grant that lists no operation grants nothing: that client holds no grants either.
    let config = format!(
        "{}\n[[clients]]\nid = \"emptygrant\"\nowner = \"platform@acme.example\"\n\
         secret_sha256 = \"{}\"\ngrants = [ {{ connector = \"github\", operations = [] }} ]\n",
        standard_config(up.addr),
        sha256_hex(SECRET)
    );
    let b = TestBroker::start(&config).await;
    // invalid_client: wrong secret, unknown client
    for (id, secret) in [("bot", "wrong"), ("nobody", SECRET)] {
        let (s, h, body) = b.token_request(id, secret, "github:issues.read", &[]).await;
        assert_eq!(s, 401, "{body}");
        assert!(body.contains("\"invalid_client\""));
        assert_eq!(h["www-authenticate"], "Basic realm=\"credbroker\"");
        assert!(!body.contains("wrong"));
    }
    // invalid_scope: not granted, unknown connector, malformed, ungranted op
    for scope in [
        "github:repos.delete",
        "nosuch:x",
        "garbage",
        "github:issues.read github:repos.delete",
    ] {
        let (s, _, body) = b.token_request("bot", SECRET, scope, &[]).await;
        assert_eq!(s, 400, "{scope}: {body}");
        assert!(body.contains("\"invalid_scope\""), "{scope}: {body}");
    }
    // unauthorized_client: authenticated, no grants (or only grants of no operation)
    for id in ["nogrants", "emptygrant"] {
        let (s, _, body) = b.token_request(id, SECRET, "github:*", &[]).await;
        assert_eq!(s, 400, "{id}");
        assert!(body.contains("\"unauthorized_client\""), "{id}: {body}");
    }
    // unsupported_grant_type
    let (s, _, body) = b
        .token_request(
            "bot",
            SECRET,
            "github:issues.read",
            &[("grant_type", "password")],
        )
        .await;
    assert_eq!(s, 400);
    assert!(
        body.contains("invalid_request") || body.contains("unsupported_grant_type"),
        "{body}"
    );
    // invalid_request: bad ttl, bad max_uses, malformed authorization_details
    for extra in [
        ("ttl", "-5"),
        ("max_uses", "0"),
        ("authorization_details", "{not json"),
    ] {
        let (s, _, body) = b
            .token_request("bot", SECRET, "github:issues.read", &[extra])
            .await;
        assert_eq!(s, 400, "{extra:?}");
        assert!(body.contains("\"invalid_request\""), "{extra:?}: {body}");
    }
    // RFC 6749 §5.2: error_description holds only %x20-21 / %x23-5B / %x5D-7E, also when it
    // quotes a scope item holding other characters.
    let (s, _, body) = b
        .token_request("bot", SECRET, "github:\"q\\u\"\té\nx", &[])
        .await;
    assert_eq!(s, 400, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let description = v["error_description"].as_str().unwrap();
    assert!(description.contains("github:?q?u??"), "{description}");
    assert!(
        description
            .chars()
            .all(|c| matches!(c, ' '..='~') && c != '"' && c != '\\'),
        "{description:?}"
    );
    let records = b.audit();
    let denied = events(&records, "token_denied");
    assert!(denied.len() >= 10);
    // A failed authentication names the configured client it claimed to be, never an
    // unknown id.
    let failed: Vec<_> = denied
        .iter()
        .filter(|r| r["reason"] == "invalid_client")
        .collect();
    assert_eq!(failed.len(), 2);
    assert_eq!(failed[0]["client"], "bot");
    assert!(failed[1].get("client").is_none(), "{}", failed[1]);
    // What a guess at a configured client's secret asked for is recorded too; an unknown
    // claimant's text is not.
    assert_eq!(failed[0]["scope"], "github:issues.read", "{}", failed[0]);
    assert!(failed[1].get("scope").is_none(), "{}", failed[1]);
    // A wrong (old, mistyped) secret is not one the broker holds: pasted into the scope, it is
    // still not recorded. And the unauthenticated scope is recorded up to 256 bytes.
    let long_scope = vec!["github:issues.read"; 40].join(" ");
    for scope in ["github:issues.read old-Secret-9q", long_scope.as_str()] {
        let (s, _, _) = b.token_request("bot", "old-Secret-9q", scope, &[]).await;
        assert_eq!(s, 401);
    }
    let records = b.audit();
    let failed: Vec<_> = events(&records, "token_denied")
        .into_iter()
        .filter(|r| r["reason"] == "invalid_client" && r["client"] == "bot")
        .collect();
    assert_eq!(failed[1]["scope"], "github:issues.read REDACTED");
    assert!(!std::fs::read_to_string(b.audit_path())
        .unwrap()
        .contains("old-Secret-9q"));
    let recorded = failed[2]["scope"].as_str().unwrap();
    assert!(
        recorded.len() <= 256 + " …".len() && recorded.ends_with(" …"),
        "{recorded}"
    );
    // DESIGN §5: an authenticated request's denial records the scope it asked for, whatever
    // the reason.
    let authenticated = denied
        .iter()
        .filter(|r| r["reason"] != "invalid_client" && r["client"].is_string());
    assert!(authenticated.clone().count() >= 8);
    for r in authenticated {
        assert!(r["scope"].is_string(), "{r}");
    }
    let unauthorized = denied
        .iter()
        .find(|r| r["reason"] == "unauthorized_client")
        .unwrap();
    assert_eq!(unauthorized["scope"], "github:*");
}

#[tokio::test]
async fn unsupported_grant_type_alone() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("bot:{SECRET}"));
    let req = http::Request::post("/oauth2/token")
        .header("authorization", format!("Basic {basic}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=password&scope=github%3Aissues.read".to_owned())
        .unwrap();
    let (s, _, body) = send(b.addr, req).await;
    assert_eq!(s, 400);
    assert!(body.contains("\"unsupported_grant_type\""), "{body}");
}

#[tokio::test]
async fn repeated_auth_failures_lock_out_the_source() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    for _ in 0..20 {
        assert_eq!(
            b.token_request("bot", "wrong", "github:issues.read", &[])
                .await
                .0,
            401
        );
    }
    let (s, h, _) = b
        .token_request("bot", SECRET, "github:issues.read", &[])
        .await;
    assert_eq!(s, 429, "locked out even with the right secret");
    assert!(h.contains_key("retry-after"));
}

#[tokio::test]
async fn held_back_bodies_get_no_more_guesses_than_the_lockout_allows() {
    use base64::Engine;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    let body = "grant_type=client_credentials&scope=github%3Aissues.read";
    let head = |secret: &str| {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("bot:{secret}"));
        format!(
            "POST /oauth2/token HTTP/1.1\r\nHost: b\r\nAuthorization: Basic {basic}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            body.len()
        )
    };
    // 24 wrong guesses and the right secret, all past the early lockout check (no failure
    // yet) with their bodies held back; then every body at once.
    let mut conns = Vec::new();
    for i in 0..25 {
        let secret = if i == 24 {
            SECRET.to_owned()
        } else {
            format!("wrong-{i}")
        };
        let mut c = tokio::net::TcpStream::connect(b.addr).await.unwrap();
        c.write_all(head(&secret).as_bytes()).await.unwrap();
        conns.push(c);
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    for c in &mut conns[..24] {
        c.write_all(body.as_bytes()).await.unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    conns[24].write_all(body.as_bytes()).await.unwrap();
    let mut statuses = Vec::new();
    for mut c in conns {
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        statuses.push(raw_status(&out).unwrap());
    }
    let tried = statuses.iter().filter(|&&s| s == 401).count();
    assert_eq!(tried, 20, "{statuses:?}");
    // The right secret came last, when the budget was spent: refused too.
    assert_eq!(statuses[24], 429, "{statuses:?}");
    assert_eq!(
        statuses.iter().filter(|&&s| s == 429).count(),
        5,
        "{statuses:?}"
    );
}

#[tokio::test]
async fn well_known_documents() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    let (s, _, body) = send(
        b.addr,
        http::Request::get("/.well-known/jwks.json")
            .body(String::new())
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["keys"][0]["kty"], "OKP");
    assert_eq!(v["keys"][0]["crv"], "Ed25519");
    assert!(v["keys"][0].get("d").is_none(), "never the private key");
    let (s, _, body) = send(
        b.addr,
        http::Request::get("/.well-known/oauth-authorization-server")
            .body(String::new())
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["issuer"], "credbroker-test");
    assert!(v["token_endpoint"]
        .as_str()
        .unwrap()
        .ends_with("/oauth2/token"));
    // Served to anyone: it does not lay out the connectors and operations.
    assert!(v.get("scopes_supported").is_none(), "{v}");
    assert!(
        !body.contains("issues.read") && !body.contains("github"),
        "{body}"
    );
}

#[tokio::test]
async fn rfc_details_of_the_token_endpoint() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    // RFC 9396 §7: the granted authorization_details come back with the token.
    let details = r#"[{"type":"credbroker_request","connector":"github","method":"GET","path":"/repos/acme/widget/issues"}]"#;
    let (s, _, body) = b
        .token_request(
            "bot",
            SECRET,
            "github:issues.read",
            &[("authorization_details", details)],
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["authorization_details"][0]["path"],
        "/repos/acme/widget/issues"
    );
    // Only POST.
    let (s, h, _) = send(
        b.addr,
        http::Request::get("/oauth2/token")
            .body(String::new())
            .unwrap(),
    )
    .await;
    assert_eq!(s, 405);
    assert_eq!(h["allow"], "POST");
    // The metadata documents: GET and HEAD (headers only), a 405 naming them otherwise.
    for doc in [
        "/.well-known/jwks.json",
        "/.well-known/oauth-authorization-server",
    ] {
        let head = http::Request::head(doc).body(String::new()).unwrap();
        let (s, h, body) = send(b.addr, head).await;
        assert_eq!((s, body.as_str()), (200, ""), "{doc}");
        assert_eq!(h["content-type"], "application/json", "{doc}");
        let post = http::Request::post(doc).body(String::new()).unwrap();
        let (s, h, _) = send(b.addr, post).await;
        assert_eq!(s, 405, "{doc}");
        assert_eq!(h["allow"], "GET, HEAD", "{doc}");
    }
    // client_secret_post is an unsupported authentication method: invalid_client.
    let req = http::Request::post("/oauth2/token")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("grant_type=client_credentials&scope=github%3Aissues.read&client_id=bot&client_secret={SECRET}"))
        .unwrap();
    let (s, h, body) = send(b.addr, req).await;
    assert_eq!(s, 401, "{body}");
    assert!(body.contains("\"invalid_client\"") && !body.contains(SECRET));
    assert!(h.contains_key("www-authenticate"));
    // Recorded under the client it names, as a wrong Basic secret is, so that guessing at
    // bot's secret this way shows in `audit query --client bot`.
    let records = b.audit();
    let denied = events(&records, "token_denied");
    assert_eq!(denied.last().unwrap()["client"], "bot", "{denied:?}");
    // Its scope is not: a secret pasted there could not be told from the rest.
    assert!(denied.last().unwrap().get("scope").is_none(), "{denied:?}");
    assert!(!std::fs::read_to_string(b.audit_path())
        .unwrap()
        .contains(SECRET));
    // A non-Bearer scheme on the proxy carries no token: 401 without an error attribute.
    let (s, h, _) = b
        .call_with(
            "GET",
            "/github/repos/acme/widget/issues",
            "",
            &[("authorization", "Basic Ym90OnNlY3JldA==")],
            "",
        )
        .await;
    assert_eq!(s, 401);
    assert_eq!(h["www-authenticate"], "Bearer realm=\"credbroker\"");
    assert_eq!(up.count(), 0);
}

/// RFC 6749 §2.3: one authentication per request. With two `Authorization` headers the first
/// is not silently taken: the request is refused.
#[tokio::test]
async fn two_authorization_headers_are_refused() {
    use base64::Engine;
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    let basic = |id: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{id}:{SECRET}"))
        )
    };
    let req = http::Request::post("/oauth2/token")
        .header("authorization", basic("bot"))
        .header("authorization", basic("nogrants"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_encode(&[
            ("grant_type", "client_credentials"),
            ("scope", "github:issues.read"),
        ]))
        .unwrap();
    let (status, _, body) = send(b.addr, req).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("invalid_request") && !body.contains("access_token"),
        "{body}"
    );
}

/// DESIGN §3.3: a time-bound elevation exists until its `expires`. Once it has passed, a
/// token issued under it (its lifetime by §4.1's rule) is refused (403) and no new one is
/// issued (`invalid_scope`, also when it was the client's only grant), while the client's
/// other grants go on; `GET /v1/connectors` lists it with its reason throughout.
#[tokio::test]
async fn a_time_bound_grant_ends_at_its_expiry() {
    let up = FakeUpstream::start().await;
    // Whole seconds, 7–8 s ahead: time for the start and the calls before it on a loaded
    // machine, not much to wait after.
    let now = chrono::Utc::now();
    let expires = chrono::DateTime::from_timestamp(now.timestamp() + 8, 0).unwrap();
    let expires_text = expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let elevation = format!(
        "{{ connector = \"github\", operations = [\"issues.comment\"], expires = \"{expires_text}\", reason = \"INC-4711\" }}"
    );
    let config = standard_config(up.addr).replace(
        "operations = [\"issues.read\", \"issues.comment\"], max_ttl = \"120s\" }",
        &format!("operations = [\"issues.read\"], max_ttl = \"120s\" }}, {elevation}"),
    ) + &extra_client("responder", &format!("grants = [ {elevation} ]"));
    assert!(config.contains("INC-4711\" } ]\n"), "{config}");
    let b = TestBroker::start(&config).await;
    let expires_in = |body: &str| {
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        (
            v["expires_in"].as_u64().unwrap(),
            v["access_token"].as_str().unwrap().to_owned(),
        )
    };

    // Before its expiry: issued by DESIGN §4.1's rule, min(ttl, grant max_ttl,
    // tokens.max_ttl) — here 300 s (the grant has no max_ttl), not cut to the grant's expiry.
    let (s, _, body) = b
        .token_request(
            "responder",
            SECRET,
            "github:issues.comment",
            &[("ttl", "300")],
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let (ttl, elevated) = expires_in(&body);
    assert_eq!(ttl, 300);
    let comment = "/github/repos/acme/widget/issues/7/comments";
    assert_eq!(b.status("POST", comment, &elevated).await, 200);
    let (s, _, body) = b.token_request("bot", SECRET, "github:*", &[]).await;
    assert_eq!(s, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["scope"], "github:issues.read github:issues.comment");
    assert_eq!(v["expires_in"], 120, "issues.read's grant max_ttl: {body}");
    let standing = v["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        b.status("GET", "/github/repos/acme/widget/issues", &standing)
            .await,
        200
    );
    // The log says which tokens and calls relied on the elevation, and why (the reason must
    // outlive the config that holds it); what a standing grant covers carries neither field.
    let log = b.audit();
    let elevated_fields = |r: &serde_json::Value| {
        (
            r["grant_reason"].as_str().map(str::to_owned),
            r["grant_expires"].as_str().map(str::to_owned),
        )
    };
    let marked = (Some("INC-4711".to_owned()), Some(expires_text.clone()));
    let issued = events(&log, "token_issued");
    assert_eq!(issued.len(), 2);
    for r in &issued {
        assert_eq!(elevated_fields(r), marked, "{r}");
    }
    let calls = events(&log, "proxy");
    assert_eq!(calls[0]["operation"], "issues.comment");
    assert_eq!(elevated_fields(calls[0]), marked, "{}", calls[0]);
    assert_eq!(calls[1]["operation"], "issues.read");
    assert_eq!(elevated_fields(calls[1]), (None, None), "{}", calls[1]);
    for r in events(&log, "proxy_result") {
        assert_eq!(elevated_fields(r), (None, None), "{r}");
    }
    // A call refused after check 3 (here check 4, its one use spent) was not made under it.
    let (s, _, body) = b
        .token_request(
            "responder",
            SECRET,
            "github:issues.comment",
            &[("max_uses", "1")],
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let (_, once) = expires_in(&body);
    assert_eq!(b.status("POST", comment, &once).await, 200);
    assert_eq!(b.status("POST", comment, &once).await, 401);
    let log = b.audit();
    let spent = events(&log, "proxy").into_iter().last().unwrap().clone();
    assert_eq!(spent["reason"], "max_uses_exhausted");
    assert_eq!(elevated_fields(&spent), (None, None), "{spent}");
    let listed = grant_view(&b, "responder").await;
    assert_eq!(listed["reason"], "INC-4711");
    assert_eq!(listed["live"], true);
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(listed["expires"].as_str().unwrap()).unwrap(),
        expires
    );

    // Past its expiry the grant no longer exists: the token, still unexpired, is refused its
    // calls under it (403, DESIGN §3.3).
    let past = expires + chrono::Duration::milliseconds(1200);
    let wait = (past - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait).await;
    assert_eq!(b.status("POST", comment, &elevated).await, 403);
    let denied = b.audit();
    let last = events(&denied, "proxy").into_iter().last().unwrap().clone();
    assert_eq!(
        (last["decision"].as_str(), last["reason"].as_str()),
        (Some("deny"), Some("not_granted"))
    );
    // The record names the operation the call matched but may no longer use.
    assert_eq!(last["operation"], "issues.comment");
    for (client, scope) in [
        ("responder", "github:issues.comment"),
        ("responder", "github:*"),
        ("bot", "github:issues.comment"),
    ] {
        let (s, _, body) = b.token_request(client, SECRET, scope, &[]).await;
        assert_eq!(
            (s, body.contains("\"invalid_scope\"")),
            (400, true),
            "{client} {scope}: {body}"
        );
    }
    let (s, _, body) = b.token_request("bot", SECRET, "github:*", &[]).await;
    assert_eq!(s, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["scope"].as_str(), v["expires_in"].as_u64()),
        (Some("github:issues.read"), Some(120))
    );
    assert_eq!(grant_view(&b, "responder").await["live"], false);
}

/// DESIGN §4.1: granted lifetime = min(`ttl`, grant `max_ttl`, `tokens.max_ttl`), default
/// `tokens.default_ttl`.
#[tokio::test]
async fn the_granted_lifetime_is_the_least_of_ttl_grant_and_broker_limits() {
    let up = FakeUpstream::start().await;
    let config = standard_config(up.addr).replace(
        "issuer = \"credbroker-test\"",
        "issuer = \"credbroker-test\"\ndefault_ttl = \"45s\"\nmax_ttl = \"600s\"",
    ) + &extra_client(
        "wide",
        "grants = [ { connector = \"github\", operations = [\"issues.read\"] } ]",
    );
    let b = TestBroker::start(&config).await;
    for (client, ttl, want) in [
        ("bot", None, 45),          // default_ttl, under the grant's 120 s
        ("bot", Some("30"), 30),    // a smaller ttl is honoured
        ("bot", Some("9999"), 120), // the grant's max_ttl
        ("wide", None, 45),
        ("wide", Some("300"), 300), // no grant max_ttl: up to tokens.max_ttl
        ("wide", Some("9999"), 600), // tokens.max_ttl
    ] {
        let extra: Vec<(&str, &str)> = ttl.iter().map(|t| ("ttl", *t)).collect();
        let (s, _, body) = b
            .token_request(client, SECRET, "github:issues.read", &extra)
            .await;
        assert_eq!(s, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["expires_in"], want, "{client} ttl={ttl:?}");
        let token = v["access_token"].as_str().unwrap();
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::Engine::decode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                token.split('.').nth(1).unwrap(),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
            want,
            "{client} ttl={ttl:?}"
        );
    }
}

/// The `GET /v1/connectors` entry of `client`'s grant on the first connector.
async fn grant_view(b: &TestBroker, client: &str) -> serde_json::Value {
    let (s, _, view) = b.admin_call("GET", "/v1/connectors", "").await;
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&view).unwrap();
    let grants = v["connectors"][0]["grants"].as_array().unwrap().clone();
    grants
        .into_iter()
        .find(|g| g["client"] == client)
        .expect("the grant is listed")
}

/// A `[[clients]]` table with the test secret, for appending to a config.
fn extra_client(id: &str, grants: &str) -> String {
    format!(
        "\n[[clients]]\nid = \"{id}\"\nowner = \"o@acme.example\"\nsecret_sha256 = \"{}\"\n{grants}\n",
        sha256_hex(SECRET)
    )
}

/// A token the proxy would refuse as too long is not issued (400 `invalid_request`, recorded
/// as `token_denied`); one just under the limit is, and works.
#[tokio::test]
async fn no_token_is_issued_that_the_proxy_would_refuse_as_too_long() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    let details = |n: usize| {
        let entries: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    r#"{{"type":"credbroker_request","connector":"github","method":"GET","path":"/repos/acme/r{i:03}/issues"}}"#
                )
            })
            .collect();
        format!("[{}]", entries.join(","))
    };
    let (s, _, body) = b
        .token_request(
            "bot",
            SECRET,
            "github:issues.read",
            &[("authorization_details", &details(100))],
        )
        .await;
    assert_eq!(s, 400, "{body}");
    assert!(
        body.contains("\"invalid_request\"") && body.contains("bytes"),
        "{body}"
    );
    assert!(!body.contains("access_token"), "{body}");
    let records = b.audit();
    let denied = events(&records, "token_denied");
    assert_eq!(denied.last().unwrap()["reason"], "invalid_request");
    assert!(events(&records, "token_issued").is_empty());
    // 40 entries fit (under 7 KiB, max_header_bytes 8192 less 1 KiB): issued and usable.
    let (s, _, body) = b
        .token_request(
            "bot",
            SECRET,
            "github:issues.read",
            &[("authorization_details", &details(40))],
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let token = v["access_token"].as_str().unwrap();
    assert!(token.len() > 4000, "{}", token.len());
    assert_eq!(
        b.status("GET", "/github/repos/acme/r039/issues", token)
            .await,
        200
    );
}

/// A secret or a token sent as the scope (a field mix-up) is neither echoed in the error nor
/// written to the `token_denied` record: it is `REDACTED` there (DESIGN §4.1, §5).
#[tokio::test]
async fn a_secret_or_token_sent_as_the_scope_is_neither_echoed_nor_recorded() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    let token = b.token("github:issues.read", &[]).await;
    for (scope, value) in [
        (SECRET.to_owned(), SECRET),
        (format!("github:issues.read {CREDENTIAL}"), CREDENTIAL),
        (format!("github:{CREDENTIAL}"), CREDENTIAL),
        (ADMIN_TOKEN.to_owned(), ADMIN_TOKEN),
        (token.clone(), token.as_str()),
        (format!("github:{token}"), token.as_str()),
    ] {
        let (s, _, body) = b.token_request("bot", SECRET, &scope, &[]).await;
        assert_eq!(s, 400, "{body}");
        assert!(body.contains("invalid_scope"), "{body}");
        assert!(!body.contains(value), "{body}");
    }
    let log = std::fs::read_to_string(b.audit_path()).unwrap();
    for value in [SECRET, CREDENTIAL, ADMIN_TOKEN, token.as_str()] {
        assert!(!log.contains(value), "a secret reached the audit log");
    }
    let records = b.audit();
    let denied = events(&records, "token_denied");
    assert_eq!(denied.len(), 6);
    assert_eq!(denied[1]["scope"], "github:issues.read REDACTED");
    assert_eq!(denied[2]["scope"], "REDACTED");
}
