//! DESIGN §3.4, §3.5, §4.4: reload narrows already-issued tokens, revocation by jti, by
//! client and the connector kill switch, admin authentication.

use crate::support::*;

#[tokio::test]
async fn admin_needs_its_token_but_health_does_not() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    let admin = b.admin.unwrap();
    let (s, _, _) = send(
        admin,
        http::Request::get("/healthz").body(String::new()).unwrap(),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _, _) = send(
        admin,
        http::Request::get("/v1/connectors")
            .body(String::new())
            .unwrap(),
    )
    .await;
    assert_eq!(s, 401);
    let req = http::Request::get("/v1/connectors")
        .header("authorization", "Bearer wrong")
        .body(String::new())
        .unwrap();
    assert_eq!(send(admin, req).await.0, 401);
    // Two Authorization headers, the right token first: refused, as on the proxy.
    let req = http::Request::get("/v1/connectors")
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .header("authorization", "Bearer other")
        .body(String::new())
        .unwrap();
    assert_eq!(send(admin, req).await.0, 401);
    let (s, _, body) = b.admin_call("GET", "/v1/connectors", "").await;
    assert_eq!(s, 200);
    assert!(body.contains("\"owner\":\"platform@acme.example\"") && body.contains("issues.read"));
    // Each refusal counted: a guess at the admin token through a read leaves no audit record.
    let (_, _, metrics) = b.admin_call("GET", "/metrics", "").await;
    for counted in [
        "credbroker_admin_requests_denied_total{reason=\"missing_token\"} 1",
        "credbroker_admin_requests_denied_total{reason=\"wrong_token\"} 2",
    ] {
        assert!(metrics.contains(counted), "{counted}: {metrics}");
    }
    assert!(!body.contains(CREDENTIAL), "never a secret");
    // A wrong method is a 405 that names the right ones (RFC 9110 §15.5.6).
    for (method, path, allow) in [
        ("GET", "/v1/reload", "POST"),
        ("DELETE", "/v1/revoke", "POST"),
        ("POST", "/metrics", "GET, HEAD"),
        ("PUT", "/v1/connectors", "GET, HEAD"),
    ] {
        let (s, h, _) = b.admin_call(method, path, "").await;
        assert_eq!(s, 405, "{method} {path}");
        assert_eq!(h["allow"], allow, "{method} {path}");
    }
    let (s, _, body) = b.admin_call("HEAD", "/metrics", "").await;
    assert_eq!((s, body.as_str()), (200, ""));
}

#[tokio::test]
async fn reload_narrows_an_issued_token_at_once_and_bad_config_keeps_the_old() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    let token = b
        .token("github:issues.read github:issues.comment", &[])
        .await;
    assert_eq!(
        b.status("GET", "/github/repos/acme/widget/issues", &token)
            .await,
        200
    );
    // an invalid config is refused and the old one keeps serving
    std::fs::write(b.config_path(), "[server]\nlisten = nonsense").unwrap();
    let (s, _, body) = b.admin_call("POST", "/v1/reload", "").await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(
        b.status("GET", "/github/repos/acme/widget/issues", &token)
            .await,
        200
    );
    // narrow the grant: issues.read removed
    let narrowed = standard_config(up.addr).replace(
        "operations = [\"issues.read\", \"issues.comment\"]",
        "operations = [\"issues.comment\"]",
    );
    std::fs::write(b.config_path(), narrowed).unwrap();
    let (s, _, body) = b.admin_call("POST", "/v1/reload", "").await;
    assert_eq!(s, 200, "{body}");
    let (s, _, _) = b
        .call("GET", "/github/repos/acme/widget/issues", &token)
        .await;
    assert_eq!(s, 403, "the removed operation is refused for the old token");
    assert_eq!(up.count(), 2);
    let records = b.audit();
    let admin: Vec<_> = events(&records, "admin");
    assert_eq!(admin.len(), 2);
    assert_eq!(admin[0]["result"], "failed");
    assert!(admin[0].get("config_sha256").is_none());
    assert_eq!(admin[1]["result"], "ok");
    // The record says which config is in force from then on, as `startup` does.
    use sha2::Digest;
    let file = std::fs::read(b.config_path()).unwrap();
    assert_eq!(
        admin[1]["config_sha256"],
        hex::encode(sha2::Sha256::digest(&file))
    );
    assert_ne!(
        admin[1]["config_sha256"],
        events(&records, "startup")[0]["config_sha256"]
    );
}

/// A revoked jti's entry is kept while its token could pass, and no longer when that is known:
/// a pasted token says its `exp`, so its entry goes with the longest life of a token issued
/// now (`max_ttl` 900 s + leeway 5 s, the defaults); a bare jti's token could have been issued
/// under an earlier, longer `max_ttl`, so without `exp` it is kept a year.
#[tokio::test]
async fn a_pasted_tokens_revocation_is_kept_as_long_as_it_can_live_a_bare_jti_a_year() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    let pasted = b.token("github:issues.read", &[]).await;
    let bare = jti_of(&b.token("github:issues.read", &[]).await);
    let with_exp = jti_of(&b.token("github:issues.read", &[]).await);
    let now = chrono::Utc::now().timestamp();
    let exp_given = now + 2_000;
    for body in [
        serde_json::json!({ "jti": pasted }),
        serde_json::json!({ "jti": bare }),
        serde_json::json!({ "jti": with_exp, "exp": exp_given }),
    ] {
        let (status, _, answer) = b.admin_call("POST", "/v1/revoke", &body.to_string()).await;
        assert_eq!(status, 200, "{answer}");
    }
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(b.dir.path().join("state/revocations.json")).unwrap(),
    )
    .unwrap();
    let kept_until = |jti: &str| state["jtis"][jti].as_i64().expect(jti);
    let pasted_until = kept_until(&jti_of(&pasted));
    assert!(
        (now + 905..=now + 905 + 5).contains(&pasted_until),
        "the longest life of a token issued now, not its 300 s nor a year: {}",
        pasted_until - now
    );
    let year = 366 * 24 * 3600;
    assert!((now + year..=now + year + 5).contains(&kept_until(&bare)));
    assert_eq!(kept_until(&with_exp), exp_given);
}

/// After a revocation: `revoked` is refused (401), `kept` still works.
async fn assert_only_first_refused(b: &TestBroker, revoked: &str, kept: &str) {
    let target = "/github/repos/acme/widget/issues";
    assert_eq!(b.status("GET", target, revoked).await, 401);
    assert_eq!(b.status("GET", target, kept).await, 200);
}

#[tokio::test]
async fn a_token_pasted_as_a_jti_revokes_it_and_is_never_written() {
    let up = FakeUpstream::start().await;
    // A max_ttl over a year: a jti revocation used to panic on its crossed bounds.
    let config =
        standard_config(up.addr).replacen("[tokens]\n", "[tokens]\nmax_ttl = \"400d\"\n", 1);
    let b = TestBroker::start(&config).await;
    let token = b.token("github:issues.read", &[]).await;
    let other = b.token("github:issues.read", &[]).await;
    let (status, _, body) = b
        .admin_call("POST", "/v1/revoke", &format!("{{\"jti\":\"{token}\"}}"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&jti_of(&token)), "named by its jti: {body}");
    assert!(!body.contains(&token), "the token is not echoed");
    assert_only_first_refused(&b, &token, &other).await;
    let log = std::fs::read_to_string(b.audit_path()).unwrap();
    assert!(!log.contains(&token), "nor written to the audit log");
    assert!(log.contains(&format!("jti:{}", jti_of(&token))));

    // A token-shaped value whose jti cannot be read is refused, without naming it.
    let garbled = "eyJhbGciOiJFZERTQSJ9.bm90LWpzb24.c2ln";
    let (status, _, body) = b
        .admin_call("POST", "/v1/revoke", &format!("{{\"jti\":\"{garbled}\"}}"))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(!body.contains(garbled), "{body}");
    let log = std::fs::read_to_string(b.audit_path()).unwrap();
    assert!(!log.contains(garbled));

    // Pasted as a header value or with whitespace around it (a header dump, a file read with
    // its newline): still the token, revoked by its jti, never written.
    for paste in ["Bearer {t}", "bearer  {t}", " {t}", "{t}\n", "\t{t} "] {
        let token = b.token("github:issues.read", &[]).await;
        let other = b.token("github:issues.read", &[]).await;
        let jti = serde_json::to_string(&paste.replace("{t}", &token)).unwrap();
        let (status, _, body) = b
            .admin_call("POST", "/v1/revoke", &format!("{{\"jti\":{jti}}}"))
            .await;
        assert_eq!(status, 200, "{paste:?}: {body}");
        assert!(!body.contains(&token), "{paste:?}: {body}");
        assert_only_first_refused(&b, &token, &other).await;
    }
    // Neither a jti nor a token (a piece of one, a header line): refused, not written.
    for junk in [
        "Authorization: Bearer abc",
        "eyJhbGciOiJFZERTQSJ9.bm90",
        "",
        "x\u{1}y",
    ] {
        let jti = serde_json::to_string(junk).unwrap();
        let (status, _, body) = b
            .admin_call("POST", "/v1/revoke", &format!("{{\"jti\":{jti}}}"))
            .await;
        assert_eq!(status, 400, "{junk:?}: {body}");
    }
    let log = std::fs::read_to_string(b.audit_path()).unwrap();
    assert!(!log.contains("Authorization: Bearer abc"));
    assert!(!log.contains("bm90\""));
    let state = std::fs::read_to_string(b.dir.path().join("state/revocations.json")).unwrap();
    assert!(
        !state.contains("eyJ"),
        "no token or piece of one kept: {state}"
    );
}

#[tokio::test]
async fn revocation_by_jti_client_and_kill_switch() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    let t1 = b.token("github:issues.read", &[]).await;
    let t2 = b.token("github:issues.read", &[]).await;
    let jti = {
        use base64::Engine;
        let claims = t1.split('.').nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(claims)
                .unwrap(),
        )
        .unwrap();
        v["jti"].as_str().unwrap().to_owned()
    };
    assert_eq!(
        b.admin_call("POST", "/v1/revoke", &format!("{{\"jti\":\"{jti}\"}}"))
            .await
            .0,
        200
    );
    assert_only_first_refused(&b, &t1, &t2).await;
    // Given without its `exp`, the revocation is kept the longest, a year, not the max_ttl in
    // force now (a reload may have shortened it since older tokens were issued).
    let state = std::fs::read_to_string(b.dir.path().join("state/revocations.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    let kept_until = state["jtis"][&jti].as_i64().unwrap();
    let year = 366 * 24 * 3600;
    assert!(
        kept_until >= chrono::Utc::now().timestamp() + year - 60,
        "{state}"
    );
    // kill switch
    assert_eq!(
        b.admin_call("POST", "/v1/revoke", "{\"connector\":\"github\"}")
            .await
            .0,
        200
    );
    assert_eq!(
        b.status("GET", "/github/repos/acme/widget/issues", &t2)
            .await,
        403
    );
    let (s, _, _) = b
        .token_request("bot", SECRET, "github:issues.read", &[])
        .await;
    assert_eq!(s, 400, "no token for a disabled connector");
    assert_eq!(
        b.admin_call("POST", "/v1/enable", "{\"connector\":\"github\"}")
            .await
            .0,
        200
    );
    assert_eq!(
        b.status("GET", "/github/repos/acme/widget/issues", &t2)
            .await,
        200
    );
    // every token of the client, including one minted in the same second
    assert_eq!(
        b.admin_call("POST", "/v1/revoke", "{\"client\":\"bot\"}")
            .await
            .0,
        200
    );
    assert_eq!(
        b.status("GET", "/github/repos/acme/widget/issues", &t2)
            .await,
        401
    );
    assert_eq!(up.count(), 2);
    let seen = up.requests();
    assert!(seen.iter().all(|r| r.method == "GET" && r.body.is_empty()));
    let records = b.audit();
    assert_eq!(events(&records, "admin").len(), 4);
}

#[tokio::test]
async fn reload_rotates_the_admin_token_and_refuses_restart_only_changes() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    // Settings read at start-up are refused by name, not silently ignored.
    let moved =
        standard_config(up.addr).replace("max_header_bytes = 8192", "max_header_bytes = 4096");
    std::fs::write(b.config_path(), moved).unwrap();
    let (s, _, body) = b.admin_call("POST", "/v1/reload", "").await;
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("server.max_header_bytes"), "{body}");
    // The admin token is rotated by a reload.
    let rotated =
        standard_config(up.addr).replace(&sha256_hex(ADMIN_TOKEN), &sha256_hex("new-admin-token"));
    std::fs::write(b.config_path(), rotated).unwrap();
    assert_eq!(b.admin_call("POST", "/v1/reload", "").await.0, 200);
    assert_eq!(
        b.admin_call("GET", "/v1/connectors", "").await.0,
        401,
        "old token refused"
    );
    let req = http::Request::get("/v1/connectors")
        .header("authorization", "Bearer new-admin-token")
        .body(String::new())
        .unwrap();
    assert_eq!(send(b.admin.unwrap(), req).await.0, 200);
}

/// DESIGN §3.5 "every admin action is audited": refused attempts too — a wrong admin token at
/// the kill switch (`denied`), a bad request (`failed`, with why). Empty names are refused.
#[tokio::test]
async fn refused_admin_calls_are_audited() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    let req = http::Request::post("/v1/revoke")
        .header("authorization", "Bearer wrong")
        .body("{\"connector\":\"github\"}".to_owned())
        .unwrap();
    assert_eq!(send(b.admin.unwrap(), req).await.0, 401);
    for body in ["{\"connector\":\"nosuch\"}", "{}", "{\"jti\":\"\"}"] {
        let (s, _, text) = b.admin_call("POST", "/v1/revoke", body).await;
        assert_eq!(s, 400, "{body}: {text}");
    }
    assert_eq!(
        b.admin_call("POST", "/v1/enable", "{\"connector\":\"nosuch\"}")
            .await
            .0,
        400
    );
    let records = b.audit();
    let admin = events(&records, "admin");
    let results: Vec<(&str, &str)> = admin
        .iter()
        .map(|r| (r["action"].as_str().unwrap(), r["result"].as_str().unwrap()))
        .collect();
    assert_eq!(
        results,
        [
            ("revoke", "denied"),
            ("disable", "failed"),
            ("revoke", "failed"),
            ("revoke", "failed"),
            ("enable", "failed"),
        ]
    );
    // Whoever showed a wrong admin token is not named `admin`.
    assert!(admin[0]["actor"]
        .as_str()
        .unwrap()
        .starts_with("anonymous@127.0.0.1:"));
    // A name that names nothing is not recorded: it may be anything pasted.
    assert_eq!(
        admin[1]["error"],
        "unknown connector (the value given is not recorded)"
    );
    assert!(admin[1].get("target").is_none(), "{}", admin[1]);
}

/// DESIGN §5 (no secret in a record): a client secret, the admin token or a connector's
/// credential pasted where a jti, client or connector name belongs is refused, and neither
/// recorded nor echoed; revoking a client the config does not name is done, with a warning.
#[tokio::test]
async fn a_secret_given_as_a_name_is_refused_unrecorded_and_an_unknown_client_is_warned_about() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    let token = b.token("github:issues.read", &[]).await;
    let secrets = [SECRET, ADMIN_TOKEN, CREDENTIAL];
    for secret in secrets {
        for (path, field) in [
            ("/v1/revoke", "client"),
            ("/v1/revoke", "jti"),
            ("/v1/revoke", "connector"),
            ("/v1/enable", "connector"),
        ] {
            let body = serde_json::json!({ field: secret }).to_string();
            let (s, _, answer) = b.admin_call("POST", path, &body).await;
            assert_eq!(s, 400, "{path} {field}: {answer}");
            assert!(answer.contains("a secret the broker holds"), "{answer}");
            assert!(!answer.contains(secret), "{answer}");
        }
    }
    // A token given as the client or connector (its jti was meant), and the client's HTTP
    // Basic value: refused too, neither recorded nor echoed (nor kept in the state file).
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("bot:{SECRET}"));
    let pasted = [
        token.clone(),
        format!("Bearer {token}"),
        basic.clone(),
        format!("Basic {basic}"),
    ];
    for value in &pasted {
        for (path, field) in [
            ("/v1/revoke", "client"),
            ("/v1/revoke", "connector"),
            ("/v1/enable", "connector"),
        ] {
            let body = serde_json::json!({ field: value }).to_string();
            let (s, _, answer) = b.admin_call("POST", path, &body).await;
            assert_eq!(s, 400, "{path} {field}: {answer}");
            assert!(!answer.contains(value.as_str()), "{answer}");
            assert!(!answer.contains(&token), "{answer}");
        }
    }
    // A client the config does not name: revoked all the same (a backstop for a removed
    // client, or one another replica still has), with a warning in the answer.
    let (s, _, answer) = b
        .admin_call("POST", "/v1/revoke", "{\"client\":\"b0t\"}")
        .await;
    assert_eq!(s, 200, "{answer}");
    assert!(answer.contains("no such client"), "{answer}");
    // Nothing was revoked.
    assert_eq!(
        b.status("GET", "/github/repos/acme/widget/issues", &token)
            .await,
        200
    );
    let log = std::fs::read_to_string(b.audit_path()).unwrap();
    for secret in secrets.iter().chain([&token.as_str(), &basic.as_str()]) {
        assert!(!log.contains(secret), "a secret reached the audit log");
    }
    // A client id with dots is a name, not a token.
    let (s, _, answer) = b
        .admin_call("POST", "/v1/revoke", "{\"client\":\"acme.triage.bot\"}")
        .await;
    assert_eq!(s, 200, "{answer}");
    let records = b.audit();
    let admin = events(&records, "admin");
    assert_eq!(admin.len(), 26);
    assert!(admin[..24]
        .iter()
        .all(|r| r["result"] == "failed" && r.get("target").is_none()));
    assert_eq!(admin[24]["target"], "client:b0t");
    assert_eq!(admin[24]["result"], "ok");
    assert_eq!(admin[25]["target"], "client:acme.triage.bot");
}

/// Revokes client `bot` just past a second's start, so that a token request made right after
/// falls in the revocation's second.
async fn revoke_bot_early_in_a_second(b: &TestBroker) {
    let into_second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_millis();
    tokio::time::sleep(std::time::Duration::from_millis(u64::from(
        1010 - into_second,
    )))
    .await;
    let revoke = b
        .admin_call("POST", "/v1/revoke", "{\"client\":\"bot\"}")
        .await;
    assert_eq!(revoke.0, 200);
}

/// A client revoked in this second: a token issued to it now would be refused on every use
/// (`iat` at or before the cut-off), so the token endpoint waits for the second to pass and
/// issues one then — a working token, not an error the client's OAuth library would not retry.
#[tokio::test]
async fn a_token_asked_in_a_client_revocations_second_is_issued_after_it_and_works() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    revoke_bot_early_in_a_second(&b).await;
    let revoked_at = b
        .audit()
        .iter()
        .rev()
        .find(|r| r["event"] == "admin")
        .map(|r| chrono::DateTime::parse_from_rfc3339(r["ts"].as_str().unwrap()).unwrap())
        .unwrap()
        .timestamp();
    let asked = std::time::Instant::now();
    let (status, _, body) = b
        .token_request("bot", SECRET, "github:issues.read", &[])
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(asked.elapsed() < std::time::Duration::from_millis(1500));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let token = v["access_token"].as_str().unwrap().to_owned();
    let iat = claims_of(&token)["iat"].as_i64().unwrap();
    assert!(
        iat > revoked_at,
        "issued past the revocation's second: {iat} / {revoked_at}"
    );
    assert_eq!(
        b.status("GET", "/github/repos/acme/widget/issues", &token)
            .await,
        200,
        "a token issued after the revocation works"
    );
}

/// A kill switch pulled while a token request waits out a client revocation's second is seen:
/// no token is issued for the connector switched off meanwhile (DESIGN §3.3).
#[tokio::test]
async fn a_kill_switch_pulled_during_the_wait_is_seen() {
    let up = FakeUpstream::start().await;
    let b = std::sync::Arc::new(TestBroker::start(&standard_config(up.addr)).await);
    revoke_bot_early_in_a_second(&b).await;
    let asking = std::sync::Arc::clone(&b);
    let asked = tokio::spawn(async move {
        let answer = asking
            .token_request("bot", SECRET, "github:issues.read", &[])
            .await;
        (answer, std::time::Instant::now())
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let kill = b
        .admin_call("POST", "/v1/revoke", "{\"connector\":\"github\"}")
        .await;
    assert_eq!(kill.0, 200);
    let pulled = std::time::Instant::now();
    let ((status, _, body), answered) = asked.await.unwrap();
    assert!(
        pulled < answered,
        "the kill switch came after the wait (machine too slow)"
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid_scope"), "{body}");
}

/// Rotating the signing key: replace its file and reload. The JWKS publishes the new key,
/// tokens are signed with it, and every token signed with the old one is refused at once (what
/// an emergency rotation is for). A key file that does not load refuses the reload, naming the
/// problem; the running key stays.
#[tokio::test]
async fn a_reload_rotates_a_signing_key_replaced_in_place() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = keygen_signing_key(dir.path());
    let config = standard_config(up.addr).replace(
        "issuer = \"credbroker-test\"",
        "issuer = \"credbroker-test\"\nsigning_key = \"signing.pem\"",
    );
    let b = TestBroker::start_in(&config, dir).await;
    let jwks = |b: &TestBroker| {
        let addr = b.addr;
        async move {
            let req = http::Request::get("/.well-known/jwks.json")
                .body(String::new())
                .unwrap();
            let (_, _, body) = send(addr, req).await;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            v["keys"][0]["kid"].as_str().unwrap().to_owned()
        }
    };
    let old_kid = jwks(&b).await;
    let old_token = b.token("github:issues.read", &[]).await;
    let issues = "/github/repos/acme/widget/issues";
    assert_eq!(b.status("GET", issues, &old_token).await, 200);

    // A file that is not a key: refused, named; the running key stays.
    let original = std::fs::read(&key).unwrap();
    std::fs::write(&key, "not a key").unwrap();
    let (s, _, body) = b.admin_call("POST", "/v1/reload", "").await;
    assert_eq!(s, 400, "{body}");
    assert!(
        body.contains("tokens.signing_key") && body.contains("running key"),
        "{body}"
    );
    assert_eq!(b.status("GET", issues, &old_token).await, 200);

    // A new key: the reload rotates to it.
    std::fs::remove_file(&key).unwrap();
    keygen_signing_key(b.dir.path());
    assert_ne!(std::fs::read(&key).unwrap(), original);
    let (s, _, body) = b.admin_call("POST", "/v1/reload", "").await;
    assert_eq!(s, 200, "{body}");
    let new_kid = jwks(&b).await;
    assert_ne!(new_kid, old_kid);
    assert_eq!(
        b.status("GET", issues, &old_token).await,
        401,
        "signed with the old key"
    );
    let new_token = b.token("github:issues.read", &[]).await;
    assert_eq!(b.status("GET", issues, &new_token).await, 200);
}

/// Sends the head and the first chunk of a chunked comment, so the broker has checked the
/// call and waits for the rest of its body.
async fn start_chunked_upload(b: &TestBroker, token: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let head = format!(
        "POST /github/repos/acme/widget/issues/7/comments HTTP/1.1\r\nHost: broker\r\n\
         Authorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // Long enough for checks 1–5 to pass and the body read to start waiting.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    stream
}

/// Ends the upload and reads the answer's status.
async fn finish_chunked_upload(mut stream: tokio::net::TcpStream) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(b"0\r\n\r\n").await.unwrap();
    let mut answer = vec![0; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    raw_status(&String::from_utf8_lossy(&answer[..n]))
}

/// A call checked before a revocation, kill switch or reload but still uploading its body
/// when the change is acknowledged is decided again before anything leaves: it is refused,
/// the upstream sees nothing, and no allow record follows the change's admin record
/// (DESIGN §3.4 "takes effect at once", §3.5).
#[tokio::test]
async fn a_change_acknowledged_while_a_call_uploads_refuses_it() {
    let up = FakeUpstream::start().await;
    let config = standard_config(up.addr);
    let b = TestBroker::start(&config).await;
    let scope = "github:issues.comment";

    // Revocation of the token itself.
    let token = b.token(scope, &[]).await;
    let upload = start_chunked_upload(&b, &token).await;
    let jti = format!(r#"{{"jti":"{}"}}"#, jti_of(&token));
    assert_eq!(b.admin_call("POST", "/v1/revoke", &jti).await.0, 200);
    assert_eq!(finish_chunked_upload(upload).await, Some(401));

    // The kill switch.
    let token = b.token(scope, &[]).await;
    let upload = start_chunked_upload(&b, &token).await;
    let kill = r#"{"connector":"github"}"#;
    assert_eq!(b.admin_call("POST", "/v1/revoke", kill).await.0, 200);
    assert_eq!(finish_chunked_upload(upload).await, Some(403));
    assert_eq!(b.admin_call("POST", "/v1/enable", kill).await.0, 200);

    // A reload that takes the operation away from the client.
    let token = b.token(scope, &[]).await;
    let upload = start_chunked_upload(&b, &token).await;
    let narrowed = config.replace(
        "operations = [\"issues.read\", \"issues.comment\"]",
        "operations = [\"issues.read\"]",
    );
    std::fs::write(b.config_path(), &narrowed).unwrap();
    assert_eq!(b.admin_call("POST", "/v1/reload", "").await.0, 200);
    assert_eq!(finish_chunked_upload(upload).await, Some(403));

    // The same upload with nothing changed meanwhile is forwarded: the refusals above are
    // the changes', not the wait's.
    std::fs::write(b.config_path(), &config).unwrap();
    assert_eq!(b.admin_call("POST", "/v1/reload", "").await.0, 200);
    let token = b.token(scope, &[]).await;
    let upload = start_chunked_upload(&b, &token).await;
    assert_eq!(finish_chunked_upload(upload).await, Some(200));
    assert_eq!(up.count(), 1, "only the last upload reached the upstream");

    let records = b.audit();
    let proxy = events(&records, "proxy");
    let reasons: Vec<_> = proxy.iter().map(|r| r["reason"].as_str()).collect();
    assert_eq!(
        reasons,
        [
            Some("token_revoked"),
            Some("connector_disabled"),
            Some("not_granted"),
            None
        ],
        "{proxy:?}"
    );
    assert_eq!(proxy[3]["decision"], "allow");
    // Each refusal is recorded after the admin record of the change that caused it.
    let seq_of = |r: &serde_json::Value| r["seq"].as_u64().unwrap();
    let admin = events(&records, "admin");
    for (deny, change) in proxy[..3].iter().zip([&admin[0], &admin[1], &admin[3]]) {
        assert!(seq_of(deny) > seq_of(change), "{deny} before {change}");
    }
}

/// A body in the wrong shape is refused without quoting it: the JSON parser's own messages
/// name the unexpected value or field, which may be a secret pasted in the wrong place.
/// Also: the open health paths answer a wrong method 405 with `Allow`, as other routes do.
#[tokio::test]
async fn a_malformed_admin_body_is_refused_without_quoting_it() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    const SENTINEL: &str = "SeNtInEl0123456789abcdef";
    for (path, body) in [
        ("/v1/revoke", format!("\"{SENTINEL}\"")),
        ("/v1/revoke", format!(r#"{{"exp":"{SENTINEL}"}}"#)),
        ("/v1/revoke", format!(r#"{{"{SENTINEL}":"x"}}"#)),
        ("/v1/revoke", format!(r#"{{"jti":["{SENTINEL}"]}}"#)),
        (
            "/v1/enable",
            format!(r#"{{"connector":"github","{SENTINEL}":1}}"#),
        ),
    ] {
        let (status, _, answer) = b.admin_call("POST", path, &body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(!answer.contains(SENTINEL), "{body}: {answer}");
        assert!(answer.contains("invalid JSON body"), "{answer}");
    }
    let log = std::fs::read_to_string(b.audit_path()).unwrap();
    assert!(!log.contains(SENTINEL), "{log}");
    assert_eq!(events(&b.audit(), "admin").len(), 5);

    let admin = b.admin.unwrap();
    for path in ["/healthz", "/readyz"] {
        let req = http::Request::post(path).body(String::new()).unwrap();
        let (status, headers, _) = send(admin, req).await;
        assert_eq!(status, 405, "{path}");
        assert_eq!(headers["allow"], "GET, HEAD", "{path}");
    }
}

/// An operator with an admin token of their own (`[[admin.operators]]`) is named in the
/// records of what they do — the shared token's are `admin@…` — and a reload that removes
/// them shuts their token out at once.
#[tokio::test]
async fn an_operators_own_admin_token_names_them_in_the_audit_log() {
    let up = FakeUpstream::start().await;
    let alice = "alice-admin-token-0123456789abcdef";
    let shared_line = format!("token_sha256 = \"{}\"", sha256_hex(ADMIN_TOKEN));
    let config = standard_config(up.addr).replace(
        &shared_line,
        &format!(
            "{shared_line}\noperators = [ {{ name = \"alice\", token_sha256 = \"{}\" }} ]",
            sha256_hex(alice)
        ),
    );
    assert_ne!(config, standard_config(up.addr));
    let b = TestBroker::start(&config).await;
    let as_alice = |method: &str, path: &str, body: &str| {
        http::Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {alice}"))
            .body(body.to_owned())
            .unwrap()
    };
    let admin = b.admin.unwrap();
    let kill = "{\"connector\":\"github\"}";
    assert_eq!(
        send(admin, as_alice("POST", "/v1/revoke", kill)).await.0,
        200
    );
    assert_eq!(
        send(admin, as_alice("GET", "/v1/connectors", "")).await.0,
        200
    );
    assert_eq!(b.admin_call("POST", "/v1/enable", kill).await.0, 200);
    // An operator's token is a secret the broker holds: pasted as a name, it is refused and
    // neither recorded nor echoed (DESIGN §5).
    let pasted = format!("{{\"client\":\"{alice}\"}}");
    let (status, _, body) = b.admin_call("POST", "/v1/revoke", &pasted).await;
    assert_eq!(status, 400, "{body}");
    assert!(!body.contains(alice), "{body}");
    std::fs::write(b.config_path(), standard_config(up.addr)).unwrap();
    assert_eq!(b.admin_call("POST", "/v1/reload", "").await.0, 200);
    assert_eq!(
        send(admin, as_alice("POST", "/v1/revoke", kill)).await.0,
        401
    );

    let records = b.audit();
    let steps: Vec<(String, String, String)> = events(&records, "admin")
        .iter()
        .map(|r| {
            let actor = r["actor"].as_str().unwrap();
            let (who, from) = actor.split_once('@').unwrap();
            assert!(from.starts_with("127.0.0.1:"), "{actor}");
            let field = |k: &str| r[k].as_str().unwrap().to_owned();
            (who.to_owned(), field("action"), field("result"))
        })
        .collect();
    let expected = [
        ("alice", "disable", "ok"),
        ("admin", "enable", "ok"),
        ("admin", "revoke", "failed"),
        ("admin", "reload", "ok"),
        ("anonymous", "revoke", "denied"),
    ];
    let expected: Vec<(String, String, String)> = expected
        .iter()
        .map(|(w, a, r)| (w.to_string(), a.to_string(), r.to_string()))
        .collect();
    assert_eq!(steps, expected);
    let log = std::fs::read_to_string(b.audit_path()).unwrap();
    assert!(!log.contains(alice), "an operator's token in the audit log");
}
